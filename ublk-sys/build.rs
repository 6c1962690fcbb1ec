//! Generates the ublk bindings from the kernel's own `linux/ublk_cmd.h`.
//!
//! * `bindings.rs`: bindgen over `wrapper.h`, with `clang_macro_fallback` so the
//!   function-like `_IOR`/`_IOWR` opcodes and `UBLK_IO_RES_ABORT` become
//!   constants evaluated by clang from the header's own macros.
//! * `compat.rs`: the names every header generation must have (the
//!   ioctl-encoded opcodes of the commands that 6.1 already numbers) where this
//!   header lacks them, re-encoded by the header's `_IOR`/`_IOWR`.
//! * `caps.rs`: what this header defines, as data (`HEADER_FLAGS`, ...) and as
//!   `Option` constants for every name a newer header may add.
//! * `layout_probe.c` (compiled with `cc`) and `layout_checks.rs`: the size,
//!   alignment and field offsets of every struct, and the value of every
//!   constant, as the C compiler computes them from the same header, for the
//!   crate's tests to compare with Rust's.

use std::collections::BTreeMap;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

/// Names (never values) that some header generation from 6.1 to 7.3 defines.
/// Each becomes an `Option` in `ublk_sys::opt`: `Some(value from this header)`
/// or `None` when this header predates it.
const KNOWN_FLAGS: &[&str] = &[
    "SUPPORT_ZERO_COPY",
    "URING_CMD_COMP_IN_TASK",
    "NEED_GET_DATA",
    "USER_RECOVERY",
    "USER_RECOVERY_REISSUE",
    "UNPRIVILEGED_DEV",
    "CMD_IOCTL_ENCODE",
    "USER_COPY",
    "ZONED",
    "USER_RECOVERY_FAIL_IO",
    "UPDATE_SIZE",
    "AUTO_BUF_REG",
    "QUIESCE",
    "PER_IO_DAEMON",
    "BUF_REG_OFF_DAEMON",
    "BATCH_IO",
    "INTEGRITY",
    "SAFE_STOP_DEV",
    "NO_AUTO_PART_SCAN",
    "SHMEM_ZC",
    "IO_DESC_SIZE",
];

/// Encoded opcodes newer than 6.1: `caps.rs` says which the header has
/// (the base ones below always are).
const NEWER_U_CMDS: &[&str] = &["GET_FEATURES", "DEL_DEV_ASYNC", "UPDATE_SIZE", "QUIESCE_DEV", "TRY_STOP_DEV", "REG_BUF", "UNREG_BUF"];
const NEWER_U_IOS: &[&str] = &["REGISTER_IO_BUF", "UNREGISTER_IO_BUF", "PREP_IO_CMDS", "COMMIT_IO_CMDS", "FETCH_IO_CMDS"];

const KNOWN_OTHER: &[(&str, &str)] = &[
    ("UBLK_CMD_GET_DEV_INFO2", "u32"),
    ("UBLK_FEATURES_LEN", "u32"),
    ("UBLK_MAX_NR_QUEUES", "u32"),
    ("UBLK_IO_BUF_OFF", "u32"),
    ("UBLK_IO_BUF_BITS", "u32"),
    ("UBLK_IO_BUF_BITS_MASK", "u32"),
    ("UBLK_TAG_OFF", "u32"),
    ("UBLK_TAG_BITS", "u32"),
    ("UBLK_TAG_BITS_MASK", "u32"),
    ("UBLK_QID_OFF", "u32"),
    ("UBLK_QID_BITS", "u32"),
    ("UBLK_QID_BITS_MASK", "u32"),
    ("UBLKSRV_IO_BUF_TOTAL_BITS", "u32"),
    ("UBLKSRV_IO_BUF_TOTAL_SIZE", "u64"),
    ("UBLK_S_DEV_FAIL_IO", "u32"),
    ("UBLK_PARAM_TYPE_DEVT", "u32"),
    ("UBLK_PARAM_TYPE_ZONED", "u32"),
    ("UBLK_PARAM_TYPE_DMA_ALIGN", "u32"),
    ("UBLK_PARAM_TYPE_SEGMENT", "u32"),
    ("UBLK_PARAM_TYPE_INTEGRITY", "u32"),
    ("UBLK_IO_F_NEED_REG_BUF", "u32"),
    ("UBLK_MIN_SEGMENT_SIZE", "u32"),
];

/// Encoded opcodes that every generation can have, because even 6.1 numbers
/// them (legacy name, as re-encoded in wrapper.h).
const BASE_CMDS: &[&str] = &[
    "GET_QUEUE_AFFINITY",
    "GET_DEV_INFO",
    "ADD_DEV",
    "DEL_DEV",
    "START_DEV",
    "STOP_DEV",
    "SET_PARAMS",
    "GET_PARAMS",
    "START_USER_RECOVERY",
    "END_USER_RECOVERY",
    "GET_DEV_INFO2",
];
const BASE_IOS: &[&str] = &["FETCH_REQ", "COMMIT_AND_FETCH_REQ", "NEED_GET_DATA"];

/// What to install, per distribution, for each thing the build needs.
const PKG_HEADERS: &str = "Debian/Ubuntu: apt-get install linux-libc-dev; Fedora: dnf install kernel-headers";
const PKG_LIBCLANG: &str = "Debian/Ubuntu: apt-get install clang libclang-dev; Fedora: dnf install clang clang-devel";
const PKG_CC: &str = "Debian/Ubuntu: apt-get install gcc; Fedora: dnf install gcc";

fn fail(msg: &str) -> ! {
    // One line, naming the cause and the fix; cargo shows it as the error.
    let msg = msg.split_whitespace().collect::<Vec<_>>().join(" ");
    println!("cargo::error={msg}");
    eprintln!("error: {msg}");
    std::process::exit(1);
}

#[derive(Debug)]
struct Callbacks;

impl bindgen::callbacks::ParseCallbacks for Callbacks {
    fn int_macro(&self, name: &str, _value: i64) -> Option<bindgen::callbacks::IntKind> {
        use bindgen::callbacks::IntKind;
        // Device flags live in a __u64 (`ublksrv_ctrl_dev_info.flags`), however
        // small the value that bindgen would otherwise size them by.
        if name.starts_with("UBLK_F_") || name == "UBLKSRV_IO_BUF_TOTAL_SIZE" {
            Some(IntKind::U64)
        } else if name.starts_with("UBLK_U_")
            || name.starts_with("UBLK_SYS_ENC_")
            || name.starts_with("UBLK_CMD_")
            || name == "UBLK_SYS_LINUX_VERSION_CODE"
        {
            Some(IntKind::U32)
        } else if name == "UBLK_IO_RES_ABORT" {
            Some(IntKind::I32)
        } else {
            None
        }
    }
}

fn header_dir() -> (Option<PathBuf>, PathBuf) {
    println!("cargo::rerun-if-env-changed=UBLK_SYS_KERNEL_HEADERS");
    if let Some(dir) = env::var_os("UBLK_SYS_KERNEL_HEADERS") {
        let dir = PathBuf::from(dir);
        let h = dir.join("linux/ublk_cmd.h");
        if !h.is_file() {
            fail(&format!(
                "ublk-sys: UBLK_SYS_KERNEL_HEADERS={} has no linux/ublk_cmd.h; point it at a kernel UAPI include dir from Linux 6.0 or later (e.g. the usr/include of an unpacked linux-libc-dev or kernel-headers package), or unset it to use the system's ({PKG_HEADERS})",
                dir.display()
            ));
        }
        return (Some(dir), h);
    }
    for dir in ["/usr/include", "/usr/local/include"] {
        let h = Path::new(dir).join("linux/ublk_cmd.h");
        if h.is_file() {
            return (None, h);
        }
    }
    fail(&format!(
        "ublk-sys: linux/ublk_cmd.h not found in /usr/include or /usr/local/include; install the kernel UAPI headers, Linux 6.0 or later ({PKG_HEADERS}), or set UBLK_SYS_KERNEL_HEADERS to a directory holding linux/ublk_cmd.h (where the system's are older, e.g. Ubuntu 22.04's 5.15)"
    ));
}

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let wrapper = manifest.join("wrapper.h");
    println!("cargo::rerun-if-changed=wrapper.h");
    println!("cargo::rerun-if-changed=src/probe_helpers.c");

    let (custom_dir, header) = header_dir();
    println!("cargo::rerun-if-changed={}", header.display());

    let mut inc_args = Vec::new();
    if let Some(dir) = &custom_dir {
        inc_args.push(format!("-I{}", dir.display()));
        // Debian's linux-libc-dev keeps <asm/...> under the multiarch triplet.
        let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
        let triplet = match arch.as_str() {
            "x86_64" => "x86_64-linux-gnu",
            "aarch64" => "aarch64-linux-gnu",
            _ => "",
        };
        let multiarch = dir.join(triplet);
        if !triplet.is_empty() && multiarch.join("asm").is_dir() {
            inc_args.push(format!("-I{}", multiarch.display()));
        }
    }

    // libclang is loaded at run time by bindgen; say what to install when it is missing.
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let clang_ok = std::panic::catch_unwind(bindgen::clang_version).is_ok();
    std::panic::set_hook(prev);
    if !clang_ok {
        let at = env::var("LIBCLANG_PATH").map(|p| format!(" (LIBCLANG_PATH={p} has none)")).unwrap_or_default();
        fail(&format!(
            "ublk-sys: libclang not found{at}; bindgen needs it: install it ({PKG_LIBCLANG}), or set LIBCLANG_PATH to the directory holding libclang.so"
        ));
    }

    let bindings = bindgen::Builder::default()
        .header(wrapper.to_str().unwrap())
        .clang_args(&inc_args)
        .clang_macro_fallback()
        .allowlist_var("UBLK.*|UBLKSRV.*")
        .allowlist_type("ublk.*|ublksrv.*")
        .use_core()
        .derive_default(true)
        .derive_debug(true)
        .derive_copy(true)
        .layout_tests(false) // ours compare with the C compiler, not with libclang
        .parse_callbacks(Box::new(Callbacks))
        .generate()
        .unwrap_or_else(|e| {
            fail(&format!(
                "ublk-sys: bindgen could not parse {}: {e}; the header and the <linux/...>, <asm/...> headers it includes must come from one kernel UAPI tree ({PKG_HEADERS}), or set UBLK_SYS_KERNEL_HEADERS to a complete usr/include",
                header.display()
            ))
        });
    let text = bindings.to_string();
    fs::write(out.join("bindings.rs"), &text).unwrap();

    let file = syn::parse_file(&text).expect("bindgen output parses");
    let mut consts: BTreeMap<String, String> = BTreeMap::new();
    let mut aggregates: BTreeMap<String, Vec<(String, syn::Type)>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for item in &file.items {
        match item {
            syn::Item::Const(c) => {
                let ty = &c.ty;
                consts.insert(c.ident.to_string(), quote_type(ty));
            }
            syn::Item::Struct(s) => {
                if let syn::Fields::Named(f) = &s.fields {
                    let name = s.ident.to_string();
                    if name.starts_with("__") {
                        continue;
                    }
                    order.push(name.clone());
                    aggregates.insert(name, f.named.iter().map(|f| (f.ident.as_ref().unwrap().to_string(), f.ty.clone())).collect());
                }
            }
            syn::Item::Union(u) => {
                let name = u.ident.to_string();
                order.push(name.clone());
                aggregates.insert(name, u.fields.named.iter().map(|f| (f.ident.as_ref().unwrap().to_string(), f.ty.clone())).collect());
            }
            _ => {}
        }
    }
    if !consts.contains_key("UBLK_SYS_ENC_IO_FETCH_REQ") {
        fail(&format!(
            "ublk-sys: bindgen did not evaluate the _IOWR opcodes (clang_macro_fallback); it needs libclang 9 or later: install a newer one ({PKG_LIBCLANG}), or set LIBCLANG_PATH to its directory"
        ));
    }

    // cfgs describing this header's shape, for lib.rs's accessors.
    let cfgs = [
        ("ublk_sys_io_desc_union", has_anon(&aggregates, "ublksrv_io_desc")),
        ("ublk_sys_io_cmd_union", has_anon(&aggregates, "ublksrv_io_cmd")),
        ("ublk_sys_ctrl_cmd_dev_path_len", has_field(&aggregates, "ublksrv_ctrl_cmd", "dev_path_len")),
        ("ublk_sys_dev_info_owner", has_field(&aggregates, "ublksrv_ctrl_dev_info", "owner_uid")),
        ("ublk_sys_params_devt", has_field(&aggregates, "ublk_params", "devt")),
        ("ublk_sys_params_zoned", has_field(&aggregates, "ublk_params", "zoned")),
        ("ublk_sys_params_dma", has_field(&aggregates, "ublk_params", "dma")),
        ("ublk_sys_params_seg", has_field(&aggregates, "ublk_params", "seg")),
        ("ublk_sys_dev_info_io_desc_size", has_field(&aggregates, "ublksrv_ctrl_dev_info", "io_desc_size")),
        ("ublk_sys_auto_buf_reg", aggregates.contains_key("ublk_auto_buf_reg")),
        ("ublk_sys_shmem_zc", consts.contains_key("UBLK_SHMEM_ZC_OFF_MASK")),
    ];
    for (name, on) in cfgs {
        println!("cargo::rustc-check-cfg=cfg({name})");
        if on {
            println!("cargo::rustc-cfg={name}");
        }
    }

    write_compat(&out, &consts);
    write_caps(&out, &consts);
    write_probe(&out, &consts, &aggregates, &order, &inc_args, &header);
}

fn quote_type(ty: &syn::Type) -> String {
    match ty {
        syn::Type::Path(p) => p.path.segments.iter().map(|s| s.ident.to_string()).collect::<Vec<_>>().join("::"),
        _ => "?".into(),
    }
}

fn has_anon(aggs: &BTreeMap<String, Vec<(String, syn::Type)>>, s: &str) -> bool {
    aggs.get(s).is_some_and(|f| f.iter().any(|(n, _)| n.starts_with("__bindgen_anon")))
}

fn has_field(aggs: &BTreeMap<String, Vec<(String, syn::Type)>>, s: &str, field: &str) -> bool {
    fn walk(aggs: &BTreeMap<String, Vec<(String, syn::Type)>>, s: &str, field: &str) -> bool {
        aggs.get(s)
            .is_some_and(|fs| fs.iter().any(|(n, ty)| n == field || (n.starts_with("__bindgen_anon") && walk(aggs, &type_name(ty), field))))
    }
    walk(aggs, s, field)
}

fn type_name(ty: &syn::Type) -> String {
    match ty {
        syn::Type::Path(p) => p.path.segments.last().unwrap().ident.to_string(),
        _ => String::new(),
    }
}

fn type_tokens(ty: &syn::Type) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    match ty {
        syn::Type::Path(p) => {
            let segs: Vec<String> = p
                .path
                .segments
                .iter()
                .map(|seg| {
                    let mut t = seg.ident.to_string();
                    if let syn::PathArguments::AngleBracketed(a) = &seg.arguments {
                        let args: Vec<String> = a
                            .args
                            .iter()
                            .map(|g| match g {
                                syn::GenericArgument::Type(t) => type_tokens(t),
                                _ => "_".into(),
                            })
                            .collect();
                        t = format!("{t}<{}>", args.join(", "));
                    }
                    t
                })
                .collect();
            s.push_str(&segs.join("::"));
        }
        syn::Type::Array(a) => {
            let len = match &a.len {
                syn::Expr::Lit(l) => match &l.lit {
                    syn::Lit::Int(i) => i.base10_digits().to_string(),
                    _ => "0".into(),
                },
                _ => "0".into(),
            };
            write!(s, "[{}; {}]", type_tokens(&a.elem), len).unwrap();
        }
        _ => s.push('?'),
    }
    s
}

/// The ioctl-encoded opcodes of the commands 6.1 already numbers, where this
/// header does not define them itself.
fn write_compat(out: &Path, consts: &BTreeMap<String, String>) {
    let mut s = String::from("// @generated by ublk-sys/build.rs\n");
    for (kind, names) in [("CMD", BASE_CMDS), ("IO", BASE_IOS)] {
        for n in names {
            let u = format!("UBLK_U_{kind}_{n}");
            let enc = format!("UBLK_SYS_ENC_{kind}_{n}");
            if !consts.contains_key(&u) && consts.contains_key(&enc) {
                writeln!(
                    s,
                    "/// Not in this header: `{enc}`, i.e. the header's `_IO*('u', UBLK_{kind}_{n}, ...)`.\npub const {u}: u32 = {enc};"
                )
                .unwrap();
            }
        }
    }
    fs::write(out.join("compat.rs"), s).unwrap();
}

fn write_caps(out: &Path, consts: &BTreeMap<String, String>) {
    let mut s = String::from("// @generated by ublk-sys/build.rs\n");
    let v = |prefix: &str| -> Vec<&String> { consts.keys().filter(|k| k.starts_with(prefix)).collect() };
    writeln!(s, "/// Every `UBLK_F_*` device flag this header defines, by name.").unwrap();
    s.push_str("pub const HEADER_FLAGS: &[(&str, u64)] = &[\n");
    for k in v("UBLK_F_") {
        writeln!(s, "    (\"{k}\", crate::{k}),").unwrap();
    }
    s.push_str("];\n");
    writeln!(s, "/// Every command this header defines: legacy `UBLK_CMD_*`/`UBLK_IO_*` numbers and ioctl-encoded `UBLK_U_*` opcodes.")
        .unwrap();
    s.push_str("pub const HEADER_COMMANDS: &[(&str, u32)] = &[\n");
    for k in consts.keys() {
        let io_legacy =
            k.starts_with("UBLK_IO_") && !["UBLK_IO_OP_", "UBLK_IO_F_", "UBLK_IO_RES_", "UBLK_IO_BUF_"].iter().any(|p| k.starts_with(p));
        if k.starts_with("UBLK_CMD_") || k.starts_with("UBLK_U_") || io_legacy {
            writeln!(s, "    (\"{k}\", crate::{k} as u32),").unwrap();
        }
    }
    s.push_str("];\n");
    s.push_str("/// Every `UBLK_PARAM_TYPE_*` this header defines.\npub const HEADER_PARAM_TYPES: &[(&str, u32)] = &[\n");
    for k in v("UBLK_PARAM_TYPE_") {
        writeln!(s, "    (\"{k}\", crate::{k} as u32),").unwrap();
    }
    s.push_str("];\n");

    s.push_str(
        "/// Names that some header generation defines: `Some(value)` from this header, `None` where it predates them.\npub mod opt {\n",
    );
    for f in KNOWN_FLAGS {
        let k = format!("UBLK_F_{f}");
        let val = if consts.contains_key(&k) { format!("Some(crate::{k})") } else { "None".into() };
        writeln!(s, "    pub const {k}: Option<u64> = {val};").unwrap();
    }
    for (kind, base, newer) in [("CMD", BASE_CMDS, NEWER_U_CMDS), ("IO", BASE_IOS, NEWER_U_IOS)] {
        for c in base.iter().chain(newer) {
            let k = format!("UBLK_U_{kind}_{c}");
            let enc = format!("UBLK_SYS_ENC_{kind}_{c}");
            let val = if consts.contains_key(&k) || consts.contains_key(&enc) { format!("Some(crate::{k})") } else { "None".into() };
            writeln!(s, "    pub const {k}: Option<u32> = {val};").unwrap();
        }
    }
    for (k, ty) in KNOWN_OTHER {
        let val = if consts.contains_key(*k) { format!("Some(crate::{k} as {ty})") } else { "None".into() };
        writeln!(s, "    pub const {k}: Option<{ty}> = {val};").unwrap();
    }
    s.push_str("}\n");
    fs::write(out.join("caps.rs"), s).unwrap();
}

/// The C side of the layout and value checks, and the matching Rust table.
fn write_probe(
    out: &Path,
    consts: &BTreeMap<String, String>,
    aggs: &BTreeMap<String, Vec<(String, syn::Type)>>,
    order: &[String],
    inc_args: &[String],
    header: &Path,
) {
    // Entries: (kind, c_name, rust_offset_or_size_expr, rust_size_or_align_expr)
    let mut c = String::from("/* @generated by ublk-sys/build.rs */\n#include <stddef.h>\n#include \"wrapper.h\"\n\n");
    c.push_str("struct ublk_sys_probe_layout { const char *name; unsigned long a, b; };\n");
    c.push_str("struct ublk_sys_probe_value { const char *name; long long value; };\n\n");
    let mut rs = String::from("// @generated by ublk-sys/build.rs\n#[allow(unused_imports)]\nuse crate::*;\n");
    rs.push_str("/// (name, size or offset, align or size) as Rust computes them, in the C probe's order.\npub const RUST_LAYOUT: &[(&str, usize, usize)] = &[\n");
    c.push_str("const struct ublk_sys_probe_layout ublk_sys_probe_layout[] = {\n");
    let mut n = 0usize;
    for s in order {
        // Anonymous unions and structs have no C name: their members are
        // checked as members of the enclosing struct.
        if s.contains("__bindgen_ty_") {
            continue;
        }
        writeln!(c, "    {{ \"{s}\", sizeof(struct {s}), _Alignof(struct {s}) }},").unwrap();
        writeln!(rs, "    (\"{s}\", core::mem::size_of::<{s}>(), core::mem::align_of::<{s}>()),").unwrap();
        n += 1;
        let mut stack: Vec<(String, String)> = Vec::new(); // (aggregate, rust path prefix)
        stack.push((s.clone(), String::new()));
        while let Some((agg, prefix)) = stack.pop() {
            for (fname, fty) in aggs.get(&agg).into_iter().flatten() {
                if fname.starts_with("_bitfield") || fname.starts_with("__bindgen_padding") {
                    continue;
                }
                if fname.starts_with("__bindgen_anon") {
                    stack.push((type_name(fty), format!("{prefix}{fname}.")));
                    continue;
                }
                let tt = type_tokens(fty);
                let flexible = tt.starts_with("__IncompleteArrayField");
                let csize = if flexible { "0".to_string() } else { format!("sizeof(((struct {s} *)0)->{fname})") };
                let rsize = if flexible { "0".to_string() } else { format!("core::mem::size_of::<{tt}>()") };
                writeln!(c, "    {{ \"{s}.{fname}\", offsetof(struct {s}, {fname}), {csize} }},").unwrap();
                writeln!(rs, "    (\"{s}.{fname}\", core::mem::offset_of!({s}, {prefix}{fname}), {rsize}),").unwrap();
                n += 1;
            }
        }
    }
    c.push_str("    { 0, 0, 0 }\n};\n\n");
    rs.push_str("];\n");

    c.push_str("const struct ublk_sys_probe_value ublk_sys_probe_values[] = {\n");
    rs.push_str("/// Every constant bindgen produced, in the C probe's order.\npub const RUST_VALUES: &[(&str, i128)] = &[\n");
    for k in consts.keys() {
        writeln!(c, "    {{ \"{k}\", (long long)({k}) }},").unwrap();
        writeln!(rs, "    (\"{k}\", {k} as i128),").unwrap();
    }
    c.push_str("    { 0, 0 }\n};\n");
    rs.push_str("];\n");
    writeln!(rs, "pub const N_LAYOUT: usize = {n};").unwrap();
    fs::write(out.join("layout_probe.c"), c).unwrap();
    fs::write(out.join("layout_checks.rs"), rs).unwrap();

    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let mut b = cc::Build::new();
    b.file(out.join("layout_probe.c")).file(manifest.join("src/probe_helpers.c")).include(&manifest).warnings(false);
    for a in inc_args {
        b.flag(a);
    }
    // A missing compiler gets one line; a failed compile also has the
    // compiler's own output above it.
    let compiler =
        b.try_get_compiler().unwrap_or_else(|e| fail(&format!("ublk-sys: no C compiler: {e}; install one ({PKG_CC}), or set CC")));
    if let Err(e) = std::process::Command::new(compiler.path()).arg("--version").output() {
        fail(&format!(
            "ublk-sys: the C compiler {} cannot be run ({e}); install one ({PKG_CC}), or set CC to a working compiler",
            compiler.path().display()
        ));
    }
    if let Err(e) = b.try_compile("ublk_sys_probe") {
        fail(&format!(
            "ublk-sys: the C compiler {} could not build the layout probe against {}: {e}",
            compiler.path().display(),
            header.display()
        ));
    }
    println!("cargo::rustc-env=UBLK_SYS_HEADER={}", header.display());
}

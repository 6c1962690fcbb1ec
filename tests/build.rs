//! Tests that need the kernel's ublk driver run natively when the build host
//! has `/dev/ublk-control`; elsewhere they are marked ignored (with the
//! reason) and run in the VM, where `cargo xtask test-vm` passes
//! `--include-ignored`.
//!
//! Also builds the minimal C server `examples/c/ublk_null_min.c` into
//! `$OUT_DIR/ublk-c-example` (exported as `UBLK_C_EXAMPLE` for
//! `tests/c_example.rs`), with the C compiler the `cc` crate picks and the
//! header tree `UBLK_SYS_KERNEL_HEADERS` names, the same one ublk-sys uses.
use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(ublk_native_driver)");
    println!("cargo::rerun-if-changed=/dev/ublk-control");
    if std::path::Path::new("/dev/ublk-control").exists() {
        println!("cargo::rustc-cfg=ublk_native_driver");
    }
    build_c_example();
}

fn build_c_example() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let src = manifest.join("../examples/c/ublk_null_min.c");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap()).join("ublk-c-example");
    println!("cargo::rerun-if-changed={}", src.display());
    println!("cargo::rerun-if-env-changed=UBLK_SYS_KERNEL_HEADERS");
    let mut cmd = cc::Build::new().cargo_metadata(false).get_compiler().to_command();
    if let Some(dir) = std::env::var_os("UBLK_SYS_KERNEL_HEADERS") {
        cmd.arg("-I").arg(dir);
    }
    cmd.args(["-O2", "-Wall", "-Wextra", "-pthread"]).arg(&src).arg("-o").arg(&out);
    let st = cmd.status().unwrap_or_else(|e| panic!("running the C compiler for {}: {e}", src.display()));
    assert!(st.success(), "compiling {} failed ({st}): {cmd:?}", src.display());
    println!("cargo::rustc-env=UBLK_C_EXAMPLE={}", out.display());
}

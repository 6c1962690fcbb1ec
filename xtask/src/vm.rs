//! The QEMU runner: initramfs construction (busybox, host tools + libs,
//! workspace binaries/tests, kernel modules) and a time-limited boot whose
//! payload exit status comes back over a second serial port.

use crate::kernels::Kernel;
use crate::util::{self, output, workspace_root};
use crate::{log, warn};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const INIT: &str = include_str!("../scripts/init.sh");
pub const DEMO: &str = include_str!("../scripts/demo.sh");
pub const BENCH: &str = include_str!("../scripts/bench.sh");

/// Host tools copied into the guest when present (with their libraries).
const HOST_TOOLS: &[&str] = &[
    "fio",
    "blockdev",
    "mkfs.ext4",
    "mke2fs",
    "e2fsck",
    "fsck",
    "fsck.ext4",
    "tune2fs",
    "dumpe2fs",
    "losetup",
    "blkdiscard",
    "blkid",
    "fallocate",
    "lsblk",
    "findmnt",
    "mount",
    "umount",
    "sha256sum",
    "md5sum",
    "cmp",
    "truncate",
    "dd",
    "stat",
    "timeout",
    "nproc",
    "seq",
    // NBD servers for the NBD target's tests (qemu-utils, nbd-server).
    "qemu-nbd",
    "nbd-server",
    // The kernel's NBD client's setup tool, for the bench (nbd-client).
    "nbd-client",
];

/// Modules loaded in the guest (with their dependencies), in this order.
const MODULES: &[&str] = &["configfs", "ublk_drv", "null_blk", "loop", "ext4"];

/// Modules put in the guest (with their dependencies) where the kernel has
/// them, but not loaded at boot: the bench loads them itself (nbd.ko, the
/// kernel's NBD client, which our 6.1 build lacks; brd.ko, the kernel's
/// ramdisk, to compare the ramdisk target with).
const EXTRA_MODULES: &[&str] = &["nbd", "brd"];

#[derive(Default, Clone)]
pub struct Payload {
    /// Shell script run by /init (as /opt/ublk/payload.sh).
    pub script: String,
    /// Executables for /opt/ublk/bin.
    pub bins: Vec<PathBuf>,
    /// Test executables for /opt/ublk/deps.
    pub tests: Vec<PathBuf>,
    /// Strip debug info when packing (Rust binaries).
    pub strip: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Exit(i32),
    Timeout,
    NoStatus,
}

pub struct RunResult {
    pub outcome: Outcome,
    pub duration: Duration,
    pub guest_release: Option<String>,
    /// "UBLK_VM_TEST name rc" lines written by the payload.
    pub tests: Vec<(String, i32)>,
    /// The guest console, line by line.
    pub console: Vec<String>,
}

impl RunResult {
    pub fn ok(&self) -> bool {
        self.outcome == Outcome::Exit(0)
    }
    pub fn label(&self) -> String {
        match self.outcome {
            Outcome::Exit(0) => "ok".into(),
            Outcome::Exit(c) => format!("FAILED (exit {c})"),
            Outcome::Timeout => "TIMEOUT".into(),
            Outcome::NoStatus => "FAILED (no exit status)".into(),
        }
    }
}

/// Per-invocation work dir (initramfs staging, initrd, status file), so that
/// concurrent xtask runs in one workspace do not clobber each other.
fn vm_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let base = workspace_root().join("target").join("vm").join("initramfs");
        // Remove leftovers of runs whose process is gone.
        if let Ok(rd) = std::fs::read_dir(&base) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = n.strip_prefix("run-").and_then(|p| p.parse::<u32>().ok()) {
                    if !Path::new(&format!("/proc/{pid}")).exists() {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        base.join(format!("run-{}", std::process::id()))
    })
    .clone()
}

/// Remove this invocation's work dir.
pub fn cleanup() {
    let d = vm_dir();
    if d.exists() {
        let _ = std::fs::remove_dir_all(d);
    }
}

fn is_elf(p: &Path) -> bool {
    let mut b = [0u8; 4];
    std::fs::File::open(p).and_then(|mut f| f.read_exact(&mut b)).is_ok() && &b == b"\x7fELF"
}

fn copy_exec(src: &Path, dst: &Path, strip: bool) -> Result<()> {
    if let Some(p) = dst.parent() {
        std::fs::create_dir_all(p)?;
    }
    let _ = std::fs::remove_file(dst);
    let mut done = false;
    if strip && is_elf(src) {
        done = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(dst)
            .arg(src)
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    }
    if !done {
        std::fs::copy(src, dst).with_context(|| format!("copy {} -> {}", src.display(), dst.display()))?;
    }
    let mut perm = std::fs::metadata(dst)?.permissions();
    perm.set_mode(perm.mode() | 0o755);
    std::fs::set_permissions(dst, perm)?;
    Ok(())
}

/// Shared libraries (and the loader) an ELF needs, as ldd reports them.
fn ldd(p: &Path) -> Vec<PathBuf> {
    let Ok(out) = Command::new("ldd").arg(p).stderr(Stdio::null()).output() else {
        return vec![];
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v = vec![];
    for l in text.lines() {
        let l = l.trim();
        let path = if let Some((_, rhs)) = l.split_once("=>") {
            rhs.split_whitespace().next().unwrap_or("")
        } else {
            l.split_whitespace().next().unwrap_or("")
        };
        if path.starts_with('/') {
            v.push(PathBuf::from(path));
        }
    }
    v
}

fn in_root(root: &Path, abs: &Path) -> PathBuf {
    root.join(abs.strip_prefix("/").unwrap_or(abs))
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn pack(root: &Path, out: &Path) -> Result<()> {
    let script = format!(
        "cd {} && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 | gzip -1 > {}",
        util::sh_quote(root),
        util::sh_quote(out)
    );
    output(Command::new("sh").arg("-c").arg(script).env("LC_ALL", "C"))?;
    Ok(())
}

/// The kernel-independent part of the initramfs (one per xtask run).
pub fn build_common(payload: &Payload) -> Result<PathBuf> {
    let dir = vm_dir();
    let root = dir.join("common");
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    log!("building initramfs in {}", dir.display());
    std::fs::create_dir_all(&root)?;
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "opt/ublk/bin",
        "opt/ublk/deps",
        "lib/modules",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("busybox not found (apt-get install busybox-static)")?;
    if !ldd(&busybox).is_empty() {
        warn!("{} is dynamically linked; install busybox-static", busybox.display());
    }
    copy_exec(&busybox, &root.join("bin/busybox"), false)?;
    std::os::unix::fs::symlink("busybox", root.join("bin/sh"))?;
    write_file(&root.join("init"), INIT, 0o755)?;
    // Two ordinary users for the unprivileged-device tests (tests/tests/unpriv.rs).
    write_file(
        &root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nublka:x:1000:1000:ublk user A:/tmp:/bin/sh\nublkb:x:1001:1001:ublk user B:/tmp:/bin/sh\n",
        0o644,
    )?;
    write_file(&root.join("etc/group"), "root:x:0:\ndisk:x:6:\nublka:x:1000:\nublkb:x:1001:\n", 0o644)?;
    if Path::new("/etc/mke2fs.conf").exists() {
        std::fs::copy("/etc/mke2fs.conf", root.join("etc/mke2fs.conf"))?;
    }
    let mut elfs: Vec<PathBuf> = vec![];
    let mut missing = vec![];
    // The usual tools where the host has them, and any more for one run
    // (UBLK_VM_TOOLS=perf to profile in the guest: Debian's perf is 30 MiB
    // with its libraries, too much for every boot), which must exist.
    let extra = std::env::var("UBLK_VM_TOOLS").unwrap_or_default();
    let tools = HOST_TOOLS.iter().map(|t| (*t, false)).chain(extra.split_whitespace().map(|t| (t, true)));
    for (t, required) in tools {
        match util::which(t) {
            Some(p) => {
                // keep host path (canonical dir, tool's own name)
                let dst = in_root(&root, &p);
                copy_exec(&p, &dst, false)?;
                elfs.push(p);
            }
            None if required => bail!("UBLK_VM_TOOLS: {t} not found on the host"),
            None => missing.push(t),
        }
    }
    if !missing.is_empty() {
        log!("host tools not found (busybox may cover them): {}", missing.join(" "));
    }
    let bindir = root.join("opt/ublk/bin");
    for b in &payload.bins {
        let name = b.file_name().context("bin name")?;
        copy_exec(b, &bindir.join(name), payload.strip)?;
        elfs.push(b.clone());
    }
    write_file(&bindir.join("demo.sh"), DEMO, 0o755)?;
    write_file(&bindir.join("bench.sh"), BENCH, 0o755)?;
    let depdir = root.join("opt/ublk/deps");
    for t in &payload.tests {
        let name = t.file_name().context("test name")?;
        copy_exec(t, &depdir.join(name), payload.strip)?;
        elfs.push(t.clone());
    }
    let mut libs = BTreeSet::new();
    for e in elfs.iter().filter(|e| is_elf(e)) {
        libs.extend(ldd(e));
    }
    for l in &libs {
        let dst = in_root(&root, l);
        if let Some(p) = dst.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::copy(l, &dst).with_context(|| format!("copy {}", l.display()))?;
    }
    write_file(&root.join("opt/ublk/payload.sh"), &payload.script, 0o755)?;
    let out = dir.join("common.cpio.gz");
    pack(&root, &out)?;
    log!(
        "initramfs: {} bins, {} test executables, {} host tools, {} libraries -> {} ({} MiB)",
        payload.bins.len(),
        payload.tests.len(),
        HOST_TOOLS.len() + extra.split_whitespace().count() - missing.len(),
        libs.len(),
        out.display(),
        std::fs::metadata(&out)?.len() >> 20
    );
    Ok(out)
}

/// Parse modules.dep: module name -> (relative path, deps' relative paths).
fn modules_dep(moddir: &Path) -> Result<HashMap<String, (String, Vec<String>)>> {
    let text = std::fs::read_to_string(moddir.join("modules.dep")).with_context(|| format!("reading {}/modules.dep", moddir.display()))?;
    let mut m = HashMap::new();
    for l in text.lines() {
        let Some((path, deps)) = l.split_once(':') else {
            continue;
        };
        let name = mod_name(path);
        m.insert(name, (path.to_string(), deps.split_whitespace().map(str::to_string).collect()));
    }
    Ok(m)
}

fn mod_name(path: &str) -> String {
    let f = path.rsplit('/').next().unwrap_or(path);
    let f = f.split(".ko").next().unwrap_or(f);
    f.replace('-', "_")
}

/// Kernel-specific part: modules (decompressed) + env.
fn build_kernel_part(kernel: &Kernel, env: &[(String, String)]) -> Result<PathBuf> {
    let dir = vm_dir();
    let root = dir.join(format!("kernel-{}", kernel.name));
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    std::fs::create_dir_all(root.join("etc"))?;
    let mut order: Vec<String> = vec![];
    if let Some(moddir) = &kernel.modules {
        let deps = modules_dep(moddir)?;
        let builtin = std::fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default();
        let builtin: BTreeSet<String> = builtin.lines().map(mod_name).collect();
        let by_path: BTreeMap<&String, &String> = deps.iter().map(|(n, (p, _))| (p, n)).collect();
        fn visit(name: &str, deps: &HashMap<String, (String, Vec<String>)>, by_path: &BTreeMap<&String, &String>, order: &mut Vec<String>) {
            let Some((path, d)) = deps.get(name) else {
                return;
            };
            if order.contains(path) {
                return;
            }
            for dp in d.iter().rev() {
                if let Some(n) = by_path.get(dp) {
                    visit(n, deps, by_path, order);
                }
            }
            if !order.contains(path) {
                order.push(path.clone());
            }
        }
        for m in MODULES {
            if deps.contains_key(*m) {
                visit(m, &deps, &by_path, &mut order);
            } else if !builtin.contains(*m) {
                warn!("module {m} is neither a module nor built into {}", kernel.version);
            }
        }
        // Loaded at boot: those in `order` so far (and whatever the extra
        // ones need besides is only copied).
        let boot = order.len();
        for m in EXTRA_MODULES {
            if deps.contains_key(*m) {
                visit(m, &deps, &by_path, &mut order);
            }
        }
        let rel = moddir.file_name().unwrap().to_string_lossy().into_owned();
        let mut list = String::new();
        for (i, p) in order.iter().enumerate() {
            let src = moddir.join(p);
            let plain = p.trim_end_matches(".xz").trim_end_matches(".zst").trim_end_matches(".gz").to_string();
            let dst = root.join("lib/modules").join(&rel).join(&plain);
            std::fs::create_dir_all(dst.parent().unwrap())?;
            let tool = if p.ends_with(".xz") {
                Some("xz")
            } else if p.ends_with(".zst") {
                Some("zstd")
            } else if p.ends_with(".gz") {
                Some("gzip")
            } else {
                None
            };
            match tool {
                Some(t) => {
                    let f = std::fs::File::create(&dst)?;
                    let st = Command::new(t).arg("-dc").arg(&src).stdout(f).status()?;
                    if !st.success() {
                        bail!("{t} -dc {} failed", src.display());
                    }
                }
                None => {
                    std::fs::copy(&src, &dst)?;
                }
            }
            if i < boot {
                list.push_str(&format!("{rel}/{plain}\n"));
            }
        }
        write_file(&root.join("etc/ublk-modules"), &list, 0o644)?;
        log!("modules for {}: {}", kernel.name, order.iter().map(|p| mod_name(p)).collect::<Vec<_>>().join(" "));
    }
    let mut envs = String::new();
    for (k, v) in env {
        envs.push_str(&format!("export {}={}\n", k, util::sh_quote(v)));
    }
    write_file(&root.join("etc/ublk-env"), &envs, 0o644)?;
    let out = dir.join(format!("kernel-{}.cpio.gz", kernel.name));
    pack(&root, &out)?;
    Ok(out)
}

/// vCPUs per VM: `UBLK_VM_CPUS` (`bench --cpus` sets it), default 2. TCG
/// runs each vCPU as a host thread: more vCPUs than free host cores only
/// time-share them.
pub fn vm_cpus() -> u32 {
    std::env::var("UBLK_VM_CPUS").ok().and_then(|v| v.parse().ok()).filter(|&n| n >= 1).unwrap_or(2)
}

/// The vCPU model: `UBLK_VM_CPU_MODEL` (`bench --cpu-model` sets it),
/// default `max`.
pub fn vm_cpu_model() -> String {
    std::env::var("UBLK_VM_CPU_MODEL").ok().filter(|m| !m.is_empty()).unwrap_or_else(|| "max".into())
}

/// Instruction counting (`UBLK_VM_ICOUNT`, set by `bench --icount`): the
/// shift of QEMU's `-icount`, or None to let TCG run free.
pub fn vm_icount() -> Option<u32> {
    std::env::var("UBLK_VM_ICOUNT").ok().and_then(|v| v.parse().ok())
}

/// Boot `kernel` with common initramfs + kernel part; stream the console;
/// enforce `timeout`. A kernel that dies while booting, before our /init
/// starts (no "xtask-guest: kernel" line: nothing of ours has run), is booted
/// once more, loudly: under TCG the Debian 7.3 image sometimes oopses in
/// early boot (int3 in sched_clock_cpu, seen once in many boots).
pub fn run(kernel: &Kernel, common: &Path, timeout: Duration, extra_env: &[(String, String)]) -> Result<RunResult> {
    let r = run_once(kernel, common, timeout, extra_env)?;
    if matches!(r.outcome, Outcome::NoStatus) && r.guest_release.is_none() {
        log!("WARNING: kernel {} died before /init started (no test ran); booting it once more", kernel.name);
        return run_once(kernel, common, timeout, extra_env);
    }
    Ok(r)
}

fn run_once(kernel: &Kernel, common: &Path, timeout: Duration, extra_env: &[(String, String)]) -> Result<RunResult> {
    let mut env: Vec<(String, String)> =
        vec![("UBLK_TEST_KERNEL".into(), kernel.name.clone()), ("UBLK_BIN_DIR".into(), "/opt/ublk/bin".into())];
    for k in ["RUST_BACKTRACE", "RUST_LOG", "RUST_TEST_NOCAPTURE"] {
        if let Ok(v) = std::env::var(k) {
            env.push((k.into(), v));
        }
    }
    if !env.iter().any(|(k, _)| k == "RUST_BACKTRACE") {
        env.push(("RUST_BACKTRACE".into(), "1".into()));
    }
    env.extend(extra_env.iter().cloned());
    let kpart = build_kernel_part(kernel, &env)?;
    let dir = vm_dir();
    let initrd = dir.join(format!("initrd-{}.cpio.gz", kernel.name));
    {
        let mut f = std::fs::File::create(&initrd)?;
        f.write_all(&std::fs::read(common)?)?;
        f.write_all(&std::fs::read(&kpart)?)?;
    }
    let status_file = dir.join(format!("status-{}.txt", kernel.name));
    let _ = std::fs::remove_file(&status_file);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", &vm_cpu_model(), "-smp", &vm_cpus().to_string(), "-m", "2G"]);
    cmd.args(["-nodefaults", "-display", "none", "-no-reboot"]);
    if let Some(shift) = vm_icount() {
        // Deterministic time: 2^shift ns per instruction; sleep=off lets an
        // idle guest jump to its next timer instead of waiting in real time.
        cmd.args(["-icount", &format!("shift={shift},sleep=off")]);
    }
    cmd.arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 loglevel=4"])
        .args(["-serial", "stdio"])
        .arg("-serial")
        .arg(format!("file:{}", status_file.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    log!("booting kernel {} ({}) in QEMU/TCG, timeout {} s", kernel.name, kernel.version, timeout.as_secs());
    log!("$ {}", util::describe(&cmd));
    let start = Instant::now();
    let mut child = cmd.spawn().context("spawning qemu-system-x86_64")?;
    let mut pipe = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Option<String>>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut line = Vec::new();
        let mut console = Vec::new();
        let stdout = std::io::stdout();
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut lock = stdout.lock();
                    let _ = lock.write_all(&buf[..n]);
                    let _ = lock.flush();
                    for &b in &buf[..n] {
                        if b == b'\n' {
                            let s = String::from_utf8_lossy(&line).trim_end().to_string();
                            if let Some(r) = s.split("xtask-guest: kernel ").nth(1) {
                                let _ = tx.send(Some(r.split(',').next().unwrap_or("").to_string()));
                            }
                            console.push(s);
                            line.clear();
                        } else {
                            line.push(b);
                        }
                    }
                }
            }
        }
        let _ = tx.send(None);
        console
    });
    let mut timed_out = false;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if start.elapsed() >= timeout {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let console = reader.join().unwrap_or_default();
    let duration = start.elapsed();
    let mut guest_release = None;
    while let Ok(Some(r)) = rx.try_recv() {
        guest_release = Some(r);
    }
    println!();
    let status = std::fs::read_to_string(&status_file).unwrap_or_default();
    let mut code = None;
    let mut tests = vec![];
    for l in status.lines() {
        let l = l.trim();
        if let Some(c) = l.strip_prefix("UBLK_VM_EXIT=") {
            code = c.trim().parse::<i32>().ok();
        } else if let Some(rest) = l.strip_prefix("UBLK_VM_TEST ") {
            let mut it = rest.rsplitn(2, ' ');
            if let (Some(rc), Some(name)) = (it.next(), it.next()) {
                tests.push((name.to_string(), rc.parse().unwrap_or(-1)));
            }
        }
    }
    let outcome = if timed_out { Outcome::Timeout } else { code.map(Outcome::Exit).unwrap_or(Outcome::NoStatus) };
    let rel = guest_release.clone().unwrap_or_else(|| "?".into());
    match &outcome {
        Outcome::Timeout => log!("TIMEOUT after {} s on kernel {} ({rel})", timeout.as_secs(), kernel.name),
        Outcome::NoStatus => {
            log!("kernel {} ({rel}): VM ended without reporting an exit status after {}", kernel.name, util::fmt_dur(duration))
        }
        Outcome::Exit(c) => log!("kernel {} ({rel}): payload exit status {c}, run took {}", kernel.name, util::fmt_dur(duration)),
    }
    Ok(RunResult { outcome, duration, guest_release, tests, console })
}

//! Helpers for the end-to-end tests: finding the binaries, running daemons,
//! checking what the kernel shows, and checking that nothing leaked.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Declares a test that needs `/dev/ublk-control`: ignored, with the reason,
/// when the build host lacks the driver (the VM run includes ignored tests).
#[macro_export]
macro_rules! driver_test {
    ($(#[$m:meta])* fn $name:ident() $body:block) => {
        #[test]
        #[cfg_attr(
            not(ublk_native_driver),
            ignore = "needs /dev/ublk-control, absent on this host: runs in the VM (cargo xtask test-vm)"
        )]
        $(#[$m])*
        fn $name() {
            let _serial = $crate::serial();
            let _timer = $crate::TestTimer::start(stringify!($name));
            $crate::announce(stringify!($name));
            $body
        }
    };
}

mod ext4;
mod fio;
mod nullb;
pub use ext4::*;
pub use fio::*;
pub use nullb::*;

static SERIAL: Mutex<()> = Mutex::new(());

/// Prints `xtask-test-time: NAME SECONDS` when a driver test ends (passed
/// or not), straight to stderr past the test harness's capture: `cargo
/// xtask test-vm` lists each kernel's slowest tests from these lines.
pub struct TestTimer(&'static str, std::time::Instant);

impl TestTimer {
    pub fn start(name: &'static str) -> TestTimer {
        TestTimer(name, std::time::Instant::now())
    }
}

impl Drop for TestTimer {
    fn drop(&mut self) {
        use std::io::Write;
        let line = format!("xtask-test-time: {} {:.1}\n", self.0, self.1.elapsed().as_secs_f64());
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

/// Driver tests run one at a time, even under a parallel test runner.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Prints which kernel a test runs on; fails loudly if the driver is missing.
pub fn announce(name: &str) {
    assert!(
        Path::new("/dev/ublk-control").exists(),
        "{name}: /dev/ublk-control is missing: load the driver (modprobe ublk_drv) or run `cargo xtask test-vm`"
    );
    eprintln!("[{name}] kernel {}", kernel_release());
}

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string()
}

/// The running kernel's (major, minor).
pub fn kernel_version() -> (u32, u32) {
    let r = kernel_release();
    let mut it = r.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Path of one of the workspace's binaries: `$UBLK_BIN_DIR/NAME`, or next to
/// the test executable's directory (cargo's `target/<profile>/`).
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("UBLK_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(p.exists(), "{} not built: run `cargo build --bins` first", p.display());
    p
}

/// Device ids present in /sys/class/ublk-char.
pub fn ublk_devices() -> Vec<u32> {
    ublk::ctrl::device_ids()
}

/// Asserts no ublk device exists (in sysfs or /dev), waiting up to 10 s for
/// asynchronous teardown.
pub fn assert_no_devices() {
    let t0 = Instant::now();
    loop {
        let sys = ublk_devices();
        let dev: Vec<String> = std::fs::read_dir("/dev")
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("ublkb") || n.starts_with("ublkc"))
            .collect();
        if sys.is_empty() && dev.is_empty() {
            return;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            panic!("ublk devices left behind: sysfs {sys:?}, /dev {dev:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Deletes every ublk device (cleanup after a test that killed a daemon).
pub fn delete_all_devices() {
    if let Ok(mut c) = ublk::Control::open() {
        for id in ublk_devices() {
            let _ = c.stop_dev(id);
            let _ = c.del_dev(id);
        }
    }
}

/// A running daemon (e.g. `ublk-null`), killed on drop.
pub struct Daemon {
    pub child: Child,
    pub dev: PathBuf,
    stdout: Option<BufReader<std::process::ChildStdout>>,
}

impl Daemon {
    /// Starts `bin(name) args...` and waits (up to 60 s) for it to print the
    /// block device path on stdout.
    pub fn start(name: &str, args: &[&str]) -> Daemon {
        let mut cmd = Command::new(bin(name));
        cmd.args(args);
        Self::spawn(cmd, &format!("{name} {args:?}"))
    }

    /// [`start`](Self::start) of a prepared command (e.g. one that runs as
    /// another user); `what` names it in failures.
    pub fn spawn(mut cmd: Command, what: &str) -> Daemon {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut line = String::new();
            let r = out.read_line(&mut line);
            let _ = tx.send((r.map(|_| line), ()));
            out
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok((Ok(line), ())) if line.trim().starts_with("/dev/ublkb") => {
                let out = reader.join().unwrap();
                let dev = PathBuf::from(line.trim());
                wait_for_path(&dev);
                Daemon { child, dev, stdout: Some(out) }
            }
            other => {
                let _ = child.kill();
                let st = child.wait();
                panic!("{what} did not report a device: {other:?}, exit {st:?}");
            }
        }
    }

    /// The device id: N of the `/dev/ublkbN` it reported.
    pub fn id(&self) -> u32 {
        self.dev.to_str().unwrap().trim_start_matches("/dev/ublkb").parse().unwrap()
    }

    /// Sends `sig` to the daemon.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGKILL, then reaps the process (a zombie would look alive).
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits (up to 60 s) for the exit; returns the status and
    /// the rest of stdout.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        self.signal(libc::SIGTERM);
        let st = wait_timeout(&mut self.child, Duration::from_secs(60)).expect("daemon did not exit within 60 s of SIGTERM");
        let mut rest = String::new();
        if let Some(mut o) = self.stdout.take() {
            let _ = o.read_to_string(&mut rest);
        }
        (st, rest)
    }
}

/// `ublk recover -n ID`: a new daemon serves device `id`, whose daemon
/// died, again; asserts the device is then LIVE.
pub fn recover(id: u32) -> Daemon {
    let r = Daemon::start("ublk", &["recover", "-n", &id.to_string()]);
    assert_eq!(dev_state(id), "LIVE");
    r
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
            if wait_timeout(&mut self.child, Duration::from_secs(20)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// Waits for a child with a time limit.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if t0.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (up to 10 s) for a device node to appear.
pub fn wait_for_path(p: &Path) {
    let t0 = Instant::now();
    while !p.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a command to completion, returning (status, stdout, stderr).
pub fn run(cmd: &str, args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs a command and asserts it succeeded; returns stdout.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let (st, out, err) = run(cmd, args);
    assert!(st.success(), "{cmd} {args:?} failed: {st}\nstdout: {out}\nstderr: {err}");
    out
}

/// Open fds, threads and mappings of this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    pub fds: usize,
    pub threads: usize,
    pub maps: usize,
}

/// Counts this process's fds, threads and memory mappings. io_uring's own
/// kernel workers (`iou-wrk-*`, which run control commands and linger a few
/// seconds after a ring closes) are the kernel's, not ours, and not counted.
pub fn resources() -> Resources {
    let count = |p: &str| std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0);
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                    !comm.starts_with("iou-")
                })
                .count()
        })
        .unwrap_or(0);
    Resources {
        fds: count("/proc/self/fd"),
        threads,
        maps: std::fs::read_to_string("/proc/self/maps").map(|s| s.lines().count()).unwrap_or(0),
    }
}

/// Number of online CPUs.
pub fn nproc() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Parses the per-queue lines `queue N: requests=R ...` that the daemons
/// print at exit.
pub fn queue_requests(stdout: &str) -> Vec<(u16, u64)> {
    stdout
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("queue ")?;
            let (q, rest) = rest.split_once(':')?;
            let r = rest.split_whitespace().find_map(|kv| kv.strip_prefix("requests="))?;
            Some((q.parse().ok()?, r.parse().ok()?))
        })
        .collect()
}

/// Parses the per-thread lines `queue N: thread=T requests=R ...` that the
/// daemons print at exit: (queue, thread, requests).
pub fn thread_requests(stdout: &str) -> Vec<(u16, u16, u64)> {
    stdout
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("queue ")?;
            let (q, rest) = rest.split_once(':')?;
            let field = |k: &str| rest.split_whitespace().find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')?.parse::<u64>().ok());
            Some((q.parse().ok()?, u16::try_from(field("thread")?).ok()?, field("requests")?))
        })
        .collect()
}

/// A 4 KiB-aligned window of `len` bytes inside `v` (for O_DIRECT); `v`
/// must be at least `len + 4095` bytes.
pub fn aligned(v: &mut [u8], len: usize) -> &mut [u8] {
    let off = v.as_ptr().align_offset(4096);
    &mut v[off..off + len]
}

/// Deterministic pseudo-random bytes (xorshift), for data written and checked back.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Whether the running kernel offers `UBLK_F_*` flag `flag` (GET_FEATURES;
/// false before 6.5, which lacks the command).
pub fn kernel_has(flag: u64) -> bool {
    ublk::Control::open().unwrap().features().is_some_and(|f| f.contains(flag))
}

/// A device for a test that sends ADD_DEV itself: one queue of depth 8,
/// 64 KiB buffers, any free id, this process as its server, and `flags`.
pub fn small_dev_info(flags: u64) -> ublk::DevInfo {
    ublk::DevInfo {
        nr_hw_queues: 1,
        queue_depth: 8,
        max_io_buf_bytes: 64 << 10,
        dev_id: u32::MAX,
        ublksrv_pid: std::process::id() as i32,
        flags,
        ..Default::default()
    }
}

/// Reports a test whose scenario the running kernel lacks as `skipped: WHY`
/// on stderr (the test then returns; see [`skipped_part`] for one variant
/// of several),
/// written past libtest's output capture so the line shows in every run
/// (the test still passes or fails on what it did check).
pub fn skipped(why: &str) {
    report_skip("skipped", why);
}

/// Writes `LABEL: WHY (kernel RELEASE)` to stderr, the line `cargo xtask
/// test-vm` counts skips by.
fn report_skip(label: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{label}: {why} (kernel {})", kernel_release());
}

/// Device `id`'s row of `ublk list --json`.
fn listed_row(id: u32) -> serde_json::Value {
    let out = run_ok(bin("ublk").to_str().unwrap(), &["list", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    rows.as_array().unwrap().iter().find(|r| r["id"].as_u64() == Some(u64::from(id))).expect("device listed").clone()
}

/// The flags `ublk list --json` shows for device `id` (kernel names,
/// `UBLK_F_BATCH_IO`...).
pub fn listed_flags(id: u32) -> Vec<String> {
    listed_row(id)["flags"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect()
}

/// Reports one variant of a test's scenarios that the running kernel lacks
/// as `skipped part: WHY` on stderr (the others still run): `cargo xtask
/// test-vm` counts such a test as partly skipped, neither passed nor
/// skipped.
pub fn skipped_part(why: &str) {
    report_skip("skipped part", why);
}

/// The DATA column of `ublk list --json` for device `id`.
pub fn listed_data_path(id: u32) -> String {
    listed_row(id)["data_path"].as_str().unwrap_or("-").to_string()
}

/// Runs the `ublk` CLI; returns (status, stdout, stderr).
pub fn ublk(args: &[&str]) -> (ExitStatus, String, String) {
    run(bin("ublk").to_str().unwrap(), args)
}

/// Sum of `key=N` over the per-queue lines a daemon prints at exit.
pub fn queue_sum(out: &str, key: &str) -> u64 {
    out.lines()
        .filter(|l| l.starts_with("queue "))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse::<u64>().ok())
        .sum()
}

/// A sparse file of `size` bytes at `p`, replacing whatever was there.
pub fn sparse_file(p: &Path, size: u64) {
    let _ = std::fs::remove_file(p);
    std::fs::File::create(p).unwrap().set_len(size).unwrap();
}

/// "0-2,5" -> [0, 1, 2, 5]
pub fn cpu_list(s: &str) -> Vec<usize> {
    s.split(',')
        .flat_map(|r| match r.split_once('-') {
            Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).collect::<Vec<usize>>(),
            None => vec![r.parse().unwrap()],
        })
        .collect()
}

/// The CPUs thread `name` of process `pid` may run on.
pub fn thread_cpus(pid: u32, name: &str) -> Vec<usize> {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = t.unwrap().path();
        if std::fs::read_to_string(dir.join("comm")).unwrap_or_default().trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        return cpu_list(status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim());
    }
    panic!("process {pid} has no thread named {name}");
}

/// Pins the calling thread to `cpu`.
pub fn pin_self(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set by CPU_SET (cpu is below
    // CPU_SETSIZE on any test machine), passed by reference for this thread.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(r, 0, "pinning to CPU {cpu}: {}", std::io::Error::last_os_error());
}

/// A pipe: (read end, write end).
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned here only.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Writes to the pipe and reads the bytes back: no operation still waiting
/// on `rd` (`who`) took them into a buffer that may no longer exist.
pub fn assert_no_reader_left(wr: &OwnedFd, rd: &OwnedFd, who: &str) {
    let msg = b"after teardown";
    // SAFETY: writes from a live buffer to our pipe.
    assert_eq!(unsafe { libc::write(wr.as_raw_fd(), msg.as_ptr().cast(), msg.len()) }, msg.len() as isize);
    let mut back = [0u8; 14];
    // SAFETY: reads into a live buffer from our pipe.
    let n = unsafe { libc::read(rd.as_raw_fd(), back.as_mut_ptr().cast(), back.len()) };
    assert_eq!(n, msg.len() as isize, "{who} consumed the pipe's bytes");
    assert_eq!(&back, msg);
}

/// UBLK_F_NO_AUTO_PART_SCAN where the kernel has it (7.0+): there the
/// partition scan runs after START_DEV, concurrently with `on_live`, and would
/// race with a target that changes behaviour once the device is live.
pub fn no_part_scan() -> u64 {
    let f = ublk::sys::abi::UBLK_F_NO_AUTO_PART_SCAN;
    if ublk::Control::open().unwrap().features().is_some_and(|x| x.contains(f)) {
        f
    } else {
        0
    }
}

/// Runs `f` on a thread; panics if it takes longer than `limit` (a hang).
pub fn within<T: Send + 'static>(what: &str, limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("{what}: no answer within {limit:?} (the kernel is looping on the result?)"))
}

/// `len` bytes of the file `p` from `off`.
pub fn read_range(p: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut v = vec![0u8; len];
    std::fs::File::open(p).unwrap().read_exact_at(&mut v, off).unwrap();
    v
}

/// The device's state as GET_DEV_INFO reports it (`LIVE`, `QUIESCED`...),
/// or `GONE`.
pub fn dev_state(id: u32) -> String {
    match ublk::Control::open().and_then(|mut c| c.get_dev_info(id)) {
        Ok(i) => ublk::ctrl::state_name(i.state).to_string(),
        Err(_) => "GONE".to_string(),
    }
}

/// Waits (up to `limit`) until the device is in one of `want`; returns that
/// state. Panics with the last state seen.
pub fn wait_dev_state(id: u32, want: &[&str], limit: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let s = dev_state(id);
        if want.contains(&s.as_str()) {
            return s;
        }
        assert!(t0.elapsed() < limit, "device {id} still {s} after {limit:?}, expected one of {want:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

//! Helpers of the NBD target's tests (nbd.rs, nbd_faults.rs): servers
//! (qemu-nbd, nbd-server, nbd-hostile), `ublk add -t nbd`, fio and checks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ublk_tests::*;

/// Loopback up (the VM's init leaves it down), once per test.
pub fn lo_up() {
    let (st, _, err) = run("ip", &["link", "set", "lo", "up"]);
    assert!(st.success(), "ip link set lo up: {err}");
}

pub fn have(tool: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists())).unwrap_or(false)
}

/// Waits (up to 20 s) until something accepts connections at `addr`.
pub fn wait_listening(addr: &Addr) {
    let t0 = Instant::now();
    loop {
        let ok = match addr {
            // Read from /proc, not probed with a connection: nbd-server
            // negotiates in its listening process, which a probe that
            // hangs up at once can upset.
            Addr::Tcp(port) => tcp_listening(*port),
            Addr::Unix(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
        };
        if ok {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "nothing listens at {addr:?} after 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether something listens on TCP `port` (from /proc/net/tcp).
pub fn tcp_listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").unwrap_or_default().lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
    })
}

#[derive(Debug, Clone)]
pub enum Addr {
    Tcp(u16),
    Unix(PathBuf),
}

impl Addr {
    /// The `ublk add` arguments that reach it.
    pub fn args(&self) -> Vec<String> {
        match self {
            Addr::Tcp(p) => vec!["--host".into(), "127.0.0.1".into(), "--port".into(), p.to_string()],
            Addr::Unix(p) => vec!["--unix".into(), p.display().to_string()],
        }
    }
}

/// A server process, killed (SIGKILL) on drop.
pub struct Server {
    pub child: Option<Child>,
    /// nbd-server daemonizes: its pid file.
    pub pid_file: Option<PathBuf>,
}

impl Server {
    /// `qemu-nbd` exporting `file` as `disk` (discard passed to the file,
    /// up to 4 clients, so it advertises CAN_MULTI_CONN).
    pub fn qemu_nbd(file: &Path, addr: &Addr, extra: &[&str]) -> Server {
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-f", "raw", "-x", "disk", "-t", "-e", "4", "--discard=unmap", "--cache=writeback"]).args(extra);
        match addr {
            Addr::Tcp(p) => cmd.args(["-b", "127.0.0.1", "-p", &p.to_string()]),
            Addr::Unix(p) => cmd.arg("-k").arg(p),
        };
        let child = cmd.arg(file).stdin(Stdio::null()).spawn().expect("spawn qemu-nbd");
        wait_listening(addr);
        Server { child: Some(child), pid_file: None }
    }

    /// `nbd-server` exporting `file` as `disk` on a TCP port (it forks a
    /// process per client, and advertises CAN_MULTI_CONN).
    pub fn nbd_server(file: &Path, port: u16) -> Server {
        let conf = PathBuf::from(format!("/tmp/nbd-server-{port}.conf"));
        let pid_file = PathBuf::from(format!("/tmp/nbd-server-{port}.pid"));
        let _ = std::fs::remove_file(&pid_file);
        std::fs::write(
            &conf,
            format!(
                "[generic]\n    listenaddr = 127.0.0.1\n    port = {port}\n[disk]\n    exportname = {}\n    flush = true\n    fua = true\n    trim = true\n",
                file.display()
            ),
        )
        .unwrap();
        let st = Command::new("nbd-server").arg("-C").arg(&conf).arg("-p").arg(&pid_file).status().expect("spawn nbd-server");
        assert!(st.success(), "nbd-server failed to start: {st}");
        wait_listening(&Addr::Tcp(port));
        // Ready once it greets: in the VM, nbd-server's first connection
        // after it starts is held for seconds and then reset (seen on every
        // fresh boot), later ones are answered at once.
        let t0 = Instant::now();
        loop {
            use std::io::Read;
            let mut greeting = [0u8; 8];
            let ok = std::net::TcpStream::connect(("127.0.0.1", port))
                .and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(30)))?;
                    s.read_exact(&mut greeting)
                })
                .is_ok();
            if ok && &greeting == b"NBDMAGIC" {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(90), "nbd-server on port {port} does not greet within 90 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        Server { child: None, pid_file: Some(pid_file) }
    }

    /// `nbd-hostile` in `mode`, on a unix socket.
    pub fn hostile(mode: &str, sock: &Path, extra: &[&str]) -> Server {
        let _ = std::fs::remove_file(sock);
        let child = Command::new(bin("nbd-hostile"))
            .args(["--unix", sock.to_str().unwrap(), "--mode", mode])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn nbd-hostile");
        wait_listening(&Addr::Unix(sock.to_path_buf()));
        Server { child: Some(child), pid_file: None }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(p) = self.pid_file.take() {
            // nbd-server: the listener, and the children serving clients
            // (in its process group).
            if let Ok(pid) = std::fs::read_to_string(&p).unwrap_or_default().trim().parse::<i32>() {
                // SAFETY: kill(2) of the server's process group and of its pid.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            let _ = run("sh", &["-c", "for p in /proc/[0-9]*; do grep -qs '^nbd-server' $p/comm && kill -9 ${p#/proc/}; done; true"]);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `ublk add -t nbd` with `addr` and `extra` arguments, in the foreground.
pub fn nbd_dev(addr: &Addr, extra: &[&str]) -> Daemon {
    let mut args: Vec<String> = vec!["add".into(), "-t".into(), "nbd".into()];
    args.extend(addr.args());
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start("ublk", &args)
}

/// fio randrw with mixed block sizes, crc32c verify of everything written,
/// 2 jobs at depth 64 on their own halves of `span`, one per CPU.
pub fn fio_verify(dev: &str, span: u64) {
    fio_verify_halves("nbd-verify", dev, span, &["--rw=randrw", "--bssplit=4k/40:16k/20:64k/20:128k/20", "--iodepth=64"]);
}

pub fn cmp_ok(a: &str, b: &str, bytes: u64) {
    let (st, out, err) = run("cmp", &["-n", &bytes.to_string(), a, b]);
    assert!(st.success(), "{a} and {b} differ in their first {bytes} bytes: {out}{err}");
}

/// (stopped cleanly, stdout rest) of the daemon, after SIGTERM.
pub fn stop(d: Daemon) {
    let (st, _) = d.terminate();
    assert!(st.success(), "ublk add -t nbd exited with {st} at SIGTERM");
    assert_no_devices();
}

pub fn ext4_round_trip(dev: &str) {
    let mnt = PathBuf::from("/tmp/nbd-ext4-mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run_ok("mkfs.ext4", &["-q", "-F", dev]);
    run_ok("mount", &[dev, mnt.to_str().unwrap()]);
    let files: Vec<(String, Vec<u8>)> = (0..20).map(|i| (format!("f{i}"), pattern(1000 + i * 37_000, i as u64 + 7))).collect();
    for (n, data) in &files {
        std::fs::write(mnt.join(n), data).unwrap();
    }
    run_ok("sync", &[]);
    run_ok("umount", &[mnt.to_str().unwrap()]);
    let (st, out, err) = run("e2fsck", &["-fn", dev]);
    assert!(st.success(), "e2fsck -fn {dev} found problems ({st}):\n{out}\n{err}");
    run_ok("mount", &[dev, mnt.to_str().unwrap()]);
    for (n, data) in &files {
        assert!(std::fs::read(mnt.join(n)).unwrap() == *data, "{n} differs after remount");
    }
    run_ok("umount", &[mnt.to_str().unwrap()]);
}

/// A direct 4 KiB read of `dev` at `off`, within 20 s: Ok or the error text.
pub fn read_at(dev: &str, off: u64) -> Result<(), String> {
    let (st, _, err) = run(
        "timeout",
        &["20", "dd", &format!("if={dev}"), "of=/dev/null", "bs=4k", "count=1", &format!("skip={}", off / 4096), "iflag=direct"],
    );
    if st.success() {
        Ok(())
    } else {
        Err(format!("{st}: {err}"))
    }
}

/// `ublk add -t nbd ...` must fail, its error containing `want`, and leave
/// no device behind.
pub fn add_fails(addr: &Addr, extra: &[&str], want: &str) {
    let mut args: Vec<String> = vec!["add".into(), "-t".into(), "nbd".into()];
    args.extend(addr.args());
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t0 = Instant::now();
    let (st, out, err) = ublk(&args);
    assert!(!st.success(), "ublk {args:?} succeeded: {out}");
    assert!(err.contains(want), "ublk {args:?}: error {err:?} does not mention {want:?}");
    assert!(err.starts_with("ublk: error: ") && err.lines().count() == 1, "not one error line: {err:?}");
    assert!(t0.elapsed() < Duration::from_secs(15), "ublk {args:?} took {:?} to fail", t0.elapsed());
    eprintln!("as expected: {}", err.trim());
    assert_no_devices();
}

/// The daemon's `nbd: k=v ...` line (its stdout after the stop) as a map.
pub fn nbd_stats(stdout: &str) -> std::collections::HashMap<String, String> {
    let line = stdout.lines().find(|l| l.starts_with("nbd: ")).unwrap_or_else(|| panic!("no nbd: line in {stdout:?}"));
    line["nbd: ".len()..].split_whitespace().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// A counter of [`nbd_stats`].
pub fn stat(m: &std::collections::HashMap<String, String>, k: &str) -> u64 {
    m.get(k).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no number {k} in {m:?}"))
}

/// Stops the daemon (SIGTERM; it must exit cleanly and leave no device)
/// and returns its NBD counts.
pub fn stop_stats(d: Daemon) -> std::collections::HashMap<String, String> {
    let (st, out) = d.terminate();
    assert!(st.success(), "ublk add -t nbd exited with {st} at SIGTERM");
    assert_no_devices();
    let m = nbd_stats(&out);
    eprintln!("nbd counts: {m:?}");
    m
}

/// `len` bytes of `dev` at `off`, read with O_DIRECT (dd, 64 KiB blocks).
pub fn read_direct(dev: &str, off: u64, len: u64) -> Vec<u8> {
    let p = PathBuf::from("/tmp/nbd-read-direct.out");
    run_ok(
        "dd",
        &[
            &format!("if={dev}"),
            &format!("of={}", p.display()),
            "bs=64k",
            &format!("skip={}", off / 65536),
            &format!("count={}", len / 65536),
            "iflag=direct",
            "status=none",
        ],
    );
    let v = std::fs::read(&p).unwrap();
    let _ = std::fs::remove_file(&p);
    v
}

/// fio on `dev`: 2 jobs of random writes (4k and 64k) at depth 64 on their
/// own 8 MiB halves, then a crc32c verify of all of it; `extra` adds
/// options (e.g. a write rate limit, so that a kill lands mid-job).
pub fn spawn_write_verify(name: &str, dev: &str, extra: &[&str]) -> Child {
    let half = format!("{}", 8u64 << 20);
    let cpus = format!("0-{}", nproc() - 1);
    Command::new("fio")
        .args([&format!("--name={name}"), "--filename", dev, "--rw=randwrite", "--bssplit=4k/50:64k/50", "--ioengine=io_uring"])
        .args(["--iodepth=64", "--direct=1", "--numjobs=2", "--size", &half, "--offset_increment", &half])
        .args(extra)
        .args(["--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--cpus_allowed", &cpus, "--cpus_allowed_policy=split"])
        .args(["--group_reporting"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (up to 300 s) for a [`spawn_write_verify`] fio: it must succeed
/// with no error reported; `across` names what it went through.
pub fn finish_write_verify(mut fio: Child, across: &str) {
    let Some(st) = wait_timeout(&mut fio, Duration::from_secs(300)) else {
        let _ = fio.kill();
        panic!("fio did not finish within 300 s of {across}");
    };
    let out = fio.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(st.success(), "fio failed across {across} ({st}):\n{text}");
    for l in text.lines().filter(|l| l.contains("err=")) {
        assert!(l.contains("err= 0"), "fio reported an error: {l}\n{text}");
    }
}

/// One protocol attack: serves `nbd-hostile` in `mode` on `sock`, makes a
/// one-queue device on it (with `extra`), and checks what every attack
/// test checks: a read outside the 1 MiB trigger window succeeds; the read
/// in it ends within 10 s, succeeding if `trigger` is `Ok`, else failing
/// with an error that contains the `Err` text; a later read succeeds if
/// `survives`, else fails with EIO (the connection is closed); the daemon
/// is alive. The device is returned for the caller to stop.
pub fn attack(mode: &str, sock: &Path, extra: &[&str], trigger: Result<(), &str>, survives: bool) -> (Server, Daemon) {
    eprintln!("mode {mode}");
    let srv = Server::hostile(mode, sock, &[]);
    let mut args = vec!["--queues", "1", "--depth", "16"];
    args.extend_from_slice(extra);
    let mut d = nbd_dev(&Addr::Unix(sock.to_path_buf()), &args);
    let dev = d.dev.to_str().unwrap().to_string();
    assert_eq!(read_at(&dev, 0), Ok(()), "{mode}: a read outside the trigger window");
    let t0 = Instant::now();
    let r = read_at(&dev, 1 << 20);
    match trigger {
        Ok(()) => assert_eq!(r, Ok(()), "{mode}"),
        Err(want) => {
            let e = r.expect_err(mode);
            assert!(e.contains(want), "{mode}: want {want:?}, got {e}");
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(10), "{mode}: the read took {:?}", t0.elapsed());
    let later = read_at(&dev, 8 << 20);
    if survives {
        assert_eq!(later, Ok(()), "{mode}: the connection should survive");
    } else {
        let e = later.expect_err(mode);
        assert!(e.contains("Input/output error"), "{mode}: a read after the connection closed: {e}");
    }
    assert!(d.child.try_wait().unwrap().is_none(), "{mode}: the daemon died");
    (srv, d)
}

//! The NBD target (`ublk add -t nbd`) against real NBD servers in the VM
//! (`qemu-nbd` and `nbd-server`, over loopback TCP and a unix socket) and
//! against `nbd-hostile`, a server that misbehaves on purpose: fio verify,
//! ext4, discard and write-zeroes reaching the export, a server killed under
//! fio, malformed replies, and bad setups that leave nothing behind.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ublk_tests::*;

/// Loopback up (the VM's init leaves it down), once per test.
fn lo_up() {
    let (st, _, err) = run("ip", &["link", "set", "lo", "up"]);
    assert!(st.success(), "ip link set lo up: {err}");
}

fn have(tool: &str) -> bool {
    std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists())).unwrap_or(false)
}

/// Waits (up to 20 s) until something accepts connections at `addr`.
fn wait_listening(addr: &Addr) {
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
fn tcp_listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").unwrap_or_default().lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
    })
}

#[derive(Debug, Clone)]
enum Addr {
    Tcp(u16),
    Unix(PathBuf),
}

impl Addr {
    /// The `ublk add` arguments that reach it.
    fn args(&self) -> Vec<String> {
        match self {
            Addr::Tcp(p) => vec!["--host".into(), "127.0.0.1".into(), "--port".into(), p.to_string()],
            Addr::Unix(p) => vec!["--unix".into(), p.display().to_string()],
        }
    }
}

/// A server process, killed (SIGKILL) on drop.
struct Server {
    child: Option<Child>,
    /// nbd-server daemonizes: its pid file.
    pid_file: Option<PathBuf>,
}

impl Server {
    /// `qemu-nbd` exporting `file` as `disk` (discard passed to the file,
    /// up to 4 clients, so it advertises CAN_MULTI_CONN).
    fn qemu_nbd(file: &Path, addr: &Addr, extra: &[&str]) -> Server {
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
    fn nbd_server(file: &Path, port: u16) -> Server {
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
    fn hostile(mode: &str, sock: &Path, extra: &[&str]) -> Server {
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

    fn kill(&mut self) {
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
fn nbd_dev(addr: &Addr, extra: &[&str]) -> Daemon {
    let mut args: Vec<String> = vec!["add".into(), "-t".into(), "nbd".into()];
    args.extend(addr.args());
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start("ublk", &args)
}

fn fio_ok(args: &[&str]) -> String {
    let out = run_ok("fio", args);
    for l in out.lines().filter(|l| l.contains("err=")) {
        assert!(l.contains("err= 0"), "fio {args:?} reported an error: {l}\n{out}");
    }
    out
}

/// fio randrw with mixed block sizes, crc32c verify of everything written,
/// 2 jobs at depth 64 on their own halves of `span`, one per CPU.
fn fio_verify(dev: &str, span: u64) {
    let half = format!("{}", span / 2);
    let cpus = format!("0-{}", nproc() - 1);
    let out = fio_ok(&[
        "--name=nbd-verify",
        "--filename",
        dev,
        "--rw=randrw",
        "--bssplit=4k/40:16k/20:64k/20:128k/20",
        "--ioengine=io_uring",
        "--iodepth=64",
        "--direct=1",
        "--numjobs=2",
        "--size",
        &half,
        "--offset_increment",
        &half,
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--cpus_allowed",
        &cpus,
        "--cpus_allowed_policy=split",
        "--group_reporting",
    ]);
    let line = out.lines().find(|l| l.contains("IOPS=")).unwrap_or("");
    eprintln!("fio verify {dev}: {}", line.trim());
}

fn cmp_ok(a: &str, b: &str, bytes: u64) {
    let (st, out, err) = run("cmp", &["-n", &bytes.to_string(), a, b]);
    assert!(st.success(), "{a} and {b} differ in their first {bytes} bytes: {out}{err}");
}

/// (stopped cleanly, stdout rest) of the daemon, after SIGTERM.
fn stop(d: Daemon) {
    let (st, _) = d.terminate();
    assert!(st.success(), "ublk add -t nbd exited with {st} at SIGTERM");
    assert_no_devices();
}

driver_test! {
    /// fio randrw + crc32c verify (4k..128k, 2 queues = 2 connections, depth
    /// 64) through qemu-nbd over loopback TCP and over a unix socket, then
    /// the device reads exactly what the export file holds.
    fn nbd_fio_verify_qemu_nbd_tcp_and_unix() {
        lo_up();
        for (i, addr) in [Addr::Tcp(10810), Addr::Unix("/tmp/qemu-nbd-verify.sock".into())].into_iter().enumerate() {
            let img = PathBuf::from(format!("/tmp/nbd-verify-{i}.img"));
            sparse_file(&img, 32 << 20);
            let _srv = Server::qemu_nbd(&img, &addr, &[]);
            let d = nbd_dev(&addr, &["--export", "disk", "--queues", "2", "--depth", "64"]);
            let dev = d.dev.to_str().unwrap().to_string();
            assert_eq!(run_ok("blockdev", &["--getsize64", &dev]).trim(), (32u64 << 20).to_string());
            fio_verify(&dev, 16 << 20);
            cmp_ok(&dev, img.to_str().unwrap(), 32 << 20);
            let (st, out) = d.terminate();
            assert!(st.success(), "{addr:?}: exit {st}");
            let q = queue_requests(&out);
            assert_eq!(q.len(), 2, "{out}");
            assert!(q.iter().all(|&(_, r)| r > 0), "both queues (connections) served requests: {q:?}");
            assert_no_devices();
            let _ = std::fs::remove_file(&img);
        }
    }
}

driver_test! {
    /// fio verify through nbd-server (TCP, 2 connections), then mkfs.ext4,
    /// files, e2fsck -fn clean, remount with contents checked.
    fn nbd_nbd_server_fio_and_ext4() {
        lo_up();
        assert!(have("nbd-server"), "nbd-server is not in the VM (apt-get install nbd-server on the host)");
        let img = PathBuf::from("/tmp/nbd-server-ext4.img");
        sparse_file(&img, 32 << 20);
        let _srv = Server::nbd_server(&img, 10811);
        let d = nbd_dev(&Addr::Tcp(10811), &["--export", "disk", "--queues", "2", "--depth", "64"]);
        let dev = d.dev.to_str().unwrap().to_string();
        fio_verify(&dev, 16 << 20);
        cmp_ok(&dev, img.to_str().unwrap(), 32 << 20);
        ext4_round_trip(&dev);
        stop(d);
        let _ = std::fs::remove_file(&img);
    }
}

fn ext4_round_trip(dev: &str) {
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

driver_test! {
    /// ext4 through qemu-nbd over a unix socket; then blkdiscard frees the
    /// export file's blocks (its st_blocks drop, the range reads zeros) and
    /// blkdiscard -z (WRITE_ZEROES) zeroes a range.
    fn nbd_qemu_nbd_ext4_discard_write_zeroes() {
        lo_up();
        let img = PathBuf::from("/tmp/nbd-discard.img");
        sparse_file(&img, 32 << 20);
        let sock = Addr::Unix("/tmp/qemu-nbd-discard.sock".into());
        let _srv = Server::qemu_nbd(&img, &sock, &[]);
        let d = nbd_dev(&sock, &["--export", "disk"]);
        let dev = d.dev.to_str().unwrap().to_string();
        ext4_round_trip(&dev);
        let pat = pattern(16 << 20, 42);
        let pat_path = PathBuf::from("/tmp/nbd-discard.pat");
        std::fs::write(&pat_path, &pat).unwrap();
        run_ok("dd", &[&format!("if={}", pat_path.display()), &format!("of={dev}"), "bs=1M", "oflag=direct", "conv=fsync", "status=none"]);
        let blocks0 = std::fs::metadata(&img).unwrap().blocks();
        assert!(blocks0 >= (16 << 20) / 512, "export file has {blocks0} blocks after 16 MiB written");
        run_ok("blkdiscard", &["-o", "0", "-l", &(8u64 << 20).to_string(), &dev]);
        let blocks1 = std::fs::metadata(&img).unwrap().blocks();
        eprintln!("export st_blocks: {blocks0} after writing 16 MiB, {blocks1} after discarding 8 MiB");
        assert!(blocks1 + (7 << 20) / 512 <= blocks0, "discard freed too little: {blocks0} -> {blocks1} blocks");
        run_ok("blkdiscard", &["-z", "-o", &(8u64 << 20).to_string(), "-l", &(4u64 << 20).to_string(), &dev]);
        let back = PathBuf::from("/tmp/nbd-discard.back");
        run_ok("dd", &[&format!("if={dev}"), &format!("of={}", back.display()), "bs=1M", "count=16", "iflag=direct", "status=none"]);
        let got = std::fs::read(&back).unwrap();
        assert!(got[..12 << 20].iter().all(|&b| b == 0), "discarded and zeroed 12 MiB do not read as zeros");
        assert!(got[12 << 20..] == pat[12 << 20..], "the 4 MiB left alone changed");
        stop(d);
        for p in [&img, &pat_path, &back] {
            let _ = std::fs::remove_file(p);
        }
    }
}

driver_test! {
    /// qemu-nbd killed (SIGKILL) under fio, no recovery: fio ends with I/O
    /// errors within 30 s (no hang), later I/O fails at once with EIO, and
    /// the device stops and is deleted cleanly.
    fn nbd_server_killed_under_fio_fails_io_with_eio() {
        lo_up();
        let img = PathBuf::from("/tmp/nbd-kill.img");
        sparse_file(&img, 32 << 20);
        let addr = Addr::Tcp(10812);
        let mut srv = Server::qemu_nbd(&img, &addr, &[]);
        let d = nbd_dev(&addr, &["--export", "disk", "--queues", "2", "--depth", "64"]);
        let dev = d.dev.to_str().unwrap().to_string();
        let mut fio = Command::new("fio")
            .args(["--name=kill", "--filename", &dev, "--rw=randrw", "--bs=4k", "--ioengine=io_uring", "--iodepth=64"])
            .args(["--direct=1", "--numjobs=2", "--time_based", "--runtime=120", "--group_reporting"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(3));
        srv.kill();
        let t0 = Instant::now();
        let st = wait_timeout(&mut fio, Duration::from_secs(30));
        let Some(st) = st else {
            let _ = fio.kill();
            panic!("fio still runs 30 s after the NBD server was killed");
        };
        let out = fio.wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        eprintln!("fio ended {:.1} s after the kill: {st}", t0.elapsed().as_secs_f32());
        assert!(!st.success(), "fio succeeded although its server was killed:\n{text}");
        assert!(text.contains("Input/output error") || text.contains("err=5") || text.contains("err= 5"), "fio's error is not EIO:\n{text}");
        let t1 = Instant::now();
        let (st, _, err) = run("dd", &[&format!("if={dev}"), "of=/dev/null", "bs=4k", "count=1", "iflag=direct"]);
        assert!(!st.success() && err.contains("Input/output error"), "a read after the server died: {st} {err}");
        assert!(t1.elapsed() < Duration::from_secs(5), "a read after the server died took {:?}", t1.elapsed());
        stop(d);
        let _ = std::fs::remove_file(&img);
    }
}

/// A direct 4 KiB read of `dev` at `off`, within 20 s: Ok or the error text.
fn read_at(dev: &str, off: u64) -> Result<(), String> {
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

driver_test! {
    /// A server that breaks the protocol in the trigger window (1 MiB): a
    /// wrong reply magic, a short reply header, an unknown cookie, a READ
    /// reply with too many bytes. Each fails that read with EIO (no hang),
    /// closes the connection (later reads fail too), and the daemon neither
    /// crashes nor leaves anything behind.
    fn nbd_hostile_server_replies_end_the_connection() {
        let sock = PathBuf::from("/tmp/nbd-hostile.sock");
        for mode in ["wrong-magic", "short-reply", "unknown-cookie", "oversized-read"] {
            eprintln!("mode {mode}");
            let _srv = Server::hostile(mode, &sock, &[]);
            let mut d = nbd_dev(&Addr::Unix(sock.clone()), &["--queues", "1", "--depth", "16"]);
            let dev = d.dev.to_str().unwrap().to_string();
            assert_eq!(read_at(&dev, 0), Ok(()), "{mode}: a read outside the trigger window");
            let t0 = Instant::now();
            let r = read_at(&dev, 1 << 20);
            if mode == "oversized-read" {
                // The read's own 4 KiB arrive whole (a simple reply's length
                // is the request's); the surplus is then read as the next
                // reply header, whose magic is wrong.
                assert_eq!(r, Ok(()), "{mode}");
            } else {
                let e = r.expect_err(mode);
                assert!(e.contains("Input/output error"), "{mode}: {e}");
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "{mode}: the read took {:?}", t0.elapsed());
            let e = read_at(&dev, 8 << 20).expect_err(mode);
            assert!(e.contains("Input/output error"), "{mode}: a read after the connection closed: {e}");
            assert!(d.child.try_wait().unwrap().is_none(), "{mode}: the daemon died");
            stop(d);
        }
    }
}

driver_test! {
    /// The server's errors reach the request (a WRITE answered NBD_ENOSPC
    /// fails with ENOSPC) and the connection stays good; a server without
    /// NBD_OPT_GO is reached with NBD_OPT_EXPORT_NAME and serves data.
    fn nbd_server_errors_and_export_name_fallback() {
        let sock = PathBuf::from("/tmp/nbd-hostile-err.sock");
        {
            let _srv = Server::hostile("enospc", &sock, &[]);
            let d = nbd_dev(&Addr::Unix(sock.clone()), &[]);
            let dev = d.dev.to_str().unwrap().to_string();
            let (st, _, err) =
                run("dd", &["if=/dev/zero", &format!("of={dev}"), "bs=4k", "count=1", "seek=256", "oflag=direct", "conv=notrunc"]);
            assert!(!st.success() && err.contains("No space left on device"), "a WRITE the server fails with ENOSPC: {st} {err}");
            run_ok("dd", &["if=/dev/zero", &format!("of={dev}"), "bs=4k", "count=1", "seek=4096", "oflag=direct", "conv=notrunc"]);
            assert_eq!(read_at(&dev, 0), Ok(()));
            stop(d);
        }
        {
            let _srv = Server::hostile("export-name-only", &sock, &[]);
            let d = nbd_dev(&Addr::Unix(sock.clone()), &[]);
            let dev = d.dev.to_str().unwrap().to_string();
            let pat = pattern(1 << 20, 9);
            let p = PathBuf::from("/tmp/nbd-fallback.pat");
            std::fs::write(&p, &pat).unwrap();
            run_ok("dd", &[&format!("if={}", p.display()), &format!("of={dev}"), "bs=64k", "seek=32", "oflag=direct", "status=none"]);
            let back = PathBuf::from("/tmp/nbd-fallback.back");
            run_ok("dd", &[&format!("if={dev}"), &format!("of={}", back.display()), "bs=64k", "skip=32", "count=16", "iflag=direct", "status=none"]);
            assert!(std::fs::read(&back).unwrap() == pat, "data read back through the EXPORT_NAME fallback differs");
            stop(d);
            let _ = std::fs::remove_file(&p);
            let _ = std::fs::remove_file(&back);
        }
    }
}

/// `ublk add -t nbd ...` must fail, its error containing `want`, and leave
/// no device behind.
fn add_fails(addr: &Addr, extra: &[&str], want: &str) {
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

driver_test! {
    /// Bad setups fail with a clear error and leave nothing behind: nothing
    /// listening, an export the server does not have, a server that closes
    /// mid-handshake, an export size that is not a multiple of the block
    /// size, a block size below the server's minimum, two connections to a
    /// server without CAN_MULTI_CONN, a missing server address.
    fn nbd_bad_setups_leave_nothing_behind() {
        lo_up();
        add_fails(&Addr::Tcp(10899), &[], "Connection refused");
        add_fails(&Addr::Unix("/tmp/nobody-listens.sock".into()), &[], "No such file");
        let img = PathBuf::from("/tmp/nbd-bad.img");
        sparse_file(&img, 16 << 20);
        {
            let addr = Addr::Tcp(10813);
            let _srv = Server::qemu_nbd(&img, &addr, &[]);
            add_fails(&addr, &["--export", "nope"], "NBD_REP_ERR_UNKNOWN");
        }
        {
            let addr = Addr::Unix("/tmp/qemu-nbd-single.sock".into());
            let mut cmd = Command::new("qemu-nbd");
            cmd.args(["-f", "raw", "-x", "disk", "-t", "-k", "/tmp/qemu-nbd-single.sock"]).arg(&img);
            let child = cmd.spawn().unwrap();
            let _srv = Server { child: Some(child), pid_file: None };
            wait_listening(&addr);
            add_fails(&addr, &["--export", "disk", "--connections", "2"], "CAN_MULTI_CONN");
        }
        let sock = PathBuf::from("/tmp/nbd-hostile-bad.sock");
        {
            let _srv = Server::hostile("close-mid-handshake", &sock, &[]);
            add_fails(&Addr::Unix(sock.clone()), &[], "closed the connection");
        }
        {
            let _srv = Server::hostile("good", &sock, &["--size", &((16u64 << 20) + 100).to_string()]);
            add_fails(&Addr::Unix(sock.clone()), &[], "not a positive multiple of the block size");
        }
        {
            let _srv = Server::hostile("min-block-4096", &sock, &[]);
            add_fails(&Addr::Unix(sock.clone()), &["--block-size", "512"], "minimum block size of 4096");
        }
        add_fails(&Addr::Tcp(10899), &["--size", "1G"], "--size is not for -t nbd");
        let (st, _, err) = ublk(&["add", "-t", "nbd"]);
        assert!(!st.success() && err.contains("--host"), "{err}");
        assert_no_devices();
        let _ = std::fs::remove_file(&img);
    }
}

driver_test! {
    /// With --recovery, qemu-nbd killed (SIGKILL) under fio's write phase
    /// and started again on the same export 2 s later: the I/O waits, the
    /// connections are made again, what was in flight is re-issued, and
    /// fio's crc32c verify passes with nothing lost.
    fn nbd_recovery_reconnects_and_reissues() {
        lo_up();
        let img = PathBuf::from("/tmp/nbd-recovery.img");
        sparse_file(&img, 32 << 20);
        let addr = Addr::Tcp(10814);
        let mut srv = Server::qemu_nbd(&img, &addr, &[]);
        let d = nbd_dev(&addr, &["--export", "disk", "--queues", "2", "--depth", "64", "--recovery"]);
        let dev = d.dev.to_str().unwrap().to_string();
        let half = format!("{}", 8u64 << 20);
        let cpus = format!("0-{}", nproc() - 1);
        let fio = Command::new("fio")
            .args(["--name=recover", "--filename", &dev, "--rw=randwrite", "--bssplit=4k/50:64k/50", "--ioengine=io_uring"])
            .args(["--iodepth=64", "--direct=1", "--numjobs=2", "--size", &half, "--offset_increment", &half])
            .args(["--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--cpus_allowed", &cpus, "--cpus_allowed_policy=split"])
            .args(["--group_reporting"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(3));
        srv.kill();
        eprintln!("qemu-nbd killed under fio");
        std::thread::sleep(Duration::from_secs(2));
        let _srv2 = Server::qemu_nbd(&img, &addr, &[]);
        eprintln!("qemu-nbd started again");
        let t0 = Instant::now();
        let mut fio = fio;
        let st = wait_timeout(&mut fio, Duration::from_secs(300));
        let Some(st) = st else {
            let _ = fio.kill();
            panic!("fio did not finish within 300 s of the server's restart");
        };
        let out = fio.wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(st.success(), "fio failed across the server's restart ({st}):\n{text}");
        for l in text.lines().filter(|l| l.contains("err=")) {
            assert!(l.contains("err= 0"), "fio reported an error: {l}\n{text}");
        }
        eprintln!("fio verify passed, {:.1} s after the restart", t0.elapsed().as_secs_f32());
        cmp_ok(&dev, img.to_str().unwrap(), 32 << 20);
        stop(d);
        let _ = std::fs::remove_file(&img);
    }
}

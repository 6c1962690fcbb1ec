//! The NBD target (`ublk add -t nbd`) when things go wrong: `nbd-hostile`
//! (a server that breaks the protocol on purpose), server errors, a server
//! killed under fio (with and without --recovery), and bad setups that
//! leave nothing behind.

mod nbd_util;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nbd_util::*;
use ublk_tests::*;

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

driver_test! {
    /// A server that breaks the protocol in the trigger window (1 MiB): a
    /// wrong reply magic, a short reply header, an unknown cookie, a READ
    /// reply with too many bytes. Each fails that read with EIO (no hang),
    /// closes the connection (later reads fail too), and the daemon neither
    /// crashes nor leaves anything behind.
    fn nbd_hostile_server_replies_end_the_connection() {
        let sock = PathBuf::from("/tmp/nbd-hostile.sock");
        for mode in ["wrong-magic", "short-reply", "unknown-cookie", "oversized-read"] {
            // An oversized READ reply: the read's own 4 KiB arrive whole (a
            // simple reply's length is the request's); the surplus is then
            // read as the next reply header, whose magic is wrong.
            let trigger = if mode == "oversized-read" { Ok(()) } else { Err("Input/output error") };
            let (_srv, d) = attack(mode, &sock, &[], trigger, false);
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
        let fio = spawn_write_verify("recover", &dev, &[]);
        std::thread::sleep(Duration::from_secs(3));
        srv.kill();
        eprintln!("qemu-nbd killed under fio");
        std::thread::sleep(Duration::from_secs(2));
        let _srv2 = Server::qemu_nbd(&img, &addr, &[]);
        eprintln!("qemu-nbd started again");
        let t0 = Instant::now();
        finish_write_verify(fio, "the server's restart");
        eprintln!("fio verify passed, {:.1} s after the restart", t0.elapsed().as_secs_f32());
        cmp_ok(&dev, img.to_str().unwrap(), 32 << 20);
        stop(d);
        let _ = std::fs::remove_file(&img);
    }
}

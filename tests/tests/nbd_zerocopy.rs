//! The NBD target on the zero-copy data paths (`--data-path zero-copy`,
//! 6.15+, and `auto-buf-reg`, 6.16+): READ payloads read from the socket
//! straight into the request's pages (READ_FIXED), holes zeroed there from
//! /dev/zero, WRITE payloads written from them (WRITE_FIXED); each reply's
//! header received on its own, so no payload lands in the reader's buffer.
//! By default (`--data-path auto`) on a kernel with auto-buf-reg, `ublk
//! add` asks for user copy beside it: short payloads then go through the
//! daemon (received in bulk and written into the pages, or read from them
//! and sent with their header), long ones as above. Kernels without a
//! path refuse it naming the kernel that has it, and create nothing.

mod nbd_util;

use std::path::PathBuf;
use std::time::Duration;

use nbd_util::*;
use ublk_tests::*;

/// (data path, its flag, the first kernel that has it working).
const ZERO_COPY_PATHS: [(&str, u64, &str); 2] =
    [("zero-copy", ublk::sys::abi::UBLK_F_SUPPORT_ZERO_COPY, "6.15"), ("auto-buf-reg", ublk::sys::abi::UBLK_F_AUTO_BUF_REG, "6.16")];

/// The zero-copy data paths this kernel has; for each it lacks, checks that
/// `ublk add -t nbd --data-path P` against a live server is refused naming
/// the kernel that has it, and leaves no device.
fn zero_copy_paths(addr: &Addr, extra: &[&str]) -> Vec<&'static str> {
    let mut have = Vec::new();
    for (dp, flag, since) in ZERO_COPY_PATHS {
        if kernel_has(flag) {
            have.push(dp);
            continue;
        }
        let mut args: Vec<String> = vec!["add".into(), "-t".into(), "nbd".into()];
        args.extend(addr.args());
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["--data-path".into(), dp.into()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (st, _, err) = ublk(&args);
        assert!(!st.success(), "nbd --data-path {dp} succeeded on {}", kernel_release());
        assert!(err.contains(since) && err.contains("copy"), "nbd --data-path {dp}: unclear refusal: {err}");
        assert_no_devices();
        skipped(&format!("nbd --data-path {dp} needs Linux {since}+ (refusal checked)"));
    }
    have
}

driver_test! {
    /// On each zero-copy data path the kernel has: fio randrw crc32c verify
    /// (4k..128k, 2 queues = 2 connections, depth 64) through qemu-nbd over
    /// TCP with structured replies (data and hole chunks: the export is
    /// sparse), the device then reads what the export file holds, every
    /// payload went straight to or from the request's pages (as many
    /// direct payloads as data chunks), `ublk list` shows the data path, and
    /// under zero-copy the queues registered the buffers themselves. Then
    /// simple replies over a unix socket (--simple-replies) carry ext4 +
    /// e2fsck and a pattern that lands in the export file.
    fn nbd_zero_copy_fio_verify_and_ext4() {
        lo_up();
        let addr = Addr::Tcp(10820);
        let img = PathBuf::from("/tmp/nbd-zc.img");
        sparse_file(&img, 32 << 20);
        let srv = Server::qemu_nbd(&img, &addr, &[]);
        let paths = zero_copy_paths(&addr, &["--export", "disk"]);
        // Each zero-copy path alone, then the default where the kernel has
        // auto-buf-reg (and so user copy): auto-buf-reg with user copy
        // beside it, short payloads through the daemon.
        let mut runs: Vec<(&str, &str)> = paths.iter().map(|&dp| (dp, dp)).collect();
        if paths.contains(&"auto-buf-reg") {
            runs.push(("auto", "auto-buf-reg+user-copy"));
        }
        for (dp, listed) in runs {
            let d = nbd_dev(&addr, &["--export", "disk", "--queues", "2", "--depth", "64", "--data-path", dp]);
            let dev = d.dev.to_str().unwrap().to_string();
            assert_eq!(listed_data_path(d.id()), listed, "ublk list: data path of the NBD device");
            let mixed = listed_flags(d.id()).iter().any(|f| f == "UBLK_F_USER_COPY");
            assert_eq!(mixed, dp == "auto", "nbd --data-path {dp}: USER_COPY beside zero copy only by default");
            fio_verify(&dev, 8 << 20);
            cmp_ok(&dev, img.to_str().unwrap(), 32 << 20);
            let (st, out) = d.terminate();
            assert!(st.success(), "nbd --data-path {dp} exited with {st}");
            assert_no_devices();
            assert_eq!(queue_sum(&out, "errors"), 0, "nbd {dp}: requests failed: {out}");
            let m = nbd_stats(&out);
            eprintln!("{dp}: {m:?}");
            assert_eq!(m["replies"], "structured", "{m:?}");
            assert!(stat(&m, "data_chunks") > 0 && stat(&m, "hole_chunks") > 0, "{dp}: READs answered in data and hole chunks: {m:?}");
            if mixed {
                // fio's 4k..128k: short payloads written into the pages from
                // the reader's buffer and short WRITEs staged, long payloads
                // read from the socket into the pages; every data chunk one
                // way or the other (a chunk may take both).
                for k in ["direct_payloads", "copied_payloads", "staged_writes"] {
                    assert!(stat(&m, k) > 0, "{dp} with user copy: {k}: {m:?}");
                }
                assert!(
                    stat(&m, "direct_payloads") + stat(&m, "copied_payloads") >= stat(&m, "data_chunks"),
                    "{dp} with user copy: every data chunk into the request's pages: {m:?}"
                );
            } else {
                assert_eq!(stat(&m, "direct_payloads"), stat(&m, "data_chunks"), "{dp}: every data chunk read into the request's pages: {m:?}");
            }
            assert_eq!(stat(&m, "holes_zeroed"), stat(&m, "hole_chunks"), "{dp}: every hole chunk zeroed in the request's pages: {m:?}");
            // Every payload received into the pages took at least one socket
            // read.
            assert!(stat(&m, "payload_reads") >= stat(&m, "direct_payloads"), "{dp}: socket reads of payloads: {m:?}");
            if !mixed {
                assert_eq!(stat(&m, "copied_payloads") + stat(&m, "staged_writes"), 0, "{dp} alone: nothing through the daemon: {m:?}");
            }
            let regs = queue_sum(&out, "buf_regs");
            if dp == "zero-copy" {
                assert!(regs > 0, "zero-copy: the queues registered the requests' buffers: {out}");
            } else {
                assert_eq!(regs, 0, "auto-buf-reg: the kernel registers the buffers: {out}");
            }
        }
        drop(srv);
        let Some(&dp) = paths.last() else { return };
        let sock = Addr::Unix("/tmp/qemu-nbd-zc.sock".into());
        let _srv = Server::qemu_nbd(&img, &sock, &[]);
        let d = nbd_dev(&sock, &["--export", "disk", "--simple-replies", "--data-path", dp]);
        let dev = d.dev.to_str().unwrap().to_string();
        nbd_util::ext4_round_trip(&dev);
        let pat = pattern(4 << 20, 77);
        let pat_path = PathBuf::from("/tmp/nbd-zc.pat");
        std::fs::write(&pat_path, &pat).unwrap();
        run_ok("dd", &[&format!("if={}", pat_path.display()), &format!("of={dev}"), "bs=1M", "seek=20", "oflag=direct", "conv=fsync", "status=none"]);
        assert!(read_range(&img, 20 << 20, 4 << 20) == pat, "{dp}: the pattern written through the device is not in the export file");
        assert!(read_direct(&dev, 20 << 20, 4 << 20) == pat, "{dp}: the pattern does not read back through the device");
        let m = stop_stats(d);
        assert_eq!(m["replies"], "simple", "{m:?}");
        assert!(stat(&m, "direct_payloads") > 0, "{m:?}");
        for p in [&img, &pat_path] {
            let _ = std::fs::remove_file(p);
        }
    }
}

driver_test! {
    /// Zero copy against nbd-hostile: structured replies in up to four
    /// chunks, last piece first, with holes, pass fio verify, and a range
    /// never written reads as zeros (zeroed in the pages from /dev/zero);
    /// replies that break the protocol (a chunk outside the request, one
    /// longer than it, a simple reply to a READ under structured replies; an
    /// unknown cookie, a short header, a wrong magic with simple replies)
    /// fail their read with EIO within 10 s, close the connection, and the
    /// daemon stops cleanly.
    fn nbd_zero_copy_hostile_chunks_and_attacks() {
        let sock = PathBuf::from("/tmp/nbd-hostile-zc.sock");
        let probe = Server::hostile("sr-good", &sock, &[]);
        let Some(&dp) = zero_copy_paths(&Addr::Unix(sock.clone()), &[]).last() else { return };
        drop(probe);
        let _srv = Server::hostile("sr-good", &sock, &[]);
        let d = nbd_dev(&Addr::Unix(sock.clone()), &["--queues", "1", "--depth", "32", "--data-path", dp]);
        let dev = d.dev.to_str().unwrap().to_string();
        fio_verify_halves("nbd-zc-sr", &dev, 8 << 20, &["--rw=randrw", "--bssplit=4k/40:16k/20:64k/20:128k/20", "--iodepth=16"]);
        let got = read_direct(&dev, 32 << 20, 1 << 20);
        assert!(got.len() == 1 << 20 && got.iter().all(|&b| b == 0), "{dp}: a never-written range does not read as zeros");
        let m = stop_stats(d);
        assert!(stat(&m, "hole_chunks") > 0 && stat(&m, "data_chunks") > 0, "{m:?}");
        assert_eq!(stat(&m, "holes_zeroed"), stat(&m, "hole_chunks"), "{dp}: every hole chunk zeroed in the request's pages: {m:?}");
        for mode in ["sr-out-of-bounds", "sr-oversized-chunk", "sr-simple-read", "unknown-cookie", "short-reply", "wrong-magic"] {
            let (_srv, d) = attack(mode, &sock, &["--data-path", dp], Err("Input/output error"), false);
            stop_stats(d);
        }
    }
}

driver_test! {
    /// Zero copy with --recovery: qemu-nbd killed (SIGKILL) under fio's
    /// write phase and started again on the same export 2 s later; the I/O
    /// waits, the connections are made again, the requests in flight
    /// (WRITE payloads from their pages among them) are re-issued, and fio's
    /// crc32c verify passes; the device then reads what the export holds.
    fn nbd_zero_copy_server_restart_with_recovery() {
        lo_up();
        let img = PathBuf::from("/tmp/nbd-zc-recovery.img");
        sparse_file(&img, 32 << 20);
        let addr = Addr::Tcp(10821);
        let mut srv = Server::qemu_nbd(&img, &addr, &[]);
        let Some(&dp) = zero_copy_paths(&addr, &["--export", "disk"]).last() else { return };
        let d = nbd_dev(&addr, &["--export", "disk", "--queues", "2", "--depth", "64", "--recovery", "--data-path", dp]);
        let dev = d.dev.to_str().unwrap().to_string();
        let mut fio = spawn_write_verify("zc-recover", &dev, &[
            // About 5 s of writing (at most 50 writes/s per job; the verify
            // reads unlimited): the kill 3 s in lands mid-job.
            "--rate_iops=,50",
        ]);
        std::thread::sleep(Duration::from_secs(3));
        assert!(fio.try_wait().unwrap().is_none(), "fio finished before the server was killed");
        srv.kill();
        std::thread::sleep(Duration::from_secs(2));
        let _srv2 = Server::qemu_nbd(&img, &addr, &[]);
        finish_write_verify(fio, "the server's restart");
        cmp_ok(&dev, img.to_str().unwrap(), 32 << 20);
        let m = stop_stats(d);
        assert!(stat(&m, "reconnects") >= 1, "{dp}: the connections were made again: {m:?}");
        let _ = std::fs::remove_file(&img);
    }
}

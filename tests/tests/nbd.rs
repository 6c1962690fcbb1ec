//! The NBD target (`ublk add -t nbd`) moving data through real NBD servers
//! in the VM (`qemu-nbd` and `nbd-server`, over loopback TCP and a unix
//! socket): fio verify, ext4, discard and write-zeroes reaching the export.
//! The failure cases are in nbd_faults.rs (each test executable has its
//! own time budget in the VM).

mod nbd_util;

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use nbd_util::*;
use ublk_tests::*;

driver_test! {
    /// fio randrw + crc32c verify (4k..128k, 2 queues = 2 connections, depth
    /// 64) through qemu-nbd over loopback TCP with structured replies
    /// (asserted: READs answered in data chunks; the export is sparse, so
    /// in holes too) and over a unix socket with simple ones
    /// (--simple-replies), then the device reads exactly what the export
    /// file holds. No queue busy-polls, and each queue's thread is pinned
    /// to one CPU that does not submit to its queue (the NBD defaults:
    /// `Placement::Away`).
    fn nbd_fio_verify_qemu_nbd_tcp_and_unix() {
        lo_up();
        for (i, addr) in [Addr::Tcp(10810), Addr::Unix("/tmp/qemu-nbd-verify.sock".into())].into_iter().enumerate() {
            let img = PathBuf::from(format!("/tmp/nbd-verify-{i}.img"));
            sparse_file(&img, 32 << 20);
            let _srv = Server::qemu_nbd(&img, &addr, &[]);
            let structured = i == 0;
            let mut args = vec!["--export", "disk", "--queues", "2", "--depth", "64"];
            if !structured {
                args.push("--simple-replies");
            }
            let d = nbd_dev(&addr, &args);
            let dev = d.dev.to_str().unwrap().to_string();
            assert_eq!(run_ok("blockdev", &["--getsize64", &dev]).trim(), (32u64 << 20).to_string());
            if structured {
                queue_threads_away(&d);
            }
            fio_verify(&dev, 8 << 20);
            cmp_ok(&dev, img.to_str().unwrap(), 32 << 20);
            let (st, out) = d.terminate();
            assert!(st.success(), "{addr:?}: exit {st}");
            let q = queue_requests(&out);
            assert_eq!(q.len(), 2, "{out}");
            assert!(q.iter().all(|&(_, r)| r > 0), "both queues (connections) served requests: {q:?}");
            assert_eq!(queue_sum(&out, "polled"), 0, "-t nbd busy-polls only when --busy-poll-us asks: {out}");
            assert_no_devices();
            let m = nbd_stats(&out);
            eprintln!("{addr:?}: {m:?}");
            // The reader's receive buffer is registered with the queue's
            // ring (the test runs as root: no RLIMIT_MEMLOCK in the way),
            // and READ_FIXED on the socket carried every reply.
            assert!(stat(&m, "recvs") > 0 && stat(&m, "fixed_recvs") == stat(&m, "recvs"), "every receive a READ_FIXED: {m:?}");
            if structured {
                assert_eq!(m["replies"], "structured", "qemu-nbd offers structured replies: {m:?}");
                assert!(stat(&m, "data_chunks") > 0 && stat(&m, "hole_chunks") > 0, "READs answered in data and hole chunks: {m:?}");
            } else {
                assert_eq!(m["replies"], "simple", "--simple-replies: {m:?}");
                assert_eq!(stat(&m, "chunks"), 0, "{m:?}");
                assert!(stat(&m, "simple_replies") > 0, "{m:?}");
            }
            let _ = std::fs::remove_file(&img);
        }
    }
}

/// `ublk add -t nbd` without --placement: saved as away, and each queue
/// thread pinned to a single CPU outside its queue's home where the CPU
/// after the home is free (with as many queues as CPUs, every queue's is;
/// otherwise Away takes the last CPU, which may be home).
fn queue_threads_away(d: &Daemon) {
    let id = d.id();
    let cfg = ublk_cli::config::DeviceConfig::load(id).unwrap().expect("saved configuration");
    assert_eq!(cfg.placement, ublk_cli::PlacementArg::Away, "-t nbd's default placement: {cfg:?}");
    let mut ctrl = ublk::Control::open().unwrap();
    for q in 0..cfg.queues {
        let home = ctrl.get_queue_affinity(id, q).unwrap();
        let cpus = thread_cpus(d.child.id(), &format!("ublk{id}-q{q}"));
        eprintln!("queue {q}: home {home:?}, thread on {cpus:?}");
        assert_eq!(cpus.len(), 1, "queue {q}'s thread is pinned to one CPU: {cpus:?}");
        let next = (home.iter().max().copied().unwrap_or(0) + 1) % nproc();
        if !home.contains(&next) {
            assert!(!home.contains(&cpus[0]), "queue {q}'s thread is away from its submitters {home:?}: {cpus:?}");
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
        fio_verify(&dev, 8 << 20);
        cmp_ok(&dev, img.to_str().unwrap(), 32 << 20);
        nbd_util::ext4_round_trip(&dev);
        stop(d);
        let _ = std::fs::remove_file(&img);
    }
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
        nbd_util::ext4_round_trip(&dev);
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
        // The discarded range is a hole in the file, which qemu-nbd answers
        // with hole chunks: zeroed here, in buffers that held the pattern.
        assert!(got[..12 << 20].iter().all(|&b| b == 0), "discarded and zeroed 12 MiB do not read as zeros");
        assert!(got[12 << 20..] == pat[12 << 20..], "the 4 MiB left alone changed");
        let m = stop_stats(d);
        assert_eq!(m["replies"], "structured", "{m:?}");
        assert!(stat(&m, "hole_chunks") > 0, "holes read as hole chunks: {m:?}");
        for p in [&img, &pat_path, &back] {
            let _ = std::fs::remove_file(p);
        }
    }
}

//! The NBD target's structured replies (`NBD_OPT_STRUCTURED_REPLY`)
//! against `nbd-hostile`: chunks in any order and holes under fio verify,
//! and chunks that break the protocol (each ends the connection cleanly).
//! qemu-nbd's structured replies are in nbd.rs.

mod nbd_util;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use nbd_util::*;
use ublk_tests::*;

driver_test! {
    /// Structured replies from nbd-hostile (sr-good): every READ in up to
    /// four chunks sent last piece first, zeros as hole chunks; fio randrw
    /// crc32c verify (4k..128k) passes, a range never written reads as
    /// zeros although the request buffers held data, and the counts show
    /// data, hole and several chunks per reply.
    fn nbd_structured_replies_out_of_order_chunks_and_holes() {
        let sock = PathBuf::from("/tmp/nbd-hostile-sr.sock");
        let _srv = Server::hostile("sr-good", &sock, &[]);
        let d = nbd_dev(&Addr::Unix(sock.clone()), &["--queues", "1", "--depth", "32"]);
        let dev = d.dev.to_str().unwrap().to_string();
        fio_verify_halves("nbd-sr", &dev, 8 << 20, &["--rw=randrw", "--bssplit=4k/40:16k/20:64k/20:128k/20", "--iodepth=16"]);
        // 32 MiB on: never written (the server's memory is zeros).
        let got = read_direct(&dev, 32 << 20, 1 << 20);
        assert!(got.len() == 1 << 20 && got.iter().all(|&b| b == 0), "a never-written range does not read as zeros");
        let m = stop_stats(d);
        assert_eq!(m["replies"], "structured", "{m:?}");
        assert!(stat(&m, "hole_chunks") > 0 && stat(&m, "data_chunks") > 0, "{m:?}");
        assert!(stat(&m, "chunks") > stat(&m, "data_chunks") + stat(&m, "hole_chunks"), "NONE chunks too: {m:?}");
        assert_eq!(stat(&m, "error_chunks"), 0, "{m:?}");
    }
}

driver_test! {
    /// Structured replies that break the protocol (nbd-hostile, in its
    /// trigger window at 1 MiB): a chunk outside the request, a chunk 4 KiB
    /// longer than the request, chunks over the same bytes, a READ done with
    /// half its data, all data and no DONE then the connection closed, an
    /// error chunk whose message overruns it, a second DONE, an unknown
    /// chunk type, a simple reply to a READ. Each ends the connection: that
    /// read fails with EIO within 10 s (the second DONE comes after a good
    /// reply, whose read succeeds), later reads fail too, the daemon does
    /// not crash and stops cleanly. An error chunk (NBD_ENOSPC) fails only
    /// its read, with ENOSPC; the connection stays good.
    fn nbd_structured_reply_attacks_end_the_connection() {
        let sock = PathBuf::from("/tmp/nbd-hostile-sra.sock");
        for mode in [
            "sr-out-of-bounds",
            "sr-oversized-chunk",
            "sr-overlap",
            "sr-incomplete",
            "sr-missing-done",
            "sr-bad-error",
            "sr-second-done",
            "sr-unknown-type",
            "sr-simple-read",
            "sr-error",
        ] {
            let trigger = match mode {
                // The second DONE comes after a good reply.
                "sr-second-done" => Ok(()),
                // (ENOSPC: one of the errnos the block layer passes on.)
                "sr-error" => Err("No space left on device"),
                _ => Err("Input/output error"),
            };
            // An error chunk fails only its read.
            let (_srv, d) = attack(mode, &sock, &[], trigger, mode == "sr-error");
            let m = stop_stats(d);
            assert_eq!(m["replies"], "structured", "{mode}: {m:?}");
            if mode == "sr-error" {
                assert_eq!(stat(&m, "error_chunks"), 1, "{mode}: {m:?}");
            }
        }
    }
}

driver_test! {
    /// With --recovery, a server that sends a READ's data without DONE and
    /// closes the connection, every time: the read waits (no EIO) while the
    /// target makes the connection again and again, with backoff (not a
    /// busy loop: a handful of reconnects in 4 s); the daemon stops cleanly
    /// at SIGTERM and the waiting read then fails.
    fn nbd_structured_missing_done_with_recovery_waits() {
        let sock = PathBuf::from("/tmp/nbd-hostile-srr.sock");
        let _srv = Server::hostile("sr-missing-done", &sock, &[]);
        let d = nbd_dev(&Addr::Unix(sock.clone()), &["--queues", "1", "--depth", "16", "--recovery"]);
        let dev = d.dev.to_str().unwrap().to_string();
        assert_eq!(read_at(&dev, 0), Ok(()));
        let mut dd = Command::new("dd")
            .args([&format!("if={dev}"), "of=/dev/null", "bs=4k", "count=1", &format!("skip={}", (1 << 20) / 4096), "iflag=direct"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(4));
        assert!(dd.try_wait().unwrap().is_none(), "the read did not wait for the connection to be made again");
        let m = stop_stats(d);
        let st = wait_timeout(&mut dd, Duration::from_secs(30)).expect("the waiting read did not end after the device stopped");
        assert!(!st.success(), "the read succeeded although no reply ever completed it");
        let n = stat(&m, "reconnects");
        assert!((1..=20).contains(&n), "connections made again in 4 s: {n} (backoff) {m:?}");
    }
}

//! Zero copy (`--data-path zero-copy|auto-buf-reg`): loop and stripe do
//! their reads and writes straight on the request's pages, registered in the
//! queue's ring per request (UBLK_F_SUPPORT_ZERO_COPY, 6.15+) or by the
//! kernel itself (UBLK_F_AUTO_BUF_REG, 6.16+). Older kernels refuse both
//! clearly and create nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ublk::aio::{AsyncTarget, Io, QueueContext, QueueTarget};
use ublk::{DataPath, DeviceBuilder, IoResult, LoopOptions, LoopTarget};
use ublk_tests::*;

/// (data path, its flag, the first kernel that has it working).
const ZERO_COPY_PATHS: [(&str, u64, &str); 2] =
    [("zero-copy", ublk::sys::abi::UBLK_F_SUPPORT_ZERO_COPY, "6.15"), ("auto-buf-reg", ublk::sys::abi::UBLK_F_AUTO_BUF_REG, "6.16")];

fn fio_verify(dev: &str, bs: &str, span: u64) {
    let bs = format!("--bs={bs}");
    fio_verify_halves("zc", dev, span, &["--rw=randwrite", &bs, "--iodepth=32"]);
}

driver_test! {
    /// loop and stripe (2 legs) on each zero-copy data path: fio crc32c
    /// verify at 4k and 128k, ext4 + e2fsck, a pattern written through the
    /// loop device found in its backing file; `ublk list` shows the data
    /// path; under zero-copy the queue registered every READ/WRITE itself,
    /// under auto-buf-reg none (the kernel did). Kernels without the flag
    /// refuse it naming the kernel that has it, and create nothing. A
    /// ramdisk (a memfd the kernel copies to and from) passes fio verify
    /// too. (NBD's zero copy is in nbd_zerocopy.rs.)
    fn zc_loop_and_stripe_on_every_zero_copy_path() {
        for (dp, flag, since) in ZERO_COPY_PATHS {
            let backing = PathBuf::from("/tmp/zc-loop.img");
            sparse_file(&backing, 64 << 20);
            let loop_args = ["add", "-t", "loop", "--file", backing.to_str().unwrap(), "--queues", "2", "--depth", "64", "--data-path", dp];
            if !kernel_has(flag) {
                let (st, _, err) = ublk(&loop_args);
                assert!(!st.success(), "loop --data-path {dp} succeeded on {}", kernel_release());
                assert!(err.contains(since) && err.contains("copy"), "loop --data-path {dp}: unclear refusal: {err}");
                assert_no_devices();
                skipped(&format!("--data-path {dp} needs Linux {since}+ (refusal checked)"));
                continue;
            }
            let d = Daemon::start("ublk", &["add", "-t", "ramdisk", "--size", "32M", "--queues", "2", "--data-path", dp]);
            let dev = d.dev.to_str().unwrap().to_string();
            assert_eq!(listed_data_path(d.id()), dp, "ublk list: data path of the ramdisk");
            fio_verify_halves("zc-ramdisk", &dev, 8 << 20, &["--rw=randwrite", "--bsrange=4k-256k", "--iodepth=16"]);
            let (st, out) = d.terminate();
            assert!(st.success(), "ramdisk --data-path {dp} exited with {st}");
            assert_eq!(queue_sum(&out, "errors"), 0, "ramdisk {dp}: requests failed: {out}");
            assert_no_devices();

            let d = Daemon::start("ublk", &loop_args);
            let dev = d.dev.to_str().unwrap().to_string();
            assert_eq!(listed_data_path(d.id()), dp, "ublk list: data path of the loop device");
            fio_verify(&dev, "4k", 8 << 20);
            fio_verify(&dev, "128k", 8 << 20);
            ext4_round_trip(&dev, &format!("loop {dp}"));
            let pat = pattern(1 << 20, 21);
            let pat_path = PathBuf::from("/tmp/zc.pat");
            std::fs::write(&pat_path, &pat).unwrap();
            run_ok("dd", &[&format!("if={}", pat_path.display()), &format!("of={dev}"), "bs=1M", "seek=5", "oflag=direct", "conv=fsync", "status=none"]);
            let (st, out) = d.terminate();
            assert!(st.success(), "loop --data-path {dp} exited with {st}");
            assert_eq!(queue_sum(&out, "errors"), 0, "loop {dp}: requests failed: {out}");
            assert_eq!(queue_sum(&out, "invalid"), 0, "loop {dp}: {out}");
            let data_reqs = queue_sum(&out, "reads") + queue_sum(&out, "writes");
            let regs = queue_sum(&out, "buf_regs");
            eprintln!("loop {dp}: {data_reqs} reads+writes, {regs} registered by the queue");
            if dp == "zero-copy" {
                assert_eq!(regs, data_reqs, "zero-copy: every READ/WRITE is registered by the queue: {out}");
            } else {
                assert_eq!(regs, 0, "auto-buf-reg: the kernel registers every request itself: {out}");
            }
            assert_no_devices();
            assert!(read_range(&backing, 5 << 20, 1 << 20) == pat, "loop {dp}: the backing file does not hold the pattern");
            let _ = std::fs::remove_file(&backing);
            let _ = std::fs::remove_file(&pat_path);

            // Stripe over two legs, 64k chunks: requests span chunk
            // boundaries (128k) and become two operations on two files.
            let legs = [PathBuf::from("/tmp/zc-leg0.img"), PathBuf::from("/tmp/zc-leg1.img")];
            for l in &legs {
                sparse_file(l, 32 << 20);
            }
            let d = Daemon::start(
                "ublk",
                &["add", "-t", "stripe", "--file", legs[0].to_str().unwrap(), "--file", legs[1].to_str().unwrap(), "--chunk", "64K", "--queues", "2", "--data-path", dp],
            );
            let dev = d.dev.to_str().unwrap().to_string();
            assert_eq!(listed_data_path(d.id()), dp, "ublk list: data path of the stripe device");
            fio_verify(&dev, "4k", 8 << 20);
            fio_verify_halves("zc-stripe", &dev, 8 << 20, &["--rw=randwrite", "--bsrange=4k-256k", "--iodepth=16"]);
            ext4_round_trip(&dev, &format!("stripe {dp}"));
            let (st, out) = d.terminate();
            assert!(st.success(), "stripe --data-path {dp} exited with {st}");
            assert_eq!(queue_sum(&out, "errors"), 0, "stripe {dp}: requests failed: {out}");
            for l in &legs {
                let _ = std::fs::remove_file(l);
            }
            assert_no_devices();
        }
    }
}

driver_test! {
    /// Without --data-path, loop and stripe get the fastest path the kernel
    /// offers: auto-buf-reg where it exists, else zero-copy, else user-copy,
    /// else copy; ramdisk the same (under user copy it preads and pwrites
    /// /dev/ublkcN to and from its memory, one copy by the kernel).
    fn zc_default_data_path_is_the_fastest_the_kernel_offers() {
        let f = ublk::Control::open().unwrap().features();
        let want = DataPath::best(f, true, true).name();
        let backing = PathBuf::from("/tmp/zc-default.img");
        sparse_file(&backing, 16 << 20);
        let d = Daemon::start("ublk", &["add", "-t", "loop", "--file", backing.to_str().unwrap()]);
        let got = listed_data_path(d.id());
        let (st, _) = d.terminate();
        assert!(st.success());
        eprintln!("loop's default data path on {}: {got}", kernel_release());
        assert_eq!(got, want);
        let expect = if kernel_has(ublk::sys::abi::UBLK_F_AUTO_BUF_REG) {
            "auto-buf-reg"
        } else if kernel_has(ublk::sys::abi::UBLK_F_SUPPORT_ZERO_COPY) {
            "zero-copy"
        } else if kernel_has(ublk::sys::abi::UBLK_F_USER_COPY) {
            "user-copy"
        } else {
            "copy"
        };
        assert_eq!(got, expect, "DataPath::best disagrees with the kernel's features");
        let d = Daemon::start("ublk", &["add", "-t", "ramdisk", "--size", "16M"]);
        assert_eq!(listed_data_path(d.id()), want, "ramdisk's default data path");
        let (st, _) = d.terminate();
        assert!(st.success());
        let _ = std::fs::remove_file(&backing);
        assert_no_devices();
    }
}

/// The loop target, counting requests whose pages the kernel could not
/// register (seen as `Io` under zero copy, through the queue's fallback).
struct Counting(LoopTarget);

impl AsyncTarget for Counting {
    type Queue<'a> = &'a Counting;
    fn queue(&self, q: &QueueContext) -> std::io::Result<&Counting> {
        assert!(q.zero_copy, "the queue should be zero copy");
        Ok(self)
    }
    fn files(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        self.0.files()
    }
    fn zero_copy(&self) -> bool {
        true
    }
}

impl QueueTarget for &Counting {
    async fn handle(&self, io: Io<'_>) -> IoResult {
        (&self.0).handle(io).await
    }
}

driver_test! {
    /// UBLK_F_AUTO_BUF_REG's fallback: every other tag's fixed-buffer index
    /// is taken (a test hook puts a page of the queue's own there), so the
    /// kernel cannot register those requests' pages and delivers them with
    /// UBLK_IO_F_NEED_REG_BUF; the queue registers them itself. fio verify
    /// passes, no request fails, and the queue did register some.
    fn zc_auto_buf_reg_fallback_loses_nothing() {
        if !kernel_has(ublk::sys::abi::UBLK_F_AUTO_BUF_REG) {
            skipped("UBLK_F_AUTO_BUF_REG needs Linux 6.16+");
            return;
        }
        auto_buf_reg_fallback(false);
    }
}

driver_test! {
    /// The same with batched commands (7.0+): the fallback is asked for by
    /// the batch's `UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK`, elements having no
    /// flags; without it the kernel fails the requests it cannot register.
    fn zc_batch_auto_buf_reg_fallback_loses_nothing() {
        if !kernel_has(ublk::sys::abi::UBLK_F_BATCH_IO) {
            skipped("UBLK_F_BATCH_IO needs Linux 7.0+");
            return;
        }
        auto_buf_reg_fallback(true);
    }
}

/// A 2-queue loop device with auto buffer registration whose every
/// second tag's index is taken: fio verify passes and about half the
/// requests took the fallback.
fn auto_buf_reg_fallback(batch: bool) {
    let path = Path::new(if batch { "/tmp/zc-fallback-batch.img" } else { "/tmp/zc-fallback.img" });
    sparse_file(path, 32 << 20);
    let target = Counting(LoopTarget::open(path, &LoopOptions::default()).unwrap());
    let dev = DeviceBuilder::new()
        .queues(2)
        .depth(64)
        .size(32 << 20)
        .data_path(DataPath::AutoBufReg)
        .batch_io(batch)
        .occupy_auto_buf_indexes(2)
        .create()
        .unwrap();
    assert_eq!(dev.data_path(), DataPath::AutoBufReg);
    let stats = within("fallback device", Duration::from_secs(300), move || {
        dev.serve_async(&target, |dev, stop| {
            let p = dev.block_path();
            let p = p.to_str().unwrap();
            fio_verify(p, "4k", 8 << 20);
            fio_verify(p, "128k", 8 << 20);
            stop.stop();
        })
        .unwrap()
    });
    let regs: u64 = stats.iter().map(|s| s.buf_regs).sum();
    let data: u64 = stats.iter().map(|s| s.reads + s.writes).sum();
    let errors: u64 = stats.iter().map(|s| s.errors + s.invalid).sum();
    eprintln!("fallback: {regs} of {data} READ/WRITE requests registered by the queue");
    assert_eq!(errors, 0, "requests failed: {stats:?}");
    assert!(regs > 0 && regs < data, "about half the requests should take the fallback: {regs} of {data}");
    let _ = std::fs::remove_file(path);
    assert_no_devices();
}

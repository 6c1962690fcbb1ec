//! The stripe target (RAID-0) through the `ublk` CLI against the real
//! driver: fio verify with mixed block sizes across chunk boundaries on 2
//! and 3 legs, each chunk of the device found on its leg (read from the leg
//! files directly), DISCARD and WRITE_ZEROES split per leg, ext4 + fsck +
//! remount, a full leg failing its requests with ENOSPC while the device
//! keeps serving, user copy (6.5+; refused on 6.1), user recovery, bad
//! input refused, and block-device legs whose pieces run concurrently (its
//! allocation per request is checked in `alloc.rs`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ublk_tests::*;

const K: u64 = 1 << 10;
const M: u64 = 1 << 20;

/// The whole device, read with O_DIRECT (nothing from its page cache).
fn read_device(dev: &str, size: u64) -> Vec<u8> {
    let out = PathBuf::from("/tmp/stripe-device.copy");
    run_ok("dd", &[&format!("if={dev}"), &format!("of={}", out.display()), "bs=1M", "iflag=direct", "status=none"]);
    let v = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    assert_eq!(v.len() as u64, size, "read {} bytes of {dev}, its size is {size}", v.len());
    v
}

/// Writes `data` at `off` of `dev` with O_DIRECT, in one write(2) (one
/// request up to the device's 512 KiB); returns dd's status and stderr.
fn dd_write(dev: &str, off: u64, data: &[u8], name: &str) -> (std::process::ExitStatus, String) {
    let src = PathBuf::from(format!("/tmp/stripe-{name}.src"));
    std::fs::write(&src, data).unwrap();
    let (st, _, err) = run(
        "dd",
        &[
            &format!("if={}", src.display()),
            &format!("of={dev}"),
            &format!("bs={}", data.len()),
            &format!("seek={off}"),
            "oflag=direct,seek_bytes",
            "status=none",
        ],
    );
    let _ = std::fs::remove_file(&src);
    (st, err)
}

/// `len` bytes at `off` of `dev`, read with O_DIRECT in one read(2).
fn dd_read(dev: &str, off: u64, len: u64) -> Vec<u8> {
    let dst = PathBuf::from("/tmp/stripe-dd.read");
    run_ok(
        "dd",
        &[
            &format!("if={dev}"),
            &format!("of={}", dst.display()),
            &format!("bs={len}"),
            &format!("skip={off}"),
            "count=1",
            "iflag=direct,skip_bytes",
            "status=none",
        ],
    );
    let v = std::fs::read(&dst).unwrap();
    let _ = std::fs::remove_file(&dst);
    v
}

/// Asserts the RAID-0 layout, independently of the target's own arithmetic:
/// chunk `k` of the device (`dev_bytes`) is, byte for byte, at offset
/// `(k / N) * chunk` of leg `k % N`, read from the leg files directly.
fn assert_striped(dev_bytes: &[u8], legs: &[PathBuf], chunk: u64, what: &str) {
    let n = legs.len() as u64;
    let leg_bytes: Vec<Vec<u8>> = legs.iter().map(|l| std::fs::read(l).unwrap()).collect();
    let chunks = dev_bytes.len() as u64 / chunk;
    assert_eq!(chunks * chunk, dev_bytes.len() as u64, "{what}: the device is not a whole number of chunks");
    // Compared whole (memcmp), not byte by byte: the tests are a debug
    // build, and a byte loop over tens of MiB takes seconds under TCG.
    let zero = vec![0u8; chunk as usize];
    let mut nonzero = 0;
    for k in 0..chunks {
        let d = &dev_bytes[(k * chunk) as usize..((k + 1) * chunk) as usize];
        let at = ((k / n) * chunk) as usize;
        let l = &leg_bytes[(k % n) as usize][at..at + chunk as usize];
        if d != l {
            let i = d.iter().zip(l).position(|(a, b)| a != b).unwrap();
            panic!("{what}: chunk {k} of the device differs from leg {} at {at} (first at byte {i} of the chunk)", k % n);
        }
        nonzero += usize::from(d != zero.as_slice());
    }
    eprintln!("{what}: all {chunks} chunks of {chunk} bytes are on their legs ({nonzero} hold data)");
}

/// `ublk add -t stripe` arguments with a `--file` per leg.
fn stripe_args<'a>(legs: &'a [PathBuf], extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["add", "-t", "stripe"];
    for l in legs {
        a.extend(["--file", l.to_str().unwrap()]);
    }
    a.extend(extra);
    a
}

/// Sparse leg files of the given sizes under /tmp.
fn legs(name: &str, sizes: &[u64]) -> Vec<PathBuf> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let p = PathBuf::from(format!("/tmp/stripe-{name}-{i}.img"));
            sparse_file(&p, *s);
            p
        })
        .collect()
}

fn remove(legs: &[PathBuf]) {
    for l in legs {
        let _ = std::fs::remove_file(l);
    }
}

/// fio randrw + crc32c verify with block sizes from 4k to 256k (so most
/// requests cross chunk boundaries, at offsets unaligned to the chunk),
/// iodepth 32, two jobs on their own halves of `span` bytes, one per CPU.
fn fio_verify_mixed(dev: &str, span: u64) {
    let out = fio_verify_halves("stripe", dev, span, &["--rw=randrw", "--bsrange=4k-256k", "--iodepth=32"]);
    for l in out.lines().filter(|l| l.contains("issued rwts")) {
        eprintln!("fio {dev}: {}", l.trim());
    }
}

/// The device's bytes with `[off, off + len)` zeroed.
fn zeroed(mut v: Vec<u8>, off: u64, len: u64) -> Vec<u8> {
    v[off as usize..(off + len) as usize].fill(0);
    v
}

driver_test! {
    /// 2 and 3 legs of unequal sizes, 16 KiB chunks, 2 queues: the size is
    /// legs x the smallest leg in whole chunks; fio randrw + crc32c verify
    /// with 4k-256k blocks at iodepth 32; every chunk of the device is on
    /// leg k % N at (k / N) * chunk; blkdiscard -z and blkdiscard of ranges
    /// that start and end inside chunks zero exactly those bytes, on the
    /// legs too (the legs are on tmpfs: WRITE_ZEROES falls back to a hole).
    fn stripe_fio_verify_2_and_3_legs_data_is_on_its_legs() {
        let chunk = 16 * K;
        for n in [2usize, 3] {
            // The smallest leg is 17 MiB + 4 KiB: 17 MiB of it is used.
            let sizes = [20 * M, 17 * M + 4096, 18 * M];
            let legs = legs("fio", &sizes[..n]);
            let args = stripe_args(&legs, &["--chunk", "16K", "--queues", "2", "--depth", "64"]);
            let d = Daemon::start("ublk", &args);
            let dev = d.dev.to_str().unwrap().to_string();
            let size = n as u64 * 17 * M;
            assert_eq!(run_ok("blockdev", &["--getsize64", &dev]).trim(), size.to_string(), "{n} legs");
            fio_verify_mixed(&dev, 8 * M);
            let before = read_device(&dev, size);
            assert_striped(&before, &legs, chunk, &format!("{n} legs after fio"));

            // WRITE_ZEROES, then DISCARD, each over ranges that start and
            // end inside chunks and cross every leg.
            let (zo, zl) = (3 * chunk + 4096, 5 * chunk + 8192);
            run_ok("blkdiscard", &["-z", "-o", &zo.to_string(), "-l", &zl.to_string(), &dev]);
            let want = zeroed(before, zo, zl);
            let after = read_device(&dev, size);
            assert!(after == want, "{n} legs: blkdiscard -z of [{zo}, +{zl}) did not zero exactly that range");
            assert_striped(&after, &legs, chunk, &format!("{n} legs after write-zeroes"));
            let (o, l) = (20 * chunk + 12 * K, 7 * chunk);
            run_ok("blkdiscard", &["-o", &o.to_string(), "-l", &l.to_string(), &dev]);
            let want = zeroed(want, o, l);
            let after = read_device(&dev, size);
            assert!(after == want, "{n} legs: blkdiscard of [{o}, +{l}) did not zero exactly that range");
            assert_striped(&after, &legs, chunk, &format!("{n} legs after discard"));

            let (st, out) = d.terminate();
            assert!(st.success(), "ublk add -t stripe ({n} legs) exited with {st}");
            eprintln!("{out}");
            let per_q = queue_requests(&out);
            assert_eq!(per_q.len(), 2.min(nproc()), "per-queue report: {out}");
            for (q, r) in &per_q {
                assert!(*r > 0, "{n} legs: queue {q} served nothing: {out}");
            }
            assert_eq!(queue_sum(&out, "errors"), 0, "{n} legs: requests failed: {out}");
            assert!(queue_sum(&out, "write_zeroes") > 0 && queue_sum(&out, "discards") > 0, "{n} legs: {out}");
            assert_no_devices();
            remove(&legs);
        }
        delete_all_devices();
        assert_no_devices();
    }
}

/// The files the ext4 test writes.
fn tree() -> FileTree {
    FileTree::new(3, &[0, 1, 4096, 70_000, 1_000_001], 100)
}

driver_test! {
    /// 3 legs, the default 64 KiB chunk: mkfs.ext4, a tree of files, umount,
    /// e2fsck -fn clean, remount and contents checked; the journal's
    /// flushes reach the target as FLUSH (fdatasync of every leg); a new
    /// daemon on the same legs sees the same filesystem.
    fn stripe_ext4_fsck_remount_and_restart() {
        let legs = legs("ext4", &[24 * M, 24 * M, 24 * M]);
        let args = stripe_args(&legs, &["--queues", "2"]);
        let mnt = PathBuf::from("/tmp/stripe-ext4-mnt");
        let tree = tree();
        let d = Daemon::start("ublk", &args);
        let dev = d.dev.to_str().unwrap().to_string();
        assert_eq!(run_ok("blockdev", &["--getsize64", &dev]).trim(), (72 * M).to_string());
        ext4_write_check(&dev, &mnt, &tree, "stripe");
        // The filesystem is on the legs in RAID-0 order.
        let bytes = read_device(&dev, 72 * M);
        assert_striped(&bytes, &legs, 64 * K, "ext4 on 3 legs");
        let (st, out) = d.terminate();
        assert!(st.success(), "stripe daemon exited with {st}");
        eprintln!("{out}");
        assert_eq!(queue_sum(&out, "errors"), 0, "requests failed: {out}");
        assert!(queue_sum(&out, "discards") > 0, "mkfs.ext4 sent no DISCARD: {out}");
        assert!(queue_sum(&out, "flushes") > 0, "no FLUSH reached the target (volatile cache not declared?): {out}");
        assert_no_devices();

        let d = Daemon::start("ublk", &args);
        let dev = d.dev.to_str().unwrap().to_string();
        ext4_check(&dev, &mnt, &tree, "stripe after daemon restart");
        let (st, _) = d.terminate();
        assert!(st.success(), "restarted stripe daemon exited with {st}");
        remove(&legs);
        delete_all_devices();
        assert_no_devices();
    }
}

/// A tmpfs of `size` bytes mounted at `dir`, unmounted on drop.
struct TinyFs(PathBuf);

impl TinyFs {
    fn new(dir: &str, size: &str) -> TinyFs {
        let p = PathBuf::from(dir);
        std::fs::create_dir_all(&p).unwrap();
        run_ok("mount", &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", dir]);
        TinyFs(p)
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = run("umount", &[self.0.to_str().unwrap()]);
        let _ = std::fs::remove_dir(&self.0);
    }
}

driver_test! {
    /// Leg 1 is a sparse file on a tiny tmpfs, filled up with another file:
    /// a write that spans chunks on both legs fails with ENOSPC (the errno
    /// of the failing piece, not a generic EIO), while reads of both legs,
    /// writes to leg 0 and rewrites of leg 1's allocated chunks succeed;
    /// once space is freed the same write succeeds. The daemon keeps
    /// serving throughout and stops cleanly.
    fn stripe_full_leg_fails_its_requests_device_keeps_serving() {
        let chunk = 64 * K;
        let tiny = TinyFs::new("/tmp/stripe-tiny", "1M");
        let good = PathBuf::from("/tmp/stripe-full-0.img");
        sparse_file(&good, 16 * M);
        let bad = tiny.0.join("leg1.img");
        sparse_file(&bad, 16 * M);
        let legs = vec![good.clone(), bad.clone()];
        let d = Daemon::start("ublk", &stripe_args(&legs, &["--chunk", "64K"]));
        let dev = d.dev.to_str().unwrap().to_string();

        // Chunks 0-3 written while there is room: 128 KiB of leg 1 allocated.
        let first = pattern(4 * chunk as usize, 11);
        let (st, err) = dd_write(&dev, 0, &first, "first");
        assert!(st.success(), "writing the first chunks: {err}");
        // Fill the tmpfs: dd stops at ENOSPC.
        let filler = tiny.0.join("filler");
        let (st, _, err) = run("dd", &["if=/dev/zero", &format!("of={}", filler.display()), "bs=4k", "status=none"]);
        assert!(!st.success() && err.contains("No space left"), "filling the tmpfs: {st} {err}");

        // Chunks 8-9 (8 on leg 0, 9 on leg 1 at a hole): leg 1 cannot grow.
        let span = pattern(2 * chunk as usize, 12);
        let (st, err) = dd_write(&dev, 8 * chunk, &span, "span");
        eprintln!("write across both legs with leg 1 full: {st}, {}", err.trim());
        assert!(!st.success(), "a write needing space on the full leg succeeded");
        assert!(err.contains("No space left on device"), "the write did not fail with ENOSPC: {err}");

        // The device still serves: what was written reads back...
        assert!(dd_read(&dev, 0, 4 * chunk) == first, "data written before the failure changed");
        // ...a write to leg 0 alone (chunk 10) succeeds...
        let on_good = pattern(chunk as usize, 13);
        let (st, err) = dd_write(&dev, 10 * chunk, &on_good, "good");
        assert!(st.success(), "a write to the healthy leg failed: {err}");
        assert!(dd_read(&dev, 10 * chunk, chunk) == on_good);
        // ...and so does a rewrite of leg 1's allocated chunk 1.
        let again = pattern(chunk as usize, 14);
        let (st, err) = dd_write(&dev, chunk, &again, "again");
        assert!(st.success(), "rewriting allocated chunk 1 on the full leg failed: {err}");
        assert!(dd_read(&dev, chunk, chunk) == again);
        assert!(read_range(&bad, 0, chunk as usize) == again, "chunk 1 is not at offset 0 of leg 1");

        // Room again: the failed write now succeeds, striped.
        std::fs::remove_file(&filler).unwrap();
        let (st, err) = dd_write(&dev, 8 * chunk, &span, "span2");
        assert!(st.success(), "the write failed again after space was freed: {err}");
        assert!(dd_read(&dev, 8 * chunk, 2 * chunk) == span);
        assert!(read_range(&good, 4 * chunk, chunk as usize) == span[..chunk as usize], "chunk 8 is not on leg 0 at 4 chunks");
        assert!(read_range(&bad, 4 * chunk, chunk as usize) == span[chunk as usize..], "chunk 9 is not on leg 1 at 4 chunks");

        assert!(d.child.id() > 0 && ublk_cli::config::pid_alive(d.child.id()), "the daemon died");
        let (st, out) = d.terminate();
        assert!(st.success(), "stripe daemon exited with {st}");
        eprintln!("{out}");
        assert_eq!(queue_sum(&out, "errors"), 1, "one request (the spanning write) failed: {out}");
        drop(tiny);
        let _ = std::fs::remove_file(&good);
        delete_all_devices();
        assert_no_devices();
    }
}

driver_test! {
    /// --data-path user-copy: on kernels with UBLK_F_USER_COPY (6.5+), fio
    /// verify across chunks and the layout on the legs, as with copy; on
    /// 6.1 `ublk add` refuses with one line naming the flag and the kernel
    /// that has it, and no device is made.
    fn stripe_user_copy_or_clear_refusal() {
        let legs = legs("uc", &[16 * M, 16 * M, 16 * M]);
        let args = stripe_args(&legs, &["--chunk", "16K", "--queues", "2", "--data-path", "user-copy"]);
        let has = kernel_has(ublk::sys::abi::UBLK_F_USER_COPY);
        assert_eq!(has, kernel_version() >= (6, 5), "kernel {} and UBLK_F_USER_COPY", kernel_release());
        if !has {
            let (st, out, err) = ublk(&args);
            eprintln!("{}", err.trim());
            assert_eq!(st.code(), Some(1), "ublk add --data-path user-copy on {}: {st}\n{out}\n{err}", kernel_release());
            let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
            assert_eq!(lines.len(), 1, "{err}");
            assert!(lines[0].starts_with("ublk: error: ") && lines[0].contains("UBLK_F_USER_COPY") && lines[0].contains("6.5"), "{err}");
            assert!(out.trim().is_empty(), "{out}");
            assert_no_devices();
            remove(&legs);
            return;
        }
        let d = Daemon::start("ublk", &args);
        let dev = d.dev.to_str().unwrap().to_string();
        let id = d.id();
        let flags = ublk::Control::open().unwrap().get_dev_info(id).unwrap().flags;
        assert!(flags & ublk::sys::abi::UBLK_F_USER_COPY != 0, "device {id} has no UBLK_F_USER_COPY: {flags:#x}");
        fio_verify_mixed(&dev, 8 * M);
        assert_striped(&read_device(&dev, 48 * M), &legs, 16 * K, "user copy, 3 legs");
        let (st, out) = d.terminate();
        assert!(st.success(), "stripe daemon exited with {st}");
        assert_eq!(queue_sum(&out, "errors"), 0, "requests failed: {out}");
        remove(&legs);
        delete_all_devices();
        assert_no_devices();
    }
}

driver_test! {
    /// --recovery: the daemon is SIGKILLed, `ublk recover` serves the device
    /// again from its saved configuration (legs and chunk), with the data
    /// written before the kill, and new writes land on the right legs.
    fn stripe_recover_after_sigkill() {
        let legs = legs("rec", &[8 * M, 8 * M]);
        let mut d = Daemon::start("ublk", &stripe_args(&legs, &["--chunk", "32K", "--recovery"]));
        let dev = d.dev.to_str().unwrap().to_string();
        let id = d.id();
        let cfg = ublk_cli::config::DeviceConfig::load(id).unwrap().expect("saved configuration");
        let s = cfg.stripe.clone().expect("stripe legs in the saved configuration");
        assert_eq!((cfg.target.as_str(), s.chunk, s.legs.clone()), ("stripe", 32 * 1024, legs.clone()));
        let pat = pattern(1 << 20, 21);
        let (st, err) = dd_write(&dev, 256 * K, &pat, "rec");
        assert!(st.success(), "{err}");
        run_ok("sync", &[]);
        d.signal(libc::SIGKILL);
        let _ = d.child.wait();
        let r = Daemon::start("ublk", &["recover", "-n", &id.to_string()]);
        let mut c = ublk::Control::open().unwrap();
        assert_eq!(ublk::ctrl::state_name(c.get_dev_info(id).unwrap().state), "LIVE");
        assert!(dd_read(&dev, 256 * K, 1 << 20) == pat, "data written before the kill is not there after recovery");
        let more = pattern(128 << 10, 22);
        let (st, err) = dd_write(&dev, 0, &more, "rec2");
        assert!(st.success(), "writing to the recovered device: {err}");
        assert_striped(&read_device(&dev, 16 * M), &legs, 32 * K, "recovered stripe");
        assert!(read_range(&legs[1], 0, 32 << 10) == more[32 << 10..64 << 10], "chunk 1 is not at the start of leg 1");
        let (st, _) = r.terminate();
        assert!(st.success(), "recovered daemon exited with {st}");
        remove(&legs);
        delete_all_devices();
        assert_no_devices();
    }
}

/// Runs `ublk args`, expects exit 1 with one error line containing `want`.
fn expect_error(args: &[&str], want: &str) {
    let (st, out, err) = ublk(args);
    eprintln!("ublk {args:?}: {}", err.trim());
    assert_eq!(st.code(), Some(1), "ublk {args:?}: {st}\n{out}\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "ublk {args:?}: expected one error line, got:\n{err}");
    assert!(lines[0].starts_with("ublk: error: "), "{err}");
    assert!(lines[0].to_lowercase().contains(&want.to_lowercase()), "ublk {args:?}: error does not mention {want:?}: {err}");
}

driver_test! {
    /// Bad stripes are refused before any device is made: one leg, a chunk
    /// that is not a power of two or out of range, a missing leg, a leg
    /// smaller than a chunk, one file twice, --size beyond the stripe,
    /// --chunk for another target.
    fn stripe_bad_input_is_refused() {
        let legs = legs("bad", &[4 * M, 4 * M]);
        let (a, b) = (legs[0].to_str().unwrap(), legs[1].to_str().unwrap());
        let tiny = PathBuf::from("/tmp/stripe-bad-tiny.img");
        sparse_file(&tiny, 8 * K);
        expect_error(&["add", "-t", "stripe", "--file", a], "at least two legs");
        expect_error(&["add", "-t", "stripe", "--file", a, "--file", b, "--chunk", "12K"], "power of two");
        expect_error(&["add", "-t", "stripe", "--file", a, "--file", b, "--chunk", "2M"], "power of two");
        expect_error(&["add", "-t", "stripe", "--file", a, "--file", b, "--chunk", "2K"], "power of two");
        expect_error(&["add", "-t", "stripe", "--file", a, "--file", "/tmp/stripe-no-such-leg"], "leg 1");
        expect_error(&["add", "-t", "stripe", "--file", a, "--file", tiny.to_str().unwrap()], "less than one 65536-byte chunk");
        expect_error(&["add", "-t", "stripe", "--file", a, "--file", b, "--file", a], "same file as leg 0");
        expect_error(&["add", "-t", "stripe", "--file", a, "--file", b, "--size", "9M"], "larger than the stripe");
        expect_error(&["add", "-t", "loop", "--file", a, "--chunk", "64K"], "--chunk is for -t stripe");
        expect_error(&["add", "-t", "loop", "--file", a, "--file", b], "one --file");
        assert_no_devices();
        // And a good one, for contrast: 2 x 4 MiB.
        let d = Daemon::start("ublk", &stripe_args(&legs, &[]));
        assert_eq!(run_ok("blockdev", &["--getsize64", d.dev.to_str().unwrap()]).trim(), (8 * M).to_string());
        let (st, _) = d.terminate();
        assert!(st.success());
        let _ = std::fs::remove_file(&tiny);
        remove(&legs);
        delete_all_devices();
        assert_no_devices();
    }
}

/// A memory-backed null_blk disk whose every request completes
/// `latency_ms` after it arrives (a timer, `irqmode=2`); removed on drop.
fn slow_nullb(name: &str, mb: u64, latency_ms: u64) -> Nullb {
    Nullb::new(name, mb, 512, &[("irqmode", "2".into()), ("completion_nsec", (latency_ms * 1_000_000).to_string())])
}

driver_test! {
    /// Legs that are block devices, opened with O_DIRECT (--direct): two
    /// null_blk disks that complete every request 300 ms after it arrives.
    /// A 64 KiB request over 4 KiB chunks is 16 pieces; run one after
    /// another they would take 4.8 s, run at once about 300 ms: each such
    /// read and write through the device (two, at different offsets) must
    /// take well under half the serial time. The data is on the disks in
    /// RAID-0 order, and WRITE_ZEROES zeroes the disks' ranges.
    fn stripe_block_device_legs_pieces_run_concurrently() {
        const LATENCY_MS: u64 = 300;
        let a = slow_nullb("stripe_slow_a", 16, LATENCY_MS);
        let b = slow_nullb("stripe_slow_b", 16, LATENCY_MS);
        let legs = vec![a.dev.clone(), b.dev.clone()];
        let d = Daemon::start("ublk", &stripe_args(&legs, &["--chunk", "4K", "--direct"]));
        let dev = d.dev.to_str().unwrap().to_string();
        assert_eq!(run_ok("blockdev", &["--getsize64", &dev]).trim(), (32 * M).to_string());
        let serial = Duration::from_millis(16 * LATENCY_MS);
        for i in 0..2u64 {
            let off = (i * 3 + 1) * 64 * K;
            let data = pattern(64 << 10, 30 + i);
            let t = Instant::now();
            let (st, err) = dd_write(&dev, off, &data, "slow");
            let tw = t.elapsed();
            assert!(st.success(), "write at {off}: {err}");
            let t = Instant::now();
            let back = dd_read(&dev, off, 64 * K);
            let tr = t.elapsed();
            eprintln!("64 KiB = 16 pieces of 4 KiB at {off}: write {tw:?}, read {tr:?} (serial: at least {serial:?})");
            assert!(back == data, "64 KiB at {off} read back differently");
            assert!(tw < serial / 2 && tr < serial / 2, "pieces ran one after another: write {tw:?}, read {tr:?}, serial {serial:?}");
            // Chunk k of the device is on disk k % 2 at (k / 2) * 4 KiB: the
            // 16 chunks from k0 (even) are 8 in a row on each disk.
            let k0 = off / (4 * K);
            let on_legs = [0, 1].map(|l| dd_read(legs[l].to_str().unwrap(), k0 / 2 * 4 * K, 32 * K));
            for j in 0..16usize {
                let (k, c) = (k0 + j as u64, 4 * K as usize);
                let on_leg = &on_legs[j % 2][j / 2 * c..(j / 2 + 1) * c];
                assert!(on_leg == &data[j * c..(j + 1) * c], "chunk {k} is not on disk {} at {}", k % 2, (k / 2) * 4 * K);
            }
        }
        // WRITE_ZEROES on block-device legs (FALLOC_FL_ZERO_RANGE on each
        // disk): the first 64 KiB written above read back as zeros, on the
        // disks too, and the rest of that write is untouched.
        run_ok("blkdiscard", &["-z", "-o", &(64 * K).to_string(), "-l", &(48 * K).to_string(), &dev]);
        let back = dd_read(&dev, 64 * K, 64 * K);
        assert!(back[..48 << 10].iter().all(|b| *b == 0), "write-zeroes on block-device legs left data");
        assert!(back[48 << 10..] == pattern(64 << 10, 30)[48 << 10..], "write-zeroes went past its range");
        for leg in &legs {
            assert!(dd_read(leg.to_str().unwrap(), 32 * K, 24 * K).iter().all(|b| *b == 0), "{} not zeroed", leg.display());
        }
        let (st, out) = d.terminate();
        assert!(st.success(), "stripe daemon exited with {st}");
        assert_eq!(queue_sum(&out, "errors"), 0, "requests failed: {out}");
        assert!(queue_sum(&out, "write_zeroes") > 0, "no WRITE_ZEROES reached the target: {out}");
        drop((a, b));
        delete_all_devices();
        assert_no_devices();
    }
}

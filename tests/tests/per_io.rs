//! Per-I/O threads (`--threads-per-queue N`, `DeviceBuilder::threads_per_queue`):
//! with the kernel's per-I/O daemons (UBLK_F_PER_IO_DAEMON, Linux 6.16+) a
//! queue's tags are shared out over N threads (tag t on thread t % N), each
//! with its own ring, and each tag's requests reach the thread that fetched
//! it. One fio job on one CPU, whose requests all go to one queue, is then
//! served by every thread of that queue (counted per thread). Older kernels
//! refuse N > 1, naming the kernel, and create nothing.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use ublk::aio::{AsyncTarget, Io, QueueContext, QueueTarget};
use ublk::{DeviceBuilder, Errno, IoResult, Op};
use ublk_tests::*;

fn kernel_has_per_io() -> bool {
    ublk::Control::open().unwrap().features().is_some_and(|f| f.contains(ublk::sys::abi::UBLK_F_PER_IO_DAEMON))
}

/// The daemon's queue threads exist, named `ublkN-qQtT`, and together may
/// run on every CPU (one queue's threads are spread, not stacked).
fn assert_threads_spread(d: &Daemon, queues: u16, threads: u16) {
    let id = d.id();
    let mut cpus = BTreeSet::new();
    for q in 0..queues {
        let mut per_queue = BTreeSet::new();
        for t in 0..threads {
            let c = thread_cpus(d.child.id(), &format!("ublk{id}-q{q}t{t}"));
            per_queue.extend(c.iter().copied());
            cpus.extend(c);
        }
        // A queue's threads cover min(threads, CPUs) CPUs.
        assert!(
            per_queue.len() >= usize::from(threads).min(nproc()),
            "the {threads} threads of queue {q} may run only on {per_queue:?} of {} CPUs",
            nproc()
        );
    }
    eprintln!("device {id}: {queues} queues x {threads} threads on CPUs {cpus:?}");
}

/// One fio job pinned to CPU 0: random reads and writes of 4k at depth 32
/// over `size` bytes, with crc32c verify of everything written.
fn fio_one_cpu(dev: &str, size: &str) -> String {
    let out = fio_ok(&[
        "--name=pio",
        "--filename",
        dev,
        "--rw=randrw",
        "--bs=4k",
        "--ioengine=io_uring",
        "--iodepth=32",
        "--direct=1",
        "--numjobs=1",
        "--size",
        size,
        "--cpus_allowed=0",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    ]);
    let line = out.lines().find(|l| l.contains("IOPS=")).unwrap_or("").trim().to_string();
    eprintln!("fio one job on CPU 0, {dev}: {line}");
    out
}

/// Every thread of every queue served requests, and none failed; the
/// per-thread counts.
fn assert_every_thread_served(out: &str, queues: u16, threads: u16, what: &str) -> Vec<(u16, u16, u64)> {
    let per = thread_requests(out);
    eprintln!("{what}: requests per (queue, thread): {per:?}");
    let want: Vec<(u16, u16)> = (0..queues).flat_map(|q| (0..threads).map(move |t| (q, t))).collect();
    assert_eq!(per.iter().map(|&(q, t, _)| (q, t)).collect::<Vec<_>>(), want, "{what}: one line per queue thread:\n{out}");
    for &(q, t, n) in &per {
        assert!(n > 0, "{what}: thread {t} of queue {q} served no request:\n{out}");
    }
    assert_eq!(queue_sum(out, "errors"), 0, "{what}: requests failed:\n{out}");
    assert_eq!(queue_sum(out, "invalid"), 0, "{what}:\n{out}");
    per
}

/// N > 1 on a kernel without per-I/O daemons: refused by the CLI (both
/// binaries) and the library, naming the kernel and the fix; nothing created.
fn assert_refused() {
    let backing = PathBuf::from("/tmp/pio-refused.img");
    sparse_file(&backing, 16 << 20);
    let (st, _, err) = ublk(&["add", "-t", "loop", "--file", backing.to_str().unwrap(), "--threads-per-queue", "2"]);
    assert!(!st.success(), "ublk add --threads-per-queue 2 succeeded on {}", kernel_release());
    assert!(err.contains("6.16") && err.contains("1 thread per queue") && err.contains("PER_IO_DAEMON"), "unclear refusal: {err}");
    eprintln!("ublk add --threads-per-queue 2 on {}: {}", kernel_release(), err.trim());
    assert_no_devices();
    let (st, _, err) = run(bin("ublk-null").to_str().unwrap(), &["--size", "16M", "--threads-per-queue", "4"]);
    assert!(!st.success() && err.contains("6.16"), "ublk-null --threads-per-queue 4: unclear refusal ({st}): {err}");
    assert_no_devices();
    let before = resources();
    let e = DeviceBuilder::new().size(16 << 20).threads_per_queue(2).create().expect_err("threads_per_queue(2) created a device");
    assert!(matches!(e, ublk::Error::Unsupported { .. }) && e.to_string().contains("6.16"), "library refusal: {e}");
    assert_eq!(resources(), before, "the refusal left fds, threads or mappings behind");
    assert_no_devices();
    // One thread per queue is what it always was.
    let d = Daemon::start("ublk", &["add", "-t", "loop", "--file", backing.to_str().unwrap(), "--threads-per-queue", "1"]);
    let (st, out) = d.terminate();
    assert!(st.success(), "--threads-per-queue 1 exited with {st}");
    assert_eq!(thread_requests(&out).iter().map(|&(q, t, _)| (q, t)).collect::<Vec<_>>(), vec![(0, 0)], "{out}");
    let _ = std::fs::remove_file(&backing);
    assert_no_devices();
}

driver_test! {
    /// One queue, 4 threads: one fio job pinned to CPU 0 (randrw 4k, depth
    /// 32, crc32c verify) through a loop device (the kernel's default data
    /// path, zero copy with its own registration on 7.x) is served by all 4
    /// threads, which are spread over the CPUs; then the same through a
    /// ramdisk (copy path, a sync target) with 3 threads, which share 128
    /// tags unevenly, and through ublk-null with 2. On kernels without
    /// UBLK_F_PER_IO_DAEMON: refused.
    fn pio_one_fio_job_on_one_cpu_is_served_by_every_thread() {
        if !kernel_has_per_io() {
            assert_refused();
            skipped("several threads per queue need UBLK_F_PER_IO_DAEMON (Linux 6.16+): refusal checked");
            return;
        }
        let backing = PathBuf::from("/tmp/pio-loop.img");
        sparse_file(&backing, 64 << 20);
        let d = Daemon::start(
            "ublk",
            &["add", "-t", "loop", "--file", backing.to_str().unwrap(), "--queues", "1", "--depth", "128", "--threads-per-queue", "4"],
        );
        assert_threads_spread(&d, 1, 4);
        let dev = d.dev.to_str().unwrap().to_string();
        fio_one_cpu(&dev, "8M");
        let (st, out) = d.terminate();
        assert!(st.success(), "loop with 4 threads per queue exited with {st}");
        assert_every_thread_served(&out, 1, 4, "loop, 1 queue x 4 threads");
        assert_no_devices();
        let _ = std::fs::remove_file(&backing);

        // Copy (a sync target) and user copy (async, each thread's pread
        // and pwrite of /dev/ublkcN).
        for dp in ["copy", "user-copy"] {
            let d = Daemon::start("ublk", &["add", "-t", "ramdisk", "--size", "32M", "--threads-per-queue", "3", "--data-path", dp]);
            assert_threads_spread(&d, 1, 3);
            let dev = d.dev.to_str().unwrap().to_string();
            fio_one_cpu(&dev, "8M");
            let (st, out) = d.terminate();
            assert!(st.success(), "ramdisk {dp} with 3 threads per queue exited with {st}");
            assert_every_thread_served(&out, 1, 3, &format!("ramdisk {dp}, 1 queue x 3 threads"));
            assert_no_devices();
        }

        // ublk-null takes the option too (no data: random reads only).
        let d = Daemon::start("ublk-null", &["--size", "64M", "--threads-per-queue", "2"]);
        assert_threads_spread(&d, 1, 2);
        let dev = d.dev.to_str().unwrap().to_string();
        fio_ok(&["--name=pio-null", "--filename", &dev, "--rw=randread", "--bs=4k", "--ioengine=io_uring", "--iodepth=32", "--direct=1", "--size=64M", "--io_size=4M", "--cpus_allowed=0"]);
        let (st, out) = d.terminate();
        assert!(st.success(), "ublk-null with 2 threads per queue exited with {st}");
        assert_every_thread_served(&out, 1, 2, "ublk-null, 1 queue x 2 threads");
        assert_no_devices();
    }
}

/// An async target that checks, for every request, that it runs on the
/// thread that made its queue object and that its tag is that thread's
/// (t % threads == thread); it answers reads with the length and fails
/// nothing.
struct Checker {
    violations: AtomicU64,
    made: Mutex<Vec<(u16, u16, u16)>>,
}

struct CheckerQueue<'a> {
    c: &'a Checker,
    thread: u16,
    threads: u16,
    tid: ThreadId,
    served: Cell<u64>,
}

impl AsyncTarget for Checker {
    type Queue<'a> = CheckerQueue<'a>;
    fn queue(&self, q: &QueueContext) -> std::io::Result<CheckerQueue<'_>> {
        self.made.lock().unwrap().push((q.q_id, q.thread, q.threads));
        Ok(CheckerQueue { c: self, thread: q.thread, threads: q.threads, tid: std::thread::current().id(), served: Cell::new(0) })
    }
    fn needs_data(&self) -> bool {
        false
    }
}

impl QueueTarget for CheckerQueue<'_> {
    async fn handle(&self, io: Io<'_>) -> IoResult {
        let req = *io.request();
        if req.tag % self.threads != self.thread || std::thread::current().id() != self.tid {
            self.c.violations.fetch_add(1, Ordering::Relaxed);
        }
        self.served.set(self.served.get() + 1);
        match req.op {
            Op::Read | Op::Write => Ok(req.len() as u32),
            Op::Flush => Ok(0),
            _ => Err(Errno::EOPNOTSUPP),
        }
    }
}

driver_test! {
    /// The library: `threads_per_queue(4)` on one queue makes 4 target
    /// objects (QueueContext thread 0..4 of 4), every request runs on the
    /// thread that made its object and carries one of that thread's tags,
    /// `serve_async` returns one count per thread, each non-zero after one
    /// fio job on CPU 0; nothing (fd, thread, mapping) is left after the
    /// device is gone. 2 queues x 2 threads likewise. Refused without
    /// per-I/O daemons.
    fn pio_library_tags_stay_on_their_threads() {
        if !kernel_has_per_io() {
            let e = DeviceBuilder::new().size(16 << 20).threads_per_queue(4).create().expect_err("created");
            assert!(e.to_string().contains("6.16"), "{e}");
            assert_no_devices();
            skipped("several threads per queue need UBLK_F_PER_IO_DAEMON (Linux 6.16+): refusal checked");
            return;
        }
        // More threads than tags: refused before ADD_DEV.
        let e = DeviceBuilder::new().depth(2).threads_per_queue(3).create().expect_err("3 threads for 2 tags");
        assert!(e.to_string().contains("threads"), "{e}");
        assert_no_devices();
        // Warm-up: the first threads leave their stacks in glibc's cache and
        // their malloc arenas behind, which later threads reuse.
        serve_checked(1, 4, false);
        serve_checked(2, 2, false);
        let before = resources();
        for (queues, threads) in [(1u16, 4u16), (2, 2)] {
            let (stats, mut made, violations) = serve_checked(queues, threads, true);
            made.sort();
            let want: Vec<(u16, u16, u16)> = (0..queues).flat_map(|q| (0..threads).map(move |t| (q, t, threads))).collect();
            assert_eq!(made, want, "target objects made per (queue, thread, threads)");
            assert_eq!(violations, 0, "requests ran on another thread, or with another thread's tag");
            let per: Vec<(u16, u16, u64)> = stats.iter().map(|s| (s.q_id, s.thread, s.requests())).collect();
            eprintln!("{queues} queues x {threads} threads: requests per (queue, thread): {per:?}");
            assert_eq!(per.iter().map(|&(q, t, _)| (q, t)).collect::<Vec<_>>(), want.iter().map(|&(q, t, _)| (q, t)).collect::<Vec<_>>());
            // The kernel sends one CPU's requests to its queue; with 2 queues
            // on 1 CPU only queue 0 would get any.
            for &(q, t, n) in &per {
                if usize::from(q) < nproc() {
                    assert!(n > 0, "thread {t} of queue {q} served nothing: {per:?}");
                }
            }
            assert!(stats.iter().all(|s| s.errors == 0 && s.invalid == 0), "{stats:?}");
            assert_no_devices();
        }
        // io_uring's workers linger a moment after the rings close.
        let t0 = Instant::now();
        while resources() != before && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(resources(), before, "devices with several threads per queue left fds, threads or mappings behind");
    }
}

/// Creates and serves a device of `queues` x `threads` with a [`Checker`],
/// with one fio job per queue on that queue's CPU if `fio` (else it stops
/// at once); the stats, the (queue, thread, threads) of the target objects
/// made, and the requests seen on a wrong thread.
fn serve_checked(queues: u16, threads: u16, fio: bool) -> (Vec<ublk::QueueStats>, Vec<(u16, u16, u16)>, u64) {
    let c = Checker { violations: AtomicU64::new(0), made: Mutex::new(Vec::new()) };
    let dev = DeviceBuilder::new().queues(queues).depth(64).size(64 << 20).threads_per_queue(threads).create().unwrap();
    assert!(dev.info().flags & ublk::sys::abi::UBLK_F_PER_IO_DAEMON != 0, "ADD_DEV dropped PER_IO_DAEMON");
    let stats = dev
        .serve_async(&c, |dev, stop| {
            let p = dev.block_path();
            let p = p.to_str().unwrap();
            for q in (0..queues).filter(|_| fio) {
                // One job on one CPU: (with 2 queues) CPU q submits to queue q.
                let cpu = format!("--cpus_allowed={}", usize::from(q) % nproc());
                fio_ok(&[
                    "--name=lib",
                    "--filename",
                    p,
                    "--rw=randread",
                    "--bs=4k",
                    "--ioengine=io_uring",
                    "--iodepth=32",
                    "--direct=1",
                    "--size=32M",
                    "--io_size=8M",
                    &cpu,
                ]);
            }
            stop.stop();
        })
        .unwrap();
    let made = c.made.into_inner().unwrap();
    (stats, made, c.violations.into_inner())
}

driver_test! {
    /// loop with 2 queues x 2 threads: fio crc32c verify (2 jobs, one per
    /// CPU and so one per queue; randrw 4k depth 32, then 4k-256k writes),
    /// ext4 + e2fsck, every thread of every queue served requests; then fio
    /// verify on the zero-copy, user-copy and copy data paths.
    fn pio_loop_two_queues_two_threads_verify_and_ext4() {
        if !kernel_has_per_io() {
            assert_refused();
            skipped("several threads per queue need UBLK_F_PER_IO_DAEMON (Linux 6.16+): refusal checked");
            return;
        }
        let backing = PathBuf::from("/tmp/pio-loop2.img");
        sparse_file(&backing, 64 << 20);
        let d = Daemon::start(
            "ublk",
            &["add", "-t", "loop", "--file", backing.to_str().unwrap(), "--queues", "2", "--depth", "64", "--threads-per-queue", "2"],
        );
        let queues = u16::try_from(nproc().min(2)).unwrap();
        assert_threads_spread(&d, queues, 2);
        let dev = d.dev.to_str().unwrap().to_string();
        fio_verify_halves("pio", &dev, 8 << 20, &["--rw=randrw", "--bs=4k", "--iodepth=32"]);
        fio_verify_halves("pio-big", &dev, 8 << 20, &["--rw=randwrite", "--bsrange=4k-256k", "--iodepth=16"]);
        ext4_round_trip(&dev, "loop 2 queues x 2 threads");
        let (st, out) = d.terminate();
        assert!(st.success(), "loop 2x2 exited with {st}");
        assert_every_thread_served(&out, queues, 2, "loop, 2 queues x 2 threads");
        assert_no_devices();
        // The other data paths: each thread registers its own requests'
        // pages (zero-copy), copies with its own pread/pwrite (user-copy),
        // or the kernel copies into the thread's tags' buffers (copy).
        for dp in ["zero-copy", "user-copy", "copy"] {
            let d = Daemon::start(
                "ublk",
                &["add", "-t", "loop", "--file", backing.to_str().unwrap(), "--queues", "2", "--depth", "64", "--threads-per-queue", "2", "--data-path", dp],
            );
            let dev = d.dev.to_str().unwrap().to_string();
            fio_verify_halves("pio-dp", &dev, 8 << 20, &["--rw=randrw", "--bs=4k", "--iodepth=32"]);
            let (st, out) = d.terminate();
            assert!(st.success(), "loop 2x2 --data-path {dp} exited with {st}");
            assert_every_thread_served(&out, queues, 2, &format!("loop 2x2 --data-path {dp}"));
            if dp == "zero-copy" {
                assert_eq!(queue_sum(&out, "buf_regs"), queue_sum(&out, "reads") + queue_sum(&out, "writes"), "{out}");
            }
            assert_no_devices();
        }
        let _ = std::fs::remove_file(&backing);
    }
}

driver_test! {
    /// kill -9 of a loop daemon with 2 queues x 2 threads while fio writes
    /// with verify (--recovery-reissue); `ublk recover` serves the device
    /// again with 2 threads per queue (kept in the saved configuration);
    /// fio finishes and verifies, a verify-only pass on the device and on
    /// the backing file finds every block, and every thread of the
    /// recovered daemon served requests.
    fn pio_recovery_sigkill_under_fio_with_threads() {
        if !kernel_has_per_io() {
            assert_refused();
            skipped("several threads per queue need UBLK_F_PER_IO_DAEMON (Linux 6.16+): refusal checked");
            return;
        }
        let backing = PathBuf::from("/tmp/pio-rec.img");
        sparse_file(&backing, 64 << 20);
        let d = Daemon::start(
            "ublk",
            &["add", "-t", "loop", "--file", backing.to_str().unwrap(), "--queues", "2", "--threads-per-queue", "2", "--recovery-reissue"],
        );
        let id = d.id();
        let queues = u16::try_from(nproc().min(2)).unwrap();
        let cfg = ublk_cli::config::DeviceConfig::load(id).unwrap().expect("saved configuration");
        assert_eq!(cfg.threads_per_queue, 2, "{cfg:?}");
        let dev = d.dev.to_str().unwrap().to_string();
        let log = PathBuf::from("/tmp/pio-rec.fio");
        let mut fio = spawn_fio(&fio_rate_verify_args(&dev, 0, true, &["--do_verify=1"]), &log);
        kill_mid_fio(d, &mut fio);
        let r = recover(id);
        assert_threads_spread(&r, queues, 2);
        finish_fio(&mut fio, &log, "the recovery");
        verify_only_all(&dev, true, "verify_only on the recovered device");
        let (st, qout) = r.terminate();
        assert!(st.success(), "recovered daemon exited with {st}");
        assert_every_thread_served(&qout, queues, 2, "recovered loop, 2 queues x 2 threads");
        assert_no_devices();
        verify_only_all(backing.to_str().unwrap(), false, "verify_only on the backing file");
        let _ = std::fs::remove_file(&backing);
        let _ = std::fs::remove_file(&log);
        delete_all_devices();
        assert_no_devices();
    }
}

//! Negative tests at the raw SQE level, the FETCH rules: each trap a ublk
//! server can fall into with correct SQEs sent from the wrong thread or at
//! the wrong time, reproduced against the real driver, with the kernel's
//! actual answer asserted per kernel generation: FETCHes and commits from
//! two threads and where the I/O then goes (c, c2), a tag fetched twice (f),
//! and START_DEV with a tag never fetched (h). What one command's bytes must
//! hold is in traps_sqe.rs.
//!
//! The safe API makes these mistakes impossible, so these tests bypass it on
//! purpose: `ublk::Control` creates and deletes the devices, but every io
//! command is a hand-built 64- or 128-byte SQE (bytes, not builders) pushed
//! into an `io_uring` of our own (traps_util).
//!
//! Each answer is printed as `TRAP <name> kernel <release>: <answer>`, where
//! the answer is an errno name or `accepted` (the FETCH is parked in the
//! kernel: no CQE until a request or an abort). Every test collects all its
//! observations before asserting, so a failure lists everything seen.
//! Run with `--nocapture` to see the lines of passing tests.

mod traps_util;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use io_uring::types;
use traps_util::*;
use ublk::{sys, Error};
use ublk_tests::*;

// ---------------------------------------------------------------- (c)

/// A thread with its own 64-byte ring that submits what it is sent.
fn submitter(rx: mpsc::Receiver<Option<[u8; 64]>>, tx: mpsc::Sender<Ans>) {
    let mut r = ring64();
    while let Ok(Some(b)) = rx.recv() {
        let _ = tx.send(submit(&mut r, entry64(b)));
    }
    // The ring is closed here, after the test's STOP_DEV.
}

driver_test! {
    /// (c) The thread rule. Thread A fetches tag 0 and thread B fetches tag 1
    /// (the queue's last): both FETCHes are accepted on every kernel. Then:
    /// * 6.1-6.15 bind the whole queue to B, the task of its last FETCH
    ///   (`ubq->ubq_daemon`, `ublk_mark_io_ready`): A is refused (-EINVAL)
    ///   even for its own tag, and requests for A's tag would be failed;
    /// * 6.16+ bind each tag to the task that fetched it (`io->task`): B is
    ///   refused (-EINVAL) for tag 0, A passes the task check and only meets
    ///   "no request pending" (-EBUSY).
    fn traps_c_fetch_from_two_threads() {
        let mut dev = TrapDev::new(2);
        let mut obs = Obs::new("traps_c");
        let g = gen();
        let (fetch, commit) = (dev.fetch_op(), dev.commit_op());
        let (fd, b0, b1) = (dev.fd(), dev.buf(0), dev.buf(1));
        let io = |op: u32, tag: u16, addr: u64| sqe::<64>(fd, op, 0, &[(48, &io_payload(0, tag, 0, addr))]);
        std::thread::scope(|s| {
            let (a_tx, a_in) = mpsc::channel();
            let (a_out, a_rx) = mpsc::channel();
            let (b_tx, b_in) = mpsc::channel();
            let (b_out, b_rx) = mpsc::channel();
            s.spawn(move || submitter(a_in, a_out));
            s.spawn(move || submitter(b_in, b_out));
            let on = |tx: &mpsc::Sender<Option<[u8; 64]>>, rx: &mpsc::Receiver<Ans>, b: [u8; 64]| {
                tx.send(Some(b)).unwrap();
                rx.recv().unwrap()
            };
            obs.check("c_A_fetch_tag0", on(&a_tx, &a_rx, io(fetch, 0, b0)), Ans::Accepted);
            obs.check("c_B_fetch_tag1_last", on(&b_tx, &b_rx, io(fetch, 1, b1)), Ans::Accepted);
            let (a_commit, b_commit, a_refetch, b_refetch) = match g {
                Gen::Legacy | Gen::PerQueue => (EINVAL, EBUSY, EINVAL, EBUSY),
                Gen::PerTag => (EBUSY, EINVAL, EBUSY, EBUSY),
            };
            obs.check("c_A_commit_tag0", on(&a_tx, &a_rx, io(commit, 0, b0)), a_commit);
            obs.check("c_B_commit_tag0", on(&b_tx, &b_rx, io(commit, 0, b0)), b_commit);
            obs.check("c_A_refetch_tag0", on(&a_tx, &a_rx, io(fetch, 0, b0)), a_refetch);
            obs.check("c_B_refetch_tag0", on(&b_tx, &b_rx, io(fetch, 0, b0)), b_refetch);
            // STOP_DEV while both threads live: their parked FETCHes complete
            // with ABORT, so the threads can exit (6.1 would block an exiting
            // task until its uring_cmds complete).
            dev.stop();
            drop((a_tx, b_tx));
        });
        dev.delete();
        assert_no_devices();
        obs.finish();
    }
}

/// A read-only mapping of a queue's descriptors, unmapped on drop (before
/// the device is deleted: a mapping keeps `/dev/ublkcN` open).
struct Descs(*mut libc::c_void, usize);

impl Descs {
    fn map(fd: i32, depth: u16) -> Descs {
        let page = 4096usize;
        let len = (usize::from(depth) * 24).div_ceil(page) * page;
        // SAFETY: a fresh shared read-only mapping of queue 0's descriptor
        // array (offset UBLKSRV_CMD_BUF_OFFSET + 0 * stride); checked below.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
        assert_ne!(p, libc::MAP_FAILED, "mmap descriptors: {}", std::io::Error::last_os_error());
        Descs(p, len)
    }

    /// Bytes the request parked on `tag` asks for (nr_sectors << 9).
    fn len(&self, tag: u16) -> usize {
        // SAFETY: tag < depth, inside the mapping; nr_sectors is the u32 at
        // byte 4 of the 24-byte ublksrv_io_desc; read once, volatile.
        let n = unsafe { std::ptr::read_volatile((self.0 as *const u8).add(usize::from(tag) * 24 + 4) as *const u32) };
        (n as usize) << 9
    }
}

impl Drop for Descs {
    fn drop(&mut self) {
        // SAFETY: exactly what mmap returned.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

// SAFETY: the mapping is read-only shared memory; reading it from several
// threads is fine.
unsafe impl Sync for Descs {}

/// What one serving thread saw.
#[derive(Debug, Default)]
struct Served {
    requests: u32,
    commit_errors: Vec<i32>,
}

/// Fetches `tag` from this thread's own ring, reports the answer, then
/// serves it (zeros for reads) until aborted or told to stop.
#[allow(clippy::too_many_arguments)]
fn serve_tag(
    fd: i32,
    tag: u16,
    buf: u64,
    ops: (u32, u32),
    descs: &Descs,
    fetched: mpsc::Sender<Ans>,
    stop: &std::sync::atomic::AtomicBool,
) -> Served {
    let mut r = ring64();
    let mut seen = Served::default();
    let io = |op: u32, result: i32| entry64(sqe(fd, op, u64::from(tag), &[(48, &io_payload(0, tag, result, buf))]));
    let a = submit(&mut r, io(ops.0, 0));
    let _ = fetched.send(a);
    if a != Ans::Accepted {
        return seen;
    }
    let ts = types::Timespec::from(Duration::from_millis(50));
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let args = types::SubmitArgs::new().timespec(&ts);
        match r.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => {}
            Err(e) => panic!("io_uring_enter: {e}"),
        }
        let cqes: Vec<i32> = r.completion().map(|c| c.result()).collect();
        for res in cqes {
            match res {
                0 => {
                    seen.requests += 1;
                    let len = descs.len(tag);
                    // SAFETY: the tag's buffer is MAX_IO bytes of the TrapDev's
                    // Vec, which outlives this thread; len <= max_sectors << 9.
                    unsafe { std::ptr::write_bytes(buf as *mut u8, 0, len.min(MAX_IO as usize)) };
                    // SAFETY: as in submit_for.
                    unsafe { r.submission().push(&io(ops.1, len as i32)).expect("SQ full") };
                }
                sys::UBLK_IO_RES_ABORT => return seen,
                e => {
                    seen.commit_errors.push(e);
                    return seen;
                }
            }
        }
    }
    seen
}

driver_test! {
    /// (c2) What the thread rule does to I/O. Thread A fetches and serves
    /// tag 0, thread B tag 1 (the queue's last FETCH); START_DEV succeeds on
    /// every kernel. Then direct reads:
    /// * up to 6.15, a request on tag 0 is handed to A's task and failed there
    ///   by `__ublk_rq_task_work` (`current != ubq->ubq_daemon`): the read
    ///   gets EIO and A never sees a request;
    /// * from 6.16, A gets tag 0's requests and its commits are accepted.
    ///
    /// `UBLK_F_URING_CMD_COMP_IN_TASK` is set so that 6.1 delivers through the
    /// fetching task as 6.12 always does (a built-in 6.1 driver would
    /// otherwise use the daemon's task_work).
    fn traps_c2_io_goes_to_the_fetching_thread() {
        let mut dev = TrapDev::with_flags(2, sys::UBLK_F_URING_CMD_COMP_IN_TASK);
        let descs = Descs::map(dev.fd(), 2);
        let mut obs = Obs::new("traps_c2");
        let g = gen();
        let ops = (dev.fetch_op(), dev.commit_op());
        let (fd, b0, b1, id) = (dev.fd(), dev.buf(0), dev.buf(1), dev.id);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (served_a, served_b, eio, ok) = std::thread::scope(|s| {
            let (ftx, frx) = mpsc::channel();
            let (descs, stop, ftx2) = (&descs, &stop, ftx.clone());
            let a = s.spawn(move || serve_tag(fd, 0, b0, ops, descs, ftx, stop));
            obs.check("c2_A_fetch_tag0", frx.recv().unwrap(), Ans::Accepted);
            let b = s.spawn(move || serve_tag(fd, 1, b1, ops, descs, ftx2, stop));
            obs.check("c2_B_fetch_tag1_last", frx.recv().unwrap(), Ans::Accepted);
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let t0 = Instant::now();
            let started = dev.ctrl.as_ref().unwrap().start_dev(id, || t0.elapsed() < Duration::from_secs(20));
            let started_ans = match &started {
                Ok(()) => OK,
                Err(e) => Ans::Res(-e.errno().unwrap_or(libc::EIO)),
            };
            obs.check("c2_start_dev", started_ans, OK);
            let (mut eio, mut ok) = (0u32, 0u32);
            if started.is_ok() {
                let path = format!("/dev/ublkb{id}");
                wait_for_path(std::path::Path::new(&path));
                use std::os::unix::fs::{FileExt, OpenOptionsExt};
                let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path).unwrap();
                let mut raw = vec![0u8; 8192];
                let buf = aligned(&mut raw, 4096);
                // Tags are handed out round-robin; read until the answer is clear.
                for i in 0..200u64 {
                    match f.read_at(buf, (i % 64) * 4096) {
                        Ok(4096) => ok += 1,
                        Ok(n) => panic!("short read {n}"),
                        Err(e) if e.raw_os_error() == Some(libc::EIO) => eio += 1,
                        Err(e) => panic!("read {path}: {e}"),
                    }
                    if ok >= 20 && (eio > 0 || i >= 40) {
                        break;
                    }
                }
            }
            (eio, ok)
            }));
            // STOP_DEV while A and B live: their parked FETCHes are aborted.
            dev.stop();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let (sa, sb) = (a.join(), b.join());
            let (eio, ok) = run.unwrap_or_else(|p| std::panic::resume_unwind(p));
            (sa.unwrap(), sb.unwrap(), eio, ok)
        });
        println!(
            "TRAP c2_reads kernel {}: {ok} ok, {eio} EIO; A served {} (commit errors {:?}), B served {} (commit errors {:?})",
            kernel_release(), served_a.requests, served_a.commit_errors, served_b.requests, served_b.commit_errors
        );
        drop(descs);
        dev.delete();
        assert_no_devices();
        obs.finish();
        assert!(served_a.commit_errors.is_empty() && served_b.commit_errors.is_empty(), "no commit may be refused");
        assert!(served_b.requests > 0, "B serves tag 1 on every kernel");
        match g {
            Gen::Legacy | Gen::PerQueue => {
                assert_eq!(served_a.requests, 0, "up to 6.15 the queue belongs to B: A gets nothing");
                assert!(eio > 0, "requests on A's tag fail with EIO");
            }
            Gen::PerTag => {
                assert!(served_a.requests > 0, "6.16+: A serves its own tag");
                assert_eq!(eio, 0, "6.16+: no read fails");
            }
        }
    }
}

// ---------------------------------------------------------------- (f)

driver_test! {
    /// (f) FETCH of a tag that already has a FETCH parked (same thread, queue
    /// not yet complete): -EBUSY up to 6.15 (`UBLK_IO_FLAG_ACTIVE` check in
    /// __ublk_ch_uring_cmd), -EINVAL from 6.16 (__ublk_fetch).
    fn traps_f_fetch_same_tag_twice() {
        let dev = TrapDev::new(2);
        let mut r = ring64();
        let mut obs = Obs::new("traps_f");
        let f = dev.fetch_op();
        obs.check("f_fetch_tag0", submit(&mut r, dev.io(f, 0, 0, dev.buf(0))), Ans::Accepted);
        let want = if gen() == Gen::PerTag { EINVAL } else { EBUSY };
        obs.check("f_fetch_tag0_again", submit(&mut r, dev.io(f, 0, 0, dev.buf(0))), want);
        dev.finish(|| drop(r));
        obs.finish();
    }
}

// ---------------------------------------------------------------- (h)

driver_test! {
    /// (h) START_DEV blocks in the kernel until every tag of every queue is
    /// fetched. With tag 1 never fetched it would hang forever; with a
    /// deadline the command is cancelled and `Error::TimedOut` comes back,
    /// after which the device can still be deleted.
    fn traps_h_start_dev_with_tags_unfetched_times_out() {
        let dev = TrapDev::new(2);
        let mut r = ring64();
        let mut obs = Obs::new("traps_h");
        obs.check("h_fetch_tag0_only", submit(&mut r, dev.io(dev.fetch_op(), 0, 0, dev.buf(0))), Ans::Accepted);
        let t0 = Instant::now();
        let res = dev.ctrl.as_ref().unwrap().start_dev(dev.id, || t0.elapsed() < Duration::from_secs(2));
        let took = t0.elapsed();
        println!("TRAP h_start_dev_unfetched kernel {}: {res:?} after {took:?}", kernel_release());
        assert!(matches!(res, Err(Error::TimedOut { .. })), "START_DEV with a tag unfetched: {res:?}");
        assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(10), "{took:?}");
        assert!(!std::path::Path::new(&format!("/dev/ublkb{}", dev.id)).exists(), "no disk may appear");
        dev.finish(|| drop(r));
        obs.finish();
    }
}

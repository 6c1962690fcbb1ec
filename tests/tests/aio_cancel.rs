//! Async targets (`ublk::aio`) against the real driver, operations and
//! buffers that outlive their request's future: a stop with operations in
//! flight on every tag, and operations dropped before they complete. Each
//! operation reads into a guarded buffer (or opens a FIFO in an io_uring
//! worker thread) and must be cancelled, its buffer kept until its
//! completion and never written after that. Answers, chained operations and
//! completions from other threads are in aio_answers.rs.

mod aio_util;

use std::ffi::{CStr, CString};
use std::fs::File;
use std::future::{poll_fn, Future};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use aio_util::*;
use ublk::aio::{AsyncTarget, Io, IoBuf, IoBufMut, Operation, QueueContext, QueueTarget, Ring};
use ublk::io_uring::{opcode, squeue, types};
use ublk::{DeviceBuilder, Errno, IoResult, Op};
use ublk_tests::*;

// ---------------------------------------------------------------------------
// Buffers the kernel must not write once they are given back

const PAGE: usize = 4096;
/// Bytes of canary on each side of a buffer, inside its page.
const CANARY_LEN: usize = 256;
const CANARY: u8 = 0xCA;
/// What a buffer holds while nobody owns it.
const FREED: u8 = 0xDD;
const BUF_LEN: usize = PAGE - 2 * CANARY_LEN;

/// Buffers for the target's own operations: each in its own page, between
/// canary bytes, each page between PROT_NONE guard pages. A buffer given
/// back (dropped by whoever owned it last: the operation's future, or the
/// queue that kept it for an operation whose future was dropped) is filled
/// with `FREED` and stays mapped, so that a write by the kernel after that
/// shows instead of landing in someone else's memory.
struct Arena {
    base: *mut u8,
    slots: usize,
    lent_now: Box<[AtomicBool]>,
    lent: AtomicU64,
    returned: AtomicU64,
}

// SAFETY: the mapping is only reached through the slots' atomics and the
// buffers, each owned by one party at a time.
unsafe impl Send for Arena {}
// SAFETY: as above.
unsafe impl Sync for Arena {}

impl Arena {
    fn new(slots: usize) -> Arc<Arena> {
        let len = (2 * slots + 1) * PAGE;
        // SAFETY: a fresh anonymous mapping, checked below.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        let base = base as *mut u8;
        for g in 0..=slots {
            // SAFETY: a page of the mapping just made.
            assert_eq!(unsafe { libc::mprotect(base.add(2 * g * PAGE).cast(), PAGE, libc::PROT_NONE) }, 0);
        }
        let a = Arena { base, slots, lent_now: (0..slots).map(|_| AtomicBool::new(false)).collect(), lent: 0.into(), returned: 0.into() };
        for i in 0..slots {
            // SAFETY: slot i's page, readable and writable, nobody else's yet.
            let page = unsafe { std::slice::from_raw_parts_mut(a.page(i), PAGE) };
            page.fill(CANARY);
            page[CANARY_LEN..CANARY_LEN + BUF_LEN].fill(FREED);
        }
        Arc::new(a)
    }

    fn page(&self, i: usize) -> *mut u8 {
        assert!(i < self.slots);
        // SAFETY: inside the mapping.
        unsafe { self.base.add((2 * i + 1) * PAGE) }
    }

    /// Slot `i`'s buffer, zeroed.
    fn lend(self: &Arc<Self>, i: usize) -> GuardBuf {
        assert!(!self.lent_now[i].swap(true, SEQ), "buffer {i} lent while an operation still owns it");
        // SAFETY: the buffer of slot i, owned by nobody until returned.
        unsafe { std::ptr::write_bytes(self.page(i).add(CANARY_LEN), 0, BUF_LEN) };
        self.lent.fetch_add(1, SEQ);
        GuardBuf { arena: self.clone(), i }
    }

    fn is_lent(&self, i: usize) -> bool {
        self.lent_now[i].load(SEQ)
    }

    /// Every buffer given back, holding `FREED`, canaries intact.
    fn check(&self) -> Result<(), String> {
        let (lent, returned) = (self.lent.load(SEQ), self.returned.load(SEQ));
        if lent != returned {
            return Err(format!("{lent} buffers lent, {returned} given back"));
        }
        for i in 0..self.slots {
            // SAFETY: slot i's page; no operation owns it (all returned).
            let page = unsafe { std::slice::from_raw_parts(self.page(i), PAGE) };
            for (j, &b) in page.iter().enumerate() {
                let want = if (CANARY_LEN..CANARY_LEN + BUF_LEN).contains(&j) { FREED } else { CANARY };
                if b != want {
                    return Err(format!("buffer {i}: byte {j} of its page is {b:#x}, not {want:#x}: written after it was given back"));
                }
            }
        }
        Ok(())
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: our mapping; no buffer is left (each holds the Arc).
        unsafe { libc::munmap(self.base.cast(), (2 * self.slots + 1) * PAGE) };
    }
}

/// A buffer of an [`Arena`]; given back when dropped.
struct GuardBuf {
    arena: Arc<Arena>,
    i: usize,
}

impl Drop for GuardBuf {
    fn drop(&mut self) {
        // SAFETY: our slot's buffer; whoever dropped us no longer lets the
        // kernel write it (that is what the tests check).
        unsafe { std::ptr::write_bytes(self.arena.page(self.i).add(CANARY_LEN), FREED, BUF_LEN) };
        self.arena.lent_now[self.i].store(false, SEQ);
        self.arena.returned.fetch_add(1, SEQ);
    }
}

// SAFETY: the bytes are in the arena's mapping, which lives (through the Arc)
// as long as the buffer, at a fixed address.
unsafe impl IoBuf for GuardBuf {
    fn stable_ptr(&self) -> *const u8 {
        // SAFETY: inside slot i's page.
        unsafe { self.arena.page(self.i).add(CANARY_LEN) }
    }
    fn bytes_init(&self) -> usize {
        BUF_LEN
    }
}

// SAFETY: as above; the bytes are writable.
unsafe impl IoBufMut for GuardBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: inside slot i's page.
        unsafe { self.arena.page(self.i).add(CANARY_LEN) }
    }
    fn bytes_total(&self) -> usize {
        BUF_LEN
    }
}

// ---------------------------------------------------------------------------
// An operation that blocks in one of io_uring's worker threads

/// A FIFO on /tmp that nobody opens for writing.
fn fifo(name: &str) -> CString {
    let p = CString::new(format!("/tmp/ublk-aio-{name}.fifo")).unwrap();
    // SAFETY: unlink and mkfifo of a NUL-terminated path.
    unsafe {
        libc::unlink(p.as_ptr());
        assert_eq!(libc::mkfifo(p.as_ptr(), 0o600), 0, "mkfifo: {}", std::io::Error::last_os_error());
    }
    p
}

/// Opens `path` (a FIFO) for reading, as an io_uring OPENAT sent straight
/// to a worker thread (IOSQE_ASYNC; inline, io_uring would try the open
/// with O_NONBLOCK first, which succeeds at once on a FIFO), where it waits
/// in open(2) for a writer that never comes. Cancelling it means
/// interrupting that thread, unlike a read on a pipe, which waits on a poll.
fn open_fifo<'r>(ring: &Ring<'r>, path: &CStr) -> Operation<'r, CString> {
    let path = path.to_owned();
    let sqe = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
        .flags(libc::O_RDONLY | libc::O_CLOEXEC)
        .build()
        .flags(squeue::Flags::ASYNC);
    // SAFETY: the SQE names only the path, a CString (heap bytes, which stay
    // put when it moves) that the operation owns until it completes; an
    // OPENAT has one completion; no links, no fixed file (IOSQE_ASYNC only
    // says where it runs).
    unsafe { ring.raw(sqe, path) }
}

/// Closes the descriptor an open that should never have completed returned.
fn close_opened(r: Result<u32, Errno>) {
    if let Ok(fd) = r {
        // SAFETY: a descriptor the kernel just gave us, owned by nobody else.
        unsafe { libc::close(fd as i32) };
    }
}

/// Nobody has the FIFO open for reading, nor is opening it: an open for
/// writing without blocking fails with ENXIO. (A reader waiting in open(2)
/// counts: it is a reader from the moment it starts waiting.)
fn assert_no_fifo_reader(path: &CStr, who: &str) {
    // SAFETY: open of a NUL-terminated path; the result is closed below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    let e = std::io::Error::last_os_error();
    if fd >= 0 {
        // SAFETY: ours.
        unsafe { libc::close(fd) };
    }
    assert!(fd < 0 && e.raw_os_error() == Some(libc::ENXIO), "{who} still opens the FIFO for reading (open for writing: {fd}, {e})");
}

// ---------------------------------------------------------------------------
// Stop with operations in flight on every tag

/// Once armed, every request starts a read from a pipe nobody writes into a
/// guarded buffer of its own and a 60 s io_uring timeout, requests with an
/// odd tag also an open of a FIFO nobody writes (blocked in an io_uring
/// worker thread), and waits for all: none can complete before the device
/// stops.
struct Hold {
    pipe_rd: OwnedFd,
    fifo: CString,
    /// FIFO opens started.
    opens: AtomicU32,
    arena: Arc<Arena>,
    depth: u16,
    armed: AtomicBool,
    /// Requests with both operations in flight.
    waiting: AtomicU32,
    /// Operations that resolved (none should, before the stop).
    resolved: AtomicU32,
}

impl AsyncTarget for Hold {
    type Queue<'a> = &'a Hold;
    fn queue(&self, _q: &QueueContext) -> std::io::Result<&Hold> {
        Ok(self)
    }
}

impl QueueTarget for &Hold {
    async fn handle(&self, io: Io<'_>) -> IoResult {
        let req = *io.request();
        if !self.armed.load(SEQ) {
            return Ok(req.len() as u32);
        }
        let slot = usize::from(req.q_id) * usize::from(self.depth) + usize::from(req.tag);
        let ring = io.ring();
        let read = ring.read(&self.pipe_rd, self.arena.lend(slot), 0);
        let sleep = ring.sleep(Duration::from_secs(60));
        let open = (req.tag % 2 == 1).then(|| open_fifo(&ring, &self.fifo));
        if open.is_some() {
            self.opens.fetch_add(1, SEQ);
        }
        self.waiting.fetch_add(1, SEQ);
        let (r, _buf) = read.await;
        self.resolved.fetch_add(1, SEQ);
        let _ = sleep.await;
        self.resolved.fetch_add(1, SEQ);
        if let Some(open) = open {
            close_opened(open.await.0);
            self.resolved.fetch_add(1, SEQ);
        }
        r.map(|_| req.len() as u32)
    }
}

driver_test! {
    /// fio keeps every tag of both queues busy with requests whose
    /// operations (a pipe read into a guarded buffer, a 60 s timeout, on
    /// half the tags a FIFO open blocked in an io_uring worker) cannot
    /// complete; then the device is stopped. serve returns within a few
    /// seconds (stop grace 0.5 s), fio ends, no device is left, every buffer
    /// was given back and nothing was written into one after that (canaries
    /// and contents intact, also after bytes are written to the pipe, which
    /// nobody consumed), and no open of the FIFO is left waiting.
    fn aio_stop_under_fio_with_operations_in_flight() {
        assert!(nproc() >= 2, "needs 2 CPUs for 2 queues, this VM has {}", nproc());
        let depth = 16u16;
        let (rd, wr) = pipe();
        let arena = Arena::new(2 * usize::from(depth));
        let target = Hold {
            pipe_rd: rd,
            fifo: fifo("hold"),
            opens: AtomicU32::new(0),
            arena: arena.clone(),
            depth,
            armed: AtomicBool::new(false),
            waiting: AtomicU32::new(0),
            resolved: AtomicU32::new(0),
        };
        let dev = DeviceBuilder::new()
            .queues(2)
            .depth(depth)
            .size(256 * MIB)
            .flags(no_part_scan())
            .stop_grace(Duration::from_millis(500))
            .create()
            .unwrap();
        let log = PathBuf::from("/tmp/ublk-aio-stop-fio.log");
        let (r, target, fio, stopped, served) = within("stop with operations in flight", Duration::from_secs(120), move || {
            let mut fio = None;
            let mut stopped = None;
            let r = dev.serve_async(&target, |dev, stop| {
                target.armed.store(true, SEQ);
                let out = File::create(&log).unwrap();
                let child = Command::new("fio")
                    .args(["--name=hold", &format!("--filename={}", dev.block_path().display())])
                    .args(["--rw=randread", "--bs=4k", "--ioengine=io_uring", "--direct=1", &format!("--iodepth={depth}")])
                    .args(["--numjobs=2", "--cpus_allowed=0-1", "--cpus_allowed_policy=split", "--time_based", "--runtime=300"])
                    .stdout(Stdio::from(out.try_clone().unwrap()))
                    .stderr(Stdio::from(out))
                    .spawn()
                    .expect("spawn fio");
                fio = Some(child);
                let t0 = Instant::now();
                while target.waiting.load(SEQ) < 2 * u32::from(depth) && t0.elapsed() < Duration::from_secs(60) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                // Let any request beyond the tags' reach the queues too.
                std::thread::sleep(Duration::from_millis(200));
                stopped = Some(Instant::now());
                stop.stop();
            });
            let served = Instant::now();
            (r.map_err(|e| e.to_string()), target, fio, stopped, served)
        });
        let mut fio = fio.expect("fio was started");
        let fio_status = wait_timeout(&mut fio, Duration::from_secs(30));
        if fio_status.is_none() {
            let _ = fio.kill();
            let _ = fio.wait();
        }
        let fio_log = std::fs::read_to_string("/tmp/ublk-aio-stop-fio.log").unwrap_or_default();
        let took = served - stopped.expect("stop was asked");
        let (waiting, resolved) = (target.waiting.load(SEQ), target.resolved.load(SEQ));
        eprintln!("serve: {:?} {took:?} after the stop; requests held with operations in flight: {waiting}; fio: {fio_status:?}", r.as_ref().map(|s| s.iter().map(|q| q.errors).sum::<u64>()));
        let stats = r.expect("serve ends cleanly");
        assert_eq!(waiting, 2 * u32::from(depth), "every tag of both queues held a request with operations in flight");
        assert_eq!(resolved, 0, "an operation that cannot complete resolved");
        assert!(took < Duration::from_secs(15), "serve took {took:?} to return after the stop (grace 0.5 s)");
        let failed: u64 = stats.iter().map(|s| s.errors).sum();
        assert!(failed >= u64::from(waiting), "the held requests failed: {stats:?}");
        assert!(fio_status.is_some(), "fio still running 30 s after the device stopped:\n{fio_log}");
        assert!(fio_log.contains("Input/output error"), "fio's held reads should fail with EIO:\n{fio_log}");
        assert_no_devices();
        eprintln!("buffers lent {}, given back {}", arena.lent.load(SEQ), arena.returned.load(SEQ));
        assert_eq!(arena.lent.load(SEQ), u64::from(waiting), "one buffer per held request");
        arena.check().unwrap();
        // The pipe reads were cancelled: bytes written now stay in the pipe,
        // and no buffer changed.
        assert_no_reader_left(&wr, &target.pipe_rd, "a read of the stopped device");
        arena.check().unwrap();
        // The opens blocked in io_uring's worker threads were interrupted.
        assert_eq!(target.opens.load(SEQ), u32::from(depth), "one FIFO open per odd tag");
        assert_no_fifo_reader(&target.fifo, "an open of the stopped device");
        let _ = std::fs::remove_file(target.fifo.to_str().unwrap());
        let _ = std::fs::remove_file("/tmp/ublk-aio-stop-fio.log");
    }
}

// ---------------------------------------------------------------------------
// Operations dropped before they complete

/// What a select of two operations gave first.
enum First<A, B> {
    A(A),
    B(B),
}

/// Polls `a` then `b` until one is ready; the other is left as it is.
async fn select<A: Future + Unpin, B: Future + Unpin>(a: &mut A, b: &mut B) -> First<A::Output, B::Output> {
    poll_fn(|cx| {
        if let Poll::Ready(x) = Pin::new(&mut *a).poll(cx) {
            return Poll::Ready(First::A(x));
        }
        if let Poll::Ready(x) = Pin::new(&mut *b).poll(cx) {
            return Poll::Ready(First::B(x));
        }
        Poll::Pending
    })
    .await
}

/// The byte at device offset `off` of [`Abandon`]'s disk.
fn byte_at(off: u64) -> u8 {
    ((off / 4096).wrapping_mul(31) ^ (off % 251)) as u8
}

/// The armed region.
const ABANDON_AT: std::ops::Range<u64> = 4 * MIB..12 * MIB;

/// Once armed, a request in `ABANDON_AT` races a read from a pipe nobody
/// writes (into a guarded buffer) against a 2 ms timeout, drops the read
/// when the timeout wins, and answers (a read with `byte_at`). In every
/// other 64 KiB of the region the operation raced and dropped is an open of
/// a FIFO nobody writes, which blocks in an io_uring worker thread.
struct Abandon {
    pipe_rd: OwnedFd,
    fifo: CString,
    /// Dropped FIFO opens.
    dropped_opens: AtomicU64,
    arena: Arc<Arena>,
    depth: u16,
    armed: AtomicBool,
    dropped: AtomicU64,
    /// The pipe read won the race (nobody writes the pipe: never).
    read_won: AtomicU64,
    /// Sleeps that ended other than with Ok(0) (time up).
    odd_sleeps: AtomicU64,
    /// Buffers given back at once when their operation was dropped (they
    /// must be kept until the operation's completion).
    released_early: AtomicU64,
}

impl AsyncTarget for Abandon {
    type Queue<'a> = &'a Abandon;
    fn queue(&self, _q: &QueueContext) -> std::io::Result<&Abandon> {
        Ok(self)
    }
}

impl QueueTarget for &Abandon {
    async fn handle(&self, mut io: Io<'_>) -> IoResult {
        let req = *io.request();
        if self.armed.load(SEQ) && ABANDON_AT.contains(&req.offset()) && req.offset() / 65536 % 2 == 1 {
            let ring = io.ring();
            let mut open = open_fifo(&ring, &self.fifo);
            let mut sleep = ring.sleep(Duration::from_millis(2));
            match select(&mut open, &mut sleep).await {
                First::A((r, _)) => {
                    close_opened(r);
                    self.read_won.fetch_add(1, SEQ);
                }
                First::B(r) => {
                    if r != Ok(0) {
                        self.odd_sleeps.fetch_add(1, SEQ);
                    }
                }
            }
            drop(open);
            self.dropped.fetch_add(1, SEQ);
            self.dropped_opens.fetch_add(1, SEQ);
        } else if self.armed.load(SEQ) && ABANDON_AT.contains(&req.offset()) {
            let slot = usize::from(req.q_id) * usize::from(self.depth) + usize::from(req.tag);
            let ring = io.ring();
            let mut read = ring.read(&self.pipe_rd, self.arena.lend(slot), 0);
            let mut sleep = ring.sleep(Duration::from_millis(2));
            match select(&mut read, &mut sleep).await {
                First::A(_) => {
                    self.read_won.fetch_add(1, SEQ);
                }
                First::B(r) => {
                    if r != Ok(0) {
                        self.odd_sleeps.fetch_add(1, SEQ);
                    }
                }
            }
            drop(read);
            self.dropped.fetch_add(1, SEQ);
            // The read is cancelled; its completion has not been reaped yet
            // (that happens outside this poll), so its buffer must be kept.
            if !self.arena.is_lent(slot) {
                self.released_early.fetch_add(1, SEQ);
            }
        }
        if req.op == Op::Read {
            let off = req.offset();
            for (i, b) in io.data_mut().iter_mut().enumerate() {
                *b = byte_at(off + i as u64);
            }
        }
        Ok(req.len() as u32)
    }
}

driver_test! {
    /// A request's future starts a pipe read that never completes (or an
    /// open of a FIFO, blocked in an io_uring worker) and a 2 ms timeout,
    /// and returns when the timeout fires, dropping the read (a select). Each request completes at once with its data; its read
    /// was cancelled and its buffer kept until the read's completion, which
    /// came before the request was committed; bytes written to the pipe
    /// later are still there (no cancelled read consumed them).
    fn aio_dropped_operation_is_cancelled_and_its_buffer_kept() {
        let depth = 32u16;
        let (rd, wr) = pipe();
        let arena = Arena::new(2 * usize::from(depth));
        let target = Abandon {
            pipe_rd: rd,
            fifo: fifo("abandon"),
            dropped_opens: 0.into(),
            arena: arena.clone(),
            depth,
            armed: AtomicBool::new(false),
            dropped: 0.into(),
            read_won: 0.into(),
            odd_sleeps: 0.into(),
            released_early: 0.into(),
        };
        let dev = DeviceBuilder::new().queues(2).depth(depth).size(16 * MIB).flags(no_part_scan()).create().unwrap();
        let lent = arena.clone();
        let (r, target) = within("requests whose operations are dropped", Duration::from_secs(180), move || {
            let arena = lent;
            let r = dev.serve_async(&target, |dev, stop| {
                target.armed.store(true, SEQ);
                let p = dev.block_path();
                // One request at a time: when the read returns, the dropped
                // operation's buffer has been given back.
                let mut worst = Duration::ZERO;
                for i in 0..64u64 {
                    let len = if i % 2 == 0 { 4096 } else { 65536 };
                    let off = ABANDON_AT.start + (i * 97 % 120) * 65536;
                    let t0 = Instant::now();
                    let got = direct(&p, off, len, None).unwrap_or_else(|e| panic!("read {i} at {off}: errno {e}"));
                    worst = worst.max(t0.elapsed());
                    assert!(got.iter().enumerate().all(|(j, &b)| b == byte_at(off + j as u64)), "read {i} at {off}: wrong data");
                    assert_eq!(target.dropped.load(SEQ), i + 1, "read {i}: one dropped operation per request");
                    assert_eq!(arena.lent.load(SEQ), arena.returned.load(SEQ), "read {i}: committed before its dropped operation ended");
                }
                eprintln!("64 reads one at a time: the slowest took {worst:?}");
                assert!(worst < Duration::from_secs(5), "a request waited {worst:?} for its dropped operation");
                // Many at once, on both queues.
                let threads: Vec<_> = (0..4u64)
                    .map(|t| {
                        let p = p.clone();
                        std::thread::spawn(move || {
                            pin_self((t as usize) % nproc());
                            for i in 0..32u64 {
                                let off = ABANDON_AT.start + ((t * 32 + i) * 37 % 2048) * 4096;
                                let got = direct(&p, off, 4096, None).unwrap_or_else(|e| panic!("read at {off}: errno {e}"));
                                assert!(got.iter().enumerate().all(|(j, &b)| b == byte_at(off + j as u64)), "read at {off}: wrong data");
                            }
                        })
                    })
                    .collect();
                for t in threads {
                    t.join().unwrap();
                }
                // Nothing waits on the pipe or the FIFO any more.
                assert_no_reader_left(&wr, &target.pipe_rd, "a dropped (cancelled) read");
                assert_no_fifo_reader(&target.fifo, "a dropped (cancelled) open");
                stop.stop();
            });
            (r.map(|_| ()).map_err(|e| e.to_string()), target)
        });
        let (dropped, won, odd, early) =
            (target.dropped.load(SEQ), target.read_won.load(SEQ), target.odd_sleeps.load(SEQ), target.released_early.load(SEQ));
        eprintln!("serve: {r:?}; dropped operations {dropped}, buffers lent {}, given back {}", arena.lent.load(SEQ), arena.returned.load(SEQ));
        r.expect("serve");
        let opens = target.dropped_opens.load(SEQ);
        eprintln!("of which FIFO opens blocked in io_uring workers: {opens}");
        assert_eq!(dropped, 64 + 4 * 32);
        assert!(opens >= 16 && opens < dropped, "both kinds of dropped operation: {opens} opens of {dropped}");
        let _ = std::fs::remove_file(target.fifo.to_str().unwrap());
        assert_eq!(won, 0, "a raced operation that cannot complete (pipe read, FIFO open) completed");
        assert_eq!(odd, 0, "a sleep ended other than with Ok(0)");
        assert_eq!(early, 0, "a dropped operation's buffer was given back before its completion");
        assert_eq!(arena.lent.load(SEQ), dropped - opens);
        arena.check().unwrap();
        assert_no_devices();
    }
}

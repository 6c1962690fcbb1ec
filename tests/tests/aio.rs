//! Async targets (`ublk::aio`) against the real driver: requests answered
//! out of order, chained operations with a failure in the middle, completions
//! fulfilled by other threads, a stop with operations in flight on every
//! tag, operations dropped before they complete, and many operations in
//! flight for one request.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::fs::{File, OpenOptions};
use std::future::{poll_fn, Future};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::Poll;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use ublk::aio::{completion, AsyncTarget, Completer, Io, IoBuf, IoBufMut, Operation, Plain, QueueContext, QueueTarget, Ring};
use ublk::io_uring::{opcode, squeue, types};
use ublk::{DeviceBuilder, Errno, IoResult, Op};
use ublk_tests::*;

const MIB: u64 = 1 << 20;
const SEQ: Ordering = Ordering::SeqCst;

/// fio with crc32c verify on `[offset, offset + span)`: `rw` (randwrite or
/// randrw), block sizes `bs` (a `--bs=` or `--bsrange=` argument), iodepth
/// 32, one job per CPU (2 at most) on its own half, so that every queue
/// serves. Asserts fio and its verification passed; returns its output.
fn fio_verify(dev: &Path, rw: &str, bs: &str, offset: u64, span: u64) -> String {
    let jobs = nproc().clamp(1, 2) as u64;
    let part = span / jobs;
    let out = fio_ok(&[
        "--name=verify",
        "--filename",
        dev.to_str().unwrap(),
        &format!("--rw={rw}"),
        bs,
        "--ioengine=io_uring",
        "--iodepth=32",
        "--direct=1",
        &format!("--numjobs={jobs}"),
        &format!("--offset={offset}"),
        &format!("--size={part}"),
        &format!("--offset_increment={part}"),
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        &format!("--cpus_allowed=0-{}", jobs - 1),
        "--cpus_allowed_policy=split",
        "--group_reporting",
    ]);
    for l in out.lines().filter(|l| l.contains("IOPS=")) {
        eprintln!("fio {rw} {bs}: {}", l.trim());
    }
    out
}

/// A file on /tmp of `size` bytes, zero-filled, open for reading and writing.
fn scratch_file(name: &str, size: u64) -> (File, PathBuf) {
    let p = PathBuf::from(format!("/tmp/ublk-aio-{name}"));
    sparse_file(&p, size);
    (OpenOptions::new().read(true).write(true).open(&p).unwrap(), p)
}

/// One O_DIRECT read or write of `len` bytes at `off`: the data read, or the
/// errno.
fn direct(dev: &Path, off: u64, len: usize, write: Option<&[u8]>) -> Result<Vec<u8>, i32> {
    let f = OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(dev).unwrap();
    let mut v = vec![0u8; len + 4096];
    let b = aligned(&mut v, len);
    let r = match write {
        Some(d) => {
            b.copy_from_slice(d);
            f.write_at(b, off)
        }
        None => f.read_at(b, off),
    };
    match r {
        Ok(n) if n == len => Ok(b.to_vec()),
        Ok(n) => panic!("short transfer of {n} of {len} bytes at {off} reached the reader"),
        Err(e) => Err(e.raw_os_error().unwrap()),
    }
}

// ---------------------------------------------------------------------------
// Out of order

/// Each request first sleeps 0-3 ms on an io_uring timeout (by its offset
/// and tag), then does its I/O on a file with an operation on the ring.
/// Each queue records the order requests arrived in and the order they
/// completed in.
struct Shuffle {
    file: File,
    /// Per queue at its end: (queue, requests, inversions).
    reports: Mutex<Vec<(u16, u64, u64)>>,
    /// Sleeps that ended some other way than the time being up (Ok(0)).
    odd_sleeps: AtomicU64,
}

struct ShuffleQueue<'a> {
    t: &'a Shuffle,
    q_id: u16,
    arrived: Cell<u64>,
    /// Arrival numbers, in completion order.
    completed: RefCell<Vec<u64>>,
}

impl AsyncTarget for Shuffle {
    type Queue<'a> = ShuffleQueue<'a>;
    fn queue(&self, q: &QueueContext) -> std::io::Result<ShuffleQueue<'_>> {
        Ok(ShuffleQueue { t: self, q_id: q.q_id, arrived: Cell::new(0), completed: RefCell::new(Vec::with_capacity(1 << 16)) })
    }
}

impl QueueTarget for ShuffleQueue<'_> {
    async fn handle(&self, mut io: Io<'_>) -> IoResult {
        let req = *io.request();
        let seq = self.arrived.get();
        self.arrived.set(seq + 1);
        let d = Duration::from_millis(((req.offset() >> 12) ^ u64::from(req.tag)) % 4);
        if io.ring().sleep(d).await != Ok(0) {
            self.t.odd_sleeps.fetch_add(1, SEQ);
        }
        let n = match req.op {
            Op::Read => io.read_at(&self.t.file, 0..req.len(), req.offset()).await?,
            Op::Write => io.write_at(&self.t.file, 0..req.len(), req.offset(), 0).await?,
            _ => 0,
        };
        self.completed.borrow_mut().push(seq);
        Ok(n)
    }
}

impl Drop for ShuffleQueue<'_> {
    fn drop(&mut self) {
        // An inversion: a request that completed after one that arrived later.
        let done = self.completed.borrow();
        let (mut max, mut inversions) = (None, 0u64);
        for &s in done.iter() {
            if max.is_some_and(|m| s < m) {
                inversions += 1;
            }
            max = max.max(Some(s));
        }
        self.t.reports.lock().unwrap().push((self.q_id, done.len() as u64, inversions));
    }
}

driver_test! {
    /// Requests answered out of order (each sleeps 0-3 ms on an io_uring
    /// timeout first, then does its I/O with an operation on the ring):
    /// fio randrw with crc32c verify at iodepth 32 passes, and the queues
    /// really completed requests in another order than they arrived.
    fn aio_out_of_order_answers_carry_the_data() {
        let (file, path) = scratch_file("shuffle", 32 * MIB);
        let target = Shuffle { file, reports: Mutex::new(vec![]), odd_sleeps: AtomicU64::new(0) };
        let dev = DeviceBuilder::new().queues(2).depth(64).size(32 * MIB).create().unwrap();
        dev.serve_async(&target, |dev, stop| {
            fio_verify(&dev.block_path(), "randrw", "--bs=4k", 0, 16 * MIB);
            fio_verify(&dev.block_path(), "randwrite", "--bsrange=4k-64k", 16 * MIB, 16 * MIB);
            stop.stop();
        })
        .unwrap();
        let reports = target.reports.lock().unwrap().clone();
        eprintln!("per queue (queue, requests, completed after a later arrival): {reports:?}");
        assert_eq!(target.odd_sleeps.load(SEQ), 0, "a sleep (io_uring timeout) ended other than with Ok(0)");
        assert_eq!(reports.len(), 2, "both queues report");
        let (total, inversions) = reports.iter().fold((0, 0), |(a, b), r| (a + r.1, b + r.2));
        for &(q, n, inv) in &reports {
            assert!(n < 1000 || inv > 0, "queue {q} completed its {n} requests in arrival order");
        }
        assert!(total >= 2000, "fio should have made thousands of requests: {total}");
        assert!(inversions * 10 >= total, "only {inversions} of {total} requests completed out of order");
        let _ = std::fs::remove_file(&path);
        assert_no_devices();
    }
}

// ---------------------------------------------------------------------------
// Three chained operations, the middle one failing

const REGIONS: usize = 8;
/// The region whose extent is lost.
const LOST: usize = 5;

/// A tiny mapped disk: per 1 MiB region, a metadata entry (4 bytes in a
/// file) names the extent holding its data; every request reads its
/// region's entry (operation 1), moves its data from or to that extent
/// (operation 2), then appends a record to a journal (operation 3), each on
/// the queue's ring, one after the other.
///
/// Region `LOST`'s extent is a descriptor opened `O_PATH` (a file whose
/// contents cannot be reached): the kernel fails the data operation itself
/// with EBADF (io_uring cannot get a readable or writable file from it), the
/// target passes that errno on, and the block layer reports it to the reader
/// as EIO (`errno_to_blk_status`).
struct Chain {
    meta: File,
    extents: [OwnedFd; 2],
    journal: File,
    depth: u16,
    meta_reads: [AtomicU64; REGIONS],
    data_ops: [AtomicU64; REGIONS],
    data_errors: [AtomicU64; REGIONS],
    journal_writes: [AtomicU64; REGIONS],
    /// The errno of the last failed data operation.
    last_errno: AtomicU32,
}

impl AsyncTarget for Chain {
    type Queue<'a> = &'a Chain;
    fn queue(&self, _q: &QueueContext) -> std::io::Result<&Chain> {
        Ok(self)
    }
}

impl QueueTarget for &Chain {
    async fn handle(&self, mut io: Io<'_>) -> IoResult {
        let req = *io.request();
        if !matches!(req.op, Op::Read | Op::Write) {
            return Ok(0);
        }
        let region = (req.offset() / MIB) as usize;
        let len = req.len();
        // 1. The region's metadata.
        let (r, entry) = io.ring().read(&self.meta, vec![0u8; 4], region as u64 * 4).await;
        if r? != 4 {
            return Err(Errno::EIO);
        }
        self.meta_reads[region].fetch_add(1, SEQ);
        let extent = &self.extents[u32::from_le_bytes(entry[..4].try_into().unwrap()) as usize];
        // 2. The data.
        self.data_ops[region].fetch_add(1, SEQ);
        let r = match req.op {
            Op::Read => io.read_at(extent, 0..len, req.offset()).await,
            _ => io.write_at(extent, 0..len, req.offset(), 0).await,
        };
        let n = match r {
            Ok(n) if n as usize == len => n,
            Ok(_) => return Err(Errno::EIO),
            Err(e) => {
                self.data_errors[region].fetch_add(1, SEQ);
                self.last_errno.store(e.raw() as u32, SEQ);
                return Err(e);
            }
        };
        // 3. The journal record: op, offset, length, in the tag's slot.
        let mut rec = vec![0u8; 32];
        rec[0] = if req.op == Op::Read { b'R' } else { b'W' };
        rec[8..16].copy_from_slice(&req.offset().to_le_bytes());
        rec[16..24].copy_from_slice(&(len as u64).to_le_bytes());
        let slot = u64::from(req.q_id) * u64::from(self.depth) + u64::from(req.tag);
        let (r, _) = io.ring().write(&self.journal, rec, slot * 32, 0).await;
        if r? != 32 {
            return Err(Errno::EIO);
        }
        self.journal_writes[region].fetch_add(1, SEQ);
        Ok(n)
    }
}

fn counts(a: &[AtomicU64; REGIONS]) -> [u64; REGIONS] {
    std::array::from_fn(|i| a[i].load(SEQ))
}

driver_test! {
    /// Requests of three chained operations (metadata read, data, journal
    /// write) where the data operation fails for one region: the reader and
    /// the writer get EIO there, the journal write never runs for those
    /// requests, and the queues keep serving: fio verify on the other
    /// regions passes, and the lost region still fails the same way.
    fn aio_chained_operations_fail_in_the_middle() {
        let (meta, meta_path) = scratch_file("chain-meta", 4096);
        let mut map = vec![0u8; REGIONS * 4];
        map[LOST * 4..LOST * 4 + 4].copy_from_slice(&1u32.to_le_bytes());
        meta.write_all_at(&map, 0).unwrap();
        let (data, data_path) = scratch_file("chain-data", REGIONS as u64 * MIB);
        let lost = OpenOptions::new().read(true).custom_flags(libc::O_PATH).open(&data_path).unwrap();
        let depth = 32u16;
        let (journal, journal_path) = scratch_file("chain-journal", 2 * u64::from(depth) * 32);
        let target = Chain {
            meta,
            extents: [OwnedFd::from(data), OwnedFd::from(lost)],
            journal,
            depth,
            meta_reads: Default::default(),
            data_ops: Default::default(),
            data_errors: Default::default(),
            journal_writes: Default::default(),
            last_errno: AtomicU32::new(0),
        };
        let dev = DeviceBuilder::new().queues(2).depth(depth).size(REGIONS as u64 * MIB).create().unwrap();
        let lost_off = LOST as u64 * MIB + 64 * 1024;
        let stats = dev
            .serve_async(&target, |dev, stop| {
                let p = dev.block_path();
                let before = (counts(&target.meta_reads)[LOST], counts(&target.data_ops)[LOST]);
                let w = direct(&p, lost_off, 16384, Some(pattern(16384, 1).as_slice()));
                let r = direct(&p, lost_off, 16384, None);
                eprintln!("lost region: write {w:?}, read {:?}", r.as_ref().map(|_| "data"));
                assert_eq!(w.unwrap_err(), libc::EIO, "a write whose data operation failed");
                assert_eq!(r.unwrap_err(), libc::EIO, "a read whose data operation failed");
                assert_eq!(target.last_errno.load(SEQ), libc::EBADF as u32, "the data operation's own errno");
                assert!(counts(&target.meta_reads)[LOST] >= before.0 + 2, "operation 1 ran for both requests");
                assert!(counts(&target.data_ops)[LOST] >= before.1 + 2, "operation 2 ran for both requests");
                assert_eq!(counts(&target.journal_writes)[LOST], 0, "operation 3 ran after a failed operation 2");
                // The queues keep serving: fio verify on regions 0-3.
                fio_verify(&p, "randwrite", "--bsrange=4k-64k", 0, 4 * MIB);
                assert_eq!(direct(&p, lost_off, 4096, None).unwrap_err(), libc::EIO, "the lost region after fio");
                let d = pattern(8192, 3);
                direct(&p, 6 * MIB, 8192, Some(d.as_slice())).expect("a write to a good region");
                assert_eq!(direct(&p, 6 * MIB, 8192, None).expect("a read of a good region"), d);
                stop.stop();
            })
            .unwrap();
        let (meta_reads, data_ops, errors, journal) =
            (counts(&target.meta_reads), counts(&target.data_ops), counts(&target.data_errors), counts(&target.journal_writes));
        eprintln!("per region: metadata reads {meta_reads:?}, data ops {data_ops:?}, failed {errors:?}, journal writes {journal:?}");
        for r in 0..REGIONS {
            if r == LOST {
                assert_eq!(errors[r], data_ops[r], "every data operation on the lost region fails");
                assert_eq!(journal[r], 0, "no journal write for the lost region");
            } else {
                assert_eq!(errors[r], 0, "region {r}: data operations failed");
                assert_eq!(journal[r], data_ops[r], "region {r}: one journal write per successful data operation");
            }
        }
        assert!(journal[..4].iter().sum::<u64>() > 200, "fio's requests went through all three operations");
        let failed: u64 = stats.iter().map(|s| s.errors).sum();
        assert_eq!(failed, errors[LOST], "the queues failed exactly the requests whose data operation failed");
        for p in [meta_path, data_path, journal_path] {
            let _ = std::fs::remove_file(p);
        }
        assert_no_devices();
    }
}

// ---------------------------------------------------------------------------
// Completions from other threads

/// Work for the pool: copy `data` into the store at `off` (a write) or fill
/// it from there (a read); `drop_it`: drop the completer without an answer.
struct Job {
    write: bool,
    off: usize,
    data: Vec<u8>,
    drop_it: bool,
    done: Completer<(Vec<u8>, ThreadId)>,
}

/// The region (the last MiB) whose jobs the pool drops unanswered.
const DROPPED_AT: u64 = 15 * MIB;

/// A memory disk whose copies run on a pool of threads: each request's
/// future sends a job with a completer and awaits the completion, which a
/// pool thread fulfils.
struct Pool {
    jobs: mpsc::Sender<Job>,
    queue_threads: Mutex<Vec<ThreadId>>,
    /// Pool threads that answered, as the futures saw them.
    answered_by: Mutex<HashSet<ThreadId>>,
    answered: AtomicU64,
    /// Answers from the queue's own thread (there should be none).
    same_thread: AtomicU64,
    /// Completions that resolved to None (the pool dropped the completer).
    unanswered: AtomicU64,
}

impl AsyncTarget for Pool {
    type Queue<'a> = &'a Pool;
    fn queue(&self, _q: &QueueContext) -> std::io::Result<&Pool> {
        self.queue_threads.lock().unwrap().push(std::thread::current().id());
        Ok(self)
    }
}

impl QueueTarget for &Pool {
    async fn handle(&self, mut io: Io<'_>) -> IoResult {
        let req = *io.request();
        let (write, data) = match req.op {
            Op::Read => (false, vec![0u8; req.len()]),
            Op::Write => (true, io.data().to_vec()),
            _ => return Ok(0),
        };
        let (done, answer) = completion();
        let job = Job { write, off: req.offset() as usize, data, drop_it: req.offset() >= DROPPED_AT, done };
        self.jobs.send(job).map_err(|_| Errno::EIO)?;
        let Some((data, by)) = answer.await else {
            self.unanswered.fetch_add(1, SEQ);
            return Err(Errno::EIO);
        };
        if by == std::thread::current().id() {
            self.same_thread.fetch_add(1, SEQ);
        }
        self.answered_by.lock().unwrap().insert(by);
        self.answered.fetch_add(1, SEQ);
        if !write {
            io.data_mut().copy_from_slice(&data);
        }
        Ok(req.len() as u32)
    }
}

driver_test! {
    /// A thread-pool target: each request's copy runs on one of 3 pool
    /// threads, which fulfils the request's completion (waking the queue
    /// through its eventfd). fio verify passes; the answers came from the
    /// pool's threads, never the queue's; a dropped completer fails its
    /// request with EIO.
    fn aio_completions_from_a_thread_pool_carry_the_data() {
        let store = Arc::new(Mutex::new(vec![0u8; 16 * MIB as usize]));
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = vec![];
        for i in 0..3usize {
            let (rx, store) = (rx.clone(), store.clone());
            workers.push(std::thread::spawn(move || loop {
                let job = rx.lock().unwrap().recv();
                let Ok(mut job) = job else { return };
                if job.drop_it {
                    continue;
                }
                {
                    let mut m = store.lock().unwrap();
                    let r = job.off..job.off + job.data.len();
                    if job.write {
                        m[r].copy_from_slice(&job.data);
                    } else {
                        job.data.copy_from_slice(&m[r]);
                    }
                }
                // Now and then take longer than the queue polls, so that it
                // is asleep in io_uring_enter when the answer comes.
                if job.off / 4096 % 8 == i {
                    std::thread::sleep(Duration::from_micros(500));
                }
                job.done.complete((job.data, std::thread::current().id()));
            }));
        }
        let pool_threads: HashSet<ThreadId> = workers.iter().map(|w| w.thread().id()).collect();
        let target = Pool {
            jobs: tx,
            queue_threads: Mutex::new(vec![]),
            answered_by: Mutex::new(HashSet::new()),
            answered: AtomicU64::new(0),
            same_thread: AtomicU64::new(0),
            unanswered: AtomicU64::new(0),
        };
        let dev = DeviceBuilder::new().queues(2).depth(64).size(16 * MIB).create().unwrap();
        dev.serve_async(&target, |dev, stop| {
            fio_verify(&dev.block_path(), "randrw", "--bs=4k", 0, 8 * MIB);
            fio_verify(&dev.block_path(), "randwrite", "--bsrange=4k-128k", 8 * MIB, 6 * MIB);
            let before = target.unanswered.load(SEQ);
            assert_eq!(direct(&dev.block_path(), DROPPED_AT, 4096, None).unwrap_err(), libc::EIO, "a request whose completer was dropped");
            assert!(target.unanswered.load(SEQ) > before, "the completion resolved to None");
            stop.stop();
        })
        .unwrap();
        let Pool { jobs, queue_threads, answered_by, answered, same_thread, .. } = target;
        drop(jobs);
        for w in workers {
            w.join().unwrap();
        }
        let (queue_threads, answered_by) = (queue_threads.into_inner().unwrap(), answered_by.into_inner().unwrap());
        eprintln!("{} answers from {} pool threads; queue threads {queue_threads:?}", answered.load(SEQ), answered_by.len());
        assert!(answered.load(SEQ) > 2000, "fio's requests went through the pool");
        assert_eq!(same_thread.load(SEQ), 0, "answers computed on the queue's own thread");
        assert!(answered_by.is_subset(&pool_threads), "answers from threads outside the pool: {answered_by:?}");
        assert!(answered_by.len() >= 2, "the pool's threads shared the work: {answered_by:?}");
        assert!(queue_threads.iter().all(|q| !pool_threads.contains(q)));
        assert_no_devices();
    }
}

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

// ---------------------------------------------------------------------------
// Many operations in flight for one request

/// Pieces per request.
const PIECES: usize = 8;

/// Each request split into 8 pieces, each a read or write of its own on the
/// ring, all started before any is awaited, awaited last to first.
struct Split {
    file: File,
    requests: AtomicU64,
    ops: AtomicU64,
}

impl AsyncTarget for Split {
    type Queue<'a> = &'a Split;
    fn queue(&self, _q: &QueueContext) -> std::io::Result<&Split> {
        Ok(self)
    }
}

impl QueueTarget for &Split {
    async fn handle(&self, mut io: Io<'_>) -> IoResult {
        let req = *io.request();
        let (len, off) = (req.len(), req.offset());
        let write = match req.op {
            Op::Read => false,
            Op::Write => true,
            _ => return Ok(0),
        };
        let range = |i: usize| i * len / PIECES..(i + 1) * len / PIECES;
        let pieces: [Plain<'_>; PIECES] = std::array::from_fn(|i| {
            let r = range(i);
            let at = off + r.start as u64;
            if write {
                io.write_at(&self.file, r, at, 0)
            } else {
                io.read_at(&self.file, r, at)
            }
        });
        self.requests.fetch_add(1, SEQ);
        self.ops.fetch_add(PIECES as u64, SEQ);
        for (i, piece) in pieces.into_iter().enumerate().rev() {
            let n = piece.await?;
            if n as usize != range(i).len() {
                return Err(Errno::EIO);
            }
        }
        Ok(len as u32)
    }
}

driver_test! {
    /// Each request is 8 operations in flight at once (started together,
    /// awaited last to first): fio verify passes with 4k-256k requests, and
    /// the data is in the file.
    fn aio_many_operations_in_flight_per_request_carry_the_data() {
        let (file, path) = scratch_file("split", 32 * MIB);
        let target = Split { file, requests: 0.into(), ops: 0.into() };
        let dev = DeviceBuilder::new().queues(2).depth(64).size(32 * MIB).create().unwrap();
        dev.serve_async(&target, |dev, stop| {
            fio_verify(&dev.block_path(), "randwrite", "--bsrange=4k-256k", 0, 32 * MIB);
            let d = pattern(65536, 11);
            direct(&dev.block_path(), 3 * MIB, 65536, Some(d.as_slice())).unwrap();
            stop.stop();
        })
        .unwrap();
        let (reqs, ops) = (target.requests.load(SEQ), target.ops.load(SEQ));
        eprintln!("{reqs} requests, {ops} operations");
        assert!(reqs > 500, "fio's requests: {reqs}");
        assert_eq!(ops, reqs * PIECES as u64);
        let mut got = vec![0u8; 65536];
        target.file.read_exact_at(&mut got, 3 * MIB).unwrap();
        assert!(got == pattern(65536, 11), "the file holds what was written through 8 operations");
        let _ = std::fs::remove_file(&path);
        assert_no_devices();
    }
}

//! Async targets (`ublk::aio`) against the real driver, how a request is
//! answered: requests answered out of order, chained operations with a
//! failure in the middle, completions fulfilled by other threads, and many
//! operations in flight for one request. Operations cancelled while in
//! flight (a stop, a dropped operation) and their buffers are in
//! aio_cancel.rs; buffers registered with the queue's ring in aio_fixed.rs.

mod aio_util;

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use aio_util::*;
use ublk::aio::{completion, AsyncTarget, Completer, Io, Plain, QueueContext, QueueTarget};
use ublk::{DeviceBuilder, Errno, IoResult, Op};
use ublk_tests::*;

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

//! One queue of a device: its io_uring on `/dev/ublkcN`, its descriptors and
//! its buffers, owned by exactly one thread.
//!
//! The kernel ties a queue (6.1–6.15) or a tag (6.16+) to the task that
//! fetched it: a `COMMIT_AND_FETCH_REQ` from any other thread is -EINVAL, and
//! requests are only delivered to the fetching task. [`Queue`] is therefore
//! `!Send` and `!Sync`: it is created on the thread that will serve it and
//! cannot leave it, so "FETCH from another thread" cannot be written.

use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use ublk_sys as sys;

pub use crate::buffers::{desc_len, desc_offset, page_size};
use crate::buffers::{IoBufs, Mapping};
use crate::ctrl::{Control, DevInfo, Encoding};
use crate::error::{hints, Cmd, Error, Result};
use crate::placement::Follower;
pub use crate::stats::QueueStats;
use crate::target::{settle, Op, Request, Settled, Target, TargetIo};

/// An io command: kernel name, legacy number, encoded opcode.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IoOp {
    name: &'static str,
    legacy: u32,
    encoded: u32,
}

const FETCH_REQ: IoOp = IoOp { name: "FETCH_REQ", legacy: sys::UBLK_IO_FETCH_REQ, encoded: sys::UBLK_U_IO_FETCH_REQ };
const COMMIT_AND_FETCH_REQ: IoOp =
    IoOp { name: "COMMIT_AND_FETCH_REQ", legacy: sys::UBLK_IO_COMMIT_AND_FETCH_REQ, encoded: sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ };

/// How long a queue thread polls its ring for the next request before it
/// sleeps, by default. Under the test VMs' emulation a request's round trip
/// takes tens of microseconds; on hardware a few. Polling costs CPU only
/// while requests keep coming, and at most this long after the last one.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(200);

/// `IORING_ENTER_GETEVENTS` (linux/io_uring.h): run task work, reap.
const IORING_ENTER_GETEVENTS: u32 = 1;

/// user_data of the wake-up poll; tags use 0..depth.
const WAKE: u64 = u64::MAX;
/// user_data of the cancellation of target operations at teardown.
const CANCEL: u64 = u64::MAX - 1;
/// user_data bit of a target operation (the low 16 bits are the tag).
const TARGET_OP: u64 = 1 << 32;

/// One queue, bound to the thread that created it.
pub struct Queue {
    ring: IoUring<squeue::Entry, cqueue::Entry>,
    dev_id: u32,
    q_id: u16,
    depth: u16,
    encoding: Encoding,
    descs: Mapping,
    /// Per-tag buffers; `None` under USER_COPY (the kernel copies nothing).
    bufs: Option<Arc<IoBufs>>,
    /// Whether someone else (the [`Device`](crate::Device)) keeps `bufs`
    /// until the kernel can no longer touch them.
    bufs_kept: bool,
    wake: Option<RawFd>,
    /// Tags with a command outstanding in the kernel (FETCH or COMMIT_AND_FETCH).
    live_tags: u16,
    /// Tags with a target operation in flight on the ring.
    ops_in_flight: u16,
    /// Per tag: the server owns its request (between the CQE that delivered
    /// it and the commit).
    held: Vec<bool>,
    /// Per tag: a target operation is in flight.
    in_op: Vec<bool>,
    /// The wake-up eventfd fired (possibly already during `fetch_all`).
    woken: bool,
    /// Each tag's request while the server owns it.
    reqs: Vec<Request>,
    /// Bytes of each tag's request transferred by earlier, short operations.
    done: Vec<u32>,
    /// How long to busy-poll the ring before sleeping in io_uring_enter.
    busy_poll: Duration,
    /// Follows the load for [`crate::Placement::Auto`].
    follower: Option<Follower>,
    stats: QueueStats,
    /// Raw pointers are neither Send nor Sync: the queue stays on its thread.
    _thread_bound: PhantomData<*mut ()>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").field("dev_id", &self.dev_id).field("q_id", &self.q_id).field("depth", &self.depth).finish()
    }
}

impl Queue {
    /// Sets up queue `q_id` of the device described by `info` on the calling
    /// thread: maps its descriptors read-only, allocates one page-aligned
    /// buffer of `max_io_buf_bytes` per tag (none under USER_COPY), creates
    /// its ring and registers `/dev/ublkcN` in it. `wake` is an eventfd whose
    /// readability makes [`Queue::serve`] return once the device is stopped.
    ///
    /// The kernel copies up to its own `max_io_buf_bytes` into each tag's
    /// buffer, so the buffers must be sized from the kernel's values, not the
    /// caller's: `char_fd` must be `/dev/ublkcN` of `info.dev_id`, and `info`
    /// must agree with what the kernel reports for that device
    /// (GET_DEV_INFO); anything else is refused with
    /// [`Error::InvalidConfig`].
    pub fn new(char_fd: RawFd, info: &DevInfo, q_id: u16, encoding: Encoding, wake: Option<RawFd>, target_files: &[RawFd]) -> Result<Self> {
        verify_device(char_fd, info)?;
        let bufs = if user_copy(info) { None } else { Some(Arc::new(IoBufs::new(info.max_io_buf_bytes, info.queue_depth, q_id)?)) };
        Self::with_bufs(char_fd, info, q_id, encoding, wake, target_files, bufs, false)
    }

    /// [`Queue::new`] for a device whose `info` came from the kernel, with
    /// buffers that the caller keeps (`bufs_kept`) until the kernel is done
    /// with them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn with_bufs(
        char_fd: RawFd,
        info: &DevInfo,
        q_id: u16,
        encoding: Encoding,
        wake: Option<RawFd>,
        target_files: &[RawFd],
        bufs: Option<Arc<IoBufs>>,
        bufs_kept: bool,
    ) -> Result<Self> {
        if q_id >= info.nr_hw_queues {
            return Err(Error::InvalidConfig {
                what: "queue id",
                why: format!("queue {q_id} does not exist: the device has {} queues", info.nr_hw_queues),
            });
        }
        let depth = info.queue_depth;
        let descs = Mapping::new(
            desc_len(depth),
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            char_fd,
            desc_offset(q_id),
            &format!("mapping the descriptors of queue {q_id}"),
        )?;
        // One slot per tag (its io command or its target operation) and one
        // for the wake-up poll.
        let entries = u32::from(depth) + 1;
        let ring = build_ring(entries)?;
        let mut files = vec![char_fd];
        files.extend_from_slice(target_files);
        ring.submitter().register_files(&files).map_err(|e| Error::os("registering /dev/ublkcN with the queue's ring", e))?;
        let blank = Request { q_id, tag: 0, op: Op::Other(0xff), flags: 0, start_sector: 0, nr_sectors: 0 };
        Ok(Queue {
            ring,
            dev_id: info.dev_id,
            q_id,
            depth,
            encoding,
            descs,
            bufs,
            bufs_kept,
            wake,
            live_tags: 0,
            ops_in_flight: 0,
            held: vec![false; usize::from(depth)],
            in_op: vec![false; usize::from(depth)],
            woken: false,
            reqs: vec![blank; usize::from(depth)],
            done: vec![0; usize::from(depth)],
            busy_poll: DEFAULT_BUSY_POLL,
            follower: None,
            stats: QueueStats { q_id, ..Default::default() },
            _thread_bound: PhantomData,
        })
    }

    /// Queue id.
    pub fn id(&self) -> u16 {
        self.q_id
    }

    /// How long [`Queue::serve`] keeps polling its ring for new requests
    /// after a batch before it sleeps in `io_uring_enter` (default
    /// [`DEFAULT_BUSY_POLL`]; zero: always sleep).
    pub fn set_busy_poll(&mut self, d: Duration) {
        self.busy_poll = d;
    }

    /// Lets the queue follow the load while it serves ([`crate::Placement::Auto`]).
    pub(crate) fn set_follower(&mut self, f: Option<Follower>) {
        self.follower = f;
    }

    fn opcode(&self, op: IoOp) -> u32 {
        match self.encoding {
            Encoding::Legacy => op.legacy,
            Encoding::Ioctl => op.encoded,
        }
    }

    /// The tag's buffer address for FETCH/COMMIT: 0 under USER_COPY, where
    /// the kernel refuses any other value.
    fn buf_addr(&self, tag: u16) -> u64 {
        self.bufs.as_ref().map_or(0, |b| b.addr(tag))
    }

    /// Builds the io command SQE: `IORING_OP_URING_CMD` on the registered
    /// `/dev/ublkcN` (fixed file 0), `cmd_op` at byte 8, the 16-byte
    /// `ublksrv_io_cmd` at byte 48.
    fn io_sqe(&self, op: IoOp, tag: u16, result: i32) -> squeue::Entry {
        let cmd = sys::ublksrv_io_cmd::new(self.q_id, tag, result, self.buf_addr(tag));
        opcode::UringCmd16::new(types::Fixed(0), self.opcode(op)).cmd(io_cmd_bytes(&cmd)).build().user_data(u64::from(tag))
    }

    fn push(&mut self, sqe: &squeue::Entry) {
        // SAFETY: the command's buffer (`addr`) is this queue's mapping, which
        // lives as long as the ring; the ring has room for one command per
        // tag plus the wake-up poll, and each tag has at most one outstanding.
        let pushed = unsafe { self.ring.submission().push(sqe) };
        debug_assert!(pushed.is_ok(), "queue ring full");
        if pushed.is_err() {
            let _ = self.ring.submit();
            // SAFETY: as above.
            let _ = unsafe { self.ring.submission().push(sqe) };
        }
    }

    /// Issues `FETCH_REQ` for every tag, from this (the queue's) thread, and
    /// reports the kernel's refusal, if any. START_DEV can complete only
    /// after every queue did this.
    pub fn fetch_all(&mut self) -> Result<()> {
        for tag in 0..self.depth {
            let sqe = self.io_sqe(FETCH_REQ, tag, -1);
            self.push(&sqe);
        }
        if let Some(fd) = self.wake {
            let poll = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build().user_data(WAKE);
            self.push(&poll);
        }
        self.ring.submit().map_err(|e| Error::os("submitting FETCH_REQ", e))?;
        self.live_tags = self.depth;
        // FETCHes complete only when a request arrives; anything here now is
        // a refusal (or the wake-up, if the device is already being torn down).
        let mut refused = None;
        while let Some(cqe) = self.ring.completion().next() {
            match cqe.user_data() {
                WAKE => self.woken = true,
                ud if refused.is_none() => refused = Some((ud as u16, cqe.result())),
                _ => {}
            }
        }
        if let Some((tag, res)) = refused {
            return Err(self.io_error(FETCH_REQ, tag, res));
        }
        Ok(())
    }

    fn io_error(&self, op: IoOp, tag: u16, res: i32) -> Error {
        let errno = -res;
        Error::Kernel {
            cmd: Cmd::Io(op.name),
            dev_id: Some(self.dev_id),
            q_id: Some(self.q_id),
            tag: Some(tag),
            errno,
            hints: hints(Cmd::Io(op.name), errno),
        }
    }

    /// Serves requests until the device is stopped (every tag aborted, or
    /// the wake-up eventfd fires), answering each with `target`. Completions
    /// are reaped and commits submitted in batches: one `io_uring_enter` per
    /// batch, no allocation per request.
    ///
    /// Before returning, the queue waits for the target operations it has in
    /// flight, so none of them outlives the call. A target that needs request
    /// data ([`Target::needs_data`]) is refused on a queue without buffers
    /// (a device created with `UBLK_F_USER_COPY`).
    pub fn serve<T: Target + ?Sized>(&mut self, target: &T) -> Result<QueueStats> {
        if self.bufs.is_none() && target.needs_data() {
            return Err(Error::InvalidConfig {
                what: "data path",
                why: "the device was created with UBLK_F_USER_COPY (DataPath::NoData), so the kernel hands the server no data, but this target reads or writes request data; create the device with DataPath::Copy".into(),
            });
        }
        self.serve_notify(target, &|| {})
    }

    /// [`Queue::serve`], calling `on_panic` at once when the target panics.
    ///
    /// A panicking target does not take the queue down with it: the queue
    /// fails the requests it holds with EIO, calls `on_panic` (the device
    /// starts its teardown) and keeps answering every request with EIO,
    /// without the target, until the device is stopped; then the panic
    /// resumes. A queue thread that died instead would leave the kernel to
    /// fail what it held, which 6.6-6.15 do only if some command of the queue
    /// is still parked, and never while START_DEV's partition scan waits.
    pub(crate) fn serve_notify<T: Target + ?Sized>(&mut self, target: &T, on_panic: &dyn Fn()) -> Result<QueueStats> {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.serve_inner(target)));
        let r = match r {
            Ok(r) => r,
            Err(payload) => {
                self.fail_held();
                on_panic();
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.serve_inner(&FailAll)));
                self.drain();
                std::panic::resume_unwind(payload)
            }
        };
        // Whatever else ended the loop (the device stopping, a refused
        // command), the queue's target operations are over and the requests
        // it holds committed before it returns.
        self.drain();
        r
    }

    fn serve_inner<T: Target + ?Sized>(&mut self, target: &T) -> Result<QueueStats> {
        let mut stopping = self.woken;
        while (self.live_tags > 0 || self.ops_in_flight > 0) && !stopping {
            match self.enter() {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(Error::os("io_uring_enter on the queue ring", e)),
            }
            loop {
                let Some(cqe) = self.ring.completion().next() else { break };
                let ud = cqe.user_data();
                if ud == WAKE {
                    self.woken = true;
                    stopping = true;
                    continue;
                }
                if ud == CANCEL {
                    continue;
                }
                let tag = ud as u16;
                let res = cqe.result();
                if ud & TARGET_OP != 0 {
                    // The target's operation for this tag finished.
                    match self.op_done(tag, res, true) {
                        Settled::Commit(result) => self.commit(tag, result),
                        Settled::Rest { done } => {
                            self.done[usize::from(tag)] = done;
                            self.start(target, tag);
                        }
                    }
                } else if res == sys::UBLK_IO_RES_OK as i32 {
                    self.live_tags -= 1;
                    self.held[usize::from(tag)] = true;
                    self.handle(target, tag);
                } else if res == sys::UBLK_IO_RES_ABORT {
                    // The device is going away: this tag is done.
                    self.live_tags -= 1;
                } else {
                    self.live_tags -= 1;
                    return Err(self.io_error(COMMIT_AND_FETCH_REQ, tag, res));
                }
            }
            if let Some(f) = &mut self.follower {
                if let Some(m) = f.tick(self.stats.requests()) {
                    f.apply(m);
                    self.stats.moves += 1;
                }
            }
        }
        Ok(self.stats)
    }

    /// Ends the queue's part in every request it holds: cancels its target
    /// operations (one waiting on a socket whose peer is gone would never
    /// end) and waits for them, since their buffers (the tags', the
    /// target's) must not be written after the queue is gone; then commits
    /// every request it still holds, with the operation's result where it
    /// completed in full and EIO otherwise, and submits. Each commit parks a
    /// FETCH again, which the kernel aborts at STOP_DEV or when the ring is
    /// closed; a held request nobody commits would, on 6.6-6.15, never be
    /// failed at all. Needs no target: runs after a panic and on drop.
    fn drain(&mut self) {
        if self.ops_in_flight > 0 {
            let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any()).build().user_data(CANCEL);
            self.push(&cancel);
        }
        while self.ops_in_flight > 0 {
            match self.ring.submit_and_wait(1).map_err(|e| e.raw_os_error()) {
                Ok(_) | Err(Some(libc::EINTR)) => {}
                Err(Some(libc::EAGAIN)) | Err(Some(libc::EBUSY)) => std::thread::sleep(Duration::from_millis(1)),
                // The ring cannot wait: leave the buffers alone (see Drop).
                Err(_) => return,
            }
            loop {
                let Some(cqe) = self.ring.completion().next() else { break };
                match cqe.user_data() {
                    WAKE => self.woken = true,
                    CANCEL => {}
                    ud if ud & TARGET_OP != 0 => {
                        let tag = ud as u16;
                        // Keep a complete result; anything else fails.
                        if let Settled::Commit(result) = self.op_done(tag, cqe.result(), false) {
                            self.commit(tag, result);
                        }
                    }
                    ud => {
                        // A request delivered meanwhile is held too.
                        self.live_tags = self.live_tags.saturating_sub(1);
                        if cqe.result() == sys::UBLK_IO_RES_OK as i32 {
                            self.held[usize::from(ud as u16)] = true;
                        }
                    }
                }
            }
        }
        self.fail_held();
    }

    /// Commits EIO for every request the queue holds without an operation
    /// in flight, and submits.
    fn fail_held(&mut self) {
        for tag in 0..self.depth {
            if self.held[usize::from(tag)] && !self.in_op[usize::from(tag)] {
                self.commit(tag, -libc::EIO);
            }
        }
        let _ = self.ring.submit();
    }

    /// A target operation of `tag` completed with `res` (bytes or -errno):
    /// what to commit, by the rule of [`IoResult`](crate::IoResult), or
    /// (with `retry`) that the target must be asked for the rest.
    fn op_done(&mut self, tag: u16, res: i32, retry: bool) -> Settled {
        self.ops_in_flight -= 1;
        self.in_op[usize::from(tag)] = false;
        let answer = if res < 0 { Err(-res) } else { Ok(res as u32) };
        let (settled, invalid) = settle(&self.reqs[usize::from(tag)], self.done[usize::from(tag)], answer, retry);
        self.stats.invalid += u64::from(invalid);
        settled
    }

    /// Queues the tag's COMMIT_AND_FETCH_REQ with `result`.
    fn commit(&mut self, tag: u16, result: i32) {
        self.held[usize::from(tag)] = false;
        if result < 0 {
            self.stats.errors += 1;
        }
        let sqe = self.io_sqe(COMMIT_AND_FETCH_REQ, tag, result);
        self.push(&sqe);
        self.live_tags += 1;
    }

    /// Submits pending commits and gets the next completions.
    ///
    /// Without busy polling: one `io_uring_enter` that submits and sleeps
    /// until a completion. With it: submit and run queued task work without
    /// sleeping; if nothing completed, watch the ring's `IORING_SQ_TASKRUN`
    /// flag, which the kernel sets when it queues work for us (a request
    /// arriving), for up to `busy_poll`, then sleep. A queue thread that is
    /// not asleep needs no wake-up: the submitter only links the request in,
    /// and the round trip loses the scheduler's wake-up latency. Every 64
    /// polls the thread yields, so a runnable task on its CPU (possibly the
    /// very submitter it is waiting for) is not held off. A thread at home
    /// ([`crate::Placement::Auto`]) shares its CPU with its submitter and
    /// always sleeps.
    fn enter(&mut self) -> std::io::Result<()> {
        let at_home = self.follower.as_ref().is_some_and(Follower::at_home);
        if !self.busy_poll.is_zero() && !at_home && self.poll()? {
            self.stats.polled += 1;
            return Ok(());
        }
        self.stats.enters += 1;
        self.stats.waits += 1;
        self.ring.submit_and_wait(1)?;
        Ok(())
    }

    /// Submits, then polls for completions for up to `busy_poll`; whether
    /// any arrived.
    fn poll(&mut self) -> std::io::Result<bool> {
        let n = self.ring.submission().len() as u32;
        self.enter_nowait(n)?;
        let t0 = Instant::now();
        let mut polls = 0u32;
        loop {
            // Completions come from task work we ran (below), or, without
            // DEFER_TASKRUN, from task work run on the way out of any
            // syscall (sched_yield below).
            if !self.ring.completion().is_empty() {
                return Ok(true);
            }
            if self.ring.submission().taskrun() {
                self.enter_nowait(0)?;
            }
            std::hint::spin_loop();
            polls = polls.wrapping_add(1);
            if polls % 64 == 0 {
                if t0.elapsed() >= self.busy_poll {
                    break;
                }
                // SAFETY: sched_yield takes no arguments and cannot fail in a
                // way that matters here.
                unsafe { libc::sched_yield() };
            }
        }
        Ok(false)
    }

    fn enter_nowait(&mut self, to_submit: u32) -> std::io::Result<()> {
        self.stats.enters += 1;
        // SAFETY: no argument pointer is passed; io_uring_enter only submits
        // SQEs already pushed (valid per `push`) and runs task work.
        unsafe { self.ring.submitter().enter::<libc::sigset_t>(to_submit, 0, IORING_ENTER_GETEVENTS, None)? };
        Ok(())
    }

    /// Reads the tag's descriptor, counts the request and starts it.
    fn handle<T: Target + ?Sized>(&mut self, target: &T, tag: u16) {
        debug_assert!(tag < self.depth);
        // SAFETY: tag < depth, so the descriptor lies inside the read-only
        // mapping. The kernel writes descriptors concurrently with us in
        // general, but wrote this tag's before completing its command (the CQE
        // we just read orders that write before this read) and will not touch
        // it again until we commit; a volatile copy reads it exactly once.
        let d: sys::ublksrv_io_desc =
            unsafe { std::ptr::read_volatile((self.descs.ptr() as *const sys::ublksrv_io_desc).add(usize::from(tag))) };
        let req = Request {
            q_id: self.q_id,
            tag,
            op: Op::from_raw(d.op()),
            flags: d.flags(),
            start_sector: d.start_sector,
            nr_sectors: d.nr_sectors(),
        };
        let s = &mut self.stats;
        match req.op {
            Op::Read => s.reads += 1,
            Op::Write => s.writes += 1,
            Op::Flush => s.flushes += 1,
            Op::Discard => s.discards += 1,
            Op::WriteZeroes => s.write_zeroes += 1,
            Op::Other(_) => {
                s.unsupported += 1;
                return self.commit(tag, -libc::EOPNOTSUPP);
            }
        }
        if matches!(req.op, Op::Read | Op::Write) {
            let fits = self.bufs.as_ref().is_none_or(|b| req.len() <= b.buf_size());
            if !fits {
                // The kernel never sends more than max_io_buf_bytes; refuse
                // rather than hand out a short buffer.
                self.stats.invalid += 1;
                return self.commit(tag, -libc::EIO);
            }
            self.stats.bytes += req.len() as u64;
        }
        self.reqs[usize::from(tag)] = req;
        self.done[usize::from(tag)] = 0;
        self.start(target, tag);
    }

    /// Runs the target on the part of the tag's request not done yet.
    fn start<T: Target + ?Sized>(&mut self, target: &T, tag: u16) {
        let full = self.reqs[usize::from(tag)];
        let done = self.done[usize::from(tag)];
        let data = matches!(full.op, Op::Read | Op::Write);
        let mut req = full;
        if done > 0 {
            req.start_sector += u64::from(done >> 9);
            req.nr_sectors -= done >> 9;
        }
        let buf: &mut [u8] = match &self.bufs {
            // SAFETY: the server owns the tag's request between the CQE that
            // delivered it and our commit, so the kernel does not touch the
            // buffer; this is the only reference made to it (the target's
            // operation, if any, is what uses it next, and the commit waits
            // for its completion).
            Some(b) if data => unsafe { b.slice(tag, done as usize, full.len()) },
            // No data for this op, or USER_COPY (only targets that need no
            // data run there, see `serve`).
            _ => &mut [],
        };
        // The operation is counted when pushed (inside `push`), so a target
        // that panics after pushing leaves it counted for `drain`.
        let mut io = TargetIo {
            sq: self.ring.submission(),
            user_data: TARGET_OP | u64::from(tag),
            pushed: false,
            ops_in_flight: &mut self.ops_in_flight,
            in_op: &mut self.in_op[usize::from(tag)],
        };
        let answer = target.submit(&req, buf, &mut io);
        let pushed = io.pushed;
        drop(io);
        match answer {
            None if pushed => {}
            None => {
                // Nothing to wait for: a target bug that would leave the tag
                // (and the kernel's request) stuck forever.
                self.stats.invalid += 1;
                self.commit(tag, -libc::EIO);
            }
            Some(answer) => {
                // An answer on the spot after pushing an operation would let
                // the operation outlive the request: refuse the answer, wait
                // for the operation.
                if pushed {
                    self.stats.invalid += 1;
                    return;
                }
                let (settled, invalid) = settle(&full, done, answer, false);
                self.stats.invalid += u64::from(invalid);
                match settled {
                    Settled::Commit(result) => self.commit(tag, result),
                    Settled::Rest { .. } => unreachable!("no retry for direct answers"),
                }
            }
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // After a panic that unwound through `serve`, or a queue never
        // served: end what is in flight before the ring and buffers go.
        self.drain();
        // Closing the ring ends its operations only asynchronously, and the
        // kernel may still copy into a tag's buffer while that tag's command
        // is outstanding. Buffers that nobody else keeps are unmapped only
        // when nothing can touch them; otherwise they are leaked (memory, not
        // memory safety, is lost).
        if self.live_tags > 0 || self.ops_in_flight > 0 {
            if let Some(b) = self.bufs.take() {
                if !self.bufs_kept {
                    std::mem::forget(b);
                }
            }
        }
    }
}

/// Checks that `char_fd` is `/dev/ublkcN` of `info.dev_id` and that `info`
/// agrees with the kernel's view of that device, on what the queue's memory
/// is sized from.
fn verify_device(char_fd: RawFd, info: &DevInfo) -> Result<()> {
    let bad = |why: String| Error::InvalidConfig { what: "queue device", why };
    let id = info.dev_id;
    // SAFETY: fstat writes one `struct stat` into `st`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; an invalid fd is reported as an error.
    if unsafe { libc::fstat(char_fd, &mut st) } != 0 {
        return Err(Error::os(format!("fstat of the fd given as /dev/ublkc{id}"), std::io::Error::last_os_error()));
    }
    let sys_dev = std::fs::read_to_string(format!("/sys/class/ublk-char/ublkc{id}/dev")).unwrap_or_default();
    let want = sys_dev.trim().split_once(':').and_then(|(a, b)| Some(libc::makedev(a.parse().ok()?, b.parse().ok()?)));
    if (st.st_mode & libc::S_IFMT) != libc::S_IFCHR || want != Some(st.st_rdev) {
        return Err(bad(format!("the fd is not /dev/ublkc{id}; open that device and pass its fd")));
    }
    let k = Control::open()?.get_dev_info(id)?;
    if (k.nr_hw_queues, k.queue_depth, k.max_io_buf_bytes, user_copy(&k))
        != (info.nr_hw_queues, info.queue_depth, info.max_io_buf_bytes, user_copy(info))
    {
        return Err(bad(format!(
            "the DevInfo given for device {id} ({} queues x {} tags, {} bytes per io) differs from the kernel's ({} x {}, {}); pass the DevInfo that ADD_DEV or GET_DEV_INFO returned",
            info.nr_hw_queues, info.queue_depth, info.max_io_buf_bytes, k.nr_hw_queues, k.queue_depth, k.max_io_buf_bytes
        )));
    }
    Ok(())
}

/// What a queue whose target panicked answers until the device is stopped.
struct FailAll;

impl Target for FailAll {
    fn handle(&self, _req: &Request, _buf: &mut [u8]) -> crate::IoResult {
        Err(libc::EIO)
    }
    fn needs_data(&self) -> bool {
        false
    }
}

/// Whether the device was created with `UBLK_F_USER_COPY`: the kernel then
/// moves no data itself and io commands carry buffer address 0.
pub(crate) fn user_copy(info: &DevInfo) -> bool {
    info.flags & sys::abi::UBLK_F_USER_COPY != 0
}

/// The 16 bytes of an io command, as they go to SQE bytes 48..64.
pub(crate) fn io_cmd_bytes(cmd: &sys::ublksrv_io_cmd) -> [u8; 16] {
    const _: () = assert!(std::mem::size_of::<sys::ublksrv_io_cmd>() == 16);
    // SAFETY: ublksrv_io_cmd is 16 bytes of plain integers without padding
    // (u16, u16, s32, u64; checked against C by ublk-sys's layout tests).
    unsafe { std::mem::transmute_copy(cmd) }
}

/// A queue ring: 64-byte SQEs (io commands carry 16 bytes at byte 48), with
/// the flags that cut wake-ups where the kernel has them (COOP_TASKRUN 5.19,
/// SINGLE_ISSUER 6.0, DEFER_TASKRUN 6.1), falling back step by step.
fn build_ring(entries: u32) -> Result<IoUring<squeue::Entry, cqueue::Entry>> {
    let tries: [fn(&mut io_uring::Builder); 3] = [
        |b| {
            b.setup_coop_taskrun().setup_taskrun_flag().setup_single_issuer().setup_defer_taskrun();
        },
        |b| {
            b.setup_coop_taskrun().setup_taskrun_flag();
        },
        |_| {},
    ];
    let mut last = None;
    for t in tries {
        let mut b = IoUring::builder();
        t(&mut b);
        match b.build(entries) {
            Ok(r) => return Ok(r),
            Err(e) => last = Some(e),
        }
    }
    Err(Error::os("creating the queue io_uring", last.unwrap()))
}

/// An eventfd used to wake queue threads at teardown.
#[derive(Debug)]
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> Result<Self> {
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(Error::os("creating an eventfd", std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor we own.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    pub(crate) fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.0.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
    }
}

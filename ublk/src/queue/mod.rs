//! One queue of a device: its io_uring on `/dev/ublkcN`, its descriptors and
//! its buffers, owned by exactly one thread.
//!
//! The kernel ties a queue (6.1–6.15) or a tag (6.16+) to the task that
//! fetched it: a `COMMIT_AND_FETCH_REQ` from any other thread is -EINVAL, and
//! requests are only delivered to the fetching task. [`Queue`] is therefore
//! `!Send` and `!Sync`: it is created on the thread that will serve it and
//! cannot leave it, so "FETCH from another thread" cannot be written.

mod batch;
mod exec;
mod ring;

use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types};
use ublk_sys as sys;

use crate::aio::reactor::{Reactor, ASYNC_OP, OP_CANCEL};
pub use crate::buffers::{desc_len, desc_offset, page_size};
use crate::buffers::{IoBufs, Mapping};
use crate::ctrl::{Control, DevInfo, Encoding};
use crate::errno::Errno;
use crate::error::{hints, Cmd, Error, Result};
use crate::placement::Follower;
pub use crate::stats::QueueStats;
use crate::target::{settle, Op, Request, Target};
use batch::{Batch, Fetched, BATCH_CMD, BATCH_FETCH};
pub(crate) use ring::EventFd;
use ring::{
    buf_reg_sqe, build_ring, drain_eventfd, io_sqe, IoOp, COMMIT_AND_FETCH_REQ, COMMIT_IO_CMDS, FETCH_IO_CMDS, FETCH_REQ, PREP_IO_CMDS,
};

/// How long a queue thread polls its ring for the next request before it
/// sleeps, by default. Under the test VMs' emulation a request's round trip
/// takes tens of microseconds; on hardware a few. Polling costs CPU only
/// while requests keep coming, and at most this long after the last one.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(200);

/// `IORING_ENTER_GETEVENTS` (linux/io_uring.h): run task work, reap.
const IORING_ENTER_GETEVENTS: u32 = 1;

/// user_data of the teardown wake-up poll; tags use 0..depth.
pub(crate) const WAKE: u64 = u64::MAX;
/// user_data of the cancellation of target operations at teardown.
const CANCEL: u64 = u64::MAX - 1;
/// user_data of the poll on the queue's own eventfd, which wakers on other
/// threads write.
const NOTIFY: u64 = u64::MAX - 3;
/// user_data bit of a request buffer registration (`UBLK_U_IO_REGISTER_IO_BUF`,
/// `UNREGISTER`); the low 16 bits are the tag.
pub(crate) const BUF_REG: u64 = 1 << 34;
/// user_data bit of an unregistration (only its failure completes).
pub(crate) const BUF_UNREG: u64 = 1 << 35;
/// How long a queue waits for its target's operations to end after
/// cancelling them before it gives up and leaks their memory.
const END_OPS_LIMIT: Duration = Duration::from_secs(30);

/// Where request `tag` of queue `q_id` is in `/dev/ublkcN` under
/// `UBLK_F_USER_COPY`: `pread` there reads a WRITE's data, `pwrite` there
/// gives a READ's (`UBLKSRV_IO_BUF_OFFSET + (q_id << UBLK_QID_OFF | tag <<
/// UBLK_TAG_OFF)`, plus the byte offset within the request).
pub fn user_copy_offset(q_id: u16, tag: u16) -> u64 {
    u64::from(sys::UBLKSRV_IO_BUF_OFFSET) + ((u64::from(q_id) << sys::abi::UBLK_QID_OFF) | (u64::from(tag) << sys::abi::UBLK_TAG_OFF))
}

/// How a zero-copy queue gets each request's pages into its ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroCopy {
    /// Not zero copy.
    Off,
    /// `UBLK_F_SUPPORT_ZERO_COPY`: the queue registers each READ/WRITE's
    /// pages at index `tag` and unregisters them at its commit.
    Explicit,
    /// `UBLK_F_AUTO_BUF_REG`: the kernel registers them at index `tag`
    /// before delivering the request and unregisters them at the commit; a
    /// request it could not register (`UBLK_IO_F_NEED_REG_BUF`) the queue
    /// registers at `depth + tag`.
    Auto,
}

impl ZeroCopy {
    pub(crate) fn of(info: &DevInfo) -> ZeroCopy {
        if info.flags & sys::abi::UBLK_F_AUTO_BUF_REG != 0 {
            ZeroCopy::Auto
        } else if info.flags & sys::abi::UBLK_F_SUPPORT_ZERO_COPY != 0 {
            ZeroCopy::Explicit
        } else {
            ZeroCopy::Off
        }
    }
}

/// One queue, bound to the thread that created it.
pub struct Queue {
    /// The ring (shared with the futures of an async target).
    reactor: Rc<Reactor>,
    dev_id: u32,
    q_id: u16,
    depth: u16,
    encoding: Encoding,
    descs: Mapping,
    /// Per-tag buffers; `None` when no data moves through the server.
    bufs: Option<Arc<IoBufs>>,
    /// Whether someone else (the [`Device`](crate::Device)) keeps `bufs`
    /// until the kernel can no longer touch them.
    bufs_kept: bool,
    /// `/dev/ublkcN` for copies under `UBLK_F_USER_COPY` (a duplicate, so
    /// that it lives as long as the queue).
    char_dup: Option<OwnedFd>,
    /// The device was created with `UBLK_F_USER_COPY`.
    user_copy: bool,
    /// How requests' pages reach the ring under zero copy.
    zc: ZeroCopy,
    /// Per tag: the queue registered the request's pages itself (zero
    /// copy), at this fixed-buffer index; unregistered before its commit.
    own_reg: Vec<Option<u16>>,
    /// `UBLK_F_BATCH_IO`: commands in batches (see `batch.rs`).
    batch: Option<Batch>,
    /// A page of ours registered at some tags' fixed-buffer indexes (the
    /// test hook [`Queue::occupy_auto_indexes`]); kept while the ring lives.
    occupier: Option<Box<[u8]>>,
    wake: Option<RawFd>,
    /// Tags with a command outstanding in the kernel (FETCH or COMMIT_AND_FETCH).
    live_tags: u16,
    /// Per tag: the server owns its request (between the CQE that delivered
    /// it and the commit).
    held: Vec<bool>,
    /// Per tag: the answer, waiting for the request's operations to end.
    answers: Vec<Option<i32>>,
    /// The wake-up eventfd fired (possibly already during `fetch_all`).
    woken: bool,
    /// Each tag's request while the server owns it.
    reqs: Vec<Request>,
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
    ///
    /// `wake` and the `target_files` (registered as fixed files 1..) must
    /// stay open while the queue lives.
    pub fn new(
        char_fd: BorrowedFd<'_>,
        info: &DevInfo,
        q_id: u16,
        encoding: Encoding,
        wake: Option<BorrowedFd<'_>>,
        target_files: &[BorrowedFd<'_>],
    ) -> Result<Self> {
        let char_fd = char_fd.as_raw_fd();
        verify_device(char_fd, info)?;
        let bufs = if user_copy(info) || ZeroCopy::of(info) != ZeroCopy::Off {
            None
        } else {
            Some(Arc::new(IoBufs::new(info.max_io_buf_bytes, info.queue_depth, q_id)?))
        };
        let files: Vec<RawFd> = target_files.iter().map(|f| f.as_raw_fd()).collect();
        Self::with_bufs(char_fd, info, q_id, encoding, wake.map(|w| w.as_raw_fd()), &files, bufs, false)
    }

    /// [`Queue::new`] for a device whose `info` came from the kernel, with
    /// buffers that the caller keeps (`bufs_kept`) until the kernel is done
    /// with them. Under USER_COPY, `bufs` are the server's own copies of the
    /// requests' data, moved with pread/pwrite on `/dev/ublkcN`.
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
        // A slot per tag for its io command, as many again for target
        // operations (more are pushed after a submit), and the two polls.
        let entries = 2 * u32::from(depth) + 2;
        let ring = build_ring(entries)?;
        let mut files = vec![char_fd];
        files.extend_from_slice(target_files);
        ring.submitter().register_files(&files).map_err(|e| Error::os("registering /dev/ublkcN with the queue's ring", e))?;
        let zc = ZeroCopy::of(info);
        if zc != ZeroCopy::Off {
            // The table the requests' pages are registered in: index `tag`
            // (the kernel's, or ours), and `depth + tag` for ours when the
            // kernel's automatic registration failed.
            ring.submitter()
                .register_buffers_sparse(2 * u32::from(depth))
                .map_err(|e| Error::os("registering the zero-copy buffer table with the queue's ring", e))?;
        }
        let char_dup = if user_copy(info) && bufs.is_some() {
            // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller keeps open;
            // the result is checked and owned.
            let fd = unsafe { libc::fcntl(char_fd, libc::F_DUPFD_CLOEXEC, 0) };
            if fd < 0 {
                return Err(Error::os("duplicating /dev/ublkcN for user copy", std::io::Error::last_os_error()));
            }
            // SAFETY: a fresh descriptor we own.
            Some(unsafe { OwnedFd::from_raw_fd(fd) })
        } else {
            None
        };
        let batch = if info.flags & sys::abi::UBLK_F_BATCH_IO != 0 {
            // Elements carry the tag's buffer only where the kernel copies.
            let copy = !user_copy(info) && zc == ZeroCopy::Off;
            Some(Batch::new(&ring.submitter(), q_id, depth, copy)?)
        } else {
            None
        };
        let notify = EventFd::new()?;
        let blank = Request { q_id, tag: 0, op: Op::Other(0xff), flags: 0, start_sector: 0, nr_sectors: 0 };
        Ok(Queue {
            reactor: Rc::new(Reactor::new(ring, depth, notify.into_owned(), target_files.len() as u32)),
            dev_id: info.dev_id,
            q_id,
            depth,
            encoding,
            descs,
            bufs,
            bufs_kept,
            char_dup,
            user_copy: user_copy(info),
            zc,
            own_reg: vec![None; usize::from(depth)],
            occupier: None,
            batch,
            wake,
            live_tags: 0,
            held: vec![false; usize::from(depth)],
            answers: vec![None; usize::from(depth)],
            woken: false,
            reqs: vec![blank; usize::from(depth)],
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

    /// The tag's buffer address for FETCH/COMMIT: 0 under USER_COPY, where
    /// the kernel refuses any other value.
    fn buf_addr(&self, tag: u16) -> u64 {
        match &self.bufs {
            Some(b) if !self.user_copy => b.addr(tag),
            _ => 0,
        }
    }

    fn io_sqe(&self, op: IoOp, tag: u16, result: i32) -> squeue::Entry {
        // Under AUTO_BUF_REG, the kernel registers the next request's pages
        // at index `tag`; one it cannot register is delivered anyway, with
        // UBLK_IO_F_NEED_REG_BUF (the fallback).
        let sqe_addr = match self.zc {
            ZeroCopy::Auto => sys::abi::auto_buf_reg_sqe_addr(tag, sys::abi::UBLK_AUTO_BUF_REG_FALLBACK),
            _ => 0,
        };
        io_sqe(op, self.encoding, self.q_id, tag, result, self.buf_addr(tag), sqe_addr)
    }

    /// The fixed-buffer index of the tag's request pages under zero copy,
    /// if the target's operations can reach them: `None` when not zero
    /// copy, or for a request without data.
    pub(crate) fn fixed_index(&self, req: &Request) -> Option<u16> {
        if !matches!(req.op, Op::Read | Op::Write) {
            return None;
        }
        match self.zc {
            ZeroCopy::Off => None,
            ZeroCopy::Explicit => Some(req.tag),
            ZeroCopy::Auto if req.flags & (sys::abi::UBLK_IO_F_NEED_REG_BUF) != 0 => Some(self.depth + req.tag),
            ZeroCopy::Auto => Some(req.tag),
        }
    }

    /// Whether the queue must register the request's pages itself before
    /// the target's operations use them.
    pub(crate) fn needs_own_reg(&self, req: &Request) -> bool {
        match self.zc {
            ZeroCopy::Explicit => matches!(req.op, Op::Read | Op::Write),
            ZeroCopy::Auto => matches!(req.op, Op::Read | Op::Write) && req.flags & (sys::abi::UBLK_IO_F_NEED_REG_BUF) != 0,
            ZeroCopy::Off => false,
        }
    }

    /// Pushes the registration of the request's pages at its fixed index.
    /// Its completion (user_data `BUF_REG | tag`) says whether it worked;
    /// the target's operations must wait for it.
    pub(crate) fn register_buf(&mut self, req: &Request) {
        let index = self.fixed_index(req).expect("a request with data under zero copy");
        let sqe = buf_reg_sqe(true, self.q_id, req.tag, index, BUF_REG | u64::from(req.tag));
        self.own_reg[usize::from(req.tag)] = Some(index);
        self.stats.buf_regs += 1;
        self.push(&sqe);
    }

    /// UNREGISTER_IO_BUF failed (its successes complete silently). Nothing
    /// to undo: counted, as the kernel broke its own protocol.
    pub(crate) fn unreg_failed(&mut self, res: i32) {
        self.stats.invalid += u64::from(res < 0);
    }

    /// Test hook for the AUTO_BUF_REG fallback: puts a page of the queue's
    /// own at the fixed-buffer index of every `every`th tag, so the
    /// kernel's automatic registration of those tags' requests fails
    /// (-EBUSY) and it delivers them with `UBLK_IO_F_NEED_REG_BUF`.
    pub(crate) fn occupy_auto_indexes(&mut self, every: u16) -> Result<()> {
        if self.zc != ZeroCopy::Auto || every == 0 {
            return Ok(());
        }
        let page = vec![0u8; 4096].into_boxed_slice();
        for tag in (0..self.depth).step_by(usize::from(every)) {
            let iov = libc::iovec { iov_base: page.as_ptr() as *mut libc::c_void, iov_len: page.len() };
            // SAFETY: the page lives in `self.occupier` as long as the ring
            // (the kernel pins it while registered anyway); nothing of ours
            // reads or writes it through the ring.
            unsafe { self.reactor.ring.borrow().submitter().register_buffers_update(u32::from(tag), &[iov], None) }
                .map_err(|e| Error::os("occupying a fixed-buffer index (test hook)", e))?;
        }
        self.occupier = Some(page);
        Ok(())
    }

    /// The registration of the tag's pages completed with `res`: whether it
    /// worked. A failed one is not unregistered.
    pub(crate) fn registered(&mut self, tag: u16, res: i32) -> bool {
        if res < 0 {
            self.own_reg[usize::from(tag)] = None;
        }
        res >= 0
    }

    fn push(&self, sqe: &squeue::Entry) {
        // The command's buffer (`addr`) is this queue's mapping, which lives
        // as long as the ring (or is leaked, see Drop).
        self.reactor.push(sqe);
    }

    fn submit(&mut self) -> std::io::Result<usize> {
        self.flush_batch();
        self.reactor.ring.borrow_mut().submit()
    }

    /// Under BATCH_IO, queues this turn's commits as one COMMIT_IO_CMDS.
    /// Called before anything is submitted.
    fn flush_batch(&mut self) {
        if let Some(sqe) = self.batch.as_mut().and_then(Batch::flush) {
            self.reactor.push(&sqe);
        }
    }

    /// A completion of the batch fetch: the tags it delivered (the batch's
    /// own vector, to hand back with [`Queue::batch_tags_done`]). Arms the
    /// fetch again if it ended for lack of buffers.
    fn batch_fetched(&mut self, res: i32, flags: u32) -> Result<Vec<u16>> {
        let b = self.batch.as_mut().expect("a batch queue");
        match b.fetched(res, flags) {
            Fetched::Tags { rearm } => {
                if rearm {
                    let sqe = b.fetch_sqe();
                    self.reactor.push(&sqe);
                }
                Ok(std::mem::take(&mut b.tags))
            }
            Fetched::Stopped => {
                // The device stops: nothing more comes; what the queue holds
                // is committed by `drain`.
                self.live_tags = 0;
                Ok(Vec::new())
            }
            Fetched::Failed(res) => Err(self.io_error(FETCH_IO_CMDS, 0, res)),
        }
    }

    fn batch_tags_done(&mut self, tags: Vec<u16>) {
        if let Some(b) = &mut self.batch {
            if tags.capacity() > 0 {
                b.tags = tags;
            }
        }
    }

    /// A PREP_IO_CMDS or COMMIT_IO_CMDS completed. A refusal is the queue's
    /// end, except once the device is stopping (the driver then refuses
    /// commits, and nothing waits for them).
    fn batch_cmd_done(&mut self, ud: u64, res: i32) -> Result<()> {
        let b = self.batch.as_mut().expect("a batch queue");
        let (commit, r) = b.cmd_done(ud, res);
        match r {
            Err(e) if !self.woken && self.live_tags > 0 => Err(self.io_error(if commit { COMMIT_IO_CMDS } else { PREP_IO_CMDS }, 0, e)),
            _ => Ok(()),
        }
    }

    /// Arms the poll on the queue's own eventfd (written by wakers on other
    /// threads).
    fn arm_notify(&self) {
        let poll = opcode::PollAdd::new(types::Fd(self.reactor.ready.efd()), libc::POLLIN as u32).build().user_data(NOTIFY);
        self.push(&poll);
    }

    /// Issues `FETCH_REQ` for every tag, from this (the queue's) thread, and
    /// reports the kernel's refusal, if any. START_DEV can complete only
    /// after every queue did this.
    pub fn fetch_all(&mut self) -> Result<()> {
        if self.batch.is_some() {
            return self.prep_and_fetch();
        }
        for tag in 0..self.depth {
            let sqe = self.io_sqe(FETCH_REQ, tag, -1);
            self.push(&sqe);
        }
        if let Some(fd) = self.wake {
            let poll = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build().user_data(WAKE);
            self.push(&poll);
        }
        self.arm_notify();
        self.submit().map_err(|e| Error::os("submitting FETCH_REQ", e))?;
        self.live_tags = self.depth;
        // FETCHes complete only when a request arrives; anything here now is
        // a refusal (or the wake-up, if the device is already being torn down).
        let mut refused = None;
        while let Some(cqe) = self.next_cqe() {
            match cqe.user_data() {
                WAKE => self.woken = true,
                NOTIFY => self.arm_notify(),
                ud if refused.is_none() => refused = Some((ud as u16, cqe.result())),
                _ => {}
            }
        }
        if let Some((tag, res)) = refused {
            return Err(self.io_error(FETCH_REQ, tag, res));
        }
        Ok(())
    }

    /// [`Queue::fetch_all`] under BATCH_IO: one PREP_IO_CMDS naming every
    /// tag (with its buffer in copy mode, its registration index under
    /// AUTO_BUF_REG), then the multishot FETCH_IO_CMDS, submitted together
    /// (the ring issues them in order).
    fn prep_and_fetch(&mut self) -> Result<()> {
        let addrs: Vec<u64> = (0..self.depth).map(|t| self.buf_addr(t)).collect();
        let auto = self.zc == ZeroCopy::Auto;
        let b = self.batch.as_mut().expect("a batch queue");
        let prep = b.prep_sqe(|t| addrs[usize::from(t)], |t| if auto { t } else { 0 });
        let fetch = b.fetch_sqe();
        b.fetch_armed = true;
        self.push(&prep);
        self.push(&fetch);
        if let Some(fd) = self.wake {
            let poll = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build().user_data(WAKE);
            self.push(&poll);
        }
        self.arm_notify();
        self.submit().map_err(|e| Error::os("submitting PREP_IO_CMDS and FETCH_IO_CMDS", e))?;
        self.live_tags = self.depth;
        // Nothing is delivered before START_DEV; a completion here is a
        // refusal, or PREP's success.
        while let Some(cqe) = self.next_cqe() {
            match cqe.user_data() {
                WAKE => self.woken = true,
                NOTIFY => self.arm_notify(),
                ud if ud & BATCH_CMD != 0 => {
                    let (_, r) = self.batch.as_mut().expect("a batch queue").cmd_done(ud, cqe.result());
                    if let Err(e) = r {
                        return Err(self.io_error(PREP_IO_CMDS, 0, e));
                    }
                }
                ud if ud & BATCH_FETCH != 0 && cqe.result() < 0 => return Err(self.io_error(FETCH_IO_CMDS, 0, cqe.result())),
                _ => {}
            }
        }
        Ok(())
    }

    fn next_cqe(&self) -> Option<io_uring::cqueue::Entry> {
        self.reactor.ring.borrow_mut().completion().next()
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
    /// A target that needs request data ([`Target::needs_data`]) is refused
    /// on a queue without buffers (a device created with `UBLK_F_USER_COPY`
    /// through [`Queue::new`]).
    pub fn serve<T: Target + ?Sized>(&mut self, target: &T) -> Result<QueueStats> {
        self.check_data(target.needs_data(), false)?;
        self.serve_notify(target, &|| {})
    }

    fn check_data(&self, needs_data: bool, zero_copy: bool) -> Result<()> {
        if self.zc != ZeroCopy::Off && needs_data && !zero_copy {
            return Err(Error::InvalidConfig {
                what: "data path",
                why: "the device was created for zero copy (DataPath::ZeroCopy or AutoBufReg): request data stays in the kernel, reached only by an async target's Io::read_at/write_at, but this target reads or writes request data itself; create the device with DataPath::Copy or DataPath::UserCopy, or declare AsyncTarget::zero_copy if the target only uses read_at/write_at".into(),
            });
        }
        if self.zc != ZeroCopy::Off {
            return Ok(());
        }
        if self.bufs.is_none() && needs_data {
            return Err(Error::InvalidConfig {
                what: "data path",
                why: "the device was created with UBLK_F_USER_COPY and the queue has no buffers (DataPath::NoData), so the server gets no data, but this target reads or writes request data; create the device with DataPath::Copy or DataPath::UserCopy".into(),
            });
        }
        Ok(())
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
        self.guarded(on_panic, |q| q.serve_inner(target))
    }

    /// Runs `serve` so that a panic in the target fails what the queue holds
    /// (see [`Queue::serve_notify`]), and ends every operation and request
    /// the queue holds before returning.
    fn guarded(&mut self, on_panic: &dyn Fn(), serve: impl FnOnce(&mut Self) -> Result<QueueStats>) -> Result<QueueStats> {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve(self)));
        let r = match r {
            Ok(r) => r,
            Err(payload) => {
                self.end_ops();
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
        // The counts as they are now: `r` holds a copy taken when the loop
        // ended, which misses the requests `drain` just failed (at a stop,
        // those whose operations were still in flight after the grace).
        r.map(|_| self.stats)
    }

    fn serve_inner<T: Target + ?Sized>(&mut self, target: &T) -> Result<QueueStats> {
        let mut stopping = self.woken;
        while (self.live_tags > 0 || self.reactor.in_flight() > 0) && !stopping {
            self.enter_or_fail()?;
            while let Some(cqe) = self.next_cqe() {
                let (ud, res) = (cqe.user_data(), cqe.result());
                match ud {
                    WAKE => {
                        self.on_wake(res);
                        stopping = self.woken;
                    }
                    NOTIFY => {
                        drain_eventfd(self.reactor.ready.efd());
                        self.arm_notify();
                    }
                    CANCEL | OP_CANCEL => {}
                    ud if ud & ASYNC_OP != 0 => self.op_completed(ud, res),
                    ud if ud & BUF_UNREG != 0 => self.unreg_failed(res),
                    ud if ud & BATCH_FETCH != 0 => {
                        let tags = self.batch_fetched(res, cqe.flags())?;
                        for &tag in &tags {
                            if let Some(req) = self.on_command(tag, sys::UBLK_IO_RES_OK as i32)? {
                                let result = self.handle_sync(target, &req);
                                self.answer(req.tag, result);
                            }
                        }
                        self.batch_tags_done(tags);
                    }
                    ud if ud & BATCH_CMD != 0 => self.batch_cmd_done(ud, res)?,
                    ud => {
                        if let Some(req) = self.on_command(ud as u16, res)? {
                            let result = self.handle_sync(target, &req);
                            self.answer(req.tag, result);
                        }
                    }
                }
            }
            self.follow();
        }
        Ok(self.stats)
    }

    /// Moves the queue's thread after the load, if it follows it.
    fn follow(&mut self) {
        if let Some(f) = &mut self.follower {
            if let Some(m) = f.tick(self.stats.requests()) {
                f.apply(m);
                self.stats.moves += 1;
            }
        }
    }

    fn enter_or_fail(&mut self) -> Result<()> {
        match self.enter() {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(e) => Err(Error::os("io_uring_enter on the queue ring", e)),
        }
    }

    /// The completion of tag `tag`'s io command: the request it delivered,
    /// if any (decoded, counted and checked; a request the queue answers
    /// itself is committed here).
    fn on_command(&mut self, tag: u16, res: i32) -> Result<Option<Request>> {
        self.live_tags -= 1;
        if res == sys::UBLK_IO_RES_OK as i32 {
            self.held[usize::from(tag)] = true;
            Ok(self.decode(tag))
        } else if res == sys::UBLK_IO_RES_ABORT {
            // The device is going away: this tag is done.
            Ok(None)
        } else {
            Err(self.io_error(COMMIT_AND_FETCH_REQ, tag, res))
        }
    }

    /// An operation of the async target completed: route it, and commit its
    /// request if that was the last thing it waited for.
    fn op_completed(&mut self, ud: u64, res: i32) {
        if let Some(tag) = self.reactor.complete(ud as u32, res) {
            self.maybe_commit(tag);
        }
    }

    /// Records the tag's answer (bytes or -errno, already settled) and
    /// commits it once none of the request's operations is in flight.
    fn answer(&mut self, tag: u16, result: i32) {
        self.answers[usize::from(tag)] = Some(result);
        self.maybe_commit(tag);
    }

    fn maybe_commit(&mut self, tag: u16) {
        let t = usize::from(tag);
        if self.held[t] && self.reactor.tags[t].ops.get() == 0 {
            if let Some(result) = self.answers[t].take() {
                let result = self.copy_out(tag, result);
                self.commit(tag, result);
            }
        }
    }

    /// Cancels the target's operations in flight (one waiting on a socket
    /// whose peer is gone would never end) and reaps them, since their
    /// buffers (the tags', the target's) must not be written after the
    /// queue is gone. Requests delivered meanwhile are held, for `fail_held`.
    fn end_ops(&mut self) {
        // Each operation is cancelled by its own user_data: an "any" cancel
        // would also end the queue's polls (the teardown wake-up and the
        // cross-thread notify), which a queue that goes on serving (after a
        // panic) still needs. Cancels are sent again every second (one may
        // race an operation's start); after END_OPS_LIMIT the queue gives up
        // and leaks what the operations may still touch (see Drop).
        let t0 = Instant::now();
        let mut last_cancel: Option<Instant> = None;
        while self.reactor.in_flight() > 0 {
            if last_cancel.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                if t0.elapsed() > END_OPS_LIMIT {
                    return;
                }
                self.reactor.cancel_all(CANCEL);
                last_cancel = Some(Instant::now());
            }
            self.flush_batch();
            let ts = types::Timespec::new().nsec(100_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            let waited = self.reactor.ring.borrow_mut().submitter().submit_with_args(1, &args).map_err(|e| e.raw_os_error());
            match waited {
                Ok(_) | Err(Some(libc::EINTR)) | Err(Some(libc::ETIME)) => {}
                Err(Some(libc::EAGAIN)) | Err(Some(libc::EBUSY)) => std::thread::sleep(Duration::from_millis(1)),
                // The ring cannot wait: leave the buffers alone (see Drop).
                Err(_) => return,
            }
            while let Some(cqe) = self.next_cqe() {
                match cqe.user_data() {
                    WAKE => self.on_wake(cqe.result()),
                    NOTIFY => {
                        drain_eventfd(self.reactor.ready.efd());
                        self.arm_notify();
                    }
                    CANCEL | OP_CANCEL => {}
                    ud if ud & ASYNC_OP != 0 => {
                        self.reactor.complete(ud as u32, cqe.result());
                    }
                    ud if ud & BUF_REG != 0 => {
                        self.registered(ud as u16, cqe.result());
                    }
                    ud if ud & BUF_UNREG != 0 => self.unreg_failed(cqe.result()),
                    ud if ud & BATCH_FETCH != 0 => {
                        // Requests delivered meanwhile are held too.
                        if let Ok(tags) = self.batch_fetched(cqe.result(), cqe.flags()) {
                            for &tag in &tags {
                                self.live_tags = self.live_tags.saturating_sub(1);
                                self.held[usize::from(tag)] = true;
                            }
                            self.batch_tags_done(tags);
                        }
                    }
                    ud if ud & BATCH_CMD != 0 => {
                        let _ = self.batch.as_mut().map(|b| b.cmd_done(ud, cqe.result()));
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
    }

    /// Under BATCH_IO, before the queue's memory goes: cancels the multishot
    /// fetch (the one writer of the provided buffers) and reaps it and the
    /// PREP/COMMIT commands in flight (whose element arrays the kernel may
    /// still read). Whether all of it ended within a second.
    fn end_batch(&mut self) -> bool {
        let t0 = Instant::now();
        let mut cancelled = false;
        loop {
            let Some(b) = &self.batch else { return true };
            if !b.fetch_armed && b.cmds_in_flight() == 0 {
                return true;
            }
            if t0.elapsed() > Duration::from_secs(1) {
                return false;
            }
            if b.fetch_armed && !cancelled {
                let cancel = opcode::AsyncCancel::new(BATCH_FETCH).build().user_data(CANCEL);
                self.push(&cancel);
                cancelled = true;
            }
            self.flush_batch();
            let ts = types::Timespec::new().nsec(50_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            if let Err(e) = self.reactor.ring.borrow_mut().submitter().submit_with_args(1, &args) {
                if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::ETIME) | Some(libc::EAGAIN) | Some(libc::EBUSY)) {
                    return false;
                }
            }
            while let Some(cqe) = self.next_cqe() {
                let Some(b) = self.batch.as_mut() else { return true };
                match cqe.user_data() {
                    ud if ud & BATCH_FETCH != 0 && ud < CANCEL => {
                        // Tags delivered now are not served: the device is
                        // going away, and the kernel fails what its server
                        // leaves when the ring closes.
                        let _ = b.fetched(cqe.result(), cqe.flags());
                        if !batch::more(cqe.flags()) {
                            b.fetch_armed = false;
                        }
                    }
                    ud if ud & BATCH_CMD != 0 && ud < CANCEL => {
                        let _ = b.cmd_done(ud, cqe.result());
                    }
                    _ => {}
                }
            }
        }
    }

    /// The teardown wake-up poll completed with `res`: the eventfd was
    /// written (stop), or the poll was cancelled, which is no stop: re-arm.
    fn on_wake(&mut self, res: i32) {
        if res == -libc::ECANCELED {
            if let Some(fd) = self.wake {
                let poll = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build().user_data(WAKE);
                self.push(&poll);
            }
        } else {
            self.woken = true;
        }
    }

    /// Ends the queue's part in every request it holds: ends its target
    /// operations ([`Queue::end_ops`]), then commits every request it still
    /// holds, with its answer where it has one and EIO otherwise, and
    /// submits. Each commit parks a FETCH again, which the kernel aborts at
    /// STOP_DEV or when the ring is closed; a held request nobody commits
    /// would, on 6.6-6.15, never be failed at all. Needs no target: runs
    /// after a panic and on drop.
    fn drain(&mut self) {
        self.end_ops();
        self.fail_held();
    }

    /// Commits EIO for every request the queue holds without an answer and
    /// without an operation in flight, and submits.
    fn fail_held(&mut self) {
        for tag in 0..self.depth {
            let t = usize::from(tag);
            if self.held[t] && self.reactor.tags[t].ops.get() == 0 {
                // A stored answer still needs its data moved (USER_COPY).
                let result = match self.answers[t].take() {
                    Some(r) => self.copy_out(tag, r),
                    None => -libc::EIO,
                };
                self.commit(tag, result);
            }
        }
        let _ = self.submit();
    }

    /// Queues the tag's COMMIT_AND_FETCH_REQ with `result`.
    fn commit(&mut self, tag: u16, result: i32) {
        self.held[usize::from(tag)] = false;
        if let Some(index) = self.own_reg[usize::from(tag)].take() {
            // The ring issues SQEs in order and UNREGISTER_IO_BUF completes
            // at once: the pages are out of the table before the commit
            // completes the request. (Its completion is skipped on success.)
            let sqe = buf_reg_sqe(false, self.q_id, tag, index, BUF_UNREG | u64::from(tag));
            self.push(&sqe);
        }
        if result < 0 {
            self.stats.errors += 1;
        }
        let addr = self.buf_addr(tag);
        let index = if self.zc == ZeroCopy::Auto { tag } else { 0 };
        if let Some(b) = &mut self.batch {
            b.commit(tag, index, result, addr);
        } else {
            let sqe = self.io_sqe(COMMIT_AND_FETCH_REQ, tag, result);
            self.push(&sqe);
        }
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
        self.flush_batch();
        self.stats.enters += 1;
        self.stats.waits += 1;
        self.reactor.ring.borrow_mut().submit_and_wait(1)?;
        Ok(())
    }

    /// Submits, then polls for completions for up to `busy_poll`; whether
    /// any arrived.
    fn poll(&mut self) -> std::io::Result<bool> {
        self.flush_batch();
        let n = self.reactor.ring.borrow_mut().submission().len() as u32;
        self.enter_nowait(n)?;
        let t0 = Instant::now();
        let mut polls = 0u32;
        loop {
            // Completions come from task work we ran (below), or, without
            // DEFER_TASKRUN, from task work run on the way out of any
            // syscall (sched_yield below).
            let (empty, taskrun) = {
                let mut ring = self.reactor.ring.borrow_mut();
                let empty = ring.completion().is_empty();
                let taskrun = ring.submission().taskrun();
                (empty, taskrun)
            };
            if !empty {
                return Ok(true);
            }
            if taskrun {
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
        let ring = self.reactor.ring.borrow();
        // SAFETY: no argument pointer is passed; io_uring_enter only submits
        // SQEs already pushed (valid per `push`) and runs task work.
        unsafe { ring.submitter().enter::<libc::sigset_t>(to_submit, 0, IORING_ENTER_GETEVENTS, None)? };
        Ok(())
    }

    /// Reads the tag's descriptor and counts the request. Answers itself
    /// (and returns `None`) for what no target gets: an unsupported op, a
    /// request larger than the buffers, a WRITE whose data could not be
    /// copied in under USER_COPY.
    fn decode(&mut self, tag: u16) -> Option<Request> {
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
            // The UBLK_IO_F_* flags sit at their own bits of op_flags (FUA is
            // bit 13), as the kernel sets them: not shifted, as the header's
            // `ublksrv_get_flags` (op_flags >> 8) would suggest.
            flags: d.op_flags & !0xff,
            start_sector: d.start_sector,
            nr_sectors: d.nr_sectors(),
        };
        let s = &mut self.stats;
        match req.op {
            Op::Read => s.reads += 1,
            Op::Write => {
                s.writes += 1;
                s.fua_writes += u64::from(req.fua());
            }
            Op::Flush => s.flushes += 1,
            Op::Discard => s.discards += 1,
            Op::WriteZeroes => s.write_zeroes += 1,
            Op::Other(_) => {
                s.unsupported += 1;
                self.answer(tag, -libc::EOPNOTSUPP);
                return None;
            }
        }
        if matches!(req.op, Op::Read | Op::Write) {
            let fits = self.bufs.as_ref().is_none_or(|b| req.len() <= b.buf_size());
            if !fits {
                // The kernel never sends more than max_io_buf_bytes; refuse
                // rather than hand out a short buffer.
                self.stats.invalid += 1;
                self.answer(tag, -libc::EIO);
                return None;
            }
            self.stats.bytes += req.len() as u64;
        }
        self.reqs[usize::from(tag)] = req;
        if req.op == Op::Write && !self.copy_in(&req) {
            self.answer(tag, -libc::EIO);
            return None;
        }
        Some(req)
    }

    /// The tag's buffer (null without buffers) and its size.
    fn buf_raw(&self, tag: u16) -> (*mut u8, usize) {
        match &self.bufs {
            Some(b) => (b.addr(tag) as *mut u8, b.buf_size()),
            None => (std::ptr::null_mut(), 0),
        }
    }

    /// Under USER_COPY with buffers: reads a WRITE's data from
    /// `/dev/ublkcN` into the tag's buffer. Whether it has the data.
    fn copy_in(&mut self, req: &Request) -> bool {
        let (Some(fd), Some(b)) = (&self.char_dup, &self.bufs) else { return true };
        // SAFETY: the tag's buffer has room for req.len() (checked in
        // decode); the server owns the request, so nothing else touches it.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                b.addr(req.tag) as *mut libc::c_void,
                req.len(),
                user_copy_offset(self.q_id, req.tag) as libc::off_t,
            )
        };
        n == req.len() as isize
    }

    /// Under USER_COPY with buffers: gives a READ's answer (`result` bytes)
    /// from the tag's buffer to `/dev/ublkcN`. The result to commit.
    fn copy_out(&mut self, tag: u16, result: i32) -> i32 {
        let (Some(fd), Some(b)) = (&self.char_dup, &self.bufs) else { return result };
        if result <= 0 || self.reqs[usize::from(tag)].op != Op::Read {
            return result;
        }
        // SAFETY: reads `result` (<= the request's length, settled) bytes of
        // the tag's buffer, which no operation uses any more.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                b.addr(tag) as *const libc::c_void,
                result as usize,
                user_copy_offset(self.q_id, tag) as libc::off_t,
            )
        };
        if n == result as isize {
            result
        } else {
            -libc::EIO
        }
    }

    /// Runs a sync target on a request; the settled result.
    fn handle_sync<T: Target + ?Sized>(&mut self, target: &T, req: &Request) -> i32 {
        let data = matches!(req.op, Op::Read | Op::Write);
        let buf: &mut [u8] = match &self.bufs {
            // SAFETY: the server owns the tag's request between the CQE that
            // delivered it and our commit, so the kernel does not touch the
            // buffer; this is the only reference made to it, and it ends
            // before the commit.
            Some(b) if data => unsafe { b.slice(req.tag, 0, req.len()) },
            // No data for this op, or no buffers (only targets that need no
            // data run there, see `serve`).
            _ => &mut [],
        };
        let answer = target.handle(req, buf);
        let (result, invalid) = settle(req, answer);
        self.stats.invalid += u64::from(invalid);
        result
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // After a panic that unwound through `serve`, or a queue never
        // served: end what is in flight before the ring and buffers go.
        self.drain();
        if !self.end_batch() {
            // The kernel may still write the fetch's buffers or read a
            // command's elements: leak them (a few pages) with the ring.
            std::mem::forget(self.batch.take());
        }
        // Closing the ring ends its operations only asynchronously, and the
        // kernel may still copy into a tag's buffer while that tag's command
        // is outstanding. Buffers that nobody else keeps are unmapped only
        // when nothing can touch them; otherwise they are leaked (memory, not
        // memory safety, is lost).
        if self.live_tags > 0 || self.reactor.in_flight() > 0 {
            if let Some(b) = self.bufs.take() {
                if !self.bufs_kept {
                    std::mem::forget(b);
                }
            }
        }
        if self.reactor.in_flight() > 0 {
            // Operations the kernel never reported over: what they may
            // still write (their owned buffers) is leaked with their slots.
            self.reactor.leak_ops();
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
        Err(Errno::EIO)
    }
    fn needs_data(&self) -> bool {
        false
    }
}

/// Whether the queue's device moves data with pread/pwrite on `/dev/ublkcN`.
fn user_copy_dev(q: &Queue) -> bool {
    q.user_copy
}

/// Whether the device was created with `UBLK_F_USER_COPY`: the kernel then
/// moves no data itself and io commands carry buffer address 0.
pub(crate) fn user_copy(info: &DevInfo) -> bool {
    info.flags & sys::abi::UBLK_F_USER_COPY != 0
}

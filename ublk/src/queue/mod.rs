//! One queue of a device: its io_uring on `/dev/ublkcN`, its descriptors and
//! its buffers, owned by exactly one thread.
//!
//! The kernel ties a queue (6.1–6.15) or a tag (6.16+) to the task that
//! fetched it: a `COMMIT_AND_FETCH_REQ` from any other thread is -EINVAL, and
//! requests are only delivered to the fetching task. [`Queue`] is therefore
//! `!Send` and `!Sync`: it is created on the thread that will serve it and
//! cannot leave it, so "FETCH from another thread" cannot be written.
//!
//! With `UBLK_F_PER_IO_DAEMON` (6.16+) a queue's tags may be shared out
//! among several threads ([`TagShare`]): each thread has a [`Queue`] of its
//! own (its ring, its FETCHes and commits) for its tags only, and a tag's
//! commands can come only from the `Queue` that fetched it.

// Where the queue's parts are: this file has the `Queue` itself, its
// setup and its drop;
// * `ring`: its io_uring, the io commands' SQEs, the eventfds;
// * `poll`: pushing, submitting, reaping, sleeping or busy polling;
// * `desc`: reading a request from its descriptor, the tag's buffer and
//   the copies under `UBLK_F_USER_COPY`;
// * `commit`: per-request bookkeeping, from the FETCH to the commit, and
//   the end of it all at teardown;
// * `serve` and `exec`: serving a `Target` and an `AsyncTarget`;
// * `share`: `TagShare`, one thread's share of the tags;
// * `zc`: zero-copy registration of requests' pages;
// * `token`: what each completion on the ring is (its user_data);
// * `batch`: `UBLK_F_BATCH_IO`.
mod batch;
mod commit;
mod desc;
mod exec;
mod poll;
mod ring;
mod serve;
mod share;
mod token;
mod zc;

use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use ublk_sys as sys;

use crate::aio::fixed::FixedTable;
use crate::aio::reactor::Reactor;
use crate::aio::TARGET_SLOTS;
pub use crate::buffers::{desc_len, desc_offset, page_size};
use crate::buffers::{IoBufs, Mapping};
use crate::ctrl::{Control, DevInfo, Encoding};
use crate::error::{Error, Result};
use crate::placement::Follower;
pub use crate::stats::QueueStats;
use crate::target::{Op, Request};
use batch::Batch;
pub use desc::user_copy_offset;
use ring::build_ring;
pub(crate) use ring::EventFd;
pub use share::TagShare;
pub(crate) use share::{batch_threads_refused, check_threads, per_io_unsupported};
use zc::ZeroCopy;

/// How long a queue thread polls its ring for the next request before it
/// sleeps, by default. Under the test VMs' emulation a request's round trip
/// takes tens of microseconds; on hardware a few. Polling costs CPU only
/// while requests keep coming, and at most this long after the last one.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(200);

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

/// One queue (or one thread's share of its tags), bound to the thread that
/// created it.
pub struct Queue {
    /// The ring (shared with the futures of an async target).
    reactor: Rc<Reactor>,
    dev_id: u32,
    q_id: u16,
    depth: u16,
    /// The tags this queue fetches and commits.
    share: TagShare,
    encoding: Encoding,
    descs: Mapping,
    /// Per-tag buffers; `None` when no data moves through the server.
    bufs: Option<Arc<IoBufs>>,
    /// Whether someone else (the [`Device`](crate::Device)) keeps `bufs`
    /// until the kernel can no longer touch them.
    bufs_kept: bool,
    /// `/dev/ublkcN` for copies under `UBLK_F_USER_COPY` (a duplicate, so
    /// that it lives as long as the queue).
    char_dup: Option<Arc<OwnedFd>>,
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
        f.debug_struct("Queue")
            .field("dev_id", &self.dev_id)
            .field("q_id", &self.q_id)
            .field("depth", &self.depth)
            .field("share", &self.share)
            .finish()
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
        Self::new_shared(char_fd, info, q_id, TagShare::ALL, encoding, wake, target_files)
    }

    /// [`Queue::new`] for one thread's share of the queue's tags
    /// (`UBLK_F_PER_IO_DAEMON`, Linux 6.16+): the queue fetches, serves and
    /// commits only the tags of `share`, on its own ring; the other tags
    /// need a queue of their own, each on its own thread. A share of more
    /// than one thread on a device without per-I/O daemons is refused with
    /// [`Error::Unsupported`].
    #[allow(clippy::too_many_arguments)]
    pub fn new_shared(
        char_fd: BorrowedFd<'_>,
        info: &DevInfo,
        q_id: u16,
        share: TagShare,
        encoding: Encoding,
        wake: Option<BorrowedFd<'_>>,
        target_files: &[BorrowedFd<'_>],
    ) -> Result<Self> {
        let char_fd = char_fd.as_raw_fd();
        verify_device(char_fd, info)?;
        share.check(info)?;
        let bufs = if user_copy(info) || ZeroCopy::of(info) != ZeroCopy::Off {
            None
        } else {
            Some(Arc::new(IoBufs::new(info.max_io_buf_bytes, info.queue_depth, q_id)?))
        };
        let files: Vec<RawFd> = target_files.iter().map(|f| f.as_raw_fd()).collect();
        Self::with_bufs(char_fd, info, q_id, share, encoding, wake.map(|w| w.as_raw_fd()), &files, bufs, false, true)
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
        share: TagShare,
        encoding: Encoding,
        wake: Option<RawFd>,
        target_files: &[RawFd],
        bufs: Option<Arc<IoBufs>>,
        bufs_kept: bool,
        char_dup_wanted: bool,
    ) -> Result<Self> {
        share.check(info)?;
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
        // The ring's buffer table. Under zero copy the requests' pages are
        // registered in it: index `tag` (the kernel's, or ours), and `depth
        // + tag` for ours when the kernel's automatic registration failed.
        // After those, the targets' slots (`Ring::fixed_buf`).
        let zc_slots = if zc != ZeroCopy::Off { 2 * u32::from(depth) } else { 0 };
        let fixed = match ring.submitter().register_buffers_sparse(zc_slots + TARGET_SLOTS) {
            Ok(()) => Some(FixedTable::new(zc_slots)),
            Err(e) if zc != ZeroCopy::Off => return Err(Error::os("registering the zero-copy buffer table with the queue's ring", e)),
            // Targets then read into unregistered buffers.
            Err(_) => None,
        };
        // Only a queue that copies (into its buffers, or through its
        // target) holds a duplicate of /dev/ublkcN: on 7.3 one held by a
        // queue that never uses it made the teardown after a queue's panic
        // warn in ublk_ch_uring_cmd.
        let char_dup = if user_copy(info) && (bufs.is_some() || char_dup_wanted) {
            // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller keeps open;
            // the result is checked and owned.
            let fd = unsafe { libc::fcntl(char_fd, libc::F_DUPFD_CLOEXEC, 0) };
            if fd < 0 {
                return Err(Error::os("duplicating /dev/ublkcN for user copy", std::io::Error::last_os_error()));
            }
            // SAFETY: a fresh descriptor we own.
            Some(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }))
        } else {
            None
        };
        let batch = if info.flags & sys::abi::UBLK_F_BATCH_IO != 0 {
            // Elements carry the tag's buffer only where the kernel copies.
            let copy = !user_copy(info) && zc == ZeroCopy::Off;
            Some(Batch::new(&ring.submitter(), q_id, depth, copy, zc == ZeroCopy::Auto)?)
        } else {
            None
        };
        let notify = EventFd::new()?;
        let blank = Request { q_id, tag: 0, op: Op::Other(0xff), flags: 0, start_sector: 0, nr_sectors: 0 };
        Ok(Queue {
            reactor: Rc::new(Reactor::new(ring, depth, notify.into_owned(), target_files.len() as u32, fixed)),
            dev_id: info.dev_id,
            q_id,
            depth,
            share,
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
            stats: QueueStats { q_id, thread: share.thread, ..Default::default() },
            _thread_bound: PhantomData,
        })
    }

    /// Queue id.
    pub fn id(&self) -> u16 {
        self.q_id
    }

    /// The queue's tags this queue serves ([`TagShare::ALL`] unless made
    /// with [`Queue::new_shared`]).
    pub fn share(&self) -> TagShare {
        self.share
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
    let sys_dev = std::fs::read_to_string(format!("{}/ublkc{id}/dev", crate::ctrl::CHAR_CLASS_DIR)).unwrap_or_default();
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

/// Whether the queue's device moves data with pread/pwrite on `/dev/ublkcN`.
fn user_copy_dev(q: &Queue) -> bool {
    q.user_copy
}

/// Whether the device was created with `UBLK_F_USER_COPY`: the kernel then
/// moves no data itself and io commands carry buffer address 0.
pub(crate) fn user_copy(info: &DevInfo) -> bool {
    info.flags & sys::abi::UBLK_F_USER_COPY != 0
}

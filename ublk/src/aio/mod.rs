//! Targets whose requests are futures, polled on the queue's own thread.
//!
//! An [`AsyncTarget`] makes, on each queue's thread, a per-queue object
//! ([`AsyncTarget::Queue`], which need not be `Send` or `Sync`) whose
//! [`QueueTarget::handle`] turns one request into a future. The queue polls
//! these futures itself: there is no second thread and no runtime. A future
//! parks in the queue's `io_uring_enter` while it waits for
//!
//! * io_uring operations on the queue's ring ([`Io::read_at`],
//!   [`Io::write_at`] on the request's data, [`Io::ring`] for operations on
//!   buffers the target owns, [`Ring::raw`] for anything else), any number,
//!   in sequence or concurrently, each resolved by its own completion;
//! * a [`Completion`] that another thread (a thread pool, another runtime)
//!   fulfils with its [`Completer`]; the queue is woken through an eventfd.
//!
//! Requests complete in any order. The answer goes through the rule of
//! [`IoResult`]. A request is committed only once its
//! future has resolved *and* every operation it started is over, so no
//! buffer is reused or freed while the kernel may still write it; an
//! operation whose future is dropped early is cancelled and keeps what it
//! owns until its completion arrives. When the device stops, operations in
//! flight are cancelled and reaped before the futures are dropped.
//!
//! Nothing is allocated per request: each tag has one future slot, reused.
//!
//! ```no_run
//! use std::cell::Cell;
//! use ublk::aio::{AsyncTarget, Io, QueueContext, QueueTarget};
//! use ublk::{DeviceBuilder, Errno, IoResult, Op};
//!
//! /// A disk over a file, counting requests per queue.
//! struct FileDisk(std::fs::File);
//! struct PerQueue<'a> { disk: &'a FileDisk, served: Cell<u64> }
//!
//! impl AsyncTarget for FileDisk {
//!     type Queue<'a> = PerQueue<'a>;
//!     fn queue(&self, _q: &QueueContext) -> std::io::Result<PerQueue<'_>> {
//!         Ok(PerQueue { disk: self, served: Cell::new(0) })
//!     }
//! }
//!
//! impl QueueTarget for PerQueue<'_> {
//!     async fn handle(&self, mut io: Io<'_>) -> IoResult {
//!         self.served.set(self.served.get() + 1);
//!         let req = *io.request();
//!         match req.op {
//!             Op::Read => io.read_at(&self.disk.0, 0..req.len(), req.offset()).await,
//!             Op::Write => io.write_at(&self.disk.0, 0..req.len(), req.offset(), 0).await,
//!             Op::Flush => io.ring().fsync(&self.disk.0, true).await,
//!             _ => Err(Errno::EOPNOTSUPP),
//!         }
//!     }
//! }
//!
//! let disk = FileDisk(std::fs::OpenOptions::new().read(true).write(true).open("disk.img")?);
//! let dev = DeviceBuilder::new().size(disk.0.metadata()?.len()).create()?;
//! dev.serve_async(&disk, |dev, _stop| println!("{}", dev.block_path().display()))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub(crate) mod fixed;
mod oneshot;
pub mod ops;
pub(crate) mod reactor;

use std::future::Future;
use std::marker::PhantomData;
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use io_uring::opcode;

pub use fixed::{FixedBuf, TARGET_SLOTS};
pub use oneshot::{completion, Completer, Completion};
pub use ops::{FileRef, IoBuf, IoBufMut, Op as Operation, OpResult, Plain, Ring, Sleep};

use crate::target::{IoResult, Request, WriteCache};
use reactor::{DataUse, Reactor};

/// What a queue's target object learns about its queue when it is made.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct QueueContext {
    /// The device.
    pub dev_id: u32,
    /// The queue.
    pub q_id: u16,
    /// The thread of the queue this object serves, `0..threads`: it gets
    /// the requests of the tags `t` with `t % threads == thread`
    /// ([`DeviceBuilder::threads_per_queue`](crate::DeviceBuilder::threads_per_queue)).
    pub thread: u16,
    /// Threads serving the queue, each with its own object (1 unless
    /// [`DeviceBuilder::threads_per_queue`](crate::DeviceBuilder::threads_per_queue)).
    pub threads: u16,
    /// Tags of the queue (requests in flight at most, over all its threads).
    pub depth: u16,
    /// Whether the device was created with `UBLK_F_USER_COPY`.
    pub user_copy: bool,
    /// Whether request data stays in the kernel, reached by
    /// [`Io::read_at`]/[`Io::write_at`] as a fixed buffer (zero copy).
    pub zero_copy: bool,
    /// `/dev/ublkcN` under `UBLK_F_USER_COPY` (the queue's duplicate).
    pub(crate) char_dev: Option<Arc<OwnedFd>>,
}

impl QueueContext {
    /// `/dev/ublkcN` of the device, under `UBLK_F_USER_COPY` (`None`
    /// without): a target that keeps its data in its own memory can move a
    /// request's data with plain `pread`/`pwrite` at
    /// [`Io::user_copy_offset`] on it, one copy by the kernel between that
    /// memory and the request's pages, in the queue's thread (an io_uring
    /// READ or WRITE of `/dev/ublkcN`, which sets no `FMODE_NOWAIT`, would
    /// go to the ring's worker threads). See
    /// [`AsyncTarget::user_copies_itself`]. Keep a duplicate
    /// (`try_clone_to_owned`) to use it after [`AsyncTarget::queue`].
    pub fn char_dev(&self) -> Option<BorrowedFd<'_>> {
        self.char_dev.as_deref().map(|fd| fd.as_fd())
    }
}

/// Whether `target`'s queues need buffers for request data on a device
/// with (`user_copy`) or without `UBLK_F_USER_COPY`: when it needs data,
/// unless it copies under user copy itself. The one place of the rule, for
/// [`Device::serve_async`](crate::Device::serve_async)'s buffers and
/// [`Queue::serve_async`](crate::Queue::serve_async)'s check.
pub(crate) fn needs_buffers<T: AsyncTarget + ?Sized>(target: &T, user_copy: bool) -> bool {
    target.needs_data() && !(user_copy && target.user_copies_itself())
}

/// A target whose requests are futures. Shared by every queue (`Sync`); each
/// queue thread makes its own [`AsyncTarget::Queue`] object from it.
pub trait AsyncTarget: Send + Sync {
    /// The per-queue part: made on the queue's thread, used only there.
    type Queue<'a>: QueueTarget
    where
        Self: 'a;

    /// Makes queue `q.q_id`'s object, on that queue's thread (with several
    /// threads per queue, once per thread: `q.thread` of `q.threads`).
    fn queue(&self, q: &QueueContext) -> std::io::Result<Self::Queue<'_>>;

    /// Whether the target reads or writes request data ([`Io::data`]); as
    /// [`Target::needs_data`](crate::Target::needs_data).
    fn needs_data(&self) -> bool {
        true
    }

    /// Whether the target moves request data only with [`Io::read_at`] and
    /// [`Io::write_at`] (never [`Io::data`], [`Io::data_mut`],
    /// [`Io::send_data`] or [`Io::recv_data`]), so that the request's pages
    /// can stay in the kernel: such a target may serve a device created
    /// with [`DataPath::ZeroCopy`](crate::DataPath::ZeroCopy) or
    /// [`DataPath::AutoBufReg`](crate::DataPath::AutoBufReg), where those
    /// two become READ_FIXED/WRITE_FIXED on the request's registered pages.
    /// Default `false`: such devices refuse the target.
    fn zero_copy(&self) -> bool {
        false
    }

    /// Whether, on a device with `UBLK_F_USER_COPY`, the target moves
    /// READ and WRITE data itself, with `pread` and `pwrite` of
    /// [`QueueContext::char_dev`] at [`Io::user_copy_offset`] (every
    /// request's, or with zero copy beside it some, as the NBD target
    /// does for short payloads): [`Device::serve_async`](crate::Device::serve_async)
    /// then gives its queues no buffers, copies nothing for it, and hands
    /// its queues the char device. Default `false`.
    fn user_copies_itself(&self) -> bool {
        false
    }

    /// Whether written data sits in a volatile cache until a FLUSH; as
    /// [`Target::write_cache`](crate::Target::write_cache).
    fn write_cache(&self) -> WriteCache {
        WriteCache::None
    }

    /// Files every queue's ring registers for the target, reached as
    /// [`Io::file`]`(0..)`: a registered file saves the kernel a file
    /// lookup per operation. Called once per queue, on its thread; the
    /// descriptors must stay open while the device is served.
    fn files(&self) -> Vec<BorrowedFd<'_>> {
        Vec::new()
    }
}

/// A queue's target object: turns a request into a future.
pub trait QueueTarget {
    /// Handles one request. The future runs on the queue's thread; it may
    /// await any number of operations and completions. `io` is the
    /// request: its fields, its data, and the queue's ring.
    ///
    /// The future borrows `self` and `io` (it captures both lifetimes);
    /// `async fn handle(&self, io: Io<'_>) -> IoResult` implements it.
    fn handle(&self, io: Io<'_>) -> impl Future<Output = IoResult>;

    /// A task the queue runs beside its requests, from before the first
    /// request until the queue stops (e.g. the reader of a connection whose
    /// replies complete requests in any order). Its operations are not
    /// tied to a request; at stop they are cancelled and reaped, then the
    /// task is dropped. By default there is none.
    fn run(&self, ring: Ring<'_>) -> impl Future<Output = ()> {
        let _ = ring;
        std::future::pending()
    }
}

/// One request, as its future sees it: the request, its data, and the
/// queue's ring. Lives only as long as the request's future.
pub struct Io<'r> {
    r: &'r Reactor,
    req: Request,
    /// The tag's buffer (null without one) and its size.
    buf: *mut u8,
    user_copy: bool,
    /// Under zero copy: the fixed-buffer index of the request's pages in
    /// the queue's ring (READ and WRITE only).
    fixed: Option<u16>,
    _thread_bound: PhantomData<*mut ()>,
}

impl std::fmt::Debug for Io<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Io").field("req", &self.req).finish()
    }
}

impl<'r> Io<'r> {
    pub(crate) fn new(r: &'r Reactor, req: Request, buf: *mut u8, buf_size: usize, user_copy: bool, fixed: Option<u16>) -> Self {
        debug_assert!(buf.is_null() || !matches!(req.op, crate::Op::Read | crate::Op::Write) || req.len() <= buf_size);
        Io { r, req, buf, user_copy, fixed, _thread_bound: PhantomData }
    }

    /// Under zero copy: the fixed-buffer index of the request's pages in
    /// the queue's ring (registered until the request is committed).
    pub(crate) fn fixed_index(&self) -> Option<u16> {
        self.fixed
    }

    /// The request.
    pub fn request(&self) -> &Request {
        &self.req
    }

    /// The queue's ring, for operations that own their buffers. They count
    /// against this request: it is committed once they are all over.
    pub fn ring(&self) -> Ring<'r> {
        Ring { r: self.r, tag: Some(self.req.tag) }
    }

    /// The `n`th of the target's registered files ([`AsyncTarget::files`]).
    ///
    /// # Panics
    /// If the target registered fewer than `n + 1` files.
    pub fn file(&self, n: u32) -> FileRef<'static> {
        assert!(n < self.r.files, "Io::file({n}): the target registered {} files (AsyncTarget::files)", self.r.files);
        FileRef::Fixed(1 + n)
    }

    /// Bytes of request data: `len()` for READ and WRITE, else 0.
    fn data_len(&self) -> usize {
        match self.req.op {
            crate::Op::Read | crate::Op::Write if !self.buf.is_null() || self.fixed.is_some() => self.req.len(),
            _ => 0,
        }
    }

    /// Under zero copy, the request's pages are not in this process.
    fn no_slices(&self, what: &str) {
        assert!(
            self.fixed.is_none(),
            "Io::{what} under zero copy: the request's data stays in the kernel; use Io::read_at/write_at, or create the device with DataPath::Copy or UserCopy (and do not declare AsyncTarget::zero_copy)"
        );
    }

    /// The request's data: a WRITE's bytes, or the buffer a READ fills.
    /// Empty for other ops and on devices without buffers.
    ///
    /// # Panics
    /// While an operation that writes into the data ([`Io::read_at`]) is in
    /// flight, even one whose future was dropped; and under zero copy
    /// ([`AsyncTarget::zero_copy`]), where the data is not in this process.
    pub fn data(&self) -> &[u8] {
        self.no_slices("data");
        let t = &self.r.tags[usize::from(self.req.tag)];
        assert!(t.data_writes.get() == 0, "request data read while an operation is writing it");
        let n = self.data_len();
        if n == 0 {
            return &[];
        }
        // SAFETY: the buffer is this tag's, at least `n` bytes (checked when
        // the request arrived); the server owns the request while this Io
        // lives, so the kernel's copy does not touch it. No operation writes
        // it: none is in flight (checked above), and starting one
        // (`read_at`) needs `&mut self`, which this borrow excludes.
        unsafe { std::slice::from_raw_parts(self.buf, n) }
    }

    /// The request's data, to fill for a READ.
    ///
    /// # Panics
    /// While any operation on the data is in flight, even one whose future
    /// was dropped; and under zero copy, as [`Io::data`].
    pub fn data_mut(&mut self) -> &mut [u8] {
        self.no_slices("data_mut");
        let t = &self.r.tags[usize::from(self.req.tag)];
        assert!(t.data_writes.get() == 0 && t.data_reads.get() == 0, "request data borrowed while an operation uses it");
        let n = self.data_len();
        if n == 0 {
            return &mut [];
        }
        // SAFETY: as in `data`; `&mut self` keeps any other slice of it (and
        // any new operation on it) out while this one lives, and none is in
        // flight (checked above).
        unsafe { std::slice::from_raw_parts_mut(self.buf, n) }
    }

    fn data_range(&self, range: &Range<usize>) -> (*mut u8, u32) {
        let n = self.data_len();
        assert!(
            range.start <= range.end && range.end <= n,
            "data range {range:?} outside the request's {n} bytes (no buffer: DataPath::NoData, or not a READ/WRITE)"
        );
        if self.fixed.is_some() {
            // A fixed buffer registered by the kernel starts at address 0:
            // the "address" is the offset into the request's pages.
            return (range.start as *mut u8, (range.end - range.start) as u32);
        }
        // SAFETY: inside the tag's buffer (checked above).
        (unsafe { self.buf.add(range.start) }, (range.end - range.start) as u32)
    }

    /// Reads `file` at `offset` into the request's data `range` (a READ's
    /// answer). Resolves to the bytes read (short at end of file). Takes
    /// `&mut self` only while starting: no slice of the data may be held
    /// across it, and several may be in flight on different ranges.
    ///
    /// # Panics
    /// If `range` is not inside the request's data.
    pub fn read_at<'f>(&mut self, file: impl Into<FileRef<'f>>, range: Range<usize>, offset: u64) -> Plain<'r> {
        let (p, n) = self.data_range(&range);
        let file = file.into();
        let fixed = self.fixed;
        // SAFETY: the tag's buffer outlives the queue's commands and this
        // request is committed only after the operation is over; `data` and
        // `data_mut` refuse while it writes there. Under zero copy the
        // "buffer" is a range of the request's pages, registered in the
        // ring until the commit (which waits for this operation), and the
        // kernel checks the range against them.
        Plain(unsafe {
            ops::Op::start(self.r, Some(self.req.tag), DataUse::Write, Some(file), (), |_| match fixed {
                Some(i) => ops::on_file!(file, |fd| opcode::ReadFixed::new(fd, p, n, i).offset(offset).build()),
                None => ops::on_file!(file, |fd| opcode::Read::new(fd, p, n).offset(offset).build()),
            })
        })
    }

    /// Writes the request's data `range` to `file` at `offset`, with `RWF_*`
    /// flags (`RWF_DSYNC` for a FUA write). Resolves to the bytes written.
    ///
    /// # Panics
    /// If `range` is not inside the request's data.
    pub fn write_at<'f>(&self, file: impl Into<FileRef<'f>>, range: Range<usize>, offset: u64, rw_flags: i32) -> Plain<'r> {
        let (p, n) = self.data_range(&range);
        let file = file.into();
        let fixed = self.fixed;
        // SAFETY: as in `read_at`; the kernel only reads the buffer.
        Plain(unsafe {
            ops::Op::start(self.r, Some(self.req.tag), DataUse::Read, Some(file), (), |_| match fixed {
                Some(i) => {
                    ops::on_file!(file, |fd| opcode::WriteFixed::new(fd, p, n, i).offset(offset).rw_flags(rw_flags).build())
                }
                None => ops::on_file!(file, |fd| opcode::Write::new(fd, p, n).offset(offset).rw_flags(rw_flags).build()),
            })
        })
    }

    /// Receives from `sock` into the request's data `range` (a READ's answer
    /// arriving on a connection), with `MSG_*` flags (`MSG_WAITALL` to get
    /// all of it unless the connection fails). Takes `&mut self` as
    /// [`Io::read_at`] does.
    ///
    /// # Panics
    /// If `range` is not inside the request's data, and under zero copy
    /// (the data is not in this process; see [`AsyncTarget::zero_copy`]).
    pub fn recv_data<'f>(&mut self, sock: impl Into<FileRef<'f>>, range: Range<usize>, flags: i32) -> Plain<'r> {
        self.no_slices("recv_data");
        let (p, n) = self.data_range(&range);
        let sock = sock.into();
        // SAFETY: as in `read_at`.
        Plain(unsafe {
            ops::Op::start(self.r, Some(self.req.tag), DataUse::Write, Some(sock), (), |_| {
                ops::on_file!(sock, |fd| opcode::Recv::new(fd, p, n).flags(flags).build())
            })
        })
    }

    /// Sends the request's data `range` (a WRITE's payload) on `sock`, with
    /// `MSG_*` flags (e.g. `MSG_MORE`, `MSG_NOSIGNAL`). Resolves to the bytes
    /// sent.
    ///
    /// # Panics
    /// If `range` is not inside the request's data, and under zero copy
    /// (the data is not in this process; see [`AsyncTarget::zero_copy`]).
    pub fn send_data<'f>(&self, sock: impl Into<FileRef<'f>>, range: Range<usize>, flags: i32) -> Plain<'r> {
        self.no_slices("send_data");
        let (p, n) = self.data_range(&range);
        let sock = sock.into();
        // SAFETY: as in `write_at`; the kernel only reads the buffer.
        Plain(unsafe {
            ops::Op::start(self.r, Some(self.req.tag), DataUse::Read, Some(sock), (), |_| {
                ops::on_file!(sock, |fd| opcode::Send::new(fd, p, n).flags(flags).build())
            })
        })
    }

    /// Whether the device was created with `UBLK_F_USER_COPY`.
    pub fn user_copy(&self) -> bool {
        self.user_copy
    }

    /// Where this request's data is in `/dev/ublkcN` under
    /// `UBLK_F_USER_COPY` (see [`user_copy_offset`](crate::queue::user_copy_offset)).
    pub fn user_copy_offset(&self) -> u64 {
        crate::queue::user_copy_offset(self.req.q_id, self.req.tag)
    }

    /// `/dev/ublkcN` as the queue's ring has it registered: with
    /// [`Io::user_copy_offset`], a target that manages its own buffers
    /// under `UBLK_F_USER_COPY` reads a WRITE's data from here and writes a
    /// READ's answer here.
    pub fn char_dev(&self) -> FileRef<'static> {
        FileRef::Fixed(0)
    }
}

//! io_uring operations as futures, on the queue's own ring.
//!
//! Each operation is pushed when it is created and completes with its own
//! CQE. Buffers are passed by value and handed back with the result, so
//! that an operation whose future is dropped early keeps its buffer alive
//! (and is cancelled) until the kernel is done with it: no safe code can
//! free memory an operation may still write.

use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use io_uring::{opcode, squeue, types};

use super::reactor::{DataUse, Reactor};
use crate::errno::Errno;

/// The result of an operation: bytes (or another non-negative count) or an
/// errno.
pub type OpResult = Result<u32, Errno>;

fn op_result(res: i32) -> OpResult {
    if res < 0 {
        Err(Errno::from_res(res))
    } else {
        Ok(res as u32)
    }
}

/// A buffer an operation may own while the kernel uses it: its bytes live on
/// the heap (or are static), so they stay put when the value moves.
///
/// # Safety
/// `stable_ptr` must return a pointer to `bytes_init` initialised bytes
/// that stays valid, and at the same address, while the value lives, even
/// when the value is moved; `stable_mut_ptr` likewise for `bytes_total`
/// writable bytes.
pub unsafe trait IoBuf: 'static {
    /// Start of the bytes.
    fn stable_ptr(&self) -> *const u8;
    /// Bytes an operation may read.
    fn bytes_init(&self) -> usize;
}

/// A buffer an operation may write.
///
/// # Safety
/// As [`IoBuf`]; `stable_mut_ptr` is writable for `bytes_total` bytes.
pub unsafe trait IoBufMut: IoBuf {
    /// Start of the writable bytes.
    fn stable_mut_ptr(&mut self) -> *mut u8;
    /// Bytes an operation may write (a read fills at most this many).
    fn bytes_total(&self) -> usize;
}

// SAFETY: a Vec's elements are on the heap; moving the Vec moves only its
// (pointer, length, capacity).
unsafe impl IoBuf for Vec<u8> {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
}

// SAFETY: as above; reads fill the Vec's length (make it with vec![0; n]).
unsafe impl IoBufMut for Vec<u8> {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
    fn bytes_total(&self) -> usize {
        self.len()
    }
}

// SAFETY: a boxed slice's bytes are on the heap.
unsafe impl IoBuf for Box<[u8]> {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
}

// SAFETY: as above.
unsafe impl IoBufMut for Box<[u8]> {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_ptr()
    }
    fn bytes_total(&self) -> usize {
        self.len()
    }
}

// SAFETY: static bytes never move or go away.
unsafe impl IoBuf for &'static [u8] {
    fn stable_ptr(&self) -> *const u8 {
        self.as_ptr()
    }
    fn bytes_init(&self) -> usize {
        self.len()
    }
}

/// The file an operation works on: a descriptor, or a file registered with
/// the queue's ring ([`AsyncTarget::files`](super::AsyncTarget::files),
/// reached with [`Io::file`](super::Io::file)).
///
/// A descriptor closed before its operation is submitted makes the
/// operation fail with `EBADF` (or act on whatever file took the number);
/// once submitted, the kernel holds its own reference to the file.
#[derive(Debug, Clone, Copy)]
pub enum FileRef<'a> {
    /// A descriptor.
    Fd(BorrowedFd<'a>),
    /// A registered file's index in the ring's file table.
    Fixed(u32),
}

impl<'a, T: AsFd> From<&'a T> for FileRef<'a> {
    fn from(f: &'a T) -> Self {
        FileRef::Fd(f.as_fd())
    }
}

impl<'a> From<BorrowedFd<'a>> for FileRef<'a> {
    fn from(f: BorrowedFd<'a>) -> Self {
        FileRef::Fd(f)
    }
}

/// A file argument as io_uring's builders take it.
pub(crate) enum FdTarget {
    Fd(types::Fd),
    Fixed(types::Fixed),
}

impl FileRef<'_> {
    pub(crate) fn target(self) -> FdTarget {
        match self {
            FileRef::Fd(fd) => FdTarget::Fd(types::Fd(fd.as_raw_fd())),
            FileRef::Fixed(i) => FdTarget::Fixed(types::Fixed(i)),
        }
    }
}

/// Builds an opcode on either kind of file.
macro_rules! on_file {
    ($file:expr, |$fd:ident| $build:expr) => {
        match $file.target() {
            $crate::aio::ops::FdTarget::Fd($fd) => $build,
            $crate::aio::ops::FdTarget::Fixed($fd) => $build,
        }
    };
}
pub(crate) use on_file;

/// An operation in flight: resolves to its result and whatever it owned.
///
/// Dropping it before it resolves cancels the operation
/// (`IORING_OP_ASYNC_CANCEL`); what it owns is kept until the kernel
/// reports the operation over.
#[must_use = "an operation is already queued to the kernel; dropping it cancels it"]
pub struct Op<'r, K: 'static = ()> {
    r: &'r Reactor,
    idx: u32,
    keep: Option<K>,
    /// Holds the queue to its thread, like the queue itself.
    _thread_bound: PhantomData<*mut ()>,
}

impl<K: 'static> Unpin for Op<'_, K> {}

impl<'r, K: 'static> Op<'r, K> {
    /// Pushes `sqe` (built in the slot) for `tag`, owning `keep` until done.
    ///
    /// # Safety
    /// What the SQE names must be the tag's data (for `data` other than
    /// `None`), the slot's storage, static, or owned by `keep` at a stable
    /// address.
    pub(crate) unsafe fn start(
        r: &'r Reactor,
        tag: Option<u16>,
        data: DataUse,
        file: Option<FileRef<'_>>,
        keep: K,
        build: impl FnOnce(&mut super::reactor::Slot) -> squeue::Entry,
    ) -> Self {
        // A descriptor borrowed only for this call must reach the kernel now.
        let submit_now = matches!(file, Some(FileRef::Fd(_)));
        // SAFETY: the caller's promise; `keep` lives in the Op, and moves to
        // the slot if the Op is dropped before the completion.
        let idx = unsafe { r.start(tag, data, submit_now, build) };
        Op { r, idx, keep: Some(keep), _thread_bound: PhantomData }
    }
}

impl<K: 'static> Future for Op<'_, K> {
    type Output = (OpResult, K);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(keep) = self.keep.as_ref() else { panic!("operation polled after it resolved") };
        let _ = keep;
        match self.r.poll_result(self.idx, cx.waker()) {
            Some(res) => {
                let keep = self.keep.take().expect("checked above");
                Poll::Ready((op_result(res), keep))
            }
            None => Poll::Pending,
        }
    }
}

impl<K: 'static> Drop for Op<'_, K> {
    fn drop(&mut self) {
        if let Some(keep) = self.keep.take() {
            // Boxed even when zero-sized (no allocation then): a guard type
            // must live until the completion too.
            self.r.orphan(self.idx, Some(Box::new(keep)));
        }
    }
}

/// An operation that owns nothing: resolves to its result alone.
#[must_use = "an operation is already queued to the kernel; dropping it cancels it"]
pub struct Plain<'r>(pub(crate) Op<'r, ()>);

impl Future for Plain<'_> {
    type Output = OpResult;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<OpResult> {
        Pin::new(&mut self.0).poll(cx).map(|(r, ())| r)
    }
}

/// A [`Ring::sleep`]: resolves to `Ok(0)` when the time is up.
#[must_use = "an operation is already queued to the kernel; dropping it cancels it"]
pub struct Sleep<'r>(Op<'r, ()>);

impl Future for Sleep<'_> {
    type Output = OpResult;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<OpResult> {
        Pin::new(&mut self.0).poll(cx).map(|(r, ())| match r {
            // The kernel reports an expired timeout as -ETIME.
            Err(e) if e == Errno::ETIME => Ok(0),
            r => r,
        })
    }
}

/// An owned socket address, kept at a stable address for CONNECT.
struct SockAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl SockAddr {
    fn new(addr: &SocketAddr) -> Box<SockAddr> {
        // SAFETY: sockaddr_storage is plain integers; all zeros is valid.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_in fits in sockaddr_storage, which is
                // aligned for every sockaddr type.
                unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: as above.
                unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        Box::new(SockAddr { storage, len: len as libc::socklen_t })
    }
}

/// io_uring operations on the queue's ring that own their buffers. Got from
/// [`Io::ring`](super::Io::ring); each operation counts against its
/// request, which is committed only once all of them are over.
#[derive(Clone, Copy)]
pub struct Ring<'r> {
    pub(crate) r: &'r Reactor,
    pub(crate) tag: Option<u16>,
}

impl std::fmt::Debug for Ring<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("tag", &self.tag).finish()
    }
}

impl<'r> Ring<'r> {
    fn plain(&self, file: Option<FileRef<'_>>, build: impl FnOnce() -> squeue::Entry) -> Plain<'r> {
        // SAFETY: the SQE names no memory.
        Plain(unsafe { Op::start(self.r, self.tag, DataUse::None, file, (), |_| build()) })
    }

    /// `pread` into `buf` (up to its length) at `offset`.
    pub fn read<'f, B: IoBufMut>(&self, file: impl Into<FileRef<'f>>, mut buf: B, offset: u64) -> Op<'r, B> {
        let (p, n) = (buf.stable_mut_ptr(), buf.bytes_total() as u32);
        let file = file.into();
        // SAFETY: `buf` is owned by the Op (stable heap bytes) until done.
        unsafe {
            Op::start(self.r, self.tag, DataUse::None, Some(file), buf, |_| {
                on_file!(file, |fd| opcode::Read::new(fd, p, n).offset(offset).build())
            })
        }
    }

    /// `pwrite` of `buf` at `offset`, with `RWF_*` flags (e.g. `RWF_DSYNC`).
    pub fn write<'f, B: IoBuf>(&self, file: impl Into<FileRef<'f>>, buf: B, offset: u64, rw_flags: i32) -> Op<'r, B> {
        let (p, n) = (buf.stable_ptr(), buf.bytes_init() as u32);
        let file = file.into();
        // SAFETY: as in `read`.
        unsafe {
            Op::start(self.r, self.tag, DataUse::None, Some(file), buf, |_| {
                on_file!(file, |fd| opcode::Write::new(fd, p, n).offset(offset).rw_flags(rw_flags).build())
            })
        }
    }

    /// `preadv` into each of `bufs` in turn, at `offset`.
    pub fn readv<'f, B: IoBufMut>(
        &self,
        file: impl Into<FileRef<'f>>,
        mut bufs: Vec<B>,
        offset: u64,
    ) -> Op<'r, (Vec<B>, Vec<libc::iovec>)> {
        let iov: Vec<libc::iovec> =
            bufs.iter_mut().map(|b| libc::iovec { iov_base: b.stable_mut_ptr().cast(), iov_len: b.bytes_total() }).collect();
        let (p, n) = (iov.as_ptr(), iov.len() as u32);
        let file = file.into();
        // SAFETY: the buffers and the iovec array (heap) are owned by the Op.
        unsafe {
            Op::start(self.r, self.tag, DataUse::None, Some(file), (bufs, iov), |_| {
                on_file!(file, |fd| opcode::Readv::new(fd, p, n).offset(offset).build())
            })
        }
    }

    /// `pwritev` of each of `bufs` in turn, at `offset`.
    pub fn writev<'f, B: IoBuf>(&self, file: impl Into<FileRef<'f>>, bufs: Vec<B>, offset: u64) -> Op<'r, (Vec<B>, Vec<libc::iovec>)> {
        let iov: Vec<libc::iovec> =
            bufs.iter().map(|b| libc::iovec { iov_base: b.stable_ptr() as *mut libc::c_void, iov_len: b.bytes_init() }).collect();
        let (p, n) = (iov.as_ptr(), iov.len() as u32);
        let file = file.into();
        // SAFETY: as in `readv`; the kernel only reads the buffers.
        unsafe {
            Op::start(self.r, self.tag, DataUse::None, Some(file), (bufs, iov), |_| {
                on_file!(file, |fd| opcode::Writev::new(fd, p, n).offset(offset).build())
            })
        }
    }

    /// `fsync`, or `fdatasync` with `datasync`.
    pub fn fsync<'f>(&self, file: impl Into<FileRef<'f>>, datasync: bool) -> Plain<'r> {
        let flags = if datasync { types::FsyncFlags::DATASYNC } else { types::FsyncFlags::empty() };
        let file = file.into();
        self.plain(Some(file), || on_file!(file, |fd| opcode::Fsync::new(fd).flags(flags).build()))
    }

    /// `fallocate(mode, offset, len)` (e.g. `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`).
    pub fn fallocate<'f>(&self, file: impl Into<FileRef<'f>>, mode: i32, offset: u64, len: u64) -> Plain<'r> {
        let file = file.into();
        self.plain(Some(file), || on_file!(file, |fd| opcode::Fallocate::new(fd, len).offset(offset).mode(mode).build()))
    }

    /// `send` of `buf` with `MSG_*` flags.
    pub fn send<'f, B: IoBuf>(&self, sock: impl Into<FileRef<'f>>, buf: B, flags: i32) -> Op<'r, B> {
        let (p, n) = (buf.stable_ptr(), buf.bytes_init() as u32);
        let sock = sock.into();
        // SAFETY: as in `write`.
        unsafe {
            Op::start(self.r, self.tag, DataUse::None, Some(sock), buf, |_| {
                on_file!(sock, |fd| opcode::Send::new(fd, p, n).flags(flags).build())
            })
        }
    }

    /// `recv` into `buf` (up to its length) with `MSG_*` flags (e.g. `MSG_WAITALL`).
    pub fn recv<'f, B: IoBufMut>(&self, sock: impl Into<FileRef<'f>>, mut buf: B, flags: i32) -> Op<'r, B> {
        let (p, n) = (buf.stable_mut_ptr(), buf.bytes_total() as u32);
        let sock = sock.into();
        // SAFETY: as in `read`.
        unsafe {
            Op::start(self.r, self.tag, DataUse::None, Some(sock), buf, |_| {
                on_file!(sock, |fd| opcode::Recv::new(fd, p, n).flags(flags).build())
            })
        }
    }

    /// `connect` of a socket to `addr`.
    pub fn connect<'f>(&self, sock: impl Into<FileRef<'f>>, addr: SocketAddr) -> Plain<'r> {
        let sa = SockAddr::new(&addr);
        let (p, n) = (&sa.storage as *const libc::sockaddr_storage as *const libc::sockaddr, sa.len);
        let sock = sock.into();
        // SAFETY: the address is boxed and owned by the Op until done.
        let op = unsafe {
            Op::start(self.r, self.tag, DataUse::None, Some(sock), sa, |_| on_file!(sock, |fd| opcode::Connect::new(fd, p, n).build()))
        };
        // Drop the SockAddr from the result: map through a Plain-like wrapper.
        Plain(Op::forget_keep(op))
    }

    /// Completes after `d` (an io_uring TIMEOUT) with `Ok(0)`; `Err` only if
    /// it was cancelled (`ECANCELED`) or refused.
    pub fn sleep(&self, d: Duration) -> Sleep<'r> {
        // SAFETY: the timespec lives in the operation's slot, which stays
        // put until the completion.
        Sleep(unsafe {
            Op::start(self.r, self.tag, DataUse::None, None, (), |slot| {
                slot.ts = types::Timespec::new().sec(d.as_secs()).nsec(d.subsec_nanos());
                opcode::Timeout::new(&slot.ts as *const types::Timespec).build()
            })
        })
    }

    /// A no-op that completes at once (after a trip through the ring).
    pub fn nop(&self) -> Plain<'r> {
        self.plain(None, || opcode::Nop::new().build())
    }

    /// Pushes any operation. Its `user_data` is set by the queue.
    ///
    /// # Safety
    /// * Every buffer, iovec, address or other memory the SQE names must
    ///   stay valid until the operation completes, even if this future is
    ///   dropped first (a dropped operation is cancelled, but the kernel may
    ///   finish it meanwhile). Memory owned by `keep` is kept until then.
    /// * The operation must produce exactly one completion: no multishot
    ///   operations, no `IOSQE_CQE_SKIP_SUCCESS`, no links
    ///   (`IOSQE_IO_LINK`/`IOSQE_IO_HARDLINK`), nothing that posts
    ///   notification CQEs (zero-copy send).
    /// * It must not name the queue's fixed file 0 (`/dev/ublkcN`) with an
    ///   io command, cancel other operations (`IORING_ASYNC_CANCEL_ANY`, by
    ///   another user_data), remove or update other polls or timeouts, or
    ///   change the ring's registered files or buffers.
    /// * A descriptor it names by number must stay open until it is
    ///   submitted (at the queue's next `io_uring_enter`).
    /// * A registered buffer it names by index must be a
    ///   [`FixedBuf`](super::FixedBuf) that `keep` owns, or the request's
    ///   own pages under zero copy.
    pub unsafe fn raw<K: 'static>(&self, sqe: squeue::Entry, keep: K) -> Op<'r, K> {
        // SAFETY: the caller's promise.
        unsafe { Op::start(self.r, self.tag, DataUse::None, None, keep, |_| sqe) }
    }

    /// Pushes `sqes` as one linked chain, in one submission: each runs only
    /// once the one before it completed as asked (`IOSQE_IO_LINK`, set here
    /// on every one but the last); the first that fails or comes short ends
    /// the chain, and the ones after it complete with ECANCELED without
    /// running. Their operations go to `ops` (emptied first), in order;
    /// `keep` goes with the last one, whose completion comes last. `keep`
    /// back, and nothing pushed, if the ring cannot hold that many at once.
    ///
    /// # Safety
    /// As for [`Ring::raw`], for every SQE except for the links, which this
    /// sets (the SQEs given must carry none): memory any of them names must
    /// stay valid until the last one completes (`keep` may own it).
    pub(crate) unsafe fn raw_chain<K: 'static>(&self, sqes: &[squeue::Entry], keep: K, ops: &mut Vec<Op<'r, Option<K>>>) -> Result<(), K> {
        ops.clear();
        if sqes.is_empty() || !self.r.reserve(sqes.len()) {
            return Err(keep);
        }
        let mut keep = Some(keep);
        for (i, sqe) in sqes.iter().enumerate() {
            let last = i + 1 == sqes.len();
            let sqe = if last { sqe.clone() } else { sqe.clone().flags(squeue::Flags::IO_LINK) };
            let k = if last { keep.take() } else { None };
            // SAFETY: the caller's promise; `reserve` made room for the whole
            // chain, and none of these submits on its own (no descriptor
            // borrowed for the call), so it reaches the kernel in one
            // submission. (The kernel could still split it if it failed to
            // allocate a request part-way, leaving the rest for a later
            // submit; nothing here can prevent that.)
            ops.push(unsafe { Op::start(self.r, self.tag, DataUse::None, None, k, |_| sqe) });
        }
        Ok(())
    }

    /// Raw descriptor of a [`FileRef::Fd`], for building raw SQEs.
    pub fn raw_fd(file: FileRef<'_>) -> Option<RawFd> {
        match file {
            FileRef::Fd(fd) => Some(fd.as_raw_fd()),
            FileRef::Fixed(_) => None,
        }
    }
}

impl<'r, K: 'static> Op<'r, K> {
    /// An Op whose owned value is kept (until the operation is over) but not
    /// returned.
    fn forget_keep(mut self) -> Op<'r, ()> {
        let keep = self.keep.take().expect("fresh op");
        let r = self.r;
        let idx = self.idx;
        // Dropping `self` now would orphan the slot: it has no keep any more,
        // so it is simply forgotten.
        std::mem::forget(self);
        // The value must outlive the operation: give it to the slot now.
        r.keep_until_done(idx, Box::new(keep));
        Op { r, idx, keep: Some(()), _thread_bound: PhantomData }
    }
}

//! What a target implements: the handling of one request.

use ublk_sys as sys;

/// The operation of a request (`UBLK_IO_OP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read `nr_sectors` into the buffer.
    Read,
    /// Write the buffer's `nr_sectors`.
    Write,
    /// Make earlier writes durable.
    Flush,
    /// Discard the range (no data).
    Discard,
    /// Zero the range (no data).
    WriteZeroes,
    /// Anything else (zoned ops, WRITE_SAME...): answered with -EOPNOTSUPP
    /// by the queue without calling the target.
    Other(u8),
}

impl Op {
    /// Decodes `ublksrv_io_desc.op_flags & 0xff`.
    pub fn from_raw(op: u8) -> Op {
        match u32::from(op) {
            sys::UBLK_IO_OP_READ => Op::Read,
            sys::UBLK_IO_OP_WRITE => Op::Write,
            sys::UBLK_IO_OP_FLUSH => Op::Flush,
            sys::UBLK_IO_OP_DISCARD => Op::Discard,
            sys::UBLK_IO_OP_WRITE_ZEROES => Op::WriteZeroes,
            _ => Op::Other(op),
        }
    }
}

/// One request, decoded from the descriptor the kernel wrote for its tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Queue the request arrived on.
    pub q_id: u16,
    /// Its tag in that queue.
    pub tag: u16,
    /// What to do.
    pub op: Op,
    /// `UBLK_IO_F_*` flags (FUA, NOUNMAP, ...).
    pub flags: u32,
    /// First 512-byte sector.
    pub start_sector: u64,
    /// Number of 512-byte sectors.
    pub nr_sectors: u32,
}

impl Request {
    /// Byte offset into the device.
    pub fn offset(&self) -> u64 {
        self.start_sector << 9
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        (self.nr_sectors as usize) << 9
    }

    /// Whether the request has no sectors.
    pub fn is_empty(&self) -> bool {
        self.nr_sectors == 0
    }

    /// Whether a WRITE must be durable when answered (`UBLK_IO_F_FUA`; sent
    /// only to targets that declare [`WriteCache::VolatileFua`]).
    pub fn fua(&self) -> bool {
        self.flags & sys::UBLK_IO_F_FUA != 0
    }
}

/// The outcome of a request: `Ok(bytes done)` or `Err(positive errno)`.
///
/// The queue turns every answer into the result it commits to the kernel in
/// one place, by one rule, so that no answer can make the kernel loop or
/// misreport a request:
///
/// * a READ or WRITE answered `Ok(n)` with `n == req.len()` completes;
/// * `Ok(n)` with `n < req.len()` (a short or zero transfer) fails the
///   request with `EIO` when the target answered directly; when the answer
///   is the completion of an operation the target pushed on the ring, a short
///   transfer that ends on a sector boundary is finished: the target's
///   [`Target::submit`] is called again for the rest of the request (a zero
///   transfer, or one that does not end on a sector boundary, fails with
///   `EIO`). Older kernels (6.1–6.12) requeue a WRITE committed with 0 bytes
///   forever, and kernels disagree on partial results, so nothing short is
///   ever committed;
/// * `Ok(n)` with `n > req.len()` is a bug in the target: `EIO`;
/// * FLUSH, DISCARD and WRITE_ZEROES answered `Ok(_)` complete (the count is
///   not used);
/// * `Err(e)` with `e` in `1..=4095` fails the request with that errno (the
///   block layer maps it to a status, e.g. `ENOSPC`, `EOPNOTSUPP`, else
///   `EIO`); `Err(0)`, a negative or a larger value is a bug in the target
///   and fails the request with `EIO`.
///
/// Answers the rule had to correct are counted in
/// [`QueueStats::invalid`](crate::QueueStats::invalid).
pub type IoResult = Result<u32, i32>;

/// What the queue commits for a request, or that it must ask the target for
/// the rest of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Commit this result: bytes (>= 0) or -errno.
    Commit(i32),
    /// `done` bytes of the request are transferred: ask for the rest.
    Rest {
        /// Bytes of the request done so far.
        done: u32,
    },
}

/// Largest errno the kernel knows (`MAX_ERRNO`).
const MAX_ERRNO: i32 = 4095;

/// The one rule that turns a target's answer into the committed result (see
/// [`IoResult`]). `done` is what earlier parts of the request transferred,
/// `answer` the answer for the part from `done` on; `retry` says whether a
/// short transfer may be finished by asking again (only for operations on
/// the ring, where the target does the rest without blocking the queue).
/// The second value says whether the answer broke the rule.
pub(crate) fn settle(req: &Request, done: u32, answer: IoResult, retry: bool) -> (Settled, bool) {
    let len = req.len() as u64;
    match answer {
        Err(e) if (1..=MAX_ERRNO).contains(&e) => (Settled::Commit(-e), false),
        Err(_) => (Settled::Commit(-libc::EIO), true),
        Ok(_) if !matches!(req.op, Op::Read | Op::Write) => (Settled::Commit(0), false),
        Ok(n) => {
            let total = u64::from(done) + u64::from(n);
            if total == len {
                // len <= max_io_buf_bytes < i32::MAX
                (Settled::Commit(total as i32), false)
            } else if total > len {
                (Settled::Commit(-libc::EIO), true)
            } else if retry && n > 0 && total % 512 == 0 {
                (Settled::Rest { done: total as u32 }, false)
            } else {
                (Settled::Commit(-libc::EIO), false)
            }
        }
    }
}

/// io_uring access for a target that answers requests asynchronously on the
/// queue's own ring (e.g. a loop target reading its backing file).
///
/// A request handed to [`Target::submit`] may push exactly one operation
/// here; its completion's `res` (bytes, or -errno) is the request's answer,
/// settled by the rule of [`IoResult`] without calling the target again,
/// except to finish a short transfer.
pub struct TargetIo<'a> {
    pub(crate) sq: io_uring::squeue::SubmissionQueue<'a>,
    pub(crate) user_data: u64,
    pub(crate) pushed: bool,
    /// The queue's count of operations in flight, and this tag's flag.
    pub(crate) ops_in_flight: &'a mut u16,
    pub(crate) in_op: &'a mut bool,
}

/// SQE flags that would make an operation produce no completion, or tie it
/// to another one (`IOSQE_IO_LINK`, `IOSQE_IO_HARDLINK`,
/// `IOSQE_CQE_SKIP_SUCCESS`).
const ONE_CQE_FORBIDDEN: u8 = (1 << 2) | (1 << 3) | (1 << 6);

impl TargetIo<'_> {
    /// The fixed-file index of the target's `n`th file (see [`Target::files`]).
    pub fn file(&self, n: u32) -> io_uring::types::Fixed {
        io_uring::types::Fixed(1 + n)
    }

    /// Pushes the request's one operation. Its user_data is set by the queue.
    ///
    /// # Panics
    /// If an operation was already pushed for this request, or the operation
    /// carries `IOSQE_IO_LINK`, `IOSQE_IO_HARDLINK` or
    /// `IOSQE_CQE_SKIP_SUCCESS` (it must produce exactly one completion).
    ///
    /// # Safety
    /// * Every buffer the operation reads or writes must stay valid until it
    ///   completes: use the request's `buf` (valid until the request is
    ///   committed, which happens only after this operation's completion) or
    ///   memory the target owns for its whole life (the target outlives
    ///   [`Device::serve`](crate::Device::serve)).
    /// * The operation must produce exactly one completion: no multishot
    ///   operation (multishot accept/recv/poll, `IORING_TIMEOUT_MULTISHOT`),
    ///   nothing that posts extra CQEs (`IORING_RECVSEND_NOTIF`-style
    ///   zero-copy sends).
    /// * File descriptors other than `file(n)` must stay open until it
    ///   completes.
    pub unsafe fn push(&mut self, sqe: io_uring::squeue::Entry) {
        assert!(!self.pushed, "one operation per request");
        const _: () = assert!(std::mem::size_of::<io_uring::squeue::Entry>() == 64);
        // SAFETY: squeue::Entry is the 64-byte `struct io_uring_sqe`
        // (repr(C), checked above); its byte 1 is `flags`.
        let flags = unsafe { *(&sqe as *const io_uring::squeue::Entry as *const u8).add(1) };
        assert!(
            flags & ONE_CQE_FORBIDDEN == 0,
            "a target operation must produce exactly one completion: no IOSQE_IO_LINK, IOSQE_IO_HARDLINK or IOSQE_CQE_SKIP_SUCCESS (flags {flags:#x})"
        );
        // SAFETY: the caller upholds the buffer lifetime; the queue's ring
        // has a slot per tag, and each tag has at most one operation in flight.
        let r = unsafe { self.sq.push(&sqe.user_data(self.user_data)) };
        assert!(r.is_ok(), "queue ring full");
        self.pushed = true;
        *self.ops_in_flight += 1;
        *self.in_op = true;
    }
}

/// Whether a target's storage keeps written data in volatile memory, which
/// decides whether the block layer sends it FLUSH requests and FUA writes
/// (`UBLK_ATTR_VOLATILE_CACHE`, `UBLK_ATTR_FUA` in the device's parameters).
///
/// A device without a volatile cache tells the kernel that every completed
/// write is already durable: the block layer then completes `fsync`'s flushes
/// itself and never sends one to the target. A target whose writes land in a
/// page cache, a disk's write cache or a remote server's memory must say so,
/// or an fsync'd write can be lost in a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteCache {
    /// Completed writes are durable (or the data is not meant to survive
    /// anything: a RAM disk, a null device). No FLUSH is sent.
    #[default]
    None,
    /// Completed writes may be lost until a FLUSH, which the target must
    /// answer only once everything written before is durable. FUA writes
    /// are emulated by the block layer with a write and a flush.
    Volatile,
    /// As `Volatile`, and the target also honours FUA: a WRITE with
    /// `UBLK_IO_F_FUA` in [`Request::flags`] (see [`Request::fua`]) is
    /// durable when answered.
    VolatileFua,
}

impl WriteCache {
    /// The `UBLK_ATTR_*` bits this cache sets in the device's parameters.
    pub fn attrs(self) -> u32 {
        match self {
            WriteCache::None => 0,
            WriteCache::Volatile => sys::UBLK_ATTR_VOLATILE_CACHE,
            WriteCache::VolatileFua => sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
        }
    }
}

/// A block device's behaviour: answers one request at a time.
///
/// Called on the queue's own thread; `buf` is that tag's buffer, exactly
/// `req.len()` bytes for reads and writes and empty for the other ops. For a
/// read, fill it; for a write, consume it. Return the bytes done (`len` for a
/// full transfer) or `Err(errno)` (e.g. `Err(libc::EIO)`), which the block
/// layer turns into an I/O error for that request; [`IoResult`] gives the
/// exact rule, including what becomes of short transfers.
///
/// A target whose writes are not durable when answered must say so with
/// [`Target::write_cache`], or flushes never reach it.
pub trait Target: Send + Sync {
    /// Handles one request.
    fn handle(&self, req: &Request, buf: &mut [u8]) -> IoResult;

    /// Whether the target reads or writes request data. A target that does
    /// not (a null target) can run on a device without buffers
    /// ([`DataPath::NoData`](crate::DataPath::NoData)); it then gets an empty
    /// `buf`.
    fn needs_data(&self) -> bool {
        true
    }

    /// Whether written data sits in a volatile cache until a FLUSH (default
    /// [`WriteCache::None`]). [`Device::serve`](crate::Device::serve) sets
    /// the matching `UBLK_ATTR_*` bits before the device starts, so FLUSH
    /// and FUA reach the target exactly when it needs them.
    fn write_cache(&self) -> WriteCache {
        WriteCache::None
    }

    /// Files every queue ring registers for the target, as fixed files
    /// `TargetIo::file(0..)`. Called once per queue.
    fn files(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }

    /// Starts a request. Return `Some(result)` to answer now (the default
    /// calls [`Target::handle`]), or push one operation to `io` and return
    /// `None` to answer with that operation's completion.
    ///
    /// When that operation transfers only part of a READ or WRITE (a short
    /// read or write of a file), `submit` is called again with the rest:
    /// `req` then starts `done` bytes later and `buf` is the rest of the
    /// tag's buffer (see [`IoResult`]).
    fn submit(&self, req: &Request, buf: &mut [u8], io: &mut TargetIo<'_>) -> Option<IoResult> {
        let _ = io;
        Some(self.handle(req, buf))
    }
}

/// Reads return the requested length, writes are discarded, every other
/// supported op succeeds. A read returns whatever the buffer holds: with
/// [`DataPath::Copy`](crate::DataPath::Copy) zeros unless a write left data
/// there; with [`DataPath::NoData`](crate::DataPath::NoData) the reader's own
/// pages are left as they were (as with the kernel's `null_blk`).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullTarget;

impl Target for NullTarget {
    fn needs_data(&self) -> bool {
        false
    }

    #[inline]
    fn handle(&self, req: &Request, _buf: &mut [u8]) -> IoResult {
        Ok(req.len() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(op: Op, sectors: u32) -> Request {
        Request { q_id: 0, tag: 0, op, flags: 0, start_sector: 8, nr_sectors: sectors }
    }

    #[test]
    fn full_transfers_and_errnos_commit_as_answered() {
        let w = req(Op::Write, 8);
        assert_eq!(settle(&w, 0, Ok(4096), false), (Settled::Commit(4096), false));
        assert_eq!(settle(&w, 0, Err(libc::ENOSPC), false), (Settled::Commit(-libc::ENOSPC), false));
        assert_eq!(settle(&req(Op::Flush, 0), 0, Ok(0), false), (Settled::Commit(0), false));
        assert_eq!(settle(&req(Op::Discard, 8), 0, Ok(12345), false), (Settled::Commit(0), false));
    }

    #[test]
    fn zero_short_and_oversized_answers_never_commit_short() {
        let w = req(Op::Write, 8);
        // A 0-byte WRITE commit loops forever on 6.1-6.12.
        assert_eq!(settle(&w, 0, Ok(0), false), (Settled::Commit(-libc::EIO), false));
        assert_eq!(settle(&w, 0, Ok(0), true), (Settled::Commit(-libc::EIO), false));
        assert_eq!(settle(&w, 0, Ok(2048), false), (Settled::Commit(-libc::EIO), false));
        assert_eq!(settle(&req(Op::Read, 8), 0, Ok(100), false), (Settled::Commit(-libc::EIO), false));
        // Would wrap negative as an i32.
        assert_eq!(settle(&w, 0, Ok(u32::MAX), false), (Settled::Commit(-libc::EIO), true));
        assert_eq!(settle(&w, 0, Ok(4097), true), (Settled::Commit(-libc::EIO), true));
    }

    #[test]
    fn ring_operations_finish_short_transfers_on_sector_boundaries() {
        let r = req(Op::Read, 8);
        assert_eq!(settle(&r, 0, Ok(1024), true), (Settled::Rest { done: 1024 }, false));
        assert_eq!(settle(&r, 1024, Ok(2048), true), (Settled::Rest { done: 3072 }, false));
        assert_eq!(settle(&r, 3072, Ok(1024), true), (Settled::Commit(4096), false));
        // Not on a sector boundary: the rest cannot be expressed as a request.
        assert_eq!(settle(&r, 0, Ok(1000), true), (Settled::Commit(-libc::EIO), false));
        assert_eq!(settle(&r, 1024, Err(libc::EIO), true), (Settled::Commit(-libc::EIO), false));
    }

    #[test]
    fn bad_errnos_are_programming_errors() {
        let w = req(Op::Write, 8);
        assert_eq!(settle(&w, 0, Err(0), false), (Settled::Commit(-libc::EIO), true));
        assert_eq!(settle(&w, 0, Err(-libc::EIO), false), (Settled::Commit(-libc::EIO), true));
        assert_eq!(settle(&w, 0, Err(4096), false), (Settled::Commit(-libc::EIO), true));
        assert_eq!(settle(&w, 0, Err(4095), false), (Settled::Commit(-4095), false));
    }

    #[test]
    fn write_cache_attributes() {
        assert_eq!(WriteCache::None.attrs(), 0);
        assert_eq!(WriteCache::Volatile.attrs(), sys::UBLK_ATTR_VOLATILE_CACHE);
        assert_eq!(WriteCache::VolatileFua.attrs(), sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA);
    }
}

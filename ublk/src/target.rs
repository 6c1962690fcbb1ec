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
}

/// The outcome of a request: bytes done, or a positive errno.
pub type IoResult = Result<u32, i32>;

/// io_uring access for a target that answers requests asynchronously on the
/// queue's own ring (e.g. a loop target reading its backing file).
///
/// A request handed to [`Target::submit`] may push exactly one operation
/// here; its completion's `res` (bytes, or -errno) becomes the request's
/// result, committed to the kernel without calling the target again.
pub struct TargetIo<'a> {
    pub(crate) sq: io_uring::squeue::SubmissionQueue<'a>,
    pub(crate) user_data: u64,
    pub(crate) pushed: bool,
}

impl TargetIo<'_> {
    /// The fixed-file index of the target's `n`th file (see [`Target::files`]).
    pub fn file(&self, n: u32) -> io_uring::types::Fixed {
        io_uring::types::Fixed(1 + n)
    }

    /// Pushes the request's one operation. Its user_data is set by the queue.
    ///
    /// # Safety
    /// The operation's buffers must stay valid until it completes: use the
    /// request's `buf` (valid until the request is committed) or memory the
    /// target owns for its whole life.
    pub unsafe fn push(&mut self, sqe: io_uring::squeue::Entry) {
        assert!(!self.pushed, "one operation per request");
        // SAFETY: the caller upholds the buffer lifetime; the queue's ring
        // has a slot per tag, and each tag has at most one operation in flight.
        let r = unsafe { self.sq.push(&sqe.user_data(self.user_data)) };
        assert!(r.is_ok(), "queue ring full");
        self.pushed = true;
    }
}

/// A block device's behaviour: answers one request at a time.
///
/// Called on the queue's own thread; `buf` is that tag's buffer, exactly
/// `req.len()` bytes for reads and writes and empty for the other ops. For a
/// read, fill it; for a write, consume it. Return the bytes done (`len` for a
/// full transfer) or `Err(errno)` (e.g. `Err(libc::EIO)`), which the block
/// layer turns into an I/O error for that request.
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

    /// Files every queue ring registers for the target, as fixed files
    /// `TargetIo::file(0..)`. Called once per queue.
    fn files(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }

    /// Starts a request. Return `Some(result)` to answer now (the default
    /// calls [`Target::handle`]), or push one operation to `io` and return
    /// `None` to answer with that operation's completion.
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

//! What a target implements: the handling of one request.

use ublk_sys as sys;

use crate::errno::Errno;

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

/// The outcome of a request: `Ok(bytes done)` or `Err(errno)`.
///
/// The queue turns every answer into the result it commits to the kernel in
/// one place, by one rule, so that no answer can make the kernel loop or
/// misreport a request:
///
/// * a READ or WRITE answered `Ok(n)` with `n == req.len()` completes;
/// * `Ok(n)` with `n < req.len()` (a short or zero transfer) fails the
///   request with `EIO`: older kernels (6.1–6.12) requeue a WRITE committed
///   with 0 bytes forever, and kernels disagree on partial results, so
///   nothing short is ever committed. A target that reads or writes a file
///   finishes short transfers itself (an async target simply issues the
///   rest, see [`crate::aio`]);
/// * `Ok(n)` with `n > req.len()` is a bug in the target: `EIO`;
/// * FLUSH, DISCARD and WRITE_ZEROES answered `Ok(_)` complete (the count is
///   not used);
/// * `Err(e)` with `e` in `1..=4095` fails the request with that errno (the
///   block layer maps it to a status, e.g. `ENOSPC`, `EOPNOTSUPP`, else
///   `EIO`); any other value is a bug in the target and fails the request
///   with `EIO`.
///
/// Answers the rule had to correct are counted in
/// [`QueueStats::invalid`](crate::QueueStats::invalid).
pub type IoResult = Result<u32, Errno>;

/// Largest errno the kernel knows (`MAX_ERRNO`).
const MAX_ERRNO: i32 = 4095;

/// The one rule that turns a target's answer into the committed result (see
/// [`IoResult`]): bytes (>= 0) or -errno, and whether the answer broke the
/// rule.
pub(crate) fn settle(req: &Request, answer: IoResult) -> (i32, bool) {
    let len = req.len() as u64;
    match answer {
        Err(e) if (1..=MAX_ERRNO).contains(&e.raw()) => (-e.raw(), false),
        Err(_) => (-libc::EIO, true),
        Ok(_) if !matches!(req.op, Op::Read | Op::Write) => (0, false),
        // len <= max_io_buf_bytes < i32::MAX
        Ok(n) if u64::from(n) == len => (n as i32, false),
        Ok(n) if u64::from(n) > len => (-libc::EIO, true),
        Ok(_) => (-libc::EIO, false),
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
    pub fn attrs(self) -> crate::Attrs {
        use crate::Attrs;
        match self {
            WriteCache::None => Attrs::empty(),
            WriteCache::Volatile => Attrs::VOLATILE_CACHE,
            WriteCache::VolatileFua => Attrs::VOLATILE_CACHE | Attrs::FUA,
        }
    }
}

/// A block device's behaviour: answers one request at a time.
///
/// Called on the queue's own thread; `buf` is that tag's buffer, exactly
/// `req.len()` bytes for reads and writes and empty for the other ops. For a
/// read, fill it; for a write, consume it. Return the bytes done (`len` for a
/// full transfer) or `Err(errno)` (e.g. `Err(Errno::EIO)`), which the block
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

/// [`NullTarget`] as an [async target](crate::aio): each request is a future
/// that resolves at once. For measuring the executor's own cost against the
/// sync path.
#[derive(Debug, Default, Clone, Copy)]
pub struct AsyncNullTarget;

impl crate::aio::AsyncTarget for AsyncNullTarget {
    type Queue<'a> = AsyncNullTarget;

    fn queue(&self, _q: &crate::aio::QueueContext) -> std::io::Result<AsyncNullTarget> {
        Ok(AsyncNullTarget)
    }

    fn needs_data(&self) -> bool {
        false
    }
}

impl crate::aio::QueueTarget for AsyncNullTarget {
    async fn handle(&self, io: crate::aio::Io<'_>) -> IoResult {
        Ok(io.request().len() as u32)
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
        assert_eq!(settle(&w, Ok(4096)), (4096, false));
        assert_eq!(settle(&w, Err(Errno::ENOSPC)), (-libc::ENOSPC, false));
        assert_eq!(settle(&req(Op::Flush, 0), Ok(0)), (0, false));
        assert_eq!(settle(&req(Op::Discard, 8), Ok(12345)), (0, false));
    }

    #[test]
    fn zero_short_and_oversized_answers_never_commit_short() {
        let w = req(Op::Write, 8);
        // A 0-byte WRITE commit loops forever on 6.1-6.12.
        assert_eq!(settle(&w, Ok(0)), (-libc::EIO, false));
        assert_eq!(settle(&w, Ok(2048)), (-libc::EIO, false));
        assert_eq!(settle(&req(Op::Read, 8), Ok(100)), (-libc::EIO, false));
        // Would wrap negative as an i32.
        assert_eq!(settle(&w, Ok(u32::MAX)), (-libc::EIO, true));
        assert_eq!(settle(&w, Ok(4097)), (-libc::EIO, true));
    }

    #[test]
    fn errnos_outside_the_kernels_range_are_eio() {
        let r = req(Op::Read, 8);
        assert_eq!(settle(&r, Err(Errno::new(0))), (-libc::EIO, true));
        assert_eq!(settle(&r, Err(Errno::new(-5))), (-libc::EIO, true));
        assert_eq!(settle(&r, Err(Errno::new(4096))), (-libc::EIO, true));
        assert_eq!(settle(&r, Err(Errno::new(4095))), (-4095, false));
    }
}

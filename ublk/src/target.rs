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
}

/// Reads return the requested length (with whatever the buffer holds: zeros
/// unless a write left data there), writes are discarded, every other
/// supported op succeeds.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullTarget;

impl Target for NullTarget {
    #[inline]
    fn handle(&self, req: &Request, _buf: &mut [u8]) -> IoResult {
        Ok(req.len() as u32)
    }
}

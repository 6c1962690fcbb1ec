//! Buffers registered in the queue ring's buffer table, for operations that
//! name them by index ([`Ring::read_fixed`], `IORING_OP_READ_FIXED`).
//!
//! The kernel pins a registered buffer's pages once, at registration, and
//! a read into it fills them through a `bio_vec` iterator with its own
//! `memcpy`: no user access on each call (`copy_to_user`). How much that
//! saves depends on the copy routines: on a CPU with ERMS but not FSRM
//! (QEMU's `-cpu max`) `copy_to_user` is `rep movsb`, while 7.3's `memcpy`
//! is a loop of 8-byte moves (6.1's is `rep movsb` too). Under TCG's
//! `-icount`, which counts each byte of a `rep movsb` as an instruction,
//! the NBD target's server spends 18-27% less CPU time per 4 KiB read
//! (docs/performance.md); on real hardware `rep movsb` is fast and the
//! difference is smaller.
//!
//! The queue's table holds [`TARGET_SLOTS`] slots for targets, after the
//! ones zero copy uses (the requests' pages at `tag` and `depth + tag`).

use std::cell::{Cell, RefCell};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::rc::Rc;

use io_uring::opcode;

use super::ops::{on_file, FileRef, Op, Ring};
use super::reactor::DataUse;
use crate::errno::Errno;

/// Slots of the queue ring's buffer table that targets may register
/// buffers in ([`Ring::fixed_buf`]).
pub const TARGET_SLOTS: u32 = 4;

/// The kernel's limit on one registered buffer (`SZ_1G`).
const MAX_LEN: usize = 1 << 30;

/// The targets' part of a queue ring's buffer table: slots
/// `base..base + TARGET_SLOTS`, which of them a [`FixedBuf`] holds, and the
/// memory of the ones given back, still registered.
pub(crate) struct FixedTable {
    base: u32,
    used: Cell<u32>,
    /// A dropped FixedBuf's bytes, kept (io-uring's contract for a
    /// registration: its memory stays valid until it is unregistered or
    /// the ring closes) until its slot is registered again, or the table
    /// goes: the reactor drops its ring before its table.
    retired: RefCell<[Option<Box<[u8]>>; TARGET_SLOTS as usize]>,
}

impl FixedTable {
    /// The table registered with the ring, its targets' slots from `base`.
    pub(crate) fn new(base: u32) -> Rc<FixedTable> {
        Rc::new(FixedTable { base, used: Cell::new(0), retired: RefCell::new(Default::default()) })
    }
}

impl fmt::Debug for FixedTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FixedTable").field("base", &self.base).field("used", &self.used.get()).finish()
    }
}

/// A buffer registered in its queue ring's buffer table, from
/// [`Ring::fixed_buf`]. Operations take it by value and hand it back, like
/// any [`IoBuf`](super::IoBuf); in between it reads and writes as a `[u8]`.
///
/// It belongs to one queue's ring: [`Ring::read_fixed`] on another panics
/// (it is neither `Send` nor `Sync`, so only a ring of the same thread
/// could be given it). Dropped, it gives its slot back; its memory stays
/// registered (its pages pinned, counted against `RLIMIT_MEMLOCK`) until
/// the slot is registered again or the ring closes.
pub struct FixedBuf {
    /// `None` only while being dropped.
    buf: Option<Box<[u8]>>,
    /// Slot in the table's targets' part.
    slot: u32,
    table: Rc<FixedTable>,
}

impl FixedBuf {
    fn bytes(&self) -> &[u8] {
        self.buf.as_deref().expect("a live FixedBuf has its bytes")
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.buf.as_deref_mut().expect("a live FixedBuf has its bytes")
    }
}

impl fmt::Debug for FixedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FixedBuf").field("index", &(self.table.base + self.slot)).field("len", &self.len()).finish()
    }
}

impl Deref for FixedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes()
    }
}

impl DerefMut for FixedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.bytes_mut()
    }
}

impl Drop for FixedBuf {
    fn drop(&mut self) {
        let t = &self.table;
        // (A retired buffer of this slot was replaced when it was
        // registered, and freed then.)
        t.retired.borrow_mut()[self.slot as usize] = self.buf.take();
        t.used.set(t.used.get() & !(1 << self.slot));
    }
}

impl<'r> Ring<'r> {
    /// A zeroed buffer of `len` bytes registered in the queue ring's buffer
    /// table, for [`Ring::read_fixed`].
    ///
    /// Errors: `EINVAL` for a length of 0 or over 1 GiB; `ENOBUFS` when the
    /// queue's [`TARGET_SLOTS`] slots are all held; `EOPNOTSUPP` when the
    /// queue's ring has no buffer table (the kernel refused a sparse one);
    /// what the kernel answers the registration (`ENOMEM`: over
    /// `RLIMIT_MEMLOCK` without `CAP_IPC_LOCK`). The caller can always fall
    /// back on an unregistered buffer and [`Ring::recv`] or [`Ring::read`].
    pub fn fixed_buf(&self, len: usize) -> Result<FixedBuf, Errno> {
        if len == 0 || len > MAX_LEN {
            return Err(Errno::EINVAL);
        }
        let Some(table) = &self.r.fixed else { return Err(Errno::EOPNOTSUPP) };
        let used = table.used.get();
        let Some(slot) = (0..TARGET_SLOTS).find(|i| used & (1 << i) == 0) else { return Err(Errno::ENOBUFS) };
        let index = table.base + slot;
        let mut buf = vec![0u8; len].into_boxed_slice();
        let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: len };
        // SAFETY: io-uring asks that the memory stay valid until it is
        // unregistered or the ring closes. The bytes are on the heap and
        // stay put while the FixedBuf that owns them moves; dropped, it
        // leaves them in the table's `retired` until this slot is registered
        // again (below, after which the kernel holds the new buffer) or
        // the table goes, after the ring. The slot is free (its bit in
        // `used`), so no FixedBuf and no operation holds it: an operation
        // that names it owns its FixedBuf, and the bit with it, until its
        // completion. No other part of the queue uses these indexes (zero
        // copy stays below `base`; `Ring::raw` may not change registered
        // buffers). No tag is given: the kernel posts no completion for
        // the replaced buffer's removal.
        let r = unsafe { self.r.ring.borrow().submitter().register_buffers_update(index, &[iov], None) };
        r.map_err(Errno::from)?;
        // The kernel let go of the slot's old buffer, if any.
        table.retired.borrow_mut()[slot as usize] = None;
        table.used.set(used | 1 << slot);
        Ok(FixedBuf { buf: Some(buf), slot, table: table.clone() })
    }

    /// Reads from `file` at `offset` into `buf[at..at + len]` (`len` cut to
    /// what the buffer holds past `at`), `IORING_OP_READ_FIXED`. A socket
    /// has no position (give 0): the read takes what has arrived, as `recv`
    /// does, but it follows the socket's `O_NONBLOCK` (`EAGAIN` when
    /// nothing has), where io_uring's `recv` waits.
    ///
    /// # Panics
    /// If `buf` was registered with another queue's ring, or `at` is past
    /// its end.
    pub fn read_fixed<'f>(&self, file: impl Into<FileRef<'f>>, mut buf: FixedBuf, at: usize, len: usize, offset: u64) -> Op<'r, FixedBuf> {
        assert!(
            self.r.fixed.as_ref().is_some_and(|t| Rc::ptr_eq(t, &buf.table)),
            "Ring::read_fixed: the FixedBuf was registered with another queue's ring"
        );
        assert!(at <= buf.len(), "Ring::read_fixed: offset {at} past the buffer's {} bytes", buf.len());
        let n = len.min(buf.len() - at).min(u32::MAX as usize) as u32;
        // SAFETY: `at` is inside the buffer (checked), and `n` bytes fit.
        let p = unsafe { buf.bytes_mut().as_mut_ptr().add(at) };
        let index = u16::try_from(buf.table.base + buf.slot).expect("the buffer table has at most 2 * 4096 + TARGET_SLOTS slots");
        let file = file.into();
        // SAFETY: the buffer, registered at `index` of this ring's table
        // (the same table: checked above; the slot is the FixedBuf's while
        // it lives), is owned by the Op until the operation is over; the
        // range read into is inside it (the kernel refuses one that is not
        // with EFAULT).
        unsafe {
            Op::start(self.r, self.tag, DataUse::None, Some(file), buf, |_| {
                on_file!(file, |fd| opcode::ReadFixed::new(fd, p, n, index).offset(offset).build())
            })
        }
    }
}

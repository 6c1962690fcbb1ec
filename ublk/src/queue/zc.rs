//! Zero copy: how a zero-copy queue gets each request's pages into its
//! ring ([`ZeroCopy`]), the fixed-buffer index the target's operations
//! use, and the queue's own registration of a request's pages
//! (`UBLK_U_IO_REGISTER_IO_BUF`) where the kernel does not register them.

use ublk_sys as sys;

use super::ring::buf_reg_sqe;
use super::{Queue, BUF_REG};
use crate::ctrl::DevInfo;
use crate::error::{Error, Result};
use crate::target::{Op, Request};

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

impl Queue {
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
}

//! A request as the queue reads it: the tag's descriptor, read once
//! (volatile) from the read-only mapping of `/dev/ublkcN`'s descriptors,
//! decoded into a [`Request`] and counted; the tag's buffer; and the
//! copies of the request's data under `UBLK_F_USER_COPY` (whole: a short
//! count carries on from where it stopped).

use std::os::fd::AsFd;

use ublk_sys as sys;

use super::Queue;
use crate::target::{Op, Request};
use crate::transfer::{transfer, Dir};

/// Where request `tag` of queue `q_id` is in `/dev/ublkcN` under
/// `UBLK_F_USER_COPY`: `pread` there reads a WRITE's data, `pwrite` there
/// gives a READ's (`UBLKSRV_IO_BUF_OFFSET + (q_id << UBLK_QID_OFF | tag <<
/// UBLK_TAG_OFF)`, plus the byte offset within the request).
pub fn user_copy_offset(q_id: u16, tag: u16) -> u64 {
    u64::from(sys::UBLKSRV_IO_BUF_OFFSET) + ((u64::from(q_id) << sys::abi::UBLK_QID_OFF) | (u64::from(tag) << sys::abi::UBLK_TAG_OFF))
}

impl Queue {
    /// The tag's buffer address for FETCH/COMMIT: 0 under USER_COPY, where
    /// the kernel refuses any other value.
    pub(super) fn buf_addr(&self, tag: u16) -> u64 {
        match &self.bufs {
            Some(b) if !self.user_copy => b.addr(tag),
            _ => 0,
        }
    }

    /// Reads the tag's descriptor and counts the request. Answers itself
    /// (and returns `None`) for what no target gets: an unsupported op, a
    /// request larger than the buffers, a WRITE whose data could not be
    /// copied in under USER_COPY.
    pub(super) fn decode(&mut self, tag: u16) -> Option<Request> {
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
    pub(super) fn buf_raw(&self, tag: u16) -> (*mut u8, usize) {
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
        unsafe { transfer(fd.as_fd(), b.addr(req.tag) as *mut u8, req.len(), user_copy_offset(self.q_id, req.tag), Dir::FromFd) }.is_ok()
    }

    /// Under USER_COPY with buffers: gives a READ's answer (`result` bytes)
    /// from the tag's buffer to `/dev/ublkcN`. The result to commit.
    pub(super) fn copy_out(&mut self, tag: u16, result: i32) -> i32 {
        let (Some(fd), Some(b)) = (&self.char_dup, &self.bufs) else { return result };
        if result <= 0 || self.reqs[usize::from(tag)].op != Op::Read {
            return result;
        }
        // SAFETY: reads `result` (<= the request's length, settled) bytes of
        // the tag's buffer, which no operation uses any more.
        match unsafe { transfer(fd.as_fd(), b.addr(tag) as *mut u8, result as usize, user_copy_offset(self.q_id, tag), Dir::ToFd) } {
            Ok(()) => result,
            Err(_) => -libc::EIO,
        }
    }
}

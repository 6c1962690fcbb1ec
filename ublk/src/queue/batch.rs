//! `UBLK_F_BATCH_IO` (7.0+): a queue's commands in batches.
//!
//! Instead of one FETCH_REQ / COMMIT_AND_FETCH_REQ per tag, a batch queue
//! sends one `PREP_IO_CMDS` naming every tag, keeps one multishot
//! `FETCH_IO_CMDS` armed, whose completions each carry up to 128 tags (u16s
//! written into a provided buffer of the ring), and commits every answer of
//! a turn of the loop with one `COMMIT_IO_CMDS`. The rules are the driver's,
//! collected in `docs/batch-io.md`.
//!
//! Memory the kernel touches: the provided-buffer ring and its buffers (the
//! kernel writes tags there until the fetch ends) and each PREP/COMMIT's
//! element array (read when the command is issued, kept until its
//! completion).
//!
//! [`Batch`] holds that memory and builds the commands; the queue's side
//! (PREP and fetch, the fetch's completions, the turn's commit, the end of
//! it all before the queue's memory goes) is the `impl Queue` below.

use super::token::Token;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types};

use super::{ring, Queue, ZeroCopy, CANCEL, WAKE};
use crate::buffers::{page_size, round_up, Mapping};
use crate::error::{Error, Result};

/// user_data of the multishot fetch.
pub(crate) const BATCH_FETCH: u64 = 1 << 36;
/// user_data bit of a PREP or COMMIT (low 16 bits: its element buffer).
pub(crate) const BATCH_CMD: u64 = 1 << 37;

/// Buffer group of the fetch's provided buffers.
const BGID: u16 = 0;
/// Provided buffers (a power of two): a fetch that finds none left ends
/// with -ENOBUFS and is armed again once they are back.
const NR_FETCH_BUFS: u16 = 32;
/// Bytes per provided buffer: the driver puts at most 128 tags (u16) in one
/// completion.
const FETCH_BUF_LEN: usize = 256;

/// `IOSQE_BUFFER_SELECT`.
const IOSQE_BUFFER_SELECT: u8 = 1 << 5;
/// `IORING_URING_CMD_MULTISHOT` (6.18): in `sqe->uring_cmd_flags`.
const IORING_URING_CMD_MULTISHOT: u32 = 1 << 1;
/// `IORING_CQE_F_BUFFER`, `IORING_CQE_F_MORE`, `IORING_CQE_BUFFER_SHIFT`.
const CQE_F_BUFFER: u32 = 1;
const CQE_F_MORE: u32 = 2;
const CQE_BUFFER_SHIFT: u32 = 16;

use ublk_sys::abi::{
    UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK as AUTO_BUF_REG_FALLBACK, UBLK_BATCH_F_HAS_BUF_ADDR as HAS_BUF_ADDR,
    UBLK_U_IO_COMMIT_IO_CMDS as COMMIT_IO_CMDS, UBLK_U_IO_FETCH_IO_CMDS as FETCH_IO_CMDS, UBLK_U_IO_PREP_IO_CMDS as PREP_IO_CMDS,
};

/// The 16 bytes of `struct ublk_batch_io` (SQE bytes 48..64).
fn batch_io(q_id: u16, flags: u16, nr_elem: u16, elem_bytes: u8) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..2].copy_from_slice(&q_id.to_ne_bytes());
    b[2..4].copy_from_slice(&flags.to_ne_bytes());
    b[4..6].copy_from_slice(&nr_elem.to_ne_bytes());
    b[6] = elem_bytes;
    b
}

/// Sets on an SQE what the io-uring crate's `UringCmd16` builder does not
/// expose: `IOSQE_BUFFER_SELECT` (byte 1), `IORING_URING_CMD_MULTISHOT` in
/// `uring_cmd_flags` (bytes 28..32) and the buffer group (bytes 40..42).
/// The one place the library writes raw SQE bytes; the offsets are those
/// of `struct io_uring_sqe` (checked by `multishot_fields_land_where_the_kernel_reads_them`).
pub(crate) fn multishot_buffer_select(sqe: squeue::Entry, buf_group: u16) -> squeue::Entry {
    const _: () = assert!(std::mem::size_of::<squeue::Entry>() == 64);
    // SAFETY: squeue::Entry is a #[repr(C)] wrapper of the kernel's 64-byte
    // `struct io_uring_sqe`, made only of integers (and unions of them):
    // every byte pattern is a valid value, both ways.
    let mut b: [u8; 64] = unsafe { std::mem::transmute(sqe) };
    b[1] |= IOSQE_BUFFER_SELECT;
    let f = u32::from_ne_bytes(b[28..32].try_into().unwrap()) | IORING_URING_CMD_MULTISHOT;
    b[28..32].copy_from_slice(&f.to_ne_bytes());
    b[40..42].copy_from_slice(&buf_group.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(b) }
}

/// Whether a fetch completion says more will follow (`IORING_CQE_F_MORE`).
pub(crate) fn more(cqe_flags: u32) -> bool {
    cqe_flags & CQE_F_MORE != 0
}

/// What a fetch completion brought.
pub(crate) enum Fetched {
    /// Tags, now in [`Batch::tags`]; `rearm` if the fetch ended (it ran out
    /// of buffers) and must be sent again.
    Tags { rearm: bool },
    /// The fetch ended with -ENODEV: the device is stopping.
    Stopped,
    /// It failed with this result.
    Failed(i32),
}

/// A queue's batch state.
pub(crate) struct Batch {
    q_id: u16,
    depth: u16,
    /// `UBLK_BATCH_F_*` of PREP and COMMIT.
    flags: u16,
    elem_bytes: u8,
    /// The provided-buffer ring (one page; the kernel pins it while the
    /// group is registered) and its buffers.
    ring: Mapping,
    bufs: Mapping,
    tail: u16,
    /// Element arrays of PREP/COMMIT commands, each room for `depth`
    /// elements; in flight until their completion.
    cmd_bufs: Vec<Box<[u8]>>,
    /// Per element array in flight: a COMMIT's element count (`None`: a PREP).
    sent: Vec<Option<u16>>,
    free: Vec<u16>,
    /// The array being filled with this turn's commits, and how many.
    filling: Option<(u16, u16)>,
    /// Tags of the last fetch completion (reused: no allocation).
    pub(crate) tags: Vec<u16>,
    /// The multishot fetch is armed (its completions may still come, and
    /// write into the provided buffers).
    pub(crate) fetch_armed: bool,
}

impl Batch {
    /// Allocates the provided buffers and registers them with `submitter`'s
    /// ring as buffer group 0. `copy`: the device copies data through
    /// per-tag buffers (elements carry their address). `auto_buf_reg`: the
    /// kernel registers each request's pages at the element's `buf_index`;
    /// one it cannot register it then delivers with
    /// `UBLK_IO_F_NEED_REG_BUF` instead of failing it (the batch's
    /// `UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK`, which batch elements, having
    /// no flags of their own, cannot say).
    pub(crate) fn new(submitter: &io_uring::Submitter<'_>, q_id: u16, depth: u16, copy: bool, auto_buf_reg: bool) -> Result<Batch> {
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        let ring_len = round_up(usize::from(NR_FETCH_BUFS) * 16, page_size());
        let ring = Mapping::new(ring_len, rw, anon, -1, 0, "allocating the batch fetch's buffer ring")?;
        let bufs = Mapping::new(usize::from(NR_FETCH_BUFS) * FETCH_BUF_LEN, rw, anon, -1, 0, "allocating the batch fetch's buffers")?;
        // SAFETY: the ring mapping lives in this Batch, which the queue keeps
        // until its io_uring is closed (or leaks with it, see Queue's Drop).
        unsafe { submitter.register_buf_ring_with_flags(ring.ptr() as u64, NR_FETCH_BUFS, BGID, 0) }
            .map_err(|e| Error::os("registering the batch fetch's buffer ring (IORING_REGISTER_PBUF_RING)", e))?;
        let (mut flags, elem_bytes) = if copy { (HAS_BUF_ADDR, 16) } else { (0, 8) };
        if auto_buf_reg {
            flags |= AUTO_BUF_REG_FALLBACK;
        }
        let mut b = Batch {
            q_id,
            depth,
            flags,
            elem_bytes,
            ring,
            bufs,
            tail: 0,
            cmd_bufs: Vec::new(),
            sent: Vec::new(),
            free: Vec::new(),
            filling: None,
            tags: Vec::with_capacity(usize::from(depth)),
            fetch_armed: false,
        };
        for bid in 0..NR_FETCH_BUFS {
            b.give_back(bid);
        }
        Ok(b)
    }

    /// Puts provided buffer `bid` back in the ring.
    fn give_back(&mut self, bid: u16) {
        let i = usize::from(self.tail & (NR_FETCH_BUFS - 1));
        let addr = self.bufs.ptr() as u64 + (usize::from(bid) * FETCH_BUF_LEN) as u64;
        // SAFETY: entry `i` of the ring (16 bytes each, inside the mapping):
        // `addr` at 0, `len` at 8, `bid` at 12. Its bytes 14..16 are the
        // ring's tail when i == 0, so they are left alone. The kernel reads
        // entries only below the tail, which is published after.
        unsafe {
            let e = self.ring.ptr().add(i * 16);
            std::ptr::write_volatile(e as *mut u64, addr);
            std::ptr::write_volatile(e.add(8) as *mut u32, FETCH_BUF_LEN as u32);
            std::ptr::write_volatile(e.add(12) as *mut u16, bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail is the u16 at byte 14 of the (page-aligned) ring,
        // read by the kernel concurrently: an atomic store, after the entry.
        let tail = unsafe { &*(self.ring.ptr().add(14) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }

    /// A free element array (a new one if all are in flight: rare, and the
    /// pool then keeps it).
    fn take_buf(&mut self) -> u16 {
        if let Some(i) = self.free.pop() {
            return i;
        }
        self.cmd_bufs.push(vec![0u8; usize::from(self.depth) * usize::from(self.elem_bytes)].into_boxed_slice());
        self.sent.push(None);
        (self.cmd_bufs.len() - 1) as u16
    }

    fn put_elem(&mut self, buf: u16, n: u16, tag: u16, buf_index: u16, result: i32, buf_addr: u64) {
        let eb = usize::from(self.elem_bytes);
        let e = &mut self.cmd_bufs[usize::from(buf)][usize::from(n) * eb..][..eb];
        e[0..2].copy_from_slice(&tag.to_ne_bytes());
        e[2..4].copy_from_slice(&buf_index.to_ne_bytes());
        e[4..8].copy_from_slice(&result.to_ne_bytes());
        if eb == 16 {
            e[8..16].copy_from_slice(&buf_addr.to_ne_bytes());
        }
    }

    fn cmd_sqe(&mut self, op: u32, buf: u16, n: u16) -> squeue::Entry {
        self.sent[usize::from(buf)] = (op == COMMIT_IO_CMDS).then_some(n);
        let addr = self.cmd_bufs[usize::from(buf)].as_ptr() as u64;
        opcode::UringCmd16::new(types::Fixed(0), op)
            .cmd(batch_io(self.q_id, self.flags, n, self.elem_bytes))
            .addr(Some(addr))
            .build()
            .user_data(BATCH_CMD | u64::from(buf))
    }

    /// PREP_IO_CMDS for every tag: `buf_addr(tag)` is the tag's buffer in
    /// copy mode; `buf_index(tag)` the auto-registration index.
    pub(crate) fn prep_sqe(&mut self, buf_addr: impl Fn(u16) -> u64, buf_index: impl Fn(u16) -> u16) -> squeue::Entry {
        let b = self.take_buf();
        for tag in 0..self.depth {
            self.put_elem(b, tag, tag, buf_index(tag), 0, buf_addr(tag));
        }
        self.cmd_sqe(PREP_IO_CMDS, b, self.depth)
    }

    /// The multishot FETCH_IO_CMDS.
    pub(crate) fn fetch_sqe(&self) -> squeue::Entry {
        let sqe = opcode::UringCmd16::new(types::Fixed(0), FETCH_IO_CMDS)
            .cmd(batch_io(self.q_id, 0, self.depth, 2))
            .build()
            .user_data(BATCH_FETCH);
        multishot_buffer_select(sqe, BGID)
    }

    /// Adds a commit to this turn's COMMIT_IO_CMDS.
    pub(crate) fn commit(&mut self, tag: u16, buf_index: u16, result: i32, buf_addr: u64) {
        let (b, n) = match self.filling {
            Some(f) => f,
            None => (self.take_buf(), 0),
        };
        self.put_elem(b, n, tag, buf_index, result, buf_addr);
        self.filling = Some((b, n + 1));
    }

    /// This turn's COMMIT_IO_CMDS, if anything was committed.
    pub(crate) fn flush(&mut self) -> Option<squeue::Entry> {
        let (b, n) = self.filling.take()?;
        Some(self.cmd_sqe(COMMIT_IO_CMDS, b, n))
    }

    /// A PREP or COMMIT completed: its element array is free again.
    /// Returns which it was (`true`: a COMMIT) and, if the driver did not
    /// take every element, the error: PREP answers 0 or -errno, COMMIT the
    /// bytes of elements it took or -errno (a partial count leaves the
    /// rest uncommitted, which the queue cannot repair: -EIO).
    pub(crate) fn cmd_done(&mut self, buf: u16, res: i32) -> (bool, std::result::Result<(), i32>) {
        let sent = self.sent[usize::from(buf)];
        self.free.push(buf);
        let r = match sent {
            _ if res < 0 => Err(res),
            Some(n) if res as usize != usize::from(n) * usize::from(self.elem_bytes) => Err(-libc::EIO),
            _ => Ok(()),
        };
        (sent.is_some(), r)
    }

    /// A completion of the fetch: reads its tags into [`Batch::tags`] and
    /// gives the buffer back.
    pub(crate) fn fetched(&mut self, res: i32, flags: u32) -> Fetched {
        self.tags.clear();
        let more = flags & CQE_F_MORE != 0;
        if res < 0 {
            let r = match -res {
                libc::ENOBUFS => Fetched::Tags { rearm: true },
                libc::ENODEV => Fetched::Stopped,
                _ => Fetched::Failed(res),
            };
            // Still armed if it goes on, or the caller arms it again.
            self.fetch_armed = more || matches!(r, Fetched::Tags { .. });
            return r;
        }
        if flags & CQE_F_BUFFER != 0 {
            let bid = (flags >> CQE_BUFFER_SHIFT) as u16;
            let n = (res as usize / 2).min(FETCH_BUF_LEN / 2);
            let base = self.bufs.ptr() as usize + usize::from(bid % NR_FETCH_BUFS) * FETCH_BUF_LEN;
            for i in 0..n {
                // SAFETY: inside provided buffer `bid` (n <= its u16 count),
                // which the kernel filled before posting this completion and
                // does not touch again until it is given back (below).
                let tag = unsafe { std::ptr::read_volatile((base + 2 * i) as *const u16) };
                if tag < self.depth {
                    self.tags.push(tag);
                }
            }
            self.give_back(bid % NR_FETCH_BUFS);
        }
        // Armed: it goes on, or the caller arms it again.
        self.fetch_armed = true;
        Fetched::Tags { rearm: !more }
    }

    /// PREP/COMMIT commands whose completion has not come.
    pub(crate) fn cmds_in_flight(&self) -> usize {
        self.cmd_bufs.len() - self.free.len() - usize::from(self.filling.is_some())
    }
}

impl Queue {
    /// Under BATCH_IO, queues this turn's commits as one COMMIT_IO_CMDS.
    /// Called before anything is submitted.
    pub(super) fn flush_batch(&mut self) {
        if let Some(sqe) = self.batch.as_mut().and_then(Batch::flush) {
            self.reactor.push(&sqe);
        }
    }

    /// A completion of the batch fetch: the tags it delivered (the batch's
    /// own vector, to hand back with [`Queue::batch_tags_done`]). Arms the
    /// fetch again if it ended for lack of buffers.
    pub(super) fn batch_fetched(&mut self, res: i32, flags: u32) -> Result<Vec<u16>> {
        let b = self.batch.as_mut().expect("a batch queue");
        match b.fetched(res, flags) {
            Fetched::Tags { rearm } => {
                if rearm {
                    let sqe = b.fetch_sqe();
                    self.reactor.push(&sqe);
                }
                Ok(std::mem::take(&mut b.tags))
            }
            Fetched::Stopped => {
                // The device stops: nothing more comes; what the queue holds
                // is committed by `drain`.
                self.live_tags = 0;
                Ok(Vec::new())
            }
            Fetched::Failed(res) => Err(self.io_error(ring::FETCH_IO_CMDS, 0, res)),
        }
    }

    pub(super) fn batch_tags_done(&mut self, tags: Vec<u16>) {
        if let Some(b) = &mut self.batch {
            if tags.capacity() > 0 {
                b.tags = tags;
            }
        }
    }

    /// A PREP_IO_CMDS or COMMIT_IO_CMDS completed. A refusal is the queue's
    /// end, except once the device is stopping (the driver then refuses
    /// commits, and nothing waits for them).
    pub(super) fn batch_cmd_done(&mut self, buf: u16, res: i32) -> Result<()> {
        let b = self.batch.as_mut().expect("a batch queue");
        let (commit, r) = b.cmd_done(buf, res);
        match r {
            Err(e) if !self.woken && self.live_tags > 0 => {
                Err(self.io_error(if commit { ring::COMMIT_IO_CMDS } else { ring::PREP_IO_CMDS }, 0, e))
            }
            _ => Ok(()),
        }
    }

    /// [`Queue::fetch_all`] under BATCH_IO: one PREP_IO_CMDS naming every
    /// tag (with its buffer in copy mode, its registration index under
    /// AUTO_BUF_REG), then the multishot FETCH_IO_CMDS, submitted together
    /// (the ring issues them in order).
    pub(super) fn prep_and_fetch(&mut self) -> Result<()> {
        let addrs: Vec<u64> = (0..self.depth).map(|t| self.buf_addr(t)).collect();
        let auto = self.zc == ZeroCopy::Auto;
        let b = self.batch.as_mut().expect("a batch queue");
        let prep = b.prep_sqe(|t| addrs[usize::from(t)], |t| if auto { t } else { 0 });
        let fetch = b.fetch_sqe();
        b.fetch_armed = true;
        self.push(&prep);
        self.push(&fetch);
        if let Some(fd) = self.wake {
            let poll = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build().user_data(WAKE);
            self.push(&poll);
        }
        self.arm_notify();
        self.submit().map_err(|e| Error::os("submitting PREP_IO_CMDS and FETCH_IO_CMDS", e))?;
        self.live_tags = self.depth;
        // Nothing is delivered before START_DEV; a completion here is a
        // refusal, or PREP's success.
        while let Some(cqe) = self.next_cqe() {
            match Token::decode(cqe.user_data()) {
                Token::Wake => self.woken = true,
                Token::Notify => self.arm_notify(),
                Token::BatchCmd(buf) => {
                    let (_, r) = self.batch.as_mut().expect("a batch queue").cmd_done(buf, cqe.result());
                    if let Err(e) = r {
                        return Err(self.io_error(ring::PREP_IO_CMDS, 0, e));
                    }
                }
                Token::BatchFetch if cqe.result() < 0 => return Err(self.io_error(ring::FETCH_IO_CMDS, 0, cqe.result())),
                // Nothing is delivered before START_DEV, and no request
                // (nor any of its operations) exists yet.
                Token::BatchFetch
                | Token::Tag(_)
                | Token::AsyncOp(_)
                | Token::BufReg(_)
                | Token::BufUnreg
                | Token::Cancel
                | Token::OpCancel
                | Token::Unknown(_) => {}
            }
        }
        Ok(())
    }

    /// Under BATCH_IO, before the queue's memory goes: cancels the multishot
    /// fetch (the one writer of the provided buffers) and reaps it and the
    /// PREP/COMMIT commands in flight (whose element arrays the kernel may
    /// still read). Whether all of it ended within a second.
    pub(super) fn end_batch(&mut self) -> bool {
        let t0 = Instant::now();
        let mut cancelled = false;
        loop {
            let Some(b) = &self.batch else { return true };
            if !b.fetch_armed && b.cmds_in_flight() == 0 {
                return true;
            }
            if t0.elapsed() > Duration::from_secs(1) {
                return false;
            }
            if b.fetch_armed && !cancelled {
                let cancel = opcode::AsyncCancel::new(BATCH_FETCH).build().user_data(CANCEL);
                self.push(&cancel);
                cancelled = true;
            }
            self.flush_batch();
            let ts = types::Timespec::new().nsec(50_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            if let Err(e) = self.reactor.ring.borrow_mut().submitter().submit_with_args(1, &args) {
                if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::ETIME) | Some(libc::EAGAIN) | Some(libc::EBUSY)) {
                    return false;
                }
            }
            while let Some(cqe) = self.next_cqe() {
                let Some(b) = self.batch.as_mut() else { return true };
                match Token::decode(cqe.user_data()) {
                    Token::BatchFetch => {
                        // Tags delivered now are not served: the device is
                        // going away, and the kernel fails what its server
                        // leaves when the ring closes.
                        let _ = b.fetched(cqe.result(), cqe.flags());
                        if !more(cqe.flags()) {
                            b.fetch_armed = false;
                        }
                    }
                    Token::BatchCmd(buf) => {
                        let _ = b.cmd_done(buf, cqe.result());
                    }
                    // After end_ops and the last commits: the wake-up, the
                    // notify poll and cancellations end here unheeded.
                    Token::Wake
                    | Token::Notify
                    | Token::Cancel
                    | Token::OpCancel
                    | Token::Tag(_)
                    | Token::AsyncOp(_)
                    | Token::BufReg(_)
                    | Token::BufUnreg
                    | Token::Unknown(_) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_opcodes_are_the_headers() {
        // _IOWR('u', 0x25..0x27, struct ublk_batch_io), as docs/abi.md lists.
        assert_eq!(PREP_IO_CMDS, 0xc010_7525);
        assert_eq!(COMMIT_IO_CMDS, 0xc010_7526);
        assert_eq!(FETCH_IO_CMDS, 0xc010_7527);
        // (ublk-sys's abi_table_matches_the_header checks them against the header.)
    }

    #[test]
    fn multishot_fields_land_where_the_kernel_reads_them() {
        let sqe = opcode::UringCmd16::new(types::Fixed(0), FETCH_IO_CMDS).cmd([7u8; 16]).build().user_data(0x1122_3344_5566_7788);
        let sqe = multishot_buffer_select(sqe, 0xabcd);
        // SAFETY: as in multishot_buffer_select.
        let b: [u8; 64] = unsafe { std::mem::transmute(sqe) };
        // struct io_uring_sqe: opcode 0, flags 1, fd 4, cmd_op 8, uring_cmd_flags 28,
        // user_data 32, buf_group 40, cmd 48.
        assert_eq!(b[0], 46, "IORING_OP_URING_CMD");
        assert_eq!(b[1], IOSQE_BUFFER_SELECT | 1, "BUFFER_SELECT and FIXED_FILE");
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), FETCH_IO_CMDS);
        assert_eq!(u32::from_ne_bytes(b[28..32].try_into().unwrap()), IORING_URING_CMD_MULTISHOT);
        assert_eq!(u64::from_ne_bytes(b[32..40].try_into().unwrap()), 0x1122_3344_5566_7788);
        assert_eq!(u16::from_ne_bytes(b[40..42].try_into().unwrap()), 0xabcd);
        assert_eq!(&b[48..64], &[7u8; 16]);
    }
}

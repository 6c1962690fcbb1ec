//! The replies' reader: replies received in bulk into a receive buffer,
//! taken apart there (simple replies, and structured reply chunks: data,
//! holes, errors) and handed to their requests, a long READ payload
//! received by its request straight into its data.

use std::future::poll_fn;
use std::os::fd::AsFd;
use std::task::Poll;
use std::time::Duration;

use super::proto::{
    CHUNK_LEN, CMD_READ, REPLY_FLAG_DONE, REPLY_LEN, REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_BIT, REPLY_TYPE_ERROR_OFFSET, REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use super::tag::{St, Tag};
use super::NbdQueue;
use crate::aio::{FixedBuf, IoBuf, IoBufMut, Ring};
use crate::queue::user_copy_offset;
use crate::transfer::{transfer, Dir};

/// NBD's (and Linux's) EIO.
const EIO: u32 = 5;

/// The reader's receive buffer: replies are received in bulk, as much as
/// the connection holds (up to [`RECV_MAX`] a time), and taken apart here.
const RX_BUF: usize = 256 << 10;
/// The most one receive into the buffer takes: a dozen 4 KiB READ replies,
/// but not much of a long payload, which is better received in place.
const RECV_MAX: usize = 64 << 10;
/// A payload part at least this long is received by its request straight
/// into its data ([`St::Payload`]) rather than through the receive buffer
/// (a copy more).
pub(super) const DIRECT_MIN: usize = 32 << 10;
/// The longest error chunk taken: a message of at most 4096 bytes (the
/// protocol's limit) and the fixed fields, with room for error types this
/// client does not know; a longer one closes the connection.
const MAX_ERROR_CHUNK: u32 = 64 << 10;

/// The receive buffer's memory: registered in the queue ring's buffer
/// table where the kernel allows, and received into by `READ_FIXED` (the
/// kernel's `memcpy` into pinned pages; see `aio::fixed`), else a plain
/// one received into by `recv` (`copy_to_user`).
enum RxBuf {
    Fixed(FixedBuf),
    Plain(Box<[u8]>),
}

impl std::ops::Deref for RxBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            RxBuf::Fixed(b) => b,
            RxBuf::Plain(b) => b,
        }
    }
}

impl std::ops::DerefMut for RxBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            RxBuf::Fixed(b) => b,
            RxBuf::Plain(b) => b,
        }
    }
}

/// Received bytes not taken yet: `buf[start..end]`.
struct Rx {
    buf: RxBuf,
    start: usize,
    end: usize,
}

impl Rx {
    fn len(&self) -> usize {
        self.end - self.start
    }
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
    }
    fn be16(&self, at: usize) -> u16 {
        u16::from_be_bytes(self.buf[self.start + at..self.start + at + 2].try_into().expect("2 bytes"))
    }
    fn be32(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.buf[self.start + at..self.start + at + 4].try_into().expect("4 bytes"))
    }
    fn be64(&self, at: usize) -> u64 {
        u64::from_be_bytes(self.buf[self.start + at..self.start + at + 8].try_into().expect("8 bytes"))
    }
}

/// The free end of the receive buffer (`buf[at..]`, at most [`RECV_MAX`]
/// bytes of it), owned by a receive.
struct Tail {
    buf: Box<[u8]>,
    at: usize,
    /// The most to receive.
    max: usize,
}

// SAFETY: the bytes of a boxed slice are on the heap and stay put when the
// Box moves; `at <= buf.len()`, and `bytes_*` stay inside the slice.
unsafe impl IoBuf for Tail {
    fn stable_ptr(&self) -> *const u8 {
        self.buf[self.at..].as_ptr()
    }
    fn bytes_init(&self) -> usize {
        (self.buf.len() - self.at).min(self.max)
    }
}

// SAFETY: as above.
unsafe impl IoBufMut for Tail {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.buf[self.at..].as_mut_ptr()
    }
    fn bytes_total(&self) -> usize {
        (self.buf.len() - self.at).min(self.max)
    }
}

impl NbdQueue<'_> {
    /// Reads replies and hands each to its request, until the connection
    /// fails. Never completes.
    pub(super) async fn reader(&self, ring: Ring<'_>) {
        let buf = match ring.fixed_buf(RX_BUF) {
            Ok(b) => RxBuf::Fixed(b),
            Err(_) => RxBuf::Plain(vec![0u8; RX_BUF].into_boxed_slice()),
        };
        let mut rx = Rx { buf, start: 0, end: 0 };
        while !self.dead.get() {
            if self.down.get() {
                self.reconnect(ring).await;
                (rx.start, rx.end) = (0, 0);
                continue;
            }
            // Under zero copy (and under `mixed` while a long READ waits) no
            // payload may land in the receive buffer: at a reply's start it
            // takes at most the longest header that comes before a payload (a simple reply's 16 bytes; a data
            // chunk's 20 and its 8-byte offset). Every reply is at least 16
            // bytes, so what a shorter reply leaves over is part of the next
            // one's header, never of a payload.
            let want = if self.nbd.info.structured { CHUNK_LEN + 8 } else { REPLY_LEN };
            if !self.fill_upto(ring, &mut rx, 4, want).await {
                continue;
            }
            match rx.be32(0) {
                SIMPLE_REPLY_MAGIC => self.simple_reply(ring, &mut rx).await,
                STRUCTURED_REPLY_MAGIC if self.nbd.info.structured => self.chunk(ring, &mut rx).await,
                STRUCTURED_REPLY_MAGIC => self.fail(|| "a structured reply, which was not negotiated".into()),
                magic => self.fail(|| format!("reply with magic {magic:#010x}: not an NBD reply")),
            }
        }
        std::future::pending::<()>().await
    }

    /// Receives until `rx` holds at least `need` bytes (`need <= RX_BUF`),
    /// taking whatever the connection has. False if the connection failed
    /// or was lost meanwhile (reported), and then no request's data may be
    /// touched: a failed connection answers its requests.
    async fn fill(&self, ring: Ring<'_>, rx: &mut Rx, need: usize) -> bool {
        self.fill_upto(ring, rx, need, need).await
    }

    /// As [`NbdQueue::fill`]; under zero copy (unless `mixed` receives in
    /// bulk: no long READ waits) `rx` takes no more than `want` bytes
    /// (`want >= need`), so that no payload is received into it.
    async fn fill_upto(&self, ring: Ring<'_>, rx: &mut Rx, need: usize, want: usize) -> bool {
        debug_assert!(need <= RX_BUF && need <= want);
        while rx.len() < need {
            if self.dead.get() || self.down.get() {
                return false;
            }
            if rx.buf.len() - rx.start < need {
                rx.buf.copy_within(rx.start..rx.end, 0);
                (rx.start, rx.end) = (0, rx.end - rx.start);
            }
            // In bulk unless a payload might go straight into its pages.
            let bulk = !self.zc || (self.mixed.is_some() && self.big_reads.get() == 0);
            let max = if bulk { RECV_MAX } else { want - rx.len() };
            self.count(|s| s.recvs += 1);
            let res = match std::mem::replace(&mut rx.buf, RxBuf::Plain(Box::default())) {
                RxBuf::Fixed(buf) => {
                    self.count(|s| s.fixed_recvs += 1);
                    // (A socket has no position. Ours are blocking: the
                    // read waits for data, as `recv` does.)
                    let (res, buf) = ring.read_fixed(self.sock(), buf, rx.end, max, 0).await;
                    rx.buf = RxBuf::Fixed(buf);
                    res
                }
                RxBuf::Plain(buf) => {
                    let (res, tail) = ring.recv(self.sock(), Tail { buf, at: rx.end, max }, 0).await;
                    rx.buf = RxBuf::Plain(tail.buf);
                    res
                }
            };
            match res {
                Ok(0) if rx.len() == 0 => self.lose(|| "the server closed the connection".into()),
                Ok(0) => {
                    let have = rx.len();
                    self.lose(|| format!("short reply: {have} of {need} bytes, then the connection ended"))
                }
                Ok(n) => rx.end += n as usize,
                Err(e) => self.lose(|| format!("receiving replies: {e}")),
            }
        }
        !(self.dead.get() || self.down.get())
    }

    /// Delivers the next `n` bytes on the connection, a READ's payload, into
    /// request `tag`'s data at `at` (inside it: checked by the caller). What
    /// the receive buffer holds is copied; a remainder of [`DIRECT_MIN`] or
    /// more is received by the request itself straight into its data, a
    /// shorter one through the buffer. False if the connection failed or
    /// was lost meanwhile.
    async fn payload(&self, ring: Ring<'_>, rx: &mut Rx, tag: u16, mut at: usize, mut n: usize) -> bool {
        let t = &self.tags[usize::from(tag)];
        debug_assert!(at + n <= t.len.get() as usize);
        if self.zc && self.mixed.is_none() {
            if rx.len() > 0 {
                // Cannot happen (`reader` bounds what the buffer takes); the
                // request's pages are not in this process to copy into.
                let k = rx.len();
                self.fail(|| format!("{k} bytes of a payload in the receive buffer under zero copy"));
                return false;
            }
            return self.hand_off(tag, St::Payload, at, n).await;
        }
        loop {
            let k = n.min(rx.len());
            if k > 0 {
                self.deliver(t, tag, rx, at, k);
                rx.consume(k);
                (at, n) = (at + k, n - k);
            }
            if n == 0 {
                return true;
            }
            if n >= DIRECT_MIN {
                // The receive buffer is empty: the rest of the payload is
                // next on the connection.
                return self.hand_off(tag, St::Payload, at, n).await;
            }
            // No more than the payload's rest, in case the reader is not
            // receiving in bulk (`mixed` while a long READ waits).
            if !self.fill_upto(ring, rx, 1, n).await {
                return false;
            }
        }
    }

    /// Puts the first `k` bytes the receive buffer holds into request
    /// `tag`'s data at `at` (inside it: checked by the caller): copied into
    /// its buffer, or under [`NbdQueue::mixed`] written into its pages by a
    /// `pwrite` of `/dev/ublkcN`. A `pwrite` the kernel refuses fails the
    /// request (EIO), not the connection: the payload is still taken off it.
    fn deliver(&self, t: &Tag, tag: u16, rx: &Rx, at: usize, k: usize) {
        let Some(m) = &self.mixed else {
            // SAFETY: `t.data` is the waiting READ's buffer of `t.len`
            // bytes, and `at + k` is inside it (see `Tag::data`); the
            // connection is good (checked after every await), so the
            // request is not answered yet. The receive buffer is ours.
            unsafe { std::ptr::copy_nonoverlapping(rx.buf[rx.start..].as_ptr(), t.data.get().add(at), k) };
            return;
        };
        let pos = user_copy_offset(self.q_id, tag) + at as u64;
        // SAFETY: `rx.buf[rx.start..rx.start + k]` is ours and initialised,
        // and only read (by the kernel) during the call; no reference to it
        // is live meanwhile.
        let r = unsafe { transfer(m.char_dev.as_fd(), rx.buf[rx.start..].as_ptr().cast_mut(), k, pos, Dir::ToFd) };
        if r.is_err() {
            if t.err.get() == 0 {
                t.err.set(EIO);
            }
        } else {
            self.count(|s| s.copied_payloads += 1);
        }
    }

    /// Lets request `tag` move its data `at..at + n` (`st`: receive the
    /// payload next on the connection, or zero a hole) while the reader
    /// waits. False if the connection failed or was lost meanwhile.
    async fn hand_off(&self, tag: u16, st: St, at: usize, n: usize) -> bool {
        let t = &self.tags[usize::from(tag)];
        t.payload.set((at as u32, n as u32));
        t.st.set(st);
        self.hold.set(true);
        if st == St::Payload {
            self.count(|s| s.direct_payloads += 1);
        }
        t.wake();
        poll_fn(|cx| {
            if self.hold.get() && !self.dead.get() {
                // (A lost connection ends the payload's receive, which
                // releases the hold.)
                self.park_bg(cx);
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        !(self.dead.get() || self.down.get())
    }

    /// The request's reply is complete: it may be answered.
    fn replied(&self, t: &Tag, error: u32) {
        t.st.set(St::Replied(error));
        t.wake();
        self.backoff.set(Duration::ZERO);
    }

    /// A simple reply (the magic is in `rx`): header, then a successful
    /// READ's payload.
    async fn simple_reply(&self, ring: Ring<'_>, rx: &mut Rx) {
        if !self.fill(ring, rx, REPLY_LEN).await {
            return;
        }
        let (error, cookie) = (rx.be32(4), rx.be64(8));
        rx.consume(REPLY_LEN);
        self.count(|s| s.simple_replies += 1);
        let Some(tag) = self.tag_of(cookie) else {
            return self.fail(|| format!("reply with cookie {cookie:#018x}, which matches no request in flight"));
        };
        let t = &self.tags[usize::from(tag)];
        if t.cmd.get() == CMD_READ {
            if self.nbd.info.structured {
                return self.fail(|| "a simple reply to a READ, although structured replies were negotiated".into());
            }
            if error == 0 && !self.payload(ring, rx, tag, 0, t.len.get() as usize).await {
                return;
            }
        }
        // (A payload that could not be delivered is EIO.)
        self.replied(t, if error != 0 { error } else { t.err.get() });
    }

    /// A structured reply chunk (the magic is in `rx`). Anything the
    /// protocol forbids closes the connection: a cookie of no request in
    /// flight (also a chunk after the last one), content outside the
    /// request or over an earlier chunk, content for another command than
    /// READ, a last chunk before the READ's data is complete without an
    /// error, a chunk of the wrong length, an unknown type that is not an
    /// error.
    async fn chunk(&self, ring: Ring<'_>, rx: &mut Rx) {
        if !self.fill(ring, rx, CHUNK_LEN).await {
            return;
        }
        let (cflags, ty, cookie, length) = (rx.be16(4), rx.be16(6), rx.be64(8), rx.be32(16));
        rx.consume(CHUNK_LEN);
        self.count(|s| s.chunks += 1);
        let Some(tag) = self.tag_of(cookie) else {
            return self.fail(|| format!("reply chunk (type {ty}) with cookie {cookie:#018x}, which matches no request in flight"));
        };
        let t = &self.tags[usize::from(tag)];
        let read = t.cmd.get() == CMD_READ;
        let (off, len) = (t.offset.get(), t.len.get());
        match ty {
            REPLY_TYPE_NONE if length == 0 && cflags & REPLY_FLAG_DONE != 0 => {}
            REPLY_TYPE_NONE => return self.fail(|| format!("NBD_REPLY_TYPE_NONE chunk of {length} bytes, flags {cflags:#x}")),
            REPLY_TYPE_OFFSET_DATA if read && length > 8 => {
                if !self.fill(ring, rx, 8).await {
                    return;
                }
                let (at, n) = (rx.be64(0), length - 8);
                rx.consume(8);
                let Some(rel) = t.claim(at, n) else {
                    return self
                        .fail(|| format!("data chunk of {n} bytes at {at}: outside the READ of {len} at {off}, over an earlier chunk, or in too many pieces"));
                };
                self.count(|s| s.data_chunks += 1);
                if !self.payload(ring, rx, tag, rel, n as usize).await {
                    return;
                }
            }
            REPLY_TYPE_OFFSET_HOLE if read && length == 12 => {
                if !self.fill(ring, rx, 12).await {
                    return;
                }
                let (at, n) = (rx.be64(0), rx.be32(8));
                rx.consume(12);
                let Some(rel) = t.claim(at, n) else {
                    return self
                        .fail(|| format!("hole chunk of {n} bytes at {at}: outside the READ of {len} at {off}, over an earlier chunk, or in too many pieces"));
                };
                self.count(|s| s.hole_chunks += 1);
                if self.zc {
                    // Zeroed by the request once its reply is complete (the
                    // connection is not involved, so the reader goes on),
                    // or now if it keeps as many holes as it can.
                    if !t.keep_hole(rel as u32, n) && !self.hand_off(tag, St::Hole, rel, n as usize).await {
                        return;
                    }
                } else {
                    // SAFETY: as in `payload`: inside the waiting READ's
                    // buffer (checked by `claim`), no await since the last
                    // check.
                    unsafe { std::ptr::write_bytes(t.data.get().add(rel), 0, n as usize) };
                }
            }
            REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                let what = if read { format!("of {length} bytes") } else { format!("to command {}", t.cmd.get()) };
                return self.fail(|| format!("content chunk (type {ty}) {what}"));
            }
            ty if ty & REPLY_TYPE_ERROR_BIT != 0 => {
                // error, message length, message, then the type's own fields
                // (an offset for ERROR_OFFSET).
                let fixed = if ty == REPLY_TYPE_ERROR_OFFSET { 14 } else { 6 };
                if length < fixed || length > MAX_ERROR_CHUNK {
                    return self.fail(|| format!("error chunk (type {ty:#x}) of {length} bytes"));
                }
                if !self.fill(ring, rx, length as usize).await {
                    return;
                }
                let (error, msg_len) = (rx.be32(0), u32::from(rx.be16(4)));
                let known = matches!(ty, REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET);
                let bad = if msg_len > length - fixed {
                    Some(format!("error chunk (type {ty:#x}) of {length} bytes with a message of {msg_len}"))
                } else if known && error == 0 {
                    Some(format!("error chunk (type {ty:#x}) with error 0"))
                } else if ty == REPLY_TYPE_ERROR_OFFSET {
                    let at = rx.be64(6 + msg_len as usize);
                    (at < off || at - off >= u64::from(len))
                        .then(|| format!("error chunk at {at}, outside the request of {len} bytes at {off}"))
                } else {
                    None
                };
                rx.consume(length as usize);
                if let Some(why) = bad {
                    return self.fail(|| why);
                }
                self.count(|s| s.error_chunks += 1);
                // The reply has failed; an error type this client does not
                // know (which the protocol lets the connection survive)
                // with error 0 fails it with EIO.
                if t.err.get() == 0 {
                    t.err.set(if error != 0 { error } else { EIO });
                }
            }
            ty => return self.fail(|| format!("reply chunk of unknown type {ty} ({length} bytes)")),
        }
        if cflags & REPLY_FLAG_DONE != 0 {
            let error = t.err.get();
            if error == 0 && read && !t.covered_all() {
                let got: u32 = t.covered.borrow().iter().map(|&(a, b)| b - a).sum();
                return self.fail(|| format!("the READ of {len} bytes at {off} ended with {got} bytes of data and holes, and no error"));
            }
            self.replied(t, error);
        }
    }
}

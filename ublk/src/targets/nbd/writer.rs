//! The requests' writer: every queued request header and WRITE payload
//! gathered into one `sendmsg` (up to [`BATCH`] requests), sent in order.
//! Under zero copy a WRITE's payload stays in the request's pages: a batch
//! is a linked chain of `sendmsg`s of headers and `WRITE_FIXED`s of
//! payloads from those pages, pushed in one submission.

use std::future::poll_fn;
use std::task::Poll;

use io_uring::{opcode, squeue, types};

use super::proto::{request, CMD_WRITE, REQUEST_LEN};
use super::queue::connection_lost;
use super::NbdQueue;
use crate::aio::{Operation, Ring};
use crate::errno::Errno;

/// Requests gathered into one `sendmsg` (one chain under zero copy), at most.
const BATCH: usize = 64;
/// Segments of a zero-copy batch, at most: a `sendmsg` of headers before
/// and after each WRITE's payload.
const MAX_SEGS: usize = 2 * BATCH + 1;
/// Payload bytes in one zero-copy chain, about: a WRITE_FIXED to a socket
/// comes short when the send buffer is full, which ends the chain and
/// cancels the rest, so the rest is pushed again; the cap bounds that work.
const CHAIN_BYTES: usize = 256 << 10;
/// Times a chain is tried when the ring has no room for it at once (its
/// completion queue full) before the connection is given up.
const CHAIN_TRIES: u32 = 100;

/// Under zero copy, one step of a batch's chain.
#[derive(Debug, Clone, Copy)]
enum Seg {
    /// `iov[a..b]` (headers), one `sendmsg`.
    Msg(usize, usize),
    /// A WRITE's payload from the request's pages, fixed buffer `index`,
    /// bytes `off..off + len`: one `WRITE_FIXED`.
    Payload { index: u16, off: u32, len: u32 },
}

/// The writer's memory for a batch: headers, iovecs, the msghdrs. Owned by
/// the operations while they are in flight, handed back with the last one.
struct SendBuf {
    hdrs: Box<[[u8; REQUEST_LEN]; BATCH]>,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::msghdr>,
    tags: Vec<u16>,
    segs: Vec<Seg>,
}

impl SendBuf {
    fn new() -> Box<SendBuf> {
        // SAFETY: msghdr is plain integers and pointers; all zeros is valid.
        let msg: libc::msghdr = unsafe { std::mem::zeroed() };
        Box::new(SendBuf {
            hdrs: Box::new([[0u8; REQUEST_LEN]; BATCH]),
            iov: Vec::with_capacity(2 * BATCH),
            msgs: vec![msg; MAX_SEGS],
            tags: Vec::with_capacity(BATCH),
            segs: Vec::with_capacity(MAX_SEGS),
        })
    }

    /// Bytes `iov[a..b]` still hold.
    fn msg_len(&self, a: usize, b: usize) -> usize {
        self.iov[a..b].iter().map(|v| v.iov_len).sum()
    }

    /// Drops the first `n` bytes of `iov[*first..]` (sent), moving `first`
    /// past the iovecs sent in full.
    fn skip(&mut self, first: &mut usize, mut n: usize) {
        while n > 0 && *first < self.iov.len() {
            let v = &mut self.iov[*first];
            if n >= v.iov_len {
                n -= v.iov_len;
                *first += 1;
            } else {
                // SAFETY: inside the same header or payload.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
}

impl NbdQueue<'_> {
    /// Sends queued requests, as many as are queued (up to [`BATCH`]) in
    /// one `sendmsg` (one chain under zero copy), in order. Never completes.
    pub(super) async fn writer(&self, ring: Ring<'_>) {
        let mut buf = Some(SendBuf::new());
        let mut sqes: Vec<squeue::Entry> = Vec::with_capacity(MAX_SEGS);
        let mut ops = Vec::with_capacity(MAX_SEGS);
        loop {
            poll_fn(|cx| {
                if self.sendq.borrow().is_empty() || (self.down.get() && !self.dead.get()) {
                    self.park_bg(cx);
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            let mut b = buf.take().expect("the writer's buffer is back after every send");
            b.tags.clear();
            self.batch.set(true);
            {
                let mut q = self.sendq.borrow_mut();
                while b.tags.len() < BATCH {
                    let Some(tag) = q.pop_front() else { break };
                    b.tags.push(tag);
                }
            }
            if !self.dead.get() {
                b = if self.zc { self.send_chain(ring, b, &mut sqes, &mut ops).await } else { self.send_copied(ring, b).await };
            }
            for &tag in &b.tags {
                let t = &self.tags[usize::from(tag)];
                t.sent.set(true);
                t.wake();
            }
            buf = Some(b);
            self.batch.set(false);
            // A reconnect may wait for this batch to be over.
            self.wake_bg();
        }
    }

    /// The batch's headers and WRITE payloads (in the requests' buffers) in
    /// one `sendmsg`, repeated from where it stopped if it comes short.
    async fn send_copied(&self, ring: Ring<'_>, mut buf: Box<SendBuf>) -> Box<SendBuf> {
        let mut total = 0usize;
        let b = &mut *buf;
        b.iov.clear();
        for (i, &tag) in b.tags.iter().enumerate() {
            let t = &self.tags[usize::from(tag)];
            request(&mut b.hdrs[i], t.flags.get(), t.cmd.get(), self.cookie(tag), t.offset.get(), t.len.get());
            b.iov.push(libc::iovec { iov_base: b.hdrs[i].as_mut_ptr().cast(), iov_len: REQUEST_LEN });
            total += REQUEST_LEN;
            if t.cmd.get() == CMD_WRITE {
                let len = t.len.get() as usize;
                b.iov.push(libc::iovec { iov_base: t.data.get() as *mut libc::c_void, iov_len: len });
                total += len;
            }
        }
        let mut first = 0usize;
        while total > 0 && !self.dead.get() && !self.down.get() {
            let b = &mut *buf;
            b.msgs[0].msg_iov = b.iov[first..].as_mut_ptr();
            b.msgs[0].msg_iovlen = b.iov.len() - first;
            let sqe = opcode::SendMsg::new(types::Fd(self.sock_fd.get()), &b.msgs[0])
                .flags((libc::MSG_NOSIGNAL | libc::MSG_WAITALL) as u32)
                .build();
            self.torn.set(true);
            self.sending.set(true);
            self.count(|s| s.sends += 1);
            // SAFETY: the msghdr, the iovecs and the headers are in `buf`,
            // owned by the operation (heap memory, stable when the Box moves)
            // until it is over. The WRITE payloads are their requests' data:
            // a request is not answered (so its buffer not reused) before
            // `sent` is set by `writer`, after this operation is over; at a
            // stop the queue reaps every operation before it drops the
            // requests' futures. One plain SENDMSG: one completion, no links.
            let (res, back) = unsafe { ring.raw(sqe, buf) }.await;
            buf = back;
            self.sending.set(false);
            match res {
                Ok(0) => self.lose(|| "the connection accepts no more data".into()),
                Ok(n) => {
                    total -= (n as usize).min(total);
                    // Skip what was sent (io_uring may send part of it, e.g.
                    // when interrupted).
                    buf.skip(&mut first, n as usize);
                    if total == 0 {
                        self.torn.set(false);
                    }
                }
                Err(e) => self.lose(|| format!("sending requests: {e}")),
            }
        }
        buf
    }

    /// Under zero copy: the batch as one linked chain, in one submission:
    /// a `sendmsg` of the headers up to and including a WRITE's (with
    /// MSG_MORE), that WRITE's payload from its pages (`WRITE_FIXED`), and
    /// so on. Each step starts once the one before it went out whole; a
    /// step that comes short ends the chain, and the chain is pushed again
    /// from where it stopped.
    async fn send_chain<'r>(
        &self,
        ring: Ring<'r>,
        mut buf: Box<SendBuf>,
        sqes: &mut Vec<squeue::Entry>,
        ops: &mut Vec<Operation<'r, Option<Box<SendBuf>>>>,
    ) -> Box<SendBuf> {
        let b = &mut *buf;
        b.iov.clear();
        b.segs.clear();
        let mut start = 0;
        for (i, &tag) in b.tags.iter().enumerate() {
            let t = &self.tags[usize::from(tag)];
            request(&mut b.hdrs[i], t.flags.get(), t.cmd.get(), self.cookie(tag), t.offset.get(), t.len.get());
            b.iov.push(libc::iovec { iov_base: b.hdrs[i].as_mut_ptr().cast(), iov_len: REQUEST_LEN });
            if t.cmd.get() == CMD_WRITE && t.len.get() > 0 && !t.data.get().is_null() {
                // Staged in this process (`NbdQueue::mixed`): sent with its
                // header.
                b.iov.push(libc::iovec { iov_base: t.data.get().cast(), iov_len: t.len.get() as usize });
            } else if t.cmd.get() == CMD_WRITE && t.len.get() > 0 {
                b.segs.push(Seg::Msg(start, b.iov.len()));
                start = b.iov.len();
                b.segs.push(Seg::Payload { index: t.fixed.get(), off: 0, len: t.len.get() });
            }
        }
        if start < b.iov.len() {
            b.segs.push(Seg::Msg(start, b.iov.len()));
        }
        let (mut cur, mut tries) = (0, 0);
        while cur < buf.segs.len() && !self.dead.get() && !self.down.get() {
            let fd = types::Fd(self.sock_fd.get());
            sqes.clear();
            let b = &mut *buf;
            let n = b.segs.len();
            let mut bytes = 0;
            for k in cur..n {
                if bytes >= CHAIN_BYTES {
                    break;
                }
                let more = if k + 1 < n { libc::MSG_MORE } else { 0 };
                sqes.push(match b.segs[k] {
                    Seg::Msg(a, e) => {
                        b.msgs[k].msg_iov = b.iov[a..].as_mut_ptr();
                        b.msgs[k].msg_iovlen = e - a;
                        opcode::SendMsg::new(fd, &b.msgs[k]).flags((libc::MSG_NOSIGNAL | libc::MSG_WAITALL | more) as u32).build()
                    }
                    // A fixed buffer registered by the kernel starts at
                    // address 0. A socket write raises no SIGPIPE here
                    // (`Nbd::queue` checks that it is ignored).
                    Seg::Payload { index, off, len } => {
                        bytes += len as usize;
                        opcode::WriteFixed::new(fd, off as usize as *const u8, len, index).offset(0).build()
                    }
                });
            }
            let end = cur + sqes.len();
            self.torn.set(true);
            self.sending.set(true);
            self.count(|s| s.sends += 1);
            // SAFETY: the msghdrs, iovecs and headers are in `buf`, owned by
            // the chain's last operation (heap memory, stable when the Box
            // moves), which completes after every step of the chain that ran.
            // A staged payload is its tag's slot, which the request does not
            // write again before it is answered. A payload is its WRITE's
            // pages, registered at `index` in this ring until the request's
            // commit, which comes after its answer,
            // which waits for `sent`, set by `writer` once these operations
            // are over; at a stop the queue reaps every operation before it
            // commits. Each step gives one completion.
            let pushed = unsafe { ring.raw_chain(sqes, buf, ops) };
            buf = match pushed {
                Ok(()) => {
                    let mut back = None;
                    let mut results = [0i32; MAX_SEGS];
                    for (j, op) in ops.drain(..).enumerate() {
                        let (res, keep) = op.await;
                        results[j] = match res {
                            Ok(n) => n as i32,
                            Err(e) => -e.raw(),
                        };
                        if keep.is_some() {
                            back = keep;
                        }
                    }
                    let mut b = back.expect("the chain's last operation keeps the buffer");
                    self.sending.set(false);
                    cur = self.chain_done(&mut b, cur, &results[..end - cur]);
                    b
                }
                Err(b) => {
                    // No room in the ring now (its completion queue is
                    // full): once completions are reaped, try again.
                    self.sending.set(false);
                    tries += 1;
                    if tries >= CHAIN_TRIES {
                        self.fail(|| format!("no room in the queue's ring for a chain of {} sends", end - cur));
                    } else {
                        let _ = ring.nop().await;
                    }
                    b
                }
            };
        }
        if cur == buf.segs.len() {
            self.torn.set(false);
        }
        buf
    }

    /// Takes a chain's results (from segment `cur` on): the segments sent
    /// whole are done, one sent in part keeps its rest. The next segment to
    /// send; a failure loses the connection (or closes it, for an error a
    /// new connection would meet again).
    fn chain_done(&self, b: &mut SendBuf, cur: usize, results: &[i32]) -> usize {
        match b.chain_outcome(cur, results) {
            Outcome::Sent(next) => next,
            Outcome::Broken(at) => {
                // A step after one that did not finish ran: what went out
                // after the gap is not known.
                self.fail(|| "a linked send ran after one that did not finish".into());
                at
            }
            Outcome::Failed(at, 0) => {
                self.lose(|| "the connection accepts no more data".into());
                at
            }
            Outcome::Failed(at, e) => {
                let e = Errno::new(e);
                if matches!(b.segs[at], Seg::Payload { .. }) && !connection_lost(e) {
                    self.fail(|| format!("sending a WRITE payload from its pages: {e}"));
                } else {
                    self.lose(|| format!("sending requests: {e}"));
                }
                at
            }
        }
    }
}

/// What a chain did, from its results.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Every step up to this segment went out whole (the rest of one that
    /// came short is kept in it): the next segment to send.
    Sent(usize),
    /// The step at this segment failed with this errno (0: it sent nothing).
    Failed(usize, i32),
    /// A step after the one at this segment ran although that one did not
    /// finish.
    Broken(usize),
}

impl SendBuf {
    /// Bytes segment `k` still has to send.
    fn seg_len(&self, k: usize) -> usize {
        match self.segs[k] {
            Seg::Msg(a, e) => self.msg_len(a, e),
            Seg::Payload { len, .. } => len as usize,
        }
    }

    /// The chain pushed from segment `cur` completed with `results` (bytes,
    /// or a negative errno), one per step in order: segments sent whole are
    /// done, one sent in part keeps its rest, and the steps after one that
    /// did not finish must have been cancelled.
    fn chain_outcome(&mut self, mut cur: usize, results: &[i32]) -> Outcome {
        for (j, &res) in results.iter().enumerate() {
            let want = self.seg_len(cur);
            if res > 0 && res as usize == want {
                cur += 1;
                continue;
            }
            if results[j + 1..].iter().any(|&r| r != -libc::ECANCELED) {
                return Outcome::Broken(cur);
            }
            if res <= 0 {
                return Outcome::Failed(cur, -res);
            }
            let r = res as usize;
            match self.segs[cur] {
                Seg::Msg(a, e) => {
                    let mut first = a;
                    self.skip(&mut first, r);
                    self.segs[cur] = Seg::Msg(first, e);
                }
                Seg::Payload { index, off, len } => {
                    self.segs[cur] = Seg::Payload { index, off: off + r as u32, len: len - r as u32 };
                }
            }
            return Outcome::Sent(cur);
        }
        Outcome::Sent(cur)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of two headers, a 4 KiB payload (fixed buffer 3), then one
    /// more header.
    fn batch() -> Box<SendBuf> {
        let mut b = SendBuf::new();
        for i in 0..3 {
            let p = b.hdrs[i].as_mut_ptr().cast();
            b.iov.push(libc::iovec { iov_base: p, iov_len: REQUEST_LEN });
        }
        b.segs.extend([Seg::Msg(0, 2), Seg::Payload { index: 3, off: 0, len: 4096 }, Seg::Msg(2, 3)]);
        b
    }

    #[test]
    fn a_chain_sent_whole_is_done() {
        let mut b = batch();
        let all = [2 * REQUEST_LEN as i32, 4096, REQUEST_LEN as i32];
        assert_eq!(b.chain_outcome(0, &all), Outcome::Sent(3));
    }

    /// A short payload write keeps its rest, from where it stopped; the
    /// steps after it were cancelled and are sent again.
    #[test]
    fn a_short_payload_keeps_its_rest() {
        let mut b = batch();
        let r = [2 * REQUEST_LEN as i32, 1000, -libc::ECANCELED];
        assert_eq!(b.chain_outcome(0, &r), Outcome::Sent(1));
        assert!(matches!(b.segs[1], Seg::Payload { index: 3, off: 1000, len: 3096 }));
        assert_eq!(b.chain_outcome(1, &[3096, REQUEST_LEN as i32]), Outcome::Sent(3));
    }

    /// A short sendmsg keeps the rest of its headers, part of one included.
    #[test]
    fn a_short_sendmsg_keeps_the_rest_of_its_headers() {
        let mut b = batch();
        let base = b.iov[1].iov_base as usize;
        let r = [REQUEST_LEN as i32 + 10, -libc::ECANCELED, -libc::ECANCELED];
        assert_eq!(b.chain_outcome(0, &r), Outcome::Sent(0));
        assert!(matches!(b.segs[0], Seg::Msg(1, 2)));
        assert_eq!(b.iov[1].iov_len, REQUEST_LEN - 10);
        assert_eq!(b.iov[1].iov_base as usize, base + 10);
        assert_eq!(b.seg_len(0), REQUEST_LEN - 10);
    }

    #[test]
    fn a_failed_step_is_reported_with_its_errno() {
        let mut b = batch();
        let r = [2 * REQUEST_LEN as i32, -libc::EPIPE, -libc::ECANCELED];
        assert_eq!(b.chain_outcome(0, &r), Outcome::Failed(1, libc::EPIPE));
        assert_eq!(b.chain_outcome(0, &[0, -libc::ECANCELED, -libc::ECANCELED]), Outcome::Failed(0, 0));
    }

    /// A staged WRITE payload (mixed mode) is an iovec of its header's
    /// `sendmsg`: a send that stops inside it keeps the payload's rest, and
    /// the message is sent on from there.
    #[test]
    fn a_short_sendmsg_keeps_the_rest_of_a_staged_payload() {
        let mut b = SendBuf::new();
        let mut staged = vec![7u8; 4096];
        let h0 = b.hdrs[0].as_mut_ptr().cast();
        let h1 = b.hdrs[1].as_mut_ptr().cast();
        b.iov.push(libc::iovec { iov_base: h0, iov_len: REQUEST_LEN });
        b.iov.push(libc::iovec { iov_base: staged.as_mut_ptr().cast(), iov_len: 4096 });
        b.iov.push(libc::iovec { iov_base: h1, iov_len: REQUEST_LEN });
        b.segs.push(Seg::Msg(0, 3));
        assert_eq!(b.seg_len(0), 2 * REQUEST_LEN + 4096);
        assert_eq!(b.chain_outcome(0, &[REQUEST_LEN as i32 + 1000]), Outcome::Sent(0));
        assert!(matches!(b.segs[0], Seg::Msg(1, 3)));
        assert_eq!(b.iov[1].iov_base as usize, staged.as_ptr() as usize + 1000);
        assert_eq!(b.seg_len(0), 3096 + REQUEST_LEN);
        assert_eq!(b.chain_outcome(0, &[(3096 + REQUEST_LEN) as i32]), Outcome::Sent(1));
    }

    /// A step that ran after a short one means the chain did not stop
    /// there: refused, not sent again over what may have gone out.
    #[test]
    fn a_step_after_a_short_one_breaks_the_batch() {
        let mut b = batch();
        let r = [2 * REQUEST_LEN as i32, 1000, REQUEST_LEN as i32];
        assert_eq!(b.chain_outcome(0, &r), Outcome::Broken(1));
    }
}

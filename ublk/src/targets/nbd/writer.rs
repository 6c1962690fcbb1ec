//! The requests' writer: every queued request header and WRITE payload
//! gathered into one `sendmsg` (up to [`BATCH`] requests), sent in order.

use std::future::poll_fn;
use std::task::Poll;

use io_uring::{opcode, types};

use super::proto::{request, CMD_WRITE, REQUEST_LEN};
use super::NbdQueue;
use crate::aio::Ring;

/// Requests gathered into one `sendmsg`, at most.
const BATCH: usize = 64;

/// The writer's memory for one `sendmsg`: headers, iovecs, the msghdr. Owned
/// by the operation while it is in flight, handed back with its result.
struct SendBuf {
    hdrs: Box<[[u8; REQUEST_LEN]; BATCH]>,
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
    tags: Vec<u16>,
}

impl NbdQueue<'_> {
    /// Sends queued requests, as many as are queued (up to [`BATCH`]) in
    /// one `sendmsg`, in order. Never completes.
    pub(super) async fn writer(&self, ring: Ring<'_>) {
        // SAFETY: msghdr is plain integers and pointers; all zeros is valid.
        let msg: libc::msghdr = unsafe { std::mem::zeroed() };
        let mut buf = Box::new(SendBuf {
            hdrs: Box::new([[0u8; REQUEST_LEN]; BATCH]),
            iov: Vec::with_capacity(2 * BATCH),
            msg,
            tags: Vec::with_capacity(BATCH),
        });
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
            buf.tags.clear();
            buf.iov.clear();
            {
                let mut q = self.sendq.borrow_mut();
                while buf.tags.len() < BATCH {
                    let Some(tag) = q.pop_front() else { break };
                    buf.tags.push(tag);
                    // Under zero copy a WRITE's payload follows its header
                    // from the request's pages: the batch ends there.
                    if self.zc && self.tags[usize::from(tag)].cmd.get() == CMD_WRITE {
                        break;
                    }
                }
            }
            if !self.dead.get() {
                let mut total = 0usize;
                let b = &mut *buf;
                for (i, &tag) in b.tags.iter().enumerate() {
                    let t = &self.tags[usize::from(tag)];
                    request(&mut b.hdrs[i], t.flags.get(), t.cmd.get(), self.cookie(tag), t.offset.get(), t.len.get());
                    b.iov.push(libc::iovec { iov_base: b.hdrs[i].as_mut_ptr().cast(), iov_len: REQUEST_LEN });
                    total += REQUEST_LEN;
                    if t.cmd.get() == CMD_WRITE && !self.zc {
                        let len = t.len.get() as usize;
                        b.iov.push(libc::iovec { iov_base: t.data.get() as *mut libc::c_void, iov_len: len });
                        total += len;
                    }
                }
                // Under zero copy a batch that ends in a WRITE's header is
                // followed at once by its payload: one segment for both.
                let more = match buf.tags.last() {
                    Some(&tag) if self.zc && self.tags[usize::from(tag)].cmd.get() == CMD_WRITE => libc::MSG_MORE,
                    _ => 0,
                };
                let mut first = 0usize;
                while total > 0 && !self.dead.get() && !self.down.get() {
                    let b = &mut *buf;
                    b.msg.msg_iov = b.iov[first..].as_mut_ptr();
                    b.msg.msg_iovlen = b.iov.len() - first;
                    let sqe = opcode::SendMsg::new(types::Fd(self.sock_fd.get()), &b.msg)
                        .flags((libc::MSG_NOSIGNAL | libc::MSG_WAITALL | more) as u32)
                        .build();
                    self.torn.set(true);
                    self.sending.set(true);
                    self.count(|s| s.sends += 1);
                    // SAFETY: the msghdr, the iovecs and the headers are in
                    // `buf`, owned by the operation (heap memory, stable when
                    // the Box moves) until it is over. The WRITE payloads are
                    // their requests' data: a request is not answered (so its
                    // buffer not reused) before `sent` is set below, after
                    // this operation is over; at a stop the queue reaps every
                    // operation before it drops the requests' futures. One
                    // plain SENDMSG: one completion, no links.
                    let (res, back) = unsafe { ring.raw(sqe, buf) }.await;
                    buf = back;
                    self.sending.set(false);
                    match res {
                        Ok(0) => self.lose(|| "the connection accepts no more data".into()),
                        Ok(n) => {
                            let mut n = n as usize;
                            total -= n.min(total);
                            // Skip what was sent (io_uring may send part of
                            // it, e.g. when interrupted).
                            let b = &mut *buf;
                            while n > 0 && first < b.iov.len() {
                                let v = &mut b.iov[first];
                                if n >= v.iov_len {
                                    n -= v.iov_len;
                                    first += 1;
                                } else {
                                    // SAFETY: inside the same header or payload.
                                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                                    v.iov_len -= n;
                                    n = 0;
                                }
                            }
                            if total == 0 {
                                self.torn.set(false);
                            }
                        }
                        Err(e) => self.lose(|| format!("sending requests: {e}")),
                    }
                }
            }
            let last = buf.tags.last().map(|&tag| &self.tags[usize::from(tag)]);
            if let Some(t) = last.filter(|t| self.zc && t.cmd.get() == CMD_WRITE && !self.torn.get()) {
                if !self.dead.get() && !self.down.get() {
                    // The header is out: the request sends its payload from
                    // its pages (WRITE_FIXED) while the writer waits.
                    self.torn.set(true);
                    self.whold.set(true);
                    t.push.set(true);
                    t.wake();
                    poll_fn(|cx| {
                        if t.push.get() && !self.dead.get() {
                            self.park_bg(cx);
                            Poll::Pending
                        } else {
                            Poll::Ready(())
                        }
                    })
                    .await;
                    if !self.dead.get() && !self.down.get() {
                        self.torn.set(false);
                    }
                    // Released here, with no await before the batch is
                    // marked sent below: a reconnect waiting for it then
                    // re-queues the batch after this writer is done with it.
                    self.whold.set(false);
                }
            }
            for &tag in &buf.tags {
                let t = &self.tags[usize::from(tag)];
                t.sent.set(true);
                t.wake();
            }
            // A reconnect may wait for this send to be over.
            self.wake_bg();
        }
    }
}

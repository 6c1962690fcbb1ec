//! The queue's executor for [`AsyncTarget`]s: one future slot per tag,
//! polled on the queue's thread when woken, parked in the queue's
//! `io_uring_enter` otherwise.

use super::token::Token;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::Queue;
use crate::aio::reactor::Reactor;
use crate::aio::{AsyncTarget, Io, QueueContext, QueueTarget, Ring};
use crate::error::{Error, Result};
use crate::queue::ring::drain_eventfd;
use crate::queue::QueueStats;
use crate::target::Request;
use crate::target::{settle, IoResult};

impl Queue {
    /// Serves requests with an [`AsyncTarget`] until the device is stopped:
    /// makes the target's object for this queue (on this thread), then runs
    /// each request's future on this thread. See [`crate::aio`].
    pub fn serve_async<T: AsyncTarget + ?Sized>(&mut self, target: &T) -> Result<QueueStats> {
        self.check_data(crate::aio::needs_buffers(target, self.user_copy), target.zero_copy())?;
        self.serve_async_notify(target, &|| {})
    }

    pub(crate) fn serve_async_notify<T: AsyncTarget + ?Sized>(&mut self, target: &T, on_panic: &dyn Fn()) -> Result<QueueStats> {
        let ctx = QueueContext {
            dev_id: self.dev_id,
            q_id: self.q_id,
            thread: self.share.thread,
            threads: self.share.threads,
            depth: self.depth,
            user_copy: super::user_copy_dev(self),
            zero_copy: self.zc != super::ZeroCopy::Off,
            char_dev: self.char_dup.clone(),
        };
        let qt = match target.queue(&ctx) {
            Ok(qt) => qt,
            Err(e) => {
                let err = Error::os(format!("making the target's object for queue {} thread {}", self.q_id, self.share.thread), e);
                self.drain();
                return Err(err);
            }
        };
        let reactor = self.reactor.clone();
        self.guarded(on_panic, |q| {
            let r = &*reactor;
            run(q, r, |io| qt.handle(io), qt.run(Ring { r, tag: None }))
        })
    }
}

/// The executor's loop, over request futures of type `F` made by `start`
/// and the queue's background task `bg`.
fn run<'r, F: Future<Output = IoResult> + 'r, B: Future<Output = ()> + 'r>(
    q: &mut Queue,
    r: &'r Reactor,
    start: impl Fn(Io<'r>) -> F,
    bg: B,
) -> Result<QueueStats> {
    // One slot per tag, allocated once: a future stays in its slot (pinned)
    // from its first poll until it is dropped there. The background task
    // likewise stays in its box.
    let mut futs: Box<[Option<F>]> = (0..q.depth).map(|_| None).collect();
    let mut bg = Box::pin(Some(bg));
    r.ready.set(q.depth);
    let result = turn(q, r, &mut futs, bg.as_mut(), &start);
    // Teardown, or an error: the futures' operations are cancelled and
    // reaped before the futures (and what they borrow) are dropped.
    q.end_ops();
    for f in futs.iter_mut() {
        *f = None;
    }
    bg.set(None);
    result
}

fn turn<'r, F: Future<Output = IoResult> + 'r, B: Future<Output = ()> + 'r>(
    q: &mut Queue,
    r: &'r Reactor,
    futs: &mut [Option<F>],
    mut bg: Pin<&mut Option<B>>,
    start: &impl Fn(Io<'r>) -> F,
) -> Result<QueueStats> {
    let mut stopping = q.woken;
    while !stopping && (q.live_tags > 0 || q.held.iter().any(|&h| h)) {
        // Sleep only if no future is ready. A waker on another thread that
        // finds the queue asleep writes its eventfd.
        r.ready.set_awake(false);
        if r.ready.any() {
            r.ready.set_awake(true);
            q.flush_batch();
            let n = r.ring.borrow_mut().submission().len() as u32;
            match q.enter_nowait(n) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)) => {}
                Err(e) => return Err(Error::os("io_uring_enter on the queue ring", e)),
            }
        } else {
            let entered = q.enter_or_fail();
            r.ready.set_awake(true);
            entered?;
        }
        while let Some(cqe) = q.next_cqe() {
            let res = cqe.result();
            match Token::decode(cqe.user_data()) {
                Token::Wake => {
                    q.on_wake(res);
                    stopping = q.woken;
                }
                Token::Notify => {
                    drain_eventfd(r.ready.efd());
                    q.arm_notify();
                }
                Token::Cancel | Token::OpCancel | Token::Unknown(_) => {}
                Token::AsyncOp(slot) => q.op_completed(slot, res),
                Token::BufReg(tag) => {
                    // The queue's own registration of a request's pages
                    // (zero copy): its future runs once they are in the ring.
                    if q.registered(tag, res) {
                        r.ready.set(tag);
                    } else {
                        // Never polled: it started nothing.
                        futs[usize::from(tag)] = None;
                        q.answer(tag, -libc::EIO);
                    }
                }
                Token::BufUnreg => q.unreg_failed(res),
                Token::BatchFetch => {
                    let tags = q.batch_fetched(res, cqe.flags())?;
                    for &tag in &tags {
                        if let Some(req) = q.on_command(tag, ublk_sys::UBLK_IO_RES_OK as i32)? {
                            start_request(q, r, futs, start, req);
                        }
                    }
                    q.batch_tags_done(tags);
                }
                Token::BatchCmd(buf) => q.batch_cmd_done(buf, res)?,
                Token::Tag(tag) => {
                    if let Some(req) = q.on_command(tag, res)? {
                        start_request(q, r, futs, start, req);
                    }
                }
            }
        }
        for w in 0..r.ready.words() {
            let mut bits = r.ready.take(w);
            while bits != 0 {
                let tag = (w * 64) as u16 + bits.trailing_zeros() as u16;
                bits &= bits - 1;
                if tag == q.depth {
                    if let Some(task) = bg.as_mut().as_pin_mut() {
                        let mut cx = Context::from_waker(&r.wakers[usize::from(tag)]);
                        if task.poll(&mut cx).is_ready() {
                            bg.set(None);
                        }
                    }
                    continue;
                }
                let slot = &mut futs[usize::from(tag)];
                let Some(fut) = slot.as_mut() else { continue };
                // SAFETY: the future lives in its slot of a boxed slice that
                // is never resized or moved, from here until it is dropped in
                // place (`*slot = None`): it is pinned.
                let fut = unsafe { Pin::new_unchecked(fut) };
                let mut cx = Context::from_waker(&r.wakers[usize::from(tag)]);
                if let Poll::Ready(answer) = fut.poll(&mut cx) {
                    *slot = None;
                    let req = q.reqs[usize::from(tag)];
                    let (result, invalid) = settle(&req, answer);
                    q.stats.invalid += u64::from(invalid);
                    q.answer(tag, result);
                }
            }
        }
        q.follow();
    }
    Ok(q.stats)
}

/// Puts a delivered request's future in its tag's slot, ready to be polled
/// (under zero copy with the queue's own registration: once that is done).
fn start_request<'r, F: Future<Output = IoResult> + 'r>(
    q: &mut Queue,
    r: &'r Reactor,
    futs: &mut [Option<F>],
    start: &impl Fn(Io<'r>) -> F,
    req: Request,
) {
    let (buf, size) = q.buf_raw(req.tag);
    let io = Io::new(r, req, buf, size, super::user_copy_dev(q), q.fixed_index(&req));
    futs[usize::from(req.tag)] = Some(start(io));
    if q.needs_own_reg(&req) {
        q.register_buf(&req);
    } else {
        r.ready.set(req.tag);
    }
}

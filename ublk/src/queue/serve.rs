//! Serving a queue with a [`Target`]: fetching every tag, the loop that
//! reaps completions and answers each request at once, the guard that
//! keeps a panicking target from taking the queue down, and following the
//! load ([`crate::Placement::Auto`]).

use super::token::Token;
use io_uring::{opcode, types};
use ublk_sys as sys;

use super::ring::{drain_eventfd, FETCH_REQ};
use super::{Queue, QueueStats, ZeroCopy, WAKE};
use crate::errno::Errno;
use crate::error::{Error, Result};
use crate::target::{settle, Op, Request, Target};

impl Queue {
    /// Issues `FETCH_REQ` for every tag of the queue's share, from this
    /// (the queue's) thread, and reports the kernel's refusal, if any.
    /// START_DEV can complete only after every tag of every queue was
    /// fetched.
    pub fn fetch_all(&mut self) -> Result<()> {
        if self.batch.is_some() {
            return self.prep_and_fetch();
        }
        for tag in self.share.tags(self.depth) {
            let sqe = self.io_sqe(FETCH_REQ, tag, -1);
            self.push(&sqe);
        }
        if let Some(fd) = self.wake {
            let poll = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build().user_data(WAKE);
            self.push(&poll);
        }
        self.arm_notify();
        self.submit().map_err(|e| Error::os("submitting FETCH_REQ", e))?;
        self.live_tags = self.share.count(self.depth);
        // FETCHes complete only when a request arrives; anything here now is
        // a refusal (or the wake-up, if the device is already being torn down).
        let mut refused = None;
        while let Some(cqe) = self.next_cqe() {
            match Token::decode(cqe.user_data()) {
                Token::Wake => self.woken = true,
                Token::Notify => self.arm_notify(),
                Token::Tag(tag) if refused.is_none() => refused = Some((tag, cqe.result())),
                // Before START_DEV nothing else is in flight: a later
                // refusal repeats the first.
                Token::Tag(_)
                | Token::AsyncOp(_)
                | Token::BufReg(_)
                | Token::BufUnreg
                | Token::BatchFetch
                | Token::BatchCmd(_)
                | Token::Cancel
                | Token::OpCancel
                | Token::Unknown(_) => {}
            }
        }
        if let Some((tag, res)) = refused {
            return Err(self.io_error(FETCH_REQ, tag, res));
        }
        Ok(())
    }

    /// Serves requests until the device is stopped (every tag aborted, or
    /// the wake-up eventfd fires), answering each with `target`. Completions
    /// are reaped and commits submitted in batches: one `io_uring_enter` per
    /// batch, no allocation per request.
    ///
    /// A target that needs request data ([`Target::needs_data`]) is refused
    /// on a queue without buffers (a device created with `UBLK_F_USER_COPY`
    /// through [`Queue::new`]).
    pub fn serve<T: Target + ?Sized>(&mut self, target: &T) -> Result<QueueStats> {
        self.check_data(target.needs_data(), false)?;
        self.serve_notify(target, &|| {})
    }

    pub(super) fn check_data(&self, needs_data: bool, zero_copy: bool) -> Result<()> {
        if self.zc != ZeroCopy::Off && needs_data && !zero_copy {
            return Err(Error::InvalidConfig {
                what: "data path",
                why: "the device was created for zero copy (DataPath::ZeroCopy or AutoBufReg): request data stays in the kernel, reached only by an async target's Io::read_at/write_at, but this target reads or writes request data itself; create the device with DataPath::Copy or DataPath::UserCopy, or declare AsyncTarget::zero_copy if the target only uses read_at/write_at".into(),
            });
        }
        if self.zc != ZeroCopy::Off {
            return Ok(());
        }
        if self.bufs.is_none() && needs_data {
            return Err(Error::InvalidConfig {
                what: "data path",
                why: "the device was created with UBLK_F_USER_COPY and the queue has no buffers (DataPath::NoData), so the server gets no data, but this target reads or writes request data; create the device with DataPath::Copy or DataPath::UserCopy".into(),
            });
        }
        Ok(())
    }

    /// [`Queue::serve`], calling `on_panic` at once when the target panics.
    ///
    /// A panicking target does not take the queue down with it: the queue
    /// fails the requests it holds with EIO, calls `on_panic` (the device
    /// starts its teardown) and keeps answering every request with EIO,
    /// without the target, until the device is stopped; then the panic
    /// resumes. A queue thread that died instead would leave the kernel to
    /// fail what it held, which 6.6-6.15 do only if some command of the queue
    /// is still parked, and never while START_DEV's partition scan waits.
    pub(crate) fn serve_notify<T: Target + ?Sized>(&mut self, target: &T, on_panic: &dyn Fn()) -> Result<QueueStats> {
        self.guarded(on_panic, |q| q.serve_inner(target))
    }

    /// Runs `serve` so that a panic in the target fails what the queue holds
    /// (see [`Queue::serve_notify`]), and ends every operation and request
    /// the queue holds before returning.
    pub(super) fn guarded(&mut self, on_panic: &dyn Fn(), serve: impl FnOnce(&mut Self) -> Result<QueueStats>) -> Result<QueueStats> {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve(self)));
        let r = match r {
            Ok(r) => r,
            Err(payload) => {
                self.end_ops();
                self.fail_held();
                on_panic();
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.serve_inner(&FailAll)));
                self.drain();
                std::panic::resume_unwind(payload)
            }
        };
        // Whatever else ended the loop (the device stopping, a refused
        // command), the queue's target operations are over and the requests
        // it holds committed before it returns.
        self.drain();
        // The counts as they are now: `r` holds a copy taken when the loop
        // ended, which misses the requests `drain` just failed (at a stop,
        // those whose operations were still in flight after the grace).
        r.map(|_| self.stats)
    }

    fn serve_inner<T: Target + ?Sized>(&mut self, target: &T) -> Result<QueueStats> {
        let mut stopping = self.woken;
        while (self.live_tags > 0 || self.reactor.in_flight() > 0) && !stopping {
            self.enter_or_fail()?;
            while let Some(cqe) = self.next_cqe() {
                let res = cqe.result();
                match Token::decode(cqe.user_data()) {
                    Token::Wake => {
                        self.on_wake(res);
                        stopping = self.woken;
                    }
                    Token::Notify => {
                        drain_eventfd(self.reactor.ready.efd());
                        self.arm_notify();
                    }
                    Token::Cancel | Token::OpCancel | Token::Unknown(_) => {}
                    Token::AsyncOp(slot) => self.op_completed(slot, res),
                    // A registration an async target started before it
                    // panicked (this loop serves on after a panic): the tag
                    // is answered EIO by the panic's handling, so its pages
                    // need nothing but the record that they are in the ring.
                    Token::BufReg(tag) => {
                        self.registered(tag, res);
                    }
                    Token::BufUnreg => self.unreg_failed(res),
                    Token::BatchFetch => {
                        let tags = self.batch_fetched(res, cqe.flags())?;
                        for &tag in &tags {
                            if let Some(req) = self.on_command(tag, sys::UBLK_IO_RES_OK as i32)? {
                                let result = self.handle_sync(target, &req);
                                self.answer(req.tag, result);
                            }
                        }
                        self.batch_tags_done(tags);
                    }
                    Token::BatchCmd(buf) => self.batch_cmd_done(buf, res)?,
                    Token::Tag(tag) => {
                        if let Some(req) = self.on_command(tag, res)? {
                            let result = self.handle_sync(target, &req);
                            self.answer(req.tag, result);
                        }
                    }
                }
            }
            self.follow();
        }
        Ok(self.stats)
    }

    /// Moves the queue's thread after the load, if it follows it.
    pub(super) fn follow(&mut self) {
        if let Some(f) = &mut self.follower {
            if let Some(m) = f.tick(self.stats.requests()) {
                f.apply(m);
                self.stats.moves += 1;
            }
        }
    }

    /// Runs a sync target on a request; the settled result.
    fn handle_sync<T: Target + ?Sized>(&mut self, target: &T, req: &Request) -> i32 {
        let data = matches!(req.op, Op::Read | Op::Write);
        let buf: &mut [u8] = match &self.bufs {
            // SAFETY: the server owns the tag's request between the CQE that
            // delivered it and our commit, so the kernel does not touch the
            // buffer; this is the only reference made to it, and it ends
            // before the commit.
            Some(b) if data => unsafe { b.slice(req.tag, 0, req.len()) },
            // No data for this op, or no buffers (only targets that need no
            // data run there, see `serve`).
            _ => &mut [],
        };
        let answer = target.handle(req, buf);
        let (result, invalid) = settle(req, answer);
        self.stats.invalid += u64::from(invalid);
        result
    }
}

/// What a queue whose target panicked answers until the device is stopped.
struct FailAll;

impl Target for FailAll {
    fn handle(&self, _req: &Request, _buf: &mut [u8]) -> crate::IoResult {
        Err(Errno::EIO)
    }
    fn needs_data(&self) -> bool {
        false
    }
}

//! Per-request bookkeeping: the io command of each tag, the request it
//! delivers, which requests the queue holds, their answers and their
//! commits (COMMIT_AND_FETCH_REQ, or a batch's COMMIT_IO_CMDS); and, at
//! teardown, the end of the target's operations and of every request the
//! queue still holds.

use super::token::Token;
use std::time::{Duration, Instant};

use io_uring::{squeue, types};
use ublk_sys as sys;

use super::ring::{buf_reg_sqe, drain_eventfd, io_sqe, IoOp, COMMIT_AND_FETCH_REQ};
use super::{Queue, ZeroCopy, BUF_UNREG, CANCEL};
use crate::error::{hints, Cmd, Error, Result};
use crate::target::Request;

/// How long a queue waits for its target's operations to end after
/// cancelling them before it gives up and leaks their memory.
const END_OPS_LIMIT: Duration = Duration::from_secs(30);

impl Queue {
    pub(super) fn io_sqe(&self, op: IoOp, tag: u16, result: i32) -> squeue::Entry {
        // Under AUTO_BUF_REG, the kernel registers the next request's pages
        // at index `tag`; one it cannot register is delivered anyway, with
        // UBLK_IO_F_NEED_REG_BUF (the fallback).
        let sqe_addr = match self.zc {
            ZeroCopy::Auto => sys::abi::auto_buf_reg_sqe_addr(tag, sys::abi::UBLK_AUTO_BUF_REG_FALLBACK),
            _ => 0,
        };
        io_sqe(op, self.encoding, self.q_id, tag, result, self.buf_addr(tag), sqe_addr)
    }

    pub(super) fn io_error(&self, op: IoOp, tag: u16, res: i32) -> Error {
        let errno = -res;
        Error::Kernel {
            cmd: Cmd::Io(op.name),
            dev_id: Some(self.dev_id),
            q_id: Some(self.q_id),
            tag: Some(tag),
            errno,
            hints: hints(Cmd::Io(op.name), errno),
        }
    }

    /// The completion of tag `tag`'s io command: the request it delivered,
    /// if any (decoded, counted and checked; a request the queue answers
    /// itself is committed here).
    pub(super) fn on_command(&mut self, tag: u16, res: i32) -> Result<Option<Request>> {
        self.live_tags -= 1;
        if res == sys::UBLK_IO_RES_OK as i32 {
            self.held[usize::from(tag)] = true;
            Ok(self.decode(tag))
        } else if res == sys::UBLK_IO_RES_ABORT {
            // The device is going away: this tag is done.
            Ok(None)
        } else {
            Err(self.io_error(COMMIT_AND_FETCH_REQ, tag, res))
        }
    }

    /// An operation of the async target completed: route it, and commit its
    /// request if that was the last thing it waited for.
    pub(super) fn op_completed(&mut self, slot: u32, res: i32) {
        if let Some(tag) = self.reactor.complete(slot, res) {
            self.maybe_commit(tag);
        }
    }

    /// Records the tag's answer (bytes or -errno, already settled) and
    /// commits it once none of the request's operations is in flight.
    pub(super) fn answer(&mut self, tag: u16, result: i32) {
        self.answers[usize::from(tag)] = Some(result);
        self.maybe_commit(tag);
    }

    fn maybe_commit(&mut self, tag: u16) {
        let t = usize::from(tag);
        if self.held[t] && self.reactor.tags[t].ops.get() == 0 {
            if let Some(result) = self.answers[t].take() {
                let result = self.copy_out(tag, result);
                self.commit(tag, result);
            }
        }
    }

    /// Cancels the target's operations in flight (one waiting on a socket
    /// whose peer is gone would never end) and reaps them, since their
    /// buffers (the tags', the target's) must not be written after the
    /// queue is gone. Requests delivered meanwhile are held, for `fail_held`.
    pub(super) fn end_ops(&mut self) {
        // Each operation is cancelled by its own user_data: an "any" cancel
        // would also end the queue's polls (the teardown wake-up and the
        // cross-thread notify), which a queue that goes on serving (after a
        // panic) still needs. Cancels are sent again every second (one may
        // race an operation's start); after END_OPS_LIMIT the queue gives up
        // and leaks what the operations may still touch (see Drop).
        let t0 = Instant::now();
        let mut last_cancel: Option<Instant> = None;
        while self.reactor.in_flight() > 0 {
            if last_cancel.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                if t0.elapsed() > END_OPS_LIMIT {
                    return;
                }
                self.reactor.cancel_all(CANCEL);
                last_cancel = Some(Instant::now());
            }
            self.flush_batch();
            let ts = types::Timespec::new().nsec(100_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            let waited = self.reactor.ring.borrow_mut().submitter().submit_with_args(1, &args).map_err(|e| e.raw_os_error());
            match waited {
                Ok(_) | Err(Some(libc::EINTR)) | Err(Some(libc::ETIME)) => {}
                Err(Some(libc::EAGAIN)) | Err(Some(libc::EBUSY)) => std::thread::sleep(Duration::from_millis(1)),
                // The ring cannot wait: leave the buffers alone (see Drop).
                Err(_) => return,
            }
            while let Some(cqe) = self.next_cqe() {
                match Token::decode(cqe.user_data()) {
                    Token::Wake => self.on_wake(cqe.result()),
                    Token::Notify => {
                        drain_eventfd(self.reactor.ready.efd());
                        self.arm_notify();
                    }
                    Token::Cancel | Token::OpCancel | Token::Unknown(_) => {}
                    Token::AsyncOp(slot) => {
                        self.reactor.complete(slot, cqe.result());
                    }
                    Token::BufReg(tag) => {
                        self.registered(tag, cqe.result());
                    }
                    Token::BufUnreg => self.unreg_failed(cqe.result()),
                    Token::BatchFetch => {
                        // Requests delivered meanwhile are held too.
                        if let Ok(tags) = self.batch_fetched(cqe.result(), cqe.flags()) {
                            for &tag in &tags {
                                self.live_tags = self.live_tags.saturating_sub(1);
                                self.held[usize::from(tag)] = true;
                            }
                            self.batch_tags_done(tags);
                        }
                    }
                    Token::BatchCmd(buf) => {
                        let _ = self.batch.as_mut().map(|b| b.cmd_done(buf, cqe.result()));
                    }
                    Token::Tag(tag) => {
                        // A request delivered meanwhile is held too.
                        self.live_tags = self.live_tags.saturating_sub(1);
                        if cqe.result() == sys::UBLK_IO_RES_OK as i32 {
                            self.held[usize::from(tag)] = true;
                        }
                    }
                }
            }
        }
    }

    /// Ends the queue's part in every request it holds: ends its target
    /// operations ([`Queue::end_ops`]), then commits every request it still
    /// holds, with its answer where it has one and EIO otherwise, and
    /// submits. Each commit parks a FETCH again, which the kernel aborts at
    /// STOP_DEV or when the ring is closed; a held request nobody commits
    /// would, on 6.6-6.15, never be failed at all. Needs no target: runs
    /// after a panic and on drop.
    pub(super) fn drain(&mut self) {
        self.end_ops();
        self.fail_held();
    }

    /// Commits EIO for every request the queue holds without an answer and
    /// without an operation in flight, and submits.
    pub(super) fn fail_held(&mut self) {
        for tag in 0..self.depth {
            let t = usize::from(tag);
            if self.held[t] && self.reactor.tags[t].ops.get() == 0 {
                // A stored answer still needs its data moved (USER_COPY).
                let result = match self.answers[t].take() {
                    Some(r) => self.copy_out(tag, r),
                    None => -libc::EIO,
                };
                self.commit(tag, result);
            }
        }
        let _ = self.submit();
    }

    /// Queues the tag's COMMIT_AND_FETCH_REQ with `result`.
    fn commit(&mut self, tag: u16, result: i32) {
        debug_assert!(self.share.owns(tag), "tag {tag} is not this thread's ({:?})", self.share);
        self.held[usize::from(tag)] = false;
        if let Some(index) = self.own_reg[usize::from(tag)].take() {
            // The ring issues SQEs in order and UNREGISTER_IO_BUF completes
            // at once: the pages are out of the table before the commit
            // completes the request. (Its completion is skipped on success.)
            let sqe = buf_reg_sqe(false, self.q_id, tag, index, BUF_UNREG | u64::from(tag));
            self.push(&sqe);
        }
        if result < 0 {
            self.stats.errors += 1;
        }
        let addr = self.buf_addr(tag);
        let index = if self.zc == ZeroCopy::Auto { tag } else { 0 };
        if let Some(b) = &mut self.batch {
            b.commit(tag, index, result, addr);
        } else {
            let sqe = self.io_sqe(COMMIT_AND_FETCH_REQ, tag, result);
            self.push(&sqe);
        }
        self.live_tags += 1;
    }
}

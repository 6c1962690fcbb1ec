//! Driving the queue's ring: pushing and submitting SQEs, reaping
//! completions, the wake-up and notify polls, and waiting for the next
//! completions, asleep in `io_uring_enter` or busy polling.

use std::time::Instant;

use io_uring::{opcode, squeue, types};

use super::{Queue, NOTIFY, WAKE};
use crate::error::{Error, Result};
use crate::placement::Follower;

/// `IORING_ENTER_GETEVENTS` (linux/io_uring.h): run task work, reap.
const IORING_ENTER_GETEVENTS: u32 = 1;

impl Queue {
    pub(super) fn push(&self, sqe: &squeue::Entry) {
        // The command's buffer (`addr`) is this queue's mapping, which lives
        // as long as the ring (or is leaked, see Drop).
        self.reactor.push(sqe);
    }

    pub(super) fn submit(&mut self) -> std::io::Result<usize> {
        self.flush_batch();
        self.reactor.ring.borrow_mut().submit()
    }

    /// Arms the poll on the queue's own eventfd (written by wakers on other
    /// threads).
    pub(super) fn arm_notify(&self) {
        let poll = opcode::PollAdd::new(types::Fd(self.reactor.ready.efd()), libc::POLLIN as u32).build().user_data(NOTIFY);
        self.push(&poll);
    }

    pub(super) fn next_cqe(&self) -> Option<io_uring::cqueue::Entry> {
        self.reactor.ring.borrow_mut().completion().next()
    }

    pub(super) fn enter_or_fail(&mut self) -> Result<()> {
        match self.enter() {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(e) => Err(Error::os("io_uring_enter on the queue ring", e)),
        }
    }

    /// The teardown wake-up poll completed with `res`: the eventfd was
    /// written (stop), or the poll was cancelled, which is no stop: re-arm.
    pub(super) fn on_wake(&mut self, res: i32) {
        if res == -libc::ECANCELED {
            if let Some(fd) = self.wake {
                let poll = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build().user_data(WAKE);
                self.push(&poll);
            }
        } else {
            self.woken = true;
        }
    }

    /// Submits pending commits and gets the next completions.
    ///
    /// Without busy polling: one `io_uring_enter` that submits and sleeps
    /// until a completion. With it: submit and run queued task work without
    /// sleeping; if nothing completed, watch the ring's `IORING_SQ_TASKRUN`
    /// flag, which the kernel sets when it queues work for us (a request
    /// arriving), for up to `busy_poll`, then sleep. A queue thread that is
    /// not asleep needs no wake-up: the submitter only links the request in,
    /// and the round trip loses the scheduler's wake-up latency. Every 64
    /// polls the thread yields, so a runnable task on its CPU (possibly the
    /// very submitter it is waiting for) is not held off. A thread at home
    /// ([`crate::Placement::Auto`]) shares its CPU with its submitter and
    /// always sleeps.
    fn enter(&mut self) -> std::io::Result<()> {
        let at_home = self.follower.as_ref().is_some_and(Follower::at_home);
        if !self.busy_poll.is_zero() && !at_home && self.poll()? {
            self.stats.polled += 1;
            return Ok(());
        }
        self.flush_batch();
        self.stats.enters += 1;
        self.stats.waits += 1;
        self.reactor.ring.borrow_mut().submit_and_wait(1)?;
        Ok(())
    }

    /// Submits, then polls for completions for up to `busy_poll`; whether
    /// any arrived.
    fn poll(&mut self) -> std::io::Result<bool> {
        self.flush_batch();
        let n = self.reactor.ring.borrow_mut().submission().len() as u32;
        self.enter_nowait(n)?;
        let t0 = Instant::now();
        let mut polls = 0u32;
        loop {
            // Completions come from task work we ran (below), or, without
            // DEFER_TASKRUN, from task work run on the way out of any
            // syscall (sched_yield below).
            let (empty, taskrun) = {
                let mut ring = self.reactor.ring.borrow_mut();
                let empty = ring.completion().is_empty();
                let taskrun = ring.submission().taskrun();
                (empty, taskrun)
            };
            if !empty {
                return Ok(true);
            }
            if taskrun {
                self.enter_nowait(0)?;
            }
            std::hint::spin_loop();
            polls = polls.wrapping_add(1);
            if polls % 64 == 0 {
                if t0.elapsed() >= self.busy_poll {
                    break;
                }
                // SAFETY: sched_yield takes no arguments and cannot fail in a
                // way that matters here.
                unsafe { libc::sched_yield() };
            }
        }
        Ok(false)
    }

    pub(super) fn enter_nowait(&mut self, to_submit: u32) -> std::io::Result<()> {
        self.stats.enters += 1;
        let ring = self.reactor.ring.borrow();
        // SAFETY: no argument pointer is passed; io_uring_enter only submits
        // SQEs already pushed (valid per `push`) and runs task work.
        unsafe { ring.submitter().enter::<libc::sigset_t>(to_submit, 0, IORING_ENTER_GETEVENTS, None)? };
        Ok(())
    }
}

//! Tag sharing: which of a queue's tags one thread serves ([`TagShare`]),
//! and the refusal of several threads per queue where the kernel has no
//! per-I/O daemons.

use ublk_sys as sys;

use crate::ctrl::DevInfo;
use crate::error::{Error, Result};

/// Which of a queue's tags one thread serves: those `t` with
/// `t % threads == thread`. [`TagShare::ALL`] (thread 0 of 1) is the whole
/// queue; `threads > 1` needs the kernel's per-I/O daemons
/// (`UBLK_F_PER_IO_DAEMON`, Linux 6.16+), which deliver each tag's requests
/// to the task that fetched it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagShare {
    /// This thread's index, `0..threads`.
    pub thread: u16,
    /// Threads serving the queue.
    pub threads: u16,
}

impl TagShare {
    /// Every tag, one thread.
    pub const ALL: TagShare = TagShare { thread: 0, threads: 1 };

    /// Whether `tag` is this thread's.
    pub fn owns(self, tag: u16) -> bool {
        tag % self.threads == self.thread
    }

    /// This thread's tags of a queue of `depth` tags.
    pub fn tags(self, depth: u16) -> impl Iterator<Item = u16> {
        (self.thread..depth).step_by(usize::from(self.threads.max(1)))
    }

    /// How many tags of a queue of `depth` this thread has.
    pub fn count(self, depth: u16) -> u16 {
        depth.saturating_sub(self.thread).div_ceil(self.threads.max(1))
    }

    /// Checks the share against the device: `thread < threads <= depth`,
    /// and `threads > 1` only where the kernel has per-I/O daemons.
    pub(crate) fn check(self, info: &DevInfo) -> Result<()> {
        if self.threads == 0 || self.thread >= self.threads || self.threads > info.queue_depth {
            return Err(Error::InvalidConfig {
                what: "threads per queue",
                why: format!(
                    "thread {} of {} for a queue of {} tags: use 1..={} threads, each thread an index below their number",
                    self.thread, self.threads, info.queue_depth, info.queue_depth
                ),
            });
        }
        if self.threads > 1 && info.flags & sys::abi::UBLK_F_BATCH_IO != 0 {
            return Err(batch_threads_refused(self.threads));
        }
        if self.threads > 1 && info.flags & sys::abi::UBLK_F_PER_IO_DAEMON == 0 {
            return Err(per_io_unsupported(self.threads));
        }
        Ok(())
    }
}

/// The refusal of several threads per queue on a batch device
/// (`UBLK_F_BATCH_IO`), which has no per-I/O daemons.
pub(crate) fn batch_threads_refused(threads: u16) -> Error {
    Error::InvalidConfig {
        what: "threads per queue",
        why: format!(
            "{threads} threads per queue with batched commands: a batch device serves each queue from one thread (the kernel drops UBLK_F_PER_IO_DAEMON for UBLK_F_BATCH_IO); drop --batch or use 1 thread per queue (spread the load with more queues: --queues)"
        ),
    }
}

/// The refusal of several threads per queue on a kernel (or a device)
/// without `UBLK_F_PER_IO_DAEMON`.
pub(crate) fn per_io_unsupported(threads: u16) -> Error {
    Error::Unsupported {
        feature: "UBLK_F_PER_IO_DAEMON",
        why: format!(
            "{threads} threads per queue need the kernel's per-I/O daemons (Linux 6.16+: each tag served by the thread that fetched it); this kernel ({}) serves a whole queue from one thread: use 1 thread per queue (spread the load with more queues: --queues), or Linux 6.16 or later",
            crate::ctrl::kernel_release()
        ),
    }
}

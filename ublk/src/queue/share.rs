//! Tag sharing: which of a queue's tags one thread serves ([`TagShare`]),
//! the check of the threads per queue against the depth, and the refusal
//! of several threads per queue where the kernel has no per-I/O daemons.

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
        if self.thread >= self.threads || !threads_fit(self.threads, info.queue_depth) {
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

/// Whether `threads` threads can serve a queue of `depth` tags: 1..=depth
/// (a thread without tags would serve nothing). The one place of the rule,
/// for [`check_threads`] and [`TagShare::check`] (each with its own
/// message: the latter names the thread too).
fn threads_fit(threads: u16, depth: u16) -> bool {
    (1..=depth).contains(&threads)
}

/// Threads per queue, before there is a device to check a [`TagShare`]
/// against (or before a recovery starts): 1..=depth.
pub(crate) fn check_threads(n: u16, depth: u16) -> Result<()> {
    if !threads_fit(n, depth) {
        return Err(Error::InvalidConfig {
            what: "threads per queue",
            why: format!("{n} threads for queues of {depth} tags: use 1..={depth} (each thread serves at least one tag)"),
        });
    }
    Ok(())
}

/// The refusal of several threads per queue on a batch device
/// (`UBLK_F_BATCH_IO`), which has no per-I/O daemons.
pub(crate) fn batch_threads_refused(threads: u16) -> Error {
    Error::InvalidConfig {
        what: "threads per queue",
        why: format!(
            "{threads} threads per queue with batched commands: a batch device serves each queue from one thread (the kernel drops UBLK_F_PER_IO_DAEMON for UBLK_F_BATCH_IO); use 1 thread per queue (spread the load with more queues: --queues), or a device without batched commands (made without --batch; on Linux 7.0+, where they are the default, with --no-batch / batch_io(false))"
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

#[cfg(test)]
mod tests {
    use super::*;

    fn why(r: Result<()>) -> String {
        match r {
            Err(Error::InvalidConfig { what: "threads per queue", why }) => why,
            r => panic!("{r:?}"),
        }
    }

    /// The depth rule, checked by both with their own messages.
    #[test]
    fn threads_fit_the_depth() {
        assert!(check_threads(1, 1).is_ok() && check_threads(4, 4).is_ok());
        assert_eq!(why(check_threads(0, 4)), "0 threads for queues of 4 tags: use 1..=4 (each thread serves at least one tag)");
        assert_eq!(why(check_threads(5, 4)), "5 threads for queues of 4 tags: use 1..=4 (each thread serves at least one tag)");
        let info = DevInfo { queue_depth: 4, flags: sys::abi::UBLK_F_PER_IO_DAEMON, ..Default::default() };
        assert!(TagShare { thread: 0, threads: 1 }.check(&info).is_ok());
        assert!(TagShare { thread: 3, threads: 4 }.check(&info).is_ok());
        let share = |thread, threads| why(TagShare { thread, threads }.check(&info));
        assert_eq!(share(0, 0), "thread 0 of 0 for a queue of 4 tags: use 1..=4 threads, each thread an index below their number");
        assert_eq!(share(0, 5), "thread 0 of 5 for a queue of 4 tags: use 1..=4 threads, each thread an index below their number");
        assert_eq!(share(2, 2), "thread 2 of 2 for a queue of 4 tags: use 1..=4 threads, each thread an index below their number");
    }
}

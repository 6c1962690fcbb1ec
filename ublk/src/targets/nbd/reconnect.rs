//! Making a lost connection again ([`NbdOptions::reconnect`](super::NbdOptions::reconnect)): with
//! backoff, once nothing uses the old one, then re-issuing every request
//! that has no reply yet.

use std::future::poll_fn;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use super::connect::connect_one;
use super::tag::St;
use super::NbdQueue;
use crate::aio::Ring;

impl NbdQueue<'_> {
    /// Makes the lost connection again (blocking connect and handshake,
    /// retried with backoff from 100 ms to 5 s) once nothing uses the old
    /// one, then re-issues every request that has no reply yet. A server
    /// that takes connections and loses them before any reply is met with
    /// the same backoff, not a busy loop.
    pub(super) async fn reconnect(&self, ring: Ring<'_>) {
        poll_fn(|cx| {
            // The writer's batch, between sends too (waiting for room in
            // the ring), is given up once it sees the connection `down`.
            if (self.hold.get() || self.batch.get()) && !self.dead.get() {
                self.park_bg(cx);
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        let mut opts = self.nbd.opts.clone();
        opts.timeout = opts.timeout.min(Duration::from_secs(2));
        // Zero unless the last connection made again was lost before any
        // reply came (a server that accepts and drops): then wait first.
        let mut delay = self.backoff.get();
        let next = |d: Duration| (d * 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
        while !self.dead.get() {
            if !delay.is_zero() {
                let _ = ring.sleep(delay).await;
                if self.dead.get() {
                    break;
                }
            }
            match connect_one(&opts) {
                Ok((fd, info))
                    if (info.size, info.flags, info.structured) == (self.nbd.info.size, self.nbd.info.flags, self.nbd.info.structured) =>
                {
                    // Nothing uses the old socket (waited for above; the
                    // reader is here): closing it is safe.
                    self.sock_fd.set(fd.as_raw_fd());
                    *self.sock.borrow_mut() = fd;
                    break;
                }
                Ok((_, info)) => {
                    let i = &self.nbd.info;
                    self.fail(|| {
                        format!(
                            "the export changed while reconnecting (size {} -> {}, flags {:#x} -> {:#x}, structured replies {} -> {})",
                            i.size, info.size, i.flags, info.flags, i.structured, info.structured
                        )
                    });
                    return;
                }
                Err(_) => delay = next(delay),
            }
        }
        if self.dead.get() {
            return;
        }
        self.backoff.set(next(delay));
        self.torn.set(false);
        // Every request without a reply goes out again, with a new cookie.
        let mut q = self.sendq.borrow_mut();
        q.clear();
        for (tag, t) in self.tags.iter().enumerate() {
            if t.st.get() == St::Waiting {
                t.gen.set(t.gen.get().wrapping_add(1));
                t.sent.set(false);
                t.reset_reply();
                q.push_back(tag as u16);
            }
        }
        drop(q);
        self.down.set(false);
        self.nbd.reconnects.fetch_add(1, Ordering::Relaxed);
        self.wake_bg();
    }
}

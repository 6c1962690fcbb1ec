//! A disk on an NBD server (`qemu-nbd`, `nbd-server`, `nbdkit`...): an
//! [async target](crate::aio) that speaks the NBD protocol over TCP or a
//! unix socket, one connection per queue, all of it on the queue's ring.
//!
//! * **Setup** ([`Nbd::connect`]): a blocking connect and the fixed newstyle
//!   handshake per connection: structured replies where the server offers
//!   them (`NBD_OPT_STRUCTURED_REPLY`), then `NBD_OPT_GO` (asking for the
//!   server's block size constraints), or `NBD_OPT_EXPORT_NAME` where the
//!   server lacks GO. The export's size and transmission flags shape the device
//!   ([`Nbd::builder`]): a read-only export is a read-only device,
//!   `SEND_FLUSH` gives a volatile write cache (honouring FUA with
//!   `SEND_FUA`), `SEND_TRIM` and `SEND_WRITE_ZEROES` the discard and
//!   write-zeroes limits; more than one connection needs `CAN_MULTI_CONN`.
//! * **Transmission**: each request is sent with the cookie (queue,
//!   generation, tag); requests are pipelined, written by a per-queue
//!   writer that gathers every queued header and WRITE payload into one
//!   `sendmsg` (one linked chain under zero copy, below), and answered out
//!   of order. The queue's background task
//!   ([`QueueTarget::run`](crate::aio::QueueTarget::run)) receives replies in bulk (as many as the
//!   connection holds, up to 64 KiB, with one receive), finds each
//!   request by its cookie, copies a READ's data into the request's own
//!   buffer and wakes it; a long rest of a payload that has not arrived yet
//!   the request receives itself, straight into its data (`MSG_WAITALL`),
//!   while the reader waits. With structured replies a READ's reply is any
//!   number of chunks, in any order: data at an offset, holes (zeroed
//!   here), errors, and the last one flagged DONE. Nothing is allocated
//!   per request.
//! * **Zero copy** ([`DataPath::ZeroCopy`](crate::DataPath::ZeroCopy),
//!   [`DataPath::AutoBufReg`](crate::DataPath::AutoBufReg)): the request's
//!   data stays in the kernel's pages. A READ's payload is read from the
//!   socket straight into them (READ_FIXED) by the request itself while the
//!   reader waits, and the writer sends a batch as one linked chain: the
//!   headers up to a WRITE's (`sendmsg`), its payload from its pages
//!   (WRITE_FIXED), the next headers, and so on. One copy (socket to
//!   pages), as in the kernel's nbd client. Holes are zeroed there from `/dev/zero`
//!   by the request once its reply is complete, while the reader goes on
//!   (a reply of more than eight holes has the rest zeroed at once, the
//!   reader waiting). The reader then receives each reply's header on its own (it
//!   never takes more than the longest header that can come before a
//!   payload), so small requests cost more operations than in the copy
//!   data path; large ones save a copy.
//! * **Zero copy with user copy** (a zero-copy data path and
//!   `UBLK_F_USER_COPY` in [`DeviceBuilder::flags`](crate::DeviceBuilder::flags),
//!   `ublk add -t nbd`'s default where the kernel has both): each request's
//!   data moves the cheaper way for its size. A WRITE of up to 16 KiB is
//!   copied out of its pages (`pread` of `/dev/ublkcN` at its
//!   [`user_copy_offset`](crate::queue::user_copy_offset)) and sent with its
//!   header in the batch's `sendmsg`, a longer one from its pages. While no
//!   READ of 32 KiB or more waits for its reply, the reader receives in
//!   bulk as in the copy data path and writes each payload into its pages
//!   (`pwrite` of `/dev/ublkcN`); while one does, it receives header by
//!   header, so that a long payload goes straight into its pages.
//! * **Errors**: the server's error for a request (or a reply's first error
//!   chunk) becomes that request's errno. A malformed reply (wrong magic, a
//!   short header, a cookie that matches no request in flight, a short
//!   payload; a chunk outside its request or over an earlier chunk, a
//!   chunk after the last one, a READ done without all its data, an unknown
//!   chunk type that is not an error) or a lost connection closes the
//!   connection and fails every request in flight and every later one with
//!   EIO; no reply is ever written into a buffer other than its own
//!   request's, nor beyond its length.
//! * **Shutdown**: when a queue stops, its connection ends with
//!   `NBD_CMD_DISC`.

// Where the target's parts are: this file has the `Nbd` target itself (its
// setup, what fits the export, the queues' connections);
// * `options`: `NbdAddr` and `NbdOptions`, how to reach the export;
// * `connect`: one connection through the handshake;
// * `queue`: `NbdQueue`, one queue's connection, its requests and its end;
// * `tag`: one tag's request as the connection sees it;
// * `writer`: the requests' writer (gathered `sendmsg`s, linked chains under zero copy);
// * `reader`: the replies' reader (simple replies and structured chunks);
// * `reconnect`: making a lost connection again;
// * `stats`: `NbdStats`;
// * `proto`: the wire protocol.
mod connect;
mod options;
mod proto;
mod queue;
mod reader;
mod reconnect;
mod stats;
mod tag;
mod writer;

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use connect::connect_one;
pub use options::{NbdAddr, NbdOptions};
pub use proto::{flags, ExportInfo};
pub use queue::NbdQueue;
pub use stats::NbdStats;

use crate::aio::{AsyncTarget, QueueContext};
use crate::error::{Error, Result};
use crate::params::{validate_block_size, Discard};
use crate::target::WriteCache;
use crate::{Attrs, DeviceBuilder, Placement};

/// An NBD export as a ublk target. See the [module docs](self).
#[derive(Debug)]
pub struct Nbd {
    opts: NbdOptions,
    info: ExportInfo,
    /// Connections made at setup, taken by the queues (one each).
    conns: Mutex<Vec<Option<OwnedFd>>>,
    /// Why a connection was closed, the first time one was.
    failure: Mutex<Option<String>>,
    /// Connections made again after one was lost.
    reconnects: AtomicU64,
    /// The queues' counts, added as each queue ends.
    stats: Mutex<NbdStats>,
}

impl Nbd {
    /// Connects (`opts.connections` connections, blocking, each within
    /// `opts.timeout`) and goes through the handshake on each. Errors name
    /// the server and what went wrong: unreachable, refused export (with
    /// the server's reason), a server that closed the connection
    /// mid-handshake, or one that does not allow several connections.
    pub fn connect(opts: &NbdOptions) -> Result<Nbd> {
        let n = opts.connections;
        if n == 0 {
            return Err(Error::InvalidConfig { what: "NBD connections", why: "0 connections; use at least 1".into() });
        }
        let (first, info) = connect_one(opts)?;
        if n > 1 && info.flags & flags::CAN_MULTI_CONN == 0 {
            return Err(Error::InvalidConfig {
                what: "NBD connections",
                why: format!(
                    "{}: the server does not advertise NBD_FLAG_CAN_MULTI_CONN, so {n} connections could see each other's writes out of order; use one connection (--connections 1), or a server that allows more (qemu-nbd --shared={n}, nbd-server)",
                    opts.addr
                ),
            });
        }
        let mut conns = vec![Some(first)];
        for _ in 1..n {
            let (fd, other) = connect_one(opts)?;
            if (other.size, other.flags, other.structured) != (info.size, info.flags, info.structured) {
                return Err(Error::InvalidConfig {
                    what: "NBD export",
                    why: format!(
                        "{}: the export changed between connections (size {} -> {}, flags {:#x} -> {:#x}, structured replies {} -> {})",
                        opts.addr, info.size, other.size, info.flags, other.flags, info.structured, other.structured
                    ),
                });
            }
            conns.push(Some(fd));
        }
        Ok(Nbd {
            opts: opts.clone(),
            info,
            conns: Mutex::new(conns),
            failure: Mutex::new(None),
            reconnects: AtomicU64::new(0),
            stats: Mutex::new(NbdStats::default()),
        })
    }

    /// What the server said of the export.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// Whether the server offers only reading.
    pub fn read_only(&self) -> bool {
        self.info.flags & flags::READ_ONLY != 0
    }

    /// Why a connection was closed (a malformed reply, the server gone...),
    /// the first time one was; `None` while all is well.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How many times a lost connection was made again
    /// ([`NbdOptions::reconnect`]).
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// What the connections did, summed over the queues that have ended
    /// (all of them once the device is served no more).
    pub fn stats(&self) -> NbdStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A builder for a device that fits the export: one queue per
    /// connection, the export's size, `block_size`-byte logical blocks
    /// (refused if the server's minimum block is larger, or if the size is
    /// not a multiple of it), requests no larger than the server's maximum
    /// payload, read-only and rotational as the server says, discard and
    /// write-zeroes limits where it offers TRIM and WRITE_ZEROES. Its queue
    /// threads wait for the server rather than compute, so they neither
    /// busy-poll (a server on the same machine needs the CPU they would
    /// spin on) nor go home next to a busy submitter: [`Placement::Away`]
    /// (with two connections and two submitters, [`Placement::Auto`]'s
    /// move home cost 4k requests 5-13% of their rate under `--icount`;
    /// docs/performance.md). Set depth, placement and the like on it;
    /// calling `attrs`, `discard`, `size`, `queues`, `busy_poll` or
    /// `placement` again overrides these.
    pub fn builder(&self, block_size: u32) -> Result<DeviceBuilder> {
        validate_block_size(block_size)?;
        let i = &self.info;
        if i.min_block > block_size {
            if i.min_block > 4096 {
                return Err(Error::Unsupported {
                    feature: "NBD minimum block size",
                    why: format!("the server's minimum block size is {}, larger than the 4096 a ublk device can have", i.min_block),
                });
            }
            return Err(Error::InvalidConfig {
                what: "block size",
                why: format!(
                    "{block_size} is below the NBD server's minimum block size of {}; use --block-size {}",
                    i.min_block, i.min_block
                ),
            });
        }
        if i.size == 0 || i.size % u64::from(block_size) != 0 {
            return Err(Error::InvalidConfig {
                what: "NBD export size",
                why: format!(
                    "the export's {} bytes are not a positive multiple of the block size {block_size}; resize the export to a multiple of {block_size}",
                    i.size
                ),
            });
        }
        let max_io = i.max_payload.min(512 << 10) & !4095;
        if max_io < 4096 {
            return Err(Error::Unsupported {
                feature: "NBD maximum payload",
                why: format!("the server takes at most {} bytes per request, below the 4096 a ublk device needs", i.max_payload),
            });
        }
        let mut attrs = Attrs::empty();
        if i.flags & flags::READ_ONLY != 0 {
            attrs |= Attrs::READ_ONLY;
        }
        if i.flags & flags::ROTATIONAL != 0 {
            attrs |= Attrs::ROTATIONAL;
        }
        let trim = i.flags & flags::SEND_TRIM != 0 && i.flags & flags::READ_ONLY == 0;
        let zeroes = i.flags & flags::SEND_WRITE_ZEROES != 0 && i.flags & flags::READ_ONLY == 0;
        // 1 GiB: well inside NBD's 32-bit lengths, aligned to any block size.
        const MAX_SECTORS: u32 = 1 << 21;
        let discard = (trim || zeroes).then(|| Discard {
            alignment: 0,
            granularity: block_size.max(i.preferred_block.min(64 << 10)),
            max_discard_sectors: if trim { MAX_SECTORS } else { 0 },
            max_write_zeroes_sectors: if zeroes { MAX_SECTORS } else { 0 },
            max_discard_segments: 1,
        });
        Ok(DeviceBuilder::new()
            .queues(self.opts.connections)
            .size(i.size)
            .block_size(block_size)
            .max_io_bytes(max_io)
            .attrs(attrs)
            .discard(discard)
            .busy_poll(Duration::ZERO)
            .placement(Placement::Away))
    }

    fn record_failure(&self, why: String) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(why);
        }
    }
}

/// Whether SIGPIPE is ignored (or handled) in this process, rather than
/// left to kill it.
fn sigpipe_ignored() -> bool {
    // SAFETY: sigaction is plain integers, pointers and a mask: all zeros is
    // a valid value.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: with no new action, sigaction(2) only reads the disposition
    // into `old`, which we own.
    let r = unsafe { libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut old) };
    r == 0 && old.sa_sigaction != libc::SIG_DFL
}

impl AsyncTarget for Nbd {
    type Queue<'a> = NbdQueue<'a>;

    fn queue(&self, q: &QueueContext) -> io::Result<NbdQueue<'_>> {
        if q.user_copy && !q.zero_copy {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the NBD target moves request data in the queue's buffers or, under zero copy, in the request's pages: make the device with DataPath::Copy or a zero-copy data path",
            ));
        }
        let sock = self.conns.lock().unwrap_or_else(|e| e.into_inner()).get_mut(usize::from(q.q_id)).and_then(Option::take);
        let Some(sock) = sock else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "queue {} has no NBD connection (the target has {}): make the device with one queue per connection (Nbd::builder)",
                    q.q_id, self.opts.connections
                ),
            ));
        };
        // Under zero copy, holes are zeroed in the request's pages from
        // /dev/zero (the pages are not in this process).
        let zero = if q.zero_copy {
            // A WRITE's payload goes out with WRITE_FIXED, a write(2) on the
            // socket, which raises SIGPIPE when the server has gone: that must
            // not kill the process (a Rust program ignores SIGPIPE unless it
            // asked otherwise).
            if !sigpipe_ignored() {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "NBD zero copy writes payloads with write(2) on the socket, which raises SIGPIPE when the server goes away, and SIGPIPE is not ignored in this process: ignore it (signal(SIGPIPE, SIG_IGN), as Rust programs do by default), or use DataPath::Copy",
                ));
            }
            Some(
                std::fs::File::open("/dev/zero")
                    .map(OwnedFd::from)
                    .map_err(|e| io::Error::new(e.kind(), format!("opening /dev/zero: {e}")))?,
            )
        } else {
            None
        };
        // Zero copy with user copy too: small payloads through this process.
        let mixed = match q.char_dev() {
            Some(c) if q.user_copy && q.zero_copy => Some(queue::Mixed::new(
                c.try_clone_to_owned().map_err(|e| io::Error::new(e.kind(), format!("duplicating /dev/ublkc{}: {e}", q.dev_id)))?,
                q.depth,
            )),
            _ => None,
        };
        Ok(NbdQueue::new(self, sock, q, zero, mixed))
    }

    /// Under `UBLK_F_USER_COPY` (which the target takes only together with
    /// zero copy) the target moves small payloads itself, by `pread` and
    /// `pwrite` of `/dev/ublkcN`: it needs no buffers, but the char device.
    fn user_copies_itself(&self) -> bool {
        true
    }

    /// Request data moves with READ_FIXED/WRITE_FIXED on the request's
    /// pages under zero copy: replies' payloads are read from the socket
    /// straight into them, WRITE payloads written from them to the socket,
    /// with no copy in this process (each reply's header is then received
    /// on its own, so small requests cost more operations than in the copy
    /// data path, large ones a copy less). Without zero copy the target
    /// needs the queue's buffers ([`DataPath::Copy`](crate::DataPath::Copy)):
    /// it refuses user copy, which [`DataPath::best`](crate::DataPath::best)
    /// picks for a zero-copy target on 6.5–6.14, so choose the data path
    /// for NBD yourself (the CLI takes auto-buf-reg with user copy beside
    /// it where the kernel has both, else copy).
    fn zero_copy(&self) -> bool {
        true
    }

    fn write_cache(&self) -> WriteCache {
        let f = self.info.flags;
        match (f & flags::SEND_FLUSH != 0, f & flags::SEND_FUA != 0) {
            (false, _) => WriteCache::None,
            (true, false) => WriteCache::Volatile,
            (true, true) => WriteCache::VolatileFua,
        }
    }
}

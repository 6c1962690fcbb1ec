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
//!   `sendmsg`, and answered out of order. The queue's background task
//!   ([`QueueTarget::run`]) receives replies in bulk (as many as the
//!   connection holds, up to 64 KiB, with one receive), finds each
//!   request by its cookie, copies a READ's data into the request's own
//!   buffer and wakes it; a long rest of a payload that has not arrived yet
//!   the request receives itself, straight into its data (`MSG_WAITALL`),
//!   while the reader waits. With structured replies a READ's reply is any
//!   number of chunks, in any order: data at an offset, holes (zeroed
//!   here), errors, and the last one flagged DONE. Nothing is allocated
//!   per request.
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

mod proto;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use io_uring::{opcode, types};

use proto::*;
pub use proto::{flags, ExportInfo};

use crate::aio::{AsyncTarget, Io, IoBuf, IoBufMut, QueueContext, QueueTarget, Ring};
use crate::errno::Errno;
use crate::error::{Error, Result};
use crate::params::{validate_block_size, Discard};
use crate::target::{IoResult, Op, WriteCache};
use crate::{Attrs, DeviceBuilder};

/// Where the NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// A TCP host (name or address) and port (10809 is NBD's).
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix socket.
    Unix(PathBuf),
}

impl std::fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddr::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
            NbdAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// How to reach the export.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// The server.
    pub addr: NbdAddr,
    /// The export's name (empty: the server's default export).
    pub export: String,
    /// Connections, one per queue (default 1). More than one needs a server
    /// that advertises `NBD_FLAG_CAN_MULTI_CONN`.
    pub connections: u16,
    /// Time limit for connecting and for each step of the handshake.
    pub timeout: Duration,
    /// On a lost connection (the server gone, a reset, an end of stream),
    /// reconnect with backoff and re-issue the requests in flight, which
    /// wait meanwhile, instead of failing them with EIO. A reply that
    /// breaks the protocol still ends the connection for good.
    pub reconnect: bool,
    /// Ask for structured replies (`NBD_OPT_STRUCTURED_REPLY`, default on):
    /// READs answered in chunks of data, holes (not sent as zeros) and
    /// errors. A server that does not offer them answers with simple
    /// replies; off, every server does.
    pub structured_replies: bool,
}

impl NbdOptions {
    /// A TCP server, default export, one connection, 10 s time limit.
    pub fn tcp(host: &str, port: u16) -> NbdOptions {
        NbdOptions::new(NbdAddr::Tcp { host: host.to_string(), port })
    }

    /// A unix-socket server, default export, one connection, 10 s time limit.
    pub fn unix(path: impl Into<PathBuf>) -> NbdOptions {
        NbdOptions::new(NbdAddr::Unix(path.into()))
    }

    fn new(addr: NbdAddr) -> NbdOptions {
        NbdOptions {
            addr,
            export: String::new(),
            connections: 1,
            timeout: Duration::from_secs(10),
            reconnect: false,
            structured_replies: true,
        }
    }

    /// Names the export.
    pub fn export(mut self, name: &str) -> NbdOptions {
        self.export = name.to_string();
        self
    }

    /// Sets the number of connections (and so of queues).
    pub fn connections(mut self, n: u16) -> NbdOptions {
        self.connections = n;
        self
    }

    /// Reconnects after a lost connection (see [`NbdOptions::reconnect`]).
    pub fn reconnect(mut self, on: bool) -> NbdOptions {
        self.reconnect = on;
        self
    }

    /// Asks for structured replies or not (see
    /// [`NbdOptions::structured_replies`]).
    pub fn structured_replies(mut self, on: bool) -> NbdOptions {
        self.structured_replies = on;
        self
    }
}

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

fn handshake_error(addr: &NbdAddr, e: HandshakeError, timeout: Duration) -> Error {
    match e {
        HandshakeError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Error::os(
            format!("NBD handshake with {addr}: the server did not answer within {} s", timeout.as_secs_f32()),
            io::Error::from(io::ErrorKind::TimedOut),
        ),
        HandshakeError::Io(e) if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) => Error::os(
            format!("NBD handshake with {addr}"),
            io::Error::new(e.kind(), "the server closed the connection during the handshake"),
        ),
        HandshakeError::Io(e) => Error::os(format!("NBD handshake with {addr}"), e),
        HandshakeError::Closed(during) => Error::os(
            format!("NBD handshake with {addr}"),
            io::Error::new(io::ErrorKind::UnexpectedEof, format!("the server closed the connection {during}")),
        ),
        HandshakeError::Refused(why) => Error::InvalidConfig { what: "NBD export", why: format!("{addr}: {why}") },
    }
}

/// One connection through the handshake: the socket, in blocking mode and
/// without time limits, ready for the transmission phase.
fn connect_one(opts: &NbdOptions) -> Result<(OwnedFd, ExportInfo)> {
    let addr = &opts.addr;
    let t = opts.timeout;
    let sockopt = |e| Error::os("setting socket options", e);
    match addr {
        NbdAddr::Tcp { host, port } => {
            let addrs: Vec<_> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| Error::os(format!("resolving the NBD server's address {addr}"), e))?
                .collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address");
            let mut stream = None;
            for a in addrs {
                match TcpStream::connect_timeout(&a, t) {
                    Ok(s) => {
                        stream = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let mut s = stream.ok_or_else(|| Error::os(format!("connecting to the NBD server {addr}"), last))?;
            s.set_nodelay(true).map_err(sockopt)?;
            s.set_read_timeout(Some(t)).and_then(|_| s.set_write_timeout(Some(t))).map_err(sockopt)?;
            let info = handshake(&mut s, &opts.export, opts.structured_replies).map_err(|e| handshake_error(addr, e, t))?;
            s.set_read_timeout(None).and_then(|_| s.set_write_timeout(None)).map_err(sockopt)?;
            Ok((s.into(), info))
        }
        NbdAddr::Unix(path) => {
            let mut s = UnixStream::connect(path).map_err(|e| Error::os(format!("connecting to the NBD server {addr}"), e))?;
            s.set_read_timeout(Some(t)).and_then(|_| s.set_write_timeout(Some(t))).map_err(sockopt)?;
            let info = handshake(&mut s, &opts.export, opts.structured_replies).map_err(|e| handshake_error(addr, e, t))?;
            s.set_read_timeout(None).and_then(|_| s.set_write_timeout(None)).map_err(sockopt)?;
            Ok((s.into(), info))
        }
    }
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
    /// write-zeroes limits where it offers TRIM and WRITE_ZEROES. Set depth,
    /// placement and the like on it; calling `attrs`, `discard`, `size` or
    /// `queues` again overrides what fits the export.
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
            .discard(discard))
    }

    fn record_failure(&self, why: String) {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(why);
        }
    }
}

impl AsyncTarget for Nbd {
    type Queue<'a> = NbdQueue<'a>;

    fn queue(&self, q: &QueueContext) -> io::Result<NbdQueue<'_>> {
        if q.user_copy {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the NBD target sends and receives request data in the queue's buffers: make the device with DataPath::Copy",
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
        Ok(NbdQueue::new(self, sock, q))
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

/// Where a request stands with the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// No request, or one not sent yet.
    Idle,
    /// Queued or sent; its reply has not come.
    Waiting,
    /// Its reply came (the last chunk of a structured reply), with this NBD
    /// error (0: success); a READ's data is in its buffer.
    Replied(u32),
    /// Part of a READ's payload ([`Tag::payload`]) is next on the
    /// connection, for the request to receive straight into its data.
    Payload,
}

/// One tag's request as the connection sees it.
struct Tag {
    st: Cell<St>,
    cmd: Cell<u16>,
    flags: Cell<u16>,
    offset: Cell<u64>,
    len: Cell<u32>,
    /// The request's data (its own buffer, `len` bytes): a WRITE's, which
    /// the writer sends, or the one a READ fills, which the reader writes
    /// (copies out of its receive buffer, zeros for holes) while the
    /// request's future waits for its reply: the request is not answered,
    /// so its buffer not reused, before the reader is done with it
    /// (`St::Replied`), and the future holds no reference into the data
    /// meanwhile. Null for other commands.
    data: Cell<*mut u8>,
    /// Of a READ's reply so far: the ranges of its data that chunks filled
    /// (sorted, disjoint, adjacent ones merged), and the first error chunk's
    /// error (0: none).
    covered: RefCell<Vec<(u32, u32)>>,
    err: Cell<u32>,
    /// Where in the data the payload of [`St::Payload`] goes: (offset, length).
    payload: Cell<(u32, u32)>,
    /// Bumped per request: part of the cookie, so a late or repeated reply
    /// for an earlier request on this tag matches nothing.
    gen: Cell<u32>,
    /// Whether the writer is done with the request (sent, or given up): its
    /// data is not read any more.
    sent: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Tag {
    fn park(&self, cx: &Context<'_>) {
        let mut w = self.waker.borrow_mut();
        if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *w = Some(cx.waker().clone());
        }
    }
    fn wake(&self) {
        if let Some(w) = self.waker.borrow().as_ref() {
            w.wake_by_ref();
        }
    }

    /// A new request or a re-issued one: no part of a reply yet.
    fn reset_reply(&self) {
        self.covered.borrow_mut().clear();
        self.err.set(0);
    }

    /// A content chunk of the reply covers `n` bytes of the export at
    /// `offset`: where that is in the request's data, if it lies inside the
    /// request, overlaps no earlier chunk and leaves the covered part in at
    /// most [`MAX_PIECES`] separate ranges (recorded as covered then).
    fn claim(&self, offset: u64, n: u32) -> Option<usize> {
        let rel = offset.checked_sub(self.offset.get())?;
        let end = rel.checked_add(u64::from(n))?;
        if n == 0 || end > u64::from(self.len.get()) {
            return None;
        }
        let (a, b) = (rel as u32, end as u32);
        let mut c = self.covered.borrow_mut();
        // The first range that ends after `a`; it must start at `b` or later.
        let i = c.partition_point(|&(_, e)| e <= a);
        if i < c.len() && c[i].0 < b {
            return None;
        }
        match (i > 0 && c[i - 1].1 == a, i < c.len() && c[i].0 == b) {
            (true, true) => {
                c[i - 1].1 = c[i].1;
                c.remove(i);
            }
            (true, false) => c[i - 1].1 = b,
            (false, true) => c[i].0 = a,
            (false, false) if c.len() >= MAX_PIECES => return None,
            (false, false) => c.insert(i, (a, b)),
        }
        Some(a as usize)
    }

    /// Whether the content chunks so far cover all of the request.
    fn covered_all(&self) -> bool {
        *self.covered.borrow() == [(0, self.len.get())]
    }
}

/// The most separate ranges a READ's chunks may leave covered at a time:
/// a server's chunks in order (or each next to an earlier one) leave one;
/// more than this many gaps is a server that makes the client work (each
/// chunk costs a walk over the ranges), so the connection is closed.
const MAX_PIECES: usize = 1024;

/// The reader's receive buffer: replies are received in bulk, as much as
/// the connection holds (up to [`RECV_MAX`] a time), and taken apart here.
const RX_BUF: usize = 256 << 10;
/// The most one receive into the buffer takes: a dozen 4 KiB READ replies,
/// but not much of a long payload, which is better received in place.
const RECV_MAX: usize = 64 << 10;
/// A payload part at least this long is received by its request straight
/// into its data ([`St::Payload`]) rather than through the receive buffer
/// (a copy more).
const DIRECT_MIN: usize = 32 << 10;
/// The longest error chunk taken: a message of at most 4096 bytes (the
/// protocol's limit) and the fixed fields, with room for error types this
/// client does not know; a longer one closes the connection.
const MAX_ERROR_CHUNK: u32 = 64 << 10;

/// Received bytes not taken yet: `buf[start..end]`.
struct Rx {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Rx {
    fn len(&self) -> usize {
        self.end - self.start
    }
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
    }
    fn be16(&self, at: usize) -> u16 {
        u16::from_be_bytes(self.buf[self.start + at..self.start + at + 2].try_into().expect("2 bytes"))
    }
    fn be32(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.buf[self.start + at..self.start + at + 4].try_into().expect("4 bytes"))
    }
    fn be64(&self, at: usize) -> u64 {
        u64::from_be_bytes(self.buf[self.start + at..self.start + at + 8].try_into().expect("8 bytes"))
    }
}

/// The free end of the receive buffer (`buf[at..]`, at most [`RECV_MAX`]
/// bytes of it), owned by a receive.
struct Tail {
    buf: Box<[u8]>,
    at: usize,
}

// SAFETY: the bytes of a boxed slice are on the heap and stay put when the
// Box moves; `at <= buf.len()`, and `bytes_*` stay inside the slice.
unsafe impl IoBuf for Tail {
    fn stable_ptr(&self) -> *const u8 {
        self.buf[self.at..].as_ptr()
    }
    fn bytes_init(&self) -> usize {
        (self.buf.len() - self.at).min(RECV_MAX)
    }
}

// SAFETY: as above.
unsafe impl IoBufMut for Tail {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.buf[self.at..].as_mut_ptr()
    }
    fn bytes_total(&self) -> usize {
        (self.buf.len() - self.at).min(RECV_MAX)
    }
}

/// What a connection did, counted per queue and summed in [`Nbd::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NbdStats {
    /// Simple replies received.
    pub simple_replies: u64,
    /// Structured reply chunks received (of every type).
    pub chunks: u64,
    /// `NBD_REPLY_TYPE_OFFSET_DATA` chunks.
    pub data_chunks: u64,
    /// `NBD_REPLY_TYPE_OFFSET_HOLE` chunks.
    pub hole_chunks: u64,
    /// Error chunks.
    pub error_chunks: u64,
    /// Receive operations of the replies' reader (each takes as many
    /// replies as the connection holds).
    pub recvs: u64,
    /// Payload parts received by their request straight into its data.
    pub direct_payloads: u64,
    /// `sendmsg` operations of the requests' writer.
    pub sends: u64,
}

impl NbdStats {
    fn add(&mut self, o: &NbdStats) {
        self.simple_replies += o.simple_replies;
        self.chunks += o.chunks;
        self.data_chunks += o.data_chunks;
        self.hole_chunks += o.hole_chunks;
        self.error_chunks += o.error_chunks;
        self.recvs += o.recvs;
        self.direct_payloads += o.direct_payloads;
        self.sends += o.sends;
    }
}

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

/// One queue's connection. See the [module docs](self).
pub struct NbdQueue<'a> {
    nbd: &'a Nbd,
    /// The connection; replaced only when no operation uses it (see
    /// `reconnect`).
    sock: RefCell<OwnedFd>,
    sock_fd: Cell<RawFd>,
    q_id: u16,
    tags: Box<[Tag]>,
    /// Tags whose requests wait for the writer, in order.
    sendq: RefCell<VecDeque<u16>>,
    /// The background task's waker (reader and writer).
    bg: RefCell<Option<Waker>>,
    /// The reader waits while a READ's request receives its payload.
    hold: Cell<bool>,
    /// The connection is closed: everything fails with EIO.
    dead: Cell<bool>,
    /// The connection is lost and being made again: requests wait.
    down: Cell<bool>,
    /// The writer has a `sendmsg` in flight.
    sending: Cell<bool>,
    /// A send is in flight or ended part-way: the stream may end inside a
    /// request, so no NBD_CMD_DISC can follow.
    torn: Cell<bool>,
    /// Counts, added to the target's at drop.
    stats: Cell<NbdStats>,
    /// How long to wait before making a lost connection again: zero, or
    /// growing (100 ms to 5 s) while connections made again are lost
    /// before a reply comes.
    backoff: Cell<Duration>,
}

impl std::fmt::Debug for NbdQueue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdQueue").field("q_id", &self.q_id).field("dead", &self.dead.get()).finish()
    }
}

impl<'a> NbdQueue<'a> {
    fn new(nbd: &'a Nbd, sock: OwnedFd, q: &QueueContext) -> NbdQueue<'a> {
        let tags = (0..q.depth)
            .map(|_| Tag {
                st: Cell::new(St::Idle),
                cmd: Cell::new(0),
                flags: Cell::new(0),
                offset: Cell::new(0),
                len: Cell::new(0),
                data: Cell::new(std::ptr::null_mut()),
                covered: RefCell::new(Vec::with_capacity(4)),
                err: Cell::new(0),
                payload: Cell::new((0, 0)),
                gen: Cell::new(0),
                sent: Cell::new(true),
                waker: RefCell::new(None),
            })
            .collect();
        NbdQueue {
            nbd,
            sock_fd: Cell::new(sock.as_raw_fd()),
            sock: RefCell::new(sock),
            q_id: q.q_id,
            tags,
            sendq: RefCell::new(VecDeque::with_capacity(usize::from(q.depth) + 1)),
            bg: RefCell::new(None),
            hold: Cell::new(false),
            dead: Cell::new(false),
            down: Cell::new(false),
            sending: Cell::new(false),
            torn: Cell::new(false),
            stats: Cell::new(NbdStats::default()),
            backoff: Cell::new(Duration::ZERO),
        }
    }

    /// Counts something in the queue's [`NbdStats`].
    fn count(&self, f: impl FnOnce(&mut NbdStats)) {
        let mut st = self.stats.get();
        f(&mut st);
        self.stats.set(st);
    }

    /// The connection's socket.
    fn sock(&self) -> BorrowedFd<'_> {
        // SAFETY: `sock_fd` is the descriptor `sock` owns, which stays open
        // while `self` lives; it is replaced (and the old one closed) only
        // once no operation on it is pending or about to be pushed.
        unsafe { BorrowedFd::borrow_raw(self.sock_fd.get()) }
    }

    fn cookie(&self, tag: u16) -> u64 {
        (u64::from(self.q_id) << 48) | (u64::from(self.tags[usize::from(tag)].gen.get()) << 16) | u64::from(tag)
    }

    /// The tag a reply's cookie names, if it names a request of this queue
    /// that waits for its reply.
    fn tag_of(&self, cookie: u64) -> Option<u16> {
        let (q, gen, tag) = ((cookie >> 48) as u16, (cookie >> 16) as u32, cookie as u16);
        let t = self.tags.get(usize::from(tag))?;
        (q == self.q_id && t.gen.get() == gen && t.st.get() == St::Waiting).then_some(tag)
    }

    fn park_bg(&self, cx: &Context<'_>) {
        let mut w = self.bg.borrow_mut();
        if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *w = Some(cx.waker().clone());
        }
    }

    fn wake_bg(&self) {
        if let Some(w) = self.bg.borrow().as_ref() {
            w.wake_by_ref();
        }
    }

    /// Closes the connection: every request in flight and every later one
    /// fails with EIO.
    fn fail(&self, why: impl FnOnce() -> String) {
        if self.dead.replace(true) {
            return;
        }
        self.nbd.record_failure(format!("queue {}: {}", self.q_id, why()));
        // Ends operations on the socket (the reader's recv, a payload's,
        // the writer's send) at once; the descriptor stays ours until drop.
        // SAFETY: shutdown(2) on our own socket.
        unsafe { libc::shutdown(self.sock_fd.get(), libc::SHUT_RDWR) };
        for t in self.tags.iter() {
            t.wake();
        }
        self.wake_bg();
    }

    /// The connection is lost (not broken by the server's protocol): with
    /// [`NbdOptions::reconnect`], requests wait while the reader makes it
    /// again; else as [`NbdQueue::fail`].
    fn lose(&self, why: impl FnOnce() -> String) {
        if !self.nbd.opts.reconnect {
            return self.fail(why);
        }
        if self.dead.get() || self.down.replace(true) {
            return;
        }
        // SAFETY: shutdown(2) on our own socket: pending operations on it end.
        unsafe { libc::shutdown(self.sock_fd.get(), libc::SHUT_RDWR) };
        for t in self.tags.iter() {
            t.wake();
        }
        self.wake_bg();
    }

    /// Makes the lost connection again (blocking connect and handshake,
    /// retried with backoff from 100 ms to 5 s) once nothing uses the old
    /// one, then re-issues every request that has no reply yet. A server
    /// that takes connections and loses them before any reply is met with
    /// the same backoff, not a busy loop.
    async fn reconnect(&self, ring: Ring<'_>) {
        poll_fn(|cx| {
            if (self.hold.get() || self.sending.get()) && !self.dead.get() {
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

    /// Reads replies and hands each to its request, until the connection
    /// fails. Never completes.
    async fn reader(&self, ring: Ring<'_>) {
        let mut rx = Rx { buf: vec![0u8; RX_BUF].into_boxed_slice(), start: 0, end: 0 };
        while !self.dead.get() {
            if self.down.get() {
                self.reconnect(ring).await;
                (rx.start, rx.end) = (0, 0);
                continue;
            }
            if !self.fill(ring, &mut rx, 4).await {
                continue;
            }
            match rx.be32(0) {
                SIMPLE_REPLY_MAGIC => self.simple_reply(ring, &mut rx).await,
                STRUCTURED_REPLY_MAGIC if self.nbd.info.structured => self.chunk(ring, &mut rx).await,
                STRUCTURED_REPLY_MAGIC => self.fail(|| "a structured reply, which was not negotiated".into()),
                magic => self.fail(|| format!("reply with magic {magic:#010x}: not an NBD reply")),
            }
        }
        std::future::pending::<()>().await
    }

    /// Receives until `rx` holds at least `need` bytes (`need <= RX_BUF`),
    /// taking whatever the connection has. False if the connection failed
    /// or was lost meanwhile (reported), and then no request's data may be
    /// touched: a failed connection answers its requests.
    async fn fill(&self, ring: Ring<'_>, rx: &mut Rx, need: usize) -> bool {
        debug_assert!(need <= RX_BUF);
        while rx.len() < need {
            if self.dead.get() || self.down.get() {
                return false;
            }
            if rx.buf.len() - rx.start < need {
                rx.buf.copy_within(rx.start..rx.end, 0);
                (rx.start, rx.end) = (0, rx.end - rx.start);
            }
            let tail = Tail { buf: std::mem::take(&mut rx.buf), at: rx.end };
            self.count(|s| s.recvs += 1);
            let (res, tail) = ring.recv(self.sock(), tail, 0).await;
            rx.buf = tail.buf;
            match res {
                Ok(0) if rx.len() == 0 => self.lose(|| "the server closed the connection".into()),
                Ok(0) => {
                    let have = rx.len();
                    self.lose(|| format!("short reply: {have} of {need} bytes, then the connection ended"))
                }
                Ok(n) => rx.end += n as usize,
                Err(e) => self.lose(|| format!("receiving replies: {e}")),
            }
        }
        !(self.dead.get() || self.down.get())
    }

    /// Delivers the next `n` bytes on the connection, a READ's payload, into
    /// request `tag`'s data at `at` (inside it: checked by the caller). What
    /// the receive buffer holds is copied; a remainder of [`DIRECT_MIN`] or
    /// more is received by the request itself straight into its data, a
    /// shorter one through the buffer. False if the connection failed or
    /// was lost meanwhile.
    async fn payload(&self, ring: Ring<'_>, rx: &mut Rx, tag: u16, mut at: usize, mut n: usize) -> bool {
        let t = &self.tags[usize::from(tag)];
        debug_assert!(at + n <= t.len.get() as usize);
        loop {
            let k = n.min(rx.len());
            if k > 0 {
                // SAFETY: `t.data` is the waiting READ's buffer of `t.len`
                // bytes, and `at + k` is inside it (see `Tag::data`); the
                // connection is good (checked after every await), so the
                // request is not answered yet. The receive buffer is ours.
                unsafe { std::ptr::copy_nonoverlapping(rx.buf[rx.start..].as_ptr(), t.data.get().add(at), k) };
                rx.consume(k);
                (at, n) = (at + k, n - k);
            }
            if n == 0 {
                return true;
            }
            if n >= DIRECT_MIN {
                // The receive buffer is empty: the rest of the payload is
                // next on the connection.
                t.payload.set((at as u32, n as u32));
                t.st.set(St::Payload);
                self.hold.set(true);
                self.count(|s| s.direct_payloads += 1);
                t.wake();
                poll_fn(|cx| {
                    if self.hold.get() && !self.dead.get() {
                        // (A lost connection ends the payload's receive,
                        // which releases the hold.)
                        self.park_bg(cx);
                        Poll::Pending
                    } else {
                        Poll::Ready(())
                    }
                })
                .await;
                return !(self.dead.get() || self.down.get());
            }
            if !self.fill(ring, rx, 1).await {
                return false;
            }
        }
    }

    /// The request's reply is complete: it may be answered.
    fn replied(&self, t: &Tag, error: u32) {
        t.st.set(St::Replied(error));
        t.wake();
        self.backoff.set(Duration::ZERO);
    }

    /// A simple reply (the magic is in `rx`): header, then a successful
    /// READ's payload.
    async fn simple_reply(&self, ring: Ring<'_>, rx: &mut Rx) {
        if !self.fill(ring, rx, REPLY_LEN).await {
            return;
        }
        let (error, cookie) = (rx.be32(4), rx.be64(8));
        rx.consume(REPLY_LEN);
        self.count(|s| s.simple_replies += 1);
        let Some(tag) = self.tag_of(cookie) else {
            return self.fail(|| format!("reply with cookie {cookie:#018x}, which matches no request in flight"));
        };
        let t = &self.tags[usize::from(tag)];
        if t.cmd.get() == CMD_READ {
            if self.nbd.info.structured {
                return self.fail(|| "a simple reply to a READ, although structured replies were negotiated".into());
            }
            if error == 0 && !self.payload(ring, rx, tag, 0, t.len.get() as usize).await {
                return;
            }
        }
        self.replied(t, error);
    }

    /// A structured reply chunk (the magic is in `rx`). Anything the
    /// protocol forbids closes the connection: a cookie of no request in
    /// flight (also a chunk after the last one), content outside the
    /// request or over an earlier chunk, content for another command than
    /// READ, a last chunk before the READ's data is complete without an
    /// error, a chunk of the wrong length, an unknown type that is not an
    /// error.
    async fn chunk(&self, ring: Ring<'_>, rx: &mut Rx) {
        if !self.fill(ring, rx, CHUNK_LEN).await {
            return;
        }
        let (cflags, ty, cookie, length) = (rx.be16(4), rx.be16(6), rx.be64(8), rx.be32(16));
        rx.consume(CHUNK_LEN);
        self.count(|s| s.chunks += 1);
        let Some(tag) = self.tag_of(cookie) else {
            return self.fail(|| format!("reply chunk (type {ty}) with cookie {cookie:#018x}, which matches no request in flight"));
        };
        let t = &self.tags[usize::from(tag)];
        let read = t.cmd.get() == CMD_READ;
        let (off, len) = (t.offset.get(), t.len.get());
        match ty {
            REPLY_TYPE_NONE if length == 0 && cflags & REPLY_FLAG_DONE != 0 => {}
            REPLY_TYPE_NONE => return self.fail(|| format!("NBD_REPLY_TYPE_NONE chunk of {length} bytes, flags {cflags:#x}")),
            REPLY_TYPE_OFFSET_DATA if read && length > 8 => {
                if !self.fill(ring, rx, 8).await {
                    return;
                }
                let (at, n) = (rx.be64(0), length - 8);
                rx.consume(8);
                let Some(rel) = t.claim(at, n) else {
                    return self
                        .fail(|| format!("data chunk of {n} bytes at {at}: outside the READ of {len} at {off}, over an earlier chunk, or in too many pieces"));
                };
                self.count(|s| s.data_chunks += 1);
                if !self.payload(ring, rx, tag, rel, n as usize).await {
                    return;
                }
            }
            REPLY_TYPE_OFFSET_HOLE if read && length == 12 => {
                if !self.fill(ring, rx, 12).await {
                    return;
                }
                let (at, n) = (rx.be64(0), rx.be32(8));
                rx.consume(12);
                let Some(rel) = t.claim(at, n) else {
                    return self
                        .fail(|| format!("hole chunk of {n} bytes at {at}: outside the READ of {len} at {off}, over an earlier chunk, or in too many pieces"));
                };
                self.count(|s| s.hole_chunks += 1);
                // SAFETY: as in `payload`: inside the waiting READ's buffer
                // (checked by `claim`), no await since the last check.
                unsafe { std::ptr::write_bytes(t.data.get().add(rel), 0, n as usize) };
            }
            REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                let what = if read { format!("of {length} bytes") } else { format!("to command {}", t.cmd.get()) };
                return self.fail(|| format!("content chunk (type {ty}) {what}"));
            }
            ty if ty & REPLY_TYPE_ERROR_BIT != 0 => {
                // error, message length, message, then the type's own fields
                // (an offset for ERROR_OFFSET).
                let fixed = if ty == REPLY_TYPE_ERROR_OFFSET { 14 } else { 6 };
                if length < fixed || length > MAX_ERROR_CHUNK {
                    return self.fail(|| format!("error chunk (type {ty:#x}) of {length} bytes"));
                }
                if !self.fill(ring, rx, length as usize).await {
                    return;
                }
                let (error, msg_len) = (rx.be32(0), u32::from(rx.be16(4)));
                let known = matches!(ty, REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET);
                let bad = if msg_len > length - fixed {
                    Some(format!("error chunk (type {ty:#x}) of {length} bytes with a message of {msg_len}"))
                } else if known && error == 0 {
                    Some(format!("error chunk (type {ty:#x}) with error 0"))
                } else if ty == REPLY_TYPE_ERROR_OFFSET {
                    let at = rx.be64(6 + msg_len as usize);
                    (at < off || at - off >= u64::from(len))
                        .then(|| format!("error chunk at {at}, outside the request of {len} bytes at {off}"))
                } else {
                    None
                };
                rx.consume(length as usize);
                if let Some(why) = bad {
                    return self.fail(|| why);
                }
                self.count(|s| s.error_chunks += 1);
                // The reply has failed; an error type this client does not
                // know (which the protocol lets the connection survive)
                // with error 0 fails it with EIO.
                if t.err.get() == 0 {
                    t.err.set(if error != 0 { error } else { 5 });
                }
            }
            ty => return self.fail(|| format!("reply chunk of unknown type {ty} ({length} bytes)")),
        }
        if cflags & REPLY_FLAG_DONE != 0 {
            let error = t.err.get();
            if error == 0 && read && !t.covered_all() {
                let got: u32 = t.covered.borrow().iter().map(|&(a, b)| b - a).sum();
                return self.fail(|| format!("the READ of {len} bytes at {off} ended with {got} bytes of data and holes, and no error"));
            }
            self.replied(t, error);
        }
    }

    /// Sends queued requests, as many as are queued (up to [`BATCH`]) in
    /// one `sendmsg`, in order. Never completes.
    async fn writer(&self, ring: Ring<'_>) {
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
                    if t.cmd.get() == CMD_WRITE {
                        let len = t.len.get() as usize;
                        b.iov.push(libc::iovec { iov_base: t.data.get() as *mut libc::c_void, iov_len: len });
                        total += len;
                    }
                }
                let mut first = 0usize;
                while total > 0 && !self.dead.get() && !self.down.get() {
                    let b = &mut *buf;
                    b.msg.msg_iov = b.iov[first..].as_mut_ptr();
                    b.msg.msg_iovlen = b.iov.len() - first;
                    let sqe = opcode::SendMsg::new(types::Fd(self.sock_fd.get()), &b.msg)
                        .flags((libc::MSG_NOSIGNAL | libc::MSG_WAITALL) as u32)
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

impl QueueTarget for NbdQueue<'_> {
    async fn handle(&self, mut io: Io<'_>) -> IoResult {
        let req = *io.request();
        let f = self.nbd.info.flags;
        let len = req.len();
        let (cmd, cflags) = match req.op {
            Op::Read => (CMD_READ, 0),
            Op::Write if f & flags::READ_ONLY != 0 => return Err(Errno::EROFS),
            Op::Write => (CMD_WRITE, if req.fua() && f & flags::SEND_FUA != 0 { CMD_FLAG_FUA } else { 0 }),
            // Without SEND_FLUSH the device has no volatile cache and the
            // block layer sends no FLUSH; one that comes anyway has nothing
            // to do.
            Op::Flush if f & flags::SEND_FLUSH == 0 => return Ok(0),
            Op::Flush => (CMD_FLUSH, 0),
            Op::Discard if f & flags::SEND_TRIM != 0 => (CMD_TRIM, 0),
            Op::WriteZeroes if f & flags::SEND_WRITE_ZEROES != 0 => {
                let no_hole = req.flags & ublk_sys::UBLK_IO_F_NOUNMAP != 0;
                (CMD_WRITE_ZEROES, if no_hole { CMD_FLAG_NO_HOLE } else { 0 })
            }
            Op::Discard | Op::WriteZeroes | Op::Other(_) => return Err(Errno::EOPNOTSUPP),
        };
        if self.dead.get() {
            return Err(Errno::EIO);
        }
        let Ok(len32) = u32::try_from(len) else { return Err(Errno::EINVAL) };
        let tag = req.tag;
        let t = &self.tags[usize::from(tag)];
        t.cmd.set(cmd);
        t.flags.set(cflags);
        // A FLUSH names no range (the block layer's flush requests carry
        // sector -1, which a server checks against the export's size).
        let (offset, len32) = if cmd == CMD_FLUSH { (0, 0) } else { (req.offset(), len32) };
        t.offset.set(offset);
        t.len.set(len32);
        let data = match cmd {
            // Only read through (by the writer's sendmsg).
            CMD_WRITE => io.data().as_ptr().cast_mut(),
            CMD_READ => io.data_mut().as_mut_ptr(),
            _ => std::ptr::null_mut(),
        };
        if matches!(cmd, CMD_WRITE | CMD_READ) && io.data().len() != len {
            // No buffer of the request's size (the queue refuses user copy).
            return Err(Errno::EINVAL);
        }
        t.data.set(data);
        t.reset_reply();
        t.gen.set(t.gen.get().wrapping_add(1));
        t.sent.set(false);
        t.st.set(St::Waiting);
        self.sendq.borrow_mut().push_back(tag);
        self.wake_bg();

        let answer = loop {
            let st = poll_fn(|cx| match t.st.get() {
                St::Waiting if !self.dead.get() => {
                    t.park(cx);
                    Poll::Pending
                }
                s => Poll::Ready(s),
            })
            .await;
            match st {
                St::Replied(0) => break Ok(if matches!(req.op, Op::Read | Op::Write) { len32 } else { 0 }),
                St::Replied(e) => break Err(Errno::new(errno(e))),
                St::Payload => {
                    // The reader waits meanwhile (`hold`).
                    let (at, n) = t.payload.get();
                    let range = at as usize..(at + n) as usize;
                    let got = io.recv_data(self.sock(), range, libc::MSG_WAITALL).await;
                    let ok = matches!(got, Ok(k) if k == n);
                    if !ok {
                        self.lose(|| match got {
                            Ok(k) => format!("READ reply payload ended after {k} of {n} bytes"),
                            Err(e) => format!("receiving a READ payload: {e}"),
                        });
                    }
                    // Received: the reader goes on with the reply. Lost with
                    // the connection: re-issued on the next one.
                    t.st.set(St::Waiting);
                    self.hold.set(false);
                    self.wake_bg();
                    if !ok && self.dead.get() {
                        break Err(Errno::EIO);
                    }
                }
                St::Waiting | St::Idle => break Err(Errno::EIO),
            }
        };
        // The request's data may be answered (and its buffer reused) only
        // once the writer is done with it.
        poll_fn(|cx| {
            if t.sent.get() {
                Poll::Ready(())
            } else {
                t.park(cx);
                Poll::Pending
            }
        })
        .await;
        t.st.set(St::Idle);
        answer
    }

    async fn run(&self, ring: Ring<'_>) {
        let mut reader = pin!(self.reader(ring));
        let mut writer = pin!(self.writer(ring));
        // Both run until the queue stops (neither completes).
        poll_fn(|cx| {
            let _ = reader.as_mut().poll(cx);
            let _ = writer.as_mut().poll(cx);
            Poll::<()>::Pending
        })
        .await
    }
}

impl Drop for NbdQueue<'_> {
    fn drop(&mut self) {
        self.nbd.stats.lock().unwrap_or_else(|e| e.into_inner()).add(&self.stats.get());
        // A clean end: tell the server (NBD_CMD_DISC), unless the stream may
        // end inside a request or the connection is already gone.
        if !self.dead.get() && !self.down.get() && !self.torn.get() {
            let mut h = [0u8; REQUEST_LEN];
            request(&mut h, 0, CMD_DISC, u64::MAX, 0, 0);
            // SAFETY: send(2) of a local buffer on our own socket; never
            // blocks (MSG_DONTWAIT), never raises SIGPIPE.
            unsafe { libc::send(self.sock_fd.get(), h.as_ptr().cast(), h.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
            // SAFETY: shutdown(2) on our own socket.
            unsafe { libc::shutdown(self.sock_fd.get(), libc::SHUT_WR) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(offset: u64, len: u32) -> Tag {
        Tag {
            st: Cell::new(St::Waiting),
            cmd: Cell::new(CMD_READ),
            flags: Cell::new(0),
            offset: Cell::new(offset),
            len: Cell::new(len),
            data: Cell::new(std::ptr::null_mut()),
            covered: RefCell::new(Vec::new()),
            err: Cell::new(0),
            payload: Cell::new((0, 0)),
            gen: Cell::new(0),
            sent: Cell::new(true),
            waker: RefCell::new(None),
        }
    }

    #[test]
    fn chunks_in_any_order_cover_the_request_once() {
        let t = tag(1 << 20, 16384);
        // last quarter first, then the first, then the middle half
        assert_eq!(t.claim((1 << 20) + 12288, 4096), Some(12288));
        assert!(!t.covered_all());
        assert_eq!(t.claim(1 << 20, 4096), Some(0));
        assert_eq!(t.claim((1 << 20) + 4096, 8192), Some(4096));
        assert!(t.covered_all());
        assert_eq!(*t.covered.borrow(), [(0, 16384)]);
        t.reset_reply();
        assert!(!t.covered_all());
        // unaligned pieces that merge
        assert_eq!(t.claim((1 << 20) + 1, 16383), Some(1));
        assert_eq!(t.claim(1 << 20, 1), Some(0));
        assert!(t.covered_all());
    }

    #[test]
    fn chunks_outside_or_over_earlier_ones_are_refused() {
        let t = tag(4096, 8192);
        assert_eq!(t.claim(0, 4096), None, "before the request");
        assert_eq!(t.claim(4095, 2), None, "straddling its start");
        assert_eq!(t.claim(4096 + 8192, 1), None, "just past its end");
        assert_eq!(t.claim(4096, 8193), None, "longer than it");
        assert_eq!(t.claim(u64::MAX, 4096), None, "offset + length overflows");
        assert_eq!(t.claim(4096, 0), None, "empty");
        assert_eq!(t.claim(8192, 1024), Some(4096));
        assert_eq!(t.claim(8192 + 1023, 1), None, "over the last byte of an earlier chunk");
        assert_eq!(t.claim(8000, 200), None, "over the first byte of an earlier chunk");
        assert_eq!(t.claim(4096, 8192), None, "over all of it");
        assert_eq!(t.claim(4096, 4096), Some(0));
        assert_eq!(t.claim(8192 + 1024, 3072), Some(5120));
        assert!(t.covered_all());
        assert_eq!(t.claim(4096, 1), None, "everything is covered");
    }

    #[test]
    fn a_reply_in_too_many_separate_pieces_is_refused() {
        let t = tag(0, 1 << 20);
        // every other 512-byte block: 1024 separate ranges, then no more
        for k in 0..MAX_PIECES as u64 {
            assert_eq!(t.claim(k * 1024, 512), Some(k as usize * 1024));
        }
        assert_eq!(t.covered.borrow().len(), MAX_PIECES);
        assert_eq!(t.claim((1 << 20) - 256, 256), None, "a 1025th separate range");
        // filling a gap merges (no new range) and is fine
        assert_eq!(t.claim(512, 512), Some(512));
        assert_eq!(t.covered.borrow().len(), MAX_PIECES - 1);
    }
}

//! A disk on an NBD server (`qemu-nbd`, `nbd-server`, `nbdkit`...): an
//! [async target](crate::aio) that speaks the NBD protocol over TCP or a
//! unix socket, one connection per queue, all of it on the queue's ring.
//!
//! * **Setup** ([`Nbd::connect`]): a blocking connect and the fixed newstyle
//!   handshake per connection, with `NBD_OPT_GO` (asking for the server's
//!   block size constraints), or `NBD_OPT_EXPORT_NAME` where the server
//!   lacks GO. The export's size and transmission flags shape the device
//!   ([`Nbd::builder`]): a read-only export is a read-only device,
//!   `SEND_FLUSH` gives a volatile write cache (honouring FUA with
//!   `SEND_FUA`), `SEND_TRIM` and `SEND_WRITE_ZEROES` the discard and
//!   write-zeroes limits; more than one connection needs `CAN_MULTI_CONN`.
//! * **Transmission**: each request is sent with the cookie (queue,
//!   generation, tag); requests are pipelined, written by a per-queue
//!   writer that gathers every queued header and WRITE payload into one
//!   `sendmsg`, and answered out of order. The queue's background task
//!   ([`QueueTarget::run`]) reads each 16-byte reply header, finds the
//!   request by its cookie and wakes it; a READ's request then receives
//!   its payload straight into its own data (`MSG_WAITALL`) and lets the
//!   reader go on. Nothing is allocated per request.
//! * **Errors**: the server's error for a request becomes that request's
//!   errno. A malformed reply (wrong magic, a short header, a cookie that
//!   matches no request in flight, a short payload) or a lost connection
//!   closes the connection and fails every request in flight and every
//!   later one with EIO; no reply is ever received into a buffer other
//!   than its own request's, nor beyond its length.
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

use crate::aio::{AsyncTarget, Io, QueueContext, QueueTarget, Ring};
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
        NbdOptions { addr, export: String::new(), connections: 1, timeout: Duration::from_secs(10), reconnect: false }
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
            let info = handshake(&mut s, &opts.export).map_err(|e| handshake_error(addr, e, t))?;
            s.set_read_timeout(None).and_then(|_| s.set_write_timeout(None)).map_err(sockopt)?;
            Ok((s.into(), info))
        }
        NbdAddr::Unix(path) => {
            let mut s = UnixStream::connect(path).map_err(|e| Error::os(format!("connecting to the NBD server {addr}"), e))?;
            s.set_read_timeout(Some(t)).and_then(|_| s.set_write_timeout(Some(t))).map_err(sockopt)?;
            let info = handshake(&mut s, &opts.export).map_err(|e| handshake_error(addr, e, t))?;
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
            if (other.size, other.flags) != (info.size, info.flags) {
                return Err(Error::InvalidConfig {
                    what: "NBD export",
                    why: format!(
                        "{}: the export changed between connections (size {} -> {}, flags {:#x} -> {:#x})",
                        opts.addr, info.size, other.size, info.flags, other.flags
                    ),
                });
            }
            conns.push(Some(fd));
        }
        Ok(Nbd { opts: opts.clone(), info, conns: Mutex::new(conns), failure: Mutex::new(None), reconnects: AtomicU64::new(0) })
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
    /// Its reply came, with this NBD error (0: success) and no payload.
    Replied(u32),
    /// Its (successful READ) reply header came: its payload is next on the
    /// connection, for the request to receive.
    Payload,
}

/// One tag's request as the connection sees it.
struct Tag {
    st: Cell<St>,
    cmd: Cell<u16>,
    flags: Cell<u16>,
    offset: Cell<u64>,
    len: Cell<u32>,
    /// A WRITE's data (the request's own buffer), for the writer.
    data: Cell<*const u8>,
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
                data: Cell::new(std::ptr::null()),
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
        }
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
    /// one, then re-issues every request that has no reply yet.
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
        let mut delay = Duration::from_millis(100);
        while !self.dead.get() {
            match connect_one(&opts) {
                Ok((fd, info)) if (info.size, info.flags) == (self.nbd.info.size, self.nbd.info.flags) => {
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
                            "the export changed while reconnecting (size {} -> {}, flags {:#x} -> {:#x})",
                            i.size, info.size, i.flags, info.flags
                        )
                    });
                    return;
                }
                Err(_) => {
                    let _ = ring.sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        if self.dead.get() {
            return;
        }
        self.torn.set(false);
        // Every request without a reply goes out again, with a new cookie.
        let mut q = self.sendq.borrow_mut();
        q.clear();
        for (tag, t) in self.tags.iter().enumerate() {
            if t.st.get() == St::Waiting {
                t.gen.set(t.gen.get().wrapping_add(1));
                t.sent.set(false);
                q.push_back(tag as u16);
            }
        }
        drop(q);
        self.down.set(false);
        self.nbd.reconnects.fetch_add(1, Ordering::Relaxed);
        self.wake_bg();
    }

    /// Reads reply headers and hands each to its request, until the
    /// connection fails. Never completes.
    async fn reader(&self, ring: Ring<'_>) {
        let mut hdr: Box<[u8]> = vec![0u8; REPLY_LEN].into_boxed_slice();
        while !self.dead.get() {
            if self.down.get() {
                self.reconnect(ring).await;
                continue;
            }
            let (res, h) = ring.recv(self.sock(), hdr, libc::MSG_WAITALL).await;
            hdr = h;
            match res {
                Ok(n) if n as usize == REPLY_LEN => {}
                Ok(0) => {
                    self.lose(|| "the server closed the connection".into());
                    continue;
                }
                Ok(n) => {
                    self.lose(|| format!("short reply: {n} of 16 header bytes, then the connection ended"));
                    continue;
                }
                Err(e) => {
                    self.lose(|| format!("receiving a reply: {e}"));
                    continue;
                }
            }
            let magic = u32::from_be_bytes(hdr[0..4].try_into().expect("4 bytes"));
            let error = u32::from_be_bytes(hdr[4..8].try_into().expect("4 bytes"));
            let cookie = u64::from_be_bytes(hdr[8..16].try_into().expect("8 bytes"));
            if magic != SIMPLE_REPLY_MAGIC {
                let what = if magic == STRUCTURED_REPLY_MAGIC { " (a structured reply, which was not negotiated)" } else { "" };
                self.fail(|| format!("reply with magic {magic:#010x}{what}: not an NBD simple reply"));
                break;
            }
            let Some(tag) = self.tag_of(cookie) else {
                self.fail(|| format!("reply with cookie {cookie:#018x}, which matches no request in flight"));
                break;
            };
            let t = &self.tags[usize::from(tag)];
            if t.cmd.get() == CMD_READ && error == 0 {
                // The payload is next: the request receives it into its own
                // data, then lets this reader go on.
                self.hold.set(true);
                t.st.set(St::Payload);
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
            } else {
                t.st.set(St::Replied(error));
                t.wake();
            }
        }
        std::future::pending::<()>().await
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
        t.data.set(if cmd == CMD_WRITE { io.data().as_ptr() } else { std::ptr::null() });
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
                    let got = io.recv_data(self.sock(), 0..len, libc::MSG_WAITALL).await;
                    let ok = matches!(got, Ok(n) if n == len32);
                    if !ok {
                        self.lose(|| match got {
                            Ok(n) => format!("READ reply payload ended after {n} of {len} bytes"),
                            Err(e) => format!("receiving a READ payload: {e}"),
                        });
                    }
                    self.hold.set(false);
                    self.wake_bg();
                    if ok {
                        break Ok(len32);
                    }
                    if self.dead.get() {
                        break Err(Errno::EIO);
                    }
                    // Lost with the connection: re-issued on the next one.
                    t.st.set(St::Waiting);
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

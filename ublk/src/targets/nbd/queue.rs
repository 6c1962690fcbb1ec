//! One queue's connection ([`NbdQueue`]): its state, the request futures
//! that queue their requests for the writer and wait for their replies,
//! the background task that runs the reader and the writer, closing or
//! losing the connection, and `NBD_CMD_DISC` at the end.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::Duration;

use super::proto::{
    errno, request, CMD_DISC, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, REQUEST_LEN,
};
use super::reader::DIRECT_MIN;
use super::tag::{St, Tag, WakerSlot, MAX_HOLES};
use super::{flags, Nbd, NbdStats};
use crate::aio::{Io, QueueContext, QueueTarget, Ring};
use crate::errno::Errno;
use crate::target::{IoResult, Op};
use crate::transfer::{transfer, Dir};

/// One queue's connection. See the [module docs](super).
pub struct NbdQueue<'a> {
    pub(super) nbd: &'a Nbd,
    /// The connection; replaced only when no operation uses it (see
    /// `reconnect`).
    pub(super) sock: RefCell<OwnedFd>,
    pub(super) sock_fd: Cell<RawFd>,
    pub(super) q_id: u16,
    pub(super) tags: Box<[Tag]>,
    /// Tags whose requests wait for the writer, in order.
    pub(super) sendq: RefCell<VecDeque<u16>>,
    /// The background task's waker (reader and writer).
    pub(super) bg: WakerSlot,
    /// The reader waits while a READ's request receives its payload.
    pub(super) hold: Cell<bool>,
    /// Zero copy: request data stays in the kernel's pages: READs' moved by
    /// the requests themselves (READ_FIXED from the socket, while the reader
    /// waits, or from `/dev/zero`), WRITEs' sent by the writer (WRITE_FIXED,
    /// linked after their headers).
    pub(super) zc: bool,
    /// `/dev/zero`, for holes under zero copy.
    pub(super) zero: Option<OwnedFd>,
    /// Zero copy with user copy too (`UBLK_F_USER_COPY` beside the zero-copy
    /// flag): small payloads go through this process, large ones stay in
    /// the request's pages. `/dev/ublkcN`, whose `pread`/`pwrite` at the
    /// request's [`user_copy_offset`](crate::queue::user_copy_offset) move
    /// them, and the WRITEs' staging buffers, [`SMALL_WRITE`] bytes per tag.
    pub(super) mixed: Option<Mixed>,
    /// READs of [`DIRECT_MIN`] bytes or more waiting for their replies,
    /// under `mixed`: while there are none, the reader receives replies in
    /// bulk, payloads included; while there are, one header at a time, so
    /// that a long payload is received straight into its request's pages.
    pub(super) big_reads: Cell<u32>,
    /// The connection is closed: everything fails with EIO.
    pub(super) dead: Cell<bool>,
    /// The connection is lost and being made again: requests wait.
    pub(super) down: Cell<bool>,
    /// The writer has a `sendmsg` (under zero copy, a chain) in flight.
    pub(super) sending: Cell<bool>,
    /// The writer holds a batch taken from `sendq` and has not yet marked
    /// its tags sent. A reconnect waits for it: a batch's headers carry the
    /// old connection's cookies and may have gone out in part, so its rest
    /// must not go out on the new connection, and its tags, queued again
    /// by the reconnect, must not then be marked sent by the old batch.
    pub(super) batch: Cell<bool>,
    /// A send is in flight or ended part-way: the stream may end inside a
    /// request, so no NBD_CMD_DISC can follow.
    pub(super) torn: Cell<bool>,
    /// Counts, added to the target's at drop.
    pub(super) stats: Cell<NbdStats>,
    /// How long to wait before making a lost connection again: zero, or
    /// growing (100 ms to 5 s) while connections made again are lost
    /// before a reply comes.
    pub(super) backoff: Cell<Duration>,
}

/// A WRITE of at most this many bytes is sent from a copy in this process
/// under [`NbdQueue::mixed`] (a `pread` of `/dev/ublkcN`, then in the
/// `sendmsg` with its header), a longer one from its pages (`WRITE_FIXED`,
/// an operation more in the chain, no copy).
pub(super) const SMALL_WRITE: usize = 16 << 10;

/// See [`NbdQueue::mixed`].
pub(super) struct Mixed {
    pub(super) char_dev: OwnedFd,
    /// `depth` slots of [`SMALL_WRITE`] bytes (tag `t`'s at
    /// `t * SMALL_WRITE`), a heap block owned here and reached only through
    /// this pointer: written by `pread` (the kernel) and read by the
    /// writer's `sendmsg`, never through a Rust reference. Zeroed by the
    /// allocator, so pages no request used stay uncommitted.
    stage: std::ptr::NonNull<u8>,
    len: usize,
}

impl Mixed {
    pub(super) fn new(char_dev: OwnedFd, depth: u16) -> Mixed {
        let len = usize::from(depth) * SMALL_WRITE;
        let block: Box<[u8]> = vec![0u8; len].into_boxed_slice();
        let stage = std::ptr::NonNull::new(Box::into_raw(block).cast::<u8>()).expect("a Box is never null");
        Mixed { char_dev, stage, len }
    }

    /// Tag `tag`'s staging slot ([`SMALL_WRITE`] bytes; `tag < depth`).
    fn slot(&self, tag: u16) -> *mut u8 {
        let at = usize::from(tag) * SMALL_WRITE;
        assert!(at + SMALL_WRITE <= self.len, "tag {tag} beyond the staging block");
        // SAFETY: `at` is inside the block (checked), whose pointer covers
        // all of it.
        unsafe { self.stage.as_ptr().add(at) }
    }
}

impl Drop for Mixed {
    fn drop(&mut self) {
        // SAFETY: `stage` and `len` are the Box<[u8]> made in `new`, given
        // back once. (A queue that may still have a send reading the block
        // forgets its Mixed instead of dropping it: see NbdQueue's Drop.)
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.stage.as_ptr(), self.len)) });
    }
}

impl std::fmt::Debug for NbdQueue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdQueue").field("q_id", &self.q_id).field("dead", &self.dead.get()).finish()
    }
}

impl<'a> NbdQueue<'a> {
    pub(super) fn new(nbd: &'a Nbd, sock: OwnedFd, q: &QueueContext, zero: Option<OwnedFd>, mixed: Option<Mixed>) -> NbdQueue<'a> {
        let tags = (0..q.depth)
            .map(|_| Tag {
                st: Cell::new(St::Idle),
                cmd: Cell::new(0),
                flags: Cell::new(0),
                offset: Cell::new(0),
                len: Cell::new(0),
                data: Cell::new(std::ptr::null_mut()),
                covered: RefCell::new(Vec::with_capacity(4)),
                holes: RefCell::new(Vec::with_capacity(MAX_HOLES)),
                err: Cell::new(0),
                payload: Cell::new((0, 0)),
                gen: Cell::new(0),
                sent: Cell::new(true),
                fixed: Cell::new(0),
                waker: WakerSlot::default(),
            })
            .collect();
        NbdQueue {
            nbd,
            sock_fd: Cell::new(sock.as_raw_fd()),
            sock: RefCell::new(sock),
            q_id: q.q_id,
            tags,
            sendq: RefCell::new(VecDeque::with_capacity(usize::from(q.depth) + 1)),
            bg: WakerSlot::default(),
            hold: Cell::new(false),
            zc: zero.is_some(),
            zero,
            mixed,
            big_reads: Cell::new(0),
            dead: Cell::new(false),
            down: Cell::new(false),
            sending: Cell::new(false),
            batch: Cell::new(false),
            torn: Cell::new(false),
            stats: Cell::new(NbdStats::default()),
            backoff: Cell::new(Duration::ZERO),
        }
    }

    /// Counts something in the queue's [`NbdStats`].
    pub(super) fn count(&self, f: impl FnOnce(&mut NbdStats)) {
        let mut st = self.stats.get();
        f(&mut st);
        self.stats.set(st);
    }

    /// The connection's socket.
    pub(super) fn sock(&self) -> BorrowedFd<'_> {
        // SAFETY: `sock_fd` is the descriptor `sock` owns, which stays open
        // while `self` lives; it is replaced (and the old one closed) only
        // once no operation on it is pending or about to be pushed.
        unsafe { BorrowedFd::borrow_raw(self.sock_fd.get()) }
    }

    pub(super) fn cookie(&self, tag: u16) -> u64 {
        (u64::from(self.q_id) << 48) | (u64::from(self.tags[usize::from(tag)].gen.get()) << 16) | u64::from(tag)
    }

    /// The tag a reply's cookie names, if it names a request of this queue
    /// that waits for its reply.
    pub(super) fn tag_of(&self, cookie: u64) -> Option<u16> {
        let (q, gen, tag) = ((cookie >> 48) as u16, (cookie >> 16) as u32, cookie as u16);
        let t = self.tags.get(usize::from(tag))?;
        (q == self.q_id && t.gen.get() == gen && t.st.get() == St::Waiting).then_some(tag)
    }

    pub(super) fn park_bg(&self, cx: &Context<'_>) {
        self.bg.park(cx);
    }

    pub(super) fn wake_bg(&self) {
        self.bg.wake();
    }

    /// Closes the connection: every request in flight and every later one
    /// fails with EIO.
    pub(super) fn fail(&self, why: impl FnOnce() -> String) {
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
    /// [`NbdOptions::reconnect`](super::NbdOptions::reconnect), requests wait while the reader makes it
    /// again; else as [`NbdQueue::fail`].
    pub(super) fn lose(&self, why: impl FnOnce() -> String) {
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
}

/// Whether a socket operation's error says the connection is lost (made
/// again with `--recovery`), rather than something that would fail again on
/// a new connection (the connection is closed then).
pub(super) fn connection_lost(e: Errno) -> bool {
    matches!(
        e.raw(),
        libc::EPIPE
            | libc::ECONNRESET
            | libc::ECONNABORTED
            | libc::ENOTCONN
            | libc::ESHUTDOWN
            | libc::ETIMEDOUT
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH
            | libc::ENETDOWN
    )
}

/// How a request moves part of its data over the connection.
#[derive(Debug, Clone, Copy)]
enum Move {
    /// Receive from the socket into the request's buffer (copy data path:
    /// one `MSG_WAITALL` receive).
    RecvCopy,
    /// Read from the socket into the request's pages (zero copy:
    /// READ_FIXED, repeated while short).
    Recv,
    /// Zero part of the request's pages (zero copy: READ_FIXED from
    /// `/dev/zero`).
    Zero,
}

impl NbdQueue<'_> {
    /// Moves the request's data `at..at + n` as `how` says. An error says
    /// what went wrong, and whether the connection is what failed (it ended,
    /// or the socket refused: the connection is lost) or something else did
    /// (`/dev/zero`, the request's buffer: the connection is closed, as
    /// making it again would meet the same error).
    async fn move_data(&self, io: &mut Io<'_>, how: Move, at: u32, n: u32) -> Result<(), (String, bool)> {
        let (at, n) = (at as usize, n as usize);
        let conn = |e: Errno| (e.to_string(), !matches!(how, Move::Zero) && connection_lost(e));
        if let Move::RecvCopy = how {
            return match io.recv_data(self.sock(), at..at + n, libc::MSG_WAITALL).await {
                Ok(k) if k as usize == n => Ok(()),
                Ok(k) => Err((format!("the payload ended after {k} of {n} bytes"), true)),
                Err(e) => Err(conn(e)),
            };
        }
        let mut done = 0;
        while done < n {
            let range = at + done..at + n;
            let got = match how {
                Move::Recv => {
                    self.count(|s| s.payload_reads += 1);
                    io.read_at(self.sock(), range, 0).await
                }
                Move::Zero => match &self.zero {
                    Some(z) => io.read_at(z, range, 0).await,
                    None => return Err(("no /dev/zero".into(), false)),
                },
                Move::RecvCopy => unreachable!(),
            };
            match got {
                Ok(0) if matches!(how, Move::Zero) => return Err(("/dev/zero read nothing".into(), false)),
                Ok(0) => return Err((format!("the connection ended after {done} of {n} bytes"), true)),
                Ok(k) => done += k as usize,
                Err(e) => return Err(conn(e)),
            }
        }
        Ok(())
    }

    /// Zeroes the holes its reply's chunks left in a READ's pages under zero
    /// copy ([`Tag::holes`]), once the reply is complete.
    async fn zero_holes(&self, io: &mut Io<'_>, t: &Tag) -> Result<(), (String, bool)> {
        let kept = t.holes.borrow().len();
        for i in 0..kept {
            let (at, n) = t.holes.borrow()[i];
            self.move_data(io, Move::Zero, at, n).await?;
            self.count(|s| s.holes_zeroed += 1);
        }
        Ok(())
    }

    /// A request could not move its data (`move_data`): the connection is
    /// lost, or closed when something else failed.
    fn move_failed(&self, what: &str, (why, lost): (String, bool)) {
        if lost {
            self.lose(|| format!("{what}: {why}"));
        } else {
            self.fail(|| format!("{what}: {why}"));
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
        // Under zero copy: where the request's pages are in the ring, for the
        // writer to send a WRITE's payload from.
        let small = self.mixed.is_some() && cmd == CMD_WRITE && len > 0 && len <= SMALL_WRITE;
        if self.zc && cmd == CMD_WRITE && !small {
            let Some(index) = io.fixed_index() else { return Err(Errno::EIO) };
            t.fixed.set(index);
        }
        // Under `mixed`, a short WRITE's payload is copied out of its pages
        // now, to go out with its header in one `sendmsg`.
        let staged = match &self.mixed {
            Some(m) if small => {
                let slot = m.slot(tag);
                // SAFETY: the slot is tag `tag`'s SMALL_WRITE bytes (len is no
                // more), written only here and read only by the writer's
                // sendmsg of this tag's request, which is over: the tag's
                // previous request was answered, and an answer waits for
                // `sent`. No reference covers the slot.
                if unsafe { transfer(m.char_dev.as_fd(), slot, len, io.user_copy_offset(), Dir::FromFd) }.is_err() {
                    return Err(Errno::EIO);
                }
                self.count(|s| s.staged_writes += 1);
                slot
            }
            _ => std::ptr::null_mut(),
        };
        let data = match cmd {
            _ if !staged.is_null() => staged,
            // Under zero copy the data is moved by fixed-buffer operations on
            // the request's pages (this future's `Io::read_at`, the writer's
            // WRITE_FIXED, or under `mixed` the reader's pwrite of
            // /dev/ublkcN), never by pointer.
            _ if self.zc => std::ptr::null_mut(),
            // Only read through (by the writer's sendmsg).
            CMD_WRITE => io.data().as_ptr().cast_mut(),
            CMD_READ => io.data_mut().as_mut_ptr(),
            _ => std::ptr::null_mut(),
        };
        if !self.zc && matches!(cmd, CMD_WRITE | CMD_READ) && io.data().len() != len {
            // No buffer of the request's size (the queue refuses user copy).
            return Err(Errno::EINVAL);
        }
        t.data.set(data);
        t.reset_reply();
        t.gen.set(t.gen.get().wrapping_add(1));
        t.sent.set(false);
        t.st.set(St::Waiting);
        let big = self.mixed.is_some() && cmd == CMD_READ && len >= DIRECT_MIN;
        if big {
            self.big_reads.set(self.big_reads.get() + 1);
        }
        self.sendq.borrow_mut().push_back(tag);
        self.wake_bg();

        // Until the reply has come and the writer is done with the request
        // (its data may be answered, and its buffer reused, only then); under
        // zero copy, moving a READ's data when the reader asks.
        let mut answer = None;
        loop {
            let ev = poll_fn(|cx| {
                if answer.is_none() {
                    match t.st.get() {
                        St::Waiting if !self.dead.get() => {}
                        s => return Poll::Ready(s),
                    }
                } else if t.sent.get() {
                    return Poll::Ready(St::Idle);
                }
                t.park(cx);
                Poll::Pending
            })
            .await;
            match ev {
                _ if answer.is_some() => break,
                St::Replied(0) => {
                    answer = Some(match self.zero_holes(&mut io, t).await {
                        Ok(()) => Ok(if matches!(req.op, Op::Read | Op::Write) { len32 } else { 0 }),
                        Err(e) => {
                            self.move_failed("zeroing a hole", e);
                            Err(Errno::EIO)
                        }
                    });
                }
                St::Replied(e) => answer = Some(Err(Errno::new(errno(e)))),
                s @ (St::Payload | St::Hole) => {
                    // The reader waits meanwhile (`hold`).
                    let (at, n) = t.payload.get();
                    let how = match s {
                        St::Hole => Move::Zero,
                        _ if self.zc => Move::Recv,
                        _ => Move::RecvCopy,
                    };
                    let got = self.move_data(&mut io, how, at, n).await;
                    if got.is_ok() && s == St::Hole {
                        self.count(|s| s.holes_zeroed += 1);
                    }
                    let failed = got.is_err();
                    if let Err(e) = got {
                        let what = if matches!(how, Move::Zero) { "zeroing a hole" } else { "receiving a READ payload" };
                        self.move_failed(what, e);
                    }
                    // Received: the reader goes on with the reply. Lost with
                    // the connection: re-issued on the next one.
                    t.st.set(St::Waiting);
                    self.hold.set(false);
                    self.wake_bg();
                    if failed && self.dead.get() {
                        answer = Some(Err(Errno::EIO));
                    }
                }
                St::Waiting | St::Idle => answer = Some(Err(Errno::EIO)),
            }
        }
        t.st.set(St::Idle);
        if big {
            self.big_reads.set(self.big_reads.get() - 1);
        }
        answer.unwrap_or(Err(Errno::EIO))
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
        if self.sending.get() {
            // The writer was dropped inside a send that the queue could not
            // reap at its stop (it leaks such operations): the send may
            // still read staged payloads, so their block is leaked too.
            if let Some(m) = self.mixed.take() {
                std::mem::forget(m);
            }
        }
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

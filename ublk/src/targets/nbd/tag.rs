//! One tag's request as its queue's connection sees it: where it stands
//! with the server ([`St`]), what was sent, and which parts of a READ's
//! data the reply's chunks have filled so far.

use std::cell::{Cell, RefCell};
use std::task::{Context, Waker};

/// Where a request stands with the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum St {
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
    /// Under zero copy: a hole chunk covers [`Tag::payload`], which the
    /// request zeroes in its pages (they are not in this process) while the
    /// reader waits: only when [`Tag::holes`] is full.
    Hole,
}

/// One tag's request as the connection sees it.
pub(super) struct Tag {
    pub(super) st: Cell<St>,
    pub(super) cmd: Cell<u16>,
    pub(super) flags: Cell<u16>,
    pub(super) offset: Cell<u64>,
    pub(super) len: Cell<u32>,
    /// The request's data (its own buffer, `len` bytes): a WRITE's, which
    /// the writer sends, or the one a READ fills, which the reader writes
    /// (copies out of its receive buffer, zeros for holes) while the
    /// request's future waits for its reply: the request is not answered,
    /// so its buffer not reused, before the reader is done with it
    /// (`St::Replied`), and the future holds no reference into the data
    /// meanwhile. Null for other commands.
    pub(super) data: Cell<*mut u8>,
    /// Of a READ's reply so far: the ranges of its data that chunks filled
    /// (sorted, disjoint, adjacent ones merged), and the first error chunk's
    /// error (0: none).
    pub(super) covered: RefCell<Vec<(u32, u32)>>,
    pub(super) err: Cell<u32>,
    /// Under zero copy: the reply's hole chunks so far (offset, length in
    /// the data), which the request zeroes in its pages (they are not in
    /// this process) once the reply is complete, while the reader goes on.
    /// At most [`MAX_HOLES`], the capacity it is made with, so it never
    /// allocates.
    pub(super) holes: RefCell<Vec<(u32, u32)>>,
    /// Where in the data the payload of [`St::Payload`] goes: (offset, length).
    pub(super) payload: Cell<(u32, u32)>,
    /// Bumped per request: part of the cookie, so a late or repeated reply
    /// for an earlier request on this tag matches nothing.
    pub(super) gen: Cell<u32>,
    /// Whether the writer is done with the request (sent, or given up): its
    /// data is not read any more.
    pub(super) sent: Cell<bool>,
    /// Under zero copy: the fixed-buffer index of the request's pages in
    /// the queue's ring, from which the writer sends a WRITE's payload.
    pub(super) fixed: Cell<u16>,
    pub(super) waker: WakerSlot,
}

/// The waker of one future of the queue's thread (a request's, or the
/// reader's and writer's), kept while it waits.
#[derive(Default)]
pub(super) struct WakerSlot(RefCell<Option<Waker>>);

impl WakerSlot {
    /// Keeps `cx`'s waker (unless the one kept already wakes the same task).
    pub(super) fn park(&self, cx: &Context<'_>) {
        let mut w = self.0.borrow_mut();
        if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *w = Some(cx.waker().clone());
        }
    }

    pub(super) fn wake(&self) {
        if let Some(w) = self.0.borrow().as_ref() {
            w.wake_by_ref();
        }
    }
}

impl Tag {
    pub(super) fn park(&self, cx: &Context<'_>) {
        self.waker.park(cx);
    }

    pub(super) fn wake(&self) {
        self.waker.wake();
    }

    /// A new request or a re-issued one: no part of a reply yet.
    pub(super) fn reset_reply(&self) {
        self.covered.borrow_mut().clear();
        self.holes.borrow_mut().clear();
        self.err.set(0);
    }

    /// A content chunk of the reply covers `n` bytes of the export at
    /// `offset`: where that is in the request's data, if it lies inside the
    /// request, overlaps no earlier chunk and leaves the covered part in at
    /// most [`MAX_PIECES`] separate ranges (recorded as covered then).
    pub(super) fn claim(&self, offset: u64, n: u32) -> Option<usize> {
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
    /// Keeps a hole chunk (`n` bytes at `rel` of the data) for the request
    /// to zero once its reply is complete. False when [`MAX_HOLES`] are
    /// kept already.
    pub(super) fn keep_hole(&self, rel: u32, n: u32) -> bool {
        let mut h = self.holes.borrow_mut();
        if h.len() == MAX_HOLES {
            return false;
        }
        h.push((rel, n));
        true
    }

    pub(super) fn covered_all(&self) -> bool {
        *self.covered.borrow() == [(0, self.len.get())]
    }
}

/// The most hole chunks of a reply a request keeps to zero after its reply
/// ([`Tag::holes`]); a hole past them is zeroed at once, the reader waiting
/// ([`St::Hole`]).
pub(super) const MAX_HOLES: usize = 8;

/// The most separate ranges a READ's chunks may leave covered at a time:
/// a server's chunks in order (or each next to an earlier one) leave one;
/// more than this many gaps is a server that makes the client work (each
/// chunk costs a walk over the ranges), so the connection is closed.
const MAX_PIECES: usize = 1024;

#[cfg(test)]
mod tests {
    use super::super::proto::CMD_READ;
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
            holes: RefCell::new(Vec::with_capacity(MAX_HOLES)),
            err: Cell::new(0),
            payload: Cell::new((0, 0)),
            gen: Cell::new(0),
            sent: Cell::new(true),
            fixed: Cell::new(0),
            waker: WakerSlot::default(),
        }
    }

    /// A request keeps up to MAX_HOLES holes to zero, in their order,
    /// without allocating; a new reply starts with none.
    #[test]
    fn holes_are_kept_up_to_the_capacity_then_refused() {
        let t = tag(0, 1 << 20);
        let cap = t.holes.borrow().capacity();
        for i in 0..MAX_HOLES as u32 {
            assert!(t.keep_hole(i * 8192, 4096), "hole {i}");
        }
        assert!(!t.keep_hole(1 << 19, 4096), "one past MAX_HOLES");
        assert_eq!(t.holes.borrow().len(), MAX_HOLES);
        assert_eq!(t.holes.borrow()[1], (8192, 4096));
        assert_eq!(t.holes.borrow().capacity(), cap, "no allocation");
        t.reset_reply();
        assert!(t.holes.borrow().is_empty());
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

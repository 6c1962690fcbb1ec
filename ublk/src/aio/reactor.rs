//! The queue's ring as the futures of one queue see it: operations pushed
//! with a slot each, completions routed back to the slot and its waker, and
//! the ready set that wakers (on this thread or any other) mark.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Wake, Waker};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::fixed::FixedTable;

/// user_data bit of an async operation (the low 32 bits are its slot).
pub(crate) const ASYNC_OP: u64 = 1 << 33;
/// user_data of cancellations pushed when an operation's future is dropped.
pub(crate) const OP_CANCEL: u64 = u64::MAX - 2;

/// What an operation does with the tag's data buffer while in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DataUse {
    /// Nothing.
    None,
    /// The kernel reads it (a write to a file).
    Read,
    /// The kernel writes it (a read from a file).
    Write,
}

/// Per tag: its operations in flight, and which of them touch its data.
#[derive(Debug, Default)]
pub(crate) struct TagOps {
    pub(crate) ops: Cell<u32>,
    pub(crate) data_reads: Cell<u32>,
    pub(crate) data_writes: Cell<u32>,
}

#[derive(Debug)]
enum State {
    Free,
    /// In flight; the future waits.
    Pending,
    /// Completed, result not yet taken by the future.
    Done(i32),
    /// In flight; its future was dropped. What the operation may still
    /// touch is kept here until the completion arrives.
    Orphan,
}

/// One operation's slot. Boxed, so that what the kernel reads at submission
/// (a timespec) stays put while the table grows.
pub(crate) struct Slot {
    state: State,
    tag: Option<u16>,
    data: DataUse,
    waker: Option<Waker>,
    keep: Option<Box<dyn Any>>,
    /// The timeout of a TIMEOUT operation (read by the kernel at submission).
    pub(crate) ts: types::Timespec,
}

/// The operations of one queue.
#[derive(Default)]
struct OpTable {
    /// Boxed: the kernel reads a slot's timespec at submission, which may
    /// come after the table grew.
    #[allow(clippy::vec_box)]
    slots: Vec<Box<Slot>>,
    free: Vec<u32>,
    in_flight: u32,
}

/// Tags whose futures should be polled, marked by wakers from any thread.
#[derive(Debug)]
pub(crate) struct Ready {
    bits: Box<[AtomicU64]>,
    /// Whether the queue thread is awake or already told: a wake from
    /// another thread writes the eventfd only when this goes false -> true.
    /// The queue stores false then reads the bits; a waker sets a bit then
    /// swaps this: all four SeqCst, so at least one of them sees the other
    /// (no lost wake-up on weakly ordered CPUs either).
    notified: AtomicBool,
    efd: OwnedFd,
}

impl Ready {
    pub(crate) fn new(depth: u16, efd: OwnedFd) -> Ready {
        let words = usize::from(depth).div_ceil(64);
        Ready { bits: (0..words).map(|_| AtomicU64::new(0)).collect(), notified: AtomicBool::new(true), efd }
    }

    pub(crate) fn set(&self, tag: u16) {
        self.bits[usize::from(tag / 64)].fetch_or(1 << (tag % 64), Ordering::SeqCst);
    }

    fn notify(&self) {
        if !self.notified.swap(true, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our eventfd; a full
            // counter (EAGAIN) means a wake-up is pending anyway.
            unsafe { libc::write(self.efd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
        }
    }

    /// Takes the ready tags of word `i`.
    pub(crate) fn take(&self, i: usize) -> u64 {
        self.bits[i].swap(0, Ordering::AcqRel)
    }

    pub(crate) fn words(&self) -> usize {
        self.bits.len()
    }

    pub(crate) fn any(&self) -> bool {
        self.bits.iter().any(|w| w.load(Ordering::SeqCst) != 0)
    }

    /// The queue thread is about to sleep (false) or is awake (true).
    pub(crate) fn set_awake(&self, awake: bool) {
        self.notified.store(awake, Ordering::SeqCst);
    }

    pub(crate) fn efd(&self) -> i32 {
        self.efd.as_raw_fd()
    }
}

/// The waker of one tag's future: marks the tag ready, and wakes the queue
/// thread through its eventfd if it may be asleep.
struct TagWaker {
    tag: u16,
    ready: Arc<Ready>,
}

impl Wake for TagWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.set(self.tag);
        self.ready.notify();
    }
}

/// The queue's ring and operation table, shared (on the queue's thread) by
/// the queue and the futures of its requests.
pub(crate) struct Reactor {
    pub(crate) ring: RefCell<IoUring<squeue::Entry, cqueue::Entry>>,
    ops: RefCell<OpTable>,
    pub(crate) tags: Box<[TagOps]>,
    pub(crate) ready: Arc<Ready>,
    pub(crate) wakers: Box<[Waker]>,
    /// Target files registered after `/dev/ublkcN` (fixed files 1..=files).
    pub(crate) files: u32,
    /// The targets' slots of the ring's buffer table, if it has one.
    pub(crate) fixed: Option<Rc<FixedTable>>,
}

impl Reactor {
    pub(crate) fn new(
        ring: IoUring<squeue::Entry, cqueue::Entry>,
        depth: u16,
        efd: OwnedFd,
        files: u32,
        fixed: Option<Rc<FixedTable>>,
    ) -> Reactor {
        // One more than the tags: the queue's background task (see
        // `QueueTarget::run`) has index `depth`.
        let ready = Arc::new(Ready::new(depth + 1, efd));
        let wakers = (0..=depth).map(|tag| Waker::from(Arc::new(TagWaker { tag, ready: ready.clone() }))).collect();
        Reactor {
            ring: RefCell::new(ring),
            ops: RefCell::new(OpTable::default()),
            tags: (0..depth).map(|_| TagOps::default()).collect(),
            ready,
            wakers,
            files,
            fixed,
        }
    }

    /// Operations in flight (the kernel may still touch their memory).
    pub(crate) fn in_flight(&self) -> u32 {
        self.ops.borrow().in_flight
    }

    /// Makes room for `n` SQEs pushed next with nothing submitted between
    /// them (a linked chain must reach the kernel in one submission): submits
    /// what is queued if fewer are free. False if the submission queue
    /// cannot hold `n` at all, or the kernel took fewer than needed (a full
    /// completion queue: try again once completions are reaped).
    pub(crate) fn reserve(&self, n: usize) -> bool {
        let mut ring = self.ring.borrow_mut();
        let cap = ring.submission().capacity();
        if n > cap {
            return false;
        }
        if cap - ring.submission().len() < n {
            let _ = ring.submit();
        }
        let queued = ring.submission().len();
        cap - queued >= n
    }

    /// Pushes `sqe` to the submission queue, submitting first if it is full.
    pub(crate) fn push(&self, sqe: &squeue::Entry) {
        let mut ring = self.ring.borrow_mut();
        // SAFETY: every caller states why the memory `sqe` names stays valid
        // until its completion.
        if unsafe { ring.submission().push(sqe) }.is_err() {
            // Full: hand the kernel what is queued, then there is room.
            let _ = ring.submit();
            // SAFETY: as above.
            let r = unsafe { ring.submission().push(sqe) };
            assert!(r.is_ok(), "queue ring full after submitting");
        }
    }

    /// Starts an operation for `tag`: takes a slot, lets `build` make the
    /// SQE (it may point into the slot's stable storage), pushes it.
    ///
    /// # Safety
    /// The memory the SQE names must stay valid until its completion: the
    /// tag's buffer (which outlives the queue's commands), the slot's own
    /// storage, or memory the caller keeps until then (see [`Reactor::orphan`]).
    pub(crate) unsafe fn start(
        &self,
        tag: Option<u16>,
        data: DataUse,
        submit_now: bool,
        build: impl FnOnce(&mut Slot) -> squeue::Entry,
    ) -> u32 {
        let (idx, sqe) = {
            let mut t = self.ops.borrow_mut();
            let idx = match t.free.pop() {
                Some(i) => i,
                None => {
                    t.slots.push(Box::new(Slot {
                        state: State::Free,
                        tag: None,
                        data: DataUse::None,
                        waker: None,
                        keep: None,
                        ts: types::Timespec::new(),
                    }));
                    (t.slots.len() - 1) as u32
                }
            };
            let slot = &mut t.slots[idx as usize];
            let sqe = build(slot).user_data(ASYNC_OP | u64::from(idx));
            (idx, sqe)
        };
        // Pushed before anything counts it: a push that panics leaves no
        // operation counted that the kernel never got (the slot is lost).
        self.push(&sqe);
        {
            let mut t = self.ops.borrow_mut();
            t.in_flight += 1;
            let slot = &mut t.slots[idx as usize];
            slot.state = State::Pending;
            slot.tag = tag;
            slot.data = data;
        }
        if let Some(tag) = tag {
            let t = &self.tags[usize::from(tag)];
            t.ops.set(t.ops.get() + 1);
            match data {
                DataUse::None => {}
                DataUse::Read => t.data_reads.set(t.data_reads.get() + 1),
                DataUse::Write => t.data_writes.set(t.data_writes.get() + 1),
            }
        }
        if submit_now {
            // The SQE names a descriptor by number: the kernel must take its
            // file now, while the caller's borrow of it still holds, not at
            // the next enter, by which time it may be closed and the number
            // reused (the operation would act on another file). Without
            // IOSQE_ASYNC the kernel resolves the file during this submit.
            let _ = self.ring.borrow_mut().submit();
        }
        idx
    }

    /// Cancels every operation in flight, one by one (by user_data), so that
    /// the queue's own polls (teardown wake-up, cross-thread notify) stay.
    pub(crate) fn cancel_all(&self, user_data: u64) {
        let pending: Vec<u32> = {
            let t = self.ops.borrow();
            t.slots.iter().enumerate().filter(|(_, s)| matches!(s.state, State::Pending | State::Orphan)).map(|(i, _)| i as u32).collect()
        };
        for idx in pending {
            let cancel = opcode::AsyncCancel::new(ASYNC_OP | u64::from(idx)).build().user_data(user_data);
            self.push(&cancel);
        }
    }

    /// Gives up on the operations in flight (the ring is closing without
    /// their completions): what they may still touch is leaked, never freed.
    pub(crate) fn leak_ops(&self) {
        let slots = std::mem::take(&mut self.ops.borrow_mut().slots);
        std::mem::forget(slots);
    }

    /// The operation in `idx` completed with `res`. Returns the tag it
    /// belonged to.
    pub(crate) fn complete(&self, idx: u32, res: i32) -> Option<u16> {
        let mut orphan_keep = None;
        let mut t = self.ops.borrow_mut();
        let slot = t.slots.get_mut(idx as usize)?;
        let (tag, data) = (slot.tag, slot.data);
        let waker = match slot.state {
            State::Pending => {
                slot.state = State::Done(res);
                slot.waker.take()
            }
            State::Orphan => {
                slot.state = State::Free;
                slot.waker = None;
                // Dropped below, after the bookkeeping: the kept value is
                // the target's, and its drop may panic.
                orphan_keep = slot.keep.take();
                t.free.push(idx);
                None
            }
            // A second completion for one slot: not ours to route.
            State::Free | State::Done(_) => return None,
        };
        t.in_flight -= 1;
        drop(t);
        if let Some(tag) = tag {
            let o = &self.tags[usize::from(tag)];
            o.ops.set(o.ops.get() - 1);
            match data {
                DataUse::None => {}
                DataUse::Read => o.data_reads.set(o.data_reads.get() - 1),
                DataUse::Write => o.data_writes.set(o.data_writes.get() - 1),
            }
        }
        drop(orphan_keep);
        if let Some(w) = waker {
            w.wake();
        }
        tag
    }

    /// The result of the operation in `idx`, if it completed (the slot is
    /// then free); else records `waker` to be woken when it does.
    pub(crate) fn poll_result(&self, idx: u32, waker: &Waker) -> Option<i32> {
        let mut t = self.ops.borrow_mut();
        let slot = &mut t.slots[idx as usize];
        match slot.state {
            State::Done(res) => {
                slot.state = State::Free;
                slot.waker = None;
                slot.keep = None;
                t.free.push(idx);
                Some(res)
            }
            State::Pending => {
                if !slot.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
                    slot.waker = Some(waker.clone());
                }
                None
            }
            State::Free | State::Orphan => unreachable!("operation slot polled after its result was taken"),
        }
    }

    /// The future of the operation in `idx` is gone. If the operation is
    /// still in flight, `keep` (what it may touch) is kept until it
    /// completes and the operation is cancelled; if it completed, the slot
    /// is freed.
    pub(crate) fn orphan(&self, idx: u32, keep: Option<Box<dyn Any>>) {
        let mut t = self.ops.borrow_mut();
        let slot = &mut t.slots[idx as usize];
        match slot.state {
            State::Pending => {
                slot.state = State::Orphan;
                if keep.is_some() {
                    slot.keep = keep;
                }
                slot.waker = None;
                drop(t);
                let cancel = opcode::AsyncCancel::new(ASYNC_OP | u64::from(idx)).build().user_data(OP_CANCEL);
                self.push(&cancel);
            }
            State::Done(_) => {
                slot.state = State::Free;
                slot.waker = None;
                slot.keep = None;
                t.free.push(idx);
            }
            State::Free | State::Orphan => {}
        }
    }

    /// Keeps `keep` in the slot of the operation `idx` until the operation
    /// is over and its result taken.
    pub(crate) fn keep_until_done(&self, idx: u32, keep: Box<dyn Any>) {
        self.ops.borrow_mut().slots[idx as usize].keep = Some(keep);
    }
}

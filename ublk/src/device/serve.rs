//! Serving a device: the queue threads (one per queue, or several with
//! per-I/O daemons), START_DEV (or END_USER_RECOVERY), `on_live` and the
//! [`StopHandle`], the events the threads send, and the teardown: STOP_DEV,
//! joining the threads, DEL_DEV.

use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ublk_sys as sys;

use super::{DataPath, Device};
use crate::aio::AsyncTarget;
use crate::buffers::IoBufs;
use crate::ctrl::Control;
use crate::error::{Error, Result};
use crate::placement::{self, Follower, Placement, Plan};
use crate::queue::{EventFd, Queue, QueueStats, TagShare};
use crate::target::{Target, WriteCache};

/// Messages from queue threads and stop handles to the serving thread.
enum Event {
    Fetched,
    /// A queue's target panicked; the queue fails its I/O until stopped.
    Panicked(u16),
    Failed(Error),
    Exited(u16, Result<QueueStats>),
    Stop,
}

/// Asks a serving device to stop; cloneable and sendable to any thread.
#[derive(Debug, Clone)]
pub struct StopHandle(mpsc::Sender<Event>);

impl StopHandle {
    /// Requests STOP_DEV and teardown; [`Device::serve`] then returns.
    pub fn stop(&self) {
        let _ = self.0.send(Event::Stop);
    }
}

/// What a device's queue threads serve: a [`Target`] or an [`AsyncTarget`].
trait Serve: Sync {
    fn needs_data(&self) -> bool;
    fn zero_copy(&self) -> bool;
    /// Whether the queues need buffers for request data, with or without
    /// `UBLK_F_USER_COPY` (`aio::needs_buffers`).
    fn needs_buffers(&self, user_copy: bool) -> bool;
    fn write_cache(&self) -> WriteCache;
    fn files(&self) -> Vec<std::os::fd::RawFd>;
    fn run(&self, q: &mut Queue, on_panic: &dyn Fn()) -> Result<QueueStats>;
}

struct Sync_<'a, T>(&'a T);
struct Async_<'a, T>(&'a T);

impl<T: Target> Serve for Sync_<'_, T> {
    fn needs_data(&self) -> bool {
        self.0.needs_data()
    }
    fn zero_copy(&self) -> bool {
        false
    }
    fn needs_buffers(&self, _user_copy: bool) -> bool {
        self.0.needs_data()
    }
    fn write_cache(&self) -> WriteCache {
        self.0.write_cache()
    }
    fn files(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }
    fn run(&self, q: &mut Queue, on_panic: &dyn Fn()) -> Result<QueueStats> {
        q.serve_notify(self.0, on_panic)
    }
}

impl<T: AsyncTarget> Serve for Async_<'_, T> {
    fn needs_data(&self) -> bool {
        self.0.needs_data()
    }
    fn zero_copy(&self) -> bool {
        self.0.zero_copy()
    }
    fn needs_buffers(&self, user_copy: bool) -> bool {
        crate::aio::needs_buffers(self.0, user_copy)
    }
    fn write_cache(&self) -> WriteCache {
        self.0.write_cache()
    }
    fn files(&self) -> Vec<std::os::fd::RawFd> {
        self.0.files().iter().map(|f| f.as_raw_fd()).collect()
    }
    fn run(&self, q: &mut Queue, on_panic: &dyn Fn()) -> Result<QueueStats> {
        q.serve_async_notify(self.0, on_panic)
    }
}

/// What [`Device::serve`] learns while the device runs.
struct Live {
    /// The kernel quiesced the device (QUIESCE_DEV) for another server to
    /// recover: it is left as it is.
    quiesced: bool,
    /// A [`StopHandle`] asked for the stop.
    stop_requested: bool,
    /// Still taking over a device (END_USER_RECOVERY not done).
    recovering: bool,
    /// A panic of `on_live`, resumed after teardown.
    panic: Option<Box<dyn std::any::Any + Send>>,
}

/// Sends `Exited` when a queue thread ends, even by panic.
struct ExitGuard {
    tx: mpsc::Sender<Event>,
    q_id: u16,
    sent: bool,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        if !self.sent {
            let why = if std::thread::panicking() { "the queue thread panicked" } else { "the queue thread ended" };
            let _ = self.tx.send(Event::Exited(self.q_id, Err(Error::Queue { q_id: self.q_id, why: why.into() })));
        }
    }
}

impl Device {
    /// Each queue thread's placement plan, from GET_QUEUE_AFFINITY (thread
    /// `t` of queue `q` at `q * threads_per_queue + t`).
    fn queue_plans(&mut self) -> Vec<Plan> {
        let nq = self.info.nr_hw_queues;
        let n = self.serving.threads_per_queue;
        if self.serving.placement == Placement::Unpinned {
            return vec![Plan::default(); usize::from(nq) * usize::from(n)];
        }
        let online = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let id = self.info.dev_id;
        let home: Vec<Vec<usize>> = (0..nq).map(|q| self.ctrl.get_queue_affinity(id, q).unwrap_or_default()).collect();
        placement::thread_plans(self.serving.placement, &home, online, n)
    }

    /// Serves the device with `target` until stopped: spawns one thread per
    /// queue (each creates its [`Queue`], fetches every tag and serves; with
    /// [`DeviceBuilder::threads_per_queue`](crate::DeviceBuilder::threads_per_queue), that many per queue, each with
    /// its share of the tags), waits until all have fetched, START_DEV, runs
    /// `on_live` (the block device exists from then on) with a
    /// [`StopHandle`] on a thread of its own, and serves until that handle
    /// is used or a queue fails. Then STOP_DEV, joins the threads, closes
    /// `/dev/ublkcN` and DEL_DEV. Returns each queue thread's counts, queue
    /// by queue, thread by thread ([`QueueStats::thread`]).
    ///
    /// Stopping waits up to [`DeviceBuilder::stop_grace`](crate::DeviceBuilder::stop_grace) for the target to finish the
    /// requests in flight; then its io_uring operations are cancelled and
    /// what is left fails with an error.
    ///
    /// Teardown does not wait for `on_live`: if a queue dies while `on_live`
    /// is still running (say, doing I/O to the disk, which then can never
    /// complete), the device is stopped, which fails that I/O. `serve`
    /// returns once `on_live` has returned too; a panic in `on_live` stops
    /// the device and is resumed after teardown.
    ///
    /// Before START_DEV the device's parameters get the target's
    /// [`WriteCache`] attributes, so FLUSH and FUA reach
    /// the target when it needs them. A device with `UBLK_F_USER_COPY`
    /// ([`DataPath::NoData`]) has no buffers: a target that [needs
    /// data](Target::needs_data) is refused.
    pub fn serve<T: Target>(self, target: &T, on_live: impl FnOnce(&Device, StopHandle) + Send) -> Result<Vec<QueueStats>> {
        self.serve_with(&Sync_(target), on_live)
    }

    /// [`Device::serve`] with an [`AsyncTarget`]: each queue thread makes
    /// the target's object for its queue and runs every request as a future
    /// on that thread (see [`crate::aio`]).
    pub fn serve_async<T: AsyncTarget>(self, target: &T, on_live: impl FnOnce(&Device, StopHandle) + Send) -> Result<Vec<QueueStats>> {
        self.serve_with(&Async_(target), on_live)
    }

    fn serve_with<T: Serve>(mut self, target: &T, on_live: impl FnOnce(&Device, StopHandle) + Send) -> Result<Vec<QueueStats>> {
        if self.data_path() == DataPath::NoData && target.needs_data() {
            return Err(Error::InvalidConfig {
                what: "data path",
                why: "the device was created with UBLK_F_USER_COPY (DataPath::NoData), so the kernel hands the server no data, but this target reads or writes request data; create the device with DataPath::Copy or DataPath::UserCopy".into(),
            });
        }
        if self.data_path().is_zero_copy() && target.needs_data() && !target.zero_copy() {
            return Err(Error::InvalidConfig {
                what: "data path",
                why: format!("the device was created for zero copy ({}): request data stays in the kernel, reached only by an async target's Io::read_at/write_at, but this target reads or writes request data itself; create the device with DataPath::Copy or DataPath::UserCopy", self.data_path().name()),
            });
        }
        let threads = self.serving.threads_per_queue;
        TagShare { thread: 0, threads }.check(&self.info)?;
        self.apply_write_cache(target.write_cache())?;
        let (tx, rx) = mpsc::channel::<Event>();
        let wake = EventFd::new()?;
        let nq = self.info.nr_hw_queues;
        let info = self.info;
        let encoding = self.ctrl.encoding();
        let wake_fd = wake.raw();
        let plans = self.queue_plans();
        let served = placement::counters(plans.len().max(usize::from(nq) * usize::from(threads)));
        let busy_poll = self.serving.busy_poll;
        let stop_grace = self.serving.stop_grace;
        let occupy_every = self.serving.occupy_every;
        // The tags' buffers live here, not in the queue threads: after a
        // queue dies, the others' parked FETCHes may still name their
        // buffers until the device is deleted. The threads of a queue share
        // its buffers, each using only its own tags'.
        let zero_copy = info.flags & (sys::abi::UBLK_F_AUTO_BUF_REG | sys::abi::UBLK_F_SUPPORT_ZERO_COPY) != 0;
        let user_copy = crate::queue::user_copy(&info);
        // Without user copy the kernel copies into buffers whatever the
        // target needs.
        let no_bufs = zero_copy || (user_copy && !target.needs_buffers(true));
        // A target that needs data but no buffers copies through
        // /dev/ublkcN itself (QueueContext::char_dev).
        let wants_char = target.needs_data() && !target.needs_buffers(true);
        let mut bufs = Vec::new();
        for q in 0..nq {
            bufs.push(if no_bufs { None } else { Some(Arc::new(IoBufs::new(info.max_io_buf_bytes, info.queue_depth, q)?)) });
        }
        // Teardown has a control handle of its own, and the char device is
        // held here: `on_live` borrows the device meanwhile.
        let mut teardown = Control::open()?;
        teardown.remember(&info);
        let mut char_file = self.char_file.take();
        let char_fd = char_file.as_ref().expect("char device open").as_raw_fd();
        let mut live = Live { quiesced: false, stop_requested: false, recovering: self.recovering, panic: None };

        let result = std::thread::scope(|s| {
            let this: &Device = &self;
            let mut handles = Vec::new();
            // Thread t of queue q serves the queue's tags t, t + threads, ...
            for (q, t) in (0..nq).flat_map(|q| (0..threads).map(move |t| (q, t))) {
                let qtx = tx.clone();
                let i = usize::from(q) * usize::from(threads) + usize::from(t);
                let plan = plans.get(i).cloned().unwrap_or_default();
                let follower = Follower::new(i, &plan, served.clone());
                let qbufs = bufs[usize::from(q)].clone();
                let share = TagShare { thread: t, threads };
                let name = if threads == 1 { format!("ublk{}-q{q}", info.dev_id) } else { format!("ublk{}-q{q}t{t}", info.dev_id) };
                let spawned = std::thread::Builder::new().name(name).spawn_scoped(s, move || {
                    let tx = qtx;
                    placement::pin_to(&plan.start);
                    let mut guard = ExitGuard { tx: tx.clone(), q_id: q, sent: false };
                    let files = target.files();
                    let mut queue =
                        match Queue::with_bufs(char_fd, &info, q, share, encoding, Some(wake_fd), &files, qbufs, true, wants_char) {
                            Ok(queue) => queue,
                            Err(e) => {
                                guard.sent = true;
                                let _ = tx.send(Event::Failed(e));
                                return;
                            }
                        };
                    queue.set_busy_poll(busy_poll);
                    queue.set_follower(follower);
                    if let Err(e) = queue.occupy_auto_indexes(occupy_every) {
                        guard.sent = true;
                        let _ = tx.send(Event::Failed(e));
                        return;
                    }
                    if let Err(e) = queue.fetch_all() {
                        guard.sent = true;
                        let _ = tx.send(Event::Failed(e));
                        return;
                    }
                    let _ = tx.send(Event::Fetched);
                    let ptx = tx.clone();
                    let r = target.run(&mut queue, &|| {
                        let _ = ptx.send(Event::Panicked(q));
                    });
                    drop(queue); // close the ring before saying so
                    guard.sent = true;
                    let _ = tx.send(Event::Exited(q, r));
                });
                match spawned {
                    Ok(h) => handles.push((q, h)),
                    Err(e) => {
                        let _ = tx.send(Event::Failed(Error::os("spawning a queue thread", e)));
                        break;
                    }
                }
            }
            let spawned = handles.len();
            let mut stats: Vec<QueueStats> =
                (0..nq).flat_map(|q| (0..threads).map(move |thread| QueueStats { q_id: q, thread, ..Default::default() })).collect();
            let mut failed = false;
            let mut on_live_thread = None;
            let mut outcome = this.run_until_stop(s, &rx, &tx, spawned, &mut stats, &mut failed, &mut live, on_live, &mut on_live_thread);

            // Teardown. With every queue healthy: STOP_DEV first; it waits for
            // in-flight requests (the queues still serve them), then completes
            // the parked FETCHes with ABORT; the eventfd wakes any queue still
            // waiting. When a queue died, a request it owned can only be
            // failed by the kernel once /dev/ublkcN is released (7.x aborts in
            // its release path), and STOP_DEV, or a START_DEV stuck in the
            // partition scan, would wait for it forever: so first end every
            // queue and close the char device, then STOP_DEV. A recovery that
            // did not complete leaves the device quiesced for another attempt.
            // Every queue ended by itself (all its tags aborted) without a
            // stop request: another process stopped the device (it turns
            // DEAD), or quiesced it (QUIESCE_DEV, on a device made with
            // UBLK_F_QUIESCE) for another server to take over. The kernel
            // makes a quiesced device QUIESCED only once its server has
            // released /dev/ublkcN, so until then it still reads LIVE.
            if !failed && !live.recovering && outcome.is_ok() && !live.stop_requested {
                let t0 = Instant::now();
                loop {
                    let state = teardown.get_dev_info(info.dev_id).map(|i| u32::from(i.state)).unwrap_or(sys::UBLK_S_DEV_DEAD);
                    if state != sys::UBLK_S_DEV_LIVE || t0.elapsed() > Duration::from_secs(1) {
                        let can_quiesce = info.flags & sys::abi::UBLK_F_QUIESCE != 0;
                        live.quiesced = state == sys::UBLK_S_DEV_QUIESCED || (state == sys::UBLK_S_DEV_LIVE && can_quiesce);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            if !failed && !live.recovering && !live.quiesced {
                // STOP_DEV waits for the requests in flight; a target
                // operation that never completes (a read from a peer that is
                // gone) would hold it forever. After the grace period the queues
                // are woken: they cancel their operations and fail what they
                // hold, and STOP_DEV completes.
                let t0 = Instant::now();
                let mut woken = false;
                let _ = teardown.stop_dev_watching(info.dev_id, || {
                    if !woken && t0.elapsed() > stop_grace {
                        wake.signal();
                        woken = true;
                    }
                });
            }
            wake.signal();
            for (q, h) in handles {
                if h.join().is_err() && outcome.is_ok() {
                    outcome = Err(Error::Queue { q_id: q, why: "the queue thread panicked".into() });
                }
            }
            if failed {
                char_file = None;
                if !live.recovering {
                    let _ = teardown.stop_dev(info.dev_id);
                }
            }
            // The disk is gone: whatever `on_live` was doing with it fails.
            if let Some(h) = on_live_thread {
                if let Ok(Err(payload)) | Err(payload) = h.join() {
                    live.panic = Some(payload);
                }
            }
            while let Ok(ev) = rx.try_recv() {
                if let Err(e) = record(ev, &mut stats, &mut failed) {
                    if outcome.is_ok() {
                        outcome = Err(e);
                    }
                }
            }
            outcome.map(|()| stats)
        });
        // Threads are joined, their rings closed: close our fd, delete.
        self.char_file = char_file;
        // A device quiesced for an upgrade is left for the next server, like
        // one whose recovery did not complete.
        self.recovering = live.recovering || live.quiesced;
        let del = self.delete();
        if del.is_err() || self.recovering {
            // DEL_DEV did not confirm that every ring naming these buffers is
            // gone (or the device stays, quiesced): never unmap memory the
            // kernel may still write.
            std::mem::forget(bufs);
        }
        if let Some(p) = live.panic {
            std::panic::resume_unwind(p);
        }
        let stats = result?;
        del?;
        Ok(stats)
    }

    /// Gives the device's parameters the attributes of the target's write
    /// cache before the device starts; a recovered device must already have
    /// them (its parameters cannot change).
    fn apply_write_cache(&mut self, cache: WriteCache) -> Result<()> {
        let Some(mut params) = self.params else { return Ok(()) };
        let want = cache.attrs().bits();
        if params.attrs & want == want {
            return Ok(());
        }
        if self.recovering {
            return Err(Error::InvalidConfig {
                what: "write cache",
                why: format!(
                    "device {} was created without the volatile write cache attributes ({:#x}) that this target needs (its writes are durable only after a FLUSH, which the kernel would never send); serve it with a target whose writes are durable when answered, or delete and create it again",
                    self.info.dev_id, want
                ),
            });
        }
        params.attrs |= want;
        self.ctrl.set_params(self.info.dev_id, &params)?;
        self.params = Some(params);
        Ok(())
    }

    /// Waits for every queue to fetch, starts (or ends the recovery of) the
    /// device, starts `on_live` on its own thread and returns at the first
    /// event after that: a stop request or a queue's end.
    #[allow(clippy::too_many_arguments)]
    fn run_until_stop<'scope, 'env>(
        &'env self,
        s: &'scope std::thread::Scope<'scope, 'env>,
        rx: &mpsc::Receiver<Event>,
        tx: &mpsc::Sender<Event>,
        spawned: usize,
        stats: &mut [QueueStats],
        failed: &mut bool,
        live: &mut Live,
        on_live: impl FnOnce(&Device, StopHandle) + Send + 'env,
        on_live_thread: &mut Option<std::thread::ScopedJoinHandle<'scope, std::thread::Result<()>>>,
    ) -> Result<()> {
        let n = usize::from(self.serving.threads_per_queue);
        let all = usize::from(self.info.nr_hw_queues) * n;
        if spawned < all {
            return Err(Error::Queue { q_id: (spawned / n) as u16, why: "could not spawn its thread".into() });
        }
        let mut fetched = 0;
        while fetched < all {
            match rx.recv().expect("sender held") {
                Event::Fetched => fetched += 1,
                Event::Stop => return Ok(()),
                Event::Exited(q, Ok(_)) => {
                    *failed = true;
                    return Err(Error::Queue { q_id: q, why: "exited before START_DEV".into() });
                }
                ev => return record(ev, stats, failed),
            }
        }
        // Every tag of every queue has a FETCH outstanding: START_DEV can complete.
        let mut early: Option<Event> = None;
        let dev_id = self.info.dev_id;
        let keep_waiting = || match rx.try_recv() {
            Ok(ev) => {
                early = Some(ev);
                false
            }
            Err(_) => true,
        };
        let started =
            if live.recovering { self.ctrl.end_user_recovery(dev_id, keep_waiting) } else { self.ctrl.start_dev(dev_id, keep_waiting) };
        if let Err(e) = started {
            // START_DEV was cancelled because a queue failed meanwhile (e.g.
            // its thread panicked serving the partition scan): report that.
            return match early {
                Some(Event::Stop) => Ok(()),
                Some(ev) => record(ev, stats, failed).and(Err(e)),
                None => Err(e),
            };
        }
        live.recovering = false;
        if let Some(ev) = early {
            return record(ev, stats, failed);
        }
        if let Some(name) = self.serving.io_scheduler.clone() {
            self.set_io_scheduler(&name)?;
        }
        if let Some(d) = self.serving.io_timeout {
            self.set_io_timeout(d)?;
        }
        // `on_live` runs beside us, so a queue that dies while it runs is
        // acted on at once. A panic in it stops the device like the handle.
        let stop = StopHandle(tx.clone());
        let stop_on_panic = StopHandle(tx.clone());
        let spawned = std::thread::Builder::new().name(format!("ublk{dev_id}-live")).spawn_scoped(s, move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| on_live(self, stop)));
            if r.is_err() {
                stop_on_panic.stop();
            }
            r
        });
        match spawned {
            Ok(h) => *on_live_thread = Some(h),
            Err(e) => return Err(Error::os("spawning the on_live thread", e)),
        }
        let ev = rx.recv().expect("sender held");
        live.stop_requested = matches!(ev, Event::Stop);
        record(ev, stats, failed)
    }
}

/// Folds one event into the per-thread counts; errors out for failures.
/// `failed` is set when a queue died (rather than being stopped).
fn record(ev: Event, stats: &mut [QueueStats], failed: &mut bool) -> Result<()> {
    match ev {
        Event::Stop | Event::Fetched => Ok(()),
        // The queue still fails its I/O: the normal stop path works.
        Event::Panicked(q) => Err(Error::Queue { q_id: q, why: "its target panicked".into() }),
        // A queue whose tags were all aborted: the device was stopped.
        Event::Exited(_, Ok(st)) => {
            if let Some(slot) = stats.iter_mut().find(|s| (s.q_id, s.thread) == (st.q_id, st.thread)) {
                *slot = st;
            }
            Ok(())
        }
        Event::Exited(_, Err(e)) | Event::Failed(e) => {
            *failed = true;
            Err(e)
        }
    }
}

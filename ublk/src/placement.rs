//! Where queue threads run.
//!
//! The kernel routes a request to the queue of the CPU that submitted it
//! (GET_QUEUE_AFFINITY gives each queue's CPUs, its *home*). Where the queue's
//! server thread should run depends on the load:
//!
//! * While the queue's submitter is alone on its CPU, the server runs best on
//!   another CPU (*away*): the two run in parallel and a busy-polling server
//!   picks requests up without a wake-up.
//! * While every CPU has a submitter of its own (a job per queue), an away
//!   server takes CPU time from another queue's submitter and every round
//!   trip crosses CPUs. Then the server runs best at home, next to its own
//!   submitter, as `SCHED_BATCH` (a waking server does not preempt the
//!   submitter, so requests gather into batches) and without busy polling
//!   (which would only take the CPU from the submitter).
//!
//! [`Placement::Auto`] follows the load between the two; the others are fixed.
//!
//! With several threads per queue (`UBLK_F_PER_IO_DAEMON`), the threads of a
//! queue go to different CPUs where there are enough: thread `t` starts on
//! the `t`th CPU counted from the queue's away CPU upwards (wrapping),
//! CPUs outside the queue's home first, then its home CPUs. So one
//! submitter's requests are served on as many other CPUs as there are, the
//! first thread where a single thread would be. Under [`Placement::Auto`]
//! each thread away from home follows the queues whose home holds its CPU,
//! like a queue's only thread; [`Placement::Affinity`] gives every thread
//! of a queue the queue's home CPUs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where queue threads run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    /// Follow the load: [`Placement::Away`] while the queues whose home is
    /// this queue's away CPU are idle, home ([`Placement::Affinity`], as
    /// `SCHED_BATCH`, without busy polling) while one of them serves more
    /// than about a thousand requests a second. Checked every 10 ms while
    /// the queue serves; it moves after 30 ms of the other state.
    #[default]
    Auto,
    /// Pin each queue thread to one CPU that does not submit to its queue,
    /// when there is one (the CPU after the queue's set, per
    /// GET_QUEUE_AFFINITY); when every CPU submits to it (one queue), to the
    /// last CPU. A server thread that shares a CPU with the task submitting
    /// to it costs a context switch per batch; on another CPU the two run in
    /// parallel, and the scheduler moves an unpinned submitter away from a
    /// pinned, busy-polling server.
    Away,
    /// Pin each queue thread to the CPUs that submit to its queue.
    Affinity,
    /// Leave placement to the scheduler.
    Unpinned,
}

/// Where one queue's thread may run.
#[derive(Debug, Clone, Default)]
pub(crate) struct Plan {
    /// The CPUs that submit to the queue (GET_QUEUE_AFFINITY).
    pub home: Vec<usize>,
    /// The CPU the thread starts on (empty: unpinned).
    pub start: Vec<usize>,
    /// For [`Placement::Auto`]: the queue threads (their indexes in the
    /// device's request counters, see [`thread_plans`]) whose queue's home
    /// holds the away CPU.
    pub neighbours: Vec<usize>,
}

/// The plans of all queues of a device: `home[q]` is queue q's
/// GET_QUEUE_AFFINITY set, `online` the number of online CPUs.
pub(crate) fn plans(placement: Placement, home: &[Vec<usize>], online: usize) -> Vec<Plan> {
    home.iter()
        .enumerate()
        .map(|(q, set)| {
            let away = away_cpu(set, online);
            let start = match placement {
                Placement::Unpinned => Vec::new(),
                Placement::Affinity => set.clone(),
                Placement::Away | Placement::Auto => away.into_iter().collect(),
            };
            let neighbours = match (placement, away) {
                (Placement::Auto, Some(a)) if !set.contains(&a) => (0..home.len()).filter(|&o| o != q && home[o].contains(&a)).collect(),
                _ => Vec::new(),
            };
            Plan { home: set.clone(), start, neighbours }
        })
        .collect()
}

/// The plans of every thread of a device with `threads` threads per queue,
/// queue by queue (thread `t` of queue `q` at `q * threads + t`, which is
/// also its index in the request counters); [`plans`] for one thread.
pub(crate) fn thread_plans(placement: Placement, home: &[Vec<usize>], online: usize, threads: u16) -> Vec<Plan> {
    let per_queue = plans(placement, home, online);
    if threads <= 1 {
        return per_queue;
    }
    let n = usize::from(threads);
    let mut v = Vec::with_capacity(per_queue.len() * n);
    for (q, p) in per_queue.into_iter().enumerate() {
        // The CPUs from the away CPU upwards, those outside home first.
        let order: Vec<usize> = match p.start.as_slice() {
            [away] if matches!(placement, Placement::Away | Placement::Auto) => {
                let ring = (0..online).map(|i| (away + i) % online);
                ring.clone().filter(|c| !p.home.contains(c)).chain(ring.filter(|c| p.home.contains(c))).collect()
            }
            _ => Vec::new(),
        };
        for t in 0..n {
            let start = if order.is_empty() { p.start.clone() } else { vec![order[t % order.len()]] };
            let neighbours = match (placement, start.as_slice()) {
                (Placement::Auto, [c]) if !p.home.contains(c) => {
                    (0..home.len()).filter(|&o| o != q && home[o].contains(c)).flat_map(|o| (0..n).map(move |s| o * n + s)).collect()
                }
                _ => Vec::new(),
            };
            v.push(Plan { home: p.home.clone(), start, neighbours });
        }
    }
    v
}

/// The away CPU of a queue whose home is `set`: the CPU after the set's last
/// one, or, when every CPU submits to the queue (one queue), the last CPU (a
/// busy-polling thread there keeps the scheduler from placing the submitter
/// on it; an unpinned one keeps meeting the submitter). None on one CPU.
fn away_cpu(set: &[usize], online: usize) -> Option<usize> {
    let &last = set.iter().filter(|&&c| c < online).max()?;
    let next = (last + 1) % online;
    if !set.contains(&next) {
        Some(next)
    } else if online > 1 {
        Some(online - 1)
    } else {
        None
    }
}

/// How often a serving queue looks at its neighbours.
const WINDOW: Duration = Duration::from_millis(10);
/// Batches between looks at the clock: a one-request batch can take a few
/// microseconds, and reading the clock on each would add to every one.
const CLOCK_EVERY: u32 = 16;
/// A neighbour serving at least this many requests a second, and at least
/// ACTIVE_MIN since the last look, is active (a partition scan or a stray
/// probe is not).
const ACTIVE_RATE: u64 = 1000;
const ACTIVE_MIN: u64 = 32;
/// Active windows in a row before going home: a single submitter that the
/// scheduler moves to another CPU for a moment is not a second submitter.
const ACTIVE_WINDOWS: u32 = 3;
/// Idle windows in a row before going away again.
const IDLE_WINDOWS: u32 = 3;

/// One queue's request count, alone on its cache line: each queue thread
/// writes its own after every batch, and neighbours on other CPUs only read
/// it every [`WINDOW`], so the writes must not bounce a line they share.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct Served(AtomicU64);

/// The request counters of a device's `n` queue threads.
pub(crate) fn counters(n: usize) -> Arc<[Served]> {
    (0..n).map(|_| Served::default()).collect()
}

/// What a queue should change, as [`Follower::tick`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Move {
    Home,
    Away,
}

/// The [`Placement::Auto`] state of one queue thread: publishes its own
/// request count, watches its neighbours' counts, and says when to move.
#[derive(Debug)]
pub(crate) struct Follower {
    q: usize,
    plan: Plan,
    /// Requests served, per queue of the device, each written only by its
    /// queue's thread.
    served: Arc<[Served]>,
    seen: Vec<u64>,
    checked: Instant,
    /// Batches since the clock was last read.
    batches: u32,
    /// Windows in a row with an active (away) or idle (home) neighbour.
    streak: u32,
    at_home: bool,
}

impl Follower {
    /// None unless the plan has neighbours to follow. `q` is the thread's
    /// index in `served` (its queue's, with one thread per queue).
    pub(crate) fn new(q: usize, plan: &Plan, served: Arc<[Served]>) -> Option<Self> {
        if plan.neighbours.is_empty() {
            return None;
        }
        let seen = plan.neighbours.iter().map(|&n| served[n].0.load(Ordering::Relaxed)).collect();
        Some(Follower { q, plan: plan.clone(), served, seen, checked: Instant::now(), batches: 0, streak: 0, at_home: false })
    }

    /// Called after each batch with this queue's request count so far; reads
    /// the clock every [`CLOCK_EVERY`] batches.
    pub(crate) fn tick(&mut self, requests: u64) -> Option<Move> {
        self.served[self.q].0.store(requests, Ordering::Relaxed);
        self.batches += 1;
        if self.batches < CLOCK_EVERY {
            return None;
        }
        self.batches = 0;
        let now = Instant::now();
        let elapsed = now.duration_since(self.checked);
        if elapsed < WINDOW {
            return None;
        }
        self.checked = now;
        let mut active = false;
        for (seen, &n) in self.seen.iter_mut().zip(&self.plan.neighbours) {
            let c = self.served[n].0.load(Ordering::Relaxed);
            let delta = c.wrapping_sub(*seen);
            *seen = c;
            // At least ACTIVE_RATE per second over the time since the last look.
            active |= delta >= ACTIVE_MIN && delta.saturating_mul(1_000_000) >= ACTIVE_RATE * elapsed.as_micros().max(1) as u64;
        }
        // Count windows that argue for moving; any other resets the count.
        if active != self.at_home {
            self.streak += 1;
        } else {
            self.streak = 0;
        }
        let needed = if self.at_home { IDLE_WINDOWS } else { ACTIVE_WINDOWS };
        if self.streak < needed {
            return None;
        }
        self.streak = 0;
        self.at_home = !self.at_home;
        Some(if self.at_home { Move::Home } else { Move::Away })
    }

    /// Whether the thread is at home (there it does not busy-poll).
    pub(crate) fn at_home(&self) -> bool {
        self.at_home
    }

    /// Pins the calling thread per `m` and sets its scheduling policy:
    /// `SCHED_BATCH` at home, `SCHED_OTHER` away.
    pub(crate) fn apply(&self, m: Move) {
        let (cpus, policy) = match m {
            Move::Home => (&self.plan.home, libc::SCHED_BATCH),
            Move::Away => (&self.plan.start, libc::SCHED_OTHER),
        };
        pin_to(cpus);
        set_policy(policy);
    }
}

/// Pins the calling thread to `cpus` (no-op when empty or refused).
pub(crate) fn pin_to(cpus: &[usize]) {
    if cpus.is_empty() {
        return;
    }
    // SAFETY: cpu_set_t is plain data, zero-initialised, filled by CPU_SET
    // with indices below CPU_SETSIZE, and passed by reference for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Sets the calling thread's policy (`SCHED_OTHER` or `SCHED_BATCH`, both
/// at priority 0 and open to unprivileged threads; a refusal is ignored).
fn set_policy(policy: i32) {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: `p` is a valid sched_param that the call only reads; pid 0 is
    // the calling thread.
    unsafe { libc::sched_setscheduler(0, policy, &p) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_queues_on_two_cpus_follow_each_other() {
        let p = plans(Placement::Auto, &[vec![0], vec![1]], 2);
        assert_eq!(p[0].start, vec![1]);
        assert_eq!(p[0].neighbours, vec![1]);
        assert_eq!(p[1].start, vec![0]);
        assert_eq!(p[1].neighbours, vec![0]);
        // Fixed placements follow nothing.
        assert!(plans(Placement::Away, &[vec![0], vec![1]], 2)[0].neighbours.is_empty());
        assert_eq!(plans(Placement::Affinity, &[vec![0], vec![1]], 2)[1].start, vec![1]);
        assert!(plans(Placement::Unpinned, &[vec![0], vec![1]], 2)[1].start.is_empty());
    }

    #[test]
    fn one_queue_goes_to_the_last_cpu_and_follows_nobody() {
        let p = plans(Placement::Auto, &[vec![0, 1, 2, 3]], 4);
        assert_eq!(p[0].start, vec![3]);
        assert!(p[0].neighbours.is_empty());
        assert!(Follower::new(0, &p[0], counters(1)).is_none());
        assert!(plans(Placement::Auto, &[vec![0]], 1)[0].start.is_empty());
    }

    #[test]
    fn four_cpus_two_queues() {
        // blk-mq may give a queue several CPUs; the away CPU is the one after.
        let p = plans(Placement::Auto, &[vec![0, 1], vec![2, 3]], 4);
        assert_eq!((p[0].start.clone(), p[0].neighbours.clone()), (vec![2], vec![1]));
        assert_eq!((p[1].start.clone(), p[1].neighbours.clone()), (vec![0], vec![0]));
    }

    #[test]
    fn threads_of_a_queue_spread_over_cpus() {
        let starts = |p: &[Plan]| p.iter().map(|p| p.start.clone()).collect::<Vec<_>>();
        // One thread per queue: the queues' own plans.
        let one = thread_plans(Placement::Auto, &[vec![0], vec![1]], 2, 1);
        assert_eq!(starts(&one), starts(&plans(Placement::Auto, &[vec![0], vec![1]], 2)));
        // One queue on two CPUs, four threads: the last CPU first, then round.
        let p = thread_plans(Placement::Auto, &[vec![0, 1]], 2, 4);
        assert_eq!(starts(&p), vec![vec![1], vec![0], vec![1], vec![0]]);
        assert!(p.iter().all(|p| p.neighbours.is_empty()));
        // Two queues, two threads each: thread 0 away, following the other
        // queue's threads; thread 1 at home, following nobody.
        let p = thread_plans(Placement::Auto, &[vec![0], vec![1]], 2, 2);
        assert_eq!(starts(&p), vec![vec![1], vec![0], vec![0], vec![1]]);
        assert_eq!(p[0].neighbours, vec![2, 3]);
        assert!(p[1].neighbours.is_empty());
        assert_eq!(p[2].neighbours, vec![0, 1]);
        // Four CPUs, two queues of two CPUs: both threads away, on the
        // other queue's CPUs.
        let p = thread_plans(Placement::Away, &[vec![0, 1], vec![2, 3]], 4, 2);
        assert_eq!(starts(&p), vec![vec![2], vec![3], vec![0], vec![1]]);
        // Affinity: every thread on the queue's home; Unpinned: nowhere.
        let p = thread_plans(Placement::Affinity, &[vec![0, 1]], 4, 3);
        assert!(p.iter().all(|p| p.start == vec![0, 1]));
        assert!(thread_plans(Placement::Unpinned, &[vec![0, 1]], 4, 3).iter().all(|p| p.start.is_empty()));
    }

    #[test]
    fn follower_goes_home_when_the_neighbour_is_busy_and_back_when_idle() {
        let served = counters(2);
        assert_eq!(std::mem::size_of::<Served>(), 64);
        let p = plans(Placement::Auto, &[vec![0], vec![1]], 2);
        let mut f = Follower::new(0, &p[0], served.clone()).unwrap();
        let mut mine = 0;
        let mut run = |f: &mut Follower, neighbour_per_window: u64, windows: u32| {
            let mut moves = vec![];
            for _ in 0..windows {
                std::thread::sleep(WINDOW);
                served[1].0.fetch_add(neighbour_per_window, Ordering::Relaxed);
                for _ in 0..CLOCK_EVERY {
                    mine += 1;
                    moves.extend(f.tick(mine));
                }
            }
            moves
        };
        // 2 requests in 10 ms is 200/s: idle.
        assert_eq!(run(&mut f, 2, 3), vec![]);
        // A burst shorter than ACTIVE_WINDOWS does not move the thread.
        assert_eq!(run(&mut f, 500, ACTIVE_WINDOWS - 1), vec![]);
        assert_eq!(run(&mut f, 0, 1), vec![]);
        assert_eq!(run(&mut f, 500, ACTIVE_WINDOWS + 1), vec![Move::Home]);
        assert_eq!(run(&mut f, 0, IDLE_WINDOWS + 1), vec![Move::Away]);
        assert_eq!(served[0].0.load(Ordering::Relaxed), mine);
    }
}

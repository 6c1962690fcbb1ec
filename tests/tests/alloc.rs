//! The queue loop does no heap allocation per request: a counting global
//! allocator, read on the queue thread itself at request 1,000 and again at
//! request 4,000, sees no allocation in between.
//! Both paths: sync targets and async ones (the library's async null target,
//! and one that awaits an operation on the ring per request), and the stripe
//! target, which splits each request into pieces on its legs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};

use ublk::aio::{AsyncTarget, Io, QueueContext, QueueTarget};
use ublk::{AsyncNullTarget, DataPath, DeviceBuilder, IoResult, Request, Target};
use ublk_tests::*;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    /// This thread's allocations also count in `QUEUE_ALLOCS`.
    static QUEUE_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Allocations by threads marked with `QUEUE_THREAD`: read from another
/// thread, for targets whose code we do not write (the library's own).
static QUEUE_ALLOCS: AtomicU64 = AtomicU64::new(0);

fn count_alloc() {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
    if QUEUE_THREAD.try_with(|q| q.get()).unwrap_or(false) {
        QUEUE_ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator; only bumps a thread-local counter.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count_alloc();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count_alloc();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

const FIRST: u64 = 1_000;
/// 3,000 requests measured (one allocation per request would show as
/// thousands): six runs of this many reads, one at a time, stay well inside
/// the VM's 300 s limit per test executable even on 6.1 under TCG on a busy
/// host (~7 ms a read there).
const LAST: u64 = 4_000;

/// A target's count of the requests it served, and its queue thread's
/// allocation count sampled when it started request `first` and `last`.
#[derive(Default)]
struct Samples {
    served: AtomicU64,
    at_first: AtomicU64,
    at_last: AtomicU64,
}

impl Samples {
    /// Counts a request, on the queue thread that serves it.
    fn count(&self, first: u64, last: u64) {
        let n = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        if n == first {
            self.at_first.store(ALLOCS.with(|c| c.get()), Ordering::Relaxed);
        } else if n == last {
            self.at_last.store(ALLOCS.with(|c| c.get()), Ordering::Relaxed);
        }
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// The allocation counts at request `first` and at request `last`.
    fn at(&self) -> (u64, u64) {
        (self.at_first.load(Ordering::Relaxed), self.at_last.load(Ordering::Relaxed))
    }

    /// The `on_live` of a device whose target counts here: one read after
    /// another until the target served 10 requests past `LAST`, then stop.
    fn read_past_last(&self) -> impl FnOnce(&ublk::Device, ublk::StopHandle) + Send + '_ {
        move |dev, stop| {
            let reads = read_while(&dev.block_path(), |_| self.served() < LAST + 10);
            eprintln!("{reads} reads issued");
            stop.stop();
        }
    }

    /// Asserts the target served at least `last` requests and that its
    /// queue thread (`thread` in failures) allocated nothing between request
    /// `first` and request `last`.
    fn assert_no_allocation(&self, first: u64, last: u64, thread: &str) {
        let (at_first, at_last) = self.at();
        eprintln!("queue thread allocations: {at_first} at request {first}, {at_last} at request {last}");
        assert!(self.served() >= last);
        assert_eq!(at_last - at_first, 0, "{thread} allocated {} times over {} requests", at_last - at_first, last - first);
    }
}

/// A one-queue device of depth 64 and 64 MiB on data path `path`.
fn probe_device(path: DataPath) -> ublk::Device {
    DeviceBuilder::new().queues(1).depth(64).size(64 << 20).data_path(path).create().unwrap()
}

/// A null target that samples its own thread's allocation count.
#[derive(Default)]
struct Probe {
    no_data: bool,
    samples: Samples,
}

impl Target for Probe {
    fn needs_data(&self) -> bool {
        !self.no_data
    }

    fn handle(&self, req: &Request, _buf: &mut [u8]) -> IoResult {
        self.samples.count(FIRST, LAST);
        Ok(req.len() as u32)
    }
}

driver_test! {
    /// Both data paths: kernel copies (DataPath::Copy) and none (NoData,
    /// USER_COPY where the kernel has it).
    fn queue_loop_does_not_allocate_per_request() {
        for path in [DataPath::Copy, DataPath::NoData] {
            eprintln!("{path:?}:");
            no_allocation_per_request(path);
        }
    }
}

fn no_allocation_per_request(path: DataPath) {
    {
        let probe = Probe { no_data: path == DataPath::NoData, ..Default::default() };
        probe_device(path).serve(&probe, probe.samples.read_past_last()).unwrap();
        probe.samples.assert_no_allocation(FIRST, LAST, "the queue thread");
        assert_no_devices();
    }
}

/// One O_DIRECT 4 KiB read after another (from the start of the device
/// again at its end) while `more(n)`, called after the nth read returned.
/// Returns the reads issued.
fn read_while(dev: &std::path::Path, mut more: impl FnMut(u64) -> bool) -> u64 {
    let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(dev).unwrap();
    // 4 KiB-aligned buffer, allocated before the measurement.
    let mut backing = vec![0u8; 8192];
    let buf = aligned(&mut backing, 4096);
    let mut reads = 0u64;
    loop {
        if f.read(buf).unwrap() == 0 {
            std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).unwrap();
        }
        reads += 1;
        if !more(reads) {
            return reads;
        }
    }
}

/// The library's [`AsyncNullTarget`], with its queue threads counted in
/// `QUEUE_ALLOCS` (marked when the queue's object is made, on its thread).
struct CountedAsyncNull;

impl AsyncTarget for CountedAsyncNull {
    type Queue<'a> = AsyncNullTarget;
    fn queue(&self, q: &QueueContext) -> std::io::Result<AsyncNullTarget> {
        QUEUE_THREAD.with(|c| c.set(true));
        AsyncNullTarget.queue(q)
    }
    fn needs_data(&self) -> bool {
        false
    }
}

/// An async target that awaits one NOP on the queue's ring per request and
/// samples its thread's allocation count like [`Probe`].
#[derive(Default)]
struct NopProbe {
    samples: Samples,
}

impl AsyncTarget for NopProbe {
    type Queue<'a> = &'a NopProbe;
    fn queue(&self, _q: &QueueContext) -> std::io::Result<&NopProbe> {
        Ok(self)
    }
    fn needs_data(&self) -> bool {
        false
    }
}

impl QueueTarget for &NopProbe {
    async fn handle(&self, io: Io<'_>) -> IoResult {
        self.samples.count(FIRST, LAST);
        io.ring().nop().await?;
        Ok(io.request().len() as u32)
    }
}

driver_test! {
    /// The async path, both data paths: the library's AsyncNullTarget (its
    /// queue thread's allocations sampled by the reader between its 1,000th
    /// and 4,000th read, one read at a time) and a target that awaits a
    /// NOP on the ring per request (sampled on the queue thread itself).
    fn async_queue_loop_does_not_allocate_per_request() {
        for path in [DataPath::Copy, DataPath::NoData] {
            eprintln!("{path:?}, AsyncNullTarget:");
            {
                let (mut first, mut last) = (None, None);
                probe_device(path).serve_async(&CountedAsyncNull, |dev, stop| {
                    let reads = read_while(&dev.block_path(), |n| {
                        match n {
                            FIRST => first = Some(QUEUE_ALLOCS.load(Ordering::Relaxed)),
                            LAST => last = Some(QUEUE_ALLOCS.load(Ordering::Relaxed)),
                            _ => {}
                        }
                        n < LAST
                    });
                    eprintln!("{reads} reads issued");
                    stop.stop();
                })
                .unwrap();
                let (first, last) = (first.unwrap(), last.unwrap());
                eprintln!("queue thread allocations: {first} after read {FIRST}, {last} after read {LAST}");
                assert!(first > 0, "the queue thread was not counted (setting it up allocates)");
                assert_eq!(last - first, 0, "the async queue thread allocated {} times over {} requests", last - first, LAST - FIRST);
                assert_no_devices();
            }
            eprintln!("{path:?}, a NOP per request:");
            {
                let probe = NopProbe::default();
                probe_device(path).serve_async(&probe, probe.samples.read_past_last()).unwrap();
                probe.samples.assert_no_allocation(FIRST, LAST, "the async queue thread");
                assert_no_devices();
            }
        }
    }
}

/// Sparse stripe leg files of the given sizes under /tmp.
fn stripe_legs(sizes: &[u64]) -> Vec<std::path::PathBuf> {
    let legs: Vec<_> = (0..sizes.len()).map(|i| std::path::PathBuf::from(format!("/tmp/stripe-alloc-{i}.img"))).collect();
    for (p, s) in legs.iter().zip(sizes) {
        sparse_file(p, *s);
    }
    legs
}

/// A stripe that samples its queue thread's allocation count when it
/// starts request `STRIPE_FIRST` and request `STRIPE_LAST`.
struct StripeProbe {
    stripe: ublk::Stripe,
    samples: Samples,
}

const STRIPE_FIRST: u64 = 200;
const STRIPE_LAST: u64 = 2_200;

struct StripeProbeQueue<'a> {
    p: &'a StripeProbe,
    inner: &'a ublk::Stripe,
}

impl AsyncTarget for StripeProbe {
    type Queue<'a> = StripeProbeQueue<'a>;
    fn queue(&self, q: &QueueContext) -> std::io::Result<StripeProbeQueue<'_>> {
        Ok(StripeProbeQueue { p: self, inner: self.stripe.queue(q)? })
    }
    fn files(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        self.stripe.files()
    }
    fn write_cache(&self) -> ublk::WriteCache {
        self.stripe.write_cache()
    }
}

impl QueueTarget for StripeProbeQueue<'_> {
    async fn handle(&self, io: Io<'_>) -> IoResult {
        self.p.samples.count(STRIPE_FIRST, STRIPE_LAST);
        self.inner.handle(io).await
    }
}

driver_test! {
    /// The stripe splits requests without allocating: over 2,000 requests
    /// of 16 KiB at 2 KiB past a 4 KiB chunk boundary (5 pieces each, on 2
    /// legs), writes, reads and a FLUSH every 64, the queue thread makes no
    /// allocation (a counting global allocator, read on that thread).
    fn stripe_does_not_allocate_per_request() {
        use std::os::unix::fs::FileExt;
        let legs = stripe_legs(&[8 << 20, 8 << 20]);
        let stripe = ublk::Stripe::open(&legs, 4096, &ublk::LoopOptions::default()).unwrap();
        let size = stripe.size();
        let probe = StripeProbe { stripe, samples: Samples::default() };
        let dev = ublk::DeviceBuilder::new().queues(1).depth(64).size(size).create().unwrap();
        dev.serve_async(&probe, |dev, stop| {
            let f = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(dev.block_path()).unwrap();
            let mut backing = vec![0u8; 16 * 1024 + 4096];
            let buf = aligned(&mut backing, 16 * 1024);
            let mut i = 0u64;
            while probe.samples.served() < STRIPE_LAST + 10 {
                // Each write (even i) is read back by the next request.
                let off = (i / 2 % 900) * 16 * 1024 + 2 * 1024;
                buf[..8].copy_from_slice(&i.to_le_bytes());
                if i % 2 == 0 {
                    f.write_all_at(buf, off).unwrap();
                } else {
                    f.read_exact_at(buf, off).unwrap();
                    assert_eq!(u64::from_le_bytes(buf[..8].try_into().unwrap()), i - 1, "read back at {off}");
                }
                if i % 64 == 0 {
                    f.sync_data().unwrap();
                }
                i += 1;
            }
            eprintln!("{i} requests issued");
            stop.stop();
        })
        .unwrap();
        probe.samples.assert_no_allocation(STRIPE_FIRST, STRIPE_LAST, "the queue thread");
        for l in &legs {
            let _ = std::fs::remove_file(l);
        }
        assert_no_devices();
    }
}

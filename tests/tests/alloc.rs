//! The queue loop does no heap allocation per request: a counting global
//! allocator, read on the queue thread itself at request 1,000 and again at
//! request 21,000, sees no allocation in between.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};

use ublk::{DataPath, DeviceBuilder, IoResult, Request, Target};
use ublk_tests::*;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only bumps a thread-local counter.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

const FIRST: u64 = 1_000;
const LAST: u64 = 21_000;

/// A null target that samples its own thread's allocation count.
#[derive(Default)]
struct Probe {
    no_data: bool,
    served: AtomicU64,
    at_first: AtomicU64,
    at_last: AtomicU64,
}

impl Target for Probe {
    fn needs_data(&self) -> bool {
        !self.no_data
    }

    fn handle(&self, req: &Request, _buf: &mut [u8]) -> IoResult {
        let n = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        if n == FIRST {
            self.at_first.store(ALLOCS.with(|c| c.get()), Ordering::Relaxed);
        } else if n == LAST {
            self.at_last.store(ALLOCS.with(|c| c.get()), Ordering::Relaxed);
        }
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
        let dev = DeviceBuilder::new().queues(1).depth(64).size(64 << 20).data_path(path).create().unwrap();
        dev.serve(&probe, |dev, stop| {
            let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(dev.block_path()).unwrap();
            // 4 KiB-aligned buffer, allocated before the measurement.
            let mut backing = vec![0u8; 8192];
            let buf = aligned(&mut backing, 4096);
            let mut reads = 0u64;
            while probe.served.load(Ordering::Relaxed) < LAST + 10 {
                if f.read(buf).unwrap() == 0 {
                    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).unwrap();
                }
                reads += 1;
            }
            eprintln!("{reads} reads issued");
            stop.stop();
        })
        .unwrap();
        let first = probe.at_first.load(Ordering::Relaxed);
        let last = probe.at_last.load(Ordering::Relaxed);
        eprintln!("queue thread allocations: {first} at request {FIRST}, {last} at request {LAST}");
        assert!(probe.served.load(Ordering::Relaxed) >= LAST);
        assert_eq!(last - first, 0, "the queue thread allocated {} times over {} requests", last - first, LAST - FIRST);
        assert_no_devices();
    }
}

//! Async targets (`ublk::aio`) against the real driver: buffers registered
//! with the queue's ring (`Ring::fixed_buf`, `Ring::read_fixed`), their
//! slots, and the data read into them.

mod aio_util;

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use aio_util::*;
use ublk::aio::{AsyncTarget, Io, QueueContext, QueueTarget};
use ublk::{DeviceBuilder, Errno, IoResult, Op};
use ublk_tests::*;

/// Reads answered through a buffer registered with the queue's ring: each
/// READ's data is read from a file into the queue's `FixedBuf` with
/// `READ_FIXED`, then copied into the request's data. The first request
/// of each queue also checks the slots: four buffers, then ENOBUFS; a
/// dropped buffer's slot is free again; an operation dropped in flight
/// keeps its buffer, and the slot with it, until its cancellation completes.
struct FixedReads {
    file: File,
    /// Per queue: the checks' outcome, or what went wrong.
    reports: Mutex<Vec<Result<(), String>>>,
}

struct FixedQueue<'a> {
    t: &'a FixedReads,
    buf: RefCell<Option<ublk::aio::FixedBuf>>,
    checked: Cell<bool>,
}

impl AsyncTarget for FixedReads {
    type Queue<'a> = FixedQueue<'a>;
    fn queue(&self, _q: &QueueContext) -> std::io::Result<FixedQueue<'_>> {
        Ok(FixedQueue { t: self, buf: RefCell::new(None), checked: Cell::new(false) })
    }
}

impl FixedQueue<'_> {
    /// The slot checks, on the queue's ring.
    async fn check_slots(&self, ring: ublk::aio::Ring<'_>) -> Result<ublk::aio::FixedBuf, String> {
        let mut held = Vec::new();
        for i in 0..ublk::aio::TARGET_SLOTS {
            held.push(ring.fixed_buf(64 << 10).map_err(|e| format!("fixed_buf {i}: {e}"))?);
        }
        match ring.fixed_buf(4096) {
            Err(e) if e == Errno::ENOBUFS => {}
            r => return Err(format!("a buffer past TARGET_SLOTS: {r:?}, expected ENOBUFS")),
        }
        if !matches!(ring.fixed_buf(0), Err(e) if e == Errno::EINVAL) {
            return Err("fixed_buf(0) is not EINVAL".into());
        }
        held.pop();
        let again = ring.fixed_buf(4096).map_err(|e| format!("a dropped buffer's slot: {e}"))?;
        // A read from an empty pipe waits; dropped, it is cancelled, and its
        // buffer (with the slot) is kept until the cancellation completes.
        let (rd, wr) = pipe();
        drop(ring.read_fixed(&rd, again, 0, 4096, 0));
        match ring.fixed_buf(4096) {
            Err(e) if e == Errno::ENOBUFS => {}
            r => return Err(format!("the slot of a buffer owned by a dropped read in flight: {r:?}, expected ENOBUFS")),
        }
        let mut freed = false;
        for _ in 0..100 {
            ring.sleep(Duration::from_millis(10)).await.map_err(|e| format!("sleep: {e}"))?;
            if let Ok(b) = ring.fixed_buf(4096) {
                drop(b);
                freed = true;
                break;
            }
        }
        if !freed {
            return Err("the cancelled read's slot was not given back within 1 s".into());
        }
        drop((rd, wr));
        drop(held);
        ring.fixed_buf(1 << 20).map_err(|e| format!("the queue's read buffer: {e}"))
    }
}

impl QueueTarget for FixedQueue<'_> {
    async fn handle(&self, mut io: Io<'_>) -> IoResult {
        let req = *io.request();
        if req.op != Op::Read {
            return Ok(0);
        }
        if !self.checked.replace(true) {
            let r = self.check_slots(io.ring()).await;
            let report = r.map(|b| {
                *self.buf.borrow_mut() = Some(b);
            });
            self.t.reports.lock().unwrap().push(report);
        }
        // Depth 1: no other request of this queue holds the buffer.
        let Some(buf) = self.buf.borrow_mut().take() else { return Err(Errno::EIO) };
        let len = req.len();
        let (r, buf) = io.ring().read_fixed(&self.t.file, buf, 0, len, req.offset()).await;
        let n = r? as usize;
        if n == len {
            io.data_mut()[..len].copy_from_slice(&buf[..len]);
        }
        *self.buf.borrow_mut() = Some(buf);
        if n == len {
            Ok(len as u32)
        } else {
            Err(Errno::EIO)
        }
    }
}

driver_test! {
    /// `Ring::fixed_buf` and `Ring::read_fixed` (a buffer registered with
    /// the queue's ring, read into with READ_FIXED): the slot checks pass
    /// on every queue, and 4 MiB read through the device, in requests of
    /// 4 KiB to 512 KiB (the device's largest), equal the file's bytes.
    fn aio_fixed_buffer_reads_carry_the_data() {
        let pattern: Vec<u8> = (0..4 * MIB).map(|i| (i * 7 + i / 4096) as u8).collect();
        let path = PathBuf::from("/tmp/ublk-aio-fixed");
        std::fs::write(&path, &pattern).unwrap();
        let file = File::open(&path).unwrap();
        let target = FixedReads { file, reports: Mutex::new(vec![]) };
        let dev = DeviceBuilder::new().queues(2).depth(1).size(4 * MIB).create().unwrap();
        dev.serve_async(&target, |dev, stop| {
            let p = dev.block_path();
            for (off, len) in [(0u64, 4096usize), (4096, 1 << 20), (MIB + 8192, 512 << 10), (2 * MIB, 2 * MIB as usize)] {
                let mut at = off;
                for part in direct(&p, off, len, None).unwrap().chunks(4096) {
                    assert!(part == &pattern[at as usize..at as usize + part.len()], "the device's bytes at {at} differ from the file's");
                    at += part.len() as u64;
                }
            }
            // Both queues serve (a read from each CPU).
            for cpu in 0..nproc().min(2) {
                let p = p.clone();
                std::thread::spawn(move || {
                    // SAFETY: a zeroed cpu_set_t, one CPU set in it.
                    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
                    // SAFETY: `set` is a valid cpu_set_t.
                    unsafe { libc::CPU_SET(cpu, &mut set) };
                    // SAFETY: this thread, a valid set.
                    assert_eq!(unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) }, 0);
                    direct(&p, 3 * MIB, 4096, None).unwrap()
                })
                .join()
                .unwrap();
            }
            stop.stop();
        })
        .unwrap();
        let reports = target.reports.lock().unwrap().clone();
        eprintln!("slot checks per queue: {reports:?}");
        assert_eq!(reports.len(), nproc().min(2), "every queue that served checked its slots: {reports:?}");
        for r in &reports {
            assert!(r.is_ok(), "slot checks: {r:?}");
        }
        let _ = std::fs::remove_file(&path);
        assert_no_devices();
    }
}

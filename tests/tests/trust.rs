//! Answers a target may give, and failures a server may have, that must never
//! hang the kernel, corrupt memory or leave anything behind.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ublk::aio::{AsyncTarget, FileRef, Io, QueueContext, QueueTarget};
use ublk::{DeviceBuilder, Errno, IoResult, Op, Request, Target};
use ublk_tests::*;

/// Regions of 1 MiB, each answered its own way.
const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Answer {
    Zero,
    ErrZero,
    Half,
    Huge,
    NegErrno,
    NoSpace,
    Full,
}

const ANSWERS: [Answer; 7] = [Answer::Zero, Answer::ErrZero, Answer::Half, Answer::Huge, Answer::NegErrno, Answer::NoSpace, Answer::Full];

/// Answers every request by the region it falls in; region `Full` is memory.
struct Answers {
    mem: Mutex<Vec<u8>>,
}

impl Target for Answers {
    fn handle(&self, req: &Request, buf: &mut [u8]) -> IoResult {
        let region = ANSWERS[((req.offset() / MIB) as usize).min(ANSWERS.len() - 1)];
        let len = req.len() as u32;
        match region {
            Answer::Zero => Ok(0),
            Answer::ErrZero => Err(Errno::new(0)),
            Answer::Half => Ok(len / 2),
            Answer::Huge => Ok(u32::MAX),
            Answer::NegErrno => Err(Errno::new(-libc::EIO)),
            Answer::NoSpace => Err(Errno::ENOSPC),
            Answer::Full => {
                let mut m = self.mem.lock().unwrap();
                let off = (req.offset() - 6 * MIB) as usize;
                match req.op {
                    Op::Read => buf.copy_from_slice(&m[off..off + buf.len()]),
                    Op::Write => m[off..off + buf.len()].copy_from_slice(buf),
                    _ => {}
                }
                Ok(len)
            }
        }
    }
}

fn direct_io(dev: &std::path::Path, off: u64, write: bool, data: Option<Vec<u8>>) -> Result<Vec<u8>, i32> {
    let f = OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(dev).unwrap();
    let mut v = vec![0u8; 8192];
    let b = aligned(&mut v, 4096);
    if let Some(d) = data {
        b.copy_from_slice(&d);
    }
    let r = if write { f.write_at(b, off) } else { f.read_at(b, off) };
    match r {
        Ok(4096) => Ok(b.to_vec()),
        Ok(n) => panic!("short {} of {n} bytes at {off} reached the reader", if write { "write" } else { "read" }),
        Err(e) => Err(e.raw_os_error().unwrap()),
    }
}

driver_test! {
    /// Every kind of answer reaches the reader as the data or an error,
    /// never as a hang (6.1-6.12 requeue a 0-byte WRITE forever) nor as a
    /// short transfer: Ok(0), Err(0), half the length, u32::MAX and a
    /// negative errno fail with EIO; ENOSPC stays ENOSPC; full answers carry
    /// the data.
    fn trust_every_answer_completes_with_data_or_an_error() {
        let target = Answers { mem: Mutex::new(vec![0u8; MIB as usize]) };
        let dev = DeviceBuilder::new().size(7 * MIB).create().unwrap();
        let stats = dev
            .serve(&target, |dev, stop| {
                let path = dev.block_path();
                for (i, a) in ANSWERS.iter().enumerate() {
                    let off = i as u64 * MIB + 8192;
                    for write in [true, false] {
                        let p = path.clone();
                        let data = pattern(4096, i as u64);
                        let what = format!("{a:?} {}", if write { "write" } else { "read" });
                        let r = within(&what, Duration::from_secs(60), move || direct_io(&p, off, write, Some(data)));
                        eprintln!("{what}: {:?}", r.as_ref().map(|_| "data").map_err(|e| std::io::Error::from_raw_os_error(*e)));
                        match a {
                            Answer::Full if write => assert!(r.is_ok(), "{what}: {r:?}"),
                            Answer::Full => assert_eq!(r.unwrap(), pattern(4096, i as u64), "{what}: data"),
                            Answer::NoSpace => assert_eq!(r.unwrap_err(), libc::ENOSPC, "{what}"),
                            _ => assert_eq!(r.unwrap_err(), libc::EIO, "{what}"),
                        }
                    }
                }
                stop.stop();
            })
            .unwrap();
        let invalid: u64 = stats.iter().map(|s| s.invalid).sum();
        eprintln!("invalid answers counted: {invalid}");
        // Err(0), u32::MAX and -EIO, for the write and the read (the block
        // layer may retry a failed request, so at least that many).
        assert!(invalid >= 6, "invalid answers not counted: {stats:?}");
        assert_no_devices();
    }
}

/// An async target that does its I/O on the queue's ring against a file,
/// at most `max` bytes per operation, one after the other: many operations
/// per request.
struct ShortOps {
    file: std::fs::File,
    max: usize,
    ops: AtomicU64,
}

impl AsyncTarget for ShortOps {
    type Queue<'a> = &'a ShortOps;
    fn queue(&self, _q: &QueueContext) -> std::io::Result<&ShortOps> {
        Ok(self)
    }
}

impl QueueTarget for &ShortOps {
    async fn handle(&self, mut io: Io<'_>) -> IoResult {
        let req = *io.request();
        let mut done = 0;
        while done < req.len() {
            let end = (done + self.max).min(req.len());
            self.ops.fetch_add(1, Ordering::Relaxed);
            let n = match req.op {
                Op::Read => io.read_at(&self.file, done..end, req.offset() + done as u64).await?,
                Op::Write => io.write_at(&self.file, done..end, req.offset() + done as u64, 0).await?,
                _ => return Ok(0),
            };
            if n == 0 {
                return Err(Errno::EIO);
            }
            done += n as usize;
        }
        Ok(done as u32)
    }
}

driver_test! {
    /// An async target that does each request in many operations on the
    /// ring, one after the other: the data arrives whole (64 KiB requests in
    /// 1 KiB operations).
    fn trust_many_operations_per_request_carry_the_data() {
        let path = std::path::PathBuf::from("/tmp/ublk-trust-short");
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(8 * MIB).unwrap();
        let target = ShortOps { file, max: 1024, ops: AtomicU64::new(0) };
        let dev = DeviceBuilder::new().size(8 * MIB).create().unwrap();
        dev.serve_async(&target, |dev, stop| {
            let f = OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(dev.block_path()).unwrap();
            let data = pattern(64 << 10, 9);
            let mut v = vec![0u8; (64 << 10) + 4096];
            let b = aligned(&mut v, 64 << 10);
            b.copy_from_slice(&data);
            f.write_all_at(b, MIB).unwrap();
            b.fill(0);
            f.read_exact_at(b, MIB).unwrap();
            assert_eq!(&b[..], &data[..], "data through 1 KiB operations");
            stop.stop();
        })
        .unwrap();
        let ops = target.ops.load(Ordering::Relaxed);
        eprintln!("operations: {ops}");
        assert!(ops >= 2 * 64, "each 64 KiB request should take 64 operations: {ops}");
        let mut got = vec![0u8; 64 << 10];
        std::fs::File::open(&path).unwrap().read_exact_at(&mut got, MIB).unwrap();
        assert_eq!(got, pattern(64 << 10, 9), "data in the file");
        let _ = std::fs::remove_file(&path);
        assert_no_devices();
    }
}

/// Reads on queue 1 wait on a pipe nobody writes (an operation that stays in
/// flight); the first read on queue 0 panics once one such read is waiting.
struct PanicWithOpsInFlight {
    /// No panic: every armed read waits on the pipe.
    hold_only: bool,
    pipe_rd: OwnedFd,
    waiting: AtomicU32,
    /// Off while the kernel scans partitions at START_DEV.
    armed: AtomicBool,
}

impl AsyncTarget for PanicWithOpsInFlight {
    type Queue<'a> = &'a PanicWithOpsInFlight;
    fn queue(&self, _q: &QueueContext) -> std::io::Result<&PanicWithOpsInFlight> {
        Ok(self)
    }
}

impl QueueTarget for &PanicWithOpsInFlight {
    async fn handle(&self, mut io: Io<'_>) -> IoResult {
        let req = *io.request();
        if req.op != Op::Read || !self.armed.load(Ordering::SeqCst) {
            return Ok(req.len() as u32);
        }
        if req.q_id == 0 && !self.hold_only {
            let t0 = Instant::now();
            while self.waiting.load(Ordering::SeqCst) == 0 && t0.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(10));
            }
            panic!("deliberate panic in queue 0 with {} operations in flight on queue 1", self.waiting.load(Ordering::SeqCst));
        }
        // Into the request's data: the queue cancels and reaps this before
        // the future (and the device's buffers) go.
        let read = io.read_at(FileRef::Fd(self.pipe_rd.as_fd()), 0..req.len(), 0);
        self.waiting.fetch_add(1, Ordering::SeqCst);
        read.await
    }
}

driver_test! {
    /// A queue thread panics while the other queue has target operations in
    /// flight (reads waiting on a pipe) and readers on every CPU keep I/O
    /// coming: the device is torn down, serve returns the panic as an error,
    /// no device is left, and the operations in flight were cancelled (a
    /// write to the pipe afterwards is still there to read: nothing took it
    /// into a buffer that no longer exists).
    fn trust_queue_panic_with_operations_in_flight_tears_down_cleanly() {
        assert!(nproc() >= 2, "needs 2 CPUs for 2 queues, this VM has {}", nproc());
        // Depth 1: the queues hold their only tags, so no parked command is
        // left for the kernel to find at ring close (6.6-6.15 abort held
        // requests only from there): the queues must commit them themselves.
        for depth in [1, 64] {
            eprintln!("depth {depth}:");
            panic_with_operations_in_flight(depth);
        }
    }
}

fn panic_with_operations_in_flight(depth: u16) {
    {
        let (rd, wr) = pipe();
        let target = PanicWithOpsInFlight { hold_only: false, pipe_rd: rd, waiting: AtomicU32::new(0), armed: AtomicBool::new(false) };
        let dev = DeviceBuilder::new()
            .queues(2)
            .depth(depth)
            .flags(no_part_scan())
            .size(16 * MIB)
            .placement(ublk::Placement::Unpinned)
            .create()
            .unwrap();
        let r = within("serve after a queue panic", Duration::from_secs(120), move || {
            let r = dev.serve_async(&target, |dev, _stop| {
                target.armed.store(true, Ordering::SeqCst);
                for cpu in [1usize, 0] {
                    let p = dev.block_path();
                    std::thread::spawn(move || {
                        pin_self(cpu);
                        let f = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(p).unwrap();
                        let mut v = vec![0u8; 8192];
                        for i in 0..64u64 {
                            if f.read_at(aligned(&mut v, 4096), (i % 16) * MIB).is_err() {
                                break;
                            }
                        }
                    });
                    std::thread::sleep(Duration::from_millis(300));
                }
            });
            (r.map(|_| ()).map_err(|e| e.to_string()), target.waiting.load(Ordering::SeqCst), target)
        });
        let (r, waiting, target) = r;
        eprintln!("serve: {r:?}; operations that were in flight on queue 1: {waiting}");
        assert!(r.as_ref().is_err_and(|e| e.contains("panicked")), "{r:?}");
        assert!(waiting >= 1, "the test did not get an operation in flight on queue 1");
        assert_no_devices();
        // The reads were cancelled: bytes written now stay in the pipe.
        assert_no_reader_left(&wr, &target.pipe_rd, "an operation of the dead device");
    }
}

driver_test! {
    /// QUIESCE_DEV (6.16+, UBLK_F_QUIESCE): the serving process's queues see
    /// every command aborted, `serve` returns and leaves the device quiesced
    /// (not deleted), and a new server recovers it and serves I/O again.
    fn trust_quiesced_device_is_left_for_recovery() {
        let has = kernel_has(ublk::sys::abi::UBLK_F_QUIESCE);
        if !has {
            eprintln!("skipped: kernel {} lacks UBLK_F_QUIESCE (6.16+)", kernel_release());
            return;
        }
        let flags = ublk::sys::abi::UBLK_F_QUIESCE | ublk::sys::UBLK_F_USER_RECOVERY;
        let dev = DeviceBuilder::new().size(16 * MIB).flags(flags).create().unwrap();
        let id = dev.id();
        let r = within("serve until quiesced", Duration::from_secs(60), move || {
            dev.serve(&ublk::NullTarget, |_dev, _stop| {
                ublk::Control::open().unwrap().quiesce_dev(id, 10_000).unwrap();
            })
            .map(|_| ())
            .map_err(|e| e.to_string())
        });
        r.expect("serve ends cleanly when the device is quiesced");
        // The kernel makes it QUIESCED once the server released /dev/ublkcN.
        let t0 = Instant::now();
        let state = loop {
            let info = ublk::Control::open().unwrap().get_dev_info(id).expect("the quiesced device still exists");
            let state = ublk::ctrl::state_name(info.state);
            if state == "QUIESCED" || t0.elapsed() > Duration::from_secs(10) {
                break state;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(state, "QUIESCED");
        let dev = ublk::Device::recover(id, Duration::from_secs(10)).unwrap();
        dev.serve(&ublk::NullTarget, |dev, stop| {
            let f = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(dev.block_path()).unwrap();
            let mut v = vec![0u8; 8192];
            f.read_exact_at(aligned(&mut v, 4096), 0).expect("I/O after recovery");
            stop.stop();
        })
        .unwrap();
        assert_no_devices();
    }
}

/// Panics on its first read once armed (after the partition scan).
struct PanicOnRead(AtomicBool);

impl Target for PanicOnRead {
    fn needs_data(&self) -> bool {
        false
    }
    fn handle(&self, req: &Request, _buf: &mut [u8]) -> IoResult {
        if req.op == Op::Read && self.0.load(Ordering::SeqCst) {
            panic!("deliberate panic serving a read");
        }
        Ok(req.len() as u32)
    }
}

driver_test! {
    /// `on_live` itself reads the disk, and the queue serving that read
    /// dies: teardown does not wait for `on_live` (which would wait for the
    /// read forever); the read fails and serve returns the queue's error.
    fn trust_queue_death_during_on_live_io_does_not_deadlock() {
        let dev = DeviceBuilder::new().size(16 * MIB).flags(no_part_scan()).create().unwrap();
        let r = within("serve with on_live blocked in I/O", Duration::from_secs(120), move || {
            let mut read = None;
            let target = PanicOnRead(AtomicBool::new(false));
            let r = dev.serve(&target, |dev, _stop| {
                target.0.store(true, Ordering::SeqCst);
                let f = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(dev.block_path()).unwrap();
                let mut v = vec![0u8; 8192];
                read = Some(f.read_at(aligned(&mut v, 4096), 0).map_err(|e| e.to_string()));
            });
            (r.map(|_| ()).map_err(|e| e.to_string()), read)
        });
        eprintln!("serve: {:?}, on_live's read: {:?}", r.0, r.1);
        assert!(r.0.as_ref().is_err_and(|e| e.contains("panicked")), "{:?}", r.0);
        assert!(r.1.as_ref().is_some_and(|x| x.is_err()), "on_live's read should fail: {:?}", r.1);
        assert_no_devices();
    }
}

driver_test! {
    /// Flags the library does not implement are refused before ADD_DEV,
    /// naming the flag and the kernel that has it; nothing is created.
    fn trust_unimplemented_flags_are_refused_by_name() {
        let e = DeviceBuilder::new().flags(ublk::sys::UBLK_F_NEED_GET_DATA).create().expect_err("NEED_GET_DATA is not implemented");
        let msg = e.to_string();
        eprintln!("{msg}");
        assert!(msg.contains("UBLK_F_NEED_GET_DATA") && msg.contains("6.0") && msg.contains("drop the flag"), "{msg}");
        if let Some(zc) = ublk::sys::opt::UBLK_F_SUPPORT_ZERO_COPY {
            // Implemented (DataPath::ZeroCopy asks for it): taken where the
            // kernel has it, refused naming 6.15 where it does not.
            let has = ublk::Control::open().unwrap().features().is_some_and(|f| f.contains(zc));
            let r = DeviceBuilder::new().size(16 * MIB).flags(zc).create();
            if has {
                let dev = r.expect("zero copy is implemented");
                assert_eq!(dev.data_path(), ublk::DataPath::ZeroCopy);
                drop(dev);
            } else {
                let msg = r.expect_err("the kernel lacks zero copy").to_string();
                assert!(msg.contains("UBLK_F_SUPPORT_ZERO_COPY") && msg.contains("6.15"), "{msg}");
            }
        }
        let msg = DeviceBuilder::new().flags(1 << 63).create().expect_err("unknown bit").to_string();
        assert!(msg.contains("bit 63"), "{msg}");
        assert_no_devices();
        // A supported flag still works.
        let dev = DeviceBuilder::new().size(16 * MIB).flags(ublk::sys::UBLK_F_USER_RECOVERY).create().unwrap();
        assert_ne!(dev.info().flags & ublk::sys::UBLK_F_USER_RECOVERY, 0);
        drop(dev);
        assert_no_devices();
    }
}

driver_test! {
    /// Queue::new sizes the tag buffers from the DevInfo it is given, so it
    /// refuses a DevInfo that differs from the kernel's, or an fd that is not
    /// the device's /dev/ublkcN.
    fn trust_queue_new_refuses_a_devinfo_the_kernel_does_not_have() {
        let dev = DeviceBuilder::new().size(16 * MIB).max_io_bytes(512 << 10).create().unwrap();
        let mut info = *dev.info();
        let devnull = std::fs::File::open("/dev/null").unwrap();
        let e = ublk::Queue::new(devnull.as_fd(), &info, 0, dev.encoding(), None, &[]).expect_err("/dev/null is no ublk char device");
        assert!(e.to_string().contains("not /dev/ublkc"), "{e}");
        info.max_io_buf_bytes = 4096;
        // The device holds /dev/ublkcN open (one opener only), so a second
        // open is refused by the kernel; the DevInfo check needs no fd of
        // ours to show: pass the device's own path through /proc.
        let fd_path = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == dev.char_path()))
            .expect("the device's /dev/ublkcN fd");
        let fd: RawFd = fd_path.file_name().to_str().unwrap().parse().unwrap();
        // SAFETY: `dev` keeps this descriptor open until it is dropped below.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let e = ublk::Queue::new(fd, &info, 0, dev.encoding(), None, &[]).expect_err("a smaller max_io_buf_bytes than the kernel's");
        assert!(e.to_string().contains("differs from the kernel's"), "{e}");
        drop(dev);
        assert_no_devices();
    }
}

driver_test! {
    /// A clean stop while a target operation can never complete (a read
    /// from a pipe nobody writes): after the stop grace (1 s here) the operation is
    /// cancelled, the reader gets an error, serve returns, nothing is left,
    /// and the operation is really gone (bytes written to the pipe afterwards
    /// stay there).
    fn trust_stop_cancels_operations_that_never_complete() {
        let (rd, wr) = pipe();
        let target = PanicWithOpsInFlight { hold_only: true, pipe_rd: rd, waiting: AtomicU32::new(0), armed: AtomicBool::new(false) };
        let dev = DeviceBuilder::new().size(16 * MIB).flags(no_part_scan()).stop_grace(Duration::from_secs(1)).create().unwrap();
        let t0 = Instant::now();
        let (r, read, target) = within("stop with an operation that never completes", Duration::from_secs(90), move || {
            let (tx, rx) = mpsc::channel();
            let r = dev.serve_async(&target, |dev, stop| {
                target.armed.store(true, Ordering::SeqCst);
                let p = dev.block_path();
                std::thread::spawn(move || {
                    let f = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(p).unwrap();
                    let mut v = vec![0u8; 8192];
                    let _ = tx.send(f.read_at(aligned(&mut v, 4096), 0).map_err(|e| e.to_string()));
                });
                let t = Instant::now();
                while target.waiting.load(Ordering::SeqCst) == 0 && t.elapsed() < Duration::from_secs(20) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                stop.stop();
            });
            let read = rx.recv_timeout(Duration::from_secs(30)).ok();
            (r.map(|_| ()).map_err(|e| e.to_string()), read, target)
        });
        eprintln!("serve: {r:?} after {:?}; the reader got {read:?}", t0.elapsed());
        assert!(target.waiting.load(Ordering::SeqCst) >= 1, "no operation was in flight");
        r.expect("a clean stop");
        assert!(read.as_ref().is_some_and(|x| x.is_err()), "the held read must fail: {read:?}");
        assert_no_devices();
        assert_no_reader_left(&wr, &target.pipe_rd, "a cancelled operation");
    }
}

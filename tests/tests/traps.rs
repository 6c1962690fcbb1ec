//! Negative tests at the raw SQE level: each trap a ublk server can fall into,
//! reproduced against the real driver, with the kernel's actual answer
//! asserted per kernel generation.
//!
//! The safe API makes these mistakes impossible, so this file bypasses it on
//! purpose: `ublk::Control` creates and deletes the devices, but every io
//! command is a hand-built 64- or 128-byte SQE (bytes, not builders) pushed
//! into an `io_uring` of our own.
//!
//! Each answer is printed as `TRAP <name> kernel <release>: <answer>`, where
//! the answer is an errno name or `accepted` (the FETCH is parked in the
//! kernel: no CQE until a request or an abort). Every test collects all its
//! observations before asserting, so a failure lists everything seen.
//! Run with `--nocapture` to see the lines of passing tests.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use ublk::{sys, Control, DevInfo, Error, Params};
use ublk_tests::*;

// ---------------------------------------------------------------- kernels

/// The three behaviours the driver has had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gen {
    /// 6.1-6.3: legacy opcodes only, queue bound to the task of its last FETCH.
    Legacy,
    /// 6.4-6.15: both encodings, still one daemon task per queue.
    PerQueue,
    /// 6.16+: each tag bound to the task that fetched it (`io->task`).
    PerTag,
}

fn gen() -> Gen {
    match kernel_version() {
        v if v < (6, 4) => Gen::Legacy,
        v if v < (6, 16) => Gen::PerQueue,
        _ => Gen::PerTag,
    }
}

// ---------------------------------------------------------------- answers

/// What the kernel did with one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ans {
    /// No CQE: the command is parked (an accepted FETCH waits for a request).
    Accepted,
    /// A CQE with this result (0 or a negative errno).
    Res(i32),
}

const EINVAL: Ans = Ans::Res(-libc::EINVAL);
const EBUSY: Ans = Ans::Res(-libc::EBUSY);
const OK: Ans = Ans::Res(0);

fn errno_name(e: i32) -> String {
    let n = match e {
        libc::EINVAL => "EINVAL",
        libc::EBUSY => "EBUSY",
        libc::ENODEV => "ENODEV",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EPERM => "EPERM",
        libc::EFAULT => "EFAULT",
        libc::EEXIST => "EEXIST",
        libc::EINTR => "EINTR",
        libc::ECANCELED => "ECANCELED",
        _ => return format!("-{e}"),
    };
    format!("-{n}")
}

impl std::fmt::Display for Ans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ans::Accepted => write!(f, "accepted"),
            Ans::Res(0) => write!(f, "0"),
            Ans::Res(r) if *r < 0 => write!(f, "{}", errno_name(-r)),
            Ans::Res(r) => write!(f, "{r}"),
        }
    }
}

/// Observations of one test: printed as they come, asserted at the end.
struct Obs {
    test: &'static str,
    rows: Vec<(String, Ans, Ans)>,
}

impl Obs {
    fn new(test: &'static str) -> Self {
        Obs { test, rows: vec![] }
    }

    fn check(&mut self, name: &str, got: Ans, want: Ans) {
        println!("TRAP {name} kernel {}: {got}", kernel_release());
        self.rows.push((name.to_string(), got, want));
    }

    fn finish(self) {
        let bad: Vec<String> = self
            .rows
            .iter()
            .filter(|(_, g, w)| g != w)
            .map(|(n, g, w)| format!("  {n}: kernel {} answered {g}, expected {w}", kernel_release()))
            .collect();
        assert!(bad.is_empty(), "{} ({:?}):\n{}", self.test, gen(), bad.join("\n"));
    }
}

// ---------------------------------------------------------------- SQE bytes

/// `IORING_OP_URING_CMD`.
const URING_CMD: u8 = 46;
const _: () = assert!(opcode::UringCmd16::CODE == URING_CMD);

/// `struct ublksrv_io_cmd`, little-endian: q_id u16 @0, tag u16 @2,
/// result s32 @4, addr u64 @8.
fn io_payload(q_id: u16, tag: u16, result: i32, addr: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..2].copy_from_slice(&q_id.to_le_bytes());
    b[2..4].copy_from_slice(&tag.to_le_bytes());
    b[4..8].copy_from_slice(&result.to_le_bytes());
    b[8..16].copy_from_slice(&addr.to_le_bytes());
    // The same bytes as the header's struct.
    let s = sys::ublksrv_io_cmd::new(q_id, tag, result, addr);
    // SAFETY: ublksrv_io_cmd is 16 bytes of plain integers, no padding.
    let sb: [u8; 16] = unsafe { std::mem::transmute_copy(&s) };
    assert_eq!(b, sb);
    b
}

/// `struct ublksrv_ctrl_cmd`: dev_id u32 @0, queue_id u16 @4, len u16 @6,
/// addr u64 @8, data[0] u64 @16.
fn ctrl_payload(dev_id: u32, len: u16, addr: u64) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0..4].copy_from_slice(&dev_id.to_le_bytes());
    b[4..6].copy_from_slice(&u16::MAX.to_le_bytes());
    b[6..8].copy_from_slice(&len.to_le_bytes());
    b[8..16].copy_from_slice(&addr.to_le_bytes());
    b
}

/// An SQE of N bytes: opcode 46 at 0, fd at 4..8, cmd_op at 8..12,
/// user_data at 32..40, then each (offset, bytes) written verbatim.
fn sqe<const N: usize>(fd: i32, cmd_op: u32, user_data: u64, parts: &[(usize, &[u8])]) -> [u8; N] {
    let mut b = [0u8; N];
    b[0] = URING_CMD;
    b[4..8].copy_from_slice(&fd.to_le_bytes());
    b[8..12].copy_from_slice(&cmd_op.to_le_bytes());
    b[32..40].copy_from_slice(&user_data.to_le_bytes());
    for (off, bytes) in parts {
        b[*off..*off + bytes.len()].copy_from_slice(bytes);
    }
    b
}

fn entry64(b: [u8; 64]) -> squeue::Entry {
    // SAFETY: squeue::Entry is #[repr(C)] around the 64-byte io_uring_sqe,
    // which is plain integers: any byte pattern is a valid value.
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(b) }
}

fn entry128(b: [u8; 128]) -> squeue::Entry128 {
    // SAFETY: squeue::Entry128 is #[repr(C)] (Entry, [u8; 64]): 128 bytes of
    // plain integers.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(b) }
}

fn ring64() -> IoUring<squeue::Entry, cqueue::Entry> {
    IoUring::builder().build(8).expect("io_uring (64-byte SQEs)")
}

fn ring128() -> IoUring<squeue::Entry128, cqueue::Entry> {
    IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(8).expect("io_uring (IORING_SETUP_SQE128)")
}

/// Submits one SQE and reports what came back within `wait`: its CQE result,
/// or `Accepted` if the kernel kept it. Refusals by io_uring or by ublk's
/// checks complete during the submit itself.
fn submit_for<S: squeue::EntryMarker>(ring: &mut IoUring<S, cqueue::Entry>, e: S, wait: Duration) -> Ans {
    let ud = next_ud();
    // SAFETY: every address an io command carries points into a TrapDev's
    // buffer, which outlives the ring (rings are dropped first); a control
    // command's buffer outlives its completion, which we wait for.
    unsafe { ring.submission().push(&set_ud(e, ud)).expect("SQ full") };
    ring.submit().expect("io_uring_enter");
    let ts = types::Timespec::from(wait);
    let t0 = Instant::now();
    loop {
        if let Some(c) = ring.completion().next() {
            assert_eq!(c.user_data(), ud, "a CQE for an earlier command: {}", c.result());
            return Ans::Res(c.result());
        }
        if t0.elapsed() >= wait {
            return Ans::Accepted;
        }
        let args = types::SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => {}
            Err(e) => panic!("io_uring_enter: {e}"),
        }
    }
}

fn submit<S: squeue::EntryMarker>(ring: &mut IoUring<S, cqueue::Entry>, e: S) -> Ans {
    submit_for(ring, e, Duration::from_millis(300))
}

/// Waits for the answer of a control command (they run on io-wq).
fn submit_ctrl(ring: &mut IoUring<squeue::Entry128, cqueue::Entry>, e: squeue::Entry128) -> Ans {
    submit_for(ring, e, Duration::from_secs(10))
}

static UD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
fn next_ud() -> u64 {
    UD.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Sets user_data through the byte view, whatever the entry size.
fn set_ud<S: squeue::EntryMarker>(e: S, ud: u64) -> S {
    let mut e = e;
    // SAFETY: both entry types start with the 64-byte io_uring_sqe, whose
    // bytes 32..40 are user_data.
    unsafe {
        let p = &mut e as *mut S as *mut u8;
        std::ptr::copy_nonoverlapping(ud.to_le_bytes().as_ptr(), p.add(32), 8);
    }
    e
}

// ---------------------------------------------------------------- devices

const MAX_IO: u32 = 64 << 10;

/// A device made with the safe control API (ADD_DEV + SET_PARAMS, one queue,
/// `depth` tags), its char device open, per-tag buffers, never started
/// unless a test does it. Dropped: STOP_DEV, close, DEL_DEV (bounded wait).
/// Declare it before the rings of a test so they are dropped first.
struct TrapDev {
    ctrl: Option<Control>,
    id: u32,
    info: DevInfo,
    char_file: Option<File>,
    bufs: Vec<u8>,
}

impl TrapDev {
    fn new(depth: u16) -> TrapDev {
        Self::with_flags(depth, 0)
    }

    fn with_flags(depth: u16, flags: u64) -> TrapDev {
        assert_no_devices();
        let mut ctrl = Control::open().expect("open /dev/ublk-control");
        let want = DevInfo {
            nr_hw_queues: 1,
            queue_depth: depth,
            max_io_buf_bytes: MAX_IO,
            dev_id: u32::MAX,
            ublksrv_pid: std::process::id() as i32,
            flags,
            ..Default::default()
        };
        let info = ctrl.add_dev(&want).expect("ADD_DEV");
        let id = info.dev_id;
        let mut dev = TrapDev { ctrl: Some(ctrl), id, info, char_file: None, bufs: vec![0u8; depth as usize * MAX_IO as usize] };
        let params = Params::new(16 << 20, 512, info.max_io_buf_bytes).unwrap();
        dev.ctrl.as_mut().unwrap().set_params(id, &params).expect("SET_PARAMS");
        let path = format!("/dev/ublkc{id}");
        let t0 = Instant::now();
        dev.char_file = Some(loop {
            match std::fs::OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => break f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && t0.elapsed() < Duration::from_secs(5) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("open {path}: {e}"),
            }
        });
        dev
    }

    fn fd(&self) -> i32 {
        self.char_file.as_ref().unwrap().as_raw_fd()
    }

    fn buf(&self, tag: u16) -> u64 {
        self.bufs.as_ptr() as u64 + u64::from(tag) * u64::from(MAX_IO)
    }

    /// The opcode encoding the kernel negotiated (GET_FEATURES).
    fn fetch_op(&self) -> u32 {
        match self.ctrl.as_ref().unwrap().encoding() {
            ublk::Encoding::Legacy => sys::UBLK_IO_FETCH_REQ,
            ublk::Encoding::Ioctl => sys::UBLK_U_IO_FETCH_REQ,
        }
    }

    fn commit_op(&self) -> u32 {
        match self.ctrl.as_ref().unwrap().encoding() {
            ublk::Encoding::Legacy => sys::UBLK_IO_COMMIT_AND_FETCH_REQ,
            ublk::Encoding::Ioctl => sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ,
        }
    }

    /// A correct io command: 64 bytes, payload at 48.
    fn io(&self, op: u32, q_id: u16, tag: u16, addr: u64) -> squeue::Entry {
        entry64(sqe(self.fd(), op, 0, &[(48, &io_payload(q_id, tag, 0, addr))]))
    }

    /// STOP_DEV: completes every parked FETCH with UBLK_IO_RES_ABORT (on 6.1
    /// the only way to get them back; a task cannot exit while it has one).
    fn stop(&mut self) {
        if let Some(c) = self.ctrl.as_mut() {
            let _ = c.stop_dev(self.id);
        }
    }

    /// Close `/dev/ublkcN` and DEL_DEV, waiting at most 30 s (DEL_DEV waits
    /// until the char device is released); panics if it did not finish.
    fn delete(&mut self) {
        self.char_file = None;
        let Some(mut ctrl) = self.ctrl.take() else { return };
        let id = self.id;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(ctrl.del_dev(id));
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(r) => r.expect("DEL_DEV"),
            Err(_) => panic!("DEL_DEV of device {id} did not finish within 30 s"),
        }
    }

    /// The normal end of a test: STOP_DEV, drop the rings, DEL_DEV, and check
    /// that nothing is left.
    fn finish(mut self, rings: impl FnOnce()) {
        self.stop();
        rings();
        self.delete();
        assert_no_devices();
    }
}

impl Drop for TrapDev {
    fn drop(&mut self) {
        // Only reached with the device still present when a test panicked.
        if self.ctrl.is_some() {
            self.stop();
            if std::thread::panicking() {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.delete()));
            } else {
                self.delete();
            }
        }
    }
}

// ---------------------------------------------------------------- (a), (b)

driver_test! {
    /// (a) The 16-byte ublksrv_io_cmd belongs at SQE bytes 48..63, also in a
    /// 128-byte SQE. Written at 64..79 of an SQE128 entry, ublk reads zeros
    /// at 48..63: q_id 0, tag 0, addr 0, and refuses the FETCH for the
    /// missing buffer. The same payload at 48 in the same ring is accepted.
    fn traps_a_payload_at_byte_64_instead_of_48() {
        let dev = TrapDev::new(2);
        let mut r = ring128();
        let mut obs = Obs::new("traps_a");
        let p0 = io_payload(0, 0, 0, dev.buf(0));
        let got = submit(&mut r, entry128(sqe(dev.fd(), dev.fetch_op(), 0, &[(64, &p0)])));
        obs.check("a_fetch_payload_at_64_sqe128", got, EINVAL);
        let p1 = io_payload(0, 1, 0, dev.buf(1));
        let got = submit(&mut r, entry128(sqe(dev.fd(), dev.fetch_op(), 0, &[(48, &p1)])));
        obs.check("a_fetch_payload_at_48_sqe128", got, Ans::Accepted);
        dev.finish(|| drop(r));
        obs.finish();
    }
}

driver_test! {
    /// (b) Payload at bytes 16..31 lands in addr (16..23), len (24..27) and
    /// uring_cmd_flags (28..31): the upper half of the buffer address becomes
    /// unknown uring_cmd_flags bits and io_uring_cmd_prep refuses the SQE
    /// before ublk sees it. The two other io_uring-level traps too: non-zero
    /// __pad1 (bytes 12..15) and stray uring_cmd_flags with a correct payload.
    fn traps_b_payload_at_bytes_16_to_31() {
        let dev = TrapDev::new(2);
        let mut r = ring64();
        let mut obs = Obs::new("traps_b");
        let addr = dev.buf(0);
        assert_ne!(addr >> 32, 0, "the trap needs a buffer address above 4 GiB (upper half non-zero)");
        let p = io_payload(0, 0, 0, addr);
        let got = submit(&mut r, entry64(sqe(dev.fd(), dev.fetch_op(), 0, &[(16, &p)])));
        obs.check("b_fetch_payload_at_16", got, EINVAL);
        let got = submit(&mut r, entry64(sqe(dev.fd(), dev.fetch_op(), 0, &[(48, &p), (12, &1u32.to_le_bytes())])));
        obs.check("b_fetch_pad1_nonzero", got, EINVAL);
        let got = submit(&mut r, entry64(sqe(dev.fd(), dev.fetch_op(), 0, &[(48, &p), (28, &0x100u32.to_le_bytes())])));
        obs.check("b_fetch_uring_cmd_flags_0x100", got, EINVAL);
        // Nothing of the above reached ublk: the tag is still free.
        let got = submit(&mut r, dev.io(dev.fetch_op(), 0, 0, addr));
        obs.check("b_fetch_correct_after", got, Ans::Accepted);
        dev.finish(|| drop(r));
        obs.finish();
    }
}

// ---------------------------------------------------------------- (c)

/// A thread with its own 64-byte ring that submits what it is sent.
fn submitter(rx: mpsc::Receiver<Option<[u8; 64]>>, tx: mpsc::Sender<Ans>) {
    let mut r = ring64();
    while let Ok(Some(b)) = rx.recv() {
        let _ = tx.send(submit(&mut r, entry64(b)));
    }
    // The ring is closed here, after the test's STOP_DEV.
}

driver_test! {
    /// (c) The thread rule. Thread A fetches tag 0 and thread B fetches tag 1
    /// (the queue's last): both FETCHes are accepted on every kernel. Then:
    /// * 6.1-6.15 bind the whole queue to B, the task of its last FETCH
    ///   (`ubq->ubq_daemon`, `ublk_mark_io_ready`): A is refused (-EINVAL)
    ///   even for its own tag, and requests for A's tag would be failed;
    /// * 6.16+ bind each tag to the task that fetched it (`io->task`): B is
    ///   refused (-EINVAL) for tag 0, A passes the task check and only meets
    ///   "no request pending" (-EBUSY).
    fn traps_c_fetch_from_two_threads() {
        let mut dev = TrapDev::new(2);
        let mut obs = Obs::new("traps_c");
        let g = gen();
        let (fetch, commit) = (dev.fetch_op(), dev.commit_op());
        let (fd, b0, b1) = (dev.fd(), dev.buf(0), dev.buf(1));
        let io = |op: u32, tag: u16, addr: u64| sqe::<64>(fd, op, 0, &[(48, &io_payload(0, tag, 0, addr))]);
        std::thread::scope(|s| {
            let (a_tx, a_in) = mpsc::channel();
            let (a_out, a_rx) = mpsc::channel();
            let (b_tx, b_in) = mpsc::channel();
            let (b_out, b_rx) = mpsc::channel();
            s.spawn(move || submitter(a_in, a_out));
            s.spawn(move || submitter(b_in, b_out));
            let on = |tx: &mpsc::Sender<Option<[u8; 64]>>, rx: &mpsc::Receiver<Ans>, b: [u8; 64]| {
                tx.send(Some(b)).unwrap();
                rx.recv().unwrap()
            };
            obs.check("c_A_fetch_tag0", on(&a_tx, &a_rx, io(fetch, 0, b0)), Ans::Accepted);
            obs.check("c_B_fetch_tag1_last", on(&b_tx, &b_rx, io(fetch, 1, b1)), Ans::Accepted);
            let (a_commit, b_commit, a_refetch, b_refetch) = match g {
                Gen::Legacy | Gen::PerQueue => (EINVAL, EBUSY, EINVAL, EBUSY),
                Gen::PerTag => (EBUSY, EINVAL, EBUSY, EBUSY),
            };
            obs.check("c_A_commit_tag0", on(&a_tx, &a_rx, io(commit, 0, b0)), a_commit);
            obs.check("c_B_commit_tag0", on(&b_tx, &b_rx, io(commit, 0, b0)), b_commit);
            obs.check("c_A_refetch_tag0", on(&a_tx, &a_rx, io(fetch, 0, b0)), a_refetch);
            obs.check("c_B_refetch_tag0", on(&b_tx, &b_rx, io(fetch, 0, b0)), b_refetch);
            // STOP_DEV while both threads live: their parked FETCHes complete
            // with ABORT, so the threads can exit (6.1 would block an exiting
            // task until its uring_cmds complete).
            dev.stop();
            drop((a_tx, b_tx));
        });
        dev.delete();
        assert_no_devices();
        obs.finish();
    }
}

/// A read-only mapping of a queue's descriptors, unmapped on drop (before
/// the device is deleted: a mapping keeps `/dev/ublkcN` open).
struct Descs(*mut libc::c_void, usize);

impl Descs {
    fn map(fd: i32, depth: u16) -> Descs {
        let page = 4096usize;
        let len = (usize::from(depth) * 24).div_ceil(page) * page;
        // SAFETY: a fresh shared read-only mapping of queue 0's descriptor
        // array (offset UBLKSRV_CMD_BUF_OFFSET + 0 * stride); checked below.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
        assert_ne!(p, libc::MAP_FAILED, "mmap descriptors: {}", std::io::Error::last_os_error());
        Descs(p, len)
    }

    /// Bytes the request parked on `tag` asks for (nr_sectors << 9).
    fn len(&self, tag: u16) -> usize {
        // SAFETY: tag < depth, inside the mapping; nr_sectors is the u32 at
        // byte 4 of the 24-byte ublksrv_io_desc; read once, volatile.
        let n = unsafe { std::ptr::read_volatile((self.0 as *const u8).add(usize::from(tag) * 24 + 4) as *const u32) };
        (n as usize) << 9
    }
}

impl Drop for Descs {
    fn drop(&mut self) {
        // SAFETY: exactly what mmap returned.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

// SAFETY: the mapping is read-only shared memory; reading it from several
// threads is fine.
unsafe impl Sync for Descs {}

/// What one serving thread saw.
#[derive(Debug, Default)]
struct Served {
    requests: u32,
    commit_errors: Vec<i32>,
}

/// Fetches `tag` from this thread's own ring, reports the answer, then
/// serves it (zeros for reads) until aborted or told to stop.
#[allow(clippy::too_many_arguments)]
fn serve_tag(
    fd: i32,
    tag: u16,
    buf: u64,
    ops: (u32, u32),
    descs: &Descs,
    fetched: mpsc::Sender<Ans>,
    stop: &std::sync::atomic::AtomicBool,
) -> Served {
    let mut r = ring64();
    let mut seen = Served::default();
    let io = |op: u32, result: i32| entry64(sqe(fd, op, u64::from(tag), &[(48, &io_payload(0, tag, result, buf))]));
    let a = submit(&mut r, io(ops.0, 0));
    let _ = fetched.send(a);
    if a != Ans::Accepted {
        return seen;
    }
    let ts = types::Timespec::from(Duration::from_millis(50));
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let args = types::SubmitArgs::new().timespec(&ts);
        match r.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => {}
            Err(e) => panic!("io_uring_enter: {e}"),
        }
        let cqes: Vec<i32> = r.completion().map(|c| c.result()).collect();
        for res in cqes {
            match res {
                0 => {
                    seen.requests += 1;
                    let len = descs.len(tag);
                    // SAFETY: the tag's buffer is MAX_IO bytes of the TrapDev's
                    // Vec, which outlives this thread; len <= max_sectors << 9.
                    unsafe { std::ptr::write_bytes(buf as *mut u8, 0, len.min(MAX_IO as usize)) };
                    // SAFETY: as in submit_for.
                    unsafe { r.submission().push(&io(ops.1, len as i32)).expect("SQ full") };
                }
                sys::UBLK_IO_RES_ABORT => return seen,
                e => {
                    seen.commit_errors.push(e);
                    return seen;
                }
            }
        }
    }
    seen
}

driver_test! {
    /// (c2) What the thread rule does to I/O. Thread A fetches and serves
    /// tag 0, thread B tag 1 (the queue's last FETCH); START_DEV succeeds on
    /// every kernel. Then direct reads:
    /// * up to 6.15, a request on tag 0 is handed to A's task and failed there
    ///   by `__ublk_rq_task_work` (`current != ubq->ubq_daemon`): the read
    ///   gets EIO and A never sees a request;
    /// * from 6.16, A gets tag 0's requests and its commits are accepted.
    ///
    /// `UBLK_F_URING_CMD_COMP_IN_TASK` is set so that 6.1 delivers through the
    /// fetching task as 6.12 always does (a built-in 6.1 driver would
    /// otherwise use the daemon's task_work).
    fn traps_c2_io_goes_to_the_fetching_thread() {
        let mut dev = TrapDev::with_flags(2, sys::UBLK_F_URING_CMD_COMP_IN_TASK);
        let descs = Descs::map(dev.fd(), 2);
        let mut obs = Obs::new("traps_c2");
        let g = gen();
        let ops = (dev.fetch_op(), dev.commit_op());
        let (fd, b0, b1, id) = (dev.fd(), dev.buf(0), dev.buf(1), dev.id);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (served_a, served_b, eio, ok) = std::thread::scope(|s| {
            let (ftx, frx) = mpsc::channel();
            let (descs, stop, ftx2) = (&descs, &stop, ftx.clone());
            let a = s.spawn(move || serve_tag(fd, 0, b0, ops, descs, ftx, stop));
            obs.check("c2_A_fetch_tag0", frx.recv().unwrap(), Ans::Accepted);
            let b = s.spawn(move || serve_tag(fd, 1, b1, ops, descs, ftx2, stop));
            obs.check("c2_B_fetch_tag1_last", frx.recv().unwrap(), Ans::Accepted);
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let t0 = Instant::now();
            let started = dev.ctrl.as_ref().unwrap().start_dev(id, || t0.elapsed() < Duration::from_secs(20));
            let started_ans = match &started {
                Ok(()) => OK,
                Err(e) => Ans::Res(-e.errno().unwrap_or(libc::EIO)),
            };
            obs.check("c2_start_dev", started_ans, OK);
            let (mut eio, mut ok) = (0u32, 0u32);
            if started.is_ok() {
                let path = format!("/dev/ublkb{id}");
                wait_for_path(std::path::Path::new(&path));
                use std::os::unix::fs::{FileExt, OpenOptionsExt};
                let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&path).unwrap();
                let mut raw = vec![0u8; 8192];
                let buf = aligned(&mut raw, 4096);
                // Tags are handed out round-robin; read until the answer is clear.
                for i in 0..200u64 {
                    match f.read_at(buf, (i % 64) * 4096) {
                        Ok(4096) => ok += 1,
                        Ok(n) => panic!("short read {n}"),
                        Err(e) if e.raw_os_error() == Some(libc::EIO) => eio += 1,
                        Err(e) => panic!("read {path}: {e}"),
                    }
                    if ok >= 20 && (eio > 0 || i >= 40) {
                        break;
                    }
                }
            }
            (eio, ok)
            }));
            // STOP_DEV while A and B live: their parked FETCHes are aborted.
            dev.stop();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let (sa, sb) = (a.join(), b.join());
            let (eio, ok) = run.unwrap_or_else(|p| std::panic::resume_unwind(p));
            (sa.unwrap(), sb.unwrap(), eio, ok)
        });
        println!(
            "TRAP c2_reads kernel {}: {ok} ok, {eio} EIO; A served {} (commit errors {:?}), B served {} (commit errors {:?})",
            kernel_release(), served_a.requests, served_a.commit_errors, served_b.requests, served_b.commit_errors
        );
        drop(descs);
        dev.delete();
        assert_no_devices();
        obs.finish();
        assert!(served_a.commit_errors.is_empty() && served_b.commit_errors.is_empty(), "no commit may be refused");
        assert!(served_b.requests > 0, "B serves tag 1 on every kernel");
        match g {
            Gen::Legacy | Gen::PerQueue => {
                assert_eq!(served_a.requests, 0, "up to 6.15 the queue belongs to B: A gets nothing");
                assert!(eio > 0, "requests on A's tag fail with EIO");
            }
            Gen::PerTag => {
                assert!(served_a.requests > 0, "6.16+: A serves its own tag");
                assert_eq!(eio, 0, "6.16+: no read fails");
            }
        }
    }
}

// ---------------------------------------------------------------- (d), (e), (f)

driver_test! {
    /// (d) q_id >= nr_hw_queues and tag >= queue_depth: -EINVAL everywhere.
    /// (e) buffer address 0 on a device without USER_COPY/NEED_GET_DATA:
    /// -EINVAL everywhere.
    fn traps_d_e_bad_queue_tag_and_null_buffer() {
        let dev = TrapDev::new(2);
        assert_eq!(dev.info.nr_hw_queues, 1);
        let mut r = ring64();
        let mut obs = Obs::new("traps_d_e");
        let f = dev.fetch_op();
        obs.check("d_fetch_qid_1_of_1", submit(&mut r, dev.io(f, 1, 0, dev.buf(0))), EINVAL);
        obs.check("d_fetch_qid_0xffff", submit(&mut r, dev.io(f, 0xffff, 0, dev.buf(0))), EINVAL);
        obs.check("d_fetch_tag_2_of_2", submit(&mut r, dev.io(f, 0, 2, dev.buf(0))), EINVAL);
        obs.check("d_fetch_tag_0xffff", submit(&mut r, dev.io(f, 0, 0xffff, dev.buf(0))), EINVAL);
        obs.check("e_fetch_addr_0", submit(&mut r, dev.io(f, 0, 0, 0)), EINVAL);
        obs.check("e_fetch_tag0_after_refusals", submit(&mut r, dev.io(f, 0, 0, dev.buf(0))), Ans::Accepted);
        dev.finish(|| drop(r));
        obs.finish();
    }
}

driver_test! {
    /// (f) FETCH of a tag that already has a FETCH parked (same thread, queue
    /// not yet complete): -EBUSY up to 6.15 (`UBLK_IO_FLAG_ACTIVE` check in
    /// __ublk_ch_uring_cmd), -EINVAL from 6.16 (__ublk_fetch).
    fn traps_f_fetch_same_tag_twice() {
        let dev = TrapDev::new(2);
        let mut r = ring64();
        let mut obs = Obs::new("traps_f");
        let f = dev.fetch_op();
        obs.check("f_fetch_tag0", submit(&mut r, dev.io(f, 0, 0, dev.buf(0))), Ans::Accepted);
        let want = if gen() == Gen::PerTag { EINVAL } else { EBUSY };
        obs.check("f_fetch_tag0_again", submit(&mut r, dev.io(f, 0, 0, dev.buf(0))), want);
        dev.finish(|| drop(r));
        obs.finish();
    }
}

// ---------------------------------------------------------------- (g)

driver_test! {
    /// (g) Opcode encodings. 6.1 compares cmd_op with the bare numbers, so the
    /// ioctl-encoded FETCH (0xc0107520) falls to `default:` (-EINVAL) and an
    /// encoded control command is -EOPNOTSUPP (or -ENODEV when dev_id does not
    /// name a device, as for GET_FEATURES). 6.4+ dispatch on _IOC_NR and take
    /// both (with CONFIG_BLKDEV_UBLK_LEGACY_OPCODES=y, Debian's default).
    /// Also: a control command on a ring without SQE128 is -EINVAL everywhere.
    fn traps_g_legacy_and_encoded_opcodes() {
        let dev = TrapDev::new(2);
        let mut r = ring64();
        let mut obs = Obs::new("traps_g");
        let g = gen();
        assert_eq!(sys::UBLK_U_IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(sys::UBLK_IO_FETCH_REQ, 0x20);
        let enc = if g == Gen::Legacy { EINVAL } else { Ans::Accepted };
        obs.check("g_fetch_encoded_0xc0107520", submit(&mut r, dev.io(sys::UBLK_U_IO_FETCH_REQ, 0, 0, dev.buf(0))), enc);
        obs.check("g_fetch_legacy_0x20", submit(&mut r, dev.io(sys::UBLK_IO_FETCH_REQ, 0, 1, dev.buf(1))), Ans::Accepted);

        let ctl = std::fs::OpenOptions::new().read(true).write(true).open("/dev/ublk-control").unwrap();
        let mut c = ring128();
        let mut info = DevInfo::default();
        let p = ctrl_payload(dev.id, 64, &mut info as *mut DevInfo as u64);
        let get = |op: u32| entry128(sqe(ctl.as_raw_fd(), op, 0, &[(48, &p)]));
        obs.check("g_ctrl_get_dev_info_legacy_0x02", submit_ctrl(&mut c, get(sys::UBLK_CMD_GET_DEV_INFO)), OK);
        assert_eq!(info.dev_id, dev.id);
        let enc = if g == Gen::Legacy { Ans::Res(-libc::EOPNOTSUPP) } else { OK };
        obs.check("g_ctrl_get_dev_info_encoded_0x80207502", submit_ctrl(&mut c, get(sys::UBLK_U_CMD_GET_DEV_INFO)), enc);
        let mut feats = 0u64;
        let fp = ctrl_payload(u32::MAX, 8, &mut feats as *mut u64 as u64);
        let gf = sqe::<128>(ctl.as_raw_fd(), 0x8020_7513, 0, &[(48, &fp)]);
        let want = if g == Gen::Legacy { Ans::Res(-libc::ENODEV) } else { OK };
        obs.check("g_ctrl_get_features_0x80207513", submit_ctrl(&mut c, entry128(gf)), want);
        // A control command in a 64-byte SQE: only 16 of its 32 bytes fit.
        let mut c64 = ring64();
        let short = entry64(sqe(ctl.as_raw_fd(), sys::UBLK_CMD_GET_DEV_INFO, 0, &[(48, &p[..16])]));
        obs.check("g_ctrl_get_dev_info_without_sqe128", submit_for(&mut c64, short, Duration::from_secs(10)), EINVAL);
        drop((c, c64, ctl));
        dev.finish(|| drop(r));
        obs.finish();
    }
}

// ---------------------------------------------------------------- (h)

driver_test! {
    /// (h) START_DEV blocks in the kernel until every tag of every queue is
    /// fetched. With tag 1 never fetched it would hang forever; with a
    /// deadline the command is cancelled and `Error::TimedOut` comes back,
    /// after which the device can still be deleted.
    fn traps_h_start_dev_with_tags_unfetched_times_out() {
        let dev = TrapDev::new(2);
        let mut r = ring64();
        let mut obs = Obs::new("traps_h");
        obs.check("h_fetch_tag0_only", submit(&mut r, dev.io(dev.fetch_op(), 0, 0, dev.buf(0))), Ans::Accepted);
        let t0 = Instant::now();
        let res = dev.ctrl.as_ref().unwrap().start_dev(dev.id, || t0.elapsed() < Duration::from_secs(2));
        let took = t0.elapsed();
        println!("TRAP h_start_dev_unfetched kernel {}: {res:?} after {took:?}", kernel_release());
        assert!(matches!(res, Err(Error::TimedOut { .. })), "START_DEV with a tag unfetched: {res:?}");
        assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(10), "{took:?}");
        assert!(!std::path::Path::new(&format!("/dev/ublkb{}", dev.id)).exists(), "no disk may appear");
        dev.finish(|| drop(r));
        obs.finish();
    }
}

// ---------------------------------------------------------------- (i)

driver_test! {
    /// (i) The Go team's SQEs, byte for byte: opcode 46, cmd_op 0xC0107520 at
    /// 8..11, len 16 at 24..27, the ublksrv_io_cmd {q_id 0, tag T, result 1,
    /// addr buf} at 16..31, at 48..63, and at 64..79 (SQE128 ring). Only
    /// 48..63 is right, and on 6.1 even that fails for the encoded opcode.
    fn traps_i_go_team_sqes() {
        let dev = TrapDev::new(2);
        let mut r = ring64();
        let mut r128 = ring128();
        let mut obs = Obs::new("traps_i");
        let g = gen();
        let len16 = 16u32.to_le_bytes();
        let op = 0xC010_7520u32;
        let p0 = io_payload(0, 0, 1, dev.buf(0));
        let at16 = sqe::<64>(dev.fd(), op, 0, &[(24, &len16), (16, &p0)]);
        obs.check("i_go_payload_16_31", submit(&mut r, entry64(at16)), EINVAL);
        let at64 = sqe::<128>(dev.fd(), op, 0, &[(24, &len16), (64, &p0)]);
        obs.check("i_go_payload_64_79_sqe128", submit(&mut r128, entry128(at64)), EINVAL);
        let at48 = sqe::<64>(dev.fd(), op, 0, &[(24, &len16), (48, &p0)]);
        let want = if g == Gen::Legacy { EINVAL } else { Ans::Accepted };
        obs.check("i_go_payload_48_63", submit(&mut r, entry64(at48)), want);
        println!("TRAP i_go_sqe_48_63 bytes: {}", hex(&at48));
        dev.finish(|| drop((r, r128)));
        obs.finish();
    }
}

fn hex(b: &[u8]) -> String {
    b.chunks(8).map(|c| c.iter().map(|x| format!("{x:02x}")).collect::<String>()).collect::<Vec<_>>().join(" ")
}

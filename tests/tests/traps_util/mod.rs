//! Helpers of the raw-SQE trap tests (traps_sqe.rs, traps_fetch.rs): the
//! kernel generations, the kernel's answers and a test's observations, SQE
//! bytes built by hand, rings of our own to submit them on, and `TrapDev`, a
//! device made with the safe control API whose io commands are all sent
//! raw.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use ublk::{sys, Control, DevInfo, Params};
use ublk_tests::*;

// ---------------------------------------------------------------- kernels

/// The three behaviours the driver has had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gen {
    /// 6.1-6.3: legacy opcodes only, queue bound to the task of its last FETCH.
    Legacy,
    /// 6.4-6.15: both encodings, still one daemon task per queue.
    PerQueue,
    /// 6.16+: each tag bound to the task that fetched it (`io->task`).
    PerTag,
}

pub fn gen() -> Gen {
    match kernel_version() {
        v if v < (6, 4) => Gen::Legacy,
        v if v < (6, 16) => Gen::PerQueue,
        _ => Gen::PerTag,
    }
}

// ---------------------------------------------------------------- answers

/// What the kernel did with one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ans {
    /// No CQE: the command is parked (an accepted FETCH waits for a request).
    Accepted,
    /// A CQE with this result (0 or a negative errno).
    Res(i32),
}

pub const EINVAL: Ans = Ans::Res(-libc::EINVAL);
pub const EBUSY: Ans = Ans::Res(-libc::EBUSY);
pub const OK: Ans = Ans::Res(0);

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
pub struct Obs {
    test: &'static str,
    rows: Vec<(String, Ans, Ans)>,
}

impl Obs {
    pub fn new(test: &'static str) -> Self {
        Obs { test, rows: vec![] }
    }

    pub fn check(&mut self, name: &str, got: Ans, want: Ans) {
        println!("TRAP {name} kernel {}: {got}", kernel_release());
        self.rows.push((name.to_string(), got, want));
    }

    pub fn finish(self) {
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
pub fn io_payload(q_id: u16, tag: u16, result: i32, addr: u64) -> [u8; 16] {
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
pub fn ctrl_payload(dev_id: u32, len: u16, addr: u64) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0..4].copy_from_slice(&dev_id.to_le_bytes());
    b[4..6].copy_from_slice(&u16::MAX.to_le_bytes());
    b[6..8].copy_from_slice(&len.to_le_bytes());
    b[8..16].copy_from_slice(&addr.to_le_bytes());
    b
}

/// An SQE of N bytes: opcode 46 at 0, fd at 4..8, cmd_op at 8..12,
/// user_data at 32..40, then each (offset, bytes) written verbatim.
pub fn sqe<const N: usize>(fd: i32, cmd_op: u32, user_data: u64, parts: &[(usize, &[u8])]) -> [u8; N] {
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

pub fn entry64(b: [u8; 64]) -> squeue::Entry {
    // SAFETY: squeue::Entry is #[repr(C)] around the 64-byte io_uring_sqe,
    // which is plain integers: any byte pattern is a valid value.
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(b) }
}

pub fn entry128(b: [u8; 128]) -> squeue::Entry128 {
    // SAFETY: squeue::Entry128 is #[repr(C)] (Entry, [u8; 64]): 128 bytes of
    // plain integers.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(b) }
}

pub fn ring64() -> IoUring<squeue::Entry, cqueue::Entry> {
    IoUring::builder().build(8).expect("io_uring (64-byte SQEs)")
}

pub fn ring128() -> IoUring<squeue::Entry128, cqueue::Entry> {
    IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(8).expect("io_uring (IORING_SETUP_SQE128)")
}

/// Submits one SQE and reports what came back within `wait`: its CQE result,
/// or `Accepted` if the kernel kept it. Refusals by io_uring or by ublk's
/// checks complete during the submit itself.
pub fn submit_for<S: squeue::EntryMarker>(ring: &mut IoUring<S, cqueue::Entry>, e: S, wait: Duration) -> Ans {
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

pub fn submit<S: squeue::EntryMarker>(ring: &mut IoUring<S, cqueue::Entry>, e: S) -> Ans {
    submit_for(ring, e, Duration::from_millis(300))
}

/// Waits for the answer of a control command (they run on io-wq).
pub fn submit_ctrl(ring: &mut IoUring<squeue::Entry128, cqueue::Entry>, e: squeue::Entry128) -> Ans {
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

pub const MAX_IO: u32 = 64 << 10;

/// A device made with the safe control API (ADD_DEV + SET_PARAMS, one queue,
/// `depth` tags), its char device open, per-tag buffers, never started
/// unless a test does it. Dropped: STOP_DEV, close, DEL_DEV (bounded wait).
/// Declare it before the rings of a test so they are dropped first.
pub struct TrapDev {
    pub ctrl: Option<Control>,
    pub id: u32,
    pub info: DevInfo,
    char_file: Option<File>,
    bufs: Vec<u8>,
}

impl TrapDev {
    pub fn new(depth: u16) -> TrapDev {
        Self::with_flags(depth, 0)
    }

    pub fn with_flags(depth: u16, flags: u64) -> TrapDev {
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

    pub fn fd(&self) -> i32 {
        self.char_file.as_ref().unwrap().as_raw_fd()
    }

    pub fn buf(&self, tag: u16) -> u64 {
        self.bufs.as_ptr() as u64 + u64::from(tag) * u64::from(MAX_IO)
    }

    /// The opcode encoding the kernel negotiated (GET_FEATURES).
    pub fn fetch_op(&self) -> u32 {
        match self.ctrl.as_ref().unwrap().encoding() {
            ublk::Encoding::Legacy => sys::UBLK_IO_FETCH_REQ,
            ublk::Encoding::Ioctl => sys::UBLK_U_IO_FETCH_REQ,
        }
    }

    pub fn commit_op(&self) -> u32 {
        match self.ctrl.as_ref().unwrap().encoding() {
            ublk::Encoding::Legacy => sys::UBLK_IO_COMMIT_AND_FETCH_REQ,
            ublk::Encoding::Ioctl => sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ,
        }
    }

    /// A correct io command: 64 bytes, payload at 48.
    pub fn io(&self, op: u32, q_id: u16, tag: u16, addr: u64) -> squeue::Entry {
        entry64(sqe(self.fd(), op, 0, &[(48, &io_payload(q_id, tag, 0, addr))]))
    }

    /// STOP_DEV: completes every parked FETCH with UBLK_IO_RES_ABORT (on 6.1
    /// the only way to get them back; a task cannot exit while it has one).
    pub fn stop(&mut self) {
        if let Some(c) = self.ctrl.as_mut() {
            let _ = c.stop_dev(self.id);
        }
    }

    /// Close `/dev/ublkcN` and DEL_DEV, waiting at most 30 s (DEL_DEV waits
    /// until the char device is released); panics if it did not finish.
    pub fn delete(&mut self) {
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
    pub fn finish(mut self, rings: impl FnOnce()) {
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

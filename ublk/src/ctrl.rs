//! The control device, `/dev/ublk-control`.
//!
//! Control commands are `IORING_OP_URING_CMD`s whose 32-byte
//! `ublksrv_ctrl_cmd` sits at SQE byte 48 and runs past the first 64 bytes, so
//! the kernel insists on a ring created with `IORING_SETUP_SQE128`
//! (`ublk_ctrl_uring_cmd` returns -EINVAL otherwise). The opcode encoding is
//! chosen once per [`Control`], from the kernel's own answer: ioctl-encoded
//! (`UBLK_U_CMD_*`) when `GET_FEATURES` works and reports
//! `UBLK_F_CMD_IOCTL_ENCODE` (6.5+), the legacy numbers otherwise (6.1–6.4).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use ublk_sys as sys;

use crate::error::{hints, Cmd, Error, Result};
use crate::params::Params;

/// Path of the control device.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// How command opcodes are put in `sqe->cmd_op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The bare command numbers (`UBLK_CMD_*`, `UBLK_IO_*`): the only form 6.1–6.3 accept.
    Legacy,
    /// `_IOR`/`_IOWR('u', nr, struct)` (`UBLK_U_*`): 6.4+, and the only form
    /// kernels built with `CONFIG_BLKDEV_UBLK_LEGACY_OPCODES=n` accept.
    Ioctl,
}

/// A control command: its kernel name, legacy number and encoded opcode.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CtrlOp {
    pub name: &'static str,
    pub legacy: u32,
    pub encoded: u32,
}

macro_rules! ctrl_op {
    ($name:ident, $legacy:ident, $enc:ident) => {
        pub(crate) const $name: CtrlOp = CtrlOp { name: stringify!($name), legacy: sys::$legacy, encoded: sys::$enc };
    };
}

#[allow(non_upper_case_globals)]
pub(crate) mod ops {
    use super::*;
    ctrl_op!(GET_QUEUE_AFFINITY, UBLK_CMD_GET_QUEUE_AFFINITY, UBLK_U_CMD_GET_QUEUE_AFFINITY);
    ctrl_op!(GET_DEV_INFO, UBLK_CMD_GET_DEV_INFO, UBLK_U_CMD_GET_DEV_INFO);
    ctrl_op!(ADD_DEV, UBLK_CMD_ADD_DEV, UBLK_U_CMD_ADD_DEV);
    ctrl_op!(DEL_DEV, UBLK_CMD_DEL_DEV, UBLK_U_CMD_DEL_DEV);
    ctrl_op!(START_DEV, UBLK_CMD_START_DEV, UBLK_U_CMD_START_DEV);
    ctrl_op!(STOP_DEV, UBLK_CMD_STOP_DEV, UBLK_U_CMD_STOP_DEV);
    ctrl_op!(SET_PARAMS, UBLK_CMD_SET_PARAMS, UBLK_U_CMD_SET_PARAMS);
    ctrl_op!(GET_PARAMS, UBLK_CMD_GET_PARAMS, UBLK_U_CMD_GET_PARAMS);
    ctrl_op!(START_USER_RECOVERY, UBLK_CMD_START_USER_RECOVERY, UBLK_U_CMD_START_USER_RECOVERY);
    ctrl_op!(END_USER_RECOVERY, UBLK_CMD_END_USER_RECOVERY, UBLK_U_CMD_END_USER_RECOVERY);
}

/// The features the running kernel reports (`UBLK_U_CMD_GET_FEATURES`, 6.5+),
/// a set of `UBLK_F_*` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features(pub u64);

impl Features {
    /// Whether the kernel reported `flag` (`None` flags are never reported).
    pub fn has(&self, flag: Option<u64>) -> bool {
        flag.is_some_and(|f| self.0 & f != 0)
    }

    /// Whether every bit of `flags` is reported.
    pub fn contains(&self, flags: impl Into<crate::DevFlags>) -> bool {
        let f = flags.into().bits();
        self.0 & f == f
    }

    /// The reported flags, typed.
    pub fn flags(&self) -> crate::DevFlags {
        crate::DevFlags::from_bits_retain(self.0)
    }

    /// Every reported flag by name: the kernel's names (`sys::abi`, up to
    /// the newest kernel the crate knows), else this build's header's; a
    /// bit neither knows is `UBLK_F_BIT<n>`.
    pub fn names(&self) -> Vec<String> {
        let mut v = Vec::new();
        for bit in 0..64 {
            let f = 1u64 << bit;
            if self.0 & f == 0 {
                continue;
            }
            match sys::abi::flag_name(f).or_else(|| sys::HEADER_FLAGS.iter().find(|(_, v)| *v == f).map(|(n, _)| *n)) {
                Some(n) => v.push(n.to_string()),
                None => v.push(format!("UBLK_F_BIT{bit}")),
            }
        }
        v
    }
}

/// Device information (`struct ublksrv_ctrl_dev_info`) as the kernel keeps it.
pub type DevInfo = sys::ublksrv_ctrl_dev_info;

/// Ids of the ublk devices that exist, from `/sys/class/ublk-char/ublkcN`,
/// in increasing order (empty when the driver is not loaded).
pub fn device_ids() -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir("/sys/class/ublk-char")
        .map(|d| d.filter_map(|e| e.ok()).filter_map(|e| e.file_name().to_str()?.strip_prefix("ublkc")?.parse().ok()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Device state (`UBLK_S_DEV_*`).
pub fn state_name(state: u16) -> &'static str {
    match u32::from(state) {
        sys::UBLK_S_DEV_DEAD => "DEAD",
        sys::UBLK_S_DEV_LIVE => "LIVE",
        sys::UBLK_S_DEV_QUIESCED => "QUIESCED",
        sys::abi::UBLK_S_DEV_FAIL_IO => "FAIL_IO",
        _ => "UNKNOWN",
    }
}

/// An open `/dev/ublk-control` with its SQE128 ring.
///
/// Commands are synchronous: submit one, wait for its completion. The kernel
/// runs them on io-wq (they return -EAGAIN when issued inline), so a blocking
/// one such as `START_DEV` only blocks the caller; [`Control::start_dev`] uses
/// a ring of its own so other commands (e.g. `STOP_DEV` from another thread)
/// are never stuck behind it.
pub struct Control {
    file: File,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    encoding: Encoding,
    features: Option<Features>,
    /// A command could not be submitted nor its ring replaced: refuse
    /// further commands on this handle.
    poisoned: bool,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("encoding", &self.encoding).field("features", &self.features).finish()
    }
}

impl Control {
    /// Opens the control device and finds out how to talk to this kernel.
    pub fn open() -> Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(CONTROL_PATH).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Error::NoDriver,
            io::ErrorKind::PermissionDenied => Error::NotPermitted { what: format!("opening {CONTROL_PATH}") },
            _ => Error::os(format!("opening {CONTROL_PATH}"), e),
        })?;
        let ring = new_ctrl_ring()?;
        let mut ctrl = Control { file, ring, encoding: Encoding::Legacy, features: None, poisoned: false };
        // GET_FEATURES exists only encoded (6.5+). A kernel that predates it
        // refuses it (-ENODEV/-EOPNOTSUPP/-EINVAL on 6.1-6.4), and those
        // kernels only need, or only accept, the legacy numbers.
        // The command number comes from `sys::abi`, not the build's header:
        // a build against an older header must negotiate like any other.
        {
            let op = abi_op("GET_FEATURES", sys::abi::UBLK_U_CMD_GET_FEATURES);
            let mut feats: u64 = 0;
            let c = buf_cmd(u32::MAX, &mut feats);
            if ctrl.submit_encoded(op, c, true).is_ok() {
                ctrl.features = Some(Features(feats));
                if Features(feats).contains(sys::abi::UBLK_F_CMD_IOCTL_ENCODE) {
                    ctrl.encoding = Encoding::Ioctl;
                }
            }
        }
        Ok(ctrl)
    }

    /// The encoding chosen for this kernel.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// What the kernel reported through `GET_FEATURES`, or `None` on kernels
    /// before 6.5 (or a build whose header predates the command).
    pub fn features(&self) -> Option<Features> {
        self.features
    }

    fn opcode(&self, op: CtrlOp) -> u32 {
        match self.encoding {
            Encoding::Legacy => op.legacy,
            Encoding::Ioctl => op.encoded,
        }
    }

    fn submit_encoded(&mut self, op: CtrlOp, cmd: sys::ublksrv_ctrl_cmd, encoded: bool) -> Result<i32> {
        let opc = if encoded { op.encoded } else { self.opcode(op) };
        let sqe = ctrl_sqe(self.file.as_raw_fd(), opc, &cmd);
        if self.poisoned {
            return Err(Error::os(
                format!("control command {}", op.name),
                io::Error::other("an earlier command left this control ring unusable; open a new Control"),
            ));
        }
        match run_one(&mut self.ring, sqe, None) {
            Err(RunErr::Unsubmitted(errno)) => {
                // The SQE still sits in the ring, pointing at a buffer that
                // is about to go away: it must never be submitted. Replace
                // the ring (dropping the old one discards the SQE unseen).
                match new_ctrl_ring() {
                    Ok(r) => self.ring = r,
                    Err(_) => self.poisoned = true,
                }
                Err(kernel_err(op, cmd.dev_id, RunErr::Errno(errno)))
            }
            r => r.map_err(|e| kernel_err(op, cmd.dev_id, e)),
        }
    }

    fn submit(&mut self, op: CtrlOp, cmd: sys::ublksrv_ctrl_cmd) -> Result<i32> {
        self.submit_encoded(op, cmd, self.encoding == Encoding::Ioctl)
    }

    /// `ADD_DEV`: creates a device (and `/dev/ublkcN`). `info.dev_id` is the
    /// requested id, `u32::MAX` to let the kernel choose. Returns the info the
    /// kernel wrote back: the id, the negotiated flags, and the queue count
    /// clamped to the number of CPUs.
    pub fn add_dev(&mut self, info: &DevInfo) -> Result<DevInfo> {
        let mut out = *info;
        let c = buf_cmd(info.dev_id, &mut out);
        match self.submit(ops::ADD_DEV, c) {
            Err(Error::Kernel { errno: libc::EEXIST, .. }) => Err(Error::DeviceExists { dev_id: info.dev_id }),
            Err(e) => Err(e),
            Ok(_) => Ok(out),
        }
    }

    /// `DEL_DEV`: removes a stopped device. The kernel waits until
    /// `/dev/ublkcN` is closed by everyone, so close it first.
    pub fn del_dev(&mut self, dev_id: u32) -> Result<()> {
        self.submit(ops::DEL_DEV, dev_cmd(dev_id)).map(drop).map_err(no_dev(dev_id))
    }

    /// `STOP_DEV`: removes `/dev/ublkbN` and completes every outstanding io
    /// command with `UBLK_IO_RES_ABORT`, so the queue threads can exit.
    pub fn stop_dev(&mut self, dev_id: u32) -> Result<()> {
        self.submit(ops::STOP_DEV, dev_cmd(dev_id)).map(drop).map_err(no_dev(dev_id))
    }

    /// `SET_PARAMS`, before `START_DEV`.
    pub fn set_params(&mut self, dev_id: u32, params: &Params) -> Result<()> {
        let mut raw = params.to_raw();
        let c = buf_cmd(dev_id, &mut raw);
        self.submit(ops::SET_PARAMS, c).map(drop).map_err(no_dev(dev_id))
    }

    /// `GET_PARAMS`.
    pub fn get_params(&mut self, dev_id: u32) -> Result<sys::ublk_params> {
        let mut raw = sys::ublk_params { len: std::mem::size_of::<sys::ublk_params>() as u32, ..Default::default() };
        let c = buf_cmd(dev_id, &mut raw);
        self.submit(ops::GET_PARAMS, c).map_err(no_dev(dev_id))?;
        Ok(raw)
    }

    /// `GET_DEV_INFO`.
    pub fn get_dev_info(&mut self, dev_id: u32) -> Result<DevInfo> {
        let mut out = DevInfo::default();
        let c = buf_cmd(dev_id, &mut out);
        self.submit(ops::GET_DEV_INFO, c).map_err(no_dev(dev_id))?;
        Ok(out)
    }

    /// `GET_DEV_INFO2` (6.3+): like GET_DEV_INFO, with the char device path
    /// ahead of the payload (which unprivileged devices are checked against).
    pub fn get_dev_info2(&mut self, dev_id: u32) -> Result<DevInfo> {
        let op = CtrlOp { name: "GET_DEV_INFO2", legacy: sys::abi::UBLK_CMD_GET_DEV_INFO2, encoded: sys::abi::UBLK_U_CMD_GET_DEV_INFO2 };
        let path = format!("/dev/ublkc{dev_id}");
        let plen = path.len();
        let mut buf = vec![0u8; plen + std::mem::size_of::<DevInfo>()];
        buf[..plen].copy_from_slice(path.as_bytes());
        let mut c = buf_cmd(dev_id, buf.as_mut_slice());
        if !c.set_dev_path_len(plen as u16) {
            return Err(Error::Unsupported { feature: "GET_DEV_INFO2", why: "this build's ublk_cmd.h has no dev_path_len".into() });
        }
        self.submit(op, c).map_err(no_dev(dev_id))?;
        // SAFETY: DevInfo is plain old data; the kernel wrote it after the path.
        Ok(unsafe { std::ptr::read_unaligned(buf[plen..].as_ptr() as *const DevInfo) })
    }

    /// `UBLK_U_CMD_UPDATE_SIZE` (6.16+, devices with `UBLK_F_UPDATE_SIZE`):
    /// resizes a live device to `sectors` 512-byte sectors.
    pub fn update_size(&mut self, dev_id: u32, sectors: u64) -> Result<()> {
        let op = abi_op("UPDATE_SIZE", sys::abi::UBLK_U_CMD_UPDATE_SIZE);
        let mut c = dev_cmd(dev_id);
        c.data[0] = sectors;
        self.submit_encoded(op, c, true).map(drop).map_err(no_dev(dev_id))
    }

    /// `UBLK_U_CMD_QUIESCE_DEV` (6.16+, devices with `UBLK_F_QUIESCE`):
    /// quiesces a live device so its server can be replaced; `data[0]` is the
    /// timeout in milliseconds.
    pub fn quiesce_dev(&mut self, dev_id: u32, timeout_ms: u64) -> Result<()> {
        let op = abi_op("QUIESCE_DEV", sys::abi::UBLK_U_CMD_QUIESCE_DEV);
        let mut c = dev_cmd(dev_id);
        c.data[0] = timeout_ms;
        self.submit_encoded(op, c, true).map(drop).map_err(no_dev(dev_id))
    }

    /// `UBLK_U_CMD_TRY_STOP_DEV` (7.0+, devices with `UBLK_F_SAFE_STOP_DEV`):
    /// stops the device only if nobody has the disk open (-EBUSY otherwise).
    pub fn try_stop_dev(&mut self, dev_id: u32) -> Result<()> {
        let op = abi_op("TRY_STOP_DEV", sys::abi::UBLK_U_CMD_TRY_STOP_DEV);
        self.submit_encoded(op, dev_cmd(dev_id), true).map(drop).map_err(no_dev(dev_id))
    }

    /// `GET_QUEUE_AFFINITY`: the CPUs whose requests this queue serves.
    pub fn get_queue_affinity(&mut self, dev_id: u32, q_id: u16) -> Result<Vec<usize>> {
        let mut set = [0u64; 16]; // 1024 CPUs
                                  // The kernel reads the queue from data[0], not from queue_id.
        let mut c = buf_cmd(dev_id, &mut set);
        c.data[0] = u64::from(q_id);
        self.submit(ops::GET_QUEUE_AFFINITY, c).map_err(no_dev(dev_id))?;
        Ok((0..1024).filter(|i| set[i / 64] & (1u64 << (i % 64)) != 0).collect())
    }

    /// `START_DEV`: blocks until every tag of every queue has a FETCH_REQ
    /// outstanding, then adds the disk `/dev/ublkbN`. `data[0]` carries the
    /// server's pid (6.17+ checks it is the one that opened `/dev/ublkcN`).
    ///
    /// `keep_waiting` is polled every 50 ms; when it returns false the command
    /// is cancelled (its ring closed, which interrupts the kernel's wait) and
    /// [`Error::TimedOut`] is returned, so a queue that never fetched cannot
    /// hang the caller.
    pub fn start_dev(&self, dev_id: u32, mut keep_waiting: impl FnMut() -> bool) -> Result<()> {
        let mut c = dev_cmd(dev_id);
        c.data[0] = std::process::id() as u64;
        self.blocking_cmd(ops::START_DEV, c, &mut keep_waiting)
    }

    /// `STOP_DEV` on a ring of its own, calling `tick` every 50 ms while the
    /// kernel waits for the requests in flight (for a caller that must act
    /// if they take too long).
    pub(crate) fn stop_dev_watching(&self, dev_id: u32, mut tick: impl FnMut()) -> Result<()> {
        let mut keep_waiting = || {
            tick();
            true
        };
        self.blocking_cmd(ops::STOP_DEV, dev_cmd(dev_id), &mut keep_waiting).map_err(no_dev(dev_id))
    }

    /// `START_USER_RECOVERY` (needs `UBLK_F_USER_RECOVERY` and a quiesced device).
    pub fn start_user_recovery(&mut self, dev_id: u32) -> Result<()> {
        self.submit(ops::START_USER_RECOVERY, dev_cmd(dev_id)).map(drop).map_err(no_dev(dev_id))
    }

    /// `END_USER_RECOVERY`: like START_DEV, waits for every tag to be fetched.
    pub fn end_user_recovery(&self, dev_id: u32, mut keep_waiting: impl FnMut() -> bool) -> Result<()> {
        let mut c = dev_cmd(dev_id);
        c.data[0] = std::process::id() as u64;
        self.blocking_cmd(ops::END_USER_RECOVERY, c, &mut keep_waiting)
    }

    fn blocking_cmd(&self, op: CtrlOp, c: sys::ublksrv_ctrl_cmd, keep_waiting: &mut dyn FnMut() -> bool) -> Result<()> {
        let mut ring = new_ctrl_ring()?;
        let sqe = ctrl_sqe(self.file.as_raw_fd(), self.opcode(op), &c);
        match run_one(&mut ring, sqe, Some(keep_waiting)) {
            Ok(_) => Ok(()),
            Err(RunErr::Stopped) => {
                Err(Error::TimedOut { cmd: Cmd::Ctrl(op.name), why: "not every tag of every queue was fetched; the command was cancelled" })
            }
            Err(e) => Err(kernel_err(op, c.dev_id, e)).map_err(no_dev(c.dev_id)),
        }
    }

    /// Sends a raw control command with this kernel's encoding. **Not part
    /// of the API:** for the crate's own tests of the kernel's refusals; it
    /// bypasses every check the typed commands make. Returns the CQE result.
    #[doc(hidden)]
    pub fn raw_command(&mut self, name: &'static str, legacy: u32, encoded: u32, cmd: sys::ublksrv_ctrl_cmd) -> Result<i32> {
        self.submit(CtrlOp { name, legacy, encoded }, cmd)
    }

    /// `UBLK_U_CMD_DEL_DEV_ASYNC` (6.9+): delete without waiting for the
    /// char device to be released.
    pub fn del_dev_async(&mut self, dev_id: u32) -> Result<()> {
        let op = abi_op("DEL_DEV_ASYNC", sys::abi::UBLK_U_CMD_DEL_DEV_ASYNC);
        self.submit_encoded(op, dev_cmd(dev_id), true).map(drop).map_err(no_dev(dev_id))
    }
}

/// A command that exists only encoded, from `sys::abi` (never from the
/// build's header, which may predate it).
fn abi_op(name: &'static str, encoded: u32) -> CtrlOp {
    CtrlOp { name, legacy: encoded & 0xff, encoded }
}

fn dev_cmd(dev_id: u32) -> sys::ublksrv_ctrl_cmd {
    sys::ublksrv_ctrl_cmd { dev_id, queue_id: u16::MAX, ..Default::default() }
}

/// A command for `dev_id` whose payload is `buf` (`addr`/`len`); `buf` must
/// stay borrowed until the command completes.
fn buf_cmd<T: ?Sized>(dev_id: u32, buf: &mut T) -> sys::ublksrv_ctrl_cmd {
    sys::ublksrv_ctrl_cmd { addr: buf as *mut T as *mut u8 as u64, len: std::mem::size_of_val(buf) as u16, ..dev_cmd(dev_id) }
}

fn no_dev(dev_id: u32) -> impl Fn(Error) -> Error {
    move |e| match e {
        Error::Kernel { errno: libc::ENODEV, .. } => Error::NoDevice { dev_id },
        e => e,
    }
}

pub(crate) fn new_ctrl_ring() -> Result<IoUring<squeue::Entry128, cqueue::Entry>> {
    IoUring::<squeue::Entry128, cqueue::Entry>::builder()
        .build(4)
        .map_err(|e| Error::os("creating the control io_uring (IORING_SETUP_SQE128, Linux 5.19+)", e))
}

/// The control SQE: `IORING_OP_URING_CMD`, `cmd_op` at byte 8, the 32-byte
/// `ublksrv_ctrl_cmd` at byte 48 of a 128-byte SQE.
pub(crate) fn ctrl_sqe(fd: i32, cmd_op: u32, c: &sys::ublksrv_ctrl_cmd) -> squeue::Entry128 {
    const _: () = assert!(std::mem::size_of::<sys::ublksrv_ctrl_cmd>() == 32);
    let mut bytes = [0u8; 80];
    // SAFETY: ublksrv_ctrl_cmd is a 32-byte plain-old-data struct without
    // padding (checked against the C compiler by ublk-sys's tests); viewing
    // it as bytes is sound.
    let src = unsafe { std::slice::from_raw_parts(c as *const _ as *const u8, 32) };
    bytes[..32].copy_from_slice(src);
    opcode::UringCmd80::new(types::Fd(fd), cmd_op).cmd(bytes).build()
}

pub(crate) enum RunErr {
    Errno(i32),
    Stopped,
    /// `io_uring_enter` failed before the kernel took the SQE (errno): it
    /// is still in the submission queue; the ring must be discarded.
    Unsubmitted(i32),
}

/// Submits one SQE and waits for its CQE; with `keep_waiting`, polls it every
/// 50 ms and gives up (the caller drops the ring, cancelling the command)
/// when it says so.
///
/// The command's buffer (`addr`) is borrowed by the caller only for this
/// call, so the call never returns while the kernel may still write it:
/// once the kernel has taken the SQE, only its CQE (or, for the buffer-less
/// commands run with `keep_waiting`, the caller dropping the ring) ends the
/// wait; if the kernel never took it, [`RunErr::Unsubmitted`] tells the
/// caller to discard the ring with the SQE in it.
pub(crate) fn run_one(
    ring: &mut IoUring<squeue::Entry128, cqueue::Entry>,
    sqe: squeue::Entry128,
    mut keep_waiting: Option<&mut dyn FnMut() -> bool>,
) -> Result<i32, RunErr> {
    // SAFETY: the buffer a command points at (`addr`) is borrowed by the
    // caller for the whole call, and the call returns only after the CQE,
    // or with the SQE still unsubmitted (the caller then discards the ring),
    // or, when `keep_waiting` gives up, after which the caller drops the
    // ring (cancelling the command); only START_DEV and END_USER_RECOVERY
    // are run that way, and they carry no buffer.
    unsafe {
        ring.submission().push(&sqe.user_data(1)).map_err(|_| RunErr::Errno(libc::EBUSY))?;
    }
    loop {
        let r = match keep_waiting.as_deref_mut() {
            None => ring.submit_and_wait(1),
            Some(_) => {
                let ts = types::Timespec::from(Duration::from_millis(50));
                let args = types::SubmitArgs::new().timespec(&ts);
                ring.submitter().submit_with_args(1, &args)
            }
        };
        match r.map_err(|e| e.raw_os_error().unwrap_or(libc::EIO)) {
            Ok(_) | Err(libc::ETIME) | Err(libc::EINTR) => {}
            // Transient: the kernel is short of memory or its CQ is full.
            Err(libc::EAGAIN) | Err(libc::EBUSY) => std::thread::sleep(Duration::from_millis(1)),
            Err(errno) if !ring.submission().is_empty() => return Err(RunErr::Unsubmitted(errno)),
            // The kernel has the command: wait for its CQE whatever enter says.
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
        if let Some(cqe) = ring.completion().next() {
            let res = cqe.result();
            return if res < 0 { Err(RunErr::Errno(-res)) } else { Ok(res) };
        }
        if let Some(k) = keep_waiting.as_deref_mut() {
            if !k() {
                return Err(RunErr::Stopped);
            }
        }
    }
}

fn kernel_err(op: CtrlOp, dev_id: u32, e: RunErr) -> Error {
    match e {
        RunErr::Stopped => Error::TimedOut { cmd: Cmd::Ctrl(op.name), why: "cancelled" },
        RunErr::Unsubmitted(errno) => {
            Error::Os { what: format!("submitting control command {}", op.name), source: io::Error::from_raw_os_error(errno) }
        }
        RunErr::Errno(libc::EPERM) => Error::NotPermitted { what: format!("control command {}", op.name) },
        RunErr::Errno(errno) => Error::Kernel {
            cmd: Cmd::Ctrl(op.name),
            dev_id: (dev_id != u32::MAX).then_some(dev_id),
            q_id: None,
            tag: None,
            errno,
            hints: hints(Cmd::Ctrl(op.name), errno),
        },
    }
}

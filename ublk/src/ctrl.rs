//! The control device, `/dev/ublk-control`.
//!
//! Control commands are `IORING_OP_URING_CMD`s whose 32-byte
//! `ublksrv_ctrl_cmd` sits at SQE byte 48 and runs past the first 64 bytes, so
//! the kernel insists on a ring created with `IORING_SETUP_SQE128`
//! (`ublk_ctrl_uring_cmd` returns -EINVAL otherwise). The opcode encoding is
//! chosen once per [`Control`], from the kernel's own answer: ioctl-encoded
//! (`UBLK_U_CMD_*`) when `GET_FEATURES` works and reports
//! `UBLK_F_CMD_IOCTL_ENCODE` (6.5+), the legacy numbers otherwise (6.1–6.4).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use ublk_sys as sys;

use crate::error::{hints, Cmd, Error, Owner, OwnerSource, Result};
use crate::params::Params;

/// Path of the control device.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// Bytes of the char device path (`/dev/ublkcN`, NUL-padded) that every
/// control command for an unprivileged device carries at the start of its
/// buffer (`dev_path_len`), with the payload right after it: the kernel
/// reads `dev_path_len` bytes from `addr` as the path, then moves `addr`
/// and `len` past them (`ublk_ctrl_uring_cmd_permission`). A fixed,
/// 8-byte-aligned length (as libublksrv's `UBLKC_PATH_MAX`) keeps the
/// payload aligned; `kern_path` stops at the first NUL.
pub const DEV_PATH_LEN: usize = 32;

/// A command buffer for an unprivileged device: the path, then the payload.
#[repr(C)]
struct WithPath<T> {
    path: [u8; DEV_PATH_LEN],
    payload: T,
}

/// `/dev/ublkcN` as the NUL-padded bytes of [`DEV_PATH_LEN`].
fn dev_path_bytes(dev_id: u32) -> [u8; DEV_PATH_LEN] {
    let p = format!("/dev/ublkc{dev_id}");
    let mut b = [0u8; DEV_PATH_LEN];
    // "/dev/ublkc" + at most 10 digits: always shorter than DEV_PATH_LEN.
    b[..p.len()].copy_from_slice(p.as_bytes());
    b
}

/// The running kernel's (major, minor), from `/proc/sys/kernel/osrelease`.
pub fn kernel_version() -> Option<(u32, u32)> {
    let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut it = r.trim().split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse::<u32>().ok());
    Some((it.next()??, it.next()??))
}

/// `uname -r`, for messages.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

/// This process's effective uid and gid.
pub(crate) fn caller_ids() -> (u32, u32) {
    // SAFETY: geteuid/getegid cannot fail and touch no memory.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

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
    /// Whether the kernel has unprivileged devices (6.3+): from
    /// GET_FEATURES where it exists (6.5+), else from the release.
    kernel_unprivileged: bool,
    /// Per device id: whether it is an unprivileged device, whose commands
    /// carry the char device path (learned from ADD_DEV or GET_DEV_INFO2).
    unprivileged: HashMap<u32, bool>,
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
            io::ErrorKind::PermissionDenied => control_access_error(),
            _ => Error::os(format!("opening {CONTROL_PATH}"), e),
        })?;
        let ring = new_ctrl_ring()?;
        let mut ctrl = Control {
            file,
            ring,
            encoding: Encoding::Legacy,
            features: None,
            kernel_unprivileged: false,
            unprivileged: HashMap::new(),
            poisoned: false,
        };
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
        ctrl.kernel_unprivileged = match ctrl.features {
            Some(f) => f.contains(sys::abi::UBLK_F_UNPRIVILEGED_DEV),
            // 6.3 and 6.4 have unprivileged devices but no GET_FEATURES.
            None => kernel_version().is_some_and(|v| v >= (6, 3)),
        };
        Ok(ctrl)
    }

    /// Whether the running kernel offers unprivileged devices
    /// (`UBLK_F_UNPRIVILEGED_DEV`, Linux 6.3+).
    pub fn kernel_has_unprivileged(&self) -> bool {
        self.kernel_unprivileged
    }

    /// Whether device `dev_id` is an unprivileged device
    /// (`UBLK_F_UNPRIVILEGED_DEV`), whose control commands carry the path of
    /// its char device. Asked once per device with GET_DEV_INFO2 (which
    /// always carries the path), then remembered; always false on kernels
    /// before 6.3. A caller who may not read the device gets
    /// [`Error::NotOwner`].
    pub fn is_unprivileged(&mut self, dev_id: u32) -> Result<bool> {
        if !self.kernel_unprivileged {
            return Ok(false);
        }
        if let Some(u) = self.unprivileged.get(&dev_id) {
            return Ok(*u);
        }
        let info = match self.dev_info2_raw(dev_id) {
            Ok(info) => info,
            // Only an unprivileged device checks the node's mode (EACCES):
            // someone else's. Send its commands with the path, and let the
            // kernel refuse each of them.
            Err(Error::NotOwner { errno: libc::EACCES, .. }) => {
                self.unprivileged.insert(dev_id, true);
                return Ok(true);
            }
            // A privileged device and a caller without CAP_SYS_ADMIN: its
            // commands go without the path (and the kernel refuses them).
            Err(Error::NotOwner { errno: libc::EPERM, .. }) => {
                self.unprivileged.insert(dev_id, false);
                return Ok(false);
            }
            // A root caller in a mount namespace without the node: only a
            // privileged device can be read without it (an unprivileged one
            // refuses every command then).
            Err(Error::Kernel { errno: libc::ENOENT, .. }) if caller_ids().0 == 0 => self.get_dev_info_plain(dev_id)?,
            Err(e) => return Err(e),
        };
        let u = info.flags & sys::abi::UBLK_F_UNPRIVILEGED_DEV != 0;
        self.unprivileged.insert(dev_id, u);
        Ok(u)
    }

    /// Records whether a device is unprivileged, from its info (ADD_DEV's
    /// answer or GET_DEV_INFO2), for the commands this handle sends it.
    pub(crate) fn remember(&mut self, info: &DevInfo) {
        self.unprivileged.insert(info.dev_id, info.flags & sys::abi::UBLK_F_UNPRIVILEGED_DEV != 0);
    }

    /// Sends a command for device `dev_id` with `payload` as its buffer
    /// (read and/or written by the kernel), and `data0`: for an
    /// unprivileged device the buffer is the char device path followed by
    /// the payload ([`DEV_PATH_LEN`]), else the payload alone. A refusal
    /// for lack of permission (EPERM, EACCES) becomes [`Error::NotOwner`].
    fn device_cmd<T: Copy>(&mut self, op: CtrlOp, dev_id: u32, payload: Option<&mut T>, data0: u64, encoded: bool) -> Result<i32> {
        let unpriv = self.is_unprivileged(dev_id)?;
        let r = self.device_cmd_as(op, dev_id, payload, data0, encoded, unpriv);
        self.permission_error(op, dev_id, unpriv, r)
    }

    fn device_cmd_as<T: Copy>(
        &mut self,
        op: CtrlOp,
        dev_id: u32,
        payload: Option<&mut T>,
        data0: u64,
        encoded: bool,
        with_path: bool,
    ) -> Result<i32> {
        let encoded = encoded || self.encoding == Encoding::Ioctl;
        if !with_path {
            let mut c = match payload {
                Some(p) => buf_cmd(dev_id, p),
                None => dev_cmd(dev_id),
            };
            c.data[0] = data0;
            return self.submit_encoded(op, c, encoded);
        }
        match payload {
            Some(p) => {
                let mut buf = WithPath { path: dev_path_bytes(dev_id), payload: *p };
                let mut c = buf_cmd(dev_id, &mut buf);
                c.data[0] = data0;
                c.set_dev_path_len(DEV_PATH_LEN as u16);
                let r = self.submit_encoded(op, c, encoded);
                *p = buf.payload;
                r
            }
            None => {
                let mut path = dev_path_bytes(dev_id);
                let mut c = buf_cmd(dev_id, &mut path);
                c.data[0] = data0;
                c.set_dev_path_len(DEV_PATH_LEN as u16);
                self.submit_encoded(op, c, encoded)
            }
        }
    }

    /// Turns EPERM/EACCES from a device command into [`Error::NotOwner`],
    /// with the device's owner as far as this caller can learn it.
    fn permission_error(&mut self, op: CtrlOp, dev_id: u32, unpriv: bool, r: Result<i32>) -> Result<i32> {
        let errno = match &r {
            Err(Error::NotPermitted { .. }) => libc::EPERM,
            Err(Error::Kernel { errno: e @ (libc::EPERM | libc::EACCES), .. }) => *e,
            _ => return r,
        };
        let owner = if unpriv {
            // The owner can be read only by someone the kernel lets read the
            // device; else the node's owner (set from it by the udev rule).
            match self.dev_info2_raw(dev_id) {
                Ok(i) => i.owner().map(|(uid, gid)| Owner { uid, gid, source: OwnerSource::DeviceInfo }),
                Err(_) => node_owner(dev_id),
            }
        } else {
            None
        };
        Err(Error::NotOwner { cmd: op.name, dev_id, errno, owner, unprivileged: Some(unpriv), caller: caller_ids() })
    }

    /// GET_DEV_INFO2 with the path, whatever the device; EPERM/EACCES are
    /// reported as [`Error::NotOwner`] (the device is privileged, or not
    /// this caller's).
    fn dev_info2_raw(&mut self, dev_id: u32) -> Result<DevInfo> {
        let op = CtrlOp { name: "GET_DEV_INFO2", legacy: sys::abi::UBLK_CMD_GET_DEV_INFO2, encoded: sys::abi::UBLK_U_CMD_GET_DEV_INFO2 };
        let mut out = DevInfo::default();
        match self.device_cmd_as(op, dev_id, Some(&mut out), 0, false, true).map_err(no_dev(dev_id)) {
            Ok(_) => Ok(out),
            Err(Error::NotPermitted { .. }) => Err(self.refused_info2(dev_id, libc::EPERM)),
            Err(Error::Kernel { errno: libc::EACCES, .. }) => Err(self.refused_info2(dev_id, libc::EACCES)),
            Err(e) => Err(e),
        }
    }

    /// Why GET_DEV_INFO2 was refused: EACCES is the node's mode (someone
    /// else's unprivileged device); EPERM is a privileged device and a
    /// caller without CAP_SYS_ADMIN, or a path naming another device.
    fn refused_info2(&self, dev_id: u32, errno: i32) -> Error {
        let unprivileged = if errno == libc::EACCES { Some(true) } else { None };
        Error::NotOwner { cmd: "GET_DEV_INFO2", dev_id, errno, owner: node_owner(dev_id), unprivileged, caller: caller_ids() }
    }

    /// GET_DEV_INFO without the path (privileged devices).
    fn get_dev_info_plain(&mut self, dev_id: u32) -> Result<DevInfo> {
        let mut out = DevInfo::default();
        self.device_cmd_as(ops::GET_DEV_INFO, dev_id, Some(&mut out), 0, false, false).map_err(no_dev(dev_id))?;
        Ok(out)
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
    /// clamped to the number of CPUs. ADD_DEV never carries a device path
    /// (the kernel checks no node for it): a caller without CAP_SYS_ADMIN
    /// may add only an unprivileged device (`UBLK_F_UNPRIVILEGED_DEV`).
    pub fn add_dev(&mut self, info: &DevInfo) -> Result<DevInfo> {
        let mut out = *info;
        let c = buf_cmd(info.dev_id, &mut out);
        let unpriv = info.flags & sys::abi::UBLK_F_UNPRIVILEGED_DEV != 0;
        match self.submit(ops::ADD_DEV, c) {
            Err(Error::Kernel { errno: libc::EEXIST, .. }) => Err(Error::DeviceExists { dev_id: info.dev_id }),
            Err(Error::NotPermitted { .. }) if !unpriv => Err(Error::NotPermitted {
                what: format!(
                    "ADD_DEV of a privileged device as uid {}: the kernel lets only CAP_SYS_ADMIN create those; an ordinary user creates an unprivileged device instead (DeviceBuilder::unprivileged, `ublk add --unprivileged`, Linux 6.3+)",
                    caller_ids().0
                ),
            }),
            Err(Error::Kernel { errno: libc::EACCES, .. }) if unpriv => Err(Error::Unsupported {
                feature: "UBLK_F_UNPRIVILEGED_DEV",
                why: format!(
                    "the kernel's limit of unprivileged ublk devices is reached (ADD_DEV: -EACCES; module parameter ublk_drv.ublks_max, now {}, counts every user's); delete one, or ask root to raise /sys/module/ublk_drv/parameters/ublks_max",
                    std::fs::read_to_string("/sys/module/ublk_drv/parameters/ublks_max").map(|s| s.trim().to_string()).unwrap_or_else(|_| "?".into())
                ),
            }),
            Err(e) => Err(e),
            Ok(_) => {
                self.remember(&out);
                Ok(out)
            }
        }
    }

    /// `DEL_DEV`: removes a stopped device. The kernel waits until
    /// `/dev/ublkcN` is closed by everyone, so close it first.
    pub fn del_dev(&mut self, dev_id: u32) -> Result<()> {
        let r = self.device_cmd::<()>(ops::DEL_DEV, dev_id, None, 0, false).map(drop).map_err(no_dev(dev_id));
        if r.is_ok() || matches!(r, Err(Error::NoDevice { .. })) {
            self.unprivileged.remove(&dev_id);
        }
        r
    }

    /// `STOP_DEV`: removes `/dev/ublkbN` and completes every outstanding io
    /// command with `UBLK_IO_RES_ABORT`, so the queue threads can exit.
    pub fn stop_dev(&mut self, dev_id: u32) -> Result<()> {
        self.device_cmd::<()>(ops::STOP_DEV, dev_id, None, 0, false).map(drop).map_err(no_dev(dev_id))
    }

    /// `SET_PARAMS`, before `START_DEV`.
    pub fn set_params(&mut self, dev_id: u32, params: &Params) -> Result<()> {
        let mut raw = params.to_raw();
        self.device_cmd(ops::SET_PARAMS, dev_id, Some(&mut raw), 0, false).map(drop).map_err(no_dev(dev_id))
    }

    /// `GET_PARAMS`.
    pub fn get_params(&mut self, dev_id: u32) -> Result<sys::ublk_params> {
        let mut raw = sys::ublk_params { len: std::mem::size_of::<sys::ublk_params>() as u32, ..Default::default() };
        self.device_cmd(ops::GET_PARAMS, dev_id, Some(&mut raw), 0, false).map_err(no_dev(dev_id))?;
        Ok(raw)
    }

    /// The device's info: `GET_DEV_INFO2` on kernels that have it (6.3+;
    /// the only form an unprivileged device answers, and the one whose
    /// permission check a caller who may not read the device fails with
    /// [`Error::NotOwner`]), else `GET_DEV_INFO`.
    pub fn get_dev_info(&mut self, dev_id: u32) -> Result<DevInfo> {
        if self.is_unprivileged(dev_id)? {
            return self.get_dev_info2(dev_id);
        }
        let mut out = DevInfo::default();
        self.device_cmd(ops::GET_DEV_INFO, dev_id, Some(&mut out), 0, false).map_err(no_dev(dev_id))?;
        Ok(out)
    }

    /// `GET_DEV_INFO2` (6.3+): like GET_DEV_INFO, with the char device path
    /// ahead of the payload, whatever the device (the kernel checks the
    /// caller's read access to that node for unprivileged devices, and
    /// CAP_SYS_ADMIN for the others).
    pub fn get_dev_info2(&mut self, dev_id: u32) -> Result<DevInfo> {
        let info = self.dev_info2_raw(dev_id)?;
        if self.kernel_unprivileged {
            self.unprivileged.insert(dev_id, info.flags & sys::abi::UBLK_F_UNPRIVILEGED_DEV != 0);
        }
        Ok(info)
    }

    /// `UBLK_U_CMD_UPDATE_SIZE` (6.16+, devices with `UBLK_F_UPDATE_SIZE`):
    /// resizes a live device to `sectors` 512-byte sectors.
    pub fn update_size(&mut self, dev_id: u32, sectors: u64) -> Result<()> {
        let op = abi_op("UPDATE_SIZE", sys::abi::UBLK_U_CMD_UPDATE_SIZE);
        self.device_cmd::<()>(op, dev_id, None, sectors, true).map(drop).map_err(no_dev(dev_id))
    }

    /// `UBLK_U_CMD_QUIESCE_DEV` (6.16+, devices with `UBLK_F_QUIESCE`):
    /// quiesces a live device so its server can be replaced; `data[0]` is the
    /// timeout in milliseconds.
    pub fn quiesce_dev(&mut self, dev_id: u32, timeout_ms: u64) -> Result<()> {
        let op = abi_op("QUIESCE_DEV", sys::abi::UBLK_U_CMD_QUIESCE_DEV);
        self.device_cmd::<()>(op, dev_id, None, timeout_ms, true).map(drop).map_err(no_dev(dev_id))
    }

    /// `UBLK_U_CMD_TRY_STOP_DEV` (7.0+, devices with `UBLK_F_SAFE_STOP_DEV`):
    /// stops the device only if nobody has the disk open (-EBUSY otherwise).
    pub fn try_stop_dev(&mut self, dev_id: u32) -> Result<()> {
        let op = abi_op("TRY_STOP_DEV", sys::abi::UBLK_U_CMD_TRY_STOP_DEV);
        self.device_cmd::<()>(op, dev_id, None, 0, true).map(drop).map_err(no_dev(dev_id))
    }

    /// Whether the running kernel reports `flag` in GET_FEATURES (false on
    /// kernels without the command, before 6.5).
    fn kernel_offers(&self, flag: u64) -> bool {
        self.features.is_some_and(|f| f.contains(flag))
    }

    /// [`Error::Unsupported`] for a kernel without `flag`: names the flag,
    /// the kernel that has it and this one.
    fn kernel_lacks(&self, flag: u64, what: &str) -> Error {
        let name = sys::abi::flag_name(flag).unwrap_or("UBLK_F_?");
        let (a, b) = sys::abi::since(name).unwrap_or((0, 0));
        let gf = if self.features.is_none() { " (and has no GET_FEATURES to say what it offers)" } else { "" };
        Error::Unsupported {
            feature: name,
            why: format!("{what} needs Linux {a}.{b} or later ({name}); this kernel is {}{gf}", kernel_release()),
        }
    }

    /// Resizes started device `dev_id` to `bytes` (`UPDATE_SIZE`, Linux
    /// 6.16+): the disk has the new capacity at once, and the block layer
    /// tells udev. `GET_PARAMS` reports it from then on, so a recovered
    /// device keeps it.
    ///
    /// Checked first, each with an error that says why: the kernel offers
    /// the command (GET_FEATURES reports `UBLK_F_UPDATE_SIZE`); the device is
    /// started (before START_DEV and after STOP_DEV it has no disk, which
    /// kernels without the fix in `ublk_ctrl_set_size` dereference anyway:
    /// the state is read right before, so only a stop racing this call can
    /// get past it); `bytes` is a positive multiple of the logical block
    /// size. The kernel checks neither the size nor the device's own
    /// `UBLK_F_UPDATE_SIZE` flag, and neither does this. Whether the target
    /// can serve the new size (a loop device's file must be that large) is
    /// the caller's to know.
    pub fn resize_dev(&mut self, dev_id: u32, bytes: u64) -> Result<()> {
        if !self.kernel_offers(sys::abi::UBLK_F_UPDATE_SIZE) {
            return Err(self.kernel_lacks(sys::abi::UBLK_F_UPDATE_SIZE, "resizing a device (UPDATE_SIZE)"));
        }
        let info = self.get_dev_info(dev_id)?;
        if u32::from(info.state) == sys::UBLK_S_DEV_DEAD {
            return Err(Error::InvalidConfig {
                what: "resize",
                why: format!("device {dev_id} is not started, or stopped (DEAD): it has no disk to resize; start it (serve) first"),
            });
        }
        let p = self.get_params(dev_id)?;
        let bs = 1u64 << p.basic.logical_bs_shift;
        if bytes == 0 || bytes % bs != 0 {
            return Err(Error::InvalidConfig {
                what: "device size",
                why: format!("{bytes} bytes is not a positive multiple of device {dev_id}'s logical block size {bs}"),
            });
        }
        self.update_size(dev_id, bytes >> 9)
    }

    /// Quiesces device `dev_id` so that another server can take it over
    /// without failing I/O (an upgrade), and waits up to `timeout` for its
    /// server to let go: `QUIESCE_DEV` (Linux 6.16+, a device made with
    /// `UBLK_F_QUIESCE`, which the kernel allows only with
    /// `UBLK_F_USER_RECOVERY`). The kernel holds new I/O (requeued, not
    /// failed; a `USER_RECOVERY_FAIL_IO` device fails it), waits until each
    /// queue has a parked command, and ends the parked commands with
    /// `UBLK_IO_RES_ABORT`; the server finishes what it is handling and
    /// exits; the device is then QUIESCED and [`DeviceBuilder::recover`](crate::DeviceBuilder::recover)
    /// (`ublk recover`) serves it again. Returns once it is QUIESCED (or
    /// already was, or is FAIL_IO: no server).
    ///
    /// QUIESCE_DEV ends only the commands parked when it runs. A request the
    /// server was still handling parks a new FETCH when it is committed,
    /// which the kernel ends only when the server's ring closes, and a
    /// server that ends once all its commands have ended (as
    /// [`Device::serve`](crate::Device::serve)'s queues do) would wait for
    /// it (seen on 7.3: with one QUIESCE_DEV, a loop device over a
    /// null_blk completing in 300 ms kept its daemon waiting, and the fio on
    /// it, until killed). So the command is sent again every 100 ms until
    /// the server has let go. Call this from outside the serving process, or from a thread
    /// that does not hold up its teardown (not from `on_live`, which the
    /// teardown waits for: use [`Control::quiesce_dev`] there).
    ///
    /// Returns how many times QUIESCE_DEV was sent (0 if the device was
    /// already without a server).
    pub fn quiesce(&mut self, dev_id: u32, timeout: Duration) -> Result<u32> {
        let flag = sys::abi::UBLK_F_QUIESCE;
        if !self.kernel_offers(flag) {
            return Err(self.kernel_lacks(flag, "quiescing a device for a server upgrade (QUIESCE_DEV)"));
        }
        let info = self.get_dev_info(dev_id)?;
        if info.flags & flag == 0 {
            let why = if info.flags & sys::abi::UBLK_F_USER_RECOVERY == 0 {
                format!("device {dev_id} was created without user recovery (UBLK_F_USER_RECOVERY, `ublk add --recovery`), which quiescing needs: no server could take it over")
            } else {
                format!("device {dev_id} was created without UBLK_F_QUIESCE (the kernel refuses QUIESCE_DEV for it; `ublk add --recovery` asks for it where the kernel has it): stop its server with kill -9 and `ublk recover` instead, or create it again")
            };
            return Err(Error::InvalidConfig { what: "quiesce", why });
        }
        let t0 = std::time::Instant::now();
        let mut sent = 0u32;
        loop {
            let info = self.get_dev_info(dev_id)?;
            match u32::from(info.state) {
                sys::UBLK_S_DEV_QUIESCED | sys::abi::UBLK_S_DEV_FAIL_IO => return Ok(sent),
                sys::UBLK_S_DEV_DEAD => {
                    return Err(Error::InvalidConfig {
                        what: "quiesce",
                        why: format!("device {dev_id} is stopped (DEAD) or was never started: there is no server to replace"),
                    })
                }
                _ => {}
            }
            let left = timeout.saturating_sub(t0.elapsed());
            if left.is_zero() {
                return Err(Error::TimedOut {
                    cmd: crate::error::Cmd::Ctrl("QUIESCE_DEV"),
                    why: if sent > 0 {
                        "the kernel ended the server's commands, but the server still holds /dev/ublkcN; new I/O waits in the kernel: stop the server (kill -9 ends it) and recover the device"
                    } else {
                        "some queue had a request in flight on every tag; new I/O now waits in the kernel: quiesce again, or stop the server (kill -9) and recover the device"
                    },
                });
            }
            // The kernel's own wait (for a parked command on every queue)
            // is bounded by what is left (by a second at most once the
            // first has gone through); -EBUSY when it runs out.
            let wait = if sent > 0 { left.min(Duration::from_secs(1)) } else { left };
            let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
            match self.quiesce_dev(dev_id, ms) {
                Ok(()) => sent += 1,
                Err(Error::Kernel { errno: libc::EBUSY, .. }) => continue,
                Err(e) => return Err(e),
            }
            std::thread::sleep(Duration::from_millis(100).min(timeout.saturating_sub(t0.elapsed())));
        }
    }

    /// Stops device `dev_id` only if nobody has its disk open
    /// (`TRY_STOP_DEV`, Linux 7.0+, where every device gets
    /// `UBLK_F_SAFE_STOP_DEV`): atomically with the check, so no open can
    /// slip in between, and opens after it are refused. A disk that is open
    /// (mounted, or held by any process) gives [`Error::Kernel`] with
    /// `EBUSY`, and the device is left as it was. A device without a disk
    /// (not started, or stopped) has nothing to stop: [`Error::InvalidConfig`].
    pub fn safe_stop_dev(&mut self, dev_id: u32) -> Result<()> {
        let flag = sys::abi::UBLK_F_SAFE_STOP_DEV;
        if !self.kernel_offers(flag) {
            return Err(self.kernel_lacks(flag, "a stop refused while the disk is open (TRY_STOP_DEV)"));
        }
        let info = self.get_dev_info(dev_id)?;
        if u32::from(info.state) == sys::UBLK_S_DEV_DEAD {
            return Err(Error::InvalidConfig {
                what: "safe stop",
                why: format!("device {dev_id} is not started, or already stopped (DEAD): it has no disk anyone could have open"),
            });
        }
        match self.try_stop_dev(dev_id) {
            // No disk: it was stopped meanwhile (the device still exists).
            Err(Error::NoDevice { .. }) if device_ids().contains(&dev_id) => Ok(()),
            r => r,
        }
    }

    /// `GET_QUEUE_AFFINITY`: the CPUs whose requests this queue serves.
    pub fn get_queue_affinity(&mut self, dev_id: u32, q_id: u16) -> Result<Vec<usize>> {
        let mut set = [0u64; 16]; // 1024 CPUs
                                  // The kernel reads the queue from data[0], not from queue_id.
        self.device_cmd(ops::GET_QUEUE_AFFINITY, dev_id, Some(&mut set), u64::from(q_id), false).map_err(no_dev(dev_id))?;
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
        self.blocking_cmd(ops::START_DEV, dev_id, std::process::id() as u64, &mut keep_waiting)
    }

    /// `STOP_DEV` on a ring of its own, calling `tick` every 50 ms while the
    /// kernel waits for the requests in flight (for a caller that must act
    /// if they take too long).
    pub(crate) fn stop_dev_watching(&self, dev_id: u32, mut tick: impl FnMut()) -> Result<()> {
        let mut keep_waiting = || {
            tick();
            true
        };
        self.blocking_cmd(ops::STOP_DEV, dev_id, 0, &mut keep_waiting).map_err(no_dev(dev_id))
    }

    /// `START_USER_RECOVERY` (needs `UBLK_F_USER_RECOVERY` and a quiesced device).
    pub fn start_user_recovery(&mut self, dev_id: u32) -> Result<()> {
        self.device_cmd::<()>(ops::START_USER_RECOVERY, dev_id, None, 0, false).map(drop).map_err(no_dev(dev_id))
    }

    /// `END_USER_RECOVERY`: like START_DEV, waits for every tag to be fetched.
    pub fn end_user_recovery(&self, dev_id: u32, mut keep_waiting: impl FnMut() -> bool) -> Result<()> {
        self.blocking_cmd(ops::END_USER_RECOVERY, dev_id, std::process::id() as u64, &mut keep_waiting)
    }

    /// A command that may wait long (START_DEV, END_USER_RECOVERY,
    /// STOP_DEV), on a ring of its own so other commands are not stuck
    /// behind it. Whether the device takes the path must already be known
    /// (it is for a [`crate::Device`]'s own handle: ADD_DEV or recovery
    /// asked); an unknown device is sent none.
    fn blocking_cmd(&self, op: CtrlOp, dev_id: u32, data0: u64, keep_waiting: &mut dyn FnMut() -> bool) -> Result<()> {
        let unpriv = self.unprivileged.get(&dev_id).copied().unwrap_or(false);
        let mut ring = new_ctrl_ring()?;
        // The kernel only reads the path (when it checks permission, before
        // it waits), and this buffer lives until the command completes or the
        // ring is dropped below.
        let mut path = dev_path_bytes(dev_id);
        let mut c = if unpriv { buf_cmd(dev_id, &mut path) } else { dev_cmd(dev_id) };
        if unpriv {
            c.set_dev_path_len(DEV_PATH_LEN as u16);
        }
        c.data[0] = data0;
        let sqe = ctrl_sqe(self.file.as_raw_fd(), self.opcode(op), &c);
        let r = match run_one(&mut ring, sqe, Some(keep_waiting)) {
            Ok(_) => Ok(()),
            Err(RunErr::Stopped) => {
                Err(Error::TimedOut { cmd: Cmd::Ctrl(op.name), why: "not every tag of every queue was fetched; the command was cancelled" })
            }
            Err(e) => Err(kernel_err(op, dev_id, e)).map_err(no_dev(dev_id)),
        };
        drop(ring);
        let errno = match &r {
            Err(Error::NotPermitted { .. }) => libc::EPERM,
            Err(Error::Kernel { errno: e @ (libc::EPERM | libc::EACCES), .. }) => *e,
            _ => return r,
        };
        let owner = if unpriv { node_owner(dev_id) } else { None };
        Err(Error::NotOwner { cmd: op.name, dev_id, errno, owner, unprivileged: Some(unpriv), caller: caller_ids() })
    }

    /// For tests of the kernel's permission checks: sends the buffer-less
    /// device command `name` (e.g. STOP_DEV) for `dev_id` with `path` as
    /// its char device path, whatever device that path names. Returns the
    /// CQE result.
    #[doc(hidden)]
    pub fn raw_command_with_path(&mut self, name: &'static str, legacy: u32, encoded: u32, dev_id: u32, path: &str) -> Result<i32> {
        let mut b = [0u8; DEV_PATH_LEN];
        let n = path.len().min(DEV_PATH_LEN - 1);
        b[..n].copy_from_slice(&path.as_bytes()[..n]);
        let mut c = buf_cmd(dev_id, &mut b);
        c.set_dev_path_len(DEV_PATH_LEN as u16);
        self.submit(CtrlOp { name, legacy, encoded }, c)
    }

    /// Sends a raw control command with this kernel's encoding. **Not part
    /// of the API:** for the crate's own tests of the kernel's refusals; it
    /// bypasses every check the typed commands make. Returns the CQE result.
    #[doc(hidden)]
    pub fn raw_command(&mut self, name: &'static str, legacy: u32, encoded: u32, cmd: sys::ublksrv_ctrl_cmd) -> Result<i32> {
        self.submit(CtrlOp { name, legacy, encoded }, cmd)
    }

    /// `UBLK_U_CMD_DEL_DEV_ASYNC` (6.9+): delete without waiting for the
    /// char device to be released. Privileged devices only: the kernel's
    /// permission check for unprivileged devices does not list this
    /// command and fails it with -EINVAL, so it is refused here, naming
    /// DEL_DEV instead.
    pub fn del_dev_async(&mut self, dev_id: u32) -> Result<()> {
        let op = abi_op("DEL_DEV_ASYNC", sys::abi::UBLK_U_CMD_DEL_DEV_ASYNC);
        if self.is_unprivileged(dev_id)? {
            return Err(Error::Unsupported {
                feature: "DEL_DEV_ASYNC",
                why: format!("device {dev_id} is an unprivileged device, for which the kernel accepts only DEL_DEV (ublk_ctrl_uring_cmd_permission lists no DEL_DEV_ASYNC); use del_dev"),
            });
        }
        let r = self.device_cmd::<()>(op, dev_id, None, 0, true).map(drop).map_err(no_dev(dev_id));
        if r.is_ok() {
            self.unprivileged.remove(&dev_id);
        }
        r
    }
}

/// The owner of `/dev/ublkcN`, which the udev rule sets from the device's
/// owner (`None` if the node cannot be looked at).
fn node_owner(dev_id: u32) -> Option<Owner> {
    let m = std::fs::metadata(format!("/dev/ublkc{dev_id}")).ok()?;
    Some(Owner { uid: m.uid(), gid: m.gid(), source: OwnerSource::CharNode })
}

/// `/dev/ublk-control` cannot be opened: who may, and what grants access.
fn control_access_error() -> Error {
    let (uid, gid) = caller_ids();
    let node = match std::fs::metadata(CONTROL_PATH) {
        Ok(m) => format!("mode {:04o}, owner uid {} gid {}", m.mode() & 0o7777, m.uid(), m.gid()),
        Err(_) => "not readable".into(),
    };
    Error::Access {
        what: format!("opening {CONTROL_PATH} ({node}) as uid {uid} gid {gid}"),
        fix: "privileged devices need root; for unprivileged devices (Linux 6.3+) ordinary users need read and write access to the control node: \
              install the udev rule `KERNEL==\"ublk-control\", MODE=\"0666\"` (docs/unprivileged.md), or run `chmod 0666 /dev/ublk-control` as root"
            .into(),
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
/// once the kernel has taken the SQE, only its CQE (or, for the commands run
/// with `keep_waiting`, whose buffer the kernel never writes, the caller
/// dropping the ring) ends the wait; if the kernel never took it, [`RunErr::Unsubmitted`] tells the
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
    // ring (cancelling the command); only START_DEV, END_USER_RECOVERY and
    // STOP_DEV are run that way, and their only buffer is the device path of
    // an unprivileged device, which the kernel only reads (copy_from_user):
    // a late read of it cannot write this process's memory.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The payload starts exactly `dev_path_len` bytes after the path, where
    /// the kernel moves `addr` to, for every payload a command carries.
    #[test]
    fn payload_follows_the_path() {
        fn check<T: Default>() {
            let b = WithPath { path: [0u8; DEV_PATH_LEN], payload: T::default() };
            let base = &b as *const _ as usize;
            assert_eq!(&b.payload as *const T as usize - base, DEV_PATH_LEN, "{}", std::any::type_name::<T>());
            assert_eq!(std::mem::size_of::<WithPath<T>>(), DEV_PATH_LEN + std::mem::size_of::<T>());
        }
        check::<DevInfo>();
        check::<sys::ublk_params>();
        check::<[u64; 16]>();
        check::<()>();
        let p = dev_path_bytes(u32::MAX);
        assert_eq!(&p[..20], b"/dev/ublkc4294967295");
        assert!(p[20..].iter().all(|&c| c == 0), "NUL-padded: the kernel's kern_path stops at the first NUL");
    }

    /// `dev_path_len` lands at byte 24 of the command whatever the header.
    #[test]
    fn dev_path_len_at_byte_24() {
        let mut c = sys::ublksrv_ctrl_cmd::default();
        assert!(c.set_dev_path_len(0x1234));
        // SAFETY: ublksrv_ctrl_cmd is 32 bytes of plain old data without padding.
        let bytes = unsafe { std::slice::from_raw_parts(&c as *const _ as *const u8, 32) };
        assert_eq!(&bytes[24..26], &0x1234u16.to_ne_bytes());
        assert!(bytes.iter().enumerate().all(|(i, &b)| (24..26).contains(&i) || b == 0));
    }
}

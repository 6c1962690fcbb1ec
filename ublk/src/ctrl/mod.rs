//! The control device, `/dev/ublk-control`.
//!
//! Control commands are `IORING_OP_URING_CMD`s whose 32-byte
//! `ublksrv_ctrl_cmd` sits at SQE byte 48 and runs past the first 64 bytes, so
//! the kernel insists on a ring created with `IORING_SETUP_SQE128`
//! (`ublk_ctrl_uring_cmd` returns -EINVAL otherwise). The opcode encoding is
//! chosen once per [`Control`], from the kernel's own answer: ioctl-encoded
//! (`UBLK_U_CMD_*`) when `GET_FEATURES` works and reports
//! `UBLK_F_CMD_IOCTL_ENCODE` (6.5+), the legacy numbers otherwise (6.1–6.4).

// Where the control device's parts are: this file has the `Control`
// handle itself (opening it, the encoding and features it found), the
// device info type, and the devices that exist;
// * `encoding`: `Encoding` and the control commands' opcodes;
// * `features`: `Features`, what GET_FEATURES reports;
// * `kernel`: the running kernel's release;
// * `ring`: the SQE128 ring: one command submitted, its answer awaited;
// * `access`: unprivileged devices' commands (with the char device path)
//   and refusals for lack of permission;
// * `commands`: the control commands, one method each;
// * `checked`: resize, quiesce and safe stop, checked before they are sent.
mod access;
mod checked;
mod commands;
mod encoding;
mod features;
mod kernel;
mod ring;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;

use io_uring::{cqueue, squeue, IoUring};
use ublk_sys as sys;

pub(crate) use access::caller_ids;
pub use access::DEV_PATH_LEN;
use encoding::abi_op;
pub use encoding::Encoding;
pub use features::Features;
pub use kernel::{kernel_release, kernel_version};
use ring::{buf_cmd, new_ctrl_ring};

use crate::error::{Error, Result};

/// Path of the control device.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// Device information (`struct ublksrv_ctrl_dev_info`) as the kernel keeps it.
pub type DevInfo = sys::ublksrv_ctrl_dev_info;

/// The sysfs class directory of the ublk char devices: `ublkcN` for each
/// device that exists (absent when the driver is not loaded).
pub const CHAR_CLASS_DIR: &str = "/sys/class/ublk-char";

/// Whether sysfs lists a char device `/dev/ublkc{dev_id}`, that is, whether
/// device `dev_id` exists (false where sysfs is not mounted).
pub fn char_dev_exists(dev_id: u32) -> bool {
    std::path::Path::new(CHAR_CLASS_DIR).join(format!("ublkc{dev_id}")).exists()
}

/// Ids of the ublk devices that exist, from [`CHAR_CLASS_DIR`]`/ublkcN`,
/// in increasing order (empty when the driver is not loaded).
pub fn device_ids() -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir(CHAR_CLASS_DIR)
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

    /// The encoding chosen for this kernel.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// What the kernel reported through `GET_FEATURES`, or `None` on kernels
    /// before 6.5 (or a build whose header predates the command).
    pub fn features(&self) -> Option<Features> {
        self.features
    }
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

//! A device's whole life: ADD_DEV, SET_PARAMS, one thread per queue (or
//! several, with per-I/O daemons), FETCH, START_DEV, serve, STOP_DEV,
//! DEL_DEV; and teardown on every path out.

// Where the device's parts are: this file has the `Device` itself, what
// it keeps of how it is served, and its deletion;
// * `builder`: `DeviceBuilder`, the configuration and the creation;
// * `check`: the checks of flags before ADD_DEV or a recovery;
// * `data_path`: `DataPath`;
// * `serve`: the queue threads, the lifecycle from START_DEV to DEL_DEV,
//   and the `StopHandle`;
// * `recover`: taking over a device whose server died;
// * `nodes`: `/dev/ublkcN` and the block device's sysfs.
mod builder;
mod check;
mod data_path;
mod nodes;
mod recover;
mod serve;

use std::fs::File;
use std::path::PathBuf;
use std::time::Duration;

use ublk_sys as sys;

use crate::ctrl::{Control, DevInfo};
use crate::error::Result;
use crate::params::Params;
use crate::placement::Placement;
pub use builder::{DeviceBuilder, NODE_WAIT};
pub use data_path::DataPath;
pub use serve::StopHandle;

/// How long a stopping device waits, by default, for its target to finish
/// the requests in flight before their operations are cancelled and they
/// fail ([`DeviceBuilder::stop_grace`]).
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// The largest queue depth the kernel takes (`UBLK_MAX_QUEUE_DEPTH`).
pub const MAX_QUEUE_DEPTH: u16 = sys::UBLK_MAX_QUEUE_DEPTH as u16;

/// How this process serves a device: settings the kernel does not keep,
/// which a [`Device`] takes from its builder, whether created or recovered.
#[derive(Debug, Clone)]
struct Serving {
    placement: Placement,
    busy_poll: Duration,
    io_scheduler: Option<String>,
    io_timeout: Option<Duration>,
    stop_grace: Duration,
    /// The data path asked for: [`DeviceBuilder::create`] takes the
    /// device's flags from it, and [`Device::data_path`] tells
    /// [`DataPath::NoData`] from [`DataPath::UserCopy`] by it.
    data_path: DataPath,
    /// Threads per queue, each serving its share of the tags.
    threads_per_queue: u16,
    /// Test hook, see [`DeviceBuilder::occupy_auto_buf_indexes`].
    occupy_every: u16,
}

impl Default for Serving {
    fn default() -> Self {
        Serving {
            placement: Placement::Auto,
            busy_poll: crate::queue::DEFAULT_BUSY_POLL,
            io_scheduler: None,
            io_timeout: None,
            stop_grace: STOP_GRACE,
            data_path: DataPath::Copy,
            threads_per_queue: 1,
            occupy_every: 0,
        }
    }
}

/// A created device. Dropped, it stops (if started) and deletes itself.
#[derive(Debug)]
pub struct Device {
    ctrl: Control,
    info: DevInfo,
    params: Option<Params>,
    char_file: Option<File>,
    deleted: bool,
    recovering: bool,
    serving: Serving,
}

impl Device {
    /// A device just added (or taken over): its char device not open yet.
    fn new(ctrl: Control, info: DevInfo, recovering: bool, serving: Serving) -> Device {
        Device { ctrl, info, params: None, char_file: None, deleted: false, recovering, serving }
    }

    /// Detaches from the device without stopping or deleting it (for a
    /// server that exits and leaves recovery to another process).
    pub fn leak(mut self) {
        self.deleted = true;
    }

    /// The kernel's device id (N in `/dev/ublkbN`).
    pub fn id(&self) -> u32 {
        self.info.dev_id
    }
    /// Device info as ADD_DEV returned it (queues clamped to the CPU count,
    /// negotiated flags).
    pub fn info(&self) -> &DevInfo {
        &self.info
    }
    /// The parameters set with SET_PARAMS.
    pub fn params(&self) -> Option<&Params> {
        self.params.as_ref()
    }
    /// The control device, for queries while the device exists.
    pub fn control(&mut self) -> &mut Control {
        &mut self.ctrl
    }
    /// The data path the device got: [`DataPath::AutoBufReg`] or
    /// [`DataPath::ZeroCopy`] if it was created with `UBLK_F_AUTO_BUF_REG`
    /// or `UBLK_F_SUPPORT_ZERO_COPY`; else [`DataPath::Copy`] unless it was
    /// created with `UBLK_F_USER_COPY`, then [`DataPath::NoData`] if that
    /// was asked for, else [`DataPath::UserCopy`].
    pub fn data_path(&self) -> DataPath {
        if self.info.flags & sys::abi::UBLK_F_AUTO_BUF_REG != 0 {
            DataPath::AutoBufReg
        } else if self.info.flags & sys::abi::UBLK_F_SUPPORT_ZERO_COPY != 0 {
            DataPath::ZeroCopy
        } else if !crate::queue::user_copy(&self.info) {
            DataPath::Copy
        } else if self.serving.data_path == DataPath::NoData {
            DataPath::NoData
        } else {
            DataPath::UserCopy
        }
    }
    /// The opcode encoding in use (chosen from the kernel's GET_FEATURES).
    pub fn encoding(&self) -> crate::Encoding {
        self.ctrl.encoding()
    }
    /// `/dev/ublkbN`.
    pub fn block_path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/ublkb{}", self.info.dev_id))
    }
    /// `/dev/ublkcN`.
    pub fn char_path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/ublkc{}", self.info.dev_id))
    }

    /// Close `/dev/ublkcN`, DEL_DEV (the device was stopped by `serve`, or
    /// never started). Idempotent.
    fn delete(&mut self) -> Result<()> {
        if self.deleted {
            return Ok(());
        }
        if self.recovering {
            // Never delete a device we were only trying to take over.
            self.char_file = None;
            self.deleted = true;
            return Ok(());
        }
        self.char_file = None;
        self.deleted = true;
        self.ctrl.del_dev(self.info.dev_id)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.delete();
    }
}

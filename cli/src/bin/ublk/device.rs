//! An existing device: whether it exists, its info (with an error naming
//! a missing device), and whether its daemon is alive.

use anyhow::{anyhow, Result};
use ublk::Control;
use ublk_cli::config::{pid_alive, verify_daemon, DeviceConfig};

pub(super) fn device_exists(id: u32) -> bool {
    ublk::ctrl::char_dev_exists(id)
}

pub(super) fn no_device(id: u32) -> anyhow::Error {
    anyhow!("no ublk device {id}; `ublk list` shows the existing ones")
}

pub(super) fn dev_info(ctrl: &mut Control, id: u32) -> Result<ublk::DevInfo> {
    ctrl.get_dev_info(id).map_err(|e| match e {
        ublk::Error::NoDevice { .. } => no_device(id),
        e => e.into(),
    })
}

/// Whether the daemon of device `id`, which the kernel says is `pid`, is
/// running: where the saved configuration has the daemon's start time, the
/// process must match it (a dead daemon's pid may belong to another process
/// by now); devices without one (not made by this `ublk`) go by the pid.
pub(super) fn daemon_alive(pid: u32, id: u32, cfg: Option<&DeviceConfig>) -> bool {
    match cfg {
        Some(c) if c.pid_start.is_some() => verify_daemon(pid, id, cfg).is_ok(),
        _ => pid_alive(pid),
    }
}

//! Recovery (`UBLK_F_USER_RECOVERY`): taking over a device whose server
//! died, once the kernel has quiesced it.

use std::time::{Duration, Instant};

use ublk_sys as sys;

use super::check::{check_device_flags, check_io_timeout};
use super::nodes::open_char;
use super::{Device, DeviceBuilder};
use crate::ctrl::Control;
use crate::error::{Error, Result};
use crate::params::Params;
use crate::queue::{check_threads, TagShare};

impl DeviceBuilder {
    /// Takes over an existing device whose server died, with user recovery
    /// (`UBLK_F_USER_RECOVERY`): waits (up to `wait`) for the kernel to
    /// quiesce it, then START_USER_RECOVERY and opens `/dev/ublkcN`.
    /// [`Device::serve`] then fetches every tag and sends END_USER_RECOVERY
    /// instead of START_DEV; I/O queued meanwhile resumes.
    ///
    /// What the kernel keeps (queues, depth, flags, size, block sizes,
    /// attributes, discard limits) comes from the kernel; what only this
    /// process knows (placement, busy polling, I/O scheduler, request
    /// timeout) comes from this builder, so give it the settings the device
    /// was created with. The builder's geometry and flags are not used.
    pub fn recover(self, dev_id: u32, wait: Duration) -> Result<Device> {
        let mut ctrl = Control::open()?;
        let info = ctrl.get_dev_info(dev_id)?;
        // A device made elsewhere may use a protocol this library does not speak.
        check_device_flags(info.flags)?;
        // Refused now rather than after END_USER_RECOVERY, when the device
        // would be torn down.
        check_io_timeout(self.serving.io_timeout, info.flags & sys::abi::UBLK_F_UNPRIVILEGED_DEV != 0)?;
        // Several threads per queue need the device's per-I/O daemons;
        // refused before the recovery starts, leaving the device as it is.
        check_threads(self.serving.threads_per_queue, info.queue_depth)?;
        TagShare { thread: 0, threads: self.serving.threads_per_queue }.check(&info)?;
        let recovery = sys::UBLK_F_USER_RECOVERY;
        if info.flags & recovery == 0 && info.flags & sys::abi::UBLK_F_UNPRIVILEGED_DEV != 0 {
            return Err(Error::InvalidConfig {
                what: "recover",
                why: format!(
                    "device {dev_id} is an unprivileged device, and the kernel ({}) gives those no user recovery (ublk_ctrl_add_dev drops UBLK_F_USER_RECOVERY): its owner can only delete it (DEL_DEV) and create it again",
                    crate::ctrl::kernel_release()
                ),
            });
        }
        if info.flags & recovery == 0 {
            return Err(Error::InvalidConfig {
                what: "recover",
                why: format!("device {dev_id} was created without user recovery (UBLK_F_USER_RECOVERY); only its deletion is possible"),
            });
        }
        let quiesced = |s: u16| u32::from(s) == sys::UBLK_S_DEV_QUIESCED || u32::from(s) == sys::abi::UBLK_S_DEV_FAIL_IO;
        let t0 = Instant::now();
        let mut info = info;
        while !quiesced(info.state) {
            // A killed server that its parent has not reaped yet is a zombie:
            // /proc/PID still exists but the server is gone (its state is Z).
            let alive = info.ublksrv_pid > 0 && pid_running(info.ublksrv_pid);
            if alive || t0.elapsed() > wait {
                return Err(Error::InvalidConfig {
                    what: "recover",
                    why: format!(
                        "device {dev_id} is {} with its server (pid {}) {}; recovery takes over only a device whose server died",
                        crate::ctrl::state_name(info.state),
                        info.ublksrv_pid,
                        if alive { "still running" } else { "gone but the kernel has not quiesced it yet" }
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
            info = ctrl.get_dev_info(dev_id)?;
        }
        // START_USER_RECOVERY needs /dev/ublkcN released by the dead server;
        // the kernel may still be tearing its rings down: retry on -EBUSY.
        loop {
            match ctrl.start_user_recovery(dev_id) {
                Ok(()) => break,
                Err(Error::Kernel { errno: libc::EBUSY, .. }) if t0.elapsed() < wait => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => return Err(e),
            }
        }
        let info = ctrl.get_dev_info(dev_id)?;
        let params = ctrl.get_params(dev_id)?;
        let mut dev = Device::new(ctrl, info, true, self.serving);
        dev.params = Some(Params::from_raw(&params));
        dev.char_file = Some(open_char(dev_id)?);
        Ok(dev)
    }
}

impl Device {
    /// Takes over an existing device whose server died, with the default
    /// placement and busy polling: [`DeviceBuilder::recover`] with
    /// [`DeviceBuilder::new`]. A server that was created with other settings
    /// should recover through its own builder, so the device keeps them.
    pub fn recover(dev_id: u32, wait: Duration) -> Result<Device> {
        DeviceBuilder::new().recover(dev_id, wait)
    }
}

/// Whether `pid` is a live process: /proc/PID exists and is not a zombie
/// (state Z/X), which a killed but not yet reaped server is.
fn pid_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}

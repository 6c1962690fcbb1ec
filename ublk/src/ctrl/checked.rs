//! Operations checked before they are sent, each refused with an error
//! that says why where the kernel or the device lacks what it needs:
//! resizing a device, quiescing it for a server upgrade, and a stop
//! refused while its disk is open.

use std::time::Duration;

use ublk_sys as sys;

use super::{device_ids, kernel_release, Control};
use crate::error::{Error, Result};

impl Control {
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
        if info.flags & sys::abi::UBLK_F_BATCH_IO != 0 {
            // Seen on 7.3 (a loop device with --batch --recovery under fio):
            // writes in flight when QUIESCE_DEV ended the batch fetch failed
            // with EIO instead of waiting for the next server.
            return Err(Error::InvalidConfig {
                what: "quiesce",
                why: format!("device {dev_id} uses batched commands (UBLK_F_BATCH_IO, `--batch`), whose quiesce fails writes in flight with EIO on 7.3: refused; stop its server with kill -9 and `ublk recover -n {dev_id}` instead (nothing is lost), or create the device without --batch"),
            });
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
}

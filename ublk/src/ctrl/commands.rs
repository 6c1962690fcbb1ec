//! The control commands, one method of [`Control`] each: ADD_DEV,
//! DEL_DEV, STOP_DEV, SET_PARAMS, GET_PARAMS, GET_DEV_INFO(2),
//! UPDATE_SIZE, QUIESCE_DEV, TRY_STOP_DEV, GET_QUEUE_AFFINITY, and the
//! ones that may wait long (START_DEV, END_USER_RECOVERY, STOP_DEV) on a
//! ring of their own.

use std::os::fd::AsRawFd;

use ublk_sys as sys;

use super::access::{caller_ids, dev_path_bytes, node_owner, DEV_PATH_LEN};
use super::encoding::{abi_op, ops, CtrlOp};
use super::ring::{buf_cmd, ctrl_sqe, dev_cmd, kernel_err, new_ctrl_ring, no_dev, run_one, RunErr};
use super::{Control, DevInfo};
use crate::error::{Cmd, Error, Result};
use crate::params::Params;

impl Control {
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

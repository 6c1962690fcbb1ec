//! The control ring (`IORING_SETUP_SQE128`): a command
//! (`ublksrv_ctrl_cmd`) and its SQE, one command submitted and its
//! completion awaited, and the kernel's answer as an [`Error`].

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use ublk_sys as sys;

use super::encoding::{CtrlOp, Encoding};
use super::{char_dev_exists, Control, CHAR_CLASS_DIR};
use crate::error::{hints, Cmd, Error, Result};

impl Control {
    pub(super) fn opcode(&self, op: CtrlOp) -> u32 {
        match self.encoding {
            Encoding::Legacy => op.legacy,
            Encoding::Ioctl => op.encoded,
        }
    }

    pub(super) fn submit_encoded(&mut self, op: CtrlOp, cmd: sys::ublksrv_ctrl_cmd, encoded: bool) -> Result<i32> {
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

    pub(super) fn submit(&mut self, op: CtrlOp, cmd: sys::ublksrv_ctrl_cmd) -> Result<i32> {
        self.submit_encoded(op, cmd, self.encoding == Encoding::Ioctl)
    }
}

pub(super) fn dev_cmd(dev_id: u32) -> sys::ublksrv_ctrl_cmd {
    sys::ublksrv_ctrl_cmd { dev_id, queue_id: u16::MAX, ..Default::default() }
}

/// A command for `dev_id` whose payload is `buf` (`addr`/`len`); `buf` must
/// stay borrowed until the command completes.
pub(super) fn buf_cmd<T: ?Sized>(dev_id: u32, buf: &mut T) -> sys::ublksrv_ctrl_cmd {
    sys::ublksrv_ctrl_cmd { addr: buf as *mut T as *mut u8 as u64, len: std::mem::size_of_val(buf) as u16, ..dev_cmd(dev_id) }
}

pub(super) fn no_dev(dev_id: u32) -> impl Fn(Error) -> Error {
    move |e| match e {
        Error::Kernel { errno: libc::ENODEV, .. } => Error::NoDevice { dev_id },
        // After finding the device, the kernel's permission check looks up
        // the /dev/ublkcN the command names (an unprivileged device's
        // commands, and GET_DEV_INFO2): a device being deleted meanwhile (by
        // its own daemon, say) answers -ENOENT, once its char device is gone
        // from sysfs. Not when sysfs cannot tell (not mounted here).
        Error::Kernel { errno: libc::ENOENT, .. } if char_dev_gone(dev_id) => Error::NoDevice { dev_id },
        e => e,
    }
}

/// Whether sysfs, readable here, lists no char device for `dev_id`.
fn char_dev_gone(dev_id: u32) -> bool {
    std::path::Path::new(CHAR_CLASS_DIR).is_dir() && !char_dev_exists(dev_id)
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

pub(super) fn kernel_err(op: CtrlOp, dev_id: u32, e: RunErr) -> Error {
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
mod no_dev_tests {
    use super::*;
    use crate::error::Cmd;

    fn kernel(errno: i32) -> Error {
        Error::Kernel { cmd: Cmd::Ctrl("DEL_DEV"), dev_id: Some(987_654), q_id: None, tag: None, errno, hints: &[] }
    }

    #[test]
    fn enodev_is_no_device_and_enoent_only_when_sysfs_says_gone() {
        assert!(matches!(no_dev(987_654)(kernel(libc::ENODEV)), Error::NoDevice { dev_id: 987_654 }));
        let mapped = no_dev(987_654)(kernel(libc::ENOENT));
        if std::path::Path::new(CHAR_CLASS_DIR).is_dir() {
            // A machine with the driver: no device 987654 has a char device.
            assert!(matches!(mapped, Error::NoDevice { dev_id: 987_654 }), "{mapped:?}");
        } else {
            // Without the class directory sysfs cannot tell: the error stays.
            assert!(matches!(mapped, Error::Kernel { errno: libc::ENOENT, .. }), "{mapped:?}");
        }
        assert!(matches!(no_dev(987_654)(kernel(libc::EINVAL)), Error::Kernel { errno: libc::EINVAL, .. }));
    }
}

//! Who may send which command: an unprivileged device's commands carry
//! its char device path ahead of their payload, whether a device is one is
//! learned once per device, and a refusal for lack of permission becomes
//! [`Error::NotOwner`] naming the device's owner.

use std::os::unix::fs::MetadataExt;

use ublk_sys as sys;

use super::encoding::{ops, CtrlOp, Encoding};
use super::ring::{buf_cmd, dev_cmd, no_dev};
use super::{Control, DevInfo};
use crate::error::{Error, Owner, OwnerSource, Result};

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
pub(super) fn dev_path_bytes(dev_id: u32) -> [u8; DEV_PATH_LEN] {
    let p = format!("/dev/ublkc{dev_id}");
    let mut b = [0u8; DEV_PATH_LEN];
    // "/dev/ublkc" + at most 10 digits: always shorter than DEV_PATH_LEN.
    b[..p.len()].copy_from_slice(p.as_bytes());
    b
}

/// This process's effective uid and gid.
pub(crate) fn caller_ids() -> (u32, u32) {
    // SAFETY: geteuid/getegid cannot fail and touch no memory.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

impl Control {
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
    pub(super) fn device_cmd<T: Copy>(
        &mut self,
        op: CtrlOp,
        dev_id: u32,
        payload: Option<&mut T>,
        data0: u64,
        encoded: bool,
    ) -> Result<i32> {
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
    pub(super) fn dev_info2_raw(&mut self, dev_id: u32) -> Result<DevInfo> {
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
}

/// The owner of `/dev/ublkcN`, which the udev rule sets from the device's
/// owner (`None` if the node cannot be looked at).
pub(super) fn node_owner(dev_id: u32) -> Option<Owner> {
    let m = std::fs::metadata(format!("/dev/ublkc{dev_id}")).ok()?;
    Some(Owner { uid: m.uid(), gid: m.gid(), source: OwnerSource::CharNode })
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

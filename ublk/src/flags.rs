//! Typed `UBLK_F_*` device flags and `UBLK_ATTR_*` device attributes.
//!
//! The flag bits are the kernel's (from [`sys::abi`], checked against the
//! newest header by `ublk-sys`'s tests), so a build against an old header
//! still names every flag a newer kernel offers. Bits this crate does not
//! know are kept as they are (`from_bits_retain`), never dropped.

use ublk_sys as sys;
use ublk_sys::abi;

bitflags::bitflags! {
    /// `UBLK_F_*`: what a device is created with (`ADD_DEV`), and what a
    /// kernel offers (`GET_FEATURES`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct DevFlags: u64 {
        /// `UBLK_F_SUPPORT_ZERO_COPY` (6.15 usable).
        const SUPPORT_ZERO_COPY = abi::UBLK_F_SUPPORT_ZERO_COPY;
        /// `UBLK_F_URING_CMD_COMP_IN_TASK`.
        const URING_CMD_COMP_IN_TASK = abi::UBLK_F_URING_CMD_COMP_IN_TASK;
        /// `UBLK_F_NEED_GET_DATA`.
        const NEED_GET_DATA = abi::UBLK_F_NEED_GET_DATA;
        /// `UBLK_F_USER_RECOVERY`: the device waits for a new server when
        /// its server dies.
        const USER_RECOVERY = abi::UBLK_F_USER_RECOVERY;
        /// `UBLK_F_USER_RECOVERY_REISSUE`.
        const USER_RECOVERY_REISSUE = abi::UBLK_F_USER_RECOVERY_REISSUE;
        /// `UBLK_F_UNPRIVILEGED_DEV` (6.3).
        const UNPRIVILEGED_DEV = abi::UBLK_F_UNPRIVILEGED_DEV;
        /// `UBLK_F_CMD_IOCTL_ENCODE` (6.4).
        const CMD_IOCTL_ENCODE = abi::UBLK_F_CMD_IOCTL_ENCODE;
        /// `UBLK_F_USER_COPY` (6.5).
        const USER_COPY = abi::UBLK_F_USER_COPY;
        /// `UBLK_F_ZONED` (6.6).
        const ZONED = abi::UBLK_F_ZONED;
        /// `UBLK_F_USER_RECOVERY_FAIL_IO` (6.13).
        const USER_RECOVERY_FAIL_IO = abi::UBLK_F_USER_RECOVERY_FAIL_IO;
        /// `UBLK_F_UPDATE_SIZE` (6.16).
        const UPDATE_SIZE = abi::UBLK_F_UPDATE_SIZE;
        /// `UBLK_F_AUTO_BUF_REG` (6.16).
        const AUTO_BUF_REG = abi::UBLK_F_AUTO_BUF_REG;
        /// `UBLK_F_QUIESCE` (6.16).
        const QUIESCE = abi::UBLK_F_QUIESCE;
        /// `UBLK_F_PER_IO_DAEMON` (6.16).
        const PER_IO_DAEMON = abi::UBLK_F_PER_IO_DAEMON;
        /// `UBLK_F_BUF_REG_OFF_DAEMON` (6.17).
        const BUF_REG_OFF_DAEMON = abi::UBLK_F_BUF_REG_OFF_DAEMON;
        /// `UBLK_F_BATCH_IO` (7.0).
        const BATCH_IO = abi::UBLK_F_BATCH_IO;
        /// `UBLK_F_INTEGRITY` (7.0).
        const INTEGRITY = abi::UBLK_F_INTEGRITY;
        /// `UBLK_F_SAFE_STOP_DEV` (7.0).
        const SAFE_STOP_DEV = abi::UBLK_F_SAFE_STOP_DEV;
        /// `UBLK_F_NO_AUTO_PART_SCAN` (7.0).
        const NO_AUTO_PART_SCAN = abi::UBLK_F_NO_AUTO_PART_SCAN;
        /// `UBLK_F_SHMEM_ZC` (7.1).
        const SHMEM_ZC = abi::UBLK_F_SHMEM_ZC;
        /// `UBLK_F_IO_DESC_SIZE` (7.3).
        const IO_DESC_SIZE = abi::UBLK_F_IO_DESC_SIZE;
        // Bits a newer kernel may define.
        const _ = !0;
    }
}

impl From<u64> for DevFlags {
    fn from(bits: u64) -> Self {
        DevFlags::from_bits_retain(bits)
    }
}

impl DevFlags {
    /// Every flag by its kernel name (see [`Features::names`](crate::Features::names)).
    pub fn names(self) -> Vec<String> {
        crate::ctrl::Features(self.bits()).names()
    }
}

impl std::fmt::Display for DevFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.names().join(","))
    }
}

bitflags::bitflags! {
    /// `UBLK_ATTR_*`: what the block layer is told about the device
    /// (`ublk_param_basic.attrs`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Attrs: u32 {
        /// `UBLK_ATTR_READ_ONLY`.
        const READ_ONLY = sys::UBLK_ATTR_READ_ONLY;
        /// `UBLK_ATTR_ROTATIONAL`.
        const ROTATIONAL = sys::UBLK_ATTR_ROTATIONAL;
        /// `UBLK_ATTR_VOLATILE_CACHE`: the block layer sends FLUSH.
        const VOLATILE_CACHE = sys::UBLK_ATTR_VOLATILE_CACHE;
        /// `UBLK_ATTR_FUA`: the block layer sends FUA writes.
        const FUA = sys::UBLK_ATTR_FUA;
        const _ = !0;
    }
}

impl From<u32> for Attrs {
    fn from(bits: u32) -> Self {
        Attrs::from_bits_retain(bits)
    }
}

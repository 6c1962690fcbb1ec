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

/// Whether this library implements a `UBLK_F_*` flag
/// ([`DevFlags::library_support`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Implemented: [`DeviceBuilder::flags`](crate::DeviceBuilder::flags)
    /// takes it, and a device that has it is served correctly.
    Yes,
    /// Not implemented, and why: refused before ADD_DEV.
    No(&'static str),
    /// Being implemented (per-I/O threads): refused before ADD_DEV until it
    /// lands.
    InProgress(&'static str),
}

impl Support {
    /// `yes`, `no` or `in progress`.
    pub fn label(self) -> &'static str {
        match self {
            Support::Yes => "yes",
            Support::No(_) => "no",
            Support::InProgress(_) => "in progress",
        }
    }

    /// Why the flag is not implemented (`None` when it is).
    pub fn why(self) -> Option<&'static str> {
        match self {
            Support::Yes => None,
            Support::No(w) | Support::InProgress(w) => Some(w),
        }
    }
}

impl std::fmt::Display for Support {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.why() {
            None => f.write_str("yes"),
            Some(w) => write!(f, "{}: {w}", self.label()),
        }
    }
}

impl DevFlags {
    /// What this library does with one flag: **the one place** that says
    /// which `UBLK_F_*` flags the library implements. [`SUPPORTED_FLAGS`],
    /// [`DeviceBuilder::create`](crate::DeviceBuilder::create)'s refusals,
    /// [`DeviceBuilder::recover`](crate::DeviceBuilder::recover)'s check of
    /// a device made elsewhere and `ublk features` all follow it: a data
    /// path that lands flips its entry here. `self` must be a single flag;
    /// anything else (several bits, a bit no kernel up to 7.3 defines) is
    /// [`Support::No`].
    pub const fn library_support(self) -> Support {
        match self.bits() {
            // Zero copy (DataPath::ZeroCopy asks for it; the queue registers
            // each request's pages with REGISTER_IO_BUF), automatic
            // registration (DataPath::AutoBufReg) and batched commands
            // (DeviceBuilder::batch_io): the queues follow the device's flags.
            abi::UBLK_F_SUPPORT_ZERO_COPY | abi::UBLK_F_AUTO_BUF_REG | abi::UBLK_F_BATCH_IO => Support::Yes,
            // The kernel sets it by itself (6.12+); completion in task
            // context changes nothing the server does.
            abi::UBLK_F_URING_CMD_COMP_IN_TASK => Support::Yes,
            abi::UBLK_F_NEED_GET_DATA => Support::No(
                "the queues give every FETCH and COMMIT a buffer and never answer UBLK_IO_RES_NEED_GET_DATA with NEED_GET_DATA: the device would go live and fail its first write",
            ),
            abi::UBLK_F_USER_RECOVERY | abi::UBLK_F_USER_RECOVERY_REISSUE | abi::UBLK_F_USER_RECOVERY_FAIL_IO => Support::Yes,
            abi::UBLK_F_UNPRIVILEGED_DEV => Support::Yes,
            abi::UBLK_F_CMD_IOCTL_ENCODE => Support::Yes,
            abi::UBLK_F_USER_COPY => Support::Yes,
            abi::UBLK_F_ZONED => Support::No(
                "a zoned device needs zone parameters, the zone operations (open, close, finish, reset, append, REPORT_ZONES) and the append LBA in COMMIT, which neither the queues nor any target implement",
            ),
            // Resizing (Control::resize_dev), quiesce for a server upgrade
            // (Control::quiesce), a stop refused while the disk is open
            // (Control::try_stop_dev), no partition scan at START_DEV: control
            // commands and START_DEV behaviour, nothing the queues see.
            abi::UBLK_F_UPDATE_SIZE | abi::UBLK_F_QUIESCE | abi::UBLK_F_SAFE_STOP_DEV | abi::UBLK_F_NO_AUTO_PART_SCAN => Support::Yes,

            // Several threads per queue (DeviceBuilder::threads_per_queue):
            // each thread fetches and commits its own tags. The kernel sets
            // the flag by itself on 6.16+, which one thread per queue serves
            // as it is.
            abi::UBLK_F_PER_IO_DAEMON => Support::Yes,
            // It only allows more (registration from any thread); the queues
            // register from the tag's own thread, which every kernel takes.
            // The kernel sets it by itself on 6.17+.
            abi::UBLK_F_BUF_REG_OFF_DAEMON => Support::Yes,
            abi::UBLK_F_INTEGRITY => Support::No(
                "integrity (protection information) needs UBLK_PARAM_TYPE_INTEGRITY and the integrity buffer of every request, which no target reads or writes",
            ),
            abi::UBLK_F_SHMEM_ZC => Support::No(
                "shared-memory zero copy needs buffers registered with REG_BUF/UNREG_BUF and requests that name them (UBLK_IO_F_SHMEM_ZC), which the queues do not read",
            ),
            abi::UBLK_F_IO_DESC_SIZE => Support::No(
                "a larger I/O descriptor changes the stride and length of the descriptor mapping, which the queues fix at 24 bytes",
            ),
            _ => Support::No("not a UBLK_F_ flag of any kernel up to 7.3, the newest this library knows"),
        }
    }

    /// The first kernel where the flag (a single one) works, as (major,
    /// minor): its header's version (`ublk_sys::abi`), except zero copy,
    /// numbered from 6.0 but refused by ADD_DEV until 6.15.
    pub fn since(self) -> Option<(u32, u32)> {
        if self.bits() == abi::UBLK_F_SUPPORT_ZERO_COPY {
            return Some((6, 15));
        }
        abi::since(abi::flag_name(self.bits())?)
    }
}

/// Every flag whose [`DevFlags::library_support`] is [`Support::Yes`]: what
/// [`DeviceBuilder::flags`](crate::DeviceBuilder::flags) takes.
pub const SUPPORTED_FLAGS: DevFlags = {
    let mut bits = 0u64;
    let mut bit = 0;
    while bit < 64 {
        if matches!(DevFlags::from_bits_retain(1u64 << bit).library_support(), Support::Yes) {
            bits |= 1u64 << bit;
        }
        bit += 1;
    }
    DevFlags::from_bits_retain(bits)
};

/// Flags the kernel adds by itself to the flags ADD_DEV returns (6.16+:
/// per-I/O daemon, 6.17+: registration off the daemon), whose rules a
/// server with one thread per queue meets as it is: a device made elsewhere
/// with them can be recovered.
pub(crate) const KERNEL_ADDED_FLAGS: DevFlags = DevFlags::PER_IO_DAEMON.union(DevFlags::BUF_REG_OFF_DAEMON);

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every flag up to 7.3 has an entry of its own (not the fallback for
    /// unknown bits), and the table says what the README and `ublk
    /// features` say: the data paths being built are in progress.
    #[test]
    fn every_flag_has_its_own_entry() {
        let fallback = DevFlags::from_bits_retain(1 << 40).library_support();
        for (name, v, _) in abi::TABLE.iter().filter(|(n, _, _)| n.starts_with("UBLK_F_")) {
            let s = DevFlags::from_bits_retain(*v).library_support();
            assert_ne!(s, fallback, "{name} has no entry of its own");
            assert_eq!(SUPPORTED_FLAGS.contains(DevFlags::from_bits_retain(*v)), s == Support::Yes, "{name}");
            assert!(DevFlags::from_bits_retain(*v).since().is_some(), "{name}");
        }
        for f in
            [DevFlags::AUTO_BUF_REG, DevFlags::SUPPORT_ZERO_COPY, DevFlags::BUF_REG_OFF_DAEMON, DevFlags::BATCH_IO, DevFlags::PER_IO_DAEMON]
        {
            assert_eq!(f.library_support(), Support::Yes, "{f:?}");
        }
        for f in [DevFlags::ZONED, DevFlags::INTEGRITY, DevFlags::SHMEM_ZC, DevFlags::IO_DESC_SIZE, DevFlags::NEED_GET_DATA] {
            assert!(matches!(f.library_support(), Support::No(_)), "{f:?}");
        }
        assert_eq!(DevFlags::SUPPORT_ZERO_COPY.since(), Some((6, 15)));
        // Several bits are no single flag.
        assert!(matches!((DevFlags::USER_RECOVERY | DevFlags::QUIESCE).library_support(), Support::No(_)));
    }
}

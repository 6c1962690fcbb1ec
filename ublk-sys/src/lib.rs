//! Raw bindings to the Linux ublk UAPI, `linux/ublk_cmd.h`.
//!
//! Generated at build time by `bindgen` from the kernel's own header: the
//! system's (`linux-libc-dev`) or the tree named by `UBLK_SYS_KERNEL_HEADERS`
//! (a directory holding `linux/ublk_cmd.h`). Struct layouts, command numbers
//! and the ioctl-encoded `UBLK_U_*` opcodes are the header's own; the build
//! evaluates the `_IOR`/`_IOWR` macros with clang, and the crate's tests check
//! every layout and value against the C compiler's view of the same header.
//!
//! One API for every header generation (6.1 to 7.x):
//! * the ioctl-encoded opcodes of the commands that 6.1 already numbers exist
//!   whatever the header; where it predates them they are re-encoded with the
//!   header's own `_IOR`/`_IOWR` (see `wrapper.h`);
//! * names a newer header adds are in [`opt`] as `Option`s: `None` means
//!   "this header predates it", a capability rather than a compile error;
//! * fields that moved into anonymous unions (6.6+) are reached through
//!   accessor methods ([`ublksrv_io_desc::nr_sectors`], [`ublksrv_io_cmd::new`]);
//! * `UBLK_F_*` are `u64`, like the `flags` field they go into.
//!
//! [`HEADER_LINUX_VERSION`], [`HEADER_FLAGS`] and [`HEADER_COMMANDS`] say which
//! header the crate was built from, for comparison with what the running
//! kernel reports (`UBLK_U_CMD_GET_FEATURES`).
#![no_std]
#![allow(non_upper_case_globals, non_camel_case_types, non_snake_case)]
#![allow(clippy::all)]

mod bindings {
    #![allow(missing_docs, rustdoc::all)]
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}
pub use bindings::*;

#[allow(unused_imports)]
mod compat {
    use crate::*;
    include!(concat!(env!("OUT_DIR"), "/compat.rs"));
}
#[allow(unused_imports)]
pub use compat::*;

mod caps {
    include!(concat!(env!("OUT_DIR"), "/caps.rs"));
}
pub use caps::{opt, HEADER_COMMANDS, HEADER_FLAGS, HEADER_PARAM_TYPES};

pub mod abi;

/// Path of the `ublk_cmd.h` these bindings were generated from, on the
/// machine that built the crate.
///
/// Not part of the API: it bakes the build machine's file system into the
/// crate and means nothing where the binary runs. Use
/// [`HEADER_LINUX_VERSION`] (and [`HEADER_FLAGS`], [`HEADER_COMMANDS`]) to
/// say which header a build used. Hidden, and to be removed.
#[doc(hidden)]
#[deprecated(note = "the build machine's path; use HEADER_LINUX_VERSION")]
pub const HEADER_PATH: &str = env!("UBLK_SYS_HEADER");

/// `LINUX_VERSION_CODE` of the header tree, as (major, minor, patch).
/// Debian clamps the patch level to 255 in this macro.
pub const HEADER_LINUX_VERSION: (u32, u32, u32) =
    (UBLK_SYS_LINUX_VERSION_CODE >> 16, (UBLK_SYS_LINUX_VERSION_CODE >> 8) & 0xff, UBLK_SYS_LINUX_VERSION_CODE & 0xff);

/// Whether this header defines the constant `name` (e.g. `"UBLK_F_USER_COPY"`).
pub fn header_has(name: &str) -> bool {
    HEADER_FLAGS.iter().any(|(n, _)| *n == name)
        || HEADER_COMMANDS.iter().any(|(n, _)| *n == name)
        || HEADER_PARAM_TYPES.iter().any(|(n, _)| *n == name)
}

impl ublksrv_io_desc {
    /// The request's operation (`UBLK_IO_OP_*`): the header's `ublksrv_get_op`.
    #[inline]
    pub const fn op(&self) -> u8 {
        (self.op_flags & 0xff) as u8
    }

    /// `op_flags >> 8`: the header's `ublksrv_get_flags`. Beware: the
    /// kernel sets the `UBLK_IO_F_*` flags at their own bits of `op_flags`
    /// (`UBLK_IO_F_FUA` is `1 << 13` there), so test `op_flags &
    /// UBLK_IO_F_FUA`, not `flags() & UBLK_IO_F_FUA` (always 0 for FUA).
    #[inline]
    pub const fn flags(&self) -> u32 {
        self.op_flags >> 8
    }

    /// Sectors (512 bytes) to transfer; a union with `nr_zones` from 6.6.
    #[inline]
    pub fn nr_sectors(&self) -> u32 {
        #[cfg(ublk_sys_io_desc_union)]
        // SAFETY: both union members are plain __u32; any bit pattern is valid.
        return unsafe { self.__bindgen_anon_1.nr_sectors };
        #[cfg(not(ublk_sys_io_desc_union))]
        return self.nr_sectors;
    }
}

impl ublksrv_io_cmd {
    /// The payload of an io command (`FETCH_REQ`, `COMMIT_AND_FETCH_REQ`, ...):
    /// queue, tag, result of the previous request, and the tag's buffer.
    #[inline]
    pub fn new(q_id: u16, tag: u16, result: i32, addr: u64) -> Self {
        let mut c = Self { q_id, tag, result, ..Default::default() };
        c.set_addr(addr);
        c
    }

    /// The buffer address; a union with `zone_append_lba` from 6.6.
    #[inline]
    pub fn addr(&self) -> u64 {
        #[cfg(ublk_sys_io_cmd_union)]
        // SAFETY: both union members are plain __u64; any bit pattern is valid.
        return unsafe { self.__bindgen_anon_1.addr };
        #[cfg(not(ublk_sys_io_cmd_union))]
        return self.addr;
    }

    /// Sets the buffer address (`zone_append_lba` shares the bytes).
    #[inline]
    pub fn set_addr(&mut self, addr: u64) {
        #[cfg(ublk_sys_io_cmd_union)]
        {
            self.__bindgen_anon_1.addr = addr;
        }
        #[cfg(not(ublk_sys_io_cmd_union))]
        {
            self.addr = addr;
        }
    }
}

impl ublksrv_ctrl_cmd {
    /// Sets `dev_path_len` (6.3+: the length of the char device path that
    /// GET_DEV_INFO2 and unprivileged devices carry ahead of the payload).
    /// Headers before 6.3 name those bytes `data[1]`: the field is the first
    /// two bytes of it (byte 24 of the command, in the machine's byte
    /// order), which is what is set there, so a build against an old
    /// header sends what the kernel reads. Always returns true.
    pub fn set_dev_path_len(&mut self, len: u16) -> bool {
        #[cfg(ublk_sys_ctrl_cmd_dev_path_len)]
        {
            self.dev_path_len = len;
            return true;
        }
        #[cfg(not(ublk_sys_ctrl_cmd_dev_path_len))]
        {
            let mut b = self.data[1].to_ne_bytes();
            b[..2].copy_from_slice(&len.to_ne_bytes());
            self.data[1] = u64::from_ne_bytes(b);
            return true;
        }
    }
}

impl ublksrv_ctrl_dev_info {
    /// Owner uid and gid of the device, as the kernel (6.3+) records them
    /// at ADD_DEV. Headers before 6.3 call those 8 bytes `reserved0`; they
    /// are read from there, so the answer does not depend on the header's
    /// age (kernels before 6.3 leave them 0). Always `Some`.
    pub fn owner(&self) -> Option<(u32, u32)> {
        #[cfg(ublk_sys_dev_info_owner)]
        return Some((self.owner_uid, self.owner_gid));
        #[cfg(not(ublk_sys_dev_info_owner))]
        {
            let b = self.reserved0.to_ne_bytes();
            return Some((u32::from_ne_bytes([b[0], b[1], b[2], b[3]]), u32::from_ne_bytes([b[4], b[5], b[6], b[7]])));
        }
    }
}

/// `ublk_param_devt`: the char and block device numbers the kernel reports in
/// GET_PARAMS (6.2+ headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Devt {
    pub char_major: u32,
    pub char_minor: u32,
    pub disk_major: u32,
    pub disk_minor: u32,
}

impl ublk_params {
    /// The read-only devt part, when this header has it.
    pub fn devt(&self) -> Option<Devt> {
        #[cfg(ublk_sys_params_devt)]
        return Some(Devt {
            char_major: self.devt.char_major,
            char_minor: self.devt.char_minor,
            disk_major: self.devt.disk_major,
            disk_minor: self.devt.disk_minor,
        });
        #[cfg(not(ublk_sys_params_devt))]
        return None;
    }
}

/// The header's `ublk_sqe_addr_to_auto_buf_reg` (6.16+): unpacks `sqe->addr`.
#[cfg(ublk_sys_auto_buf_reg)]
#[inline]
pub const fn auto_buf_reg_from_sqe_addr(sqe_addr: u64) -> ublk_auto_buf_reg {
    ublk_auto_buf_reg {
        index: sqe_addr as u16,
        flags: (sqe_addr >> 16) as u8,
        reserved0: (sqe_addr >> 24) as u8,
        reserved1: (sqe_addr >> 32) as u32,
    }
}

/// The header's `ublk_auto_buf_reg_to_sqe_addr` (6.16+): packs into `sqe->addr`.
#[cfg(ublk_sys_auto_buf_reg)]
#[inline]
pub const fn auto_buf_reg_to_sqe_addr(buf: &ublk_auto_buf_reg) -> u64 {
    buf.index as u64 | (buf.flags as u64) << 16 | (buf.reserved0 as u64) << 24 | (buf.reserved1 as u64) << 32
}

/// The header's `ublk_shmem_zc_addr` (7.1+).
#[cfg(ublk_sys_shmem_zc)]
#[inline]
pub const fn shmem_zc_addr(index: u16, offset: u32) -> u64 {
    ((index as u64) << UBLK_SHMEM_ZC_IDX_OFF) | offset as u64
}

/// The header's `ublk_shmem_zc_index` (7.1+).
#[cfg(ublk_sys_shmem_zc)]
#[inline]
pub const fn shmem_zc_index(addr: u64) -> u16 {
    ((addr >> UBLK_SHMEM_ZC_IDX_OFF) & UBLK_SHMEM_ZC_IDX_MASK as u64) as u16
}

/// The header's `ublk_shmem_zc_offset` (7.1+).
#[cfg(ublk_sys_shmem_zc)]
#[inline]
pub const fn shmem_zc_offset(addr: u64) -> u32 {
    (addr & UBLK_SHMEM_ZC_OFF_MASK as u64) as u32
}

#[cfg(test)]
mod tests;

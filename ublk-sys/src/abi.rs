//! The ABI values a server needs to negotiate with every kernel from 6.1 to
//! the newest, whatever header this crate was built from.
//!
//! What the library does on a kernel must follow that kernel's answer
//! (`GET_FEATURES`, the flags `ADD_DEV` returns), never the age of the build
//! machine's `linux/ublk_cmd.h`: a build against Debian 12's 6.1 header must
//! still send `GET_FEATURES`, use the ioctl encoding and get user copy on a
//! 7.x kernel. The few numbers that takes (command numbers, flag bits, a
//! state) are in [`TABLE`], one row each with the kernel that introduced it.
//! The kernel's ABI never changes a published number, and the crate's tests
//! compare every row with the header it is built against: equal where the
//! header defines the name, and defined by every header at least as new as
//! the row's kernel (CI builds against the newest header of the matrix), so
//! the table cannot drift from the kernel's own values.
//!
//! The ioctl encodings are computed with the kernel's `_IOC` layout from the
//! size of this build's `struct ublksrv_ctrl_cmd`, as the header's `_IOR` and
//! `_IOWR` do.

/// `_IOC_READ` (asm-generic/ioctl.h).
const IOC_READ: u32 = 2;
/// `_IOC_WRITE`.
const IOC_WRITE: u32 = 1;

/// `_IOC(dir, 'u', nr, sizeof(struct ublksrv_ctrl_cmd))`.
const fn ioc_ctrl(dir: u32, nr: u32) -> u32 {
    (dir << 30) | ((core::mem::size_of::<crate::ublksrv_ctrl_cmd>() as u32) << 16) | ((b'u' as u32) << 8) | nr
}

/// `_IOR('u', nr, struct ublksrv_ctrl_cmd)`.
const fn ior(nr: u32) -> u32 {
    ioc_ctrl(IOC_READ, nr)
}

/// `_IOWR('u', nr, struct ublksrv_ctrl_cmd)`.
const fn iowr(nr: u32) -> u32 {
    ioc_ctrl(IOC_READ | IOC_WRITE, nr)
}

/// `_IOWR('u', nr, struct ublksrv_io_cmd)`: an I/O command on `/dev/ublkcN`.
const fn iowr_io(nr: u32) -> u32 {
    ((IOC_READ | IOC_WRITE) << 30) | ((core::mem::size_of::<crate::ublksrv_io_cmd>() as u32) << 16) | ((b'u' as u32) << 8) | nr
}

/// `UBLK_CMD_GET_DEV_INFO2` (6.3): the legacy number.
pub const UBLK_CMD_GET_DEV_INFO2: u32 = 0x12;
/// `UBLK_U_CMD_GET_DEV_INFO2` (6.4).
pub const UBLK_U_CMD_GET_DEV_INFO2: u32 = ior(0x12);
/// `UBLK_U_CMD_GET_FEATURES` (6.5): what the kernel supports.
pub const UBLK_U_CMD_GET_FEATURES: u32 = ior(0x13);
/// `UBLK_U_CMD_DEL_DEV_ASYNC` (6.9).
pub const UBLK_U_CMD_DEL_DEV_ASYNC: u32 = ior(0x14);
/// `UBLK_U_CMD_UPDATE_SIZE` (6.16).
pub const UBLK_U_CMD_UPDATE_SIZE: u32 = iowr(0x15);
/// `UBLK_U_CMD_QUIESCE_DEV` (6.16).
pub const UBLK_U_CMD_QUIESCE_DEV: u32 = iowr(0x16);
/// `UBLK_U_CMD_TRY_STOP_DEV` (7.0).
pub const UBLK_U_CMD_TRY_STOP_DEV: u32 = iowr(0x17);

/// Every `UBLK_F_*` flag up to 7.3, with its bit.
pub const UBLK_F_SUPPORT_ZERO_COPY: u64 = 1 << 0;
/// See [`TABLE`].
pub const UBLK_F_URING_CMD_COMP_IN_TASK: u64 = 1 << 1;
/// See [`TABLE`].
pub const UBLK_F_NEED_GET_DATA: u64 = 1 << 2;
/// See [`TABLE`].
pub const UBLK_F_USER_RECOVERY: u64 = 1 << 3;
/// See [`TABLE`].
pub const UBLK_F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
/// See [`TABLE`].
pub const UBLK_F_UNPRIVILEGED_DEV: u64 = 1 << 5;
/// See [`TABLE`].
pub const UBLK_F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
/// See [`TABLE`].
pub const UBLK_F_USER_COPY: u64 = 1 << 7;
/// See [`TABLE`].
pub const UBLK_F_ZONED: u64 = 1 << 8;
/// See [`TABLE`].
pub const UBLK_F_USER_RECOVERY_FAIL_IO: u64 = 1 << 9;
/// See [`TABLE`].
pub const UBLK_F_UPDATE_SIZE: u64 = 1 << 10;
/// See [`TABLE`].
pub const UBLK_F_AUTO_BUF_REG: u64 = 1 << 11;
/// See [`TABLE`].
pub const UBLK_F_QUIESCE: u64 = 1 << 12;
/// See [`TABLE`].
pub const UBLK_F_PER_IO_DAEMON: u64 = 1 << 13;
/// See [`TABLE`].
pub const UBLK_F_BUF_REG_OFF_DAEMON: u64 = 1 << 14;
/// See [`TABLE`].
pub const UBLK_F_BATCH_IO: u64 = 1 << 15;
/// See [`TABLE`].
pub const UBLK_F_INTEGRITY: u64 = 1 << 16;
/// See [`TABLE`].
pub const UBLK_F_SAFE_STOP_DEV: u64 = 1 << 17;
/// See [`TABLE`].
pub const UBLK_F_NO_AUTO_PART_SCAN: u64 = 1 << 18;
/// See [`TABLE`].
pub const UBLK_F_SHMEM_ZC: u64 = 1 << 19;
/// See [`TABLE`].
pub const UBLK_F_IO_DESC_SIZE: u64 = 1 << 20;

/// `UBLK_U_IO_REGISTER_IO_BUF` (6.15): registers a request's pages as a
/// fixed buffer of the ring the command is sent on, at the index in the
/// command's `addr` (zero copy, `UBLK_F_SUPPORT_ZERO_COPY`).
pub const UBLK_U_IO_REGISTER_IO_BUF: u32 = iowr_io(0x23);
/// `UBLK_U_IO_UNREGISTER_IO_BUF` (6.15): drops that registration.
pub const UBLK_U_IO_UNREGISTER_IO_BUF: u32 = iowr_io(0x24);

/// `UBLK_U_IO_PREP_IO_CMDS`, `UBLK_U_IO_COMMIT_IO_CMDS`,
/// `UBLK_U_IO_FETCH_IO_CMDS` (7.0): the batch commands, `_IOWR('u', nr,
/// struct ublk_batch_io)`, which is 16 bytes like `ublksrv_io_cmd`.
pub const UBLK_U_IO_PREP_IO_CMDS: u32 = iowr_io(0x25);
pub const UBLK_U_IO_COMMIT_IO_CMDS: u32 = iowr_io(0x26);
pub const UBLK_U_IO_FETCH_IO_CMDS: u32 = iowr_io(0x27);

/// `UBLK_BATCH_F_HAS_ZONE_LBA`, `UBLK_BATCH_F_HAS_BUF_ADDR`,
/// `UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK` (7.0): `ublk_batch_io.flags` of
/// PREP_IO_CMDS and COMMIT_IO_CMDS. Each element carries a zone-append LBA
/// or a buffer address (copy mode) after its header; the last one is
/// [`UBLK_AUTO_BUF_REG_FALLBACK`] for the whole batch, elements having no
/// flags of their own.
pub const UBLK_BATCH_F_HAS_ZONE_LBA: u16 = 1 << 0;
pub const UBLK_BATCH_F_HAS_BUF_ADDR: u16 = 1 << 1;
pub const UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK: u16 = 1 << 2;

/// `UBLK_IO_F_NEED_REG_BUF` (6.16): in a descriptor's `op_flags`, the
/// kernel could not register the request's buffer itself
/// (`UBLK_F_AUTO_BUF_REG` with [`UBLK_AUTO_BUF_REG_FALLBACK`]): the server
/// registers it.
pub const UBLK_IO_F_NEED_REG_BUF: u32 = 1 << 17;

/// `UBLK_AUTO_BUF_REG_FALLBACK` (6.16): in `ublk_auto_buf_reg.flags`, deliver
/// a request whose automatic registration failed (with
/// [`UBLK_IO_F_NEED_REG_BUF`]) instead of failing it.
pub const UBLK_AUTO_BUF_REG_FALLBACK: u8 = 1;

/// `sqe->addr` of FETCH/COMMIT under `UBLK_F_AUTO_BUF_REG` (6.16): buffer
/// `index` in bits 0-15, `flags` in 16-23, the rest zero (the header's
/// `ublk_auto_buf_reg_to_sqe_addr`; the kernel refuses non-zero reserved
/// bits).
pub const fn auto_buf_reg_sqe_addr(index: u16, flags: u8) -> u64 {
    index as u64 | (flags as u64) << 16
}

/// `UBLK_TAG_OFF` (6.5): under `UBLK_F_USER_COPY`, the tag's bit offset in
/// a request's position in `/dev/ublkcN` (above `UBLKSRV_IO_BUF_OFFSET`).
pub const UBLK_TAG_OFF: u64 = 25;

/// `UBLK_QID_OFF` (6.5): the queue id's bit offset, likewise.
pub const UBLK_QID_OFF: u64 = 41;

/// `UBLK_S_DEV_FAIL_IO` (6.13): a recovery device that fails I/O while its
/// server is gone.
pub const UBLK_S_DEV_FAIL_IO: u32 = 3;

/// One row of the table: the kernel's name, its value, and the first kernel
/// (major, minor) whose header defines it.
pub type Row = (&'static str, u64, (u32, u32));

/// Every value above, by kernel name, with the kernel that introduced it.
pub const TABLE: &[Row] = &[
    ("UBLK_CMD_GET_DEV_INFO2", UBLK_CMD_GET_DEV_INFO2 as u64, (6, 3)),
    // Numbered in 6.3, encoded from the 6.4 header on.
    ("UBLK_U_CMD_GET_DEV_INFO2", UBLK_U_CMD_GET_DEV_INFO2 as u64, (6, 4)),
    ("UBLK_U_CMD_GET_FEATURES", UBLK_U_CMD_GET_FEATURES as u64, (6, 5)),
    ("UBLK_U_CMD_DEL_DEV_ASYNC", UBLK_U_CMD_DEL_DEV_ASYNC as u64, (6, 9)),
    ("UBLK_U_CMD_UPDATE_SIZE", UBLK_U_CMD_UPDATE_SIZE as u64, (6, 16)),
    ("UBLK_U_CMD_QUIESCE_DEV", UBLK_U_CMD_QUIESCE_DEV as u64, (6, 16)),
    ("UBLK_U_CMD_TRY_STOP_DEV", UBLK_U_CMD_TRY_STOP_DEV as u64, (7, 0)),
    ("UBLK_F_SUPPORT_ZERO_COPY", UBLK_F_SUPPORT_ZERO_COPY, (6, 0)),
    ("UBLK_F_URING_CMD_COMP_IN_TASK", UBLK_F_URING_CMD_COMP_IN_TASK, (6, 0)),
    ("UBLK_F_NEED_GET_DATA", UBLK_F_NEED_GET_DATA, (6, 0)),
    ("UBLK_F_USER_RECOVERY", UBLK_F_USER_RECOVERY, (6, 1)),
    ("UBLK_F_USER_RECOVERY_REISSUE", UBLK_F_USER_RECOVERY_REISSUE, (6, 1)),
    ("UBLK_F_UNPRIVILEGED_DEV", UBLK_F_UNPRIVILEGED_DEV, (6, 3)),
    ("UBLK_F_CMD_IOCTL_ENCODE", UBLK_F_CMD_IOCTL_ENCODE, (6, 4)),
    ("UBLK_F_USER_COPY", UBLK_F_USER_COPY, (6, 5)),
    ("UBLK_F_ZONED", UBLK_F_ZONED, (6, 6)),
    ("UBLK_F_USER_RECOVERY_FAIL_IO", UBLK_F_USER_RECOVERY_FAIL_IO, (6, 13)),
    ("UBLK_F_UPDATE_SIZE", UBLK_F_UPDATE_SIZE, (6, 16)),
    ("UBLK_F_AUTO_BUF_REG", UBLK_F_AUTO_BUF_REG, (6, 16)),
    ("UBLK_F_QUIESCE", UBLK_F_QUIESCE, (6, 16)),
    ("UBLK_F_PER_IO_DAEMON", UBLK_F_PER_IO_DAEMON, (6, 16)),
    ("UBLK_F_BUF_REG_OFF_DAEMON", UBLK_F_BUF_REG_OFF_DAEMON, (6, 17)),
    ("UBLK_F_BATCH_IO", UBLK_F_BATCH_IO, (7, 0)),
    ("UBLK_F_INTEGRITY", UBLK_F_INTEGRITY, (7, 0)),
    ("UBLK_F_SAFE_STOP_DEV", UBLK_F_SAFE_STOP_DEV, (7, 0)),
    ("UBLK_F_NO_AUTO_PART_SCAN", UBLK_F_NO_AUTO_PART_SCAN, (7, 0)),
    ("UBLK_F_SHMEM_ZC", UBLK_F_SHMEM_ZC, (7, 1)),
    ("UBLK_F_IO_DESC_SIZE", UBLK_F_IO_DESC_SIZE, (7, 3)),
    ("UBLK_S_DEV_FAIL_IO", UBLK_S_DEV_FAIL_IO as u64, (6, 13)),
    ("UBLK_U_IO_REGISTER_IO_BUF", UBLK_U_IO_REGISTER_IO_BUF as u64, (6, 15)),
    ("UBLK_U_IO_UNREGISTER_IO_BUF", UBLK_U_IO_UNREGISTER_IO_BUF as u64, (6, 15)),
    ("UBLK_IO_F_NEED_REG_BUF", UBLK_IO_F_NEED_REG_BUF as u64, (6, 16)),
    ("UBLK_U_IO_PREP_IO_CMDS", UBLK_U_IO_PREP_IO_CMDS as u64, (7, 0)),
    ("UBLK_U_IO_COMMIT_IO_CMDS", UBLK_U_IO_COMMIT_IO_CMDS as u64, (7, 0)),
    ("UBLK_U_IO_FETCH_IO_CMDS", UBLK_U_IO_FETCH_IO_CMDS as u64, (7, 0)),
    ("UBLK_AUTO_BUF_REG_FALLBACK", UBLK_AUTO_BUF_REG_FALLBACK as u64, (6, 16)),
    ("UBLK_BATCH_F_HAS_ZONE_LBA", UBLK_BATCH_F_HAS_ZONE_LBA as u64, (7, 0)),
    ("UBLK_BATCH_F_HAS_BUF_ADDR", UBLK_BATCH_F_HAS_BUF_ADDR as u64, (7, 0)),
    ("UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK", UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK as u64, (7, 0)),
    ("UBLK_TAG_OFF", UBLK_TAG_OFF, (6, 5)),
    ("UBLK_QID_OFF", UBLK_QID_OFF, (6, 5)),
];

/// The name of flag `bit` (a single-bit mask) in [`TABLE`], if it is one.
pub fn flag_name(bit: u64) -> Option<&'static str> {
    TABLE.iter().find(|(n, v, _)| n.starts_with("UBLK_F_") && *v == bit).map(|(n, _, _)| *n)
}

/// The first kernel that defines `name`, as (major, minor).
pub fn since(name: &str) -> Option<(u32, u32)> {
    TABLE.iter().find(|(n, _, _)| *n == name).map(|(_, _, s)| *s)
}

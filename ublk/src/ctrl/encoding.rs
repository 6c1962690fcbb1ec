//! How control command opcodes are encoded ([`Encoding`]), and the
//! commands' names, legacy numbers and encoded opcodes.

use ublk_sys as sys;

/// How command opcodes are put in `sqe->cmd_op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The bare command numbers (`UBLK_CMD_*`, `UBLK_IO_*`): the only form 6.1–6.3 accept.
    Legacy,
    /// `_IOR`/`_IOWR('u', nr, struct)` (`UBLK_U_*`): 6.4+, and the only form
    /// kernels built with `CONFIG_BLKDEV_UBLK_LEGACY_OPCODES=n` accept.
    Ioctl,
}

/// A control command: its kernel name, legacy number and encoded opcode.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CtrlOp {
    pub name: &'static str,
    pub legacy: u32,
    pub encoded: u32,
}

macro_rules! ctrl_op {
    ($name:ident, $legacy:ident, $enc:ident) => {
        pub(crate) const $name: CtrlOp = CtrlOp { name: stringify!($name), legacy: sys::$legacy, encoded: sys::$enc };
    };
}

#[allow(non_upper_case_globals)]
pub(crate) mod ops {
    use super::*;
    ctrl_op!(GET_QUEUE_AFFINITY, UBLK_CMD_GET_QUEUE_AFFINITY, UBLK_U_CMD_GET_QUEUE_AFFINITY);
    ctrl_op!(GET_DEV_INFO, UBLK_CMD_GET_DEV_INFO, UBLK_U_CMD_GET_DEV_INFO);
    ctrl_op!(ADD_DEV, UBLK_CMD_ADD_DEV, UBLK_U_CMD_ADD_DEV);
    ctrl_op!(DEL_DEV, UBLK_CMD_DEL_DEV, UBLK_U_CMD_DEL_DEV);
    ctrl_op!(START_DEV, UBLK_CMD_START_DEV, UBLK_U_CMD_START_DEV);
    ctrl_op!(STOP_DEV, UBLK_CMD_STOP_DEV, UBLK_U_CMD_STOP_DEV);
    ctrl_op!(SET_PARAMS, UBLK_CMD_SET_PARAMS, UBLK_U_CMD_SET_PARAMS);
    ctrl_op!(GET_PARAMS, UBLK_CMD_GET_PARAMS, UBLK_U_CMD_GET_PARAMS);
    ctrl_op!(START_USER_RECOVERY, UBLK_CMD_START_USER_RECOVERY, UBLK_U_CMD_START_USER_RECOVERY);
    ctrl_op!(END_USER_RECOVERY, UBLK_CMD_END_USER_RECOVERY, UBLK_U_CMD_END_USER_RECOVERY);
}

/// A command that exists only encoded, from `sys::abi` (never from the
/// build's header, which may predate it).
pub(super) fn abi_op(name: &'static str, encoded: u32) -> CtrlOp {
    CtrlOp { name, legacy: encoded & 0xff, encoded }
}

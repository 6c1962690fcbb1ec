//! The queue's io_uring: how it is built, the io commands' SQEs, and the
//! eventfds that wake it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use ublk_sys as sys;

use crate::ctrl::Encoding;
use crate::error::{Error, Result};

/// An io command: kernel name, legacy number, encoded opcode.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IoOp {
    pub(crate) name: &'static str,
    legacy: u32,
    encoded: u32,
}

pub(crate) const FETCH_REQ: IoOp = IoOp { name: "FETCH_REQ", legacy: sys::UBLK_IO_FETCH_REQ, encoded: sys::UBLK_U_IO_FETCH_REQ };
pub(crate) const COMMIT_AND_FETCH_REQ: IoOp =
    IoOp { name: "COMMIT_AND_FETCH_REQ", legacy: sys::UBLK_IO_COMMIT_AND_FETCH_REQ, encoded: sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ };

/// The batch commands (7.0+) exist only ioctl-encoded.
pub(crate) const PREP_IO_CMDS: IoOp =
    IoOp { name: "PREP_IO_CMDS", legacy: sys::abi::UBLK_U_IO_PREP_IO_CMDS, encoded: sys::abi::UBLK_U_IO_PREP_IO_CMDS };
pub(crate) const COMMIT_IO_CMDS: IoOp =
    IoOp { name: "COMMIT_IO_CMDS", legacy: sys::abi::UBLK_U_IO_COMMIT_IO_CMDS, encoded: sys::abi::UBLK_U_IO_COMMIT_IO_CMDS };
pub(crate) const FETCH_IO_CMDS: IoOp =
    IoOp { name: "FETCH_IO_CMDS", legacy: sys::abi::UBLK_U_IO_FETCH_IO_CMDS, encoded: sys::abi::UBLK_U_IO_FETCH_IO_CMDS };

impl IoOp {
    pub(crate) fn opcode(&self, encoding: Encoding) -> u32 {
        match encoding {
            Encoding::Legacy => self.legacy,
            Encoding::Ioctl => self.encoded,
        }
    }
}

/// The io command SQE: `IORING_OP_URING_CMD` on the registered
/// `/dev/ublkcN` (fixed file 0), `cmd_op` at byte 8, the 16-byte
/// `ublksrv_io_cmd` at byte 48; user_data is the tag.
///
/// `sqe_addr` is the SQE's own `addr` (bytes 16..24, not the command's):
/// under `UBLK_F_AUTO_BUF_REG` the packed `ublk_auto_buf_reg` saying where
/// the kernel registers the request's buffer, else 0.
#[allow(clippy::too_many_arguments)]
pub(crate) fn io_sqe(op: IoOp, encoding: Encoding, q_id: u16, tag: u16, result: i32, addr: u64, sqe_addr: u64) -> squeue::Entry {
    let cmd = sys::ublksrv_io_cmd::new(q_id, tag, result, addr);
    opcode::UringCmd16::new(types::Fixed(0), op.opcode(encoding))
        .cmd(io_cmd_bytes(&cmd))
        .addr((sqe_addr != 0).then_some(sqe_addr))
        .build()
        .user_data(u64::from(tag))
}

/// `UBLK_U_IO_REGISTER_IO_BUF` (`register`) or `UBLK_U_IO_UNREGISTER_IO_BUF`
/// for request `tag` of queue `q_id`: the request's pages become (or stop
/// being) fixed buffer `index` of the ring this is submitted on. Only the
/// ioctl encoding exists (6.15+, which always has it). The unregistration's
/// completion is skipped on success: the ring issues it before the SQEs
/// that follow it, and it completes at once.
pub(crate) fn buf_reg_sqe(register: bool, q_id: u16, tag: u16, index: u16, user_data: u64) -> squeue::Entry {
    let op = if register { sys::abi::UBLK_U_IO_REGISTER_IO_BUF } else { sys::abi::UBLK_U_IO_UNREGISTER_IO_BUF };
    let cmd = sys::ublksrv_io_cmd::new(q_id, tag, 0, u64::from(index));
    let sqe = opcode::UringCmd16::new(types::Fixed(0), op).cmd(io_cmd_bytes(&cmd)).build().user_data(user_data);
    if register {
        sqe
    } else {
        sqe.flags(squeue::Flags::SKIP_SUCCESS)
    }
}

/// The 16 bytes of an io command, as they go to SQE bytes 48..64.
pub(crate) fn io_cmd_bytes(cmd: &sys::ublksrv_io_cmd) -> [u8; 16] {
    const _: () = assert!(std::mem::size_of::<sys::ublksrv_io_cmd>() == 16);
    // SAFETY: ublksrv_io_cmd is 16 bytes of plain integers without padding
    // (u16, u16, s32, u64; checked against C by ublk-sys's layout tests).
    unsafe { std::mem::transmute_copy(cmd) }
}

/// A queue ring: 64-byte SQEs (io commands carry 16 bytes at byte 48), with
/// the flags that cut wake-ups where the kernel has them (COOP_TASKRUN 5.19,
/// SINGLE_ISSUER 6.0, DEFER_TASKRUN 6.1), falling back step by step.
pub(crate) fn build_ring(entries: u32) -> Result<IoUring<squeue::Entry, cqueue::Entry>> {
    let tries: [fn(&mut io_uring::Builder); 3] = [
        |b| {
            b.setup_coop_taskrun().setup_taskrun_flag().setup_single_issuer().setup_defer_taskrun();
        },
        |b| {
            b.setup_coop_taskrun().setup_taskrun_flag();
        },
        |_| {},
    ];
    let mut last = None;
    for t in tries {
        let mut b = IoUring::builder();
        t(&mut b);
        match b.build(entries) {
            Ok(r) => return Ok(r),
            Err(e) => last = Some(e),
        }
    }
    Err(Error::os("creating the queue io_uring", last.unwrap()))
}

/// An eventfd: wakes queue threads at teardown, and a queue whose futures
/// were woken from another thread.
#[derive(Debug)]
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> Result<Self> {
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(Error::os("creating an eventfd", std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor we own.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    pub(crate) fn into_owned(self) -> OwnedFd {
        self.0
    }

    pub(crate) fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.0.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
    }
}

/// Empties an eventfd's counter (non-blocking).
pub(crate) fn drain_eventfd(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64; EAGAIN when empty.
    unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
}

/*
 * The one header ublk-sys is generated from.
 *
 * Everything below comes from the kernel's UAPI headers of one tree (the
 * system's linux-libc-dev by default, or $UBLK_SYS_KERNEL_HEADERS).  No value
 * is typed by hand: the UBLK_SYS_ENC_* macros re-encode the header's own
 * legacy command numbers with the kernel's own _IOR/_IOWR from
 * <asm-generic/ioctl.h>, so a build against a header that predates the
 * ioctl-encoded opcodes (6.1) can still speak them to a newer kernel.
 * bindgen evaluates these function-like macros through clang_macro_fallback.
 */
#include <linux/errno.h>     /* UBLK_IO_RES_ABORT is (-ENODEV) */
#include <linux/ioctl.h>     /* _IOR / _IOWR */
#include <linux/version.h>   /* LINUX_VERSION_CODE of this header tree */
#include <linux/ublk_cmd.h>

#define UBLK_SYS_LINUX_VERSION_CODE LINUX_VERSION_CODE

/* Control commands: the kernel encodes the GET_* ones with _IOR, the rest with _IOWR. */
#define UBLK_SYS_ENC_CMD_GET_QUEUE_AFFINITY _IOR('u', UBLK_CMD_GET_QUEUE_AFFINITY, struct ublksrv_ctrl_cmd)
#define UBLK_SYS_ENC_CMD_GET_DEV_INFO _IOR('u', UBLK_CMD_GET_DEV_INFO, struct ublksrv_ctrl_cmd)
#define UBLK_SYS_ENC_CMD_ADD_DEV _IOWR('u', UBLK_CMD_ADD_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_SYS_ENC_CMD_DEL_DEV _IOWR('u', UBLK_CMD_DEL_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_SYS_ENC_CMD_START_DEV _IOWR('u', UBLK_CMD_START_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_SYS_ENC_CMD_STOP_DEV _IOWR('u', UBLK_CMD_STOP_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_SYS_ENC_CMD_SET_PARAMS _IOWR('u', UBLK_CMD_SET_PARAMS, struct ublksrv_ctrl_cmd)
#define UBLK_SYS_ENC_CMD_GET_PARAMS _IOR('u', UBLK_CMD_GET_PARAMS, struct ublksrv_ctrl_cmd)
#define UBLK_SYS_ENC_CMD_START_USER_RECOVERY _IOWR('u', UBLK_CMD_START_USER_RECOVERY, struct ublksrv_ctrl_cmd)
#define UBLK_SYS_ENC_CMD_END_USER_RECOVERY _IOWR('u', UBLK_CMD_END_USER_RECOVERY, struct ublksrv_ctrl_cmd)
#ifdef UBLK_CMD_GET_DEV_INFO2
#define UBLK_SYS_ENC_CMD_GET_DEV_INFO2 _IOR('u', UBLK_CMD_GET_DEV_INFO2, struct ublksrv_ctrl_cmd)
#endif

/* I/O commands: all _IOWR on struct ublksrv_io_cmd. */
#define UBLK_SYS_ENC_IO_FETCH_REQ _IOWR('u', UBLK_IO_FETCH_REQ, struct ublksrv_io_cmd)
#define UBLK_SYS_ENC_IO_COMMIT_AND_FETCH_REQ _IOWR('u', UBLK_IO_COMMIT_AND_FETCH_REQ, struct ublksrv_io_cmd)
#define UBLK_SYS_ENC_IO_NEED_GET_DATA _IOWR('u', UBLK_IO_NEED_GET_DATA, struct ublksrv_io_cmd)

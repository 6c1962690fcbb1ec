/*
 * C side of ublk-sys's tests: the header's static inline helpers, called
 * through real functions so the Rust reimplementations can be compared with
 * what the C compiler makes of the same header.
 */
#include "wrapper.h"

__u8 ublk_sys_probe_get_op(const struct ublksrv_io_desc *iod)
{
	return ublksrv_get_op(iod);
}

__u32 ublk_sys_probe_get_flags(const struct ublksrv_io_desc *iod)
{
	return ublksrv_get_flags(iod);
}

#ifdef UBLK_AUTO_BUF_REG_FALLBACK
/* 6.16+: struct ublk_auto_buf_reg packed into sqe->addr. */
__u64 ublk_sys_probe_auto_buf_reg_to_sqe_addr(const struct ublk_auto_buf_reg *buf)
{
	return ublk_auto_buf_reg_to_sqe_addr(buf);
}

struct ublk_auto_buf_reg ublk_sys_probe_sqe_addr_to_auto_buf_reg(__u64 addr)
{
	return ublk_sqe_addr_to_auto_buf_reg(addr);
}
#endif

#ifdef UBLK_SHMEM_ZC_OFF_MASK
/* 7.1+: shared-memory zero-copy address packing. */
__u64 ublk_sys_probe_shmem_zc_addr(__u16 index, __u32 offset)
{
	return ublk_shmem_zc_addr(index, offset);
}

__u16 ublk_sys_probe_shmem_zc_index(__u64 addr)
{
	return ublk_shmem_zc_index(addr);
}

__u32 ublk_sys_probe_shmem_zc_offset(__u64 addr)
{
	return ublk_shmem_zc_offset(addr);
}
#endif

//! Checks the generated bindings against the C compiler's view of the same
//! header: every size, alignment, field offset and field size, every constant,
//! and the Rust reimplementations of the header's inline helpers. No expected
//! value is written here: both sides come from the header.

extern crate std;
use std::ffi::CStr;
use std::os::raw::{c_char, c_longlong, c_ulong};
use std::vec::Vec;

use crate::*;

mod generated {
    include!(concat!(env!("OUT_DIR"), "/layout_checks.rs"));
}

#[repr(C)]
struct ProbeLayout {
    name: *const c_char,
    a: c_ulong,
    b: c_ulong,
}

#[repr(C)]
struct ProbeValue {
    name: *const c_char,
    value: c_longlong,
}

extern "C" {
    static ublk_sys_probe_layout: [ProbeLayout; 0];
    static ublk_sys_probe_values: [ProbeValue; 0];
    fn ublk_sys_probe_get_op(iod: *const ublksrv_io_desc) -> u8;
    fn ublk_sys_probe_get_flags(iod: *const ublksrv_io_desc) -> u32;
}

fn c_layout() -> Vec<(std::string::String, usize, usize)> {
    let mut v = Vec::new();
    // SAFETY: the C table is a static array terminated by a null name.
    unsafe {
        let mut p = ublk_sys_probe_layout.as_ptr();
        while !(*p).name.is_null() {
            let n = CStr::from_ptr((*p).name).to_str().unwrap().into();
            v.push((n, (*p).a as usize, (*p).b as usize));
            p = p.add(1);
        }
    }
    v
}

fn c_values() -> Vec<(std::string::String, i128)> {
    let mut v = Vec::new();
    // SAFETY: the C table is a static array terminated by a null name.
    unsafe {
        let mut p = ublk_sys_probe_values.as_ptr();
        while !(*p).name.is_null() {
            let n = CStr::from_ptr((*p).name).to_str().unwrap().into();
            v.push((n, (*p).value as i128));
            p = p.add(1);
        }
    }
    v
}

#[test]
fn layouts_match_the_c_compiler() {
    let c = c_layout();
    let r = generated::RUST_LAYOUT;
    assert_eq!(c.len(), generated::N_LAYOUT);
    assert_eq!(c.len(), r.len());
    for ((cn, ca, cb), (rn, ra, rb)) in c.iter().zip(r) {
        assert_eq!(cn, rn);
        assert_eq!((ca, cb), (ra, rb), "{cn}: C says {ca}/{cb}, Rust says {ra}/{rb}");
    }
    // The structs the protocol depends on are all covered.
    for s in [
        "ublksrv_ctrl_cmd",
        "ublksrv_ctrl_dev_info",
        "ublksrv_io_desc",
        "ublksrv_io_cmd",
        "ublk_params",
        "ublk_param_basic",
        "ublk_param_discard",
    ] {
        assert!(c.iter().any(|(n, _, _)| n == s), "{s} missing from the probe");
    }
    std::println!("checked {} sizes/offsets against C", c.len());
}

#[test]
fn constants_match_the_c_compiler() {
    let c = c_values();
    let r = generated::RUST_VALUES;
    assert_eq!(c.len(), r.len());
    for ((cn, cv), (rn, rv)) in c.iter().zip(r) {
        assert_eq!(cn, rn);
        // C evaluates to long long: compare as the C type's bits.
        let rv = if *rv > i64::MAX as i128 { *rv - (1i128 << 64) } else { *rv };
        let cv = if *cv < 0 && rn.starts_with("UBLK_U_") { *cv + (1i128 << 32) } else { *cv };
        let rv2 = if rv < 0 && rn.starts_with("UBLK_U_") { rv + (1i128 << 32) } else { rv };
        assert_eq!(cv, rv2, "{cn}");
    }
    std::println!("checked {} constants against C", c.len());
}

#[test]
fn encoded_opcodes_match_iowr_of_the_legacy_numbers() {
    // Every UBLK_U_* the header defines and that 6.1 already numbers equals
    // wrapper.h's _IOR/_IOWR('u', legacy, struct) re-encoding, and the
    // re-encoded values are what a 6.1-header build uses.
    let c = c_values();
    let get = |n: &str| c.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
    let mut checked = 0;
    for (u, _) in HEADER_COMMANDS.iter().filter(|(n, _)| n.starts_with("UBLK_U_")) {
        let enc = std::format!("UBLK_SYS_ENC_{}", &u["UBLK_U_".len()..]);
        if let Some(e) = get(&enc) {
            assert_eq!(get(u), Some(e), "{u} != {enc}");
            checked += 1;
        }
    }
    // Whatever the header, the base opcodes exist and agree with C's encoding.
    assert_eq!(UBLK_U_IO_FETCH_REQ as i128, get("UBLK_SYS_ENC_IO_FETCH_REQ").unwrap() & 0xffff_ffff);
    assert_eq!(UBLK_U_CMD_ADD_DEV as i128, get("UBLK_SYS_ENC_CMD_ADD_DEV").unwrap() & 0xffff_ffff);
    assert_eq!(UBLK_U_CMD_GET_DEV_INFO as i128, get("UBLK_SYS_ENC_CMD_GET_DEV_INFO").unwrap() & 0xffff_ffff);
    // The _IOC_NR of each encoded opcode is the legacy number.
    assert_eq!(UBLK_U_IO_FETCH_REQ & 0xff, UBLK_IO_FETCH_REQ);
    assert_eq!(UBLK_U_IO_COMMIT_AND_FETCH_REQ & 0xff, UBLK_IO_COMMIT_AND_FETCH_REQ);
    std::println!("checked {checked} header opcodes against their re-encoding");
}

#[test]
fn inline_helpers_match_c() {
    let mut x: u32 = 0x1234_5678;
    for _ in 0..1000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let iod = ublksrv_io_desc { op_flags: x, ..Default::default() };
        // SAFETY: the C helpers only read the descriptor passed by reference.
        unsafe {
            assert_eq!(iod.op(), ublk_sys_probe_get_op(&iod));
            assert_eq!(iod.flags(), ublk_sys_probe_get_flags(&iod));
        }
    }
}

#[cfg(ublk_sys_auto_buf_reg)]
#[test]
fn auto_buf_reg_packing_matches_c() {
    extern "C" {
        fn ublk_sys_probe_auto_buf_reg_to_sqe_addr(b: *const ublk_auto_buf_reg) -> u64;
        fn ublk_sys_probe_sqe_addr_to_auto_buf_reg(a: u64) -> ublk_auto_buf_reg;
    }
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..1000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // SAFETY: plain value conversions in C.
        let c = unsafe { ublk_sys_probe_sqe_addr_to_auto_buf_reg(x) };
        let r = crate::auto_buf_reg_from_sqe_addr(x);
        assert_eq!(std::format!("{c:?}"), std::format!("{r:?}"));
        let back = unsafe { ublk_sys_probe_auto_buf_reg_to_sqe_addr(&c) };
        assert_eq!(back, crate::auto_buf_reg_to_sqe_addr(&r));
        // The header-independent packing the library uses (reserved bits 0).
        let z = ublk_auto_buf_reg { index: x as u16, flags: (x >> 16) as u8, reserved0: 0, reserved1: 0 };
        // SAFETY: as above.
        let c = unsafe { ublk_sys_probe_auto_buf_reg_to_sqe_addr(&z) };
        assert_eq!(c, crate::abi::auto_buf_reg_sqe_addr(z.index, z.flags));
    }
}

#[test]
fn io_cmd_accessors_round_trip() {
    let c = ublksrv_io_cmd::new(3, 7, -5, 0xdead_beef_000);
    assert_eq!((c.q_id, c.tag, c.result, c.addr()), (3, 7, -5, 0xdead_beef_000));
    let iod = ublksrv_io_desc { op_flags: 0x0102, start_sector: 9, ..Default::default() };
    assert_eq!((iod.op(), iod.flags(), iod.nr_sectors()), (2, 1, 0));
}

#[test]
fn capabilities_agree_with_the_header() {
    for (name, v) in HEADER_FLAGS {
        assert!(name.starts_with("UBLK_F_"));
        assert!(v.is_power_of_two(), "{name}");
    }
    // opt::X is Some exactly when the header defines X.
    assert_eq!(opt::UBLK_F_USER_COPY.is_some(), header_has("UBLK_F_USER_COPY"));
    assert_eq!(opt::UBLK_F_CMD_IOCTL_ENCODE.is_some(), header_has("UBLK_F_CMD_IOCTL_ENCODE"));
    assert_eq!(opt::UBLK_U_CMD_GET_FEATURES.is_some(), header_has("UBLK_U_CMD_GET_FEATURES"));
    assert_eq!(opt::UBLK_U_IO_FETCH_REQ, Some(UBLK_U_IO_FETCH_REQ));
    assert!(HEADER_LINUX_VERSION.0 >= 6);
}

#[cfg(ublk_sys_shmem_zc)]
#[test]
fn shmem_zc_packing_matches_c() {
    extern "C" {
        fn ublk_sys_probe_shmem_zc_addr(index: u16, offset: u32) -> u64;
        fn ublk_sys_probe_shmem_zc_index(addr: u64) -> u16;
        fn ublk_sys_probe_shmem_zc_offset(addr: u64) -> u32;
    }
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..1000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // SAFETY: plain value conversions in C.
        unsafe {
            assert_eq!(crate::shmem_zc_addr(x as u16, (x >> 16) as u32), ublk_sys_probe_shmem_zc_addr(x as u16, (x >> 16) as u32));
            assert_eq!(crate::shmem_zc_index(x), ublk_sys_probe_shmem_zc_index(x));
            assert_eq!(crate::shmem_zc_offset(x), ublk_sys_probe_shmem_zc_offset(x));
        }
    }
}

/// The header this build used, for failure messages (the build script's path).
const HEADER_FILE: &str = env!("UBLK_SYS_HEADER");

#[test]
fn abi_table_matches_the_header() {
    let c = c_values();
    let hv = (HEADER_LINUX_VERSION.0, HEADER_LINUX_VERSION.1);
    let mut checked = 0;
    for (name, val, since) in crate::abi::TABLE {
        match c.iter().find(|(n, _)| n == name) {
            Some((_, v)) => {
                assert_eq!(*v, *val as i128, "abi::{name} differs from the header {HEADER_FILE}");
                checked += 1;
            }
            None => assert!(
                hv < *since,
                "the header {HEADER_FILE} (Linux {hv:?}) does not define {name}, which abi::TABLE says Linux {since:?} introduced"
            ),
        }
    }
    assert!(checked > 0, "no abi row could be checked against {HEADER_FILE}");
}

//! Negative tests at the raw SQE level, what one command holds: each trap a
//! ublk server can fall into by writing the wrong bytes, reproduced against
//! the real driver, with the kernel's actual answer asserted per kernel
//! generation: the payload at the wrong offset (a, b), a queue, tag or
//! buffer address out of range (d, e), legacy and ioctl-encoded opcodes
//! (g), and the Go team's SQEs byte for byte (i). Which thread may fetch
//! which tag, and when, is in traps_fetch.rs.
//!
//! The safe API makes these mistakes impossible, so these tests bypass it on
//! purpose: `ublk::Control` creates and deletes the devices, but every io
//! command is a hand-built 64- or 128-byte SQE (bytes, not builders) pushed
//! into an `io_uring` of our own (traps_util).
//!
//! Each answer is printed as `TRAP <name> kernel <release>: <answer>`, where
//! the answer is an errno name or `accepted` (the FETCH is parked in the
//! kernel: no CQE until a request or an abort). Every test collects all its
//! observations before asserting, so a failure lists everything seen.
//! Run with `--nocapture` to see the lines of passing tests.

mod traps_util;

use std::os::fd::AsRawFd;
use std::time::Duration;

use traps_util::*;
use ublk::{sys, DevInfo};
use ublk_tests::*;

// ---------------------------------------------------------------- (a), (b)

driver_test! {
    /// (a) The 16-byte ublksrv_io_cmd belongs at SQE bytes 48..63, also in a
    /// 128-byte SQE. Written at 64..79 of an SQE128 entry, ublk reads zeros
    /// at 48..63: q_id 0, tag 0, addr 0, and refuses the FETCH for the
    /// missing buffer. The same payload at 48 in the same ring is accepted.
    fn traps_a_payload_at_byte_64_instead_of_48() {
        let dev = TrapDev::new(2);
        let mut r = ring128();
        let mut obs = Obs::new("traps_a");
        let p0 = io_payload(0, 0, 0, dev.buf(0));
        let got = submit(&mut r, entry128(sqe(dev.fd(), dev.fetch_op(), 0, &[(64, &p0)])));
        obs.check("a_fetch_payload_at_64_sqe128", got, EINVAL);
        let p1 = io_payload(0, 1, 0, dev.buf(1));
        let got = submit(&mut r, entry128(sqe(dev.fd(), dev.fetch_op(), 0, &[(48, &p1)])));
        obs.check("a_fetch_payload_at_48_sqe128", got, Ans::Accepted);
        dev.finish(|| drop(r));
        obs.finish();
    }
}

driver_test! {
    /// (b) Payload at bytes 16..31 lands in addr (16..23), len (24..27) and
    /// uring_cmd_flags (28..31): the upper half of the buffer address becomes
    /// unknown uring_cmd_flags bits and io_uring_cmd_prep refuses the SQE
    /// before ublk sees it. The two other io_uring-level traps too: non-zero
    /// __pad1 (bytes 12..15) and stray uring_cmd_flags with a correct payload.
    fn traps_b_payload_at_bytes_16_to_31() {
        let dev = TrapDev::new(2);
        let mut r = ring64();
        let mut obs = Obs::new("traps_b");
        let addr = dev.buf(0);
        assert_ne!(addr >> 32, 0, "the trap needs a buffer address above 4 GiB (upper half non-zero)");
        let p = io_payload(0, 0, 0, addr);
        let got = submit(&mut r, entry64(sqe(dev.fd(), dev.fetch_op(), 0, &[(16, &p)])));
        obs.check("b_fetch_payload_at_16", got, EINVAL);
        let got = submit(&mut r, entry64(sqe(dev.fd(), dev.fetch_op(), 0, &[(48, &p), (12, &1u32.to_le_bytes())])));
        obs.check("b_fetch_pad1_nonzero", got, EINVAL);
        let got = submit(&mut r, entry64(sqe(dev.fd(), dev.fetch_op(), 0, &[(48, &p), (28, &0x100u32.to_le_bytes())])));
        obs.check("b_fetch_uring_cmd_flags_0x100", got, EINVAL);
        // Nothing of the above reached ublk: the tag is still free.
        let got = submit(&mut r, dev.io(dev.fetch_op(), 0, 0, addr));
        obs.check("b_fetch_correct_after", got, Ans::Accepted);
        dev.finish(|| drop(r));
        obs.finish();
    }
}

// ---------------------------------------------------------------- (d), (e)

driver_test! {
    /// (d) q_id >= nr_hw_queues and tag >= queue_depth: -EINVAL everywhere.
    /// (e) buffer address 0 on a device without USER_COPY/NEED_GET_DATA:
    /// -EINVAL everywhere.
    fn traps_d_e_bad_queue_tag_and_null_buffer() {
        let dev = TrapDev::new(2);
        assert_eq!(dev.info.nr_hw_queues, 1);
        let mut r = ring64();
        let mut obs = Obs::new("traps_d_e");
        let f = dev.fetch_op();
        obs.check("d_fetch_qid_1_of_1", submit(&mut r, dev.io(f, 1, 0, dev.buf(0))), EINVAL);
        obs.check("d_fetch_qid_0xffff", submit(&mut r, dev.io(f, 0xffff, 0, dev.buf(0))), EINVAL);
        obs.check("d_fetch_tag_2_of_2", submit(&mut r, dev.io(f, 0, 2, dev.buf(0))), EINVAL);
        obs.check("d_fetch_tag_0xffff", submit(&mut r, dev.io(f, 0, 0xffff, dev.buf(0))), EINVAL);
        obs.check("e_fetch_addr_0", submit(&mut r, dev.io(f, 0, 0, 0)), EINVAL);
        obs.check("e_fetch_tag0_after_refusals", submit(&mut r, dev.io(f, 0, 0, dev.buf(0))), Ans::Accepted);
        dev.finish(|| drop(r));
        obs.finish();
    }
}

// ---------------------------------------------------------------- (g)

driver_test! {
    /// (g) Opcode encodings. 6.1 compares cmd_op with the bare numbers, so the
    /// ioctl-encoded FETCH (0xc0107520) falls to `default:` (-EINVAL) and an
    /// encoded control command is -EOPNOTSUPP (or -ENODEV when dev_id does not
    /// name a device, as for GET_FEATURES). 6.4+ dispatch on _IOC_NR and take
    /// both (with CONFIG_BLKDEV_UBLK_LEGACY_OPCODES=y, Debian's default).
    /// Also: a control command on a ring without SQE128 is -EINVAL everywhere.
    fn traps_g_legacy_and_encoded_opcodes() {
        let dev = TrapDev::new(2);
        let mut r = ring64();
        let mut obs = Obs::new("traps_g");
        let g = gen();
        assert_eq!(sys::UBLK_U_IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(sys::UBLK_IO_FETCH_REQ, 0x20);
        let enc = if g == Gen::Legacy { EINVAL } else { Ans::Accepted };
        obs.check("g_fetch_encoded_0xc0107520", submit(&mut r, dev.io(sys::UBLK_U_IO_FETCH_REQ, 0, 0, dev.buf(0))), enc);
        obs.check("g_fetch_legacy_0x20", submit(&mut r, dev.io(sys::UBLK_IO_FETCH_REQ, 0, 1, dev.buf(1))), Ans::Accepted);

        let ctl = std::fs::OpenOptions::new().read(true).write(true).open("/dev/ublk-control").unwrap();
        let mut c = ring128();
        let mut info = DevInfo::default();
        let p = ctrl_payload(dev.id, 64, &mut info as *mut DevInfo as u64);
        let get = |op: u32| entry128(sqe(ctl.as_raw_fd(), op, 0, &[(48, &p)]));
        obs.check("g_ctrl_get_dev_info_legacy_0x02", submit_ctrl(&mut c, get(sys::UBLK_CMD_GET_DEV_INFO)), OK);
        assert_eq!(info.dev_id, dev.id);
        let enc = if g == Gen::Legacy { Ans::Res(-libc::EOPNOTSUPP) } else { OK };
        obs.check("g_ctrl_get_dev_info_encoded_0x80207502", submit_ctrl(&mut c, get(sys::UBLK_U_CMD_GET_DEV_INFO)), enc);
        let mut feats = 0u64;
        let fp = ctrl_payload(u32::MAX, 8, &mut feats as *mut u64 as u64);
        let gf = sqe::<128>(ctl.as_raw_fd(), 0x8020_7513, 0, &[(48, &fp)]);
        let want = if g == Gen::Legacy { Ans::Res(-libc::ENODEV) } else { OK };
        obs.check("g_ctrl_get_features_0x80207513", submit_ctrl(&mut c, entry128(gf)), want);
        // A control command in a 64-byte SQE: only 16 of its 32 bytes fit.
        let mut c64 = ring64();
        let short = entry64(sqe(ctl.as_raw_fd(), sys::UBLK_CMD_GET_DEV_INFO, 0, &[(48, &p[..16])]));
        obs.check("g_ctrl_get_dev_info_without_sqe128", submit_for(&mut c64, short, Duration::from_secs(10)), EINVAL);
        drop((c, c64, ctl));
        dev.finish(|| drop(r));
        obs.finish();
    }
}

// ---------------------------------------------------------------- (i)

driver_test! {
    /// (i) The Go team's SQEs, byte for byte: opcode 46, cmd_op 0xC0107520 at
    /// 8..11, len 16 at 24..27, the ublksrv_io_cmd {q_id 0, tag T, result 1,
    /// addr buf} at 16..31, at 48..63, and at 64..79 (SQE128 ring). Only
    /// 48..63 is right, and on 6.1 even that fails for the encoded opcode.
    fn traps_i_go_team_sqes() {
        let dev = TrapDev::new(2);
        let mut r = ring64();
        let mut r128 = ring128();
        let mut obs = Obs::new("traps_i");
        let g = gen();
        let len16 = 16u32.to_le_bytes();
        let op = 0xC010_7520u32;
        let p0 = io_payload(0, 0, 1, dev.buf(0));
        let at16 = sqe::<64>(dev.fd(), op, 0, &[(24, &len16), (16, &p0)]);
        obs.check("i_go_payload_16_31", submit(&mut r, entry64(at16)), EINVAL);
        let at64 = sqe::<128>(dev.fd(), op, 0, &[(24, &len16), (64, &p0)]);
        obs.check("i_go_payload_64_79_sqe128", submit(&mut r128, entry128(at64)), EINVAL);
        let at48 = sqe::<64>(dev.fd(), op, 0, &[(24, &len16), (48, &p0)]);
        let want = if g == Gen::Legacy { EINVAL } else { Ans::Accepted };
        obs.check("i_go_payload_48_63", submit(&mut r, entry64(at48)), want);
        println!("TRAP i_go_sqe_48_63 bytes: {}", hex(&at48));
        dev.finish(|| drop((r, r128)));
        obs.finish();
    }
}

fn hex(b: &[u8]) -> String {
    b.chunks(8).map(|c| c.iter().map(|x| format!("{x:02x}")).collect::<String>()).collect::<Vec<_>>().join(" ")
}

//! Every bad input gets a one-line error naming the cause and the fix, and
//! leaves nothing behind.

use std::os::unix::process::CommandExt;
use std::process::Command;

use ublk::{DeviceBuilder, Error};
use ublk_tests::*;

/// Runs ublk-null with `args`, expects failure with `needle` in the error line.
fn refused(args: &[&str], needle: &str) {
    let (st, out, err) = run(bin("ublk-null").to_str().unwrap(), args);
    assert!(!st.success(), "ublk-null {args:?} should fail; stdout {out}");
    assert_eq!(st.code(), Some(1), "ublk-null {args:?}: {st}");
    let line = err.lines().find(|l| l.contains("error")).unwrap_or_else(|| panic!("no error line: {err}"));
    assert!(line.contains(needle), "ublk-null {args:?}: expected {needle:?} in {line:?}");
    assert!(out.trim().is_empty(), "no device may be reported: {out}");
    assert_no_devices();
}

driver_test! {
    fn bad_queue_depth_size_and_block_size() {
        refused(&["--queues", "0"], "0 queues; use at least 1");
        refused(&["--queues", "5000"], "above the kernel's maximum");
        refused(&["--depth", "0"], "is not in 1..=4096");
        refused(&["--depth", "4097"], "is not in 1..=4096");
        refused(&["--size", "1000"], "not a positive multiple of the block size 512");
        refused(&["--size", "1M", "--block-size", "768"], "not a power of two between 512 and 4096");
        refused(&["--size", "1M", "--block-size", "8192"], "not a power of two between 512 and 4096");
        refused(&["--size", "1M", "--block-size", "256"], "not a power of two between 512 and 4096");
    }
}

driver_test! {
    fn bad_id_already_in_use() {
        let d = Daemon::start("ublk-null", &["--id", "7", "--size", "16M"]);
        assert_eq!(d.dev.to_str().unwrap(), "/dev/ublkb7");
        let (st, out, err) = run(bin("ublk-null").to_str().unwrap(), &["--id", "7", "--size", "16M"]);
        assert_eq!(st.code(), Some(1), "{out} {err}");
        assert!(err.contains("ublk device 7 already exists"), "{err}");
        // The first device is untouched.
        assert_eq!(ublk_devices(), vec![7]);
        let (st, _) = d.terminate();
        assert!(st.success());
        assert_no_devices();
    }
}

driver_test! {
    fn bad_no_control_device_names_the_module() {
        // A private mount namespace with an empty /dev: as if ublk_drv were not loaded.
        let (st, _out, err) = run(
            "unshare",
            &["-m", "sh", "-c", &format!("mount -t tmpfs none /dev && exec {} --size 16M", bin("ublk-null").display())],
        );
        assert_eq!(st.code(), Some(1), "{err}");
        assert!(err.contains("/dev/ublk-control not found") && err.contains("modprobe ublk_drv"), "{err}");
        assert_no_devices();
    }
}

driver_test! {
    fn bad_not_permitted_as_nobody() {
        let out = Command::new(bin("ublk-null")).args(["--size", "16M"]).uid(65534).gid(65534).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        // The control node is root's: the error says so, and what grants access.
        assert!(err.contains("/dev/ublk-control") && err.contains("permission denied") && err.contains("root"), "{err}");
        assert!(err.contains(r#"MODE="0666""#) && err.contains("chmod 0666"), "the fix is named: {err}");
        assert_no_devices();
    }
}

driver_test! {
    fn bad_feature_the_kernel_lacks() {
        let before = resources();
        // A flag bit no kernel defines yet is refused before the kernel is asked.
        let r = DeviceBuilder::new().size(16 << 20).flags(1 << 62).create();
        match r {
            Err(Error::Unsupported { .. }) => {}
            other => panic!("expected Unsupported, got {other:?}"),
        }
        let msg = DeviceBuilder::new().size(16 << 20).flags(1 << 62).create().unwrap_err().to_string();
        assert!(msg.contains("not supported") && msg.contains("bit 62") && msg.contains("drop it"), "{msg}");
        assert_no_devices();
        assert_eq!(before, resources(), "resources leaked");
        // And a real one where the kernel predates it: USER_RECOVERY_FAIL_IO is 6.13+.
        {
            let f = ublk::sys::abi::UBLK_F_USER_RECOVERY_FAIL_IO;
            let r = DeviceBuilder::new().size(16 << 20).flags(f | ublk::sys::UBLK_F_USER_RECOVERY).create();
            if kernel_version() < (6, 13) {
                let e = r.unwrap_err();
                assert!(matches!(e, Error::Unsupported { .. }), "{e}");
                // Named, with the kernel that has it (6.5+ report what they offer).
                if kernel_version() >= (6, 5) {
                    assert!(e.to_string().contains("UBLK_F_USER_RECOVERY_FAIL_IO"), "{e}");
                }
            } else {
                drop(r.expect("6.13+ has USER_RECOVERY_FAIL_IO"));
            }
            assert_no_devices();
        }
    }
}

driver_test! {
    /// The opcode encoding follows the kernel: legacy on 6.1 (no GET_FEATURES),
    /// ioctl-encoded where GET_FEATURES reports CMD_IOCTL_ENCODE.
    fn encoding_follows_the_kernel() {
        let c = ublk::Control::open().unwrap();
        let v = kernel_version();
        eprintln!("kernel {v:?}: encoding {:?}, features {:?}", c.encoding(), c.features().map(|f| f.names()));
        if v < (6, 5) {
            assert_eq!(c.features(), None);
            assert_eq!(c.encoding(), ublk::Encoding::Legacy);
        } else {
            let f = c.features().expect("GET_FEATURES on 6.5+");
            assert!(f.contains(ublk::sys::abi::UBLK_F_CMD_IOCTL_ENCODE));
            assert_eq!(c.encoding(), ublk::Encoding::Ioctl);
        }
    }
}

driver_test! {
    /// When the kernel refuses a command, the error names the command, the
    /// device, the errno and the driver's likely causes.
    fn kernel_refusal_names_command_errno_and_causes() {
        let mut c = ublk::Control::open().unwrap();
        let info = c.add_dev(&small_dev_info(0)).unwrap();
        let id = info.dev_id;
        // 8 KiB logical blocks: above the page size, which every kernel refuses.
        let mut p = ublk::Params::new(1 << 20, 512, 64 << 10).unwrap();
        p.logical_bs_shift = 13;
        p.physical_bs_shift = 13;
        let e = c.set_params(id, &p).unwrap_err();
        let msg = e.to_string();
        eprintln!("{msg}");
        assert_eq!(e.errno(), Some(libc::EINVAL), "{msg}");
        assert!(msg.contains("SET_PARAMS") && msg.contains(&format!("device {id}")), "{msg}");
        assert!(msg.contains("-EINVAL") && msg.contains("likely causes") && msg.contains("logical block size"), "{msg}");
        c.del_dev(id).unwrap();
        assert_no_devices();
    }
}

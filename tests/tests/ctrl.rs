//! Control commands against the real driver: typed results agree with what
//! sysfs and the block layer show, on every kernel, and the newer commands
//! work where the kernel has them.

use ublk::{Control, DataPath, DeviceBuilder, NullTarget};
use ublk_tests::*;

driver_test! {
    fn ctrl_queries_agree_with_the_kernel() {
        let dev = DeviceBuilder::new().queues(2).depth(64).size(256 << 20).block_size(4096).create().unwrap();
        let id = dev.id();
        dev.serve(&NullTarget, |dev, stop| {
            let mut c = Control::open().unwrap();
            let info = c.get_dev_info(id).unwrap();
            assert_eq!(ublk::ctrl::state_name(info.state), "LIVE");
            assert_eq!(info.dev_id, id);
            assert_eq!(info.queue_depth, 64);
            assert_eq!(usize::from(info.nr_hw_queues), 2.min(nproc()));
            assert_eq!(info.ublksrv_pid, std::process::id() as i32);
            let p = c.get_params(id).unwrap();
            assert_eq!(p.basic.dev_sectors, (256 << 20) >> 9);
            assert_eq!(p.basic.logical_bs_shift, 12);
            let ss = run_ok("blockdev", &["--getss", dev.block_path().to_str().unwrap()]);
            assert_eq!(ss.trim(), "4096");
            // The kernel fills in devt (and says so in `types`) from 6.2 on.
            let devt_reported = ublk::sys::opt::UBLK_PARAM_TYPE_DEVT.is_some_and(|t| p.types & t != 0);
            eprintln!("GET_PARAMS types {:#x} (devt {})", p.types, if devt_reported { "reported" } else { "not reported" });
            if let (true, Some(devt)) = (devt_reported, p.devt()) {
                let sys = std::fs::read_to_string(format!("/sys/class/block/ublkb{id}/dev")).unwrap();
                assert_eq!(sys.trim(), format!("{}:{}", devt.disk_major, devt.disk_minor));
                let sysc = std::fs::read_to_string(format!("/sys/class/ublk-char/ublkc{id}/dev")).unwrap();
                assert_eq!(sysc.trim(), format!("{}:{}", devt.char_major, devt.char_minor));
            }
            // Every CPU maps to some queue.
            let mut cpus: Vec<usize> = (0..info.nr_hw_queues).flat_map(|q| c.get_queue_affinity(id, q).unwrap()).collect();
            cpus.sort();
            cpus.dedup();
            assert_eq!(cpus.len(), nproc(), "affinity {cpus:?}");
            if kernel_version() >= (6, 3) {
                let i2 = c.get_dev_info2(id).unwrap();
                assert_eq!((i2.dev_id, i2.nr_hw_queues, i2.queue_depth, i2.state), (info.dev_id, info.nr_hw_queues, info.queue_depth, info.state));
            }
            // Unknown device ids are named as such.
            let e = c.get_dev_info(4000).unwrap_err();
            assert!(e.to_string().contains("no ublk device 4000"), "{e}");
            stop.stop();
        })
        .unwrap();
        assert_no_devices();
    }
}

driver_test! {
    fn ctrl_update_size_where_the_kernel_has_it() {
        let flag = ublk::sys::abi::UBLK_F_UPDATE_SIZE;
        let c = Control::open().unwrap();
        let has = c.features().is_some_and(|f| f.0 & flag != 0);
        eprintln!("kernel {:?}: UPDATE_SIZE {}", kernel_version(), if has { "offered" } else { "not offered" });
        if !has {
            // Asking anyway is refused up front, naming the feature.
            let e = DeviceBuilder::new().size(64 << 20).flags(flag).create().unwrap_err();
            assert!(e.to_string().contains("UBLK_F_UPDATE_SIZE"), "{e}");
            assert_no_devices();
            return;
        }
        let dev = DeviceBuilder::new().size(64 << 20).flags(flag).create().unwrap();
        let id = dev.id();
        dev.serve(&NullTarget, |dev, stop| {
            let mut c = Control::open().unwrap();
            c.update_size(id, (128 << 20) >> 9).unwrap();
            let path = dev.block_path();
            let t0 = std::time::Instant::now();
            loop {
                let sz = run_ok("blockdev", &["--getsize64", path.to_str().unwrap()]);
                if sz.trim() == (128u64 << 20).to_string() {
                    break;
                }
                assert!(t0.elapsed().as_secs() < 5, "size still {sz}");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            stop.stop();
        })
        .unwrap();
        assert_no_devices();
    }
}

driver_test! {
    /// What the library does on a kernel follows that kernel's answers, not
    /// the header it was built against: on 6.5+ GET_FEATURES is sent, the
    /// ioctl encoding chosen and DataPath::NoData gets USER_COPY, even in a
    /// build against the 6.1 header (`cargo xtask old-header` runs this test
    /// from such a build, with UBLK_EXPECT_HEADER=6.1).
    fn negotiation_follows_the_kernel_not_the_build_header() {
        let (a, b, _) = ublk::sys::HEADER_LINUX_VERSION;
        eprintln!("built against the Linux {a}.{b} header, running on {}", kernel_release());
        if let Ok(want) = std::env::var("UBLK_EXPECT_HEADER") {
            assert_eq!(format!("{a}.{b}"), want, "this run is meant to test a build against the {want} header");
        }
        let c = ublk::Control::open().unwrap();
        let v = kernel_version();
        if v < (6, 5) {
            assert_eq!(c.features(), None, "no GET_FEATURES before 6.5");
            assert_eq!(c.encoding(), ublk::Encoding::Legacy);
            return;
        }
        let f = c.features().expect("GET_FEATURES sent and answered on 6.5+");
        assert!(f.contains(ublk::sys::abi::UBLK_F_CMD_IOCTL_ENCODE) && f.contains(ublk::sys::abi::UBLK_F_USER_COPY), "{:?}", f.names());
        assert!(!f.names().iter().any(|n| n.starts_with("UBLK_F_BIT")), "unnamed feature bits: {:?}", f.names());
        assert_eq!(c.encoding(), ublk::Encoding::Ioctl);
        drop(c);
        let dev = DeviceBuilder::new().size(16 << 20).data_path(DataPath::NoData).create().unwrap();
        assert_eq!(dev.data_path(), DataPath::NoData, "USER_COPY negotiated: flags {:?}", ublk::Features(dev.info().flags).names());
        assert_ne!(dev.info().flags & ublk::sys::abi::UBLK_F_USER_COPY, 0);
        drop(dev);
        assert_no_devices();
    }
}

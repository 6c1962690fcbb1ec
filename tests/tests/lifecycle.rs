//! The device lifecycle flags and commands of the newer kernels, through the
//! library and the `ublk` CLI, on every kernel: what the kernel has is
//! exercised against it, what it lacks is refused with an error that names
//! the flag and the kernel that has it (and leaves nothing changed).
//!
//! * every flag the library does not implement is refused before ADD_DEV;
//! * UPDATE_SIZE (6.16+): `ublk resize`;
//! * QUIESCE_DEV (6.16+): `ublk quiesce` under fio, then `ublk recover`;
//! * USER_RECOVERY_FAIL_IO (6.13+): what an older kernel does with the bit;
//! * NO_AUTO_PART_SCAN (7.0+): `ublk add --no-part-scan`;
//! * SAFE_STOP_DEV / TRY_STOP_DEV (7.0+): `ublk del --safe`.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ublk::{Control, DevFlags, DeviceBuilder, Error, Support};
use ublk_tests::*;

const MIB: u64 = 1 << 20;

/// Deletes a test's devices if it panics half-way, so the next test starts clean.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            delete_all_devices();
        }
    }
}

/// Runs `ublk ARGS`, expects exit status 1 with every one of `needles` in
/// the error; returns the error text.
fn ublk_refused(args: &[&str], needles: &[&str]) -> String {
    let (st, out, err) = ublk(args);
    eprintln!("ublk {args:?}: {}", err.trim());
    assert_eq!(st.code(), Some(1), "ublk {args:?} should be refused: {st}\n{out}\n{err}");
    for n in needles {
        assert!(err.contains(n), "ublk {args:?}: expected {n:?} in the error: {err}");
    }
    err
}

/// The size of block device `dev` in bytes, as the block layer says.
fn disk_size(dev: &str) -> u64 {
    run_ok("blockdev", &["--getsize64", dev]).trim().parse().unwrap()
}

/// Waits (up to 5 s) until `dev` has `want` bytes.
fn wait_disk_size(dev: &str, want: u64) {
    let t0 = Instant::now();
    while disk_size(dev) != want {
        assert!(t0.elapsed() < Duration::from_secs(5), "{dev} has {} bytes, not {want}", disk_size(dev));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads requests completed by block device `ublkbN` (/sys/block/ublkbN/stat, field 1).
fn reads_completed(id: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/sys/block/ublkb{id}/stat")).unwrap_or_default();
    stat.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

driver_test! {
    /// Every flag up to bit 20 that `DevFlags::library_support` does not
    /// call implemented (ZONED, INTEGRITY, SHMEM_ZC, IO_DESC_SIZE, the data
    /// paths in progress...) is refused by `DeviceBuilder::create` before
    /// the kernel is asked, with `Error::FlagNotImplemented` naming the
    /// flag, its bit and why, alone or next to implemented flags; so is a
    /// device made elsewhere with one of them, by `recover`. Combinations
    /// the kernel refuses are named too.
    fn lifecycle_builder_refuses_flags_it_does_not_implement() {
        let _c = Cleanup;
        let before = resources();
        for name in ["UBLK_F_ZONED", "UBLK_F_INTEGRITY", "UBLK_F_SHMEM_ZC", "UBLK_F_IO_DESC_SIZE", "UBLK_F_NEED_GET_DATA"] {
            let f = (0..64).map(|b| 1u64 << b).find(|v| ublk::sys::abi::flag_name(*v) == Some(name)).unwrap();
            assert_ne!(DevFlags::from_bits_retain(f).library_support(), Support::Yes, "{name} is refused until it is implemented");
        }
        let mut refused = vec![];
        for bit in 0..=20u32 {
            let f = DevFlags::from_bits_retain(1u64 << bit);
            let support = f.library_support();
            let Some(why) = support.why() else { continue };
            let name = ublk::sys::abi::flag_name(f.bits()).unwrap();
            for with in [DevFlags::empty(), DevFlags::USER_RECOVERY | DevFlags::UPDATE_SIZE] {
                let e = DeviceBuilder::new().size(16 * MIB).flags(f | with).create().expect_err(name);
                match &e {
                    Error::FlagNotImplemented { flag, bit: b, why: w, in_progress, since } => {
                        assert_eq!((*flag, *b, *w), (name, bit, why), "{e}");
                        assert_eq!(*in_progress, matches!(support, Support::InProgress(_)), "{e}");
                        assert_eq!(*since, f.since(), "{e}");
                    }
                    other => panic!("{name}: expected FlagNotImplemented, got {other:?}"),
                }
                let msg = e.to_string();
                assert!(msg.contains(name) && msg.contains(why) && msg.contains("not implemented by this library"), "{msg}");
            }
            refused.push(name);
        }
        eprintln!("refused before ADD_DEV: {refused:?}");
        assert!(refused.len() >= 5, "{refused:?}");
        // Combinations of implemented flags that the kernel refuses.
        for (flags, needle) in [
            (DevFlags::USER_RECOVERY_REISSUE, "modes of user recovery"),
            (DevFlags::USER_RECOVERY | DevFlags::USER_RECOVERY_REISSUE | DevFlags::USER_RECOVERY_FAIL_IO, "exclude each other"),
            (DevFlags::QUIESCE, "needs UBLK_F_USER_RECOVERY"),
        ] {
            let e = DeviceBuilder::new().size(16 * MIB).flags(flags).create().expect_err(needle);
            assert!(matches!(e, Error::InvalidConfig { what: "flags", .. }) && e.to_string().contains(needle), "{e}");
        }
        assert_no_devices();
        assert_eq!(before, resources(), "resources leaked");
    }
}

driver_test! {
    /// `ublk resize -n N --size S` (UPDATE_SIZE, Linux 6.16+) on a loop
    /// device: the block layer sees the new size at once, I/O at the new
    /// end reaches the backing file, a shrink takes effect too, and sizes
    /// the backing file or the block size cannot serve are refused with
    /// the device unchanged; the library refuses a device that is not
    /// started (the kernel has no disk to resize, and kernels without the
    /// fix dereference it). Older kernels: the refusal names 6.16.
    fn lifecycle_resize_loop_device() {
        let _c = Cleanup;
        let backing = PathBuf::from("/tmp/lifecycle-resize.img");
        sparse_file(&backing, 32 * MIB);
        let d = Daemon::start("ublk", &["add", "-t", "loop", "--file", backing.to_str().unwrap()]);
        let (id, dev) = (d.id(), d.dev.to_str().unwrap().to_string());
        let ids = id.to_string();
        assert_eq!(disk_size(&dev), 32 * MIB);
        if !kernel_has(ublk::sys::abi::UBLK_F_UPDATE_SIZE) {
            ublk_refused(&["resize", "-n", &ids, "--size", "16M"], &["needs Linux 6.16", "UPDATE_SIZE", "keeps its size"]);
            assert_eq!(disk_size(&dev), 32 * MIB);
            skipped("resizing needs UBLK_F_UPDATE_SIZE (Linux 6.16); checked instead: `ublk resize` is refused and the size is unchanged");
            let (st, _) = d.terminate();
            assert!(st.success());
            assert_no_devices();
            return;
        }
        // `ublk add` asks for the flag where the kernel has it.
        let info = Control::open().unwrap().get_dev_info(id).unwrap();
        assert_ne!(info.flags & ublk::sys::abi::UBLK_F_UPDATE_SIZE, 0, "{:?}", ublk::Features(info.flags).names());
        ublk_refused(&["resize", "-n", &ids, "--size", "64M"], &["larger than device", "backing file", "truncate -s"]);
        ublk_refused(&["resize", "-n", &ids, "--size", "1000"], &["not a positive multiple", "block size 512"]);
        assert_eq!(disk_size(&dev), 32 * MIB, "a refused resize changed the size");
        // Grow the file, then the device.
        std::fs::OpenOptions::new().write(true).open(&backing).unwrap().set_len(64 * MIB).unwrap();
        let (st, out, err) = ublk(&["resize", "-n", &ids, "--size", "64M"]);
        assert!(st.success(), "ublk resize: {st}\n{out}\n{err}");
        wait_disk_size(&dev, 64 * MIB);
        let sectors = std::fs::read_to_string(format!("/sys/block/ublkb{id}/size")).unwrap();
        assert_eq!(sectors.trim(), (64 * MIB / 512).to_string(), "sysfs size");
        // I/O at the new end: the last MiB, written O_DIRECT and read back,
        // and found in the backing file.
        let pat = pattern(MIB as usize, 7);
        let f = OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(&dev).unwrap();
        let mut buf = vec![0u8; MIB as usize + 4096];
        aligned(&mut buf, MIB as usize).copy_from_slice(&pat);
        f.write_all_at(aligned(&mut buf, MIB as usize), 63 * MIB).expect("write at the new end");
        f.sync_all().unwrap();
        let mut back = vec![0u8; MIB as usize + 4096];
        f.read_exact_at(aligned(&mut back, MIB as usize), 63 * MIB).expect("read at the new end");
        assert!(aligned(&mut back, MIB as usize) == &pat[..], "data at the new end differs");
        drop(f);
        assert!(read_range(&backing, 63 * MIB, MIB as usize) == pat, "the backing file lacks what was written at the new end");
        let list: serde_json::Value = serde_json::from_str(&run_ok(bin("ublk").to_str().unwrap(), &["list", "--json"])).unwrap();
        let row = list.as_array().unwrap().iter().find(|r| r["id"] == id).unwrap().clone();
        assert_eq!(row["size"].as_u64(), Some(64 * MIB), "{row}");
        // Shrink.
        let (st, out, err) = ublk(&["resize", "-n", &ids, "--size", "16M"]);
        assert!(st.success(), "ublk resize: {st}\n{out}\n{err}");
        wait_disk_size(&dev, 16 * MIB);
        run_ok("dd", &[&format!("if={dev}"), "of=/dev/null", "bs=1M", "count=16", "iflag=direct", "status=none"]);
        let cfg = ublk_cli::config::DeviceConfig::load(id).unwrap().unwrap();
        assert_eq!(cfg.size, 16 * MIB, "the saved configuration keeps the new size");
        eprintln!("resized device {id}: 32M -> 64M (I/O at the end) -> 16M");
        let (st, _) = d.terminate();
        assert!(st.success());
        assert_no_devices();
        // A device that is not started has no disk: refused by the library.
        let dev = DeviceBuilder::new().size(16 * MIB).create().unwrap();
        let e = Control::open().unwrap().resize_dev(dev.id(), 32 * MIB).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { what: "resize", .. }) && e.to_string().contains("not started"), "{e}");
        drop(dev);
        let _ = std::fs::remove_file(&backing);
        assert_no_devices();
    }
}

driver_test! {
    /// A daemon upgrade without failing I/O: while fio writes with a
    /// crc32c verify on a `--recovery` loop device, `ublk quiesce -n N`
    /// (QUIESCE_DEV, Linux 6.16+) makes the old daemon let go (it exits
    /// cleanly, and the device is QUIESCED with fio's I/O waiting in the
    /// kernel), `ublk recover -n N` serves it with a new daemon, and fio
    /// finishes without an I/O error, its verify passing, then everything
    /// it wrote verifies again on the device and in the file. A device
    /// without --recovery is refused. Older kernels: the refusal names
    /// 6.16, and the device keeps serving.
    fn lifecycle_quiesce_under_fio_then_recover() {
        let _c = Cleanup;
        if !kernel_has(ublk::sys::abi::UBLK_F_QUIESCE) {
            let d = Daemon::start("ublk", &["add", "-t", "null", "--size", "16M", "--recovery"]);
            let id = d.id();
            ublk_refused(&["quiesce", "-n", &id.to_string()], &["needs Linux 6.16", "QUIESCE", "nothing was changed"]);
            assert_eq!(dev_state(id), "LIVE");
            run_ok("dd", &[&format!("if=/dev/ublkb{id}"), "of=/dev/null", "bs=4k", "count=16", "iflag=direct", "status=none"]);
            skipped("quiesce needs UBLK_F_QUIESCE (Linux 6.16); checked instead: `ublk quiesce` is refused and the device keeps serving");
            let (st, _) = d.terminate();
            assert!(st.success());
            assert_no_devices();
            return;
        }
        // Without --recovery no daemon could take over: refused.
        let plain = Daemon::start("ublk", &["add", "-t", "null", "--size", "16M"]);
        ublk_refused(&["quiesce", "-n", &plain.id().to_string()], &["without user recovery", "--recovery"]);
        assert_eq!(dev_state(plain.id()), "LIVE");
        let (st, _) = plain.terminate();
        assert!(st.success());

        let backing = PathBuf::from("/tmp/lifecycle-quiesce.img");
        sparse_file(&backing, 64 * MIB);
        let mut d = Daemon::start("ublk", &["add", "-t", "loop", "--file", backing.to_str().unwrap(), "--queues", "2", "--recovery"]);
        let (id, dev) = (d.id(), d.dev.to_str().unwrap().to_string());
        let info = Control::open().unwrap().get_dev_info(id).unwrap();
        assert_ne!(info.flags & ublk::sys::abi::UBLK_F_QUIESCE, 0, "`ublk add --recovery` asks for QUIESCE: {:?}", ublk::Features(info.flags).names());
        let log = PathBuf::from("/tmp/lifecycle-quiesce.fio");
        let mut fio = spawn_fio(&fio_rate_verify_args(&dev, 0, true, &["--do_verify=1"]), &log);
        wait_for_writes(&dev, 200, &mut fio);
        let t0 = Instant::now();
        let (st, out, err) = ublk(&["quiesce", "-n", &id.to_string()]);
        eprintln!("ublk quiesce ({:?}): {}{}", t0.elapsed(), out, err.trim());
        assert!(st.success(), "ublk quiesce: {st}\n{out}\n{err}");
        assert!(out.contains(&format!("quiesced device {id}")), "{out}");
        // The old daemon let go and exited by itself, cleanly.
        let st = wait_timeout(&mut d.child, Duration::from_secs(30)).expect("the quiesced daemon exits");
        assert!(st.success(), "the quiesced daemon exited with {st}");
        assert_eq!(dev_state(id), "QUIESCED");
        assert!(fio.try_wait().unwrap().is_none(), "fio ended while the device had no daemon: its I/O should wait");
        let r = Daemon::start("ublk", &["recover", "-n", &id.to_string()]);
        eprintln!("recovered {:?} after the quiesce began", t0.elapsed());
        assert_eq!(dev_state(id), "LIVE");
        finish_fio(&mut fio, &log, "the quiesce and recovery");
        verify_only_all(&dev, true, "verify_only on the device");
        let (st, _) = r.terminate();
        assert!(st.success(), "recovered daemon exited with {st}");
        assert_no_devices();
        verify_only_all(backing.to_str().unwrap(), false, "verify_only on the backing file");
        let _ = std::fs::remove_file(&backing);
        let _ = std::fs::remove_file(&log);
    }
}

driver_test! {
    /// USER_RECOVERY_FAIL_IO (6.13+) on the kernel itself: a kernel that
    /// offers it keeps the bit at ADD_DEV; an older one (6.12, 6.1) takes
    /// the device and silently drops the bit, so its I/O would wait for a
    /// new server instead of failing. That is why the library refuses the
    /// flag before ADD_DEV there, naming it and 6.13 (and `ublk add
    /// --recovery-fail-io` too, tested in recovery.rs with the I/O).
    fn lifecycle_fail_io_bit_on_kernels_without_it() {
        let _c = Cleanup;
        let flag = ublk::sys::abi::UBLK_F_USER_RECOVERY_FAIL_IO;
        let has = kernel_has(flag);
        let mut c = Control::open().unwrap();
        let info = c.add_dev(&small_dev_info(ublk::sys::abi::UBLK_F_USER_RECOVERY | flag)).expect("ADD_DEV with USER_RECOVERY_FAIL_IO");
        eprintln!("kernel {}: ADD_DEV asked for USER_RECOVERY|FAIL_IO, returned {:?}", kernel_release(), ublk::Features(info.flags).names());
        assert_ne!(info.flags & ublk::sys::abi::UBLK_F_USER_RECOVERY, 0);
        assert_eq!(info.flags & flag != 0, has, "the kernel keeps FAIL_IO exactly where GET_FEATURES offers it");
        c.del_dev(info.dev_id).unwrap();
        let r = DeviceBuilder::new().size(16 * MIB).flags(DevFlags::USER_RECOVERY | DevFlags::USER_RECOVERY_FAIL_IO).create();
        if has {
            let dev = r.expect("the library takes FAIL_IO where the kernel has it");
            assert_ne!(dev.info().flags & flag, 0);
        } else {
            let e = r.unwrap_err();
            assert!(matches!(e, Error::Unsupported { feature: "UBLK_F_USER_RECOVERY_FAIL_IO", .. }), "{e:?}");
            assert!(e.to_string().contains("Linux 6.13+"), "{e}");
            skipped("USER_RECOVERY_FAIL_IO needs Linux 6.13; checked instead: the kernel drops the bit silently and the library refuses it");
        }
        assert_no_devices();
    }
}

/// A sparse file of `size` bytes whose first sector is an MBR with one
/// Linux partition (type 0x83) from sector 2048, `sectors` long.
fn mbr_image(p: &Path, size: u64, sectors: u32) {
    sparse_file(p, size);
    let mut mbr = [0u8; 512];
    let e = &mut mbr[446..462];
    e[4] = 0x83;
    e[8..12].copy_from_slice(&2048u32.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    std::fs::OpenOptions::new().write(true).open(p).unwrap().write_all_at(&mbr, 0).unwrap();
}

/// Waits (up to `limit`) for partition 1 of `ublkbN` to appear in sysfs.
fn wait_partition(id: u32, limit: Duration) -> bool {
    let p = PathBuf::from(format!("/sys/class/block/ublkb{id}p1"));
    let t0 = Instant::now();
    while !p.exists() {
        if t0.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

driver_test! {
    /// `ublk add --no-part-scan` (UBLK_F_NO_AUTO_PART_SCAN, Linux 7.0+):
    /// over a file with a partition table, the device starts without
    /// reading it (no partition, no read request), while the same file
    /// without the option gets its partition; `blockdev --rereadpt` still
    /// scans it on request. Older kernels: refused, naming the flag and
    /// 7.0, with no device left.
    fn lifecycle_no_part_scan() {
        let _c = Cleanup;
        let backing = PathBuf::from("/tmp/lifecycle-parts.img");
        mbr_image(&backing, 32 * MIB, 16384);
        let file = backing.to_str().unwrap();
        if !kernel_has(ublk::sys::abi::UBLK_F_NO_AUTO_PART_SCAN) {
            ublk_refused(&["add", "-t", "loop", "--file", file, "--no-part-scan"], &["UBLK_F_NO_AUTO_PART_SCAN (Linux 7.0+)"]);
            assert_no_devices();
            skipped("--no-part-scan needs UBLK_F_NO_AUTO_PART_SCAN (Linux 7.0); checked instead: `ublk add --no-part-scan` is refused and no device is left");
            let _ = std::fs::remove_file(&backing);
            return;
        }
        // Without the option the kernel scans (asynchronously on 7.x).
        let d = Daemon::start("ublk", &["add", "-t", "loop", "--file", file]);
        let t0 = Instant::now();
        assert!(wait_partition(d.id(), Duration::from_secs(20)), "no ublkb{}p1: the partition table was not scanned", d.id());
        let took = t0.elapsed();
        assert!(reads_completed(d.id()) > 0);
        eprintln!("scanned: ublkb{}p1 after {took:?}", d.id());
        let (st, _) = d.terminate();
        assert!(st.success());
        assert_no_devices();
        // With it, nothing is read; the partition appears only on request.
        let d = Daemon::start("ublk", &["add", "-t", "loop", "--file", file, "--no-part-scan"]);
        let id = d.id();
        let info = Control::open().unwrap().get_dev_info(id).unwrap();
        assert_ne!(info.flags & ublk::sys::abi::UBLK_F_NO_AUTO_PART_SCAN, 0, "{:?}", ublk::Features(info.flags).names());
        assert!(!wait_partition(id, (took * 3).max(Duration::from_secs(3))), "ublkb{id}p1 appeared although the scan was off");
        assert_eq!(reads_completed(id), 0, "the kernel read the disk although the scan was off");
        run_ok("blockdev", &["--rereadpt", d.dev.to_str().unwrap()]);
        assert!(wait_partition(id, Duration::from_secs(10)), "blockdev --rereadpt did not find ublkb{id}p1");
        let sectors = std::fs::read_to_string(format!("/sys/class/block/ublkb{id}p1/size")).unwrap();
        assert_eq!(sectors.trim(), "16384");
        let (st, _) = d.terminate();
        assert!(st.success());
        assert_no_devices();
        let _ = std::fs::remove_file(&backing);
    }
}

driver_test! {
    /// `ublk del -n N --safe` (TRY_STOP_DEV, Linux 7.0+): with the disk
    /// held open it is refused, saying so, and the device stays LIVE with
    /// its daemon serving; once the disk is closed the same command stops
    /// and deletes the device, the daemon exiting cleanly. Older kernels:
    /// refused, naming 7.0, the device untouched.
    fn lifecycle_safe_del_refused_while_open() {
        let _c = Cleanup;
        let mut d = Daemon::start("ublk", &["add", "-t", "null", "--size", "16M"]);
        let (id, ids) = (d.id(), d.id().to_string());
        let read_one = || run_ok("dd", &[&format!("if=/dev/ublkb{id}"), "of=/dev/null", "bs=4k", "count=1", "iflag=direct", "status=none"]);
        if !kernel_has(ublk::sys::abi::UBLK_F_SAFE_STOP_DEV) {
            ublk_refused(&["del", "-n", &ids, "--safe"], &["needs Linux 7.0", "SAFE_STOP_DEV", "nothing was changed"]);
            assert_eq!(dev_state(id), "LIVE");
            assert!(d.child.try_wait().unwrap().is_none(), "the daemon ended");
            read_one();
            skipped("del --safe needs UBLK_F_SAFE_STOP_DEV (Linux 7.0); checked instead: it is refused and the device keeps serving");
            let (st, _) = d.terminate();
            assert!(st.success());
            assert_no_devices();
            return;
        }
        let held = std::fs::File::open(&d.dev).unwrap();
        ublk_refused(&["del", "-n", &ids, "--safe"], &["is in use", "is open", "nothing was changed"]);
        assert_eq!(dev_state(id), "LIVE");
        assert!(d.child.try_wait().unwrap().is_none(), "the daemon ended although the device is in use");
        read_one();
        drop(held);
        let (st, out, err) = ublk(&["del", "-n", &ids, "--safe"]);
        assert!(st.success(), "ublk del --safe with the disk closed: {st}\n{out}\n{err}");
        assert!(out.contains(&format!("deleted device {id}")), "{out}");
        let st = wait_timeout(&mut d.child, Duration::from_secs(30)).expect("the daemon exits after del --safe");
        assert!(st.success(), "the daemon exited with {st}");
        assert_no_devices();
    }
}

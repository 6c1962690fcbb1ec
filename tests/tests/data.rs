//! The `ublk` CLI's data targets against the real driver: fio with verify on
//! ramdisk and loop, the loop backing file holding what was written, ext4
//! (mkfs, fsck, remount, and after a daemon restart), DISCARD and
//! WRITE_ZEROES reaching the backing file, --detach/list/del, and bad input
//! that changes nothing.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ublk_tests::*;

fn sha256(p: &Path) -> String {
    run_ok("sha256sum", &[p.to_str().unwrap()]).split_whitespace().next().unwrap_or("").to_string()
}

/// A directory on an ext4 filesystem (an image on /tmp mounted through the
/// kernel loop driver), for backing files that need ZERO_RANGE, which the
/// guest's tmpfs /tmp does not support. Falls back to /tmp if it cannot mount.
struct Scratch {
    dir: PathBuf,
    img: PathBuf,
    mounted: bool,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        let img = PathBuf::from(format!("/tmp/{name}-scratch.img"));
        let dir = PathBuf::from(format!("/tmp/{name}-scratch"));
        sparse_file(&img, 512 << 20);
        std::fs::create_dir_all(&dir).unwrap();
        run_ok("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]);
        let (st, _, err) = run("mount", &["-o", "loop", img.to_str().unwrap(), dir.to_str().unwrap()]);
        if !st.success() {
            eprintln!("note: cannot mount an ext4 scratch fs ({err}); backing files on /tmp itself");
        }
        Scratch { dir, img, mounted: st.success() }
    }
    fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.mounted {
            let _ = run("umount", &[self.dir.to_str().unwrap()]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.img);
    }
}

driver_test! {
    /// fio randwrite + crc32c verify (4k and 64k, iodepth 32, 2 queues) on a
    /// ramdisk and a loop device; for loop, a pattern written through the
    /// device is then byte-for-byte in the backing file.
    fn data_fio_verify_ramdisk_and_loop() {
        // loop-direct: O_DIRECT on a backing file on ext4 (tmpfs has no
        // O_DIRECT before 6.6).
        let scratch = Scratch::new("data-fio");
        for kind in ["ramdisk", "loop", "loop-direct"] {
            let backing = if kind == "loop-direct" { scratch.path("disk.img") } else { PathBuf::from("/tmp/data-fio.img") };
            sparse_file(&backing, 64 << 20);
            let mut args = vec!["add", "-t", kind.trim_end_matches("-direct"), "--queues", "2", "--depth", "64"];
            if kind == "ramdisk" {
                args.extend(["--size", "64M"]);
            } else {
                args.extend(["--file", backing.to_str().unwrap()]);
            }
            if kind == "loop-direct" {
                args.push("--direct");
            }
            let d = Daemon::start("ublk", &args);
            let dev = d.dev.to_str().unwrap().to_string();
            assert_eq!(run_ok("blockdev", &["--getsize64", &dev]).trim(), (64u64 << 20).to_string());
            fio_verify(&dev, "4k", 8 << 20);
            fio_verify(&dev, "64k", 8 << 20);
            // A known pattern at 8 MiB, through the device.
            let pat = pattern(4 << 20, 7);
            let pat_path = PathBuf::from("/tmp/data-fio.pat");
            std::fs::write(&pat_path, &pat).unwrap();
            run_ok("dd", &[&format!("if={}", pat_path.display()), &format!("of={dev}"), "bs=1M", "seek=8", "oflag=direct", "conv=fsync", "status=none"]);
            let back = PathBuf::from("/tmp/data-fio.back");
            run_ok("dd", &[&format!("if={dev}"), &format!("of={}", back.display()), "bs=1M", "skip=8", "count=4", "iflag=direct", "status=none"]);
            assert!(std::fs::read(&back).unwrap() == pat, "{kind}: pattern read back through the device differs");
            let (st, out) = d.terminate();
            assert!(st.success(), "ublk add -t {kind} exited with {st}");
            let per_q = queue_requests(&out);
            assert_eq!(per_q.len(), 2.min(nproc()), "per-queue report: {out}");
            for (q, n) in &per_q {
                assert!(*n > 0, "{kind}: queue {q} served nothing: {out}");
            }
            assert_eq!(queue_sum(&out, "errors"), 0, "{kind}: requests failed: {out}");
            if kind != "ramdisk" {
                let in_file = read_range(&backing, 8 << 20, 4 << 20);
                let f = PathBuf::from("/tmp/data-fio.file");
                std::fs::write(&f, &in_file).unwrap();
                let (a, b) = (sha256(&pat_path), sha256(&f));
                eprintln!("sha256 written {a}, backing file {b}");
                assert_eq!(a, b, "the backing file does not hold what was written through the device");
                let _ = std::fs::remove_file(&f);
            }
            let _ = std::fs::remove_file(&pat_path);
            let _ = std::fs::remove_file(&back);
            let _ = std::fs::remove_file(&backing);
            assert_no_devices();
        }
        drop(scratch);
        delete_all_devices();
        assert_no_devices();
    }
}

/// fio randwrite then verify (crc32c) of `bs` blocks at depth 32.
fn fio_verify(dev: &str, bs: &str, span: u64) {
    let bs = format!("--bs={bs}");
    fio_verify_halves("verify", dev, span, &["--rw=randwrite", &bs, "--iodepth=32"]);
}

/// The files the ext4 test writes.
fn tree() -> FileTree {
    FileTree::new(4, &[0, 1, 511, 4096, 70_000, 300_001], 1)
}

driver_test! {
    /// mkfs.ext4, mount, a tree of files, umount, e2fsck -fn clean, remount,
    /// contents verified; for loop, again after the daemon is restarted.
    fn data_ext4_fsck_remount_and_daemon_restart() {
        let backing = PathBuf::from("/tmp/data-ext4.img");
        sparse_file(&backing, 64 << 20);
        let mnt = PathBuf::from("/tmp/data-ext4-mnt");
        let tree = tree();
        for kind in ["ramdisk", "loop"] {
            let mut args = vec!["add", "-t", kind, "--queues", "2"];
            if kind == "ramdisk" {
                args.extend(["--size", "64M"]);
            } else {
                args.extend(["--file", backing.to_str().unwrap()]);
            }
            let d = Daemon::start("ublk", &args);
            let dev = d.dev.to_str().unwrap().to_string();
            ext4_write_check(&dev, &mnt, &tree, kind);
            let (st, out) = d.terminate();
            assert!(st.success(), "ublk add -t {kind} exited with {st}");
            assert_eq!(queue_sum(&out, "errors"), 0, "{kind}: requests failed: {out}");
            assert!(queue_sum(&out, "discards") > 0, "{kind}: mkfs.ext4 sent no DISCARD (discard params not set?): {out}");
            assert_no_devices();
            if kind == "loop" {
                // A new daemon on the same file sees the same filesystem.
                let d = Daemon::start("ublk", &args);
                let dev = d.dev.to_str().unwrap().to_string();
                ext4_check(&dev, &mnt, &tree, "loop after daemon restart");
                let (st, _) = d.terminate();
                assert!(st.success(), "restarted loop daemon exited with {st}");
                assert_no_devices();
            }
        }
        let _ = std::fs::remove_file(&backing);
        delete_all_devices();
        assert_no_devices();
    }
}

driver_test! {
    /// blkdiscard frees the backing file's blocks (st_blocks drop, the range
    /// reads zeros); blkdiscard -z (WRITE_ZEROES) zeroes the range in the
    /// file; the rest is untouched.
    fn data_discard_and_write_zeroes_reach_the_backing_file() {
        let scratch = Scratch::new("data-discard");
        let backing = scratch.path("disk.img");
        sparse_file(&backing, 64 << 20);
        let d = Daemon::start("ublk", &["add", "-t", "loop", "--file", backing.to_str().unwrap()]);
        let dev = d.dev.to_str().unwrap().to_string();
        let pat = pattern(16 << 20, 3);
        let pat_path = PathBuf::from("/tmp/data-discard.pat");
        std::fs::write(&pat_path, &pat).unwrap();
        run_ok("dd", &[&format!("if={}", pat_path.display()), &format!("of={dev}"), "bs=1M", "oflag=direct", "conv=fsync", "status=none"]);
        let blocks0 = std::fs::metadata(&backing).unwrap().blocks();
        assert!(blocks0 >= (16 << 20) / 512, "backing file has {blocks0} blocks after 16 MiB written");
        assert!(read_range(&backing, 0, 16 << 20) == pat, "backing file does not hold the pattern");

        run_ok("blkdiscard", &["-o", "0", "-l", &(8u64 << 20).to_string(), &dev]);
        let blocks1 = std::fs::metadata(&backing).unwrap().blocks();
        eprintln!("st_blocks: {blocks0} after writing 16 MiB, {blocks1} after discarding 8 MiB");
        assert!(blocks1 + (7 << 20) / 512 <= blocks0, "discard freed too little: {blocks0} -> {blocks1} blocks");
        assert!(read_range(&backing, 0, 8 << 20).iter().all(|b| *b == 0), "discarded range does not read zeros");
        assert!(read_range(&backing, 8 << 20, 8 << 20) == pat[8 << 20..], "discard touched data beyond its range");

        run_ok("blkdiscard", &["-z", "-o", &(8u64 << 20).to_string(), "-l", &(4u64 << 20).to_string(), &dev]);
        assert!(read_range(&backing, 8 << 20, 4 << 20).iter().all(|b| *b == 0), "write-zeroes range does not read zeros in the file");
        assert!(read_range(&backing, 12 << 20, 4 << 20) == pat[12 << 20..], "write-zeroes touched data beyond its range");
        // And through the device.
        let back = PathBuf::from("/tmp/data-discard.back");
        run_ok("dd", &[&format!("if={dev}"), &format!("of={}", back.display()), "bs=1M", "count=16", "iflag=direct", "status=none"]);
        let b = std::fs::read(&back).unwrap();
        assert!(b[..12 << 20].iter().all(|x| *x == 0) && b[12 << 20..] == pat[12 << 20..], "device contents wrong after discard/zeroes");

        let (st, out) = d.terminate();
        assert!(st.success(), "loop daemon exited with {st}");
        eprintln!("{out}");
        assert!(queue_sum(&out, "discards") > 0, "no DISCARD reached the target: {out}");
        assert!(queue_sum(&out, "write_zeroes") > 0, "no WRITE_ZEROES reached the target: {out}");
        assert_eq!(queue_sum(&out, "errors"), 0, "requests failed: {out}");
        let _ = std::fs::remove_file(&pat_path);
        let _ = std::fs::remove_file(&back);
        drop(scratch);
        delete_all_devices();
        assert_no_devices();
    }
}

driver_test! {
    /// --detach: the id is printed once live; `ublk list` shows the device
    /// with its daemon and target; `ublk del` stops the daemon, removes the
    /// device and its saved configuration.
    fn data_detach_list_and_del() {
        let backing = PathBuf::from("/tmp/data-detach.img");
        sparse_file(&backing, 32 << 20);
        let (st, out, err) = ublk(&["add", "-t", "loop", "--file", backing.to_str().unwrap(), "--queues", "2", "--detach"]);
        assert!(st.success(), "ublk add --detach failed: {st}\n{out}\n{err}");
        let id: u32 = out.trim().parse().unwrap_or_else(|_| panic!("ublk add --detach printed {out:?}"));
        let dev = PathBuf::from(format!("/dev/ublkb{id}"));
        wait_for_path(&dev);
        let cfg = ublk_cli::config::DeviceConfig::load(id).unwrap().expect("saved configuration");
        assert_eq!(cfg.target, "loop");
        assert_eq!(cfg.size, 32 << 20);
        assert!(ublk_cli::config::pid_alive(cfg.pid), "daemon pid {} not running", cfg.pid);
        run_ok("dd", &["if=/dev/zero", &format!("of={}", dev.display()), "bs=64k", "count=16", "oflag=direct", "status=none"]);
        let list = run_ok(bin("ublk").to_str().unwrap(), &["list"]);
        eprintln!("{list}");
        let line = list.lines().find(|l| l.split_whitespace().next() == Some(&id.to_string())).unwrap_or_else(|| panic!("device {id} not listed:\n{list}"));
        assert!(line.contains("LIVE") && line.contains("loop") && line.contains(&cfg.pid.to_string()), "list line: {line}");
        // The FLAGS column is the device's flags as the kernel reports them,
        // by name. A kernel that offers the ioctl encoding (GET_FEATURES,
        // 6.5+) gives every device UBLK_F_CMD_IOCTL_ENCODE; 6.1 does not.
        let mut ctrl = ublk::Control::open().unwrap();
        let info_flags = ctrl.get_dev_info(id).unwrap().flags;
        let want: Vec<String> = ublk::Features(info_flags).names().iter().map(|n| n.trim_start_matches("UBLK_F_").to_string()).collect();
        let want = if want.is_empty() { "-".to_string() } else { want.join(",") };
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols.get(9).copied(), Some(want.as_str()), "FLAGS column (the kernel's flags {info_flags:#x}) of: {line}");
        // DATA: loop's default, the fastest data path the kernel offers.
        let best = ublk::DataPath::best(ctrl.features(), true, true);
        assert_eq!(cols.get(8).copied(), Some(best.name()), "DATA column of: {line}");
        assert_eq!(cols.get(6).copied(), Some("0:0"), "OWNER column of a device root made: {line}");
        let ioctl = ctrl.encoding() == ublk::Encoding::Ioctl;
        assert_eq!(line.contains("CMD_IOCTL_ENCODE"), ioctl, "kernel {} (opcodes {:?}), list line: {line}", kernel_release(), ctrl.encoding());
        let (st, out, err) = ublk(&["del", "-n", &id.to_string()]);
        assert!(st.success(), "ublk del failed: {st}\n{out}\n{err}");
        assert!(!ublk_cli::config::pid_alive(cfg.pid), "daemon still running after del");
        assert!(ublk_cli::config::DeviceConfig::load(id).unwrap().is_none(), "configuration left after del");
        assert_no_devices();
        let (st, _, err) = ublk(&["del", "--all"]);
        assert!(st.success(), "del --all with no device: {err}");
        let _ = std::fs::remove_file(&backing);
        delete_all_devices();
        assert_no_devices();
    }
}

/// Runs `ublk args` (as `uid` if given), expects exit 1 with one error line
/// containing `want`.
fn expect_error(args: &[&str], uid: Option<u32>, want: &str) {
    let mut c = Command::new(bin("ublk"));
    c.args(args);
    if let Some(u) = uid {
        c.uid(u).gid(u);
    }
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("ublk {args:?}: {}", err.trim());
    assert_eq!(out.status.code(), Some(1), "ublk {args:?}: exit {}, stderr {err}", out.status);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "ublk {args:?}: expected one error line, got:\n{err}");
    assert!(lines[0].starts_with("ublk: error: "), "ublk {args:?}: {err}");
    assert!(lines[0].to_lowercase().contains(&want.to_lowercase()), "ublk {args:?}: error does not mention {want:?}: {err}");
}

driver_test! {
    /// Bad input gets one clear error line, exit 1, and changes nothing: no
    /// device created or left, the other devices still serving.
    fn data_bad_input_changes_nothing() {
        // Small: `unchanged` hashes all of it, a dozen times.
        let a = Daemon::start("ublk", &["add", "-t", "ramdisk", "--size", "8M"]);
        let b = Daemon::start("ublk", &["add", "-t", "null", "--size", "16M", "--recovery"]);
        let (ida, idb) = (a.id(), b.id());
        let before = ublk_devices();
        assert_eq!(before.len(), 2);
        let a_dev = a.dev.to_str().unwrap().to_string();
        run_ok("dd", &["if=/dev/urandom", &format!("of={a_dev}"), "bs=64k", "count=16", "oflag=direct", "status=none"]);
        let a_before = run_ok("sha256sum", &[&a_dev]);
        let unchanged = |what: &str| {
            assert_eq!(ublk_devices(), before, "{what}: the set of devices changed");
            assert_eq!(run_ok("sha256sum", &[&a_dev]), a_before, "{what}: device {ida} changed");
            run_ok("dd", &[&format!("if={a_dev}"), "of=/dev/null", "bs=64k", "count=16", "iflag=direct", "status=none"]);
            run_ok("dd", &[&format!("if={}", b.dev.display()), "of=/dev/null", "bs=4k", "count=4", "iflag=direct", "status=none"]);
        };

        expect_error(&["add", "-t", "loop", "--file", "/tmp/no-such-backing-file"], None, "does not exist");
        unchanged("missing backing file");
        expect_error(&["add", "-t", "loop", "--file", "/tmp"], None, "/tmp");
        unchanged("directory as backing file");
        expect_error(&["add", "-t", "loop"], None, "--file");
        unchanged("loop without --file");
        // Root reads anything: an unreadable file needs a non-root user.
        let secret = PathBuf::from("/tmp/data-bad-secret.img");
        sparse_file(&secret, 16 << 20);
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        expect_error(&["add", "-t", "loop", "--file", secret.to_str().unwrap()], Some(65534), "not readable");
        unchanged("unreadable backing file (uid 65534)");
        expect_error(&["add", "-t", "loop", "--file", secret.to_str().unwrap(), "--size", "1G"], None, "larger than the backing file");
        unchanged("--size above the backing file");
        expect_error(&["add", "-t", "ramdisk", "--size", "1T"], None, "memory");
        unchanged("ramdisk larger than memory");
        expect_error(&["add", "-t", "null", "--id", &ida.to_string()], None, "already exists");
        unchanged("taken id");
        expect_error(&["recover", "-n", &ida.to_string()], None, "without --recovery");
        unchanged("recover without recovery flags");
        expect_error(&["recover", "-n", &idb.to_string()], None, "still served");
        unchanged("recover with a live daemon");
        expect_error(&["recover", "-n", "99"], None, "no ublk device 99");
        unchanged("recover of an unknown id");
        expect_error(&["del", "-n", "99"], None, "no ublk device 99");
        unchanged("del of an unknown id");
        let fail_io = ublk::Control::open().unwrap().features().is_some_and(|f| f.has(ublk::sys::opt::UBLK_F_USER_RECOVERY_FAIL_IO));
        if !fail_io {
            expect_error(&["add", "-t", "null", "--recovery-fail-io"], None, "needs Linux 6.13");
            unchanged("--recovery-fail-io on a kernel without it");
        }

        let (st, feats, _) = ublk(&["features"]);
        assert!(st.success());
        eprintln!("{feats}");
        assert!(feats.contains("UBLK_F_USER_RECOVERY"), "{feats}");
        if kernel_version() < (6, 5) {
            assert!(feats.contains("GET_FEATURES: missing") && feats.contains("legacy"), "{feats}");
        } else {
            assert!(feats.contains("GET_FEATURES: 0x") && feats.contains("ioctl-encoded"), "{feats}");
        }
        let list = run_ok(bin("ublk").to_str().unwrap(), &["list"]);
        eprintln!("{list}");
        assert!(list.lines().any(|l| l.starts_with(&format!("{ida} ")) && l.contains("ramdisk") && l.contains("LIVE")), "{list}");
        assert!(list.lines().any(|l| l.starts_with(&format!("{idb} ")) && l.contains("null") && l.contains("USER_RECOVERY")), "{list}");

        // del of a device whose daemon is alive: the daemon exits cleanly.
        let (mut a, mut b) = (a, b);
        for (d, id) in [(&mut a, ida), (&mut b, idb)] {
            let (st, out, err) = ublk(&["del", "-n", &id.to_string()]);
            assert!(st.success(), "ublk del -n {id}: {st}\n{out}\n{err}");
            let st = wait_timeout(&mut d.child, Duration::from_secs(30)).expect("daemon exits after del");
            assert!(st.success(), "daemon of {id} exited with {st} after del");
        }
        let _ = std::fs::remove_file(&secret);
        delete_all_devices();
        assert_no_devices();
    }
}

driver_test! {
    /// `ublk features` names every flag bit the kernel's GET_FEATURES
    /// reports (the VM build's header is the newest, so none may be left
    /// as a bare bit number or "unknown"), and has one row per UBLK_F_
    /// flag up to bit 20 (IO_DESC_SIZE, 7.3) with the kernel's support
    /// (`unknown` without GET_FEATURES, on 6.1, which it says is missing)
    /// and the library's (`DevFlags::library_support`: yes, or no / in
    /// progress with the reason); `--json` says the same.
    fn data_features_names_every_kernel_bit() {
        let (st, out, err) = ublk(&["features"]);
        eprintln!("{out}{err}");
        assert!(st.success(), "ublk features: {st}\n{err}");
        let (st, js, err) = ublk(&["features", "--json"]);
        assert!(st.success(), "ublk features --json: {st}\n{err}");
        let js: serde_json::Value = serde_json::from_str(&js).unwrap_or_else(|e| panic!("ublk features --json: {e}: {js}"));
        let ctrl = ublk::Control::open().unwrap();
        let f = ctrl.features();
        assert!(!out.contains("UBLK_F_BIT") && !out.contains("unknown to this version"), "a bit the kernel reports has no name: {out}");
        assert_eq!(js["unknown_kernel_bits"].as_array().map(|a| a.len()), Some(0), "{js}");
        assert_eq!(js["get_features"].as_u64(), f.map(|f| f.0), "{js}");
        // One row per flag, bits 0..=20, in the text and the JSON.
        let flags = js["flags"].as_array().expect("flags array");
        assert_eq!(flags.len(), 21, "{js}");
        for bit in 0..=20u32 {
            let v = 1u64 << bit;
            let name = ublk::sys::abi::flag_name(v).unwrap_or_else(|| panic!("bit {bit} has no name in ublk_sys::abi"));
            let row = out.lines().find(|l| l.split_whitespace().next() == Some(name)).unwrap_or_else(|| panic!("no row for {name}: {out}"));
            let cols: Vec<&str> = row.split_whitespace().collect();
            assert_eq!(cols[1], bit.to_string(), "bit column of {row:?}");
            let kernel = match f {
                Some(f) if f.0 & v != 0 => "yes",
                Some(_) => "no",
                None => "unknown",
            };
            assert_eq!(cols[3], kernel, "kernel column of {row:?}");
            let lib = ublk::DevFlags::from_bits_retain(v).library_support();
            let text = cols[4..].join(" ");
            assert_eq!(text, lib.to_string(), "library column of {row:?}");
            let j = flags.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("{name} not in the JSON: {js}"));
            assert_eq!(j["bit"].as_u64(), Some(u64::from(bit)), "{j}");
            assert_eq!(j["kernel"].as_bool(), f.map(|f| f.0 & v != 0), "{j}");
            assert_eq!(j["library"].as_str(), Some(lib.label()), "{j}");
            assert_eq!(j["why"].as_str(), lib.why(), "{j}");
            // What the library says it implements is what it takes.
            assert_eq!(ublk::SUPPORTED_FLAGS.contains(ublk::DevFlags::from_bits_retain(v)), lib == ublk::Support::Yes, "{name}");
        }
        // The newest data paths are all implemented.
        for name in ["UBLK_F_AUTO_BUF_REG", "UBLK_F_SUPPORT_ZERO_COPY", "UBLK_F_PER_IO_DAEMON", "UBLK_F_BUF_REG_OFF_DAEMON", "UBLK_F_BATCH_IO"] {
            let j = flags.iter().find(|r| r["name"] == name).unwrap();
            assert_eq!(j["library"], "yes", "{j}");
        }
        let Some(f) = f else {
            assert!(kernel_version() < (6, 5), "kernel {} should have GET_FEATURES", kernel_release());
            assert!(out.contains("GET_FEATURES: missing"), "{out}");
            assert!(out.contains("legacy numbers"), "{out}");
            assert!(js["get_features"].is_null() && js["encoding"] == "legacy", "{js}");
            return;
        };
        assert!(out.contains(&format!("GET_FEATURES: {:#x} ", f.0)), "the mask is not printed: {out}");
        let bits: Vec<u32> = (0..64).filter(|b| f.0 & (1u64 << b) != 0).collect();
        assert!(!bits.is_empty(), "GET_FEATURES reported no flag");
        for bit in &bits {
            let name = ublk::sys::abi::flag_name(1u64 << bit)
                .unwrap_or_else(|| panic!("bit {bit} of GET_FEATURES ({:#x}) has no name in ublk_sys::abi: a kernel newer than the table", f.0));
            let want = format!("bit {bit:>2}  {name}");
            assert!(out.lines().any(|l| l.trim() == want), "{want:?} is not listed: {out}");
        }
        // Nothing else is listed as reported.
        let listed = out.lines().filter(|l| l.trim_start().starts_with("bit ")).count();
        assert_eq!(listed, bits.len(), "listed {listed} bits, the kernel reports {}: {out}", bits.len());
        assert!(out.contains("ioctl-encoded") && js["encoding"] == "ioctl", "{out}");
    }
}

/// How many io_uring worker threads the queue threads (`ublkN-q*`) of
/// process `pid` have. A worker is named `iou-wrk-TID` after the thread
/// whose operations it runs (the control commands' workers belong to the
/// main thread), and io-wq keeps a thread's last worker once it has made
/// one: this counts whether any operation of the queues' rings ever went to
/// a worker.
fn queue_io_workers(pid: u32) -> usize {
    let threads: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| {
            let t = t.unwrap();
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim().to_string();
            (t.file_name().to_string_lossy().into_owned(), comm)
        })
        .collect();
    let queue_tids: Vec<&str> =
        threads.iter().filter(|(_, c)| c.starts_with("ublk") && c.contains("-q")).map(|(tid, _)| tid.as_str()).collect();
    assert!(!queue_tids.is_empty(), "process {pid} has no queue thread: {threads:?}");
    threads.iter().filter(|(_, c)| c.strip_prefix("iou-wrk-").is_some_and(|owner| queue_tids.contains(&owner))).count()
}

/// The open flags (octal, from /proc/PID/fdinfo) of process `pid`'s
/// descriptors of `path`.
fn open_flags(pid: u32, path: &Path) -> Vec<i32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let e = e.unwrap();
        if std::fs::read_link(e.path()).ok().as_deref() != Some(path) {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy())).unwrap_or_default();
        let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap_or_else(|| panic!("no flags in fdinfo: {info}"));
        v.push(i32::from_str_radix(flags.trim(), 8).unwrap());
    }
    v
}

/// fio: 4096 direct 4k I/Os of kind `rw` (randread, randwrite) over the
/// first 32 MiB of `dev`, depth 32.
fn fio_4k(dev: &str, rw: &str) {
    let rw = format!("--rw={rw}");
    fio_ok(&[
        "--name=inline",
        "--filename",
        dev,
        &rw,
        "--bs=4k",
        "--iodepth=32",
        "--ioengine=io_uring",
        "--direct=1",
        "--size=32M",
        "--io_size=16M",
    ]);
}

driver_test! {
    /// I/O on a tmpfs backing file runs in the queue's thread, not on
    /// io_uring's worker threads: the loop target marks a tmpfs file (and
    /// the ramdisk its memfd) O_NONBLOCK, and O_DIRECT where tmpfs takes it
    /// (6.6+), which is what io_uring asks before it tries a READ or WRITE
    /// inline. After fio's 4k random reads on a loop device over a tmpfs
    /// file (the default data path), and on 6.6+ its random writes too, no
    /// queue thread has an `iou-wrk` worker; a FLUSH (an fsync, which
    /// io_uring always runs on a worker) then makes one, so the count does
    /// see workers. A ramdisk, where its I/O is io_uring READs and WRITEs
    /// of its memfd (the zero-copy paths, 6.15+), makes none either, until a
    /// DISCARD (an io_uring fallocate, also always on a worker, except on
    /// the copy path, where it is a plain one). The loop's tmpfs file
    /// is open O_NONBLOCK (and O_DIRECT on 6.6+); a file on ext4 keeps its
    /// flags (a file system that ignores IOCB_NOWAIT could stall the queue).
    fn data_tmpfs_io_runs_inline() {
        let writes_inline = kernel_version() >= (6, 6);
        let backing = PathBuf::from("/tmp/data-inline.img");
        std::fs::write(&backing, pattern(32 << 20, 5)).unwrap();
        let d = Daemon::start("ublk", &["add", "-t", "loop", "--file", backing.to_str().unwrap(), "--queues", "1"]);
        let dev = d.dev.to_str().unwrap().to_string();
        let pid = d.child.id();
        let dp = listed_data_path(d.id());
        let flags = open_flags(pid, &backing);
        assert!(!flags.is_empty(), "the daemon has no descriptor of {}", backing.display());
        for f in &flags {
            assert_ne!(f & libc::O_NONBLOCK, 0, "loop: the tmpfs file is not O_NONBLOCK: flags {f:o}");
            assert_eq!(f & libc::O_DIRECT != 0, writes_inline, "loop: O_DIRECT on the tmpfs file (flags {f:o}) on {}", kernel_release());
        }
        let at_start = queue_io_workers(pid);
        fio_4k(&dev, "randread");
        let after_reads = queue_io_workers(pid);
        fio_4k(&dev, "randwrite");
        let after_writes = queue_io_workers(pid);
        eprintln!(
            "loop ({dp}) on {}: {at_start} io_uring worker(s) of the queue at start, {after_reads} after 4096 reads, {after_writes} after 4096 writes",
            kernel_release()
        );
        assert_eq!(after_reads, 0, "loop ({dp}): reads of a tmpfs file went to io_uring's worker threads");
        if writes_inline {
            assert_eq!(after_writes, 0, "loop ({dp}): writes to a tmpfs file went to io_uring's worker threads");
        }
        // A FLUSH: the fsync runs on a worker on every kernel.
        run_ok("dd", &["if=/dev/zero", &format!("of={dev}"), "bs=4k", "count=1", "oflag=direct", "conv=fsync", "status=none"]);
        let after_flush = queue_io_workers(pid);
        assert!(after_flush > 0, "loop ({dp}): no io_uring worker even after a FLUSH: the count sees nothing");
        let (st, out) = d.terminate();
        assert!(st.success(), "loop exited with {st}");
        assert_eq!(queue_sum(&out, "errors"), 0, "loop: requests failed: {out}");
        assert!(queue_sum(&out, "flushes") > 0, "loop: the FLUSH never reached the target: {out}");
        let _ = std::fs::remove_file(&backing);
        assert_no_devices();

        let d = Daemon::start("ublk", &["add", "-t", "ramdisk", "--size", "32M", "--queues", "1"]);
        let dev = d.dev.to_str().unwrap().to_string();
        let dp = listed_data_path(d.id());
        fio_4k(&dev, "randwrite");
        fio_4k(&dev, "randread");
        let after = queue_io_workers(d.child.id());
        run_ok("blkdiscard", &[&dev]);
        let after_discard = queue_io_workers(d.child.id());
        eprintln!("ramdisk ({dp}): {after} io_uring worker(s) of the queue after 4096 writes and 4096 reads, {after_discard} after a DISCARD");
        if dp == "zero-copy" || dp == "auto-buf-reg" {
            assert_eq!(after, 0, "ramdisk ({dp}): its I/O on its memfd went to io_uring's worker threads");
        }
        // On the copy path the ramdisk punches holes with a plain fallocate.
        if dp != "copy" {
            assert!(after_discard > 0, "ramdisk ({dp}): no io_uring worker even after a DISCARD: the count sees nothing");
        }
        let (st, out) = d.terminate();
        assert!(st.success(), "ramdisk exited with {st}");
        assert_eq!(queue_sum(&out, "errors"), 0, "ramdisk: requests failed: {out}");
        assert_no_devices();

        // A backing file on ext4 keeps the flags it was opened with.
        let scratch = Scratch::new("data-inline");
        if !scratch.mounted {
            skipped_part("no ext4 scratch file system here (mount -o loop failed): the flags of a file off tmpfs were not checked");
            return;
        }
        let img = scratch.path("disk.img");
        sparse_file(&img, 16 << 20);
        let d = Daemon::start("ublk", &["add", "-t", "loop", "--file", img.to_str().unwrap(), "--queues", "1"]);
        let flags = open_flags(d.child.id(), &img);
        assert!(!flags.is_empty(), "the daemon has no descriptor of {}", img.display());
        for f in &flags {
            assert_eq!(f & (libc::O_NONBLOCK | libc::O_DIRECT), 0, "loop: a file on ext4 was made O_NONBLOCK/O_DIRECT: flags {f:o}");
        }
        let (st, _) = d.terminate();
        assert!(st.success(), "loop on ext4 exited with {st}");
        assert_no_devices();
    }
}

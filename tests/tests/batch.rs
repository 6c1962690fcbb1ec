//! Batched commands (`--batch`, UBLK_F_BATCH_IO, Linux 7.0+): one
//! PREP_IO_CMDS per queue, a multishot FETCH_IO_CMDS delivering many
//! requests per completion, one COMMIT_IO_CMDS per turn. Older kernels
//! refuse `--batch` clearly and create nothing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ublk_tests::*;

driver_test! {
    /// null (sync and async) and loop on every data path the kernel has,
    /// with --batch: fio (crc32c verify for loop, at 4k and 128k) passes and
    /// no request fails; on kernels without BATCH_IO the refusal names 7.0.
    fn batch_null_and_loop_serve_verified_io() {
        if !kernel_has(ublk::sys::abi::UBLK_F_BATCH_IO) {
            let (st, _, err) = ublk(&["add", "-t", "null", "--batch"]);
            assert!(!st.success(), "--batch succeeded on {}", kernel_release());
            assert!(err.contains("BATCH_IO") && err.contains("7.0"), "unclear refusal: {err}");
            assert_no_devices();
            skipped("UBLK_F_BATCH_IO needs Linux 7.0+ (refusal checked)");
            return;
        }
        // A batch device has no per-I/O daemons: several threads per queue
        // are refused before ADD_DEV.
        let (st, _, err) = ublk(&["add", "-t", "null", "--batch", "--threads-per-queue", "2"]);
        assert!(!st.success(), "--batch --threads-per-queue 2 succeeded");
        assert!(err.contains("--batch") && err.contains("threads per queue"), "unclear refusal: {err}");
        assert_no_devices();
        // The kernel refuses a batch device of one tag per queue (-EINVAL):
        // refused before ADD_DEV, naming the depth.
        let (st, _, err) = ublk(&["add", "-t", "null", "--batch", "--depth", "1"]);
        assert!(!st.success(), "--batch --depth 1 succeeded");
        assert!(err.contains("depth of 2"), "unclear refusal: {err}");
        assert_no_devices();
        for extra in [&[][..], &["--async"][..]] {
            let mut args = vec!["add", "-t", "null", "--batch", "--queues", "2", "--depth", "64"];
            args.extend_from_slice(extra);
            let d = Daemon::start("ublk", &args);
            let dev = d.dev.to_str().unwrap().to_string();
            let cpus = format!("0-{}", nproc() - 1);
            fio_ok(&["--name=r", "--filename", &dev, "--rw=randread", "--bs=4k", "--ioengine=io_uring", "--iodepth=64", "--direct=1", "--size=16M", "--numjobs=2", "--cpus_allowed", &cpus, "--cpus_allowed_policy=split"]);
            let (st, out) = d.terminate();
            assert!(st.success(), "null --batch {extra:?} exited with {st}");
            assert!(queue_sum(&out, "reads") >= 2 * 4096, "null --batch {extra:?}: reads not all served: {out}");
            assert_eq!(queue_sum(&out, "errors"), 0, "null --batch {extra:?}: {out}");
            assert_no_devices();
        }
        let mut paths = vec!["copy"];
        for (dp, flag) in [
            ("user-copy", ublk::sys::abi::UBLK_F_USER_COPY),
            ("zero-copy", ublk::sys::abi::UBLK_F_SUPPORT_ZERO_COPY),
            ("auto-buf-reg", ublk::sys::abi::UBLK_F_AUTO_BUF_REG),
        ] {
            if kernel_has(flag) {
                paths.push(dp);
            }
        }
        for dp in paths {
            let backing = PathBuf::from("/tmp/batch-loop.img");
            sparse_file(&backing, 64 << 20);
            let d = Daemon::start("ublk", &["add", "-t", "loop", "--file", backing.to_str().unwrap(), "--batch", "--queues", "2", "--depth", "64", "--data-path", dp]);
            let dev = d.dev.to_str().unwrap().to_string();
            fio_verify_halves("batch", &dev, 8 << 20, &["--rw=randrw", "--bs=4k", "--iodepth=32"]);
            fio_verify_halves("batch", &dev, 8 << 20, &["--rw=randwrite", "--bsrange=4k-256k", "--iodepth=16"]);
            let (st, out) = d.terminate();
            assert!(st.success(), "loop --batch --data-path {dp} exited with {st}");
            assert_eq!(queue_sum(&out, "errors"), 0, "loop --batch {dp}: {out}");
            eprintln!("loop --batch {dp}: ok");
            let _ = std::fs::remove_file(&backing);
            assert_no_devices();
        }
    }
}

driver_test! {
    /// Batched commands are the default where the kernel has them: `ublk
    /// add` without --batch makes a BATCH_IO device that serves verified
    /// I/O; --no-batch, --recovery (which keeps `ublk quiesce` working),
    /// --threads-per-queue 2 and --depth 1 make one without. On older
    /// kernels the default device is unbatched and serves.
    fn batch_is_the_default_where_the_kernel_has_it() {
        let has = kernel_has(ublk::sys::abi::UBLK_F_BATCH_IO);
        let backing = PathBuf::from("/tmp/batch-default.img");
        sparse_file(&backing, 64 << 20);
        let file = backing.to_str().unwrap();
        // The flags `ublk list` shows for a loop device made with `args`,
        // which serves (fio verify if `verify`) and ends cleanly.
        let flags_of = |args: &[&str], verify: bool| -> Vec<String> {
            let mut all = vec!["add", "-t", "loop", "--file", file];
            all.extend_from_slice(args);
            let d = Daemon::start("ublk", &all);
            let flags = listed_flags(d.id());
            if verify {
                fio_verify_halves("batch-default", d.dev.to_str().unwrap(), 8 << 20, &["--rw=randrw", "--bsrange=4k-128k", "--iodepth=32"]);
            }
            let (st, out) = d.terminate();
            assert!(st.success(), "loop {args:?} exited with {st}");
            assert_eq!(queue_sum(&out, "errors"), 0, "loop {args:?}: {out}");
            assert_no_devices();
            flags
        };
        let batched = |args: &[&str], verify: bool| flags_of(args, verify).iter().any(|f| f == "UBLK_F_BATCH_IO");
        assert_eq!(batched(&["--queues", "2"], true), has, "the default device on {}", kernel_release());
        assert!(!batched(&["--no-batch"], false), "--no-batch");
        assert!(!batched(&["--depth", "1"], false), "--depth 1");
        if kernel_has(ublk::sys::abi::UBLK_F_PER_IO_DAEMON) {
            assert!(!batched(&["--threads-per-queue", "2"], false), "--threads-per-queue 2");
        }
        let flags = flags_of(&["--recovery"], false);
        assert!(!flags.iter().any(|f| f == "UBLK_F_BATCH_IO"), "--recovery: {flags:?}");
        if kernel_has(ublk::sys::abi::UBLK_F_QUIESCE) {
            assert!(flags.iter().any(|f| f == "UBLK_F_QUIESCE"), "--recovery without QUIESCE: {flags:?}");
        }
        let _ = std::fs::remove_file(&backing);
    }
}

driver_test! {
    /// `ublk del` while fio runs on a --batch device: fio ends (with errors,
    /// or done), nothing hangs, the device and its daemon are gone.
    fn batch_del_under_fio_leaves_nothing() {
        if !kernel_has(ublk::sys::abi::UBLK_F_BATCH_IO) {
            skipped("UBLK_F_BATCH_IO needs Linux 7.0+");
            return;
        }
        let mut d = Daemon::start("ublk", &["add", "-t", "null", "--batch", "--queues", "2", "--size", "1G"]);
        let id = d.id().to_string();
        let dev = d.dev.to_str().unwrap().to_string();
        let mut fio = std::process::Command::new("fio")
            .args(["--name=del", "--filename", &dev, "--rw=randrw", "--bs=4k", "--ioengine=io_uring", "--iodepth=64", "--direct=1", "--time_based", "--runtime=60", "--numjobs=2"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(2));
        let t0 = Instant::now();
        let (st, out, err) = ublk(&["del", "-n", &id]);
        assert!(st.success(), "ublk del under fio failed: {out} {err}");
        let fst = wait_timeout(&mut fio, Duration::from_secs(60)).unwrap_or_else(|| {
            let _ = fio.kill();
            panic!("fio hung after the device was deleted")
        });
        eprintln!("del under fio: fio ended ({fst}) {:?} after del", t0.elapsed());
        let dst = wait_timeout(&mut d.child, Duration::from_secs(30)).expect("the daemon did not exit after del");
        eprintln!("daemon exit: {dst}");
        assert_no_devices();
    }
}

driver_test! {
    /// `ublk quiesce` of a --batch --recovery device is refused with the
    /// reason and the way out (on 7.3, quiescing a batch device failed the
    /// writes in flight with EIO); the device stays live and keeps serving.
    fn batch_quiesce_is_refused_and_the_device_keeps_serving() {
        if !kernel_has(ublk::sys::abi::UBLK_F_BATCH_IO) || !kernel_has(ublk::sys::abi::UBLK_F_QUIESCE) {
            skipped("UBLK_F_BATCH_IO needs Linux 7.0+");
            return;
        }
        let backing = PathBuf::from("/tmp/batch-quiesce.img");
        sparse_file(&backing, 64 << 20);
        let d = Daemon::start("ublk", &["add", "-t", "loop", "--file", backing.to_str().unwrap(), "--batch", "--recovery", "--queues", "2"]);
        let id = d.id().to_string();
        let dev = d.dev.to_str().unwrap().to_string();
        let (st, out, err) = ublk(&["quiesce", "-n", &id]);
        assert!(!st.success(), "ublk quiesce of a batch device succeeded: {out}");
        assert!(err.contains("batched commands") && err.contains("ublk recover"), "unclear refusal: {err}");
        assert_eq!(dev_state(d.id()), "LIVE");
        fio_verify_halves("batch-quiesce", &dev, 8 << 20, &["--rw=randwrite", "--bs=4k", "--iodepth=16"]);
        let (st, out) = d.terminate();
        assert!(st.success(), "exited with {st}");
        assert_eq!(queue_sum(&out, "errors"), 0, "{out}");
        let _ = std::fs::remove_file(&backing);
        assert_no_devices();
    }
}

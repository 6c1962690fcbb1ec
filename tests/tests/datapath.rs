//! `--data-path copy|user-copy` through the CLI on every kernel (its own
//! test binary: the VM gives each one a time budget).

use std::path::PathBuf;

use ublk_tests::*;

fn fio_verify(dev: &str, bs: &str, span: u64) {
    let bs = format!("--bs={bs}");
    fio_verify_halves("verify", dev, span, &["--rw=randwrite", &bs, "--iodepth=32"]);
}

driver_test! {
    /// `--data-path copy|user-copy` for ramdisk and loop (and `--async` null
    /// on every data path): fio crc32c verify at 4k and 128k through each,
    /// the loop backing file holding a pattern written through the device.
    /// Kernels without UBLK_F_USER_COPY (before 6.5) refuse user-copy with
    /// an error naming the kernel and the fix, and create nothing.
    fn data_every_data_path_serves_verified_io() {
        let user_copy = kernel_version() >= (6, 5);
        for kind in ["ramdisk", "loop"] {
            for dp in ["copy", "user-copy"] {
                let backing = PathBuf::from("/tmp/data-dp.img");
                sparse_file(&backing, 64 << 20);
                let mut args = vec!["add", "-t", kind, "--queues", "2", "--depth", "64", "--data-path", dp];
                if kind == "ramdisk" {
                    args.extend(["--size", "64M"]);
                } else {
                    args.extend(["--file", backing.to_str().unwrap()]);
                }
                if dp == "user-copy" && !user_copy {
                    let (st, _, err) = ublk(&args);
                    assert!(!st.success(), "{kind} --data-path user-copy succeeded on {}", kernel_release());
                    assert!(err.contains("USER_COPY") && err.contains("6.5") && err.contains("copy"), "{kind}: unclear refusal: {err}");
                    assert_no_devices();
                    continue;
                }
                let d = Daemon::start("ublk", &args);
                let dev = d.dev.to_str().unwrap().to_string();
                fio_verify(&dev, "4k", 8 << 20);
                fio_verify(&dev, "128k", 8 << 20);
                let pat = pattern(1 << 20, 11);
                let pat_path = PathBuf::from("/tmp/data-dp.pat");
                std::fs::write(&pat_path, &pat).unwrap();
                run_ok("dd", &[&format!("if={}", pat_path.display()), &format!("of={dev}"), "bs=1M", "seek=3", "oflag=direct", "conv=fsync", "status=none"]);
                let (st, out) = d.terminate();
                assert!(st.success(), "{kind} --data-path {dp} exited with {st}");
                assert_eq!(queue_sum(&out, "errors"), 0, "{kind} {dp}: requests failed: {out}");
                if kind == "loop" {
                    assert!(read_range(&backing, 3 << 20, 1 << 20) == pat, "{kind} {dp}: the backing file does not hold the pattern");
                }
                let _ = std::fs::remove_file(&pat_path);
                let _ = std::fs::remove_file(&backing);
                assert_no_devices();
            }
        }
        for dp in ["none", "copy", "user-copy"] {
            if dp == "user-copy" && !user_copy {
                continue;
            }
            let d = Daemon::start("ublk", &["add", "-t", "null", "--async", "--queues", "2", "--data-path", dp]);
            let dev = d.dev.to_str().unwrap().to_string();
            let _ = fio_ok(&["--name=r", "--filename", &dev, "--rw=randread", "--bs=4k", "--ioengine=io_uring", "--iodepth=32", "--direct=1", "--size=16M"]);
            let (st, out) = d.terminate();
            assert!(st.success(), "null --async --data-path {dp} exited with {st}");
            assert!(queue_sum(&out, "reads") >= 4096, "null --async {dp}: reads not counted: {out}");
            assert_eq!(queue_sum(&out, "errors"), 0, "null --async {dp}: {out}");
        }
        assert_no_devices();
    }
}

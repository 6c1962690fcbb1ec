//! The minimal C server, `examples/c/ublk_null_min.c` (raw io_uring, no
//! liburing), against the real driver: it reports its device, reads are
//! zeros, writes succeed, and SIGTERM removes the device with exit code 0.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use ublk_tests::*;

/// `$UBLK_BIN_DIR/ublk-c-example` in the VM, else the one build.rs compiled.
fn c_example() -> PathBuf {
    match std::env::var_os("UBLK_BIN_DIR") {
        Some(dir) => PathBuf::from(dir).join("ublk-c-example"),
        None => PathBuf::from(env!("UBLK_C_EXAMPLE")),
    }
}

driver_test! {
    fn c_example_serves_zeros_and_stops_on_sigterm() {
        let exe = c_example();
        assert!(exe.exists(), "{} missing", exe.display());
        let mut child = Command::new(&exe)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", exe.display()));
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut line = String::new();
            let r = out.read_line(&mut line).map(|_| line);
            let _ = tx.send(r);
            out
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(l)) if l.trim().starts_with("/dev/ublkb") => l,
            other => {
                let _ = child.kill();
                let st = child.wait();
                delete_all_devices();
                panic!("ublk-c-example did not report a device: {other:?}, exit {st:?}");
            }
        };
        let mut out = reader.join().unwrap();
        let dev = PathBuf::from(line.trim());
        wait_for_path(&dev);
        let devs = dev.to_str().unwrap();
        assert_eq!(run_ok("blockdev", &["--getsize64", devs]).trim(), (256u64 << 20).to_string());

        // 4 MiB of direct reads: every byte is zero.
        let img = std::env::temp_dir().join(format!("ublk-c-example-{}.img", std::process::id()));
        run_ok("dd", &[&format!("if={devs}"), &format!("of={}", img.display()), "bs=64k", "count=64", "iflag=direct"]);
        let data = std::fs::read(&img).unwrap();
        let _ = std::fs::remove_file(&img);
        assert_eq!(data.len(), 4 << 20);
        assert!(data.iter().all(|&b| b == 0), "non-zero byte read from {devs}");
        // Writes are accepted (and discarded); reading back still gives zeros.
        run_ok("dd", &["if=/dev/urandom", &format!("of={devs}"), "bs=64k", "count=16", "oflag=direct"]);
        let mut f = std::fs::File::open(&dev).unwrap();
        let mut buf = vec![0xffu8; 1 << 20];
        f.read_exact(&mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        drop(f);

        // SIGTERM: STOP_DEV, DEL_DEV, exit 0, nothing left behind.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let st = wait_timeout(&mut child, Duration::from_secs(60));
        let st = st.unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            delete_all_devices();
            panic!("ublk-c-example did not exit within 60 s of SIGTERM")
        });
        let mut rest = String::new();
        let _ = out.read_to_string(&mut rest);
        assert!(st.success(), "ublk-c-example exited with {st}; stdout {rest:?}");
        assert_no_devices();
    }
}

driver_test! {
    /// `--serve-seconds` ends on its own, equally clean.
    fn c_example_serve_seconds_exits_cleanly() {
        let out = Command::new(c_example()).args(["--serve-seconds", "1"]).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}: {}", out.status, String::from_utf8_lossy(&out.stderr));
        assert!(stdout.trim().starts_with("/dev/ublkb"), "{stdout}");
        assert_no_devices();
    }
}

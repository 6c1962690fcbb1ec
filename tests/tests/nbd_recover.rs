//! `ublk recover` of an NBD device: the daemon killed, a new one connects
//! to the saved server and takes the device over.

mod nbd_util;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use nbd_util::*;
use ublk_tests::*;

driver_test! {
    /// `ublk recover` of an NBD device: with --recovery, the daemon is
    /// killed (SIGKILL) under fio's write phase; the device waits
    /// (UBLK_F_USER_RECOVERY), `ublk recover -n N` connects to the saved
    /// server and export again and takes the device over, the requests in
    /// flight at the kill are re-issued, and fio's crc32c verify passes;
    /// the device then reads what the export file holds.
    fn nbd_daemon_killed_recover_reconnects_to_the_saved_server() {
        lo_up();
        let img = PathBuf::from("/tmp/nbd-recover.img");
        sparse_file(&img, 32 << 20);
        let addr = Addr::Tcp(10815);
        let _srv = Server::qemu_nbd(&img, &addr, &[]);
        let mut d = nbd_dev(&addr, &["--export", "disk", "--queues", "2", "--depth", "64", "--recovery"]);
        let id = d.id();
        let dev = d.dev.to_str().unwrap().to_string();
        let half = format!("{}", 8u64 << 20);
        let cpus = format!("0-{}", nproc() - 1);
        let mut fio = Command::new("fio")
            .args(["--name=recover", "--filename", &dev, "--rw=randwrite", "--bssplit=4k/50:64k/50", "--ioengine=io_uring"])
            .args(["--iodepth=64", "--direct=1", "--numjobs=2", "--size", &half, "--offset_increment", &half])
            // At most 50 writes/s per job: about 5 s of writing, so the kill
            // 3 s in lands mid-job however fast the host (a quiet 7.3 VM
            // once finished the whole job within the 3 s).
            .args(["--rate_iops=50"])
            .args(["--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--cpus_allowed", &cpus, "--cpus_allowed_policy=split"])
            .args(["--group_reporting"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(3));
        assert!(fio.try_wait().unwrap().is_none(), "fio finished before the daemon was killed");
        d.signal(libc::SIGKILL);
        let _ = d.child.wait();
        eprintln!("daemon of device {id} killed");
        let r = Daemon::start("ublk", &["recover", "-n", &id.to_string()]);
        assert_eq!(r.dev, PathBuf::from(&dev));
        let st = wait_timeout(&mut fio, Duration::from_secs(300));
        let Some(st) = st else {
            let _ = fio.kill();
            panic!("fio did not finish within 300 s of the recovery");
        };
        let out = fio.wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(st.success(), "fio failed across the daemon's death and recovery ({st}):\n{text}");
        for l in text.lines().filter(|l| l.contains("err=")) {
            assert!(l.contains("err= 0"), "fio reported an error: {l}\n{text}");
        }
        cmp_ok(&dev, img.to_str().unwrap(), 32 << 20);
        let m = stop_stats(r);
        assert!(stat(&m, "sends") > 0, "the recovered daemon served through the server: {m:?}");
        let _ = std::fs::remove_file(&img);
    }
}

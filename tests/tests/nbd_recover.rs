//! `ublk recover` of an NBD device: the daemon killed, a new one connects
//! to the saved server and takes the device over.

mod nbd_util;

use std::path::PathBuf;
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
        let mut fio = spawn_write_verify("recover", &dev, &[
            // At most 50 writes/s per job: about 5 s of writing, so the kill
            // 3 s in lands mid-job however fast the host (a quiet 7.3 VM
            // once finished the whole job within the 3 s).
            "--rate_iops=50",
        ]);
        std::thread::sleep(Duration::from_secs(3));
        assert!(fio.try_wait().unwrap().is_none(), "fio finished before the daemon was killed");
        d.signal(libc::SIGKILL);
        let _ = d.child.wait();
        eprintln!("daemon of device {id} killed");
        let r = Daemon::start("ublk", &["recover", "-n", &id.to_string()]);
        assert_eq!(r.dev, PathBuf::from(&dev));
        finish_write_verify(fio, "the daemon's death and recovery");
        cmp_ok(&dev, img.to_str().unwrap(), 32 << 20);
        let m = stop_stats(r);
        assert!(stat(&m, "sends") > 0, "the recovered daemon served through the server: {m:?}");
        let _ = std::fs::remove_file(&img);
    }
}

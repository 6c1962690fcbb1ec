//! The library's examples, built outside the crate's internals (public API
//! only), serving real I/O.

use std::os::unix::fs::FileExt;

use ublk_tests::*;

driver_test! {
    /// `ublk/examples/xor_file.rs`: a custom async target (per-queue bounce
    /// buffers, owned-buffer operations on the queue's ring). fio writes and
    /// verifies through it (crc32c, mixed sizes, 2 jobs at depth 32), the
    /// backing file holds exactly the device's bytes XORed with the key,
    /// and SIGTERM stops it cleanly.
    fn examples_xor_file_serves_fio_verify_and_stores_xored_bytes() {
        let path = std::path::Path::new("/tmp/ublk-xor-example.img");
        sparse_file(path, 64 << 20);
        let d = Daemon::start("xor_file", &[path.to_str().unwrap(), "0x5a"]);
        let dev = d.dev.to_str().unwrap().to_string();
        // 8 MiB at 0 and 8 MiB at 32 MiB.
        fio_verify_jobs("xor", &dev, 8 << 20, 32 << 20, &["--rw=randwrite", "--bsrange=4k-128k", "--iodepth=32"]);
        // What the device reads, XORed with the key, is what the file holds.
        let devf = std::fs::File::open(&d.dev).unwrap();
        let mut through = vec![0u8; 1 << 20];
        devf.read_exact_at(&mut through, 0).unwrap();
        assert!(through.iter().any(|&b| b != 0), "fio wrote nothing at offset 0?");
        // An open /dev/ublkbN keeps the device from being deleted.
        drop(devf);
        let (st, _) = d.terminate();
        assert!(st.success(), "xor_file exited with {st}");
        let mut stored = vec![0u8; 1 << 20];
        std::fs::File::open(path).unwrap().read_exact_at(&mut stored, 0).unwrap();
        let mismatch = through.iter().zip(&stored).position(|(t, s)| t ^ 0x5a != *s);
        assert_eq!(mismatch, None, "the backing file does not hold the device's bytes XORed with 0x5a");
        let _ = std::fs::remove_file(path);
        assert_no_devices();
    }
}

//! Durability: what the kernel was told is durable (FLUSH, FUA) is durable in
//! the loop target's backing store.
//!
//! The backing file lives on ext4 on a memory-backed null_blk disk, with the
//! kernel's periodic writeback turned off, so a write the target left in the
//! backing file's page cache is not on that disk. After `kill -9` of the
//! server, the disk under ext4 is read with O_DIRECT at the file's physical
//! blocks (FIEMAP): what is there is what a power cut would have kept.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ublk_tests::*;

const BACKING_SIZE: u64 = 16 << 20;
const CHUNK: usize = 64 << 10;

/// Periodic writeback off for the test's duration (restored on drop).
struct NoWriteback(Vec<(&'static str, String)>);

impl NoWriteback {
    fn new() -> NoWriteback {
        let keys = [("/proc/sys/vm/dirty_writeback_centisecs", "0"), ("/proc/sys/vm/dirty_expire_centisecs", "360000")];
        let old = keys.iter().map(|(k, _)| (*k, std::fs::read_to_string(k).unwrap().trim().to_string())).collect();
        for (k, v) in keys {
            std::fs::write(k, v).unwrap();
        }
        NoWriteback(old)
    }
}

impl Drop for NoWriteback {
    fn drop(&mut self) {
        for (k, v) in &self.0 {
            let _ = std::fs::write(k, v);
        }
    }
}

/// A mounted ext4 on `dev`, unmounted on drop.
struct Mounted(PathBuf);

impl Mounted {
    fn ext4(dev: &Path, dir: &str) -> Mounted {
        run_ok("mkfs.ext4", &["-q", "-F", dev.to_str().unwrap()]);
        let mnt = PathBuf::from(dir);
        std::fs::create_dir_all(&mnt).unwrap();
        run_ok("mount", &[dev.to_str().unwrap(), mnt.to_str().unwrap()]);
        Mounted(mnt)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = run("umount", &[self.0.to_str().unwrap()]);
    }
}

/// The file's extents: (logical, physical, length) in bytes (FS_IOC_FIEMAP).
fn fiemap(f: &File) -> Vec<(u64, u64, u64)> {
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B; // _IOWR('f', 11, struct fiemap)
    const FIEMAP_FLAG_SYNC: u32 = 1;
    const N: usize = 64;
    // struct fiemap (32 bytes) + N struct fiemap_extent (56 bytes each), as u64s.
    let mut buf = vec![0u64; (32 + 56 * N) / 8];
    buf[0] = 0; // fm_start
    buf[1] = u64::MAX; // fm_length
                       // fm_flags (u32) | fm_mapped_extents (u32) << 32
    buf[2] = u64::from(FIEMAP_FLAG_SYNC);
    // fm_extent_count (u32) | fm_reserved (u32) << 32
    buf[3] = N as u64;
    // SAFETY: FS_IOC_FIEMAP reads the header and writes at most
    // fm_extent_count extents into the buffer, which has room for them.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP, buf.as_mut_ptr()) };
    assert_eq!(r, 0, "FIEMAP: {}", std::io::Error::last_os_error());
    let mapped = (buf[2] >> 32) as usize;
    (0..mapped).map(|i| (buf[4 + i * 7], buf[4 + i * 7 + 1], buf[4 + i * 7 + 2])).collect()
}

/// Physical byte offset of the file's byte `off`.
fn physical(extents: &[(u64, u64, u64)], off: u64) -> u64 {
    let (l, p, _) = extents
        .iter()
        .find(|(l, _, n)| (*l..*l + *n).contains(&off))
        .unwrap_or_else(|| panic!("offset {off} is in no extent: {extents:?}"));
    p + (off - l)
}

/// Reads `len` bytes at `off` of a block device with O_DIRECT.
fn read_direct(dev: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(dev).unwrap();
    let mut v = vec![0u8; len + 4096];
    let b = aligned(&mut v, len);
    f.read_exact_at(b, off).unwrap();
    b.to_vec()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Durable {
    /// The write was opened O_DSYNC: a FUA write (or write + flush).
    Dsync,
    /// A plain write, then fsync: a FLUSH.
    Fsync,
    /// Neither: the control, showing the test sees data that is not durable.
    None,
}

fn backing_file(dir: &Path) -> (PathBuf, Vec<(u64, u64, u64)>) {
    let p = dir.join("backing");
    let mut f = OpenOptions::new().read(true).write(true).create_new(true).open(&p).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(BACKING_SIZE >> 20) {
        f.write_all(&zeros).unwrap();
    }
    f.sync_all().unwrap();
    let ext = fiemap(&f);
    (p, ext)
}

/// Writes a chunk through a loop device over `backing`, made durable as
/// `sync` says, kills the server with SIGKILL, and returns what the disk
/// under the backing file holds there.
fn write_then_kill(backing: &Path, ext: &[(u64, u64, u64)], lower: &Path, off: u64, data: &[u8], sync: Durable) -> Vec<u8> {
    let d = Daemon::start("ublk", &["add", "-t", "loop", "--file", backing.to_str().unwrap(), "--queues", "1"]);
    let mut flags = libc::O_DIRECT;
    if sync == Durable::Dsync {
        flags |= libc::O_DSYNC;
    }
    let mut f = OpenOptions::new().read(true).write(true).custom_flags(flags).open(&d.dev).unwrap();
    let mut v = vec![0u8; data.len() + 4096];
    let b = aligned(&mut v, data.len());
    b.copy_from_slice(data);
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(b).unwrap();
    if sync == Durable::Fsync {
        f.sync_all().unwrap();
    }
    // A power cut now: the server dies before doing anything more.
    d.signal(libc::SIGKILL);
    let mut d = d;
    wait_timeout(&mut d.child, Duration::from_secs(30)).expect("server did not die of SIGKILL");
    drop(f);
    drop(d);
    delete_all_devices();
    assert_no_devices();
    read_direct(lower, physical(ext, off), data.len())
}

driver_test! {
    /// A write made durable with O_DSYNC (FUA) or fsync (FLUSH) through a
    /// loop device is in the backing file's blocks on the disk under it when
    /// the server is killed right after; a write that was not made durable
    /// is not (which shows the check can fail).
    fn durability_fua_and_flush_reach_the_backing_store() {
        let nb = Nullb::new("ublkdur", 64, 4096, &[]);
        let lower = Mounted::ext4(&nb.dev, "/tmp/ublk-dur-lower");
        let (backing, ext) = backing_file(&lower.0);
        eprintln!("backing file extents (logical, physical, len): {ext:?}");
        let _wb = NoWriteback::new();
        for (i, sync) in [Durable::Dsync, Durable::Fsync, Durable::None].into_iter().enumerate() {
            let off = (i as u64 + 1) << 20;
            let data = pattern(CHUNK, 100 + i as u64);
            let got = write_then_kill(&backing, &ext, &nb.dev, off, &data, sync);
            let durable = got == data;
            eprintln!("{sync:?}: data on the disk under the backing file after kill -9: {durable}");
            match sync {
                Durable::Dsync | Durable::Fsync => assert!(durable, "{sync:?}: the write was acknowledged as durable but is not on the disk under the backing file"),
                Durable::None => assert!(got.iter().all(|&b| b == 0), "the unsynced write reached the disk anyway: the test could not tell durable from not"),
            }
        }
        // Every write is in the backing file itself (the page cache) all along.
        let mut f = File::open(&backing).unwrap();
        for i in 0..3u64 {
            let mut got = vec![0u8; CHUNK];
            f.seek(SeekFrom::Start((i + 1) << 20)).unwrap();
            f.read_exact(&mut got).unwrap();
            assert_eq!(got, pattern(CHUNK, 100 + i), "chunk {i} missing from the backing file");
        }
    }
}

driver_test! {
    /// ext4 on a loop device: `sync` and `fsync` send FLUSH to the target
    /// (the device declares a volatile write cache), and the block layer's
    /// queue says so.
    fn durability_sync_on_ext4_reaches_the_target_as_flush() {
        let dir = PathBuf::from("/tmp/ublk-dur-flush");
        std::fs::create_dir_all(&dir).unwrap();
        let backing = dir.join("backing");
        File::create(&backing).unwrap().set_len(64 << 20).unwrap();
        let d = Daemon::start("ublk", &["add", "-t", "loop", "--file", backing.to_str().unwrap()]);
        let name = d.dev.file_name().unwrap().to_str().unwrap().to_string();
        let wc = std::fs::read_to_string(format!("/sys/block/{name}/queue/write_cache")).unwrap();
        assert_eq!(wc.trim(), "write back", "the loop device must declare a volatile write cache");
        let fua = std::fs::read_to_string(format!("/sys/block/{name}/queue/fua")).unwrap_or_default();
        eprintln!("write_cache: {}, fua: {}", wc.trim(), fua.trim());
        assert_eq!(fua.trim(), "1", "the loop device must declare FUA (it honours it)");
        // O_DSYNC direct writes go down as FUA writes, which the target must
        // see flagged (and make durable with RWF_DSYNC).
        let dev = d.dev.to_str().unwrap();
        run_ok("dd", &["if=/dev/zero", &format!("of={dev}"), "bs=4k", "count=4", "oflag=direct,dsync", "status=none"]);
        {
            let m = Mounted::ext4(&d.dev, "/tmp/ublk-dur-flush-mnt");
            let mut f = File::create(m.0.join("file")).unwrap();
            f.write_all(&pattern(1 << 20, 7)).unwrap();
            f.sync_all().unwrap();
            run_ok("sync", &[]);
        }
        let (st, out) = d.terminate();
        assert!(st.success(), "daemon exit {st}");
        let fua_writes = queue_sum(&out, "fua_writes");
        eprintln!("FUA writes served: {fua_writes}");
        assert!(fua_writes >= 4, "the 4 O_DSYNC writes did not reach the target as FUA writes:\n{out}");
        let flushes = queue_sum(&out, "flushes");
        eprintln!("flushes served: {flushes}");
        assert!(flushes > 0, "no FLUSH reached the loop target after fsync and sync:\n{out}");
        let _ = std::fs::remove_dir_all(&dir);
        assert_no_devices();
    }
}

driver_test! {
    /// A RAM disk and a null device declare no volatile cache: the block
    /// layer completes flushes itself.
    fn durability_ramdisk_and_null_have_no_write_cache() {
        for t in ["ramdisk", "null"] {
            let d = Daemon::start("ublk", &["add", "-t", t, "--size", "16M"]);
            let name = d.dev.file_name().unwrap().to_str().unwrap().to_string();
            let wc = std::fs::read_to_string(format!("/sys/block/{name}/queue/write_cache")).unwrap();
            assert_eq!(wc.trim(), "write through", "{t}");
            let (st, _) = d.terminate();
            assert!(st.success());
        }
        assert_no_devices();
    }
}

//! null_blk disks made through configfs: real block devices, in memory,
//! for tests that put a target on top of a disk.

use std::path::{Path, PathBuf};

use crate::wait_for_path;

/// A memory-backed null_blk disk made through configfs, removed on drop.
pub struct Nullb {
    cfs: PathBuf,
    /// Its block device node.
    pub dev: PathBuf,
}

impl Nullb {
    /// Makes disk `name` (its configfs directory) of `mb` MiB with
    /// `block_size`-byte blocks; `attrs` are further configfs attributes
    /// (name, value), written in order before the disk is powered on.
    pub fn new(name: &str, mb: u64, block_size: u32, attrs: &[(&str, String)]) -> Nullb {
        let cfs = PathBuf::from("/sys/kernel/config/nullb").join(name);
        assert!(Path::new("/sys/kernel/config/nullb").is_dir(), "null_blk's configfs directory is missing (null_blk not loaded?)");
        let _ = std::fs::remove_dir(&cfs);
        std::fs::create_dir(&cfs).unwrap_or_else(|e| panic!("mkdir {}: {e}", cfs.display()));
        let set = |k: &str, v: &str| std::fs::write(cfs.join(k), v).unwrap_or_else(|e| panic!("{}/{k} = {v}: {e}", cfs.display()));
        set("memory_backed", "1");
        set("blocksize", &block_size.to_string());
        set("size", &mb.to_string());
        for (k, v) in attrs {
            set(k, v);
        }
        set("power", "1");
        // 6.1 names the disk after the configfs directory, later kernels nullbN.
        let index = std::fs::read_to_string(cfs.join("index")).unwrap().trim().to_string();
        let dev = if Path::new("/sys/block").join(name).exists() {
            PathBuf::from("/dev").join(name)
        } else {
            PathBuf::from(format!("/dev/nullb{index}"))
        };
        wait_for_path(&dev);
        Nullb { cfs, dev }
    }
}

impl Drop for Nullb {
    fn drop(&mut self) {
        let _ = std::fs::write(self.cfs.join("power"), "0");
        let _ = std::fs::remove_dir(&self.cfs);
    }
}

//! A disk backed by a file or block device, through io_uring on the queue's
//! own ring: reads and writes become READ/WRITE operations, FLUSH becomes
//! fdatasync, a FUA write a `RWF_DSYNC` write, DISCARD punches a hole,
//! WRITE_ZEROES zeroes a range.
//!
//! The backing file's writes sit in the page cache (or a disk's write
//! cache, with O_DIRECT) until they are synced, so the target declares a
//! volatile write cache that honours FUA: `fsync` on the device reaches the
//! backing file as `fdatasync`.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use io_uring::{opcode, types};

use crate::error::{Error, Result};
use crate::target::{IoResult, Op, Request, Target, TargetIo, WriteCache};

/// How to open the backing file.
#[derive(Debug, Clone, Default)]
pub struct LoopOptions {
    /// Open with O_DIRECT (bypass the page cache).
    pub direct: bool,
    /// Open read-only.
    pub read_only: bool,
}

/// A loop target over a regular file or a block device.
#[derive(Debug)]
pub struct LoopTarget {
    file: File,
    path: PathBuf,
    size: u64,
    is_blockdev: bool,
    /// Whether the file still takes FALLOC_FL_ZERO_RANGE (see `write_zeroes`).
    zero_range: AtomicBool,
}

impl LoopTarget {
    /// Opens `path`. Missing or unreadable files are refused with the reason.
    pub fn open(path: &Path, opts: &LoopOptions) -> Result<Self> {
        let mut o = OpenOptions::new();
        o.read(true).write(!opts.read_only);
        if opts.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let file = o.open(path).map_err(|e| {
            let why = match e.kind() {
                std::io::ErrorKind::NotFound => "does not exist; create it first (e.g. truncate -s 1G FILE)".to_string(),
                std::io::ErrorKind::PermissionDenied => "is not readable and writable by this user".to_string(),
                _ => format!("cannot be opened: {e}"),
            };
            Error::InvalidConfig { what: "backing file", why: format!("{} {why}", path.display()) }
        })?;
        let meta = file.metadata().map_err(|e| Error::os(format!("stat {}", path.display()), e))?;
        let is_blockdev = meta.file_type().is_block_device();
        let size = if is_blockdev {
            let mut sz: u64 = 0;
            // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
            const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
            // SAFETY: the ioctl writes one u64 into `sz`.
            if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut sz) } != 0 {
                return Err(Error::os(format!("BLKGETSIZE64 on {}", path.display()), std::io::Error::last_os_error()));
            }
            sz
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(Error::InvalidConfig {
                what: "backing file",
                why: format!("{} is neither a regular file nor a block device", path.display()),
            });
        };
        Ok(LoopTarget { file, path: path.to_path_buf(), size, is_blockdev, zero_range: AtomicBool::new(true) })
    }

    /// The backing file's size in bytes (the default device size).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the backing file is a block device.
    pub fn is_block_device(&self) -> bool {
        self.is_blockdev
    }

    /// Zeroes `[off, off+len)`: FALLOC_FL_ZERO_RANGE, or, once the file has
    /// refused that, FALLOC_FL_PUNCH_HOLE.
    fn write_zeroes(&self, off: u64, len: u64) -> IoResult {
        let fd = self.file.as_raw_fd();
        let falloc = |mode: i32| {
            // SAFETY: fallocate on our own open fd; no memory is passed.
            if unsafe { libc::fallocate(fd, mode | libc::FALLOC_FL_KEEP_SIZE, off as libc::off_t, len as libc::off_t) } == 0 {
                Ok(0)
            } else {
                Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
            }
        };
        if self.zero_range.load(Ordering::Relaxed) {
            match falloc(libc::FALLOC_FL_ZERO_RANGE) {
                Err(libc::EOPNOTSUPP) => self.zero_range.store(false, Ordering::Relaxed),
                r => return r,
            }
        }
        falloc(libc::FALLOC_FL_PUNCH_HOLE)
    }

    /// The backing file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Target for LoopTarget {
    fn handle(&self, _req: &Request, _buf: &mut [u8]) -> IoResult {
        // Every request goes through `submit`.
        Err(libc::EOPNOTSUPP)
    }

    fn files(&self) -> Vec<RawFd> {
        vec![self.file.as_raw_fd()]
    }

    fn write_cache(&self) -> WriteCache {
        WriteCache::VolatileFua
    }

    fn submit(&self, req: &Request, buf: &mut [u8], io: &mut TargetIo<'_>) -> Option<IoResult> {
        let fd = io.file(0);
        let off = req.offset();
        let len = req.len() as u32;
        let sqe = match req.op {
            Op::Read => opcode::Read::new(fd, buf.as_mut_ptr(), buf.len() as u32).offset(off).build(),
            // FUA: durable when answered, without syncing anything else.
            Op::Write if req.fua() => opcode::Write::new(fd, buf.as_ptr(), buf.len() as u32).offset(off).rw_flags(libc::RWF_DSYNC).build(),
            Op::Write => opcode::Write::new(fd, buf.as_ptr(), buf.len() as u32).offset(off).build(),
            Op::Flush => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            Op::Discard => {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                opcode::Fallocate::new(fd, u64::from(len)).offset(off).mode(mode).build()
            }
            // Fix: tmpfs (and some other file systems) refuse FALLOC_FL_ZERO_RANGE
            // with -EOPNOTSUPP, which failed every WRITE_ZEROES (mkfs.ext4 on a
            // loop device over /tmp logged "operation not supported error").
            // Done synchronously so it can fall back to a hole punch, which
            // reads back as zeros too (as the kernel's loop driver does).
            Op::WriteZeroes => return Some(self.write_zeroes(off, u64::from(len))),
            Op::Other(_) => return Some(Err(libc::EOPNOTSUPP)),
        };
        // SAFETY: `buf` is the tag's buffer, valid until the request is
        // committed, which happens only after this operation completes.
        unsafe { io.push(sqe) };
        None
    }
}

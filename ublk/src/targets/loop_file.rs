//! A disk backed by a file or block device, an [async target](crate::aio)
//! on the queue's own ring: reads and writes become READ/WRITE operations
//! (short transfers finished with more), FLUSH becomes fdatasync, a FUA
//! write a `RWF_DSYNC` write, DISCARD punches a hole, WRITE_ZEROES zeroes a
//! range.
//!
//! The backing file's writes sit in the page cache (or a disk's write
//! cache, with O_DIRECT) until they are synced, so the target declares a
//! volatile write cache that honours FUA: `fsync` on the device reaches the
//! backing file as `fdatasync`.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::aio::{AsyncTarget, FileRef, Io, QueueContext, QueueTarget};
use crate::errno::Errno;
use crate::error::{Error, Result};
use crate::target::{IoResult, Op, WriteCache};
use crate::targets::shmem;

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
            // Its READs and WRITEs in the queue's thread (see `shmem`).
            if shmem::on_tmpfs(&file) {
                shmem::inline_io(&file);
            }
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
                Err(Errno::last())
            }
        };
        if self.zero_range.load(Ordering::Relaxed) {
            match falloc(libc::FALLOC_FL_ZERO_RANGE) {
                Err(Errno::EOPNOTSUPP) => self.zero_range.store(false, Ordering::Relaxed),
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

impl AsyncTarget for LoopTarget {
    type Queue<'a> = &'a LoopTarget;

    fn queue(&self, _q: &QueueContext) -> std::io::Result<&LoopTarget> {
        Ok(self)
    }

    fn files(&self) -> Vec<BorrowedFd<'_>> {
        vec![self.file.as_fd()]
    }

    /// Data moves only with `read_at`/`write_at`.
    fn zero_copy(&self) -> bool {
        true
    }

    fn write_cache(&self) -> WriteCache {
        WriteCache::VolatileFua
    }
}

impl QueueTarget for &LoopTarget {
    async fn handle(&self, mut io: Io<'_>) -> IoResult {
        let req = *io.request();
        let file = io.file(0);
        let (off, len) = (req.offset(), req.len());
        match req.op {
            Op::Read => read_full(&mut io, file, off, len).await,
            Op::Write => {
                // FUA: durable when answered, without syncing anything else.
                let flags = if req.fua() { libc::RWF_DSYNC } else { 0 };
                write_full(&io, file, off, len, flags).await
            }
            Op::Flush => io.ring().fsync(file, true).await,
            Op::Discard => {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                io.ring().fallocate(file, mode, off, len as u64).await
            }
            // tmpfs (and some other file systems) refuse FALLOC_FL_ZERO_RANGE
            // with -EOPNOTSUPP: done synchronously so it can fall back to a
            // hole punch, which reads back as zeros too (as the kernel's loop
            // driver does).
            Op::WriteZeroes => self.write_zeroes(off, len as u64),
            Op::Other(_) => Err(Errno::EOPNOTSUPP),
        }
    }
}

/// Reads the request's `len` bytes from `file` at `off` into its data (its
/// buffer, or its registered pages under zero copy). A short read (a
/// signal, a file shorter than the device) is finished with another;
/// nothing more at all fails the request.
pub(crate) async fn read_full(io: &mut Io<'_>, file: FileRef<'_>, off: u64, len: usize) -> IoResult {
    let mut done = 0;
    while done < len {
        match io.read_at(file, done..len, off + done as u64).await? {
            0 => return Err(Errno::EIO),
            n => done += n as usize,
        }
    }
    Ok(len as u32)
}

/// Writes the request's `len` bytes to `file` at `off`, finishing short
/// writes; `rw_flags` as for `pwritev2` (`RWF_DSYNC` for FUA).
pub(crate) async fn write_full(io: &Io<'_>, file: FileRef<'_>, off: u64, len: usize, rw_flags: i32) -> IoResult {
    let mut done = 0;
    while done < len {
        match io.write_at(file, done..len, off + done as u64, rw_flags).await? {
            0 => return Err(Errno::EIO),
            n => done += n as usize,
        }
    }
    Ok(len as u32)
}

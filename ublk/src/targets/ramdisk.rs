//! A memory-backed disk: its memory is a memfd (shmem pages, allocated
//! as they are written, returned by DISCARD).
//!
//! The process never reads or writes that memory itself: the kernel does
//! every copy, in a system call or an io_uring operation, so no two of
//! this process's threads can race on it.
//! * Served as an [async target](crate::aio) (what `ublk add -t ramdisk`
//!   does), a request costs one copy, as with the kernel's own `brd`: under
//!   zero copy (`DataPath::AutoBufReg`, `ZeroCopy`) a READ or WRITE of the
//!   memfd into or from the request's pages, which io_uring runs in the
//!   queue's thread (the memfd is `O_NONBLOCK` and, on 6.6+, `O_DIRECT`:
//!   see `shmem`); under user copy
//!   (`DataPath::UserCopy`) a `pwrite` or `pread` of `/dev/ublkcN` from or
//!   into the memfd's mapping, in the queue's thread (a READ of a range
//!   never written then commits its pages: the kernel faults them in to
//!   copy from them).
//! * Served as a [`Target`], a `pread` or `pwrite` of the memfd into or
//!   from the queue's buffer, which the kernel copies to or from the
//!   request: two copies.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use crate::aio::{AsyncTarget, Io, QueueContext, QueueTarget};
use crate::errno::Errno;
use crate::error::{Error, Result};
use crate::target::{IoResult, Op, Request, Target};
use crate::targets::loop_file::{read_full, write_full};
use crate::targets::shmem;
use crate::transfer::{transfer, Dir};

/// A RAM disk: a memfd of the device's size, zero-filled (shmem pages,
/// allocated as they are written, returned by DISCARD).
///
/// This process never reads or writes its memory: the kernel does every
/// copy. Served as an [`AsyncTarget`], a request costs one copy, as with
/// the kernel's `brd`: a READ or WRITE of the memfd into or from the
/// request's pages under zero copy, a `pread`/`pwrite` of `/dev/ublkcN`
/// under user copy (see [`RamQueue`]). Served as a [`Target`], a `pread`
/// or `pwrite` of the memfd into or from the queue's buffer, which the
/// kernel copies to or from the request.
pub struct RamDisk {
    memfd: File,
    /// The memfd mapped shared: only ever an address handed to the kernel
    /// (`pread`/`pwrite` of `/dev/ublkcN` under user copy), never read or
    /// written by this process.
    mem: NonNull<u8>,
    size: u64,
}

// SAFETY: the mapping is owned by the RamDisk and unmapped on drop; this
// process never reads or writes through it (its address goes only to
// system calls, where the kernel copies), so threads sharing the RamDisk
// have no memory of it to race on. The raw pointer is just an address.
unsafe impl Send for RamDisk {}
// SAFETY: as above.
unsafe impl Sync for RamDisk {}

impl std::fmt::Debug for RamDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RamDisk").field("size", &self.size).finish()
    }
}

fn mem_total() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let l = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    Some(l.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

impl RamDisk {
    /// Allocates `size` bytes (pages are committed as they are written).
    /// Refuses sizes above the machine's memory.
    pub fn new(size: u64) -> Result<Self> {
        if let Some(total) = mem_total() {
            if size > total {
                return Err(Error::InvalidConfig {
                    what: "ramdisk size",
                    why: format!(
                        "{size} bytes is more than this machine's memory ({total} bytes); use a smaller --size or the loop target"
                    ),
                });
            }
        }
        let len = usize::try_from(size).map_err(|_| Error::InvalidConfig { what: "ramdisk size", why: "too large".into() })?;
        let cannot = |e: std::io::Error| Error::InvalidConfig {
            what: "ramdisk size",
            why: format!("cannot allocate {size} bytes ({e}); use a smaller --size"),
        };
        // linux/memfd.h's MFD_NOEXEC_SEAL (6.3+; implies sealing): without
        // it or MFD_EXEC, 6.3+ kernels warn in dmesg. Older ones refuse it
        // with EINVAL: then plain sealing.
        const MFD_NOEXEC_SEAL: libc::c_uint = 0x0008;
        let create = |flags: libc::c_uint| {
            // SAFETY: the name is a NUL-terminated literal; the result is checked.
            unsafe { libc::memfd_create(c"ublk-ramdisk".as_ptr(), libc::MFD_CLOEXEC | flags) }
        };
        let mut fd = create(MFD_NOEXEC_SEAL);
        if fd < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            fd = create(libc::MFD_ALLOW_SEALING);
        }
        if fd < 0 {
            return Err(Error::os("memfd_create", std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(size).map_err(cannot)?;
        // The size is sealed: the memfd is reachable from safe code
        // (`AsyncTarget::files`), and a shrink would make the mapping's
        // pages past the end fault (SIGBUS) in `Target::handle`. Holes can
        // still be punched.
        // SAFETY: fcntl on our own descriptor; no memory is passed.
        if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) } != 0 {
            return Err(Error::os("sealing the ramdisk's memfd", std::io::Error::last_os_error()));
        }
        // Its READs and WRITEs in the queue's thread (see `shmem`).
        let memfd = shmem::reopen_memfd(memfd);
        shmem::inline_io(&memfd);
        // SAFETY: a fresh shared mapping of our own memfd, `len` bytes (its
        // size); it aliases no Rust object. Checked below.
        let p =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, memfd.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(cannot(std::io::Error::last_os_error()));
        }
        Ok(RamDisk { memfd, mem: NonNull::new(p as *mut u8).unwrap(), size })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Zeroes `[off, off+len)` and gives its whole pages back to the
    /// system: a hole punched in the memfd (shmem zeroes the partial pages).
    fn punch(&self, off: u64, len: u64) -> IoResult {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on our own memfd; no memory is passed.
        if unsafe { libc::fallocate(self.memfd.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) } == 0 {
            Ok(len as u32)
        } else {
            Err(Errno::last())
        }
    }

    /// The request's range, if it is inside the disk.
    fn range(&self, req: &Request) -> std::result::Result<(u64, u64), Errno> {
        let (off, len) = (req.offset(), req.len() as u64);
        match off.checked_add(len) {
            Some(end) if end <= self.size => Ok((off, len)),
            _ => Err(Errno::EIO),
        }
    }
}

impl Drop for RamDisk {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.mem.as_ptr() as *mut libc::c_void, self.size as usize) };
    }
}

impl Target for RamDisk {
    fn handle(&self, req: &Request, buf: &mut [u8]) -> IoResult {
        let (off, len) = self.range(req)?;
        if matches!(req.op, Op::Read | Op::Write) && buf.len() as u64 != len {
            // The queue hands out exactly req.len() bytes; anything else
            // (a caller of `handle` outside the queue) must not make us copy
            // past `buf`.
            return Err(Errno::EINVAL);
        }
        let dir = match req.op {
            Op::Read => Dir::FromFd,
            Op::Write => Dir::ToFd,
            Op::Discard | Op::WriteZeroes => return self.punch(off, len),
            Op::Flush => return Ok(0),
            Op::Other(_) => return Err(Errno::EOPNOTSUPP),
        };
        // SAFETY: `buf` is ours, exclusively borrowed, and `len` bytes long
        // (checked above).
        unsafe { transfer(self.memfd.as_fd(), buf.as_mut_ptr(), buf.len(), off, dir)? };
        Ok(len as u32)
    }
}

impl AsyncTarget for RamDisk {
    type Queue<'a> = RamQueue<'a>;

    fn queue(&self, q: &QueueContext) -> std::io::Result<RamQueue<'_>> {
        // Under user copy (and not zero copy) the data moves by pread/pwrite
        // of the char device, straight between the memory and the request.
        let char_dev = if q.zero_copy { None } else { q.char_dev.clone() };
        Ok(RamQueue { rd: self, char_dev })
    }

    fn files(&self) -> Vec<BorrowedFd<'_>> {
        vec![self.memfd.as_fd()]
    }

    /// Data moves only with `read_at`/`write_at` (or, under user copy, by
    /// the ramdisk's own `pread`/`pwrite` of `/dev/ublkcN`).
    fn zero_copy(&self) -> bool {
        true
    }

    /// Yes: see [`RamQueue`].
    fn user_copies_itself(&self) -> bool {
        true
    }
}

/// A queue's side of a [`RamDisk`] served as an [`AsyncTarget`]. Under user
/// copy (a device with `UBLK_F_USER_COPY` and no zero copy) a READ is
/// answered by a `pwrite` of `/dev/ublkcN` from the memory and a WRITE
/// taken by a `pread` into it, by the kernel in the queue's thread: one
/// copy, no operation on the ring, no worker thread, no queue buffer.
/// Otherwise each is a READ or WRITE of the memfd on the ring.
#[derive(Debug)]
pub struct RamQueue<'a> {
    rd: &'a RamDisk,
    /// `/dev/ublkcN` under user copy without zero copy.
    char_dev: Option<Arc<OwnedFd>>,
}

impl QueueTarget for RamQueue<'_> {
    async fn handle(&self, mut io: Io<'_>) -> IoResult {
        let req = *io.request();
        let (off, len) = self.rd.range(&req)?;
        let file = io.file(0);
        match (&self.char_dev, req.op) {
            (Some(dev), Op::Read | Op::Write) => {
                let dir = if req.op == Op::Read { Dir::ToFd } else { Dir::FromFd };
                let mem = self.rd.mem.as_ptr().wrapping_add(off as usize);
                // SAFETY: [off, off + len) is inside the mapping (`range`),
                // which lives as long as `self.rd`; this process never
                // references it (see `RamDisk`), only the kernel copies.
                unsafe { transfer(dev.as_fd(), mem, len as usize, io.user_copy_offset(), dir)? };
                Ok(len as u32)
            }
            (_, Op::Read) => read_full(&mut io, file, off, len as usize).await,
            (_, Op::Write) => write_full(&io, file, off, len as usize, 0).await,
            // The kernel zeroes the range (on the queue's ring, not
            // blocking its other requests).
            (_, Op::Discard | Op::WriteZeroes) => {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                io.ring().fallocate(file, mode, off, len).await?;
                Ok(len as u32)
            }
            (_, Op::Flush) => Ok(0),
            (_, Op::Other(_)) => Err(Errno::EOPNOTSUPP),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(op: Op, sector: u64, sectors: u32) -> Request {
        Request { q_id: 0, tag: 0, op, flags: 0, start_sector: sector, nr_sectors: sectors }
    }

    #[test]
    fn a_buffer_of_the_wrong_length_is_refused_not_overrun() {
        let rd = RamDisk::new(1 << 20).unwrap();
        let mut short = vec![0u8; 100];
        assert_eq!(rd.handle(&req(Op::Write, 0, 8), &mut short), Err(Errno::EINVAL));
        assert_eq!(rd.handle(&req(Op::Read, 0, 8), &mut short), Err(Errno::EINVAL));
        let mut data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        assert_eq!(rd.handle(&req(Op::Write, 8, 8), &mut data), Ok(4096));
        let mut back = vec![0u8; 4096];
        assert_eq!(rd.handle(&req(Op::Read, 8, 8), &mut back), Ok(4096));
        assert_eq!(back, data);
        // Past the end of the disk.
        assert_eq!(rd.handle(&req(Op::Read, (1 << 20) / 512 - 4, 8), &mut back), Err(Errno::EIO));
    }

    /// DISCARD and WRITE_ZEROES read back as zeroes, partial pages
    /// included, and leave the bytes around them alone.
    #[test]
    fn discard_and_write_zeroes_read_back_as_zeroes() {
        let rd = RamDisk::new(1 << 20).unwrap();
        let mut data = vec![0xa5u8; 64 << 10];
        assert_eq!(rd.handle(&req(Op::Write, 0, 128), &mut data), Ok(64 << 10));
        for op in [Op::Discard, Op::WriteZeroes] {
            assert_eq!(rd.handle(&req(Op::Write, 0, 128), &mut data), Ok(64 << 10));
            // Sectors 3..19: a partial page at each end.
            assert_eq!(rd.handle(&req(op, 3, 16), &mut []), Ok(16 * 512));
            let mut back = vec![0u8; 64 << 10];
            assert_eq!(rd.handle(&req(Op::Read, 0, 128), &mut back), Ok(64 << 10));
            assert!(back[..3 * 512].iter().all(|&b| b == 0xa5), "{op:?}");
            assert!(back[3 * 512..19 * 512].iter().all(|&b| b == 0), "{op:?}");
            assert!(back[19 * 512..].iter().all(|&b| b == 0xa5), "{op:?}");
        }
    }

    /// A queue takes the char device (user copy) only without zero copy.
    #[test]
    fn a_queue_copies_itself_only_under_user_copy() {
        let rd = RamDisk::new(1 << 20).unwrap();
        let stand_in = Arc::new(rd.files()[0].try_clone_to_owned().unwrap());
        let ctx = |char_dev: Option<Arc<OwnedFd>>, zero_copy| QueueContext {
            dev_id: 0,
            q_id: 0,
            thread: 0,
            threads: 1,
            depth: 1,
            user_copy: char_dev.is_some(),
            zero_copy,
            char_dev,
        };
        assert!(rd.queue(&ctx(Some(stand_in.clone()), false)).unwrap().char_dev.is_some());
        assert!(rd.queue(&ctx(Some(stand_in), true)).unwrap().char_dev.is_none());
        assert!(rd.queue(&ctx(None, false)).unwrap().char_dev.is_none());
        assert!(rd.user_copies_itself() && AsyncTarget::needs_data(&rd));
    }

    /// The memfd's size is sealed: safe code that reaches it through
    /// `AsyncTarget::files` cannot shrink it under the mapping.
    #[test]
    fn the_memfd_cannot_be_resized() {
        let rd = RamDisk::new(1 << 20).unwrap();
        let f = File::from(rd.files()[0].try_clone_to_owned().unwrap());
        assert!(f.set_len(4096).is_err());
        assert!(f.set_len(2 << 20).is_err());
        assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    }
}

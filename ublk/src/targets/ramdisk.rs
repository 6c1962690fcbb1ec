//! A memory-backed disk: its memory is a memfd (shmem pages, allocated
//! as they are written, returned by DISCARD).
//!
//! Served as an [async target](crate::aio) (what `ublk add -t ramdisk`
//! does), the data moves only inside the kernel, one copy per request as
//! with the kernel's own `brd`, and the process never touches the memory:
//! under zero copy (`DataPath::AutoBufReg`, `ZeroCopy`) each request is a
//! READ or WRITE of the memfd into or from the request's pages (on 7.3
//! io_uring ran those on its worker threads, a hop per request); under
//! user copy (`DataPath::UserCopy`) a `pwrite` or `pread`
//! of `/dev/ublkcN` from or into the memfd's mapping, in the queue's
//! thread. Served as a [`Target`], it copies between the mapping and the
//! queue's buffer.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Mutex;

use crate::aio::{AsyncTarget, Io, QueueContext, QueueTarget};
use crate::errno::Errno;
use crate::error::{Error, Result};
use crate::target::{IoResult, Op, Request, Target};
use crate::targets::loop_file::{read_full, write_full};

/// Bytes covered by one lock stripe.
const CHUNK: u64 = 64 << 10;
const STRIPES: usize = 256;

/// A RAM disk: a memfd of the device's size, zero-filled.
///
/// As a [`Target`], queues copy through the memfd's mapping concurrently;
/// overlapping requests are serialised per 64 KiB chunk by striped locks,
/// so no byte is ever written by two threads at once (a data race); the
/// block layer promises no ordering between overlapping requests anyway.
/// As an [`AsyncTarget`] the kernel moves every byte (READ/WRITE on the
/// memfd) and no lock is taken.
pub struct RamDisk {
    memfd: File,
    mem: NonNull<u8>,
    size: u64,
    stripes: Vec<Mutex<()>>,
}

// SAFETY: the mapping is owned by the RamDisk, and every access to it
// through the mapping is under the stripe locks (see `with_chunks`); the
// raw pointer itself is just an address. (Served as an AsyncTarget, the
// kernel reads and writes the memfd instead, with no lock: one RamDisk is
// served one way, by one device; serving it both ways at once would race
// the kernel's copies against this process's.)
unsafe impl Send for RamDisk {}
// SAFETY: as above: all access through the mapping is under the stripe
// locks.
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
        // SAFETY: a fresh shared mapping of our own memfd, `len` bytes (its
        // size); it aliases no Rust object. Checked below.
        let p =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, memfd.as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(cannot(std::io::Error::last_os_error()));
        }
        Ok(RamDisk { memfd, mem: NonNull::new(p as *mut u8).unwrap(), size, stripes: (0..STRIPES).map(|_| Mutex::new(())).collect() })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Runs `f(offset in disk, offset in request, len)` chunk by chunk, each
    /// under its stripe's lock.
    fn with_chunks(&self, off: u64, len: u64, mut f: impl FnMut(u64, usize, usize)) {
        let mut done = 0u64;
        while done < len {
            let pos = off + done;
            let n = (CHUNK - pos % CHUNK).min(len - done);
            let _g = self.stripes[((pos / CHUNK) as usize) % STRIPES].lock().unwrap_or_else(|e| e.into_inner());
            f(pos, done as usize, n as usize);
            done += n;
        }
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
        let base = self.mem.as_ptr();
        match req.op {
            Op::Read => self.with_chunks(off, len, |pos, at, n| {
                // SAFETY: [pos, pos+n) is inside the mapping (checked above)
                // and locked; [at, at+n) is inside `buf` (len == buf.len()).
                unsafe { std::ptr::copy_nonoverlapping(base.add(pos as usize), buf.as_mut_ptr().add(at), n) }
            }),
            Op::Write => self.with_chunks(off, len, |pos, at, n| {
                // SAFETY: as for reads, in the other direction.
                unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr().add(at), base.add(pos as usize), n) }
            }),
            Op::Discard | Op::WriteZeroes => {
                // Chunk by chunk, each under its stripe's lock: no copy of
                // this process reads or writes those bytes meanwhile.
                let mut r = Ok(0);
                self.with_chunks(off, len, |pos, _, n| {
                    if r.is_ok() {
                        r = self.punch(pos, n as u64);
                    }
                });
                r?;
            }
            Op::Flush => {}
            Op::Other(_) => return Err(Errno::EOPNOTSUPP),
        }
        Ok(len as u32)
    }
}

impl AsyncTarget for RamDisk {
    type Queue<'a> = RamQueue<'a>;

    fn queue(&self, q: &QueueContext) -> std::io::Result<RamQueue<'_>> {
        // Under user copy (and not zero copy) the data moves by pread/pwrite
        // on the char device, straight between the memory and the request.
        let char_dev = match q.char_dev() {
            Some(fd) if !q.zero_copy => Some(fd.try_clone_to_owned()?),
            _ => None,
        };
        Ok(RamQueue { rd: self, char_dev })
    }

    fn files(&self) -> Vec<BorrowedFd<'_>> {
        vec![self.memfd.as_fd()]
    }

    /// No: the queues keep no buffers under user copy, where the ramdisk
    /// copies between `/dev/ublkcN` and its memory itself; elsewhere it
    /// moves data only with `read_at`/`write_at`.
    fn needs_data(&self) -> bool {
        false
    }

    /// Data moves only with `read_at`/`write_at`, or by the kernel under
    /// user copy.
    fn zero_copy(&self) -> bool {
        true
    }
}

/// A queue's side of a [`RamDisk`] served as an [`AsyncTarget`].
#[derive(Debug)]
pub struct RamQueue<'a> {
    rd: &'a RamDisk,
    /// `/dev/ublkcN` under user copy without zero copy.
    char_dev: Option<OwnedFd>,
}

impl RamQueue<'_> {
    /// Under user copy: a READ's answer written to the request from the
    /// memory (`pwrite` on the char device), or a WRITE's data read into
    /// it (`pread`), by the kernel in this thread: one copy, no operation
    /// on the ring, no worker thread.
    fn user_copy(&self, fd: &OwnedFd, io: &Io<'_>, off: u64, len: u64) -> IoResult {
        let at = io.user_copy_offset();
        let mut done = 0u64;
        while done < len {
            let mem = self.rd.mem.as_ptr().wrapping_add((off + done) as usize);
            let (n, k) = ((len - done) as usize, (at + done) as libc::off_t);
            let r = match io.request().op {
                // SAFETY: [off, off+len) is inside the mapping (`range`); the
                // kernel reads it (pwrite) or writes it (pread), as it does
                // for the memfd's READ/WRITE under zero copy; no Rust
                // reference to the mapping exists while the ramdisk is
                // served as an AsyncTarget.
                Op::Read => unsafe { libc::pwrite(fd.as_raw_fd(), mem as *const libc::c_void, n, k) },
                // SAFETY: as above.
                _ => unsafe { libc::pread(fd.as_raw_fd(), mem as *mut libc::c_void, n, k) },
            };
            match r {
                0 => return Err(Errno::EIO),
                r if r > 0 => done += r as u64,
                _ => match Errno::last() {
                    e if e.raw() == libc::EINTR => {}
                    e => return Err(e),
                },
            }
        }
        Ok(len as u32)
    }
}

impl QueueTarget for RamQueue<'_> {
    async fn handle(&self, mut io: Io<'_>) -> IoResult {
        let req = *io.request();
        let (off, len) = self.rd.range(&req)?;
        let file = io.file(0);
        match req.op {
            Op::Read | Op::Write if self.char_dev.is_some() => self.user_copy(self.char_dev.as_ref().unwrap(), &io, off, len),
            Op::Read => read_full(&mut io, file, off, len as usize).await,
            Op::Write => write_full(&io, file, off, len as usize, 0).await,
            // The kernel zeroes the range (on the queue's ring, not
            // blocking its other requests); nothing of this process touches
            // the memory, so no lock is needed.
            Op::Discard | Op::WriteZeroes => {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                io.ring().fallocate(file, mode, off, len).await?;
                Ok(len as u32)
            }
            Op::Flush => Ok(0),
            Op::Other(_) => Err(Errno::EOPNOTSUPP),
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

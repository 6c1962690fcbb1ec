//! A memory-backed disk.

use std::ptr::NonNull;
use std::sync::Mutex;

use crate::errno::Errno;
use crate::error::{Error, Result};
use crate::target::{IoResult, Op, Request, Target};

/// Bytes covered by one lock stripe.
const CHUNK: u64 = 64 << 10;
const STRIPES: usize = 256;

/// A RAM disk: one anonymous mapping of the device's size, zero-filled.
///
/// Queues serve requests concurrently; overlapping requests are serialised
/// per 64 KiB chunk by striped locks, so no byte is ever written by two
/// threads at once (a data race) — the block layer promises no ordering
/// between overlapping requests anyway.
pub struct RamDisk {
    mem: NonNull<u8>,
    size: u64,
    stripes: Vec<Mutex<()>>,
}

// SAFETY: the mapping is owned by the RamDisk and only accessed under the
// stripe locks (see `with_chunks`); the raw pointer itself is just an address.
unsafe impl Send for RamDisk {}
// SAFETY: as above: all access to the memory goes through the stripe locks.
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
        // SAFETY: a fresh private anonymous mapping aliases nothing; checked below.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        if p == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            return Err(Error::InvalidConfig {
                what: "ramdisk size",
                why: format!("cannot allocate {size} bytes ({e}); use a smaller --size"),
            });
        }
        Ok(RamDisk { mem: NonNull::new(p as *mut u8).unwrap(), size, stripes: (0..STRIPES).map(|_| Mutex::new(())).collect() })
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
}

impl Drop for RamDisk {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.mem.as_ptr() as *mut libc::c_void, self.size as usize) };
    }
}

impl Target for RamDisk {
    fn handle(&self, req: &Request, buf: &mut [u8]) -> IoResult {
        let off = req.offset();
        let len = req.len() as u64;
        if off.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Errno::EIO);
        }
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
            Op::Discard | Op::WriteZeroes => self.with_chunks(off, len, |pos, _, n| {
                // SAFETY: [pos, pos+n) is inside the mapping and locked.
                unsafe { std::ptr::write_bytes(base.add(pos as usize), 0, n) }
            }),
            Op::Flush => {}
            Op::Other(_) => return Err(Errno::EOPNOTSUPP),
        }
        Ok(len as u32)
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
}

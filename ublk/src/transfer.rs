//! Whole-range `pread`/`pwrite` between memory and a descriptor: what the
//! queue's user copy (`/dev/ublkcN` at
//! [`user_copy_offset`](crate::queue::user_copy_offset)) and the ramdisk's
//! memfd need. The kernel may move fewer bytes than asked (a user copy
//! stops at a fault in the buffer, a signal interrupts it) and says so
//! with a short count, so one call is not enough.

use std::os::fd::{AsRawFd, BorrowedFd};

use crate::errno::Errno;

/// Which way [`transfer`] copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    /// `pwrite`: from the memory to the descriptor.
    ToFd,
    /// `pread`: from the descriptor into the memory.
    FromFd,
}

/// `pwrite` (`ToFd`) or `pread` (`FromFd`) of `len` bytes at `ptr`, at
/// `pos` of `fd`, finishing short transfers. The end of the file before
/// `len` bytes is EIO.
///
/// # Safety
/// `ptr..ptr + len` must be valid for reads (`ToFd`) or writes (`FromFd`)
/// for the whole call, and no Rust reference may cover those bytes
/// meanwhile (the kernel reads or writes them).
pub(crate) unsafe fn transfer(fd: BorrowedFd<'_>, ptr: *mut u8, len: usize, pos: u64, dir: Dir) -> std::result::Result<(), Errno> {
    let mut done = 0usize;
    while done < len {
        let p = ptr.wrapping_add(done) as *mut libc::c_void;
        let (n, at) = (len - done, (pos + done as u64) as libc::off_t);
        let r = match dir {
            // SAFETY: the caller's promise, for [done, len) of the range.
            Dir::ToFd => unsafe { libc::pwrite(fd.as_raw_fd(), p, n, at) },
            // SAFETY: as above.
            Dir::FromFd => unsafe { libc::pread(fd.as_raw_fd(), p, n, at) },
        };
        match r {
            0 => return Err(Errno::EIO),
            r if r > 0 => done += r as usize,
            _ => match Errno::last() {
                e if e.raw() == libc::EINTR => {}
                e => return Err(e),
            },
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    /// An anonymous file of `size` bytes.
    fn memfd(size: i64) -> OwnedFd {
        // SAFETY: the name is a NUL-terminated literal; the result is checked.
        let fd = unsafe { libc::memfd_create(c"transfer-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: plain system call on our descriptor.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size) }, 0);
        fd
    }

    /// `transfer` moves exactly the bytes asked, both ways, at the given
    /// position, and a file that ends first is EIO (a memfd stands in for
    /// `/dev/ublkcN`).
    #[test]
    fn transfer_moves_whole_ranges_and_reports_a_short_file() {
        let fd = memfd(1 << 20);
        let mut out: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        // SAFETY: `out` is ours and 8192 bytes long.
        unsafe { transfer(fd.as_fd(), out.as_mut_ptr(), out.len(), 4096, Dir::ToFd).unwrap() };
        let mut back = vec![0u8; 8192];
        // SAFETY: as above.
        unsafe { transfer(fd.as_fd(), back.as_mut_ptr(), back.len(), 4096, Dir::FromFd).unwrap() };
        assert_eq!(back, out);
        // SAFETY: as above; the file ends 4096 bytes in.
        let r = unsafe { transfer(fd.as_fd(), back.as_mut_ptr(), back.len(), (1 << 20) - 4096, Dir::FromFd) };
        assert_eq!(r, Err(Errno::EIO));
    }
}

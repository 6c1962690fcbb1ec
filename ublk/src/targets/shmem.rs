//! Shmem files (a tmpfs file, a memfd) under io_uring: what it takes for
//! their READs and WRITEs to run in the queue's thread.
//!
//! io_uring issues an operation inline only on a file that takes
//! `IOCB_NOWAIT`, which it learns from `FMODE_NOWAIT` (shmem sets none) or
//! from `O_NONBLOCK`; and a buffered WRITE only where the file system can
//! write its page cache without blocking (`FOP_BUFFER_WASYNC`: ext4, xfs,
//! btrfs; not shmem), or a direct one. Anything else goes to one of
//! io_uring's worker threads, a wake-up and two context switches per
//! request. tmpfs has taken `O_DIRECT` since 6.6 and ignores it: its reads
//! and writes go through its page cache either way, with no alignment
//! asked of them. Measured on 7.3 (instructions counted), a loop device
//! over a tmpfs file: 14.5 us per 4k read instead of 16.2, 15.1 per 4k
//! write instead of 16.8.
//!
//! The price: the queue's thread itself now waits where shmem waits, which
//! `IOCB_NOWAIT` does not stop: on the inode's lock (a write of another
//! queue to the same file, a DISCARD's hole punch), on page allocation
//! (a first write to a hole, with reclaim under memory pressure) and on
//! swap-in. In memory, all of them; a worker thread waited there before.
//! A file system that ignores `IOCB_NOWAIT` and waits on a network or a
//! FUSE server would stall the queue's thread for that long, so only shmem
//! files are marked. Kernels up to 6.4 ran reads of tmpfs inline without
//! any flag (a file system without a block device passed io_uring's test);
//! 6.5 runs them inline with `O_NONBLOCK`, writes not; 6.6+ both.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

/// Marks a shmem file `O_NONBLOCK`, and `O_DIRECT` where it takes that
/// (a tmpfs file on 6.6+; a memfd never, see [`reopen_memfd`]), so that
/// io_uring runs its READs and WRITEs inline. Whether the file is now
/// `O_NONBLOCK`; best effort, as it only saves work.
///
/// Call it before the file is registered with any ring: io_uring decides
/// at registration whether a fixed file may be tried inline, but reads
/// `O_NONBLOCK` again per request, and a fixed file marked after its
/// registration fails every READ and WRITE with -EAGAIN. A plain
/// `read`/`write` ignores `O_NONBLOCK` on a regular file.
pub(crate) fn inline_io(file: &File) -> bool {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor `file` keeps open for the call; no
    // memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return false;
    }
    // F_SETFL refuses O_DIRECT (EINVAL) where the file was not opened from
    // a file system that takes it (tmpfs before 6.6, a memfd).
    // SAFETY: as above.
    [libc::O_NONBLOCK | libc::O_DIRECT, libc::O_NONBLOCK].into_iter().any(|add| unsafe { libc::fcntl(fd, libc::F_SETFL, flags | add) } == 0)
}

/// Whether `file` lives on tmpfs (`statfs`'s `TMPFS_MAGIC`).
pub(crate) fn on_tmpfs(file: &File) -> bool {
    // SAFETY: `statfs` is plain old data, for which all zeroes is a value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one `struct statfs` into `st` and reads no
    // other memory.
    (unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) }) == 0 && st.f_type == libc::TMPFS_MAGIC
}

/// The memfd `memfd`, opened again through `/proc/self/fd`: a memfd is not
/// opened through tmpfs, so it cannot take `O_DIRECT`; the same inode
/// opened from its /proc link can (6.6+), and keeps its seals (they belong
/// to the inode). `memfd` itself where that fails, or where what opened is
/// not the same inode (a /proc that is not this process's procfs).
pub(crate) fn reopen_memfd(memfd: File) -> File {
    let Ok(again) = std::fs::OpenOptions::new().read(true).write(true).open(format!("/proc/self/fd/{}", memfd.as_raw_fd())) else {
        return memfd;
    };
    let same = match (memfd.metadata(), again.metadata()) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    };
    if same {
        again
    } else {
        memfd
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn fl(f: &File) -> i32 {
        // SAFETY: F_GETFL on an open descriptor.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) }
    }

    fn memfd() -> File {
        // SAFETY: a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"shmem-test".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nothing else owns.
        unsafe { File::from_raw_fd(fd) }
    }

    #[test]
    fn a_memfd_is_shmem_and_takes_o_nonblock() {
        let m = memfd();
        assert!(on_tmpfs(&m), "a memfd reports TMPFS_MAGIC");
        assert!(inline_io(&m));
        assert_ne!(fl(&m) & libc::O_NONBLOCK, 0);
        // A memfd refuses O_DIRECT: only O_NONBLOCK was kept.
        assert_eq!(fl(&m) & libc::O_DIRECT, 0);
    }

    #[test]
    fn a_reopened_memfd_is_the_same_sealed_inode() {
        let m = memfd();
        m.set_len(1 << 20).unwrap();
        // SAFETY: fcntl on our own descriptor.
        assert_eq!(unsafe { libc::fcntl(m.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) }, 0);
        let ino = m.metadata().unwrap().ino();
        let r = reopen_memfd(m);
        assert_eq!(r.metadata().unwrap().ino(), ino);
        assert!(r.set_len(1 << 19).is_err(), "the seals hold on the reopened memfd");
        assert!(inline_io(&r));
        assert_ne!(fl(&r) & libc::O_NONBLOCK, 0);
    }

    #[test]
    fn a_file_elsewhere_is_not_tmpfs() {
        let f = File::open("/proc/self/stat").unwrap();
        assert!(!on_tmpfs(&f));
    }
}

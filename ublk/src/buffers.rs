//! Memory the kernel reads or writes for a queue: the descriptor array it
//! publishes requests in, and the per-tag buffers it copies data through.

use std::os::fd::RawFd;
use std::ptr::NonNull;

use ublk_sys as sys;

use crate::error::{Error, Result};

/// Page size of this machine.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

pub(crate) fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// Offset in `/dev/ublkcN` of queue `q_id`'s descriptor array. The stride is
/// fixed by the largest depth, not the device's: `UBLKSRV_CMD_BUF_OFFSET +
/// q_id * round_up(UBLK_MAX_QUEUE_DEPTH * sizeof(ublksrv_io_desc), PAGE_SIZE)`.
pub fn desc_offset(q_id: u16) -> u64 {
    let stride = round_up(sys::UBLK_MAX_QUEUE_DEPTH as usize * std::mem::size_of::<sys::ublksrv_io_desc>(), page_size());
    u64::from(sys::UBLKSRV_CMD_BUF_OFFSET) + u64::from(q_id) * stride as u64
}

/// Length of the descriptor mapping of a queue of `depth` tags.
pub fn desc_len(depth: u16) -> usize {
    round_up(usize::from(depth) * std::mem::size_of::<sys::ublksrv_io_desc>(), page_size())
}

/// A memory mapping, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    pub(crate) fn new(len: usize, prot: i32, flags: i32, fd: RawFd, off: u64, what: &str) -> Result<Self> {
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) aliases no
        // Rust object; the result is checked before use.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, fd, off as libc::off_t) };
        if p == libc::MAP_FAILED {
            return Err(Error::os(what.to_string(), std::io::Error::last_os_error()));
        }
        Ok(Mapping { ptr: NonNull::new(p as *mut u8).unwrap(), len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len) };
    }
}

// SAFETY: a Mapping is an address range this process owns; moving or sharing
// the handle between threads touches no memory. Every access to the bytes
// goes through `unsafe` code that states who may touch them and when.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only exposes the address and length.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Start of the mapping.
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

/// One queue's per-tag data buffers: `depth` page-aligned buffers of
/// `buf_size` bytes, whose addresses go to the kernel in FETCH and COMMIT
/// commands. The kernel copies a request's data into or out of its tag's
/// buffer until that tag's command completes, so the buffers must outlive
/// every command that names them: [`Device::serve`](crate::Device::serve)
/// keeps them until the device is deleted (DEL_DEV returns only once every
/// ring holding `/dev/ublkcN` is gone), and a queue dropped with commands
/// still outstanding leaks them rather than unmapping memory the kernel may
/// still write.
#[derive(Debug)]
pub(crate) struct IoBufs {
    map: Mapping,
    buf_size: usize,
    depth: u16,
}

impl IoBufs {
    /// Allocates `depth` buffers of `max_io_buf_bytes` rounded up to pages.
    pub(crate) fn new(max_io_buf_bytes: u32, depth: u16, q_id: u16) -> Result<Self> {
        let buf_size = round_up(max_io_buf_bytes as usize, page_size());
        let map = Mapping::new(
            buf_size * usize::from(depth),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
            &format!("allocating the io buffers of queue {q_id}"),
        )?;
        Ok(IoBufs { map, buf_size, depth })
    }

    /// Bytes per tag.
    pub(crate) fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// The address of `tag`'s buffer, for the kernel.
    pub(crate) fn addr(&self, tag: u16) -> u64 {
        assert!(tag < self.depth);
        self.map.ptr() as u64 + (usize::from(tag) * self.buf_size) as u64
    }

    /// `tag`'s buffer, bytes `from..to`.
    ///
    /// # Safety
    /// The kernel must not be accessing the tag's buffer (the tag's request
    /// is owned by the server: between the CQE that delivered it and the
    /// commit), and no other reference to this range may be live.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice(&self, tag: u16, from: usize, to: usize) -> &mut [u8] {
        assert!(tag < self.depth && from <= to && to <= self.buf_size);
        // SAFETY: the range lies inside the tag's buffer, inside our mapping
        // (asserted above); exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.map.ptr().add(usize::from(tag) * self.buf_size + from), to - from) }
    }
}

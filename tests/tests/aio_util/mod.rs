//! Helpers of the async target tests (aio_answers.rs, aio_cancel.rs,
//! aio_fixed.rs): sizes, the atomic ordering the targets' counters use, and
//! one O_DIRECT read or write through the device.

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;

use ublk_tests::*;

pub const MIB: u64 = 1 << 20;
/// (aio_fixed.rs counts nothing.)
#[allow(dead_code)]
pub const SEQ: Ordering = Ordering::SeqCst;

/// One O_DIRECT read or write of `len` bytes at `off`: the data read, or the
/// errno.
pub fn direct(dev: &Path, off: u64, len: usize, write: Option<&[u8]>) -> Result<Vec<u8>, i32> {
    let f = OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(dev).unwrap();
    let mut v = vec![0u8; len + 4096];
    let b = aligned(&mut v, len);
    let r = match write {
        Some(d) => {
            b.copy_from_slice(d);
            f.write_at(b, off)
        }
        None => f.read_at(b, off),
    };
    match r {
        Ok(n) if n == len => Ok(b.to_vec()),
        Ok(n) => panic!("short transfer of {n} of {len} bytes at {off} reached the reader"),
        Err(e) => Err(e.raw_os_error().unwrap()),
    }
}

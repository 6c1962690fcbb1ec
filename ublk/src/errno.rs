//! An errno, as the kernel and io_uring report failures.

use std::fmt;

/// A positive errno value (`EIO`, `ENOSPC`...): what an io_uring operation
/// failed with, and what a target answers a request with.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(i32);

macro_rules! errnos {
    ($($name:ident),*) => {
        impl Errno {
            $(
                #[doc = concat!("`", stringify!($name), "`")]
                pub const $name: Errno = Errno(libc::$name);
            )*
        }
    };
}

errnos!(
    EIO, ENOSPC, EOPNOTSUPP, EINVAL, EPERM, EACCES, EAGAIN, ENOMEM, ECANCELED, ETIME, ENOTCONN, ECONNRESET, EPIPE, EBADF, EROFS, ENOBUFS
);

impl Errno {
    /// `errno` as given (positive).
    pub const fn new(errno: i32) -> Errno {
        Errno(errno)
    }

    /// From a completion's `res` (negative errno).
    pub const fn from_res(res: i32) -> Errno {
        Errno(-res)
    }

    /// The raw positive value.
    pub const fn raw(self) -> i32 {
        self.0
    }

    /// The calling thread's `errno` after a failed libc call.
    pub fn last() -> Errno {
        Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Errno({}: {})", self.0, std::io::Error::from_raw_os_error(self.0))
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

impl std::error::Error for Errno {}

impl From<Errno> for std::io::Error {
    fn from(e: Errno) -> Self {
        std::io::Error::from_raw_os_error(e.0)
    }
}

impl From<std::io::Error> for Errno {
    /// The error's errno, or `EIO` for an error that has none.
    fn from(e: std::io::Error) -> Self {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl From<Errno> for i32 {
    fn from(e: Errno) -> i32 {
        e.0
    }
}

//! How request data travels between the block layer and the server
//! ([`DataPath`]): copied by the kernel, copied by the server
//! (`UBLK_F_USER_COPY`), not at all, or zero copy.

use ublk_sys as sys;

/// How request data travels between the block layer and the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataPath {
    /// The kernel copies each request's data into (writes) or out of (reads)
    /// a per-tag buffer that the queue allocates, at FETCH/COMMIT time.
    /// Every kernel, every target.
    #[default]
    Copy,
    /// No data moves at all, for a target that never looks at it (a null
    /// target; see [`Target::needs_data`](crate::Target::needs_data)). Where the kernel offers
    /// `UBLK_F_USER_COPY` (6.5+) the device is created with it: the kernel
    /// then copies nothing at commit, FETCH and COMMIT carry buffer address 0
    /// (the kernel requires 0 under USER_COPY) and the queue allocates no
    /// buffers. On older kernels this falls back to [`DataPath::Copy`];
    /// [`Device::data_path`](crate::Device::data_path) says which one the device got.
    NoData,
    /// `UBLK_F_USER_COPY` (6.5+): the kernel copies nothing at FETCH or
    /// COMMIT; the server moves each request's data itself with
    /// `pread`/`pwrite` on `/dev/ublkcN` at the request's offset
    /// ([`user_copy_offset`](crate::queue::user_copy_offset)). A target
    /// that [needs data](crate::Target::needs_data) gets it in per-tag
    /// buffers as with [`DataPath::Copy`] (the queue does the copies); one
    /// that does not gets no buffers and may do its own copies (an
    /// [async target](crate::aio) with [`Io::char_dev`](crate::aio::Io::char_dev)).
    /// Refused on kernels without it.
    UserCopy,
    /// Zero copy with `UBLK_F_SUPPORT_ZERO_COPY` (6.15+): no byte is copied.
    /// The queue registers each READ/WRITE request's own pages in its ring
    /// as a fixed buffer (`UBLK_U_IO_REGISTER_IO_BUF`) before the target's
    /// operations, and unregisters them at the commit; the target's
    /// [`Io::read_at`](crate::aio::Io::read_at) and
    /// [`Io::write_at`](crate::aio::Io::write_at) become READ_FIXED and
    /// WRITE_FIXED on them. Only for [async targets that move data only
    /// that way](crate::aio::AsyncTarget::zero_copy) (or need none);
    /// refused on kernels without it.
    ZeroCopy,
    /// Zero copy with `UBLK_F_AUTO_BUF_REG` (6.16+): as [`DataPath::ZeroCopy`],
    /// but the kernel registers each request's pages itself before
    /// delivering it (at the index the FETCH/COMMIT names) and unregisters
    /// them at the commit: no command per request. A request whose
    /// automatic registration fails is delivered anyway
    /// (`UBLK_AUTO_BUF_REG_FALLBACK`) and the queue registers it itself.
    AutoBufReg,
}

impl DataPath {
    /// The name used on the command line: `copy`, `user-copy`, `none`,
    /// `zero-copy`, `auto-buf-reg`.
    pub fn name(self) -> &'static str {
        match self {
            DataPath::Copy => "copy",
            DataPath::UserCopy => "user-copy",
            DataPath::NoData => "none",
            DataPath::ZeroCopy => "zero-copy",
            DataPath::AutoBufReg => "auto-buf-reg",
        }
    }

    /// Whether the request's pages stay in the kernel, reached by the
    /// target's operations as a fixed buffer of the queue's ring.
    pub fn is_zero_copy(self) -> bool {
        matches!(self, DataPath::ZeroCopy | DataPath::AutoBufReg)
    }

    /// The fastest data path the running kernel offers for a target:
    /// [`DataPath::AutoBufReg`], else [`DataPath::ZeroCopy`], else
    /// [`DataPath::UserCopy`], else [`DataPath::Copy`] for a target that
    /// moves data only with `read_at`/`write_at`
    /// ([`AsyncTarget::zero_copy`](crate::AsyncTarget::zero_copy));
    /// [`DataPath::Copy`] for any other target, and [`DataPath::NoData`]
    /// for one that needs no data. `features` is what the kernel offers
    /// ([`Control::features`](crate::Control::features); `None` before 6.5).
    pub fn best(features: Option<crate::ctrl::Features>, needs_data: bool, zero_copy: bool) -> DataPath {
        let has = |f: u64| features.is_some_and(|x| x.contains(f));
        if !needs_data {
            DataPath::NoData
        } else if !zero_copy {
            DataPath::Copy
        } else if has(sys::abi::UBLK_F_AUTO_BUF_REG) {
            DataPath::AutoBufReg
        } else if has(sys::abi::UBLK_F_SUPPORT_ZERO_COPY) {
            DataPath::ZeroCopy
        } else if has(sys::abi::UBLK_F_USER_COPY) {
            DataPath::UserCopy
        } else {
            DataPath::Copy
        }
    }
}

impl std::str::FromStr for DataPath {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "copy" => Ok(DataPath::Copy),
            "user-copy" => Ok(DataPath::UserCopy),
            "none" => Ok(DataPath::NoData),
            "zero-copy" => Ok(DataPath::ZeroCopy),
            "auto-buf-reg" => Ok(DataPath::AutoBufReg),
            _ => Err(format!("unknown data path {s:?}: use copy, user-copy, zero-copy, auto-buf-reg or none")),
        }
    }
}

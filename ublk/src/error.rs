//! Typed errors that name the cause and the fix.
//!
//! When the kernel refuses a command, the error carries the command, the
//! device, queue and tag it was for, the errno, and the causes the driver has
//! for that errno on that command (from `ublk_drv.c`; see `docs/abi.md`).

use std::fmt;
use std::io;

/// A `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which command the kernel refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    /// A control command on `/dev/ublk-control`, by its kernel name.
    Ctrl(&'static str),
    /// An io command on `/dev/ublkcN`, by its kernel name.
    Io(&'static str),
}

impl Cmd {
    /// The kernel's name of the command (e.g. `FETCH_REQ`).
    pub fn name(&self) -> &'static str {
        match self {
            Cmd::Ctrl(n) | Cmd::Io(n) => n,
        }
    }
}

/// Where the owner of a device named in an error comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerSource {
    /// `owner_uid`/`owner_gid` of the device info, which the kernel records
    /// at ADD_DEV: the process that created the device.
    DeviceInfo,
    /// The owner of `/dev/ublkcN`, which the udev rule sets from the device
    /// info (the caller may not read the device info itself).
    CharNode,
}

/// The owner of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
    /// Where it was read.
    pub source: OwnerSource,
}

/// Everything that can go wrong, each with its cause and its fix.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// `/dev/ublk-control` does not exist: the driver is not loaded.
    NoDriver,
    /// The caller lacks the privilege the kernel asks for.
    NotPermitted {
        /// What was refused.
        what: String,
    },
    /// A node the caller may not open (e.g. `/dev/ublk-control` for an
    /// ordinary user), with what grants access.
    Access {
        /// What was refused, with the node's mode and owner.
        what: String,
        /// The udev rule or `chmod` that grants access.
        fix: String,
    },
    /// The kernel refused a command on a device because this caller may not
    /// control it: someone else's unprivileged device (EACCES: the caller
    /// lacks access to its `/dev/ublkcN`), a privileged device and a caller
    /// without CAP_SYS_ADMIN (EPERM), or a path naming another device's node
    /// (EPERM).
    NotOwner {
        /// The command, by its kernel name.
        cmd: &'static str,
        /// The device.
        dev_id: u32,
        /// EPERM or EACCES.
        errno: i32,
        /// Who owns the device, as far as this caller can tell.
        owner: Option<Owner>,
        /// Whether it is an unprivileged device (`None`: not known).
        unprivileged: Option<bool>,
        /// The caller's effective uid and gid.
        caller: (u32, u32),
    },
    /// A configuration value the kernel would refuse, caught before asking it.
    InvalidConfig {
        /// Which setting.
        what: &'static str,
        /// What is wrong and what to do instead.
        why: String,
    },
    /// The running kernel lacks a feature that was requested.
    Unsupported {
        /// The feature, by its kernel name.
        feature: &'static str,
        /// Why it is missing (kernel or header too old) and what to do.
        why: String,
    },
    /// A `UBLK_F_*` flag was asked for whose protocol this library does not
    /// implement (see [`DevFlags::library_support`](crate::DevFlags::library_support)):
    /// refused before ADD_DEV, whatever the kernel offers, because a device
    /// created with it would be served wrongly.
    FlagNotImplemented {
        /// The flag's kernel name, e.g. `UBLK_F_ZONED`.
        flag: &'static str,
        /// Its bit.
        bit: u32,
        /// The first kernel that has it, as (major, minor).
        since: Option<(u32, u32)>,
        /// Why the library does not implement it.
        why: &'static str,
        /// Whether it is being implemented (a data path in progress).
        in_progress: bool,
    },
    /// The requested device id is taken.
    DeviceExists {
        /// The id.
        dev_id: u32,
    },
    /// No ublk device with this id.
    NoDevice {
        /// The id.
        dev_id: u32,
    },
    /// The kernel completed a command with an error.
    Kernel {
        /// Which command.
        cmd: Cmd,
        /// The device it was for, if any.
        dev_id: Option<u32>,
        /// The queue, for io commands.
        q_id: Option<u16>,
        /// The tag, for io commands.
        tag: Option<u16>,
        /// The positive errno.
        errno: i32,
        /// Likely causes for this command and errno, from the driver's checks.
        hints: &'static [&'static str],
    },
    /// A system call failed outside io_uring.
    Os {
        /// What we were doing.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// A queue thread panicked or failed; the device was torn down.
    Queue {
        /// Which queue.
        q_id: u16,
        /// What happened.
        why: String,
    },
    /// A command did not complete in time (and was cancelled).
    TimedOut {
        /// Which command.
        cmd: Cmd,
        /// What it was waiting for.
        why: &'static str,
    },
}

impl Error {
    pub(crate) fn os(what: impl Into<String>, source: io::Error) -> Self {
        Error::Os { what: what.into(), source }
    }

    /// The positive errno behind this error, where there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kernel { errno, .. } => Some(*errno),
            Error::Os { source, .. } => source.raw_os_error(),
            Error::NotPermitted { .. } => Some(libc::EPERM),
            Error::Access { .. } => Some(libc::EACCES),
            Error::NotOwner { errno, .. } => Some(*errno),
            Error::NoDriver => Some(libc::ENOENT),
            Error::DeviceExists { .. } => Some(libc::EEXIST),
            Error::NoDevice { .. } => Some(libc::ENODEV),
            _ => None,
        }
    }
}

fn errno_name(e: i32) -> &'static str {
    match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECANCELED => "ECANCELED",
        _ => "E?",
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoDriver => write!(
                f,
                "/dev/ublk-control not found: the ublk driver is not loaded (run `modprobe ublk_drv` as root; the kernel needs CONFIG_BLK_DEV_UBLK, Linux 6.0+)"
            ),
            Error::NotPermitted { what } => write!(
                f,
                "{what}: not permitted (run as root / with CAP_SYS_ADMIN, or on Linux 6.3+ create the device with UBLK_F_UNPRIVILEGED_DEV and udev rules granting access)"
            ),
            Error::Access { what, fix } => write!(f, "{what}: permission denied; {fix}"),
            Error::NotOwner { cmd, dev_id, errno, owner, unprivileged, caller } => {
                write!(f, "control command {cmd} for device {dev_id} refused (-{}): ", errno_name(*errno))?;
                let who = match owner {
                    Some(o) => {
                        let from = match o.source {
                            OwnerSource::DeviceInfo => "its device info",
                            OwnerSource::CharNode => "the owner of its /dev/ublkc node, set from the device info by the udev rule",
                        };
                        format!("uid {} gid {} ({from})", o.uid, o.gid)
                    }
                    None => "another user".to_string(),
                };
                match unprivileged {
                    Some(false) => write!(
                        f,
                        "device {dev_id} is a privileged device (created by root, without UBLK_F_UNPRIVILEGED_DEV), which only CAP_SYS_ADMIN may control; this process runs as uid {} gid {}",
                        caller.0, caller.1
                    ),
                    Some(true) => write!(
                        f,
                        "device {dev_id} is an unprivileged device owned by {who}, and this process (uid {} gid {}) lacks {} access to /dev/ublkc{dev_id}, which the kernel checks for every command; only its owner (or root) may control it",
                        caller.0,
                        caller.1,
                        if *cmd == "GET_DEV_INFO2" || *cmd == "GET_PARAMS" || *cmd == "GET_QUEUE_AFFINITY" { "read" } else { "read and write" }
                    ),
                    None => write!(
                        f,
                        "device {dev_id} (/dev/ublkc{dev_id} owned by {who}) is a privileged device, which only CAP_SYS_ADMIN may control, or /dev/ublkc{dev_id} is not the node of device {dev_id} (the kernel compares the node's device number); this process runs as uid {} gid {}",
                        caller.0, caller.1
                    ),
                }
            }
            Error::InvalidConfig { what, why } => write!(f, "invalid {what}: {why}"),
            Error::Unsupported { feature, why } => write!(f, "{feature} is not supported: {why}"),
            Error::FlagNotImplemented { flag, bit, since, why, in_progress } => {
                write!(f, "{flag} (bit {bit}")?;
                if let Some((a, b)) = since {
                    write!(f, ", Linux {a}.{b}+")?;
                }
                let yet = if *in_progress { " yet (in progress)" } else { "" };
                write!(
                    f,
                    ") is not implemented by this library{yet}: {why}; drop the flag (`ublk features` lists what is implemented)"
                )
            }
            Error::DeviceExists { dev_id } => write!(
                f,
                "ublk device {dev_id} already exists (pick another --id, omit it to let the kernel choose, or delete the old device first)"
            ),
            Error::NoDevice { dev_id } => write!(
                f,
                "no ublk device {dev_id} (see /sys/class/ublk-char/ for the existing ones)"
            ),
            Error::Kernel { cmd, dev_id, q_id, tag, errno, hints } => {
                let kind = match cmd {
                    Cmd::Ctrl(_) => "control command",
                    Cmd::Io(_) => "io command",
                };
                write!(f, "{kind} {} failed", cmd.name())?;
                if let Some(d) = dev_id {
                    write!(f, " for device {d}")?;
                }
                if let Some(q) = q_id {
                    write!(f, " queue {q}")?;
                }
                if let Some(t) = tag {
                    write!(f, " tag {t}")?;
                }
                write!(f, ": -{} ({})", errno_name(*errno), io::Error::from_raw_os_error(*errno))?;
                if !hints.is_empty() {
                    write!(f, "; likely causes: {}", hints.join("; "))?;
                }
                Ok(())
            }
            Error::Os { what, source } => write!(f, "{what}: {source}"),
            Error::Queue { q_id, why } => write!(f, "queue {q_id} failed: {why}; the device was torn down"),
            Error::TimedOut { cmd, why } => write!(f, "{} timed out: {why}", cmd.name()),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Os { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The driver's reasons for refusing `cmd` with `errno`, per kernel generation.
/// Sources: `__ublk_ch_uring_cmd` (6.1–6.15), `ublk_ch_uring_cmd_local` (6.16+),
/// `io_uring_cmd_prep`, `ublk_ctrl_uring_cmd` and the `ublk_ctrl_*` handlers.
pub(crate) fn hints(cmd: Cmd, errno: i32) -> &'static [&'static str] {
    match (cmd.name(), errno) {
        ("FETCH_REQ", libc::EINVAL) => &[
            "the 16-byte ublksrv_io_cmd is not at SQE byte 48 (sqe->cmd)",
            "ioctl-encoded opcode on a kernel before 6.4 (use the legacy number there)",
            "q_id >= nr_hw_queues (ADD_DEV clamps queues to the CPU count) or tag >= queue_depth",
            "buffer address 0 without UBLK_F_USER_COPY/NEED_GET_DATA, or non-zero with USER_COPY",
            "the queue is already live and this FETCH comes from a thread other than its daemon (<=6.15)",
            "the tag is already fetched (6.16+)",
            "non-zero SQE ioprio, __pad1 (bytes 12-15) or unknown uring_cmd_flags (io_uring_cmd_prep)",
        ],
        ("FETCH_REQ", libc::EBUSY) => &["the tag is already fetched (<=6.15) or the queue/device is already ready"],
        ("COMMIT_AND_FETCH_REQ", libc::EINVAL) => &[
            "committed from a thread other than the one that fetched (the queue's or tag's daemon)",
            "the tag is not owned by the server (no request was delivered for it) (<=6.15)",
            "buffer address 0 without USER_COPY, or non-zero with USER_COPY",
        ],
        ("COMMIT_AND_FETCH_REQ", libc::EBUSY) => &["the tag is not owned by the server: no request was delivered for it (6.16+)"],
        ("TRY_STOP_DEV", libc::EBUSY) => {
            &["the disk /dev/ublkbN is open (mounted, or held by a process): close it, or stop the device with STOP_DEV"]
        }
        ("QUIESCE_DEV", libc::EOPNOTSUPP) => &["the device was created without UBLK_F_QUIESCE"],
        ("QUIESCE_DEV", libc::EBUSY) => {
            &["some queue had a request in flight on every tag until the timeout; the kernel now holds new I/O: quiesce again"]
        }
        (_, libc::EOPNOTSUPP) => &[
            "the kernel does not know this opcode (too old), or its _IOC_TYPE is not 'u'",
            "a legacy opcode on a kernel built with CONFIG_BLKDEV_UBLK_LEGACY_OPCODES=n",
        ],
        ("ADD_DEV", libc::EINVAL) => &[
            "queue_depth or nr_hw_queues is 0 or above the maximum",
            "the control ring was not created with IORING_SETUP_SQE128",
            "unknown flags or an unprivileged device asked for privileged features",
        ],
        ("ADD_DEV", libc::EEXIST) => &["the requested device id is taken"],
        ("SET_PARAMS", libc::EINVAL) => &[
            "logical block size not a power of two in 512..=PAGE_SIZE, or above the physical block size",
            "max_sectors above max_io_buf_bytes/512, or below one page",
            "params len/types zero or len larger than the command's buffer",
        ],
        ("SET_PARAMS", libc::EACCES) => &["the device is already started: set params before START_DEV"],
        ("START_DEV", libc::EINVAL) => {
            &["no basic params set (SET_PARAMS before START_DEV)", "data[0] is not the pid that opened /dev/ublkcN (6.17+)"]
        }
        ("START_DEV", libc::EEXIST) => &["the device is already started"],
        ("START_DEV", libc::EINTR) => &["interrupted while waiting for every tag of every queue to be fetched"],
        (_, libc::ENODEV) => {
            &["no such device id, or the kernel does not know this command (before 6.4, encoded opcodes are looked up as device ids)"]
        }
        (_, libc::EPERM) => &["not root (CAP_SYS_ADMIN), and the device is not an unprivileged one"],
        (_, libc::ENOENT) => &[
            "the kernel found no /dev/ublkcN at the path the command names (an unprivileged device's commands, and GET_DEV_INFO2, carry it): the node is missing from this mount namespace's /dev, or the device is being deleted",
        ],
        _ => &[],
    }
}

//! Checks before ADD_DEV or a recovery: the flags asked for (implemented
//! by the library, offered by the kernel, in combinations the kernel
//! takes), what unprivileged devices may have, and the request timeout.
//! The threads per queue are checked with the tag shares
//! (`crate::queue::check_threads`).

use std::time::Duration;

use ublk_sys as sys;

use crate::ctrl::Control;
use crate::error::{Error, Result};

/// What an unprivileged device needs before ADD_DEV: a kernel that has them
/// (6.3+), and no flag the kernel refuses for them.
pub(super) fn check_unprivileged(ctrl: &Control, flags: u64) -> Result<()> {
    if !ctrl.kernel_has_unprivileged() {
        return Err(Error::Unsupported {
            feature: "UBLK_F_UNPRIVILEGED_DEV",
            why: format!(
                "unprivileged devices need Linux 6.3 or later; this kernel is {}: create the device as root (without unprivileged), or upgrade the kernel",
                crate::ctrl::kernel_release()
            ),
        });
    }
    if flags & sys::abi::UBLK_F_USER_COPY != 0 {
        return Err(Error::InvalidConfig {
            what: "flags",
            why: "UBLK_F_USER_COPY is refused by the kernel for unprivileged devices (ADD_DEV: -EINVAL; a user-copy server reaches request pages through /dev/ublkcN); drop it (DataPath::NoData falls back to copying)".into(),
        });
    }
    Ok(())
}

/// Refuses every requested flag the library does not implement
/// ([`DevFlags::library_support`](crate::DevFlags::library_support)): a flag
/// passed through unimplemented changes the protocol under the queues (e.g.
/// with `NEED_GET_DATA` the device goes live and fails its first write).
pub(super) fn check_flags(flags: u64) -> Result<()> {
    check_flags_in(flags, crate::SUPPORTED_FLAGS)
}

/// Refuses a device made elsewhere whose flags the library cannot serve
/// (those the kernel adds by itself are served as they are).
pub(super) fn check_device_flags(flags: u64) -> Result<()> {
    check_flags_in(flags, crate::SUPPORTED_FLAGS.union(crate::flags::KERNEL_ADDED_FLAGS))
}

/// Refuses the combinations of implemented flags that the kernel refuses
/// (ADD_DEV: -EINVAL from 6.13 on, for QUIESCE from 6.16) or would take in
/// some other sense on older kernels, each with what to ask for instead.
pub(super) fn check_flag_combinations(flags: u64) -> Result<()> {
    let has = |f: u64| flags & f != 0;
    let recovery = has(sys::abi::UBLK_F_USER_RECOVERY);
    let why = if has(sys::abi::UBLK_F_USER_RECOVERY_REISSUE) && has(sys::abi::UBLK_F_USER_RECOVERY_FAIL_IO) {
        "UBLK_F_USER_RECOVERY_REISSUE (re-issue the I/O in flight to the next server) and UBLK_F_USER_RECOVERY_FAIL_IO (fail I/O while there is no server) exclude each other: ask for one"
    } else if !recovery && (has(sys::abi::UBLK_F_USER_RECOVERY_REISSUE) || has(sys::abi::UBLK_F_USER_RECOVERY_FAIL_IO)) {
        "UBLK_F_USER_RECOVERY_REISSUE and UBLK_F_USER_RECOVERY_FAIL_IO are modes of user recovery: ask for UBLK_F_USER_RECOVERY with them"
    } else if !recovery && has(sys::abi::UBLK_F_QUIESCE) {
        "UBLK_F_QUIESCE lets another server take the device over, which needs UBLK_F_USER_RECOVERY (the kernel refuses it alone): ask for both"
    } else {
        return Ok(());
    };
    Err(Error::InvalidConfig { what: "flags", why: why.into() })
}

/// The flag's kernel name when `bits` is one known flag, for
/// `Error::Unsupported::feature`; else a description of several.
pub(super) fn flags_feature(bits: u64) -> &'static str {
    match sys::abi::flag_name(bits) {
        Some(n) => n,
        None => "requested UBLK_F_ flags",
    }
}

/// Each flag of `bits` by name, with the first kernel that has it.
pub(super) fn names_since(bits: u64) -> String {
    let mut v = Vec::new();
    for bit in 0..64 {
        let f = crate::DevFlags::from_bits_retain(1u64 << bit);
        if bits & f.bits() == 0 {
            continue;
        }
        let name = crate::ctrl::Features(f.bits()).names().join(",");
        v.push(match f.since() {
            Some((a, b)) => format!("{name} (Linux {a}.{b}+)"),
            None => name,
        });
    }
    v.join(", ")
}

fn check_flags_in(flags: u64, allowed: crate::DevFlags) -> Result<()> {
    for bit in 0..64 {
        let f = 1u64 << bit;
        if flags & f == 0 || allowed.bits() & f != 0 {
            continue;
        }
        let flag = crate::DevFlags::from_bits_retain(f);
        let name = sys::abi::flag_name(f).or_else(|| sys::HEADER_FLAGS.iter().find(|(_, v)| *v == f).map(|(n, _)| *n));
        match (name, flag.library_support()) {
            (Some(n), crate::flags::Support::No(why)) | (Some(n), crate::flags::Support::InProgress(why)) => {
                return Err(Error::FlagNotImplemented {
                    flag: n,
                    bit,
                    since: flag.since(),
                    why,
                    in_progress: matches!(flag.library_support(), crate::flags::Support::InProgress(_)),
                });
            }
            // Implemented, but not for a device made elsewhere: cannot
            // happen (`allowed` holds every implemented flag).
            (Some(_), crate::flags::Support::Yes) => {}
            (None, _) => {
                return Err(Error::Unsupported {
                    feature: "requested UBLK_F_ flags",
                    why: format!("bit {bit} ({f:#x}) is no UBLK_F_ flag this library knows (it knows every flag up to Linux 7.3); drop it"),
                })
            }
        }
    }
    Ok(())
}

/// The request timeout asked for: whole milliseconds in 1..=`i32::MAX`
/// (`queue_io_timeout_store` refuses 0; `msecs_to_jiffies` saturates above
/// `i32::MAX`, which reads back as something else), and none on an
/// unprivileged device, whose timeout makes the driver SIGKILL the server.
pub(super) fn check_io_timeout(d: Option<Duration>, unprivileged: bool) -> Result<()> {
    let Some(d) = d else { return Ok(()) };
    if unprivileged {
        return Err(Error::InvalidConfig {
            what: "io timeout",
            why: "an unprivileged device's request timeout kills its server (the driver sends SIGKILL), and only root may set it; leave io_timeout (--io-timeout-ms) unset".into(),
        });
    }
    if d.as_millis() < 1 || d.as_millis() > i32::MAX as u128 {
        return Err(Error::InvalidConfig {
            what: "io timeout",
            why: format!("{d:?} is not in 1 ms..={} ms (whole milliseconds, the block layer's queue/io_timeout)", i32::MAX),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_timeout_in_whole_milliseconds_up_to_i32_max() {
        let ms = |n: u64| Some(Duration::from_millis(n));
        assert!(check_io_timeout(None, true).is_ok());
        assert!(check_io_timeout(ms(1), false).is_ok());
        assert!(check_io_timeout(ms(i32::MAX as u64), false).is_ok());
        for bad in [Duration::ZERO, Duration::from_micros(999), Duration::from_millis(1 << 31)] {
            let e = check_io_timeout(Some(bad), false).unwrap_err().to_string();
            assert!(e.contains("not in 1 ms..=2147483647 ms"), "{bad:?}: {e}");
        }
        let e = check_io_timeout(ms(5000), true).unwrap_err().to_string();
        assert!(e.contains("unprivileged") && e.contains("--io-timeout-ms"), "{e}");
    }
}

//! The device's files outside `/dev/ublk-control`: opening `/dev/ublkcN`,
//! waiting until an unprivileged device's node is its owner's, and the
//! block device's I/O scheduler in sysfs.

use std::fs::{File, OpenOptions};
use std::time::{Duration, Instant};

use super::Device;
use crate::error::{Error, Result};

/// Waits (up to `wait`) until this process may read and write
/// `/dev/ublkcN`, which the udev rule gives to the device's owner; every
/// control command of an unprivileged device needs that access.
pub(super) fn wait_node_access(dev_id: u32, wait: Duration) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let path = format!("/dev/ublkc{dev_id}");
    let cpath = std::ffi::CString::new(path.clone()).expect("no NUL in the path");
    let t0 = Instant::now();
    loop {
        // SAFETY: a NUL-terminated path that lives across the call.
        if unsafe { libc::faccessat(libc::AT_FDCWD, cpath.as_ptr(), libc::R_OK | libc::W_OK, libc::AT_EACCESS) } == 0 {
            return Ok(());
        }
        if t0.elapsed() > wait {
            let (uid, gid) = crate::ctrl::caller_ids();
            let node = match std::fs::metadata(&path) {
                Ok(m) => format!("mode {:04o}, owner uid {} gid {}", m.mode() & 0o7777, m.uid(), m.gid()),
                Err(e) => e.to_string(),
            };
            return Err(Error::Access {
                what: format!(
                    "{path} ({node}) is still not readable and writable by uid {uid} gid {gid} {} s after ADD_DEV created unprivileged device {dev_id}",
                    wait.as_secs()
                ),
                fix: format!(
                    "the kernel creates the node root-owned; a udev rule must give it to the device's owner (docs/unprivileged.md: `ublk udev-owner`). Until it does, nobody but root can use or delete device {dev_id}: `ublk del -n {dev_id}` as root"
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub(super) fn open_char(dev_id: u32) -> Result<File> {
    let path = format!("/dev/ublkc{dev_id}");
    let t0 = Instant::now();
    loop {
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => return Ok(f),
            // devtmpfs/udev may take a moment to create the node.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && t0.elapsed() < Duration::from_secs(3) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(Error::NotPermitted { what: format!("opening {path}") })
            }
            Err(e) => return Err(Error::os(format!("opening {path}"), e)),
        }
    }
}

impl Device {
    /// Writes `name` to `/sys/block/ublkbN/queue/scheduler` and checks that
    /// the kernel took it.
    pub(super) fn set_io_scheduler(&self, name: &str) -> Result<()> {
        let path = format!("/sys/block/ublkb{}/queue/scheduler", self.info.dev_id);
        let offered = || std::fs::read_to_string(&path).unwrap_or_default().trim().to_string();
        match std::fs::write(&path, name) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(Error::Access {
                    what: format!("writing the I/O scheduler to {path}"),
                    fix: "only root may set it: run as root, or leave io_scheduler unset".into(),
                })
            }
            Err(e) => {
                return Err(Error::InvalidConfig {
                    what: "io scheduler",
                    why: format!("the kernel refused {name:?} for {path} ({e}); it offers: {}", offered()),
                })
            }
        }
        let now = offered();
        if !now.contains(&format!("[{name}]")) {
            return Err(Error::InvalidConfig { what: "io scheduler", why: format!("{path} reads {now:?} after writing {name:?}") });
        }
        Ok(())
    }

    /// Writes `d` in milliseconds to `/sys/block/ublkbN/queue/io_timeout`
    /// (which exists only where the driver has a timeout handler: not on
    /// 6.1) and checks that the kernel took it (it keeps jiffies: a value that
    /// is not a whole number of them reads back rounded).
    pub(super) fn set_io_timeout(&self, d: Duration) -> Result<()> {
        let path = format!("/sys/block/ublkb{}/queue/io_timeout", self.info.dev_id);
        let ms = d.as_millis();
        if !std::path::Path::new(&path).exists() {
            // The block layer shows the attribute only for a driver with a
            // timeout handler; 6.1's ublk has none (its monitor looks for a
            // dead server every 5 s instead).
            return Err(Error::Unsupported {
                feature: "io timeout",
                why: format!(
                    "{path} does not exist: this kernel's ublk driver ({}) has no request timeout handler, so the block layer offers no timeout to set (a dead server is found by its monitor within 5 s); leave io_timeout (--io-timeout-ms) unset",
                    crate::ctrl::kernel_release()
                ),
            });
        }
        match std::fs::write(&path, ms.to_string()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(Error::Access {
                    what: format!("writing the request timeout to {path}"),
                    fix: "only root may set it: run as root, or leave io_timeout (--io-timeout-ms) unset".into(),
                })
            }
            Err(e) => return Err(Error::os(format!("writing {ms} to {path}"), e)),
        }
        let now = std::fs::read_to_string(&path).map_err(|e| Error::os(format!("reading back {path}"), e))?;
        match now.trim().parse::<u128>() {
            Ok(got) if got.abs_diff(ms) <= 10 => Ok(()),
            _ => Err(Error::InvalidConfig { what: "io timeout", why: format!("{path} reads {:?} after writing {ms}", now.trim()) }),
        }
    }
}

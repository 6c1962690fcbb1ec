//! `ublk del`: stopping and deleting devices, through their daemon where
//! it is alive, and `--safe` (TRY_STOP_DEV).

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ublk::{sys, Control};
use ublk_cli::config::{pid_alive, run_dir, verify_daemon, DeviceConfig};

use crate::device::{dev_info, device_exists};

pub(super) fn cmd_del(id: Option<u32>, all: bool, safe: bool) -> Result<()> {
    let ids = match (id, all) {
        (Some(id), false) => vec![id],
        (None, true) => ublk::ctrl::device_ids(),
        _ => bail!("say which device to delete: -n N, or --all"),
    };
    if ids.is_empty() {
        return Ok(());
    }
    let mut ctrl = Control::open()?;
    let mut in_use = vec![];
    for id in ids {
        let info = match dev_info(&mut ctrl, id) {
            Ok(info) => info,
            // --all deletes what the caller may delete and names the rest.
            Err(e) if all && matches!(e.downcast_ref::<ublk::Error>(), Some(ublk::Error::NotOwner { .. })) => {
                eprintln!("ublk: note: skipping device {id}: {e}");
                continue;
            }
            Err(e) => return Err(e),
        };
        if safe {
            match safe_stop(&mut ctrl, id, &info) {
                Ok(()) => {}
                Err(SafeStop::InUse(msg)) if all => {
                    eprintln!("ublk: note: leaving device {id}: {msg}");
                    in_use.push(id.to_string());
                    continue;
                }
                Err(SafeStop::InUse(msg)) => bail!("{msg}"),
                Err(SafeStop::Other(e)) => return Err(e),
            }
        }
        del_one(&mut ctrl, id, &info)?;
        println!("deleted device {id}");
    }
    if !in_use.is_empty() {
        bail!("device(s) {} in use and left as they were (see the notes above); the others were deleted", in_use.join(", "));
    }
    Ok(())
}

/// Why `ublk del --safe` did not stop a device.
enum SafeStop {
    /// Its disk is open: nothing was changed.
    InUse(String),
    Other(anyhow::Error),
}

/// `ublk del --safe`: TRY_STOP_DEV, which stops the device only if nobody
/// has its disk open, atomically (and refuses opens after it). A device
/// with no disk (DEAD: stopped, or never started) has nothing anyone could
/// have open, and is deleted as usual.
fn safe_stop(ctrl: &mut Control, id: u32, info: &ublk::DevInfo) -> std::result::Result<(), SafeStop> {
    if u32::from(info.state) == sys::UBLK_S_DEV_DEAD {
        return Ok(());
    }
    match ctrl.safe_stop_dev(id) {
        Ok(()) => Ok(()),
        Err(ublk::Error::Unsupported { .. }) => Err(SafeStop::Other(anyhow!(
            "`ublk del --safe` needs Linux 7.0 or later (UBLK_F_SAFE_STOP_DEV: TRY_STOP_DEV, a stop refused while the disk is open), which this kernel ({}) does not offer; nothing was changed. `ublk del -n {id}` without --safe stops the device even while its disk is open",
            ublk::ctrl::kernel_release()
        ))),
        Err(ublk::Error::Kernel { errno: libc::EBUSY, .. }) => {
            let disk = format!("/dev/ublkb{id}");
            let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let mut f = l.split_whitespace();
                    let (dev, at) = (f.next()?, f.next()?);
                    (dev == disk || dev.strip_prefix(&disk).is_some_and(|p| p.starts_with('p'))).then(|| at.to_string())
                })
                .collect();
            let mounted = if mounts.is_empty() { String::new() } else { format!(", mounted on {}", mounts.join(", ")) };
            Err(SafeStop::InUse(format!(
                "device {id} is in use: its disk {disk} is open{mounted} (the kernel refused TRY_STOP_DEV with EBUSY), so it was not stopped and nothing was changed; close it (umount, end the process holding it) and run `ublk del -n {id} --safe` again, or `ublk del -n {id}` to stop it anyway"
            )))
        }
        Err(e) => Err(SafeStop::Other(anyhow::Error::from(e).context(format!("stopping device {id} (TRY_STOP_DEV)")))),
    }
}

fn del_one(ctrl: &mut Control, id: u32, info: &ublk::DevInfo) -> Result<()> {
    let pid = info.ublksrv_pid;
    let live_pid = pid > 0 && pid as u32 != std::process::id() && pid_alive(pid as u32);
    // Only a process proven to be the daemon (the pid and start time the
    // daemon saved) is signalled: after the daemon died, its pid may belong
    // to any other process.
    let cfg = if live_pid { DeviceConfig::load(id) } else { Ok(None) };
    let verified = match (live_pid, &cfg) {
        (false, _) => false,
        (true, Err(e)) => {
            eprintln!("ublk: note: not signalling pid {pid}: {e}; stopping and deleting device {id} directly");
            false
        }
        (true, Ok(c)) => match verify_daemon(pid as u32, id, c.as_ref()) {
            Ok(()) => true,
            Err(why) => {
                eprintln!("ublk: note: not signalling pid {pid}, which the kernel names as device {id}'s daemon: {why}; stopping and deleting device {id} directly");
                false
            }
        },
    };
    if verified {
        // The daemon tears its device down itself on SIGTERM.
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t0 = Instant::now();
        while (pid_alive(pid as u32) || device_exists(id)) && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if pid_alive(pid as u32) {
            eprintln!("ublk: warning: daemon {pid} of device {id} did not exit within 30 s of SIGTERM; deleting the device directly");
        }
    }
    if device_exists(id) {
        match ctrl.stop_dev(id) {
            Ok(()) | Err(ublk::Error::NoDevice { .. }) => {}
            Err(e) => return Err(e).with_context(|| format!("stopping device {id}")),
        }
        match ctrl.del_dev(id) {
            Ok(()) | Err(ublk::Error::NoDevice { .. }) => {}
            Err(e) => return Err(e).with_context(|| format!("deleting device {id}")),
        }
    }
    DeviceConfig::remove(id);
    if let Ok(dir) = run_dir() {
        let _ = std::fs::remove_file(dir.join(format!("{id}.log")));
    }
    Ok(())
}

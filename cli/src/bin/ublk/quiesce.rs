//! `ublk quiesce`: QUIESCE_DEV, then waiting for the daemon to exit.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use ublk::{sys, Control};
use ublk_cli::config::{pid_alive, DeviceConfig};

use crate::device::{daemon_alive, dev_info};

/// `ublk quiesce -n N`: QUIESCE_DEV until the daemon has let go of the
/// device, then waits for the daemon to exit.
pub(super) fn cmd_quiesce(id: u32, timeout: Duration) -> Result<()> {
    let mut ctrl = Control::open()?;
    let info = dev_info(&mut ctrl, id)?;
    let cfg = DeviceConfig::load(id).ok().flatten();
    let pid = info.ublksrv_pid;
    let t0 = Instant::now();
    let sent = ctrl.quiesce(id, timeout).map_err(|e| match e {
        ublk::Error::Unsupported { .. } => anyhow!(
            "`ublk quiesce` needs Linux 6.16 or later (UBLK_F_QUIESCE: QUIESCE_DEV), which this kernel ({}) does not offer; nothing was changed. To replace the daemon of a --recovery device here: kill -9 it, then `ublk recover -n {id}` (I/O in flight may fail, or be re-issued with --recovery-reissue)",
            ublk::ctrl::kernel_release()
        ),
        e => e.into(),
    })?;
    if info.flags & sys::abi::UBLK_F_USER_RECOVERY_FAIL_IO != 0 {
        eprintln!("ublk: note: device {id} was made with --recovery-fail-io: I/O fails (it does not wait) until `ublk recover -n {id}`");
    }
    // The daemon exits once its queues have ended: wait for that.
    if pid > 0 && pid as u32 != std::process::id() && daemon_alive(pid as u32, id, cfg.as_ref()) {
        while pid_alive(pid as u32) && t0.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(20));
        }
        if pid_alive(pid as u32) {
            eprintln!("ublk: warning: device {id} is quiesced but its daemon (pid {pid}) is still running");
        }
    }
    println!("quiesced device {id}: I/O waits in the kernel for `ublk recover -n {id}`");
    eprintln!("ublk: QUIESCE_DEV sent {sent} time(s) in {:?}", t0.elapsed());
    Ok(())
}

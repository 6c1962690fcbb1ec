//! `ublk recover`: taking over a `--recovery` device whose daemon died,
//! with the configuration `ublk add` saved.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use ublk::{sys, AsyncNullTarget, Control, DataPath, DeviceBuilder, Nbd, NullTarget};
use ublk_cli::config::DeviceConfig;
use ublk_cli::SignalStop;

use crate::daemon::Ready;
use crate::device::{daemon_alive, dev_info};
use crate::serve::{serve, serve_nbd, AsyncT, SyncT};
use crate::targets::{nbd_options, open_loop, open_stripe};

/// How long `ublk recover` waits for the kernel to notice the dead daemon
/// (6.1 checks every 5 s) and release its char device. A daemon that died
/// holding requests (an NBD target waiting on its server) can leave a 6.12
/// device LIVE for the block layer's 30 s request timeout, so more than that.
const RECOVER_WAIT: Duration = Duration::from_secs(90);

pub(super) fn cmd_recover(id: u32, ready: &mut Ready) -> Result<()> {
    let signals = SignalStop::install();
    let mut ctrl = Control::open()?;
    let info = dev_info(&mut ctrl, id)?;
    if info.flags & sys::UBLK_F_USER_RECOVERY == 0 && info.flags & sys::abi::UBLK_F_UNPRIVILEGED_DEV != 0 {
        bail!(
            "device {id} is an unprivileged device, and the kernel gives those no user recovery (it drops UBLK_F_USER_RECOVERY at ADD_DEV), so no daemon can take it over; delete it with `ublk del -n {id}` and create it again"
        );
    }
    if info.flags & sys::UBLK_F_USER_RECOVERY == 0 {
        bail!(
            "device {id} was created without --recovery (UBLK_F_USER_RECOVERY), so no daemon can take it over; delete it with `ublk del -n {id}` and create it again with --recovery"
        );
    }
    let cfg = DeviceConfig::load(id).map_err(|e| anyhow!(e))?;
    let pid = info.ublksrv_pid;
    // A process that merely reuses the dead daemon's pid does not count (the
    // library still refuses a device the kernel has not quiesced).
    if pid > 0 && pid as u32 != std::process::id() && daemon_alive(pid as u32, id, cfg.as_ref()) {
        bail!(
            "device {id} is {} and still served by its daemon (pid {pid}); recovery only takes over a device whose daemon died (`ublk del -n {id}` stops and deletes it)",
            ublk::ctrl::state_name(info.state)
        );
    }
    let cfg = cfg.ok_or_else(|| {
        anyhow!(
            "no saved configuration for device {id} ({}): `ublk recover` takes over only devices made by `ublk add`",
            DeviceConfig::path(id).map(|p| p.display().to_string()).unwrap_or_else(|e| e)
        )
    })?;
    drop(ctrl);
    // What only the daemon knew, as `ublk add` saved it: the recovered
    // device keeps its placement and busy polling. The geometry, flags and
    // discard limits come from the kernel.
    let data_path = match &cfg.data_path {
        Some(d) => d.parse::<DataPath>().map_err(|e| anyhow!("the saved configuration of device {id}: {e}"))?,
        None if cfg.target == "null" => DataPath::NoData,
        None => DataPath::Copy,
    };
    let builder = DeviceBuilder::new()
        .placement(cfg.placement.into())
        .busy_poll(Duration::from_micros(cfg.busy_poll_us))
        .data_path(data_path)
        .threads_per_queue(cfg.threads_per_queue);
    match cfg.target.as_str() {
        "null" => {
            let dev = builder.recover(id, RECOVER_WAIT)?;
            if cfg.async_target {
                serve(dev, &AsyncT(&AsyncNullTarget), cfg, &signals, ready)
            } else {
                serve(dev, &SyncT(&NullTarget), cfg, &signals, ready)
            }
        }
        "loop" => {
            let file = cfg.file.clone().ok_or_else(|| anyhow!("the saved configuration of device {id} has no backing file"))?;
            let (target, _) = open_loop(&file, cfg.direct)?;
            if target.size() < cfg.size {
                bail!(
                    "backing file {} shrank to {} bytes, below the device's {} bytes; restore the file before recovering",
                    file.display(),
                    target.size(),
                    cfg.size
                );
            }
            let dev = builder.recover(id, RECOVER_WAIT)?;
            serve(dev, &AsyncT(&target), cfg, &signals, ready)
        }
        "stripe" => {
            let s = cfg.stripe.clone().ok_or_else(|| anyhow!("the saved configuration of device {id} has no stripe legs"))?;
            let (target, _) = open_stripe(&s.legs, s.chunk, cfg.direct)?;
            if target.size() < cfg.size {
                bail!(
                    "the stripe's legs shrank to {} bytes in all, below the device's {} bytes; restore them before recovering",
                    target.size(),
                    cfg.size
                );
            }
            let dev = builder.recover(id, RECOVER_WAIT)?;
            serve(dev, &AsyncT(&target), cfg, &signals, ready)
        }
        "nbd" => {
            let n = cfg.nbd.clone().ok_or_else(|| anyhow!("the saved configuration of device {id} has no NBD server"))?;
            // The server first: if it is gone, the device stays as it is.
            let nbd = Nbd::connect(&nbd_options(&n)?)?;
            if nbd.size() != cfg.size {
                bail!(
                    "the NBD export at {} is now {} bytes, not the device's {}; restore the export before recovering",
                    n.server().display(),
                    nbd.size(),
                    cfg.size
                );
            }
            let dev = builder.recover(id, RECOVER_WAIT)?;
            if usize::from(dev.info().nr_hw_queues) > usize::from(n.connections) {
                bail!("device {id} has {} queues, the saved configuration {} NBD connections", dev.info().nr_hw_queues, n.connections);
            }
            serve_nbd(dev, &nbd, cfg, &signals, ready)
        }
        other => bail!(
            "device {id} is a {other} device, whose data died with its daemon: it cannot be recovered; delete it with `ublk del -n {id}`"
        ),
    }
}

//! `ublk resize`: UPDATE_SIZE, after checking that the target holds the
//! new size.

use anyhow::{anyhow, bail, Result};
use ublk::{Control, LoopOptions, LoopTarget, Stripe};
use ublk_cli::config::DeviceConfig;

use crate::device::dev_info;

/// `ublk resize -n N --size S`: UPDATE_SIZE, after checking that the
/// daemon's target holds `size` bytes (from the saved configuration).
pub(super) fn cmd_resize(id: u32, size: u64) -> Result<()> {
    let mut ctrl = Control::open()?;
    dev_info(&mut ctrl, id)?;
    let cfg = DeviceConfig::load(id).map_err(|e| anyhow!(e))?;
    match &cfg {
        Some(c) => target_holds(c, size)?,
        None => eprintln!("ublk: note: no saved configuration for device {id} (not made by `ublk add`): whether its target holds {size} bytes is not checked"),
    }
    ctrl.resize_dev(id, size).map_err(|e| match e {
        ublk::Error::Unsupported { .. } => anyhow!(
            "`ublk resize` needs Linux 6.16 or later (UBLK_F_UPDATE_SIZE: UPDATE_SIZE), which this kernel ({}) does not offer; device {id} keeps its size",
            ublk::ctrl::kernel_release()
        ),
        e => e.into(),
    })?;
    let now = ctrl.get_params(id)?.basic.dev_sectors << 9;
    if now != size {
        bail!("device {id} reports {now} bytes after UPDATE_SIZE to {size}");
    }
    if let Some(mut c) = cfg {
        c.size = size;
        if let Err(e) = c.save() {
            eprintln!("ublk: warning: device {id} was resized but its saved configuration was not updated ({e})");
        }
    }
    println!("resized device {id} to {size} bytes");
    Ok(())
}

/// Refuses a size the target of a device made by `ublk add` cannot serve:
/// past a loop device's file or a stripe's legs (grow them first), past a
/// ramdisk's memory, past an NBD export.
fn target_holds(c: &DeviceConfig, size: u64) -> Result<()> {
    let id = c.id;
    match c.target.as_str() {
        "null" => {}
        "ramdisk" => {
            let cap = c.capacity.unwrap_or(c.size);
            if size > cap {
                bail!("device {id} is a ramdisk of {cap} bytes of memory, allocated when it was added: it cannot grow past that; add a new, larger ramdisk");
            }
        }
        "loop" => {
            let file = c.file.clone().ok_or_else(|| anyhow!("the saved configuration of device {id} has no backing file"))?;
            let t = LoopTarget::open(&file, &LoopOptions { direct: false, read_only: true })?;
            if size > t.size() {
                bail!(
                    "--size {size} is larger than device {id}'s backing file {} ({} bytes): reads past its end would fail; grow the file first (truncate -s {size} {}), then resize",
                    file.display(),
                    t.size(),
                    file.display()
                );
            }
        }
        "stripe" => {
            let s = c.stripe.clone().ok_or_else(|| anyhow!("the saved configuration of device {id} has no stripe legs"))?;
            let t = Stripe::open(&s.legs, s.chunk, &LoopOptions { direct: false, read_only: true })?;
            if size > t.size() {
                bail!(
                    "--size {size} is larger than device {id}'s stripe ({} bytes: {} legs x the smallest leg, in whole {}-byte chunks); grow every leg first, then resize",
                    t.size(),
                    s.legs.len(),
                    s.chunk
                );
            }
        }
        "nbd" => {
            if size > c.size {
                bail!("device {id} serves an NBD export of {} bytes: it can shrink, not grow past the export", c.size);
            }
        }
        other => bail!("device {id} has an unknown target {other:?} in its saved configuration"),
    }
    Ok(())
}

//! `ublk udev-owner`: what the udev rule needs to give an unprivileged
//! device's nodes to its owner.

use anyhow::{anyhow, Result};
use ublk::{sys, Control};

use crate::device::no_device;

/// `ublk udev-owner ublkcN|ublkbN`: what the udev rule needs to give an
/// unprivileged device's nodes to its owner, as udev's IMPORT{program}
/// reads it (KEY=value lines). A privileged device prints nothing: its
/// nodes stay as the kernel and the other rules make them.
pub(super) fn cmd_udev_owner(name: &str) -> Result<()> {
    let id: u32 = name
        .strip_prefix("ublkc")
        .or_else(|| name.strip_prefix("ublkb"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("{name:?} is not the name of a ublk node (ublkcN or ublkbN; udev passes %k)"))?;
    let mut ctrl = Control::open()?;
    let info = ctrl.get_dev_info(id).map_err(|e| match e {
        ublk::Error::NoDevice { .. } => no_device(id),
        e => e.into(),
    })?;
    if info.flags & sys::abi::UBLK_F_UNPRIVILEGED_DEV == 0 {
        return Ok(());
    }
    let (uid, gid) = info.owner().ok_or_else(|| anyhow!("device {id}: no owner in its device info"))?;
    println!("UBLK_OWNER_UID={uid}");
    println!("UBLK_OWNER_GID={gid}");
    println!("UBLK_DEV_ID={id}");
    Ok(())
}

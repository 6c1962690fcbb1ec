//! `ublk list`: the devices, as a table or JSON.

use anyhow::Result;
use ublk::{sys, Control, DataPath};
use ublk_cli::config::{DeviceConfig, NbdConfig, StripeConfig};

use crate::device::daemon_alive;

pub(super) fn cmd_list(json: bool) -> Result<()> {
    let mut rows = vec![];
    let ids = ublk::ctrl::device_ids();
    if !ids.is_empty() {
        let mut ctrl = Control::open()?;
        for id in ids {
            let info = match ctrl.get_dev_info(id) {
                Ok(info) => info,
                // Someone else's device: listed with what the caller may know.
                Err(ublk::Error::NotOwner { owner, unprivileged, .. }) => {
                    rows.push(serde_json::json!({
                        "id": id,
                        "access": false,
                        "unprivileged": unprivileged,
                        "owner_uid": owner.map(|o| o.uid),
                        "owner_gid": owner.map(|o| o.gid),
                    }));
                    continue;
                }
                Err(_) => continue,
            };
            let size = ctrl.get_params(id).map(|p| p.basic.dev_sectors << 9).ok();
            let cfg = DeviceConfig::load(id).ok().flatten();
            let pid = info.ublksrv_pid;
            let owner = info.owner();
            rows.push(serde_json::json!({
                "id": id,
                "access": true,
                "state": ublk::ctrl::state_name(info.state),
                "queues": info.nr_hw_queues,
                "depth": info.queue_depth,
                "size": size.or(cfg.as_ref().map(|c| c.size)),
                "flags": ublk::Features(info.flags).names(),
                "unprivileged": info.flags & sys::abi::UBLK_F_UNPRIVILEGED_DEV != 0,
                "owner_uid": owner.map(|o| o.0),
                "owner_gid": owner.map(|o| o.1),
                "pid": pid,
                "daemon_alive": pid > 0 && daemon_alive(pid as u32, id, cfg.as_ref()),
                "target": cfg.as_ref().map(|c| c.target.clone()),
                "data_path": data_path_of(info.flags, cfg.as_ref()),
                "file": cfg.as_ref().and_then(|c| c.file.clone().or(c.stripe.as_ref().map(StripeConfig::files)).or(c.nbd.as_ref().map(NbdConfig::server))),
            }));
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<4} {:<9} {:>6} {:>5} {:>12} {:>8} {:<11} {:<8} {:<12} {:<40} FILE",
        "ID", "STATE", "QUEUES", "DEPTH", "SIZE", "PID", "OWNER", "TARGET", "DATA", "FLAGS"
    );
    for r in rows {
        let s = |k: &str| match &r[k] {
            serde_json::Value::Null => "-".to_string(),
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        let owner = match (r["owner_uid"].as_u64(), r["owner_gid"].as_u64()) {
            (Some(u), Some(g)) => format!("{u}:{g}"),
            _ => "-".to_string(),
        };
        if r["access"] == false {
            let what = match r["unprivileged"].as_bool() {
                Some(true) => "unprivileged device of another user",
                _ => "privileged device (root only)",
            };
            println!(
                "{:<4} {:<9} {:>6} {:>5} {:>12} {:>8} {:<11} {:<8} {:<12} {what}",
                s("id"),
                "no-access",
                "-",
                "-",
                "-",
                "-",
                owner,
                "-",
                "-"
            );
            continue;
        }
        let flags: Vec<String> = r["flags"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).map(|n| n.trim_start_matches("UBLK_F_").to_string()).collect())
            .unwrap_or_default();
        let pid = match (r["daemon_alive"].as_bool(), r["pid"].as_i64()) {
            (Some(true), _) => s("pid"),
            // The kernel resets the pid to -1 once it has stopped the device.
            (_, Some(p)) if p <= 0 => "dead".to_string(),
            _ => format!("{}(dead)", s("pid")),
        };
        println!(
            "{:<4} {:<9} {:>6} {:>5} {:>12} {:>8} {:<11} {:<8} {:<12} {:<40} {}",
            s("id"),
            s("state"),
            s("queues"),
            s("depth"),
            s("size"),
            pid,
            owner,
            s("target"),
            s("data_path"),
            if flags.is_empty() { "-".to_string() } else { flags.join(",") },
            s("file")
        );
    }
    Ok(())
}

/// The data path of a device with these (kernel) flags: what the kernel
/// negotiated, and, under USER_COPY, whether the daemon moves data at all
/// (as `ublk add` saved it).
fn data_path_of(flags: u64, cfg: Option<&DeviceConfig>) -> &'static str {
    let user_copy = flags & sys::abi::UBLK_F_USER_COPY != 0;
    if flags & sys::abi::UBLK_F_AUTO_BUF_REG != 0 && user_copy {
        // (NBD: short payloads through the daemon.)
        "auto-buf-reg+user-copy"
    } else if flags & sys::abi::UBLK_F_SUPPORT_ZERO_COPY != 0 && user_copy {
        "zero-copy+user-copy"
    } else if flags & sys::abi::UBLK_F_AUTO_BUF_REG != 0 {
        DataPath::AutoBufReg.name()
    } else if flags & sys::abi::UBLK_F_SUPPORT_ZERO_COPY != 0 {
        DataPath::ZeroCopy.name()
    } else if flags & sys::abi::UBLK_F_USER_COPY != 0 {
        match cfg.and_then(|c| c.data_path.as_deref()) {
            Some("none") => DataPath::NoData.name(),
            Some(_) => DataPath::UserCopy.name(),
            None if cfg.is_some_and(|c| c.target == "null") => DataPath::NoData.name(),
            None => DataPath::UserCopy.name(),
        }
    } else {
        DataPath::Copy.name()
    }
}

//! `ublk features`: per `UBLK_F_` flag, whether the kernel offers it and
//! the library implements it.

use anyhow::Result;
use ublk::{sys, Control, Encoding};

/// The kernel's name of the `UBLK_F_*` flag `1 << bit`: from the library's
/// ABI table (every flag up to the newest kernel it knows), else from this
/// build's header.
fn flag_name(bit: u32) -> Option<&'static str> {
    let f = 1u64 << bit;
    sys::abi::flag_name(f).or_else(|| sys::HEADER_FLAGS.iter().find(|(_, v)| *v == f).map(|(n, _)| *n))
}

pub(super) fn cmd_features(json: bool) -> Result<()> {
    let ctrl = Control::open()?;
    let release = ublk::ctrl::kernel_release();
    let (a, b, c) = sys::HEADER_LINUX_VERSION;
    let feats = ctrl.features();
    let encoding = match ctrl.encoding() {
        Encoding::Legacy => "legacy",
        Encoding::Ioctl => "ioctl",
    };
    // Every flag the library knows (all of Linux 7.3's, from the ABI table,
    // whatever the header's age), then any bit the kernel reports beyond.
    let known: Vec<(&str, u64)> = sys::abi::TABLE.iter().filter(|(n, _, _)| n.starts_with("UBLK_F_")).map(|(n, v, _)| (*n, *v)).collect();
    let unknown: Vec<u32> = (0..64).filter(|b| feats.is_some_and(|f| f.0 & (1u64 << b) != 0) && flag_name(*b).is_none()).collect();
    let rows: Vec<serde_json::Value> = known
        .iter()
        .map(|(name, v)| {
            let flag = ublk::DevFlags::from_bits_retain(*v);
            let lib = flag.library_support();
            serde_json::json!({
                "name": name,
                "bit": v.trailing_zeros(),
                "since": flag.since().map(|(a, b)| format!("{a}.{b}")),
                "kernel": feats.map(|f| f.0 & v != 0),
                "library": lib.label(),
                "why": lib.why(),
            })
        })
        .collect();
    if json {
        let out = serde_json::json!({
            "kernel": release,
            "header": format!("{a}.{b}.{c}"),
            "get_features": feats.map(|f| f.0),
            "encoding": encoding,
            "flags": rows,
            "unknown_kernel_bits": unknown,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("kernel: {release}");
    println!(
        "build: ublk_cmd.h of Linux {a}.{b}.{c}; negotiation uses ublk_sys::abi (every flag and command up to Linux 7.3), whatever the header's age"
    );
    match feats {
        Some(f) => {
            let bits: Vec<u32> = (0..64).filter(|b| f.0 & (1u64 << b) != 0).collect();
            println!("GET_FEATURES: {:#x} ({} flags; every bit the kernel reports, by name):", f.0, bits.len());
            for bit in bits {
                match flag_name(bit) {
                    Some(n) => println!("  bit {bit:>2}  {n}"),
                    None => println!("  bit {bit:>2}  unknown to this version of ublk, which knows the flags up to Linux 7.3: upgrade ublk to name and use it"),
                }
            }
        }
        None => println!(
            "GET_FEATURES: missing (the command exists from Linux 6.5): this kernel cannot say which flags it offers (KERNEL is `unknown` below); ADD_DEV silently drops a flag it does not know, and the library then deletes the device and says so"
        ),
    }
    match ctrl.encoding() {
        Encoding::Legacy => println!("opcodes: legacy numbers (UBLK_CMD_*, UBLK_IO_*)"),
        Encoding::Ioctl => println!("opcodes: ioctl-encoded (UBLK_U_CMD_*, UBLK_U_IO_*)"),
    }
    println!(
        "every UBLK_F_ flag: whether this kernel offers it (GET_FEATURES) and this library implements it (ublk::DevFlags::library_support; the others are refused before ADD_DEV):"
    );
    println!("  {:<30} {:>3}  {:<5}  {:<7}  LIBRARY", "FLAG", "BIT", "SINCE", "KERNEL");
    for r in &rows {
        let kernel = match r["kernel"].as_bool() {
            Some(true) => "yes",
            Some(false) => "no",
            None => "unknown",
        };
        let lib = match r["why"].as_str() {
            Some(w) => format!("{}: {w}", r["library"].as_str().unwrap_or("")),
            None => "yes".to_string(),
        };
        println!(
            "  {:<30} {:>3}  {:<5}  {kernel:<7}  {lib}",
            r["name"].as_str().unwrap_or(""),
            r["bit"].as_u64().unwrap_or(0),
            r["since"].as_str().unwrap_or("?")
        );
    }
    if !unknown.is_empty() {
        let bits: Vec<String> = unknown.iter().map(u32::to_string).collect();
        println!(
            "note: the kernel reports {} flag bit(s) this version of ublk cannot name (bit {}): the kernel is newer than Linux 7.3; upgrade ublk",
            unknown.len(),
            bits.join(", ")
        );
    }
    Ok(())
}

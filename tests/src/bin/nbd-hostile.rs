//! `nbd-hostile --unix PATH --mode MODE [--size BYTES]`: a small NBD server
//! (fixed newstyle, simple replies, an in-memory export) that misbehaves on
//! purpose, for the NBD target's tests. It serves correctly except for
//! requests whose offset lies in the trigger window [1 MiB, 2 MiB), where
//! the mode decides what it does:
//!
//! * `good`: nothing wrong anywhere;
//! * `wrong-magic`: a reply header with a bad magic;
//! * `short-reply`: 10 bytes of a reply header, then the connection closes;
//! * `unknown-cookie`: a reply whose cookie no request has;
//! * `oversized-read`: a READ's payload with 4 KiB too many bytes;
//! * `enospc`: WRITEs fail with NBD_ENOSPC (the connection stays good);
//!
//! and, at the handshake: `close-mid-handshake` (closes after the
//! greeting), `export-name-only` (answers NBD_OPT_GO with
//! NBD_REP_ERR_UNSUP, so the client falls back to NBD_OPT_EXPORT_NAME),
//! `min-block-4096` (announces a minimum block size of 4096).
//!
//! Prints `ready` once it listens; serves one connection after another
//! until killed. What it got is logged on stderr.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const TRIGGER: std::ops::Range<u64> = (1 << 20)..(2 << 20);

fn opt_reply(s: &mut UnixStream, opt: u32, rep: u32, body: &[u8]) -> std::io::Result<()> {
    let mut m = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&rep.to_be_bytes());
    m.extend_from_slice(&(body.len() as u32).to_be_bytes());
    m.extend_from_slice(body);
    s.write_all(&m)
}

fn reply(s: &mut UnixStream, magic: u32, error: u32, cookie: u64) -> std::io::Result<()> {
    let mut m = magic.to_be_bytes().to_vec();
    m.extend_from_slice(&error.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    s.write_all(&m)
}

/// Flags: HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES.
const TFLAGS: u16 = 1 | 4 | 8 | 32 | 64;

fn handshake(s: &mut UnixStream, mode: &str, size: u64) -> std::io::Result<bool> {
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&3u16.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    s.write_all(&g)?;
    if mode == "close-mid-handshake" {
        eprintln!("nbd-hostile: closing after the greeting");
        return Ok(false);
    }
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match opt {
            7 if mode == "export-name-only" => opt_reply(s, opt, (1 << 31) + 1, &[])?,
            7 => {
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&TFLAGS.to_be_bytes());
                opt_reply(s, opt, 3, &info)?;
                if mode == "min-block-4096" {
                    let mut bs = 3u16.to_be_bytes().to_vec();
                    for v in [4096u32, 4096, 1 << 20] {
                        bs.extend_from_slice(&v.to_be_bytes());
                    }
                    opt_reply(s, opt, 3, &bs)?;
                }
                opt_reply(s, opt, 1, &[])?;
                return Ok(true);
            }
            1 => {
                let mut m = size.to_be_bytes().to_vec();
                m.extend_from_slice(&TFLAGS.to_be_bytes());
                s.write_all(&m)?;
                eprintln!("nbd-hostile: export by NBD_OPT_EXPORT_NAME");
                return Ok(true);
            }
            other => opt_reply(s, other, (1 << 31) + 1, &[])?,
        }
    }
}

fn serve(s: &mut UnixStream, mode: &str, disk: &mut [u8]) -> std::io::Result<()> {
    if !handshake(s, mode, disk.len() as u64)? {
        return Ok(());
    }
    loop {
        let mut h = [0u8; 28];
        s.read_exact(&mut h)?;
        let cmd = u16::from_be_bytes([h[6], h[7]]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let off = u64::from_be_bytes(h[16..24].try_into().unwrap());
        let len = u32::from_be_bytes(h[24..28].try_into().unwrap()) as usize;
        let range = off as usize..off as usize + len;
        let mut payload = vec![];
        if cmd == 1 {
            payload = vec![0u8; len];
            s.read_exact(&mut payload)?;
        }
        if cmd == 2 {
            eprintln!("nbd-hostile: NBD_CMD_DISC");
            return Ok(());
        }
        if range.end > disk.len() {
            reply(s, 0x6744_6698, 22, cookie)?;
            continue;
        }
        let hit = TRIGGER.contains(&off);
        if hit {
            eprintln!("nbd-hostile: {mode} on command {cmd} at {off}+{len}");
        }
        match (hit, mode, cmd) {
            (true, "wrong-magic", _) => reply(s, 0x1234_5678, 0, cookie)?,
            (true, "short-reply", _) => {
                s.write_all(&0x6744_6698u32.to_be_bytes())?;
                s.write_all(&[0u8; 6])?;
                return Ok(());
            }
            (true, "unknown-cookie", _) => reply(s, 0x6744_6698, 0, cookie ^ 0xdead_0000_0000_0000)?,
            (true, "oversized-read", 0) => {
                reply(s, 0x6744_6698, 0, cookie)?;
                s.write_all(&disk[range])?;
                s.write_all(&[0xAB; 4096])?;
            }
            (true, "enospc", 1) => reply(s, 0x6744_6698, 28, cookie)?,
            (_, _, 0) => {
                reply(s, 0x6744_6698, 0, cookie)?;
                s.write_all(&disk[range])?;
            }
            (_, _, 1) => {
                disk[range].copy_from_slice(&payload);
                reply(s, 0x6744_6698, 0, cookie)?;
            }
            (_, _, 4 | 6) => {
                disk[range].fill(0);
                reply(s, 0x6744_6698, 0, cookie)?;
            }
            (_, _, 3) => reply(s, 0x6744_6698, 0, cookie)?,
            _ => reply(s, 0x6744_6698, 95, cookie)?,
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let path = arg("--unix").expect("--unix PATH");
    let mode = arg("--mode").unwrap_or_else(|| "good".into());
    let size: u64 = arg("--size").map(|s| s.parse().expect("--size BYTES")).unwrap_or(64 << 20);
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).expect("bind");
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut disk = vec![0u8; size as usize];
    for c in l.incoming() {
        let Ok(mut s) = c else { continue };
        match serve(&mut s, &mode, &mut disk) {
            Ok(()) => eprintln!("nbd-hostile: connection ended"),
            Err(e) => eprintln!("nbd-hostile: connection ended: {e}"),
        }
    }
}

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
//! and with structured replies (`sr-*` modes acknowledge
//! NBD_OPT_STRUCTURED_REPLY; the others refuse it): every READ is answered
//! in up to four chunks sent last piece first, a piece of zeros as a hole,
//! the last chunk flagged DONE or followed by a NONE chunk (alternately);
//! other commands get simple and structured replies alternately. In the
//! trigger window, a READ gets:
//!
//! * `sr-good`: nothing wrong anywhere;
//! * `sr-out-of-bounds`: a data chunk just past the request's end;
//! * `sr-oversized-chunk`: a data chunk 4 KiB longer than the request;
//! * `sr-overlap`: two data chunks over the same bytes;
//! * `sr-incomplete`: half of its data, flagged DONE;
//! * `sr-missing-done`: all of its data, never DONE, then the connection
//!   closes;
//! * `sr-error`: an error chunk (NBD_ENOSPC, with a message; the connection
//!   stays good);
//! * `sr-bad-error`: an error chunk whose message is longer than the chunk;
//! * `sr-second-done`: a correct reply, then a second DONE chunk;
//! * `sr-unknown-type`: a chunk of type 7 (not an error type);
//! * `sr-simple-read`: a simple reply with the data;
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

const SIMPLE: u32 = 0x6744_6698;
const STRUCTURED: u32 = 0x668e_33ef;
const DONE: u16 = 1;
const NONE: u16 = 0;
const OFFSET_DATA: u16 = 1;
const OFFSET_HOLE: u16 = 2;
const ERROR: u16 = (1 << 15) + 1;

/// One structured reply chunk: header, then `payload`.
fn chunk(s: &mut UnixStream, flags: u16, ty: u16, cookie: u64, payload: &[u8]) -> std::io::Result<()> {
    let mut m = STRUCTURED.to_be_bytes().to_vec();
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&ty.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    m.extend_from_slice(payload);
    s.write_all(&m)
}

/// An OFFSET_DATA chunk of `data` at `off`.
fn data_chunk(s: &mut UnixStream, flags: u16, cookie: u64, off: u64, data: &[u8]) -> std::io::Result<()> {
    let mut p = off.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    chunk(s, flags, OFFSET_DATA, cookie, &p)
}

/// An error chunk: error, message length `msg_len` (as sent), message.
fn error_chunk(s: &mut UnixStream, flags: u16, cookie: u64, error: u32, msg_len: u16, msg: &[u8]) -> std::io::Result<()> {
    let mut p = error.to_be_bytes().to_vec();
    p.extend_from_slice(&msg_len.to_be_bytes());
    p.extend_from_slice(msg);
    chunk(s, flags, ERROR, cookie, &p)
}

/// A correct structured reply to a READ of `data` at `off`: up to four
/// pieces, the last one first, zeros as holes; DONE on the last chunk, or
/// a NONE chunk after it when `off` is an odd number of 4 KiB blocks.
fn structured_read(s: &mut UnixStream, cookie: u64, off: u64, data: &[u8]) -> std::io::Result<()> {
    let piece = (data.len() / 4).max(512).min(data.len().max(1));
    let pieces: Vec<(usize, &[u8])> = data.chunks(piece).enumerate().map(|(i, d)| (i * piece, d)).collect();
    let none_after = (off / 4096) % 2 == 1;
    for (i, (at, d)) in pieces.iter().rev().enumerate() {
        let last = i + 1 == pieces.len();
        let flags = if last && !none_after { DONE } else { 0 };
        let at = off + *at as u64;
        if d.iter().all(|&b| b == 0) {
            let mut p = at.to_be_bytes().to_vec();
            p.extend_from_slice(&(d.len() as u32).to_be_bytes());
            chunk(s, flags, OFFSET_HOLE, cookie, &p)?;
        } else {
            data_chunk(s, flags, cookie, at, d)?;
        }
    }
    if none_after {
        chunk(s, DONE, NONE, cookie, &[])?;
    }
    Ok(())
}

/// Flags: HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES.
const TFLAGS: u16 = 1 | 4 | 8 | 32 | 64;

/// Whether the transmission phase was reached, and with structured replies.
fn handshake(s: &mut UnixStream, mode: &str, size: u64) -> std::io::Result<Option<bool>> {
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&3u16.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    s.write_all(&g)?;
    if mode == "close-mid-handshake" {
        eprintln!("nbd-hostile: closing after the greeting");
        return Ok(None);
    }
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    let mut structured = false;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match opt {
            8 if mode.starts_with("sr-") => {
                structured = true;
                opt_reply(s, opt, 1, &[])?;
            }
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
                return Ok(Some(structured));
            }
            1 => {
                let mut m = size.to_be_bytes().to_vec();
                m.extend_from_slice(&TFLAGS.to_be_bytes());
                s.write_all(&m)?;
                eprintln!("nbd-hostile: export by NBD_OPT_EXPORT_NAME");
                return Ok(Some(structured));
            }
            other => opt_reply(s, other, (1 << 31) + 1, &[])?,
        }
    }
}

/// One request of the transmission phase: its header's command, cookie,
/// offset and length, and for a WRITE (1) the data that follows it.
struct Request {
    cmd: u16,
    cookie: u64,
    off: u64,
    len: usize,
    payload: Vec<u8>,
}

/// Reads the next request; `None` for NBD_CMD_DISC (2), which ends the
/// connection.
fn read_request(s: &mut UnixStream) -> std::io::Result<Option<Request>> {
    let mut h = [0u8; 28];
    s.read_exact(&mut h)?;
    let cmd = u16::from_be_bytes([h[6], h[7]]);
    let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
    let off = u64::from_be_bytes(h[16..24].try_into().unwrap());
    let len = u32::from_be_bytes(h[24..28].try_into().unwrap()) as usize;
    let mut payload = vec![];
    if cmd == 1 {
        payload = vec![0u8; len];
        s.read_exact(&mut payload)?;
    }
    if cmd == 2 {
        eprintln!("nbd-hostile: NBD_CMD_DISC");
        return Ok(None);
    }
    Ok(Some(Request { cmd, cookie, off, len, payload }))
}

fn serve(s: &mut UnixStream, mode: &str, disk: &mut [u8]) -> std::io::Result<()> {
    let Some(structured) = handshake(s, mode, disk.len() as u64)? else {
        return Ok(());
    };
    if structured {
        eprintln!("nbd-hostile: structured replies");
        return serve_structured(s, mode, disk);
    }
    loop {
        let Some(Request { cmd, cookie, off, len, payload }) = read_request(s)? else {
            return Ok(());
        };
        let range = off as usize..off as usize + len;
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

/// The transmission phase with structured replies (`sr-*` modes).
fn serve_structured(s: &mut UnixStream, mode: &str, disk: &mut [u8]) -> std::io::Result<()> {
    let mut n = 0u64;
    loop {
        let Some(Request { cmd, cookie, off, len, payload }) = read_request(s)? else {
            return Ok(());
        };
        let range = off as usize..off as usize + len;
        n += 1;
        // Other commands: a simple reply or a NONE chunk, alternately.
        let ok = |s: &mut UnixStream| if n % 2 == 0 { reply(s, SIMPLE, 0, cookie) } else { chunk(s, DONE, NONE, cookie, &[]) };
        if range.end > disk.len() {
            error_chunk(s, DONE, cookie, 22, 0, &[])?;
            continue;
        }
        let hit = cmd == 0 && TRIGGER.contains(&off);
        if hit {
            eprintln!("nbd-hostile: {mode} on READ at {off}+{len}");
        }
        let data = disk[range.clone()].to_vec();
        match (hit, mode, cmd) {
            (true, "sr-out-of-bounds", _) => data_chunk(s, DONE, cookie, off + len as u64, &[0xAB; 512])?,
            (true, "sr-oversized-chunk", _) => {
                let mut d = data.clone();
                d.extend_from_slice(&[0xAB; 4096]);
                data_chunk(s, DONE, cookie, off, &d)?;
            }
            (true, "sr-overlap", _) => {
                data_chunk(s, 0, cookie, off, &data[..len / 2])?;
                data_chunk(s, DONE, cookie, off, &data)?;
            }
            (true, "sr-incomplete", _) => data_chunk(s, DONE, cookie, off, &data[..len / 2])?,
            (true, "sr-missing-done", _) => {
                data_chunk(s, 0, cookie, off, &data)?;
                return Ok(());
            }
            (true, "sr-error", _) => {
                let msg = b"nbd-hostile: no reading here";
                error_chunk(s, DONE, cookie, 28, msg.len() as u16, msg)?;
            }
            (true, "sr-bad-error", _) => error_chunk(s, DONE, cookie, 1, 100, b"short")?,
            (true, "sr-second-done", _) => {
                structured_read(s, cookie, off, &data)?;
                chunk(s, DONE, NONE, cookie, &[])?;
            }
            (true, "sr-unknown-type", _) => chunk(s, DONE, 7, cookie, &[0, 0, 0, 0])?,
            (true, "sr-simple-read", _) => {
                reply(s, SIMPLE, 0, cookie)?;
                s.write_all(&data)?;
            }
            (_, _, 0) => structured_read(s, cookie, off, &data)?,
            (_, _, 1) => {
                disk[range].copy_from_slice(&payload);
                ok(s)?;
            }
            (_, _, 4 | 6) => {
                disk[range].fill(0);
                ok(s)?;
            }
            (_, _, 3) => ok(s)?,
            _ => error_chunk(s, DONE, cookie, 95, 0, &[])?,
        }
    }
}

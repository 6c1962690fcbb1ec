//! The NBD wire protocol (the NBD project's `doc/proto.md`): numbers, the
//! fixed newstyle handshake (blocking, at setup time), and the
//! transmission phase's request and reply headers.

use std::io::{self, Read, Write};

/// `NBDMAGIC`.
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the magic of every option.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// The magic of every option reply.
pub(crate) const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The oldstyle handshake's second magic (`cliserv_magic`).
pub(crate) const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;

/// Handshake flags (server).
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub(crate) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub(crate) const OPT_EXPORT_NAME: u32 = 1;
pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply types.
pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_ERR_BIT: u32 = 1 << 31;
pub(crate) const REP_ERR_UNSUP: u32 = REP_ERR_BIT + 1;
pub(crate) const REP_ERR_POLICY: u32 = REP_ERR_BIT + 2;
pub(crate) const REP_ERR_INVALID: u32 = REP_ERR_BIT + 3;
pub(crate) const REP_ERR_PLATFORM: u32 = REP_ERR_BIT + 4;
pub(crate) const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT + 5;
pub(crate) const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT + 6;
pub(crate) const REP_ERR_SHUTDOWN: u32 = REP_ERR_BIT + 7;
pub(crate) const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR_BIT + 8;
pub(crate) const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT + 9;

/// Information types of `NBD_OPT_GO`.
pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags: what the export offers.
pub mod flags {
    /// `NBD_FLAG_HAS_FLAGS`.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_ROTATIONAL`.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_FLAG_SEND_TRIM`.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_CAN_MULTI_CONN`.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Request and reply headers.
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub(crate) const REQUEST_LEN: usize = 28;
pub(crate) const REPLY_LEN: usize = 16;
/// A structured reply chunk's header: magic, flags, type, cookie, length.
pub(crate) const CHUNK_LEN: usize = 20;

/// Structured reply flags: the reply's last chunk.
pub(crate) const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply chunk types.
pub(crate) const REPLY_TYPE_NONE: u16 = 0;
pub(crate) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(crate) const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Bit 15 of a chunk type: an error chunk (error, message length, message).
pub(crate) const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub(crate) const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT + 1;
pub(crate) const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT + 2;

/// Commands.
pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_WRITE: u16 = 1;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_FLUSH: u16 = 3;
pub(crate) const CMD_TRIM: u16 = 4;
pub(crate) const CMD_WRITE_ZEROES: u16 = 6;
/// Command flags.
pub(crate) const CMD_FLAG_FUA: u16 = 1 << 0;
pub(crate) const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// The errno a request fails with for the server's error value. The
/// protocol's values are Linux's own numbers; anything else is EIO.
pub(crate) fn errno(nbd_error: u32) -> i32 {
    match nbd_error {
        1 => libc::EPERM,
        5 => libc::EIO,
        12 => libc::ENOMEM,
        22 => libc::EINVAL,
        28 => libc::ENOSPC,
        75 => libc::EOVERFLOW,
        95 => libc::EOPNOTSUPP,
        108 => libc::ESHUTDOWN,
        _ => libc::EIO,
    }
}

/// A request header (28 bytes, big endian).
pub(crate) fn request(out: &mut [u8; REQUEST_LEN], flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) {
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&cmd.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..24].copy_from_slice(&offset.to_be_bytes());
    out[24..28].copy_from_slice(&len.to_be_bytes());
}

/// What the server says of its export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags ([`flags`]).
    pub flags: u16,
    /// The server's minimum block size (1 unless it said otherwise).
    pub min_block: u32,
    /// The server's preferred block size (4096 unless it said otherwise).
    pub preferred_block: u32,
    /// The largest payload the server takes (32 MiB unless it said otherwise).
    pub max_payload: u32,
    /// Whether the export came from `NBD_OPT_GO` (else `NBD_OPT_EXPORT_NAME`).
    pub go: bool,
    /// Whether structured replies were negotiated
    /// (`NBD_OPT_STRUCTURED_REPLY`): READs are then answered in chunks of
    /// data, holes and errors.
    pub structured: bool,
}

/// Why a handshake failed: an I/O error, or what the server said or did.
#[derive(Debug)]
pub(crate) enum HandshakeError {
    Io(io::Error),
    /// The server closed the connection; `during` says at which step.
    Closed(&'static str),
    /// The server broke the protocol, or refused.
    Refused(String),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

fn read_exact<S: Read>(s: &mut S, buf: &mut [u8], during: &'static str) -> Result<(), HandshakeError> {
    match s.read_exact(buf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof || e.kind() == io::ErrorKind::ConnectionReset => {
            Err(HandshakeError::Closed(during))
        }
        Err(e) => Err(HandshakeError::Io(e)),
    }
}

fn be_u64<S: Read>(s: &mut S, during: &'static str) -> Result<u64, HandshakeError> {
    let mut b = [0; 8];
    read_exact(s, &mut b, during)?;
    Ok(u64::from_be_bytes(b))
}

fn be_u32<S: Read>(s: &mut S, during: &'static str) -> Result<u32, HandshakeError> {
    let mut b = [0; 4];
    read_exact(s, &mut b, during)?;
    Ok(u32::from_be_bytes(b))
}

fn be_u16<S: Read>(s: &mut S, during: &'static str) -> Result<u16, HandshakeError> {
    let mut b = [0; 2];
    read_exact(s, &mut b, during)?;
    Ok(u16::from_be_bytes(b))
}

fn send_option<S: Write>(s: &mut S, opt: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

fn rep_name(rep: u32) -> &'static str {
    match rep {
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP (option not supported)",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY (forbidden by the server's policy)",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID (invalid request)",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM (not supported on the server's platform)",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD (the server requires TLS, which this client does not speak)",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN (no such export)",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN (the server is shutting down)",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG (request too big)",
        _ => "an error",
    }
}

/// The longest option reply we read (a description can be long; anything
/// beyond this is a server to distrust).
const MAX_OPT_REPLY: u32 = 64 << 10;

/// Reads one option reply header (magic, option, type, length) to option
/// `want`, and its body. `during` names the step for errors.
fn opt_reply<S: Read>(s: &mut S, want: u32, during: &'static str) -> Result<(u32, Vec<u8>), HandshakeError> {
    let magic = be_u64(s, during)?;
    if magic != OPT_REPLY_MAGIC {
        return Err(HandshakeError::Refused(format!("bad option reply magic {magic:#018x}")));
    }
    let opt = be_u32(s, during)?;
    let rep = be_u32(s, during)?;
    let len = be_u32(s, during)?;
    if opt != want {
        return Err(HandshakeError::Refused(format!("the server answered option {opt} to option {want}")));
    }
    if len > MAX_OPT_REPLY {
        return Err(HandshakeError::Refused(format!("option reply of {len} bytes")));
    }
    let mut body = vec![0u8; len as usize];
    read_exact(s, &mut body, during)?;
    Ok((rep, body))
}

/// Asks for structured replies (`NBD_OPT_STRUCTURED_REPLY`): true if the
/// server acknowledged, false if it refused (any error reply: an old
/// server answers `NBD_REP_ERR_UNSUP`).
fn structured_replies<S: Read + Write>(s: &mut S) -> Result<bool, HandshakeError> {
    send_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let during = "answering NBD_OPT_STRUCTURED_REPLY";
    match opt_reply(s, OPT_STRUCTURED_REPLY, during)? {
        (REP_ACK, body) if body.is_empty() => Ok(true),
        (rep, _) if rep & REP_ERR_BIT != 0 => Ok(false),
        (rep, body) => Err(HandshakeError::Refused(format!(
            "unexpected option reply type {rep:#x} ({} bytes) to NBD_OPT_STRUCTURED_REPLY",
            body.len()
        ))),
    }
}

/// The fixed newstyle handshake on a connected stream, ending in the
/// transmission phase for `export`. Asks for structured replies if
/// `structured` (the server may refuse), then tries `NBD_OPT_GO` (asking
/// for the block size constraints) and falls back to `NBD_OPT_EXPORT_NAME`
/// if the server does not know GO.
pub(crate) fn handshake<S: Read + Write>(s: &mut S, export: &str, structured: bool) -> Result<ExportInfo, HandshakeError> {
    if export.len() > 4096 {
        return Err(HandshakeError::Refused(format!("export name of {} bytes is longer than the protocol's 4096", export.len())));
    }
    let magic = be_u64(s, "before sending its greeting")?;
    if magic != NBDMAGIC {
        return Err(HandshakeError::Refused(format!("this is not an NBD server (greeting {magic:#018x}, not NBDMAGIC)")));
    }
    let magic = be_u64(s, "in its greeting")?;
    if magic == CLISERV_MAGIC {
        return Err(HandshakeError::Refused("the server speaks only the oldstyle handshake, which this client does not; use a newstyle server (qemu-nbd, nbd-server 3.x, nbdkit)".into()));
    }
    if magic != IHAVEOPT {
        return Err(HandshakeError::Refused(format!("unknown handshake magic {magic:#018x} (not IHAVEOPT)")));
    }
    let hflags = be_u16(s, "in its greeting")?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::Refused("the server lacks the fixed newstyle handshake (NBD_FLAG_FIXED_NEWSTYLE)".into()));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    s.write_all(&cflags.to_be_bytes())?;
    let structured = structured && structured_replies(s)?;

    // NBD_OPT_GO: name, and one information request (block sizes).
    let mut data = Vec::with_capacity(8 + export.len());
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &data)?;
    let mut export_info: Option<(u64, u16)> = None;
    let mut sizes: Option<(u32, u32, u32)> = None;
    loop {
        let (rep, body) = opt_reply(s, OPT_GO, "answering NBD_OPT_GO")?;
        match rep {
            REP_INFO if body.len() >= 2 => {
                let ty = u16::from_be_bytes([body[0], body[1]]);
                match ty {
                    INFO_EXPORT if body.len() == 12 => {
                        let size = u64::from_be_bytes(body[2..10].try_into().expect("8 bytes"));
                        let fl = u16::from_be_bytes([body[10], body[11]]);
                        export_info = Some((size, fl));
                    }
                    INFO_BLOCK_SIZE if body.len() == 14 => {
                        let g = |i: usize| u32::from_be_bytes(body[i..i + 4].try_into().expect("4 bytes"));
                        sizes = Some((g(2), g(6), g(10)));
                    }
                    INFO_EXPORT | INFO_BLOCK_SIZE => {
                        return Err(HandshakeError::Refused(format!("information {ty} of the wrong length {}", body.len())))
                    }
                    // Others (name, description) are ignored, as the protocol says.
                    _ => {}
                }
            }
            REP_INFO => return Err(HandshakeError::Refused("empty NBD_REP_INFO".into())),
            REP_ACK => {
                let Some((size, fl)) = export_info else {
                    return Err(HandshakeError::Refused("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into()));
                };
                return finish(size, fl, sizes, true, structured);
            }
            REP_ERR_UNSUP => break,
            rep if rep & REP_ERR_BIT != 0 => {
                let msg = String::from_utf8_lossy(&body).trim().to_string();
                let name = if export.is_empty() { "the default export".to_string() } else { format!("export {export:?}") };
                return Err(HandshakeError::Refused(format!(
                    "the server refused {name}: {}{}",
                    rep_name(rep),
                    if msg.is_empty() { String::new() } else { format!(": {msg}") }
                )));
            }
            rep => return Err(HandshakeError::Refused(format!("unexpected option reply type {rep:#x} to NBD_OPT_GO"))),
        }
    }
    // The server does not know NBD_OPT_GO: NBD_OPT_EXPORT_NAME, after which
    // a server that refuses simply closes the connection.
    send_option(s, OPT_EXPORT_NAME, export.as_bytes())?;
    let size = be_u64(s, "answering NBD_OPT_EXPORT_NAME (the export is refused or does not exist)")?;
    let fl = be_u16(s, "answering NBD_OPT_EXPORT_NAME")?;
    if !no_zeroes {
        let mut z = [0u8; 124];
        read_exact(s, &mut z, "answering NBD_OPT_EXPORT_NAME")?;
    }
    finish(size, fl, None, false, structured)
}

fn finish(size: u64, fl: u16, sizes: Option<(u32, u32, u32)>, go: bool, structured: bool) -> Result<ExportInfo, HandshakeError> {
    if fl & flags::HAS_FLAGS == 0 {
        return Err(HandshakeError::Refused(format!("transmission flags {fl:#x} lack NBD_FLAG_HAS_FLAGS")));
    }
    let (min_block, preferred_block, max_payload) = sizes.unwrap_or((1, 4096, 32 << 20));
    if !min_block.is_power_of_two() || min_block > 65536 || !preferred_block.is_power_of_two() || max_payload < preferred_block {
        return Err(HandshakeError::Refused(format!(
            "invalid block size constraints: minimum {min_block}, preferred {preferred_block}, maximum payload {max_payload}"
        )));
    }
    Ok(ExportInfo { size, flags: fl, min_block, preferred_block, max_payload, go, structured })
}

/// Ends a handshake politely (`NBD_OPT_ABORT`), before the transmission
/// phase; errors are ignored (the connection is dropped anyway).
#[allow(dead_code)]
pub(crate) fn abort<S: Write>(s: &mut S) {
    let _ = send_option(s, OPT_ABORT, &[]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted peer: reads come from `input`, writes go to `output`.
    struct Peer {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Peer {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Peer {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn greeting(hflags: u16) -> Vec<u8> {
        let mut v = NBDMAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&hflags.to_be_bytes());
        v
    }

    fn opt_reply(v: &mut Vec<u8>, opt: u32, rep: u32, body: &[u8]) {
        v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&rep.to_be_bytes());
        v.extend_from_slice(&(body.len() as u32).to_be_bytes());
        v.extend_from_slice(body);
    }

    #[test]
    fn go_with_block_sizes() {
        let mut v = greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        opt_reply(&mut v, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&(1u64 << 30).to_be_bytes());
        info.extend_from_slice(&(flags::HAS_FLAGS | flags::SEND_FLUSH).to_be_bytes());
        opt_reply(&mut v, OPT_GO, REP_INFO, &info);
        let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for x in [512u32, 4096, 1 << 20] {
            bs.extend_from_slice(&x.to_be_bytes());
        }
        opt_reply(&mut v, OPT_GO, REP_INFO, &bs);
        opt_reply(&mut v, OPT_GO, REP_ACK, &[]);
        let mut p = Peer { input: io::Cursor::new(v), output: vec![] };
        let e = handshake(&mut p, "disk", true).unwrap();
        assert_eq!(
            e,
            ExportInfo {
                size: 1 << 30,
                flags: flags::HAS_FLAGS | flags::SEND_FLUSH,
                min_block: 512,
                preferred_block: 4096,
                max_payload: 1 << 20,
                go: true,
                structured: true
            }
        );
        // client flags, IHAVEOPT STRUCTURED_REPLY with no data, then
        // IHAVEOPT, GO, len 4+4+2+2, name, 1 request: block size
        let o = &p.output;
        assert_eq!(&o[0..4], &(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        assert_eq!(&o[4..12], &IHAVEOPT.to_be_bytes());
        assert_eq!(&o[12..16], &OPT_STRUCTURED_REPLY.to_be_bytes());
        assert_eq!(&o[16..20], &0u32.to_be_bytes());
        let o = &o[16..];
        assert_eq!(&o[4..12], &IHAVEOPT.to_be_bytes());
        assert_eq!(&o[12..16], &OPT_GO.to_be_bytes());
        assert_eq!(&o[16..20], &12u32.to_be_bytes());
        assert_eq!(&o[20..24], &4u32.to_be_bytes());
        assert_eq!(&o[24..28], b"disk");
        assert_eq!(&o[28..32], &[0, 1, 0, 3]);
    }

    #[test]
    fn falls_back_to_export_name() {
        let mut v = greeting(FLAG_FIXED_NEWSTYLE);
        opt_reply(&mut v, OPT_STRUCTURED_REPLY, REP_ERR_UNSUP, &[]);
        opt_reply(&mut v, OPT_GO, REP_ERR_UNSUP, &[]);
        v.extend_from_slice(&(4096u64).to_be_bytes());
        v.extend_from_slice(&(flags::HAS_FLAGS | flags::READ_ONLY).to_be_bytes());
        v.extend_from_slice(&[0u8; 124]);
        let mut p = Peer { input: io::Cursor::new(v), output: vec![] };
        let e = handshake(&mut p, "", true).unwrap();
        assert_eq!((e.size, e.flags, e.go, e.structured), (4096, flags::HAS_FLAGS | flags::READ_ONLY, false, false));
        // Without asking: no NBD_OPT_STRUCTURED_REPLY on the wire.
        let mut v = greeting(FLAG_FIXED_NEWSTYLE);
        opt_reply(&mut v, OPT_GO, REP_ERR_UNSUP, &[]);
        v.extend_from_slice(&(4096u64).to_be_bytes());
        v.extend_from_slice(&flags::HAS_FLAGS.to_be_bytes());
        v.extend_from_slice(&[0u8; 124]);
        let mut p = Peer { input: io::Cursor::new(v), output: vec![] };
        let e = handshake(&mut p, "", false).unwrap();
        assert!(!e.structured);
        assert_eq!(&p.output[12..16], &OPT_GO.to_be_bytes());
    }

    #[test]
    fn refusals_and_closes_are_named() {
        let mut v = greeting(FLAG_FIXED_NEWSTYLE);
        opt_reply(&mut v, OPT_GO, REP_ERR_UNKNOWN, b"no such thing");
        let mut p = Peer { input: io::Cursor::new(v), output: vec![] };
        match handshake(&mut p, "x", false) {
            Err(HandshakeError::Refused(m)) => assert!(m.contains("NBD_REP_ERR_UNKNOWN") && m.contains("no such thing"), "{m}"),
            other => panic!("{other:?}"),
        }
        let v = greeting(FLAG_FIXED_NEWSTYLE)[..10].to_vec();
        let mut p = Peer { input: io::Cursor::new(v), output: vec![] };
        assert!(matches!(handshake(&mut p, "x", false), Err(HandshakeError::Closed(_))));
        let mut p = Peer { input: io::Cursor::new(b"HTTP/1.1 400 Bad Request\r\n".to_vec()), output: vec![] };
        assert!(matches!(handshake(&mut p, "x", false), Err(HandshakeError::Refused(_))));
    }

    #[test]
    fn request_header_layout() {
        let mut h = [0u8; REQUEST_LEN];
        request(&mut h, CMD_FLAG_FUA, CMD_WRITE, 0x0102_0304_0506_0708, 4096, 512);
        assert_eq!(&h[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&h[4..8], &[0, 1, 0, 1]);
        assert_eq!(&h[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&h[16..24], &4096u64.to_be_bytes());
        assert_eq!(&h[24..28], &512u32.to_be_bytes());
    }
}

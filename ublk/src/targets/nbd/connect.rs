//! One connection to the NBD server through the handshake (blocking, at
//! setup time and when a lost connection is made again), and the errors
//! that name the server and what went wrong.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::proto::{handshake, ExportInfo, HandshakeError};
use super::{NbdAddr, NbdOptions};
use crate::error::{Error, Result};

fn handshake_error(addr: &NbdAddr, e: HandshakeError, timeout: Duration) -> Error {
    match e {
        HandshakeError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => Error::os(
            format!("NBD handshake with {addr}: the server did not answer within {} s", timeout.as_secs_f32()),
            io::Error::from(io::ErrorKind::TimedOut),
        ),
        HandshakeError::Io(e) if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) => Error::os(
            format!("NBD handshake with {addr}"),
            io::Error::new(e.kind(), "the server closed the connection during the handshake"),
        ),
        HandshakeError::Io(e) => Error::os(format!("NBD handshake with {addr}"), e),
        HandshakeError::Closed(during) => Error::os(
            format!("NBD handshake with {addr}"),
            io::Error::new(io::ErrorKind::UnexpectedEof, format!("the server closed the connection {during}")),
        ),
        HandshakeError::Refused(why) => Error::InvalidConfig { what: "NBD export", why: format!("{addr}: {why}") },
    }
}

/// One connection through the handshake: the socket, in blocking mode and
/// without time limits, ready for the transmission phase.
pub(super) fn connect_one(opts: &NbdOptions) -> Result<(OwnedFd, ExportInfo)> {
    let addr = &opts.addr;
    let t = opts.timeout;
    let sockopt = |e| Error::os("setting socket options", e);
    match addr {
        NbdAddr::Tcp { host, port } => {
            let addrs: Vec<_> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| Error::os(format!("resolving the NBD server's address {addr}"), e))?
                .collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address");
            let mut stream = None;
            for a in addrs {
                match TcpStream::connect_timeout(&a, t) {
                    Ok(s) => {
                        stream = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let mut s = stream.ok_or_else(|| Error::os(format!("connecting to the NBD server {addr}"), last))?;
            s.set_nodelay(true).map_err(sockopt)?;
            s.set_read_timeout(Some(t)).and_then(|_| s.set_write_timeout(Some(t))).map_err(sockopt)?;
            let info = handshake(&mut s, &opts.export, opts.structured_replies).map_err(|e| handshake_error(addr, e, t))?;
            s.set_read_timeout(None).and_then(|_| s.set_write_timeout(None)).map_err(sockopt)?;
            Ok((s.into(), info))
        }
        NbdAddr::Unix(path) => {
            let mut s = UnixStream::connect(path).map_err(|e| Error::os(format!("connecting to the NBD server {addr}"), e))?;
            s.set_read_timeout(Some(t)).and_then(|_| s.set_write_timeout(Some(t))).map_err(sockopt)?;
            let info = handshake(&mut s, &opts.export, opts.structured_replies).map_err(|e| handshake_error(addr, e, t))?;
            s.set_read_timeout(None).and_then(|_| s.set_write_timeout(None)).map_err(sockopt)?;
            Ok((s.into(), info))
        }
    }
}

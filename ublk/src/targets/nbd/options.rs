//! Where the NBD server is and how to reach the export: [`NbdAddr`] and
//! [`NbdOptions`].

use std::path::PathBuf;
use std::time::Duration;

/// Where the NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// A TCP host (name or address) and port (10809 is NBD's).
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix socket.
    Unix(PathBuf),
}

impl std::fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddr::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
            NbdAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// How to reach the export.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// The server.
    pub addr: NbdAddr,
    /// The export's name (empty: the server's default export).
    pub export: String,
    /// Connections, one per queue (default 1). More than one needs a server
    /// that advertises `NBD_FLAG_CAN_MULTI_CONN`.
    pub connections: u16,
    /// Time limit for connecting and for each step of the handshake.
    pub timeout: Duration,
    /// On a lost connection (the server gone, a reset, an end of stream),
    /// reconnect with backoff and re-issue the requests in flight, which
    /// wait meanwhile, instead of failing them with EIO. A reply that
    /// breaks the protocol still ends the connection for good.
    pub reconnect: bool,
    /// Ask for structured replies (`NBD_OPT_STRUCTURED_REPLY`, default on):
    /// READs answered in chunks of data, holes (not sent as zeros) and
    /// errors. A server that does not offer them answers with simple
    /// replies; off, every server does.
    pub structured_replies: bool,
}

impl NbdOptions {
    /// A TCP server, default export, one connection, 10 s time limit.
    pub fn tcp(host: &str, port: u16) -> NbdOptions {
        NbdOptions::new(NbdAddr::Tcp { host: host.to_string(), port })
    }

    /// A unix-socket server, default export, one connection, 10 s time limit.
    pub fn unix(path: impl Into<PathBuf>) -> NbdOptions {
        NbdOptions::new(NbdAddr::Unix(path.into()))
    }

    fn new(addr: NbdAddr) -> NbdOptions {
        NbdOptions {
            addr,
            export: String::new(),
            connections: 1,
            timeout: Duration::from_secs(10),
            reconnect: false,
            structured_replies: true,
        }
    }

    /// Names the export.
    pub fn export(mut self, name: &str) -> NbdOptions {
        self.export = name.to_string();
        self
    }

    /// Sets the number of connections (and so of queues).
    pub fn connections(mut self, n: u16) -> NbdOptions {
        self.connections = n;
        self
    }

    /// Reconnects after a lost connection (see [`NbdOptions::reconnect`]).
    pub fn reconnect(mut self, on: bool) -> NbdOptions {
        self.reconnect = on;
        self
    }

    /// Asks for structured replies or not (see
    /// [`NbdOptions::structured_replies`]).
    pub fn structured_replies(mut self, on: bool) -> NbdOptions {
        self.structured_replies = on;
        self
    }
}

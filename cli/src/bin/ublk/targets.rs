//! Opening the targets the CLI serves: a loop file, a stripe's legs, an
//! NBD server's options.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use ublk::{LoopOptions, LoopTarget, NbdOptions, Stripe};
use ublk_cli::config::NbdConfig;

/// Opens a loop target; returns it with the absolute path of its file.
pub(super) fn open_loop(file: &Path, direct: bool) -> Result<(LoopTarget, PathBuf)> {
    let target = LoopTarget::open(file, &LoopOptions { direct, read_only: false })?;
    let abs = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    Ok((target, abs))
}

/// Opens a stripe target; returns it with the absolute paths of its legs.
pub(super) fn open_stripe(files: &[PathBuf], chunk: u32, direct: bool) -> Result<(Stripe, Vec<PathBuf>)> {
    let target = Stripe::open(files, chunk, &LoopOptions { direct, read_only: false })?;
    let abs = files.iter().map(|f| std::fs::canonicalize(f).unwrap_or_else(|_| f.clone())).collect();
    Ok((target, abs))
}

/// The library's options for a saved NBD configuration.
pub(super) fn nbd_options(n: &NbdConfig) -> Result<NbdOptions> {
    let opts = match (&n.host, &n.unix) {
        (Some(h), None) => NbdOptions::tcp(h, n.port),
        (None, Some(p)) => NbdOptions::unix(p),
        _ => bail!("-t nbd needs the server: --host H [--port P], or --unix PATH"),
    };
    Ok(opts.export(&n.export).connections(n.connections).reconnect(n.reconnect).structured_replies(!n.simple_replies))
}

//! `ublk`: create, list, delete and recover ublk block devices.
//!
//! * `ublk add -t null|ramdisk|loop|stripe|nbd ...`: creates a device and serves it in
//!   the foreground (the block device path is the first line on stdout; the
//!   per-queue counts follow at exit) until SIGINT/SIGTERM, or with
//!   `--detach` in a background daemon (the id is printed once it is live).
//! * `ublk list`, `ublk del -n N | --all [--safe]`, `ublk features [--json]`.
//! * `ublk recover -n N`: takes over a `--recovery` device whose daemon died
//!   (or was quiesced) and serves it again with the configuration saved in
//!   `/run/ublk/N.json`.
//! * `ublk resize -n N --size S` (Linux 6.16+): a live device's new size.
//! * `ublk quiesce -n N` (Linux 6.16+, `--recovery` devices): the daemon
//!   lets go of the device without failing I/O, which waits in the kernel
//!   for `ublk recover -n N` (a daemon upgrade).
//! * `ublk add --unprivileged ...` (Linux 6.3+): as an ordinary user, an
//!   unprivileged device, which only its owner (and root) may control; the
//!   user's state is kept in `$XDG_RUNTIME_DIR/ublk`. `ublk udev-owner
//!   NAME` is the program the udev rule runs to give a device's nodes to its
//!   owner (docs/unprivileged.md).
//!
//! Errors are one line, `ublk: error: ...`, with exit code 1.

// Where the parts are: this file has `main`, which parses the arguments
// and runs the command;
// * `args`: the command line (clap's definitions, the help texts);
// * `daemon`: --detach (the background daemon and its readiness pipe);
// * `serve`: serving a device until a signal, and what it prints;
// * `targets`: opening the targets (loop, stripe, NBD options);
// * `device`: an existing device: whether it exists, its info, its daemon;
// * `add`: `ublk add`;
// * `recover`: `ublk recover`;
// * `list`: `ublk list`;
// * `udev`: `ublk udev-owner`;
// * `del`: `ublk del`;
// * `resize`: `ublk resize`;
// * `quiesce`: `ublk quiesce`;
// * `features`: `ublk features`.
mod add;
mod args;
mod daemon;
mod del;
mod device;
mod features;
mod list;
mod quiesce;
mod recover;
mod resize;
mod serve;
mod targets;
mod udev;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::add::cmd_add;
use crate::args::{Cli, Cmd};
use crate::daemon::{detach, Ready};
use crate::del::cmd_del;
use crate::features::cmd_features;
use crate::list::cmd_list;
use crate::quiesce::cmd_quiesce;
use crate::recover::cmd_recover;
use crate::resize::cmd_resize;
use crate::udev::cmd_udev_owner;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments").trim_start_matches("error: ").to_string();
            eprintln!("ublk: error: {first} (see `ublk --help`)");
            return ExitCode::FAILURE;
        }
    };
    // A detached daemon reports to its parent through this fd.
    let mut ready = Ready::from_env();
    let r = match cli.cmd {
        Cmd::Add(a) if a.detach => detach(),
        Cmd::Recover { detach: true, .. } => detach(),
        Cmd::Add(a) => cmd_add(a, &mut ready),
        Cmd::Recover { id, .. } => cmd_recover(id, &mut ready),
        Cmd::List { json } => cmd_list(json),
        Cmd::Del { id, all, safe } => cmd_del(id, all, safe),
        Cmd::Features { json } => cmd_features(json),
        Cmd::Resize { id, size } => cmd_resize(id, size),
        Cmd::Quiesce { id, timeout } => cmd_quiesce(id, Duration::from_secs(timeout)),
        Cmd::UdevOwner { name } => cmd_udev_owner(&name),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            ready.fail(&msg);
            eprintln!("ublk: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

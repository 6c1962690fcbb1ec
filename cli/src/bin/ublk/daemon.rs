//! `--detach`: the command run again as a background daemon, which
//! reports through a pipe once its device is live (or its error).

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use ublk_cli::config::{ensure_run_dir, run_dir};

/// Environment of a detached daemon: the fd to report readiness on, and its log.
const ENV_READY_FD: &str = "UBLK_DAEMON_READY_FD";
const ENV_LOG: &str = "UBLK_DAEMON_LOG";

/// The readiness pipe of a detached daemon (absent in the foreground).
pub(super) struct Ready {
    pipe: Option<File>,
    log: Option<PathBuf>,
}

impl Ready {
    pub(super) fn from_env() -> Ready {
        let fd = std::env::var(ENV_READY_FD).ok().and_then(|s| s.parse::<i32>().ok());
        let log = std::env::var_os(ENV_LOG).map(PathBuf::from);
        // Still single-threaded here: nothing reads the environment concurrently.
        std::env::remove_var(ENV_READY_FD);
        std::env::remove_var(ENV_LOG);
        // SAFETY: the parent passed us this fd (the write end of its pipe),
        // which nothing else in this process owns.
        let pipe = fd.filter(|fd| *fd > 2).map(|fd| unsafe { File::from_raw_fd(fd) });
        Ready { pipe, log }
    }

    pub(super) fn live(&mut self, id: u32) {
        if let (Some(log), Ok(dir)) = (self.log.take(), run_dir()) {
            let _ = std::fs::rename(&log, dir.join(format!("{id}.log")));
        }
        if let Some(mut p) = self.pipe.take() {
            let _ = writeln!(p, "live {id}");
        }
    }

    pub(super) fn fail(&mut self, msg: &str) {
        if let Some(mut p) = self.pipe.take() {
            let _ = writeln!(p, "error {msg}");
        }
    }
}

/// Re-executes this command in a new session, without --detach, stdio to a
/// log under the run directory; prints the device id once the daemon says
/// the device is live (or its error).
pub(super) fn detach() -> Result<()> {
    let exe = std::env::current_exe().context("finding this executable to start the daemon")?;
    let args: Vec<OsString> = std::env::args_os().skip(1).filter(|a| a != "--detach").collect();
    let dir = ensure_run_dir().map_err(|e| anyhow!(e))?;
    let log_path = dir.join(format!("daemon.{}.log", std::process::id()));
    let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let log2 = log.try_clone().context("duplicating the log fd")?;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating the daemon's readiness pipe");
    }
    // SAFETY: both fds were just created and are owned here only.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let wr_fd = wr.as_raw_fd();
    const CHILD_FD: i32 = 3;
    let mut cmd = Command::new(&exe);
    cmd.args(&args)
        .env(ENV_READY_FD, CHILD_FD.to_string())
        .env(ENV_LOG, &log_path)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .current_dir("/");
    // SAFETY: only async-signal-safe calls (setsid, dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if wr_fd == CHILD_FD {
                libc::fcntl(CHILD_FD, libc::F_SETFD, 0);
            } else if libc::dup2(wr_fd, CHILD_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("starting the daemon {}", exe.display()))?;
    drop(wr);
    let mut msg = String::new();
    let _ = File::from(rd).read_to_string(&mut msg);
    let msg = msg.trim();
    if let Some(id) = msg.strip_prefix("live ") {
        println!("{id}");
        return Ok(());
    }
    if let Some(e) = msg.strip_prefix("error ") {
        let _ = child.wait();
        let _ = std::fs::remove_file(&log_path);
        bail!("{e}");
    }
    let st = child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
    bail!("the background daemon exited ({st}) before the device was live; see its log {}", log_path.display())
}

//! A misbehaving ublk server for the field tests (`tests/tests/field.rs`),
//! built on the library's public API. Not for use outside the tests.
//!
//! ```text
//! ublk-testsrv hold [--writes] [--queues N] [--depth D] [--size BYTES] [--io-timeout-ms MS]
//!                   [--recovery|--reissue|--fail-io]
//!     Creates a device whose target never answers: every request (with
//!     --writes, every write; reads then return zeros) is held on its queue
//!     thread until the process is killed. Prints `id N` once the device
//!     exists, `/dev/ublkbN` once START_DEV has completed, and `held OP
//!     SECTOR` for each request it holds.
//! ublk-testsrv recover --id N
//!     Takes over device N (user recovery) with a null target and serves it
//!     until SIGTERM/SIGINT; prints `/dev/ublkbN` once it is live again, and
//!     `queue N: requests=...` lines at exit.
//! ublk-testsrv recover-die --id N --fetch K
//!     Starts user recovery of device N, FETCHes only tags 0..K of queue 0
//!     (each queue needs all of its tags before END_USER_RECOVERY can
//!     complete), prints `fetched K`, and dies of SIGKILL half-way.
//! ```

use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use io_uring::{opcode, types, IoUring};
use ublk::{DeviceBuilder, IoResult, NullTarget, Op, Request, Target};

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Never answers the requests it holds: the queue thread parks for good.
struct Hold {
    writes_only: bool,
}

impl Target for Hold {
    fn handle(&self, req: &Request, buf: &mut [u8]) -> IoResult {
        let hold = match req.op {
            Op::Write => true,
            Op::Read => !self.writes_only,
            _ => false,
        };
        if !hold {
            buf.fill(0);
            return Ok(req.len() as u32);
        }
        say(&format!("held {:?} {}", req.op, req.start_sector));
        loop {
            std::thread::park();
        }
    }
}

/// `--name VALUE` from the arguments.
fn value(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn number<T: std::str::FromStr>(args: &[String], name: &str, default: Option<T>) -> Result<T> {
    match value(args, name) {
        Some(v) => v.parse().ok().with_context(|| format!("{name} {v}: not a number")),
        None => default.with_context(|| format!("{name} is required")),
    }
}

fn hold(args: &[String]) -> Result<()> {
    let has = |f: &str| args.iter().any(|a| a == f);
    let mut flags = 0u64;
    if has("--recovery") || has("--reissue") || has("--fail-io") {
        flags |= ublk::sys::UBLK_F_USER_RECOVERY;
    }
    if has("--reissue") {
        flags |= ublk::sys::UBLK_F_USER_RECOVERY_REISSUE;
    }
    if has("--fail-io") {
        flags |= ublk::sys::opt::UBLK_F_USER_RECOVERY_FAIL_IO.context("this build's header has no UBLK_F_USER_RECOVERY_FAIL_IO")?;
    }
    let dev = DeviceBuilder::new()
        .queues(number(args, "--queues", Some(1))?)
        .depth(number(args, "--depth", Some(4))?)
        .size(number(args, "--size", Some(16 << 20))?)
        .flags(flags)
        .io_timeout(value(args, "--io-timeout-ms").map(|_| number(args, "--io-timeout-ms", None)).transpose()?.map(Duration::from_millis))
        .create()?;
    say(&format!("id {}", dev.id()));
    dev.serve(&Hold { writes_only: has("--writes") }, |dev, _stop| say(&dev.block_path().display().to_string()))?;
    Ok(())
}

fn recover(args: &[String]) -> Result<()> {
    let signals = ublk_cli::SignalStop::install();
    let id: u32 = number(args, "--id", None)?;
    let dev = DeviceBuilder::new().recover(id, Duration::from_secs(20))?;
    let stats = dev.serve(&NullTarget, |dev, stop| {
        say(&dev.block_path().display().to_string());
        signals.arm(stop);
    })?;
    ublk_cli::print_queue_stats(&stats);
    Ok(())
}

fn recover_die(args: &[String]) -> Result<()> {
    let id: u32 = number(args, "--id", None)?;
    let want: u16 = number(args, "--fetch", None)?;
    let mut ctrl = ublk::Control::open()?;
    let t0 = Instant::now();
    // The kernel quiesces the device once the old server is gone, and lets a
    // new one start only when the old one's /dev/ublkcN is released.
    loop {
        match ctrl.start_user_recovery(id) {
            Ok(()) => break,
            Err(ublk::Error::Kernel { errno: libc::EBUSY, .. }) if t0.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(e).context("START_USER_RECOVERY"),
        }
    }
    let info = ctrl.get_dev_info(id)?;
    if want == 0 || want >= info.queue_depth {
        bail!("--fetch {want}: give 1..{} (fewer than the queue's {} tags)", info.queue_depth, info.queue_depth);
    }
    let char_dev = std::fs::OpenOptions::new().read(true).write(true).open(format!("/dev/ublkc{id}"))?;
    let user_copy = ublk::sys::opt::UBLK_F_USER_COPY.is_some_and(|f| info.flags & f != 0);
    let buf_len = info.max_io_buf_bytes as usize;
    // Real buffers (kernels without USER_COPY insist on an address), never
    // used: no request reaches a queue before END_USER_RECOVERY.
    let mut bufs = vec![0u8; buf_len * usize::from(want)];
    let fetch_op = match ctrl.encoding() {
        ublk::Encoding::Legacy => ublk::sys::UBLK_IO_FETCH_REQ,
        ublk::Encoding::Ioctl => ublk::sys::UBLK_U_IO_FETCH_REQ,
    };
    let mut ring = IoUring::new(u32::from(info.queue_depth).next_power_of_two())?;
    for tag in 0..want {
        let addr = if user_copy { 0 } else { bufs[usize::from(tag) * buf_len..].as_mut_ptr() as u64 };
        let cmd = ublk::sys::ublksrv_io_cmd::new(0, tag, -1, addr);
        // SAFETY: ublksrv_io_cmd is 16 bytes of plain integers (ublk-sys checks
        // its layout against C).
        let bytes: [u8; 16] = unsafe { std::mem::transmute_copy(&cmd) };
        let sqe = opcode::UringCmd16::new(types::Fd(char_dev.as_raw_fd()), fetch_op).cmd(bytes).build().user_data(u64::from(tag));
        // SAFETY: the buffer each command names lives until the process dies.
        unsafe { ring.submission().push(&sqe) }.map_err(|_| anyhow::anyhow!("queue ring full"))?;
    }
    ring.submit()?;
    // A FETCH completes only with a request; anything here is a refusal.
    std::thread::sleep(Duration::from_millis(200));
    if let Some(cqe) = ring.completion().next() {
        bail!("FETCH_REQ of tag {} refused: {}", cqe.user_data(), std::io::Error::from_raw_os_error(-cqe.result()));
    }
    say(&format!("fetched {want} of {} tags of queue 0", info.queue_depth));
    // SAFETY: kill(2) on ourselves.
    unsafe { libc::kill(std::process::id() as i32, libc::SIGKILL) };
    loop {
        std::thread::park();
    }
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("hold") => hold(&args),
        Some("recover") => recover(&args),
        Some("recover-die") => recover_die(&args),
        _ => Err(anyhow::anyhow!("usage: ublk-testsrv hold|recover|recover-die ... (see the source)")),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ublk-testsrv: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

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

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use ublk::{
    sys, AsyncNullTarget, AsyncTarget, Control, DataPath, Device, DeviceBuilder, Discard, Encoding, LoopOptions, LoopTarget, Nbd,
    NbdOptions, NullTarget, RamDisk, StopHandle, Stripe, Target,
};
use ublk_cli::config::{ensure_run_dir, pid_alive, process_start_time, run_dir, verify_daemon, DeviceConfig, NbdConfig, StripeConfig};
use ublk_cli::{parse_size, SignalStop};

/// Environment of a detached daemon: the fd to report readiness on, and its log.
const ENV_READY_FD: &str = "UBLK_DAEMON_READY_FD";
const ENV_LOG: &str = "UBLK_DAEMON_LOG";

/// How long `ublk recover` waits for the kernel to notice the dead daemon
/// (6.1 checks every 5 s) and release its char device. A daemon that died
/// holding requests (an NBD target waiting on its server) can leave a 6.12
/// device LIVE for the block layer's 30 s request timeout, so more than that.
const RECOVER_WAIT: Duration = Duration::from_secs(90);

/// Userspace block devices on the kernel's ublk driver.
#[derive(Parser, Debug)]
#[command(name = "ublk", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a device and serve it (foreground unless --detach).
    Add(AddArgs),
    /// List the ublk devices.
    List {
        /// Print JSON (one array of objects).
        #[arg(long)]
        json: bool,
    },
    /// Stop and delete devices (signalling their daemon if it is alive).
    Del {
        /// Device id.
        #[arg(short = 'n', long = "id")]
        id: Option<u32>,
        /// Every ublk device.
        #[arg(long, conflicts_with = "id")]
        all: bool,
        /// Only if nobody has the disk open (mounted, or held by a
        /// process); a device in use is left as it is (Linux 7.0+).
        #[arg(long)]
        safe: bool,
    },
    /// Show, per UBLK_F_ flag, whether the kernel offers it and this build implements it.
    Features {
        /// Print JSON (one object).
        #[arg(long)]
        json: bool,
    },
    /// Give a live device a new size (Linux 6.16+).
    Resize {
        /// Device id.
        #[arg(short = 'n', long = "id")]
        id: u32,
        /// The new size (e.g. 2G, 512M): a multiple of the block size, and
        /// no more than the target holds (a loop device's file, a ramdisk's
        /// memory).
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Make a --recovery device's daemon let go of it without failing I/O
    /// (Linux 6.16+): I/O waits in the kernel until `ublk recover -n N`
    /// serves the device again (a daemon upgrade).
    Quiesce {
        /// Device id.
        #[arg(short = 'n', long = "id")]
        id: u32,
        /// Seconds to wait for the daemon to let go.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Take over a --recovery device whose daemon died, and serve it again.
    Recover {
        /// Device id.
        #[arg(short = 'n', long = "id")]
        id: u32,
        /// Serve it from a background daemon; print the id once it is live.
        #[arg(long)]
        detach: bool,
    },
    /// For the udev rule: print UBLK_OWNER_UID=, UBLK_OWNER_GID= and
    /// UBLK_DEV_ID= of an unprivileged device's owner (nothing for a
    /// privileged device), given the kernel's name of one of its nodes.
    UdevOwner {
        /// `ublkcN` or `ublkbN` (udev's %k).
        name: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Kind {
    /// Reads return zeros, writes are dropped.
    Null,
    /// Memory-backed.
    Ramdisk,
    /// Backed by a file or block device (--file).
    Loop,
    /// RAID-0 over 2 or more files or block devices (--file A --file B ..., --chunk).
    Stripe,
    /// An export of an NBD server (--host H [--port P] | --unix PATH).
    Nbd,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Ramdisk => "ramdisk",
            Kind::Loop => "loop",
            Kind::Stripe => "stripe",
            Kind::Nbd => "nbd",
        }
    }
}

#[derive(clap::Args, Debug)]
struct AddArgs {
    /// Target type.
    #[arg(short = 't', long = "type", value_enum)]
    target: Kind,
    /// Hardware queues (the kernel caps it at the CPU count).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Tags (outstanding requests) per queue, 1..=4096.
    #[arg(long, default_value_t = 128)]
    depth: u16,
    /// Device size (e.g. 1G, 512M). Default: null 1G, ramdisk 256M, loop the backing file's size, stripe legs x the smallest leg.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Logical block size: 512, 1024, 2048 or 4096.
    #[arg(long, default_value_t = 512)]
    block_size: u32,
    /// Backing file or block device of a loop device; for a stripe, once
    /// per leg, in order.
    #[arg(long)]
    file: Vec<PathBuf>,
    /// Stripe chunk size: a power of two from 4K to 1M. Default 64K.
    #[arg(long, value_parser = parse_size)]
    chunk: Option<u64>,
    /// Open the backing file(s) with O_DIRECT.
    #[arg(long)]
    direct: bool,
    /// Device id (N of /dev/ublkbN); the kernel picks one if omitted.
    #[arg(long)]
    id: Option<u32>,
    /// User recovery: if the daemon dies the device waits, queued I/O held,
    /// for `ublk recover -n N` (UBLK_F_USER_RECOVERY). For -t nbd: a lost
    /// connection is made again (with backoff) and the I/O in flight
    /// re-issued, I/O waiting meanwhile.
    #[arg(long)]
    recovery: bool,
    /// With recovery, re-issue the I/O in flight when the daemon died (implies --recovery).
    #[arg(long)]
    recovery_reissue: bool,
    /// With recovery, fail I/O while no daemon serves the device (Linux 6.13+; implies --recovery).
    #[arg(long, conflicts_with = "recovery_reissue")]
    recovery_fail_io: bool,
    /// No partition scan when the device starts (UBLK_F_NO_AUTO_PART_SCAN,
    /// Linux 7.0+); `blockdev --rereadpt` scans later.
    #[arg(long)]
    no_part_scan: bool,
    /// Serve from a background daemon; print the id once the device is live.
    #[arg(long)]
    detach: bool,
    /// Microseconds a queue thread keeps polling for the next request before it sleeps; 0 always sleeps.
    #[arg(long, default_value_t = ublk::DEFAULT_BUSY_POLL.as_micros() as u64)]
    busy_poll_us: u64,
    /// Where queue threads run.
    #[arg(long, value_enum, default_value_t)]
    placement: ublk_cli::PlacementArg,
    /// How request data reaches the daemon: copy (the kernel copies into
    /// per-tag buffers), user-copy (the daemon copies with pread/pwrite on
    /// /dev/ublkcN; Linux 6.5+), zero-copy (the target's reads and writes
    /// use the request's own pages, registered per request; 6.15+),
    /// auto-buf-reg (zero copy, the kernel registering them; 6.16+), none
    /// (no data; null only), or auto: the fastest the kernel offers for the
    /// target (the default: zero copy where the kernel has it for loop and
    /// stripe, copy for ramdisk and nbd, none for null).
    #[arg(long, value_parser = parse_data_path)]
    data_path: Option<DataPathArg>,
    /// NBD server host (name or address), for -t nbd.
    #[arg(long, conflicts_with = "unix")]
    host: Option<String>,
    /// NBD server TCP port, for -t nbd with --host.
    #[arg(long, default_value_t = 10809)]
    port: u16,
    /// NBD server unix socket, for -t nbd.
    #[arg(long)]
    unix: Option<PathBuf>,
    /// NBD export name (default: the server's default export).
    #[arg(long, default_value = "")]
    export: String,
    /// NBD connections, one per queue (default: --queues); more than one
    /// needs a server that allows it (NBD_FLAG_CAN_MULTI_CONN).
    #[arg(long)]
    connections: Option<u16>,
    /// NBD: do not ask for structured replies (NBD_OPT_STRUCTURED_REPLY),
    /// which are used by default where the server offers them.
    #[arg(long)]
    simple_replies: bool,
    /// Serve a null device with the async target (futures on the queue
    /// thread) instead of the sync one; loop is always async.
    #[arg(long = "async")]
    async_: bool,
    /// Batched commands (UBLK_F_BATCH_IO, Linux 7.0+): one multishot fetch
    /// delivers many requests per completion and one command commits many
    /// answers.
    #[arg(long)]
    batch: bool,
    /// An unprivileged device (Linux 6.3+), which an ordinary user may
    /// create and which only its owner (and root) may control; needs the
    /// udev rules of docs/unprivileged.md. Kernels up to 7.3 give such
    /// devices no --recovery (refused with the kernel's answer).
    #[arg(long)]
    unprivileged: bool,
}

/// `--data-path`: a data path, or the best for the target.
#[derive(Debug, Clone, Copy, PartialEq)]
enum DataPathArg {
    Auto,
    Is(DataPath),
}

fn parse_data_path(s: &str) -> std::result::Result<DataPathArg, String> {
    if s == "auto" {
        return Ok(DataPathArg::Auto);
    }
    s.parse().map(DataPathArg::Is).map_err(|e: String| e.replace("or none", "none or auto"))
}

/// A target the CLI serves: sync or async.
trait CliTarget {
    fn run(&self, dev: Device, on_live: impl FnOnce(&Device, StopHandle) + Send) -> ublk::Result<Vec<ublk::QueueStats>>;
}

struct SyncT<'a, T>(&'a T);
struct AsyncT<'a, T>(&'a T);

impl<T: Target> CliTarget for SyncT<'_, T> {
    fn run(&self, dev: Device, on_live: impl FnOnce(&Device, StopHandle) + Send) -> ublk::Result<Vec<ublk::QueueStats>> {
        dev.serve(self.0, on_live)
    }
}

impl<T: AsyncTarget> CliTarget for AsyncT<'_, T> {
    fn run(&self, dev: Device, on_live: impl FnOnce(&Device, StopHandle) + Send) -> ublk::Result<Vec<ublk::QueueStats>> {
        dev.serve_async(self.0, on_live)
    }
}

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

/// The readiness pipe of a detached daemon (absent in the foreground).
struct Ready {
    pipe: Option<File>,
    log: Option<PathBuf>,
}

impl Ready {
    fn from_env() -> Ready {
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

    fn live(&mut self, id: u32) {
        if let (Some(log), Ok(dir)) = (self.log.take(), run_dir()) {
            let _ = std::fs::rename(&log, dir.join(format!("{id}.log")));
        }
        if let Some(mut p) = self.pipe.take() {
            let _ = writeln!(p, "live {id}");
        }
    }

    fn fail(&mut self, msg: &str) {
        if let Some(mut p) = self.pipe.take() {
            let _ = writeln!(p, "error {msg}");
        }
    }
}

/// Re-executes this command in a new session, without --detach, stdio to a
/// log under the run directory; prints the device id once the daemon says
/// the device is live (or its error).
fn detach() -> Result<()> {
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

fn discard_for(block_size: u32) -> Option<Discard> {
    Some(Discard {
        alignment: 0,
        granularity: block_size,
        // 512 MiB per request: large, and its byte count still fits the i32 result.
        max_discard_sectors: 1 << 20,
        max_write_zeroes_sectors: 1 << 20,
        max_discard_segments: 1,
    })
}

fn recovery_flags(a: &AddArgs) -> Result<u64> {
    let mut flags = 0;
    if a.recovery || a.recovery_reissue || a.recovery_fail_io {
        flags |= sys::UBLK_F_USER_RECOVERY;
    }
    if a.recovery_reissue {
        flags |= sys::UBLK_F_USER_RECOVERY_REISSUE;
    }
    if a.recovery_fail_io {
        flags |= sys::abi::UBLK_F_USER_RECOVERY_FAIL_IO;
        // Kernels before 6.5 cannot say what they support (no GET_FEATURES),
        // and may keep a flag they do not know: FAIL_IO (6.13) needs a newer one.
        let feats = Control::open()?.features();
        if !feats.is_some_and(|f| f.contains(sys::abi::UBLK_F_USER_RECOVERY_FAIL_IO)) {
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
            bail!(
                "--recovery-fail-io needs Linux 6.13 or later (UBLK_F_USER_RECOVERY_FAIL_IO), which this kernel ({}) does not offer; use --recovery-reissue or --recovery",
                release.trim()
            );
        }
    }
    Ok(flags)
}

/// What `ublk add` asks for besides the recovery flags `recovery`:
/// `UBLK_F_NO_AUTO_PART_SCAN` for --no-part-scan (refused by the library,
/// naming the kernel that has it, where this one does not); and, where the
/// kernel offers them, `UBLK_F_QUIESCE` for a recovery device (so `ublk
/// quiesce` works on it; the kernel allows it only with user recovery) and
/// `UBLK_F_UPDATE_SIZE` (`ublk resize`: the kernel does not check the
/// device's flag, but it marks the device as resizable in `ublk list`).
fn extra_flags(a: &AddArgs, recovery: u64) -> u64 {
    // A control node this caller may not open asks for nothing extra: the
    // target's own checks come first, and creating the device says why.
    let feats = Control::open().ok().and_then(|c| c.features());
    let offers = |f: u64| feats.is_some_and(|x| x.contains(f));
    let mut flags = 0;
    if a.no_part_scan {
        flags |= sys::abi::UBLK_F_NO_AUTO_PART_SCAN;
    }
    if recovery & sys::UBLK_F_USER_RECOVERY != 0 && !a.unprivileged && offers(sys::abi::UBLK_F_QUIESCE) {
        flags |= sys::abi::UBLK_F_QUIESCE;
    }
    if offers(sys::abi::UBLK_F_UPDATE_SIZE) {
        flags |= sys::abi::UBLK_F_UPDATE_SIZE;
    }
    flags
}

fn cmd_add(a: AddArgs, ready: &mut Ready) -> Result<()> {
    let signals = SignalStop::install();
    // With --unprivileged, whether the kernel keeps --recovery is its
    // answer to ADD_DEV (up to 7.3 it drops it: the library says so).
    // For -t nbd, --recovery is about the connection (reconnect and
    // re-issue what was in flight) and about the daemon: the device waits
    // for `ublk recover` if it dies, which re-issues what was in flight
    // (UBLK_F_USER_RECOVERY_REISSUE: NBD requests may be sent again).
    let recovery = match a.target {
        Kind::Nbd if a.recovery => sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE,
        Kind::Nbd => 0,
        _ => recovery_flags(&a)?,
    };
    if !matches!(a.target, Kind::Loop | Kind::Stripe) && (!a.file.is_empty() || a.direct) {
        bail!("--file and --direct are for -t loop and -t stripe only; drop them or use -t loop");
    }
    if a.target != Kind::Stripe && a.chunk.is_some() {
        bail!("--chunk is for -t stripe only; drop it or use -t stripe");
    }
    if a.target != Kind::Nbd
        && (a.host.is_some() || a.unix.is_some() || a.connections.is_some() || !a.export.is_empty() || a.simple_replies)
    {
        bail!("--host, --unix, --export, --connections and --simple-replies are for -t nbd only; drop them or use -t nbd");
    }
    if a.target == Kind::Nbd && a.data_path == Some(DataPathArg::Is(DataPath::UserCopy)) {
        bail!("--data-path user-copy is not for -t nbd: the NBD target sends and receives data in the queue's buffers; use copy (the default)");
    }
    if a.target == Kind::Nbd && (a.recovery_reissue || a.recovery_fail_io) {
        bail!("--recovery-reissue and --recovery-fail-io are not for -t nbd; --recovery reconnects to the server and re-issues what was in flight, and lets `ublk recover` take the device over if the daemon dies");
    }
    if a.target == Kind::Ramdisk && recovery != 0 {
        bail!("--recovery with -t ramdisk: a ramdisk's data dies with its daemon, so a recovered device would serve zeros; use -t loop --file FILE for a recoverable device");
    }
    let extra = extra_flags(&a, recovery);
    let flags = recovery | extra;
    let builder = |size: u64, discard: Option<Discard>| {
        let b = if a.unprivileged { DeviceBuilder::new().unprivileged() } else { DeviceBuilder::new() };
        b.queues(a.queues)
            .depth(a.depth)
            .size(size)
            .block_size(a.block_size)
            .id(a.id)
            .flags(flags)
            .discard(discard)
            .busy_poll(std::time::Duration::from_micros(a.busy_poll_us))
            .placement(a.placement.into())
            .batch_io(a.batch)
    };
    let cfg = |size: u64, file: Option<PathBuf>| DeviceConfig {
        id: 0,
        target: a.target.name().into(),
        file,
        size,
        block_size: a.block_size,
        queues: a.queues,
        depth: a.depth,
        flags,
        flag_names: vec![],
        direct: a.direct,
        pid: std::process::id(),
        pid_start: None,
        placement: a.placement,
        busy_poll_us: a.busy_poll_us,
        data_path: None,
        async_target: a.async_,
        stripe: None,
        nbd: None,
        capacity: None,
    };
    if a.async_ && a.target != Kind::Null {
        bail!("--async is for -t null (the sync null target is the default there); {} is always served async", a.target.name());
    }
    if a.data_path == Some(DataPathArg::Is(DataPath::NoData)) && a.target != Kind::Null {
        bail!("--data-path none is for -t null: a {} device reads and writes data; use copy or user-copy", a.target.name());
    }
    // Targets whose data moves only with Io::read_at/write_at (see
    // AsyncTarget::zero_copy) can leave it in the kernel.
    let zero_copy_target = matches!(a.target, Kind::Loop | Kind::Stripe);
    let data_path = match a.data_path.unwrap_or(DataPathArg::Auto) {
        DataPathArg::Is(d) if d.is_zero_copy() && !zero_copy_target && a.target != Kind::Null => bail!(
            "--data-path {} is for -t loop and -t stripe (and null): a {} target reads and writes request data in its own memory; use copy or user-copy",
            d.name(),
            a.target.name()
        ),
        DataPathArg::Is(d) => d,
        // Unprivileged devices get neither user copy nor zero copy from the
        // kernel; a kernel (or a caller) that cannot say what it offers
        // gets the path every kernel has.
        DataPathArg::Auto if a.unprivileged => DataPath::best(None, a.target != Kind::Null, false),
        DataPathArg::Auto => {
            let features = Control::open().ok().and_then(|c| c.features());
            DataPath::best(features, a.target != Kind::Null, zero_copy_target)
        }
    };
    // The target first: a bad backing file or size must not create a device.
    match a.target {
        Kind::Null => {
            let size = a.size.unwrap_or(1 << 30);
            // A null target never touches data: by default USER_COPY where
            // the kernel has it, and no buffers.
            state_dir()?;
            let dev = builder(size, None).data_path(data_path).create()?;
            if a.async_ {
                serve(dev, &AsyncT(&AsyncNullTarget), cfg(size, None), &signals, ready)
            } else {
                serve(dev, &SyncT(&NullTarget), cfg(size, None), &signals, ready)
            }
        }
        Kind::Ramdisk => {
            let size = a.size.unwrap_or(256 << 20);
            ublk::Params::new(size, a.block_size, 512 << 10)?;
            let rd = RamDisk::new(size)?;
            state_dir()?;
            let dev = builder(size, discard_for(a.block_size)).data_path(data_path).create()?;
            let cfg = DeviceConfig { capacity: Some(size), ..cfg(size, None) };
            serve(dev, &SyncT(&rd), cfg, &signals, ready)
        }
        Kind::Loop => {
            let file = match a.file.as_slice() {
                [f] => f.clone(),
                [] => bail!("-t loop needs --file FILE, the backing file (create one with `truncate -s 1G FILE`)"),
                _ => bail!("-t loop takes one --file; for several, use -t stripe"),
            };
            let (target, file) = open_loop(&file, a.direct)?;
            let bs = u64::from(a.block_size);
            let size = match a.size {
                Some(s) if s > target.size() => bail!(
                    "--size {s} is larger than the backing file {} ({} bytes); grow the file (truncate -s) or omit --size",
                    file.display(),
                    target.size()
                ),
                Some(s) => s,
                None => target.size() / bs * bs,
            };
            if size == 0 {
                bail!("backing file {} is smaller than one {bs}-byte block; grow it (e.g. truncate -s 1G FILE)", file.display());
            }
            state_dir()?;
            let dev = builder(size, discard_for(a.block_size)).data_path(data_path).create()?;
            serve(dev, &AsyncT(&target), cfg(size, Some(file)), &signals, ready)
        }
        Kind::Stripe => {
            if a.file.len() < 2 {
                bail!("-t stripe needs at least two legs: --file A --file B (files or block devices)");
            }
            let chunk = a.chunk.unwrap_or(u64::from(ublk::targets::stripe::DEFAULT_CHUNK));
            let chunk = u32::try_from(chunk).map_err(|_| anyhow!("--chunk {chunk} is too large: at most 1M"))?;
            let (target, legs) = open_stripe(&a.file, chunk, a.direct)?;
            let size = match a.size {
                Some(s) if s > target.size() => bail!(
                    "--size {s} is larger than the stripe ({} bytes: {} legs x the smallest leg, in whole {chunk}-byte chunks); grow the legs or omit --size",
                    target.size(),
                    legs.len()
                ),
                Some(s) => s,
                None => target.size(),
            };
            state_dir()?;
            let dev = builder(size, discard_for(a.block_size)).data_path(data_path).create()?;
            let cfg = DeviceConfig { stripe: Some(StripeConfig { legs, chunk }), ..cfg(size, None) };
            serve(dev, &AsyncT(&target), cfg, &signals, ready)
        }
        Kind::Nbd => {
            if a.size.is_some() {
                bail!("--size is not for -t nbd: the device has the export's size");
            }
            let connections = match a.connections {
                Some(c) if a.queues != 1 && a.queues != c => {
                    bail!("--connections {c} and --queues {}: each queue has its own connection; give one of them", a.queues)
                }
                Some(c) => c,
                None => a.queues,
            };
            let n = NbdConfig {
                host: a.host.clone(),
                port: a.port,
                unix: a.unix.clone(),
                export: a.export.clone(),
                connections,
                reconnect: a.recovery,
                simple_replies: a.simple_replies,
            };
            // Connects and negotiates before any device exists: a server
            // that is unreachable or refuses leaves nothing behind.
            let nbd = Nbd::connect(&nbd_options(&n)?)?;
            let size = nbd.size();
            let dev = nbd
                .builder(a.block_size)?
                .flags(extra)
                .depth(a.depth)
                .id(a.id)
                .flags(flags)
                .busy_poll(std::time::Duration::from_micros(a.busy_poll_us))
                .placement(a.placement.into())
                .data_path(data_path)
                .batch_io(a.batch)
                .create()?;
            let c = DeviceConfig { queues: connections, nbd: Some(n), ..cfg(size, None) };
            serve_nbd(dev, &nbd, c, &signals, ready)
        }
    }
}

/// The library's options for a saved NBD configuration.
fn nbd_options(n: &NbdConfig) -> Result<NbdOptions> {
    let opts = match (&n.host, &n.unix) {
        (Some(h), None) => NbdOptions::tcp(h, n.port),
        (None, Some(p)) => NbdOptions::unix(p),
        _ => bail!("-t nbd needs the server: --host H [--port P], or --unix PATH"),
    };
    Ok(opts.export(&n.export).connections(n.connections).reconnect(n.reconnect).structured_replies(!n.simple_replies))
}

/// [`serve`] for an NBD device: says what the server offered, and at the
/// end what the connections did (on stdout, after the queue counts).
fn serve_nbd(dev: Device, nbd: &Nbd, cfg: DeviceConfig, signals: &SignalStop, ready: &mut Ready) -> Result<()> {
    let i = nbd.info();
    let server = cfg.nbd.as_ref().map(|n| n.server().display().to_string()).unwrap_or_default();
    eprintln!(
        "ublk: NBD export {:?} at {server}: {} bytes, transmission flags {:#x}, {}, {} replies",
        cfg.nbd.as_ref().map(|n| n.export.as_str()).unwrap_or(""),
        i.size,
        i.flags,
        if i.go { "NBD_OPT_GO" } else { "NBD_OPT_EXPORT_NAME" },
        if i.structured { "structured" } else { "simple" }
    );
    let r = serve(dev, &AsyncT(nbd), cfg, signals, ready);
    if let Some(why) = nbd.failure() {
        eprintln!("ublk: the NBD connection failed: {why}");
    }
    if nbd.reconnects() > 0 {
        eprintln!("ublk: NBD connections made again after a loss: {}", nbd.reconnects());
    }
    let s = nbd.stats();
    println!(
        "nbd: replies={} simple_replies={} chunks={} data_chunks={} hole_chunks={} error_chunks={} recvs={} direct_payloads={} sends={} reconnects={}",
        if i.structured { "structured" } else { "simple" },
        s.simple_replies,
        s.chunks,
        s.data_chunks,
        s.hole_chunks,
        s.error_chunks,
        s.recvs,
        s.direct_payloads,
        s.sends,
        nbd.reconnects()
    );
    let _ = std::io::stdout().flush();
    r
}

/// Opens a stripe target; returns it with the absolute paths of its legs.
fn open_stripe(files: &[PathBuf], chunk: u32, direct: bool) -> Result<(Stripe, Vec<PathBuf>)> {
    let target = Stripe::open(files, chunk, &LoopOptions { direct, read_only: false })?;
    let abs = files.iter().map(|f| std::fs::canonicalize(f).unwrap_or_else(|_| f.clone())).collect();
    Ok((target, abs))
}

/// Where the device's state will go, checked after the target (a bad
/// backing file or size is named first) and before there is a device.
fn state_dir() -> Result<()> {
    ensure_run_dir().map(drop).map_err(|e| anyhow!(e))
}

/// Opens a loop target; returns it with the absolute path of its file.
fn open_loop(file: &Path, direct: bool) -> Result<(LoopTarget, PathBuf)> {
    let target = LoopTarget::open(file, &LoopOptions { direct, read_only: false })?;
    let abs = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    Ok((target, abs))
}

fn device_exists(id: u32) -> bool {
    Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists()
}

/// Serves `dev` until SIGINT/SIGTERM: saves the configuration and prints the
/// block device once live, the per-queue counts at the end.
fn serve<T: CliTarget>(dev: Device, target: &T, mut cfg: DeviceConfig, signals: &SignalStop, ready: &mut Ready) -> Result<()> {
    let info = *dev.info();
    let id = dev.id();
    if cfg.queues != info.nr_hw_queues {
        eprintln!("ublk: note: the kernel made {} queues (one per CPU at most), {} asked", info.nr_hw_queues, cfg.queues);
    }
    cfg.id = id;
    cfg.queues = info.nr_hw_queues;
    cfg.depth = info.queue_depth;
    cfg.flags = info.flags;
    cfg.flag_names = ublk::Features(info.flags).names();
    cfg.pid = std::process::id();
    cfg.pid_start = process_start_time(cfg.pid);
    if cfg.pid_start.is_none() {
        eprintln!(
            "ublk: warning: cannot read this daemon's start time from /proc/{}/stat (is /proc mounted?); `ublk del` will not signal it",
            cfg.pid
        );
    }
    let data_path = dev.data_path();
    cfg.data_path = Some(data_path.name().to_string());
    let res = target.run(dev, |dev, stop| {
        if let Err(e) = cfg.save() {
            eprintln!("ublk: warning: could not save the device configuration ({e}); `ublk list` and `ublk recover` will not know it");
        }
        println!("{}", dev.block_path().display());
        let _ = std::io::stdout().flush();
        eprintln!(
            "ublk: device {id} live: {}{} target{}, {} queues x {} tags, {} bytes, {}-byte blocks, data path {}, flags [{}], opcodes {:?}, placement {:?}, busy poll {} us, pid {}",
            if cfg.async_target { "async " } else { "" },
            cfg.target,
            cfg.file.as_ref().map(|f| format!(" on {}", f.display())).unwrap_or_default(),
            info.nr_hw_queues,
            info.queue_depth,
            cfg.size,
            cfg.block_size,
            data_path.name(),
            cfg.flag_names.join(","),
            dev.encoding(),
            cfg.placement,
            cfg.busy_poll_us,
            cfg.pid
        );
        ready.live(id);
        signals.arm(stop);
    });
    // The configuration goes with the device (a failed recovery leaves it).
    if !device_exists(id) {
        DeviceConfig::remove(id);
    }
    let stats = res?;
    ublk_cli::print_queue_stats(&stats);
    let _ = std::io::stdout().flush();
    if device_exists(id) {
        // `serve` leaves a device only when it was quiesced for another daemon.
        eprintln!("ublk: device {id} quiesced: this daemon let go of it; I/O waits in the kernel for `ublk recover -n {id}`");
    } else {
        eprintln!("ublk: device {id} stopped and deleted");
    }
    Ok(())
}

fn no_device(id: u32) -> anyhow::Error {
    anyhow!("no ublk device {id}; `ublk list` shows the existing ones")
}

fn dev_info(ctrl: &mut Control, id: u32) -> Result<ublk::DevInfo> {
    ctrl.get_dev_info(id).map_err(|e| match e {
        ublk::Error::NoDevice { .. } => no_device(id),
        e => e.into(),
    })
}

fn cmd_recover(id: u32, ready: &mut Ready) -> Result<()> {
    let signals = SignalStop::install();
    let mut ctrl = Control::open()?;
    let info = dev_info(&mut ctrl, id)?;
    if info.flags & sys::UBLK_F_USER_RECOVERY == 0 && info.flags & sys::abi::UBLK_F_UNPRIVILEGED_DEV != 0 {
        bail!(
            "device {id} is an unprivileged device, and the kernel gives those no user recovery (it drops UBLK_F_USER_RECOVERY at ADD_DEV), so no daemon can take it over; delete it with `ublk del -n {id}` and create it again"
        );
    }
    if info.flags & sys::UBLK_F_USER_RECOVERY == 0 {
        bail!(
            "device {id} was created without --recovery (UBLK_F_USER_RECOVERY), so no daemon can take it over; delete it with `ublk del -n {id}` and create it again with --recovery"
        );
    }
    let cfg = DeviceConfig::load(id).map_err(|e| anyhow!(e))?;
    let pid = info.ublksrv_pid;
    // A process that merely reuses the dead daemon's pid does not count (the
    // library still refuses a device the kernel has not quiesced).
    if pid > 0 && pid as u32 != std::process::id() && daemon_alive(pid as u32, id, cfg.as_ref()) {
        bail!(
            "device {id} is {} and still served by its daemon (pid {pid}); recovery only takes over a device whose daemon died (`ublk del -n {id}` stops and deletes it)",
            ublk::ctrl::state_name(info.state)
        );
    }
    let cfg = cfg.ok_or_else(|| {
        anyhow!(
            "no saved configuration for device {id} ({}): `ublk recover` takes over only devices made by `ublk add`",
            DeviceConfig::path(id).map(|p| p.display().to_string()).unwrap_or_else(|e| e)
        )
    })?;
    drop(ctrl);
    // What only the daemon knew, as `ublk add` saved it: the recovered
    // device keeps its placement and busy polling. The geometry, flags and
    // discard limits come from the kernel.
    let data_path = match &cfg.data_path {
        Some(d) => d.parse::<DataPath>().map_err(|e| anyhow!("the saved configuration of device {id}: {e}"))?,
        None if cfg.target == "null" => DataPath::NoData,
        None => DataPath::Copy,
    };
    let builder =
        DeviceBuilder::new().placement(cfg.placement.into()).busy_poll(Duration::from_micros(cfg.busy_poll_us)).data_path(data_path);
    match cfg.target.as_str() {
        "null" => {
            let dev = builder.recover(id, RECOVER_WAIT)?;
            if cfg.async_target {
                serve(dev, &AsyncT(&AsyncNullTarget), cfg, &signals, ready)
            } else {
                serve(dev, &SyncT(&NullTarget), cfg, &signals, ready)
            }
        }
        "loop" => {
            let file = cfg.file.clone().ok_or_else(|| anyhow!("the saved configuration of device {id} has no backing file"))?;
            let (target, _) = open_loop(&file, cfg.direct)?;
            if target.size() < cfg.size {
                bail!(
                    "backing file {} shrank to {} bytes, below the device's {} bytes; restore the file before recovering",
                    file.display(),
                    target.size(),
                    cfg.size
                );
            }
            let dev = builder.recover(id, RECOVER_WAIT)?;
            serve(dev, &AsyncT(&target), cfg, &signals, ready)
        }
        "stripe" => {
            let s = cfg.stripe.clone().ok_or_else(|| anyhow!("the saved configuration of device {id} has no stripe legs"))?;
            let (target, _) = open_stripe(&s.legs, s.chunk, cfg.direct)?;
            if target.size() < cfg.size {
                bail!(
                    "the stripe's legs shrank to {} bytes in all, below the device's {} bytes; restore them before recovering",
                    target.size(),
                    cfg.size
                );
            }
            let dev = builder.recover(id, RECOVER_WAIT)?;
            serve(dev, &AsyncT(&target), cfg, &signals, ready)
        }
        "nbd" => {
            let n = cfg.nbd.clone().ok_or_else(|| anyhow!("the saved configuration of device {id} has no NBD server"))?;
            // The server first: if it is gone, the device stays as it is.
            let nbd = Nbd::connect(&nbd_options(&n)?)?;
            if nbd.size() != cfg.size {
                bail!(
                    "the NBD export at {} is now {} bytes, not the device's {}; restore the export before recovering",
                    n.server().display(),
                    nbd.size(),
                    cfg.size
                );
            }
            let dev = builder.recover(id, RECOVER_WAIT)?;
            if usize::from(dev.info().nr_hw_queues) > usize::from(n.connections) {
                bail!("device {id} has {} queues, the saved configuration {} NBD connections", dev.info().nr_hw_queues, n.connections);
            }
            serve_nbd(dev, &nbd, cfg, &signals, ready)
        }
        other => bail!(
            "device {id} is a {other} device, whose data died with its daemon: it cannot be recovered; delete it with `ublk del -n {id}`"
        ),
    }
}

fn cmd_list(json: bool) -> Result<()> {
    let mut rows = vec![];
    let ids = ublk::ctrl::device_ids();
    if !ids.is_empty() {
        let mut ctrl = Control::open()?;
        for id in ids {
            let info = match ctrl.get_dev_info(id) {
                Ok(info) => info,
                // Someone else's device: listed with what the caller may know.
                Err(ublk::Error::NotOwner { owner, unprivileged, .. }) => {
                    rows.push(serde_json::json!({
                        "id": id,
                        "access": false,
                        "unprivileged": unprivileged,
                        "owner_uid": owner.map(|o| o.uid),
                        "owner_gid": owner.map(|o| o.gid),
                    }));
                    continue;
                }
                Err(_) => continue,
            };
            let size = ctrl.get_params(id).map(|p| p.basic.dev_sectors << 9).ok();
            let cfg = DeviceConfig::load(id).ok().flatten();
            let pid = info.ublksrv_pid;
            let owner = info.owner();
            rows.push(serde_json::json!({
                "id": id,
                "access": true,
                "state": ublk::ctrl::state_name(info.state),
                "queues": info.nr_hw_queues,
                "depth": info.queue_depth,
                "size": size.or(cfg.as_ref().map(|c| c.size)),
                "flags": ublk::Features(info.flags).names(),
                "unprivileged": info.flags & sys::abi::UBLK_F_UNPRIVILEGED_DEV != 0,
                "owner_uid": owner.map(|o| o.0),
                "owner_gid": owner.map(|o| o.1),
                "pid": pid,
                "daemon_alive": pid > 0 && daemon_alive(pid as u32, id, cfg.as_ref()),
                "target": cfg.as_ref().map(|c| c.target.clone()),
                "data_path": data_path_of(info.flags, cfg.as_ref()),
                "file": cfg.as_ref().and_then(|c| c.file.clone().or(c.stripe.as_ref().map(StripeConfig::files)).or(c.nbd.as_ref().map(NbdConfig::server))),
            }));
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<4} {:<9} {:>6} {:>5} {:>12} {:>8} {:<11} {:<8} {:<12} {:<40} FILE",
        "ID", "STATE", "QUEUES", "DEPTH", "SIZE", "PID", "OWNER", "TARGET", "DATA", "FLAGS"
    );
    for r in rows {
        let s = |k: &str| match &r[k] {
            serde_json::Value::Null => "-".to_string(),
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        let owner = match (r["owner_uid"].as_u64(), r["owner_gid"].as_u64()) {
            (Some(u), Some(g)) => format!("{u}:{g}"),
            _ => "-".to_string(),
        };
        if r["access"] == false {
            let what = match r["unprivileged"].as_bool() {
                Some(true) => "unprivileged device of another user",
                _ => "privileged device (root only)",
            };
            println!(
                "{:<4} {:<9} {:>6} {:>5} {:>12} {:>8} {:<11} {:<8} {:<12} {what}",
                s("id"),
                "no-access",
                "-",
                "-",
                "-",
                "-",
                owner,
                "-",
                "-"
            );
            continue;
        }
        let flags: Vec<String> = r["flags"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).map(|n| n.trim_start_matches("UBLK_F_").to_string()).collect())
            .unwrap_or_default();
        let pid = match (r["daemon_alive"].as_bool(), r["pid"].as_i64()) {
            (Some(true), _) => s("pid"),
            // The kernel resets the pid to -1 once it has stopped the device.
            (_, Some(p)) if p <= 0 => "dead".to_string(),
            _ => format!("{}(dead)", s("pid")),
        };
        println!(
            "{:<4} {:<9} {:>6} {:>5} {:>12} {:>8} {:<11} {:<8} {:<12} {:<40} {}",
            s("id"),
            s("state"),
            s("queues"),
            s("depth"),
            s("size"),
            pid,
            owner,
            s("target"),
            s("data_path"),
            if flags.is_empty() { "-".to_string() } else { flags.join(",") },
            s("file")
        );
    }
    Ok(())
}

/// `ublk udev-owner ublkcN|ublkbN`: what the udev rule needs to give an
/// unprivileged device's nodes to its owner, as udev's IMPORT{program}
/// reads it (KEY=value lines). A privileged device prints nothing: its
/// nodes stay as the kernel and the other rules make them.
fn cmd_udev_owner(name: &str) -> Result<()> {
    let id: u32 = name
        .strip_prefix("ublkc")
        .or_else(|| name.strip_prefix("ublkb"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("{name:?} is not the name of a ublk node (ublkcN or ublkbN; udev passes %k)"))?;
    let mut ctrl = Control::open()?;
    let info = ctrl.get_dev_info(id).map_err(|e| match e {
        ublk::Error::NoDevice { .. } => no_device(id),
        e => e.into(),
    })?;
    if info.flags & sys::abi::UBLK_F_UNPRIVILEGED_DEV == 0 {
        return Ok(());
    }
    let (uid, gid) = info.owner().ok_or_else(|| anyhow!("device {id}: no owner in its device info"))?;
    println!("UBLK_OWNER_UID={uid}");
    println!("UBLK_OWNER_GID={gid}");
    println!("UBLK_DEV_ID={id}");
    Ok(())
}

fn cmd_del(id: Option<u32>, all: bool, safe: bool) -> Result<()> {
    let ids = match (id, all) {
        (Some(id), false) => vec![id],
        (None, true) => ublk::ctrl::device_ids(),
        _ => bail!("say which device to delete: -n N, or --all"),
    };
    if ids.is_empty() {
        return Ok(());
    }
    let mut ctrl = Control::open()?;
    let mut in_use = vec![];
    for id in ids {
        let info = match dev_info(&mut ctrl, id) {
            Ok(info) => info,
            // --all deletes what the caller may delete and names the rest.
            Err(e) if all && matches!(e.downcast_ref::<ublk::Error>(), Some(ublk::Error::NotOwner { .. })) => {
                eprintln!("ublk: note: skipping device {id}: {e}");
                continue;
            }
            Err(e) => return Err(e),
        };
        if safe {
            match safe_stop(&mut ctrl, id, &info) {
                Ok(()) => {}
                Err(SafeStop::InUse(msg)) if all => {
                    eprintln!("ublk: note: leaving device {id}: {msg}");
                    in_use.push(id.to_string());
                    continue;
                }
                Err(SafeStop::InUse(msg)) => bail!("{msg}"),
                Err(SafeStop::Other(e)) => return Err(e),
            }
        }
        del_one(&mut ctrl, id, &info)?;
        println!("deleted device {id}");
    }
    if !in_use.is_empty() {
        bail!("device(s) {} in use and left as they were (see the notes above); the others were deleted", in_use.join(", "));
    }
    Ok(())
}

/// Why `ublk del --safe` did not stop a device.
enum SafeStop {
    /// Its disk is open: nothing was changed.
    InUse(String),
    Other(anyhow::Error),
}

/// `ublk del --safe`: TRY_STOP_DEV, which stops the device only if nobody
/// has its disk open, atomically (and refuses opens after it). A device
/// with no disk (DEAD: stopped, or never started) has nothing anyone could
/// have open, and is deleted as usual.
fn safe_stop(ctrl: &mut Control, id: u32, info: &ublk::DevInfo) -> std::result::Result<(), SafeStop> {
    if u32::from(info.state) == sys::UBLK_S_DEV_DEAD {
        return Ok(());
    }
    match ctrl.safe_stop_dev(id) {
        Ok(()) => Ok(()),
        Err(ublk::Error::Unsupported { .. }) => Err(SafeStop::Other(anyhow!(
            "`ublk del --safe` needs Linux 7.0 or later (UBLK_F_SAFE_STOP_DEV: TRY_STOP_DEV, a stop refused while the disk is open), which this kernel ({}) does not offer; nothing was changed. `ublk del -n {id}` without --safe stops the device even while its disk is open",
            ublk::ctrl::kernel_release()
        ))),
        Err(ublk::Error::Kernel { errno: libc::EBUSY, .. }) => {
            let disk = format!("/dev/ublkb{id}");
            let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mounts")
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let mut f = l.split_whitespace();
                    let (dev, at) = (f.next()?, f.next()?);
                    (dev == disk || dev.strip_prefix(&disk).is_some_and(|p| p.starts_with('p'))).then(|| at.to_string())
                })
                .collect();
            let mounted = if mounts.is_empty() { String::new() } else { format!(", mounted on {}", mounts.join(", ")) };
            Err(SafeStop::InUse(format!(
                "device {id} is in use: its disk {disk} is open{mounted} (the kernel refused TRY_STOP_DEV with EBUSY), so it was not stopped and nothing was changed; close it (umount, end the process holding it) and run `ublk del -n {id} --safe` again, or `ublk del -n {id}` to stop it anyway"
            )))
        }
        Err(e) => Err(SafeStop::Other(anyhow::Error::from(e).context(format!("stopping device {id} (TRY_STOP_DEV)")))),
    }
}

/// `ublk resize -n N --size S`: UPDATE_SIZE, after checking that the
/// daemon's target holds `size` bytes (from the saved configuration).
fn cmd_resize(id: u32, size: u64) -> Result<()> {
    let mut ctrl = Control::open()?;
    dev_info(&mut ctrl, id)?;
    let cfg = DeviceConfig::load(id).map_err(|e| anyhow!(e))?;
    match &cfg {
        Some(c) => target_holds(c, size)?,
        None => eprintln!("ublk: note: no saved configuration for device {id} (not made by `ublk add`): whether its target holds {size} bytes is not checked"),
    }
    ctrl.resize_dev(id, size).map_err(|e| match e {
        ublk::Error::Unsupported { .. } => anyhow!(
            "`ublk resize` needs Linux 6.16 or later (UBLK_F_UPDATE_SIZE: UPDATE_SIZE), which this kernel ({}) does not offer; device {id} keeps its size",
            ublk::ctrl::kernel_release()
        ),
        e => e.into(),
    })?;
    let now = ctrl.get_params(id)?.basic.dev_sectors << 9;
    if now != size {
        bail!("device {id} reports {now} bytes after UPDATE_SIZE to {size}");
    }
    if let Some(mut c) = cfg {
        c.size = size;
        if let Err(e) = c.save() {
            eprintln!("ublk: warning: device {id} was resized but its saved configuration was not updated ({e})");
        }
    }
    println!("resized device {id} to {size} bytes");
    Ok(())
}

/// Refuses a size the target of a device made by `ublk add` cannot serve:
/// past a loop device's file or a stripe's legs (grow them first), past a
/// ramdisk's memory, past an NBD export.
fn target_holds(c: &DeviceConfig, size: u64) -> Result<()> {
    let id = c.id;
    match c.target.as_str() {
        "null" => {}
        "ramdisk" => {
            let cap = c.capacity.unwrap_or(c.size);
            if size > cap {
                bail!("device {id} is a ramdisk of {cap} bytes of memory, allocated when it was added: it cannot grow past that; add a new, larger ramdisk");
            }
        }
        "loop" => {
            let file = c.file.clone().ok_or_else(|| anyhow!("the saved configuration of device {id} has no backing file"))?;
            let t = LoopTarget::open(&file, &LoopOptions { direct: false, read_only: true })?;
            if size > t.size() {
                bail!(
                    "--size {size} is larger than device {id}'s backing file {} ({} bytes): reads past its end would fail; grow the file first (truncate -s {size} {}), then resize",
                    file.display(),
                    t.size(),
                    file.display()
                );
            }
        }
        "stripe" => {
            let s = c.stripe.clone().ok_or_else(|| anyhow!("the saved configuration of device {id} has no stripe legs"))?;
            let t = Stripe::open(&s.legs, s.chunk, &LoopOptions { direct: false, read_only: true })?;
            if size > t.size() {
                bail!(
                    "--size {size} is larger than device {id}'s stripe ({} bytes: {} legs x the smallest leg, in whole {}-byte chunks); grow every leg first, then resize",
                    t.size(),
                    s.legs.len(),
                    s.chunk
                );
            }
        }
        "nbd" => {
            if size > c.size {
                bail!("device {id} serves an NBD export of {} bytes: it can shrink, not grow past the export", c.size);
            }
        }
        other => bail!("device {id} has an unknown target {other:?} in its saved configuration"),
    }
    Ok(())
}

/// `ublk quiesce -n N`: QUIESCE_DEV until the daemon has let go of the
/// device, then waits for the daemon to exit.
fn cmd_quiesce(id: u32, timeout: Duration) -> Result<()> {
    let mut ctrl = Control::open()?;
    let info = dev_info(&mut ctrl, id)?;
    let cfg = DeviceConfig::load(id).ok().flatten();
    let pid = info.ublksrv_pid;
    let t0 = Instant::now();
    let sent = ctrl.quiesce(id, timeout).map_err(|e| match e {
        ublk::Error::Unsupported { .. } => anyhow!(
            "`ublk quiesce` needs Linux 6.16 or later (UBLK_F_QUIESCE: QUIESCE_DEV), which this kernel ({}) does not offer; nothing was changed. To replace the daemon of a --recovery device here: kill -9 it, then `ublk recover -n {id}` (I/O in flight may fail, or be re-issued with --recovery-reissue)",
            ublk::ctrl::kernel_release()
        ),
        e => e.into(),
    })?;
    if info.flags & sys::abi::UBLK_F_USER_RECOVERY_FAIL_IO != 0 {
        eprintln!("ublk: note: device {id} was made with --recovery-fail-io: I/O fails (it does not wait) until `ublk recover -n {id}`");
    }
    // The daemon exits once its queues have ended: wait for that.
    if pid > 0 && pid as u32 != std::process::id() && daemon_alive(pid as u32, id, cfg.as_ref()) {
        while pid_alive(pid as u32) && t0.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(20));
        }
        if pid_alive(pid as u32) {
            eprintln!("ublk: warning: device {id} is quiesced but its daemon (pid {pid}) is still running");
        }
    }
    println!("quiesced device {id}: I/O waits in the kernel for `ublk recover -n {id}`");
    eprintln!("ublk: QUIESCE_DEV sent {sent} time(s) in {:?}", t0.elapsed());
    Ok(())
}

/// Whether the daemon of device `id`, which the kernel says is `pid`, is
/// running: where the saved configuration has the daemon's start time, the
/// process must match it (a dead daemon's pid may belong to another process
/// by now); devices without one (not made by this `ublk`) go by the pid.
fn daemon_alive(pid: u32, id: u32, cfg: Option<&DeviceConfig>) -> bool {
    match cfg {
        Some(c) if c.pid_start.is_some() => verify_daemon(pid, id, cfg).is_ok(),
        _ => pid_alive(pid),
    }
}

fn del_one(ctrl: &mut Control, id: u32, info: &ublk::DevInfo) -> Result<()> {
    let pid = info.ublksrv_pid;
    let live_pid = pid > 0 && pid as u32 != std::process::id() && pid_alive(pid as u32);
    // Only a process proven to be the daemon (the pid and start time the
    // daemon saved) is signalled: after the daemon died, its pid may belong
    // to any other process.
    let cfg = if live_pid { DeviceConfig::load(id) } else { Ok(None) };
    let verified = match (live_pid, &cfg) {
        (false, _) => false,
        (true, Err(e)) => {
            eprintln!("ublk: note: not signalling pid {pid}: {e}; stopping and deleting device {id} directly");
            false
        }
        (true, Ok(c)) => match verify_daemon(pid as u32, id, c.as_ref()) {
            Ok(()) => true,
            Err(why) => {
                eprintln!("ublk: note: not signalling pid {pid}, which the kernel names as device {id}'s daemon: {why}; stopping and deleting device {id} directly");
                false
            }
        },
    };
    if verified {
        // The daemon tears its device down itself on SIGTERM.
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t0 = Instant::now();
        while (pid_alive(pid as u32) || device_exists(id)) && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if pid_alive(pid as u32) {
            eprintln!("ublk: warning: daemon {pid} of device {id} did not exit within 30 s of SIGTERM; deleting the device directly");
        }
    }
    if device_exists(id) {
        match ctrl.stop_dev(id) {
            Ok(()) | Err(ublk::Error::NoDevice { .. }) => {}
            Err(e) => return Err(e).with_context(|| format!("stopping device {id}")),
        }
        match ctrl.del_dev(id) {
            Ok(()) | Err(ublk::Error::NoDevice { .. }) => {}
            Err(e) => return Err(e).with_context(|| format!("deleting device {id}")),
        }
    }
    DeviceConfig::remove(id);
    if let Ok(dir) = run_dir() {
        let _ = std::fs::remove_file(dir.join(format!("{id}.log")));
    }
    Ok(())
}

/// The kernel's name of the `UBLK_F_*` flag `1 << bit`: from the library's
/// ABI table (every flag up to the newest kernel it knows), else from this
/// build's header.
fn flag_name(bit: u32) -> Option<&'static str> {
    let f = 1u64 << bit;
    sys::abi::flag_name(f).or_else(|| sys::HEADER_FLAGS.iter().find(|(_, v)| *v == f).map(|(n, _)| *n))
}

fn cmd_features(json: bool) -> Result<()> {
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

/// The data path of a device with these (kernel) flags: what the kernel
/// negotiated, and, under USER_COPY, whether the daemon moves data at all
/// (as `ublk add` saved it).
fn data_path_of(flags: u64, cfg: Option<&DeviceConfig>) -> &'static str {
    if flags & sys::abi::UBLK_F_AUTO_BUF_REG != 0 {
        DataPath::AutoBufReg.name()
    } else if flags & sys::abi::UBLK_F_SUPPORT_ZERO_COPY != 0 {
        DataPath::ZeroCopy.name()
    } else if flags & sys::abi::UBLK_F_USER_COPY != 0 {
        match cfg.and_then(|c| c.data_path.as_deref()) {
            Some("none") => DataPath::NoData.name(),
            Some(_) => DataPath::UserCopy.name(),
            None if cfg.is_some_and(|c| c.target == "null") => DataPath::NoData.name(),
            None => DataPath::UserCopy.name(),
        }
    } else {
        DataPath::Copy.name()
    }
}

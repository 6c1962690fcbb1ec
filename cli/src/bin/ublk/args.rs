//! The command line: the subcommands and their arguments, as clap derives
//! them (their doc comments are the help texts).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use ublk::DataPath;
use ublk_cli::parse_size;

/// Userspace block devices on the kernel's ublk driver.
#[derive(Parser, Debug)]
#[command(name = "ublk", version)]
pub(super) struct Cli {
    #[command(subcommand)]
    pub(super) cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub(super) enum Cmd {
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
pub(super) enum Kind {
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
    pub(super) fn name(self) -> &'static str {
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
pub(super) struct AddArgs {
    /// Target type.
    #[arg(short = 't', long = "type", value_enum)]
    pub(super) target: Kind,
    /// Hardware queues (the kernel caps it at the CPU count).
    #[arg(long, default_value_t = 1)]
    pub(super) queues: u16,
    /// Tags (outstanding requests) per queue, 1..=4096.
    #[arg(long, default_value_t = 128)]
    pub(super) depth: u16,
    /// Threads serving each queue, each with its own ring and its share of
    /// the tags (tag t on thread t % N): one CPU's I/O served by N threads.
    /// N > 1 needs Linux 6.16+ (UBLK_F_PER_IO_DAEMON); not for -t nbd.
    #[arg(long, default_value_t = 1)]
    pub(super) threads_per_queue: u16,
    /// Device size (e.g. 1G, 512M). Default: null 1G, ramdisk 256M, loop the backing file's size, stripe legs x the smallest leg.
    #[arg(long, value_parser = parse_size)]
    pub(super) size: Option<u64>,
    /// Logical block size: 512, 1024, 2048 or 4096.
    #[arg(long, default_value_t = 512)]
    pub(super) block_size: u32,
    /// Backing file or block device of a loop device; for a stripe, once
    /// per leg, in order.
    #[arg(long)]
    pub(super) file: Vec<PathBuf>,
    /// Stripe chunk size: a power of two from 4K to 1M. Default 64K.
    #[arg(long, value_parser = parse_size)]
    pub(super) chunk: Option<u64>,
    /// Open the backing file(s) with O_DIRECT.
    #[arg(long)]
    pub(super) direct: bool,
    /// Device id (N of /dev/ublkbN); the kernel picks one if omitted.
    #[arg(long)]
    pub(super) id: Option<u32>,
    /// User recovery: if the daemon dies the device waits, queued I/O held,
    /// for `ublk recover -n N` (UBLK_F_USER_RECOVERY). For -t nbd: a lost
    /// connection is made again (with backoff) and the I/O in flight
    /// re-issued, I/O waiting meanwhile.
    #[arg(long)]
    pub(super) recovery: bool,
    /// With recovery, re-issue the I/O in flight when the daemon died (implies --recovery).
    #[arg(long)]
    pub(super) recovery_reissue: bool,
    /// With recovery, fail I/O while no daemon serves the device (Linux 6.13+; implies --recovery).
    #[arg(long, conflicts_with = "recovery_reissue")]
    pub(super) recovery_fail_io: bool,
    /// No partition scan when the device starts (UBLK_F_NO_AUTO_PART_SCAN,
    /// Linux 7.0+); `blockdev --rereadpt` scans later.
    #[arg(long)]
    pub(super) no_part_scan: bool,
    /// Serve from a background daemon; print the id once the device is live.
    #[arg(long)]
    pub(super) detach: bool,
    /// Microseconds a queue thread keeps polling for the next request before it sleeps; 0 always sleeps.
    /// Default: 200, and 0 for -t nbd (its queue threads wait for the server, which
    /// needs the CPU they would spin on when it runs on the same machine).
    #[arg(long)]
    pub(super) busy_poll_us: Option<u64>,
    /// The block layer's request timeout for /dev/ublkbN, in milliseconds
    /// (queue/io_timeout; the kernel's default is 30000). A timeout fails no
    /// request while the daemon lives; on Linux 6.7 to 6.15 it bounds how long
    /// a daemon that died holding every tag of a queue goes unnoticed. Not for
    /// --unprivileged devices, whose timeout kills the daemon, nor on 6.1,
    /// whose driver has no timeout.
    #[arg(long, value_name = "MS")]
    pub(super) io_timeout_ms: Option<u64>,
    /// Where queue threads run. Default: auto, and away for -t nbd (its
    /// queue threads wait for the server; next to a busy submitter they
    /// would only delay it).
    #[arg(long, value_enum)]
    pub(super) placement: Option<ublk_cli::PlacementArg>,
    /// How request data reaches the daemon: copy (the kernel copies into
    /// per-tag buffers), user-copy (the daemon copies with pread/pwrite on
    /// /dev/ublkcN; Linux 6.5+), zero-copy (the target's reads and writes
    /// use the request's own pages, registered per request; 6.15+),
    /// auto-buf-reg (zero copy, the kernel registering them; 6.16+), none
    /// (no data; null only), or auto: the fastest the kernel offers for the
    /// target (the default: zero copy where the kernel has it for loop,
    /// stripe and ramdisk, else user copy; for nbd auto-buf-reg with user
    /// copy beside it (short payloads through the daemon, long ones in the
    /// request's pages; 6.16+), else copy; none for null). An explicit
    /// zero-copy or auto-buf-reg is that path alone.
    #[arg(long, value_parser = parse_data_path)]
    pub(super) data_path: Option<DataPathArg>,
    /// NBD server host (name or address), for -t nbd.
    #[arg(long, conflicts_with = "unix")]
    pub(super) host: Option<String>,
    /// NBD server TCP port, for -t nbd with --host.
    #[arg(long, default_value_t = 10809)]
    pub(super) port: u16,
    /// NBD server unix socket, for -t nbd.
    #[arg(long)]
    pub(super) unix: Option<PathBuf>,
    /// NBD export name (default: the server's default export).
    #[arg(long, default_value = "")]
    pub(super) export: String,
    /// NBD connections, one per queue (default: --queues); more than one
    /// needs a server that allows it (NBD_FLAG_CAN_MULTI_CONN).
    #[arg(long)]
    pub(super) connections: Option<u16>,
    /// NBD: do not ask for structured replies (NBD_OPT_STRUCTURED_REPLY),
    /// which are used by default where the server offers them.
    #[arg(long)]
    pub(super) simple_replies: bool,
    /// Serve a null device with the async target (futures on the queue
    /// thread) instead of the sync one; loop is always async.
    #[arg(long = "async")]
    pub(super) async_: bool,
    /// Batched commands (UBLK_F_BATCH_IO, Linux 7.0+): one multishot fetch
    /// delivers many requests per completion and one command commits many
    /// answers. The default where the kernel has them, except for
    /// --recovery devices (which keep `ublk quiesce`), --threads-per-queue
    /// above 1 and --depth 1; --batch insists (refused where it cannot be).
    #[arg(long, conflicts_with = "no_batch")]
    pub(super) batch: bool,
    /// One command per request, even where batched commands are the default.
    #[arg(long)]
    pub(super) no_batch: bool,
    /// An unprivileged device (Linux 6.3+), which an ordinary user may
    /// create and which only its owner (and root) may control; needs the
    /// udev rules of docs/unprivileged.md. Kernels up to 7.3 give such
    /// devices no --recovery (refused with the kernel's answer).
    #[arg(long)]
    pub(super) unprivileged: bool,
}

impl AddArgs {
    /// `--busy-poll-us`, or the target's default: none for NBD, whose queue
    /// threads wait on the server (polling takes the CPU a server on the same
    /// machine needs, and a remote one answers later than any poll lasts;
    /// the README's NBD benchmark has the figures), [`ublk::DEFAULT_BUSY_POLL`]
    /// for the others.
    pub(super) fn busy_poll(&self) -> std::time::Duration {
        match (self.busy_poll_us, self.target) {
            (Some(us), _) => std::time::Duration::from_micros(us),
            (None, Kind::Nbd) => std::time::Duration::ZERO,
            (None, _) => ublk::DEFAULT_BUSY_POLL,
        }
    }

    /// `--io-timeout-ms`.
    pub(super) fn io_timeout(&self) -> Option<std::time::Duration> {
        self.io_timeout_ms.map(std::time::Duration::from_millis)
    }

    /// `--placement`, or the target's default: away for NBD (see
    /// [`ublk::targets::Nbd::builder`]), auto for the others.
    pub(super) fn placement(&self) -> ublk_cli::PlacementArg {
        match (self.placement, self.target) {
            (Some(p), _) => p,
            (None, Kind::Nbd) => ublk_cli::PlacementArg::Away,
            (None, _) => ublk_cli::PlacementArg::Auto,
        }
    }
}

/// `--data-path`: a data path, or the best for the target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum DataPathArg {
    Auto,
    Is(DataPath),
}

fn parse_data_path(s: &str) -> std::result::Result<DataPathArg, String> {
    if s == "auto" {
        return Ok(DataPathArg::Auto);
    }
    s.parse().map(DataPathArg::Is).map_err(|e: String| e.replace(" or none", ", none or auto"))
}

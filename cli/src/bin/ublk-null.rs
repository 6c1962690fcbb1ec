//! `ublk-null`: the tiny null target. Reads complete with the requested
//! length, writes are discarded. Runs in the foreground until SIGINT or
//! SIGTERM, then stops and deletes the device and prints what each queue served.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use ublk::{AsyncNullTarget, Device, DeviceBuilder, NullTarget, StopHandle};
use ublk_cli::{parse_size, SignalStop};

/// A ublk block device that reads zeros and discards writes.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Hardware queues (one serving thread each; the kernel caps it at the CPU count).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Tags (outstanding requests) per queue, 1..=4096.
    #[arg(long, default_value_t = 128)]
    depth: u16,
    /// Threads serving each queue, tag t on thread t % N (N > 1: Linux 6.16+).
    #[arg(long, default_value_t = 1)]
    threads_per_queue: u16,
    /// Device size, e.g. 1G, 512M.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Logical block size: 512, 1024, 2048 or 4096.
    #[arg(long, default_value_t = 512)]
    block_size: u32,
    /// Device id (N of /dev/ublkbN); the kernel picks one if omitted.
    #[arg(long)]
    id: Option<u32>,
    /// Where queue threads run.
    #[arg(long, value_enum, default_value_t)]
    placement: ublk_cli::PlacementArg,
    /// The block layer's I/O scheduler for the device ("none", "mq-deadline",
    /// ...), or "kernel" for the kernel's default (mq-deadline for one queue up to 6.1).
    #[arg(long, default_value = "none")]
    scheduler: String,
    /// Microseconds a queue thread keeps polling for the next request before
    /// it sleeps; 0 always sleeps.
    #[arg(long, default_value_t = ublk::DEFAULT_BUSY_POLL.as_micros() as u64)]
    busy_poll_us: u64,
    /// Have the kernel copy request data to and from per-tag buffers even
    /// where it could skip that (UBLK_F_USER_COPY, 6.5+): for comparison.
    #[arg(long)]
    data_copy: bool,
    /// Batched commands (UBLK_F_BATCH_IO, Linux 7.0+): the default where
    /// the kernel has them; --batch insists (refused where it cannot be).
    #[arg(long, conflicts_with = "no_batch")]
    batch: bool,
    /// One command per request, even where batched commands are the default.
    #[arg(long)]
    no_batch: bool,
    /// Serve with the async null target (each request a future on the
    /// queue's thread) instead of the sync one: for comparison.
    #[arg(long = "async")]
    async_: bool,
    /// Largest request, e.g. 512K.
    #[arg(long, default_value = "512K", value_parser = parse_size)]
    max_io_size: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let signals = SignalStop::install();
    match run(args, &signals) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ublk-null: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args, signals: &SignalStop) -> anyhow::Result<()> {
    let max_io = u32::try_from(args.max_io_size).map_err(|_| anyhow::anyhow!("--max-io-size too large"))?;
    let b = DeviceBuilder::new()
        .queues(args.queues)
        .depth(args.depth)
        .threads_per_queue(args.threads_per_queue)
        .size(args.size)
        .block_size(args.block_size)
        .id(args.id)
        .max_io_bytes(max_io)
        .placement(args.placement.into())
        .busy_poll(std::time::Duration::from_micros(args.busy_poll_us))
        .io_scheduler(Some(args.scheduler.as_str()).filter(|s| *s != "kernel"))
        .data_path(if args.data_copy { ublk::DataPath::Copy } else { ublk::DataPath::NoData });
    let dev = ublk_cli::with_batch(b, args.batch, args.no_batch).create()?;
    let info = *dev.info();
    if info.nr_hw_queues != args.queues {
        eprintln!("ublk-null: note: the kernel limited the device to {} queues (one per CPU), {} asked", info.nr_hw_queues, args.queues);
    }
    let on_live = |dev: &Device, stop: StopHandle| {
        println!("{}", dev.block_path().display());
        let _ = std::io::stdout().flush();
        eprintln!(
            "ublk-null: device {} live: {} queues x {} tags, {} threads per queue, {} bytes, {}-byte blocks, opcodes {:?}, data {}",
            dev.id(),
            info.nr_hw_queues,
            info.queue_depth,
            args.threads_per_queue,
            args.size,
            args.block_size,
            dev.encoding(),
            match dev.data_path() {
                ublk::DataPath::NoData => "not copied (USER_COPY)",
                ublk::DataPath::Copy => "copied",
                ublk::DataPath::UserCopy => "copied by the daemon (USER_COPY)",
                ublk::DataPath::ZeroCopy | ublk::DataPath::AutoBufReg => "left in the kernel (zero copy)",
            }
        );
        signals.arm(stop);
    };
    let stats = if args.async_ { dev.serve_async(&AsyncNullTarget, on_live)? } else { dev.serve(&NullTarget, on_live)? };
    ublk_cli::print_queue_stats(&stats);
    eprintln!("ublk-null: device {} stopped and deleted", info.dev_id);
    Ok(())
}

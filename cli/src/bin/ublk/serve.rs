//! Serving a device until SIGINT/SIGTERM: the sync and async targets
//! alike, the configuration saved once it is live, and what is printed
//! then and at the end.

use std::io::Write;

use anyhow::Result;
use ublk::{AsyncTarget, Device, Nbd, StopHandle, Target};
use ublk_cli::config::{process_start_time, DeviceConfig};
use ublk_cli::SignalStop;

use crate::daemon::Ready;
use crate::device::device_exists;

/// A target the CLI serves: sync or async.
pub(super) trait CliTarget {
    fn run(&self, dev: Device, on_live: impl FnOnce(&Device, StopHandle) + Send) -> ublk::Result<Vec<ublk::QueueStats>>;
}

pub(super) struct SyncT<'a, T>(pub(super) &'a T);
pub(super) struct AsyncT<'a, T>(pub(super) &'a T);

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

/// Serves `dev` until SIGINT/SIGTERM: saves the configuration and prints the
/// block device once live, the per-queue counts at the end.
pub(super) fn serve<T: CliTarget>(dev: Device, target: &T, mut cfg: DeviceConfig, signals: &SignalStop, ready: &mut Ready) -> Result<()> {
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
            "ublk: device {id} live: {}{} target{}, {} queues x {} tags, {} threads per queue, {} bytes, {}-byte blocks, data path {}, flags [{}], opcodes {:?}, placement {:?}, busy poll {} us, pid {}",
            if cfg.async_target { "async " } else { "" },
            cfg.target,
            cfg.file.as_ref().map(|f| format!(" on {}", f.display())).unwrap_or_default(),
            info.nr_hw_queues,
            info.queue_depth,
            cfg.threads_per_queue,
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

/// [`serve`] for an NBD device: says what the server offered, and at the
/// end what the connections did (on stdout, after the queue counts).
pub(super) fn serve_nbd(dev: Device, nbd: &Nbd, cfg: DeviceConfig, signals: &SignalStop, ready: &mut Ready) -> Result<()> {
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
        "nbd: replies={} simple_replies={} chunks={} data_chunks={} hole_chunks={} error_chunks={} recvs={} fixed_recvs={} direct_payloads={} holes_zeroed={} payload_reads={} copied_payloads={} staged_writes={} sends={} reconnects={}",
        if i.structured { "structured" } else { "simple" },
        s.simple_replies,
        s.chunks,
        s.data_chunks,
        s.hole_chunks,
        s.error_chunks,
        s.recvs,
        s.fixed_recvs,
        s.direct_payloads,
        s.holes_zeroed,
        s.payload_reads,
        s.copied_payloads,
        s.staged_writes,
        s.sends,
        nbd.reconnects()
    );
    let _ = std::io::stdout().flush();
    r
}

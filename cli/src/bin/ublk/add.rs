//! `ublk add`: the flags asked for, the checks of the arguments, the
//! target opened first, then the device created and served.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use ublk::{sys, AsyncNullTarget, Control, DataPath, DeviceBuilder, Discard, Nbd, NullTarget, RamDisk};
use ublk_cli::config::{ensure_run_dir, DeviceConfig, NbdConfig, StripeConfig};
use ublk_cli::SignalStop;

use crate::args::{AddArgs, DataPathArg, Kind};
use crate::daemon::Ready;
use crate::serve::{serve, serve_nbd, AsyncT, SyncT};
use crate::targets::{nbd_options, open_loop, open_stripe};

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
            bail!(
                "--recovery-fail-io needs Linux 6.13 or later (UBLK_F_USER_RECOVERY_FAIL_IO), which this kernel ({}) does not offer; use --recovery-reissue or --recovery",
                ublk::ctrl::kernel_release()
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

pub(super) fn cmd_add(a: AddArgs, ready: &mut Ready) -> Result<()> {
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
        bail!("--data-path user-copy is not for -t nbd: the NBD target sends and receives data in the queue's buffers, or with zero copy in the request's pages; use copy (the default), zero-copy or auto-buf-reg");
    }
    if a.target == Kind::Nbd && a.threads_per_queue != 1 {
        bail!("--threads-per-queue {} with -t nbd: each queue has one NBD connection, served by one thread; use more queues (--connections) instead", a.threads_per_queue);
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
        let b = b
            .queues(a.queues)
            .depth(a.depth)
            .threads_per_queue(a.threads_per_queue)
            .size(size)
            .block_size(a.block_size)
            .id(a.id)
            .flags(flags)
            .discard(discard)
            .busy_poll(a.busy_poll())
            .io_timeout(a.io_timeout())
            .placement(a.placement().into());
        ublk_cli::with_batch(b, a.batch, a.no_batch)
    };
    let cfg = |size: u64, file: Option<PathBuf>| DeviceConfig {
        id: 0,
        target: a.target.name().into(),
        file,
        size,
        block_size: a.block_size,
        queues: a.queues,
        depth: a.depth,
        threads_per_queue: a.threads_per_queue,
        flags,
        flag_names: vec![],
        direct: a.direct,
        pid: std::process::id(),
        pid_start: None,
        placement: a.placement(),
        busy_poll_us: a.busy_poll().as_micros() as u64,
        data_path: None,
        async_target: a.async_,
        stripe: None,
        nbd: None,
        capacity: None,
    };
    if a.async_ && a.target != Kind::Null {
        bail!(
            "--async is for -t null (the sync null target is the default there); {} picks how it is served from its data path",
            a.target.name()
        );
    }
    if a.data_path == Some(DataPathArg::Is(DataPath::NoData)) && a.target != Kind::Null {
        bail!("--data-path none is for -t null: a {} device reads and writes data; use copy or user-copy", a.target.name());
    }
    // Targets whose data moves only with Io::read_at/write_at (see
    // AsyncTarget::zero_copy) can leave it in the kernel.
    let zero_copy_target = matches!(a.target, Kind::Loop | Kind::Stripe | Kind::Ramdisk | Kind::Nbd);
    let data_path = match a.data_path.unwrap_or(DataPathArg::Auto) {
        DataPathArg::Is(d) if d.is_zero_copy() && !zero_copy_target && a.target != Kind::Null => bail!(
            "--data-path {} is for -t loop, stripe, ramdisk and nbd (and null): a {} target reads and writes request data in its own memory; use copy or user-copy",
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
            let has = |f: u64| features.is_some_and(|x| x.contains(f));
            if a.target == Kind::Nbd {
                // NBD: auto-buf-reg where the kernel also has user copy (which
                // the NBD branch asks for beside it: short payloads through
                // the daemon, long ones in the request's pages); else copy,
                // since zero copy alone receives each reply's header on its
                // own, which costs short requests more than the copy saves.
                if has(sys::abi::UBLK_F_AUTO_BUF_REG) && has(sys::abi::UBLK_F_USER_COPY) {
                    DataPath::AutoBufReg
                } else {
                    DataPath::Copy
                }
            } else {
                DataPath::best(features, a.target != Kind::Null, zero_copy_target)
            }
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
            if data_path.is_zero_copy() || data_path == DataPath::UserCopy {
                // The kernel moves the data between the request's pages and
                // the memory (a READ/WRITE of the memfd under zero copy, a
                // pread/pwrite of the char device under user copy): one copy.
                serve(dev, &AsyncT(&rd), cfg, &signals, ready)
            } else {
                // Copied in this process, between the queue's buffer and the
                // memory (no io_uring operation per request).
                serve(dev, &SyncT(&rd), cfg, &signals, ready)
            }
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
            // By default (auto picked auto-buf-reg, where the kernel has user
            // copy too) user copy beside zero copy: short payloads then go
            // through this process (a copy, but an operation less per
            // request), long ones stay in the request's pages. An explicit
            // --data-path gets that path alone.
            let auto = matches!(a.data_path, None | Some(DataPathArg::Auto));
            let user_copy = auto && data_path.is_zero_copy();
            let flags = if user_copy { flags | sys::abi::UBLK_F_USER_COPY } else { flags };
            let dev = nbd
                .builder(a.block_size)?
                .depth(a.depth)
                .id(a.id)
                .flags(flags)
                .busy_poll(a.busy_poll())
                .io_timeout(a.io_timeout())
                .placement(a.placement().into())
                .data_path(data_path);
            let dev = ublk_cli::with_batch(dev, a.batch, a.no_batch).create()?;
            let c = DeviceConfig { queues: connections, nbd: Some(n), ..cfg(size, None) };
            serve_nbd(dev, &nbd, c, &signals, ready)
        }
    }
}

/// Where the device's state will go, checked after the target (a bad
/// backing file or size is named first) and before there is a device.
fn state_dir() -> Result<()> {
    ensure_run_dir().map(drop).map_err(|e| anyhow!(e))
}

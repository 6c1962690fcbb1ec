//! Shared bits of the ublk binaries: size parsing, placement, signal handling.

use std::sync::{Arc, Mutex};

pub mod config;

use ublk::StopHandle;

/// `--placement`: where queue threads run (see [`ublk::Placement`]).
#[derive(clap::ValueEnum, serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PlacementArg {
    /// Away from the CPUs submitting to the queue while it can, home (as
    /// SCHED_BATCH, without polling) while every CPU has a submitter.
    #[default]
    Auto,
    /// Always on a CPU that does not submit to the queue.
    Away,
    /// On the CPUs that submit to the queue.
    Affinity,
    /// Wherever the scheduler puts them.
    Unpinned,
}

/// `--batch` / `--no-batch`: the builder's batching, or its default
/// (batched where the kernel has it and nothing rules it out).
pub fn with_batch(b: ublk::DeviceBuilder, batch: bool, no_batch: bool) -> ublk::DeviceBuilder {
    match (batch, no_batch) {
        (true, _) => b.batch_io(true),
        (_, true) => b.batch_io(false),
        _ => b,
    }
}

impl From<PlacementArg> for ublk::Placement {
    fn from(p: PlacementArg) -> Self {
        match p {
            PlacementArg::Auto => ublk::Placement::Auto,
            PlacementArg::Away => ublk::Placement::Away,
            PlacementArg::Affinity => ublk::Placement::Affinity,
            PlacementArg::Unpinned => ublk::Placement::Unpinned,
        }
    }
}

/// Parses a size like `1G`, `512M`, `4096`, `64k` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let unit = s[i..].trim_end_matches(['B', 'b', 'i']).to_ascii_uppercase();
            let m = match unit.as_str() {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?}: use K, M, G or T")),
            };
            (&s[..i], m)
        }
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (e.g. 1G, 512M, 4096)"))?;
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

/// Prints what each queue thread served, one `queue N: thread=T
/// requests=... ` line each (the end-to-end tests read these lines; T is 0
/// with one thread per queue).
pub fn print_queue_stats(stats: &[ublk::QueueStats]) {
    for s in stats {
        println!(
            "queue {}: thread={} requests={} reads={} writes={} fua_writes={} flushes={} discards={} write_zeroes={} unsupported={} errors={} invalid={} bytes={} enters={} waits={} polled={} moves={} buf_regs={}",
            s.q_id,
            s.thread,
            s.requests(),
            s.reads,
            s.writes,
            s.fua_writes,
            s.flushes,
            s.discards,
            s.write_zeroes,
            s.unsupported,
            s.errors,
            s.invalid,
            s.bytes,
            s.enters,
            s.waits,
            s.polled,
            s.moves,
            s.buf_regs
        );
    }
}

/// Stops the device on SIGINT or SIGTERM.
///
/// Blocks both signals in the calling thread, and so in every thread spawned
/// after this call (the queue threads), and waits for them on a thread of its
/// own, which hands them to the device's [`StopHandle`] once it is live (or
/// as soon as it becomes live, if a signal came first).
#[derive(Clone, Default)]
pub struct SignalStop {
    inner: Arc<Mutex<(Option<StopHandle>, Option<i32>)>>,
}

impl SignalStop {
    /// Installs the signal thread. Call before creating any other thread.
    pub fn install() -> Self {
        let me = SignalStop::default();
        // SAFETY: sigset manipulation on a local, zero-initialised set, then
        // pthread_sigmask on the calling thread: no memory is shared.
        let set = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            set
        };
        let inner = me.inner.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                let mut sig = 0;
                // SAFETY: `set` is a valid signal set and `sig` a live int.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                let mut g = inner.lock().unwrap();
                g.1 = Some(sig);
                if let Some(h) = &g.0 {
                    h.stop();
                }
            })
            .expect("spawn the signal thread");
        me
    }

    /// Hands over the live device's stop handle.
    pub fn arm(&self, h: StopHandle) {
        let mut g = self.inner.lock().unwrap();
        if g.1.is_some() {
            h.stop();
        }
        g.0 = Some(h);
    }

    /// The signal received, if any.
    pub fn received(&self) -> Option<i32> {
        self.inner.lock().unwrap().1
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("G").is_err());
    }
}

//! Configuring and creating a device: [`DeviceBuilder`], its checks of
//! the configuration, and ADD_DEV and SET_PARAMS with the flags the data
//! path and the options ask for (refused before ADD_DEV where the kernel
//! or the library lacks them).

use std::time::Duration;

use ublk_sys as sys;

use super::check::{check_flag_combinations, check_flags, check_io_timeout, check_unprivileged, flags_feature, names_since};
use super::nodes::{open_char, wait_node_access};
use super::{DataPath, Device, Serving, MAX_QUEUE_DEPTH};
use crate::ctrl::{Control, DevInfo};
use crate::error::{Error, Result};
use crate::params::{validate_block_size, Discard, Params};
use crate::placement::Placement;
use crate::queue::{check_threads, TagShare};

/// Configures a device, then creates it with [`DeviceBuilder::create`].
#[derive(Debug, Clone)]
pub struct DeviceBuilder {
    queues: u16,
    depth: u16,
    size: u64,
    block_size: u32,
    id: Option<u32>,
    max_io_bytes: u32,
    flags: u64,
    attrs: u32,
    discard: Option<Discard>,
    unprivileged: bool,
    /// `None`: batched where the kernel has it and nothing rules it out.
    batch_io: Option<bool>,
    // Also holds the data path, the one copy of it: `create` takes the
    // device's flags from it, and the device keeps it.
    pub(super) serving: Serving,
}

/// How long [`DeviceBuilder::create`] waits, for an unprivileged device, until
/// the udev rule has given `/dev/ublkcN` to its owner (the kernel creates it
/// root-owned, mode 0600).
pub const NODE_WAIT: Duration = Duration::from_secs(10);

impl Default for DeviceBuilder {
    fn default() -> Self {
        DeviceBuilder {
            queues: 1,
            depth: 128,
            size: 1 << 30,
            block_size: 512,
            id: None,
            max_io_bytes: 512 << 10,
            flags: 0,
            attrs: 0,
            discard: None,
            unprivileged: false,
            batch_io: None,
            serving: Serving::default(),
        }
    }
}

impl DeviceBuilder {
    /// A 1 GiB device with one queue of 128 tags and 512-byte blocks.
    pub fn new() -> Self {
        Self::default()
    }
    /// Number of hardware queues (the kernel clamps it to the CPU count).
    pub fn queues(mut self, n: u16) -> Self {
        self.queues = n;
        self
    }
    /// Tags per queue, 1..=4096.
    pub fn depth(mut self, n: u16) -> Self {
        self.depth = n;
        self
    }
    /// Device size in bytes.
    pub fn size(mut self, bytes: u64) -> Self {
        self.size = bytes;
        self
    }
    /// Logical block size: a power of two in 512..=4096.
    pub fn block_size(mut self, bytes: u32) -> Self {
        self.block_size = bytes;
        self
    }
    /// Ask for this device id instead of letting the kernel choose.
    pub fn id(mut self, id: Option<u32>) -> Self {
        self.id = id;
        self
    }
    /// Largest request in bytes (per-tag buffer size).
    pub fn max_io_bytes(mut self, bytes: u32) -> Self {
        self.max_io_bytes = bytes;
        self
    }
    /// Extra `UBLK_F_*` flags to ask for. Only flags whose protocol this
    /// library implements are taken ([`SUPPORTED_FLAGS`](crate::SUPPORTED_FLAGS),
    /// from [`DevFlags::library_support`](crate::DevFlags::library_support));
    /// any other is refused by [`create`](Self::create) before ADD_DEV with
    /// [`Error::FlagNotImplemented`], naming the flag and why. Flags the
    /// running kernel lacks are refused too ([`Error::Unsupported`], naming
    /// the kernel that has them): kernels silently drop flags they do not
    /// know at ADD_DEV.
    /// Takes [`DevFlags`](crate::DevFlags) (or the raw bits).
    pub fn flags(mut self, flags: impl Into<crate::DevFlags>) -> Self {
        self.flags = flags.into().bits();
        self
    }
    /// `UBLK_ATTR_*` attributes: [`Attrs`](crate::Attrs) (or the raw bits).
    pub fn attrs(mut self, attrs: impl Into<crate::Attrs>) -> Self {
        self.attrs = attrs.into().bits();
        self
    }
    /// Threads serving each queue (default 1). With more than one, the
    /// kernel's per-I/O daemons (`UBLK_F_PER_IO_DAEMON`, Linux 6.16+) are
    /// used: tag `t` of each queue is fetched, served and committed by
    /// thread `t % n` of that queue, which has its own ring, its own
    /// buffers for its tags (or its own zero-copy buffer table) and, for
    /// an [`AsyncTarget`](crate::AsyncTarget), its own target object
    /// ([`QueueContext::thread`](crate::aio::QueueContext::thread)). One
    /// CPU's I/O, which the kernel sends to one queue, is then served by
    /// `n` threads ([`Placement`] spreads them over CPUs). Older kernels
    /// deliver a queue's requests to one task only: there `n > 1` is
    /// refused by [`create`](Self::create) and
    /// [`recover`](Self::recover) ([`Error::Unsupported`]). At most the
    /// queue depth.
    pub fn threads_per_queue(mut self, n: u16) -> Self {
        self.serving.threads_per_queue = n;
        self
    }
    /// Where queue threads run (default [`Placement::Auto`]).
    pub fn placement(mut self, p: Placement) -> Self {
        self.serving.placement = p;
        self
    }
    /// How long each queue thread keeps polling its ring for the next
    /// request before it sleeps (default [`DEFAULT_BUSY_POLL`](crate::queue::DEFAULT_BUSY_POLL));
    /// `Duration::ZERO` always sleeps. Polling saves the submitter a wake-up
    /// per batch and the round trip the scheduler's latency. A thread that
    /// [`Placement::Auto`] has moved home, next to its submitter, does not
    /// poll: there it would only take the CPU from the submitter.
    pub fn busy_poll(mut self, d: Duration) -> Self {
        self.serving.busy_poll = d;
        self
    }
    /// The block layer's I/O scheduler for `/dev/ublkbN`, set once the
    /// device is live (default `None`: the kernel's choice). Kernels up to
    /// 6.1 give a one-queue ublk device `mq-deadline`, later ones `none`;
    /// `Some("none")` gives every kernel the latter.
    pub fn io_scheduler(mut self, name: Option<&str>) -> Self {
        self.serving.io_scheduler = name.map(str::to_string);
        self
    }
    /// The block layer's request timeout for `/dev/ublkbN` (its
    /// `queue/io_timeout`), set once the device is live, whether created
    /// or recovered (default `None`: the kernel's, 30 s). For a privileged
    /// device the driver's timeout handler only re-arms the timer while
    /// the server lives, so a short timeout fails no slow request. What it
    /// does bound, on 6.7 to 6.15, is how long a server that died holding
    /// every tag of a queue goes unnoticed: those kernels learn of the
    /// death through parked io commands, and such a queue has none, so
    /// only the timeout aborts it (`docs/abi.md`). In whole milliseconds
    /// (a fraction is dropped), from 1 to `i32::MAX` (the kernel turns
    /// larger values into its own maximum); refused for an
    /// [`unprivileged`](Self::unprivileged) device, whose request timeout
    /// kills its server. [`recover`](Self::recover) checks it before it
    /// takes the device over. A kernel whose driver has no timeout handler
    /// (6.1) has no `queue/io_timeout`: [`Device::serve`] then fails with
    /// [`Error::Unsupported`].
    pub fn io_timeout(mut self, d: Option<Duration>) -> Self {
        self.serving.io_timeout = d;
        self
    }
    /// How long a stop waits for the target to finish the requests in flight
    /// before their io_uring operations are cancelled and the requests fail
    /// (default [`STOP_GRACE`](crate::STOP_GRACE)).
    pub fn stop_grace(mut self, d: Duration) -> Self {
        self.serving.stop_grace = d;
        self
    }
    /// How request data moves (default [`DataPath::Copy`]).
    pub fn data_path(mut self, d: DataPath) -> Self {
        self.serving.data_path = d;
        self
    }
    /// Batched commands (`UBLK_F_BATCH_IO`, Linux 7.0+): each queue sends
    /// one PREP_IO_CMDS for all its tags, keeps one multishot
    /// FETCH_IO_CMDS armed (each completion delivers up to 128 requests)
    /// and commits all the answers of a turn with one COMMIT_IO_CMDS,
    /// instead of one command and one completion per request. Works with
    /// every [`DataPath`].
    ///
    /// By default a device is batched where the kernel offers
    /// `UBLK_F_BATCH_IO` and nothing rules it out: one thread per queue, a
    /// depth of 2 or more, and no `UBLK_F_QUIESCE` (the driver fails the
    /// requests of a quiesced batch queue, see [`Control::quiesce`](crate::Control::quiesce)),
    /// `UBLK_F_PER_IO_DAEMON`, `UBLK_F_NEED_GET_DATA` or `UBLK_F_ZONED`
    /// among the flags. `batch_io(true)` asks for it (refused on kernels
    /// without it, with several threads per queue, `UBLK_F_PER_IO_DAEMON`
    /// or depth 1; a device with `UBLK_F_QUIESCE` is made, but
    /// [`Control::quiesce`](crate::Control::quiesce) refuses it);
    /// `batch_io(false)` never batches (and refuses `UBLK_F_BATCH_IO` among
    /// the flags).
    pub fn batch_io(mut self, on: bool) -> Self {
        self.batch_io = Some(on);
        self
    }

    /// Whether the default (no [`batch_io`](Self::batch_io) call) batches
    /// on a kernel offering `features`.
    fn batch_by_default(&self, features: u64) -> bool {
        let excluded = sys::abi::UBLK_F_QUIESCE | sys::abi::UBLK_F_PER_IO_DAEMON | sys::abi::UBLK_F_NEED_GET_DATA | sys::abi::UBLK_F_ZONED;
        self.batch_io.is_none()
            && features & sys::abi::UBLK_F_BATCH_IO != 0
            && self.serving.threads_per_queue <= 1
            && self.depth >= 2
            && self.flags & excluded == 0
    }
    /// Test hook for [`DataPath::AutoBufReg`]'s fallback: each queue puts a
    /// page of its own at the fixed-buffer index of every `every`th tag, so
    /// that the kernel cannot register those tags' requests itself and the
    /// queue must (counted in [`QueueStats::buf_regs`](crate::QueueStats::buf_regs)). Not for production.
    #[doc(hidden)]
    pub fn occupy_auto_buf_indexes(mut self, every: u16) -> Self {
        self.serving.occupy_every = every;
        self
    }
    /// Creates an unprivileged device (`UBLK_F_UNPRIVILEGED_DEV`, Linux
    /// 6.3+), which an ordinary user may create, serve and delete: the
    /// kernel records the caller as its owner and checks, for every control
    /// command, the caller's access to `/dev/ublkcN` (whose path each
    /// command carries). That node is created root-owned: a udev rule must
    /// give it (and `/dev/ublkbN`) to the owner, and `create` waits up to
    /// [`NODE_WAIT`] for it (see `docs/unprivileged.md`). The kernel allows
    /// such devices neither user copy (so [`DataPath::NoData`] copies) nor
    /// user recovery (it drops `UBLK_F_USER_RECOVERY`, which `create`
    /// reports), and makes any device created with CAP_SYS_ADMIN a
    /// privileged one (also reported: create it as its owner).
    pub fn unprivileged(mut self) -> Self {
        self.unprivileged = true;
        self
    }
    /// Discard / write-zeroes limits (so the block layer sends them).
    pub fn discard(mut self, d: Option<Discard>) -> Self {
        self.discard = d;
        self
    }

    fn validate(&self) -> Result<()> {
        if self.queues == 0 {
            return Err(Error::InvalidConfig { what: "queue count", why: "0 queues; use at least 1".into() });
        }
        if let Some(max) = sys::opt::UBLK_MAX_NR_QUEUES {
            if u32::from(self.queues) > max {
                return Err(Error::InvalidConfig {
                    what: "queue count",
                    why: format!("{} queues is above the kernel's maximum of {max}", self.queues),
                });
            }
        }
        if self.depth == 0 || self.depth > MAX_QUEUE_DEPTH {
            return Err(Error::InvalidConfig {
                what: "queue depth",
                why: format!("{} is not in 1..={MAX_QUEUE_DEPTH} (UBLK_MAX_QUEUE_DEPTH)", self.depth),
            });
        }
        check_threads(self.serving.threads_per_queue, self.depth)?;
        if self.batch_io == Some(false) && self.flags & sys::abi::UBLK_F_BATCH_IO != 0 {
            return Err(Error::InvalidConfig {
                what: "flags",
                why: "UBLK_F_BATCH_IO among the flags with batch_io(false): drop one of the two".into(),
            });
        }
        let batch = self.batch_io == Some(true) || self.flags & sys::abi::UBLK_F_BATCH_IO != 0;
        if batch && self.serving.threads_per_queue > 1 {
            // A batch device has no per-I/O daemons (ADD_DEV drops
            // UBLK_F_PER_IO_DAEMON): one thread PREPs, fetches and commits a
            // queue's tags in batches.
            return Err(crate::queue::batch_threads_refused(self.serving.threads_per_queue));
        }
        if batch && self.flags & sys::abi::UBLK_F_PER_IO_DAEMON != 0 {
            return Err(Error::InvalidConfig {
                what: "flags",
                why: "UBLK_F_PER_IO_DAEMON with batched commands: the kernel drops it for UBLK_F_BATCH_IO (a batch device has no per-I/O daemons); drop one of the two".into(),
            });
        }
        if batch && self.depth < 2 {
            // Seen on 7.3: ADD_DEV answers -EINVAL.
            return Err(Error::InvalidConfig {
                what: "queue depth",
                why: "batched commands need a queue depth of 2 or more (the kernel refuses UBLK_F_BATCH_IO with 1 tag per queue); use --depth 2 or more, or drop --batch".into(),
            });
        }
        validate_block_size(self.block_size)?;
        Params::new(self.size, self.block_size, self.max_io_bytes)?;
        if self.max_io_bytes < 4096 || self.max_io_bytes % 4096 != 0 {
            return Err(Error::InvalidConfig {
                what: "max io size",
                why: format!("{} bytes is not a positive multiple of 4096", self.max_io_bytes),
            });
        }
        Ok(())
    }

    /// Validates the configuration, then ADD_DEV and SET_PARAMS, and opens
    /// `/dev/ublkcN`. On any error the half-made device is deleted.
    pub fn create(mut self) -> Result<Device> {
        self.validate()?;
        let unprivileged = self.unprivileged || self.flags & sys::abi::UBLK_F_UNPRIVILEGED_DEV != 0;
        check_io_timeout(self.serving.io_timeout, unprivileged)?;
        check_flags(self.flags)?;
        check_flag_combinations(self.flags)?;
        // The flag itself asks for what `unprivileged()` does.
        if self.flags & sys::abi::UBLK_F_UNPRIVILEGED_DEV != 0 {
            self.flags &= !sys::abi::UBLK_F_UNPRIVILEGED_DEV;
            self.unprivileged = true;
        }
        let mut ctrl = Control::open()?;
        if self.unprivileged {
            check_unprivileged(&ctrl, self.flags)?;
        }
        if self.flags != 0 {
            if let Some(f) = ctrl.features() {
                let missing = self.flags & !f.0;
                if missing != 0 {
                    return Err(Error::Unsupported {
                        feature: flags_feature(missing),
                        why: format!(
                            "the running kernel ({}) does not offer {} (it offers {}); use a newer kernel or drop the option",
                            crate::ctrl::kernel_release(),
                            names_since(missing),
                            f.names().join(",")
                        ),
                    });
                }
            }
        }
        let mut flags = self.flags;
        if self.serving.threads_per_queue > 1 {
            // Several threads per queue: each tag's requests must go to the
            // thread that fetched it. 7.x sets the flag by itself; asked for
            // where the kernel offers it, refused where it does not.
            if !ctrl.features().is_some_and(|f| f.contains(sys::abi::UBLK_F_PER_IO_DAEMON)) {
                return Err(crate::queue::per_io_unsupported(self.serving.threads_per_queue));
            }
            flags |= sys::abi::UBLK_F_PER_IO_DAEMON;
        }
        let user_copy = ctrl.features().is_some_and(|f| f.contains(sys::abi::UBLK_F_USER_COPY));
        match self.serving.data_path {
            // The kernel refuses USER_COPY for unprivileged devices: they copy.
            DataPath::NoData if user_copy && !self.unprivileged => flags |= sys::abi::UBLK_F_USER_COPY,
            DataPath::UserCopy if self.unprivileged => {
                return Err(Error::InvalidConfig {
                    what: "data path",
                    why: "the kernel refuses UBLK_F_USER_COPY for unprivileged devices (ADD_DEV: -EINVAL); use DataPath::Copy (`--data-path copy`)".into(),
                })
            }
            DataPath::UserCopy if user_copy => flags |= sys::abi::UBLK_F_USER_COPY,
            DataPath::UserCopy => {
                return Err(Error::Unsupported {
                    feature: "UBLK_F_USER_COPY",
                    why: "the running kernel does not offer user copy (Linux 6.5+); use DataPath::Copy (`--data-path copy`)".into(),
                })
            }
            DataPath::ZeroCopy | DataPath::AutoBufReg if self.unprivileged => {
                return Err(Error::InvalidConfig {
                    what: "data path",
                    why: "the kernel refuses zero copy for unprivileged devices (ADD_DEV: -EINVAL); use DataPath::Copy (`--data-path copy`)".into(),
                })
            }
            DataPath::ZeroCopy => {
                if !ctrl.features().is_some_and(|f| f.contains(sys::abi::UBLK_F_SUPPORT_ZERO_COPY)) {
                    return Err(Error::Unsupported {
                        feature: "UBLK_F_SUPPORT_ZERO_COPY",
                        why: "the running kernel does not offer zero copy (Linux 6.15+; 6.1-6.14 accept the flag but clear it); use DataPath::UserCopy or DataPath::Copy (`--data-path user-copy|copy`)".into(),
                    });
                }
                flags |= sys::abi::UBLK_F_SUPPORT_ZERO_COPY;
            }
            DataPath::AutoBufReg => {
                let f = ctrl.features().unwrap_or(crate::ctrl::Features(0));
                if !f.contains(sys::abi::UBLK_F_AUTO_BUF_REG) {
                    return Err(Error::Unsupported {
                        feature: "UBLK_F_AUTO_BUF_REG",
                        why: "the running kernel does not register request buffers itself (Linux 6.16+); use DataPath::ZeroCopy, UserCopy or Copy (`--data-path zero-copy|user-copy|copy`), or let DataPath::best choose".into(),
                    });
                }
                flags |= sys::abi::UBLK_F_AUTO_BUF_REG;
                // For the fallback: a request the kernel could not register
                // is registered by the queue (UBLK_U_IO_REGISTER_IO_BUF).
                if f.contains(sys::abi::UBLK_F_SUPPORT_ZERO_COPY) {
                    flags |= sys::abi::UBLK_F_SUPPORT_ZERO_COPY;
                }
            }
            _ => {}
        }
        if self.unprivileged {
            flags |= sys::abi::UBLK_F_UNPRIVILEGED_DEV;
        }
        if self.batch_by_default(ctrl.features().map_or(0, |f| f.0)) {
            flags |= sys::abi::UBLK_F_BATCH_IO;
        } else if self.batch_io == Some(true) {
            if !ctrl.features().is_some_and(|f| f.contains(sys::abi::UBLK_F_BATCH_IO)) {
                return Err(Error::Unsupported {
                    feature: "UBLK_F_BATCH_IO",
                    why: format!(
                        "batched commands need Linux 7.0 or later; this kernel is {}: drop batch_io (`--batch`)",
                        crate::ctrl::kernel_release()
                    ),
                });
            }
            flags |= sys::abi::UBLK_F_BATCH_IO;
        }
        let info = DevInfo {
            nr_hw_queues: self.queues,
            queue_depth: self.depth,
            max_io_buf_bytes: self.max_io_bytes,
            dev_id: self.id.unwrap_or(u32::MAX),
            ublksrv_pid: std::process::id() as i32,
            flags,
            ..Default::default()
        };
        let info = ctrl.add_dev(&info)?;
        // From here on, Drop deletes the device whatever happens.
        let mut dev = Device::new(ctrl, info, false, self.serving.clone());
        if self.unprivileged {
            if info.flags & sys::abi::UBLK_F_UNPRIVILEGED_DEV == 0 {
                return Err(Error::InvalidConfig {
                    what: "unprivileged device",
                    why: format!(
                        "the kernel made device {} a privileged device: it clears UBLK_F_UNPRIVILEGED_DEV for a caller with CAP_SYS_ADMIN (uid {}); create unprivileged devices as the user who owns them",
                        info.dev_id,
                        crate::ctrl::caller_ids().0
                    ),
                });
            }
            if let Err(e) = wait_node_access(info.dev_id, NODE_WAIT) {
                // Without access to the node, even its owner cannot delete it.
                dev.deleted = true;
                return Err(e);
            }
            let dropped = self.flags & !info.flags;
            if dropped != 0 {
                return Err(Error::Unsupported {
                    feature: "requested UBLK_F_ flags",
                    why: format!(
                        "the kernel dropped {} at ADD_DEV for unprivileged device {}: this kernel ({}) offers no user recovery to unprivileged devices (ublk_ctrl_add_dev); drop the option (the device was deleted)",
                        crate::ctrl::Features(dropped).names().join(","),
                        info.dev_id,
                        crate::ctrl::kernel_release()
                    ),
                });
            }
        }
        if self.flags & !info.flags != 0 {
            return Err(Error::Unsupported {
                feature: flags_feature(self.flags & !info.flags),
                why: format!(
                    "the kernel ({}) dropped {} at ADD_DEV (too old for it; the device was deleted); use a newer kernel or drop the option",
                    crate::ctrl::kernel_release(),
                    names_since(self.flags & !info.flags)
                ),
            });
        }
        // (Drop deletes the device.)
        TagShare { thread: 0, threads: self.serving.threads_per_queue }.check(&info)?;
        let mut params = Params::new(self.size, self.block_size, info.max_io_buf_bytes)?;
        params.attrs = self.attrs;
        params.discard = self.discard;
        dev.ctrl.set_params(info.dev_id, &params)?;
        dev.params = Some(params);
        dev.char_file = Some(open_char(info.dev_id)?);
        Ok(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DevFlags;

    /// A batch device has no per-I/O daemons: several threads per queue,
    /// or PER_IO_DAEMON asked for, are refused before ADD_DEV, whether
    /// batching is asked for with `batch_io` or as a flag.
    #[test]
    fn batch_refuses_per_io_daemons_before_add_dev() {
        let refused = |b: DeviceBuilder, what: &str| match b.validate() {
            Err(Error::InvalidConfig { why, .. }) => assert!(why.contains("batched commands"), "{what}: {why}"),
            r => panic!("{what}: {r:?}"),
        };
        refused(DeviceBuilder::new().batch_io(true).threads_per_queue(2), "batch_io + 2 threads");
        refused(DeviceBuilder::new().flags(DevFlags::BATCH_IO).threads_per_queue(2), "BATCH_IO + 2 threads");
        refused(DeviceBuilder::new().batch_io(true).flags(DevFlags::PER_IO_DAEMON), "batch_io + PER_IO_DAEMON");
        assert!(DeviceBuilder::new().batch_io(true).validate().is_ok());
        assert!(DeviceBuilder::new().threads_per_queue(2).validate().is_ok());
        match DeviceBuilder::new().batch_io(true).depth(1).validate() {
            Err(Error::InvalidConfig { why, .. }) => assert!(why.contains("batched commands") && why.contains("depth of 2"), "{why}"),
            r => panic!("batch_io + depth 1: {r:?}"),
        }
        assert!(DeviceBuilder::new().depth(1).validate().is_ok());
    }

    /// Batched by default where the kernel has it, unless something the
    /// batch path cannot do is asked for; never when told not to.
    #[test]
    fn batch_is_the_default_only_where_nothing_rules_it_out() {
        let has = sys::abi::UBLK_F_BATCH_IO;
        let b = DeviceBuilder::new;
        assert!(b().batch_by_default(has));
        assert!(!b().batch_by_default(0), "a kernel without BATCH_IO");
        assert!(!b().batch_io(false).batch_by_default(has));
        assert!(!b().batch_io(true).batch_by_default(has), "asked for: checked as such");
        assert!(!b().depth(1).batch_by_default(has));
        assert!(!b().threads_per_queue(2).batch_by_default(has));
        for f in [DevFlags::QUIESCE, DevFlags::PER_IO_DAEMON, DevFlags::NEED_GET_DATA] {
            assert!(!b().flags(DevFlags::USER_RECOVERY | f).batch_by_default(has), "{f:?}");
        }
        assert!(b().flags(DevFlags::USER_RECOVERY).batch_by_default(has), "kill -9 + recover works batched");
        assert!(matches!(b().batch_io(false).flags(DevFlags::BATCH_IO).validate(), Err(Error::InvalidConfig { .. })));
    }
}

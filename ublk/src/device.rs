//! A device's whole life: ADD_DEV, SET_PARAMS, one thread per queue, FETCH,
//! START_DEV, serve, STOP_DEV, DEL_DEV; and teardown on every path out.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ublk_sys as sys;

use crate::aio::AsyncTarget;
use crate::buffers::IoBufs;
use crate::ctrl::{Control, DevInfo};
use crate::error::{Error, Result};
use crate::params::{validate_block_size, Discard, Params};
use crate::placement::{self, Follower, Placement, Plan};
use crate::queue::{EventFd, Queue, QueueStats};
use crate::target::{Target, WriteCache};

/// How long a stopping device waits, by default, for its target to finish
/// the requests in flight before their operations are cancelled and they
/// fail ([`DeviceBuilder::stop_grace`]).
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// The largest queue depth the kernel takes (`UBLK_MAX_QUEUE_DEPTH`).
pub const MAX_QUEUE_DEPTH: u16 = sys::UBLK_MAX_QUEUE_DEPTH as u16;

/// How request data travels between the block layer and the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataPath {
    /// The kernel copies each request's data into (writes) or out of (reads)
    /// a per-tag buffer that the queue allocates, at FETCH/COMMIT time.
    /// Every kernel, every target.
    #[default]
    Copy,
    /// No data moves at all, for a target that never looks at it (a null
    /// target; see [`Target::needs_data`]). Where the kernel offers
    /// `UBLK_F_USER_COPY` (6.5+) the device is created with it: the kernel
    /// then copies nothing at commit, FETCH and COMMIT carry buffer address 0
    /// (the kernel requires 0 under USER_COPY) and the queue allocates no
    /// buffers. On older kernels this falls back to [`DataPath::Copy`];
    /// [`Device::data_path`] says which one the device got.
    NoData,
    /// `UBLK_F_USER_COPY` (6.5+): the kernel copies nothing at FETCH or
    /// COMMIT; the server moves each request's data itself with
    /// `pread`/`pwrite` on `/dev/ublkcN` at the request's offset
    /// ([`user_copy_offset`](crate::queue::user_copy_offset)). A target
    /// that [needs data](crate::Target::needs_data) gets it in per-tag
    /// buffers as with [`DataPath::Copy`] (the queue does the copies); one
    /// that does not gets no buffers and may do its own copies (an
    /// [async target](crate::aio) with [`Io::char_dev`](crate::aio::Io::char_dev)).
    /// Refused on kernels without it.
    UserCopy,
    /// Zero copy with `UBLK_F_SUPPORT_ZERO_COPY` (6.15+): no byte is copied.
    /// The queue registers each READ/WRITE request's own pages in its ring
    /// as a fixed buffer (`UBLK_U_IO_REGISTER_IO_BUF`) before the target's
    /// operations, and unregisters them at the commit; the target's
    /// [`Io::read_at`](crate::aio::Io::read_at) and
    /// [`Io::write_at`](crate::aio::Io::write_at) become READ_FIXED and
    /// WRITE_FIXED on them. Only for [async targets that move data only
    /// that way](crate::aio::AsyncTarget::zero_copy) (or need none);
    /// refused on kernels without it.
    ZeroCopy,
    /// Zero copy with `UBLK_F_AUTO_BUF_REG` (6.16+): as [`DataPath::ZeroCopy`],
    /// but the kernel registers each request's pages itself before
    /// delivering it (at the index the FETCH/COMMIT names) and unregisters
    /// them at the commit: no command per request. A request whose
    /// automatic registration fails is delivered anyway
    /// (`UBLK_AUTO_BUF_REG_FALLBACK`) and the queue registers it itself.
    AutoBufReg,
}

impl DataPath {
    /// The name used on the command line: `copy`, `user-copy`, `none`,
    /// `zero-copy`, `auto-buf-reg`.
    pub fn name(self) -> &'static str {
        match self {
            DataPath::Copy => "copy",
            DataPath::UserCopy => "user-copy",
            DataPath::NoData => "none",
            DataPath::ZeroCopy => "zero-copy",
            DataPath::AutoBufReg => "auto-buf-reg",
        }
    }

    /// Whether the request's pages stay in the kernel, reached by the
    /// target's operations as a fixed buffer of the queue's ring.
    pub fn is_zero_copy(self) -> bool {
        matches!(self, DataPath::ZeroCopy | DataPath::AutoBufReg)
    }

    /// The fastest data path the running kernel offers for a target:
    /// [`DataPath::AutoBufReg`], else [`DataPath::ZeroCopy`], else
    /// [`DataPath::UserCopy`], else [`DataPath::Copy`] for a target that
    /// moves data only with `read_at`/`write_at`
    /// ([`AsyncTarget::zero_copy`]);
    /// [`DataPath::Copy`] for any other target, and [`DataPath::NoData`]
    /// for one that needs no data. `features` is what the kernel offers
    /// ([`Control::features`](crate::Control::features); `None` before 6.5).
    pub fn best(features: Option<crate::ctrl::Features>, needs_data: bool, zero_copy: bool) -> DataPath {
        let has = |f: u64| features.is_some_and(|x| x.contains(f));
        if !needs_data {
            DataPath::NoData
        } else if !zero_copy {
            DataPath::Copy
        } else if has(sys::abi::UBLK_F_AUTO_BUF_REG) {
            DataPath::AutoBufReg
        } else if has(sys::abi::UBLK_F_SUPPORT_ZERO_COPY) {
            DataPath::ZeroCopy
        } else if has(sys::abi::UBLK_F_USER_COPY) {
            DataPath::UserCopy
        } else {
            DataPath::Copy
        }
    }
}

impl std::str::FromStr for DataPath {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "copy" => Ok(DataPath::Copy),
            "user-copy" => Ok(DataPath::UserCopy),
            "none" => Ok(DataPath::NoData),
            "zero-copy" => Ok(DataPath::ZeroCopy),
            "auto-buf-reg" => Ok(DataPath::AutoBufReg),
            _ => Err(format!("unknown data path {s:?}: use copy, user-copy, zero-copy, auto-buf-reg or none")),
        }
    }
}

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
    data_path: DataPath,
    unprivileged: bool,
    batch_io: bool,
    serving: Serving,
}

/// How long [`DeviceBuilder::create`] waits, for an unprivileged device, until
/// the udev rule has given `/dev/ublkcN` to its owner (the kernel creates it
/// root-owned, mode 0600).
pub const NODE_WAIT: Duration = Duration::from_secs(10);

/// How this process serves a device: settings the kernel does not keep,
/// which a [`Device`] takes from its builder, whether created or recovered.
#[derive(Debug, Clone)]
struct Serving {
    placement: Placement,
    busy_poll: Duration,
    io_scheduler: Option<String>,
    stop_grace: Duration,
    data_path: DataPath,
    /// Test hook, see [`DeviceBuilder::occupy_auto_buf_indexes`].
    occupy_every: u16,
}

impl Default for Serving {
    fn default() -> Self {
        Serving {
            placement: Placement::Auto,
            busy_poll: crate::queue::DEFAULT_BUSY_POLL,
            io_scheduler: None,
            stop_grace: STOP_GRACE,
            data_path: DataPath::Copy,
            occupy_every: 0,
        }
    }
}

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
            data_path: DataPath::Copy,
            unprivileged: false,
            batch_io: false,
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
    /// How long a stop waits for the target to finish the requests in flight
    /// before their io_uring operations are cancelled and the requests fail
    /// (default [`STOP_GRACE`]).
    pub fn stop_grace(mut self, d: Duration) -> Self {
        self.serving.stop_grace = d;
        self
    }
    /// How request data moves (default [`DataPath::Copy`]).
    pub fn data_path(mut self, d: DataPath) -> Self {
        self.data_path = d;
        self.serving.data_path = d;
        self
    }
    /// Batched commands (`UBLK_F_BATCH_IO`, Linux 7.0+): each queue sends
    /// one PREP_IO_CMDS for all its tags, keeps one multishot
    /// FETCH_IO_CMDS armed (each completion delivers up to 128 requests)
    /// and commits all the answers of a turn with one COMMIT_IO_CMDS,
    /// instead of one command and one completion per request. Works with
    /// every [`DataPath`]. Refused on kernels without it.
    pub fn batch_io(mut self, on: bool) -> Self {
        self.batch_io = on;
        self
    }
    /// Test hook for [`DataPath::AutoBufReg`]'s fallback: each queue puts a
    /// page of its own at the fixed-buffer index of every `every`th tag, so
    /// that the kernel cannot register those tags' requests itself and the
    /// queue must (counted in [`QueueStats::buf_regs`]). Not for production.
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
        let user_copy = ctrl.features().is_some_and(|f| f.contains(sys::abi::UBLK_F_USER_COPY));
        match self.data_path {
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
        if self.batch_io {
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
        let mut params = Params::new(self.size, self.block_size, info.max_io_buf_bytes)?;
        params.attrs = self.attrs;
        params.discard = self.discard;
        dev.ctrl.set_params(info.dev_id, &params)?;
        dev.params = Some(params);
        dev.char_file = Some(open_char(info.dev_id)?);
        Ok(dev)
    }

    /// Takes over an existing device whose server died, with user recovery
    /// (`UBLK_F_USER_RECOVERY`): waits (up to `wait`) for the kernel to
    /// quiesce it, then START_USER_RECOVERY and opens `/dev/ublkcN`.
    /// [`Device::serve`] then fetches every tag and sends END_USER_RECOVERY
    /// instead of START_DEV; I/O queued meanwhile resumes.
    ///
    /// What the kernel keeps (queues, depth, flags, size, block sizes,
    /// attributes, discard limits) comes from the kernel; what only this
    /// process knows (placement, busy polling, I/O scheduler) comes from this
    /// builder, so give it the settings the device was created with. The
    /// builder's geometry and flags are not used.
    pub fn recover(self, dev_id: u32, wait: Duration) -> Result<Device> {
        let mut ctrl = Control::open()?;
        let info = ctrl.get_dev_info(dev_id)?;
        // A device made elsewhere may use a protocol this library does not speak.
        check_device_flags(info.flags)?;
        let recovery = sys::UBLK_F_USER_RECOVERY;
        if info.flags & recovery == 0 && info.flags & sys::abi::UBLK_F_UNPRIVILEGED_DEV != 0 {
            return Err(Error::InvalidConfig {
                what: "recover",
                why: format!(
                    "device {dev_id} is an unprivileged device, and the kernel ({}) gives those no user recovery (ublk_ctrl_add_dev drops UBLK_F_USER_RECOVERY): its owner can only delete it (DEL_DEV) and create it again",
                    crate::ctrl::kernel_release()
                ),
            });
        }
        if info.flags & recovery == 0 {
            return Err(Error::InvalidConfig {
                what: "recover",
                why: format!("device {dev_id} was created without user recovery (UBLK_F_USER_RECOVERY); only its deletion is possible"),
            });
        }
        let quiesced = |s: u16| u32::from(s) == sys::UBLK_S_DEV_QUIESCED || u32::from(s) == sys::abi::UBLK_S_DEV_FAIL_IO;
        let t0 = Instant::now();
        let mut info = info;
        while !quiesced(info.state) {
            // A killed server that its parent has not reaped yet is a zombie:
            // /proc/PID still exists but the server is gone (its state is Z).
            let alive = info.ublksrv_pid > 0 && pid_running(info.ublksrv_pid);
            if alive || t0.elapsed() > wait {
                return Err(Error::InvalidConfig {
                    what: "recover",
                    why: format!(
                        "device {dev_id} is {} with its server (pid {}) {}; recovery takes over only a device whose server died",
                        crate::ctrl::state_name(info.state),
                        info.ublksrv_pid,
                        if alive { "still running" } else { "gone but the kernel has not quiesced it yet" }
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
            info = ctrl.get_dev_info(dev_id)?;
        }
        // START_USER_RECOVERY needs /dev/ublkcN released by the dead server;
        // the kernel may still be tearing its rings down: retry on -EBUSY.
        loop {
            match ctrl.start_user_recovery(dev_id) {
                Ok(()) => break,
                Err(Error::Kernel { errno: libc::EBUSY, .. }) if t0.elapsed() < wait => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => return Err(e),
            }
        }
        let info = ctrl.get_dev_info(dev_id)?;
        let params = ctrl.get_params(dev_id)?;
        let mut dev = Device::new(ctrl, info, true, self.serving);
        dev.params = Some(Params::from_raw(&params));
        dev.char_file = Some(open_char(dev_id)?);
        Ok(dev)
    }
}

/// What an unprivileged device needs before ADD_DEV: a kernel that has them
/// (6.3+), and no flag the kernel refuses for them.
fn check_unprivileged(ctrl: &Control, flags: u64) -> Result<()> {
    if !ctrl.kernel_has_unprivileged() {
        return Err(Error::Unsupported {
            feature: "UBLK_F_UNPRIVILEGED_DEV",
            why: format!(
                "unprivileged devices need Linux 6.3 or later; this kernel is {}: create the device as root (without unprivileged), or upgrade the kernel",
                crate::ctrl::kernel_release()
            ),
        });
    }
    if flags & sys::abi::UBLK_F_USER_COPY != 0 {
        return Err(Error::InvalidConfig {
            what: "flags",
            why: "UBLK_F_USER_COPY is refused by the kernel for unprivileged devices (ADD_DEV: -EINVAL; a user-copy server reaches request pages through /dev/ublkcN); drop it (DataPath::NoData falls back to copying)".into(),
        });
    }
    Ok(())
}

/// Waits (up to `wait`) until this process may read and write
/// `/dev/ublkcN`, which the udev rule gives to the device's owner; every
/// control command of an unprivileged device needs that access.
fn wait_node_access(dev_id: u32, wait: Duration) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let path = format!("/dev/ublkc{dev_id}");
    let cpath = std::ffi::CString::new(path.clone()).expect("no NUL in the path");
    let t0 = Instant::now();
    loop {
        // SAFETY: a NUL-terminated path that lives across the call.
        if unsafe { libc::faccessat(libc::AT_FDCWD, cpath.as_ptr(), libc::R_OK | libc::W_OK, libc::AT_EACCESS) } == 0 {
            return Ok(());
        }
        if t0.elapsed() > wait {
            let (uid, gid) = crate::ctrl::caller_ids();
            let node = match std::fs::metadata(&path) {
                Ok(m) => format!("mode {:04o}, owner uid {} gid {}", m.mode() & 0o7777, m.uid(), m.gid()),
                Err(e) => e.to_string(),
            };
            return Err(Error::Access {
                what: format!(
                    "{path} ({node}) is still not readable and writable by uid {uid} gid {gid} {} s after ADD_DEV created unprivileged device {dev_id}",
                    wait.as_secs()
                ),
                fix: format!(
                    "the kernel creates the node root-owned; a udev rule must give it to the device's owner (docs/unprivileged.md: `ublk udev-owner`). Until it does, nobody but root can use or delete device {dev_id}: `ublk del -n {dev_id}` as root"
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Refuses every requested flag the library does not implement
/// ([`DevFlags::library_support`](crate::DevFlags::library_support)): a flag
/// passed through unimplemented changes the protocol under the queues (e.g.
/// with `NEED_GET_DATA` the device goes live and fails its first write).
fn check_flags(flags: u64) -> Result<()> {
    check_flags_in(flags, crate::SUPPORTED_FLAGS)
}

/// Refuses a device made elsewhere whose flags the library cannot serve
/// (those the kernel adds by itself are served as they are).
fn check_device_flags(flags: u64) -> Result<()> {
    check_flags_in(flags, crate::SUPPORTED_FLAGS.union(crate::flags::KERNEL_ADDED_FLAGS))
}

/// Refuses the combinations of implemented flags that the kernel refuses
/// (ADD_DEV: -EINVAL from 6.13 on, for QUIESCE from 6.16) or would take in
/// some other sense on older kernels, each with what to ask for instead.
fn check_flag_combinations(flags: u64) -> Result<()> {
    let has = |f: u64| flags & f != 0;
    let recovery = has(sys::abi::UBLK_F_USER_RECOVERY);
    let why = if has(sys::abi::UBLK_F_USER_RECOVERY_REISSUE) && has(sys::abi::UBLK_F_USER_RECOVERY_FAIL_IO) {
        "UBLK_F_USER_RECOVERY_REISSUE (re-issue the I/O in flight to the next server) and UBLK_F_USER_RECOVERY_FAIL_IO (fail I/O while there is no server) exclude each other: ask for one"
    } else if !recovery && (has(sys::abi::UBLK_F_USER_RECOVERY_REISSUE) || has(sys::abi::UBLK_F_USER_RECOVERY_FAIL_IO)) {
        "UBLK_F_USER_RECOVERY_REISSUE and UBLK_F_USER_RECOVERY_FAIL_IO are modes of user recovery: ask for UBLK_F_USER_RECOVERY with them"
    } else if !recovery && has(sys::abi::UBLK_F_QUIESCE) {
        "UBLK_F_QUIESCE lets another server take the device over, which needs UBLK_F_USER_RECOVERY (the kernel refuses it alone): ask for both"
    } else {
        return Ok(());
    };
    Err(Error::InvalidConfig { what: "flags", why: why.into() })
}

/// The flag's kernel name when `bits` is one known flag, for
/// `Error::Unsupported::feature`; else a description of several.
fn flags_feature(bits: u64) -> &'static str {
    match sys::abi::flag_name(bits) {
        Some(n) => n,
        None => "requested UBLK_F_ flags",
    }
}

/// Each flag of `bits` by name, with the first kernel that has it.
fn names_since(bits: u64) -> String {
    let mut v = Vec::new();
    for bit in 0..64 {
        let f = crate::DevFlags::from_bits_retain(1u64 << bit);
        if bits & f.bits() == 0 {
            continue;
        }
        let name = crate::ctrl::Features(f.bits()).names().join(",");
        v.push(match f.since() {
            Some((a, b)) => format!("{name} (Linux {a}.{b}+)"),
            None => name,
        });
    }
    v.join(", ")
}

fn check_flags_in(flags: u64, allowed: crate::DevFlags) -> Result<()> {
    for bit in 0..64 {
        let f = 1u64 << bit;
        if flags & f == 0 || allowed.bits() & f != 0 {
            continue;
        }
        let flag = crate::DevFlags::from_bits_retain(f);
        let name = sys::abi::flag_name(f).or_else(|| sys::HEADER_FLAGS.iter().find(|(_, v)| *v == f).map(|(n, _)| *n));
        match (name, flag.library_support()) {
            (Some(n), crate::flags::Support::No(why)) | (Some(n), crate::flags::Support::InProgress(why)) => {
                return Err(Error::FlagNotImplemented {
                    flag: n,
                    bit,
                    since: flag.since(),
                    why,
                    in_progress: matches!(flag.library_support(), crate::flags::Support::InProgress(_)),
                });
            }
            // Implemented, but not for a device made elsewhere: cannot
            // happen (`allowed` holds every implemented flag).
            (Some(_), crate::flags::Support::Yes) => {}
            (None, _) => {
                return Err(Error::Unsupported {
                    feature: "requested UBLK_F_ flags",
                    why: format!("bit {bit} ({f:#x}) is no UBLK_F_ flag this library knows (it knows every flag up to Linux 7.3); drop it"),
                })
            }
        }
    }
    Ok(())
}

fn open_char(dev_id: u32) -> Result<File> {
    let path = format!("/dev/ublkc{dev_id}");
    let t0 = Instant::now();
    loop {
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => return Ok(f),
            // devtmpfs/udev may take a moment to create the node.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && t0.elapsed() < Duration::from_secs(3) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(Error::NotPermitted { what: format!("opening {path}") })
            }
            Err(e) => return Err(Error::os(format!("opening {path}"), e)),
        }
    }
}

/// Messages from queue threads and stop handles to the serving thread.
enum Event {
    Fetched,
    /// A queue's target panicked; the queue fails its I/O until stopped.
    Panicked(u16),
    Failed(Error),
    Exited(u16, Result<QueueStats>),
    Stop,
}

/// Asks a serving device to stop; cloneable and sendable to any thread.
#[derive(Debug, Clone)]
pub struct StopHandle(mpsc::Sender<Event>);

impl StopHandle {
    /// Requests STOP_DEV and teardown; [`Device::serve`] then returns.
    pub fn stop(&self) {
        let _ = self.0.send(Event::Stop);
    }
}

/// A created device. Dropped, it stops (if started) and deletes itself.
#[derive(Debug)]
pub struct Device {
    ctrl: Control,
    info: DevInfo,
    params: Option<Params>,
    char_file: Option<File>,
    deleted: bool,
    recovering: bool,
    serving: Serving,
}

/// What a device's queue threads serve: a [`Target`] or an [`AsyncTarget`].
trait Serve: Sync {
    fn needs_data(&self) -> bool;
    fn zero_copy(&self) -> bool;
    fn write_cache(&self) -> WriteCache;
    fn files(&self) -> Vec<std::os::fd::RawFd>;
    fn run(&self, q: &mut Queue, on_panic: &dyn Fn()) -> Result<QueueStats>;
}

struct Sync_<'a, T>(&'a T);
struct Async_<'a, T>(&'a T);

impl<T: Target> Serve for Sync_<'_, T> {
    fn needs_data(&self) -> bool {
        self.0.needs_data()
    }
    fn zero_copy(&self) -> bool {
        false
    }
    fn write_cache(&self) -> WriteCache {
        self.0.write_cache()
    }
    fn files(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }
    fn run(&self, q: &mut Queue, on_panic: &dyn Fn()) -> Result<QueueStats> {
        q.serve_notify(self.0, on_panic)
    }
}

impl<T: AsyncTarget> Serve for Async_<'_, T> {
    fn needs_data(&self) -> bool {
        self.0.needs_data()
    }
    fn zero_copy(&self) -> bool {
        self.0.zero_copy()
    }
    fn write_cache(&self) -> WriteCache {
        self.0.write_cache()
    }
    fn files(&self) -> Vec<std::os::fd::RawFd> {
        self.0.files().iter().map(|f| f.as_raw_fd()).collect()
    }
    fn run(&self, q: &mut Queue, on_panic: &dyn Fn()) -> Result<QueueStats> {
        q.serve_async_notify(self.0, on_panic)
    }
}

/// What [`Device::serve`] learns while the device runs.
struct Live {
    /// The kernel quiesced the device (QUIESCE_DEV) for another server to
    /// recover: it is left as it is.
    quiesced: bool,
    /// A [`StopHandle`] asked for the stop.
    stop_requested: bool,
    /// Still taking over a device (END_USER_RECOVERY not done).
    recovering: bool,
    /// A panic of `on_live`, resumed after teardown.
    panic: Option<Box<dyn std::any::Any + Send>>,
}

/// Sends `Exited` when a queue thread ends, even by panic.
struct ExitGuard {
    tx: mpsc::Sender<Event>,
    q_id: u16,
    sent: bool,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        if !self.sent {
            let why = if std::thread::panicking() { "the queue thread panicked" } else { "the queue thread ended" };
            let _ = self.tx.send(Event::Exited(self.q_id, Err(Error::Queue { q_id: self.q_id, why: why.into() })));
        }
    }
}

impl Device {
    /// A device just added (or taken over): its char device not open yet.
    fn new(ctrl: Control, info: DevInfo, recovering: bool, serving: Serving) -> Device {
        Device { ctrl, info, params: None, char_file: None, deleted: false, recovering, serving }
    }

    /// Takes over an existing device whose server died, with the default
    /// placement and busy polling: [`DeviceBuilder::recover`] with
    /// [`DeviceBuilder::new`]. A server that was created with other settings
    /// should recover through its own builder, so the device keeps them.
    pub fn recover(dev_id: u32, wait: Duration) -> Result<Device> {
        DeviceBuilder::new().recover(dev_id, wait)
    }

    /// Each queue thread's placement plan, from GET_QUEUE_AFFINITY.
    fn queue_plans(&mut self) -> Vec<Plan> {
        let nq = self.info.nr_hw_queues;
        if self.serving.placement == Placement::Unpinned {
            return vec![Plan::default(); usize::from(nq)];
        }
        let online = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let id = self.info.dev_id;
        let home: Vec<Vec<usize>> = (0..nq).map(|q| self.ctrl.get_queue_affinity(id, q).unwrap_or_default()).collect();
        placement::plans(self.serving.placement, &home, online)
    }

    /// Detaches from the device without stopping or deleting it (for a
    /// server that exits and leaves recovery to another process).
    pub fn leak(mut self) {
        self.deleted = true;
    }

    /// The kernel's device id (N in `/dev/ublkbN`).
    pub fn id(&self) -> u32 {
        self.info.dev_id
    }
    /// Device info as ADD_DEV returned it (queues clamped to the CPU count,
    /// negotiated flags).
    pub fn info(&self) -> &DevInfo {
        &self.info
    }
    /// The parameters set with SET_PARAMS.
    pub fn params(&self) -> Option<&Params> {
        self.params.as_ref()
    }
    /// The control device, for queries while the device exists.
    pub fn control(&mut self) -> &mut Control {
        &mut self.ctrl
    }
    /// The data path the device got: [`DataPath::AutoBufReg`] or
    /// [`DataPath::ZeroCopy`] if it was created with `UBLK_F_AUTO_BUF_REG`
    /// or `UBLK_F_SUPPORT_ZERO_COPY`; else [`DataPath::Copy`] unless it was
    /// created with `UBLK_F_USER_COPY`, then [`DataPath::NoData`] if that
    /// was asked for, else [`DataPath::UserCopy`].
    pub fn data_path(&self) -> DataPath {
        if self.info.flags & sys::abi::UBLK_F_AUTO_BUF_REG != 0 {
            DataPath::AutoBufReg
        } else if self.info.flags & sys::abi::UBLK_F_SUPPORT_ZERO_COPY != 0 {
            DataPath::ZeroCopy
        } else if !crate::queue::user_copy(&self.info) {
            DataPath::Copy
        } else if self.serving.data_path == DataPath::NoData {
            DataPath::NoData
        } else {
            DataPath::UserCopy
        }
    }
    /// The opcode encoding in use (chosen from the kernel's GET_FEATURES).
    pub fn encoding(&self) -> crate::Encoding {
        self.ctrl.encoding()
    }
    /// `/dev/ublkbN`.
    pub fn block_path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/ublkb{}", self.info.dev_id))
    }
    /// `/dev/ublkcN`.
    pub fn char_path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/ublkc{}", self.info.dev_id))
    }

    /// Serves the device with `target` until stopped: spawns one thread per
    /// queue (each creates its [`Queue`], fetches every tag and serves),
    /// waits until all have fetched, START_DEV, runs `on_live` (the block
    /// device exists from then on) with a [`StopHandle`] on a thread of its
    /// own, and serves until that handle is used or a queue fails. Then
    /// STOP_DEV, joins the threads, closes `/dev/ublkcN` and DEL_DEV. Returns
    /// each queue's counts.
    ///
    /// Stopping waits up to [`DeviceBuilder::stop_grace`] for the target to finish the
    /// requests in flight; then its io_uring operations are cancelled and
    /// what is left fails with an error.
    ///
    /// Teardown does not wait for `on_live`: if a queue dies while `on_live`
    /// is still running (say, doing I/O to the disk, which then can never
    /// complete), the device is stopped, which fails that I/O. `serve`
    /// returns once `on_live` has returned too; a panic in `on_live` stops
    /// the device and is resumed after teardown.
    ///
    /// Before START_DEV the device's parameters get the target's
    /// [`WriteCache`] attributes, so FLUSH and FUA reach
    /// the target when it needs them. A device with `UBLK_F_USER_COPY`
    /// ([`DataPath::NoData`]) has no buffers: a target that [needs
    /// data](Target::needs_data) is refused.
    pub fn serve<T: Target>(self, target: &T, on_live: impl FnOnce(&Device, StopHandle) + Send) -> Result<Vec<QueueStats>> {
        self.serve_with(&Sync_(target), on_live)
    }

    /// [`Device::serve`] with an [`AsyncTarget`]: each queue thread makes
    /// the target's object for its queue and runs every request as a future
    /// on that thread (see [`crate::aio`]).
    pub fn serve_async<T: AsyncTarget>(self, target: &T, on_live: impl FnOnce(&Device, StopHandle) + Send) -> Result<Vec<QueueStats>> {
        self.serve_with(&Async_(target), on_live)
    }

    fn serve_with<T: Serve>(mut self, target: &T, on_live: impl FnOnce(&Device, StopHandle) + Send) -> Result<Vec<QueueStats>> {
        if self.data_path() == DataPath::NoData && target.needs_data() {
            return Err(Error::InvalidConfig {
                what: "data path",
                why: "the device was created with UBLK_F_USER_COPY (DataPath::NoData), so the kernel hands the server no data, but this target reads or writes request data; create the device with DataPath::Copy or DataPath::UserCopy".into(),
            });
        }
        if self.data_path().is_zero_copy() && target.needs_data() && !target.zero_copy() {
            return Err(Error::InvalidConfig {
                what: "data path",
                why: format!("the device was created for zero copy ({}): request data stays in the kernel, reached only by an async target's Io::read_at/write_at, but this target reads or writes request data itself; create the device with DataPath::Copy or DataPath::UserCopy", self.data_path().name()),
            });
        }
        self.apply_write_cache(target.write_cache())?;
        let (tx, rx) = mpsc::channel::<Event>();
        let wake = EventFd::new()?;
        let nq = self.info.nr_hw_queues;
        let info = self.info;
        let encoding = self.ctrl.encoding();
        let wake_fd = wake.raw();
        let plans = self.queue_plans();
        let served = placement::counters(nq);
        let busy_poll = self.serving.busy_poll;
        let stop_grace = self.serving.stop_grace;
        let occupy_every = self.serving.occupy_every;
        // The tags' buffers live here, not in the queue threads: after a
        // queue dies, the others' parked FETCHes may still name their
        // buffers until the device is deleted.
        let mut bufs = Vec::new();
        for q in 0..nq {
            let zero_copy = info.flags & (sys::abi::UBLK_F_AUTO_BUF_REG | sys::abi::UBLK_F_SUPPORT_ZERO_COPY) != 0;
            bufs.push(if zero_copy || (crate::queue::user_copy(&info) && !target.needs_data()) {
                None
            } else {
                Some(Arc::new(IoBufs::new(info.max_io_buf_bytes, info.queue_depth, q)?))
            });
        }
        // Teardown has a control handle of its own, and the char device is
        // held here: `on_live` borrows the device meanwhile.
        let mut teardown = Control::open()?;
        teardown.remember(&info);
        let mut char_file = self.char_file.take();
        let char_fd = char_file.as_ref().expect("char device open").as_raw_fd();
        let mut live = Live { quiesced: false, stop_requested: false, recovering: self.recovering, panic: None };

        let result = std::thread::scope(|s| {
            let this: &Device = &self;
            let mut handles = Vec::new();
            for q in 0..nq {
                let qtx = tx.clone();
                let plan = plans.get(usize::from(q)).cloned().unwrap_or_default();
                let follower = Follower::new(q, &plan, served.clone());
                let qbufs = bufs[usize::from(q)].clone();
                let spawned = std::thread::Builder::new().name(format!("ublk{}-q{q}", info.dev_id)).spawn_scoped(s, move || {
                    let tx = qtx;
                    placement::pin_to(&plan.start);
                    let mut guard = ExitGuard { tx: tx.clone(), q_id: q, sent: false };
                    let files = target.files();
                    let mut queue = match Queue::with_bufs(char_fd, &info, q, encoding, Some(wake_fd), &files, qbufs, true) {
                        Ok(queue) => queue,
                        Err(e) => {
                            guard.sent = true;
                            let _ = tx.send(Event::Failed(e));
                            return;
                        }
                    };
                    queue.set_busy_poll(busy_poll);
                    queue.set_follower(follower);
                    if let Err(e) = queue.occupy_auto_indexes(occupy_every) {
                        guard.sent = true;
                        let _ = tx.send(Event::Failed(e));
                        return;
                    }
                    if let Err(e) = queue.fetch_all() {
                        guard.sent = true;
                        let _ = tx.send(Event::Failed(e));
                        return;
                    }
                    let _ = tx.send(Event::Fetched);
                    let ptx = tx.clone();
                    let r = target.run(&mut queue, &|| {
                        let _ = ptx.send(Event::Panicked(q));
                    });
                    drop(queue); // close the ring before saying so
                    guard.sent = true;
                    let _ = tx.send(Event::Exited(q, r));
                });
                match spawned {
                    Ok(h) => handles.push(h),
                    Err(e) => {
                        let _ = tx.send(Event::Failed(Error::os("spawning a queue thread", e)));
                        break;
                    }
                }
            }
            let spawned = handles.len() as u16;
            let mut stats: Vec<QueueStats> = (0..nq).map(|q| QueueStats { q_id: q, ..Default::default() }).collect();
            let mut failed = false;
            let mut on_live_thread = None;
            let mut outcome = this.run_until_stop(s, &rx, &tx, spawned, &mut stats, &mut failed, &mut live, on_live, &mut on_live_thread);

            // Teardown. With every queue healthy: STOP_DEV first; it waits for
            // in-flight requests (the queues still serve them), then completes
            // the parked FETCHes with ABORT; the eventfd wakes any queue still
            // waiting. When a queue died, a request it owned can only be
            // failed by the kernel once /dev/ublkcN is released (7.x aborts in
            // its release path), and STOP_DEV, or a START_DEV stuck in the
            // partition scan, would wait for it forever: so first end every
            // queue and close the char device, then STOP_DEV. A recovery that
            // did not complete leaves the device quiesced for another attempt.
            // Every queue ended by itself (all its tags aborted) without a
            // stop request: another process stopped the device (it turns
            // DEAD), or quiesced it (QUIESCE_DEV, on a device made with
            // UBLK_F_QUIESCE) for another server to take over. The kernel
            // makes a quiesced device QUIESCED only once its server has
            // released /dev/ublkcN, so until then it still reads LIVE.
            if !failed && !live.recovering && outcome.is_ok() && !live.stop_requested {
                let t0 = Instant::now();
                loop {
                    let state = teardown.get_dev_info(info.dev_id).map(|i| u32::from(i.state)).unwrap_or(sys::UBLK_S_DEV_DEAD);
                    if state != sys::UBLK_S_DEV_LIVE || t0.elapsed() > Duration::from_secs(1) {
                        let can_quiesce = info.flags & sys::abi::UBLK_F_QUIESCE != 0;
                        live.quiesced = state == sys::UBLK_S_DEV_QUIESCED || (state == sys::UBLK_S_DEV_LIVE && can_quiesce);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            if !failed && !live.recovering && !live.quiesced {
                // STOP_DEV waits for the requests in flight; a target
                // operation that never completes (a read from a peer that is
                // gone) would hold it forever. After the grace period the queues
                // are woken: they cancel their operations and fail what they
                // hold, and STOP_DEV completes.
                let t0 = Instant::now();
                let mut woken = false;
                let _ = teardown.stop_dev_watching(info.dev_id, || {
                    if !woken && t0.elapsed() > stop_grace {
                        wake.signal();
                        woken = true;
                    }
                });
            }
            wake.signal();
            for (q, h) in handles.into_iter().enumerate() {
                if h.join().is_err() && outcome.is_ok() {
                    outcome = Err(Error::Queue { q_id: q as u16, why: "the queue thread panicked".into() });
                }
            }
            if failed {
                char_file = None;
                if !live.recovering {
                    let _ = teardown.stop_dev(info.dev_id);
                }
            }
            // The disk is gone: whatever `on_live` was doing with it fails.
            if let Some(h) = on_live_thread {
                if let Ok(Err(payload)) | Err(payload) = h.join() {
                    live.panic = Some(payload);
                }
            }
            while let Ok(ev) = rx.try_recv() {
                if let Err(e) = record(ev, &mut stats, &mut failed) {
                    if outcome.is_ok() {
                        outcome = Err(e);
                    }
                }
            }
            outcome.map(|()| stats)
        });
        // Threads are joined, their rings closed: close our fd, delete.
        self.char_file = char_file;
        // A device quiesced for an upgrade is left for the next server, like
        // one whose recovery did not complete.
        self.recovering = live.recovering || live.quiesced;
        let del = self.delete();
        if del.is_err() || self.recovering {
            // DEL_DEV did not confirm that every ring naming these buffers is
            // gone (or the device stays, quiesced): never unmap memory the
            // kernel may still write.
            std::mem::forget(bufs);
        }
        if let Some(p) = live.panic {
            std::panic::resume_unwind(p);
        }
        let stats = result?;
        del?;
        Ok(stats)
    }

    /// Gives the device's parameters the attributes of the target's write
    /// cache before the device starts; a recovered device must already have
    /// them (its parameters cannot change).
    fn apply_write_cache(&mut self, cache: WriteCache) -> Result<()> {
        let Some(mut params) = self.params else { return Ok(()) };
        let want = cache.attrs().bits();
        if params.attrs & want == want {
            return Ok(());
        }
        if self.recovering {
            return Err(Error::InvalidConfig {
                what: "write cache",
                why: format!(
                    "device {} was created without the volatile write cache attributes ({:#x}) that this target needs (its writes are durable only after a FLUSH, which the kernel would never send); serve it with a target whose writes are durable when answered, or delete and create it again",
                    self.info.dev_id, want
                ),
            });
        }
        params.attrs |= want;
        self.ctrl.set_params(self.info.dev_id, &params)?;
        self.params = Some(params);
        Ok(())
    }

    /// Writes `name` to `/sys/block/ublkbN/queue/scheduler` and checks that
    /// the kernel took it.
    fn set_io_scheduler(&self, name: &str) -> Result<()> {
        let path = format!("/sys/block/ublkb{}/queue/scheduler", self.info.dev_id);
        let offered = || std::fs::read_to_string(&path).unwrap_or_default().trim().to_string();
        match std::fs::write(&path, name) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(Error::NotPermitted { what: format!("setting the I/O scheduler in {path}") })
            }
            Err(e) => {
                return Err(Error::InvalidConfig {
                    what: "io scheduler",
                    why: format!("the kernel refused {name:?} for {path} ({e}); it offers: {}", offered()),
                })
            }
        }
        let now = offered();
        if !now.contains(&format!("[{name}]")) {
            return Err(Error::InvalidConfig { what: "io scheduler", why: format!("{path} reads {now:?} after writing {name:?}") });
        }
        Ok(())
    }

    /// Waits for every queue to fetch, starts (or ends the recovery of) the
    /// device, starts `on_live` on its own thread and returns at the first
    /// event after that: a stop request or a queue's end.
    #[allow(clippy::too_many_arguments)]
    fn run_until_stop<'scope, 'env>(
        &'env self,
        s: &'scope std::thread::Scope<'scope, 'env>,
        rx: &mpsc::Receiver<Event>,
        tx: &mpsc::Sender<Event>,
        spawned: u16,
        stats: &mut [QueueStats],
        failed: &mut bool,
        live: &mut Live,
        on_live: impl FnOnce(&Device, StopHandle) + Send + 'env,
        on_live_thread: &mut Option<std::thread::ScopedJoinHandle<'scope, std::thread::Result<()>>>,
    ) -> Result<()> {
        let nq = self.info.nr_hw_queues;
        if spawned < nq {
            return Err(Error::Queue { q_id: spawned, why: "could not spawn its thread".into() });
        }
        let mut fetched = 0;
        while fetched < nq {
            match rx.recv().expect("sender held") {
                Event::Fetched => fetched += 1,
                Event::Stop => return Ok(()),
                Event::Exited(q, Ok(_)) => {
                    *failed = true;
                    return Err(Error::Queue { q_id: q, why: "exited before START_DEV".into() });
                }
                ev => return record(ev, stats, failed),
            }
        }
        // Every tag of every queue has a FETCH outstanding: START_DEV can complete.
        let mut early: Option<Event> = None;
        let dev_id = self.info.dev_id;
        let keep_waiting = || match rx.try_recv() {
            Ok(ev) => {
                early = Some(ev);
                false
            }
            Err(_) => true,
        };
        let started =
            if live.recovering { self.ctrl.end_user_recovery(dev_id, keep_waiting) } else { self.ctrl.start_dev(dev_id, keep_waiting) };
        if let Err(e) = started {
            // START_DEV was cancelled because a queue failed meanwhile (e.g.
            // its thread panicked serving the partition scan): report that.
            return match early {
                Some(Event::Stop) => Ok(()),
                Some(ev) => record(ev, stats, failed).and(Err(e)),
                None => Err(e),
            };
        }
        live.recovering = false;
        if let Some(ev) = early {
            return record(ev, stats, failed);
        }
        if let Some(name) = self.serving.io_scheduler.clone() {
            self.set_io_scheduler(&name)?;
        }
        // `on_live` runs beside us, so a queue that dies while it runs is
        // acted on at once. A panic in it stops the device like the handle.
        let stop = StopHandle(tx.clone());
        let stop_on_panic = StopHandle(tx.clone());
        let spawned = std::thread::Builder::new().name(format!("ublk{dev_id}-live")).spawn_scoped(s, move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| on_live(self, stop)));
            if r.is_err() {
                stop_on_panic.stop();
            }
            r
        });
        match spawned {
            Ok(h) => *on_live_thread = Some(h),
            Err(e) => return Err(Error::os("spawning the on_live thread", e)),
        }
        let ev = rx.recv().expect("sender held");
        live.stop_requested = matches!(ev, Event::Stop);
        record(ev, stats, failed)
    }

    /// Close `/dev/ublkcN`, DEL_DEV (the device was stopped by `serve`, or
    /// never started). Idempotent.
    fn delete(&mut self) -> Result<()> {
        if self.deleted {
            return Ok(());
        }
        if self.recovering {
            // Never delete a device we were only trying to take over.
            self.char_file = None;
            self.deleted = true;
            return Ok(());
        }
        self.char_file = None;
        self.deleted = true;
        self.ctrl.del_dev(self.info.dev_id)
    }
}

/// Whether `pid` is a live process: /proc/PID exists and is not a zombie
/// (state Z/X), which a killed but not yet reaped server is.
fn pid_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}

/// Folds one event into the per-queue counts; errors out for failures.
/// `failed` is set when a queue died (rather than being stopped).
fn record(ev: Event, stats: &mut [QueueStats], failed: &mut bool) -> Result<()> {
    match ev {
        Event::Stop | Event::Fetched => Ok(()),
        // The queue still fails its I/O: the normal stop path works.
        Event::Panicked(q) => Err(Error::Queue { q_id: q, why: "its target panicked".into() }),
        // A queue whose tags were all aborted: the device was stopped.
        Event::Exited(q, Ok(st)) => {
            stats[usize::from(q)] = st;
            Ok(())
        }
        Event::Exited(_, Err(e)) | Event::Failed(e) => {
            *failed = true;
            Err(e)
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.delete();
    }
}

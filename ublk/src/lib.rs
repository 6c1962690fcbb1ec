//! Safe, minimal helpers for Linux userspace block devices on the kernel's
//! `ublk` driver (`ublk_drv`, Linux 6.1+), over `io-uring` and `libc`.
//!
//! * [`ctrl`]: `/dev/ublk-control` and its SQE128 ring; every control command,
//!   with the opcode encoding chosen once from the kernel's answer.
//! * [`queue`]: one queue's ring on `/dev/ublkcN`, its read-only descriptor
//!   mapping and per-tag buffers; `!Send`, so its io commands all come from
//!   the one thread that owns it.
//! * [`target`]: what a block device does with one request, answered at once.
//! * [`aio`]: targets whose requests are futures on the queue's thread: any
//!   number of io_uring operations per request, completions from other
//!   threads, per-queue state.
//! * [`placement`]: where queue threads run, following the load.
//! * [`device`]: the lifecycle, from ADD_DEV to DEL_DEV, with teardown on
//!   drop, on a queue's panic and on stop.
//!
//! ```no_run
//! use ublk::{DeviceBuilder, NullTarget};
//! let dev = DeviceBuilder::new().queues(2).size(1 << 30).create()?;
//! let stats = dev.serve(&NullTarget, |dev, stop| {
//!     println!("{}", dev.block_path().display());
//!     stop.stop(); // or keep the handle and stop later
//! })?;
//! let reads: u64 = stats.iter().map(|s| s.reads).sum();
//! println!("served {reads} reads");
//! # Ok::<(), ublk::Error>(())
//! ```
#![warn(missing_docs)]

pub mod aio;
mod buffers;
pub mod ctrl;
pub mod device;
mod errno;
pub mod error;
mod flags;
pub mod params;
pub mod placement;
pub mod queue;
mod stats;
pub mod target;
pub mod targets;
mod transfer;

pub use aio::{AsyncTarget, QueueTarget};
pub use ctrl::{Control, DevInfo, Encoding, Features};
pub use device::{DataPath, Device, DeviceBuilder, StopHandle, MAX_QUEUE_DEPTH, NODE_WAIT, STOP_GRACE};
pub use errno::Errno;
pub use error::{Error, Owner, OwnerSource, Result};
pub use flags::{Attrs, DevFlags, Support, SUPPORTED_FLAGS};
pub use io_uring;
pub use params::{Discard, Params};
pub use placement::Placement;
pub use queue::{user_copy_offset, Queue, QueueStats, TagShare, DEFAULT_BUSY_POLL};
pub use target::{AsyncNullTarget, IoResult, NullTarget, Op, Request, Target, WriteCache};
pub use targets::{LoopOptions, LoopTarget, Nbd, NbdAddr, NbdOptions, NbdStats, RamDisk, RamQueue, Stripe, StripeLayout};
pub use ublk_sys as sys;

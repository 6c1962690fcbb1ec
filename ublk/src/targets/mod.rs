//! Ready-made targets: [`NullTarget`](crate::NullTarget) (in `target`),
//! [`RamDisk`], [`LoopTarget`], [`Stripe`] and [`Nbd`].

mod loop_file;
pub mod nbd;
mod ramdisk;
mod shmem;
pub mod stripe;

pub use loop_file::{LoopOptions, LoopTarget};
pub use nbd::{Nbd, NbdAddr, NbdOptions, NbdStats};
pub use ramdisk::{RamDisk, RamQueue};
pub use stripe::{Stripe, StripeLayout};

//! Ready-made targets: [`NullTarget`](crate::NullTarget) (in `target`),
//! [`RamDisk`], [`LoopTarget`] and [`Stripe`].

mod loop_file;
mod ramdisk;
pub mod stripe;

pub use loop_file::{LoopOptions, LoopTarget};
pub use ramdisk::RamDisk;
pub use stripe::{Stripe, StripeLayout};

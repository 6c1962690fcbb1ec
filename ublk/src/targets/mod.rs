//! Ready-made targets: [`NullTarget`](crate::NullTarget) (in `target`),
//! [`RamDisk`] and [`LoopTarget`].

mod loop_file;
mod ramdisk;

pub use loop_file::{LoopOptions, LoopTarget};
pub use ramdisk::RamDisk;

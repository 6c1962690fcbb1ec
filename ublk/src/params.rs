//! Device parameters (`SET_PARAMS`): sizes and limits of the block device.

use ublk_sys as sys;

use crate::error::{Error, Result};

/// The discard part of the parameters (`UBLK_PARAM_TYPE_DISCARD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Discard {
    /// Alignment of discards, bytes.
    pub alignment: u32,
    /// Granularity of discards, bytes.
    pub granularity: u32,
    /// Largest DISCARD, in sectors.
    pub max_discard_sectors: u32,
    /// Largest WRITE_ZEROES, in sectors (0: the block layer sends none).
    pub max_write_zeroes_sectors: u32,
    /// Most discard segments per request.
    pub max_discard_segments: u16,
}

/// What `SET_PARAMS` tells the block layer about the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Device size in bytes (a multiple of the logical block size).
    pub size: u64,
    /// log2 of the logical block size (9..=12).
    pub logical_bs_shift: u8,
    /// log2 of the physical block size (>= logical).
    pub physical_bs_shift: u8,
    /// log2 of the optimal io size.
    pub io_opt_shift: u8,
    /// log2 of the minimal io size.
    pub io_min_shift: u8,
    /// Largest request in sectors (<= max_io_buf_bytes / 512).
    pub max_sectors: u32,
    /// `UBLK_ATTR_*` bits (read-only, rotational, volatile cache, FUA).
    pub attrs: u32,
    /// Discard and write-zeroes limits, if the target supports them.
    pub discard: Option<Discard>,
}

impl Params {
    /// Basic parameters for a device of `size` bytes with `block_size`-byte
    /// logical blocks and requests of at most `max_io_bytes`.
    pub fn new(size: u64, block_size: u32, max_io_bytes: u32) -> Result<Self> {
        validate_block_size(block_size)?;
        if size == 0 || size % u64::from(block_size) != 0 {
            return Err(Error::InvalidConfig {
                what: "size",
                why: format!(
                    "{size} bytes is not a positive multiple of the block size {block_size}; round it to a multiple of {block_size}"
                ),
            });
        }
        let shift = block_size.trailing_zeros() as u8;
        Ok(Params {
            size,
            logical_bs_shift: shift,
            physical_bs_shift: shift.max(12),
            io_opt_shift: 12,
            io_min_shift: shift,
            max_sectors: max_io_bytes >> 9,
            attrs: 0,
            discard: None,
        })
    }

    /// The parameters the kernel keeps for a device (GET_PARAMS): the basic
    /// ones and, when present, the discard limits; the inverse of
    /// [`Params::to_raw`].
    pub fn from_raw(p: &sys::ublk_params) -> Self {
        let b = &p.basic;
        let d = &p.discard;
        Params {
            size: b.dev_sectors << 9,
            logical_bs_shift: b.logical_bs_shift,
            physical_bs_shift: b.physical_bs_shift,
            io_opt_shift: b.io_opt_shift,
            io_min_shift: b.io_min_shift,
            max_sectors: b.max_sectors,
            attrs: b.attrs,
            discard: (p.types & sys::UBLK_PARAM_TYPE_DISCARD != 0).then_some(Discard {
                alignment: d.discard_alignment,
                granularity: d.discard_granularity,
                max_discard_sectors: d.max_discard_sectors,
                max_write_zeroes_sectors: d.max_write_zeroes_sectors,
                max_discard_segments: d.max_discard_segments,
            }),
        }
    }

    /// The raw `ublk_params` with `len` covering this header's whole struct
    /// (older kernels clamp it to theirs, and ignore types they do not know).
    pub fn to_raw(&self) -> sys::ublk_params {
        let mut p = sys::ublk_params {
            len: std::mem::size_of::<sys::ublk_params>() as u32,
            types: sys::UBLK_PARAM_TYPE_BASIC,
            ..Default::default()
        };
        p.basic = sys::ublk_param_basic {
            attrs: self.attrs,
            logical_bs_shift: self.logical_bs_shift,
            physical_bs_shift: self.physical_bs_shift,
            io_opt_shift: self.io_opt_shift,
            io_min_shift: self.io_min_shift,
            max_sectors: self.max_sectors,
            dev_sectors: self.size >> 9,
            ..Default::default()
        };
        if let Some(d) = self.discard {
            p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
            p.discard = sys::ublk_param_discard {
                discard_alignment: d.alignment,
                discard_granularity: d.granularity,
                max_discard_sectors: d.max_discard_sectors,
                max_write_zeroes_sectors: d.max_write_zeroes_sectors,
                max_discard_segments: d.max_discard_segments,
                ..Default::default()
            };
        }
        p
    }
}

/// The kernel takes logical block sizes that are powers of two from 512 to
/// the page size (`ublk_validate_params`).
pub fn validate_block_size(bs: u32) -> Result<()> {
    if !bs.is_power_of_two() || !(512..=4096).contains(&bs) {
        return Err(Error::InvalidConfig {
            what: "block size",
            why: format!("{bs} is not a power of two between 512 and 4096; use 512, 1024, 2048 or 4096"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_raw_inverts_to_raw() {
        let mut p = Params::new(1 << 30, 4096, 512 << 10).unwrap();
        p.attrs = sys::UBLK_ATTR_VOLATILE_CACHE;
        assert_eq!(Params::from_raw(&p.to_raw()), p);
        p.discard = Some(Discard {
            alignment: 0,
            granularity: 4096,
            max_discard_sectors: 1 << 20,
            max_write_zeroes_sectors: 8,
            max_discard_segments: 1,
        });
        assert_eq!(Params::from_raw(&p.to_raw()), p);
    }
}

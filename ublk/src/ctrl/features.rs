//! What the running kernel reports through `GET_FEATURES`: [`Features`].

use ublk_sys as sys;

/// The features the running kernel reports (`UBLK_U_CMD_GET_FEATURES`, 6.5+),
/// a set of `UBLK_F_*` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features(pub u64);

impl Features {
    /// Whether the kernel reported `flag` (`None` flags are never reported).
    pub fn has(&self, flag: Option<u64>) -> bool {
        flag.is_some_and(|f| self.0 & f != 0)
    }

    /// Whether every bit of `flags` is reported.
    pub fn contains(&self, flags: impl Into<crate::DevFlags>) -> bool {
        let f = flags.into().bits();
        self.0 & f == f
    }

    /// The reported flags, typed.
    pub fn flags(&self) -> crate::DevFlags {
        crate::DevFlags::from_bits_retain(self.0)
    }

    /// Every reported flag by name: the kernel's names (`sys::abi`, up to
    /// the newest kernel the crate knows), else this build's header's; a
    /// bit neither knows is `UBLK_F_BIT<n>`.
    pub fn names(&self) -> Vec<String> {
        let mut v = Vec::new();
        for bit in 0..64 {
            let f = 1u64 << bit;
            if self.0 & f == 0 {
                continue;
            }
            match sys::abi::flag_name(f).or_else(|| sys::HEADER_FLAGS.iter().find(|(_, v)| *v == f).map(|(n, _)| *n)) {
                Some(n) => v.push(n.to_string()),
                None => v.push(format!("UBLK_F_BIT{bit}")),
            }
        }
        v
    }
}

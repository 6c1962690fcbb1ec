//! RAID-0 over N files or block devices (its *legs*), an [async
//! target](crate::aio) on the queue's own ring.
//!
//! The device is cut into chunks of `chunk` bytes (a power of two, 4 KiB to
//! 1 MiB): chunk `c` lives on leg `c % N` at offset `(c / N) * chunk`
//! ([`StripeLayout`]). The kernel does not split requests at chunk
//! boundaries for us (the device sets no `chunk_sectors`), so a READ or
//! WRITE may span several chunks: it becomes one operation per chunk piece,
//! all on the ring at once, each short transfer finished with more, and the
//! request is answered when every piece is done. A piece that fails fails
//! the request with its errno (`ENOSPC` from a full leg reaches the
//! writer as `ENOSPC`); the others are still waited for, since the kernel
//! may be writing the request's buffer until they are over.
//!
//! Every leg's writes sit in its page cache (or its disk's cache), so the
//! target declares a volatile cache with FUA, like [`LoopTarget`]: a FUA
//! write is written with `RWF_DSYNC` on each leg it touches, a FLUSH is an
//! `fdatasync` of every leg (concurrently). A device range is one
//! contiguous range on each leg ([`StripeLayout::leg_range`]), so DISCARD
//! punches one hole per leg and WRITE_ZEROES zeroes one range per leg
//! (`FALLOC_FL_ZERO_RANGE`, or a hole punch on file systems without it,
//! e.g. tmpfs).

use std::future::Future;
use std::ops::Range;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use super::{LoopOptions, LoopTarget};
use crate::aio::{AsyncTarget, Io, OpResult, Plain, QueueContext, QueueTarget};
use crate::errno::Errno;
use crate::error::{Error, Result};
use crate::target::{IoResult, Op, WriteCache};

/// Smallest chunk: one page, so that every piece of an O_DIRECT request
/// stays aligned on the legs.
pub const MIN_CHUNK: u32 = 4096;
/// Largest chunk.
pub const MAX_CHUNK: u32 = 1 << 20;
/// The chunk `ublk add -t stripe` uses unless told otherwise.
pub const DEFAULT_CHUNK: u32 = 64 << 10;
/// Most legs a stripe has: a FLUSH, DISCARD or WRITE_ZEROES then reaches
/// every leg at once.
pub const MAX_LEGS: usize = WINDOW;

/// Operations one request keeps in flight at most. A READ/WRITE has at most
/// `max_io_buf_bytes / chunk + 1` pieces (9 for 512 KiB requests and 64 KiB
/// chunks); with chunks small enough to need more, a piece starts as soon as
/// an earlier one is done.
const WINDOW: usize = 64;

/// Where a stripe's bytes live: chunk `c` of the device is on leg
/// `c % legs` at offset `(c / legs) * chunk`. Pure arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StripeLayout {
    chunk: u64,
    legs: u32,
}

/// One chunk's part of a request: the bytes `data` of the request live on
/// leg `leg` from `leg_offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Index of the leg.
    pub leg: u32,
    /// Byte offset on the leg.
    pub leg_offset: u64,
    /// The bytes of the request (from its first byte) this piece holds.
    pub data: Range<usize>,
}

impl StripeLayout {
    /// A layout of `legs` legs (2 to [`MAX_LEGS`]) and `chunk` bytes
    /// (a power of two from [`MIN_CHUNK`] to [`MAX_CHUNK`]).
    pub fn new(chunk: u32, legs: usize) -> Result<StripeLayout> {
        if !chunk.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk) {
            return Err(Error::InvalidConfig {
                what: "stripe chunk size",
                why: format!("{chunk} bytes: a chunk is a power of two from {MIN_CHUNK} (4K) to {MAX_CHUNK} (1M) bytes, e.g. 64K"),
            });
        }
        if legs < 2 {
            return Err(Error::InvalidConfig {
                what: "stripe",
                why: format!("{legs} leg(s): a stripe needs at least 2 files or block devices (for one, use the loop target)"),
            });
        }
        if legs > MAX_LEGS {
            return Err(Error::InvalidConfig { what: "stripe", why: format!("{legs} legs: at most {MAX_LEGS}") });
        }
        Ok(StripeLayout { chunk: u64::from(chunk), legs: legs as u32 })
    }

    /// Bytes per chunk.
    pub fn chunk(&self) -> u32 {
        self.chunk as u32
    }

    /// Number of legs.
    pub fn legs(&self) -> u32 {
        self.legs
    }

    /// Where byte `off` of the device lives: (leg, offset on the leg).
    pub fn locate(&self, off: u64) -> (u32, u64) {
        let (c, within) = (off / self.chunk, off % self.chunk);
        let n = u64::from(self.legs);
        ((c % n) as u32, (c / n) * self.chunk + within)
    }

    /// The pieces of the device range `[off, off + len)`, one per chunk it
    /// touches, in device order.
    pub fn pieces(&self, off: u64, len: usize) -> Pieces {
        Pieces { layout: *self, off, done: 0, len }
    }

    /// The part of the device range `[off, off + len)` on `leg`, as a range
    /// of the leg's bytes; `None` if the range has no byte there.
    ///
    /// It is always one contiguous range: the chunks of the range that are
    /// on one leg are `legs` apart on the device and therefore adjacent on
    /// the leg; only the first may start and only the last may end inside
    /// its chunk.
    pub fn leg_range(&self, leg: u32, off: u64, len: u64) -> Option<Range<u64>> {
        if len == 0 || leg >= self.legs {
            return None;
        }
        let (n, l, end) = (u64::from(self.legs), u64::from(leg), off + len);
        let (c0, c1) = (off / self.chunk, (end - 1) / self.chunk);
        // The first and last chunk of the range on this leg.
        let first = c0 + (l + n - c0 % n) % n;
        if first > c1 {
            return None;
        }
        let last = c1 - (c1 % n + n - l) % n;
        let start = if first == c0 { self.locate(off).1 } else { (first / n) * self.chunk };
        let stop = if last == c1 { self.locate(end - 1).1 + 1 } else { (last / n + 1) * self.chunk };
        Some(start..stop)
    }
}

/// The pieces of a device range ([`StripeLayout::pieces`]).
#[derive(Debug, Clone)]
pub struct Pieces {
    layout: StripeLayout,
    off: u64,
    done: usize,
    len: usize,
}

impl Iterator for Pieces {
    type Item = Piece;

    fn next(&mut self) -> Option<Piece> {
        if self.done >= self.len {
            return None;
        }
        let at = self.off + self.done as u64;
        let (leg, leg_offset) = self.layout.locate(at);
        let to_chunk_end = self.layout.chunk - at % self.layout.chunk;
        let n = (self.len - self.done).min(to_chunk_end as usize);
        let data = self.done..self.done + n;
        self.done += n;
        Some(Piece { leg, leg_offset, data })
    }
}

/// A RAID-0 target over 2 or more files or block devices. See the
/// [module](self) for what each request becomes.
#[derive(Debug)]
pub struct Stripe {
    legs: Vec<LoopTarget>,
    layout: StripeLayout,
    size: u64,
    /// Per leg: whether it still takes FALLOC_FL_ZERO_RANGE.
    zero_range: Vec<AtomicBool>,
}

impl Stripe {
    /// Opens the legs at `paths` (files or block devices, opened as
    /// [`LoopTarget::open`] does with `opts`) with chunks of `chunk` bytes.
    ///
    /// Legs may differ in size: each contributes its first `min` bytes, `min`
    /// being the smallest leg's size rounded down to a whole chunk, and the
    /// device holds `legs × min` bytes ([`Stripe::size`]). Refused with the
    /// reason: fewer than 2 or more than [`MAX_LEGS`] legs, a chunk that is
    /// not a power of two from 4 KiB to 1 MiB, a leg that cannot be opened
    /// or is smaller than one chunk, and one file named twice (its chunks
    /// would overwrite each other).
    pub fn open(paths: &[impl AsRef<Path>], chunk: u32, opts: &LoopOptions) -> Result<Stripe> {
        let layout = StripeLayout::new(chunk, paths.len())?;
        let mut legs = Vec::with_capacity(paths.len());
        let mut ids: Vec<(u64, u64)> = Vec::with_capacity(paths.len());
        for (i, p) in paths.iter().enumerate() {
            let p = p.as_ref();
            let leg = LoopTarget::open(p, opts).map_err(|e| match e {
                Error::InvalidConfig { why, .. } => Error::InvalidConfig { what: "stripe leg", why: format!("leg {i}: {why}") },
                e => e,
            })?;
            // The same file twice (by another name, a link): the same bytes
            // would hold two chunks.
            let meta = std::fs::metadata(p).map_err(|e| Error::os(format!("stat {}", p.display()), e))?;
            let id = if leg.is_block_device() { (u64::MAX, meta.rdev()) } else { (meta.dev(), meta.ino()) };
            if let Some(j) = ids.iter().position(|x| *x == id) {
                return Err(Error::InvalidConfig {
                    what: "stripe leg",
                    why: format!(
                        "leg {i} ({}) is the same file as leg {j} ({}): each leg must be its own file or device",
                        p.display(),
                        legs_path(&legs, j)
                    ),
                });
            }
            if leg.size() < u64::from(chunk) {
                return Err(Error::InvalidConfig {
                    what: "stripe leg",
                    why: format!(
                        "leg {i} ({}) holds {} bytes, less than one {chunk}-byte chunk; grow it (e.g. truncate -s 1G FILE)",
                        p.display(),
                        leg.size()
                    ),
                });
            }
            ids.push(id);
            legs.push(leg);
        }
        let per_leg = legs.iter().map(LoopTarget::size).min().expect("at least 2 legs") / u64::from(chunk) * u64::from(chunk);
        let size = per_leg * legs.len() as u64;
        let zero_range = legs.iter().map(|_| AtomicBool::new(true)).collect();
        Ok(Stripe { legs, layout, size, zero_range })
    }

    /// The device's size in bytes: legs × the smallest leg's size, rounded
    /// down to a whole chunk.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The layout: which leg holds which bytes.
    pub fn layout(&self) -> StripeLayout {
        self.layout
    }

    /// The legs' paths, in order.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.legs.iter().map(LoopTarget::path)
    }
}

fn legs_path(legs: &[LoopTarget], j: usize) -> String {
    legs[j].path().display().to_string()
}

impl AsyncTarget for Stripe {
    type Queue<'a> = &'a Stripe;

    fn queue(&self, _q: &QueueContext) -> std::io::Result<&Stripe> {
        Ok(self)
    }

    /// Leg `i` is registered file `i`.
    fn files(&self) -> Vec<BorrowedFd<'_>> {
        self.legs.iter().flat_map(|l| l.files()).collect()
    }

    /// Data moves only with `read_at`/`write_at`.
    fn zero_copy(&self) -> bool {
        true
    }

    fn write_cache(&self) -> WriteCache {
        WriteCache::VolatileFua
    }
}

/// A READ/WRITE piece and how much of it is done.
struct Part {
    piece: Piece,
    done: usize,
}

/// A per-leg operation of a FLUSH, DISCARD or WRITE_ZEROES.
struct LegOp {
    leg: u32,
    range: Range<u64>,
    /// The fallocate mode in flight (WRITE_ZEROES may fall back).
    mode: i32,
}

const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

impl QueueTarget for &Stripe {
    async fn handle(&self, mut io: Io<'_>) -> IoResult {
        let req = *io.request();
        let (off, len) = (req.offset(), req.len());
        let io = &mut io;
        match req.op {
            Op::Read | Op::Write => {
                let write = req.op == Op::Write;
                // FUA: each piece durable when answered.
                let flags = if req.fua() { libc::RWF_DSYNC } else { 0 };
                let parts = self.layout.pieces(off, len).map(|piece| Part { piece, done: 0 });
                join(parts, |p, last| {
                    if let Some(r) = last {
                        // A short transfer (a signal, a leg that shrank) is
                        // finished with another; nothing at all fails.
                        match r? {
                            0 => return Err(Errno::EIO),
                            n => p.done += n as usize,
                        }
                    }
                    let Piece { leg, leg_offset, ref data } = p.piece;
                    if p.done >= data.len() {
                        return Ok(None);
                    }
                    let (range, at, file) = (data.start + p.done..data.end, leg_offset + p.done as u64, io.file(leg));
                    Ok(Some(if write { io.write_at(file, range, at, flags) } else { io.read_at(file, range, at) }))
                })
                .await?;
                Ok(len as u32)
            }
            Op::Flush => {
                let ring = io.ring();
                join(0..self.layout.legs, |&mut leg, last| match last {
                    None => Ok(Some(ring.fsync(io.file(leg), true))),
                    Some(r) => r.map(|_| None),
                })
                .await?;
                Ok(0)
            }
            Op::Discard | Op::WriteZeroes => {
                let ring = io.ring();
                let zeroes = req.op == Op::WriteZeroes;
                let ops = (0..self.layout.legs).filter_map(|leg| {
                    let range = self.layout.leg_range(leg, off, len as u64)?;
                    let zero = zeroes && self.zero_range[leg as usize].load(Ordering::Relaxed);
                    Some(LegOp { leg, range, mode: if zero { ZERO } else { PUNCH } })
                });
                join(ops, |op, last| {
                    match last {
                        None => {}
                        // tmpfs (and some other file systems) refuse
                        // FALLOC_FL_ZERO_RANGE: a hole reads back as zeros
                        // too (the kernel's loop driver does the same).
                        Some(Err(Errno::EOPNOTSUPP)) if op.mode == ZERO => {
                            self.zero_range[op.leg as usize].store(false, Ordering::Relaxed);
                            op.mode = PUNCH;
                        }
                        Some(r) => return r.map(|_| None),
                    }
                    let (start, n) = (op.range.start, op.range.end - op.range.start);
                    Ok(Some(ring.fallocate(io.file(op.leg), op.mode, start, n)))
                })
                .await?;
                Ok(0)
            }
            Op::Other(_) => Err(Errno::EOPNOTSUPP),
        }
    }
}

/// Runs `jobs` concurrently, each a chain of operations on the ring, and
/// resolves once all are over: `next(job, None)` starts a job's first
/// operation, `next(job, Some(result))` the one after (`Ok(None)`: the job
/// is done). Up to [`WINDOW`] jobs run at once; every operation started in
/// one poll reaches the kernel in the queue's next `io_uring_enter`.
///
/// The first error is the result. Once there is one, no further job
/// starts, but the operations in flight are waited for: they may still be
/// using the request's buffer.
async fn join<'r, J>(
    jobs: impl Iterator<Item = J>,
    mut next: impl FnMut(&mut J, Option<OpResult>) -> std::result::Result<Option<Plain<'r>>, Errno>,
) -> std::result::Result<(), Errno> {
    let mut jobs = jobs.fuse();
    let mut slots: [Option<(J, Plain<'r>)>; WINDOW] = std::array::from_fn(|_| None);
    let mut failed: Option<Errno> = None;
    std::future::poll_fn(move |cx| {
        let mut busy = false;
        for slot in slots.iter_mut() {
            loop {
                if slot.is_none() {
                    if failed.is_some() {
                        break;
                    }
                    let Some(mut job) = jobs.next() else { break };
                    match next(&mut job, None) {
                        Ok(Some(op)) => *slot = Some((job, op)),
                        Ok(None) => {}
                        Err(e) => failed = Some(e),
                    }
                    continue;
                }
                let (job, op) = slot.as_mut().expect("checked above");
                match Pin::new(&mut *op).poll(cx) {
                    Poll::Pending => {
                        busy = true;
                        break;
                    }
                    Poll::Ready(r) => match next(job, Some(r)) {
                        Ok(Some(again)) => *op = again,
                        Ok(None) => *slot = None,
                        Err(e) => {
                            failed.get_or_insert(e);
                            *slot = None;
                        }
                    },
                }
            }
        }
        if busy {
            Poll::Pending
        } else {
            Poll::Ready(failed.map_or(Ok(()), Err))
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where byte `off` is, the slow way: walk the chunks.
    fn locate_slow(l: &StripeLayout, off: u64) -> (u32, u64) {
        let c = off / l.chunk;
        let mut per_leg = vec![0u64; l.legs as usize];
        for k in 0..c {
            per_leg[(k % u64::from(l.legs)) as usize] += 1;
        }
        let leg = (c % u64::from(l.legs)) as u32;
        (leg, per_leg[leg as usize] * l.chunk + off % l.chunk)
    }

    #[test]
    fn chunk_c_is_on_leg_c_mod_n_at_c_div_n() {
        let l = StripeLayout::new(16 << 10, 3).unwrap();
        let k = 16u64 << 10;
        assert_eq!(l.locate(0), (0, 0));
        assert_eq!(l.locate(k - 1), (0, k - 1));
        assert_eq!(l.locate(k), (1, 0));
        assert_eq!(l.locate(2 * k + 5), (2, 5));
        assert_eq!(l.locate(3 * k), (0, k));
        assert_eq!(l.locate(7 * k + 100), (1, 2 * k + 100));
        for legs in 2..=5 {
            let l = StripeLayout::new(4096, legs).unwrap();
            for off in (0..200_000u64).step_by(509) {
                assert_eq!(l.locate(off), locate_slow(&l, off), "legs {legs} off {off}");
            }
        }
    }

    #[test]
    fn pieces_cut_at_chunk_boundaries_and_cover_the_range() {
        let l = StripeLayout::new(4096, 2).unwrap();
        let p: Vec<Piece> = l.pieces(4096 - 512, 4096 + 1024).collect();
        assert_eq!(
            p,
            vec![
                Piece { leg: 0, leg_offset: 4096 - 512, data: 0..512 },
                Piece { leg: 1, leg_offset: 0, data: 512..4608 },
                Piece { leg: 0, leg_offset: 4096, data: 4608..5120 },
            ]
        );
        assert_eq!(l.pieces(8192, 4096).count(), 1, "a whole chunk is one piece");
        assert_eq!(l.pieces(100, 0).count(), 0);
        // Every byte of many ranges: exactly once, where locate puts it.
        for legs in 2..=4 {
            let l = StripeLayout::new(4096, legs).unwrap();
            for (off, len) in [(0u64, 1usize), (512, 300_000), (4095, 2), (123_456, 65_536), (0, 512 << 10)] {
                let mut next = 0;
                for p in l.pieces(off, len) {
                    assert_eq!(p.data.start, next, "pieces in order, no gap");
                    assert!(!p.data.is_empty() && p.data.len() <= 4096);
                    assert_eq!(l.locate(off + p.data.start as u64), (p.leg, p.leg_offset));
                    // The piece stays inside one chunk of its leg.
                    let last = off + p.data.end as u64 - 1;
                    assert_eq!(l.locate(last), (p.leg, p.leg_offset + p.data.len() as u64 - 1));
                    next = p.data.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn a_device_range_is_one_range_per_leg() {
        for legs in 2..=5 {
            let l = StripeLayout::new(4096, legs).unwrap();
            let mut x = 0x1234_5678u64;
            for _ in 0..2000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % 100_000) & !511;
                let len = ((x >> 20) % 60_000 + 1) & !511;
                for leg in 0..legs as u32 {
                    // The slow way: every byte's place, collected.
                    let on_leg: Vec<u64> =
                        (off..off + len).step_by(512).map(|b| l.locate(b)).filter(|(g, _)| *g == leg).map(|(_, o)| o).collect();
                    let want = match (on_leg.first(), on_leg.last()) {
                        (Some(a), Some(b)) => Some(*a..*b + 512),
                        _ => None,
                    };
                    if let Some(w) = &want {
                        assert_eq!((w.end - w.start) / 512, on_leg.len() as u64, "contiguous on the leg");
                    }
                    assert_eq!(l.leg_range(leg, off, len), want, "legs {legs} leg {leg} off {off} len {len}");
                }
            }
        }
        let l = StripeLayout::new(4096, 2).unwrap();
        assert_eq!(l.leg_range(1, 0, 4096), None);
        assert_eq!(l.leg_range(0, 0, 0), None);
        assert_eq!(l.leg_range(2, 0, 1 << 20), None);
        assert_eq!(l.leg_range(1, 0, 1 << 20), Some(0..512 << 10));
    }

    #[test]
    fn chunk_and_leg_counts_are_checked() {
        for bad in [0, 512, 2048, 4095, 12288, 2 << 20] {
            let e = StripeLayout::new(bad, 2).unwrap_err().to_string();
            assert!(e.contains("chunk") && e.contains("power of two"), "{bad}: {e}");
        }
        for good in [4096, 64 << 10, 1 << 20] {
            assert_eq!(StripeLayout::new(good, 2).unwrap().chunk(), good);
        }
        for n in [0, 1] {
            let e = StripeLayout::new(4096, n).unwrap_err().to_string();
            assert!(e.contains("at least 2"), "{e}");
        }
        assert!(StripeLayout::new(4096, MAX_LEGS + 1).unwrap_err().to_string().contains("at most"));
    }

    fn file(dir: &Path, name: &str, size: u64) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        p
    }

    #[test]
    fn open_sizes_and_refusals() {
        let dir = std::env::temp_dir().join(format!("ublk-stripe-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let opts = LoopOptions::default();
        let a = file(&dir, "a", 10 << 20);
        let b = file(&dir, "b", (7 << 20) + 1000);
        let c = file(&dir, "c", 8 << 20);
        // Unequal legs: the smallest, rounded down to a chunk, times the legs.
        let s = Stripe::open(&[&a, &b, &c], 64 << 10, &opts).unwrap();
        assert_eq!(s.size(), 3 * (7 << 20));
        assert_eq!(s.layout(), StripeLayout::new(64 << 10, 3).unwrap());
        assert_eq!(s.paths().collect::<Vec<_>>(), vec![a.as_path(), b.as_path(), c.as_path()]);
        assert_eq!(s.files().len(), 3);
        assert_eq!(s.write_cache(), WriteCache::VolatileFua);
        let s = Stripe::open(&[&a, &b], 1 << 20, &opts).unwrap();
        assert_eq!(s.size(), 2 * (7 << 20));

        let err = |paths: &[&std::path::PathBuf], chunk: u32| Stripe::open(paths, chunk, &opts).unwrap_err().to_string();
        let e = err(&[&a], 64 << 10);
        assert!(e.contains("at least 2"), "{e}");
        let e = err(&[&a, &b], 3000);
        assert!(e.contains("power of two"), "{e}");
        let missing = dir.join("missing");
        let e = err(&[&a, &missing], 64 << 10);
        assert!(e.contains("leg 1") && e.contains("does not exist") && e.contains("missing"), "{e}");
        let e = err(&[&a, &dir], 64 << 10);
        assert!(e.contains("leg 1") && e.contains(dir.to_str().unwrap()), "{e}");
        let tiny = file(&dir, "tiny", 4096);
        let e = err(&[&a, &tiny], 64 << 10);
        assert!(e.contains("leg 1") && e.contains("less than one 65536-byte chunk"), "{e}");
        let link = dir.join("link");
        std::os::unix::fs::symlink(&a, &link).unwrap();
        let e = err(&[&a, &b, &link], 64 << 10);
        assert!(e.contains("leg 2") && e.contains("same file as leg 0"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

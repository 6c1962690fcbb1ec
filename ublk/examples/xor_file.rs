//! A target written outside the crate, with its public API only: a disk
//! over a file whose bytes are stored XORed with a key (a toy cipher: the
//! point is a target that must transform every byte, so it cannot hand the
//! kernel's buffer to the file directly).
//!
//! Each queue has its own pool of bounce buffers (per-queue state: no
//! locks, no `Sync`). A WRITE copies the request's data into a buffer,
//! XORs it and writes it to the file with an io_uring operation on the
//! queue's ring; a READ reads the file into a buffer, then XORs it into
//! the request's data. FLUSH is an fdatasync on the ring.
//!
//! ```text
//! truncate -s 256M /tmp/secret.img
//! xor_file /tmp/secret.img 0x5a      # prints /dev/ublkbN; Ctrl-C stops
//! ```

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::Write;

use ublk::aio::{AsyncTarget, Io, QueueContext, QueueTarget};
use ublk::{DeviceBuilder, Errno, IoResult, Op, WriteCache};

/// The device-wide part: the file and the key, shared by every queue.
struct XorFile {
    file: File,
    key: u8,
}

/// One queue's part: its bounce buffers, reused from request to request.
struct XorQueue<'a> {
    disk: &'a XorFile,
    pool: RefCell<Vec<Vec<u8>>>,
}

impl AsyncTarget for XorFile {
    type Queue<'a> = XorQueue<'a>;

    fn queue(&self, q: &QueueContext) -> std::io::Result<XorQueue<'_>> {
        Ok(XorQueue { disk: self, pool: RefCell::new(Vec::with_capacity(usize::from(q.depth))) })
    }

    /// Writes land in the file's page cache: durable after fdatasync only.
    fn write_cache(&self) -> WriteCache {
        WriteCache::Volatile
    }
}

fn xor(dst: &mut [u8], src: &[u8], key: u8) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s ^ key;
    }
}

impl XorQueue<'_> {
    /// A buffer of `len` bytes from the pool (allocated only while the pool
    /// grows to the queue's depth).
    fn take(&self, len: usize) -> Vec<u8> {
        let mut b = self.pool.borrow_mut().pop().unwrap_or_default();
        b.resize(len, 0);
        b
    }

    fn give(&self, b: Vec<u8>) {
        self.pool.borrow_mut().push(b);
    }
}

impl QueueTarget for XorQueue<'_> {
    async fn handle(&self, mut io: Io<'_>) -> IoResult {
        let req = *io.request();
        let (key, file) = (self.disk.key, &self.disk.file);
        match req.op {
            Op::Read => {
                let buf = self.take(req.len());
                // The buffer travels with the operation and comes back with
                // its result: if this future were dropped, the queue would
                // keep it until the kernel is done with it.
                let (res, buf) = io.ring().read(file, buf, req.offset()).await;
                if res? as usize != req.len() {
                    return Err(Errno::EIO);
                }
                xor(io.data_mut(), &buf, key);
                self.give(buf);
                Ok(req.len() as u32)
            }
            Op::Write => {
                let mut buf = self.take(req.len());
                xor(&mut buf, io.data(), key);
                let flags = if req.fua() { libc::RWF_DSYNC } else { 0 };
                let (res, buf) = io.ring().write(file, buf, req.offset(), flags).await;
                self.give(buf);
                match res? as usize {
                    n if n == req.len() => Ok(n as u32),
                    _ => Err(Errno::EIO),
                }
            }
            Op::Flush => io.ring().fsync(file, true).await,
            _ => Err(Errno::EOPNOTSUPP),
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(path), Some(key)) = (args.next(), args.next()) else {
        return Err("usage: xor_file FILE KEY (KEY a byte, e.g. 0x5a)".into());
    };
    let key = u8::from_str_radix(key.trim_start_matches("0x"), 16)?;
    let file = OpenOptions::new().read(true).write(true).open(&path)?;
    let size = file.metadata()?.len() / 4096 * 4096;
    let target = XorFile { file, key };
    // Stop on SIGINT/SIGTERM: blocked in every thread (they inherit the
    // mask), taken by one that then uses the device's stop handle.
    let signals = block_signals();
    let dev = DeviceBuilder::new().queues(2).size(size).create()?;
    let stats = dev.serve_async(&target, |dev, stop| {
        println!("{}", dev.block_path().display());
        let _ = std::io::stdout().flush();
        std::thread::spawn(move || {
            let mut sig = 0;
            // SAFETY: sigwait on an initialised set of blocked signals.
            unsafe { libc::sigwait(&signals, &mut sig) };
            eprintln!("xor_file: signal {sig}, stopping");
            stop.stop();
        });
    })?;
    let n: u64 = stats.iter().map(|s| s.requests()).sum();
    eprintln!("xor_file: {n} requests served");
    Ok(())
}

/// Blocks SIGINT and SIGTERM in this thread (and the threads it spawns
/// later); returns the set, for sigwait.
fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc calls on a local signal set, initialised by
    // sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

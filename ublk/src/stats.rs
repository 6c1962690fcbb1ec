//! What a queue counts while it serves.

/// Requests served by one queue (or one thread of a queue, see
/// [`DeviceBuilder::threads_per_queue`](crate::DeviceBuilder::threads_per_queue)),
/// by operation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    /// Queue id.
    pub q_id: u16,
    /// The thread of the queue that served these (0 with one thread per
    /// queue).
    pub thread: u16,
    /// READ requests.
    pub reads: u64,
    /// WRITE requests.
    pub writes: u64,
    /// Of the WRITE requests, those with `UBLK_IO_F_FUA` (durable when
    /// answered).
    pub fua_writes: u64,
    /// FLUSH requests.
    pub flushes: u64,
    /// DISCARD requests.
    pub discards: u64,
    /// WRITE_ZEROES requests.
    pub write_zeroes: u64,
    /// Requests answered -EOPNOTSUPP (unknown op).
    pub unsupported: u64,
    /// Requests committed with an error (the target's, or EIO for an
    /// answer that broke the rule of [`IoResult`](crate::IoResult)).
    pub errors: u64,
    /// Answers that broke the rule of [`IoResult`](crate::IoResult) (`Err(0)`,
    /// an errno out of range, more bytes than asked, no answer at all) and
    /// were turned into EIO.
    pub invalid: u64,
    /// Bytes read and written.
    pub bytes: u64,
    /// io_uring_enter calls made while serving.
    pub enters: u64,
    /// Of those, calls that waited for a completion (the thread may have
    /// slept and then needed a wake-up).
    pub waits: u64,
    /// Batches of completions found by busy polling, without waiting.
    pub polled: u64,
    /// Moves of the thread between home and away ([`crate::Placement::Auto`]).
    pub moves: u64,
    /// Request buffers the queue registered itself under zero copy: every
    /// READ/WRITE with [`DataPath::ZeroCopy`](crate::DataPath::ZeroCopy),
    /// and those whose automatic registration failed with
    /// [`DataPath::AutoBufReg`](crate::DataPath::AutoBufReg).
    pub buf_regs: u64,
}

impl QueueStats {
    /// All requests served.
    pub fn requests(&self) -> u64 {
        self.reads + self.writes + self.flushes + self.discards + self.write_zeroes + self.unsupported
    }
}

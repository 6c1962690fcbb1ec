//! What the connections did: [`NbdStats`], counted per queue and summed
//! over the queues.

/// What a connection did, counted per queue and summed in [`Nbd::stats`](super::Nbd::stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NbdStats {
    /// Simple replies received.
    pub simple_replies: u64,
    /// Structured reply chunks received (of every type).
    pub chunks: u64,
    /// `NBD_REPLY_TYPE_OFFSET_DATA` chunks.
    pub data_chunks: u64,
    /// `NBD_REPLY_TYPE_OFFSET_HOLE` chunks.
    pub hole_chunks: u64,
    /// Error chunks.
    pub error_chunks: u64,
    /// Receive operations of the replies' reader (each takes as many
    /// replies as the connection holds).
    pub recvs: u64,
    /// Of those, reads into the receive buffer registered in the queue
    /// ring's buffer table (`READ_FIXED`); the others are `recv`s into a
    /// plain one (the kernel refused the registration).
    pub fixed_recvs: u64,
    /// Payload parts received by their request straight into its data
    /// (under zero copy: every data chunk or simple READ reply's payload,
    /// each read from the socket into the request's pages).
    pub direct_payloads: u64,
    /// Under zero copy: hole chunks zeroed in their request's pages (by
    /// the request, once its reply is complete; the reader goes on).
    pub holes_zeroed: u64,
    /// Socket reads of payloads straight into their request's pages (zero
    /// copy; more than one per payload where a read came short).
    pub payload_reads: u64,
    /// Under zero copy with user copy too: payload parts the reader had
    /// received in bulk and wrote into their request's pages (`pwrite` of
    /// `/dev/ublkcN`).
    pub copied_payloads: u64,
    /// Under zero copy with user copy too: short WRITE payloads copied out
    /// of their request's pages (`pread` of `/dev/ublkcN`) and sent with
    /// their header.
    pub staged_writes: u64,
    /// Sends of the requests' writer: `sendmsg` operations, or under zero
    /// copy linked chains of them and of WRITE payloads (one per batch, and
    /// one more where a step came short).
    pub sends: u64,
}

impl NbdStats {
    pub(super) fn add(&mut self, o: &NbdStats) {
        self.simple_replies += o.simple_replies;
        self.chunks += o.chunks;
        self.data_chunks += o.data_chunks;
        self.hole_chunks += o.hole_chunks;
        self.error_chunks += o.error_chunks;
        self.recvs += o.recvs;
        self.fixed_recvs += o.fixed_recvs;
        self.direct_payloads += o.direct_payloads;
        self.holes_zeroed += o.holes_zeroed;
        self.payload_reads += o.payload_reads;
        self.copied_payloads += o.copied_payloads;
        self.staged_writes += o.staged_writes;
        self.sends += o.sends;
    }
}

//! What a completion on the queue's ring is, from its `user_data`: one
//! decoder for every loop that reaps the ring, so that no loop can take one
//! kind of completion for another (a bit test that also matches the
//! all-ones constants, a missing arm falling through to "a tag's command").
//!
//! The encoding: a tag's FETCH/COMMIT is the tag itself (below 2^16); the
//! other kinds are one bit above bit 32 plus a small index, and the
//! queue's own single operations are constants near `u64::MAX`.

use super::batch::{BATCH_CMD, BATCH_FETCH};
use super::{BUF_REG, BUF_UNREG, CANCEL, NOTIFY, WAKE};
use crate::aio::reactor::{ASYNC_OP, OP_CANCEL};

/// One completion's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Token {
    /// The tag's FETCH_REQ or COMMIT_AND_FETCH_REQ: a request arrived, or
    /// the kernel aborted the command.
    Tag(u16),
    /// An async target's operation, by its slot.
    AsyncOp(u32),
    /// The queue's REGISTER_IO_BUF of the tag's pages.
    BufReg(u16),
    /// An UNREGISTER_IO_BUF (pushed skip-success: only a failure completes).
    BufUnreg,
    /// The multishot FETCH_IO_CMDS.
    BatchFetch,
    /// A PREP_IO_CMDS or COMMIT_IO_CMDS, by its element buffer.
    BatchCmd(u16),
    /// The teardown wake-up poll.
    Wake,
    /// The poll on the queue's own eventfd.
    Notify,
    /// A cancellation the queue pushed at teardown.
    Cancel,
    /// The cancellation of a dropped future's operation.
    OpCancel,
    /// Nothing the queue pushes (ignored).
    Unknown(u64),
}

impl Token {
    /// Decodes a completion's `user_data`: the constants first (they have
    /// every kind bit set), then the kind bits, one at a time.
    pub(crate) fn decode(ud: u64) -> Token {
        match ud {
            WAKE => Token::Wake,
            CANCEL => Token::Cancel,
            OP_CANCEL => Token::OpCancel,
            NOTIFY => Token::Notify,
            ud if ud < 1 << 16 => Token::Tag(ud as u16),
            ud => match ud >> 32 {
                k if k == ASYNC_OP >> 32 => Token::AsyncOp(ud as u32),
                k if k == BUF_REG >> 32 && ud as u32 >> 16 == 0 => Token::BufReg(ud as u16),
                k if k == BUF_UNREG >> 32 => Token::BufUnreg,
                k if k == BATCH_FETCH >> 32 && ud as u32 == 0 => Token::BatchFetch,
                k if k == BATCH_CMD >> 32 && ud as u32 >> 16 == 0 => Token::BatchCmd(ud as u16),
                _ => Token::Unknown(ud),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind decodes as itself, the constants included (which have
    /// every kind bit set), and nothing else passes for a tag.
    #[test]
    fn every_kind_decodes_as_itself() {
        assert_eq!(Token::decode(0), Token::Tag(0));
        assert_eq!(Token::decode(4095), Token::Tag(4095));
        assert_eq!(Token::decode(ASYNC_OP | 7), Token::AsyncOp(7));
        assert_eq!(Token::decode(BUF_REG | 12), Token::BufReg(12));
        assert_eq!(Token::decode(BUF_UNREG | 12), Token::BufUnreg);
        assert_eq!(Token::decode(BATCH_FETCH), Token::BatchFetch);
        assert_eq!(Token::decode(BATCH_CMD | 3), Token::BatchCmd(3));
        assert_eq!(Token::decode(WAKE), Token::Wake);
        assert_eq!(Token::decode(CANCEL), Token::Cancel);
        assert_eq!(Token::decode(OP_CANCEL), Token::OpCancel);
        assert_eq!(Token::decode(NOTIFY), Token::Notify);
        assert!(matches!(Token::decode(1 << 16), Token::Unknown(_)));
        assert!(matches!(Token::decode(BATCH_FETCH | BATCH_CMD), Token::Unknown(_)));
        // The constants are distinct.
        let all = [WAKE, CANCEL, OP_CANCEL, NOTIFY];
        for (i, a) in all.iter().enumerate() {
            assert!(all[i + 1..].iter().all(|b| a != b));
        }
    }
}

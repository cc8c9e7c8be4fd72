//! Sealing and opening data messages with the keys of one handshake.

use super::cipher::{Cipher, DataKey};
use super::{PollKey, ReplayWindow};
use crate::DropReason;
use crate::wire::message::{DATA_HEADER_LEN, DATA_OVERHEAD, Message, TAG_LEN};

/// A sender stops using a keypair before its counter can wrap (WireGuard's margin).
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);

/// The keys of one completed handshake, with the send counter and replay window.
pub struct SessionKeys {
    send: DataKey,
    receive: DataKey,
    next_counter: u64,
    replay: ReplayWindow,
    poll: PollKey,
}

impl SessionKeys {
    pub(super) fn new(send: DataKey, receive: DataKey, poll: PollKey) -> Self {
        Self {
            send,
            receive,
            next_counter: 0,
            replay: ReplayWindow::new(),
            poll,
        }
    }

    /// The cipher its data messages are sealed with.
    pub fn cipher(&self) -> Cipher {
        self.send.cipher()
    }

    /// The keypair's poll key (see [`PollKey`]).
    pub fn poll_key(&self) -> &PollKey {
        &self.poll
    }

    /// Messages sealed so far.
    pub fn sent(&self) -> u64 {
        self.next_counter
    }

    /// Write a complete data message for `receiver` carrying `plaintext` into
    /// `out`; returns its length (`plaintext.len() + DATA_OVERHEAD`).
    pub fn seal(
        &mut self,
        receiver: u32,
        plaintext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, DropReason> {
        let len = plaintext.len() + DATA_OVERHEAD;
        if out.len() < len {
            return Err(DropReason::TooLarge);
        }
        let counter = self.next_counter;
        if counter >= REJECT_AFTER_MESSAGES {
            return Err(DropReason::Expired);
        }
        self.next_counter += 1;
        Message::emit_data_header(receiver, counter, out);
        self.send
            .seal(counter, plaintext, &mut out[DATA_HEADER_LEN..len]);
        Ok(len)
    }

    /// Whether a message with `counter` would be the newest received (the
    /// server follows a roaming client only on its newest messages).
    pub fn is_newest(&self, counter: u64) -> bool {
        self.replay.is_newest(counter)
    }

    /// Authenticate and decrypt a data message's ciphertext into `out`;
    /// returns the plaintext length. Replays are rejected before decryption.
    pub fn open(
        &mut self,
        counter: u64,
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, DropReason> {
        if counter >= REJECT_AFTER_MESSAGES {
            return Err(DropReason::Expired);
        }
        if !self.replay.is_fresh(counter) {
            return Err(DropReason::Replay);
        }
        if out.len() + TAG_LEN < ciphertext.len() {
            return Err(DropReason::TooLarge);
        }
        let n = self.receive.open(counter, ciphertext, out)?;
        // Only an authenticated counter may move the window.
        self.replay.accept(counter);
        Ok(n)
    }
}

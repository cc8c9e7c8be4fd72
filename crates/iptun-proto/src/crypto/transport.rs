//! Sealing and opening data messages with the keys of one handshake.

use std::sync::Arc;

use super::cipher::{Cipher, DataKey};
use super::{PollKey, ReplayWindow};
use crate::DropReason;
use crate::wire::message::{DATA_HEADER_LEN, DATA_OVERHEAD, Message, TAG_LEN};

/// A sender stops using a keypair before its counter can wrap (WireGuard's margin).
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);

/// The keys of one completed handshake, with the send counter and replay window.
pub struct SessionKeys {
    /// Shared with the [`Reserved`] messages not sealed yet.
    send: Arc<DataKey>,
    receive: DataKey,
    next_counter: u64,
    replay: ReplayWindow,
    poll: PollKey,
}

impl SessionKeys {
    pub(super) fn new(send: DataKey, receive: DataKey, poll: PollKey) -> Self {
        Self {
            send: Arc::new(send),
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
        fits(plaintext.len(), out.len())?;
        let counter = self.next_counter()?;
        Ok(seal(&self.send, receiver, counter, plaintext, out))
    }

    /// Take the next message's counter for a `plaintext_len`-byte packet
    /// that is to be sealed into `room` bytes, without sealing it: the
    /// [`Reserved`] message seals on its own, so that whatever guards
    /// these keys need not be held for the encryption. Messages sealed
    /// out of order arrive as a reordering, which the replay window takes.
    pub fn reserve(
        &mut self,
        receiver: u32,
        plaintext_len: usize,
        room: usize,
    ) -> Result<Reserved, DropReason> {
        fits(plaintext_len, room)?;
        Ok(Reserved {
            key: self.send.clone(),
            receiver,
            counter: self.next_counter()?,
        })
    }

    fn next_counter(&mut self) -> Result<u64, DropReason> {
        let counter = self.next_counter;
        if counter >= REJECT_AFTER_MESSAGES {
            return Err(DropReason::Expired);
        }
        self.next_counter += 1;
        Ok(counter)
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

/// A data message whose counter is taken ([`SessionKeys::reserve`]), to
/// be sealed outside the lock that guards the keys.
pub struct Reserved {
    key: Arc<DataKey>,
    receiver: u32,
    counter: u64,
}

impl Reserved {
    /// Write the complete data message carrying `plaintext` into `out`;
    /// returns its length. `TooLarge` if it does not fit after all (the
    /// reservation was for a smaller packet or more room): the counter goes
    /// unused, which the peer sees as a lost message.
    pub fn seal(self, plaintext: &[u8], out: &mut [u8]) -> Result<usize, DropReason> {
        fits(plaintext.len(), out.len())?;
        Ok(seal(&self.key, self.receiver, self.counter, plaintext, out))
    }
}

/// `TooLarge` unless a data message of `plaintext_len` bytes fits in `room`.
fn fits(plaintext_len: usize, room: usize) -> Result<(), DropReason> {
    if room < plaintext_len + DATA_OVERHEAD {
        return Err(DropReason::TooLarge);
    }
    Ok(())
}

/// Write the data message (header, ciphertext, tag) into `out`, which
/// has room for it; returns its length.
fn seal(key: &DataKey, receiver: u32, counter: u64, plaintext: &[u8], out: &mut [u8]) -> usize {
    let len = plaintext.len() + DATA_OVERHEAD;
    Message::emit_data_header(receiver, counter, out);
    key.seal(counter, plaintext, &mut out[DATA_HEADER_LEN..len]);
    len
}

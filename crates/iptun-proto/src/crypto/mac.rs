//! The init's MAC: a keyed BLAKE2s tag over the whole init, keyed with a
//! hash of the server's public key (WireGuard's `mac1`). Only someone who
//! knows the server's public key can produce it, so the server drops random
//! garbage shaped like an init before spending a Diffie-Hellman operation or
//! a slot of its handshake rate limit on it.

use blake2::digest::consts::U16;
use blake2::digest::{Digest as _, Mac as _};
use blake2::{Blake2s256, Blake2sMac};

use super::PublicKey;

/// Bytes of the tag.
pub const MAC_LEN: usize = 16;
const LABEL: &[u8] = b"mac1 iptun v1";

/// The key for one server's init MACs.
#[derive(Clone)]
pub struct Mac1Key([u8; 32]);

impl Mac1Key {
    /// `BLAKE2s-256(LABEL || server public key)`.
    pub fn new(server: &PublicKey) -> Self {
        Self(
            Blake2s256::new()
                .chain_update(LABEL)
                .chain_update(server.0)
                .finalize()
                .into(),
        )
    }

    /// The tag over `message`.
    pub fn compute(&self, message: &[u8]) -> [u8; MAC_LEN] {
        self.mac()
            .chain_update(message)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `tag` is the tag over `message` (constant time).
    pub fn verify(&self, message: &[u8], tag: &[u8]) -> bool {
        self.mac().chain_update(message).verify_slice(tag).is_ok()
    }

    fn mac(&self) -> Blake2sMac<U16> {
        <Blake2sMac<U16> as blake2::digest::KeyInit>::new_from_slice(&self.0)
            .expect("a 32-byte key is valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_verifies_and_binds_key_and_message() {
        let key = Mac1Key::new(&PublicKey([7; 32]));
        let tag = key.compute(b"init bytes");
        assert!(key.verify(b"init bytes", &tag));
        assert!(!key.verify(b"init bytez", &tag));
        assert!(!Mac1Key::new(&PublicKey([8; 32])).verify(b"init bytes", &tag));
        assert!(!key.verify(b"init bytes", &tag[..15]));
    }
}

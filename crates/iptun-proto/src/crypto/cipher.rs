//! The AEAD of data messages: ChaCha20-Poly1305 everywhere, AES-256-GCM
//! where both ends have AES in hardware (three times faster there: it is
//! most of a tunnel's CPU per byte). The client offers AES-256-GCM in its
//! init payload when its CPU accelerates it; the server takes it when its
//! own CPU does too, and says so in the tunnel configuration.

use ring::aead::{AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, Tag, UnboundKey};

use crate::DropReason;
use crate::wire::message::TAG_LEN;

/// The AEAD that seals a session's data messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Cipher {
    /// The Noise handshake's own cipher, fast in software.
    #[default]
    ChaCha20Poly1305,
    /// Fast only with AES and carry-less multiply instructions.
    Aes256Gcm,
}

impl Cipher {
    /// AES-256-GCM when this CPU accelerates it, else ChaCha20-Poly1305.
    pub fn fastest_here() -> Self {
        if aes_in_hardware() {
            Self::Aes256Gcm
        } else {
            Self::ChaCha20Poly1305
        }
    }

    /// The cipher two ends use: AES-256-GCM only when both prefer it.
    pub fn agree(self, other: Self) -> Self {
        if self == Self::Aes256Gcm && other == Self::Aes256Gcm {
            Self::Aes256Gcm
        } else {
            Self::ChaCha20Poly1305
        }
    }

    /// Whether a client that offered `self` accepts `chosen`:
    /// ChaCha20-Poly1305 always, AES-256-GCM only if offered.
    pub fn permits(self, chosen: Self) -> bool {
        chosen == Self::ChaCha20Poly1305 || chosen == self
    }

    /// Its name, as the client's log shows it.
    pub fn name(self) -> &'static str {
        match self {
            Self::ChaCha20Poly1305 => "chacha20-poly1305",
            Self::Aes256Gcm => "aes-256-gcm",
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn aes_in_hardware() -> bool {
    std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
}

#[cfg(target_arch = "aarch64")]
fn aes_in_hardware() -> bool {
    std::arch::is_aarch64_feature_detected!("aes")
        && std::arch::is_aarch64_feature_detected!("pmull")
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn aes_in_hardware() -> bool {
    false
}

/// One direction's key. The nonce of a message is 4 zero bytes and its
/// counter as a little-endian u64, for both ciphers: with ChaCha20-Poly1305
/// that is Noise's nonce, so sessions agree with peers that sealed through
/// a Noise library. The associated data is empty.
pub struct DataKey {
    key: LessSafeKey,
}

impl DataKey {
    /// The key for `cipher` from one of the handshake's split keys.
    pub fn new(cipher: Cipher, key: &[u8; 32]) -> Self {
        let algorithm = match cipher {
            Cipher::ChaCha20Poly1305 => &CHACHA20_POLY1305,
            Cipher::Aes256Gcm => &AES_256_GCM,
        };
        let key = UnboundKey::new(algorithm, key).expect("32-byte keys fit both ciphers");
        Self {
            key: LessSafeKey::new(key),
        }
    }

    /// The cipher it is a key of.
    pub fn cipher(&self) -> Cipher {
        if self.key.algorithm() == &AES_256_GCM {
            Cipher::Aes256Gcm
        } else {
            Cipher::ChaCha20Poly1305
        }
    }

    /// Seal `plaintext` with `counter` into `out` (ciphertext, then tag);
    /// returns the length written. `out` must hold `plaintext.len() + TAG_LEN`.
    pub fn seal(&self, counter: u64, plaintext: &[u8], out: &mut [u8]) -> usize {
        let n = plaintext.len();
        let (body, rest) = out.split_at_mut(n);
        body.copy_from_slice(plaintext);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(counter), Aad::empty(), body)
            .expect("a data message is far below the ciphers' length limits");
        rest[..TAG_LEN].copy_from_slice(tag.as_ref());
        n + TAG_LEN
    }

    /// Open `sealed` (ciphertext, then tag) with `counter` into `out`;
    /// returns the plaintext length. `out` must hold `sealed.len() - TAG_LEN`.
    pub fn open(&self, counter: u64, sealed: &[u8], out: &mut [u8]) -> Result<usize, DropReason> {
        let n = sealed
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(DropReason::Malformed)?;
        let (ciphertext, tag) = sealed.split_at(n);
        let tag: [u8; TAG_LEN] = tag.try_into().expect("split at TAG_LEN from the end");
        let body = &mut out[..n];
        body.copy_from_slice(ciphertext);
        self.key
            .open_in_place_separate_tag(nonce(counter), Aad::empty(), Tag::from(tag), body, 0..)
            .map_err(|_| DropReason::Unauthenticated)?;
        Ok(n)
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CIPHERS: [Cipher; 2] = [Cipher::ChaCha20Poly1305, Cipher::Aes256Gcm];

    #[test]
    fn agreement_needs_both() {
        use Cipher::*;
        assert_eq!(Aes256Gcm.agree(Aes256Gcm), Aes256Gcm);
        assert_eq!(Aes256Gcm.agree(ChaCha20Poly1305), ChaCha20Poly1305);
        assert_eq!(ChaCha20Poly1305.agree(Aes256Gcm), ChaCha20Poly1305);
        assert!(Aes256Gcm.permits(Aes256Gcm) && Aes256Gcm.permits(ChaCha20Poly1305));
        assert!(!ChaCha20Poly1305.permits(Aes256Gcm));
    }

    proptest! {
        #[test]
        fn open_inverts_seal(aes in any::<bool>(), counter in any::<u64>(),
                             plain in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let cipher = CIPHERS[aes as usize];
            let key = DataKey::new(cipher, &[3; 32]);
            prop_assert_eq!(key.cipher(), cipher);
            let mut sealed = vec![0u8; plain.len() + TAG_LEN];
            prop_assert_eq!(key.seal(counter, &plain, &mut sealed), sealed.len());
            let mut out = vec![0u8; plain.len()];
            prop_assert_eq!(key.open(counter, &sealed, &mut out), Ok(plain.len()));
            prop_assert_eq!(&out, &plain);
            // Another counter, another cipher or one flipped bit: refused.
            prop_assert_eq!(key.open(counter ^ 1, &sealed, &mut out), Err(DropReason::Unauthenticated));
            let other = DataKey::new(CIPHERS[!aes as usize], &[3; 32]);
            prop_assert_eq!(other.open(counter, &sealed, &mut out), Err(DropReason::Unauthenticated));
            let at = counter as usize % sealed.len();
            sealed[at] ^= 0x80;
            prop_assert_eq!(key.open(counter, &sealed, &mut out), Err(DropReason::Unauthenticated));
        }
    }
}

//! X25519 static keys and their base64 text form (as `wg` prints them).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use snow::params::DHChoice;
use snow::resolvers::{CryptoResolver, DefaultResolver};

/// Why a key could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// Not valid base64.
    #[error("not valid base64")]
    Base64,
    /// Decoded to the wrong number of bytes.
    #[error("a key is 32 bytes (44 base64 characters), this one has {0} bytes")]
    Length(usize),
}

/// A static private key (32 bytes).
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; 32]);

/// A static public key (32 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PrivateKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).expect("the OS random source failed");
        Self(k)
    }

    /// The raw bytes (for the Noise builder).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        let mut dh = DefaultResolver
            .resolve_dh(&DHChoice::Curve25519)
            .expect("curve25519 is compiled in");
        dh.set(&self.0);
        PublicKey(
            dh.pubkey()
                .try_into()
                .expect("x25519 public keys are 32 bytes"),
        )
    }

    /// Parse base64 text, ignoring surrounding whitespace.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode(text).map(Self)
    }

    /// Base64 text.
    pub fn to_base64(&self) -> String {
        encode(&self.0)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(..)")
    }
}

impl PublicKey {
    /// Parse base64 text, ignoring surrounding whitespace.
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        decode(text).map(Self)
    }

    /// Base64 text.
    pub fn to_base64(&self) -> String {
        encode(&self.0)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

fn encode(key: &[u8; 32]) -> String {
    BASE64.encode(key)
}

fn decode(text: &str) -> Result<[u8; 32], KeyError> {
    let bytes = BASE64.decode(text.trim()).map_err(|_| KeyError::Base64)?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| KeyError::Length(b.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // RFC 7748 section 6.1 test vector (Alice).
    #[test]
    fn public_key_matches_rfc7748() {
        let hex = |s: &str| -> [u8; 32] {
            (0..32)
                .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
                .collect::<Vec<_>>()
                .try_into()
                .unwrap()
        };
        let private = PrivateKey(hex(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        let public = hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        assert_eq!(private.public_key().0, public);
    }

    #[test]
    fn base64_known_value() {
        let k = PublicKey([0xff; 32]);
        assert_eq!(
            k.to_base64(),
            "//////////////////////////////////////////8="
        );
        assert_eq!(
            PublicKey::from_base64(" //////////////////////////////////////////8=\n"),
            Ok(k)
        );
    }

    #[test]
    fn base64_errors() {
        assert_eq!(PublicKey::from_base64("abc="), Err(KeyError::Length(2)));
        assert_eq!(PublicKey::from_base64("a*c"), Err(KeyError::Base64));
    }

    proptest! {
        #[test]
        fn base64_round_trips(k: [u8; 32]) {
            prop_assert_eq!(PublicKey::from_base64(&PublicKey(k).to_base64()), Ok(PublicKey(k)));
        }

        #[test]
        fn decode_never_panics(s in ".{0,60}") {
            let _ = PublicKey::from_base64(&s);
        }
    }
}

//! Keys, the Noise IK handshake, data-message sealing and the replay window.
//!
//! The handshake is `Noise_IK_25519_ChaChaPoly_BLAKE2s` (via `snow`, with
//! ring's ChaCha20-Poly1305): the client knows the server's static key and
//! proves its own in the first message, so the server can refuse unknown
//! keys before it spends anything on them. Data messages use the split
//! transport keys with an explicit 64-bit counter as nonce, so they survive
//! loss and reordering, under ChaCha20-Poly1305 or, where both ends have
//! AES in hardware, AES-256-GCM.

mod cipher;
pub mod cookie;
mod handshake;
mod keys;
mod mac;
mod poll;
mod replay;
mod transport;

pub use cipher::Cipher;
pub use handshake::{Initiator, Responder};
pub use keys::{KeyError, PrivateKey, PublicKey};
pub use mac::{MAC_LEN, Mac1Key};
pub use poll::{
    POLL_AUTH_LEN, POLL_WINDOW_WORDS, PollCheck, PollCounter, PollGuard, PollKey, PollKind, widen,
};
pub use replay::ReplayWindow;
pub use transport::{REJECT_AFTER_MESSAGES, Reserved, SessionKeys};

/// The Noise protocol name.
pub(crate) const NOISE_PARAMS: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Bound into every handshake, so a handshake for another protocol or
/// version can never complete.
pub(crate) const PROLOGUE: &[u8] = b"iptun v1";

//! The tunnel's four message types.
//!
//! Every message starts with a 4-byte word: the type in the first byte and
//! three reserved zero bytes (they keep what follows 4-byte aligned and leave
//! room for flags). Integers are little-endian.
//!
//! ```text
//! Init      | 1 | 0 0 0 | sender u32 | noise IK message 1 (INIT_NOISE_LEN) | mac1 (16) | [mac2 (16)] |
//! Response  | 2 | 0 0 0 | sender u32 | receiver u32 | noise message 2 (...) |
//! Data      | 3 | 0 0 0 | receiver u32 | counter u64 | AEAD ciphertext+tag  |
//! Cookie    | 4 | 0 0 0 | receiver u32 | nonce (24) | sealed cookie (16+16) |
//! ```
//!
//! An init carries mac2 only when its sender holds a cookie (see
//! [`crypto::cookie`](crate::crypto::cookie)); the two lengths tell them apart.

use crate::DropReason;

/// Message type of a handshake initiation (client to server).
pub const TYPE_INIT: u8 = 1;
/// Message type of a handshake response (server to client).
pub const TYPE_RESPONSE: u8 = 2;
/// Message type of a data message (either way).
pub const TYPE_DATA: u8 = 3;
/// Message type of a cookie reply (server to client).
pub const TYPE_COOKIE: u8 = 4;

/// Bytes of the Noise payload carried in an init: a timestamp and padding.
pub const INIT_PAYLOAD_LEN: usize = 48;
/// Bytes of Noise IK message 1: ephemeral key, encrypted static key, encrypted payload.
pub const INIT_NOISE_LEN: usize = 32 + (32 + 16) + (INIT_PAYLOAD_LEN + 16);
/// Bytes of the init's MAC (see [`Mac1Key`](crate::crypto::Mac1Key)).
pub const INIT_MAC_LEN: usize = 16;
/// Total bytes of an init message without mac2.
pub const INIT_LEN: usize = 8 + INIT_NOISE_LEN + INIT_MAC_LEN;
/// Total bytes of an init message with mac2 (its sender holds a cookie).
pub const INIT_WITH_MAC2_LEN: usize = INIT_LEN + INIT_MAC_LEN;
/// Bytes of the cookie reply's nonce.
pub const COOKIE_NONCE_LEN: usize = 24;
/// Bytes of the cookie reply's sealed cookie (cookie and tag).
pub const SEALED_COOKIE_LEN: usize = 16 + TAG_LEN;
/// Total bytes of a cookie reply.
pub const COOKIE_REPLY_LEN: usize = 8 + COOKIE_NONCE_LEN + SEALED_COOKIE_LEN;
/// Bytes of Noise IK message 2 carrying a [`TunnelConfig`](super::TunnelConfig).
pub const RESPONSE_NOISE_LEN: usize = 32 + (super::config::CONFIG_LEN + 16);
/// Total bytes of a response message.
pub const RESPONSE_LEN: usize = 12 + RESPONSE_NOISE_LEN;
/// Bytes before the ciphertext of a data message.
pub const DATA_HEADER_LEN: usize = 16;
/// Bytes of the AEAD tag.
pub const TAG_LEN: usize = 16;
/// Bytes a data message adds around an inner packet.
pub const DATA_OVERHEAD: usize = DATA_HEADER_LEN + TAG_LEN;

// The no-amplification rule, checked at compile time: the server's answer to
// an init is never larger than the init.
const _: () = assert!(RESPONSE_LEN <= INIT_LEN);
const _: () = assert!(COOKIE_REPLY_LEN <= INIT_LEN);

/// A parsed message, borrowing from the datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// Handshake initiation.
    Init {
        /// The initiator's index for this handshake.
        sender: u32,
        /// Noise IK message 1.
        noise: &'a [u8],
        /// The bytes the MAC covers (everything before it).
        signed: &'a [u8],
        /// The MAC over `signed`, keyed by the server's public key.
        mac1: &'a [u8],
        /// The MAC over everything before it (`signed` and `mac1`), keyed
        /// by a cookie the server gave; only when the sender holds one.
        mac2: Option<&'a [u8]>,
    },
    /// Handshake response.
    Response {
        /// The responder's index for the new session.
        sender: u32,
        /// The initiator's index from the init.
        receiver: u32,
        /// Noise IK message 2.
        noise: &'a [u8],
    },
    /// Encrypted data (an inner IP packet, or nothing for a keepalive).
    Data {
        /// The index the receiver chose for this session.
        receiver: u32,
        /// The nonce: a per-session counter, never reused.
        counter: u64,
        /// Ciphertext followed by the 16-byte tag.
        ciphertext: &'a [u8],
    },
    /// A cookie reply: the server is under load and wants the init again
    /// with mac2.
    Cookie {
        /// The initiator's index from the init.
        receiver: u32,
        /// The AEAD nonce.
        nonce: &'a [u8],
        /// The cookie sealed under the server's cookie key.
        sealed: &'a [u8],
    },
}

impl<'a> Message<'a> {
    /// Parse a datagram. Never panics.
    pub fn parse(buf: &'a [u8]) -> Result<Self, DropReason> {
        if buf.len() < 4 || buf[1..4] != [0, 0, 0] {
            return Err(DropReason::Malformed);
        }
        match buf[0] {
            TYPE_INIT if buf.len() == INIT_LEN || buf.len() == INIT_WITH_MAC2_LEN => {
                Ok(Self::Init {
                    sender: u32_at(buf, 4),
                    noise: &buf[8..INIT_LEN - INIT_MAC_LEN],
                    signed: &buf[..INIT_LEN - INIT_MAC_LEN],
                    mac1: &buf[INIT_LEN - INIT_MAC_LEN..INIT_LEN],
                    mac2: (buf.len() == INIT_WITH_MAC2_LEN).then(|| &buf[INIT_LEN..]),
                })
            }
            TYPE_RESPONSE if buf.len() == RESPONSE_LEN => Ok(Self::Response {
                sender: u32_at(buf, 4),
                receiver: u32_at(buf, 8),
                noise: &buf[12..],
            }),
            TYPE_DATA if buf.len() >= DATA_OVERHEAD => Ok(Self::Data {
                receiver: u32_at(buf, 4),
                counter: u64::from_le_bytes(buf[8..16].try_into().unwrap()),
                ciphertext: &buf[DATA_HEADER_LEN..],
            }),
            TYPE_COOKIE if buf.len() == COOKIE_REPLY_LEN => Ok(Self::Cookie {
                receiver: u32_at(buf, 4),
                nonce: &buf[8..8 + COOKIE_NONCE_LEN],
                sealed: &buf[8 + COOKIE_NONCE_LEN..],
            }),
            _ => Err(DropReason::Malformed),
        }
    }

    /// Write the header of an init into `buf[..8]`; the Noise message and the MAC follow.
    pub fn emit_init_header(sender: u32, buf: &mut [u8]) {
        buf[..4].copy_from_slice(&[TYPE_INIT, 0, 0, 0]);
        buf[4..8].copy_from_slice(&sender.to_le_bytes());
    }

    /// Write the header of a response into `buf[..12]`; the Noise message follows.
    pub fn emit_response_header(sender: u32, receiver: u32, buf: &mut [u8]) {
        buf[..4].copy_from_slice(&[TYPE_RESPONSE, 0, 0, 0]);
        buf[4..8].copy_from_slice(&sender.to_le_bytes());
        buf[8..12].copy_from_slice(&receiver.to_le_bytes());
    }

    /// Write the header of a cookie reply into `buf[..8]`; the nonce and
    /// the sealed cookie follow.
    pub fn emit_cookie_header(receiver: u32, buf: &mut [u8]) {
        buf[..4].copy_from_slice(&[TYPE_COOKIE, 0, 0, 0]);
        buf[4..8].copy_from_slice(&receiver.to_le_bytes());
    }

    /// Write the header of a data message into `buf[..16]`.
    pub fn emit_data_header(receiver: u32, counter: u64, buf: &mut [u8]) {
        buf[..4].copy_from_slice(&[TYPE_DATA, 0, 0, 0]);
        buf[4..8].copy_from_slice(&receiver.to_le_bytes());
        buf[8..16].copy_from_slice(&counter.to_le_bytes());
    }
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    static DATA_BYTES: [u8; 36] = [
        0x03, 0x00, 0x00, 0x00, // type, reserved
        0x78, 0x56, 0x34, 0x12, // receiver 0x12345678
        0x02, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // counter 0x0102
        0xaa, 0xaa, 0xaa, 0xaa, // ciphertext (4 bytes)
        0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, // tag
        0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb, 0xbb,
    ];

    #[test]
    fn parse_data() {
        let m = Message::parse(&DATA_BYTES).unwrap();
        assert_eq!(
            m,
            Message::Data {
                receiver: 0x1234_5678,
                counter: 0x102,
                ciphertext: &DATA_BYTES[16..]
            }
        );
    }

    #[test]
    fn emit_data_header_matches_bytes() {
        let mut buf = [0u8; 16];
        Message::emit_data_header(0x1234_5678, 0x102, &mut buf);
        assert_eq!(buf, DATA_BYTES[..16]);
    }

    #[test]
    fn sizes_are_as_documented() {
        assert_eq!(INIT_LEN, 8 + 32 + 48 + 64 + 16);
        assert_eq!(RESPONSE_LEN, 12 + 32 + 48 + 16);
        assert_eq!(COOKIE_REPLY_LEN, 8 + 24 + 16 + 16);
        assert_eq!(INIT_WITH_MAC2_LEN, INIT_LEN + 16);
    }

    #[test]
    fn rejects_bad_type_reserved_and_lengths() {
        let mut bad = DATA_BYTES;
        bad[1] = 1;
        assert_eq!(Message::parse(&bad), Err(DropReason::Malformed));
        bad = DATA_BYTES;
        bad[0] = 9;
        assert_eq!(Message::parse(&bad), Err(DropReason::Malformed));
        assert_eq!(
            Message::parse(&DATA_BYTES[..31]),
            Err(DropReason::Malformed)
        );
        assert_eq!(Message::parse(&[1, 0, 0, 0]), Err(DropReason::Malformed));
        assert_eq!(Message::parse(&[]), Err(DropReason::Malformed));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Message::parse(&bytes);
        }

        #[test]
        fn data_round_trips(receiver: u32, counter: u64, body in proptest::collection::vec(any::<u8>(), 16..200)) {
            let mut buf = vec![0u8; 16 + body.len()];
            Message::emit_data_header(receiver, counter, &mut buf);
            buf[16..].copy_from_slice(&body);
            prop_assert_eq!(Message::parse(&buf), Ok(Message::Data { receiver, counter, ciphertext: &body[..] }));
        }

        #[test]
        fn handshake_headers_round_trip(sender: u32, receiver: u32, fill: u8) {
            let mut init = vec![fill; INIT_LEN];
            Message::emit_init_header(sender, &mut init);
            let (signed, mac1) = init.split_at(INIT_LEN - INIT_MAC_LEN);
            prop_assert_eq!(Message::parse(&init), Ok(Message::Init { sender, noise: &signed[8..], signed, mac1, mac2: None }));
            let mut with_mac2 = init.clone();
            with_mac2.extend_from_slice(&[fill; INIT_MAC_LEN]);
            let Ok(Message::Init { mac1: m1, mac2, .. }) = Message::parse(&with_mac2) else { panic!() };
            prop_assert_eq!((m1, mac2), (mac1, Some(&with_mac2[INIT_LEN..])));
            let mut cookie = vec![fill; COOKIE_REPLY_LEN];
            Message::emit_cookie_header(receiver, &mut cookie);
            prop_assert_eq!(Message::parse(&cookie), Ok(Message::Cookie { receiver, nonce: &cookie[8..32], sealed: &cookie[32..] }));
            let mut resp = vec![fill; RESPONSE_LEN];
            Message::emit_response_header(sender, receiver, &mut resp);
            prop_assert_eq!(Message::parse(&resp), Ok(Message::Response { sender, receiver, noise: &resp[12..] }));
        }
    }
}

//! The tunnel configuration the server hands the client inside its
//! (encrypted) handshake response.
//!
//! ```text
//! 0      1      2          3          4        6              8
//! | ver  | flags| prefix4  | prefix6  | mtu u16| keepalive u16 |
//! 8: client IPv4 (4) | 12: server IPv4 (4) | 16: client IPv6 (16) | 32: server IPv6 (16) | 48
//! ```
//! `flags` bit 0: the IPv6 fields are present (otherwise zero); bit 1: data
//! messages are sealed with AES-256-GCM, not ChaCha20-Poly1305 (set only
//! when the client offered it). Integers are little-endian. Version 1 is the
//! only one defined.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::DropReason;
use crate::crypto::Cipher;

/// Encoded length of a [`TunnelConfig`].
pub const CONFIG_LEN: usize = 48;
const VERSION: u8 = 1;
const FLAG_IPV6: u8 = 1;
const FLAG_AES256GCM: u8 = 2;

/// What a client needs to configure its side of the tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelConfig {
    /// The client's tunnel address.
    pub client_v4: Ipv4Addr,
    /// The server's tunnel address (the gateway for `--route`).
    pub server_v4: Ipv4Addr,
    /// Prefix length of the tunnel network.
    pub prefix_v4: u8,
    /// The client's and the server's IPv6 tunnel addresses, and the prefix length.
    pub v6: Option<(Ipv6Addr, Ipv6Addr, u8)>,
    /// MTU of the TUN devices.
    pub mtu: u16,
    /// Seconds between keepalives when the tunnel is idle.
    pub keepalive_secs: u16,
    /// The cipher of the session's data messages.
    pub cipher: Cipher,
}

impl TunnelConfig {
    /// Encode into exactly [`CONFIG_LEN`] bytes.
    pub fn emit(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0] = VERSION;
        b[2] = self.prefix_v4;
        b[4..6].copy_from_slice(&self.mtu.to_le_bytes());
        b[6..8].copy_from_slice(&self.keepalive_secs.to_le_bytes());
        b[8..12].copy_from_slice(&self.client_v4.octets());
        b[12..16].copy_from_slice(&self.server_v4.octets());
        if self.cipher == Cipher::Aes256Gcm {
            b[1] |= FLAG_AES256GCM;
        }
        if let Some((client, server, prefix)) = self.v6 {
            b[1] |= FLAG_IPV6;
            b[3] = prefix;
            b[16..32].copy_from_slice(&client.octets());
            b[32..48].copy_from_slice(&server.octets());
        }
        b
    }

    /// Decode and validate. Never panics.
    pub fn parse(b: &[u8]) -> Result<Self, DropReason> {
        let b: &[u8; CONFIG_LEN] = b.try_into().map_err(|_| DropReason::Malformed)?;
        let mtu = u16::from_le_bytes([b[4], b[5]]);
        if b[0] != VERSION
            || b[1] & !(FLAG_IPV6 | FLAG_AES256GCM) != 0
            || b[2] > 32
            || b[3] > 128
            || mtu < 576
        {
            return Err(DropReason::Malformed);
        }
        let v4 = |at: usize| Ipv4Addr::from(<[u8; 4]>::try_from(&b[at..at + 4]).unwrap());
        let v6 = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&b[at..at + 16]).unwrap());
        Ok(Self {
            client_v4: v4(8),
            server_v4: v4(12),
            prefix_v4: b[2],
            v6: (b[1] & FLAG_IPV6 != 0).then(|| (v6(16), v6(32), b[3])),
            mtu,
            keepalive_secs: u16::from_le_bytes([b[6], b[7]]),
            cipher: if b[1] & FLAG_AES256GCM != 0 {
                Cipher::Aes256Gcm
            } else {
                Cipher::ChaCha20Poly1305
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout() {
        let c = TunnelConfig {
            client_v4: Ipv4Addr::new(10, 1, 0, 2),
            server_v4: Ipv4Addr::new(10, 1, 0, 1),
            prefix_v4: 24,
            v6: None,
            mtu: 1420,
            keepalive_secs: 10,
            cipher: Cipher::ChaCha20Poly1305,
        };
        let b = c.emit();
        assert_eq!(
            &b[..16],
            &[1, 0, 24, 0, 0x8c, 0x05, 10, 0, 10, 1, 0, 2, 10, 1, 0, 1]
        );
        assert!(b[16..].iter().all(|&x| x == 0));
        assert_eq!(TunnelConfig::parse(&b), Ok(c));
    }

    #[test]
    fn rejects_bad_fields() {
        let good = TunnelConfig {
            client_v4: Ipv4Addr::new(10, 1, 0, 2),
            server_v4: Ipv4Addr::new(10, 1, 0, 1),
            prefix_v4: 24,
            v6: None,
            mtu: 1420,
            keepalive_secs: 10,
            cipher: Cipher::ChaCha20Poly1305,
        }
        .emit();
        for (at, value) in [(0, 2), (1, 0x80), (1, 4), (2, 33), (3, 129), (5, 0)] {
            let mut b = good;
            b[at] = value;
            assert_eq!(
                TunnelConfig::parse(&b),
                Err(DropReason::Malformed),
                "byte {at}"
            );
        }
        assert_eq!(TunnelConfig::parse(&good[..47]), Err(DropReason::Malformed));
    }

    proptest! {
        #[test]
        fn round_trips(c4: [u8; 4], s4: [u8; 4], p4 in 0u8..=32, v6 in proptest::option::of((any::<[u8; 16]>(), any::<[u8; 16]>(), 0u8..=128)), mtu in 576u16.., ka: u16, aes: bool) {
            let c = TunnelConfig {
                client_v4: c4.into(), server_v4: s4.into(), prefix_v4: p4,
                v6: v6.map(|(a, b, p)| (a.into(), b.into(), p)), mtu, keepalive_secs: ka, cipher: if aes { Cipher::Aes256Gcm } else { Cipher::ChaCha20Poly1305 },
            };
            prop_assert_eq!(TunnelConfig::parse(&c.emit()), Ok(c));
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = TunnelConfig::parse(&bytes);
        }
    }
}

//! Control messages: what a data message carries when it carries neither an
//! inner IP packet nor nothing (a keepalive).
//!
//! They share the data message's keys, counter and replay window, so they
//! are authenticated exactly as inner packets are, and they are told from
//! IP packets by their first byte: an IP packet starts with its version
//! (4 or 6) in the high nibble, a control message with a zero high nibble.
//!
//! ```text
//! | kind u8 | reserved [3] = 0 | id u32 LE | reply_len u16 LE | padding ... |
//! ```
//!
//! - `Probe` (client → server): "does this path carry the session?". The
//!   server answers on the path the probe came from, with a `ProbeReply` of
//!   the same `id` padded to `reply_len` bytes (at most the session's MTU),
//!   and does **not** move the session to that path: a client probes its
//!   standby paths without pulling its downstream away from the one in use.
//!   Padding lets a probe measure a path's throughput each way.
//! - `ProbeReply` (server → client): `reply_len` holds the length of the
//!   probe it answers, so the client learns what reached the server.

use crate::DropReason;

/// Bytes of a control message before its padding.
pub const CONTROL_LEN: usize = 10;

/// What a control message asks or answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlKind {
    /// The client asks for a reply on this path.
    Probe = 1,
    /// The server's answer to a probe.
    ProbeReply = 2,
}

/// A parsed control message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Control {
    /// Probe or reply.
    pub kind: ControlKind,
    /// Chosen by the client, echoed by the server.
    pub id: u32,
    /// In a probe: the length the reply should have. In a reply: the
    /// length of the probe it answers.
    pub len: u16,
}

impl Control {
    /// Whether a plaintext is a control message rather than an IP packet
    /// (or a keepalive, which is empty).
    pub fn is_control(plaintext: &[u8]) -> bool {
        plaintext.first().is_some_and(|b| b >> 4 == 0)
    }

    /// Parse a plaintext that [`Control::is_control`] says is one.
    pub fn parse(plaintext: &[u8]) -> Result<Self, DropReason> {
        let head: &[u8; CONTROL_LEN] = plaintext.first_chunk().ok_or(DropReason::BadInnerPacket)?;
        let kind = match head[0] {
            1 => ControlKind::Probe,
            2 => ControlKind::ProbeReply,
            _ => return Err(DropReason::BadInnerPacket),
        };
        if head[1..4] != [0, 0, 0] {
            return Err(DropReason::BadInnerPacket);
        }
        Ok(Self {
            kind,
            id: u32::from_le_bytes([head[4], head[5], head[6], head[7]]),
            len: u16::from_le_bytes([head[8], head[9]]),
        })
    }

    /// Write the message, padded with zeros to `total` bytes (at least
    /// [`CONTROL_LEN`]), into `out`; returns its length.
    pub fn emit(&self, total: usize, out: &mut [u8]) -> Result<usize, DropReason> {
        let total = total.max(CONTROL_LEN);
        let out = out.get_mut(..total).ok_or(DropReason::TooLarge)?;
        out.fill(0);
        out[0] = self.kind as u8;
        out[4..8].copy_from_slice(&self.id.to_le_bytes());
        out[8..10].copy_from_slice(&self.len.to_le_bytes());
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout() {
        let mut b = [0xffu8; 16];
        let p = Control {
            kind: ControlKind::Probe,
            id: 0x0403_0201,
            len: 0x0605,
        };
        assert_eq!(p.emit(12, &mut b), Ok(12));
        assert_eq!(b[..12], [1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 0, 0]);
        assert_eq!(Control::parse(&b[..12]), Ok(p));
        assert!(Control::is_control(&b));
    }

    #[test]
    fn ip_packets_and_keepalives_are_not_control() {
        assert!(!Control::is_control(&[0x45, 0, 0, 20]));
        assert!(!Control::is_control(&[0x60]));
        assert!(!Control::is_control(&[]));
    }

    #[test]
    fn rejects_unknown_kinds_reserved_bits_and_short_messages() {
        assert!(Control::parse(&[3, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(Control::parse(&[1, 1, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(Control::parse(&[1, 0, 0, 0, 0]).is_err());
        let mut small = [0u8; 4];
        let p = Control {
            kind: ControlKind::ProbeReply,
            id: 1,
            len: 2,
        };
        assert_eq!(p.emit(0, &mut small), Err(DropReason::TooLarge));
    }

    proptest! {
        #[test]
        fn round_trips(reply: bool, id: u32, len: u16, pad in 0usize..64) {
            let kind = if reply { ControlKind::ProbeReply } else { ControlKind::Probe };
            let c = Control { kind, id, len };
            let mut b = vec![0; CONTROL_LEN + pad];
            let n = c.emit(CONTROL_LEN + pad, &mut b).unwrap();
            prop_assert_eq!(n, CONTROL_LEN + pad);
            prop_assert_eq!(Control::parse(&b[..n]), Ok(c));
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            let _ = Control::is_control(&bytes);
            let _ = Control::parse(&bytes);
        }
    }
}

//! ICMP echo as a carrier: tunnel messages ride in the payload of echo
//! requests (client to server) and echo replies (server to client), behind
//! a 4-byte magic that tells them from ordinary pings. Headers are parsed and
//! built with `etherparse`; ICMPv4 checksums are verified and computed here,
//! ICMPv6 checksums (which cover a pseudo-header with the addresses) by the
//! kernel, which does both for raw ICMPv6 sockets.

use std::net::Ipv4Addr;

use etherparse::{
    IcmpEchoHeader, Icmpv4Header, Icmpv4Slice, Icmpv4Type, Icmpv6Header, Icmpv6Slice, Icmpv6Type,
    Ipv4HeaderSlice,
};

use crate::DropReason;

/// Tunnel messages in echo payloads start with these bytes.
pub const MAGIC: [u8; 4] = *b"iPtN";
/// Bytes of an echo header.
pub const ECHO_HEADER_LEN: usize = 8;
/// Bytes an ICMP carrier adds in front of a tunnel message.
pub const OVERHEAD: usize = ECHO_HEADER_LEN + MAGIC.len();

/// ICMP for IPv4 or ICMPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// ICMP over IPv4.
    V4,
    /// ICMPv6.
    V6,
}

/// A parsed echo request or reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Echo<'a> {
    /// A reply (else a request).
    pub reply: bool,
    /// The identifier (NATs may rewrite it).
    pub id: u16,
    /// The sequence number.
    pub seq: u16,
    /// Everything after the 8-byte header.
    pub payload: &'a [u8],
}

impl<'a> Echo<'a> {
    /// Parse an ICMP message (without IP header). Only echo requests and
    /// replies pass; a bad ICMPv4 checksum fails. Never panics.
    pub fn parse(family: Family, icmp: &'a [u8]) -> Result<Self, DropReason> {
        let (reply, echo, payload) = match family {
            Family::V4 => {
                let s = Icmpv4Slice::from_slice(icmp).map_err(|_| DropReason::Malformed)?;
                let (reply, echo) = match s.icmp_type() {
                    Icmpv4Type::EchoRequest(e) => (false, e),
                    Icmpv4Type::EchoReply(e) => (true, e),
                    _ => return Err(DropReason::Malformed),
                };
                if Icmpv4Header::with_checksum(s.icmp_type(), s.payload()).checksum != s.checksum()
                {
                    return Err(DropReason::Malformed);
                }
                (reply, echo, s.payload())
            }
            Family::V6 => {
                let s = Icmpv6Slice::from_slice(icmp).map_err(|_| DropReason::Malformed)?;
                match s.icmp_type() {
                    Icmpv6Type::EchoRequest(e) => (false, e, s.payload()),
                    Icmpv6Type::EchoReply(e) => (true, e, s.payload()),
                    _ => return Err(DropReason::Malformed),
                }
            }
        };
        Ok(Self {
            reply,
            id: echo.id,
            seq: echo.seq,
            payload,
        })
    }

    /// The tunnel message this echo carries, if it is one of ours.
    pub fn tunnel_message(&self) -> Option<&'a [u8]> {
        self.payload.strip_prefix(&MAGIC)
    }
}

/// Write an echo header into `buf[..8]` for the `payload_len` bytes already
/// at `buf[8..]`; returns the whole message's length.
pub fn emit_echo(
    family: Family,
    reply: bool,
    id: u16,
    seq: u16,
    buf: &mut [u8],
    payload_len: usize,
) -> usize {
    let echo = IcmpEchoHeader { id, seq };
    let len = ECHO_HEADER_LEN + payload_len;
    match family {
        Family::V4 => {
            let ty = if reply {
                Icmpv4Type::EchoReply(echo)
            } else {
                Icmpv4Type::EchoRequest(echo)
            };
            let header = Icmpv4Header::with_checksum(ty, &buf[ECHO_HEADER_LEN..len]).to_bytes();
            buf[..ECHO_HEADER_LEN].copy_from_slice(&header);
        }
        Family::V6 => {
            let ty = if reply {
                Icmpv6Type::EchoReply(echo)
            } else {
                Icmpv6Type::EchoRequest(echo)
            };
            buf[..ECHO_HEADER_LEN].copy_from_slice(&Icmpv6Header::new(ty).to_bytes());
        }
    }
    len
}

/// Write `MAGIC` into `buf[8..12]`: the tunnel message goes at `buf[12..]`.
pub fn emit_magic(buf: &mut [u8]) {
    buf[ECHO_HEADER_LEN..OVERHEAD].copy_from_slice(&MAGIC);
}

/// Split what a raw IPv4 socket delivers into the source and destination
/// addresses and the ICMP message. Never panics.
pub fn strip_ipv4(packet: &[u8]) -> Result<(Ipv4Addr, Ipv4Addr, &[u8]), DropReason> {
    let ip = Ipv4HeaderSlice::from_slice(packet).map_err(|_| DropReason::Malformed)?;
    let end = usize::from(ip.total_len()).min(packet.len());
    let start = ip.slice().len();
    let icmp = packet.get(start..end).ok_or(DropReason::Malformed)?;
    Ok((ip.source_addr(), ip.destination_addr(), icmp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // `ping -c1 -p 41` style request: id 0x1234, seq 1, payload "AAAA".
    static REQUEST_V4: [u8; 12] = [
        8, 0, 0x63, 0x48, 0x12, 0x34, 0x00, 0x01, 0x41, 0x41, 0x41, 0x41,
    ];

    #[test]
    fn parse_v4_request() {
        let e = Echo::parse(Family::V4, &REQUEST_V4).unwrap();
        assert_eq!(
            e,
            Echo {
                reply: false,
                id: 0x1234,
                seq: 1,
                payload: b"AAAA"
            }
        );
        assert_eq!(e.tunnel_message(), None);
    }

    #[test]
    fn bad_v4_checksum_fails() {
        let mut bad = REQUEST_V4;
        bad[2] ^= 1;
        assert_eq!(Echo::parse(Family::V4, &bad), Err(DropReason::Malformed));
    }

    #[test]
    fn emit_matches_bytes_and_round_trips() {
        let mut buf = [0u8; 12];
        buf[8..].copy_from_slice(b"AAAA");
        assert_eq!(emit_echo(Family::V4, false, 0x1234, 1, &mut buf, 4), 12);
        assert_eq!(buf, REQUEST_V4);
    }

    #[test]
    fn tunnel_messages_carry_magic() {
        let mut buf = [0u8; 16];
        emit_magic(&mut buf);
        buf[12..].copy_from_slice(b"msg!");
        let n = emit_echo(Family::V6, true, 7, 9, &mut buf, 8);
        let e = Echo::parse(Family::V6, &buf[..n]).unwrap();
        assert!(e.reply);
        assert_eq!(
            (e.id, e.seq, e.tunnel_message()),
            (7, 9, Some(&b"msg!"[..]))
        );
    }

    #[test]
    fn other_icmp_is_refused() {
        // Destination unreachable.
        let unreachable = [3u8, 1, 0xfc, 0xfe, 0, 0, 0, 0];
        assert_eq!(
            Echo::parse(Family::V4, &unreachable),
            Err(DropReason::Malformed)
        );
        assert_eq!(
            Echo::parse(Family::V4, &[8, 0, 0]),
            Err(DropReason::Malformed)
        );
    }

    #[test]
    fn strips_ipv4_header() {
        let mut p = vec![
            0x45, 0, 0, 32, 0, 0, 0, 0, 64, 1, 0, 0, 192, 0, 2, 2, 192, 0, 2, 1,
        ];
        p.extend_from_slice(&REQUEST_V4);
        let (src, dst, icmp) = strip_ipv4(&p).unwrap();
        assert_eq!(src, Ipv4Addr::new(192, 0, 2, 2));
        assert_eq!(dst, Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(icmp, REQUEST_V4);
        assert!(strip_ipv4(&p[..10]).is_err());
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), v6: bool) {
            let family = if v6 { Family::V6 } else { Family::V4 };
            let _ = Echo::parse(family, &bytes).map(|e| e.tunnel_message());
            let _ = strip_ipv4(&bytes);
        }

        #[test]
        fn round_trips(reply: bool, id: u16, seq: u16, v6: bool, msg in proptest::collection::vec(any::<u8>(), 0..100)) {
            let family = if v6 { Family::V6 } else { Family::V4 };
            let mut buf = vec![0u8; OVERHEAD + msg.len()];
            emit_magic(&mut buf);
            buf[OVERHEAD..].copy_from_slice(&msg);
            let n = emit_echo(family, reply, id, seq, &mut buf, MAGIC.len() + msg.len());
            let e = Echo::parse(family, &buf[..n]).unwrap();
            prop_assert_eq!((e.reply, e.id, e.seq, e.tunnel_message()), (reply, id, seq, Some(&msg[..])));
        }
    }
}

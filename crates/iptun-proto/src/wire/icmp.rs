//! ICMP echo as a carrier: tunnel messages ride in the payload of echo
//! requests (client to server) and echo replies (server to client), behind
//! a 4-byte magic that tells them from ordinary pings; in replies, the
//! magic is followed by what the server tells of the request answered
//! ([`ReplyInfo`]: when it arrived among the session's, and how long it was
//! held), for the client's congestion control. Headers are parsed and
//! built with `etherparse`; ICMPv4 checksums are verified and computed here,
//! ICMPv6 checksums (which cover a pseudo-header with the addresses) by the
//! kernel, which does both for raw ICMPv6 sockets.

use std::net::Ipv4Addr;
use std::time::Duration;

use etherparse::{
    IcmpEchoHeader, Icmpv4Header, Icmpv4Slice, Icmpv4Type, Icmpv6Header, Icmpv6Slice, Icmpv6Type,
    Ipv4HeaderSlice,
};

use crate::DropReason;

/// Tunnel messages in echo payloads start with these bytes.
pub const MAGIC: [u8; 4] = *b"iPtN";
/// Bytes of an echo header.
pub const ECHO_HEADER_LEN: usize = 8;
/// Bytes in front of the tunnel message in an echo request.
pub const REQUEST_OVERHEAD: usize = ECHO_HEADER_LEN + MAGIC.len();
/// Bytes of [`ReplyInfo`], after the magic of a reply.
pub const REPLY_INFO_LEN: usize = 6;
/// Bytes in front of the tunnel message in an echo reply.
pub const REPLY_OVERHEAD: usize = REQUEST_OVERHEAD + REPLY_INFO_LEN;
/// The most bytes an ICMP carrier adds in front of a tunnel message, either
/// way (what the inner MTU must leave room for).
pub const OVERHEAD: usize = REPLY_OVERHEAD;

/// What an echo reply tells of the request it answers: the server counts
/// the requests of each session that reach it, and holds some. From the
/// count the client tells how many of its requests were lost on the way
/// (it knows how many it sent), and without the hold it measures true
/// round trips.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyInfo {
    /// The request's number among the session's requests that reached the
    /// server (counting from one, wrapping).
    pub ordinal: u32,
    /// How long the server held it; `None` when longer than the field can
    /// tell ([`ReplyInfo::MAX_HOLD`]).
    pub hold: Option<Duration>,
}

impl ReplyInfo {
    /// The hold is told in units of this.
    pub const HOLD_UNIT: Duration = Duration::from_micros(100);
    /// The longest hold the field tells (longer reads as `None`).
    pub const MAX_HOLD: Duration = Duration::from_micros(100 * (u16::MAX as u64 - 1));

    /// Write it at `buf[..REPLY_INFO_LEN]`: the ordinal (u32, network
    /// order), then the hold in units of [`ReplyInfo::HOLD_UNIT`] (u16,
    /// network order; `0xffff`: longer than the field tells). The hold
    /// rounds down.
    pub fn emit(&self, buf: &mut [u8]) {
        let units = self
            .hold
            .filter(|h| *h <= Self::MAX_HOLD)
            .map_or(u16::MAX, |h| (h.as_micros() / 100) as u16);
        buf[..4].copy_from_slice(&self.ordinal.to_be_bytes());
        buf[4..REPLY_INFO_LEN].copy_from_slice(&units.to_be_bytes());
    }

    /// Read it from the start of `bytes`; the rest is the tunnel message.
    pub fn parse(bytes: &[u8]) -> Option<(Self, &[u8])> {
        let (head, rest) = bytes.split_first_chunk::<REPLY_INFO_LEN>()?;
        let ordinal = u32::from_be_bytes(head[..4].try_into().expect("4 bytes"));
        let units = u16::from_be_bytes([head[4], head[5]]);
        let hold = (units != u16::MAX).then(|| Self::HOLD_UNIT * u32::from(units));
        Some((Self { ordinal, hold }, rest))
    }
}

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

    /// What follows the magic, if this echo is one of ours: a request's
    /// tunnel message; a reply's [`ReplyInfo`] and tunnel message (see
    /// [`Echo::tunnel_reply`]).
    pub fn tunnel_message(&self) -> Option<&'a [u8]> {
        self.payload.strip_prefix(&MAGIC)
    }

    /// The reply info and tunnel message of a reply that is one of ours.
    pub fn tunnel_reply(&self) -> Option<(ReplyInfo, &'a [u8])> {
        self.tunnel_message()
            .filter(|_| self.reply)
            .and_then(ReplyInfo::parse)
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

/// Write `MAGIC` into `buf[8..12]`: a request's tunnel message goes at
/// `buf[12..]`.
pub fn emit_magic(buf: &mut [u8]) {
    buf[ECHO_HEADER_LEN..REQUEST_OVERHEAD].copy_from_slice(&MAGIC);
}

/// Write `MAGIC` and `info` into `buf[8..18]`: a reply's tunnel message goes
/// at `buf[18..]`.
pub fn emit_reply_head(buf: &mut [u8], info: ReplyInfo) {
    emit_magic(buf);
    info.emit(&mut buf[REQUEST_OVERHEAD..REPLY_OVERHEAD]);
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

    #[test]
    fn replies_carry_their_info() {
        let mut buf = [0u8; 22];
        let info = ReplyInfo {
            ordinal: 0x0102_0304,
            hold: Some(Duration::from_millis(5000)),
        };
        emit_reply_head(&mut buf, info);
        buf[18..].copy_from_slice(b"msg!");
        let n = emit_echo(Family::V4, true, 7, 9, &mut buf, 14);
        assert_eq!(&buf[8..18], b"iPtN\x01\x02\x03\x04\xc3\x50");
        let e = Echo::parse(Family::V4, &buf[..n]).unwrap();
        assert_eq!(e.tunnel_reply(), Some((info, &b"msg!"[..])));
        // A request has no reply info; a reply too short for it is refused.
        let n = emit_echo(Family::V4, false, 7, 9, &mut buf, 14);
        assert_eq!(
            Echo::parse(Family::V4, &buf[..n]).unwrap().tunnel_reply(),
            None
        );
        let n = emit_echo(Family::V4, true, 7, 9, &mut buf, 9);
        assert_eq!(
            Echo::parse(Family::V4, &buf[..n]).unwrap().tunnel_reply(),
            None
        );
    }

    #[test]
    fn holds_too_long_to_tell_read_as_none() {
        let mut b = [0u8; REPLY_INFO_LEN];
        for (hold, back) in [
            (
                Some(Duration::from_micros(250)),
                Some(Duration::from_micros(200)),
            ),
            (Some(ReplyInfo::MAX_HOLD), Some(ReplyInfo::MAX_HOLD)),
            (Some(ReplyInfo::MAX_HOLD + ReplyInfo::HOLD_UNIT), None),
            (Some(Duration::from_secs(3600)), None),
            (None, None),
        ] {
            ReplyInfo { ordinal: 1, hold }.emit(&mut b);
            assert_eq!(ReplyInfo::parse(&b).unwrap().0.hold, back, "{hold:?}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), v6: bool) {
            let family = if v6 { Family::V6 } else { Family::V4 };
            let _ = Echo::parse(family, &bytes).map(|e| (e.tunnel_message(), e.tunnel_reply()));
            let _ = strip_ipv4(&bytes);
            let _ = ReplyInfo::parse(&bytes);
        }

        #[test]
        fn reply_info_round_trips(ordinal: u32, units in 0u32..65535, msg in proptest::collection::vec(any::<u8>(), 0..40)) {
            let info = ReplyInfo { ordinal, hold: Some(ReplyInfo::HOLD_UNIT * units) };
            let mut buf = vec![0u8; REPLY_INFO_LEN + msg.len()];
            info.emit(&mut buf);
            buf[REPLY_INFO_LEN..].copy_from_slice(&msg);
            prop_assert_eq!(ReplyInfo::parse(&buf), Some((info, &msg[..])));
        }

        #[test]
        fn round_trips(reply: bool, id: u16, seq: u16, v6: bool, msg in proptest::collection::vec(any::<u8>(), 0..100)) {
            let family = if v6 { Family::V6 } else { Family::V4 };
            let mut buf = vec![0u8; REQUEST_OVERHEAD + msg.len()];
            emit_magic(&mut buf);
            buf[REQUEST_OVERHEAD..].copy_from_slice(&msg);
            let n = emit_echo(family, reply, id, seq, &mut buf, MAGIC.len() + msg.len());
            let e = Echo::parse(family, &buf[..n]).unwrap();
            prop_assert_eq!((e.reply, e.id, e.seq, e.tunnel_message()), (reply, id, seq, Some(&msg[..])));
        }
    }
}

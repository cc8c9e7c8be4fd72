//! The few fields of inner IPv4/IPv6 packets the engines route on.
//!
//! Only the version, source and destination are read; everything else is
//! the kernel's business. A packet is accepted only if its header fits and
//! its length field does not claim more bytes than are present.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::DropReason;

/// A validated view of an inner IP packet.
#[derive(Clone, Copy, Debug)]
pub struct InnerPacket<'a> {
    buf: &'a [u8],
}

impl<'a> InnerPacket<'a> {
    /// Check that `buf` holds an IPv4 or IPv6 header. Never panics.
    pub fn new_checked(buf: &'a [u8]) -> Result<Self, DropReason> {
        let ok = match buf.first().map(|b| b >> 4) {
            Some(4) => {
                buf.len() >= 20
                    && buf[0] & 0x0f >= 5
                    && usize::from(u16::from_be_bytes([buf[2], buf[3]])) <= buf.len()
            }
            Some(6) => {
                buf.len() >= 40
                    && 40 + usize::from(u16::from_be_bytes([buf[4], buf[5]])) <= buf.len()
            }
            _ => false,
        };
        if ok {
            Ok(Self { buf })
        } else {
            Err(DropReason::BadInnerPacket)
        }
    }

    /// The source address.
    pub fn src(&self) -> IpAddr {
        if self.is_v4() {
            self.v4_at(12).into()
        } else {
            self.v6_at(8).into()
        }
    }

    /// The destination address.
    pub fn dst(&self) -> IpAddr {
        if self.is_v4() {
            self.v4_at(16).into()
        } else {
            self.v6_at(24).into()
        }
    }

    fn is_v4(&self) -> bool {
        self.buf[0] >> 4 == 4
    }

    fn v4_at(&self, at: usize) -> Ipv4Addr {
        <[u8; 4]>::try_from(&self.buf[at..at + 4]).unwrap().into()
    }

    fn v6_at(&self, at: usize) -> Ipv6Addr {
        <[u8; 16]>::try_from(&self.buf[at..at + 16]).unwrap().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // ICMP echo request 10.1.0.2 -> 198.51.100.2, 8 bytes of ICMP.
    static V4: [u8; 28] = [
        0x45, 0x00, 0x00, 0x1c, 0x00, 0x01, 0x40, 0x00, 0x40, 0x01, 0x00, 0x00, 10, 1, 0, 2, 198,
        51, 100, 2, 0x08, 0x00, 0xf7, 0xfe, 0x00, 0x01, 0x00, 0x00,
    ];

    fn v6_packet() -> Vec<u8> {
        let mut p = vec![0u8; 48];
        p[0] = 0x60;
        p[5] = 8; // payload length
        p[6] = 58; // ICMPv6
        p[8..24].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        p
    }

    #[test]
    fn v4_addresses() {
        let p = InnerPacket::new_checked(&V4).unwrap();
        assert_eq!(p.src(), IpAddr::from([10, 1, 0, 2]));
        assert_eq!(p.dst(), IpAddr::from([198, 51, 100, 2]));
    }

    #[test]
    fn v6_addresses() {
        let buf = v6_packet();
        let p = InnerPacket::new_checked(&buf).unwrap();
        assert_eq!(p.src(), "fd00::2".parse::<IpAddr>().unwrap());
        assert_eq!(p.dst(), "fd00::1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn rejects_truncated_and_lying_lengths() {
        assert!(InnerPacket::new_checked(&V4[..19]).is_err());
        let mut lying = V4;
        lying[3] = 29; // total length one more than present
        assert!(InnerPacket::new_checked(&lying).is_err());
        let mut short_ihl = V4;
        short_ihl[0] = 0x44;
        assert!(InnerPacket::new_checked(&short_ihl).is_err());
        let v6 = v6_packet();
        assert!(InnerPacket::new_checked(&v6[..47]).is_err());
        assert!(InnerPacket::new_checked(&[0x50; 40]).is_err());
        assert!(InnerPacket::new_checked(&[]).is_err());
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(p) = InnerPacket::new_checked(&bytes) {
                let _ = (p.src(), p.dst());
            }
        }
    }
}

//! `InnerPacket::new_checked` on arbitrary bytes: never panics, and the
//! addresses of an accepted packet are the bytes at the documented offsets.
#![no_main]

use std::net::IpAddr;

use iptun_proto::wire::InnerPacket;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(packet) = InnerPacket::new_checked(data) else {
        return;
    };
    match (packet.src(), packet.dst()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            assert_eq!(data[0] >> 4, 4);
            assert_eq!(src.octets(), data[12..16]);
            assert_eq!(dst.octets(), data[16..20]);
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            assert_eq!(data[0] >> 4, 6);
            assert_eq!(src.octets(), data[8..24]);
            assert_eq!(dst.octets(), data[24..40]);
        }
        mixed => panic!("source and destination of different families: {mixed:?}"),
    }
});

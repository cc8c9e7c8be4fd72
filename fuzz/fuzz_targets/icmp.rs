//! The ICMP echo carrier on arbitrary bytes, as both raw sockets deliver them
//! (IPv4 with its IP header, ICMPv6 without): never panics, an accepted
//! echo re-emits to the same bytes (ICMPv6 apart from the checksum, which
//! the kernel owns), and so does a reply's info (ordinal and hold).
#![no_main]

use iptun_proto::wire::icmp::{
    ECHO_HEADER_LEN, Echo, Family, REPLY_INFO_LEN, ReplyInfo, emit_echo, strip_ipv4,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((_, _, icmp)) = strip_ipv4(data) {
        check(Family::V4, icmp);
    }
    check(Family::V4, data);
    check(Family::V6, data);
});

fn check(family: Family, icmp: &[u8]) {
    let Ok(echo) = Echo::parse(family, icmp) else {
        return;
    };
    if let Some(msg) = echo.tunnel_message() {
        assert_eq!(msg.len() + 4, echo.payload.len());
    }
    if let Some((info, msg)) = echo.tunnel_reply() {
        assert!(echo.reply);
        assert_eq!(msg.len() + 4 + REPLY_INFO_LEN, echo.payload.len());
        let mut again = [0u8; REPLY_INFO_LEN];
        info.emit(&mut again);
        assert_eq!(again[..], echo.payload[4..4 + REPLY_INFO_LEN]);
        assert_eq!(ReplyInfo::parse(&again), Some((info, &[][..])));
    }
    let mut again = icmp.to_vec();
    let n = emit_echo(family, echo.reply, echo.id, echo.seq, &mut again, echo.payload.len());
    assert_eq!(n, ECHO_HEADER_LEN + echo.payload.len());
    match family {
        Family::V4 => assert_eq!(&again[..n], &icmp[..n]),
        Family::V6 => {
            assert_eq!(again[..2], icmp[..2]);
            assert_eq!(again[4..n], icmp[4..n]);
        }
    }
}

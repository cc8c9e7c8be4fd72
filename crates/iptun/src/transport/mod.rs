//! Transport drivers: they move opaque tunnel messages between client and
//! server. The protocol decisions live in `iptun_proto`; these only do I/O.

pub mod icmp;
pub mod sockopt;
pub mod udp;

//! Transport drivers: they move opaque tunnel messages between client and
//! server. The protocol decisions live in `iptun_proto`; these only do I/O.

pub mod http_client;
pub mod http_server;
pub mod icmp;
pub mod resolver;
pub mod sockopt;
pub mod tls;
pub mod udp;

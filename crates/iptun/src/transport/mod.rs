//! Transport drivers: they move opaque tunnel messages between client and
//! server. The protocol decisions live in `iptun_proto`; these only do I/O.

pub mod http_client;
pub mod http_server;
pub mod icmp;
pub mod resolver;
pub mod sockopt;
pub mod tls;
pub mod udp;

use std::task::{Context, Poll};

/// A socket whose sends never wait (UDP's and ICMP's): when its buffer is
/// full it holds what did not fit and says it is blocked, the loop stops
/// reading the TUN device until it has room, and what is sent meanwhile
/// is dropped and counted.
pub trait HeldSend {
    /// Something waits for room in the socket buffer.
    fn is_blocked(&self) -> bool;
    /// Ready when blocked and the socket may have room again.
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<()>;
    /// Send what waited for room (it may have to wait again).
    fn retry(&mut self);
    /// Datagrams dropped because the buffer stayed full.
    fn dropped(&self) -> u64;
    /// The status counter those drops are shown under.
    fn drop_counter(&self) -> &'static str;
}

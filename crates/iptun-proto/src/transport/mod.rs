//! Each transport's protocol logic, both halves, sans IO: how tunnel
//! messages ride UDP datagrams, ICMP echoes, DNS queries and answers, and
//! HTTP bodies, and the disciplines that go with them (polls kept
//! outstanding, requests held, queries paced, resolvers and modes chosen).
//!
//! The client [`Connection`](crate::connection::Connection) and the server
//! [`Endpoint`](crate::endpoint::Endpoint) join these to the engines; the
//! binary only moves their bytes between sockets and the TUN device.
//!
//! - UDP is a passthrough: one message, one datagram.
//! - [`icmp`]: echo requests up, echo replies down, one reply per request.
//! - [`dns`]: fragments in query names up, in answers down, through resolvers.
//! - [`http`]: length-prefixed batches in WebSocket messages or long-poll bodies.
//! - [`poll`]: the discipline shared by the transports where the server can
//!   only answer what the client asks.
//! - [`congestion`]: how fast requests may go and how many may be in
//!   flight, from what the path delivers (ICMP echo requests today).

pub mod congestion;
pub mod dns;
pub mod http;
pub mod icmp;
pub mod poll;

/// Where opened inner packets go: the TUN device's write batch in the
/// binary, a list in tests. Packets are written in place, no copy.
pub trait TunSink {
    /// A buffer of at least `len` bytes for the next packet, or `None` when
    /// the batch is full (the packet is then dropped and counted).
    fn buffer(&mut self, len: usize) -> Option<&mut [u8]>;
    /// The packet of `len` bytes written into the last buffer is complete.
    fn commit(&mut self, len: usize);
}

/// A [`TunSink`] that keeps every packet: for tests, and for callers with
/// no TUN device (`iptun probe`), which simply drop what it holds.
#[derive(Debug, Default)]
pub struct PacketList {
    /// The packets written, oldest first.
    pub packets: Vec<Vec<u8>>,
    staged: Vec<u8>,
}

impl TunSink for PacketList {
    fn buffer(&mut self, len: usize) -> Option<&mut [u8]> {
        self.staged.resize(len, 0);
        Some(&mut self.staged)
    }

    fn commit(&mut self, len: usize) {
        self.staged.truncate(len);
        self.packets.push(std::mem::take(&mut self.staged));
    }
}

/// The transports, for names in status and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// UDP datagrams.
    Udp,
    /// ICMP or ICMPv6 echo.
    Icmp,
    /// DNS through resolvers (or straight to the server).
    Dns,
    /// HTTP or HTTPS: WebSocket, or long-poll.
    Http,
}

impl Kind {
    /// A short stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Icmp => "icmp",
            Self::Dns => "dns",
            Self::Http => "http",
        }
    }
}

//! The client and server state machines.
//!
//! Both are driven the same way: feed them what arrives (`handle_datagram`
//! for bytes from a transport path, `handle_tun_packet` for packets from the
//! TUN device) together with the current time, act on what they return, and
//! call `poll_timers` when the deadline they name has passed. All output goes
//! into caller-owned buffers; nothing here allocates per packet.
//!
//! Session lifetime follows WireGuard's timers: a new handshake after
//! [`REKEY_AFTER_TIME`] or [`REKEY_AFTER_MESSAGES`], keys refused after
//! [`REJECT_AFTER_TIME`]. The previous keys stay valid for receiving while
//! the new ones take over, so a rekey loses nothing in flight.

mod client;
mod server;

use std::time::{Duration, Instant};

pub use client::{Client, ClientConfig, ClientEvent, ClientOutput};
pub use server::{
    ADDRESS_GRACE, AllowedChange, Server, ServerConfig, ServerOutput, SessionId, SessionInfo,
};

use crate::crypto::SessionKeys;

/// Start a new handshake once the current keys are this old.
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
/// Never use keys older than this.
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// Start a new handshake once this many messages were sent with the current keys.
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 60;
/// The first handshake retry comes this long after the first attempt; later ones back off.
pub const HANDSHAKE_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between handshake attempts.
pub const HANDSHAKE_RETRY_MAX: Duration = Duration::from_secs(16);
/// Keepalive interval the server announces unless configured otherwise.
pub const DEFAULT_KEEPALIVE_SECS: u16 = 10;
/// The client considers the server gone after this many keepalive intervals of silence.
pub const DEAD_AFTER_KEEPALIVES: u32 = 3;

/// What the server engine needs to know about a path back to a client.
///
/// Push transports (UDP, WebSocket) can send whenever they like; poll
/// transports (DNS, ICMP echo, HTTP long-poll) can only answer a request the
/// client made. On a polled path the client's keepalives are its requests, so
/// the engine does not echo them (that would answer every request at once and
/// turn polling into a busy loop); the driver answers a held request with
/// [`Server::seal_keepalive`] when it expires instead.
pub trait PathKind: Clone + PartialEq {
    /// Whether the server can only answer the client's requests here.
    fn is_polled(&self) -> bool {
        false
    }
}

impl PathKind for std::net::SocketAddr {}

/// Bytes and packets moved through a session (inner packets, not counting overhead).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Inner bytes received.
    pub rx_bytes: u64,
    /// Inner packets received (keepalives not counted).
    pub rx_packets: u64,
    /// Inner bytes sent.
    pub tx_bytes: u64,
    /// Inner packets sent (keepalives not counted).
    pub tx_packets: u64,
}

impl Traffic {
    pub(crate) fn rx(&mut self, bytes: usize) {
        self.rx_bytes += bytes as u64;
        self.rx_packets += 1;
    }

    pub(crate) fn tx(&mut self, bytes: usize) {
        self.tx_bytes += bytes as u64;
        self.tx_packets += 1;
    }
}

/// What became of the handshakes (inits) a server received.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandshakeCounters {
    /// Answered: an admitted key with an address for it.
    pub ok: u64,
    /// Authentic, but the key is not admitted (or the pool has no address
    /// left for it).
    pub refused: u64,
    /// Not looked at: too many handshakes at once.
    pub rate_limited: u64,
    /// Not authentic: a bad MAC or Noise message, or a replayed one.
    pub invalid: u64,
}

impl HandshakeCounters {
    /// Count one init by what handling it gave.
    pub fn count(&mut self, result: Result<(), crate::DropReason>) {
        use crate::DropReason::{NotAllowed, PoolExhausted, RateLimited};
        match result {
            Ok(()) => self.ok += 1,
            Err(NotAllowed | PoolExhausted) => self.refused += 1,
            Err(RateLimited) => self.rate_limited += 1,
            Err(_) => self.invalid += 1,
        }
    }
}

/// The keys of one handshake with the indices both ends chose for it.
struct Keypair {
    keys: SessionKeys,
    /// Our index: the peer puts it in data messages to us.
    local_index: u32,
    /// The peer's index: we put it in data messages to the peer.
    remote_index: u32,
    born: Instant,
}

impl Keypair {
    fn seal(&mut self, plaintext: &[u8], out: &mut [u8]) -> Result<usize, crate::DropReason> {
        self.keys.seal(self.remote_index, plaintext, out)
    }

    fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.born) >= REJECT_AFTER_TIME
    }
}

/// A random session index.
fn random_index() -> u32 {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("the OS random source failed");
    u32::from_le_bytes(b)
}

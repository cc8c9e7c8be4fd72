//! A deterministic simulated network for the shipped client [`Connection`]
//! and server [`Endpoint`] over UDP, in the manner of quinn-proto's `Pair`:
//! one endpoint (one UDP listener) and any number of connections (one UDP
//! path each) joined by a virtual network with latency, seeded loss,
//! reordering (jitter) and duplication, driven by a virtual clock that jumps
//! from one event to the next. Nothing here sleeps or touches a socket, so
//! minutes of protocol time run in milliseconds.
//!
//! The drivers are what a real one does and no more: bytes that arrive go
//! to `handle_input`, packets from a TUN device to `handle_tun_packet`,
//! `handle_timeout` runs when `poll_timeout` passes, and `poll_transmit` is
//! drained onto the network after every input and timeout. What a test
//! learns, it learns from the outside: the datagrams on the wire, the
//! packets written to the TUN devices, the events, and the drop counters
//! (an input that was dropped shows as exactly one counted reason).
//!
//! Checked on every step: the server never answers an input it dropped,
//! never answers an init (the only message an unauthenticated sender can get
//! an answer to) with more bytes than the init carried, and no driver's
//! timeout stays in the past once handled (a real driver would spin).
//!
//! Also here: the helpers the other sims share (randomness, keys, packets,
//! drop-counter differences).

#![allow(dead_code)] // not every test uses every helper

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use base64::Engine as _;
use iptun_proto::connection::{Connection, Event, PathConfig, Remote};
use iptun_proto::crypto::{PrivateKey, PublicKey};
use iptun_proto::endpoint::{Destination, Endpoint, Input, ListenerConfig, Path, UdpAddr};
use iptun_proto::engine::{ClientConfig, ServerConfig, SessionInfo};
use iptun_proto::pool::AddressPool;
use iptun_proto::transport::PacketList;
use iptun_proto::wire::message::{TYPE_DATA, TYPE_INIT, TYPE_RESPONSE};
use iptun_proto::{DropCounters, DropReason, TunnelConfig};

/// The design's default pool: 10.1.0.0/24 and an IPv6 ULA /64 beside it.
pub const NET4: &str = "10.1.0.0/24";
pub const NET6: &str = "fd69:7074:756e::/64";
/// Somewhere on the internet behind the server's NAT.
pub const INTERNET_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
pub const INTERNET_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
/// Wall-clock time at the sim's start, for client handshake timestamps.
pub const UNIX_START: u64 = 1_700_000_000_000_000_000;

// ---------------------------------------------------------------------------
// Randomness, keys, packets, drops
// ---------------------------------------------------------------------------

/// xorshift64*: tiny, seeded, good enough to pick losses and delays.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Zero is the one state xorshift cannot leave.
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && ((self.next_u64() >> 11) as f64) < p * (1u64 << 53) as f64
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next_u64() as u8;
        }
    }

    pub fn duration_up_to(&mut self, max: Duration) -> Duration {
        let nanos = max.as_nanos() as u64;
        if nanos == 0 {
            Duration::ZERO
        } else {
            Duration::from_nanos(self.below(nanos + 1))
        }
    }
}

/// A fixed private key, so addresses (hashed from keys) are the same every run.
pub fn key(seed: u8) -> PrivateKey {
    let text = base64::engine::general_purpose::STANDARD.encode([seed; 32]);
    PrivateKey::from_base64(&text).expect("32 bytes of base64")
}

pub fn pool(net4: &str, v6: bool) -> AddressPool {
    AddressPool::new(net4.parse().unwrap(), v6.then(|| NET6.parse().unwrap())).unwrap()
}

/// The server key every test uses.
pub fn server_key() -> PrivateKey {
    key(200)
}

pub fn server_config(allowed: &[&PrivateKey], pool: AddressPool) -> ServerConfig {
    ServerConfig::new(
        server_key(),
        allowed.iter().map(|k| k.public_key()).collect(),
        pool,
    )
}

/// A client of the test server with `key`.
pub fn client_config(key: PrivateKey) -> ClientConfig {
    ClientConfig::new(key, server_key().public_key())
}

/// A minimal IPv4 packet: a 20-byte header with the right total length
/// (protocol 253, "experimental"; the checksum is left zero) and `payload`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).unwrap();
    let mut p = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 253, 0, 0];
    p[2..4].copy_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// A minimal IPv6 packet: a 40-byte header (next header 59, "no next
/// header") with the right payload length, and `payload`.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(payload.len()).unwrap();
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[59, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// A payload that names its packet (`tag`, `n`) and has a varying length,
/// so a mix-up or truncation cannot go unnoticed.
pub fn payload(tag: u8, n: u32) -> Vec<u8> {
    let len = 8 + (n as usize * 37) % 600;
    let mut p = Vec::with_capacity(len);
    p.push(tag);
    p.extend_from_slice(&n.to_be_bytes());
    while p.len() < len {
        p.push((p.len() as u8).wrapping_mul(31) ^ tag);
    }
    p
}

/// The `n` a [`payload`] carries, read back from an IPv4 or IPv6 packet.
pub fn payload_id(packet: &[u8]) -> (u8, u32) {
    let at = if packet[0] >> 4 == 4 { 20 } else { 40 };
    (
        packet[at],
        u32::from_be_bytes(packet[at + 1..at + 5].try_into().unwrap()),
    )
}

/// The message type of a datagram (first byte).
pub fn kind(datagram: &[u8]) -> u8 {
    datagram.first().copied().unwrap_or(0)
}

pub fn is_init(d: &[u8]) -> bool {
    kind(d) == TYPE_INIT
}

pub fn is_response(d: &[u8]) -> bool {
    kind(d) == TYPE_RESPONSE
}

/// Data messages with an empty payload (header + tag only) are keepalives.
pub fn is_keepalive(d: &[u8]) -> bool {
    kind(d) == TYPE_DATA && d.len() == iptun_proto::wire::message::DATA_OVERHEAD
}

/// A probe: a data message carrying a bare control message (the client's
/// way to make the server answer at once).
pub fn is_probe(d: &[u8]) -> bool {
    kind(d) == TYPE_DATA
        && d.len()
            == iptun_proto::wire::message::DATA_OVERHEAD + iptun_proto::wire::control::CONTROL_LEN
}

/// The receiver index of a data message.
pub fn receiver_index(d: &[u8]) -> u32 {
    u32::from_le_bytes(d[4..8].try_into().unwrap())
}

/// The drops counted between two snapshots of a set of counters.
pub fn counted_all(before: &DropCounters, after: &DropCounters) -> Vec<DropReason> {
    DropReason::ALL
        .iter()
        .flat_map(|&r| std::iter::repeat_n(r, (after.get(r) - before.get(r)) as usize))
        .collect()
}

/// The one drop counted between two snapshots of a set of counters: `None`
/// when nothing was counted. Panics when several were: every input here is
/// one message, dropped at most once.
pub fn counted(before: &DropCounters, after: &DropCounters) -> Option<DropReason> {
    let new = counted_all(before, after);
    assert!(
        new.len() <= 1,
        "several drops counted for one input: {new:?}"
    );
    new.first().copied()
}

/// The sender index of an init: tells one handshake attempt from the next.
pub fn init_index(init: &[u8]) -> u32 {
    u32::from_le_bytes(init[4..8].try_into().unwrap())
}

/// A TUN device's write batch that is full: every packet is refused.
pub struct FullTun;

impl iptun_proto::transport::TunSink for FullTun {
    fn buffer(&mut self, _len: usize) -> Option<&mut [u8]> {
        None
    }

    fn commit(&mut self, _len: usize) {
        unreachable!("no buffer was given")
    }
}

/// When an authenticated message last arrived on a connection's path,
/// as its status tells.
pub fn last_heard(conn: &Connection, path: usize, now: Instant) -> Option<Instant> {
    conn.status(now).paths[path].last_heard.map(|d| now - d)
}

/// Fail if a driver that just handled its timeout would be woken again at
/// once: a real one would spin.
pub fn assert_not_due(who: &str, timeout: Option<Instant>, now: Instant, start: Instant) {
    assert!(
        timeout.is_none_or(|t| t > now),
        "{who}'s driver would spin: its timeout stays at {:?} (now {:?})",
        timeout.map(|t| t.saturating_duration_since(start)),
        now - start
    );
}

// ---------------------------------------------------------------------------
// The network
// ---------------------------------------------------------------------------

/// How the virtual link treats every datagram (both directions).
#[derive(Clone, Copy, Debug)]
pub struct Link {
    /// One-way delay every datagram gets.
    pub latency: Duration,
    /// Extra random delay in `0..=jitter`; datagrams overtake each other.
    pub jitter: Duration,
    /// Probability a datagram is lost.
    pub loss: f64,
    /// Probability a datagram is delivered twice (the copy gets its own jitter).
    pub duplicate: f64,
}

impl Link {
    /// 10 ms each way, nothing lost, nothing reordered.
    pub fn perfect() -> Self {
        Self {
            latency: Duration::from_millis(10),
            jitter: Duration::ZERO,
            loss: 0.0,
            duplicate: 0.0,
        }
    }
}

/// A datagram on the wire.
#[derive(Clone, Debug)]
pub struct Datagram {
    pub sent: Instant,
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

struct InFlight {
    at: Instant,
    /// Tie-breaker, so equal arrival times keep send order: deterministic.
    seq: u64,
    datagram: Datagram,
}

impl PartialEq for InFlight {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for InFlight {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// One client in the sim, with everything it produced.
pub struct SimClient {
    pub conn: Connection,
    pub key: PublicKey,
    /// Its current source address (change it to roam).
    pub addr: SocketAddr,
    /// Inner packets it wrote to its TUN device.
    pub tun: Vec<Vec<u8>>,
    pub events: Vec<(Instant, Event)>,
    /// Every drop counted for a datagram it received.
    pub errors: Vec<DropReason>,
    /// Inits it sent, with their times.
    pub inits: Vec<Instant>,
    /// When it last opened a data message (a keepalive or a packet).
    pub last_data_rx: Option<Instant>,
}

impl SimClient {
    /// The configuration of the latest `Configured` event.
    pub fn config(&self) -> Option<TunnelConfig> {
        self.events.iter().rev().find_map(|(_, e)| match e {
            Event::Configured(c) => Some(*c),
            _ => None,
        })
    }

    pub fn v4(&self) -> Ipv4Addr {
        self.config().expect("configured").client_v4
    }

    pub fn v6(&self) -> Ipv6Addr {
        self.config()
            .expect("configured")
            .v6
            .expect("IPv6 configured")
            .0
    }
}

/// The server, its clients and the network between them.
pub struct Sim {
    pub start: Instant,
    pub now: Instant,
    pub link: Link,
    pub rng: Rng,
    pub server: Endpoint,
    pub server_addr: SocketAddr,
    pub clients: Vec<SimClient>,
    /// Inner packets the server wrote to its TUN device.
    pub server_tun: Vec<Vec<u8>>,
    /// Every drop counted for a datagram the server received, with the sender.
    pub server_errors: Vec<(SocketAddr, DropReason)>,
    /// Every datagram handed to the network (before loss), in send order.
    pub wire: Vec<Datagram>,
    /// Datagrams that arrived at an address nobody holds (a client roamed away).
    pub undeliverable: Vec<Datagram>,
    in_flight: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    buf: Vec<u8>,
}

impl Sim {
    pub fn new(config: ServerConfig, link: Link, seed: u64) -> Self {
        let start = Instant::now();
        Self {
            start,
            now: start,
            link,
            rng: Rng::new(seed),
            server: Endpoint::new(config, vec![ListenerConfig::Udp], start),
            server_addr: "192.0.2.1:3000".parse().unwrap(),
            clients: Vec::new(),
            server_tun: Vec::new(),
            server_errors: Vec::new(),
            wire: Vec::new(),
            undeliverable: Vec::new(),
            in_flight: BinaryHeap::new(),
            seq: 0,
            buf: Vec::new(),
        }
    }

    /// The default server (pool 10.1.0.0/24 plus the ULA /64) admitting `allowed`.
    pub fn with_clients(allowed: &[&PrivateKey], link: Link, seed: u64) -> Self {
        Self::new(server_config(allowed, pool(NET4, true)), link, seed)
    }

    /// The server process restarts: same address, a fresh endpoint.
    pub fn restart_server(&mut self, config: ServerConfig) {
        self.server = Endpoint::new(config, vec![ListenerConfig::Udp], self.now);
    }

    /// Virtual time since the start.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Add a client with `key`, at 203.0.113.(10 + i):40000; it starts its
    /// handshake at the next step. Returns its index.
    pub fn add_client(&mut self, key: PrivateKey) -> usize {
        let i = self.clients.len();
        let addr = SocketAddr::from(([203, 0, 113, 10 + i as u8], 40000));
        self.add_client_with(client_config(key), addr)
    }

    pub fn add_client_with(&mut self, config: ClientConfig, addr: SocketAddr) -> usize {
        let key = config.private_key.public_key();
        let conn = self.connection(config);
        self.clients.push(SimClient {
            conn,
            key,
            addr,
            tun: Vec::new(),
            events: Vec::new(),
            errors: Vec::new(),
            inits: Vec::new(),
            last_data_rx: None,
        });
        self.clients.len() - 1
    }

    fn connection(&self, config: ClientConfig) -> Connection {
        let path = PathConfig::Udp {
            server: self.server_addr,
        };
        Connection::new(config, vec![path], self.now, self.unix_now())
    }

    /// Replace client `i` by a fresh instance with the same key (a client
    /// restart), now at `addr`. Its records are kept.
    pub fn restart_client(&mut self, i: usize, config: ClientConfig, addr: SocketAddr) {
        self.clients[i].conn = self.connection(config);
        self.clients[i].addr = addr;
    }

    /// Wall-clock nanoseconds now, as a client's `unix_nanos` would read.
    pub fn unix_now(&self) -> u64 {
        UNIX_START + self.elapsed().as_nanos() as u64
    }

    /// The server's path to a client at `addr`, as the endpoint names it.
    pub fn path_to(&self, addr: SocketAddr) -> Path {
        Path::Udp {
            listener: 0,
            peer: self.peer(addr),
        }
    }

    /// A sender at `addr`, as the server's socket sees it.
    fn peer(&self, addr: SocketAddr) -> UdpAddr {
        UdpAddr {
            addr,
            local: Some(self.server_addr.ip()),
        }
    }

    /// The server's session of client `i`, if it has one.
    pub fn session(&self, i: usize) -> Option<SessionInfo<Path>> {
        let key = self.clients[i].key;
        self.server.sessions().into_iter().find(|s| s.key == key)
    }

    // --- Driving --------------------------------------------------------

    /// When the next thing happens: an arrival or a driver's timeout.
    fn next_event(&self) -> Option<Instant> {
        let arrival = self.in_flight.peek().map(|Reverse(f)| f.at);
        let clients = self.clients.iter().filter_map(|c| c.conn.poll_timeout());
        let t = arrival
            .into_iter()
            .chain(self.server.poll_timeout())
            .chain(clients)
            .min()?;
        Some(t.max(self.now))
    }

    /// Run everything due up to `deadline`, jumping from event to event,
    /// and leave the clock at `deadline`.
    pub fn run_until(&mut self, deadline: Instant) {
        while let Some(t) = self.next_event().filter(|&t| t <= deadline) {
            self.now = t;
            self.step();
        }
        self.now = deadline;
    }

    /// Jump the clock ahead (for spans of days). Only while nothing is
    /// going on: no clients, nothing in the air.
    pub fn skip(&mut self, d: Duration) {
        assert!(self.clients.is_empty() && self.in_flight.is_empty());
        assert!(self.server.poll_timeout().is_none());
        self.now += d;
    }

    pub fn run_for(&mut self, d: Duration) {
        self.run_until(self.now + d);
    }

    /// Run until `done` holds (checked after every step) or `limit` passes;
    /// returns whether it held.
    pub fn run_until_cond(&mut self, limit: Duration, mut done: impl FnMut(&Self) -> bool) -> bool {
        let deadline = self.now + limit;
        while !done(self) {
            match self.next_event().filter(|&t| t <= deadline) {
                Some(t) => self.now = t,
                None => {
                    self.now = deadline;
                    return false;
                }
            }
            self.step();
        }
        true
    }

    /// Run until client `i` has a session and the server has confirmed it
    /// (a keepalive made it through), so both ends can send.
    pub fn connect(&mut self, i: usize) {
        let ok = self.run_until_cond(Duration::from_secs(120), |s| {
            s.clients[i].conn.is_connected(s.now) && s.server_confirmed(i)
        });
        assert!(
            ok,
            "client {i} did not connect: {:?}",
            self.clients[i].conn.drops()
        );
        // Drain whatever else is in the air, so tests start from quiet.
        self.settle();
    }

    /// Whether the server can send to client `i`: the server only seals
    /// with keys the client has confirmed, so a data message (the answer
    /// to the confirming keepalive) opened after the latest handshake shows it.
    pub fn server_confirmed(&self, i: usize) -> bool {
        let c = &self.clients[i];
        let handshake = c.conn.engine().last_handshake();
        matches!((c.last_data_rx, handshake), (Some(rx), Some(hs)) if rx >= hs)
    }

    /// Deliver everything in flight (timers run meanwhile).
    pub fn settle(&mut self) {
        let limit = self.now + Duration::from_secs(10);
        while let Some(Reverse(f)) = self.in_flight.peek() {
            let at = f.at;
            assert!(at <= limit, "the network does not drain");
            self.run_until(at);
        }
    }

    /// Do everything due at `self.now`: arrivals first, then timeouts.
    fn step(&mut self) {
        let now = self.now;
        while self.in_flight.peek().is_some_and(|Reverse(f)| f.at <= now) {
            let Reverse(f) = self.in_flight.pop().unwrap();
            self.deliver(f.datagram);
        }
        if self.server.poll_timeout().is_some_and(|t| t <= now) {
            self.server.handle_timeout(now);
            self.flush_server();
            assert_not_due("the server", self.server.poll_timeout(), now, self.start);
        }
        for i in 0..self.clients.len() {
            if self.clients[i]
                .conn
                .poll_timeout()
                .is_some_and(|t| t <= now)
            {
                self.clients[i].conn.handle_timeout(now);
                self.flush_client(i);
                let t = self.clients[i].conn.poll_timeout();
                assert_not_due(&format!("client {i}"), t, now, self.start);
            }
        }
    }

    /// Send everything client `i` has to send, and take its events.
    fn flush_client(&mut self, i: usize) {
        let now = self.now;
        while let Some(t) = self.clients[i].conn.poll_transmit(now, &mut self.buf) {
            assert_eq!(t.path, 0, "one path");
            assert_eq!(
                t.to,
                Remote::Addr(self.server_addr),
                "UDP goes to the server"
            );
            let bytes = self.buf[..t.len].to_vec();
            if is_init(&bytes) {
                self.clients[i].inits.push(now);
            }
            self.send(self.clients[i].addr, self.server_addr, bytes);
        }
        while let Some(e) = self.clients[i].conn.poll_event() {
            // A path failing is for the log; the tests look at the rest.
            if !matches!(e, Event::Failed { .. }) {
                self.clients[i].events.push((now, e));
            }
        }
    }

    /// Send everything the server has to send; returns what it sent.
    fn flush_server(&mut self) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut sent = Vec::new();
        while let Some(t) = self.server.poll_transmit(self.now, &mut self.buf) {
            let Destination::Udp(to) = t.to else {
                panic!("a UDP listener sent {:?}", t.to)
            };
            assert_eq!(t.listener, 0);
            assert_eq!(
                to.local,
                Some(self.server_addr.ip()),
                "from the address asked"
            );
            let bytes = self.buf[..t.len].to_vec();
            self.send(self.server_addr, to.addr, bytes.clone());
            sent.push((to.addr, bytes));
        }
        sent
    }

    /// Put a datagram on the wire: maybe lose it, maybe copy it, delay it.
    pub fn send(&mut self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        let d = Datagram {
            sent: self.now,
            from,
            to,
            bytes,
        };
        self.wire.push(d.clone());
        if self.rng.chance(self.link.loss) {
            return;
        }
        let copies = if self.rng.chance(self.link.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let at = self.now + self.link.latency + self.rng.duration_up_to(self.link.jitter);
            self.seq += 1;
            self.in_flight.push(Reverse(InFlight {
                at,
                seq: self.seq,
                datagram: d.clone(),
            }));
        }
    }

    /// Hand a datagram to whoever holds its destination address now.
    pub fn deliver(&mut self, d: Datagram) {
        // Results are recorded (`server_errors`, `SimClient::errors`) for the tests.
        if d.to == self.server_addr {
            let _ = self.server_receive(d.from, &d.bytes);
        } else if let Some(i) = self.clients.iter().position(|c| c.addr == d.to) {
            let _ = self.client_receive(i, &d.bytes);
        } else {
            self.undeliverable.push(d);
        }
    }

    /// The server's socket receives a datagram from `from`; what the
    /// endpoint makes of it is acted on (sent, written to its TUN) and
    /// returned: the drop it counted, or the one thing it did.
    pub fn server_receive(&mut self, from: SocketAddr, bytes: &[u8]) -> Result<Out, DropReason> {
        let before = self.server.drops();
        let mut tun = PacketList::default();
        let input = Input::Datagram {
            from: self.peer(from),
            bytes,
        };
        self.server.handle_input(self.now, 0, input, &mut tun);
        let dropped = counted(&before, &self.server.drops());
        let sent = self.flush_server();
        // No amplification: an init is all an unauthenticated sender can
        // get an answer to, and the answer is never bigger.
        if is_init(bytes) {
            for (_, m) in &sent {
                assert!(m.len() <= bytes.len(), "an answer to an init is larger");
            }
        }
        self.server_tun.extend(tun.packets.iter().cloned());
        if let Some(e) = dropped {
            assert!(sent.is_empty(), "the server answered a datagram it dropped");
            assert!(tun.packets.is_empty());
            self.server_errors.push((from, e));
            return Err(e);
        }
        Ok(Out::one(tun.packets, sent))
    }

    /// Client `i`'s socket receives a datagram from the server; as
    /// [`Sim::server_receive`].
    pub fn client_receive(&mut self, i: usize, bytes: &[u8]) -> Result<Out, DropReason> {
        let now = self.now;
        let before = self.clients[i].conn.drops();
        let mut tun = PacketList::default();
        let from = Remote::Addr(self.server_addr);
        self.clients[i]
            .conn
            .handle_input(now, 0, from, bytes, &mut tun);
        let dropped = counted(&before, &self.clients[i].conn.drops());
        let server = self.server_addr;
        let sent_before = self.wire.len();
        self.flush_client(i);
        let sent: Vec<_> = self.wire[sent_before..]
            .iter()
            .map(|d| (server, d.bytes.clone()))
            .collect();
        let c = &mut self.clients[i];
        c.tun.extend(tun.packets.iter().cloned());
        if let Some(e) = dropped {
            c.errors.push(e);
            return Err(e);
        }
        if kind(bytes) == TYPE_DATA {
            c.last_data_rx = Some(now);
        }
        Ok(Out::client(tun.packets, sent))
    }

    /// Client `i`'s TUN device gives it `packet`: seal it and send it.
    pub fn client_send(&mut self, i: usize, packet: &[u8]) -> Result<(), DropReason> {
        let msg = self.client_seal(i, packet)?;
        self.send(self.clients[i].addr, self.server_addr, msg);
        Ok(())
    }

    /// Seal `packet` at client `i` without sending it (to deliver it later
    /// by hand with [`Sim::server_receive`]). Whatever else the connection
    /// has to send goes, as from a real driver.
    pub fn client_seal(&mut self, i: usize, packet: &[u8]) -> Result<Vec<u8>, DropReason> {
        let before = self.clients[i].conn.drops();
        let mut buf = vec![0; iptun_proto::connection::BUF_LEN];
        let t = self.clients[i]
            .conn
            .handle_tun_packet(self.now, packet, &mut buf);
        let dropped = counted(&before, &self.clients[i].conn.drops());
        self.flush_client(i);
        match (t, dropped) {
            (Some(t), None) => {
                assert_eq!((t.path, t.to), (0, Remote::Addr(self.server_addr)));
                Ok(buf[..t.len].to_vec())
            }
            (None, Some(e)) => Err(e),
            other => panic!("handle_tun_packet: {other:?}"),
        }
    }

    /// The server's TUN device gives it `packet`: seal it for its owner and send it.
    pub fn server_send(&mut self, packet: &[u8]) -> Result<SocketAddr, DropReason> {
        let (to, msg) = self.server_seal(packet)?;
        self.send(self.server_addr, to, msg);
        Ok(to)
    }

    /// Seal `packet` at the server without sending it. A packet not sealed
    /// must have been counted as dropped.
    pub fn server_seal(&mut self, packet: &[u8]) -> Result<(SocketAddr, Vec<u8>), DropReason> {
        let before = self.server.drops();
        let mut buf = vec![0; iptun_proto::endpoint::BUF_LEN];
        let t = self.server.handle_tun_packet(self.now, packet, &mut buf);
        let dropped = counted(&before, &self.server.drops());
        match (t, dropped) {
            (Some(t), None) => {
                let Destination::Udp(to) = t.to else {
                    panic!("sent to {:?}", t.to)
                };
                Ok((to.addr, buf[..t.len].to_vec()))
            }
            (None, Some(e)) => Err(e),
            other => panic!("handle_tun_packet: {other:?}"),
        }
    }

    /// Datagrams on the wire from `from` matching `pred`.
    pub fn sent_by(&self, from: SocketAddr, pred: impl Fn(&[u8]) -> bool) -> Vec<&Datagram> {
        self.wire
            .iter()
            .filter(|d| d.from == from && pred(&d.bytes))
            .collect()
    }

    /// Drops counted for datagrams from `from`.
    pub fn server_errors_from(&self, from: SocketAddr) -> Vec<DropReason> {
        self.server_errors
            .iter()
            .filter(|(f, _)| *f == from)
            .map(|&(_, e)| e)
            .collect()
    }
}

/// What an input made an endpoint or connection do, in owned form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Out {
    Nothing,
    Tun(Vec<u8>),
    Send(SocketAddr, Vec<u8>),
}

impl Out {
    /// The one thing done: over UDP a message is at most one packet
    /// delivered or one message sent.
    fn one(tun: Vec<Vec<u8>>, sent: Vec<(SocketAddr, Vec<u8>)>) -> Self {
        match (&tun[..], &sent[..]) {
            ([], []) => Self::Nothing,
            ([p], []) => Self::Tun(p.clone()),
            ([], [(to, m)]) => Self::Send(*to, m.clone()),
            _ => panic!("one message did several things: {tun:?} {sent:?}"),
        }
    }

    /// As [`Out::one`], for a client: what it sends after an input may
    /// include what its timers wanted at the same instant.
    fn client(tun: Vec<Vec<u8>>, sent: Vec<(SocketAddr, Vec<u8>)>) -> Self {
        assert!(tun.len() <= 1, "one message, several packets");
        match (tun.into_iter().next(), sent.into_iter().next()) {
            (Some(p), _) => Self::Tun(p),
            (None, Some((to, m))) => Self::Send(to, m),
            (None, None) => Self::Nothing,
        }
    }
}

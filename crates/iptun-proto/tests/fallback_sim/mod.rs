//! A simulated network with four ways between one client and its server,
//! for the policy that moves a session between them: the shipped
//! [`Connection`] (client) and [`Endpoint`] (server), joined by a UDP link,
//! an ICMP echo link, a DNS link through a forwarding resolver and an HTTP
//! link that opens WebSocket connections. Each link can be cut (everything
//! on it silently dropped, and new HTTP connections refused) and restored.
//! A virtual clock jumps from one event to the next.
//!
//! Traffic: the client sends a "ping" (an inner IPv4 packet to a host behind
//! the server) every [`PING_EVERY`]; the server's side echoes each one back
//! through its TUN device, so the sim records which pings came back and
//! when: the gaps a move costs.

#![allow(dead_code)] // not every test uses every helper

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use base64::Engine as _;
use iptun_proto::TunnelConfig;
use iptun_proto::connection::{Connection, Event, PathConfig, PathEvent, Remote, Transmit};
use iptun_proto::crypto::PrivateKey;
use iptun_proto::endpoint::{self, Destination, Endpoint, Input, ListenerConfig};
use iptun_proto::engine::{ClientConfig, ServerConfig};
use iptun_proto::pool::AddressPool;
use iptun_proto::transport::PacketList;
use iptun_proto::transport::http::{self, Command, HttpEvent};
use iptun_proto::wire::dns::Domain;
use iptun_proto::wire::icmp::Family;

pub const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
pub const RESOLVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);
pub const TARGET: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
pub const DOMAIN: &str = "t.example.com";
/// One-way delay on every link.
pub const LATENCY: Duration = Duration::from_millis(5);
/// The client's traffic: one ping this often.
pub const PING_EVERY: Duration = Duration::from_millis(100);
/// A dial on a cut HTTP link fails after this long (a refused connection
/// comes back at once; a silent one times out: this is in between).
pub const DIAL_FAILS_AFTER: Duration = Duration::from_secs(1);

/// The links, in the client's preference order (its path ids).
pub const UDP: usize = 0;
pub const ICMP: usize = 1;
pub const DNS: usize = 2;
pub const HTTP: usize = 3;
pub const NAMES: [&str; 4] = ["udp", "icmp", "dns", "http"];

fn key(seed: u8) -> PrivateKey {
    let text = base64::engine::general_purpose::STANDARD.encode([seed; 32]);
    PrivateKey::from_base64(&text).expect("32 bytes of base64")
}

/// A minimal IPv4 packet (protocol 253) carrying `seq`.
pub fn packet(src: Ipv4Addr, dst: Ipv4Addr, seq: u32) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 28, 0, 1, 0x40, 0, 64, 253, 0, 0];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p
}

fn seq_of(p: &[u8]) -> u32 {
    u32::from_be_bytes(p[20..24].try_into().unwrap())
}

enum What {
    /// Bytes for a server listener.
    ToServer { link: usize, input: Wire },
    /// Bytes for a client path.
    ToClient {
        link: usize,
        from: Remote,
        bytes: Vec<u8>,
    },
    /// An HTTP connection attempt completes (or fails).
    Dialled { attempt: u64, websocket: bool },
    /// An open HTTP connection on a cut link is found dead.
    HttpDead { attempt: u64 },
    /// Time for the next ping.
    Ping,
}

enum Wire {
    Datagram { from: SocketAddr, bytes: Vec<u8> },
    Icmp { bytes: Vec<u8> },
    WebSocket { conn: u64, body: Vec<u8> },
}

struct Scheduled {
    at: Instant,
    seq: u64,
    what: What,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// The client, the server and the four links.
pub struct Sim {
    pub start: Instant,
    pub now: Instant,
    pub client: Connection,
    pub server: Endpoint,
    /// Whether each link carries anything.
    pub up: [bool; 4],
    queue: BinaryHeap<Reverse<Scheduled>>,
    next_seq: u64,
    /// The HTTP connection: the attempt in progress and the one open.
    attempt: u64,
    open_conn: Option<u64>,
    /// Bodies the client sent while its connection was being opened (the
    /// driver's queue), sent once it is.
    http_pending: Vec<Vec<u8>>,
    pub pinging: bool,
    next_ping: u32,
    /// When each ping was sent and (if it was) echoed back.
    pub pings: Vec<(Instant, Option<Instant>)>,
    /// Every move, with its time.
    pub moves: Vec<(Instant, usize, usize)>,
    /// Every tunnel configuration the client got.
    pub configs: Vec<TunnelConfig>,
    /// Messages the client sent, per link.
    pub sent: [u64; 4],
    buf: Vec<u8>,
    last_step: Instant,
    spins: u32,
}

impl Sim {
    pub fn new() -> Self {
        let now = Instant::now();
        let client_key = key(1);
        let pool = AddressPool::new("10.1.0.0/24".parse().unwrap(), None).unwrap();
        let server_config = ServerConfig::new(key(200), vec![client_key.public_key()], pool);
        let domain = Domain::new(DOMAIN).unwrap();
        let server = Endpoint::new(
            server_config,
            vec![
                ListenerConfig::Udp,
                ListenerConfig::Icmp(Family::V4),
                ListenerConfig::Dns(domain.clone()),
                ListenerConfig::Http,
            ],
            now,
        );
        let paths = vec![
            PathConfig::Udp {
                server: SocketAddr::new(SERVER.into(), 3000),
            },
            PathConfig::Icmp {
                server: SERVER.into(),
                id: 0x1234,
            },
            PathConfig::Dns {
                domain,
                resolvers: 1,
                max_query: None,
                tag: 0xdead_beef,
                seed: 7,
            },
            PathConfig::Http {
                mode: http::Mode::Auto,
            },
        ];
        let config = ClientConfig::new(client_key, key(200).public_key());
        let client = Connection::new(config, paths, now, 1_700_000_000_000_000_000);
        let mut sim = Self {
            start: now,
            now,
            client,
            server,
            up: [true; 4],
            queue: BinaryHeap::new(),
            next_seq: 0,
            attempt: 0,
            open_conn: None,
            http_pending: Vec::new(),
            pinging: false,
            next_ping: 0,
            pings: Vec::new(),
            moves: Vec::new(),
            configs: Vec::new(),
            sent: [0; 4],
            buf: Vec::new(),
            last_step: now,
            spins: 0,
        };
        sim.schedule(now, What::Ping);
        sim.flush();
        sim
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn schedule(&mut self, at: Instant, what: What) {
        self.next_seq += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.next_seq,
            what,
        }));
    }

    /// Cut a link, or restore it.
    pub fn set_up(&mut self, link: usize, up: bool) {
        self.up[link] = up;
        if link == HTTP && !up && self.open_conn.is_some() {
            // The connection dies silently: the client's driver notices
            // when its WebSocket pings go unanswered.
            let attempt = self.attempt;
            self.schedule(
                self.now + Duration::from_secs(20),
                What::HttpDead { attempt },
            );
        }
    }

    fn deadline(&self) -> Instant {
        let queued = self.queue.peek().map(|Reverse(s)| s.at);
        [
            queued,
            self.client.poll_timeout(),
            self.server.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(self.now + Duration::from_secs(3600))
        .max(self.now)
    }

    /// Run until `until` (virtual time).
    pub fn run_until(&mut self, until: Instant) {
        loop {
            let at = self.deadline();
            if at > until {
                self.now = until;
                return;
            }
            self.now = at;
            self.step();
        }
    }

    pub fn run_for(&mut self, d: Duration) {
        self.run_until(self.now + d);
    }

    /// Run until `done` holds, for at most `limit`; whether it did.
    pub fn run_until_cond(&mut self, limit: Duration, mut done: impl FnMut(&Self) -> bool) -> bool {
        let end = self.now + limit;
        while self.now < end {
            if done(self) {
                return true;
            }
            let at = self.deadline().min(end);
            self.now = at;
            self.step();
        }
        done(self)
    }

    fn step(&mut self) {
        let now = self.now;
        if self.last_step == now {
            self.spins += 1;
            assert!(
                self.spins < 10_000,
                "stuck at {:?}: client wants {:?}, server {:?}",
                now - self.start,
                self.client.poll_timeout().map(|t| t - self.start),
                self.server.poll_timeout().map(|t| t - self.start)
            );
        } else {
            (self.last_step, self.spins) = (now, 0);
        }
        while self.queue.peek().is_some_and(|Reverse(s)| s.at <= now) {
            let Reverse(s) = self.queue.pop().unwrap();
            self.handle(s.what);
        }
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.handle_timeout(now);
        }
        if self.server.poll_timeout().is_some_and(|t| t <= now) {
            self.server.handle_timeout(now);
        }
        self.flush();
    }

    fn handle(&mut self, what: What) {
        let now = self.now;
        match what {
            What::ToServer { link, input } => {
                let mut tun = PacketList::default();
                let listener = link;
                match &input {
                    Wire::Datagram { from, bytes } => self.server.handle_input(
                        now,
                        listener,
                        Input::Datagram {
                            from: (*from).into(),
                            bytes,
                        },
                        &mut tun,
                    ),
                    Wire::Icmp { bytes } => self.server.handle_input(
                        now,
                        listener,
                        Input::Icmp {
                            from: CLIENT.into(),
                            to: Some(SERVER.into()),
                            bytes,
                        },
                        &mut tun,
                    ),
                    Wire::WebSocket { conn, body } => self.server.handle_input(
                        now,
                        listener,
                        Input::WebSocket { conn: *conn, body },
                        &mut tun,
                    ),
                }
                self.echo(tun);
            }
            What::ToClient { link, from, bytes } => {
                let mut tun = PacketList::default();
                self.client.handle_input(now, link, from, &bytes, &mut tun);
                for p in tun.packets {
                    let seq = seq_of(&p) as usize;
                    if let Some(ping) = self.pings.get_mut(seq) {
                        ping.1.get_or_insert(now);
                    }
                }
            }
            What::Dialled { attempt, websocket } => {
                if attempt != self.attempt {
                    return; // hung up meanwhile
                }
                let event = if self.up[HTTP] {
                    self.open_conn = Some(attempt);
                    let _ = websocket;
                    for body in std::mem::take(&mut self.http_pending) {
                        let at = now + LATENCY;
                        let input = Wire::WebSocket {
                            conn: attempt,
                            body,
                        };
                        self.schedule(at, What::ToServer { link: HTTP, input });
                    }
                    HttpEvent::Opened
                } else {
                    HttpEvent::Closed {
                        heard: false,
                        why: "connection refused".into(),
                    }
                };
                self.client
                    .handle_path_event(now, HTTP, PathEvent::Http(event));
            }
            What::HttpDead { attempt } => {
                if attempt == self.attempt && !self.up[HTTP] && self.open_conn.take().is_some() {
                    let event = HttpEvent::Closed {
                        heard: true,
                        why: "nothing heard for 20 s".into(),
                    };
                    self.client
                        .handle_path_event(now, HTTP, PathEvent::Http(event));
                }
            }
            What::Ping => {
                if self.pinging && self.client.is_connected(now) {
                    let v4 = self.configs.last().expect("configured").client_v4;
                    let p = packet(v4, TARGET, self.next_ping);
                    self.next_ping += 1;
                    self.pings.push((now, None));
                    let mut buf = vec![0u8; 1 << 16];
                    if let Some(t) = self.client.handle_tun_packet(now, &p, &mut buf) {
                        self.client_send(t, &buf);
                    }
                }
                self.schedule(now + PING_EVERY, What::Ping);
            }
        }
    }

    /// The target behind the server answers every ping.
    fn echo(&mut self, tun: PacketList) {
        for p in tun.packets {
            let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
            let reply = packet(TARGET, src, seq_of(&p));
            let mut buf = vec![0u8; 1 << 16];
            if let Some(t) = self.server.handle_tun_packet(self.now, &reply, &mut buf) {
                self.server_send(t, &buf[..t.len]);
            }
        }
    }

    /// Drain both sides' transmits and the client's events.
    fn flush(&mut self) {
        let now = self.now;
        let mut buf = std::mem::take(&mut self.buf);
        loop {
            let mut any = false;
            while let Some(t) = self.client.poll_transmit(now, &mut buf) {
                self.client_send(t, &buf);
                any = true;
            }
            while let Some(t) = self.server.poll_transmit(now, &mut buf) {
                let bytes = buf[..t.len].to_vec();
                self.server_send(t, &bytes);
                any = true;
            }
            while let Some(e) = self.client.poll_event() {
                self.client_event(e);
                any = true;
            }
            if !any {
                break;
            }
        }
        self.buf = buf;
    }

    fn client_event(&mut self, e: Event) {
        match e {
            Event::Configured(c) => {
                self.configs.push(c);
                self.pinging = true;
            }
            Event::Moved { from, to, .. } => self.moves.push((self.now, from, to)),
            Event::Http { command, .. } => match command {
                Command::Dial { websocket } => {
                    self.attempt += 1;
                    self.open_conn = None;
                    let at = self.now
                        + if self.up[HTTP] {
                            LATENCY * 4
                        } else {
                            DIAL_FAILS_AFTER
                        };
                    let attempt = self.attempt;
                    self.schedule(at, What::Dialled { attempt, websocket });
                }
                Command::Hangup => {
                    self.attempt += 1;
                    self.open_conn = None;
                    self.http_pending.clear();
                }
            },
            Event::Failed { .. } | Event::Measured { .. } => {}
        }
    }

    fn client_send(&mut self, t: Transmit, buf: &[u8]) {
        let bytes = buf[..t.len].to_vec();
        self.sent[t.path] += 1;
        if !self.up[t.path] {
            return;
        }
        let at = self.now + LATENCY;
        let input = match t.path {
            UDP => Wire::Datagram {
                from: SocketAddr::new(CLIENT.into(), 40000),
                bytes,
            },
            ICMP => Wire::Icmp { bytes },
            // The resolver forwards the query from its own address.
            DNS => Wire::Datagram {
                from: SocketAddr::new(RESOLVER.into(), 5353),
                bytes,
            },
            _ => {
                let Some(conn) = self.open_conn else {
                    self.http_pending.push(bytes);
                    return;
                };
                Wire::WebSocket { conn, body: bytes }
            }
        };
        self.schedule(
            at,
            What::ToServer {
                link: t.path,
                input,
            },
        );
    }

    fn server_send(&mut self, t: endpoint::Transmit, bytes: &[u8]) {
        let link = t.listener;
        if !self.up[link] {
            return;
        }
        let from = match (link, t.to) {
            (UDP, Destination::Udp(_)) => Remote::Addr(SocketAddr::new(SERVER.into(), 3000)),
            (ICMP, Destination::Icmp { .. }) => Remote::Addr(SocketAddr::new(SERVER.into(), 0)),
            (DNS, Destination::Udp(_)) => Remote::Resolver(0),
            (HTTP, Destination::WebSocket(conn)) if Some(conn) == self.open_conn => {
                Remote::Connection
            }
            _ => return,
        };
        let at = self.now + LATENCY;
        self.schedule(
            at,
            What::ToClient {
                link,
                from,
                bytes: bytes.to_vec(),
            },
        );
    }

    /// The client's path in use.
    pub fn current(&self) -> usize {
        self.client.current_path()
    }

    /// Whether the latest pings came back (the last `n` sent at least a
    /// round trip ago).
    pub fn flowing(&self, n: usize) -> bool {
        let settled: Vec<_> = self
            .pings
            .iter()
            .filter(|(sent, _)| self.now - *sent > Duration::from_millis(500))
            .collect();
        settled.len() >= n && settled[settled.len() - n..].iter().all(|p| p.1.is_some())
    }

    /// The longest run of pings lost (not echoed) since `since`, as a time.
    pub fn longest_gap_since(&self, since: Instant) -> Duration {
        let mut gap = Duration::ZERO;
        let mut start: Option<Instant> = None;
        for &(sent, back) in self.pings.iter().filter(|p| p.0 >= since) {
            match (back, start) {
                (None, None) => start = Some(sent),
                (Some(_), Some(s)) => {
                    gap = gap.max(sent - s);
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            gap = gap.max(self.now - s);
        }
        gap
    }

    /// Handshakes the client completed.
    pub fn handshakes(&self) -> Option<Instant> {
        self.client.engine().last_handshake()
    }

    /// The client's tunnel addresses (the latest configuration).
    pub fn address(&self) -> Ipv4Addr {
        self.configs.last().expect("configured").client_v4
    }
}

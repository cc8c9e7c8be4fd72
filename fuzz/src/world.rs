//! A server [`Endpoint`] with a listener of every kind (UDP, ICMP echo, DNS,
//! HTTP) and one client [`Connection`] connected through each of the UDP,
//! ICMP, DNS and WebSocket paths by real handshakes, for the `endpoint`
//! target and its seeds. The drivers between them are the simplest that
//! work: bytes carried straight across, `handle_timeout` when
//! `poll_timeout` passes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use iptun_proto::connection::{self, Connection, Event, PathConfig, PathEvent, Remote};
use iptun_proto::crypto::PrivateKey;
use iptun_proto::endpoint::{self, Destination, Endpoint, Input, ListenerConfig, Path, UdpAddr};
use iptun_proto::engine::{ClientConfig, ServerConfig};
use iptun_proto::transport::PacketList;
use iptun_proto::transport::http::{Command, HttpEvent, Mode};
use iptun_proto::wire::dns::Domain;
use iptun_proto::wire::icmp::{Family, OVERHEAD};
use iptun_proto::wire::message::TYPE_DATA;

use crate::{UNIX_NANOS, keys, now, pool};

/// The tunnel domain of the DNS listener.
pub const DOMAIN: &str = "t.example.com";
/// The server's address on every listener.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Its UDP port.
pub const SERVER_UDP: SocketAddr = SocketAddr::new(IpAddr::V4(SERVER_IP), 3000);
/// Its DNS port.
pub const SERVER_DNS: SocketAddr = SocketAddr::new(IpAddr::V4(SERVER_IP), 53);

/// The listeners, by index.
pub const UDP: usize = 0;
pub const ICMP: usize = 1;
pub const DNS: usize = 2;
pub const HTTP: usize = 3;

/// Client C's private key: 32 bytes of 0x44 (A's and B's are in the crate root).
pub const CLIENT_C_KEY: &str = "REREREREREREREREREREREREREREREREREREREREREQ=";
/// Client D's private key: 32 bytes of 0x55.
pub const CLIENT_D_KEY: &str = "VVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVU=";

/// Client A, on UDP, from here.
pub const A_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 4000);
/// Client B, on ICMP echo, from here.
pub const B_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// Client C, on DNS straight to the server, from here, as this tag.
pub const C_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 3)), 5300);
pub const C_TAG: u32 = 0x0c0c_0c0c;
/// Client D's WebSocket connection, as the HTTP driver numbers it.
pub const D_CONN: u64 = 4;

/// The server's listeners.
pub fn listeners() -> Vec<ListenerConfig> {
    vec![
        ListenerConfig::Udp,
        ListenerConfig::Icmp(Family::V4),
        ListenerConfig::Dns(domain()),
        ListenerConfig::Http,
    ]
}

pub fn domain() -> Domain {
    Domain::new(DOMAIN).expect("a valid domain")
}

/// A fresh endpoint admitting A, B, C and D, with the default pool.
pub fn endpoint(at: Instant) -> Endpoint {
    let k = keys();
    let c = PrivateKey::from_base64(CLIENT_C_KEY).expect("valid fixed key");
    let d = PrivateKey::from_base64(CLIENT_D_KEY).expect("valid fixed key");
    let allowed = vec![k.a_pub, k.b_pub, c.public_key(), d.public_key()];
    let mut config = ServerConfig::new(k.server.clone(), allowed, pool());
    // No input can spend the handshake budget: an effect of one input on
    // the next would make crashes irreproducible.
    config.handshakes_per_sec = u32::MAX;
    Endpoint::new(config, listeners(), at)
}

/// One connected client.
pub struct Client {
    pub conn: Connection,
    /// Packets it wrote to its TUN device.
    pub tun: PacketList,
}

/// The endpoint and its four clients (A on UDP, B on ICMP, C on DNS, D on
/// WebSocket), all connected.
pub struct World {
    pub endpoint: Endpoint,
    pub clients: Vec<Client>,
    /// Packets the endpoint wrote to its TUN device.
    pub tun: PacketList,
    pub now: Instant,
    /// The receiver index of the latest data message A and B sent (the
    /// server's index of their sessions), for aiming forgeries at them.
    pub live_index: [[u8; 4]; 2],
    buf: Vec<u8>,
}

impl World {
    /// Four real handshakes, from the fixed time on.
    pub fn new() -> Self {
        let start = now();
        let k = keys();
        let key = |s: &str| PrivateKey::from_base64(s).expect("valid fixed key");
        let paths = [
            (k.a.clone(), PathConfig::Udp { server: SERVER_UDP }),
            (
                k.b.clone(),
                PathConfig::Icmp {
                    server: SERVER_IP.into(),
                    id: 0xb0b,
                },
            ),
            (
                key(CLIENT_C_KEY),
                PathConfig::Dns {
                    domain: domain(),
                    resolvers: 1,
                    max_query: None,
                    tag: C_TAG,
                    seed: 7,
                },
            ),
            (
                key(CLIENT_D_KEY),
                PathConfig::Http {
                    mode: Mode::WebSocket,
                },
            ),
        ];
        let clients = paths
            .into_iter()
            .map(|(key, path)| Client {
                conn: Connection::new(
                    ClientConfig::new(key, k.server_pub),
                    vec![path],
                    start,
                    UNIX_NANOS,
                ),
                tun: PacketList::default(),
            })
            .collect();
        let mut w = Self {
            endpoint: endpoint(start),
            clients,
            tun: PacketList::default(),
            now: start,
            live_index: [[0; 4]; 2],
            buf: Vec::new(),
        };
        w.run_until(|w| w.connected(), Duration::from_secs(10));
        assert!(w.connected(), "the clients did not all connect");
        w
    }

    /// Every client has keys, and the server's session for it is on its path.
    pub fn connected(&self) -> bool {
        let sessions = self.endpoint.sessions();
        let on = |listener: usize| {
            sessions.iter().any(|s| match s.path {
                Some(Path::Icmp { session, .. }) => listener == ICMP && session.is_some(),
                Some(p) => p.listener() == listener,
                None => false,
            })
        };
        self.clients.iter().all(|c| c.conn.is_connected(self.now))
            && [UDP, ICMP, DNS, HTTP].into_iter().all(on)
    }

    /// Carry everything across and run the timers, until `done` or `limit`.
    pub fn run_until(&mut self, mut done: impl FnMut(&Self) -> bool, limit: Duration) {
        let end = self.now + limit;
        loop {
            self.settle();
            if done(self) {
                return;
            }
            let Some(t) = self.next_timeout().filter(|&t| t <= end) else {
                return;
            };
            self.now = self.now.max(t);
            self.timeouts();
        }
    }

    fn next_timeout(&self) -> Option<Instant> {
        let clients = self.clients.iter().filter_map(|c| c.conn.poll_timeout());
        clients.chain(self.endpoint.poll_timeout()).min()
    }

    /// Run every timer that is due.
    pub fn timeouts(&mut self) {
        let now = self.now;
        if self.endpoint.poll_timeout().is_some_and(|t| t <= now) {
            self.endpoint.handle_timeout(now);
        }
        for c in &mut self.clients {
            if c.conn.poll_timeout().is_some_and(|t| t <= now) {
                c.conn.handle_timeout(now);
            }
        }
    }

    /// Carry what the clients and the endpoint send until nobody sends.
    pub fn settle(&mut self) {
        for _ in 0..1000 {
            let mut moved = false;
            for i in 0..self.clients.len() {
                moved |= self.client_sends(i);
            }
            while let Some(t) = self.endpoint.poll_transmit(self.now, &mut self.buf) {
                let bytes = std::mem::take(&mut self.buf);
                self.to_client(t, &bytes[..t.len]);
                self.buf = bytes;
                moved = true;
            }
            if !moved {
                return;
            }
        }
        panic!("the world does not settle");
    }

    /// Client `i`'s transmits and HTTP commands, carried to the endpoint.
    fn client_sends(&mut self, i: usize) -> bool {
        let now = self.now;
        let mut moved = false;
        while let Some(e) = self.clients[i].conn.poll_event() {
            if let Event::Http { path, command } = e {
                // The HTTP driver opens what it is told to at once.
                if let Command::Dial { .. } = command {
                    let opened = PathEvent::Http(HttpEvent::Opened);
                    self.clients[i].conn.handle_path_event(now, path, opened);
                    moved = true;
                }
            }
        }
        let mut buf = vec![0; connection::BUF_LEN];
        while let Some(t) = self.clients[i].conn.poll_transmit(now, &mut buf) {
            self.from_client(i, &buf[..t.len]);
            moved = true;
        }
        moved
    }

    /// Bytes client `i` sent, as the endpoint's listener receives them.
    pub fn from_client(&mut self, i: usize, bytes: &[u8]) {
        let msg = match i {
            0 => Some(bytes),
            1 => bytes.get(OVERHEAD..),
            _ => None,
        };
        if let Some(m) = msg.filter(|m| m.len() > 8 && m[0] == TYPE_DATA) {
            self.live_index[i].copy_from_slice(&m[4..8]);
        }
        let (listener, input) = match i {
            0 => (
                UDP,
                Input::Datagram {
                    from: udp_peer(A_ADDR),
                    bytes,
                },
            ),
            1 => (
                ICMP,
                Input::Icmp {
                    from: B_IP.into(),
                    to: Some(SERVER_IP.into()),
                    bytes,
                },
            ),
            2 => (
                DNS,
                Input::Datagram {
                    from: udp_peer(C_ADDR),
                    bytes,
                },
            ),
            _ => (
                HTTP,
                Input::WebSocket {
                    conn: D_CONN,
                    body: bytes,
                },
            ),
        };
        self.endpoint
            .handle_input(self.now, listener, input, &mut self.tun);
    }

    /// An endpoint transmit, to the client it is for (if any).
    pub fn to_client(&mut self, t: endpoint::Transmit, bytes: &[u8]) {
        let (i, from) = match (t.listener, t.to) {
            (UDP, Destination::Udp(u)) if u.addr == A_ADDR => (0, Remote::Addr(SERVER_UDP)),
            (ICMP, Destination::Icmp { to, .. }) if to == IpAddr::V4(B_IP) => {
                (1, Remote::Addr(SocketAddr::new(SERVER_IP.into(), 0)))
            }
            (DNS, Destination::Udp(u)) if u.addr == C_ADDR => (2, Remote::Resolver(0)),
            (HTTP, Destination::WebSocket(D_CONN)) => (3, Remote::Connection),
            _ => return, // to someone the world does not hold
        };
        let c = &mut self.clients[i];
        c.conn.handle_input(self.now, 0, from, bytes, &mut c.tun);
    }
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

/// A UDP sender as the server's socket sees it.
pub fn udp_peer(addr: SocketAddr) -> UdpAddr {
    UdpAddr {
        addr,
        local: Some(SERVER_IP.into()),
    }
}

//! A deterministic simulated network for the ICMP echo transport, in the
//! manner of `common::Sim` but for a polled path: clients send echo
//! requests, the server can only answer them.
//!
//! The server is the shipped [`Endpoint`] with one ICMP listener; each
//! client is the shipped [`Connection`] with one ICMP path. The drivers do
//! what a real one does and nothing more: an ICMP message that arrives goes
//! to `handle_input`, packets from a TUN device to `handle_tun_packet`,
//! `handle_timeout` runs when `poll_timeout` passes (no ticker), and
//! `poll_transmit` is drained onto the network after every input and
//! timeout. A driver whose timeout stays in the past once handled would
//! spin: the sim fails.
//!
//! Everything checked is seen from the outside, as a packet capture would:
//! - at the server's side of the link, every echo request that arrives is
//!   open until the one reply that answers it (same address, id and
//!   sequence) leaves; a reply that answers nothing open is a violation.
//!   Replies are classified by what they carry (a handshake response, data,
//!   a keepalive, the bare magic, an ordinary ping's payload);
//! - at each client, every request it sends (sequence, message type) and
//!   every reply that reaches it, whether its connection took it (no drop
//!   counted) and whether that wrote a packet to its TUN device; its pacer
//!   as its status shows it.
//!
//! Between the clients and the server sits a NAT with a stateful firewall:
//! requests leave with the NAT's public address and a rewritten echo id
//! (stable per flow, or fresh per request from a small shared pool, so
//! different clients reuse each other's ids); replies get the original id
//! back, and a reply that does not answer an outstanding request (an
//! id + sequence pair seen going out and not yet answered, at most
//! `CONNTRACK_TIMEOUT` old) is dropped and counted. The lossy, delayed link
//! is between the NAT and the server.
//!
//! Echo messages are built and parsed with the real codec (`wire::icmp`,
//! ICMPv4 with checksums), so the NAT's rewriting is checked too.

#![allow(dead_code)] // not every test uses every helper

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use iptun_proto::DropReason;
use iptun_proto::connection::{Connection, Event, PathConfig, PathDetail, Remote};
use iptun_proto::crypto::{PrivateKey, PublicKey};
use iptun_proto::endpoint::{Destination, Endpoint, Input, ListenerConfig, Path};
use iptun_proto::engine::{ServerConfig, SessionInfo};
use iptun_proto::transport::PacketList;
use iptun_proto::transport::icmp::IcmpClientStats;
use iptun_proto::transport::poll::{Cadence, MAX_PARKED};
use iptun_proto::wire::icmp::{self, ECHO_HEADER_LEN, Echo, Family, MAGIC, ReplyInfo};
use iptun_proto::wire::message::{TYPE_DATA, TYPE_INIT, TYPE_RESPONSE};

use crate::common::{
    Link, Rng, UNIX_START, assert_not_due, client_config, counted, is_keepalive, kind,
    receiver_index,
};

/// How long the server holds a request.
pub const HOLD: Duration = Cadence::ICMP.hold;
/// The client's pacing.
pub const MIN_OUTSTANDING: usize = Cadence::ICMP.min_outstanding;
pub const MAX_OUTSTANDING: usize = Cadence::ICMP.max_outstanding;
pub const REQUEST_TIMEOUT: Duration = Cadence::ICMP.request_timeout;
/// How long the firewall remembers an unanswered request (Linux conntrack's
/// ICMP timeout).
pub const CONNTRACK_TIMEOUT: Duration = Duration::from_secs(30);

pub const FAMILY: Family = Family::V4;
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const NAT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);

/// An IPv4 packet carrying an ICMP message.
#[derive(Clone, Debug)]
pub struct Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub icmp: Vec<u8>,
}

/// Build an echo message carrying `MAGIC` + `msg` (or just `body` when `magic` is false).
pub fn echo(reply: bool, id: u16, seq: u16, body: &[u8], magic: bool) -> Vec<u8> {
    let extra = if magic { MAGIC.len() } else { 0 };
    let mut buf = vec![0u8; ECHO_HEADER_LEN + extra + body.len()];
    if magic {
        icmp::emit_magic(&mut buf);
    }
    buf[ECHO_HEADER_LEN + extra..].copy_from_slice(body);
    let n = icmp::emit_echo(FAMILY, reply, id, seq, &mut buf, extra + body.len());
    assert_eq!(n, buf.len());
    buf
}

/// The same echo message with another identifier (checksum recomputed), as
/// a NAT rewrites it.
fn with_id(icmp: &[u8], id: u16) -> Vec<u8> {
    let e = Echo::parse(FAMILY, icmp).expect("a valid echo");
    let mut buf = icmp.to_vec();
    icmp::emit_echo(FAMILY, e.reply, id, e.seq, &mut buf, e.payload.len());
    buf
}

fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => panic!("an IPv6 address on an IPv4 network"),
    }
}

// ---------------------------------------------------------------------------
// The server, and what its side of the link saw
// ---------------------------------------------------------------------------

/// An echo request as the server sees it (and its reply must echo).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    pub ip: Ipv4Addr,
    pub id: u16,
    pub seq: u16,
}

/// What an echo request that reached the server carried.
#[derive(Clone, Copy, Debug)]
pub struct Arrival {
    pub at: Instant,
    /// The client that sent it (the sim knows; the server does not).
    pub client: usize,
    /// The receiver index, if it carried a data message.
    pub index: Option<u32>,
}

/// What a reply carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A handshake response.
    Response,
    /// A data message with a packet.
    Message,
    /// A keepalive, after the request was held `HOLD`.
    Keepalive,
    /// A keepalive sooner: the request was held under keys the client has
    /// since replaced (checked by `superseded_legitimately`).
    Superseded,
    /// The bare magic: the server had no session for it.
    Bare,
    /// An ordinary ping's payload, echoed.
    Ping,
    /// A keepalive sooner than `HOLD` to a request let go because the
    /// server held too many of the client's (see `QUIET_ANSWER`).
    Overflow,
}

/// One answered request, as the server's side of the link saw it.
#[derive(Clone, Copy, Debug)]
pub struct Answered {
    pub request: Request,
    pub arrived: Instant,
    pub answered: Instant,
    pub how: Answer,
    pub client: usize,
    pub index: Option<u32>,
    /// What the reply told of the request.
    pub info: Option<ReplyInfo>,
}

pub struct IcmpServer {
    pub endpoint: Endpoint,
    /// Inner packets written to its TUN device, with their times.
    pub tun: Vec<(Instant, Vec<u8>)>,
    /// Drops counted for messages it received.
    pub errors: Vec<DropReason>,
    /// Requests that arrived and were not answered yet.
    pub open: HashMap<Request, Arrival>,
    /// Every request that arrived, in order.
    pub arrivals: Vec<(Request, Arrival)>,
    pub answered: Vec<Answered>,
    /// Replies that answered no open request.
    pub violations: Vec<String>,
    /// Requests that arrived again (same address, id and sequence) while still open.
    pub repeated: u64,
    buf: Vec<u8>,
}

impl IcmpServer {
    fn new(config: ServerConfig, now: Instant) -> Self {
        Self {
            endpoint: Endpoint::new(config, vec![ListenerConfig::Icmp(FAMILY)], now),
            tun: Vec::new(),
            errors: Vec::new(),
            open: HashMap::new(),
            arrivals: Vec::new(),
            answered: Vec::new(),
            violations: Vec::new(),
            repeated: 0,
            buf: Vec::new(),
        }
    }

    /// An ICMP message from `src` (sent by client `client`) reaches the
    /// server's host: noted, then handed to the endpoint.
    fn receive(&mut self, now: Instant, src: Ipv4Addr, icmp: &[u8], client: usize) {
        let e = Echo::parse(FAMILY, icmp).expect("clients send valid echoes");
        let request = Request {
            ip: src,
            id: e.id,
            seq: e.seq,
        };
        let msg = e.tunnel_message();
        let arrival = Arrival {
            at: now,
            client,
            index: msg
                .filter(|m| m.len() >= 8 && kind(m) == TYPE_DATA)
                .map(receiver_index),
        };
        self.arrivals.push((request, arrival));
        if self.open.insert(request, arrival).is_some() {
            self.repeated += 1;
        }
        let before = self.endpoint.drops();
        let mut tun = PacketList::default();
        let input = Input::Icmp {
            from: src.into(),
            to: Some(SERVER_IP.into()),
            bytes: icmp,
        };
        self.endpoint.handle_input(now, 0, input, &mut tun);
        self.errors.extend(counted(&before, &self.endpoint.drops()));
        self.tun.extend(tun.packets.into_iter().map(|p| (now, p)));
    }

    /// The replies the endpoint has to send, noted as they leave.
    fn transmits(&mut self, now: Instant) -> Vec<Packet> {
        let mut out = Vec::new();
        while let Some(t) = self.endpoint.poll_transmit(now, &mut self.buf) {
            let Destination::Icmp { to, from } = t.to else {
                panic!("an ICMP listener sent {:?}", t.to)
            };
            assert_eq!(
                from,
                IpAddr::from(SERVER_IP),
                "replies leave from the address asked"
            );
            let icmp = self.buf[..t.len].to_vec();
            self.note_reply(now, v4(to), &icmp);
            out.push(Packet {
                src: SERVER_IP,
                dst: v4(to),
                icmp,
            });
        }
        out
    }

    fn note_reply(&mut self, now: Instant, to: Ipv4Addr, icmp: &[u8]) {
        let e = Echo::parse(FAMILY, icmp).expect("the server sends valid echoes");
        assert!(e.reply, "the server only sends replies");
        let request = Request {
            ip: to,
            id: e.id,
            seq: e.seq,
        };
        let Some(a) = self.open.remove(&request) else {
            self.violations
                .push(format!("a reply to {request:?}, which is not open"));
            return;
        };
        let reply = e.tunnel_reply();
        let held = || self.open.values().filter(|x| x.client == a.client).count();
        let how = match reply.map(|(_, m)| m) {
            None => Answer::Ping,
            Some([]) => Answer::Bare,
            Some(m) if kind(m) == TYPE_RESPONSE => Answer::Response,
            Some(m) if is_keepalive(m) && now - a.at >= HOLD => Answer::Keepalive,
            Some(m) if is_keepalive(m) && held() >= MAX_PARKED => Answer::Overflow,
            Some(m) if is_keepalive(m) => Answer::Superseded,
            Some(_) => Answer::Message,
        };
        self.answered.push(Answered {
            request,
            arrived: a.at,
            answered: now,
            how,
            client: a.client,
            index: a.index,
            info: reply.map(|(i, _)| i),
        });
    }

    /// Whether a keepalive that answered `a` before its hold was due to a
    /// rekey: a request of the same client under another receiver index
    /// arrived after it and no later than the answer.
    pub fn superseded_legitimately(&self, a: &Answered) -> bool {
        self.arrivals.iter().any(|(_, b)| {
            b.client == a.client
                && b.at >= a.arrived
                && b.at <= a.answered
                && b.index.is_some()
                && b.index != a.index
        })
    }

    pub fn session(&self, key: &PublicKey) -> Option<SessionInfo<Path>> {
        self.endpoint.sessions().into_iter().find(|s| s.key == *key)
    }

    /// Drops counted, attributed to a client or not.
    pub fn drop_total(&self) -> u64 {
        self.endpoint.drops().total()
    }
}

// ---------------------------------------------------------------------------
// The clients
// ---------------------------------------------------------------------------

/// A request a client sent.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    pub at: Instant,
    pub seq: u16,
    /// The tunnel message's type.
    pub kind: u8,
    /// It carried a keepalive: a bare poll (or a key confirmation).
    pub keepalive: bool,
}

/// A reply the client's connection took (no drop counted).
#[derive(Clone, Copy, Debug)]
pub struct Taken {
    pub at: Instant,
    /// It wrote a packet to the TUN device.
    pub carried_data: bool,
    /// The client's target after it.
    pub target: usize,
    /// Requests the client had given up on after it.
    pub unanswered: u64,
}

pub struct IcmpClient {
    pub conn: Connection,
    pub key: PublicKey,
    /// Its address behind the NAT.
    pub lan_ip: Ipv4Addr,
    /// Its echo identifier (the NAT rewrites it on the way out).
    pub id: u16,
    /// Inner packets written to its TUN device, with their times.
    pub tun: Vec<(Instant, Vec<u8>)>,
    pub events: Vec<(Instant, Event)>,
    /// Drops counted for replies carrying a message.
    pub errors: Vec<DropReason>,
    /// Replies carrying no message (the server had no session).
    pub bare_replies: u64,
    /// Echo replies without a tunnel message (answers to ordinary pings):
    /// id, sequence, payload.
    pub pings: Vec<(u16, u16, Vec<u8>)>,
    pub requests: Vec<Sent>,
    pub inits: Vec<Instant>,
    pub taken: Vec<Taken>,
    /// Times the client stopped sending while connected with fewer
    /// requests outstanding than its pacer's target.
    pub short: u64,
}

impl IcmpClient {
    /// The ICMP path's counters and pacer, as the status shows them.
    pub fn stats(&self, now: Instant) -> IcmpClientStats {
        match self.conn.status(now).paths[0].detail {
            PathDetail::Icmp(s) => s,
            ref other => panic!("an ICMP path shows {other:?}"),
        }
    }

    /// The configuration of the latest `Configured` event.
    pub fn v4(&self) -> Ipv4Addr {
        self.events
            .iter()
            .rev()
            .find_map(|(_, e)| match e {
                Event::Configured(c) => Some(c.client_v4),
                _ => None,
            })
            .expect("configured")
    }

    /// Times at which it took a message from the server (data or keepalive).
    pub fn rx_times(&self) -> impl Iterator<Item = Instant> + '_ {
        self.taken.iter().map(|t| t.at)
    }

    /// An ICMP message from `src` reaches the client's host: it goes to the
    /// connection (which takes only replies to its own requests), and an
    /// ordinary ping's reply also to whoever pinged.
    fn receive(&mut self, now: Instant, src: Ipv4Addr, icmp: &[u8]) {
        let e = Echo::parse(FAMILY, icmp).expect("the NAT passes valid echoes");
        let msg = e.tunnel_reply().map(|(_, m)| m);
        if e.reply && e.tunnel_message().is_none() {
            self.pings.push((e.id, e.seq, e.payload.to_vec()));
        }
        let before = self.conn.drops();
        let mut tun = PacketList::default();
        let from = SocketAddr::new(src.into(), 0);
        self.conn
            .handle_input(now, 0, Remote::Addr(from), icmp, &mut tun);
        let dropped = counted(&before, &self.conn.drops());
        match (msg, dropped) {
            (None, _) => assert_eq!(dropped, None, "a ping's reply counted as a drop"),
            (Some([]), _) => self.bare_replies += 1,
            (Some(_), Some(e)) => self.errors.push(e),
            (Some(_), None) => {
                let s = self.stats(now);
                self.taken.push(Taken {
                    at: now,
                    carried_data: !tun.packets.is_empty(),
                    target: s.target,
                    unanswered: s.unanswered,
                });
            }
        }
        self.tun.extend(tun.packets.into_iter().map(|p| (now, p)));
    }

    /// What the connection has to send, noted as it leaves the host.
    fn transmits(&mut self, now: Instant, buf: &mut Vec<u8>) -> Vec<Packet> {
        let mut out = Vec::new();
        while let Some(t) = self.conn.poll_transmit(now, buf) {
            out.push(self.request(now, t, &buf[..t.len]));
        }
        while let Some(e) = self.conn.poll_event() {
            self.events.push((now, e));
        }
        let s = self.stats(now);
        if self.conn.is_connected(now) && s.outstanding < s.target && !s.paced {
            self.short += 1;
        }
        out
    }

    fn request(
        &mut self,
        now: Instant,
        t: iptun_proto::connection::Transmit,
        icmp: &[u8],
    ) -> Packet {
        assert_eq!(t.path, 0);
        assert_eq!(t.to, Remote::Addr(SocketAddr::new(SERVER_IP.into(), 0)));
        let e = Echo::parse(FAMILY, icmp).expect("the connection sends valid echoes");
        assert!(!e.reply && e.id == self.id, "a request with our id");
        let msg = e
            .tunnel_message()
            .expect("the connection's requests carry messages");
        self.requests.push(Sent {
            at: now,
            seq: e.seq,
            kind: kind(msg),
            keepalive: is_keepalive(msg),
        });
        if kind(msg) == TYPE_INIT {
            self.inits.push(now);
        }
        Packet {
            src: self.lan_ip,
            dst: SERVER_IP,
            icmp: icmp.to_vec(),
        }
    }
}

// ---------------------------------------------------------------------------
// The NAT and its firewall
// ---------------------------------------------------------------------------

/// How the NAT picks the public echo id of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdMode {
    /// One id per (client, id) flow, distinct between flows (as Linux does).
    PerFlow,
    /// A fresh id for every request, cycling through a small pool shared by
    /// all clients: clients get each other's ids, and one client's ids change
    /// all the time. Replies are told apart by id and sequence.
    PerRequest,
}

/// An outstanding request, as the firewall tracks it.
#[derive(Clone, Copy, Debug)]
struct Conn {
    lan: Ipv4Addr,
    id: u16,
    server: Ipv4Addr,
    at: Instant,
}

/// A reply the firewall dropped.
#[derive(Clone, Debug)]
pub struct Dropped {
    pub at: Instant,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub id: u16,
    pub seq: u16,
}

pub struct Nat {
    /// The source address requests leave with (change it to renumber).
    pub public_ip: Ipv4Addr,
    pub mode: IdMode,
    flows: HashMap<(Ipv4Addr, u16), u16>,
    next_id: u16,
    /// Outstanding requests by (public address, public id, sequence).
    conns: HashMap<(Ipv4Addr, u16, u16), Conn>,
    /// Replies dropped for answering no outstanding request.
    pub firewall_drops: Vec<Dropped>,
    /// Public ids handed out, per client address.
    pub ids_used: HashMap<Ipv4Addr, Vec<u16>>,
    /// Requests that left with a public id another client's outstanding
    /// request also had.
    pub ids_shared_live: u64,
    pruned: Option<Instant>,
}

/// The pool `IdMode::PerRequest` cycles through.
const SHARED_IDS: u16 = 5;
const FIRST_PUBLIC_ID: u16 = 1000;

impl Nat {
    pub fn new(mode: IdMode) -> Self {
        Self {
            public_ip: NAT_IP,
            mode,
            flows: HashMap::new(),
            next_id: 0,
            conns: HashMap::new(),
            firewall_drops: Vec::new(),
            ids_used: HashMap::new(),
            ids_shared_live: 0,
            pruned: None,
        }
    }

    /// A packet from the LAN to the internet: rewrite an echo request.
    fn outbound(&mut self, now: Instant, p: Packet) -> Option<Packet> {
        // Expired entries are pruned once a second (lookups check the age
        // themselves): pruning per packet costs too much when thousands
        // of requests go unanswered.
        if self
            .pruned
            .is_none_or(|t| now - t >= Duration::from_secs(1))
        {
            self.conns
                .retain(|_, c| now.saturating_duration_since(c.at) < CONNTRACK_TIMEOUT);
            self.pruned = Some(now);
        }
        let e = Echo::parse(FAMILY, &p.icmp).expect("clients send valid echoes");
        assert!(!e.reply, "clients only send requests");
        let ip = self.public_ip;
        let public = match self.mode {
            IdMode::PerFlow => {
                let next = &mut self.next_id;
                *self.flows.entry((p.src, e.id)).or_insert_with(|| {
                    *next += 1;
                    FIRST_PUBLIC_ID + *next
                })
            }
            IdMode::PerRequest => {
                let free = (0..SHARED_IDS)
                    .map(|k| FIRST_PUBLIC_ID + (self.next_id + k) % SHARED_IDS)
                    .find(|&id| {
                        self.conns.get(&(ip, id, e.seq)).is_none_or(|c| {
                            now.saturating_duration_since(c.at) >= CONNTRACK_TIMEOUT
                        })
                    });
                let Some(id) = free else {
                    return None; // no mapping free: the NAT drops it
                };
                self.next_id = (id - FIRST_PUBLIC_ID + 1) % SHARED_IDS;
                id
            }
        };
        if self.mode == IdMode::PerRequest
            && self.conns.iter().any(|(&(cip, cid, _), c)| {
                (cip, cid) == (ip, public)
                    && c.lan != p.src
                    && now.saturating_duration_since(c.at) < CONNTRACK_TIMEOUT
            })
        {
            self.ids_shared_live += 1;
        }
        let old = self.conns.insert(
            (ip, public, e.seq),
            Conn {
                lan: p.src,
                id: e.id,
                server: p.dst,
                at: now,
            },
        );
        assert!(
            old.is_none_or(|c| now.saturating_duration_since(c.at) >= CONNTRACK_TIMEOUT),
            "the NAT reused a live mapping"
        );
        self.ids_used.entry(p.src).or_default().push(public);
        Some(Packet {
            src: ip,
            dst: p.dst,
            icmp: with_id(&p.icmp, public),
        })
    }

    /// A packet from the internet: let a reply to an outstanding request
    /// through with its original id, drop anything else.
    fn inbound(&mut self, now: Instant, p: Packet) -> Option<Packet> {
        let e = Echo::parse(FAMILY, &p.icmp).expect("the server sends valid echoes");
        let k = (p.dst, e.id, e.seq);
        let conn = self.conns.get(&k).copied().filter(|c| {
            e.reply && c.server == p.src && now.saturating_duration_since(c.at) < CONNTRACK_TIMEOUT
        });
        let Some(conn) = conn else {
            self.firewall_drops.push(Dropped {
                at: now,
                src: p.src,
                dst: p.dst,
                id: e.id,
                seq: e.seq,
            });
            return None;
        };
        self.conns.remove(&k);
        Some(Packet {
            src: p.src,
            dst: conn.lan,
            icmp: with_id(&p.icmp, conn.id),
        })
    }
}

// ---------------------------------------------------------------------------
// The network
// ---------------------------------------------------------------------------

/// An ICMP message on the link between the NAT and the server.
#[derive(Clone, Debug)]
pub struct Wire {
    pub at: Instant,
    /// Toward the server (a request), else toward the NAT (a reply).
    pub up: bool,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub id: u16,
    pub seq: u16,
    /// The tunnel message it carries (after the magic), if any.
    pub msg: Option<Vec<u8>>,
    pub lost: bool,
}

struct InFlight {
    at: Instant,
    seq: u64,
    /// The client that sent it, for a request.
    from_client: Option<usize>,
    packet: Packet,
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

/// A firewall's rate limit on echo requests: a token bucket of `rate` a
/// second, `burst` deep (as nftables' `limit rate N/second`, burst 5).
#[derive(Clone, Copy, Debug)]
pub struct RequestLimit {
    pub rate: f64,
    pub burst: f64,
    tokens: f64,
    at: Option<Instant>,
}

impl RequestLimit {
    pub fn new(rate: f64) -> Self {
        Self {
            rate,
            burst: 5.0,
            tokens: 5.0,
            at: None,
        }
    }

    fn pass(&mut self, now: Instant) -> bool {
        let dt = self.at.map_or(0.0, |t| (now - t).as_secs_f64());
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct IcmpSim {
    pub start: Instant,
    pub now: Instant,
    pub link: Link,
    /// A share of echo requests lost (besides the link's loss both ways).
    pub request_loss: f64,
    /// A firewall that passes so many echo requests a second and drops the rest.
    pub request_limit: Option<RequestLimit>,
    /// Requests the limit dropped.
    pub limited: u64,
    pub rng: Rng,
    pub server: IcmpServer,
    pub nat: Nat,
    pub clients: Vec<IcmpClient>,
    pub wire: Vec<Wire>,
    in_flight: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    buf: Vec<u8>,
}

impl IcmpSim {
    pub fn new(config: ServerConfig, link: Link, mode: IdMode, seed: u64) -> Self {
        assert_eq!(
            link.duplicate, 0.0,
            "a duplicated reply is one the firewall must drop"
        );
        let start = Instant::now();
        Self {
            start,
            now: start,
            link,
            request_loss: 0.0,
            request_limit: None,
            limited: 0,
            rng: Rng::new(seed),
            server: IcmpServer::new(config, start),
            nat: Nat::new(mode),
            clients: Vec::new(),
            wire: Vec::new(),
            in_flight: BinaryHeap::new(),
            seq: 0,
            buf: Vec::new(),
        }
    }

    /// Add a client behind the NAT at 192.168.1.(10 + i), using echo id
    /// `id`; it starts its handshake at once. Returns its index.
    pub fn add_client(&mut self, key: PrivateKey, id: u16) -> usize {
        let i = self.clients.len();
        let config = client_config(key);
        let unix = UNIX_START + self.elapsed().as_nanos() as u64;
        let path = PathConfig::Icmp {
            server: SERVER_IP.into(),
            id,
        };
        self.clients.push(IcmpClient {
            key: config.private_key.public_key(),
            conn: Connection::new(config, vec![path], self.now, unix),
            lan_ip: Ipv4Addr::new(192, 168, 1, 10 + i as u8),
            id,
            tun: Vec::new(),
            events: Vec::new(),
            errors: Vec::new(),
            bare_replies: 0,
            pings: Vec::new(),
            requests: Vec::new(),
            inits: Vec::new(),
            taken: Vec::new(),
            short: 0,
        });
        i
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn next_event(&self) -> Option<Instant> {
        let arrival = self.in_flight.peek().map(|Reverse(f)| f.at);
        let clients = self.clients.iter().filter_map(|c| c.conn.poll_timeout());
        let t = arrival
            .into_iter()
            .chain(self.server.endpoint.poll_timeout())
            .chain(clients)
            .min()?;
        Some(t.max(self.now))
    }

    /// Run everything due up to `deadline` and leave the clock there.
    pub fn run_until(&mut self, deadline: Instant) {
        while let Some(t) = self.next_event().filter(|&t| t <= deadline) {
            self.now = t;
            self.step();
        }
        self.now = deadline;
    }

    pub fn run_for(&mut self, d: Duration) {
        self.run_until(self.now + d);
    }

    /// Run until `done` holds (checked after every step) or `limit` passes.
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

    /// Run until client `i` is connected and the server has confirmed its
    /// keys (an authenticated message with a session came from it).
    pub fn connect(&mut self, i: usize) {
        let ok = self.run_until_cond(Duration::from_secs(60), |s| s.connected(i));
        assert!(
            ok,
            "client {i} did not connect: client drops {:?}, server errors {:?}",
            self.clients[i].conn.drops(),
            self.server.errors
        );
    }

    /// Client `i` has keys and the server sends with them: its session's
    /// path names the session, which only a data message sets.
    pub fn connected(&self, i: usize) -> bool {
        let c = &self.clients[i];
        c.conn.is_connected(self.now)
            && self.server.session(&c.key).is_some_and(|s| {
                matches!(
                    s.path,
                    Some(Path::Icmp {
                        session: Some(_),
                        ..
                    })
                )
            })
    }

    /// Do everything due now: arrivals, then timeouts.
    fn step(&mut self) {
        let now = self.now;
        while self.in_flight.peek().is_some_and(|Reverse(f)| f.at <= now) {
            let Reverse(f) = self.in_flight.pop().unwrap();
            match f.from_client {
                Some(c) => {
                    let p = f.packet;
                    self.server.receive(now, p.src, &p.icmp, c);
                    self.flush_server();
                }
                None => self.inbound_to_lan(f.packet),
            }
        }
        if self
            .server
            .endpoint
            .poll_timeout()
            .is_some_and(|t| t <= now)
        {
            self.server.endpoint.handle_timeout(now);
            self.flush_server();
            let t = self.server.endpoint.poll_timeout();
            assert_not_due("the server", t, now, self.start);
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

    /// A reply reaches the NAT: through the firewall to its client, if it
    /// answers an outstanding request.
    fn inbound_to_lan(&mut self, p: Packet) {
        let Some(p) = self.nat.inbound(self.now, p) else {
            return;
        };
        let i = self
            .clients
            .iter()
            .position(|c| c.lan_ip == p.dst)
            .expect("the NAT only restores to its clients");
        self.clients[i].receive(self.now, p.src, &p.icmp);
        self.flush_client(i);
    }

    fn flush_server(&mut self) {
        for p in self.server.transmits(self.now) {
            self.transmit(None, p);
        }
    }

    fn flush_client(&mut self, i: usize) {
        for p in self.clients[i].transmits(self.now, &mut self.buf) {
            self.outbound_from_lan(i, p);
        }
    }

    /// A packet from client `i`'s host, out through the NAT.
    fn outbound_from_lan(&mut self, i: usize, p: Packet) {
        if let Some(p) = self.nat.outbound(self.now, p) {
            self.transmit(Some(i), p);
        }
    }

    /// Put a packet on the link between the NAT and the server.
    fn transmit(&mut self, from_client: Option<usize>, packet: Packet) {
        let e = Echo::parse(FAMILY, &packet.icmp).expect("valid echo");
        let up = from_client.is_some();
        let mut lost = self.rng.chance(self.link.loss);
        if up && !lost {
            lost = self.rng.chance(self.request_loss);
            if !lost && let Some(l) = &mut self.request_limit {
                lost = !l.pass(self.now);
                self.limited += u64::from(lost);
            }
        }
        self.wire.push(Wire {
            at: self.now,
            up,
            src: packet.src,
            dst: packet.dst,
            id: e.id,
            seq: e.seq,
            msg: if up {
                e.tunnel_message().map(<[u8]>::to_vec)
            } else {
                e.tunnel_reply().map(|(_, m)| m.to_vec())
            },
            lost,
        });
        if lost {
            return;
        }
        let at = self.now + self.link.latency + self.rng.duration_up_to(self.link.jitter);
        self.seq += 1;
        self.in_flight.push(Reverse(InFlight {
            at,
            seq: self.seq,
            from_client,
            packet,
        }));
    }

    /// Client `i`'s TUN device gives it `packet`: it goes out at once (a
    /// request carries it), or its drop is counted.
    pub fn client_send(&mut self, i: usize, packet: &[u8]) -> Result<(), DropReason> {
        let now = self.now;
        let c = &mut self.clients[i];
        let before = c.conn.drops();
        let mut buf = vec![0; iptun_proto::connection::BUF_LEN];
        let sent = c.conn.handle_tun_packet(now, packet, &mut buf);
        let dropped = counted(&before, &c.conn.drops());
        let r = match (sent, dropped) {
            (Some(t), None) => {
                let p = c.request(now, t, &buf[..t.len]);
                self.outbound_from_lan(i, p);
                Ok(())
            }
            (None, Some(e)) => Err(e),
            // Waiting for the pacing (or dropped from its queue: see the stats).
            (None, None) => Ok(()),
            other => panic!("handle_tun_packet: {other:?}"),
        };
        self.flush_client(i);
        r
    }

    /// The server's TUN device gives it `packet`: a reply carries it at
    /// once, or it waits for the client's next request; a packet dropped
    /// is counted.
    pub fn server_send(&mut self, packet: &[u8]) -> Result<(), DropReason> {
        let now = self.now;
        let s = &mut self.server;
        let before = s.endpoint.drops();
        let mut buf = vec![0; iptun_proto::endpoint::BUF_LEN];
        let sent = s.endpoint.handle_tun_packet(now, packet, &mut buf);
        if let Some(e) = counted(&before, &s.endpoint.drops()) {
            assert!(sent.is_none());
            return Err(e);
        }
        if let Some(t) = sent {
            let Destination::Icmp { to, .. } = t.to else {
                panic!("sent to {:?}", t.to)
            };
            let icmp = buf[..t.len].to_vec();
            s.note_reply(now, v4(to), &icmp);
            let p = Packet {
                src: SERVER_IP,
                dst: v4(to),
                icmp,
            };
            self.transmit(None, p);
        }
        self.flush_server();
        Ok(())
    }

    /// An ordinary ping from client `i`'s host (no magic), through the NAT.
    pub fn ping(&mut self, i: usize, id: u16, seq: u16, payload: &[u8]) {
        let p = Packet {
            src: self.clients[i].lan_ip,
            dst: SERVER_IP,
            icmp: echo(false, id, seq, payload, false),
        };
        self.outbound_from_lan(i, p);
    }
}

//! A deterministic simulated network for the ICMP echo transport, in the
//! manner of `common::Sim` but for a polled path: clients send echo
//! requests, the server can only answer them.
//!
//! The drivers here mirror the binary's, step for step:
//! - the server (`crates/iptun/src/server/icmp.rs`): a request carrying a
//!   tunnel message is keyed with `Server::session_of`, opened by
//!   `handle_datagram` on a polled path, then parked (`poll::Parking`); a
//!   handshake response answers the request that carried the init; TUN
//!   packets for a client go through `Parking::downstream`; every second
//!   `poll_timers` runs and expired requests are answered with
//!   `Server::seal_keepalive` (or the bare magic if the session is gone);
//! - the client (`crates/iptun/src/client/uplink.rs`, `IcmpUplink`): every
//!   message is an echo request (its own id, a running sequence number,
//!   `MAGIC` and the tunnel message), counted by a `poll::Pacer`; replies
//!   that pass the `ours` check feed the engine and `Pacer::replied`; after
//!   a batch of replies and at every timer `top_up` sends keepalives as bare
//!   requests up to the pacer's target.
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
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use iptun_proto::DropReason;
use iptun_proto::crypto::{PrivateKey, PublicKey};
use iptun_proto::engine::{
    Client, ClientConfig, ClientEvent, ClientOutput, PathKind, Server, ServerConfig, ServerOutput,
    SessionId, SessionInfo,
};
use iptun_proto::poll::{Cadence, Pacer, Parking, Reply};
use iptun_proto::wire::icmp::{self, ECHO_HEADER_LEN, Echo, Family, MAGIC};
use iptun_proto::wire::message::TYPE_INIT;

use crate::common::{BUF, Link, Rng, UNIX_START, server_key};

/// How long the server holds a request (the binary uses `Cadence::ICMP` too).
pub const HOLD: Duration = Cadence::ICMP.hold;
/// The client's pacing.
pub const MIN_OUTSTANDING: usize = Cadence::ICMP.min_outstanding;
pub const MAX_OUTSTANDING: usize = Cadence::ICMP.max_outstanding;
pub const REQUEST_TIMEOUT: Duration = Cadence::ICMP.request_timeout;
/// The server's timer tick (the binary's one-second interval).
pub const SERVER_TICK: Duration = Duration::from_secs(1);
/// How long the firewall remembers an unanswered request (Linux conntrack's
/// ICMP timeout).
pub const CONNTRACK_TIMEOUT: Duration = Duration::from_secs(30);

pub const FAMILY: Family = Family::V4;
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const NAT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);

/// The server's path back to a client, as the binary's `Path::Icmp`: the
/// client's (public) address and the session whose requests can carry replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpPath {
    pub ip: Ipv4Addr,
    pub session: Option<SessionId>,
}

impl PathKind for IcmpPath {
    fn is_polled(&self) -> bool {
        true
    }
}

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

// ---------------------------------------------------------------------------
// The server's driver
// ---------------------------------------------------------------------------

/// A held echo request: where the reply goes and what it echoes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    pub ip: Ipv4Addr,
    pub id: u16,
    pub seq: u16,
}

/// What answered a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A handshake response, at once.
    Response,
    /// A downstream message (data, or a message queued for the session).
    Message,
    /// A keepalive: the held request expired.
    Keepalive,
    /// A keepalive at once: the request was held under keys the client has
    /// since replaced (a rekey or a restart).
    Superseded,
    /// The bare magic: the session is gone.
    Bare,
    /// An ordinary ping, echoed.
    Ping,
}

/// One answered request, as the server's audit saw it.
#[derive(Clone, Copy, Debug)]
pub struct Answered {
    pub request: Request,
    pub arrived: Instant,
    pub answered: Instant,
    pub how: Answer,
}

pub struct IcmpServer {
    pub engine: Server<IcmpPath>,
    pub parking: Parking<SessionId, Request>,
    /// Inner packets written to the TUN device, with their times.
    pub tun: Vec<(Instant, Vec<u8>)>,
    /// Errors `handle_datagram` returned (the request is then never answered).
    pub errors: Vec<(Request, DropReason)>,
    /// Messages the engine sent on a path with no session, which the binary's
    /// `Senders::send` drops (nothing counts them).
    pub lost_no_session: Vec<Instant>,
    /// Requests received and not answered yet, with their arrival times.
    pub open: HashMap<Request, Instant>,
    /// Requests let go unanswered because too many were held.
    pub overflowed: usize,
    /// The receiver index of each session's latest request.
    indices: HashMap<SessionId, u32>,
    pub answered: Vec<Answered>,
    /// Replies that answered no open request, or a request twice.
    pub violations: Vec<String>,
    /// Requests that arrived again (same address, id and sequence) while still open.
    pub repeated: u64,
    outbox: Vec<Packet>,
    buf: Box<[u8]>,
}

impl IcmpServer {
    fn new(config: ServerConfig, now: Instant) -> Self {
        Self {
            engine: Server::new(config, now),
            parking: Parking::new(HOLD),
            tun: Vec::new(),
            errors: Vec::new(),
            lost_no_session: Vec::new(),
            open: HashMap::new(),
            overflowed: 0,
            indices: HashMap::new(),
            answered: Vec::new(),
            violations: Vec::new(),
            repeated: 0,
            outbox: Vec::new(),
            buf: vec![0; BUF].into_boxed_slice(),
        }
    }

    /// An ICMP message from `src` (the binary's `icmp::receive`).
    fn receive(&mut self, now: Instant, src: Ipv4Addr, bytes: &[u8]) {
        let Ok(e) = Echo::parse(FAMILY, bytes) else {
            return;
        };
        if e.reply {
            return;
        }
        let request = Request {
            ip: src,
            id: e.id,
            seq: e.seq,
        };
        if self.open.insert(request, now).is_some() {
            self.repeated += 1;
        }
        match e.tunnel_message() {
            Some(msg) => self.tunnel_request(now, request, msg),
            // An ordinary ping: answered at once, as the kernel would.
            None => {
                let payload = e.payload.to_vec();
                self.reply(now, request, &payload, false, Answer::Ping);
            }
        }
    }

    /// The binary's `tunnel_request`: open, then hold the request.
    fn tunnel_request(&mut self, now: Instant, request: Request, msg: &[u8]) {
        let session = self.engine.session_of(msg);
        let from = IcmpPath {
            ip: request.ip,
            session,
        };
        let result = match self.engine.handle_datagram(now, &from, msg, &mut self.buf) {
            Ok(ServerOutput::Send(path, m)) => Ok(Some((path, m.to_vec()))),
            Ok(ServerOutput::Tun(p)) => {
                self.tun.push((now, p.to_vec()));
                Ok(None)
            }
            Ok(ServerOutput::Nothing) => Ok(None),
            Err(e) => Err(e),
        };
        match result {
            // A handshake response answers the very request that carried the init.
            Ok(Some((_, m))) if session.is_none() => {
                self.answer(now, request, &m, Answer::Response);
                return;
            }
            Ok(Some((path, m))) => self.send(now, path, &m),
            Ok(None) => {}
            Err(e) => {
                self.errors.push((request, e));
                return; // unauthenticated: no answer at all
            }
        }
        if let Some(session) = session {
            let index = match iptun_proto::wire::Message::parse(msg) {
                Ok(iptun_proto::wire::Message::Data { receiver, .. }) => receiver,
                _ => 0,
            };
            self.park(now, session, index, request);
        }
    }

    /// The binary's `Senders::send` for ICMP paths.
    fn send(&mut self, now: Instant, path: IcmpPath, msg: &[u8]) {
        match path.session {
            Some(session) => self.downstream(now, session, msg),
            None => self.lost_no_session.push(now),
        }
    }

    fn downstream(&mut self, now: Instant, session: SessionId, msg: &[u8]) {
        if let Some(Reply {
            request,
            message: Some(m),
            ..
        }) = self.parking.downstream(session, msg)
        {
            let m = m.to_vec();
            self.answer(now, request, &m, Answer::Message);
        }
    }

    /// The binary's `Listeners::park`: requests held under older keys are
    /// answered at once with keepalives when a new receiver index shows up.
    fn park(&mut self, now: Instant, session: SessionId, index: u32, request: Request) {
        if self
            .indices
            .insert(session, index)
            .is_some_and(|old| old != index)
        {
            while let Some(stale) = self.parking.take_parked(session) {
                self.keepalive_as(now, session, stale, Answer::Superseded);
            }
        }
        let released = self
            .parking
            .request(session, request, now)
            .map(|r| (r.request, r.message.map(<[u8]>::to_vec)));
        match released {
            Some((request, Some(m))) => self.answer(now, request, &m, Answer::Message),
            // Too many held: the binary lets the oldest go unanswered.
            Some((request, None)) => {
                self.open.remove(&request);
                self.overflowed += 1;
            }
            None => {}
        }
    }

    fn keepalive(&mut self, now: Instant, session: SessionId, request: Request) {
        self.keepalive_as(now, session, request, Answer::Keepalive);
    }

    fn keepalive_as(&mut self, now: Instant, session: SessionId, request: Request, kind: Answer) {
        let mut ka = [0u8; 64];
        let (msg, how) = match self.engine.seal_keepalive(now, session, &mut ka) {
            Ok(ServerOutput::Send(_, m)) => (m.to_vec(), kind),
            _ => (Vec::new(), Answer::Bare),
        };
        self.answer(now, request, &msg, how);
    }

    fn answer(&mut self, now: Instant, request: Request, msg: &[u8], how: Answer) {
        self.reply(now, request, msg, true, how);
    }

    fn reply(&mut self, now: Instant, request: Request, body: &[u8], magic: bool, how: Answer) {
        match self.open.remove(&request) {
            Some(arrived) => self.answered.push(Answered {
                request,
                arrived,
                answered: now,
                how,
            }),
            None => self
                .violations
                .push(format!("{how:?} answers {request:?}, which is not open")),
        }
        self.outbox.push(Packet {
            src: SERVER_IP,
            dst: request.ip,
            icmp: echo(true, request.id, request.seq, body, magic),
        });
    }

    /// The server's TUN device gives it `packet` (the binary's `from_tun`).
    fn tun_packet(&mut self, now: Instant, packet: &[u8]) -> Result<(), DropReason> {
        match self.engine.handle_tun_packet(now, packet, &mut self.buf)? {
            ServerOutput::Send(path, m) => {
                let m = m.to_vec();
                self.send(now, path, &m);
                Ok(())
            }
            other => panic!("handle_tun_packet returned {other:?}"),
        }
    }

    /// The binary's one-second tick.
    fn tick(&mut self, now: Instant) {
        self.engine.poll_timers(now);
        while let Some((session, request)) = self.parking.expired(now) {
            self.keepalive(now, session, request);
        }
    }

    pub fn session(&self, key: &PublicKey) -> Option<SessionInfo<IcmpPath>> {
        self.engine.sessions().into_iter().find(|s| s.key == *key)
    }

    /// Drops the engine counted, attributed to a client or not.
    pub fn drop_total(&self) -> u64 {
        self.engine.drops().total()
            + self
                .engine
                .sessions()
                .iter()
                .map(|s| s.drops.total())
                .sum::<u64>()
    }
}

// ---------------------------------------------------------------------------
// The client's driver
// ---------------------------------------------------------------------------

/// One reply the client took (it passed the `ours` check and the engine).
#[derive(Clone, Copy, Debug)]
pub struct Taken {
    pub at: Instant,
    pub carried_data: bool,
    /// The pacer's target after `replied`.
    pub target: usize,
}

pub struct IcmpClient {
    pub engine: Client,
    pub key: PublicKey,
    /// Its address behind the NAT.
    pub lan_ip: Ipv4Addr,
    /// Its echo identifier (the NAT rewrites it on the way out).
    pub id: u16,
    pub seq: u16,
    pub pacer: Pacer,
    /// Inner packets written to its TUN device, with their times.
    pub tun: Vec<(Instant, Vec<u8>)>,
    pub events: Vec<(Instant, ClientEvent)>,
    /// Errors `handle_datagram` returned for replies carrying a message.
    pub errors: Vec<DropReason>,
    /// Replies carrying no message (the server had no session).
    pub bare_replies: u64,
    /// Echo messages that failed the `ours` check or did not parse.
    pub not_ours: u64,
    /// Echo replies without a tunnel message (answers to ordinary pings):
    /// id, sequence, payload.
    pub pings: Vec<(u16, u16, Vec<u8>)>,
    /// Requests sent: time, sequence number, tunnel message type, whether
    /// it was a bare poll from `top_up`.
    pub requests: Vec<(Instant, u16, u8, bool)>,
    pub inits: Vec<Instant>,
    pub taken: Vec<Taken>,
    /// Outstanding requests the pacer gave up on (lost, or answered late).
    pub forgotten: usize,
    /// `top_up` calls that left fewer requests outstanding than the target.
    pub short: u64,
    /// The pacer's target after every `top_up`.
    pub targets: Vec<(Instant, usize)>,
    /// Replies taken since the last `top_up` (the binary tops up after a batch).
    fresh: bool,
    outbox: Vec<Packet>,
    buf: Box<[u8]>,
    rx: Box<[u8]>,
}

impl IcmpClient {
    /// When the binary's client loop wakes for timers.
    pub fn deadline(&self) -> Option<Instant> {
        [self.engine.next_timeout(), self.pacer.next_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    /// The binary's `IcmpUplink::request`.
    fn request(&mut self, now: Instant, msg: &[u8], poll: bool) {
        self.outbox.push(Packet {
            src: self.lan_ip,
            dst: SERVER_IP,
            icmp: echo(false, self.id, self.seq, msg, true),
        });
        self.requests
            .push((now, self.seq, msg.first().copied().unwrap_or(0), poll));
        if msg.first() == Some(&TYPE_INIT) {
            self.inits.push(now);
        }
        self.seq = self.seq.wrapping_add(1);
        self.pacer.sent(now);
    }

    /// The TUN device gives the client `packet` (the binary's `from_tun`).
    fn tun_packet(&mut self, now: Instant, packet: &[u8]) -> Result<(), DropReason> {
        let n = self.engine.handle_tun_packet(now, packet, &mut self.buf)?;
        let msg = self.buf[..n].to_vec();
        self.request(now, &msg, false);
        Ok(())
    }

    /// The binary's timer branch: every message the engine's timers want,
    /// then `top_up`.
    fn timers(&mut self, now: Instant) {
        for _ in 0..16 {
            let Some(n) = self.engine.poll_timers(now, &mut self.buf) else {
                self.top_up(now);
                return;
            };
            let msg = self.buf[..n].to_vec();
            self.request(now, &msg, false);
        }
        panic!("poll_timers keeps sending");
    }

    /// The binary's `Uplink::top_up`. As there, the pacer forgets lost
    /// requests only once connected, so without a session its deadline can
    /// stay in the past (`Sim::step` asserts it does not; see the ignored
    /// test `client_waiting_for_an_unreachable_server_does_not_spin`).
    fn top_up(&mut self, now: Instant) {
        self.fresh = false;
        let before = self.pacer.outstanding();
        let due = self.pacer.polls_due(now);
        self.forgotten += before - self.pacer.outstanding();
        if !self.engine.is_connected(now) {
            return; // until the handshake completes, inits are the requests
        }
        for _ in 0..due {
            if let Ok(n) = self.engine.seal_keepalive(now, &mut self.buf) {
                let msg = self.buf[..n].to_vec();
                self.request(now, &msg, true);
            }
        }
        if self.pacer.outstanding() < self.pacer.target() {
            self.short += 1;
        }
        self.targets.push((now, self.pacer.target()));
    }

    /// An ICMP message from `src` (the binary's `IcmpUplink::receive`, one
    /// message of the batch).
    fn receive(&mut self, now: Instant, src: Ipv4Addr, bytes: &[u8]) {
        let Ok(e) = Echo::parse(FAMILY, bytes) else {
            self.not_ours += 1;
            return;
        };
        let ours = src == SERVER_IP && e.reply && e.id == self.id;
        let Some(msg) = e.tunnel_message().filter(|_| ours) else {
            if e.reply && e.tunnel_message().is_none() {
                self.pings.push((e.id, e.seq, e.payload.to_vec()));
            }
            self.not_ours += 1;
            return;
        };
        let result = match self.engine.handle_datagram(now, msg, &mut self.rx) {
            Ok(ClientOutput::Tun(p)) => Ok((Some(p.to_vec()), None)),
            Ok(ClientOutput::Send(m)) => Ok((None, Some(m.to_vec()))),
            Ok(ClientOutput::Nothing) => Ok((None, None)),
            Err(e) => Err(e),
        };
        let carried_data = match result {
            Ok((Some(packet), _)) => {
                self.tun.push((now, packet));
                true
            }
            Ok((None, Some(reply))) => {
                self.request(now, &reply, false);
                false
            }
            Ok((None, None)) => false,
            Err(_) if msg.is_empty() => {
                self.bare_replies += 1;
                false
            }
            Err(e) => {
                self.errors.push(e);
                return; // forged or stale: not an answer
            }
        };
        self.pacer.replied(carried_data);
        self.taken.push(Taken {
            at: now,
            carried_data,
            target: self.pacer.target(),
        });
        self.fresh = true;
        while let Some(e) = self.engine.poll_event() {
            self.events.push((now, e));
        }
    }

    /// The configuration of the latest `Configured` event.
    pub fn v4(&self) -> Ipv4Addr {
        match self.events.last() {
            Some((_, ClientEvent::Configured(c))) => c.client_v4,
            None => panic!("not configured"),
        }
    }

    /// Times at which it opened a message from the server (data or keepalive).
    pub fn rx_times(&self) -> impl Iterator<Item = Instant> + '_ {
        self.taken.iter().map(|t| t.at)
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
        }
    }

    /// A packet from the LAN to the internet: rewrite an echo request.
    fn outbound(&mut self, now: Instant, p: Packet) -> Option<Packet> {
        self.conns
            .retain(|_, c| now.saturating_duration_since(c.at) < CONNTRACK_TIMEOUT);
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
                    .find(|&id| !self.conns.contains_key(&(ip, id, e.seq)));
                let Some(id) = free else {
                    return None; // no mapping free: the NAT drops it
                };
                self.next_id = (id - FIRST_PUBLIC_ID + 1) % SHARED_IDS;
                id
            }
        };
        if self
            .conns
            .iter()
            .any(|(&(cip, cid, _), c)| (cip, cid) == (ip, public) && c.lan != p.src)
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
        assert!(old.is_none(), "the NAT reused a live mapping");
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
    up: bool,
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

pub struct IcmpSim {
    pub start: Instant,
    pub now: Instant,
    pub link: Link,
    pub rng: Rng,
    pub server: IcmpServer,
    pub nat: Nat,
    pub clients: Vec<IcmpClient>,
    pub wire: Vec<Wire>,
    in_flight: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
    next_tick: Instant,
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
            rng: Rng::new(seed),
            server: IcmpServer::new(config, start),
            nat: Nat::new(mode),
            clients: Vec::new(),
            wire: Vec::new(),
            in_flight: BinaryHeap::new(),
            seq: 0,
            next_tick: start + SERVER_TICK,
        }
    }

    /// Add a client behind the NAT at 192.168.1.(10 + i), using echo id
    /// `id`; it starts its handshake at once. Returns its index.
    pub fn add_client(&mut self, key: PrivateKey, id: u16) -> usize {
        let i = self.clients.len();
        let config = ClientConfig::new(key, server_key().public_key());
        let unix = UNIX_START + self.elapsed().as_nanos() as u64;
        self.clients.push(IcmpClient {
            key: config.private_key.public_key(),
            engine: Client::new(config, self.now, unix),
            lan_ip: Ipv4Addr::new(192, 168, 1, 10 + i as u8),
            id,
            seq: 0,
            pacer: Pacer::new(MIN_OUTSTANDING, MAX_OUTSTANDING, REQUEST_TIMEOUT),
            tun: Vec::new(),
            events: Vec::new(),
            errors: Vec::new(),
            bare_replies: 0,
            not_ours: 0,
            pings: Vec::new(),
            requests: Vec::new(),
            inits: Vec::new(),
            taken: Vec::new(),
            forgotten: 0,
            short: 0,
            targets: Vec::new(),
            fresh: false,
            outbox: Vec::new(),
            buf: vec![0; BUF].into_boxed_slice(),
            rx: vec![0; BUF].into_boxed_slice(),
        });
        i
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn next_event(&self) -> Instant {
        let mut t = self.next_tick;
        if let Some(Reverse(f)) = self.in_flight.peek() {
            t = t.min(f.at);
        }
        for c in &self.clients {
            if let Some(d) = c.deadline() {
                t = t.min(d);
            }
        }
        t.max(self.now)
    }

    /// Run everything due up to `deadline` and leave the clock there.
    pub fn run_until(&mut self, deadline: Instant) {
        loop {
            let t = self.next_event();
            if t > deadline {
                break;
            }
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
            let t = self.next_event();
            if t > deadline {
                self.now = deadline;
                return false;
            }
            self.now = t;
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
            self.clients[i].engine.drops(),
            self.server.errors
        );
    }

    /// Client `i` has keys and the server sends with them.
    pub fn connected(&self, i: usize) -> bool {
        let c = &self.clients[i];
        c.engine.is_connected(self.now)
            && self
                .server
                .session(&c.key)
                .is_some_and(|s| s.path.is_some_and(|p| p.session.is_some()))
    }

    fn step(&mut self) {
        let now = self.now;
        if self.next_tick <= now {
            self.server.tick(now);
            self.next_tick = now + SERVER_TICK;
            self.flush_server();
        }
        while self.in_flight.peek().is_some_and(|Reverse(f)| f.at <= now) {
            let Reverse(f) = self.in_flight.pop().unwrap();
            if f.up {
                self.server.receive(now, f.packet.src, &f.packet.icmp);
                self.flush_server();
            } else if let Some(p) = self.nat.inbound(now, f.packet) {
                let i = self
                    .clients
                    .iter()
                    .position(|c| c.lan_ip == p.dst)
                    .expect("the NAT only restores to its clients");
                self.clients[i].receive(now, p.src, &p.icmp);
                self.flush_client(i);
            }
        }
        for i in 0..self.clients.len() {
            if self.clients[i].fresh {
                self.clients[i].top_up(now);
                self.flush_client(i);
            }
            if self.clients[i].deadline().is_some_and(|d| d <= now) {
                self.clients[i].timers(now);
                self.flush_client(i);
                let d = self.clients[i].deadline();
                assert!(
                    d.is_none_or(|d| d > now),
                    "client {i}'s driver would spin: its deadline stays at {:?} (pacer {:?})",
                    d.map(|d| d - self.start),
                    self.clients[i].pacer
                );
            }
        }
    }

    fn flush_server(&mut self) {
        for p in std::mem::take(&mut self.server.outbox) {
            self.transmit(false, p);
        }
    }

    fn flush_client(&mut self, i: usize) {
        for p in std::mem::take(&mut self.clients[i].outbox) {
            if let Some(p) = self.nat.outbound(self.now, p) {
                self.transmit(true, p);
            }
        }
    }

    /// Put a packet on the link between the NAT and the server.
    fn transmit(&mut self, up: bool, packet: Packet) {
        let e = Echo::parse(FAMILY, &packet.icmp).expect("valid echo");
        let lost = self.rng.chance(self.link.loss);
        self.wire.push(Wire {
            at: self.now,
            up,
            src: packet.src,
            dst: packet.dst,
            id: e.id,
            seq: e.seq,
            msg: e.tunnel_message().map(<[u8]>::to_vec),
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
            up,
            packet,
        }));
    }

    /// Client `i`'s TUN device gives it `packet`.
    pub fn client_send(&mut self, i: usize, packet: &[u8]) -> Result<(), DropReason> {
        let r = self.clients[i].tun_packet(self.now, packet);
        self.flush_client(i);
        r
    }

    /// The server's TUN device gives it `packet`.
    pub fn server_send(&mut self, packet: &[u8]) -> Result<(), DropReason> {
        let r = self.server.tun_packet(self.now, packet);
        self.flush_server();
        r
    }

    /// An ordinary ping from client `i`'s host (no magic), through the NAT.
    pub fn ping(&mut self, i: usize, id: u16, seq: u16, payload: &[u8]) {
        let c = &mut self.clients[i];
        c.outbox.push(Packet {
            src: c.lan_ip,
            dst: SERVER_IP,
            icmp: echo(false, id, seq, payload, false),
        });
        self.flush_client(i);
    }
}

//! A simulated DNS path for the DNS transport: the shipped client
//! [`Connection`] with one DNS path, a simulated recursive resolver, and the
//! shipped server [`Endpoint`] with one DNS listener. The drivers do what a
//! real one does and nothing more: datagrams to `handle_input`, packets from
//! a TUN device to `handle_tun_packet`, `handle_timeout` when `poll_timeout`
//! passes (no ticker; a timeout that stays in the past once handled fails
//! the sim: a real driver would spin), `poll_transmit` drained after every
//! input and timeout. Virtual time, seeded randomness: deterministic.
//!
//! The resolver can randomise case (0x20), cache (respecting TTL 0 or not),
//! limit answer sizes (512 without EDNS0, or an EDNS0 size), cap name
//! lengths with FORMERR or SERVFAIL, drop and duplicate queries, retry on
//! its own, send from several source addresses, and fail outright for a
//! while, refuse or strip chosen record types (or let only some through),
//! and shuffle the records of answers. It checks the server on every
//! answer: question echoed with the case it was asked in, size within what
//! it advertised. The server's side of the network notes every query that
//! arrives and the answer that leaves for it, so holds and answers are
//! checked from the outside.

#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, OpCode, Query as Question, ResponseCode};
use hickory_proto::rr::RecordType;
use iptun_proto::DropReason;
use iptun_proto::connection::{Connection, Event, PathConfig, PathDetail, Remote};
use iptun_proto::endpoint::{Destination, Endpoint, Input, ListenerConfig, UdpAddr};
use iptun_proto::engine::ServerConfig;
use iptun_proto::transport::PacketList;
use iptun_proto::transport::dns::client::{PathInfo, UplinkStats};
use iptun_proto::wire::dns::{
    AnswerType, Domain, Name, Query, build_query_as, parse_query, response_limit,
};

use crate::common::{
    FullTun, Rng, UNIX_START, assert_not_due, client_config, counted_all, init_index, last_heard,
};

pub const DOMAIN: &str = "t.example.com";
pub const CLIENT_LATENCY: Duration = Duration::from_millis(5);
pub const SERVER_LATENCY: Duration = Duration::from_millis(20);
/// The resolver the client asks.
pub const RESOLVER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 0, 0, 53)), 53);
/// The server's address, where the resolver sends its queries.
pub const SERVER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(192, 0, 2, 53)), 53);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cache {
    Off,
    /// Caches only what has a TTL above zero (nothing we send).
    RespectTtl,
    /// Caches every NOERROR answer for a minute.
    IgnoreTtl,
}

/// What the resolver does with queries of a record type it filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Block {
    /// Answer with this code at once, never asking the server.
    Code(ResponseCode),
    /// Ask the server, but pass NOERROR without its records (NODATA).
    Strip,
    /// Never answer.
    Drop,
}

#[derive(Clone, Debug)]
pub struct ResolverConfig {
    /// Record types the resolver filters, and how.
    pub blocked: Vec<(RecordType, Block)>,
    /// Only these record types pass (the rest get `blocked_others`).
    pub only: Option<Vec<RecordType>>,
    pub blocked_others: Block,
    /// Shuffle the order of the records in every answer.
    pub shuffle: bool,
    pub randomize_case: bool,
    /// Replace label bytes >= 0x80 with `?` on the way to the server (a
    /// resolver or middlebox that is not 8-bit clean).
    pub mangle_8bit: bool,
    pub cache: Cache,
    /// EDNS0 size the resolver advertises to the server (`None`: no EDNS0).
    pub upstream_edns: Option<u16>,
    /// The most the resolver passes to the client regardless of the
    /// client's EDNS0 (a path that only carries 512 bytes): bigger answers
    /// are truncated (TC).
    pub client_limit: Option<usize>,
    /// Names longer than this (characters, no trailing dot) get this code.
    pub name_cap: Option<(usize, ResponseCode)>,
    pub drop_query: f64,
    pub drop_answer: f64,
    pub duplicate: f64,
    /// Ask the server again (new id, maybe another source) after this.
    pub retry_after: Option<Duration>,
    /// SERVFAIL to the client after this.
    pub give_up_after: Duration,
    pub sources: usize,
    /// Answer everything SERVFAIL until then (an outage).
    pub down_until: Option<Instant>,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        Self {
            blocked: Vec::new(),
            only: None,
            blocked_others: Block::Code(ResponseCode::Refused),
            shuffle: false,
            randomize_case: true,
            mangle_8bit: false,
            cache: Cache::RespectTtl,
            upstream_edns: Some(1232),
            client_limit: None,
            name_cap: None,
            drop_query: 0.0,
            drop_answer: 0.0,
            duplicate: 0.0,
            retry_after: None,
            give_up_after: Duration::from_secs(4),
            sources: 1,
            down_until: None,
        }
    }
}

struct Pending {
    client_id: u16,
    /// The question name as the client wrote it, on the wire.
    client_name: Vec<u8>,
    client_edns: Option<u16>,
    qtype: RecordType,
    strip: bool,
    name: Name,
    cache_key: String,
    done: bool,
    tries: u32,
}

#[derive(Default, Debug)]
pub struct ResolverStats {
    pub client_queries: u64,
    pub upstream_queries: u64,
    pub cache_hits: u64,
    pub truncated: u64,
    pub capped: u64,
    pub gave_up: u64,
    pub late_answers: u64,
    pub outage_servfails: u64,
    /// Queries of a filtered record type.
    pub blocked: u64,
    pub shuffled: u64,
}

impl ResolverConfig {
    /// How the resolver filters queries of type `qtype`, if it does.
    pub fn block(&self, qtype: RecordType) -> Option<Block> {
        if let Some(&(_, b)) = self.blocked.iter().find(|(t, _)| *t == qtype) {
            return Some(b);
        }
        self.only
            .as_ref()
            .filter(|only| !only.contains(&qtype))
            .map(|_| self.blocked_others)
    }
}

pub struct Resolver {
    pub cfg: ResolverConfig,
    rng: Rng,
    pending: HashMap<u64, Pending>,
    upstream: HashMap<(SocketAddr, u16), u64>,
    next_pid: u64,
    cache: HashMap<String, (Vec<u8>, Instant)>,
    pub stats: ResolverStats,
    /// What went wrong at the server: wrong case, too big, unknown query.
    pub violations: Vec<String>,
    /// Sizes of answers passed to the client, with the client's limit.
    pub answer_sizes: Vec<(usize, usize)>,
}

enum Ev {
    ToResolver(Vec<u8>),
    ToServer(SocketAddr, Vec<u8>),
    FromServer(SocketAddr, Vec<u8>),
    ToClient(Vec<u8>),
    Retry(u64),
    GiveUp(u64),
}

/// A query that reached the server.
#[derive(Debug)]
pub struct Arrival {
    pub at: Instant,
    /// Its question name, lower case: a resolver's retry asks the same.
    pub name: String,
    pub answered: Option<Instant>,
}

pub struct Sim {
    pub start: Instant,
    pub now: Instant,
    seq: u64,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    events: HashMap<u64, Ev>,
    pub resolver: Resolver,
    // client
    pub client: Connection,
    pub client_tun: Vec<(Instant, Vec<u8>)>,
    pub client_events: Vec<(Instant, Event)>,
    pub client_errors: Vec<DropReason>,
    /// When the client's engine started each handshake (its init's sender
    /// index changed).
    pub inits: Vec<Instant>,
    last_init: Option<u32>,
    // server
    pub server: Endpoint,
    pub server_tun: Vec<(Instant, Vec<u8>)>,
    /// The server's TUN batch is full: it takes no packet.
    pub server_tun_full: bool,
    pub server_errors: Vec<DropReason>,
    /// Queries that reached the server, by (source, id): arrival and answer.
    pub arrivals: HashMap<(SocketAddr, u16), Vec<Arrival>>,
    /// Answers that left the server for no query open.
    pub server_violations: Vec<String>,
    buf: Vec<u8>,
}

impl Sim {
    pub fn new(
        server: ServerConfig,
        client_key: iptun_proto::crypto::PrivateKey,
        cfg: ResolverConfig,
        seed: u64,
    ) -> Self {
        let now = Instant::now();
        let domain = Domain::new(DOMAIN).unwrap();
        let mut rng = Rng::new(seed);
        let path = PathConfig::Dns {
            domain: domain.clone(),
            resolvers: 1,
            tag: rng.next_u64() as u32,
            seed: rng.next_u64(),
        };
        let mut sim = Self {
            start: now,
            now,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            resolver: Resolver {
                cfg,
                rng: Rng::new(seed ^ 0x5eed),
                pending: HashMap::new(),
                upstream: HashMap::new(),
                next_pid: 0,
                cache: HashMap::new(),
                stats: ResolverStats::default(),
                violations: Vec::new(),
                answer_sizes: Vec::new(),
            },
            client: Connection::new(client_config(client_key), vec![path], now, UNIX_START),
            client_tun: Vec::new(),
            client_events: Vec::new(),
            client_errors: Vec::new(),
            inits: Vec::new(),
            last_init: None,
            server: Endpoint::new(server, vec![ListenerConfig::Dns(domain)], now),
            server_tun: Vec::new(),
            server_tun_full: false,
            server_errors: Vec::new(),
            arrivals: HashMap::new(),
            server_violations: Vec::new(),
            buf: Vec::new(),
        };
        sim.flush_client();
        sim
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    fn schedule(&mut self, at: Instant, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.events.insert(self.seq, ev);
    }

    fn deadline(&self) -> Option<Instant> {
        let t = [
            self.queue.peek().map(|Reverse((t, _))| *t),
            self.client.poll_timeout(),
            self.server.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()?;
        Some(t.max(self.now))
    }

    pub fn run_until(&mut self, until: Instant) {
        while let Some(t) = self.deadline().filter(|&t| t <= until) {
            self.now = t;
            self.step();
        }
        self.now = until;
    }

    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    /// Run until `done`, at most `limit`; whether it came true.
    pub fn run_until_cond(&mut self, limit: Duration, mut done: impl FnMut(&Self) -> bool) -> bool {
        let until = self.now + limit;
        while !done(self) {
            match self.deadline().filter(|&t| t <= until) {
                Some(t) => self.now = t,
                None => {
                    self.now = until;
                    return false;
                }
            }
            self.step();
        }
        true
    }

    /// Everything due now: the network's events, then the timeouts.
    fn step(&mut self) {
        let now = self.now;
        while let Some(&Reverse((t, id))) = self.queue.peek() {
            if t > now {
                break;
            }
            self.queue.pop();
            let ev = self.events.remove(&id).expect("scheduled");
            self.handle(ev);
        }
        if self.server.poll_timeout().is_some_and(|t| t <= now) {
            self.server.handle_timeout(now);
            self.flush_server();
            assert_not_due("the server", self.server.poll_timeout(), now, self.start);
        }
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.handle_timeout(now);
            self.flush_client();
            assert_not_due("the client", self.client.poll_timeout(), now, self.start);
        }
    }

    fn handle(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::ToResolver(bytes) => self.resolver_query(&bytes),
            Ev::ToServer(from, bytes) => self.server_query(from, &bytes),
            Ev::FromServer(to, bytes) => self.resolver_answer(to, &bytes),
            Ev::ToClient(bytes) => self.client_response(&bytes),
            Ev::Retry(pid) => {
                if self.resolver.pending.get(&pid).is_some_and(|p| !p.done) {
                    self.forward(pid);
                }
            }
            Ev::GiveUp(pid) => {
                let Some(p) = self.resolver.pending.get_mut(&pid) else {
                    return;
                };
                if !p.done {
                    p.done = true;
                    self.resolver.stats.gave_up += 1;
                    let (id, name, qtype) = (p.client_id, p.client_name.clone(), p.qtype);
                    let bytes = error_response(id, &name, qtype, ResponseCode::ServFail);
                    self.schedule(now + CLIENT_LATENCY, Ev::ToClient(bytes));
                }
            }
        }
    }

    // --- the client's driver -------------------------------------------

    /// Send the queries the connection has, to the resolver; note a new
    /// handshake and take the events.
    fn flush_client(&mut self) {
        let now = self.now;
        while let Some(t) = self.client.poll_transmit(now, &mut self.buf) {
            assert_eq!(
                (t.path, t.to),
                (0, Remote::Resolver(0)),
                "queries go to the resolver"
            );
            let q = self.buf[..t.len].to_vec();
            self.schedule(now + CLIENT_LATENCY, Ev::ToResolver(q));
        }
        let init = self.client.engine().pending_init().map(init_index);
        if init.is_some() && init != self.last_init {
            self.inits.push(now);
            self.last_init = init;
        }
        while let Some(e) = self.client.poll_event() {
            self.client_events.push((now, e));
        }
    }

    /// The resolver's answer reaches the client.
    fn client_response(&mut self, bytes: &[u8]) {
        let now = self.now;
        let before = self.client.drops();
        let mut tun = PacketList::default();
        self.client
            .handle_input(now, 0, Remote::Resolver(0), bytes, &mut tun);
        self.client_errors
            .extend(counted_all(&before, &self.client.drops()));
        self.client_tun
            .extend(tun.packets.into_iter().map(|p| (now, p)));
        self.flush_client();
    }

    /// An inner packet from the client's TUN device: queued for the
    /// connection's queries, or dropped and counted.
    pub fn client_send(&mut self, packet: &[u8]) -> Result<(), DropReason> {
        let before = self.client.drops();
        let mut buf = vec![0; iptun_proto::connection::BUF_LEN];
        let sent = self.client.handle_tun_packet(self.now, packet, &mut buf);
        assert!(
            sent.is_none(),
            "DNS queues messages: queries come from poll_transmit"
        );
        let dropped = counted_all(&before, &self.client.drops());
        self.flush_client();
        dropped.first().map_or(Ok(()), |&e| Err(e))
    }

    /// The client has keys and has heard from the server since its latest
    /// handshake: the server only sends (keepalives on held queries) with
    /// keys the client confirmed, so both ends can send.
    pub fn connected(&self) -> bool {
        let handshake = self.client.engine().last_handshake();
        let heard = last_heard(&self.client, 0, self.now);
        self.client.is_connected(self.now)
            && matches!((heard, handshake), (Some(rx), Some(hs)) if rx > hs)
    }

    pub fn client_v4(&self) -> Ipv4Addr {
        self.client.engine().tunnel().expect("configured").client_v4
    }

    /// The DNS path's parameters and counters, as the status shows them.
    pub fn path_info(&self) -> PathInfo {
        match &self.client.status(self.now).paths[0].detail {
            PathDetail::Dns { info, .. } => (**info).clone(),
            other => panic!("a DNS path shows {other:?}"),
        }
    }

    pub fn uplink_stats(&self) -> UplinkStats {
        self.path_info().stats
    }

    // --- the server's driver -------------------------------------------

    /// A query from the resolver at `from` reaches the server.
    fn server_query(&mut self, from: SocketAddr, bytes: &[u8]) {
        let now = self.now;
        if let Ok(q) = parse_query(bytes) {
            let name = q.name.to_lowercase().to_ascii();
            self.arrivals
                .entry((from, q.id))
                .or_default()
                .push(Arrival {
                    at: now,
                    name,
                    answered: None,
                });
        }
        let before = self.server.drops();
        let mut tun = PacketList::default();
        let from = UdpAddr {
            addr: from,
            local: Some(SERVER.ip()),
        };
        let input = Input::Datagram { from, bytes };
        if self.server_tun_full {
            self.server.handle_input(now, 0, input, &mut FullTun);
        } else {
            self.server.handle_input(now, 0, input, &mut tun);
        }
        self.server_errors
            .extend(counted_all(&before, &self.server.drops()));
        self.server_tun
            .extend(tun.packets.into_iter().map(|p| (now, p)));
        self.flush_server();
    }

    /// Send the answers the endpoint has, noting which query each answers.
    fn flush_server(&mut self) {
        let now = self.now;
        while let Some(t) = self.server.poll_transmit(now, &mut self.buf) {
            let Destination::Udp(to) = t.to else {
                panic!("a DNS listener sent {:?}", t.to)
            };
            assert_eq!(
                to.local,
                Some(SERVER.ip()),
                "answers leave from the address asked"
            );
            let bytes = self.buf[..t.len].to_vec();
            let id = u16::from_be_bytes([bytes[0], bytes[1]]);
            match self
                .arrivals
                .get_mut(&(to.addr, id))
                .and_then(|v| v.iter_mut().find(|a| a.answered.is_none()))
            {
                Some(a) => a.answered = Some(now),
                None => self.server_violations.push(format!(
                    "answer to {:?} id {id}, which is not open",
                    to.addr
                )),
            }
            self.schedule(now + SERVER_LATENCY, Ev::FromServer(to.addr, bytes));
        }
    }

    /// An inner packet from the server's TUN device: queued for the
    /// client's queries, or dropped and counted.
    pub fn server_send(&mut self, packet: &[u8]) -> Result<(), DropReason> {
        let before = self.server.drops();
        let mut buf = vec![0; iptun_proto::endpoint::BUF_LEN];
        let sent = self.server.handle_tun_packet(self.now, packet, &mut buf);
        assert!(
            sent.is_none(),
            "DNS queues messages: answers come from poll_transmit"
        );
        let dropped = counted_all(&before, &self.server.drops());
        self.flush_server();
        dropped.first().map_or(Ok(()), |&e| Err(e))
    }

    // --- the resolver --------------------------------------------------

    fn resolver_query(&mut self, bytes: &[u8]) {
        let now = self.now;
        let r = &mut self.resolver;
        r.stats.client_queries += 1;
        let Ok(q) = parse_query(bytes) else { return };
        if r.rng.chance(r.cfg.drop_query) {
            return;
        }
        let client_name = bytes[12..12 + q.name_wire_len()].to_vec();
        if r.cfg.down_until.is_some_and(|t| now < t) {
            r.stats.outage_servfails += 1;
            let b = error_response(q.id, &client_name, q.qtype, ResponseCode::ServFail);
            self.schedule(now + CLIENT_LATENCY, Ev::ToClient(b));
            return;
        }
        if let Some((cap, code)) = r.cfg.name_cap
            && q.name_wire_len() - 2 > cap
        {
            r.stats.capped += 1;
            let b = error_response(q.id, &client_name, q.qtype, code);
            self.schedule(now + CLIENT_LATENCY, Ev::ToClient(b));
            return;
        }
        let block = r.cfg.block(q.qtype);
        if block.is_some() {
            r.stats.blocked += 1;
        }
        match block {
            Some(Block::Code(code)) => {
                let b = error_response(q.id, &client_name, q.qtype, code);
                self.schedule(now + CLIENT_LATENCY, Ev::ToClient(b));
                return;
            }
            Some(Block::Drop) => return,
            Some(Block::Strip) | None => {}
        }
        let cache_key = format!("{}/{}", q.name.to_lowercase().to_ascii(), q.qtype);
        if let Some((answer, until)) = r.cache.get(&cache_key)
            && now < *until
        {
            r.stats.cache_hits += 1;
            let mut b = answer.clone();
            b[..2].copy_from_slice(&q.id.to_be_bytes());
            b[12..12 + client_name.len()].copy_from_slice(&client_name);
            self.schedule(now + CLIENT_LATENCY, Ev::ToClient(b));
            return;
        }
        let name = if r.cfg.randomize_case {
            randomize_case(&q.name, &mut r.rng)
        } else {
            q.name.clone()
        };
        let name = if r.cfg.mangle_8bit {
            mangle_8bit(&name)
        } else {
            name
        };
        let pid = r.next_pid;
        r.next_pid += 1;
        r.pending.insert(
            pid,
            Pending {
                client_id: q.id,
                client_name,
                client_edns: q.edns_size,
                qtype: q.qtype,
                strip: block == Some(Block::Strip),
                name,
                cache_key,
                done: false,
                tries: 0,
            },
        );
        self.forward(pid);
        if self.resolver.rng.chance(self.resolver.cfg.duplicate) {
            self.forward(pid);
        }
        let give_up = now + self.resolver.cfg.give_up_after;
        self.schedule(give_up, Ev::GiveUp(pid));
    }

    /// Send pending query `pid` to the server (again), from a random source.
    fn forward(&mut self, pid: u64) {
        let now = self.now;
        let r = &mut self.resolver;
        let p = r.pending.get_mut(&pid).expect("pending");
        p.tries += 1;
        let id = r.rng.next_u64() as u16;
        let src = SocketAddr::from((
            Ipv4Addr::new(198, 18, 0, 1 + r.rng.below(r.cfg.sources as u64) as u8),
            1024 + r.rng.below(60000) as u16,
        ));
        let ty = AnswerType::of(p.qtype).expect("the client asks for data types only");
        let bytes = build_query_as(id, &p.name, ty, r.cfg.upstream_edns).unwrap();
        r.upstream.insert((src, id), pid);
        r.stats.upstream_queries += 1;
        if let Some(after) = r.cfg.retry_after.filter(|_| p.tries < 3) {
            self.schedule(now + after, Ev::Retry(pid));
        }
        self.schedule(now + SERVER_LATENCY, Ev::ToServer(src, bytes));
    }

    fn resolver_answer(&mut self, to: SocketAddr, bytes: &[u8]) {
        let now = self.now;
        let r = &mut self.resolver;
        let id = u16::from_be_bytes([bytes[0], bytes[1]]);
        let Some(&pid) = r.upstream.get(&(to, id)) else {
            r.violations
                .push(format!("an answer to no query: {to:?} {id}"));
            return;
        };
        let advertised = response_limit(r.cfg.upstream_edns);
        if bytes.len() > advertised {
            r.violations.push(format!(
                "{} bytes against an advertised {advertised}",
                bytes.len()
            ));
        }
        let p = r.pending.get_mut(&pid).expect("pending");
        let msg = Message::from_vec(bytes).expect("the server's answer parses");
        if !msg
            .queries
            .first()
            .is_some_and(|q| q.name().eq_case(&p.name))
        {
            r.violations.push(format!(
                "question not echoed in its case: {:?}",
                msg.queries
            ));
        }
        if p.done {
            r.stats.late_answers += 1;
            return;
        }
        p.done = true;
        let mut b = bytes.to_vec();
        if p.strip || r.cfg.shuffle {
            let mut m = msg.clone();
            if p.strip {
                m.answers.clear();
            } else if m.answers.len() > 1 {
                r.stats.shuffled += 1;
                shuffle(&mut r.rng, &mut m.answers);
            }
            b = m.to_vec().unwrap();
        }
        b[..2].copy_from_slice(&p.client_id.to_be_bytes());
        b[12..12 + p.client_name.len()].copy_from_slice(&p.client_name);
        let mut limit = response_limit(p.client_edns);
        if let Some(l) = r.cfg.client_limit {
            limit = limit.min(l);
        }
        if msg.metadata.response_code == ResponseCode::NoError {
            let ttl = msg.answers.iter().map(|a| a.ttl).min().unwrap_or(0);
            let cache = match r.cfg.cache {
                Cache::Off => false,
                Cache::RespectTtl => ttl > 0,
                Cache::IgnoreTtl => true,
            };
            if cache {
                r.cache.insert(
                    p.cache_key.clone(),
                    (b.clone(), now + Duration::from_secs(60)),
                );
            }
        }
        if b.len() > limit {
            r.stats.truncated += 1;
            b = truncated_response(p.client_id, &p.client_name, p.qtype);
        }
        r.answer_sizes.push((b.len(), limit));
        if r.rng.chance(r.cfg.drop_answer) {
            return;
        }
        self.schedule(now + CLIENT_LATENCY, Ev::ToClient(b));
    }
}

/// Fisher-Yates.
fn shuffle<T>(rng: &mut Rng, v: &mut [T]) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
}

fn randomize_case(name: &Name, rng: &mut Rng) -> Name {
    let labels: Vec<Vec<u8>> = name
        .iter()
        .map(|l| {
            l.iter()
                .map(|&c| {
                    if c.is_ascii_alphabetic() && rng.chance(0.5) {
                        c ^ 0x20
                    } else {
                        c
                    }
                })
                .collect()
        })
        .collect();
    Name::from_labels(labels.iter().map(Vec::as_slice)).unwrap()
}

fn mangle_8bit(name: &Name) -> Name {
    let labels: Vec<Vec<u8>> = name
        .iter()
        .map(|l| {
            l.iter()
                .map(|&c| if c >= 0x80 { b'?' } else { c })
                .collect()
        })
        .collect();
    Name::from_labels(labels.iter().map(Vec::as_slice)).unwrap()
}

fn question_name(wire: &[u8]) -> Name {
    // Parse a wire-format name by wrapping it in a fake query.
    let mut q = vec![0u8, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(wire);
    q.extend_from_slice(&[0, 16, 0, 1]);
    parse_query(&q).unwrap().name
}

pub fn error_response(
    id: u16,
    client_name: &[u8],
    qtype: RecordType,
    code: ResponseCode,
) -> Vec<u8> {
    let mut m = Message::response(id, OpCode::Query);
    m.metadata.response_code = code;
    m.metadata.recursion_desired = true;
    m.metadata.recursion_available = true;
    m.add_query(Question::query(question_name(client_name), qtype));
    m.to_vec().unwrap()
}

fn truncated_response(id: u16, client_name: &[u8], qtype: RecordType) -> Vec<u8> {
    let mut m = Message::response(id, OpCode::Query);
    m.metadata.truncation = true;
    m.metadata.recursion_desired = true;
    m.metadata.recursion_available = true;
    m.add_query(Question::query(question_name(client_name), qtype));
    m.to_vec().unwrap()
}

/// A query as a resolver would forward it, for direct tests of the listener.
pub fn parsed(bytes: &[u8]) -> Query {
    parse_query(bytes).unwrap()
}

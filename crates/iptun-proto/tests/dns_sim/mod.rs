//! A simulated DNS path for the DNS transport's state machines: a real
//! client engine behind a `DnsUplink`, a simulated recursive resolver, and a
//! real server engine behind a `DnsListener`, the drivers written as the
//! binary will write them. Virtual time, seeded randomness: deterministic.
//!
//! The resolver can randomise case (0x20), cache (respecting TTL 0 or not),
//! limit answer sizes (512 without EDNS0, or an EDNS0 size), cap name
//! lengths with FORMERR or SERVFAIL, drop and duplicate queries, retry on
//! its own, send from several source addresses, and fail outright for a
//! while, refuse or strip chosen record types (or let only some through),
//! and shuffle the records of answers. It checks the server on every answer: question echoed with the
//! case it was asked in, size within what it advertised.

#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, OpCode, Query as Question, ResponseCode};
use hickory_proto::rr::RecordType;
use iptun_proto::DropReason;
use iptun_proto::dns::client::DnsUplink;
use iptun_proto::dns::server::DnsListener;
use iptun_proto::engine::{
    Client, ClientConfig, ClientEvent, ClientOutput, PathKind, Server, ServerConfig, ServerOutput,
    SessionId,
};
use iptun_proto::wire::dns::{
    AnswerType, Domain, Name, Query, build_query_as, parse_query, response_limit,
};

use crate::common::{BUF, Rng, UNIX_START, server_key};

pub const DOMAIN: &str = "t.example.com";
pub const CLIENT_LATENCY: Duration = Duration::from_millis(5);
pub const SERVER_LATENCY: Duration = Duration::from_millis(20);
pub const TICK: Duration = Duration::from_secs(1);

/// The server's path to a client, as the binary's `Path::Dns` will be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsPath {
    pub tag: u32,
    pub session: Option<SessionId>,
}

impl PathKind for DnsPath {
    fn is_polled(&self) -> bool {
        true
    }
}

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

#[derive(Debug)]
pub struct Arrival {
    pub at: Instant,
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
    pub client: Client,
    pub uplink: DnsUplink,
    pub client_tun: Vec<(Instant, Vec<u8>)>,
    pub client_events: Vec<(Instant, ClientEvent)>,
    pub client_errors: Vec<DropReason>,
    pub inits: Vec<Instant>,
    // server
    pub server: Server<DnsPath>,
    pub listener: DnsListener<SessionId, SocketAddr>,
    pub server_tun: Vec<(Instant, Vec<u8>)>,
    pub server_errors: Vec<DropReason>,
    /// Queries that reached the server, by (source, id): arrival and answer.
    pub arrivals: HashMap<(SocketAddr, u16), Vec<Arrival>>,
    pub server_violations: Vec<String>,
    next_tick: Instant,
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
        let tag = rng.next_u64() as u32;
        let config = ClientConfig::new(client_key, server_key().public_key());
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
            client: Client::new(config, now, UNIX_START),
            uplink: DnsUplink::new(domain.clone(), tag, rng.next_u64()),
            client_tun: Vec::new(),
            client_events: Vec::new(),
            client_errors: Vec::new(),
            inits: Vec::new(),
            server: Server::new(server, now),
            listener: DnsListener::new(domain),
            server_tun: Vec::new(),
            server_errors: Vec::new(),
            arrivals: HashMap::new(),
            server_violations: Vec::new(),
            next_tick: now + TICK,
            buf: vec![0; BUF],
        };
        sim.client_timers();
        sim.pump();
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

    fn deadline(&self) -> Instant {
        let mut t = self.next_tick;
        for d in [
            self.queue.peek().map(|Reverse((t, _))| *t),
            self.client.next_timeout(),
            self.uplink.next_timeout(),
            self.listener.next_timeout(),
        ]
        .into_iter()
        .flatten()
        {
            t = t.min(d);
        }
        t.max(self.now)
    }

    pub fn run_until(&mut self, until: Instant) {
        loop {
            let t = self.deadline();
            if t > until {
                self.now = until;
                return;
            }
            self.now = t;
            self.step();
        }
    }

    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    /// Run until `done`, at most `limit`; whether it came true.
    pub fn run_until_cond(&mut self, limit: Duration, mut done: impl FnMut(&Self) -> bool) -> bool {
        let until = self.now + limit;
        let mut steps = 0u64;
        while !done(self) {
            let t = self.deadline();
            if t > until {
                self.now = until;
                return false;
            }
            self.now = t;
            self.step();
            steps += 1;
            assert!(steps < 50_000_000, "the sim spins");
        }
        true
    }

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
        if self.next_tick <= now {
            self.next_tick = now + TICK;
            self.server.poll_timers(now);
        }
        if self.listener.next_timeout().is_some_and(|t| t <= now) {
            self.listener_timeout();
        }
        if self.client.next_timeout().is_some_and(|t| t <= now) {
            self.client_timers();
        }
        if self.uplink.next_timeout().is_some_and(|t| t <= now) {
            self.uplink.handle_timeout(now);
        }
        self.pump();
    }

    fn listener_timeout(&mut self) {
        let now = self.now;
        let server = &mut self.server;
        let buf = &mut self.buf;
        self.listener
            .handle_timeout(now, |s| match server.seal_keepalive(now, s, buf) {
                Ok(ServerOutput::Send(_, m)) => Some(m.to_vec()),
                _ => None,
            });
    }

    /// Send what the uplink and the listener have.
    fn pump(&mut self) {
        let now = self.now;
        while let Some(q) = self.uplink.poll_query(now) {
            self.schedule(now + CLIENT_LATENCY, Ev::ToResolver(q.bytes));
        }
        while let Some(t) = self.listener.poll_transmit() {
            let id = u16::from_be_bytes([t.bytes[0], t.bytes[1]]);
            match self
                .arrivals
                .get_mut(&(t.to, id))
                .and_then(|v| v.iter_mut().find(|a| a.answered.is_none()))
            {
                Some(a) => a.answered = Some(now),
                None => self
                    .server_violations
                    .push(format!("answer to {:?} id {id}, which is not open", t.to)),
            }
            self.schedule(now + SERVER_LATENCY, Ev::FromServer(t.to, t.bytes));
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

    fn client_timers(&mut self) {
        let now = self.now;
        for _ in 0..16 {
            let Some(n) = self.client.poll_timers(now, &mut self.buf) else {
                return;
            };
            if self.buf[0] == iptun_proto::wire::message::TYPE_INIT {
                self.inits.push(now);
            }
            self.uplink.send(now, &self.buf[..n]);
        }
        panic!("poll_timers keeps sending");
    }

    fn client_response(&mut self, bytes: &[u8]) {
        let now = self.now;
        let _ = self.uplink.handle_response(now, bytes);
        let mut rx = vec![0; BUF];
        while let Some(m) = self.uplink.poll_message() {
            match self.client.handle_datagram(now, &m, &mut rx) {
                Ok(ClientOutput::Tun(p)) => self.client_tun.push((now, p.to_vec())),
                Ok(ClientOutput::Send(m)) => {
                    let m = m.to_vec();
                    self.uplink.send(now, &m);
                }
                Ok(ClientOutput::Nothing) => {}
                Err(e) => self.client_errors.push(e),
            }
            while let Some(e) = self.client.poll_event() {
                self.client_events.push((now, e));
            }
        }
    }

    /// An inner packet from the client's TUN device.
    pub fn client_send(&mut self, packet: &[u8]) -> Result<(), DropReason> {
        let now = self.now;
        let n = self.client.handle_tun_packet(now, packet, &mut self.buf)?;
        self.uplink.send(now, &self.buf[..n]);
        self.pump();
        Ok(())
    }

    pub fn connected(&self) -> bool {
        self.client.is_connected(self.now)
            && self
                .server
                .sessions()
                .iter()
                .any(|s| s.path.is_some_and(|p| p.session.is_some()))
    }

    pub fn client_v4(&self) -> Ipv4Addr {
        self.client.tunnel().expect("configured").client_v4
    }

    // --- the server's driver -------------------------------------------

    fn server_query(&mut self, from: SocketAddr, bytes: &[u8]) {
        let now = self.now;
        if bytes.len() >= 2 {
            let id = u16::from_be_bytes([bytes[0], bytes[1]]);
            self.arrivals.entry((from, id)).or_default().push(Arrival {
                at: now,
                answered: None,
            });
        }
        let Some(d) = self.listener.handle_query(now, from, bytes) else {
            return;
        };
        let (tag, msg) = (d.tag, d.message.to_vec());
        let session = self.server.session_of(&msg);
        let path = DnsPath { tag, session };
        let mut out = vec![0; BUF];
        let result = match self.server.handle_datagram(now, &path, &msg, &mut out) {
            Ok(ServerOutput::Send(p, m)) => Ok(Some((p, m.to_vec()))),
            Ok(ServerOutput::Tun(p)) => {
                self.server_tun.push((now, p.to_vec()));
                Ok(None)
            }
            Ok(ServerOutput::Nothing) => Ok(None),
            Err(e) => Err(e),
        };
        match result {
            Ok(Some((_, m))) if session.is_none() => {
                let _ = self.listener.send_to_tag(now, tag, &m);
            }
            Ok(Some((p, m))) => self.server_send_on(p, &m),
            Ok(None) => {}
            Err(e) => {
                self.server_errors.push(e);
                return;
            }
        }
        if let Some(s) = session {
            self.listener.bind(now, tag, s);
        }
    }

    fn server_send_on(&mut self, path: DnsPath, m: &[u8]) {
        let now = self.now;
        let r = match path.session {
            Some(s) => self.listener.send(now, s, m),
            None => self.listener.send_to_tag(now, path.tag, m),
        };
        if let Err(e) = r {
            self.server_errors.push(e);
        }
    }

    /// An inner packet from the server's TUN device.
    pub fn server_send(&mut self, packet: &[u8]) -> Result<(), DropReason> {
        let now = self.now;
        let mut out = vec![0; BUF];
        match self.server.handle_tun_packet(now, packet, &mut out)? {
            ServerOutput::Send(p, m) => {
                let m = m.to_vec();
                self.server_send_on(p, &m);
            }
            other => panic!("handle_tun_packet returned {other:?}"),
        }
        self.pump();
        Ok(())
    }

    pub fn session(&self) -> Option<SessionId> {
        self.server
            .sessions()
            .iter()
            .find_map(|s| s.path.and_then(|p| p.session))
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

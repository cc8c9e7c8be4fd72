//! A simulated DNS path for the DNS transport: the shipped client
//! [`Connection`] with one DNS path, one or more simulated recursive
//! resolvers (or none: straight to the server), and the shipped server
//! [`Endpoint`] with one DNS listener. The drivers do what a
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
//! and shuffle the records of answers; reorder its answers deeply, limit
//! its rate (dropping the rest), serve at a fixed rate from a bounded queue
//! (so delay grows with load), or die. A "direct" resolver passes the
//! client's queries to the server untouched (options, sizes and all), as a
//! path straight to the server would. It checks the server on every
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
use iptun_proto::crypto::PollKey;
use iptun_proto::endpoint::{Destination, Endpoint, Input, ListenerConfig, UdpAddr};
use iptun_proto::engine::ServerConfig;
use iptun_proto::transport::PacketList;
use iptun_proto::transport::dns::client::{PathInfo, UplinkStats};
use iptun_proto::transport::dns::{DownHeader, UP_HEADER_LEN, UpHeader, fragments};
use iptun_proto::wire::dns::{
    Answer, AnswerType, Domain, Name, Query, build_query_as, parse_answer, parse_query,
    response_limit,
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
/// Where an attacker sends its queries from (straight to the server).
pub const ATTACKER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(203, 0, 113, 66)), 5353);

/// What an attacker who sees the client's queries arrive at the server
/// (a resolver's operator, anyone on the path) sends the server for each.
#[derive(Clone, Debug)]
pub enum Attack {
    /// Bare polls with the client's tag and the next qseqs, their
    /// authenticators guessed (random).
    Forge { per_query: usize },
    /// The same, authenticated with another session's poll key (over the
    /// counters the client will use next).
    ForeignKey { per_query: usize, key: PollKey },
    /// The client's query itself, byte for byte, `after` it arrived.
    Replay { after: Duration },
}

/// The attacker and what it got.
pub struct Attacker {
    pub attack: Attack,
    /// Start only once the client is connected (the tag bound).
    pub armed: bool,
    pub sent: u64,
    /// Answers the server gave it: (when, answer bytes).
    pub answers: Vec<(Instant, Vec<u8>)>,
    /// Its queries by id: name and type.
    asked: HashMap<u16, (Name, AnswerType)>,
    rng: Rng,
}

impl Attacker {
    pub fn new(attack: Attack, seed: u64) -> Self {
        Self {
            attack,
            armed: false,
            sent: 0,
            answers: Vec::new(),
            asked: HashMap::new(),
            rng: Rng::new(seed),
        }
    }

    /// Fragments in the answers it got.
    pub fn fragments(&self) -> usize {
        self.answers
            .iter()
            .map(|(_, b)| self.answer_fragments(b))
            .sum()
    }

    /// Answers that carried at least one fragment.
    pub fn data_answers(&self) -> usize {
        self.answers
            .iter()
            .filter(|(_, b)| self.answer_fragments(b) > 0)
            .count()
    }

    /// Fragments carried by an answer to one of its queries.
    fn answer_fragments(&self, bytes: &[u8]) -> usize {
        let id = u16::from_be_bytes([bytes[0], bytes[1]]);
        let Some((name, ty)) = self.asked.get(&id) else {
            return 0;
        };
        let domain = Domain::new(DOMAIN).unwrap();
        let Ok(Answer::Data(payload)) = parse_answer(id, name, *ty, &domain, bytes) else {
            return 0;
        };
        let Some((_, pieces)) = DownHeader::parse(&payload) else {
            return 0;
        };
        fragments(pieces).filter(Result::is_ok).count()
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
    /// Queries longer than this (bytes) vanish (a middlebox that drops
    /// DNS datagrams over a size).
    pub drop_longer: Option<usize>,
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
    /// Drops everything, queries and answers (a resolver killed).
    pub dead: bool,
    /// Not a resolver: the client's datagrams go to the server as they
    /// are, and the answers back (a path straight to the server).
    pub direct: bool,
    /// Answers to the client overtake up to this many others (held in a
    /// pool; a random one leaves when it is fuller, or after `reorder_wait`).
    pub reorder: usize,
    pub reorder_wait: Duration,
    /// Client queries a second beyond which the rest are dropped.
    pub rate_limit: Option<f64>,
    /// The resolver serves this many client queries a second, from a queue
    /// of at most `queue` (beyond: dropped): its delay grows with load.
    pub capacity: Option<(f64, usize)>,
    /// Query name minimisation (RFC 9156), if any.
    pub minimise: Minimise,
}

/// How a resolver minimises query names (RFC 9156).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Minimise {
    #[default]
    Off,
    /// As unbound by default: an A query one label below the apex first.
    /// NXDOMAIN there, and it sends the full name at once; NOERROR, and it
    /// asks A at the full name, then the type asked (the steps between
    /// are left out: they cost the same round trips).
    Relaxed,
    /// As a resolver that takes an unsigned NXDOMAIN as final (RFC 8020;
    /// unbound with `qname-minimisation-strict`): NXDOMAIN at the first
    /// step goes to the client, the full name never to the server.
    Strict,
}

/// A minimisation step sent for a pending query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// A at the name one label below the apex.
    First,
    /// A at the full name.
    Full,
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
            drop_longer: None,
            drop_query: 0.0,
            drop_answer: 0.0,
            duplicate: 0.0,
            retry_after: None,
            give_up_after: Duration::from_secs(4),
            sources: 1,
            down_until: None,
            dead: false,
            direct: false,
            reorder: 0,
            reorder_wait: Duration::from_millis(200),
            rate_limit: None,
            capacity: None,
            minimise: Minimise::Off,
        }
    }
}

impl ResolverConfig {
    /// A path straight to the server (no resolver in between).
    pub fn direct() -> Self {
        Self {
            direct: true,
            randomize_case: false,
            ..Self::default()
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
    /// Queries dropped by the rate limit, the full queue, or death.
    pub rate_limited: u64,
    pub queue_full: u64,
    pub dead_drops: u64,
    /// Answers that overtook others in the reordering pool.
    pub reordered: u64,
    /// Minimisation steps sent to the server.
    pub minimisation_steps: u64,
    /// NXDOMAINs at a first step passed to the client (a strict resolver).
    pub name_errors_to_client: u64,
    /// Client queries that carried a payload option.
    pub options: u64,
    /// Queries that vanished for their size.
    pub too_long: u64,
    /// The longest query name received (characters).
    pub longest_name: usize,
    /// The deepest an answer overtook others in the reordering pool.
    pub reorder_depth: usize,
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
    /// Its number, and where it sends from (198.18.N.x).
    index: usize,
    rng: Rng,
    pending: HashMap<u64, Pending>,
    upstream: HashMap<(SocketAddr, u16), u64>,
    /// Minimisation steps sent, for which pending query.
    steps: HashMap<(SocketAddr, u16), (u64, Step)>,
    next_pid: u64,
    cache: HashMap<String, (Vec<u8>, Instant)>,
    pub stats: ResolverStats,
    /// What went wrong at the server: wrong case, too big, unknown query.
    pub violations: Vec<String>,
    /// Sizes of answers passed to the client, with the client's limit.
    pub answer_sizes: Vec<(usize, usize)>,
    /// The rate limiter's tokens and when they were counted.
    tokens: (f64, Option<Instant>),
    /// When the capacity-limited resolver is free again, and the queue.
    busy_until: Option<Instant>,
    queued: std::collections::VecDeque<Instant>,
    /// The reordering pool: answers waiting, by a number.
    pool: Vec<(u64, Vec<u8>)>,
    next_pooled: u64,
    /// Client queries it received, by when (for rates).
    pub received: Vec<Instant>,
}

impl Resolver {
    fn new(index: usize, cfg: ResolverConfig, seed: u64) -> Self {
        Self {
            cfg,
            index,
            rng: Rng::new(seed ^ 0x5eed ^ (index as u64) << 32),
            pending: HashMap::new(),
            upstream: HashMap::new(),
            steps: HashMap::new(),
            next_pid: 0,
            cache: HashMap::new(),
            stats: ResolverStats::default(),
            violations: Vec::new(),
            answer_sizes: Vec::new(),
            tokens: (0.0, None),
            busy_until: None,
            queued: std::collections::VecDeque::new(),
            pool: Vec::new(),
            next_pooled: 0,
            received: Vec::new(),
        }
    }

    /// Whether the rate limiter lets a query through at `now`.
    fn within_rate(&mut self, now: Instant) -> bool {
        let Some(rate) = self.cfg.rate_limit else {
            return true;
        };
        let burst = (rate / 20.0).max(1.0);
        let (tokens, at) = self.tokens;
        let earned = at.map_or(burst, |at| (now - at).as_secs_f64() * rate);
        let tokens = (tokens + earned).min(burst);
        if tokens >= 1.0 {
            self.tokens = (tokens - 1.0, Some(now));
            true
        } else {
            self.tokens = (tokens, Some(now));
            false
        }
    }

    /// When a query arriving at `now` is served (`None`: the queue is full).
    fn service_time(&mut self, now: Instant) -> Option<Instant> {
        let Some((rate, queue)) = self.cfg.capacity else {
            return Some(now);
        };
        while self.queued.front().is_some_and(|&t| t <= now) {
            self.queued.pop_front();
        }
        if self.queued.len() >= queue {
            return None;
        }
        let start = self.busy_until.map_or(now, |b| b.max(now));
        let done = start + Duration::from_secs_f64(1.0 / rate);
        self.busy_until = Some(done);
        self.queued.push_back(done);
        Some(done)
    }

    /// Client queries received in the `d` before `now`, per second.
    pub fn rate(&self, now: Instant, d: Duration) -> f64 {
        let n = self.received.iter().filter(|&&t| t + d > now).count();
        n as f64 / d.as_secs_f64()
    }
}

enum Ev {
    ToResolver(usize, Vec<u8>),
    /// A query served (after the resolver's queue), to handle.
    Serve(usize, Vec<u8>),
    ToServer(SocketAddr, Vec<u8>),
    FromServer(SocketAddr, Vec<u8>),
    ToClient(usize, Vec<u8>),
    /// A pooled answer's longest wait ended.
    Unpool(usize, u64),
    Retry(usize, u64),
    GiveUp(usize, u64),
}

/// The resolver that sends from `addr` (198.18.N.x is resolver N).
fn resolver_of(addr: SocketAddr) -> usize {
    match addr.ip() {
        std::net::IpAddr::V4(v4) => usize::from(v4.octets()[2]),
        std::net::IpAddr::V6(_) => 0,
    }
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
    pub resolvers: Vec<Resolver>,
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
    /// Direct paths: queries passed to the server, by (source, id).
    direct: HashMap<(SocketAddr, u16), ()>,
    buf: Vec<u8>,
    /// Someone who copies what it sees of the client's queries.
    pub attacker: Option<Attacker>,
}

impl Sim {
    pub fn new(
        server: ServerConfig,
        client_key: iptun_proto::crypto::PrivateKey,
        cfg: ResolverConfig,
        seed: u64,
    ) -> Self {
        Self::with_resolvers(server, client_key, vec![cfg], None, seed)
    }

    /// A client whose DNS path has these resolvers (in this order), query
    /// names capped at `max_query` characters.
    pub fn with_resolvers(
        server: ServerConfig,
        client_key: iptun_proto::crypto::PrivateKey,
        cfgs: Vec<ResolverConfig>,
        max_query: Option<usize>,
        seed: u64,
    ) -> Self {
        let now = Instant::now();
        let domain = Domain::new(DOMAIN).unwrap();
        let mut rng = Rng::new(seed);
        let path = PathConfig::Dns {
            domain: domain.clone(),
            resolvers: cfgs.len(),
            max_query,
            tag: rng.next_u64() as u32,
            seed: rng.next_u64(),
        };
        let resolvers = cfgs
            .into_iter()
            .enumerate()
            .map(|(i, cfg)| Resolver::new(i, cfg, seed))
            .collect();
        let mut sim = Self {
            start: now,
            now,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            resolvers,
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
            direct: HashMap::new(),
            buf: Vec::new(),
            attacker: None,
        };
        sim.flush_client();
        sim
    }

    /// The first resolver (the only one, in most tests).
    pub fn resolver(&self) -> &Resolver {
        &self.resolvers[0]
    }

    /// The first resolver, to change.
    pub fn resolver_mut(&mut self) -> &mut Resolver {
        &mut self.resolvers[0]
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
            Ev::ToResolver(r, bytes) => self.resolver_query(r, &bytes),
            Ev::Serve(r, bytes) => self.resolver_serve(r, &bytes),
            Ev::ToServer(from, bytes) => self.server_query(from, &bytes),
            Ev::FromServer(to, bytes) => self.resolver_answer(to, &bytes),
            Ev::ToClient(r, bytes) => self.client_response(r, &bytes),
            Ev::Unpool(r, n) => {
                let pool = &mut self.resolvers[r].pool;
                if let Some(k) = pool.iter().position(|(m, _)| *m == n) {
                    let (_, b) = pool.remove(k);
                    self.schedule(now + CLIENT_LATENCY, Ev::ToClient(r, b));
                }
            }
            Ev::Retry(r, pid) => {
                if self.resolvers[r].pending.get(&pid).is_some_and(|p| !p.done) {
                    self.forward(r, pid);
                }
            }
            Ev::GiveUp(r, pid) => {
                let res = &mut self.resolvers[r];
                let Some(p) = res.pending.get_mut(&pid) else {
                    return;
                };
                if !p.done && !res.cfg.dead {
                    p.done = true;
                    res.stats.gave_up += 1;
                    let (id, name, qtype) = (p.client_id, p.client_name.clone(), p.qtype);
                    let bytes = error_response(id, &name, qtype, ResponseCode::ServFail);
                    self.schedule(now + CLIENT_LATENCY, Ev::ToClient(r, bytes));
                }
            }
        }
    }

    /// An answer from resolver `r` on its way to the client: straight on,
    /// or through the reordering pool.
    fn send_to_client(&mut self, r: usize, bytes: Vec<u8>) {
        let now = self.now;
        let res = &mut self.resolvers[r];
        if res.cfg.reorder == 0 {
            self.schedule(now + CLIENT_LATENCY, Ev::ToClient(r, bytes));
            return;
        }
        let n = res.next_pooled;
        res.next_pooled += 1;
        res.pool.push((n, bytes));
        let out = (res.pool.len() > res.cfg.reorder).then(|| {
            // It overtakes the answers pooled before it.
            let k = res.rng.below(res.pool.len() as u64) as usize;
            if k > 0 {
                res.stats.reordered += 1;
                res.stats.reorder_depth = res.stats.reorder_depth.max(k);
            }
            res.pool.remove(k).1
        });
        let wait = res.cfg.reorder_wait;
        self.schedule(now + wait, Ev::Unpool(r, n));
        if let Some(b) = out {
            self.schedule(now + CLIENT_LATENCY, Ev::ToClient(r, b));
        }
    }

    // --- the client's driver -------------------------------------------

    /// Send the queries the connection has, to the resolver; note a new
    /// handshake and take the events.
    fn flush_client(&mut self) {
        let now = self.now;
        while let Some(t) = self.client.poll_transmit(now, &mut self.buf) {
            let Remote::Resolver(r) = t.to else {
                panic!("a DNS query to {:?}", t.to)
            };
            assert!(
                t.path == 0 && r < self.resolvers.len(),
                "queries go to a resolver"
            );
            let q = self.buf[..t.len].to_vec();
            self.schedule(now + CLIENT_LATENCY, Ev::ToResolver(r, q));
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

    /// Resolver `r`'s answer reaches the client.
    fn client_response(&mut self, r: usize, bytes: &[u8]) {
        let now = self.now;
        let before = self.client.drops();
        let mut tun = PacketList::default();
        self.client
            .handle_input(now, 0, Remote::Resolver(r), bytes, &mut tun);
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
        if from.addr != ATTACKER {
            self.attack(bytes);
        }
    }

    /// The attacker sees the client's query `bytes` arrive at the server.
    fn attack(&mut self, bytes: &[u8]) {
        let now = self.now;
        let Some(a) = self.attacker.as_mut().filter(|a| a.armed) else {
            return;
        };
        let Ok(q) = parse_query(bytes) else { return };
        let domain = Domain::new(DOMAIN).unwrap();
        let mut payload = vec![0; 4096];
        let Ok(n) = iptun_proto::wire::dns::decode_name(&domain, &q.name, &mut payload) else {
            return;
        };
        let Some((h, _)) = UpHeader::parse(&payload[..n]) else {
            return;
        };
        let mut out = Vec::new();
        match a.attack.clone() {
            Attack::Replay { after } => {
                let Some(ty) = q.answer_type() else { return };
                a.asked.insert(q.id, (q.name.clone(), ty));
                out.push((now + after, bytes.to_vec()));
            }
            Attack::Forge { per_query } | Attack::ForeignKey { per_query, .. } => {
                for k in 0..per_query {
                    let mut f = UpHeader {
                        tag: h.tag,
                        prompt: false,
                        qseq: h.qseq.wrapping_add(1 + k as u16),
                        down_limit: 1232,
                        auth: (a.rng.next_u64() as u32).to_le_bytes(),
                    };
                    if let Attack::ForeignKey { key, .. } = &a.attack {
                        f.authenticate(key, u64::from(f.qseq));
                    }
                    let mut p = vec![0; UP_HEADER_LEN];
                    f.emit(&mut p);
                    let name = iptun_proto::wire::dns::encode_name(&domain, &p).unwrap();
                    let id = a.rng.next_u64() as u16;
                    a.asked.insert(id, (name.clone(), AnswerType::Txt));
                    let spread = Duration::from_micros(a.rng.next_u64() % 2000);
                    let q = build_query_as(id, &name, AnswerType::Txt, Some(1232)).unwrap();
                    out.push((now + spread, q));
                }
            }
        }
        a.sent += out.len() as u64;
        for (at, q) in out {
            self.schedule(at, Ev::ToServer(ATTACKER, q));
        }
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
            if to.addr == ATTACKER {
                if let Some(a) = &mut self.attacker {
                    a.answers.push((now, bytes));
                }
                continue;
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

    // --- the resolvers -------------------------------------------------

    /// A client query reaches resolver `r`: dropped (dead, rate limit, full
    /// queue), or served now or once its queue gets to it.
    fn resolver_query(&mut self, r: usize, bytes: &[u8]) {
        let now = self.now;
        let res = &mut self.resolvers[r];
        res.stats.client_queries += 1;
        res.received.push(now);
        if res.cfg.dead {
            res.stats.dead_drops += 1;
            return;
        }
        if res.cfg.drop_longer.is_some_and(|n| bytes.len() > n) {
            res.stats.too_long += 1;
            return;
        }
        if !res.within_rate(now) {
            res.stats.rate_limited += 1;
            return;
        }
        match res.service_time(now) {
            None => res.stats.queue_full += 1,
            Some(t) if t <= now => self.resolver_serve(r, bytes),
            Some(t) => self.schedule(t, Ev::Serve(r, bytes.to_vec())),
        }
    }

    /// Resolver `r` handles a client query.
    fn resolver_serve(&mut self, r: usize, bytes: &[u8]) {
        let now = self.now;
        let Ok(q) = parse_query(bytes) else { return };
        let res = &mut self.resolvers[r];
        if !q.option.is_empty() {
            res.stats.options += 1;
        }
        res.stats.longest_name = res.stats.longest_name.max(q.name_wire_len() - 2);
        if res.cfg.direct {
            // Straight to the server, as sent (the port stands for the
            // client's socket).
            let src = SocketAddr::from((Ipv4Addr::new(198, 18, r as u8, 200), 40000));
            self.direct.insert((src, q.id), ());
            res.stats.upstream_queries += 1;
            let b = bytes.to_vec();
            self.schedule(now + SERVER_LATENCY, Ev::ToServer(src, b));
            return;
        }
        if res.rng.chance(res.cfg.drop_query) {
            return;
        }
        let client_name = bytes[12..12 + q.name_wire_len()].to_vec();
        if res.cfg.down_until.is_some_and(|t| now < t) {
            res.stats.outage_servfails += 1;
            let b = error_response(q.id, &client_name, q.qtype, ResponseCode::ServFail);
            self.send_to_client(r, b);
            return;
        }
        if let Some((cap, code)) = res.cfg.name_cap
            && q.name_wire_len() - 2 > cap
        {
            res.stats.capped += 1;
            let b = error_response(q.id, &client_name, q.qtype, code);
            self.send_to_client(r, b);
            return;
        }
        let block = res.cfg.block(q.qtype);
        if block.is_some() {
            res.stats.blocked += 1;
        }
        match block {
            Some(Block::Code(code)) => {
                let b = error_response(q.id, &client_name, q.qtype, code);
                self.send_to_client(r, b);
                return;
            }
            Some(Block::Drop) => return,
            Some(Block::Strip) | None => {}
        }
        let cache_key = format!("{}/{}", q.name.to_lowercase().to_ascii(), q.qtype);
        if let Some((answer, until)) = res.cache.get(&cache_key)
            && now < *until
        {
            res.stats.cache_hits += 1;
            let mut b = answer.clone();
            b[..2].copy_from_slice(&q.id.to_be_bytes());
            b[12..12 + client_name.len()].copy_from_slice(&client_name);
            self.send_to_client(r, b);
            return;
        }
        let name = if res.cfg.randomize_case {
            randomize_case(&q.name, &mut res.rng)
        } else {
            q.name.clone()
        };
        let name = if res.cfg.mangle_8bit {
            mangle_8bit(&name)
        } else {
            name
        };
        let pid = res.next_pid;
        res.next_pid += 1;
        res.pending.insert(
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
        self.forward(r, pid);
        let res = &mut self.resolvers[r];
        if res.rng.chance(res.cfg.duplicate) {
            self.forward(r, pid);
        }
        let give_up = now + self.resolvers[r].cfg.give_up_after;
        self.schedule(give_up, Ev::GiveUp(r, pid));
    }

    /// Send pending query `pid` of resolver `r` to the server (again), from
    /// a random source of its own.
    fn forward(&mut self, r: usize, pid: u64) {
        let now = self.now;
        let res = &mut self.resolvers[r];
        let p = res.pending.get_mut(&pid).expect("pending");
        p.tries += 1;
        let id = res.rng.next_u64() as u16;
        let src = SocketAddr::from((
            Ipv4Addr::new(
                198,
                18,
                r as u8,
                1 + res.rng.below(res.cfg.sources as u64) as u8,
            ),
            1024 + res.rng.below(60000) as u16,
        ));
        let minimise = res.cfg.minimise != Minimise::Off && p.tries == 1;
        let below_apex = p.name.num_labels() as usize - apex_labels();
        if let Some(after) = res.cfg.retry_after.filter(|_| p.tries < 3) {
            self.schedule(now + after, Ev::Retry(r, pid));
        }
        if minimise {
            // One label below the apex is the full name: A there first.
            let step = if below_apex > 1 {
                Step::First
            } else {
                Step::Full
            };
            self.send_step(r, pid, src, id, step);
        } else {
            self.send_full(r, pid, src, id);
        }
    }

    /// Send pending query `pid` of resolver `r` to the server, as asked.
    fn send_full(&mut self, r: usize, pid: u64, src: SocketAddr, id: u16) {
        let res = &mut self.resolvers[r];
        let p = &res.pending[&pid];
        let ty = AnswerType::of(p.qtype).expect("the client asks for data types only");
        let bytes = build_query_as(id, &p.name, ty, res.cfg.upstream_edns).unwrap();
        res.upstream.insert((src, id), pid);
        res.stats.upstream_queries += 1;
        self.schedule(self.now + SERVER_LATENCY, Ev::ToServer(src, bytes));
    }

    /// Send a minimisation step of pending query `pid` of resolver `r`.
    fn send_step(&mut self, r: usize, pid: u64, src: SocketAddr, id: u16, step: Step) {
        let res = &mut self.resolvers[r];
        let name = &res.pending[&pid].name;
        let name = match step {
            Step::First => name.trim_to(apex_labels() + 1),
            Step::Full => name.clone(),
        };
        let bytes = build_query_as(id, &name, AnswerType::A, res.cfg.upstream_edns).unwrap();
        res.steps.insert((src, id), (pid, step));
        res.stats.minimisation_steps += 1;
        self.schedule(self.now + SERVER_LATENCY, Ev::ToServer(src, bytes));
    }

    /// The server's answer to a minimisation step: the next step, the full
    /// query, or (a strict resolver, NXDOMAIN) the client's answer.
    fn step_answered(&mut self, r: usize, src: SocketAddr, pid: u64, step: Step, bytes: &[u8]) {
        let res = &mut self.resolvers[r];
        let Some(p) = res.pending.get_mut(&pid).filter(|p| !p.done) else {
            return;
        };
        let nxdomain = Message::from_vec(bytes)
            .is_ok_and(|m| m.metadata.response_code == ResponseCode::NXDomain);
        let id = res.rng.next_u64() as u16;
        match step {
            Step::First if nxdomain && res.cfg.minimise == Minimise::Strict => {
                p.done = true;
                res.stats.name_errors_to_client += 1;
                let b =
                    error_response(p.client_id, &p.client_name, p.qtype, ResponseCode::NXDomain);
                self.send_to_client(r, b);
            }
            Step::First if !nxdomain => self.send_step(r, pid, src, id, Step::Full),
            _ => self.send_full(r, pid, src, id),
        }
    }

    fn resolver_answer(&mut self, to: SocketAddr, bytes: &[u8]) {
        let now = self.now;
        let r = resolver_of(to);
        let id = u16::from_be_bytes([bytes[0], bytes[1]]);
        if self.direct.remove(&(to, id)).is_some() {
            if !self.resolvers[r].cfg.dead {
                self.send_to_client(r, bytes.to_vec());
            }
            return;
        }
        let res = &mut self.resolvers[r];
        if let Some((pid, step)) = res.steps.remove(&(to, id)) {
            self.step_answered(r, to, pid, step, bytes);
            return;
        }
        let Some(&pid) = res.upstream.get(&(to, id)) else {
            res.violations
                .push(format!("an answer to no query: {to:?} {id}"));
            return;
        };
        let advertised = response_limit(res.cfg.upstream_edns);
        if bytes.len() > advertised {
            res.violations.push(format!(
                "{} bytes against an advertised {advertised}",
                bytes.len()
            ));
        }
        let p = res.pending.get_mut(&pid).expect("pending");
        let msg = Message::from_vec(bytes).expect("the server's answer parses");
        if !msg
            .queries
            .first()
            .is_some_and(|q| q.name().eq_case(&p.name))
        {
            res.violations.push(format!(
                "question not echoed in its case: {:?}",
                msg.queries
            ));
        }
        if p.done || res.cfg.dead {
            res.stats.late_answers += 1;
            return;
        }
        p.done = true;
        let mut b = bytes.to_vec();
        if p.strip || res.cfg.shuffle {
            let mut m = msg.clone();
            if p.strip {
                m.answers.clear();
            } else if m.answers.len() > 1 {
                res.stats.shuffled += 1;
                shuffle(&mut res.rng, &mut m.answers);
            }
            b = m.to_vec().unwrap();
        }
        b[..2].copy_from_slice(&p.client_id.to_be_bytes());
        b[12..12 + p.client_name.len()].copy_from_slice(&p.client_name);
        let mut limit = response_limit(p.client_edns);
        if let Some(l) = res.cfg.client_limit {
            limit = limit.min(l);
        }
        if msg.metadata.response_code == ResponseCode::NoError {
            let ttl = msg.answers.iter().map(|a| a.ttl).min().unwrap_or(0);
            let cache = match res.cfg.cache {
                Cache::Off => false,
                Cache::RespectTtl => ttl > 0,
                Cache::IgnoreTtl => true,
            };
            if cache {
                res.cache.insert(
                    p.cache_key.clone(),
                    (b.clone(), now + Duration::from_secs(60)),
                );
            }
        }
        if b.len() > limit {
            res.stats.truncated += 1;
            b = truncated_response(p.client_id, &p.client_name, p.qtype);
        }
        res.answer_sizes.push((b.len(), limit));
        if res.rng.chance(res.cfg.drop_answer) {
            return;
        }
        self.send_to_client(r, b);
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

/// Labels of the tunnel domain.
fn apex_labels() -> usize {
    Name::from_ascii(DOMAIN).unwrap().num_labels() as usize
}

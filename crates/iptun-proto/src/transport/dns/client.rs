//! The client side of the DNS transport: queries out through the path's
//! resolvers (all of them at once), answers in. See the [module
//! docs](super) for the formats.
//!
//! Driving it:
//!
//! ```text
//! client.send(now, message)                       // every message the engine emits
//! while let Some((i, q)) = client.poll_query(now) { send q.bytes to resolver i }
//! client.handle_response(now, i, bytes)           // every datagram from resolver i
//! while let Some(m) = client.poll_message() { engine.handle_datagram(now, &m, ..) }
//! client.handle_timeout(now)                      // when next_timeout() passes
//! ```
//!
//! # Pacing
//!
//! Each resolver has its own congestion controller (the one ICMP uses too:
//! [`congestion`](crate::transport::congestion)): queries go paced at a rate
//! that follows what the resolver delivers (loss beyond its usual share, a
//! standing queue); the window, twice what that rate carries in a round
//! trip, bounds queries carrying data and bare polls each (held polls fill
//! the server, not the path). Round trips come only from answers the server
//! gave at once; a query overdue (likely lost) whose answer comes after all
//! was reordered, not lost; SERVFAIL and REFUSED back that resolver off. Queries go to
//! the resolver with the least load for its window, so the resolvers carry
//! what each can ([`resolvers`](super::resolvers)); one that falls silent
//! or turns lossy is set aside at once and tried again later, its queries'
//! fragments going again through the others.
//!
//! Bare polls keep the downstream going: at least [`MIN_POLLS`] are out
//! (when the path is in use), one more for every answer that brings data
//! while the server says more waits, one fewer for every poll the server
//! held to its end without data, never more than the windows.
//!
//! # What the path carries
//!
//! Sizes each way ([`sizes`](super::sizes)): the query name's length (the
//! user's cap, lowered where long queries vanish, probed up again), a
//! payload option straight to the server, and the answer size (1232 at
//! first; 512 after truncation; 4080 where an answer that large arrives).
//! Encoding and record type ([`ladder`](super::ladder)): base32 then
//! base128, TXT then NULL, down the ladder where types fail. A resolver
//! that falls silent and then answers a minimal query at once (a bare poll
//! in base32, TXT, 512 bytes) tells that the path drops what the client
//! sends now: one of those steps down, the newest first (base128, a type
//! above TXT, the option, answers beyond 1232, EDNS0, the name length, the
//! type).
//!
//! Upstream fragments whose query failed are sent again only within
//! [`RETRY_WINDOW`] of the first try (and at most [`MAX_TRIES`] times):
//! after that the inner protocol's own recovery is faster.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::ladder::{Ladder, LadderStats, PROBE_AFTER};
use super::resolvers::{Aside, Failed, Load, ResolverInfo, Resolvers};
use super::sizes::{Probe, Sizes, SizesInfo};
use super::{
    CLASSIC_SIZE, DownHeader, PAD_ANSWER, PADDING_HEADER_LEN, TAG_MASK, UP_HEADER_LEN, UpHeader,
};
use crate::DropReason;
use crate::crypto::{POLL_AUTH_LEN, PollKey};
use crate::frag::{Fragmenter, Limits, Reassembler};
use crate::transport::congestion::CongestionStats;
use crate::wire::dns::{
    Answer, AnswerType, BASE128_MARKER, Domain, Name, NameEncoding, build_query_with,
    encode_name_as, parse_answer,
};

/// The fewest bare polls out while the path is in use.
pub const MIN_POLLS: usize = 2;
/// The most bare polls out (over all resolvers): a resolver serves other
/// clients too, and drops queries when its list is full (unbound keeps
/// 1000 a thread; with a full data window, 768 of ours at most).
pub const MAX_POLLS: usize = 256;
/// A query given up on (lost: unanswered a round trip and its deviations
/// after it went, or the server's hold beyond that if it may be held) is
/// still listed this long after it went, so a late answer still delivers
/// its data.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(4);
/// Long-name failures (with shorter names answered) that lower the cap.
pub const LONG_FAILURES: u32 = 2;
/// A failed fragment is sent again only this soon after its first try.
pub const RETRY_WINDOW: Duration = Duration::from_millis(2500);
/// Tries per fragment (a query lost one time in ten then costs the inner
/// TCP one fragment in a thousand).
pub const MAX_TRIES: u8 = 3;
/// Upstream messages waiting to be split; more are dropped.
pub const MAX_UP_QUEUE: usize = 1024;
/// An upstream message waiting longer than this is dropped (the inner
/// TCP sees the loss and slows down, instead of a queue growing).
pub const MAX_UP_WAIT: Duration = Duration::from_millis(500);
/// Partial downstream messages are dropped this long after their first fragment.
pub const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(3);

/// A query to send to a resolver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// The DNS message id.
    pub id: u16,
    /// The DNS message.
    pub bytes: Vec<u8>,
}

/// What the status shows of the DNS path.
#[derive(Clone, Debug, PartialEq)]
pub struct PathInfo {
    /// How upstream bytes are encoded in names.
    pub encoding: &'static str,
    /// The record type of queries and answers.
    pub record_type: &'static str,
    /// The sizes each way.
    pub sizes: SizesInfo,
    /// Upstream fragment bytes per query.
    pub upstream_fragment: usize,
    /// Queries in flight now (over all resolvers).
    pub in_flight: usize,
    /// Bare polls out now, and how many the client wants out.
    pub polls: usize,
    /// See [`PathInfo::polls`].
    pub poll_target: usize,
    /// The resolvers' windows together.
    pub window: usize,
    /// The resolver carrying the most.
    pub primary: usize,
    /// Each resolver, in the order given.
    pub resolvers: Vec<ResolverInfo>,
    /// Counters.
    pub stats: UplinkStats,
}

impl PathInfo {
    /// The congestion state of the resolver carrying the most.
    pub fn primary_congestion(&self) -> CongestionStats {
        self.resolvers[self.primary].congestion
    }
}

/// Counters of the client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UplinkStats {
    /// Queries sent (data, polls, probes).
    pub queries: u64,
    /// Queries that carried a fragment.
    pub data_queries: u64,
    /// Answers taken (any response matching a query).
    pub answers: u64,
    /// Answers that carried fragments.
    pub data_answers: u64,
    /// Queries that timed out.
    pub timeouts: u64,
    /// SERVFAIL answers.
    pub servfails: u64,
    /// REFUSED answers.
    pub refused: u64,
    /// Truncated answers.
    pub truncated: u64,
    /// FORMERR, NOTIMP, NXDOMAIN and other error codes.
    pub errors: u64,
    /// Fragments sent again.
    pub retried: u64,
    /// Upstream fragments or messages dropped (retries used up, too big for
    /// the path after a fallback, queue full or waited too long).
    pub lost: u64,
    /// Times a path parameter stepped down (sizes, encoding, type).
    pub fallbacks: u64,
    /// Size probes sent.
    pub reprobes: u64,
    /// Size probes that failed.
    pub reprobe_failures: u64,
    /// Queries sent in base128 to probe the path.
    pub encoding_probes: u64,
    /// Base128 probes that failed.
    pub encoding_failures: u64,
    /// Queries sent with a better record type to probe the path.
    pub type_probes: u64,
    /// Record type probes that failed.
    pub type_probe_failures: u64,
    /// Times the record type stepped down the ladder.
    pub type_fallbacks: u64,
    /// Times a resolver was set aside.
    pub set_asides: u64,
    /// Responses that matched no query in flight, or did not parse.
    pub unexpected: u64,
}

struct UpFrag {
    bytes: Vec<u8>,
    born: Instant,
    tries: u8,
}

/// What a query is for.
enum Purpose {
    /// Carries a fragment (or re-asks an answer that came truncated).
    Data(Option<UpFrag>),
    /// A bare poll.
    Poll,
    /// Tests a size.
    Size(Probe),
    /// Tries a resolver set aside.
    Try,
}

struct InFlight {
    resolver: usize,
    name: Name,
    /// The query counter (its low 16 bits are the qseq).
    qseq: u64,
    sent: Instant,
    purpose: Purpose,
    /// What it counts as in its resolver's windows (`None`: nothing; given
    /// up on, or a try).
    load: Option<Load>,
    /// Lost (or its resolver set aside): a late answer still counts for
    /// its data, nothing else.
    given_up: bool,
    /// Its resolver was set aside after it went.
    aside: bool,
    /// Overdue: its resolver's controller took it as lost already.
    overdue: bool,
    /// The server answers it at once.
    prompt: bool,
    /// A re-ask of an answer that came truncated.
    reask: bool,
    /// The name's length (characters, no trailing dot).
    name_len: usize,
    /// The answer size asked for.
    down: usize,
    /// It carried a payload option.
    option: bool,
    /// The record type asked for.
    rtype: AnswerType,
}

impl InFlight {
    /// A poll the server answers at once, still awaited.
    fn is_prompt_poll(&self) -> bool {
        matches!(self.purpose, Purpose::Poll) && self.prompt && !self.given_up
    }

    /// Whether its fate tells its resolver's controller anything: not a
    /// try, nor a query of a resolver set aside.
    fn purpose_counts(&self) -> bool {
        !matches!(self.purpose, Purpose::Try) && !self.aside
    }

    /// Whether its loss is still news to its resolver's controller.
    fn loss_counts(&self) -> bool {
        self.purpose_counts() && !self.overdue
    }

    /// What a late answer needs of a query given up on (its name is
    /// cloned by the caller).
    fn shell(&self) -> Self {
        Self {
            resolver: self.resolver,
            name: Name::root(),
            qseq: self.qseq,
            sent: self.sent,
            purpose: Purpose::Poll,
            load: None,
            given_up: true,
            aside: self.aside,
            overdue: self.overdue,
            prompt: self.prompt,
            reask: self.reask,
            name_len: self.name_len,
            down: self.down,
            option: self.option,
            rtype: self.rtype,
        }
    }
}

/// How one query is made: see [`DnsClient::make_query`].
struct Spec {
    resolver: usize,
    purpose: Purpose,
    /// A re-ask: the qseq of the query whose answer came truncated.
    reask: Option<u64>,
    rtype: AnswerType,
    /// Force base32 (tries and size probes test the basics).
    base32: bool,
    down: usize,
    edns: Option<u16>,
    /// The server must not hold it.
    prompt: bool,
}

/// How a query failed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Failure {
    Timeout,
    ServFail,
    Refused,
    Other,
}

/// The client half of the DNS transport: see the module docs. Resolvers
/// are numbered `0..n` in the order given; the driver knows what they are
/// (an address over UDP, a DoT or DoH server).
pub struct DnsClient {
    domain: Domain,
    tag: u32,
    rng: u64,
    /// The query counter under the current poll key: the qseq is its low
    /// 16 bits; a new key keeps those and starts the rest at 0.
    qseq: u64,
    /// The poll key of the client's current keys, with their index.
    poll_key: Option<(u32, PollKey)>,
    fragmenter: Fragmenter,
    /// Upstream messages waiting, with when they came.
    messages: VecDeque<(Instant, Vec<u8>)>,
    frags: VecDeque<UpFrag>,
    reassembler: Reassembler<()>,
    delivered: VecDeque<Vec<u8>>,
    in_flight: HashMap<u16, InFlight>,
    /// Queries whose answer came truncated, to ask again for less.
    reask: VecDeque<u64>,
    resolvers: Resolvers,
    poll_target: usize,
    /// Keep bare polls outstanding (the path is in use); else send only
    /// queries that carry data.
    polling: bool,
    sizes: Sizes,
    ladder: Ladder,
    /// The size probe in flight (its DNS id).
    size_probe: Option<u16>,
    /// Answers in a row.
    good_in_row: u32,
    /// Long-name failures in a row.
    long_failures: u32,
    /// Rounds of failures since the last answer with data: a failure counts
    /// if its query was sent after the last one counted.
    failures_in_row: u32,
    last_failure: Option<Instant>,
    /// Pieces the server had queued after its latest answer, with nothing
    /// held to take them (a download): as many polls as take them are
    /// prompt, so their losses show within a round trip.
    backlog: usize,
    /// Prompt polls in flight, not given up (recounted at each sweep).
    prompt_polls: usize,
    /// When queries given up on were last cleared out.
    swept: Option<Instant>,
    /// The latest time seen (for `next_timeout`).
    now: Option<Instant>,
    stats: UplinkStats,
}

impl DnsClient {
    /// A client of the server of `domain` through `resolvers` resolvers (at
    /// least one), as client `tag` (random, from the caller), query names
    /// capped at `max_query` characters (`None`: 253); `seed` seeds the DNS
    /// message ids and the first message id; `now` starts the resolvers'
    /// congestion controllers.
    pub fn new(
        domain: Domain,
        resolvers: usize,
        max_query: Option<usize>,
        tag: u32,
        seed: u64,
        now: Instant,
    ) -> Self {
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let first = next_random(&mut rng) as u16;
        Self {
            sizes: Sizes::new(&domain, max_query),
            domain,
            tag: tag & TAG_MASK,
            qseq: next_random(&mut rng) & 0xFFFF,
            poll_key: None,
            rng,
            fragmenter: Fragmenter::new(first),
            messages: VecDeque::new(),
            frags: VecDeque::new(),
            reassembler: Reassembler::new(Limits {
                timeout: REASSEMBLY_TIMEOUT,
                max_partials_per_key: 256,
                max_bytes: 4 << 20,
            }),
            delivered: VecDeque::new(),
            in_flight: HashMap::new(),
            reask: VecDeque::new(),
            resolvers: Resolvers::new(resolvers, now),
            poll_target: MIN_POLLS,
            polling: true,
            ladder: Ladder::default(),
            size_probe: None,
            good_in_row: 0,
            long_failures: 0,
            failures_in_row: 0,
            last_failure: None,
            backlog: 0,
            prompt_polls: 0,
            swept: None,
            now: None,
            stats: UplinkStats::default(),
        }
    }

    /// Keep bare polls outstanding (the path is in use), or send only
    /// queries that carry data (a path kept in reserve).
    pub fn set_polling(&mut self, on: bool) {
        self.polling = on;
    }

    /// The poll key of the engine's current keys and their index (the
    /// engine's [`poll_key`](crate::engine::Client::poll_key)): queries
    /// carry its authenticator from now on. A new key keeps the qseq and
    /// starts the counter's upper bits at 0 (the server widens the first
    /// qseq under a key as it is).
    pub fn set_poll_key(&mut self, key: Option<(u32, &PollKey)>) {
        if self.poll_key.as_ref().map(|(i, _)| *i) == key.map(|(i, _)| i) {
            return;
        }
        self.poll_key = key.map(|(i, k)| (i, k.clone()));
        self.qseq &= 0xFFFF;
    }

    /// Rounds of failed queries (timed out, or an error code) since the
    /// last answer: a path whose resolvers broke says so fast.
    pub fn failures_in_row(&self) -> u32 {
        self.failures_in_row
    }

    /// The client's tag.
    pub fn tag(&self) -> u32 {
        self.tag
    }

    /// The resolver carrying the most now.
    pub fn resolver(&self) -> usize {
        self.resolvers.primary()
    }

    /// How many resolvers there are.
    pub fn resolvers(&self) -> usize {
        self.resolvers.len()
    }

    /// The counters.
    pub fn stats(&self) -> UplinkStats {
        let mut s = self.stats;
        let l: LadderStats = self.ladder.stats();
        s.encoding_probes = l.encoding_probes;
        s.encoding_failures = l.encoding_failures;
        s.type_probes = l.type_probes;
        s.type_probe_failures = l.type_probe_failures;
        s.type_fallbacks = l.type_fallbacks;
        let z = self.sizes.info().stats;
        s.reprobes = z.probes;
        s.reprobe_failures = z.probe_failures;
        s.fallbacks += z.fallbacks;
        s
    }

    /// The DNS path's parameters, for status.
    pub fn path_info(&self, now: Instant) -> PathInfo {
        PathInfo {
            encoding: self.ladder.encoding().as_str(),
            record_type: self.ladder.rtype().as_str(),
            sizes: self.sizes.info(),
            upstream_fragment: self.fragment_len(),
            in_flight: self.in_flight.len(),
            polls: self.resolvers.in_flight(Load::Poll),
            poll_target: self.poll_target(),
            window: self.resolvers.total_window(),
            primary: self.resolvers.primary(),
            resolvers: self.resolvers.info(now),
            stats: self.stats(),
        }
    }

    /// Bare polls to keep in flight.
    fn poll_target(&self) -> usize {
        if self.polling { self.poll_target } else { 0 }
    }

    /// Fragment bytes (header included) one query carries: in the payload
    /// option where the path takes one, else in the name.
    fn fragment_len(&self) -> usize {
        match self.sizes.option_len() {
            0 => self
                .sizes
                .name_capacity(&self.domain, self.ladder.encoding())
                .saturating_sub(UP_HEADER_LEN),
            n => n,
        }
    }

    /// Queue an upstream tunnel message.
    pub fn send(&mut self, now: Instant, message: &[u8]) {
        self.now = Some(now);
        if self.messages.len() >= MAX_UP_QUEUE {
            self.stats.lost += 1;
            return;
        }
        self.messages.push_back((now, message.to_vec()));
    }

    /// Whether there is upstream data waiting.
    pub fn has_data(&self) -> bool {
        !self.frags.is_empty() || !self.messages.is_empty() || !self.reask.is_empty()
    }

    /// The next query to send, and to which resolver, if pacing allows one now.
    pub fn poll_query(&mut self, now: Instant) -> Option<(usize, Query)> {
        self.now = Some(now);
        self.expire(now);
        if let Some(i) = self.resolvers.retry_due(now) {
            return self.try_resolver(now, i);
        }
        if self.has_data()
            && let Some(q) = self.data_query(now)
        {
            return Some(q);
        }
        if !self.polling {
            return None;
        }
        if self.size_probe.is_none()
            && self.good_in_row >= PROBE_AFTER
            && let Some(probe) = self.sizes.probe_due(now)
            && let Some(i) = self.resolvers.pick(now, Load::Poll)
        {
            return self.size_probe_query(now, i, probe);
        }
        if self.resolvers.in_flight(Load::Poll) < self.poll_target()
            && let Some(i) = self.resolvers.pick(now, Load::Poll)
        {
            let spec = self.spec(i, Purpose::Poll);
            return self.make_query(now, spec);
        }
        None
    }

    /// A re-ask or a fragment, to the resolver that may take one.
    fn data_query(&mut self, now: Instant) -> Option<(usize, Query)> {
        let i = self.resolvers.pick(now, Load::Data)?;
        if let Some(qseq) = self.reask.pop_front() {
            let mut spec = self.spec(i, Purpose::Data(None));
            spec.reask = Some(qseq);
            return self.make_query(now, spec);
        }
        let frag = self.next_fragment(now)?;
        let spec = self.spec(i, Purpose::Data(Some(frag)));
        self.make_query(now, spec)
    }

    /// A query to `resolver` with the path's current parameters. Data is
    /// answered at once on the path in use (polls are held there for the
    /// downstream), and so are polls while data waits at the server.
    fn spec(&self, resolver: usize, purpose: Purpose) -> Spec {
        let prompt = match purpose {
            Purpose::Data(_) => self.polling,
            // Enough prompt polls to take the backlog (answers take two or
            // three pieces); more came back empty, each a query through a
            // resolver whose load is per query (half the answers of a
            // download through unbound were empty).
            Purpose::Poll => self.prompt_polls < self.backlog.div_ceil(2),
            Purpose::Size(_) | Purpose::Try => true,
        };
        Spec {
            resolver,
            purpose,
            reask: None,
            rtype: self.ladder.rtype(),
            base32: false,
            down: self.sizes.down(),
            edns: self.sizes.edns(),
            prompt,
        }
    }

    /// A minimal query to resolver `i`, set aside: does it answer at all?
    fn try_resolver(&mut self, now: Instant, i: usize) -> Option<(usize, Query)> {
        let spec = Spec {
            resolver: i,
            purpose: Purpose::Try,
            reask: None,
            rtype: AnswerType::Txt,
            base32: true,
            down: CLASSIC_SIZE,
            edns: None,
            prompt: true,
        };
        self.make_query(now, spec)
    }

    /// A probe of a size, as a bare poll with padding, to `i`.
    fn size_probe_query(&mut self, now: Instant, i: usize, probe: Probe) -> Option<(usize, Query)> {
        let mut spec = self.spec(i, Purpose::Size(probe));
        spec.base32 = true;
        if let Probe::Down(size) = probe {
            spec.down = usize::from(size);
            spec.edns = (spec.down > CLASSIC_SIZE).then_some(size);
        } else {
            // Answers to name and option probes stay small.
            spec.down = CLASSIC_SIZE;
            spec.edns = self.sizes.edns().map(|_| CLASSIC_SIZE as u16);
        }
        let q = self.make_query(now, spec)?;
        self.size_probe = Some(q.1.id);
        self.sizes.probe_sent();
        Some(q)
    }

    /// The upstream payload of a query: its name's part and its option's.
    fn payload(&self, spec: &Spec, qseq: u64, encoding: NameEncoding) -> (Vec<u8>, Vec<u8>) {
        let mut name = vec![0u8; UP_HEADER_LEN];
        let mut header = UpHeader {
            tag: self.tag,
            prompt: spec.prompt,
            qseq: qseq as u16,
            down_limit: spec.down,
            auth: [0; POLL_AUTH_LEN],
        };
        if let Some((_, key)) = &self.poll_key {
            header.authenticate(key, qseq);
        }
        header.emit(&mut name);
        let mut option = Vec::new();
        match &spec.purpose {
            Purpose::Data(Some(f)) if f.bytes.len() > self.name_room(encoding) => {
                option.extend_from_slice(&f.bytes);
            }
            Purpose::Data(Some(f)) => name.extend_from_slice(&f.bytes),
            Purpose::Size(Probe::NameLen(len)) => {
                let room = self.domain.upstream_capacity_as(*len, encoding);
                super::emit_padding(&mut name, room.saturating_sub(UP_HEADER_LEN), 0);
            }
            Purpose::Size(Probe::Down(_)) => {
                super::emit_padding(&mut name, PADDING_HEADER_LEN, PAD_ANSWER);
            }
            Purpose::Size(Probe::Option(len)) => super::emit_padding(&mut option, *len, 0),
            Purpose::Data(None) | Purpose::Poll | Purpose::Try => {}
        }
        (name, option)
    }

    /// Fragment bytes that fit the name in `encoding`.
    fn name_room(&self, encoding: NameEncoding) -> usize {
        self.sizes
            .name_capacity(&self.domain, encoding)
            .saturating_sub(UP_HEADER_LEN)
    }

    /// Build and record one query.
    fn make_query(&mut self, now: Instant, spec: Spec) -> Option<(usize, Query)> {
        let qseq = spec.reask.unwrap_or(self.qseq);
        let regular = matches!(spec.purpose, Purpose::Data(_) | Purpose::Poll) && !spec.base32;
        // Probe base128 with this query? (A fragment sized for base32 fits:
        // base128 carries more.)
        let probe_encoding = regular && self.ladder.encoding_probe_due(now, self.good_in_row);
        let encoding = if spec.base32 {
            NameEncoding::Base32
        } else if probe_encoding {
            NameEncoding::Base128
        } else {
            self.ladder.encoding()
        };
        let (name_part, option) = self.payload(&spec, qseq, encoding);
        // A fragment split for base128 before a fallback still goes in it.
        let base32_room = self.sizes.name_capacity(&self.domain, NameEncoding::Base32);
        let encoding = if name_part.len() > base32_room && !spec.base32 {
            NameEncoding::Base128
        } else {
            encoding
        };
        // Probe a better record type with this query? (Not one that probes
        // the encoding: a failure must say which one failed.)
        let type_probe = if regular && !probe_encoding {
            self.ladder.type_to_probe(now, self.good_in_row)
        } else {
            None
        };
        let rtype = type_probe.unwrap_or(spec.rtype);
        let Ok(name) = encode_name_as(&self.domain, &name_part, encoding) else {
            self.stats.lost += 1;
            return None;
        };
        let mut id = next_random(&mut self.rng) as u16;
        while self.in_flight.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        let bytes = build_query_with(id, &name, rtype, spec.edns, &option).ok()?;
        if spec.reask.is_none() {
            self.qseq = self.qseq.wrapping_add(1);
        }
        self.stats.queries += 1;
        if probe_encoding {
            self.ladder.encoding_probe_sent(id);
        }
        if let Some(t) = type_probe {
            self.ladder.type_probe_sent(id, t);
        }
        let load = match spec.purpose {
            Purpose::Data(_) => Some(Load::Data),
            Purpose::Poll | Purpose::Size(_) => Some(Load::Poll),
            Purpose::Try => None,
        };
        match load {
            Some(load) => self
                .resolvers
                .sent(spec.resolver, now, load, id, spec.prompt),
            None => self.resolvers.trying(spec.resolver, now, id),
        }
        let purpose = match spec.purpose {
            Purpose::Data(Some(mut f)) => {
                self.stats.data_queries += 1;
                if f.tries > 0 {
                    self.stats.retried += 1;
                }
                f.tries += 1;
                Purpose::Data(Some(f))
            }
            p => p,
        };
        let name_len = name.len().saturating_sub(1);
        if matches!(purpose, Purpose::Poll) && spec.prompt {
            self.prompt_polls += 1;
        }
        self.in_flight.insert(
            id,
            InFlight {
                resolver: spec.resolver,
                name,
                qseq,
                sent: now,
                purpose,
                load,
                given_up: false,
                aside: false,
                overdue: false,
                prompt: spec.prompt,
                reask: spec.reask.is_some(),
                name_len,
                down: spec.down,
                option: !option.is_empty(),
                rtype,
            },
        );
        Some((spec.resolver, Query { id, bytes }))
    }

    /// A datagram from resolver `resolver`. Complete downstream messages
    /// come out of [`DnsClient::poll_message`].
    pub fn handle_response(
        &mut self,
        now: Instant,
        resolver: usize,
        bytes: &[u8],
    ) -> Result<(), DropReason> {
        self.now = Some(now);
        let Some(&[hi, lo]) = bytes.first_chunk::<2>() else {
            self.stats.unexpected += 1;
            return Err(DropReason::Malformed);
        };
        let id = u16::from_be_bytes([hi, lo]);
        let Some(q) = self.in_flight.get(&id).filter(|q| q.resolver == resolver) else {
            self.stats.unexpected += 1;
            return Err(DropReason::UnexpectedResponse);
        };
        let answer = match parse_answer(id, &q.name, q.rtype, &self.domain, bytes) {
            Ok(a) => a,
            Err(e) => {
                self.stats.unexpected += 1;
                return Err(e);
            }
        };
        let q = self.in_flight.remove(&id).expect("checked");
        self.settled(&q);
        self.stats.answers += 1;
        if q.given_up {
            self.late(now, id, q, answer);
        } else {
            self.answered(now, id, q, answer, bytes.len());
        }
        Ok(())
    }

    /// A late answer to a query given up on: its data still counts, and
    /// its resolver is alive (the loss was counted already).
    fn late(&mut self, now: Instant, id: u16, q: InFlight, answer: Answer) {
        self.resolvers
            .answered(q.resolver, now, id, (None, None), (None, false));
        if let Answer::Data(p) = answer
            && let Some((_, pieces)) = DownHeader::parse(&p)
        {
            for f in super::fragments(pieces).map_while(Result::ok) {
                if let Some(m) = self.reassembler.push(now, (), f) {
                    self.delivered.push_back(m.to_vec());
                }
            }
        }
    }

    /// What an answer (not an error code) says about the resolver, the
    /// probes and the path.
    fn answered(&mut self, now: Instant, id: u16, mut q: InFlight, answer: Answer, len: usize) {
        let header = match &answer {
            Answer::Data(p) => DownHeader::parse(p).map(|(h, _)| h),
            _ => None,
        };
        let answer = match (answer, header) {
            (Answer::Data(_), None) => Answer::Garbled, // too short for a header
            (a, _) => a,
        };
        self.account(now, id, &mut q, &answer, header);
        if self.probe_answered(now, id, &mut q, &answer, header, len) {
            return;
        }
        let current = q.rtype == self.ladder.rtype();
        match answer {
            Answer::Data(payload) => {
                let (header, pieces) = DownHeader::parse(&payload).expect("checked above");
                let mut carried = false;
                for f in super::fragments(pieces) {
                    let Ok(f) = f else { break };
                    carried = true;
                    if let Some(m) = self.reassembler.push(now, (), f) {
                        self.delivered.push_back(m.to_vec());
                    }
                }
                if current {
                    self.ladder.type_works();
                }
                self.sizes.answered(q.name_len, len);
                self.success(&q, carried, header);
            }
            Answer::Empty | Answer::Garbled => {
                // The server always answers with a record of the type
                // asked: the path strips or alters them, or (NODATA) the
                // server could not read a base128 name.
                self.good_in_row = 0;
                if answer == Answer::Empty && base128_name(&q.name) {
                    // (Once, not again for the base128 queries in flight.)
                    if self.ladder.encoding() == NameEncoding::Base128 {
                        self.ladder.encoding_failed(now);
                    }
                } else if current {
                    self.ladder.type_failed(now);
                }
                self.retry(now, &mut q);
            }
            Answer::Truncated => {
                // The query got through; the answer did not fit the path.
                self.stats.truncated += 1;
                self.sizes.truncated(now, q.down);
                // The server still has the answer: ask for it again, now
                // smaller (the same qseq: a retry to the server).
                if q.down > CLASSIC_SIZE && !q.reask {
                    self.reask.push_back(q.qseq);
                }
            }
            Answer::ServerFailure => {
                self.stats.servfails += 1;
                self.failure(now, id, q, Failure::ServFail);
            }
            Answer::Refused => {
                self.stats.refused += 1;
                if current {
                    self.ladder.type_failed(now);
                }
                self.failure(now, id, q, Failure::Refused);
            }
            Answer::Other(1 | 4) => {
                // FORMERR, NOTIMP: something in the query is not accepted.
                self.stats.errors += 1;
                self.not_accepted(now, &q, current);
                self.failure(now, id, q, Failure::Other);
            }
            Answer::NameError | Answer::Other(_) => {
                self.stats.errors += 1;
                if answer == Answer::NameError && base128_name(&q.name) {
                    // A name the server could not read (an altered one
                    // reads as no tunnel data below the apex: NXDOMAIN).
                    if self.ladder.encoding() == NameEncoding::Base128 {
                        self.ladder.encoding_failed(now);
                    }
                } else if current {
                    self.ladder.type_failed(now);
                }
                self.failure(now, id, q, Failure::Other);
            }
        }
    }

    /// The answer to `q` for its resolver's standing and controller (done
    /// here for every answer, once): an error code is a failure, anything
    /// else an answer.
    fn account(
        &mut self,
        now: Instant,
        id: u16,
        q: &mut InFlight,
        answer: &Answer,
        header: Option<DownHeader>,
    ) {
        let sent = q.purpose_counts().then_some(q.sent);
        let counted = (q.load.take(), sent);
        let how = match answer {
            Answer::ServerFailure | Answer::Refused => Some(Failed::Rejected),
            Answer::NameError | Answer::Other(_) => Some(Failed::Error),
            _ => None,
        };
        let back = match how {
            Some(how) => self.resolvers.failed(q.resolver, now, id, counted, how),
            None => {
                let rtt = match header {
                    Some(h) if !h.held => Some(now.saturating_duration_since(q.sent)),
                    _ => None,
                };
                let back = self
                    .resolvers
                    .answered(q.resolver, now, id, counted, (rtt, q.overdue));
                // Back after silence, at its first try (a minimal query), and
                // it answered with data: what the client sent before did not
                // pass.
                back.filter(|&(first, why)| first && why == Aside::Silent)
                    .inspect(|_| self.resolver_back(now))
            }
        };
        let _ = back;
    }

    /// FORMERR or NOTIMP to `q`: blame the newest thing in it the path may
    /// not take: the option, a long name, EDNS0, else the record type.
    fn not_accepted(&mut self, now: Instant, q: &InFlight, current: bool) {
        if q.option {
            self.sizes.silent_step(now);
        } else if q.name_len > self.sizes.known_good().max(self.sizes.min_name_len()) {
            self.sizes.long_failed(now, q.name_len);
        } else if q.down > CLASSIC_SIZE {
            self.sizes.edns_refused(now, q.down);
        } else if current {
            self.ladder.type_failed(now);
        }
    }

    /// Handle the answer to a probe (encoding, type or size); whether the
    /// answer is done with (the probe's own failure, nothing else's).
    fn probe_answered(
        &mut self,
        now: Instant,
        id: u16,
        q: &mut InFlight,
        answer: &Answer,
        header: Option<DownHeader>,
        len: usize,
    ) -> bool {
        if let Purpose::Size(p) = q.purpose {
            self.size_probe = None;
            match (answer, header) {
                (Answer::Data(_), Some(h)) => {
                    self.sizes
                        .probe_answered(now, p, q.name_len, len, h.option_read);
                }
                _ => self.sizes.probe_failed(now, p, q.name_len),
            }
            return false;
        }
        if let Some(t) = self.ladder.take_type_probe(id) {
            if intact(answer) {
                self.ladder.switch_type(t);
            } else {
                self.ladder.type_probe_failed(now, t);
                self.good_in_row = 0;
                if !matches!(
                    answer,
                    Answer::ServerFailure | Answer::Truncated | Answer::Data(_)
                ) {
                    // The probed type's fault and nothing else's: its
                    // fragment goes again, at no cost of a try.
                    self.requeue_free(q);
                    return true;
                }
            }
        }
        if self.ladder.take_encoding_probe(id) {
            // Only a data answer says the server decoded the name: NODATA
            // comes for names it could not read.
            if matches!(answer, Answer::Data(_)) {
                self.ladder.encoding_works();
            } else {
                self.ladder.encoding_failed(now);
                if matches!(answer, Answer::Empty) {
                    // Its fragment goes again, in base32, at no cost of a try.
                    self.requeue_free(q);
                    self.good_in_row = 0;
                    return true;
                }
            }
        }
        false
    }

    /// `q`'s fragment to the front of the queue, its try not counted.
    fn requeue_free(&mut self, q: &mut InFlight) {
        if let Purpose::Data(f) = &mut q.purpose
            && let Some(mut f) = f.take()
        {
            f.tries -= 1;
            self.frags.push_front(f);
        }
    }

    /// A resolver set aside for silence answered its first try (a minimal
    /// query) at once: something the client sends now does not pass that
    /// the try did. Step the newest down.
    fn resolver_back(&mut self, now: Instant) {
        self.stats.fallbacks += 1;
        if self.ladder.encoding() == NameEncoding::Base128 {
            self.ladder.encoding_failed(now);
        } else if self.ladder.above_txt() || !self.sizes.silent_step(now) {
            // Below TXT the size steps first; the type when it cannot.
            self.ladder.step_type_down(now);
        }
    }

    fn success(&mut self, q: &InFlight, carried: bool, header: DownHeader) {
        if carried {
            self.stats.data_answers += 1;
        }
        self.good_in_row = self.good_in_row.saturating_add(1);
        self.failures_in_row = 0;
        if q.name_len > self.sizes.min_name_len() {
            self.long_failures = 0;
        }
        self.backlog = usize::from(header.backlog);
        // Polls: one more while answers bring data and more waits, one
        // fewer for each held to its end without data.
        let most = self.resolvers.total_window().clamp(MIN_POLLS, MAX_POLLS);
        if carried && header.backlog > 0 {
            self.poll_target = (self.poll_target + 1).min(most);
        } else if header.held && !carried {
            self.poll_target = self.poll_target.saturating_sub(1).max(MIN_POLLS);
        }
        self.poll_target = self.poll_target.min(most);
    }

    fn failure(&mut self, now: Instant, id: u16, mut q: InFlight, kind: Failure) {
        self.good_in_row = 0;
        if self.last_failure.is_none_or(|t| q.sent >= t) {
            self.last_failure = Some(now);
            self.failures_in_row = self.failures_in_row.saturating_add(1);
        }
        if self.ladder.take_encoding_probe(id) {
            self.ladder.encoding_failed(now);
        }
        if let Some(t) = self.ladder.take_type_probe(id) {
            self.ladder.type_probe_failed(now, t);
        }
        if let Purpose::Size(p) = q.purpose
            && self.size_probe == Some(id)
        {
            self.size_probe = None;
            self.sizes.probe_failed(now, p, q.name_len);
        }
        // Long names failing while shorter ones pass.
        if matches!(kind, Failure::Timeout | Failure::ServFail)
            && q.name_len > self.sizes.known_good().max(self.sizes.min_name_len())
            && matches!(q.purpose, Purpose::Data(_))
        {
            self.long_failures += 1;
            if self.long_failures >= LONG_FAILURES && self.sizes.long_failed(now, q.name_len) {
                self.long_failures = 0;
            }
        }
        // An answer was accounted for on arrival; a timeout is here.
        if kind == Failure::Timeout {
            let sent = q.loss_counts().then_some(q.sent);
            let counted = (q.load.take(), sent);
            self.resolvers
                .failed(q.resolver, now, id, counted, Failed::Lost);
        }
        self.retry(now, &mut q);
    }

    /// `q`'s fragment again, if still fresh.
    fn retry(&mut self, now: Instant, q: &mut InFlight) {
        if let Purpose::Data(f) = &mut q.purpose
            && let Some(f) = f.take()
        {
            self.retry_fragment(now, f);
        }
    }

    /// A fragment whose query failed: again, if still fresh.
    fn retry_fragment(&mut self, now: Instant, f: UpFrag) {
        if f.tries < MAX_TRIES && now.saturating_duration_since(f.born) < RETRY_WINDOW {
            self.frags.push_front(f);
        } else {
            self.stats.lost += 1;
        }
    }

    /// The next complete downstream message.
    pub fn poll_message(&mut self) -> Option<Vec<u8>> {
        self.delivered.pop_front()
    }

    /// When [`DnsClient::handle_timeout`] (or [`DnsClient::poll_query`])
    /// wants calling.
    pub fn next_timeout(&self) -> Option<Instant> {
        let now = self.now?;
        let mut t: Option<Instant> = None;
        let mut at = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        for i in 0..self.resolvers.len() {
            at(self.resolvers.loss_due(i));
            at(self.resolvers.overdue_due(i));
            at(self.resolvers.silence_due(i));
        }
        at(self.resolvers.next_retry());
        if self.has_data() {
            at(self.resolvers.next_send(now, Load::Data));
        }
        if self.resolvers.in_flight(Load::Poll) < self.poll_target() {
            at(self.resolvers.next_send(now, Load::Poll));
        }
        at(self.reassembler.next_timeout());
        at(self.messages.front().map(|(t, _)| *t + MAX_UP_WAIT));
        t
    }

    /// Time passed: queries lost, resolvers set aside, fragments expired.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = Some(now);
        self.expire(now);
        self.reassembler.expire(now);
    }

    fn expire(&mut self, now: Instant) {
        while self
            .messages
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= MAX_UP_WAIT)
        {
            self.messages.pop_front();
            self.stats.lost += 1;
        }
        for i in 0..self.resolvers.len() {
            self.expire_resolver(now, i);
        }
        self.sweep(now);
    }

    /// Queries of resolver `i` overdue or lost; `i` set aside if silent or
    /// sick.
    fn expire_resolver(&mut self, now: Instant, i: usize) {
        loop {
            let in_flight = &self.in_flight;
            let counted = |id: u16, at: Instant| {
                in_flight
                    .get(&id)
                    .is_some_and(|q| q.sent == at && q.load.is_some())
            };
            let Some((due, id)) = self.resolvers.next_overdue(i, counted) else {
                break;
            };
            if now < due {
                break;
            }
            let q = self.in_flight.get_mut(&id).expect("counted");
            let load = q.load.take().expect("counted");
            q.overdue = true;
            if q.purpose_counts() {
                self.resolvers.overdue(i, now, load, q.sent);
            }
        }
        loop {
            let in_flight = &self.in_flight;
            let alive = |id: u16, at: Instant| {
                in_flight
                    .get(&id)
                    .is_some_and(|q| q.sent == at && !q.given_up)
            };
            let Some((due, id)) = self.resolvers.next_loss(i, alive) else {
                break;
            };
            if now < due {
                break;
            }
            let mut q = self.in_flight.remove(&id).expect("alive");
            self.settled(&q);
            self.stats.timeouts += 1;
            let late = InFlight {
                purpose: Purpose::Poll,
                load: None,
                given_up: true,
                name: q.name.clone(),
                ..q.shell()
            };
            q.given_up = true;
            self.failure(now, id, q, Failure::Timeout);
            // Listed on: a late answer still brings its data.
            self.in_flight.insert(id, late);
        }
        if let Some(why) = self.resolvers.verdict(i, now) {
            self.set_aside(now, i, why);
        }
    }

    /// Forget queries given up on long ago (a few times a second).
    fn sweep(&mut self, now: Instant) {
        if self
            .swept
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_millis(250))
        {
            return;
        }
        self.swept = Some(now);
        self.in_flight
            .retain(|_, q| !(q.given_up && now.saturating_duration_since(q.sent) >= QUERY_TIMEOUT));
        self.recount_prompt_polls();
    }

    fn recount_prompt_polls(&mut self) {
        self.prompt_polls = self
            .in_flight
            .values()
            .filter(|q| q.is_prompt_poll())
            .count();
    }

    /// `q` is answered or given up on: no longer a prompt poll in flight.
    fn settled(&mut self, q: &InFlight) {
        if q.is_prompt_poll() {
            self.prompt_polls = self.prompt_polls.saturating_sub(1);
        }
    }

    /// Set resolver `i` aside: its queries' fragments go again through the
    /// others; its polls are no longer counted.
    fn set_aside(&mut self, now: Instant, i: usize, why: Aside) {
        self.resolvers.set_aside(i, now, why);
        self.stats.set_asides += 1;
        let mut frags = Vec::new();
        for q in self.in_flight.values_mut().filter(|q| q.resolver == i) {
            q.load = None;
            q.given_up = true;
            q.aside = true;
            if let Purpose::Data(f) = &mut q.purpose
                && let Some(f) = f.take()
            {
                frags.push(f);
            }
            if let Purpose::Size(_) = q.purpose {
                self.size_probe = None;
            }
        }
        // Its prompt polls are given up on.
        self.recount_prompt_polls();
        frags.sort_by_key(|f| std::cmp::Reverse(f.born));
        for f in frags {
            self.retry_fragment(now, f);
        }
    }

    fn next_fragment(&mut self, now: Instant) -> Option<UpFrag> {
        let max = self.fragment_len();
        // Fragments split before a fallback still go if they fit what the
        // path may carry (base128 names, unless base128 has failed since).
        let max_any = max.max(if self.ladder.base128_ok() {
            self.name_room(NameEncoding::Base128)
        } else {
            0
        });
        loop {
            if let Some(f) = self.frags.pop_front() {
                if f.bytes.len() <= max_any {
                    return Some(f);
                }
                self.stats.lost += 1; // made for longer names
                continue;
            }
            let (_, m) = self.messages.pop_front()?;
            match self.fragmenter.split(&m, max) {
                Ok(split) => {
                    for f in split.fragments() {
                        let mut bytes = vec![0; f.wire_len()];
                        f.emit(&mut bytes).expect("sized");
                        self.frags.push_back(UpFrag {
                            bytes,
                            born: now,
                            tries: 0,
                        });
                    }
                }
                Err(_) => self.stats.lost += 1,
            }
        }
    }
}

/// A data answer whose header and fragments all parse: the path carried it
/// intact.
fn intact(answer: &Answer) -> bool {
    match answer {
        Answer::Data(p) => DownHeader::parse(p)
            .is_some_and(|(_, pieces)| super::fragments(pieces).all(|f| f.is_ok())),
        _ => false,
    }
}

/// Whether `name` is written in base128 (its first label starts with the
/// marker).
fn base128_name(name: &Name) -> bool {
    name.iter().next().and_then(<[u8]>::first) == Some(&BASE128_MARKER)
}

fn next_random(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

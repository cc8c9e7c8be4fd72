//! The client side of the DNS transport: queries out through a recursive
//! resolver, answers in. See the [module docs](super) for the formats.
//!
//! Driving it:
//!
//! ```text
//! uplink.send(now, message)                 // every message the engine emits
//! while let Some(q) = uplink.poll_query(now) { socket.send_to(q.bytes, resolver) }
//! uplink.handle_response(now, bytes)        // every datagram from the resolver
//! while let Some(m) = uplink.poll_message() { engine.handle_datagram(now, &m, ..) }
//! uplink.handle_timeout(now)                // when next_timeout() passes
//! ```
//!
//! Pacing: the client keeps `target` queries in flight (bare polls fill up
//! to it), doubling it while answers bring data and lowering it by one per
//! empty answer, between [`MIN_IN_FLIGHT`] and a congestion window. The
//! window grows by one per window of answered queries and halves (at most
//! once per round trip) on SERVFAIL, REFUSED, NXDOMAIN or a timeout, which
//! also start an exponential back-off ([`BACKOFF_MIN`]..[`BACKOFF_MAX`])
//! during which no query is sent. On average at most [`MAX_RATE`] queries
//! a second, in bursts of at most [`MAX_IN_FLIGHT`] (a token bucket: timers
//! tick in milliseconds, so a fixed gap between queries would cap far lower
//! than intended).
//!
//! Path parameters: it starts with EDNS0 at 1232 and names of up to 253
//! characters. TC in an answer, or FORMERR/NOTIMP to a short query, turns
//! EDNS0 off (answers of 512 bytes); FORMERR to a long query, or long
//! queries failing while short ones get through, shortens names to
//! [`SHORT_NAME_LEN`]; [`FALLBACK_AFTER_TIMEOUTS`] timeouts in a row step
//! down one of the two. After [`REPROBE_MIN`] (doubling up to
//! [`REPROBE_MAX`] while probes fail) the full parameters are tried again.
//!
//! Encoding: names start in base32, which always works. After
//! [`PROBE_ENCODING_AFTER`] answers in a row, outside any fallback, the next
//! query goes out in base128 (7 bits per character, 8-bit label bytes):
//! when a TXT answer for it comes back (the server decoded it), upstream
//! switches to base128 (about 40% more per query); when it fails (an error
//! code, NODATA, a timeout, a mangled name), base32 stays, and the probe is
//! tried again after [`REPROBE_MIN`], doubling up to [`REPROBE_MAX`]. Every
//! fallback of the path parameters also returns to base32, and a run of
//! timeouts in base128 drops the encoding first.
//!
//! Record types ([`AnswerType`], most preferred first: NULL, TXT, CNAME,
//! MX, SRV, AAAA, A): it starts on TXT. After [`PROBE_TYPE_AFTER`] answers
//! in a row, one query (never the base128 probe) asks for the most
//! preferred type above the one in use that is not backing off; an answer
//! of that type whose fragments all parse switches to it, anything else
//! backs that type off ([`REPROBE_MIN`] doubling up to [`REPROBE_MAX`]).
//! [`TYPE_FAILURES`] failures in a row of the type in use (REFUSED,
//! NXDOMAIN, NODATA, garbled records, FORMERR/NOTIMP that neither a long
//! name nor EDNS0 explains; NODATA to a base128 name drops base128 instead)
//! step it down to the next type below that is not
//! backing off, so a path that filters TXT still works and one that loses
//! NULL falls back to TXT until a probe finds NULL again. A run of timeouts
//! steps NULL down right after base128, and any type once EDNS0 and long
//! names are gone too (a path may drop a type silently).
//!
//! Upstream fragments whose query failed are sent again only within
//! [`RETRY_WINDOW`] of the first try (and at most [`MAX_TRIES`] times):
//! after that the inner protocol's own recovery is faster.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::{CLASSIC_SIZE, EDNS_SIZE, UP_HEADER_LEN, UpHeader};
use crate::DropReason;
use crate::frag::{Fragmenter, Limits, Reassembler};
use crate::wire::dns::{
    Answer, AnswerType, BASE128_MARKER, Domain, MAX_NAME_LEN, Name, NameEncoding, build_query_as,
    encode_name_as, parse_answer,
};

/// The fewest queries in flight (idle).
pub const MIN_IN_FLIGHT: usize = 2;
/// The most queries in flight.
pub const MAX_IN_FLIGHT: usize = 32;
/// A query unanswered this long is lost: the server's hold plus room for
/// the resolver's own retries.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// The most queries a second, on average: polite to a resolver (unbound
/// serves tens of thousands), and room for several Mbit/s.
pub const MAX_RATE: f64 = 8000.0;
/// The first back-off after a failure.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest back-off.
pub const BACKOFF_MAX: Duration = Duration::from_secs(8);
/// The name length used after falling back (resolvers and middleboxes that
/// refuse long names usually allow about 100 characters).
pub const SHORT_NAME_LEN: usize = 96;
/// Timeouts in a row that step the path parameters down.
pub const FALLBACK_AFTER_TIMEOUTS: u32 = 6;
/// Long-name failures (with short names getting through) that shorten names.
pub const LONG_FAILURES: u32 = 2;
/// First wait before trying the full parameters again.
pub const REPROBE_MIN: Duration = Duration::from_secs(30);
/// Longest wait between probes.
pub const REPROBE_MAX: Duration = Duration::from_secs(600);
/// A failed fragment is sent again only this soon after its first try.
pub const RETRY_WINDOW: Duration = Duration::from_millis(2500);
/// Tries per fragment.
pub const MAX_TRIES: u8 = 2;
/// Answers in a row (outside a fallback) before base128 is probed.
pub const PROBE_ENCODING_AFTER: u32 = 8;
/// Answers in a row before a better record type is probed.
pub const PROBE_TYPE_AFTER: u32 = 8;
/// Failures in a row of the record type in use (REFUSED, NOTIMP, NODATA, a
/// garbled answer...) that step it down the ladder.
pub const TYPE_FAILURES: u32 = 3;
/// Upstream messages waiting to be split; more are dropped.
pub const MAX_UP_QUEUE: usize = 64;
/// Partial downstream messages are dropped this long after their first fragment.
pub const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(3);

/// A query to send to the resolver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// The DNS message id.
    pub id: u16,
    /// The DNS message.
    pub bytes: Vec<u8>,
}

/// What the status shows of the DNS path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathInfo {
    /// How upstream bytes are encoded in names.
    pub encoding: &'static str,
    /// The record type of queries and answers.
    pub record_type: &'static str,
    /// The EDNS0 size advertised, `None` without EDNS0 (512-byte answers).
    pub edns_size: Option<u16>,
    /// The longest query name in use.
    pub max_name_len: usize,
    /// Upstream fragment bytes per query.
    pub upstream_fragment: usize,
    /// Largest answer the client takes.
    pub downstream_limit: usize,
    /// Queries in flight now.
    pub in_flight: usize,
    /// Queries the client wants in flight.
    pub target: usize,
    /// The congestion window.
    pub window: usize,
    /// The current back-off (zero when none).
    pub backoff: Duration,
    /// Counters.
    pub stats: UplinkStats,
}

/// Counters of the uplink.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UplinkStats {
    /// Queries sent (data and polls).
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
    /// the path after a fallback, queue full).
    pub lost: u64,
    /// Times the path parameters stepped down.
    pub fallbacks: u64,
    /// Times the full parameters were tried again.
    pub reprobes: u64,
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
    /// Responses that matched no query in flight, or did not parse.
    pub unexpected: u64,
}

struct UpFrag {
    bytes: Vec<u8>,
    born: Instant,
    tries: u8,
}

struct InFlight {
    id: u16,
    name: Name,
    qseq: u16,
    /// A re-ask of an answer that came truncated.
    reask: bool,
    sent: Instant,
    frag: Option<UpFrag>,
    long: bool,
    edns: bool,
    /// The record type asked for.
    rtype: AnswerType,
}

enum Failure {
    Timeout,
    ServFail,
    Refused,
    Other,
}

/// The client's DNS uplink: see the module docs.
pub struct DnsUplink {
    domain: Domain,
    tag: u32,
    rng: u64,
    qseq: u16,
    fragmenter: Fragmenter,
    messages: VecDeque<Vec<u8>>,
    frags: VecDeque<UpFrag>,
    reassembler: Reassembler<()>,
    delivered: VecDeque<Vec<u8>>,
    in_flight: HashMap<u16, InFlight>,
    /// Queries whose answer came truncated, to ask again for less.
    reask: VecDeque<u16>,
    target: usize,
    window: usize,
    acked: usize,
    /// Tokens for [`MAX_RATE`], and when they were counted.
    tokens: f64,
    tokens_at: Option<Instant>,
    backoff: Duration,
    backoff_until: Option<Instant>,
    last_cut: Option<Instant>,
    edns: bool,
    long_names: bool,
    timeouts_in_row: u32,
    long_failures: u32,
    short_ok: bool,
    reprobe_at: Option<Instant>,
    reprobe_wait: Duration,
    last_reprobe: Option<Instant>,
    /// How names are encoded now.
    encoding: NameEncoding,
    /// Answers in a row.
    good_in_row: u32,
    /// Base128 answered its last probe (and failed none since).
    base128_ok: bool,
    /// The base128 probe in flight (its DNS id).
    encoding_probe: Option<u16>,
    /// No base128 probe before then (the last one failed).
    encoding_retry_at: Option<Instant>,
    encoding_wait: Duration,
    /// The record type of queries and answers now.
    rtype: AnswerType,
    /// The record type probe in flight: its DNS id and the type.
    type_probe: Option<(u16, AnswerType)>,
    /// Per type (in [`AnswerType::ALL`] order): no probe before then, and
    /// the wait after its next failure.
    type_retry_at: [Option<Instant>; 7],
    type_wait: [Duration; 7],
    /// Failures in a row of the type in use.
    type_failures_in_row: u32,
    /// Failed queries (timeouts, error codes) since the last answer.
    failures_in_row: u32,
    /// Keep bare polls outstanding (the path is in use); else send only
    /// queries that carry data.
    polling: bool,
    stats: UplinkStats,
}

impl DnsUplink {
    /// An uplink to the server of `domain`, as client `tag` (random, from
    /// the caller); `seed` seeds the DNS message ids and first message id.
    pub fn new(domain: Domain, tag: u32, seed: u64) -> Self {
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let first = next_random(&mut rng) as u16;
        Self {
            domain,
            tag,
            rng,
            qseq: next_random(&mut rng) as u16,
            fragmenter: Fragmenter::new(first),
            messages: VecDeque::new(),
            frags: VecDeque::new(),
            reassembler: Reassembler::new(Limits {
                timeout: REASSEMBLY_TIMEOUT,
                max_partials_per_key: 64,
                max_bytes: 1 << 20,
            }),
            delivered: VecDeque::new(),
            in_flight: HashMap::new(),
            reask: VecDeque::new(),
            target: MIN_IN_FLIGHT,
            window: MAX_IN_FLIGHT / 2,
            acked: 0,
            tokens: MAX_IN_FLIGHT as f64,
            tokens_at: None,
            backoff: Duration::ZERO,
            backoff_until: None,
            last_cut: None,
            edns: true,
            long_names: true,
            timeouts_in_row: 0,
            long_failures: 0,
            short_ok: false,
            reprobe_at: None,
            reprobe_wait: REPROBE_MIN,
            last_reprobe: None,
            encoding: NameEncoding::Base32,
            good_in_row: 0,
            base128_ok: false,
            encoding_probe: None,
            encoding_retry_at: None,
            encoding_wait: REPROBE_MIN,
            rtype: AnswerType::Txt,
            type_probe: None,
            type_retry_at: [None; 7],
            type_wait: [REPROBE_MIN; 7],
            type_failures_in_row: 0,
            failures_in_row: 0,
            polling: true,
            stats: UplinkStats::default(),
        }
    }

    /// Keep bare polls outstanding (the path is in use), or send only
    /// queries that carry data (a path kept in reserve).
    pub fn set_polling(&mut self, on: bool) {
        self.polling = on;
    }

    /// Queries that failed (timed out, or got an error code) since the
    /// last answer: a path whose resolver broke says so fast.
    pub fn failures_in_row(&self) -> u32 {
        self.failures_in_row
    }

    /// Bare polls to keep in flight.
    fn poll_target(&self) -> usize {
        if self.polling { self.target } else { 0 }
    }

    /// The client's tag.
    pub fn tag(&self) -> u32 {
        self.tag
    }

    /// The counters.
    pub fn stats(&self) -> UplinkStats {
        self.stats
    }

    /// The DNS path's parameters, for status.
    pub fn path_info(&self) -> PathInfo {
        PathInfo {
            encoding: self.encoding.as_str(),
            record_type: self.rtype.as_str(),
            edns_size: self.edns.then_some(EDNS_SIZE),
            max_name_len: self.max_name_len(),
            upstream_fragment: self.fragment_len(),
            downstream_limit: self.down_limit(),
            in_flight: self.in_flight.len(),
            target: self.target,
            window: self.window,
            backoff: self.backoff,
            stats: self.stats,
        }
    }

    /// The longest query name in use.
    pub fn max_name_len(&self) -> usize {
        if self.long_names {
            MAX_NAME_LEN
        } else {
            SHORT_NAME_LEN
        }
    }

    /// The largest answer we take.
    fn down_limit(&self) -> usize {
        if self.edns {
            usize::from(EDNS_SIZE)
        } else {
            CLASSIC_SIZE
        }
    }

    /// Fragment bytes (header included) one query carries.
    fn fragment_len(&self) -> usize {
        self.domain
            .upstream_capacity_as(self.max_name_len(), self.encoding)
            .saturating_sub(UP_HEADER_LEN)
    }

    /// Queue an upstream tunnel message.
    pub fn send(&mut self, now: Instant, message: &[u8]) {
        let _ = now;
        if self.messages.len() >= MAX_UP_QUEUE {
            self.stats.lost += 1;
            return;
        }
        self.messages.push_back(message.to_vec());
    }

    /// Whether there is upstream data waiting.
    pub fn has_data(&self) -> bool {
        !self.frags.is_empty() || !self.messages.is_empty() || !self.reask.is_empty()
    }

    fn refill(&mut self, now: Instant) {
        if let Some(at) = self.tokens_at {
            let earned = now.saturating_duration_since(at).as_secs_f64() * MAX_RATE;
            self.tokens = (self.tokens + earned).min(MAX_IN_FLIGHT as f64);
        }
        self.tokens_at = Some(now);
    }

    /// The next query to send, if pacing allows one now.
    pub fn poll_query(&mut self, now: Instant) -> Option<Query> {
        self.expire(now);
        if self.backoff_until.is_some_and(|t| now < t) {
            return None;
        }
        self.refill(now);
        if self.tokens < 1.0 {
            return None;
        }
        if self.in_flight.len() >= self.window {
            return None;
        }
        let reask = self.reask.pop_front();
        let frag = if reask.is_some() {
            None
        } else if self.has_data() {
            self.next_fragment(now)
        } else {
            None
        };
        if reask.is_none()
            && frag.is_none()
            && self.in_flight.len() >= self.poll_target().min(self.window)
        {
            return None;
        }
        let mut payload = vec![0u8; UP_HEADER_LEN];
        UpHeader {
            tag: self.tag,
            qseq: reask.unwrap_or(self.qseq),
            down_limit: self.down_limit(),
        }
        .emit(&mut payload);
        if let Some(f) = &frag {
            payload.extend_from_slice(&f.bytes);
        }
        // Probe base128 with this query? (Its fragment, sized for base32,
        // fits: base128 carries more.)
        let probe = self.encoding == NameEncoding::Base32
            && self.encoding_probe.is_none()
            && self.good_in_row >= PROBE_ENCODING_AFTER
            && self.reprobe_at.is_none()
            && self.encoding_retry_at.is_none_or(|t| now >= t);
        let base32_len = self
            .domain
            .upstream_capacity_as(self.max_name_len(), NameEncoding::Base32);
        let encoding = if probe || payload.len() > base32_len {
            NameEncoding::Base128
        } else {
            self.encoding
        };
        // Probe a better record type with this query? (Not one that probes
        // the encoding: a failure must say which one failed.)
        let type_probe = if probe { None } else { self.type_to_probe(now) };
        let rtype = type_probe.unwrap_or(self.rtype);
        let Ok(name) = encode_name_as(&self.domain, &payload, encoding) else {
            self.stats.lost += 1;
            return None;
        };
        let mut id = next_random(&mut self.rng) as u16;
        while self.in_flight.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        let bytes = build_query_as(id, &name, rtype, self.edns.then_some(EDNS_SIZE)).ok()?;
        let qseq = reask.unwrap_or(self.qseq);
        if reask.is_none() {
            self.qseq = self.qseq.wrapping_add(1);
        }
        self.tokens -= 1.0;
        self.stats.queries += 1;
        if probe {
            self.encoding_probe = Some(id);
            self.stats.encoding_probes += 1;
        }
        if let Some(t) = type_probe {
            self.type_probe = Some((id, t));
            self.stats.type_probes += 1;
        }
        let long = name.len() > SHORT_NAME_LEN + 1;
        if let Some(f) = &frag {
            self.stats.data_queries += 1;
            if f.tries > 0 {
                self.stats.retried += 1;
            }
        }
        self.in_flight.insert(
            id,
            InFlight {
                id,
                name,
                qseq,
                reask: reask.is_some(),
                sent: now,
                frag: frag.map(|mut f| {
                    f.tries += 1;
                    f
                }),
                long,
                edns: self.edns,
                rtype,
            },
        );
        Some(Query { id, bytes })
    }

    /// A datagram from the resolver. Complete downstream messages come out
    /// of [`DnsUplink::poll_message`].
    pub fn handle_response(&mut self, now: Instant, bytes: &[u8]) -> Result<(), DropReason> {
        let Some(&[hi, lo]) = bytes.first_chunk::<2>() else {
            self.stats.unexpected += 1;
            return Err(DropReason::Malformed);
        };
        let id = u16::from_be_bytes([hi, lo]);
        let Some(q) = self.in_flight.get(&id) else {
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
        let mut q = self.in_flight.remove(&id).expect("checked");
        self.stats.answers += 1;
        if let Some((_, t)) = self.type_probe.filter(|&(p, _)| p == id) {
            self.type_probe = None;
            if intact(&answer) {
                self.switch_type(t);
            } else {
                self.type_probe_failed(now, t);
                self.good_in_row = 0;
                if !matches!(
                    answer,
                    Answer::ServerFailure | Answer::Truncated | Answer::Data(_)
                ) {
                    // The probed type's fault and nothing else's: its
                    // fragment goes again, at no cost of a try.
                    if let Some(mut f) = q.frag.take() {
                        f.tries -= 1;
                        self.frags.push_front(f);
                    }
                    return Ok(());
                }
            }
        }
        // Whether this answer says the type in use fails.
        let current = q.rtype == self.rtype;
        if self.encoding_probe == Some(id) {
            // Only a TXT answer says the server decoded the name: NODATA
            // comes for names it could not read.
            self.encoding_probe = None;
            if matches!(answer, Answer::Data(_)) {
                self.encoding = NameEncoding::Base128;
                self.base128_ok = true;
                self.encoding_wait = REPROBE_MIN;
                self.encoding_retry_at = None;
            } else {
                self.encoding_failed(now);
                if matches!(answer, Answer::Empty) {
                    // NODATA: the server could not read the name. Its
                    // fragment goes again, in base32, at no cost of a try.
                    if let Some(mut f) = q.frag {
                        f.tries -= 1;
                        self.frags.push_front(f);
                    }
                    self.good_in_row = 0;
                    return Ok(());
                }
            }
        }
        match answer {
            Answer::Data(payload) => {
                let mut carried = false;
                for f in super::fragments(&payload) {
                    let Ok(f) = f else { break };
                    carried = true;
                    if let Some(m) = self.reassembler.push(now, (), f) {
                        self.delivered.push_back(m.to_vec());
                    }
                }
                if current {
                    self.type_failures_in_row = 0;
                }
                self.success(&q, carried);
            }
            Answer::Empty | Answer::Garbled => {
                // The server always answers with a record of the type
                // asked: the path strips or alters them, or (NODATA) the
                // server could not read a base128 name.
                self.good_in_row = 0;
                let base128 = q.name.iter().next().and_then(<[u8]>::first) == Some(&BASE128_MARKER);
                if answer == Answer::Empty && base128 {
                    // (Once, not again for the base128 queries in flight.)
                    if self.encoding == NameEncoding::Base128 {
                        self.encoding_failed(now);
                    }
                } else if current {
                    self.type_failed(now);
                }
                if let Some(f) = q.frag.take() {
                    self.retry_fragment(now, f);
                }
            }
            Answer::Truncated => {
                // The query got through; the answer did not fit the path.
                self.stats.truncated += 1;
                if q.edns && self.edns {
                    self.edns = false;
                    self.fell_back(now);
                }
                // The server still has the answer: ask for it again, now
                // within 512 bytes (the same qseq: a retry to the server).
                if q.edns && !q.reask {
                    self.reask.push_back(q.qseq);
                }
                self.target = (self.target.saturating_sub(1)).max(MIN_IN_FLIGHT);
            }
            Answer::ServerFailure => {
                self.stats.servfails += 1;
                self.failure(now, q, Failure::ServFail);
            }
            Answer::Refused => {
                self.stats.refused += 1;
                if current {
                    self.type_failed(now);
                }
                self.failure(now, q, Failure::Refused);
            }
            Answer::Other(code @ (1 | 4)) => {
                // FORMERR, NOTIMP: something in the query is not accepted.
                let _ = code;
                self.stats.errors += 1;
                // Blame the name if it was long (even if names have been
                // shortened since: then this is an older query's answer).
                if q.long {
                    if self.long_names {
                        self.long_names = false;
                        self.fell_back(now);
                    }
                } else if q.edns && self.edns {
                    self.edns = false;
                    self.fell_back(now);
                } else if current && !q.edns {
                    // Neither the name nor EDNS0: the record type.
                    self.type_failed(now);
                }
                self.failure(now, q, Failure::Other);
            }
            Answer::NameError | Answer::Other(_) => {
                self.stats.errors += 1;
                if current {
                    self.type_failed(now);
                }
                self.failure(now, q, Failure::Other);
            }
        }
        Ok(())
    }

    /// The next complete downstream message.
    pub fn poll_message(&mut self) -> Option<Vec<u8>> {
        self.delivered.pop_front()
    }

    /// When [`DnsUplink::handle_timeout`] (or [`DnsUplink::poll_query`])
    /// wants calling.
    pub fn next_timeout(&self) -> Option<Instant> {
        let lost = self
            .in_flight
            .values()
            .map(|q| q.sent + QUERY_TIMEOUT)
            .min();
        let wants = self.has_data() || self.in_flight.len() < self.poll_target();
        let send = if wants && self.in_flight.len() < self.window {
            let gap = self
                .tokens_at
                .filter(|_| self.tokens < 1.0)
                .map(|t| t + Duration::from_secs_f64((1.0 - self.tokens) / MAX_RATE));
            match (gap, self.backoff_until) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            }
        } else {
            None
        };
        [lost, send, self.reassembler.next_timeout(), self.reprobe_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// Time passed: queries lost, fragments expired, probes due.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.expire(now);
        self.reassembler.expire(now);
        if self.reprobe_at.is_some_and(|t| now >= t) {
            self.reprobe_at = None;
            self.edns = true;
            self.long_names = true;
            self.last_reprobe = Some(now);
            self.stats.reprobes += 1;
        }
    }

    fn expire(&mut self, now: Instant) {
        let lost: Vec<u16> = self
            .in_flight
            .iter()
            .filter(|(_, q)| now.saturating_duration_since(q.sent) >= QUERY_TIMEOUT)
            .map(|(&id, _)| id)
            .collect();
        for id in lost {
            let q = self.in_flight.remove(&id).expect("listed");
            self.stats.timeouts += 1;
            self.failure(now, q, Failure::Timeout);
        }
    }

    fn next_fragment(&mut self, now: Instant) -> Option<UpFrag> {
        let max = self.fragment_len();
        // Fragments split for base128 before a fallback to base32 still go,
        // in base128 (see `poll_query`), if the names are long enough and
        // base128 has not failed a probe since.
        let max_any = if self.base128_ok {
            self.domain
                .upstream_capacity_as(self.max_name_len(), NameEncoding::Base128)
                .saturating_sub(UP_HEADER_LEN)
        } else {
            max
        };
        loop {
            if let Some(f) = self.frags.pop_front() {
                if f.bytes.len() <= max_any {
                    return Some(f);
                }
                self.stats.lost += 1; // made for longer names
                continue;
            }
            let m = self.messages.pop_front()?;
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

    fn success(&mut self, q: &InFlight, carried: bool) {
        if carried {
            self.stats.data_answers += 1;
        }
        self.good_in_row = self.good_in_row.saturating_add(1);
        self.timeouts_in_row = 0;
        self.failures_in_row = 0;
        self.backoff = Duration::ZERO;
        self.backoff_until = None;
        if q.long {
            self.long_failures = 0;
            self.short_ok = false;
        } else {
            self.short_ok = true;
        }
        if q.edns == self.edns && (q.long || !self.long_names) {
            // The current parameters work: a later fallback starts the
            // probe timer afresh.
            if self.last_reprobe.is_some() && self.reprobe_at.is_none() {
                self.reprobe_wait = REPROBE_MIN;
            }
        }
        self.acked += 1;
        if self.acked >= self.window {
            self.acked = 0;
            self.window = (self.window + 1).min(MAX_IN_FLIGHT);
        }
        // Bare polls take at most half the window: the rest stays free for
        // queries carrying data, which would otherwise wait for a held poll
        // to come back (up to the server's hold).
        self.target = if carried {
            (self.target * 2).min(self.window / 2).max(MIN_IN_FLIGHT)
        } else {
            self.target.saturating_sub(1).max(MIN_IN_FLIGHT)
        };
    }

    fn failure(&mut self, now: Instant, q: InFlight, kind: Failure) {
        self.good_in_row = 0;
        self.failures_in_row = self.failures_in_row.saturating_add(1);
        if self.encoding_probe == Some(q.id) {
            self.encoding_probe = None;
            self.encoding_failed(now);
        }
        if let Some((_, t)) = self.type_probe.filter(|&(p, _)| p == q.id) {
            self.type_probe = None;
            self.type_probe_failed(now, t);
        }
        // Path parameters.
        if matches!(kind, Failure::Timeout | Failure::ServFail) && q.long && self.long_names {
            self.long_failures += 1;
            if self.long_failures >= LONG_FAILURES && self.short_ok {
                self.long_names = false;
                self.fell_back(now);
            }
        }
        // Queries of a type the client has left since say nothing of the
        // path it uses now.
        if matches!(kind, Failure::Timeout) && q.rtype == self.rtype {
            self.timeouts_in_row += 1;
            if self.timeouts_in_row >= FALLBACK_AFTER_TIMEOUTS {
                self.timeouts_in_row = 0;
                if self.encoding == NameEncoding::Base128 {
                    // The newest parameter first.
                    self.fell_back(now);
                } else if type_index(self.rtype) < type_index(AnswerType::Txt) {
                    // A probed record type (a path may drop NULL silently).
                    self.step_type_down(now);
                } else if self.edns {
                    self.edns = false;
                    self.fell_back(now);
                } else if self.long_names {
                    self.long_names = false;
                    self.fell_back(now);
                } else {
                    // Nothing else left to blame.
                    self.step_type_down(now);
                }
            }
        }
        // Congestion: cut once per round of queries.
        if self.last_cut.is_none_or(|t| q.sent >= t) {
            self.last_cut = Some(now);
            self.window = (self.window / 2).max(1);
            self.acked = 0;
            self.backoff = if self.backoff.is_zero() {
                BACKOFF_MIN
            } else {
                (self.backoff * 2).min(BACKOFF_MAX)
            };
            if matches!(kind, Failure::Refused) {
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            }
            self.backoff_until = Some(now + self.backoff);
        }
        self.target = self.target.min(self.window / 2).max(1);
        if let Some(f) = q.frag {
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

    /// The type to probe with the next query, if one is due: the most
    /// preferred type above the one in use that is not backing off.
    fn type_to_probe(&self, now: Instant) -> Option<AnswerType> {
        if self.type_probe.is_some() || self.good_in_row < PROBE_TYPE_AFTER {
            return None;
        }
        let above = &AnswerType::ALL[..type_index(self.rtype)];
        above
            .iter()
            .copied()
            .find(|&t| self.type_retry_at[type_index(t)].is_none_or(|at| now >= at))
    }

    /// A probe's answer came back intact: `t` from now on.
    fn switch_type(&mut self, t: AnswerType) {
        let i = type_index(t);
        self.type_retry_at[i] = None;
        self.type_wait[i] = REPROBE_MIN;
        if type_index(t) < type_index(self.rtype) {
            self.rtype = t;
            self.type_failures_in_row = 0;
        }
    }

    fn type_probe_failed(&mut self, now: Instant, t: AnswerType) {
        self.stats.type_probe_failures += 1;
        self.hold_off_type(now, t);
    }

    /// No probe of `t` for a while, longer each time.
    fn hold_off_type(&mut self, now: Instant, t: AnswerType) {
        let i = type_index(t);
        self.type_retry_at[i] = Some(now + self.type_wait[i]);
        self.type_wait[i] = (self.type_wait[i] * 2).min(REPROBE_MAX);
    }

    /// The type in use failed once more; after [`TYPE_FAILURES`] in a row,
    /// step down the ladder.
    fn type_failed(&mut self, now: Instant) {
        self.type_failures_in_row += 1;
        if self.type_failures_in_row >= TYPE_FAILURES {
            self.step_type_down(now);
        }
    }

    /// To the next type down the ladder not backing off (or just the next
    /// one), with the back-off cleared: the type was to blame.
    fn step_type_down(&mut self, now: Instant) {
        self.type_failures_in_row = 0;
        self.hold_off_type(now, self.rtype);
        let below = &AnswerType::ALL[type_index(self.rtype) + 1..];
        let next = below
            .iter()
            .find(|&&t| self.type_retry_at[type_index(t)].is_none_or(|at| now >= at))
            .or(below.first());
        if let Some(&t) = next {
            self.rtype = t;
            self.stats.type_fallbacks += 1;
            self.backoff = Duration::ZERO;
            self.backoff_until = None;
        }
    }

    /// The base128 probe failed: base32 until the next try.
    fn encoding_failed(&mut self, now: Instant) {
        self.stats.encoding_failures += 1;
        self.encoding = NameEncoding::Base32;
        self.base128_ok = false;
        self.encoding_retry_at = Some(now + self.encoding_wait);
        self.encoding_wait = (self.encoding_wait * 2).min(REPROBE_MAX);
    }

    fn fell_back(&mut self, now: Instant) {
        self.stats.fallbacks += 1;
        // Back to what always works; base128 is probed again once the path
        // is back to its full parameters.
        self.encoding = NameEncoding::Base32;
        self.encoding_probe = None;
        self.good_in_row = 0;
        // A fallback soon after a probe: the probe failed, wait longer.
        if self
            .last_reprobe
            .is_some_and(|t| now.saturating_duration_since(t) < REPROBE_MIN)
        {
            self.reprobe_wait = (self.reprobe_wait * 2).min(REPROBE_MAX);
        }
        self.reprobe_at = Some(now + self.reprobe_wait);
    }
}

/// The position of `t` on the ladder ([`AnswerType::ALL`]).
fn type_index(t: AnswerType) -> usize {
    AnswerType::ALL
        .iter()
        .position(|&x| x == t)
        .expect("every type is on the ladder")
}

/// A data answer whose fragments all parse: the path carried it intact.
fn intact(answer: &Answer) -> bool {
    matches!(answer, Answer::Data(p) if super::fragments(p).all(|f| f.is_ok()))
}

fn next_random(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// Timeouts in a row, without an answer, after which the next resolver
/// (if several are given) takes over.
pub const RESOLVER_SWITCH_TIMEOUTS: u64 = 4;

/// The client half as a path: the [`DnsUplink`] and the resolvers it
/// queries, one at a time, moving to the next when the one in use stops
/// answering. Resolvers are numbered `0..n` in the order given; the driver
/// knows what they are (an address over UDP, a DoT or DoH server).
pub struct DnsClient {
    uplink: DnsUplink,
    resolvers: usize,
    active: usize,
    /// Timeouts and answers when the active resolver was last judged.
    seen: (u64, u64),
    switches: u64,
}

impl DnsClient {
    /// A client of the server of `domain` through `resolvers` resolvers (at
    /// least one), as tag `tag`; `seed` seeds the query ids.
    pub fn new(domain: Domain, resolvers: usize, tag: u32, seed: u64) -> Self {
        assert!(resolvers > 0, "a DNS path needs a resolver");
        Self {
            uplink: DnsUplink::new(domain, tag, seed),
            resolvers,
            active: 0,
            seen: (0, 0),
            switches: 0,
        }
    }

    /// The resolver in use.
    pub fn resolver(&self) -> usize {
        self.active
    }

    /// How many resolvers there are.
    pub fn resolvers(&self) -> usize {
        self.resolvers
    }

    /// Times the client moved to another resolver.
    pub fn switches(&self) -> u64 {
        self.switches
    }

    /// The uplink (its state and counters).
    pub fn uplink(&self) -> &DnsUplink {
        &self.uplink
    }

    /// Keep bare polls outstanding, or not.
    pub fn set_polling(&mut self, on: bool) {
        self.uplink.set_polling(on);
    }

    /// Queue an upstream tunnel message.
    pub fn send(&mut self, now: Instant, message: &[u8]) {
        self.uplink.send(now, message);
    }

    /// The next query to send, and to which resolver.
    pub fn poll_query(&mut self, now: Instant) -> Option<(usize, Query)> {
        self.judge_resolver();
        let q = self.uplink.poll_query(now)?;
        Some((self.resolver(), q))
    }

    /// Move on to the next resolver when the active one stopped answering.
    fn judge_resolver(&mut self) {
        if self.resolvers < 2 {
            return;
        }
        let stats = self.uplink.stats();
        if stats.answers > self.seen.1 {
            self.seen = (stats.timeouts, stats.answers);
        } else if stats.timeouts >= self.seen.0 + RESOLVER_SWITCH_TIMEOUTS {
            self.active = (self.active + 1) % self.resolvers;
            self.switches += 1;
            // The queries still out went to the old resolver: their
            // timeouts must not count against the new one.
            let in_flight = self.uplink.path_info().in_flight as u64;
            self.seen = (stats.timeouts + in_flight, stats.answers);
        }
    }

    /// A response from resolver `resolver`. Complete messages come out of
    /// [`DnsClient::poll_message`].
    pub fn handle_response(
        &mut self,
        now: Instant,
        resolver: usize,
        bytes: &[u8],
    ) -> Result<(), DropReason> {
        if resolver >= self.resolvers {
            return Err(DropReason::UnexpectedResponse);
        }
        self.uplink.handle_response(now, bytes)
    }

    /// The next complete downstream message.
    pub fn poll_message(&mut self) -> Option<Vec<u8>> {
        self.uplink.poll_message()
    }

    /// When [`DnsClient::handle_timeout`] wants calling.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.uplink.next_timeout()
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.uplink.next_timeout().is_some_and(|t| t <= now) {
            self.uplink.handle_timeout(now);
        }
    }
}

//! The server side of the DNS transport: the authoritative listener for
//! the tunnel domain. See the [module docs](super) for what rides in names
//! and answers.
//!
//! Driving it, per datagram from a resolver:
//!
//! ```text
//! if let Some(d) = listener.handle_query(now, from, bytes) {
//!     // a complete upstream message of tag d.tag: feed the engine
//!     let session = engine.session_of(d.message);
//!     match engine.handle_datagram(now, &DnsPath { tag, session }, d.message, out) {
//!         Ok(Send(_, response)) if session.is_none() => listener.send_to_tag(now, tag, response),
//!         Ok(Send(path, m)) => listener.send(now, path.session?, m),
//!         ...
//!     }
//!     if accepted and session is Some: listener.bind(tag, session)
//! }
//! while let Some(t) = listener.poll_transmit() { socket.send_to(t.bytes, t.to) }
//! ```
//!
//! and when [`DnsListener::next_timeout`] passes, [`DnsListener::handle_timeout`]
//! with a closure that seals a keepalive for a session (held queries that
//! expire are answered with one at most once per [`KEEPALIVE_EVERY`], so the
//! client's engine hears the server; otherwise empty).
//!
//! What anyone may get: REFUSED outside the domain, the apex answers, and
//! for a tag that no authenticated message has bound yet, data answers of at
//! most [`CLASSIC_SIZE`] bytes (the handshake response rides one). Only a
//! bound tag gets answers up to its client's (and its resolver's) EDNS0
//! size, capped at 1232.
//!
//! Memory is bounded: queries held per tag and over unbound tags, tags,
//! downstream fragments queued per tag, queries remembered for retries, and
//! the [`Reassembler`]'s own limits.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

use super::{CLASSIC_SIZE, DOWN_LEN_PREFIX, HOLD, HOLD_WITH_DATA, UP_HEADER_LEN, UpHeader};
use crate::DropReason;
use crate::frag::{Fragment, Fragmenter, Limits, Reassembler};
use crate::wire::dns::{
    self, Domain, MAX_UPSTREAM_PAYLOAD, Query, RecordType, SERVER_EDNS_SIZE, build_answer,
    build_apex_answer, build_refused, decode_name, parse_query,
};

/// Queries held per bound tag; beyond, the oldest is answered empty.
pub const MAX_HELD: usize = 32;
/// Queries held per tag not bound to a session yet.
pub const MAX_HELD_UNBOUND: usize = 4;
/// Queries held over all unbound tags; beyond, new ones are answered at once.
pub const MAX_HELD_UNBOUND_TOTAL: usize = 1024;
/// Tags tracked; a new one beyond this evicts the longest idle unbound tag
/// (or is answered without state if there is none).
pub const MAX_TAGS: usize = 4096;
/// Downstream fragments queued per tag; a message that does not fit is dropped.
pub const MAX_QUEUED: usize = 512;
/// Answered queries remembered per tag, to answer a resolver's retry with
/// the same payload.
pub const MAX_REMEMBERED: usize = 128;
/// How long an answered query is remembered.
pub const REMEMBER_FOR: Duration = Duration::from_secs(10);
/// An unbound tag with nothing held is forgotten after this idle time.
pub const UNBOUND_IDLE: Duration = Duration::from_secs(30);
/// A bound tag is forgotten after this idle time (its session stays in the
/// engine; the client's next query rebinds it).
pub const BOUND_IDLE: Duration = Duration::from_secs(600);
/// Expired holds are answered with an engine keepalive at most this often
/// per tag (others go empty).
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);
/// Partial upstream messages are dropped this long after their first
/// fragment: a lost fragment is not retried for long.
pub const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(3);

/// A response to send to a resolver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit<A> {
    /// Where the query came from.
    pub to: A,
    /// The DNS response.
    pub bytes: Vec<u8>,
}

/// A complete upstream message.
#[derive(Debug, PartialEq, Eq)]
pub struct Delivered<'a, S> {
    /// The client's tag.
    pub tag: u32,
    /// The session the tag is bound to, if any.
    pub session: Option<S>,
    /// The tunnel message (feed it to the engine).
    pub message: &'a [u8],
}

/// Counters for status and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerStats {
    /// Datagrams that were not a query we could parse (dropped unanswered).
    pub malformed: u64,
    /// Questions outside the domain, answered REFUSED.
    pub refused: u64,
    /// Questions in the zone without tunnel data, given the apex answer.
    pub apex: u64,
    /// Tunnel queries received (retries included).
    pub queries: u64,
    /// Resolver retries of queries already seen.
    pub retries: u64,
    /// Answers carrying at least one fragment.
    pub answered_data: u64,
    /// Answers carrying nothing.
    pub answered_empty: u64,
    /// Held queries superseded by a retry (left unanswered: the resolver
    /// waits for the newest).
    pub superseded: u64,
    /// Downstream messages dropped for a full queue.
    pub queue_full: u64,
    /// Downstream fragments dropped as too big for the query at hand.
    pub oversize: u64,
    /// Tags evicted to make room.
    pub evicted_tags: u64,
}

/// What the status shows of one client's path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TagInfo {
    /// Queries held.
    pub held: usize,
    /// Downstream fragments waiting for a query.
    pub queued: usize,
    /// The fragment size downstream messages are split to.
    pub fragment_len: usize,
}

struct Held<A> {
    to: A,
    query: Query,
    qseq: u16,
    arrived: Instant,
}

enum Seen {
    Held,
    Answered(Vec<u8>),
}

struct Tag<S, A> {
    session: Option<S>,
    held: VecDeque<Held<A>>,
    queue: VecDeque<Vec<u8>>,
    fragmenter: Fragmenter,
    seen: HashMap<u16, Seen>,
    seen_order: VecDeque<(u16, Instant)>,
    /// Downstream capacities of the latest queries (payload bytes).
    caps: VecDeque<usize>,
    last_seen: Instant,
    last_keepalive: Option<Instant>,
}

impl<S, A> Tag<S, A> {
    fn new(now: Instant, tag: u32) -> Self {
        Self {
            session: None,
            held: VecDeque::new(),
            queue: VecDeque::new(),
            fragmenter: Fragmenter::new(tag as u16 ^ (tag >> 16) as u16),
            seen: HashMap::new(),
            seen_order: VecDeque::new(),
            caps: VecDeque::new(),
            last_seen: now,
            last_keepalive: None,
        }
    }

    /// Fragments are made to fit a 512-byte answer to every recent query.
    fn fragment_len(&self) -> usize {
        let cap = self
            .caps
            .iter()
            .copied()
            .min()
            .unwrap_or_else(|| dns::downstream_capacity(dns::MAX_NAME_LEN + 2, None));
        cap.saturating_sub(DOWN_LEN_PREFIX)
    }

    /// Fragments for an answer of `capacity` payload bytes, from the queue.
    fn take_payload(&mut self, capacity: usize, stats: &mut ListenerStats) -> Vec<u8> {
        let mut payload = Vec::new();
        while let Some(front) = self.queue.front() {
            let need = DOWN_LEN_PREFIX + front.len();
            if payload.len() + need <= capacity {
                let f = self.queue.pop_front().expect("checked");
                super::push_fragment(&mut payload, &f);
            } else if payload.is_empty() {
                // Fits no answer of this size: the client's path shrank.
                self.queue.pop_front();
                stats.oversize += 1;
            } else {
                break;
            }
        }
        payload
    }

    fn remember_answer(&mut self, qseq: u16, payload: &[u8], now: Instant) {
        if let Some(s) = self.seen.get_mut(&qseq) {
            *s = Seen::Answered(payload.to_vec());
        }
        self.trim_seen(now);
    }

    fn trim_seen(&mut self, now: Instant) {
        while let Some(&(qseq, at)) = self.seen_order.front() {
            let old = now.saturating_duration_since(at) >= REMEMBER_FOR
                || self.seen_order.len() > MAX_REMEMBERED;
            if !old || matches!(self.seen.get(&qseq), Some(Seen::Held)) {
                break;
            }
            self.seen_order.pop_front();
            self.seen.remove(&qseq);
        }
    }
}

/// The authoritative listener: see the module docs. `S` is the engine's
/// session id, `A` the caller's return address of a query (the resolver's
/// address and port; only ever used to send its answer back).
pub struct DnsListener<S, A> {
    domain: Domain,
    hold: Duration,
    tags: HashMap<u32, Tag<S, A>>,
    by_session: HashMap<S, u32>,
    reassembler: Reassembler<u32>,
    unbound_held: usize,
    out: VecDeque<Transmit<A>>,
    scratch: [u8; MAX_UPSTREAM_PAYLOAD],
    stats: ListenerStats,
}

impl<S: Copy + Eq + Hash, A: Clone> DnsListener<S, A> {
    /// A listener for `domain`, holding queries for [`HOLD`].
    pub fn new(domain: Domain) -> Self {
        Self::with_hold(domain, HOLD)
    }

    /// A listener holding queries for `hold`.
    pub fn with_hold(domain: Domain, hold: Duration) -> Self {
        Self {
            domain,
            hold,
            tags: HashMap::new(),
            by_session: HashMap::new(),
            reassembler: Reassembler::new(Limits {
                timeout: REASSEMBLY_TIMEOUT,
                ..Limits::default()
            }),
            unbound_held: 0,
            out: VecDeque::new(),
            scratch: [0; MAX_UPSTREAM_PAYLOAD],
            stats: ListenerStats::default(),
        }
    }

    /// The tunnel domain.
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// The counters.
    pub fn stats(&self) -> ListenerStats {
        self.stats
    }

    /// Status of the tag bound to `session`.
    pub fn info(&self, session: S) -> Option<TagInfo> {
        let t = self.tags.get(self.by_session.get(&session)?)?;
        Some(TagInfo {
            held: t.held.len(),
            queued: t.queue.len(),
            fragment_len: t.fragment_len(),
        })
    }

    /// Queries held over all tags.
    pub fn held(&self) -> usize {
        self.tags.values().map(|t| t.held.len()).sum()
    }

    /// The next response to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit<A>> {
        self.out.pop_front()
    }

    /// A datagram from a resolver at `from`. Answers (now or later) go out
    /// through [`DnsListener::poll_transmit`]; a complete upstream message
    /// comes back.
    pub fn handle_query(
        &mut self,
        now: Instant,
        from: A,
        bytes: &[u8],
    ) -> Option<Delivered<'_, S>> {
        let Ok(q) = parse_query(bytes) else {
            self.stats.malformed += 1;
            return None;
        };
        if !self.domain.contains(&q.name) {
            self.stats.refused += 1;
            self.reply(from, build_refused(&q));
            return None;
        }
        let decoded = q
            .answer_type()
            .is_some()
            .then(|| decode_name(&self.domain, &q.name, &mut self.scratch).ok())
            .flatten();
        let parsed = decoded.and_then(|n| {
            let (h, rest) = UpHeader::parse(&self.scratch[..n])?;
            (rest.is_empty() || Fragment::parse(rest).is_ok()).then_some((h, n))
        });
        let Some((h, n)) = parsed else {
            self.stats.apex += 1;
            self.reply(from, build_apex_answer(&q, &self.domain));
            return None;
        };
        self.stats.queries += 1;
        let has_fragment = n > UP_HEADER_LEN;
        // A resolver that minimises query names (RFC 9156) asks A or AAAA at
        // the names between the apex and the full one, and such a suffix of a
        // base32 name may decode as tunnel data of a made-up tag: the first
        // query of a tag of those types is answered at once, so no resolver
        // waits out a hold on a tag that does not exist.
        let minimised_maybe =
            !self.tags.contains_key(&h.tag) && matches!(q.qtype, RecordType::A | RecordType::AAAA);
        if !self.tag_entry(now, h.tag) {
            // No room for another tag: answer, keep nothing.
            self.answer_now(from, q, h.down_limit, false, Vec::new());
            return None;
        }
        let tag = self.tags.get_mut(&h.tag).expect("just made");
        tag.last_seen = now;
        let bound = tag.session.is_some();
        let mut q = q;
        limit_query(&mut q, h.down_limit, bound);

        // A resolver's retry: never process its fragment twice.
        match tag.seen.get(&h.qseq) {
            Some(Seen::Held) => {
                self.stats.retries += 1;
                self.stats.superseded += 1;
                if let Some(held) = tag.held.iter_mut().find(|x| x.qseq == h.qseq) {
                    held.to = from;
                    held.query = q;
                }
                return None;
            }
            Some(Seen::Answered(payload)) => {
                self.stats.retries += 1;
                // The same fragments again, as many as fit (a client
                // re-asking after TC takes smaller answers); the rest go
                // back to the front of the queue.
                let old = payload.clone();
                let capacity = q.answer_capacity(&self.domain);
                let mut payload = Vec::new();
                let mut rest = Vec::new();
                for f in super::fragments(&old).map_while(Result::ok) {
                    let mut b = vec![0; f.wire_len()];
                    f.emit(&mut b).expect("sized");
                    if payload.len() + DOWN_LEN_PREFIX + b.len() <= capacity {
                        super::push_fragment(&mut payload, &b);
                    } else {
                        rest.push(b);
                    }
                }
                for b in rest.into_iter().rev() {
                    tag.queue.push_front(b);
                }
                tag.remember_answer(h.qseq, &payload, now);
                self.reply_data(from, &q, payload);
                self.flush(h.tag, now);
                return None;
            }
            None => {}
        }
        tag.seen.insert(h.qseq, Seen::Held);
        tag.seen_order.push_back((h.qseq, now));
        // Fragments fit a 512-byte answer to the query (of its type), so an
        // answer re-asked with a smaller size (after TC) can still carry them.
        let ty = q.answer_type().expect("decoded only for data types");
        tag.caps.push_back(dns::answer_capacity(
            ty,
            &self.domain,
            q.name_wire_len(),
            None,
        ));
        if tag.caps.len() > 8 {
            tag.caps.pop_front();
        }

        let max_held = if bound { MAX_HELD } else { MAX_HELD_UNBOUND };
        let answer_at_once = minimised_maybe
            || !tag.queue.is_empty()
            || (has_fragment && tag.held.len() >= HOLD_WITH_DATA)
            || (!bound && self.unbound_held >= MAX_HELD_UNBOUND_TOTAL);
        if answer_at_once {
            let payload = tag.take_payload(q.answer_capacity(&self.domain), &mut self.stats);
            tag.remember_answer(h.qseq, &payload, now);
            self.reply_data(from, &q, payload);
        } else {
            tag.held.push_back(Held {
                to: from,
                query: q,
                qseq: h.qseq,
                arrived: now,
            });
            if !bound {
                self.unbound_held += 1;
            }
            if tag.held.len() > max_held {
                let old = tag.held.pop_front().expect("over the limit");
                if !bound {
                    self.unbound_held -= 1;
                }
                tag.remember_answer(old.qseq, &[], now);
                self.reply_data(old.to, &old.query, Vec::new());
            }
        }

        if !has_fragment {
            return None;
        }
        let session = self.tags.get(&h.tag).and_then(|t| t.session);
        let fragment = Fragment::parse(&self.scratch[UP_HEADER_LEN..n]).ok()?;
        let message = self.reassembler.push(now, h.tag, fragment)?;
        Some(Delivered {
            tag: h.tag,
            session,
            message,
        })
    }

    /// The message of `tag` authenticated as `session`: answers to the tag
    /// may now be as large as its client takes, and [`DnsListener::send`]
    /// for `session` goes to it. A tag the session had before is forgotten
    /// (its held queries answered empty).
    pub fn bind(&mut self, now: Instant, tag: u32, session: S) {
        if let Some(old) = self.by_session.insert(session, tag).filter(|&t| t != tag) {
            self.forget(old);
        }
        if !self.tag_entry(now, tag) {
            self.by_session.remove(&session);
            return;
        }
        let t = self.tags.get_mut(&tag).expect("just made");
        if t.session.is_none() {
            self.unbound_held -= t.held.len();
        }
        if let Some(prev) = t.session.replace(session).filter(|&p| p != session) {
            self.by_session.remove(&prev);
        }
    }

    /// Forget `session` and its tag (its held queries are answered empty).
    pub fn unbind(&mut self, session: S) {
        if let Some(tag) = self.by_session.remove(&session) {
            self.forget(tag);
        }
    }

    /// A downstream message for `session`: on held queries, or queued.
    /// [`DropReason::NoSession`] when no tag is bound to it.
    pub fn send(&mut self, now: Instant, session: S, message: &[u8]) -> Result<(), DropReason> {
        let tag = *self.by_session.get(&session).ok_or(DropReason::NoSession)?;
        self.send_to_tag(now, tag, message)
    }

    /// A downstream message for the client with `tag` (before a session is
    /// bound: the handshake response).
    pub fn send_to_tag(
        &mut self,
        now: Instant,
        tag: u32,
        message: &[u8],
    ) -> Result<(), DropReason> {
        let _ = now;
        let t = self.tags.get_mut(&tag).ok_or(DropReason::NoSession)?;
        let split = t.fragmenter.split(message, t.fragment_len())?;
        if t.queue.len() + usize::from(split.count()) > MAX_QUEUED {
            self.stats.queue_full += 1;
            return Ok(());
        }
        for f in split.fragments() {
            let mut b = vec![0; f.wire_len()];
            f.emit(&mut b).expect("sized");
            t.queue.push_back(b);
        }
        self.flush(tag, now);
        Ok(())
    }

    /// When [`DnsListener::handle_timeout`] wants calling.
    pub fn next_timeout(&self) -> Option<Instant> {
        let holds = self
            .tags
            .values()
            .filter_map(|t| t.held.front().map(|h| h.arrived + self.hold));
        let idle = self.tags.values().map(|t| {
            t.last_seen
                + if t.session.is_some() {
                    BOUND_IDLE
                } else {
                    UNBOUND_IDLE
                }
        });
        holds
            .chain(idle)
            .chain(self.reassembler.next_timeout())
            .min()
    }

    /// Answer held queries that waited their hold, forget idle tags and
    /// stale fragments. `keepalive(session)` seals a keepalive message for
    /// the session (the engine's `seal_keepalive`).
    pub fn handle_timeout(
        &mut self,
        now: Instant,
        mut keepalive: impl FnMut(S) -> Option<Vec<u8>>,
    ) {
        self.reassembler.expire(now);
        let hold = self.hold;
        let mut idle = Vec::new();
        for (&id, t) in &mut self.tags {
            while t
                .held
                .front()
                .is_some_and(|h| now.saturating_duration_since(h.arrived) >= hold)
            {
                let h = t.held.pop_front().expect("checked");
                if t.session.is_none() {
                    self.unbound_held -= 1;
                }
                let capacity = h.query.answer_capacity(&self.domain);
                let mut payload = t.take_payload(capacity, &mut self.stats);
                let ka_due = t
                    .last_keepalive
                    .is_none_or(|at| now.saturating_duration_since(at) >= KEEPALIVE_EVERY);
                if let (true, true, Some(s)) = (payload.is_empty(), ka_due, t.session)
                    && let Some(ka) = keepalive(s)
                    && let Ok(split) = t
                        .fragmenter
                        .split(&ka, capacity.saturating_sub(DOWN_LEN_PREFIX))
                    && split.count() == 1
                {
                    let f = split.fragment(0).expect("one");
                    let mut b = vec![0; f.wire_len()];
                    f.emit(&mut b).expect("sized");
                    super::push_fragment(&mut payload, &b);
                    t.last_keepalive = Some(now);
                }
                t.remember_answer(h.qseq, &payload, now);
                let out = (&mut self.out, &mut self.stats, &self.domain);
                reply_data(out, h.to, &h.query, payload);
            }
            t.trim_seen(now);
            let limit = if t.session.is_some() {
                BOUND_IDLE
            } else {
                UNBOUND_IDLE
            };
            if t.held.is_empty() && now.saturating_duration_since(t.last_seen) >= limit {
                idle.push(id);
            }
        }
        for id in idle {
            self.forget(id);
        }
    }

    /// Make sure `tag` has state; false if there is no room.
    fn tag_entry(&mut self, now: Instant, tag: u32) -> bool {
        if self.tags.contains_key(&tag) {
            return true;
        }
        if self.tags.len() >= MAX_TAGS {
            let victim = self
                .tags
                .iter()
                .filter(|(_, t)| t.session.is_none())
                .min_by_key(|(_, t)| t.last_seen)
                .map(|(&id, _)| id);
            let Some(victim) = victim else {
                return false;
            };
            self.stats.evicted_tags += 1;
            self.forget(victim);
        }
        self.tags.insert(tag, Tag::new(now, tag));
        true
    }

    fn forget(&mut self, tag: u32) {
        let Some(mut t) = self.tags.remove(&tag) else {
            return;
        };
        if let Some(s) = t.session {
            if self.by_session.get(&s) == Some(&tag) {
                self.by_session.remove(&s);
            }
        } else {
            self.unbound_held -= t.held.len();
        }
        while let Some(h) = t.held.pop_front() {
            let out = (&mut self.out, &mut self.stats, &self.domain);
            reply_data(out, h.to, &h.query, Vec::new());
        }
    }

    /// Answer `tag`'s held queries while fragments wait.
    fn flush(&mut self, tag: u32, now: Instant) {
        let Some(t) = self.tags.get_mut(&tag) else {
            return;
        };
        while !t.queue.is_empty() {
            let Some(h) = t.held.pop_front() else { break };
            if t.session.is_none() {
                self.unbound_held -= 1;
            }
            let payload = t.take_payload(h.query.answer_capacity(&self.domain), &mut self.stats);
            t.remember_answer(h.qseq, &payload, now);
            let out = (&mut self.out, &mut self.stats, &self.domain);
            reply_data(out, h.to, &h.query, payload);
        }
    }

    fn answer_now(
        &mut self,
        to: A,
        mut q: Query,
        down_limit: usize,
        bound: bool,
        payload: Vec<u8>,
    ) {
        limit_query(&mut q, down_limit, bound);
        self.reply_data(to, &q, payload);
    }

    fn reply_data(&mut self, to: A, q: &Query, payload: Vec<u8>) {
        reply_data(
            (&mut self.out, &mut self.stats, &self.domain),
            to,
            q,
            payload,
        );
    }

    fn reply(&mut self, to: A, bytes: Result<Vec<u8>, dns::DnsError>) {
        if let Ok(bytes) = bytes {
            self.out.push_back(Transmit { to, bytes });
        }
    }
}

/// Answer `q` with `payload` in records of its type; if even an empty
/// answer of that type does not fit (a very long domain), NODATA.
fn reply_data<A>(
    (out, stats, domain): (&mut VecDeque<Transmit<A>>, &mut ListenerStats, &Domain),
    to: A,
    q: &Query,
    payload: Vec<u8>,
) {
    let Ok(bytes) = build_answer(q, domain, &payload)
        .or_else(|_| build_answer(q, domain, &[]))
        .or_else(|_| build_apex_answer(q, domain))
    else {
        return;
    };
    if payload.is_empty() {
        stats.answered_empty += 1;
    } else {
        stats.answered_data += 1;
    }
    out.push_back(Transmit { to, bytes });
}

/// Lower the query's EDNS0 size to what the answer may have: the client's
/// limit, 1232, and an ordinary reply's 512 bytes for an unbound tag.
fn limit_query(q: &mut Query, down_limit: usize, bound: bool) {
    let mut limit = down_limit.clamp(CLASSIC_SIZE, usize::from(SERVER_EDNS_SIZE));
    if !bound {
        limit = CLASSIC_SIZE;
    }
    if let Some(e) = q.edns_size {
        q.edns_size = Some(e.min(limit as u16));
    }
}

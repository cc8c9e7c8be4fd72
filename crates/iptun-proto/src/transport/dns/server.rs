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
//! most [`CLASSIC_SIZE`] bytes (the handshake response rides one). A bound
//! tag's queries must carry a poll authenticator of its session
//! ([`PollKeys`] checks it): without one a query gets an empty answer. Only a
//! bound tag gets answers up to its client's (and its resolver's) EDNS0
//! size, capped at 1232.
//!
//! Memory is bounded: queries held per tag and over unbound tags, tags,
//! downstream fragments queued per tag, queries remembered for retries, and
//! the [`Reassembler`]'s own limits.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

use super::name_errors::NameErrors;
use super::{
    CLASSIC_SIZE, DOWN_HEADER_LEN, DOWN_LEN_PREFIX, DownHeader, HOLD, HOLD_WITH_DATA, MAX_DOWN,
    UP_HEADER_LEN, UpBody, UpHeader,
};
use crate::DropReason;
use crate::crypto::{PollCheck, PollGuard};
use crate::frag::{Fragment, Fragmenter, Limits, Reassembler};
use crate::wire::dns::{
    self, Domain, MAX_UPSTREAM_PAYLOAD, Query, RecordType, build_answer, build_apex_answer,
    build_name_error, build_refused, decode_name, parse_query,
};

/// Queries held per bound tag; beyond, the oldest is answered empty. As
/// many as a client's congestion window may have out: a download fetches
/// its data on them.
pub const MAX_HELD: usize = 2048;
/// Queries held over all tags; beyond, new ones are answered at once.
pub const MAX_HELD_TOTAL: usize = 16_384;
/// The most bytes of a query's payload option that count (more: the option
/// is ignored).
pub const MAX_OPTION_PAYLOAD: usize = 2048;
/// Queries held per tag not bound to a session yet.
pub const MAX_HELD_UNBOUND: usize = 4;
/// Queries held over all unbound tags; beyond, new ones are answered at once.
pub const MAX_HELD_UNBOUND_TOTAL: usize = 1024;
/// Tags tracked; a new one beyond this evicts the longest idle unbound tag
/// (or is answered without state if there is none).
pub const MAX_TAGS: usize = 4096;
/// Downstream bytes queued per tag at most; a message that does not fit is
/// dropped.
pub const MAX_QUEUED_BYTES: usize = 4 << 20;
/// A new downstream message is dropped while the oldest queued fragment
/// has waited this long (the inner TCP sees the loss and slows down,
/// instead of the queue growing into seconds on a slow path).
pub const MAX_QUEUE_WAIT: Duration = Duration::from_millis(500);
/// Answered queries remembered per tag, to answer a resolver's retry with
/// the same payload.
pub const MAX_REMEMBERED: usize = 128;
/// How long an answered query is remembered.
pub const REMEMBER_FOR: Duration = Duration::from_secs(10);
/// An A or AAAA query of a tag whose queries of another type came this
/// recently is a resolver's step of query name minimisation (RFC 9156),
/// not the client's: see [`Tag::minimisation_step`].
pub const MINIMISATION_WINDOW: Duration = Duration::from_secs(3);
/// An unbound tag with nothing held is forgotten after this idle time.
pub const UNBOUND_IDLE: Duration = Duration::from_secs(30);
/// A bound tag is forgotten after this idle time (its session stays in the
/// engine; the client's next query rebinds it).
pub const BOUND_IDLE: Duration = Duration::from_secs(600);
/// Expired holds are answered with an engine keepalive at most this often
/// per tag (others go empty).
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);
/// How long the last pieces of a split message wait for the next message
/// to fill an answer with them, while queries are held. Without the wait a
/// download spread every packet over two answers (three pieces, then one)
/// wherever the client kept many polls waiting: answers carried 690 bytes
/// where they have room for 1089, and through a resolver, whose load is
/// per query, that is the download's rate. A message that goes whole (a
/// ping, an ACK) never waits.
pub const FILL_WAIT: Duration = Duration::from_millis(1);
/// Recent answers per tag whose sizes the pieces of downstream messages are
/// cut for.
const RECENT_ANSWERS: usize = 8;
/// Queued fragments an answer looks through for ones that fit.
const PACK_LOOKAHEAD: usize = 8;
/// Pieces a message may be split into beyond the fewest, to pack better.
const MAX_EXTRA_PIECES: usize = 8;
/// Partial upstream messages are dropped this long after their first
/// fragment: a lost fragment is not retried for long.
pub const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(3);

/// How the listener checks the authenticator of a bound tag's query: with
/// the poll keys of the session (the endpoint's engine has them).
pub trait PollKeys<S> {
    /// Check the query header `header` of `tag` against `session`'s live
    /// keypairs with `guard` (the tag's replay windows); `None` when the
    /// session has no live keys (the tag is then taken as unbound).
    fn check(&self, session: S, guard: &mut PollGuard, header: &UpHeader) -> Option<PollCheck>;
}

/// No keys: queries are never checked (tests of the listener alone).
impl<S> PollKeys<S> for () {
    fn check(&self, _: S, _: &mut PollGuard, _: &UpHeader) -> Option<PollCheck> {
        None
    }
}

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
    /// Questions at the apex or the nameserver's name, given the apex answer.
    pub apex: u64,
    /// Questions below the apex without tunnel data (a minimising
    /// resolver's first step), answered NXDOMAIN.
    pub name_errors: u64,
    /// Times full names stopped following those NXDOMAINs (a resolver
    /// took them as final) and the listener answered NODATA for a while.
    pub name_error_fallbacks: u64,
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
    /// Probes of the path's sizes (queries carrying padding), answered at once.
    pub probes: u64,
    /// Queries whose payload option was read.
    pub options: u64,
    /// A and AAAA queries taken for a resolver's steps of query name
    /// minimisation, answered at once and empty.
    pub minimisation_steps: u64,
    /// Queries of a bound tag whose authenticator no keypair of its session
    /// made: answered at once and empty, their fragments dropped.
    pub forged: u64,
    /// Authentic queries of a bound tag whose counter was taken before
    /// but which are no retry the listener remembers (replays, or retries
    /// too late): answered at once and empty.
    pub replayed: u64,
}

/// What the status shows of one client's path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TagInfo {
    /// Queries held.
    pub held: usize,
    /// Downstream fragments waiting for a query.
    pub queued: usize,
    /// Payload room of the median recent answer (downstream messages are
    /// split into pieces that fill the recent answers best).
    pub answer_room: usize,
}

struct Held<A> {
    to: A,
    query: Query,
    qseq: u16,
    arrived: Instant,
    /// The query's payload option was read.
    option_read: bool,
}

enum Seen {
    Held,
    Answered(Vec<u8>),
}

struct Tag<S, A> {
    session: Option<S>,
    held: VecDeque<Held<A>>,
    /// Downstream fragments, with when each was queued.
    queue: VecDeque<(Instant, Vec<u8>)>,
    /// Bytes of the fragments in `queue`.
    queued_bytes: usize,
    /// Queued pieces of messages split in more than one.
    queued_split: usize,
    fragmenter: Fragmenter,
    seen: HashMap<u16, Seen>,
    seen_order: VecDeque<(u16, Instant)>,
    /// Downstream capacities of the latest queries (payload bytes).
    caps: VecDeque<usize>,
    /// When the tag last asked a type other than A and AAAA.
    other_type_at: Option<Instant>,
    last_seen: Instant,
    last_keepalive: Option<Instant>,
    /// Replay windows of the bound tag's poll counters.
    guard: PollGuard,
}

impl<S, A> Tag<S, A> {
    fn new(now: Instant, tag: u32) -> Self {
        Self {
            session: None,
            held: VecDeque::new(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            queued_split: 0,
            fragmenter: Fragmenter::new(tag as u16 ^ (tag >> 16) as u16),
            seen: HashMap::new(),
            seen_order: VecDeque::new(),
            caps: VecDeque::new(),
            other_type_at: None,
            last_seen: now,
            last_keepalive: None,
            guard: PollGuard::new(),
        }
    }

    /// Whether a query of `qtype` is a resolver's minimisation step. A
    /// resolver that minimises query names asks A (or AAAA) at the names
    /// between the apex and the full one, and unbound at the full name too,
    /// before it asks the type the client asked. Such a step shares the
    /// real query's tag and `qseq` but is not the client's: it must not
    /// take downstream data (the resolver throws the answer away), shrink
    /// the tag's fragments to fit A answers, nor make the real query look
    /// like a retry. A client on A or AAAA asks nothing else (but a rare
    /// probe), so its queries are taken as they are.
    fn minimisation_step(&self, qtype: RecordType, now: Instant) -> bool {
        matches!(qtype, RecordType::A | RecordType::AAAA)
            && self
                .other_type_at
                .is_some_and(|t| now.saturating_duration_since(t) < MINIMISATION_WINDOW)
    }

    /// The fragment length for a message of `len` bytes: as many equal
    /// pieces as pack the answers to the tag's recent queries best. A
    /// 1452-byte packet in answers of 1160 goes as four pieces, three to an
    /// answer: 1089 bytes an answer, where pieces sized for 512-byte answers
    /// carried about 830.
    fn fragment_len(&self, len: usize) -> usize {
        packing_fragment_len(len, self.answer_rooms(&mut [0; RECENT_ANSWERS]))
    }

    /// Payload room (after the header) of the answers to the tag's recent
    /// queries; before any, that of a 512-byte answer to a full-length name.
    /// Written into `rooms` (no allocation: this runs for every message).
    fn answer_rooms<'r>(&self, rooms: &'r mut [usize; RECENT_ANSWERS]) -> &'r mut [usize] {
        if self.caps.is_empty() {
            let first = dns::downstream_capacity(dns::MAX_NAME_LEN + 2, None);
            rooms[0] = first.saturating_sub(DOWN_HEADER_LEN);
            return &mut rooms[..1];
        }
        for (room, cap) in rooms.iter_mut().zip(&self.caps) {
            *room = cap.saturating_sub(DOWN_HEADER_LEN);
        }
        &mut rooms[..self.caps.len()]
    }

    /// Fragments for an answer of `capacity` payload bytes (its header
    /// included), from the queue: the first that fit, looking a few
    /// fragments ahead (pieces of different messages differ in size, and
    /// the client reassembles them in any order).
    fn take_payload(&mut self, capacity: usize, stats: &mut ListenerStats) -> Vec<u8> {
        let capacity = capacity.saturating_sub(DOWN_HEADER_LEN);
        // Pieces were sized for recent answers; one that fits none of them
        // (nor this one) never will: the client's path shrank.
        let largest_room = self.caps.iter().copied().max().unwrap_or(0);
        let largest_room = capacity.max(largest_room.saturating_sub(DOWN_HEADER_LEN));
        let mut payload = Vec::new();
        let mut i = 0;
        while i < self.queue.len().min(PACK_LOOKAHEAD) {
            let need = DOWN_LEN_PREFIX + self.queue[i].1.len();
            if payload.len() + need <= capacity {
                let f = self.remove_queued(i).expect("checked");
                super::push_fragment(&mut payload, &f);
            } else if need > largest_room {
                self.remove_queued(i);
                stats.oversize += 1;
            } else {
                // For a larger answer (this query's name is longer).
                i += 1;
            }
        }
        payload
    }

    fn remove_queued(&mut self, i: usize) -> Option<Vec<u8>> {
        let (_, f) = self.queue.remove(i)?;
        self.queued_bytes -= f.len();
        self.queued_split -= usize::from(is_split_piece(&f));
        Some(f)
    }

    fn push_queued(&mut self, now: Instant, f: Vec<u8>, front: bool) {
        self.queued_bytes += f.len();
        self.queued_split += usize::from(is_split_piece(&f));
        if front {
            self.queue.push_front((now, f));
        } else {
            self.queue.push_back((now, f));
        }
    }

    /// Whether an answer with `room` payload bytes (after its header) had
    /// better wait for more data ([`FILL_WAIT`]): all that is queued is
    /// pieces of split messages, too few to fill it, queued just now.
    fn waits_to_fill(&self, room: usize, now: Instant) -> bool {
        let Some(&(oldest, _)) = self.queue.front() else {
            return false;
        };
        self.queued_split == self.queue.len()
            && self.queued_bytes + DOWN_LEN_PREFIX * self.queue.len() < room
            && now.saturating_duration_since(oldest) < FILL_WAIT
    }

    /// When queued pieces stop waiting to fill an answer, if they wait.
    fn fill_deadline(&self) -> Option<Instant> {
        if self.held.is_empty() {
            return None;
        }
        self.queue.front().map(|&(at, _)| at + FILL_WAIT)
    }

    /// Whether a new message of `bytes` finds no room: the queue full, or
    /// its oldest fragment waiting too long already.
    fn queue_full(&self, now: Instant, bytes: usize) -> bool {
        self.queued_bytes + bytes > MAX_QUEUED_BYTES
            || self
                .queue
                .front()
                .is_some_and(|&(at, _)| now.saturating_duration_since(at) >= MAX_QUEUE_WAIT)
    }

    /// The answer's header: whether it waited, and what is left queued.
    fn header(&self, held: bool, option_read: bool) -> DownHeader {
        DownHeader {
            held,
            option_read,
            backlog: u8::try_from(self.queue.len()).unwrap_or(u8::MAX),
        }
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
    /// Queries held over all tags.
    held_total: usize,
    out: VecDeque<Transmit<A>>,
    scratch: Box<[u8]>,
    name_errors: NameErrors,
    stats: ListenerStats,
}

/// A query of a tag, decoded.
struct Decoded {
    header: UpHeader,
    /// Bytes of the payload (name and option) in `scratch`.
    len: usize,
    /// What follows the header.
    kind: BodyKind,
    option_read: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Poll,
    Fragment,
    Probe { pad_answer: bool },
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
            held_total: 0,
            out: VecDeque::new(),
            scratch: vec![0; MAX_UPSTREAM_PAYLOAD + MAX_OPTION_PAYLOAD].into_boxed_slice(),
            name_errors: NameErrors::new(),
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
            answer_room: {
                let mut rooms = [0; RECENT_ANSWERS];
                let rooms = t.answer_rooms(&mut rooms);
                rooms.sort_unstable();
                rooms[rooms.len() / 2]
            },
        })
    }

    /// Queries held over all tags.
    pub fn held(&self) -> usize {
        self.held_total
    }

    /// The next response to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit<A>> {
        self.out.pop_front()
    }

    /// The payload of a tunnel query (name, then option) into `scratch`:
    /// header and what follows. `None`: not tunnel data (the apex answers).
    fn decode(&mut self, q: &Query) -> Option<Decoded> {
        q.answer_type()?;
        let n = decode_name(&self.domain, &q.name, &mut self.scratch).ok()?;
        let option = (q.option.len() <= MAX_OPTION_PAYLOAD).then_some(&q.option[..]);
        let option_read = option.is_some_and(|o| !o.is_empty());
        let extra = option.map_or(0, <[u8]>::len);
        self.scratch[n..n + extra].copy_from_slice(&q.option[..extra]);
        let len = n + extra;
        let (header, rest) = UpHeader::parse(&self.scratch[..len])?;
        let kind = match UpBody::parse(rest)? {
            UpBody::Poll => BodyKind::Poll,
            UpBody::Fragment(_) => BodyKind::Fragment,
            UpBody::Padding { pad_answer } => BodyKind::Probe { pad_answer },
        };
        Some(Decoded {
            header,
            len,
            kind,
            option_read,
        })
    }

    /// A datagram from a resolver at `from`. Answers (now or later) go out
    /// through [`DnsListener::poll_transmit`]; a complete upstream message
    /// comes back.
    ///
    /// A query of a tag bound to a session must carry an authenticator of
    /// one of the session's keypairs (`keys` checks it): a forged one is
    /// answered at once, empty, and its fragment dropped; an authentic one
    /// whose counter was taken before is a retry (answered as its first
    /// copy is) or, if no copy is remembered, a replay (answered empty).
    pub fn handle_query(
        &mut self,
        now: Instant,
        from: A,
        bytes: &[u8],
        keys: &impl PollKeys<S>,
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
        let Some(d) = self.decode(&q) else {
            if self.domain.is_host(&q.name) {
                self.stats.apex += 1;
                self.reply(from, build_apex_answer(&q, &self.domain));
            } else {
                self.answer_below_apex(now, from, &q);
            }
            return None;
        };
        if let Some(label) = self.domain.label_below(&q.name) {
            self.name_errors.on_tunnel_query(label);
        }
        self.stats.queries += 1;
        if d.option_read {
            self.stats.options += 1;
        }
        let h = d.header;
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
        if tag.minimisation_step(q.qtype, now) {
            // Answered at once and empty, remembered nowhere, its counter
            // not taken; its fragment (the real query brings it again) may
            // complete a message of a tag no session has yet.
            self.stats.minimisation_steps += 1;
            self.answer_now(from, q, h.down_limit, bound, Vec::new());
            if bound {
                return None;
            }
            return self.deliver(now, h.tag, &d);
        }
        let check = match tag.session {
            Some(s) => keys.check(s, &mut tag.guard, &h),
            None => None,
        };
        match check {
            Some(PollCheck::Forged) => {
                // Not the client's: nothing of its downstream, no more bytes
                // than an ordinary reply, its fragment dropped.
                self.stats.forged += 1;
                self.answer_now(from, q, h.down_limit, false, Vec::new());
                return None;
            }
            Some(PollCheck::Repeat(_)) if !tag.seen.contains_key(&h.qseq) => {
                // Authentic, but its counter was taken and no answer is
                // remembered: a replay (or a retry too late). Nothing new.
                // Marked held: its delay (a resolver's retry) says
                // nothing of the path, and the client must not time it.
                self.stats.replayed += 1;
                let mut q = q;
                limit_query(&mut q, h.down_limit, bound);
                let header = DownHeader {
                    held: true,
                    ..DownHeader::default()
                };
                self.reply_data(from, &q, header, Vec::new());
                return self.deliver(now, h.tag, &d);
            }
            Some(PollCheck::Fresh(_)) => {
                // A new query: an answer remembered under its qseq belongs
                // to the counter's previous round.
                if matches!(tag.seen.get(&h.qseq), Some(Seen::Answered(_))) {
                    tag.seen.remove(&h.qseq);
                }
            }
            Some(PollCheck::Repeat(_)) | None => {}
        }
        if !matches!(q.qtype, RecordType::A | RecordType::AAAA) {
            tag.other_type_at = Some(now);
        }
        let mut q = q;
        limit_query(&mut q, h.down_limit, bound);

        if self.retried(now, from.clone(), &q, h.tag, h.qseq) {
            return None;
        }
        let tag = self.tags.get_mut(&h.tag).expect("checked");
        tag.seen.insert(h.qseq, Seen::Held);
        tag.seen_order.push_back((h.qseq, now));
        // Fragments are sized for the answers to the tag's recent queries
        // (probes ask other sizes on purpose). A retry after TC that asks
        // less may not carry them all: the rest wait for later answers.
        let capacity = q.answer_capacity(&self.domain);
        if !matches!(d.kind, BodyKind::Probe { .. }) {
            tag.caps.push_back(capacity);
            if tag.caps.len() > RECENT_ANSWERS {
                tag.caps.pop_front();
            }
        }

        let has_fragment = d.kind == BodyKind::Fragment;
        let room = capacity.saturating_sub(DOWN_HEADER_LEN);
        let answer_at_once = minimised_maybe
            || h.prompt
            || (!tag.queue.is_empty() && !tag.waits_to_fill(room, now))
            || matches!(d.kind, BodyKind::Probe { .. })
            || (has_fragment && tag.held.len() >= HOLD_WITH_DATA)
            || self.held_total >= MAX_HELD_TOTAL
            || (!bound && self.unbound_held >= MAX_HELD_UNBOUND_TOTAL);
        if answer_at_once {
            if let BodyKind::Probe { .. } = d.kind {
                self.stats.probes += 1;
            }
            let pad = matches!(d.kind, BodyKind::Probe { pad_answer: true });
            self.answer_at_once(now, from, &q, h.tag, h.qseq, d.option_read, pad);
        } else {
            self.hold_query(now, from, q, h.tag, h.qseq, d.option_read);
        }
        if !has_fragment {
            return None;
        }
        self.deliver(now, h.tag, &d)
    }

    /// The fragment of a query decoded into `scratch` to the reassembler:
    /// the message it completes, if any.
    fn deliver(&mut self, now: Instant, tag: u32, d: &Decoded) -> Option<Delivered<'_, S>> {
        if d.kind != BodyKind::Fragment {
            return None;
        }
        let session = self.tags.get(&tag).and_then(|t| t.session);
        let fragment = Fragment::parse(&self.scratch[UP_HEADER_LEN..d.len]).ok()?;
        let message = self.reassembler.push(now, tag, fragment)?;
        Some(Delivered {
            tag,
            session,
            message,
        })
    }

    /// A resolver's retry of a query of `tag` seen before: never process
    /// its fragment twice. A held one is superseded (the resolver waits
    /// for the newest copy); an answered one gets the same fragments again,
    /// as many as fit (a client re-asking after TC takes smaller answers),
    /// the rest going back to the front of the queue. Whether it was one.
    fn retried(&mut self, now: Instant, from: A, q: &Query, tag: u32, qseq: u16) -> bool {
        let t = self.tags.get_mut(&tag).expect("checked");
        match t.seen.get(&qseq) {
            None => false,
            Some(Seen::Held) => {
                // The resolver waits for its newest copy: it takes the
                // query's place. (Answering every copy instead stalled
                // uploads through unbound.)
                self.stats.retries += 1;
                self.stats.superseded += 1;
                if let Some(held) = t.held.iter_mut().find(|x| x.qseq == qseq) {
                    held.to = from;
                    held.query = q.clone();
                }
                true
            }
            Some(Seen::Answered(old)) => {
                self.stats.retries += 1;
                let old = old.clone();
                let capacity = q
                    .answer_capacity(&self.domain)
                    .saturating_sub(DOWN_HEADER_LEN);
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
                    t.push_queued(now, b, true);
                }
                t.remember_answer(qseq, &payload, now);
                // The resolver's retry delayed it: no sample of the path.
                let header = t.header(true, false);
                self.reply_data(from, q, header, payload);
                self.flush(tag, now);
                true
            }
        }
    }

    /// Answer a new query of `tag` now, with what is queued (padded to the
    /// answer's limit for a probe that asks).
    #[allow(clippy::too_many_arguments)] // one call site, each argument named
    fn answer_at_once(
        &mut self,
        now: Instant,
        from: A,
        q: &Query,
        tag: u32,
        qseq: u16,
        option_read: bool,
        pad: bool,
    ) {
        let t = self.tags.get_mut(&tag).expect("checked");
        let capacity = q.answer_capacity(&self.domain);
        let mut payload = t.take_payload(capacity, &mut self.stats);
        if pad {
            super::pad_to(&mut payload, capacity.saturating_sub(DOWN_HEADER_LEN));
        }
        t.remember_answer(qseq, &payload, now);
        let header = t.header(false, option_read);
        self.reply_data(from, q, header, payload);
    }

    /// Hold a new query of `tag` until data comes or the hold ends; the
    /// oldest held goes out empty beyond the tag's limit.
    fn hold_query(
        &mut self,
        now: Instant,
        from: A,
        query: Query,
        tag: u32,
        qseq: u16,
        option_read: bool,
    ) {
        let t = self.tags.get_mut(&tag).expect("checked");
        let bound = t.session.is_some();
        t.held.push_back(Held {
            to: from,
            query,
            qseq,
            arrived: now,
            option_read,
        });
        self.held_total += 1;
        if !bound {
            self.unbound_held += 1;
        }
        let max_held = if bound { MAX_HELD } else { MAX_HELD_UNBOUND };
        if t.held.len() > max_held {
            let old = t.held.pop_front().expect("over the limit");
            self.held_total -= 1;
            if !bound {
                self.unbound_held -= 1;
            }
            t.remember_answer(old.qseq, &[], now);
            let header = t.header(true, old.option_read);
            let out = (&mut self.out, &mut self.stats, &self.domain);
            answer_held(out, old, header, Vec::new());
        }
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
        let t = self.tags.get_mut(&tag).ok_or(DropReason::NoSession)?;
        let split = t.fragmenter.split(message, t.fragment_len(message.len()))?;
        let bytes = message.len() + usize::from(split.count()) * crate::frag::HEADER_LEN;
        if t.queue_full(now, bytes) {
            self.stats.queue_full += 1;
            return Ok(());
        }
        for f in split.fragments() {
            let mut b = vec![0; f.wire_len()];
            f.emit(&mut b).expect("sized");
            t.push_queued(now, b, false);
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
        let fills = self.tags.values().filter_map(Tag::fill_deadline);
        holds
            .chain(idle)
            .chain(fills)
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
                self.held_total -= 1;
                if t.session.is_none() {
                    self.unbound_held -= 1;
                }
                let capacity = h.query.answer_capacity(&self.domain);
                let mut payload = t.take_payload(capacity, &mut self.stats);
                let ka_due = t
                    .last_keepalive
                    .is_none_or(|at| now.saturating_duration_since(at) >= KEEPALIVE_EVERY);
                let room = capacity.saturating_sub(DOWN_HEADER_LEN + DOWN_LEN_PREFIX);
                if let (true, true, Some(s)) = (payload.is_empty(), ka_due, t.session)
                    && let Some(ka) = keepalive(s)
                    && let Ok(split) = t.fragmenter.split(&ka, room)
                    && split.count() == 1
                {
                    let f = split.fragment(0).expect("one");
                    let mut b = vec![0; f.wire_len()];
                    f.emit(&mut b).expect("sized");
                    super::push_fragment(&mut payload, &b);
                    t.last_keepalive = Some(now);
                }
                t.remember_answer(h.qseq, &payload, now);
                let header = t.header(true, h.option_read);
                let out = (&mut self.out, &mut self.stats, &self.domain);
                answer_held(out, h, header, payload);
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
        // Pieces that waited to fill an answer go as they are.
        let filled: Vec<u32> = self
            .tags
            .iter()
            .filter(|(_, t)| t.fill_deadline().is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in filled {
            self.flush(id, now);
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
        self.held_total -= t.held.len();
        while let Some(h) = t.held.pop_front() {
            let header = t.header(true, h.option_read);
            let out = (&mut self.out, &mut self.stats, &self.domain);
            answer_held(out, h, header, Vec::new());
        }
    }

    /// Answer `tag`'s held queries while fragments wait.
    fn flush(&mut self, tag: u32, now: Instant) {
        let Some(t) = self.tags.get_mut(&tag) else {
            return;
        };
        while let Some(h) = t.held.front() {
            let capacity = h.query.answer_capacity(&self.domain);
            let room = capacity.saturating_sub(DOWN_HEADER_LEN);
            if t.queue.is_empty() || t.waits_to_fill(room, now) {
                break;
            }
            let h = t.held.pop_front().expect("checked");
            self.held_total -= 1;
            if t.session.is_none() {
                self.unbound_held -= 1;
            }
            let payload = t.take_payload(capacity, &mut self.stats);
            t.remember_answer(h.qseq, &payload, now);
            let header = t.header(true, h.option_read);
            let out = (&mut self.out, &mut self.stats, &self.domain);
            answer_held(out, h, header, payload);
        }
    }

    /// A name below the apex without tunnel data: a minimising resolver's
    /// first step, answered NXDOMAIN so that it sends the full name at once
    /// (see [`NameErrors`]), or NODATA while that fails.
    fn answer_below_apex(&mut self, now: Instant, from: A, q: &Query) {
        let label = self.domain.label_below(&q.name).unwrap_or_default();
        if self.name_errors.answer_nxdomain(now, label) {
            self.stats.name_errors += 1;
            self.reply(from, build_name_error(q, &self.domain));
        } else {
            self.stats.apex += 1;
            self.reply(from, build_apex_answer(q, &self.domain));
        }
        self.stats.name_error_fallbacks = self.name_errors.fallbacks;
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
        self.reply_data(to, &q, DownHeader::default(), payload);
    }

    fn reply_data(&mut self, to: A, q: &Query, header: DownHeader, pieces: Vec<u8>) {
        reply_data(
            (&mut self.out, &mut self.stats, &self.domain),
            to,
            q,
            header,
            pieces,
        );
    }

    fn reply(&mut self, to: A, bytes: Result<Vec<u8>, dns::DnsError>) {
        if let Ok(bytes) = bytes {
            self.out.push_back(Transmit { to, bytes });
        }
    }
}

/// Answer a held query with `header` and `pieces`.
fn answer_held<A>(
    out: (&mut VecDeque<Transmit<A>>, &mut ListenerStats, &Domain),
    h: Held<A>,
    header: DownHeader,
    pieces: Vec<u8>,
) {
    reply_data(out, h.to, &h.query, header, pieces);
}

/// Answer `q` with `header` and `pieces` in records of its type; if even
/// an empty answer of that type does not fit (a very long domain), NODATA.
fn reply_data<A>(
    (out, stats, domain): (&mut VecDeque<Transmit<A>>, &mut ListenerStats, &Domain),
    to: A,
    q: &Query,
    header: DownHeader,
    pieces: Vec<u8>,
) {
    let carries = super::fragments(&pieces).next().is_some();
    let mut payload = Vec::with_capacity(DOWN_HEADER_LEN + pieces.len());
    payload.extend_from_slice(&header.to_bytes());
    payload.extend_from_slice(&pieces);
    let Ok(bytes) = build_answer(q, domain, &payload)
        .or_else(|_| build_answer(q, domain, &header.to_bytes()))
        .or_else(|_| build_apex_answer(q, domain))
    else {
        return;
    };
    if carries {
        stats.answered_data += 1;
    } else {
        stats.answered_empty += 1;
    }
    out.push_back(Transmit { to, bytes });
}

/// The fragment length that splits `len` bytes into the equal pieces that
/// fill answers of `rooms` bytes (after the header; the answers to come are
/// taken to be like these) best: the fewest answers a message, then the
/// fewest pieces. Each piece costs its fragment header and its length
/// prefix. Not sized for the smallest room: during a download most queries
/// are bare polls with short names, whose answers take three pieces of a
/// packet, and the few that carry the uplink's ACKs echo a long name and
/// take two; pieces for those carried 726 bytes an answer instead of 1089
/// (through unbound, whose load is per query, that is the download's
/// rate). A piece too big for a smaller answer waits for a larger one.
fn packing_fragment_len(len: usize, rooms: &[usize]) -> usize {
    let overhead = crate::frag::HEADER_LEN + DOWN_LEN_PREFIX;
    let room = rooms.iter().copied().max().unwrap_or(0);
    let Some(largest) = room.checked_sub(overhead).filter(|&c| c > 0) else {
        return room.saturating_sub(DOWN_LEN_PREFIX);
    };
    let fewest = len.div_ceil(largest).max(1);
    let smallest = rooms.iter().copied().min().unwrap_or(room);
    let most = len.div_ceil(smallest.saturating_sub(overhead).max(1)) + MAX_EXTRA_PIECES;
    // Answers a message takes with n pieces: n / the pieces an answer takes
    // on average, compared as fractions (n / total, total over the rooms).
    // More pieces must take 1/32 fewer answers: each one lost loses the
    // message.
    let mut best = (fewest, 0);
    for n in fewest..=most.max(fewest).min(crate::frag::MAX_FRAGMENTS) {
        let chunk = len.div_ceil(n);
        let total: usize = rooms.iter().map(|r| r / (chunk + overhead)).sum();
        if total > 0 && (best.1 == 0 || 32 * n * best.1 < 31 * best.0 * total) {
            best = (n, total);
        }
    }
    len.div_ceil(best.0) + crate::frag::HEADER_LEN
}

/// Whether a queued piece (a fragment on the wire: its header's fourth byte
/// is the count, see `frag`) is one of several.
fn is_split_piece(piece: &[u8]) -> bool {
    piece.get(3).is_some_and(|&count| count > 1)
}

/// Lower the query's EDNS0 size to what the answer may have: the client's
/// limit, [`MAX_DOWN`], and an ordinary reply's 512 bytes for an unbound
/// tag.
fn limit_query(q: &mut Query, down_limit: usize, bound: bool) {
    let mut limit = down_limit.clamp(CLASSIC_SIZE, usize::from(MAX_DOWN));
    if !bound {
        limit = CLASSIC_SIZE;
    }
    if let Some(e) = q.edns_size {
        q.edns_size = Some(e.min(limit as u16));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frag::{HEADER_LEN, MAX_FRAGMENTS};
    use proptest::prelude::*;

    /// Pieces, and answers a message takes, for `len` bytes split to
    /// fragments of `fragment_len` in answers of `room`.
    fn answers(len: usize, fragment_len: usize, room: usize) -> (usize, f64) {
        let pieces = len.div_ceil(fragment_len - HEADER_LEN).max(1);
        let chunk = len.div_ceil(pieces);
        let per_answer = room / (chunk + HEADER_LEN + DOWN_LEN_PREFIX);
        (pieces, pieces as f64 / per_answer as f64)
    }

    #[test]
    fn a_full_size_packet_packs_answers() {
        // 1452 bytes (a 1420-byte packet sealed): four pieces, three to an
        // answer of 1161, where halves would go one to an answer.
        assert_eq!(
            answers(1452, packing_fragment_len(1452, &[1161]), 1161).0,
            4
        );
        // Answers of 1063: three pieces, two to an answer.
        assert_eq!(
            answers(1452, packing_fragment_len(1452, &[1063]), 1063).0,
            3
        );
        // A small message goes whole.
        assert_eq!(packing_fragment_len(84, &[1161]), 84 + HEADER_LEN);
    }

    /// A piece sized for a poll's answer waits through a query with a
    /// longer name (a smaller answer) for the next poll; one larger than
    /// any recent answer is dropped and counted.
    #[test]
    fn a_piece_waits_for_an_answer_it_fits() {
        let now = Instant::now();
        let mut stats = ListenerStats::default();
        let mut t = Tag::<u32, u32>::new(now, 7);
        t.caps.extend([1161, 1161]);
        t.push_queued(now, vec![1; 900], false);
        t.push_queued(now, vec![2; 100], false);
        // A long-named query: only the small piece fits.
        let p = t.take_payload(800, &mut stats);
        assert_eq!(super::super::fragments(&p).count(), 1);
        assert_eq!((t.queue.len(), stats.oversize), (1, 0));
        // The next poll takes the large one.
        let p = t.take_payload(1161, &mut stats);
        assert_eq!(super::super::fragments(&p).count(), 1);
        assert!(t.queue.is_empty());
        // The path shrank below a queued piece: dropped, counted.
        t.push_queued(now, vec![3; 2000], false);
        assert!(t.take_payload(1161, &mut stats).is_empty());
        assert_eq!((t.queue.len(), stats.oversize), (0, 1));
    }

    proptest! {
        #[test]
        fn pieces_fit_and_pack_no_worse_than_the_fewest(len in 1usize..=65535, room in 16usize..=4080) {
            let largest = room - HEADER_LEN - DOWN_LEN_PREFIX;
            prop_assume!(len.div_ceil(largest) <= MAX_FRAGMENTS);
            let f = packing_fragment_len(len, &[room]);
            prop_assert!(f > HEADER_LEN);
            prop_assert!(f + DOWN_LEN_PREFIX <= room, "{f} in {room}");
            let (pieces, took) = answers(len, f, room);
            prop_assert!(pieces <= MAX_FRAGMENTS);
            let (_, fewest) = answers(len, largest + HEADER_LEN, room);
            prop_assert!(took <= fewest, "{took} > {fewest}");
        }

        /// Over several rooms, pieces fit the largest, and the answers they
        /// take on average are no more than those of pieces that fit the
        /// smallest (but for the 1/32 that more pieces must gain).
        #[test]
        fn pieces_pack_mixed_answers_no_worse_than_for_the_smallest(
            len in 1usize..=65535,
            rooms in proptest::collection::vec(16usize..=4080, 1..8),
        ) {
            let (small, large) = (*rooms.iter().min().unwrap(), *rooms.iter().max().unwrap());
            let fewest = len.div_ceil(small - HEADER_LEN - DOWN_LEN_PREFIX);
            prop_assume!(fewest + MAX_EXTRA_PIECES <= MAX_FRAGMENTS);
            let f = packing_fragment_len(len, &rooms);
            prop_assert!(f > HEADER_LEN);
            prop_assert!(f + DOWN_LEN_PREFIX <= large, "{f} in {large}");
            // Answers a message takes on average over the rooms.
            let mean = |f: usize| {
                let pieces = len.div_ceil(f - HEADER_LEN).max(1);
                let chunk = len.div_ceil(pieces) + HEADER_LEN + DOWN_LEN_PREFIX;
                let per: usize = rooms.iter().map(|r| r / chunk).sum();
                pieces as f64 * rooms.len() as f64 / per as f64
            };
            let for_smallest = packing_fragment_len(len, &[small]);
            let bound = mean(for_smallest) * 32.0 / 31.0 + 1e-9;
            prop_assert!(mean(f) <= bound, "{} > {bound}", mean(f));
        }
    }

    #[test]
    fn a_download_through_a_resolver_fills_poll_answers() {
        // Seven polls' answers and one that echoes a long name: four
        // pieces, three to a poll's answer (not two halves, one to each).
        let f = packing_fragment_len(1452, &[1161, 1161, 1161, 1161, 940, 1161, 1161, 1161]);
        assert_eq!(answers(1452, f, 1161).0, 4);
    }
}

//! The ICMP echo transport's two halves. Tunnel messages ride behind
//! [`MAGIC`] in echo requests (client to server) and echo replies (server
//! to client); the codec is [`wire::icmp`](crate::wire::icmp).
//!
//! The client ([`IcmpClient`]) sends every message as a request with its
//! own identifier and a running sequence number, and keeps bare requests
//! outstanding so the server always has one to answer with downstream
//! data. How fast requests go and how many are kept out follow a
//! [`Controller`] fed with what the path delivers: firewalls commonly pass
//! a few hundred echo requests a second and silently drop the rest, and
//! requests sent faster only get lost (then inner packets wait for the
//! pacing, in a short queue).
//!
//! The server ([`IcmpListener`]) holds each request ([`Parking`]) until
//! data or a keepalive answers it, exactly once: no reply is ever
//! unsolicited, so stateful firewalls and NATs let them all through.
//! Ordinary pings are answered at once, as the kernel would. Every reply
//! tells the client the request's number among the session's requests that
//! reached the server and how long it was held ([`ReplyInfo`]): from the
//! first the client counts its requests lost on the way (requests held
//! longest are answered first, and some are never answered), and without
//! the hold it measures true round trips.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::congestion::{self, Controller};
use super::poll::{Cadence, MAX_PARKED, Parking};
use crate::engine::SessionId;
use crate::wire::icmp::{self, Echo, Family, MAGIC, REPLY_OVERHEAD, REQUEST_OVERHEAD, ReplyInfo};
use crate::wire::message::TYPE_INIT;

/// Bytes in front of a tunnel message in a request: header and magic.
pub const HEADROOM: usize = REQUEST_OVERHEAD;
/// Bytes in front of a tunnel message in a reply: header, magic and
/// [`ReplyInfo`].
pub const REPLY_HEADROOM: usize = REPLY_OVERHEAD;

/// How the client's controller starts and what bounds it: at least the
/// idle number of requests out, at most half of what the server holds
/// (the other half is room for requests that carry data).
const CONGESTION: congestion::Config = congestion::Config {
    initial_rate: 1000.0,
    min_rate: 10.0,
    min_window: Cadence::ICMP.min_outstanding,
    max_window: Cadence::ICMP.max_outstanding,
    initial_rtt: Duration::from_millis(100),
};

/// Inner packets waiting for the pacing: at least this many...
const QUEUE_MIN: usize = 32;
/// ...or what the pacing sends in this long...
const QUEUE_TIME: Duration = Duration::from_millis(50);
/// ...and at most this many.
const QUEUE_MAX: usize = 2048;

/// Requests whose send time and count a client remembers.
const SENT_RING: usize = 1024;

/// More arrivals than requests sent between two replies than this (or
/// fewer than none) means the server's count restarted: a new baseline.
const COUNT_SLACK: i32 = 64;

/// Requests sent this much apart arrive in the order they were sent: one
/// missing from the server's count when a request sent this much later
/// arrived is lost, not overtaken. (In send time: the server answers in
/// the order requests arrive, but only as data comes for them, so replies
/// to requests overtaken on the way may come seconds apart.)
const REORDER_WINDOW: Duration = Duration::from_millis(20);

/// The client half: one server address, one echo identifier.
#[derive(Debug)]
pub struct IcmpClient {
    server: IpAddr,
    family: Family,
    id: u16,
    seq: u16,
    /// Keep bare requests outstanding (the path is in use).
    polling: bool,
    cc: Controller,
    /// The latest requests, by sequence number (a ring).
    sent: Vec<Sent>,
    /// The sequence numbers of the requests outstanding, oldest first.
    outstanding: VecDeque<u16>,
    /// Requests to keep outstanding: it doubles while replies bring data
    /// (downstream is busy: more requests should wait at the server) and
    /// shrinks back when they come back empty, within the window.
    target: usize,
    /// Requests sent that the server counts (all but handshake inits).
    counted: u32,
    /// The latest reply's request: our count and the server's ordinal.
    level: Option<(u32, u32)>,
    /// Requests sent after that one, given up on and counted lost already.
    presumed: u32,
    /// Losses the count showed, not confirmed yet: when the count showed
    /// them, when the latest of them was sent, how many. Requests overtaken
    /// on the way look lost until they arrive; those still missing when a
    /// request sent [`REORDER_WINDOW`] after them was counted are lost.
    unconfirmed: VecDeque<(Instant, Instant, u32)>,
    /// Inner packets (sealed messages) waiting for the pacing.
    queue: VecDeque<Vec<u8>>,
    spare: Vec<Vec<u8>>,
    /// When the pacing lets through what waits for it.
    paced_until: Option<Instant>,
    stats: IcmpClientStats,
}

/// What the client remembers of a request.
#[derive(Clone, Copy, Debug)]
struct Sent {
    seq: u16,
    at: Instant,
    /// Requests the server counts sent up to this one (`None`: an init).
    count: Option<u32>,
    /// Answered at once, out of the server's order: a probe or an init.
    prompt: bool,
    /// Not answered, lost or let go yet.
    open: bool,
}

/// What the status shows of a client's ICMP path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IcmpClientStats {
    /// Echo requests sent.
    pub requests: u64,
    /// Replies that carried a message for us.
    pub replies: u64,
    /// Requests given up on: a later one was answered first (the server
    /// answers its oldest first), or no reply came within the request
    /// timeout.
    pub unanswered: u64,
    /// Replies to requests given up on or let go already (overtaken on
    /// the way, or answered by a server that held more).
    pub late: u64,
    /// Requests that never reached the server, by its count.
    pub lost: u64,
    /// Requests outstanding now.
    pub outstanding: usize,
    /// Requests it keeps outstanding now.
    pub target: usize,
    /// The most requests it may keep outstanding (the congestion window).
    pub window: usize,
    /// The pacing rate, requests a second.
    pub rate: u64,
    /// The smoothed round trip (without the server's holds), once measured.
    pub rtt: Option<Duration>,
    /// Inner packets waiting for the pacing now.
    pub queued: usize,
    /// Inner packets dropped because too many waited.
    pub queue_dropped: u64,
    /// Requests wait for the pacing now.
    pub paced: bool,
}

/// An echo reply to one of our requests (see [`IcmpClient::unwrap`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpReply<'a> {
    /// The tunnel message it carries (empty: the server has no session).
    pub message: &'a [u8],
    /// When the request it answers was sent (long ago, if that request is
    /// too old to be remembered).
    pub asked: Instant,
    /// What to hand back to [`IcmpClient::replied`].
    pub meta: ReplyMeta,
}

/// What [`IcmpClient::replied`] needs of a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyMeta {
    seq: u16,
    info: ReplyInfo,
}

impl IcmpClient {
    /// A client of the server at `server`, with echo identifier `id`
    /// (random: replies to us are told from other pings' by it; NATs
    /// rewrite it on the way out and restore it on the way back).
    pub fn new(server: IpAddr, id: u16) -> Self {
        Self::with_start(server, id, Instant::now())
    }

    fn with_start(server: IpAddr, id: u16, now: Instant) -> Self {
        let never = Sent {
            seq: u16::MAX,
            // Sequence numbers not sent yet read as sent long ago.
            at: now,
            count: None,
            prompt: false,
            open: false,
        };
        Self {
            server,
            family: if server.is_ipv4() {
                Family::V4
            } else {
                Family::V6
            },
            id,
            seq: 0,
            polling: false,
            cc: Controller::new(CONGESTION, now),
            sent: vec![never; SENT_RING],
            outstanding: VecDeque::new(),
            target: Cadence::ICMP.min_outstanding,
            counted: 0,
            level: None,
            presumed: 0,
            unconfirmed: VecDeque::new(),
            queue: VecDeque::new(),
            spare: Vec::new(),
            paced_until: None,
            stats: IcmpClientStats::default(),
        }
    }

    /// The server's address.
    pub fn server(&self) -> IpAddr {
        self.server
    }

    /// ICMP or ICMPv6.
    pub fn family(&self) -> Family {
        self.family
    }

    /// Keep requests outstanding (or stop: a path not in use sends only
    /// what it is given, and drops inner packets still waiting).
    pub fn set_polling(&mut self, on: bool) {
        if on && !self.polling {
            self.target = Cadence::ICMP.min_outstanding;
        }
        if !on {
            self.stats.queue_dropped += self.queue.len() as u64;
            self.spare.extend(self.queue.drain(..));
            self.paced_until = None;
        }
        self.polling = on;
    }

    /// Frame the `len`-byte message at `buf[HEADROOM..]` as an echo
    /// request, to go at once; returns the ICMP message's length. `prompt`:
    /// the server answers it at once (a probe; an init is told by itself).
    pub fn frame(&mut self, now: Instant, buf: &mut [u8], len: usize, prompt: bool) -> usize {
        icmp::emit_magic(buf);
        let n = icmp::emit_echo(
            self.family,
            false,
            self.id,
            self.seq,
            buf,
            MAGIC.len() + len,
        );
        let init = len > 0 && buf[HEADROOM] == TYPE_INIT;
        let count = (!init).then(|| {
            self.counted = self.counted.wrapping_add(1);
            self.counted
        });
        let old = *self.slot(self.seq);
        if old.open {
            // Still out after a ring's worth of newer ones: given up on
            // (its slot is needed).
            if let Some(i) = self.outstanding.iter().position(|&q| q == old.seq) {
                self.outstanding.remove(i);
            }
            self.stats.unanswered += 1;
        }
        self.sent[usize::from(self.seq) % SENT_RING] = Sent {
            seq: self.seq,
            at: now,
            count,
            prompt: prompt || init,
            open: true,
        };
        if self.outstanding.len() >= MAX_PARKED {
            // The server holds no more either: it lets the oldest go.
            self.let_go_oldest();
        }
        self.outstanding.push_back(self.seq);
        self.seq = self.seq.wrapping_add(1);
        self.stats.requests += 1;
        self.cc.on_sent(now);
        n
    }

    /// An inner packet's `len`-byte message at `buf[HEADROOM..]`: framed
    /// as [`IcmpClient::frame`] does if the pacing lets it go now (its
    /// length), else queued behind the others waiting (`None`; they come
    /// out of [`IcmpClient::poll_queued`]), or dropped when too many wait.
    pub fn frame_packet(&mut self, now: Instant, buf: &mut [u8], len: usize) -> Option<usize> {
        if self.queue.is_empty() && self.cc.can_send(now) {
            return Some(self.frame(now, buf, len, false));
        }
        self.blocked(now);
        let room = (self.cc.pacing_rate() * QUEUE_TIME.as_secs_f64()) as usize;
        if self.queue.len() >= room.clamp(QUEUE_MIN, QUEUE_MAX) {
            self.stats.queue_dropped += 1; // tail drop, as a router queue would
            return None;
        }
        let mut b = self.spare.pop().unwrap_or_default();
        b.clear();
        b.extend_from_slice(buf.get(HEADROOM..HEADROOM + len)?);
        self.queue.push_back(b);
        None
    }

    /// The next inner packet that waited for the pacing, if it may go now:
    /// framed into `buf` (its length).
    pub fn poll_queued(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        if self.queue.is_empty() {
            return None;
        }
        if !self.cc.can_send(now) {
            self.blocked(now);
            return None;
        }
        self.paced_until = None;
        let msg = self.queue.pop_front()?;
        let len = msg.len();
        let fits = buf
            .get_mut(HEADROOM..HEADROOM + len)
            .map(|b| b.copy_from_slice(&msg));
        self.spare.push(msg);
        fits.map(|()| self.frame(now, buf, len, false))
    }

    /// An ICMP message from `from`: the reply, if it is one to us. The
    /// server holds requests for seconds, so a reply proves only that the
    /// path worked when its request went.
    pub fn unwrap<'a>(&self, from: IpAddr, bytes: &'a [u8]) -> Option<IcmpReply<'a>> {
        let echo = Echo::parse(self.family, bytes).ok()?;
        if from != self.server || !echo.reply || echo.id != self.id {
            return None;
        }
        let (info, message) = echo.tunnel_reply()?;
        let s = self.sent[usize::from(echo.seq) % SENT_RING];
        let asked = if s.seq == echo.seq {
            s.at
        } else {
            self.sent.iter().map(|s| s.at).min().expect("not empty")
        };
        Some(IcmpReply {
            message,
            asked,
            meta: ReplyMeta {
                seq: echo.seq,
                info,
            },
        })
    }

    /// A reply from [`IcmpClient::unwrap`] was taken: `authenticated` when
    /// its message opened (else it proves only that the request arrived:
    /// the server had no session), `carried_data` when it brought more
    /// than a keepalive (then more requests go out).
    pub fn replied(
        &mut self,
        now: Instant,
        meta: ReplyMeta,
        authenticated: bool,
        carried_data: bool,
    ) {
        self.stats.replies += 1;
        let s = self.sent[usize::from(meta.seq) % SENT_RING];
        if s.seq == meta.seq {
            self.answered(now, s);
            if authenticated {
                self.measured(now, s, meta.info);
            }
        }
        if self.polling {
            let window = self.cc.window();
            self.target = if carried_data {
                (self.target * 2).min(window)
            } else {
                self.target.saturating_sub(1)
            }
            .clamp(Cadence::ICMP.min_outstanding, window);
        }
    }

    /// How many bare requests to send now to keep the target outstanding
    /// (none while inner packets wait: they are requests too, and go first).
    pub fn polls_due(&mut self, now: Instant) -> usize {
        self.expire(now);
        if !self.polling || !self.queue.is_empty() {
            return 0;
        }
        let due = self.target.saturating_sub(self.outstanding.len());
        if due == 0 {
            self.paced_until = None;
            return 0;
        }
        if !self.cc.can_send(now) {
            self.blocked(now);
            return 0;
        }
        self.paced_until = None;
        due
    }

    /// Requests given up on so far (no reply within the request timeout,
    /// or a later one answered first).
    pub fn unanswered(&self) -> u64 {
        self.stats.unanswered
    }

    /// When [`IcmpClient::polls_due`] or [`IcmpClient::poll_queued`] next
    /// has something to do.
    pub fn next_timeout(&self) -> Option<Instant> {
        let oldest = self
            .outstanding
            .front()
            .map(|&seq| self.slot(seq).at + Cadence::ICMP.request_timeout);
        let waiting =
            !self.queue.is_empty() || (self.polling && self.outstanding.len() < self.target);
        let paced = self.paced_until.filter(|_| waiting);
        [oldest, paced].into_iter().flatten().min()
    }

    /// Counters, the controller's state and the queue.
    pub fn stats(&self) -> IcmpClientStats {
        let cc = self.cc.stats();
        IcmpClientStats {
            lost: cc.lost,
            outstanding: self.outstanding.len(),
            target: self.target,
            window: cc.window,
            rate: cc.rate.round() as u64,
            rtt: cc.srtt,
            queued: self.queue.len(),
            paced: self.paced_until.is_some(),
            ..self.stats
        }
    }

    fn slot(&self, seq: u16) -> &Sent {
        &self.sent[usize::from(seq) % SENT_RING]
    }

    fn slot_mut(&mut self, seq: u16) -> &mut Sent {
        &mut self.sent[usize::from(seq) % SENT_RING]
    }

    /// Something waits for the pacing.
    fn blocked(&mut self, now: Instant) {
        self.cc.on_blocked(now);
        self.paced_until = Some(self.cc.next_send_time(now));
    }

    /// The request `s` was answered: it is no longer outstanding, and
    /// neither is any sent well before it, unless it jumped the server's
    /// queue (a probe, an init): the server answers the requests it holds
    /// oldest first, so those were lost (or let go).
    fn answered(&mut self, now: Instant, s: Sent) {
        if !s.open {
            self.stats.late += 1;
            return;
        }
        self.slot_mut(s.seq).open = false;
        if let Some(i) = self.outstanding.iter().position(|&q| q == s.seq) {
            self.outstanding.remove(i);
        }
        if s.prompt {
            return;
        }
        // Requests reordered on the way may still come: some slack.
        let slack = (self.cc.srtt().unwrap_or_default() / 4).max(Duration::from_millis(2));
        let before = s.at.checked_sub(slack).unwrap_or(s.at);
        while let Some(&seq) = self.outstanding.front() {
            if self.slot(seq).at >= before {
                break;
            }
            self.outstanding.pop_front();
            self.slot_mut(seq).open = false;
            self.stats.unanswered += 1;
        }
        let _ = now;
    }

    /// What an authenticated reply to `s` tells: a round trip (without the
    /// server's hold), and how many requests reached the server since the
    /// last reply's.
    fn measured(&mut self, now: Instant, s: Sent, info: ReplyInfo) {
        let rtt = info
            .hold
            .and_then(|hold| now.checked_duration_since(s.at)?.checked_sub(hold));
        if let Some(rtt) = rtt {
            self.cc.on_rtt(now, s.at, rtt);
        }
        if let Some(count) = s.count {
            self.counted_sample(now, count, info.ordinal, s.at);
        }
    }

    /// The server had `ordinal` of our requests when the one we counted
    /// `count`-th (sent at `sent_at`) reached it. Against the last such
    /// sample: requests sent in between, minus those that arrived, were
    /// lost (fewer than none: the last sample's request was overtaken on
    /// the way by later ones, which is not loss).
    fn counted_sample(&mut self, now: Instant, count: u32, ordinal: u32, sent_at: Instant) {
        let Some((last_count, last_ordinal)) = self.level else {
            self.level = Some((count, ordinal));
            self.presumed = 0;
            return;
        };
        let sent = count.wrapping_sub(last_count) as i32;
        if sent <= 0 {
            return; // an older request's reply, overtaken on the way
        }
        let arrived = ordinal.wrapping_sub(last_ordinal) as i32;
        self.level = Some((count, ordinal));
        if !(-COUNT_SLACK..=sent + COUNT_SLACK).contains(&arrived) {
            self.presumed = 0; // the server's count restarted: a new baseline
            return;
        }
        if arrived > 0 {
            self.cc.on_delivered(now, sent_at, arrived as u64);
        }
        let lost = sent - arrived;
        if lost > 0 {
            // Some timed out and were counted already.
            let known = (lost as u32).min(self.presumed);
            self.presumed -= known;
            if lost as u32 > known {
                self.unconfirmed
                    .push_back((now, sent_at, lost as u32 - known));
            }
        } else if lost < 0 {
            // Requests that looked lost arrived after all.
            let mut found = lost.unsigned_abs();
            while found > 0 {
                let Some(last) = self.unconfirmed.back_mut() else {
                    break;
                };
                let n = found.min(last.2);
                last.2 -= n;
                found -= n;
                if last.2 == 0 {
                    self.unconfirmed.pop_back();
                }
            }
            if found > 0 {
                self.cc.on_late(now, sent_at, found.into());
            }
        }
        self.confirm_losses(now, |_, sent| sent + REORDER_WINDOW <= sent_at);
    }

    /// Losses the count showed that no late arrival took back: confirmed
    /// when a request sent well after them was counted (`confirmed` gets
    /// when they were seen and when their latest was sent), or after the
    /// request timeout.
    fn confirm_losses(&mut self, now: Instant, confirmed: impl Fn(Instant, Instant) -> bool) {
        while let Some(&(seen, sent, n)) = self.unconfirmed.front() {
            let timed_out = now.saturating_duration_since(seen) >= Cadence::ICMP.request_timeout;
            if !(timed_out || confirmed(seen, sent)) {
                break;
            }
            self.unconfirmed.pop_front();
            self.cc.on_lost(now, sent, n.into());
        }
    }

    /// Give up on requests unanswered for the request timeout: lost (the
    /// server answers within its hold). Those sent after the last reply's
    /// request count as lost now; a later reply's count covers them again.
    fn expire(&mut self, now: Instant) {
        self.confirm_losses(now, |_, _| false);
        while let Some(&seq) = self.outstanding.front() {
            let s = *self.slot(seq);
            if now.saturating_duration_since(s.at) < Cadence::ICMP.request_timeout {
                break;
            }
            self.outstanding.pop_front();
            self.slot_mut(seq).open = false;
            self.stats.unanswered += 1;
            let after_sample = match (s.count, self.level) {
                (Some(c), Some((last, _))) => c.wrapping_sub(last) as i32 > 0,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if after_sample {
                self.presumed += 1;
                self.cc.on_lost(now, s.at, 1);
            }
        }
    }

    /// The server holds at most [`MAX_PARKED`] requests and lets the
    /// oldest go unanswered: so does the client.
    fn let_go_oldest(&mut self) {
        if let Some(seq) = self.outstanding.pop_front() {
            self.slot_mut(seq).open = false;
        }
    }
}

/// A request the server holds: where its reply goes, from which of our
/// addresses, and what it echoes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    /// The client's (public) address.
    pub ip: IpAddr,
    /// Our address the request was sent to: the reply leaves from it.
    pub local: IpAddr,
    /// The echo identifier.
    pub id: u16,
    /// The echo sequence number.
    pub seq: u16,
}

/// A tunnel request that reached the server, as its reply tells of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrived {
    /// The request.
    pub request: Request,
    /// Its number among its session's requests that reached us (0 for a
    /// handshake's init, which no session counts).
    pub ordinal: u32,
    /// When it arrived.
    pub at: Instant,
}

impl Arrived {
    /// An init's request, answered as it arrives.
    pub fn uncounted(request: Request, now: Instant) -> Self {
        Self {
            request,
            ordinal: 0,
            at: now,
        }
    }
}

/// What an echo request that reached the server is.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// An ordinary ping: answer it with this payload, now.
    Ping(Request, &'a [u8]),
    /// A request carrying a tunnel message.
    Tunnel(Request, &'a [u8]),
}

/// A held request is answered at once, with a keepalive, when more arrive
/// than the server holds and none was answered for this long: a client
/// that only sends (an upload with nothing coming back) still hears how
/// many of its requests arrive, for its congestion control.
pub const QUIET_ANSWER: Duration = Duration::from_millis(20);

/// What the listener keeps per session besides the held requests.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    /// The receiver index of its latest request (see [`IcmpListener::park`]).
    index: Option<u32>,
    /// Its requests that arrived.
    arrivals: u32,
    /// When one of its requests was last answered.
    answered: Option<Instant>,
}

/// The server half, one per ICMP socket: the requests held per session.
pub struct IcmpListener {
    family: Family,
    parking: Parking<SessionId, Arrived>,
    sessions: HashMap<SessionId, Counts>,
}

impl IcmpListener {
    /// A listener for echo requests of `family`.
    pub fn new(family: Family) -> Self {
        Self {
            family,
            parking: Parking::new(Cadence::ICMP.hold),
            sessions: HashMap::new(),
        }
    }

    /// ICMP or ICMPv6.
    pub fn family(&self) -> Family {
        self.family
    }

    /// Echo requests held, over all sessions.
    pub fn held(&self) -> usize {
        self.parking.held()
    }

    /// Downstream messages dropped because a session's queue was full.
    pub fn dropped(&self) -> u64 {
        self.parking.dropped()
    }

    /// An ICMP message from `from` to our address `local` (`None`: a
    /// broadcast or multicast, which gets no answer, as from the kernel).
    pub fn classify<'a>(
        &self,
        from: IpAddr,
        local: Option<IpAddr>,
        bytes: &'a [u8],
    ) -> Option<Incoming<'a>> {
        let local = local?;
        let echo = Echo::parse(self.family, bytes).ok()?;
        if echo.reply {
            return None;
        }
        let request = Request {
            ip: from,
            local,
            id: echo.id,
            seq: echo.seq,
        };
        Some(match echo.tunnel_message() {
            Some(msg) => Incoming::Tunnel(request, msg),
            None => Incoming::Ping(request, echo.payload),
        })
    }

    /// Write the echo reply to an ordinary ping around the `len`-byte
    /// payload already at `buf[ECHO_HEADER_LEN..]`; returns its length.
    pub fn frame_ping(&self, request: Request, buf: &mut [u8], len: usize) -> usize {
        icmp::emit_echo(self.family, true, request.id, request.seq, buf, len)
    }

    /// Write the echo reply to `arrived` around the `len`-byte tunnel
    /// message already at `buf[REPLY_HEADROOM..]` (empty: the bare magic,
    /// for a session that is gone); returns its length.
    pub fn frame_reply(&self, now: Instant, arrived: Arrived, buf: &mut [u8], len: usize) -> usize {
        let info = ReplyInfo {
            ordinal: arrived.ordinal,
            hold: Some(now.saturating_duration_since(arrived.at)),
        };
        icmp::emit_reply_head(buf, info);
        let r = arrived.request;
        let payload = REPLY_HEADROOM - icmp::ECHO_HEADER_LEN + len;
        icmp::emit_echo(self.family, true, r.id, r.seq, buf, payload)
    }

    /// An authenticated request of `session` arrived: counted.
    pub fn count(&mut self, now: Instant, session: SessionId, request: Request) -> Arrived {
        let c = self.sessions.entry(session).or_default();
        c.arrivals = c.arrivals.wrapping_add(1);
        Arrived {
            request,
            ordinal: c.arrivals,
            at: now,
        }
    }

    /// Hold `arrived` (counted) of `session`, sealed under the keys of
    /// receiver index `index`. Requests held under older keys come back to
    /// be answered at once (with keepalives): after a rekey the client has
    /// sent fresh ones, and after a client restart the old ones belong to
    /// a process that is gone. Too many held lets the oldest go unanswered:
    /// answering it would cost a seal and a send per request under an
    /// upload, and ICMP needs no answer (a firewall only drops
    /// *unsolicited* replies); the client lets it go too. Unless none was
    /// answered for [`QUIET_ANSWER`]: then it is answered, with a
    /// keepalive (`Some((request, None))`). A message queued for the
    /// session answers the request at once: `Some((request, Some(msg)))`.
    pub fn park(
        &mut self,
        now: Instant,
        session: SessionId,
        index: u32,
        arrived: Arrived,
        stale: &mut Vec<Arrived>,
    ) -> Option<(Arrived, Option<&[u8]>)> {
        let c = self.sessions.entry(session).or_default();
        if c.index.replace(index).is_some_and(|old| old != index) {
            while let Some(r) = self.parking.take_parked(session) {
                stale.push(r);
            }
        }
        if !stale.is_empty() {
            c.answered = Some(now);
        }
        let quiet = c
            .answered
            .is_none_or(|t| now.saturating_duration_since(t) >= QUIET_ANSWER);
        let reply = self.parking.request(session, arrived, now)?;
        if reply.message.is_none() && !quiet {
            return None; // let go
        }
        if let Some(c) = self.sessions.get_mut(&session) {
            c.answered = Some(now);
        }
        Some((reply.request, reply.message))
    }

    /// A held request of `session` to answer now, if there is one.
    pub fn take_parked(&mut self, now: Instant, session: SessionId) -> Option<Arrived> {
        let r = self.parking.take_parked(session)?;
        self.note_answer(now, session);
        Some(r)
    }

    /// Queue a message for `session` until its next request.
    pub fn queue(&mut self, session: SessionId, message: &[u8]) {
        let _ = self.parking.downstream(session, message);
    }

    /// The next held request that waited its hold: answer it with a keepalive.
    pub fn expired(&mut self, now: Instant) -> Option<(SessionId, Arrived)> {
        let (session, r) = self.parking.expired(now)?;
        self.note_answer(now, session);
        Some((session, r))
    }

    /// When the oldest held request expires.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.parking.next_timeout()
    }

    /// The session left this listener: forget its requests (they simply go
    /// unanswered; the client stopped counting on them), its queue and its
    /// count (the client takes a count that starts over as a new baseline).
    pub fn release(&mut self, session: SessionId) {
        self.parking.remove(session);
        self.sessions.remove(&session);
    }

    fn note_answer(&mut self, now: Instant, session: SessionId) {
        if let Some(c) = self.sessions.get_mut(&session) {
            c.answered = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const SERVER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 9));
    const S: SessionId = SessionId(0);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A request the client frames with message `msg`, as the listener
    /// classifies it.
    fn request(c: &mut IcmpClient, now: Instant, msg: &[u8], prompt: bool) -> (Request, Vec<u8>) {
        let mut buf = vec![0u8; HEADROOM + msg.len()];
        buf[HEADROOM..].copy_from_slice(msg);
        let n = c.frame(now, &mut buf, msg.len(), prompt);
        let l = IcmpListener::new(Family::V4);
        let Some(Incoming::Tunnel(req, m)) = l.classify(CLIENT, Some(SERVER), &buf[..n]) else {
            panic!("a tunnel request");
        };
        assert_eq!(m, msg);
        (req, buf[..n].to_vec())
    }

    /// The listener's reply to `arrived`, carrying `msg`.
    fn reply(l: &IcmpListener, now: Instant, arrived: Arrived, msg: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; REPLY_HEADROOM + msg.len()];
        buf[REPLY_HEADROOM..].copy_from_slice(msg);
        let n = l.frame_reply(now, arrived, &mut buf, msg.len());
        buf.truncate(n);
        buf
    }

    /// The client takes the reply `bytes` (authenticated, without data).
    fn take(c: &mut IcmpClient, now: Instant, bytes: &[u8]) -> Instant {
        let r = c.unwrap(SERVER, bytes).expect("a reply to us");
        c.replied(now, r.meta, true, false);
        r.asked
    }

    #[test]
    fn a_request_the_listener_answers_is_a_reply_the_client_takes() {
        let now = Instant::now();
        let mut client = IcmpClient::with_start(SERVER, 77, now);
        let (req, bytes) = request(&mut client, now, b"msg", false);
        assert_eq!((req.id, req.seq, req.local), (77, 0, SERVER));
        let mut listener = IcmpListener::new(Family::V4);
        let arrived = listener.count(now + ms(10), S, req);
        assert_eq!(arrived.ordinal, 1);
        let r = reply(&listener, now + ms(2010), arrived, b"ok");
        let got = client.unwrap(SERVER, &r).expect("ours");
        assert_eq!((got.message, got.asked), (&b"ok"[..], now));
        assert_eq!(got.meta.info.hold, Some(ms(2000)), "held 2 s");
        assert_eq!(client.unwrap(CLIENT, &r), None, "not from the server");
        assert_eq!(
            listener.classify(CLIENT, None, &bytes),
            None,
            "broadcasts get nothing"
        );
        // The hold is not delay: the round trip is what is left of it.
        client.replied(now + ms(2020), got.meta, true, false);
        assert_eq!(client.stats().rtt, Some(ms(20)));
        assert_eq!(client.stats().outstanding, 0);
    }

    #[test]
    fn ordinary_pings_are_echoed() {
        let mut buf = [0u8; 32];
        buf[8..12].copy_from_slice(b"ping");
        let n = icmp::emit_echo(Family::V4, false, 5, 6, &mut buf, 4);
        let listener = IcmpListener::new(Family::V4);
        let Some(Incoming::Ping(req, payload)) = listener.classify(CLIENT, Some(SERVER), &buf[..n])
        else {
            panic!("a ping");
        };
        assert_eq!(payload, b"ping");
        let mut out = buf;
        let m = listener.frame_ping(req, &mut out, 4);
        let echo = Echo::parse(Family::V4, &out[..m]).unwrap();
        assert_eq!(
            (echo.reply, echo.id, echo.seq, echo.payload),
            (true, 5, 6, &b"ping"[..])
        );
    }

    #[test]
    fn a_new_receiver_index_releases_the_requests_held_under_the_old() {
        let now = Instant::now();
        let mut l = IcmpListener::new(Family::V4);
        let req = |seq| Request {
            ip: CLIENT,
            local: SERVER,
            id: 1,
            seq,
        };
        let mut stale = Vec::new();
        let park = |l: &mut IcmpListener, index, seq, stale: &mut Vec<Arrived>| {
            let a = l.count(now, S, req(seq));
            l.park(now, S, index, a, stale).is_none()
        };
        assert!(park(&mut l, 10, 1, &mut stale));
        assert!(park(&mut l, 10, 2, &mut stale));
        assert!(stale.is_empty());
        assert!(park(&mut l, 11, 3, &mut stale));
        let seqs: Vec<u16> = stale.iter().map(|a| a.request.seq).collect();
        assert_eq!(seqs, [1, 2]);
        let left = l.take_parked(now, S).unwrap();
        assert_eq!((left.request, left.ordinal), (req(3), 3));
    }

    #[test]
    fn a_client_not_in_use_sends_no_polls() {
        let now = Instant::now();
        let mut c = IcmpClient::with_start(SERVER, 1, now);
        assert_eq!(c.polls_due(now), 0);
        c.set_polling(true);
        assert_eq!(c.polls_due(now), Cadence::ICMP.min_outstanding);
    }

    #[test]
    fn the_server_count_tells_requests_lost_on_the_way() {
        let t0 = Instant::now();
        let mut c = IcmpClient::with_start(SERVER, 1, t0);
        c.set_polling(true);
        let mut l = IcmpListener::new(Family::V4);
        // 300 requests, 1 ms apart; every fourth is lost on the way; the
        // server answers each that arrives 20 ms later (a download).
        let mut replies: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
        for i in 0..320u64 {
            let now = t0 + ms(i);
            while replies.front().is_some_and(|(at, _)| *at <= now) {
                let (at, r) = replies.pop_front().unwrap();
                take(&mut c, at, &r);
            }
            if i >= 300 {
                continue;
            }
            let (req, _) = request(&mut c, now, b"data", false);
            if i % 4 != 3 {
                let arrived = l.count(now + ms(10), S, req);
                replies.push_back((now + ms(20), reply(&l, now + ms(10), arrived, b"down")));
            }
        }
        // The server's count says how many were lost: each is confirmed once
        // a request sent well after it was counted (not the last few: they
        // may still come, overtaken on the way). Those sent well before one
        // answered were given up on (not the last two: one may still come,
        // and one was sent after the last one answered).
        let s = c.stats();
        assert!((65..74).contains(&s.lost), "{s:?}");
        assert_eq!(s.unanswered, 73, "{s:?}");
        assert_eq!(s.outstanding, 2, "{s:?}");
        assert_eq!(s.rtt, Some(ms(20)));
        // After the request timeout, the last two are given up on, and the
        // last of all counts as lost (no reply's count covers it).
        let _ = c.polls_due(t0 + ms(8000));
        let s = c.stats();
        assert_eq!((s.lost, s.unanswered, s.outstanding), (75, 75, 0), "{s:?}");
    }

    #[test]
    fn reordered_requests_are_not_lost() {
        let t0 = Instant::now();
        let mut c = IcmpClient::with_start(SERVER, 1, t0);
        let mut l = IcmpListener::new(Family::V4);
        // Pairs of requests swap places on the way; each is answered as it
        // arrives.
        let mut replies = Vec::new();
        for i in 0..100u64 {
            let at = t0 + ms(2 * i);
            let (a, _) = request(&mut c, at, b"one", false);
            let (b, _) = request(&mut c, at + ms(1), b"two", false);
            let b = l.count(at + ms(11), S, b);
            let a = l.count(at + ms(12), S, a);
            replies.push((at + ms(21), reply(&l, at + ms(11), b, b"")));
            replies.push((at + ms(22), reply(&l, at + ms(12), a, b"")));
        }
        for (at, r) in &replies {
            take(&mut c, *at, r);
        }
        let s = c.stats();
        assert_eq!((s.lost, s.unanswered, s.outstanding), (0, 0, 0), "{s:?}");
    }

    #[test]
    fn a_prompt_answer_does_not_give_up_on_held_requests() {
        let t0 = Instant::now();
        let mut c = IcmpClient::with_start(SERVER, 1, t0);
        let mut l = IcmpListener::new(Family::V4);
        let (held, _) = request(&mut c, t0, b"keepalive", false);
        let (probe, _) = request(&mut c, t0 + ms(100), b"probe", true);
        let _ = l.count(t0 + ms(10), S, held);
        let probe = l.count(t0 + ms(110), S, probe);
        take(
            &mut c,
            t0 + ms(120),
            &reply(&l, t0 + ms(110), probe, b"reply"),
        );
        assert_eq!(c.stats().outstanding, 1, "the held one is still out");
        assert_eq!(c.stats().unanswered, 0);
        // A request held under older keys is no init: counted.
        let (init, _) = request(&mut c, t0 + ms(200), &[TYPE_INIT, 0, 0, 0], false);
        let init = Arrived::uncounted(init, t0 + ms(210));
        take(
            &mut c,
            t0 + ms(220),
            &reply(&l, t0 + ms(210), init, b"response"),
        );
        assert_eq!(c.stats().outstanding, 1, "an init is answered out of turn");
        assert_eq!(c.stats().lost, 0);
    }

    #[test]
    fn packets_wait_for_the_pacing_in_order() {
        let t0 = Instant::now();
        let mut c = IcmpClient::with_start(SERVER, 1, t0);
        c.set_polling(true);
        let mut sent = 0;
        let mut buf = [0u8; 64];
        // A burst far beyond the initial rate (1000 a second): the
        // bucket's 2 go at once, the rest wait, and beyond the queue's
        // room (50 ms at that rate) they are dropped.
        for i in 0..600u16 {
            buf[HEADROOM..HEADROOM + 2].copy_from_slice(&i.to_be_bytes());
            if c.frame_packet(t0, &mut buf, 2).is_some() {
                sent += 1;
            }
        }
        let room = 50;
        let s = c.stats();
        assert_eq!((sent, s.queued, s.queue_dropped), (2, room, 548), "{s:?}");
        assert!(s.paced);
        assert_eq!(c.polls_due(t0), 0, "packets go first");
        let wake = c.next_timeout().expect("paced");
        assert!(
            wake > t0 && wake <= t0 + Duration::from_micros(1001),
            "{:?}",
            wake - t0
        );
        // They come out in order, one per pacing interval.
        let mut now = t0;
        let mut out = Vec::new();
        while c.stats().queued > 0 {
            now = c.next_timeout().unwrap().min(now + ms(1));
            while let Some(n) = c.poll_queued(now, &mut buf) {
                assert_eq!(n, HEADROOM + 2);
                out.push((now, u16::from_be_bytes([buf[HEADROOM], buf[HEADROOM + 1]])));
            }
        }
        let order: Vec<u16> = out.iter().map(|o| o.1).collect();
        assert_eq!(order, (2..2 + room as u16).collect::<Vec<_>>());
        let took = out.last().unwrap().0 - t0;
        assert!(took >= ms(49) && took <= ms(51), "{took:?}");
        assert!(!c.stats().paced);
        // Not in use any more: what waits is dropped.
        for _ in 0..50 {
            let _ = c.frame_packet(now, &mut buf, 2);
        }
        assert!(c.stats().queued > 0);
        c.set_polling(false);
        assert_eq!(c.stats().queued, 0);
    }

    #[test]
    fn a_quiet_session_hears_of_requests_beyond_the_hold() {
        let t0 = Instant::now();
        let mut l = IcmpListener::new(Family::V4);
        let req = |seq| Request {
            ip: CLIENT,
            local: SERVER,
            id: 1,
            seq,
        };
        let mut stale = Vec::new();
        let mut answered = Vec::new();
        // An upload: requests every 100 µs, nothing to answer them with.
        for i in 0..2000u16 {
            let now = t0 + Duration::from_micros(100 * u64::from(i));
            let a = l.count(now, S, req(i));
            if let Some((a, msg)) = l.park(now, S, 1, a, &mut stale) {
                assert_eq!(msg, None, "a keepalive");
                answered.push((now, a.request.seq, a.ordinal));
            }
        }
        // The oldest beyond the hold's room are let go, but one every
        // QUIET_ANSWER is answered: 200 ms, 10 of them.
        assert_eq!(answered.len(), 10, "{answered:?}");
        assert!(answered.windows(2).all(|w| w[1].0 - w[0].0 >= QUIET_ANSWER));
        assert!(
            answered
                .iter()
                .all(|&(_, seq, ordinal)| u32::from(seq) + 1 == ordinal)
        );
        // Downstream data resets the quiet time.
        let now = t0 + ms(300);
        assert!(l.take_parked(now, S).is_some());
        let a = l.count(now, S, req(5000));
        assert!(l.park(now, S, 1, a, &mut stale).is_none());
    }
}

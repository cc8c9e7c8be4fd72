//! The HTTP transports' framing and long-poll discipline, sans IO.
//!
//! # Framing
//!
//! A WebSocket binary message, a long-poll request body and a long-poll
//! response body all carry the same thing: zero or more tunnel messages,
//! each behind its length.
//!
//! ```text
//! | len u16 | message (len bytes) | len u16 | message | ...
//! ```
//!
//! So a backlog of small messages (TCP acknowledgements, keepalives) costs
//! one WebSocket frame or one HTTP exchange, not one each. A body that ends
//! inside a message is malformed from that point on ([`Messages`] stops).
//!
//! # Long-poll
//!
//! Where a middlebox refuses the WebSocket upgrade, the client falls back to
//! `POST PATH?c=<tag>` requests: each carries upstream messages (or none,
//! a bare poll) and its response carries whatever downstream messages the
//! server has for the tag. The server answers a request that carries data
//! at once, and holds a bare poll ([`Mailboxes`]) until downstream data
//! arrives or [`HOLD`] passes, so downstream data waits for no round trip
//! while the client keeps [`POLLERS`] polls outstanding. Requests are
//! sorted by the client's random 64-bit tag: requests of one client arrive
//! on several TCP connections, through proxies that pool and reuse them.
//! The tag only routes; the session's keys authenticate. Once the tag is
//! the session's path, every request must also carry a poll authenticator
//! (`p=`: [`PollSigner`], checked by the endpoint): a request without a
//! good one is answered at once and empty, so someone who learnt the tag
//! cannot take the client's downstream.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::crypto::{POLL_AUTH_LEN, PollKey, PollKind};

/// Bytes of the length before each message.
pub const LEN_PREFIX: usize = 2;
/// The largest message a frame can carry.
pub const MAX_MESSAGE: usize = u16::MAX as usize;
/// A sender closes a batch (one WebSocket message, one HTTP body) once it
/// holds this much: big enough to amortise the framing, small enough to
/// keep the TCP connection's queue, and the inner TCP's delay, short.
pub const BATCH_TARGET: usize = 64 * 1024;
/// The largest body (or WebSocket message) a receiver accepts: a sender's
/// batches stay far below it, and it bounds what one connection can make
/// the server buffer.
pub const MAX_BODY: usize = 1 << 20;

/// How long the server holds a bare poll. Inside the read timeouts of
/// common proxies (nginx: 60 s; squid: 15 min), short enough to prove the
/// path alive often.
pub const HOLD: Duration = Duration::from_secs(15);
/// Bare polls the client keeps outstanding: while the server answers one,
/// the other is held.
pub const POLLERS: usize = 2;
/// Bare polls the server holds per tag; beyond, the oldest is answered.
pub const MAX_HELD: usize = 4;
/// Downstream bytes the server queues per tag while no poll is held;
/// beyond, messages are dropped (the inner TCP sees loss and slows down,
/// rather than a queue growing behind it).
pub const MAX_QUEUED_BYTES: usize = 1 << 20;
/// A tag with nothing held that has not polled for this long is forgotten.
pub const IDLE: Duration = Duration::from_secs(120);
/// Tags the server keeps at once; requests from further new tags are
/// answered at once, empty (anyone can make up tags).
pub const MAX_TAGS: usize = 4096;

/// The query of a long-poll request for client `tag`.
pub fn poll_query(tag: u64) -> String {
    format!("c={tag:016x}")
}

/// The client tag in a long-poll request's query (`c=<16 hex digits>`,
/// among other parameters perhaps).
pub fn poll_tag(query: Option<&str>) -> Option<u64> {
    let value = query?.split('&').find_map(|kv| kv.strip_prefix("c="))?;
    if value.len() != 16 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(value, 16).ok()
}

/// A long-poll request's poll counter and authenticator (`p=`: the
/// counter as 16 lowercase hex digits, then the authenticator as 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PollAuth {
    /// The client's request counter under its current keys.
    pub counter: u64,
    /// The authenticator ([`PollKey::auth`] of kind HTTP over the tag and
    /// the counter).
    pub auth: [u8; POLL_AUTH_LEN],
}

/// Hex digits of `p=`.
const AUTH_HEX: usize = 16 + 2 * POLL_AUTH_LEN;

/// The `p=` parameter of a long-poll request's query, if it has a
/// well-formed one.
pub fn poll_auth(query: Option<&str>) -> Option<PollAuth> {
    let value = query?.split('&').find_map(|kv| kv.strip_prefix("p="))?;
    if value.len() != AUTH_HEX || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let counter = u64::from_str_radix(&value[..16], 16).ok()?;
    let mut auth = [0; POLL_AUTH_LEN];
    for (i, b) in auth.iter_mut().enumerate() {
        *b = u8::from_str_radix(&value[16 + 2 * i..18 + 2 * i], 16).ok()?;
    }
    Some(PollAuth { counter, auth })
}

/// The client's side of bound long-polls: the query of each request, with
/// the tag and, once the client has keys, a fresh counter and its
/// authenticator. Give it the engine's poll key whenever it may have
/// changed ([`crate::engine::Client::poll_key`]): a new key starts the
/// counter at 0.
#[derive(Clone, Debug)]
pub struct PollSigner {
    tag: u64,
    key: Option<(u32, PollKey)>,
    counter: u64,
}

impl PollSigner {
    /// A signer for client `tag`, without keys yet.
    pub fn new(tag: u64) -> Self {
        Self {
            tag,
            key: None,
            counter: 0,
        }
    }

    /// The client's tag.
    pub fn tag(&self) -> u64 {
        self.tag
    }

    /// The poll key of the client's current keys, and their index.
    pub fn set_key(&mut self, key: Option<(u32, &PollKey)>) {
        if self.key.as_ref().map(|(i, _)| *i) != key.map(|(i, _)| i) {
            self.key = key.map(|(i, k)| (i, k.clone()));
            self.counter = 0;
        }
    }

    /// The query of the next request (each call takes a new counter).
    pub fn next_query(&mut self) -> String {
        let mut q = poll_query(self.tag);
        if let Some((_, key)) = &self.key {
            let counter = self.counter;
            self.counter += 1;
            let auth = key.auth(PollKind::Http, self.tag, counter, &[]);
            let _ = write!(q, "&p={counter:016x}");
            for b in auth {
                let _ = write!(q, "{b:02x}");
            }
        }
        q
    }
}

/// Builds one batch of framed messages. Its buffer is zeroed once and
/// reused: messages are written in place, and [`Batch::take`] copies out
/// only the bytes framed.
#[derive(Debug, Default)]
pub struct Batch {
    buf: Vec<u8>,
    used: usize,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append a message that `fill` writes into the buffer it is given
    /// (up to [`MAX_MESSAGE`] bytes), returning its length; `None` appends
    /// nothing.
    pub fn push_with(&mut self, fill: impl FnOnce(&mut [u8]) -> Option<usize>) {
        let start = self.used;
        let end = start + LEN_PREFIX + MAX_MESSAGE;
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        if let Some(n) = fill(&mut self.buf[start + LEN_PREFIX..end]).filter(|&n| n <= MAX_MESSAGE)
        {
            self.buf[start..start + LEN_PREFIX].copy_from_slice(&(n as u16).to_be_bytes());
            self.used = start + LEN_PREFIX + n;
        }
    }

    /// Append a copy of `msg` (dropped if longer than [`MAX_MESSAGE`]).
    pub fn push(&mut self, msg: &[u8]) {
        self.push_with(|out| {
            out.get_mut(..msg.len())?.copy_from_slice(msg);
            Some(msg.len())
        });
    }

    /// Bytes framed so far.
    pub fn len(&self) -> usize {
        self.used
    }

    /// Whether nothing is framed.
    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// Take the framed bytes, leaving the batch empty.
    pub fn take(&mut self) -> Vec<u8> {
        let out = self.buf[..self.used].to_vec();
        self.used = 0;
        out
    }
}

/// The messages framed in `body`.
pub fn messages(body: &[u8]) -> Messages<'_> {
    Messages { rest: body }
}

/// Iterator over the messages of a body; stops at the first frame that
/// runs past the end ([`Messages::malformed`] tells).
#[derive(Clone, Debug)]
pub struct Messages<'a> {
    rest: &'a [u8],
}

impl Messages<'_> {
    /// Whether bytes were left that do not form a whole frame.
    pub fn malformed(&self) -> bool {
        !self.rest.is_empty()
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let (len, rest) = self.rest.split_first_chunk::<LEN_PREFIX>()?;
        let len = usize::from(u16::from_be_bytes(*len));
        let msg = rest.get(..len)?;
        self.rest = &rest[len..];
        Some(msg)
    }
}

/// Which HTTP mode a client uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// WebSocket, falling back to long-poll when the upgrade is refused.
    Auto,
    /// WebSocket only.
    WebSocket,
    /// Long-poll only.
    LongPoll,
}

/// The first reconnection back-off of an HTTP path.
pub const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// The longest reconnection back-off.
pub const BACKOFF_MAX: Duration = Duration::from_secs(16);

/// What the client asks its HTTP driver to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Open a connection: a WebSocket (`true`) or long-poll connections.
    Dial {
        /// WebSocket, else long-poll.
        websocket: bool,
    },
    /// Close whatever is open.
    Hangup,
}

/// What the HTTP driver saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpEvent {
    /// The connection asked for is open.
    Opened,
    /// The HTTP exchange worked but the WebSocket upgrade was refused (a
    /// proxy that strips `Upgrade`, a middlebox answering 4xx).
    UpgradeRefused(String),
    /// The connection failed or ended; `heard`: whether anything at all
    /// came back on it (an upgraded WebSocket that carries nothing, not
    /// even a pong, means something in the path answers for the server).
    Closed {
        /// Anything arrived on the connection.
        heard: bool,
        /// What failed, for status.
        why: String,
    },
}

/// The client half's connection state, for status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpClientInfo {
    /// "websocket", "long-poll", "connecting", or "closed".
    pub mode: &'static str,
    /// A connection is open.
    pub connected: bool,
    /// Connections opened after the first.
    pub reconnects: u64,
    /// Why the last connection ended.
    pub last_error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dial {
    /// Nothing open, nothing wanted.
    Idle,
    /// A connection is being opened.
    Dialing { websocket: bool },
    /// A connection is open.
    Open { websocket: bool },
    /// Waiting before the next attempt.
    Backoff { until: Instant },
}

/// The client half: which mode to dial, when to dial again, and when a
/// failure is the path's (and not just the WebSocket's). The driver opens
/// and closes connections as told ([`HttpClient::poll_command`]) and
/// reports what happened ([`HttpClient::handle_event`]); batches of framed
/// messages flow through it meanwhile.
#[derive(Debug)]
pub struct HttpClient {
    mode: Mode,
    wanted: bool,
    state: Dial,
    /// The state the driver was last told about.
    told: Option<Command>,
    backoff: Duration,
    opened: u64,
    last_error: Option<String>,
}

impl HttpClient {
    /// A client in `mode`, closed until wanted.
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            wanted: false,
            state: Dial::Idle,
            told: None,
            backoff: BACKOFF_MIN,
            opened: 0,
            last_error: None,
        }
    }

    /// Whether a connection should be open (the path is in use or probed).
    pub fn want(&mut self, now: Instant, wanted: bool) {
        self.wanted = wanted;
        match (wanted, self.state) {
            (true, Dial::Idle) => self.dial(self.mode != Mode::LongPoll),
            (true, Dial::Backoff { until }) if until <= now => {
                self.dial(self.mode != Mode::LongPoll);
            }
            (false, Dial::Dialing { .. } | Dial::Open { .. } | Dial::Backoff { .. }) => {
                self.state = Dial::Idle;
            }
            _ => {}
        }
    }

    /// Whether a connection is open.
    pub fn is_open(&self) -> bool {
        matches!(self.state, Dial::Open { .. })
    }

    fn dial(&mut self, websocket: bool) {
        self.state = Dial::Dialing { websocket };
    }

    /// What the driver must do now, if anything changed.
    pub fn poll_command(&mut self, now: Instant) -> Option<Command> {
        if let Dial::Backoff { until } = self.state
            && until <= now
            && self.wanted
        {
            self.dial(self.mode != Mode::LongPoll);
        }
        let command = match self.state {
            Dial::Dialing { websocket } => Command::Dial { websocket },
            Dial::Idle | Dial::Backoff { .. } => Command::Hangup,
            Dial::Open { .. } => return None,
        };
        if self.told == Some(command) {
            return None;
        }
        // A hangup before anything was ever dialled says nothing new.
        if self.told.is_none() && command == Command::Hangup {
            return None;
        }
        self.told = Some(command);
        Some(command)
    }

    /// What the driver saw. Returns `Some(why)` when the path failed (as
    /// opposed to a WebSocket refused where long-poll is tried next).
    pub fn handle_event(&mut self, now: Instant, event: HttpEvent) -> Option<String> {
        let (websocket, was_open) = match self.state {
            Dial::Dialing { websocket } => (websocket, false),
            Dial::Open { websocket } => (websocket, true),
            // Late news of a connection we have since closed.
            Dial::Idle | Dial::Backoff { .. } => return None,
        };
        let why = match event {
            HttpEvent::Opened => {
                self.state = Dial::Open { websocket };
                self.opened += 1;
                self.backoff = BACKOFF_MIN;
                return None;
            }
            HttpEvent::UpgradeRefused(why) if websocket && self.mode == Mode::Auto => {
                self.last_error = Some(format!("WebSocket upgrade refused: {why}"));
                self.dial(false);
                return None;
            }
            HttpEvent::Closed { heard: false, why }
                if websocket && was_open && self.mode == Mode::Auto =>
            {
                // Upgraded, yet not even a pong came back: something in the
                // path answers for the server or buffers.
                self.last_error = Some(format!("WebSocket carried nothing: {why}"));
                self.dial(false);
                return None;
            }
            HttpEvent::UpgradeRefused(why) => format!("WebSocket upgrade refused: {why}"),
            HttpEvent::Closed { why, .. } => why,
        };
        self.last_error = Some(why.clone());
        // After a fallback, the next connection tries WebSocket again: the
        // middlebox that refused it may be gone (the client roamed).
        self.state = Dial::Backoff {
            until: now + self.backoff,
        };
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        Some(why)
    }

    /// When [`HttpClient::poll_command`] has something to say next.
    pub fn next_timeout(&self) -> Option<Instant> {
        match self.state {
            Dial::Backoff { until } if self.wanted => Some(until),
            _ => None,
        }
    }

    /// The connection state, for status.
    pub fn info(&self) -> HttpClientInfo {
        let (mode, connected) = match self.state {
            Dial::Open { websocket: true } => ("websocket", true),
            Dial::Open { websocket: false } => ("long-poll", true),
            Dial::Dialing { .. } => ("connecting", false),
            Dial::Idle | Dial::Backoff { .. } => ("closed", false),
        };
        HttpClientInfo {
            mode,
            connected,
            reconnects: self.opened.saturating_sub(1),
            last_error: self.last_error.clone(),
        }
    }
}

/// One client's mailbox: downstream bytes (framed) and the polls held.
struct Mailbox<R> {
    queued: Batch,
    held: VecDeque<(R, Instant)>,
    last_request: Instant,
}

/// An answer the server owes: send `body` in reply to `request`.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer<R> {
    /// The held request (the driver's handle to its response).
    pub request: R,
    /// Framed messages, possibly none.
    pub body: Vec<u8>,
}

/// The server's long-poll state: a mailbox per client tag. `R` is the
/// driver's handle to a pending response.
pub struct Mailboxes<R> {
    boxes: HashMap<u64, Mailbox<R>>,
    /// Tags whose queued bytes may meet a held poll.
    ready: Vec<u64>,
    /// Messages dropped because a mailbox was full or unknown.
    pub dropped: u64,
}

impl<R> Default for Mailboxes<R> {
    fn default() -> Self {
        Self {
            boxes: HashMap::new(),
            ready: Vec::new(),
            dropped: 0,
        }
    }
}

impl<R> Mailboxes<R> {
    /// No mailboxes.
    pub fn new() -> Self {
        Self::default()
    }

    /// A request from `tag` is being handled: make sure its mailbox exists,
    /// so the answers its messages produce are kept for it.
    pub fn open(&mut self, now: Instant, tag: u64) {
        self.mailbox(now, tag);
    }

    /// The tag's mailbox, new if there is room.
    fn mailbox(&mut self, now: Instant, tag: u64) -> Option<&mut Mailbox<R>> {
        if self.boxes.len() >= MAX_TAGS && !self.boxes.contains_key(&tag) {
            return None;
        }
        let mailbox = self.boxes.entry(tag).or_insert_with(|| Mailbox {
            queued: Batch::new(),
            held: VecDeque::new(),
            last_request: now,
        });
        mailbox.last_request = now;
        Some(mailbox)
    }

    /// A request from `tag` arrived (its upstream messages already handled).
    /// A request that carried data, or finds data queued, is answered at
    /// once; a bare poll is held.
    pub fn request(
        &mut self,
        now: Instant,
        tag: u64,
        request: R,
        carried_data: bool,
    ) -> Vec<Answer<R>> {
        let Some(mailbox) = self.mailbox(now, tag) else {
            return vec![Answer {
                request,
                body: Vec::new(),
            }];
        };
        if carried_data || !mailbox.queued.is_empty() {
            let body = mailbox.queued.take();
            return vec![Answer { request, body }];
        }
        mailbox.held.push_back((request, now + HOLD));
        let mut answers = Vec::new();
        while mailbox.held.len() > MAX_HELD {
            let (request, _) = mailbox.held.pop_front().expect("non-empty");
            answers.push(Answer {
                request,
                body: Vec::new(),
            });
        }
        answers
    }

    /// Queue a downstream message for `tag`; [`Mailboxes::poll_answer`]
    /// hands it to a held poll. Dropped if the tag is unknown or its queue
    /// is full.
    pub fn send(&mut self, tag: u64, msg: &[u8]) {
        match self.boxes.get_mut(&tag) {
            Some(m) if m.queued.len() + LEN_PREFIX + msg.len() <= MAX_QUEUED_BYTES => {
                if m.queued.is_empty() {
                    self.ready.push(tag);
                }
                m.queued.push(msg);
            }
            _ => self.dropped += 1,
        }
    }

    /// An answer that queued data allows now: call after a batch of
    /// [`Mailboxes::send`]s until it returns `None`.
    pub fn poll_answer(&mut self) -> Option<Answer<R>> {
        while let Some(tag) = self.ready.pop() {
            let Some(m) = self.boxes.get_mut(&tag) else {
                continue;
            };
            if m.queued.is_empty() {
                continue;
            }
            // No poll held: the data waits for the next request.
            let Some((request, _)) = m.held.pop_front() else {
                continue;
            };
            return Some(Answer {
                request,
                body: m.queued.take(),
            });
        }
        None
    }

    /// When [`Mailboxes::handle_timeout`] next has work.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.boxes
            .values()
            .filter_map(|m| m.held.front().map(|(_, t)| *t))
            .min()
    }

    /// Answer (empty) the polls held past [`HOLD`]; forget idle tags.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Answer<R>> {
        let mut answers = Vec::new();
        for m in self.boxes.values_mut() {
            while m.held.front().is_some_and(|(_, t)| *t <= now) {
                let (request, _) = m.held.pop_front().expect("non-empty");
                answers.push(Answer {
                    request,
                    body: Vec::new(),
                });
            }
        }
        self.boxes
            .retain(|_, m| !m.held.is_empty() || now.duration_since(m.last_request) < IDLE);
        answers
    }

    /// Forget `tag` (its client went to another path): its held polls
    /// are answered empty, what was queued for it is dropped.
    pub fn close(&mut self, tag: u64) -> Vec<Answer<R>> {
        let Some(m) = self.boxes.remove(&tag) else {
            return Vec::new();
        };
        m.held
            .into_iter()
            .map(|(request, _)| Answer {
                request,
                body: Vec::new(),
            })
            .collect()
    }

    /// Polls held, over all tags.
    pub fn held(&self) -> usize {
        self.boxes.values().map(|m| m.held.len()).sum()
    }

    /// Tags known.
    pub fn len(&self) -> usize {
        self.boxes.len()
    }

    /// Whether no tag is known.
    pub fn is_empty(&self) -> bool {
        self.boxes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_queries_round_trip_and_verify() {
        let key = PollKey::from_bytes(&[3; 32]);
        let mut s = PollSigner::new(0xabc);
        assert_eq!(s.next_query(), "c=0000000000000abc");
        assert_eq!(poll_auth(Some("c=0000000000000abc")), None);
        s.set_key(Some((7, &key)));
        for counter in 0..3 {
            let q = s.next_query();
            assert_eq!(poll_tag(Some(&q)), Some(0xabc));
            let a = poll_auth(Some(&q)).unwrap();
            assert_eq!(a.counter, counter);
            assert!(key.verify(PollKind::Http, 0xabc, counter, &[], &a.auth));
        }
        // A new key starts the counter again; the same key does not.
        s.set_key(Some((7, &key)));
        assert_eq!(poll_auth(Some(&s.next_query())).unwrap().counter, 3);
        s.set_key(Some((8, &key)));
        assert_eq!(poll_auth(Some(&s.next_query())).unwrap().counter, 0);
        for bad in [
            "p=",
            "p=00",
            "p=000000000000000g00000000",
            "p=0000000000000000000000000",
        ] {
            assert_eq!(poll_auth(Some(bad)), None, "{bad}");
        }
    }
    use proptest::prelude::*;

    #[test]
    fn auto_falls_back_to_long_poll_and_tries_websocket_again_after_a_failure() {
        let t0 = Instant::now();
        let mut c = HttpClient::new(Mode::Auto);
        assert_eq!(c.poll_command(t0), None, "nothing until wanted");
        c.want(t0, true);
        assert_eq!(c.poll_command(t0), Some(Command::Dial { websocket: true }));
        assert_eq!(c.poll_command(t0), None, "said once");
        assert_eq!(
            c.handle_event(t0, HttpEvent::UpgradeRefused("403".into())),
            None
        );
        assert_eq!(c.poll_command(t0), Some(Command::Dial { websocket: false }));
        assert_eq!(c.handle_event(t0, HttpEvent::Opened), None);
        assert_eq!(c.info().mode, "long-poll");
        let why = c.handle_event(
            t0,
            HttpEvent::Closed {
                heard: true,
                why: "reset".into(),
            },
        );
        assert_eq!(why.as_deref(), Some("reset"), "a path failure");
        assert_eq!(c.poll_command(t0), Some(Command::Hangup));
        assert_eq!(c.next_timeout(), Some(t0 + BACKOFF_MIN));
        let t1 = t0 + BACKOFF_MIN;
        assert_eq!(c.poll_command(t1), Some(Command::Dial { websocket: true }));
    }

    #[test]
    fn a_silent_websocket_falls_back_and_backoff_grows() {
        let t0 = Instant::now();
        let mut c = HttpClient::new(Mode::Auto);
        c.want(t0, true);
        c.poll_command(t0);
        c.handle_event(t0, HttpEvent::Opened);
        let silent = HttpEvent::Closed {
            heard: false,
            why: "no pong".into(),
        };
        assert_eq!(c.handle_event(t0, silent), None);
        assert_eq!(c.poll_command(t0), Some(Command::Dial { websocket: false }));
        for i in 0..8 {
            let why = c.handle_event(
                t0,
                HttpEvent::Closed {
                    heard: false,
                    why: "refused".into(),
                },
            );
            assert!(why.is_some());
            let wait = c.next_timeout().unwrap() - t0;
            assert_eq!(wait, (BACKOFF_MIN * (1 << i)).min(BACKOFF_MAX));
            c.poll_command(t0 + wait);
        }
    }

    #[test]
    fn forced_modes_never_switch_and_unwanted_paths_hang_up() {
        let t0 = Instant::now();
        let mut c = HttpClient::new(Mode::WebSocket);
        c.want(t0, true);
        assert_eq!(c.poll_command(t0), Some(Command::Dial { websocket: true }));
        assert!(
            c.handle_event(t0, HttpEvent::UpgradeRefused("400".into()))
                .is_some()
        );
        let mut lp = HttpClient::new(Mode::LongPoll);
        lp.want(t0, true);
        assert_eq!(
            lp.poll_command(t0),
            Some(Command::Dial { websocket: false })
        );
        lp.handle_event(t0, HttpEvent::Opened);
        lp.want(t0, false);
        assert_eq!(lp.poll_command(t0), Some(Command::Hangup));
        assert_eq!(
            lp.handle_event(
                t0,
                HttpEvent::Closed {
                    heard: true,
                    why: "x".into()
                }
            ),
            None
        );
    }

    fn frame(msgs: &[&[u8]]) -> Vec<u8> {
        let mut b = Batch::new();
        msgs.iter().for_each(|m| b.push(m));
        b.take()
    }

    #[test]
    fn frames_in_bytes() {
        assert_eq!(
            frame(&[b"ab", b"", b"c"]),
            [0, 2, b'a', b'b', 0, 0, 0, 1, b'c']
        );
    }

    #[test]
    fn truncated_frame_stops_and_is_flagged() {
        let body = [0, 1, b'x', 0, 5, b'y'];
        let mut it = messages(&body);
        assert_eq!(it.next(), Some(&b"x"[..]));
        assert_eq!(it.next(), None);
        assert!(it.malformed());
        let mut whole = messages(&body[..3]);
        assert_eq!(whole.next(), Some(&b"x"[..]));
        assert_eq!(whole.next(), None);
        assert!(!whole.malformed());
    }

    #[test]
    fn refused_fill_appends_nothing() {
        let mut b = Batch::new();
        b.push(b"keep");
        b.push_with(|_| None);
        b.push_with(|_| Some(MAX_MESSAGE + 1));
        assert_eq!(b.take(), frame(&[b"keep"]));
    }

    proptest! {
        #[test]
        fn round_trip(msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..2000), 0..20)) {
            let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
            let body = frame(&refs);
            let mut it = messages(&body);
            let back: Vec<&[u8]> = it.by_ref().collect();
            prop_assert_eq!(back, refs);
            prop_assert!(!it.malformed());
        }

        #[test]
        fn parser_never_reads_past_the_end(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let total: usize = messages(&body).map(|m| m.len() + LEN_PREFIX).sum();
            prop_assert!(total <= body.len());
        }
    }

    #[test]
    fn poll_tags() {
        assert_eq!(poll_tag(Some(&poll_query(255))), Some(255));
        assert_eq!(poll_tag(Some("x=1&c=ffffffffffffffff")), Some(u64::MAX));
        for bad in [
            "c=ff",
            "c=",
            "c=zzzzzzzzzzzzzzzz",
            "d=00000000000000ff",
            "c=+fffffffffffffff",
        ] {
            assert_eq!(poll_tag(Some(bad)), None, "{bad}");
        }
        assert_eq!(poll_tag(None), None);
    }

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn data_request_answered_at_once_bare_poll_held_until_data() {
        let now = t0();
        let mut m = Mailboxes::new();
        assert!(m.request(now, 7, 1, false).is_empty());
        let a = m.request(now, 7, 2, true);
        assert_eq!(
            a,
            vec![Answer {
                request: 2,
                body: vec![]
            }]
        );
        m.send(7, b"down");
        assert_eq!(
            m.poll_answer(),
            Some(Answer {
                request: 1,
                body: frame(&[b"down"])
            })
        );
        assert_eq!(m.poll_answer(), None);
    }

    #[test]
    fn queued_data_waits_for_the_next_request() {
        let now = t0();
        let mut m = Mailboxes::new();
        m.request(now, 1, 10, true);
        m.send(1, b"a");
        m.send(1, b"b");
        assert_eq!(m.poll_answer(), None);
        let a = m.request(now, 1, 11, false);
        assert_eq!(
            a,
            vec![Answer {
                request: 11,
                body: frame(&[b"a", b"b"])
            }]
        );
    }

    #[test]
    fn unknown_tag_and_full_queue_drop() {
        let now = t0();
        let mut m: Mailboxes<u32> = Mailboxes::new();
        m.send(9, b"x");
        assert_eq!(m.dropped, 1);
        m.request(now, 9, 1, true);
        let big = vec![0u8; 60_000];
        for _ in 0..MAX_QUEUED_BYTES / 60_000 + 2 {
            m.send(9, &big);
        }
        assert!(m.dropped >= 2);
        let a = m.request(now, 9, 2, false);
        assert!(a[0].body.len() <= MAX_QUEUED_BYTES);
    }

    #[test]
    fn new_tags_beyond_the_limit_are_answered_at_once() {
        let now = t0();
        let mut m = Mailboxes::new();
        for tag in 0..MAX_TAGS as u64 {
            m.open(now, tag);
        }
        let a = m.request(now, u64::MAX, 1, false);
        assert_eq!(
            a,
            vec![Answer {
                request: 1,
                body: vec![]
            }]
        );
        assert_eq!(m.len(), MAX_TAGS);
        assert!(
            m.request(now, 0, 2, false).is_empty(),
            "known tags still held"
        );
    }

    #[test]
    fn holds_expire_empty_and_excess_polls_are_released() {
        let now = t0();
        let mut m = Mailboxes::new();
        let mut released = Vec::new();
        for r in 0..MAX_HELD as u32 + 2 {
            released.extend(m.request(now, 3, r, false));
        }
        assert_eq!(
            released.iter().map(|a| a.request).collect::<Vec<_>>(),
            [0, 1]
        );
        assert_eq!(m.next_timeout(), Some(now + HOLD));
        assert!(
            m.handle_timeout(now + HOLD - Duration::from_millis(1))
                .is_empty()
        );
        let expired = m.handle_timeout(now + HOLD);
        assert_eq!(expired.len(), MAX_HELD);
        assert!(expired.iter().all(|a| a.body.is_empty()));
        assert_eq!(m.len(), 1);
        m.handle_timeout(now + IDLE);
        assert!(m.is_empty());
    }
}

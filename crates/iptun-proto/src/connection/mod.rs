//! The client's connection: one session with the server, carried over
//! whichever of its candidate paths works best.
//!
//! A [`Connection`] owns the session engine ([`Client`]), a list of
//! candidate paths in the order the user prefers them (UDP, ICMP echo, DNS,
//! HTTP(S), each a [`Carrier`]), and the policy that moves the session
//! between them. It has the shape of quinn-proto's connection: feed it what
//! arrives ([`Connection::handle_input`], [`Connection::handle_tun_packet`],
//! [`Connection::handle_path_event`]) with the current time, send what
//! [`Connection::poll_transmit`] gives, act on [`Connection::poll_event`],
//! and call [`Connection::handle_timeout`] when [`Connection::poll_timeout`]
//! passes. The driver owns the sockets and the TUN device and nothing else.
//!
//! # The policy
//!
//! - **Start**: the handshake's init goes out on the first path, then
//!   [`STAGGER`] later on the second as well, and so on: the first path to
//!   bring the server's response becomes the one in use. A dead first
//!   choice costs seconds, and the server answers whichever copy of the
//!   init reaches it first (the others are stale to it).
//! - **In use**: everything goes on one path. Traffic sent on it that goes
//!   unanswered for the transport's liveness time (4 to 8 s; a push path is
//!   nudged with a keepalive, which the server echoes, after [`NUDGE_AFTER`])
//!   or an error the driver reports (unreachable, reset, TLS failure, a
//!   burst of DNS errors) fails the path.
//! - **Search**: when the path in use fails, every other candidate gets a
//!   probe at once: an authenticated [`Control`](crate::wire::Control)
//!   message the server answers on the path it came by without moving the
//!   session there. The first to answer takes over: the session, its keys
//!   and addresses stay, and the server follows the client to the new path
//!   with its first newest message (a keepalive sent at once). Meanwhile
//!   packets still go on the failed path, which takes over again if it
//!   answers first. Without valid keys (they expired while nothing worked),
//!   probes are copies of the handshake's init instead.
//! - **Back up**: candidates not in use are probed rarely, each on its own
//!   back-off ([`PROBE_MIN`] doubling to [`PROBE_MAX`]); a more preferred
//!   one that answers takes over. A path that fails within [`STABLE`] of
//!   taking over keeps its back-off growing, so a flapping path cannot make
//!   the client thrash.

mod carrier;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

pub use carrier::Carrier;

use crate::engine::{Client, ClientConfig, ClientEvent, ClientOutput, Traffic};
use crate::transport::dns::client::DnsClient;
use crate::transport::http::{self, HttpClient, HttpEvent, messages};
use crate::transport::icmp::IcmpClient;
use crate::transport::{Kind, TunSink};
use crate::wire::control::CONTROL_LEN;
use crate::wire::dns::Domain;
use crate::wire::message::TYPE_INIT;
use crate::{DropCounters, DropReason, TunnelConfig};

/// A candidate path: its index in the preference order.
pub type PathId = usize;

/// A candidate joins the startup race this long after the one before it.
pub const STAGGER: Duration = Duration::from_secs(2);
/// Traffic unanswered this long on the path in use brings a probe, which
/// the server answers at once: a dead path is told in seconds, and a
/// one-way flow proves its path alive too.
pub const NUDGE_AFTER: Duration = Duration::from_secs(1);
/// First wait before a candidate that failed while searching is probed again.
pub const SEARCH_RETRY_MIN: Duration = Duration::from_secs(2);
/// Longest wait between probes while no path works.
pub const SEARCH_RETRY_MAX: Duration = Duration::from_secs(30);
/// First wait before probing a candidate not in use.
pub const PROBE_MIN: Duration = Duration::from_secs(30);
/// Longest wait between probes of a candidate not in use.
pub const PROBE_MAX: Duration = Duration::from_secs(600);
/// Probes a nudge sends at once (either answer will do: one lost probe
/// must not fail a lossy path), and rounds of them before the path in use
/// counts as failed.
pub const NUDGE_COPIES: u32 = 2;
pub const NUDGE_ROUNDS: u8 = 2;
/// In a search, the first answer waits this long for more preferred
/// candidates still probed, so that a search ends in one move.
pub const SETTLE: Duration = Duration::from_secs(1);
/// A path that fails sooner than this after taking over does not get its
/// probe back-off reset: it flaps.
pub const STABLE: Duration = Duration::from_secs(60);
/// DNS queries failing in a row (error codes, timeouts) that fail the path.
pub const DNS_FAILURES: u32 = 8;
/// Room for a sealed message and any transport's framing.
pub const BUF_LEN: usize = 1 << 16;

/// How the client reaches the server on one candidate path.
#[derive(Clone, Debug)]
pub enum PathConfig {
    /// UDP to `server`.
    Udp {
        /// The server's address.
        server: SocketAddr,
    },
    /// ICMP echo to `server`, with echo identifier `id` (random).
    Icmp {
        /// The server's address.
        server: IpAddr,
        /// The echo identifier.
        id: u16,
    },
    /// DNS queries for `domain` through `resolvers`, as tag `tag` (random);
    /// `seed` seeds the query ids.
    Dns {
        /// The tunnel domain.
        domain: Domain,
        /// The resolvers (or the server itself), at least one.
        resolvers: Vec<SocketAddr>,
        /// The client's tag.
        tag: u32,
        /// Seeds the DNS ids.
        seed: u64,
    },
    /// HTTP(S), WebSocket or long-poll as `mode` says; the driver knows the URL.
    Http {
        /// Which mode to use.
        mode: http::Mode,
    },
}

/// A datagram (or framed message) for the driver of `path` to send: the
/// first `len` bytes of the buffer given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The path whose socket sends it.
    pub path: PathId,
    /// The destination: the server, or (DNS) the resolver to ask; `None`
    /// for HTTP, where the path's connection is the destination.
    pub to: Option<SocketAddr>,
    /// Its length.
    pub len: usize,
}

/// Something the driver acts on outside the packet flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A handshake gave a tunnel configuration the TUN device does not have
    /// yet (always the first time): configure it.
    Configured(TunnelConfig),
    /// The session moved from one path to another.
    Moved {
        /// The path left.
        from: PathId,
        /// The path in use now.
        to: PathId,
        /// Why the old path was left.
        why: String,
    },
    /// A path failed (for the log: the policy already acted on it).
    Failed {
        /// The path.
        path: PathId,
        /// Why.
        why: String,
    },
    /// An HTTP path's connection must be opened or closed.
    Http {
        /// The path.
        path: PathId,
        /// What to do.
        command: http::Command,
    },
    /// A probe sent with [`Connection::measure`] was answered.
    Measured {
        /// The path it went on.
        path: PathId,
        /// Bytes the server received.
        sent: u16,
        /// Bytes of the reply.
        received: usize,
        /// Time from sending to the reply.
        rtt: Duration,
    },
}

/// What the driver of a path saw, besides bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathEvent {
    /// Sending failed, or the network said the server is unreachable (an
    /// ICMP error, a refused connection): the path fails at once.
    Unreachable(String),
    /// An HTTP path's connection opened, was refused or ended.
    Http(HttpEvent),
}

/// Where a candidate stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathState {
    /// Not tried yet.
    Untried,
    /// Carrying the session.
    InUse,
    /// Answered its last probe; ready to take over.
    Standby,
    /// Failed, for this reason.
    Failed(String),
}

impl PathState {
    /// A short name for status.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Untried => "untried",
            Self::InUse => "in use",
            Self::Standby => "standby",
            Self::Failed(_) => "failed",
        }
    }
}

/// One candidate, as status shows it.
#[derive(Clone, Debug)]
pub struct PathStatus {
    /// The transport.
    pub kind: Kind,
    /// Where it stands.
    pub state: PathState,
    /// When it is probed next, if it is.
    pub next_probe: Option<Duration>,
    /// A probe is out now.
    pub probing: bool,
    /// The round-trip time of its last probe, or of its handshake.
    pub rtt: Option<Duration>,
    /// Time since an authenticated message last arrived on it.
    pub last_heard: Option<Duration>,
    /// Time since it last took over, while in use.
    pub in_use_for: Option<Duration>,
    /// Times it failed.
    pub failures: u64,
    /// The transport's own state.
    pub detail: PathDetail,
}

/// A transport's own state, for status.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // made only for status, a few at a time
pub enum PathDetail {
    /// UDP has none.
    Udp,
    /// The ICMP pacer and counters.
    Icmp(crate::transport::icmp::IcmpClientStats),
    /// The DNS path: resolver, tag, parameters and counters.
    Dns {
        /// The resolver in use.
        resolver: SocketAddr,
        /// The client's tag.
        tag: u32,
        /// Times the client moved to another resolver.
        switches: u64,
        /// Parameters and counters.
        info: Box<crate::transport::dns::client::PathInfo>,
    },
    /// The HTTP connection.
    Http(http::HttpClientInfo),
}

/// The connection's state, for status.
#[derive(Clone, Debug)]
pub struct ConnectionStatus {
    /// The path packets go on.
    pub current: PathId,
    /// The path in use failed and others are being probed.
    pub searching: bool,
    /// Moves from one path to another.
    pub moves: u64,
    /// Every candidate, in preference order.
    pub paths: Vec<PathStatus>,
}

struct Candidate {
    carrier: Carrier,
    state: PathState,
    /// When an authenticated message last arrived on it.
    last_rx: Option<Instant>,
    /// The first send since the last authenticated arrival.
    unanswered_since: Option<Instant>,
    /// The last keepalive sent to make it answer.
    nudged: Option<Instant>,
    /// The probe in flight: id and when it went.
    probe: Option<(u32, Instant)>,
    /// When to probe it next.
    next_probe: Option<Instant>,
    probe_wait: Duration,
    /// When it last took over.
    in_use_since: Option<Instant>,
    rtt: Option<Duration>,
    failures: u64,
    /// The sender index of the last handshake init copied onto it.
    init_sent: Option<u32>,
    /// The probes of a nudge in flight (the path in use).
    nudge: Option<Nudge>,
}

/// A round of probes on the path in use, whose traffic went unanswered.
#[derive(Clone, Copy, Debug)]
struct Nudge {
    /// The first of the round's probe ids (they follow each other).
    first_id: u32,
    /// Probes sent so far in this round.
    copies: u32,
    sent: Instant,
    round: u8,
}

impl Candidate {
    fn new(carrier: Carrier) -> Self {
        Self {
            carrier,
            state: PathState::Untried,
            last_rx: None,
            unanswered_since: None,
            nudged: None,
            probe: None,
            next_probe: None,
            probe_wait: PROBE_MIN,
            in_use_since: None,
            rtt: None,
            failures: 0,
            init_sent: None,
            nudge: None,
        }
    }

    fn sent(&mut self, now: Instant) {
        if self.unanswered_since.is_none() {
            self.unanswered_since = Some(now);
        }
    }

    /// How long a nudge's probes may go unanswered: a few round trips,
    /// 1 to 3 s (longer while an HTTP connection is still being opened).
    fn nudge_timeout(&self) -> Duration {
        if let Carrier::Http(h) = &self.carrier
            && !h.is_open()
        {
            return self.carrier.probe_timeout(); // a connection to open first
        }
        let rtts = self.rtt.map_or(Duration::MAX, |r| r.saturating_mul(4));
        rtts.clamp(Duration::from_secs(1), Duration::from_secs(3))
    }

    /// When the traffic sent on it counts as unanswered.
    fn dead_at(&self) -> Option<Instant> {
        Some(self.unanswered_since? + self.carrier.liveness())
    }

    /// When it wants a nudge: a probe, which the server answers at once on
    /// every transport, so silence after traffic is told from a dead path
    /// in seconds (a one-way flow gets an answer too).
    fn nudge_at(&self) -> Option<Instant> {
        if self.probe.is_some() || self.nudge.is_some() || !self.carrier.nudges() {
            return None;
        }
        let since = self.unanswered_since?;
        let last = self.nudged.filter(|&t| t >= since).unwrap_or(since);
        Some(last + NUDGE_AFTER)
    }
}

/// The client's connection: see the module docs.
pub struct Connection {
    engine: Client,
    paths: Vec<Candidate>,
    /// The path packets go on.
    current: PathId,
    /// The startup race: when it began (paths join [`STAGGER`] apart).
    race: Option<Instant>,
    /// The path in use failed at this time; other candidates are being probed.
    searching: Option<Instant>,
    moves: u64,
    /// In a search: when to move to the best candidate that answered.
    settle_at: Option<Instant>,
    next_probe_id: u32,
    /// Probes sent with [`Connection::measure`]: id, path, when.
    measuring: Vec<(u32, PathId, Instant)>,
    /// Messages the engine produced while handling input, for their path.
    queued: VecDeque<(PathId, Vec<u8>)>,
    events: VecDeque<Event>,
    /// Where packets go when the TUN batch is full (they are dropped).
    scratch: Box<[u8]>,
    /// Packets dropped for a full TUN batch.
    tun_full: u64,
}

impl Connection {
    /// A connection over `paths` (most preferred first, at least one).
    /// `unix_nanos` is the wall-clock time at `now`; it seeds handshake
    /// timestamps, which must grow across client restarts.
    pub fn new(
        config: ClientConfig,
        paths: Vec<PathConfig>,
        now: Instant,
        unix_nanos: u64,
    ) -> Self {
        assert!(!paths.is_empty(), "a connection needs a path");
        let paths = paths
            .into_iter()
            .map(|p| {
                Candidate::new(match p {
                    PathConfig::Udp { server } => Carrier::Udp { server },
                    PathConfig::Icmp { server, id } => Carrier::Icmp(IcmpClient::new(server, id)),
                    PathConfig::Dns {
                        domain,
                        resolvers,
                        tag,
                        seed,
                    } => Carrier::Dns(Box::new(DnsClient::new(domain, resolvers, tag, seed))),
                    PathConfig::Http { mode } => Carrier::Http(HttpClient::new(mode)),
                })
            })
            .collect();
        let mut c = Self {
            engine: Client::new(config, now, unix_nanos),
            paths,
            current: 0,
            race: Some(now),
            searching: None,
            moves: 0,
            settle_at: None,
            next_probe_id: 1,
            measuring: Vec::new(),
            queued: VecDeque::new(),
            events: VecDeque::new(),
            scratch: vec![0; BUF_LEN].into_boxed_slice(),
            tun_full: 0,
        };
        c.refresh(now);
        c
    }

    /// The session engine (traffic, drops, handshake times).
    pub fn engine(&self) -> &Client {
        &self.engine
    }

    /// The path packets from the TUN device go on now: the driver passes
    /// that path's send buffer to [`Connection::handle_tun_packet`].
    pub fn current_path(&self) -> PathId {
        self.current
    }

    /// The number of candidate paths.
    pub fn path_count(&self) -> usize {
        self.paths.len()
    }

    /// The transport of `path`.
    pub fn kind(&self, path: PathId) -> Kind {
        self.paths[path].carrier.kind()
    }

    /// The server's address on the underlay, as `path` reaches it (`None`
    /// for paths through resolvers or proxies).
    pub fn server_ip(&self, path: PathId) -> Option<IpAddr> {
        self.paths[path].carrier.server_ip()
    }

    /// The resolvers of a DNS path (none for other transports).
    pub fn resolvers(&self, path: PathId) -> &[SocketAddr] {
        match &self.paths[path].carrier {
            Carrier::Dns(c) => c.resolvers(),
            _ => &[],
        }
    }

    /// Whether the session has keys to send with.
    pub fn is_connected(&self, now: Instant) -> bool {
        self.engine.is_connected(now)
    }

    /// Inner traffic of the session.
    pub fn traffic(&self) -> Traffic {
        self.engine.traffic()
    }

    /// The engine's drops, plus packets lost to a full TUN batch.
    pub fn drops(&self) -> DropCounters {
        let mut d = self.engine.drops();
        for _ in 0..self.tun_full {
            d.add(DropReason::TooLarge);
        }
        d
    }

    /// A packet from the TUN device: sealed and framed into `buf` (which
    /// should be the send buffer of [`Connection::current_path`]'s driver;
    /// zero copies on UDP). `None`: dropped and counted, or queued by the
    /// transport (DNS), whose queries come out of `poll_transmit`.
    pub fn handle_tun_packet(
        &mut self,
        now: Instant,
        packet: &[u8],
        buf: &mut [u8],
    ) -> Option<Transmit> {
        let path = self.current;
        let c = &mut self.paths[path];
        let h = c.carrier.headroom();
        let n = self
            .engine
            .handle_tun_packet(now, packet, buf.get_mut(h..)?)
            .ok()?;
        c.sent(now);
        let len = c.carrier.frame(now, buf, n)?;
        Some(Transmit {
            path,
            to: c.carrier.destination(),
            len,
        })
    }

    /// Bytes that arrived on `path`'s socket from `from`: a UDP datagram,
    /// an ICMP message, a DNS response, an HTTP body. Inner packets go to
    /// `tun`; anything not authenticated is dropped and counted.
    pub fn handle_input(
        &mut self,
        now: Instant,
        path: PathId,
        from: Option<SocketAddr>,
        bytes: &[u8],
        tun: &mut impl TunSink,
    ) {
        match &mut self.paths[path].carrier {
            Carrier::Udp { .. } => {
                self.open(now, path, bytes, None, tun);
            }
            Carrier::Icmp(c) => {
                let Some(from) = from else { return };
                let Some((msg, asked)) = c.unwrap(from.ip(), bytes) else {
                    return;
                };
                let opened = self.open(now, path, msg, Some(asked), tun);
                // An answer without a session (the server lost it) still
                // answers a request; forged or stale ones do not.
                if (opened.is_some() || msg.is_empty())
                    && let Carrier::Icmp(c) = &mut self.paths[path].carrier
                {
                    c.replied(opened == Some(true));
                }
            }
            Carrier::Dns(c) => {
                let Some(from) = from else { return };
                if c.handle_response(now, from, bytes).is_err() {
                    return;
                }
                while let Some(msg) = self.dns(path).and_then(|c| c.poll_message()) {
                    self.open(now, path, &msg, None, tun);
                }
                let failing = self
                    .dns(path)
                    .is_some_and(|c| c.uplink().failures_in_row() >= DNS_FAILURES);
                if failing {
                    self.fail(now, path, "DNS queries failing (error answers)".into());
                }
            }
            Carrier::Http(_) => {
                for msg in messages(bytes) {
                    self.open(now, path, msg, None, tun);
                }
            }
        }
    }

    fn dns(&mut self, path: PathId) -> Option<&mut DnsClient> {
        match &mut self.paths[path].carrier {
            Carrier::Dns(c) => Some(c),
            _ => None,
        }
    }

    /// Open one tunnel message from `path`. `Some(carried_data)` when it
    /// authenticated.
    /// `asked`: when the request this answers was sent, where the transport
    /// knows (ICMP); an answer to a request older than the traffic waiting
    /// for one proves nothing about the path now.
    fn open(
        &mut self,
        now: Instant,
        path: PathId,
        msg: &[u8],
        asked: Option<Instant>,
        tun: &mut impl TunSink,
    ) -> Option<bool> {
        let handshakes = self.engine.last_handshake();
        let Self {
            engine, scratch, ..
        } = self;
        let (out, spilled) = match tun.buffer(msg.len()) {
            Some(b) => (b, false),
            None => (&mut scratch[..], true),
        };
        let data = match engine.handle_datagram(now, msg, out) {
            Ok(ClientOutput::Tun(packet)) => {
                let n = packet.len();
                if spilled {
                    self.tun_full += 1;
                } else {
                    tun.commit(n);
                }
                true
            }
            Ok(ClientOutput::Send(reply)) => {
                self.queued.push_back((path, reply.to_vec()));
                false
            }
            Ok(ClientOutput::ProbeReply { id, len }) => {
                self.probe_answered(now, path, id, len, msg.len());
                false
            }
            Ok(ClientOutput::Nothing) => false,
            Err(_) => return None,
        };
        let waiting = self.paths[path].unanswered_since;
        let stale = asked.is_some_and(|t| waiting.is_some_and(|u| t < u));
        if !stale {
            self.heard(now, path);
        }
        if self.engine.last_handshake() != handshakes {
            self.handshake_done(now, path);
        }
        while let Some(ClientEvent::Configured(config)) = self.engine.poll_event() {
            self.events.push_back(Event::Configured(config));
        }
        Some(data)
    }

    /// An authenticated message arrived on `path`.
    fn heard(&mut self, now: Instant, path: PathId) {
        let c = &mut self.paths[path];
        c.last_rx = Some(now);
        c.unanswered_since = None;
        c.nudge = None;
        if path == self.current && self.race.is_none() && c.state != PathState::InUse {
            // The path in use came back before any other answered.
            c.state = PathState::InUse;
            if self.searching.take().is_some() {
                for i in 0..self.paths.len() {
                    if i != path && self.paths[i].probe.is_none() {
                        self.schedule_probe(now, i);
                    }
                }
            }
            self.refresh(now);
        }
    }

    /// A handshake completed with a response that came on `path`: the
    /// session's downstream goes there (the confirmation is queued for it).
    fn handshake_done(&mut self, now: Instant, path: PathId) {
        if let Some(start) = self.race.take() {
            self.paths[path].rtt = self.paths[path]
                .probe
                .take()
                .map(|(_, t)| now - t)
                .or_else(|| Some(now.saturating_duration_since(start)));
            self.current = path;
            self.paths[path].state = PathState::InUse;
            self.paths[path].in_use_since = Some(now);
            self.schedule_standby_probes(now);
        } else if path != self.current {
            self.move_to(now, path, "handshake completed on another path".into());
        }
        self.searching = None;
        self.refresh(now);
    }

    fn probe_answered(&mut self, now: Instant, path: PathId, id: u32, sent: u16, received: usize) {
        if let Some(i) = self.measuring.iter().position(|m| m.0 == id && m.1 == path) {
            let (_, _, at) = self.measuring.swap_remove(i);
            self.events.push_back(Event::Measured {
                path,
                sent,
                received,
                rtt: now - at,
            });
            return;
        }
        let c = &mut self.paths[path];
        if let Some(n) = c.nudge
            && id.wrapping_sub(n.first_id) < NUDGE_COPIES
        {
            c.nudge = None;
            c.rtt = Some(now - n.sent);
            return;
        }
        let Some((_, at)) = c.probe.filter(|&(p, _)| p == id) else {
            return; // a late answer to a probe already given up on
        };
        c.probe = None;
        c.rtt = Some(now - at);
        if path == self.current {
            return;
        }
        c.state = PathState::Standby;
        if self.searching.is_some() {
            self.settle(now);
        } else if path < self.current {
            self.move_to(now, path, "a preferred path works again".into());
        } else {
            self.schedule_probe(now, path);
        }
        self.refresh(now);
    }

    /// In a search: move to the most preferred candidate that answered,
    /// once no more preferred one can still answer within [`SETTLE`] of
    /// the first answer (one move, not two in a row).
    fn settle(&mut self, now: Instant) {
        let Some(since) = self.searching else { return };
        let answered =
            |c: &Candidate| c.state == PathState::Standby && c.last_rx.is_some_and(|t| t >= since);
        let Some(best) = (0..self.paths.len()).find(|&i| answered(&self.paths[i])) else {
            return;
        };
        let first = self
            .paths
            .iter()
            .filter(|c| answered(c))
            .filter_map(|c| c.last_rx)
            .min()
            .unwrap_or(now);
        let pending = self.paths[..best].iter().any(|c| c.probe.is_some());
        if pending && now < first + SETTLE {
            self.settle_at = Some(first + SETTLE);
            return;
        }
        self.settle_at = None;
        let why = match &self.paths[self.current].state {
            PathState::Failed(why) => why.clone(),
            _ => "failed".into(),
        };
        self.move_to(now, best, why);
    }

    /// Move the session to `to`. The server follows with the first newest
    /// message there: a keepalive goes at once (on polled paths the polls
    /// are keepalives).
    fn move_to(&mut self, now: Instant, to: PathId, why: String) {
        let from = self.current;
        if from == to {
            return;
        }
        if self.paths[from].state == PathState::InUse {
            self.paths[from].state = PathState::Standby;
        }
        self.searching = None;
        self.settle_at = None;
        self.schedule_probe(now, from);
        self.current = to;
        self.moves += 1;
        let c = &mut self.paths[to];
        c.state = PathState::InUse;
        c.in_use_since = Some(now);
        c.next_probe = None;
        c.probe = None;
        c.nudge = None;
        c.unanswered_since = None;
        if let Ok(n) = self.engine.seal_keepalive(now, &mut self.scratch) {
            self.queued.push_back((to, self.scratch[..n].to_vec()));
        }
        self.events.push_back(Event::Moved { from, to, why });
        self.refresh(now);
    }

    /// `path` failed: if it is in use, search for another.
    fn fail(&mut self, now: Instant, path: PathId, why: String) {
        let c = &mut self.paths[path];
        if matches!(c.state, PathState::Failed(_)) && c.probe.is_none() {
            return; // already counted
        }
        c.failures += 1;
        c.probe = None;
        c.nudge = None;
        c.unanswered_since = None;
        c.state = PathState::Failed(why.clone());
        self.events.push_back(Event::Failed { path, why });
        if path != self.current {
            self.schedule_probe(now, path);
            self.settle(now);
            self.refresh(now);
            return;
        }
        // The path in use: it is probed again after its back-off, which
        // keeps growing if it failed soon after taking over (it flaps).
        let flapping = c.failures > 1
            && c.in_use_since
                .is_some_and(|t| now.saturating_duration_since(t) < STABLE);
        c.probe_wait = if flapping {
            (c.probe_wait * 2).clamp(PROBE_MIN, PROBE_MAX)
        } else {
            PROBE_MIN
        };
        if self.race.is_some() {
            return; // no session yet: the race goes on
        }
        self.searching = Some(now);
        for (i, other) in self.paths.iter_mut().enumerate() {
            if i != path {
                other.probe_wait = SEARCH_RETRY_MIN;
                other.next_probe = Some(now);
            }
        }
        self.refresh(now);
    }

    fn schedule_probe(&mut self, now: Instant, path: PathId) {
        let c = &mut self.paths[path];
        let (min, max) = if self.searching.is_some() {
            (SEARCH_RETRY_MIN, SEARCH_RETRY_MAX)
        } else {
            (PROBE_MIN, PROBE_MAX)
        };
        let wait = c.probe_wait.clamp(min, max);
        c.next_probe = Some(now + wait);
        c.probe_wait = (wait * 2).min(max);
    }

    fn schedule_standby_probes(&mut self, now: Instant) {
        for i in 0..self.paths.len() {
            if i != self.current {
                self.schedule_probe(now, i);
            }
        }
    }

    /// What the driver of `path` saw besides bytes.
    pub fn handle_path_event(&mut self, now: Instant, path: PathId, event: PathEvent) {
        match event {
            PathEvent::Unreachable(why) => {
                // Only a path that is used or tried can fail.
                let c = &self.paths[path];
                if path == self.current || c.probe.is_some() || self.race.is_some() {
                    self.fail(now, path, why);
                }
            }
            PathEvent::Http(event) => {
                let Carrier::Http(c) = &mut self.paths[path].carrier else {
                    return;
                };
                let opened = event == HttpEvent::Opened;
                if let Some(why) = c.handle_event(now, event) {
                    self.fail(now, path, why);
                } else if opened && path == self.current {
                    // Tell the server at once which connection is ours now.
                    if let Ok(n) = self.engine.seal_keepalive(now, &mut self.scratch) {
                        self.queued.push_back((path, self.scratch[..n].to_vec()));
                    }
                }
                self.refresh(now);
            }
        }
    }

    /// Probe `path` now with a padded probe of `len` bytes asking for a
    /// `reply_len`-byte reply, outside the policy: for measuring a path
    /// (`iptun probe`). The answer comes as [`Event::Measured`].
    pub fn measure(&mut self, now: Instant, path: PathId, len: usize, reply_len: u16) -> bool {
        let c = &mut self.paths[path];
        let h = c.carrier.headroom();
        let id = self.next_probe_id;
        let Ok(n) = self
            .engine
            .seal_probe(now, id, len, reply_len, &mut self.scratch[h..])
        else {
            return false;
        };
        self.next_probe_id = self.next_probe_id.wrapping_add(1);
        self.measuring.push((id, path, now));
        if self.measuring.len() > 4096 {
            self.measuring.remove(0);
        }
        self.queued
            .push_back((path, self.scratch[h..h + n].to_vec()));
        true
    }

    /// The next datagram to send: copies of the handshake, keepalives,
    /// probes, polls, DNS queries, framed into `buf`.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        buf.resize(BUF_LEN, 0);
        loop {
            // What goes, and whether it waits for an answer (bare polls
            // are answered when the server has something, or at its hold).
            let (path, len, waits) = if let Some((path, msg)) = self.queued.pop_front() {
                // Keepalives (a handshake's confirmation, a move's) and probes.
                let waits = self.paths[path].carrier.answers_at_once();
                (path, self.stage(path, &msg, buf), waits)
            } else if let Some((path, len)) = self.engine_timers(now, buf) {
                // An init waits for its response; a keepalive waits only
                // where the server echoes it at once.
                let init = buf[self.paths[path].carrier.headroom()] == TYPE_INIT;
                let waits = init || self.paths[path].carrier.answers_at_once();
                (path, Some(len), waits)
            } else if let Some(path) = self.due_probe(now) {
                (path, self.probe(now, path, buf), false)
            } else if let Some(path) = self.due_nudge(now) {
                (path, self.nudge_probe(now, path, buf), false)
            } else if let Some(path) = self.due_poll(now) {
                (path, self.keepalive(now, path, buf), false)
            } else {
                return self.poll_queries(now, buf);
            };
            let Some(len) = len else { continue };
            let c = &mut self.paths[path];
            if waits && path == self.current {
                c.sent(now);
            }
            let Some(len) = c.carrier.frame(now, buf, len) else {
                continue;
            };
            return Some(Transmit {
                path,
                to: c.carrier.destination(),
                len,
            });
        }
    }

    /// Copy `msg` into `buf` behind the path's headroom.
    fn stage(&self, path: PathId, msg: &[u8], buf: &mut [u8]) -> Option<usize> {
        let h = self.paths[path].carrier.headroom();
        buf.get_mut(h..h + msg.len())?.copy_from_slice(msg);
        Some(msg.len())
    }

    /// The engine's timers: an init (first, retry, rekey) or a keepalive,
    /// for the path in use. Inits are also copied onto every path in the
    /// startup race or being probed in a search.
    fn engine_timers(&mut self, now: Instant, buf: &mut [u8]) -> Option<(PathId, usize)> {
        let path = self.current;
        let h = self.paths[path].carrier.headroom();
        let n = self.engine.poll_timers(now, &mut buf[h..])?;
        if buf[h] == TYPE_INIT {
            let index = u32::from_le_bytes(buf[h + 4..h + 8].try_into().expect("4 bytes"));
            self.paths[path].init_sent = Some(index);
        }
        Some((path, n))
    }

    /// A candidate due for a probe (or, in the startup race, for its copy
    /// of the init).
    fn due_probe(&mut self, now: Instant) -> Option<PathId> {
        let init = self
            .engine
            .pending_init()
            .map(|i| u32::from_le_bytes(i[4..8].try_into().expect("4 bytes")));
        if let Some(start) = self.race {
            // Paths join the race one by one; each gets the current init.
            let joined =
                (now.saturating_duration_since(start).as_nanos() / STAGGER.as_nanos()) as usize + 1;
            return (0..joined.min(self.paths.len()))
                .find(|&i| init.is_some() && self.paths[i].init_sent != init);
        }
        (0..self.paths.len()).find(|&i| {
            let c = &self.paths[i];
            i != self.current && c.probe.is_none() && c.next_probe.is_some_and(|t| t <= now)
        })
    }

    /// Probe `path`: a probe if the session has keys, else a copy of the
    /// handshake's init. Its length at `buf[headroom..]`.
    fn probe(&mut self, now: Instant, path: PathId, buf: &mut [u8]) -> Option<usize> {
        let h = self.paths[path].carrier.headroom();
        if let Some(init) = self
            .engine
            .pending_init()
            .filter(|_| self.race.is_some() || !self.engine.is_connected(now))
        {
            let index = u32::from_le_bytes(init[4..8].try_into().expect("4 bytes"));
            buf.get_mut(h..h + init.len())?.copy_from_slice(init);
            let c = &mut self.paths[path];
            c.init_sent = Some(index);
            if c.probe.is_none() {
                c.probe = Some((0, now));
            }
            c.next_probe = None;
            return Some(init.len());
        }
        let id = self.next_probe_id;
        let reply = CONTROL_LEN as u16;
        let Ok(n) = self
            .engine
            .seal_probe(now, id, CONTROL_LEN, reply, &mut buf[h..])
        else {
            // No keys and no init yet: the engine starts one soon.
            self.paths[path].next_probe = Some(now + SEARCH_RETRY_MIN);
            return None;
        };
        self.next_probe_id = self.next_probe_id.wrapping_add(1);
        let c = &mut self.paths[path];
        c.probe = Some((id, now));
        c.next_probe = None;
        self.refresh(now);
        Some(n)
    }

    /// A path that wants a keepalive now: a bare poll on a polled path in
    /// use, or a nudge on a push path whose traffic goes unanswered.
    fn due_poll(&mut self, now: Instant) -> Option<PathId> {
        let path = self.current;
        let connected = self.engine.is_connected(now);
        let polling = self.polling(now);
        let c = &mut self.paths[path];
        c.carrier.set_polling(polling);
        if let Carrier::Icmp(icmp) = &mut c.carrier {
            // Always let the pacer forget lost requests, or its deadline
            // stays in the past and the loop spins.
            if icmp.polls_due(now) > 0 && connected {
                return Some(path);
            }
        }
        None
    }

    /// The path in use, when its traffic went unanswered for
    /// [`NUDGE_AFTER`]: it gets a round of probes (outside a race or a search).
    fn due_nudge(&mut self, now: Instant) -> Option<PathId> {
        if self.race.is_some() || self.searching.is_some() {
            return None;
        }
        let connected = self.engine.is_connected(now);
        let c = &mut self.paths[self.current];
        if let Some(n) = c.nudge {
            return (n.copies < NUDGE_COPIES && connected).then_some(self.current);
        }
        if c.nudge_at().is_none_or(|t| t > now) {
            return None;
        }
        // (Counted as done without keys too, or the deadline stays due.)
        c.nudged = Some(now);
        if !connected {
            return None;
        }
        c.nudge = Some(Nudge {
            first_id: self.next_probe_id,
            copies: 0,
            sent: now,
            round: 1,
        });
        self.next_probe_id = self.next_probe_id.wrapping_add(NUDGE_COPIES);
        Some(self.current)
    }

    /// The next probe of the nudge on `path`.
    fn nudge_probe(&mut self, now: Instant, path: PathId, buf: &mut [u8]) -> Option<usize> {
        let c = &mut self.paths[path];
        let h = c.carrier.headroom();
        let n = c.nudge.as_mut()?;
        let id = n.first_id.wrapping_add(n.copies);
        n.copies += 1;
        let reply = CONTROL_LEN as u16;
        self.engine
            .seal_probe(now, id, CONTROL_LEN, reply, &mut buf[h..])
            .ok()
    }

    /// Whether the path in use keeps requests outstanding: while the
    /// session is up, and while a handshake is pending too, for a response
    /// may need more answers to come down than the init's own requests
    /// bring (DNS answers of A or AAAA records are small). DNS polls need
    /// no keys; ICMP polls are keepalives, sent only once connected.
    fn polling(&self, now: Instant) -> bool {
        self.engine.is_connected(now) || self.engine.pending_init().is_some()
    }

    fn keepalive(&mut self, now: Instant, path: PathId, buf: &mut [u8]) -> Option<usize> {
        let h = self.paths[path].carrier.headroom();
        self.engine.seal_keepalive(now, &mut buf[h..]).ok()
    }

    /// The next DNS query of any DNS path.
    fn poll_queries(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        for (path, c) in self.paths.iter_mut().enumerate() {
            if let Some((to, len)) = c.carrier.poll_query(now, buf) {
                if path == self.current {
                    c.sent(now);
                }
                return Some(Transmit {
                    path,
                    to: Some(to),
                    len,
                });
            }
        }
        None
    }

    /// Bring the transports in line with the policy: polls only on the
    /// path in use, HTTP connections only where used or probed.
    fn refresh(&mut self, now: Instant) {
        let polling = self.polling(now);
        let racing = self.race.map(|start| {
            (now.saturating_duration_since(start).as_nanos() / STAGGER.as_nanos()) as usize + 1
        });
        for (i, c) in self.paths.iter_mut().enumerate() {
            let in_use = i == self.current;
            c.carrier.set_polling(in_use && polling);
            let probed = c.probe.is_some() || c.next_probe.is_some_and(|t| t <= now);
            let wanted = in_use || probed || racing.is_some_and(|j| i < j);
            if let Carrier::Http(h) = &mut c.carrier {
                h.want(now, wanted);
                if let Some(command) = h.poll_command(now) {
                    self.events.push_back(Event::Http { path: i, command });
                }
            }
        }
    }

    /// When [`Connection::handle_timeout`] (or `poll_transmit`) next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = self.engine.next_timeout();
        let mut at = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        if let Some(start) = self.race {
            let joined = self
                .paths
                .iter()
                .position(|c| c.init_sent.is_none())
                .unwrap_or(self.paths.len());
            if joined < self.paths.len() {
                at(Some(start + STAGGER * joined as u32));
            }
        }
        for (i, c) in self.paths.iter().enumerate() {
            at(c.carrier.next_timeout());
            at(c.probe.map(|(_, sent)| sent + c.carrier.probe_timeout()));
            if c.probe.is_none() {
                at(c.next_probe);
            }
            if i == self.current && self.searching.is_none() {
                at(c.dead_at());
                at(c.nudge.map(|n| n.sent + c.nudge_timeout()));
                if self.race.is_none() {
                    at(c.nudge_at());
                }
            }
            if i == self.current && self.searching.is_some() {
                at(self.settle_at);
            }
        }
        t
    }

    /// Time passed: probes and paths given up on, transport timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        for i in 0..self.paths.len() {
            self.paths[i].carrier.handle_timeout(now);
            let c = &mut self.paths[i];
            let Some((_, sent)) = c.probe else { continue };
            if now < sent + c.carrier.probe_timeout() {
                continue;
            }
            // The path in use fails only if nothing at all came since.
            if i == self.current && c.last_rx.is_some_and(|t| t >= sent) {
                c.probe = None;
                continue;
            }
            self.fail(now, i, "no answer to a probe".into());
        }
        let c = &mut self.paths[self.current];
        if let Some(n) = c.nudge
            && now >= n.sent + c.nudge_timeout()
        {
            if n.round < NUDGE_ROUNDS {
                let first_id = self.next_probe_id;
                self.next_probe_id = first_id.wrapping_add(NUDGE_COPIES);
                c.nudge = Some(Nudge {
                    first_id,
                    copies: 0,
                    sent: now,
                    round: n.round + 1,
                });
            } else {
                c.nudge = None;
                self.fail(now, self.current, "no answer to probes".into());
            }
        }
        let c = &mut self.paths[self.current];
        if c.dead_at().is_some_and(|t| t <= now) {
            let why = format!("nothing came back for {} s", c.carrier.liveness().as_secs());
            // The deadline is spent whether or not the path fails now (it
            // may have failed already, or a search is on): left in place,
            // poll_timeout would keep returning it and the driver spin.
            c.unanswered_since = None;
            if self.searching.is_none() {
                self.fail(now, self.current, why);
            }
        }
        if self.settle_at.is_some_and(|t| t <= now) {
            self.settle(now);
        }
        self.refresh(now);
    }

    /// The next thing for the driver to do outside the packet flow.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Every candidate's state.
    pub fn status(&self, now: Instant) -> ConnectionStatus {
        let paths = self
            .paths
            .iter()
            .enumerate()
            .map(|(i, c)| PathStatus {
                kind: c.carrier.kind(),
                state: c.state.clone(),
                next_probe: c
                    .next_probe
                    .filter(|_| i != self.current)
                    .map(|t| t.saturating_duration_since(now)),
                probing: c.probe.is_some() || c.nudge.is_some(),
                rtt: c.rtt,
                last_heard: c.last_rx.map(|t| now.saturating_duration_since(t)),
                in_use_for: c
                    .in_use_since
                    .filter(|_| i == self.current)
                    .map(|t| now.saturating_duration_since(t)),
                failures: c.failures,
                detail: match &c.carrier {
                    Carrier::Udp { .. } => PathDetail::Udp,
                    Carrier::Icmp(icmp) => PathDetail::Icmp(icmp.stats()),
                    Carrier::Dns(dns) => PathDetail::Dns {
                        resolver: dns.resolver(),
                        tag: dns.uplink().tag(),
                        switches: dns.switches(),
                        info: Box::new(dns.uplink().path_info()),
                    },
                    Carrier::Http(h) => PathDetail::Http(h.info()),
                },
            })
            .collect();
        ConnectionStatus {
            current: self.current,
            searching: self.searching.is_some(),
            moves: self.moves,
            paths,
        }
    }
}

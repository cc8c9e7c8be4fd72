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
//!   unanswered for [`NUDGE_AFTER`] brings a nudge: [`NUDGE_COPIES`] probes,
//!   which the server answers at once; [`NUDGE_ROUNDS`] rounds of them
//!   unanswered (a few round trips each), traffic unanswered for the
//!   transport's liveness time (4 to 8 s), or an error the driver reports
//!   (unreachable, reset, TLS failure, a burst of DNS errors) fail the path.
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
mod policy;
mod status;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

pub use carrier::Carrier;
use policy::{Candidate, Nudge};
pub use policy::{
    DNS_FAILURES, NUDGE_AFTER, NUDGE_COPIES, NUDGE_ROUNDS, PROBE_MAX, PROBE_MIN, SEARCH_RETRY_MAX,
    SEARCH_RETRY_MIN, SETTLE, STABLE, STAGGER,
};
pub use status::{ConnectionStatus, PathDetail, PathState, PathStatus};

use crate::crypto::Reserved;
use crate::engine::{Client, ClientConfig, ClientEvent, ClientOutput, Traffic};
use crate::transport::dns::client::DnsClient;
use crate::transport::http::{self, HttpClient, HttpEvent, messages};
use crate::transport::icmp::IcmpClient;
use crate::transport::{Kind, TunSink};
use crate::wire::dns::Domain;
use crate::wire::message::DATA_OVERHEAD;
use crate::wire::message::TYPE_INIT;
use crate::{DropCounters, DropReason, TunnelConfig};

/// A candidate path: its index in the preference order.
pub type PathId = usize;

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
    /// DNS queries for `domain` through `resolvers` (all at once), as tag
    /// `tag` (random); `seed` seeds the query ids.
    Dns {
        /// The tunnel domain.
        domain: Domain,
        /// How many resolvers (or the server itself) there are, at least
        /// one; the driver knows them by their number.
        resolvers: usize,
        /// The longest query name (characters), if the user caps it.
        max_query: Option<usize>,
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
    /// Where on that path.
    pub to: Remote,
    /// Its length.
    pub len: usize,
}

/// The other end of a path, as its driver knows it: where a transmit goes,
/// or where input came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remote {
    /// An address: the server's (UDP; ICMP, where the port means nothing).
    Addr(SocketAddr),
    /// A DNS path's resolver, by its number (in the order the driver gave
    /// them: an address over UDP, a DoT or DoH server).
    Resolver(usize),
    /// The path's own connection (HTTP).
    Connection,
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
    /// Messages the engine produced while handling input, for their path,
    /// and whether the server answers them at once (probes).
    queued: VecDeque<(PathId, Vec<u8>, bool)>,
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
                    PathConfig::Icmp { server, id } => {
                        Carrier::Icmp(Box::new(IcmpClient::new(server, id)))
                    }
                    PathConfig::Dns {
                        domain,
                        resolvers,
                        max_query,
                        tag,
                        seed,
                    } => Carrier::Dns(Box::new(DnsClient::new(
                        domain, resolvers, max_query, tag, seed, now,
                    ))),
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
    /// transport (DNS; ICMP when the pacing holds it back), whose
    /// datagrams come out of `poll_transmit`.
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
        let len = c.carrier.frame_packet(now, buf, n)?;
        Some(Transmit {
            path,
            to: c.carrier.destination(),
            len,
        })
    }

    /// A packet from the TUN device for `path`, the current path and a
    /// UDP one (whose datagrams are data messages, unframed), reserved
    /// only ([`Client::reserve_tun_packet`]): the caller seals it with
    /// [`Reserved::seal`] into the first `room` bytes of its buffer,
    /// without this connection's lock, and sends it as the transmit says.
    /// `None`: dropped and counted, or `path` is not the current UDP path.
    ///
    /// [`Client::reserve_tun_packet`]: crate::engine::Client::reserve_tun_packet
    pub fn reserve_tun_packet(
        &mut self,
        now: Instant,
        path: PathId,
        packet: &[u8],
        room: usize,
    ) -> Option<(Reserved, Transmit)> {
        let c = &mut self.paths[path];
        if path != self.current || !matches!(c.carrier, Carrier::Udp { .. }) {
            return None;
        }
        let reserved = self.engine.reserve_tun_packet(now, packet, room).ok()?;
        c.sent(now);
        let t = Transmit {
            path,
            to: c.carrier.destination(),
            len: packet.len() + DATA_OVERHEAD,
        };
        Some((reserved, t))
    }

    /// Bytes that arrived on `path`'s socket from `from`: a UDP datagram,
    /// an ICMP message, a DNS response, an HTTP body. Inner packets go to
    /// `tun`; anything not authenticated is dropped and counted.
    pub fn handle_input(
        &mut self,
        now: Instant,
        path: PathId,
        from: Remote,
        bytes: &[u8],
        tun: &mut impl TunSink,
    ) {
        match &mut self.paths[path].carrier {
            Carrier::Udp { .. } => {
                self.open(now, path, bytes, None, tun);
            }
            Carrier::Icmp(c) => {
                let Remote::Addr(from) = from else { return };
                let Some(reply) = c.unwrap(from.ip(), bytes) else {
                    return;
                };
                let opened = self.open(now, path, reply.message, Some(reply.asked), tun);
                // An answer without a session (the server lost it) still
                // answers a request; forged or stale ones do not.
                if (opened.is_some() || reply.message.is_empty())
                    && let Carrier::Icmp(c) = &mut self.paths[path].carrier
                {
                    c.replied(now, reply.meta, opened.is_some(), opened == Some(true));
                }
            }
            Carrier::Dns(c) => {
                let Remote::Resolver(from) = from else { return };
                if c.handle_response(now, from, bytes).is_err() {
                    return;
                }
                while let Some(msg) = self.dns(path).and_then(|c| c.poll_message()) {
                    self.open(now, path, &msg, None, tun);
                }
                let failing = self
                    .dns(path)
                    .is_some_and(|c| c.failures_in_row() >= DNS_FAILURES);
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
                self.queued.push_back((path, reply.to_vec(), false));
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
                        self.queued
                            .push_back((path, self.scratch[..n].to_vec(), false));
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
            .push_back((path, self.scratch[h..h + n].to_vec(), true));
        true
    }

    /// The next datagram to send: copies of the handshake, keepalives,
    /// probes, polls, DNS queries, framed into `buf`.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        buf.resize(BUF_LEN, 0);
        loop {
            // What goes, whether it waits for an answer (bare polls are
            // answered when the server has something, or at its hold), and
            // whether the server answers it at once (probes, inits).
            let (path, len, waits, prompt) =
                if let Some((path, msg, prompt)) = self.queued.pop_front() {
                    // Keepalives (a handshake's confirmation, a move's) and probes.
                    let waits = self.paths[path].carrier.answers_at_once();
                    (path, self.stage(path, &msg, buf), waits, prompt)
                } else if let Some((path, len)) = self.engine_timers(now, buf) {
                    // An init waits for its response; a keepalive waits only
                    // where the server echoes it at once.
                    let init = buf[self.paths[path].carrier.headroom()] == TYPE_INIT;
                    let waits = init || self.paths[path].carrier.answers_at_once();
                    (path, Some(len), waits, init)
                } else if let Some(path) = self.due_probe(now) {
                    (path, self.probe(now, path, buf), false, true)
                } else if let Some(path) = self.due_nudge(now) {
                    (path, self.nudge_probe(now, path, buf), false, true)
                } else if let Some(t) = self.poll_paced(now, buf) {
                    return Some(t);
                } else if let Some(path) = self.due_poll(now) {
                    (path, self.keepalive(now, path, buf), false, false)
                } else {
                    return self.poll_queries(now, buf);
                };
            let Some(len) = len else { continue };
            let c = &mut self.paths[path];
            if waits && path == self.current {
                c.sent(now);
            }
            let Some(len) = c.carrier.frame(now, buf, len, prompt) else {
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

    /// A path that wants a keepalive now: a bare poll on a polled path in
    /// use, or a nudge on a push path whose traffic goes unanswered.
    fn due_poll(&mut self, now: Instant) -> Option<PathId> {
        let path = self.current;
        let connected = self.engine.is_connected(now);
        let polling = self.polling(now);
        let c = &mut self.paths[path];
        c.carrier.set_polling(polling);
        if let Carrier::Icmp(icmp) = &mut c.carrier {
            // Always let the client give up on lost requests, or its
            // deadline stays in the past and the loop spins.
            if icmp.polls_due(now) > 0 && connected {
                return Some(path);
            }
        }
        None
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

    /// An inner packet that waited for its path's pacing (ICMP) and may go now.
    fn poll_paced(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        for (path, c) in self.paths.iter_mut().enumerate() {
            if let Some(len) = c.carrier.poll_paced(now, buf) {
                return Some(Transmit {
                    path,
                    to: c.carrier.destination(),
                    len,
                });
            }
        }
        None
    }

    /// The next DNS query of any DNS path.
    fn poll_queries(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        let key = self.engine.poll_key(now);
        for (path, c) in self.paths.iter_mut().enumerate() {
            if let Carrier::Dns(d) = &mut c.carrier {
                d.set_poll_key(key);
            }
            if let Some((to, len)) = c.carrier.poll_query(now, buf) {
                if path == self.current {
                    c.sent(now);
                }
                return Some(Transmit { path, to, len });
            }
        }
        None
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
}

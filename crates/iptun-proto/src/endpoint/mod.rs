//! The server's endpoint: the session engine ([`Server`]) and the state of
//! every listener's transport, on any mix of UDP, ICMP echo, DNS and HTTP.
//!
//! It has the shape of quinn-proto's endpoint: feed it what arrives
//! ([`Endpoint::handle_input`] for a listener's datagrams, echoes, queries
//! and bodies; [`Endpoint::handle_tun_packet`] for packets from the TUN
//! device) with the current time, send what [`Endpoint::poll_transmit`]
//! gives, and call [`Endpoint::handle_timeout`] when
//! [`Endpoint::poll_timeout`] passes. The driver owns the sockets, the HTTP
//! connections and the TUN device, and nothing else.
//!
//! What it decides, per transport:
//! - which session a message belongs to (by its receiver index, never by
//!   addresses: NATs rewrite those and resolvers send from pools);
//! - on polled paths (ICMP echo, DNS), which held request carries what: a
//!   handshake response or a probe's reply answers the very request that
//!   carried the init or probe, downstream data the session's oldest held
//!   request, an expired hold a keepalive; each request is answered at
//!   most once;
//! - when a session moves to another path (the client roamed, or moved to
//!   another transport), what it held on the old one is released: parked
//!   echo requests are let go, held DNS queries and long polls answered
//!   empty, queued downstream dropped;
//! - when the admitted keys change ([`Endpoint::set_allowed`]), the same
//!   for the sessions of removed keys.
//!
//! It also counts, per listener, the inner traffic it carried, the
//! handshakes it saw and the messages it dropped ([`Endpoint::listeners`]).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use crate::DropCounters;
use crate::crypto::{PollCheck, PollCounter, PollGuard, PollKind, PublicKey, Reserved};
use crate::engine::{
    AllowedChange, HandshakeCounters, InitOutcome, PathKind, Server, ServerConfig, ServerOutput,
    SessionId, SessionInfo, Traffic,
};
use crate::transport::dns::UpHeader;
use crate::transport::dns::server::{self as dns_server, DnsListener};
use crate::transport::http::{self, LEN_PREFIX, Mailboxes, messages};
use crate::transport::icmp::{self, Arrived, IcmpListener, Incoming};
use crate::transport::{Kind, TunSink};
use crate::wire::Message;
use crate::wire::dns::Domain;
use crate::wire::icmp::{ECHO_HEADER_LEN, Family};
use crate::wire::message::DATA_OVERHEAD;

/// A listener: its index in the list the endpoint was made with.
pub type ListenerId = usize;

/// Room for any message and its framing.
pub const BUF_LEN: usize = 1 << 16;
/// The longest reply the engine makes to a message (a probe's, padded to
/// at most the MTU), sealed into the TUN buffer the message was opened in.
const MAX_REPLY: usize = 2048;

/// A UDP peer, and the local address it reached us at. Replies leave from
/// that address: on a host with several, the kernel would pick one by
/// route, and NATs, firewalls and resolvers drop answers from an address
/// the peer never talked to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UdpAddr {
    /// The peer's address.
    pub addr: SocketAddr,
    /// Our address it sent to (`None`: whatever the kernel picks).
    pub local: Option<IpAddr>,
}

impl From<SocketAddr> for UdpAddr {
    fn from(addr: SocketAddr) -> Self {
        Self { addr, local: None }
    }
}

/// A transport a listener speaks.
#[derive(Clone, Debug)]
pub enum ListenerConfig {
    /// UDP datagrams.
    Udp,
    /// ICMP echo of one family.
    Icmp(Family),
    /// DNS, as the authoritative server of a domain.
    Dns(Domain),
    /// HTTP(S): WebSocket and long-poll.
    Http,
}

/// The server's way back to a client: the engine's path type. A session's
/// path is where its latest (newest) authenticated message came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// A UDP peer of listener `listener`.
    Udp {
        /// The listener.
        listener: ListenerId,
        /// The client's address and ours.
        peer: UdpAddr,
    },
    /// Echo requests from `ip` on listener `listener`: replies can only
    /// answer the session's held requests, so the session is part of it.
    Icmp {
        /// The listener.
        listener: ListenerId,
        /// The client's (public) address.
        ip: IpAddr,
        /// The session its requests carry.
        session: Option<SessionId>,
    },
    /// The DNS client with `tag`: answers ride on the tag's held queries,
    /// whichever resolver sent them.
    Dns {
        /// The listener.
        listener: ListenerId,
        /// The client's tag.
        tag: u32,
    },
    /// WebSocket connection `conn`.
    Ws {
        /// The listener.
        listener: ListenerId,
        /// The driver's connection id.
        conn: u64,
    },
    /// Long-poll client `tag`: downstream waits in its mailbox.
    Poll {
        /// The listener.
        listener: ListenerId,
        /// The client's tag.
        tag: u64,
    },
}

impl PathKind for Path {
    fn is_polled(&self) -> bool {
        matches!(self, Self::Icmp { .. } | Self::Dns { .. })
    }

    /// UDP and ICMP paths carry the client's own address (or its NAT's):
    /// a cookie sent there reaches only whoever receives there. A DNS
    /// query's address is a resolver's, which any client (and any flooder)
    /// can send through, so a cookie bound to it proves nothing; HTTP's is
    /// a TCP peer, which can't be spoofed in the first place, but may be a
    /// proxy shared by many, and the endpoint does not learn it. Those
    /// share a part of the handshake budget instead (`engine/gate.rs`).
    fn source(&self) -> Option<SocketAddr> {
        match *self {
            Self::Udp { peer, .. } => Some(peer.addr),
            Self::Icmp { ip, .. } => Some(SocketAddr::new(ip, 0)),
            Self::Dns { .. } | Self::Ws { .. } | Self::Poll { .. } => None,
        }
    }
}

impl Path {
    /// The transport.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Udp { .. } => Kind::Udp,
            Self::Icmp { .. } => Kind::Icmp,
            Self::Dns { .. } => Kind::Dns,
            Self::Ws { .. } | Self::Poll { .. } => Kind::Http,
        }
    }

    /// The listener it came through.
    pub fn listener(&self) -> ListenerId {
        match *self {
            Self::Udp { listener, .. }
            | Self::Icmp { listener, .. }
            | Self::Dns { listener, .. }
            | Self::Ws { listener, .. }
            | Self::Poll { listener, .. } => listener,
        }
    }

    /// The client's end, for status.
    pub fn describe(&self) -> String {
        match self {
            Self::Udp { peer, .. } => peer.addr.to_string(),
            Self::Icmp { ip, .. } => ip.to_string(),
            Self::Dns { tag, .. } => format!("tag {tag:08x}"),
            Self::Ws { conn, .. } => format!("websocket {conn}"),
            Self::Poll { tag, .. } => format!("long-poll {tag:016x}"),
        }
    }
}

/// What arrived on a listener.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// A UDP datagram (on a UDP or DNS listener).
    Datagram {
        /// The sender and our address it reached.
        from: UdpAddr,
        /// The datagram.
        bytes: &'a [u8],
    },
    /// An ICMP message (without IP header).
    Icmp {
        /// The sender.
        from: IpAddr,
        /// Our address it was sent to; `None` for broadcast and multicast.
        to: Option<IpAddr>,
        /// The ICMP message.
        bytes: &'a [u8],
    },
    /// A WebSocket message's body (framed tunnel messages).
    WebSocket {
        /// The driver's connection id.
        conn: u64,
        /// The body.
        body: &'a [u8],
    },
    /// A long-poll request: its body is framed tunnel messages (or none),
    /// its response is owed ([`Destination::PollAnswer`]).
    Poll {
        /// The client's tag.
        tag: u64,
        /// The driver's handle to the response.
        request: u64,
        /// The body.
        body: &'a [u8],
        /// The request's poll counter and authenticator (`p=`), if any.
        auth: Option<http::PollAuth>,
    },
}

/// Where a transmit goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// A UDP peer (UDP and DNS listeners).
    Udp(UdpAddr),
    /// An echo reply to `to`, from our address `from`.
    Icmp {
        /// The client.
        to: IpAddr,
        /// Our address the request was sent to.
        from: IpAddr,
    },
    /// A framed message for WebSocket connection `conn` (the driver batches).
    WebSocket(u64),
    /// The whole body answering long-poll request `request`.
    PollAnswer(u64),
}

/// Something to send: the first `len` bytes of the buffer given, on
/// listener `listener`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// The listener whose socket (or connection) sends it.
    pub listener: ListenerId,
    /// Where.
    pub to: Destination,
    /// Its length.
    pub len: usize,
}

/// What [`Endpoint::reserve_tun_packet`] made of a packet.
pub enum Reservation {
    /// Its place in its session is taken: seal it with [`Reserved::seal`]
    /// and send it to this peer on the UDP listener asked about.
    Udp(Reserved, UdpAddr),
    /// Dropped, and counted.
    Dropped,
    /// Its session is on another listener, or has no path yet: give it to
    /// [`Endpoint::handle_tun_packet`].
    Elsewhere,
}

/// One listener's numbers, for status and metrics.
#[derive(Clone, Debug)]
pub struct ListenerStatus {
    /// Its transport.
    pub kind: Kind,
    /// Sessions whose path is on it now.
    pub sessions: usize,
    /// Inner packets that came in on it (opened) and went out on it (sealed);
    /// keepalives and probes not counted.
    pub traffic: Traffic,
    /// What became of the inits that came in on it.
    pub handshakes: HandshakeCounters,
    /// Tunnel messages that came in on it and were dropped, by reason.
    pub drops: DropCounters,
    /// The transport's own drops, by name (zero counts included).
    pub transport_drops: Vec<(&'static str, u64)>,
    /// A DNS listener's counters.
    pub dns: Option<dns_server::ListenerStats>,
}

/// What the endpoint counts per listener.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    traffic: Traffic,
    handshakes: HandshakeCounters,
    drops: DropCounters,
    http_malformed: u64,
    /// Long-poll requests of a bound tag without a good authenticator.
    http_forged: u64,
    /// Authentic long-poll requests whose counter was taken before.
    http_replayed: u64,
}

enum Listener {
    Udp,
    Icmp(IcmpListener),
    Dns(Box<DnsListener<SessionId, UdpAddr>>),
    Http(Mailboxes<u64>),
}

/// What became of one tunnel message.
enum Handled {
    /// Answer the request that carried it with the `len` bytes in `reply`.
    Reply(usize),
    /// Opened (delivered, forwarded, or a keepalive).
    Done,
    /// Not authenticated, or dropped: no answer at all.
    Dropped,
}

/// The poll keys of the engine's sessions, for the DNS listener's checks.
struct EngineKeys<'a> {
    engine: &'a Server<Path>,
    now: Instant,
}

impl dns_server::PollKeys<SessionId> for EngineKeys<'_> {
    fn check(
        &self,
        session: SessionId,
        guard: &mut PollGuard,
        header: &UpHeader,
    ) -> Option<PollCheck> {
        let keys = self.engine.poll_keys(self.now, session);
        keys.clone().next()?;
        Some(guard.check(
            keys,
            PollKind::Dns,
            u64::from(header.tag),
            PollCounter::Low16(header.qseq),
            &header.signed(),
            &header.auth,
        ))
    }
}

/// The server's endpoint: see the module docs.
pub struct Endpoint {
    engine: Server<Path>,
    listeners: Vec<Listener>,
    /// Transmits made while handling input or timers.
    queued: VecDeque<(ListenerId, Destination, Vec<u8>)>,
    /// Buffers of sent transmits, for reuse.
    spare: Vec<Vec<u8>>,
    /// Where the engine's replies are copied.
    reply: Box<[u8]>,
    /// Where opened packets go when the TUN batch is full, and where a DNS
    /// message is copied out of its listener.
    scratch: Box<[u8]>,
    tun_full: u64,
    /// Per listener.
    counters: Vec<Counters>,
    /// Packets from the TUN device that could not be sent, by reason.
    tun_drops: DropCounters,
    /// Long-poll tags that are a session's path, with the replay windows
    /// of their requests' poll counters.
    poll_bound: HashMap<(ListenerId, u64), (SessionId, PollGuard)>,
}

impl Endpoint {
    /// An endpoint with `listeners` (in the order the driver indexes them).
    pub fn new(config: ServerConfig, listeners: Vec<ListenerConfig>, now: Instant) -> Self {
        let counters = vec![Counters::default(); listeners.len()];
        Self {
            engine: Server::new(config, now),
            listeners: listeners
                .into_iter()
                .map(|l| match l {
                    ListenerConfig::Udp => Listener::Udp,
                    ListenerConfig::Icmp(f) => Listener::Icmp(IcmpListener::new(f)),
                    ListenerConfig::Dns(d) => Listener::Dns(Box::new(DnsListener::new(d))),
                    ListenerConfig::Http => Listener::Http(Mailboxes::new()),
                })
                .collect(),
            queued: VecDeque::new(),
            spare: Vec::new(),
            reply: vec![0; BUF_LEN].into_boxed_slice(),
            scratch: vec![0; BUF_LEN].into_boxed_slice(),
            tun_full: 0,
            counters,
            tun_drops: DropCounters::default(),
            poll_bound: HashMap::new(),
        }
    }

    /// The session engine (addresses, pool, MTU).
    pub fn engine(&self) -> &Server<Path> {
        &self.engine
    }

    /// The driver found more input waiting than it takes in one go: see
    /// [`Server::note_backlog`].
    pub fn note_backlog(&mut self, now: Instant) {
        self.engine.note_backlog(now);
    }

    /// Every client that completed a handshake.
    pub fn sessions(&self) -> Vec<SessionInfo<Path>> {
        self.engine.sessions()
    }

    /// Drops not attributed to a client, and every client's (those of
    /// removed keys too: the total never goes down).
    pub fn drops(&self) -> DropCounters {
        self.engine.total_drops()
    }

    /// Requests held by listener `listener` for their clients' downstream:
    /// echo requests, DNS queries, long polls (none on UDP and WebSocket).
    pub fn held(&self, listener: ListenerId) -> usize {
        match &self.listeners[listener] {
            Listener::Udp => 0,
            Listener::Icmp(l) => l.held(),
            Listener::Dns(d) => d.held(),
            Listener::Http(m) => m.held(),
        }
    }

    /// The transports' own counters of what they dropped.
    pub fn transport_drops(&self) -> Vec<(&'static str, u64)> {
        let mut out = vec![("tun_full", self.tun_full)];
        for listener in 0..self.listeners.len() {
            for (name, n) in self.listener_drops(listener) {
                match out.iter_mut().find(|(m, _)| *m == name) {
                    Some((_, total)) => *total += n,
                    None => out.push((name, n)),
                }
            }
        }
        out.retain(|&(_, n)| n > 0);
        out
    }

    /// Packets from the TUN device the endpoint could not send, by reason,
    /// and the opened packets it could not write to the TUN device (its
    /// batch was full).
    pub fn tun_drops(&self) -> (DropCounters, u64) {
        (self.tun_drops, self.tun_full)
    }

    /// Every listener's numbers, in the order the endpoint was made with.
    pub fn listeners(&self) -> Vec<ListenerStatus> {
        let sessions = self.engine.sessions();
        (0..self.listeners.len())
            .map(|i| {
                let c = &self.counters[i];
                let l = &self.listeners[i];
                ListenerStatus {
                    kind: match l {
                        Listener::Udp => Kind::Udp,
                        Listener::Icmp(_) => Kind::Icmp,
                        Listener::Dns(_) => Kind::Dns,
                        Listener::Http(_) => Kind::Http,
                    },
                    sessions: sessions
                        .iter()
                        .filter(|s| s.path.is_some_and(|p| p.listener() == i))
                        .count(),
                    traffic: c.traffic,
                    handshakes: c.handshakes,
                    drops: c.drops,
                    transport_drops: self.listener_drops(i),
                    dns: match l {
                        Listener::Dns(d) => Some(d.stats()),
                        _ => None,
                    },
                }
            })
            .collect()
    }

    /// What listener `i`'s transport dropped, by name.
    fn listener_drops(&self, i: ListenerId) -> Vec<(&'static str, u64)> {
        match &self.listeners[i] {
            Listener::Udp => Vec::new(),
            Listener::Icmp(l) => vec![("icmp_queue_full", l.dropped())],
            Listener::Dns(d) => {
                let s = d.stats();
                vec![
                    ("dns_malformed", s.malformed),
                    ("dns_refused", s.refused),
                    ("dns_queue_full", s.queue_full),
                    ("dns_oversize", s.oversize),
                    ("dns_evicted_tags", s.evicted_tags),
                    ("dns_forged_polls", s.forged),
                    ("dns_replayed_polls", s.replayed),
                ]
            }
            Listener::Http(m) => vec![
                ("http_malformed", self.counters[i].http_malformed),
                ("http_mailbox_dropped", m.dropped),
                ("http_forged_polls", self.counters[i].http_forged),
                ("http_replayed_polls", self.counters[i].http_replayed),
            ],
        }
    }

    /// Admit exactly `keys` from now on (see [`Server::set_allowed`]): the
    /// sessions of removed keys end, and what their transports held for
    /// them is released (held requests let go or answered empty, queued
    /// downstream dropped).
    pub fn set_allowed(
        &mut self,
        now: Instant,
        keys: impl IntoIterator<Item = PublicKey>,
    ) -> AllowedChange {
        let change = self.engine.set_allowed(now, keys);
        while let Some((session, old)) = self.engine.poll_path_change() {
            self.release(now, session, old);
        }
        change
    }

    /// A packet from the TUN device whose session is on UDP listener
    /// `listener`, reserved only: the caller seals it ([`Reserved::seal`])
    /// into at most `room` bytes without this endpoint's lock, so that
    /// loops sharing the endpoint encrypt in parallel.
    pub fn reserve_tun_packet(
        &mut self,
        now: Instant,
        listener: ListenerId,
        packet: &[u8],
        room: usize,
    ) -> Reservation {
        let on_listener =
            |path: &Path| matches!(path, Path::Udp { listener: l, .. } if *l == listener);
        match self
            .engine
            .reserve_tun_packet(now, packet, room, on_listener)
        {
            Ok(Some((Path::Udp { peer, .. }, reserved))) => {
                self.counters[listener].traffic.tx(packet.len());
                Reservation::Udp(reserved, peer)
            }
            // Another listener's, or no path yet (`on_listener` holds
            // only for this UDP listener).
            Ok(_) => Reservation::Elsewhere,
            Err(reason) => {
                self.tun_drops.add(reason);
                Reservation::Dropped
            }
        }
    }

    /// A packet from the TUN device, for the client that owns its
    /// destination: sealed into `buf` (the send buffer of the first UDP
    /// listener's driver, say: zero copies there) when it can go at once,
    /// else queued by its transport for the client's next request.
    pub fn handle_tun_packet(
        &mut self,
        now: Instant,
        packet: &[u8],
        buf: &mut [u8],
    ) -> Option<Transmit> {
        let path = match self.engine.route(packet) {
            // Not an IP packet, no owner, an owner without a path, or one
            // whose handshake came by ICMP with nothing since (no request
            // to answer, no confirmed keys): the engine refuses it too,
            // and counts why.
            None | Some(Path::Icmp { session: None, .. }) => {
                if let Err(reason) = self.engine.handle_tun_packet(now, packet, buf) {
                    self.tun_drops.add(reason);
                }
                return None;
            }
            Some(&path) => path,
        };
        let headroom = match path {
            Path::Icmp { .. } => icmp::REPLY_HEADROOM,
            Path::Ws { .. } => LEN_PREFIX,
            _ => 0,
        };
        let n = match self
            .engine
            .handle_tun_packet(now, packet, buf.get_mut(headroom..)?)
        {
            Ok(ServerOutput::Send(_, msg)) => msg.len(),
            Ok(_) => return None,
            Err(reason) => {
                self.tun_drops.add(reason);
                return None;
            }
        };
        self.counters[path.listener()].traffic.tx(packet.len());
        match path {
            Path::Udp { listener, peer } => Some(Transmit {
                listener,
                to: Destination::Udp(peer),
                len: n,
            }),
            Path::Ws { listener, conn } => {
                buf[..LEN_PREFIX].copy_from_slice(&(n as u16).to_be_bytes());
                Some(Transmit {
                    listener,
                    to: Destination::WebSocket(conn),
                    len: LEN_PREFIX + n,
                })
            }
            Path::Icmp {
                listener,
                session: Some(s),
                ..
            } => {
                let Listener::Icmp(l) = &mut self.listeners[listener] else {
                    return None;
                };
                let Some(arrived) = l.take_parked(now, s) else {
                    l.queue(s, &buf[headroom..headroom + n]);
                    return None;
                };
                let len = l.frame_reply(now, arrived, buf, n);
                Some(Transmit {
                    listener,
                    to: Destination::Icmp {
                        to: arrived.request.ip,
                        from: arrived.request.local,
                    },
                    len,
                })
            }
            _ => {
                self.send_on(now, path, &buf[..n]);
                None
            }
        }
    }

    /// What arrived on `listener`. Inner packets go to `tun`; answers come
    /// out of [`Endpoint::poll_transmit`].
    pub fn handle_input(
        &mut self,
        now: Instant,
        listener: ListenerId,
        input: Input<'_>,
        tun: &mut impl TunSink,
    ) {
        match (&mut self.listeners[listener], input) {
            (Listener::Udp, Input::Datagram { from, bytes }) => {
                let path = Path::Udp {
                    listener,
                    peer: from,
                };
                if let Handled::Reply(n) = self.handle_message(now, path, bytes, tun) {
                    self.queue(listener, Destination::Udp(from), 0, n);
                }
            }
            (Listener::Dns(d), Input::Datagram { from, bytes }) => {
                let keys = EngineKeys {
                    engine: &self.engine,
                    now,
                };
                let Some(delivered) = d.handle_query(now, from, bytes, &keys) else {
                    return;
                };
                let (tag, len) = (delivered.tag, delivered.message.len());
                self.scratch[..len].copy_from_slice(delivered.message);
                self.dns_message(now, listener, tag, len, tun);
            }
            (Listener::Icmp(l), Input::Icmp { from, to, bytes }) => {
                match l.classify(from, to, bytes) {
                    Some(Incoming::Tunnel(request, msg)) => {
                        self.icmp_request(now, listener, request, msg, tun);
                    }
                    Some(Incoming::Ping(request, payload)) => {
                        // An ordinary ping: answered as the kernel would.
                        let start = ECHO_HEADER_LEN;
                        self.reply[start..start + payload.len()].copy_from_slice(payload);
                        let n = l.frame_ping(request, &mut self.reply, payload.len());
                        let to = Destination::Icmp {
                            to: request.ip,
                            from: request.local,
                        };
                        self.queue(listener, to, 0, n);
                    }
                    None => {}
                }
            }
            (Listener::Http(_), Input::WebSocket { conn, body }) => {
                let path = Path::Ws { listener, conn };
                let mut msgs = messages(body);
                for msg in msgs.by_ref() {
                    if let Handled::Reply(n) = self.handle_message(now, path, msg, tun) {
                        self.reply.copy_within(..n, LEN_PREFIX);
                        self.reply[..LEN_PREFIX].copy_from_slice(&(n as u16).to_be_bytes());
                        self.queue(listener, Destination::WebSocket(conn), 0, LEN_PREFIX + n);
                    }
                }
                self.counters[listener].http_malformed += u64::from(msgs.malformed());
            }
            (
                Listener::Http(m),
                Input::Poll {
                    tag,
                    request,
                    body,
                    auth,
                },
            ) => {
                m.open(now, tag);
                let verdict = self.check_poll(now, listener, tag, auth);
                let path = Path::Poll { listener, tag };
                let mut msgs = messages(body);
                for msg in msgs.by_ref() {
                    let session = self.engine.session_of(msg);
                    if let Handled::Reply(n) = self.handle_message(now, path, msg, tun)
                        && let Listener::Http(m) = &mut self.listeners[listener]
                    {
                        m.send(tag, &self.reply[..n]);
                    }
                    // The tag is the session's path now: bind its polls.
                    if let Some(s) = session
                        && self.engine.path_of(s) == Some(&path)
                        && self
                            .poll_bound
                            .get(&(listener, tag))
                            .is_none_or(|b| b.0 != s)
                    {
                        self.poll_bound
                            .insert((listener, tag), (s, PollGuard::new()));
                    }
                }
                self.counters[listener].http_malformed += u64::from(msgs.malformed());
                let answers = match verdict {
                    // Not the client's, or a request seen before: its
                    // messages were handled (they authenticate on their
                    // own), but it takes nothing of the downstream.
                    Some(PollCheck::Forged | PollCheck::Repeat(_)) => {
                        let c = &mut self.counters[listener];
                        if verdict == Some(PollCheck::Forged) {
                            c.http_forged += 1;
                        } else {
                            c.http_replayed += 1;
                        }
                        vec![http::Answer {
                            request,
                            body: Vec::new(),
                        }]
                    }
                    Some(PollCheck::Fresh(_)) | None => {
                        self.mailboxes(listener)
                            .request(now, tag, request, !body.is_empty())
                    }
                };
                self.queue_answers(listener, answers);
            }
            _ => debug_assert!(false, "input of another transport on listener {listener}"),
        }
    }

    /// Check a long-poll request of `tag` whose tag is a session's path:
    /// `None` if it is not (or the session has no live keys: nothing to
    /// send it either).
    fn check_poll(
        &mut self,
        now: Instant,
        listener: ListenerId,
        tag: u64,
        auth: Option<http::PollAuth>,
    ) -> Option<PollCheck> {
        let (session, guard) = self.poll_bound.get_mut(&(listener, tag))?;
        let keys = self.engine.poll_keys(now, *session);
        keys.clone().next()?;
        let Some(a) = auth else {
            return Some(PollCheck::Forged);
        };
        Some(guard.check(
            keys,
            PollKind::Http,
            tag,
            PollCounter::Full(a.counter),
            &[],
            &a.auth,
        ))
    }

    fn mailboxes(&mut self, listener: ListenerId) -> &mut Mailboxes<u64> {
        match &mut self.listeners[listener] {
            Listener::Http(m) => m,
            _ => unreachable!("an HTTP listener"),
        }
    }

    fn queue_answers(&mut self, listener: ListenerId, answers: Vec<http::Answer<u64>>) {
        for a in answers {
            self.queued
                .push_back((listener, Destination::PollAnswer(a.request), a.body));
        }
    }

    /// Open one tunnel message that came by `from`, deliver or forward what
    /// it carries, and release what the session held on a path it left.
    fn handle_message(
        &mut self,
        now: Instant,
        from: Path,
        msg: &[u8],
        tun: &mut impl TunSink,
    ) -> Handled {
        let Self {
            engine,
            scratch,
            reply,
            ..
        } = self;
        // Room for a reply padded beyond the message (a probe's) too.
        let (out, spilled) = match tun.buffer(msg.len().max(MAX_REPLY)) {
            Some(b) => (b, false),
            None => (&mut scratch[..], true),
        };
        let init = matches!(Message::parse(msg), Ok(Message::Init { .. }));
        let counters = &mut self.counters[from.listener()];
        let result = engine.handle_datagram(now, &from, msg, out);
        if init {
            counters.handshakes.count(match &result {
                Ok(ServerOutput::Reply(r)) => Ok(InitOutcome::of(r)),
                Ok(_) => Ok(InitOutcome::Answered),
                Err(e) => Err(*e),
            });
        }
        let handled = match result {
            Ok(ServerOutput::Tun(packet)) => {
                let n = packet.len();
                counters.traffic.rx(n);
                if spilled {
                    self.tun_full += 1;
                } else {
                    tun.commit(n);
                }
                Handled::Done
            }
            Ok(ServerOutput::Reply(r)) => {
                reply[..r.len()].copy_from_slice(r);
                Handled::Reply(r.len())
            }
            Ok(ServerOutput::Send(path, m)) => {
                // Client to client: re-sealed by the engine. Copied into a
                // spare buffer, not kept in `reply`: send_on frames an echo
                // reply there (and found it taken: a panic).
                let n = m.len();
                counters.traffic.rx(n - DATA_OVERHEAD);
                self.counters[path.listener()].traffic.tx(n - DATA_OVERHEAD);
                reply[..n].copy_from_slice(m);
                let mut sealed = self.buffer();
                sealed.extend_from_slice(&self.reply[..n]);
                self.send_on(now, path, &sealed);
                self.spare.push(sealed);
                Handled::Done
            }
            Ok(ServerOutput::Nothing) => Handled::Done,
            Err(reason) => {
                counters.drops.add(reason);
                Handled::Dropped
            }
        };
        while let Some((session, old)) = self.engine.poll_path_change() {
            self.release(now, session, old);
        }
        handled
    }

    /// A downstream message on `path`, by whatever means the path's
    /// transport has: at once, on a held request, or queued for the next.
    fn send_on(&mut self, now: Instant, path: Path, msg: &[u8]) {
        match path {
            Path::Udp { listener, peer } => {
                let mut b = self.buffer();
                b.extend_from_slice(msg);
                self.queued.push_back((listener, Destination::Udp(peer), b));
            }
            Path::Ws { listener, conn } => {
                let mut b = self.buffer();
                b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
                b.extend_from_slice(msg);
                self.queued
                    .push_back((listener, Destination::WebSocket(conn), b));
            }
            Path::Icmp {
                listener,
                session: Some(s),
                ..
            } => {
                let Listener::Icmp(l) = &mut self.listeners[listener] else {
                    return;
                };
                match l.take_parked(now, s) {
                    Some(arrived) => {
                        let start = icmp::REPLY_HEADROOM;
                        self.reply[start..start + msg.len()].copy_from_slice(msg);
                        self.answer_echo(now, listener, arrived, msg.len());
                    }
                    None => l.queue(s, msg),
                }
            }
            // No request to answer yet: the client's next one fetches it.
            Path::Icmp { session: None, .. } => {}
            Path::Dns { listener, tag } => {
                if let Listener::Dns(d) = &mut self.listeners[listener] {
                    let _ = d.send_to_tag(now, tag, msg);
                }
            }
            Path::Poll { listener, tag } => self.mailboxes(listener).send(tag, msg),
        }
    }

    /// Queue the echo reply to `arrived` around the `len`-byte tunnel
    /// message at `self.reply[REPLY_HEADROOM..]`.
    fn answer_echo(&mut self, now: Instant, listener: ListenerId, arrived: Arrived, len: usize) {
        let Listener::Icmp(l) = &self.listeners[listener] else {
            return;
        };
        let n = l.frame_reply(now, arrived, &mut self.reply, len);
        let to = Destination::Icmp {
            to: arrived.request.ip,
            from: arrived.request.local,
        };
        self.queue(listener, to, 0, n);
    }

    /// Queue a copy of `self.reply[at..at + len]`.
    fn queue(&mut self, listener: ListenerId, to: Destination, at: usize, len: usize) {
        let mut b = self.buffer();
        b.extend_from_slice(&self.reply[at..at + len]);
        self.queued.push_back((listener, to, b));
    }

    fn buffer(&mut self) -> Vec<u8> {
        let mut b = self.spare.pop().unwrap_or_default();
        b.clear();
        b
    }

    /// An echo request carrying a tunnel message: open it, count it among
    /// its session's, then hold it for the session's downstream.
    fn icmp_request(
        &mut self,
        now: Instant,
        listener: ListenerId,
        request: icmp::Request,
        msg: &[u8],
        tun: &mut impl TunSink,
    ) {
        let session = self.engine.session_of(msg);
        let index = match Message::parse(msg) {
            Ok(Message::Data { receiver, .. }) => receiver,
            _ => 0,
        };
        let from = Path::Icmp {
            listener,
            ip: request.ip,
            session,
        };
        let handled = self.handle_message(now, from, msg, tun);
        let Listener::Icmp(l) = &mut self.listeners[listener] else {
            return;
        };
        let arrived = match (&handled, session) {
            // Unauthenticated: no answer at all, and not counted.
            (Handled::Dropped, _) => return,
            (_, Some(s)) => l.count(now, s, request),
            // An init: no session counts it (nor does the client).
            (_, None) => Arrived::uncounted(request, now),
        };
        if let Handled::Reply(n) = handled {
            // A handshake response or a probe's reply answers the very
            // request that carried the init or probe.
            self.reply.copy_within(..n, icmp::REPLY_HEADROOM);
            self.answer_echo(now, listener, arrived, n);
            return;
        }
        let Some(session) = session else { return };
        let mut stale = Vec::new();
        match l.park(now, session, index, arrived, &mut stale) {
            Some((arrived, Some(m))) => {
                let start = icmp::REPLY_HEADROOM;
                self.reply[start..start + m.len()].copy_from_slice(m);
                let len = m.len();
                self.answer_echo(now, listener, arrived, len);
            }
            // Let go to make room, but the session heard nothing for a while.
            Some((arrived, None)) => stale.push(arrived),
            None => {}
        }
        for arrived in stale {
            self.echo_keepalive(now, listener, session, arrived);
        }
    }

    /// Answer `arrived` with a keepalive of `session` (or, if the session
    /// is gone, with the bare magic: a request is always answered once).
    fn echo_keepalive(
        &mut self,
        now: Instant,
        listener: ListenerId,
        session: SessionId,
        arrived: Arrived,
    ) {
        let start = icmp::REPLY_HEADROOM;
        let n = self
            .engine
            .seal_keepalive(now, session, &mut self.reply[start..])
            .unwrap_or(0);
        self.answer_echo(now, listener, arrived, n);
    }

    /// A complete upstream message (in `scratch`) from DNS client `tag`:
    /// open it, answer what it asks, and bind the tag to its session once
    /// the session's path is this tag.
    fn dns_message(
        &mut self,
        now: Instant,
        listener: ListenerId,
        tag: u32,
        len: usize,
        tun: &mut impl TunSink,
    ) {
        // Out of `scratch`, which handle_message spills packets into when
        // the TUN batch is full (it found it taken, and the engine refused
        // every message for want of room).
        let mut msg = self.buffer();
        msg.extend_from_slice(&self.scratch[..len]);
        let session = self.engine.session_of(&msg);
        let from = Path::Dns { listener, tag };
        let handled = self.handle_message(now, from, &msg, tun);
        self.spare.push(msg);
        let Listener::Dns(d) = &mut self.listeners[listener] else {
            return;
        };
        match handled {
            // The handshake response or probe reply goes to the tag that
            // asked (which a probe does not bind).
            Handled::Reply(n) => {
                let _ = d.send_to_tag(now, tag, &self.reply[..n]);
            }
            Handled::Dropped => return, // unauthenticated: the hold answers it empty
            Handled::Done => {}
        }
        if let Some(s) = session
            && self.engine.path_of(s) == Some(&from)
        {
            d.bind(now, tag, s);
        }
    }

    /// `session` left `old`: release what it held there.
    fn release(&mut self, now: Instant, session: SessionId, old: Path) {
        let new = self.engine.path_of(session).copied();
        let _ = now;
        match old {
            Path::Icmp { listener, .. } => {
                let same = matches!(new, Some(Path::Icmp { listener: l, .. }) if l == listener);
                if let (false, Listener::Icmp(l)) = (same, &mut self.listeners[listener]) {
                    l.release(session);
                }
            }
            Path::Dns { listener, .. } => {
                if let Listener::Dns(d) = &mut self.listeners[listener] {
                    d.unbind(session);
                }
            }
            Path::Poll { listener, tag } => {
                if self
                    .poll_bound
                    .get(&(listener, tag))
                    .is_some_and(|b| b.0 == session)
                {
                    self.poll_bound.remove(&(listener, tag));
                }
                let answers = self.mailboxes(listener).close(tag);
                self.queue_answers(listener, answers);
            }
            Path::Udp { .. } | Path::Ws { .. } => {}
        }
    }

    /// The next thing to send, into `buf` (a buffer the endpoint may swap
    /// for one of its own: no copy of bodies).
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
        let _ = now;
        if let Some((listener, to, mut bytes)) = self.queued.pop_front() {
            std::mem::swap(buf, &mut bytes);
            if self.spare.len() < 64 {
                self.spare.push(bytes);
            }
            return Some(Transmit {
                listener,
                to,
                len: buf.len(),
            });
        }
        for (listener, l) in self.listeners.iter_mut().enumerate() {
            match l {
                Listener::Dns(d) => {
                    if let Some(t) = d.poll_transmit() {
                        buf.clear();
                        buf.extend_from_slice(&t.bytes);
                        return Some(Transmit {
                            listener,
                            to: Destination::Udp(t.to),
                            len: buf.len(),
                        });
                    }
                }
                Listener::Http(m) => {
                    if let Some(a) = m.poll_answer() {
                        *buf = a.body;
                        return Some(Transmit {
                            listener,
                            to: Destination::PollAnswer(a.request),
                            len: buf.len(),
                        });
                    }
                }
                Listener::Udp | Listener::Icmp(_) => {}
            }
        }
        None
    }

    /// When [`Endpoint::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let listeners = self.listeners.iter().filter_map(|l| match l {
            Listener::Udp => None,
            Listener::Icmp(i) => i.next_timeout(),
            Listener::Dns(d) => d.next_timeout(),
            Listener::Http(m) => m.next_timeout(),
        });
        self.engine
            .poll_timeout()
            .into_iter()
            .chain(listeners)
            .min()
    }

    /// Time passed: keys expire, holds end (answered with keepalives or
    /// empty), idle tags are forgotten.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.engine.handle_timeout(now);
        for listener in 0..self.listeners.len() {
            match &mut self.listeners[listener] {
                Listener::Icmp(l) => {
                    let mut expired = Vec::new();
                    while let Some(x) = l.expired(now) {
                        expired.push(x);
                    }
                    for (session, request) in expired {
                        self.echo_keepalive(now, listener, session, request);
                    }
                }
                Listener::Dns(d) => {
                    if d.next_timeout().is_none_or(|t| t > now) {
                        continue;
                    }
                    let engine = &mut self.engine;
                    let mut ka = [0u8; 64];
                    d.handle_timeout(now, |s| {
                        let n = engine.seal_keepalive(now, s, &mut ka).ok()?;
                        Some(ka[..n].to_vec())
                    });
                }
                Listener::Http(m) => {
                    let answers = m.handle_timeout(now);
                    self.queue_answers(listener, answers);
                }
                Listener::Udp => {}
            }
        }
    }
}

//! The client's way to the server: one transport, behind one interface the
//! client loop drives — send (batched where the transport can), receive into
//! the engine and the TUN device, and keep a poll transport's requests
//! outstanding.

use std::net::{IpAddr, SocketAddr};
use std::task::{Context, Poll};
use std::time::Instant;

use anyhow::Context as _;
use iptun_proto::dns::client::DnsUplink;
use iptun_proto::engine::{Client, ClientOutput};
use iptun_proto::poll::{Cadence, Pacer};
use iptun_proto::wire::dns::Domain;
use iptun_proto::wire::icmp::{self, Echo, Family, MAGIC, OVERHEAD};
use iptun_proto::wire::message::DATA_OVERHEAD;

use super::http::{HttpOptions, HttpPath};
use crate::daemon::MAX_BATCHES_PER_WAKEUP;
use crate::transport::icmp::{IcmpSocket, Role};
use crate::transport::udp::{self, UdpReceiver, UdpSender};
use crate::tun::Tun;
use crate::url::ServerAddr;

/// The transport to the server.
pub(super) enum Uplink {
    Udp {
        rx: UdpReceiver,
        tx: UdpSender,
        to: SocketAddr,
    },
    Icmp(IcmpUplink),
    Dns(Box<DnsPath>),
    Http(Box<HttpPath>),
}

/// Timeouts in a row, without an answer, after which the next resolver
/// (if several are given) takes over.
const RESOLVER_SWITCH_TIMEOUTS: u64 = 4;

/// The DNS transport: queries to a recursive resolver (or the server
/// itself), driven by the sans-IO [`DnsUplink`].
pub(super) struct DnsPath {
    socket: tokio::net::UdpSocket,
    /// Whether `socket` is dual-stack IPv6 (IPv4 resolvers mapped).
    dual_stack: bool,
    resolvers: Vec<SocketAddr>,
    active: usize,
    uplink: DnsUplink,
    /// Timeouts and answers when the active resolver was last judged.
    seen: (u64, u64),
    tx: Vec<u8>,
    rx: Vec<u8>,
}

pub(super) struct IcmpUplink {
    socket: IcmpSocket,
    to: IpAddr,
    id: u16,
    seq: u16,
    pacer: Pacer,
    tx: Vec<u8>,
    rx: Vec<u8>,
}

impl Uplink {
    pub(super) fn open(server: ServerAddr, http: &HttpOptions) -> anyhow::Result<Self> {
        Ok(match server {
            ServerAddr::Udp(to) => {
                let (rx, tx) = udp::bind_for(to)?;
                Self::Udp { rx, tx, to }
            }
            ServerAddr::Icmp(to) => {
                let family = if to.is_ipv4() { Family::V4 } else { Family::V6 };
                Self::Icmp(IcmpUplink {
                    socket: IcmpSocket::open(family, Role::Client)?,
                    to,
                    // Our replies are told from other pings' by this id (NATs
                    // rewrite it on the way out and restore it on the way back).
                    id: crate::daemon::unix_nanos() as u16 ^ std::process::id() as u16,
                    seq: 0,
                    pacer: Cadence::ICMP.pacer(),
                    tx: vec![0; 1 << 16],
                    rx: vec![0; 1 << 16],
                })
            }
            ServerAddr::Dns { domain, resolvers } => {
                Self::Dns(Box::new(DnsPath::open(&domain, resolvers)?))
            }
            ServerAddr::Http(url) => Self::Http(Box::new(HttpPath::open(url, http)?)),
        })
    }

    /// The server's address on the underlay.
    pub(super) fn server_ip(&self) -> IpAddr {
        match self {
            Self::Udp { to, .. } => to.ip(),
            Self::Icmp(i) => i.to,
            Self::Dns(d) => d.resolver().ip(),
            Self::Http(h) => h.first_hop().ip(),
        }
    }

    /// Bytes this transport adds around an inner packet on the wire: IP
    /// header, carrier header, and the data message's own 32 bytes.
    pub(super) fn overhead(&self) -> u16 {
        let ip = if self.server_ip().is_ipv4() { 20 } else { 40 };
        let carrier = match self {
            Self::Udp { .. } => 8,
            Self::Icmp(_) => OVERHEAD as u16,
            // Messages are fragmented into queries and answers, or ride
            // a TCP stream: nothing limits the tunnel MTU but the server's.
            Self::Dns(_) | Self::Http(_) => return 0,
        };
        ip + carrier + DATA_OVERHEAD as u16
    }

    /// Transport name and server endpoint, for status and logs.
    pub(super) fn describe(&self) -> (&'static str, String) {
        match self {
            Self::Udp { to, .. } => ("udp", to.to_string()),
            Self::Icmp(i) => ("icmp", i.to.to_string()),
            Self::Dns(d) => ("dns", d.resolver().to_string()),
            Self::Http(h) => (h.scheme(), h.url().to_string()),
        }
    }

    /// Transport details for status, where there are any.
    pub(super) fn path_info(&self) -> Option<serde_json::Value> {
        match self {
            Self::Dns(d) => Some(d.path_info()),
            Self::Http(h) => Some(h.path_info()),
            _ => None,
        }
    }

    /// Build a message in place and send it (batched on UDP).
    pub(super) fn send_with(
        &mut self,
        now: Instant,
        fill: impl FnOnce(&mut [u8]) -> Option<usize>,
    ) {
        match self {
            Self::Udp { tx, to, .. } => tx.send_with((*to).into(), fill),
            Self::Icmp(i) => i.request(now, fill),
            Self::Dns(d) => d.send_with(now, fill),
            Self::Http(h) => h.send_with(fill),
        }
    }

    /// Send a copy of `msg`.
    pub(super) fn send(&mut self, now: Instant, msg: &[u8]) {
        self.send_with(now, |out| {
            out[..msg.len()].copy_from_slice(msg);
            Some(msg.len())
        });
    }

    /// Send whatever is batched.
    pub(super) fn flush(&mut self) {
        match self {
            Self::Udp { tx, .. } => tx.flush(),
            Self::Http(h) => h.flush(),
            _ => {}
        }
    }

    pub(super) fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self {
            Self::Http(h) => h.poll_readable(cx),
            Self::Udp { rx, .. } => rx.poll_readable(cx),
            Self::Icmp(i) => i.socket.poll_readable(cx),
            Self::Dns(d) => d.socket.poll_recv_ready(cx),
        }
    }

    /// When the transport's own timers next need [`Uplink::top_up`].
    pub(super) fn next_timeout(&self) -> Option<Instant> {
        match self {
            Self::Udp { .. } | Self::Http(_) => None,
            Self::Icmp(i) => i.pacer.next_timeout(),
            Self::Dns(d) => d.uplink.next_timeout(),
        }
    }

    /// On a poll transport, send bare requests (keepalives) until the
    /// pacer's target is outstanding.
    pub(super) fn top_up(&mut self, engine: &mut Client, now: Instant) {
        if let Self::Dns(d) = self {
            // The uplink keeps its own polls outstanding.
            if d.uplink.next_timeout().is_some_and(|t| t <= now) {
                d.uplink.handle_timeout(now);
            }
            d.pump(now);
            return;
        }
        let Self::Icmp(i) = self else { return };
        // Always let the pacer forget lost requests, or its deadline stays in
        // the past and the client loop spins.
        let due = i.pacer.polls_due(now);
        if !engine.is_connected(now) {
            return; // until the handshake completes, inits are the requests
        }
        for _ in 0..due {
            i.request(now, |out| engine.seal_keepalive(now, out).ok());
        }
    }

    /// Drain what the server sent (up to a bound) into the engine and the
    /// TUN device. Returns whether the source ran dry.
    pub(super) async fn receive(
        &mut self,
        engine: &mut Client,
        tun: &mut Tun,
    ) -> anyhow::Result<bool> {
        let dry = match self {
            Self::Udp { rx, tx, to } => receive_udp(engine, tun, rx, tx, *to).await?,
            Self::Icmp(i) => i.receive(engine, tun).await?,
            Self::Dns(d) => d.receive(engine, tun).await?,
            Self::Http(h) => h.receive(engine, tun).await?,
        };
        self.top_up(engine, Instant::now());
        self.flush();
        Ok(dry)
    }
}

async fn receive_udp(
    engine: &mut Client,
    tun: &mut Tun,
    rx: &mut UdpReceiver,
    tx: &mut UdpSender,
    to: SocketAddr,
) -> anyhow::Result<bool> {
    for _ in 0..MAX_BATCHES_PER_WAKEUP {
        let now = Instant::now();
        let result = rx.try_recv_batch(|_, datagram| {
            let Some(buf) = tun.stage_buffer(datagram.len()) else {
                return;
            };
            match engine.handle_datagram(now, datagram, buf) {
                Ok(ClientOutput::Tun(packet)) => {
                    let n = packet.len();
                    tun.commit(n);
                }
                Ok(ClientOutput::Send(msg)) => tx.send(to.into(), msg),
                Ok(ClientOutput::Nothing) | Err(_) => {}
            }
        });
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) => return Err(e).context("receiving on the UDP socket"),
        }
        tun.flush().await.context("writing to the TUN device")?;
    }
    Ok(false)
}

impl IcmpUplink {
    /// Send one echo request carrying what `fill` writes (after the magic).
    fn request(&mut self, now: Instant, fill: impl FnOnce(&mut [u8]) -> Option<usize>) {
        let Some(n) = fill(&mut self.tx[OVERHEAD..]) else {
            return;
        };
        icmp::emit_magic(&mut self.tx);
        let len = icmp::emit_echo(
            self.socket.family(),
            false,
            self.id,
            self.seq,
            &mut self.tx,
            MAGIC.len() + n,
        );
        self.seq = self.seq.wrapping_add(1);
        self.socket.send(self.to, None, &self.tx[..len]);
        self.pacer.sent(now);
    }

    async fn receive(&mut self, engine: &mut Client, tun: &mut Tun) -> anyhow::Result<bool> {
        let mut rx = std::mem::take(&mut self.rx);
        let mut dry = false;
        for _ in 0..MAX_BATCHES_PER_WAKEUP * 8 {
            let (from, bytes) = match self.socket.try_recv(&mut rx) {
                Ok(Some(r)) => (r.from, r.icmp),
                Ok(None) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    dry = true;
                    break;
                }
                Err(e) => {
                    self.rx = rx;
                    return Err(e).context("receiving on the ICMP socket");
                }
            };
            let Ok(echo) = Echo::parse(self.socket.family(), bytes) else {
                continue;
            };
            let ours = from == self.to && echo.reply && echo.id == self.id;
            let Some(msg) = echo.tunnel_message().filter(|_| ours) else {
                continue;
            };
            let now = Instant::now();
            let Some(buf) = tun.stage_buffer(msg.len()) else {
                continue;
            };
            let carried_data = match engine.handle_datagram(now, msg, buf) {
                Ok(ClientOutput::Tun(packet)) => {
                    let n = packet.len();
                    tun.commit(n);
                    true
                }
                Ok(ClientOutput::Send(reply)) => {
                    self.request(now, |out| {
                        out[..reply.len()].copy_from_slice(reply);
                        Some(reply.len())
                    });
                    false
                }
                Ok(ClientOutput::Nothing) => false,
                Err(_) if msg.is_empty() => false, // the server answered without a session
                Err(_) => continue,                // forged or stale: not an answer
            };
            self.pacer.replied(carried_data);
        }
        self.rx = rx;
        tun.flush().await.context("writing to the TUN device")?;
        Ok(dry)
    }
}

/// One socket for all the resolvers: IPv4 only when they all are, else
/// dual-stack IPv6 (IPv4 resolvers reached by mapped addresses). Where the
/// host has no IPv6, the IPv6 resolvers are skipped.
fn resolver_socket(
    resolvers: Vec<SocketAddr>,
) -> anyhow::Result<(tokio::net::UdpSocket, Vec<SocketAddr>)> {
    let open = |any: &str| -> std::io::Result<std::net::UdpSocket> {
        let any: SocketAddr = any.parse().expect("valid");
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(any),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        if any.is_ipv6() {
            socket.set_only_v6(false)?; // before bind, or it does not apply
        }
        socket.bind(&any.into())?;
        Ok(socket.into())
    };
    let (socket, resolvers) = if resolvers.iter().all(SocketAddr::is_ipv4) {
        (open("0.0.0.0:0"), resolvers)
    } else {
        match open("[::]:0") {
            Ok(s) => (Ok(s), resolvers),
            Err(e) => {
                let (v4, v6): (Vec<_>, Vec<_>) =
                    resolvers.into_iter().partition(SocketAddr::is_ipv4);
                tracing::warn!("no IPv6 socket ({e}): skipping resolvers {v6:?}");
                anyhow::ensure!(
                    !v4.is_empty(),
                    "no IPv6 socket for the resolvers {v6:?}: {e}"
                );
                (open("0.0.0.0:0"), v4)
            }
        }
    };
    let socket = socket.context("binding a UDP socket for DNS")?;
    socket.set_nonblocking(true)?;
    crate::transport::sockopt::size_buffers(std::os::fd::AsRawFd::as_raw_fd(&socket));
    Ok((tokio::net::UdpSocket::from_std(socket)?, resolvers))
}

impl DnsPath {
    fn open(domain: &str, resolvers: Vec<SocketAddr>) -> anyhow::Result<Self> {
        let domain = Domain::new(domain).with_context(|| format!("tunnel domain `{domain}`"))?;
        anyhow::ensure!(!resolvers.is_empty(), "no DNS resolver");
        let (socket, resolvers) = resolver_socket(resolvers)?;
        let dual_stack = socket.local_addr()?.is_ipv6();
        let mut random = [0u8; 12];
        getrandom::fill(&mut random).map_err(|e| anyhow::anyhow!("getrandom: {e}"))?;
        let tag = u32::from_le_bytes(random[..4].try_into().expect("4 bytes"));
        let seed = u64::from_le_bytes(random[4..].try_into().expect("8 bytes"));
        Ok(Self {
            socket,
            dual_stack,
            resolvers,
            active: 0,
            uplink: DnsUplink::new(domain, tag, seed),
            seen: (0, 0),
            tx: vec![0; 1 << 16],
            rx: vec![0; 1 << 16],
        })
    }

    fn resolver(&self) -> SocketAddr {
        self.resolvers[self.active]
    }

    /// `to` as the socket takes it: IPv4 resolvers as IPv4-mapped addresses
    /// on a dual-stack socket.
    fn socket_addr(&self, to: SocketAddr) -> SocketAddr {
        match to.ip() {
            IpAddr::V4(v4) if self.dual_stack => {
                SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), to.port())
            }
            _ => to,
        }
    }

    fn send_with(&mut self, now: Instant, fill: impl FnOnce(&mut [u8]) -> Option<usize>) {
        let Some(n) = fill(&mut self.tx) else {
            return;
        };
        self.uplink.send(now, &self.tx[..n]);
        self.pump(now);
    }

    /// Send every query the uplink's pacing allows now.
    fn pump(&mut self, now: Instant) {
        let stats = self.uplink.stats();
        if self.resolvers.len() > 1 {
            if stats.answers > self.seen.1 {
                self.seen = (stats.timeouts, stats.answers);
            } else if stats.timeouts >= self.seen.0 + RESOLVER_SWITCH_TIMEOUTS {
                self.active = (self.active + 1) % self.resolvers.len();
                // The queries still out went to the old resolver: their
                // timeouts must not count against the new one.
                let in_flight = self.uplink.path_info().in_flight as u64;
                self.seen = (stats.timeouts + in_flight, stats.answers);
                tracing::info!("no answers: switching to resolver {}", self.resolver());
            }
        }
        let to = self.socket_addr(self.resolver());
        while let Some(q) = self.uplink.poll_query(now) {
            // A full socket buffer loses the query: the uplink times it out.
            let _ = self.socket.try_send_to(&q.bytes, to);
        }
    }

    fn path_info(&self) -> serde_json::Value {
        let p = self.uplink.path_info();
        let s = p.stats;
        serde_json::json!({
            "resolver": self.resolver().to_string(),
            "tag": format!("{:08x}", self.uplink.tag()),
            "encoding": p.encoding,
            "record_type": p.record_type,
            "edns_size": p.edns_size,
            "max_name_len": p.max_name_len,
            "upstream_fragment": p.upstream_fragment,
            "downstream_limit": p.downstream_limit,
            "in_flight": p.in_flight,
            "target": p.target,
            "window": p.window,
            "backoff_ms": p.backoff.as_millis() as u64,
            "stats": {
                "queries": s.queries,
                "data_queries": s.data_queries,
                "answers": s.answers,
                "data_answers": s.data_answers,
                "timeouts": s.timeouts,
                "servfails": s.servfails,
                "refused": s.refused,
                "truncated": s.truncated,
                "errors": s.errors,
                "retried": s.retried,
                "lost": s.lost,
                "fallbacks": s.fallbacks,
                "reprobes": s.reprobes,
                "encoding_probes": s.encoding_probes,
                "encoding_failures": s.encoding_failures,
                "type_probes": s.type_probes,
                "type_probe_failures": s.type_probe_failures,
                "type_fallbacks": s.type_fallbacks,
                "unexpected": s.unexpected,
            },
        })
    }

    async fn receive(&mut self, engine: &mut Client, tun: &mut Tun) -> anyhow::Result<bool> {
        let mut rx = std::mem::take(&mut self.rx);
        let mut dry = false;
        let mut result = Ok(());
        for _ in 0..MAX_BATCHES_PER_WAKEUP * 8 {
            let (n, from) = match self.socket.try_recv_from(&mut rx) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    dry = true;
                    break;
                }
                // ICMP port unreachable from a resolver: its query times out.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(e) => {
                    result = Err(e).context("receiving on the DNS socket");
                    break;
                }
            };
            let from = SocketAddr::new(from.ip().to_canonical(), from.port());
            if !self.resolvers.contains(&from) {
                continue;
            }
            let now = Instant::now();
            let _ = self.uplink.handle_response(now, &rx[..n]);
            while let Some(m) = self.uplink.poll_message() {
                let Some(buf) = tun.stage_buffer(m.len()) else {
                    continue;
                };
                match engine.handle_datagram(now, &m, buf) {
                    Ok(ClientOutput::Tun(packet)) => {
                        let n = packet.len();
                        tun.commit(n);
                    }
                    Ok(ClientOutput::Send(reply)) => self.uplink.send(now, reply),
                    Ok(ClientOutput::Nothing) | Err(_) => {}
                }
            }
        }
        self.rx = rx;
        result?;
        self.pump(Instant::now());
        tun.flush().await.context("writing to the TUN device")?;
        Ok(dry)
    }
}

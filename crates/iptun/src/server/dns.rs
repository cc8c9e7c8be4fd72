//! The server's DNS listeners: a UDP socket per `dns://` listener, the
//! sans-IO [`DnsListener`] behind it. Queries are held by the listener until
//! downstream data (or its hold time) answers them, each exactly once; every
//! answer goes out through [`DnsListener::poll_transmit`], from the address
//! the query came to (resolvers drop answers from any other).

use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Instant;

use super::{Path, Senders};
use crate::daemon::MAX_BATCHES_PER_WAKEUP;
use crate::transport::udp::{self, Peer, UdpReceiver, UdpSender};
use crate::tun::Tun;
use anyhow::Context as _;
use iptun_proto::dns::server::DnsListener;
use iptun_proto::engine::{Server, ServerOutput, SessionId};
use iptun_proto::wire::dns::Domain;

/// The DNS sockets and their listeners (same index).
pub(super) struct Listeners {
    receivers: Vec<UdpReceiver>,
    senders: Vec<UdpSender>,
    listeners: Vec<DnsListener<SessionId, Peer>>,
    msg: Vec<u8>,
    /// Answers the socket had no room for.
    send_errors: u64,
}

impl Listeners {
    pub(super) fn new() -> Self {
        Self {
            receivers: Vec::new(),
            senders: Vec::new(),
            listeners: Vec::new(),
            msg: vec![0; 1 << 16],
            send_errors: 0,
        }
    }

    /// Listen on `addr` as the authoritative server of `domain`; returns the
    /// bound address.
    pub(super) fn add(&mut self, addr: SocketAddr, domain: &str) -> anyhow::Result<SocketAddr> {
        let domain = Domain::new(domain).with_context(|| format!("tunnel domain `{domain}`"))?;
        let (rx, tx) = udp::bind(addr).with_context(|| format!("DNS listener {addr}"))?;
        let local = rx.local_addr()?;
        self.receivers.push(rx);
        self.senders.push(tx);
        self.listeners.push(DnsListener::new(domain));
        Ok(local)
    }

    /// The index of a socket ready to receive.
    pub(super) fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<usize> {
        for (i, r) in self.receivers.iter().enumerate() {
            if r.poll_readable(cx).is_ready() {
                return Poll::Ready(i);
            }
        }
        Poll::Pending
    }

    /// When [`Listeners::handle_timeout`] wants calling.
    pub(super) fn next_timeout(&self) -> Option<Instant> {
        self.listeners
            .iter()
            .filter_map(DnsListener::next_timeout)
            .min()
    }

    /// A downstream message on the path to a client.
    pub(super) fn send(&mut self, socket: usize, tag: u32, session: Option<SessionId>, msg: &[u8]) {
        let now = Instant::now();
        let Some(listener) = self.listeners.get_mut(socket) else {
            return;
        };
        let _ = match session {
            Some(s) => listener.send(now, s, msg),
            // Before the session is bound: the handshake response.
            None => listener.send_to_tag(now, tag, msg),
        };
        self.transmit(socket);
    }

    /// Send every answer listener `i` has ready.
    fn transmit(&mut self, i: usize) {
        let sender = &mut self.senders[i];
        while let Some(t) = self.listeners[i].poll_transmit() {
            // A full socket buffer loses the answer: the resolver retries.
            sender.send(t.to, &t.bytes);
        }
        sender.flush();
    }

    /// Answer held queries whose hold passed (with keepalives), forget
    /// idle tags.
    pub(super) fn handle_timeout(&mut self, engine: &mut Server<Path>, now: Instant) {
        let mut ka = [0u8; 256];
        for i in 0..self.listeners.len() {
            if self.listeners[i].next_timeout().is_none_or(|t| t > now) {
                continue;
            }
            self.listeners[i].handle_timeout(now, |s| {
                match engine.seal_keepalive(now, s, &mut ka) {
                    Ok(ServerOutput::Send(_, m)) => Some(m.to_vec()),
                    _ => None,
                }
            });
            self.transmit(i);
        }
    }

    /// Add this transport's own counters to a status report.
    pub(super) fn add_drops(&self, drops: &mut std::collections::BTreeMap<String, u64>) {
        let mut add = |k: &str, v: u64| {
            if v > 0 {
                *drops.entry(k.into()).or_default() += v;
            }
        };
        add("dns_send_failed", self.send_errors);
        for l in &self.listeners {
            let s = l.stats();
            add("dns_malformed", s.malformed);
            add("dns_refused", s.refused);
            add("dns_queue_full", s.queue_full);
            add("dns_oversize", s.oversize);
            add("dns_evicted_tags", s.evicted_tags);
        }
    }
}

/// Drain socket `index` (up to a bound): hand each query to its listener,
/// open what it delivers, answer what is ready. Returns whether it ran dry.
pub(super) async fn receive(
    engine: &mut Server<Path>,
    tun: &mut Tun,
    senders: &mut Senders,
    index: usize,
) -> anyhow::Result<bool> {
    // The receivers are set aside while their queries are handled: that
    // may send on this listener (`senders` as a whole is borrowed).
    let mut receivers = std::mem::take(&mut senders.dns.receivers);
    let mut msg = std::mem::take(&mut senders.dns.msg);
    let mut dry = false;
    let mut result = Ok(());
    for _ in 0..MAX_BATCHES_PER_WAKEUP {
        let now = Instant::now();
        let received = receivers[index].try_recv_batch(|from, query| {
            let delivered = senders.dns.listeners[index]
                .handle_query(now, from, query)
                .map(|d| {
                    msg[..d.message.len()].copy_from_slice(d.message);
                    (d.tag, d.message.len())
                });
            if let Some((tag, len)) = delivered {
                tunnel_message(engine, tun, senders, index, tag, &msg[..len], now);
            }
        });
        match received {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                dry = true;
                break;
            }
            // An ICMP error from an earlier send: not ours to stop for.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(e) => {
                result = Err(e).context("receiving on a DNS socket");
                break;
            }
        }
        senders.dns.transmit(index);
    }
    senders.dns.receivers = receivers;
    senders.dns.msg = msg;
    result?;
    tun.flush().await.context("writing to the TUN device")?;
    senders.flush();
    Ok(dry)
}

/// A complete upstream message from client `tag`: open it, answer or
/// forward what it produces, and bind the tag to its session.
fn tunnel_message(
    engine: &mut Server<Path>,
    tun: &mut Tun,
    senders: &mut Senders,
    socket: usize,
    tag: u32,
    msg: &[u8],
    now: Instant,
) {
    let session = engine.session_of(msg);
    let from = Path::Dns {
        socket,
        tag,
        session,
    };
    let Some(buf) = tun.stage_buffer(msg.len()) else {
        return;
    };
    match engine.handle_datagram(now, &from, msg, buf) {
        // The handshake response goes to the tag that sent the init.
        Ok(ServerOutput::Send(_, reply)) if session.is_none() => {
            let _ = senders.dns.listeners[socket].send_to_tag(now, tag, reply);
        }
        Ok(ServerOutput::Send(path, m)) => senders.send(path, m),
        Ok(ServerOutput::Tun(packet)) => {
            let n = packet.len();
            tun.commit(n);
        }
        Ok(ServerOutput::Nothing) => {}
        Err(_) => return, // unauthenticated: the hold answers it empty
    }
    if let Some(s) = session {
        senders.dns.listeners[socket].bind(now, tag, s);
    }
}

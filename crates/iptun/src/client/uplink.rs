//! The client's way to the server: one transport, behind one interface the
//! client loop drives — send (batched where the transport can), receive into
//! the engine and the TUN device, and keep a poll transport's requests
//! outstanding.

use std::net::{IpAddr, SocketAddr};
use std::task::{Context, Poll};
use std::time::Instant;

use anyhow::Context as _;
use iptun_proto::engine::{Client, ClientOutput};
use iptun_proto::poll::{Cadence, Pacer};
use iptun_proto::wire::icmp::{self, Echo, Family, MAGIC, OVERHEAD};
use iptun_proto::wire::message::DATA_OVERHEAD;

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
    pub(super) fn open(server: ServerAddr) -> anyhow::Result<Self> {
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
        })
    }

    /// The server's address on the underlay.
    pub(super) fn server_ip(&self) -> IpAddr {
        match self {
            Self::Udp { to, .. } => to.ip(),
            Self::Icmp(i) => i.to,
        }
    }

    /// Bytes this transport adds around an inner packet on the wire: IP
    /// header, carrier header, and the data message's own 32 bytes.
    pub(super) fn overhead(&self) -> u16 {
        let ip = if self.server_ip().is_ipv4() { 20 } else { 40 };
        let carrier = match self {
            Self::Udp { .. } => 8,
            Self::Icmp(_) => OVERHEAD as u16,
        };
        ip + carrier + DATA_OVERHEAD as u16
    }

    /// Transport name and server endpoint, for status and logs.
    pub(super) fn describe(&self) -> (&'static str, String) {
        match self {
            Self::Udp { to, .. } => ("udp", to.to_string()),
            Self::Icmp(i) => ("icmp", i.to.to_string()),
        }
    }

    /// Build a message in place and send it (batched on UDP).
    pub(super) fn send_with(
        &mut self,
        now: Instant,
        fill: impl FnOnce(&mut [u8]) -> Option<usize>,
    ) {
        match self {
            Self::Udp { tx, to, .. } => tx.send_with(*to, fill),
            Self::Icmp(i) => i.request(now, fill),
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
        if let Self::Udp { tx, .. } = self {
            tx.flush();
        }
    }

    pub(super) fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self {
            Self::Udp { rx, .. } => rx.poll_readable(cx),
            Self::Icmp(i) => i.socket.poll_readable(cx),
        }
    }

    /// When the transport's own timers next need [`Uplink::top_up`].
    pub(super) fn next_timeout(&self) -> Option<Instant> {
        match self {
            Self::Udp { .. } => None,
            Self::Icmp(i) => i.pacer.next_timeout(),
        }
    }

    /// On a poll transport, send bare requests (keepalives) until the
    /// pacer's target is outstanding.
    pub(super) fn top_up(&mut self, engine: &mut Client, now: Instant) {
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
                Ok(ClientOutput::Send(msg)) => tx.send(to, msg),
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

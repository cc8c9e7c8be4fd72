//! The server's ICMP echo listeners. Echo requests carrying a tunnel message
//! are opened by the engine and then held (`iptun_proto::poll::Parking`)
//! until downstream data or a keepalive answers them, at most once each.
//! Ordinary pings are answered at once, as the kernel would have; the
//! kernel's own echo replies are switched off while we run, so no request is
//! answered twice.

use std::collections::HashMap;
use std::net::IpAddr;
use std::task::{Context, Poll};
use std::time::Instant;

use anyhow::Context as _;
use iptun_proto::engine::{Server, ServerOutput, SessionId};
use iptun_proto::poll::{Cadence, Parking, Reply};
use iptun_proto::wire::Message;
use iptun_proto::wire::icmp::{self, Echo, Family, MAGIC, OVERHEAD};

use super::{Path, Senders};
use crate::daemon::MAX_BATCHES_PER_WAKEUP;
use crate::netcfg::{self, Undo};
use crate::transport::icmp::IcmpSocket;
use crate::tun::Tun;

/// A held echo request: where to send the reply, from which of our
/// addresses, and what to echo.
#[derive(Clone, Copy, Debug)]
pub(super) struct Request {
    socket: usize,
    ip: IpAddr,
    local: IpAddr,
    id: u16,
    seq: u16,
}

/// The ICMP sockets and the requests held on them.
pub(super) struct Listeners {
    sockets: Vec<IcmpSocket>,
    parking: Parking<SessionId, Request>,
    /// The receiver index of each session's latest request (see `park`).
    indices: HashMap<SessionId, u32>,
    rx: Vec<u8>,
    tx: Vec<u8>,
}

impl Listeners {
    pub(super) fn new() -> Self {
        Self {
            sockets: Vec::new(),
            parking: Parking::new(Cadence::ICMP.hold),
            indices: HashMap::new(),
            rx: vec![0; 1 << 16],
            tx: vec![0; 1 << 16],
        }
    }

    /// Take over echo requests of `socket`'s family from the kernel.
    pub(super) fn add(&mut self, socket: IcmpSocket, undo: &mut Undo) -> anyhow::Result<()> {
        let sysctl = match socket.family() {
            Family::V4 => "/proc/sys/net/ipv4/icmp_echo_ignore_all",
            Family::V6 => "/proc/sys/net/ipv6/icmp/echo_ignore_all",
        };
        netcfg::set_sysctl(undo, sysctl, "1")
            .context("taking over echo replies from the kernel")?;
        self.sockets.push(socket);
        Ok(())
    }

    /// Add this transport's own drops to a status report.
    pub(super) fn add_drops(&self, drops: &mut std::collections::BTreeMap<String, u64>) {
        if self.parking.dropped() > 0 {
            drops.insert("icmp_queue_full".into(), self.parking.dropped());
        }
    }

    /// The index of a socket ready to receive.
    pub(super) fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<usize> {
        for (i, s) in self.sockets.iter().enumerate() {
            if s.poll_readable(cx).is_ready() {
                return Poll::Ready(i);
            }
        }
        Poll::Pending
    }

    /// A message for `session`: answer one of its held requests, or queue it.
    pub(super) fn downstream(&mut self, session: SessionId, msg: &[u8]) {
        if let Some(Reply {
            request,
            message: Some(m),
            ..
        }) = self.parking.downstream(session, msg)
        {
            answer(&self.sockets, &mut self.tx, request, m);
        }
    }

    /// Answer held requests that waited their hold time with keepalives.
    pub(super) fn expire(&mut self, engine: &mut Server<Path>, now: Instant) {
        while let Some((session, request)) = self.parking.expired(now) {
            self.keepalive(engine, now, session, request);
        }
    }

    /// Answer `request` with a keepalive of `session` (or, if the session is
    /// gone, with the bare magic: a request is always answered once).
    fn keepalive(
        &mut self,
        engine: &mut Server<Path>,
        now: Instant,
        session: SessionId,
        request: Request,
    ) {
        let mut ka = [0u8; 64];
        let msg = match engine.seal_keepalive(now, session, &mut ka) {
            Ok(ServerOutput::Send(_, m)) => m,
            _ => &[][..],
        };
        answer(&self.sockets, &mut self.tx, request, msg);
    }

    /// Hold `request` for `session`, answering whatever that releases.
    /// Requests sealed under older keys are answered at once: after a rekey
    /// the client has sent fresh ones, and after a client restart the old
    /// ones belong to a process that is gone (downstream sent on them would
    /// be lost for the whole hold time).
    fn park(
        &mut self,
        engine: &mut Server<Path>,
        now: Instant,
        session: SessionId,
        index: u32,
        request: Request,
    ) {
        if self
            .indices
            .insert(session, index)
            .is_some_and(|old| old != index)
        {
            while let Some(stale) = self.parking.take_parked(session) {
                self.keepalive(engine, now, session, stale);
            }
        }
        // Too many held releases the oldest with no message: it is let go
        // unanswered. Answering it would cost a seal and a send per request
        // under an upload, and ICMP needs no answer (a firewall only drops
        // *unsolicited* replies); the client's pacer forgets it after its
        // timeout.
        if let Some(Reply {
            request,
            message: Some(m),
            ..
        }) = self.parking.request(session, request, now)
        {
            answer(&self.sockets, &mut self.tx, request, m);
        }
    }
}

/// Send an echo reply to `request` carrying `message` behind the magic.
fn answer(sockets: &[IcmpSocket], buf: &mut [u8], request: Request, message: &[u8]) {
    let socket = &sockets[request.socket];
    icmp::emit_magic(buf);
    buf[OVERHEAD..OVERHEAD + message.len()].copy_from_slice(message);
    let n = icmp::emit_echo(
        socket.family(),
        true,
        request.id,
        request.seq,
        buf,
        MAGIC.len() + message.len(),
    );
    socket.send(request.ip, Some(request.local), &buf[..n]);
}

/// Drain socket `index` (up to a bound). Returns whether it ran dry.
pub(super) async fn receive(
    engine: &mut Server<Path>,
    tun: &mut Tun,
    senders: &mut Senders,
    index: usize,
) -> anyhow::Result<bool> {
    let mut rx = std::mem::take(&mut senders.icmp.rx);
    let mut dry = false;
    for _ in 0..MAX_BATCHES_PER_WAKEUP * 8 {
        let received = match senders.icmp.sockets[index].try_recv(&mut rx) {
            Ok(Some(x)) => x,
            Ok(None) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                dry = true;
                break;
            }
            Err(e) => {
                senders.icmp.rx = rx;
                return Err(e).context("receiving on an ICMP socket");
            }
        };
        // Broadcast and multicast echoes get no answer, as from the kernel.
        let Some(local) = received.to else { continue };
        let (ip, bytes) = (received.from, received.icmp);
        let family = senders.icmp.sockets[index].family();
        let Ok(echo) = Echo::parse(family, bytes) else {
            continue;
        };
        if echo.reply {
            continue;
        }
        let request = Request {
            socket: index,
            ip,
            local,
            id: echo.id,
            seq: echo.seq,
        };
        match echo.tunnel_message() {
            Some(msg) => tunnel_request(engine, tun, senders, request, msg),
            // An ordinary ping: answer it as the kernel would have.
            None => {
                // Any size the kernel would answer (not just 1500 bytes).
                let (socket, tx) = (&senders.icmp.sockets[index], &mut senders.icmp.tx);
                if let Some(buf) = tx.get_mut(..bytes.len()) {
                    buf.copy_from_slice(bytes);
                    let n =
                        icmp::emit_echo(family, true, echo.id, echo.seq, buf, echo.payload.len());
                    socket.send(ip, Some(local), &buf[..n]);
                }
            }
        }
    }
    senders.icmp.rx = rx;
    tun.flush().await.context("writing to the TUN device")?;
    senders.flush();
    Ok(dry)
}

/// A request carrying a tunnel message: open it, then hold the request.
fn tunnel_request(
    engine: &mut Server<Path>,
    tun: &mut Tun,
    senders: &mut Senders,
    request: Request,
    msg: &[u8],
) {
    let now = Instant::now();
    let session = engine.session_of(msg);
    let index = match Message::parse(msg) {
        Ok(Message::Data { receiver, .. }) => receiver,
        _ => 0,
    };
    let from = Path::Icmp {
        socket: request.socket,
        ip: request.ip,
        session,
    };
    let Some(buf) = tun.stage_buffer(msg.len()) else {
        return;
    };
    match engine.handle_datagram(now, &from, msg, buf) {
        // A handshake response answers the very request that carried the init.
        Ok(ServerOutput::Send(_, reply)) if session.is_none() => {
            answer(&senders.icmp.sockets, &mut senders.icmp.tx, request, reply);
            return;
        }
        Ok(ServerOutput::Send(path, m)) => senders.send(path, m),
        Ok(ServerOutput::Tun(packet)) => {
            let n = packet.len();
            tun.commit(n);
        }
        Ok(ServerOutput::Nothing) => {}
        Err(_) => return, // unauthenticated: no answer at all
    }
    if let Some(session) = session {
        senders.icmp.park(engine, now, session, index, request);
    }
}

//! The ICMP echo transport's two halves. Tunnel messages ride behind
//! [`MAGIC`] in echo requests (client to server) and echo replies (server
//! to client); the codec is [`wire::icmp`](crate::wire::icmp).
//!
//! The client ([`IcmpClient`]) sends every message as a request with its
//! own identifier and a running sequence number, and keeps bare requests
//! outstanding ([`Pacer`]) so the server always has one to answer with
//! downstream data. The server ([`IcmpListener`]) holds each request
//! ([`Parking`]) until data or a keepalive answers it, exactly once: no
//! reply is ever unsolicited, so stateful firewalls and NATs let them all
//! through. Ordinary pings are answered at once, as the kernel would.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use super::poll::{Cadence, Pacer, Parking};
use crate::engine::SessionId;
use crate::wire::icmp::{self, Echo, Family, MAGIC, OVERHEAD};

/// Bytes in front of a tunnel message in an echo: header and magic.
pub const HEADROOM: usize = OVERHEAD;

/// The client half: one server address, one echo identifier.
#[derive(Debug)]
pub struct IcmpClient {
    server: IpAddr,
    family: Family,
    id: u16,
    seq: u16,
    pacer: Pacer,
    /// Keep bare requests outstanding (the path is in use).
    polling: bool,
    /// When the latest requests went, by sequence number (a ring).
    sent_at: Vec<(u16, Instant)>,
    stats: IcmpClientStats,
}

/// Requests whose send time a client remembers.
const SENT_RING: usize = 1024;

/// What the status shows of a client's ICMP path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IcmpClientStats {
    /// Echo requests sent.
    pub requests: u64,
    /// Replies that carried a message for us.
    pub replies: u64,
    /// Requests given up on (no reply within the request timeout).
    pub unanswered: u64,
    /// Requests outstanding now.
    pub outstanding: usize,
    /// Requests the pacer wants outstanding.
    pub target: usize,
}

impl IcmpClient {
    /// A client of the server at `server`, with echo identifier `id`
    /// (random: replies to us are told from other pings' by it; NATs
    /// rewrite it on the way out and restore it on the way back).
    pub fn new(server: IpAddr, id: u16) -> Self {
        Self::with_start(server, id, None)
    }

    fn with_start(server: IpAddr, id: u16, now: Option<Instant>) -> Self {
        let long_ago = now.unwrap_or_else(Instant::now);
        Self {
            server,
            family: if server.is_ipv4() {
                Family::V4
            } else {
                Family::V6
            },
            id,
            seq: 0,
            pacer: Cadence::ICMP.pacer(),
            polling: false,
            // Sequence numbers not sent yet read as sent long ago.
            sent_at: vec![(u16::MAX, long_ago); SENT_RING],
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
    /// what it is given).
    pub fn set_polling(&mut self, on: bool) {
        if on && !self.polling {
            self.pacer = Cadence::ICMP.pacer();
        }
        self.polling = on;
    }

    /// Frame the `len`-byte message at `buf[HEADROOM..]` as an echo
    /// request; returns the ICMP message's length.
    pub fn frame(&mut self, now: Instant, buf: &mut [u8], len: usize) -> usize {
        icmp::emit_magic(buf);
        let n = icmp::emit_echo(
            self.family,
            false,
            self.id,
            self.seq,
            buf,
            MAGIC.len() + len,
        );
        self.sent_at[usize::from(self.seq) % SENT_RING] = (self.seq, now);
        self.seq = self.seq.wrapping_add(1);
        self.stats.requests += 1;
        if self.polling {
            self.pacer.sent(now);
        }
        n
    }

    /// An ICMP message from `from`: the tunnel message it carries, if it is
    /// a reply to us, and when the request it answers was sent (long ago,
    /// if that request is too old to be remembered). The server holds
    /// requests for seconds, so a reply proves only that the path worked
    /// when its request went.
    pub fn unwrap<'a>(&self, from: IpAddr, bytes: &'a [u8]) -> Option<(&'a [u8], Instant)> {
        let echo = Echo::parse(self.family, bytes).ok()?;
        let ours = from == self.server && echo.reply && echo.id == self.id;
        let msg = echo.tunnel_message().filter(|_| ours)?;
        let (seq, at) = self.sent_at[usize::from(echo.seq) % SENT_RING];
        let oldest = self
            .sent_at
            .iter()
            .map(|&(_, t)| t)
            .min()
            .expect("not empty");
        Some((msg, if seq == echo.seq { at } else { oldest }))
    }

    /// A reply to one of our requests came; `carried_data` tells whether it
    /// brought more than a keepalive (then more requests go out).
    pub fn replied(&mut self, carried_data: bool) {
        self.stats.replies += 1;
        if self.polling {
            self.pacer.replied(carried_data);
        }
    }

    /// How many bare requests to send now to keep the pacer's target out.
    pub fn polls_due(&mut self, now: Instant) -> usize {
        let before = self.pacer.outstanding();
        let due = self.pacer.polls_due(now);
        // Requests the pacer forgot just now went unanswered.
        let forgot = before - self.pacer.outstanding();
        self.stats.unanswered += forgot as u64;
        if self.polling { due } else { 0 }
    }

    /// Requests given up on so far (no reply within the request timeout).
    pub fn unanswered(&self) -> u64 {
        self.stats.unanswered
    }

    /// When [`IcmpClient::polls_due`] next has something to do.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.pacer.next_timeout().filter(|_| self.polling)
    }

    /// Counters and the pacer's state.
    pub fn stats(&self) -> IcmpClientStats {
        IcmpClientStats {
            outstanding: self.pacer.outstanding(),
            target: self.pacer.target(),
            ..self.stats
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

/// What an echo request that reached the server is.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// An ordinary ping: answer it with this payload, now.
    Ping(Request, &'a [u8]),
    /// A request carrying a tunnel message.
    Tunnel(Request, &'a [u8]),
}

/// The server half, one per ICMP socket: the requests held per session.
pub struct IcmpListener {
    family: Family,
    parking: Parking<SessionId, Request>,
    /// The receiver index of each session's latest request (see
    /// [`IcmpListener::park`]).
    indices: HashMap<SessionId, u32>,
}

impl IcmpListener {
    /// A listener for echo requests of `family`.
    pub fn new(family: Family) -> Self {
        Self {
            family,
            parking: Parking::new(Cadence::ICMP.hold),
            indices: HashMap::new(),
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

    /// Write the echo reply to `request` around the `len` bytes already at
    /// `buf[start..]` (`start` is [`HEADROOM`] for a tunnel message, the
    /// echo header's length for an ordinary ping's payload); returns its
    /// length.
    pub fn frame_reply(&self, request: Request, buf: &mut [u8], start: usize, len: usize) -> usize {
        if start == HEADROOM {
            icmp::emit_magic(buf);
        }
        let payload = start - icmp::ECHO_HEADER_LEN + len;
        icmp::emit_echo(self.family, true, request.id, request.seq, buf, payload)
    }

    /// Hold `request` of `session`, sealed under the keys of receiver index
    /// `index`. Requests held under older keys come back to be answered at
    /// once (with keepalives): after a rekey the client has sent fresh
    /// ones, and after a client restart the old ones belong to a process
    /// that is gone. Too many held lets the oldest go unanswered: answering
    /// it would cost a seal and a send per request under an upload, and
    /// ICMP needs no answer (a firewall only drops *unsolicited* replies);
    /// the client's pacer forgets it after its timeout. A message queued
    /// for the session answers the request at once: then `Some`.
    pub fn park(
        &mut self,
        now: Instant,
        session: SessionId,
        index: u32,
        request: Request,
        stale: &mut Vec<Request>,
    ) -> Option<(Request, &[u8])> {
        if self
            .indices
            .insert(session, index)
            .is_some_and(|old| old != index)
        {
            while let Some(r) = self.parking.take_parked(session) {
                stale.push(r);
            }
        }
        let reply = self.parking.request(session, request, now)?;
        Some((reply.request, reply.message?))
    }

    /// A held request of `session` to answer now, if there is one.
    pub fn take_parked(&mut self, session: SessionId) -> Option<Request> {
        self.parking.take_parked(session)
    }

    /// Queue a message for `session` until its next request.
    pub fn queue(&mut self, session: SessionId, message: &[u8]) {
        let _ = self.parking.downstream(session, message);
    }

    /// The next held request that waited its hold: answer it with a keepalive.
    pub fn expired(&mut self, now: Instant) -> Option<(SessionId, Request)> {
        self.parking.expired(now)
    }

    /// When the oldest held request expires.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.parking.next_timeout()
    }

    /// The session left this listener: forget its requests (they simply go
    /// unanswered; the client stopped counting on them) and its queue.
    pub fn release(&mut self, session: SessionId) {
        self.parking.remove(session);
        self.indices.remove(&session);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const SERVER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 9));

    #[test]
    fn a_request_the_listener_answers_is_a_reply_the_client_takes() {
        let now = Instant::now();
        let mut client = IcmpClient::with_start(SERVER, 77, Some(now));
        let mut buf = [0u8; 64];
        buf[HEADROOM..HEADROOM + 3].copy_from_slice(b"msg");
        let n = client.frame(now, &mut buf, 3);
        let listener = IcmpListener::new(Family::V4);
        let Some(Incoming::Tunnel(req, msg)) = listener.classify(CLIENT, Some(SERVER), &buf[..n])
        else {
            panic!("a tunnel request");
        };
        assert_eq!(
            (msg, req.id, req.seq, req.local),
            (&b"msg"[..], 77, 0, SERVER)
        );
        let mut reply = [0u8; 64];
        reply[HEADROOM..HEADROOM + 2].copy_from_slice(b"ok");
        let n = listener.frame_reply(req, &mut reply, HEADROOM, 2);
        assert_eq!(client.unwrap(SERVER, &reply[..n]), Some((&b"ok"[..], now)));
        assert_eq!(
            client.unwrap(CLIENT, &reply[..n]),
            None,
            "not from the server"
        );
        assert_eq!(
            listener.classify(CLIENT, None, &buf[..n]),
            None,
            "broadcasts get nothing"
        );
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
        let m = listener.frame_reply(req, &mut out, icmp::ECHO_HEADER_LEN, 4);
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
        let s = SessionId(0);
        let req = |seq| Request {
            ip: CLIENT,
            local: SERVER,
            id: 1,
            seq,
        };
        let mut stale = Vec::new();
        assert!(l.park(now, s, 10, req(1), &mut stale).is_none());
        assert!(l.park(now, s, 10, req(2), &mut stale).is_none());
        assert!(stale.is_empty());
        assert!(l.park(now, s, 11, req(3), &mut stale).is_none());
        assert_eq!(stale, [req(1), req(2)]);
        assert_eq!(l.take_parked(s), Some(req(3)));
    }

    #[test]
    fn a_client_not_in_use_sends_no_polls() {
        let now = Instant::now();
        let mut c = IcmpClient::new(SERVER, 1);
        assert_eq!(c.polls_due(now), 0);
        c.set_polling(true);
        assert_eq!(c.polls_due(now), Cadence::ICMP.min_outstanding);
    }
}

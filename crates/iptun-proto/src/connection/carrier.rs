//! One candidate path's transport, client side: how a tunnel message goes
//! on its wire and comes off it. Enum dispatch over the four transports.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::Remote;
use crate::transport::Kind;
use crate::transport::dns::client::DnsClient;
use crate::transport::http::{HttpClient, LEN_PREFIX, MAX_MESSAGE};
use crate::transport::icmp::{self, IcmpClient};
use crate::transport::poll::Cadence;

/// How a path reaches the server.
pub enum Carrier {
    /// UDP datagrams to the server's address.
    Udp {
        /// The server's address.
        server: SocketAddr,
    },
    /// ICMP echo requests to the server.
    Icmp(Box<IcmpClient>),
    /// DNS queries through resolvers.
    Dns(Box<DnsClient>),
    /// HTTP(S): the driver's connection carries framed batches.
    Http(HttpClient),
}

impl Carrier {
    pub(super) fn kind(&self) -> Kind {
        match self {
            Self::Udp { .. } => Kind::Udp,
            Self::Icmp(_) => Kind::Icmp,
            Self::Dns(_) => Kind::Dns,
            Self::Http(_) => Kind::Http,
        }
    }

    /// Bytes the transport writes in front of a tunnel message: a message
    /// is sealed at `buf[headroom..]` and framed around in place.
    pub(super) fn headroom(&self) -> usize {
        match self {
            Self::Udp { .. } | Self::Dns(_) => 0,
            Self::Icmp(_) => icmp::HEADROOM,
            Self::Http(_) => LEN_PREFIX,
        }
    }

    /// Put the `len`-byte message at `buf[headroom..]` on the wire: its
    /// wire form's length at `buf[..]`, or `None` when the transport
    /// queued it (DNS splits messages into queries, which come out of
    /// [`Carrier::poll_query`]). `prompt`: the server answers it at once
    /// (a probe, an init), out of turn on a polled path.
    pub(super) fn frame(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        len: usize,
        prompt: bool,
    ) -> Option<usize> {
        match self {
            Self::Udp { .. } => Some(len),
            Self::Icmp(c) => Some(c.frame(now, buf, len, prompt)),
            Self::Dns(c) => {
                c.send(now, &buf[..len]);
                None
            }
            Self::Http(_) if len > MAX_MESSAGE => None,
            Self::Http(_) => {
                buf[..LEN_PREFIX].copy_from_slice(&(len as u16).to_be_bytes());
                Some(LEN_PREFIX + len)
            }
        }
    }

    /// [`Carrier::frame`] for an inner packet: on ICMP it waits for the
    /// pacing when it must (it comes out of [`Carrier::poll_paced`]).
    pub(super) fn frame_packet(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        len: usize,
    ) -> Option<usize> {
        match self {
            Self::Icmp(c) => c.frame_packet(now, buf, len),
            _ => self.frame(now, buf, len, false),
        }
    }

    /// An inner packet that waited for the pacing and may go now, framed
    /// into `buf`.
    pub(super) fn poll_paced(&mut self, now: Instant, buf: &mut [u8]) -> Option<usize> {
        match self {
            Self::Icmp(c) => c.poll_queued(now, buf),
            _ => None,
        }
    }

    /// Where the driver sends what [`Carrier::frame`] made.
    pub(super) fn destination(&self) -> Remote {
        match self {
            Self::Udp { server } => Remote::Addr(*server),
            Self::Icmp(c) => Remote::Addr(SocketAddr::new(c.server(), 0)),
            Self::Dns(c) => Remote::Resolver(c.resolver()),
            Self::Http(_) => Remote::Connection,
        }
    }

    /// The server's address on the underlay, if the path talks to it directly.
    pub(super) fn server_ip(&self) -> Option<IpAddr> {
        match self {
            Self::Udp { server } => Some(server.ip()),
            Self::Icmp(c) => Some(c.server()),
            Self::Dns(_) | Self::Http(_) => None,
        }
    }

    /// How long traffic sent on the path may go unanswered before the path
    /// counts as dead: the server's longest hold, plus room for a round
    /// trip and for the path's own recovery (a resolver's retry, a proxy).
    pub(super) fn liveness(&self) -> Duration {
        match self {
            Self::Udp { .. } => Duration::from_secs(4),
            Self::Dns(_) => Duration::from_secs(4),
            Self::Icmp(_) => Cadence::ICMP.hold + Duration::from_secs(3),
            Self::Http(_) => Duration::from_secs(5),
        }
    }

    /// Whether the server answers a keepalive at once here (push paths);
    /// on polled paths a keepalive is a request, answered at the hold.
    pub(super) fn answers_at_once(&self) -> bool {
        matches!(self, Self::Udp { .. } | Self::Http(_))
    }

    /// Whether silence on the path in use is checked with probes. Not on
    /// DNS: there every answer comes within the server's short hold, and
    /// probe queries timing out would count against the record type and
    /// name length in use (the uplink steps those down on timeouts).
    pub(super) fn nudges(&self) -> bool {
        !matches!(self, Self::Dns(_))
    }

    /// How long a probe may go unanswered.
    pub(super) fn probe_timeout(&self) -> Duration {
        match self {
            // Opening the connection (TCP, proxy, TLS, upgrade) comes first.
            Self::Http(c) if !c.is_open() => Duration::from_secs(12),
            _ => Duration::from_secs(3),
        }
    }

    /// Keep requests outstanding (the path is in use and the session up), or not.
    pub(super) fn set_polling(&mut self, on: bool) {
        match self {
            Self::Icmp(c) => c.set_polling(on),
            Self::Dns(c) => c.set_polling(on),
            Self::Udp { .. } | Self::Http(_) => {}
        }
    }

    /// When the transport's own timers next need [`Carrier::handle_timeout`]
    /// or [`Carrier::poll_transmit`].
    pub(super) fn next_timeout(&self) -> Option<Instant> {
        match self {
            Self::Udp { .. } => None,
            Self::Icmp(c) => c.next_timeout(),
            Self::Dns(c) => c.next_timeout(),
            Self::Http(c) => c.next_timeout(),
        }
    }

    pub(super) fn handle_timeout(&mut self, now: Instant) {
        match self {
            Self::Dns(c) => c.handle_timeout(now),
            // Let the client give up on requests that went unanswered (the
            // polls it asks for go out with the next transmits).
            Self::Icmp(c) => {
                c.polls_due(now);
            }
            Self::Udp { .. } | Self::Http(_) => {}
        }
    }

    /// A DNS query the uplink wants sent now, copied into `buf`.
    pub(super) fn poll_query(&mut self, now: Instant, buf: &mut [u8]) -> Option<(Remote, usize)> {
        let Self::Dns(c) = self else { return None };
        let (to, q) = c.poll_query(now)?;
        let out = buf.get_mut(..q.bytes.len())?;
        out.copy_from_slice(&q.bytes);
        Some((Remote::Resolver(to), q.bytes.len()))
    }
}

//! What a connection tells about its paths, for `iptun status`.

use std::time::{Duration, Instant};

use super::{Carrier, Connection, PathId};
use crate::transport::Kind;
use crate::transport::http;

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
    /// The DNS path: its resolvers, tag, parameters and counters.
    Dns {
        /// The resolver carrying the most (its number).
        resolver: usize,
        /// The client's tag.
        tag: u32,
        /// Parameters, each resolver's state, and counters.
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

impl Connection {
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
                        tag: dns.tag(),
                        info: Box::new(dns.path_info(now)),
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

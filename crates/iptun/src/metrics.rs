//! `--metrics ADDR:PORT`: Prometheus metrics at `/metrics`.
//!
//! A small HTTP responder (hyper) runs beside the event loop. Each scrape
//! asks the loop for a snapshot ([`Request::Metrics`]): the loop fills a
//! fresh registry from the endpoint's or connection's counters (as cheap
//! as a status), and the responder encodes it. Prometheus' text format by
//! default, OpenMetrics when the scraper asks for it.
//!
//! Names follow Prometheus' conventions: `iptun_` first, base units
//! (bytes, seconds), counters ending in `_total` (added by the encoder).
//! What each series means is in its HELP text and in the README.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, StatusCode, header};
use iptun_proto::DropReason;
use iptun_proto::connection::{Connection, PathDetail};
use iptun_proto::endpoint::Endpoint;
use iptun_proto::engine::{HandshakeCounters, Traffic};
use prometheus_client::encoding::{prometheus_text, text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};

use crate::client::transport_name;
use crate::service::{self, Request};
use crate::url::ServerUrl;

/// Scrapes served at once; more connections wait in the kernel's backlog.
const MAX_SCRAPERS: usize = 8;
/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The metrics flags, checked.
#[derive(Clone, Debug)]
pub struct Settings {
    pub addr: SocketAddr,
    /// Series per client (server only).
    pub per_client: bool,
}

impl Settings {
    /// `--metrics ADDR:PORT` and its companions; `None` without `--metrics`.
    pub fn parse(
        addr: Option<&str>,
        public: bool,
        per_client: bool,
    ) -> anyhow::Result<Option<Self>> {
        let Some(text) = addr else {
            anyhow::ensure!(!public, "--metrics-public: give --metrics ADDR:PORT too");
            return Ok(None);
        };
        let addr: SocketAddr = text.parse().with_context(|| {
            format!("--metrics `{text}`: expected ADDR:PORT (e.g. 127.0.0.1:9100)")
        })?;
        anyhow::ensure!(
            public || addr.ip().is_loopback(),
            "--metrics {addr}: not a loopback address, and the metrics tell who is connected and \
             how much each one sends; add --metrics-public to serve them there anyway"
        );
        Ok(Some(Self { addr, per_client }))
    }
}

/// Bind the metrics port: a port in use is an error naming it.
pub fn bind(settings: &Settings) -> anyhow::Result<TcpListener> {
    let addr = settings.addr;
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("--metrics {addr}: the port is in use (another iptun or exporter?)")
        } else {
            anyhow::anyhow!("--metrics {addr}: {e}")
        }
    })?;
    listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(listener).context("--metrics")?;
    tracing::info!("metrics on http://{}/metrics", listener.local_addr()?);
    Ok(listener)
}

/// Serve `/metrics` on `listener` until the loop's end of `requests` closes.
pub fn spawn(listener: TcpListener, requests: mpsc::Sender<Request>) {
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(MAX_SCRAPERS));
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: try again a little later.
                    tracing::debug!("metrics: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if requests.is_closed() {
                return;
            }
            let requests = requests.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |r| respond(r, requests.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(REQUEST_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                drop(permit);
            });
        }
    });
}

type Response = hyper::Response<Full<Bytes>>;

async fn respond(
    request: hyper::Request<Incoming>,
    requests: mpsc::Sender<Request>,
) -> Result<Response, Infallible> {
    if request.uri().path() != "/metrics" {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            "iptun: metrics are at /metrics\n",
        ));
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n"));
    }
    let openmetrics = request.headers().get_all(header::ACCEPT).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.contains("application/openmetrics-text"))
    });
    let Some(registry) = service::ask(&requests, Request::Metrics).await else {
        return Ok(plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "iptun is stopping\n",
        ));
    };
    let mut body = String::new();
    let content_type = if openmetrics {
        text::encode(&mut body, &registry).map(|()| OPENMETRICS)
    } else {
        prometheus_text::encode(&mut body, &registry).map(|()| prometheus_text::CONTENT_TYPE)
    };
    Ok(match content_type {
        Ok(t) => hyper::Response::builder()
            .header(header::CONTENT_TYPE, t)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response"),
        Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
    })
}

fn plain(status: StatusCode, text: &'static str) -> Response {
    hyper::Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(text.as_bytes())))
        .expect("a valid response")
}

// ------------------------------------------------------------ the series

type Labels = Vec<(&'static str, String)>;
type GaugeF64 = Gauge<f64, AtomicU64>;

/// A registry being filled from one snapshot: each metric is registered
/// at its first value, its label sets added as they come.
#[derive(Default)]
struct Snapshot {
    registry: Registry,
    counters: Vec<(&'static str, Family<Labels, Counter>)>,
    gauges: Vec<(&'static str, Family<Labels, GaugeF64>)>,
}

impl Snapshot {
    /// Counter `name` (without `_total`) with `labels` is at `value`.
    fn counter(&mut self, name: &'static str, help: &str, labels: &Labels, value: u64) {
        let family = match self.counters.iter().find(|(n, _)| *n == name) {
            Some((_, f)) => f.clone(),
            None => {
                let f = Family::<Labels, Counter>::default();
                self.registry.register(name, help, f.clone());
                self.counters.push((name, f.clone()));
                f
            }
        };
        family.get_or_create(labels).inc_by(value);
    }

    /// Gauge `name` with `labels` is at `value`.
    fn gauge(&mut self, name: &'static str, help: &str, labels: &Labels, value: f64) {
        let family = match self.gauges.iter().find(|(n, _)| *n == name) {
            Some((_, f)) => f.clone(),
            None => {
                let f = Family::<Labels, GaugeF64>::default();
                self.registry.register(name, help, f.clone());
                self.gauges.push((name, f.clone()));
                f
            }
        };
        family.get_or_create(labels).set(value);
    }

    /// Inner traffic, four counters.
    fn traffic(&mut self, prefix: Prefix, labels: &Labels, t: Traffic) {
        let (p, whose) = (prefix.0, prefix.1);
        self.counter(
            p[0],
            &format!("Inner IP bytes received {whose}"),
            labels,
            t.rx_bytes,
        );
        self.counter(
            p[1],
            &format!("Inner IP packets received {whose}"),
            labels,
            t.rx_packets,
        );
        self.counter(
            p[2],
            &format!("Inner IP bytes sent {whose}"),
            labels,
            t.tx_bytes,
        );
        self.counter(
            p[3],
            &format!("Inner IP packets sent {whose}"),
            labels,
            t.tx_packets,
        );
    }

    fn finish(self) -> Registry {
        self.registry
    }
}

/// The four traffic counters' names, and whose traffic they count.
type Prefix = ([&'static str; 4], &'static str);

const LISTENER_TRAFFIC: Prefix = (
    [
        "iptun_received_bytes",
        "iptun_received_packets",
        "iptun_sent_bytes",
        "iptun_sent_packets",
    ],
    "through this listener (keepalives and probes not counted)",
);
const CLIENT_TRAFFIC: Prefix = (
    [
        "iptun_client_received_bytes",
        "iptun_client_received_packets",
        "iptun_client_sent_bytes",
        "iptun_client_sent_packets",
    ],
    "from / to this client (received: from it; sent: to it)",
);
const TUNNEL_TRAFFIC: Prefix = (
    [
        "iptun_received_bytes",
        "iptun_received_packets",
        "iptun_sent_bytes",
        "iptun_sent_packets",
    ],
    "through the tunnel (keepalives and probes not counted)",
);

fn with(labels: &Labels, key: &'static str, value: impl Into<String>) -> Labels {
    let mut l = labels.clone();
    l.push((key, value.into()));
    l
}

/// A short id for a client key: the first 8 characters of its base64 (as
/// `iptun status` and the allow file show it), 48 bits: unique enough.
pub fn key_id(key: &iptun_proto::crypto::PublicKey) -> String {
    key.to_base64().chars().take(8).collect()
}

/// Seconds since the Unix epoch of an instant in the past.
fn unix_seconds(then: Instant, now: Instant) -> f64 {
    let at = SystemTime::now() - now.saturating_duration_since(then);
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn handshakes(m: &mut Snapshot, labels: &Labels, h: HandshakeCounters) {
    for (result, n) in h.by_result() {
        m.counter(
            "iptun_handshakes",
            "Handshakes received, by result: ok, refused (key not admitted, or no address \
             left), rate_limited (the source's share of the handshake budget spent), \
             under_load (no budget left), cookie_sent (answered with a cookie, under load), \
             invalid (not authentic or replayed)",
            &with(labels, "result", result),
            n,
        );
    }
}

/// One listener of a server, as metrics name it.
pub struct ListenerLabel {
    /// `udp`, `icmp`, `dns`, `https` or `http`.
    pub transport: &'static str,
    /// Its URL (`udp://0.0.0.0:3000`).
    pub url: String,
}

/// A server's metrics.
pub fn server(
    ep: &Endpoint,
    listeners: &[ListenerLabel],
    per_client: bool,
    http_queue_full: u64,
) -> Registry {
    let mut m = Snapshot::default();
    let admitted = ep.engine().allowed_count() as f64;
    m.gauge(
        "iptun_admitted_keys",
        "Client keys the server admits",
        &vec![],
        admitted,
    );
    for (l, label) in ep.listeners().into_iter().zip(listeners) {
        let labels = vec![
            ("transport", label.transport.to_owned()),
            ("listener", label.url.clone()),
        ];
        m.gauge(
            "iptun_sessions",
            "Client sessions whose path is on this listener now",
            &labels,
            l.sessions as f64,
        );
        m.traffic(LISTENER_TRAFFIC, &labels, l.traffic);
        handshakes(&mut m, &labels, l.handshakes);
        let drops = DropReason::ALL.iter().map(|&r| (r.name(), l.drops.get(r)));
        for (reason, n) in drops.chain(l.transport_drops.iter().copied()) {
            m.counter(
                "iptun_dropped_messages",
                "Messages that came in on this listener and were dropped, by reason",
                &with(&labels, "reason", reason),
                n,
            );
        }
        if let Some(dns) = l.dns {
            dns_listener(&mut m, &labels, &dns);
        }
    }
    let (tun_drops, tun_full) = ep.tun_drops();
    let drops = DropReason::ALL
        .iter()
        .map(|&r| (r.name(), tun_drops.get(r)));
    for (reason, n) in drops.chain([("tun_full", tun_full)]) {
        m.counter(
            "iptun_tun_dropped_packets",
            "Packets from the TUN device not sent to a client (no_route: no client has the \
             address), and opened packets not written to it (tun_full), by reason",
            &vec![("reason", reason.to_owned())],
            n,
        );
    }
    m.counter(
        "iptun_http_queue_full",
        "Messages for WebSocket clients dropped because their send queue was full",
        &vec![],
        http_queue_full,
    );
    if per_client {
        clients(&mut m, ep, listeners);
    }
    m.finish()
}

/// Per client series, labelled by [`key_id`].
fn clients(m: &mut Snapshot, ep: &Endpoint, listeners: &[ListenerLabel]) {
    let now = Instant::now();
    for s in ep.sessions() {
        let labels = vec![("client", key_id(&s.key))];
        let listener = s.path.as_ref().and_then(|p| listeners.get(p.listener()));
        let info = vec![
            ("client", key_id(&s.key)),
            ("key", s.key.to_base64()),
            ("address", s.lease.v4.to_string()),
            (
                "transport",
                listener.map_or("none", |l| l.transport).to_owned(),
            ),
            (
                "listener",
                listener.map(|l| l.url.clone()).unwrap_or_default(),
            ),
        ];
        m.gauge(
            "iptun_client_info",
            "A client with a session: its key, tunnel address and the listener in use (always 1)",
            &info,
            1.0,
        );
        m.traffic(CLIENT_TRAFFIC, &labels, s.traffic);
        for (reason, n) in s.drops.nonzero() {
            m.counter(
                "iptun_client_dropped_messages",
                "Messages of this client dropped, by reason",
                &with(&labels, "reason", reason.name()),
                n,
            );
        }
        if let Some(t) = s.last_handshake {
            m.gauge(
                "iptun_client_last_handshake_timestamp_seconds",
                "When this client's latest handshake completed (Unix time)",
                &labels,
                unix_seconds(t, now),
            );
        }
    }
}

fn dns_listener(
    m: &mut Snapshot,
    labels: &Labels,
    s: &iptun_proto::transport::dns::server::ListenerStats,
) {
    let counters: [(&'static str, &str, u64); 6] = [
        (
            "iptun_dns_queries",
            "Tunnel queries received (resolver retries included)",
            s.queries,
        ),
        (
            "iptun_dns_retries",
            "Resolver retries of queries already seen",
            s.retries,
        ),
        (
            "iptun_dns_apex_queries",
            "Queries in the tunnel domain without tunnel data",
            s.apex,
        ),
        (
            "iptun_dns_data_answers",
            "Answers carrying tunnel data",
            s.answered_data,
        ),
        (
            "iptun_dns_empty_answers",
            "Answers carrying no tunnel data",
            s.answered_empty,
        ),
        (
            "iptun_dns_superseded_queries",
            "Held queries left unanswered because the resolver retried them",
            s.superseded,
        ),
    ];
    for (name, help, n) in counters {
        m.counter(name, help, labels, n);
    }
}

/// A client's metrics. `urls` are its paths, in the connection's order.
pub fn client(conn: &Connection, urls: &[ServerUrl]) -> Registry {
    let now = Instant::now();
    let mut m = Snapshot::default();
    let none = vec![];
    m.traffic(TUNNEL_TRAFFIC, &none, conn.traffic());
    let drops = conn.drops();
    for r in DropReason::ALL {
        m.counter(
            "iptun_dropped_messages",
            "Messages and packets the client dropped, by reason",
            &vec![("reason", r.name().to_owned())],
            drops.get(r),
        );
    }
    let up = if conn.is_connected(now) { 1.0 } else { 0.0 };
    m.gauge(
        "iptun_tunnel_up",
        "Whether the session has keys in use (1) or not (0)",
        &none,
        up,
    );
    if let Some(t) = conn.engine().last_handshake() {
        m.gauge(
            "iptun_last_handshake_timestamp_seconds",
            "When the latest handshake completed (Unix time)",
            &none,
            unix_seconds(t, now),
        );
    }
    let st = conn.status(now);
    m.counter(
        "iptun_moves",
        "Moves of the session from one path to another",
        &none,
        st.moves,
    );
    let searching = if st.searching { 1.0 } else { 0.0 };
    m.gauge(
        "iptun_searching",
        "Whether the path in use failed and the others are being probed",
        &none,
        searching,
    );
    for (i, (p, url)) in st.paths.iter().zip(urls).enumerate() {
        let labels = vec![
            ("url", url.to_string()),
            ("transport", transport_name(url).to_owned()),
        ];
        path(&mut m, &labels, p, i == st.current);
    }
    m.finish()
}

/// One candidate path of a client.
fn path(m: &mut Snapshot, labels: &Labels, p: &iptun_proto::connection::PathStatus, in_use: bool) {
    m.gauge(
        "iptun_path_in_use",
        "Whether this path carries the session (1) or not (0): the transport in use",
        labels,
        if in_use { 1.0 } else { 0.0 },
    );
    for state in ["untried", "in_use", "standby", "failed"] {
        let now = p.state.as_str().replace(' ', "_") == state;
        m.gauge(
            "iptun_path_state",
            "The path's state: untried, in_use, standby or failed (1 for the current one)",
            &with(labels, "state", state),
            if now { 1.0 } else { 0.0 },
        );
    }
    m.counter(
        "iptun_path_failures",
        "Times the path failed",
        labels,
        p.failures,
    );
    if let Some(rtt) = p.rtt {
        m.gauge(
            "iptun_path_rtt_seconds",
            "Round-trip time of the path's last probe (or handshake)",
            labels,
            rtt.as_secs_f64(),
        );
    }
    match &p.detail {
        PathDetail::Udp => {}
        PathDetail::Icmp(s) => {
            m.counter(
                "iptun_icmp_requests",
                "Echo requests sent",
                labels,
                s.requests,
            );
            m.counter(
                "iptun_icmp_replies",
                "Echo replies taken",
                labels,
                s.replies,
            );
            m.counter(
                "iptun_icmp_unanswered",
                "Echo requests given up on without a reply",
                labels,
                s.unanswered,
            );
            m.gauge(
                "iptun_icmp_outstanding_requests",
                "Echo requests the server holds now",
                labels,
                s.outstanding as f64,
            );
            m.gauge(
                "iptun_icmp_window_requests",
                "Echo requests the client keeps outstanding",
                labels,
                s.target as f64,
            );
        }
        PathDetail::Dns { info, .. } => dns_path(m, labels, info),
        PathDetail::Http(h) => {
            m.counter(
                "iptun_http_reconnects",
                "Reconnections of the HTTP path",
                labels,
                h.reconnects,
            );
            let c = if h.connected { 1.0 } else { 0.0 };
            m.gauge(
                "iptun_http_connected",
                "Whether the HTTP path is connected",
                labels,
                c,
            );
        }
    }
}

fn dns_path(m: &mut Snapshot, labels: &Labels, p: &iptun_proto::transport::dns::client::PathInfo) {
    let s = p.stats;
    let counters: [(&'static str, &str, u64); 20] = [
        (
            "iptun_dns_queries",
            "Queries sent (data and polls)",
            s.queries,
        ),
        (
            "iptun_dns_data_queries",
            "Queries that carried a fragment",
            s.data_queries,
        ),
        ("iptun_dns_answers", "Answers taken", s.answers),
        (
            "iptun_dns_data_answers",
            "Answers that carried fragments",
            s.data_answers,
        ),
        ("iptun_dns_timeouts", "Queries that timed out", s.timeouts),
        ("iptun_dns_servfails", "SERVFAIL answers", s.servfails),
        ("iptun_dns_refused", "REFUSED answers", s.refused),
        ("iptun_dns_truncated", "Truncated answers", s.truncated),
        (
            "iptun_dns_errors",
            "Answers with other error codes",
            s.errors,
        ),
        ("iptun_dns_retried", "Fragments sent again", s.retried),
        (
            "iptun_dns_lost",
            "Upstream fragments or messages given up on",
            s.lost,
        ),
        (
            "iptun_dns_fallbacks",
            "Times the path parameters stepped down",
            s.fallbacks,
        ),
        (
            "iptun_dns_reprobes",
            "Times the full parameters were tried again",
            s.reprobes,
        ),
        (
            "iptun_dns_encoding_probes",
            "Queries probing a denser encoding",
            s.encoding_probes,
        ),
        (
            "iptun_dns_encoding_failures",
            "Encoding probes that failed",
            s.encoding_failures,
        ),
        (
            "iptun_dns_type_probes",
            "Queries probing a better record type",
            s.type_probes,
        ),
        (
            "iptun_dns_type_probe_failures",
            "Record type probes that failed",
            s.type_probe_failures,
        ),
        (
            "iptun_dns_type_fallbacks",
            "Times the record type stepped down",
            s.type_fallbacks,
        ),
        (
            "iptun_dns_unexpected",
            "Responses that matched no query, or did not parse",
            s.unexpected,
        ),
        (
            "iptun_dns_resolvers_set_aside",
            "Times a resolver was set aside (silent or lossy)",
            s.set_asides,
        ),
    ];
    for (name, help, n) in counters {
        m.counter(name, help, labels, n);
    }
    m.gauge(
        "iptun_dns_in_flight_queries",
        "Queries in flight now",
        labels,
        p.in_flight as f64,
    );
    m.gauge(
        "iptun_dns_window_queries",
        "The congestion window, in queries",
        labels,
        p.window as f64,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_flags() {
        let ok = Settings::parse(Some("127.0.0.1:9100"), false, true)
            .unwrap()
            .unwrap();
        assert_eq!(ok.addr, "127.0.0.1:9100".parse().unwrap());
        assert!(
            Settings::parse(Some("[::1]:9100"), false, true)
                .unwrap()
                .is_some()
        );
        let err = Settings::parse(Some("0.0.0.0:9100"), false, true).unwrap_err();
        assert!(err.to_string().contains("--metrics-public"), "{err}");
        assert!(
            Settings::parse(Some("0.0.0.0:9100"), true, true)
                .unwrap()
                .is_some()
        );
        let err = Settings::parse(Some("localhost"), false, true).unwrap_err();
        assert!(err.to_string().contains("ADDR:PORT"), "{err:#}");
        assert!(Settings::parse(None, true, true).is_err());
        assert!(Settings::parse(None, false, true).unwrap().is_none());
    }

    fn encode(r: &Registry) -> String {
        let mut text = String::new();
        prometheus_text::encode(&mut text, r).unwrap();
        text
    }

    #[test]
    fn a_server_has_series_for_every_listener_and_transport() {
        use iptun_proto::crypto::PrivateKey;
        use iptun_proto::endpoint::ListenerConfig;
        use iptun_proto::engine::ServerConfig;
        use iptun_proto::pool::AddressPool;
        use iptun_proto::wire::dns::Domain;
        use iptun_proto::wire::icmp::Family;

        let pool = AddressPool::new("10.1.0.0/24".parse().unwrap(), None).unwrap();
        let config = ServerConfig::new(PrivateKey::generate(), vec![], pool);
        let domain = Domain::new("t.example.com").unwrap();
        let kinds = vec![
            ListenerConfig::Udp,
            ListenerConfig::Icmp(Family::V4),
            ListenerConfig::Dns(domain),
            ListenerConfig::Http,
        ];
        let ep = Endpoint::new(config, kinds, Instant::now());
        let labels: Vec<ListenerLabel> = [
            ("udp", "udp://0.0.0.0:3000"),
            ("icmp", "icmp://0.0.0.0"),
            ("dns", "dns://0.0.0.0:53?domain=t.example.com"),
            ("https", "https://0.0.0.0:443/t"),
        ]
        .map(|(transport, url)| ListenerLabel {
            transport,
            url: url.to_owned(),
        })
        .into();
        let text = encode(&server(&ep, &labels, true, 0));
        for l in &labels {
            let series = format!("transport=\"{}\",listener=\"{}\"", l.transport, l.url);
            for name in [
                "iptun_sessions",
                "iptun_received_bytes_total",
                "iptun_sent_packets_total",
            ] {
                assert!(
                    text.contains(&format!("{name}{{{series}}} 0")),
                    "{name} {series}:\n{text}"
                );
            }
            let ok = format!("iptun_handshakes_total{{{series},result=\"ok\"}} 0");
            assert!(text.contains(&ok), "{text}");
        }
        for reason in [
            "icmp_queue_full",
            "dns_refused",
            "http_mailbox_dropped",
            "not_allowed",
        ] {
            assert!(
                text.contains(&format!("reason=\"{reason}\"}} 0")),
                "{reason}:\n{text}"
            );
        }
        assert!(
            text.contains("iptun_dns_queries_total{transport=\"dns\""),
            "{text}"
        );
        assert!(text.contains("iptun_tun_dropped_packets_total{reason=\"tun_full\"} 0"));
        assert!(text.contains("iptun_admitted_keys 0"), "{text}");
    }

    #[test]
    fn a_client_has_series_for_every_path() {
        use iptun_proto::connection::PathConfig;
        use iptun_proto::crypto::PrivateKey;
        use iptun_proto::engine::ClientConfig;
        use iptun_proto::transport::http::Mode;

        let config = ClientConfig::new(PrivateKey::generate(), PrivateKey::generate().public_key());
        let paths = vec![
            PathConfig::Udp {
                server: "192.0.2.1:3000".parse().unwrap(),
            },
            PathConfig::Icmp {
                server: "192.0.2.1".parse().unwrap(),
                id: 7,
            },
            PathConfig::Http { mode: Mode::Auto },
        ];
        let conn = Connection::new(config, paths, Instant::now(), 1);
        let urls: Vec<ServerUrl> = ["udp://192.0.2.1:3000", "icmp://192.0.2.1", "https://h/t"]
            .iter()
            .map(|u| u.parse().unwrap())
            .collect();
        let text = encode(&client(&conn, &urls));
        let udp = "url=\"udp://192.0.2.1:3000\",transport=\"udp\"";
        assert!(
            text.contains(&format!("iptun_path_in_use{{{udp}}} 1")),
            "{text}"
        );
        let https = format!("url=\"{}\",transport=\"https\"", urls[2]);
        assert!(
            text.contains(&format!("iptun_path_in_use{{{https}}} 0")),
            "{text}"
        );
        assert!(
            text.contains(&format!("iptun_http_reconnects_total{{{https}}} 0")),
            "{text}"
        );
        assert!(
            text.contains("iptun_icmp_requests_total{url=\"icmp://192.0.2.1\""),
            "{text}"
        );
        assert!(text.contains("iptun_moves_total 0"), "{text}");
        assert!(text.contains("iptun_tunnel_up 0"), "{text}");
    }

    #[test]
    fn counters_get_total_and_both_formats_encode() {
        let mut m = Snapshot::default();
        let l = vec![("transport", "udp".to_owned())];
        m.counter("iptun_x_bytes", "Some bytes", &l, 7);
        m.counter("iptun_x_bytes", "Some bytes", &with(&l, "k", "v"), 1);
        m.gauge("iptun_y", "A gauge", &vec![], 1.5);
        let r = m.finish();
        let mut prom = String::new();
        prometheus_text::encode(&mut prom, &r).unwrap();
        assert!(
            prom.contains("# TYPE iptun_x_bytes_total counter"),
            "{prom}"
        );
        assert!(
            prom.contains("iptun_x_bytes_total{transport=\"udp\"} 7"),
            "{prom}"
        );
        assert!(
            prom.contains("iptun_x_bytes_total{transport=\"udp\",k=\"v\"} 1"),
            "{prom}"
        );
        assert!(prom.contains("iptun_y 1.5"), "{prom}");
        let mut om = String::new();
        text::encode(&mut om, &r).unwrap();
        assert!(om.ends_with("# EOF\n"), "{om}");
    }
}

//! DNS over TLS (RFC 7858) and DNS over HTTPS (RFC 8484) to a resolver: a
//! task per resolver carries a DNS path's queries over one connection,
//! opened when there is something to send, reused for every query, closed
//! when idle, and opened again (with back-off) when it breaks.
//!
//! The DNS messages are the core's, byte for byte: the transport to the
//! resolver changes nothing in them, and which query an answer belongs to
//! is the core's business too (by DNS id), so answers may come in any
//! order. Many queries are in flight on a connection at once: pipelined on
//! DoT (each message behind its 2-byte length), one HTTP/2 stream each on
//! DoH (a `POST` of `application/dns-message`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use super::http_client::{self, Proxy, Stream};
use crate::url::HttpUrl;

/// Queries waiting for a resolver's connection; more are dropped (and
/// counted): the core times them out and keeps its own pace.
pub const QUERY_QUEUE: usize = 256;
/// Time to open a connection (TCP, a proxy's CONNECT, TLS, HTTP/2).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with nothing in flight for this long is closed (RFC 7858
/// asks clients to close idle connections; the core's polls keep the one
/// of the path in use busy).
pub const IDLE_CLOSE: Duration = Duration::from_secs(30);
/// Queries in flight and nothing heard for this long: the connection is
/// taken for dead (the server holds a query well under a second, and a
/// resolver answers SERVFAIL within a few seconds when the server is slow).
pub const DEAD_AFTER: Duration = Duration::from_secs(10);
/// The first wait before connecting again after a failure; it doubles up
/// to [`BACKOFF_MAX`] while connecting keeps failing.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The largest DNS message (a 2-byte length on DoT).
const MAX_MESSAGE: usize = 65535;
/// The media type of DoH bodies.
const DNS_MESSAGE: &str = "application/dns-message";
/// DoH exchanges one HTTP/2 connection carries before another opens:
/// resolvers cap the streams of a connection (unbound at 100), and held
/// polls keep theirs for up to 600 ms. Beyond the cap, requests waited
/// inside the connection, the client took them for lost and cut its
/// window: downloads through unbound over DoH ran at a fifth of DoT's.
const STREAMS_PER_CONNECTION: usize = 90;
/// HTTP/2 connections to one DoH resolver at most.
const MAX_DOH_CONNECTIONS: usize = 4;

/// How queries reach the resolver.
#[derive(Clone, Debug)]
pub enum Protocol {
    /// DNS over TLS.
    Tls,
    /// DNS over HTTPS to `url`, through `proxy` (by `CONNECT`) if any.
    Https { url: HttpUrl, proxy: Option<Proxy> },
}

/// Everything a resolver's task needs.
pub struct Config {
    /// The resolver's number in its DNS path.
    pub resolver: usize,
    /// As users wrote it (`tls://...`, `https://...`), for logs.
    pub name: String,
    /// The first hop: the resolver's address, or the proxy's.
    pub connect_to: SocketAddr,
    /// The name its certificate must show (a host name or an IP address).
    pub server_name: ServerName<'static>,
    /// TLS settings offering the protocol's ALPN (none for DoT, `h2` for DoH).
    pub tls: Arc<rustls::ClientConfig>,
    pub protocol: Protocol,
}

/// From the resolvers' tasks to the client loop.
#[derive(Debug)]
pub enum FromResolver {
    /// A DNS message from resolver number `resolver`.
    Answer { resolver: usize, bytes: Bytes },
    /// What became of resolver number `resolver`'s connection.
    Link { resolver: usize, event: LinkEvent },
}

/// A resolver connection's news.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// Connected (TLS and, for DoH, HTTP/2 are up).
    Connected,
    /// The connection ended (idle, or broken: why).
    Closed(String),
    /// Connecting failed (why); the next try waits a back-off.
    Failed(String),
}

/// A resolver's connection task and the queue of queries to it.
pub struct Link {
    queries: mpsc::Sender<Bytes>,
    /// Queries dropped: the queue was full, or they waited out a back-off.
    dropped: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Link {
    /// Start the resolver's task; it connects at the first query.
    pub fn spawn(config: Config, up: mpsc::Sender<FromResolver>) -> Self {
        let (queries, rx) = mpsc::channel(QUERY_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run(config, rx, up, dropped.clone()));
        Self {
            queries,
            dropped,
            task,
        }
    }

    /// Queue a query without waiting; a full queue drops it (counted).
    pub fn send(&self, query: &[u8]) {
        if self
            .queries
            .try_send(Bytes::copy_from_slice(query))
            .is_err()
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queries dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Connect when a query comes, carry queries until the connection ends,
/// again; after a failure wait a back-off, dropping what queued meanwhile
/// (the core has timed those out by then).
async fn run(
    config: Config,
    mut queries: mpsc::Receiver<Bytes>,
    up: mpsc::Sender<FromResolver>,
    dropped: Arc<AtomicU64>,
) {
    let mut backoff = BACKOFF_MIN;
    while let Some(first) = queries.recv().await {
        let mut answered = false;
        let link = Carry {
            queries: &mut queries,
            up: &up,
            resolver: config.resolver,
            answered: &mut answered,
        };
        // A connection that never brought an answer failed, whatever
        // broke it (refused, TLS, a wrong DoH path, silence).
        let event = match connect_and_carry(&config, first, link).await {
            Ok(()) => LinkEvent::Closed("idle".into()),
            Err(e) if answered => LinkEvent::Closed(format!("{e:#}")),
            Err(e) => LinkEvent::Failed(format!("{e:#}")),
        };
        let failed = matches!(event, LinkEvent::Failed(_));
        if !report(&up, config.resolver, event).await {
            return;
        }
        if answered {
            backoff = BACKOFF_MIN;
        }
        if failed {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            while queries.try_recv().is_ok() {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Tell the client loop; false when it is gone.
async fn report(up: &mpsc::Sender<FromResolver>, resolver: usize, event: LinkEvent) -> bool {
    up.send(FromResolver::Link { resolver, event })
        .await
        .is_ok()
}

/// Open a connection, say so, carry queries on it until it ends: `Ok`
/// when it went idle (or the client loop is gone).
async fn connect_and_carry(config: &Config, first: Bytes, link: Carry<'_>) -> anyhow::Result<()> {
    match &config.protocol {
        Protocol::Tls => {
            let stream = open_dot(config).await?;
            if !link.connected().await {
                return Ok(());
            }
            quick_ack(&stream);
            carry_dot(stream, first, link, quick_ack).await
        }
        Protocol::Https { url, proxy } => {
            let open = || open_doh(config, url, proxy.as_ref());
            let stream = open().await?;
            if !link.connected().await {
                return Ok(());
            }
            carry_doh(stream, url, first, link, open).await
        }
    }
}

/// TCP to the first hop, Nagle off.
async fn tcp(config: &Config) -> anyhow::Result<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(config.connect_to)
        .await
        .with_context(|| format!("connecting to {}", config.connect_to))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// TLS over `stream`, the resolver's name checked; all within
/// [`CONNECT_TIMEOUT`] with what came before it (`stream`).
async fn tls<S: AsyncRead + AsyncWrite + Unpin>(
    config: &Config,
    stream: impl Future<Output = anyhow::Result<S>>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<S>> {
    let open = async {
        tokio_rustls::TlsConnector::from(config.tls.clone())
            .connect(config.server_name.clone(), stream.await?)
            .await
            .context("TLS handshake")
    };
    tokio::time::timeout(CONNECT_TIMEOUT, open)
        .await
        .with_context(|| format!("connecting to {}: timed out", config.name))?
}

/// DoT: TLS straight to the resolver.
async fn open_dot(
    config: &Config,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    tls(config, tcp(config)).await
}

/// DoH: TLS to the resolver, through the proxy's `CONNECT` if there is one.
async fn open_doh(
    config: &Config,
    url: &HttpUrl,
    proxy: Option<&Proxy>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<Stream>> {
    let stream = async {
        let stream: Stream = Box::new(tcp(config).await?);
        match proxy {
            Some(proxy) => http_client::connect_tunnel(stream, proxy, url).await,
            None => Ok(stream),
        }
    };
    tls(config, stream).await
}

/// Acknowledge what arrived at once. A DoT server that leaves Nagle on
/// (unbound does, on its TLS port) holds each answer written while an
/// earlier one is unacknowledged, and Linux delays acknowledgements up to
/// 40 ms: every answer after the first of a burst would wait that long.
/// The kernel leaves quick-ack mode by itself, so this is said after every
/// read.
fn quick_ack(stream: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) {
    let _ = socket2::SockRef::from(stream.get_ref().0).set_tcp_quickack(true);
}

/// What a connection's carrier works with.
struct Carry<'a> {
    queries: &'a mut mpsc::Receiver<Bytes>,
    up: &'a mpsc::Sender<FromResolver>,
    resolver: usize,
    /// Set once an answer came back on this connection.
    answered: &'a mut bool,
}

impl Carry<'_> {
    /// Tell the client loop the connection is up; false when it is gone.
    async fn connected(&self) -> bool {
        report(self.up, self.resolver, LinkEvent::Connected).await
    }

    /// Hand an answer to the client loop; false when it is gone.
    async fn deliver(&mut self, bytes: Bytes) -> bool {
        *self.answered = true;
        let resolver = self.resolver;
        let answer = FromResolver::Answer { resolver, bytes };
        self.up.send(answer).await.is_ok()
    }
}

/// DoT's framing: each message behind its length, 2 bytes big-endian.
fn dot_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(2)
        .max_frame_length(MAX_MESSAGE)
        .new_codec()
}

/// DoT on an open connection: every query written as soon as it comes
/// (pipelined, RFC 7858 §3.3), every answer read whenever it comes (in
/// any order), until the connection breaks, is silent for [`DEAD_AFTER`]
/// with queries in flight, or has nothing in flight for [`IDLE_CLOSE`]
/// (then `Ok`).
async fn carry_dot<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    first: Bytes,
    mut link: Carry<'_>,
    after_read: impl Fn(&S),
) -> anyhow::Result<()> {
    let mut framed = Framed::new(stream, dot_codec());
    framed.send(first).await.context("writing a query")?;
    // Answers owed; a resolver answers every query on a stream (SERVFAIL
    // at worst), so this only errs high when one is lost in it.
    let mut in_flight = 1usize;
    // When waiting for answers started, or the last answer came; when the
    // connection last had nothing in flight.
    let mut heard = Instant::now();
    let mut idle_since = Instant::now();
    loop {
        let deadline = if in_flight > 0 {
            heard + DEAD_AFTER
        } else {
            idle_since + IDLE_CLOSE
        };
        tokio::select! {
            query = link.queries.recv() => {
                let Some(query) = query else { return Ok(()) };
                if in_flight == 0 {
                    heard = Instant::now();
                }
                framed.feed(query).await.context("writing a query")?;
                in_flight += 1;
                // Whatever else is queued goes out in the same write.
                while let Ok(query) = link.queries.try_recv() {
                    framed.feed(query).await.context("writing a query")?;
                    in_flight += 1;
                }
                futures_util::SinkExt::<Bytes>::flush(&mut framed).await.context("writing a query")?;
            }
            answer = framed.next() => {
                let answer = match answer {
                    None => bail!("closed by the resolver"),
                    Some(a) => a.context("reading an answer")?,
                };
                after_read(framed.get_ref());
                in_flight = in_flight.saturating_sub(1);
                heard = Instant::now();
                if in_flight == 0 {
                    idle_since = heard;
                }
                if !link.deliver(answer.freeze()).await {
                    return Ok(());
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                if in_flight > 0 {
                    bail!("no answer for {} s", DEAD_AFTER.as_secs());
                }
                return Ok(());
            }
        }
    }
}

/// DoH on an open connection: HTTP/2, a stream per query, as many at once
/// as the resolver allows; until the connection breaks, a first exchange
/// fails (a wrong path, say: nothing would work), or nothing was in flight
/// for [`IDLE_CLOSE`] (then `Ok`). A later exchange that fails loses its
/// query only: the core times it out.
async fn carry_doh<S, F, O>(
    stream: S,
    url: &HttpUrl,
    first: Bytes,
    mut link: Carry<'_>,
    open: O,
) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    F: Future<Output = anyhow::Result<S>>,
    O: Fn() -> F,
{
    let uri: hyper::Uri = url.to_string().parse().context("the DoH URL")?;
    let mut pool = DohPool::default();
    pool.add(stream).await?;
    let mut exchanges = FuturesUnordered::new();
    exchanges.push(pool.exchange(0, &uri, first));
    let mut idle_since = Instant::now();
    loop {
        tokio::select! {
            Some(r) = pool.closed.next() => {
                r.context("the HTTP/2 connection's task")?.context("HTTP/2")?;
                bail!("closed by the resolver");
            }
            query = link.queries.recv() => {
                let Some(query) = query else { return Ok(()) };
                let mut i = pool.least_busy();
                if pool.in_flight[i] >= STREAMS_PER_CONNECTION && pool.sends.len() < MAX_DOH_CONNECTIONS {
                    // Inline: answers wait out one handshake, at most three
                    // times a connection's life.
                    match open().await {
                        Ok(stream) => i = pool.add(stream).await?,
                        Err(e) => tracing::debug!("DoH {url}: another connection: {e:#}"),
                    }
                }
                exchanges.push(pool.exchange(i, &uri, query));
            }
            Some((i, answer)) = exchanges.next(), if !exchanges.is_empty() => {
                pool.in_flight[i] -= 1;
                idle_since = Instant::now();
                match answer {
                    Ok(bytes) => {
                        if !link.deliver(bytes).await {
                            return Ok(());
                        }
                    }
                    Err(e) if !*link.answered => return Err(e),
                    Err(e) => tracing::debug!("DoH {url}: {e:#}"),
                }
            }
            () = tokio::time::sleep_until(idle_since + IDLE_CLOSE), if exchanges.is_empty() => {
                return Ok(());
            }
        }
    }
}

/// The HTTP/2 connections to one DoH resolver.
#[derive(Default)]
struct DohPool {
    sends: Vec<hyper::client::conn::http2::SendRequest<Full<Bytes>>>,
    /// Exchanges in flight on each.
    in_flight: Vec<usize>,
    /// The connections' own tasks: one that ends ends the link.
    closed: FuturesUnordered<tokio::task::JoinHandle<hyper::Result<()>>>,
}

impl DohPool {
    /// Handshake HTTP/2 on `stream`; its index.
    async fn add<S: AsyncRead + AsyncWrite + Send + Unpin + 'static>(
        &mut self,
        stream: S,
    ) -> anyhow::Result<usize> {
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Pings while streams are open tell a dead connection.
            .keep_alive_interval(DEAD_AFTER / 2)
            .keep_alive_timeout(DEAD_AFTER / 2)
            .handshake(TokioIo::new(stream))
            .await
            .context("HTTP/2 handshake")?;
        self.closed.push(tokio::spawn(conn));
        self.sends.push(send);
        self.in_flight.push(0);
        Ok(self.sends.len() - 1)
    }

    /// The connection with the fewest exchanges in flight.
    fn least_busy(&self) -> usize {
        (0..self.sends.len())
            .min_by_key(|&i| self.in_flight[i])
            .unwrap_or(0)
    }

    /// An exchange of `query` on connection `i`, yielding `i` with it.
    fn exchange(
        &mut self,
        i: usize,
        uri: &hyper::Uri,
        query: Bytes,
    ) -> impl Future<Output = (usize, anyhow::Result<Bytes>)> + use<> {
        self.in_flight[i] += 1;
        let answer = exchange(self.sends[i].clone(), uri.clone(), query);
        async move { (i, answer.await) }
    }
}

impl Drop for DohPool {
    fn drop(&mut self) {
        // The connections close with the link.
        for task in &self.closed {
            task.abort();
        }
    }
}

/// One DoH exchange (RFC 8484 §4.1: `POST`, the query as the body); the
/// answer's body.
async fn exchange(
    mut send: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    uri: hyper::Uri,
    query: Bytes,
) -> anyhow::Result<Bytes> {
    let dns_message = HeaderValue::from_static(DNS_MESSAGE);
    let req = Request::post(uri)
        .header(header::CONTENT_TYPE, &dns_message)
        .header(header::ACCEPT, &dns_message)
        .header(
            header::USER_AGENT,
            concat!("iptun/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(query))?;
    let exchange = async {
        let resp = send.send_request(req).await.context("DoH request")?;
        if resp.status() != StatusCode::OK {
            bail!("answered {}", resp.status());
        }
        // (A captive portal's page is no answer.)
        let kind = resp.headers().get(header::CONTENT_TYPE);
        if !kind.is_some_and(|k| k.as_bytes().starts_with(DNS_MESSAGE.as_bytes())) {
            bail!("answered {kind:?}, not {DNS_MESSAGE}");
        }
        let body = Limited::new(resp.into_body(), MAX_MESSAGE)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("DoH answer: {e}"))?;
        Ok(body.to_bytes())
    };
    tokio::time::timeout(DEAD_AFTER, exchange)
        .await
        .context("no answer")?
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A connection's carrier under test: its queue, what it hands up.
    struct Harness {
        queries: mpsc::Sender<Bytes>,
        queries_rx: mpsc::Receiver<Bytes>,
        up: mpsc::Sender<FromResolver>,
        up_rx: mpsc::Receiver<FromResolver>,
        answered: bool,
    }

    impl Harness {
        fn new() -> Self {
            let (queries, queries_rx) = mpsc::channel(QUERY_QUEUE);
            let (up, up_rx) = mpsc::channel(QUERY_QUEUE);
            Self {
                queries,
                queries_rx,
                up,
                up_rx,
                answered: false,
            }
        }

        fn carry(&mut self) -> Carry<'_> {
            Carry {
                queries: &mut self.queries_rx,
                up: &self.up,
                resolver: 7,
                answered: &mut self.answered,
            }
        }

        /// The answers handed up so far, each checked to be resolver 7's.
        fn answers(&mut self) -> Vec<Bytes> {
            let mut out = Vec::new();
            while let Ok(m) = self.up_rx.try_recv() {
                match m {
                    FromResolver::Answer { resolver: 7, bytes } => out.push(bytes),
                    other => panic!("unexpected {other:?}"),
                }
            }
            out
        }
    }

    fn query(i: u8) -> Bytes {
        Bytes::from(vec![i; 20 + usize::from(i)])
    }

    /// The resolver's answer to a query (distinct from it).
    fn answer_to(q: &[u8]) -> Bytes {
        let mut a = b"answer:".to_vec();
        a.extend_from_slice(q);
        Bytes::from(a)
    }

    #[tokio::test]
    async fn dot_pipelines_queries_and_takes_answers_in_any_order() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut h = Harness::new();
        for i in 1..5 {
            h.queries.try_send(query(i)).unwrap();
        }
        // The resolver reads all five queries before it answers any (a
        // client waiting for each answer would hang here), then answers
        // them last first, and closes.
        let resolver = async move {
            let mut framed = Framed::new(server, dot_codec());
            let mut got = Vec::new();
            while got.len() < 5 {
                got.push(framed.next().await.unwrap().unwrap().freeze());
            }
            for q in got.iter().rev() {
                framed.send(answer_to(q)).await.unwrap();
            }
            got
        };
        let (carried, got) = tokio::join!(carry_dot(client, query(0), h.carry(), |_| {}), resolver);
        let e = carried.unwrap_err().to_string();
        assert!(e.contains("closed by the resolver"), "{e}");
        assert_eq!(got, (0..5).map(query).collect::<Vec<_>>(), "framing");
        let expected: Vec<Bytes> = (0..5).rev().map(|i| answer_to(&query(i))).collect();
        assert_eq!(h.answers(), expected);
        assert!(h.answered);
    }

    #[tokio::test(start_paused = true)]
    async fn dot_closes_an_idle_connection() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut h = Harness::new();
        let resolver = tokio::spawn(async move {
            let mut framed = Framed::new(server, dot_codec());
            while let Some(Ok(q)) = framed.next().await {
                framed.send(answer_to(&q)).await.unwrap();
            }
        });
        let start = Instant::now();
        carry_dot(client, query(1), h.carry(), |_| {})
            .await
            .unwrap();
        assert_eq!(start.elapsed(), IDLE_CLOSE, "closed when idle, not before");
        assert_eq!(h.answers(), [answer_to(&query(1))]);
        resolver.await.unwrap(); // it saw the connection end
    }

    #[tokio::test(start_paused = true)]
    async fn dot_gives_up_on_a_resolver_that_stops_answering() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut h = Harness::new();
        let _resolver = tokio::spawn(async move {
            let mut framed = Framed::new(server, dot_codec());
            let q = framed.next().await.unwrap().unwrap();
            framed.send(answer_to(&q)).await.unwrap();
            // Reads on, answers nothing more.
            while framed.next().await.is_some() {}
        });
        h.queries.try_send(query(2)).unwrap();
        let start = Instant::now();
        let e = carry_dot(client, query(1), h.carry(), |_| {})
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no answer for 10 s"), "{e}");
        assert_eq!(start.elapsed(), DEAD_AFTER);
        assert_eq!(h.answers(), [answer_to(&query(1))]);
    }

    #[tokio::test(start_paused = true)]
    async fn dot_hands_up_no_message_cut_short() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let mut h = Harness::new();
        let resolver = async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut len = [0u8; 2];
            server.read_exact(&mut len).await.unwrap();
            // A length that claims more than comes before the end.
            server.write_all(&[0x00, 0x10, 1, 2, 3]).await.unwrap();
        };
        let (carried, ()) = tokio::join!(carry_dot(client, query(1), h.carry(), |_| {}), resolver);
        let e = format!("{:#}", carried.unwrap_err());
        assert!(e.contains("reading an answer"), "{e}");
        assert!(h.answers().is_empty());
    }

    /// What the test DoH resolver saw of a request.
    #[derive(Debug, PartialEq, Eq)]
    struct Seen {
        method: String,
        path: String,
        content_type: Option<String>,
        accept: Option<String>,
    }

    /// An HTTP/2 DoH resolver on `io` (hyper's server, 100 streams at
    /// most, as unbound): each POST is answered with `answer_to(body)`
    /// after `gate` lets it through, or with `status` when that is not 200.
    async fn doh_resolver(
        io: tokio::io::DuplexStream,
        gate: Arc<tokio::sync::Barrier>,
        status: StatusCode,
        seen: Arc<Mutex<Vec<Seen>>>,
    ) {
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let (gate, seen) = (gate.clone(), seen.clone());
            async move {
                let header = |h| {
                    req.headers()
                        .get(h)
                        .map(|v: &HeaderValue| v.to_str().unwrap().to_owned())
                };
                seen.lock().unwrap().push(Seen {
                    method: req.method().to_string(),
                    path: req.uri().path().to_owned(),
                    content_type: header(header::CONTENT_TYPE),
                    accept: header(header::ACCEPT),
                });
                let body = req.into_body().collect().await.unwrap().to_bytes();
                gate.wait().await;
                let resp = hyper::Response::builder()
                    .status(status)
                    .header(header::CONTENT_TYPE, DNS_MESSAGE)
                    .body(Full::new(answer_to(&body)))
                    .unwrap();
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .max_concurrent_streams(100)
            .serve_connection(TokioIo::new(io), service)
            .await;
    }

    /// For a test of one connection: no other opens.
    async fn no_more() -> anyhow::Result<tokio::io::DuplexStream> {
        anyhow::bail!("one connection in this test")
    }

    fn doh_url() -> HttpUrl {
        HttpUrl {
            tls: true,
            host: "192.0.2.1".into(),
            port: 443,
            path: "/dns-query".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn doh_carries_many_queries_at_once_over_http2() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut h = Harness::new();
        for i in 1..8 {
            h.queries.try_send(query(i)).unwrap();
        }
        // No answer before all eight requests are in: one stream at a
        // time would never get there.
        let gate = Arc::new(tokio::sync::Barrier::new(8));
        let seen = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(doh_resolver(server, gate, StatusCode::OK, seen.clone()));
        let start = Instant::now();
        carry_doh(client, &doh_url(), query(0), h.carry(), no_more)
            .await
            .unwrap();
        assert_eq!(start.elapsed(), IDLE_CLOSE, "closed when idle");
        let mut answers = h.answers();
        answers.sort();
        let mut expected: Vec<Bytes> = (0..8).map(|i| answer_to(&query(i))).collect();
        expected.sort();
        assert_eq!(answers, expected);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 8);
        let message = Some(DNS_MESSAGE.to_owned());
        for s in seen.iter() {
            let want = Seen {
                method: "POST".into(),
                path: "/dns-query".into(),
                content_type: message.clone(),
                accept: message.clone(),
            };
            assert_eq!(s, &want);
        }
    }

    /// More exchanges at once than a connection's streams: another
    /// connection opens for them (none would be answered here until all
    /// 150 are in, which one connection of 100 streams never gets to).
    #[tokio::test(start_paused = true)]
    async fn doh_opens_another_connection_for_more_streams() {
        const QUERIES: u8 = 150;
        let mut h = Harness::new();
        for i in 1..QUERIES {
            h.queries.try_send(query(i)).unwrap();
        }
        let gate = Arc::new(tokio::sync::Barrier::new(usize::from(QUERIES)));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicU64::new(0));
        let open = || {
            let (client, server) = tokio::io::duplex(1 << 16);
            tokio::spawn(doh_resolver(
                server,
                gate.clone(),
                StatusCode::OK,
                seen.clone(),
            ));
            connections.fetch_add(1, Ordering::Relaxed);
            async move { Ok(client) }
        };
        let first = open().await.unwrap();
        carry_doh(first, &doh_url(), query(0), h.carry(), open)
            .await
            .unwrap();
        assert_eq!(h.answers().len(), usize::from(QUERIES));
        assert_eq!(connections.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn doh_a_first_exchange_refused_fails_the_connection() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut h = Harness::new();
        let gate = Arc::new(tokio::sync::Barrier::new(1));
        let seen = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(doh_resolver(server, gate, StatusCode::NOT_FOUND, seen));
        let e = carry_doh(client, &doh_url(), query(0), h.carry(), no_more)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("404"), "{e}");
        assert!(h.answers().is_empty() && !h.answered);
    }
}

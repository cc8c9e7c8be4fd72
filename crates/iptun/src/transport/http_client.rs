//! The client side of the HTTP transports: a task that opens a connection
//! to the server when the client loop says so — through a forward proxy if
//! there is one, with TLS for `https://` — and moves batches of framed
//! tunnel messages between it and the loop.
//!
//! Which mode to open (WebSocket, or long-poll where the upgrade is
//! refused), and when to try again, is the core's decision
//! ([`iptun_proto::transport::http::HttpClient`]): this task dials as told
//! ([`Command`]) and reports what happened ([`HttpEvent`]). In long-poll
//! mode one connection posts upstream batches while [`POLLERS`] others keep
//! polls held on the server for downstream ones.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Empty, Full, Limited};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use iptun_proto::crypto::PollKey;
use iptun_proto::transport::http::{
    BATCH_TARGET, Command, HOLD, HttpEvent, MAX_BODY, POLLERS, PollSigner,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{
    Message, handshake::client::generate_key, handshake::derive_accept_key,
};

use super::http_server::ws_config;
use super::tls;
use crate::url::HttpUrl;

/// A byte stream of any layering (TCP, TLS, a proxy's CONNECT tunnel).
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
pub(crate) type Stream = Box<dyn Io>;

/// Time to open a connection (TCP, proxy, TLS, upgrade).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle WebSocket sends a ping this often...
const PING_EVERY: Duration = Duration::from_secs(5);
/// ...and is taken for dead after this long without hearing anything.
const DEAD_AFTER: Duration = Duration::from_secs(20);
/// A new WebSocket must answer the client's first ping this fast.
const FIRST_ANSWER: Duration = Duration::from_secs(5);

/// A forward proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proxy {
    /// `host:port`.
    pub authority: String,
    /// The `Proxy-Authorization` value (`Basic ...`), if credentials were given.
    pub authorization: Option<String>,
}

/// Which HTTP mode to use (the flag's values).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// WebSocket, falling back to long-poll when the upgrade is refused.
    Auto,
    /// WebSocket only.
    Websocket,
    /// Long-poll only.
    LongPoll,
}

impl From<Mode> for iptun_proto::transport::http::Mode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Auto => Self::Auto,
            Mode::Websocket => Self::WebSocket,
            Mode::LongPoll => Self::LongPoll,
        }
    }
}

/// Everything the connection task needs.
pub struct Config {
    pub url: HttpUrl,
    /// The first hop: the proxy's or the server's address.
    pub connect_to: SocketAddr,
    pub proxy: Option<Proxy>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The long-poll tag and what signs each request (the client loop
    /// gives it the engine's poll key: [`set_poll_key`]).
    pub signer: Arc<Mutex<PollSigner>>,
}

/// Give a long-poll task's signer the client's current poll key.
pub fn set_poll_key(signer: &Mutex<PollSigner>, key: Option<(u32, &PollKey)>) {
    signer
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .set_key(key);
}

/// From the task to the client loop.
pub enum Down {
    /// A body of framed tunnel messages.
    Data(Bytes),
    /// What became of the connection asked for.
    Event(HttpEvent),
}

/// Run the connection task until the client loop drops its channels:
/// dial when told, report how it went, move batches meanwhile.
pub async fn run(
    config: Config,
    mut commands: mpsc::Receiver<Command>,
    mut up: mpsc::Receiver<Bytes>,
    down: mpsc::Sender<Down>,
) {
    let mut next = commands.recv().await;
    loop {
        let websocket = match next {
            None => return,
            Some(Command::Hangup) => {
                // Nothing open: what was queued for the old connection goes.
                while up.try_recv().is_ok() {}
                next = commands.recv().await;
                continue;
            }
            Some(Command::Dial { websocket }) => websocket,
        };
        let event = tokio::select! {
            e = connection(&config, websocket, &mut up, &down) => e,
            c = commands.recv() => {
                next = c; // hang up (or dial anew): the connection is dropped
                continue;
            }
        };
        if down.send(Down::Event(event)).await.is_err() {
            return;
        }
        next = commands.recv().await;
    }
}

/// Open one connection in the mode asked and carry batches until it ends;
/// what ended it.
async fn connection(
    config: &Config,
    websocket: bool,
    up: &mut mpsc::Receiver<Bytes>,
    down: &mpsc::Sender<Down>,
) -> HttpEvent {
    if !websocket {
        let opened = || async {
            tracing::info!("connected to {} by long-poll", config.url);
            let _ = down.send(Down::Event(HttpEvent::Opened)).await;
        };
        let e = run_long_poll(config, up, down, opened).await;
        let why = format!("{:#}", e.err().unwrap_or_else(|| anyhow::anyhow!("closed")));
        return HttpEvent::Closed { heard: true, why };
    }
    let ws = match open_websocket(config).await {
        Ok(ws) => ws,
        Err(Refusal::Upgrade(why)) => return HttpEvent::UpgradeRefused(why),
        Err(Refusal::Other(e)) => {
            return HttpEvent::Closed {
                heard: false,
                why: format!("{e:#}"),
            };
        }
    };
    tracing::info!("connected to {} by WebSocket", config.url);
    if down.send(Down::Event(HttpEvent::Opened)).await.is_err() {
        return HttpEvent::Closed {
            heard: false,
            why: "client gone".into(),
        };
    }
    let mut heard = false;
    let e = run_websocket(ws, up, down, &mut heard).await;
    let why = format!("{:#}", e.err().unwrap_or_else(|| anyhow::anyhow!("closed")));
    HttpEvent::Closed { heard, why }
}

/// Why a WebSocket did not open.
enum Refusal {
    /// The HTTP exchange worked but the upgrade was refused.
    Upgrade(String),
    /// Anything else: the server or proxy is unreachable, TLS failed...
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Refusal {
    fn from(e: anyhow::Error) -> Self {
        Self::Other(e)
    }
}

/// A connection to the server (or through the proxy to it), with TLS for
/// `https://`; and whether requests must name the full URL (an `http://`
/// server through a proxy, without CONNECT).
async fn open_stream(config: &Config) -> anyhow::Result<(Stream, bool)> {
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect(config.connect_to),
    )
    .await
    .with_context(|| format!("connecting to {}: timed out", config.connect_to))?
    .with_context(|| format!("connecting to {}", config.connect_to))?;
    tcp.set_nodelay(true)?;
    let mut stream: Stream = Box::new(tcp);
    let mut absolute = false;
    if let Some(proxy) = &config.proxy {
        if config.tls.is_some() {
            stream = connect_tunnel(stream, proxy, &config.url).await?;
        } else {
            absolute = true;
        }
    }
    if let Some(tls) = &config.tls {
        let name = rustls::pki_types::ServerName::try_from(config.url.host.clone())
            .with_context(|| format!("`{}` is not a valid TLS server name", config.url.host))?;
        let tls = tokio_rustls::TlsConnector::from(tls.clone()).connect(name, stream);
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, tls)
            .await
            .context("TLS handshake timed out")?
            .map_err(|e| anyhow::anyhow!("{}: {}", config.url, tls::explain(&e)))?;
        stream = Box::new(tls);
    }
    Ok((stream, absolute))
}

/// HTTP/1.1 over `stream`; the connection is driven by a spawned task.
async fn http1<B>(stream: Stream) -> anyhow::Result<hyper::client::conn::http1::SendRequest<B>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(send)
}

/// Ask the proxy for a tunnel to the server (`CONNECT host:port`).
pub(crate) async fn connect_tunnel(
    stream: Stream,
    proxy: &Proxy,
    url: &HttpUrl,
) -> anyhow::Result<Stream> {
    let mut send = http1::<Empty<Bytes>>(stream).await?;
    let authority = url.authority();
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(&authority)
        .header(header::HOST, &authority);
    if let Some(auth) = &proxy.authorization {
        req = req.header(header::PROXY_AUTHORIZATION, auth);
    }
    let resp = tokio::time::timeout(CONNECT_TIMEOUT, send.send_request(req.body(Empty::new())?))
        .await
        .context("proxy CONNECT timed out")?
        .context("proxy CONNECT")?;
    match resp.status() {
        s if s.is_success() => {}
        StatusCode::PROXY_AUTHENTICATION_REQUIRED => bail!(
            "proxy {}: 407 Proxy Authentication Required (give user:pass in --proxy http://USER:PASS@HOST:PORT)",
            proxy.authority
        ),
        s => bail!("proxy {} refused CONNECT {authority}: {s}", proxy.authority),
    }
    let io = hyper::upgrade::on(resp).await.context("proxy CONNECT")?;
    Ok(Box::new(TokioIo::new(io)))
}

/// A request for the tunnel path, with what a proxy needs.
fn request(
    config: &Config,
    absolute: bool,
    method: Method,
    query: &str,
) -> hyper::http::request::Builder {
    let target = if absolute {
        format!("{}{query}", config.url)
    } else {
        format!("{}{query}", config.url.path)
    };
    let mut req = Request::builder()
        .method(method)
        .uri(target)
        .header(header::HOST, config.url.authority())
        .header(
            header::USER_AGENT,
            concat!("iptun/", env!("CARGO_PKG_VERSION")),
        );
    if let (true, Some(auth)) = (
        absolute,
        config.proxy.as_ref().and_then(|p| p.authorization.as_ref()),
    ) {
        req = req.header(header::PROXY_AUTHORIZATION, auth);
    }
    req
}

async fn open_websocket(
    config: &Config,
) -> Result<WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>, Refusal> {
    let open = async {
        let (stream, absolute) = open_stream(config).await?;
        let mut send = http1::<Empty<Bytes>>(stream).await?;
        let key = generate_key();
        let req = request(config, absolute, Method::GET, "")
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .header(header::SEC_WEBSOCKET_KEY, &key)
            .body(Empty::new())
            .map_err(anyhow::Error::from)?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| anyhow::anyhow!("WebSocket upgrade: {e}"))?;
        match resp.status() {
            StatusCode::SWITCHING_PROTOCOLS => {}
            s @ (StatusCode::NOT_FOUND | StatusCode::PROXY_AUTHENTICATION_REQUIRED) => {
                return Err(Refusal::Other(anyhow::anyhow!(
                    "{} answered {s}",
                    config.url
                )));
            }
            s => return Err(Refusal::Upgrade(format!("answered {s}"))),
        }
        let accept = resp.headers().get(header::SEC_WEBSOCKET_ACCEPT);
        if accept.map(HeaderValue::as_bytes) != Some(derive_accept_key(key.as_bytes()).as_bytes()) {
            return Err(Refusal::Upgrade("wrong Sec-WebSocket-Accept".into()));
        }
        let io = hyper::upgrade::on(resp)
            .await
            .map_err(|e| anyhow::anyhow!("WebSocket upgrade: {e}"))?;
        Ok(
            WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Client, Some(ws_config()))
                .await,
        )
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, open).await {
        Ok(r) => r,
        Err(_) => Err(Refusal::Other(anyhow::anyhow!("connecting timed out"))),
    }
}

/// Move batches both ways until the connection breaks or goes quiet.
/// `heard` tells whether anything at all came back.
async fn run_websocket<S>(
    ws: WebSocketStream<S>,
    up: &mut mpsc::Receiver<Bytes>,
    down: &mpsc::Sender<Down>,
    heard: &mut bool,
) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let reader = async {
        loop {
            // The first answer (to the ping the writer starts with) must be
            // quick; later, silence is judged over a longer time.
            let wait = if *heard { DEAD_AFTER } else { FIRST_ANSWER };
            let msg = tokio::time::timeout(wait, stream.next()).await;
            if let Ok(Some(Ok(_))) = msg {
                *heard = true;
            }
            match msg {
                Err(_) => bail!("nothing heard for {wait:?}"),
                Ok(None) => bail!("closed by the server"),
                Ok(Some(Err(e))) => bail!("WebSocket: {e}"),
                Ok(Some(Ok(Message::Binary(body)))) => {
                    if down.send(Down::Data(body)).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(Some(Ok(_))) => {} // pings, pongs
            }
        }
    };
    let writer = async {
        sink.send(Message::Ping(Bytes::new())).await?;
        loop {
            let body = match tokio::time::timeout(PING_EVERY, up.recv()).await {
                Err(_) => {
                    sink.send(Message::Ping(Bytes::new())).await?;
                    continue;
                }
                Ok(None) => return Ok::<(), tokio_tungstenite::tungstenite::Error>(()),
                Ok(Some(body)) => body,
            };
            sink.feed(Message::Binary(body)).await?;
            while let Ok(body) = up.try_recv() {
                sink.feed(Message::Binary(body)).await?;
            }
            sink.flush().await?;
        }
    };
    tokio::select! {
        r = reader => r,
        r = writer => r.context("WebSocket"),
    }
}

/// One long-poll connection.
struct PollConn {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    absolute: bool,
}

impl PollConn {
    async fn open(config: &Config) -> anyhow::Result<Self> {
        let open = async {
            let (stream, absolute) = open_stream(config).await?;
            Ok::<_, anyhow::Error>(Self {
                send: http1(stream).await?,
                absolute,
            })
        };
        tokio::time::timeout(CONNECT_TIMEOUT, open)
            .await
            .context("connecting timed out")?
    }

    /// POST `body`; the response's body. Proxies may close a connection
    /// after each response (tinyproxy does): then a new one carries it.
    /// Also a request lost that way is resent once.
    async fn exchange(&mut self, config: &Config, body: Bytes) -> anyhow::Result<Bytes> {
        // A fresh counter for every request (a resend below is the same
        // request: the server answers the copy it did not see).
        let query = format!(
            "?{}",
            config
                .signer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .next_query()
        );
        let absolute = self.absolute; // the same for every connection
        let post = || {
            request(config, absolute, Method::POST, &query)
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(Full::new(body.clone()))
        };
        if self.send.ready().await.is_err() {
            *self = Self::open(config).await?;
        }
        let resp = match self.send.send_request(post()?).await {
            // Closed under us (a proxy that does not keep connections alive
            // closed it after its last response): resend on a new one. A
            // duplicate reaching the server is dropped by the replay window.
            Err(e) if e.is_canceled() || e.is_incomplete_message() => {
                *self = Self::open(config).await?;
                self.send.send_request(post()?)
            }
            r => return read_response(r).await,
        };
        let resp = tokio::time::timeout(HOLD + CONNECT_TIMEOUT, resp)
            .await
            .context("no answer to a long-poll request")?;
        read_response(resp).await
    }
}

async fn read_response(
    resp: hyper::Result<hyper::Response<hyper::body::Incoming>>,
) -> anyhow::Result<Bytes> {
    let resp = resp.context("long-poll request")?;
    if resp.status() != StatusCode::OK {
        bail!("long-poll request answered {}", resp.status());
    }
    let body = tokio::time::timeout(HOLD, Limited::new(resp.into_body(), MAX_BODY).collect())
        .await
        .context("long-poll response timed out")?
        .map_err(|e| anyhow::anyhow!("long-poll response: {e}"))?;
    Ok(body.to_bytes())
}

/// Long-poll until a connection breaks: one connection posts what comes
/// from the client loop, [`POLLERS`] keep polls held for downstream data.
async fn run_long_poll<F: Future<Output = ()>>(
    config: &Config,
    up: &mut mpsc::Receiver<Bytes>,
    down: &mpsc::Sender<Down>,
    opened: impl FnOnce() -> F,
) -> anyhow::Result<()> {
    let mut sender = PollConn::open(config).await?;
    let mut pollers = Vec::new();
    for _ in 0..POLLERS {
        pollers.push(PollConn::open(config).await?);
    }
    opened().await;
    let polling = futures_util::future::try_join_all(
        pollers.iter_mut().map(|p| keep_polling(p, config, down)),
    );
    let sending = async {
        while let Some(first) = up.recv().await {
            let mut body = BytesMut::from(first);
            while body.len() < 4 * BATCH_TARGET {
                match up.try_recv() {
                    Ok(more) => body.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            let answer = sender.exchange(config, body.freeze()).await?;
            deliver(down, answer).await;
        }
        Ok::<(), anyhow::Error>(())
    };
    tokio::select! {
        r = polling => r.map(drop),
        r = sending => r,
    }
}

/// Keep a poll held on the server, deliver what each brings.
async fn keep_polling(
    conn: &mut PollConn,
    config: &Config,
    down: &mpsc::Sender<Down>,
) -> anyhow::Result<()> {
    loop {
        let body = conn.exchange(config, Bytes::new()).await?;
        deliver(down, body).await;
    }
}

async fn deliver(down: &mpsc::Sender<Down>, body: Bytes) {
    if !body.is_empty() {
        let _ = down.send(Down::Data(body)).await;
    }
}

/// The proxy for `url`: `--proxy` if given (`none`: no proxy), else
/// `HTTPS_PROXY`/`HTTP_PROXY` (either case) unless `NO_PROXY` names the host.
pub fn proxy_for(
    url: &HttpUrl,
    flag: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Option<Proxy>> {
    if let Some(flag) = flag {
        return if flag == "none" {
            Ok(None)
        } else {
            parse_proxy(flag)
                .map(Some)
                .with_context(|| format!("--proxy `{flag}`"))
        };
    }
    let var = if url.tls { "https_proxy" } else { "http_proxy" };
    let Some((name, value)) = [var.to_uppercase(), var.to_owned()]
        .into_iter()
        .find_map(|n| env(&n).filter(|v| !v.is_empty()).map(|v| (n, v)))
    else {
        return Ok(None);
    };
    let no_proxy = env("NO_PROXY")
        .or_else(|| env("no_proxy"))
        .unwrap_or_default();
    if bypasses(&no_proxy, &url.host) {
        return Ok(None);
    }
    parse_proxy(&value)
        .map(Some)
        .with_context(|| format!("{name}=`{value}`"))
}

/// Whether a `NO_PROXY` list names `host` (exactly, as a domain suffix, or `*`).
fn bypasses(no_proxy: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    no_proxy
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|entry| {
            let entry = entry
                .trim_start_matches('*')
                .trim_start_matches('.')
                .to_ascii_lowercase();
            entry.is_empty() || host == entry || host.ends_with(&format!(".{entry}"))
        })
}

/// `http://[user:pass@]host[:port]` (port 80 by default).
fn parse_proxy(text: &str) -> anyhow::Result<Proxy> {
    let rest = text
        .strip_prefix("http://")
        .or_else(|| (!text.contains("://")).then_some(text))
        .context("expected http://[USER:PASS@]HOST:PORT (only HTTP proxies are supported)")?;
    let rest = rest.trim_end_matches('/');
    let (userinfo, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    anyhow::ensure!(
        !hostport.is_empty() && !hostport.contains('/'),
        "expected HOST:PORT"
    );
    let has_port = hostport
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.ends_with(':') && p.parse::<u16>().is_ok())
        && !hostport.ends_with(']');
    let authority = if has_port {
        hostport.to_owned()
    } else {
        format!("{hostport}:80")
    };
    let authorization = userinfo.map(|u| {
        use base64::Engine as _;
        let decoded: Vec<u8> = percent_encoding::percent_decode_str(u).collect();
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(decoded)
        )
    });
    Ok(Proxy {
        authority,
        authorization,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(tls: bool, host: &str) -> HttpUrl {
        HttpUrl {
            tls,
            host: host.into(),
            port: 443,
            path: "/t".into(),
        }
    }

    #[test]
    fn proxies_from_flag_and_env() {
        let none = |_: &str| None;
        let p = proxy_for(&url(true, "h"), Some("http://u:p%40ss@proxy:3128"), none)
            .unwrap()
            .unwrap();
        assert_eq!(p.authority, "proxy:3128");
        // base64("u:p@ss")
        assert_eq!(p.authorization.as_deref(), Some("Basic dTpwQHNz"));
        assert_eq!(
            proxy_for(&url(true, "h"), Some("none"), none).unwrap(),
            None
        );
        assert!(proxy_for(&url(true, "h"), Some("socks5://x:1"), none).is_err());

        let env = |k: &str| match k {
            "HTTPS_PROXY" => Some("http://10.0.0.1:8080".to_owned()),
            "http_proxy" => Some("10.0.0.2".to_owned()),
            "NO_PROXY" => Some("localhost, .internal.example".to_owned()),
            _ => None,
        };
        let p = proxy_for(&url(true, "vpn.example.com"), None, env)
            .unwrap()
            .unwrap();
        assert_eq!(
            (p.authority.as_str(), p.authorization),
            ("10.0.0.1:8080", None)
        );
        let p = proxy_for(&url(false, "vpn.example.com"), None, env)
            .unwrap()
            .unwrap();
        assert_eq!(p.authority, "10.0.0.2:80");
        assert_eq!(
            proxy_for(&url(true, "a.internal.example"), None, env).unwrap(),
            None
        );
        assert_eq!(proxy_for(&url(true, "localhost"), None, env).unwrap(), None);
    }

    #[test]
    fn no_proxy_matching() {
        assert!(bypasses("*", "anything"));
        assert!(bypasses("example.com", "a.example.com"));
        assert!(!bypasses("example.com", "badexample.com"));
        assert!(bypasses("192.0.2.1", "192.0.2.1"));
        assert!(!bypasses("", "h"));
    }
}

//! The client side of the HTTP transports: a task that keeps a connection
//! to the server — through a forward proxy if there is one, with TLS for
//! `https://` — and moves batches of framed tunnel messages between it and
//! the client loop.
//!
//! WebSocket first; if the upgrade is refused (a proxy that strips
//! `Upgrade`, a middlebox that answers 4xx), long-poll: one connection
//! posts upstream batches, [`POLLERS`] others keep polls held on the server
//! for downstream ones. A broken connection is reopened with back-off; the
//! session above does not notice beyond a short gap.

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
use iptun_proto::http::{BATCH_TARGET, HOLD, MAX_BODY, POLLERS};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{
    Message, handshake::client::generate_key, handshake::derive_accept_key,
};

use super::http_server::ws_config;
use crate::url::HttpUrl;

/// A byte stream of any layering (TCP, TLS, a proxy's CONNECT tunnel).
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}
type Stream = Box<dyn Io>;

/// Time to open a connection (TCP, proxy, TLS, upgrade).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle WebSocket sends a ping this often...
const PING_EVERY: Duration = Duration::from_secs(5);
/// ...and is taken for dead after this long without hearing anything.
const DEAD_AFTER: Duration = Duration::from_secs(20);
/// A new WebSocket must answer the client's first ping this fast.
const FIRST_ANSWER: Duration = Duration::from_secs(5);
/// Reconnection back-off.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(16);

/// A forward proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proxy {
    /// `host:port`.
    pub authority: String,
    /// The `Proxy-Authorization` value (`Basic ...`), if credentials were given.
    pub authorization: Option<String>,
}

/// Which HTTP mode to use.
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

/// Everything the connection task needs.
pub struct Config {
    pub url: HttpUrl,
    /// The first hop: the proxy's or the server's address.
    pub connect_to: SocketAddr,
    pub proxy: Option<Proxy>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub mode: Mode,
    /// The long-poll tag.
    pub tag: u64,
}

/// From the task to the client loop.
pub enum Down {
    /// A body of framed tunnel messages.
    Data(Bytes),
    /// A (new) connection is up: a good moment to tell the server where we are.
    Connected,
}

/// What `iptun status` shows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Info {
    pub mode: &'static str,
    pub connected: bool,
    pub reconnects: u64,
    pub proxy: Option<String>,
    pub last_error: Option<String>,
}

/// Run the connection task until the client loop drops its channels.
pub async fn run(
    config: Config,
    mut up: mpsc::Receiver<Bytes>,
    down: mpsc::Sender<Down>,
    info: Arc<Mutex<Info>>,
) {
    let mut mode = config.mode;
    let mut backoff = BACKOFF_MIN;
    let mut connections = 0u64;
    let set = |f: &dyn Fn(&mut Info)| f(&mut info.lock().expect("not poisoned"));
    loop {
        let result = match mode {
            Mode::Auto | Mode::Websocket => match open_websocket(&config).await {
                Ok(ws) => {
                    connections += 1;
                    set(&|i| {
                        i.mode = "websocket";
                        i.connected = true;
                        i.reconnects = connections - 1;
                    });
                    tracing::info!("connected to {} by WebSocket", config.url);
                    backoff = BACKOFF_MIN;
                    if down.send(Down::Connected).await.is_err() {
                        return;
                    }
                    let mut heard = false;
                    let r = run_websocket(ws, &mut up, &down, &mut heard).await;
                    if let (Err(e), false, Mode::Auto) = (&r, heard, mode) {
                        // Upgraded, yet not even a pong came back: something
                        // in the path answers for the server or buffers.
                        tracing::warn!(
                            "WebSocket carried nothing ({e:#}): falling back to long-poll"
                        );
                        mode = Mode::LongPoll;
                        continue;
                    }
                    r
                }
                Err(Refusal::Upgrade(why)) if mode == Mode::Auto => {
                    tracing::warn!("WebSocket upgrade refused ({why}): falling back to long-poll");
                    mode = Mode::LongPoll;
                    continue;
                }
                Err(Refusal::Upgrade(why)) => {
                    Err(anyhow::anyhow!("WebSocket upgrade refused: {why}"))
                }
                Err(Refusal::Other(e)) => Err(e),
            },
            Mode::LongPoll => {
                set(&|i| i.mode = "long-poll");
                run_long_poll(&config, &mut up, &down, &mut || {
                    connections += 1;
                    set(&|i| {
                        i.connected = true;
                        i.reconnects = connections - 1;
                    });
                    tracing::info!("connected to {} by long-poll", config.url);
                })
                .await
            }
        };
        if down.is_closed() {
            return;
        }
        let e = result.err().unwrap_or_else(|| anyhow::anyhow!("closed"));
        tracing::warn!(
            "connection to {}: {e:#}; retrying in {backoff:?}",
            config.url
        );
        set(&|i| {
            i.connected = false;
            i.last_error = Some(format!("{e:#}"));
        });
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
        // After a fallback, the next connection tries WebSocket again: the
        // middlebox that refused it may be gone (the client roamed).
        mode = config.mode;
    }
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
            .context("TLS handshake")?;
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
async fn connect_tunnel(stream: Stream, proxy: &Proxy, url: &HttpUrl) -> anyhow::Result<Stream> {
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
        let query = format!("?{}", iptun_proto::http::poll_query(config.tag));
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
async fn run_long_poll(
    config: &Config,
    up: &mut mpsc::Receiver<Bytes>,
    down: &mpsc::Sender<Down>,
    connected: &mut (dyn FnMut() + Send),
) -> anyhow::Result<()> {
    let mut sender = PollConn::open(config).await?;
    let mut pollers = Vec::new();
    for _ in 0..POLLERS {
        pollers.push(PollConn::open(config).await?);
    }
    connected();
    if down.send(Down::Connected).await.is_err() {
        return Ok(());
    }
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

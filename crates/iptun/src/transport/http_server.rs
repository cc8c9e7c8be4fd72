//! The server side of the HTTP transports: a TCP listener (with TLS or
//! without), hyper for HTTP/1.1, tungstenite for WebSocket frames.
//!
//! Each connection runs in its own task and talks to the server loop
//! through one channel of [`Event`]s: the loop owns the engine and all
//! state, the tasks only move bytes. Requests for other paths get a plain
//! 404, so the listener can share a host name with a web site.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use iptun_proto::transport::http::{HOLD, MAX_BODY};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, handshake::derive_accept_key};

/// What the connection tasks tell the server loop, with the listener's index.
pub enum Event {
    /// A WebSocket opened: downstream batches for it go to `tx`.
    WsOpen { conn: u64, tx: mpsc::Sender<Bytes> },
    /// A WebSocket message: framed tunnel messages.
    WsData { conn: u64, body: Bytes },
    /// A WebSocket closed.
    WsClosed { conn: u64 },
    /// A long-poll request from client `tag`: its body, and where its
    /// response body goes.
    Poll {
        tag: u64,
        /// The request's poll counter and authenticator (`p=`).
        auth: Option<iptun_proto::transport::http::PollAuth>,
        body: Bytes,
        reply: oneshot::Sender<Vec<u8>>,
    },
}

pub type Events = mpsc::Sender<(usize, Event)>;

/// Downstream batches queued per WebSocket before the loop drops more:
/// short, so the inner TCP sees loss instead of a growing delay.
pub const WS_QUEUE: usize = 16;
/// Connections open at once, over all listeners; beyond, new ones are closed.
const MAX_CONNECTIONS: usize = 4096;
/// A WebSocket that has sent nothing for this long is closed.
const IDLE_CLOSE: Duration = Duration::from_secs(60);
/// Time for a TLS handshake and for a request's headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Listener settings.
pub struct Listener {
    /// This listener's index in the server's table.
    pub index: usize,
    /// The tunnel's path (`/`-prefixed).
    pub path: String,
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Bind `addr` and serve from a spawned task; returns the bound address.
pub async fn spawn(
    addr: SocketAddr,
    listener: Listener,
    events: Events,
) -> anyhow::Result<SocketAddr> {
    let socket = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding HTTP {addr}"))?;
    let local = socket.local_addr()?;
    let listener = Arc::new(listener);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match socket.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("HTTP {local}: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue; // too many connections: this one is closed
            };
            let _ = tcp.set_nodelay(true);
            let (listener, events) = (listener.clone(), events.clone());
            tokio::spawn(async move {
                if let Err(e) = connection(tcp, &listener, events).await {
                    tracing::debug!("HTTP connection from {peer}: {e:#}");
                }
                drop(slot);
            });
        }
    });
    Ok(local)
}

async fn connection(
    tcp: tokio::net::TcpStream,
    listener: &Arc<Listener>,
    events: Events,
) -> anyhow::Result<()> {
    match &listener.tls {
        Some(tls) => {
            let accept = tokio_rustls::TlsAcceptor::from(tls.clone()).accept(tcp);
            let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept)
                .await
                .context("TLS handshake timed out")?
                .context("TLS handshake")?;
            serve(stream, listener, events).await
        }
        None => serve(tcp, listener, events).await,
    }
}

async fn serve<S>(stream: S, listener: &Arc<Listener>, events: Events) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let listener = listener.clone();
    let service = hyper::service::service_fn(move |req| {
        let (listener, events) = (listener.clone(), events.clone());
        async move { Ok::<_, std::convert::Infallible>(handle(req, &listener, events).await) }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await
        .context("serving HTTP")
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(
    req: Request<Incoming>,
    listener: &Listener,
    events: Events,
) -> Response<Full<Bytes>> {
    if req.uri().path() != listener.path {
        return plain(StatusCode::NOT_FOUND, "Not Found\n");
    }
    if is_websocket_upgrade(&req) {
        return accept_websocket(req, listener.index, events);
    }
    if req.method() == Method::POST
        && let Some(tag) = iptun_proto::transport::http::poll_tag(req.uri().query())
    {
        let auth = iptun_proto::transport::http::poll_auth(req.uri().query());
        return long_poll(req, tag, auth, listener.index, events).await;
    }
    plain(
        StatusCode::BAD_REQUEST,
        "expected a WebSocket upgrade or a long-poll POST\n",
    )
}

fn header_has(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

fn is_websocket_upgrade(req: &Request<Incoming>) -> bool {
    req.method() == Method::GET
        && header_has(req, header::CONNECTION, "upgrade")
        && header_has(req, header::UPGRADE, "websocket")
        && req.headers().get(header::SEC_WEBSOCKET_VERSION) == Some(&HeaderValue::from_static("13"))
        && req.headers().contains_key(header::SEC_WEBSOCKET_KEY)
}

/// Answer 101 and hand the upgraded connection to a WebSocket task.
fn accept_websocket(
    mut req: Request<Incoming>,
    index: usize,
    events: Events,
) -> Response<Full<Bytes>> {
    let key = req.headers()[header::SEC_WEBSOCKET_KEY].as_bytes();
    let accept = derive_accept_key(key);
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(io) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(io),
                    Role::Server,
                    Some(ws_config()),
                )
                .await;
                websocket(ws, index, events).await;
            }
            Err(e) => tracing::debug!("WebSocket upgrade: {e}"),
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header"),
    );
    r
}

/// WebSocket limits: one message holds at most a body's worth.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_BODY))
        .max_frame_size(Some(MAX_BODY))
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// Move one WebSocket's messages to and from the server loop until either
/// side closes. Reading and writing run side by side, so a peer that is
/// slow to read never stops us reading from it.
async fn websocket<S>(ws: WebSocketStream<S>, index: usize, events: Events)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Bytes>(WS_QUEUE);
    if events
        .send((index, Event::WsOpen { conn, tx }))
        .await
        .is_err()
    {
        return;
    }
    let (mut sink, mut stream) = ws.split();
    let reader = async {
        // Clients ping an idle connection every few seconds: silence means
        // the client is gone without a FIN.
        while let Ok(Some(Ok(msg))) = tokio::time::timeout(IDLE_CLOSE, stream.next()).await {
            if let Message::Binary(body) = msg {
                let ev = Event::WsData { conn, body };
                if events.send((index, ev)).await.is_err() {
                    break;
                }
            }
        }
    };
    let writer = async {
        while let Some(body) = rx.recv().await {
            if sink.feed(Message::Binary(body)).await.is_err() {
                return;
            }
            while let Ok(body) = rx.try_recv() {
                if sink.feed(Message::Binary(body)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        () = reader => {}
        () = writer => {}
    }
    let _ = events.send((index, Event::WsClosed { conn })).await;
}

async fn long_poll(
    req: Request<Incoming>,
    tag: u64,
    auth: Option<iptun_proto::transport::http::PollAuth>,
    index: usize,
    events: Events,
) -> Response<Full<Bytes>> {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return plain(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n"),
    };
    let (reply, answer) = oneshot::channel();
    if events
        .send((
            index,
            Event::Poll {
                tag,
                auth,
                body,
                reply,
            },
        ))
        .await
        .is_err()
    {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    let body = tokio::time::timeout(HOLD + Duration::from_secs(5), answer)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

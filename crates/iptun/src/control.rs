//! The local control socket behind `iptun status` and `iptun reload`: a
//! daemon reads one request line (`status`, or nothing at all; `reload`)
//! and answers it with one JSON document: a snapshot of its sessions, or
//! what a reload changed.
//!
//! By default the socket is an abstract Unix socket named `@iptun/TUN`.
//! Abstract names belong to the network namespace, like the TUN device they
//! describe: daemons in different namespaces never collide, `iptun status`
//! sees the daemons of its own namespace, and nothing is left on disk. A
//! `--control PATH` not starting with `@` is a file instead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use iptun_proto::DropCounters;
use iptun_proto::engine::Traffic;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use crate::service::{self, Request};

/// Prefix of the default (abstract) control socket names.
const ABSTRACT_PREFIX: &str = "@iptun/";
/// How long a connection may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest request line.
const MAX_REQUEST: u64 = 64;

/// The default control socket of the daemon owning TUN device `tun`.
pub fn default_path(tun: &str) -> PathBuf {
    PathBuf::from(format!("{ABSTRACT_PREFIX}{tun}"))
}

/// A socket address: `@name` is abstract, anything else a file.
fn socket_addr(path: &Path) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt as _;
    match path.to_str().and_then(|p| p.strip_prefix('@')) {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name),
        None => std::os::unix::net::SocketAddr::from_pathname(path),
    }
}

fn is_abstract(path: &Path) -> bool {
    path.to_str().is_some_and(|p| p.starts_with('@'))
}

/// What `iptun status` shows for one daemon.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    /// `server` or `client`.
    pub role: String,
    /// The TUN device.
    pub tun: String,
    /// The daemon's own tunnel addresses.
    pub addresses: Vec<String>,
    /// Server: where it listens. Client: the server URL.
    pub endpoints: Vec<String>,
    /// One entry per client (server) or the one session (client).
    pub sessions: Vec<SessionStatus>,
    /// Drops not attributed to a session.
    pub drops: BTreeMap<String, u64>,
    /// Server: what became of the handshakes it received, by result
    /// (`cookie_sent`: answered with a cookie, under load).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub handshakes: BTreeMap<String, u64>,
    /// Server: each DNS listener's counters (queries, answers with and
    /// without data, resolver retries, minimisation steps...), by URL.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dns: BTreeMap<String, BTreeMap<String, u64>>,
    /// Client: every candidate path, most preferred first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<CandidateStatus>,
    /// Client: moves of the session from one path to another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moves: Option<u64>,
    /// Client: the path in use failed and the others are being probed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub searching: bool,
    /// Server: what each loop carrying traffic carried (the main loop
    /// first, then the workers: `--workers`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<WorkerStatus>,
}

/// What one of the server's loops carried.
#[derive(Debug, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Datagrams received on its sockets of the UDP listeners.
    pub datagrams: u64,
    /// Packets read from its queue of the TUN device.
    pub tun_packets: u64,
}

/// One of a client's candidate paths.
#[derive(Debug, Serialize, Deserialize)]
pub struct CandidateStatus {
    /// The `--server` URL.
    pub url: String,
    /// `udp`, `icmp`, `dns`, `https` or `http`.
    pub transport: String,
    /// `in use`, `standby`, `failed` or `untried`.
    pub state: String,
    /// Why it failed.
    pub reason: Option<String>,
    /// Seconds until it is probed next.
    pub next_probe_secs: Option<f64>,
    /// A probe is out now.
    #[serde(default)]
    pub probing: bool,
    /// Round-trip time of its last probe (or handshake), in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Seconds since an authenticated message last came by it.
    pub last_heard_secs: Option<f64>,
    /// Times it failed.
    pub failures: u64,
    /// Transport details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// One session.
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionStatus {
    /// The peer's public key.
    pub key: String,
    /// The client's tunnel addresses.
    pub addresses: Vec<String>,
    /// The transport in use (`udp`).
    pub transport: String,
    /// The peer's address on that transport.
    pub endpoint: Option<String>,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    /// Drops by reason.
    pub drops: BTreeMap<String, u64>,
    /// Seconds since the latest handshake completed.
    pub since_handshake_secs: Option<f64>,
    /// Transport details of the path (DNS: encoding, sizes, queries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<serde_json::Value>,
}

impl SessionStatus {
    /// Fill the counters from the engine's numbers.
    pub fn counters(
        mut self,
        traffic: Traffic,
        drops: DropCounters,
        last: Option<Instant>,
        now: Instant,
    ) -> Self {
        self.rx_bytes = traffic.rx_bytes;
        self.rx_packets = traffic.rx_packets;
        self.tx_bytes = traffic.tx_bytes;
        self.tx_packets = traffic.tx_packets;
        self.drops = drop_map(drops);
        self.since_handshake_secs = last.map(|t| now.saturating_duration_since(t).as_secs_f64());
        self
    }
}

/// Drop counters as a name → count map (non-zero only).
pub fn drop_map(drops: DropCounters) -> BTreeMap<String, u64> {
    drops
        .nonzero()
        .map(|(r, n)| (r.name().to_owned(), n))
        .collect()
}

/// A bound control socket; the file is removed on drop.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Bind at `path`, replacing a stale socket that nobody answers on.
    pub fn bind(path: &Path) -> anyhow::Result<Self> {
        let addr =
            socket_addr(path).with_context(|| format!("control socket {}", path.display()))?;
        if !is_abstract(path) {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            if path.exists() && std::os::unix::net::UnixStream::connect(path).is_err() {
                std::fs::remove_file(path)
                    .with_context(|| format!("removing stale {}", path.display()))?;
            }
        }
        let listener = std::os::unix::net::UnixListener::bind_addr(&addr).map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
                ": another iptun runs with this TUN name or control socket"
            } else {
                ""
            };
            anyhow::anyhow!("binding control socket {}: {e}{hint}", path.display())
        })?;
        listener.set_nonblocking(true)?;
        let listener = UnixListener::from_std(listener)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    /// Serve the socket from a task of its own: each request reaches the
    /// daemon's loop through `requests`. The socket file goes with the
    /// runtime (when the daemon stops).
    pub fn spawn(self, requests: mpsc::Sender<Request>) {
        tokio::spawn(async move {
            loop {
                match self.listener.accept().await {
                    Ok((stream, _)) => serve(stream, requests.clone()),
                    // Out of descriptors, say: try again a little later
                    // rather than spin.
                    Err(e) => {
                        tracing::debug!("control socket: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if !is_abstract(&self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What `iptun reload` gets back.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReloadAnswer {
    /// Whether the new key list is in force.
    pub ok: bool,
    /// What changed, or why nothing did.
    pub message: String,
}

/// Serve one connection in the background: read its request, have the
/// event loop answer it, write the answer. A slow or silent peer costs a
/// task, never the loop's time.
pub fn serve(mut stream: UnixStream, requests: mpsc::Sender<Request>) {
    tokio::spawn(async move {
        let line = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream)).await;
        let body = match line {
            Ok(Ok(line)) => answer(&line, &requests).await,
            _ => return,
        };
        let _ = stream.write_all(&body).await;
    });
}

/// The request line, up to a newline or the end of what the peer sends.
async fn read_request(stream: &mut UnixStream) -> std::io::Result<String> {
    let mut line = String::new();
    tokio::io::BufReader::new(stream)
        .take(MAX_REQUEST)
        .read_line(&mut line)
        .await?;
    Ok(line.trim().to_owned())
}

/// The JSON answer to one request line.
async fn answer(line: &str, requests: &mpsc::Sender<Request>) -> Vec<u8> {
    let json = match line {
        // Nothing at all: `socat` and friends asking for the status.
        "" | "status" => service::ask(requests, Request::Status)
            .await
            .map(|s| serde_json::to_value(s).expect("status serializes")),
        "reload" => service::ask(requests, Request::Reload).await.map(|r| {
            let (ok, message) = match r {
                Ok(m) => (true, m),
                Err(m) => (false, m),
            };
            serde_json::to_value(ReloadAnswer { ok, message }).expect("serializes")
        }),
        other => Some(serde_json::json!({
            "ok": false,
            "message": format!("unknown request `{other}` (status or reload)"),
        })),
    };
    json.map(|j| j.to_string().into_bytes()).unwrap_or_default()
}

/// Send `request` to the daemon at `path` and read its whole answer.
async fn exchange(path: &Path, request: &str) -> anyhow::Result<Vec<u8>> {
    let connect = || -> std::io::Result<UnixStream> {
        let stream = std::os::unix::net::UnixStream::connect_addr(&socket_addr(path)?)?;
        stream.set_nonblocking(true)?;
        UnixStream::from_std(stream)
    };
    let mut stream = connect()
        .with_context(|| format!("connecting to {} (is the daemon running?)", path.display()))?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .await
        .with_context(|| format!("writing to {}", path.display()))?;
    let mut body = Vec::new();
    stream
        .read_to_end(&mut body)
        .await
        .with_context(|| format!("reading from {}", path.display()))?;
    Ok(body)
}

/// Ask the daemon at `path` for its status.
pub async fn query(path: &Path) -> anyhow::Result<Status> {
    let body = exchange(path, "status").await?;
    serde_json::from_slice(&body).with_context(|| format!("bad answer from {}", path.display()))
}

/// Ask the daemon at `path` to re-read its admitted keys.
pub async fn reload(path: &Path) -> anyhow::Result<ReloadAnswer> {
    let body = exchange(path, "reload").await?;
    serde_json::from_slice(&body).with_context(|| format!("bad answer from {}", path.display()))
}

/// Every listening default control socket in this network namespace
/// (from `/proc/net/unix`, where abstract names show with a leading `@`).
pub fn all_sockets() -> Vec<PathBuf> {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let mut paths: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split_whitespace().nth(7))
        .filter(|name| name.starts_with(ABSTRACT_PREFIX))
        .map(PathBuf::from)
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

/// Human-readable status.
pub fn render(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} on {}  addresses {}  {}",
        s.role,
        s.tun,
        s.addresses.join(", "),
        s.endpoints.join(", ")
    );
    if !s.handshakes.is_empty() {
        let _ = writeln!(out, "  handshakes: {}", fmt_drops(&s.handshakes));
    }
    if !s.drops.is_empty() {
        let _ = writeln!(out, "  dropped (no session): {}", fmt_drops(&s.drops));
    }
    for (url, counters) in &s.dns {
        let _ = writeln!(out, "  {url}: {}", fmt_drops(counters));
    }
    if s.workers.len() > 1 {
        let each: Vec<String> = s
            .workers
            .iter()
            .map(|w| format!("{}/{}", w.datagrams, w.tun_packets))
            .collect();
        let _ = writeln!(
            out,
            "  {} workers, datagrams received/TUN packets read: {}",
            s.workers.len(),
            each.join(", ")
        );
    }
    for x in &s.sessions {
        let _ = writeln!(out, "  peer {}", x.key);
        let _ = writeln!(out, "    addresses: {}", x.addresses.join(", "));
        let _ = writeln!(
            out,
            "    transport: {} {}",
            x.transport,
            x.endpoint.as_deref().unwrap_or("(none yet)")
        );
        let _ = writeln!(
            out,
            "    received: {} B in {} packets; sent: {} B in {} packets",
            x.rx_bytes, x.rx_packets, x.tx_bytes, x.tx_packets
        );
        match x.since_handshake_secs {
            Some(t) => writeln!(out, "    latest handshake: {t:.1} s ago"),
            None => writeln!(out, "    latest handshake: none"),
        }
        .ok();
        if let Some(path) = x.path.as_ref().and_then(fmt_path) {
            let _ = writeln!(out, "    path: {path}");
        }
        // Nested settings (a DNS path's sizes up and down) on lines of their
        // own; counters only in `--json`.
        for (k, v) in x.path.iter().filter_map(|p| p.as_object()).flatten() {
            if let serde_json::Value::Object(_) = v
                && k != "stats"
                && let Some(line) = fmt_path(v)
            {
                let _ = writeln!(out, "    {k}: {line}");
            }
        }
        let resolvers = x.path.as_ref().and_then(|p| p.get("resolvers"));
        for r in resolvers.and_then(|r| r.as_array()).into_iter().flatten() {
            if let Some(line) = fmt_path(r) {
                let _ = writeln!(out, "    resolver: {line}");
            }
        }
        if !x.drops.is_empty() {
            let _ = writeln!(out, "    dropped: {}", fmt_drops(&x.drops));
        }
    }
    if !s.paths.is_empty() {
        let moves = s.moves.unwrap_or(0);
        let searching = if s.searching {
            "; the path in use failed, probing the others"
        } else {
            ""
        };
        let _ = writeln!(out, "  paths (moves: {moves}{searching}):");
        for p in &s.paths {
            let _ = writeln!(out, "    {}", fmt_candidate(p));
        }
    }
    out
}

/// `* udp://h:3000  in use, rtt 0.3 ms` (the star marks the path in use).
fn fmt_candidate(p: &CandidateStatus) -> String {
    let mark = if p.state == "in use" { '*' } else { ' ' };
    let mut parts = vec![p.state.clone()];
    if let Some(why) = &p.reason {
        parts[0] = format!("{} ({why})", p.state);
    }
    if let Some(rtt) = p.rtt_ms {
        parts.push(format!("rtt {rtt:.1} ms"));
    }
    if p.probing {
        parts.push("probing".into());
    } else if let Some(t) = p.next_probe_secs {
        parts.push(format!("next probe in {t:.0} s"));
    }
    if p.failures > 0 {
        parts.push(format!("failed {} times", p.failures));
    }
    format!("{mark} {:<40} {}", p.url, parts.join(", "))
}

/// The path's plain settings (`mode websocket, reconnects 0, ...`); nested
/// counters and unset fields only in `--json`.
fn fmt_path(path: &serde_json::Value) -> Option<String> {
    let fields: Vec<String> = path
        .as_object()?
        .iter()
        .filter_map(|(k, v)| match v {
            serde_json::Value::String(s) => Some(format!("{k} {s}")),
            serde_json::Value::Number(n) => Some(format!("{k} {n}")),
            serde_json::Value::Bool(b) => Some(format!("{k} {b}")),
            _ => None,
        })
        .collect();
    (!fields.is_empty()).then(|| fields.join(", "))
}

fn fmt_drops(d: &BTreeMap<String, u64>) -> String {
    d.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

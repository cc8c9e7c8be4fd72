//! The client's sockets, one driver per candidate path: they send what the
//! [`Connection`] gives them and hand it what arrives. No protocol here.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs as _};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use anyhow::Context as _;
use bytes::Bytes;
use iptun_proto::connection::{Connection, PathConfig, PathEvent, PathId, Remote, Transmit};
use iptun_proto::crypto::PollKey;
use iptun_proto::transport::http::{Command, LEN_PREFIX, MAX_MESSAGE, PollSigner};
use iptun_proto::wire::dns::Domain;
use tokio::sync::mpsc;

use super::Core;
use super::dns::DnsDriver;
use crate::daemon::MAX_BATCHES_PER_WAKEUP;
use crate::transport::HeldSend;
use crate::transport::http_client::{self, Down, Mode, Proxy};
use crate::transport::icmp::{IcmpSocket, Role};
use crate::transport::tls::{self, Trust};
use crate::transport::udp::{self, UdpReceiver, UdpSender};
use crate::tun::PacketWriter;
use crate::url::{HttpUrl, ServerAddr};

/// The client's HTTP settings besides the URL.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    pub trust: Trust,
    /// `--proxy` as given (`None`: from the environment).
    pub proxy: Option<String>,
    pub mode: Mode,
}

/// Batches queued for an HTTP connection task; beyond, new ones are
/// dropped (a short outer queue keeps the inner TCP's delay short).
const UP_QUEUE: usize = 32;

/// One candidate path's socket.
pub enum PathDriver {
    Udp {
        rx: UdpReceiver,
        tx: UdpSender,
        server: SocketAddr,
    },
    Icmp {
        socket: IcmpSocket,
        buf: Vec<u8>,
    },
    Dns(Box<DnsDriver>),
    Http(Box<HttpDriver>),
}

/// An HTTP path: channels to its connection task.
pub struct HttpDriver {
    url: HttpUrl,
    proxy: Option<Proxy>,
    first_hop: SocketAddr,
    commands: mpsc::Sender<Command>,
    up: mpsc::Sender<Bytes>,
    down: mpsc::Receiver<Down>,
    /// What `poll_readable` took off the channel, for `receive`.
    pending: Option<Down>,
    /// Framed messages being gathered into one body.
    batch: Vec<u8>,
    /// Batches dropped because the connection could not take them.
    dropped: u64,
    task: tokio::task::JoinHandle<()>,
    /// Signs the task's long-poll requests.
    signer: Arc<Mutex<PollSigner>>,
}

impl Drop for HttpDriver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Open the socket for a resolved server address, and say how the core
/// reaches the server through it.
pub fn open(server: ServerAddr, http: &HttpOptions) -> anyhow::Result<(PathDriver, PathConfig)> {
    let mut random = [0u8; 16];
    getrandom::fill(&mut random).map_err(|e| anyhow::anyhow!("getrandom: {e}"))?;
    let r64 = |i: usize| u64::from_le_bytes(random[i..i + 8].try_into().expect("8 bytes"));
    Ok(match server {
        ServerAddr::Udp(to) => {
            let (rx, tx) = udp::bind_for(to)?;
            let driver = PathDriver::Udp { rx, tx, server: to };
            (driver, PathConfig::Udp { server: to })
        }
        ServerAddr::Icmp(to) => {
            let family = if to.is_ipv4() {
                iptun_proto::wire::icmp::Family::V4
            } else {
                iptun_proto::wire::icmp::Family::V6
            };
            let socket = IcmpSocket::open(family, Role::Client)?;
            let driver = PathDriver::Icmp {
                socket,
                buf: vec![0; 1 << 16],
            };
            (
                driver,
                PathConfig::Icmp {
                    server: to,
                    id: r64(0) as u16,
                },
            )
        }
        ServerAddr::Dns {
            domain,
            resolvers,
            max_query,
        } => {
            let domain =
                Domain::new(&domain).with_context(|| format!("tunnel domain `{domain}`"))?;
            let driver = DnsDriver::open(resolvers, http)?;
            let config = PathConfig::Dns {
                domain,
                resolvers: driver.count(),
                max_query,
                tag: r64(0) as u32,
                seed: r64(8),
            };
            (PathDriver::Dns(Box::new(driver)), config)
        }
        ServerAddr::Http(url) => {
            let driver = HttpDriver::open(url, http, r64(0))?;
            let config = PathConfig::Http {
                mode: http.mode.into(),
            };
            (PathDriver::Http(Box::new(driver)), config)
        }
    })
}

impl PathDriver {
    /// Addresses on the underlay this path talks to (the server, the
    /// resolvers, the proxy): `--route default` keeps them outside the tunnel.
    pub fn underlay(&self, conn: &Connection, path: PathId) -> Vec<IpAddr> {
        match self {
            Self::Http(h) => vec![h.first_hop.ip()],
            Self::Dns(d) => d.underlay(),
            Self::Udp { .. } | Self::Icmp { .. } => conn.server_ip(path).into_iter().collect(),
        }
    }

    /// Send a packet from the TUN device: `seal` writes it into this
    /// path's send buffer (batched on UDP and HTTP: call [`PathDriver::flush`]).
    pub fn send_with(
        &mut self,
        seal: impl FnOnce(&mut [u8]) -> Option<Transmit>,
    ) -> Option<PathEvent> {
        match self {
            Self::Udp { tx, server, .. } => {
                tx.send_with((*server).into(), |buf| seal(buf).map(|t| t.len));
                None
            }
            Self::Icmp { socket, buf } => {
                let t = seal(buf)?;
                let Remote::Addr(to) = t.to else { return None };
                socket
                    .send(to.ip(), None, &buf[..t.len])
                    .err()
                    .map(unreachable)
            }
            Self::Dns(d) => {
                d.send_with(seal);
                None
            }
            Self::Http(h) => {
                let start = h.batch.len();
                h.batch.resize(start + LEN_PREFIX + MAX_MESSAGE, 0);
                let len = seal(&mut h.batch[start..]).map_or(0, |t| t.len);
                h.batch.truncate(start + len);
                if h.batch.len() >= iptun_proto::transport::http::BATCH_TARGET {
                    h.flush();
                }
                None
            }
        }
    }

    /// Send a copy of what [`Connection::poll_transmit`] made.
    pub fn send(&mut self, t: Transmit, bytes: &[u8]) -> Option<PathEvent> {
        self.send_with(|buf| {
            buf.get_mut(..t.len)?.copy_from_slice(&bytes[..t.len]);
            Some(t)
        })
    }

    /// Send whatever is batched.
    pub fn flush(&mut self) {
        match self {
            Self::Udp { tx, .. } => tx.flush(),
            Self::Http(h) => h.flush(),
            Self::Icmp { .. } | Self::Dns(_) => {}
        }
    }

    /// The UDP or ICMP socket's sending side.
    fn held(&self) -> Option<&dyn HeldSend> {
        match self {
            Self::Udp { tx, .. } => Some(tx),
            Self::Icmp { socket, .. } => Some(socket),
            Self::Dns(_) | Self::Http(_) => None,
        }
    }

    fn held_mut(&mut self) -> Option<&mut dyn HeldSend> {
        match self {
            Self::Udp { tx, .. } => Some(tx),
            Self::Icmp { socket, .. } => Some(socket),
            Self::Dns(_) | Self::Http(_) => None,
        }
    }

    /// A UDP or ICMP send waits for room in the socket buffer: send
    /// nothing new here until [`PathDriver::poll_writable`] and
    /// [`PathDriver::retry`].
    pub fn is_blocked(&self) -> bool {
        self.held().is_some_and(HeldSend::is_blocked)
    }

    /// Ready when blocked and the socket may have room again.
    pub fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.held().map_or(Poll::Pending, |h| h.poll_writable(cx))
    }

    /// Send what waited for room (it may have to wait again).
    pub fn retry(&mut self) {
        if let Some(h) = self.held_mut() {
            h.retry();
        }
    }

    /// Datagrams dropped because the socket buffer stayed full, with the
    /// drop counter they are shown under.
    pub fn send_dropped(&self) -> Option<(&'static str, u64)> {
        self.held().map(|h| (h.drop_counter(), h.dropped()))
    }

    /// For a UDP path, another descriptor of its socket and the server's
    /// address (for a worker to send on).
    pub fn udp_socket(&self) -> std::io::Result<Option<(std::net::UdpSocket, SocketAddr)>> {
        match self {
            Self::Udp { rx, server, .. } => Ok(Some((rx.try_clone_socket()?, *server))),
            _ => Ok(None),
        }
    }

    /// Datagrams a UDP path's socket received.
    pub fn datagrams_received(&self) -> Option<u64> {
        match self {
            Self::Udp { rx, .. } => Some(rx.received()),
            _ => None,
        }
    }

    /// Ready to receive.
    pub fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self {
            Self::Udp { rx, .. } => rx.poll_readable(cx),
            Self::Icmp { socket, .. } => socket.poll_readable(cx),
            Self::Dns(d) => d.poll_readable(cx),
            Self::Http(h) => h.poll_readable(cx),
        }
    }

    /// Drain what arrived (up to a bound) into the connection and the TUN
    /// device. Returns whether the source ran dry. The connection's lock
    /// is held per datagram (or message, or batch of answers), never
    /// across an await, nor around the UDP and ICMP sockets' syscalls.
    pub async fn receive(
        &mut self,
        conn: &Core,
        path: PathId,
        tun: &mut impl PacketWriter,
    ) -> anyhow::Result<bool> {
        let dry = match self {
            Self::Udp { rx, .. } => {
                for _ in 0..MAX_BATCHES_PER_WAKEUP {
                    let now = Instant::now();
                    let r = rx.try_recv_batch(|peer, datagram| {
                        let from = Remote::Addr(peer.addr);
                        conn.lock().handle_input(now, path, from, datagram, tun);
                    });
                    match r {
                        Ok(()) => tun.flush().await.context("writing to the TUN device")?,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(true),
                        Err(e) if is_unreachable(&e) => {
                            conn.lock().handle_path_event(now, path, unreachable(e));
                        }
                        Err(e) => return Err(e).context("receiving on the UDP socket"),
                    }
                }
                false
            }
            Self::Icmp { socket, buf } => socket
                .drain(buf, MAX_BATCHES_PER_WAKEUP * 8, |r| {
                    let from = Remote::Addr(SocketAddr::new(r.from, 0));
                    conn.lock()
                        .handle_input(Instant::now(), path, from, r.icmp, tun);
                })
                .context("receiving on the ICMP socket")?,
            // Not a fast path: the lock is held for the whole batch.
            Self::Dns(d) => d.receive(&mut conn.lock(), path, tun)?,
            Self::Http(h) => {
                let mut dry = false;
                for _ in 0..MAX_BATCHES_PER_WAKEUP {
                    let Some(down) = h.pending.take().or_else(|| h.down.try_recv().ok()) else {
                        dry = true;
                        break;
                    };
                    let now = Instant::now();
                    match down {
                        Down::Data(body) => {
                            conn.lock()
                                .handle_input(now, path, Remote::Connection, &body, tun);
                        }
                        Down::Event(e) => {
                            conn.lock().handle_path_event(now, path, PathEvent::Http(e));
                        }
                    }
                    tun.flush().await.context("writing to the TUN device")?;
                }
                dry
            }
        };
        tun.flush().await.context("writing to the TUN device")?;
        Ok(dry)
    }

    /// Give an HTTP path's long-poll requests the client's current poll
    /// key (call whenever the engine may have new keys).
    pub fn set_poll_key(&self, key: Option<(u32, &PollKey)>) {
        if let Self::Http(h) = self {
            http_client::set_poll_key(&h.signer, key);
        }
    }

    /// Tell an HTTP path's task to open or close its connection.
    pub fn command(&mut self, command: Command) {
        if let Self::Http(h) = self
            && h.commands.try_send(command).is_err()
        {
            tracing::warn!("HTTP path {}: command queue full", h.url);
        }
    }

    /// The name of a DNS path's resolver number `i` (a plain one's
    /// address, `tls://...`, `https://...`).
    pub fn resolver(&self, i: usize) -> Option<String> {
        match self {
            Self::Dns(d) => d.resolver_name(i),
            _ => None,
        }
    }

    /// Transport details the core does not know, for status.
    pub fn info(&self) -> serde_json::Value {
        match self {
            Self::Http(h) => serde_json::json!({
                "proxy": h.proxy.as_ref().map(|p| p.authority.clone()),
                "dropped_batches": h.dropped,
            }),
            Self::Dns(d) => d.info(),
            _ => serde_json::Value::Null,
        }
    }
}

fn is_unreachable(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | HostUnreachable | NetworkUnreachable
    )
}

fn unreachable(e: std::io::Error) -> PathEvent {
    PathEvent::Unreachable(format!("unreachable: {e}"))
}

/// The address a connection to `url` opens to: the proxy's, or the server's.
pub(super) fn first_hop(url: &HttpUrl, proxy: Option<&Proxy>) -> anyhow::Result<SocketAddr> {
    let (host, port) = match proxy {
        Some(p) => {
            let (h, port) = p.authority.rsplit_once(':').expect("authority has a port");
            (h.trim_matches(['[', ']']).to_owned(), port.parse()?)
        }
        None => (url.host.clone(), url.port),
    };
    (host.as_str(), port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))
}

impl HttpDriver {
    fn open(url: HttpUrl, options: &HttpOptions, tag: u64) -> anyhow::Result<Self> {
        let proxy =
            http_client::proxy_for(&url, options.proxy.as_deref(), |k| std::env::var(k).ok())?;
        let first_hop = first_hop(&url, proxy.as_ref())?;
        let tls = if url.tls {
            Some(tls::client(&options.trust)?)
        } else {
            None
        };
        let signer = Arc::new(Mutex::new(PollSigner::new(tag)));
        let config = http_client::Config {
            url: url.clone(),
            connect_to: first_hop,
            proxy: proxy.clone(),
            tls,
            signer: signer.clone(),
        };
        let (commands, commands_rx) = mpsc::channel(8);
        let (up, up_rx) = mpsc::channel(UP_QUEUE);
        let (down_tx, down) = mpsc::channel(UP_QUEUE);
        let task = tokio::spawn(http_client::run(config, commands_rx, up_rx, down_tx));
        Ok(Self {
            url,
            proxy,
            first_hop,
            commands,
            up,
            down,
            pending: None,
            batch: Vec::new(),
            dropped: 0,
            task,
            signer,
        })
    }

    fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let body = Bytes::copy_from_slice(&self.batch);
        self.batch.clear();
        if self.up.try_send(body).is_err() {
            self.dropped += 1;
        }
    }

    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.pending.is_none() {
            match self.down.poll_recv(cx) {
                Poll::Ready(Some(d)) => self.pending = Some(d),
                Poll::Ready(None) => {
                    return Poll::Ready(Err(std::io::Error::other("the HTTP task ended")));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

//! The server daemon: one TUN device, listeners on any mix of transports,
//! the sans-IO [`Server`] engine in between.

mod dns;
mod http;
mod icmp;

use std::future::poll_fn;
use std::net::IpAddr;
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use iptun_proto::engine::{PathKind, Server, ServerConfig, ServerOutput, SessionId};
use iptun_proto::pool::AddressPool;
use iptun_proto::wire::icmp::Family;

use crate::cli::ServerArgs;
use crate::control::{self, ControlSocket, SessionStatus, Status};
use crate::daemon::{self, DropReporter, MAX_BATCHES_PER_WAKEUP};
use crate::netcfg::{self, Undo};
use crate::transport::icmp::{IcmpSocket, Role};
use crate::transport::tls;
use crate::transport::udp::{self, Peer, UdpReceiver, UdpSender};
use crate::tun::Tun;
use crate::url::Listen;

/// A way back to a client: which transport and socket, and the address on it.
/// New transports add variants here; the engine only compares and clones them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// UDP listener `socket`, client address and our address it talks to.
    Udp { socket: usize, peer: Peer },
    /// ICMP socket `socket`, client address `ip`; replies can only answer the
    /// session's held requests, so the session is part of the path.
    Icmp {
        socket: usize,
        ip: IpAddr,
        session: Option<SessionId>,
    },
    /// DNS listener `socket`, client `tag`: answers ride on the tag's held
    /// queries, whichever resolver sent them; once bound, by session.
    Dns {
        socket: usize,
        tag: u32,
        session: Option<SessionId>,
    },
    /// WebSocket connection `conn` on HTTP listener `listener`.
    Ws { listener: usize, conn: u64 },
    /// Long-poll client `tag` on HTTP listener `listener`: downstream
    /// messages wait in its mailbox for its next request.
    Poll { listener: usize, tag: u64 },
}

impl PathKind for Path {
    fn is_polled(&self) -> bool {
        matches!(self, Self::Icmp { .. } | Self::Dns { .. })
    }
}

impl Path {
    fn transport(&self, senders: &Senders) -> &'static str {
        match self {
            Self::Udp { .. } => "udp",
            Self::Icmp { .. } => "icmp",
            Self::Dns { .. } => "dns",
            Self::Ws { listener, .. } | Self::Poll { listener, .. } => {
                senders.http.scheme(*listener)
            }
        }
    }

    fn endpoint(&self) -> String {
        match self {
            Self::Udp { peer, .. } => peer.addr.to_string(),
            Self::Icmp { ip, .. } => ip.to_string(),
            Self::Dns { tag, .. } => format!("tag {tag:08x}"),
            Self::Ws { conn, .. } => format!("websocket {conn}"),
            Self::Poll { tag, .. } => format!("long-poll {tag:016x}"),
        }
    }
}

/// Everything that sends to clients: UDP batches, and the ICMP sockets with
/// the echo requests held for answering.
struct Senders {
    udp: Vec<UdpSender>,
    icmp: icmp::Listeners,
    dns: dns::Listeners,
    http: http::Listeners,
}

impl Senders {
    fn send(&mut self, path: Path, msg: &[u8]) {
        match path {
            Path::Udp { socket, peer } => self.udp[socket].send(peer, msg),
            Path::Icmp {
                session: Some(session),
                ..
            } => self.icmp.downstream(session, msg),
            // No request to answer yet: the client's next one will fetch it.
            Path::Icmp { session: None, .. } => {}
            Path::Dns {
                socket,
                tag,
                session,
            } => self.dns.send(socket, tag, session, msg),
            Path::Ws { .. } | Path::Poll { .. } => self.http.send(path, msg),
        }
    }

    fn flush(&mut self) {
        self.udp.iter_mut().for_each(UdpSender::flush);
        self.http.flush();
    }
}

/// Settings after defaults and validation.
struct Settings {
    config: ServerConfig,
    listen: Vec<Listen>,
    tun: String,
    nat: bool,
    control: std::path::PathBuf,
    offload: bool,
    /// For `https://` listeners.
    tls: Option<tls::ServerTls>,
}

fn settings(args: ServerArgs) -> anyhow::Result<Settings> {
    let args = args.merged()?;
    let private_key = daemon::read_private_key(args.private_key.as_deref())?;
    let mut allowed = Vec::new();
    for key in &args.allow {
        allowed.push(daemon::parse_public_key(key, "--allow")?);
    }
    if let Some(file) = &args.allow_file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading --allow-file {}", file.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if !line.is_empty() {
                allowed.push(daemon::parse_public_key(
                    line,
                    &format!("{}:{}", file.display(), n + 1),
                )?);
            }
        }
    }
    if allowed.is_empty() {
        tracing::warn!("no client is admitted: give --allow PUBKEY or --allow-file FILE");
    }
    let pool4: Ipv4Net = args
        .pool
        .as_deref()
        .unwrap_or("10.1.0.0/24")
        .parse()
        .with_context(|| {
            format!(
                "--pool `{}`: expected an IPv4 CIDR",
                args.pool.as_deref().unwrap_or_default()
            )
        })?;
    let pool6: Option<Ipv6Net> = match args.pool6.as_deref() {
        Some("none") => None,
        Some(p) => Some(
            p.parse()
                .with_context(|| format!("--pool6 `{p}`: expected an IPv6 CIDR or `none`"))?,
        ),
        None => Some("fd69:7074:756e::/64".parse().expect("valid")),
    };
    let pool = AddressPool::new(pool4, pool6).context("--pool/--pool6")?;
    let listen = if args.listen.is_empty() {
        vec!["udp://0.0.0.0:3000".to_owned()]
    } else {
        args.listen
    };
    let listen = listen
        .iter()
        .map(|l| l.parse())
        .collect::<anyhow::Result<Vec<Listen>>>()?;
    let wants_tls = listen
        .iter()
        .any(|l| matches!(l, Listen::Http { tls: true, .. }));
    let tls = if wants_tls {
        Some(tls::server(
            args.tls_cert.as_deref(),
            args.tls_key.as_deref(),
            &private_key,
        )?)
    } else {
        anyhow::ensure!(
            args.tls_cert.is_none() && args.tls_key.is_none(),
            "--tls-cert/--tls-key: no https:// listener to use them"
        );
        None
    };
    let mut config = ServerConfig::new(private_key, allowed, pool);
    if let Some(mtu) = args.mtu {
        anyhow::ensure!(
            (576..=65000).contains(&mtu),
            "--mtu {mtu}: must be between 576 and 65000"
        );
        config.mtu = mtu;
    }
    if let Some(k) = args.keepalive {
        anyhow::ensure!(k >= 1, "--keepalive must be at least 1 second");
        config.keepalive_secs = k;
    }
    let tun = args.tun.unwrap_or_else(|| "iptun0".to_owned());
    Ok(Settings {
        config,
        listen,
        control: args.control.unwrap_or_else(|| control::default_path(&tun)),
        tun,
        nat: args.nat,
        offload: !args.no_offload,
        tls,
    })
}

/// Run the server until SIGINT/SIGTERM.
pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let s = settings(args)?;
    let now = Instant::now();
    let mut engine: Server<Path> = Server::new(s.config, now);
    let control = ControlSocket::bind(&s.control)?;
    let mut tun = Tun::create(&s.tun, s.offload)?;
    let me = engine.addresses();
    let mut addrs = vec![IpNet::new(me.v4.into(), engine.pool().net4().prefix_len())?];
    if let (Some(v6), Some(net6)) = (me.v6, engine.pool().net6()) {
        addrs.push(IpNet::new(v6.into(), net6.prefix_len())?);
    }
    netcfg::configure_interface(tun.name(), &addrs, engine.mtu())?;
    let mut undo = Undo::new();
    if s.nat {
        netcfg::enable_nat(
            &mut undo,
            tun.name(),
            engine.pool().net4(),
            engine.pool().net6(),
        )?;
    }
    let mut receivers = Vec::new();
    let mut senders = Senders {
        udp: Vec::new(),
        icmp: icmp::Listeners::new(),
        dns: dns::Listeners::new(),
        http: http::Listeners::new(),
    };
    let mut endpoints = Vec::new();
    for l in &s.listen {
        match l {
            &Listen::Udp(addr) => {
                let (rx, tx) = udp::bind(addr)?;
                endpoints.push(format!("udp://{}", rx.local_addr()?));
                receivers.push(rx);
                senders.udp.push(tx);
            }
            &Listen::Icmp(family) => {
                senders
                    .icmp
                    .add(IcmpSocket::open(family, Role::Server)?, &mut undo)?;
                endpoints.push(match family {
                    Family::V4 => "icmp://0.0.0.0".to_owned(),
                    Family::V6 => "icmp://[::]".to_owned(),
                });
            }
            Listen::Dns { addr, domain } => {
                let local = senders.dns.add(*addr, domain)?;
                endpoints.push(format!("dns://{local}?domain={domain}"));
            }
            Listen::Http { addr, path, tls } => {
                let config = if *tls {
                    s.tls.as_ref().map(|t| t.config.clone())
                } else {
                    None
                };
                let local = senders.http.add(*addr, path, config).await?;
                endpoints.push(match (&s.tls, tls) {
                    (Some(t), true) if t.self_signed => {
                        format!("https://{local}{path} (self-signed, pin {})", t.pin)
                    }
                    (Some(t), true) => format!("https://{local}{path} (pin {})", t.pin),
                    _ => format!("http://{local}{path}"),
                });
            }
        }
    }
    if let Some(t) = s.tls.as_ref().filter(|t| t.self_signed) {
        tracing::info!(
            "TLS certificate pin: {} (self-signed; clients give --tls-pin {})",
            t.pin,
            t.pin
        );
    }
    for e in &endpoints {
        tracing::info!("listening on {e}");
    }
    let addr_text: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    tracing::info!("server up on {} with {}", tun.name(), addr_text.join(", "));

    // Where packets from the TUN device are sealed before joining a send batch.
    let mut seal_buf = vec![0u8; 1 << 16];
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut drops = DropReporter::new();
    let shutdown = daemon::shutdown_signal();
    tokio::pin!(shutdown);
    // The poll transports' timer (DNS holds of 600 ms, HTTP long-poll holds:
    // finer than the ticker), moved only when their deadline changes.
    let poll_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(poll_timer);
    let never = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    loop {
        let deadline = [senders.dns.next_timeout(), senders.http.next_timeout()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(never);
        if poll_timer.deadline() != deadline.into() {
            poll_timer.as_mut().reset(deadline.into());
        }
        tokio::select! {
            () = &mut shutdown => break,
            r = tun.readable() => {
                r.context("waiting on the TUN device")?;
                if !from_tun(&mut engine, &mut tun, &mut senders, &mut seal_buf)? {
                    tokio::task::yield_now().await;
                }
            }
            i = poll_fn(|cx| ready_receiver(&receivers, cx)) => {
                if !from_network(&mut engine, &mut tun, &mut receivers[i], i, &mut senders).await? {
                    tokio::task::yield_now().await;
                }
            }
            i = poll_fn(|cx| senders.icmp.poll_readable(cx)) => {
                if !icmp::receive(&mut engine, &mut tun, &mut senders, i).await? {
                    tokio::task::yield_now().await;
                }
            }
            i = poll_fn(|cx| senders.dns.poll_readable(cx)) => {
                if !dns::receive(&mut engine, &mut tun, &mut senders, i).await? {
                    tokio::task::yield_now().await;
                }
            }
            ev = senders.http.next_event() => {
                if let Some(ev) = ev {
                    http::receive(&mut engine, &mut tun, &mut senders, ev).await.context("writing to the TUN device")?;
                }
            }
            () = &mut poll_timer => {
                let now = Instant::now();
                senders.dns.handle_timeout(&mut engine, now);
                senders.http.handle_timeout(now);
            }
            _ = ticker.tick() => {
                let now = Instant::now();
                engine.poll_timers(now);
                senders.icmp.expire(&mut engine, now);
                drops.tick(now, total_drops(&engine));
            }
            conn = control.accept() => {
                if let Ok(conn) = conn {
                    let mut st = status(&engine, &senders, tun.name(), &addr_text, &endpoints);
                    senders.icmp.add_drops(&mut st.drops);
                    senders.dns.add_drops(&mut st.drops);
                    senders.http.add_drops(&mut st.drops);
                    control::reply(conn, &st);
                }
            }
        }
    }
    drop(undo);
    Ok(())
}

fn ready_receiver(receivers: &[UdpReceiver], cx: &mut std::task::Context<'_>) -> Poll<usize> {
    for (i, r) in receivers.iter().enumerate() {
        if r.poll_readable(cx).is_ready() {
            return Poll::Ready(i);
        }
    }
    Poll::Pending
}

/// Drain the TUN device (up to a bound): seal each packet for the client
/// that owns its destination. Returns whether the device ran dry.
fn from_tun(
    engine: &mut Server<Path>,
    tun: &mut Tun,
    senders: &mut Senders,
    out: &mut [u8],
) -> anyhow::Result<bool> {
    let mut dry = false;
    for _ in 0..MAX_BATCHES_PER_WAKEUP {
        let now = Instant::now();
        let result = tun.try_read_batch(|packet| {
            if let Ok(ServerOutput::Send(path, msg)) = engine.handle_tun_packet(now, packet, out) {
                senders.send(path, msg);
            }
        });
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                dry = true;
                break;
            }
            Err(e) => return Err(e).context("reading the TUN device"),
        }
    }
    senders.flush();
    Ok(dry)
}

/// Drain one socket (up to a bound): open each datagram, write packets to the
/// TUN device in one coalesced batch, send replies and client-to-client
/// packets. Returns whether the socket ran dry.
async fn from_network(
    engine: &mut Server<Path>,
    tun: &mut Tun,
    receiver: &mut UdpReceiver,
    socket: usize,
    senders: &mut Senders,
) -> anyhow::Result<bool> {
    let mut dry = false;
    for _ in 0..MAX_BATCHES_PER_WAKEUP {
        let now = Instant::now();
        let result = receiver.try_recv_batch(|peer, datagram| {
            let from = Path::Udp { socket, peer };
            let Some(buf) = tun.stage_buffer(datagram.len()) else {
                return;
            };
            match engine.handle_datagram(now, &from, datagram, buf) {
                Ok(ServerOutput::Tun(packet)) => {
                    let n = packet.len();
                    tun.commit(n);
                }
                Ok(ServerOutput::Send(path, msg)) => senders.send(path, msg),
                Ok(ServerOutput::Nothing) | Err(_) => {}
            }
        });
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                dry = true;
                break;
            }
            Err(e) => return Err(e).context("receiving on a UDP socket"),
        }
        tun.flush().await.context("writing to the TUN device")?;
    }
    senders.flush();
    Ok(dry)
}

fn total_drops(engine: &Server<Path>) -> iptun_proto::DropCounters {
    let mut all = engine.drops();
    engine.sessions().iter().for_each(|s| all.merge(&s.drops));
    all
}

fn status(
    engine: &Server<Path>,
    senders: &Senders,
    tun: &str,
    addresses: &[String],
    endpoints: &[String],
) -> Status {
    let now = Instant::now();
    let sessions = engine
        .sessions()
        .into_iter()
        .map(|s| {
            SessionStatus {
                key: s.key.to_base64(),
                addresses: std::iter::once(s.lease.v4.to_string())
                    .chain(s.lease.v6.map(|a| a.to_string()))
                    .collect(),
                transport: s.path.map_or("none", |p| p.transport(senders)).to_owned(),
                endpoint: s.path.map(|p| p.endpoint()),
                rx_bytes: 0,
                rx_packets: 0,
                tx_bytes: 0,
                tx_packets: 0,
                drops: Default::default(),
                since_handshake_secs: None,
                path: None,
            }
            .counters(s.traffic, s.drops, s.last_handshake, now)
        })
        .collect();
    Status {
        role: "server".into(),
        tun: tun.into(),
        addresses: addresses.to_vec(),
        endpoints: endpoints.to_vec(),
        sessions,
        drops: control::drop_map(engine.drops()),
    }
}

//! The server daemon: one TUN device, listeners on any mix of transports
//! (one socket or HTTP listener each), and the sans-IO [`Endpoint`] in
//! between, which owns the sessions and every transport's state.
//!
//! Beside the packets, the loop answers the control socket and the metrics
//! endpoint (through [`Request`]s), and re-reads `--allow-file` on SIGHUP.

mod budget;
mod http;
mod worker;

use std::future::poll_fn;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use iptun_proto::crypto::PublicKey;
use iptun_proto::endpoint::{Destination, Endpoint, Input, ListenerConfig, Reservation, Transmit};
use iptun_proto::engine::ServerConfig;
use iptun_proto::pool::AddressPool;
use iptun_proto::transport::Kind;
use iptun_proto::wire::dns::Domain;
use iptun_proto::wire::icmp::Family;

use crate::capture::Capture;
use crate::cli::ServerArgs;
use crate::control::{self, ControlSocket, SessionStatus, Status};
use crate::daemon::{self, MAX_BATCHES_PER_WAKEUP};
use crate::metrics::{self, ListenerLabel};
use crate::netcfg::{self, Undo};
use crate::service::{self, Request};
use crate::transport::HeldSend;
use crate::transport::icmp::{self, IcmpSocket, Role};
use crate::transport::tls;
use crate::transport::udp::{self, UdpReceiver, UdpSender};
use crate::tun::Tun;
use crate::url::Listen;
use http::HttpConnections;
use worker::{Assignment, Core};

use crate::workers::Workers;

/// One listener's socket (UDP and DNS listeners are both UDP sockets);
/// HTTP listeners' connections live in [`HttpConnections`].
enum ListenerDriver {
    Udp {
        rx: UdpReceiver,
        tx: UdpSender,
    },
    Icmp {
        socket: IcmpSocket,
        buf: Vec<u8>,
    },
    /// `https` or `http`.
    Http {
        tls: bool,
    },
    /// In a worker, a listener only the main loop serves (DNS, ICMP,
    /// HTTP): what the worker has to send on it goes to the main loop.
    Main,
}

impl ListenerDriver {
    /// The UDP or ICMP socket's sending side.
    fn held(&self) -> Option<&dyn HeldSend> {
        match self {
            Self::Udp { tx, .. } => Some(tx),
            Self::Icmp { socket, .. } => Some(socket),
            Self::Http { .. } | Self::Main => None,
        }
    }

    fn held_mut(&mut self) -> Option<&mut dyn HeldSend> {
        match self {
            Self::Udp { tx, .. } => Some(tx),
            Self::Icmp { socket, .. } => Some(socket),
            Self::Http { .. } | Self::Main => None,
        }
    }

    /// A UDP or ICMP send waits for room in the socket buffer.
    fn is_blocked(&self) -> bool {
        self.held().is_some_and(HeldSend::is_blocked)
    }

    /// Ready when blocked and the socket may have room again.
    fn poll_writable(&self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        self.held().map_or(Poll::Pending, |h| h.poll_writable(cx))
    }

    /// Send what waited for room (it may have to wait again).
    fn retry(&mut self) {
        if let Some(h) = self.held_mut() {
            h.retry();
        }
    }

    fn poll_readable(&self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        match self {
            Self::Udp { rx, .. } => rx.poll_readable(cx).map(drop),
            Self::Icmp { socket, .. } => socket.poll_readable(cx).map(drop),
            Self::Http { .. } | Self::Main => Poll::Pending,
        }
    }

    /// Drain the socket (up to a bound) into the endpoint and the TUN
    /// device, taking the endpoint's lock after each receive syscall, not
    /// around it. Returns whether it ran dry.
    async fn receive(
        &mut self,
        core: &Core,
        listener: usize,
        tun: &mut Tun,
    ) -> anyhow::Result<bool> {
        match self {
            Self::Udp { rx, .. } => {
                for _ in 0..MAX_BATCHES_PER_WAKEUP {
                    let datagrams = match rx.try_recv() {
                        Ok(d) => d,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(true),
                        // An ICMP error from an earlier send: not ours to stop for.
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                        Err(e) => return Err(e).context("receiving on a UDP socket"),
                    };
                    {
                        let now = Instant::now();
                        let ep = &mut core.lock().ep;
                        for (from, bytes) in datagrams {
                            ep.handle_input(now, listener, Input::Datagram { from, bytes }, tun);
                        }
                    }
                    tun.flush().await.context("writing to the TUN device")?;
                }
                Ok(false)
            }
            Self::Icmp { socket, buf } => {
                let dry = socket
                    .drain(buf, MAX_BATCHES_PER_WAKEUP * 8, |r| {
                        let input = Input::Icmp {
                            from: r.from,
                            to: r.to,
                            bytes: r.icmp,
                        };
                        core.lock()
                            .ep
                            .handle_input(Instant::now(), listener, input, tun);
                    })
                    .context("receiving on an ICMP socket")?;
                tun.flush().await.context("writing to the TUN device")?;
                Ok(dry)
            }
            Self::Http { .. } | Self::Main => Ok(true),
        }
    }
}

/// Every listener's socket, indexed like the endpoint's listeners.
struct Drivers {
    listeners: Vec<ListenerDriver>,
    http: HttpConnections,
    /// The first UDP listener: packets from the TUN device are sealed
    /// straight into its send batch.
    first_udp: Option<usize>,
    scratch: Vec<u8>,
    /// What [`Endpoint::poll_transmit`] writes into.
    transmits: Vec<u8>,
    /// In a worker: where transmits for [`ListenerDriver::Main`] go.
    main: Option<worker::ToMain>,
    /// Transmits dropped because that queue was full.
    to_main_full: u64,
}

impl Drivers {
    fn new() -> Self {
        Self {
            listeners: Vec::new(),
            http: HttpConnections::new(),
            first_udp: None,
            scratch: vec![0; iptun_proto::endpoint::BUF_LEN],
            transmits: Vec::new(),
            main: None,
            to_main_full: 0,
        }
    }

    /// A UDP or ICMP socket's buffer is full: reading the TUN device waits
    /// (backpressure) until it has room again.
    fn is_blocked(&self) -> bool {
        self.listeners.iter().any(ListenerDriver::is_blocked)
    }

    /// What this loop carried, with `tun`, its TUN queue (UDP sockets
    /// only: ICMP's are counted apart, by the main loop).
    fn carried(&self, tun: &Tun) -> worker::Carried {
        let mut c = worker::Carried {
            tun_packets: tun.packets_read(),
            ..Default::default()
        };
        for l in &self.listeners {
            if let ListenerDriver::Udp { rx, tx } = l {
                c.datagrams += rx.received();
                c.send_buffer_full += tx.dropped();
            }
        }
        c.to_main_full = self.to_main_full;
        c
    }

    /// Send a transmit whose bytes are ours to keep (no copy of a
    /// long-poll body).
    fn send_owned(&mut self, t: Transmit, bytes: Vec<u8>) {
        match (&self.listeners[t.listener], t.to) {
            (ListenerDriver::Main, _) => self.hand_to_main(t, bytes),
            (ListenerDriver::Http { .. }, Destination::PollAnswer(request)) => {
                self.http.answer(request, bytes);
            }
            _ => self.send(t, &bytes),
        }
    }

    /// Hand a transmit to the main loop, or drop it (counted) when the
    /// main loop is that far behind.
    fn hand_to_main(&mut self, t: Transmit, bytes: Vec<u8>) {
        let sent = self.main.as_ref().map(|m| m.try_send((t, bytes)));
        if !matches!(sent, Some(Ok(()))) {
            self.to_main_full += 1;
        }
    }

    /// Send one transmit of `bytes`.
    fn send(&mut self, t: Transmit, bytes: &[u8]) {
        match (&mut self.listeners[t.listener], t.to) {
            (ListenerDriver::Main, _) => self.hand_to_main(t, bytes.to_vec()),
            (ListenerDriver::Udp { tx, .. }, Destination::Udp(peer)) => tx.send(peer, bytes),
            (ListenerDriver::Icmp { socket, .. }, Destination::Icmp { to, from }) => {
                let _ = socket.send(to, Some(from), bytes);
            }
            (ListenerDriver::Http { .. }, Destination::WebSocket(conn)) => {
                self.http.send_ws(conn, bytes);
            }
            (ListenerDriver::Http { .. }, Destination::PollAnswer(request)) => {
                self.http.answer(request, bytes.to_vec());
            }
            _ => debug_assert!(false, "a transmit for another transport"),
        }
    }

    fn flush(&mut self) {
        for l in &mut self.listeners {
            if let ListenerDriver::Udp { tx, .. } = l {
                tx.flush();
            }
        }
        self.http.flush();
    }
}

/// Settings after defaults and validation.
struct Settings {
    config: ServerConfig,
    allow: AllowList,
    metrics: Option<metrics::Settings>,
    listen: Vec<Listen>,
    tun: String,
    nat: bool,
    control: PathBuf,
    offload: bool,
    /// `--pcap FILE` and its limit in bytes.
    pcap: Option<(PathBuf, u64)>,
    /// For `https://` listeners.
    tls: Option<tls::ServerTls>,
    /// Loops carrying traffic: the main one and the workers.
    workers: usize,
}

/// Where the admitted keys come from: `--allow` (fixed while the server
/// runs) and `--allow-file` (re-read on reload).
struct AllowList {
    fixed: Vec<PublicKey>,
    file: Option<PathBuf>,
}

impl AllowList {
    /// Every admitted key: the fixed ones and the file's.
    fn read(&self) -> anyhow::Result<Vec<PublicKey>> {
        let mut keys = self.fixed.clone();
        if let Some(file) = &self.file {
            keys.extend(read_allow_file(file)?);
        }
        Ok(keys)
    }
}

/// The keys in an allow file: one base64 key a line, `#` comments. Any
/// bad line refuses the whole file, naming the file and line.
fn read_allow_file(file: &Path) -> anyhow::Result<Vec<PublicKey>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading --allow-file {}", file.display()))?;
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if !line.is_empty() {
            let at = format!("{}:{}", file.display(), n + 1);
            keys.push(daemon::parse_public_key(line, &at)?);
        }
    }
    Ok(keys)
}

fn settings(args: ServerArgs) -> anyhow::Result<Settings> {
    let args = args.merged()?;
    let private_key = daemon::read_private_key(args.private_key.as_deref())?;
    let mut fixed = Vec::new();
    for key in &args.allow {
        fixed.push(daemon::parse_public_key(key, "--allow")?);
    }
    let allow = AllowList {
        fixed,
        file: args.allow_file.clone(),
    };
    let allowed = allow.read()?;
    let metrics = metrics::Settings::parse(
        args.metrics.as_deref(),
        args.metrics_public,
        !args.metrics_no_clients,
    )?;
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
    let cost = budget::handshake_cost();
    config.handshakes_per_sec = budget::per_sec(cost);
    tracing::info!(
        "a handshake costs {:.0} µs here: at most {} a second, cookies asked under load",
        cost.as_secs_f64() * 1e6,
        config.handshakes_per_sec
    );
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
    let workers = worker_count(args.workers, &listen, args.pcap.is_some())?;
    let tun = args.tun.unwrap_or_else(|| "iptun0".to_owned());
    Ok(Settings {
        config,
        allow,
        metrics,
        listen,
        control: args.control.unwrap_or_else(|| control::default_path(&tun)),
        tun,
        nat: args.nat,
        offload: !args.no_offload,
        pcap: args
            .pcap
            .map(|p| (p, args.pcap_limit.unwrap_or(100).saturating_mul(1 << 20))),
        tls,
        workers,
    })
}

/// How many loops carry traffic: `--workers`, or one per core for a
/// server that listens on UDP only. The other transports stay with the
/// main loop whatever the count, so beside them workers are to be asked
/// for; `--pcap` records what one loop sees.
fn worker_count(asked: Option<usize>, listen: &[Listen], pcap: bool) -> anyhow::Result<usize> {
    let udp_only = listen.iter().all(|l| matches!(l, Listen::Udp(_)));
    let Some(n) = asked else {
        return Ok(if udp_only && !pcap {
            worker::default_count()
        } else {
            1
        });
    };
    anyhow::ensure!(
        (1..=worker::MAX).contains(&n),
        "--workers {n}: must be between 1 and {}",
        worker::MAX
    );
    anyhow::ensure!(
        n == 1 || !pcap,
        "--workers {n}: --pcap records one loop's packets; give --workers 1 with --pcap"
    );
    Ok(n)
}

/// Bind a UDP listener's socket, shared with the workers' when there are
/// any.
fn bind_udp(addr: SocketAddr, workers: usize) -> anyhow::Result<(UdpReceiver, UdpSender)> {
    if workers > 1 {
        udp::open(udp::bind_shared(addr)?)
    } else {
        udp::bind(addr)
    }
}

/// Run the server until SIGINT/SIGTERM.
pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let s = settings(args)?;
    let control = ControlSocket::bind(&s.control)?;
    let capture = s
        .pcap
        .as_ref()
        .map(|(path, limit)| Capture::create(path, *limit, true))
        .transpose()?;
    // Before anything on the system changes: a port in use stops us here.
    let metrics_port = s.metrics.as_ref().map(metrics::bind).transpose()?;
    let (mut tun, queues) = Tun::create_queues(&s.tun, s.offload, s.workers)?;
    if let Some(c) = capture {
        tun.set_capture(c);
    }
    let pool = &s.config.pool;
    let (net4, net6) = (pool.net4(), pool.net6());
    let me = pool.server();
    let mut addrs = vec![IpNet::new(me.v4.into(), net4.prefix_len())?];
    if let (Some(v6), Some(net6)) = (me.v6, net6) {
        addrs.push(IpNet::new(v6.into(), net6.prefix_len())?);
    }
    netcfg::configure_interface(tun.name(), &addrs, s.config.mtu)?;
    let mut undo = Undo::new();
    if s.nat {
        netcfg::enable_nat(&mut undo, tun.name(), net4, net6)?;
    }
    let mut drivers = Drivers::new();
    let mut configs = Vec::new();
    let mut endpoints = Vec::new();
    for l in &s.listen {
        let index = drivers.listeners.len();
        let (driver, config) = match l {
            &Listen::Udp(addr) => {
                let (rx, tx) = bind_udp(addr, s.workers)?;
                endpoints.push(format!("udp://{}", rx.local_addr()?));
                drivers.first_udp.get_or_insert(index);
                (ListenerDriver::Udp { rx, tx }, ListenerConfig::Udp)
            }
            &Listen::Icmp(family) => {
                let socket = IcmpSocket::open(family, Role::Server)?;
                take_over_echo(family, &mut undo)?;
                endpoints.push(match family {
                    Family::V4 => "icmp://0.0.0.0".to_owned(),
                    Family::V6 => "icmp://[::]".to_owned(),
                });
                let buf = vec![0; 1 << 16];
                (
                    ListenerDriver::Icmp { socket, buf },
                    ListenerConfig::Icmp(family),
                )
            }
            Listen::Dns { addr, domain } => {
                let d = Domain::new(domain).with_context(|| format!("tunnel domain `{domain}`"))?;
                let (rx, tx) = udp::bind(*addr).with_context(|| format!("DNS listener {addr}"))?;
                endpoints.push(format!("dns://{}?domain={domain}", rx.local_addr()?));
                (ListenerDriver::Udp { rx, tx }, ListenerConfig::Dns(d))
            }
            Listen::Http { addr, path, tls } => {
                let config = tls
                    .then(|| s.tls.as_ref().map(|t| t.config.clone()))
                    .flatten();
                let local = drivers.http.add(index, *addr, path, config).await?;
                endpoints.push(match (&s.tls, tls) {
                    (Some(t), true) if t.self_signed => {
                        format!("https://{local}{path} (self-signed, pin {})", t.pin)
                    }
                    (Some(t), true) => format!("https://{local}{path} (pin {})", t.pin),
                    _ => format!("http://{local}{path}"),
                });
                (ListenerDriver::Http { tls: *tls }, ListenerConfig::Http)
            }
        };
        drivers.listeners.push(driver);
        configs.push(config);
    }
    let labels: Vec<ListenerLabel> = s
        .listen
        .iter()
        .zip(&endpoints)
        .map(|(l, e)| ListenerLabel {
            transport: transport_name(l),
            // The URL without the notes after it (the certificate's pin).
            url: e.split(' ').next().unwrap_or(e).to_owned(),
        })
        .collect();
    let assignments = queues
        .into_iter()
        .map(|queue| -> anyhow::Result<Assignment> {
            // A UDP listener's socket of the worker's own; the others
            // (DNS: a session's queries come from any port of its
            // resolvers, and spread over workers they would reach the TUN
            // device out of order) stay with the main loop.
            let sockets = drivers
                .listeners
                .iter()
                .zip(&configs)
                .map(|(l, config)| match (l, config) {
                    (ListenerDriver::Udp { rx, .. }, ListenerConfig::Udp) => {
                        udp::bind_shared(rx.local_addr()?).map(Some)
                    }
                    _ => Ok(None),
                })
                .collect::<anyhow::Result<_>>()?;
            Ok(Assignment { queue, sockets })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let core = Core::new(Endpoint::new(s.config, configs, Instant::now()), s.workers);
    let (jobs, mut from_workers) = worker::jobs(&core, assignments);
    let (workers, failures) = Workers::spawn(jobs)?;
    let mut stop = daemon::watch_stop(failures)?;
    let (requests, mut asked) = service::channel();
    control.spawn(requests.clone());
    daemon::reload_on_hangup(requests.clone())?;
    if let Some(port) = metrics_port {
        metrics::spawn(port, requests.clone());
    }
    let per_client = s.metrics.as_ref().is_some_and(|m| m.per_client);
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
    tracing::info!(
        "server up on {} with {}, traffic on {} loops (--workers)",
        tun.name(),
        addr_text.join(", "),
        s.workers
    );

    daemon::report_drops({
        let core = core.clone();
        move || core.lock().ep.drops()
    });
    service::ready(&format!("serving on {}", endpoints.join(", ")));
    // One timer, moved only when the deadline changes.
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    let never = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let written = tun.written();
    loop {
        let deadline = core.main_deadline().unwrap_or(never);
        if timer.deadline() != deadline.into() {
            timer.as_mut().reset(deadline.into());
        }
        let blocked = drivers.is_blocked();
        tokio::select! {
            why = &mut stop => match why {
                Ok(Err(e)) => return Err(e),
                Ok(Ok(())) | Err(_) => break,
            },
            // A worker's batch needs the timer sooner: the loop resets it.
            () = core.main_woken() => {}
            Some((t, bytes)) = from_workers.recv() => drivers.send_owned(t, bytes),
            r = tun.readable(), if !blocked => {
                r.context("waiting on the TUN device")?;
                if !from_tun(&core, &mut tun, &mut drivers)? {
                    tokio::task::yield_now().await;
                }
            }
            (i, writable) = poll_fn(|cx| ready_listener(&drivers.listeners, cx)) => {
                if writable {
                    drivers.listeners[i].retry();
                } else if !drivers.listeners[i].receive(&core, i, &mut tun).await? {
                    // More waited than a wakeup's worth: the server is not
                    // keeping up, and handshakes must prove their address.
                    core.lock().ep.note_backlog(Instant::now());
                    tokio::task::yield_now().await;
                }
            }
            ev = drivers.http.next_event() => {
                if let Some(ev) = ev {
                    drivers.http.receive(&core, &mut tun, ev).await.context("writing to the TUN device")?;
                }
            }
            // Packets staged while the TUN writer was busy: it is done now.
            () = written.notified(), if tun.has_staged() => {
                tun.flush().await.context("writing to the TUN device")?;
            }
            () = &mut timer => core.lock().ep.handle_timeout(Instant::now()),
            Some(request) = asked.recv() => {
                let shared = &mut *core.lock();
                match request {
                    Request::Status(reply) => {
                        shared.carried[0] = drivers.carried(&tun);
                        let status = status(shared, &drivers, tun.name(), &addr_text, &endpoints);
                        let _ = reply.send(status);
                    }
                    Request::Metrics(reply) => {
                        let queue_full = drivers.http.queue_full;
                        let _ = reply.send(metrics::server(&shared.ep, &labels, per_client, queue_full));
                    }
                    Request::Reload(reply) => {
                        let _ = reply.send(reload(&mut shared.ep, &s.allow).map_err(|e| {
                            format!("reload refused, the admitted keys stay as they were: {e:#}")
                        }));
                    }
                }
            }
        }
        transmit(&mut core.lock().ep, &mut drivers);
        drivers.flush();
    }
    // The workers close their TUN queues and sockets before the network
    // settings are undone.
    drop(workers);
    drop(undo);
    Ok(())
}

/// Re-read the admitted keys and put them in force, telling the service
/// manager; on any error nothing changes. What changed, for the log and
/// `iptun reload`.
fn reload(ep: &mut Endpoint, allow: &AllowList) -> anyhow::Result<String> {
    service::reloading();
    let result = apply_allow_list(ep, allow);
    match &result {
        Ok(what) => tracing::info!("reload: {what}"),
        Err(e) => tracing::error!("reload refused, the admitted keys stay as they were: {e:#}"),
    }
    let status = match &result {
        Ok(what) => format!("reloaded: {what}"),
        Err(e) => format!("reload refused: {e:#}"),
    };
    service::ready(&status);
    result
}

fn apply_allow_list(ep: &mut Endpoint, allow: &AllowList) -> anyhow::Result<String> {
    let file = allow
        .file
        .as_ref()
        .context("the server has no --allow-file to re-read (--allow keys are fixed)")?;
    let keys = allow.read()?;
    let change = ep.set_allowed(Instant::now(), keys);
    Ok(format!(
        "{} keys admitted from --allow and {}: {} added, {} removed, {} sessions ended",
        ep.engine().allowed_count(),
        file.display(),
        change.added.len(),
        change.removed.len(),
        change.ended.len()
    ))
}

/// The transport's name as users know it (`https` for TLS).
fn transport_name(listen: &Listen) -> &'static str {
    match listen {
        Listen::Udp(_) => "udp",
        Listen::Icmp(_) => "icmp",
        Listen::Dns { .. } => "dns",
        Listen::Http { tls: true, .. } => "https",
        Listen::Http { tls: false, .. } => "http",
    }
}

/// Keep the kernel from answering echo requests too: the endpoint answers
/// ordinary pings itself, and tunnel requests only once.
fn take_over_echo(family: Family, undo: &mut Undo) -> anyhow::Result<()> {
    let sysctl = match family {
        Family::V4 => "/proc/sys/net/ipv4/icmp_echo_ignore_all",
        Family::V6 => "/proc/sys/net/ipv6/icmp/echo_ignore_all",
    };
    netcfg::set_sysctl(undo, sysctl, "1").context("taking over echo replies from the kernel")
}

/// A listener whose socket is ready: for a blocked send (`true`) or to
/// receive.
fn ready_listener(
    listeners: &[ListenerDriver],
    cx: &mut std::task::Context<'_>,
) -> Poll<(usize, bool)> {
    for (i, l) in listeners.iter().enumerate() {
        if l.poll_writable(cx).is_ready() {
            return Poll::Ready((i, true));
        }
        if l.poll_readable(cx).is_ready() {
            return Poll::Ready((i, false));
        }
    }
    Poll::Pending
}

/// Send what the endpoint has to send, into the batches (flushed by the
/// caller, once the endpoint's lock is released).
fn transmit(ep: &mut Endpoint, drivers: &mut Drivers) {
    let now = Instant::now();
    let mut buf = std::mem::take(&mut drivers.transmits);
    while let Some(t) = ep.poll_transmit(now, &mut buf) {
        if let Destination::PollAnswer(_) = t.to {
            drivers.send_owned(t, std::mem::take(&mut buf));
        } else {
            drivers.send(t, &buf[..t.len]);
        }
    }
    drivers.transmits = buf;
}

/// Drain the TUN device (up to a bound): seal each packet for the client
/// that owns its destination. Returns whether the device ran dry.
fn from_tun(core: &Core, tun: &mut Tun, drivers: &mut Drivers) -> anyhow::Result<bool> {
    let mut dry = false;
    for batch in 0..MAX_BATCHES_PER_WAKEUP {
        if batch == 1 {
            // The first batch leaves at once: a lone packet (a ping, an
            // ACK) should not wait for the read that finds the device
            // empty. The ones after are batched.
            drivers.flush();
        }
        let packets = match tun.try_read() {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                dry = true;
                break;
            }
            Err(e) => return Err(e).context("reading the TUN device"),
        };
        let now = Instant::now();
        for packet in packets {
            from_tun_packet(core, drivers, now, packet);
        }
        // A full socket buffer: read no more until it has room.
        if drivers.is_blocked() {
            break;
        }
    }
    drivers.flush();
    Ok(dry)
}

/// One packet from the TUN device: sealed straight into the first UDP
/// listener's send batch (no copy) when it goes there, else sent from a
/// scratch buffer by its own listener. The endpoint's lock is held to
/// take the packet's place in its session; on UDP it is sealed after (the
/// loops encrypt in parallel), and a send batch that fills leaves (a
/// syscall) after that.
fn from_tun_packet(core: &Core, drivers: &mut Drivers, now: Instant, packet: &[u8]) {
    let Drivers {
        listeners,
        first_udp,
        scratch,
        ..
    } = drivers;
    let mut elsewhere = None;
    if let Some(u) = *first_udp
        && let ListenerDriver::Udp { tx, .. } = &mut listeners[u]
    {
        tx.send_with_any(|buf| {
            let mut shared = core.lock();
            match shared.ep.reserve_tun_packet(now, u, packet, buf.len()) {
                Reservation::Udp(reserved, peer) => {
                    drop(shared);
                    return Some((peer, reserved.seal(packet, buf).ok()?));
                }
                Reservation::Dropped => return None,
                Reservation::Elsewhere => {}
            }
            let t = shared.ep.handle_tun_packet(now, packet, buf)?;
            match t.to {
                Destination::Udp(peer) if t.listener == u => Some((peer, t.len)),
                _ => {
                    scratch[..t.len].copy_from_slice(&buf[..t.len]);
                    elsewhere = Some(t);
                    None
                }
            }
        });
    } else {
        elsewhere = core.lock().ep.handle_tun_packet(now, packet, scratch);
    }
    if let Some(t) = elsewhere {
        let bytes = std::mem::take(&mut drivers.scratch);
        drivers.send(t, &bytes[..t.len]);
        drivers.scratch = bytes;
    }
}

/// The server's handshake counters by result, zeros left out.
fn handshake_map(
    h: iptun_proto::engine::HandshakeCounters,
) -> std::collections::BTreeMap<String, u64> {
    h.by_result()
        .into_iter()
        .filter(|&(_, n)| n > 0)
        .map(|(name, n)| (name.to_owned(), n))
        .collect()
}

/// A DNS listener's counters for the status, those not zero.
fn dns_counters(
    s: &iptun_proto::transport::dns::server::ListenerStats,
) -> std::collections::BTreeMap<String, u64> {
    [
        ("queries", s.queries),
        ("retries", s.retries),
        ("answered_data", s.answered_data),
        ("answered_empty", s.answered_empty),
        ("superseded", s.superseded),
        ("minimisation_steps", s.minimisation_steps),
        ("name_errors", s.name_errors),
        ("name_error_fallbacks", s.name_error_fallbacks),
        ("forged", s.forged),
        ("replayed", s.replayed),
        ("probes", s.probes),
        ("options", s.options),
        ("apex", s.apex),
        ("refused", s.refused),
        ("malformed", s.malformed),
        ("queue_full", s.queue_full),
        ("oversize", s.oversize),
        ("evicted_tags", s.evicted_tags),
    ]
    .into_iter()
    .filter(|&(_, n)| n > 0)
    .map(|(name, n)| (name.to_owned(), n))
    .collect()
}

fn status(
    shared: &worker::Shared,
    drivers: &Drivers,
    tun: &str,
    addresses: &[String],
    endpoints: &[String],
) -> Status {
    let ep = &shared.ep;
    let now = Instant::now();
    let transport = |path: &iptun_proto::endpoint::Path| match (
        path.kind(),
        &drivers.listeners[path.listener()],
    ) {
        (Kind::Http, ListenerDriver::Http { tls: true }) => "https",
        (kind, _) => kind.as_str(),
    };
    let sessions = ep
        .sessions()
        .into_iter()
        .map(|s| {
            SessionStatus {
                key: s.key.to_base64(),
                addresses: std::iter::once(s.lease.v4.to_string())
                    .chain(s.lease.v6.map(|a| a.to_string()))
                    .collect(),
                transport: s.path.as_ref().map_or("none", transport).to_owned(),
                endpoint: s.path.map(|p| p.describe()),
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
    let mut drops = control::drop_map(ep.engine().drops());
    for (name, n) in ep.transport_drops() {
        *drops.entry(name.into()).or_default() += n;
    }
    if drivers.http.queue_full > 0 {
        drops.insert("http_queue_full".into(), drivers.http.queue_full);
    }
    let udp_full: u64 = shared.carried.iter().map(|c| c.send_buffer_full).sum();
    let to_main_full: u64 = shared.carried.iter().map(|c| c.to_main_full).sum();
    let icmp_full = drivers.listeners.iter().map(|l| match l {
        ListenerDriver::Icmp { socket, .. } => socket.dropped(),
        _ => 0,
    });
    for (name, n) in [
        (udp::SEND_BUFFER_FULL, udp_full),
        (icmp::SEND_BUFFER_FULL, icmp_full.sum()),
        ("worker_queue_full", to_main_full),
    ] {
        if n > 0 {
            *drops.entry(name.into()).or_default() += n;
        }
    }
    Status {
        role: "server".into(),
        tun: tun.into(),
        addresses: addresses.to_vec(),
        endpoints: endpoints.to_vec(),
        sessions,
        drops,
        handshakes: handshake_map(ep.engine().handshakes()),
        dns: ep
            .listeners()
            .into_iter()
            .zip(endpoints)
            .filter_map(|(l, url)| Some((url.clone(), dns_counters(&l.dns?))))
            .collect(),
        paths: Vec::new(),
        moves: None,
        searching: false,
        workers: shared
            .carried
            .iter()
            .map(|c| control::WorkerStatus {
                datagrams: c.datagrams,
                tun_packets: c.tun_packets,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iptun_proto::endpoint::UdpAddr;

    /// In a worker, what is to go out on a listener the main loop serves
    /// alone (a DNS answer, an echo reply, a long-poll body) goes to the
    /// main loop whole; when its queue is full it is dropped and counted,
    /// never waited for.
    #[test]
    fn a_worker_hands_the_main_loops_transmits_over_and_counts_what_does_not_fit() {
        let (to_main, mut from_workers) = tokio::sync::mpsc::channel(2);
        let mut drivers = Drivers::new();
        drivers.listeners.push(ListenerDriver::Main);
        drivers.main = Some(to_main);
        let peer = UdpAddr::from("192.0.2.7:53".parse::<SocketAddr>().unwrap());
        let answer = Transmit {
            listener: 0,
            to: Destination::Udp(peer),
            len: 3,
        };
        let body = Transmit {
            listener: 0,
            to: Destination::PollAnswer(9),
            len: 4,
        };
        drivers.send(answer, b"dns");
        drivers.send_owned(body, b"body".to_vec());
        drivers.send(answer, b"one too many");
        assert_eq!(from_workers.try_recv().unwrap(), (answer, b"dns".to_vec()));
        assert_eq!(from_workers.try_recv().unwrap(), (body, b"body".to_vec()));
        assert!(from_workers.try_recv().is_err(), "the third did not fit");
        assert_eq!(drivers.to_main_full, 1);
    }
}

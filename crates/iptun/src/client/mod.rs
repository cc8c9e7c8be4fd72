//! The client daemon: a TUN device, one socket per candidate path
//! ([`paths::PathDriver`]), and the sans-IO [`Connection`] in between,
//! which owns the session and decides which path carries it.

mod dns;
mod paths;
pub mod worker;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ipnet::IpNet;
use iptun_proto::TunnelConfig;
use iptun_proto::connection::{Connection, Event, PathConfig, PathDetail, PathState};
use iptun_proto::engine::ClientConfig;
use iptun_proto::transport::Kind;
use iptun_proto::wire::message::DATA_OVERHEAD;

use crate::capture::Capture;
use crate::cli::ClientArgs;
use crate::control::{self, CandidateStatus, ControlSocket, SessionStatus, Status, WorkerStatus};
use crate::daemon::{self, MAX_BATCHES_PER_WAKEUP};
use crate::metrics;
use crate::netcfg::{self, Undo};
use crate::service::{self, Request};
use crate::transport::http_client::Mode;
use crate::transport::tls::{self, Trust};
use crate::tun::Tun;
use crate::url::{HttpUrl, ResolverUrl, ServerUrl};
use crate::workers::Workers;
pub use paths::{HttpOptions, PathDriver};
pub use worker::Core;

/// What `--route` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Default,
    Net(IpNet),
}

/// The client's settings after defaults and validation.
#[derive(Clone)]
pub struct Settings {
    pub config: ClientConfig,
    /// The server's URLs, most preferred first.
    pub servers: Vec<ServerUrl>,
    routes: Vec<Route>,
    tun: String,
    control: std::path::PathBuf,
    offload: bool,
    /// `--pcap FILE` and its limit in bytes.
    pcap: Option<(std::path::PathBuf, u64)>,
    metrics: Option<metrics::Settings>,
    pub http: HttpOptions,
    /// Loops reading the TUN device: the main one and the workers.
    workers: usize,
}

/// The most `--workers` a client takes (a TUN device has at most 256 queues).
const MAX_WORKERS: usize = 64;

/// Validate the client's flags (shared with `iptun probe`).
pub fn settings(args: ClientArgs) -> anyhow::Result<Settings> {
    let args = args.merged()?;
    let private_key = daemon::read_private_key(args.private_key.as_deref())?;
    let server_key = args
        .server_key
        .as_deref()
        .context("--server-key PUBKEY is required")?;
    let server_key = daemon::parse_public_key(server_key, "--server-key")?;
    anyhow::ensure!(
        !args.server.is_empty(),
        "--server URL is required (e.g. udp://HOST:3000; repeat it for more paths)"
    );
    let servers = args
        .server
        .iter()
        .map(|u| u.parse())
        .collect::<anyhow::Result<Vec<ServerUrl>>>()?;
    for (i, u) in servers.iter().enumerate() {
        anyhow::ensure!(
            !servers[..i].contains(u),
            "--server {u} is given twice (each URL is one path)"
        );
    }
    let routes = args
        .route
        .iter()
        .map(|r| match r.as_str() {
            "default" => Ok(Route::Default),
            cidr => cidr
                .parse()
                .or_else(|_| cidr.parse::<IpAddr>().map(IpNet::from))
                .map(|n: IpNet| Route::Net(n.trunc()))
                .with_context(|| {
                    format!("--route `{cidr}`: expected a CIDR, an address or `default`")
                }),
        })
        .collect::<anyhow::Result<_>>()?;
    let trust = match (&args.tls_pin, &args.tls_ca) {
        (Some(pin), None) => Trust::Pin(tls::parse_pin(pin)?),
        (None, Some(ca)) => Trust::CaFile(ca.clone()),
        (None, None) => Trust::System,
        (Some(_), Some(_)) => anyhow::bail!("--tls-pin and --tls-ca exclude each other"),
    };
    check_tls_flags(&servers, &args)?;
    let http = HttpOptions {
        trust,
        proxy: args.proxy,
        mode: args.http_mode.unwrap_or(Mode::Auto),
    };
    let metrics = metrics::Settings::parse(args.metrics.as_deref(), args.metrics_public, false)?;
    let workers = args.workers.unwrap_or(1);
    anyhow::ensure!(
        (1..=MAX_WORKERS).contains(&workers),
        "--workers {workers}: must be between 1 and {MAX_WORKERS}"
    );
    let tun = args.tun.unwrap_or_else(|| "iptun0".to_owned());
    Ok(Settings {
        config: ClientConfig::new(private_key, server_key),
        metrics,
        servers,
        routes,
        control: args.control.unwrap_or_else(|| control::default_path(&tun)),
        tun,
        offload: !args.no_offload,
        pcap: args
            .pcap
            .map(|p| (p, args.pcap_limit.unwrap_or(100).saturating_mul(1 << 20))),
        http,
        workers,
    })
}

/// `--tls-pin`/`--tls-ca` need something to check (an https:// server, a
/// DoT or DoH resolver), `--proxy` an HTTP(S) connection (an http(s)://
/// server, a DoH resolver), `--http-mode` an http(s):// server.
fn check_tls_flags(servers: &[ServerUrl], args: &ClientArgs) -> anyhow::Result<()> {
    let resolvers = || {
        servers.iter().flat_map(|s| match s {
            ServerUrl::Dns { resolvers, .. } => resolvers.as_slice(),
            _ => &[],
        })
    };
    let http_servers: Vec<&HttpUrl> = servers
        .iter()
        .filter_map(|s| match s {
            ServerUrl::Http(u) => Some(u),
            _ => None,
        })
        .collect();
    let tls = http_servers.iter().any(|u| u.tls) || resolvers().any(ResolverUrl::uses_tls);
    let doh = resolvers().any(|r| matches!(r, ResolverUrl::Https(_)));
    if args.http_mode.is_some() && http_servers.is_empty() {
        anyhow::bail!("--http-mode applies to http(s):// servers only");
    }
    if args.proxy.is_some() && http_servers.is_empty() && !doh {
        anyhow::bail!(
            "--proxy applies to http(s):// servers and DNS-over-HTTPS resolvers \
             (dns://DOMAIN?resolver=https://...) only"
        );
    }
    if !tls && (args.tls_pin.is_some() || args.tls_ca.is_some()) {
        anyhow::bail!(
            "--tls-pin/--tls-ca: nothing here uses TLS (https:// servers do, and \
             resolvers given as tls://... or https://...)"
        );
    }
    Ok(())
}

/// The candidate paths that could be opened, in preference order.
pub struct OpenPaths {
    pub urls: Vec<ServerUrl>,
    pub drivers: Vec<PathDriver>,
    pub configs: Vec<PathConfig>,
}

/// The paths of the URLs that can be used: each resolved and its socket
/// opened. A URL that fails is left out with a warning when there are
/// others; none left is an error.
pub fn open_paths(s: &Settings) -> anyhow::Result<OpenPaths> {
    let mut open = OpenPaths {
        urls: Vec::new(),
        drivers: Vec::new(),
        configs: Vec::new(),
    };
    let mut errors = Vec::new();
    for url in &s.servers {
        match url.resolve().and_then(|a| paths::open(a, &s.http)) {
            Ok((driver, config)) => {
                open.urls.push(url.clone());
                open.drivers.push(driver);
                open.configs.push(config);
            }
            Err(e) => {
                tracing::warn!("--server {url}: {e:#}; leaving it out");
                errors.push(format!("{url}: {e:#}"));
            }
        }
    }
    if open.drivers.is_empty() {
        anyhow::bail!("no --server URL can be used: {}", errors.join("; "));
    }
    Ok(open)
}

/// Run the client until SIGINT/SIGTERM.
pub async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let s = settings(args)?;
    let server_key = s.config.server_key;
    // The paths first: a list none of which can be used fails before
    // anything on the system changes.
    let OpenPaths {
        urls,
        mut drivers,
        configs,
    } = open_paths(&s)?;
    let control = ControlSocket::bind(&s.control)?;
    let capture = s
        .pcap
        .as_ref()
        .map(|(path, limit)| Capture::create(path, *limit, false))
        .transpose()?;
    let metrics_port = s.metrics.as_ref().map(metrics::bind).transpose()?;
    // Declared before the workers: on every way out, they stop (and close
    // their queues and sockets) before the network settings are undone.
    let mut undo = Undo::new();
    let (mut tun, queues) = Tun::create_with_readers(&s.tun, s.offload, s.workers, capture)?;
    if let Some(q) = queues.first()
        && let Err(e) = crate::steering::by_flow_hash(q)
    {
        // Every packet from the server is written on the main loop's
        // queue: without steering, the flows it writes come back to it.
        // The tunnel works all the same.
        tracing::warn!(
            "--workers {}: cannot steer flows over the TUN queues ({e}); \
             flows with traffic from the server stay with the first thread",
            s.workers
        );
    }
    let conn = Connection::new(s.config, configs, Instant::now(), daemon::unix_nanos());
    let core = Core::new(conn, s.workers);
    let assignments = queues
        .into_iter()
        .map(|queue| {
            let sockets = drivers
                .iter()
                .map(PathDriver::udp_socket)
                .collect::<std::io::Result<_>>()
                .context("another descriptor of a UDP path's socket")?;
            Ok(worker::Assignment { queue, sockets })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (jobs, mut from_workers) = worker::jobs(&core, assignments);
    let (workers, failures) = Workers::spawn(jobs)?;
    let mut stop = daemon::watch_stop(failures)?;
    let (requests, mut asked) = service::channel();
    control.spawn(requests.clone());
    if let Some(port) = metrics_port {
        metrics::spawn(port, requests.clone());
    }
    let mut configured: Option<TunnelConfig> = None;
    let shown: Vec<String> = urls.iter().map(ToString::to_string).collect();
    tracing::info!("connecting to {}", shown.join(", then "));
    if s.workers > 1 {
        tracing::info!("traffic into the tunnel on {} loops (--workers)", s.workers);
    }

    daemon::report_drops({
        let core = core.clone();
        move || core.lock().drops()
    });
    let mut buf = Vec::new();
    // One timer, moved only when the deadline changes (not re-armed per packet).
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    let never = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let written = tun.written();
    loop {
        let deadline = core.main_deadline().unwrap_or(never);
        if timer.deadline() != deadline.into() {
            timer.as_mut().reset(deadline.into());
        }
        // A path whose socket buffer is full: the TUN device waits
        // (backpressure) until the socket has room again.
        let blocked = drivers.iter().any(PathDriver::is_blocked);
        tokio::select! {
            why = &mut stop => match why {
                Ok(Err(e)) => return Err(e),
                Ok(Ok(())) | Err(_) => break,
            },
            r = tun.readable(), if !blocked => {
                r.context("waiting on the TUN device")?;
                if !from_tun(&core, &mut tun, &mut drivers)? {
                    tokio::task::yield_now().await;
                }
            }
            (i, ready) = std::future::poll_fn(|cx| ready_path(&mut drivers, cx)) => match ready {
                PathReady::Writable => drivers[i].retry(),
                PathReady::Readable(r) => {
                    r.with_context(|| format!("waiting on --server {}", urls[i]))?;
                    if !drivers[i].receive(&core, i, &mut tun).await? {
                        tokio::task::yield_now().await;
                    }
                }
            },
            // Packets staged while the TUN writer was busy: it is done now.
            () = written.notified(), if tun.has_staged() => {
                tun.flush().await.context("writing to the TUN device")?;
            }
            () = &mut timer => core.lock().handle_timeout(Instant::now()),
            // A worker's packet moved the deadline (transmit below).
            () = core.main_woken() => {}
            // The packets for a path that is not UDP (while a path is
            // blocked they wait: the workers read no more once the queue
            // is full).
            Some(packet) = from_workers.recv(), if !blocked => {
                from_workers_queue(&core, packet, &mut from_workers, &mut drivers);
            }
            Some(request) = asked.recv() => match request {
                Request::Status(reply) => {
                    let config = configured.as_ref();
                    let mut st = status(&core, &drivers, &urls, tun.name(), &server_key, config);
                    st.workers = loops(&core, &drivers, &tun);
                    let _ = reply.send(st);
                }
                Request::Metrics(reply) => {
                    let _ = reply.send(metrics::client(&core.lock(), &urls));
                }
                Request::Reload(reply) => {
                    let _ = reply.send(Err("a client has nothing to reload (reload re-reads a server's --allow-file)".into()));
                }
            },
        }
        transmit(&core, &mut drivers, &mut buf);
        loop {
            let Some(event) = core.lock().poll_event() else {
                break;
            };
            match event {
                Event::Configured(config) => {
                    let conn = core.lock();
                    let mtu = tunnel_mtu(&config, &conn);
                    let underlay: Vec<IpAddr> = drivers
                        .iter()
                        .enumerate()
                        .flat_map(|(i, d)| d.underlay(&conn, i))
                        .collect();
                    let current = conn.current_path();
                    drop(conn);
                    configure(
                        &tun,
                        &config,
                        mtu,
                        configured.as_ref(),
                        &s.routes,
                        &underlay,
                        &mut undo,
                    )?;
                    // systemd: the tunnel is up (its addresses and routes set).
                    service::ready(&format!("tunnel up via {}", urls[current]));
                    configured = Some(config);
                }
                Event::Moved { from, to, why } => {
                    tracing::warn!("moved from {} to {}: {why}", urls[from], urls[to]);
                    service::status(&format!("tunnel up via {}", urls[to]));
                }
                Event::Failed { path, why } => tracing::warn!("{}: {why}", urls[path]),
                Event::Http { path, command } => drivers[path].command(command),
                Event::Measured { .. } => {}
            }
        }
    }
    drop(workers);
    drop(undo);
    Ok(())
}

/// What a path's socket is ready for.
enum PathReady {
    Readable(std::io::Result<()>),
    /// A blocked send may go now.
    Writable,
}

/// The index of a path whose socket is ready, and for what.
fn ready_path(
    drivers: &mut [PathDriver],
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<(usize, PathReady)> {
    for (i, d) in drivers.iter_mut().enumerate() {
        if d.poll_writable(cx).is_ready() {
            return std::task::Poll::Ready((i, PathReady::Writable));
        }
        if let std::task::Poll::Ready(r) = d.poll_readable(cx) {
            return std::task::Poll::Ready((i, PathReady::Readable(r)));
        }
    }
    std::task::Poll::Pending
}

/// Send what the connection has to send, and flush every batch (the
/// connection's lock is held to take each transmit, not to send it).
pub fn transmit(core: &Core, drivers: &mut [PathDriver], buf: &mut Vec<u8>) {
    let now = Instant::now();
    // New keys come in on any path (a handshake's response): long-poll
    // requests are signed with the keys in use from the next one on.
    {
        let conn = core.lock();
        let key = conn.engine().poll_key(now);
        drivers.iter().for_each(|d| d.set_poll_key(key));
    }
    loop {
        let Some(t) = core.lock().poll_transmit(now, buf) else {
            break;
        };
        if let Some(e) = drivers[t.path].send(t, &buf[..t.len]) {
            core.lock().handle_path_event(now, t.path, e);
        }
    }
    drivers.iter_mut().for_each(PathDriver::flush);
}

/// The server's MTU, lowered if a path to the server cannot carry it whole
/// (ICMPv6 over a 1500-byte link, say): then TCP's MSS keeps packets from
/// being fragmented outside the tunnel, whichever path carries them.
fn tunnel_mtu(config: &TunnelConfig, conn: &Connection) -> u16 {
    let mut mtu = config.mtu;
    for path in 0..conn.path_count() {
        let Some(ip) = conn.server_ip(path) else {
            continue; // fragmented into queries, or a TCP stream
        };
        let Some(link) = netcfg::path_mtu(ip) else {
            continue;
        };
        let carrier = match conn.kind(path) {
            Kind::Icmp => iptun_proto::wire::icmp::OVERHEAD,
            _ => 8,
        };
        let header = if ip.is_ipv4() { 20 } else { 40 };
        let overhead = (header + carrier + DATA_OVERHEAD) as u16;
        let fits = link.saturating_sub(overhead).max(576);
        if fits < mtu {
            tracing::info!("path MTU {link} to the server: tunnel MTU {fits} instead of {mtu}");
            mtu = fits;
        }
    }
    mtu
}

/// Set up (or redo) the TUN device and routes from the server's config.
fn configure(
    tun: &Tun,
    config: &TunnelConfig,
    mtu: u16,
    previous: Option<&TunnelConfig>,
    routes: &[Route],
    underlay: &[IpAddr],
    undo: &mut Undo,
) -> anyhow::Result<()> {
    let mut addrs = vec![IpNet::new(config.client_v4.into(), config.prefix_v4)?];
    if let Some((client, _, prefix)) = config.v6 {
        addrs.push(IpNet::new(client.into(), prefix)?);
    }
    if previous.is_some() {
        netcfg::flush_addresses(tun.name())?;
    }
    netcfg::configure_interface(tun.name(), &addrs, mtu)?;
    let shown: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    tracing::info!(
        "tunnel up on {}: {} via {} (MTU {}, {})",
        tun.name(),
        shown.join(", "),
        config.server_v4,
        mtu,
        config.cipher.name()
    );
    if previous.is_some() {
        return Ok(()); // routes stay: they name the device, not the addresses
    }
    for route in routes {
        match route {
            Route::Default => {
                netcfg::route_default(undo, tun.name(), underlay, config.v6.is_some())?;
            }
            Route::Net(net) => netcfg::add_route(undo, *net, tun.name())?,
        }
    }
    Ok(())
}

fn from_tun(core: &Core, tun: &mut Tun, drivers: &mut [PathDriver]) -> anyhow::Result<bool> {
    let mut dry = false;
    for batch in 0..MAX_BATCHES_PER_WAKEUP {
        if batch == 1 {
            // The first batch leaves at once (see the server's from_tun).
            drivers.iter_mut().for_each(PathDriver::flush);
        }
        let now = Instant::now();
        let result = tun.try_read_batch(|packet| carry(core, drivers, now, packet));
        match result {
            // A full socket buffer: read no more until it has room.
            Ok(()) if drivers.iter().any(PathDriver::is_blocked) => break,
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                dry = true;
                break;
            }
            Err(e) => return Err(e).context("reading the TUN device"),
        }
    }
    drivers.iter_mut().for_each(PathDriver::flush);
    Ok(dry)
}

/// One packet into the tunnel, sealed straight into the current path's
/// send buffer (no copy).
fn carry(core: &Core, drivers: &mut [PathDriver], now: Instant, packet: &[u8]) {
    let conn = core.lock();
    let path = conn.current_path();
    let failed = drivers[path].send_with(move |buf| worker::seal(conn, now, path, packet, buf));
    if let Some(e) = failed {
        core.lock().handle_path_event(now, path, e);
    }
}

/// Packets the workers could not send (the current path is not UDP):
/// this one and what else is queued, up to a bound.
fn from_workers_queue(
    core: &Core,
    first: Vec<u8>,
    queue: &mut worker::FromWorkers,
    drivers: &mut [PathDriver],
) {
    let now = Instant::now();
    carry(core, drivers, now, &first);
    for _ in 0..MAX_BATCHES_PER_WAKEUP {
        let Ok(packet) = queue.try_recv() else { break };
        carry(core, drivers, now, &packet);
    }
    drivers.iter_mut().for_each(PathDriver::flush);
}

/// What each loop carried, for status (none with one loop): the main loop
/// receives every datagram, and the workers only read their queues.
fn loops(core: &Core, drivers: &[PathDriver], tun: &Tun) -> Vec<WorkerStatus> {
    let workers: Vec<u64> = core.workers_tun_packets().collect();
    if workers.is_empty() {
        return Vec::new();
    }
    let main = WorkerStatus {
        datagrams: drivers
            .iter()
            .filter_map(PathDriver::datagrams_received)
            .sum(),
        tun_packets: tun.packets_read(),
    };
    let others = workers.into_iter().map(|tun_packets| WorkerStatus {
        datagrams: 0,
        tun_packets,
    });
    std::iter::once(main).chain(others).collect()
}

/// The transport's name as users know it (`https` for TLS).
pub fn transport_name(url: &ServerUrl) -> &'static str {
    match url {
        ServerUrl::Udp { .. } => "udp",
        ServerUrl::Icmp { .. } => "icmp",
        ServerUrl::Dns { .. } => "dns",
        ServerUrl::Http(u) if u.tls => "https",
        ServerUrl::Http(_) => "http",
    }
}

/// A path's transport details for status.
fn detail(detail: &PathDetail, driver: &PathDriver) -> Option<serde_json::Value> {
    Some(match detail {
        PathDetail::Udp => return None,
        PathDetail::Icmp(s) => serde_json::json!({
            "requests": s.requests,
            "replies": s.replies,
            "unanswered": s.unanswered,
            "lost": s.lost,
            "late": s.late,
            "outstanding": s.outstanding,
            "target": s.target,
            "window": s.window,
            "rate": s.rate,
            "rtt_ms": s.rtt.map(|d| (d.as_secs_f64() * 1e4).round() / 10.0),
            "queued": s.queued,
            "queue_dropped": s.queue_dropped,
        }),
        PathDetail::Dns {
            resolver,
            tag,
            info: p,
        } => dns_detail(*resolver, *tag, p, driver),
        PathDetail::Http(h) => {
            let mut v = serde_json::json!({
                "mode": h.mode,
                "connected": h.connected,
                "reconnects": h.reconnects,
                "last_error": h.last_error,
            });
            extend(&mut v, driver.info());
            v
        }
    })
}

/// A DNS path's sizes each way, resolvers and counters, for status.
fn dns_detail(
    primary: usize,
    tag: u32,
    p: &iptun_proto::transport::dns::client::PathInfo,
    driver: &PathDriver,
) -> serde_json::Value {
    let s = p.stats;
    let z = &p.sizes;
    let ms = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 1e4).round() / 10.0);
    // The driver's side of each resolver (its name, a DoT/DoH connection).
    let links = driver.info();
    let resolvers: Vec<serde_json::Value> = p
        .resolvers
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let c = &r.congestion;
            let mut v = serde_json::json!({
                "state": match r.aside {
                    None => "active",
                    Some(iptun_proto::transport::dns::resolvers::Aside::Silent) => "set aside (silent)",
                    Some(iptun_proto::transport::dns::resolvers::Aside::Lossy) => "set aside (lossy)",
                },
                "window": c.window,
                "slow_start": c.slow_start,
                "in_flight_data": r.data,
                "in_flight_polls": r.polls,
                "srtt_ms": ms(c.srtt),
                "min_rtt_ms": ms(c.min_rtt),
                "pacing_per_s": c.rate.round(),
                "base_loss": (c.base_loss * 1000.0).round() / 1000.0,
                "backoff_ms": c.backoff.as_millis() as u64,
                "health": (r.health * 100.0).round() / 100.0,
                "queries": r.stats.queries,
                "answers": r.stats.answers,
                "lost": r.stats.lost,
                "rejected": r.stats.rejected,
                "set_aside": r.stats.set_aside,
                "reductions": c.reductions,
                "queue_reductions": c.queue_reductions,
                "rejections": c.rejections,
            });
            extend(&mut v, links["resolvers"][i].clone());
            v
        })
        .collect();
    serde_json::json!({
        "resolver": driver.resolver(primary).map(|r| r.to_string()),
        "tag": format!("{tag:08x}"),
        "encoding": p.encoding,
        "record_type": p.record_type,
        "max_name_len": z.max_name_len,
        "upstream_fragment": p.upstream_fragment,
        "downstream_limit": z.down,
        "edns_size": z.edns,
        "in_flight": p.in_flight,
        "polls": p.polls,
        "target": p.poll_target,
        "window": p.window,
        "up": {
            "max_name_len": z.max_name_len,
            "name_cap": z.name_cap,
            "option_bytes": z.option_len,
            "fragment": p.upstream_fragment,
        },
        "down": {
            "limit": z.down,
            "edns_size": z.edns,
            "largest_answer": z.largest_answer,
        },
        "resolvers": resolvers,
        "stats": {
            "queries": s.queries,
            "data_queries": s.data_queries,
            "answers": s.answers,
            "data_answers": s.data_answers,
            "timeouts": s.timeouts,
            "servfails": s.servfails,
            "refused": s.refused,
            "truncated": s.truncated,
            "errors": s.errors,
            "retried": s.retried,
            "lost": s.lost,
            "fallbacks": s.fallbacks,
            "size_probes": s.reprobes,
            "size_probe_failures": s.reprobe_failures,
            "encoding_probes": s.encoding_probes,
            "encoding_failures": s.encoding_failures,
            "type_probes": s.type_probes,
            "type_probe_failures": s.type_probe_failures,
            "type_fallbacks": s.type_fallbacks,
            "set_asides": s.set_asides,
            "unexpected": s.unexpected,
        },
    })
}

/// Add the fields of `extra` (an object) to `v` (an object).
fn extend(v: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(o), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
        o.extend(extra);
    }
}

/// Where a path reaches the server, for status.
fn endpoint(
    detail: &PathDetail,
    driver: &PathDriver,
    url: &ServerUrl,
    conn: &Connection,
    path: usize,
) -> String {
    match detail {
        PathDetail::Dns { resolver, .. } => match driver.resolver(*resolver) {
            Some(r) => r,
            None => url.to_string(),
        },
        PathDetail::Http(_) => url.to_string(),
        _ => match (url, conn.server_ip(path)) {
            (ServerUrl::Udp { port, .. }, Some(ip)) => {
                std::net::SocketAddr::new(ip, *port).to_string()
            }
            (_, Some(ip)) => ip.to_string(),
            _ => url.to_string(),
        },
    }
}

fn status(
    core: &Core,
    drivers: &[PathDriver],
    urls: &[ServerUrl],
    tun: &str,
    server_key: &iptun_proto::crypto::PublicKey,
    config: Option<&TunnelConfig>,
) -> Status {
    let now = Instant::now();
    let conn = core.lock();
    let st = conn.status(now);
    let addresses: Vec<String> = config
        .map(|c| {
            std::iter::once(c.client_v4.to_string())
                .chain(c.v6.map(|v| v.0.to_string()))
                .collect()
        })
        .unwrap_or_default();
    let current = &st.paths[st.current];
    let mut session = SessionStatus {
        key: server_key.to_base64(),
        addresses: addresses.clone(),
        transport: transport_name(&urls[st.current]).into(),
        endpoint: Some(endpoint(
            &current.detail,
            &drivers[st.current],
            &urls[st.current],
            &conn,
            st.current,
        )),
        rx_bytes: 0,
        rx_packets: 0,
        tx_bytes: 0,
        tx_packets: 0,
        drops: Default::default(),
        since_handshake_secs: None,
        path: detail(&current.detail, &drivers[st.current]),
    }
    .counters(
        conn.traffic(),
        conn.drops(),
        conn.engine().last_handshake(),
        now,
    );
    let queue_full = ("worker_queue_full", core.to_main_full());
    for (name, n) in drivers
        .iter()
        .filter_map(PathDriver::send_dropped)
        .chain([queue_full])
    {
        if n > 0 {
            *session.drops.entry(name.into()).or_default() += n;
        }
    }
    let candidates = st
        .paths
        .iter()
        .zip(urls)
        .zip(drivers)
        .map(|((p, url), driver)| CandidateStatus {
            url: url.to_string(),
            transport: transport_name(url).into(),
            state: p.state.as_str().into(),
            reason: match &p.state {
                PathState::Failed(why) => Some(why.clone()),
                _ => None,
            },
            next_probe_secs: p.next_probe.map(|d| d.as_secs_f64()),
            probing: p.probing,
            rtt_ms: p.rtt.map(|d| d.as_secs_f64() * 1000.0),
            last_heard_secs: p.last_heard.map(|d| d.as_secs_f64()),
            failures: p.failures,
            detail: detail(&p.detail, driver),
        })
        .collect();
    Status {
        role: "client".into(),
        tun: tun.into(),
        addresses,
        endpoints: urls.iter().map(ToString::to_string).collect(),
        sessions: vec![session],
        handshakes: Default::default(),
        dns: Default::default(),
        drops: Default::default(),
        paths: candidates,
        moves: Some(st.moves),
        searching: st.searching,
        workers: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(servers: &[&str], flags: impl FnOnce(&mut ClientArgs)) -> Result<(), String> {
        let servers: Vec<ServerUrl> = servers.iter().map(|s| s.parse().unwrap()).collect();
        let mut args = ClientArgs::default();
        flags(&mut args);
        check_tls_flags(&servers, &args).map_err(|e| e.to_string())
    }

    #[test]
    fn tls_flags_apply_to_dot_and_doh_resolvers_too() {
        let pin = |a: &mut ClientArgs| a.tls_pin = Some("sha256:00".into());
        let ca = |a: &mut ClientArgs| a.tls_ca = Some("/ca.pem".into());
        let proxy = |a: &mut ClientArgs| a.proxy = Some("http://p:3128".into());
        let mode = |a: &mut ClientArgs| a.http_mode = Some(Mode::LongPoll);
        let dot = "dns://t.example.com?resolver=192.0.2.2&resolver=tls://192.0.2.1";
        let doh = "dns://t.example.com?resolver=https://192.0.2.1/dns-query";
        let plain = "dns://t.example.com?resolver=192.0.2.1";
        assert_eq!(check(&[dot], pin), Ok(()));
        assert_eq!(check(&[doh], ca), Ok(()));
        assert_eq!(check(&[doh], proxy), Ok(()));
        assert_eq!(check(&["udp://h", "https://h/t"], pin), Ok(()));
        assert_eq!(check(&["http://h/t", dot], pin), Ok(()));
        for (servers, flags, says) in [
            (
                &[plain][..],
                &pin as &dyn Fn(&mut ClientArgs),
                "nothing here uses TLS",
            ),
            (&["http://h/t", plain], &ca, "nothing here uses TLS"),
            (&[dot], &proxy, "--proxy applies to"),
            (&[doh], &mode, "--http-mode applies to"),
        ] {
            let e = check(servers, flags).unwrap_err();
            assert!(e.contains(says), "{servers:?}: {e}");
        }
    }
}

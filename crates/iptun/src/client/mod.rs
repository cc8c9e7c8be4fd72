//! The client daemon: a TUN device and one transport to the server
//! ([`uplink::Uplink`]), with the sans-IO [`Client`] engine in between.

mod http;
mod uplink;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ipnet::IpNet;
use iptun_proto::TunnelConfig;
use iptun_proto::engine::{Client, ClientConfig, ClientEvent};

use crate::cli::ClientArgs;
use crate::control::{self, ControlSocket, SessionStatus, Status};
use crate::daemon::{self, DropReporter, MAX_BATCHES_PER_WAKEUP};
use crate::netcfg::{self, Undo};
use crate::transport::http_client::Mode;
use crate::transport::tls::{self, Trust};
use crate::tun::Tun;
use crate::url::ServerUrl;
use uplink::Uplink;

/// What `--route` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Default,
    Net(IpNet),
}

struct Settings {
    config: ClientConfig,
    server: ServerUrl,
    routes: Vec<Route>,
    tun: String,
    control: std::path::PathBuf,
    offload: bool,
    http: http::HttpOptions,
}

fn settings(args: ClientArgs) -> anyhow::Result<Settings> {
    let args = args.merged()?;
    let private_key = daemon::read_private_key(args.private_key.as_deref())?;
    let server_key = args
        .server_key
        .as_deref()
        .context("--server-key PUBKEY is required")?;
    let server_key = daemon::parse_public_key(server_key, "--server-key")?;
    let server: ServerUrl = args
        .server
        .as_deref()
        .context("--server URL is required (e.g. udp://HOST:3000)")?
        .parse()?;
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
    let is_http = matches!(server, ServerUrl::Http(_));
    if !is_http
        && (args.tls_pin.is_some()
            || args.tls_ca.is_some()
            || args.proxy.is_some()
            || args.http_mode.is_some())
    {
        anyhow::bail!(
            "--tls-pin, --tls-ca, --proxy and --http-mode apply to http(s):// servers only"
        );
    }
    if let ServerUrl::Http(u) = &server
        && !u.tls
        && (args.tls_pin.is_some() || args.tls_ca.is_some())
    {
        anyhow::bail!("--tls-pin/--tls-ca: {u} does not use TLS (https:// does)");
    }
    let http = http::HttpOptions {
        trust,
        proxy: args.proxy,
        mode: args.http_mode.unwrap_or(Mode::Auto),
    };
    let tun = args.tun.unwrap_or_else(|| "iptun0".to_owned());
    Ok(Settings {
        config: ClientConfig::new(private_key, server_key),
        server,
        routes,
        control: args.control.unwrap_or_else(|| control::default_path(&tun)),
        tun,
        offload: !args.no_offload,
        http,
    })
}

/// Run the client until SIGINT/SIGTERM.
pub async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let s = settings(args)?;
    let server_key = s.config.server_key;
    let control = ControlSocket::bind(&s.control)?;
    let mut tun = Tun::create(&s.tun, s.offload)?;
    let mut uplink = Uplink::open(s.server.resolve()?, &s.http)?;
    let mut engine = Client::new(s.config, Instant::now(), daemon::unix_nanos());
    let mut undo = Undo::new();
    let mut configured: Option<TunnelConfig> = None;
    tracing::info!("connecting to {} ({})", s.server, uplink.describe().1);

    let mut drops = DropReporter::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let shutdown = daemon::shutdown_signal();
    tokio::pin!(shutdown);
    let mut buf = vec![0u8; 1 << 16];
    // One timer, moved only when the deadline changes (not re-armed per packet).
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    loop {
        let deadline = [engine.next_timeout(), uplink.next_timeout()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        if timer.deadline() != deadline.into() {
            timer.as_mut().reset(deadline.into());
        }
        tokio::select! {
            () = &mut shutdown => break,
            r = tun.readable() => {
                r.context("waiting on the TUN device")?;
                if !from_tun(&mut engine, &mut tun, &mut uplink)? {
                    tokio::task::yield_now().await;
                }
            }
            r = std::future::poll_fn(|cx| uplink.poll_readable(cx)) => {
                r.context("waiting on the transport")?;
                if !uplink.receive(&mut engine, &mut tun).await? {
                    tokio::task::yield_now().await;
                }
            }
            () = &mut timer => {
                let now = Instant::now();
                while let Some(n) = engine.poll_timers(now, &mut buf) {
                    uplink.send(now, &buf[..n]);
                }
                uplink.top_up(&mut engine, now);
                uplink.flush();
            }
            _ = ticker.tick() => drops.tick(Instant::now(), engine.drops()),
            conn = control.accept() => {
                if let Ok(conn) = conn {
                    let st = status(&engine, tun.name(), &s.server, &uplink, &server_key, configured.as_ref());
                    control::reply(conn, &st);
                }
            }
        }
        while let Some(ClientEvent::Configured(config)) = engine.poll_event() {
            let mtu = tunnel_mtu(&config, &uplink);
            configure(
                &tun,
                &config,
                mtu,
                configured.as_ref(),
                &s.routes,
                uplink.server_ip(),
                &mut undo,
            )?;
            configured = Some(config);
        }
    }
    drop(undo);
    Ok(())
}

/// The server's MTU, lowered if the path to the server cannot carry it
/// whole (ICMPv6 over a 1500-byte link, say): then TCP's MSS keeps packets
/// from being fragmented outside the tunnel.
fn tunnel_mtu(config: &TunnelConfig, uplink: &Uplink) -> u16 {
    let Some(path) = netcfg::path_mtu(uplink.server_ip()) else {
        return config.mtu;
    };
    let fits = path.saturating_sub(uplink.overhead()).max(576);
    if fits < config.mtu {
        tracing::info!(
            "path MTU {path} to the server: tunnel MTU {fits} instead of {}",
            config.mtu
        );
    }
    config.mtu.min(fits)
}

/// Set up (or redo) the TUN device and routes from the server's config.
fn configure(
    tun: &Tun,
    config: &TunnelConfig,
    mtu: u16,
    previous: Option<&TunnelConfig>,
    routes: &[Route],
    server: IpAddr,
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
        "tunnel up on {}: {} via {} (MTU {})",
        tun.name(),
        shown.join(", "),
        config.server_v4,
        mtu
    );
    if previous.is_some() {
        return Ok(()); // routes stay: they name the device, not the addresses
    }
    for route in routes {
        match route {
            Route::Default => netcfg::route_default(undo, tun.name(), server, config.v6.is_some())?,
            Route::Net(net) => netcfg::add_route(undo, *net, tun.name())?,
        }
    }
    Ok(())
}

fn from_tun(engine: &mut Client, tun: &mut Tun, uplink: &mut Uplink) -> anyhow::Result<bool> {
    let mut dry = false;
    for _ in 0..MAX_BATCHES_PER_WAKEUP {
        let now = Instant::now();
        let result = tun.try_read_batch(|packet| {
            // Seal straight into the transport's send buffer: no copy.
            uplink.send_with(now, |out| engine.handle_tun_packet(now, packet, out).ok());
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
    uplink.flush();
    Ok(dry)
}

fn status(
    engine: &Client,
    tun: &str,
    url: &ServerUrl,
    uplink: &Uplink,
    server_key: &iptun_proto::crypto::PublicKey,
    config: Option<&TunnelConfig>,
) -> Status {
    let (transport, endpoint) = uplink.describe();
    let now = Instant::now();
    let addresses: Vec<String> = config
        .map(|c| {
            std::iter::once(c.client_v4.to_string())
                .chain(c.v6.map(|v| v.0.to_string()))
                .collect()
        })
        .unwrap_or_default();
    let session = SessionStatus {
        key: server_key.to_base64(),
        addresses: addresses.clone(),
        transport: transport.into(),
        endpoint: Some(endpoint),
        rx_bytes: 0,
        rx_packets: 0,
        tx_bytes: 0,
        tx_packets: 0,
        drops: Default::default(),
        since_handshake_secs: None,
        path: uplink.path_info(),
    }
    .counters(
        engine.traffic(),
        engine.drops(),
        engine.last_handshake(),
        now,
    );
    Status {
        role: "client".into(),
        tun: tun.into(),
        addresses,
        endpoints: vec![url.to_string()],
        sessions: vec![session],
        drops: Default::default(),
    }
}

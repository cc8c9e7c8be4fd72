//! The client daemon: a TUN device and one UDP socket to the server, with
//! the sans-IO [`Client`] engine in between.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use ipnet::IpNet;
use iptun_proto::TunnelConfig;
use iptun_proto::engine::{Client, ClientConfig, ClientEvent, ClientOutput};

use crate::cli::ClientArgs;
use crate::control::{self, ControlSocket, SessionStatus, Status};
use crate::daemon::{self, DropReporter, MAX_BATCHES_PER_WAKEUP};
use crate::netcfg::{self, Undo};
use crate::transport::udp::{self, UdpReceiver, UdpSender};
use crate::tun::Tun;
use crate::url::ServerUrl;

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
    let tun = args.tun.unwrap_or_else(|| "iptun0".to_owned());
    Ok(Settings {
        config: ClientConfig::new(private_key, server_key),
        server,
        routes,
        control: args.control.unwrap_or_else(|| control::default_path(&tun)),
        tun,
        offload: !args.no_offload,
    })
}

/// Run the client until SIGINT/SIGTERM.
pub async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let s = settings(args)?;
    let server = s.server.resolve()?;
    let control = ControlSocket::bind(&s.control)?;
    let mut tun = Tun::create(&s.tun, s.offload)?;
    let (mut receiver, mut sender) = udp::bind_for(server)?;
    let mut engine = Client::new(s.config, Instant::now(), daemon::unix_nanos());
    let mut undo = Undo::new();
    let mut configured: Option<TunnelConfig> = None;
    tracing::info!(
        "connecting to {} ({server}) from {}",
        s.server,
        receiver.local_addr()?
    );

    let mut drops = DropReporter::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let shutdown = daemon::shutdown_signal();
    tokio::pin!(shutdown);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let deadline = engine
            .next_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        tokio::select! {
            () = &mut shutdown => break,
            r = tun.readable() => {
                r.context("waiting on the TUN device")?;
                if !from_tun(&mut engine, &mut tun, &mut sender, server)? {
                    tokio::task::yield_now().await;
                }
            }
            r = std::future::poll_fn(|cx| receiver.poll_readable(cx)) => {
                r.context("waiting on the UDP socket")?;
                if !from_network(&mut engine, &mut tun, &mut receiver, &mut sender, server).await? {
                    tokio::task::yield_now().await;
                }
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                while let Some(n) = engine.poll_timers(Instant::now(), &mut buf) {
                    sender.send(server, &buf[..n]);
                }
                sender.flush();
            }
            _ = ticker.tick() => drops.tick(Instant::now(), engine.drops()),
            conn = control.accept() => {
                if let Ok(conn) = conn {
                    control::reply(conn, &status(&engine, tun.name(), &s.server, server, configured.as_ref()));
                }
            }
        }
        while let Some(ClientEvent::Configured(config)) = engine.poll_event() {
            configure(
                &tun,
                &config,
                configured.as_ref(),
                &s.routes,
                server.ip(),
                &mut undo,
            )?;
            configured = Some(config);
        }
    }
    drop(undo);
    Ok(())
}

/// Set up (or redo) the TUN device and routes from the server's config.
fn configure(
    tun: &Tun,
    config: &TunnelConfig,
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
    netcfg::configure_interface(tun.name(), &addrs, config.mtu)?;
    let shown: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    tracing::info!(
        "tunnel up on {}: {} via {} (MTU {})",
        tun.name(),
        shown.join(", "),
        config.server_v4,
        config.mtu
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

fn from_tun(
    engine: &mut Client,
    tun: &mut Tun,
    sender: &mut UdpSender,
    server: SocketAddr,
) -> anyhow::Result<bool> {
    let mut dry = false;
    for _ in 0..MAX_BATCHES_PER_WAKEUP {
        let now = Instant::now();
        let result = tun.try_read_batch(|packet| {
            // Seal straight into the send batch: no copy.
            sender.send_with(server, |out| {
                engine.handle_tun_packet(now, packet, out).ok()
            });
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
    sender.flush();
    Ok(dry)
}

async fn from_network(
    engine: &mut Client,
    tun: &mut Tun,
    receiver: &mut UdpReceiver,
    sender: &mut UdpSender,
    server: SocketAddr,
) -> anyhow::Result<bool> {
    let mut dry = false;
    for _ in 0..MAX_BATCHES_PER_WAKEUP {
        let now = Instant::now();
        let result = receiver.try_recv_batch(|_, datagram| {
            let Some(buf) = tun.stage_buffer(datagram.len()) else {
                return;
            };
            match engine.handle_datagram(now, datagram, buf) {
                Ok(ClientOutput::Tun(packet)) => {
                    let n = packet.len();
                    tun.commit(n);
                }
                Ok(ClientOutput::Send(msg)) => sender.send(server, msg),
                Ok(ClientOutput::Nothing) | Err(_) => {}
            }
        });
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                dry = true;
                break;
            }
            Err(e) => return Err(e).context("receiving on the UDP socket"),
        }
        tun.flush().await.context("writing to the TUN device")?;
    }
    sender.flush();
    Ok(dry)
}

fn status(
    engine: &Client,
    tun: &str,
    url: &ServerUrl,
    server: SocketAddr,
    config: Option<&TunnelConfig>,
) -> Status {
    let now = Instant::now();
    let addresses: Vec<String> = config
        .map(|c| {
            std::iter::once(c.client_v4.to_string())
                .chain(c.v6.map(|v| v.0.to_string()))
                .collect()
        })
        .unwrap_or_default();
    let session = SessionStatus {
        key: "server".into(),
        addresses: addresses.clone(),
        transport: "udp".into(),
        endpoint: Some(server.to_string()),
        rx_bytes: 0,
        rx_packets: 0,
        tx_bytes: 0,
        tx_packets: 0,
        drops: Default::default(),
        since_handshake_secs: None,
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

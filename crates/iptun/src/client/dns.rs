//! A DNS path's driver: its resolvers, numbered as the core knows them
//! ([`Remote::Resolver`]), each reached by plain DNS over UDP (one socket
//! for all of them), DNS over TLS or DNS over HTTPS (a connection task
//! each: [`crate::transport::resolver`]). No protocol here.

use std::fmt::Display;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs as _};
use std::task::{Context, Poll};
use std::time::Instant;

use anyhow::Context as _;
use iptun_proto::connection::{Connection, PathEvent, PathId, Remote, Transmit};
use rustls::pki_types::ServerName;
use tokio::sync::mpsc;

use super::paths::{HttpOptions, first_hop};
use crate::daemon::MAX_BATCHES_PER_WAKEUP;
use crate::transport::http_client::{self, Proxy};
use crate::transport::resolver::{self, FromResolver, Link, LinkEvent, Protocol};
use crate::transport::tls;
use crate::tun::PacketWriter;
use crate::url::ResolverUrl;

/// Answers and news queued from the resolvers' tasks for the client loop;
/// when it is full the tasks wait (and TCP slows the resolver down), so
/// no answer is lost here.
const FROM_LINKS: usize = 512;

/// A DNS path's resolvers and what reaches them.
pub struct DnsDriver {
    /// By number.
    resolvers: Vec<Resolver>,
    /// The socket of the plain resolvers, if any.
    udp: Option<UdpResolvers>,
    /// From the DoT and DoH resolvers' tasks, if any.
    links: Option<mpsc::Receiver<FromResolver>>,
    /// What `poll_readable` took off `links`, for `receive`.
    pending: Option<FromResolver>,
    /// Where the connection writes a query.
    buf: Vec<u8>,
}

enum Resolver {
    Udp(SocketAddr),
    Stream(Box<StreamResolver>),
}

/// A DoT or DoH resolver.
struct StreamResolver {
    url: ResolverUrl,
    /// The resolver's address, or its proxy's.
    first_hop: SocketAddr,
    proxy: Option<Proxy>,
    link: Link,
    state: LinkState,
}

/// What a stream resolver's connection has been doing, for status and for
/// telling a path none of whose resolvers can be reached.
#[derive(Debug, Default)]
struct LinkState {
    connected: bool,
    connects: u64,
    failures: u64,
    last_error: Option<String>,
    /// The last try to connect (or to get a first answer) failed, and no
    /// connection has been opened since.
    failing: bool,
}

/// One UDP socket for all the plain resolvers.
struct UdpResolvers {
    socket: tokio::net::UdpSocket,
    /// Whether `socket` is dual-stack IPv6 (IPv4 resolvers mapped).
    dual_stack: bool,
}

impl DnsDriver {
    /// Open what reaches `resolvers`: a UDP socket for the plain ones (IPv6
    /// ones are left out where the host has no IPv6), a task for each DoT
    /// or DoH one (host names resolved now; connections opened at the
    /// first query). The numbering is of the resolvers kept.
    pub fn open(resolvers: Vec<ResolverUrl>, options: &HttpOptions) -> anyhow::Result<Self> {
        let plain: Vec<SocketAddr> = resolvers
            .iter()
            .filter_map(|r| match r {
                ResolverUrl::Udp(a) => Some(*a),
                _ => None,
            })
            .collect();
        let (udp, usable) = if plain.is_empty() {
            (None, Vec::new())
        } else {
            let (socket, usable) = resolver_socket(plain)?;
            let dual_stack = socket.local_addr()?.is_ipv6();
            (Some(UdpResolvers { socket, dual_stack }), usable)
        };
        let needs_links = resolvers.iter().any(ResolverUrl::uses_tls);
        let (up, links) = mpsc::channel(FROM_LINKS);
        let mut driver = Self {
            resolvers: Vec::new(),
            udp,
            links: needs_links.then_some(links),
            pending: None,
            buf: vec![0; 1 << 16],
        };
        let mut configs = TlsConfigs::default();
        for url in resolvers {
            let resolver = match url {
                ResolverUrl::Udp(a) if !usable.contains(&a) => continue,
                ResolverUrl::Udp(a) => Resolver::Udp(a),
                url => {
                    let number = driver.resolvers.len();
                    let r = StreamResolver::open(url, number, options, &mut configs, up.clone())?;
                    Resolver::Stream(Box::new(r))
                }
            };
            driver.resolvers.push(resolver);
        }
        Ok(driver)
    }

    /// How many resolvers the path has.
    pub fn count(&self) -> usize {
        self.resolvers.len()
    }

    /// The addresses it talks to: resolvers, proxies.
    pub fn underlay(&self) -> Vec<IpAddr> {
        self.resolvers
            .iter()
            .map(|r| match r {
                Resolver::Udp(a) => a.ip(),
                Resolver::Stream(s) => s.first_hop.ip(),
            })
            .collect()
    }

    /// Send the query `seal` writes to the resolver it names. A full socket
    /// buffer or queue loses it: the core times it out.
    pub fn send_with(&mut self, seal: impl FnOnce(&mut [u8]) -> Option<Transmit>) {
        let Some(t) = seal(&mut self.buf) else { return };
        let Remote::Resolver(i) = t.to else { return };
        let query = &self.buf[..t.len];
        match (self.resolvers.get(i), &self.udp) {
            (Some(Resolver::Udp(to)), Some(udp)) => udp.send(query, *to),
            (Some(Resolver::Stream(s)), _) => s.link.send(query),
            _ => {}
        }
    }

    /// Ready to receive: a datagram, an answer or news from a task.
    pub fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.pending.is_some() {
            return Poll::Ready(Ok(()));
        }
        if let Some(udp) = &self.udp
            && let Poll::Ready(r) = udp.socket.poll_recv_ready(cx)
        {
            return Poll::Ready(r);
        }
        if let Some(links) = &mut self.links {
            match links.poll_recv(cx) {
                Poll::Ready(Some(m)) => {
                    self.pending = Some(m);
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(None) => {
                    let e = std::io::Error::other("the resolvers' tasks ended");
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }

    /// Hand what arrived (up to a bound) to the connection. Returns whether
    /// every source ran dry.
    pub fn receive(
        &mut self,
        conn: &mut Connection,
        path: PathId,
        tun: &mut impl PacketWriter,
    ) -> anyhow::Result<bool> {
        let links_dry = self.receive_from_links(conn, path, tun);
        let udp_dry = self.receive_datagrams(conn, path, tun)?;
        Ok(links_dry && udp_dry)
    }

    fn receive_from_links(
        &mut self,
        conn: &mut Connection,
        path: PathId,
        tun: &mut impl PacketWriter,
    ) -> bool {
        for _ in 0..MAX_BATCHES_PER_WAKEUP * 8 {
            let next = self
                .pending
                .take()
                .or_else(|| self.links.as_mut()?.try_recv().ok());
            let Some(next) = next else { return true };
            let now = Instant::now();
            match next {
                FromResolver::Answer { resolver, bytes } => {
                    conn.handle_input(now, path, Remote::Resolver(resolver), &bytes, tun);
                }
                FromResolver::Link { resolver, event } => {
                    if let Some(why) = self.link_event(resolver, event) {
                        conn.handle_path_event(now, path, PathEvent::Unreachable(why));
                    }
                }
            }
        }
        false
    }

    fn receive_datagrams(
        &mut self,
        conn: &mut Connection,
        path: PathId,
        tun: &mut impl PacketWriter,
    ) -> anyhow::Result<bool> {
        let Some(udp) = &self.udp else {
            return Ok(true);
        };
        for _ in 0..MAX_BATCHES_PER_WAKEUP * 8 {
            let (n, from) = match udp.socket.try_recv_from(&mut self.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(true),
                // ICMP port unreachable from a resolver: its query times out.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e).context("receiving on the DNS socket"),
            };
            // Only our resolvers' answers, by their number.
            let from = SocketAddr::new(from.ip().to_canonical(), from.port());
            let number = self
                .resolvers
                .iter()
                .position(|r| matches!(r, Resolver::Udp(a) if *a == from));
            if let Some(i) = number {
                let now = Instant::now();
                conn.handle_input(now, path, Remote::Resolver(i), &self.buf[..n], tun);
            }
        }
        Ok(false)
    }

    /// Note what became of resolver `i`'s connection; why the path is of
    /// no use when no resolver of it can be reached. (One resolver failing
    /// among several is the core's to judge, by its queries' timeouts.)
    fn link_event(&mut self, i: usize, event: LinkEvent) -> Option<String> {
        let Some(Resolver::Stream(r)) = self.resolvers.get_mut(i) else {
            return None;
        };
        r.state.update(&r.url, event);
        self.unreachable()
    }

    /// Why no resolver can be reached, when none can: every one is DoT or
    /// DoH and failed its last try.
    fn unreachable(&self) -> Option<String> {
        let whys: Option<Vec<String>> = self
            .resolvers
            .iter()
            .map(|r| match r {
                Resolver::Stream(s) if s.state.failing => {
                    let why = s.state.last_error.as_deref().unwrap_or("failed");
                    Some(format!("{}: {why}", s.url))
                }
                _ => None,
            })
            .collect();
        whys.map(|w| w.join("; "))
    }

    /// The name of resolver `i`, as given (a plain one by its address).
    pub fn resolver_name(&self, i: usize) -> Option<String> {
        self.resolvers.get(i).map(|r| match r {
            Resolver::Udp(a) => a.to_string(),
            Resolver::Stream(s) => s.url.to_string(),
        })
    }

    /// Every resolver and its connection, for status.
    pub fn info(&self) -> serde_json::Value {
        let resolvers: Vec<serde_json::Value> = self
            .resolvers
            .iter()
            .map(|r| match r {
                Resolver::Udp(a) => serde_json::json!({ "resolver": a.to_string() }),
                Resolver::Stream(s) => serde_json::json!({
                    "resolver": s.url.to_string(),
                    "proxy": s.proxy.as_ref().map(|p| p.authority.clone()),
                    "connected": s.state.connected,
                    "connects": s.state.connects,
                    "failures": s.state.failures,
                    "last_error": s.state.last_error,
                    "dropped_queries": s.link.dropped(),
                }),
            })
            .collect();
        serde_json::json!({ "resolvers": resolvers })
    }
}

impl LinkState {
    fn update(&mut self, name: &impl Display, event: LinkEvent) {
        match event {
            LinkEvent::Connected => {
                tracing::debug!("DNS resolver {name}: connected");
                self.connected = true;
                self.connects += 1;
                self.failing = false;
            }
            LinkEvent::Closed(why) => {
                tracing::debug!("DNS resolver {name}: connection closed: {why}");
                self.connected = false;
                self.failing = false;
                if why != "idle" {
                    self.last_error = Some(why);
                }
            }
            LinkEvent::Failed(why) => {
                // Said once, not at every try.
                if !self.failing || self.last_error.as_ref() != Some(&why) {
                    tracing::warn!("DNS resolver {name}: {why}");
                }
                self.connected = false;
                self.failures += 1;
                self.failing = true;
                self.last_error = Some(why);
            }
        }
    }
}

/// The TLS settings of the resolvers, made once for all of them.
#[derive(Default)]
struct TlsConfigs {
    dot: Option<std::sync::Arc<rustls::ClientConfig>>,
    doh: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl StreamResolver {
    /// Resolve the first hop, start the task.
    fn open(
        url: ResolverUrl,
        number: usize,
        options: &HttpOptions,
        configs: &mut TlsConfigs,
        up: mpsc::Sender<FromResolver>,
    ) -> anyhow::Result<Self> {
        let (host, protocol, proxy, tls) = match &url {
            ResolverUrl::Udp(_) => unreachable!("plain resolvers have no task"),
            ResolverUrl::Tls { host, .. } => {
                let tls = match &configs.dot {
                    Some(c) => c.clone(),
                    None => configs
                        .dot
                        .insert(tls::client_with_alpn(&options.trust, &[])?)
                        .clone(),
                };
                (host.clone(), Protocol::Tls, None, tls)
            }
            ResolverUrl::Https(u) => {
                let env = |k: &str| std::env::var(k).ok();
                let proxy = http_client::proxy_for(u, options.proxy.as_deref(), env)?;
                let tls = match &configs.doh {
                    Some(c) => c.clone(),
                    None => configs
                        .doh
                        .insert(tls::client_with_alpn(&options.trust, &[tls::ALPN_H2])?)
                        .clone(),
                };
                let protocol = Protocol::Https {
                    url: u.clone(),
                    proxy: proxy.clone(),
                };
                (u.host.clone(), protocol, proxy, tls)
            }
        };
        let first_hop = match (&url, &proxy) {
            (ResolverUrl::Https(u), proxy) => first_hop(u, proxy.as_ref())?,
            (ResolverUrl::Tls { host, port }, _) => (host.as_str(), *port)
                .to_socket_addrs()
                .with_context(|| format!("resolving {host}"))?
                .next()
                .with_context(|| format!("{host} has no address"))?,
            (ResolverUrl::Udp(_), _) => unreachable!("plain resolvers have no task"),
        };
        let server_name = ServerName::try_from(host.clone())
            .with_context(|| format!("`{host}` is not a valid TLS server name"))?;
        let config = resolver::Config {
            resolver: number,
            name: url.to_string(),
            connect_to: first_hop,
            server_name,
            tls,
            protocol,
        };
        Ok(Self {
            url,
            first_hop,
            proxy,
            link: Link::spawn(config, up),
            state: LinkState::default(),
        })
    }
}

impl UdpResolvers {
    fn send(&self, query: &[u8], to: SocketAddr) {
        // IPv4 resolvers as IPv4-mapped addresses on a dual-stack socket.
        let to = match to.ip() {
            IpAddr::V4(v4) if self.dual_stack => {
                SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), to.port())
            }
            _ => to,
        };
        // A full socket buffer loses the query: the uplink times it out.
        // (The syscall itself: tokio's readiness would call a socket the
        // reactor has not polled yet unwritable, losing the first queries.)
        let _ = socket2::SockRef::from(&self.socket).send_to(query, &to.into());
    }
}

/// One socket for all the resolvers: IPv4 only when they all are, else
/// dual-stack IPv6 (IPv4 resolvers reached by mapped addresses). Where the
/// host has no IPv6, the IPv6 resolvers are skipped.
fn resolver_socket(
    resolvers: Vec<SocketAddr>,
) -> anyhow::Result<(tokio::net::UdpSocket, Vec<SocketAddr>)> {
    let open = |any: &str| -> std::io::Result<std::net::UdpSocket> {
        let any: SocketAddr = any.parse().expect("valid");
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(any),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        if any.is_ipv6() {
            socket.set_only_v6(false)?; // before bind, or it does not apply
        }
        socket.bind(&any.into())?;
        Ok(socket.into())
    };
    let (socket, resolvers) = if resolvers.iter().all(SocketAddr::is_ipv4) {
        (open("0.0.0.0:0"), resolvers)
    } else {
        match open("[::]:0") {
            Ok(s) => (Ok(s), resolvers),
            Err(e) => {
                let (v4, v6): (Vec<_>, Vec<_>) =
                    resolvers.into_iter().partition(SocketAddr::is_ipv4);
                tracing::warn!("no IPv6 socket ({e}): skipping resolvers {v6:?}");
                anyhow::ensure!(
                    !v4.is_empty(),
                    "no IPv6 socket for the resolvers {v6:?}: {e}"
                );
                (open("0.0.0.0:0"), v4)
            }
        }
    };
    let socket = socket.context("binding a UDP socket for DNS")?;
    socket.set_nonblocking(true)?;
    crate::transport::sockopt::size_buffers(std::os::fd::AsRawFd::as_raw_fd(&socket));
    Ok((tokio::net::UdpSocket::from_std(socket)?, resolvers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::http_client::Mode;
    use crate::transport::tls::Trust;

    fn options(proxy: Option<&str>) -> HttpOptions {
        HttpOptions {
            trust: Trust::Pin([7; 32]),
            proxy: proxy.map(Into::into),
            mode: Mode::Auto,
        }
    }

    fn urls(list: &str) -> Vec<ResolverUrl> {
        let url: crate::url::ServerUrl = format!("dns://t.example.com?{list}").parse().unwrap();
        let crate::url::ServerUrl::Dns { resolvers, .. } = url else {
            unreachable!()
        };
        resolvers
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    /// (No socket is opened: without plain resolvers there is none, and
    /// the tasks connect at their first query.)
    #[tokio::test]
    async fn the_underlay_has_every_resolver_or_its_proxy() {
        let list = "resolver=tls://192.0.2.1&resolver=https://192.0.2.7:8443/q";
        let d = DnsDriver::open(urls(list), &options(Some("none"))).unwrap();
        assert_eq!(d.count(), 2);
        assert_eq!(d.underlay(), ips(&["192.0.2.1", "192.0.2.7"]));
        assert_eq!(d.resolver_name(0).unwrap(), "tls://192.0.2.1:853");
        assert_eq!(d.resolver_name(1).unwrap(), "https://192.0.2.7:8443/q");
        assert_eq!(d.resolver_name(2), None);
        // A proxy carries DoH, not DoT.
        let d = DnsDriver::open(urls(list), &options(Some("http://192.0.2.9:3128"))).unwrap();
        assert_eq!(d.underlay(), ips(&["192.0.2.1", "192.0.2.9"]));
        let info = d.info();
        assert_eq!(info["resolvers"][0]["proxy"], serde_json::Value::Null);
        assert_eq!(info["resolvers"][1]["proxy"], "192.0.2.9:3128");
    }

    #[tokio::test]
    async fn the_path_is_unreachable_only_when_no_resolver_can_be_reached() {
        let list = "resolver=tls://192.0.2.1&resolver=https://192.0.2.7/q";
        let mut d = DnsDriver::open(urls(list), &options(Some("none"))).unwrap();
        let failed = || LinkEvent::Failed("refused".into());
        assert_eq!(d.link_event(0, failed()), None, "the other may work");
        let why = d.link_event(1, failed()).expect("none works");
        assert_eq!(
            why,
            "tls://192.0.2.1:853: refused; https://192.0.2.7:443/q: refused"
        );
        assert!(d.link_event(0, LinkEvent::Connected).is_none());
        assert!(d.link_event(1, failed()).is_none(), "the first connected");
        // A plain resolver is judged by the core, by its timeouts.
        d.resolvers
            .push(Resolver::Udp("192.0.2.53:53".parse().unwrap()));
        assert!(d.link_event(0, failed()).is_none());
        assert!(d.link_event(1, failed()).is_none());
        assert!(d.link_event(2, failed()).is_none(), "not a stream resolver");
    }

    #[test]
    fn a_resolver_that_fails_is_said_once_and_recovers() {
        let mut s = LinkState::default();
        s.update(&"tls://x", LinkEvent::Failed("refused".into()));
        s.update(&"tls://x", LinkEvent::Failed("refused".into()));
        assert!(s.failing && !s.connected);
        assert_eq!((s.failures, s.last_error.as_deref()), (2, Some("refused")));
        s.update(&"tls://x", LinkEvent::Connected);
        assert!(s.connected && !s.failing);
        s.update(&"tls://x", LinkEvent::Closed("idle".into()));
        assert!(!s.failing && !s.connected);
        assert_eq!(s.last_error.as_deref(), Some("refused"), "idle is no error");
        s.update(&"tls://x", LinkEvent::Closed("reset".into()));
        assert_eq!(s.last_error.as_deref(), Some("reset"));
        assert_eq!(s.connects, 1);
    }
}

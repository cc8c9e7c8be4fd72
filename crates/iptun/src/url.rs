//! Transport URLs: `udp://HOST:PORT`, `icmp://HOST` and
//! `dns://DOMAIN?resolver=R&max-query=N` (client; `R` is `IP[:PORT]` for
//! plain DNS, `tls://HOST[:853]` for DNS over TLS or `https://HOST[:443]/PATH`
//! for DNS over HTTPS; `resolver` may be given several times) /
//! `dns://ADDR[:PORT]?domain=DOMAIN` (server), `https://HOST[:PORT]/PATH`
//! and `http://HOST[:PORT]/PATH`.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use anyhow::{Context as _, bail};
use iptun_proto::wire::icmp::Family;

/// The default UDP port (the seed's).
pub const DEFAULT_UDP_PORT: u16 = 3000;

/// The DNS port.
pub const DNS_PORT: u16 = 53;

/// The DNS-over-TLS port (RFC 7858).
pub const DOT_PORT: u16 = 853;

/// The path of a DNS-over-HTTPS URL given without one (RFC 8484's example,
/// what public resolvers use).
pub const DOH_PATH: &str = "/dns-query";

/// The HTTP ports.
pub const HTTP_PORT: u16 = 80;
pub const HTTPS_PORT: u16 = 443;

const SUPPORTED: &str = "supported: udp://, icmp://, dns://, https://, http://";

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// UDP on this address.
    Udp(SocketAddr),
    /// ICMP echo requests of this family (on all addresses).
    Icmp(Family),
    /// DNS queries for `domain` (the tunnel domain delegated to us) on this
    /// UDP address.
    Dns { addr: SocketAddr, domain: String },
    /// HTTP requests for `path` on this TCP address, with TLS or without
    /// (behind a reverse proxy that terminates it).
    Http {
        addr: SocketAddr,
        path: String,
        tls: bool,
    },
}

/// Where a client finds its server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerUrl {
    /// UDP to this host and port.
    Udp { host: String, port: u16 },
    /// ICMP echo to this host (an IPv6 address selects ICMPv6).
    Icmp { host: String },
    /// DNS queries for names under `domain` through `resolvers` (none
    /// given: the system's, from /etc/resolv.conf), query names of at most
    /// `max_query` characters if given.
    Dns {
        domain: String,
        resolvers: Vec<ResolverUrl>,
        max_query: Option<usize>,
    },
    /// WebSocket or long-poll requests for `path` on `host:port`.
    Http(HttpUrl),
}

/// How a DNS path reaches one of its resolvers (a `?resolver=` value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResolverUrl {
    /// Plain DNS over UDP: `IP[:PORT]` (or `udp://IP[:PORT]`), port 53.
    Udp(SocketAddr),
    /// DNS over TLS (RFC 7858): `tls://HOST[:PORT]`, port 853. `host` is
    /// an IP address or a name (resolved at start); the certificate must
    /// name it.
    Tls { host: String, port: u16 },
    /// DNS over HTTPS (RFC 8484): `https://HOST[:PORT]/PATH`, port 443,
    /// path `/dns-query` if none.
    Https(HttpUrl),
}

impl ResolverUrl {
    /// Whether queries to it go over TLS (DoT or DoH).
    pub fn uses_tls(&self) -> bool {
        !matches!(self, Self::Udp(_))
    }
}

impl std::fmt::Display for ResolverUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Udp(addr) => addr.fmt(f),
            Self::Tls { host, port } if host.contains(':') => write!(f, "tls://[{host}]:{port}"),
            Self::Tls { host, port } => write!(f, "tls://{host}:{port}"),
            Self::Https(u) => u.fmt(f),
        }
    }
}

/// An `http://` or `https://` server URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Starts with `/`.
    pub path: String,
}

impl HttpUrl {
    /// `host:port`, bracketing an IPv6 address.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority(), self.path)
    }
}

/// A server URL resolved to an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerAddr {
    /// UDP to this socket address.
    Udp(SocketAddr),
    /// ICMP echo to this address.
    Icmp(IpAddr),
    /// DNS through these resolvers (at least one, used together) for names
    /// under `domain`, of at most `max_query` characters if given; DoT and
    /// DoH resolvers' names are resolved when their path is opened.
    Dns {
        domain: String,
        resolvers: Vec<ResolverUrl>,
        max_query: Option<usize>,
    },
    /// HTTP(S); resolved when connecting (perhaps by a proxy).
    Http(HttpUrl),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Udp,
    Icmp,
    Dns,
    Http,
    Https,
}

fn split(url: &str) -> anyhow::Result<(Scheme, &str)> {
    let Some((scheme, rest)) = url.split_once("://") else {
        bail!(
            "`{url}` is not a URL: expected e.g. udp://HOST:PORT, icmp://HOST, dns://DOMAIN or https://HOST/PATH"
        );
    };
    match scheme {
        "udp" => Ok((Scheme::Udp, rest)),
        "icmp" => Ok((Scheme::Icmp, rest)),
        "dns" => Ok((Scheme::Dns, rest)),
        "http" => Ok((Scheme::Http, rest)),
        "https" => Ok((Scheme::Https, rest)),
        "ws" | "wss" => {
            bail!("`{url}`: use http:// or https:// (WebSocket is used over them) ({SUPPORTED})")
        }
        _ => bail!("`{url}`: unknown transport `{scheme}` ({SUPPORTED})"),
    }
}

/// Split `host:port` or `[v6]:port` (port optional).
fn host_port<'a>(rest: &'a str, url: &str) -> anyhow::Result<(&'a str, Option<&'a str>)> {
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .with_context(|| format!("`{url}`: missing `]`"))?;
        (host, after.strip_prefix(':'))
    } else if rest.matches(':').count() > 1 {
        (rest, None) // a bare IPv6 address
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        bail!("`{url}`: missing host");
    }
    Ok((host, port))
}

fn udp_port(port: Option<&str>, url: &str) -> anyhow::Result<u16> {
    match port {
        Some(p) => p
            .parse()
            .with_context(|| format!("`{url}`: bad port `{p}`")),
        None => Ok(DEFAULT_UDP_PORT),
    }
}

/// Split off `?key=value&...`; the rest loses trailing slashes.
fn query<'a>(rest: &'a str, url: &str) -> anyhow::Result<(&'a str, Vec<(&'a str, &'a str)>)> {
    let (rest, q) = rest.split_once('?').unwrap_or((rest, ""));
    let mut params = Vec::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .with_context(|| format!("`{url}`: expected key=value, not `{pair}`"))?;
        params.push((k, v));
    }
    Ok((rest.trim_end_matches('/'), params))
}

/// Split `authority/path` of an HTTP URL: host, port (default by scheme),
/// path (`/` if none).
fn http_parts(rest: &str, tls: bool, url: &str) -> anyhow::Result<(String, u16, String)> {
    if rest.contains('?') || rest.contains('#') {
        bail!("`{url}`: HTTP URLs take no query or fragment");
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        bail!("`{url}`: no credentials in the server URL (they belong to --proxy)");
    }
    let (host, port) = host_port(authority, url)?;
    let port = match port {
        Some(p) => p
            .parse()
            .with_context(|| format!("`{url}`: bad port `{p}`"))?,
        None if tls => HTTPS_PORT,
        None => HTTP_PORT,
    };
    Ok((host.to_owned(), port, path.to_owned()))
}

/// Reject parameters other than `allowed`.
fn only_params(params: &[(&str, &str)], allowed: &[&str], url: &str) -> anyhow::Result<()> {
    if let Some((k, _)) = params.iter().find(|(k, _)| !allowed.contains(k)) {
        if allowed.is_empty() {
            bail!("`{url}`: unknown parameter `{k}` (this transport takes none)");
        }
        bail!(
            "`{url}`: unknown parameter `{k}` (expected: {})",
            allowed.join(", ")
        );
    }
    Ok(())
}

/// `?max-query=N`: the longest query name, in characters (as `dig` shows
/// it, without the final dot), long enough to carry data under `domain`.
fn max_query(text: &str, domain: &str, url: &str) -> anyhow::Result<usize> {
    let n: usize = text
        .parse()
        .with_context(|| format!("`{url}`: max-query must be a number of characters"))?;
    let domain =
        iptun_proto::wire::dns::Domain::new(domain).map_err(|e| anyhow::anyhow!("`{url}`: {e}"))?;
    let least = iptun_proto::transport::dns::sizes::Sizes::new(&domain, None).min_name_len();
    anyhow::ensure!(
        (least..=iptun_proto::wire::dns::MAX_NAME_LEN).contains(&n),
        "`{url}`: max-query={n}: names under {domain} carry data from {least} to {} characters",
        iptun_proto::wire::dns::MAX_NAME_LEN,
        domain = domain.name(),
    );
    Ok(n)
}

/// `IP`, `IP:PORT`, `[V6]:PORT` or a bare IPv6 address; port 53 by default.
fn resolver_addr(text: &str, url: &str) -> anyhow::Result<SocketAddr> {
    let (host, port) = host_port(text, url)?;
    let ip: IpAddr = host.parse().with_context(|| {
        format!(
            "`{url}`: resolver must be an IP address, not `{host}` \
             (or tls://HOST[:853], https://HOST[:443]/PATH)"
        )
    })?;
    let port = match port {
        Some(p) => p
            .parse()
            .with_context(|| format!("`{url}`: bad port `{p}`"))?,
        None => DNS_PORT,
    };
    Ok(SocketAddr::new(ip, port))
}

/// One `?resolver=` value: plain (`IP[:PORT]`, `udp://IP[:PORT]`), DoT
/// (`tls://HOST[:PORT]`) or DoH (`https://HOST[:PORT][/PATH]`).
fn resolver_url(text: &str, url: &str) -> anyhow::Result<ResolverUrl> {
    let Some((scheme, rest)) = text.split_once("://") else {
        return resolver_addr(text, url).map(ResolverUrl::Udp);
    };
    match scheme {
        "udp" => resolver_addr(rest.trim_end_matches('/'), url).map(ResolverUrl::Udp),
        "tls" => {
            let (host, port) = host_port(rest.trim_end_matches('/'), url)?;
            if host.contains(['/', '@']) {
                bail!("`{url}`: DNS over TLS takes a host and port only: tls://HOST[:PORT]");
            }
            let port = match port {
                Some(p) => p
                    .parse()
                    .with_context(|| format!("`{url}`: bad port `{p}`"))?,
                None => DOT_PORT,
            };
            Ok(ResolverUrl::Tls {
                host: host.to_owned(),
                port,
            })
        }
        "https" => {
            let (host, port, path) = http_parts(rest, true, url)?;
            let path = if path == "/" { DOH_PATH.into() } else { path };
            Ok(ResolverUrl::Https(HttpUrl {
                tls: true,
                host,
                port,
                path,
            }))
        }
        "http" => bail!("`{url}`: DNS over HTTPS needs https://, not http://"),
        _ => bail!(
            "`{url}`: unknown resolver transport `{scheme}` \
             (supported: IP[:PORT], tls://HOST[:PORT], https://HOST[:PORT]/PATH)"
        ),
    }
}

/// The `nameserver` lines of a resolv.conf (port 53).
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then_some(())?;
            // Drop a zone index (`fe80::1%eth0`): not supported here.
            let ip: IpAddr = w.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, DNS_PORT))
        })
        .collect()
}

impl std::str::FromStr for Listen {
    type Err = anyhow::Error;

    fn from_str(url: &str) -> anyhow::Result<Self> {
        let (scheme, rest) = split(url)?;
        if let Scheme::Http | Scheme::Https = scheme {
            let tls = scheme == Scheme::Https;
            let (host, port, path) = http_parts(rest, tls, url)?;
            let ip: IpAddr = host
                .parse()
                .with_context(|| format!("`{url}`: listen on an IP address, not `{host}`"))?;
            return Ok(Self::Http {
                addr: SocketAddr::new(ip, port),
                path,
                tls,
            });
        }
        let (rest, params) = query(rest, url)?;
        if scheme == Scheme::Dns {
            only_params(&params, &["domain"], url)?;
        } else {
            only_params(&params, &[], url)?;
        }
        let (host, port) = host_port(rest, url)?;
        let ip: IpAddr = host
            .parse()
            .with_context(|| format!("`{url}`: listen on an IP address, not `{host}`"))?;
        match scheme {
            Scheme::Udp => Ok(Self::Udp(SocketAddr::new(ip, udp_port(port, url)?))),
            Scheme::Dns => {
                let Some(&(_, domain)) = params.iter().rfind(|(k, _)| *k == "domain") else {
                    bail!(
                        "`{url}`: the DNS listener needs its domain: dns://ADDR[:PORT]?domain=t.example.com"
                    );
                };
                iptun_proto::wire::dns::Domain::new(domain)
                    .map_err(|e| anyhow::anyhow!("`{url}`: {e}"))?;
                let port = match port {
                    Some(p) => p
                        .parse()
                        .with_context(|| format!("`{url}`: bad port `{p}`"))?,
                    None => DNS_PORT,
                };
                Ok(Self::Dns {
                    addr: SocketAddr::new(ip, port),
                    domain: domain.to_owned(),
                })
            }
            Scheme::Http | Scheme::Https => unreachable!("handled above"),
            Scheme::Icmp => {
                if port.is_some() || !ip.is_unspecified() {
                    bail!(
                        "`{url}`: ICMP listens on all addresses: use icmp://0.0.0.0 or icmp://[::]"
                    );
                }
                Ok(Self::Icmp(if ip.is_ipv4() {
                    Family::V4
                } else {
                    Family::V6
                }))
            }
        }
    }
}

impl std::str::FromStr for ServerUrl {
    type Err = anyhow::Error;

    fn from_str(url: &str) -> anyhow::Result<Self> {
        let (scheme, rest) = split(url)?;
        if let Scheme::Http | Scheme::Https = scheme {
            let tls = scheme == Scheme::Https;
            let (host, port, path) = http_parts(rest, tls, url)?;
            return Ok(Self::Http(HttpUrl {
                tls,
                host,
                port,
                path,
            }));
        }
        let (rest, params) = query(rest, url)?;
        if scheme == Scheme::Dns {
            only_params(&params, &["resolver", "max-query"], url)?;
            if rest.is_empty() {
                bail!("`{url}`: missing the tunnel domain: dns://t.example.com[?resolver=IP]");
            }
            iptun_proto::wire::dns::Domain::new(rest)
                .map_err(|e| anyhow::anyhow!("`{url}`: {e}"))?;
            let resolvers = params
                .iter()
                .filter(|(k, _)| *k == "resolver")
                .map(|(_, r)| resolver_url(r, url))
                .collect::<anyhow::Result<_>>()?;
            let max_query = match params.iter().rfind(|(k, _)| *k == "max-query") {
                Some((_, n)) => Some(max_query(n, rest, url)?),
                None => None,
            };
            return Ok(Self::Dns {
                domain: rest.to_owned(),
                resolvers,
                max_query,
            });
        }
        only_params(&params, &[], url)?;
        let (host, port) = host_port(rest, url)?;
        match scheme {
            Scheme::Dns | Scheme::Http | Scheme::Https => unreachable!("handled above"),
            Scheme::Udp => Ok(Self::Udp {
                host: host.to_owned(),
                port: udp_port(port, url)?,
            }),
            Scheme::Icmp if port.is_some() => bail!("`{url}`: ICMP has no ports"),
            Scheme::Icmp => Ok(Self::Icmp {
                host: host.to_owned(),
            }),
        }
    }
}

impl ServerUrl {
    /// Resolve to an address (the first the resolver gives).
    /// For DNS: the resolvers given, or the system's.
    pub fn resolve(&self) -> anyhow::Result<ServerAddr> {
        let (host, port) = match self {
            Self::Udp { host, port } => (host, *port),
            Self::Icmp { host } => (host, 0),
            Self::Http(u) => return Ok(ServerAddr::Http(u.clone())),
            Self::Dns {
                domain,
                resolvers,
                max_query,
            } => {
                let resolvers = if resolvers.is_empty() {
                    let text = std::fs::read_to_string("/etc/resolv.conf")
                        .context("reading /etc/resolv.conf (or give ?resolver=IP)")?;
                    parse_resolv_conf(&text)
                        .into_iter()
                        .map(ResolverUrl::Udp)
                        .collect()
                } else {
                    resolvers.clone()
                };
                anyhow::ensure!(
                    !resolvers.is_empty(),
                    "no resolver: /etc/resolv.conf names none; give dns://{domain}?resolver=IP"
                );
                return Ok(ServerAddr::Dns {
                    domain: domain.clone(),
                    resolvers,
                    max_query: *max_query,
                });
            }
        };
        let addr = (host.as_str(), port)
            .to_socket_addrs()
            .with_context(|| format!("resolving server {host}"))?
            .next()
            .with_context(|| format!("server {host} has no address"))?;
        Ok(match self {
            Self::Udp { .. } => ServerAddr::Udp(addr),
            Self::Icmp { .. } => ServerAddr::Icmp(addr.ip()),
            Self::Dns { .. } | Self::Http(_) => unreachable!("returned above"),
        })
    }
}

impl std::fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (scheme, host) = match self {
            Self::Udp { host, .. } => ("udp", host),
            Self::Icmp { host } => ("icmp", host),
            Self::Http(u) => return u.fmt(f),
            Self::Dns {
                domain,
                resolvers,
                max_query,
            } => {
                write!(f, "dns://{domain}")?;
                let params = resolvers
                    .iter()
                    .map(|r| format!("resolver={r}"))
                    .chain(max_query.map(|n| format!("max-query={n}")));
                for (i, p) in params.enumerate() {
                    let sep = if i == 0 { '?' } else { '&' };
                    write!(f, "{sep}{p}")?;
                }
                return Ok(());
            }
        };
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        match self {
            Self::Udp { port, .. } => write!(f, "{scheme}://{host}:{port}"),
            Self::Icmp { .. } | Self::Dns { .. } | Self::Http(_) => {
                write!(f, "{scheme}://{host}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_urls() {
        assert_eq!(
            "udp://0.0.0.0:3000".parse::<Listen>().unwrap(),
            Listen::Udp("0.0.0.0:3000".parse().unwrap())
        );
        assert_eq!(
            "udp://[::]".parse::<Listen>().unwrap(),
            Listen::Udp("[::]:3000".parse().unwrap())
        );
        assert_eq!(
            "icmp://0.0.0.0".parse::<Listen>().unwrap(),
            Listen::Icmp(Family::V4)
        );
        assert_eq!(
            "icmp://[::]".parse::<Listen>().unwrap(),
            Listen::Icmp(Family::V6)
        );
        assert!(
            "icmp://192.0.2.1"
                .parse::<Listen>()
                .unwrap_err()
                .to_string()
                .contains("all addresses")
        );
        assert!(
            "udp://example.com:1"
                .parse::<Listen>()
                .unwrap_err()
                .to_string()
                .contains("IP address")
        );
        assert_eq!(
            "dns://0.0.0.0?domain=t.example.com"
                .parse::<Listen>()
                .unwrap(),
            Listen::Dns {
                addr: "0.0.0.0:53".parse().unwrap(),
                domain: "t.example.com".into()
            }
        );
        assert_eq!(
            "dns://[::1]:5353/?domain=t.example.com"
                .parse::<Listen>()
                .unwrap(),
            Listen::Dns {
                addr: "[::1]:5353".parse().unwrap(),
                domain: "t.example.com".into()
            }
        );
        assert!(
            "dns://0.0.0.0"
                .parse::<Listen>()
                .unwrap_err()
                .to_string()
                .contains("needs its domain")
        );
        assert!(
            "dns://0.0.0.0?resolver=1.2.3.4"
                .parse::<Listen>()
                .unwrap_err()
                .to_string()
                .contains("unknown parameter")
        );
        assert!(
            "udp://0.0.0.0?domain=x"
                .parse::<Listen>()
                .unwrap_err()
                .to_string()
                .contains("unknown parameter")
        );
        assert_eq!(
            "https://0.0.0.0:8443/tunnel".parse::<Listen>().unwrap(),
            Listen::Http {
                addr: "0.0.0.0:8443".parse().unwrap(),
                path: "/tunnel".into(),
                tls: true
            }
        );
        assert_eq!(
            "http://[::1]".parse::<Listen>().unwrap(),
            Listen::Http {
                addr: "[::1]:80".parse().unwrap(),
                path: "/".into(),
                tls: false
            }
        );
        let e = "https://example.com/t".parse::<Listen>().unwrap_err();
        assert!(e.to_string().contains("IP address"), "{e}");
        let e = "wss://0.0.0.0/t".parse::<Listen>().unwrap_err().to_string();
        assert!(e.contains("https://"), "{e}");
        assert!(
            "0.0.0.0:3000"
                .parse::<Listen>()
                .unwrap_err()
                .to_string()
                .contains("not a URL")
        );
        assert!(
            "udp://1.2.3.4:x"
                .parse::<Listen>()
                .unwrap_err()
                .to_string()
                .contains("bad port")
        );
    }

    #[test]
    fn server_urls() {
        let u: ServerUrl = "udp://192.0.2.1".parse().unwrap();
        assert_eq!(
            u.resolve().unwrap(),
            ServerAddr::Udp("192.0.2.1:3000".parse().unwrap())
        );
        let u: ServerUrl = "udp://[2001:db8::1]:4000/".parse().unwrap();
        assert_eq!(
            u.resolve().unwrap(),
            ServerAddr::Udp("[2001:db8::1]:4000".parse().unwrap())
        );
        assert_eq!(u.to_string(), "udp://[2001:db8::1]:4000");
        let u: ServerUrl = "icmp://2001:db8::1".parse().unwrap();
        assert_eq!(
            u.resolve().unwrap(),
            ServerAddr::Icmp("2001:db8::1".parse().unwrap())
        );
        assert_eq!(u.to_string(), "icmp://[2001:db8::1]");
        assert!("icmp://192.0.2.1:5".parse::<ServerUrl>().is_err());
        assert!("udp://:3000".parse::<ServerUrl>().is_err());
    }

    #[test]
    fn dns_server_urls() {
        let u: ServerUrl = "dns://t.example.com?resolver=192.0.2.1&resolver=[2001:db8::1]:5353"
            .parse()
            .unwrap();
        assert_eq!(
            u.resolve().unwrap(),
            ServerAddr::Dns {
                domain: "t.example.com".into(),
                resolvers: vec![
                    ResolverUrl::Udp("192.0.2.1:53".parse().unwrap()),
                    ResolverUrl::Udp("[2001:db8::1]:5353".parse().unwrap())
                ],
                max_query: None,
            }
        );
        assert_eq!(
            u.to_string(),
            "dns://t.example.com?resolver=192.0.2.1:53&resolver=[2001:db8::1]:5353"
        );
        let u: ServerUrl = "dns://t.example.com/".parse().unwrap();
        assert_eq!(
            u,
            ServerUrl::Dns {
                domain: "t.example.com".into(),
                resolvers: vec![],
                max_query: None,
            }
        );
        // A cap on query names, kept in the URL shown.
        let u: ServerUrl = "dns://t.example.com?max-query=72&resolver=192.0.2.1"
            .parse()
            .unwrap();
        assert_eq!(
            u.to_string(),
            "dns://t.example.com?resolver=192.0.2.1:53&max-query=72"
        );
        assert!(matches!(
            u.resolve().unwrap(),
            ServerAddr::Dns {
                max_query: Some(72),
                ..
            }
        ));
        for bad in ["x", "20", "254", "-1"] {
            let url = format!("dns://t.example.com?max-query={bad}");
            assert!(url.parse::<ServerUrl>().is_err(), "{url}");
        }
        assert!(
            "dns://t.example.com?resolver=dns.google"
                .parse::<ServerUrl>()
                .is_err()
        );
        assert!(
            "dns://t.example.com?server=1.2.3.4"
                .parse::<ServerUrl>()
                .is_err()
        );
        assert!("dns://?resolver=1.2.3.4".parse::<ServerUrl>().is_err());
    }

    #[test]
    fn dot_and_doh_resolvers_mix_with_plain_ones() {
        let u: ServerUrl = "dns://t.example.com?resolver=tls://192.0.2.1\
            &resolver=https://dns.example.net/q&resolver=192.0.2.2\
            &resolver=tls://[2001:db8::1]:8853&resolver=https://192.0.2.3:8443\
            &resolver=udp://192.0.2.4:5353"
            .parse()
            .unwrap();
        let ServerUrl::Dns { resolvers, .. } = &u else {
            panic!("{u:?}")
        };
        let https = |host: &str, port, path: &str| {
            ResolverUrl::Https(HttpUrl {
                tls: true,
                host: host.into(),
                port,
                path: path.into(),
            })
        };
        assert_eq!(
            resolvers,
            &[
                ResolverUrl::Tls {
                    host: "192.0.2.1".into(),
                    port: 853
                },
                https("dns.example.net", 443, "/q"),
                ResolverUrl::Udp("192.0.2.2:53".parse().unwrap()),
                ResolverUrl::Tls {
                    host: "2001:db8::1".into(),
                    port: 8853
                },
                https("192.0.2.3", 8443, "/dns-query"),
                ResolverUrl::Udp("192.0.2.4:5353".parse().unwrap()),
            ]
        );
        assert!(resolvers[0].uses_tls() && resolvers[1].uses_tls() && !resolvers[2].uses_tls());
        assert_eq!(
            u.to_string(),
            "dns://t.example.com?resolver=tls://192.0.2.1:853\
             &resolver=https://dns.example.net:443/q&resolver=192.0.2.2:53\
             &resolver=tls://[2001:db8::1]:8853&resolver=https://192.0.2.3:8443/dns-query\
             &resolver=192.0.2.4:5353"
        );
        // What is printed parses back to the same.
        assert_eq!(u.to_string().parse::<ServerUrl>().unwrap(), u);
    }

    #[test]
    fn bad_resolvers_are_named() {
        for (bad, says) in [
            ("resolver=http://192.0.2.1/dns-query", "needs https://"),
            (
                "resolver=quic://192.0.2.1",
                "unknown resolver transport `quic`",
            ),
            ("resolver=tls://192.0.2.1:99999", "bad port"),
            ("resolver=tls://192.0.2.1/x", "host and port only"),
            ("resolver=tls://u@192.0.2.1", "host and port only"),
            ("resolver=tls://", "missing host"),
            ("resolver=https://192.0.2.1/q?dns=x", "no query"),
            ("resolver=https://u:p@192.0.2.1/q", "no credentials"),
            ("resolver=udp://dns.google", "IP address"),
            ("resolver=dns.google", "tls://HOST"),
        ] {
            let url = format!("dns://t.example.com?{bad}");
            let e = url.parse::<ServerUrl>().unwrap_err().to_string();
            assert!(e.contains(says), "{url}: {e}");
        }
    }

    #[test]
    fn resolv_conf() {
        let text = "# comment\nsearch example.com\nnameserver 192.0.2.53\n nameserver  2001:db8::53 \nnameserver bogus\noptions edns0\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "192.0.2.53:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::53]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn http_server_urls() {
        let u: ServerUrl = "https://vpn.example.com/tun/nel".parse().unwrap();
        assert_eq!(
            u,
            ServerUrl::Http(HttpUrl {
                tls: true,
                host: "vpn.example.com".into(),
                port: 443,
                path: "/tun/nel".into()
            })
        );
        assert_eq!(u.to_string(), "https://vpn.example.com:443/tun/nel");
        let u: ServerUrl = "http://[2001:db8::1]:8080".parse().unwrap();
        assert_eq!(u.to_string(), "http://[2001:db8::1]:8080/");
        for bad in [
            "https://u:p@host/x",
            "https://host/x?y=1",
            "https://:80/x",
            "http://h:99999/",
        ] {
            assert!(bad.parse::<ServerUrl>().is_err(), "{bad}");
        }
    }
}

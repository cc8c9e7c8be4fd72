//! Transport URLs: `udp://HOST:PORT` and `icmp://HOST`; `dns://` and
//! `https://` are recognised so users get a clear "not yet" rather than a
//! parse error.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use anyhow::{Context as _, bail};
use iptun_proto::wire::icmp::Family;

/// The default UDP port (the seed's).
pub const DEFAULT_UDP_PORT: u16 = 3000;

const SUPPORTED: &str = "supported: udp://, icmp://";

/// Where a server listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    /// UDP on this address.
    Udp(SocketAddr),
    /// ICMP echo requests of this family (on all addresses).
    Icmp(Family),
}

/// Where a client finds its server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerUrl {
    /// UDP to this host and port.
    Udp { host: String, port: u16 },
    /// ICMP echo to this host (an IPv6 address selects ICMPv6).
    Icmp { host: String },
}

/// A server URL resolved to an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerAddr {
    /// UDP to this socket address.
    Udp(SocketAddr),
    /// ICMP echo to this address.
    Icmp(IpAddr),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Udp,
    Icmp,
}

fn split(url: &str) -> anyhow::Result<(Scheme, &str)> {
    let Some((scheme, rest)) = url.split_once("://") else {
        bail!("`{url}` is not a URL: expected e.g. udp://HOST:PORT or icmp://HOST");
    };
    let rest = rest.trim_end_matches('/');
    match scheme {
        "udp" => Ok((Scheme::Udp, rest)),
        "icmp" => Ok((Scheme::Icmp, rest)),
        "dns" | "http" | "https" | "ws" | "wss" => {
            bail!("`{url}`: the {scheme} transport is not available in this version ({SUPPORTED})")
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

impl std::str::FromStr for Listen {
    type Err = anyhow::Error;

    fn from_str(url: &str) -> anyhow::Result<Self> {
        let (scheme, rest) = split(url)?;
        let (host, port) = host_port(rest, url)?;
        let ip: IpAddr = host
            .parse()
            .with_context(|| format!("`{url}`: listen on an IP address, not `{host}`"))?;
        match scheme {
            Scheme::Udp => Ok(Self::Udp(SocketAddr::new(ip, udp_port(port, url)?))),
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
        let (host, port) = host_port(rest, url)?;
        match scheme {
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
    pub fn resolve(&self) -> anyhow::Result<ServerAddr> {
        let (host, port) = match self {
            Self::Udp { host, port } => (host, *port),
            Self::Icmp { host } => (host, 0),
        };
        let addr = (host.as_str(), port)
            .to_socket_addrs()
            .with_context(|| format!("resolving server {host}"))?
            .next()
            .with_context(|| format!("server {host} has no address"))?;
        Ok(match self {
            Self::Udp { .. } => ServerAddr::Udp(addr),
            Self::Icmp { .. } => ServerAddr::Icmp(addr.ip()),
        })
    }
}

impl std::fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (scheme, host) = match self {
            Self::Udp { host, .. } => ("udp", host),
            Self::Icmp { host } => ("icmp", host),
        };
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        match self {
            Self::Udp { port, .. } => write!(f, "{scheme}://{host}:{port}"),
            Self::Icmp { .. } => write!(f, "{scheme}://{host}"),
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
        assert!(
            "dns://0.0.0.0"
                .parse::<Listen>()
                .unwrap_err()
                .to_string()
                .contains("not available")
        );
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
}

//! Transport URLs: `udp://HOST:PORT` today; `dns://`, `icmp://` and
//! `https://` are recognised so users get a clear "not yet" rather than a
//! parse error.

use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::{Context as _, bail};

/// The default UDP port (the seed's).
pub const DEFAULT_UDP_PORT: u16 = 3000;

/// Where a server listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    /// UDP on this address.
    Udp(SocketAddr),
}

/// Where a client finds its server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerUrl {
    /// UDP to this host and port.
    Udp { host: String, port: u16 },
}

fn split(url: &str) -> anyhow::Result<(&str, &str)> {
    let Some((scheme, rest)) = url.split_once("://") else {
        bail!("`{url}` is not a URL: expected e.g. udp://HOST:PORT");
    };
    match scheme {
        "udp" => Ok((scheme, rest.trim_end_matches('/'))),
        "dns" | "icmp" | "http" | "https" | "ws" | "wss" => {
            bail!(
                "`{url}`: the {scheme} transport is not available in this version (supported: udp://)"
            )
        }
        _ => bail!("`{url}`: unknown transport `{scheme}` (supported: udp://)"),
    }
}

/// Split `host:port` or `[v6]:port` (port optional).
fn host_port(rest: &str, url: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .with_context(|| format!("`{url}`: missing `]`"))?;
        (host, after.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        bail!("`{url}`: missing host");
    }
    let port = match port {
        Some(p) => p
            .parse()
            .with_context(|| format!("`{url}`: bad port `{p}`"))?,
        None => DEFAULT_UDP_PORT,
    };
    Ok((host.to_owned(), port))
}

impl std::str::FromStr for Listen {
    type Err = anyhow::Error;

    fn from_str(url: &str) -> anyhow::Result<Self> {
        let (_, rest) = split(url)?;
        let (host, port) = host_port(rest, url)?;
        let ip = host
            .parse()
            .with_context(|| format!("`{url}`: listen on an IP address, not `{host}`"))?;
        Ok(Self::Udp(SocketAddr::new(ip, port)))
    }
}

impl std::str::FromStr for ServerUrl {
    type Err = anyhow::Error;

    fn from_str(url: &str) -> anyhow::Result<Self> {
        let (_, rest) = split(url)?;
        let (host, port) = host_port(rest, url)?;
        Ok(Self::Udp { host, port })
    }
}

impl ServerUrl {
    /// Resolve to a socket address (the first the resolver gives).
    pub fn resolve(&self) -> anyhow::Result<SocketAddr> {
        let Self::Udp { host, port } = self;
        (host.as_str(), *port)
            .to_socket_addrs()
            .with_context(|| format!("resolving server {host}"))?
            .next()
            .with_context(|| format!("server {host} has no address"))
    }
}

impl std::fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self::Udp { host, port } = self;
        if host.contains(':') {
            write!(f, "udp://[{host}]:{port}")
        } else {
            write!(f, "udp://{host}:{port}")
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
        assert_eq!(u.resolve().unwrap(), "192.0.2.1:3000".parse().unwrap());
        let u: ServerUrl = "udp://[2001:db8::1]:4000/".parse().unwrap();
        assert_eq!(u.resolve().unwrap(), "[2001:db8::1]:4000".parse().unwrap());
        assert_eq!(u.to_string(), "udp://[2001:db8::1]:4000");
        assert!("udp://:3000".parse::<ServerUrl>().is_err());
    }
}

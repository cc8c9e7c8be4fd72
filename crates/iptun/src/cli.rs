//! Command line and config file. Every flag of `server` and `client` can also
//! be given in a TOML file (`--config FILE`, keys named like the flags);
//! flags override the file.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

/// An encrypted IP tunnel over UDP, ICMP echo, DNS or HTTP(S).
///
/// The server admits clients by public key, gives each a stable tunnel
/// address from its pool and forwards their IP packets (routing or NAT); the
/// client gets a TUN device configured from the server.
///
/// Quick start:
///   iptun genkey > server.key; iptun pubkey < server.key      (on the server)
///   iptun genkey > client.key; iptun pubkey < client.key      (on the client)
///   iptun server --private-key server.key --allow CLIENT_PUB --nat
///   iptun client --private-key client.key --server-key SERVER_PUB --server udp://HOST:3000 --route default
///
/// Transports (server --listen / client --server):
///   udp://ADDR:PORT   /  udp://HOST:PORT       the fast path (port 3000 by default)
///   icmp://0.0.0.0 or icmp://[::]  /  icmp://HOST   echo requests and replies
///   dns://ADDR:53?domain=D  /  dns://D[?resolver=R]   through resolvers (R: IP[:PORT],
///                           tls://HOST[:853] or https://HOST[:443]/PATH; repeatable)
///   https://ADDR:443/PATH  /  https://HOST/PATH   WebSocket or long-poll, via proxies
///   http://ADDR:80/PATH    /  http://HOST/PATH    behind a TLS-terminating reverse proxy
#[derive(Debug, Parser)]
#[command(name = "iptun", version, verbatim_doc_comment)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a new private key (base64).
    Genkey,
    /// Read a private key on stdin and print its public key.
    Pubkey,
    /// Run the server: admit clients, hand out addresses, forward their traffic.
    Server(ServerArgs),
    /// Run a client: connect to a server and bring up a TUN device.
    Client(ClientArgs),
    /// Show the sessions of running iptun daemons on this host.
    Status(StatusArgs),
    /// Make a running server re-read its --allow-file (as SIGHUP does):
    /// new keys are admitted, removed keys lose their session, the others
    /// are untouched. A file with an error changes nothing; the error is
    /// printed and the exit status is 1.
    Reload(ReloadArgs),
    /// What gets through from here? For each --server URL: whether a
    /// handshake completes, the round-trip time and a short throughput
    /// figure each way. No TUN device, no routes. Exits 0 if any URL works.
    ///
    /// Each URL gets a session of its own under the client's key: a client
    /// running with the same key loses its session meanwhile (use another
    /// key the server admits, or stop the client).
    Probe(ProbeArgs),
    /// Print a shell completion script: bash, zsh, fish, elvish or powershell
    /// (e.g. `iptun completions bash > /etc/bash_completion.d/iptun`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff; e.g. `iptun man | man -l -`).
    Man,
    /// Run a self-contained demo (as root): throwaway network namespaces with
    /// a server, a client and a target host; shows a ping and a throughput
    /// figure through the tunnel, then removes everything.
    Demo(DemoArgs),
    /// (Used by the demo) accept one TCP connection and count what arrives.
    #[command(hide = true)]
    DemoSink(DemoSinkArgs),
    /// (Used by the demo) send to a sink for some seconds and print the rate.
    #[command(hide = true)]
    DemoSource(DemoSourceArgs),
}

#[derive(Debug, Args)]
pub struct DemoSinkArgs {
    pub listen: std::net::SocketAddr,
}

#[derive(Debug, Args)]
pub struct DemoSourceArgs {
    pub to: std::net::SocketAddr,
    pub seconds: u64,
}

#[derive(Debug, Default, Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerArgs {
    /// File holding the server's private key (from `iptun genkey`).
    #[arg(long, value_name = "FILE")]
    pub private_key: Option<PathBuf>,
    /// Admit the client with this public key (repeatable).
    #[arg(long = "allow", value_name = "PUBKEY")]
    #[serde(default)]
    pub allow: Vec<String>,
    /// Admit the client keys listed in FILE (one per line; `#` comments).
    /// Re-read on SIGHUP and `iptun reload`: keys added are admitted at
    /// once, keys removed lose their session at once.
    #[arg(long, value_name = "FILE")]
    pub allow_file: Option<PathBuf>,
    /// Where to listen (repeatable): udp://ADDR:PORT, icmp://0.0.0.0, icmp://[::],
    /// dns://ADDR[:PORT]?domain=DOMAIN, https://ADDR[:PORT]/PATH,
    /// http://ADDR[:PORT]/PATH (behind a TLS-terminating reverse proxy)
    /// [default: udp://0.0.0.0:3000].
    #[arg(long = "listen", value_name = "URL")]
    #[serde(default)]
    pub listen: Vec<String>,
    /// IPv4 address pool; the server takes its first host address [default: 10.1.0.0/24].
    #[arg(long, value_name = "CIDR")]
    pub pool: Option<String>,
    /// IPv6 address pool, or `none` [default: fd69:7074:756e::/64].
    #[arg(long, value_name = "CIDR")]
    pub pool6: Option<String>,
    /// Name of the TUN device [default: iptun0].
    #[arg(long, value_name = "NAME")]
    pub tun: Option<String>,
    /// Forward and masquerade the pool to the server's other networks (nftables).
    #[arg(long)]
    #[serde(default)]
    pub nat: bool,
    /// TLS certificate chain (PEM) for https:// listeners [default: a
    /// self-signed certificate derived from the private key; its pin is logged].
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for --tls-cert.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// MTU of the tunnel [default: 1420].
    #[arg(long)]
    pub mtu: Option<u16>,
    /// Keepalive interval in seconds announced to clients [default: 10].
    #[arg(long, value_name = "SECS")]
    pub keepalive: Option<u16>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics [default: off].
    /// Only on a loopback address unless --metrics-public is given.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,
    /// Allow --metrics on an address other hosts can reach (the metrics
    /// tell who is connected and how much each one sends).
    #[arg(long)]
    #[serde(default)]
    pub metrics_public: bool,
    /// No per-client series in the metrics (for servers with many clients).
    #[arg(long)]
    #[serde(default)]
    pub metrics_no_clients: bool,
    /// Control socket for `iptun status` and `iptun reload` (`@name`:
    /// abstract socket) [default: @iptun/TUN].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Write the tunnel's inner packets, both ways, to this pcapng file
    /// (tcpdump -r, Wireshark); off by default.
    #[arg(long, value_name = "FILE")]
    pub pcap: Option<PathBuf>,
    /// Stop the capture when the file reaches this many megabytes [default: 100].
    #[arg(long, value_name = "MB")]
    pub pcap_limit: Option<u64>,
    /// Don't use TUN offloads (TSO/GRO); slower, for old kernels.
    #[arg(long)]
    #[serde(default)]
    pub no_offload: bool,
    /// Threads carrying the traffic of udp:// listeners, each with its own
    /// queue of the TUN device and its own socket on each listener's port;
    /// clients spread over them (the other transports stay with the first)
    /// [default: one per core, at most 8, when every listener is udp://;
    /// otherwise, and with --pcap, 1].
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Read settings from this TOML file (keys named like the flags).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Default, Args, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClientArgs {
    /// File holding the client's private key (from `iptun genkey`).
    #[arg(long, value_name = "FILE")]
    pub private_key: Option<PathBuf>,
    /// The server's public key.
    #[arg(long, value_name = "PUBKEY")]
    pub server_key: Option<String>,
    /// The server: udp://HOST[:PORT] (port 3000 if omitted), icmp://HOST,
    /// dns://DOMAIN[?resolver=R] (R: IP[:PORT], DNS over TLS tls://HOST[:853],
    /// DNS over HTTPS https://HOST[:443]/PATH; repeatable, all used at once;
    /// /etc/resolv.conf's if none; &max-query=N caps query names at N characters),
    /// https://HOST[:PORT]/PATH or http://HOST[:PORT]/PATH. Repeat it to give
    /// several ways to the same server, most preferred first: the client
    /// uses the first that works, moves the session to the next when it
    /// stops working, and back when it works again.
    #[arg(long = "server", value_name = "URL")]
    #[serde(default, deserialize_with = "one_or_many")]
    pub server: Vec<String>,
    /// https:// (and DoT/DoH resolvers): accept exactly the certificate with
    /// this fingerprint (sha256:HEX, as the server logs it) instead of
    /// checking it against CAs.
    #[arg(long, value_name = "sha256:HEX", conflicts_with = "tls_ca")]
    pub tls_pin: Option<String>,
    /// https:// (and DoT/DoH resolvers): trust the CA certificates in this
    /// PEM file instead of the system's.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// http(s):// (and DoH resolvers): go through this HTTP proxy (CONNECT
    /// for https://), or `none` [default: $HTTPS_PROXY / $HTTP_PROXY, minus
    /// $NO_PROXY].
    #[arg(long, value_name = "http://[USER:PASS@]HOST:PORT")]
    pub proxy: Option<String>,
    /// http(s)://: WebSocket, long-poll, or WebSocket falling back to
    /// long-poll when a middlebox refuses the upgrade.
    #[arg(long, value_enum, value_name = "MODE")]
    pub http_mode: Option<crate::transport::http_client::Mode>,
    /// Route CIDR through the tunnel (repeatable); `default` routes everything
    /// but the server itself.
    #[arg(long = "route", value_name = "CIDR|default")]
    #[serde(default)]
    pub route: Vec<String>,
    /// Name of the TUN device [default: iptun0].
    #[arg(long, value_name = "NAME")]
    pub tun: Option<String>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics [default: off].
    /// Only on a loopback address unless --metrics-public is given.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,
    /// Allow --metrics on an address other hosts can reach (the metrics
    /// tell who is connected and how much each one sends).
    #[arg(long)]
    #[serde(default)]
    pub metrics_public: bool,
    /// Control socket for `iptun status` (`@name`: abstract socket) [default: @iptun/TUN].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Write the tunnel's inner packets, both ways, to this pcapng file
    /// (tcpdump -r, Wireshark); off by default.
    #[arg(long, value_name = "FILE")]
    pub pcap: Option<PathBuf>,
    /// Stop the capture when the file reaches this many megabytes [default: 100].
    #[arg(long, value_name = "MB")]
    pub pcap_limit: Option<u64>,
    /// Don't use TUN offloads (TSO/GRO); slower, for old kernels.
    #[arg(long)]
    #[serde(default)]
    pub no_offload: bool,
    /// Threads reading and sending the traffic into the tunnel, each with
    /// its own queue of the TUN device; flows spread over them by hash.
    /// They send on udp:// paths only (on the others the first thread
    /// sends), and traffic from the server stays with the first [default:
    /// 1; more helps several streams up on a machine with cores to spare].
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Read settings from this TOML file (keys named like the flags).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// The client's flags (and config file) for the server and its URLs;
    /// the TUN device, routes and control socket do not apply.
    #[command(flatten)]
    pub client: ClientArgs,
    /// Seconds of each throughput measurement (one each way, per URL).
    #[arg(long, default_value_t = 2, value_name = "SECS")]
    pub seconds: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Ask only this control socket [default: every iptun daemon in this network namespace].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// The server's control socket [default: the one iptun daemon in this
    /// network namespace].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Seconds of the throughput test (one TCP stream through the tunnel).
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
}

/// A string or a list of strings (`server = "udp://h"` or `server = ["udp://h", "icmp://h"]`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// Read a TOML config file into `T`; errors name the file and the key.
pub fn load_config<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
}

impl ServerArgs {
    /// Apply the config file, if any, under the flags.
    pub fn merged(self) -> anyhow::Result<Self> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let file: Self = load_config(&path)?;
        Ok(Self {
            private_key: self.private_key.or(file.private_key),
            allow: if self.allow.is_empty() {
                file.allow
            } else {
                self.allow
            },
            allow_file: self.allow_file.or(file.allow_file),
            listen: if self.listen.is_empty() {
                file.listen
            } else {
                self.listen
            },
            pool: self.pool.or(file.pool),
            pool6: self.pool6.or(file.pool6),
            tun: self.tun.or(file.tun),
            nat: self.nat || file.nat,
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            mtu: self.mtu.or(file.mtu),
            keepalive: self.keepalive.or(file.keepalive),
            metrics: self.metrics.or(file.metrics),
            metrics_public: self.metrics_public || file.metrics_public,
            metrics_no_clients: self.metrics_no_clients || file.metrics_no_clients,
            control: self.control.or(file.control),
            pcap: self.pcap.or(file.pcap),
            pcap_limit: self.pcap_limit.or(file.pcap_limit),
            no_offload: self.no_offload || file.no_offload,
            workers: self.workers.or(file.workers),
            config: Some(path),
        })
    }
}

impl ClientArgs {
    /// Apply the config file, if any, under the flags.
    pub fn merged(self) -> anyhow::Result<Self> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let file: Self = load_config(&path)?;
        Ok(Self {
            private_key: self.private_key.or(file.private_key),
            server_key: self.server_key.or(file.server_key),
            server: if self.server.is_empty() {
                file.server
            } else {
                self.server
            },
            tls_pin: self.tls_pin.or(file.tls_pin),
            tls_ca: self.tls_ca.or(file.tls_ca),
            proxy: self.proxy.or(file.proxy),
            http_mode: self.http_mode.or(file.http_mode),
            route: if self.route.is_empty() {
                file.route
            } else {
                self.route
            },
            tun: self.tun.or(file.tun),
            metrics: self.metrics.or(file.metrics),
            metrics_public: self.metrics_public || file.metrics_public,
            control: self.control.or(file.control),
            pcap: self.pcap.or(file.pcap),
            pcap_limit: self.pcap_limit.or(file.pcap_limit),
            no_offload: self.no_offload || file.no_offload,
            workers: self.workers.or(file.workers),
            config: Some(path),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile_path::TempPath {
        tempfile_path::TempPath::new(text)
    }

    // A tiny temp-file helper, enough for these tests.
    mod tempfile_path {
        pub struct TempPath(pub std::path::PathBuf);
        impl TempPath {
            pub fn new(text: &str) -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir()
                    .join(format!("iptun-cli-test-{}-{n}.toml", std::process::id()));
                std::fs::write(&p, text).unwrap();
                Self(p)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn flags_override_file() {
        let f = write("tun = \"fromfile\"\nmtu = 1300\nallow = [\"a\", \"b\"]\nnat = true\n");
        let args = ServerArgs {
            tun: Some("flag".into()),
            config: Some(f.0.clone()),
            ..Default::default()
        };
        let m = args.merged().unwrap();
        assert_eq!(m.tun.as_deref(), Some("flag"));
        assert_eq!(m.mtu, Some(1300));
        assert_eq!(m.allow, ["a", "b"]);
        assert!(m.nat);
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let f = write("tun = \"x\"\nmtuu = 1300\n");
        let err = ServerArgs {
            config: Some(f.0.clone()),
            ..Default::default()
        }
        .merged()
        .unwrap_err()
        .to_string();
        assert!(err.contains("mtuu"), "{err}");
        assert!(err.contains(&f.0.display().to_string()), "{err}");
    }

    #[test]
    fn bad_value_names_key() {
        let f = write("mtu = \"big\"\n");
        let err = ServerArgs {
            config: Some(f.0.clone()),
            ..Default::default()
        }
        .merged()
        .unwrap_err()
        .to_string();
        assert!(err.contains("mtu"), "{err}");
    }

    #[test]
    fn client_file() {
        let f = write("server = \"udp://192.0.2.1:3000\"\nroute = [\"default\"]\n");
        let m = ClientArgs {
            config: Some(f.0.clone()),
            ..Default::default()
        }
        .merged()
        .unwrap();
        assert_eq!(m.server, ["udp://192.0.2.1:3000"]);
        assert_eq!(m.route, ["default"]);
        let f = write("server = [\"udp://h:3000\", \"icmp://h\", \"dns://t.example.com\"]\n");
        let m = ClientArgs {
            config: Some(f.0.clone()),
            ..Default::default()
        }
        .merged()
        .unwrap();
        assert_eq!(
            m.server,
            ["udp://h:3000", "icmp://h", "dns://t.example.com"]
        );
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

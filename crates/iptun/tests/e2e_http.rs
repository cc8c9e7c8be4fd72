//! End-to-end tests of the HTTP(S) / WebSocket transport: the real `iptun`
//! binary as server and client in network namespaces, with real middleboxes
//! between them (`common::http::HttpTopology`: client — middle — server —
//! target): straight to the server over HTTPS with its pinned self-signed
//! certificate, behind nginx terminating TLS, through squid and tinyproxy
//! (basic auth, CONNECT for https://, absolute-form requests for http://,
//! where they drop WebSocket upgrades so the client must long-poll), after a
//! killed TCP connection, and the refusals (other paths, unknown keys, a
//! wrong proxy password).
//!
//! Every case pings the target behind the server (`--nat`) and moves 20 MiB
//! each way checked by sha256, all time-bounded. Every daemon gets its own
//! control socket and every test its own key directory; guards remove both,
//! the namespaces and the processes even when a test fails. The proxy
//! variables of the test's own environment are cleared for every client
//! (`clean_env`), so a CI runner's proxy can't leak in.

mod common;

use std::time::{Duration, Instant};

use serde_json::Value;

use common::http::*;
use common::*;

/// The network behind the server (server side and target).
const TARGET_NET: &str = "198.51.100.0/24";
/// The size of each transfer (each way).
const TRANSFER: u64 = 20 << 20;
/// A bound for each transfer.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------- helpers

/// A running `iptun server` or `iptun client` with its own control socket.
struct Daemon {
    process: Proc,
    _control: RemoveOnDrop,
    control: String,
}

impl Daemon {
    /// `env -u <proxy vars> VARS... iptun ARGS --control SOCKET` in `ns`.
    fn spawn(ns: &Netns, tag: &str, role: &str, env: &[(&str, &str)], args: &[&str]) -> Self {
        let control = control_path(tag, role).display().to_string();
        let mut all = clean_env(env);
        all.push(iptun_bin().to_string());
        all.extend(args.iter().map(|a| a.to_string()));
        all.extend(["--control".to_string(), control.clone()]);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        Self {
            process: ns.spawn(&refs),
            _control: RemoveOnDrop(control.clone().into()),
            control,
        }
    }

    fn log(&self) -> String {
        self.process.log()
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.process.try_wait() {
            panic!(
                "iptun exited unexpectedly with {status}; log:\n{}",
                self.process.log()
            );
        }
    }

    /// SIGTERM, and waits (bounded) for the exit.
    fn stop(&mut self) {
        self.process.stop(Duration::from_secs(10));
    }

    /// The daemon's entry of `iptun status --json`, if it answers.
    fn status(&self) -> Option<Value> {
        let out = std::process::Command::new("timeout")
            .arg("5")
            .arg(iptun_bin())
            .args(["status", "--json", "--control", &self.control])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run iptun status");
        if !out.status.success() {
            return None;
        }
        let all: Value = serde_json::from_slice(&out.stdout).ok()?;
        all.as_array()?.first().cloned()
    }

    fn status_ok(&mut self) -> Value {
        self.assert_running();
        self.status()
            .unwrap_or_else(|| panic!("no status; log:\n{}", self.process.log()))
    }

    fn wait_up(&mut self) {
        wait_until(Duration::from_secs(10), "the daemon to answer", || {
            self.assert_running();
            self.status().is_some()
        });
    }

    /// The client's first tunnel address, if it has one.
    fn tunnel_address(&self) -> Option<String> {
        self.status().and_then(|s| {
            s["addresses"]
                .as_array()?
                .first()?
                .as_str()
                .map(str::to_string)
        })
    }

    /// Waits until a client has its tunnel address (and routes); returns it.
    fn wait_tunnel_address(&mut self) -> String {
        let mut addr = None;
        wait_until(
            Duration::from_secs(30),
            "the client's tunnel address",
            || {
                self.assert_running();
                addr = self.tunnel_address();
                addr.is_some()
            },
        );
        addr.expect("checked")
    }

    /// The client's session (transport, endpoint, path...).
    fn session(&mut self) -> Value {
        let st = self.status_ok();
        let session = st["sessions"][0].clone();
        assert!(session.is_object(), "no session: {st:#}");
        session
    }
}

/// The server's certificate pin: from its log line `TLS certificate pin:
/// sha256:HEX` (waited for, bounded), checked against the `endpoints`
/// entry of its status.
fn server_pin(server: &mut Daemon) -> String {
    let mut pin = None;
    wait_until(
        Duration::from_secs(10),
        "the server's TLS pin in its log",
        || {
            server.assert_running();
            pin = tls_pin_from_log(&server.log());
            pin.is_some()
        },
    );
    let pin = pin.expect("checked");
    let st = server.status_ok();
    let endpoints = st["endpoints"].to_string();
    assert!(
        endpoints.contains(&pin),
        "the status's endpoints lack the logged pin {pin}: {st:#}"
    );
    pin
}

/// `iptun server` in the server namespace, `--nat`, allowing `allow`,
/// listening on every URL of `listen`.
fn start_server(
    topo: &HttpTopology,
    tag: &str,
    key: &Key,
    allow: &[&Key],
    listen: &[&str],
    extra: &[&str],
) -> Daemon {
    let mut args = vec!["server", "--private-key", key.path(), "--nat"];
    for k in allow {
        args.extend(["--allow", k.public.as_str()]);
    }
    for l in listen {
        args.extend(["--listen", l]);
    }
    args.extend_from_slice(extra);
    let mut server = Daemon::spawn(&topo.server, tag, "server", &[], &args);
    server.wait_up();
    server
}

/// `iptun client` in the client namespace for `url`, routing the target's
/// network through the tunnel; `extra` flags, `env` variables.
#[allow(clippy::too_many_arguments)]
fn start_client(
    topo: &HttpTopology,
    tag: &str,
    role: &str,
    key: &Key,
    server_key: &Key,
    url: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Daemon {
    let mut args = vec![
        "client",
        "--private-key",
        key.path(),
        "--server-key",
        server_key.public.as_str(),
        "--server",
        url,
        "--route",
        TARGET_NET,
    ];
    args.extend_from_slice(extra);
    Daemon::spawn(&topo.client, tag, role, env, &args)
}

/// Waits for the client's tunnel, then: a ping to the target, 20 MiB up and
/// 20 MiB down checked by sha256 (timed, printed). Returns the client's
/// session status at the end (transport, path: mode, reconnects...).
fn tunnel_works(
    topo: &HttpTopology,
    client: &mut Daemon,
    server: &mut Daemon,
    what: &str,
) -> Value {
    let started = Instant::now();
    let addr = client.wait_tunnel_address();
    eprintln!(
        "{what}: tunnel address {addr} after {:.2?}",
        started.elapsed()
    );
    wait_until(Duration::from_secs(20), "a ping through the tunnel", || {
        ping(&topo.client, TARGET_ADDR, 1)
    });
    transfer_both_ways(
        &topo.client,
        &topo.target,
        TARGET_ADDR,
        TRANSFER,
        TRANSFER_TIMEOUT,
        what,
    );
    client.assert_running();
    server.assert_running();
    let session = client.session();
    eprintln!("{what}: client session {session:#}");
    assert_eq!(
        client.tunnel_address().as_deref(),
        Some(addr.as_str()),
        "the tunnel address changed during the transfers"
    );
    session
}

fn assert_transport_mode(session: &Value, transport: &str, mode: &str) {
    assert_eq!(session["transport"], transport, "{session:#}");
    assert_eq!(session["path"]["mode"], mode, "{session:#}");
}

/// The session went through the proxy at `listen` (its status names it) and
/// the status doesn't show the proxy's password.
fn assert_proxied(session: &Value, listen: std::net::SocketAddr) {
    let proxy = session["path"]["proxy"].to_string();
    assert!(proxy.contains(&listen.to_string()), "{session:#}");
    assert!(!session.to_string().contains(PROXY_PASS), "{session:#}");
}

// ---------------------------------------------------------------- tests

/// (a) Straight to the server over HTTPS, its self-signed certificate
/// pinned with the pin it logged.
#[test]
fn https_direct_with_pinned_certificate() {
    require_root();
    let tag = "htdirect";
    let topo = HttpTopology::new(tag, true);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let url = topo.server_https_url();
    let mut server = start_server(&topo, tag, &skey, &[&ckey], &[&url], &[]);
    let pin = server_pin(&mut server);
    let mut client = start_client(
        &topo,
        tag,
        "client",
        &ckey,
        &skey,
        &url,
        &["--tls-pin", &pin],
        &[],
    );
    let session = tunnel_works(&topo, &mut client, &mut server, "HTTPS direct");
    assert_transport_mode(&session, "https", "websocket");
}

/// (a') The server with its own certificate and key (PEM files); the
/// client checks it against a CA file and the server's IP address.
#[test]
fn https_with_certificate_files_and_ca() {
    require_root();
    let tag = "htcafile";
    let topo = HttpTopology::new(tag, true);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let pki = TestPki::generate(addrs::SERVER_ADDR);
    let url = topo.server_https_url();
    let (cert, key, ca) = (
        pki.cert_pem.display().to_string(),
        pki.key_pem.display().to_string(),
        pki.ca_pem.display().to_string(),
    );
    let mut server = start_server(
        &topo,
        tag,
        &skey,
        &[&ckey],
        &[&url],
        &["--tls-cert", &cert, "--tls-key", &key],
    );
    let mut client = start_client(
        &topo,
        tag,
        "client",
        &ckey,
        &skey,
        &url,
        &["--tls-ca", &ca],
        &[],
    );
    let session = tunnel_works(&topo, &mut client, &mut server, "HTTPS with a CA file");
    assert_transport_mode(&session, "https", "websocket");
}

/// (a') A client pinning another certificate gets no tunnel (and says why).
#[test]
fn https_wrong_pin_gets_no_tunnel() {
    require_root();
    let tag = "htbadpin";
    let topo = HttpTopology::new(tag, true);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let url = topo.server_https_url();
    let mut server = start_server(&topo, tag, &skey, &[&ckey], &[&url], &[]);
    let pin = server_pin(&mut server);
    let wrong = format!("sha256:{}", "ab".repeat(32));
    assert_ne!(pin, wrong);
    let client = start_client(
        &topo,
        tag,
        "client",
        &ckey,
        &skey,
        &url,
        &["--tls-pin", &wrong],
        &[],
    );
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(client.tunnel_address(), None, "{}", client.log());
    let log = client.log().to_lowercase();
    assert!(
        log.contains("pin") || log.contains("certificate"),
        "the client's log doesn't say the certificate didn't match:\n{log}"
    );
    assert!(!ping(&topo.client, TARGET_ADDR, 1));
}

/// (b) Behind nginx terminating TLS (the test CA's certificate; the client
/// trusts that CA only), the server listening on plain http://.
#[test]
fn https_behind_nginx_reverse_proxy() {
    require_root();
    let tag = "htnginx";
    let topo = HttpTopology::new(tag, false);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let mut server = start_server(&topo, tag, &skey, &[&ckey], &[&topo.server_http_url()], &[]);
    let nginx = topo.start_nginx(true);
    let url = nginx.url(TUNNEL_PATH);
    let mut client = start_client(
        &topo,
        tag,
        "client",
        &ckey,
        &skey,
        &url,
        &["--tls-ca", nginx.ca()],
        &[],
    );
    let session = tunnel_works(&topo, &mut client, &mut server, "HTTPS behind nginx");
    assert_transport_mode(&session, "https", "websocket");
    // nginx logs the upgraded request when it ends.
    client.stop();
    wait_until(
        Duration::from_secs(10),
        "nginx to log the WebSocket upgrade",
        || {
            let access = nginx.access_log();
            access.contains(&format!("\"GET {TUNNEL_PATH} ")) && access.contains("\" 101 ")
        },
    );
}

/// (c) Through squid with basic auth (`--proxy http://user:pass@...`):
/// CONNECT to the server's https:// listener, WebSocket inside.
#[test]
fn https_through_squid_with_basic_auth() {
    require_root();
    let tag = "htsquid";
    let topo = HttpTopology::new(tag, false);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let url = topo.server_https_url();
    let mut server = start_server(&topo, tag, &skey, &[&ckey], &[&url], &[]);
    let pin = server_pin(&mut server);
    let squid = topo.start_squid();
    let proxy = squid.url();
    let mut client = start_client(
        &topo,
        tag,
        "client",
        &ckey,
        &skey,
        &url,
        &["--tls-pin", &pin, "--proxy", &proxy],
        &[],
    );
    let session = tunnel_works(&topo, &mut client, &mut server, "HTTPS through squid");
    assert_transport_mode(&session, "https", "websocket");
    assert_proxied(&session, squid.listen());
    // squid logs a CONNECT when the tunnel closes.
    client.stop();
    let connect = format!("CONNECT {}:{HTTPS_PORT} {PROXY_USER}", addrs::SERVER_ADDR);
    wait_until(
        Duration::from_secs(10),
        "squid to log the authenticated CONNECT",
        || squid.access_log().contains(&connect),
    );
}

/// (c') The proxy from `HTTPS_PROXY` (tinyproxy, basic auth), no `--proxy`.
#[test]
fn https_proxy_from_environment() {
    require_root();
    let tag = "htenv";
    let topo = HttpTopology::new(tag, false);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let url = topo.server_https_url();
    let mut server = start_server(&topo, tag, &skey, &[&ckey], &[&url], &[]);
    let pin = server_pin(&mut server);
    let tinyproxy = topo.start_tinyproxy();
    let proxy = tinyproxy.url();
    let mut client = start_client(
        &topo,
        tag,
        "client",
        &ckey,
        &skey,
        &url,
        &["--tls-pin", &pin],
        &[("HTTPS_PROXY", &proxy)],
    );
    let session = tunnel_works(
        &topo,
        &mut client,
        &mut server,
        "HTTPS through tinyproxy from HTTPS_PROXY",
    );
    assert_transport_mode(&session, "https", "websocket");
    assert_proxied(&session, tinyproxy.listen());
    let log = tinyproxy.log();
    assert!(
        log.contains("CONNECT") && log.contains(addrs::SERVER_ADDR),
        "tinyproxy logged no CONNECT to the server:\n{log}"
    );
}

/// (c'') A wrong proxy password: no tunnel, and the client's log says the
/// proxy wants authentication (squid answers 407).
#[test]
fn wrong_proxy_password_is_reported() {
    require_root();
    let tag = "htbadpw";
    let topo = HttpTopology::new(tag, false);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let url = topo.server_https_url();
    let mut server = start_server(&topo, tag, &skey, &[&ckey], &[&url], &[]);
    let pin = server_pin(&mut server);
    let squid = topo.start_squid();
    let proxy = squid.url_with(PROXY_USER, "not-the-password");
    let client = start_client(
        &topo,
        tag,
        "client",
        &ckey,
        &skey,
        &url,
        &["--tls-pin", &pin, "--proxy", &proxy],
        &[],
    );
    wait_until(
        Duration::from_secs(20),
        "the client to report the proxy's 407",
        || {
            let log = client.log().to_lowercase();
            log.contains("407") || log.contains("proxy authentication")
        },
    );
    let log = client.log();
    assert!(
        log.contains("407") && log.to_lowercase().contains("proxy"),
        "the client's error should name the proxy and its 407:\n{log}"
    );
    assert!(
        !log.contains("not-the-password"),
        "the client logged the proxy password:\n{log}"
    );
    assert_eq!(client.tunnel_address(), None);
    assert!(!ping(&topo.client, TARGET_ADDR, 1));
    assert!(
        squid.access_log().contains("TCP_DENIED/407"),
        "{}",
        squid.access_log()
    );
}

/// (d) Long-poll where WebSocket can't pass: the server's http:// listener
/// reached through a forward proxy that drops `Upgrade` from forwarded
/// requests (default `--http-mode auto` must fall back). Squid is given by
/// `http_proxy` in the environment, tinyproxy by `--proxy`.
fn long_poll_through(tag: &str, use_squid: bool) {
    require_root();
    let topo = HttpTopology::new(tag, false);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let url = topo.server_http_url();
    let mut server = start_server(&topo, tag, &skey, &[&ckey], &[&url], &[]);
    let proxy: Box<dyn ForwardProxy> = if use_squid {
        Box::new(topo.start_squid())
    } else {
        Box::new(topo.start_tinyproxy())
    };
    let what = format!("long-poll through {}", proxy.name());
    let proxy_url = proxy.url();
    let (flags, env): (&[&str], &[(&str, &str)]) = if use_squid {
        (&[], &[("http_proxy", &proxy_url)])
    } else {
        (&["--proxy", &proxy_url], &[])
    };
    let mut client = start_client(&topo, tag, "client", &ckey, &skey, &url, flags, env);
    let session = tunnel_works(&topo, &mut client, &mut server, &what);
    assert_transport_mode(&session, "http", "long-poll");
    assert_proxied(&session, proxy.listen());
    let log = proxy.log();
    assert!(
        log.contains(TUNNEL_PATH),
        "{} logged no request for {TUNNEL_PATH}:\n{log}",
        proxy.name()
    );
}

#[test]
fn long_poll_through_tinyproxy() {
    long_poll_through("htlptiny", false);
}

#[test]
fn long_poll_through_squid() {
    long_poll_through("htlpsquid", true);
}

/// (d') Long-poll behind nginx whose location doesn't pass upgrades.
#[test]
fn long_poll_behind_nginx_without_upgrades() {
    require_root();
    let tag = "htlpnginx";
    let topo = HttpTopology::new(tag, false);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let mut server = start_server(&topo, tag, &skey, &[&ckey], &[&topo.server_http_url()], &[]);
    let nginx = topo.start_nginx(false);
    let mut client = start_client(
        &topo,
        tag,
        "client",
        &ckey,
        &skey,
        &nginx.url(TUNNEL_PATH),
        &["--tls-ca", nginx.ca()],
        &[],
    );
    let session = tunnel_works(
        &topo,
        &mut client,
        &mut server,
        "long-poll behind nginx without upgrades",
    );
    assert_transport_mode(&session, "https", "long-poll");
    let access = nginx.access_log();
    assert!(
        access.contains(&format!("\"POST {TUNNEL_PATH}?c=")),
        "nginx saw no long-poll POST:\n{access}"
    );
}

/// (d'') `--http-mode long-poll` on a path where WebSocket would work.
#[test]
fn long_poll_forced_by_flag() {
    require_root();
    let tag = "htlpflag";
    let topo = HttpTopology::new(tag, true);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let url = topo.server_https_url();
    let mut server = start_server(&topo, tag, &skey, &[&ckey], &[&url], &[]);
    let pin = server_pin(&mut server);
    let mut client = start_client(
        &topo,
        tag,
        "client",
        &ckey,
        &skey,
        &url,
        &["--tls-pin", &pin, "--http-mode", "long-poll"],
        &[],
    );
    let session = tunnel_works(&topo, &mut client, &mut server, "HTTPS long-poll by flag");
    assert_transport_mode(&session, "https", "long-poll");
}

/// (e) The client's TCP connection is reset under it (`ss -K` in its
/// namespace, or an nftables reset where the kernel lacks socket destroy):
/// it reconnects, keeps its tunnel address, counts the reconnect, and the
/// tunnel carries traffic again. Straight to the server, or through squid
/// (then the killed connection is the one to the proxy, carrying CONNECT).
fn killed_connection_recovers(tag: &str, via_squid: bool) {
    require_root();
    let topo = HttpTopology::new(tag, !via_squid);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let url = topo.server_https_url();
    let mut server = start_server(&topo, tag, &skey, &[&ckey], &[&url], &[]);
    let pin = server_pin(&mut server);
    let squid = via_squid.then(|| topo.start_squid());
    let proxy_url = squid.as_ref().map(|s| s.url()).unwrap_or_default();
    let mut flags = vec!["--tls-pin", &pin];
    if via_squid {
        flags.extend(["--proxy", &proxy_url]);
    }
    let mut client = start_client(&topo, tag, "client", &ckey, &skey, &url, &flags, &[]);
    // The connection to kill: the client's to the server, or to the proxy.
    let (dst, dport) = match &squid {
        Some(s) => (addrs::MIDDLE_ADDR, s.listen().port()),
        None => (addrs::SERVER_ADDR, HTTPS_PORT),
    };
    let addr = client.wait_tunnel_address();
    wait_until(Duration::from_secs(20), "a ping through the tunnel", || {
        ping(&topo.client, TARGET_ADDR, 1)
    });
    let before = client.session();
    assert_transport_mode(&before, "https", "websocket");
    let reconnects_before = before["path"]["reconnects"]
        .as_u64()
        .unwrap_or_else(|| panic!("no path.reconnects in the client's session: {before:#}"));

    let (method, ports) = kill_tcp(&topo.client, dst, dport, None, || {
        ping(&topo.client, TARGET_ADDR, 1);
    });
    eprintln!(
        "killed the client's connection(s) to {dst}:{dport} from port(s) {ports:?} with {method:?}"
    );

    wait_until(Duration::from_secs(30), "the client to reconnect", || {
        client.assert_running();
        client.status().is_some_and(|s| {
            s["sessions"][0]["path"]["reconnects"]
                .as_u64()
                .is_some_and(|n| n > reconnects_before)
        })
    });
    wait_until(
        Duration::from_secs(30),
        "a ping after the reconnect",
        || ping(&topo.client, TARGET_ADDR, 1),
    );
    let after = client.session();
    assert!(after["path"]["reconnects"].as_u64() >= Some(1), "{after:#}");
    assert_eq!(
        client.tunnel_address().as_deref(),
        Some(addr.as_str()),
        "a new tunnel address after the reconnect"
    );
    let now = tcp_connections(&topo.client, dst, dport);
    assert!(
        !now.is_empty() && now.iter().all(|p| !ports.contains(p)),
        "the client should be on a new connection: was {ports:?}, now {now:?}"
    );
    let session = tunnel_works(
        &topo,
        &mut client,
        &mut server,
        &format!("{tag}: after a reset"),
    );
    assert_transport_mode(&session, "https", "websocket");
    assert_eq!(
        client.tunnel_address().as_deref(),
        Some(addr.as_str()),
        "a new tunnel address after the reconnect"
    );
}

#[test]
fn killed_connection_recovers_with_the_same_address() {
    killed_connection_recovers("htkill", false);
}

#[test]
fn killed_proxy_connection_recovers_with_the_same_address() {
    killed_connection_recovers("htkillpx", true);
}

/// (f) Other paths on the server's ports get 404 (https:// and http://
/// listeners); a client whose key the server doesn't allow gets no tunnel,
/// while an allowed one does.
#[test]
fn other_paths_404_and_unknown_key_gets_no_tunnel() {
    require_root();
    let tag = "htrefuse";
    let topo = HttpTopology::new(tag, true);
    let dir = TempDir::new(tag);
    let skey = Key::generate(&dir, "server");
    let (ckey, stranger) = (
        Key::generate(&dir, "client"),
        Key::generate(&dir, "stranger"),
    );
    let https_url = topo.server_https_url();
    let http_url = topo.server_http_url();
    let mut server = start_server(&topo, tag, &skey, &[&ckey], &[&https_url, &http_url], &[]);
    let pin = server_pin(&mut server);

    for url in [
        format!("https://{}/other", addrs::SERVER_ADDR),
        format!("https://{}/", addrs::SERVER_ADDR),
        format!("https://{}{TUNNEL_PATH}x", addrs::SERVER_ADDR),
        format!("http://{}:{HTTP_PORT}/other", addrs::SERVER_ADDR),
        format!("http://{}:{HTTP_PORT}/", addrs::SERVER_ADDR),
    ] {
        // -k: the self-signed certificate (pinned elsewhere).
        let r = curl(&topo.client, &["-k"], &url);
        assert_eq!(r.status, 404, "{url}: {r:?}\n{}", server.log());
    }

    // The stranger, on its own device: nothing, for several retries.
    let stranger_client = start_client(
        &topo,
        tag,
        "stranger",
        &stranger,
        &skey,
        &https_url,
        &["--tls-pin", &pin, "--tun", "htstrange0"],
        &[],
    );
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        stranger_client.tunnel_address(),
        None,
        "{}",
        stranger_client.log()
    );
    assert!(
        !ping(&topo.client, TARGET_ADDR, 1),
        "the stranger reached the target"
    );
    let st = server.status_ok();
    let sessions = st["sessions"].as_array().cloned().unwrap_or_default();
    assert!(
        sessions
            .iter()
            .all(|s| s["key"] != stranger.public.as_str()),
        "{st:#}"
    );
    drop(stranger_client);

    let mut client = start_client(
        &topo,
        tag,
        "client",
        &ckey,
        &skey,
        &https_url,
        &["--tls-pin", &pin],
        &[],
    );
    let session = tunnel_works(&topo, &mut client, &mut server, "HTTPS next to a stranger");
    assert_transport_mode(&session, "https", "websocket");
}

/// `NO_PROXY` naming the server wins over `HTTPS_PROXY` (which points at a
/// port where nothing listens): the client goes straight to the server.
#[test]
fn no_proxy_bypasses_the_environment_proxy() {
    require_root();
    let tag = "htnoproxy";
    let topo = HttpTopology::new(tag, true);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let url = topo.server_https_url();
    let mut server = start_server(&topo, tag, &skey, &[&ckey], &[&url], &[]);
    let pin = server_pin(&mut server);
    let dead_proxy = format!("http://{}:9", addrs::MIDDLE_ADDR);
    let mut client = start_client(
        &topo,
        tag,
        "client",
        &ckey,
        &skey,
        &url,
        &["--tls-pin", &pin],
        &[
            ("HTTPS_PROXY", &dead_proxy),
            ("NO_PROXY", &format!("example.org,{}", addrs::SERVER_ADDR)),
        ],
    );
    let session = tunnel_works(&topo, &mut client, &mut server, "HTTPS with NO_PROXY");
    assert_transport_mode(&session, "https", "websocket");
    assert!(session["path"]["proxy"].is_null(), "{session:#}");
}

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

use common::daemon::Daemon;
use common::http::*;
use common::*;

/// The network behind the server (server side and target).
const TARGET_NET: &str = "198.51.100.0/24";
/// The size of each transfer (each way).
const TRANSFER: u64 = 20 << 20;
/// A bound for each transfer.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);
/// A bound for a client to get its tunnel address.
const TUNNEL_UP: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- helpers

/// The server's certificate pin: from its log line `TLS certificate pin:
/// sha256:HEX` (waited for, bounded), checked against the `endpoints`
/// entry of its status.
fn server_pin(server: &mut Daemon) -> String {
    let pin = server.wait_for(
        Duration::from_secs(10),
        "the server's TLS pin in its log",
        |server| tls_pin_from_log(&server.log()),
    );
    let st = server.status_ok();
    let endpoints = st["endpoints"].to_string();
    assert!(
        endpoints.contains(&pin),
        "the status's endpoints lack the logged pin {pin}: {st:#}"
    );
    pin
}

/// One test's namespaces, tag and keys (the server's, and the client's it
/// allows), which all its daemons share; so a test reads as what it runs
/// and checks. Panics unless we are root.
struct Case {
    tag: &'static str,
    server_key: Key,
    client_key: Key,
    dir: TempDir,
    topo: HttpTopology,
}

impl Case {
    /// `direct`: whether the client reaches the server without a middlebox
    /// (see [`HttpTopology::new`]).
    fn new(tag: &'static str, direct: bool) -> Self {
        require_root();
        let topo = HttpTopology::new(tag, direct);
        let dir = TempDir::new(tag);
        let (server_key, client_key) =
            (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
        Self {
            tag,
            server_key,
            client_key,
            dir,
            topo,
        }
    }

    /// `iptun server` in the server namespace, `--nat`, allowing the
    /// client's key, listening on every URL of `listen`, without the test's
    /// proxy variables (`clean_env`); waits until it answers.
    fn start_server(&self, listen: &[&str], extra: &[&str]) -> Daemon {
        let mut args = vec![
            "server",
            "--private-key",
            self.server_key.path(),
            "--nat",
            "--allow",
            &self.client_key.public,
        ];
        for l in listen {
            args.extend(["--listen", l]);
        }
        args.extend_from_slice(extra);
        let mut server = Daemon::spawn_wrapped(
            &self.topo.server,
            self.tag,
            "server",
            &clean_env(&[]),
            &args,
        );
        server.wait_up();
        server
    }

    /// The allowed client of `url` (see [`Case::start_client_as`]).
    fn start_client(&self, url: &str, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        self.start_client_as("client", &self.client_key, url, extra, env)
    }

    /// `iptun client` in the client namespace for `url` with `key`,
    /// routing the target's network through the tunnel; `extra` flags,
    /// `env` variables, and none of the test's own proxy variables
    /// (`clean_env`).
    fn start_client_as(
        &self,
        role: &str,
        key: &Key,
        url: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let mut args = vec![
            "client",
            "--private-key",
            key.path(),
            "--server-key",
            &self.server_key.public,
            "--server",
            url,
            "--route",
            TARGET_NET,
        ];
        args.extend_from_slice(extra);
        Daemon::spawn_wrapped(&self.topo.client, self.tag, role, &clean_env(env), &args)
    }

    /// Waits for the client's tunnel, then: a ping to the target, 20 MiB up
    /// and 20 MiB down checked by sha256 (timed, printed). Returns the
    /// client's session status at the end (transport, path: mode,
    /// reconnects...).
    fn tunnel_works(&self, client: &mut Daemon, server: &mut Daemon, what: &str) -> Value {
        let started = Instant::now();
        let addr = client.wait_tunnel_address(TUNNEL_UP);
        eprintln!(
            "{what}: tunnel address {addr} after {:.2?}",
            started.elapsed()
        );
        wait_until(Duration::from_secs(20), "a ping through the tunnel", || {
            ping(&self.topo.client, TARGET_ADDR, 1)
        });
        transfer_both_ways(
            &self.topo.client,
            &self.topo.target,
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
    let case = Case::new("htdirect", true);
    let url = case.topo.server_https_url();
    let mut server = case.start_server(&[&url], &[]);
    let pin = server_pin(&mut server);
    let mut client = case.start_client(&url, &["--tls-pin", &pin], &[]);
    let session = case.tunnel_works(&mut client, &mut server, "HTTPS direct");
    assert_transport_mode(&session, "https", "websocket");
}

/// (a') The server with its own certificate and key (PEM files); the
/// client checks it against a CA file and the server's IP address.
#[test]
fn https_with_certificate_files_and_ca() {
    let case = Case::new("htcafile", true);
    let pki = TestPki::generate(addrs::SERVER_ADDR);
    let url = case.topo.server_https_url();
    let (cert, key, ca) = (
        pki.cert_pem.display().to_string(),
        pki.key_pem.display().to_string(),
        pki.ca_pem.display().to_string(),
    );
    let mut server = case.start_server(&[&url], &["--tls-cert", &cert, "--tls-key", &key]);
    let mut client = case.start_client(&url, &["--tls-ca", &ca], &[]);
    let session = case.tunnel_works(&mut client, &mut server, "HTTPS with a CA file");
    assert_transport_mode(&session, "https", "websocket");
}

/// (a'') A certificate made as many admins make one, `openssl req -x509`
/// (a CA that is its own leaf), trusted the way curl is told to trust it
/// (`SSL_CERT_FILE`): accepted, since the presented certificate is itself in
/// the trust store. Trusting another such certificate instead gets no
/// tunnel and a message naming the pin to give.
#[test]
fn openssl_self_signed_certificate_trusted_by_ssl_cert_file() {
    let case = Case::new("htx509", true);
    let (cert, key) = (case.dir.file("x509.pem"), case.dir.file("x509.key"));
    let (other, other_key) = (case.dir.file("other.pem"), case.dir.file("other.key"));
    for (c, k) in [(&cert, &key), (&other, &other_key)] {
        run_ok(&[
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=host",
            "-addext",
            &format!("subjectAltName=IP:{}", addrs::SERVER_ADDR),
            "-keyout",
            k.to_str().unwrap(),
            "-out",
            c.to_str().unwrap(),
        ]);
    }
    let (cert, key, other) = (
        cert.display().to_string(),
        key.display().to_string(),
        other.display().to_string(),
    );
    let url = case.topo.server_https_url();
    let mut server = case.start_server(&[&url], &["--tls-cert", &cert, "--tls-key", &key]);
    let mut client = case.start_client(&url, &[], &[("SSL_CERT_FILE", &cert)]);
    let session = case.tunnel_works(&mut client, &mut server, "openssl req -x509, SSL_CERT_FILE");
    assert_transport_mode(&session, "https", "websocket");
    client.stop();

    let wrong = case.start_client(&url, &[], &[("SSL_CERT_FILE", &other)]);
    wait_until(Duration::from_secs(15), "the client to say why", || {
        wrong.log().contains("--tls-pin sha256:")
    });
    let log = wrong.log();
    assert!(log.contains("is not trusted"), "{log}");
    assert!(
        !log.contains("OtherError"),
        "a Debug dump instead of a sentence:\n{log}"
    );
    assert_eq!(wrong.tunnel_address(), None);
}

/// (a') A client pinning another certificate gets no tunnel (and says why).
#[test]
fn https_wrong_pin_gets_no_tunnel() {
    let case = Case::new("htbadpin", true);
    let url = case.topo.server_https_url();
    let mut server = case.start_server(&[&url], &[]);
    let pin = server_pin(&mut server);
    let wrong = format!("sha256:{}", "ab".repeat(32));
    assert_ne!(pin, wrong);
    let client = case.start_client(&url, &["--tls-pin", &wrong], &[]);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(client.tunnel_address(), None, "{}", client.log());
    let log = client.log().to_lowercase();
    assert!(
        log.contains("pin") || log.contains("certificate"),
        "the client's log doesn't say the certificate didn't match:\n{log}"
    );
    assert!(!ping(&case.topo.client, TARGET_ADDR, 1));
}

/// (b) Behind nginx terminating TLS (the test CA's certificate; the client
/// trusts that CA only), the server listening on plain http://.
#[test]
fn https_behind_nginx_reverse_proxy() {
    let case = Case::new("htnginx", false);
    let mut server = case.start_server(&[&case.topo.server_http_url()], &[]);
    let nginx = case.topo.start_nginx(true);
    let url = nginx.url(TUNNEL_PATH);
    let mut client = case.start_client(&url, &["--tls-ca", nginx.ca()], &[]);
    let session = case.tunnel_works(&mut client, &mut server, "HTTPS behind nginx");
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
    let case = Case::new("htsquid", false);
    let url = case.topo.server_https_url();
    let mut server = case.start_server(&[&url], &[]);
    let pin = server_pin(&mut server);
    let squid = case.topo.start_squid();
    let proxy = squid.url();
    let mut client = case.start_client(&url, &["--tls-pin", &pin, "--proxy", &proxy], &[]);
    let session = case.tunnel_works(&mut client, &mut server, "HTTPS through squid");
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
    let case = Case::new("htenv", false);
    let url = case.topo.server_https_url();
    let mut server = case.start_server(&[&url], &[]);
    let pin = server_pin(&mut server);
    let tinyproxy = case.topo.start_tinyproxy();
    let proxy = tinyproxy.url();
    let mut client = case.start_client(&url, &["--tls-pin", &pin], &[("HTTPS_PROXY", &proxy)]);
    let session = case.tunnel_works(
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
    let case = Case::new("htbadpw", false);
    let url = case.topo.server_https_url();
    let mut server = case.start_server(&[&url], &[]);
    let pin = server_pin(&mut server);
    let squid = case.topo.start_squid();
    let proxy = squid.url_with(PROXY_USER, "not-the-password");
    let client = case.start_client(&url, &["--tls-pin", &pin, "--proxy", &proxy], &[]);
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
    assert!(!ping(&case.topo.client, TARGET_ADDR, 1));
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
fn long_poll_through(tag: &'static str, use_squid: bool) {
    let case = Case::new(tag, false);
    let url = case.topo.server_http_url();
    let mut server = case.start_server(&[&url], &[]);
    let proxy: Box<dyn ForwardProxy> = if use_squid {
        Box::new(case.topo.start_squid())
    } else {
        Box::new(case.topo.start_tinyproxy())
    };
    let what = format!("long-poll through {}", proxy.name());
    let proxy_url = proxy.url();
    let (flags, env): (&[&str], &[(&str, &str)]) = if use_squid {
        (&[], &[("http_proxy", &proxy_url)])
    } else {
        (&["--proxy", &proxy_url], &[])
    };
    let mut client = case.start_client(&url, flags, env);
    let session = case.tunnel_works(&mut client, &mut server, &what);
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
    let case = Case::new("htlpnginx", false);
    let mut server = case.start_server(&[&case.topo.server_http_url()], &[]);
    let nginx = case.topo.start_nginx(false);
    let mut client = case.start_client(&nginx.url(TUNNEL_PATH), &["--tls-ca", nginx.ca()], &[]);
    let session = case.tunnel_works(
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
    let case = Case::new("htlpflag", true);
    let url = case.topo.server_https_url();
    let mut server = case.start_server(&[&url], &[]);
    let pin = server_pin(&mut server);
    let flags = ["--tls-pin", &pin, "--http-mode", "long-poll"];
    let mut client = case.start_client(&url, &flags, &[]);
    let session = case.tunnel_works(&mut client, &mut server, "HTTPS long-poll by flag");
    assert_transport_mode(&session, "https", "long-poll");
}

/// (e) The client's TCP connection is reset under it (`ss -K` in its
/// namespace, or an nftables reset where the kernel lacks socket destroy):
/// it reconnects, keeps its tunnel address, counts the reconnect, and the
/// tunnel carries traffic again. Straight to the server, or through squid
/// (then the killed connection is the one to the proxy, carrying CONNECT).
fn killed_connection_recovers(tag: &'static str, via_squid: bool) {
    let case = Case::new(tag, !via_squid);
    let topo = &case.topo;
    let url = topo.server_https_url();
    let mut server = case.start_server(&[&url], &[]);
    let pin = server_pin(&mut server);
    let squid = via_squid.then(|| topo.start_squid());
    let proxy_url = squid.as_ref().map(|s| s.url()).unwrap_or_default();
    let mut flags = vec!["--tls-pin", &pin];
    if via_squid {
        flags.extend(["--proxy", &proxy_url]);
    }
    let mut client = case.start_client(&url, &flags, &[]);
    // The connection to kill: the client's to the server, or to the proxy.
    let (dst, dport) = match &squid {
        Some(s) => (addrs::MIDDLE_ADDR, s.listen().port()),
        None => (addrs::SERVER_ADDR, HTTPS_PORT),
    };
    let addr = client.wait_tunnel_address(TUNNEL_UP);
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
    let session = case.tunnel_works(&mut client, &mut server, &format!("{tag}: after a reset"));
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
    let case = Case::new("htrefuse", true);
    let stranger = Key::generate(&case.dir, "stranger");
    let https_url = case.topo.server_https_url();
    let http_url = case.topo.server_http_url();
    let mut server = case.start_server(&[&https_url, &http_url], &[]);
    let pin = server_pin(&mut server);

    for url in [
        format!("https://{}/other", addrs::SERVER_ADDR),
        format!("https://{}/", addrs::SERVER_ADDR),
        format!("https://{}{TUNNEL_PATH}x", addrs::SERVER_ADDR),
        format!("http://{}:{HTTP_PORT}/other", addrs::SERVER_ADDR),
        format!("http://{}:{HTTP_PORT}/", addrs::SERVER_ADDR),
    ] {
        // -k: the self-signed certificate (pinned elsewhere).
        let r = curl(&case.topo.client, &["-k"], &url);
        assert_eq!(r.status, 404, "{url}: {r:?}\n{}", server.log());
    }

    // The stranger, on its own device: nothing, for several retries.
    let stranger_client = case.start_client_as(
        "stranger",
        &stranger,
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
        !ping(&case.topo.client, TARGET_ADDR, 1),
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

    let mut client = case.start_client(&https_url, &["--tls-pin", &pin], &[]);
    let session = case.tunnel_works(&mut client, &mut server, "HTTPS next to a stranger");
    assert_transport_mode(&session, "https", "websocket");
}

/// `NO_PROXY` naming the server wins over `HTTPS_PROXY` (which points at a
/// port where nothing listens): the client goes straight to the server.
#[test]
fn no_proxy_bypasses_the_environment_proxy() {
    let case = Case::new("htnoproxy", true);
    let url = case.topo.server_https_url();
    let mut server = case.start_server(&[&url], &[]);
    let pin = server_pin(&mut server);
    let dead_proxy = format!("http://{}:9", addrs::MIDDLE_ADDR);
    let no_proxy = format!("example.org,{}", addrs::SERVER_ADDR);
    let env = [
        ("HTTPS_PROXY", dead_proxy.as_str()),
        ("NO_PROXY", &no_proxy),
    ];
    let mut client = case.start_client(&url, &["--tls-pin", &pin], &env);
    let session = case.tunnel_works(&mut client, &mut server, "HTTPS with NO_PROXY");
    assert_transport_mode(&session, "https", "websocket");
    assert!(session["path"]["proxy"].is_null(), "{session:#}");
}

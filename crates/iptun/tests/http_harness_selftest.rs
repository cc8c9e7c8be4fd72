//! Checks the HTTP middlebox harness itself (no iptun involved): real nginx,
//! squid and tinyproxy in the middle namespace of `HttpTopology`, a tiny
//! python HTTP server standing in for the iptun server, curl and a python
//! WebSocket-upgrade probe as the client. What each runner must do for
//! `e2e_http.rs` is proved here with real traffic:
//!
//! - nginx terminates TLS with the test CA's certificate, proxies the tunnel
//!   path (POST with a query string, WebSocket upgrade and the upgraded
//!   bytes) and 404s other paths; a location without upgrades hands the
//!   backend a plain GET;
//! - squid and tinyproxy demand basic auth (407 without), CONNECT to the TLS
//!   ports only, forward http:// requests but drop their `Upgrade` header
//!   (so a WebSocket client falls back to long-poll), and carry a WebSocket
//!   through CONNECT untouched;
//! - `kill_tcp` resets a connection both with `ss -K` and with nftables.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::http::*;
use common::*;

fn server_addr(port: u16) -> SocketAddr {
    SocketAddr::new(addrs::SERVER_ADDR.parse().unwrap(), port)
}

#[test]
fn nginx_terminates_tls_and_passes_upgrades_as_configured() {
    require_root();
    let tag = "hnginx";
    let topo = HttpTopology::new(tag, false);
    let backend = Backend::start(&topo.server, topo.server_http_addr(), "/");
    let pki = TestPki::generate(addrs::MIDDLE_ADDR);
    let nginx = Nginx::start(
        &topo.middle,
        pki,
        &NginxOptions {
            listen: SocketAddr::new(addrs::MIDDLE_ADDR.parse().unwrap(), NGINX_PORT),
            upstream: topo.server_http_addr(),
            locations: vec![
                NginxLocation {
                    path: TUNNEL_PATH.to_string(),
                    upgrade: true,
                },
                NginxLocation {
                    path: "/poll-only".to_string(),
                    upgrade: false,
                },
            ],
        },
    );
    let ca = nginx.ca().to_string();
    let url = nginx.url(TUNNEL_PATH);
    assert_eq!(url, "https://192.0.2.1/tunnel");

    // The client can't reach the server itself: nginx is its only way.
    let direct = curl(&topo.client, &[], &topo.server_http_url());
    assert_ne!(direct.exit, 0, "{direct:?}");

    // TLS verified against the test CA (IP SAN), a long-poll-like POST.
    let post = curl(
        &topo.client,
        &["--cacert", &ca, "--data-binary", "0123456789"],
        &format!("{url}?c=0123456789abcdef"),
    );
    assert_eq!(post.status, 200, "{post:?}\n{}", nginx.log());
    assert_eq!(
        post.body, "method=POST target=/tunnel?c=0123456789abcdef upgrade=- body=10\n",
        "{post:?}"
    );
    // Without the CA, curl refuses the certificate (exit 60).
    let untrusted = curl(&topo.client, &[], &url);
    assert_eq!(untrusted.exit, 60, "{untrusted:?}");
    // Other paths: 404 from nginx, the backend never asked.
    let before = backend.requests().len();
    let other = curl(&topo.client, &["--cacert", &ca], &nginx.url("/other"));
    assert_eq!(other.status, 404, "{other:?}");
    assert_eq!(backend.requests().len(), before, "{:?}", backend.requests());

    // WebSocket: upgraded and carrying bytes on the tunnel path...
    let ws = ws_probe(&topo.client, &url, None, Some(&ca));
    assert_eq!(
        ws,
        WsProbe {
            connect: None,
            status: 101,
            echoed: true
        }
    );
    let last = backend.requests().pop().unwrap_or_default();
    assert!(
        last.starts_with("REQ GET /tunnel HTTP/1.1 upgrade=websocket"),
        "{last}"
    );
    // ...and not on a location without upgrades: the backend sees a plain GET.
    let ws = ws_probe(&topo.client, &nginx.url("/poll-only"), None, Some(&ca));
    assert_eq!(ws.status, 200, "{ws:?}");
    let last = backend.requests().pop().unwrap_or_default();
    assert!(
        last.starts_with("REQ GET /poll-only HTTP/1.1 upgrade=-"),
        "{last}"
    );
    eprintln!("nginx access log:\n{}", nginx.access_log());
}

/// The checks both forward proxies pass: auth, CONNECT policy, forwarding,
/// upgrades dropped from forwarded requests, WebSocket through CONNECT.
/// Returns the status for wrong credentials (they differ).
fn forward_proxy_checks(topo: &HttpTopology, proxy: &dyn ForwardProxy) -> u16 {
    let name = proxy.name();
    let plain = Backend::start(&topo.server, topo.server_http_addr(), "/");
    // Stands in for a TLS server: CONNECT carries any bytes.
    let behind_connect = Backend::start(&topo.server, server_addr(HTTPS_PORT), "/");
    let http_url = format!("{}/x", plain.addr);
    let http_url = format!("http://{http_url}");
    let connect_url = format!("http://{}{TUNNEL_PATH}", behind_connect.addr);

    // Not reachable without the proxy.
    let direct = curl(&topo.client, &[], &http_url);
    assert_ne!(direct.exit, 0, "{name}: {direct:?}");

    // No credentials: 407, for plain requests and CONNECT alike.
    let r = curl(&topo.client, &["-x", &proxy.url_without_auth()], &http_url);
    assert_eq!(r.status, 407, "{name}: {r:?}\n{}", proxy.log());
    let r = curl(
        &topo.client,
        &["-p", "-x", &proxy.url_without_auth()],
        &connect_url,
    );
    assert_eq!(r.connect_status, 407, "{name}: {r:?}");
    // Wrong password: refused (the code is returned).
    let wrong_url = proxy.url_with(PROXY_USER, "wrong-password");
    let wrong = curl(&topo.client, &["-x", &wrong_url], &http_url);
    assert!(
        [401, 407].contains(&wrong.status),
        "{name}: {wrong:?}\n{}",
        proxy.log()
    );
    let r = curl(&topo.client, &["-p", "-x", &wrong_url], &connect_url);
    assert_eq!(r.connect_status, wrong.status, "{name}: {r:?}");

    // Right credentials: forwarded (absolute form) and CONNECTed.
    let r = curl(&topo.client, &["-x", &proxy.url()], &http_url);
    assert_eq!(r.status, 200, "{name}: {r:?}\n{}", proxy.log());
    assert_eq!(r.body, "method=GET target=/x upgrade=- body=0\n", "{name}");
    let r = curl(&topo.client, &["-p", "-x", &proxy.url()], &connect_url);
    assert_eq!(
        (r.connect_status, r.status),
        (200, 200),
        "{name}: {r:?}\n{}",
        proxy.log()
    );
    // CONNECT to a port not in TLS_PORTS: 403.
    let r = curl(&topo.client, &["-p", "-x", &proxy.url()], &http_url);
    assert_eq!(r.connect_status, 403, "{name}: {r:?}");

    // A WebSocket upgrade on a forwarded http:// request: the proxy drops
    // `Upgrade`, the backend answers a plain GET.
    let ws = ws_probe(
        &topo.client,
        &plain_ws_url(&plain),
        Some(&proxy.url()),
        None,
    );
    assert_eq!(ws.status, 200, "{name} passed an upgrade: {ws:?}");
    let last = plain.requests().pop().unwrap_or_default();
    assert!(
        last.starts_with(&format!("REQ GET {TUNNEL_PATH} HTTP/1.1 upgrade=-")),
        "{name}: {last}"
    );
    // Through CONNECT the upgrade is end to end: curl tunnels (`-p`) a plain
    // upgrade request to the backend on 443 and gets its 101.
    // (`websocket_over_tls_through_connect` does the same over TLS.)
    let r = curl(
        &topo.client,
        &[
            "-p",
            "-x",
            &proxy.url(),
            "-H",
            "Upgrade: websocket",
            "-H",
            "Connection: Upgrade",
            "-H",
            "Sec-WebSocket-Version: 13",
            "-H",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "--max-time",
            "2",
        ],
        &connect_url,
    );
    assert_eq!(
        (r.connect_status, r.status),
        (200, 101),
        "{name}: upgrade through CONNECT: {r:?}"
    );
    let last = behind_connect.requests().pop().unwrap_or_default();
    assert!(
        last.starts_with(&format!("REQ GET {TUNNEL_PATH} HTTP/1.1 upgrade=websocket")),
        "{name}: {last}"
    );
    wrong.status
}

fn plain_ws_url(backend: &Backend) -> String {
    format!("http://{}{TUNNEL_PATH}", backend.addr)
}

#[test]
fn squid_auth_connect_and_no_upgrades() {
    require_root();
    let topo = HttpTopology::new("hsquid", false);
    let squid = topo.start_squid();
    let wrong = forward_proxy_checks(&topo, &squid);
    assert_eq!(wrong, 407, "squid: wrong password");
    let log = squid.access_log();
    assert!(log.contains("TCP_DENIED/407"), "{log}");
    assert!(
        log.contains(&format!("CONNECT {}:443 {PROXY_USER}", addrs::SERVER_ADDR)),
        "{log}"
    );
}

#[test]
fn tinyproxy_auth_connect_and_no_upgrades() {
    require_root();
    let topo = HttpTopology::new("htiny", false);
    let tinyproxy = topo.start_tinyproxy();
    let wrong = forward_proxy_checks(&topo, &tinyproxy);
    // tinyproxy 1.11 answers wrong credentials with 401, missing ones with 407.
    assert_eq!(wrong, 401, "tinyproxy: wrong password");
}

/// WebSocket over TLS through CONNECT, end to end: the probe CONNECTs
/// through squid to nginx (TLS with the test CA) — the path of an https://
/// client behind a forward proxy.
#[test]
fn websocket_over_tls_through_connect() {
    require_root();
    let tag = "hwstls";
    let topo = HttpTopology::new(tag, true);
    let _backend = Backend::start(&topo.server, topo.server_http_addr(), "/");
    // nginx in the server namespace this time, on the server's 443.
    let nginx = Nginx::start(
        &topo.server,
        TestPki::generate(addrs::SERVER_ADDR),
        &NginxOptions {
            listen: server_addr(HTTPS_PORT),
            upstream: topo.server_http_addr(),
            locations: vec![NginxLocation {
                path: TUNNEL_PATH.to_string(),
                upgrade: true,
            }],
        },
    );
    let squid = topo.start_squid();
    let url = nginx.url(TUNNEL_PATH);
    let ws = ws_probe(&topo.client, &url, Some(&squid.url()), Some(nginx.ca()));
    assert_eq!(
        ws,
        WsProbe {
            connect: None,
            status: 101,
            echoed: true
        },
        "{}",
        squid.log()
    );
    let ws = ws_probe(
        &topo.client,
        &url,
        Some(&squid.url_with(PROXY_USER, "nope")),
        Some(nginx.ca()),
    );
    assert_eq!(ws.connect, Some(407), "{ws:?}");
}

/// A held connection from the client to the server, through `kill_tcp` with
/// each method: the holder sees its connection die, a new one works.
#[test]
fn kill_tcp_resets_connections() {
    require_root();
    let topo = HttpTopology::new("hkill", true);
    let backend = Backend::start(&topo.server, server_addr(HTTPS_PORT), "/");
    for method in [KillMethod::SsKill, KillMethod::NftReset] {
        // Holds a connection and sends a byte every 100 ms until it fails.
        let mut holder = topo.client.spawn(&[
            "timeout",
            "30",
            "python3",
            "-c",
            r#"
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
c.sendall(b"GET /held HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Key: eA==\r\n\r\n")
print("connected", flush=True)
try:
    while True:
        c.sendall(b"x")
        time.sleep(0.1)
except OSError as e:
    print("died", e.errno, flush=True)
"#,
            addrs::SERVER_ADDR,
            "443",
        ]);
        wait_until(Duration::from_secs(10), "the holder to connect", || {
            holder.log().contains("connected")
        });
        wait_until(Duration::from_secs(5), "the connection to show", || {
            !tcp_connections(&topo.client, addrs::SERVER_ADDR, HTTPS_PORT).is_empty()
        });
        let (used, ports) = kill_tcp(
            &topo.client,
            addrs::SERVER_ADDR,
            HTTPS_PORT,
            Some(method),
            || {},
        );
        assert_eq!(used, method);
        assert_eq!(ports.len(), 1, "{ports:?}");
        let status = holder.wait_timeout(Duration::from_secs(10));
        assert!(status.is_some(), "the holder survived {method:?}");
        assert!(
            holder.log().contains("died"),
            "{method:?}: {}",
            holder.log()
        );
        // New connections are not affected.
        let r = curl(&topo.client, &[], &format!("http://{}/after", backend.addr));
        assert_eq!(r.status, 200, "{method:?}: {r:?}");
    }
    // Automatic choice: ss -K where the kernel has socket destroy.
    let _holder = topo.client.spawn(&[
        "timeout",
        "30",
        "python3",
        "-c",
        "import socket,sys,time; c=socket.create_connection((sys.argv[1],443)); time.sleep(30)",
        addrs::SERVER_ADDR,
    ]);
    wait_until(Duration::from_secs(5), "the connection to show", || {
        !tcp_connections(&topo.client, addrs::SERVER_ADDR, HTTPS_PORT).is_empty()
    });
    let (used, _) = kill_tcp(&topo.client, addrs::SERVER_ADDR, HTTPS_PORT, None, || {});
    eprintln!("kill_tcp chose {used:?}");
}

#[test]
fn tls_pin_parsing() {
    let hex = "0123456789abcdef".repeat(4);
    let log = format!(
        "2026 INFO listening on https://203.0.113.2:443/tunnel\n2026 INFO TLS certificate pin: sha256:{hex}\n"
    );
    assert_eq!(tls_pin_from_log(&log), Some(format!("sha256:{hex}")));
    assert_eq!(tls_pin_from_log("no pin here"), None);
    assert_eq!(find_pin(&format!("sha256:{}", hex.to_uppercase())), None);
    assert_eq!(
        find_pin(&format!("x sha256:abc sha256:{hex}\"")),
        Some(format!("sha256:{hex}"))
    );
}

//! End-to-end tests of one session over every transport: the real `iptun`
//! binary, a server listening on UDP, ICMP echo, DNS (through a real
//! unbound) and HTTPS at once, and one client given all four URLs, in
//! network namespaces (`common::line::LineTopology`: client — middle —
//! server — target, the middle box routing between client and server and
//! running the resolver). nftables on the middle box cuts transports while
//! a transfer runs; the client must move its session without losing a byte
//! or its tunnel address.
//!
//! Every daemon gets its own control socket and every test its own key
//! directory; guards remove both, the namespaces (with their nftables
//! rules) and the processes even when a test fails.

mod common;

use std::time::{Duration, Instant};

use serde_json::Value;

use common::daemon::Daemon;
use common::http::{TUNNEL_PATH, clean_env, tls_pin_from_log};
use common::line::{LineTopology, addrs};
use common::unbound::{DOMAIN, Unbound, UnboundOptions};
use common::*;

/// The network behind the server.
const TARGET_NET: &str = "198.51.100.0/24";
/// The transfer that spans the cuts: 20 MB at 500 kB/s, 40 s.
const TRANSFER: u64 = 20_000_000;
const PACE: u64 = 500_000;
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(120);
/// A bound for the client to get its tunnel address.
const TUNNEL_UP: Duration = Duration::from_secs(30);

/// One test's namespaces, keys, resolver and server.
struct Case {
    tag: &'static str,
    topo: LineTopology,
    _dir: TempDir,
    server_key: Key,
    client_key: Key,
    _unbound: Unbound,
    server: Daemon,
    pin: String,
}

impl Case {
    /// The topology (`direct`: the middle box routes client and server),
    /// unbound in the middle, and a server on all four transports.
    fn new(tag: &'static str, direct: bool) -> Self {
        require_root();
        let topo = LineTopology::new(tag, direct);
        let dir = TempDir::new(tag);
        let (server_key, client_key) =
            (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
        let stub = format!("{}:53", addrs::SERVER_ADDR).parse().unwrap();
        let unbound = Unbound::start(
            &topo.middle,
            addrs::MIDDLE_ADDR.parse().unwrap(),
            &UnboundOptions::new(DOMAIN, stub),
        );
        let server_addr = addrs::SERVER_ADDR;
        let listen = [
            format!("udp://{server_addr}:3000"),
            "icmp://0.0.0.0".to_owned(),
            format!("dns://{server_addr}:53?domain={DOMAIN}"),
            format!("https://{server_addr}{TUNNEL_PATH}"),
        ];
        let mut args = vec![
            "server",
            "--private-key",
            server_key.path(),
            "--allow",
            &client_key.public,
            "--nat",
        ];
        for l in &listen {
            args.extend(["--listen", l]);
        }
        let mut server = Daemon::spawn(&topo.server, tag, "server", &args);
        server.wait_up();
        let pin = server.wait_for(Duration::from_secs(10), "the server's TLS pin", |s| {
            tls_pin_from_log(&s.log())
        });
        Self {
            tag,
            topo,
            _dir: dir,
            server_key,
            client_key,
            _unbound: unbound,
            server,
            pin,
        }
    }

    /// The four URLs, in the client's preference order.
    fn urls(&self) -> [String; 4] {
        let s = addrs::SERVER_ADDR;
        [
            format!("udp://{s}:3000"),
            format!("icmp://{s}"),
            format!("https://{s}{TUNNEL_PATH}"),
            format!("dns://{DOMAIN}?resolver={}", addrs::MIDDLE_ADDR),
        ]
    }

    fn start_client(&self) -> Daemon {
        let urls = self.urls();
        let mut args = vec![
            "client",
            "--private-key",
            self.client_key.path(),
            "--server-key",
            &self.server_key.public,
            "--tls-pin",
            &self.pin,
            "--route",
            TARGET_NET,
        ];
        for u in &urls {
            args.extend(["--server", u]);
        }
        Daemon::spawn_wrapped(
            &self.topo.client,
            self.tag,
            "client",
            &clean_env(&[]),
            &args,
        )
    }

    /// nftables on the middle box: drop what `rule` matches between client
    /// and server (both directions), in a table of its own per cut.
    fn cut(&self, name: &str, rule: &str) {
        let table = format!("cut_{name}");
        let ns = &self.topo.middle;
        ns.exec_ok(&["nft", "add", "table", "inet", &table]);
        let hook = "{ type filter hook forward priority -10; }";
        ns.exec_ok(&["nft", "add", "chain", "inet", &table, "cut", hook]);
        let mut args = vec!["nft", "add", "rule", "inet", &table, "cut"];
        args.extend(rule.split_whitespace());
        args.push("drop");
        ns.exec_ok(&args);
    }

    fn restore(&self, name: &str) {
        self.topo
            .middle
            .exec_ok(&["nft", "delete", "table", "inet", &format!("cut_{name}")]);
    }
}

/// The client's status: transport in use, address, moves.
fn snapshot(client: &Daemon) -> Option<(String, String, u64)> {
    let st = client.status()?;
    Some((
        st["sessions"][0]["transport"].as_str()?.to_owned(),
        st["addresses"][0].as_str()?.to_owned(),
        st["moves"].as_u64()?,
    ))
}

fn state_of<'a>(st: &'a Value, transport: &str) -> &'a Value {
    st["paths"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["transport"] == transport))
        .unwrap_or_else(|| panic!("no {transport} path in {st:#}"))
}

/// A 20 MB transfer stays intact while UDP, then ICMP, is cut and UDP comes
/// back: the client moves UDP → ICMP → HTTPS → UDP, its tunnel address
/// never changes, and its status shows each move.
#[test]
fn transfer_survives_cuts_of_udp_then_icmp() {
    let case = Case::new("fbcuts", true);
    let mut client = case.start_client();
    let address = client.wait_tunnel_address(TUNNEL_UP);
    wait_until(Duration::from_secs(20), "a ping through the tunnel", || {
        ping(&case.topo.client, TARGET_ADDR, 1)
    });
    assert_eq!(snapshot(&client).unwrap().0, "udp");

    let (client_ns, target_ns) = (&case.topo.client, &case.topo.target);
    let started = Instant::now();
    std::thread::scope(|s| {
        let transfer = s.spawn(|| {
            tcp_transfer_sha256_paced(
                client_ns,
                target_ns,
                TARGET_ADDR,
                TRANSFER,
                PACE,
                TRANSFER_TIMEOUT,
            )
        });
        let mut seen: Vec<(f64, String)> = Vec::new();
        let mut watch = |until: Duration| {
            while started.elapsed() < until {
                if let Some((transport, addr, _)) = snapshot(&client) {
                    assert_eq!(addr, address, "the tunnel address changed");
                    if seen.last().is_none_or(|(_, t)| *t != transport) {
                        seen.push((started.elapsed().as_secs_f64(), transport));
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        };
        watch(Duration::from_secs(3));
        case.cut("udp", "udp dport 3000");
        watch(Duration::from_secs(13));
        case.cut("icmp", "icmp type echo-request");
        watch(Duration::from_secs(28));
        case.restore("udp");
        let (sent, received) = transfer.join().expect("the transfer thread");
        watch(started.elapsed()); // one more look
        eprintln!(
            "transports over time: {seen:?}; transfer done after {:.1?}",
            started.elapsed()
        );
        assert_same_transfer(&sent, &received, TRANSFER);
        let order: Vec<&str> = seen.iter().map(|(_, t)| t.as_str()).collect();
        assert_eq!(order.first(), Some(&"udp"), "{seen:?}");
        assert!(order.contains(&"icmp"), "never on ICMP: {seen:?}");
        assert!(order.contains(&"https"), "never on HTTPS: {seen:?}");
    });
    // UDP works again: the client moves back (probes of a failed path start
    // 30 s after it failed).
    wait_until(Duration::from_secs(60), "the client back on UDP", || {
        snapshot(&client).is_some_and(|s| s.0 == "udp")
    });
    let st = client.status_ok();
    eprintln!("{}", serde_json::to_string_pretty(&st["paths"]).unwrap());
    assert!(st["moves"].as_u64() >= Some(3), "{st:#}");
    assert_eq!(state_of(&st, "udp")["state"], "in use", "{st:#}");
    assert_eq!(state_of(&st, "icmp")["state"], "failed", "{st:#}");
    assert!(state_of(&st, "icmp")["reason"].is_string(), "{st:#}");
    let icmp = state_of(&st, "icmp");
    assert!(
        icmp["next_probe_secs"].is_number() || icmp["probing"] == true,
        "{st:#}"
    );
    assert_eq!(st["addresses"][0], address.as_str());
    let text = case.topo.client.exec_ok(&[
        iptun_bin(),
        "status",
        "--control",
        client.control().to_str().unwrap(),
    ]);
    assert!(text.contains("paths (moves:"), "{text}");
    assert!(text.contains("* udp://"), "{text}");
    // The server followed: its session is on UDP again, one session only.
    let server_st = case.server.status().unwrap();
    assert_eq!(
        server_st["sessions"].as_array().map(Vec::len),
        Some(1),
        "{server_st:#}"
    );
    assert_eq!(
        server_st["sessions"][0]["transport"], "udp",
        "{server_st:#}"
    );
}

/// A cold start where only the DNS resolver reaches the server (the middle
/// box routes nothing): the client comes up on DNS, the last of its URLs.
#[test]
fn cold_start_where_only_dns_gets_through() {
    let case = Case::new("fbcold", false);
    let started = Instant::now();
    let mut client = case.start_client();
    client.wait_tunnel_address(TUNNEL_UP);
    eprintln!("tunnel up after {:.1?}", started.elapsed());
    wait_until(Duration::from_secs(20), "a ping through the tunnel", || {
        ping(&case.topo.client, TARGET_ADDR, 1)
    });
    let st = client.status_ok();
    assert_eq!(st["sessions"][0]["transport"], "dns", "{st:#}");
    assert_eq!(state_of(&st, "dns")["state"], "in use", "{st:#}");
    assert_eq!(state_of(&st, "udp")["state"], "failed", "{st:#}");
    assert_eq!(state_of(&st, "https")["state"], "failed", "{st:#}");
}

/// `iptun probe` says what gets through: ICMP cut at the middle box fails,
/// the others complete a handshake and give figures.
#[test]
fn probe_reports_what_gets_through() {
    let case = Case::new("fbprobe", true);
    case.cut("icmp", "icmp type echo-request");
    let urls = case.urls();
    let mut args: Vec<String> = clean_env(&[]);
    args.extend(
        [
            iptun_bin(),
            "probe",
            "--json",
            "--seconds",
            "1",
            "--private-key",
            case.client_key.path(),
            "--server-key",
            &case.server_key.public,
            "--tls-pin",
            &case.pin,
        ]
        .map(str::to_owned),
    );
    for u in &urls {
        args.extend(["--server".to_owned(), u.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = case.topo.client.exec(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: Value = serde_json::from_str(&stdout).expect("JSON");
    eprintln!("{reports:#}");
    for r in reports.as_array().unwrap() {
        if r["transport"] == "icmp" {
            assert_eq!(r["ok"], false, "{r:#}");
            assert!(r["error"].is_string(), "{r:#}");
        } else {
            assert_eq!(r["ok"], true, "{r:#}");
            assert!(r["rtt_ms"].as_f64().is_some_and(|v| v > 0.0), "{r:#}");
            assert!(r["up_mbit_s"].as_f64().is_some_and(|v| v > 0.0), "{r:#}");
            assert!(r["down_mbit_s"].as_f64().is_some_and(|v| v > 0.0), "{r:#}");
        }
    }
    assert_eq!(reports.as_array().map(Vec::len), Some(4));
    // With every path cut, it says so and exits non-zero.
    case.cut("all", "ip daddr 203.0.113.2");
    let out = case.topo.client.exec(&args[..args.len() - 6]);
    assert!(!out.status.success());
}

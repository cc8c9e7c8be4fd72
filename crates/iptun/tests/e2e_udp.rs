//! End-to-end tests of the UDP tunnel: the real `iptun` binary as server and
//! clients in network namespaces (see `common`), checked through pings, TCP
//! transfers, the routing/nftables state and `iptun status --json`.
//!
//! Every daemon gets its own control socket (`/run/iptun` is shared by all
//! namespaces) and every test its own key directory; guards remove both, the
//! namespaces and the processes even when a test fails.

mod common;

use std::time::{Duration, Instant};

use serde_json::Value;

use common::daemon::Daemon;
use common::*;

/// The TUN device name every daemon here uses (one per namespace).
const TUN: &str = "iptun0";
/// The server's tunnel address with the default pool.
const SERVER_TUN_ADDR: &str = "10.1.0.1";
/// The network behind the server (server side and target).
const TARGET_NET: &str = "198.51.100.0/24";
/// The size of the big transfers.
const BIG: u64 = 50 << 20;
/// A bound for a client to get its tunnel address.
const TUNNEL_UP: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- helpers

fn start_server(ns: &Netns, tag: &str, key: &Key, allow: &[&Key], extra: &[&str]) -> Daemon {
    let mut args = vec!["server", "--private-key", key.path()];
    for k in allow {
        args.extend(["--allow", k.public.as_str()]);
    }
    args.extend_from_slice(extra);
    let mut d = Daemon::spawn(ns, tag, "server", &args);
    d.wait_up();
    d
}

/// `role` names the client's control socket (`c0`, `c1`...).
fn start_client(
    ns: &Netns,
    tag: &str,
    role: &str,
    key: &Key,
    server_key: &Key,
    server_addr: &str,
    extra: &[&str],
) -> Daemon {
    let url = format!("udp://{server_addr}:3000");
    let mut args = vec![
        "client",
        "--private-key",
        key.path(),
        "--server-key",
        &server_key.public,
        "--server",
        &url,
    ];
    args.extend_from_slice(extra);
    Daemon::spawn(ns, tag, role, &args)
}

/// The IPv4 addresses on `dev` in `ns` (empty if it has none or does not exist).
fn ipv4_addrs(ns: &Netns, dev: &str) -> Vec<String> {
    let out = ns.exec(&["ip", "-j", "-4", "addr", "show", "dev", dev]);
    if !out.status.success() {
        return Vec::new();
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j addr");
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str().map(str::to_string))
        .collect()
}

fn link_exists(ns: &Netns, dev: &str) -> bool {
    ns.exec(&["ip", "link", "show", "dev", dev])
        .status
        .success()
}

/// `ip -j [-6] route show table main` as (dst, dev) pairs.
fn routes(ns: &Netns, v6: bool) -> Vec<(String, String)> {
    let family = if v6 { "-6" } else { "-4" };
    let out = ns.exec_ok(&["ip", "-j", family, "route", "show", "table", "main"]);
    let v: Value = serde_json::from_str(&out).expect("ip -j route");
    v.as_array()
        .expect("array")
        .iter()
        .map(|r| {
            (
                r["dst"].as_str().unwrap_or_default().to_string(),
                r["dev"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn has_route(routes: &[(String, String)], dst: &str, dev: &str) -> bool {
    routes.iter().any(|(d, v)| d == dst && v == dev)
}

fn sysctl(ns: &Netns, path: &str) -> String {
    ns.exec_ok(&["cat", path]).trim().to_string()
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const IP6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

fn nft_tables(ns: &Netns) -> String {
    ns.exec_ok(&["nft", "list", "tables"])
}

/// Pings `dst` from `ns` until one answer comes back.
fn ping_eventually(ns: &Netns, dst: &str, timeout: Duration) {
    wait_until(timeout, &format!("a ping reply from {dst}"), || {
        ping(ns, dst, 1)
    });
}

/// A counter from a drops map (`{}` or missing means 0).
fn drops(map: &Value, reason: &str) -> u64 {
    map[reason].as_u64().unwrap_or(0)
}

/// The server session whose addresses include `addr`.
fn session_with<'a>(status: &'a Value, addr: &str) -> &'a Value {
    status["sessions"]
        .as_array()
        .expect("sessions array")
        .iter()
        .find(|s| {
            s["addresses"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == addr))
        })
        .unwrap_or_else(|| panic!("no session with address {addr}: {status:#}"))
}

// ---------------------------------------------------------------- tests

#[test]
fn nat_ping_and_50mb_transfer() {
    require_root();
    let tag = "nat";
    let topo = Topology::new(tag);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let mut server = start_server(&topo.server, tag, &skey, &[&ckey], &["--nat"]);
    let mut client = start_client(
        topo.client(),
        tag,
        "c0",
        &ckey,
        &skey,
        topo.server_addr(),
        &["--route", TARGET_NET],
    );
    let addr = client.wait_tunnel_address(TUNNEL_UP);
    assert!(addr.starts_with("10.1.0."), "{addr}");
    assert_eq!(ipv4_addrs(topo.client(), TUN), [addr.as_str()]);

    ping_eventually(topo.client(), TARGET_ADDR, Duration::from_secs(10));
    let started = Instant::now();
    let (sent, received) = tcp_transfer_sha256(topo.client(), &topo.target, TARGET_ADDR, BIG);
    eprintln!("50 MiB through the tunnel in {:?}", started.elapsed());
    assert_same_transfer(&sent, &received, BIG);

    let status = server.status_ok();
    assert_eq!(status["role"], "server");
    assert_eq!(status["tun"], TUN);
    let session = session_with(&status, &addr);
    assert_eq!(session["key"], ckey.public.as_str());
    assert_eq!(session["transport"], "udp");
    let endpoint = session["endpoint"].as_str().expect("endpoint");
    assert!(
        endpoint.starts_with(&format!("{}:", topo.clients[0].addr)),
        "{endpoint}"
    );
    let rx = session["rx_bytes"].as_u64().expect("rx_bytes");
    assert!(rx >= BIG, "server received only {rx} bytes: {status:#}");
    assert!(session["rx_packets"].as_u64().unwrap() > 0);
    assert!(session["tx_bytes"].as_u64().unwrap() > 0, "ACKs go back");
    client.assert_running();
}

/// Threads of `pid` whose name starts with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(Result::ok)
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with(prefix))
                })
                .count()
        })
        .unwrap_or(0)
}

/// `--workers 3`: the TUN device has three queues and the server two
/// worker threads besides its main loop; four clients at once spread over
/// the workers' sockets, and each client's transfer through the tunnel
/// arrives intact, with nothing of another client's reaching it (it would
/// fail the client's authentication, and be counted). Stopping the server
/// ends the workers and removes the device and the NAT rules.
#[test]
fn clients_on_several_workers_get_only_their_own_traffic() {
    require_root();
    let tag = "work";
    let mut topo = Topology::new(tag);
    for i in 1..4 {
        topo.add_client(i);
    }
    let dir = TempDir::new(tag);
    let skey = Key::generate(&dir, "server");
    let keys: Vec<Key> = (0..4)
        .map(|i| Key::generate(&dir, &format!("c{i}")))
        .collect();
    let allow: Vec<&Key> = keys.iter().collect();
    let mut server = start_server(
        &topo.server,
        tag,
        &skey,
        &allow,
        &["--nat", "--workers", "3"],
    );
    let queues = topo
        .server
        .exec_ok(&["ls", &format!("/sys/class/net/{TUN}/queues")]);
    let tx_queues = queues.split_whitespace().filter(|q| q.starts_with("tx-"));
    assert_eq!(tx_queues.count(), 3, "the device's queues: {queues}");
    assert_eq!(threads_named(server.pid(), "iptun worker"), 2);

    let start = |i: usize| {
        let c = &topo.clients[i];
        let role = format!("c{i}");
        let route = ["--route", TARGET_NET];
        start_client(&c.ns, tag, &role, &keys[i], &skey, &c.server_addr, &route)
    };
    let mut clients: Vec<Daemon> = (0..4).map(start).collect();
    let addrs: Vec<String> = clients
        .iter_mut()
        .map(|c| c.wait_tunnel_address(TUNNEL_UP))
        .collect();
    // The kernel picks a client's socket by hashing its address and port:
    // should all four have landed on one worker, a client restarts (from
    // another port) until two workers carry some.
    let busy_workers = |server: &mut Daemon| {
        let status = server.status_ok();
        let workers = status["workers"].as_array().expect("workers").clone();
        assert_eq!(workers.len(), 3, "{status:#}");
        workers
            .iter()
            .filter(|w| w["datagrams"].as_u64().unwrap_or(0) > 0)
            .count()
    };
    for attempt in 0.. {
        if busy_workers(&mut server) >= 2 {
            break;
        }
        assert!(attempt < 8, "the clients never spread over the workers");
        let i = attempt % 4;
        clients[i].stop();
        clients[i] = start(i);
        clients[i].wait_tunnel_address(TUNNEL_UP);
    }

    for c in &topo.clients {
        ping_eventually(&c.ns, TARGET_ADDR, Duration::from_secs(10));
    }
    const EACH: u64 = 8 << 20;
    let transfers: Vec<(String, String)> = std::thread::scope(|s| {
        let running: Vec<_> = topo
            .clients
            .iter()
            .map(|c| s.spawn(|| tcp_transfer_sha256(&c.ns, &topo.target, TARGET_ADDR, EACH)))
            .collect();
        running.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for (sent, received) in &transfers {
        assert_same_transfer(sent, received, EACH);
    }
    let status = server.status_ok();
    for (key, addr) in keys.iter().zip(&addrs) {
        let session = session_with(&status, addr);
        assert_eq!(session["key"], key.public.as_str());
        assert!(session["rx_bytes"].as_u64().unwrap() >= EACH, "{status:#}");
    }
    eprintln!("workers: {}", status["workers"]);
    let carried: u64 = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["tun_packets"].as_u64().unwrap())
        .sum();
    assert!(
        carried > 0,
        "the replies were read from the queues: {status:#}"
    );
    for c in &mut clients {
        let status = c.status_ok();
        let session = &status["sessions"][0];
        for reason in ["unauthenticated", "unknown_index"] {
            assert_eq!(drops(&status["drops"], reason), 0, "{status:#}");
            assert_eq!(drops(&session["drops"], reason), 0, "{status:#}");
        }
    }

    drop(clients);
    server.stop();
    wait_until(Duration::from_secs(3), "the TUN device to go", || {
        !link_exists(&topo.server, TUN)
    });
    assert!(!nft_tables(&topo.server).contains("iptun"));
}

/// `--workers 2` on the client: its TUN device has two queues and a worker
/// thread reads the second. Flows spread over the queues by hash: eight
/// transfers into the tunnel at once each arrive intact, each loop reads
/// a share of them, and the worker sends its own (nothing queued for the
/// main loop), and `--pcap` records what both read. Stopping the client
/// ends the worker and removes the device.
#[test]
fn client_workers_carry_flows_of_both_queues() {
    require_root();
    let tag = "cwork";
    let topo = Topology::new(tag);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "c0"));
    let _server = start_server(&topo.server, tag, &skey, &[&ckey], &["--nat"]);
    let c = &topo.clients[0];
    let pcap = dir.file("client.pcapng");
    let pcap = pcap.to_str().unwrap();
    let extra = ["--route", TARGET_NET, "--workers", "2", "--pcap", pcap];
    let mut client = start_client(&c.ns, tag, "c0", &ckey, &skey, &c.server_addr, &extra);
    client.wait_tunnel_address(TUNNEL_UP);
    let queues =
        c.ns.exec_ok(&["ls", &format!("/sys/class/net/{TUN}/queues")]);
    let tx_queues = queues.split_whitespace().filter(|q| q.starts_with("tx-"));
    assert_eq!(tx_queues.count(), 2, "the device's queues: {queues}");
    assert_eq!(threads_named(client.pid(), "iptun worker"), 1);
    ping_eventually(&c.ns, TARGET_ADDR, Duration::from_secs(10));

    transfers_over_two_queues(&mut client, &c.ns, &topo.target, TARGET_ADDR, 2 << 20);
    let status = client.status_ok();
    assert_eq!(
        drops(&status["sessions"][0]["drops"], "worker_queue_full"),
        0
    );
    let read: u64 = status["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["tun_packets"].as_u64().unwrap())
        .sum();

    client.stop();
    wait_until(
        Duration::from_secs(3),
        "the client's TUN device to go",
        || !link_exists(&c.ns, TUN),
    );
    // Every packet either thread read into the tunnel is in the capture
    // (all but the target's replies, which went the other way).
    let into_tunnel = [
        "tcpdump",
        "-n",
        "-r",
        pcap,
        "not",
        "src",
        "host",
        TARGET_ADDR,
    ];
    let captured = run_ok(&into_tunnel).lines().count() as u64;
    assert!(captured >= read, "{captured} captured of {read} read");
}

/// `--pcap` on both ends: a ping through the tunnel reads back with
/// `tcpdump -r` as an echo request and its reply, in both files; the server
/// tags each packet with its client. A path that cannot be written is named
/// before anything is set up.
#[test]
fn pcap_of_a_ping_reads_back_with_tcpdump() {
    require_root();
    let tag = "pcap";
    let topo = Topology::new(tag);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let (spcap, cpcap) = (dir.file("server.pcapng"), dir.file("client.pcapng"));
    let (spcap, cpcap) = (spcap.to_str().unwrap(), cpcap.to_str().unwrap());
    let mut server = start_server(
        &topo.server,
        tag,
        &skey,
        &[&ckey],
        &["--nat", "--pcap", spcap],
    );
    let extra = ["--route", TARGET_NET, "--pcap", cpcap];
    let mut client = start_client(
        topo.client(),
        tag,
        "c0",
        &ckey,
        &skey,
        topo.server_addr(),
        &extra,
    );
    let addr = client.wait_tunnel_address(TUNNEL_UP);
    ping_eventually(topo.client(), TARGET_ADDR, Duration::from_secs(10));
    client.stop();
    server.stop();
    for file in [cpcap, spcap] {
        let text = run_ok(&["tcpdump", "-n", "-r", file, "icmp"]);
        // Inside the tunnel, before the server's NAT: the client's address.
        assert!(
            text.contains(&format!("{addr} > {TARGET_ADDR}: ICMP echo request")),
            "{file}:\n{text}"
        );
        assert!(
            text.contains(&format!("{TARGET_ADDR} > {addr}: ICMP echo reply")),
            "{file}:\n{text}"
        );
    }

    let bad = iptun_fails(
        &topo.server,
        &[
            "server",
            "--private-key",
            skey.path(),
            "--control",
            "@iptun-pcap-bad",
        ],
        &["--pcap", "/nonexistent/dir/x.pcapng"],
    );
    assert!(bad.contains("--pcap /nonexistent/dir/x.pcapng"), "{bad}");
}

#[test]
fn two_clients_ping_each_other() {
    require_root();
    let tag = "two";
    let mut topo = Topology::new(tag);
    topo.add_client(1);
    let dir = TempDir::new(tag);
    let skey = Key::generate(&dir, "server");
    let keys = [Key::generate(&dir, "c0"), Key::generate(&dir, "c1")];
    let mut server = start_server(&topo.server, tag, &skey, &[&keys[0], &keys[1]], &[]);
    let mut clients: Vec<Daemon> = (0..2)
        .map(|i| {
            let c = &topo.clients[i];
            start_client(
                &c.ns,
                tag,
                &format!("c{i}"),
                &keys[i],
                &skey,
                &c.server_addr,
                &[],
            )
        })
        .collect();
    let addrs: Vec<String> = clients
        .iter_mut()
        .map(|c| c.wait_tunnel_address(TUNNEL_UP))
        .collect();
    assert_ne!(addrs[0], addrs[1], "each client has its own address");

    for (from, to) in [(0, 1), (1, 0)] {
        ping_eventually(&topo.clients[from].ns, &addrs[to], Duration::from_secs(10));
    }
    // Both reach the server's own tunnel address too.
    for c in &topo.clients {
        assert!(ping(&c.ns, SERVER_TUN_ADDR, 2), "{} -> server", c.ns.name);
    }

    let status = server.status_ok();
    assert_eq!(
        status["sessions"].as_array().unwrap().len(),
        2,
        "{status:#}"
    );
    for (key, addr) in keys.iter().zip(&addrs) {
        assert_eq!(session_with(&status, addr)["key"], key.public.as_str());
    }
}

#[test]
fn unlisted_key_is_rejected() {
    require_root();
    let tag = "deny";
    let mut topo = Topology::new(tag);
    topo.add_client(1);
    let dir = TempDir::new(tag);
    let skey = Key::generate(&dir, "server");
    let (listed, unlisted) = (
        Key::generate(&dir, "listed"),
        Key::generate(&dir, "unlisted"),
    );
    let mut server = start_server(&topo.server, tag, &skey, &[&listed], &["--nat"]);
    let route = ["--route", TARGET_NET];
    let c = &topo.clients[1];
    let mut bad = start_client(&c.ns, tag, "c1", &unlisted, &skey, &c.server_addr, &route);
    let c = &topo.clients[0];
    let mut good = start_client(&c.ns, tag, "c0", &listed, &skey, &c.server_addr, &route);

    // The listed client works next to it.
    good.wait_tunnel_address(TUNNEL_UP);
    ping_eventually(&topo.clients[0].ns, TARGET_ADDR, Duration::from_secs(10));

    let bad_ns = &topo.clients[1].ns;
    wait_until(Duration::from_secs(10), "a not_allowed drop", || {
        drops(&server.status_ok()["drops"], "not_allowed") > 0
    });
    assert!(
        link_exists(bad_ns, TUN),
        "the client creates its device at once"
    );
    // Several handshake attempts later (retries start at 1 s), still nothing.
    std::thread::sleep(Duration::from_secs(3));
    bad.assert_running();
    assert_eq!(ipv4_addrs(bad_ns, TUN), Vec::<String>::new());
    let status = bad.status_ok();
    assert_eq!(status["addresses"], serde_json::json!([]), "{status:#}");
    assert!(
        !ping(bad_ns, TARGET_ADDR, 2),
        "unlisted client reached the target"
    );
    assert!(
        !ping(bad_ns, SERVER_TUN_ADDR, 1),
        "unlisted client reached the server"
    );

    let status = server.status_ok();
    assert!(
        drops(&status["drops"], "not_allowed") >= 2,
        "retries are refused too: {status:#}"
    );
    let sessions = status["sessions"].as_array().unwrap();
    assert!(
        sessions
            .iter()
            .all(|s| s["key"] != unlisted.public.as_str()),
        "{status:#}"
    );
    assert_eq!(sessions.len(), 1, "{status:#}");
}

/// Sends garbage datagrams to HOST:PORT until killed (at most MAX_SECS),
/// paced at up to 20000/s, printing the running count. A few are shaped like
/// inits (152 bytes, or 168 with the init MAC): without a MAC check each costs
/// the server a Diffie-Hellman before it fails (milliseconds in a debug
/// build), so they are kept rare.
const FLOOD_PY: &str = r#"
import random, socket, sys, time
host, port, max_secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rng = random.Random(7)
def typed(t, n):  # a message type, the reserved zeros, random bytes
    return bytes([t, 0, 0, 0]) + rng.randbytes(n - 4)
sent, end = 0, time.monotonic() + max_secs
while time.monotonic() < end:
    for _ in range(400):
        r = rng.randrange(1000)
        if r < 4:
            d = typed(1, rng.choice((152, 168)))   # an init of the right length
        elif r < 100:
            d = typed(2, 108)                      # a response (never valid at a server)
        elif r < 400:
            d = typed(3, rng.randrange(32, 1501))  # data for a random index
        elif r < 500:                              # right type and length, bad reserved bytes
            d = bytes([rng.choice((1, 2, 3))]) + rng.randbytes(rng.choice((151, 107, 63)))
        else:
            d = rng.randbytes(rng.randrange(0, 1501))
        try:
            s.sendto(d, (host, port))
            sent += 1
        except OSError:
            pass
    print("sent", sent, flush=True)
    time.sleep(0.02)
print("done", sent, flush=True)
"#;

fn flood_count(log: &str) -> u64 {
    log.lines()
        .rev()
        .find_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn garbage_flood_during_transfer() {
    require_root();
    let tag = "flood";
    let topo = Topology::new(tag);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let mut server = start_server(&topo.server, tag, &skey, &[&ckey], &["--nat"]);
    let mut client = start_client(
        topo.client(),
        tag,
        "c0",
        &ckey,
        &skey,
        topo.server_addr(),
        &["--route", TARGET_NET],
    );
    client.wait_tunnel_address(TUNNEL_UP);
    ping_eventually(topo.client(), TARGET_ADDR, Duration::from_secs(10));

    // From the client's namespace, to the port the tunnel uses; bounded to 60 s.
    let mut flood = topo.client().spawn(&[
        "timeout",
        "70",
        "/usr/bin/python3",
        "-c",
        FLOOD_PY,
        topo.server_addr(),
        "3000",
        "60",
    ]);
    wait_until(Duration::from_secs(10), "the flood to start", || {
        assert!(flood.try_wait().is_none(), "flood died: {}", flood.log());
        flood_count(&flood.log()) > 0
    });
    let started = Instant::now();
    // The transfer runs in a thread; meanwhile the server must keep
    // answering `iptun status` (its loop is not starved by the flood).
    let (transfer, polls) = std::thread::scope(|s| {
        let transfer =
            s.spawn(|| tcp_transfer_sha256(topo.client(), &topo.target, TARGET_ADDR, BIG));
        let mut polls = Vec::new();
        while !transfer.is_finished() {
            let asked = Instant::now();
            polls.push((server.status().is_some(), asked.elapsed()));
            std::thread::sleep(Duration::from_millis(500));
        }
        (transfer.join(), polls)
    });
    let (sent, received) = transfer.unwrap_or_else(|e| std::panic::resume_unwind(e));
    let flooded = flood_count(&flood.log());
    eprintln!(
        "50 MiB in {:?} with {flooded} garbage datagrams; status answered in {:?}",
        started.elapsed(),
        polls.iter().map(|p| p.1).max()
    );
    assert!(
        polls.iter().all(|p| p.0),
        "the server did not answer iptun status during the flood: {polls:?}"
    );
    assert!(
        flood.try_wait().is_none(),
        "the flood ended before the transfer: {}",
        flood.log()
    );
    flood.stop(Duration::from_secs(5)); // `timeout` passes SIGTERM on to python
    assert_same_transfer(&sent, &received, BIG);
    assert!(flooded >= 10_000, "only {flooded} garbage datagrams sent");

    server.assert_running();
    client.assert_running();
    // Give the server a moment to read what is still queued, then look.
    std::thread::sleep(Duration::from_millis(300));
    let status = server.status_ok();
    for reason in ["malformed", "unknown_index", "unauthenticated"] {
        assert!(
            drops(&status["drops"], reason) > 0,
            "no {reason} drops: {status:#}"
        );
    }
    // The tunnel still works after the flood.
    ping_eventually(topo.client(), TARGET_ADDR, Duration::from_secs(5));
}

#[test]
fn server_restart_client_recovers() {
    require_root();
    let tag = "restart";
    let topo = Topology::new(tag);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let server_args = ["--nat", "--keepalive", "1"];
    let mut server = start_server(&topo.server, tag, &skey, &[&ckey], &server_args);
    let mut client = start_client(
        topo.client(),
        tag,
        "c0",
        &ckey,
        &skey,
        topo.server_addr(),
        &["--route", TARGET_NET],
    );
    let addr = client.wait_tunnel_address(TUNNEL_UP);
    ping_eventually(topo.client(), TARGET_ADDR, Duration::from_secs(10));

    server.stop_with("TERM");
    assert!(!server.control().exists(), "the server removes its socket");
    drop(server);
    assert!(!ping(topo.client(), TARGET_ADDR, 1), "no server, no tunnel");

    let down_since = Instant::now();
    let mut server = start_server(&topo.server, tag, &skey, &[&ckey], &server_args);
    ping_eventually(topo.client(), TARGET_ADDR, Duration::from_secs(20));
    eprintln!("tunnel back {:?} after the restart", down_since.elapsed());

    client.assert_running();
    let again = client.wait_tunnel_address(TUNNEL_UP);
    assert_eq!(again, addr, "the same key gets the same address");
    assert_eq!(ipv4_addrs(topo.client(), TUN), [addr.as_str()]);
    let status = server.status_ok();
    assert_eq!(session_with(&status, &addr)["key"], ckey.public.as_str());
}

#[test]
fn cleanup_on_exit() {
    require_root();
    let tag = "clean";
    let topo = Topology::new(tag);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let (sns, cns) = (&topo.server, topo.client());
    let server_addr = topo.server_addr().to_string();
    let host_route = (server_addr.clone(), CLIENT_IF.to_string());

    let before = |ns: &Netns| (routes(ns, false), routes(ns, true), nft_tables(ns));
    let (server_before, client_before) = (before(sns), before(cns));
    let forward_before = (sysctl(sns, IP_FORWARD), sysctl(sns, IP6_FORWARD));
    assert_eq!(
        forward_before,
        ("0".to_string(), "0".to_string()),
        "a fresh namespace"
    );

    // Round one stops both daemons with SIGTERM, round two with SIGINT (and
    // shows nothing left behind gets in the way of a second start).
    for signal in ["TERM", "INT"] {
        let mut server = start_server(sns, tag, &skey, &[&ckey], &["--nat"]);
        let mut client = start_client(
            cns,
            tag,
            "c0",
            &ckey,
            &skey,
            &server_addr,
            &["--route", "default"],
        );
        client.wait_tunnel_address(TUNNEL_UP);
        assert!(server.control().exists() && client.control().exists());

        let (v4, v6) = (routes(cns, false), routes(cns, true));
        for half in ["0.0.0.0/1", "128.0.0.0/1"] {
            assert!(has_route(&v4, half, TUN), "{half} via {TUN}: {v4:?}");
        }
        for half in ["::/1", "8000::/1"] {
            assert!(has_route(&v6, half, TUN), "{half} via {TUN}: {v6:?}");
        }
        assert!(
            v4.contains(&host_route),
            "host route for the server via {CLIENT_IF}: {v4:?}"
        );
        let tables = nft_tables(sns);
        assert!(tables.contains("table inet iptun_iptun0"), "{tables}");
        assert_eq!(sysctl(sns, IP_FORWARD), "1");
        assert_eq!(sysctl(sns, IP6_FORWARD), "1");
        // Everything goes through the tunnel now, the server's link excepted.
        ping_eventually(cns, TARGET_ADDR, Duration::from_secs(10));

        client.stop_with(signal);
        server.stop_with(signal);
        // Before the guards in `Daemon` remove them: the daemons must have.
        for path in [server.control(), client.control()] {
            assert!(!path.exists(), "{} left (SIG{signal})", path.display());
        }
        drop((client, server));

        for ns in [sns, cns] {
            wait_until(Duration::from_secs(3), "the TUN device to go", || {
                !link_exists(ns, TUN)
            });
            let (v4, v6) = (routes(ns, false), routes(ns, true));
            assert!(
                !v4.iter().chain(&v6).any(|(_, dev)| dev == TUN),
                "routes via {TUN} left in {}: {v4:?} {v6:?}",
                ns.name
            );
        }
        let after = (routes(cns, false), routes(cns, true), nft_tables(cns));
        assert!(
            !after.0.contains(&host_route),
            "host route left: {:?}",
            after.0
        );
        assert_eq!(
            after, client_before,
            "client namespace as before (SIG{signal})"
        );
        assert_eq!(
            before(sns),
            server_before,
            "server namespace as before (SIG{signal})"
        );
        assert!(!nft_tables(sns).contains("iptun"));
        assert_eq!(
            (sysctl(sns, IP_FORWARD), sysctl(sns, IP6_FORWARD)),
            forward_before,
            "forwarding restored (SIG{signal})"
        );
    }
}

/// Runs `iptun BASE.. MORE..` in `ns` (bounded to 10 s), expects a failure
/// and returns its stderr.
fn iptun_fails(ns: &Netns, base: &[&str], more: &[&str]) -> String {
    let mut all = vec!["timeout", "10", iptun_bin()];
    all.extend_from_slice(base);
    all.extend_from_slice(more);
    let out = ns.exec(&all);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{more:?} succeeded: {stderr}");
    assert_ne!(out.status.code(), Some(124), "{more:?} hung: {stderr}");
    assert!(stderr.contains("error"), "{more:?}: {stderr}");
    stderr
}

#[test]
fn bad_flags_give_clear_errors() {
    require_root();
    let tag = "flags";
    // In a namespace of its own, so a check that fails too late touches nothing real.
    let ns = Netns::new(tag, "x");
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let control = RemoveOnDrop(control_path(tag, "x"));
    let control_arg = control.0.to_str().unwrap();
    let server = [
        "server",
        "--control",
        control_arg,
        "--private-key",
        skey.path(),
    ];
    let client = [
        "client",
        "--control",
        control_arg,
        "--private-key",
        ckey.path(),
    ];
    let (allow, server_key) = (ckey.public.as_str(), skey.public.as_str());
    let server_url = "udp://192.0.2.1:3000";

    let err = iptun_fails(&ns, &server, &["--allow", allow, "--pool", "10.1.0.0/33"]);
    assert!(
        err.contains("--pool") && err.contains("10.1.0.0/33"),
        "{err}"
    );

    let err = iptun_fails(&ns, &server, &["--allow", "not-a-key"]);
    assert!(
        err.contains("--allow") && err.contains("not-a-key"),
        "{err}"
    );

    let err = iptun_fails(&ns, &client, &["--server-key", server_key]);
    assert!(
        err.contains("--server") && err.contains("required") && !err.contains("--server-key"),
        "{err}"
    );

    let err = iptun_fails(
        &ns,
        &client,
        &["--server-key", "AAAA", "--server", server_url],
    );
    assert!(err.contains("--server-key"), "{err}");

    let err = iptun_fails(&ns, &server, &["--allow", allow, "--keepalive", "0"]);
    assert!(err.contains("--keepalive"), "{err}");

    let err = iptun_fails(&ns, &server, &["--allow", allow, "--workers", "0"]);
    assert!(
        err.contains("--workers 0") && err.contains("between"),
        "{err}"
    );
    let pcap = dir.file("w.pcap");
    let pcap = pcap.to_str().unwrap();
    let err = iptun_fails(&ns, &server, &["--workers", "2", "--pcap", pcap]);
    assert!(
        err.contains("--workers 2") && err.contains("--pcap"),
        "{err}"
    );

    let more = [
        "--server-key",
        server_key,
        "--server",
        server_url,
        "--route",
        "nowhere",
    ];
    let err = iptun_fails(&ns, &client, &more);
    assert!(err.contains("--route") && err.contains("nowhere"), "{err}");

    // Several URLs: a bad one among them is named, a repeated one refused,
    // and with only unusable hosts the client says none can be used.
    let more = [
        "--server-key",
        server_key,
        "--server",
        server_url,
        "--server",
        "carrier-pigeon://192.0.2.1",
    ];
    let err = iptun_fails(&ns, &client, &more);
    assert!(err.contains("carrier-pigeon://192.0.2.1"), "{err}");
    let more = [
        "--server-key",
        server_key,
        "--server",
        server_url,
        "--server",
        server_url,
    ];
    let err = iptun_fails(&ns, &client, &more);
    assert!(err.contains("given twice"), "{err}");
    let more = [
        "--server-key",
        server_key,
        "--server",
        "udp://no-such-host.invalid:3000",
        "--server",
        "https://no-such-host.invalid/tunnel",
    ];
    let err = iptun_fails(&ns, &client, &more);
    assert!(
        err.contains("no --server URL can be used") && err.contains("no-such-host.invalid"),
        "{err}"
    );

    // Config files: an unknown key is named, with the file.
    for (role, text) in [
        ("server", "tun = \"iptun0\"\nfrobnicate = true\n"),
        (
            "client",
            "server = \"udp://192.0.2.1:3000\"\nfrobnicate = 3\n",
        ),
    ] {
        let file = dir.file(&format!("{role}.toml"));
        std::fs::write(&file, text).unwrap();
        let base: &[&str] = if role == "server" { &server } else { &client };
        let file = file.to_str().unwrap();
        let err = iptun_fails(&ns, base, &["--config", file]);
        assert!(
            err.contains("frobnicate") && err.contains(file),
            "{role}: {err}"
        );
    }
    // A missing config file is named too.
    let err = iptun_fails(&ns, &server, &["--config", "/nonexistent/iptun.toml"]);
    assert!(err.contains("/nonexistent/iptun.toml"), "{err}");

    // None of these got as far as touching the system.
    assert!(!link_exists(&ns, TUN), "a TUN device was created");
    assert!(!control.0.exists(), "a control socket was created");
}

/// A server with two addresses on its uplink, reached at the second one
/// through a masquerading, stateful router: its answers must leave from
/// that address (the routing would pick the first, which the router's
/// conntrack does not match, and the tunnel would never come up).
#[test]
fn secondary_server_address_answers_from_it() {
    require_root();
    let tag = "udpsec";
    let topo = RoutedTopology::new(tag);
    let secondary = "203.0.113.3";
    topo.server.exec_ok(&[
        "ip",
        "addr",
        "add",
        &format!("{secondary}/24"),
        "dev",
        routed::SERVER_UP_IF,
    ]);
    ping_eventually(&topo.client, secondary, Duration::from_secs(5));
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let _server = start_server(&topo.server, tag, &skey, &[&ckey], &["--nat"]);
    let mut client = start_client(
        &topo.client,
        tag,
        "c0",
        &ckey,
        &skey,
        secondary,
        &["--route", TARGET_NET],
    );
    client.wait_tunnel_address(TUNNEL_UP);
    ping_eventually(&topo.client, TARGET_ADDR, Duration::from_secs(10));
}

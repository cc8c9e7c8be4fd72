//! End-to-end tests of the ICMP echo transport: the real `iptun` binary as
//! server and client in network namespaces, with a masquerading, stateful
//! router between them (`common::RoutedTopology`): the client's echo
//! requests reach the server from the router's address with rewritten
//! identifiers, and the server's echo replies reach the client only as
//! conntrack answers to those requests.
//!
//! Every daemon gets its own control socket and every test its own key
//! directory; guards remove both, the namespaces and the processes even when
//! a test fails.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::daemon::Daemon;
use common::routed::*;
use common::*;

/// The network behind the server (server side and target).
const TARGET_NET: &str = "198.51.100.0/24";
/// The size of the transfers.
const TRANSFER: u64 = 10 << 20;
/// A bound for each transfer.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server holds a tunnel request before a keepalive answers it.
const HOLD: Duration = Duration::from_secs(5);

const IGNORE_V4: &str = "/proc/sys/net/ipv4/icmp_echo_ignore_all";
const IGNORE_V6: &str = "/proc/sys/net/ipv6/icmp/echo_ignore_all";
/// A bound for a client to get its tunnel address.
const TUNNEL_UP: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------- helpers

fn start_server(ns: &Netns, tag: &str, key: &Key, client: &Key, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "server",
        "--private-key",
        key.path(),
        "--allow",
        &client.public,
    ];
    args.extend_from_slice(extra);
    let mut d = Daemon::spawn(ns, tag, "server", &args);
    d.wait_up();
    d
}

/// Starts a client of `server_url` routing the target network, and waits
/// until its tunnel is up.
fn start_client(ns: &Netns, tag: &str, key: &Key, server_key: &Key, server_url: &str) -> Daemon {
    start_client_with(ns, tag, key, server_key, server_url, &[])
}

/// [`start_client`] with more flags.
fn start_client_with(
    ns: &Netns,
    tag: &str,
    key: &Key,
    server_key: &Key,
    server_url: &str,
    extra: &[&str],
) -> Daemon {
    let mut args = vec![
        "client",
        "--private-key",
        key.path(),
        "--server-key",
        &server_key.public,
        "--server",
        server_url,
        "--route",
        TARGET_NET,
    ];
    args.extend_from_slice(extra);
    let mut d = Daemon::spawn(ns, tag, "client", &args);
    let addr = d.wait_tunnel_address(TUNNEL_UP);
    assert!(addr.starts_with("10.1.0."), "{addr}");
    d
}

fn sysctl(ns: &Netns, path: &str) -> String {
    ns.exec_ok(&["cat", path]).trim().to_string()
}

/// The summary of one `ping` run.
#[derive(Debug)]
struct PingStats {
    transmitted: u64,
    received: u64,
    /// "+N duplicates" in the summary.
    duplicates: u64,
    /// Lines marked "DUP!".
    dup_lines: usize,
    output: String,
}

impl PingStats {
    /// Every request answered, none twice.
    fn assert_exactly_once(&self, count: u64, what: &str) {
        assert!(
            self.transmitted == count
                && self.received == count
                && self.duplicates == 0
                && self.dup_lines == 0,
            "{what}: expected {count} answers, each once: {} transmitted, {} received, \
             +{} duplicates, {} DUP! lines; output:\n{}",
            self.transmitted,
            self.received,
            self.duplicates,
            self.dup_lines,
            self.output
        );
    }
}

/// `ping -n -c COUNT -i 0.2 -W 2 [EXTRA] DST` in `ns`, parsed.
fn ping_stats(ns: &Netns, dst: &str, count: u64, extra: &[&str]) -> PingStats {
    let count_arg = count.to_string();
    let mut args = vec!["ping", "-n", "-c", &count_arg, "-i", "0.2", "-W", "2"];
    args.extend_from_slice(extra);
    args.push(dst);
    let out = ns.exec(&args);
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = output
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary in {}: {output}", ns.name));
    let mut stats = PingStats {
        transmitted: 0,
        received: 0,
        duplicates: 0,
        dup_lines: output.lines().filter(|l| l.contains("DUP!")).count(),
        output: output.clone(),
    };
    // "10 packets transmitted, 10 received, +2 duplicates, 0% packet loss, ..."
    for part in summary.split(", ") {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let n = n.trim_start_matches('+').parse().unwrap_or(0);
        match what {
            "packets" => stats.transmitted = n,
            "received" => stats.received = n,
            "duplicates" => stats.duplicates = n,
            _ => {}
        }
    }
    stats
}

/// Pings `dst` from `ns` until one answer comes back.
fn ping_eventually(ns: &Netns, dst: &str, timeout: Duration) {
    wait_until(timeout, &format!("a ping reply from {dst}"), || {
        ping(ns, dst, 1)
    });
}

/// The (only) server session.
fn only_session(status: &Value) -> &Value {
    let sessions = status["sessions"].as_array().expect("sessions array");
    assert_eq!(sessions.len(), 1, "one session: {status:#}");
    &sessions[0]
}

fn mbit_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 * 8.0 / took.as_secs_f64() / 1e6
}

/// 10 MiB client -> target and 10 MiB target -> client (a connection the
/// client opens: the target can't reach it) through the tunnel, each
/// checked by sha256 and timed.
fn transfers_both_ways(topo: &RoutedTopology, what: &str) {
    transfer_both_ways(
        &topo.client,
        &topo.target,
        TARGET_ADDR,
        TRANSFER,
        TRANSFER_TIMEOUT,
        what,
    );
}

/// Checks the server's session after the transfers: ICMP, from the router's
/// (masqueraded) address, with both transfers counted.
fn assert_icmp_session(server: &mut Daemon, client_key: &Key, router_addr: &str) {
    let status = server.status_ok();
    assert_eq!(status["role"], "server");
    let session = only_session(&status);
    assert_eq!(session["key"], client_key.public.as_str());
    assert_eq!(session["transport"], "icmp", "{status:#}");
    // The server sees the router's address, not the client's: the router
    // masqueraded the echo requests.
    assert_eq!(session["endpoint"], router_addr, "{status:#}");
    let rx = session["rx_bytes"].as_u64().expect("rx_bytes");
    let tx = session["tx_bytes"].as_u64().expect("tx_bytes");
    assert!(
        rx >= TRANSFER,
        "server received only {rx} bytes: {status:#}"
    );
    assert!(tx >= TRANSFER, "server sent only {tx} bytes: {status:#}");
}

/// The server must not know the client's network: only masquerading makes
/// its answers reach the client.
fn assert_server_has_no_route_to_client(topo: &RoutedTopology) {
    let out = topo.server.exec(&["ip", "route", "get", CLIENT_ADDR]);
    assert!(
        !out.status.success(),
        "the server has a route to the client: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

// ---------------------------------------------------------------- tests

#[test]
fn icmp4_through_nat_ping_and_10mb() {
    require_root();
    let tag = "i4";
    let topo = RoutedTopology::new(tag);
    assert_server_has_no_route_to_client(&topo);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let mut server = start_server(
        &topo.server,
        tag,
        &skey,
        &ckey,
        &["--listen", "icmp://0.0.0.0", "--nat"],
    );
    assert_eq!(server.status_ok()["endpoints"][0], "icmp://0.0.0.0");
    let url = format!("icmp://{SERVER_ADDR}");
    let mut client = start_client(&topo.client, tag, &ckey, &skey, &url);
    let status = client.status_ok();
    assert_eq!(status["sessions"][0]["transport"], "icmp", "{status:#}");

    ping_eventually(&topo.client, TARGET_ADDR, Duration::from_secs(10));
    // Every ping answered through the tunnel: the way down works too.
    ping_stats(&topo.client, TARGET_ADDR, 5, &[]).assert_exactly_once(5, "tunnel ping");
    transfers_both_ways(&topo, "ICMPv4 through NAT");
    assert_icmp_session(&mut server, &ckey, ROUTER_SERVER_ADDR);
    client.assert_running();
}

/// Workers asked for beside an ICMP listener (`--workers 2`): the ICMP
/// session stays with the main loop, whatever a worker reads of it goes
/// there, and the tunnel carries both ways intact. The client has a worker
/// too, which cannot send on ICMP: what it reads goes to the client's
/// main loop, and eight flows at once arrive intact.
#[test]
fn icmp_beside_udp_workers() {
    require_root();
    let tag = "iw";
    let topo = RoutedTopology::new(tag);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let listen = [
        "--listen",
        "icmp://0.0.0.0",
        "--listen",
        "udp://0.0.0.0:3000",
    ];
    let mut args = listen.to_vec();
    args.extend(["--nat", "--workers", "2"]);
    let mut server = start_server(&topo.server, tag, &skey, &ckey, &args);
    let url = format!("icmp://{SERVER_ADDR}");
    let workers = ["--workers", "2"];
    let mut client = start_client_with(&topo.client, tag, &ckey, &skey, &url, &workers);
    ping_eventually(&topo.client, TARGET_ADDR, Duration::from_secs(10));
    transfers_both_ways(&topo, "ICMPv4 beside UDP workers");
    let (from, to) = (&topo.client, &topo.target);
    transfers_over_two_queues(&mut client, from, to, TARGET_ADDR, 1 << 20);
    assert_icmp_session(&mut server, &ckey, ROUTER_SERVER_ADDR);
    let status = server.status_ok();
    assert_eq!(
        status["workers"].as_array().map(Vec::len),
        Some(2),
        "{status:#}"
    );
    client.assert_running();
}

#[test]
fn icmp6_through_nat_ping_and_10mb() {
    require_root();
    let tag = "i6";
    let topo = RoutedTopology::new(tag);
    assert_server_has_no_route_to_client(&topo);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let mut server = start_server(
        &topo.server,
        tag,
        &skey,
        &ckey,
        &["--listen", "icmp://[::]", "--nat"],
    );
    assert_eq!(server.status_ok()["endpoints"][0], "icmp://[::]");
    // Only the ICMPv6 listener: IPv4 echo stays with the kernel.
    assert_eq!(sysctl(&topo.server, IGNORE_V6), "1");
    assert_eq!(sysctl(&topo.server, IGNORE_V4), "0");
    let url = format!("icmp://[{SERVER_ADDR6}]");
    let mut client = start_client(&topo.client, tag, &ckey, &skey, &url);
    let status = client.status_ok();
    assert_eq!(status["sessions"][0]["transport"], "icmp", "{status:#}");

    ping_eventually(&topo.client, TARGET_ADDR, Duration::from_secs(10));
    ping_stats(&topo.client, TARGET_ADDR, 5, &[]).assert_exactly_once(5, "tunnel ping");
    transfers_both_ways(&topo, "ICMPv6 through NAT");
    assert_icmp_session(&mut server, &ckey, ROUTER_SERVER_ADDR6);
    client.assert_running();
}

/// Watches tunnel echo requests to the server and its replies on an
/// interface (as forwarded, after masquerading) for some seconds; prints a
/// JSON summary: how many requests, which (id, seq) got more than one reply,
/// which old enough to have been answered (the server holds a request for
/// up to 5 s) got none, and whether the sniffer itself lost frames.
const SNIFF_PY: &str = r#"
import json, socket, struct, sys, time
iface, secs, server, hold = sys.argv[1], float(sys.argv[2]), sys.argv[3], float(sys.argv[4])
# ETH_P_ALL: a protocol-specific packet socket would miss outgoing frames.
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(3))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind((iface, 0))
s.settimeout(0.1)
srv = socket.inet_aton(server)
requests, replies = {}, {}
start = time.monotonic()
print("sniffing", flush=True)
while (now := time.monotonic() - start) < secs:
    try:
        p, addr = s.recvfrom(65535)
    except socket.timeout:
        continue
    if addr[1] != 0x0800:
        continue
    hl = (p[0] & 15) * 4
    if len(p) < hl + 12 or p[9] != 1 or int.from_bytes(p[6:8], "big") & 0x1fff:
        continue
    icmp = p[hl:]
    key = (int.from_bytes(icmp[4:6], "big"), int.from_bytes(icmp[6:8], "big"))
    if icmp[8:12] != b"iPtN":
        continue
    if icmp[0] == 8 and p[16:20] == srv:
        requests.setdefault(key, now)
    elif icmp[0] == 0 and p[12:16] == srv:
        replies[key] = replies.get(key, 0) + 1
old = [k for k, t in requests.items() if t < secs - hold - 1.5]
# struct tpacket_stats: packets, drops (what the socket could not queue).
_, drops = struct.unpack("II", s.getsockopt(263, 6, 8))  # SOL_PACKET, PACKET_STATISTICS
print(json.dumps({
    "sniffer_drops": drops,
    "requests": len(requests),
    "replies": sum(replies.values()),
    "old": len(old),
    "duplicated": [[*k, n] for k, n in replies.items() if n > 1],
    "unanswered_old": [list(k) for k in old if k not in replies],
}), flush=True)
"#;

#[test]
fn ordinary_ping_answered_exactly_once() {
    require_root();
    let tag = "once";
    let topo = RoutedTopology::new(tag);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    assert_eq!(sysctl(&topo.server, IGNORE_V4), "0");
    assert_eq!(sysctl(&topo.server, IGNORE_V6), "0");
    // Both ICMP families, and UDP alongside.
    let mut server = start_server(
        &topo.server,
        tag,
        &skey,
        &ckey,
        &[
            "--listen",
            "icmp://0.0.0.0",
            "--listen",
            "icmp://[::]",
            "--listen",
            "udp://0.0.0.0:3000",
            "--nat",
        ],
    );
    let endpoints = server.status_ok()["endpoints"].clone();
    for e in ["icmp://0.0.0.0", "icmp://[::]", "udp://0.0.0.0:3000"] {
        assert!(
            endpoints.as_array().unwrap().iter().any(|x| x == e),
            "{e} missing: {endpoints}"
        );
    }
    // The kernel leaves echo requests to the server while it runs.
    assert_eq!(sysctl(&topo.server, IGNORE_V4), "1");
    assert_eq!(sysctl(&topo.server, IGNORE_V6), "1");
    let url = format!("icmp://{SERVER_ADDR}");
    let mut client = start_client(&topo.client, tag, &ckey, &skey, &url);
    ping_eventually(&topo.client, TARGET_ADDR, Duration::from_secs(10));

    let sniff_secs = 9.0;
    let mut sniffer = topo.router.spawn(&[
        "timeout",
        "30",
        python(),
        "-c",
        SNIFF_PY,
        ROUTER_SERVER_IF,
        &sniff_secs.to_string(),
        SERVER_ADDR,
        &HOLD.as_secs_f64().to_string(),
    ]);
    wait_until(Duration::from_secs(10), "the sniffer to start", || {
        assert!(
            sniffer.try_wait().is_none(),
            "sniffer died: {}",
            sniffer.log()
        );
        sniffer.log().contains("sniffing")
    });

    // Ordinary pings of the server, from the router itself and from behind
    // it, both families at once, while the tunnel carries pings and a
    // transfer (which keeps many requests outstanding).
    std::thread::scope(|s| {
        let transfer = s.spawn(|| {
            let bytes = 2 << 20;
            let (sent, received) = tcp_transfer_sha256_timeout(
                &topo.client,
                &topo.target,
                TARGET_ADDR,
                bytes,
                TRANSFER_TIMEOUT,
            );
            assert_same_transfer(&sent, &received, bytes);
        });
        let runs = [
            (&topo.router, SERVER_ADDR, "router -> server"),
            (&topo.router, SERVER_ADDR6, "router -> server (v6)"),
            (&topo.client, SERVER_ADDR, "client -> server"),
            (&topo.client, SERVER_ADDR6, "client -> server (v6)"),
            (&topo.client, TARGET_ADDR, "client -> target, tunnelled"),
        ]
        .map(|(ns, dst, what)| {
            s.spawn(move || ping_stats(ns, dst, 10, &[]).assert_exactly_once(10, what))
        });
        for run in runs.into_iter().chain([transfer]) {
            run.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        }
    });
    // Large (fragmented) pings are answered like the kernel would.
    ping_stats(&topo.router, SERVER_ADDR, 3, &["-s", "3000"])
        .assert_exactly_once(3, "router -> server, 3000 bytes");
    ping_stats(&topo.router, SERVER_ADDR6, 3, &["-s", "3000"])
        .assert_exactly_once(3, "router -> server (v6), 3000 bytes");

    // Tunnel requests are answered at most once each (data or keepalive);
    // under load the server lets the oldest of too many held requests go
    // unanswered (an answer per upstream packet would double the traffic),
    // so only idle ones are sure to be answered.
    let status = sniffer.wait_timeout(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "sniffer: {status:?}\n{}",
        sniffer.log()
    );
    let log = sniffer.log();
    let summary: Value = serde_json::from_str(log.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("sniffer summary ({e}): {log}"));
    eprintln!("tunnel echo requests on the router: {summary}");
    assert!(
        summary["requests"].as_u64().unwrap() >= 10 && summary["old"].as_u64().unwrap() > 0,
        "{summary}"
    );
    assert_eq!(
        summary["sniffer_drops"], 0,
        "the sniffer lost frames: {summary}"
    );
    assert_eq!(summary["duplicated"], Value::Array(vec![]), "{summary}");
    assert!(
        summary["replies"].as_u64().unwrap() <= summary["requests"].as_u64().unwrap(),
        "{summary}"
    );
    client.assert_running();

    // On exit the kernel answers pings again: the sysctls are restored.
    server.stop();
    assert_eq!(sysctl(&topo.server, IGNORE_V4), "0");
    assert_eq!(sysctl(&topo.server, IGNORE_V6), "0");
    ping_stats(&topo.router, SERVER_ADDR, 3, &[]).assert_exactly_once(3, "kernel, v4");
    ping_stats(&topo.router, SERVER_ADDR6, 3, &[]).assert_exactly_once(3, "kernel, v6");
}

/// Foreign ICMP at the server from the router's namespace, whose address is
/// also the one the client's (masqueraded) tunnel requests come from. First
/// captures some of the client's tunnel messages as they pass (an init and
/// data messages), then sends, at most ~1000 a second:
/// ordinary echo requests (must be answered once, with the same payload),
/// echo requests carrying the magic and garbage, garbage shaped like an init
/// or a data message (with the session's real receiver index), replays of
/// the captured messages, bad checksums, and other ICMP types (including a
/// "fragmentation needed"); init replays at most 10 a second. It stops when
/// the file `stop` exists (after 2 s at least), or after `secs`. Each kind has
/// its own echo id. Prints "capturing", "captured INITS DATAS", "junk", then
/// a JSON summary of what was sent and answered.
const JUNK_PY: &str = r#"
import json, os, random, socket, struct, sys, time
iface, server, secs, stop = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[5]
MAGIC = b"iPtN"
INIT_LEN = 8 + 32 + 48 + 64 + 16
rng = random.Random(4242)
srv = socket.inet_aton(server)

def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff

def icmp(ty, code, rest4, payload, bad=False):
    h = struct.pack("!BBH4s", ty, code, 0, rest4)
    c = csum(h + payload) ^ (0x5555 if bad else 0)
    return struct.pack("!BBH4s", ty, code, c, rest4) + payload

cap = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(3))  # ETH_P_ALL
cap.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
cap.bind((iface, 0))
cap.settimeout(0.1)
print("capturing", flush=True)
inits, datas = [], []
deadline = time.monotonic() + 20
while time.monotonic() < deadline and (not inits or len(datas) < 30):
    try:
        p, addr = cap.recvfrom(65535)
    except socket.timeout:
        continue
    if addr[1] != 0x0800:
        continue
    hl = (p[0] & 15) * 4
    if p[9] != 1 or p[16:20] != srv or int.from_bytes(p[6:8], "big") & 0x1fff:
        continue
    m = p[hl:]
    if m[0] == 8 and m[8:12] == MAGIC and len(m) > 12:
        msg = m[12:]
        (inits if msg[0] == 1 else datas).append(msg)
cap.close()
print("captured", len(inits), len(datas), flush=True)
receivers = [d[4:8] for d in datas] or [rng.randbytes(4)]

raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
raw.setblocking(False)

def garbage(lo, hi):
    return rng.randbytes(rng.randint(lo, hi))

def ping_payload():
    b = garbage(0, 1400)
    return b"x" + b if b.startswith(MAGIC) else b

# kind: (echo request payload, or None for another ICMP type)
KINDS = {
    "ping": ping_payload,
    "magic_garbage": lambda: MAGIC + garbage(0, 1400),
    "magic_only": lambda: MAGIC,
    "magic_init_shaped": lambda: MAGIC + b"\x01\0\0\0" + rng.randbytes(INIT_LEN - 4),
    "magic_data_forged": lambda: MAGIC + b"\x03\0\0\0" + rng.choice(receivers)
        + rng.randbytes(8) + garbage(16, 1400),
    "magic_big": lambda: MAGIC + garbage(2000, 4000),
    "replay_init": lambda: MAGIC + rng.choice(inits) if inits else None,
    "replay_data": lambda: MAGIC + rng.choice(datas) if datas else None,
    "bad_checksum_ping": ping_payload,
    "bad_checksum_magic": lambda: MAGIC + garbage(0, 200),
    "other_types": None,
    "truncated": None,
}
ids = {k: 0xA000 + i for i, k in enumerate(KINDS)}
kinds_by_id = {v: k for k, v in ids.items()}
sent = {k: 0 for k in KINDS}
answered = {k: 0 for k in KINDS}
payloads, seen = {}, set()
dups = mismatches = cookies = 0
seq = 0

def quoted():
    # An IPv4 header server -> router (ICMP) and 8 bytes: what an error quotes.
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 1500, rng.randint(0, 65535), 0, 64, 1, 0,
                    srv, socket.inet_aton(sys.argv[4]))
    return h + rng.randbytes(8)

def drain():
    global dups, mismatches, cookies
    while True:
        try:
            p = raw.recv(65535)
        except BlockingIOError:
            return
        hl = (p[0] & 15) * 4
        m = p[hl:]
        if p[12:16] != srv or len(m) < 8 or m[0] != 0:
            continue
        eid, eseq = struct.unpack("!HH", m[4:8])
        kind = kinds_by_id.get(eid)
        if kind is None:
            continue
        # A server under load (this flood) answers an init with a cookie
        # reply (PROTOCOL.md §3.3a: type 4, 64 bytes) before any key work,
        # replays included: no session state, so not an answer.
        if kind == "replay_init" and m[8:12] == MAGIC and len(m) == 18 + 64 and m[18] == 4:
            cookies += 1
            continue
        answered[kind] += 1
        if (eid, eseq) in seen:
            dups += 1
        seen.add((eid, eseq))
        if payloads.get((eid, eseq)) != m[8:]:
            mismatches += 1

print("junk", flush=True)
start = time.monotonic()
names = list(KINDS)
last_init = 0.0
n = 0
# At least 2 s, then until told to stop (or `secs` are over).
while (now := time.monotonic()) < start + 2 or (now < start + secs and not (
        n % 100 == 0 and os.path.exists(stop))):
    n += 1
    kind = rng.choice(names)
    if kind == "replay_init":
        # Each costs the server two X25519 before the stale timestamp shows;
        # an unoptimized (debug) server can't keep up with its own handshake
        # budget: replay at most 10 a second.
        if time.monotonic() - last_init < 0.1:
            continue
        last_init = time.monotonic()
    seq = (seq + 1) & 0xffff
    rest = struct.pack("!HH", ids[kind], seq)
    if kind == "other_types":
        ty = rng.choice([0, 3, 3, 4, 11, 12, 13, 15, 17, 42, rng.randint(44, 255)])
        if ty == 0:  # an echo reply carrying the magic: not for the server
            msg = icmp(0, 0, rest, MAGIC + garbage(0, 200))
        elif ty == 3 and rng.random() < 0.5:  # fragmentation needed, MTU 1280
            msg = icmp(3, 4, struct.pack("!HH", 0, 1280), quoted())
        elif ty in (3, 4, 11, 12):
            msg = icmp(ty, rng.randint(0, 5), b"\0\0\0\0", quoted())
        else:
            msg = icmp(ty, 0, rest, garbage(0, 64))
    elif kind == "truncated":
        msg = bytes([8, 0]) + rng.randbytes(rng.randint(0, 5))
    else:
        payload = KINDS[kind]()
        if payload is None:
            continue
        bad = kind.startswith("bad_checksum")
        msg = icmp(8, 0, rest, payload, bad)
        payloads[(ids[kind], seq)] = payload
    try:
        raw.sendto(msg, (server, 0))
        sent[kind] += 1
    except OSError:
        pass
    drain()
    time.sleep(0.001)
time.sleep(1)
drain()
print(json.dumps({"sent": sent, "answered": answered, "dups": dups, "cookies": cookies,
                  "mismatches": mismatches, "inits": len(inits), "datas": len(datas)}), flush=True)
"#;

/// Sums a drops map (server-wide or one session's).
fn total_drops(map: &Value) -> u64 {
    map.as_object()
        .map_or(0, |m| m.values().filter_map(Value::as_u64).sum())
}

#[test]
fn foreign_icmp_does_not_disturb() {
    require_root();
    let tag = "junk";
    let topo = RoutedTopology::new(tag);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let mut server = start_server(
        &topo.server,
        tag,
        &skey,
        &ckey,
        &["--listen", "icmp://0.0.0.0", "--nat"],
    );
    // The junk script captures tunnel messages from the start (the init).
    let stop = dir.0.join("stop-junk");
    let mut junk = topo.router.spawn(&[
        "timeout",
        "50",
        python(),
        "-c",
        JUNK_PY,
        ROUTER_SERVER_IF,
        SERVER_ADDR,
        "25",
        ROUTER_SERVER_ADDR,
        stop.to_str().expect("utf-8 path"),
    ]);
    let junk_says = |junk: &mut Proc, what: &str| {
        wait_until(Duration::from_secs(25), &format!("junk: {what}"), || {
            let log = junk.log();
            assert!(
                log.contains(what) || junk.try_wait().is_none(),
                "junk script died: {log}"
            );
            log.lines().any(|l| l.starts_with(what))
        });
    };
    junk_says(&mut junk, "capturing");
    let url = format!("icmp://{SERVER_ADDR}");
    let mut client = start_client(&topo.client, tag, &ckey, &skey, &url);
    ping_eventually(&topo.client, TARGET_ADDR, Duration::from_secs(10));
    ping_stats(&topo.client, TARGET_ADDR, 10, &["-i", "0.05"]);
    junk_says(&mut junk, "junk");
    let before = server.status_ok();
    let handshake_before = only_session(&before)["since_handshake_secs"]
        .as_f64()
        .expect("since_handshake_secs");

    let started = Instant::now();
    let (sent, received) = tcp_transfer_sha256_timeout(
        &topo.client,
        &topo.target,
        TARGET_ADDR,
        TRANSFER,
        TRANSFER_TIMEOUT,
    );
    let took = started.elapsed();
    assert_same_transfer(&sent, &received, TRANSFER);
    let still_junking = junk.try_wait().is_none();
    eprintln!(
        "10 MiB up under foreign ICMP in {took:.2?} ({:.0} Mbit/s)",
        mbit_per_s(TRANSFER, took)
    );
    assert!(
        still_junking,
        "the junk ended before the transfer: {}",
        junk.log()
    );
    std::fs::write(&stop, "").expect("create the stop file");
    let status = junk.wait_timeout(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "junk script: {status:?}\n{}",
        junk.log()
    );
    let log = junk.log();
    let summary: Value = serde_json::from_str(log.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("junk summary ({e}): {log}"));
    eprintln!("foreign ICMP: {summary}");
    let (sent_by, answered) = (&summary["sent"], &summary["answered"]);
    assert!(
        summary["inits"].as_u64() >= Some(1),
        "no init captured: {summary}"
    );
    assert!(
        summary["datas"].as_u64() >= Some(1),
        "no data captured: {summary}"
    );
    let kinds: BTreeMap<String, Value> =
        serde_json::from_value(sent_by.clone()).expect("sent counts");
    for (kind, n) in &kinds {
        assert!(n.as_u64() > Some(0), "no {kind} sent: {summary}");
        if kind != "ping" {
            // Unauthenticated, forged, replayed or broken: never answered.
            assert_eq!(answered[kind], 0, "{kind} answered: {summary}");
        }
    }
    // Ordinary pings are answered, each once with its payload.
    let pings = sent_by["ping"].as_u64().unwrap();
    assert!(
        answered["ping"].as_u64().unwrap() * 10 >= pings * 9,
        "ordinary pings unanswered: {summary}"
    );
    assert_eq!(summary["dups"], 0, "{summary}");
    assert_eq!(summary["mismatches"], 0, "{summary}");

    // The session survived: no new handshake (the replayed init was
    // refused), same path, and the junk was counted as drops.
    server.assert_running();
    client.assert_running();
    let after = server.status_ok();
    let session = only_session(&after);
    assert_eq!(session["key"], ckey.public.as_str());
    assert_eq!(session["endpoint"], ROUTER_SERVER_ADDR, "{after:#}");
    let handshake_after = session["since_handshake_secs"].as_f64().unwrap();
    assert!(
        handshake_after > handshake_before,
        "a new handshake during the junk: {handshake_before} -> {handshake_after}"
    );
    let drops = |s: &Value| total_drops(&s["drops"]) + total_drops(&only_session(s)["drops"]);
    assert!(
        drops(&after) > drops(&before),
        "no drops counted: {before:#} -> {after:#}"
    );
    // And the tunnel still works.
    ping_stats(&topo.client, TARGET_ADDR, 5, &[]).assert_exactly_once(5, "tunnel ping after");
}

// ------------------------------------------------ how the host would answer

/// The kernel answers an echo request from the address it was sent to, and
/// so must the server (ordinary and tunnel replies alike): otherwise a client
/// of a secondary address gets answers from the primary one, which the NAT's
/// conntrack (and the client) don't match.
#[test]
fn secondary_server_address_answers_from_it() {
    require_root();
    let tag = "sec";
    let topo = RoutedTopology::new(tag);
    let secondary = "203.0.113.3";
    topo.server.exec_ok(&[
        "ip",
        "addr",
        "add",
        &format!("{secondary}/24"),
        "dev",
        SERVER_UP_IF,
    ]);
    ping_eventually(&topo.client, secondary, Duration::from_secs(5));
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let _server = start_server(
        &topo.server,
        tag,
        &skey,
        &ckey,
        &["--listen", "icmp://0.0.0.0", "--nat"],
    );
    ping_stats(&topo.client, secondary, 3, &[]).assert_exactly_once(3, "ordinary ping");
    let url = format!("icmp://{secondary}");
    let _client = start_client(&topo.client, tag, &ckey, &skey, &url);
    ping_eventually(&topo.client, TARGET_ADDR, Duration::from_secs(10));
}

/// The kernel ignores broadcast echo requests (icmp_echo_ignore_broadcasts,
/// 1 by default); the server answers them, which makes it a smurf amplifier.
#[test]
fn broadcast_ping_is_not_answered() {
    require_root();
    let tag = "bcast";
    let topo = RoutedTopology::new(tag);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    assert_eq!(
        sysctl(
            &topo.server,
            "/proc/sys/net/ipv4/icmp_echo_ignore_broadcasts"
        ),
        "1"
    );
    let _server = start_server(
        &topo.server,
        tag,
        &skey,
        &ckey,
        &["--listen", "icmp://0.0.0.0"],
    );
    let stats = ping_stats(&topo.router, "203.0.113.255", 3, &["-b"]);
    assert_eq!(stats.received, 0, "{}", stats.output);
}

/// A client that restarts (same key) gets a new session with the same
/// server-side id; the requests its dead predecessor left held must not
/// take the new session's downstream (nobody would read it until they
/// expire, 5 s later): the server answers them at once when requests under
/// the new keys arrive.
#[test]
fn client_restart_downstream_at_once() {
    require_root();
    let tag = "restart";
    let topo = RoutedTopology::new(tag);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let _server = start_server(
        &topo.server,
        tag,
        &skey,
        &ckey,
        &["--listen", "icmp://0.0.0.0", "--nat"],
    );
    let url = format!("icmp://{SERVER_ADDR}");
    let client = start_client(&topo.client, tag, &ckey, &skey, &url);
    ping_eventually(&topo.client, TARGET_ADDR, Duration::from_secs(10));
    // Traffic keeps many requests outstanding; the client dies meanwhile.
    let _pings = topo
        .client
        .spawn(&["ping", "-q", "-c", "100", "-i", "0.005", TARGET_ADDR]);
    std::thread::sleep(Duration::from_millis(300));
    drop(client); // SIGKILL
    let _client = start_client(&topo.client, tag, &ckey, &skey, &url);
    let stats = ping_stats(&topo.client, TARGET_ADDR, 10, &[]);
    assert!(
        stats.received >= 9,
        "pings lost after the restart: {}",
        stats.output
    );
}

// ------------------------------------------------ a firewall's rate limit

/// The echo requests the router's firewall passes each second (nftables'
/// `limit rate`, burst 5), dropping the rest silently.
const ECHO_LIMIT: u64 = 300;

/// The router's counters of echo requests toward the server, and of those
/// its rate limit dropped.
fn echo_counters(router: &Netns) -> (u64, u64) {
    let out = router.exec_ok(&["nft", "list", "table", "inet", "echo_limit"]);
    let packets = |marker: &str| {
        let line = out
            .lines()
            .find(|l| l.contains("counter") && l.trim_end().ends_with(marker))
            .unwrap_or_else(|| panic!("no `{marker}` rule: {out}"));
        // "... counter packets N bytes M ..." (a limit says "burst 5 packets")
        let words: Vec<&str> = line.split_whitespace().collect();
        let i = words
            .iter()
            .position(|w| *w == "counter")
            .expect("a counter");
        words[i + 2].parse::<u64>().expect("a count")
    };
    (packets("accept"), packets("drop"))
}

/// A firewall on the path passes 300 echo requests a second and silently
/// drops the rest (a common setting). The client's pacing finds that rate:
/// a transfer each way completes intact at a good share of what the
/// firewall lets through (300 requests of one TCP segment each a second),
/// the firewall drops few requests, and the client's status shows the
/// pacing rate, the window and the requests lost and given up on.
#[test]
fn icmp_through_a_rate_limit_on_echo_requests() {
    require_root();
    let tag = "limit";
    let topo = RoutedTopology::new(tag);
    // Before the router's own filter (priority 0), every echo request to
    // the server is counted, and those beyond the limit are dropped.
    let router = &topo.router;
    router.exec_ok(&["nft", "add", "table", "inet", "echo_limit"]);
    let hook = "{ type filter hook forward priority -10; }";
    router.exec_ok(&["nft", "add", "chain", "inet", "echo_limit", "forward", hook]);
    let rule = format!(
        "oifname {ROUTER_SERVER_IF} icmp type echo-request limit rate over {ECHO_LIMIT}/second counter drop"
    );
    let mut args = vec!["nft", "add", "rule", "inet", "echo_limit", "forward"];
    args.extend(rule.split_whitespace());
    router.exec_ok(&args);
    let rule = format!("oifname {ROUTER_SERVER_IF} icmp type echo-request counter accept");
    let mut args = vec!["nft", "add", "rule", "inet", "echo_limit", "forward"];
    args.extend(rule.split_whitespace());
    router.exec_ok(&args);

    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let _server = start_server(
        &topo.server,
        tag,
        &skey,
        &ckey,
        &["--listen", "icmp://0.0.0.0", "--nat"],
    );
    let url = format!("icmp://{SERVER_ADDR}");
    let mut client = start_client(&topo.client, tag, &ckey, &skey, &url);
    ping_eventually(&topo.client, TARGET_ADDR, Duration::from_secs(10));

    let (passed_before, dropped_before) = echo_counters(router);
    let bytes = 3 << 20;
    let (up, down) = transfer_both_ways(
        &topo.client,
        &topo.target,
        TARGET_ADDR,
        bytes,
        Duration::from_secs(90),
        "ICMP through a limit of 300 echo requests a second",
    );
    let (passed, dropped) = echo_counters(router);
    let (passed, dropped) = (passed - passed_before, dropped - dropped_before);

    // One TCP segment (MTU 1420, less IPv4, TCP and timestamps) a request.
    let allowed = (ECHO_LIMIT * 1368 * 8) as f64 / 1e6;
    let (up, down) = (mbit_per_s(bytes, up), mbit_per_s(bytes, down));
    let share = dropped as f64 / (passed + dropped) as f64;
    let status = client.status_ok();
    let detail = &status["sessions"][0]["path"];
    eprintln!(
        "{up:.2} Mbit/s up, {down:.2} down of {allowed:.2} allowed; the limit dropped \
         {dropped} of {} requests ({:.1} %); client path: {detail}",
        passed + dropped,
        share * 100.0
    );
    assert!(up >= 0.7 * allowed, "{up:.2} Mbit/s up of {allowed:.2}");
    assert!(
        down >= 0.7 * allowed,
        "{down:.2} Mbit/s down of {allowed:.2}"
    );
    assert!(share < 0.1, "the firewall dropped {:.1} %", share * 100.0);
    // The status shows the pacing near the limit, the window, and what the
    // limit cost.
    let rate = detail["rate"].as_u64().expect("a pacing rate");
    assert!(
        (ECHO_LIMIT / 2..=ECHO_LIMIT * 2).contains(&rate),
        "pacing at {rate} a second: {detail}"
    );
    assert!(
        detail["window"].as_u64().is_some_and(|w| w >= 2),
        "{detail}"
    );
    assert!(detail["lost"].as_u64().is_some_and(|n| n > 0), "{detail}");
    assert!(detail["unanswered"].as_u64().is_some(), "{detail}");
    client.assert_running();
}

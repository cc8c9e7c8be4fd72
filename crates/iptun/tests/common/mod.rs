//! Harness for end-to-end tests in network namespaces (plain std: tests may panic).
//!
//! Every namespace is named `ipt<pid>-<tag>-<role>` so that test binaries and
//! tests running in parallel don't collide; guards delete what they created
//! even when a test panics, and a leftover of the same name is removed first.
#![allow(dead_code)] // each test binary uses a different part of this

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub mod daemon;
pub mod http;
pub mod line;
pub mod unbound;

/// Panics unless we are root: a silent skip would hide failures in CI.
pub fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    // "Uid:\treal\teffective\t..."
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1));
    assert_eq!(
        euid,
        Some("0"),
        "these tests need root (network namespaces, TUN devices, nftables): run them as root"
    );
}

/// The `iptun` binary under test.
pub fn iptun_bin() -> &'static str {
    env!("CARGO_BIN_EXE_iptun")
}

/// Prefix of every namespace a test with this tag creates.
pub fn ns_prefix(tag: &str) -> String {
    format!("ipt{}-{tag}-", std::process::id() % 100_000)
}

/// Names of the network namespaces that start with `prefix`.
pub fn list_netns(prefix: &str) -> Vec<String> {
    let out = run_ok(&["ip", "netns", "list"]);
    // Lines look like "name (id: 3)" or just "name".
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

fn output_text(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command on the host (e.g. `ip netns add`); panics if it can't start.
pub fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
}

/// Runs a command on the host and returns its stdout; panics on failure.
pub fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Kills everything inside namespace `name` and deletes it; quiet if it doesn't exist.
fn remove_netns(name: &str) {
    let pids = run(&["ip", "netns", "pids", name]);
    if !pids.status.success() {
        return; // no such namespace
    }
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        run(&["kill", "-KILL", pid]);
    }
    let out = run(&["ip", "netns", "del", name]);
    if !out.status.success() {
        // No panic: we may be in a Drop while unwinding.
        eprintln!("cannot delete namespace {name}: {}", output_text(&out));
    }
}

/// A network namespace, deleted (with every process in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates namespace `ipt<pid>-<tag>-<role>` with `lo` up.
    pub fn new(tag: &str, role: &str) -> Self {
        Self::named(&format!("{}{role}", ns_prefix(tag)))
    }

    /// Creates a namespace with this exact name, replacing a stale one.
    pub fn named(name: &str) -> Self {
        remove_netns(name);
        run_ok(&["ip", "netns", "add", name]);
        let ns = Self {
            name: name.to_string(),
        };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Pids of the processes inside the namespace.
    pub fn pids(&self) -> Vec<u32> {
        let out = run_ok(&["ip", "netns", "pids", &self.name]);
        out.split_whitespace()
            .map(|p| p.parse().expect("pid"))
            .collect()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs a command inside the namespace and waits for it.
    pub fn exec(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {args:?} in {}: {e}", self.name))
    }

    /// Like `exec`, but panics with stdout and stderr on failure; returns stdout.
    pub fn exec_ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "{args:?} in {} failed: {}",
            self.name,
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a long-running command (a daemon) inside the namespace; its
    /// stdout and stderr go to a log file. Killed when the guard is dropped.
    pub fn spawn(&self, args: &[&str]) -> Proc {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let log_path = std::env::temp_dir().join(format!("{}-{seq}.log", self.name));
        let log = std::fs::File::create(&log_path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
        let child = self
            .command(args)
            .stdout(log.try_clone().expect("dup log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {args:?} in {}: {e}", self.name));
        Proc {
            child,
            log_path,
            what: format!("{args:?} in {}", self.name),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The state at the failure helps more than the test's message alone.
            for args in [
                &["ip", "-br", "addr"][..],
                &["ip", "route"],
                &["ip", "-6", "route"],
            ] {
                let out = self.exec(args);
                eprintln!(
                    "--- {} {args:?}:\n{}",
                    self.name,
                    String::from_utf8_lossy(&out.stdout)
                );
            }
        }
        remove_netns(&self.name);
    }
}

/// A process started by `Netns::spawn`; killed on drop, and its log printed
/// if the test is panicking.
pub struct Proc {
    child: Child,
    log_path: PathBuf,
    what: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process has written to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Sends a signal by name (`TERM`, `INT`, `HUP`, ...).
    pub fn signal(&self, sig: &str) {
        run(&["kill", &format!("-{sig}"), &self.pid().to_string()]);
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Graceful stop: SIGTERM, then waits; panics (with the log) if it hangs.
    pub fn stop(&mut self, timeout: Duration) -> ExitStatus {
        self.signal("TERM");
        let status = self.wait_timeout(timeout);
        status.unwrap_or_else(|| panic!("{} did not exit within {timeout:?} of SIGTERM", self.what))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- log of {}:\n{}--- end of log", self.what, self.log());
        }
        let _ = std::fs::remove_file(&self.log_path);
    }
}

/// Polls `f` every 50 ms until it returns true; panics with `what` on timeout.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Joins two namespaces with a veth pair (created directly inside them, so
/// names only need to be unique per namespace) and brings both ends up.
pub fn veth(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) {
    run_ok(&[
        "ip", "-n", &a.name, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns",
        &b.name,
    ]);
    for (ns, dev, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        run_ok(&["ip", "-n", &ns.name, "addr", "add", addr, "dev", dev]);
        run_ok(&["ip", "-n", &ns.name, "link", "set", dev, "up"]);
    }
}

/// Target's address, on the server's side network.
pub const TARGET_ADDR: &str = "198.51.100.2";
/// Server's address facing the target.
pub const SERVER_WAN_ADDR: &str = "198.51.100.1";
/// Interface names: the client's uplink, the server's side to the target,
/// the target's only interface. The server's side to client N is `cliN`.
pub const CLIENT_IF: &str = "eth0";
pub const SERVER_WAN_IF: &str = "wan0";
pub const TARGET_IF: &str = "eth0";

/// One client namespace and its own link to the server.
pub struct Client {
    pub ns: Netns,
    /// The client's address, e.g. "192.0.2.2".
    pub addr: String,
    /// The server's address on this client's link, e.g. "192.0.2.1".
    pub server_addr: String,
}

/// client(s) <-> server <-> target. Each client has its own /24 to the server
/// (192.0.2.0/24, 203.0.113.0/24, then 10.200.N.0/24); the server and target
/// share 198.51.100.0/24. Nothing forwards (ip_forward is 0 in a new
/// namespace) and the target has no route back to the tunnel pool, so
/// client -> target works only through the tunnel with NAT.
pub struct Topology {
    pub tag: String,
    pub clients: Vec<Client>,
    pub server: Netns,
    pub target: Netns,
}

impl Topology {
    pub fn new(tag: &str) -> Self {
        let server = Netns::new(tag, "server");
        let target = Netns::new(tag, "target");
        veth(
            &server,
            SERVER_WAN_IF,
            &format!("{SERVER_WAN_ADDR}/24"),
            &target,
            TARGET_IF,
            &format!("{TARGET_ADDR}/24"),
        );
        let mut topo = Self {
            tag: tag.to_string(),
            clients: Vec::new(),
            server,
            target,
        };
        topo.add_client(0);
        topo
    }

    /// Adds client `idx` (namespace role `cN`); clients are added in order.
    pub fn add_client(&mut self, idx: usize) -> &Client {
        assert_eq!(idx, self.clients.len(), "add clients in order");
        let net = match idx {
            0 => "192.0.2".to_string(),
            1 => "203.0.113".to_string(),
            n => format!("10.200.{n}"),
        };
        let ns = Netns::new(&self.tag, &format!("c{idx}"));
        let (addr, server_addr) = (format!("{net}.2"), format!("{net}.1"));
        veth(
            &ns,
            CLIENT_IF,
            &format!("{addr}/24"),
            &self.server,
            &format!("cli{idx}"),
            &format!("{server_addr}/24"),
        );
        self.clients.push(Client {
            ns,
            addr,
            server_addr,
        });
        &self.clients[idx]
    }

    /// The first client's namespace.
    pub fn client(&self) -> &Netns {
        &self.clients[0].ns
    }

    /// The server's address as seen by the first client.
    pub fn server_addr(&self) -> &str {
        &self.clients[0].server_addr
    }
}

/// Whether `dst` answers at least one of `count` pings from `ns`.
pub fn ping(ns: &Netns, dst: &str, count: u32) -> bool {
    let count = count.to_string();
    ns.exec(&[
        "ping", "-q", "-n", "-c", &count, "-i", "0.2", "-W", "1", dst,
    ])
    .status
    .success()
}

/// The Python interpreter for the tests' helper scripts.
pub fn python() -> &'static str {
    // The system interpreter starts faster than a pyenv shim, if both exist.
    if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

const RECEIVER_PY: &str = r#"
import hashlib, socket
try:
    s = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
except OSError:
    s = socket.create_server(("0.0.0.0", 0))
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
h, n = hashlib.sha256(), 0
while b := c.recv(1 << 16):
    h.update(b)
    n += len(b)
c.close()
print("sha256", h.hexdigest(), n, flush=True)
"#;

const SENDER_PY: &str = r#"
import hashlib, random, socket, sys, time
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rate = int(sys.argv[4]) if len(sys.argv) > 4 else 0  # bytes a second, 0: as fast as it goes
rng, h = random.Random(n), hashlib.sha256()
c = socket.create_connection((addr, port), timeout=30)
left, start = n, time.monotonic()
while left:
    b = rng.randbytes(min(left, 1 << 14 if rate else 1 << 16))
    left -= len(b)
    h.update(b)
    c.sendall(b)
    if rate:
        ahead = (n - left) / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
c.shutdown(socket.SHUT_WR)
while c.recv(1 << 16):  # the receiver closes once it has read everything
    pass
print("sha256", h.hexdigest(), n, flush=True)
"#;

/// The `sha256 HEX N` line of a transfer script's output.
fn sha_line(log: &str) -> Option<String> {
    log.lines()
        .find_map(|l| l.strip_prefix("sha256 "))
        .map(str::to_string)
}

/// Sends `bytes` seeded pseudo-random bytes over TCP from `from` to a
/// receiver in `to` listening on `to_addr`; returns (sent, received) as
/// "SHA256HEX BYTECOUNT", which a test compares. Bounded to 60 s.
pub fn tcp_transfer_sha256(
    from: &Netns,
    to: &Netns,
    to_addr: &str,
    bytes: u64,
) -> (String, String) {
    tcp_transfer_sha256_timeout(from, to, to_addr, bytes, Duration::from_secs(60))
}

pub fn tcp_transfer_sha256_timeout(
    from: &Netns,
    to: &Netns,
    to_addr: &str,
    bytes: u64,
    timeout: Duration,
) -> (String, String) {
    tcp_transfer_sha256_paced(from, to, to_addr, bytes, 0, timeout)
}

/// [`tcp_transfer_sha256`] at `rate` bytes a second at most (0: no limit),
/// so a transfer can span events a test makes meanwhile.
pub fn tcp_transfer_sha256_paced(
    from: &Netns,
    to: &Netns,
    to_addr: &str,
    bytes: u64,
    rate: u64,
    timeout: Duration,
) -> (String, String) {
    let secs = timeout.as_secs().max(1).to_string();
    let mut receiver = to.spawn(&["timeout", &secs, python(), "-c", RECEIVER_PY]);
    let mut port = String::new();
    wait_until(Duration::from_secs(10), "the receiver to listen", || {
        let log = receiver.log();
        match log.lines().next() {
            Some(line) if log.contains('\n') => port = line.trim().to_string(),
            _ => assert!(receiver.try_wait().is_none(), "receiver died: {log}"),
        }
        !port.is_empty()
    });
    let (bytes, rate) = (bytes.to_string(), rate.to_string());
    let sent = from.exec_ok(&[
        "timeout",
        &secs,
        python(),
        "-c",
        SENDER_PY,
        to_addr,
        &port,
        &bytes,
        &rate,
    ]);
    let status = receiver.wait_timeout(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "receiver did not finish: {status:?}\n{}",
        receiver.log()
    );
    let sent = sha_line(&sent).unwrap_or_else(|| panic!("sender printed no sha256: {sent}"));
    let received = sha_line(&receiver.log())
        .unwrap_or_else(|| panic!("receiver printed no sha256: {}", receiver.log()));
    (sent, received)
}

/// Addresses of [`RoutedTopology`].
pub mod routed {
    /// The client's address and the router's on the client side.
    pub const CLIENT_ADDR: &str = "192.0.2.2";
    pub const CLIENT_ADDR6: &str = "2001:db8:1::2";
    pub const ROUTER_CLIENT_ADDR: &str = "192.0.2.1";
    pub const ROUTER_CLIENT_ADDR6: &str = "2001:db8:1::1";
    /// The router's address on the server side: what the server sees of the
    /// client, the router masquerading it.
    pub const ROUTER_SERVER_ADDR: &str = "203.0.113.1";
    pub const ROUTER_SERVER_ADDR6: &str = "2001:db8:2::1";
    /// The server's address on the router's side.
    pub const SERVER_ADDR: &str = "203.0.113.2";
    pub const SERVER_ADDR6: &str = "2001:db8:2::2";
    /// Interfaces: the router's sides, the server's uplink.
    pub const ROUTER_CLIENT_IF: &str = "rcl0";
    pub const ROUTER_SERVER_IF: &str = "rsv0";
    pub const SERVER_UP_IF: &str = "up0";
}

/// The router's nftables: masquerade what the client side sends to the
/// server side, and forward only that and its answers (conntrack).
const ROUTER_NFT: &str = r#"
table inet iptrouter {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        iifname "rcl0" oifname "rsv0" masquerade
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "rcl0" oifname "rsv0" accept
    }
}
"#;

/// client <-> router <-> server <-> target, with a masquerading, stateful
/// router between client and server (like a home router):
/// client 192.0.2.2 / 2001:db8:1::2, router 192.0.2.1 / 2001:db8:1::1 and
/// 203.0.113.1 / 2001:db8:2::1, server 203.0.113.2 / 2001:db8:2::2 and
/// 198.51.100.1, target 198.51.100.2 (see [`routed`]). The client's default
/// routes point at the router; the server knows nothing of 192.0.2.0/24 and
/// the target nothing beyond 198.51.100.0/24. The router forwards client ->
/// server and the answers only (conntrack), masquerading (which rewrites
/// ICMP echo identifiers too).
pub struct RoutedTopology {
    pub client: Netns,
    pub router: Netns,
    pub server: Netns,
    pub target: Netns,
}

impl RoutedTopology {
    /// Builds the topology and waits (bounded) until the client reaches the
    /// server over IPv4 and IPv6 through the router.
    pub fn new(tag: &str) -> Self {
        use routed::*;
        let [client, router, server, target] =
            ["client", "router", "server", "target"].map(|role| Netns::new(tag, role));
        for ns in [&client, &router, &server, &target] {
            // No duplicate address detection: addresses are usable at once.
            for conf in ["all", "default"] {
                ns.exec_ok(&[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{conf}.accept_dad=0"),
                ]);
            }
        }
        veth(
            &client,
            CLIENT_IF,
            &format!("{CLIENT_ADDR}/24"),
            &router,
            ROUTER_CLIENT_IF,
            &format!("{ROUTER_CLIENT_ADDR}/24"),
        );
        veth(
            &router,
            ROUTER_SERVER_IF,
            &format!("{ROUTER_SERVER_ADDR}/24"),
            &server,
            SERVER_UP_IF,
            &format!("{SERVER_ADDR}/24"),
        );
        veth(
            &server,
            SERVER_WAN_IF,
            &format!("{SERVER_WAN_ADDR}/24"),
            &target,
            TARGET_IF,
            &format!("{TARGET_ADDR}/24"),
        );
        for (ns, dev, addr) in [
            (&client, CLIENT_IF, CLIENT_ADDR6),
            (&router, ROUTER_CLIENT_IF, ROUTER_CLIENT_ADDR6),
            (&router, ROUTER_SERVER_IF, ROUTER_SERVER_ADDR6),
            (&server, SERVER_UP_IF, SERVER_ADDR6),
        ] {
            ns.exec_ok(&["ip", "addr", "add", &format!("{addr}/64"), "dev", dev]);
        }
        client.exec_ok(&["ip", "route", "add", "default", "via", ROUTER_CLIENT_ADDR]);
        client.exec_ok(&[
            "ip",
            "-6",
            "route",
            "add",
            "default",
            "via",
            ROUTER_CLIENT_ADDR6,
        ]);
        router.exec_ok(&[
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ]);
        let mut nft = Command::new("ip")
            .args(["netns", "exec", &router.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("run nft");
        use std::io::Write as _;
        nft.stdin
            .take()
            .expect("stdin")
            .write_all(ROUTER_NFT.as_bytes())
            .expect("write the router's ruleset");
        assert!(nft.wait().expect("wait for nft").success(), "nft -f failed");
        let topo = Self {
            client,
            router,
            server,
            target,
        };
        for dst in [SERVER_ADDR, SERVER_ADDR6] {
            wait_until(
                Duration::from_secs(10),
                &format!("the client to reach {dst} through the router"),
                || ping(&topo.client, dst, 1),
            );
        }
        topo
    }
}

const FETCH_PY: &str = r#"
import hashlib, socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
h, n = hashlib.sha256(), 0
while b := c.recv(1 << 16):
    h.update(b)
    n += len(b)
c.close()
print("sha256", h.hexdigest(), n, flush=True)
"#;

const SERVE_PY: &str = r#"
import hashlib, random, socket, sys
n = int(sys.argv[1])
try:
    s = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
except OSError:
    s = socket.create_server(("0.0.0.0", 0))
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
rng, h = random.Random(n), hashlib.sha256()
left = n
while left:
    b = rng.randbytes(min(left, 1 << 16))
    left -= len(b)
    h.update(b)
    c.sendall(b)
c.shutdown(socket.SHUT_WR)
while c.recv(1 << 16):  # the fetcher closes once it has read everything
    pass
c.close()
print("sha256", h.hexdigest(), n, flush=True)
"#;

/// Both ends of a transfer agree: same sha256 and byte count, and `bytes` of them.
pub fn assert_same_transfer(sent: &str, received: &str, bytes: u64) {
    assert_eq!(sent, received, "sha256 and byte count, sent vs received");
    assert!(sent.ends_with(&format!(" {bytes}")), "{sent}");
}

/// Eight transfers of `each` bytes at once from `from` through `client`'s
/// tunnel (a `--workers 2` client), each checked intact, repeated with new
/// flows until each of the client's two loops read a share of them (the
/// flow hash may put all eight on one queue, once in 128). A share, not
/// the odd packet a flow sends before the kernel learned where it goes:
/// every packet from the server is written on the first queue. Returns
/// the packets each loop read.
pub fn transfers_over_two_queues(
    client: &mut daemon::Daemon,
    from: &Netns,
    to: &Netns,
    to_addr: &str,
    each: u64,
) -> Vec<u64> {
    for round in 0.. {
        std::thread::scope(|s| {
            let running: Vec<_> = (0..8)
                .map(|_| s.spawn(|| tcp_transfer_sha256(from, to, to_addr, each)))
                .collect();
            for t in running {
                let (sent, received) = t.join().unwrap();
                assert_same_transfer(&sent, &received, each);
            }
        });
        let status = client.status_ok();
        let loops = status["workers"].as_array().expect("workers").clone();
        assert_eq!(loops.len(), 2, "{status:#}");
        let read: Vec<u64> = loops
            .iter()
            .map(|w| w["tun_packets"].as_u64().unwrap())
            .collect();
        eprintln!("round {round}: packets read per loop {read:?}");
        let total: u64 = read.iter().sum();
        if read.iter().all(|&n| n * 20 > total) {
            return read;
        }
        assert!(
            round < 3,
            "the flows never spread over both queues: {status:#}"
        );
    }
    unreachable!()
}

/// `bytes` from `client` to the target and `bytes` back (on a connection the
/// client opens: the target may have no way to reach it), each checked by
/// sha256, each within `timeout`; prints the rates under `what` and
/// returns the two durations.
pub fn transfer_both_ways(
    client: &Netns,
    target: &Netns,
    target_addr: &str,
    bytes: u64,
    timeout: Duration,
    what: &str,
) -> (Duration, Duration) {
    let started = Instant::now();
    let (sent, received) = tcp_transfer_sha256_timeout(client, target, target_addr, bytes, timeout);
    let up = started.elapsed();
    assert_same_transfer(&sent, &received, bytes);
    let started = Instant::now();
    let (sent, received) = tcp_fetch_sha256(client, target, target_addr, bytes, timeout);
    let down = started.elapsed();
    assert_same_transfer(&sent, &received, bytes);
    let mbit = |took: Duration| bytes as f64 * 8.0 / took.as_secs_f64() / 1e6;
    eprintln!(
        "{what}: {bytes} bytes up in {up:.2?} ({:.2} Mbit/s), down in {down:.2?} ({:.2} Mbit/s)",
        mbit(up),
        mbit(down)
    );
    (up, down)
}

/// The reverse of [`tcp_transfer_sha256`] for a `from` that can't be
/// reached (behind NAT): `from` connects to a server in `to` listening on
/// `to_addr`, which sends `bytes` seeded pseudo-random bytes. Returns (sent
/// by `to`, received by `from`) as "SHA256HEX BYTECOUNT". Bounded to `timeout`.
pub fn tcp_fetch_sha256(
    from: &Netns,
    to: &Netns,
    to_addr: &str,
    bytes: u64,
    timeout: Duration,
) -> (String, String) {
    let secs = timeout.as_secs().max(1).to_string();
    let bytes = bytes.to_string();
    let mut server = to.spawn(&["timeout", &secs, python(), "-c", SERVE_PY, &bytes]);
    let mut port = String::new();
    wait_until(Duration::from_secs(10), "the sender to listen", || {
        let log = server.log();
        match log.lines().next() {
            Some(line) if log.contains('\n') => port = line.trim().to_string(),
            _ => assert!(server.try_wait().is_none(), "sender died: {log}"),
        }
        !port.is_empty()
    });
    let received = from.exec_ok(&["timeout", &secs, python(), "-c", FETCH_PY, to_addr, &port]);
    let status = server.wait_timeout(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "sender did not finish: {status:?}\n{}",
        server.log()
    );
    let received =
        sha_line(&received).unwrap_or_else(|| panic!("fetcher printed no sha256: {received}"));
    let sent = sha_line(&server.log())
        .unwrap_or_else(|| panic!("sender printed no sha256: {}", server.log()));
    (sent, received)
}

// ------------------------------------------------ daemons' files

/// A directory for one test's key and config files, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}files", ns_prefix(tag)));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self(path)
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A key pair: the private key in a file, the public key as base64.
pub struct Key {
    pub file: PathBuf,
    pub public: String,
}

impl Key {
    /// `iptun genkey > DIR/NAME.key` and `iptun pubkey < DIR/NAME.key`.
    pub fn generate(dir: &TempDir, name: &str) -> Self {
        let out = Command::new(iptun_bin())
            .arg("genkey")
            .stdin(Stdio::null())
            .output()
            .expect("run iptun genkey");
        assert!(out.status.success(), "iptun genkey: {out:?}");
        let file = dir.file(&format!("{name}.key"));
        std::fs::write(&file, &out.stdout).expect("write key file");
        let out = Command::new(iptun_bin())
            .arg("pubkey")
            .stdin(std::fs::File::open(&file).expect("open key file"))
            .output()
            .expect("run iptun pubkey");
        assert!(out.status.success(), "iptun pubkey: {out:?}");
        let public = String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_string();
        assert_eq!(public.len(), 44, "a base64 X25519 key: {public:?}");
        Self { file, public }
    }

    pub fn path(&self) -> &str {
        self.file.to_str().expect("utf-8 path")
    }
}

/// A unique control socket path for daemon `role` of test `tag`.
pub fn control_path(tag: &str, role: &str) -> PathBuf {
    PathBuf::from(format!("/run/iptun/{}{role}.sock", ns_prefix(tag)))
}

/// Removes a file on drop (a control socket left by a killed daemon).
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

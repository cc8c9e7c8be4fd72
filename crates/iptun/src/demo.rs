//! `iptun demo`: a real tunnel on one machine. It builds three throwaway
//! network namespaces — a client, a server and a target host behind the
//! server — runs `iptun server --nat` on all four transports (UDP, ICMP
//! echo, DNS, HTTPS) and `iptun client` given all four URLs, pings the
//! target through the tunnel, measures one TCP stream, then (with nftables)
//! blocks UDP, then ICMP, on the server while a ping runs, printing each
//! move of the session and the pings it cost; shows `iptun status` and
//! removes everything, also when interrupted.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use iptun_proto::crypto::PrivateKey;

use crate::cli::{DemoArgs, DemoSinkArgs, DemoSourceArgs};

const CLIENT: &str = "iptdemo-client";
const SERVER: &str = "iptdemo-server";
const TARGET: &str = "iptdemo-target";
const TARGET_ADDR: &str = "198.51.100.2";

/// Removes the namespaces (and so everything in them) when dropped.
struct Namespaces;

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in [CLIENT, SERVER, TARGET] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Stops a daemon with SIGTERM (so it cleans up) when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn in_ns(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["ip", "netns", "exec", ns];
    all.extend_from_slice(args);
    sh(&all)
}

fn link(
    a: &str,
    a_if: &str,
    a_addr: &str,
    b: &str,
    b_if: &str,
    b_addr: &str,
) -> anyhow::Result<()> {
    sh(&[
        "ip", "link", "add", a_if, "netns", a, "type", "veth", "peer", "name", b_if, "netns", b,
    ])?;
    in_ns(a, &["ip", "addr", "add", a_addr, "dev", a_if])?;
    in_ns(b, &["ip", "addr", "add", b_addr, "dev", b_if])?;
    in_ns(a, &["ip", "link", "set", a_if, "up"])?;
    in_ns(b, &["ip", "link", "set", b_if, "up"])?;
    Ok(())
}

/// Run the demo.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "the demo creates network namespaces: run it as root"
    );
    let exe = std::env::current_exe().context("finding the iptun binary")?;
    let exe = exe.to_str().context("binary path is not UTF-8")?;
    drop(Namespaces); // leftovers of an interrupted run
    let _cleanup = Namespaces;
    println!(
        "== building namespaces: {CLIENT} (192.0.2.2) -- {SERVER} (192.0.2.1, 198.51.100.1) -- {TARGET} ({TARGET_ADDR})"
    );
    for ns in [CLIENT, SERVER, TARGET] {
        sh(&["ip", "netns", "add", ns])?;
        in_ns(ns, &["ip", "link", "set", "lo", "up"])?;
    }
    link(
        CLIENT,
        "eth0",
        "192.0.2.2/24",
        SERVER,
        "eth0",
        "192.0.2.1/24",
    )?;
    link(
        SERVER,
        "eth1",
        "198.51.100.1/24",
        TARGET,
        "eth0",
        "198.51.100.2/24",
    )?;

    let dir = std::env::temp_dir().join(format!("iptun-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (server_key, client_key) = (PrivateKey::generate(), PrivateKey::generate());
    let (server_file, client_file) = (dir.join("server.key"), dir.join("client.key"));
    std::fs::write(&server_file, server_key.to_base64())?;
    std::fs::write(&client_file, client_key.to_base64())?;
    let log = |name: &str| std::fs::File::create(dir.join(name)).map(Stdio::from);

    // NAT needs nftables; without it the target routes the pool back instead.
    let nat = Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if nat {
        println!("== starting the server (NAT to the target network) and the client");
    } else {
        println!("== nft not found: the target routes the tunnel pool back instead of NAT");
        in_ns(
            TARGET,
            &["ip", "route", "add", "10.1.0.0/24", "via", "198.51.100.1"],
        )?;
        // /proc/sys/net is per namespace: this touches only the demo's server.
        in_ns(
            SERVER,
            &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"],
        )?;
    }
    let server = Daemon(
        Command::new("ip")
            .args(["netns", "exec", SERVER, exe, "server"])
            .args(nat.then_some("--nat"))
            .args([
                "--private-key",
                server_file.to_str().unwrap(),
                "--allow",
                &client_key.public_key().to_base64(),
            ])
            .args(LISTEN.iter().flat_map(|l| ["--listen", l]))
            .stderr(log("server.log")?)
            .spawn()
            .context("starting the server")?,
    );
    let pin = server_pin(&dir.join("server.log"))?;
    println!("   listening on {}", LISTEN.join(", "));
    let client = Daemon(
        Command::new("ip")
            .args(["netns", "exec", CLIENT, exe, "client"])
            .args(SERVERS.iter().flat_map(|s| ["--server", s]))
            .args(["--tls-pin", &pin, "--proxy", "none"])
            .args([
                "--private-key",
                client_file.to_str().unwrap(),
                "--server-key",
                &server_key.public_key().to_base64(),
            ])
            .args(["--route", "198.51.100.0/24"])
            .stderr(log("client.log")?)
            .spawn()
            .context("starting the client")?,
    );
    println!(
        "   client given, most preferred first: {}",
        SERVERS.join(", ")
    );
    let result = show(exe, args.seconds).and_then(|()| {
        if nat {
            fall_back(exe)
        } else {
            println!(
                "== nft not found: skipping the fallback part (it blocks transports with nftables)"
            );
            Ok(())
        }
    });
    if result.is_ok() {
        println!("== iptun status (client)");
        print!("{}", in_ns(CLIENT, &[exe, "status"])?);
        println!("== iptun status (server)");
        print!("{}", in_ns(SERVER, &[exe, "status"])?);
    }
    drop((client, server));
    if result.is_err() {
        for name in ["server.log", "client.log"] {
            eprintln!(
                "--- {name}:\n{}",
                std::fs::read_to_string(dir.join(name)).unwrap_or_default()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("== removed the namespaces");
    result
}

fn show(exe: &str, seconds: u64) -> anyhow::Result<()> {
    // Ready once the client has both its address and its route (added just after).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let route =
            in_ns(CLIENT, &["ip", "-4", "route", "show", "198.51.100.0/24"]).unwrap_or_default();
        let addr =
            in_ns(CLIENT, &["ip", "-4", "-o", "addr", "show", "dev", "iptun0"]).unwrap_or_default();
        if let (true, Some(a)) = (
            route.contains("iptun0"),
            addr.split_whitespace().skip_while(|w| *w != "inet").nth(1),
        ) {
            println!("== client got tunnel address {a}");
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the client got no tunnel address within 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("== ping {TARGET_ADDR} from the client, through the tunnel");
    match in_ns(
        CLIENT,
        &["ping", "-c", "3", "-i", "0.2", "-W", "2", TARGET_ADDR],
    ) {
        Ok(out) => print!("{out}"),
        Err(e) if e.to_string().contains("running") => println!("(ping is not installed; skipped)"),
        Err(e) => return Err(e),
    }
    println!("== one TCP stream, client -> target, {seconds} s");
    let mut sink = Command::new("ip")
        .args([
            "netns",
            "exec",
            TARGET,
            exe,
            "demo-sink",
            &format!("{TARGET_ADDR}:5201"),
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let rate = in_ns(
        CLIENT,
        &[
            exe,
            "demo-source",
            &format!("{TARGET_ADDR}:5201"),
            &seconds.to_string(),
        ],
    );
    let _ = sink.wait();
    println!("   {}", rate?.trim());
    Ok(())
}

/// The server's transports, and the client's URLs for them.
const LISTEN: [&str; 4] = [
    "udp://0.0.0.0:3000",
    "icmp://0.0.0.0",
    "dns://192.0.2.1:53?domain=tunnel.demo",
    "https://192.0.2.1:443/tunnel",
];
const SERVERS: [&str; 4] = [
    "udp://192.0.2.1:3000",
    "icmp://192.0.2.1",
    "https://192.0.2.1/tunnel",
    "dns://tunnel.demo?resolver=192.0.2.1",
];

/// The pin the server logs for its self-signed certificate.
fn server_pin(log: &std::path::Path) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(pin) = text
            .lines()
            .find_map(|l| l.split("TLS certificate pin: ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
        {
            return Ok(pin.to_owned());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the server did not start:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Block UDP, then ICMP, on the server while a ping runs (10 a second);
/// print each move the client makes and the pings it cost.
fn fall_back(exe: &str) -> anyhow::Result<()> {
    println!("== fallback: a ping runs (10 a second) while the server blocks transports");
    let pinger = Pinger::start()?;
    std::thread::sleep(Duration::from_secs(2));
    in_ns(SERVER, &["nft", "add", "table", "inet", "iptdemo"])?;
    let hook = "{ type filter hook input priority -10; }";
    in_ns(
        SERVER,
        &["nft", "add", "chain", "inet", "iptdemo", "block", hook],
    )?;
    for (what, rule) in [
        ("UDP", "udp dport 3000 drop"),
        ("ICMP echo", "icmp type echo-request drop"),
    ] {
        let blocked = Instant::now();
        let mut args = vec![
            "nft", "add", "rule", "inet", "iptdemo", "block", "iifname", "eth0",
        ];
        args.extend(rule.split_whitespace());
        in_ns(SERVER, &args)?;
        println!("   blocked {what} on the server");
        let before = transport(exe)?;
        let deadline = blocked + Duration::from_secs(20);
        let after = loop {
            let now = transport(exe)?;
            if now != before {
                break now;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the client did not move within 20 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        std::thread::sleep(Duration::from_millis(1500)); // the pings after the move come back
        let (lost, sent) = pinger.lost_since(blocked, Instant::now() - Duration::from_secs(1));
        println!(
            "   moved {before} -> {after} {:.1} s after the block; pings lost: {lost} of {sent} ({} ms without answers)",
            blocked.elapsed().as_secs_f64() - 1.5,
            lost * 100
        );
    }
    println!(
        "   (the client probes the blocked transports now and then, and moves back when one works again)"
    );
    drop(pinger);
    Ok(())
}

/// The client's transport in use.
fn transport(exe: &str) -> anyhow::Result<String> {
    let json = in_ns(CLIENT, &[exe, "status", "--json"])?;
    let st: serde_json::Value = serde_json::from_str(&json)?;
    Ok(st[0]["sessions"][0]["transport"]
        .as_str()
        .unwrap_or("?")
        .to_owned())
}

/// `ping -i 0.1` through the tunnel, its replies collected by a thread.
struct Pinger {
    child: Child,
    start: Instant,
    replies: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
}

impl Pinger {
    fn start() -> anyhow::Result<Self> {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                CLIENT,
                "ping",
                "-n",
                "-i",
                "0.1",
                TARGET_ADDR,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ping")?;
        let start = Instant::now();
        let out = child.stdout.take().context("ping's output")?;
        let replies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = replies.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let seq = line
                    .split("icmp_seq=")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|n| n.parse::<u32>().ok());
                if let Some(seq) = seq {
                    seen.lock().expect("not poisoned").push(seq);
                }
            }
        });
        Ok(Self {
            child,
            start,
            replies,
        })
    }

    /// Pings sent between `from` and `to` that got no reply, and all sent then.
    fn lost_since(&self, from: Instant, to: Instant) -> (u32, u32) {
        let seq =
            |t: Instant| (t.saturating_duration_since(self.start).as_millis() / 100) as u32 + 1;
        let (first, last) = (seq(from), seq(to));
        let replies = self.replies.lock().expect("not poisoned");
        let lost = (first..=last).filter(|s| !replies.contains(s)).count() as u32;
        (lost, last + 1 - first)
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Accept one connection and read it to the end.
pub fn sink(args: &DemoSinkArgs) -> anyhow::Result<()> {
    let listener =
        TcpListener::bind(args.listen).with_context(|| format!("binding {}", args.listen))?;
    let (mut conn, _) = listener.accept()?;
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        match conn.read(&mut buf)? {
            0 => break,
            n => total += n as u64,
        }
    }
    println!("{total}");
    Ok(())
}

/// Send for `seconds` and print the rate.
pub fn source(args: &DemoSourceArgs) -> anyhow::Result<()> {
    let mut conn = TcpStream::connect_timeout(&args.to, Duration::from_secs(5))
        .with_context(|| format!("connecting to {}", args.to))?;
    let buf = vec![0x5au8; 1 << 16];
    let start = Instant::now();
    let mut total = 0u64;
    while start.elapsed() < Duration::from_secs(args.seconds) {
        conn.write_all(&buf)?;
        total += buf.len() as u64;
    }
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest)?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{:.0} Mbit/s ({} MB in {secs:.1} s)",
        total as f64 * 8.0 / secs / 1e6,
        total / 1_000_000
    );
    Ok(())
}

//! `iptun demo`: a real tunnel on one machine. It builds three throwaway
//! network namespaces — a client, a server and a target host behind the
//! server — runs `iptun server --nat` and `iptun client` in them, pings the
//! target through the tunnel, measures one TCP stream, shows `iptun status`
//! and removes everything, also when interrupted.

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
            .stderr(log("server.log")?)
            .spawn()
            .context("starting the server")?,
    );
    std::thread::sleep(Duration::from_millis(300));
    let client = Daemon(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                CLIENT,
                exe,
                "client",
                "--server",
                "udp://192.0.2.1:3000",
            ])
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
    let result = show(exe, args.seconds);
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
    println!("== iptun status (server)");
    print!("{}", in_ns(SERVER, &[exe, "status",])?);
    Ok(())
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

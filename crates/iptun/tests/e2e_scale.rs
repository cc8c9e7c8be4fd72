//! End-to-end tests at scale and under a handshake flood: the real `iptun`
//! server in a namespace, the load generator (`examples/load.rs`, which
//! `cargo test` builds beside the test binaries) and real `iptun` clients
//! in others (see `common`).
//!
//! - 509 sessions from one generator fill a /23 pool; each session's pings
//!   come back to it alone; five more keys are refused, counted, and the
//!   others keep their data.
//! - A flood of one captured init from 50 spoofed addresses (5 000 a
//!   second: what the debug build of the server keeps up with on a busy
//!   2-core machine): a client that starts during it is up within 5 s, and
//!   an existing session keeps answering pings.
//!
//! The two run one after the other: each needs the machine's CPU.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::*;

/// The server's tunnel address with the pools used here.
const SERVER_TUN_ADDR: &str = "10.1.0.1";
/// Source addresses of the generator's sockets (a local route in the
/// client's namespace).
const LOAD_SOURCES: &str = "10.77.0.0/16";
/// Spoofed flood sources (routed back to the client's namespace, which has
/// no such address).
const SPOOFED: &str = "10.66.0.0/16";

/// Held by each test: they measure what the machine can do, one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The load generator, built by `cargo test` as an example of this crate.
fn load_bin() -> PathBuf {
    let bin = PathBuf::from(iptun_bin())
        .parent()
        .expect("target dir")
        .join("examples/load");
    assert!(
        bin.exists(),
        "{} missing: cargo build --example load -p iptun",
        bin.display()
    );
    bin
}

fn server_with_allow_file(topo: &Topology, key: &Key, allow: &str, pool: &str) -> Daemon {
    let args = [
        "server",
        "--private-key",
        key.path(),
        "--allow-file",
        allow,
        "--pool",
        pool,
    ];
    let mut d = Daemon::spawn(&topo.server, &topo.tag, "server", &args);
    d.wait_up();
    d
}

/// The server's handshake counter `result`.
fn handshakes(server: &mut Daemon, result: &str) -> u64 {
    server.status_ok()["handshakes"][result]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn five_hundred_sessions_fill_the_pool_and_the_rest_are_refused() {
    require_root();
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let tag = "scl";
    let topo = Topology::new(tag);
    let dir = TempDir::new(tag);
    let server_key = Key::generate(&dir, "server");
    let (keys, allow) = (dir.file("load.keys"), dir.file("load.allow"));
    let load = load_bin();
    let load = load.to_str().expect("utf-8 path");
    let (count, extra) = (509, 5); // a /23 holds 509 clients
    run_ok(&[
        load,
        "keys",
        "--count",
        &(count + extra).to_string(),
        "--keys",
        keys.to_str().unwrap(),
        "--allow",
        allow.to_str().unwrap(),
    ]);
    let mut server =
        server_with_allow_file(&topo, &server_key, allow.to_str().unwrap(), "10.1.0.0/23");
    let client = &topo.clients[0];
    client
        .ns
        .exec_ok(&["ip", "route", "add", "local", LOAD_SOURCES, "dev", "lo"]);
    topo.server
        .exec_ok(&["ip", "route", "add", LOAD_SOURCES, "via", &client.addr]);

    let started = Instant::now();
    let out = client.ns.exec(&[
        "timeout",
        "90",
        load,
        "sessions",
        "--server",
        &format!("{}:3000", client.server_addr),
        "--server-key",
        &server_key.public,
        "--keys",
        keys.to_str().unwrap(),
        "--count",
        &count.to_string(),
        "--extra",
        &extra.to_string(),
        "--sources",
        "10.77.0.0/27",
        "--server-pid",
        &server.pid().to_string(),
    ]);
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the generator failed:\n{report}");
    assert!(report.contains(&format!("sessions up: {count} of {count}")));
    assert!(report.contains("echo replies delivered to the wrong session: 0"));
    assert!(started.elapsed() < Duration::from_secs(60));

    // The extra keys were refused and counted; the server still runs.
    assert!(handshakes(&mut server, "refused") >= extra as u64);
    let status = server.status_ok();
    assert_eq!(status["sessions"].as_array().map(Vec::len), Some(count));
    assert!(status["drops"]["pool_exhausted"].as_u64().unwrap_or(0) >= extra as u64);
}

#[test]
fn a_client_gets_in_during_a_handshake_flood() {
    require_root();
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let tag = "fld";
    let mut topo = Topology::new(tag);
    topo.add_client(1);
    let dir = TempDir::new(tag);
    let server_key = Key::generate(&dir, "server");
    let (old, new) = (Key::generate(&dir, "c0"), Key::generate(&dir, "c1"));
    let allow = dir.file("allow");
    std::fs::write(&allow, format!("{}\n{}\n", old.public, new.public)).expect("allow file");
    let mut server =
        server_with_allow_file(&topo, &server_key, allow.to_str().unwrap(), "10.1.0.0/24");
    let (c0, c1) = (&topo.clients[0], &topo.clients[1]);
    topo.server
        .exec_ok(&["ip", "route", "add", SPOOFED, "via", &c0.addr]);

    // The existing session.
    let mut first = start_client(&c0.ns, tag, "c0", &old, &server_key, &c0.server_addr);
    first.wait_tunnel_address(Duration::from_secs(10));
    assert!(ping(&c0.ns, SERVER_TUN_ADDR, 5), "no first session");

    // The flood, from the first client's namespace; and its pings meanwhile.
    let load = load_bin();
    let server_at = format!("{}:3000", c0.server_addr);
    let flood = c0.ns.spawn(&[
        load.to_str().unwrap(),
        "flood",
        "--server",
        &server_at,
        "--server-key",
        &server_key.public,
        "--key",
        std::fs::read_to_string(old.path()).expect("key").trim(),
        "--spoof",
        "50",
        "--secs",
        "8",
        // What the debug build of the server takes in: beyond it the kernel
        // drops at the socket, before cookies can help (bench/scale.sh
        // floods the release build as fast as the generator can).
        "--pps",
        "5000",
    ]);
    let pings = c0.ns.spawn(&[
        "ping",
        "-n",
        "-c",
        "60",
        "-i",
        "0.1",
        "-W",
        "1",
        SERVER_TUN_ADDR,
    ]);
    std::thread::sleep(Duration::from_secs(1));

    // A new client, started during the flood.
    let started = Instant::now();
    let _second = start_client(&c1.ns, tag, "c1", &new, &server_key, &c1.server_addr);
    wait_until(
        Duration::from_secs(5),
        "the new client's first ping answered",
        || {
            c1.ns
                .exec(&["ping", "-c", "1", "-W", "0.2", SERVER_TUN_ADDR])
                .status
                .success()
        },
    );
    eprintln!(
        "new client up during the flood after {:?}",
        started.elapsed()
    );

    let mut pings = pings;
    pings.wait_timeout(Duration::from_secs(15));
    let log = pings.log();
    eprintln!("{log}");
    let received: u32 = log
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| {
            l.split(", ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .expect("ping summary");
    assert!(
        received >= 50,
        "the existing session lost pings: {received} of 60"
    );
    let mut flood = flood;
    flood.wait_timeout(Duration::from_secs(10));
    eprintln!("{}", flood.log());
    assert!(
        handshakes(&mut server, "cookie_sent") > 0,
        "never under load?"
    );
    first.assert_running();
}

fn start_client(
    ns: &Netns,
    tag: &str,
    role: &str,
    key: &Key,
    server_key: &Key,
    at: &str,
) -> Daemon {
    let url = format!("udp://{at}:3000");
    let args = [
        "client",
        "--private-key",
        key.path(),
        "--server-key",
        &server_key.public,
        "--server",
        &url,
    ];
    Daemon::spawn(ns, tag, role, &args)
}

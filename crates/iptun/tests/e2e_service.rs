//! End-to-end tests of running iptun as a service: `/metrics` scraped
//! during a transfer (checked by `promtool check metrics`), the admitted
//! keys changed on SIGHUP and `iptun reload` while other sessions go on,
//! a bad allow file refused whole, the metrics port in use, the systemd
//! readiness protocol (`NOTIFY_SOCKET`) and the units in `dist/systemd`
//! (`systemd-analyze verify`).
//!
//! Same harness as `e2e_udp.rs`: namespaces, daemons with their own control
//! sockets and a key directory per test, all removed even on failure.

mod common;

use std::io::Write as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use common::daemon::Daemon;
use common::*;

/// The server's tunnel address with the default pool.
const SERVER_TUN_ADDR: &str = "10.1.0.1";
const TARGET_NET: &str = "198.51.100.0/24";
const TUNNEL_UP: Duration = Duration::from_secs(10);
const METRICS: &str = "127.0.0.1:9100";

// ---------------------------------------------------------------- helpers

/// The server, admitting the keys in `allow_file`, with `extra` flags.
fn start_server(ns: &Netns, tag: &str, key: &Key, allow_file: &Path, extra: &[&str]) -> Daemon {
    let file = allow_file.to_str().expect("utf-8 path");
    let mut args = vec!["server", "--private-key", key.path(), "--allow-file", file];
    args.extend_from_slice(extra);
    let mut d = Daemon::spawn(ns, tag, "server", &args);
    d.wait_up();
    d
}

fn client_args<'a>(key: &'a Key, server_key: &'a Key, url: &'a str) -> Vec<&'a str> {
    vec![
        "client",
        "--private-key",
        key.path(),
        "--server-key",
        &server_key.public,
        "--server",
        url,
    ]
}

/// Client `i` of `topo`, up (it has its tunnel address).
fn start_client(topo: &Topology, tag: &str, i: usize, key: &Key, server_key: &Key) -> Daemon {
    let url = format!("udp://{}:3000", topo.clients[i].server_addr);
    let args = client_args(key, server_key, &url);
    let mut d = Daemon::spawn(&topo.clients[i].ns, tag, &format!("c{i}"), &args);
    d.wait_tunnel_address(TUNNEL_UP);
    d
}

/// Write an allow file: `lines` as given (keys, comments, anything).
fn write_allow_file(path: &Path, lines: &[&str]) {
    // Written aside and renamed, as an editor or a config tool does: the
    // server never reads half a file.
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, lines.join("\n") + "\n").expect("write the allow file");
    std::fs::rename(&tmp, path).expect("rename the allow file");
}

/// `GET /metrics` from inside `ns` (bounded), with extra curl arguments.
fn scrape_with(ns: &Netns, addr: &str, extra: &[&str]) -> String {
    let url = format!("http://{addr}/metrics");
    let mut args = vec!["curl", "-sS", "--fail", "--max-time", "5"];
    args.extend_from_slice(extra);
    args.push(&url);
    ns.exec_ok(&args)
}

fn scrape(ns: &Netns, addr: &str) -> String {
    scrape_with(ns, addr, &[])
}

/// `promtool check metrics` on a scrape: the format and the naming
/// conventions (its linter: `_total` counters, base units, help texts).
fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (Debian package prometheus)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("wait for promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n--- the scrape:\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The sum of the samples of `name` whose labels include all of `labels`
/// (`None` if there is none).
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric_name, label_text) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let matches = metric_name == name
            && labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
        if matches {
            let v: f64 = value.parse().expect("a sample value");
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

fn must_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(text, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{text}"))
}

/// The server's session of the client with key `key`, if any.
fn session_of(status: &Value, key: &Key) -> Option<Value> {
    status["sessions"]
        .as_array()?
        .iter()
        .find(|s| s["key"] == key.public.as_str())
        .cloned()
}

/// When a session's latest handshake completed, as a wall-clock time, from
/// a status taken just now.
fn handshake_time(session: &Value) -> SystemTime {
    let ago = session["since_handshake_secs"]
        .as_f64()
        .unwrap_or_else(|| panic!("no handshake: {session:#}"));
    SystemTime::now() - Duration::from_secs_f64(ago)
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A service manager's notification socket (`NOTIFY_SOCKET`): what the
/// daemon under test tells systemd.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn new(dir: &TempDir) -> Self {
        let path = dir.file("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        Self { socket, path }
    }

    /// `env NOTIFY_SOCKET=...`, to run a daemon under.
    fn env(&self) -> Vec<String> {
        vec![
            "env".into(),
            format!("NOTIFY_SOCKET={}", self.path.display()),
        ]
    }

    /// The next notification (its lines), waiting up to `timeout`.
    fn next(&self, timeout: Duration) -> Option<Vec<String>> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf[..n]);
        Some(text.lines().map(str::to_string).collect())
    }

    /// Waits for a notification with line `line` (skipping others); returns it.
    fn expect(&self, line: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {line} within {timeout:?}");
            let Some(n) = self.next(left) else { continue };
            if n.iter().any(|l| l == line) {
                return n;
            }
        }
    }
}

// ---------------------------------------------------------------- tests

#[test]
fn metrics_during_a_transfer_pass_promtool_and_count_the_bytes() {
    require_root();
    let tag = "svcmet";
    let topo = Topology::new(tag);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let allow = dir.file("allow");
    write_allow_file(&allow, &[&format!("{} # the client", ckey.public)]);
    let _server = start_server(
        &topo.server,
        tag,
        &skey,
        &allow,
        &["--nat", "--metrics", METRICS],
    );
    let notify = NotifySocket::new(&dir);
    let url = format!("udp://{}:3000", topo.server_addr());
    let mut args = client_args(&ckey, &skey, &url);
    args.extend(["--route", TARGET_NET, "--metrics", METRICS]);
    let client = Daemon::spawn_wrapped(topo.client(), tag, "c0", &notify.env(), &args);
    // The client tells systemd it is ready once the tunnel is up, no sooner.
    let ready = notify.expect("READY=1", TUNNEL_UP);
    assert!(
        client.tunnel_address().is_some(),
        "READY=1 before the tunnel was up"
    );
    assert!(
        ready
            .iter()
            .any(|l| l.starts_with("STATUS=tunnel up via udp://")),
        "{ready:?}"
    );

    let before = scrape(&topo.server, METRICS);
    promtool_check(&before);
    let listener = [("transport", "udp"), ("listener", "udp://0.0.0.0:3000")];
    let rx_before = must_metric(&before, "iptun_received_bytes_total", &listener);
    assert_eq!(must_metric(&before, "iptun_sessions", &listener), 1.0);
    assert_eq!(must_metric(&before, "iptun_admitted_keys", &[]), 1.0);
    let ok = [listener[0], listener[1], ("result", "ok")];
    assert_eq!(must_metric(&before, "iptun_handshakes_total", &ok), 1.0);

    // A paced transfer, scraped (server and client) while it runs.
    const BYTES: u64 = 6 << 20;
    let transfer = std::thread::scope(|s| {
        let t = s.spawn(|| {
            tcp_transfer_sha256_paced(
                topo.client(),
                &topo.target,
                TARGET_ADDR,
                BYTES,
                3 << 20,
                Duration::from_secs(30),
            )
        });
        let mut during = Vec::new();
        while !t.is_finished() {
            during.push((
                scrape(&topo.server, METRICS),
                scrape(topo.client(), METRICS),
            ));
            std::thread::sleep(Duration::from_millis(300));
        }
        assert!(
            during.len() >= 3,
            "scraped {} times during the transfer",
            during.len()
        );
        for (server_text, client_text) in &during {
            promtool_check(server_text);
            promtool_check(client_text);
        }
        t.join().expect("the transfer")
    });
    assert_same_transfer(&transfer.0, &transfer.1, BYTES);

    let after = scrape(&topo.server, METRICS);
    promtool_check(&after);
    let rx = must_metric(&after, "iptun_received_bytes_total", &listener) - rx_before;
    assert!(
        rx >= BYTES as f64,
        "the server counted {rx} bytes of {BYTES}"
    );
    assert!(must_metric(&after, "iptun_received_packets_total", &listener) > 0.0);
    assert!(
        must_metric(&after, "iptun_sent_bytes_total", &listener) > 0.0,
        "ACKs"
    );
    // Per client, under its short key id.
    let id = &ckey.public[..8];
    let per_client = must_metric(
        &after,
        "iptun_client_received_bytes_total",
        &[("client", id)],
    );
    assert!(per_client >= BYTES as f64, "{per_client}");
    let info = [
        ("client", id),
        ("key", ckey.public.as_str()),
        ("transport", "udp"),
    ];
    assert_eq!(must_metric(&after, "iptun_client_info", &info), 1.0);

    let client_text = scrape(topo.client(), METRICS);
    promtool_check(&client_text);
    let sent = must_metric(&client_text, "iptun_sent_bytes_total", &[]);
    assert!(
        sent >= BYTES as f64,
        "the client counted {sent} bytes of {BYTES}"
    );
    let path = [("url", url.as_str()), ("transport", "udp")];
    assert_eq!(must_metric(&client_text, "iptun_path_in_use", &path), 1.0);
    let in_use = [path[0], path[1], ("state", "in_use")];
    assert_eq!(must_metric(&client_text, "iptun_path_state", &in_use), 1.0);
    assert_eq!(must_metric(&client_text, "iptun_moves_total", &[]), 0.0);
    assert_eq!(must_metric(&client_text, "iptun_tunnel_up", &[]), 1.0);

    // OpenMetrics for scrapers that ask for it; a clear 404 elsewhere.
    let om = scrape_with(
        &topo.server,
        METRICS,
        &["-H", "Accept: application/openmetrics-text; version=1.0.0"],
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    let other = topo.server.exec(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "5",
        "http://127.0.0.1:9100/",
    ]);
    assert_eq!(String::from_utf8_lossy(&other.stdout), "404");
}

#[test]
fn sighup_and_reload_change_the_admitted_keys_and_touch_no_one_else() {
    require_root();
    let tag = "svcrl";
    let mut topo = Topology::new(tag);
    topo.add_client(1);
    topo.add_client(2);
    let dir = TempDir::new(tag);
    let skey = Key::generate(&dir, "server");
    let keys = [0, 1, 2].map(|i| Key::generate(&dir, &format!("c{i}")));
    let allow = dir.file("allow");
    write_allow_file(&allow, &[&keys[0].public, "# Bob", &keys[1].public]);
    let notify = NotifySocket::new(&dir);
    let file = allow.to_str().unwrap().to_owned();
    let args = [
        "server",
        "--private-key",
        skey.path(),
        "--allow-file",
        &file,
        "--metrics",
        METRICS,
        "--metrics-no-clients",
    ];
    let mut server = Daemon::spawn_wrapped(&topo.server, tag, "server", &notify.env(), &args);
    let ready = notify.expect("READY=1", Duration::from_secs(10));
    assert!(
        server.status().is_some(),
        "READY=1 before the control socket answered"
    );
    assert!(
        ready
            .iter()
            .any(|l| l.starts_with("STATUS=serving on udp://")),
        "{ready:?}"
    );
    let mut c0 = start_client(&topo, tag, 0, &keys[0], &skey);
    let mut c1 = start_client(&topo, tag, 1, &keys[1], &skey);
    for i in [0, 1] {
        assert!(
            ping(&topo.clients[i].ns, SERVER_TUN_ADDR, 3),
            "client {i} pings"
        );
    }
    let status = server.status_ok();
    let c0_before = session_of(&status, &keys[0]).expect("c0's session");
    let c0_handshake = handshake_time(&c0_before);
    let c1_addr = session_of(&status, &keys[1]).expect("c1's session")["addresses"].clone();

    // c1 pings on while its key is removed and c2's added, on SIGHUP.
    let mut pinger =
        topo.clients[1]
            .ns
            .spawn(&["ping", "-n", "-D", "-i", "0.1", "-W", "1", SERVER_TUN_ADDR]);
    std::thread::sleep(Duration::from_secs(1));
    write_allow_file(&allow, &[&keys[0].public, &keys[2].public]);
    let hup_at = SystemTime::now();
    server.signal("HUP");
    notify.expect("RELOADING=1", Duration::from_secs(5));
    let done = notify.expect("READY=1", Duration::from_secs(5));
    assert!(
        done.iter()
            .any(|l| l.contains("1 added, 1 removed, 1 sessions ended")),
        "{done:?}"
    );
    server.wait_for(Duration::from_secs(2), "c1's session to end", |d| {
        d.status().filter(|s| session_of(s, &keys[1]).is_none())
    });
    std::thread::sleep(Duration::from_secs(3));
    pinger.signal("INT");
    pinger
        .wait_timeout(Duration::from_secs(5))
        .expect("ping stops");
    let replies: Vec<f64> = pinger
        .log()
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect();
    let hup = unix_secs(hup_at);
    assert!(
        replies.iter().any(|&t| t < hup),
        "c1's pings went through before"
    );
    let last = replies.iter().copied().fold(0.0, f64::max);
    assert!(
        last < hup + 2.0,
        "c1's pings still answered {:.2} s after SIGHUP",
        last - hup
    );

    // c2, new, connects; c0 goes on, its session untouched.
    let mut c2 = start_client(&topo, tag, 2, &keys[2], &skey);
    assert!(ping(&topo.clients[2].ns, SERVER_TUN_ADDR, 3), "c2 pings");
    assert!(ping(&topo.clients[0].ns, SERVER_TUN_ADDR, 3), "c0 pings");
    let status = server.status_ok();
    let c0_after = session_of(&status, &keys[0]).expect("c0's session");
    assert_eq!(c0_after["addresses"], c0_before["addresses"]);
    let moved = handshake_time(&c0_after)
        .duration_since(c0_handshake)
        .unwrap_or_else(|e| e.duration());
    assert!(
        moved < Duration::from_millis(500),
        "c0 shook hands again: {status:#}"
    );
    // Metrics, without per-client series as asked.
    let text = scrape(&topo.server, METRICS);
    promtool_check(&text);
    assert_eq!(must_metric(&text, "iptun_sessions", &[]), 2.0);
    assert!(!text.contains("iptun_client_"), "{text}");
    assert_eq!(must_metric(&text, "iptun_admitted_keys", &[]), 2.0);

    // `iptun reload` (the control socket): c1 is back, with its address.
    write_allow_file(&allow, &[&keys[0].public, &keys[1].public, &keys[2].public]);
    let out = topo.server.exec(&[
        iptun_bin(),
        "reload",
        "--control",
        server.control().to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "iptun reload: {out:?}");
    assert!(said.contains("1 added, 0 removed"), "{said}");
    server.wait_for(Duration::from_secs(40), "c1 to come back", |d| {
        d.status().and_then(|s| session_of(&s, &keys[1]))
    });
    let status = server.status_ok();
    assert_eq!(session_of(&status, &keys[1]).unwrap()["addresses"], c1_addr);
    wait_until(Duration::from_secs(10), "c1 to ping again", || {
        ping(&topo.clients[1].ns, SERVER_TUN_ADDR, 1)
    });
    for c in [&mut c0, &mut c1, &mut c2] {
        c.assert_running();
    }
}

#[test]
fn a_bad_allow_file_is_refused_whole_and_the_old_list_stays() {
    require_root();
    let tag = "svcbad";
    let mut topo = Topology::new(tag);
    topo.add_client(1);
    let dir = TempDir::new(tag);
    let skey = Key::generate(&dir, "server");
    let keys = [0, 1].map(|i| Key::generate(&dir, &format!("c{i}")));
    let allow = dir.file("allow");
    write_allow_file(&allow, &[&keys[0].public]);
    let mut server = start_server(&topo.server, tag, &skey, &allow, &[]);
    let _c0 = start_client(&topo, tag, 0, &keys[0], &skey);
    let before = session_of(&server.status_ok(), &keys[0]).expect("c0's session");
    let c0_handshake = handshake_time(&before);

    // c1's key on line 1, a key with a typo on line 3: nothing of it applies.
    let broken = &keys[0].public[..40];
    write_allow_file(
        &allow,
        &[&keys[1].public, "# the next key lost its end", broken],
    );
    let out = topo.server.exec(&[
        iptun_bin(),
        "reload",
        "--control",
        server.control().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad file reloaded: {out:?}");
    let at = format!("{}:3", allow.display());
    assert!(
        err.contains(&at),
        "the error names the file and line: {err}"
    );
    assert!(err.contains("stay as they were"), "{err}");
    // SIGHUP too: logged, nothing else.
    server.signal("HUP");
    wait_until(Duration::from_secs(5), "the refusal in the log", || {
        server.log().matches(&at).count() >= 2
    });

    // The old list stands: c0 goes on (same session), c1 is not admitted.
    assert!(ping(&topo.clients[0].ns, SERVER_TUN_ADDR, 3));
    let url = format!("udp://{}:3000", topo.clients[1].server_addr);
    let mut c1 = Daemon::spawn(
        &topo.clients[1].ns,
        tag,
        "c1",
        &client_args(&keys[1], &skey, &url),
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c1.tunnel_address(), None, "c1 was admitted");
    let status = server.status_ok();
    assert!(session_of(&status, &keys[1]).is_none(), "{status:#}");
    assert!(
        status["drops"]["not_allowed"].as_u64() >= Some(1),
        "{status:#}"
    );
    let after = session_of(&status, &keys[0]).expect("c0's session");
    assert_eq!(after["addresses"], before["addresses"]);
    let moved = handshake_time(&after)
        .duration_since(c0_handshake)
        .unwrap_or_else(|e| e.duration());
    assert!(moved < Duration::from_millis(500), "c0 shook hands again");
    c1.assert_running();

    // A client has nothing to reload: said so, exit status 1.
    let out = topo.clients[0].ns.exec(&[
        iptun_bin(),
        "reload",
        "--control",
        control_path(tag, "c0").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to reload"));
}

#[test]
fn metrics_port_in_use_or_public_is_a_clear_error_and_changes_nothing() {
    require_root();
    let tag = "svcport";
    let topo = Topology::new(tag);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let holder_py = "import socket, time\n\
        s = socket.create_server(('127.0.0.1', 9100))\n\
        print('listening', flush=True)\n\
        time.sleep(60)\n";
    let holder = topo
        .server
        .spawn(&["timeout", "60", python(), "-c", holder_py]);
    wait_until(Duration::from_secs(10), "the port to be taken", || {
        holder.log().contains("listening")
    });
    let url = format!("udp://{}:3000", topo.server_addr());
    let server = [
        "server",
        "--private-key",
        skey.path(),
        "--allow",
        &ckey.public,
    ];
    let client = client_args(&ckey, &skey, &url);
    let control = dir.file("control.sock");
    let control = control.to_str().unwrap();
    for (ns, base) in [(&topo.server, &server[..]), (topo.client(), &client[..])] {
        for (flags, expected) in [
            (
                &["--metrics", METRICS][..],
                "--metrics 127.0.0.1:9100: the port is in use",
            ),
            (&["--metrics", "0.0.0.0:9100"][..], "add --metrics-public"),
            (&["--metrics", "9100"][..], "expected ADDR:PORT"),
        ] {
            if ns.name == topo.client().name && flags[1] == METRICS {
                continue; // the port is taken in the server's namespace only
            }
            let mut args = vec!["timeout", "10", iptun_bin()];
            args.extend_from_slice(base);
            args.extend_from_slice(flags);
            args.extend(["--control", control, "--tun", "svctun"]);
            let out = ns.exec(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
            assert!(err.contains(expected), "{args:?}: {err}");
            let link = ns.exec(&["ip", "link", "show", "dev", "svctun"]);
            assert!(!link.status.success(), "a TUN device was left: {args:?}");
        }
    }
    // The client's port in use, in its own namespace.
    let holder_c = topo
        .client()
        .spawn(&["timeout", "60", python(), "-c", holder_py]);
    wait_until(
        Duration::from_secs(10),
        "the client's port to be taken",
        || holder_c.log().contains("listening"),
    );
    let mut args = vec!["timeout", "10", iptun_bin()];
    args.extend_from_slice(&client);
    args.extend([
        "--metrics",
        METRICS,
        "--control",
        control,
        "--tun",
        "svctun",
    ]);
    let out = topo.client().exec(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--metrics 127.0.0.1:9100: the port is in use"),
        "{err}"
    );
    holder.signal("KILL");
    holder_c.signal("KILL");
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    // Verified as installed: ExecStart= must name an executable that
    // exists, so the units point at the binary under test in a copy.
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/systemd");
    let dir = std::env::temp_dir().join(format!("iptun-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveDirOnDrop(dir.clone());
    for name in ["iptun-server.service", "iptun-client@.service"] {
        let text = std::fs::read_to_string(units.join(name)).expect("the unit");
        assert!(
            text.contains("Type=notify"),
            "{name}: readiness through sd_notify"
        );
        assert!(
            text.contains("CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW"),
            "{name}"
        );
        assert!(text.contains("ProtectSystem=strict"), "{name}");
        let text = text.replace("/usr/bin/iptun", iptun_bin());
        std::fs::write(dir.join(name), text).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.join(name))
            .stdin(Stdio::null())
            .output()
            .expect("run systemd-analyze (Debian package systemd)");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {said}");
        // Unknown keys and the like are only warnings: none is allowed.
        assert!(said.trim().is_empty(), "{name}: {said}");
    }
    let server = std::fs::read_to_string(units.join("iptun-server.service")).unwrap();
    assert!(server.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    let client = std::fs::read_to_string(units.join("iptun-client@.service")).unwrap();
    assert!(client.contains("--config /etc/iptun/%i.toml"));
}

struct RemoveDirOnDrop(PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

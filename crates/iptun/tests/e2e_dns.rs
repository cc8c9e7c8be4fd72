//! End-to-end tests of the DNS transport: the real `iptun` binary as server
//! and client in network namespaces, a real recursive resolver (unbound)
//! between them (`common::unbound::DnsTopology`): the client reaches only
//! the resolver, which delegates the tunnel domain to the server by a stub
//! zone. Plus direct mode: the client queries the server itself.
//!
//! Every daemon gets its own control socket and every test its own key
//! directory; guards remove both, the namespaces and the processes even when
//! a test fails.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use iptun_proto::transport::dns::{UP_HEADER_LEN, UpHeader};
use iptun_proto::wire::dns::{Domain, encode_name};
use serde_json::Value;

use common::daemon::Daemon;
use common::http::{ForwardProxy as _, PROXY_USER, TestPki};
use common::unbound::{
    DOH_PATH, DOH_PORT, DOMAIN, DOT_PORT, DnsTopology, Unbound, UnboundOptions, UnboundTls, addrs,
    dns_query,
};
use common::*;

/// The network behind the server (server side and target).
const TARGET_NET: &str = "198.51.100.0/24";
/// The size of the transfers.
const TRANSFER: u64 = 2 << 20;
/// A bound for each transfer (generous: the machine running the tests may
/// be busy).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(90);
/// A bound for the client to get its tunnel address.
const TUNNEL_UP: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- helpers

/// How the client reaches the resolver.
struct Via<'a> {
    /// The `?resolver=` value; `None`: the nameservers of resolv.conf.
    resolver: Option<String>,
    /// What the client's status names as the session's endpoint.
    endpoint: String,
    /// The resolver's plain DNS address (unbound serves it whatever else
    /// it serves), for checking record types.
    plain: &'a str,
    /// More client flags.
    flags: Vec<String>,
    /// Bytes to move each way.
    transfer: u64,
}

impl<'a> Via<'a> {
    /// Plain DNS to `resolver` port 53, named in the URL or not.
    fn plain(resolver: &'a str, explicit: bool) -> Self {
        Self {
            resolver: explicit.then(|| resolver.to_owned()),
            endpoint: format!("{resolver}:53"),
            plain: resolver,
            flags: Vec::new(),
            transfer: TRANSFER,
        }
    }

    /// `url` (tls://... or https://...), as status shows it, with `flags`.
    fn secure(url: &str, shown: &str, flags: &[&str]) -> Self {
        Self {
            resolver: Some(url.to_owned()),
            endpoint: shown.to_owned(),
            plain: addrs::RESOLVER_ADDR,
            flags: flags.iter().map(|f| f.to_string()).collect(),
            transfer: TRANSFER,
        }
    }

    fn url(&self) -> String {
        match &self.resolver {
            Some(r) => format!("dns://{DOMAIN}?resolver={r}"),
            None => format!("dns://{DOMAIN}"),
        }
    }
}

/// The server on 203.0.113.2:53 with its tunnel domain, NAT to the target.
fn start_server(tag: &str, topo: &DnsTopology, skey: &Key, ckey: &Key) -> Daemon {
    let listen = format!("dns://{}:53?domain={DOMAIN}", addrs::SERVER_ADDR);
    let mut server = Daemon::spawn(
        &topo.server,
        tag,
        "server",
        &[
            "server",
            "--private-key",
            skey.path(),
            "--allow",
            &ckey.public,
            "--listen",
            &listen,
            "--nat",
        ],
    );
    server.wait_up();
    let st = server.status_ok();
    assert_eq!(st["endpoints"][0], listen, "{st:#}");
    server
}

/// The client over `via`, routing the target's network.
fn start_client(tag: &str, topo: &DnsTopology, skey: &Key, ckey: &Key, via: &Via<'_>) -> Daemon {
    let url = via.url();
    let mut args = vec![
        "client",
        "--private-key",
        ckey.path(),
        "--server-key",
        &skey.public,
        "--server",
        &url,
        "--route",
        TARGET_NET,
    ];
    args.extend(via.flags.iter().map(String::as_str));
    Daemon::spawn(&topo.client, tag, "client", &args)
}

/// What a tunnel case leaves to look at.
struct Finished {
    /// The client's DNS path status.
    path: Value,
    /// The server's DNS listener counters.
    server_dns: Value,
}

/// The counters of the server's one DNS listener.
fn server_dns_counters(server: &mut Daemon) -> Value {
    let st = server.status_ok();
    let listeners = st["dns"].as_object().expect("DNS listener counters");
    listeners.values().next().cloned().expect("a DNS listener")
}

/// Server on 203.0.113.2:53, client through the resolver as `via` says:
/// tunnel up, a ping to the target, 2 MiB each way checked by sha256 and
/// timed.
fn tunnel_case(tag: &str, topo: &DnsTopology, via: &Via<'_>, what: &str) -> Finished {
    let Pair {
        mut server,
        mut client,
        _dir,
    } = Pair::up(tag, topo, via, what);
    let st = client.status_ok();
    let session = &st["sessions"][0];
    assert_eq!(session["transport"], "dns", "{st:#}");
    assert_eq!(session["endpoint"], via.endpoint, "{st:#}");
    // TXT first; NULL once a probe got through (maybe already).
    let record_type = &session["path"]["record_type"];
    assert!(record_type == "TXT" || record_type == "NULL", "{st:#}");
    ping_and_transfer(topo, via.transfer, what);
    let st = server.status_ok();
    let session = &st["sessions"][0];
    assert_eq!(session["transport"], "dns", "{st:#}");
    let rx = session["rx_bytes"].as_u64().expect("rx_bytes");
    let tx = session["tx_bytes"].as_u64().expect("tx_bytes");
    assert!(rx >= via.transfer && tx >= via.transfer, "{st:#}");
    every_record_type_passes(topo, via.plain);
    let path = client.status_ok()["sessions"][0]["path"].clone();
    eprintln!("{what}: client path {path:#}");
    eprintln!(
        "{what}: upstream encoding {}, answers in {}",
        path["encoding"], path["record_type"]
    );
    // Unbound and the server pass NULL records: the client probed and
    // switched to them.
    assert_eq!(path["record_type"], "NULL", "{path:#}");
    assert_eq!(path["stats"]["type_fallbacks"], 0, "{path:#}");
    let server_dns = server_dns_counters(&mut server);
    eprintln!("{what}: server DNS counters {server_dns}");
    // No resolver here takes the server's NXDOMAIN below the apex as final.
    assert!(
        server_dns["name_error_fallbacks"].is_null(),
        "{server_dns:#}"
    );
    client.assert_running();
    server.assert_running();
    Finished { path, server_dns }
}

/// A server on 203.0.113.2:53 and a client through the resolver as `via`
/// says, the tunnel up.
struct Pair {
    server: Daemon,
    client: Daemon,
    /// Their keys.
    _dir: TempDir,
}

impl Pair {
    fn up(tag: &str, topo: &DnsTopology, via: &Via<'_>, what: &str) -> Self {
        let dir = TempDir::new(tag);
        let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
        let server = start_server(tag, topo, &skey, &ckey);
        let mut client = start_client(tag, topo, &skey, &ckey, via);
        let started = Instant::now();
        let addr = client.wait_tunnel_address(TUNNEL_UP);
        assert!(addr.starts_with("10.1.0."), "{addr}");
        eprintln!("{what}: tunnel up in {:.2?}", started.elapsed());
        Self {
            server,
            client,
            _dir: dir,
        }
    }
}

/// A ping through the tunnel, then `bytes` each way checked by sha256 and
/// timed.
fn ping_and_transfer(topo: &DnsTopology, bytes: u64, what: &str) {
    wait_until(Duration::from_secs(20), "a ping through the tunnel", || {
        ping(&topo.client, TARGET_ADDR, 1)
    });
    transfer_both_ways(
        &topo.client,
        &topo.target,
        TARGET_ADDR,
        bytes,
        TRANSFER_TIMEOUT,
        what,
    );
}

fn through_unbound(tag: &str, tweak: impl FnOnce(&mut UnboundOptions), what: &str) -> Finished {
    require_root();
    let topo = DnsTopology::new(tag, false);
    let mut opts = UnboundOptions::new(DOMAIN, topo.server_dns(53));
    tweak(&mut opts);
    let unbound: Unbound = topo.start_unbound(&opts);
    let via = Via::plain(addrs::RESOLVER_ADDR, true);
    let finished = tunnel_case(tag, &topo, &via, what);
    // The resolver serves the tunnel domain only.
    let other = dns_query(&topo.client, unbound.addr(), "www.example.org", "A", 1232);
    assert!(
        other.as_ref().is_none_or(|r| r.rcode != 0),
        "another domain resolved: {other:?}"
    );
    finished
}

/// Bare polls of fresh tags asking for each record type get, through
/// `resolver` (unbound, or the server itself), the server's (empty) answer
/// in records of that type.
fn every_record_type_passes(topo: &DnsTopology, resolver: &str) {
    let resolver: SocketAddr = format!("{resolver}:53").parse().expect("an address");
    let domain = Domain::new(DOMAIN).expect("the test domain");
    // Type, its number, and the RDATA of an empty payload where it is fixed:
    // the answer's header alone (PROTOCOL.md §11.3), `held` (0x80) after
    // the hold, not for a tag's first A or AAAA query (answered at once) but
    // for its second (a minimising resolver asks A at the name first).
    const AAAA: &[&[&str]] = &[
        &["20000200000000000000000000000000"],
        &["20000280000000000000000000000000"],
    ];
    const A: &[&[&str]] = &[&["0b000200", "0c000000"], &["0b000280", "0c000000"]];
    for (i, (qtype, number, rdata)) in [
        ("NULL", 10, Some(&[&["008000"][..]][..])),
        ("CNAME", 5, None),
        ("MX", 15, None),
        ("33", 33, None),
        ("AAAA", 28, Some(AAAA)),
        ("A", 1, Some(A)),
    ]
    .into_iter()
    .enumerate()
    {
        let mut payload = [0u8; UP_HEADER_LEN];
        UpHeader {
            tag: 0x7e57_0000 + i as u32,
            prompt: false,
            qseq: 0,
            down_limit: 1232,
            auth: [0; 4],
        }
        .emit(&mut payload);
        let name = encode_name(&domain, &payload).expect("a bare poll's name");
        let reply = dns_query(&topo.client, resolver, &name.to_ascii(), qtype, 1232)
            .unwrap_or_else(|| panic!("no answer to {qtype}"));
        assert_eq!(reply.rcode, 0, "{qtype}: {reply:?}");
        let records: Vec<&str> = reply
            .answers
            .iter()
            .filter_map(|rr| rr.strip_prefix(&format!("{} {number} ", name.to_ascii())))
            .collect();
        assert!(!records.is_empty(), "{qtype}: {reply:?}");
        if let Some(rdata) = rdata {
            let mut records = records;
            records.sort_unstable();
            assert!(rdata.contains(&&records[..]), "{qtype}: {reply:?}");
        }
    }
}

// ---------------------------------------------------------------- tests

/// The tests share the machine; the one that times a transfer against a
/// pace has it alone (two tests at once on two cores, each with its
/// daemons and resolvers, cost it seconds).
static MACHINE: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn share_machine() -> std::sync::RwLockReadGuard<'static, ()> {
    MACHINE.read().unwrap_or_else(|e| e.into_inner())
}

fn machine_alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    MACHINE.write().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn dns_through_unbound() {
    let _machine = share_machine();
    let path = through_unbound("dns", |_| {}, "DNS via unbound").path;
    // unbound carries 8-bit label bytes: the client probed base128 and
    // switched to it.
    assert_eq!(path["encoding"], "base128", "{path:#}");
}

/// Without `?resolver=`, the client asks the nameservers of its resolv.conf
/// (`ip netns exec` puts /etc/netns/NS/resolv.conf in place of /etc/resolv.conf).
/// The first one named is an IPv6 address nobody answers at: the client
/// must not skip the IPv4 one after it, and must move on to it.
#[test]
fn dns_through_the_system_resolver() {
    let _machine = share_machine();
    require_root();
    let tag = "dnssys";
    let topo = DnsTopology::new(tag, false);
    let dead = "2001:db8:1::99";
    let _resolv = NetnsResolvConf::new(&topo.client.name, &[dead, addrs::RESOLVER_ADDR]);
    let _unbound: Unbound = topo.start_unbound(&UnboundOptions::new(DOMAIN, topo.server_dns(53)));
    let via = Via::plain(addrs::RESOLVER_ADDR, false);
    tunnel_case(tag, &topo, &via, "DNS via resolv.conf");
}

/// /etc/netns/NS/resolv.conf naming these nameservers, removed on drop.
struct NetnsResolvConf(PathBuf);

impl NetnsResolvConf {
    fn new(ns: &str, nameservers: &[&str]) -> Self {
        let dir = PathBuf::from("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).expect("creating /etc/netns/NS");
        let lines: String = nameservers
            .iter()
            .map(|n| format!("nameserver {n}\n"))
            .collect();
        std::fs::write(dir.join("resolv.conf"), format!("# iptun test\n{lines}"))
            .expect("writing resolv.conf");
        Self(dir)
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn dns_through_unbound_caps_for_id() {
    let _machine = share_machine();
    let _ = through_unbound(
        "dnscaps",
        |o| o.caps_for_id = true,
        "DNS via unbound (use-caps-for-id)",
    );
}

/// Unbound minimising query names: the server answers its first step (one
/// label below the apex) NXDOMAIN and unbound sends the full name at once,
/// instead of a query for every label.
#[test]
fn dns_through_a_minimising_unbound() {
    let _machine = share_machine();
    let finished = through_unbound(
        "dnsqmin",
        |o| o.qname_minimisation = true,
        "DNS via unbound (qname-minimisation)",
    );
    let c = &finished.server_dns;
    let count = |k: &str| c[k].as_u64().unwrap_or(0);
    assert!(count("name_errors") > 100, "{c:#}");
    // Each of the client's queries costs unbound two upstream: a first step
    // (NXDOMAIN; for a name of one label, A at the name) and the full name.
    // Label by label it took five for a name of four labels.
    let upstream = count("queries") + count("name_errors") + count("apex");
    let clients = count("queries") - count("minimisation_steps");
    assert!(
        upstream * 10 <= clients * 22,
        "{upstream} for {clients}: {c:#}"
    );
}

/// Unbound minimising strictly (`qname-minimisation-strict`: an NXDOMAIN
/// at a step is final, as RFC 8020 reads it) answers the client's first
/// queries NXDOMAIN. The server sees no full name follow its NXDOMAINs and
/// answers NODATA below the apex instead: the tunnel comes up, a little
/// late, and carries data intact.
#[test]
fn dns_through_a_strictly_minimising_unbound() {
    let _machine = share_machine();
    require_root();
    let tag = "dnsstrict";
    let topo = DnsTopology::new(tag, false);
    let mut opts = UnboundOptions::new(DOMAIN, topo.server_dns(53));
    opts.qname_minimisation = true;
    opts.extra.push("qname-minimisation-strict: yes".to_owned());
    let _unbound: Unbound = topo.start_unbound(&opts);
    let via = Via::plain(addrs::RESOLVER_ADDR, true);
    let what = "DNS via a strictly minimising unbound";
    let Pair {
        mut server,
        mut client,
        _dir,
    } = Pair::up(tag, &topo, &via, what);
    ping_and_transfer(&topo, 256 << 10, what);
    let c = server_dns_counters(&mut server);
    eprintln!("strict unbound: server DNS counters {c}");
    assert_eq!(c["name_error_fallbacks"], 1, "{c:#}");
    client.assert_running();
}

#[test]
fn dns_through_unbound_edns_512() {
    let _machine = share_machine();
    let _ = through_unbound(
        "dns512",
        |o| o.edns_buffer_size = Some(512),
        "DNS via unbound (EDNS 512)",
    );
}

#[test]
fn dns_direct() {
    let _machine = share_machine();
    require_root();
    let tag = "dnsdir";
    let topo = DnsTopology::new(tag, true);
    let via = Via::plain(addrs::SERVER_ADDR, true);
    tunnel_case(tag, &topo, &via, "DNS direct");
}

// ------------------------------------------------ DNS over TLS and HTTPS

/// Unbound serving DoT and DoH too, with a certificate for its address
/// from a fresh test CA; the topology it runs in.
fn secure_unbound(tag: &str) -> (DnsTopology, TestPki, Unbound) {
    require_root();
    let topo = DnsTopology::new(tag, false);
    let pki = TestPki::generate(addrs::RESOLVER_ADDR);
    let mut opts = UnboundOptions::new(DOMAIN, topo.server_dns(53));
    opts.tls = Some(UnboundTls {
        cert: pki.cert_pem.clone(),
        key: pki.key_pem.clone(),
    });
    let unbound = topo.start_unbound(&opts);
    (topo, pki, unbound)
}

/// The DoT or DoH resolver `shown` carried the path (its only resolver:
/// no query went anywhere else), over one connection kept open.
fn assert_carried_by(path: &Value, shown: &str) {
    let link = &path["resolvers"][0];
    assert_eq!(
        path["resolvers"].as_array().map(Vec::len),
        Some(1),
        "{path:#}"
    );
    assert_eq!(link["resolver"], shown, "{path:#}");
    assert_eq!(link["connected"], true, "{path:#}");
    assert_eq!(link["failures"], 0, "{path:#}");
    assert!(link["connects"].as_u64() >= Some(1), "{path:#}");
}

fn dot_url() -> (String, String) {
    let url = format!("tls://{}", addrs::RESOLVER_ADDR);
    let shown = format!("tls://{}:{DOT_PORT}", addrs::RESOLVER_ADDR);
    (url, shown)
}

fn doh_url() -> (String, String) {
    let url = format!("https://{}{DOH_PATH}", addrs::RESOLVER_ADDR);
    let shown = format!("https://{}:{DOH_PORT}{DOH_PATH}", addrs::RESOLVER_ADDR);
    (url, shown)
}

/// DNS over TLS to unbound's `tls-port`, its certificate checked against
/// the test CA (`--tls-ca`) and its address.
#[test]
fn dns_over_tls_through_unbound() {
    let _machine = share_machine();
    let (topo, pki, _unbound) = secure_unbound("dot");
    let (url, shown) = dot_url();
    let via = Via::secure(&url, &shown, &["--tls-ca", pki.ca()]);
    let path = tunnel_case("dot", &topo, &via, "DNS over TLS via unbound").path;
    assert_carried_by(&path, &shown);
}

/// DNS over HTTPS (HTTP/2) to unbound's `https-port`.
#[test]
fn dns_over_https_through_unbound() {
    let _machine = share_machine();
    let (topo, pki, _unbound) = secure_unbound("doh");
    let (url, shown) = doh_url();
    let via = Via::secure(&url, &shown, &["--tls-ca", pki.ca()]);
    let path = tunnel_case("doh", &topo, &via, "DNS over HTTPS via unbound").path;
    assert_carried_by(&path, &shown);
}

/// DNS over HTTPS through squid (CONNECT, basic auth) to unbound: the
/// proxy named in status, its CONNECT in squid's log. (A shorter transfer:
/// the 2 MiB case above covers the throughput.)
#[test]
fn dns_over_https_through_a_proxy() {
    let _machine = share_machine();
    let (topo, pki, _unbound) = secure_unbound("dohsquid");
    let squid = topo.start_squid();
    let (url, shown) = doh_url();
    let proxy = squid.url();
    let mut via = Via::secure(&url, &shown, &["--tls-ca", pki.ca(), "--proxy", &proxy]);
    via.transfer = 256 << 10;
    let path = tunnel_case("dohsquid", &topo, &via, "DNS over HTTPS via squid").path;
    assert_carried_by(&path, &shown);
    assert_eq!(
        path["resolvers"][0]["proxy"],
        squid.listen().to_string(),
        "{path:#}"
    );
    // squid logs a CONNECT when its tunnel closes (the client has exited).
    let connect = format!("CONNECT {}:{DOH_PORT} {PROXY_USER}", addrs::RESOLVER_ADDR);
    wait_until(
        Duration::from_secs(10),
        "squid to log the authenticated CONNECT",
        || squid.log().contains(&connect),
    );
}

/// A client pinning another certificate than unbound's gets no tunnel,
/// and its status and log say why.
#[test]
fn dns_over_tls_with_a_wrong_pin_is_refused() {
    let _machine = share_machine();
    let tag = "dotpin";
    let (topo, _pki, _unbound) = secure_unbound(tag);
    let dir = TempDir::new(tag);
    let (skey, ckey) = (Key::generate(&dir, "server"), Key::generate(&dir, "client"));
    let _server = start_server(tag, &topo, &skey, &ckey);
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let (url, shown) = dot_url();
    let via = Via::secure(&url, &shown, &["--tls-pin", &wrong]);
    let mut client = start_client(tag, &topo, &skey, &ckey, &via);
    let says = "not the one --tls-pin names";
    let mut last = Value::Null;
    wait_until(
        Duration::from_secs(15),
        "the client's status to say the pin does not match",
        || {
            last = client.status().unwrap_or_default();
            let path = &last["paths"][0];
            path["state"] == "failed" && path["reason"].as_str().is_some_and(|r| r.contains(says))
        },
    );
    let reason = last["paths"][0]["reason"].as_str().unwrap_or_default();
    eprintln!("status says: {reason}");
    assert!(reason.starts_with(&shown), "names the resolver: {reason}");
    let link = &last["paths"][0]["detail"]["resolvers"][0];
    assert_eq!(link["connected"], false, "{last:#}");
    assert!(
        link["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(says)),
        "{last:#}"
    );
    assert!(client.log().contains(says), "{}", client.log());
    assert_eq!(client.tunnel_address(), None, "{}", client.log());
    assert!(!ping(&topo.client, TARGET_ADDR, 1));
    client.assert_running();
}

// ---------------------------------------------------------- resolvers, sizes

/// A second resolver address on the middle box, beside `RESOLVER_ADDR`.
const SECOND_RESOLVER: &str = "192.0.2.3";

/// Server on 203.0.113.2:53 (with NAT to the target), a client asking
/// `url`: both up, the tunnel address assigned and a ping through.
fn start_tunnel(tag: &str, topo: &DnsTopology, dir: &TempDir, url: &str) -> (Daemon, Daemon) {
    let (skey, ckey) = (Key::generate(dir, "server"), Key::generate(dir, "client"));
    let server = start_server(tag, topo, &skey, &ckey);
    let mut client = Daemon::spawn(
        &topo.client,
        tag,
        "client",
        &[
            "client",
            "--private-key",
            ckey.path(),
            "--server-key",
            &skey.public,
            "--server",
            url,
            "--route",
            TARGET_NET,
        ],
    );
    client.wait_tunnel_address(TUNNEL_UP);
    wait_until(Duration::from_secs(20), "a ping through the tunnel", || {
        ping(&topo.client, TARGET_ADDR, 1)
    });
    (server, client)
}

/// The client's DNS path status.
fn dns_path(client: &mut Daemon) -> Value {
    client.status_ok()["sessions"][0]["path"].clone()
}

/// Unbound with case randomisation and qname minimisation, as the resolvers
/// people meet are, listening on `addr` in the middle namespace.
fn realistic_unbound(topo: &DnsTopology, addr: &str) -> Unbound {
    let mut opts = UnboundOptions::new(DOMAIN, topo.server_dns(53));
    opts.caps_for_id = true;
    opts.qname_minimisation = true;
    Unbound::start(&topo.middle, addr.parse().expect("an address"), &opts)
}

/// Two resolvers carry the tunnel together; one is killed in the middle of
/// an upload: the upload still completes, checksum intact, the dead one is
/// set aside, and a download after runs on the other alone.
#[test]
fn dns_through_two_unbounds_one_killed_mid_transfer() {
    let _machine = machine_alone();
    require_root();
    let tag = "dns2res";
    let topo = DnsTopology::new(tag, false);
    topo.middle.exec_ok(&[
        "ip",
        "addr",
        "add",
        &format!("{SECOND_RESOLVER}/24"),
        "dev",
        addrs::MIDDLE_CLIENT_IF,
    ]);
    let first = realistic_unbound(&topo, addrs::RESOLVER_ADDR);
    let second = realistic_unbound(&topo, SECOND_RESOLVER);
    let dir = TempDir::new(tag);
    let url = format!(
        "dns://{DOMAIN}?resolver={}&resolver={SECOND_RESOLVER}",
        addrs::RESOLVER_ADDR
    );
    let (mut server, mut client) = start_tunnel(tag, &topo, &dir, &url);
    // Both carry queries.
    transfer_both_ways(
        &topo.client,
        &topo.target,
        TARGET_ADDR,
        1 << 20,
        TRANSFER_TIMEOUT,
        "two resolvers",
    );
    let path = dns_path(&mut client);
    let resolvers = path["resolvers"].as_array().expect("resolvers").clone();
    assert_eq!(resolvers.len(), 2, "{path:#}");
    for r in &resolvers {
        assert_eq!(r["state"], "active", "{path:#}");
        assert!(r["answers"].as_u64().unwrap() > 100, "{path:#}");
    }
    // An upload paced over 8 s, at a rate one resolver carries on its own
    // (1 Mbit/s: debug builds on a busy machine); the second resolver dies
    // 2 s in.
    let (bytes, rate) = (1u64 << 20, 128u64 << 10);
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        drop(second);
    });
    let started = Instant::now();
    let (sent, received) = tcp_transfer_sha256_paced(
        &topo.client,
        &topo.target,
        TARGET_ADDR,
        bytes,
        rate,
        TRANSFER_TIMEOUT,
    );
    let took = started.elapsed();
    killer.join().expect("the killer thread");
    assert_same_transfer(&sent, &received, bytes);
    let paced = Duration::from_secs(bytes / rate);
    eprintln!("upload across a resolver's death: {took:.2?} (paced to {paced:?})");
    let path = dns_path(&mut client);
    eprintln!("after: {path:#}");
    assert_eq!(path["resolvers"][0]["state"], "active", "{path:#}");
    let state = path["resolvers"][1]["state"].as_str().unwrap_or_default();
    assert!(state.starts_with("set aside"), "{path:#}");
    // The death cost the transfer little (the goal is 2 s; TCP's own
    // recovery of what the dead resolver swallowed adds to it).
    assert!(took < paced + Duration::from_secs(4), "{took:?}");
    // And the survivor carries on alone.
    transfer_both_ways(
        &topo.client,
        &topo.target,
        TARGET_ADDR,
        1 << 20,
        TRANSFER_TIMEOUT,
        "one resolver left",
    );
    assert_eq!(
        path["resolvers"][0]["resolver"],
        format!("{}:53", addrs::RESOLVER_ADDR)
    );
    drop(first);
    client.assert_running();
    server.assert_running();
}

/// A path that drops DNS queries over 160 bytes (names of about 120
/// characters): the client finds the cap and the tunnel carries data.
#[test]
fn dns_through_a_path_that_drops_long_queries() {
    let _machine = share_machine();
    require_root();
    let tag = "dnslen";
    let topo = DnsTopology::new(tag, false);
    let _unbound = realistic_unbound(&topo, addrs::RESOLVER_ADDR);
    // On the client's way out: every query longer than 160 bytes vanishes.
    let ns = &topo.client;
    ns.exec_ok(&["nft", "add", "table", "inet", "dnslen"]);
    let hook = "{ type filter hook output priority 0; }";
    ns.exec_ok(&["nft", "add", "chain", "inet", "dnslen", "out", hook]);
    ns.exec_ok(&[
        "nft", "add", "rule", "inet", "dnslen", "out", "udp", "dport", "53", "udp", "length", ">",
        "160", "counter", "drop",
    ]);
    let dir = TempDir::new(tag);
    let url = format!("dns://{DOMAIN}?resolver={}", addrs::RESOLVER_ADDR);
    let (mut server, mut client) = start_tunnel(tag, &topo, &dir, &url);
    transfer_both_ways(
        &topo.client,
        &topo.target,
        TARGET_ADDR,
        1 << 20,
        TRANSFER_TIMEOUT,
        "long queries dropped",
    );
    let path = dns_path(&mut client);
    eprintln!("{path:#}");
    // 160 bytes of UDP: 8 of header, 12 of DNS header, 4 + 11 of question
    // tail and OPT, the name's two framing bytes: 123 characters at most.
    let len = path["up"]["max_name_len"].as_u64().expect("max_name_len");
    assert!((80..=123).contains(&len), "{path:#}");
    assert!(
        path["stats"]["fallbacks"].as_u64().unwrap() >= 1,
        "{path:#}"
    );
    // The rule did drop queries: the cap was found, not given.
    let rules = ns.exec_ok(&["nft", "list", "table", "inet", "dnslen"]);
    assert!(!rules.contains("packets 0 "), "{rules}");
    client.assert_running();
    server.assert_running();
}

/// `?max-query=72`: no query name longer than 72 characters, and the
/// tunnel carries data.
#[test]
fn dns_with_query_names_of_72_characters() {
    let _machine = share_machine();
    require_root();
    let tag = "dns72";
    let topo = DnsTopology::new(tag, false);
    let unbound = realistic_unbound(&topo, addrs::RESOLVER_ADDR);
    let dir = TempDir::new(tag);
    let url = format!(
        "dns://{DOMAIN}?resolver={}&max-query=72",
        addrs::RESOLVER_ADDR
    );
    let (mut server, mut client) = start_tunnel(tag, &topo, &dir, &url);
    transfer_both_ways(
        &topo.client,
        &topo.target,
        TARGET_ADDR,
        256 << 10,
        TRANSFER_TIMEOUT,
        "names of 72",
    );
    let path = dns_path(&mut client);
    assert_eq!(path["up"]["max_name_len"], 72, "{path:#}");
    assert_eq!(path["up"]["name_cap"], 72, "{path:#}");
    // Unbound logs every query it gets: none longer.
    let suffix = format!(".{DOMAIN}.");
    let longest = unbound
        .log()
        .split_whitespace()
        .filter(|w| w.to_ascii_lowercase().ends_with(&suffix))
        .map(|w| presentation_len(w) - 1)
        .max()
        .expect("queries logged");
    assert!(longest <= 72, "a query name of {longest} characters");
    client.assert_running();
    server.assert_running();
}

/// The length of a name as unbound logs it, an escaped byte (`\DDD` or
/// `\X`: base128's 8-bit characters) counted as one.
fn presentation_len(name: &str) -> usize {
    let b = name.as_bytes();
    let (mut i, mut n) = (0, 0);
    while i < b.len() {
        i += match b[i] {
            b'\\' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => 4,
            b'\\' => 2,
            _ => 1,
        };
        n += 1;
    }
    n
}

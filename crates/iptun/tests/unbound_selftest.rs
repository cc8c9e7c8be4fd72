//! Checks the resolver harness itself (no iptun involved): a real unbound
//! between client and server forwards queries for the tunnel domain to a tiny
//! authoritative responder, and nothing else.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::unbound::{DOMAIN, DnsTopology, Unbound, UnboundOptions, addrs, dns_query};
use common::*;

/// Authoritative for one domain (stdlib only), over UDP and TCP. Answers TXT
/// for every name under the domain with the lowercased name (no trailing
/// dot), SOA/NS at the apex, A for `ns.DOMAIN`, NODATA for other types under
/// the domain, REFUSED outside it. Echoes the question's bytes exactly (the
/// 0x20 case unbound checks with use-caps-for-id) and logs every query as
/// `Q proto src name type edns=SIZE|none`.
const AUTH_PY: &str = r#"
import socket, struct, sys, threading
addr, port, domain = sys.argv[1], int(sys.argv[2]), sys.argv[3].lower().rstrip(".")

def enc(name):
    out = b""
    for label in name.rstrip(".").split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\0"

def rr(owner, t, ttl, rdata):
    return owner + struct.pack(">HHIH", t, 1, ttl, len(rdata)) + rdata

apex = enc(domain)
ns_name = enc("ns." + domain)
soa = ns_name + enc("hostmaster." + domain) + struct.pack(">IIIII", 1, 3600, 600, 86400, 0)

def answer(q, proto, src):
    if len(q) < 12:
        return None
    qid, flags, qd, an, ns, ar = struct.unpack(">HHHHHH", q[:12])
    if flags & 0x8000 or qd != 1:
        return None
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode("ascii", "replace"))
        i += 1 + q[i]
    i += 1
    qtype, qclass = struct.unpack(">HH", q[i:i + 4])
    question = q[12:i + 4]
    i += 4
    edns = None
    for _ in range(ar):
        while q[i] and q[i] < 0xC0:
            i += 1 + q[i]
        i += 2 if q[i] >= 0xC0 else 1
        t, c, ttl, rdlen = struct.unpack(">HHIH", q[i:i + 10])
        if t == 41:
            edns = c
        i += 10 + rdlen
    name = ".".join(labels)
    print("Q", proto, src, name + ".", qtype, "edns=%s" % edns, flush=True)
    lname = name.lower()
    inside = lname == domain or lname.endswith("." + domain)
    rcode, answers, auth = 0, [], []
    owner = b"\xc0\x0c"  # the question's name, case and all
    if not inside or qclass != 1:
        rcode = 5
    elif qtype == 16:
        txt = lname.encode()
        answers.append(rr(owner, 16, 0, bytes([len(txt)]) + txt))
    elif lname == domain and qtype == 6:
        answers.append(rr(owner, 6, 0, soa))
    elif lname == domain and qtype == 2:
        answers.append(rr(owner, 2, 0, ns_name))
    elif lname == "ns." + domain and qtype == 1 and ":" not in addr:
        answers.append(rr(owner, 1, 0, socket.inet_aton(addr)))
    else:
        auth.append(rr(apex, 6, 0, soa))
    opt = [b"\0" + struct.pack(">HHIH", 41, 1232, 0, 0)] if edns is not None else []
    aa = 0x0400 if rcode == 0 else 0
    rflags = 0x8000 | (flags & 0x7900) | aa | rcode
    head = struct.pack(">HHHHHH", qid, rflags, 1, len(answers), len(auth), len(opt))
    m = head + question + b"".join(answers + auth + opt)
    limit = max(512, edns or 512)
    if proto == "udp" and len(m) > limit:
        m = struct.pack(">HHHHHH", qid, rflags | 0x0200, 1, 0, 0, 0) + question
    return m

def serve_tcp(conn, src):
    with conn:
        conn.settimeout(10)
        while True:
            n = conn.recv(2)
            if len(n) < 2:
                return
            n, q = struct.unpack(">H", n)[0], b""
            while len(q) < n:
                b = conn.recv(n - len(q))
                if not b:
                    return
                q += b
            m = answer(q, "tcp", src)
            if m:
                conn.sendall(struct.pack(">H", len(m)) + m)

def tcp_loop(t):
    while True:
        conn, src = t.accept()
        threading.Thread(target=serve_tcp, args=(conn, src[0]), daemon=True).start()

fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
u = socket.socket(fam, socket.SOCK_DGRAM)
u.bind((addr, port))
t = socket.socket(fam, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind((addr, port))
t.listen(16)
threading.Thread(target=tcp_loop, args=(t,), daemon=True).start()
print("ready", flush=True)
while True:
    q, src = u.recvfrom(65535)
    try:
        m = answer(q, "udp", src[0])
    except Exception as e:
        print("bad query from", src[0], repr(e), flush=True)
        continue
    if m:
        u.sendto(m, src)
"#;

/// One query the responder logged.
#[derive(Debug)]
struct Seen {
    proto: String,
    name: String,
    qtype: u16,
    edns: Option<u16>,
}

/// The authoritative responder running in a namespace.
struct Auth {
    proc: Proc,
}

impl Auth {
    fn start(ns: &Netns, addr: SocketAddr) -> Self {
        let python = if std::path::Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3"
        } else {
            "python3"
        };
        let (ip, port) = (addr.ip().to_string(), addr.port().to_string());
        // No `timeout` wrapper: killing the guard's child must kill python.
        let mut proc = ns.spawn(&[python, "-u", "-c", AUTH_PY, &ip, &port, DOMAIN]);
        wait_until(Duration::from_secs(10), "the responder to bind", || {
            if let Some(status) = proc.try_wait() {
                panic!("responder exited ({status}):\n{}", proc.log());
            }
            proc.log().lines().any(|l| l == "ready")
        });
        Self { proc }
    }

    fn seen(&self) -> Vec<Seen> {
        self.proc
            .log()
            .lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split(' ').collect();
                if w.len() != 6 || w[0] != "Q" {
                    return None;
                }
                Some(Seen {
                    proto: w[1].to_string(),
                    name: w[3].to_string(),
                    qtype: w[4].parse().ok()?,
                    edns: w[5].strip_prefix("edns=")?.parse().ok(),
                })
            })
            .collect()
    }

    /// The queries for `name`, compared without case.
    fn seen_for(&self, name: &str) -> Vec<Seen> {
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        self.seen()
            .into_iter()
            .filter(|s| s.name.eq_ignore_ascii_case(&fqdn))
            .collect()
    }
}

/// A name under the domain no other query (or run) uses, with plenty of
/// letters for case randomization to show.
fn unique_name(what: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{what}-{}-{nanos}.selftest.{DOMAIN}", std::process::id())
}

/// Topology, responder on the server's 203.0.113.2:53, unbound on the
/// resolver's 192.0.2.1:53 with `opts` tweaking the defaults.
fn setup(
    tag: &str,
    direct: bool,
    tweak: impl FnOnce(&mut UnboundOptions),
) -> (DnsTopology, Auth, Unbound) {
    require_root();
    let topo = DnsTopology::new(tag, direct);
    let stub = topo.server_dns(53);
    let auth = Auth::start(&topo.server, stub);
    let mut opts = UnboundOptions::new(DOMAIN, stub);
    tweak(&mut opts);
    let unbound = topo.start_unbound(&opts);
    (topo, auth, unbound)
}

/// Asks the resolver for TXT of `name` from the client, expecting the
/// lowercased name back.
fn resolve_txt(topo: &DnsTopology, unbound: &Unbound, name: &str) {
    let reply = dns_query(&topo.client, unbound.addr(), name, "TXT", 1232)
        .unwrap_or_else(|| panic!("no reply from the resolver for {name}"));
    assert_eq!(reply.rcode, 0, "{name}: {reply:?}");
    assert_eq!(reply.txt, vec![name.to_lowercase()], "{reply:?}");
}

#[test]
fn txt_resolves_through_unbound_and_nothing_else_does() {
    let prefix = ns_prefix("ubtxt");
    let dir;
    {
        // Verbosity 4 logs every upstream query ("sending to target").
        let (topo, auth, unbound) = setup("ubtxt", false, |o| o.extra.push("verbosity: 4".into()));
        dir = unbound.dir().to_path_buf();
        assert!(dir.join("unbound.conf").is_file());
        let name = unique_name("plain");
        resolve_txt(&topo, &unbound, &name);
        let seen = auth.seen_for(&name);
        eprintln!("the server saw: {seen:?}");
        // Without caps-for-id the server sees the name as asked, over UDP,
        // with unbound's default EDNS size (1232).
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].name, format!("{name}."));
        assert_eq!((seen[0].proto.as_str(), seen[0].qtype), ("udp", 16));
        assert_eq!(seen[0].edns, Some(1232));
        // The resolver logged the client's query.
        assert!(
            unbound
                .log()
                .contains(&format!("{} {name}. TXT IN", addrs::CLIENT_ADDR)),
            "{}",
            unbound.log()
        );

        // Other types under the domain: NODATA.
        let a = dns_query(&topo.client, unbound.addr(), &name, "A", 1232).expect("reply");
        assert_eq!((a.rcode, a.answers.len()), (0, 0), "{a:?}");

        // Outside the domain: refused by the resolver itself, never sent on.
        let before = auth.seen().len();
        for other in ["example.org", "www.example.com", "example.com"] {
            let r = dns_query(&topo.client, unbound.addr(), other, "A", 1232).expect("reply");
            assert_eq!(r.rcode, 5, "{other}: {r:?}");
        }
        assert_eq!(auth.seen().len(), before, "{:?}", auth.seen());
        // Unbound only ever sent queries to the stub.
        let log = unbound.log();
        let targets: Vec<&str> = log
            .lines()
            .filter_map(|l| l.split_once("sending to target: ").map(|(_, t)| t))
            .collect();
        assert_eq!(targets.len(), 2, "{log}");
        assert!(
            targets
                .iter()
                .all(|t| *t == format!("<{DOMAIN}.> {}#53", addrs::SERVER_ADDR)),
            "{targets:?}"
        );

        // The client reaches only the resolver, not the server.
        assert!(!ping(&topo.client, addrs::SERVER_ADDR, 1));
        assert_eq!(
            dns_query(&topo.client, topo.server_dns(53), &name, "TXT", 0),
            None
        );
    }
    assert_eq!(list_netns(&prefix), Vec::<String>::new());
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn caps_for_id_sends_mixed_case_and_still_resolves() {
    let (topo, auth, unbound) = setup("ubcaps", false, |o| o.caps_for_id = true);
    for i in 0..3 {
        let name = unique_name(&format!("caps{i}-abcdefghijklmnopqrstuvwxyz"));
        resolve_txt(&topo, &unbound, &name);
        let seen = auth.seen_for(&name);
        eprintln!("asked {name}, the server saw: {seen:?}");
        // Every letter is a coin toss: 40-odd letters can't all come out
        // lower case. One query only: had the responder not echoed the case,
        // unbound would have fallen back to asking again in lower case (twice).
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_ne!(seen[0].name, seen[0].name.to_lowercase(), "{seen:?}");
    }
}

#[test]
fn edns_buffer_size_512_is_what_the_server_sees() {
    let (topo, auth, unbound) = setup("ubedns", false, |o| o.edns_buffer_size = Some(512));
    let name = unique_name("edns");
    resolve_txt(&topo, &unbound, &name);
    let seen = auth.seen_for(&name);
    eprintln!("the server saw: {seen:?}");
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|s| s.edns.is_none_or(|size| size <= 512)),
        "{seen:?}"
    );
}

#[test]
fn qname_minimisation_first_asks_for_shorter_names() {
    let (topo, auth, unbound) = setup("ubqmin", false, |o| o.qname_minimisation = true);
    let base = unique_name("qmin");
    let name = format!("a.b.c.{base}");
    resolve_txt(&topo, &unbound, &name);
    let seen = auth.seen();
    eprintln!("the server saw: {seen:?}");
    // Between the zone and the full name, unbound asks for the shorter
    // names first (type A), then for the name itself.
    assert!(
        seen.iter()
            .any(|s| s.qtype == 1 && s.name.eq_ignore_ascii_case(&format!("{base}."))),
        "{seen:?}"
    );
    assert_eq!(auth.seen_for(&name).last().map(|s| s.qtype), Some(16));

    // Without it, only the full name goes to the server.
    let (topo, auth, unbound) = setup("ubnoqmin", false, |_| {});
    let name = format!("a.b.c.{}", unique_name("noqmin"));
    resolve_txt(&topo, &unbound, &name);
    let seen = auth.seen();
    assert!(seen.iter().all(|s| s.qtype == 16), "{seen:?}");
    assert_eq!(auth.seen_for(&name).len(), 1, "{seen:?}");
}

#[test]
fn direct_topology_lets_the_client_reach_the_server() {
    let (topo, auth, unbound) = setup("ubdirect", true, |_| {});
    assert!(ping(&topo.client, addrs::SERVER_ADDR, 1));
    assert!(ping(&topo.client, addrs::SERVER_ADDR6, 1));
    let name = unique_name("direct");
    let reply = dns_query(&topo.client, topo.server_dns(53), &name, "TXT", 0).expect("reply");
    assert_eq!(reply.txt, vec![name.to_lowercase()]);
    // Straight to the server: seen from the client's own address.
    assert!(
        auth.proc
            .log()
            .contains(&format!("Q udp {} {name}.", addrs::CLIENT_ADDR)),
        "{}",
        auth.proc.log()
    );
    // And the resolver path still works.
    resolve_txt(&topo, &unbound, &unique_name("direct-via"));
    // The target stays unreachable from the client.
    assert!(!ping(&topo.client, TARGET_ADDR, 1));
}

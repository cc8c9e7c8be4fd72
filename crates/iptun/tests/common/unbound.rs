//! A real recursive resolver (unbound) between a client and an authoritative
//! server, for the IP-over-DNS transport: [`DnsTopology`] builds
//! client — resolver — server — target, [`Unbound`] runs our own unbound in
//! the resolver namespace (its own config in a temp dir, never the system's
//! service), and [`dns_query`] asks a DNS server from a namespace.
//!
//! The resolver reaches only the stub zone's server: every other name is
//! refused before recursion (`local-zone: "." refuse`), and its namespace has
//! no route beyond the two links anyway.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::{Netns, Proc};

/// The tunnel domain the tests delegate to the server.
pub const DOMAIN: &str = "t.example.com";

/// Where unbound serves DNS over TLS and DNS over HTTPS when given a
/// certificate ([`UnboundOptions::tls`]), and the DoH path.
pub const DOT_PORT: u16 = 853;
pub const DOH_PORT: u16 = 443;
pub const DOH_PATH: &str = "/dns-query";

/// Addresses of [`DnsTopology`]: [`LineTopology`]'s, the resolver being the
/// middle box.
pub mod addrs {
    pub use super::super::line::addrs::*;
    pub const RESOLVER_ADDR: &str = MIDDLE_ADDR;
    pub const RESOLVER_ADDR6: &str = MIDDLE_ADDR6;
    pub const RESOLVER_UP_ADDR: &str = MIDDLE_UP_ADDR;
    pub const RESOLVER_UP_ADDR6: &str = MIDDLE_UP_ADDR6;
}

/// client — resolver — server — target: [`LineTopology`], unbound running
/// in the middle ([`DnsTopology::start_unbound`]).
pub use super::line::LineTopology as DnsTopology;

impl DnsTopology {
    /// The server's address (the stub's) for DNS on `port`.
    pub fn server_dns(&self, port: u16) -> SocketAddr {
        SocketAddr::new(addrs::SERVER_ADDR.parse().unwrap(), port)
    }

    /// The resolver's address on the client's side, where [`start_unbound`]
    /// listens.
    ///
    /// [`start_unbound`]: Self::start_unbound
    pub fn resolver_ip(&self) -> IpAddr {
        addrs::RESOLVER_ADDR.parse().unwrap()
    }

    /// Starts unbound in the resolver namespace, on the resolver's
    /// client-side address, port 53.
    pub fn start_unbound(&self, opts: &UnboundOptions) -> Unbound {
        Unbound::start(&self.middle, self.resolver_ip(), opts)
    }
}

/// What to tell unbound; [`UnboundOptions::new`] gives the defaults.
#[derive(Clone, Debug)]
pub struct UnboundOptions {
    /// The stub zone, e.g. [`DOMAIN`] (no trailing dot needed).
    pub domain: String,
    /// The zone's authoritative server.
    pub stub: SocketAddr,
    /// `use-caps-for-id`: random 0x20 case in the names unbound sends to the
    /// server, which must echo the question's case exactly.
    pub caps_for_id: bool,
    /// `edns-buffer-size` of unbound's queries (unbound's default: 1232).
    pub edns_buffer_size: Option<u16>,
    /// `qname-minimisation`: for names several labels below the zone,
    /// unbound first sends A queries for the shorter names.
    pub qname_minimisation: bool,
    /// A certificate and key (PEM files) for DNS over TLS on [`DOT_PORT`]
    /// and DNS over HTTPS on [`DOH_PORT`] (HTTP/2, path [`DOH_PATH`]),
    /// beside plain DNS on 53.
    pub tls: Option<UnboundTls>,
    /// Raw lines appended to the `server:` clause (they override the
    /// template's settings), e.g. `"verbosity: 3"`.
    pub extra: Vec<String>,
}

/// Unbound's certificate and key for DoT and DoH.
#[derive(Clone, Debug)]
pub struct UnboundTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl UnboundOptions {
    /// No case randomization, default EDNS size, no qname minimisation.
    pub fn new(domain: &str, stub: SocketAddr) -> Self {
        Self {
            domain: domain.to_string(),
            stub,
            caps_for_id: false,
            edns_buffer_size: None,
            qname_minimisation: false,
            tls: None,
            extra: Vec::new(),
        }
    }
}

/// `yes` or `no`.
fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// The config file's text (see the module's doc and [`UnboundOptions`]).
pub fn unbound_config(dir: &Path, listen: IpAddr, opts: &UnboundOptions) -> String {
    let dir = dir.display();
    let domain = opts.domain.trim_end_matches('.');
    let stub = format!("{}@{}", opts.stub.ip(), opts.stub.port());
    let edns = match opts.edns_buffer_size {
        Some(size) => format!("    edns-buffer-size: {size}\n"),
        None => String::new(),
    };
    let extra: String = opts.extra.iter().map(|l| format!("    {l}\n")).collect();
    let caps = yes_no(opts.caps_for_id);
    let qmin = yes_no(opts.qname_minimisation);
    let tls = match &opts.tls {
        // Unbound serves TLS on the interfaces whose port is tls-port, and
        // DoH on those whose port is https-port.
        Some(t) => format!(
            "    interface: {listen}@{DOT_PORT}\n    interface: {listen}@{DOH_PORT}\n    \
             tls-port: {DOT_PORT}\n    https-port: {DOH_PORT}\n    \
             http-endpoint: \"{DOH_PATH}\"\n    \
             tls-service-pem: \"{}\"\n    tls-service-key: \"{}\"\n",
            t.cert.display(),
            t.key.display()
        ),
        None => String::new(),
    };
    format!(
        r#"# Written by the iptun test harness: our own unbound, not the system's.
server:
    interface: {listen}
    port: 53
{tls}    interface-automatic: no
    access-control: 0.0.0.0/0 allow
    access-control: ::/0 allow
    do-daemonize: no
    chroot: ""
    username: ""
    directory: "{dir}"
    pidfile: "{dir}/unbound.pid"
    use-syslog: no
    logfile: ""
    log-time-ascii: yes
    verbosity: 1
    log-queries: yes
    log-replies: yes
    log-servfail: yes
    num-threads: 1
    so-reuseport: no
    module-config: "iterator"
    domain-insecure: "{domain}"
    do-not-query-localhost: no
    harden-referral-path: no
    harden-below-nxdomain: no
    infra-keep-probing: yes
    infra-host-ttl: 30
    qname-minimisation: {qmin}
    use-caps-for-id: {caps}
{edns}    local-zone: "." refuse
    local-zone: "{domain}." transparent
{extra}
stub-zone:
    name: "{domain}."
    stub-addr: {stub}

remote-control:
    control-enable: no
"#
    )
}

/// The path of the unbound binary (Debian puts it in /usr/sbin, which a
/// test's PATH may lack).
fn unbound_bin() -> String {
    let in_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("unbound"))
            .find(|p| p.is_file())
    });
    let bin = in_path.unwrap_or_else(|| PathBuf::from("/usr/sbin/unbound"));
    assert!(
        bin.is_file(),
        "unbound not found: install the Debian package `unbound` (see .ci/run)"
    );
    bin.display().to_string()
}

/// A directory removed (with its content) on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Our own unbound, in the foreground, in a namespace; killed on drop (its
/// log printed if the test is panicking) and its temp dir removed.
pub struct Unbound {
    // Fields drop in order: the process before its directory.
    proc: Proc,
    addr: SocketAddr,
    config: String,
    dir: TempDir,
}

impl Unbound {
    /// Writes the config into a fresh temp dir, checks it with
    /// `unbound-checkconf`, starts `unbound -d -c CONFIG` inside `ns`
    /// listening on `listen` port 53, and waits (bounded) until it serves.
    pub fn start(ns: &Netns, listen: IpAddr, opts: &UnboundOptions) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{}-unbound{seq}", ns.name));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let dir = TempDir(dir);
        let config = unbound_config(&dir.0, listen, opts);
        let conf_path = dir.0.join("unbound.conf");
        std::fs::write(&conf_path, &config)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", conf_path.display()));
        let conf = conf_path.display().to_string();
        let bin = unbound_bin();
        let checkconf = Path::new(&bin).with_file_name("unbound-checkconf");
        let checked = super::run(&[&checkconf.display().to_string(), &conf]);
        assert!(
            checked.status.success(),
            "unbound-checkconf rejects our config:\n{}{}\n{config}",
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr),
        );
        // No `timeout` wrapper: killing the guard's child must kill unbound.
        let mut proc = ns.spawn(&[&bin, "-d", "-c", &conf]);
        super::wait_until(Duration::from_secs(10), "unbound to start", || {
            if let Some(status) = proc.try_wait() {
                panic!("unbound exited ({status}):\n{}\n{config}", proc.log());
            }
            proc.log().contains("start of service")
        });
        Self {
            proc,
            addr: SocketAddr::new(listen, 53),
            config,
            dir,
        }
    }

    /// Where unbound listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Unbound's log so far (stderr: start, queries, replies, SERVFAILs).
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// The config file it runs with.
    pub fn config(&self) -> &str {
        &self.config
    }

    /// Its temp dir (config, pidfile).
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.proc.try_wait().is_none()
    }
}

/// One DNS reply as [`dns_query`] saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsReply {
    /// Response code: 0 NOERROR, 2 SERVFAIL, 3 NXDOMAIN, 5 REFUSED.
    pub rcode: u8,
    /// The TC bit.
    pub truncated: bool,
    /// Each TXT answer's character-strings, concatenated.
    pub txt: Vec<String>,
    /// Every answer record as "owner TYPE rdata-in-hex" (TXT too).
    pub answers: Vec<String>,
}

const QUERY_PY: &str = r#"
import random, socket, struct, sys
server, port, name, qtype = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
edns, tries, wait = int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
TYPES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "NULL": 10, "MX": 15, "TXT": 16, "AAAA": 28}
qt = TYPES[qtype] if qtype in TYPES else int(qtype)
qid = random.getrandbits(16)
q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 1 if edns else 0)
for label in name.rstrip(".").split("."):
    q += bytes([len(label)]) + label.encode()
q += b"\0" + struct.pack(">HH", qt, 1)
if edns:
    q += b"\0" + struct.pack(">HHIH", 41, edns, 0, 0)

def skip_name(m, i):
    while True:
        n = m[i]
        if n == 0:
            return i + 1
        if n >= 0xC0:
            return i + 2
        i += 1 + n

def read_name(m, i):
    labels = []
    for _ in range(128):
        n = m[i]
        if n == 0:
            break
        if n >= 0xC0:
            i = ((n & 0x3F) << 8) | m[i + 1]
            continue
        labels.append(m[i + 1:i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    return ".".join(labels) + "."

fam = socket.AF_INET6 if ":" in server else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.settimeout(wait)
for _ in range(tries):
    try:
        s.sendto(q, (server, port))
        while True:
            m, _ = s.recvfrom(65535)
            if len(m) >= 12 and struct.unpack(">H", m[:2])[0] == qid:
                break
    except socket.timeout:
        continue
    except OSError as e:  # e.g. no route: as good as no answer
        print("error", e)
        sys.exit(3)
    flags, qd, an = struct.unpack(">HHH", m[2:8])
    print("rcode", flags & 15, "tc", (flags >> 9) & 1)
    i = 12
    for _ in range(qd):
        i = skip_name(m, i) + 4
    for _ in range(an):
        owner = read_name(m, i)
        i = skip_name(m, i)
        t, c, ttl, rdlen = struct.unpack(">HHIH", m[i:i + 10])
        i += 10
        rdata = m[i:i + rdlen]
        i += rdlen
        print("rr", owner, t, rdata.hex())
        if t == 16:
            j, txt = 0, b""
            while j < len(rdata):
                txt += rdata[j + 1:j + 1 + rdata[j]]
                j += 1 + rdata[j]
            print("txt", txt.decode("ascii", "replace"))
    sys.exit(0)
print("timeout")
sys.exit(3)
"#;

/// Sends one DNS query (RD set) for `name`/`qtype` ("TXT", "A", a number...)
/// from namespace `ns` to `server` over UDP, with an EDNS OPT advertising
/// `edns` bytes unless it is 0. Tries 3 times, 3 s each; `None` if nothing
/// answered (or sending failed, e.g. no route). Panics if the query script
/// itself fails.
pub fn dns_query(
    ns: &Netns,
    server: SocketAddr,
    name: &str,
    qtype: &str,
    edns: u16,
) -> Option<DnsReply> {
    let (ip, port, edns) = (
        server.ip().to_string(),
        server.port().to_string(),
        edns.to_string(),
    );
    let out = ns.exec(&[
        "timeout",
        "15",
        super::python(),
        "-c",
        QUERY_PY,
        &ip,
        &port,
        name,
        qtype,
        &edns,
        "3",
        "3",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    match out.status.code() {
        Some(0) => {}
        Some(3) => return None,
        _ => panic!(
            "DNS query for {name} {qtype} to {server} from {} failed: {}\n{stdout}{}",
            ns.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
    let mut reply = DnsReply::default();
    for line in stdout.lines() {
        let mut words = line.splitn(2, ' ');
        match (words.next(), words.next()) {
            (Some("rcode"), Some(rest)) => {
                let w: Vec<&str> = rest.split(' ').collect();
                reply.rcode = w[0].parse().expect("rcode");
                reply.truncated = w[2] == "1";
            }
            (Some("rr"), Some(rest)) => reply.answers.push(rest.to_string()),
            (Some("txt"), Some(rest)) => reply.txt.push(rest.to_string()),
            _ => {}
        }
    }
    Some(reply)
}

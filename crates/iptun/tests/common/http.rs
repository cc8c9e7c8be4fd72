//! Real HTTP middleboxes between a client and a server, for the HTTP(S) /
//! WebSocket transport: [`HttpTopology`] builds client — middle — server —
//! target, and runners start REAL Debian software in the middle namespace,
//! each with its own config, pid file and logs in a temp dir (never the
//! system's service, never its ports or namespace), waiting (bounded) until
//! it listens and killed on drop:
//!
//! - [`Nginx`]: reverse proxy terminating TLS with a certificate from our
//!   own test CA ([`TestPki`], made with the `openssl` CLI), proxying
//!   locations to the server's plain `http://` listener, with or without
//!   passing WebSocket upgrades;
//! - [`Squid`]: forward proxy with basic auth (`basic_ncsa_auth`, a password
//!   file hashed by `openssl passwd`), `CONNECT` allowed to [`TLS_PORTS`]
//!   only;
//! - [`Tinyproxy`]: forward proxy with basic auth, `CONNECT` to
//!   [`TLS_PORTS`] only.
//!
//! Both forward proxies drop the `Upgrade` header of forwarded `http://`
//! requests (checked by `http_harness_selftest.rs`, not assumed): a client
//! behind them talking to an `http://` server can't use WebSocket and must
//! long-poll. Through `CONNECT` (for `https://` servers) they pass bytes
//! untouched, so WebSocket works.
//!
//! Probes: [`curl`] (status codes, bodies, CONNECT codes), [`ws_probe`] (a
//! WebSocket upgrade request, direct / through a proxy / over TLS, and
//! whether the upgraded connection carries bytes), [`Backend`] (a tiny HTTP
//! server that reports what reached it and accepts upgrades) and
//! [`kill_tcp`] (resets a namespace's TCP connections: `ss -K`, or an
//! nftables reject rule where the kernel lacks socket destroy).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::{Netns, Proc, TempDir};

pub use super::line::addrs;

/// The tunnel's URL path on the server (and on nginx).
pub const TUNNEL_PATH: &str = "/tunnel";
/// The server's `https://` port (the scheme's default).
pub const HTTPS_PORT: u16 = 443;
/// The server's plain `http://` port (behind nginx, or for http:// through a
/// forward proxy).
pub const HTTP_PORT: u16 = 8080;
/// Ports the forward proxies allow `CONNECT` to (443: iptun; 8443: the
/// benchmark's OpenVPN). Any other port gets 403.
pub const TLS_PORTS: [u16; 2] = [443, 8443];
/// Where the runners listen, on the middle box's client side.
pub const NGINX_PORT: u16 = 443;
pub const SQUID_PORT: u16 = 3128;
pub const TINYPROXY_PORT: u16 = 8888;
/// The forward proxies' basic-auth credentials.
pub const PROXY_USER: &str = "tunneler";
pub const PROXY_PASS: &str = "pr0xy-Pass";

/// client — middle — server — target: [`LineTopology`], the HTTP
/// middleboxes running in the middle.
pub use super::line::LineTopology as HttpTopology;

impl HttpTopology {
    /// `https://203.0.113.2/tunnel`: the server's own TLS listener.
    pub fn server_https_url(&self) -> String {
        format!("https://{}{TUNNEL_PATH}", addrs::SERVER_ADDR)
    }

    /// `http://203.0.113.2:8080/tunnel`: the server's plain listener.
    pub fn server_http_url(&self) -> String {
        format!("http://{}:{HTTP_PORT}{TUNNEL_PATH}", addrs::SERVER_ADDR)
    }

    /// Where the server's plain listener is.
    pub fn server_http_addr(&self) -> SocketAddr {
        SocketAddr::new(addrs::SERVER_ADDR.parse().unwrap(), HTTP_PORT)
    }

    /// Nginx in the middle on 192.0.2.1:443 (TLS, a fresh test CA in
    /// `pki`), proxying to the server's plain listener: [`TUNNEL_PATH`] with
    /// WebSocket upgrades if `upgrade`, without otherwise.
    pub fn start_nginx(&self, upgrade: bool) -> Nginx {
        let pki = TestPki::generate(addrs::MIDDLE_ADDR);
        let opts = NginxOptions {
            listen: SocketAddr::new(addrs::MIDDLE_ADDR.parse().unwrap(), NGINX_PORT),
            upstream: self.server_http_addr(),
            locations: vec![NginxLocation {
                path: TUNNEL_PATH.to_string(),
                upgrade,
            }],
        };
        Nginx::start(&self.middle, pki, &opts)
    }

    /// Squid in the middle on 192.0.2.1:3128, basic auth [`PROXY_USER`] /
    /// [`PROXY_PASS`].
    pub fn start_squid(&self) -> Squid {
        Squid::start(&self.middle, &ProxyOptions::middle(SQUID_PORT))
    }

    /// Tinyproxy in the middle on 192.0.2.1:8888, basic auth [`PROXY_USER`]
    /// / [`PROXY_PASS`].
    pub fn start_tinyproxy(&self) -> Tinyproxy {
        Tinyproxy::start(&self.middle, &ProxyOptions::middle(TINYPROXY_PORT))
    }
}

// ---------------------------------------------------------------- helpers

/// A Debian daemon's binary: in PATH, else in /usr/sbin (which a test's PATH
/// may lack); panics naming the package to install.
fn sbin(name: &str, package: &str) -> String {
    let in_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    let bin = in_path.unwrap_or_else(|| Path::new("/usr/sbin").join(name));
    assert!(
        bin.is_file(),
        "{name} not found: install the Debian package `{package}` (see .ci/run)"
    );
    bin.display().to_string()
}

/// A fresh temp dir `<ns>-<what><seq>` (runners of one namespace don't
/// collide), world-readable so that daemons dropping privileges can read it.
fn runner_dir(ns: &Netns, what: &str) -> TempDir {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("{}-{what}{seq}", ns.name));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    set_mode(&dir, 0o755);
    TempDir(dir)
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Whether something in `ns` listens on TCP `addr`.
pub fn listening(ns: &Netns, addr: SocketAddr) -> bool {
    let out = ns.exec(&["ss", "-ltnH"]);
    String::from_utf8_lossy(&out.stdout).lines().any(|l| {
        l.split_whitespace()
            .nth(3)
            .is_some_and(|local| local == addr.to_string())
    })
}

/// Waits (bounded) until `proc` listens on `addr`; panics with its log (and
/// `config`) if it exits first.
fn wait_listening(ns: &Netns, proc: &mut Proc, addr: SocketAddr, what: &str, config: &str) {
    super::wait_until(
        Duration::from_secs(15),
        &format!("{what} to listen on {addr}"),
        || {
            if let Some(status) = proc.try_wait() {
                panic!(
                    "{what} exited ({status}):\n{}\n--- config:\n{config}",
                    proc.log()
                );
            }
            listening(ns, addr)
        },
    );
}

/// The environment variables of proxies, which the test's own environment
/// (a CI runner's, say) must not leak into the programs under test.
pub const PROXY_ENV: [&str; 8] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// `env -u HTTPS_PROXY -u ... NAME=VALUE...`: a command prefix that clears
/// [`PROXY_ENV`] and then sets `vars`.
pub fn clean_env(vars: &[(&str, &str)]) -> Vec<String> {
    let mut args = vec!["env".to_string()];
    for v in PROXY_ENV {
        args.extend(["-u".to_string(), v.to_string()]);
    }
    args.extend(vars.iter().map(|(k, v)| format!("{k}={v}")));
    args
}

// ---------------------------------------------------------------- test PKI

/// A test CA and a server certificate signed by it, for one IP address (IP
/// SAN), made with the `openssl` CLI in a temp dir: P-256 keys, valid 2
/// days, the CA with `basicConstraints CA:TRUE` and `keyCertSign`, the leaf
/// with `serverAuth` (what rustls/webpki insist on).
pub struct TestPki {
    pub ca_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
    dir: TempDir,
}

impl TestPki {
    pub fn generate(ip: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{}pki{seq}", super::ns_prefix("http")));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the PKI dir");
        let dir = TempDir(dir);
        let f = |n: &str| dir.file(n).display().to_string();
        let openssl = |args: &[&str]| {
            let mut all = vec!["openssl"];
            all.extend_from_slice(args);
            super::run_ok(&all);
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &f("ca.key"),
            "-out",
            &f("ca.pem"),
            "-days",
            "2",
            "-subj",
            "/CN=iptun test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &f("server.key"),
            "-out",
            &f("server.csr"),
            "-subj",
            &format!("/CN={ip}"),
        ]);
        write(
            &dir.file("server.ext"),
            &format!(
                "subjectAltName=IP:{ip}\nbasicConstraints=critical,CA:FALSE\n\
                 keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
            ),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            &f("server.csr"),
            "-CA",
            &f("ca.pem"),
            "-CAkey",
            &f("ca.key"),
            "-CAcreateserial",
            "-out",
            &f("server.pem"),
            "-days",
            "2",
            "-extfile",
            &f("server.ext"),
        ]);
        Self {
            ca_pem: dir.file("ca.pem"),
            cert_pem: dir.file("server.pem"),
            key_pem: dir.file("server.key"),
            dir,
        }
    }

    /// The CA file for `--tls-ca` / `curl --cacert`.
    pub fn ca(&self) -> &str {
        path_str(&self.ca_pem)
    }
}

// ---------------------------------------------------------------- nginx

/// One `location = PATH` of [`Nginx`], proxied to the upstream.
#[derive(Clone, Debug)]
pub struct NginxLocation {
    pub path: String,
    /// Pass WebSocket upgrades (`Upgrade` / `Connection: upgrade` headers);
    /// without, nginx drops the client's `Upgrade` (a hop-by-hop header) and
    /// the upstream sees a plain GET.
    pub upgrade: bool,
}

#[derive(Clone, Debug)]
pub struct NginxOptions {
    /// Where nginx listens (TLS).
    pub listen: SocketAddr,
    /// The plain-HTTP upstream (the iptun server's `http://` listener).
    pub upstream: SocketAddr,
    /// Exact-match locations; every other path gets 404 from nginx itself.
    pub locations: Vec<NginxLocation>,
}

/// The config file's text: foreground, one worker running as root (its temp
/// paths are in our dir), errors to stderr, TLS with `pki`'s certificate;
/// every location with HTTP/1.1 to the upstream, no buffering either way
/// (long-poll bodies and WebSocket frames flow at once) and hour-long
/// timeouts (the server holds long-poll requests ~15 s; WebSocket
/// connections idle between keepalives).
pub fn nginx_config(dir: &Path, pki: &TestPki, opts: &NginxOptions) -> String {
    let d = dir.display();
    let mut locations = String::new();
    for loc in &opts.locations {
        let headers = if loc.upgrade {
            "        proxy_set_header Upgrade $http_upgrade;\n        \
             proxy_set_header Connection $connection_upgrade;\n"
        } else {
            "        proxy_set_header Upgrade \"\";\n        proxy_set_header Connection \"\";\n"
        };
        locations += &format!(
            r#"    location = {path} {{
        proxy_pass http://{upstream};
        proxy_http_version 1.1;
{headers}        proxy_set_header Host $host;
        proxy_read_timeout 3600s;
        proxy_send_timeout 3600s;
        proxy_buffering off;
        proxy_request_buffering off;
        client_max_body_size 0;
    }}
"#,
            path = loc.path,
            upstream = opts.upstream,
        );
    }
    format!(
        r#"# Written by the iptun test harness: our own nginx, not the system's.
daemon off;
master_process on;
worker_processes 1;
user root;
pid {d}/nginx.pid;
error_log stderr info;
events {{ worker_connections 512; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen {listen} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
{locations}        location / {{ return 404; }}
    }}
}}
"#,
        listen = opts.listen,
        cert = pki.cert_pem.display(),
        key = pki.key_pem.display(),
    )
}

/// Our own nginx (`nginx -p DIR -e stderr -c DIR/nginx.conf`, config checked
/// with `-t` first) in a namespace; killed on drop (the master; the worker
/// dies with its namespace), its temp dir removed.
pub struct Nginx {
    // Fields drop in order: the process before its files.
    proc: Proc,
    pub listen: SocketAddr,
    config: String,
    dir: TempDir,
    pub pki: TestPki,
}

impl Nginx {
    pub fn start(ns: &Netns, pki: TestPki, opts: &NginxOptions) -> Self {
        let dir = runner_dir(ns, "nginx");
        let config = nginx_config(&dir.0, &pki, opts);
        let conf = dir.file("nginx.conf");
        write(&conf, &config);
        let bin = sbin("nginx", "nginx");
        let prefix = dir.0.display().to_string();
        let base = [&bin, "-p", &prefix, "-e", "stderr", "-c", path_str(&conf)];
        let mut test = base.to_vec();
        test.push("-t");
        let checked = ns.exec(&test);
        assert!(
            checked.status.success(),
            "nginx -t rejects our config:\n{}\n{config}",
            String::from_utf8_lossy(&checked.stderr),
        );
        let mut proc = ns.spawn(&base);
        wait_listening(ns, &mut proc, opts.listen, "nginx", &config);
        Self {
            proc,
            listen: opts.listen,
            config,
            dir,
            pki,
        }
    }

    /// `https://LISTEN-IP[:PORT]PATH` (no port if 443).
    pub fn url(&self, path: &str) -> String {
        if self.listen.port() == 443 {
            format!("https://{}{path}", self.listen.ip())
        } else {
            format!("https://{}{path}", self.listen)
        }
    }

    /// The CA that signed nginx's certificate (for `--tls-ca`).
    pub fn ca(&self) -> &str {
        self.pki.ca()
    }

    /// nginx's stderr (start-up, errors).
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// The access log: one line per request, with its status.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.file("access.log")).unwrap_or_default()
    }

    pub fn config(&self) -> &str {
        &self.config
    }
}

// ---------------------------------------------------------------- forward proxies

/// What a forward proxy gets told.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    pub listen: SocketAddr,
    /// Basic-auth user and password; `None`: no authentication.
    pub auth: Option<(String, String)>,
    /// Ports `CONNECT` may reach.
    pub connect_ports: Vec<u16>,
}

impl ProxyOptions {
    /// On the middle box's client side, [`PROXY_USER`] / [`PROXY_PASS`],
    /// `CONNECT` to [`TLS_PORTS`].
    pub fn middle(port: u16) -> Self {
        Self {
            listen: SocketAddr::new(addrs::MIDDLE_ADDR.parse().unwrap(), port),
            auth: Some((PROXY_USER.to_string(), PROXY_PASS.to_string())),
            connect_ports: TLS_PORTS.to_vec(),
        }
    }
}

/// What the tests need of a forward proxy.
pub trait ForwardProxy {
    fn name(&self) -> &'static str;
    fn listen(&self) -> SocketAddr;
    fn auth(&self) -> Option<(&str, &str)>;
    /// Everything the proxy has logged (its stderr, plus its access log).
    fn log(&self) -> String;

    /// `http://USER:PASS@HOST:PORT` with the right credentials.
    fn url(&self) -> String {
        match self.auth() {
            Some((u, p)) => self.url_with(u, p),
            None => self.url_without_auth(),
        }
    }

    /// `http://USER:PASS@HOST:PORT` with these credentials.
    fn url_with(&self, user: &str, pass: &str) -> String {
        format!("http://{user}:{pass}@{}", self.listen())
    }

    /// `http://HOST:PORT`.
    fn url_without_auth(&self) -> String {
        format!("http://{}", self.listen())
    }
}

/// Squid (`squid -N -f CONF`: foreground, no cache, memory only, its own
/// service name so no shared-memory or pid clash with a system squid). Squid
/// refuses to run as root and switches to Debian's `proxy` user, so its dir
/// is world-writable. Basic auth by `basic_ncsa_auth` against an apr1 hash
/// from `openssl passwd -apr1`; wrong or missing credentials get 407.
/// `CONNECT` only to `connect_ports`, plain requests only to ports 80 and
/// [`HTTP_PORT`]. Squid does not forward `Upgrade` (it has
/// `http_upgrade_request_protocols`, off by default, which we leave off).
pub struct Squid {
    // Fields drop in order: the process, then its shared memory and files.
    proc: Proc,
    _shm: SquidShm,
    opts: ProxyOptions,
    config: String,
    dir: TempDir,
}

/// Removes `/dev/shm/<service>-*.shm` on drop: a killed squid leaves its
/// shared memory segments behind.
struct SquidShm(String);

impl Drop for SquidShm {
    fn drop(&mut self) {
        let prefix = format!("{}-", self.0);
        if let Ok(entries) = std::fs::read_dir("/dev/shm") {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

impl Squid {
    pub fn start(ns: &Netns, opts: &ProxyOptions) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = runner_dir(ns, "squid");
        set_mode(&dir.0, 0o777);
        let d = dir.0.display();
        let auth = match &opts.auth {
            Some((user, pass)) => {
                let hash = super::run_ok(&["openssl", "passwd", "-apr1", pass]);
                let passwd = dir.file("passwd");
                write(&passwd, &format!("{user}:{}\n", hash.trim()));
                set_mode(&passwd, 0o644);
                let helper = [
                    "/usr/lib/squid/basic_ncsa_auth",
                    "/usr/lib/squid3/basic_ncsa_auth",
                ]
                .into_iter()
                .find(|p| Path::new(p).is_file())
                .expect("basic_ncsa_auth (Debian package squid)");
                format!(
                    "auth_param basic program {helper} {d}/passwd\n\
                     auth_param basic children 2 startup=1 idle=1\n\
                     auth_param basic realm iptun-test\n\
                     acl authed proxy_auth REQUIRED\n"
                )
            }
            None => "acl authed src all\n".to_string(),
        };
        let connect_ports: Vec<String> = opts.connect_ports.iter().map(u16::to_string).collect();
        let config = format!(
            r#"# Written by the iptun test harness: our own squid, not the system's.
http_port {listen}
pid_filename {d}/squid.pid
cache_log stdio:{d}/cache.log
access_log stdio:{d}/access.log
cache_store_log none
cache deny all
cache_mem 8 MB
coredump_dir {d}
netdb_filename none
pinger_enable off
collapsed_forwarding_shared_entries_limit 0
dns_nameservers 127.0.0.1
shutdown_lifetime 0 seconds
forwarded_for delete
via off
{auth}acl tunnel_ports port {connect_ports}
acl web_ports port 80 {HTTP_PORT}
acl CONNECT method CONNECT
http_access deny CONNECT !tunnel_ports
http_access deny !CONNECT !web_ports
http_access allow authed
http_access deny all
"#,
            listen = opts.listen,
            connect_ports = connect_ports.join(" "),
        );
        let conf = dir.file("squid.conf");
        write(&conf, &config);
        let bin = sbin("squid", "squid");
        let checked = ns.exec(&[&bin, "-k", "parse", "-f", path_str(&conf)]);
        assert!(
            checked.status.success(),
            "squid -k parse rejects our config:\n{}\n{config}",
            String::from_utf8_lossy(&checked.stderr),
        );
        // A service name of our own: squid names its shared memory and
        // default files after it.
        let service = format!(
            "iptun{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let shm = SquidShm(service.clone());
        let mut proc = ns.spawn(&[&bin, "-N", "-d1", "-n", &service, "-f", path_str(&conf)]);
        wait_listening(ns, &mut proc, opts.listen, "squid", &config);
        Self {
            proc,
            _shm: shm,
            opts: opts.clone(),
            config,
            dir,
        }
    }

    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.file("access.log")).unwrap_or_default()
    }

    pub fn config(&self) -> &str {
        &self.config
    }
}

impl ForwardProxy for Squid {
    fn name(&self) -> &'static str {
        "squid"
    }
    fn listen(&self) -> SocketAddr {
        self.opts.listen
    }
    fn auth(&self) -> Option<(&str, &str)> {
        self.opts
            .auth
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }
    fn log(&self) -> String {
        format!("{}--- access.log:\n{}", self.proc.log(), self.access_log())
    }
}

/// Tinyproxy (`tinyproxy -d -c CONF`: foreground, logging to stderr, running
/// as root so that it can read our dir). Basic auth: missing credentials get
/// 407, but WRONG credentials get 401 (tinyproxy 1.11's choice, checked by
/// the selftest). `CONNECT` only to `connect_ports` (403 otherwise). It
/// drops `Upgrade` from forwarded requests (a hop-by-hop header).
pub struct Tinyproxy {
    proc: Proc,
    opts: ProxyOptions,
    config: String,
    _dir: TempDir,
}

impl Tinyproxy {
    pub fn start(ns: &Netns, opts: &ProxyOptions) -> Self {
        let dir = runner_dir(ns, "tinyproxy");
        let mut config = format!(
            "# Written by the iptun test harness: our own tinyproxy, not the system's.\n\
             User root\nGroup root\nPort {port}\nListen {ip}\nTimeout 600\nLogLevel Info\n\
             PidFile \"{d}/tinyproxy.pid\"\nMaxClients 100\nAllow 0.0.0.0/0\n\
             DisableViaHeader Yes\n",
            port = opts.listen.port(),
            ip = opts.listen.ip(),
            d = dir.0.display(),
        );
        if let Some((user, pass)) = &opts.auth {
            config += &format!("BasicAuth {user} {pass}\n");
        }
        for p in &opts.connect_ports {
            config += &format!("ConnectPort {p}\n");
        }
        let conf = dir.file("tinyproxy.conf");
        write(&conf, &config);
        let bin = sbin("tinyproxy", "tinyproxy");
        let mut proc = ns.spawn(&[&bin, "-d", "-c", path_str(&conf)]);
        wait_listening(ns, &mut proc, opts.listen, "tinyproxy", &config);
        Self {
            proc,
            opts: opts.clone(),
            config,
            _dir: dir,
        }
    }

    pub fn config(&self) -> &str {
        &self.config
    }
}

impl ForwardProxy for Tinyproxy {
    fn name(&self) -> &'static str {
        "tinyproxy"
    }
    fn listen(&self) -> SocketAddr {
        self.opts.listen
    }
    fn auth(&self) -> Option<(&str, &str)> {
        self.opts
            .auth
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }
    fn log(&self) -> String {
        self.proc.log()
    }
}

// ---------------------------------------------------------------- probes

/// A tiny HTTP/1.1 server (stdlib python) standing in for the iptun server
/// in the selftest: answers every request with 200 and a body
/// `method=M target=T upgrade=U body=N` (what reached it: U is the request's
/// `Upgrade` header or `-`), and logs `REQ <request line> upgrade=U
/// connection=C`. A request with `Upgrade: websocket` gets `101 Switching
/// Protocols` (with the right `Sec-WebSocket-Accept`), after which it echoes
/// raw bytes. Only paths under `prefix` are served; others get 404.
const BACKEND_PY: &str = r#"
import base64, hashlib, socket, sys, threading
addr, port, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3]
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B85"
def handle(c):
    f = c.makefile("rb")
    line = f.readline().decode("latin-1").strip()
    headers = {}
    while True:
        h = f.readline().decode("latin-1")
        if h in ("\r\n", "\n", ""):
            break
        k, _, v = h.partition(":")
        headers[k.strip().lower()] = v.strip()
    up = headers.get("upgrade", "-")
    print("REQ", line, "upgrade=%s" % up, "connection=%s" % headers.get("connection", "-"), flush=True)
    parts = line.split(" ")
    method, target = (parts + ["", ""])[:2]
    n = int(headers.get("content-length", "0") or 0)
    body = f.read(n) if n else b""
    if not target.split("?")[0].startswith(prefix):
        c.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        c.close()
        return
    if up.lower() == "websocket":
        key = headers.get("sec-websocket-key", "").encode()
        acc = base64.b64encode(hashlib.sha1(key + GUID).digest())
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + acc + b"\r\n\r\n")
        while True:
            b = c.recv(65536)
            if not b:
                break
            c.sendall(b)
        c.close()
        return
    out = ("method=%s target=%s upgrade=%s body=%d\n" % (method, target, up, len(body))).encode()
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
              b"Content-Length: %d\r\n\r\n" % len(out) + out)
    c.close()
s = socket.create_server((addr, port))
print("listening", port, flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;

/// [`BACKEND_PY`] running in a namespace; killed on drop.
pub struct Backend {
    proc: Proc,
    pub addr: SocketAddr,
}

impl Backend {
    /// Serves paths under `prefix` on `addr` (plain TCP, no TLS).
    pub fn start(ns: &Netns, addr: SocketAddr, prefix: &str) -> Self {
        let (ip, port) = (addr.ip().to_string(), addr.port().to_string());
        let mut proc = ns.spawn(&[super::python(), "-c", BACKEND_PY, &ip, &port, prefix]);
        wait_listening(ns, &mut proc, addr, "the test backend", BACKEND_PY);
        Self { proc, addr }
    }

    /// The `REQ ...` lines: every request that reached it.
    pub fn requests(&self) -> Vec<String> {
        self.proc
            .log()
            .lines()
            .filter(|l| l.starts_with("REQ "))
            .map(str::to_string)
            .collect()
    }
}

/// What [`curl`] saw.
#[derive(Clone, Debug)]
pub struct CurlResult {
    /// curl's exit code (0: transfer done, whatever the HTTP status).
    pub exit: i32,
    /// The final HTTP status (0 if none).
    pub status: u16,
    /// The proxy's answer to `CONNECT` (0 if none).
    pub connect_status: u16,
    pub body: String,
    pub stderr: String,
}

/// Runs `curl -sS ARGS URL` in `ns` (10 s at most, proxy variables of the
/// test's environment cleared: pass `-x` for a proxy).
pub fn curl(ns: &Netns, args: &[&str], url: &str) -> CurlResult {
    const MARK: &str = "\n@@curl-status@@";
    let mut all = clean_env(&[]);
    all.extend(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n@@curl-status@@%{http_code} %{http_connect}",
        ]
        .map(String::from),
    );
    all.extend(args.iter().map(|a| a.to_string()));
    all.push(url.to_string());
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let out = ns.exec(&refs);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, codes) = stdout.rsplit_once(MARK).unwrap_or((&stdout, "0 0"));
    let mut codes = codes.split_whitespace().map(|c| c.parse().unwrap_or(0));
    CurlResult {
        exit: out.status.code().unwrap_or(-1),
        status: codes.next().unwrap_or(0),
        connect_status: codes.next().unwrap_or(0),
        body: body.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Sends a WebSocket upgrade request for URL (http:// or https://),
/// directly or through a forward proxy (`http://[user:pass@]host:port`:
/// absolute-form request for http://, CONNECT then TLS for https://), over
/// TLS verified against CA (or not verified if "-"). Prints `status N`
/// (`connect N` first if CONNECT failed), and after a 101 sends a few bytes
/// and prints `echo ok` if they come back (the selftest backend echoes).
const WS_PROBE_PY: &str = r#"
import base64, os, socket, ssl, sys
from urllib.parse import urlsplit, unquote
url, proxy, ca = sys.argv[1], sys.argv[2], sys.argv[3]
u = urlsplit(url)
tls = u.scheme == "https"
port = u.port or (443 if tls else 80)
target = (u.path or "/") + ("?" + u.query if u.query else "")
auth = None
if proxy != "-":
    p = urlsplit(proxy)
    s = socket.create_connection((p.hostname, p.port), timeout=10)
    if p.username is not None:
        cred = "%s:%s" % (unquote(p.username), unquote(p.password or ""))
        auth = "Proxy-Authorization: Basic " + base64.b64encode(cred.encode()).decode() + "\r\n"
    if tls:
        s.sendall(("CONNECT %s:%d HTTP/1.1\r\nHost: %s:%d\r\n%s\r\n" % (u.hostname, port, u.hostname, port, auth or "")).encode())
        f = s.makefile("rb")
        status = f.readline().decode()
        while f.readline() not in (b"\r\n", b"\n", b""):
            pass
        code = int(status.split()[1])
        if code != 200:
            print("connect", code)
            print("status 0")
            sys.exit(0)
    else:
        target = url
else:
    s = socket.create_connection((u.hostname, port), timeout=10)
if tls:
    ctx = ssl.create_default_context(cafile=ca) if ca != "-" else ssl._create_unverified_context()
    s = ctx.wrap_socket(s, server_hostname=u.hostname)
key = base64.b64encode(os.urandom(16)).decode()
req = ("GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
       "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n" % (target, u.hostname, port, key))
if auth and not tls:
    req += auth
s.sendall((req + "\r\n").encode())
f = s.makefile("rb")
status = f.readline().decode()
while f.readline() not in (b"\r\n", b"\n", b""):
    pass
code = int(status.split()[1]) if len(status.split()) > 1 else 0
print("status", code, flush=True)
if code == 101:
    probe = b"iptun-ws-probe-" + os.urandom(8).hex().encode()
    s.sendall(probe)
    got = b""
    while len(got) < len(probe):
        b = s.recv(len(probe) - len(got))
        if not b:
            break
        got += b
    print("echo", "ok" if got == probe else "bad", flush=True)
"#;

/// What [`ws_probe`] saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WsProbe {
    /// The proxy's non-200 answer to CONNECT, if any.
    pub connect: Option<u16>,
    /// The status of the upgrade request (101: upgraded).
    pub status: u16,
    /// After a 101: whether bytes came back through the upgraded connection.
    pub echoed: bool,
}

/// Sends a WebSocket upgrade request to `url` from `ns`, through `proxy`
/// (a [`ForwardProxy::url`]-style URL) if any, verifying TLS with `ca` if
/// given (not verifying otherwise). Bounded to 15 s; panics if the probe
/// itself fails (connection refused, TLS error...).
pub fn ws_probe(ns: &Netns, url: &str, proxy: Option<&str>, ca: Option<&str>) -> WsProbe {
    let out = ns.exec(&[
        "timeout",
        "15",
        super::python(),
        "-c",
        WS_PROBE_PY,
        url,
        proxy.unwrap_or("-"),
        ca.unwrap_or("-"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "WebSocket probe of {url} (proxy {proxy:?}) from {} failed: {}\n{stdout}{}",
        ns.name,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut probe = WsProbe::default();
    for line in stdout.lines() {
        match line.split_once(' ') {
            Some(("connect", c)) => probe.connect = c.trim().parse().ok(),
            Some(("status", c)) => probe.status = c.trim().parse().expect("status"),
            Some(("echo", e)) => probe.echoed = e.trim() == "ok",
            _ => {}
        }
    }
    probe
}

// ---------------------------------------------------------------- killing connections

/// The local ports of `ns`'s established TCP connections to `dst`:`dport`.
pub fn tcp_connections(ns: &Netns, dst: &str, dport: u16) -> Vec<u16> {
    let out = ns.exec_ok(&["ss", "-tnH", "state", "established"]);
    let want = format!("{dst}:{dport}");
    out.lines()
        .filter_map(|l| {
            // Recv-Q Send-Q Local:Port Peer:Port (no State column with a state filter)
            let w: Vec<&str> = l.split_whitespace().collect();
            let local = w.get(2)?;
            let peer = w.get(3)?;
            (*peer == want)
                .then(|| local.rsplit_once(':')?.1.parse().ok())
                .flatten()
        })
        .collect()
}

/// How [`kill_tcp`] reset the connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillMethod {
    /// `ss -K`: the kernel destroys the sockets (CONFIG_INET_DIAG_DESTROY);
    /// the local socket gets ECONNABORTED, the peer a RST.
    SsKill,
    /// An nftables rule in `ns`'s output hook answering the connections'
    /// next outgoing segment with a TCP reset to the local socket (matched
    /// by local port, so new connections pass), removed once they are gone.
    NftReset,
}

/// Resets `ns`'s established TCP connections to `dst`:`dport` with
/// `method` (`None`: `ss -K` if the kernel supports it, else nftables).
/// `poke` is called while waiting, to make the owner send something (an
/// nftables reset needs an outgoing segment; a ping through a tunnel does).
/// Returns the method used and the local ports that were killed; panics if
/// there was no such connection or it survives 15 s.
pub fn kill_tcp(
    ns: &Netns,
    dst: &str,
    dport: u16,
    method: Option<KillMethod>,
    mut poke: impl FnMut(),
) -> (KillMethod, Vec<u16>) {
    let ports = tcp_connections(ns, dst, dport);
    assert!(
        !ports.is_empty(),
        "no established TCP connection to {dst}:{dport} in {}",
        ns.name
    );
    let gone = |ns: &Netns| {
        let now = tcp_connections(ns, dst, dport);
        ports.iter().all(|p| !now.contains(p))
    };
    if method != Some(KillMethod::NftReset) {
        let dport_filter = format!(":{dport}");
        ns.exec(&["ss", "-K", "-tn", "dst", dst, "dport", "=", &dport_filter]);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if gone(ns) {
                return (KillMethod::SsKill, ports);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            method.is_none(),
            "ss -K did not kill {ports:?} to {dst}:{dport} in {}",
            ns.name
        );
    }
    let table = "iptun_test_kill";
    let set: Vec<String> = ports.iter().map(u16::to_string).collect();
    let rules = format!(
        "table inet {table} {{\n  chain out {{\n    type filter hook output priority filter; policy accept;\n    \
         ip daddr {dst} tcp dport {dport} tcp sport {{ {} }} reject with tcp reset\n  }}\n}}\n",
        set.join(", ")
    );
    nft_apply(ns, &rules);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut ok = false;
    while Instant::now() < deadline {
        if gone(ns) {
            ok = true;
            break;
        }
        poke();
        std::thread::sleep(Duration::from_millis(100));
    }
    ns.exec(&["nft", "delete", "table", "inet", table]);
    assert!(
        ok,
        "the nftables reset did not kill {ports:?} to {dst}:{dport} in {} within 15 s",
        ns.name
    );
    (KillMethod::NftReset, ports)
}

/// `nft -f -` in `ns` with `rules`; panics on failure.
pub fn nft_apply(ns: &Netns, rules: &str) {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut nft = Command::new("ip")
        .args(["netns", "exec", &ns.name, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("run nft");
    nft.stdin
        .take()
        .expect("stdin")
        .write_all(rules.as_bytes())
        .expect("write the ruleset");
    assert!(
        nft.wait().expect("wait for nft").success(),
        "nft -f failed:\n{rules}"
    );
}

// ---------------------------------------------------------------- iptun's TLS pin

/// The `sha256:<64 lowercase hex>` after `TLS certificate pin: ` in a
/// server's log, if it has logged it.
pub fn tls_pin_from_log(log: &str) -> Option<String> {
    log.lines().find_map(|l| {
        let rest = &l[l.find("TLS certificate pin: ")? + "TLS certificate pin: ".len()..];
        find_pin(rest)
    })
}

/// The first `sha256:<64 lowercase hex>` in `text`.
pub fn find_pin(text: &str) -> Option<String> {
    let mut from = 0;
    while let Some(i) = text[from..].find("sha256:") {
        let start = from + i;
        let hex: String = text[start + 7..]
            .chars()
            .take_while(|c| c.is_ascii_hexdigit())
            .collect();
        if hex.len() == 64 && hex.chars().all(|c| !c.is_ascii_uppercase()) {
            return Some(format!("sha256:{hex}"));
        }
        from = start + 7;
    }
    None
}

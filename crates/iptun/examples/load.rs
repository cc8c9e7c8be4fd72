//! A load generator for an `iptun server`: many sans-IO client engines over
//! real UDP sockets from one process (`bench/scale.sh` runs it in network
//! namespaces; `tests/e2e_scale.rs` runs a small version).
//!
//! - `load keys`: write N client keys, and the matching `--allow-file`.
//! - `load sessions`: bring up a session for every key, at most `--window`
//!   handshakes outstanding at once, from the addresses of `--sources`
//!   (one socket each: many clients behind few addresses, as behind NATs);
//!   then every session pings the server's tunnel address through its own
//!   session, and each reply must come back to the session that asked (its
//!   own address and echo id inside, opened with its own keys). Keys beyond
//!   the pool (`--extra`) must be refused without disturbing the others.
//!   Prints handshakes per second, the time until all were up, the server's
//!   RSS per session (`--server-pid`), and what data reached whom.
//! - `load flood`: send one captured init (or a ring of fresh ones) from
//!   spoofed source addresses as fast as it can, through a raw socket.
//!
//! Datagrams from the server are told apart by the receiver index in their
//! header (the client's index from its init), so sessions can share sockets.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use ipnet::Ipv4Net;
use iptun_proto::crypto::{PrivateKey, PublicKey};
use iptun_proto::engine::{Client, ClientConfig, ClientOutput};
use iptun_proto::wire::message::{TYPE_COOKIE, TYPE_DATA, TYPE_INIT, TYPE_RESPONSE};

#[derive(Parser)]
#[command(about = "Load generator for an iptun server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write COUNT client private keys (one a line) and their public keys.
    Keys {
        #[arg(long)]
        count: usize,
        /// Where the private keys go.
        #[arg(long)]
        keys: PathBuf,
        /// Where the public keys go (an --allow-file for the server).
        #[arg(long)]
        allow: PathBuf,
    },
    /// Bring up a session per key and check that data flows in each.
    Sessions(SessionArgs),
    /// Flood the server with an init from spoofed addresses.
    Flood(FloodArgs),
}

#[derive(clap::Args)]
struct SessionArgs {
    /// The server's UDP address.
    #[arg(long)]
    server: SocketAddrV4,
    /// The server's public key.
    #[arg(long)]
    server_key: String,
    /// The client private keys (from `load keys`).
    #[arg(long)]
    keys: PathBuf,
    /// Sessions to bring up: the first COUNT keys.
    #[arg(long)]
    count: usize,
    /// Further keys the server admits but has no address for: each must
    /// be refused, and the others must not notice.
    #[arg(long, default_value_t = 0)]
    extra: usize,
    /// Source addresses, one socket each (they must be local: an address of
    /// an interface, or a `local` route).
    #[arg(long)]
    sources: Ipv4Net,
    /// Handshakes outstanding at most.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Echo requests each session sends to the server's tunnel address.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..31))]
    pings: u16,
    /// Give up after this long.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// The server's process, for its memory.
    #[arg(long)]
    server_pid: Option<u32>,
}

#[derive(clap::Args)]
struct FloodArgs {
    /// The server's UDP address.
    #[arg(long)]
    server: SocketAddrV4,
    /// The server's public key.
    #[arg(long)]
    server_key: String,
    /// The private key the inits are made with (any key: an admitted one
    /// makes the server's work the largest).
    #[arg(long)]
    key: String,
    /// Spoofed sources: this many addresses from `--spoof-from` on.
    #[arg(long, default_value_t = 50)]
    spoof: u32,
    #[arg(long, default_value = "10.66.0.1")]
    spoof_from: Ipv4Addr,
    /// Distinct inits to cycle through (1: one captured init, replayed).
    #[arg(long, default_value_t = 1)]
    fresh: usize,
    /// How long.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Inits a second at most (0: as fast as it can).
    #[arg(long, default_value_t = 0)]
    pps: u64,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Keys { count, keys, allow } => write_keys(count, &keys, &allow),
        Command::Sessions(args) => Load::new(&args)?.run(&args),
        Command::Flood(args) => flood(&args),
    }
}

fn write_keys(count: usize, keys: &PathBuf, allow: &PathBuf) -> anyhow::Result<()> {
    let private: Vec<PrivateKey> = (0..count).map(|_| PrivateKey::generate()).collect();
    let lines =
        |f: &dyn Fn(&PrivateKey) -> String| private.iter().map(|k| f(k) + "\n").collect::<String>();
    std::fs::write(keys, lines(&|k| k.to_base64())).context("writing --keys")?;
    std::fs::write(allow, lines(&|k| k.public_key().to_base64())).context("writing --allow")?;
    Ok(())
}

fn read_keys(path: &PathBuf, n: usize) -> anyhow::Result<Vec<PrivateKey>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let keys: Vec<_> = text
        .lines()
        .take(n)
        .map(PrivateKey::from_base64)
        .collect::<Result<_, _>>()
        .context("a bad key")?;
    if keys.len() < n {
        bail!("{} holds {} keys, not {n}", path.display(), keys.len());
    }
    Ok(keys)
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One client session and what happened to it.
struct Session {
    client: Client,
    socket: usize,
    started: Option<Instant>,
    up: Option<Instant>,
    /// The echo sequence numbers answered to it (bit n: sequence n).
    answered: u32,
    /// Replies that arrived here but were not for it.
    strays: u32,
}

/// The generator: sessions, sockets, and a timer heap.
struct Load {
    sessions: Vec<Session>,
    sockets: Vec<UdpSocket>,
    server: SocketAddr,
    /// Receiver index (the client's, from its init) to session.
    by_index: HashMap<u32, usize>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    scheduled: Vec<Option<Instant>>,
    buf: Vec<u8>,
    out: Vec<u8>,
    /// Echo replies received, in all.
    answered: usize,
    /// Inits sent, in all (retries and rekeys included).
    inits: usize,
    /// Sessions started, and those of them up: counted as they change (a
    /// scan of ten thousand sessions per start cost more than their keys).
    started: usize,
    up: usize,
}

impl Load {
    fn new(args: &SessionArgs) -> anyhow::Result<Self> {
        let server_key = PublicKey::from_base64(&args.server_key).context("--server-key")?;
        let keys = read_keys(&args.keys, args.count + args.extra)?;
        let sockets = args
            .sources
            .hosts()
            .map(|ip| bind(SocketAddrV4::new(ip, 0)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let now = Instant::now();
        let sessions = keys
            .into_iter()
            .enumerate()
            .map(|(i, key)| Session {
                client: Client::new(ClientConfig::new(key, server_key), now, unix_nanos()),
                socket: i % sockets.len(),
                started: None,
                up: None,
                answered: 0,
                strays: 0,
            })
            .collect::<Vec<_>>();
        Ok(Self {
            scheduled: vec![None; sessions.len()],
            sessions,
            sockets,
            server: args.server.into(),
            by_index: HashMap::new(),
            timers: BinaryHeap::new(),
            buf: vec![0; 1 << 16],
            out: vec![0; 1 << 16],
            answered: 0,
            inits: 0,
            started: 0,
            up: 0,
        })
    }

    fn run(mut self, args: &SessionArgs) -> anyhow::Result<()> {
        let rss = |pid: Option<u32>| pid.and_then(rss_kib);
        let base = rss(args.server_pid);
        let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
        let t0 = Instant::now();

        // 1. All sessions up (and the extra ones refused).
        let mut next = 0;
        while self.up() < args.count && Instant::now() < deadline {
            while next < args.count && self.outstanding() < args.window {
                self.start(next);
                next += 1;
            }
            self.turn(Duration::from_millis(5))?;
        }
        let all_up = t0.elapsed();
        let up = self.up();
        println!("sessions up: {up} of {}", args.count);
        println!("time until all up: {:.2} s", all_up.as_secs_f64());
        println!(
            "handshakes per second: {:.0}",
            up as f64 / all_up.as_secs_f64()
        );

        // Idle sessions, settled.
        self.run_for(Duration::from_secs(1))?;
        if let (Some(b), Some(after)) = (base, rss(args.server_pid)) {
            println!("server RSS: {b} KiB before, {after} KiB with {up} sessions");
            let per = (after.saturating_sub(b)) as f64 / up.max(1) as f64;
            println!("server RSS per session: {per:.2} KiB");
        }

        // 2. Data through every session, each reply to its own session.
        for seq in 0..args.pings {
            self.ping_round(0..args.count, seq)?;
        }
        let full = self.sessions[..args.count]
            .iter()
            .filter(|s| s.answered.count_ones() == u32::from(args.pings))
            .count();
        let strays: u32 = self.sessions.iter().map(|s| s.strays).sum();
        println!(
            "sessions with every echo answered: {full} of {}",
            args.count
        );
        println!("echo replies delivered to the wrong session: {strays}");

        // 3. The keys beyond the pool try (two attempts each), then the
        // others carry data again.
        for i in args.count..self.sessions.len() {
            self.start(i);
        }
        self.run_for(Duration::from_millis(if args.extra > 0 { 1500 } else { 0 }))?;
        let extra_up = self.sessions[args.count..]
            .iter()
            .filter(|s| s.up.is_some())
            .count();
        println!(
            "extra sessions (beyond the pool) up: {extra_up} of {}",
            args.extra
        );
        self.ping_round(0..args.count, args.pings)?;
        let all = args.pings + 1;
        let after = self.sessions[..args.count]
            .iter()
            .filter(|s| s.answered.count_ones() == u32::from(all))
            .count();
        println!(
            "sessions answered after the extra ones tried: {after} of {}",
            args.count
        );

        let ok = up == args.count
            && full == args.count
            && strays == 0
            && extra_up == 0
            && after == args.count;
        println!("result: {}", if ok { "ok" } else { "FAILED" });
        if !ok {
            std::process::exit(1);
        }
        Ok(())
    }

    fn up(&self) -> usize {
        self.up
    }

    fn outstanding(&self) -> usize {
        self.started - self.up
    }

    fn start(&mut self, i: usize) {
        if self.sessions[i].started.is_none() {
            self.started += 1;
        }
        self.sessions[i].started = Some(Instant::now());
        self.schedule(i);
    }

    /// Run for `d`, whatever happens.
    fn run_for(&mut self, d: Duration) -> anyhow::Result<()> {
        self.run_until(d, |_| false)
    }

    fn run_until(&mut self, d: Duration, done: impl Fn(&Self) -> bool) -> anyhow::Result<()> {
        let end = Instant::now() + d;
        while Instant::now() < end && !done(self) {
            self.turn(Duration::from_millis(5))?;
        }
        Ok(())
    }

    /// One turn: due timers, then whatever the sockets hold, then a wait
    /// of at most `wait` for more.
    fn turn(&mut self, wait: Duration) -> anyhow::Result<()> {
        self.fire_timers();
        let mut got = false;
        for s in 0..self.sockets.len() {
            got |= self.drain(s)?;
        }
        if !got {
            wait_readable(&self.sockets, wait);
        }
        Ok(())
    }

    fn schedule(&mut self, i: usize) {
        let t = if self.sessions[i].started.is_some() {
            self.sessions[i].client.next_timeout()
        } else {
            None
        };
        if let Some(at) = t
            && t != self.scheduled[i]
        {
            self.scheduled[i] = t;
            self.timers.push(Reverse((at, i)));
        }
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(&Reverse((t, i))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            if self.scheduled[i] != Some(t) {
                continue; // rescheduled since
            }
            self.scheduled[i] = None;
            let s = &mut self.sessions[i];
            if let Some(n) = s.client.poll_timers(now, &mut self.out) {
                if self.out[0] == TYPE_INIT {
                    self.inits += 1;
                    let index = u32::from_le_bytes(self.out[4..8].try_into().expect("4 bytes"));
                    self.by_index.insert(index, i);
                }
                let _ = self.sockets[s.socket].send_to(&self.out[..n], self.server);
            }
            self.schedule(i);
        }
    }

    /// Everything socket `s` holds; whether there was anything.
    fn drain(&mut self, s: usize) -> anyhow::Result<bool> {
        let mut got = false;
        loop {
            let n = match self.sockets[s].recv_from(&mut self.buf) {
                Ok((n, _)) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(got),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e).context("receiving"),
            };
            got = true;
            self.handle(n);
        }
    }

    fn handle(&mut self, n: usize) {
        let Some(&i) = receiver(&self.buf[..n]).and_then(|r| self.by_index.get(&r)) else {
            return;
        };
        let now = Instant::now();
        let s = &mut self.sessions[i];
        let lease = s.client.tunnel().map(|t| t.client_v4);
        match s.client.handle_datagram(now, &self.buf[..n], &mut self.out) {
            Ok(ClientOutput::Send(m)) => {
                if m[0] == TYPE_INIT {
                    // A cookie reply: the same init again, with mac2.
                    let index = u32::from_le_bytes(m[4..8].try_into().expect("4 bytes"));
                    self.by_index.insert(index, i);
                }
                let _ = self.sockets[s.socket].send_to(m, self.server);
            }
            Ok(ClientOutput::Tun(p)) => match echo_reply_to(p) {
                Some((dst, id, seq)) if Some(dst) == lease && id == echo_id(i) => {
                    let bit = 1u32.checked_shl(u32::from(seq)).unwrap_or(0);
                    if s.answered & bit == 0 {
                        s.answered |= bit;
                        self.answered += 1;
                    }
                }
                _ => s.strays += 1,
            },
            _ => {}
        }
        if s.up.is_none() && s.client.is_connected(now) {
            s.up = Some(now);
            self.up += 1;
        }
        self.schedule(i);
    }

    /// Every session of `range` pings once, with at most [`PING_WINDOW`]
    /// echoes unanswered at a time (a burst of thousands would only
    /// measure the kernel's queue lengths), and the last answers are waited
    /// for a while.
    fn ping_round(&mut self, range: std::ops::Range<usize>, seq: u16) -> anyhow::Result<()> {
        let answered_before = self.answered;
        let started = Instant::now();
        let count = range.len();
        // Echoes given up for lost: they no longer hold the window.
        let mut lost = 0;
        for (sent, i) in range.enumerate() {
            let mut progress = (self.answered, Instant::now());
            while sent - (self.answered - answered_before) - lost >= PING_WINDOW {
                self.turn(Duration::from_millis(1))?;
                if self.answered != progress.0 {
                    progress = (self.answered, Instant::now());
                } else if progress.1.elapsed() > Duration::from_secs(1) {
                    lost = sent - (self.answered - answered_before);
                }
            }
            self.ping(i, seq)?;
        }
        self.run_until(Duration::from_secs(2), |l| {
            l.answered - answered_before >= count
        })?;
        println!(
            "echo round {seq}: {} of {count} answered in {:.2} s (inits sent so far: {})",
            self.answered - answered_before,
            started.elapsed().as_secs_f64(),
            self.inits
        );
        Ok(())
    }

    /// Session `i` pings the server's tunnel address.
    fn ping(&mut self, i: usize, seq: u16) -> anyhow::Result<()> {
        let s = &mut self.sessions[i];
        let Some(t) = s.client.tunnel().copied() else {
            return Ok(());
        };
        let packet = echo_request(t.client_v4, t.server_v4, echo_id(i), seq);
        if let Ok(n) = s
            .client
            .handle_tun_packet(Instant::now(), &packet, &mut self.out)
        {
            let _ = self.sockets[s.socket].send_to(&self.out[..n], self.server);
        }
        self.schedule(i);
        Ok(())
    }
}

/// Echo requests unanswered at most.
const PING_WINDOW: usize = 256;

/// The echo id session `i` uses.
fn echo_id(i: usize) -> u16 {
    i as u16
}

/// The client's index a message from the server names.
fn receiver(msg: &[u8]) -> Option<u32> {
    let at = match *msg.first()? {
        TYPE_RESPONSE => 8,
        TYPE_DATA | TYPE_COOKIE => 4,
        _ => return None,
    };
    Some(u32::from_le_bytes(msg.get(at..at + 4)?.try_into().ok()?))
}

fn bind(addr: SocketAddrV4) -> anyhow::Result<UdpSocket> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    // Room for a burst of answers to thousands of handshakes.
    let _ = socket.set_recv_buffer_size(8 << 20);
    let _ = socket.set_send_buffer_size(8 << 20);
    socket.set_nonblocking(true)?;
    socket
        .bind(&SocketAddr::from(addr).into())
        .with_context(|| format!("binding {addr} (is it local?)"))?;
    Ok(socket.into())
}

fn wait_readable(sockets: &[UdpSocket], wait: Duration) {
    let mut fds: Vec<libc::pollfd> = sockets
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `fds` is a valid array of pollfd for its length.
    unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            wait.as_millis() as i32,
        )
    };
}

/// The server's resident memory, from /proc.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: usize) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + payload) as u16).to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(b"iptun-ld");
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut p = ipv4_header(src, dst, 1, icmp.len()).to_vec();
    p.extend_from_slice(&icmp);
    p
}

/// (destination, echo id, sequence) of an IPv4 echo reply.
fn echo_reply_to(p: &[u8]) -> Option<(Ipv4Addr, u16, u16)> {
    let ihl = usize::from(p.first()? & 0x0f) * 4;
    if p.first()? >> 4 != 4 || p.get(9)? != &1 || p.get(ihl)? != &0 {
        return None;
    }
    let dst = Ipv4Addr::from(<[u8; 4]>::try_from(p.get(16..20)?).ok()?);
    let word = |at: usize| Some(u16::from_be_bytes(p.get(at..at + 2)?.try_into().ok()?));
    Some((dst, word(ihl + 4)?, word(ihl + 6)?))
}

/// The flood: inits from spoofed sources through a raw socket, as fast as
/// one core sends them.
fn flood(args: &FloodArgs) -> anyhow::Result<()> {
    let server_key = PublicKey::from_base64(&args.server_key).context("--server-key")?;
    let key = PrivateKey::from_base64(&args.key).context("--key")?;
    let inits = make_inits(&key, server_key, args.fresh.max(1));
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
    )
    .context("a raw socket (needs root)")?;
    let packets: Vec<Vec<u8>> = (0..args.spoof)
        .flat_map(|i| {
            let src = Ipv4Addr::from(u32::from(args.spoof_from) + i);
            let port = 40_000 + i as u16;
            inits
                .iter()
                .map(move |init| udp_packet(src, port, args.server, init))
                .collect::<Vec<_>>()
        })
        .collect();
    let to: socket2::SockAddr = SocketAddr::from(args.server).into();
    let start = Instant::now();
    let end = start + Duration::from_secs(args.secs);
    let (mut sent, mut failed) = (0u64, 0u64);
    while Instant::now() < end {
        for p in &packets {
            match socket.send_to(p, &to) {
                Ok(_) => sent += 1,
                Err(_) => failed += 1,
            }
        }
        if args.pps > 0 {
            // Ahead of the rate: wait until the packets sent are due.
            let due = start + Duration::from_secs_f64(sent as f64 / args.pps as f64);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "flood: {sent} inits from {} spoofed sources in {secs:.1} s: {:.0} a second ({failed} sends failed)",
        args.spoof,
        sent as f64 / secs
    );
    Ok(())
}

fn make_inits(key: &PrivateKey, server: PublicKey, n: usize) -> Vec<Vec<u8>> {
    let now = Instant::now();
    let mut client = Client::new(ClientConfig::new(key.clone(), server), now, unix_nanos());
    let mut buf = vec![0u8; 2048];
    (0..n)
        .map(|i| {
            // Each retry is a fresh init with a later timestamp.
            let at = now + Duration::from_secs(60 * i as u64);
            let len = client.poll_timers(at, &mut buf).expect("an init is due");
            buf[..len].to_vec()
        })
        .collect()
}

fn udp_packet(src: Ipv4Addr, sport: u16, to: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut p = ipv4_header(src, *to.ip(), 17, udp_len).to_vec();
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&to.port().to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]); // no checksum (allowed over IPv4)
    p.extend_from_slice(payload);
    p
}

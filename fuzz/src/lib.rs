//! Fixtures shared by the fuzz targets and the seed-corpus generator
//! (`cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus`).
//!
//! Every key is fixed, so a seed init written by the generator is a valid
//! init for the server the targets build. Time is a fixed base `Instant`
//! (taken once per process) plus fixed offsets, and the wall clock is the
//! constant [`UNIX_NANOS`]. The only remaining randomness is the Noise
//! ephemeral keys and the session indices, which the engines draw from the OS.

pub mod world;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use iptun_proto::crypto::{PrivateKey, PublicKey};
use iptun_proto::engine::{Client, ClientConfig, ClientOutput, Server, ServerConfig, ServerOutput};
use iptun_proto::pool::{AddressPool, Lease};

/// The server's static private key: 32 bytes of 0x11.
pub const SERVER_KEY: &str = "ERERERERERERERERERERERERERERERERERERERERERE=";
/// Client A's static private key: 32 bytes of 0x22.
pub const CLIENT_A_KEY: &str = "IiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiI=";
/// Client B's static private key: 32 bytes of 0x33.
pub const CLIENT_B_KEY: &str = "MzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzMzM=";
/// The wall clock the clients start with (2023-11-14, in nanoseconds).
pub const UNIX_NANOS: u64 = 1_700_000_000_000_000_000;
/// Big enough for any datagram the engines can produce.
pub const BUF_LEN: usize = (1 << 16) + 64;

/// A path back to a client in the fuzz world: just a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Path(pub u32);

impl iptun_proto::engine::PathKind for Path {}

/// The path (driver address) of client A.
pub const PATH_A: Path = Path(1);
/// The path of client B.
pub const PATH_B: Path = Path(2);
/// A path no client uses.
pub const PATH_STRANGER: Path = Path(99);

/// The fixed keys, with their public halves computed once.
pub struct Keys {
    pub server: PrivateKey,
    pub server_pub: PublicKey,
    pub a: PrivateKey,
    pub a_pub: PublicKey,
    pub b: PrivateKey,
    pub b_pub: PublicKey,
}

/// The fixed keys.
pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let private = |k: &str| PrivateKey::from_base64(k).expect("valid fixed key");
        let (server, a, b) = (
            private(SERVER_KEY),
            private(CLIENT_A_KEY),
            private(CLIENT_B_KEY),
        );
        Keys {
            server_pub: server.public_key(),
            a_pub: a.public_key(),
            b_pub: b.public_key(),
            server,
            a,
            b,
        }
    })
}

/// The time base: one `Instant` per process, so runs differ only by randomness.
pub fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// The instant the targets run at.
pub fn now() -> Instant {
    base() + Duration::from_secs(1)
}

/// The default pool: 10.1.0.0/24 and fd69:7074:756e::/64.
pub fn pool() -> AddressPool {
    AddressPool::new(
        "10.1.0.0/24".parse().unwrap(),
        Some("fd69:7074:756e::/64".parse().unwrap()),
    )
    .expect("valid pool")
}

/// A fresh server admitting `allowed`, with the default pool and a
/// handshake budget no input can spend (time stands still in the targets,
/// so a spent budget would carry one input's effect into the next).
pub fn server(allowed: Vec<PublicKey>) -> Server<Path> {
    let mut config = ServerConfig::new(keys().server.clone(), allowed, pool());
    config.handshakes_per_sec = u32::MAX;
    Server::new(config, base())
}

/// A fresh client with key `key` for the fixture server; its first
/// `poll_timers` sends an init.
pub fn client(key: &PrivateKey) -> Client {
    Client::new(
        ClientConfig::new(key.clone(), keys().server_pub),
        base(),
        UNIX_NANOS,
    )
}

/// The messages of one real handshake, for seeds.
pub struct Transcript {
    pub init: Vec<u8>,
    pub response: Vec<u8>,
    /// The client's key-confirming keepalive (an empty data message).
    pub keepalive: Vec<u8>,
    /// The server's answer to it.
    pub keepalive_reply: Vec<u8>,
}

/// Run a handshake between `client` and `server` over path `path`, confirm
/// the keys with the client's keepalive, and return the messages.
pub fn connect(
    server: &mut Server<Path>,
    client: &mut Client,
    path: Path,
    now: Instant,
) -> Transcript {
    let mut c_out = vec![0u8; BUF_LEN];
    let mut s_out = vec![0u8; BUF_LEN];
    let n = client
        .poll_timers(now, &mut c_out)
        .expect("the first poll sends an init");
    let init = c_out[..n].to_vec();
    let response = match server.handle_datagram(now, &path, &init, &mut s_out) {
        Ok(ServerOutput::Reply(m)) => m.to_vec(),
        other => panic!("server refused the init: {other:?}"),
    };
    let keepalive = match client.handle_datagram(now, &response, &mut c_out) {
        Ok(ClientOutput::Send(m)) => m.to_vec(),
        other => panic!("client refused the response: {other:?}"),
    };
    let keepalive_reply = match server.handle_datagram(now, &path, &keepalive, &mut s_out) {
        Ok(ServerOutput::Reply(m)) => m.to_vec(),
        other => panic!("server did not answer the keepalive: {other:?}"),
    };
    match client.handle_datagram(now, &keepalive_reply, &mut c_out) {
        Ok(ClientOutput::Nothing) => {}
        other => panic!("client refused the keepalive reply: {other:?}"),
    }
    Transcript {
        init,
        response,
        keepalive,
        keepalive_reply,
    }
}

/// A server with two established clients, A (path [`PATH_A`]) and B (path [`PATH_B`]).
pub struct Established {
    pub server: Server<Path>,
    pub a: Client,
    pub b: Client,
    pub a_lease: Lease,
    pub b_lease: Lease,
    /// The server's index for A's session (the receiver of A's data messages).
    pub a_server_index: [u8; 4],
    /// A's index for its session (the receiver of the server's data messages to A).
    pub a_client_index: [u8; 4],
    pub now: Instant,
}

impl Established {
    /// Two real handshakes at the fixed time.
    pub fn new() -> Self {
        let k = keys();
        let now = now();
        let mut server = server(vec![k.a_pub, k.b_pub]);
        let (mut a, mut b) = (client(&k.a), client(&k.b));
        let ta = connect(&mut server, &mut a, PATH_A, now);
        connect(&mut server, &mut b, PATH_B, now);
        let lease = |key: &PublicKey| server.pool().lease(key).expect("leased");
        let (a_lease, b_lease) = (lease(&k.a_pub), lease(&k.b_pub));
        Self {
            a_server_index: ta.keepalive[4..8].try_into().unwrap(),
            a_client_index: ta.keepalive_reply[4..8].try_into().unwrap(),
            server,
            a,
            b,
            a_lease,
            b_lease,
            now,
        }
    }

    /// Whether `addr` is one of A's tunnel addresses.
    pub fn is_a(&self, addr: IpAddr) -> bool {
        match addr {
            IpAddr::V4(v4) => v4 == self.a_lease.v4,
            IpAddr::V6(v6) => Some(v6) == self.a_lease.v6,
        }
    }
}

impl Default for Established {
    fn default() -> Self {
        Self::new()
    }
}

/// An IPv4 ICMP echo request from `src` to `dst` with 8 bytes of ICMP.
pub fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![
        0x45, 0x00, 0x00, 0x1c, 0x00, 0x01, 0x40, 0x00, 0x40, 0x01, 0x00, 0x00, 0, 0, 0, 0, 0, 0,
        0, 0, 0x08, 0x00, 0xf7, 0xfe, 0x00, 0x01, 0x00, 0x00,
    ];
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&p[..20]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p
}

/// An IPv6 ICMPv6 echo request from `src` to `dst` with 8 bytes of ICMPv6
/// (checksum left zero: the engines never look at it).
pub fn ipv6_packet(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let mut p = vec![0u8; 48];
    p[0] = 0x60;
    p[5] = 8; // payload length
    p[6] = 58; // ICMPv6
    p[7] = 64; // hop limit
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p[40] = 128; // echo request
    p
}

fn checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

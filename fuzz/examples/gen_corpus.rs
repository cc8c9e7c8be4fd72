//! Writes the committed seed corpus: `fuzz/corpus/<target>/seed-<name>`.
//!
//! Run from anywhere: `cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus`.
//! The handshake messages come from a real handshake with the fixture keys,
//! so the seed init is valid for the targets' server. Ephemeral keys and
//! indices are random, so re-running rewrites those seeds with new bytes.

use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use iptun_fuzz::world::{self, World};
use iptun_fuzz::{
    BUF_LEN, Established, PATH_A, client, connect, ipv4_packet, ipv6_packet, keys, now, server,
};
use iptun_proto::TunnelConfig;
use iptun_proto::crypto::PrivateKey;
use iptun_proto::transport::dns::{UP_HEADER_LEN, UpHeader};
use iptun_proto::wire::control::{Control, ControlKind};
use iptun_proto::wire::icmp::{Family, emit_echo};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        fs::create_dir_all(&dir).expect("create corpus dir");
        let path = dir.join(format!("seed-{name}"));
        fs::write(&path, bytes).expect("write seed");
        println!("{} ({} bytes)", path.display(), bytes.len());
    };

    // A handshake between client A and a server admitting only A: the same
    // setup as the handshake target.
    let k = keys();
    let mut srv = server(vec![k.a_pub]);
    let mut a = client(&k.a);
    let t = connect(&mut srv, &mut a, PATH_A, now());

    // Inner packets between real tunnel addresses.
    let s = Established::new();
    let (a4, b4) = (s.a_lease.v4, s.b_lease.v4);
    let (a6, b6) = (
        s.a_lease.v6.expect("pool has IPv6"),
        s.b_lease.v6.expect("pool has IPv6"),
    );
    let server_lease = s.server.addresses();
    let v4_a_to_b = ipv4_packet(a4, b4);
    let v4_a_to_net = ipv4_packet(a4, Ipv4Addr::new(198, 51, 100, 2));
    let v4_spoofed = ipv4_packet(Ipv4Addr::new(10, 1, 0, 200), Ipv4Addr::new(198, 51, 100, 2));
    let v6_a_to_b = ipv6_packet(a6, b6);
    let v6_a_to_server = ipv6_packet(a6, server_lease.v6.expect("server has IPv6"));
    let v4_net_to_a = ipv4_packet(Ipv4Addr::new(198, 51, 100, 2), a4);

    // A data message carrying a packet (sealed by A for the server above).
    let mut buf = vec![0u8; BUF_LEN];
    let n = a
        .handle_tun_packet(now(), &v4_a_to_net, &mut buf)
        .expect("seal");
    let data_v4 = buf[..n].to_vec();

    let v4_only = TunnelConfig {
        client_v4: a4,
        server_v4: server_lease.v4,
        prefix_v4: 24,
        v6: None,
        mtu: 1420,
        keepalive_secs: 10,
        cipher: iptun_proto::crypto::Cipher::ChaCha20Poly1305,
    };
    let dual = TunnelConfig {
        v6: Some((a6, "fd69:7074:756e::1".parse::<Ipv6Addr>().unwrap(), 64)),
        ..v4_only
    };

    write("message", "init", &t.init);
    write("message", "response", &t.response);
    write("message", "data-keepalive", &t.keepalive);
    write("message", "data-ipv4", &data_v4);
    write("message", "cookie", &cookie_reply(&t.init));
    write("cookie", "reply", &cookie_reply(&t.init));
    write("cookie", "init", &t.init);

    write("handshake", "init", &t.init);
    write("handshake", "response", &t.response);

    write("inner_ip", "ipv4-icmp", &v4_a_to_net);
    write("inner_ip", "ipv6-icmp", &v6_a_to_b);

    write("tunnel_config", "v4-only", &v4_only.emit());
    write("tunnel_config", "dual-stack", &dual.emit());

    write("server_datagram", "init", &t.init);
    write("server_datagram", "data-keepalive", &t.keepalive);
    write("server_datagram", "data-ipv4", &data_v4);
    write("server_datagram", "ipv4-a-to-b", &v4_a_to_b);
    write("server_datagram", "ipv4-a-to-internet", &v4_a_to_net);
    write("server_datagram", "ipv4-spoofed", &v4_spoofed);
    write("server_datagram", "ipv4-internet-to-a", &v4_net_to_a);
    write("server_datagram", "ipv6-a-to-b", &v6_a_to_b);
    write("server_datagram", "ipv6-a-to-server", &v6_a_to_server);

    // HTTP: a framed body, a long-poll query, a mailbox script (a held
    // poll from tag 0, a 1-byte message to it, answers collected).
    write("http", "frames", &[0, 2, b'a', b'b', 0, 0]);
    write("http", "query", b"c=00000000000000ff");
    write("http", "mailbox", &[0x00, 0x05, b'x', 0x02]);

    // Control messages: a probe as the client sends it, a padded reply.
    let mut probe = [0u8; 10];
    let p = Control {
        kind: ControlKind::Probe,
        id: 1,
        len: 10,
    };
    p.emit(10, &mut probe).expect("fits");
    write("control", "probe", &probe);
    let mut reply = [0u8; 64];
    let r = Control {
        kind: ControlKind::ProbeReply,
        id: 7,
        len: 1200,
    };
    r.emit(64, &mut reply).expect("fits");
    write("control", "reply-padded", &reply);

    // Endpoint scripts (see fuzz_targets/endpoint.rs for the format).
    for (name, script) in endpoint_scripts(&t.init) {
        write("endpoint", name, &script);
    }
}

/// One step of an endpoint script: op, length, payload.
fn step(op: u8, payload: &[u8]) -> Vec<u8> {
    let mut s = vec![op];
    s.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    s.extend_from_slice(payload);
    s
}

/// Scripts reaching each listener's paths, and the live sessions.
fn endpoint_scripts(init: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let w = World::new();
    let pool = w.endpoint.engine().pool();
    let key = |s: &str| PrivateKey::from_base64(s).unwrap().public_key();
    let k = keys();
    let lease = |p| pool.lease(p).expect("leased");
    let (a, b) = (lease(&k.a_pub).v4, lease(&k.b_pub).v4);
    let (c, d) = (
        lease(&key(world::CLIENT_C_KEY)).v4,
        lease(&key(world::CLIENT_D_KEY)).v4,
    );
    let net = Ipv4Addr::new(198, 51, 100, 2);
    let framed = [&(init.len() as u16).to_be_bytes()[..], init].concat();
    let mut ping = vec![0u8; 8 + 4];
    ping[8..].copy_from_slice(b"ping");
    let n = emit_echo(Family::V4, false, 5, 6, &mut ping, 4);
    ping.truncate(n);
    let mut header = vec![0u8; UP_HEADER_LEN];
    UpHeader {
        tag: 0x1234_5678,
        prompt: false,
        qseq: 1,
        down_limit: 1232,
        auth: [0; 4],
    }
    .emit(&mut header);
    let garbage_data = [3u8, 0, 0, 0, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 9, 0xee, 0xee];
    vec![
        ("udp-init", step(0, init)),
        (
            "udp-aimed",
            step(0x20, &[&garbage_data[..], &[0xaa; 16]].concat()),
        ),
        (
            "icmp-ping",
            [step(0x08 | 1, &ping), step(1, &ping)].concat(),
        ),
        ("icmp-init", step(0x20 | 1, init)),
        (
            "icmp-aimed",
            step(0x60 | 1, &[&garbage_data[..], &[0xaa; 16]].concat()),
        ),
        // A new tag's TXT query (held, then answered empty), and a
        // stranger's NULL query.
        (
            "dns-txt-poll",
            [step(0x30 | 2, &header), step(0xf8 | 7, &[])].concat(),
        ),
        ("dns-null-stranger", step(0x20 | 0x08 | 2, &header)),
        ("ws-init", step(3, &framed)),
        (
            "poll-init",
            [step(4, &framed), step(0xf8 | 7, &[]), step(4, &[])].concat(),
        ),
        (
            "clients-to-each-other",
            [
                step(6, &ipv4_packet(a, b)),
                step(0x08 | 6, &ipv4_packet(b, c)),
                step(0x10 | 6, &ipv4_packet(c, d)),
                step(0x18 | 6, &ipv4_packet(d, a)),
            ]
            .concat(),
        ),
        (
            "server-tun",
            [
                step(5, &ipv4_packet(net, a)),
                step(5, &ipv4_packet(net, b)),
                step(5, &ipv4_packet(net, c)),
                step(5, &ipv4_packet(net, d)),
            ]
            .concat(),
        ),
        ("time", [step(0xf8 | 7, &[]), step(0xf8 | 7, &[])].concat()),
    ]
}

/// A cookie reply to `init`, as a server under load would send it.
fn cookie_reply(init: &[u8]) -> Vec<u8> {
    use iptun_proto::crypto::cookie::CookieSealKey;
    use iptun_proto::wire::Message;
    use iptun_proto::wire::message::{COOKIE_REPLY_LEN, INIT_LEN, INIT_MAC_LEN};
    let mut reply = vec![0u8; COOKIE_REPLY_LEN];
    Message::emit_cookie_header(
        u32::from_le_bytes(init[4..8].try_into().unwrap()),
        &mut reply,
    );
    CookieSealKey::new(&keys().server_pub).seal(
        &[0x5a; 16],
        &init[INIT_LEN - INIT_MAC_LEN..INIT_LEN],
        (&mut reply[8..]).try_into().unwrap(),
    );
    reply
}

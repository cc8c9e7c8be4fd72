//! Writes the committed seed corpus: `fuzz/corpus/<target>/seed-<name>`.
//!
//! Run from anywhere: `cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus`.
//! The handshake messages come from a real handshake with the fixture keys,
//! so the seed init is valid for the targets' server. Ephemeral keys and
//! indices are random, so re-running rewrites those seeds with new bytes.

use std::fs;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use iptun_fuzz::{
    BUF_LEN, Established, PATH_A, client, connect, ipv4_packet, ipv6_packet, keys, now, server,
};
use iptun_proto::TunnelConfig;

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
    };
    let dual = TunnelConfig {
        v6: Some((a6, "fd69:7074:756e::1".parse::<Ipv6Addr>().unwrap(), 64)),
        ..v4_only
    };

    write("message", "init", &t.init);
    write("message", "response", &t.response);
    write("message", "data-keepalive", &t.keepalive);
    write("message", "data-ipv4", &data_v4);

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
}

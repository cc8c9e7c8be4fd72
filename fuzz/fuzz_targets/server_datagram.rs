//! A `Server` with two established sessions (clients A and B, real
//! handshakes at a fixed time) is fed the input:
//! 1. as a datagram, from A's path and from an unknown path;
//! 2. as a datagram aimed at A's live session (receiver index patched), so
//!    forged data reaches the AEAD;
//! 3. as an inner packet A sends (sealed by A's `Client`), which exercises
//!    the authenticated path: inner-packet checks, the source check and
//!    client-to-client forwarding; the result is checked end to end;
//! 4. as a packet from the server's TUN device, delivered to its client;
//! 5. as a datagram to client A, as given and aimed at its session.
//!
//! Never panics; no answer is larger than the datagram it answers.
//!
//! Two handshakes cost milliseconds under the sanitizers, so the sessions
//! are built once and reused for [`REBUILD_EVERY`] inputs. What an input
//! leaves behind is only monotone counters (send counters, replay windows,
//! drop counters) and spent handshake tokens, of a budget no run can spend
//! (`iptun_fuzz::server`).
//! A crash therefore reproduces from the crashing input alone.
#![no_main]

use std::cell::RefCell;
use std::net::IpAddr;

use iptun_fuzz::{BUF_LEN, Established, PATH_A, PATH_B, PATH_STRANGER};
use iptun_proto::DropReason;
use iptun_proto::engine::{ClientOutput, ServerOutput};
use iptun_proto::wire::InnerPacket;
use iptun_proto::wire::message::DATA_OVERHEAD;
use libfuzzer_sys::fuzz_target;

/// Inputs served by one set of sessions.
const REBUILD_EVERY: u32 = 128;

struct State {
    session: Established,
    uses: u32,
    out: Vec<u8>,
    sealed: Vec<u8>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    STATE.with_borrow_mut(|state| {
        if state.as_ref().is_none_or(|s| s.uses >= REBUILD_EVERY) {
            *state = Some(State {
                session: Established::new(),
                uses: 0,
                out: vec![0u8; BUF_LEN],
                sealed: vec![0u8; BUF_LEN],
            });
        }
        let state = state.as_mut().expect("built above");
        state.uses += 1;
        run(&mut state.session, data, &mut state.out, &mut state.sealed);
    });
});

fn run(s: &mut Established, data: &[u8], out: &mut [u8], sealed: &mut [u8]) {
    let now = s.now;

    // 1 and 2: untrusted datagrams.
    let mut aimed = data.to_vec();
    if aimed.len() >= 8 {
        aimed[4..8].copy_from_slice(&s.a_server_index);
    }
    for (path, datagram) in [(PATH_A, data), (PATH_STRANGER, data), (PATH_A, &aimed[..])] {
        match s.server.handle_datagram(now, &path, datagram, out) {
            Ok(ServerOutput::Send(_, msg) | ServerOutput::Reply(msg)) => {
                assert!(msg.len() <= datagram.len())
            }
            Ok(ServerOutput::Tun(p)) => assert!(p.len() <= datagram.len()),
            Ok(ServerOutput::Nothing) | Err(_) => {}
        }
    }

    // 3: an inner packet from A, through the authenticated path.
    if let Ok(n) = s.a.handle_tun_packet(now, data, sealed) {
        assert_eq!(n, data.len() + DATA_OVERHEAD);
        let packet = InnerPacket::new_checked(data).expect("the client sealed it, so it is valid");
        let (src, dst) = (packet.src(), packet.dst());
        let b_owns = |a: IpAddr| match a {
            IpAddr::V4(v4) => v4 == s.b_lease.v4,
            IpAddr::V6(v6) => Some(v6) == s.b_lease.v6,
        };
        let to_b = b_owns(dst);
        let spoofed = !s.is_a(src);
        let forwarded = match s.server.handle_datagram(now, &PATH_A, &sealed[..n], out) {
            Ok(ServerOutput::Tun(p)) => {
                assert!(!spoofed && !to_b, "delivered to TUN: {src} -> {dst}");
                assert_eq!(p, data);
                None
            }
            Ok(ServerOutput::Send(path, msg)) => {
                assert!(!spoofed && to_b, "forwarded: {src} -> {dst}");
                assert_eq!(path, PATH_B);
                assert_eq!(msg.len(), n);
                Some(msg.to_vec())
            }
            Ok(ServerOutput::Nothing) => panic!("a non-empty packet yielded nothing"),
            // Only keepalives and probes (control messages, never IP
            // packets) are answered where they came from.
            Ok(ServerOutput::Reply(_)) => panic!("an inner packet was answered"),
            Err(DropReason::Spoofed) => {
                assert!(spoofed, "source {src} is A's own");
                None
            }
            Err(DropReason::TooLarge) if to_b && n > (1 << 16) => None,
            Err(e) => panic!("authenticated packet {src} -> {dst} dropped: {e}"),
        };
        if let Some(msg) = forwarded {
            match s.b.handle_datagram(now, &msg, sealed) {
                Ok(ClientOutput::Tun(p)) => assert_eq!(p, data),
                other => panic!("B did not get the forwarded packet: {other:?}"),
            }
        }
    }

    // 4: a packet from the server's TUN device.
    if let Ok(ServerOutput::Send(path, msg)) = s.server.handle_tun_packet(now, data, out) {
        let client = match path {
            PATH_A => &mut s.a,
            PATH_B => &mut s.b,
            other => panic!("sent to unknown path {other:?}"),
        };
        match client.handle_datagram(now, msg, sealed) {
            Ok(ClientOutput::Tun(p)) => assert_eq!(p, data),
            other => panic!("the client did not get the server's packet: {other:?}"),
        }
    }

    // 5: untrusted datagrams to a client.
    let mut aimed = data.to_vec();
    if aimed.len() >= 8 {
        aimed[4..8].copy_from_slice(&s.a_client_index);
    }
    for datagram in [data, &aimed[..]] {
        match s.a.handle_datagram(now, datagram, out) {
            Ok(ClientOutput::Send(msg)) => assert!(msg.len() <= datagram.len()),
            Ok(ClientOutput::Tun(p)) => assert!(p.len() <= datagram.len()),
            Ok(ClientOutput::Nothing | ClientOutput::ProbeReply { .. }) | Err(_) => {}
        }
    }
}

//! The server `Endpoint` with a listener of every kind (UDP, ICMP echo,
//! DNS, HTTP) and four live sessions, one per kind (real handshakes: see
//! `src/world.rs`), driven by a script in the input. Each step is an op
//! byte, a two-byte length and that many bytes of payload:
//!
//! - `op % 8 == 0`: a UDP datagram, from client A's address or a stranger's;
//!   with `op & 0x20`, aimed at A's live session (receiver index patched);
//! - `1`: an ICMP message from client B's address or a stranger's, to our
//!   address or a broadcast; with `op & 0x20`, the payload rides an echo
//!   request behind the tunnel's magic (aimed at B's session with `0x40`);
//! - `2`: a DNS datagram from client C's address or a stranger's; with
//!   `op & 0x20`, the payload is carried as the data labels of a query for
//!   the tunnel domain, of a record type bits `0xd0` pick;
//! - `3`: a WebSocket message's body, on D's connection or another;
//! - `4`: a long-poll request's body, for one of four tags;
//! - `5`: a packet from the server's TUN device;
//! - `6`: a packet one of the clients' TUN devices gives it (authenticated:
//!   forwarding between clients, the source check...);
//! - `7`: time passes (`op >> 3` × 50 ms) and timers run.
//!
//! After every step, whatever anyone sends is carried across (the clients
//! take the endpoint's output, the endpoint theirs) until all is quiet.
//!
//! Checked: nothing panics, on either side. No answer to unauthenticated
//! input (steps 0 to 4) is larger than what came in: on UDP, ICMP and
//! WebSocket the input itself; a long-poll answer may carry replies to
//! earlier bodies, so no more than the largest input so far; a DNS answer
//! is as large as the query allows (an ordinary DNS reply; the DNS
//! listener's own tests pin 512 bytes for tags with no session), and
//! never more than EDNS0's 1232.
//!
//! The world is built once and reused for [`REBUILD_EVERY`] inputs; what an
//! input leaves behind is sessions' counters, held requests and the clock,
//! so a crash may need the inputs before it (the fuzzer keeps them).
#![no_main]

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use iptun_fuzz::world::{
    A_ADDR, B_IP, C_ADDR, D_CONN, DNS, HTTP, ICMP, SERVER_IP, UDP, World, domain, udp_peer,
};
use iptun_proto::endpoint::{self, Destination, Input};
use iptun_proto::transport::dns::EDNS_SIZE;
use iptun_proto::wire::dns::{AnswerType, build_query_as, encode_name};
use iptun_proto::wire::icmp::{ECHO_HEADER_LEN, Family, OVERHEAD, emit_echo, emit_magic};
use libfuzzer_sys::fuzz_target;

/// Inputs served by one world.
const REBUILD_EVERY: u32 = 64;

/// A sender that is none of the clients.
const STRANGER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);

struct State {
    world: World,
    uses: u32,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    STATE.with_borrow_mut(|state| {
        if state.as_ref().is_none_or(|s| s.uses >= REBUILD_EVERY) {
            *state = Some(State {
                world: World::new(),
                uses: 0,
            });
        }
        let state = state.as_mut().expect("built above");
        state.uses += 1;
        run(&mut state.world, data);
    });
});

fn run(w: &mut World, mut script: &[u8]) {
    let mut largest = 0;
    let mut poll_request = 0;
    while let Some((&op, rest)) = script.split_first() {
        let (len, rest) = match rest {
            [lo, hi, rest @ ..] => (usize::from(u16::from_le_bytes([*lo, *hi])) % 2048, rest),
            _ => (0, &[][..]),
        };
        let (payload, rest) = rest.split_at(len.min(rest.len()));
        script = rest;
        match op % 8 {
            5 => server_tun(w, payload),
            6 => client_tun(w, usize::from(op >> 3) % 4, payload),
            7 => {
                w.now += Duration::from_millis(50 * u64::from(op >> 3));
                w.timeouts();
                answers(w, usize::MAX, largest);
            }
            kind => {
                let (listener, bytes) = untrusted(w, kind, op, payload, &mut poll_request);
                largest = largest.max(bytes.len());
                let input = input(kind, op, &bytes, poll_request);
                w.endpoint.handle_input(w.now, listener, input, &mut w.tun);
                answers(w, bytes.len(), largest);
            }
        }
        w.settle();
    }
}

/// The bytes of an unauthenticated input, and the listener they reach.
fn untrusted(w: &World, kind: u8, op: u8, payload: &[u8], poll: &mut u64) -> (usize, Vec<u8>) {
    let mut bytes = payload.to_vec();
    match kind {
        0 => {
            if op & 0x20 != 0 && bytes.len() >= 8 {
                bytes[4..8].copy_from_slice(&w.live_index[0]);
            }
            (UDP, bytes)
        }
        1 if op & 0x20 != 0 => {
            if op & 0x40 != 0 && bytes.len() >= 8 {
                bytes[4..8].copy_from_slice(&w.live_index[1]);
            }
            (ICMP, echo_request(op, &bytes))
        }
        1 => (ICMP, bytes),
        2 if op & 0x20 != 0 => (DNS, tunnel_query(op, &bytes)),
        2 => (DNS, bytes),
        3 => (HTTP, bytes),
        _ => {
            *poll += 1;
            (HTTP, bytes)
        }
    }
}

/// The input for an unauthenticated step's bytes.
fn input(kind: u8, op: u8, bytes: &[u8], poll_request: u64) -> Input<'_> {
    let stranger = op & 0x08 != 0;
    match kind {
        0 => Input::Datagram {
            from: udp_peer(if stranger {
                SocketAddr::new(STRANGER.into(), 9)
            } else {
                A_ADDR
            }),
            bytes,
        },
        1 => Input::Icmp {
            from: if stranger { STRANGER } else { B_IP }.into(),
            to: (op & 0x10 == 0).then_some(IpAddr::V4(SERVER_IP)),
            bytes,
        },
        2 => Input::Datagram {
            from: udp_peer(if stranger {
                SocketAddr::new(STRANGER.into(), 53)
            } else {
                C_ADDR
            }),
            bytes,
        },
        3 => Input::WebSocket {
            conn: if stranger { D_CONN + 1 } else { D_CONN },
            body: bytes,
        },
        _ => Input::Poll {
            tag: u64::from(op >> 6),
            request: poll_request,
            body: bytes,
            auth: None,
        },
    }
}

/// `msg` behind the tunnel's magic in an echo request.
fn echo_request(op: u8, msg: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; OVERHEAD + msg.len()];
    buf[OVERHEAD..].copy_from_slice(msg);
    emit_magic(&mut buf);
    let payload = buf.len() - ECHO_HEADER_LEN;
    let n = emit_echo(Family::V4, false, u16::from(op), 1, &mut buf, payload);
    buf.truncate(n);
    buf
}

/// `data` as the data labels of a query for the tunnel domain (cut to
/// what a name holds), of the record type `op` picks.
fn tunnel_query(op: u8, data: &[u8]) -> Vec<u8> {
    let domain = domain();
    let data = &data[..data.len().min(domain.upstream_capacity(253))];
    let Ok(name) = encode_name(&domain, data) else {
        return Vec::new();
    };
    let pick = usize::from((op >> 4) & 1 | (op >> 5) & 6);
    let ty = AnswerType::ALL[pick % AnswerType::ALL.len()];
    build_query_as(u16::from(op), &name, ty, Some(EDNS_SIZE)).unwrap_or_default()
}

/// Take what the endpoint sends, check it against what came in, and carry
/// it to the clients.
fn answers(w: &mut World, came_in: usize, largest: usize) {
    let mut buf = Vec::new();
    while let Some(t) = w.endpoint.poll_transmit(w.now, &mut buf) {
        let limit = match t.to {
            Destination::Udp(_) if t.listener == DNS => usize::from(EDNS_SIZE),
            Destination::PollAnswer(_) => largest,
            _ => came_in,
        };
        assert!(
            t.len <= limit,
            "{} bytes answered {came_in} (to {:?})",
            t.len,
            t.to
        );
        w.to_client(t, &buf[..t.len]);
    }
}

/// A packet from the server's TUN device, sealed for its owner.
fn server_tun(w: &mut World, packet: &[u8]) {
    let mut buf = vec![0; endpoint::BUF_LEN];
    if let Some(t) = w.endpoint.handle_tun_packet(w.now, packet, &mut buf) {
        w.to_client(t, &buf[..t.len]);
    }
}

/// A packet client `i`'s TUN device gives it.
fn client_tun(w: &mut World, i: usize, packet: &[u8]) {
    let mut buf = vec![0; iptun_proto::connection::BUF_LEN];
    let now = w.now;
    if let Some(t) = w.clients[i].conn.handle_tun_packet(now, packet, &mut buf) {
        w.from_client(i, &buf[..t.len]);
    }
}

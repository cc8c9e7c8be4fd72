//! Arbitrary bytes as a handshake message, at both ends:
//! - as an init to a `Server` (fixed key, one allowed client key, default
//!   pool), both as given and framed into an init-sized message with a valid
//!   MAC (so it reaches Noise);
//! - as a response to a `Client` with a pending handshake, both as given and
//!   with the receiver index patched to the pending one (so it reaches Noise).
//!
//! The client is reused across inputs until one reaches its Noise state (a
//! response-shaped datagram for its index); then the server's real response
//! must still complete the handshake: a forged response cannot spoil it.
//! Nothing else an input does changes the client but its drop counters.
//!
//! Never panics, and no answer is larger than what it answers
//! (the no-amplification invariant).
#![no_main]

use std::cell::RefCell;

use iptun_fuzz::{BUF_LEN, PATH_A, client, keys, now, server};
use iptun_proto::crypto::Mac1Key;
use iptun_proto::engine::{Client, ClientOutput, ServerOutput};
use iptun_proto::wire::Message;
use iptun_proto::wire::message::{DATA_OVERHEAD, INIT_LEN, INIT_MAC_LEN, RESPONSE_LEN, TYPE_INIT};
use libfuzzer_sys::fuzz_target;

thread_local! {
    /// Rebuilt whenever an input reaches the pending handshake.
    static CLIENT: RefCell<Option<Pending>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    let mut out = vec![0u8; BUF_LEN];

    // Server side: a fresh server per datagram, so one input cannot make the
    // next stale.
    let mut framed = [0u8; INIT_LEN];
    framed[0] = TYPE_INIT;
    let n = data.len().min(INIT_LEN - 4);
    framed[4..4 + n].copy_from_slice(&data[..n]);
    let (signed, mac1) = framed.split_at_mut(INIT_LEN - INIT_MAC_LEN);
    mac1.copy_from_slice(&Mac1Key::new(&keys().server_pub).compute(signed));
    for datagram in [data, &framed[..]] {
        let mut server = server(vec![keys().a_pub]);
        match server.handle_datagram(now(), &PATH_A, datagram, &mut out) {
            // The response answers on the path the init came by.
            Ok(ServerOutput::Reply(msg)) => {
                assert_eq!(msg.len(), RESPONSE_LEN);
                assert!(
                    msg.len() <= datagram.len(),
                    "amplification: {} bytes answered with {}",
                    datagram.len(),
                    msg.len()
                );
            }
            Ok(other) => panic!("a handshake message produced {other:?}"),
            Err(_) => {}
        }
    }

    // Client side: a client with a pending handshake, kept across inputs.
    CLIENT.with_borrow_mut(|pending| {
        let p = pending.get_or_insert_with(|| Pending::new(&mut out));
        let mut patched = data.to_vec();
        if patched.len() >= 12 {
            patched[8..12].copy_from_slice(&p.local_index);
        }
        let mut reached_noise = false;
        for datagram in [data, &patched[..]] {
            reached_noise |= matches!(
                Message::parse(datagram),
                Ok(Message::Response { receiver, .. }) if receiver.to_le_bytes() == p.local_index
            );
            match p.client.handle_datagram(now(), datagram, &mut out) {
                Ok(ClientOutput::Send(msg)) => {
                    assert!(
                        msg.len() <= datagram.len(),
                        "amplification: {} bytes answered with {}",
                        datagram.len(),
                        msg.len()
                    );
                }
                Ok(other) => panic!("unauthenticated input produced {other:?}"),
                Err(_) => {}
            }
        }
        if reached_noise {
            // A forged response for the pending index must not spoil the
            // handshake: the server's real response still completes it.
            match p.client.handle_datagram(now(), &p.real_response, &mut out) {
                Ok(ClientOutput::Send(keepalive)) => assert_eq!(keepalive.len(), DATA_OVERHEAD),
                other => panic!("the real response failed after a forged one: {other:?}"),
            }
            *pending = None;
        }
    });
});

/// A client with a pending handshake, and the server's real answer to it.
struct Pending {
    client: Client,
    local_index: [u8; 4],
    real_response: Vec<u8>,
}

impl Pending {
    fn new(out: &mut [u8]) -> Self {
        let mut client = client(&keys().a);
        let n = client
            .poll_timers(now(), out)
            .expect("the first poll sends an init");
        assert_eq!(n, INIT_LEN);
        let local_index: [u8; 4] = out[4..8].try_into().unwrap();
        let init = out[..n].to_vec();
        let mut server = server(vec![keys().a_pub]);
        let real_response = match server.handle_datagram(now(), &PATH_A, &init, out) {
            Ok(ServerOutput::Reply(msg)) => msg.to_vec(),
            other => panic!("the server refused a real init: {other:?}"),
        };
        Self {
            client,
            local_index,
            real_response,
        }
    }
}

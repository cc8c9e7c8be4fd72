//! The server's handshake budget, from what a handshake costs on this CPU.
//!
//! The engine spends at most a budget of handshakes a second on
//! Diffie-Hellman work and asks for cookies when half of it is gone
//! (`iptun-proto/src/engine/gate.rs`). A constant would be wrong on every
//! machine but one, so the server measures the cost at start.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use iptun_proto::crypto::{Cipher, Initiator, PrivateKey, Responder};
use iptun_proto::wire::TunnelConfig;
use iptun_proto::wire::message::{INIT_NOISE_LEN, RESPONSE_NOISE_LEN};

/// Handshakes timed per sample: a few milliseconds, shorter than a
/// scheduler's time slice, so that on a busy machine some sample runs
/// without being preempted.
const PER_SAMPLE: u32 = 4;
/// Samples taken; the fastest one counts (a slower one measured whatever
/// else the machine was doing then, not the handshake).
const SAMPLES: usize = 24;
/// The part of its one core (the server's loop is one thread) the server
/// spends on handshakes at most: the rest keeps the data of the sessions
/// it has flowing, even while thousands of clients connect at once.
const CORE_SHARE: f64 = 0.75;

/// What the server side of one handshake costs here: reading an init and
/// writing the response (four X25519 operations and their hashing).
pub fn handshake_cost() -> Duration {
    let server = PrivateKey::generate();
    let client = PrivateKey::generate();
    let mut init = [0u8; INIT_NOISE_LEN];
    Initiator::start(
        &client,
        &server.public_key(),
        1,
        Cipher::ChaCha20Poly1305,
        &mut init,
    );
    let config = TunnelConfig {
        client_v4: Ipv4Addr::new(10, 1, 0, 2),
        server_v4: Ipv4Addr::new(10, 1, 0, 1),
        prefix_v4: 24,
        v6: None,
        mtu: 1420,
        keepalive_secs: 10,
        cipher: Cipher::ChaCha20Poly1305,
    };
    let sample = || {
        let start = Instant::now();
        for _ in 0..PER_SAMPLE {
            let mut response = [0u8; RESPONSE_NOISE_LEN];
            Responder::read(&server, &init)
                .and_then(|r| r.accept(&config, &mut response))
                .expect("our own init is answered");
        }
        start.elapsed() / PER_SAMPLE
    };
    (0..SAMPLES).map(|_| sample()).min().expect("samples taken")
}

/// Handshakes a second for a handshake costing `cost`.
pub fn per_sec(cost: Duration) -> u32 {
    (CORE_SHARE / cost.as_secs_f64().max(1e-9)).clamp(1.0, f64::from(u32::MAX)) as u32
}

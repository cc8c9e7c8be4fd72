//! What running the server as a service relies on, driven through the
//! shipped `Endpoint` in the simulated networks: changing the admitted keys
//! while sessions run (`set_allowed`), and the counters metrics are made of
//! (handshakes, per-listener traffic and drops).

mod common;
mod icmp_sim;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use iptun_proto::DropReason;
use iptun_proto::engine::{ADDRESS_GRACE, HANDSHAKE_RETRY_MAX};
use iptun_proto::transport::Kind;
use iptun_proto::wire::message::INIT_LEN;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn up(sim: &Sim, i: usize, n: u32) -> Vec<u8> {
    ipv4(sim.clients[i].v4(), INTERNET_V4, &payload(1, n))
}

fn down(sim: &Sim, i: usize, n: u32) -> Vec<u8> {
    ipv4(INTERNET_V4, sim.clients[i].v4(), &payload(2, n))
}

#[test]
fn a_removed_key_loses_its_session_at_once_and_the_others_keep_theirs() {
    let (a, b, c) = (key(1), key(2), key(3));
    let mut sim = Sim::with_clients(&[&a, &b], Link::perfect(), 1);
    let (ca, cb) = (sim.add_client(a.clone()), sim.add_client(b.clone()));
    sim.connect(ca);
    sim.connect(cb);
    let a_v4 = sim.clients[ca].v4();
    let b_before = sim.session(cb).unwrap();
    let b_inits = sim.clients[cb].inits.len();

    let change = sim
        .server
        .set_allowed(sim.now, [b.public_key(), c.public_key()]);
    assert_eq!(change.added, [c.public_key()]);
    assert_eq!(change.removed, [a.public_key()]);
    assert_eq!(change.ended.len(), 1);
    assert_eq!(sim.server.engine().allowed_count(), 2);

    // Nothing more passes for A, either way.
    let p = up(&sim, ca, 1);
    let msg = sim.client_seal(ca, &p).unwrap();
    let a_addr = sim.clients[ca].addr;
    assert_eq!(
        sim.server_receive(a_addr, &msg),
        Err(DropReason::UnknownIndex)
    );
    let d = ipv4(INTERNET_V4, a_v4, &payload(2, 1));
    assert_eq!(sim.server_send(&d), Err(DropReason::NoRoute));
    assert!(sim.server_tun.is_empty());
    let keys: Vec<_> = sim.server.sessions().iter().map(|s| s.key).collect();
    assert_eq!(keys, [b.public_key()]);

    // B goes on with the same session: no handshake, same address.
    for n in 0..5 {
        let p = up(&sim, cb, n);
        sim.client_send(cb, &p).unwrap();
        let d = down(&sim, cb, n);
        sim.server_send(&d).unwrap();
    }
    sim.settle();
    assert_eq!(sim.server_tun.len(), 5);
    assert_eq!(sim.clients[cb].tun.len(), 5);
    let b_after = sim.session(cb).unwrap();
    assert_eq!(b_after.last_handshake, b_before.last_handshake);
    assert_eq!(b_after.lease, b_before.lease);
    assert_eq!(sim.clients[cb].inits.len(), b_inits);

    // C, new, connects at once; A, retrying, is refused.
    let cc = sim.add_client(c);
    sim.connect(cc);
    let refused = |s: &Sim| s.server.engine().handshakes().refused > 0;
    assert!(
        sim.run_until_cond(secs(100), refused),
        "A never tried again"
    );
    assert!(sim.session(ca).is_none());
    let hs = sim.server.engine().handshakes();
    assert_eq!(hs.ok, 3, "A, B and C once each: {hs:?}");
    assert!(hs.refused >= 1, "A's retries are refused: {hs:?}");
    assert_eq!(
        sim.server.engine().drops().get(DropReason::NotAllowed),
        hs.refused
    );
    // B's session went on untouched through it all (rekeys aside).
    assert_eq!(sim.clients[cb].inits.len(), b_inits);
}

#[test]
fn a_removed_keys_address_goes_back_to_the_pool_after_the_grace() {
    let (a, b) = (key(1), key(2));
    let mut sim = Sim::new(
        server_config(&[&a], pool("10.1.0.0/30", false)),
        Link::perfect(),
        2,
    );
    let ca = sim.add_client(a.clone());
    sim.connect(ca);
    let a_v4 = sim.clients[ca].v4();
    let removed_at = sim.now;
    sim.server.set_allowed(sim.now, [b.public_key()]);

    // B is admitted, but the only address is A's until the grace ends.
    let cb = sim.add_client(b.clone());
    let connected = sim.run_until_cond(ADDRESS_GRACE + HANDSHAKE_RETRY_MAX * 2, |s| {
        s.session(cb).is_some()
    });
    assert!(connected, "B never got an address");
    assert!(
        sim.now - removed_at >= ADDRESS_GRACE,
        "A's address given away early"
    );
    assert!(
        sim.server.engine().drops().get(DropReason::PoolExhausted) >= 1,
        "B waited for an address"
    );
    sim.settle();
    assert_eq!(sim.clients[cb].v4(), a_v4);
    assert_eq!(sim.server.engine().pool().lease(&a.public_key()), None);
}

#[test]
fn a_key_admitted_again_in_the_grace_gets_its_address_back() {
    let (a, b) = (key(1), key(2));
    let mut sim = Sim::with_clients(&[&a, &b], Link::perfect(), 3);
    let (ca, cb) = (sim.add_client(a.clone()), sim.add_client(b.clone()));
    sim.connect(ca);
    sim.connect(cb);
    let first = sim.clients[ca].config().unwrap();

    sim.server.set_allowed(sim.now, [b.public_key()]);
    sim.run_for(secs(5));
    let change = sim
        .server
        .set_allowed(sim.now, [a.public_key(), b.public_key()]);
    assert_eq!(change.added, [a.public_key()]);
    assert!(change.ended.is_empty());

    // A's old keys are gone; it notices and shakes hands again.
    let ok = sim.run_until_cond(secs(120), |s| s.session(ca).is_some());
    assert!(ok, "A never came back");
    sim.settle();
    let p = up(&sim, ca, 1);
    sim.client_send(ca, &p).unwrap();
    sim.settle();
    assert_eq!(sim.server_tun.last(), Some(&p));
    assert_eq!(sim.clients[ca].config(), Some(first), "the same addresses");
    // Past the grace, the address stays A's: it was admitted again.
    sim.run_for(ADDRESS_GRACE);
    let lease = sim.server.engine().pool().lease(&a.public_key());
    assert_eq!(lease.map(|l| l.v4), Some(first.client_v4));
}

#[test]
fn removing_a_key_twice_and_keys_without_sessions_is_harmless() {
    let (a, b, never) = (key(1), key(2), key(9));
    let mut sim = Sim::with_clients(&[&a, &b, &never], Link::perfect(), 4);
    let ca = sim.add_client(a.clone());
    sim.connect(ca);
    let change = sim.server.set_allowed(sim.now, [a.public_key()]);
    assert_eq!(change.removed.len(), 2);
    assert!(
        change.ended.is_empty(),
        "neither B nor the other had a session"
    );
    let change = sim.server.set_allowed(sim.now, [a.public_key()]);
    assert_eq!(change, Default::default(), "nothing changed");
    let p = up(&sim, ca, 1);
    sim.client_send(ca, &p).unwrap();
    sim.settle();
    assert_eq!(sim.server_tun, [p]);
}

#[test]
fn handshakes_and_traffic_are_counted_per_listener() {
    let (a, stranger) = (key(1), key(66));
    let mut sim = Sim::with_clients(&[&a], Link::perfect(), 5);
    let ca = sim.add_client(a);
    sim.connect(ca);
    let cs = sim.add_client(stranger);
    sim.run_for(secs(3));
    let refused = sim.clients[cs].inits.len() as u64;
    assert!(refused >= 1);
    // Garbage shaped like an init: not authentic.
    let from = "198.51.100.77:5000".parse().unwrap();
    assert_eq!(
        sim.server_receive(from, &[1; INIT_LEN][..]).err(),
        Some(DropReason::Malformed)
    );
    let mut forged = vec![0u8; INIT_LEN];
    forged[0] = 1;
    assert_eq!(
        sim.server_receive(from, &forged),
        Err(DropReason::Unauthenticated)
    );

    let (mut up_bytes, mut down_bytes) = (0, 0);
    for n in 0..10 {
        let p = up(&sim, ca, n);
        up_bytes += p.len() as u64;
        sim.client_send(ca, &p).unwrap();
        let d = down(&sim, ca, n);
        down_bytes += d.len() as u64;
        sim.server_send(&d).unwrap();
    }
    sim.settle();

    let listeners = sim.server.listeners();
    assert_eq!(listeners.len(), 1);
    let l = &listeners[0];
    assert_eq!(l.kind, Kind::Udp);
    assert_eq!(l.sessions, 1);
    assert_eq!(l.handshakes.ok, 1);
    assert_eq!(l.handshakes.refused, refused);
    assert_eq!(l.handshakes.invalid, 1, "the forged init");
    assert_eq!(l.handshakes, sim.server.engine().handshakes());
    assert_eq!((l.traffic.rx_bytes, l.traffic.rx_packets), (up_bytes, 10));
    assert_eq!((l.traffic.tx_bytes, l.traffic.tx_packets), (down_bytes, 10));
    assert_eq!(l.traffic, sim.session(ca).unwrap().traffic);
    assert_eq!(l.drops.get(DropReason::NotAllowed), refused);
    assert_eq!(l.drops.get(DropReason::Malformed), 1);

    // A packet for nobody is a drop on the TUN side, not the listener's.
    let nobody = ipv4(INTERNET_V4, Ipv4Addr::new(10, 1, 0, 200), &payload(3, 0));
    assert_eq!(sim.server_send(&nobody), Err(DropReason::NoRoute));
    let (tun_drops, tun_full) = sim.server.tun_drops();
    assert_eq!(tun_drops.get(DropReason::NoRoute), 1);
    assert_eq!(tun_full, 0);
    assert_eq!(sim.server.listeners()[0].drops.get(DropReason::NoRoute), 0);
}

// ---------------------------------------------------------------------------
// Transport state of removed keys (ICMP: requests held for the session)
// ---------------------------------------------------------------------------

#[test]
fn a_removed_icmp_clients_held_requests_are_let_go() {
    use icmp_sim::{IcmpSim, IdMode};
    let (a, b) = (key(1), key(2));
    let link = Link {
        latency: Duration::from_millis(20),
        ..Link::perfect()
    };
    let config = server_config(&[&a, &b], pool(NET4, false));
    let mut sim = IcmpSim::new(config, link, IdMode::PerRequest, 6);
    let ca = sim.add_client(a.clone(), 0x4242);
    let cb = sim.add_client(b.clone(), 0x4343);
    sim.connect(ca);
    sim.connect(cb);
    sim.run_for(secs(2));
    let held = |sim: &IcmpSim, i: usize| sim.server.open.values().filter(|x| x.client == i).count();
    assert!(held(&sim, ca) > 0, "the server holds A's requests");

    let removed_at = sim.now;
    sim.server.endpoint.set_allowed(sim.now, [b.public_key()]);
    sim.run_for(secs(30));
    // Not one answer to A since, not even when its holds would have ended:
    // what was held for it was let go, and nothing new is held.
    let answered_a = sim
        .server
        .answered
        .iter()
        .filter(|x| x.client == ca && x.answered >= removed_at)
        .count();
    assert_eq!(answered_a, 0);
    // B is served as before.
    let p = ipv4(INTERNET_V4, sim.clients[cb].v4(), &payload(2, 1));
    sim.server_send(&p).unwrap();
    sim.run_for(secs(1));
    assert_eq!(sim.clients[cb].tun.last().map(|(_, p)| p), Some(&p));
    assert!(sim.server.session(&a.public_key()).is_none());
}

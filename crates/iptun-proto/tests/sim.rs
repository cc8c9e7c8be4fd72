//! Simulated-network tests of the client `Connection` and the server
//! `Endpoint` over UDP: real handshakes and real inner IP packets over a
//! virtual network with a virtual clock (see `common/mod.rs`). Each test runs minutes of protocol
//! time in milliseconds and is deterministic: the network's losses and
//! delays come from a seeded PRNG and the static keys are fixed (the only
//! randomness left is the engines' own ephemeral keys and session indices,
//! which no assertion depends on).

mod common;

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use common::*;
use iptun_proto::DropReason;
use iptun_proto::connection::Event;
use iptun_proto::endpoint::Path;
use iptun_proto::engine::{
    ClientConfig, DEAD_AFTER_KEEPALIVES, DEFAULT_KEEPALIVE_SECS, HANDSHAKE_RETRY,
    HANDSHAKE_RETRY_MAX, REJECT_AFTER_TIME, REKEY_AFTER_TIME, SessionInfo,
};
use iptun_proto::wire::message::{INIT_LEN, RESPONSE_LEN, TYPE_DATA, TYPE_INIT, TYPE_RESPONSE};

const KEEPALIVE: Duration = Duration::from_secs(DEFAULT_KEEPALIVE_SECS as u64);

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

fn session(sim: &Sim, i: usize) -> SessionInfo<Path> {
    sim.session(i)
        .expect("the server has a session for this client")
}

/// A client-to-internet packet from client `i`.
fn up(sim: &Sim, i: usize, n: u32) -> Vec<u8> {
    ipv4(sim.clients[i].v4(), INTERNET_V4, &payload(1, n))
}

/// An internet-to-client packet for client `i`.
fn down(sim: &Sim, i: usize, n: u32) -> Vec<u8> {
    ipv4(INTERNET_V4, sim.clients[i].v4(), &payload(2, n))
}

/// Total drops the server counted, attributed to a client or not.
fn server_drop_total(sim: &Sim) -> u64 {
    sim.server.drops().total()
}

/// Check that what arrived is a subset of what was sent, each packet
/// byte-identical and at most once; returns how many arrived.
fn assert_delivered_once(sent: &HashMap<(u8, u32), Vec<u8>>, got: &[Vec<u8>]) -> usize {
    let mut seen = HashSet::new();
    for p in got {
        let id = payload_id(p);
        let original = sent
            .get(&id)
            .unwrap_or_else(|| panic!("packet {id:?} was never sent"));
        assert_eq!(p, original, "packet {id:?} arrived altered");
        assert!(seen.insert(id), "packet {id:?} arrived twice");
    }
    seen.len()
}

// ---------------------------------------------------------------------------
// 1. Handshake
// ---------------------------------------------------------------------------

#[test]
fn handshake_configures_client_and_server_lists_it() {
    let a = key(1);
    let mut sim = Sim::with_clients(&[&a], Link::perfect(), 1);
    let c = sim.add_client(a.clone());
    sim.connect(c);

    // One init, one response: a single round trip of 2 × 10 ms.
    assert_eq!(sim.sent_by(sim.clients[c].addr, is_init).len(), 1);
    assert_eq!(sim.sent_by(sim.server_addr, is_response).len(), 1);
    let events = &sim.clients[c].events;
    assert_eq!(events.len(), 1, "exactly one Configured event");
    let (at, Event::Configured(cfg)) = events[0].clone() else {
        panic!("{events:?}")
    };
    assert_eq!(at - sim.start, ms(20));
    assert_eq!(sim.clients[c].conn.engine().tunnel(), Some(&cfg));

    let net4: ipnet::Ipv4Net = NET4.parse().unwrap();
    assert!(
        net4.contains(&cfg.client_v4),
        "{} not in {net4}",
        cfg.client_v4
    );
    let host = cfg.client_v4.octets()[3];
    assert!(
        (2..=254).contains(&host),
        "host {host} is the network, the server or broadcast"
    );
    assert_eq!(cfg.server_v4, Ipv4Addr::new(10, 1, 0, 1));
    assert_eq!(cfg.prefix_v4, 24);
    assert_eq!(
        (cfg.mtu, cfg.keepalive_secs),
        (1420, DEFAULT_KEEPALIVE_SECS)
    );

    let (client6, server6, prefix6) = cfg.v6.expect("the pool has IPv6");
    let net6: ipnet::Ipv6Net = NET6.parse().unwrap();
    assert!(net6.contains(&client6));
    assert_eq!(server6, "fd69:7074:756e::1".parse::<Ipv6Addr>().unwrap());
    assert_eq!(prefix6, 64);
    assert_eq!(
        client6.segments()[7],
        u16::from(host),
        "the IPv6 host mirrors the IPv4 host"
    );

    let sessions = sim.server.sessions();
    assert_eq!(sessions.len(), 1);
    let s = &sessions[0];
    assert_eq!(s.key, a.public_key());
    assert_eq!((s.lease.v4, s.lease.v6), (cfg.client_v4, Some(client6)));
    assert_eq!(s.path, Some(sim.path_to(sim.clients[c].addr)));
    assert_eq!(s.last_handshake, Some(sim.start + ms(10)));
    assert!(sim.clients[c].conn.is_connected(sim.now));
    assert_eq!(
        server_drop_total(&sim) + sim.clients[c].conn.drops().total(),
        0
    );
}

#[test]
fn handshake_without_ipv6_pool_gives_no_ipv6() {
    let a = key(1);
    let mut sim = Sim::new(server_config(&[&a], pool(NET4, false)), Link::perfect(), 1);
    let c = sim.add_client(a);
    sim.connect(c);
    let cfg = sim.clients[c].config().unwrap();
    assert_eq!(cfg.v6, None);
    assert_eq!(session(&sim, c).lease.v6, None);
    assert_eq!(cfg.server_v4, Ipv4Addr::new(10, 1, 0, 1));
}

// ---------------------------------------------------------------------------
// 2. Data both ways
// ---------------------------------------------------------------------------

#[test]
fn data_flows_both_ways_over_ipv4_and_ipv6() {
    let a = key(1);
    let mut sim = Sim::with_clients(&[&a], Link::perfect(), 2);
    let c = sim.add_client(a);
    sim.connect(c);
    let (me4, me6) = (sim.clients[c].v4(), sim.clients[c].v6());

    // Up: alternate IPv4 and IPv6; a perfect link keeps the order.
    let mut sent_up = Vec::new();
    for n in 0..40 {
        let p = if n % 2 == 0 {
            ipv4(me4, INTERNET_V4, &payload(1, n))
        } else {
            ipv6(me6, INTERNET_V6, &payload(1, n))
        };
        sim.client_send(c, &p).unwrap();
        sent_up.push(p);
        sim.run_for(ms(1));
    }
    sim.settle();
    assert_eq!(
        sim.server_tun, sent_up,
        "the server's TUN gets exactly what the client's TUN gave"
    );

    // Down: the server routes on the destination address to this client.
    let mut sent_down = Vec::new();
    for n in 0..40 {
        let p = if n % 2 == 0 {
            ipv4(INTERNET_V4, me4, &payload(2, n))
        } else {
            ipv6(INTERNET_V6, me6, &payload(2, n))
        };
        assert_eq!(sim.server_send(&p), Ok(sim.clients[c].addr));
        sent_down.push(p);
        sim.run_for(ms(1));
    }
    sim.settle();
    assert_eq!(sim.clients[c].tun, sent_down);

    let bytes = |v: &[Vec<u8>]| v.iter().map(|p| p.len() as u64).sum::<u64>();
    let t = sim.clients[c].conn.traffic();
    assert_eq!(
        (t.tx_packets, t.tx_bytes, t.rx_packets, t.rx_bytes),
        (40, bytes(&sent_up), 40, bytes(&sent_down))
    );
    let s = session(&sim, c).traffic;
    assert_eq!(
        (s.rx_packets, s.rx_bytes, s.tx_packets, s.tx_bytes),
        (40, bytes(&sent_up), 40, bytes(&sent_down))
    );

    // A destination nobody owns has no route; it is counted, not sent.
    let nobody = ipv4(INTERNET_V4, Ipv4Addr::new(10, 1, 0, 250), &payload(2, 99));
    assert_eq!(
        sim.server_seal(&nobody).map(|_| ()),
        Err(DropReason::NoRoute)
    );
    assert_eq!(sim.server.engine().drops().get(DropReason::NoRoute), 1);
    assert_eq!(server_drop_total(&sim), 1);
    assert_eq!(sim.clients[c].conn.drops().total(), 0);
}

// ---------------------------------------------------------------------------
// 3. Loss, reordering, duplication
// ---------------------------------------------------------------------------

#[test]
fn lossy_reordering_network_delivers_each_packet_at_most_once_intact() {
    let lossy = Link {
        latency: ms(20),
        jitter: ms(40),
        loss: 0.2,
        duplicate: 0.05,
    };
    for seed in 1..=4 {
        let a = key(1);
        let mut sim = Sim::with_clients(&[&a], lossy, seed);
        let c = sim.add_client(a);
        sim.connect(c);

        // 400 packets each way, one every 5 ms: the 40 ms jitter makes them overtake each other.
        let (mut sent_up, mut sent_down) = (HashMap::new(), HashMap::new());
        for n in 0..400 {
            let (u, d) = (up(&sim, c, n), down(&sim, c, n));
            sim.client_send(c, &u).unwrap();
            sim.server_send(&d).unwrap();
            sent_up.insert(payload_id(&u), u);
            sent_down.insert(payload_id(&d), d);
            sim.run_for(ms(5));
        }
        sim.settle();

        let got_up = assert_delivered_once(&sent_up, &sim.server_tun);
        let got_down = assert_delivered_once(&sent_down, &sim.clients[c].tun);
        // About 80% arrive; duplicates were refused, not delivered.
        for got in [got_up, got_down] {
            assert!(
                (260..=360).contains(&got),
                "seed {seed}: {got} of 400 arrived"
            );
        }
        let ids: Vec<u32> = sim.server_tun.iter().map(|p| payload_id(p).1).collect();
        assert!(
            ids.windows(2).any(|w| w[0] > w[1]),
            "seed {seed}: the network did not reorder (test is vacuous)"
        );
        // The only drops are duplicates of what already arrived (and of handshake messages).
        let benign = [
            DropReason::Replay,
            DropReason::StaleHandshake,
            DropReason::UnexpectedResponse,
        ];
        for (_, e) in &sim.server_errors {
            assert!(benign.contains(e), "seed {seed}: server dropped {e:?}");
        }
        for e in &sim.clients[c].errors {
            assert!(benign.contains(e), "seed {seed}: client dropped {e:?}");
        }
        assert!(
            sim.server_errors
                .iter()
                .any(|&(_, e)| e == DropReason::Replay),
            "seed {seed}: no duplicate seen"
        );
    }
}

#[test]
fn handshake_retries_with_backoff_until_the_path_works() {
    let a = key(1);
    let dead = Link {
        loss: 1.0,
        ..Link::perfect()
    };
    let mut sim = Sim::with_clients(&[&a], dead, 3);
    let c = sim.add_client(a);
    sim.run_for(secs(60));
    assert!(sim.clients[c].config().is_none());

    // Inits at 0, 1, 3, 7, 15, 31, 47 s: the wait doubles from 1 s and stops at 16 s.
    let times: Vec<Duration> = sim.clients[c]
        .inits
        .iter()
        .map(|&t| t - sim.start)
        .collect();
    assert_eq!(times, [0, 1, 3, 7, 15, 31, 47].map(secs));
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps[0], HANDSHAKE_RETRY);
    assert!(gaps.iter().all(|&g| g <= HANDSHAKE_RETRY_MAX));
    // Inits are all the client sent: no data, no keepalives without a session.
    assert_eq!(sim.wire.len(), times.len());

    // The path comes back (lossy, but usable): the next retry gets through.
    sim.link = Link {
        latency: ms(30),
        jitter: ms(20),
        loss: 0.3,
        duplicate: 0.05,
    };
    sim.connect(c);
    assert_eq!(sim.clients[c].events.len(), 1);
    assert!(sim.elapsed() < secs(60 + 120));
}

#[test]
fn handshake_completes_through_heavy_loss() {
    // With 30% loss each way a round trip succeeds about half the time;
    // the retries must get every seed through.
    for seed in 10..16 {
        let a = key(1);
        let link = Link {
            latency: ms(25),
            jitter: ms(50),
            loss: 0.3,
            duplicate: 0.1,
        };
        let mut sim = Sim::with_clients(&[&a], link, seed);
        let c = sim.add_client(a);
        sim.connect(c);
        let u = up(&sim, c, 1);
        // Retry a few times: the packet itself may be lost.
        let delivered = (0..20).any(|_| {
            sim.client_send(c, &u).unwrap();
            sim.run_for(ms(200));
            !sim.server_tun.is_empty()
        });
        assert!(delivered, "seed {seed}");
        assert_eq!(sim.server_tun[0], u);
    }
}

// ---------------------------------------------------------------------------
// 4. Replay
// ---------------------------------------------------------------------------

#[test]
fn replayed_data_keepalives_and_inits_are_refused() {
    let a = key(1);
    let mut sim = Sim::with_clients(&[&a], Link::perfect(), 4);
    let c = sim.add_client(a);
    sim.connect(c);
    let addr = sim.clients[c].addr;

    // Client to server: the first copy goes through, the second is a replay.
    let p = up(&sim, c, 1);
    let msg = sim.client_seal(c, &p).unwrap();
    assert_eq!(sim.server_receive(addr, &msg), Ok(Out::Tun(p.clone())));
    assert_eq!(sim.server_receive(addr, &msg), Err(DropReason::Replay));
    // Still a replay much later and from another address, and it does not move the client's path.
    sim.run_for(secs(5));
    let attacker: SocketAddr = "198.18.7.7:5555".parse().unwrap();
    assert_eq!(sim.server_receive(attacker, &msg), Err(DropReason::Replay));
    assert_eq!(session(&sim, c).path, Some(sim.path_to(addr)));
    assert_eq!(session(&sim, c).drops.get(DropReason::Replay), 2);
    assert_eq!(sim.server_tun, [p]);

    // A replayed keepalive gets no answer (it would otherwise be a reflector).
    let keepalive = sim.sent_by(addr, is_keepalive)[0].bytes.clone();
    assert_eq!(
        sim.server_receive(attacker, &keepalive),
        Err(DropReason::Replay)
    );

    // Server to client.
    let d = down(&sim, c, 1);
    let (_, msg) = sim.server_seal(&d).unwrap();
    assert_eq!(sim.client_receive(c, &msg), Ok(Out::Tun(d.clone())));
    assert_eq!(sim.client_receive(c, &msg), Err(DropReason::Replay));
    assert_eq!(sim.clients[c].conn.drops().get(DropReason::Replay), 1);
    assert_eq!(sim.clients[c].tun, [d]);

    // A captured init, replayed later: refused as stale, and unanswered,
    // from the client's address or any other.
    let init = sim.sent_by(addr, is_init)[0].bytes.clone();
    let handshake_before = session(&sim, c).last_handshake;
    let wire_before = sim.wire.len();
    sim.run_for(secs(30));
    let wire_mid = sim.wire.len();
    for from in [attacker, addr] {
        assert_eq!(
            sim.server_receive(from, &init),
            Err(DropReason::StaleHandshake)
        );
    }
    assert_eq!(sim.wire.len(), wire_mid, "nothing was sent in answer");
    assert!(wire_mid > wire_before, "keepalives ran meanwhile");
    let s = session(&sim, c);
    assert_eq!(s.drops.get(DropReason::StaleHandshake), 2);
    assert_eq!(s.last_handshake, handshake_before);
    assert_eq!(
        s.path,
        Some(sim.path_to(addr)),
        "a replayed init does not redirect the session"
    );

    // The session is untouched: data still flows both ways.
    let (u, d) = (up(&sim, c, 2), down(&sim, c, 2));
    sim.client_send(c, &u).unwrap();
    sim.server_send(&d).unwrap();
    sim.settle();
    assert_eq!(sim.server_tun.last(), Some(&u));
    assert_eq!(sim.clients[c].tun.last(), Some(&d));
}

// ---------------------------------------------------------------------------
// 5. Rekey
// ---------------------------------------------------------------------------

#[test]
fn rekey_on_time_loses_nothing_in_flight_and_old_keys_then_expire() {
    let a = key(1);
    // Jitter larger than the send interval: packets of both key
    // generations are in the air together around the switch.
    let link = Link {
        latency: ms(30),
        jitter: ms(60),
        loss: 0.0,
        duplicate: 0.0,
    };
    let mut sim = Sim::with_clients(&[&a], link, 5);
    let c = sim.add_client(a);
    sim.connect(c);
    let addr = sim.clients[c].addr;
    let first_handshake = sim.clients[c].conn.engine().last_handshake().unwrap();
    let old_index = receiver_index(&sim.sent_by(addr, |d| kind(d) == TYPE_DATA)[0].bytes);

    let (mut sent_up, mut sent_down) = (HashMap::new(), HashMap::new());
    let mut n = 0;
    let mut pump = |sim: &mut Sim, until: Duration| {
        while sim.elapsed() < until {
            let (u, d) = (up(sim, c, n), down(sim, c, n));
            sim.client_send(c, &u).unwrap();
            sim.server_send(&d).unwrap();
            sent_up.insert(payload_id(&u), u);
            sent_down.insert(payload_id(&d), d);
            n += 1;
            sim.run_for(ms(20));
        }
    };
    pump(&mut sim, REKEY_AFTER_TIME - ms(500));

    // Seal some packets with the old keys and hold them back: two batches,
    // one to deliver right after the switch, one after the old keys expire.
    let mut held = Vec::new();
    for k in 0..6 {
        let (u, d) = (
            ipv4(sim.clients[c].v4(), INTERNET_V4, &payload(3, k)),
            ipv4(INTERNET_V4, sim.clients[c].v4(), &payload(4, k)),
        );
        let up_msg = sim.client_seal(c, &u).unwrap();
        let (_, down_msg) = sim.server_seal(&d).unwrap();
        assert_eq!(receiver_index(&up_msg), old_index);
        held.push((u, up_msg, d, down_msg));
    }
    pump(&mut sim, REKEY_AFTER_TIME + secs(5));
    sim.settle();

    // One new handshake, on time.
    assert_eq!(sim.clients[c].inits.len(), 2);
    let second = sim.clients[c].conn.engine().last_handshake().unwrap();
    let age = second - first_handshake;
    assert!(
        age >= REKEY_AFTER_TIME && age < REKEY_AFTER_TIME + secs(1),
        "rekeyed after {age:?}"
    );
    assert!(
        sim.sent_by(addr, |d| kind(d) == TYPE_DATA
            && receiver_index(d) != old_index)
            .len()
            > 100
    );
    assert!(
        sim.sent_by(sim.server_addr, |d| kind(d) == TYPE_DATA)
            .iter()
            .map(|d| receiver_index(&d.bytes))
            .collect::<HashSet<_>>()
            .len()
            >= 2
    );

    // Nothing was lost across the switch and nothing was dropped.
    assert_eq!(
        assert_delivered_once(&sent_up, &sim.server_tun),
        sent_up.len()
    );
    assert_eq!(
        assert_delivered_once(&sent_down, &sim.clients[c].tun),
        sent_down.len()
    );
    assert!(sim.server_errors.is_empty(), "{:?}", sim.server_errors);
    assert!(
        sim.clients[c].errors.is_empty(),
        "{:?}",
        sim.clients[c].errors
    );

    // Late packets sealed with the old keys are still accepted after the switch.
    for (u, up_msg, d, down_msg) in &held[..3] {
        assert_eq!(sim.server_receive(addr, up_msg), Ok(Out::Tun(u.clone())));
        assert_eq!(sim.client_receive(c, down_msg), Ok(Out::Tun(d.clone())));
    }

    // Once the old keys are REJECT_AFTER_TIME old, both ends refuse them.
    sim.run_until(first_handshake + REJECT_AFTER_TIME + secs(2));
    let refused = [DropReason::Expired, DropReason::UnknownIndex];
    for (_, up_msg, _, down_msg) in &held[3..] {
        let r = sim.server_receive(addr, up_msg);
        assert!(
            matches!(r, Err(e) if refused.contains(&e)),
            "server took old keys: {r:?}"
        );
        let r = sim.client_receive(c, down_msg);
        assert!(
            matches!(r, Err(e) if refused.contains(&e)),
            "client took old keys: {r:?}"
        );
    }

    // And the session itself lives on.
    let (u, d) = (up(&sim, c, 100_000), down(&sim, c, 100_000));
    sim.client_send(c, &u).unwrap();
    sim.server_send(&d).unwrap();
    sim.settle();
    assert_eq!(sim.server_tun.last(), Some(&u));
    assert_eq!(sim.clients[c].tun.last(), Some(&d));
}

#[test]
fn rekey_after_messages_keeps_data_flowing() {
    let a = key(1);
    let link = Link {
        latency: ms(5),
        jitter: ms(3),
        loss: 0.0,
        duplicate: 0.0,
    };
    let mut sim = Sim::new(server_config(&[&a], pool(NET4, true)), link, 6);
    let mut config = ClientConfig::new(a, server_key().public_key());
    config.rekey_after_messages = 16;
    let c = sim.add_client_with(config, "203.0.113.10:40000".parse().unwrap());
    sim.connect(c);
    // A message under the first keys, kept until they are generations old.
    let stale = sim.client_seal(c, &up(&sim, c, 9999)).unwrap();

    let (mut sent_up, mut sent_down) = (HashMap::new(), HashMap::new());
    for n in 0..160 {
        let (u, d) = (up(&sim, c, n), down(&sim, c, n));
        sim.client_send(c, &u).unwrap();
        sim.server_send(&d).unwrap();
        sent_up.insert(payload_id(&u), u);
        sent_down.insert(payload_id(&d), d);
        sim.run_for(ms(10));
    }
    sim.settle();

    // About one handshake per 16 messages, long before REKEY_AFTER_TIME.
    let inits = sim.clients[c].inits.len();
    assert!(
        (8..=14).contains(&inits),
        "{inits} handshakes for 160 messages"
    );
    let indices: HashSet<u32> = sim
        .sent_by(sim.clients[c].addr, |d| kind(d) == TYPE_DATA)
        .iter()
        .map(|d| receiver_index(&d.bytes))
        .collect();
    assert_eq!(indices.len(), inits, "every handshake's keys were used");
    assert_eq!(assert_delivered_once(&sent_up, &sim.server_tun), 160);
    assert_eq!(assert_delivered_once(&sent_down, &sim.clients[c].tun), 160);
    assert!(sim.server_errors.is_empty(), "{:?}", sim.server_errors);
    assert!(
        sim.clients[c].errors.is_empty(),
        "{:?}",
        sim.clients[c].errors
    );
    assert_eq!(
        sim.clients[c].events.len(),
        1,
        "the configuration did not change"
    );

    // Keys two or more handshakes old are gone: the server no longer knows
    // their index at all, so the message is a stale index, counted as
    // unattributed like any other unknown index (see `Server::drops`).
    let addr = sim.clients[c].addr;
    assert_eq!(
        sim.server_receive(addr, &stale),
        Err(DropReason::UnknownIndex)
    );
    assert_eq!(sim.server.engine().drops().get(DropReason::UnknownIndex), 1);
    assert_eq!(session(&sim, c).drops.total(), 0);
}

// ---------------------------------------------------------------------------
// 6. Roaming
// ---------------------------------------------------------------------------

#[test]
fn roaming_client_keeps_its_session() {
    let a = key(1);
    let mut sim = Sim::with_clients(&[&a], Link::perfect(), 7);
    let c = sim.add_client(a);
    sim.connect(c);
    let handshake = session(&sim, c).last_handshake;

    // The client moves (new network): its next packet comes from elsewhere.
    let moved: SocketAddr = "198.18.0.5:50123".parse().unwrap();
    sim.clients[c].addr = moved;
    let u = up(&sim, c, 1);
    sim.client_send(c, &u).unwrap();
    sim.settle();
    assert_eq!(sim.server_tun, [u]);
    assert_eq!(session(&sim, c).path, Some(sim.path_to(moved)));
    let d = down(&sim, c, 1);
    assert_eq!(sim.server_send(&d), Ok(moved), "replies follow the client");
    sim.settle();
    assert_eq!(sim.clients[c].tun, [d]);

    // A NAT rebinding while idle: the server cannot know until the client
    // speaks, and the next keepalive (within one interval) tells it.
    let rebound: SocketAddr = "198.18.0.5:61000".parse().unwrap();
    sim.clients[c].addr = rebound;
    assert_eq!(sim.server_send(&down(&sim, c, 2)), Ok(moved));
    sim.run_for(KEEPALIVE + secs(1));
    assert_eq!(session(&sim, c).path, Some(sim.path_to(rebound)));
    let d = down(&sim, c, 3);
    assert_eq!(sim.server_send(&d), Ok(rebound));
    sim.settle();
    assert_eq!(sim.clients[c].tun.last(), Some(&d));

    // No new handshake was needed for any of it.
    assert_eq!(sim.clients[c].inits.len(), 1);
    assert_eq!(session(&sim, c).last_handshake, handshake);
    assert_eq!(
        sim.undeliverable.len(),
        1,
        "only the packet sent before the client spoke from its new port"
    );
}

#[test]
fn a_late_message_from_an_address_the_client_left_does_not_pull_the_session_back() {
    let a = key(1);
    let mut sim = Sim::with_clients(&[&a], Link::perfect(), 21);
    let c = sim.add_client(a);
    sim.connect(c);
    let old = sim.clients[c].addr;

    // A message sealed before the client moved, held up on the old path.
    let late = up(&sim, c, 1);
    let late_msg = sim.client_seal(c, &late).unwrap();
    let moved: SocketAddr = "198.18.0.5:50123".parse().unwrap();
    sim.clients[c].addr = moved;
    let u = up(&sim, c, 2);
    sim.client_send(c, &u).unwrap();
    sim.settle();
    assert_eq!(session(&sim, c).path, Some(sim.path_to(moved)));

    // It arrives at last: authentic and within the replay window, so it is
    // delivered, but it is not the client's newest message, so the
    // session's downstream stays on the path the client is on now.
    assert_eq!(
        sim.server_receive(old, &late_msg),
        Ok(Out::Tun(late.clone()))
    );
    assert_eq!(session(&sim, c).path, Some(sim.path_to(moved)));
    assert_eq!(sim.server_send(&down(&sim, c, 1)), Ok(moved));
    assert_eq!(sim.server_tun, [u, late]);
}

#[test]
fn a_restarted_clients_init_is_answered_where_it_came_from_but_moves_nothing() {
    let a = key(1);
    let mut sim = Sim::with_clients(&[&a], Link::perfect(), 22);
    let c = sim.add_client(a.clone());
    sim.connect(c);
    let old = sim.clients[c].addr;

    // The client restarts on another port. Its init reaches the server
    // 10 ms later and the response goes back there...
    let new: SocketAddr = "203.0.113.10:40001".parse().unwrap();
    sim.restart_client(c, client_config(a), new);
    let t = sim.now;
    sim.run_until(t + ms(15));
    let response = sim.sent_by(sim.server_addr, is_response).last().unwrap().to;
    assert_eq!(response, new);
    // ...but an init proves nothing about where the client is (it may be a
    // copy on a path the client only tries): the session stays put.
    assert_eq!(session(&sim, c).path, Some(sim.path_to(old)));
    assert_eq!(session(&sim, c).last_handshake, Some(t + ms(10)));

    // The first data message under the new keys (the client's key
    // confirmation, at 30 ms) moves it.
    sim.run_until(t + ms(35));
    assert_eq!(session(&sim, c).path, Some(sim.path_to(new)));
    let d = down(&sim, c, 1);
    assert_eq!(sim.server_send(&d), Ok(new));
    sim.settle();
    assert_eq!(sim.clients[c].tun.last(), Some(&d));
}

// ---------------------------------------------------------------------------
// 7. Server restart
// ---------------------------------------------------------------------------

#[test]
fn client_recovers_from_a_server_restart_with_the_same_address() {
    let a = key(1);
    let mut sim = Sim::with_clients(
        &[&a],
        Link {
            latency: ms(15),
            jitter: ms(10),
            ..Link::perfect()
        },
        8,
    );
    let c = sim.add_client(a.clone());
    sim.connect(c);
    let (addr, lease) = (sim.clients[c].addr, session(&sim, c).lease);

    // Some traffic, then the server process restarts: same key and admitted
    // keys, but no sessions.
    let mut n = 0;
    for _ in 0..10 {
        sim.client_send(c, &up(&sim, c, n)).unwrap();
        n += 1;
        sim.run_for(secs(1));
    }
    let restart = sim.now;
    sim.restart_server(server_config(&[&a], pool(NET4, true)));
    let delivered_before = sim.server_tun.len();

    // The client keeps sending once a second; the new server knows none of its indices.
    let recovered = loop {
        let p = up(&sim, c, n);
        n += 1;
        let _ = sim.client_send(c, &p); // NoSession while the handshake is under way
        sim.run_for(secs(1));
        if sim.server_tun.len() > delivered_before {
            break sim.now;
        }
        assert!(sim.now - restart < secs(120), "the client never recovered");
    };
    let outage = recovered - restart;
    let bound = KEEPALIVE * DEAD_AFTER_KEEPALIVES + secs(20);
    assert!(
        outage <= bound,
        "recovery took {outage:?}, more than {bound:?}"
    );
    // ...and not before the client could have noticed: the old keys were refused meanwhile.
    assert!(
        outage >= KEEPALIVE * (DEAD_AFTER_KEEPALIVES - 1),
        "recovered after only {outage:?}"
    );
    let errors = sim.server_errors_from(addr);
    assert!(
        errors.len() >= 5 && errors.iter().all(|&e| e == DropReason::UnknownIndex),
        "{errors:?}"
    );
    assert_eq!(
        sim.server.engine().drops().get(DropReason::UnknownIndex),
        errors.len() as u64
    );

    // A fresh handshake, the same addresses: nothing for the driver to reconfigure.
    assert_eq!(sim.clients[c].inits.len(), 2);
    assert_eq!(session(&sim, c).lease, lease);
    assert_eq!(
        sim.clients[c].events.len(),
        1,
        "no Configured event: the tunnel did not change"
    );
    assert_eq!(
        sim.clients[c].conn.engine().tunnel().unwrap().client_v4,
        lease.v4
    );

    // Data flows both ways again.
    sim.settle();
    let d = down(&sim, c, 1);
    assert_eq!(sim.server_send(&d), Ok(addr));
    sim.settle();
    assert_eq!(sim.clients[c].tun.last(), Some(&d));
}

// ---------------------------------------------------------------------------
// 8. Pool exhaustion and stable addresses
// ---------------------------------------------------------------------------

#[test]
fn exhausted_pool_refuses_newcomers_and_keeps_existing_addresses() {
    let (a, b) = (key(1), key(2));
    let mut sim = Sim::new(
        server_config(&[&a, &b], pool("10.1.0.0/30", false)),
        Link::perfect(),
        9,
    );
    assert_eq!(sim.server.engine().pool().capacity(), 1);
    let ca = sim.add_client(a.clone());
    sim.connect(ca);
    assert_eq!(sim.clients[ca].v4(), Ipv4Addr::new(10, 1, 0, 2));

    // B is admitted but there is no address left: no answer, ever.
    let cb = sim.add_client(b);
    sim.run_for(secs(60));
    assert!(sim.clients[cb].events.is_empty());
    let b_addr = sim.clients[cb].addr;
    assert!(
        sim.wire.iter().all(|d| d.to != b_addr),
        "the server answered B"
    );
    let b_inits = sim.clients[cb].inits.len() as u64;
    assert!(b_inits >= 5);
    assert_eq!(
        sim.server.engine().drops().get(DropReason::PoolExhausted),
        b_inits
    );
    assert_eq!(sim.server.sessions().len(), 1);

    // A restarts (new instance, new port, later timestamp): same address.
    let config = ClientConfig::new(a, server_key().public_key());
    sim.restart_client(ca, config, "203.0.113.10:40001".parse().unwrap());
    sim.connect(ca);
    assert_eq!(sim.clients[ca].events.len(), 2);
    assert_eq!(sim.clients[ca].v4(), Ipv4Addr::new(10, 1, 0, 2));
    let u = up(&sim, ca, 1);
    sim.client_send(ca, &u).unwrap();
    sim.settle();
    assert_eq!(sim.server_tun, [u]);
}

#[test]
fn reconnecting_client_gets_the_same_address() {
    let (a, b) = (key(1), key(2));
    let mut sim = Sim::with_clients(&[&a, &b], Link::perfect(), 10);
    let (ca, cb) = (sim.add_client(a.clone()), sim.add_client(b));
    sim.connect(ca);
    sim.connect(cb);
    let first = sim.clients[ca].config().unwrap();
    assert_ne!(first.client_v4, sim.clients[cb].v4());

    sim.run_for(secs(30));
    let config = ClientConfig::new(a, server_key().public_key());
    sim.restart_client(ca, config, "203.0.113.10:40001".parse().unwrap());
    sim.connect(ca);
    assert_eq!(sim.clients[ca].events.len(), 2);
    assert_eq!(
        sim.clients[ca].config(),
        Some(first),
        "same IPv4 and IPv6 addresses after reconnecting"
    );
    assert_eq!(sim.server.sessions().len(), 2);

    // Both clients work.
    for i in [ca, cb] {
        let d = down(&sim, i, 1);
        assert_eq!(sim.server_send(&d), Ok(sim.clients[i].addr));
        sim.settle();
        assert_eq!(sim.clients[i].tun.last(), Some(&d));
    }
}

// ---------------------------------------------------------------------------
// 9. Security
// ---------------------------------------------------------------------------

#[test]
fn unlisted_key_gets_nothing() {
    let (a, stranger) = (key(1), key(66));
    let mut sim = Sim::with_clients(&[&a], Link::perfect(), 11);
    let ca = sim.add_client(a);
    let cs = sim.add_client(stranger);
    sim.connect(ca);
    sim.run_for(secs(60));

    let s_addr = sim.clients[cs].addr;
    assert!(sim.clients[cs].events.is_empty());
    assert!(
        sim.wire.iter().all(|d| d.to != s_addr),
        "the server answered an unlisted key"
    );
    let inits = sim.clients[cs].inits.len() as u64;
    assert!(inits >= 5);
    assert_eq!(
        sim.server.engine().drops().get(DropReason::NotAllowed),
        inits
    );
    assert_eq!(
        sim.server_errors_from(s_addr),
        vec![DropReason::NotAllowed; inits as usize]
    );
    assert_eq!(sim.server.sessions().len(), 1);
    // Nor can it send anything: it has no session.
    let p = ipv4(Ipv4Addr::new(10, 1, 0, 9), INTERNET_V4, &payload(9, 0));
    assert_eq!(sim.client_send(cs, &p), Err(DropReason::NoSession));
    assert!(sim.server_tun.is_empty());
}

#[test]
fn spoofed_inner_sources_are_dropped() {
    let (a, b) = (key(1), key(2));
    let mut sim = Sim::with_clients(&[&a, &b], Link::perfect(), 12);
    let (ca, cb) = (sim.add_client(a), sim.add_client(b));
    sim.connect(ca);
    sim.connect(cb);
    let addr = sim.clients[ca].addr;
    let spoofs = [
        ipv4(Ipv4Addr::new(10, 1, 0, 99), INTERNET_V4, &payload(5, 1)), // unassigned
        ipv4(Ipv4Addr::new(10, 1, 0, 1), INTERNET_V4, &payload(5, 2)),  // the server
        ipv4(sim.clients[cb].v4(), INTERNET_V4, &payload(5, 3)),        // another client
        ipv4(
            Ipv4Addr::new(8, 8, 8, 8),
            sim.clients[cb].v4(),
            &payload(5, 4),
        ), // outside, to a client
        ipv6(sim.clients[cb].v6(), INTERNET_V6, &payload(5, 5)),
        ipv6(
            "fd69:7074:756e::99".parse().unwrap(),
            INTERNET_V6,
            &payload(5, 6),
        ),
    ];
    for p in &spoofs {
        let msg = sim.client_seal(ca, p).unwrap();
        assert_eq!(sim.server_receive(addr, &msg), Err(DropReason::Spoofed));
    }
    sim.settle();
    assert!(sim.server_tun.is_empty());
    assert!(sim.clients[cb].tun.is_empty());
    let s = session(&sim, ca);
    assert_eq!(s.drops.get(DropReason::Spoofed), spoofs.len() as u64);
    assert_eq!(s.traffic.rx_packets, 0);

    // Its own addresses are fine.
    let own = [
        up(&sim, ca, 1),
        ipv6(sim.clients[ca].v6(), INTERNET_V6, &payload(1, 2)),
    ];
    for p in &own {
        sim.client_send(ca, p).unwrap();
    }
    sim.settle();
    assert_eq!(sim.server_tun, own);

    // Not an IP packet at all: refused before sealing.
    assert_eq!(
        sim.client_seal(ca, &[0x45; 10]),
        Err(DropReason::BadInnerPacket)
    );
}

/// A hostile datagram: random bytes, or something shaped like one of our
/// messages (with the right type, lengths and even a live session index)
/// so that it gets past the cheap checks.
fn garbage(rng: &mut Rng, live_index: u32, real: &[u8]) -> Vec<u8> {
    let mut d;
    match rng.below(7) {
        0 | 1 => {
            d = vec![0; rng.below(1600) as usize];
            rng.fill(&mut d);
        }
        2 => {
            d = vec![0; 32 + rng.below(1400) as usize];
            rng.fill(&mut d);
            d[..4].copy_from_slice(&[TYPE_DATA, 0, 0, 0]);
        }
        3 => {
            // The live index, with counters far ahead: if a forgery moved the
            // replay window, the real traffic after it would be refused.
            d = vec![0; 32 + rng.below(600) as usize];
            rng.fill(&mut d);
            d[..8].copy_from_slice(&[TYPE_DATA, 0, 0, 0, 0, 0, 0, 0]);
            d[4..8].copy_from_slice(&live_index.to_le_bytes());
            let counter =
                [u64::MAX - 1, 1 << 60, 1 << 32, 5000, rng.next_u64()][rng.below(5) as usize];
            d[8..16].copy_from_slice(&counter.to_le_bytes());
        }
        4 => {
            // Shaped like an init: costs the server a DH, so fewer of these.
            d = vec![
                0;
                if rng.chance(0.1) {
                    INIT_LEN
                } else {
                    INIT_LEN - 1
                }
            ];
            rng.fill(&mut d);
            d[..4].copy_from_slice(&[TYPE_INIT, 0, 0, 0]);
        }
        5 => {
            d = vec![0; RESPONSE_LEN];
            rng.fill(&mut d);
            d[..4].copy_from_slice(&[TYPE_RESPONSE, 0, 0, 0]);
        }
        _ => {
            // A real message, truncated or with one bit flipped.
            d = real.to_vec();
            if rng.chance(0.5) {
                d.truncate(rng.below(d.len() as u64) as usize);
            } else {
                let bit = rng.below(d.len() as u64 * 8) as usize;
                d[bit / 8] ^= 1 << (bit % 8);
            }
        }
    }
    d
}

#[test]
fn garbage_never_panics_never_answers_and_leaves_sessions_alone() {
    // 16 bursts of 200 hostile datagrams to each end, with real traffic between.
    const ROUNDS: u32 = 16;
    let a = key(1);
    let mut sim = Sim::with_clients(&[&a], Link::perfect(), 13);
    let c = sim.add_client(a);
    sim.connect(c);
    let addr = sim.clients[c].addr;
    let attacker: SocketAddr = "198.18.66.66:6666".parse().unwrap();
    let mut rng = Rng::new(0xBAD);

    let (mut sent_up, mut sent_down) = (HashMap::new(), HashMap::new());
    let mut exchange = |sim: &mut Sim, n: u32| {
        let (u, d) = (up(sim, c, n), down(sim, c, n));
        sim.client_send(c, &u).unwrap();
        sim.server_send(&d).unwrap();
        sent_up.insert(payload_id(&u), u);
        sent_down.insert(payload_id(&d), d);
        sim.settle();
    };
    exchange(&mut sim, 0);

    let (server_drops, client_drops) =
        (server_drop_total(&sim), sim.clients[c].conn.drops().total());
    let mut count = 0u64;
    for round in 1..=ROUNDS {
        // The latest real message each way, and the session index it names.
        let live_up = sim
            .sent_by(addr, |d| kind(d) == TYPE_DATA)
            .last()
            .unwrap()
            .bytes
            .clone();
        let live_down = sim
            .sent_by(sim.server_addr, |d| kind(d) == TYPE_DATA)
            .last()
            .unwrap()
            .bytes
            .clone();
        for _ in 0..200 {
            // Both ends get garbage, the server some of it from the client's own address.
            let from = if rng.chance(0.3) { addr } else { attacker };
            let g = garbage(&mut rng, receiver_index(&live_up), &live_up);
            let r = sim.server_receive(from, &g);
            assert!(r.is_err(), "the server accepted garbage {g:?}: {r:?}");
            let g = garbage(&mut rng, receiver_index(&live_down), &live_down);
            let r = sim.client_receive(c, &g);
            assert!(r.is_err(), "the client accepted garbage {g:?}: {r:?}");
            count += 1;
        }
        // The session goes on between the bursts.
        exchange(&mut sim, round);
    }

    // Never an answer: every datagram the server sent went to the real client.
    assert!(
        sim.wire
            .iter()
            .filter(|d| d.from == sim.server_addr)
            .all(|d| d.to == addr)
    );
    // Every garbage datagram was counted once, at each end.
    assert_eq!(server_drop_total(&sim) - server_drops, count);
    assert_eq!(sim.clients[c].conn.drops().total() - client_drops, count);
    assert!(sim.server.engine().drops().get(DropReason::Malformed) > 0);
    assert!(
        session(&sim, c).drops.get(DropReason::Unauthenticated) > 0,
        "forgeries on the live index were tried"
    );
    assert!(sim.clients[c].conn.drops().get(DropReason::Unauthenticated) > 0);
    // And the real traffic, before, between and after, all arrived.
    let rounds = ROUNDS as usize + 1;
    assert_eq!(assert_delivered_once(&sent_up, &sim.server_tun), rounds);
    assert_eq!(
        assert_delivered_once(&sent_down, &sim.clients[c].tun),
        rounds
    );
    assert_eq!(sim.clients[c].inits.len(), 1, "no re-handshake was needed");
}

#[test]
fn unauthenticated_senders_never_get_more_bytes_than_they_sent() {
    // Everything the server answers without a session is an answer to an
    // init; the sim asserts on every such answer that it is no larger. Here
    // we also make sure inits from every kind of sender were answered or not
    // as they should be, so that check had something to bite on.
    let (a, stranger) = (key(1), key(66));
    let mut sim = Sim::with_clients(&[&a], Link::perfect(), 14);
    let (ca, cs) = (sim.add_client(a), sim.add_client(stranger));
    sim.connect(ca);
    sim.run_for(secs(20));
    let responses = sim.sent_by(sim.server_addr, is_response);
    assert_eq!(responses.len(), 1);
    assert!(responses[0].bytes.len() <= INIT_LEN);
    assert!(sim.sent_by(sim.clients[cs].addr, is_init).len() >= 4);
    assert!(sim.wire.iter().all(|d| d.to != sim.clients[cs].addr));
    // A replayed init from a spoofed source (the classic reflection) gets nothing.
    let init = sim.sent_by(sim.clients[ca].addr, is_init)[0].bytes.clone();
    let victim: SocketAddr = "192.0.2.99:53".parse().unwrap();
    let before = sim.wire.len();
    assert_eq!(
        sim.server_receive(victim, &init),
        Err(DropReason::StaleHandshake)
    );
    assert_eq!(sim.wire.len(), before);
}

// ---------------------------------------------------------------------------
// 10. Client to client
// ---------------------------------------------------------------------------

#[test]
fn server_forwards_between_clients_directly() {
    let (a, b) = (key(1), key(2));
    let mut sim = Sim::with_clients(&[&a, &b], Link::perfect(), 15);
    let (ca, cb) = (sim.add_client(a), sim.add_client(b));
    sim.connect(ca);
    sim.connect(cb);
    let (a4, b4) = (sim.clients[ca].v4(), sim.clients[cb].v4());
    let (a6, b6) = (sim.clients[ca].v6(), sim.clients[cb].v6());
    assert_ne!(a4, b4);
    assert_ne!(a6, b6);

    // A to B: the server re-seals it for B and sends it to B's path, not to its TUN.
    let sent = [ipv4(a4, b4, &payload(7, 1)), ipv6(a6, b6, &payload(7, 2))];
    for p in &sent {
        let msg = sim.client_seal(ca, p).unwrap();
        match sim.server_receive(sim.clients[ca].addr, &msg) {
            Ok(Out::Send(to, fwd)) => {
                assert_eq!(to, sim.clients[cb].addr);
                assert_eq!(fwd.len(), msg.len());
                assert_ne!(fwd, msg, "re-sealed with B's keys");
            }
            other => panic!("not forwarded: {other:?}"),
        }
    }
    sim.settle();
    assert_eq!(sim.clients[cb].tun, sent);
    assert!(
        sim.server_tun.is_empty(),
        "client-to-client traffic bypasses the server's TUN"
    );

    // And back, through the ordinary send path.
    let back = ipv4(b4, a4, &payload(8, 1));
    sim.client_send(cb, &back).unwrap();
    sim.settle();
    assert_eq!(sim.clients[ca].tun, [back]);
    assert_eq!(session(&sim, ca).traffic.tx_packets, 1);
    assert_eq!(session(&sim, cb).traffic.tx_packets, 2);
}

// ---------------------------------------------------------------------------
// 11. Keepalives
// ---------------------------------------------------------------------------

#[test]
fn idle_session_stays_up_on_keepalives_and_only_rekeys_on_time() {
    let a = key(1);
    let mut sim = Sim::with_clients(&[&a], Link::perfect(), 16);
    let c = sim.add_client(a);
    sim.connect(c);
    let addr = sim.clients[c].addr;

    // Ten idle minutes, checked every second.
    let idle = secs(600);
    let from = sim.now;
    while sim.now - from < idle {
        sim.run_for(secs(1));
        assert!(
            sim.clients[c].conn.is_connected(sim.now),
            "session down at {:?}",
            sim.elapsed()
        );
    }

    // The client never stays silent longer than one keepalive interval...
    let keepalives = sim.sent_by(addr, is_keepalive);
    let mut times: Vec<_> = keepalives
        .iter()
        .map(|d| d.sent)
        .filter(|&t| t >= from)
        .collect();
    times.insert(0, from);
    let longest = times.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(
        longest <= KEEPALIVE + ms(50),
        "{longest:?} without a keepalive"
    );
    assert!(times.len() > 60, "{} keepalives", times.len() - 1);
    // ...and the server answers each one.
    let answers = sim.sent_by(sim.server_addr, is_keepalive).len();
    assert_eq!(answers, keepalives.len());

    // The only handshakes are the first and the 120 s rekeys: never a
    // "server is dead" re-handshake.
    // Inits at 0, 120, 240, 360 and 480 s (plus a round trip each); the
    // sixth falls just after the ten minutes.
    let inits = &sim.clients[c].inits;
    assert_eq!(inits.len(), 5);
    for w in inits.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= REKEY_AFTER_TIME && gap < REKEY_AFTER_TIME + secs(1),
            "handshake after {gap:?}"
        );
    }
    assert!(sim.server_errors.is_empty() && sim.clients[c].errors.is_empty());
    assert_eq!(sim.clients[c].events.len(), 1);

    // Data still flows after the long idle.
    let u = up(&sim, c, 1);
    sim.client_send(c, &u).unwrap();
    sim.settle();
    assert_eq!(sim.server_tun, [u]);
}

#[test]
fn forged_response_does_not_derail_a_handshake() {
    // Someone who sees the init (its sender index is in clear) answers
    // first with a forged response. The client must refuse it and still
    // take the real one that follows, not wait for a retry.
    let a = key(1);
    let mut sim = Sim::with_clients(&[&a], Link::perfect(), 17);
    let c = sim.add_client(a);
    sim.run_until(sim.start);
    let init = sim.sent_by(sim.clients[c].addr, is_init)[0].bytes.clone();
    let mut rng = Rng::new(17);
    let mut forged = vec![0; RESPONSE_LEN];
    rng.fill(&mut forged);
    forged[..4].copy_from_slice(&[TYPE_RESPONSE, 0, 0, 0]);
    forged[8..12].copy_from_slice(&init[4..8]); // receiver: the init's sender index
    assert_eq!(
        sim.client_receive(c, &forged),
        Err(DropReason::Unauthenticated)
    );

    sim.connect(c);
    assert_eq!(
        sim.clients[c].inits.len(),
        1,
        "the first handshake completed"
    );
    assert_eq!(sim.clients[c].events[0].0 - sim.start, ms(20));
}

#[test]
fn server_answers_after_months_without_a_handshake() {
    // Virtual time makes long quiet spells cheap: the handshake rate
    // limiter must cope with a refill of more tokens than fit in a u32.
    let a = key(1);
    let mut sim = Sim::with_clients(&[&a], Link::perfect(), 18);
    sim.skip(secs(100 * 24 * 3600));
    let c = sim.add_client(a);
    sim.connect(c);
    assert_eq!(sim.clients[c].inits.len(), 1);
}

#[test]
fn one_way_traffic_still_hears_the_server() {
    let a = key(1);
    let mut sim = Sim::with_clients(&[&a], Link::perfect(), 19);
    let c = sim.add_client(a);
    sim.connect(c);
    let addr = sim.clients[c].addr;
    let keepalives_since = |sim: &Sim, t| {
        sim.sent_by(addr, |d| is_keepalive(d) || is_probe(d))
            .iter()
            .filter(|d| d.sent >= t)
            .count()
    };

    // Upload only (the far end never replies): the client hears nothing but
    // answers to its keepalives and probes, which must keep coming or it
    // would take the silence for a dead server (or path) and re-handshake.
    let t = sim.now;
    for n in 0..55 {
        sim.client_send(c, &up(&sim, c, n)).unwrap();
        sim.run_for(secs(1));
    }
    assert!(keepalives_since(&sim, t) >= 5);
    assert_eq!(
        sim.clients[c].inits.len(),
        1,
        "re-handshook while uploading"
    );

    // Download only: the client sends nothing of its own, yet keepalives
    // still go out to hold the NAT mapping open.
    let t = sim.now;
    for n in 0..55 {
        sim.server_send(&down(&sim, c, n)).unwrap();
        sim.run_for(secs(1));
    }
    assert!(keepalives_since(&sim, t) >= 5);
    assert_eq!(sim.clients[c].inits.len(), 1);
    assert_eq!(sim.server_tun.len(), 55);
    assert_eq!(sim.clients[c].tun.len(), 55);
}

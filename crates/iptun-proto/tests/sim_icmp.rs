//! Simulated-network tests of the ICMP echo transport: the shipped client
//! `Connection` and server `Endpoint`, real echo messages (`wire::icmp`), a
//! NAT that rewrites echo ids and source addresses, and a stateful firewall
//! that drops (and counts) any reply not answering an outstanding request.
//! See `icmp_sim/mod.rs`. Virtual time, seeded loss: deterministic.

mod common;
mod icmp_sim;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use common::{INTERNET_V4, Link, NET4, ipv4, key, payload, payload_id, pool, server_config};
use icmp_sim::*;
use iptun_proto::crypto::PrivateKey;
use iptun_proto::endpoint::Path;
use iptun_proto::engine::{
    DEAD_AFTER_KEEPALIVES, DEFAULT_KEEPALIVE_SECS, REJECT_AFTER_TIME, REKEY_AFTER_TIME, SessionId,
};
use iptun_proto::wire::message::{TYPE_DATA, TYPE_INIT, TYPE_RESPONSE};

const CLIENT_ID: u16 = 0x4242;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

fn link(latency: Duration, loss: f64) -> Link {
    Link {
        latency,
        jitter: Duration::ZERO,
        loss,
        duplicate: 0.0,
    }
}

fn sim_with(keys: &[&PrivateKey], link: Link, mode: IdMode, seed: u64) -> IcmpSim {
    IcmpSim::new(server_config(keys, pool(NET4, false)), link, mode, seed)
}

/// The server's path to the client with `key`: the address replies go to
/// and the session its requests carry.
fn path_of(sim: &IcmpSim, key: &PrivateKey) -> (IpAddr, Option<SessionId>) {
    match sim.server.session(&key.public_key()).and_then(|s| s.path) {
        Some(Path::Icmp { ip, session, .. }) => (ip, session),
        other => panic!("not an ICMP path: {other:?}"),
    }
}

/// A client-to-internet packet from client `i`.
fn up(sim: &IcmpSim, i: usize, n: u32) -> Vec<u8> {
    ipv4(sim.clients[i].v4(), INTERNET_V4, &payload(1, n))
}

/// An internet-to-client packet for client `i`, tagged `tag`.
fn down(sim: &IcmpSim, i: usize, tag: u8, n: u32) -> Vec<u8> {
    ipv4(INTERNET_V4, sim.clients[i].v4(), &payload(tag, n))
}

/// What arrived is a subset of what was sent, each packet byte-identical
/// and at most once; returns how many arrived.
fn assert_delivered_once(sent: &HashMap<(u8, u32), Vec<u8>>, got: &[(Instant, Vec<u8>)]) -> usize {
    let mut seen = HashSet::new();
    for (_, p) in got {
        let id = payload_id(p);
        let original = sent
            .get(&id)
            .unwrap_or_else(|| panic!("packet {id:?} was never sent"));
        assert_eq!(p, original, "packet {id:?} arrived altered");
        assert!(seen.insert(id), "packet {id:?} arrived twice");
    }
    seen.len()
}

/// The firewall dropped nothing, and the server never answered a request
/// twice or answered something that was not a request.
fn assert_one_reply_per_request(sim: &IcmpSim) {
    assert!(
        sim.nat.firewall_drops.is_empty(),
        "the firewall dropped unsolicited replies: {:?}",
        sim.nat.firewall_drops
    );
    assert!(
        sim.server.violations.is_empty(),
        "{:?}",
        sim.server.violations
    );
    assert_eq!(sim.server.repeated, 0, "a request arrived twice");
    // Every reply on the wire answers a request that went up before it.
    let mut requests: HashMap<(Ipv4Addr, u16, u16), usize> = HashMap::new();
    let mut replies = 0;
    for w in &sim.wire {
        if w.up {
            *requests.entry((w.src, w.id, w.seq)).or_default() += 1;
        } else {
            replies += 1;
            let n = requests
                .get_mut(&(w.dst, w.id, w.seq))
                .filter(|n| **n > 0)
                .unwrap_or_else(|| panic!("reply {w:?} answers no request"));
            *n -= 1;
        }
    }
    assert_eq!(replies, sim.server.answered.len());
}

/// Every request the server received was answered within `HOLD` (its
/// timer fires on time: there is no tick), or is still held and younger
/// than that; a keepalive sooner than the hold answers a request held under
/// keys a newer request of the same client replaced.
fn assert_answered_in_time(sim: &IcmpSim) {
    let limit = HOLD;
    for a in &sim.server.answered {
        if a.how == Answer::Superseded {
            assert!(
                sim.server.superseded_legitimately(a),
                "early keepalive {a:?}"
            );
        }
        assert!(
            a.answered - a.arrived <= limit,
            "{a:?} was held {:?}",
            a.answered - a.arrived
        );
    }
    for (r, a) in &sim.server.open {
        let at = a.at;
        assert!(
            sim.now - at <= limit,
            "{r:?} is held since {:?}",
            at - sim.start
        );
    }
}

/// Nothing went wrong anywhere: no drops counted at either end, no
/// answer without a session, no packet lost by the endpoint's transport.
fn assert_clean(sim: &IcmpSim) {
    assert_eq!(sim.server.errors, [], "server errors");
    assert_eq!(sim.server.drop_total(), 0, "server drops");
    assert_eq!(sim.server.endpoint.transport_drops(), [], "transport drops");
    for (i, c) in sim.clients.iter().enumerate() {
        assert_eq!(c.errors, [], "client {i} errors");
        assert_eq!(c.conn.drops().total(), 0, "client {i} drops");
        assert_eq!(
            c.bare_replies, 0,
            "client {i} got answers without a session"
        );
    }
}

/// Every handshake is a rekey: it starts `REKEY_AFTER_TIME` (plus at most
/// `slack`: the previous handshake's round trip and retries) after the
/// previous one.
fn assert_only_rekeys(inits: &[Instant], slack: Duration) {
    for w in inits.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= REKEY_AFTER_TIME && gap <= REKEY_AFTER_TIME + slack,
            "a handshake {gap:?} after the previous one is not a rekey"
        );
    }
}

// ---------------------------------------------------------------------------
// 1. Handshake and data through the NAT
// ---------------------------------------------------------------------------

#[test]
fn handshake_and_data_over_icmp_through_nat() {
    let a = key(1);
    let mut sim = sim_with(&[&a], link(ms(20), 0.0), IdMode::PerRequest, 1);
    let c = sim.add_client(a.clone(), CLIENT_ID);
    sim.connect(c);

    // The init rides the first request; the response answers that very
    // request at once (one round trip), not a later one.
    let first_up = &sim.wire[0];
    assert!(first_up.up);
    assert_eq!(first_up.msg.as_deref().map(|m| m[0]), Some(TYPE_INIT));
    assert_eq!(first_up.src, NAT_IP, "the server sees the NAT's address");
    assert_ne!(first_up.id, CLIENT_ID, "the NAT rewrote the echo id");
    let first_down = sim.wire.iter().find(|w| !w.up).unwrap();
    assert_eq!(first_down.msg.as_deref().map(|m| m[0]), Some(TYPE_RESPONSE));
    assert_eq!(
        (first_down.dst, first_down.id, first_down.seq),
        (first_up.src, first_up.id, first_up.seq)
    );
    assert_eq!(first_down.at, first_up.at + ms(20), "answered on arrival");
    assert_eq!(sim.server.answered[0].how, Answer::Response);
    // The confirming keepalive is the next request, and the server holds it
    // (until data or `HOLD` answers it).
    let confirm = sim.clients[c].requests[1];
    assert_eq!((confirm.kind, confirm.keepalive), (TYPE_DATA, true));
    assert_eq!(sim.clients[c].inits.len(), 1);
    assert!(sim.server.open.keys().any(|r| r.seq == confirm.seq));

    let (ip, session) = path_of(&sim, &a);
    assert_eq!(ip, IpAddr::from(NAT_IP));
    let session = session.expect("the path names the session");
    assert_eq!(sim.server.endpoint.sessions().len(), 1);

    // Data both ways, byte-identical and in order.
    let mut sent_up = Vec::new();
    let mut sent_down = Vec::new();
    for n in 0..20 {
        let p = up(&sim, c, n);
        sim.client_send(c, &p).unwrap();
        sent_up.push(p);
        let p = down(&sim, c, 2, n);
        sim.server_send(&p).unwrap();
        sent_down.push(p);
        sim.run_for(ms(7));
    }
    sim.run_for(secs(1));
    let got_up: Vec<_> = sim.server.tun.iter().map(|(_, p)| p.clone()).collect();
    let got_down: Vec<_> = sim.clients[c].tun.iter().map(|(_, p)| p.clone()).collect();
    assert_eq!(got_up, sent_up);
    assert_eq!(got_down, sent_down);

    // The server never saw the client's own id, and saw many public ids
    // (fresh for every request), yet kept one session: it goes by the
    // authenticated message, not by the echo id.
    let ids: HashSet<u16> = sim.wire.iter().filter(|w| w.up).map(|w| w.id).collect();
    assert!(!ids.contains(&CLIENT_ID));
    assert!(ids.len() >= 3, "public ids seen: {ids:?}");

    // The NAT renumbers: new requests leave from another address. Replies to
    // the requests held from the old address still go there (and pass the
    // firewall); the session follows without a handshake.
    let renumbered = Ipv4Addr::new(203, 0, 113, 99);
    sim.nat.public_ip = renumbered;
    let renumbered_at = sim.now;
    for n in 20..40 {
        let p = down(&sim, c, 2, n);
        sim.server_send(&p).unwrap();
        sent_down.push(p);
        sim.run_for(secs(1));
    }
    sim.run_for(secs(10));
    assert_eq!(path_of(&sim, &a), (renumbered.into(), Some(session)));
    let got_down: Vec<_> = sim.clients[c].tun.iter().map(|(_, p)| p.clone()).collect();
    assert_eq!(got_down, sent_down);
    assert_eq!(sim.clients[c].inits.len(), 1, "no new handshake");
    let old_address_answers = sim
        .server
        .answered
        .iter()
        .filter(|x| x.request.ip == NAT_IP && x.answered > renumbered_at)
        .count();
    assert!(old_address_answers >= MIN_OUTSTANDING);

    // An ordinary ping is answered once, with its payload, as the kernel would.
    sim.ping(c, 7, 1, b"just a ping");
    sim.run_for(secs(1));
    assert_eq!(sim.clients[c].pings, [(7, 1, b"just a ping".to_vec())]);

    assert_one_reply_per_request(&sim);
    assert_answered_in_time(&sim);
    assert_clean(&sim);
}

// ---------------------------------------------------------------------------
// 2. Exactly one reply per request, through traffic and long idle spells
// ---------------------------------------------------------------------------

/// Up and down traffic for `span`, a packet each way every `every`.
fn traffic(
    sim: &mut IcmpSim,
    c: usize,
    span: Duration,
    every: Duration,
    n: &mut u32,
    sent: &mut HashMap<(u8, u32), Vec<u8>>,
) {
    let end = sim.now + span;
    while sim.now < end {
        let p = up(sim, c, *n);
        sim.client_send(c, &p).unwrap();
        sent.insert(payload_id(&p), p);
        let p = down(sim, c, 2, *n);
        sim.server_send(&p).unwrap();
        sent.insert(payload_id(&p), p);
        *n += 1;
        sim.run_for(every);
    }
}

#[test]
fn one_reply_per_request() {
    let a = key(1);
    let mut sim = sim_with(&[&a], link(ms(25), 0.0), IdMode::PerFlow, 2);
    let c = sim.add_client(a.clone(), CLIENT_ID);
    sim.connect(c);
    let t0 = sim.now;
    let (mut n, mut sent) = (0, HashMap::new());

    // Traffic, a short idle spell, traffic across the first rekey (~120 s).
    traffic(&mut sim, c, secs(30), ms(50), &mut n, &mut sent);
    sim.run_until(t0 + secs(105));
    traffic(&mut sim, c, secs(30), ms(50), &mut n, &mut sent);
    sim.run_for(secs(5));

    // Ten idle minutes: the client stays connected on keepalives alone.
    let idle_from = sim.now;
    let requests_before = sim.clients[c].requests.len();
    let answered_before = sim.server.answered.len();
    for _ in 0..600 {
        sim.run_for(secs(1));
        assert!(sim.clients[c].conn.is_connected(sim.now));
    }
    let idle_to = sim.now;
    let idle_target = sim.clients[c].stats(sim.now).target;

    // A last burst, then let everything in the air land.
    traffic(&mut sim, c, secs(5), ms(20), &mut n, &mut sent);
    sim.run_for(secs(2));

    assert_one_reply_per_request(&sim);
    assert_answered_in_time(&sim);
    assert_clean(&sim);

    // Held requests that no data came for were answered by a keepalive after
    // exactly HOLD, never sooner (and no later: no tick to wait for).
    let keepalives: Vec<_> = sim
        .server
        .answered
        .iter()
        .filter(|x| x.how == Answer::Keepalive)
        .collect();
    assert!(keepalives.len() > 200, "{} keepalives", keepalives.len());
    for k in &keepalives {
        let held = k.answered - k.arrived;
        assert_eq!(held, HOLD, "{k:?}");
    }
    // While idle, requests are all answered by keepalives (no busy loop:
    // about MIN_OUTSTANDING requests every HOLD, plus the rekeys, which
    // answer requests held under the old keys at once).
    let idle_answers = &sim.server.answered[answered_before..];
    assert!(
        idle_answers
            .iter()
            .filter(|x| x.answered > idle_from + secs(10) && x.answered < idle_to)
            .all(|x| matches!(
                x.how,
                Answer::Keepalive | Answer::Superseded | Answer::Response
            ))
    );
    let idle_requests = sim.clients[c].requests[requests_before..]
        .iter()
        .filter(|r| r.at < idle_to)
        .count();
    let expected = (600 / HOLD.as_secs() as usize) * MIN_OUTSTANDING;
    assert!(
        idle_requests >= expected * 8 / 10 && idle_requests <= expected * 12 / 10,
        "{idle_requests} requests in ten idle minutes (about {expected} expected)"
    );
    assert_eq!(idle_target, MIN_OUTSTANDING);
    // And the client kept hearing from the server: a keepalive at least
    // every HOLD, so it never suspects the server gone.
    let rx: Vec<Instant> = sim.clients[c]
        .rx_times()
        .filter(|&t| t >= idle_from && t < idle_to)
        .collect();
    let silence = rx.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(silence <= HOLD, "silent for {silence:?}");
    // Lossless, so the pacer never had to give up on a request: every one
    // was answered (within its timeout).
    assert_eq!(sim.clients[c].stats(sim.now).unanswered, 0);

    // No handshake other than the two-minute rekeys: five in ten minutes.
    let inits = &sim.clients[c].inits;
    assert_only_rekeys(inits, secs(1));
    let idle_inits = inits
        .iter()
        .filter(|&&t| t >= idle_from && t < idle_to)
        .count();
    assert!(
        (4..=5).contains(&idle_inits),
        "{idle_inits} handshakes while idle"
    );
    assert_eq!(sim.clients[c].events.len(), 1, "configured once");

    // Lossless: every packet, both ways, exactly once and intact.
    let got_up = assert_delivered_once(&sent, &sim.server.tun);
    let got_down = assert_delivered_once(&sent, &sim.clients[c].tun);
    assert_eq!(got_up + got_down, sent.len());
}

// ---------------------------------------------------------------------------
// 3. Downstream rides held requests
// ---------------------------------------------------------------------------

#[test]
fn downstream_never_waits_for_a_round_trip() {
    const ONE_WAY: Duration = Duration::from_millis(25);
    let a = key(1);
    let mut sim = sim_with(&[&a], link(ONE_WAY, 0.0), IdMode::PerFlow, 3);
    let c = sim.add_client(a, CLIENT_ID);
    sim.connect(c);

    // Idle for a minute: the pacer sits at its minimum, and that many
    // requests are held at the server.
    sim.run_for(secs(60));
    assert_eq!(sim.clients[c].stats(sim.now).target, MIN_OUTSTANDING);
    let held = sim.server.open.len();
    assert_eq!(held, MIN_OUTSTANDING);

    // A burst of 32 packets from the server's TUN in one instant.
    let t = sim.now;
    let taken_before = sim.clients[c].taken.len();
    let burst: Vec<Vec<u8>> = (0..32).map(|n| down(&sim, c, 2, n)).collect();
    for p in &burst {
        sim.server_send(p).unwrap();
    }
    sim.run_for(secs(1));
    let got: Vec<_> = sim.clients[c].tun.iter().map(|(_, p)| p.clone()).collect();
    assert_eq!(got, burst, "all delivered, intact and in order");
    let delays: Vec<Duration> = sim.clients[c].tun.iter().map(|(at, _)| *at - t).collect();
    // The first ones ride the held requests: one-way latency, no round trip.
    assert!(delays[..held].iter().all(|&d| d == ONE_WAY), "{delays:?}");
    // The rest wait only for the requests those replies trigger: the
    // client doubles its target with every reply that brings data (and
    // paces them: at its initial rate, a thousand a second, the requests
    // for the 30 others go over 30 ms).
    assert!(
        delays[held..].iter().all(|&d| d >= 3 * ONE_WAY),
        "{delays:?}"
    );
    assert!(
        *delays.last().unwrap() <= 5 * ONE_WAY + ms(30),
        "{delays:?}"
    );
    let peak = sim.clients[c].taken[taken_before..]
        .iter()
        .map(|x| x.target)
        .max()
        .unwrap();
    assert_eq!(peak, MAX_OUTSTANDING, "the pacer grew while data flowed");

    // A steady stream faster than the round trip: with the pacer grown,
    // enough requests wait at the server that packets leave at once.
    let stream_from = sim.clients[c].tun.len();
    let mut sent_at = HashMap::new();
    for n in 100..500 {
        let p = down(&sim, c, 2, n);
        sim.server_send(&p).unwrap();
        sent_at.insert(n, sim.now);
        sim.run_for(ms(5));
    }
    sim.run_for(secs(1));
    let stream = &sim.clients[c].tun[stream_from..];
    assert_eq!(stream.len(), 400);
    let prompt = stream
        .iter()
        .filter(|(at, p)| *at - sent_at[&payload_id(p).1] == ONE_WAY)
        .count();
    assert_eq!(
        prompt, 400,
        "every packet of the stream rode a held request"
    );
    assert!(
        sim.server
            .answered
            .iter()
            .filter(|x| x.answered >= t)
            .all(|x| x.how == Answer::Message || x.answered - x.arrived >= HOLD)
    );

    // Idle again: held requests come back as keepalives and the target
    // shrinks back to the minimum.
    let idle_from = sim.clients[c].taken.len();
    sim.run_for(secs(30));
    assert!(
        sim.clients[c].taken[idle_from..]
            .iter()
            .all(|x| !x.carried_data)
    );
    assert_eq!(sim.clients[c].stats(sim.now).target, MIN_OUTSTANDING);
    assert_eq!(sim.server.open.len(), MIN_OUTSTANDING);

    assert_one_reply_per_request(&sim);
    assert_answered_in_time(&sim);
    assert_clean(&sim);
}

// ---------------------------------------------------------------------------
// 4. Two clients behind one NAT
// ---------------------------------------------------------------------------

#[test]
fn two_clients_behind_one_nat() {
    let (a, b) = (key(1), key(2));
    let mut sim = sim_with(&[&a, &b], link(ms(20), 0.0), IdMode::PerRequest, 4);
    // Both pick the same echo id; the NAT hands out public ids from one
    // small pool, so the server sees the same address and the same ids
    // from both.
    let ca = sim.add_client(a.clone(), CLIENT_ID);
    let cb = sim.add_client(b.clone(), CLIENT_ID);
    sim.connect(ca);
    sim.connect(cb);
    let (va, vb) = (sim.clients[ca].v4(), sim.clients[cb].v4());
    assert_ne!(va, vb);
    let (pa, pb) = (path_of(&sim, &a), path_of(&sim, &b));
    let nat = IpAddr::from(NAT_IP);
    assert_eq!((pa.0, pb.0), (nat, nat), "one public address");
    assert_ne!(pa.1, pb.1);

    let mut sent = HashMap::new();
    for n in 0..200 {
        // Internet to each client, each client to the internet, and each
        // client to the other (forwarded by the server onto the other's
        // held requests).
        let to_a = ipv4(INTERNET_V4, va, &payload(2, n));
        let to_b = ipv4(INTERNET_V4, vb, &payload(3, n));
        let a_to_b = ipv4(va, vb, &payload(4, n));
        let b_to_a = ipv4(vb, va, &payload(5, n));
        let a_up = ipv4(va, INTERNET_V4, &payload(6, n));
        let b_up = ipv4(vb, INTERNET_V4, &payload(7, n));
        sim.server_send(&to_a).unwrap();
        sim.server_send(&to_b).unwrap();
        sim.client_send(ca, &a_to_b).unwrap();
        sim.client_send(cb, &b_to_a).unwrap();
        sim.client_send(ca, &a_up).unwrap();
        sim.client_send(cb, &b_up).unwrap();
        for p in [to_a, to_b, a_to_b, b_to_a, a_up, b_up] {
            sent.insert(payload_id(&p), p);
        }
        sim.run_for(ms(if n % 50 < 40 { 10 } else { 700 }));
    }
    sim.run_for(secs(30));

    // Each gets exactly its own packets, all of them, intact.
    let tags = |tun: &[(Instant, Vec<u8>)]| -> HashMap<u8, usize> {
        let mut m = HashMap::new();
        for (_, p) in tun {
            *m.entry(payload_id(p).0).or_default() += 1;
        }
        m
    };
    assert_eq!(assert_delivered_once(&sent, &sim.clients[ca].tun), 400);
    assert_eq!(
        tags(&sim.clients[ca].tun),
        HashMap::from([(2, 200), (5, 200)])
    );
    assert!(
        sim.clients[ca]
            .tun
            .iter()
            .all(|(_, p)| p[16..20] == va.octets())
    );
    assert_eq!(assert_delivered_once(&sent, &sim.clients[cb].tun), 400);
    assert_eq!(
        tags(&sim.clients[cb].tun),
        HashMap::from([(3, 200), (4, 200)])
    );
    assert!(
        sim.clients[cb]
            .tun
            .iter()
            .all(|(_, p)| p[16..20] == vb.octets())
    );
    assert_eq!(assert_delivered_once(&sent, &sim.server.tun), 400);

    // The two really shared public ids, even at the same time: the NAT and
    // the firewall tell the replies apart by sequence number, the server
    // by the session the authenticated message belongs to.
    let ids_a: HashSet<u16> = sim.nat.ids_used[&sim.clients[ca].lan_ip]
        .iter()
        .copied()
        .collect();
    let ids_b: HashSet<u16> = sim.nat.ids_used[&sim.clients[cb].lan_ip]
        .iter()
        .copied()
        .collect();
    assert!(
        ids_a.intersection(&ids_b).count() >= 2,
        "{ids_a:?} {ids_b:?}"
    );
    assert!(sim.nat.ids_shared_live > 100, "{}", sim.nat.ids_shared_live);
    assert!(sim.server.open.keys().all(|r| r.ip == NAT_IP));
    assert_eq!(sim.server.endpoint.sessions().len(), 2);

    assert_one_reply_per_request(&sim);
    assert_answered_in_time(&sim);
    assert_clean(&sim);
}

// ---------------------------------------------------------------------------
// 5. A lossy path
// ---------------------------------------------------------------------------

#[test]
fn lossy_path() {
    let a = key(1);
    let lossy = Link {
        latency: ms(30),
        jitter: ms(10),
        loss: 0.1,
        duplicate: 0.0,
    };
    let mut sim = sim_with(&[&a], lossy, IdMode::PerFlow, 5);
    let c = sim.add_client(a.clone(), CLIENT_ID);
    sim.connect(c);
    let session = path_of(&sim, &a).1;

    // Traffic, idle, traffic: six minutes, two rekeys.
    let (mut n, mut sent) = (0, HashMap::new());
    for _ in 0..10 {
        traffic(&mut sim, c, secs(10), ms(100), &mut n, &mut sent);
        eprintln!("{:?} {:?}", sim.elapsed(), sim.clients[c].stats(sim.now));
    }
    sim.run_for(secs(90));
    for _ in 0..10 {
        traffic(&mut sim, c, secs(10), ms(100), &mut n, &mut sent);
        eprintln!(
            "{:?} {:?} {:?}",
            sim.elapsed(),
            sim.clients[c].stats(sim.now),
            sim.clients[c].events.len()
        );
    }
    sim.run_for(secs(70));
    let end = sim.now;

    // What arrives is intact and arrives once; about nine in ten make it.
    let got_up = assert_delivered_once(&sent, &sim.server.tun);
    let got_down = assert_delivered_once(&sent, &sim.clients[c].tun);
    let each_way = sent.len() / 2;
    for got in [got_up, got_down] {
        assert!(got * 100 >= each_way * 80, "{got} of {each_way} delivered");
        assert!(got < each_way, "the path is lossy");
    }

    // The session survived: the client never went long without hearing from
    // the server (it would start over after DEAD_AFTER_KEEPALIVES
    // intervals), every handshake was a rekey (or a retry of one), the
    // server kept the same session, and neither end dropped anything.
    let dead_after = secs(u64::from(DEFAULT_KEEPALIVE_SECS)) * DEAD_AFTER_KEEPALIVES;
    let rx: Vec<Instant> = sim.clients[c].rx_times().collect();
    let silence = rx.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(silence < dead_after / 2, "silent for {silence:?}");
    let mut attempts: Vec<Instant> = Vec::new();
    for &t in &sim.clients[c].inits {
        if attempts.last().is_none_or(|&l| t - l > secs(20)) {
            attempts.push(t);
        }
    }
    assert_only_rekeys(&attempts, secs(20));
    assert!(sim.clients[c].inits.len() <= attempts.len() * 3);
    assert_eq!(attempts.len(), 3, "{:?}", sim.clients[c].inits);
    assert!(sim.clients[c].conn.is_connected(end));
    assert_eq!(path_of(&sim, &a).1, session);
    assert_eq!(
        sim.clients[c].events.len(),
        1,
        "configured once: {:?}",
        sim.clients[c].events
    );

    // Lost requests (or lost replies) were given up on and replaced:
    // every request that got no reply is one the client gave up on (or
    // still waits for; some it gave up on were answered late, overtaken
    // on the way), after every top-up the target is outstanding again,
    // and the client never went longer than the timeout without sending
    // a request.
    let cl = &sim.clients[c];
    let lost = sim.wire.iter().filter(|w| w.lost).count();
    assert!(lost > 200, "{lost} messages lost");
    let unanswered = cl.requests.len() - cl.taken.len();
    assert!(unanswered > 100, "{unanswered} requests unanswered");
    let st = cl.stats(sim.now);
    assert_eq!(
        st.unanswered as usize + st.outstanding - st.late as usize,
        unanswered,
        "{st:?}"
    );
    assert_eq!(cl.short, 0);
    let quiet = cl
        .requests
        .windows(2)
        .map(|w| w[1].at - w[0].at)
        .max()
        .unwrap();
    assert!(quiet <= REQUEST_TIMEOUT, "no request for {quiet:?}");
    // Most were given up on as soon as a later request was answered (the
    // server answers its oldest first), not after the request timeout.
    let at_replies: u64 = cl
        .taken
        .windows(2)
        .map(|w| w[1].unanswered - w[0].unanswered)
        .sum();
    assert!(
        at_replies * 2 >= st.unanswered,
        "{at_replies} of {} given up on when a later one was answered",
        st.unanswered
    );
    // The server's count tells the client how many of its requests were
    // lost on the way: a tenth of them.
    let up = sim.wire.iter().filter(|w| w.up).count();
    let lost_up = sim.wire.iter().filter(|w| w.up && w.lost).count();
    assert!(
        (st.lost as usize).abs_diff(lost_up) <= 4,
        "{} counted lost, {lost_up} of {up} lost",
        st.lost
    );

    assert_one_reply_per_request(&sim);
    assert_answered_in_time(&sim);
    assert_clean(&sim);
}

// ---------------------------------------------------------------------------
// 6. An unreachable server
// ---------------------------------------------------------------------------

/// While the client has no session (lost inits, expired keys), no deadline
/// of its connection may stay in the past (the pacer's, the path's
/// liveness, its nudges): the driver sleeps until `poll_timeout`, and would
/// spin (the sim fails at once if one does). Happens when the client
/// starts while the server is unreachable, and when an outage outlasts
/// `REJECT_AFTER_TIME`.
#[test]
fn client_waiting_for_an_unreachable_server_does_not_spin() {
    let a = key(1);
    let mut sim = sim_with(&[&a], link(ms(20), 1.0), IdMode::PerFlow, 6);
    let c = sim.add_client(a, CLIENT_ID);
    // Started while the server is unreachable.
    sim.run_for(secs(20));
    sim.link.loss = 0.0;
    sim.connect(c);
    // An outage long enough for the keys to expire.
    sim.link.loss = 1.0;
    sim.run_for(REJECT_AFTER_TIME + secs(20));
    assert!(!sim.clients[c].conn.is_connected(sim.now));
    sim.link.loss = 0.0;
    sim.connect(c);
    sim.run_for(secs(30));
    assert_one_reply_per_request(&sim);
}

// ---------------------------------------------------------------------------
// 7. Paths that pass only so many requests: a rate limit, a share lost
// ---------------------------------------------------------------------------

/// Packets each way at `per_sec` for `span` (`up`, `down`: which ways),
/// every one noted in `sent`.
fn offer(
    sim: &mut IcmpSim,
    c: usize,
    (up_on, down_on): (bool, bool),
    per_sec: u32,
    span: Duration,
    n: &mut u32,
    sent: &mut HashMap<(u8, u32), Vec<u8>>,
) {
    let every = Duration::from_secs(1) / per_sec;
    let end = sim.now + span;
    while sim.now < end {
        if up_on {
            let p = up(sim, c, *n);
            sim.client_send(c, &p).unwrap();
            sent.insert(payload_id(&p), p);
        }
        if down_on {
            let p = down(sim, c, 2, *n);
            sim.server_send(&p).unwrap();
            sent.insert(payload_id(&p), p);
        }
        *n += 1;
        sim.run_for(every);
    }
}

/// Packets per second that arrived in `tun` from `from` to `to`.
fn rate_in(tun: &[(Instant, Vec<u8>)], from: Instant, to: Instant) -> f64 {
    let n = tun.iter().filter(|(t, _)| *t >= from && *t < to).count();
    n as f64 / (to - from).as_secs_f64()
}

/// A firewall passes `LIMIT` echo requests a second (burst 5, as nftables'
/// `limit rate`) and silently drops the rest. Offered twice that, each way
/// in turn and then both at once, the tunnel carries at least 85 % of what
/// the firewall lets through, the packets intact and each once; it does
/// not blast requests at the firewall; and the client's status shows the
/// pacing near the limit.
#[test]
fn rate_limited_path_carries_what_it_lets_through() {
    const LIMIT: f64 = 300.0;
    let a = key(1);
    let mut sim = sim_with(&[&a], link(ms(10), 0.0), IdMode::PerFlow, 7);
    sim.request_limit = Some(RequestLimit::new(LIMIT));
    let c = sim.add_client(a, CLIENT_ID);
    sim.connect(c);
    let (mut n, mut sent) = (0, HashMap::new());
    let mut measured = Vec::new();
    for ways in [(false, true), (true, false), (true, true)] {
        let start = sim.now;
        offer(
            &mut sim,
            c,
            ways,
            2 * LIMIT as u32,
            secs(30),
            &mut n,
            &mut sent,
        );
        // The first 10 s find the limit; the rest is steady.
        let (from, to) = (start + secs(10), sim.now);
        let down = rate_in(&sim.clients[c].tun, from, to);
        let up = rate_in(&sim.server.tun, from, to);
        let steady = sim
            .wire
            .iter()
            .filter(|w| w.up && w.at >= from && w.at < to);
        let (requests, dropped) = steady.fold((0, 0), |(n, d), w| (n + 1, d + u32::from(w.lost)));
        let dropped = f64::from(dropped) / f64::from(requests);
        let st = sim.clients[c].stats(sim.now);
        eprintln!(
            "{ways:?}: {down:.0}/s down, {up:.0}/s up, {:.1} % of requests dropped; {st:?}",
            dropped * 100.0
        );
        measured.push((ways, down, up, dropped, st));
        sim.run_for(secs(10)); // what waits drains
    }
    for (ways, down, up, dropped, st) in measured {
        if ways.1 {
            assert!(down >= 0.85 * LIMIT, "{ways:?}: {down:.0}/s down");
        }
        if ways.0 {
            assert!(up >= 0.85 * LIMIT, "{ways:?}: {up:.0}/s up");
        }
        assert!(dropped < 0.05, "{ways:?}: {:.1} % dropped", dropped * 100.0);
        assert!(
            (st.rate as f64) > 0.7 * LIMIT && (st.rate as f64) < 1.5 * LIMIT,
            "{ways:?}: {st:?}"
        );
        assert!(st.window >= MIN_OUTSTANDING, "{st:?}");
    }
    // What arrived is intact and arrived once (the rest was dropped from
    // the queues in front of the limit, and counted).
    assert_delivered_once(&sent, &sim.server.tun);
    assert_delivered_once(&sent, &sim.clients[c].tun);
    let st = sim.clients[c].stats(sim.now);
    assert!(st.queue_dropped > 0, "{st:?}");
    assert!(
        sim.server
            .endpoint
            .transport_drops()
            .iter()
            .any(|&(what, n)| what == "icmp_queue_full" && n > 0)
    );
    // The server's count showed the client the requests the limit dropped.
    assert!(
        st.lost.abs_diff(sim.limited) <= sim.limited / 10 + 5,
        "{} counted lost, {} dropped",
        st.lost,
        sim.limited
    );
    assert_one_reply_per_request(&sim);
    assert!(sim.clients[c].conn.is_connected(sim.now));
    assert_eq!(
        sim.clients[c].events.len(),
        1,
        "configured once, no failure"
    );
}

/// A path that loses a fifth of the echo requests, whatever their rate:
/// that is not congestion, and the client does not slow down for it.
/// Downstream loses nothing (lost polls are replaced), upstream about what
/// the path loses.
#[test]
fn path_losing_a_share_of_requests_keeps_its_pace() {
    let a = key(1);
    let mut sim = sim_with(&[&a], link(ms(20), 0.0), IdMode::PerFlow, 8);
    sim.request_loss = 0.2;
    let c = sim.add_client(a, CLIENT_ID);
    sim.connect(c);
    let (mut n, mut sent) = (0, HashMap::new());
    let start = sim.now;
    offer(&mut sim, c, (true, true), 400, secs(60), &mut n, &mut sent);
    let (from, to) = (start + secs(10), sim.now);
    let down = rate_in(&sim.clients[c].tun, from, to);
    let up = rate_in(&sim.server.tun, from, to);
    let st = sim.clients[c].stats(sim.now);
    eprintln!("{down:.0}/s down, {up:.0}/s up; {st:?}");
    assert!(down >= 0.95 * 400.0, "{down:.0}/s down");
    assert!(up >= 0.75 * 400.0, "{up:.0}/s up");
    assert!(st.rate >= 400, "{st:?}");
    sim.run_for(secs(10));
    assert_delivered_once(&sent, &sim.server.tun);
    let got_down = assert_delivered_once(&sent, &sim.clients[c].tun);
    assert_eq!(got_down, sent.len() / 2, "every packet down arrived");
    assert_one_reply_per_request(&sim);
    assert_clean(&sim);
}

/// A clean path takes what it is given: thousands of packets a second
/// each way, all delivered; once the pacing has found its footing (it
/// starts at a thousand requests a second, and doubles), none waits long
/// enough to be dropped.
#[test]
fn clean_path_is_not_held_back() {
    let a = key(1);
    let mut sim = sim_with(&[&a], link(ms(10), 0.0), IdMode::PerFlow, 9);
    let c = sim.add_client(a, CLIENT_ID);
    sim.connect(c);
    let (mut n, mut sent) = (0, HashMap::new());
    offer(&mut sim, c, (true, true), 2000, secs(1), &mut n, &mut sent);
    let st = sim.clients[c].stats(sim.now);
    assert!(st.rate >= 4000, "{st:?}");
    let (dropped, from) = (st.queue_dropped, sim.now);
    offer(&mut sim, c, (true, true), 2000, secs(9), &mut n, &mut sent);
    sim.run_for(secs(2));
    let st = sim.clients[c].stats(sim.now);
    assert_eq!(st.queue_dropped, dropped, "{st:?}");
    assert_eq!(st.lost, 0, "{st:?}");
    let got_up = assert_delivered_once(&sent, &sim.server.tun);
    let got_down = assert_delivered_once(&sent, &sim.clients[c].tun);
    assert_eq!(got_up + got_down + dropped as usize, sent.len());
    assert_eq!(
        rate_in(&sim.server.tun, from, from + secs(9)).round(),
        2000.0
    );
    assert_eq!(
        rate_in(&sim.clients[c].tun, from, from + secs(9)).round(),
        2000.0
    );
    assert_one_reply_per_request(&sim);
    assert_clean(&sim);
}

//! The client's fallback between transports, in virtual time: the shipped
//! `Connection` and `Endpoint` over four links (UDP, ICMP, DNS, HTTP) that
//! the tests cut and restore while the client pings through the tunnel.

mod fallback_sim;

use std::time::Duration;

use fallback_sim::{DNS, HTTP, ICMP, NAMES, Sim, UDP};
use iptun_proto::connection::{PROBE_MAX, PROBE_MIN};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Up, on UDP, with pings flowing.
fn connected() -> Sim {
    let mut sim = Sim::new();
    assert!(
        sim.run_until_cond(secs(5), |s| s.flowing(5)),
        "no pings through the tunnel after 5 s"
    );
    assert_eq!(sim.current(), UDP);
    sim
}

fn report(sim: &Sim, what: &str) {
    let moves: Vec<String> = sim
        .moves
        .iter()
        .map(|&(t, from, to)| {
            format!(
                "{:.1}s {}->{}",
                (t - sim.start).as_secs_f64(),
                NAMES[from],
                NAMES[to]
            )
        })
        .collect();
    eprintln!(
        "{what}: moves [{}], sent per link {:?}",
        moves.join(", "),
        sim.sent
    );
}

#[test]
fn comes_up_on_the_first_path_and_stays_there() {
    let mut sim = connected();
    sim.run_for(secs(60));
    assert!(sim.flowing(50));
    assert!(sim.moves.is_empty(), "{:?}", sim.moves);
    // The others are probed rarely, and only once connected for PROBE_MIN.
    assert!(sim.sent[ICMP] <= 3, "{:?}", sim.sent);
    let st = sim.client.status(sim.now);
    assert_eq!(st.paths[ICMP].state.as_str(), "standby", "{st:?}");
    assert_eq!(st.paths[DNS].state.as_str(), "standby", "{st:?}");
    assert_eq!(st.paths[HTTP].state.as_str(), "standby", "{st:?}");
}

#[test]
fn a_blackholed_path_is_left_within_10_s_and_the_session_stays() {
    let mut sim = connected();
    sim.run_for(secs(10));
    let (address, handshake) = (sim.address(), sim.handshakes());
    let cut = sim.now;
    sim.set_up(UDP, false);
    assert!(
        sim.run_until_cond(secs(10), |s| s.current() != UDP && s.flowing(5)),
        "still on {} 10 s after UDP was cut",
        NAMES[sim.current()]
    );
    sim.run_for(secs(5));
    report(&sim, "UDP cut");
    assert_eq!(sim.current(), ICMP, "the next path in preference order");
    let gap = sim.longest_gap_since(cut);
    assert!(gap < secs(10), "pings stopped for {gap:?}");
    assert_eq!(sim.address(), address, "a new tunnel address");
    assert_eq!(sim.handshakes(), handshake, "a new handshake for a move");
    assert_eq!(sim.configs.len(), 1, "reconfigured");
    assert_eq!(sim.moves.len(), 1);
}

#[test]
fn the_client_moves_back_when_a_better_path_works_again() {
    let mut sim = connected();
    sim.set_up(UDP, false);
    sim.run_for(secs(20));
    assert_eq!(sim.current(), ICMP);
    sim.set_up(UDP, true);
    let back = sim.run_until_cond(PROBE_MIN * 3, |s| s.current() == UDP);
    report(&sim, "UDP back");
    assert!(
        back,
        "not back on UDP {:?} after it came back",
        PROBE_MIN * 3
    );
    sim.run_for(secs(5));
    assert!(sim.flowing(20));
    assert_eq!(sim.moves.len(), 2);
}

#[test]
fn a_flapping_path_does_not_make_the_client_thrash() {
    let mut sim = connected();
    let start = sim.now;
    // UDP works 5 s, fails 5 s, for ten minutes.
    for i in 0..120 {
        sim.set_up(UDP, i % 2 == 1);
        sim.run_for(secs(5));
    }
    report(&sim, "flapping");
    // Each return to UDP costs at most two moves, and returns are probed
    // on a growing back-off: 30 s, 60 s, 120 s...
    assert!(
        sim.moves.len() <= 12,
        "{} moves in ten minutes",
        sim.moves.len()
    );
    let delivered = sim
        .pings
        .iter()
        .filter(|p| p.0 >= start && p.1.is_some())
        .count();
    let sent = sim.pings.iter().filter(|p| p.0 >= start).count();
    assert!(
        delivered * 10 >= sent * 8,
        "only {delivered} of {sent} pings came back"
    );
}

#[test]
fn all_paths_down_then_one_comes_back() {
    let mut sim = connected();
    for link in [UDP, ICMP, DNS, HTTP] {
        sim.set_up(link, false);
    }
    sim.run_for(secs(60));
    let st = sim.client.status(sim.now);
    assert!(st.searching, "{st:?}");
    assert!(!sim.flowing(1));
    let restored = sim.now;
    sim.set_up(DNS, true);
    assert!(
        sim.run_until_cond(secs(40), |s| s.flowing(5)),
        "no traffic 40 s after DNS came back"
    );
    report(&sim, "all down, DNS back");
    assert_eq!(sim.current(), DNS);
    eprintln!("back {:?} after DNS returned", sim.now - restored);
    assert_eq!(sim.configs.len(), 1, "the tunnel was reconfigured");
}

#[test]
fn a_cold_start_where_only_dns_gets_through_comes_up_on_dns() {
    let mut sim = Sim::new();
    for link in [UDP, ICMP, HTTP] {
        sim.set_up(link, false);
    }
    assert!(
        sim.run_until_cond(secs(20), |s| s.flowing(5)),
        "not up 20 s into a cold start with only DNS"
    );
    eprintln!("up on DNS after {:?}", sim.elapsed());
    assert_eq!(sim.current(), DNS);
    assert!(sim.elapsed() < secs(15));
}

#[test]
fn a_move_during_a_rekey_keeps_the_session() {
    let mut sim = connected();
    let address = sim.address();
    // Keys are renewed 120 s after the handshake: cut UDP just before.
    sim.run_until(sim.start + secs(119));
    let first = sim.handshakes();
    sim.set_up(UDP, false);
    assert!(sim.run_until_cond(secs(30), |s| s.current() != UDP && s.flowing(5)));
    sim.run_for(secs(10));
    report(&sim, "rekey");
    assert!(sim.handshakes() > first, "no rekey happened");
    assert_eq!(sim.address(), address);
    assert!(sim.flowing(20));
}

#[test]
fn idle_candidates_are_probed_rarely() {
    let mut sim = connected();
    let before = sim.sent;
    sim.run_for(secs(3600));
    let probes: Vec<u64> = (1..4).map(|i| sim.sent[i] - before[i]).collect();
    // 30 s doubling to 10 min: 30+60+120+240+480 = 930 s, then every 600 s.
    let most = 5 + (3600 - 930) / PROBE_MAX.as_secs() + 1;
    assert!(
        probes.iter().all(|&p| p <= most),
        "{probes:?} probes in an hour (at most {most})"
    );
    assert!(
        probes.iter().all(|&p| p >= 3),
        "{probes:?}: standby paths not probed"
    );
}

#[test]
fn the_handshake_takes_one_round_trip() {
    let mut sim = Sim::new();
    assert!(sim.run_until_cond(secs(5), |s| s.client.is_connected(s.now)));
    eprintln!("connected after {:?}", sim.elapsed());
    assert!(
        sim.elapsed() < Duration::from_millis(50),
        "{:?}",
        sim.elapsed()
    );
}

#[test]
fn the_server_lets_go_of_what_it_held_on_a_path_the_session_left() {
    let mut sim = connected();
    sim.set_up(UDP, false);
    assert!(sim.run_until_cond(secs(10), |s| s.current() == ICMP && s.flowing(5)));
    sim.run_for(secs(2));
    assert!(
        sim.server.held(ICMP) > 0,
        "the ICMP path in use holds requests"
    );
    sim.set_up(ICMP, false);
    let moved = sim.run_until_cond(secs(10), |s| s.current() != ICMP);
    assert!(moved, "still on ICMP");
    // Requests held before the cut were let go when the session moved, not
    // after their hold: nothing waits on a path nobody polls.
    sim.run_for(Duration::from_millis(50));
    assert_eq!(sim.server.held(ICMP), 0, "requests still held on ICMP");
    report(&sim, "ICMP left");
}

//! The DNS transport end to end in virtual time: the shipped client
//! `Connection` (one DNS path) and server `Endpoint` (one DNS listener), and
//! a simulated recursive resolver between them (see `dns_sim/mod.rs`).

mod common;
mod dns_sim;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{INTERNET_V4, NET4, ipv4, key, payload, payload_id, pool, server_config};
use dns_sim::*;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use iptun_proto::engine::REKEY_AFTER_TIME;
use iptun_proto::transport::dns::server::DnsListener;
use iptun_proto::transport::dns::{HOLD, UP_HEADER_LEN, UpHeader};
use iptun_proto::wire::dns::{
    Answer, AnswerType, Domain, Name, build_query, build_query_as, encode_name, parse_answer,
    parse_response,
};

fn ms(m: u64) -> Duration {
    Duration::from_millis(m)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn sim(cfg: ResolverConfig, seed: u64) -> Sim {
    let a = key(1);
    Sim::new(server_config(&[&a], pool(NET4, false)), a, cfg, seed)
}

fn connect(s: &mut Sim) {
    let ok = s.run_until_cond(secs(60), Sim::connected);
    assert!(
        ok,
        "no handshake: client errors {:?}, server errors {:?}, path {:?}, server transport {:?}, resolver {:?}",
        s.client_errors,
        s.server_errors,
        s.path_info(),
        s.server.transport_drops(),
        s.resolver.stats
    );
}

/// Each arrived packet was sent, byte-identical, at most once.
fn check_delivered(sent: &HashMap<(u8, u32), Vec<u8>>, got: &[(Instant, Vec<u8>)]) -> usize {
    let mut seen = HashSet::new();
    for (_, p) in got {
        let id = payload_id(p);
        let original = sent.get(&id).unwrap_or_else(|| panic!("{id:?} never sent"));
        assert_eq!(p, original, "{id:?} altered");
        assert!(seen.insert(id), "{id:?} twice");
    }
    seen.len()
}

/// A bulk flow's window, one way: packets sent and not arrived yet. A
/// packet lost on the way stops counting after `LOST_AFTER`, as a sender's
/// retransmission timer would give up on it.
struct Window {
    limit: usize,
    sent: HashMap<(u8, u32), Instant>,
    /// How far into the receiving TUN device's packets arrivals were taken.
    seen: usize,
}

const LOST_AFTER: Duration = Duration::from_secs(4);

impl Window {
    fn new(limit: usize, seen: usize) -> Self {
        Self {
            limit,
            sent: HashMap::new(),
            seen,
        }
    }

    /// Whether another packet may go now, given what arrived.
    fn open(&mut self, now: Instant, arrived: &[(Instant, Vec<u8>)]) -> bool {
        for (_, p) in &arrived[self.seen..] {
            self.sent.remove(&payload_id(p));
        }
        self.seen = arrived.len();
        self.sent.retain(|_, &mut at| now - at < LOST_AFTER);
        self.sent.len() < self.limit
    }
}

/// Send `n` packets each way, a few in flight at once; returns the number
/// delivered each way and the simulated time taken.
fn exchange(s: &mut Sim, n: u32, tag: u8, limit: Duration) -> (usize, usize, Duration) {
    let v4 = s.client_v4();
    let (mut up_sent, mut down_sent) = (HashMap::new(), HashMap::new());
    let (up0, down0) = (s.server_tun.len(), s.client_tun.len());
    let (mut up_window, mut down_window) = (Window::new(4, up0), Window::new(8, down0));
    let t0 = s.now;
    let (mut i, mut j) = (0, 0);
    let until = s.now + limit;
    while s.now < until {
        while i < n && up_window.open(s.now, &s.server_tun) {
            let p = ipv4(v4, INTERNET_V4, &payload(tag, i));
            up_sent.insert(payload_id(&p), p.clone());
            up_window.sent.insert(payload_id(&p), s.now);
            s.client_send(&p).unwrap();
            i += 1;
        }
        while j < n && down_window.open(s.now, &s.client_tun) {
            let p = ipv4(INTERNET_V4, v4, &payload(tag + 1, j));
            down_sent.insert(payload_id(&p), p.clone());
            down_window.sent.insert(payload_id(&p), s.now);
            s.server_send(&p).unwrap();
            j += 1;
        }
        let up = s.server_tun.len() - up0;
        let down = s.client_tun.len() - down0;
        if i == n && j == n && up + down >= 2 * n as usize {
            break;
        }
        let step = s.now + ms(5);
        s.run_until(step);
    }
    s.run_for(secs(2));
    let up = check_delivered(&up_sent, &s.server_tun[up0..]);
    let down = check_delivered(&down_sent, &s.client_tun[down0..]);
    (up, down, s.now - t0)
}

fn report(name: &str, s: &Sim, n: u32, up: usize, down: usize, took: Duration) {
    let bytes: usize = (0..n).map(|i| 20 + payload(0, i).len()).sum();
    let secs = took.as_secs_f64();
    println!(
        "{name}: {up}/{n} up, {down}/{n} down in {secs:.1} s (~{:.0} B/s each way); path {:?}; resolver {:?}; server transport {:?}",
        bytes as f64 / secs,
        s.path_info(),
        s.resolver.stats,
        s.server.transport_drops()
    );
}

/// The server answered each arrival at most once, within the hold (plus
/// nothing: its timer fires exactly), except arrivals superseded by a
/// retry: a query left unanswered must have been asked again (the same
/// name, as late or later; the resolver waits for the newest copy).
fn check_server(s: &Sim) {
    assert_eq!(s.server_violations, Vec::<String>::new());
    assert_eq!(s.resolver.violations, Vec::<String>::new());
    let mut asked: HashMap<&str, Vec<Instant>> = HashMap::new();
    for a in s.arrivals.values().flatten() {
        asked.entry(&a.name).or_default().push(a.at);
    }
    for a in s.arrivals.values().flatten() {
        match a.answered {
            Some(t) => assert!(t - a.at <= HOLD, "held {:?}", t - a.at),
            // Itself, and another copy at the same time or later.
            None if s.now - a.at > HOLD => assert!(
                asked[&a.name[..]].iter().filter(|&&t| t >= a.at).count() >= 2,
                "a query never answered nor asked again: {a:?}"
            ),
            None => {}
        }
    }
    for &(size, limit) in &s.resolver.answer_sizes {
        assert!(size <= limit, "{size} > {limit}");
    }
}

#[test]
fn handshake_and_data_through_a_case_randomising_resolver() {
    let mut s = sim(ResolverConfig::default(), 1);
    connect(&mut s);
    let (up, down, took) = exchange(&mut s, 200, 10, secs(120));
    report("plain 1232", &s, 200, up, down, took);
    assert_eq!((up, down), (200, 200));
    check_server(&s);
    assert_eq!(s.client_errors, []);
    assert_eq!(s.server_errors, []);
    assert_eq!(s.inits.len(), 1, "one handshake");
    let info = s.path_info();
    assert_eq!((info.edns_size, info.max_name_len), (Some(1232), 253));
    assert_eq!(s.uplink_stats().fallbacks, 0);
    // The path carries 8-bit labels through 0x20: upstream went base128,
    // after one probe, with ~40% more per query than base32's 147 - header.
    assert_eq!(info.encoding, "base128");
    assert_eq!(s.uplink_stats().encoding_probes, 1);
    assert_eq!(s.uplink_stats().encoding_failures, 0);
    assert_eq!(info.upstream_fragment, 205 - UP_HEADER_LEN);
    // Answers used the room EDNS0 gives.
    assert!(s.resolver.answer_sizes.iter().any(|&(n, _)| n > 600));
    // The path carries NULL records: answers went NULL after one probe.
    assert_eq!(info.record_type, "NULL");
    assert_eq!(s.uplink_stats().type_probes, 1);
    assert_eq!(s.uplink_stats().type_probe_failures, 0);
    assert_eq!(s.uplink_stats().type_fallbacks, 0);
}

/// Connect and move `n` packets each way through `cfg`; returns the sim.
fn typed_path(cfg: ResolverConfig, seed: u64, n: u32, what: &str) -> Sim {
    let mut s = sim(cfg, seed);
    connect(&mut s);
    let (up, down, took) = exchange(&mut s, n, 110, secs(300));
    report(what, &s, n, up, down, took);
    assert_eq!((up, down), (n as usize, n as usize));
    check_server(&s);
    assert_eq!(s.client_errors, []);
    assert_eq!(s.server_errors, []);
    s
}

#[test]
fn a_resolver_that_refuses_txt_and_null_still_carries_the_tunnel() {
    let refused = Block::Code(ResponseCode::Refused);
    let cfg = ResolverConfig {
        blocked: vec![(RecordType::TXT, refused), (RecordType::NULL, refused)],
        ..ResolverConfig::default()
    };
    let mut s = typed_path(cfg, 21, 100, "no TXT, no NULL");
    let info = s.path_info();
    assert_eq!(info.record_type, "CNAME");
    assert_eq!(info.stats.type_fallbacks, 1);
    assert!(info.stats.type_probes >= 1);
    assert_eq!(info.stats.type_probes, info.stats.type_probe_failures);
    // Probes of NULL and TXT back off (30 s, 60 s, ... per type) and the
    // tunnel stays on CNAME.
    let blocked = s.resolver.stats.blocked;
    s.run_for(secs(600));
    let (up, down, _) = exchange(&mut s, 30, 120, secs(60));
    assert_eq!((up, down), (30, 30));
    assert_eq!(s.path_info().record_type, "CNAME");
    let more = s.resolver.stats.blocked - blocked;
    assert!(
        (2..=16).contains(&more),
        "{more} blocked queries in 11 minutes"
    );
}

#[test]
fn a_resolver_that_passes_only_a_records_and_shuffles_them() {
    let cfg = ResolverConfig {
        only: Some(vec![RecordType::A]),
        blocked_others: Block::Strip,
        shuffle: true,
        ..ResolverConfig::default()
    };
    let s = typed_path(cfg, 22, 40, "A only, shuffled");
    let info = s.path_info();
    assert_eq!(info.record_type, "A");
    // TXT, CNAME, MX, SRV, AAAA failed in turn.
    assert_eq!(info.stats.type_fallbacks, 5);
    // Every answer that brought data had several records, and they came
    // shuffled (a fixed count of them depended on how the old exchange
    // paced its packets).
    let data_answers = info.stats.data_answers;
    assert!(data_answers > 50, "{data_answers} answers with data");
    assert!(
        s.resolver.stats.shuffled >= data_answers,
        "{:?}",
        s.resolver.stats
    );
}

#[test]
fn mx_and_srv_records_in_any_order() {
    for (ty, seed) in [(RecordType::MX, 23), (RecordType::SRV, 24)] {
        let cfg = ResolverConfig {
            only: Some(vec![ty]),
            blocked_others: Block::Code(ResponseCode::Refused),
            shuffle: true,
            ..ResolverConfig::default()
        };
        let s = typed_path(cfg, seed, 60, &format!("{ty} only, shuffled"));
        assert_eq!(s.path_info().record_type, ty.to_string());
        assert!(s.resolver.stats.shuffled > 10, "{:?}", s.resolver.stats);
    }
}

#[test]
fn a_resolver_that_starts_refusing_null_sends_the_client_back_to_txt() {
    let mut s = typed_path(ResolverConfig::default(), 25, 50, "NULL");
    assert_eq!(s.path_info().record_type, "NULL");
    s.resolver.cfg.blocked = vec![(RecordType::NULL, Block::Code(ResponseCode::Refused))];
    let (up, down, took) = exchange(&mut s, 100, 130, secs(120));
    report("NULL refused mid-session", &s, 100, up, down, took);
    assert!(up >= 95 && down >= 95, "{up} {down}");
    let info = s.path_info();
    assert_eq!(info.record_type, "TXT");
    assert_eq!(info.stats.type_fallbacks, 1);
    check_server(&s);
    // Still refused: TXT stays, NULL is probed now and then.
    s.run_for(secs(300));
    let (up, down, _) = exchange(&mut s, 30, 140, secs(60));
    assert_eq!((up, down), (30, 30));
    assert_eq!(s.path_info().record_type, "TXT");
    let failures = s.uplink_stats().type_probe_failures;
    assert!(failures >= 1);
    // The path heals: a later probe goes back to NULL.
    s.resolver.cfg.blocked.clear();
    s.run_for(secs(700));
    let (up, down, _) = exchange(&mut s, 30, 150, secs(60));
    assert_eq!((up, down), (30, 30));
    assert_eq!(s.path_info().record_type, "NULL");
    assert_eq!(s.uplink_stats().type_fallbacks, 1);
    check_server(&s);
}

#[test]
fn a_resolver_that_mangles_8bit_labels_keeps_the_client_on_base32() {
    let mut s = sim(
        ResolverConfig {
            mangle_8bit: true,
            ..ResolverConfig::default()
        },
        11,
    );
    connect(&mut s);
    let (up, down, took) = exchange(&mut s, 200, 80, secs(120));
    report("8-bit mangled", &s, 200, up, down, took);
    assert_eq!((up, down), (200, 200));
    check_server(&s);
    let info = s.path_info();
    assert_eq!(info.encoding, "base32");
    assert_eq!(info.upstream_fragment, 147 - UP_HEADER_LEN);
    assert!(s.uplink_stats().encoding_probes >= 1);
    assert_eq!(
        s.uplink_stats().encoding_failures,
        s.uplink_stats().encoding_probes
    );
    // Probes back off: 30 s, 60 s, 120 s, 240 s, 480 s, 600 s...
    let probes = s.uplink_stats().encoding_probes;
    s.run_for(secs(1200));
    let (up, down, _) = exchange(&mut s, 50, 90, secs(60));
    assert_eq!((up, down), (50, 50));
    let more = s.uplink_stats().encoding_probes - probes;
    assert!((1..=6).contains(&more), "{more} probes in 20 minutes");
    assert_eq!(s.path_info().encoding, "base32");
    assert_eq!(s.uplink_stats().fallbacks, 0);
    // The path heals: a later probe switches.
    s.resolver.cfg.mangle_8bit = false;
    s.run_for(secs(700));
    let (up, down, _) = exchange(&mut s, 50, 100, secs(60));
    assert_eq!((up, down), (50, 50));
    assert_eq!(s.path_info().encoding, "base128");
}

#[test]
fn a_cache_that_ignores_ttl_zero_never_answers_a_tunnel_query() {
    let mut s = sim(
        ResolverConfig {
            cache: Cache::IgnoreTtl,
            ..ResolverConfig::default()
        },
        2,
    );
    connect(&mut s);
    let (up, down, took) = exchange(&mut s, 100, 20, secs(120));
    report("caching", &s, 100, up, down, took);
    assert_eq!((up, down), (100, 100));
    assert_eq!(s.resolver.stats.cache_hits, 0, "every query name is unique");
    check_server(&s);
    // Idle for a while: polls stay unique too.
    s.run_for(secs(30));
    assert_eq!(s.resolver.stats.cache_hits, 0);
    assert!(s.connected());
}

#[test]
fn a_512_byte_path_truncates_and_the_client_falls_back_then_reprobes() {
    let mut s = sim(
        ResolverConfig {
            client_limit: Some(512),
            ..ResolverConfig::default()
        },
        3,
    );
    connect(&mut s);
    let (up, down, took) = exchange(&mut s, 100, 30, secs(120));
    report("512 path", &s, 100, up, down, took);
    // Downstream answers in flight when the path turned out to carry only
    // 512 bytes (and again at each probe) are lost.
    assert_eq!(up, 100);
    assert!(down >= 85, "{down}");
    assert!(s.resolver.stats.truncated > 0);
    assert!(s.uplink_stats().fallbacks >= 1);
    check_server(&s);
    let truncated = s.resolver.stats.truncated;
    let (up, down, _) = exchange(&mut s, 50, 40, secs(60));
    assert_eq!(up, 50);
    assert!(down >= 45, "{down}");
    // The path heals: a later probe goes back to EDNS0 and stays there.
    s.resolver.cfg.client_limit = None;
    s.run_for(secs(700));
    let (up, down, _) = exchange(&mut s, 50, 50, secs(60));
    assert_eq!((up, down), (50, 50));
    assert!(s.uplink_stats().reprobes >= 1);
    assert_eq!(s.path_info().edns_size, Some(1232));
    assert!(s.resolver.stats.truncated >= truncated);
}

fn name_cap(code: ResponseCode, seed: u64) {
    let mut s = sim(
        ResolverConfig {
            name_cap: Some((100, code)),
            ..ResolverConfig::default()
        },
        seed,
    );
    connect(&mut s);
    let (up, down, took) = exchange(&mut s, 100, 60, secs(180));
    report(
        &format!("names capped at 100 ({code:?})"),
        &s,
        100,
        up,
        down,
        took,
    );
    assert_eq!(s.path_info().max_name_len, 96);
    assert!(s.resolver.stats.capped > 0);
    assert_eq!(down, 100);
    assert!(up >= 95, "{up}");
    check_server(&s);
    // Once short, nothing more is capped (until a probe).
    let capped = s.resolver.stats.capped;
    let (up, down, _) = exchange(&mut s, 30, 70, secs(20));
    assert_eq!((up, down), (30, 30));
    assert_eq!(s.resolver.stats.capped, capped);
}

#[test]
fn names_capped_with_formerr_are_shortened() {
    name_cap(ResponseCode::FormErr, 4);
}

#[test]
fn names_capped_with_servfail_are_shortened() {
    name_cap(ResponseCode::ServFail, 5);
}

#[test]
fn lossy_retrying_duplicating_resolver_from_many_addresses() {
    let mut s = sim(
        ResolverConfig {
            drop_query: 0.03,
            drop_answer: 0.03,
            duplicate: 0.1,
            retry_after: Some(ms(400)),
            sources: 8,
            ..ResolverConfig::default()
        },
        6,
    );
    connect(&mut s);
    let connected_at = s.now;
    let (up, down, took) = exchange(&mut s, 200, 80, secs(180));
    report("lossy", &s, 200, up, down, took);
    assert!(up >= 170 && down >= 170, "{up} {down}");
    check_server(&s);
    assert!(retries(&s) > 0, "the server saw retries");
    let sources: HashSet<_> = s.arrivals.keys().map(|(a, _)| a.ip()).collect();
    assert!(sources.len() > 1);
    // Handshakes after the first are rekeys, not reconnections: inits come
    // in episodes (a lost init or response is retried within seconds), and
    // episodes are a rekey interval apart.
    let mut episodes: Vec<Instant> = Vec::new();
    for &t in &s.inits {
        if episodes
            .last()
            .is_none_or(|&e| t - e > Duration::from_secs(20))
        {
            episodes.push(t);
        }
    }
    for w in episodes.windows(2) {
        assert!(w[1] - w[0] >= REKEY_AFTER_TIME, "{:?}", w[1] - w[0]);
    }
    assert!(episodes.iter().filter(|&&t| t > connected_at).count() <= 1);
}

/// Queries that reached the server asking a name it had been asked before.
fn retries(s: &Sim) -> usize {
    let mut seen = HashSet::new();
    let mut all: Vec<_> = s.arrivals.values().flatten().collect();
    all.sort_by_key(|a| a.at);
    all.iter().filter(|a| !seen.insert(&a.name)).count()
}

#[test]
fn the_session_survives_a_resolver_outage_and_backs_off() {
    let mut s = sim(ResolverConfig::default(), 7);
    connect(&mut s);
    let (up, down, _) = exchange(&mut s, 20, 90, secs(30));
    assert_eq!((up, down), (20, 20));
    let before = s.resolver.stats.client_queries;
    s.resolver.cfg.down_until = Some(s.now + secs(20));
    s.run_for(secs(20));
    let during = s.resolver.stats.client_queries - before;
    // Backing off: far fewer queries than the idle rate would send.
    println!("queries during a 20 s outage: {during}");
    assert!(during < 60, "{during} queries in 20 s of SERVFAIL");
    assert!(s.uplink_stats().servfails > 0);
    let ok = s.run_until_cond(secs(30), |s| s.path_info().backoff.is_zero());
    assert!(ok, "no recovery");
    let (up, down, _) = exchange(&mut s, 20, 92, secs(60));
    assert_eq!((up, down), (20, 20));
    check_server(&s);
}

#[test]
fn unauthenticated_queries_get_no_more_than_an_ordinary_reply() {
    let domain = Domain::new(DOMAIN).unwrap();
    let mut l: DnsListener<u32, SocketAddr> = DnsListener::new(domain.clone());
    let from: SocketAddr = "198.18.0.1:5353".parse().unwrap();
    let t0 = Instant::now();
    let mut rng = common::Rng::new(9);
    let mut answers = Vec::new();
    let mut now = t0;
    for i in 0..2000u32 {
        now += ms(1);
        let mut p = vec![0; UP_HEADER_LEN];
        UpHeader {
            tag: rng.next_u64() as u32 % 50,
            qseq: i as u16,
            down_limit: 2040,
        }
        .emit(&mut p);
        // Sometimes a fragment of a big message, sometimes nothing.
        if i % 3 != 0 {
            let chunk_len = 1 + rng.below(100) as usize;
            p.extend_from_slice(&[0, (i % 7) as u8, 0, 200]);
            p.extend((0..chunk_len).map(|_| rng.next_u64() as u8));
        }
        p.truncate(domain.upstream_capacity(253));
        let name = encode_name(&domain, &p).unwrap();
        let bytes = build_query(i as u16, &name, Some(4096)).unwrap();
        assert!(l.handle_query(now, from, &bytes).is_none());
        // Someone sends to an unbound tag: still only ordinary replies.
        let _ = l.send_to_tag(now, rng.next_u64() as u32 % 50, &vec![0xab; 3000]);
        if i % 100 == 0 {
            l.handle_timeout(now, |_| None);
        }
        while let Some(t) = l.poll_transmit() {
            answers.push((i as u16, name.clone(), t.bytes));
        }
    }
    now += secs(2);
    l.handle_timeout(now, |_| None);
    while let Some(t) = l.poll_transmit() {
        answers.push((0, Name::root(), t.bytes));
    }
    assert!(answers.len() >= 1900);
    for (_, _, b) in &answers {
        assert!(
            b.len() <= 512,
            "{} bytes to an unauthenticated query",
            b.len()
        );
    }
    assert!(l.held() == 0, "all answered");
    // Outside the zone: REFUSED; never an open resolver.
    let other = Name::from_ascii("www.example.org.").unwrap();
    l.handle_query(now, from, &build_query(7, &other, None).unwrap());
    let t = l.poll_transmit().unwrap();
    assert_eq!(parse_response(7, &other, &t.bytes), Ok(Answer::Refused));
    assert!(t.bytes.len() <= 512);
}

#[test]
fn a_resolver_that_starts_dropping_null_sends_the_client_back_to_txt() {
    let mut s = typed_path(ResolverConfig::default(), 26, 30, "NULL");
    assert_eq!(s.path_info().record_type, "NULL");
    s.resolver.cfg.blocked = vec![(RecordType::NULL, Block::Drop)];
    let (up, down, took) = exchange(&mut s, 50, 160, secs(120));
    report("NULL dropped mid-session", &s, 50, up, down, took);
    // Fragments in flight when NULL went dark time out (2 s) and are lost.
    assert!(up >= 35 && down >= 40, "{up} {down}");
    let info = s.path_info();
    assert_eq!(info.record_type, "TXT");
    assert_eq!(info.stats.type_fallbacks, 1);
    // Base128 went first, then NULL; the rest of the path stayed.
    assert_eq!(info.edns_size, Some(1232));
    assert_eq!(info.max_name_len, 253);
    check_server(&s);
    let (up, down, _) = exchange(&mut s, 30, 170, secs(60));
    assert_eq!((up, down), (30, 30));
}

#[test]
fn a_resolver_that_starts_mangling_8bit_labels_costs_base128_not_the_record_type() {
    let mut s = typed_path(ResolverConfig::default(), 27, 30, "base128, NULL");
    assert_eq!(s.path_info().encoding, "base128");
    s.resolver.cfg.mangle_8bit = true;
    let (up, down, took) = exchange(&mut s, 50, 180, secs(60));
    report("8-bit mangled mid-session", &s, 50, up, down, took);
    assert!(up >= 45 && down >= 45, "{up} {down}");
    let info = s.path_info();
    // The server answers NODATA to names it cannot read: base128 goes,
    // NULL stays.
    assert_eq!((info.encoding, info.record_type), ("base32", "NULL"));
    assert_eq!(info.stats.type_fallbacks, 0);
    assert!(info.stats.encoding_failures >= 1);
    check_server(&s);
}

#[test]
fn a_new_tags_first_address_query_is_not_held() {
    // As a qname-minimising resolver's A query at a suffix of a query name
    // may look: tunnel data of a tag nobody has.
    let domain = Domain::new(DOMAIN).unwrap();
    let mut l: DnsListener<u32, SocketAddr> = DnsListener::new(domain.clone());
    let from: SocketAddr = "198.18.0.1:5353".parse().unwrap();
    let now = Instant::now();
    for (i, ty) in [
        AnswerType::A,
        AnswerType::Aaaa,
        AnswerType::Txt,
        AnswerType::Null,
    ]
    .into_iter()
    .enumerate()
    {
        let mut p = vec![0; UP_HEADER_LEN];
        UpHeader {
            tag: 100 + i as u32,
            qseq: 0,
            down_limit: 1232,
        }
        .emit(&mut p);
        let name = encode_name(&domain, &p).unwrap();
        let bytes = build_query_as(i as u16, &name, ty, Some(1232)).unwrap();
        assert!(l.handle_query(now, from, &bytes).is_none());
        let answered = l.poll_transmit();
        if matches!(ty, AnswerType::A | AnswerType::Aaaa) {
            let t = answered.expect("answered at once");
            let got = parse_answer(i as u16, &name, ty, &domain, &t.bytes);
            assert_eq!(got, Ok(Answer::Data(vec![])));
            // The tag's next query is held as usual.
            p[5] = 1;
            let name = encode_name(&domain, &p).unwrap();
            let bytes = build_query_as(9, &name, ty, Some(1232)).unwrap();
            l.handle_query(now, from, &bytes);
            assert_eq!(l.poll_transmit(), None);
        } else {
            assert_eq!(answered, None, "{ty:?} held");
        }
    }
    assert_eq!(l.held(), 4);
}

#[test]
fn a_packet_lost_to_a_full_tun_batch_is_counted_as_such() {
    let mut s = sim(ResolverConfig::default(), 8);
    connect(&mut s);
    s.server_tun_full = true;
    let p = ipv4(s.client_v4(), INTERNET_V4, &payload(1, 1));
    s.client_send(&p).unwrap();
    s.run_for(secs(2));
    // The packet is lost to the full batch and counted so, once; the
    // keepalives meanwhile open as usual (they need no room in the batch).
    assert!(s.server_tun.is_empty());
    assert_eq!(s.server.transport_drops(), [("tun_full", 1)]);
    assert_eq!(s.server_errors, []);
    // And the tunnel goes on once there is room again.
    s.server_tun_full = false;
    let (up, down, _) = exchange(&mut s, 10, 200, secs(30));
    assert_eq!((up, down), (10, 10));
}

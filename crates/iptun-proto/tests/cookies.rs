//! Cookies under handshake floods, in virtual time: the server engine and
//! real client engines, with addresses as paths. Without load nothing
//! changes; under load an init without a valid mac2 for its source costs
//! no Diffie-Hellman work and gets a cookie reply no larger than itself,
//! and a real client completes in two round trips.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use iptun_proto::DropReason;
use iptun_proto::crypto::PrivateKey;
use iptun_proto::crypto::cookie::COOKIE_SECRET_LIFETIME;
use iptun_proto::engine::{Client, ClientConfig, ClientOutput, Server, ServerConfig, ServerOutput};
use iptun_proto::pool::AddressPool;
use iptun_proto::wire::Message;
use iptun_proto::wire::message::{
    COOKIE_REPLY_LEN, INIT_LEN, INIT_WITH_MAC2_LEN, RESPONSE_LEN, TYPE_COOKIE,
};
use proptest::prelude::*;

const BUF: usize = 2048;

struct Net {
    server: Server<SocketAddr>,
    server_key: PrivateKey,
    clients: Vec<PrivateKey>,
    now: Instant,
}

impl Net {
    /// A server admitting `n` keys, spending at most `per_sec` handshakes a second.
    fn new(n: usize, per_sec: u32) -> Self {
        let server_key = PrivateKey::generate();
        let clients: Vec<_> = (0..n).map(|_| PrivateKey::generate()).collect();
        let pool = AddressPool::new("10.1.0.0/16".parse().unwrap(), None).unwrap();
        let mut config = ServerConfig::new(
            server_key.clone(),
            clients.iter().map(PrivateKey::public_key).collect(),
            pool,
        );
        config.handshakes_per_sec = per_sec;
        let now = Instant::now();
        Self {
            server: Server::new(config, now),
            server_key,
            clients,
            now,
        }
    }

    fn client(&self, i: usize) -> Client {
        let config = ClientConfig::new(self.clients[i].clone(), self.server_key.public_key());
        Client::new(config, self.now, 1_700_000_000_000_000_000)
    }

    /// The server's answer to `msg` from `from`: `Ok(None)` for no answer.
    fn deliver(&mut self, from: &str, msg: &[u8]) -> Result<Option<Vec<u8>>, DropReason> {
        let mut out = [0u8; BUF];
        let from: SocketAddr = from.parse().unwrap();
        match self
            .server
            .handle_datagram(self.now, &from, msg, &mut out)?
        {
            ServerOutput::Reply(r) => Ok(Some(r.to_vec())),
            _ => Ok(None),
        }
    }

    /// Replay `init` from spoofed addresses until the server answers with
    /// a cookie: it is under load. Returns how many it took.
    fn flood_until_loaded(&mut self, init: &[u8]) -> usize {
        for i in 0..100_000 {
            let from = spoofed(i);
            if let Ok(Some(r)) = self.deliver(&from, init)
                && r[0] == TYPE_COOKIE
            {
                return i + 1;
            }
        }
        panic!("never under load");
    }
}

/// One of 50 spoofed sources.
fn spoofed(i: usize) -> String {
    format!("198.51.100.{}:{}", i % 50 + 1, 1000 + i % 50)
}

/// A captured init of a client no one else is watching (a flooder's ammunition).
fn captured_init(net: &Net) -> Vec<u8> {
    let mut buf = [0u8; BUF];
    let mut c = net.client(net.clients.len() - 1);
    let n = c.poll_timers(net.now, &mut buf).unwrap();
    buf[..n].to_vec()
}

fn first_init(c: &mut Client, now: Instant) -> Vec<u8> {
    let mut buf = [0u8; BUF];
    let n = c.poll_timers(now, &mut buf).expect("an init is due");
    buf[..n].to_vec()
}

/// What the client sends back on `reply` (its mac2-signed init, or the
/// keepalive that confirms the new keys).
fn client_answer(c: &mut Client, now: Instant, reply: &[u8]) -> Vec<u8> {
    let mut buf = [0u8; BUF];
    match c.handle_datagram(now, reply, &mut buf) {
        Ok(ClientOutput::Send(m)) => m.to_vec(),
        other => panic!("client answered {other:?}"),
    }
}

#[test]
fn without_load_one_round_trip_and_no_cookie() {
    let mut net = Net::new(2, 1000);
    let mut c = net.client(0);
    let init = first_init(&mut c, net.now);
    assert_eq!(init.len(), INIT_LEN, "no mac2 without a cookie");
    let resp = net.deliver("192.0.2.10:5000", &init).unwrap().unwrap();
    assert_eq!(resp.len(), RESPONSE_LEN);
    client_answer(&mut c, net.now, &resp);
    assert!(c.is_connected(net.now));
    let h = net.server.handshakes();
    assert_eq!((h.ok, h.cookie_sent), (1, 0));
}

#[test]
fn under_load_spoofed_inits_get_cookies_not_dh() {
    let mut net = Net::new(2, 400); // burst 100: load after 50 handshakes
    let init = captured_init(&net);
    net.flood_until_loaded(&init);
    let before = net.server.handshakes();
    for i in 0..10_000 {
        match net.deliver(&spoofed(i), &init) {
            Ok(Some(reply)) => {
                assert_eq!(reply.len(), COOKIE_REPLY_LEN);
                assert!(reply.len() <= init.len(), "no amplification");
                assert!(matches!(Message::parse(&reply), Ok(Message::Cookie { .. })));
            }
            // Each source's share of replies is spent: dropped, unanswered.
            Err(DropReason::RateLimited) => {}
            other => panic!("{other:?}"),
        }
    }
    let after = net.server.handshakes();
    let (cookies, limited) = (
        after.cookie_sent - before.cookie_sent,
        after.rate_limited - before.rate_limited,
    );
    assert_eq!(cookies + limited, 10_000);
    assert!(cookies > 0 && limited > 9_000, "{after:?}");
    // A replay that got DH work would count as invalid (a stale timestamp).
    assert_eq!(after.invalid, before.invalid, "no DH for spoofed inits");
    assert_eq!(after.ok, before.ok);
    // The flood goes on for seconds, at 1000 a second against a budget of
    // 400: the budget refills, but the server stays under load while the
    // flood lasts, and the flood never gets DH.
    for tick in 0..300 {
        net.now += Duration::from_millis(10);
        for i in 0..10 {
            let _ = net.deliver(&spoofed(tick * 10 + i), &init);
        }
    }
    assert_eq!(net.server.handshakes().invalid, before.invalid);
}

#[test]
fn under_load_a_real_client_completes_in_two_round_trips() {
    let mut net = Net::new(2, 400);
    let flood = captured_init(&net);
    net.flood_until_loaded(&flood);
    let mut c = net.client(0);
    let me = "192.0.2.10:5000";

    // Round trip 1: init, cookie reply.
    let init = first_init(&mut c, net.now);
    let cookie = net.deliver(me, &init).unwrap().unwrap();
    assert_eq!(cookie[0], TYPE_COOKIE);
    // Round trip 2: the same init with mac2 at once, the response.
    let signed = client_answer(&mut c, net.now, &cookie);
    assert_eq!(signed.len(), INIT_WITH_MAC2_LEN);
    assert_eq!(signed[..INIT_LEN], init[..], "the same init, mac2 added");
    let resp = net.deliver(me, &signed).unwrap().unwrap();
    assert_eq!(resp.len(), RESPONSE_LEN);
    let confirm = client_answer(&mut c, net.now, &resp);
    assert!(c.is_connected(net.now));
    assert!(
        net.deliver(me, &confirm).is_ok(),
        "the server takes the new keys"
    );
}

#[test]
fn a_cookie_for_one_address_is_useless_from_another() {
    let mut net = Net::new(2, 400);
    let flood = captured_init(&net);
    net.flood_until_loaded(&flood);
    let mut c = net.client(0);
    let init = first_init(&mut c, net.now);
    let cookie = net.deliver("192.0.2.10:5000", &init).unwrap().unwrap();
    let signed = client_answer(&mut c, net.now, &cookie);
    // Another host, or another port of the same host: a cookie again, no DH.
    for from in ["192.0.2.11:5000", "192.0.2.10:5001"] {
        let reply = net.deliver(from, &signed).unwrap().unwrap();
        assert_eq!(reply[0], TYPE_COOKIE, "from {from}");
    }
    // From its own address it works.
    let resp = net.deliver("192.0.2.10:5000", &signed).unwrap().unwrap();
    assert_eq!(resp.len(), RESPONSE_LEN);
}

#[test]
fn cookie_secrets_rotate() {
    let mut net = Net::new(3, 400);
    let me = "192.0.2.10:5000";
    let flood = captured_init(&net);
    net.flood_until_loaded(&flood);
    // Two clients each get a cookie and sign their init; neither arrives yet.
    let mut signed = Vec::new();
    for i in 0..2 {
        let mut c = net.client(i);
        let init = first_init(&mut c, net.now);
        let cookie = net.deliver(me, &init).unwrap().unwrap();
        signed.push(client_answer(&mut c, net.now, &cookie));
    }
    // One secret later the cookie still works (the previous secret)...
    net.now += COOKIE_SECRET_LIFETIME + Duration::from_secs(1);
    net.flood_until_loaded(&flood);
    let resp = net.deliver(me, &signed[0]).unwrap().unwrap();
    assert_eq!(resp.len(), RESPONSE_LEN);
    // ...two secrets later it is refused like no cookie at all.
    net.now += COOKIE_SECRET_LIFETIME;
    net.flood_until_loaded(&flood);
    let reply = net.deliver(me, &signed[1]).unwrap().unwrap();
    assert_eq!(reply[0], TYPE_COOKIE);
}

#[test]
fn a_client_signs_its_next_inits_while_the_cookie_is_good() {
    let mut net = Net::new(2, 400);
    let flood = captured_init(&net);
    net.flood_until_loaded(&flood);
    let mut c = net.client(0);
    let init = first_init(&mut c, net.now);
    let cookie = net.deliver("192.0.2.10:5000", &init).unwrap().unwrap();
    client_answer(&mut c, net.now, &cookie);
    // Unanswered (the signed init was lost): the retry carries mac2 at once.
    net.now += Duration::from_secs(1);
    assert_eq!(first_init(&mut c, net.now).len(), INIT_WITH_MAC2_LEN);
    // A duplicate of the reply (or one for the same init on another path)
    // does not make it send again.
    let mut buf = [0u8; BUF];
    let again = c.handle_datagram(net.now, &cookie, &mut buf);
    assert_eq!(
        again,
        Err(DropReason::UnexpectedResponse),
        "a new init by now"
    );
    // Long after the cookie: plain inits.
    net.now += COOKIE_SECRET_LIFETIME;
    assert_eq!(first_init(&mut c, net.now).len(), INIT_LEN);
}

#[test]
fn one_source_cannot_starve_another() {
    // Per source: 1/16 of 1600/s, a burst of 25.
    let mut net = Net::new(3, 1600);
    let flooder_at = "203.0.113.66:4444";
    // The flooder is an admitted client at its real address, with a cookie.
    net.flood_until_loaded(&captured_init(&net));
    let mut f = net.client(0);
    let init = first_init(&mut f, net.now);
    let cookie = net.deliver(flooder_at, &init).unwrap().unwrap();
    let signed = client_answer(&mut f, net.now, &cookie);
    let before = net.server.handshakes();
    for _ in 0..5_000 {
        let _ = net.deliver(flooder_at, &signed);
    }
    let h = net.server.handshakes();
    assert!(h.rate_limited - before.rate_limited >= 4_900, "{h:?}");
    // Another client, elsewhere, at the same instant: up in two round trips.
    let mut c = net.client(1);
    let me = "192.0.2.10:5000";
    let init = first_init(&mut c, net.now);
    let reply = net.deliver(me, &init).unwrap().unwrap();
    let next = if reply[0] == TYPE_COOKIE {
        let signed = client_answer(&mut c, net.now, &reply);
        net.deliver(me, &signed).unwrap().unwrap()
    } else {
        reply
    };
    client_answer(&mut c, net.now, &next);
    assert!(c.is_connected(net.now));
}

#[test]
fn paths_without_a_source_never_get_cookies() {
    #[derive(Clone, PartialEq)]
    struct Resolver;
    impl iptun_proto::engine::PathKind for Resolver {}

    let server_key = PrivateKey::generate();
    let client = PrivateKey::generate();
    let pool = AddressPool::new("10.1.0.0/24".parse().unwrap(), None).unwrap();
    let mut config = ServerConfig::new(server_key.clone(), vec![client.public_key()], pool);
    config.handshakes_per_sec = 400; // sourceless: 100/s, a burst of 25
    let now = Instant::now();
    let mut server = Server::<Resolver>::new(config, now);
    let mut c = Client::new(
        ClientConfig::new(client, server_key.public_key()),
        now,
        1_700_000_000_000_000_000,
    );
    let init = first_init(&mut c, now);
    let mut out = [0u8; BUF];
    let results: Vec<_> = (0..100)
        .map(|_| {
            server
                .handle_datagram(now, &Resolver, &init, &mut out)
                .map(|o| matches!(o, ServerOutput::Reply(r) if r[0] == TYPE_COOKIE))
        })
        .collect();
    assert!(results.iter().all(|r| *r != Ok(true)), "no cookies");
    let h = server.handshakes();
    assert_eq!((h.cookie_sent, h.under_load), (0, 75));
}

proptest! {
    /// Whatever a cookie reply holds, a client with a handshake pending
    /// takes only an authentic one, and a forged one leaves it as it was.
    #[test]
    fn forged_cookie_replies_change_nothing(body in proptest::collection::vec(any::<u8>(), COOKIE_REPLY_LEN - 8), take_index: bool) {
        let net = Net::new(1, 400);
        let mut c = net.client(0);
        let init = first_init(&mut c, net.now);
        let mut reply = vec![TYPE_COOKIE, 0, 0, 0];
        if take_index {
            reply.extend_from_slice(&init[4..8]);
        } else {
            reply.extend_from_slice(&[0; 4]);
        }
        reply.extend_from_slice(&body);
        let mut buf = [0u8; BUF];
        let r = c.handle_datagram(net.now, &reply, &mut buf);
        prop_assert!(r == Err(DropReason::Unauthenticated) || r == Err(DropReason::UnexpectedResponse));
        prop_assert_eq!(c.pending_init(), Some(&init[..]));
    }
}

//! HTTP long-poll in virtual time, and bound polls on it: the shipped
//! client `Connection` (one HTTP path, long-poll only) and server
//! `Endpoint` (one HTTP listener), joined by a model of the binary's
//! long-poll task: [`POLLERS`] connections that each keep a bare poll
//! out, and one that posts the client's batches one exchange at a time.
//! Every request's query comes from the core's `PollSigner` (given the
//! engine's poll key before each, as the client loop does) and is read by
//! the server's `poll_tag` / `poll_auth`, as the binary's drivers do.
//!
//! An attacker on the path sees each request of the client arrive (its tag
//! and query) and sends its own: bare polls with the tag and made-up
//! authenticators, or copies of the client's requests.

mod common;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{
    INTERNET_V4, NET4, Rng, UNIX_START, client_config, ipv4, key, payload, payload_id, pool,
    server_config,
};
use iptun_proto::connection::{Connection, Event, PathConfig, PathEvent, Remote};
use iptun_proto::endpoint::{Destination, Endpoint, Input, ListenerConfig};
use iptun_proto::transport::PacketList;
use iptun_proto::transport::http::{
    self, Command, HttpEvent, POLLERS, PollAuth, PollSigner, poll_auth, poll_tag,
};

/// One-way delay between the client (or the attacker) and the server.
const LATENCY: Duration = Duration::from_millis(20);
const BULK_LEN: usize = 1000;

#[derive(Clone, Debug)]
enum Attack {
    /// Bare polls with the tag and a random counter and authenticator (or
    /// none at all, every other one).
    Forge { per_request: usize },
    /// The client's request itself (query and body), `after` it arrived.
    Replay { after: Duration },
}

/// Who sent a request: its answer goes back there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Poller,
    Sender,
    Attacker,
}

enum What {
    /// A request reaches the server.
    Request {
        id: u64,
        query: String,
        body: Vec<u8>,
    },
    /// An answer reaches its owner.
    Answer {
        owner: Owner,
        body: Vec<u8>,
    },
    Opened,
}

struct Sim {
    now: Instant,
    seq: u64,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    events: HashMap<u64, What>,
    client: Connection,
    server: Endpoint,
    signer: PollSigner,
    open: bool,
    /// The client's framed messages waiting for the sender.
    batch: Vec<u8>,
    sending: bool,
    next_request: u64,
    owners: HashMap<u64, Owner>,
    client_tun: Vec<(Instant, Vec<u8>)>,
    server_tun: Vec<(Instant, Vec<u8>)>,
    client_requests: u64,
    attack: Option<Attack>,
    attacker_sent: u64,
    attacker_answers: Vec<Vec<u8>>,
    rng: Rng,
    buf: Vec<u8>,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let now = Instant::now();
        let a = key(1);
        let mut rng = Rng::new(seed);
        let tag = rng.next_u64();
        let server = Endpoint::new(
            server_config(&[&a], pool(NET4, false)),
            vec![ListenerConfig::Http],
            now,
        );
        let path = PathConfig::Http {
            mode: http::Mode::LongPoll,
        };
        let client = Connection::new(client_config(a), vec![path], now, UNIX_START);
        let mut s = Self {
            now,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            client,
            server,
            signer: PollSigner::new(tag),
            open: false,
            batch: Vec::new(),
            sending: false,
            next_request: 0,
            owners: HashMap::new(),
            client_tun: Vec::new(),
            server_tun: Vec::new(),
            client_requests: 0,
            attack: None,
            attacker_sent: 0,
            attacker_answers: Vec::new(),
            rng,
            buf: Vec::new(),
        };
        s.flush();
        s
    }

    fn schedule(&mut self, at: Instant, what: What) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.events.insert(self.seq, what);
    }

    /// A request of the client's long-poll task (signed as the task signs).
    fn request(&mut self, owner: Owner, body: Vec<u8>) {
        let key = self.client.engine().poll_key(self.now);
        self.signer.set_key(key);
        let query = self.signer.next_query();
        self.client_requests += 1;
        self.send_request(owner, query, body, self.now + LATENCY);
    }

    fn send_request(&mut self, owner: Owner, query: String, body: Vec<u8>, at: Instant) {
        let id = self.next_request;
        self.next_request += 1;
        self.owners.insert(id, owner);
        self.schedule(at, What::Request { id, query, body });
    }

    fn handle(&mut self, what: What) {
        let now = self.now;
        match what {
            What::Opened => {
                self.open = true;
                self.client
                    .handle_path_event(now, 0, PathEvent::Http(HttpEvent::Opened));
                for _ in 0..POLLERS {
                    self.request(Owner::Poller, Vec::new());
                }
            }
            What::Request { id, query, body } => {
                // What the server's driver reads of the request.
                let tag = poll_tag(Some(&query)).expect("a tag");
                let auth = poll_auth(Some(&query));
                let mut tun = PacketList::default();
                let input = Input::Poll {
                    tag,
                    request: id,
                    body: &body,
                    auth,
                };
                self.server.handle_input(now, 0, input, &mut tun);
                self.server_tun
                    .extend(tun.packets.into_iter().map(|p| (now, p)));
                if self.owners.get(&id) != Some(&Owner::Attacker) {
                    self.attack(tag, &query, &body);
                }
            }
            What::Answer { owner, body } => match owner {
                Owner::Attacker => self.attacker_answers.push(body),
                Owner::Poller | Owner::Sender => {
                    let mut tun = PacketList::default();
                    if !body.is_empty() {
                        self.client
                            .handle_input(now, 0, Remote::Connection, &body, &mut tun);
                    }
                    self.client_tun
                        .extend(tun.packets.into_iter().map(|p| (now, p)));
                    if owner == Owner::Poller {
                        self.request(Owner::Poller, Vec::new());
                    } else {
                        self.sending = false;
                    }
                }
            },
        }
    }

    /// The attacker sees a request of the client arrive.
    fn attack(&mut self, tag: u64, query: &str, body: &[u8]) {
        let Some(attack) = self.attack.clone() else {
            return;
        };
        match attack {
            Attack::Forge { per_request } => {
                for k in 0..per_request {
                    let mut query = http::poll_query(tag);
                    if k % 2 == 0 {
                        let a = PollAuth {
                            counter: self.rng.next_u64() % 100_000,
                            auth: (self.rng.next_u64() as u32).to_le_bytes(),
                        };
                        query.push_str(&format!("&p={:016x}", a.counter));
                        for b in a.auth {
                            query.push_str(&format!("{b:02x}"));
                        }
                    }
                    let at = self.now + Duration::from_micros(self.rng.next_u64() % 2000);
                    self.send_request(Owner::Attacker, query, Vec::new(), at);
                    self.attacker_sent += 1;
                }
            }
            Attack::Replay { after } => {
                let at = self.now + after;
                self.send_request(Owner::Attacker, query.to_owned(), body.to_vec(), at);
                self.attacker_sent += 1;
            }
        }
    }

    fn flush(&mut self) {
        let now = self.now;
        let mut buf = std::mem::take(&mut self.buf);
        loop {
            let mut any = false;
            while let Some(t) = self.client.poll_transmit(now, &mut buf) {
                self.batch.extend_from_slice(&buf[..t.len]);
                any = true;
            }
            if self.open && !self.sending && !self.batch.is_empty() {
                self.sending = true;
                let body = std::mem::take(&mut self.batch);
                self.request(Owner::Sender, body);
            }
            while let Some(t) = self.server.poll_transmit(now, &mut buf) {
                let Destination::PollAnswer(id) = t.to else {
                    panic!("a long-poll listener sent {:?}", t.to)
                };
                let owner = self.owners.remove(&id).expect("a request answered once");
                let body = buf[..t.len].to_vec();
                self.schedule(now + LATENCY, What::Answer { owner, body });
                any = true;
            }
            while let Some(e) = self.client.poll_event() {
                if let Event::Http {
                    command: Command::Dial { websocket },
                    ..
                } = e
                {
                    assert!(!websocket);
                    self.schedule(now + 4 * LATENCY, What::Opened);
                }
                any = true;
            }
            if !any {
                break;
            }
        }
        self.buf = buf;
    }

    fn step(&mut self) {
        let now = self.now;
        while let Some(&Reverse((t, id))) = self.queue.peek() {
            if t > now {
                break;
            }
            self.queue.pop();
            let what = self.events.remove(&id).expect("scheduled");
            self.handle(what);
        }
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.handle_timeout(now);
        }
        if self.server.poll_timeout().is_some_and(|t| t <= now) {
            self.server.handle_timeout(now);
        }
        self.flush();
    }

    fn run_until(&mut self, until: Instant) {
        loop {
            let next = [
                self.queue.peek().map(|Reverse((t, _))| *t),
                self.client.poll_timeout(),
                self.server.poll_timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            match next.filter(|&t| t <= until) {
                Some(t) => {
                    self.now = t.max(self.now);
                    self.step();
                }
                None => break,
            }
        }
        self.now = until;
    }

    fn connect(&mut self) {
        let until = self.now + Duration::from_secs(30);
        while !self.client.is_connected(self.now) {
            assert!(self.now < until, "no handshake");
            let next = self.now + Duration::from_millis(10);
            self.run_until(next);
        }
        // The key confirmation and the first signed polls.
        let next = self.now + Duration::from_secs(1);
        self.run_until(next);
    }

    fn drops(&self, name: &str) -> u64 {
        self.server
            .transport_drops()
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |&(_, v)| v)
    }
}

fn bulk_payload(tag: u8, n: u32) -> Vec<u8> {
    let mut p = payload(tag, n);
    p.resize(BULK_LEN, tag);
    p
}

/// Download `n` packets with up to `window` in flight; the rate in Mbit/s.
fn download(s: &mut Sim, n: u32, window: usize) -> f64 {
    let v4 = s.client.engine().tunnel().expect("configured").client_v4;
    let t0 = s.now;
    let seen0 = s.client_tun.len();
    let mut in_flight: HashMap<(u8, u32), Instant> = HashMap::new();
    let mut arrived = HashSet::new();
    let mut next = 0;
    let mut taken = seen0;
    let until = s.now + Duration::from_secs(60);
    let mut buf = vec![0; iptun_proto::endpoint::BUF_LEN];
    while (arrived.len() as u32) < n && s.now < until {
        for (_, p) in &s.client_tun[taken..] {
            in_flight.remove(&payload_id(p));
            arrived.insert(payload_id(p));
        }
        taken = s.client_tun.len();
        while in_flight.len() < window && next < n {
            let p = ipv4(INTERNET_V4, v4, &bulk_payload(9, next));
            in_flight.insert(payload_id(&p), s.now);
            assert!(s.server.handle_tun_packet(s.now, &p, &mut buf).is_none());
            next += 1;
        }
        s.flush();
        let step = s.now + Duration::from_millis(5);
        s.run_until(step);
    }
    assert_eq!(arrived.len() as u32, n, "the download did not complete");
    let last = s.client_tun.last().map(|(t, _)| *t).unwrap();
    (n as usize * (BULK_LEN + 20) * 8) as f64 / (last - t0).as_secs_f64() / 1e6
}

fn download_under(attack: Option<Attack>) -> (f64, Sim) {
    let mut s = Sim::new(5);
    s.connect();
    s.attack = attack;
    let rate = download(&mut s, 1500, 64);
    s.attack = None;
    let next = s.now + Duration::from_secs(2);
    s.run_until(next);
    (rate, s)
}

/// The goal: bare polls with the client's tag, ten for each request of the
/// client, get nothing and cost the client's download less than 10%.
#[test]
fn forged_long_polls_at_ten_times_the_clients_rate_take_nothing() {
    let (base, _) = download_under(None);
    let (rate, s) = download_under(Some(Attack::Forge { per_request: 10 }));
    println!(
        "long-poll: download {base:.2} Mbit/s alone, {rate:.2} Mbit/s with {} forged polls \
         ({} requests of the client); drops {:?}",
        s.attacker_sent,
        s.client_requests,
        s.server.transport_drops()
    );
    assert!(s.attacker_sent > 100, "{}", s.attacker_sent);
    assert_eq!(s.attacker_answers.len() as u64, s.attacker_sent);
    assert!(
        s.attacker_answers.iter().all(Vec::is_empty),
        "a forged poll got data"
    );
    assert_eq!(s.drops("http_forged_polls"), s.attacker_sent);
    assert!(rate >= 0.9 * base, "{rate} vs {base}");
}

/// Copies of the client's requests (query and body) that arrive after the
/// originals get nothing: their counters were taken.
#[test]
fn replayed_long_polls_take_nothing() {
    let (_, s) = download_under(Some(Attack::Replay {
        after: Duration::from_millis(1),
    }));
    println!(
        "long-poll replays: {} sent; drops {:?}",
        s.attacker_sent,
        s.server.transport_drops()
    );
    assert!(s.attacker_sent > 10);
    assert_eq!(s.attacker_answers.len() as u64, s.attacker_sent);
    assert!(s.attacker_answers.iter().all(Vec::is_empty));
    assert_eq!(s.drops("http_replayed_polls"), s.attacker_sent);
    assert_eq!(s.drops("http_forged_polls"), 0);
}

/// Before the client has keys its polls carry no authenticator, and the
/// handshake response still comes back on them; after it, its signed
/// requests are never taken for forged ones.
#[test]
fn a_long_poll_client_binds_its_polls_without_a_round_trip() {
    let mut s = Sim::new(9);
    s.connect();
    let rate = download(&mut s, 200, 16);
    assert!(rate > 0.0);
    assert_eq!(s.drops("http_forged_polls"), 0);
    assert_eq!(s.drops("http_replayed_polls"), 0);
    // Past a rekey (new keys, a new counter) nothing changes.
    let later = s.now + iptun_proto::engine::REKEY_AFTER_TIME + Duration::from_secs(10);
    s.run_until(later);
    download(&mut s, 200, 16);
    assert_eq!(s.drops("http_forged_polls"), 0);
    assert_eq!(s.drops("http_replayed_polls"), 0);
}

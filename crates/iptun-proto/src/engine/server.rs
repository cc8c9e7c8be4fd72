//! The server: admits listed keys, hands each a stable address, opens what
//! clients send and routes it (to the TUN device, or straight to another
//! client), and seals what the TUN device gives it for the client that owns
//! the destination address.
//!
//! `P` is the driver's name for a path back to a client (a socket address
//! for UDP; later a transport and an address). A client's path is whatever
//! its latest authenticated message came from, so roaming clients keep their
//! session.
//!
//! The admitted keys can change while it runs ([`Server::set_allowed`]): a
//! removed key loses its session at once, and its address goes back to the
//! pool after [`ADDRESS_GRACE`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use super::gate::{Admission, HandshakeGate};
use super::{
    DEFAULT_KEEPALIVE_SECS, HandshakeCounters, InitOutcome, Keypair, PathKind, REJECT_AFTER_TIME,
    Traffic, random_index,
};
use crate::crypto::cookie::CookieJar;
use crate::crypto::{Cipher, Mac1Key, PollKey, PrivateKey, PublicKey, Reserved, Responder};
use crate::pool::{AddressPool, Lease};
use crate::wire::message::{COOKIE_REPLY_LEN, INIT_LEN, RESPONSE_LEN, RESPONSE_NOISE_LEN};
use crate::wire::{Control, ControlKind, InnerPacket, Message, TunnelConfig};
use crate::{DropCounters, DropReason};

/// The handshake budget of a [`ServerConfig::new`]: a placeholder for
/// tests. The `iptun` server measures what a handshake costs on its CPU at
/// start and sets [`ServerConfig::handshakes_per_sec`] from that.
pub const DEFAULT_HANDSHAKES_PER_SEC: u32 = 2000;
/// How often expired keys are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How long the address of a removed key stays reserved for it. Packets
/// for it still in flight, and the NAT's and other hosts' state about it,
/// have timed out by then (the keys it had would have expired too), so the
/// next client given the address gets none of the old one's traffic; and a
/// key admitted again meanwhile gets its address back.
pub const ADDRESS_GRACE: Duration = REJECT_AFTER_TIME;

/// What the server is told at start.
#[derive(Debug)]
pub struct ServerConfig {
    /// The server's static key.
    pub private_key: PrivateKey,
    /// Client keys admitted.
    pub allowed: Vec<PublicKey>,
    /// Addresses to hand out.
    pub pool: AddressPool,
    /// MTU of the TUN devices, announced to clients.
    pub mtu: u16,
    /// Keepalive interval announced to clients.
    pub keepalive_secs: u16,
    /// Handshakes (Diffie-Hellman work) a second the server spends at
    /// most; it also sets when the server is under load and asks for
    /// cookies, and each source's share (see `engine/gate.rs`).
    pub handshakes_per_sec: u32,
    /// The data cipher the server prefers (AES-256-GCM is used with
    /// clients that offer it too).
    pub cipher: Cipher,
}

impl ServerConfig {
    /// A config with the default MTU (1420) and keepalive.
    pub fn new(private_key: PrivateKey, allowed: Vec<PublicKey>, pool: AddressPool) -> Self {
        Self {
            private_key,
            allowed,
            pool,
            mtu: 1420,
            keepalive_secs: DEFAULT_KEEPALIVE_SECS,
            handshakes_per_sec: DEFAULT_HANDSHAKES_PER_SEC,
            cipher: Cipher::fastest_here(),
        }
    }
}

/// A client's session on this server, stable for the server's lifetime
/// (across rekeys and reconnects of the same key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub(crate) usize);

/// What to do with the result of a `handle_*` call.
#[derive(Debug, PartialEq, Eq)]
pub enum ServerOutput<'a, P> {
    /// Nothing to do.
    Nothing,
    /// Write this inner packet to the TUN device.
    Tun(&'a [u8]),
    /// Answer the message just handled on the path it came from, whatever
    /// the session's path is: a handshake response, a keepalive's echo, a
    /// probe's reply. On a polled path this answers the very request that
    /// carried the message.
    Reply(&'a [u8]),
    /// Send this message on this path.
    Send(P, &'a [u8]),
}

/// What [`Server::set_allowed`] changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowedChange {
    /// Keys admitted that were not before.
    pub added: Vec<PublicKey>,
    /// Keys no longer admitted.
    pub removed: Vec<PublicKey>,
    /// The sessions of removed keys, ended.
    pub ended: Vec<SessionId>,
}

/// A snapshot of one client's session, for `iptun status`.
#[derive(Clone, Debug)]
pub struct SessionInfo<P> {
    /// The client's key.
    pub key: PublicKey,
    /// Its addresses.
    pub lease: Lease,
    /// Where its latest authenticated message came from.
    pub path: Option<P>,
    /// Inner traffic.
    pub traffic: Traffic,
    /// Drops attributed to this client.
    pub drops: DropCounters,
    /// When its latest handshake completed.
    pub last_handshake: Option<Instant>,
}

/// The parts of an init that passed its mac1 check.
struct Init<'a> {
    sender: u32,
    noise: &'a [u8],
    mac1: &'a [u8],
    mac2: Option<&'a [u8]>,
    /// What mac2 covers: the init up to and with mac1.
    macced: &'a [u8],
}

struct Peer<P> {
    key: PublicKey,
    lease: Lease,
    path: Option<P>,
    /// Keys confirmed by the client (it has sent data with them).
    current: Option<Keypair>,
    previous: Option<Keypair>,
    /// Keys from the latest handshake, until the client uses them.
    next: Option<Keypair>,
    last_timestamp: u64,
    last_handshake: Option<Instant>,
    traffic: Traffic,
    drops: DropCounters,
    /// Its key was removed: no keys, no path, no routes to its address. The
    /// record stays (session ids are never reused) and comes back to life
    /// if the key is admitted again.
    revoked: bool,
}

impl<P> Peer<P> {
    fn slots(&mut self) -> [&mut Option<Keypair>; 3] {
        [&mut self.current, &mut self.previous, &mut self.next]
    }
}

/// The server's state machine.
pub struct Server<P> {
    private_key: PrivateKey,
    mac1: Mac1Key,
    allowed: HashSet<PublicKey>,
    pool: AddressPool,
    mtu: u16,
    keepalive_secs: u16,
    cipher: Cipher,
    peers: Vec<Peer<P>>,
    by_key: HashMap<PublicKey, usize>,
    by_index: HashMap<u32, usize>,
    by_v4: HashMap<Ipv4Addr, usize>,
    by_v6: HashMap<Ipv6Addr, usize>,
    drops: DropCounters,
    handshakes: HandshakeCounters,
    gate: HandshakeGate,
    cookies: CookieJar,
    /// Second buffer for re-sealing client-to-client packets.
    scratch: Box<[u8]>,
    /// Sessions whose path changed, with the path they left.
    moved: Vec<(SessionId, P)>,
    /// When to look for expired keys next (once a second while there are sessions).
    next_sweep: Option<Instant>,
    /// Removed keys whose addresses go back to the pool, and when (in order).
    retiring: VecDeque<(PublicKey, Instant)>,
}

impl<P: PathKind> Server<P> {
    /// A server with no sessions yet.
    pub fn new(config: ServerConfig, now: Instant) -> Self {
        let public = config.private_key.public_key();
        Self {
            mac1: Mac1Key::new(&public),
            cookies: CookieJar::new(&public, now),
            private_key: config.private_key,
            allowed: config.allowed.into_iter().collect(),
            pool: config.pool,
            mtu: config.mtu,
            keepalive_secs: config.keepalive_secs,
            cipher: config.cipher,
            peers: Vec::new(),
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            by_v4: HashMap::new(),
            by_v6: HashMap::new(),
            drops: DropCounters::default(),
            handshakes: HandshakeCounters::default(),
            gate: HandshakeGate::new(config.handshakes_per_sec, now),
            scratch: vec![0; 1 << 16].into_boxed_slice(),
            moved: Vec::new(),
            next_sweep: None,
            retiring: VecDeque::new(),
        }
    }

    /// The server's own tunnel addresses.
    pub fn addresses(&self) -> Lease {
        self.pool.server()
    }

    /// The address pool.
    pub fn pool(&self) -> &AddressPool {
        &self.pool
    }

    /// The MTU announced to clients.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Drops not attributed to any client (garbage, unknown keys, stale indices).
    pub fn drops(&self) -> DropCounters {
        self.drops
    }

    /// Every drop counted: [`Server::drops`] and every client's, those of
    /// removed keys included (a total that never goes down).
    pub fn total_drops(&self) -> DropCounters {
        let mut all = self.drops;
        for p in &self.peers {
            all.merge(&p.drops);
        }
        all
    }

    /// What became of the handshakes received.
    pub fn handshakes(&self) -> HandshakeCounters {
        self.handshakes
    }

    /// How many keys are admitted.
    pub fn allowed_count(&self) -> usize {
        self.allowed.len()
    }

    /// A snapshot of every admitted client that completed a handshake.
    pub fn sessions(&self) -> Vec<SessionInfo<P>> {
        self.peers
            .iter()
            .filter(|p| !p.revoked)
            .map(|p| SessionInfo {
                key: p.key,
                lease: p.lease,
                path: p.path.clone(),
                traffic: p.traffic,
                drops: p.drops,
                last_handshake: p.last_handshake,
            })
            .collect()
    }

    /// Handle a message that arrived on path `from`.
    pub fn handle_datagram<'a>(
        &'a mut self,
        now: Instant,
        from: &P,
        datagram: &[u8],
        out: &'a mut [u8],
    ) -> Result<ServerOutput<'a, P>, DropReason> {
        match Message::parse(datagram) {
            Ok(Message::Init {
                sender,
                noise,
                signed,
                mac1,
                mac2,
            }) => {
                // Garbage shaped like an init stops here, before any DH work.
                let answer = if !self.mac1.verify(signed, mac1) {
                    Err(self.count(DropReason::Unauthenticated))
                } else {
                    let init = Init {
                        sender,
                        noise,
                        mac1,
                        mac2,
                        macced: &datagram[..INIT_LEN],
                    };
                    self.gate_init(now, from, &init, out)
                };
                self.handshakes.count(match &answer {
                    Ok(ServerOutput::Reply(r)) => Ok(InitOutcome::of(r)),
                    Ok(_) => Ok(InitOutcome::Answered),
                    Err(e) => Err(*e),
                });
                answer
            }
            Ok(Message::Data {
                receiver,
                counter,
                ciphertext,
            }) => self.open_data(now, from, receiver, counter, ciphertext, out),
            Ok(Message::Response { .. } | Message::Cookie { .. }) => {
                Err(self.count(DropReason::Malformed))
            }
            Err(e) => Err(self.count(e)),
        }
    }

    /// The driver has more input waiting than it keeps up with (a socket
    /// it did not drain): the server is under load (cookies asked) for a
    /// while, whatever the handshake budget says. The budget assumes the
    /// server has its core to itself; under a flood the flooder's packets
    /// and the kernel's work on them take part of it, and only the backlog
    /// shows that.
    pub fn note_backlog(&mut self, now: Instant) {
        self.gate.note_backlog(now);
    }

    /// Seal a packet from the TUN device for the client owning its destination.
    pub fn handle_tun_packet<'a>(
        &mut self,
        now: Instant,
        packet: &[u8],
        out: &'a mut [u8],
    ) -> Result<ServerOutput<'a, P>, DropReason> {
        let id = self.recipient(packet)?;
        let (path, n) = seal_to(&mut self.peers[id], now, packet, out)?;
        Ok(ServerOutput::Send(path, &out[..n]))
    }

    /// As [`Server::handle_tun_packet`], but only take the packet's place
    /// in its session: the caller seals it with [`Reserved::seal`] into at
    /// most `room` bytes, and need not hold whatever guards this server
    /// meanwhile. Only when the peer's path is one `on` takes: else
    /// `Ok(None)`, and nothing is taken or counted.
    pub fn reserve_tun_packet(
        &mut self,
        now: Instant,
        packet: &[u8],
        room: usize,
        on: impl FnOnce(&P) -> bool,
    ) -> Result<Option<(P, Reserved)>, DropReason> {
        let id = self.recipient(packet)?;
        let peer = &mut self.peers[id];
        if !peer.path.as_ref().is_some_and(on) {
            return Ok(None);
        }
        send_to(peer, now, packet, |k| {
            k.keys.reserve(k.remote_index, packet.len(), room)
        })
        .map(Some)
    }

    /// The peer a packet from the TUN device is for (an IP packet to an
    /// address the pool gave a peer); what is not is counted.
    fn recipient(&mut self, packet: &[u8]) -> Result<usize, DropReason> {
        let dst = InnerPacket::new_checked(packet)
            .map_err(|e| self.count(e))?
            .dst();
        self.owner(dst)
            .ok_or_else(|| self.count(DropReason::NoRoute))
    }

    /// The path a packet from the TUN device would be sent on, without
    /// sealing it: lets a caller choose where to seal it (room in front for
    /// a transport's header).
    pub fn route(&self, packet: &[u8]) -> Option<&P> {
        let dst = InnerPacket::new_checked(packet).ok()?.dst();
        self.peers[self.owner(dst)?].path.as_ref()
    }

    /// Admit exactly `keys` from now on. Keys no longer admitted lose their
    /// session at once: their keys are forgotten (nothing they send opens),
    /// packets for their addresses have no route, and the path each had
    /// shows in [`Server::poll_path_change`] for the caller to release. Their
    /// addresses go back to the pool after [`ADDRESS_GRACE`]. Other sessions
    /// are untouched.
    pub fn set_allowed(
        &mut self,
        now: Instant,
        keys: impl IntoIterator<Item = PublicKey>,
    ) -> AllowedChange {
        let keys: HashSet<PublicKey> = keys.into_iter().collect();
        let mut change = AllowedChange {
            added: keys.difference(&self.allowed).copied().collect(),
            removed: self.allowed.difference(&keys).copied().collect(),
            ended: Vec::new(),
        };
        self.allowed = keys;
        // Admitted again before its address was released: it keeps it.
        let allowed = &self.allowed;
        self.retiring.retain(|(k, _)| !allowed.contains(k));
        for key in &change.removed {
            if self.pool.lease(key).is_some() {
                self.retiring.push_back((*key, now + ADDRESS_GRACE));
            }
            change.ended.extend(self.revoke(key));
        }
        change
    }

    /// End the session of `key`, if it has one.
    fn revoke(&mut self, key: &PublicKey) -> Option<SessionId> {
        let id = *self.by_key.get(key)?;
        let peer = &mut self.peers[id];
        if peer.revoked {
            return None;
        }
        peer.revoked = true;
        for slot in peer.slots() {
            if let Some(gone) = slot.take() {
                self.by_index.remove(&gone.local_index);
            }
        }
        self.by_v4.remove(&peer.lease.v4);
        if let Some(v6) = peer.lease.v6 {
            self.by_v6.remove(&v6);
        }
        if let Some(old) = peer.path.take() {
            self.moved.push((SessionId(id), old));
        }
        Some(SessionId(id))
    }

    /// When [`Server::handle_timeout`] next has work: a sweep for expired
    /// keys once a second while there are sessions, and the release of a
    /// removed key's address.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let release = self.retiring.front().map(|&(_, t)| t);
        self.next_sweep.into_iter().chain(release).min()
    }

    /// Expire old keys; release the addresses of keys removed long enough ago.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(key, _)) = self.retiring.front().filter(|&&(_, t)| t <= now) {
            self.retiring.pop_front();
            self.pool.release(&key);
        }
        if self.next_sweep.is_none_or(|t| t > now) {
            return;
        }
        for peer in &mut self.peers {
            for slot in peer.slots() {
                if slot.as_ref().is_some_and(|k| k.expired(now)) {
                    let gone = slot.take().expect("checked");
                    self.by_index.remove(&gone.local_index);
                }
            }
        }
        self.next_sweep = (!self.by_index.is_empty()).then(|| now + SWEEP_EVERY);
    }

    /// A session whose path changed (the client roamed, or moved to another
    /// transport), with the path it left: the caller releases what it holds
    /// for that path (parked requests, held queries, mailboxes).
    pub fn poll_path_change(&mut self) -> Option<(SessionId, P)> {
        self.moved.pop()
    }

    /// The path a session's downstream goes to now.
    pub fn path_of(&self, session: SessionId) -> Option<&P> {
        self.peers.get(session.0)?.path.as_ref()
    }

    /// The session a data message claims to belong to (by its receiver
    /// index; not authenticated: use it only after `handle_datagram`
    /// accepted the message). Poll transports key held requests by it.
    pub fn session_of(&self, datagram: &[u8]) -> Option<SessionId> {
        match Message::parse(datagram) {
            Ok(Message::Data { receiver, .. }) => {
                self.by_index.get(&receiver).map(|&i| SessionId(i))
            }
            _ => None,
        }
    }

    /// The poll keys of `session`'s live keypairs (current, next, previous)
    /// with their indices: a poll of the tag or mailbox bound to the session
    /// must carry an authenticator made with one of them. None when the
    /// session has no live keys (nothing to send it, nothing to bind).
    pub fn poll_keys(
        &self,
        now: Instant,
        session: SessionId,
    ) -> impl Iterator<Item = (u32, &PollKey)> + Clone {
        self.peers
            .get(session.0)
            .into_iter()
            .flat_map(|p| [&p.current, &p.next, &p.previous])
            .filter_map(move |k| k.as_ref().filter(|k| !k.expired(now)))
            .map(|k| (k.local_index, k.keys.poll_key()))
    }

    /// A keepalive for `session` into `out` (its length): how a poll
    /// transport answers a held request that no data came for.
    pub fn seal_keepalive(
        &mut self,
        now: Instant,
        session: SessionId,
        out: &mut [u8],
    ) -> Result<usize, DropReason> {
        let peer = self.peers.get_mut(session.0).ok_or(DropReason::NoSession)?;
        seal_to(peer, now, &[], out).map(|(_, n)| n)
    }

    fn count(&mut self, reason: DropReason) -> DropReason {
        self.drops.add(reason);
        reason
    }

    fn owner(&self, addr: IpAddr) -> Option<usize> {
        match addr {
            IpAddr::V4(a) => self.by_v4.get(&a).copied(),
            IpAddr::V6(a) => self.by_v6.get(&a).copied(),
        }
    }

    /// Whether an init gets DH work, a cookie, or nothing (see `gate.rs`).
    fn gate_init<'a>(
        &mut self,
        now: Instant,
        from: &P,
        init: &Init<'_>,
        out: &'a mut [u8],
    ) -> Result<ServerOutput<'a, P>, DropReason> {
        if out.len() < RESPONSE_LEN {
            return Err(self.count(DropReason::TooLarge));
        }
        let source = from.source();
        let cookies = &mut self.cookies;
        let has_cookie = || match (source, init.mac2) {
            (Some(addr), Some(mac2)) => cookies.verify(now, &addr, init.macced, mac2),
            _ => false,
        };
        match self.gate.admit(now, source, has_cookie) {
            Admission::Process => self.answer_init(now, from, init.sender, init.noise, out),
            Admission::SendCookie => {
                let addr = source.expect("cookies only for paths with a source");
                Ok(ServerOutput::Reply(
                    self.cookie_reply(now, &addr, init, out),
                ))
            }
            Admission::Refuse(reason) => Err(self.count(reason)),
        }
    }

    /// A cookie reply for `init`, bound to `source`: never larger than
    /// the init (checked at compile time in `wire/message.rs`).
    fn cookie_reply<'a>(
        &mut self,
        now: Instant,
        source: &std::net::SocketAddr,
        init: &Init<'_>,
        out: &'a mut [u8],
    ) -> &'a [u8] {
        let cookie = self.cookies.cookie(now, source);
        Message::emit_cookie_header(init.sender, out);
        let sealed = (&mut out[8..COOKIE_REPLY_LEN])
            .try_into()
            .expect("out holds a response, longer than a cookie reply");
        self.cookies.seal(&cookie, init.mac1, sealed);
        &out[..COOKIE_REPLY_LEN]
    }

    fn answer_init<'a>(
        &mut self,
        now: Instant,
        from: &P,
        sender: u32,
        noise: &[u8],
        out: &'a mut [u8],
    ) -> Result<ServerOutput<'a, P>, DropReason> {
        let responder = Responder::read(&self.private_key, noise).map_err(|e| self.count(e))?;
        let key = *responder.client();
        if !self.allowed.contains(&key) {
            return Err(self.count(DropReason::NotAllowed));
        }
        let id = self
            .peer_for(key)
            .ok_or_else(|| self.count(DropReason::PoolExhausted))?;
        let config = self.tunnel_config(self.peers[id].lease, self.cipher.agree(responder.offer()));
        let peer = &mut self.peers[id];
        let timestamp = responder.timestamp();
        if timestamp <= peer.last_timestamp {
            peer.drops.add(DropReason::StaleHandshake);
            return Err(DropReason::StaleHandshake);
        }
        let noise_out: &mut [u8; RESPONSE_NOISE_LEN] = (&mut out[12..RESPONSE_LEN])
            .try_into()
            .expect("sized above");
        let keys = responder.accept(&config, noise_out)?;
        let local_index = loop {
            let i = random_index();
            if !self.by_index.contains_key(&i) {
                break i;
            }
        };
        Message::emit_response_header(local_index, sender, out);
        peer.last_timestamp = timestamp;
        if let Some(old) = peer.next.replace(Keypair {
            keys,
            local_index,
            remote_index: sender,
            born: now,
        }) {
            self.by_index.remove(&old.local_index);
        }
        self.by_index.insert(local_index, id);
        peer.last_handshake = Some(now);
        // The response answers the init on its own path. The session's
        // downstream stays where it is until the client's first data
        // message with the new keys moves it: an init may come on a path the
        // client only tries (several at once when it starts), and the server
        // sends nothing with the new keys before that message anyway.
        if peer.path.is_none() {
            peer.path = Some(from.clone());
        }
        if self.next_sweep.is_none() {
            self.next_sweep = Some(now + SWEEP_EVERY);
        }
        Ok(ServerOutput::Reply(&out[..RESPONSE_LEN]))
    }

    /// The peer record for an admitted key, created with a lease on first
    /// sight (or given one again, if the key was removed and admitted again).
    fn peer_for(&mut self, key: PublicKey) -> Option<usize> {
        if let Some(&id) = self.by_key.get(&key) {
            if self.peers[id].revoked {
                let lease = self.pool.assign(&key)?;
                self.peers[id].lease = lease;
                self.peers[id].revoked = false;
                self.route_to(id, lease);
            }
            return Some(id);
        }
        let lease = self.pool.assign(&key)?;
        let id = self.peers.len();
        self.peers.push(Peer {
            key,
            lease,
            path: None,
            current: None,
            previous: None,
            next: None,
            last_timestamp: 0,
            last_handshake: None,
            traffic: Traffic::default(),
            drops: DropCounters::default(),
            revoked: false,
        });
        self.by_key.insert(key, id);
        self.route_to(id, lease);
        Some(id)
    }

    fn route_to(&mut self, id: usize, lease: Lease) {
        self.by_v4.insert(lease.v4, id);
        if let Some(v6) = lease.v6 {
            self.by_v6.insert(v6, id);
        }
    }

    fn tunnel_config(&self, lease: Lease, cipher: Cipher) -> TunnelConfig {
        let server = self.pool.server();
        TunnelConfig {
            client_v4: lease.v4,
            server_v4: server.v4,
            prefix_v4: self.pool.net4().prefix_len(),
            v6: match (lease.v6, server.v6, self.pool.net6()) {
                (Some(c), Some(s), Some(net)) => Some((c, s, net.prefix_len())),
                _ => None,
            },
            mtu: self.mtu,
            keepalive_secs: self.keepalive_secs,
            cipher,
        }
    }

    fn open_data<'a>(
        &'a mut self,
        now: Instant,
        from: &P,
        receiver: u32,
        counter: u64,
        ciphertext: &[u8],
        out: &'a mut [u8],
    ) -> Result<ServerOutput<'a, P>, DropReason> {
        let Some(&id) = self.by_index.get(&receiver) else {
            return Err(self.count(DropReason::UnknownIndex));
        };
        let peer = &mut self.peers[id];
        let (n, newest) = match open_with(
            peer,
            &mut self.by_index,
            now,
            receiver,
            counter,
            ciphertext,
            out,
        ) {
            Ok(opened) => opened,
            Err(reason) => {
                peer.drops.add(reason);
                return Err(reason);
            }
        };
        if Control::is_control(&out[..n]) {
            // A probe: answered where it came from; the session stays put.
            let probe = Control::parse(&out[..n]).inspect_err(|&e| peer.drops.add(e))?;
            if probe.kind != ControlKind::Probe {
                peer.drops.add(DropReason::BadInnerPacket);
                return Err(DropReason::BadInnerPacket);
            }
            let reply = Control {
                kind: ControlKind::ProbeReply,
                id: probe.id,
                len: u16::try_from(n).unwrap_or(u16::MAX),
            };
            let len = usize::from(probe.len).min(usize::from(self.mtu));
            let scratch = &mut self.scratch;
            let plain = reply.emit(len, scratch)?;
            let (_, sealed) = seal_to(peer, now, &scratch[..plain], out)?;
            return Ok(ServerOutput::Reply(&out[..sealed]));
        }
        // Roaming: follow the client to the path of its newest message (a
        // message delayed on a path it has left must not pull it back).
        if newest
            && peer.path.as_ref() != Some(from)
            && let Some(old) = peer.path.replace(from.clone())
        {
            self.moved.push((SessionId(id), old));
        }
        if n == 0 {
            // Answer keepalives, so the client can tell a live server from a
            // dead one; on polled paths the driver answers them when they expire.
            if from.is_polled() {
                return Ok(ServerOutput::Nothing);
            }
            let (_, sealed) = seal_to(peer, now, &[], out)?;
            return Ok(ServerOutput::Reply(&out[..sealed]));
        }
        let packet = InnerPacket::new_checked(&out[..n]).inspect_err(|&e| peer.drops.add(e))?;
        let owns_source = match packet.src() {
            IpAddr::V4(a) => a == peer.lease.v4,
            IpAddr::V6(a) => Some(a) == peer.lease.v6,
        };
        if !owns_source {
            peer.drops.add(DropReason::Spoofed);
            return Err(DropReason::Spoofed);
        }
        peer.traffic.rx(n);
        match self.owner(packet.dst()) {
            // Client to client: re-seal without a trip through the kernel.
            Some(to) if to != id => {
                let scratch = &mut self.scratch;
                let (path, len) = seal_to(&mut self.peers[to], now, &out[..n], scratch)?;
                Ok(ServerOutput::Send(path, &self.scratch[..len]))
            }
            _ => Ok(ServerOutput::Tun(&out[..n])),
        }
    }
}

/// Open with whichever of the peer's keypairs owns `receiver`; the first
/// use of the newest keypair confirms it and makes it current (and the
/// keypair it displaces from `previous` leaves `by_index`).
fn open_with<P>(
    peer: &mut Peer<P>,
    by_index: &mut HashMap<u32, usize>,
    now: Instant,
    receiver: u32,
    counter: u64,
    ciphertext: &[u8],
    out: &mut [u8],
) -> Result<(usize, bool), DropReason> {
    let slot = peer
        .slots()
        .into_iter()
        .position(|s| s.as_ref().is_some_and(|k| k.local_index == receiver))
        .ok_or(DropReason::UnknownIndex)?;
    let keypair = peer.slots()[slot].as_mut().expect("found above");
    if keypair.expired(now) {
        return Err(DropReason::Expired);
    }
    // Only the keys in use (or about to be) say where the client is now.
    let newest = slot != 1 && keypair.keys.is_newest(counter);
    let n = keypair.keys.open(counter, ciphertext, out)?;
    if slot == 2 {
        if let Some(gone) = peer.previous.take() {
            by_index.remove(&gone.local_index);
        }
        peer.previous = peer.current.take();
        peer.current = peer.next.take();
    }
    Ok((n, newest))
}

/// Seal `packet` (or a keepalive) for `peer` into `out`: the path it goes
/// on and the message's length.
fn seal_to<P: Clone>(
    peer: &mut Peer<P>,
    now: Instant,
    packet: &[u8],
    out: &mut [u8],
) -> Result<(P, usize), DropReason> {
    send_to(peer, now, packet, |k| k.seal(packet, out))
}

/// Send `packet` to `peer` with `seal` (which seals it, or reserves its
/// place): where it goes, and what `seal` gave. Drops are counted.
fn send_to<P: Clone, R>(
    peer: &mut Peer<P>,
    now: Instant,
    packet: &[u8],
    seal: impl FnOnce(&mut Keypair) -> Result<R, DropReason>,
) -> Result<(P, R), DropReason> {
    let (Some(keypair), Some(path)) = (
        peer.current.as_mut().filter(|k| !k.expired(now)),
        &peer.path,
    ) else {
        peer.drops.add(DropReason::NoSession);
        return Err(DropReason::NoSession);
    };
    let sealed = seal(keypair).inspect_err(|&e| peer.drops.add(e))?;
    if !packet.is_empty() && !Control::is_control(packet) {
        peer.traffic.tx(packet.len());
    }
    Ok((path.clone(), sealed))
}

//! The client: starts and renews the session, seals what the TUN device
//! gives it, opens what the server sends, keeps NAT mappings alive, and
//! notices when the server has gone away (a restart) so it can start over.

use std::time::{Duration, Instant};

use super::{
    DEAD_AFTER_KEEPALIVES, DEFAULT_KEEPALIVE_SECS, HANDSHAKE_RETRY, HANDSHAKE_RETRY_MAX, Keypair,
    REJECT_AFTER_TIME, REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME, Traffic, random_index,
};
use crate::crypto::cookie::{COOKIE_SECRET_LIFETIME, Cookie, CookieSealKey, mac2};
use crate::crypto::{Cipher, Initiator, Mac1Key, PollKey, PrivateKey, PublicKey, Reserved};
use crate::wire::message::{INIT_LEN, INIT_MAC_LEN, INIT_NOISE_LEN, INIT_WITH_MAC2_LEN};
use crate::wire::{Control, ControlKind, InnerPacket, Message, TunnelConfig};
use crate::{DropCounters, DropReason};

/// What the client needs to know up front.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The client's static key.
    pub private_key: PrivateKey,
    /// The server's static public key.
    pub server_key: PublicKey,
    /// Start a new handshake after this many messages on one keypair.
    pub rekey_after_messages: u64,
    /// The data cipher to offer (ChaCha20-Poly1305 is always acceptable).
    pub cipher: Cipher,
}

impl ClientConfig {
    /// A config with the default rekey limits.
    pub fn new(private_key: PrivateKey, server_key: PublicKey) -> Self {
        Self {
            private_key,
            server_key,
            rekey_after_messages: REKEY_AFTER_MESSAGES,
            cipher: Cipher::fastest_here(),
        }
    }
}

/// Something the driver must act on outside the packet flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// A handshake completed and the server's configuration differs from
    /// what the TUN device has (always true the first time): configure it.
    Configured(TunnelConfig),
}

/// What to do with the result of [`Client::handle_datagram`].
#[derive(Debug, PartialEq, Eq)]
pub enum ClientOutput<'a> {
    /// Nothing to do (a keepalive arrived).
    Nothing,
    /// Write this inner packet to the TUN device.
    Tun(&'a [u8]),
    /// Send this message to the server.
    Send(&'a [u8]),
    /// The server answered probe `id`, which reached it `len` bytes long.
    ProbeReply {
        /// The probe's id.
        id: u32,
        /// The probe's length as the server got it.
        len: u16,
    },
}

struct Pending {
    initiator: Initiator,
    local_index: u32,
    /// The init as sent, so it can be sent again on other paths: its first
    /// `init_len` bytes (with mac2 once we hold a cookie).
    init: [u8; INIT_WITH_MAC2_LEN],
    init_len: usize,
}

impl Pending {
    fn init(&self) -> &[u8] {
        &self.init[..self.init_len]
    }

    /// Add (or replace) mac2 under `cookie`.
    fn sign_with(&mut self, cookie: &Cookie) {
        let mac = mac2(cookie, &self.init[..INIT_LEN]);
        self.init[INIT_LEN..].copy_from_slice(&mac);
        self.init_len = INIT_WITH_MAC2_LEN;
    }
}

/// The latest cookie the server gave, and when.
struct HeldCookie {
    cookie: Cookie,
    received: Instant,
}

/// The client's state machine.
pub struct Client {
    config: ClientConfig,
    mac1: Mac1Key,
    cookie_key: CookieSealKey,
    cookie: Option<HeldCookie>,
    epoch: Instant,
    epoch_unix_nanos: u64,
    pending: Option<Pending>,
    current: Option<Keypair>,
    previous: Option<Keypair>,
    tunnel: Option<TunnelConfig>,
    event: Option<ClientEvent>,
    /// When to send the next init, if one is due.
    next_handshake: Option<Instant>,
    attempts: u32,
    last_rx: Instant,
    last_tx: Instant,
    last_keepalive: Instant,
    last_handshake: Option<Instant>,
    traffic: Traffic,
    drops: DropCounters,
}

impl Client {
    /// A client that will start its handshake at the first `poll_timers`.
    /// `unix_nanos` is the wall-clock time at `now`; it seeds the handshake
    /// timestamps, which must grow across client restarts.
    pub fn new(config: ClientConfig, now: Instant, unix_nanos: u64) -> Self {
        Self {
            mac1: Mac1Key::new(&config.server_key),
            cookie_key: CookieSealKey::new(&config.server_key),
            cookie: None,
            config,
            epoch: now,
            epoch_unix_nanos: unix_nanos,
            pending: None,
            current: None,
            previous: None,
            tunnel: None,
            event: None,
            next_handshake: Some(now),
            attempts: 0,
            last_rx: now,
            last_tx: now,
            last_keepalive: now,
            last_handshake: None,
            traffic: Traffic::default(),
            drops: DropCounters::default(),
        }
    }

    /// The poll key of the keys the client sends with now, and their index
    /// (it changes with every handshake): what binds its polls (DNS
    /// queries, long-poll requests) to the session.
    pub fn poll_key(&self, now: Instant) -> Option<(u32, &PollKey)> {
        self.current
            .as_ref()
            .filter(|k| !k.expired(now))
            .map(|k| (k.local_index, k.keys.poll_key()))
    }

    /// Seal an inner packet from the TUN device into a data message in `out`.
    pub fn handle_tun_packet(
        &mut self,
        now: Instant,
        packet: &[u8],
        out: &mut [u8],
    ) -> Result<usize, DropReason> {
        let result = self.seal_packet(now, packet, out);
        if let Err(reason) = result {
            self.drops.add(reason);
        }
        result
    }

    /// As [`Client::handle_tun_packet`], but only take the packet's place
    /// in the session (its counter, and what sending it means for keepalives
    /// and rekeying): the caller seals it with [`Reserved::seal`] into at
    /// most `room` bytes, and need not hold whatever guards this client
    /// meanwhile.
    pub fn reserve_tun_packet(
        &mut self,
        now: Instant,
        packet: &[u8],
        room: usize,
    ) -> Result<Reserved, DropReason> {
        let result = self.reserve_packet(now, packet, room);
        if let Err(reason) = result {
            self.drops.add(reason);
        }
        result
    }

    fn seal_packet(
        &mut self,
        now: Instant,
        packet: &[u8],
        out: &mut [u8],
    ) -> Result<usize, DropReason> {
        let n = self.sending_keypair(now, packet)?.seal(packet, out)?;
        self.sent(now, packet.len());
        Ok(n)
    }

    fn reserve_packet(
        &mut self,
        now: Instant,
        packet: &[u8],
        room: usize,
    ) -> Result<Reserved, DropReason> {
        let keypair = self.sending_keypair(now, packet)?;
        let reserved = keypair
            .keys
            .reserve(keypair.remote_index, packet.len(), room)?;
        self.sent(now, packet.len());
        Ok(reserved)
    }

    /// The keypair to send `packet` with (which must be an IP packet).
    fn sending_keypair(&mut self, now: Instant, packet: &[u8]) -> Result<&mut Keypair, DropReason> {
        InnerPacket::new_checked(packet)?;
        if self.current.as_ref().is_none_or(|k| k.expired(now)) {
            self.want_handshake(now);
            return Err(DropReason::NoSession);
        }
        Ok(self.current.as_mut().expect("checked just above"))
    }

    /// A packet of `len` bytes went out with the current keypair.
    fn sent(&mut self, now: Instant, len: usize) {
        let rekey = self.current.as_ref().is_some_and(|k| {
            k.keys.sent() >= self.config.rekey_after_messages
                || now.saturating_duration_since(k.born) >= REKEY_AFTER_TIME
        });
        if rekey {
            self.want_handshake(now);
        }
        self.last_tx = now;
        self.traffic.tx(len);
    }

    /// Handle a message from the server.
    pub fn handle_datagram<'a>(
        &'a mut self,
        now: Instant,
        datagram: &[u8],
        out: &'a mut [u8],
    ) -> Result<ClientOutput<'a>, DropReason> {
        let result = match Message::parse(datagram) {
            Ok(Message::Response {
                sender,
                receiver,
                noise,
            }) => self.complete_handshake(now, sender, receiver, noise, out),
            Ok(Message::Data {
                receiver,
                counter,
                ciphertext,
            }) => self.open_data(now, receiver, counter, ciphertext, out),
            Ok(Message::Cookie {
                receiver,
                nonce,
                sealed,
            }) => self.take_cookie(now, receiver, nonce, sealed, out),
            Ok(Message::Init { .. }) => Err(DropReason::Malformed),
            Err(e) => Err(e),
        };
        if let Err(reason) = result {
            self.drops.add(reason);
        }
        result
    }

    fn complete_handshake<'a>(
        &mut self,
        now: Instant,
        sender: u32,
        receiver: u32,
        noise: &[u8],
        out: &'a mut [u8],
    ) -> Result<ClientOutput<'a>, DropReason> {
        let Some(pending) = self.pending.as_mut().filter(|p| p.local_index == receiver) else {
            return Err(DropReason::UnexpectedResponse);
        };
        // Anyone who saw the init can send a response with its index: one
        // that fails to authenticate must leave the handshake pending.
        let tunnel = pending.initiator.read_response(noise)?;
        let pending = self.pending.take().expect("checked above");
        let keys = pending.initiator.into_keys()?;
        self.previous = self.current.replace(Keypair {
            keys,
            local_index: receiver,
            remote_index: sender,
            born: now,
        });
        if self.tunnel != Some(tunnel) {
            self.tunnel = Some(tunnel);
            self.event = Some(ClientEvent::Configured(tunnel));
        }
        self.next_handshake = None;
        self.attempts = 0;
        self.last_handshake = Some(now);
        self.last_rx = now;
        // Confirm the new keys at once: the server sends with them only after
        // it has seen us use them.
        let n = self.send_keepalive(now, out)?;
        Ok(ClientOutput::Send(&out[..n]))
    }

    /// The server is under load and wants our init again with a cookie:
    /// keep the cookie (for this init and those that follow while it is
    /// good) and send the init again at once, with mac2. The server did no
    /// DH work for it, so its timestamp is still fresh.
    fn take_cookie<'a>(
        &mut self,
        now: Instant,
        receiver: u32,
        nonce: &[u8],
        sealed: &[u8],
        out: &'a mut [u8],
    ) -> Result<ClientOutput<'a>, DropReason> {
        let Some(pending) = self.pending.as_mut().filter(|p| p.local_index == receiver) else {
            return Err(DropReason::UnexpectedResponse);
        };
        let mac1 = &pending.init[INIT_LEN - INIT_MAC_LEN..INIT_LEN];
        let cookie = self
            .cookie_key
            .open(nonce, sealed, mac1)
            .ok_or(DropReason::Unauthenticated)?;
        // The same cookie again (a duplicated reply, or one for the copy
        // of the init on another path): the init already carries it.
        if self.cookie.as_ref().is_some_and(|c| c.cookie == cookie) && pending.init_len > INIT_LEN {
            return Ok(ClientOutput::Nothing);
        }
        pending.sign_with(&cookie);
        self.cookie = Some(HeldCookie {
            cookie,
            received: now,
        });
        let init = pending.init();
        let n = init.len();
        out.get_mut(..n)
            .ok_or(DropReason::TooLarge)?
            .copy_from_slice(init);
        Ok(ClientOutput::Send(&out[..n]))
    }

    /// The cookie to sign a new init with, if we hold one the server still
    /// accepts (it takes a cookie for at least [`COOKIE_SECRET_LIFETIME`]).
    fn fresh_cookie(&self, now: Instant) -> Option<&Cookie> {
        self.cookie
            .as_ref()
            .filter(|c| now.saturating_duration_since(c.received) < COOKIE_SECRET_LIFETIME)
            .map(|c| &c.cookie)
    }

    fn open_data<'a>(
        &mut self,
        now: Instant,
        receiver: u32,
        counter: u64,
        ciphertext: &[u8],
        out: &'a mut [u8],
    ) -> Result<ClientOutput<'a>, DropReason> {
        let keypair = [self.current.as_mut(), self.previous.as_mut()]
            .into_iter()
            .flatten()
            .find(|k| k.local_index == receiver)
            .ok_or(DropReason::UnknownIndex)?;
        if keypair.expired(now) {
            return Err(DropReason::Expired);
        }
        let n = keypair.keys.open(counter, ciphertext, out)?;
        self.last_rx = now;
        if n == 0 {
            return Ok(ClientOutput::Nothing);
        }
        if Control::is_control(&out[..n]) {
            return match Control::parse(&out[..n])? {
                Control {
                    kind: ControlKind::ProbeReply,
                    id,
                    len,
                } => Ok(ClientOutput::ProbeReply { id, len }),
                _ => Err(DropReason::BadInnerPacket),
            };
        }
        InnerPacket::new_checked(&out[..n])?;
        self.traffic.rx(n);
        Ok(ClientOutput::Tun(&out[..n]))
    }

    /// Run the timers: send an init (first, retry or rekey) or a keepalive
    /// into `out` when one is due. Call when [`Client::next_timeout`] has
    /// passed; returns the length of a message to send to the server.
    pub fn poll_timers(&mut self, now: Instant, out: &mut [u8]) -> Option<usize> {
        self.check_session(now);
        if self.next_handshake.is_some_and(|t| t <= now) {
            return self.start_handshake(now, out);
        }
        if self.keepalive_due(now) {
            return self.send_keepalive(now, out).ok();
        }
        None
    }

    /// When [`Client::poll_timers`] next has something to do.
    pub fn next_timeout(&self) -> Option<Instant> {
        let Some(k) = &self.current else {
            return self.next_handshake;
        };
        let mut t = self.keepalive_at().min(k.born + REJECT_AFTER_TIME);
        t = match self.next_handshake {
            Some(h) => t.min(h),
            None => t
                .min(k.born + REKEY_AFTER_TIME)
                .min(self.last_rx + self.dead_after()),
        };
        Some(t)
    }

    /// Take the pending event, if any.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.event.take()
    }

    /// The configuration the server gave, once a handshake completed.
    pub fn tunnel(&self) -> Option<&TunnelConfig> {
        self.tunnel.as_ref()
    }

    /// Whether data can be sent now.
    pub fn is_connected(&self, now: Instant) -> bool {
        self.current.as_ref().is_some_and(|k| !k.expired(now))
    }

    /// When the last handshake completed.
    pub fn last_handshake(&self) -> Option<Instant> {
        self.last_handshake
    }

    /// Traffic counters.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    /// Drop counters.
    pub fn drops(&self) -> DropCounters {
        self.drops
    }

    fn keepalive(&self) -> Duration {
        let secs = self
            .tunnel
            .map_or(DEFAULT_KEEPALIVE_SECS, |t| t.keepalive_secs)
            .max(1);
        Duration::from_secs(secs.into())
    }

    fn dead_after(&self) -> Duration {
        self.keepalive() * DEAD_AFTER_KEEPALIVES
    }

    fn want_handshake(&mut self, now: Instant) {
        if self.next_handshake.is_none() {
            self.next_handshake = Some(now);
        }
    }

    /// Decide whether the session needs renewing: old keys, or a silent server.
    fn check_session(&mut self, now: Instant) {
        let Some(born) = self.current.as_ref().map(|k| k.born) else {
            return;
        };
        let old = now.saturating_duration_since(born) >= REKEY_AFTER_TIME;
        let silent = now.saturating_duration_since(self.last_rx) >= self.dead_after();
        if old || silent {
            self.want_handshake(now);
        }
        if now.saturating_duration_since(born) >= REJECT_AFTER_TIME {
            self.previous = self.current.take();
        }
    }

    fn start_handshake(&mut self, now: Instant, out: &mut [u8]) -> Option<usize> {
        if out.len() < INIT_WITH_MAC2_LEN {
            return None;
        }
        let local_index = random_index();
        let timestamp =
            self.epoch_unix_nanos + now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let noise: &mut [u8; INIT_NOISE_LEN] = (&mut out[8..INIT_LEN - INIT_MAC_LEN])
            .try_into()
            .expect("sized above");
        let initiator = Initiator::start(
            &self.config.private_key,
            &self.config.server_key,
            timestamp,
            self.config.cipher,
            noise,
        );
        Message::emit_init_header(local_index, out);
        let (signed, mac1) = out[..INIT_LEN].split_at_mut(INIT_LEN - INIT_MAC_LEN);
        mac1.copy_from_slice(&self.mac1.compute(signed));
        let mut pending = Pending {
            initiator,
            local_index,
            init: [0; INIT_WITH_MAC2_LEN],
            init_len: INIT_LEN,
        };
        pending.init[..INIT_LEN].copy_from_slice(&out[..INIT_LEN]);
        if let Some(cookie) = self.fresh_cookie(now) {
            pending.sign_with(cookie);
        }
        let len = pending.init_len;
        out[..len].copy_from_slice(pending.init());
        self.pending = Some(pending);
        let backoff = HANDSHAKE_RETRY
            .saturating_mul(1 << self.attempts.min(4))
            .min(HANDSHAKE_RETRY_MAX);
        self.attempts += 1;
        self.next_handshake = Some(now + backoff);
        Some(len)
    }

    /// A keepalive is due one interval after the last one, and only once
    /// traffic has been idle one interval in either direction.
    fn keepalive_at(&self) -> Instant {
        self.last_keepalive.max(self.last_tx.min(self.last_rx)) + self.keepalive()
    }

    fn keepalive_due(&self, now: Instant) -> bool {
        self.current.is_some() && now >= self.keepalive_at()
    }

    /// The init of the handshake in progress, to send again on another
    /// path (the server answers whichever copy reaches it first).
    pub fn pending_init(&self) -> Option<&[u8]> {
        self.pending.as_ref().map(Pending::init)
    }

    /// Seal a probe (a [`Control`] message the server answers on the path
    /// it came by, without moving the session there) into `out`. The probe
    /// is padded to `len` bytes and asks for a reply of `reply_len`.
    pub fn seal_probe(
        &mut self,
        now: Instant,
        id: u32,
        len: usize,
        reply_len: u16,
        out: &mut [u8],
    ) -> Result<usize, DropReason> {
        let keypair = self
            .current
            .as_mut()
            .filter(|k| !k.expired(now))
            .ok_or(DropReason::NoSession)?;
        let probe = Control {
            kind: ControlKind::Probe,
            id,
            len: reply_len,
        };
        let mut plain = [0u8; 1 << 11];
        let n = probe.emit(len.min(plain.len()), &mut plain)?;
        keypair.seal(&plain[..n], out)
    }

    /// Seal a keepalive into `out` now. Poll transports send these as their
    /// requests when they have no data to carry.
    pub fn seal_keepalive(&mut self, now: Instant, out: &mut [u8]) -> Result<usize, DropReason> {
        self.send_keepalive(now, out)
    }

    fn send_keepalive(&mut self, now: Instant, out: &mut [u8]) -> Result<usize, DropReason> {
        let keypair = self.current.as_mut().ok_or(DropReason::NoSession)?;
        let n = keypair.seal(&[], out)?;
        self.last_keepalive = now;
        self.last_tx = now;
        Ok(n)
    }
}

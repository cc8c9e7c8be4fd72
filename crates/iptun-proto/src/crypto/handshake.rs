//! The two ends of the Noise IK handshake, with iptun's payloads: the
//! client's timestamp (against replayed inits) and the ciphers it offers,
//! and the server's [`TunnelConfig`] (with the cipher it chose).

use snow::{Builder, HandshakeState};

use super::cipher::{Cipher, DataKey};
use super::{NOISE_PARAMS, PROLOGUE, PollKey, PrivateKey, PublicKey, SessionKeys};
use crate::DropReason;
use crate::wire::TunnelConfig;
use crate::wire::config::CONFIG_LEN;
use crate::wire::message::{INIT_NOISE_LEN, INIT_PAYLOAD_LEN, RESPONSE_NOISE_LEN};

fn builder<'a>(local: &'a PrivateKey) -> Builder<'a> {
    Builder::new(NOISE_PARAMS.parse().expect("valid Noise parameters"))
        .local_private_key(local.as_bytes())
        .and_then(|b| b.prologue(PROLOGUE))
        .expect("static key and prologue are accepted")
}

/// Init payload byte 8, bit 0: the client offers AES-256-GCM for data.
const OFFER_AES256GCM: u8 = 1;

/// The client's half-finished handshake.
pub struct Initiator {
    state: HandshakeState,
    offer: Cipher,
    /// The server's choice, once its response is read.
    chosen: Cipher,
}

impl Initiator {
    /// Write Noise message 1 into `out`, carrying `timestamp` (nanoseconds
    /// since the Unix epoch; the server requires it to grow) and the
    /// data cipher the client prefers (`offer`; ChaCha20-Poly1305 is always
    /// acceptable).
    pub fn start(
        local: &PrivateKey,
        server: &PublicKey,
        timestamp: u64,
        offer: Cipher,
        out: &mut [u8; INIT_NOISE_LEN],
    ) -> Self {
        let mut state = builder(local)
            .remote_public_key(&server.0)
            .and_then(Builder::build_initiator)
            .expect("a 32-byte server key is accepted");
        let mut payload = [0u8; INIT_PAYLOAD_LEN];
        payload[..8].copy_from_slice(&timestamp.to_le_bytes());
        if offer == Cipher::Aes256Gcm {
            payload[8] = OFFER_AES256GCM;
        }
        let n = state
            .write_message(&payload, out)
            .expect("message 1 fits its fixed size");
        debug_assert_eq!(n, INIT_NOISE_LEN);
        Self {
            state,
            offer,
            chosen: Cipher::ChaCha20Poly1305,
        }
    }

    /// Read Noise message 2: the server's config and the session keys.
    pub fn finish(mut self, noise: &[u8]) -> Result<(TunnelConfig, SessionKeys), DropReason> {
        let config = self.read_response(noise)?;
        Ok((config, self.into_keys()?))
    }

    /// Read Noise message 2 and return the server's config. A message that
    /// does not authenticate leaves the handshake as it was (snow restores
    /// its state on a failed read), so a forged response cannot spoil the
    /// real one that follows it. A server choosing a cipher the client did
    /// not offer is refused.
    pub fn read_response(&mut self, noise: &[u8]) -> Result<TunnelConfig, DropReason> {
        let mut payload = [0u8; CONFIG_LEN + 16];
        let n = self
            .state
            .read_message(noise, &mut payload)
            .map_err(|_| DropReason::Unauthenticated)?;
        let config = TunnelConfig::parse(&payload[..n])?;
        if !self.offer.permits(config.cipher) {
            return Err(DropReason::Malformed);
        }
        self.chosen = config.cipher;
        Ok(config)
    }

    /// The session keys, once [`Initiator::read_response`] succeeded.
    pub fn into_keys(self) -> Result<SessionKeys, DropReason> {
        into_keys(self.state, self.chosen)
    }
}

/// The server's view of a verified init, before it decides to answer.
pub struct Responder {
    state: HandshakeState,
    client: PublicKey,
    timestamp: u64,
    offer: Cipher,
}

impl Responder {
    /// Read Noise message 1. On success the client's static key is proven
    /// (it decrypted under our static key and its own).
    pub fn read(local: &PrivateKey, noise: &[u8]) -> Result<Self, DropReason> {
        let mut state = builder(local).build_responder().expect("responder builds");
        let mut payload = [0u8; INIT_PAYLOAD_LEN];
        let n = state
            .read_message(noise, &mut payload)
            .map_err(|_| DropReason::Unauthenticated)?;
        if n != INIT_PAYLOAD_LEN {
            return Err(DropReason::Malformed);
        }
        let client = state
            .get_remote_static()
            .and_then(|k| k.try_into().ok())
            .map(PublicKey)
            .ok_or(DropReason::Unauthenticated)?;
        let timestamp = u64::from_le_bytes(payload[..8].try_into().unwrap());
        // Bits not defined are ignored: a later client may offer more.
        let offer = if payload[8] & OFFER_AES256GCM != 0 {
            Cipher::Aes256Gcm
        } else {
            Cipher::ChaCha20Poly1305
        };
        Ok(Self {
            state,
            client,
            timestamp,
            offer,
        })
    }

    /// The client's static public key.
    pub fn client(&self) -> &PublicKey {
        &self.client
    }

    /// The client's timestamp (nanoseconds since the Unix epoch).
    pub fn timestamp(&self) -> u64 {
        self.timestamp
    }

    /// The data cipher the client prefers.
    pub fn offer(&self) -> Cipher {
        self.offer
    }

    /// Write Noise message 2 carrying `config` into `out`; returns the
    /// keys, for `config.cipher` (which the client must have offered).
    pub fn accept(
        mut self,
        config: &TunnelConfig,
        out: &mut [u8; RESPONSE_NOISE_LEN],
    ) -> Result<SessionKeys, DropReason> {
        if !self.offer.permits(config.cipher) {
            return Err(DropReason::Malformed);
        }
        let n = self
            .state
            .write_message(&config.emit(), out)
            .map_err(|_| DropReason::TooLarge)?;
        debug_assert_eq!(n, RESPONSE_NOISE_LEN);
        into_keys(self.state, config.cipher)
    }
}

/// The session keys of a finished handshake: Noise's Split() gives the
/// client-to-server key first, the server-to-client key second; the poll
/// key is derived from both.
fn into_keys(mut state: HandshakeState, cipher: Cipher) -> Result<SessionKeys, DropReason> {
    if !state.is_handshake_finished() {
        return Err(DropReason::Unauthenticated);
    }
    let (k1, k2) = state.dangerously_get_raw_split();
    let poll = PollKey::derive(&k1, &k2);
    let (send, receive) = if state.is_initiator() {
        (k1, k2)
    } else {
        (k2, k1)
    };
    Ok(SessionKeys::new(
        DataKey::new(cipher, &send),
        DataKey::new(cipher, &receive),
        poll,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn config() -> TunnelConfig {
        TunnelConfig {
            client_v4: Ipv4Addr::new(10, 1, 0, 2),
            server_v4: Ipv4Addr::new(10, 1, 0, 1),
            prefix_v4: 24,
            v6: None,
            mtu: 1420,
            keepalive_secs: 10,
            cipher: Cipher::ChaCha20Poly1305,
        }
    }

    #[test]
    fn full_handshake_then_data_both_ways() {
        let (client, server) = (PrivateKey::generate(), PrivateKey::generate());
        let mut m1 = [0u8; INIT_NOISE_LEN];
        let init = Initiator::start(
            &client,
            &server.public_key(),
            42,
            Cipher::ChaCha20Poly1305,
            &mut m1,
        );
        let resp = Responder::read(&server, &m1).unwrap();
        assert_eq!(resp.client(), &client.public_key());
        assert_eq!(resp.timestamp(), 42);
        let mut m2 = [0u8; RESPONSE_NOISE_LEN];
        let mut server_keys = resp.accept(&config(), &mut m2).unwrap();
        let (got, mut client_keys) = init.finish(&m2).unwrap();
        assert_eq!(got, config());

        let mut msg = [0u8; 64];
        let mut plain = [0u8; 64];
        let n = client_keys.seal(7, b"hello", &mut msg).unwrap();
        let Ok(crate::wire::Message::Data {
            counter,
            ciphertext,
            ..
        }) = crate::wire::Message::parse(&msg[..n])
        else {
            panic!()
        };
        let m = server_keys.open(counter, ciphertext, &mut plain).unwrap();
        assert_eq!(&plain[..m], b"hello");
        assert_eq!(
            server_keys.open(counter, ciphertext, &mut plain),
            Err(DropReason::Replay)
        );

        let n = server_keys.seal(9, b"back", &mut msg).unwrap();
        let Ok(crate::wire::Message::Data {
            counter,
            ciphertext,
            ..
        }) = crate::wire::Message::parse(&msg[..n])
        else {
            panic!()
        };
        let m = client_keys.open(counter, ciphertext, &mut plain).unwrap();
        assert_eq!(&plain[..m], b"back");

        // Both ends derive the same poll key.
        let a = client_keys
            .poll_key()
            .auth(crate::crypto::PollKind::Dns, 1, 2, b"x");
        assert!(
            server_keys
                .poll_key()
                .verify(crate::crypto::PollKind::Dns, 1, 2, b"x", &a)
        );
    }

    #[test]
    fn wrong_server_key_fails() {
        let (client, server, other) = (
            PrivateKey::generate(),
            PrivateKey::generate(),
            PrivateKey::generate(),
        );
        let mut m1 = [0u8; INIT_NOISE_LEN];
        Initiator::start(&client, &other.public_key(), 1, Cipher::Aes256Gcm, &mut m1);
        assert!(Responder::read(&server, &m1).is_err());
    }

    #[test]
    fn tampered_data_fails() {
        let (client, server) = (PrivateKey::generate(), PrivateKey::generate());
        let mut m1 = [0u8; INIT_NOISE_LEN];
        let init = Initiator::start(&client, &server.public_key(), 1, Cipher::Aes256Gcm, &mut m1);
        let mut m2 = [0u8; RESPONSE_NOISE_LEN];
        let aes = TunnelConfig {
            cipher: Cipher::Aes256Gcm,
            ..config()
        };
        let mut server_keys = Responder::read(&server, &m1)
            .unwrap()
            .accept(&aes, &mut m2)
            .unwrap();
        let (_, mut client_keys) = init.finish(&m2).unwrap();
        assert_eq!(client_keys.cipher(), Cipher::Aes256Gcm);
        let mut msg = [0u8; 64];
        let n = client_keys.seal(7, b"hello", &mut msg).unwrap();
        msg[20] ^= 1;
        let mut plain = [0u8; 64];
        assert_eq!(
            server_keys.open(0, &msg[16..n], &mut plain),
            Err(DropReason::Unauthenticated)
        );
        // A forged message must not move the replay window.
        msg[20] ^= 1;
        assert_eq!(server_keys.open(0, &msg[16..n], &mut plain), Ok(5));
    }

    /// Run a handshake with the client offering `offer` and the server
    /// choosing `choice`; returns what each end made of it.
    fn negotiate(
        offer: Cipher,
        choice: Cipher,
    ) -> (
        Result<SessionKeys, DropReason>,
        Result<(TunnelConfig, SessionKeys), DropReason>,
    ) {
        let (client, server) = (PrivateKey::generate(), PrivateKey::generate());
        let mut m1 = [0u8; INIT_NOISE_LEN];
        let init = Initiator::start(&client, &server.public_key(), 1, offer, &mut m1);
        let responder = Responder::read(&server, &m1).unwrap();
        assert_eq!(responder.offer(), offer);
        let mut m2 = [0u8; RESPONSE_NOISE_LEN];
        let config = TunnelConfig {
            cipher: choice,
            ..config()
        };
        let server_keys = responder.accept(&config, &mut m2);
        let client_end = server_keys
            .as_ref()
            .map_err(|e| *e)
            .and_then(|_| init.finish(&m2));
        (server_keys, client_end)
    }

    #[test]
    fn aes_only_when_offered() {
        use Cipher::*;
        for (offer, choice) in [
            (Aes256Gcm, Aes256Gcm),
            (Aes256Gcm, ChaCha20Poly1305),
            (ChaCha20Poly1305, ChaCha20Poly1305),
        ] {
            let (server, client) = negotiate(offer, choice);
            let (config, client) = client.unwrap();
            assert_eq!(config.cipher, choice);
            assert_eq!(
                (server.unwrap().cipher(), client.cipher()),
                (choice, choice)
            );
        }
        // A server cannot pick a cipher the client did not offer.
        assert_eq!(
            negotiate(ChaCha20Poly1305, Aes256Gcm).0.err(),
            Some(DropReason::Malformed)
        );
    }

    #[test]
    fn chacha_data_is_what_noise_would_seal() {
        // Sessions sealed by iptun 0.x through snow's transport state must
        // open here, and the other way round: same keys, nonce and tag.
        let (client, server) = (PrivateKey::generate(), PrivateKey::generate());
        let mut i = builder(&client)
            .remote_public_key(&server.public_key().0)
            .and_then(Builder::build_initiator)
            .unwrap();
        let mut r = builder(&server).build_responder().unwrap();
        let (mut m1, mut m2, mut payload) = ([0u8; 256], [0u8; 256], [0u8; 256]);
        let n = i.write_message(&[0; INIT_PAYLOAD_LEN], &mut m1).unwrap();
        r.read_message(&m1[..n], &mut payload).unwrap();
        let n = r.write_message(&config().emit(), &mut m2).unwrap();
        i.read_message(&m2[..n], &mut payload).unwrap();
        let (k1, _) = i.dangerously_get_raw_split();
        let noise = i.into_stateless_transport_mode().unwrap();
        let mut by_noise = [0u8; 64];
        let n = noise
            .write_message(0x0102_0304_0506, b"inner packet", &mut by_noise)
            .unwrap();
        let mut ours = [0u8; 64];
        let key = DataKey::new(Cipher::ChaCha20Poly1305, &k1);
        assert_eq!(key.seal(0x0102_0304_0506, b"inner packet", &mut ours), n);
        assert_eq!(ours[..n], by_noise[..n]);
    }
}

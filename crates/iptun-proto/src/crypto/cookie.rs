//! Cookies against handshake floods (WireGuard's `mac2`).
//!
//! Every init costs the server Diffie-Hellman work, and `mac1` only proves
//! the sender knows the server's public key, which every client does. Under
//! load the server does no DH for an init unless its `mac2` proves the
//! sender can receive at its source address: it answers the others with a
//! cookie reply, a small encrypted cookie bound to that address, which a
//! spoofing flooder never sees.
//!
//! - cookie = BLAKE2s-MAC-16(key = secret, source address), the secret
//!   random and replaced every [`COOKIE_SECRET_LIFETIME`];
//! - mac2 = BLAKE2s-MAC-16(key = cookie, the init up to and with mac1);
//! - the reply carries the cookie sealed with XChaCha20-Poly1305 under
//!   BLAKE2s-256("cookie iptun v1" || server public key), a random 24-byte
//!   nonce, and the init's mac1 as associated data: only the client that
//!   sent that init (or someone who saw it) can open it, and a reply can't
//!   be made for an init the replier never saw.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use blake2::digest::consts::U16;
use blake2::digest::{Digest as _, Mac as _};
use blake2::{Blake2s256, Blake2sMac};
use chacha20poly1305::aead::AeadInPlace as _;
use chacha20poly1305::{KeyInit as _, XChaCha20Poly1305, XNonce};

use super::{MAC_LEN, PublicKey};
use crate::wire::message::{COOKIE_NONCE_LEN, SEALED_COOKIE_LEN};

/// How long one cookie secret is used before a new one replaces it. A
/// cookie made with it is accepted until the secret after it is replaced
/// too, so the client uses one for this long at most.
pub const COOKIE_SECRET_LIFETIME: Duration = Duration::from_secs(120);
/// Bytes of a cookie.
pub const COOKIE_LEN: usize = 16;

const LABEL: &[u8] = b"cookie iptun v1";

/// A cookie as the client holds it.
pub type Cookie = [u8; COOKIE_LEN];

/// The key that seals cookie replies of one server (both ends derive it
/// from the server's public key).
#[derive(Clone)]
pub struct CookieSealKey(XChaCha20Poly1305);

impl CookieSealKey {
    /// `BLAKE2s-256(LABEL || server public key)`.
    pub fn new(server: &PublicKey) -> Self {
        let key: [u8; 32] = Blake2s256::new()
            .chain_update(LABEL)
            .chain_update(server.0)
            .finalize()
            .into();
        Self(XChaCha20Poly1305::new(&key.into()))
    }

    /// Seal `cookie` for the client whose init carried `mac1`: the nonce
    /// and the sealed cookie, written into `out`.
    pub fn seal(
        &self,
        cookie: &Cookie,
        mac1: &[u8],
        out: &mut [u8; COOKIE_NONCE_LEN + SEALED_COOKIE_LEN],
    ) {
        let (nonce, sealed) = out.split_at_mut(COOKIE_NONCE_LEN);
        getrandom::fill(nonce).expect("the OS random source failed");
        let (body, tag) = sealed.split_at_mut(COOKIE_LEN);
        body.copy_from_slice(cookie);
        let t = self
            .0
            .encrypt_in_place_detached(XNonce::from_slice(nonce), mac1, body)
            .expect("a 16-byte cookie fits the cipher's limits");
        tag.copy_from_slice(&t);
    }

    /// Open a sealed cookie that answers the init which carried `mac1`.
    pub fn open(&self, nonce: &[u8], sealed: &[u8], mac1: &[u8]) -> Option<Cookie> {
        if nonce.len() != COOKIE_NONCE_LEN || sealed.len() != SEALED_COOKIE_LEN {
            return None;
        }
        let mut cookie = [0u8; COOKIE_LEN];
        cookie.copy_from_slice(&sealed[..COOKIE_LEN]);
        self.0
            .decrypt_in_place_detached(
                XNonce::from_slice(nonce),
                mac1,
                &mut cookie,
                sealed[COOKIE_LEN..].into(),
            )
            .ok()?;
        Some(cookie)
    }
}

/// mac2 over `message` (the init up to and with mac1) under `cookie`.
pub fn mac2(cookie: &Cookie, message: &[u8]) -> [u8; MAC_LEN] {
    keyed(cookie)
        .chain_update(message)
        .finalize()
        .into_bytes()
        .into()
}

fn keyed(key: &[u8]) -> Blake2sMac<U16> {
    <Blake2sMac<U16> as blake2::digest::KeyInit>::new_from_slice(key)
        .expect("16- and 32-byte keys are valid")
}

/// The server's cookie secrets: makes cookies for source addresses and
/// checks the mac2 made with them.
pub struct CookieJar {
    seal: CookieSealKey,
    current: [u8; 32],
    previous: Option<[u8; 32]>,
    born: Instant,
}

impl CookieJar {
    /// A jar with a fresh secret.
    pub fn new(server: &PublicKey, now: Instant) -> Self {
        Self {
            seal: CookieSealKey::new(server),
            current: random_secret(),
            previous: None,
            born: now,
        }
    }

    /// Replace the secret once it is [`COOKIE_SECRET_LIFETIME`] old: the
    /// one it replaces still checks cookies for one more lifetime, unless
    /// it is that old itself (nothing was checked for a whole lifetime).
    fn rotate(&mut self, now: Instant) {
        let age = now.saturating_duration_since(self.born);
        if age < COOKIE_SECRET_LIFETIME {
            return;
        }
        self.previous = (age < 2 * COOKIE_SECRET_LIFETIME).then_some(self.current);
        self.current = random_secret();
        self.born = now;
    }

    /// The cookie for `source` now.
    pub fn cookie(&mut self, now: Instant, source: &SocketAddr) -> Cookie {
        self.rotate(now);
        cookie_with(&self.current, source)
    }

    /// Whether `mac2` over `message` was made with a cookie we gave `source`
    /// under the current secret or the one before it.
    pub fn verify(
        &mut self,
        now: Instant,
        source: &SocketAddr,
        message: &[u8],
        mac2: &[u8],
    ) -> bool {
        self.rotate(now);
        [Some(self.current), self.previous]
            .into_iter()
            .flatten()
            .any(|secret| {
                keyed(&cookie_with(&secret, source))
                    .chain_update(message)
                    .verify_slice(mac2)
                    .is_ok()
            })
    }

    /// Seal `cookie` for the init that carried `mac1`.
    pub fn seal(
        &self,
        cookie: &Cookie,
        mac1: &[u8],
        out: &mut [u8; COOKIE_NONCE_LEN + SEALED_COOKIE_LEN],
    ) {
        self.seal.seal(cookie, mac1, out);
    }
}

/// The source as the cookie binds it: the address (IPv4 or IPv6, 16 bytes)
/// and the port.
fn cookie_with(secret: &[u8; 32], source: &SocketAddr) -> Cookie {
    let ip = match source.ip() {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    keyed(secret)
        .chain_update(ip)
        .chain_update(source.port().to_le_bytes())
        .finalize()
        .into_bytes()
        .into()
}

fn random_secret() -> [u8; 32] {
    let mut s = [0u8; 32];
    getrandom::fill(&mut s).expect("the OS random source failed");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sealed_cookie_opens_only_for_its_init() {
        let key = CookieSealKey::new(&PublicKey([3; 32]));
        let mut out = [0u8; COOKIE_NONCE_LEN + SEALED_COOKIE_LEN];
        key.seal(&[9; COOKIE_LEN], &[1; MAC_LEN], &mut out);
        let (nonce, sealed) = out.split_at(COOKIE_NONCE_LEN);
        assert_eq!(
            key.open(nonce, sealed, &[1; MAC_LEN]),
            Some([9; COOKIE_LEN])
        );
        assert_eq!(key.open(nonce, sealed, &[2; MAC_LEN]), None);
        let other = CookieSealKey::new(&PublicKey([4; 32]));
        assert_eq!(other.open(nonce, sealed, &[1; MAC_LEN]), None);
        assert_eq!(key.open(&nonce[1..], sealed, &[1; MAC_LEN]), None);
    }

    #[test]
    fn cookie_binds_address_and_port() {
        let now = Instant::now();
        let mut jar = CookieJar::new(&PublicKey([3; 32]), now);
        let from = addr("192.0.2.1:4000");
        let cookie = jar.cookie(now, &from);
        let tag = mac2(&cookie, b"init");
        assert!(jar.verify(now, &from, b"init", &tag));
        assert!(!jar.verify(now, &from, b"inix", &tag));
        assert!(!jar.verify(now, &addr("192.0.2.2:4000"), b"init", &tag));
        assert!(!jar.verify(now, &addr("192.0.2.1:4001"), b"init", &tag));
    }

    #[test]
    fn secrets_rotate() {
        let t0 = Instant::now();
        let mut jar = CookieJar::new(&PublicKey([3; 32]), t0);
        let from = addr("[2001:db8::1]:53");
        let tag = mac2(&jar.cookie(t0, &from), b"init");
        // Still good just after the rotation...
        let t1 = t0 + COOKIE_SECRET_LIFETIME;
        assert!(jar.verify(t1, &from, b"init", &tag));
        assert_ne!(mac2(&jar.cookie(t1, &from), b"init"), tag);
        // ...not after the next one.
        assert!(!jar.verify(t1 + COOKIE_SECRET_LIFETIME, &from, b"init", &tag));
    }
}

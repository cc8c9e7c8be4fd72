//! Bound polls: a short authenticator that ties a request carrying no data
//! (a DNS query, a long-poll request) to the session's client, so that
//! someone who only saw the client's tag cannot pull its downstream.
//!
//! Every keypair has a *poll key*, derived on both ends from the keys the
//! handshake split into (secret: the handshake hash alone would not do, an
//! observer of the handshake can compute it):
//!
//! ```text
//! poll key = BLAKE2s-256(key = k1, "iptun poll key v1" || k2)
//! auth     = first 4 bytes of BLAKE2s-256(key = poll key,
//!                kind u8 || tag u64 LE || counter u64 LE || header)
//! ```
//!
//! with `k1`, `k2` the Noise split's two cipher keys (initiator to
//! responder first), `kind` 1 for DNS and 2 for long-poll, `tag` the
//! request's tag, `counter` the client's request counter under this keypair
//! (never repeating), and `header` whatever else of the request must not be
//! changed (DNS: the query's 7-byte header). The server checks the
//! authenticator with each keypair of the session it may come under
//! (current, next, previous), then the counter against a replay window of
//! that keypair and tag ([`PollGuard`]).
//!
//! Four bytes are enough: a forger has one try per request, and a wrong
//! guess costs it the request (dropped, counted) and the client nothing;
//! at 100 000 forged requests a second one succeeds every 12 hours on
//! average, and what it wins is one answer's worth of ciphertext (the inner
//! TCP resends it). Nothing can be checked offline: the key never leaves
//! the two ends.

use blake2::Blake2sMac256;
use blake2::digest::{KeyInit, Mac as _};

use super::ReplayWindow;

/// Bytes of a poll's authenticator.
pub const POLL_AUTH_LEN: usize = 4;
/// Words of the replay window of a poll counter: 8128 counters, so polls
/// reordered by several resolvers at tens of thousands a second are all
/// taken, each once.
pub const POLL_WINDOW_WORDS: usize = 128;
const KEY_LABEL: &[u8] = b"iptun poll key v1";

/// The transport a poll rides: part of what the authenticator covers, so
/// one transport's authenticator is never good on another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PollKind {
    /// A DNS query (§11.2).
    Dns = 1,
    /// A long-poll request (§12.3).
    Http = 2,
}

/// One keypair's poll key (see the module docs).
#[derive(Clone)]
pub struct PollKey {
    mac: Blake2sMac256,
}

impl std::fmt::Debug for PollKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PollKey(..)")
    }
}

impl PollKey {
    /// The poll key of the keypair whose Noise split gave `k1` and `k2`.
    pub(crate) fn derive(k1: &[u8; 32], k2: &[u8; 32]) -> Self {
        let key: [u8; 32] = <Blake2sMac256 as KeyInit>::new_from_slice(k1)
            .expect("a 32-byte key is valid")
            .chain_update(KEY_LABEL)
            .chain_update(k2)
            .finalize()
            .into_bytes()
            .into();
        Self::from_bytes(&key)
    }

    /// A poll key from its 32 bytes (tests and fuzzing; sessions derive
    /// theirs).
    pub fn from_bytes(key: &[u8; 32]) -> Self {
        Self {
            mac: <Blake2sMac256 as KeyInit>::new_from_slice(key).expect("a 32-byte key is valid"),
        }
    }

    fn mac(&self, kind: PollKind, tag: u64, counter: u64, header: &[u8]) -> Blake2sMac256 {
        self.mac
            .clone()
            .chain_update([kind as u8])
            .chain_update(tag.to_le_bytes())
            .chain_update(counter.to_le_bytes())
            .chain_update(header)
    }

    /// The authenticator of a poll.
    pub fn auth(
        &self,
        kind: PollKind,
        tag: u64,
        counter: u64,
        header: &[u8],
    ) -> [u8; POLL_AUTH_LEN] {
        let full = self.mac(kind, tag, counter, header).finalize().into_bytes();
        let mut out = [0; POLL_AUTH_LEN];
        out.copy_from_slice(&full[..POLL_AUTH_LEN]);
        out
    }

    /// Whether `auth` is the authenticator of the poll (constant time).
    pub fn verify(
        &self,
        kind: PollKind,
        tag: u64,
        counter: u64,
        header: &[u8],
        auth: &[u8],
    ) -> bool {
        auth.len() == POLL_AUTH_LEN
            && self
                .mac(kind, tag, counter, header)
                .verify_truncated_left(auth)
                .is_ok()
    }
}

/// The counter a poll carries: all of it (long-poll), or its low 16 bits
/// (DNS, where the name has no room for more), which the server widens to
/// the counter nearest above the highest it took (as QUIC widens packet
/// numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollCounter {
    /// The whole counter.
    Full(u64),
    /// Its low 16 bits.
    Low16(u16),
}

/// The counter nearest to `highest + 1` whose low 16 bits are `low`;
/// `low` itself when nothing was taken yet (a keypair's counter starts
/// below 2^16).
pub fn widen(highest: Option<u64>, low: u16) -> u64 {
    const WIN: u64 = 1 << 16;
    const HALF: u64 = WIN / 2;
    let Some(highest) = highest else {
        return u64::from(low);
    };
    let expected = highest.saturating_add(1);
    let candidate = (expected & !(WIN - 1)) | u64::from(low);
    if candidate.saturating_add(HALF) <= expected && candidate <= u64::MAX - WIN {
        candidate + WIN
    } else if candidate > expected.saturating_add(HALF) && candidate >= WIN {
        candidate - WIN
    } else {
        candidate
    }
}

/// What a poll's authenticator and counter say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollCheck {
    /// Authentic and never seen: a new request of the client.
    Fresh(u64),
    /// Authentic, but its counter was taken before (or is too old for the
    /// window): a resolver's retry, or a replay. It may get again what its
    /// first copy got, never anything new.
    Repeat(u64),
    /// No keypair of the session made it.
    Forged,
}

/// The replay windows of one tag's polls, one per keypair (by its index).
#[derive(Debug, Default)]
pub struct PollGuard {
    windows: Vec<(u32, Box<ReplayWindow<POLL_WINDOW_WORDS>>)>,
}

impl PollGuard {
    /// A guard that has taken nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Check a poll of `tag` against the session's keypairs `keys` (their
    /// indices and poll keys); a fresh counter is taken, so the same poll
    /// checks as [`PollCheck::Repeat`] after. Windows of keypairs no longer
    /// in `keys` are forgotten.
    pub fn check<'k>(
        &mut self,
        keys: impl IntoIterator<Item = (u32, &'k PollKey)>,
        kind: PollKind,
        tag: u64,
        counter: PollCounter,
        header: &[u8],
        auth: &[u8],
    ) -> PollCheck {
        let mut live = [None; 3];
        let mut verdict = PollCheck::Forged;
        for (slot, (index, key)) in keys.into_iter().take(3).enumerate() {
            live[slot] = Some(index);
            if verdict != PollCheck::Forged {
                continue;
            }
            let window = self.windows.iter().position(|(i, _)| *i == index);
            let full = match counter {
                PollCounter::Full(c) => c,
                PollCounter::Low16(low) => {
                    widen(window.and_then(|w| self.windows[w].1.last()), low)
                }
            };
            if !key.verify(kind, tag, full, header, auth) {
                continue;
            }
            let w = match window {
                Some(w) => w,
                None => {
                    self.windows.push((index, Box::default()));
                    self.windows.len() - 1
                }
            };
            verdict = if self.windows[w].1.accept(full) {
                PollCheck::Fresh(full)
            } else {
                PollCheck::Repeat(full)
            };
        }
        self.windows.retain(|(i, _)| live.contains(&Some(*i)));
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> PollKey {
        PollKey::from_bytes(&[b; 32])
    }

    #[test]
    fn derivation_binds_both_keys_and_order() {
        let a = PollKey::derive(&[1; 32], &[2; 32]).auth(PollKind::Dns, 5, 6, b"h");
        assert_eq!(
            a,
            PollKey::derive(&[1; 32], &[2; 32]).auth(PollKind::Dns, 5, 6, b"h")
        );
        assert_ne!(
            a,
            PollKey::derive(&[2; 32], &[1; 32]).auth(PollKind::Dns, 5, 6, b"h")
        );
        assert_ne!(
            a,
            PollKey::derive(&[1; 32], &[3; 32]).auth(PollKind::Dns, 5, 6, b"h")
        );
    }

    #[test]
    fn auth_binds_every_input() {
        let k = key(7);
        let a = k.auth(PollKind::Dns, 1, 2, b"hdr");
        assert!(k.verify(PollKind::Dns, 1, 2, b"hdr", &a));
        assert!(!k.verify(PollKind::Http, 1, 2, b"hdr", &a));
        assert!(!k.verify(PollKind::Dns, 9, 2, b"hdr", &a));
        assert!(!k.verify(PollKind::Dns, 1, 3, b"hdr", &a));
        assert!(!k.verify(PollKind::Dns, 1, 2, b"hdR", &a));
        assert!(!key(8).verify(PollKind::Dns, 1, 2, b"hdr", &a));
        assert!(!k.verify(PollKind::Dns, 1, 2, b"hdr", &a[..3]));
        assert!(!k.verify(PollKind::Dns, 1, 2, b"hdr", &[]));
    }

    #[test]
    fn widening_follows_the_highest() {
        assert_eq!(widen(None, 7), 7);
        assert_eq!(widen(Some(65_535), 0), 65_536);
        assert_eq!(widen(Some(65_540), 65_530), 65_530);
        assert_eq!(widen(Some(1 << 20), 5), (1 << 20) + 5);
        assert_eq!(
            widen(Some((1 << 20) + 40_000), 5),
            (1 << 20) + (1 << 16) + 5
        );
        assert_eq!(widen(Some(u64::MAX - 1), 0xffff), u64::MAX);
    }

    #[test]
    fn guard_takes_each_counter_once_under_any_live_key() {
        let (old, new) = (key(1), key(2));
        let mut g = PollGuard::new();
        let keys = [(10, &old), (11, &new)];
        let check = |g: &mut PollGuard, k: &PollKey, c: u64| {
            let a = k.auth(PollKind::Dns, 3, c, b"h");
            g.check(
                keys,
                PollKind::Dns,
                3,
                PollCounter::Low16(c as u16),
                b"h",
                &a,
            )
        };
        assert_eq!(check(&mut g, &old, 65_530), PollCheck::Fresh(65_530));
        assert_eq!(check(&mut g, &old, 65_537), PollCheck::Fresh(65_537));
        assert_eq!(check(&mut g, &old, 65_537), PollCheck::Repeat(65_537));
        assert_eq!(check(&mut g, &old, 65_531), PollCheck::Fresh(65_531));
        // The other keypair has its own counter, starting low.
        assert_eq!(check(&mut g, &new, 3), PollCheck::Fresh(3));
        // A forger's guess, and a capture replayed after the counter wrapped.
        assert_eq!(
            g.check(keys, PollKind::Dns, 3, PollCounter::Low16(9), b"h", &[0; 4]),
            PollCheck::Forged
        );
        for c in 65_538..65_538 + 70_000u64 {
            assert!(matches!(check(&mut g, &old, c), PollCheck::Fresh(_)));
        }
        let a = old.auth(PollKind::Dns, 3, 65_540, b"h");
        assert_eq!(
            g.check(
                keys,
                PollKind::Dns,
                3,
                PollCounter::Low16(65_540u64 as u16),
                b"h",
                &a
            ),
            PollCheck::Forged,
            "widened to the next round of the counter, it does not verify"
        );
        // A keypair that is gone takes nothing.
        let a = old.auth(PollKind::Dns, 3, 200_000, b"h");
        assert_eq!(
            g.check(
                [(11, &new)],
                PollKind::Dns,
                3,
                PollCounter::Full(200_000),
                b"h",
                &a
            ),
            PollCheck::Forged
        );
    }

    proptest! {
        /// Whatever bytes come, nothing panics and no authenticator
        /// verifies that was not made with the key.
        #[test]
        fn forged_polls_never_verify(
            tag: u64,
            low: u16,
            full: u64,
            header in proptest::collection::vec(any::<u8>(), 0..16),
            auth in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let k = key(42);
            let mut g = PollGuard::new();
            let real = k.auth(PollKind::Dns, tag, u64::from(low), &header);
            prop_assume!(auth != real);
            prop_assert_eq!(
                g.check([(1, &k)], PollKind::Dns, tag, PollCounter::Low16(low), &header, &auth),
                PollCheck::Forged
            );
            let real = k.auth(PollKind::Http, tag, full, &[]);
            prop_assume!(auth != real);
            prop_assert_eq!(
                g.check([(1, &k)], PollKind::Http, tag, PollCounter::Full(full), &[], &auth),
                PollCheck::Forged
            );
        }

        #[test]
        fn widening_recovers_counters_within_half_the_space(highest in 0u64..(1 << 40), ahead in -32_766i64..32_769) {
            let c = highest.saturating_add_signed(ahead);
            prop_assert_eq!(widen(Some(highest), c as u16), c);
        }
    }
}

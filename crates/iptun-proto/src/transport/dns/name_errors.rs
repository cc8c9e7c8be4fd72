//! Whether the DNS listener may answer NXDOMAIN below the apex.
//!
//! A resolver that minimises query names (RFC 9156) asks first for a short
//! name one label below the apex, then one label longer, and so on: a 253
//! byte query name costs it five upstream queries. Answered NXDOMAIN at the
//! first step, a resolver that minimises on a best-effort basis (unbound,
//! BIND and Knot Resolver by default) sends the full name at once: two
//! queries instead of five, and through unbound more than twice the upload.
//!
//! A resolver that trusts an unsigned NXDOMAIN to mean that nothing exists
//! below (RFC 8020; unbound with `qname-minimisation-strict`) answers the
//! full name NXDOMAIN itself and never sends it. So the listener watches
//! that full names follow: it remembers the label next to the apex of each
//! NXDOMAIN it gives, and a tunnel query ending in a remembered label
//! confirms. Many NXDOMAINs without a confirmation for a while, and the
//! listener answers NODATA below the apex (as before) for a minute, then a
//! doubling time, and tries again. A client behind such a resolver loses
//! its first seconds; a scanner of random names can at most turn the
//! listener back to NODATA while no client confirms.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

/// NXDOMAINs without a confirmation after which the listener falls back...
const UNCONFIRMED_LIMIT: u32 = 4;
/// ... if the first of them went out this long ago. A resolver that follows
/// sends the full name a round trip after the NXDOMAIN; one that does not
/// makes its client retry, at least a second later.
const CONFIRMATION_WAIT: Duration = Duration::from_secs(2);
/// An NXDOMAIN is remembered this long; a full name later is no follow-up.
const REMEMBER_FOR: Duration = Duration::from_secs(3);
/// NXDOMAINs remembered at most.
const MAX_REMEMBERED: usize = 4096;
/// The first time spent answering NODATA; it doubles up to [`MAX_FALLBACK`]
/// while fallbacks come without a confirmation in between.
const FIRST_FALLBACK: Duration = Duration::from_secs(60);
const MAX_FALLBACK: Duration = Duration::from_secs(600);

/// The listener's watch over its NXDOMAINs below the apex.
pub(super) struct NameErrors {
    hasher: RandomState,
    /// Hashes of the lowercased label next to the apex of recent NXDOMAINs.
    remembered: HashMap<u64, Instant>,
    order: VecDeque<(u64, Instant)>,
    unconfirmed: u32,
    /// When the first NXDOMAIN since the last confirmation went out.
    unconfirmed_since: Option<Instant>,
    /// NODATA below the apex until then.
    fallback_until: Option<Instant>,
    next_fallback: Duration,
    /// Times the listener fell back.
    pub(super) fallbacks: u64,
}

impl NameErrors {
    pub(super) fn new() -> Self {
        Self {
            hasher: RandomState::new(),
            remembered: HashMap::new(),
            order: VecDeque::new(),
            unconfirmed: 0,
            unconfirmed_since: None,
            fallback_until: None,
            next_fallback: FIRST_FALLBACK,
            fallbacks: 0,
        }
    }

    /// Whether a name below the apex ending (next to the apex) in `label`
    /// is answered NXDOMAIN now; if so it is remembered.
    pub(super) fn answer_nxdomain(&mut self, now: Instant, label: &[u8]) -> bool {
        if self.fallback_until.is_some_and(|t| now < t) {
            return false;
        }
        self.forget_old(now);
        let h = self.hash(label);
        if self.remembered.insert(h, now).is_none() {
            self.order.push_back((h, now));
        }
        self.unconfirmed = self.unconfirmed.saturating_add(1);
        let since = *self.unconfirmed_since.get_or_insert(now);
        let waited = now.saturating_duration_since(since) >= CONFIRMATION_WAIT;
        if self.unconfirmed >= UNCONFIRMED_LIMIT && waited {
            // Full names stopped following: a resolver takes NXDOMAIN as
            // final. This one still goes out; the next ones are NODATA.
            self.fallback_until = Some(now + self.next_fallback);
            self.next_fallback = (self.next_fallback * 2).min(MAX_FALLBACK);
            self.fallbacks += 1;
            self.unconfirmed = 0;
            self.unconfirmed_since = None;
            self.remembered.clear();
            self.order.clear();
        }
        true
    }

    /// A tunnel query arrived whose name ends (next to the apex) in `label`.
    pub(super) fn on_tunnel_query(&mut self, label: &[u8]) {
        if self.remembered.is_empty() {
            return;
        }
        let h = self.hash(label);
        if self.remembered.remove(&h).is_some() {
            self.unconfirmed = 0;
            self.unconfirmed_since = None;
            self.next_fallback = FIRST_FALLBACK;
        }
    }

    fn forget_old(&mut self, now: Instant) {
        while let Some(&(h, at)) = self.order.front() {
            let old = now.saturating_duration_since(at) >= REMEMBER_FOR;
            if !old && self.order.len() < MAX_REMEMBERED {
                break;
            }
            self.order.pop_front();
            if self.remembered.get(&h) == Some(&at) {
                self.remembered.remove(&h);
            }
        }
    }

    /// The label's hash, whatever its case (resolvers randomise it).
    fn hash(&self, label: &[u8]) -> u64 {
        let mut h = self.hasher.build_hasher();
        for b in label {
            h.write_u8(b.to_ascii_lowercase());
        }
        h.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(i: u32) -> Vec<u8> {
        format!("step{i}").into_bytes()
    }

    #[test]
    fn full_names_that_follow_keep_nxdomain() {
        let mut g = NameErrors::new();
        let t0 = Instant::now();
        for i in 0..10_000u32 {
            let now = t0 + Duration::from_millis(u64::from(i));
            assert!(g.answer_nxdomain(now, &label(i)), "step {i}");
            // The resolver's full name, its case randomised.
            g.on_tunnel_query(&label(i).to_ascii_uppercase());
        }
        assert_eq!(g.fallbacks, 0);
    }

    #[test]
    fn falls_back_when_full_names_stop_and_tries_again_later() {
        let mut g = NameErrors::new();
        let t0 = Instant::now();
        let mut now = t0;
        let mut answered = 0;
        while g.answer_nxdomain(now, &label(answered)) {
            answered += 1;
            now += Duration::from_millis(100);
        }
        assert_eq!(g.fallbacks, 1);
        // Steps for two seconds without a confirmation.
        assert_eq!(answered, 21);
        assert!(now - t0 >= CONFIRMATION_WAIT);
        assert!(!g.answer_nxdomain(now + FIRST_FALLBACK - Duration::from_secs(1), b"x"));
        assert!(g.answer_nxdomain(now + FIRST_FALLBACK, b"x"));
    }

    #[test]
    fn a_scanner_does_not_turn_off_what_a_client_confirms() {
        let mut g = NameErrors::new();
        let t0 = Instant::now();
        for i in 0..20_000u32 {
            let now = t0 + Duration::from_millis(u64::from(i));
            assert!(g.answer_nxdomain(now, &label(i)));
            // One name in 500 is a client's step, followed by its full name.
            if i % 500 == 0 {
                g.on_tunnel_query(&label(i));
            }
        }
        assert_eq!(g.fallbacks, 0);
    }

    #[test]
    fn memory_stays_bounded() {
        let mut g = NameErrors::new();
        let t0 = Instant::now();
        for i in 0..100_000u32 {
            g.answer_nxdomain(t0 + Duration::from_micros(u64::from(i)), &label(i));
            g.on_tunnel_query(&label(i.wrapping_sub(1)));
        }
        assert!(g.order.len() <= MAX_REMEMBERED);
        assert!(g.remembered.len() <= MAX_REMEMBERED);
    }
}

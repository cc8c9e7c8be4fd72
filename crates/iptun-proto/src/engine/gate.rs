//! Which inits the server spends Diffie-Hellman work on.
//!
//! The server spends at most its handshake budget (handshakes a second,
//! measured by the driver from what one costs on this CPU) on DH. While
//! the budget is more than half full nothing changes: every authentic init
//! is answered in one round trip. Once it runs below half the server is
//! under load, and an init from an address-bearing path (UDP, ICMP) costs
//! DH only if its mac2 shows it came from where it claims; the others get a
//! cookie reply (cheap, and no larger than the init). Within that, each
//! source (an IPv4 address, an IPv6 /64) gets at most a share of the budget,
//! so one flooder at its real address cannot take everyone else's; the same
//! share bounds the cookie replies a source gets, so a flood from a few
//! spoofed addresses is dropped for the price of a hash lookup, and not
//! answered (sealing and sending a reply costs the server more than the
//! flooder's send). The server stays under load for [`LOAD_LINGERS`] after
//! the budget was last below half: a flood that let it refill would
//! otherwise get DH work every time it did. And the load it measures is
//! demand, not only work done: every authentic init, answered with DH or a
//! cookie or dropped, takes a token of a second bucket like the budget, so
//! a flood that arrives faster than the budget keeps the server under load
//! while it gets no DH at all. The driver can also say it is behind on its
//! input (a socket it could not drain), which puts the server under load
//! too: the budget is what one core does, and under a flood the server
//! does not get a whole core.
//!
//! Paths without a source address worth binding a cookie to (DNS: the
//! resolver, shared by many clients; HTTP: a proxy, or an end the driver
//! does not tell) share a fixed part of the budget instead, so a flood on
//! UDP cannot starve them and a flood through them cannot take it all.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::DropReason;

/// One source gets at most this part of the handshake budget.
const PER_SOURCE_SHARE: f64 = 1.0 / 16.0;
/// Paths without a source address share this part of the budget.
const SOURCELESS_SHARE: f64 = 1.0 / 4.0;
/// The budget's burst: a second's worth would let a burst of inits run
/// the server flat out for a second before it noticed it was under load.
const BURST_SECS: f64 = 0.25;
/// How long the server stays under load after the budget was last below half.
const LOAD_LINGERS: Duration = Duration::from_secs(1);
/// How often idle per-source buckets are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// What to do with an authentic (mac1-checked) init.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Admission {
    /// Spend the DH on it.
    Process,
    /// Answer with a cookie for its source instead.
    SendCookie,
    /// Drop it (and count why).
    Refuse(DropReason),
}

/// The handshake budget, its per-source shares and the load signal.
pub(super) struct HandshakeGate {
    budget: TokenBucket,
    /// Inits arriving, whatever became of them, at the budget's rate.
    demand: TokenBucket,
    sourceless: TokenBucket,
    per_source: HashMap<SourceKey, TokenBucket>,
    per_source_rate: f64,
    next_prune: Instant,
    /// Under load until then, whatever the budget.
    loaded_until: Option<Instant>,
}

impl HandshakeGate {
    /// A gate that lets `per_sec` handshakes a second through.
    pub(super) fn new(per_sec: u32, now: Instant) -> Self {
        let rate = f64::from(per_sec.max(1));
        Self {
            budget: TokenBucket::new(rate, now),
            demand: TokenBucket::new(rate, now),
            sourceless: TokenBucket::new(rate * SOURCELESS_SHARE, now),
            per_source: HashMap::new(),
            per_source_rate: rate * PER_SOURCE_SHARE,
            next_prune: now + PRUNE_EVERY,
            loaded_until: None,
        }
    }

    /// Whether inits need a cookie now.
    pub(super) fn under_load(&mut self, now: Instant) -> bool {
        if self.budget.level(now) < 0.5 || self.demand.level(now) < 0.5 {
            self.loaded_until = Some(now + LOAD_LINGERS);
        }
        self.loaded_until.is_some_and(|t| now < t)
    }

    /// The driver is behind on its input: under load for a while.
    pub(super) fn note_backlog(&mut self, now: Instant) {
        self.loaded_until = Some(now + LOAD_LINGERS);
    }

    /// Decide about an init from `source` (`None`: a path without one);
    /// `has_cookie` checks its mac2, and is only called under load.
    pub(super) fn admit(
        &mut self,
        now: Instant,
        source: Option<SocketAddr>,
        has_cookie: impl FnOnce() -> bool,
    ) -> Admission {
        self.prune(now);
        let _ = self.demand.take(now);
        let under_load = self.under_load(now);
        let Some(addr) = source else {
            if !self.sourceless.take(now) {
                return Admission::Refuse(DropReason::UnderLoad);
            }
            return self.spend(now);
        };
        let rate = self.per_source_rate;
        let bucket = self
            .per_source
            .entry(SourceKey::of(addr.ip()))
            .or_insert_with(|| TokenBucket::new(rate, now));
        if !bucket.take(now) {
            return Admission::Refuse(DropReason::RateLimited);
        }
        if under_load && !has_cookie() {
            return Admission::SendCookie;
        }
        self.spend(now)
    }

    /// Spend a token of the budget on DH, if there is one.
    fn spend(&mut self, now: Instant) -> Admission {
        if !self.budget.take(now) {
            return Admission::Refuse(DropReason::UnderLoad);
        }
        Admission::Process
    }

    /// Forget the buckets of sources that have been quiet long enough to
    /// be full again: they would start full anyway.
    fn prune(&mut self, now: Instant) {
        if now < self.next_prune {
            return;
        }
        self.next_prune = now + PRUNE_EVERY;
        self.per_source.retain(|_, b| b.level(now) < 1.0);
    }

    /// Sources with a bucket now (for tests: the map stays bounded).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.per_source.len()
    }
}

/// What the per-source limit counts as one source: an IPv4 address, or
/// an IPv6 /64 (one host usually has a whole /64 to pick addresses from).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum SourceKey {
    V4(u32),
    V6(u64),
}

impl SourceKey {
    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(a) => Self::V4(a.into()),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => Self::V4(v4.into()),
                None => Self::V6((u128::from(a) >> 64) as u64),
            },
        }
    }
}

/// A token bucket with fractional tokens: `rate` a second, at most
/// `BURST_SECS` seconds' worth (never less than one) in store.
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    fn new(rate: f64, now: Instant) -> Self {
        let burst = (rate * BURST_SECS).max(1.0);
        Self {
            rate,
            burst,
            tokens: burst,
            refilled: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.refilled = self.refilled.max(now);
    }

    /// How full it is, from 0 to 1.
    fn level(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens / self.burst
    }

    fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn no_cookie_needed_until_half_the_budget_is_spent() {
        let now = Instant::now();
        let mut gate = HandshakeGate::new(400, now); // burst 100
        for i in 0..50u32 {
            let from = SocketAddr::from((std::net::Ipv4Addr::from(i), 1));
            let a = gate.admit(now, Some(from), || panic!("not under load"));
            assert_eq!(a, Admission::Process);
        }
        assert_eq!(
            gate.admit(now, src("192.0.2.3:1"), || false),
            Admission::SendCookie
        );
        assert_eq!(
            gate.admit(now, src("192.0.2.3:1"), || true),
            Admission::Process
        );
    }

    #[test]
    fn one_source_cannot_take_another_sources_share() {
        let now = Instant::now();
        let mut gate = HandshakeGate::new(1600, now); // per source 100/s, burst 25
        let flooder = (0..1000)
            .filter(|_| gate.admit(now, src("198.51.100.7:9"), || true) == Admission::Process)
            .count();
        assert_eq!(flooder, 25);
        // Another address of the flooder's /64 is the same source...
        let a = gate.admit(now, src("[2001:db8::1]:1"), || true);
        assert_eq!(a, Admission::Process);
        for _ in 0..30 {
            gate.admit(now, src("[2001:db8::2]:1"), || true);
        }
        assert_eq!(
            gate.admit(now, src("[2001:db8::3]:1"), || true),
            Admission::Refuse(DropReason::RateLimited)
        );
        // ...another address is not.
        assert_eq!(
            gate.admit(now, src("203.0.113.5:1"), || true),
            Admission::Process
        );
    }

    #[test]
    fn sourceless_paths_share_a_quarter() {
        let now = Instant::now();
        let mut gate = HandshakeGate::new(400, now); // sourceless 100/s, burst 25
        let passed = (0..100)
            .filter(|_| gate.admit(now, None, || unreachable!()) == Admission::Process)
            .count();
        assert_eq!(passed, 25);
        let later = now + Duration::from_millis(100);
        assert_eq!(gate.admit(later, None, || false), Admission::Process);
    }

    #[test]
    fn quiet_sources_are_forgotten() {
        let now = Instant::now();
        let mut gate = HandshakeGate::new(100_000, now);
        for i in 0..1000u32 {
            let addr = SocketAddr::from((std::net::Ipv4Addr::from(i), 1));
            gate.admit(now, Some(addr), || true);
        }
        assert_eq!(gate.tracked(), 1000);
        gate.admit(now + Duration::from_secs(2), None, || true);
        assert_eq!(gate.tracked(), 0);
    }
}

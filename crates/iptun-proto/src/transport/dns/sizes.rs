//! The DNS path's sizes each way, as the client finds them: how long a
//! query name may be and how much a query's payload option may carry
//! (upstream), and how large an answer may be (downstream).
//!
//! - **Query names** start at the user's cap (`?max-query=`, else 253
//!   characters). Long queries that vanish or fail while shorter ones are
//!   answered lower the cap halfway towards the longest name known to work
//!   ([`Sizes::long_failed`]); padded probes raise it again halfway towards
//!   the shortest name known to fail, then to that one, then to the user's
//!   cap ([`Probe::NameLen`]).
//! - **The payload option** (an EDNS0 option carrying the fragment, so a
//!   query carries about a kilobyte): unknown at first, probed once the
//!   path is healthy ([`Probe::Option`]); used only where the server says
//!   it read one (resolvers do not pass options on: straight to the server).
//! - **Answers** start at 1232 bytes (EDNS0); a truncated answer, or
//!   FORMERR to a query with EDNS0, steps down (4080, 1232, then 512
//!   without EDNS0); a padded probe of the next size up raises it again
//!   ([`Probe::Down`]), to 4080 only where an answer that large arrives
//!   whole (a resolver caps what it relays at its own EDNS0 size).
//!
//! Probes go one at a time, after the path has answered a few queries in a
//! row. A failed probe of a size waits [`REPROBE_MIN`] before the next,
//! doubling up to [`REPROBE_MAX`]; probes that narrow a name length in
//! halves follow each other at once.

use std::time::{Duration, Instant};

use super::{CLASSIC_SIZE, EDNS_SIZE, MAX_DOWN, UP_HEADER_LEN};
use crate::frag;
use crate::wire::dns::{Domain, MAX_NAME_LEN, NameEncoding};

/// First wait before a failed size is probed again.
pub const REPROBE_MIN: Duration = Duration::from_secs(30);
/// Longest wait between probes of a size.
pub const REPROBE_MAX: Duration = Duration::from_secs(600);
/// The wait between probes that narrow a name length (or follow a success).
pub const NARROWING: Duration = Duration::from_secs(1);
/// Name lengths closer than this to one known to fail are not probed in
/// halves: the probe tries that length itself.
pub const NARROW_ENOUGH: usize = 8;
/// Payload option bytes probed and then used.
pub const OPTION_LEN: usize = 1024;
/// Upstream payload a query must carry at the least: its header, a
/// fragment header and a few bytes of data.
const MIN_PAYLOAD: usize = UP_HEADER_LEN + frag::HEADER_LEN + 8;

/// A probe's answer this much short of the size asked was capped on the
/// way (by a resolver's own EDNS0 size): going up gains nothing.
const DOWN_SLACK: usize = 256;
/// The answer sizes tried, smallest first (512: no EDNS0).
const DOWN_SIZES: [u16; 3] = [CLASSIC_SIZE as u16, EDNS_SIZE, MAX_DOWN];

/// A query that tests one size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// A poll padded to a name of this many characters (answered small).
    NameLen(usize),
    /// A short poll asking for an answer padded to this size.
    Down(u16),
    /// A short poll with a payload option of this many bytes.
    Option(usize),
}

/// The payload option's standing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OptionState {
    /// Not probed yet.
    Unknown,
    /// The server reads it.
    Works,
    /// The path loses it, or the queries carrying it.
    Fails,
}

/// When a size is probed next, and how long after a failure.
#[derive(Clone, Copy, Debug)]
struct Schedule {
    at: Option<Instant>,
    wait: Duration,
}

impl Schedule {
    const NOW: Self = Self {
        at: None,
        wait: REPROBE_MIN,
    };

    fn due(&self, now: Instant) -> bool {
        self.at.is_none_or(|t| now >= t)
    }

    fn failed(&mut self, now: Instant) {
        self.at = Some(now + self.wait);
        self.wait = (self.wait * 2).min(REPROBE_MAX);
    }

    fn soon(&mut self, now: Instant) {
        self.at = Some(now + NARROWING);
        self.wait = REPROBE_MIN;
    }
}

/// Counters, for status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SizeStats {
    /// Size probes sent.
    pub probes: u64,
    /// Size probes that failed.
    pub probe_failures: u64,
    /// Times a size stepped down.
    pub fallbacks: u64,
}

/// What status shows of the sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizesInfo {
    /// The longest query name in use (characters, no trailing dot).
    pub max_name_len: usize,
    /// The user's cap on query names.
    pub name_cap: usize,
    /// Bytes of the payload option per query (0: not used).
    pub option_len: usize,
    /// The largest answer asked for.
    pub down: usize,
    /// The EDNS0 size advertised (`None`: without EDNS0, 512 bytes).
    pub edns: Option<u16>,
    /// The largest answer received lately.
    pub largest_answer: usize,
    /// Counters.
    pub stats: SizeStats,
}

/// The sizes: see the module docs.
#[derive(Clone, Debug)]
pub struct Sizes {
    /// The user's cap, and the least length that carries anything.
    user_cap: usize,
    min_len: usize,
    name_len: usize,
    /// Longest name answered at the current cap; shortest known to fail.
    name_good: usize,
    name_bad: Option<usize>,
    name_probe: Schedule,
    down: u16,
    /// The least answer size that failed (no probe of it or above until
    /// its schedule says).
    down_bad: Option<u16>,
    down_probe: Schedule,
    option: OptionState,
    option_probe: Schedule,
    largest_answer: usize,
    stats: SizeStats,
}

impl Sizes {
    /// The sizes of a path to `domain`, names capped at `user_cap`
    /// characters (`None`: 253).
    pub fn new(domain: &Domain, user_cap: Option<usize>) -> Self {
        let min_len = (0..=MAX_NAME_LEN)
            .find(|&n| domain.upstream_capacity(n) >= MIN_PAYLOAD)
            .unwrap_or(MAX_NAME_LEN);
        let user_cap = user_cap
            .unwrap_or(MAX_NAME_LEN)
            .clamp(min_len, MAX_NAME_LEN);
        Self {
            user_cap,
            min_len,
            name_len: user_cap,
            name_good: 0,
            name_bad: None,
            name_probe: Schedule::NOW,
            down: EDNS_SIZE,
            down_bad: None,
            down_probe: Schedule::NOW,
            option: OptionState::Unknown,
            option_probe: Schedule::NOW,
            largest_answer: 0,
            stats: SizeStats::default(),
        }
    }

    /// The longest name answered at the current cap.
    pub fn known_good(&self) -> usize {
        self.name_good
    }

    /// The least name length that carries a fragment under the domain.
    pub fn min_name_len(&self) -> usize {
        self.min_len
    }

    /// The longest query name in use.
    pub fn name_len(&self) -> usize {
        self.name_len
    }

    /// The largest answer to ask for.
    pub fn down(&self) -> usize {
        usize::from(self.down)
    }

    /// The EDNS0 size to advertise (`None`: none, answers of 512 bytes).
    pub fn edns(&self) -> Option<u16> {
        (self.down > CLASSIC_SIZE as u16).then_some(self.down)
    }

    /// Payload option bytes a query carries (0: none).
    pub fn option_len(&self) -> usize {
        if self.option == OptionState::Works {
            OPTION_LEN
        } else {
            0
        }
    }

    /// Upstream payload bytes (header included) a query carries in its
    /// name in `encoding`.
    pub fn name_capacity(&self, domain: &Domain, encoding: NameEncoding) -> usize {
        domain.upstream_capacity_as(self.name_len, encoding)
    }

    /// What status shows.
    pub fn info(&self) -> SizesInfo {
        SizesInfo {
            max_name_len: self.name_len,
            name_cap: self.user_cap,
            option_len: self.option_len(),
            down: self.down(),
            edns: self.edns(),
            largest_answer: self.largest_answer,
            stats: self.stats,
        }
    }

    /// A query with a name of `name_len` characters was answered (an
    /// answer of `answer_len` bytes).
    pub fn answered(&mut self, name_len: usize, answer_len: usize) {
        if name_len <= self.name_len {
            self.name_good = self.name_good.max(name_len);
        }
        self.largest_answer = self.largest_answer.max(answer_len);
    }

    /// A query with a name of `name_len` characters failed (or vanished)
    /// while shorter ones are answered: lower the cap below it, halfway to
    /// the longest name known to work. Whether the cap moved.
    pub fn long_failed(&mut self, now: Instant, name_len: usize) -> bool {
        if name_len <= self.name_good || name_len > self.name_len {
            return false; // not this cap's failure, or one known to pass
        }
        self.name_bad = Some(self.name_bad.map_or(name_len, |b| b.min(name_len)));
        let good = self.name_good.max(self.min_len);
        self.name_len = ((good + name_len) / 2).clamp(self.min_len, name_len - 1);
        self.name_good = 0;
        self.name_probe.soon(now);
        self.stats.fallbacks += 1;
        true
    }

    /// An answer to a query asking `down` bytes came truncated: answers of
    /// that size do not pass. Whether the size stepped down.
    pub fn truncated(&mut self, now: Instant, down: usize) -> bool {
        self.down_failed(now, down)
    }

    /// FORMERR or NOTIMP to a short query with EDNS0 of `down` bytes: the
    /// path does not take EDNS0 (or that size). Whether it stepped down.
    pub fn edns_refused(&mut self, now: Instant, down: usize) -> bool {
        self.down_failed(now, down)
    }

    fn down_failed(&mut self, now: Instant, down: usize) -> bool {
        if down > self.down() || self.down() <= CLASSIC_SIZE {
            return false; // an older query's, of a size left already
        }
        let below = DOWN_SIZES.iter().rev().find(|&&s| usize::from(s) < down);
        let Some(&below) = below else { return false };
        self.down_bad = Some(self.down);
        self.down = below;
        self.down_probe.failed(now);
        self.stats.fallbacks += 1;
        true
    }

    /// The path went silent though it still answers a minimal query: step
    /// down the newest size beyond the basics (the option, answers beyond
    /// 1232, EDNS0, then the name length). Whether one stepped.
    pub fn silent_step(&mut self, now: Instant) -> bool {
        if self.option == OptionState::Works {
            self.option = OptionState::Fails;
            self.option_probe.failed(now);
        } else if self.down > CLASSIC_SIZE as u16 {
            return self.down_failed(now, self.down());
        } else if self.name_len > self.min_len {
            let len = self.name_len;
            self.name_good = self.name_good.min(len - 1);
            return self.long_failed(now, len);
        } else {
            return false;
        }
        self.stats.fallbacks += 1;
        true
    }

    /// The size probe due now, if any (the caller sends one at a time).
    pub fn probe_due(&self, now: Instant) -> Option<Probe> {
        if self.option == OptionState::Unknown && self.option_probe.due(now)
            || self.option == OptionState::Fails && self.option_probe.due(now)
        {
            return Some(Probe::Option(OPTION_LEN));
        }
        if let Some(&up) = DOWN_SIZES.iter().find(|&&s| s > self.down)
            && self.down_probe.due(now)
        {
            return Some(Probe::Down(up));
        }
        if self.name_len < self.user_cap && self.name_probe.due(now) {
            let target = match self.name_bad {
                Some(bad) if bad > self.name_len + NARROW_ENOUGH => (self.name_len + bad) / 2,
                Some(bad) => bad.min(self.user_cap),
                None => self.user_cap,
            };
            return Some(Probe::NameLen(target));
        }
        None
    }

    /// A probe went out.
    pub fn probe_sent(&mut self) {
        self.stats.probes += 1;
    }

    /// A probe's answer came, of `answer_len` bytes; `option_read`: the
    /// server read the query's payload option; `name_len`: the probe's
    /// actual name length.
    pub fn probe_answered(
        &mut self,
        now: Instant,
        probe: Probe,
        name_len: usize,
        answer_len: usize,
        option_read: bool,
    ) {
        match probe {
            Probe::Option(_) if option_read => {
                self.option = OptionState::Works;
                self.option_probe = Schedule::NOW;
            }
            Probe::Option(_) => {
                // The path strips options: through a resolver, for good.
                self.option = OptionState::Fails;
                self.option_probe.at = Some(now + REPROBE_MAX);
                self.stats.probe_failures += 1;
            }
            // A resolver relays at most its own EDNS0 size: an answer well
            // short of the size asked says going up gains nothing.
            Probe::Down(size) if answer_len + DOWN_SLACK < size.into() => {
                self.largest_answer = self.largest_answer.max(answer_len);
                self.down_probe.at = Some(now + REPROBE_MAX);
                self.stats.probe_failures += 1;
            }
            Probe::Down(size) => {
                self.largest_answer = self.largest_answer.max(answer_len);
                self.down = self.down.max(size);
                self.down_bad = self.down_bad.filter(|&b| b > size);
                self.down_probe.soon(now);
            }
            Probe::NameLen(_) => {
                if name_len > self.name_len {
                    self.name_len = name_len.min(self.user_cap);
                    self.name_good = name_len;
                }
                if self.name_bad.is_some_and(|b| b <= name_len) {
                    self.name_bad = None;
                }
                self.name_probe.soon(now);
            }
        }
    }

    /// A probe failed (timed out, or an error answer).
    pub fn probe_failed(&mut self, now: Instant, probe: Probe, name_len: usize) {
        self.stats.probe_failures += 1;
        match probe {
            Probe::Option(_) => {
                self.option = OptionState::Fails;
                self.option_probe.failed(now);
            }
            Probe::Down(size) => {
                self.down_bad = Some(self.down_bad.map_or(size, |b| b.min(size)));
                self.down_probe.failed(now);
            }
            Probe::NameLen(_) => {
                self.name_bad = Some(self.name_bad.map_or(name_len, |b| b.min(name_len)));
                // Narrowing goes on at once while the gap is wide.
                if name_len > self.name_len + NARROW_ENOUGH {
                    self.name_probe.soon(now);
                } else {
                    self.name_probe.failed(now);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain() -> Domain {
        Domain::new("t.example.com").unwrap()
    }

    /// Run as a path that passes names of at most `limit` characters
    /// would: data queries at the cap vanish above it; probes are answered
    /// or fail (all other probes fail).
    fn settle(s: &mut Sizes, limit: usize, mut now: Instant) -> Instant {
        for _ in 0..64 {
            now += NARROWING;
            let cap = s.name_len();
            if cap > limit {
                s.long_failed(now, cap);
            } else {
                s.answered(cap, 100);
            }
            match s.probe_due(now) {
                Some(p @ Probe::NameLen(n)) if n <= limit => {
                    s.probe_answered(now, p, n, 100, false)
                }
                Some(p @ Probe::NameLen(n)) => s.probe_failed(now, p, n),
                Some(p) => s.probe_failed(now, p, 0),
                None => {}
            }
        }
        now
    }

    #[test]
    fn a_name_cap_is_found_in_halves_and_kept() {
        let d = domain();
        let mut s = Sizes::new(&d, None);
        let t0 = Instant::now();
        assert_eq!(s.name_len(), 253);
        // Polls of 40 characters pass; a data query of 253 vanishes.
        s.answered(40, 100);
        assert!(s.long_failed(t0, 253));
        // Halfway between what passes (the polls, or the least useful
        // length) and what failed.
        assert_eq!(s.name_len(), (40usize.max(s.min_name_len()) + 253) / 2);
        assert!(!s.long_failed(t0, 253), "an older query's failure");
        let now = settle(&mut s, 100, t0);
        // Within the narrowing step of the real limit, never above it.
        assert!((92..=100).contains(&s.name_len()), "{}", s.name_len());
        assert!(s.info().stats.probes == 0, "the caller counts probes sent");
        // The path heals: the user's cap comes back at a later probe.
        let later = now + REPROBE_MAX;
        assert_eq!(s.probe_due(later), Some(Probe::Option(OPTION_LEN)));
        s.probe_failed(later, Probe::Option(OPTION_LEN), 0);
        match s.probe_due(later) {
            Some(Probe::Down(MAX_DOWN)) => s.probe_failed(later, Probe::Down(MAX_DOWN), 0),
            other => panic!("{other:?}"),
        }
        let p = s.probe_due(later).expect("a name probe");
        let Probe::NameLen(n) = p else {
            panic!("{p:?}")
        };
        s.probe_answered(later, p, n, 100, false);
        settle(&mut s, 253, later);
        assert_eq!(s.name_len(), 253);
    }

    #[test]
    fn the_users_cap_bounds_everything() {
        let d = domain();
        let mut s = Sizes::new(&d, Some(72));
        assert_eq!(s.name_len(), 72);
        let now = settle(&mut s, 253, Instant::now());
        assert_eq!(s.name_len(), 72);
        assert!(!matches!(s.probe_due(now), Some(Probe::NameLen(_))));
        // Absurd caps are raised to the least that carries data.
        let s = Sizes::new(&d, Some(10));
        assert_eq!(s.name_len(), s.min_name_len());
        assert!(d.upstream_capacity(s.name_len()) >= MIN_PAYLOAD);
    }

    #[test]
    fn answers_step_down_on_truncation_and_up_on_a_whole_probe() {
        let d = domain();
        let mut s = Sizes::new(&d, None);
        let t0 = Instant::now();
        assert_eq!((s.down(), s.edns()), (1232, Some(1232)));
        assert!(s.truncated(t0, 1232));
        assert_eq!((s.down(), s.edns()), (512, None));
        assert!(!s.truncated(t0, 1232), "already down");
        // A probe of 1232 that arrives whole brings EDNS0 back.
        let later = t0 + REPROBE_MIN;
        s.probe_failed(later, Probe::Option(OPTION_LEN), 0);
        assert_eq!(s.probe_due(later), Some(Probe::Down(1232)));
        s.probe_answered(later, Probe::Down(1232), 30, 1232, false);
        assert_eq!(s.down(), 1232);
        // 4080 through a resolver that relays 1232: no gain, no change.
        let p = s.probe_due(later + NARROWING);
        assert_eq!(p, Some(Probe::Down(MAX_DOWN)));
        s.probe_answered(later, Probe::Down(MAX_DOWN), 30, 1232, false);
        assert_eq!(s.down(), 1232);
        assert!(!matches!(
            s.probe_due(later + REPROBE_MIN),
            Some(Probe::Down(_))
        ));
        // Straight to the server: a whole 4080-byte answer raises it.
        s.probe_answered(later, Probe::Down(MAX_DOWN), 30, 4080, false);
        assert_eq!((s.down(), s.edns()), (4080, Some(4080)));
    }

    #[test]
    fn the_option_is_used_only_where_the_server_reads_it() {
        let d = domain();
        let t0 = Instant::now();
        let mut s = Sizes::new(&d, None);
        assert_eq!(s.probe_due(t0), Some(Probe::Option(OPTION_LEN)));
        s.probe_answered(t0, Probe::Option(OPTION_LEN), 30, 100, false);
        assert_eq!(s.option_len(), 0);
        assert_ne!(s.probe_due(t0), Some(Probe::Option(OPTION_LEN)));
        let mut s = Sizes::new(&d, None);
        s.probe_answered(t0, Probe::Option(OPTION_LEN), 30, 100, true);
        assert_eq!(s.option_len(), OPTION_LEN);
        // Silence: the option goes first, then big answers, EDNS0, names.
        assert!(s.silent_step(t0));
        assert_eq!((s.option_len(), s.down()), (0, 1232));
        assert!(s.silent_step(t0));
        assert_eq!((s.down(), s.name_len()), (512, 253));
        assert!(s.silent_step(t0));
        assert!(s.name_len() < 253);
    }
}

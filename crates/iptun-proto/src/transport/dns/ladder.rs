//! What a DNS path carries besides sizes: the upstream encoding (base32,
//! or base128 once probed) and the record type of the answers, on a ladder
//! from the densest to what passes nearly everywhere.
//!
//! Encoding: names start in base32, which always works. After
//! [`PROBE_AFTER`] answers in a row the next query goes out in base128
//! (7 bits per character, 8-bit label bytes): a data answer to it (the
//! server decoded it) switches upstream to base128; anything else (an error
//! code, NODATA, a timeout, a mangled name) keeps base32, and base128 is
//! tried again after [`REPROBE_MIN`], doubling up to [`REPROBE_MAX`].
//!
//! Record types ([`AnswerType`], most preferred first: NULL, TXT, CNAME,
//! MX, SRV, AAAA, A): it starts on TXT. After [`PROBE_AFTER`] answers in a
//! row, one query (never the base128 probe) asks for the most preferred type
//! above the one in use that is not backing off; an answer of that type
//! whose fragments all parse switches to it, anything else backs that type
//! off ([`REPROBE_MIN`] doubling up to [`REPROBE_MAX`]). [`TYPE_FAILURES`]
//! failures in a row of the type in use step it down to the next type below
//! that is not backing off, so a path that filters TXT still works and one
//! that loses NULL falls back to TXT until a probe finds NULL again.

use std::time::{Duration, Instant};

use crate::wire::dns::{AnswerType, NameEncoding};

/// Answers in a row before base128, or a better record type, is probed.
pub const PROBE_AFTER: u32 = 8;
/// Failures in a row of the record type in use (REFUSED, NOTIMP, NODATA, a
/// garbled answer...) that step it down the ladder.
pub const TYPE_FAILURES: u32 = 3;
/// First wait before a failed encoding or type is probed again.
pub const REPROBE_MIN: Duration = Duration::from_secs(30);
/// Longest wait between probes.
pub const REPROBE_MAX: Duration = Duration::from_secs(600);

/// Counters, for status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LadderStats {
    /// Queries sent in base128 to probe the path.
    pub encoding_probes: u64,
    /// Base128 probes that failed.
    pub encoding_failures: u64,
    /// Queries sent with a better record type to probe the path.
    pub type_probes: u64,
    /// Record type probes that failed.
    pub type_probe_failures: u64,
    /// Times the record type stepped down the ladder.
    pub type_fallbacks: u64,
}

/// Encoding and record type: see the module docs.
#[derive(Clone, Debug)]
pub struct Ladder {
    encoding: NameEncoding,
    /// Base128 answered its last probe (and failed none since).
    base128_ok: bool,
    /// The base128 probe in flight (its DNS id).
    encoding_probe: Option<u16>,
    /// No base128 probe before then (the last one failed).
    encoding_retry_at: Option<Instant>,
    encoding_wait: Duration,
    rtype: AnswerType,
    /// The record type probe in flight: its DNS id and the type.
    type_probe: Option<(u16, AnswerType)>,
    /// Per type (in [`AnswerType::ALL`] order): no probe before then, and
    /// the wait after its next failure.
    type_retry_at: [Option<Instant>; 7],
    type_wait: [Duration; 7],
    /// Failures in a row of the type in use.
    type_failures_in_row: u32,
    stats: LadderStats,
}

impl Default for Ladder {
    fn default() -> Self {
        Self {
            encoding: NameEncoding::Base32,
            base128_ok: false,
            encoding_probe: None,
            encoding_retry_at: None,
            encoding_wait: REPROBE_MIN,
            rtype: AnswerType::Txt,
            type_probe: None,
            type_retry_at: [None; 7],
            type_wait: [REPROBE_MIN; 7],
            type_failures_in_row: 0,
            stats: LadderStats::default(),
        }
    }
}

impl Ladder {
    /// The encoding in use.
    pub fn encoding(&self) -> NameEncoding {
        self.encoding
    }

    /// Whether base128 names may be sent (in use, or probed fine lately).
    pub fn base128_ok(&self) -> bool {
        self.base128_ok
    }

    /// The record type in use.
    pub fn rtype(&self) -> AnswerType {
        self.rtype
    }

    /// The counters.
    pub fn stats(&self) -> LadderStats {
        self.stats
    }

    /// Whether the next query may probe base128, after `good_in_row`
    /// answers in a row.
    pub fn encoding_probe_due(&self, now: Instant, good_in_row: u32) -> bool {
        self.encoding == NameEncoding::Base32
            && self.encoding_probe.is_none()
            && good_in_row >= PROBE_AFTER
            && self.encoding_retry_at.is_none_or(|t| now >= t)
    }

    /// The base128 probe went out as `id`.
    pub fn encoding_probe_sent(&mut self, id: u16) {
        self.encoding_probe = Some(id);
        self.stats.encoding_probes += 1;
    }

    /// Whether `id` is the base128 probe; it is no longer in flight after.
    pub fn take_encoding_probe(&mut self, id: u16) -> bool {
        let is = self.encoding_probe == Some(id);
        if is {
            self.encoding_probe = None;
        }
        is
    }

    /// The base128 probe was answered with data: base128 from now on.
    pub fn encoding_works(&mut self) {
        self.encoding = NameEncoding::Base128;
        self.base128_ok = true;
        self.encoding_wait = REPROBE_MIN;
        self.encoding_retry_at = None;
    }

    /// Base128 failed (a probe, or names the server could not read): base32
    /// until the next try.
    pub fn encoding_failed(&mut self, now: Instant) {
        self.stats.encoding_failures += 1;
        self.encoding = NameEncoding::Base32;
        self.base128_ok = false;
        self.encoding_probe = None;
        self.encoding_retry_at = Some(now + self.encoding_wait);
        self.encoding_wait = (self.encoding_wait * 2).min(REPROBE_MAX);
    }

    /// Back to base32 for a fallback elsewhere (no probe counted as failed).
    pub fn back_to_base32(&mut self) {
        self.encoding = NameEncoding::Base32;
        self.encoding_probe = None;
    }

    /// The type to probe with the next query (not the base128 probe), if
    /// one is due: the most preferred type above the one in use that is not
    /// backing off.
    pub fn type_to_probe(&self, now: Instant, good_in_row: u32) -> Option<AnswerType> {
        if self.type_probe.is_some() || good_in_row < PROBE_AFTER {
            return None;
        }
        let above = &AnswerType::ALL[..type_index(self.rtype)];
        above
            .iter()
            .copied()
            .find(|&t| self.type_retry_at[type_index(t)].is_none_or(|at| now >= at))
    }

    /// A type probe went out as `id`.
    pub fn type_probe_sent(&mut self, id: u16, t: AnswerType) {
        self.type_probe = Some((id, t));
        self.stats.type_probes += 1;
    }

    /// The type `id` probed, if it is the type probe (no longer in flight).
    pub fn take_type_probe(&mut self, id: u16) -> Option<AnswerType> {
        let (p, t) = self.type_probe?;
        (p == id).then(|| {
            self.type_probe = None;
            t
        })
    }

    /// A probe's answer came back intact: `t` from now on.
    pub fn switch_type(&mut self, t: AnswerType) {
        let i = type_index(t);
        self.type_retry_at[i] = None;
        self.type_wait[i] = REPROBE_MIN;
        if type_index(t) < type_index(self.rtype) {
            self.rtype = t;
            self.type_failures_in_row = 0;
        }
    }

    /// A probe of `t` failed.
    pub fn type_probe_failed(&mut self, now: Instant, t: AnswerType) {
        self.stats.type_probe_failures += 1;
        self.hold_off_type(now, t);
    }

    /// The type in use carried an answer.
    pub fn type_works(&mut self) {
        self.type_failures_in_row = 0;
    }

    /// The type in use failed once more; after [`TYPE_FAILURES`] in a row,
    /// step down the ladder.
    pub fn type_failed(&mut self, now: Instant) {
        self.type_failures_in_row += 1;
        if self.type_failures_in_row >= TYPE_FAILURES {
            self.step_type_down(now);
        }
    }

    /// Whether the type in use is above TXT (a probed one, which a path
    /// may drop silently).
    pub fn above_txt(&self) -> bool {
        type_index(self.rtype) < type_index(AnswerType::Txt)
    }

    /// To the next type down the ladder not backing off (or just the next
    /// one), the failed type backing off. Whether there was one below.
    pub fn step_type_down(&mut self, now: Instant) -> bool {
        self.type_failures_in_row = 0;
        self.hold_off_type(now, self.rtype);
        let below = &AnswerType::ALL[type_index(self.rtype) + 1..];
        let next = below
            .iter()
            .find(|&&t| self.type_retry_at[type_index(t)].is_none_or(|at| now >= at))
            .or(below.first());
        let Some(&t) = next else { return false };
        self.rtype = t;
        self.stats.type_fallbacks += 1;
        true
    }

    /// No probe of `t` for a while, longer each time.
    fn hold_off_type(&mut self, now: Instant, t: AnswerType) {
        let i = type_index(t);
        self.type_retry_at[i] = Some(now + self.type_wait[i]);
        self.type_wait[i] = (self.type_wait[i] * 2).min(REPROBE_MAX);
    }
}

/// The position of `t` on the ladder ([`AnswerType::ALL`]).
fn type_index(t: AnswerType) -> usize {
    AnswerType::ALL
        .iter()
        .position(|&x| x == t)
        .expect("every type is on the ladder")
}

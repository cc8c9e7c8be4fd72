//! Congestion control for paths that carry requests, each answered at most
//! once by the far end: ICMP echo requests, DNS queries. Generic over what
//! it paces: the transport tells it what happened to its requests, it says
//! how fast the next ones may go and how many may be in flight.
//!
//! Such paths are limited less by a link than by whatever sits on them: a
//! firewall that passes a few hundred echo requests a second and silently
//! drops the rest, a resolver that serves a client so many queries a
//! second. Sending faster than that only loses requests, and a burst loses
//! most of itself: so requests go *paced*, evenly spaced at a rate, and the
//! rate follows what the path delivers.
//!
//! # The control law
//!
//! The rate (requests a second) is spent from a token bucket a couple of
//! requests (or two milliseconds) deep. It is judged in *rounds*: the
//! requests sent in one interval (twice the smoothed round trip, at least
//! [`MIN_ROUND`]). A round is judged when the outcome of a request sent
//! after it arrives, and once it holds enough outcomes ([`MIN_OUTCOMES`];
//! else it grows, up to [`MAX_ROUND`]).
//!
//! - **Congestion**: the round lost clearly more than the path's usual
//!   share (more than two standard deviations, two requests and two percent
//!   beyond its base loss), or round trips show a standing queue (well
//!   above the path's minimum, [`DELAY_SAMPLES`] in a row; acted on at
//!   once, not at the end of the round, whose outcomes come late behind
//!   the queue while it grows). The rate drops to [`BETA`] of itself (half
//!   after a queue in slow start), or, for a loss in a round that sent at
//!   its rate all along, to 95 % of what the round delivered if that is
//!   less: a rate limiter tells its rate exactly, and one step lands just
//!   below it. A round that did not use its rate lost requests to bursts
//!   at that rate: what it delivered is only what it was asked; the rate
//!   drops by the share lost (a long enough burst loses what its rate
//!   exceeds the path's by), at least by half, down to what was delivered
//!   at most. Outcomes of requests sent before a reduction do not count
//!   against the reduced rate. Losses must show soon (within a round
//!   trip or two): a round is judged once its requests' answers came.
//! - **Loss is not always congestion**: a lossy radio link or a firewall
//!   that drops a share of requests loses them whatever the rate. The first
//!   round sent after a reduction tells (it waits longer for enough
//!   outcomes): a loss that stays as high at the lower rate, sent evenly at
//!   that rate all along, is the path's *base loss*; the reduction is
//!   undone, and only loss beyond the base counts from then on.
//! - **Reordering is not loss**: an outcome may be reported lost and then
//!   found after all ([`Controller::on_late`]); it is taken back from the
//!   round's count.
//! - **Growth**: when a round was limited by the pacing (requests waited,
//!   or it sent at 80 % of the rate or more), the rate doubles (slow start,
//!   until the first congestion or until the round trip starts to grow),
//!   then grows by [`GROWTH`] (or doubles again while below half of what
//!   the path delivered lately: after an outage, up to below its limit).
//!   Near the *limit*, what a round that lost at a rate sent evenly all
//!   along delivered (up to [`LIMIT_MARGIN`] above it), it grows by an
//!   eighth of that: a rate limiter is probed gently, and loses little
//!   (reported late, losses cost it more than a slower climb would). A
//!   round that did not use
//!   its rate leaves
//!   it: an idle path builds up no claim to a rate it never tried. After
//!   any change a new round starts: outcomes of requests sent before show
//!   nothing of the new rate (and come late where the far end holds
//!   requests: growing again before they show the last growth would
//!   overshoot).
//! - **Rejection** (the far end said it will not serve: a DNS resolver's
//!   SERVFAIL or REFUSED, overloaded or failing upstream): never melt it.
//!   Nothing goes for a back-off, [`BACKOFF_MIN`] doubling with every
//!   rejection of a request sent after the last one, without an answer in
//!   between, up to [`BACKOFF_MAX`]; rejections of requests sent before
//!   the last one belong to the same burst. An answer ends the back-off.
//!   The rate stays: a rejection tells that the far end would not serve
//!   a request (a record type it refuses, a name too long, an upstream
//!   that fails), seldom that requests came too fast; a far end that
//!   refuses all it gets waits ever longer, and the pauses bound a rate
//!   limiter that refuses the excess (as loss would).
//! - **Window**: requests in flight may be twice what the rate carries in a
//!   smoothed round trip, plus a floor; the transport bounds it (a server
//!   holds so many requests, a resolver should not see thousands). The
//!   transport checks it; [`Controller::can_send`] only paces.
//! - **Timeouts**: the transport decides when a request is lost;
//!   [`Controller::rto`] is the usual guess (the smoothed round trip and
//!   four deviations, at least [`MIN_RTO`]).
//!
//! Nothing caps the rate but the path (and a sanity bound, [`MAX_RATE`]).
//! Round trips must be true ones: a transport whose far end holds requests
//! (poll transports) reports a round trip without the hold, or none (a DNS
//! answer the server held carries none).

use std::time::{Duration, Instant};

/// A round lasts at least this long.
pub const MIN_ROUND: Duration = Duration::from_millis(10);
/// A round that gathers too few outcomes is judged anyway after this long.
pub const MAX_ROUND: Duration = Duration::from_secs(2);
/// Outcomes (delivered or lost) a round needs to judge loss; fewer can
/// only tell a heavy loss ([`HEAVY_LOSS`] of at least [`MIN_HEAVY`]).
pub const MIN_OUTCOMES: u64 = 64;
/// A loss share judged even in a round with few outcomes.
pub const HEAVY_LOSS: f64 = 0.5;
/// The fewest outcomes that can tell a heavy loss.
pub const MIN_HEAVY: u64 = 8;
/// The rate after a congestion, as a share of the rate before.
pub const BETA: f64 = 0.85;
/// The most one reduction takes: the rate keeps at least this share.
pub const MAX_CUT: f64 = 0.25;
/// Growth per round after slow start.
pub const GROWTH: f64 = 0.05;
/// Up to this much above a limit the path showed, growth is an eighth of
/// [`GROWTH`].
pub const LIMIT_MARGIN: f64 = 1.05;
/// What the path delivered lately fades by this per round: far below it
/// (half), the rate grows back by doubling.
pub const PEAK_DECAY: f64 = 0.98;
/// A sanity bound on the rate (requests a second), not a limit any path
/// should meet.
pub const MAX_RATE: f64 = 10_000_000.0;
/// The most loss taken as the path's own (not the rate's): beyond, loss
/// counts as congestion whatever the rate.
pub const MAX_BASE_LOSS: f64 = 0.25;
/// A queue this long (beyond the minimum round trip, and beyond the
/// minimum itself) is congestion.
pub const QUEUE_DELAY: Duration = Duration::from_millis(25);
/// Slow start ends when round trips are this much (or a quarter) above the
/// minimum, [`DELAY_SAMPLES`] in a row: a queue begins to build.
pub const SLOW_START_DELAY: Duration = Duration::from_millis(4);
/// Round trips in a row that must show a queue (one alone may be jitter).
pub const DELAY_SAMPLES: u32 = 8;
/// How long the minimum round trip is remembered: paths change.
pub const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// The pacing bucket holds this much time's worth of requests (and at
/// least [`MIN_BURST`]): timers fire late, drivers send in batches.
pub const BURST_TIME: Duration = Duration::from_millis(2);
/// The smallest pacing bucket, in requests.
pub const MIN_BURST: f64 = 2.0;
/// The first back-off after a rejection.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The longest back-off.
pub const BACKOFF_MAX: Duration = Duration::from_secs(8);
/// The least [`Controller::rto`].
pub const MIN_RTO: Duration = Duration::from_millis(200);

/// What a controller starts from and stays within.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    /// Requests a second before anything is known of the path.
    pub initial_rate: f64,
    /// The slowest rate: keepalives must get through.
    pub min_rate: f64,
    /// The smallest window.
    pub min_window: usize,
    /// The largest window (what the far end can hold).
    pub max_window: usize,
    /// The round trip assumed until one is measured.
    pub initial_rtt: Duration,
}

/// What a controller shows: its state and what it was told.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CongestionStats {
    /// The pacing rate, requests a second.
    pub rate: f64,
    /// Requests in flight allowed.
    pub window: usize,
    /// The smoothed round trip, once measured.
    pub srtt: Option<Duration>,
    /// The smallest recent round trip.
    pub min_rtt: Option<Duration>,
    /// Still doubling (no congestion seen yet).
    pub slow_start: bool,
    /// The share of requests the path loses whatever the rate.
    pub base_loss: f64,
    /// Requests reported sent.
    pub sent: u64,
    /// Requests reported delivered.
    pub delivered: u64,
    /// Requests reported lost (net of those found late).
    pub lost: u64,
    /// Times the rate was reduced (rejections included).
    pub reductions: u64,
    /// Of those, for a standing queue (round trips well above the least).
    pub queue_reductions: u64,
    /// Requests the far end refused (not in `lost`).
    pub rejections: u64,
    /// The back-off after the last rejection (zero once answered).
    pub backoff: Duration,
}

/// The requests sent in one interval, and what became of them.
#[derive(Clone, Copy, Debug)]
struct Round {
    /// Requests sent from here...
    start: Instant,
    /// ...to here belong to it.
    end: Instant,
    sent: u64,
    delivered: u64,
    /// Net of requests found late; may dip below zero when a late one was
    /// counted lost in an earlier round.
    lost: i64,
    /// A request waited for the pacing.
    blocked: bool,
    /// The fastest round trip measured while it was being judged.
    min_rtt: Option<Duration>,
    /// The send time of the latest request whose outcome it counted.
    latest: Instant,
}

impl Round {
    fn new(start: Instant, len: Duration) -> Self {
        Self {
            start,
            end: start + len,
            sent: 0,
            delivered: 0,
            lost: 0,
            blocked: false,
            min_rtt: None,
            latest: start,
        }
    }

    fn lost(&self) -> u64 {
        self.lost.max(0) as u64
    }

    fn outcomes(&self) -> u64 {
        self.delivered + self.lost()
    }

    fn loss(&self) -> f64 {
        match self.outcomes() {
            0 => 0.0,
            n => self.lost() as f64 / n as f64,
        }
    }

    /// What it delivered, over the time its requests were sent in (not
    /// the time their outcomes came in: where the far end holds requests,
    /// that tells how long it held them); `None` over too short a time.
    fn delivery_rate(&self) -> Option<f64> {
        let sending = self.latest.saturating_duration_since(self.start);
        (sending >= MIN_ROUND).then(|| self.delivered as f64 / sending.as_secs_f64())
    }
}

/// The smallest round trip of the last [`MIN_RTT_WINDOW`] (Kathleen
/// Nichols' windowed filter, as Linux's `minmax`: the best, second-best and
/// third-best samples of successive parts of the window, so that when the
/// best one ages out a recent one takes over, not just the latest).
#[derive(Clone, Copy, Debug, Default)]
struct MinFilter {
    best: [Option<(Duration, Instant)>; 3],
}

impl MinFilter {
    fn get(&self) -> Option<Duration> {
        self.best[0].map(|(d, _)| d)
    }

    fn update(&mut self, now: Instant, rtt: Duration) {
        let sample = Some((rtt, now));
        let age = |s: Option<(Duration, Instant)>| {
            s.map_or(Duration::MAX, |(_, at)| now.saturating_duration_since(at))
        };
        let value = |s: Option<(Duration, Instant)>| s.map_or(Duration::MAX, |(d, _)| d);
        if rtt <= value(self.best[0]) || age(self.best[2]) > MIN_RTT_WINDOW {
            self.best = [sample; 3];
            return;
        }
        if rtt <= value(self.best[1]) {
            self.best[1] = sample;
            self.best[2] = sample;
        } else if rtt <= value(self.best[2]) {
            self.best[2] = sample;
        }
        let at = |s: Option<(Duration, Instant)>| s.map(|(_, t)| t);
        let dt = age(self.best[0]);
        if dt > MIN_RTT_WINDOW {
            self.best = [self.best[1], self.best[2], sample];
            if age(self.best[0]) > MIN_RTT_WINDOW {
                self.best = [self.best[1], self.best[2], sample];
            }
        } else if at(self.best[1]) == at(self.best[0]) && dt > MIN_RTT_WINDOW / 4 {
            self.best[1] = sample;
            self.best[2] = sample;
        } else if at(self.best[2]) == at(self.best[1]) && dt > MIN_RTT_WINDOW / 2 {
            self.best[2] = sample;
        }
    }
}

/// Why the rate drops.
#[derive(Clone, Copy, Debug)]
enum Congestion {
    /// A standing queue.
    Queue,
    /// Loss in a round that sent at its rate all along, which `delivered`
    /// requests a second.
    Loss { delivered: Option<f64>, loss: f64 },
    /// Loss in a round that did not use its rate, but for bursts: at the
    /// pacing rate, they were too fast for the path.
    BurstLoss { delivered: Option<f64>, loss: f64 },
}

/// A congestion controller: see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Controller {
    config: Config,
    rate: f64,
    /// Pacing credit, in requests (negative: requests sent ahead of it).
    tokens: f64,
    /// When `tokens` was last brought up to date.
    refilled: Instant,
    srtt: Option<Duration>,
    /// The smoothed deviation of round trips.
    rttvar: Duration,
    min_rtt: MinFilter,
    round: Round,
    /// Sends and waits after the round's end, for the next round.
    next_sent: u64,
    next_blocked: bool,
    slow_start: bool,
    base_loss: f64,
    /// The rate was reduced for a loss, and the first round after it is
    /// still to be judged: the rate before, and the loss share that made
    /// it go.
    reduced: Option<(f64, f64)>,
    /// When the rate last changed.
    changed_at: Instant,
    /// The most the path delivered in a round lately (decaying).
    peak: f64,
    /// What the path delivered in the last round that lost at a rate it
    /// sent evenly all along: its limit, probed gently.
    limit: Option<f64>,
    /// Round trips in a row, of requests sent since, that show a queue
    /// building up, and that show a standing queue.
    building: u32,
    queued: u32,
    /// The back-off after the last rejection (zero: none since an answer),
    /// and until when nothing goes.
    backoff: Duration,
    backoff_until: Option<Instant>,
    /// Rejections of requests sent before this belong to the last cut.
    rejected_at: Option<Instant>,
    stats: CongestionStats,
}

impl Controller {
    /// A controller for a path about which nothing is known yet.
    pub fn new(config: Config, now: Instant) -> Self {
        let rate = config.initial_rate.clamp(config.min_rate, MAX_RATE);
        let mut c = Self {
            config,
            rate,
            tokens: 0.0,
            refilled: now,
            srtt: None,
            rttvar: Duration::ZERO,
            min_rtt: MinFilter::default(),
            round: Round::new(now, MIN_ROUND),
            next_sent: 0,
            next_blocked: false,
            slow_start: true,
            base_loss: 0.0,
            reduced: None,
            changed_at: now,
            peak: 0.0,
            limit: None,
            building: 0,
            queued: 0,
            backoff: Duration::ZERO,
            backoff_until: None,
            rejected_at: None,
            stats: CongestionStats::default(),
        };
        c.tokens = c.burst();
        c.round = Round::new(now, c.round_len());
        c
    }

    /// Start afresh (a path back after a failure): slow start from the
    /// initial rate, no back-off; what it measured of round trips is kept.
    pub fn reset(&mut self, now: Instant) {
        let fresh = Self::new(self.config, now);
        *self = Self {
            srtt: self.srtt,
            rttvar: self.rttvar,
            min_rtt: self.min_rtt,
            stats: self.stats,
            ..fresh
        };
        self.stats.backoff = Duration::ZERO;
    }

    /// The pacing rate, requests a second.
    pub fn pacing_rate(&self) -> f64 {
        self.rate
    }

    /// The time between two requests at the pacing rate.
    pub fn pacing_interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.rate)
    }

    /// Requests in flight allowed: twice what the rate carries in a round
    /// trip, plus the floor, within the configured bounds.
    pub fn window(&self) -> usize {
        let rtt = self.srtt.unwrap_or(self.config.initial_rtt).as_secs_f64();
        let bdp = (2.0 * self.rate * rtt)
            .ceil()
            .min(self.config.max_window as f64) as usize;
        (self.config.min_window + bdp).clamp(self.config.min_window, self.config.max_window)
    }

    /// The smoothed round trip, once one was measured.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The smoothed deviation of round trips (zero before any).
    pub fn rttvar(&self) -> Duration {
        self.rttvar
    }

    /// The smallest recent round trip.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt.get()
    }

    /// After how long a request answered at once is likely lost: the
    /// smoothed round trip (or the initial guess) and four deviations
    /// (reordering shows as deviation), at least [`MIN_RTO`].
    pub fn rto(&self) -> Duration {
        let srtt = self.srtt.unwrap_or(self.config.initial_rtt);
        (srtt + self.rttvar * 4).max(MIN_RTO)
    }

    /// Whether a back-off after a rejection is under way at `now`.
    pub fn backing_off(&self, now: Instant) -> bool {
        self.backoff_until.is_some_and(|t| now < t)
    }

    /// Whether a request may go now (by the pacing and the back-off; the
    /// window is the transport's to check).
    pub fn can_send(&self, now: Instant) -> bool {
        !self.backing_off(now) && self.tokens_at(now) >= 1.0
    }

    /// When [`Controller::can_send`] holds (`now` if it does already).
    pub fn next_send_time(&self, now: Instant) -> Instant {
        let from = self.backoff_until.filter(|&t| t > now).unwrap_or(now);
        let missing = 1.0 - self.tokens_at(from);
        if missing <= 0.0 {
            return from;
        }
        // Rounded up to the nanosecond: at the time returned, it can.
        let wait = Duration::from_nanos((missing / self.rate * 1e9).ceil() as u64 + 1);
        from + wait
    }

    /// What it shows.
    pub fn stats(&self) -> CongestionStats {
        CongestionStats {
            rate: self.rate,
            window: self.window(),
            srtt: self.srtt,
            min_rtt: self.min_rtt(),
            slow_start: self.slow_start,
            base_loss: self.base_loss,
            ..self.stats
        }
    }

    /// A request went (paced or not: one the transport had to send at once
    /// is paid for by the next ones).
    pub fn on_sent(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens - 1.0).max(-self.burst());
        self.stats.sent += 1;
        if now < self.round.end {
            self.round.sent += 1;
        } else {
            self.next_sent += 1;
        }
    }

    /// A request had to wait for the pacing: the rate, not the demand,
    /// limits the path.
    pub fn on_blocked(&mut self, now: Instant) {
        if now < self.round.end {
            self.round.blocked = true;
        } else {
            self.next_blocked = true;
        }
    }

    /// A request sent at `sent_at` was answered; `rtt` is its round trip
    /// if it is a true one (without time the far end held it).
    pub fn on_answered(&mut self, now: Instant, sent_at: Instant, rtt: Option<Duration>) {
        if let Some(rtt) = rtt {
            self.on_rtt(now, sent_at, rtt);
        }
        self.on_delivered(now, sent_at, 1);
    }

    /// `count` requests, the latest sent at `sent_at`, reached the far end
    /// (and it answers again: no more back-off).
    pub fn on_delivered(&mut self, now: Instant, sent_at: Instant, count: u64) {
        self.end_backoff();
        self.stats.delivered += count;
        if self.outcome(now, sent_at) {
            self.round.delivered += count;
        }
    }

    /// `count` requests, the latest sent at `sent_at`, were lost.
    pub fn on_lost(&mut self, now: Instant, sent_at: Instant, count: u64) {
        self.stats.lost += count;
        if self.outcome(now, sent_at) {
            self.round.lost += count as i64;
        }
        if self.round.outcomes() >= MIN_HEAVY
            && self.round.loss() >= HEAVY_LOSS
            && self.round.outcomes() < MIN_OUTCOMES
        {
            // Heavy loss needs no more outcomes to be judged.
            if !self.judge(now) {
                self.next_round(now, now);
            }
        }
    }

    /// `count` requests reported lost arrived after all (reordering).
    pub fn on_late(&mut self, now: Instant, sent_at: Instant, count: u64) {
        self.end_backoff();
        self.stats.lost = self.stats.lost.saturating_sub(count);
        self.stats.delivered += count;
        if self.outcome(now, sent_at) {
            self.round.lost -= count as i64;
            self.round.delivered += count;
        }
    }

    /// The far end refused a request sent at `sent_at` (it is overloaded,
    /// rate-limits, or fails upstream): back off, once for the requests
    /// sent before this, longer each time without an answer in between.
    pub fn on_rejected(&mut self, now: Instant, sent_at: Instant) {
        self.stats.rejections += 1;
        if self.rejected_at.is_some_and(|t| sent_at < t) {
            return; // the same burst as the last rejection
        }
        self.rejected_at = Some(now);
        self.backoff = if self.backoff.is_zero() {
            BACKOFF_MIN
        } else {
            (self.backoff * 2).min(BACKOFF_MAX)
        };
        self.backoff_until = Some(now + self.backoff);
        self.stats.backoff = self.backoff;
    }

    /// A true round trip (without time the far end held the request) of
    /// a request sent at `sent_at`. Round trips that show a queue building
    /// up act at once, not at the end of the round: the round's outcomes
    /// come late behind that queue, and it grows meanwhile.
    pub fn on_rtt(&mut self, now: Instant, sent_at: Instant, rtt: Duration) {
        self.smooth(rtt);
        self.min_rtt.update(now, rtt);
        self.round.min_rtt = Some(self.round.min_rtt.map_or(rtt, |m| m.min(rtt)));
        let Some(min) = self.min_rtt() else { return };
        if sent_at < self.changed_at {
            return; // sent at another rate
        }
        let building = rtt > min + (min / 4).max(SLOW_START_DELAY);
        self.building = if building { self.building + 1 } else { 0 };
        if self.building >= DELAY_SAMPLES {
            // A queue begins to build: doubling would soon overfill it.
            self.slow_start = false;
        }
        let queued = rtt > min + min.max(QUEUE_DELAY);
        self.queued = if queued { self.queued + 1 } else { 0 };
        if self.queued >= DELAY_SAMPLES {
            self.reduce(now, Congestion::Queue);
        }
    }

    /// RFC 6298's smoothing of round trips and their deviation.
    fn smooth(&mut self, rtt: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(s) => {
                self.rttvar = (self.rttvar * 3 + s.abs_diff(rtt)) / 4;
                self.srtt = Some((s * 7 + rtt) / 8);
            }
        }
    }

    fn end_backoff(&mut self) {
        self.backoff = Duration::ZERO;
        self.backoff_until = None;
        self.stats.backoff = Duration::ZERO;
    }

    fn burst(&self) -> f64 {
        (self.rate * BURST_TIME.as_secs_f64()).max(MIN_BURST)
    }

    fn tokens_at(&self, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        (self.tokens + dt * self.rate).min(self.burst())
    }

    fn refill(&mut self, now: Instant) {
        self.tokens = self.tokens_at(now);
        self.refilled = self.refilled.max(now);
    }

    fn round_len(&self) -> Duration {
        let rtt = self.srtt.unwrap_or(self.config.initial_rtt);
        (rtt * 2).clamp(MIN_ROUND, MAX_ROUND)
    }

    /// An outcome of a request sent at `sent_at` arrived: whether it counts
    /// in the current round (outcomes of rounds already judged, or of
    /// requests sent before a reduction, do not). Closes the round first
    /// when the request was sent after it.
    fn outcome(&mut self, now: Instant, sent_at: Instant) -> bool {
        if sent_at < self.round.start {
            return false;
        }
        if sent_at >= self.round.end {
            let span = self.round.end.saturating_duration_since(self.round.start);
            // The round after a reduction must tell whether it helped: it
            // waits longer for enough outcomes.
            let patience = if self.reduced.is_some() {
                MAX_ROUND * 5
            } else {
                MAX_ROUND
            };
            if self.round.outcomes() >= MIN_OUTCOMES || span >= patience {
                if self.judge(now) {
                    // The rate changed: only requests sent from now on count.
                    return false;
                }
                self.next_round(self.round.end, sent_at);
            } else {
                // Too few outcomes to judge: the round grows to take this one.
                self.round.end = sent_at + self.round_len();
                self.round.sent += std::mem::take(&mut self.next_sent);
                self.round.blocked |= std::mem::take(&mut self.next_blocked);
            }
        }
        self.round.latest = self.round.latest.max(sent_at);
        true
    }

    /// Start the round after the current one at `start`, long enough to
    /// hold a request sent at `latest`.
    fn next_round(&mut self, start: Instant, latest: Instant) {
        let mut round = Round::new(start, self.round_len());
        if latest >= round.end {
            round.end = latest + self.round_len();
        }
        round.sent = std::mem::take(&mut self.next_sent);
        round.blocked = std::mem::take(&mut self.next_blocked);
        self.round = round;
    }

    /// The round is complete: reduce, learn the base loss, or grow.
    /// Whether the rate changed (then a new round starts now: outcomes of
    /// requests sent before show nothing of the new rate; they come later
    /// than a round trip where the far end holds requests, and growing
    /// again before they show the last growth would overshoot).
    fn judge(&mut self, now: Instant) -> bool {
        let r = self.round;
        let span = r.end.saturating_duration_since(r.start).as_secs_f64();
        let loss = r.loss();
        let outcomes = r.outcomes();
        let enough = outcomes >= MIN_OUTCOMES || (outcomes >= MIN_HEAVY && loss >= HEAVY_LOSS);
        let expected = self.base_loss * outcomes as f64;
        let lossy = enough
            && r.lost() as f64 > expected + 2.0 + 2.0 * expected.sqrt()
            && loss > self.base_loss + 0.02;
        let queued = match (r.min_rtt, self.min_rtt()) {
            (Some(fastest), Some(min)) => fastest > min + min.max(QUEUE_DELAY),
            _ => false,
        };
        // It sent at its rate all along (what it delivered is then what
        // the path carries), or requests waited for the pacing at times
        // (more rate would have helped).
        let used = span > 0.0 && r.sent as f64 >= 0.8 * self.rate * span;
        let limited = r.blocked || used;
        if let Some((before, trigger)) = self.reduced.take()
            && enough
        {
            // Every request of this round went at the reduced rate, evenly
            // (bursts at a rate still too high lose as much as before).
            // Still as lossy: the loss is the path's, not the rate's; the
            // reduction is undone.
            if used && lossy && !queued && loss >= trigger / 2.0 && loss < MAX_BASE_LOSS {
                self.base_loss = loss;
                self.stats.reductions -= 1;
                self.set_rate(before);
                self.restart(now);
                return true;
            }
        }
        if lossy || queued {
            let delivered = r.delivery_rate().filter(|_| enough);
            let why = match (queued, used) {
                (true, _) => Congestion::Queue,
                (false, true) => Congestion::Loss { delivered, loss },
                (false, false) => Congestion::BurstLoss { delivered, loss },
            };
            self.reduce(now, why);
            return true;
        }
        if enough {
            self.base_loss = (self.base_loss * 0.9 + loss * 0.1).min(MAX_BASE_LOSS);
            let delivered = r.delivery_rate().unwrap_or(0.0);
            self.peak = (self.peak * PEAK_DECAY).max(delivered);
        }
        if !limited {
            return false;
        }
        let grown = if self.slow_start {
            self.rate * 2.0
        } else if self.rate < self.peak / 2.0 {
            // Far below what the path delivered lately (after an outage, a
            // burst of loss): back quickly, up to below its limit.
            let below = self.limit.map_or(self.peak, |l| l * 0.95);
            (self.rate * 2.0).min(self.peak.min(below).max(self.rate))
        } else if self.limit.is_some_and(|l| self.rate < l * LIMIT_MARGIN) {
            // Near a limit the path showed: probe it gently.
            self.rate * (1.0 + GROWTH / 8.0)
        } else {
            self.rate * (1.0 + GROWTH)
        };
        self.set_rate(grown);
        self.restart(now);
        true
    }

    fn reduce(&mut self, now: Instant, why: Congestion) {
        let before = self.rate;
        let cut = self.rate * BETA;
        let (rate, loss) = match why {
            // Doubling overshot by up to half.
            Congestion::Queue if self.slow_start => (self.rate / 2.0, None),
            Congestion::Queue => (cut, None),
            // Just below what the path delivers.
            Congestion::Loss { delivered, loss } => {
                self.limit = delivered.or(self.limit);
                (delivered.map_or(cut, |d| cut.min(d * 0.95)), Some(loss))
            }
            // The pacing let bursts go too fast for the path; what the
            // round delivered is what it was asked, the least the path
            // carries.
            Congestion::BurstLoss { delivered, loss } => {
                // A burst long enough loses what its rate exceeds the
                // path's by: what is left of the rate is near the path's.
                let floor = delivered.map_or(0.0, |d| d * 0.95);
                let left = self.rate * (1.0 - loss);
                (left.max(floor).min(self.rate / 2.0), Some(loss))
            }
        };
        // One round's count can be tiny (a download's polls are held at
        // the far end, so few outcomes arrive while it lasts): never trust
        // it for more than a quarter of the rate in one step, or a single
        // loss sends a fast path to the floor for seconds.
        self.set_rate(rate.max(before * MAX_CUT));
        self.slow_start = false;
        self.stats.reductions += 1;
        if loss.is_none() {
            self.stats.queue_reductions += 1;
        }
        self.reduced = loss.map(|loss| (before, loss));
        self.restart(now);
    }

    /// A new round from now: requests sent before went at another rate.
    fn restart(&mut self, now: Instant) {
        self.round = Round::new(now, self.round_len());
        self.next_sent = 0;
        self.next_blocked = false;
        self.changed_at = now;
        self.building = 0;
        self.queued = 0;
    }

    fn set_rate(&mut self, rate: f64) {
        self.rate = rate.clamp(self.config.min_rate, MAX_RATE);
        self.tokens = self.tokens.min(self.burst());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    const CONFIG: Config = Config {
        initial_rate: 100.0,
        min_rate: 5.0,
        min_window: 2,
        max_window: 64,
        initial_rtt: Duration::from_millis(100),
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A path in virtual time: requests paced by the controller, a token
    /// bucket of `limit` a second (burst 5, as nftables' `limit rate`)
    /// and a share `loss` lost at random, answers back after `rtt`, losses
    /// known after `lost_after` (a DNS client's timeout), or `rtt`. The
    /// sender always has something to send when `busy`.
    struct Path {
        limit: Option<f64>,
        loss: f64,
        rtt: Duration,
        lost_after: Option<Duration>,
        seed: u64,
    }

    /// What a run of a [`Path`] showed over the last half of its time:
    /// requests delivered per second, and the share of those sent lost.
    struct Run {
        delivered: f64,
        settled_loss: f64,
        c: Controller,
    }

    impl Path {
        fn run(&self, secs: u64, busy: impl FnMut(Instant) -> bool) -> Run {
            self.run_ticking(secs, ms(1), busy)
        }

        /// As [`Path::run`], looking at the demand at least every `tick`.
        fn run_ticking(
            &self,
            secs: u64,
            tick: Duration,
            mut busy: impl FnMut(Instant) -> bool,
        ) -> Run {
            let t0 = Instant::now();
            let mut c = Controller::new(CONFIG, t0);
            let mut now = t0;
            let mut bucket = 5.0;
            let mut bucket_at = t0;
            let mut rng = self.seed | 1;
            // Outcomes due, each list in time order: answers and losses.
            let mut in_flight: [VecDeque<(Instant, Instant, bool)>; 2] = Default::default();
            let end = t0 + Duration::from_secs(secs);
            let half = t0 + Duration::from_secs(secs / 2);
            let (mut delivered_late, mut lost_late) = (0u64, 0u64);
            let mut waiting = false;
            while now < end {
                while let Some(first) = (0..2)
                    .filter(|&k| in_flight[k].front().is_some_and(|f| f.0 <= now))
                    .min_by_key(|&k| in_flight[k][0].0)
                {
                    let (at, sent, ok) = in_flight[first].pop_front().unwrap();
                    if ok {
                        c.on_answered(at, sent, Some(self.rtt));
                        if sent >= half {
                            delivered_late += 1;
                        }
                    } else {
                        c.on_lost(at, sent, 1);
                        if sent >= half {
                            lost_late += 1;
                        }
                    }
                }
                // A request the demand asked for waits until it can go.
                waiting = waiting || busy(now);
                if waiting {
                    if c.can_send(now) {
                        waiting = false;
                        c.on_sent(now);
                        if let Some(limit) = self.limit {
                            let dt = (now - bucket_at).as_secs_f64();
                            bucket = (bucket + dt * limit).min(5.0);
                            bucket_at = now;
                        }
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let random_loss = (rng % 10_000) as f64 / 10_000.0 < self.loss;
                        let passes = !random_loss && (self.limit.is_none() || bucket >= 1.0);
                        if passes && self.limit.is_some() {
                            bucket -= 1.0;
                        }
                        let back = match self.lost_after {
                            Some(after) if !passes => after,
                            _ => self.rtt,
                        };
                        in_flight[usize::from(!passes)].push_back((now + back, now, passes));
                        continue;
                    }
                    c.on_blocked(now);
                }
                let next = in_flight
                    .iter()
                    .filter_map(|q| q.front())
                    .map(|f| f.0)
                    .min();
                let pace = waiting.then(|| c.next_send_time(now));
                now = [next, pace, Some(now + tick)]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap()
                    .max(now + Duration::from_micros(1));
            }
            let outcomes = (delivered_late + lost_late).max(1) as f64;
            Run {
                delivered: delivered_late as f64 / (secs / 2) as f64,
                settled_loss: lost_late as f64 / outcomes,
                c,
            }
        }
    }

    /// A sender with `per_sec` requests a second to send.
    fn demand(per_sec: f64) -> impl FnMut(Instant) -> bool {
        let (mut asked, mut start) = (0.0, None);
        move |now| {
            let t0 = *start.get_or_insert(now);
            let due = (now - t0).as_secs_f64() * per_sec >= asked;
            if due {
                asked += 1.0;
            }
            due
        }
    }

    #[test]
    fn paces_evenly_at_its_rate() {
        let t0 = Instant::now();
        let c0 = Controller::new(CONFIG, t0);
        let mut c = c0.clone();
        let mut now = t0;
        let mut sends = Vec::new();
        while sends.len() < 50 {
            now = c.next_send_time(now);
            assert!(c.can_send(now));
            c.on_sent(now);
            sends.push(now);
        }
        // The bucket's first two go at once, then one every 10 ms.
        let gaps: Vec<Duration> = sends.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps[..1].iter().all(|g| *g == Duration::ZERO), "{gaps:?}");
        for g in &gaps[2..] {
            assert!(
                *g >= ms(10) && *g <= ms(10) + Duration::from_micros(2),
                "{g:?}"
            );
        }
        assert_eq!(c0.pacing_interval(), ms(10));
    }

    #[test]
    fn finds_a_rate_limit_and_stays_just_below_it() {
        for limit in [50.0, 300.0, 2000.0] {
            let path = Path {
                limit: Some(limit),
                loss: 0.0,
                rtt: ms(20),
                lost_after: None,
                seed: 7,
            };
            let Run { delivered, c, .. } = path.run(60, |_| true);
            eprintln!("limit {limit}: {delivered:.0}/s {:?}", c.stats());
            assert!(
                delivered >= 0.85 * limit && delivered <= 1.05 * limit,
                "limit {limit}: {delivered:.0}/s delivered"
            );
            let s = c.stats();
            let loss = s.lost as f64 / s.sent as f64;
            assert!(loss < 0.1, "limit {limit}: {:.1} % lost", loss * 100.0);
            assert!(!s.slow_start && s.reductions >= 2, "{s:?}");
        }
    }

    #[test]
    fn finds_a_rate_limit_whose_losses_show_overdue() {
        // As a DNS client through a resolver that drops what exceeds its
        // rate: losses known when overdue, two round trips on.
        let path = Path {
            limit: Some(2000.0),
            loss: 0.0,
            rtt: ms(20),
            lost_after: Some(ms(40)),
            seed: 5,
        };
        let Run {
            delivered,
            settled_loss: loss,
            c,
        } = path.run(20, |_| true);
        let s = c.stats();
        eprintln!("{delivered:.0}/s, {:.1} % lost; {s:?}", loss * 100.0);
        assert!((1700.0..=2000.0).contains(&delivered), "{delivered:.0}/s");
        // Once settled (slow start overshoots for as long as losses take
        // to show).
        assert!(loss < 0.05, "{:.1} % lost", loss * 100.0);
    }

    #[test]
    fn random_loss_does_not_collapse_the_rate() {
        let path = Path {
            limit: None,
            loss: 0.1,
            rtt: ms(20),
            lost_after: None,
            seed: 3,
        };
        // Demand of 1000 requests a second (the path could take more).
        let Run { delivered, c, .. } = path.run(60, demand(1000.0));
        eprintln!("{delivered:.0}/s {:?}", c.stats());
        assert!(delivered >= 0.85 * 1000.0, "{delivered:.0}/s delivered");
        assert!(c.pacing_rate() >= 1000.0, "{:?}", c.stats());
        assert!(
            (0.05..=0.15).contains(&c.stats().base_loss),
            "{:?}",
            c.stats()
        );
    }

    #[test]
    fn random_loss_and_a_rate_limit() {
        let path = Path {
            limit: Some(500.0),
            loss: 0.05,
            rtt: ms(30),
            lost_after: None,
            seed: 11,
        };
        let Run { delivered, .. } = path.run(60, |_| true);
        // At most 95 % of what the bucket passes survives the random loss.
        assert!(delivered >= 0.75 * 500.0, "{delivered:.0}/s delivered");
    }

    #[test]
    fn a_clean_path_is_not_held_back() {
        let path = Path {
            limit: None,
            loss: 0.0,
            rtt: ms(1),
            lost_after: None,
            seed: 1,
        };
        // A demand of 250 000 requests a second (a sender always busy
        // would only test how fast this test runs at the sanity bound).
        let tick = Duration::from_micros(4);
        let Run { delivered, c, .. } = path.run_ticking(2, tick, demand(250_000.0));
        assert!(delivered > 0.9 * 250_000.0, "{delivered:.0}/s");
        assert!(c.stats().slow_start);
        assert_eq!(c.stats().reductions, 0);
    }

    #[test]
    fn rejections_back_off_harder_until_an_answer() {
        let t0 = Instant::now();
        let mut c = Controller::new(CONFIG, t0);
        // A burst refused: one back-off for the requests sent before it.
        c.on_rejected(t0 + ms(10), t0);
        c.on_rejected(t0 + ms(11), t0 + ms(1));
        assert_eq!(c.stats().backoff, BACKOFF_MIN);
        assert!(!c.can_send(t0 + ms(109)));
        assert_eq!(c.next_send_time(t0 + ms(50)), t0 + ms(110));
        assert!(c.can_send(t0 + ms(110)));
        // Refused again, nothing answered: twice as long, up to the most.
        let mut at = t0 + ms(110);
        let mut longest = Duration::ZERO;
        for _ in 0..10 {
            c.on_sent(at);
            c.on_rejected(at + ms(1), at);
            longest = c.stats().backoff;
            at = c.next_send_time(at + ms(1));
        }
        assert_eq!(longest, BACKOFF_MAX);
        assert_eq!(c.stats().rejections, 12);
        // An answer ends it; the rate never moved.
        c.on_sent(at);
        c.on_answered(at + ms(5), at, None);
        assert!(c.can_send(at + ms(5)));
        assert_eq!(c.stats().backoff, Duration::ZERO);
        assert_eq!(c.pacing_rate(), CONFIG.initial_rate);
    }

    #[test]
    fn held_answers_carry_no_round_trip_and_reset_starts_afresh() {
        let t0 = Instant::now();
        let mut c = Controller::new(CONFIG, t0);
        c.on_sent(t0);
        c.on_answered(t0 + ms(600), t0, None);
        assert_eq!(c.srtt(), None);
        assert_eq!(c.rto(), MIN_RTO);
        c.on_answered(t0 + ms(700), t0 + ms(600), Some(ms(100)));
        assert_eq!(c.srtt(), Some(ms(100)));
        assert_eq!(c.rto(), ms(300)); // 100 ms and four deviations of 50
        c.on_rejected(t0 + ms(800), t0 + ms(790));
        c.reset(t0 + ms(801));
        assert!(c.can_send(t0 + ms(801)));
        assert!(c.stats().slow_start);
        assert_eq!(c.srtt(), Some(ms(100)));
    }

    /// A round of a few outcomes (held polls) with one lost says little
    /// of a fast path: one reduction keeps a quarter of the rate, however
    /// little the round delivered.
    #[test]
    fn one_reduction_keeps_a_quarter_of_the_rate() {
        let t0 = Instant::now();
        for why in [
            Congestion::Loss {
                delivered: Some(1.0),
                loss: 1.0,
            },
            Congestion::BurstLoss {
                delivered: Some(1.0),
                loss: 1.0,
            },
            Congestion::BurstLoss {
                delivered: None,
                loss: 1.0,
            },
        ] {
            let mut c = Controller::new(CONFIG, t0);
            c.set_rate(100_000.0);
            c.reduce(t0 + ms(1), why);
            assert_eq!(c.pacing_rate(), 100_000.0 * MAX_CUT, "{why:?}");
            // Repeated, it still steps down towards what was delivered.
            c.reduce(t0 + ms(2), why);
            assert_eq!(c.pacing_rate(), 100_000.0 * MAX_CUT * MAX_CUT, "{why:?}");
        }
    }

    #[test]
    fn an_idle_path_keeps_its_rate() {
        let t0 = Instant::now();
        let mut c = Controller::new(CONFIG, t0);
        // One request a second, each answered: the rate is never used.
        for i in 0..100 {
            let t = t0 + Duration::from_secs(i);
            c.on_sent(t);
            c.on_answered(t + ms(50), t, Some(ms(50)));
        }
        assert_eq!(c.pacing_rate(), CONFIG.initial_rate);
        assert_eq!(c.stats().reductions, 0);
    }

    #[test]
    fn reordering_is_not_loss() {
        let t0 = Instant::now();
        let mut c = Controller::new(CONFIG, t0);
        let mut now = t0;
        // Always busy; a tenth of the requests are reported lost, then
        // found a few milliseconds later.
        #[derive(PartialEq, Eq, PartialOrd, Ord)]
        enum What {
            Answered,
            Lost,
            Late,
        }
        let mut pending = std::collections::BTreeSet::new();
        let mut i = 0u64;
        while now < t0 + Duration::from_secs(30) {
            while pending
                .first()
                .is_some_and(|p: &(Instant, u64, What, Instant)| p.0 <= now)
            {
                let (at, _, what, sent) = pending.pop_first().unwrap();
                match what {
                    What::Answered => c.on_answered(at, sent, Some(ms(20))),
                    What::Lost => c.on_lost(at, sent, 1),
                    What::Late => c.on_late(at, sent, 1),
                }
            }
            if c.can_send(now) {
                c.on_sent(now);
                i += 1;
                if i.is_multiple_of(10) {
                    pending.insert((now + ms(20), i, What::Lost, now));
                    pending.insert((now + ms(23), i, What::Late, now));
                } else {
                    pending.insert((now + ms(20), i, What::Answered, now));
                }
            } else {
                c.on_blocked(now);
            }
            now = c
                .next_send_time(now)
                .min(now + ms(1))
                .max(now + Duration::from_micros(50));
        }
        let s = c.stats();
        assert_eq!(s.reductions, 0, "{s:?}");
        assert!(s.lost < 20, "only those still on their way: {s:?}");
        assert!(c.pacing_rate() > 10_000.0, "{s:?}");
    }

    #[test]
    fn a_standing_queue_is_congestion() {
        let t0 = Instant::now();
        let mut c = Controller::new(CONFIG, t0);
        let mut now = t0;
        // A link of 200 requests a second with a deep buffer: the round
        // trip grows with the queue, nothing is lost.
        let mut link_free = t0;
        let mut pending: VecDeque<(Instant, Instant)> = VecDeque::new();
        let mut max_queue = Duration::ZERO;
        while now < t0 + Duration::from_secs(60) {
            while pending.front().is_some_and(|p| p.0 <= now) {
                let (at, sent) = pending.pop_front().unwrap();
                c.on_answered(at, sent, Some(at - sent));
            }
            if c.can_send(now) {
                c.on_sent(now);
                link_free = link_free.max(now) + ms(5);
                if now > t0 + Duration::from_secs(30) {
                    max_queue = max_queue.max(link_free - now);
                }
                pending.push_back((link_free + ms(10), now));
            } else {
                c.on_blocked(now);
            }
            now = c
                .next_send_time(now)
                .min(now + ms(1))
                .max(now + Duration::from_micros(50));
        }
        assert!(
            max_queue < ms(200),
            "queue of {max_queue:?}: {:?}",
            c.stats()
        );
        assert!(c.pacing_rate() > 100.0, "{:?}", c.stats());
    }

    proptest! {
        /// Whatever it is told, the rate and window stay in bounds and the
        /// pacing never lets more go than the rate and the bucket allow.
        #[test]
        fn stays_in_bounds(events in proptest::collection::vec((0u8..7, 0u64..50_000, 0u64..200), 1..400)) {
            let t0 = Instant::now();
            let mut c = Controller::new(CONFIG, t0);
            let mut now = t0;
            let mut sent: Vec<Instant> = Vec::new();
            for (kind, dt_us, n) in events {
                now += Duration::from_micros(dt_us);
                let back = now - Duration::from_micros(dt_us * n.min(10));
                match kind {
                    0 => if c.can_send(now) { c.on_sent(now); sent.push(now); },
                    1 => c.on_answered(now, back, Some(Duration::from_micros(n * 500))),
                    2 => c.on_lost(now, back, n % 20),
                    3 => c.on_late(now, back, n % 5),
                    4 => c.on_blocked(now),
                    5 => c.on_rejected(now, back),
                    _ => {
                        let at = c.next_send_time(now);
                        prop_assert!(at >= now);
                        prop_assert!(c.can_send(at));
                    }
                }
                let rate = c.pacing_rate();
                prop_assert!((CONFIG.min_rate..=MAX_RATE).contains(&rate));
                let w = c.window();
                prop_assert!((CONFIG.min_window..=CONFIG.max_window).contains(&w));
                prop_assert!(c.stats().base_loss <= MAX_BASE_LOSS);
            }
        }

        /// Sending whenever allowed at a fixed rate, no window of time sees
        /// more requests than the rate times its length plus the bucket.
        #[test]
        fn pacing_is_bounded(rate in 5.0f64..100_000.0, steps in 10usize..2000) {
            let t0 = Instant::now();
            let mut c = Controller::new(Config { initial_rate: rate, ..CONFIG }, t0);
            let mut now = t0;
            let mut sends = Vec::new();
            for _ in 0..steps {
                now = c.next_send_time(now);
                prop_assert!(c.can_send(now));
                c.on_sent(now);
                sends.push(now);
            }
            let burst = (rate * BURST_TIME.as_secs_f64()).max(MIN_BURST);
            let span = (*sends.last().unwrap() - sends[0]).as_secs_f64();
            prop_assert!(sends.len() as f64 <= rate * span + burst + 1.0);
        }

        /// Outcomes alone never reduce the rate without loss or delay.
        #[test]
        fn no_loss_no_reduction(rtts in proptest::collection::vec(1u64..50, 10..500)) {
            let t0 = Instant::now();
            let mut c = Controller::new(CONFIG, t0);
            let mut now = t0;
            for rtt in rtts {
                let rtt = ms(rtt.min(20));
                c.on_sent(now);
                c.on_answered(now + rtt, now, Some(rtt));
                now += ms(3);
            }
            prop_assert_eq!(c.stats().reductions, 0);
            prop_assert!(c.pacing_rate() >= CONFIG.initial_rate);
        }
    }
}

//! The resolvers of a DNS path, used together: each has its own
//! congestion controller ([`Controller`], the transports' shared one), so
//! queries spread by what each one carries, and its own health.
//!
//! - **Choice**: a query goes to the resolver, among those whose window and
//!   pacer allow one now, with the least load for its window (queries of
//!   the same kind in flight over the window), so a resolver that carries
//!   twice as much gets twice the queries. When none may take it, those
//!   held back by their pacing alone are told (their rate is the limit).
//! - **Timing**: a query the server answers at once is *overdue* after two
//!   round trips (or one and four deviations): its controller takes it as
//!   lost, and it no longer fills the window; an answer after all is
//!   reordering, taken back. It is given up on after the controller's
//!   [`rto`](Controller::rto) (at most [`MAX_RTO`]), plus the server's hold
//!   for a query it may hold.
//! - **Silence**: a resolver that has answered nothing for
//!   [`patience`](Resolver::patience) (the server's hold plus four round
//!   trips, at least [`MIN_PATIENCE`]) while a query to it waited that long
//!   is set aside at once: its queries count as lost (their fragments go
//!   again through the others) and no new ones go to it.
//! - **Loss**: one whose recent queries mostly fail ([`Resolver::health`]
//!   below [`SICK`]) while another stays healthy is set aside too.
//! - **Return**: a resolver set aside gets one minimal query (a bare poll
//!   in base32 asking a 512-byte answer) after [`RETRY_MIN`], doubling to
//!   [`RETRY_MAX`] while they fail; an answer brings it back in slow start.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::HOLD;
use crate::transport::congestion::{Config, CongestionStats, Controller};

/// How a resolver's controller starts and what bounds it: a few queries
/// out at least, never thousands. A resolver keeps a list of the queries
/// it works on (unbound: 1000 a thread) and drops what does not fit: the
/// windows of data queries and of polls together stay well within it
/// (512 data queries carry 10 000 a second over a 50 ms round trip).
pub const CONGESTION: Config = Config {
    initial_rate: 1000.0,
    min_rate: 5.0,
    min_window: 4,
    max_window: 512,
    initial_rtt: Duration::from_millis(100),
};
/// The least time after which an unanswered query is overdue (a
/// scheduler's hiccup on a fast path is no loss).
pub const MIN_OVERDUE: Duration = Duration::from_millis(20);

/// The least time a resolver may stay silent before it is set aside.
pub const MIN_PATIENCE: Duration = Duration::from_millis(300);
/// The longest a query may go unanswered before it counts as lost, beyond
/// the server's hold.
pub const MAX_RTO: Duration = Duration::from_secs(2);
/// The first wait before a resolver set aside is tried again.
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// The longest wait between tries of a resolver set aside.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// Health (the share of recent queries answered, smoothed) below which a
/// resolver is set aside if another is healthy.
pub const SICK: f64 = 0.6;
/// Health a resolver needs to count as healthy beside a sick one.
pub const HEALTHY: f64 = 0.8;
/// Outcomes since a resolver (re)joined before its health counts.
const HEALTH_SAMPLES: u32 = 16;

/// The kind of a query, for the windows: polls and queries carrying data
/// each fill a resolver's window on their own (held polls occupy the
/// server, not the path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    /// A bare poll (or a probe).
    Poll,
    /// A query carrying upstream data (or a re-ask).
    Data,
}

/// How a query failed, for its resolver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failed {
    /// No answer in time.
    Lost,
    /// SERVFAIL or REFUSED: the resolver will not serve (back off).
    Rejected,
    /// Another error code (FORMERR, NXDOMAIN...): the query's fault.
    Error,
}

/// Why a resolver was set aside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aside {
    /// It answered nothing for too long.
    Silent,
    /// Most of its queries failed.
    Lossy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Active,
    SetAside {
        why: Aside,
        /// When to try it again, and the wait after that try fails.
        retry_at: Instant,
        wait: Duration,
        /// The try in flight (its DNS id), and whether it is the first.
        trying: Option<u16>,
        first: bool,
    },
}

/// Counters of one resolver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResolverStats {
    /// Queries sent to it.
    pub queries: u64,
    /// Answers from it.
    pub answers: u64,
    /// Its queries that timed out (or were given up when it was set aside).
    pub lost: u64,
    /// SERVFAIL and REFUSED answers from it.
    pub rejected: u64,
    /// Times it was set aside.
    pub set_aside: u64,
}

/// What status shows of one resolver.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ResolverInfo {
    /// Set aside, and why.
    pub aside: Option<Aside>,
    /// Queries in flight to it: polls and queries carrying data.
    pub polls: usize,
    /// See [`ResolverInfo::polls`].
    pub data: usize,
    /// Its congestion controller.
    pub congestion: CongestionStats,
    /// Share of recent queries answered (smoothed).
    pub health: f64,
    /// Counters.
    pub stats: ResolverStats,
}

/// One resolver's standing.
#[derive(Clone, Debug)]
pub struct Resolver {
    cc: Controller,
    polls: usize,
    data: usize,
    /// Queries in flight, oldest first (answered ones linger until they
    /// reach the front): when each was sent, its DNS id; those the server
    /// answers at once (prompt), and those it may hold.
    prompt: VecDeque<(Instant, u16)>,
    holdable: VecDeque<(Instant, u16)>,
    /// Prompt queries still counted in the window, oldest first.
    counted: VecDeque<(Instant, u16)>,
    last_answer: Option<Instant>,
    /// When the first query went that no answer has followed yet.
    unanswered_since: Option<Instant>,
    state: State,
    health: f64,
    outcomes: u32,
    stats: ResolverStats,
}

impl Resolver {
    fn new(now: Instant) -> Self {
        Self {
            cc: Controller::new(CONGESTION, now),
            polls: 0,
            data: 0,
            prompt: VecDeque::new(),
            holdable: VecDeque::new(),
            counted: VecDeque::new(),
            last_answer: None,
            unanswered_since: None,
            state: State::Active,
            health: 1.0,
            outcomes: 0,
            stats: ResolverStats::default(),
        }
    }

    fn active(&self) -> bool {
        self.state == State::Active
    }

    fn listed(&mut self, prompt: bool) -> &mut VecDeque<(Instant, u16)> {
        if prompt {
            &mut self.prompt
        } else {
            &mut self.holdable
        }
    }

    fn count(&mut self, load: Load) -> &mut usize {
        match load {
            Load::Poll => &mut self.polls,
            Load::Data => &mut self.data,
        }
    }

    /// Whether its window has room for a query of `load`.
    fn has_room(&self, load: Load) -> bool {
        self.in_flight(load) < self.window()
    }

    fn in_flight(&self, load: Load) -> usize {
        match load {
            Load::Poll => self.polls,
            Load::Data => self.data,
        }
    }

    /// Load for the window: queries of `load`'s kind in flight over it.
    fn load(&self, load: Load) -> f64 {
        self.in_flight(load) as f64 / self.window() as f64
    }

    /// Queries of one kind allowed in flight.
    pub fn window(&self) -> usize {
        self.cc.window()
    }

    fn srtt(&self) -> Duration {
        self.cc.srtt().unwrap_or(CONGESTION.initial_rtt)
    }

    /// How long it may stay silent with a query out: the server's hold
    /// plus a round trip and four deviations, or two round trips.
    pub fn patience(&self) -> Duration {
        let slack = (self.cc.rttvar() * 4).max(self.srtt());
        HOLD + (self.srtt() + slack).max(MIN_PATIENCE)
    }

    /// After how long a query the server answers at once no longer counts
    /// in the window (it is likely lost, or far behind): two round trips,
    /// or one and four deviations. Lost queries waiting for their deadline
    /// would otherwise fill the window.
    pub fn overdue_after(&self) -> Duration {
        (self.srtt() * 2)
            .max(self.srtt() + self.cc.rttvar() * 4)
            .max(MIN_OVERDUE)
    }

    /// When a query sent at `sent` is lost if unanswered: a round trip and
    /// its deviations on, plus the server's hold unless it was prompt.
    pub fn deadline(&self, sent: Instant, prompt: bool) -> Instant {
        let rto = self.cc.rto().min(MAX_RTO);
        if prompt {
            sent + rto
        } else {
            sent + HOLD + rto
        }
    }

    fn outcome(&mut self, answered: bool) {
        let x = if answered { 1.0 } else { 0.0 };
        self.health += (x - self.health) / 16.0;
        self.outcomes = self.outcomes.saturating_add(1);
    }

    /// Query `id` was answered: if it was this resolver's try, it is back
    /// (in slow start): whether at its first try, and why it was set aside.
    fn try_answered(&mut self, now: Instant, id: u16) -> Option<(bool, Aside)> {
        match self.state {
            State::SetAside {
                trying: Some(t),
                first,
                why,
                ..
            } if t == id => {
                self.state = State::Active;
                self.cc.reset(now);
                self.health = HEALTHY;
                self.outcomes = 0;
                Some((first, why))
            }
            _ => None,
        }
    }

    fn info(&self, now: Instant) -> ResolverInfo {
        let mut congestion = self.cc.stats();
        if !self.cc.backing_off(now) {
            congestion.backoff = Duration::ZERO;
        }
        ResolverInfo {
            aside: match self.state {
                State::Active => None,
                State::SetAside { why, .. } => Some(why),
            },
            polls: self.polls,
            data: self.data,
            congestion,
            health: self.health,
            stats: self.stats,
        }
    }
}

/// The resolvers of a path: see the module docs.
#[derive(Clone, Debug)]
pub struct Resolvers {
    list: Vec<Resolver>,
}

impl Resolvers {
    /// `n` resolvers (at least one), all active from `now`.
    pub fn new(n: usize, now: Instant) -> Self {
        assert!(n > 0, "a DNS path needs a resolver");
        Self {
            list: (0..n).map(|_| Resolver::new(now)).collect(),
        }
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Never: a path has a resolver at least.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Resolver `i`.
    pub fn get(&self, i: usize) -> &Resolver {
        &self.list[i]
    }

    #[cfg(test)]
    fn get_mut(&mut self, i: usize) -> &mut Resolver {
        &mut self.list[i]
    }

    /// What status shows of each.
    pub fn info(&self, now: Instant) -> Vec<ResolverInfo> {
        self.list.iter().map(|r| r.info(now)).collect()
    }

    /// The resolver carrying the most now (the largest window among the
    /// active ones; the first if none is active).
    pub fn primary(&self) -> usize {
        (0..self.list.len())
            .filter(|&i| self.list[i].active())
            .max_by_key(|&i| (self.list[i].window(), std::cmp::Reverse(i)))
            .unwrap_or(0)
    }

    /// Queries of `load` in flight, over all resolvers.
    pub fn in_flight(&self, load: Load) -> usize {
        self.list.iter().map(|r| r.in_flight(load)).sum()
    }

    /// The sum of the active resolvers' windows.
    pub fn total_window(&self) -> usize {
        self.list
            .iter()
            .filter(|r| r.active())
            .map(Resolver::window)
            .sum()
    }

    /// The resolver a query of `load` goes to now, if one may take it.
    pub fn pick(&mut self, now: Instant, load: Load) -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        for (i, r) in self.list.iter().enumerate() {
            if !r.active() || !r.has_room(load) || !r.cc.can_send(now) {
                continue;
            }
            let l = r.load(load);
            if best.is_none_or(|(_, b)| l < b) {
                best = Some((i, l));
            }
        }
        if best.is_none() {
            self.blocked(now, load);
        }
        best.map(|(i, _)| i)
    }

    /// A query of `load` waits: the resolvers with room for it that only
    /// their pacing holds back could use a higher rate.
    fn blocked(&mut self, now: Instant, load: Load) {
        for r in &mut self.list {
            if r.active() && r.has_room(load) && !r.cc.backing_off(now) {
                r.cc.on_blocked(now);
            }
        }
    }

    /// When a query of `load` may go to some resolver (`None`: not until
    /// one answers).
    pub fn next_send(&self, now: Instant, load: Load) -> Option<Instant> {
        self.list
            .iter()
            .filter(|r| r.active())
            .filter(|r| r.has_room(load))
            .map(|r| r.cc.next_send_time(now))
            .min()
    }

    /// A query of `load` with DNS id `id` went to `i`; `prompt`: the
    /// server answers it at once.
    pub fn sent(&mut self, i: usize, now: Instant, load: Load, id: u16, prompt: bool) {
        let r = &mut self.list[i];
        r.cc.on_sent(now);
        *r.count(load) += 1;
        r.stats.queries += 1;
        r.unanswered_since.get_or_insert(now);
        r.listed(prompt).push_back((now, id));
        if prompt {
            r.counted.push_back((now, id));
        }
    }

    /// The prompt query of `i` still counted by `counted(id, sent)` that is
    /// overdue first: when, and its DNS id.
    pub fn next_overdue(
        &mut self,
        i: usize,
        counted: impl Fn(u16, Instant) -> bool,
    ) -> Option<(Instant, u16)> {
        let r = &mut self.list[i];
        while let Some(&(at, id)) = r.counted.front() {
            if counted(id, at) {
                return Some((at + r.overdue_after(), id));
            }
            r.counted.pop_front();
        }
        None
    }

    /// When `i`'s next prompt query is overdue, as last found by
    /// [`Resolvers::next_overdue`].
    pub fn overdue_due(&self, i: usize) -> Option<Instant> {
        let r = &self.list[i];
        r.counted.front().map(|&(at, _)| at + r.overdue_after())
    }

    /// A prompt query of `load` to `i`, sent at `sent`, is overdue: likely
    /// lost (its controller cuts), and no longer counted in the window.
    pub fn overdue(&mut self, i: usize, now: Instant, load: Load, sent: Instant) {
        let r = &mut self.list[i];
        *r.count(load) -= 1;
        r.cc.on_lost(now, sent, 1);
    }

    /// `i` answered query `id`, sent at `sent` unless given up on; `load`:
    /// what it still counted as in the window; `rtt`: the path's delay, if
    /// the server answered at once; `overdue`: its controller took it as
    /// lost already (it was reordered). When this brought `i` back from
    /// being set aside: whether at its first try, and why it had been set
    /// aside.
    pub fn answered(
        &mut self,
        i: usize,
        now: Instant,
        id: u16,
        (load, sent): (Option<Load>, Option<Instant>),
        (rtt, overdue): (Option<Duration>, bool),
    ) -> Option<(bool, Aside)> {
        let r = &mut self.list[i];
        r.last_answer = Some(now);
        r.unanswered_since = None;
        r.stats.answers += 1;
        r.outcome(true);
        if let Some(load) = load {
            *r.count(load) -= 1;
        }
        match (sent, rtt) {
            (Some(sent), rtt) if overdue => {
                if let Some(rtt) = rtt {
                    r.cc.on_rtt(now, sent, rtt);
                }
                r.cc.on_late(now, sent, 1);
            }
            (Some(sent), rtt) => r.cc.on_answered(now, sent, rtt),
            (None, _) => {}
        }
        r.try_answered(now, id)
    }

    /// A query of `i` failed (`how`); `load`: what it still counted as in
    /// the window; `sent`: when it went, unless its resolver's controller
    /// is done with it. An error answer still shows the resolver alive: to
    /// a try, it brings the resolver back (as [`Resolvers::answered`]).
    pub fn failed(
        &mut self,
        i: usize,
        now: Instant,
        id: u16,
        (load, sent): (Option<Load>, Option<Instant>),
        how: Failed,
    ) -> Option<(bool, Aside)> {
        let r = &mut self.list[i];
        r.outcome(false);
        if let Some(load) = load {
            *r.count(load) -= 1;
        }
        match how {
            Failed::Lost => {
                r.stats.lost += 1;
                if let Some(sent) = sent {
                    r.cc.on_lost(now, sent, 1);
                }
            }
            Failed::Rejected | Failed::Error => {
                if how == Failed::Rejected {
                    r.stats.rejected += 1;
                    if let Some(sent) = sent {
                        r.cc.on_rejected(now, sent);
                    }
                }
                r.last_answer = Some(now);
                r.unanswered_since = None;
                return r.try_answered(now, id);
            }
        }
        // A try of a resolver set aside lost: wait longer.
        if let State::SetAside {
            why,
            trying: Some(t),
            wait,
            ..
        } = r.state
            && t == id
        {
            r.state = State::SetAside {
                why,
                retry_at: now + wait,
                wait: (wait * 2).min(RETRY_MAX),
                trying: None,
                first: false,
            };
        }
        None
    }

    /// The query of `i` still in flight by `alive(id, sent)` that is lost
    /// first if unanswered: its deadline and DNS id. Forgets queries no
    /// longer alive at the fronts.
    pub fn next_loss(
        &mut self,
        i: usize,
        alive: impl Fn(u16, Instant) -> bool,
    ) -> Option<(Instant, u16)> {
        let r = &mut self.list[i];
        let mut first: Option<(Instant, u16)> = None;
        for prompt in [true, false] {
            let list = r.listed(prompt);
            while let Some(&(at, id)) = list.front() {
                if alive(id, at) {
                    break;
                }
                list.pop_front();
            }
            if let Some(&(at, id)) = r.listed(prompt).front() {
                let due = r.deadline(at, prompt);
                if first.is_none_or(|(t, _)| due < t) {
                    first = Some((due, id));
                }
            }
        }
        first
    }

    /// When `i`'s next query is lost if unanswered, as last found by
    /// [`Resolvers::next_loss`] (it may have been answered since).
    pub fn loss_due(&self, i: usize) -> Option<Instant> {
        let r = &self.list[i];
        let p = r.prompt.front().map(|&(at, _)| r.deadline(at, true));
        let h = r.holdable.front().map(|&(at, _)| r.deadline(at, false));
        p.into_iter().chain(h).min()
    }

    /// When the oldest query of `i` went, as last found by
    /// [`Resolvers::next_loss`].
    pub fn oldest_sent(&self, i: usize) -> Option<Instant> {
        let r = &self.list[i];
        let p = r.prompt.front().map(|&(at, _)| at);
        let h = r.holdable.front().map(|&(at, _)| at);
        p.into_iter().chain(h).min()
    }

    /// Whether `i` is to be set aside at `now`: silent since a query went
    /// for its patience, or sick beside a healthy one.
    pub fn verdict(&self, i: usize, now: Instant) -> Option<Aside> {
        let r = &self.list[i];
        if !r.active() {
            return None;
        }
        if r.unanswered_since
            .is_some_and(|t| now.saturating_duration_since(t) >= r.patience())
        {
            return Some(Aside::Silent);
        }
        let others_healthy = self
            .list
            .iter()
            .enumerate()
            .any(|(j, o)| j != i && o.active() && o.health >= HEALTHY);
        (r.outcomes >= HEALTH_SAMPLES && r.health < SICK && others_healthy).then_some(Aside::Lossy)
    }

    /// When [`Resolvers::verdict`] may next find `i` silent.
    pub fn silence_due(&self, i: usize) -> Option<Instant> {
        let r = &self.list[i];
        if !r.active() {
            return None;
        }
        r.unanswered_since.map(|t| t + r.patience())
    }

    /// Set `i` aside: its queries in flight no longer count (the caller
    /// gives up on them; they stay listed until they time out), and it is
    /// tried again after a while.
    pub fn set_aside(&mut self, i: usize, now: Instant, why: Aside) {
        let r = &mut self.list[i];
        r.state = State::SetAside {
            why,
            retry_at: now + RETRY_MIN,
            wait: RETRY_MIN * 2,
            trying: None,
            first: true,
        };
        r.polls = 0;
        r.data = 0;
        r.unanswered_since = None;
        r.stats.set_aside += 1;
    }

    /// A resolver set aside whose try is due now.
    pub fn retry_due(&self, now: Instant) -> Option<usize> {
        self.list.iter().position(|r| {
            matches!(r.state, State::SetAside { retry_at, trying: None, .. } if now >= retry_at)
        })
    }

    /// When a try of a resolver set aside is next due.
    pub fn next_retry(&self) -> Option<Instant> {
        self.list
            .iter()
            .filter_map(|r| match r.state {
                State::SetAside {
                    retry_at,
                    trying: None,
                    ..
                } => Some(retry_at),
                _ => None,
            })
            .min()
    }

    /// The try of `i` went out as DNS id `id` (a prompt query).
    pub fn trying(&mut self, i: usize, now: Instant, id: u16) {
        let r = &mut self.list[i];
        if let State::SetAside { trying, .. } = &mut r.state {
            *trying = Some(id);
        }
        r.prompt.push_back((now, id));
        r.stats.queries += 1;
        r.unanswered_since.get_or_insert(now);
    }

    /// Whether `i` is set aside.
    pub fn is_aside(&self, i: usize) -> bool {
        !self.list[i].active()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn queries_spread_by_window() {
        let t0 = Instant::now();
        let mut rs = Resolvers::new(2, t0);
        // Resolver 1 carries for two seconds, every query answered at once
        // in 10 ms: its rate and window grow.
        let (mut now, mut id) = (t0, 0u16);
        let mut pending: VecDeque<(Instant, Instant, u16)> = VecDeque::new();
        while now < t0 + Duration::from_secs(2) {
            while let Some(&(at, sent, k)) = pending.front().filter(|p| p.0 <= now) {
                pending.pop_front();
                let counted = (Some(Load::Data), Some(sent));
                rs.answered(1, at, k, counted, (Some(at - sent), false));
            }
            while rs.get(1).has_room(Load::Data) && rs.get(1).cc.can_send(now) {
                id = id.wrapping_add(1);
                rs.sent(1, now, Load::Data, id, true);
                pending.push_back((now + ms(10), now, id));
            }
            rs.get_mut(1).cc.on_blocked(now);
            now += ms(1);
        }
        let in_flight = rs.get(1).data;
        let (w0, w1) = (rs.get(0).window(), rs.get(1).window());
        assert!(w1 > 2 * w0, "{w0} {w1}");
        let mut to = [0usize; 2];
        for _ in 0..2000 {
            now += ms(1);
            while let Some(i) = rs.pick(now, Load::Data) {
                id = id.wrapping_add(1);
                rs.sent(i, now, Load::Data, id, true);
                to[i] += 1;
            }
        }
        // Each filled its own window: the load spreads by capacity.
        assert_eq!(to, [w0, w1 - in_flight]);
        assert_eq!(rs.primary(), 1);
        // Polls have windows of their own.
        assert!(rs.pick(now + ms(1), Load::Poll).is_some());
    }

    #[test]
    fn a_silent_resolver_is_set_aside_and_tried_again() {
        let t0 = Instant::now();
        let mut rs = Resolvers::new(2, t0);
        rs.sent(0, t0, Load::Data, 1, false);
        rs.sent(1, t0, Load::Data, 2, true);
        rs.answered(
            1,
            t0 + ms(20),
            2,
            (Some(Load::Data), Some(t0)),
            (Some(ms(20)), false),
        );
        let alive = |id: u16, _| id == 1;
        // Lost a hold and a timeout on, if unanswered.
        let (due, id) = rs.next_loss(0, alive).unwrap();
        assert_eq!(
            (due, id),
            (t0 + HOLD + crate::transport::congestion::MIN_RTO, 1)
        );
        assert_eq!(rs.oldest_sent(0), Some(t0));
        let due = rs.silence_due(0).expect("a deadline");
        assert!(due >= t0 + HOLD + MIN_PATIENCE);
        assert_eq!(rs.verdict(0, due - ms(1)), None);
        assert_eq!(rs.verdict(0, due), Some(Aside::Silent));
        rs.set_aside(0, due, Aside::Silent);
        assert!(rs.is_aside(0));
        assert_eq!(rs.pick(due, Load::Data), Some(1));
        assert_eq!(rs.primary(), 1);
        // Tried after a second; a failed try waits longer.
        assert_eq!(rs.retry_due(due), None);
        let t1 = due + RETRY_MIN;
        assert_eq!(rs.retry_due(t1), Some(0));
        rs.trying(0, t1, 77);
        assert_eq!(rs.retry_due(t1), None);
        rs.failed(0, t1 + ms(2000), 77, (None, Some(t1)), Failed::Lost);
        assert_eq!(rs.next_retry(), Some(t1 + ms(2000) + RETRY_MIN * 2));
        // An answer to the next try brings it back (not at its first try).
        let t2 = t1 + ms(4000);
        rs.trying(0, t2, 78);
        assert_eq!(
            rs.answered(0, t2 + ms(30), 78, (None, Some(t2)), (None, false)),
            Some((false, Aside::Silent))
        );
        assert!(!rs.is_aside(0));
        assert_eq!(rs.pick(t2 + ms(30), Load::Poll), Some(0));
    }

    #[test]
    fn a_lossy_resolver_is_set_aside_beside_a_healthy_one() {
        let t0 = Instant::now();
        let mut rs = Resolvers::new(2, t0);
        for k in 0..32u16 {
            let now = t0 + ms(u64::from(k) * 10);
            rs.sent(0, now, Load::Data, k, true);
            rs.sent(1, now, Load::Data, 100 + k, true);
            rs.answered(
                1,
                now + ms(5),
                100 + k,
                (Some(Load::Data), Some(now)),
                (Some(ms(5)), false),
            );
            if k % 2 == 0 {
                rs.answered(
                    0,
                    now + ms(5),
                    k,
                    (Some(Load::Data), Some(now)),
                    (Some(ms(5)), false),
                );
            } else {
                rs.failed(
                    0,
                    now + ms(5),
                    k,
                    (Some(Load::Data), Some(now)),
                    Failed::Lost,
                );
            }
        }
        assert_eq!(rs.verdict(0, t0 + ms(400)), Some(Aside::Lossy));
        assert_eq!(rs.verdict(1, t0 + ms(400)), None);
        // Alone, a lossy resolver is still used.
        let mut one = Resolvers::new(1, t0);
        for k in 0..32u16 {
            one.sent(0, t0, Load::Data, k, true);
            one.failed(
                0,
                t0 + ms(5),
                k,
                (Some(Load::Data), Some(t0)),
                Failed::Rejected,
            );
        }
        assert_eq!(one.verdict(0, t0 + ms(10)), None);
    }
}

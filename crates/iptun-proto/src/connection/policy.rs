//! The policy that moves the session between candidate paths: see the
//! [module docs](super) for what it does; here is how.

use std::time::{Duration, Instant};

use super::{Carrier, Connection, Event, PathId, PathState};
use crate::wire::control::CONTROL_LEN;

/// A candidate joins the startup race this long after the one before it.
pub const STAGGER: Duration = Duration::from_secs(2);

/// Traffic unanswered this long on the path in use brings a probe, which
/// the server answers at once: a dead path is told in seconds, and a
/// one-way flow proves its path alive too.
pub const NUDGE_AFTER: Duration = Duration::from_secs(1);

/// First wait before a candidate that failed while searching is probed again.
pub const SEARCH_RETRY_MIN: Duration = Duration::from_secs(2);

/// Longest wait between probes while no path works.
pub const SEARCH_RETRY_MAX: Duration = Duration::from_secs(30);

/// First wait before probing a candidate not in use.
pub const PROBE_MIN: Duration = Duration::from_secs(30);

/// Longest wait between probes of a candidate not in use.
pub const PROBE_MAX: Duration = Duration::from_secs(600);

/// Probes a nudge sends at once: either answer will do, so one lost probe
/// does not fail a lossy path.
pub const NUDGE_COPIES: u32 = 2;
/// Rounds of nudge probes unanswered before the path in use has failed.
pub const NUDGE_ROUNDS: u8 = 2;

/// In a search, the first answer waits this long for more preferred
/// candidates still probed, so that a search ends in one move.
pub const SETTLE: Duration = Duration::from_secs(1);

/// A path that fails sooner than this after taking over does not get its
/// probe back-off reset: it flaps.
pub const STABLE: Duration = Duration::from_secs(60);

/// DNS queries failing in a row (error codes, timeouts) that fail the path.
pub const DNS_FAILURES: u32 = 8;

/// One candidate path: its transport and where the policy stands with it.
pub(super) struct Candidate {
    pub(super) carrier: Carrier,
    pub(super) state: PathState,
    /// When an authenticated message last arrived on it.
    pub(super) last_rx: Option<Instant>,
    /// The first send since the last authenticated arrival.
    pub(super) unanswered_since: Option<Instant>,
    /// When the latest nudge began.
    pub(super) nudged: Option<Instant>,
    /// The probe in flight: id and when it went.
    pub(super) probe: Option<(u32, Instant)>,
    /// When to probe it next.
    pub(super) next_probe: Option<Instant>,
    pub(super) probe_wait: Duration,
    /// When it last took over.
    pub(super) in_use_since: Option<Instant>,
    pub(super) rtt: Option<Duration>,
    pub(super) failures: u64,
    /// The sender index of the last handshake init copied onto it.
    pub(super) init_sent: Option<u32>,
    /// The probes of a nudge in flight (the path in use).
    pub(super) nudge: Option<Nudge>,
}

/// A round of probes on the path in use, whose traffic went unanswered.
#[derive(Clone, Copy, Debug)]
pub(super) struct Nudge {
    /// The first of the round's probe ids (they follow each other).
    pub(super) first_id: u32,
    /// Probes sent so far in this round.
    pub(super) copies: u32,
    pub(super) sent: Instant,
    pub(super) round: u8,
}

impl Candidate {
    pub(super) fn new(carrier: Carrier) -> Self {
        Self {
            carrier,
            state: PathState::Untried,
            last_rx: None,
            unanswered_since: None,
            nudged: None,
            probe: None,
            next_probe: None,
            probe_wait: PROBE_MIN,
            in_use_since: None,
            rtt: None,
            failures: 0,
            init_sent: None,
            nudge: None,
        }
    }

    pub(super) fn sent(&mut self, now: Instant) {
        if self.unanswered_since.is_none() {
            self.unanswered_since = Some(now);
        }
    }

    /// How long a nudge's probes may go unanswered: a few round trips,
    /// 1 to 3 s (longer while an HTTP connection is still being opened).
    pub(super) fn nudge_timeout(&self) -> Duration {
        if let Carrier::Http(h) = &self.carrier
            && !h.is_open()
        {
            return self.carrier.probe_timeout(); // a connection to open first
        }
        let rtts = self.rtt.map_or(Duration::MAX, |r| r.saturating_mul(4));
        rtts.clamp(Duration::from_secs(1), Duration::from_secs(3))
    }

    /// When the traffic sent on it counts as unanswered.
    pub(super) fn dead_at(&self) -> Option<Instant> {
        Some(self.unanswered_since? + self.carrier.liveness())
    }

    /// When it wants a nudge: a probe, which the server answers at once on
    /// every transport, so silence after traffic is told from a dead path
    /// in seconds (a one-way flow gets an answer too).
    pub(super) fn nudge_at(&self) -> Option<Instant> {
        if self.probe.is_some() || self.nudge.is_some() || !self.carrier.nudges() {
            return None;
        }
        let since = self.unanswered_since?;
        let last = self.nudged.filter(|&t| t >= since).unwrap_or(since);
        Some(last + NUDGE_AFTER)
    }
}

impl Connection {
    /// An authenticated message arrived on `path`.
    pub(super) fn heard(&mut self, now: Instant, path: PathId) {
        let c = &mut self.paths[path];
        c.last_rx = Some(now);
        c.unanswered_since = None;
        c.nudge = None;
        if path == self.current && self.race.is_none() && c.state != PathState::InUse {
            // The path in use came back before any other answered.
            c.state = PathState::InUse;
            if self.searching.take().is_some() {
                for i in 0..self.paths.len() {
                    if i != path && self.paths[i].probe.is_none() {
                        self.schedule_probe(now, i);
                    }
                }
            }
            self.refresh(now);
        }
    }

    /// A handshake completed with a response that came on `path`: the
    /// session's downstream goes there (the confirmation is queued for it).
    pub(super) fn handshake_done(&mut self, now: Instant, path: PathId) {
        if let Some(start) = self.race.take() {
            self.paths[path].rtt = self.paths[path]
                .probe
                .take()
                .map(|(_, t)| now - t)
                .or_else(|| Some(now.saturating_duration_since(start)));
            self.current = path;
            self.paths[path].state = PathState::InUse;
            self.paths[path].in_use_since = Some(now);
            self.schedule_standby_probes(now);
        } else if path != self.current {
            self.move_to(now, path, "handshake completed on another path".into());
        }
        self.searching = None;
        self.refresh(now);
    }

    pub(super) fn probe_answered(
        &mut self,
        now: Instant,
        path: PathId,
        id: u32,
        sent: u16,
        received: usize,
    ) {
        if let Some(i) = self.measuring.iter().position(|m| m.0 == id && m.1 == path) {
            let (_, _, at) = self.measuring.swap_remove(i);
            self.events.push_back(Event::Measured {
                path,
                sent,
                received,
                rtt: now - at,
            });
            return;
        }
        let c = &mut self.paths[path];
        if let Some(n) = c.nudge
            && id.wrapping_sub(n.first_id) < NUDGE_COPIES
        {
            c.nudge = None;
            c.rtt = Some(now - n.sent);
            return;
        }
        let Some((_, at)) = c.probe.filter(|&(p, _)| p == id) else {
            return; // a late answer to a probe already given up on
        };
        c.probe = None;
        c.rtt = Some(now - at);
        if path == self.current {
            return;
        }
        c.state = PathState::Standby;
        if self.searching.is_some() {
            self.settle(now);
        } else if path < self.current {
            self.move_to(now, path, "a preferred path works again".into());
        } else {
            self.schedule_probe(now, path);
        }
        self.refresh(now);
    }

    /// In a search: move to the most preferred candidate that answered,
    /// once no more preferred one can still answer within [`SETTLE`] of
    /// the first answer (one move, not two in a row).
    pub(super) fn settle(&mut self, now: Instant) {
        let Some(since) = self.searching else { return };
        let answered =
            |c: &Candidate| c.state == PathState::Standby && c.last_rx.is_some_and(|t| t >= since);
        let Some(best) = (0..self.paths.len()).find(|&i| answered(&self.paths[i])) else {
            return;
        };
        let first = self
            .paths
            .iter()
            .filter(|c| answered(c))
            .filter_map(|c| c.last_rx)
            .min()
            .unwrap_or(now);
        let pending = self.paths[..best].iter().any(|c| c.probe.is_some());
        if pending && now < first + SETTLE {
            self.settle_at = Some(first + SETTLE);
            return;
        }
        self.settle_at = None;
        let why = match &self.paths[self.current].state {
            PathState::Failed(why) => why.clone(),
            _ => "failed".into(),
        };
        self.move_to(now, best, why);
    }

    /// Move the session to `to`. The server follows with the first newest
    /// message there: a keepalive goes at once (on polled paths the polls
    /// are keepalives).
    pub(super) fn move_to(&mut self, now: Instant, to: PathId, why: String) {
        let from = self.current;
        if from == to {
            return;
        }
        if self.paths[from].state == PathState::InUse {
            self.paths[from].state = PathState::Standby;
        }
        self.searching = None;
        self.settle_at = None;
        self.schedule_probe(now, from);
        self.current = to;
        self.moves += 1;
        let c = &mut self.paths[to];
        c.state = PathState::InUse;
        c.in_use_since = Some(now);
        c.next_probe = None;
        c.probe = None;
        c.nudge = None;
        c.unanswered_since = None;
        if let Ok(n) = self.engine.seal_keepalive(now, &mut self.scratch) {
            self.queued
                .push_back((to, self.scratch[..n].to_vec(), false));
        }
        self.events.push_back(Event::Moved { from, to, why });
        self.refresh(now);
    }

    /// `path` failed: if it is in use, search for another.
    pub(super) fn fail(&mut self, now: Instant, path: PathId, why: String) {
        let c = &mut self.paths[path];
        if matches!(c.state, PathState::Failed(_)) && c.probe.is_none() {
            return; // already counted
        }
        c.failures += 1;
        c.probe = None;
        c.nudge = None;
        c.unanswered_since = None;
        c.state = PathState::Failed(why.clone());
        self.events.push_back(Event::Failed { path, why });
        if path != self.current {
            self.schedule_probe(now, path);
            self.settle(now);
            self.refresh(now);
            return;
        }
        // The path in use: it is probed again after its back-off, which
        // keeps growing if it failed soon after taking over (it flaps).
        let flapping = c.failures > 1
            && c.in_use_since
                .is_some_and(|t| now.saturating_duration_since(t) < STABLE);
        c.probe_wait = if flapping {
            (c.probe_wait * 2).clamp(PROBE_MIN, PROBE_MAX)
        } else {
            PROBE_MIN
        };
        if self.race.is_some() {
            return; // no session yet: the race goes on
        }
        self.searching = Some(now);
        for (i, other) in self.paths.iter_mut().enumerate() {
            if i != path {
                other.probe_wait = SEARCH_RETRY_MIN;
                other.next_probe = Some(now);
            }
        }
        self.refresh(now);
    }

    pub(super) fn schedule_probe(&mut self, now: Instant, path: PathId) {
        let c = &mut self.paths[path];
        let (min, max) = if self.searching.is_some() {
            (SEARCH_RETRY_MIN, SEARCH_RETRY_MAX)
        } else {
            (PROBE_MIN, PROBE_MAX)
        };
        let wait = c.probe_wait.clamp(min, max);
        c.next_probe = Some(now + wait);
        c.probe_wait = (wait * 2).min(max);
    }

    pub(super) fn schedule_standby_probes(&mut self, now: Instant) {
        for i in 0..self.paths.len() {
            if i != self.current {
                self.schedule_probe(now, i);
            }
        }
    }

    /// A candidate due for a probe (or, in the startup race, for its copy
    /// of the init).
    pub(super) fn due_probe(&mut self, now: Instant) -> Option<PathId> {
        let init = self
            .engine
            .pending_init()
            .map(|i| u32::from_le_bytes(i[4..8].try_into().expect("4 bytes")));
        if let Some(start) = self.race {
            // Paths join the race one by one; each gets the current init.
            let joined =
                (now.saturating_duration_since(start).as_nanos() / STAGGER.as_nanos()) as usize + 1;
            return (0..joined.min(self.paths.len()))
                .find(|&i| init.is_some() && self.paths[i].init_sent != init);
        }
        (0..self.paths.len()).find(|&i| {
            let c = &self.paths[i];
            i != self.current && c.probe.is_none() && c.next_probe.is_some_and(|t| t <= now)
        })
    }

    /// Probe `path`: a probe if the session has keys, else a copy of the
    /// handshake's init. Its length at `buf[headroom..]`.
    pub(super) fn probe(&mut self, now: Instant, path: PathId, buf: &mut [u8]) -> Option<usize> {
        let h = self.paths[path].carrier.headroom();
        if let Some(init) = self
            .engine
            .pending_init()
            .filter(|_| self.race.is_some() || !self.engine.is_connected(now))
        {
            let index = u32::from_le_bytes(init[4..8].try_into().expect("4 bytes"));
            buf.get_mut(h..h + init.len())?.copy_from_slice(init);
            let c = &mut self.paths[path];
            c.init_sent = Some(index);
            if c.probe.is_none() {
                c.probe = Some((0, now));
            }
            c.next_probe = None;
            return Some(init.len());
        }
        let id = self.next_probe_id;
        let reply = CONTROL_LEN as u16;
        let Ok(n) = self
            .engine
            .seal_probe(now, id, CONTROL_LEN, reply, &mut buf[h..])
        else {
            // No keys and no init yet: the engine starts one soon.
            self.paths[path].next_probe = Some(now + SEARCH_RETRY_MIN);
            return None;
        };
        self.next_probe_id = self.next_probe_id.wrapping_add(1);
        let c = &mut self.paths[path];
        c.probe = Some((id, now));
        c.next_probe = None;
        self.refresh(now);
        Some(n)
    }

    /// The path in use, when its traffic went unanswered for
    /// [`NUDGE_AFTER`]: it gets a round of probes (outside a race or a search).
    pub(super) fn due_nudge(&mut self, now: Instant) -> Option<PathId> {
        if self.race.is_some() || self.searching.is_some() {
            return None;
        }
        let connected = self.engine.is_connected(now);
        let c = &mut self.paths[self.current];
        if let Some(n) = c.nudge {
            return (n.copies < NUDGE_COPIES && connected).then_some(self.current);
        }
        if c.nudge_at().is_none_or(|t| t > now) {
            return None;
        }
        // (Counted as done without keys too, or the deadline stays due.)
        c.nudged = Some(now);
        if !connected {
            return None;
        }
        c.nudge = Some(Nudge {
            first_id: self.next_probe_id,
            copies: 0,
            sent: now,
            round: 1,
        });
        self.next_probe_id = self.next_probe_id.wrapping_add(NUDGE_COPIES);
        Some(self.current)
    }

    /// The next probe of the nudge on `path`.
    pub(super) fn nudge_probe(
        &mut self,
        now: Instant,
        path: PathId,
        buf: &mut [u8],
    ) -> Option<usize> {
        let c = &mut self.paths[path];
        let h = c.carrier.headroom();
        let n = c.nudge.as_mut()?;
        let id = n.first_id.wrapping_add(n.copies);
        n.copies += 1;
        let reply = CONTROL_LEN as u16;
        self.engine
            .seal_probe(now, id, CONTROL_LEN, reply, &mut buf[h..])
            .ok()
    }

    /// Bring the transports in line with the policy: polls only on the
    /// path in use, HTTP connections only where used or probed.
    pub(super) fn refresh(&mut self, now: Instant) {
        let polling = self.polling(now);
        let racing = self.race.map(|start| {
            (now.saturating_duration_since(start).as_nanos() / STAGGER.as_nanos()) as usize + 1
        });
        for (i, c) in self.paths.iter_mut().enumerate() {
            let in_use = i == self.current;
            c.carrier.set_polling(in_use && polling);
            let probed = c.probe.is_some() || c.next_probe.is_some_and(|t| t <= now);
            let wanted = in_use || probed || racing.is_some_and(|j| i < j);
            if let Carrier::Http(h) = &mut c.carrier {
                h.want(now, wanted);
                if let Some(command) = h.poll_command(now) {
                    self.events.push_back(Event::Http { path: i, command });
                }
            }
        }
    }
}

//! The poll discipline shared by the transports where the server can only
//! answer what the client asks (ICMP echo, DNS, HTTP long-poll).
//!
//! The client keeps several requests outstanding (ICMP:
//! [`IcmpClient`](super::icmp::IcmpClient), paced by a
//! [`Controller`](super::congestion::Controller)); each carries upstream
//! data when there is some and is otherwise a bare keepalive. The
//! server holds ("parks") each request ([`Parking`]) until downstream data
//! arrives for that client or the request has been held for `hold`, and
//! answers it exactly once — with the data, or with a keepalive. So
//! downstream data waits only for the next parked request, never for a
//! round trip, and no reply is ever unsolicited (stateful firewalls and
//! NATs drop those).
//!
//! Requests are keyed by [`SessionId`](crate::engine::SessionId), which the
//! server takes from the authenticated message a request carries, never from
//! the transport's addresses or identifiers (NATs rewrite those, and
//! resolvers send from pools).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How one poll transport paces itself: the server's hold time and the
/// client's range of outstanding requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cadence {
    /// How long the server holds a request before a keepalive answers it.
    pub hold: Duration,
    /// The fewest requests the client keeps outstanding (idle).
    pub min_outstanding: usize,
    /// The most requests the client keeps outstanding (busy downstream).
    pub max_outstanding: usize,
    /// When the client takes an unanswered request as lost: the hold plus
    /// room for a round trip and the server's one-second timer tick.
    pub request_timeout: Duration,
}

impl Cadence {
    /// ICMP echo: well inside conntrack's 30 s for ICMP, and short enough to
    /// prove liveness often. Up to half of `MAX_PARKED` bare requests out
    /// when busy: the other half is room for requests that carry data.
    pub const ICMP: Self = Self {
        hold: Duration::from_secs(5),
        min_outstanding: 2,
        max_outstanding: MAX_PARKED / 2,
        request_timeout: Duration::from_secs(7),
    };
}

/// Requests held per client; beyond this the oldest is answered at once.
pub const MAX_PARKED: usize = 128;
/// Downstream messages queued per client while no request is parked.
pub const MAX_QUEUED: usize = 1024;

/// What the server should send now: answer `request` with `message`, or
/// with a keepalive when `message` is `None`.
#[derive(Debug, PartialEq, Eq)]
pub struct Reply<'a, S, R> {
    /// The client's session.
    pub session: S,
    /// The request to answer.
    pub request: R,
    /// The message to carry, or `None` for a keepalive.
    pub message: Option<&'a [u8]>,
}

struct Queues<R> {
    parked: VecDeque<(R, Instant)>,
    queued: VecDeque<Vec<u8>>,
}

/// The server side: requests held per session, and downstream messages
/// waiting for a request. Message buffers are recycled, so the steady state
/// allocates nothing.
pub struct Parking<S, R> {
    hold: Duration,
    sessions: HashMap<S, Queues<R>>,
    spare: Vec<Vec<u8>>,
    /// The buffer of the last reply handed out, recycled on the next call.
    lent: Option<Vec<u8>>,
    dropped: u64,
}

impl<S: Copy + Eq + Hash, R> Parking<S, R> {
    /// Hold requests for at most `hold`.
    pub fn new(hold: Duration) -> Self {
        Self {
            hold,
            sessions: HashMap::new(),
            spare: Vec::new(),
            lent: None,
            dropped: 0,
        }
    }

    /// Requests held, over all sessions.
    pub fn held(&self) -> usize {
        self.sessions.values().map(|q| q.parked.len()).sum()
    }

    /// Downstream messages dropped because a client's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// A request arrived for `session`: answer it now if a message waits,
    /// else hold it. If too many are held, the oldest is released with
    /// `message: None`; the transport decides whether it needs an answer
    /// (a keepalive) or may go unanswered.
    pub fn request(&mut self, session: S, request: R, now: Instant) -> Option<Reply<'_, S, R>> {
        self.recycle();
        let q = self.sessions.entry(session).or_insert_with(|| Queues {
            parked: VecDeque::new(),
            queued: VecDeque::new(),
        });
        if let Some(message) = q.queued.pop_front() {
            return Some(self.lend(session, request, message));
        }
        q.parked.push_back((request, now));
        if q.parked.len() > MAX_PARKED {
            let (oldest, _) = q.parked.pop_front().expect("just pushed");
            return Some(Reply {
                session,
                request: oldest,
                message: None,
            });
        }
        None
    }

    /// A downstream message for `session`: send it on a held request if
    /// there is one, else queue a copy until a request comes.
    pub fn downstream(&mut self, session: S, message: &[u8]) -> Option<Reply<'_, S, R>> {
        self.recycle();
        let q = self.sessions.entry(session).or_insert_with(|| Queues {
            parked: VecDeque::new(),
            queued: VecDeque::new(),
        });
        if let Some((request, _)) = q.parked.pop_front() {
            let mut buf = self.spare.pop().unwrap_or_default();
            buf.clear();
            buf.extend_from_slice(message);
            return Some(self.lend(session, request, buf));
        }
        if q.queued.len() >= MAX_QUEUED {
            self.dropped += 1; // tail drop, as a router queue would
            return None;
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(message);
        q.queued.push_back(buf);
        None
    }

    /// The next held request that has waited `hold`; answer it with a
    /// keepalive. Call until `None` whenever [`Parking::next_timeout`] passes.
    pub fn expired(&mut self, now: Instant) -> Option<(S, R)> {
        let hold = self.hold;
        for (&session, q) in &mut self.sessions {
            if q.parked
                .front()
                .is_some_and(|(_, t)| now.saturating_duration_since(*t) >= hold)
            {
                let (request, _) = q.parked.pop_front().expect("checked");
                return Some((session, request));
            }
        }
        None
    }

    /// When the oldest held request expires.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.sessions
            .values()
            .filter_map(|q| q.parked.front().map(|(_, t)| *t + self.hold))
            .min()
    }

    /// Take one of `session`'s held requests (oldest first), to answer it now.
    pub fn take_parked(&mut self, session: S) -> Option<R> {
        self.sessions
            .get_mut(&session)?
            .parked
            .pop_front()
            .map(|(r, _)| r)
    }

    /// Forget a session (its held requests are simply never answered).
    pub fn remove(&mut self, session: S) {
        if let Some(q) = self.sessions.remove(&session) {
            self.spare.extend(q.queued);
        }
    }

    fn lend(&mut self, session: S, request: R, message: Vec<u8>) -> Reply<'_, S, R> {
        let message = self.lent.insert(message);
        Reply {
            session,
            request,
            message: Some(message),
        }
    }

    fn recycle(&mut self) {
        if let Some(buf) = self.lent.take() {
            self.spare.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD: Duration = Duration::from_secs(2);

    #[test]
    fn data_waits_for_a_request_and_requests_wait_for_data() {
        let now = Instant::now();
        let mut p: Parking<u8, u32> = Parking::new(HOLD);
        assert_eq!(p.downstream(1, b"early"), None, "no request held: queued");
        let r = p.request(1, 100, now).unwrap();
        assert_eq!((r.request, r.message), (100, Some(&b"early"[..])));
        assert_eq!(p.request(1, 101, now), None, "held");
        let r = p.downstream(1, b"late").unwrap();
        assert_eq!((r.request, r.message), (101, Some(&b"late"[..])));
    }

    #[test]
    fn sessions_are_separate() {
        let now = Instant::now();
        let mut p: Parking<u8, u32> = Parking::new(HOLD);
        assert_eq!(p.request(1, 100, now), None);
        assert_eq!(
            p.downstream(2, b"for two"),
            None,
            "session 1's request is not session 2's"
        );
        assert_eq!(p.request(2, 200, now).unwrap().request, 200);
    }

    #[test]
    fn every_request_answered_exactly_once() {
        let t0 = Instant::now();
        let mut p: Parking<u8, u32> = Parking::new(HOLD);
        let mut answered = Vec::new();
        for i in 0..(MAX_PARKED as u32 + 5) {
            if let Some(r) = p.request(1, i, t0) {
                assert_eq!(r.message, None);
                answered.push(r.request);
            }
        }
        assert_eq!(answered, [0, 1, 2, 3, 4], "overflow answers the oldest");
        assert_eq!(p.next_timeout(), Some(t0 + HOLD));
        assert_eq!(p.expired(t0 + HOLD / 2), None);
        while let Some((_, r)) = p.expired(t0 + HOLD) {
            answered.push(r);
        }
        answered.sort_unstable();
        assert_eq!(answered, (0..MAX_PARKED as u32 + 5).collect::<Vec<_>>());
        assert_eq!(p.next_timeout(), None);
    }

    #[test]
    fn queue_is_bounded() {
        let mut p: Parking<u8, u32> = Parking::new(HOLD);
        for _ in 0..MAX_QUEUED + 3 {
            assert_eq!(p.downstream(1, b"x"), None);
        }
        assert_eq!(p.dropped(), 3);
    }
}

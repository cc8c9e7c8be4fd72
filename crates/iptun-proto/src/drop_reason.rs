//! Why a packet was dropped: a flat `Copy` enum that only feeds counters, so a
//! flood of bad packets costs no allocation.

/// The reason a datagram or inner packet was not delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DropReason {
    /// Too short, wrong length or an unknown message type.
    Malformed,
    /// A data message for a receiver index we do not know (stale or forged).
    UnknownIndex,
    /// Authentication failed: the AEAD tag or the Noise handshake did not verify.
    Unauthenticated,
    /// The counter was already seen or is too old for the replay window.
    Replay,
    /// A handshake from a key the server does not admit.
    NotAllowed,
    /// A handshake whose timestamp is not newer than the last one (replayed).
    StaleHandshake,
    /// Too many handshakes from one source: its share of the budget is spent.
    RateLimited,
    /// The address pool has no free address for a new client.
    PoolExhausted,
    /// An inner packet whose source is not the sender's assigned address.
    Spoofed,
    /// An inner packet that is not IPv4/IPv6 or is truncated.
    BadInnerPacket,
    /// An inner packet for an address no client owns.
    NoRoute,
    /// No established session to send on (handshake in progress).
    NoSession,
    /// The keypair is too old or used too much to be accepted.
    Expired,
    /// The message does not fit the buffer given (a caller bug or oversize packet).
    TooLarge,
    /// A handshake response that does not match our pending handshake.
    UnexpectedResponse,
    /// A handshake the server had no budget left for (it is under load).
    UnderLoad,
}

impl DropReason {
    /// All reasons, in counter order.
    pub const ALL: [Self; 16] = [
        Self::Malformed,
        Self::UnknownIndex,
        Self::Unauthenticated,
        Self::Replay,
        Self::NotAllowed,
        Self::StaleHandshake,
        Self::RateLimited,
        Self::PoolExhausted,
        Self::Spoofed,
        Self::BadInnerPacket,
        Self::NoRoute,
        Self::NoSession,
        Self::Expired,
        Self::TooLarge,
        Self::UnexpectedResponse,
        Self::UnderLoad,
    ];

    /// A short stable name for status output and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnknownIndex => "unknown_index",
            Self::Unauthenticated => "unauthenticated",
            Self::Replay => "replay",
            Self::NotAllowed => "not_allowed",
            Self::StaleHandshake => "stale_handshake",
            Self::RateLimited => "rate_limited",
            Self::PoolExhausted => "pool_exhausted",
            Self::Spoofed => "spoofed_source",
            Self::BadInnerPacket => "bad_inner_packet",
            Self::NoRoute => "no_route",
            Self::NoSession => "no_session",
            Self::Expired => "expired",
            Self::TooLarge => "too_large",
            Self::UnexpectedResponse => "unexpected_response",
            Self::UnderLoad => "under_load",
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One counter per [`DropReason`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounters([u64; DropReason::ALL.len()]);

impl DropCounters {
    /// Count one drop.
    pub fn add(&mut self, reason: DropReason) {
        self.0[reason as usize] += 1;
    }

    /// The count for one reason.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason as usize]
    }

    /// Add all of `other`'s counts.
    pub fn merge(&mut self, other: &Self) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    /// The sum over all reasons.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// Non-zero counters with their names.
    pub fn nonzero(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL
            .iter()
            .map(|&r| (r, self.get(r)))
            .filter(|&(_, n)| n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_discriminant_order() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}

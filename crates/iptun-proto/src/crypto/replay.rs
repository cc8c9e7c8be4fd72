//! A sliding replay window over 64-bit counters (the bitmap scheme of
//! RFC 6479, as WireGuard uses): O(1) per packet, 256 bytes of state, and
//! it tolerates reordering within the last [`ReplayWindow::SIZE`] counters.
//! Wider windows (`ReplayWindow<WORDS>`) serve polled transports, whose
//! requests come reordered by more (several resolvers at once).

const BITS: u64 = 64;

/// Tracks which counters were already received: `WORDS` words of 64 bits,
/// `(WORDS - 1) * 64` counters.
#[derive(Clone, Debug)]
pub struct ReplayWindow<const WORDS: usize = 32> {
    /// The highest counter accepted so far (meaningless until `any`).
    last: u64,
    any: bool,
    bitmap: [u64; WORDS],
}

impl<const WORDS: usize> Default for ReplayWindow<WORDS> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const WORDS: usize> ReplayWindow<WORDS> {
    /// How far behind the highest counter a packet may arrive and still be accepted.
    /// One word of the ring is always being reused, hence the `- 1`.
    pub const SIZE: u64 = (WORDS as u64 - 1) * BITS;

    /// An empty window.
    pub const fn new() -> Self {
        Self {
            last: 0,
            any: false,
            bitmap: [0; WORDS],
        }
    }

    /// Whether `counter` would be accepted. Cheap: call it before decrypting.
    pub fn is_fresh(&self, counter: u64) -> bool {
        if !self.any || counter > self.last {
            return true;
        }
        self.last - counter < Self::SIZE && !self.bit(counter)
    }

    /// The highest counter accepted so far, if any.
    pub fn last(&self) -> Option<u64> {
        self.any.then_some(self.last)
    }

    /// Whether `counter` is above every counter accepted so far: the
    /// newest message, not one delayed behind others.
    pub fn is_newest(&self, counter: u64) -> bool {
        !self.any || counter > self.last
    }

    /// Record `counter` as received; false if it was a replay or too old.
    /// Call only after the message authenticated.
    pub fn accept(&mut self, counter: u64) -> bool {
        if !self.is_fresh(counter) {
            return false;
        }
        if !self.any || counter > self.last {
            self.advance_to(counter);
        }
        let (word, bit) = Self::slot(counter);
        self.bitmap[word] |= bit;
        true
    }

    fn advance_to(&mut self, counter: u64) {
        let new_block = counter / BITS;
        if !self.any {
            self.bitmap = [0; WORDS];
        } else {
            let old_block = self.last / BITS;
            let clear = (new_block - old_block).min(WORDS as u64);
            for i in 1..=clear {
                self.bitmap[((old_block + i) % WORDS as u64) as usize] = 0;
            }
        }
        self.last = counter;
        self.any = true;
    }

    fn bit(&self, counter: u64) -> bool {
        let (word, bit) = Self::slot(counter);
        self.bitmap[word] & bit != 0
    }

    fn slot(counter: u64) -> (usize, u64) {
        (
            ((counter / BITS) % WORDS as u64) as usize,
            1 << (counter % BITS),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn in_order_then_replay() {
        let mut w: ReplayWindow = ReplayWindow::new();
        for c in 0..5000 {
            assert!(w.accept(c));
        }
        for c in 4990..5000 {
            assert!(!w.accept(c), "{c} replayed");
        }
    }

    #[test]
    fn reordering_within_window() {
        let mut w: ReplayWindow = ReplayWindow::new();
        assert!(w.accept(100));
        assert!(w.accept(50));
        assert!(w.accept(99));
        assert!(!w.accept(50));
        assert!(w.accept(3000));
        assert!(
            !w.accept(3000 - <ReplayWindow>::SIZE),
            "exactly SIZE behind is too old"
        );
        assert!(w.accept(3001 - <ReplayWindow>::SIZE));
    }

    #[test]
    fn big_jump_clears_everything() {
        let mut w: ReplayWindow = ReplayWindow::new();
        assert!(w.accept(7));
        assert!(w.accept(1_000_000));
        assert!(w.accept(1_000_000 - 7));
        assert!(!w.accept(7));
    }

    proptest! {
        // Against a model: accept iff never seen and within the window of the max so far.
        #[test]
        fn matches_model(counters in proptest::collection::vec(0u64..5000, 1..400)) {
            let mut w: ReplayWindow = ReplayWindow::new();
            let mut seen = HashSet::new();
            let mut max: Option<u64> = None;
            for c in counters {
                let fresh = !seen.contains(&c) && max.is_none_or(|m| c > m || m - c < <ReplayWindow>::SIZE);
                prop_assert_eq!(w.accept(c), fresh, "counter {}", c);
                if fresh {
                    seen.insert(c);
                    max = Some(max.map_or(c, |m| m.max(c)));
                }
            }
        }
    }
}

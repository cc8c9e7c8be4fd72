//! Fragmentation and reassembly of tunnel messages, for transports that carry
//! less than a whole message per packet (DNS: about 100–150 bytes up per
//! query, 500–1200 down per answer).
//!
//! Messages are split *after* encryption, so a fragment carries opaque bytes
//! and nothing here is authenticated. The reassembler therefore trusts no
//! fragment: it bounds what any sender can make it hold (partial messages per
//! key, a byte budget, a timeout), and a forged fragment can at worst spoil
//! the message it names — which the AEAD would reject anyway. There is no
//! retransmission: a lost fragment loses its message, and the inner TCP
//! recovers.
//!
//! Every fragment starts with a 4-byte header, also when the message fits in
//! one fragment (so a receiver never has to guess). Integers are big-endian
//! (network order, as in the transports' own headers):
//!
//! ```text
//! | msg_id u16 | index u8 | count u8 | chunk (the rest of the packet) |
//! ```
//!
//! - `msg_id`: the sender's message counter (it wraps); with the sender's key
//!   (which the transport supplies) it names the message.
//! - `count`: fragments in the message, 1..=255; `index` < `count`.
//! - All chunks but the last have one length; the last has 1 to that many
//!   bytes. The receiver learns the chunk length from any fragment but the
//!   last, so fragments may arrive in any order. A chunk is empty only in a
//!   message of one fragment (the empty message).
//!
//! [`Fragmenter`] spreads a message evenly over as few fragments as fit the
//! transport's packet, and [`Reassembler`] puts them back together:
//!
//! - fragments may come in any order and more than once; a repeat is
//!   ignored (the first copy wins), also after its message was delivered;
//! - a fragment whose count, or chunk length, disagrees with the fragments
//!   already held for its id restarts that message with itself alone;
//! - a partial message is dropped `timeout` after its first fragment, and
//!   the oldest is evicted when a key holds too many or the bytes run out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

use crate::DropReason;

/// Bytes of the fragment header.
pub const HEADER_LEN: usize = 4;
/// The largest message: what one UDP datagram can carry.
pub const MAX_MESSAGE_LEN: usize = u16::MAX as usize;
/// The most fragments a message can have (`count` is one byte).
pub const MAX_FRAGMENTS: usize = u8::MAX as usize;
/// Completed messages remembered (over all keys, each for at most
/// [`Limits::timeout`]) so that late duplicates of their fragments are not
/// delivered again or held as a new partial message. Far below the 65536
/// message ids, so a sender's counter never wraps into a remembered id; and
/// the time bound means a restarted sender whose new ids happen to meet its
/// old ones loses messages for at most the timeout.
pub const REMEMBERED: usize = 4096;

/// One fragment, borrowing its chunk from the packet or from the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment<'a> {
    /// The sender's number for the message.
    pub msg_id: u16,
    /// This fragment's place in the message, below `count`.
    pub index: u8,
    /// Fragments in the message, at least 1.
    pub count: u8,
    /// This fragment's share of the message.
    pub chunk: &'a [u8],
}

impl<'a> Fragment<'a> {
    /// Parse a packet. Never panics.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, DropReason> {
        let Some((&[id_hi, id_lo, index, count], chunk)) = bytes.split_first_chunk::<HEADER_LEN>()
        else {
            return Err(DropReason::Malformed);
        };
        let fragment = Self {
            msg_id: u16::from_be_bytes([id_hi, id_lo]),
            index,
            count,
            chunk,
        };
        if fragment.is_valid() {
            Ok(fragment)
        } else {
            Err(DropReason::Malformed)
        }
    }

    /// Whether the fields obey the format's rules (see the module doc); a
    /// [`Reassembler`] ignores a fragment that does not.
    pub fn is_valid(&self) -> bool {
        self.index < self.count
            && self.chunk.len() <= MAX_MESSAGE_LEN
            && (self.count == 1 || !self.chunk.is_empty())
    }

    /// Bytes of the fragment on the wire: header and chunk.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.chunk.len()
    }

    /// Write header and chunk to the start of `out`, returning the length;
    /// [`DropReason::TooLarge`] if `out` is too short.
    pub fn emit(&self, out: &mut [u8]) -> Result<usize, DropReason> {
        let out = out.get_mut(..self.wire_len()).ok_or(DropReason::TooLarge)?;
        let (header, chunk) = out.split_at_mut(HEADER_LEN);
        header[..2].copy_from_slice(&self.msg_id.to_be_bytes());
        header[2] = self.index;
        header[3] = self.count;
        chunk.copy_from_slice(self.chunk);
        Ok(self.wire_len())
    }
}

/// Numbers messages and splits them into fragments, without allocating.
#[derive(Debug)]
pub struct Fragmenter {
    next_id: u16,
}

impl Fragmenter {
    /// Number messages from `first_id`. Pick it at random: a restarted
    /// sender then rarely reuses an id its peer still remembers as done.
    pub fn new(first_id: u16) -> Self {
        Self { next_id: first_id }
    }

    /// Split `message` into fragments of at most `max_fragment_len` bytes
    /// (header included), taking the next message id.
    /// [`DropReason::TooLarge`] if the message is longer than
    /// [`MAX_MESSAGE_LEN`] or would need more than [`MAX_FRAGMENTS`].
    pub fn split<'m>(
        &mut self,
        message: &'m [u8],
        max_fragment_len: usize,
    ) -> Result<Split<'m>, DropReason> {
        let (count, chunk_len) = layout(message.len(), max_fragment_len)?;
        let msg_id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        Ok(Split {
            message,
            msg_id,
            count,
            chunk_len,
        })
    }
}

/// How many fragments `len` bytes need, and the chunk length. The chunks are
/// made as even as they can be (so 1001 bytes in 100-byte chunks go as 11
/// chunks of 91, not 10 of 100 and one of 1): fragments look alike, and the
/// last one is never a runt.
fn layout(len: usize, max_fragment_len: usize) -> Result<(u8, usize), DropReason> {
    let room = max_fragment_len
        .checked_sub(HEADER_LEN)
        .ok_or(DropReason::TooLarge)?;
    if len > MAX_MESSAGE_LEN {
        return Err(DropReason::TooLarge);
    }
    if len == 0 {
        return Ok((1, 0));
    }
    if room == 0 {
        return Err(DropReason::TooLarge);
    }
    let count = u8::try_from(len.div_ceil(room)).map_err(|_| DropReason::TooLarge)?;
    Ok((count, len.div_ceil(usize::from(count))))
}

/// A message split into fragments: take them with [`Split::fragments`], or
/// write one at a time with [`Split::write`].
#[derive(Clone, Copy, Debug)]
pub struct Split<'m> {
    message: &'m [u8],
    msg_id: u16,
    count: u8,
    chunk_len: usize,
}

impl<'m> Split<'m> {
    /// The message's id.
    pub fn msg_id(&self) -> u16 {
        self.msg_id
    }

    /// How many fragments there are.
    pub fn count(&self) -> u8 {
        self.count
    }

    /// The fragment at `index`, or `None` past the last.
    pub fn fragment(&self, index: u8) -> Option<Fragment<'m>> {
        (index < self.count).then(|| self.at(index))
    }

    /// Write the fragment at `index` to `out`, returning its length;
    /// [`DropReason::TooLarge`] if `out` is too short or `index` is past the last.
    pub fn write(&self, index: u8, out: &mut [u8]) -> Result<usize, DropReason> {
        self.fragment(index).ok_or(DropReason::TooLarge)?.emit(out)
    }

    /// All fragments, in order.
    pub fn fragments(self) -> impl ExactSizeIterator<Item = Fragment<'m>> {
        (0..self.count).map(move |index| self.at(index))
    }

    fn at(&self, index: u8) -> Fragment<'m> {
        let len = self.message.len();
        let start = (usize::from(index) * self.chunk_len).min(len);
        let end = (start + self.chunk_len).min(len);
        Fragment {
            msg_id: self.msg_id,
            index,
            count: self.count,
            chunk: &self.message[start..end],
        }
    }
}

/// What a [`Reassembler`] may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A partial message is dropped this long after its first fragment came.
    /// Short: a lost fragment is never resent, so waiting longer only holds
    /// memory.
    pub timeout: Duration,
    /// Partial messages per sender key; a new one beyond this evicts that
    /// key's oldest. At least 1.
    pub max_partials_per_key: usize,
    /// Bytes held over all keys: partial messages' buffers, the spare
    /// buffers kept for reuse and a fixed cost per partial message
    /// ([`Reassembler::PARTIAL_COST`]). Going over evicts the oldest partial
    /// message. A message that cannot fit alone is dropped.
    pub max_bytes: usize,
}

impl Default for Limits {
    /// 5 s, 16 partials per key, 4 MiB: a few full-size messages in flight
    /// for each of a few hundred clients.
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            max_partials_per_key: 16,
            max_bytes: 4 << 20,
        }
    }
}

/// What happened to fragments and messages, for status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReassemblyCounters {
    /// Messages delivered whole.
    pub completed: u64,
    /// Partial messages dropped by the timeout.
    pub expired: u64,
    /// Partial messages dropped to honour the limits.
    pub evicted: u64,
    /// Fragments already received (or of a message already delivered), ignored.
    pub duplicate: u64,
    /// Fragments whose count or length disagreed with their message's
    /// others; each restarted that message.
    pub inconsistent: u64,
    /// Messages dropped because they would exceed [`MAX_MESSAGE_LEN`] or
    /// cannot fit in [`Limits::max_bytes`].
    pub oversized: u64,
}

/// A message being reassembled.
struct Partial<K> {
    key: K,
    msg_id: u16,
    /// Creation number: tells a live entry of `order` from a stale one.
    seq: u64,
    started: Instant,
    count: u8,
    /// 0 until a fragment other than the last arrives.
    chunk_len: usize,
    /// 0 until the last fragment arrives.
    last_len: usize,
    received: [u64; 4],
    missing: u8,
    /// Chunk `i` at `i * chunk_len`; until the chunk length is known, the
    /// last chunk (if it came first) at 0.
    buf: Vec<u8>,
}

impl<K> Partial<K> {
    fn has(&self, index: u8) -> bool {
        self.received[usize::from(index / 64)] & (1 << (index % 64)) != 0
    }

    fn mark(&mut self, index: u8) {
        self.received[usize::from(index / 64)] |= 1 << (index % 64);
        self.missing -= 1;
    }
}

/// How a fragment relates to the partial message of its id.
enum Fit {
    Fits,
    Duplicate,
    Inconsistent,
}

/// Puts fragments back into messages, per sender key `K` (which the
/// transport supplies, e.g. a client's tag). Buffers are recycled, so the
/// steady state allocates nothing.
///
/// Memory: at most [`Limits::max_bytes`] (see there), plus the message last
/// returned (up to [`MAX_MESSAGE_LEN`]), plus [`REMEMBERED`] completed ids
/// (about 40 bytes each for a 4-byte key).
pub struct Reassembler<K> {
    limits: Limits,
    /// Partial messages, by slot; free slots are reused.
    slots: Vec<Option<Partial<K>>>,
    free: Vec<usize>,
    index: HashMap<(K, u16), usize>,
    /// Each key's partial messages' slots, oldest first.
    per_key: HashMap<K, Vec<usize>>,
    spare_lists: Vec<Vec<usize>>,
    /// (slot, seq) in creation order, oldest first; entries of removed
    /// partials are skipped (the front is always live) and compacted away.
    order: VecDeque<(usize, u64)>,
    next_seq: u64,
    /// Recently completed messages, and when (the order to forget them in).
    done: HashSet<(K, u16)>,
    done_order: VecDeque<((K, u16), Instant)>,
    spare: Vec<Vec<u8>>,
    /// Bytes counted against `limits.max_bytes`.
    held: usize,
    /// The buffer of the last message returned, recycled on the next call.
    lent: Option<Vec<u8>>,
    counters: ReassemblyCounters,
}

impl<K: Copy + Eq + Hash> Reassembler<K> {
    /// What each partial message costs besides its buffer: its slot and its
    /// entries in the maps and queues (about 220 bytes for a 4-byte key on
    /// a 64-bit target). Charging it bounds the number of partial messages,
    /// even of tiny ones.
    pub const PARTIAL_COST: usize = size_of::<Option<Partial<K>>>()
        + 2 * size_of::<((K, u16), usize)>()
        + size_of::<(K, Vec<usize>)>()
        + 3 * size_of::<(usize, u64)>()
        + size_of::<usize>();

    /// An empty reassembler.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits: Limits {
                max_partials_per_key: limits.max_partials_per_key.max(1),
                ..limits
            },
            slots: Vec::new(),
            free: Vec::new(),
            index: HashMap::new(),
            per_key: HashMap::new(),
            spare_lists: Vec::new(),
            order: VecDeque::new(),
            next_seq: 0,
            done: HashSet::new(),
            done_order: VecDeque::new(),
            spare: Vec::new(),
            held: 0,
            lent: None,
            counters: ReassemblyCounters::default(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The counters so far.
    pub fn counters(&self) -> ReassemblyCounters {
        self.counters
    }

    /// Partial messages held.
    pub fn partials(&self) -> usize {
        self.index.len()
    }

    /// Bytes counted against [`Limits::max_bytes`]; never more than it.
    pub fn held_bytes(&self) -> usize {
        self.held
    }

    /// A fragment from `key`: the whole message when this was its last
    /// missing fragment. A message of one fragment comes back without a copy.
    /// Partial messages past the timeout are dropped first.
    pub fn push<'a>(
        &'a mut self,
        now: Instant,
        key: K,
        fragment: Fragment<'a>,
    ) -> Option<&'a [u8]> {
        self.expire(now);
        if !fragment.is_valid() {
            return None; // only a caller's own fragment can be: parse checks
        }
        let id = (key, fragment.msg_id);
        if self.done.contains(&id) {
            self.counters.duplicate += 1;
            return None;
        }
        let mut slot = self.index.get(&id).copied();
        if let Some(s) = slot {
            match self.fit(s, &fragment) {
                Fit::Fits => {}
                Fit::Duplicate => {
                    self.counters.duplicate += 1;
                    return None;
                }
                Fit::Inconsistent => {
                    self.counters.inconsistent += 1;
                    self.discard(s);
                    slot = None;
                }
            }
        }
        let slot = match slot {
            Some(slot) => slot,
            None if fragment.count == 1 => {
                self.remember(id, now);
                self.counters.completed += 1;
                return Some(fragment.chunk);
            }
            None => self.start(now, key, &fragment)?,
        };
        self.insert(now, slot, &fragment)
    }

    /// Drop partial messages whose first fragment came `timeout` ago or
    /// more; returns how many. Call when [`Reassembler::next_timeout`]
    /// passes (a push also does it).
    pub fn expire(&mut self, now: Instant) -> usize {
        if let Some(buf) = self.lent.take() {
            self.recycle(buf);
        }
        self.forget_done(now);
        let mut expired = 0;
        while let Some(&(slot, _)) = self.order.front() {
            if now.saturating_duration_since(self.partial(slot).started) < self.limits.timeout {
                break;
            }
            self.discard(slot);
            expired += 1;
        }
        self.counters.expired += expired as u64;
        expired
    }

    /// When the oldest partial message expires.
    pub fn next_timeout(&self) -> Option<Instant> {
        let &(slot, _) = self.order.front()?;
        Some(self.partial(slot).started + self.limits.timeout)
    }

    fn fit(&self, slot: usize, f: &Fragment<'_>) -> Fit {
        let p = self.partial(slot);
        if f.count != p.count {
            return Fit::Inconsistent;
        }
        if p.has(f.index) {
            return Fit::Duplicate;
        }
        let len = f.chunk.len();
        let agrees = if f.index == p.count - 1 {
            p.chunk_len == 0 || len <= p.chunk_len
        } else {
            (p.chunk_len == 0 || len == p.chunk_len) && len >= p.last_len
        };
        if agrees { Fit::Fits } else { Fit::Inconsistent }
    }

    /// A new partial message for `f`, within the per-key and byte limits.
    fn start(&mut self, now: Instant, key: K, f: &Fragment<'_>) -> Option<usize> {
        while let Some(&oldest) = self
            .per_key
            .get(&key)
            .filter(|slots| slots.len() >= self.limits.max_partials_per_key)
            .and_then(|slots| slots.first())
        {
            self.evict(oldest);
        }
        if !self.make_room(Self::PARTIAL_COST, None) {
            self.counters.oversized += 1;
            return None;
        }
        // A spare buffer is already counted in `held`; it now counts as this one's.
        let buf = self.spare.pop().unwrap_or_default();
        self.held += Self::PARTIAL_COST;
        let seq = self.next_seq;
        self.next_seq += 1;
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        self.slots[slot] = Some(Partial {
            key,
            msg_id: f.msg_id,
            seq,
            started: now,
            count: f.count,
            chunk_len: 0,
            last_len: 0,
            received: [0; 4],
            missing: f.count,
            buf,
        });
        self.index.insert((key, f.msg_id), slot);
        let spare_lists = &mut self.spare_lists;
        self.per_key
            .entry(key)
            .or_insert_with(|| spare_lists.pop().unwrap_or_default())
            .push(slot);
        self.order.push_back((slot, seq));
        Some(slot)
    }

    /// Copy a fitting fragment in; the message if it is now complete.
    fn insert(&mut self, now: Instant, slot: usize, f: &Fragment<'_>) -> Option<&[u8]> {
        let p = self.partial(slot);
        let (count, known_chunk, last_len) = (usize::from(p.count), p.chunk_len, p.last_len);
        let len = f.chunk.len();
        let is_last = usize::from(f.index) == count - 1;
        let chunk_len = if is_last { known_chunk } else { len };
        if chunk_len > 0 {
            let least = (count - 1) * chunk_len + if is_last { len } else { last_len.max(1) };
            if least > MAX_MESSAGE_LEN {
                self.counters.oversized += 1;
                self.discard(slot);
                return None;
            }
        }
        let need = match chunk_len {
            0 => len,
            _ => (count * chunk_len).min(MAX_MESSAGE_LEN),
        };
        if !self.reserve(slot, need) {
            self.counters.oversized += 1;
            self.discard(slot);
            return None;
        }
        let p = self.partial_mut(slot);
        if is_last {
            p.buf.extend_from_slice(f.chunk); // at 0, or after all other chunks' room
            p.last_len = len;
        } else {
            if known_chunk == 0 {
                // The chunk length is now known: make room, and move the
                // last chunk (if it came first) to its place.
                p.chunk_len = len;
                let last_at = (count - 1) * len;
                p.buf.resize(last_at + last_len, 0);
                p.buf.copy_within(..last_len, last_at);
            }
            let at = usize::from(f.index) * len;
            p.buf[at..at + len].copy_from_slice(f.chunk);
        }
        p.mark(f.index);
        if p.missing > 0 {
            return None;
        }
        let done = self.remove(slot);
        self.remember((done.key, done.msg_id), now);
        self.counters.completed += 1;
        Some(self.lent.insert(done.buf))
    }

    /// Make `slot`'s buffer hold at least `need` bytes within the budget.
    fn reserve(&mut self, slot: usize, need: usize) -> bool {
        let cap = self.partial(slot).buf.capacity();
        if need <= cap {
            return true;
        }
        if !self.make_room(need - cap, Some(slot)) {
            return false;
        }
        let buf = &mut self.partial_mut(slot).buf;
        buf.reserve_exact(need - buf.len());
        self.held += buf.capacity() - cap;
        // An allocator may round up: stay within the budget all the same.
        self.make_room(0, Some(slot))
    }

    /// Bring `held + extra` within the budget: free spare buffers first,
    /// then evict the oldest partial messages other than `keep`.
    fn make_room(&mut self, extra: usize, keep: Option<usize>) -> bool {
        while self.held + extra > self.limits.max_bytes {
            if let Some(buf) = self.spare.pop() {
                self.held -= buf.capacity();
                continue;
            }
            let slots = &self.slots;
            let Some(&(victim, _)) = self
                .order
                .iter()
                .find(|&&(s, seq)| Some(s) != keep && is_live(slots, s, seq))
            else {
                return false;
            };
            self.evict(victim);
        }
        true
    }

    /// Drop a partial message to honour a limit.
    fn evict(&mut self, slot: usize) {
        self.discard(slot);
        self.counters.evicted += 1;
    }

    /// Drop a partial message and keep its buffer for reuse.
    fn discard(&mut self, slot: usize) {
        let p = self.remove(slot);
        self.recycle(p.buf);
    }

    /// Take a partial message out of every structure and the budget.
    fn remove(&mut self, slot: usize) -> Partial<K> {
        let p = self.slots[slot].take().expect("removing a live slot");
        self.free.push(slot);
        self.index.remove(&(p.key, p.msg_id));
        if let Some(slots) = self.per_key.get_mut(&p.key) {
            slots.retain(|&s| s != slot);
            if slots.is_empty() {
                let list = self.per_key.remove(&p.key).expect("just seen");
                self.spare_lists.push(list);
            }
        }
        self.held -= p.buf.capacity() + Self::PARTIAL_COST;
        self.tidy_order();
        p
    }

    /// Keep the front of `order` live, and its stale entries few.
    fn tidy_order(&mut self) {
        let slots = &self.slots;
        while let Some(&(s, seq)) = self.order.front() {
            if is_live(slots, s, seq) {
                break;
            }
            self.order.pop_front();
        }
        if self.order.len() > 2 * self.index.len() + 64 {
            self.order.retain(|&(s, seq)| is_live(slots, s, seq));
        }
    }

    /// Keep a buffer for reuse if the budget allows.
    fn recycle(&mut self, mut buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap > 0 && self.held + cap <= self.limits.max_bytes {
            buf.clear();
            self.held += cap;
            self.spare.push(buf);
        }
    }

    fn remember(&mut self, id: (K, u16), now: Instant) {
        if self.done.insert(id) {
            self.done_order.push_back((id, now));
        }
        if self.done_order.len() > REMEMBERED {
            let (old, _) = self.done_order.pop_front().expect("not empty");
            self.done.remove(&old);
        }
    }

    /// Forget completed messages older than the timeout: their duplicates
    /// are unlikely by now, and their ids may be a restarted sender's again.
    fn forget_done(&mut self, now: Instant) {
        while let Some(&(id, at)) = self.done_order.front() {
            if now.saturating_duration_since(at) < self.limits.timeout {
                break;
            }
            self.done_order.pop_front();
            self.done.remove(&id);
        }
    }

    fn partial(&self, slot: usize) -> &Partial<K> {
        self.slots[slot].as_ref().expect("a live slot")
    }

    fn partial_mut(&mut self, slot: usize) -> &mut Partial<K> {
        self.slots[slot].as_mut().expect("a live slot")
    }
}

fn is_live<K>(slots: &[Option<Partial<K>>], slot: usize, seq: u64) -> bool {
    slots[slot].as_ref().is_some_and(|p| p.seq == seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    static FRAGMENT_BYTES: [u8; 7] = [
        0x12, 0x34, // msg_id 0x1234
        0x01, // index 1
        0x03, // count 3
        0xaa, 0xbb, 0xcc, // chunk
    ];

    const TIMEOUT: Duration = Duration::from_secs(3);

    fn limits() -> Limits {
        Limits {
            timeout: TIMEOUT,
            ..Limits::default()
        }
    }

    /// Fragments as owned packets, in order.
    fn packets(split: Split<'_>) -> Vec<Vec<u8>> {
        split
            .fragments()
            .map(|f| {
                let mut out = vec![0; f.wire_len()];
                f.emit(&mut out).unwrap();
                out
            })
            .collect()
    }

    /// Push packets; every message delivered, in delivery order.
    fn deliver<K: Copy + Eq + Hash>(
        r: &mut Reassembler<K>,
        now: Instant,
        packets: &[(K, Vec<u8>)],
    ) -> Vec<(K, Vec<u8>)> {
        let mut out = Vec::new();
        for (key, p) in packets {
            let f = Fragment::parse(p).unwrap();
            if let Some(m) = r.push(now, *key, f) {
                out.push((*key, m.to_vec()));
            }
        }
        out
    }

    /// A deterministic shuffle (splitmix64), so proptest shrinks well.
    fn shuffle<T>(items: &mut [T], mut seed: u64) {
        for i in (1..items.len()).rev() {
            seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            items.swap(i, ((z ^ (z >> 31)) % (i as u64 + 1)) as usize);
        }
    }

    fn message(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn parse_header() {
        let f = Fragment::parse(&FRAGMENT_BYTES).unwrap();
        assert_eq!(
            f,
            Fragment {
                msg_id: 0x1234,
                index: 1,
                count: 3,
                chunk: &[0xaa, 0xbb, 0xcc]
            }
        );
        let mut out = [0u8; 7];
        assert_eq!(f.emit(&mut out), Ok(7));
        assert_eq!(out, FRAGMENT_BYTES);
        assert_eq!(f.emit(&mut out[..6]), Err(DropReason::TooLarge));
    }

    #[test]
    fn parse_rejects_bad_headers() {
        for bad in [
            &[][..],
            &[0x12, 0x34, 0x00],       // short
            &[0x12, 0x34, 0x00, 0x00], // count 0
            &[0x12, 0x34, 0x03, 0x03, 0xaa],
            &[0x12, 0x34, 0x00, 0x02], // empty chunk in a message of 2
        ] {
            assert_eq!(Fragment::parse(bad), Err(DropReason::Malformed), "{bad:?}");
        }
        let empty = Fragment::parse(&[0x00, 0x07, 0x00, 0x01]).unwrap();
        assert_eq!((empty.msg_id, empty.count, empty.chunk), (7, 1, &[][..]));
    }

    #[test]
    fn split_spreads_evenly() {
        let mut fr = Fragmenter::new(0xfffe);
        let m = message(1001);
        let s = fr.split(&m, 104).unwrap();
        assert_eq!((s.msg_id(), s.count()), (0xfffe, 11));
        let lens: Vec<usize> = s.fragments().map(|f| f.chunk.len()).collect();
        assert_eq!(lens, [91; 11]);
        let s = fr.split(&m[..1000], 104).unwrap();
        assert_eq!((s.msg_id(), s.count()), (0xffff, 10));
        assert!(s.fragments().all(|f| f.chunk.len() == 100));
        let s = fr.split(&[], 4).unwrap();
        assert_eq!((s.msg_id(), s.count()), (0, 1), "ids wrap");
        assert_eq!(
            packets(s),
            [vec![0, 0, 0, 1]],
            "the empty message is one header"
        );
    }

    #[test]
    fn split_refuses_what_cannot_be_framed() {
        let mut fr = Fragmenter::new(0);
        let m = message(MAX_MESSAGE_LEN + 1);
        assert_eq!(fr.split(&m[..1], 4).err(), Some(DropReason::TooLarge));
        assert_eq!(fr.split(&[], 3).err(), Some(DropReason::TooLarge));
        assert!(fr.split(&m[..255], 5).is_ok());
        assert_eq!(fr.split(&m[..256], 5).err(), Some(DropReason::TooLarge));
        assert_eq!(fr.split(&m, 1 << 20).err(), Some(DropReason::TooLarge));
        let s = fr.split(&m[..MAX_MESSAGE_LEN], 1 << 20).unwrap();
        assert_eq!(s.msg_id(), 1, "a refused message takes no id");
        let mut out = [0u8; 8];
        assert_eq!(s.write(1, &mut out), Err(DropReason::TooLarge));
        assert_eq!(s.write(0, &mut out), Err(DropReason::TooLarge));
    }

    #[test]
    fn round_trips_many_sizes() {
        let t0 = Instant::now();
        let mut r = Reassembler::new(limits());
        let mut fr = Fragmenter::new(9);
        let mut out = vec![0u8; 1 << 17];
        for len in [0, 1, 2, 3, 50, 99, 100, 101, 255, 1000, 1452, 4000, 65535] {
            let m = message(len);
            for max in [5, 6, 20, 104, 150, 512, 1200, 1500, 1 << 17] {
                let Ok(s) = fr.split(&m, max) else {
                    assert!(len.div_ceil(max - HEADER_LEN) > MAX_FRAGMENTS);
                    continue;
                };
                assert_eq!(usize::from(s.count()), len.div_ceil(max - 4).max(1));
                let mut got = None;
                for i in 0..s.count() {
                    let n = s.write(i, &mut out).unwrap();
                    assert!(n <= max);
                    let f = Fragment::parse(&out[..n]).unwrap();
                    assert!(got.is_none(), "delivered before the last fragment");
                    got = r.push(t0, 1u8, f).map(<[u8]>::to_vec);
                }
                assert_eq!(got.as_deref(), Some(&m[..]), "len {len} max {max}");
            }
        }
        assert_eq!(r.partials(), 0);
    }

    #[test]
    fn duplicates_never_corrupt_and_are_not_redelivered() {
        let t0 = Instant::now();
        let mut r = Reassembler::new(limits());
        let m = message(30);
        let s = Fragmenter::new(5).split(&m, 14).unwrap(); // 3 chunks of 10
        // Same id, index and length as the real fragment 1, other bytes.
        let forged = [&[0, 5, 1, 3][..], &[0xff; 10]].concat();
        let p = packets(s);
        let mut feed = vec![(1u8, p[1].clone()), (1, forged.to_vec())];
        feed.extend([(1, p[0].clone()), (1, p[2].clone()), (1, p[0].clone())]);
        assert_eq!(deliver(&mut r, t0, &feed), [(1, m)]);
        assert_eq!(r.counters().duplicate, 2);
        // A one-fragment message is not delivered twice either.
        let one = packets(Fragmenter::new(6).split(b"hi", 100).unwrap());
        let feed = [(1u8, one[0].clone()), (1, one[0].clone())];
        assert_eq!(deliver(&mut r, t0, &feed), [(1, b"hi".to_vec())]);
        assert_eq!(r.counters().duplicate, 3);
        // Completed ids are forgotten after the timeout: the id is free again.
        let feed = [(1u8, one[0].clone())];
        assert_eq!(deliver(&mut r, t0 + TIMEOUT / 2, &feed), []);
        assert_eq!(deliver(&mut r, t0 + TIMEOUT, &feed), [(1, b"hi".to_vec())]);
        assert_eq!(r.counters().duplicate, 4);
    }

    #[test]
    fn disagreeing_count_or_length_restarts_the_message() {
        let t0 = Instant::now();
        let mut r = Reassembler::new(limits());
        let m = message(20);
        let two = packets(Fragmenter::new(8).split(&m, 14).unwrap()); // 2 × 10
        let three = packets(Fragmenter::new(8).split(&m, 11).unwrap()); // 3 × 7 (last 6)
        let feed = [
            (1u8, three[0].clone()),
            (1, two[1].clone()),
            (1, two[0].clone()),
        ];
        assert_eq!(deliver(&mut r, t0, &feed), [(1, m.clone())]);
        assert_eq!(r.counters().inconsistent, 1);
        // Lengths: chunks but the last alike, the last no longer than they.
        let base = packets(Fragmenter::new(9).split(&m, 11).unwrap()); // 7, 7, 6
        let with = |p: &[u8], extra: usize| {
            let mut p = p.to_vec();
            p.resize(p.len() + extra, 0);
            p
        };
        let scenarios = [
            [base[0].clone(), with(&base[1], 1)], // a middle chunk of 8 after one of 7
            [base[0].clone(), with(&base[2], 2)], // a last chunk of 8 after one of 7
            [base[2].clone(), base[0][..HEADER_LEN + 5].to_vec()], // 5 after a last of 6
        ];
        for (key, [a, b]) in (2u8..).zip(scenarios) {
            assert_eq!(deliver(&mut r, t0, &[(key, a), (key, b)]), []);
        }
        assert_eq!(r.counters().inconsistent, 4);
        assert_eq!(r.partials(), 3, "each restarted with the newcomer alone");
        assert_eq!(r.counters().duplicate, 0);
    }

    #[test]
    fn a_lost_fragment_expires() {
        let t0 = Instant::now();
        let mut r = Reassembler::new(limits());
        let m = message(300);
        let p = packets(Fragmenter::new(0).split(&m, 104).unwrap());
        let feed: Vec<_> = p[1..].iter().map(|p| (3u16, p.clone())).collect();
        assert_eq!(deliver(&mut r, t0, &feed), []);
        assert_eq!(r.next_timeout(), Some(t0 + TIMEOUT));
        assert_eq!(r.expire(t0 + TIMEOUT - Duration::from_millis(1)), 0);
        // A push also expires, and the late fragment starts afresh.
        let late = [(3u16, p[0].clone())];
        assert_eq!(deliver(&mut r, t0 + TIMEOUT, &late), []);
        assert_eq!(r.counters().expired, 1);
        assert_eq!(r.partials(), 1);
        assert_eq!(r.expire(t0 + 2 * TIMEOUT), 1);
        assert_eq!((r.partials(), r.next_timeout()), (0, None));
    }

    #[test]
    fn buffers_are_recycled() {
        let t0 = Instant::now();
        let mut r = Reassembler::new(limits());
        let mut fr = Fragmenter::new(0);
        let m = message(1400);
        let mut first = None;
        for _ in 0..5 {
            for f in fr.split(&m, 120).unwrap().fragments() {
                if let Some(got) = r.push(t0, 0u8, f) {
                    assert_eq!(got, &m[..]);
                    assert_eq!(*first.get_or_insert(got.as_ptr()), got.as_ptr());
                }
            }
        }
        assert_eq!(r.counters().completed, 5);
    }

    #[test]
    fn oversized_messages_are_dropped() {
        let t0 = Instant::now();
        let mut r = Reassembler::new(Limits {
            max_bytes: 2000,
            ..limits()
        });
        let chunk = [1u8; 300];
        let f = |index| Fragment {
            msg_id: 1,
            index,
            count: 255,
            chunk: &chunk,
        };
        assert_eq!(r.push(t0, 0u8, f(0)), None, "255 × 300 > 65535");
        assert_eq!((r.counters().oversized, r.partials()), (1, 0));
        let m = message(3000);
        let feed: Vec<_> = packets(Fragmenter::new(0).split(&m, 1004).unwrap())
            .into_iter()
            .map(|p| (0u8, p))
            .collect();
        assert_eq!(deliver(&mut r, t0, &feed), [], "more than max_bytes");
        // The two fragments that fix the size are refused; the last (1000
        // bytes, the size unknown yet) is held until it expires.
        assert_eq!((r.counters().oversized, r.partials()), (3, 1));
        assert!(r.held_bytes() <= 2000);
    }

    #[test]
    fn memory_stays_bounded_under_a_flood() {
        let t0 = Instant::now();
        let limits = Limits {
            max_bytes: 64 << 10,
            max_partials_per_key: 8,
            ..limits()
        };
        let mut r = Reassembler::new(limits);
        let chunk = [7u8; 200];
        for i in 0..20_000u32 {
            let f = Fragment {
                msg_id: i as u16,
                index: (i % 3) as u8,
                count: 4,
                chunk: &chunk,
            };
            assert_eq!(r.push(t0, i % 37, f), None);
            assert!(r.held_bytes() <= limits.max_bytes);
            assert!(r.per_key.values().all(|s| s.len() <= 8));
        }
        assert_eq!(r.counters().evicted + r.partials() as u64, 20_000);
        assert!(r.order.len() <= 2 * r.partials() + 64);
        let evicted = r.counters().evicted;
        for i in 0..1000u16 {
            let f = Fragment {
                msg_id: i,
                index: 0,
                count: 2,
                chunk: &chunk,
            };
            assert_eq!(r.push(t0, 99, f), None);
            assert!(r.per_key[&99].len() <= 8);
            assert!(r.held_bytes() <= limits.max_bytes);
        }
        assert!(r.counters().evicted >= evicted + 1000 - 8);
        // A real message still gets through.
        let m = message(1500);
        let feed: Vec<_> = packets(Fragmenter::new(0).split(&m, 150).unwrap())
            .into_iter()
            .map(|p| (5u32, p))
            .collect();
        assert_eq!(deliver(&mut r, t0, &feed), [(5, m)]);
        let held = r.partials();
        assert_eq!(r.expire(t0 + TIMEOUT), held);
        assert_eq!(r.partials(), 0);
    }

    #[test]
    fn eviction_takes_the_oldest() {
        let t0 = Instant::now();
        // Room for three partial messages of 200 bytes, two per key.
        let max_bytes = 3 * (Reassembler::<u8>::PARTIAL_COST + 200);
        let mut r = Reassembler::new(Limits {
            max_bytes,
            max_partials_per_key: 2,
            ..limits()
        });
        let chunk = [3u8; 100];
        let f = |msg_id, index| Fragment {
            msg_id,
            index,
            count: 2,
            chunk: &chunk,
        };
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(r.push(at(0), 1u8, f(10, 0)), None);
        assert_eq!(r.push(at(1), 2u8, f(20, 0)), None);
        assert_eq!(r.push(at(2), 2u8, f(21, 0)), None);
        assert_eq!((r.partials(), r.counters().evicted), (3, 0));
        // Key 2's third: its own oldest (20) goes, not the oldest of all.
        assert_eq!(r.push(at(3), 2u8, f(22, 0)), None);
        assert_eq!((r.partials(), r.counters().evicted), (3, 1));
        assert_eq!(r.next_timeout(), Some(at(0) + TIMEOUT));
        // A fourth partial is over the bytes: the oldest of all (10) goes.
        assert_eq!(r.push(at(4), 3u8, f(30, 0)), None);
        assert_eq!((r.partials(), r.counters().evicted), (3, 2));
        assert_eq!(r.next_timeout(), Some(at(2) + TIMEOUT));
        for (key, id) in [(2u8, 21), (2, 22), (3, 30)] {
            assert_eq!(r.push(at(5), key, f(id, 1)), Some(&[3u8; 200][..]));
        }
        assert!(r.held_bytes() <= max_bytes);
    }

    #[test]
    fn partial_cost_is_as_documented() {
        let cost = Reassembler::<u32>::PARTIAL_COST;
        assert!((150..=300).contains(&cost), "{cost}");
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(f) = Fragment::parse(&bytes) {
                let mut out = vec![0; bytes.len()];
                prop_assert_eq!(f.emit(&mut out), Ok(bytes.len()));
                prop_assert_eq!(out, bytes);
            }
        }

        #[test]
        fn any_order_with_duplicates_delivers_once(
            m in proptest::collection::vec(any::<u8>(), 0..3000),
            max in 5usize..1500,
            dups in proptest::collection::vec(any::<u8>(), 0..20),
            seed: u64,
        ) {
            let Ok(split) = Fragmenter::new(seed as u16).split(&m, max) else {
                prop_assert!(m.len().div_ceil(max - HEADER_LEN) > MAX_FRAGMENTS);
                return Ok(());
            };
            let p = packets(split);
            prop_assert!(p.iter().all(|p| p.len() <= max));
            let mut feed: Vec<_> = p.iter().map(|p| (0u8, p.clone())).collect();
            feed.extend(dups.iter().map(|&d| (0u8, p[usize::from(d) % p.len()].clone())));
            shuffle(&mut feed, seed);
            let mut r = Reassembler::new(limits());
            prop_assert_eq!(deliver(&mut r, Instant::now(), &feed), [(0, m)]);
            prop_assert_eq!(r.counters().duplicate, dups.len() as u64);
            prop_assert_eq!(r.partials(), 0);
        }

        #[test]
        fn one_lost_fragment_delivers_nothing_and_expires(
            m in proptest::collection::vec(any::<u8>(), 0..3000),
            max in 5usize..1500,
            lost: usize,
            seed: u64,
        ) {
            let Ok(split) = Fragmenter::new(1).split(&m, max) else { return Ok(()) };
            let mut feed: Vec<_> = packets(split).into_iter().map(|p| (0u8, p)).collect();
            feed.remove(lost % feed.len());
            shuffle(&mut feed, seed);
            let t0 = Instant::now();
            let mut r = Reassembler::new(limits());
            prop_assert_eq!(deliver(&mut r, t0, &feed), []);
            let partial = usize::from(!feed.is_empty());
            prop_assert_eq!(r.partials(), partial);
            prop_assert_eq!(r.expire(t0 + TIMEOUT - Duration::from_nanos(1)), 0);
            prop_assert_eq!(r.expire(t0 + TIMEOUT), partial);
            prop_assert_eq!((r.partials(), r.held_bytes() <= limits().max_bytes), (0, true));
        }

        #[test]
        fn interleaved_keys_and_messages(
            lens in proptest::collection::vec(0usize..1500, 6),
            max in 30usize..300,
            seed: u64,
        ) {
            // Both senders number from the same id: only the key tells their messages apart.
            let mut senders = [Fragmenter::new(40), Fragmenter::new(40)];
            let mut sent = Vec::new();
            let mut feed = Vec::new();
            for (i, &len) in lens.iter().enumerate() {
                let key = (i % 2) as u8;
                let m: Vec<u8> = message(len).iter().map(|b| b ^ key).collect();
                let split = senders[usize::from(key)].split(&m, max).unwrap();
                feed.extend(packets(split).into_iter().map(|p| (key, p)));
                sent.push((key, m));
            }
            shuffle(&mut feed, seed);
            let mut r = Reassembler::new(limits());
            let mut got = deliver(&mut r, Instant::now(), &feed);
            got.sort();
            sent.sort();
            prop_assert_eq!(got, sent);
            prop_assert_eq!(r.partials(), 0);
        }
    }
}

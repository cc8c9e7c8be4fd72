//! Fragment parsing and reassembly on arbitrary bytes.
//!
//! The input is a sequence of records `| ctl u8 | len u16 BE | len bytes |`
//! (a short tail is taken as it is). Each record's bytes go through
//! `Fragment::parse` and, if accepted, into one `Reassembler` from the sender
//! key `ctl & 3`; `ctl & 4` first moves the clock on by 400 ms (the timeout
//! is 1 s), so partial messages expire. Small limits (4 partials per key,
//! 32 KiB) make eviction happen.
//!
//! Checked: nothing panics; the budget holds after every call; a returned
//! message is at most 255 times the longest chunk seen, and is made of
//! chunks that were pushed under its key, id and count, in index order.
//! Last, the input itself is split and pushed backwards under a fifth key:
//! whatever came before, it must come back exactly once and unchanged.
#![no_main]

use std::time::Duration;

use iptun_fuzz::now;
use iptun_proto::frag::{
    Fragment, Fragmenter, Limits, MAX_FRAGMENTS, MAX_MESSAGE_LEN, Reassembler,
};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    timeout: Duration::from_secs(1),
    max_partials_per_key: 4,
    max_bytes: 32 << 10,
};

/// A fragment that went in: (key, msg_id, index, count, chunk).
type Pushed<'a> = (u8, u16, u8, u8, &'a [u8]);

fuzz_target!(|data: &[u8]| {
    let mut r = Reassembler::new(LIMITS);
    let mut t = now();
    let mut pushed: Vec<Pushed<'_>> = Vec::new();
    let mut longest = 0;
    let mut rest = data;
    while let Some((&ctl, tail)) = rest.split_first() {
        let len = match tail {
            [hi, lo, ..] => usize::from(u16::from_be_bytes([*hi, *lo])),
            _ => 0,
        };
        let body = tail.get(2..).unwrap_or_default();
        let (bytes, next) = body.split_at(len.min(body.len()));
        rest = next;
        if ctl & 4 != 0 {
            t += Duration::from_millis(400);
        }
        let Ok(f) = Fragment::parse(bytes) else {
            continue;
        };
        let key = ctl & 3;
        pushed.push((key, f.msg_id, f.index, f.count, f.chunk));
        longest = longest.max(f.chunk.len());
        if let Some(m) = r.push(t, key, f) {
            assert!(m.len() <= MAX_FRAGMENTS * longest && m.len() <= MAX_MESSAGE_LEN);
            if f.count == 1 {
                assert_eq!(m, f.chunk);
            } else {
                assert!(made_of_pushed(m, (key, f.msg_id, f.count), &pushed));
            }
        }
        assert!(r.held_bytes() <= LIMITS.max_bytes);
    }

    // The input as one message, split and pushed last fragment first.
    let message = &data[..data.len().min(8000)];
    let max_fragment_len = 5 + usize::from(data.first().copied().unwrap_or(0)) * 5;
    let Ok(split) = Fragmenter::new(7).split(message, max_fragment_len) else {
        return;
    };
    let chunk_len = split.fragment(0).map_or(0, |f| f.chunk.len());
    let fits = usize::from(split.count()) * chunk_len + Reassembler::<u8>::PARTIAL_COST;
    let mut delivered = 0;
    for index in (0..split.count()).rev() {
        let f = split.fragment(index).expect("index below count");
        if let Some(m) = r.push(t, 4, f) {
            assert_eq!(m, message);
            assert_eq!(index, 0, "delivered before the last missing fragment");
            delivered += 1;
        }
        assert!(r.held_bytes() <= LIMITS.max_bytes);
    }
    if fits <= LIMITS.max_bytes {
        assert_eq!(delivered, 1);
    }
    r.expire(t + LIMITS.timeout);
    assert_eq!(r.partials(), 0);
});

/// Whether `m` is chunks pushed under `(key, msg_id, count)`: chunk `i` at
/// `i * c` for a chunk length `c` that one of the pushed non-last chunks has.
fn made_of_pushed(m: &[u8], (key, msg_id, count): (u8, u16, u8), pushed: &[Pushed<'_>]) -> bool {
    let mine = || {
        pushed
            .iter()
            .filter(move |&&(k, id, _, n, _)| (k, id, n) == (key, msg_id, count))
    };
    mine()
        .filter(|&&(.., index, _, chunk)| index < count - 1 && !chunk.is_empty())
        .any(|&(.., chunk)| {
            let c = chunk.len();
            (0..count).all(|i| {
                let start = usize::from(i) * c;
                let end = if i == count - 1 { m.len() } else { start + c };
                let Some(want) = m.get(start..end) else {
                    return false;
                };
                mine().any(|&(_, _, index, _, chunk)| index == i && chunk == want)
            })
        })
}

//! Bound polls: the poll authenticator and what carries it, on arbitrary
//! bytes, against a session's poll keys (two fixed keypairs, as a server
//! holds around a rekey):
//! - as a DNS query's payload: `UpHeader::parse`, then the check of its
//!   authenticator over its widened qseq. It verifies only if it is the
//!   authenticator the key makes (no forged input verifies);
//! - as a long-poll query string: `poll_tag` and `poll_auth`, then the
//!   check of its counter and authenticator, the same way;
//! - as a script of 7-byte steps against one tag's `PollGuard`, with the
//!   genuine client's polls mixed in: `op % 3 == 0` a poll with the qseq
//!   and authenticator of the step's bytes (forged unless it happens to be
//!   the real one); `1` the client's next poll, its counter advanced by
//!   1..=256 (always fresh: the widening must recover it); `2` a copy of
//!   one of the client's earlier polls (never fresh again). A step of the
//!   first kind that verifies holds a real authenticator (which the fuzzer
//!   can only have read off a comparison): the script stops there.
//!
//! Nothing panics, and the guard's verdicts match a model.
#![no_main]

use iptun_proto::crypto::{PollCheck, PollCounter, PollGuard, PollKey, PollKind};
use iptun_proto::transport::dns::{SIGNED_HEADER_LEN, UpHeader};
use iptun_proto::transport::http::{poll_auth, poll_tag};
use libfuzzer_sys::fuzz_target;

const TAG: u32 = 0x1234_5678;

fuzz_target!(|data: &[u8]| {
    let old = PollKey::from_bytes(&[0x44; 32]);
    let new = PollKey::from_bytes(&[0x55; 32]);
    let keys = [(1u32, &new), (2u32, &old)];
    let made_by = |kind, tag, counter, header: &[u8], auth: &[u8]| {
        keys.iter()
            .any(|(_, k)| k.auth(kind, tag, counter, header)[..] == *auth)
    };

    // A DNS query's payload.
    if let Some((h, _)) = UpHeader::parse(data) {
        let mut guard = PollGuard::new();
        let signed = h.signed();
        assert_eq!(&signed[..], &data[..SIGNED_HEADER_LEN]);
        let verdict = guard.check(
            keys,
            PollKind::Dns,
            u64::from(h.tag),
            PollCounter::Low16(h.qseq),
            &signed,
            &h.auth,
        );
        // A fresh guard widens the qseq to itself.
        let real = made_by(PollKind::Dns, u64::from(h.tag), u64::from(h.qseq), &signed, &h.auth);
        assert_eq!(verdict != PollCheck::Forged, real, "{verdict:?}");
    }

    // A long-poll query.
    if let Ok(text) = std::str::from_utf8(data)
        && let (Some(tag), Some(a)) = (poll_tag(Some(text)), poll_auth(Some(text)))
    {
        let mut guard = PollGuard::new();
        let verdict = guard.check(keys, PollKind::Http, tag, PollCounter::Full(a.counter), &[], &a.auth);
        let real = made_by(PollKind::Http, tag, a.counter, &[], &a.auth);
        assert_eq!(verdict != PollCheck::Forged, real, "{verdict:?}");
        if real {
            assert_eq!(verdict, PollCheck::Fresh(a.counter));
        }
    }

    // A script against one tag's guard.
    let mut guard = PollGuard::new();
    let mut counter: u64 = 0;
    let mut genuine: Vec<UpHeader> = Vec::new();
    for step in data.chunks_exact(7) {
        let (op, c, auth) = (step[0], u16::from_be_bytes([step[1], step[2]]), [step[3], step[4], step[5], step[6]]);
        let check = |guard: &mut PollGuard, h: &UpHeader| {
            guard.check(
                keys,
                PollKind::Dns,
                u64::from(TAG),
                PollCounter::Low16(h.qseq),
                &h.signed(),
                &h.auth,
            )
        };
        match op % 3 {
            0 => {
                let h = UpHeader { tag: TAG, prompt: op & 0x80 != 0, qseq: c, down_limit: 1232, auth };
                let verdict = check(&mut guard, &h);
                // What it could be: any counter with these low bits.
                if verdict != PollCheck::Forged {
                    let full = match verdict {
                        PollCheck::Fresh(f) | PollCheck::Repeat(f) => f,
                        PollCheck::Forged => unreachable!(),
                    };
                    assert_eq!(full as u16, c);
                    assert!(made_by(PollKind::Dns, u64::from(TAG), full, &h.signed(), &auth));
                    // The input holds a real authenticator (the fuzzer
                    // read it off a comparison): it is the client's poll,
                    // and the model of its counter no longer holds.
                    return;
                }
            }
            1 => {
                counter += 1 + u64::from(c % 256);
                let mut h = UpHeader { tag: TAG, prompt: false, qseq: counter as u16, down_limit: 1232, auth: [0; 4] };
                h.authenticate(&new, counter);
                assert_eq!(check(&mut guard, &h), PollCheck::Fresh(counter));
                genuine.push(h);
            }
            _ => {
                if genuine.is_empty() {
                    continue;
                }
                let h = genuine[usize::from(c) % genuine.len()];
                let verdict = check(&mut guard, &h);
                assert!(!matches!(verdict, PollCheck::Fresh(_)), "a copy taken as new: {verdict:?}");
            }
        }
    }
});

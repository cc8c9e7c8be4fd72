//! The HTTP transports' bytes from the network: framed bodies (WebSocket
//! messages, long-poll bodies), the long-poll query, and the server's
//! long-poll mailboxes driven by what such bodies cause.
//!
//! The input is a body for `messages`, then the same bytes as a script for
//! `Mailboxes`: each byte `b` is one step — `b % 4 == 0`: a request from tag
//! `b >> 6` carrying data if `b & 4`; `1`: the next input bytes (length
//! `b >> 2`) sent as a message to tag `(b >> 2) & 3`; `2`: answers collected;
//! `3`: the clock moves on by `b` × 100 ms and holds expire.
//!
//! Checked: nothing panics; the messages read fill exactly the bytes they
//! claim and re-frame to the same prefix; the query parser only accepts
//! tags it prints; every request is answered at most once; every answer
//! parses cleanly, holds only messages sent to its tag, in order, and stays
//! within the queue bound.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use iptun_fuzz::now;
use iptun_proto::transport::http::{Answer, Batch, MAX_QUEUED_BYTES, Mailboxes, messages, poll_query, poll_tag};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Framing.
    let mut it = messages(data);
    let mut batch = Batch::new();
    for m in it.by_ref() {
        batch.push(m);
    }
    let framed = batch.take();
    assert_eq!(&data[..framed.len()], &framed[..]);
    assert_eq!(it.malformed(), framed.len() < data.len());

    // The long-poll query.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(tag) = poll_tag(Some(text)) {
            assert!(text.split('&').any(|kv| kv.eq_ignore_ascii_case(&poll_query(tag))));
        }
    }

    // Mailboxes.
    let mut boxes: Mailboxes<u32> = Mailboxes::new();
    let mut model = Model::default();
    let mut t = now();
    let mut rest = data;
    while let Some((&b, tail)) = rest.split_first() {
        rest = tail;
        match b % 4 {
            0 => {
                let tag = u64::from(b >> 6);
                let r = model.request_tag.len() as u32;
                model.request_tag.insert(r, tag);
                boxes.open(t, tag);
                model.check(boxes.request(t, tag, r, b & 4 != 0));
            }
            1 => {
                let tag = u64::from((b >> 2) & 3);
                let len = usize::from(b >> 2).min(rest.len());
                let (msg, tail) = rest.split_at(len);
                rest = tail;
                boxes.send(tag, msg);
                model.sent.entry(tag).or_default().push(msg.to_vec());
            }
            2 => model.check(std::iter::from_fn(|| boxes.poll_answer()).collect()),
            _ => {
                t += Duration::from_millis(100 * u64::from(b));
                model.check(boxes.handle_timeout(t));
            }
        }
    }
});

/// What went in, to check what comes out against.
#[derive(Default)]
struct Model {
    request_tag: HashMap<u32, u64>,
    answered: HashSet<u32>,
    /// Messages sent per tag and not yet seen in an answer.
    sent: HashMap<u64, Vec<Vec<u8>>>,
}

impl Model {
    fn check(&mut self, answers: Vec<Answer<u32>>) {
        for a in answers {
            assert!(self.answered.insert(a.request), "answered twice");
            assert!(a.body.len() <= MAX_QUEUED_BYTES);
            let queue = self.sent.entry(self.request_tag[&a.request]).or_default();
            let mut it = messages(&a.body);
            for m in it.by_ref() {
                // Messages may be dropped, never reordered or invented.
                let pos = queue.iter().position(|q| q == m).expect("a message sent to this tag");
                queue.drain(..=pos);
            }
            assert!(!it.malformed());
        }
    }
}

//! The DNS transport's two state machines, sans IO: [`client::DnsUplink`]
//! (queries out through recursive resolvers, answers in) and
//! [`server::DnsListener`] (queries in, answers out, as the authoritative
//! server of the tunnel domain). The codec underneath is
//! [`wire::dns`](crate::wire::dns); this module adds what rides inside the
//! names and answers, and the poll discipline (see [`crate::transport::poll`]) adapted
//! to resolvers.
//!
//! Both allocate per query (names, DNS messages, fragment buffers): at DNS
//! rates (a few hundred queries per second per client) that costs nothing
//! worth saving, and `hickory-proto` allocates anyway. Time is a parameter;
//! neither machine reads a clock, opens a socket or draws randomness of its
//! own (the client takes a seed).
//!
//! # Upstream: the query name
//!
//! Every query's name carries, in base32 or (once the client has probed
//! the path for 8-bit labels) base128
//! ([`encode_name_as`](crate::wire::dns::encode_name_as)):
//!
//! ```text
//! | prompt:1 tag:31 | qseq u16 | down u8 | auth 4 | fragment (frag.rs), or nothing |
//! ```
//!
//! - `tag`: the client's random session tag. The server keys everything by
//!   it, never by the resolver's address, port or message id (resolvers send
//!   from pools and retry on their own).
//! - `qseq`: the client's query counter. Tag and qseq make every name
//!   unique, so no cache ever answers a query (a resolver that ignores TTL 0
//!   would need 65536 queries before a name repeats), and they let the
//!   server recognise a resolver's retry of a query it has seen.
//! - `down`: the largest response the client can take, in units of 8
//!   bytes (64: 512 bytes without EDNS0, 154: EDNS0 at 1232). The server
//!   cannot see the client's EDNS0 size (the resolver sends its own), so the
//!   client says it.
//! - `auth`: the poll authenticator ([`PollKey`](crate::crypto::PollKey))
//!   over the 7 bytes before it and the whole query counter under the
//!   client's current keys (zeros before it has keys): once the tag is
//!   bound to a session, a query without a good one gets nothing.
//! - then one fragment of an upstream tunnel message, or nothing (a bare
//!   poll, which gives the server a query to hold for downstream data).
//!
//! # Downstream: the answer
//!
//! The answer's payload is zero or more fragments, each behind its length:
//!
//! ```text
//! | len u16 | fragment (len bytes) | len u16 | fragment | ...
//! ```
//!
//! so small messages (keepalives, TCP acknowledgements) share one answer.
//! An empty payload carries nothing.
//!
//! The query's type says which records carry the payload
//! ([`build_answer`](crate::wire::dns::build_answer) has the encodings):
//! NULL (raw RDATA, the densest), TXT (what always works), CNAME, MX and SRV
//! (base32 in names under the domain, for paths that pass only name-typed
//! records; MX preference and SRV priority order the parts), AAAA and A
//! (15 or 3 bytes a record behind a sequence byte, since resolvers shuffle
//! address records). The server answers the type asked; the client
//! ([`client`]) starts on TXT, probes NULL once the path is healthy, and
//! steps down the ladder TXT, CNAME, MX, SRV, AAAA, A when the type in use
//! keeps failing (REFUSED, NOTIMP, NODATA, garbled records), probing the
//! types above again with back-off.
//!
//! # The poll discipline
//!
//! The client keeps several queries in flight; the server holds each until
//! downstream data arrives for the tag or [`HOLD`] passes, and answers every
//! query it holds exactly once (a resolver turns silence, and long holds,
//! into SERVFAIL). Queries carrying upstream data are held only while the
//! tag holds fewer than [`HOLD_WITH_DATA`] others, so an upload is not
//! paced by the hold time. A resolver's retry of a held query takes the
//! original's place (the resolver waits for the newest); a retry of an
//! answered one gets the same payload again.
//!
//! # Bound polls
//!
//! Once a tag is bound to a session, its queries must carry a poll
//! authenticator of one of the session's keypairs (see
//! [`crate::crypto::PollKey`]): the server answers forged ones at once and
//! empty, and a copy of a query (a retry, a replay) gets at most what that
//! query gets. Someone who sees the tag cannot take the downstream.

pub mod client;
pub mod ladder;
mod name_errors;
pub mod resolvers;
pub mod server;
pub mod sizes;

use std::time::Duration;

use crate::crypto::{POLL_AUTH_LEN, PollKey, PollKind};
use crate::frag;

/// How long the server holds a query before answering it empty. Resolvers
/// time out their upstream queries after roughly 0.4–3 s and retry; a hold
/// well inside that keeps them from turning our holds into SERVFAIL.
pub const HOLD: Duration = Duration::from_millis(600);
/// Bytes before the fragment in a query's payload: tag, qseq, down, auth.
pub const UP_HEADER_LEN: usize = SIGNED_HEADER_LEN + POLL_AUTH_LEN;
/// Bytes of a query's header that its authenticator covers: tag, qseq, down.
pub const SIGNED_HEADER_LEN: usize = 7;
/// Bytes before the first piece in an answer's payload: info, backlog.
pub const DOWN_HEADER_LEN: usize = 2;
/// Bytes of the length before each piece in an answer.
pub const DOWN_LEN_PREFIX: usize = 2;
/// A query carrying data is held only while the tag holds fewer than this
/// many others; beyond, it is answered at once.
pub const HOLD_WITH_DATA: usize = 2;
/// The unit of the `down` byte.
pub const DOWN_UNIT: usize = 16;
/// Response size of a client without EDNS0, and the most any answer to an
/// unauthenticated tag may have: an ordinary DNS reply.
pub const CLASSIC_SIZE: usize = crate::wire::dns::CLASSIC_UDP_SIZE as usize;
/// The EDNS0 size a client asks for first (the 2020 DNS flag day's).
pub const EDNS_SIZE: u16 = crate::wire::dns::SERVER_EDNS_SIZE;
/// The largest answer a client may ask for, straight to the server where
/// the path carries fragmented datagrams (a resolver's own EDNS0 size,
/// usually 1232, caps the answers it relays).
pub const MAX_DOWN: u16 = 4080;
/// Bytes of a padding piece's header: a fragment header whose count is 0.
pub const PADDING_HEADER_LEN: usize = frag::HEADER_LEN;
/// In a query's padding: answer as large as the query allows (padded).
pub const PAD_ANSWER: u8 = 0x01;

/// The tag's bits; the top bit of the first byte is the prompt flag.
pub const TAG_MASK: u32 = 0x7FFF_FFFF;

/// The decoded head of a query's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpHeader {
    /// The client's session tag (31 bits: [`TAG_MASK`]).
    pub tag: u32,
    /// Answer at once, never hold: the client times the query out after
    /// a round trip, not after the server's hold.
    pub prompt: bool,
    /// The client's query counter.
    pub qseq: u16,
    /// The largest response the client takes, in bytes.
    pub down_limit: usize,
    /// The poll authenticator (zeros from a client without keys).
    pub auth: [u8; POLL_AUTH_LEN],
}

impl UpHeader {
    /// Write the header to the start of `out` (at least [`UP_HEADER_LEN`]).
    pub fn emit(&self, out: &mut [u8]) {
        out[..SIGNED_HEADER_LEN].copy_from_slice(&self.signed());
        out[SIGNED_HEADER_LEN..UP_HEADER_LEN].copy_from_slice(&self.auth);
    }

    /// The bytes the authenticator covers (the header's first 7).
    pub fn signed(&self) -> [u8; SIGNED_HEADER_LEN] {
        let flag = if self.prompt { !TAG_MASK } else { 0 };
        let mut out = [0; SIGNED_HEADER_LEN];
        out[..4].copy_from_slice(&(self.tag & TAG_MASK | flag).to_be_bytes());
        out[4..6].copy_from_slice(&self.qseq.to_be_bytes());
        out[6] = u8::try_from(self.down_limit / DOWN_UNIT).unwrap_or(u8::MAX);
        out
    }

    /// Set `auth` for the client's query counter `counter` (whose low 16
    /// bits are `qseq`) under `key`.
    pub fn authenticate(&mut self, key: &PollKey, counter: u64) {
        self.auth = key.auth(
            PollKind::Dns,
            u64::from(self.tag & TAG_MASK),
            counter,
            &self.signed(),
        );
    }

    /// Split a query payload into header and the rest (a fragment, padding
    /// or nothing).
    pub fn parse(payload: &[u8]) -> Option<(Self, &[u8])> {
        let (head, rest) = payload.split_first_chunk::<UP_HEADER_LEN>()?;
        let raw = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        Some((
            Self {
                tag: raw & TAG_MASK,
                prompt: raw & !TAG_MASK != 0,
                qseq: u16::from_be_bytes([head[4], head[5]]),
                down_limit: usize::from(head[6]) * DOWN_UNIT,
                auth: [head[7], head[8], head[9], head[10]],
            },
            rest,
        ))
    }
}

/// What follows a query's header: a fragment, padding (a probe of the
/// path's sizes), or nothing (a bare poll).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpBody<'a> {
    /// A bare poll.
    Poll,
    /// One fragment of an upstream message.
    Fragment(frag::Fragment<'a>),
    /// Padding; `pad_answer`: the answer is to be padded to its limit.
    Padding {
        /// Answer as large as the query allows.
        pad_answer: bool,
    },
}

impl<'a> UpBody<'a> {
    /// What `rest` (after the header) is; `None` for bytes that are none
    /// of the three.
    pub fn parse(rest: &'a [u8]) -> Option<Self> {
        if rest.is_empty() {
            return Some(Self::Poll);
        }
        if let Some(flags) = padding_flags(rest) {
            return Some(Self::Padding {
                pad_answer: flags & PAD_ANSWER != 0,
            });
        }
        frag::Fragment::parse(rest).ok().map(Self::Fragment)
    }
}

/// Write padding of `len` bytes (at least [`PADDING_HEADER_LEN`]) with
/// `flags` to `out`.
pub fn emit_padding(out: &mut Vec<u8>, len: usize, flags: u8) {
    out.extend_from_slice(&[0, 0, flags, 0]);
    out.resize(out.len() + len.saturating_sub(PADDING_HEADER_LEN), 0);
}

/// The flags of a padding piece (a fragment header whose count is 0).
fn padding_flags(piece: &[u8]) -> Option<u8> {
    match piece {
        [_, _, flags, 0, ..] => Some(*flags),
        _ => None,
    }
}

/// The head of an answer's payload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DownHeader {
    /// The server held the query (waiting for data or for the hold's end):
    /// its round trip says nothing about the path's delay.
    pub held: bool,
    /// The query carried the payload option and the server read it.
    pub option_read: bool,
    /// Downstream fragments still queued for the tag (saturating at 255).
    pub backlog: u8,
}

impl DownHeader {
    const HELD: u8 = 0x80;
    const OPTION_READ: u8 = 0x40;

    /// The header's two bytes.
    pub fn to_bytes(self) -> [u8; DOWN_HEADER_LEN] {
        let mut info = 0;
        if self.held {
            info |= Self::HELD;
        }
        if self.option_read {
            info |= Self::OPTION_READ;
        }
        [info, self.backlog]
    }

    /// Split an answer's payload into header and pieces; `None` when it is
    /// shorter than the header.
    pub fn parse(payload: &[u8]) -> Option<(Self, &[u8])> {
        let ([info, backlog], rest) = payload.split_first_chunk::<DOWN_HEADER_LEN>()?;
        Some((
            Self {
                held: info & Self::HELD != 0,
                option_read: info & Self::OPTION_READ != 0,
                backlog: *backlog,
            },
            rest,
        ))
    }
}

/// Append `piece` (a fragment or padding) behind its length to an answer's
/// pieces.
pub fn push_fragment(payload: &mut Vec<u8>, piece: &[u8]) {
    let len = u16::try_from(piece.len()).expect("pieces fit an answer");
    payload.extend_from_slice(&len.to_be_bytes());
    payload.extend_from_slice(piece);
}

/// Append padding behind its length so that the pieces reach `len` bytes
/// (nothing if they are within a padding piece's size of it already).
pub fn pad_to(payload: &mut Vec<u8>, len: usize) {
    let room = len.saturating_sub(payload.len() + DOWN_LEN_PREFIX);
    if room >= PADDING_HEADER_LEN {
        let mut piece = Vec::with_capacity(room);
        emit_padding(&mut piece, room, 0);
        push_fragment(payload, &piece);
    }
}

/// The fragments of an answer's pieces (after the header), in order,
/// padding skipped; an `Err` ends the iteration early if the rest is
/// malformed (what came before still counts).
pub fn fragments(pieces: &[u8]) -> impl Iterator<Item = Result<frag::Fragment<'_>, ()>> {
    let mut rest = pieces;
    std::iter::from_fn(move || {
        loop {
            if rest.is_empty() {
                return None;
            }
            let Some((len, tail)) = rest.split_first_chunk::<DOWN_LEN_PREFIX>() else {
                rest = &[];
                return Some(Err(()));
            };
            let len = usize::from(u16::from_be_bytes(*len));
            let Some((f, tail)) = tail.split_at_checked(len) else {
                rest = &[];
                return Some(Err(()));
            };
            rest = tail;
            if padding_flags(f).is_some() {
                continue;
            }
            return Some(frag::Fragment::parse(f).map_err(|_| ()));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn up_header_round_trips(tag: u32, prompt: bool, qseq: u16, down in 0usize..4096, auth: [u8; 4], rest in proptest::collection::vec(any::<u8>(), 0..40)) {
            let h = UpHeader { tag, prompt, qseq, down_limit: down, auth };
            let mut buf = vec![0; UP_HEADER_LEN];
            h.emit(&mut buf);
            buf.extend_from_slice(&rest);
            let (got, tail) = UpHeader::parse(&buf).unwrap();
            prop_assert_eq!(
                (got.tag, got.prompt, got.qseq, got.down_limit, got.auth),
                (tag & TAG_MASK, prompt, qseq, down / DOWN_UNIT * DOWN_UNIT, auth)
            );
            prop_assert_eq!(tail, &rest[..]);
        }

        #[test]
        fn packed_fragments_round_trip(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..6)) {
            let mut payload = Vec::new();
            let mut frags = Vec::new();
            for (i, c) in chunks.iter().enumerate() {
                let f = frag::Fragment { msg_id: i as u16, index: 0, count: 1, chunk: c };
                let mut b = vec![0; f.wire_len()];
                f.emit(&mut b).unwrap();
                push_fragment(&mut payload, &b);
                frags.push(f);
            }
            let got: Vec<_> = fragments(&payload).collect::<Result<_, _>>().unwrap();
            prop_assert_eq!(got, frags);
        }

        #[test]
        fn padding_is_skipped_wherever_it_sits(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..100), 1..4),
            pad_at in 0usize..4,
            pad_len in 4usize..200,
        ) {
            let mut payload = Vec::new();
            let mut frags = Vec::new();
            for (i, c) in chunks.iter().enumerate() {
                if i == pad_at {
                    let mut pad = Vec::new();
                    emit_padding(&mut pad, pad_len, PAD_ANSWER);
                    push_fragment(&mut payload, &pad);
                }
                let f = frag::Fragment { msg_id: i as u16, index: 0, count: 1, chunk: c };
                let mut b = vec![0; f.wire_len()];
                f.emit(&mut b).unwrap();
                push_fragment(&mut payload, &b);
                frags.push(f);
            }
            pad_to(&mut payload, 1000);
            prop_assert!(payload.len() <= 1000);
            prop_assert!(payload.len() + DOWN_LEN_PREFIX + PADDING_HEADER_LEN > 1000);
            let got: Vec<_> = fragments(&payload).collect::<Result<_, _>>().unwrap();
            prop_assert_eq!(got, frags);
        }

        #[test]
        fn down_headers_round_trip(held: bool, option_read: bool, backlog: u8, rest in proptest::collection::vec(any::<u8>(), 0..20)) {
            let h = DownHeader { held, option_read, backlog };
            let mut b = h.to_bytes().to_vec();
            b.extend_from_slice(&rest);
            prop_assert_eq!(DownHeader::parse(&b), Some((h, &rest[..])));
        }

        #[test]
        fn garbage_answers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            for f in fragments(&bytes) {
                let _ = f;
            }
            let _ = DownHeader::parse(&bytes);
            let _ = UpHeader::parse(&bytes).map(|(_, rest)| UpBody::parse(rest));
        }
    }
}

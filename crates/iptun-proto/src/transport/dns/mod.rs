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
//! | tag u32 | qseq u16 | down u8 | fragment (frag.rs), or nothing |
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

pub mod client;
pub mod server;

use std::time::Duration;

use crate::frag;

/// How long the server holds a query before answering it empty. Resolvers
/// time out their upstream queries after roughly 0.4–3 s and retry; a hold
/// well inside that keeps them from turning our holds into SERVFAIL.
pub const HOLD: Duration = Duration::from_millis(600);
/// Bytes before the fragment in a query's payload: tag, qseq, down.
pub const UP_HEADER_LEN: usize = 7;
/// Bytes of the length before each fragment in an answer.
pub const DOWN_LEN_PREFIX: usize = 2;
/// A query carrying data is held only while the tag holds fewer than this
/// many others; beyond, it is answered at once.
pub const HOLD_WITH_DATA: usize = 2;
/// The unit of the `down` byte.
pub const DOWN_UNIT: usize = 8;
/// Response size of a client without EDNS0, and the most any answer to an
/// unauthenticated tag may have: an ordinary DNS reply.
pub const CLASSIC_SIZE: usize = crate::wire::dns::CLASSIC_UDP_SIZE as usize;
/// The EDNS0 size a client asks for first (the 2020 DNS flag day's).
pub const EDNS_SIZE: u16 = crate::wire::dns::SERVER_EDNS_SIZE;

/// The decoded head of a query's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpHeader {
    /// The client's session tag.
    pub tag: u32,
    /// The client's query counter.
    pub qseq: u16,
    /// The largest response the client takes, in bytes.
    pub down_limit: usize,
}

impl UpHeader {
    /// Write the header to the start of `out` (at least [`UP_HEADER_LEN`]).
    pub fn emit(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.tag.to_be_bytes());
        out[4..6].copy_from_slice(&self.qseq.to_be_bytes());
        out[6] = u8::try_from(self.down_limit / DOWN_UNIT).unwrap_or(u8::MAX);
    }

    /// Split a query payload into header and the rest (a fragment, or empty).
    pub fn parse(payload: &[u8]) -> Option<(Self, &[u8])> {
        let (head, rest) = payload.split_first_chunk::<UP_HEADER_LEN>()?;
        Some((
            Self {
                tag: u32::from_be_bytes([head[0], head[1], head[2], head[3]]),
                qseq: u16::from_be_bytes([head[4], head[5]]),
                down_limit: usize::from(head[6]) * DOWN_UNIT,
            },
            rest,
        ))
    }
}

/// Append `fragment` behind its length to an answer payload.
pub fn push_fragment(payload: &mut Vec<u8>, fragment: &[u8]) {
    let len = u16::try_from(fragment.len()).expect("fragments fit an answer");
    payload.extend_from_slice(&len.to_be_bytes());
    payload.extend_from_slice(fragment);
}

/// The fragments of an answer payload, in order; `None` ends the iteration
/// early if the rest is malformed (what came before still counts).
pub fn fragments(payload: &[u8]) -> impl Iterator<Item = Result<frag::Fragment<'_>, ()>> {
    let mut rest = payload;
    std::iter::from_fn(move || {
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
        Some(frag::Fragment::parse(f).map_err(|_| ()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn up_header_round_trips(tag: u32, qseq: u16, down in 0usize..2048, rest in proptest::collection::vec(any::<u8>(), 0..40)) {
            let h = UpHeader { tag, qseq, down_limit: down };
            let mut buf = vec![0; UP_HEADER_LEN];
            h.emit(&mut buf);
            buf.extend_from_slice(&rest);
            let (got, tail) = UpHeader::parse(&buf).unwrap();
            prop_assert_eq!((got.tag, got.qseq, got.down_limit), (tag, qseq, down / DOWN_UNIT * DOWN_UNIT));
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
        fn garbage_answers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            for f in fragments(&bytes) {
                let _ = f;
            }
            let _ = UpHeader::parse(&bytes);
        }
    }
}

//! DNS as a carrier: tunnel bytes ride upstream in the query name and
//! downstream in the answer's records, through recursive resolvers, to a server that
//! is authoritative for one tunnel domain (say `t.example.com`).
//!
//! This module is the codec only: pure functions over bytes, no sockets and
//! no clock. The DNS message format is `hickory-proto`'s (its [`Name`] and
//! [`RecordType`] are re-exported here); base32 is `data-encoding`'s. Both
//! allocate, which is fine at DNS rates (a query is at most 512–4096 bytes
//! and a resolver path carries a few hundred of them per second), so unlike
//! the rest of [`wire`](super) these functions return owned values.
//!
//! What always works, and what this module does:
//! - **Upstream**: the payload in base32 (RFC 4648 alphabet, lowercase, no
//!   padding) split into labels of at most 63 characters, then the domain:
//!   [`encode_name`]. Resolvers randomise the case of names (0x20), so
//!   [`decode_name`] ignores case. A name holds at most 253 characters, which
//!   leaves [`Domain::upstream_capacity`] payload bytes per query (147 under
//!   `t.example.com`).
//! - **Upstream, denser**, for paths that carry 8-bit label bytes (the
//!   client probes): [`NameEncoding::Base128`], 7 bits per character after
//!   the marker `9` (205 bytes under `t.example.com`); [`decode_name`] tells
//!   the two encodings apart by the marker.
//! - **Uniqueness**: every query must be unique or a cache answers it. The
//!   codec adds nothing: the caller's payload must carry a nonce or counter.
//! - **Downstream**: one TXT record, the payload split into character-strings
//!   of at most 255 raw bytes, TTL 0, AA set, the question echoed byte for
//!   byte (resolvers check their 0x20 case). A response never exceeds the
//!   querier's EDNS0 size, or 512 bytes without EDNS0:
//!   [`downstream_capacity`] says how much payload fits.
//! - **Downstream, other record types** ([`AnswerType`]), for paths that
//!   carry them (the client probes): NULL, CNAME, MX, SRV, AAAA and A
//!   answers, the question's type choosing: [`build_answer`],
//!   [`answer_capacity`], [`parse_answer`]. Names in CNAME, MX and SRV
//!   records are [`encode_answer_name`]'s, which [`decode_name`] refuses.
//!
//! Client side: [`build_query`] (TXT, RD set, EDNS0 when asked) or
//! [`build_query_as`] (another type), [`parse_response`] or
//! [`parse_answer`] into an [`Answer`].
//!
//! Server side, for each datagram:
//! ```text
//! let q = parse_query(bytes)?;                      // drop garbage
//! if !domain.contains(&q.name)       -> build_refused(&q)
//! else if q.answer_type() is Some
//!      && decode_name(domain, &q.name, buf) is Ok -> tunnel data: park q,
//!                                                    later build_answer(&q, domain, ..)
//! else if domain.is_host(&q.name)    -> build_apex_answer(&q, domain)
//! else                               -> build_name_error(&q, domain)
//!                                       (or NODATA, see the listener)
//! ```
//! [`build_apex_answer`] answers SOA and NS at the apex and gives every other
//! question there NOERROR with no answer and the SOA in the authority
//! section (NODATA, RFC 2308). Below the apex, a name without tunnel data is
//! a minimising resolver's first step (RFC 9156): [`build_name_error`]
//! answers it NXDOMAIN, so that a best-effort minimiser sends the full name
//! at once; the DNS listener falls back to NODATA where a resolver takes
//! that NXDOMAIN as final (RFC 8020) instead.
//!
//! The delegation: the parent zone should name a nameserver outside the
//! tunnel domain (`t.example.com NS tns.example.com` plus the address record
//! of `tns.example.com` in the parent), set with [`Domain::with_nameserver`],
//! because this server does not know its own addresses and answers NODATA for
//! `A`/`AAAA` at `ns.t.example.com`, the default nameserver name.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use data_encoding::{Encoding, Specification};
use hickory_proto::ProtoError;
use hickory_proto::op::{
    Edns, Header, Message, MessageType, OpCode, Query as Question, ResponseCode,
};
use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, NS, NULL, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, RData, Record};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

pub use hickory_proto::rr::{Name, RecordType};

use crate::DropReason;

/// The longest name in presentation form, without the trailing dot (255
/// bytes on the wire).
pub const MAX_NAME_LEN: usize = 253;
/// The longest label.
pub const MAX_LABEL_LEN: usize = 63;
/// The most payload any query name can carry (under a one-character domain):
/// a buffer this large always holds what [`decode_name`] writes.
pub const MAX_UPSTREAM_PAYLOAD: usize = 216;
/// The response size limit without EDNS0 (RFC 1035), and the least an EDNS0
/// size can mean (RFC 6891).
pub const CLASSIC_UDP_SIZE: u16 = 512;
/// The UDP payload size that our responses advertise in their OPT record
/// (the 2020 DNS flag day's value).
pub const SERVER_EDNS_SIZE: u16 = 1232;
/// The EDNS0 option code (from the range for local and experimental use,
/// RFC 6891) of a query's payload option: more upstream bytes, for paths
/// straight to the server (resolvers do not pass options on).
pub const PAYLOAD_OPTION: u16 = 65_432;
/// The TTL of the apex SOA and NS records. TXT answers and negative answers
/// (the SOA's minimum field) have TTL 0.
pub const APEX_TTL: u32 = 300;
/// The longest TXT character-string.
pub const MAX_CHARACTER_STRING: usize = 255;

/// Bytes of a DNS header.
const HEADER_LEN: usize = 12;
/// QTYPE and QCLASS after the question name.
const QUESTION_TAIL: usize = 4;
/// A TXT answer's owner (a compression pointer to the question name), TYPE,
/// CLASS, TTL and RDLENGTH.
const ANSWER_OVERHEAD: usize = 2 + 2 + 2 + 4 + 2;
/// An OPT record without options: root name, TYPE, CLASS, TTL, RDLENGTH.
const OPT_LEN: usize = 1 + 2 + 2 + 4 + 2;

/// RFC 4648 base32, lowercase, no padding; decoding accepts either case and
/// rejects non-canonical trailing bits.
static BASE32: LazyLock<Encoding> = LazyLock::new(|| {
    let mut spec = Specification::new();
    spec.symbols.push_str("abcdefghijklmnopqrstuvwxyz234567");
    spec.translate.from.push_str("ABCDEFGHIJKLMNOPQRSTUVWXYZ");
    spec.translate.to.push_str("abcdefghijklmnopqrstuvwxyz");
    spec.encoding().expect("a valid base32 specification")
});

/// How upstream payload bytes are written into the labels of a query name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum NameEncoding {
    /// RFC 4648 base32, lowercase: 5 bits per character, letters and digits
    /// only. What always works.
    #[default]
    Base32,
    /// 7 bits per character over [`BASE128_ALPHABET`] (ASCII digits, letters,
    /// `-`, `_` and the bytes `0x80..=0xD9`), after the marker
    /// [`BASE128_MARKER`]. Needs a path that carries 8-bit label bytes.
    Base128,
}

impl NameEncoding {
    /// Its name, for status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Base32 => "base32",
            Self::Base128 => "base128",
        }
    }
}

/// The record types that carry downstream payload, in the client's order
/// of preference (see [`build_answer`] for each one's encoding). The
/// question's type says which one the server answers with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AnswerType {
    /// The payload as the raw RDATA of one NULL record (behind one byte):
    /// the densest.
    Null,
    /// The payload in the character-strings of one TXT record: what always
    /// works.
    #[default]
    Txt,
    /// The payload in the name of one CNAME record ([`encode_answer_name`]):
    /// for paths that only pass name-typed records.
    Cname,
    /// The payload in the exchange names of MX records, the preference
    /// numbering them.
    Mx,
    /// The payload in the target names of SRV records, the priority
    /// numbering them.
    Srv,
    /// The payload in AAAA records, 15 bytes each behind a sequence byte.
    Aaaa,
    /// The payload in A records, 3 bytes each behind a sequence byte.
    A,
}

impl AnswerType {
    /// Every type, most preferred first.
    pub const ALL: [Self; 7] = [
        Self::Null,
        Self::Txt,
        Self::Cname,
        Self::Mx,
        Self::Srv,
        Self::Aaaa,
        Self::A,
    ];

    /// The record (and question) type.
    pub fn record_type(self) -> RecordType {
        match self {
            Self::Null => RecordType::NULL,
            Self::Txt => RecordType::TXT,
            Self::Cname => RecordType::CNAME,
            Self::Mx => RecordType::MX,
            Self::Srv => RecordType::SRV,
            Self::Aaaa => RecordType::AAAA,
            Self::A => RecordType::A,
        }
    }

    /// The answer type of questions of type `rt`, if any.
    pub fn of(rt: RecordType) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.record_type() == rt)
    }

    /// Its name, for status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Null => "NULL",
            Self::Txt => "TXT",
            Self::Cname => "CNAME",
            Self::Mx => "MX",
            Self::Srv => "SRV",
            Self::Aaaa => "AAAA",
            Self::A => "A",
        }
    }
}

/// The first character of every answer name ([`encode_answer_name`]):
/// neither base32 nor the base128 marker, so [`decode_name`] never takes an
/// answer name (which a resolver may look up) for a query name.
pub const ANSWER_NAME_MARKER: u8 = b'8';
/// The first octet of the A record with sequence number 0; sequence numbers
/// run up to [`A_MAX_RECORDS`] - 1, so every address lies in 11.0.0.0 to
/// 99.255.255.255: public unicast, which resolvers with DNS rebinding
/// protection do not strip (unlike 10/8 or 127/8).
pub const A_FIRST_OCTET: u8 = 11;
/// The most A records in an answer.
pub const A_MAX_RECORDS: usize = 89;
/// The first byte of the AAAA record with sequence number 0: addresses
/// stay within 2000::/3, global unicast.
pub const AAAA_FIRST_BYTE: u8 = 0x20;
/// The most AAAA records in an answer.
pub const AAAA_MAX_RECORDS: usize = 32;
/// The first byte of a NULL answer's RDATA, before the payload: an empty
/// RDATA is what DNS UPDATE uses for deletions, and parsers (hickory's
/// among them) reject it in answers.
pub const NULL_LEAD: u8 = 0;
/// Bytes of the payload length before the payload in address records.
const ADDRESS_LEN_PREFIX: usize = 2;

/// The first character of a base128 name's first label: base32 never
/// writes a `9`, so [`decode_name`] tells the two apart.
pub const BASE128_MARKER: u8 = b'9';

/// The 128 symbols of base128, value order: `0-9`, `a-z`, `-`, `_`, then the
/// 90 bytes `0x80..=0xD9`. Resolvers randomise the case of ASCII letters
/// only (0x20) and carry label bytes 8-bit clean, so every symbol survives;
/// letters decode in either case. (`data-encoding` cannot express this: its
/// symbols must be ASCII, hence the hand-written packing below.)
pub const BASE128_ALPHABET: [u8; 128] = {
    let mut a = [0u8; 128];
    let mut i = 0;
    while i < 128 {
        a[i] = match i {
            0..=9 => b'0' + i as u8,
            10..=35 => b'a' + (i - 10) as u8,
            36 => b'-',
            37 => b'_',
            _ => 0x80 + (i - 38) as u8,
        };
        i += 1;
    }
    a
};

/// The value of base128 symbol `c` (letters in either case).
fn base128_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'z' => Some(c - b'a' + 10),
        b'A'..=b'Z' => Some(c - b'A' + 10),
        b'-' => Some(36),
        b'_' => Some(37),
        0x80..=0xD9 => Some(c - 0x80 + 38),
        _ => None,
    }
}

/// Characters that base128 writes for `n` bytes.
pub fn base128_encode_len(n: usize) -> usize {
    (n * 8).div_ceil(7)
}

/// Write `input` in base128 (big-endian bit order, the last symbol padded
/// with zero bits) to the front of `out`; returns the characters written.
/// Panics when `out` is shorter than [`base128_encode_len`].
pub fn base128_encode(input: &[u8], out: &mut [u8]) -> usize {
    let len = base128_encode_len(input.len());
    let out = &mut out[..len];
    let (mut acc, mut bits, mut o) = (0u32, 0u32, 0);
    for &b in input {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 7 {
            bits -= 7;
            out[o] = BASE128_ALPHABET[((acc >> bits) & 0x7f) as usize];
            o += 1;
        }
        acc &= (1 << bits) - 1;
    }
    if bits > 0 {
        out[o] = BASE128_ALPHABET[((acc << (7 - bits)) & 0x7f) as usize];
        o += 1;
    }
    debug_assert_eq!(o, len);
    len
}

/// Decode base128 `input` (letters in either case) to the front of `out`;
/// returns the bytes written. Fails for symbols outside the alphabet, for
/// lengths base128 never writes, for non-zero padding bits (so every byte
/// string has exactly one encoding, up to case) and when `out` is short.
/// Never panics.
pub fn base128_decode(input: &[u8], out: &mut [u8]) -> Result<usize, DropReason> {
    let n = input.len() * 7 / 8;
    if base128_encode_len(n) != input.len() {
        return Err(DropReason::Malformed);
    }
    let out = out.get_mut(..n).ok_or(DropReason::TooLarge)?;
    let (mut acc, mut bits, mut o) = (0u32, 0u32, 0);
    for &c in input {
        let v = base128_value(c).ok_or(DropReason::Malformed)?;
        acc = (acc << 7) | u32::from(v);
        bits += 7;
        if bits >= 8 {
            bits -= 8;
            out[o] = (acc >> bits) as u8;
            o += 1;
            acc &= (1 << bits) - 1;
        }
    }
    if acc != 0 {
        return Err(DropReason::Malformed);
    }
    Ok(o)
}

/// Why a DNS name or message could not be built.
#[derive(Clone, Debug, thiserror::Error)]
pub enum DnsError {
    /// The tunnel domain (or nameserver name) is not a valid name, is the
    /// root, or is too long to leave room for data.
    #[error("invalid tunnel domain or nameserver name {0:?}")]
    InvalidDomain(String),
    /// An empty payload has no data labels: its name would be the apex.
    #[error("an empty payload cannot be encoded in a query name")]
    EmptyPayload,
    /// The payload or message exceeds what the name or response can carry.
    #[error("{len} bytes exceed the capacity of {capacity}")]
    TooLarge {
        /// The payload's (or message's) size.
        len: usize,
        /// What fits.
        capacity: usize,
    },
    /// A data answer was asked for a question of a type that carries none
    /// (or a TXT answer for a question of another type).
    #[error("no data answer for a {0} question")]
    WrongType(RecordType),
    /// `hickory-proto` failed to encode the message.
    #[error("DNS encoding failed: {0}")]
    Encode(#[from] ProtoError),
}

/// The tunnel domain: a lowercased, fully qualified name such as
/// `t.example.com.`, with the nameserver its SOA and NS answers name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Domain {
    name: Name,
    /// Presentation length without the trailing dot.
    text_len: usize,
    /// `None`: `ns.<domain>`.
    nameserver: Option<Name>,
}

impl Domain {
    /// Parse a tunnel domain such as `t.example.com` (a trailing dot is
    /// optional; case does not matter). Fails for the root, for characters
    /// that are not ASCII letters, digits, `-` or `_`, and for domains too
    /// long to leave a query name room for one payload byte.
    pub fn new(name: &str) -> Result<Self, DnsError> {
        let invalid = || DnsError::InvalidDomain(name.to_owned());
        let mut parsed = Name::from_ascii(name).map_err(|_| invalid())?;
        if parsed.iter().len() == 0 {
            return Err(invalid());
        }
        parsed.set_fqdn(true);
        let parsed = parsed.to_lowercase();
        // `len` counts one dot per label, the trailing one included.
        let text_len = parsed.len() - 1;
        // The SOA names hostmaster.<domain>: it must fit too.
        if upstream_capacity(text_len, MAX_NAME_LEN, NameEncoding::Base32) == 0
            || parsed.prepend_label(&b"hostmaster"[..]).is_err()
        {
            return Err(invalid());
        }
        Ok(Self {
            name: parsed,
            text_len,
            nameserver: None,
        })
    }

    /// Name `nameserver` (e.g. `tns.example.com`, best outside the tunnel
    /// domain, with its address in the parent zone) in SOA and NS answers
    /// instead of `ns.<domain>`.
    pub fn with_nameserver(mut self, nameserver: &str) -> Result<Self, DnsError> {
        let mut ns = Name::from_ascii(nameserver)
            .map_err(|_| DnsError::InvalidDomain(nameserver.to_owned()))?;
        if ns.iter().len() == 0 {
            return Err(DnsError::InvalidDomain(nameserver.to_owned()));
        }
        ns.set_fqdn(true);
        self.nameserver = Some(ns.to_lowercase());
        Ok(self)
    }

    /// The domain, lowercase and fully qualified.
    pub fn name(&self) -> &Name {
        &self.name
    }

    /// Whether `name` is the domain or below it (ignoring case).
    pub fn contains(&self, name: &Name) -> bool {
        self.name.zone_of(name)
    }

    /// Whether `name` is the domain itself (ignoring case).
    pub fn is_apex(&self, name: &Name) -> bool {
        self.name.eq_ignore_root(name)
    }

    /// The label of `name` next to the domain (`b` in `a.b.t.example.com`),
    /// if `name` is below it.
    pub fn label_below<'a>(&self, name: &'a Name) -> Option<&'a [u8]> {
        if !self.contains(name) {
            return None;
        }
        let below = name
            .iter()
            .count()
            .checked_sub(self.name.iter().count() + 1)?;
        name.iter().nth(below)
    }

    /// Whether `name` exists in the zone without carrying tunnel data: the
    /// apex, or the nameserver its records name (`ns.<domain>` unless set).
    pub fn is_host(&self, name: &Name) -> bool {
        let ns_label = name
            .iter()
            .next()
            .is_some_and(|l| l.eq_ignore_ascii_case(b"ns"));
        self.is_apex(name)
            || match &self.nameserver {
                Some(ns) => ns.eq_ignore_root(name),
                None => ns_label && name.iter().count() == self.name.iter().count() + 1,
            }
    }

    /// How many payload bytes [`encode_name`] fits into a query name of at
    /// most `max_name_len` characters (without the trailing dot; values above
    /// [`MAX_NAME_LEN`] count as that), after base32 and label splitting.
    /// Zero when not even one byte fits.
    pub fn upstream_capacity(&self, max_name_len: usize) -> usize {
        upstream_capacity(self.text_len, max_name_len, NameEncoding::Base32)
    }

    /// [`Domain::upstream_capacity`] for names in `encoding`
    /// ([`encode_name_as`]).
    pub fn upstream_capacity_as(&self, max_name_len: usize, encoding: NameEncoding) -> usize {
        upstream_capacity(self.text_len, max_name_len, encoding)
    }
}

impl Domain {
    /// Payload bytes one answer name carries ([`encode_answer_name`]).
    pub fn answer_name_capacity(&self) -> usize {
        let room = MAX_NAME_LEN.saturating_sub(self.text_len);
        let chars = room - room.div_ceil(MAX_LABEL_LEN + 1);
        chars.saturating_sub(1) * 5 / 8
    }

    /// Wire length of the answer name carrying `n` bytes, uncompressed.
    fn answer_name_wire_len(&self, n: usize) -> usize {
        let chars = 1 + BASE32.encode_len(n);
        chars + chars.div_ceil(MAX_LABEL_LEN) + self.text_len + 2
    }

    /// The most payload bytes an answer name within `budget` wire bytes
    /// carries; `None` when not even an empty one fits.
    fn answer_name_bytes_within(&self, budget: usize) -> Option<usize> {
        (0..=self.answer_name_capacity())
            .rev()
            .find(|&n| self.answer_name_wire_len(n) <= budget)
    }
}

/// Payload bytes that fit in a name of `max_name_len` characters under a
/// domain of `domain_len` characters.
fn upstream_capacity(domain_len: usize, max_name_len: usize, encoding: NameEncoding) -> usize {
    let room = max_name_len.min(MAX_NAME_LEN).saturating_sub(domain_len);
    // Every label of up to 63 characters costs one dot.
    let chars = room - room.div_ceil(MAX_LABEL_LEN + 1);
    match encoding {
        NameEncoding::Base32 => chars * 5 / 8,
        NameEncoding::Base128 => chars.saturating_sub(1) * 7 / 8,
    }
}

/// The query name that carries `payload` under `domain`: base32 (lowercase,
/// no padding) in labels of 63 characters (the last one shorter), then the
/// domain. Fails for an empty payload and for one longer than
/// `domain.upstream_capacity(MAX_NAME_LEN)`; callers with a tighter name
/// budget check [`Domain::upstream_capacity`] themselves.
/// `name.to_ascii()` gives the presentation form.
pub fn encode_name(domain: &Domain, payload: &[u8]) -> Result<Name, DnsError> {
    encode_name_as(domain, payload, NameEncoding::Base32)
}

/// [`encode_name`] in `encoding`: for [`NameEncoding::Base128`] the text is
/// [`BASE128_MARKER`] then the payload in base128, split into labels of 63
/// bytes like base32. The limit is [`Domain::upstream_capacity_as`].
pub fn encode_name_as(
    domain: &Domain,
    payload: &[u8],
    encoding: NameEncoding,
) -> Result<Name, DnsError> {
    if payload.is_empty() {
        return Err(DnsError::EmptyPayload);
    }
    let capacity = domain.upstream_capacity_as(MAX_NAME_LEN, encoding);
    if payload.len() > capacity {
        return Err(DnsError::TooLarge {
            len: payload.len(),
            capacity,
        });
    }
    let mut buf = [0u8; MAX_NAME_LEN];
    let text = match encoding {
        NameEncoding::Base32 => {
            let text = &mut buf[..BASE32.encode_len(payload.len())];
            BASE32.encode_mut(payload, text);
            text
        }
        NameEncoding::Base128 => {
            buf[0] = BASE128_MARKER;
            let n = base128_encode(payload, &mut buf[1..]);
            &mut buf[..1 + n]
        }
    };
    let labels = text.chunks(MAX_LABEL_LEN).chain(domain.name.iter());
    Ok(Name::from_labels(labels)?)
}

/// The payload that `name` carries under `domain`, written to the front of
/// `out`; returns its length. Case does not matter and the data labels may be
/// split anywhere. Fails with [`DropReason::Malformed`] for a name outside
/// the domain, the apex itself and anything that is not canonical base32 or
/// [`BASE128_MARKER`] then canonical base128 (the marker is tried first; see
/// [`encode_name_as`]), and with [`DropReason::TooLarge`] when `out` is short (one of
/// [`MAX_UPSTREAM_PAYLOAD`] bytes never is). Never panics; never allocates.
pub fn decode_name(domain: &Domain, name: &Name, out: &mut [u8]) -> Result<usize, DropReason> {
    if !domain.contains(name) {
        return Err(DropReason::Malformed);
    }
    let data_labels = name.iter().count() - domain.name.iter().count();
    if data_labels == 0 {
        return Err(DropReason::Malformed);
    }
    let mut text = [0u8; 256];
    let mut len = 0;
    for label in name.iter().take(data_labels) {
        let end = len + label.len();
        text.get_mut(len..end)
            .ok_or(DropReason::Malformed)?
            .copy_from_slice(label);
        len = end;
    }
    if text[0] == BASE128_MARKER {
        return match base128_decode(&text[1..len], out)? {
            0 => Err(DropReason::Malformed),
            n => Ok(n),
        };
    }
    let n = BASE32.decode_len(len).map_err(|_| DropReason::Malformed)?;
    let out = out.get_mut(..n).ok_or(DropReason::TooLarge)?;
    BASE32
        .decode_mut(&text[..len], out)
        .map_err(|_| DropReason::Malformed)
}

/// The name that carries `payload` (at most
/// [`Domain::answer_name_capacity`] bytes, maybe none) in a CNAME, MX or SRV
/// answer: [`ANSWER_NAME_MARKER`], then the payload in base32, in labels of
/// 63 characters, under the tunnel domain.
pub fn encode_answer_name(domain: &Domain, payload: &[u8]) -> Result<Name, DnsError> {
    let capacity = domain.answer_name_capacity();
    if payload.len() > capacity {
        return Err(DnsError::TooLarge {
            len: payload.len(),
            capacity,
        });
    }
    let mut text = vec![ANSWER_NAME_MARKER];
    text.extend_from_slice(BASE32.encode(payload).as_bytes());
    let labels = text.chunks(MAX_LABEL_LEN).chain(domain.name.iter());
    Ok(Name::from_labels(labels)?)
}

/// The payload of an answer name under `domain` (case and label splits
/// ignored); `None` for anything [`encode_answer_name`] does not write.
pub fn decode_answer_name(domain: &Domain, name: &Name) -> Option<Vec<u8>> {
    if !domain.contains(name) {
        return None;
    }
    let data_labels = name.iter().count() - domain.name.iter().count();
    let text: Vec<u8> = name.iter().take(data_labels).flatten().copied().collect();
    let (&marker, data) = text.split_first()?;
    if marker != ANSWER_NAME_MARKER {
        return None;
    }
    BASE32.decode(data).ok()
}

/// The records of an address answer: `| len u16 | payload |`, zero-padded to
/// whole records, `chunk` bytes (3 or 15) behind each record's sequence
/// number, counted from `first`.
fn encode_addresses(payload: &[u8], chunk: usize, first: u8) -> Vec<Vec<u8>> {
    let len = u16::try_from(payload.len()).unwrap_or(u16::MAX);
    let mut stream = len.to_be_bytes().to_vec();
    stream.extend_from_slice(payload);
    stream.resize(stream.len().div_ceil(chunk) * chunk, 0);
    stream
        .chunks(chunk)
        .enumerate()
        .map(|(i, c)| {
            let mut rr = vec![first.wrapping_add(i as u8)];
            rr.extend_from_slice(c);
            rr
        })
        .collect()
}

/// The payload of address records (each one's octets) in any order; `None`
/// unless their sequence numbers are exactly 0..n and the length and
/// padding are what [`encode_addresses`] writes.
fn decode_addresses(ty: AnswerType, mut records: Vec<Vec<u8>>) -> Option<Vec<u8>> {
    let (first, max) = match ty {
        AnswerType::A => (A_FIRST_OCTET, A_MAX_RECORDS),
        _ => (AAAA_FIRST_BYTE, AAAA_MAX_RECORDS),
    };
    records.sort_by_key(|r| r[0].wrapping_sub(first));
    let mut stream = Vec::new();
    for (i, r) in records.iter().enumerate() {
        if i >= max || usize::from(r[0].wrapping_sub(first)) != i {
            return None;
        }
        stream.extend_from_slice(&r[1..]);
    }
    let (len, rest) = stream.split_first_chunk::<ADDRESS_LEN_PREFIX>()?;
    let len = usize::from(u16::from_be_bytes(*len));
    let chunk = records[0].len() - 1;
    let (payload, padding) = rest.split_at_checked(len)?;
    (padding.len() < chunk && padding.iter().all(|&b| b == 0)).then(|| payload.to_vec())
}

/// The size limit of a response to a querier that advertised `edns_size`
/// (`None`: no EDNS0, 512 bytes; sizes below 512 count as 512).
pub fn response_limit(edns_size: Option<u16>) -> usize {
    usize::from(edns_size.unwrap_or(CLASSIC_UDP_SIZE).max(CLASSIC_UDP_SIZE))
}

/// How many payload bytes [`build_txt_answer`] fits into a response to a
/// question whose name takes `question_name_len` bytes on the wire (the
/// presentation length without the trailing dot plus 2; see
/// [`Query::name_wire_len`]) from a querier that advertised `edns_size`.
///
/// The response is the header, the question, one TXT record whose owner
/// is compressed to a pointer, one length byte per 255 payload bytes, and an
/// OPT record when the query had one. A server that wants a smaller limit
/// than the querier's (e.g. 1232 against IP fragmentation) lowers
/// [`Query::edns_size`] before building the answer.
pub fn downstream_capacity(question_name_len: usize, edns_size: Option<u16>) -> usize {
    let opt = if edns_size.is_some() { OPT_LEN } else { 0 };
    let fixed = HEADER_LEN + question_name_len + QUESTION_TAIL + ANSWER_OVERHEAD + opt;
    let rdata = response_limit(edns_size).saturating_sub(fixed);
    // One length byte for each character-string of up to 255 bytes.
    rdata - rdata.div_ceil(MAX_CHARACTER_STRING + 1)
}

/// How many payload bytes [`build_answer`] fits into a `ty` answer to a
/// question whose name takes `question_name_len` bytes on the wire, from a
/// querier that advertised `edns_size`; [`downstream_capacity`] for TXT.
/// Names in records are counted uncompressed (the encoder may compress
/// some). Zero where not even an empty answer fits.
pub fn answer_capacity(
    ty: AnswerType,
    domain: &Domain,
    question_name_len: usize,
    edns_size: Option<u16>,
) -> usize {
    let opt = if edns_size.is_some() { OPT_LEN } else { 0 };
    let fixed = HEADER_LEN + question_name_len + QUESTION_TAIL + opt;
    let budget = response_limit(edns_size).saturating_sub(fixed);
    let rr = ANSWER_OVERHEAD;
    match ty {
        AnswerType::Txt => downstream_capacity(question_name_len, edns_size),
        AnswerType::Null => budget.saturating_sub(rr + 1).min(usize::from(u16::MAX) - 1),
        AnswerType::Cname => budget
            .checked_sub(rr)
            .and_then(|b| domain.answer_name_bytes_within(b))
            .unwrap_or(0),
        AnswerType::Mx => names_capacity(domain, budget, rr + 2),
        AnswerType::Srv => names_capacity(domain, budget, rr + 6),
        AnswerType::Aaaa => addresses_capacity(budget / (rr + 16), AAAA_MAX_RECORDS, 15),
        AnswerType::A => addresses_capacity(budget / (rr + 4), A_MAX_RECORDS, 3),
    }
}

/// Payload in MX or SRV records of `per_record` bytes before the name: full
/// names while they fit, then one shorter name.
fn names_capacity(domain: &Domain, budget: usize, per_record: usize) -> usize {
    let cap = domain.answer_name_capacity();
    let full = per_record + domain.answer_name_wire_len(cap);
    let k = budget / full;
    let rest = (budget - k * full)
        .checked_sub(per_record)
        .and_then(|b| domain.answer_name_bytes_within(b))
        .unwrap_or(0);
    k * cap + rest
}

fn addresses_capacity(records: usize, max: usize, chunk: usize) -> usize {
    (records.min(max) * chunk).saturating_sub(ADDRESS_LEN_PREFIX)
}

/// The bytes of a TXT query for `name` with message id `id` (the caller
/// draws it at random), RD set, and an EDNS0 OPT record advertising
/// `edns_size` when it is `Some` (sizes below 512 are sent as 512).
pub fn build_query(id: u16, name: &Name, edns_size: Option<u16>) -> Result<Vec<u8>, DnsError> {
    build_query_as(id, name, AnswerType::Txt, edns_size)
}

/// [`build_query`] asking for `ty` records.
pub fn build_query_as(
    id: u16,
    name: &Name,
    ty: AnswerType,
    edns_size: Option<u16>,
) -> Result<Vec<u8>, DnsError> {
    build_query_with(id, name, ty, edns_size, &[])
}

/// [`build_query_as`] with `option` (unless empty) in a
/// [`PAYLOAD_OPTION`] of the OPT record, which it then has even without
/// `edns_size` (at 512 bytes).
pub fn build_query_with(
    id: u16,
    name: &Name,
    ty: AnswerType,
    edns_size: Option<u16>,
    option: &[u8],
) -> Result<Vec<u8>, DnsError> {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Question::query(name.clone(), ty.record_type()));
    if edns_size.is_some() || !option.is_empty() {
        let mut edns = Edns::new();
        edns.set_max_payload(edns_size.unwrap_or(CLASSIC_UDP_SIZE));
        if !option.is_empty() {
            edns.options_mut()
                .insert(EdnsOption::Unknown(PAYLOAD_OPTION, option.to_vec()));
        }
        msg.set_edns(edns);
    }
    Ok(msg.to_vec()?)
}

/// What a response to one of our TXT queries said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// NOERROR with a TXT record for the name: its character-strings
    /// concatenated.
    Data(Vec<u8>),
    /// NOERROR without a record of the asked type for the name (NODATA).
    Empty,
    /// NOERROR with records of the asked type that do not decode: a
    /// resolver or middlebox dropped, altered or added some.
    Garbled,
    /// TC set: the answer did not fit the size we advertised (or the
    /// resolver's own limit).
    Truncated,
    /// SERVFAIL: the resolver could not reach the server or gave up.
    ServerFailure,
    /// REFUSED.
    Refused,
    /// NXDOMAIN.
    NameError,
    /// Any other response code (FORMERR, NOTIMP, extended codes...).
    Other(u16),
}

/// Parse a response to the TXT query `build_query(expected_id,
/// expected_name, _)`: [`parse_answer`] for [`AnswerType::Txt`], which
/// needs no domain.
pub fn parse_response(
    expected_id: u16,
    expected_name: &Name,
    bytes: &[u8],
) -> Result<Answer, DropReason> {
    parse_typed(expected_id, expected_name, AnswerType::Txt, None, bytes)
}

/// Parse a response to the query `build_query_as(expected_id,
/// expected_name, ty, _)`. The message id must match and the question must be
/// `expected_name` (ignoring case: resolvers may hand back either) of type
/// `ty`, class IN, or the result is [`DropReason::UnexpectedResponse`];
/// bytes that are not a DNS response with one question are
/// [`DropReason::Malformed`]. The payload is decoded from the records of
/// type `ty` owned by the name (see [`build_answer`]; names under `domain`,
/// case ignored; RR order ignored). Never panics.
pub fn parse_answer(
    expected_id: u16,
    expected_name: &Name,
    ty: AnswerType,
    domain: &Domain,
    bytes: &[u8],
) -> Result<Answer, DropReason> {
    parse_typed(expected_id, expected_name, ty, Some(domain), bytes)
}

fn parse_typed(
    expected_id: u16,
    expected_name: &Name,
    ty: AnswerType,
    domain: Option<&Domain>,
    bytes: &[u8],
) -> Result<Answer, DropReason> {
    let mut decoder = BinDecoder::new(bytes);
    let header = Header::read(&mut decoder).map_err(|_| DropReason::Malformed)?;
    // Check the counts before `Message::read`, which reserves room for every
    // question the header announces (up to 65535) before reading one.
    if header.metadata.message_type != MessageType::Response || header.counts.queries != 1 {
        return Err(DropReason::Malformed);
    }
    if header.metadata.id != expected_id {
        return Err(DropReason::UnexpectedResponse);
    }
    let question = Question::read(&mut decoder).map_err(|_| DropReason::Malformed)?;
    if !question.name().eq_ignore_root(expected_name)
        || question.query_type() != ty.record_type()
        || question.query_class() != DNSClass::IN
    {
        return Err(DropReason::UnexpectedResponse);
    }
    // A truncated response may be cut anywhere after the question.
    if header.metadata.truncation {
        return Ok(Answer::Truncated);
    }
    let msg = Message::from_vec(bytes).map_err(|_| DropReason::Malformed)?;
    match msg.metadata.response_code {
        ResponseCode::NoError => {}
        ResponseCode::ServFail => return Ok(Answer::ServerFailure),
        ResponseCode::Refused => return Ok(Answer::Refused),
        ResponseCode::NXDomain => return Ok(Answer::NameError),
        other => return Ok(Answer::Other(other.into())),
    }
    let records: Vec<&RData> = msg
        .answers
        .iter()
        .filter(|r| r.record_type() == ty.record_type() && r.name.eq_ignore_root(question.name()))
        .map(|r| &r.data)
        .collect();
    if records.is_empty() {
        return Ok(Answer::Empty);
    }
    Ok(decode_records(ty, domain, &records).map_or(Answer::Garbled, Answer::Data))
}

/// The payload of an answer's records of type `ty` (see [`build_answer`]).
fn decode_records(ty: AnswerType, domain: Option<&Domain>, records: &[&RData]) -> Option<Vec<u8>> {
    match ty {
        // One record carries it all; a second one would be a resolver's.
        AnswerType::Txt => match records[0] {
            RData::TXT(txt) => Some(txt.txt_data.concat()),
            _ => None,
        },
        AnswerType::Null => match records[0] {
            RData::NULL(null) => match null.anything.split_first() {
                Some((&NULL_LEAD, payload)) => Some(payload.to_vec()),
                _ => None,
            },
            _ => None,
        },
        AnswerType::Cname => match records[0] {
            RData::CNAME(CNAME(name)) => decode_answer_name(domain?, name),
            _ => None,
        },
        AnswerType::Mx | AnswerType::Srv => {
            let named = records.iter().map(|r| match r {
                RData::MX(mx) => Some((mx.preference, &mx.exchange)),
                RData::SRV(srv) => Some((srv.priority, &srv.target)),
                _ => None,
            });
            let mut named: Vec<(u16, &Name)> = named.collect::<Option<_>>()?;
            named.sort_by_key(|&(order, _)| order);
            let mut out = Vec::new();
            for (i, (order, name)) in named.into_iter().enumerate() {
                if usize::from(order) != i {
                    return None;
                }
                out.extend(decode_answer_name(domain?, name)?);
            }
            Some(out)
        }
        AnswerType::Aaaa | AnswerType::A => {
            let addrs = records.iter().map(|r| match r {
                RData::A(a) => Some(a.0.octets().to_vec()),
                RData::AAAA(a) => Some(a.0.octets().to_vec()),
                _ => None,
            });
            decode_addresses(ty, addrs.collect::<Option<_>>()?)
        }
    }
}

/// A query as the server received it: everything its response must echo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// The message id.
    pub id: u16,
    /// The question name as asked, case preserved: responses echo it byte
    /// for byte, as resolvers that randomise case (0x20) check.
    pub name: Name,
    /// The question type.
    pub qtype: RecordType,
    /// The UDP payload size of the querier's EDNS0 OPT record (at least 512;
    /// hickory raises smaller values), `None` without EDNS0. Responses carry
    /// an OPT record exactly when this is `Some`, and never exceed
    /// [`response_limit`] of it: lower it to send smaller responses.
    pub edns_size: Option<u16>,
    /// RD, copied into responses.
    pub recursion_desired: bool,
    /// CD, copied into responses.
    pub checking_disabled: bool,
    /// The data of the query's [`PAYLOAD_OPTION`] (empty without one).
    pub option: Vec<u8>,
}

impl Query {
    /// The question name's length on the wire, uncompressed.
    pub fn name_wire_len(&self) -> usize {
        self.name.iter().map(|label| label.len() + 1).sum::<usize>() + 1
    }

    /// The size limit of responses to this query.
    pub fn response_limit(&self) -> usize {
        response_limit(self.edns_size)
    }

    /// How much payload [`build_txt_answer`] fits into a response to this
    /// query: [`downstream_capacity`] for its name and EDNS0 size.
    pub fn downstream_capacity(&self) -> usize {
        downstream_capacity(self.name_wire_len(), self.edns_size)
    }

    /// The type of data answer this question asks for, if any.
    pub fn answer_type(&self) -> Option<AnswerType> {
        AnswerType::of(self.qtype)
    }

    /// How much payload [`build_answer`] fits into a response to this
    /// query ([`answer_capacity`]); zero for types that carry none.
    pub fn answer_capacity(&self, domain: &Domain) -> usize {
        self.answer_type().map_or(0, |ty| {
            answer_capacity(ty, domain, self.name_wire_len(), self.edns_size)
        })
    }
}

/// Parse a datagram sent to the server. Only standard queries (QR clear,
/// opcode QUERY) with exactly one question of class IN pass; everything
/// else, including garbage, is [`DropReason::Malformed`] (dropped unanswered,
/// so the server never answers what it cannot parse). The EDNS0 version and
/// options are ignored. Never panics.
pub fn parse_query(bytes: &[u8]) -> Result<Query, DropReason> {
    let header = Header::read(&mut BinDecoder::new(bytes)).map_err(|_| DropReason::Malformed)?;
    // Check the counts before `Message::read` (see `parse_response`).
    if header.metadata.message_type != MessageType::Query
        || header.metadata.op_code != OpCode::Query
        || header.counts.queries != 1
    {
        return Err(DropReason::Malformed);
    }
    let mut msg = Message::from_vec(bytes).map_err(|_| DropReason::Malformed)?;
    let question = msg.queries.pop().ok_or(DropReason::Malformed)?;
    if question.query_class() != DNSClass::IN {
        return Err(DropReason::Malformed);
    }
    let option = msg
        .edns
        .as_ref()
        .and_then(|e| e.option(EdnsCode::from(PAYLOAD_OPTION)))
        .map(|o| match o {
            EdnsOption::Unknown(_, data) => data.clone(),
            _ => Vec::new(),
        })
        .unwrap_or_default();
    Ok(Query {
        id: msg.metadata.id,
        qtype: question.query_type(),
        name: question.name,
        option,
        edns_size: msg.edns.as_ref().map(Edns::max_payload),
        recursion_desired: msg.metadata.recursion_desired,
        checking_disabled: msg.metadata.checking_disabled,
    })
}

/// The authoritative TXT answer to `q` carrying `payload` (raw bytes in
/// character-strings of at most 255 bytes; an empty payload is one empty
/// string), TTL 0. Fails with [`DnsError::WrongType`] when `q` is not a TXT
/// question and [`DnsError::TooLarge`] when the payload exceeds
/// [`Query::downstream_capacity`]; the bytes never exceed
/// [`Query::response_limit`].
pub fn build_txt_answer(q: &Query, payload: &[u8]) -> Result<Vec<u8>, DnsError> {
    if q.qtype != RecordType::TXT {
        return Err(DnsError::WrongType(q.qtype));
    }
    let capacity = q.downstream_capacity();
    if payload.len() > capacity {
        return Err(DnsError::TooLarge {
            len: payload.len(),
            capacity,
        });
    }
    let strings = if payload.is_empty() {
        vec![payload]
    } else {
        payload.chunks(MAX_CHARACTER_STRING).collect()
    };
    let mut msg = response(q, ResponseCode::NoError, true);
    msg.add_answer(Record::from_rdata(
        q.name.clone(),
        0,
        RData::TXT(TXT::from_bytes(strings)),
    ));
    finish(&msg, q.response_limit())
}

/// The authoritative answer to `q` carrying `payload` in records of the
/// question's type, TTL 0, owned by the question name:
/// - TXT: [`build_txt_answer`].
/// - NULL: one record, its RDATA [`NULL_LEAD`] then the payload.
/// - CNAME: one record, the payload in its name ([`encode_answer_name`]).
/// - MX, SRV: one record per [`Domain::answer_name_capacity`] bytes (at
///   least one), the payload in the exchange or target names; preference or
///   priority 0, 1, 2... gives their order (SRV weight and port 0).
/// - AAAA, A: `| len u16 | payload |` zero-padded to whole records, 15 or 3
///   bytes per record behind a sequence byte ([`AAAA_FIRST_BYTE`] or
///   [`A_FIRST_OCTET`] plus the record's number): resolvers shuffle
///   address records.
///
/// Fails with [`DnsError::WrongType`] for other question types and
/// [`DnsError::TooLarge`] when the payload exceeds [`Query::answer_capacity`]
/// (or not even an empty answer fits); the bytes never exceed
/// [`Query::response_limit`].
pub fn build_answer(q: &Query, domain: &Domain, payload: &[u8]) -> Result<Vec<u8>, DnsError> {
    let ty = q.answer_type().ok_or(DnsError::WrongType(q.qtype))?;
    if ty == AnswerType::Txt {
        return build_txt_answer(q, payload);
    }
    let capacity = q.answer_capacity(domain);
    if payload.len() > capacity {
        return Err(DnsError::TooLarge {
            len: payload.len(),
            capacity,
        });
    }
    let mut msg = response(q, ResponseCode::NoError, true);
    for rdata in answer_rdata(ty, domain, payload)? {
        msg.add_answer(Record::from_rdata(q.name.clone(), 0, rdata));
    }
    finish(&msg, q.response_limit())
}

/// The records of a non-TXT answer (see [`build_answer`]).
fn answer_rdata(ty: AnswerType, domain: &Domain, payload: &[u8]) -> Result<Vec<RData>, DnsError> {
    let names = || -> Result<Vec<Name>, DnsError> {
        let cap = domain.answer_name_capacity().max(1);
        let chunks: Vec<&[u8]> = if payload.is_empty() {
            vec![payload]
        } else {
            payload.chunks(cap).collect()
        };
        chunks
            .into_iter()
            .map(|c| encode_answer_name(domain, c))
            .collect()
    };
    let order = |i: usize| u16::try_from(i).unwrap_or(u16::MAX);
    Ok(match ty {
        AnswerType::Txt => vec![RData::TXT(TXT::from_bytes(
            payload.chunks(MAX_CHARACTER_STRING).collect(),
        ))],
        AnswerType::Null => {
            let mut rdata = vec![NULL_LEAD];
            rdata.extend_from_slice(payload);
            vec![RData::NULL(NULL::with(rdata))]
        }
        AnswerType::Cname => vec![RData::CNAME(CNAME(encode_answer_name(domain, payload)?))],
        AnswerType::Mx => names()?
            .into_iter()
            .enumerate()
            .map(|(i, n)| RData::MX(MX::new(order(i), n)))
            .collect(),
        AnswerType::Srv => names()?
            .into_iter()
            .enumerate()
            .map(|(i, n)| RData::SRV(SRV::new(order(i), 0, 0, n)))
            .collect(),
        AnswerType::Aaaa => encode_addresses(payload, 15, AAAA_FIRST_BYTE)
            .into_iter()
            .map(|o| {
                RData::AAAA(AAAA::from(Ipv6Addr::from(
                    <[u8; 16]>::try_from(o).expect("16 bytes"),
                )))
            })
            .collect(),
        AnswerType::A => encode_addresses(payload, 3, A_FIRST_OCTET)
            .into_iter()
            .map(|o| {
                RData::A(A::from(Ipv4Addr::from(
                    <[u8; 4]>::try_from(o).expect("4 bytes"),
                )))
            })
            .collect(),
    })
}

/// REFUSED, for questions outside the tunnel domain: the question echoed,
/// no records, AA clear.
pub fn build_refused(q: &Query) -> Result<Vec<u8>, DnsError> {
    finish(
        &response(q, ResponseCode::Refused, false),
        q.response_limit(),
    )
}

/// The authoritative answer to any question inside the zone that carries
/// no tunnel data: at the apex, SOA and NS questions get the zone's SOA
/// (mname: the nameserver, rname: `hostmaster.<domain>`, serial 1, negative
/// TTL 0) or NS record (the nameserver, no glue), with TTL [`APEX_TTL`];
/// every other question, at the apex or below it, gets NODATA (NOERROR, no
/// answer, the SOA in the authority section; the listener gives it below
/// the apex only where [`build_name_error`] fails). The apex names are
/// written with the question's case, so they compress against the question.
///
/// The caller checks [`Domain::contains`] first (names outside get
/// [`build_refused`]); for a name outside the zone this builds a REFUSED.
pub fn build_apex_answer(q: &Query, domain: &Domain) -> Result<Vec<u8>, DnsError> {
    if !domain.contains(&q.name) {
        return build_refused(q);
    }
    // The apex as the question spells it.
    let apex = q.name.trim_to(domain.name.iter().count());
    let nameserver = domain_nameserver(&apex, domain)?;
    let mut msg = response(q, ResponseCode::NoError, true);
    let at_apex = domain.is_apex(&q.name);
    match q.qtype {
        RecordType::SOA if at_apex => msg.add_answer(zone_soa(&apex, domain)?),
        RecordType::NS if at_apex => msg.add_answer(Record::from_rdata(
            apex.clone(),
            APEX_TTL,
            RData::NS(NS(nameserver)),
        )),
        _ => return finish_negative(msg, zone_soa(&apex, domain)?, q.response_limit()),
    };
    finish(&msg, q.response_limit())
}

/// NXDOMAIN (with the zone's SOA in the authority section, negative TTL 0)
/// for a name below the apex that carries no tunnel data: the first step of
/// a resolver that minimises query names. A resolver that minimises on a
/// best-effort basis (unbound, BIND and Knot Resolver by default) takes an
/// NXDOMAIN there as a server that does not know empty non-terminals and
/// sends the full name at once, so one query costs it two upstream queries
/// instead of one for each label. A resolver that trusts an unsigned
/// NXDOMAIN to mean nothing below exists (RFC 8020) would answer the full
/// name NXDOMAIN itself: the listener only gives this answer while full
/// names keep following it (see the DNS listener).
pub fn build_name_error(q: &Query, domain: &Domain) -> Result<Vec<u8>, DnsError> {
    if !domain.contains(&q.name) {
        return build_refused(q);
    }
    let apex = q.name.trim_to(domain.name.iter().count());
    let msg = response(q, ResponseCode::NXDomain, true);
    finish_negative(msg, zone_soa(&apex, domain)?, q.response_limit())
}

/// A negative answer (NODATA or NXDOMAIN) with the zone's `soa` in its
/// authority section. Only a very long domain, nameserver name and question
/// together overflow 512 bytes: then without the SOA (RFC 2308 allows it;
/// the answer is just not cached, which we want anyway).
fn finish_negative(mut msg: Message, soa: Record, limit: usize) -> Result<Vec<u8>, DnsError> {
    msg.add_authority(soa);
    if let Ok(bytes) = finish(&msg, limit) {
        return Ok(bytes);
    }
    msg.authorities.clear();
    finish(&msg, limit)
}

/// The zone's SOA record, owned by `apex` as a question spells it.
fn zone_soa(apex: &Name, domain: &Domain) -> Result<Record, DnsError> {
    let hostmaster = apex.prepend_label(&b"hostmaster"[..])?;
    let soa = SOA::new(
        domain_nameserver(apex, domain)?,
        hostmaster,
        1,
        3600,
        600,
        86400,
        0,
    );
    Ok(Record::from_rdata(apex.clone(), APEX_TTL, RData::SOA(soa)))
}

/// The nameserver the zone's SOA and NS records name: the one configured,
/// else `ns.<apex>`.
fn domain_nameserver(apex: &Name, domain: &Domain) -> Result<Name, DnsError> {
    match &domain.nameserver {
        Some(ns) => Ok(ns.clone()),
        None => Ok(apex.prepend_label(&b"ns"[..])?),
    }
}

/// A response to `q`: its id, RD and CD, the question echoed, an OPT record
/// when the query had one.
fn response(q: &Query, code: ResponseCode, authoritative: bool) -> Message {
    let mut msg = Message::response(q.id, OpCode::Query);
    msg.metadata.authoritative = authoritative;
    msg.metadata.recursion_desired = q.recursion_desired;
    msg.metadata.checking_disabled = q.checking_disabled;
    msg.metadata.response_code = code;
    msg.add_query(Question::query(q.name.clone(), q.qtype));
    if q.edns_size.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(SERVER_EDNS_SIZE);
        msg.set_edns(edns);
    }
    msg
}

/// Serialize `msg`, refusing to exceed `limit` bytes.
fn finish(msg: &Message, limit: usize) -> Result<Vec<u8>, DnsError> {
    let bytes = msg.to_vec()?;
    if bytes.len() > limit {
        return Err(DnsError::TooLarge {
            len: bytes.len(),
            capacity: limit,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn domain() -> Domain {
        Domain::new("t.example.com").unwrap()
    }

    /// `hi` (base32 `nbuq`) under t.example.com, as a wire name.
    const NAME_HI: [u8; 20] = [
        4, b'n', b'b', b'u', b'q', 1, b't', 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3, b'c',
        b'o', b'm', 0,
    ];

    /// A query's bytes: header, question `name` TXT IN, optional OPT.
    fn query_bytes(id: u16, flags: [u8; 2], name: &[u8], opt: Option<u16>) -> Vec<u8> {
        let mut b = id.to_be_bytes().to_vec();
        b.extend_from_slice(&flags);
        b.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(opt.is_some())]);
        b.extend_from_slice(name);
        b.extend_from_slice(&[0, 16, 0, 1]);
        if let Some(size) = opt {
            b.extend_from_slice(&[0, 0, 41]);
            b.extend_from_slice(&size.to_be_bytes());
            b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
        b
    }

    /// A copy of `name` with the case of the letters flipped where `mask`
    /// says, as a resolver doing 0x20 would.
    fn flip_case(name: &Name, mask: &[bool]) -> Name {
        let mut i = 0;
        let labels: Vec<Vec<u8>> = name
            .iter()
            .map(|label| {
                label
                    .iter()
                    .map(|&c| {
                        i += 1;
                        let flip = mask.get(i % mask.len().max(1)).copied().unwrap_or(false);
                        if flip && c.is_ascii_alphabetic() {
                            c ^ 0x20
                        } else {
                            c
                        }
                    })
                    .collect()
            })
            .collect();
        Name::from_labels(labels).unwrap()
    }

    #[test]
    fn base128_alphabet_and_vectors() {
        let mut seen = [false; 256];
        for (i, &c) in BASE128_ALPHABET.iter().enumerate() {
            assert!(!seen[usize::from(c)], "{c:#x} twice");
            seen[usize::from(c)] = true;
            assert_eq!(base128_value(c), Some(i as u8));
            assert_eq!(base128_value(c.to_ascii_uppercase()), Some(i as u8));
            assert!(!c.is_ascii_uppercase());
        }
        assert_eq!(BASE128_ALPHABET[127], 0xD9);
        // Base32 never writes the marker.
        assert!(!BASE32.encode(&[0xff; 40]).contains('9'));
        let enc = |input: &[u8]| {
            let mut out = vec![0; base128_encode_len(input.len())];
            base128_encode(input, &mut out);
            out
        };
        assert_eq!(enc(b""), b"");
        // 0x00 -> 0000000|0 -> "00"; 0xff -> 1111111|1000000 -> 127, 64.
        assert_eq!(enc(&[0]), b"00");
        assert_eq!(enc(&[0xff]), [0xD9, 0x80 + 64 - 38]);
        // Seven bytes are exactly eight characters.
        assert_eq!(enc(&[0; 7]), b"00000000");
        assert_eq!(base128_encode_len(7), 8);
        let mut out = [0u8; 8];
        // A length base128 never writes, padding bits set, bad symbols.
        assert_eq!(base128_decode(b"0", &mut out), Err(DropReason::Malformed));
        assert_eq!(base128_decode(b"01", &mut out), Err(DropReason::Malformed));
        assert_eq!(base128_decode(b"0.", &mut out), Err(DropReason::Malformed));
        assert_eq!(
            base128_decode(&[b'0', 0xDA], &mut out),
            Err(DropReason::Malformed)
        );
        assert_eq!(
            base128_decode(b"00", &mut out[..0]),
            Err(DropReason::TooLarge)
        );
        assert_eq!(base128_decode(b"00", &mut out), Ok(1));
    }

    #[test]
    fn base128_names_keep_their_bytes_on_the_wire() {
        let d = domain();
        let payload: Vec<u8> = (0..=255u8).cycle().take(205).collect();
        let name = encode_name_as(&d, &payload, NameEncoding::Base128).unwrap();
        assert_eq!(name.iter().next().unwrap()[0], BASE128_MARKER);
        assert!(name.iter().flatten().any(|&c| c >= 0x80));
        let bytes = build_query(7, &name, Some(1232)).unwrap();
        let q = parse_query(&bytes).unwrap();
        assert!(q.name.eq_case(&name));
        let upper = flip_case(&q.name, &[true]);
        let mut out = [0u8; MAX_UPSTREAM_PAYLOAD];
        assert_eq!(decode_name(&d, &upper, &mut out), Ok(205));
        assert_eq!(&out[..205], &payload[..]);
        // The answer echoes the name; the client's check ignores case only.
        let answer = build_txt_answer(&q, b"ok").unwrap();
        assert_eq!(
            parse_response(7, &upper, &answer),
            Ok(Answer::Data(b"ok".to_vec()))
        );
        let mut mangled = name.iter().map(<[u8]>::to_vec).collect::<Vec<_>>();
        for c in mangled.iter_mut().flatten() {
            if *c >= 0x80 {
                *c = b'?';
            }
        }
        let mangled = Name::from_labels(mangled.iter().map(Vec::as_slice)).unwrap();
        assert_eq!(
            parse_response(7, &mangled, &answer),
            Err(DropReason::UnexpectedResponse)
        );
        assert_eq!(
            decode_name(&d, &mangled, &mut out),
            Err(DropReason::Malformed)
        );
        // The bare marker carries nothing.
        let empty = Name::from_labels([&b"9"[..]].into_iter().chain(d.name().iter())).unwrap();
        assert_eq!(
            decode_name(&d, &empty, &mut out),
            Err(DropReason::Malformed)
        );
    }

    #[test]
    fn base32_is_rfc4648_lowercase() {
        // RFC 4648 section 10 test vectors, lowercased, without padding.
        for (input, output) in [
            (&b""[..], ""),
            (b"f", "my"),
            (b"fo", "mzxq"),
            (b"foo", "mzxw6"),
            (b"foob", "mzxw6yq"),
            (b"fooba", "mzxw6ytb"),
            (b"foobar", "mzxw6ytboi"),
        ] {
            assert_eq!(BASE32.encode(input), output);
            assert_eq!(BASE32.decode(output.as_bytes()).unwrap(), input);
            assert_eq!(
                BASE32.decode(output.to_uppercase().as_bytes()).unwrap(),
                input
            );
        }
        // Non-canonical trailing bits are refused.
        assert!(BASE32.decode(b"mz").is_err());
    }

    #[test]
    fn domain_parsing() {
        let d = domain();
        assert_eq!(d.name().to_ascii(), "t.example.com.");
        assert_eq!(Domain::new("T.Example.COM.").unwrap(), d);
        for bad in ["", ".", "a..b", "with space.com", "é.com", &"a".repeat(64)] {
            assert!(Domain::new(bad).is_err(), "{bad:?}");
        }
        // Too long for hostmaster.<domain> or to leave any room for data.
        let long = [
            "a".repeat(60),
            "b".repeat(60),
            "c".repeat(60),
            "d".repeat(60),
        ]
        .join(".");
        assert!(Domain::new(&long).is_err());
        assert!(Domain::new(&long[..230]).is_ok());
        let ns = d.clone().with_nameserver("TNS.example.com").unwrap();
        assert_eq!(
            ns.nameserver.as_ref().unwrap().to_ascii(),
            "tns.example.com."
        );
        assert!(d.with_nameserver(".").is_err());
    }

    #[test]
    fn upstream_capacities() {
        let d = domain();
        assert_eq!(d.upstream_capacity(MAX_NAME_LEN), 147);
        assert_eq!(d.upstream_capacity(1000), 147);
        assert_eq!(d.upstream_capacity(100), 53);
        assert_eq!(d.upstream_capacity(15), 0);
        assert_eq!(d.upstream_capacity(16), 1);
        assert_eq!(Domain::new("t.co").unwrap().upstream_capacity(253), 153);
        assert_eq!(Domain::new("a").unwrap().upstream_capacity(253), 155);
        assert_eq!(
            Domain::new("a")
                .unwrap()
                .upstream_capacity_as(253, NameEncoding::Base128),
            MAX_UPSTREAM_PAYLOAD
        );
        // Base128: 236 characters, one of them the marker.
        assert_eq!(d.upstream_capacity_as(253, NameEncoding::Base128), 205);
        assert_eq!(d.upstream_capacity_as(96, NameEncoding::Base128), 70);
        assert_eq!(d.upstream_capacity_as(15, NameEncoding::Base128), 0);
        assert_eq!(d.upstream_capacity_as(17, NameEncoding::Base128), 1);
        let name = encode_name_as(&d, &[0xff; 205], NameEncoding::Base128).unwrap();
        assert_eq!(name.len(), MAX_NAME_LEN + 1);
        assert!(matches!(
            encode_name_as(&d, &[0; 206], NameEncoding::Base128),
            Err(DnsError::TooLarge {
                len: 206,
                capacity: 205
            })
        ));
        // The biggest payload takes the whole name: 63+63+63+47 characters.
        let name = encode_name(&d, &[0xff; 147]).unwrap();
        assert_eq!(name.to_ascii().len(), MAX_NAME_LEN + 1);
        let lens: Vec<usize> = name.iter().map(<[u8]>::len).collect();
        assert_eq!(lens, [63, 63, 63, 47, 1, 7, 3]);
        assert!(matches!(
            encode_name(&d, &[0; 148]),
            Err(DnsError::TooLarge {
                len: 148,
                capacity: 147
            })
        ));
        assert!(matches!(encode_name(&d, &[]), Err(DnsError::EmptyPayload)));
    }

    #[test]
    fn encode_and_decode_name() {
        let d = domain();
        let name = encode_name(&d, b"hi").unwrap();
        assert_eq!(name.to_ascii(), "nbuq.t.example.com.");
        let mut out = [0u8; MAX_UPSTREAM_PAYLOAD];
        let upper = Name::from_ascii("NbUQ.T.eXaMpLe.CoM.").unwrap();
        assert_eq!(decode_name(&d, &upper, &mut out), Ok(2));
        assert_eq!(&out[..2], b"hi");
        // Labels may be split anywhere.
        let split = Name::from_ascii("n.b.uq.t.example.com").unwrap();
        assert_eq!(decode_name(&d, &split, &mut out), Ok(2));
        // A short buffer.
        assert_eq!(
            decode_name(&d, &name, &mut out[..1]),
            Err(DropReason::TooLarge)
        );
        for bad in [
            "t.example.com",       // the apex
            "nbuq.example.com",    // outside
            "nbuq.t.example.org",  // outside
            "nbuq.xt.example.com", // not under the apex label
            "nbu1.t.example.com",  // not base32
            "nbur.t.example.com",  // non-canonical trailing bits
            "nbu.t.example.com",   // impossible length
            "ns.t.example.com",    // our nameserver name
            "*.t.example.com",     // wildcard
            "n-uq.t.example.com",
        ] {
            let name = Name::from_ascii(bad).unwrap();
            assert_eq!(
                decode_name(&d, &name, &mut out),
                Err(DropReason::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn query_bytes_are_pinned() {
        let name = encode_name(&domain(), b"hi").unwrap();
        assert_eq!(
            build_query(0x1234, &name, None).unwrap(),
            query_bytes(0x1234, [0x01, 0x00], &NAME_HI, None)
        );
        assert_eq!(
            build_query(0x1234, &name, Some(1232)).unwrap(),
            query_bytes(0x1234, [0x01, 0x00], &NAME_HI, Some(1232))
        );
        // Below 512 means 512 (RFC 6891).
        assert_eq!(
            build_query(0x1234, &name, Some(100)).unwrap(),
            query_bytes(0x1234, [0x01, 0x00], &NAME_HI, Some(512))
        );
    }

    #[test]
    fn parse_query_keeps_case() {
        // As dig +qr sends it through a resolver doing 0x20.
        let mut name = NAME_HI;
        name[1] = b'N';
        name[3] = b'U';
        name[8] = b'E';
        let bytes = query_bytes(0xbeef, [0x01, 0x10], &name, Some(4096));
        let q = parse_query(&bytes).unwrap();
        assert_eq!(q.id, 0xbeef);
        assert_eq!(q.name.to_ascii(), "NbUq.t.Example.com.");
        assert_eq!(q.qtype, RecordType::TXT);
        assert_eq!(q.edns_size, Some(4096));
        assert!(q.recursion_desired);
        assert!(q.checking_disabled);
        assert_eq!(q.name_wire_len(), NAME_HI.len());
        let mut out = [0u8; MAX_UPSTREAM_PAYLOAD];
        assert_eq!(decode_name(&domain(), &q.name, &mut out), Ok(2));
        assert_eq!(&out[..2], b"hi");

        // The answer echoes the question byte for byte.
        let answer = build_txt_answer(&q, b"ok").unwrap();
        assert_eq!(answer[12..12 + name.len()], name);
    }

    #[test]
    fn txt_answer_bytes_are_pinned() {
        let q = parse_query(&query_bytes(0x1234, [0x01, 0x00], &NAME_HI, None)).unwrap();
        let mut expected = vec![0x12, 0x34, 0x85, 0x00, 0, 1, 0, 1, 0, 0, 0, 0];
        expected.extend_from_slice(&NAME_HI);
        expected.extend_from_slice(&[0, 16, 0, 1]);
        // Owner: a pointer to the question name; TXT IN, TTL 0, RDLENGTH 3.
        expected.extend_from_slice(&[0xc0, 0x0c, 0, 16, 0, 1, 0, 0, 0, 0, 0, 3, 2, b'o', b'k']);
        assert_eq!(build_txt_answer(&q, b"ok").unwrap(), expected);

        // An empty payload is one empty string; with EDNS0 an OPT follows.
        let q = parse_query(&query_bytes(0x1234, [0x00, 0x00], &NAME_HI, Some(1232))).unwrap();
        let mut expected = vec![0x12, 0x34, 0x84, 0x00, 0, 1, 0, 1, 0, 0, 0, 1];
        expected.extend_from_slice(&NAME_HI);
        expected.extend_from_slice(&[0, 16, 0, 1]);
        expected.extend_from_slice(&[0xc0, 0x0c, 0, 16, 0, 1, 0, 0, 0, 0, 0, 1, 0]);
        expected.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(build_txt_answer(&q, b"").unwrap(), expected);
        let name = encode_name(&domain(), b"hi").unwrap();
        assert_eq!(
            parse_response(0x1234, &name, &expected),
            Ok(Answer::Data(vec![]))
        );
    }

    #[test]
    fn downstream_capacities() {
        // A full 253-character name (255 on the wire).
        assert_eq!(downstream_capacity(255, None), 228);
        assert_eq!(downstream_capacity(255, Some(512)), 217);
        assert_eq!(downstream_capacity(255, Some(1232)), 934);
        assert_eq!(downstream_capacity(255, Some(4096)), 3787);
        // A name of ~100 characters.
        assert_eq!(downstream_capacity(102, Some(1232)), 1086);
        assert_eq!(downstream_capacity(102, None), 380);
        // Sizes below 512 count as 512.
        assert_eq!(
            downstream_capacity(20, Some(0)),
            downstream_capacity(20, Some(512))
        );

        // Exactly the capacity fits, one more byte does not.
        let d = domain();
        for payload_len in [1, 50, 147] {
            let name = encode_name(&d, &vec![7; payload_len]).unwrap();
            for edns in [None, Some(512), Some(1232), Some(4096)] {
                let q = parse_query(&build_query(9, &name, edns).unwrap()).unwrap();
                let capacity = q.downstream_capacity();
                let payload = vec![0xa5; capacity];
                let bytes = build_txt_answer(&q, &payload).unwrap();
                assert!(bytes.len() <= q.response_limit());
                assert!(
                    bytes.len() + 1 >= q.response_limit(),
                    "{} {edns:?}",
                    bytes.len()
                );
                assert_eq!(parse_response(9, &name, &bytes), Ok(Answer::Data(payload)));
                assert!(matches!(
                    build_txt_answer(&q, &vec![0; capacity + 1]),
                    Err(DnsError::TooLarge { .. })
                ));
            }
        }
    }

    #[test]
    fn names_outside_are_refused() {
        let d = domain();
        let name = Name::from_ascii("www.example.com.").unwrap();
        let q = parse_query(&build_query(5, &name, Some(1232)).unwrap()).unwrap();
        assert!(!d.contains(&q.name));
        let bytes = build_refused(&q).unwrap();
        let msg = Message::from_vec(&bytes).unwrap();
        assert_eq!(msg.metadata.response_code, ResponseCode::Refused);
        assert!(!msg.metadata.authoritative);
        assert!(msg.answers.is_empty());
        assert!(msg.edns.is_some());
        assert_eq!(parse_response(5, &name, &bytes), Ok(Answer::Refused));
        assert_eq!(build_apex_answer(&q, &d).unwrap(), bytes);
    }

    #[test]
    fn apex_soa_and_ns() {
        let d = domain();
        let apex = Name::from_ascii("T.example.COM.").unwrap();
        let ask = |qtype| {
            let mut msg = Message::new(77, MessageType::Query, OpCode::Query);
            msg.add_query(Question::query(apex.clone(), qtype));
            let q = parse_query(&msg.to_vec().unwrap()).unwrap();
            let bytes = build_apex_answer(&q, &d).unwrap();
            assert!(bytes.len() <= 512);
            let msg = Message::from_vec(&bytes).unwrap();
            assert_eq!(msg.metadata.id, 77);
            assert_eq!(msg.metadata.message_type, MessageType::Response);
            assert!(msg.metadata.authoritative);
            assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
            assert!(msg.queries[0].name().eq_case(&apex));
            msg
        };

        let msg = ask(RecordType::SOA);
        assert_eq!(msg.answers.len(), 1);
        let RData::SOA(soa) = &msg.answers[0].data else {
            panic!("not an SOA: {msg}");
        };
        assert_eq!(msg.answers[0].ttl, APEX_TTL);
        assert!(msg.answers[0].name.eq_case(&apex));
        assert_eq!(soa.mname.to_ascii().to_lowercase(), "ns.t.example.com.");
        assert_eq!(
            soa.rname.to_ascii().to_lowercase(),
            "hostmaster.t.example.com."
        );
        assert_eq!((soa.serial, soa.minimum), (1, 0));

        let msg = ask(RecordType::NS);
        assert_eq!(msg.answers.len(), 1);
        let RData::NS(ns) = &msg.answers[0].data else {
            panic!("not an NS: {msg}");
        };
        assert_eq!(ns.0.to_ascii().to_lowercase(), "ns.t.example.com.");

        // Other types at the apex: NODATA with the SOA.
        for qtype in [
            RecordType::A,
            RecordType::AAAA,
            RecordType::TXT,
            RecordType::MX,
        ] {
            let msg = ask(qtype);
            assert!(msg.answers.is_empty());
            assert_eq!(msg.authorities.len(), 1);
            assert_eq!(msg.authorities[0].record_type(), RecordType::SOA);
        }

        // A nameserver outside the zone.
        let d2 = d.clone().with_nameserver("tns.example.com").unwrap();
        let mut msg = Message::new(1, MessageType::Query, OpCode::Query);
        msg.add_query(Question::query(apex.clone(), RecordType::NS));
        let q = parse_query(&msg.to_vec().unwrap()).unwrap();
        let msg = Message::from_vec(&build_apex_answer(&q, &d2).unwrap()).unwrap();
        let RData::NS(ns) = &msg.answers[0].data else {
            panic!("not an NS: {msg}");
        };
        assert_eq!(ns.0.to_ascii(), "tns.example.com.");
    }

    #[test]
    fn nodata_below_the_apex() {
        let d = domain();
        // A query-name-minimising resolver's A query, and a TXT query that
        // carries no data: NOERROR, no answer, the SOA.
        for (name, qtype) in [
            ("xyz.T.example.com.", RecordType::A),
            ("ns.t.example.com.", RecordType::AAAA),
            ("ns.t.example.com.", RecordType::TXT),
        ] {
            let name = Name::from_ascii(name).unwrap();
            let mut msg = Message::new(3, MessageType::Query, OpCode::Query);
            msg.add_query(Question::query(name.clone(), qtype));
            let q = parse_query(&msg.to_vec().unwrap()).unwrap();
            let bytes = build_apex_answer(&q, &d).unwrap();
            let msg = Message::from_vec(&bytes).unwrap();
            assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
            assert!(msg.metadata.authoritative);
            assert!(msg.answers.is_empty());
            assert_eq!(msg.authorities[0].record_type(), RecordType::SOA);
            assert_eq!(
                msg.authorities[0].name.to_ascii().to_lowercase(),
                "t.example.com."
            );
            if qtype == RecordType::TXT {
                assert_eq!(parse_response(3, &name, &bytes), Ok(Answer::Empty));
            }
        }
    }

    #[test]
    fn nxdomain_below_the_apex_and_which_names_exist() {
        let d = domain();
        let name = Name::from_ascii("xyz.abc.T.example.com.").unwrap();
        assert_eq!(d.label_below(&name), Some(&b"abc"[..]));
        assert_eq!(
            d.label_below(&Name::from_ascii("t.example.com.").unwrap()),
            None
        );
        assert_eq!(
            d.label_below(&Name::from_ascii("a.example.com.").unwrap()),
            None
        );
        for (host, is) in [
            ("t.example.com.", true),
            ("NS.t.example.com.", true),
            ("ns.ns.t.example.com.", false),
            ("xyz.t.example.com.", false),
        ] {
            assert_eq!(d.is_host(&Name::from_ascii(host).unwrap()), is, "{host}");
        }
        let mut msg = Message::new(3, MessageType::Query, OpCode::Query);
        msg.add_query(Question::query(name.clone(), RecordType::A));
        let q = parse_query(&msg.to_vec().unwrap()).unwrap();
        let bytes = build_name_error(&q, &d).unwrap();
        let msg = Message::from_vec(&bytes).unwrap();
        assert_eq!(msg.metadata.response_code, ResponseCode::NXDomain);
        assert!(msg.metadata.authoritative);
        assert!(msg.answers.is_empty());
        assert_eq!(msg.authorities[0].record_type(), RecordType::SOA);
        // A nameserver set outside the zone: `ns.` below the apex is no host.
        let far = domain().with_nameserver("tns.example.com").unwrap();
        assert!(!far.is_host(&Name::from_ascii("ns.t.example.com.").unwrap()));
        assert!(far.is_host(&Name::from_ascii("TNS.example.com.").unwrap()));
    }

    #[test]
    fn nodata_fits_512_for_long_names() {
        // The longest domain, a nameserver far away and a full question.
        let long_domain = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(40),
        ]
        .join(".");
        let d = Domain::new(&long_domain).unwrap();
        let name = encode_name(&d, &vec![1; d.upstream_capacity(253)]).unwrap();
        let name = flip_case(&name, &[true, false, false]);
        let mut msg = Message::new(3, MessageType::Query, OpCode::Query);
        msg.add_query(Question::query(name, RecordType::A));
        let q = parse_query(&msg.to_vec().unwrap()).unwrap();
        for d in [
            d.clone(),
            d.clone()
                .with_nameserver(
                    &[
                        "n".repeat(63),
                        "s".repeat(63),
                        "x".repeat(63),
                        "y".repeat(60),
                    ]
                    .join("."),
                )
                .unwrap(),
        ] {
            let bytes = build_apex_answer(&q, &d).unwrap();
            assert!(bytes.len() <= 512, "{}", bytes.len());
            assert_eq!(
                Message::from_vec(&bytes).unwrap().metadata.response_code,
                ResponseCode::NoError
            );
        }
    }

    #[test]
    fn wrong_type_and_bad_queries() {
        let name = encode_name(&domain(), b"x").unwrap();
        let mut msg = Message::new(1, MessageType::Query, OpCode::Query);
        msg.add_query(Question::query(name.clone(), RecordType::A));
        let q = parse_query(&msg.to_vec().unwrap()).unwrap();
        assert!(matches!(
            build_txt_answer(&q, b"x"),
            Err(DnsError::WrongType(RecordType::A))
        ));

        let good = query_bytes(1, [1, 0], &NAME_HI, None);
        assert!(parse_query(&good).is_ok());
        // A response, an UPDATE, no question, two questions, class CH, cut short.
        let mut response = good.clone();
        response[2] |= 0x80;
        let mut update = good.clone();
        update[2] |= 5 << 3;
        let mut none = good.clone();
        none[5] = 0;
        let mut two = good.clone();
        two[5] = 2;
        let mut chaos = good.clone();
        let len = chaos.len();
        chaos[len - 1] = 3;
        for bad in [
            &response,
            &update,
            &none,
            &two,
            &chaos,
            &good[..good.len() - 1],
            &good[..11],
        ] {
            assert_eq!(parse_query(bad), Err(DropReason::Malformed));
        }
        // 65535 questions announced: refused from the header alone.
        let mut many = good.clone();
        many[4] = 0xff;
        many[5] = 0xff;
        assert_eq!(parse_query(&many), Err(DropReason::Malformed));
        // Queries are not responses.
        assert_eq!(parse_response(1, &name, &good), Err(DropReason::Malformed));
    }

    #[test]
    fn responses_are_matched_to_queries() {
        let d = domain();
        let name = encode_name(&d, b"hi").unwrap();
        let q = parse_query(&build_query(0x4242, &name, None).unwrap()).unwrap();
        let bytes = build_txt_answer(&q, b"data").unwrap();
        assert_eq!(
            parse_response(0x4242, &name, &bytes),
            Ok(Answer::Data(b"data".to_vec()))
        );
        // Case does not matter.
        let upper = flip_case(&name, &[true]);
        assert_eq!(
            parse_response(0x4242, &upper, &bytes),
            Ok(Answer::Data(b"data".to_vec()))
        );
        // Another id or another name.
        assert_eq!(
            parse_response(0x4243, &name, &bytes),
            Err(DropReason::UnexpectedResponse)
        );
        let other = encode_name(&d, b"ho").unwrap();
        assert_eq!(
            parse_response(0x4242, &other, &bytes),
            Err(DropReason::UnexpectedResponse)
        );
        // Truncated, even when cut after the question.
        let mut tc = bytes.clone();
        tc[2] |= 0x02;
        assert_eq!(parse_response(0x4242, &name, &tc), Ok(Answer::Truncated));
        assert_eq!(
            parse_response(0x4242, &name, &tc[..12 + NAME_HI.len() + 4 + 3]),
            Ok(Answer::Truncated)
        );
        // Response codes.
        for (code, answer) in [
            (ResponseCode::ServFail, Answer::ServerFailure),
            (ResponseCode::NXDomain, Answer::NameError),
            (ResponseCode::Refused, Answer::Refused),
            (ResponseCode::FormErr, Answer::Other(1)),
            (ResponseCode::NotImp, Answer::Other(4)),
        ] {
            let bytes = response(&q, code, false).to_vec().unwrap();
            assert_eq!(parse_response(0x4242, &name, &bytes), Ok(answer));
        }
        // NOERROR without a TXT record for the name.
        let bytes = response(&q, ResponseCode::NoError, true).to_vec().unwrap();
        assert_eq!(parse_response(0x4242, &name, &bytes), Ok(Answer::Empty));
        // Several character-strings are concatenated.
        let long: Vec<u8> = (0..600u16).map(|i| i as u8).collect();
        let q = parse_query(&build_query(1, &name, Some(1232)).unwrap()).unwrap();
        let bytes = build_txt_answer(&q, &long).unwrap();
        let msg = Message::from_vec(&bytes).unwrap();
        let RData::TXT(txt) = &msg.answers[0].data else {
            panic!("not a TXT: {msg}");
        };
        let lens: Vec<usize> = txt.txt_data.iter().map(|s| s.len()).collect();
        assert_eq!(lens, [255, 255, 90]);
        assert_eq!(parse_response(1, &name, &bytes), Ok(Answer::Data(long)));
    }

    fn type_strategy() -> impl Strategy<Value = AnswerType> {
        proptest::sample::select(AnswerType::ALL.to_vec())
    }

    /// The answer as a resolver may pass it on: its records in another
    /// order (`perm` drives a Fisher-Yates shuffle) and the letters of
    /// names inside them flipped where `mask` says.
    fn resolver_rewrite(bytes: &[u8], perm: u64, mask: &[bool]) -> Vec<u8> {
        let mut msg = Message::from_vec(bytes).unwrap();
        let mut x = perm | 1;
        for i in (1..msg.answers.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            msg.answers.swap(i, (x % (i as u64 + 1)) as usize);
        }
        for r in &mut msg.answers {
            match &mut r.data {
                RData::CNAME(c) => c.0 = flip_case(&c.0, mask),
                RData::MX(mx) => mx.exchange = flip_case(&mx.exchange, mask),
                RData::SRV(srv) => srv.target = flip_case(&srv.target, mask),
                _ => {}
            }
        }
        msg.to_vec().unwrap()
    }

    /// A query for `name` asking for `ty`, as the server parses it.
    fn typed_query(id: u16, name: &Name, ty: AnswerType, edns: Option<u16>) -> Query {
        parse_query(&build_query_as(id, name, ty, edns).unwrap()).unwrap()
    }

    #[test]
    fn the_payload_option_rides_the_opt_record() {
        let d = domain();
        let name = encode_name(&d, b"hi").unwrap();
        let data: Vec<u8> = (0..=255).collect();
        for edns in [None, Some(1232)] {
            let bytes = build_query_with(7, &name, AnswerType::Null, edns, &data).unwrap();
            let q = parse_query(&bytes).unwrap();
            assert_eq!(q.option, data);
            // The OPT record is there even without an EDNS0 size: at 512.
            assert_eq!(q.edns_size, Some(edns.unwrap_or(512)));
            assert_eq!(q.qtype, RecordType::NULL);
        }
        let plain = parse_query(&build_query(7, &name, Some(1232)).unwrap()).unwrap();
        assert_eq!(plain.option, Vec::<u8>::new());
        // Answers carry no option back.
        let answer = build_answer(&plain, &d, b"x").unwrap();
        assert_eq!(
            parse_answer(7, &name, AnswerType::Txt, &d, &answer),
            Ok(Answer::Data(b"x".to_vec()))
        );
    }

    #[test]
    fn answer_types_map_to_record_types() {
        for ty in AnswerType::ALL {
            assert_eq!(AnswerType::of(ty.record_type()), Some(ty));
            assert_eq!(ty.as_str(), ty.record_type().to_string());
        }
        assert_eq!(AnswerType::of(RecordType::SOA), None);
        let q = typed_query(
            1,
            &encode_name(&domain(), b"x").unwrap(),
            AnswerType::A,
            None,
        );
        assert_eq!(
            (q.qtype, q.answer_type()),
            (RecordType::A, Some(AnswerType::A))
        );
        let mut soa = q.clone();
        soa.qtype = RecordType::SOA;
        assert_eq!(soa.answer_capacity(&domain()), 0);
        assert!(matches!(
            build_answer(&soa, &domain(), b""),
            Err(DnsError::WrongType(RecordType::SOA))
        ));
    }

    #[test]
    fn address_answers_are_pinned() {
        let d = domain();
        let name = encode_name(&d, b"hi").unwrap();
        let q = typed_query(7, &name, AnswerType::A, None);
        let msg = Message::from_vec(&build_answer(&q, &d, b"hey").unwrap()).unwrap();
        // | 0 3 | h e y | 0: two records, the last padded.
        let addrs: Vec<[u8; 4]> = msg
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.octets(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(addrs, [[11, 0, 3, b'h'], [12, b'e', b'y', 0]]);
        assert!(
            msg.answers
                .iter()
                .all(|r| r.ttl == 0 && r.name.eq_case(&name))
        );
        let q6 = typed_query(7, &name, AnswerType::Aaaa, None);
        let msg = Message::from_vec(&build_answer(&q6, &d, b"").unwrap()).unwrap();
        let RData::AAAA(a) = &msg.answers[0].data else {
            panic!("{msg}");
        };
        assert_eq!(
            a.0.octets(),
            [0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );

        // What does not decode: a gap, a duplicate, a sequence number out
        // of range, a length beyond the data, non-zero or excess padding.
        let garbled = |addrs: &[[u8; 4]]| {
            let records = addrs.iter().map(|a| a.to_vec()).collect();
            decode_addresses(AnswerType::A, records)
        };
        assert_eq!(
            garbled(&[[12, b'e', b'y', 0], [11, 0, 3, b'h']]),
            Some(b"hey".to_vec())
        );
        for bad in [
            &[[11, 0, 3, b'h'], [13, b'e', b'y', 0]][..],
            &[[11, 0, 3, b'h'], [11, 0, 3, b'h']],
            &[[10, 0, 0, 0]],
            &[[11, 0, 5, b'h'], [12, b'e', b'y', 0]],
            &[[11, 0, 3, b'h'], [12, b'e', b'y', 1]],
            &[[11, 0, 0, 0], [12, 0, 0, 0]],
        ] {
            assert_eq!(garbled(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn answer_names_are_not_query_names() {
        let d = domain();
        let name = encode_answer_name(&d, b"hi").unwrap();
        assert_eq!(name.to_ascii(), "8nbuq.t.example.com.");
        assert_eq!(decode_answer_name(&d, &name), Some(b"hi".to_vec()));
        let upper = Name::from_ascii("8NbUQ.T.example.com.").unwrap();
        assert_eq!(decode_answer_name(&d, &upper), Some(b"hi".to_vec()));
        // A resolver that looks an answer name up asks no tunnel question.
        let mut out = [0u8; MAX_UPSTREAM_PAYLOAD];
        assert_eq!(decode_name(&d, &name, &mut out), Err(DropReason::Malformed));
        let empty = encode_answer_name(&d, b"").unwrap();
        assert_eq!(decode_answer_name(&d, &empty), Some(vec![]));
        for bad in [
            "nbuq.t.example.com.",
            "8nbuq.example.com.",
            "8nbu1.t.example.com.",
        ] {
            let name = Name::from_ascii(bad).unwrap();
            assert_eq!(decode_answer_name(&d, &name), None, "{bad}");
        }
        // 236 characters under t.example.com: the marker and 234 of base32.
        assert_eq!(d.answer_name_capacity(), 146);
        let full = encode_answer_name(&d, &[0xff; 146]).unwrap();
        assert_eq!(full.to_ascii().len(), 1 + 234 + 4 + 13 + 1);
        assert_eq!(d.answer_name_wire_len(146), 254);
        assert!(encode_answer_name(&d, &[0; 147]).is_err());
    }

    #[test]
    fn answer_capacities() {
        let d = domain();
        // A full question name, no EDNS0: 512 - 12 - 259 = 241 bytes left.
        let cap = |ty, edns| answer_capacity(ty, &d, 255, edns);
        assert_eq!(cap(AnswerType::Null, None), 241 - 13);
        assert_eq!(cap(AnswerType::Txt, None), 228);
        // A full answer name takes 254 bytes: 241 - 12 hold a shorter one.
        assert_eq!(cap(AnswerType::Cname, None), 130);
        assert_eq!(cap(AnswerType::Cname, Some(1232)), 146);
        assert_eq!(cap(AnswerType::Mx, None), 129);
        // At 1232: 950 bytes, three full MX names (14 + 254 bytes each) and
        // one of 132 - 15 bytes.
        assert_eq!(cap(AnswerType::Mx, Some(1232)), 3 * 146 + 71);
        assert_eq!(cap(AnswerType::Srv, Some(1232)), 3 * 146 + 61);
        assert_eq!(cap(AnswerType::A, None), 15 * 3 - 2);
        assert_eq!(cap(AnswerType::Aaaa, None), 8 * 15 - 2);
        // At 1232: 950 bytes, 59 A records, 33 AAAA (capped at 32).
        assert_eq!(cap(AnswerType::A, Some(1232)), 59 * 3 - 2);
        assert_eq!(cap(AnswerType::Aaaa, Some(1232)), 32 * 15 - 2);
        assert_eq!(
            answer_capacity(AnswerType::A, &d, 30, Some(4096)),
            A_MAX_RECORDS * 3 - 2
        );
        // Exactly the capacity fits, one more byte does not.
        for ty in AnswerType::ALL {
            for (len, edns) in [(1, None), (147, None), (60, Some(1232)), (147, Some(4096))] {
                let name = encode_name(&d, &vec![3; len]).unwrap();
                let q = typed_query(9, &name, ty, edns);
                let capacity = q.answer_capacity(&d);
                let payload: Vec<u8> = (0..capacity).map(|i| i as u8).collect();
                let bytes = build_answer(&q, &d, &payload).unwrap();
                assert!(bytes.len() <= q.response_limit(), "{ty:?} {}", bytes.len());
                assert_eq!(
                    parse_answer(9, &name, ty, &d, &bytes),
                    Ok(Answer::Data(payload))
                );
                assert!(matches!(
                    build_answer(&q, &d, &vec![0; capacity + 1]),
                    Err(DnsError::TooLarge { .. })
                ));
            }
        }
    }

    #[test]
    fn answers_of_another_type_or_without_records() {
        let d = domain();
        let name = encode_name(&d, b"hi").unwrap();
        let q = typed_query(5, &name, AnswerType::Null, Some(1232));
        let bytes = build_answer(&q, &d, b"data").unwrap();
        assert_eq!(
            parse_answer(5, &name, AnswerType::Null, &d, &bytes),
            Ok(Answer::Data(b"data".to_vec()))
        );
        // The question's type must be the one asked.
        assert_eq!(
            parse_answer(5, &name, AnswerType::Txt, &d, &bytes),
            Err(DropReason::UnexpectedResponse)
        );
        // Stripped records: NODATA; a record altered: garbled.
        let mut msg = Message::from_vec(&bytes).unwrap();
        msg.answers.clear();
        let stripped = msg.to_vec().unwrap();
        assert_eq!(
            parse_answer(5, &name, AnswerType::Null, &d, &stripped),
            Ok(Answer::Empty)
        );
        let mut msg = Message::from_vec(&bytes).unwrap();
        msg.answers[0].data = RData::NULL(NULL::with(b"xdata".to_vec()));
        assert_eq!(
            parse_answer(5, &name, AnswerType::Null, &d, &msg.to_vec().unwrap()),
            Ok(Answer::Garbled)
        );
        let q = typed_query(5, &name, AnswerType::Mx, Some(1232));
        let mut msg = Message::from_vec(&build_answer(&q, &d, &[1; 300]).unwrap()).unwrap();
        assert_eq!(msg.answers.len(), 3);
        msg.answers.remove(1);
        assert_eq!(
            parse_answer(5, &name, AnswerType::Mx, &d, &msg.to_vec().unwrap()),
            Ok(Answer::Garbled)
        );
    }

    fn edns_strategy() -> impl Strategy<Value = Option<u16>> {
        prop_oneof![
            Just(None),
            Just(Some(512)),
            Just(Some(1232)),
            Just(Some(4096)),
            any::<Option<u16>>()
        ]
    }

    fn domain_strategy() -> impl Strategy<Value = Domain> {
        prop_oneof![
            Just(domain()),
            Just(Domain::new("a").unwrap()),
            Just(Domain::new(&["x".repeat(63), "y".repeat(63), "z".repeat(40)].join(".")).unwrap()),
        ]
    }

    proptest! {
        #[test]
        fn base128_round_trips_any_bytes_in_any_case(
            input in proptest::collection::vec(any::<u8>(), 0..300),
            mask in proptest::collection::vec(any::<bool>(), 1..64),
        ) {
            let mut text = vec![0u8; base128_encode_len(input.len())];
            prop_assert_eq!(base128_encode(&input, &mut text), text.len());
            prop_assert!(text.iter().all(|c| BASE128_ALPHABET.contains(c)));
            for (i, c) in text.iter_mut().enumerate() {
                if mask[i % mask.len()] && c.is_ascii_alphabetic() {
                    *c ^= 0x20;
                }
            }
            let mut out = vec![0u8; input.len()];
            prop_assert_eq!(base128_decode(&text, &mut out), Ok(input.len()));
            prop_assert_eq!(out, input);
        }

        #[test]
        fn base128_rejects_bytes_outside_the_alphabet(
            input in proptest::collection::vec(any::<u8>(), 1..100),
            at: proptest::sample::Index,
            bad in any::<u8>().prop_filter("outside", |c| base128_value(*c).is_none()),
        ) {
            let mut text = vec![0u8; base128_encode_len(input.len())];
            base128_encode(&input, &mut text);
            let at = at.index(text.len());
            text[at] = bad;
            let mut out = vec![0u8; input.len()];
            prop_assert_eq!(base128_decode(&text, &mut out), Err(DropReason::Malformed));
        }

        #[test]
        fn base128_decode_is_canonical(
            text in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            let mut out = [0u8; 80];
            if let Ok(n) = base128_decode(&text, &mut out) {
                let mut again = vec![0u8; base128_encode_len(n)];
                base128_encode(&out[..n], &mut again);
                prop_assert_eq!(again.to_ascii_lowercase(), text.to_ascii_lowercase());
            }
        }

        #[test]
        fn upstream_round_trips_through_a_case_randomising_resolver(
            d in domain_strategy(),
            max_name_len in 0usize..300,
            payload in proptest::collection::vec(any::<u8>(), 1..=MAX_UPSTREAM_PAYLOAD),
            mask in proptest::collection::vec(any::<bool>(), 1..300),
            id: u16,
            edns in edns_strategy(),
            encoding in prop_oneof![Just(NameEncoding::Base32), Just(NameEncoding::Base128)],
        ) {
            let capacity = d.upstream_capacity_as(max_name_len, encoding);
            let payload = &payload[..payload.len().min(capacity)];
            prop_assume!(!payload.is_empty());
            let name = encode_name_as(&d, payload, encoding).unwrap();
            prop_assert!(name.len() - 1 <= max_name_len.min(MAX_NAME_LEN));
            prop_assert!(name.iter().all(|l| l.len() <= MAX_LABEL_LEN));
            let bytes = build_query(id, &name, edns).unwrap();
            // The resolver rewrites case on its way to the server.
            let asked = flip_case(&name, &mask);
            let mut forwarded = bytes.clone();
            let mut q = parse_query(&bytes).unwrap();
            prop_assert!(q.name.eq_case(&name));
            prop_assert_eq!((q.id, q.qtype, q.recursion_desired), (id, RecordType::TXT, true));
            prop_assert_eq!(q.edns_size, edns.map(|s| s.max(512)));
            forwarded.splice(12..12 + q.name_wire_len(), build_query(0, &asked, None).unwrap()[12..12 + q.name_wire_len()].iter().copied());
            q = parse_query(&forwarded).unwrap();
            prop_assert!(q.name.eq_case(&asked));
            let mut out = [0u8; MAX_UPSTREAM_PAYLOAD];
            let n = decode_name(&d, &q.name, &mut out).unwrap();
            prop_assert_eq!(&out[..n], payload);
        }

        #[test]
        fn downstream_round_trips_within_the_limit(
            d in domain_strategy(),
            up in 1usize..=MAX_UPSTREAM_PAYLOAD,
            payload in proptest::collection::vec(any::<u8>(), 0..4096),
            mask in proptest::collection::vec(any::<bool>(), 1..64),
            id: u16,
            edns in edns_strategy(),
        ) {
            let name = encode_name(&d, &vec![0x5a; up.min(d.upstream_capacity(MAX_NAME_LEN))]).unwrap();
            let name = flip_case(&name, &mask);
            let q = parse_query(&build_query(id, &name, edns).unwrap()).unwrap();
            let payload = &payload[..payload.len().min(q.downstream_capacity())];
            let bytes = build_txt_answer(&q, payload).unwrap();
            prop_assert!(bytes.len() <= response_limit(edns));
            prop_assert_eq!(parse_response(id, &name, &bytes), Ok(Answer::Data(payload.to_vec())));
            prop_assert_eq!(parse_response(id, &name.to_lowercase(), &bytes), Ok(Answer::Data(payload.to_vec())));
            // The question is echoed byte for byte.
            let asked = build_query(id, &name, edns).unwrap();
            prop_assert_eq!(&bytes[12..12 + q.name_wire_len() + 4], &asked[12..12 + q.name_wire_len() + 4]);
        }

        #[test]
        fn every_answer_type_round_trips_through_a_shuffling_case_randomising_resolver(
            d in domain_strategy(),
            ty in type_strategy(),
            up in 1usize..=MAX_UPSTREAM_PAYLOAD,
            payload in proptest::collection::vec(any::<u8>(), 0..1400),
            mask in proptest::collection::vec(any::<bool>(), 1..64),
            perm: u64,
            id: u16,
            edns in edns_strategy(),
        ) {
            let name = encode_name(&d, &vec![0x5a; up.min(d.upstream_capacity(MAX_NAME_LEN))]).unwrap();
            let name = flip_case(&name, &mask);
            let q = typed_query(id, &name, ty, edns);
            let payload = &payload[..payload.len().min(q.answer_capacity(&d))];
            let bytes = build_answer(&q, &d, payload).unwrap();
            prop_assert!(bytes.len() <= response_limit(edns));
            // The question is echoed byte for byte.
            let asked = build_query_as(id, &name, ty, edns).unwrap();
            prop_assert_eq!(&bytes[12..12 + q.name_wire_len() + 4], &asked[12..12 + q.name_wire_len() + 4]);
            let rewritten = resolver_rewrite(&bytes, perm, &mask);
            for b in [&bytes, &rewritten] {
                prop_assert_eq!(
                    parse_answer(id, &name.to_lowercase(), ty, &d, b),
                    Ok(Answer::Data(payload.to_vec()))
                );
            }
        }

        #[test]
        fn answer_names_round_trip_in_any_case(
            d in domain_strategy(),
            payload in proptest::collection::vec(any::<u8>(), 0..=146),
            mask in proptest::collection::vec(any::<bool>(), 1..64),
        ) {
            let payload = &payload[..payload.len().min(d.answer_name_capacity())];
            let name = encode_answer_name(&d, payload).unwrap();
            prop_assert!(name.len() - 1 <= MAX_NAME_LEN);
            prop_assert_eq!(name.len() + 1, d.answer_name_wire_len(payload.len()));
            prop_assert_eq!(decode_answer_name(&d, &flip_case(&name, &mask)), Some(payload.to_vec()));
            let mut out = [0u8; MAX_UPSTREAM_PAYLOAD];
            prop_assert_eq!(decode_name(&d, &name, &mut out), Err(DropReason::Malformed));
        }

        #[test]
        fn garbage_answers_of_every_type_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            ty in type_strategy(),
            id: u16,
        ) {
            let d = domain();
            let name = encode_name(&d, b"hi").unwrap();
            let _ = parse_answer(id, &name, ty, &d, &bytes);
            let mut records = bytes.chunks(4).map(<[u8]>::to_vec).collect::<Vec<_>>();
            records.retain(|r| r.len() == 4);
            if !records.is_empty() {
                let _ = decode_addresses(AnswerType::A, records);
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), id: u16) {
            let d = domain();
            let name = encode_name(&d, b"hi").unwrap();
            let _ = parse_response(id, &name, &bytes);
            if let Ok(q) = parse_query(&bytes) {
                let mut out = [0u8; MAX_UPSTREAM_PAYLOAD];
                let _ = decode_name(&d, &q.name, &mut out);
                let _ = build_refused(&q);
                let _ = build_apex_answer(&q, &d);
                let _ = build_txt_answer(&q, b"x");
            }
        }

        #[test]
        fn mutated_messages_never_panic(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
            payload in proptest::collection::vec(any::<u8>(), 0..700),
        ) {
            let d = domain();
            let name = encode_name(&d, b"hello").unwrap();
            let q = parse_query(&build_query(1, &name, Some(1232)).unwrap()).unwrap();
            for mut bytes in [
                build_query(1, &name, Some(1232)).unwrap(),
                build_txt_answer(&q, &payload).unwrap(),
                build_apex_answer(&q, &d).unwrap(),
            ] {
                for &(at, x) in &flips {
                    let len = bytes.len();
                    bytes[at % len] ^= x;
                }
                bytes.truncate(cut % (bytes.len() + 1));
                let _ = parse_response(1, &name, &bytes);
                if let Ok(q) = parse_query(&bytes) {
                    let mut out = [0u8; MAX_UPSTREAM_PAYLOAD];
                    let _ = decode_name(&d, &q.name, &mut out);
                    let _ = build_apex_answer(&q, &d);
                }
            }
        }

        #[test]
        fn decode_name_never_panics(
            labels in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..=63), 0..5),
            out_len in 0usize..200,
        ) {
            let d = domain();
            let labels = labels.iter().map(Vec::as_slice).chain(d.name().iter());
            if let Ok(name) = Name::from_labels(labels) {
                let mut out = vec![0u8; out_len];
                if let Ok(n) = decode_name(&d, &name, &mut out) {
                    // What decodes re-encodes to the same name, up to case
                    // and label splits.
                    let first = name.iter().next().unwrap()[0];
                    let encoding = if first == BASE128_MARKER {
                        NameEncoding::Base128
                    } else {
                        NameEncoding::Base32
                    };
                    let again = encode_name_as(&d, &out[..n], encoding).unwrap();
                    let mut out2 = [0u8; MAX_UPSTREAM_PAYLOAD];
                    prop_assert_eq!(decode_name(&d, &again, &mut out2), Ok(n));
                    prop_assert_eq!(&out2[..n], &out[..n]);
                }
            }
        }
    }
}

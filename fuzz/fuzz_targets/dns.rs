//! The DNS codec on arbitrary bytes, as the server receives a query and as
//! a client receives a response, and as the labels of a query name: never
//! panics, and what parses round-trips. An accepted query always gets a
//! REFUSED, a zone answer and (for TXT, NULL, CNAME, MX, SRV, AAAA, A) a data
//! answer of its type within its size limit, and the client reads back
//! exactly the payload the server put in, whatever order the records come
//! in; a name that decodes re-encodes to a name carrying the same payload,
//! and so does an answer name. The transport's payloads read from the same
//! bytes: a query's header and body (fragment, padding or poll) and an
//! answer's header and pieces re-encode to what was read.
#![no_main]

use std::sync::LazyLock;

use iptun_proto::wire::dns::{
    Answer, AnswerType, Domain, MAX_LABEL_LEN, MAX_NAME_LEN, MAX_UPSTREAM_PAYLOAD, Name, Query,
    RecordType, build_answer, build_apex_answer, build_refused, build_txt_answer,
    decode_answer_name, decode_name, encode_answer_name, encode_name, parse_answer, parse_query,
    parse_response,
};
use iptun_proto::transport::dns::{
    DOWN_UNIT, DownHeader, TAG_MASK, UpBody, UpHeader, fragments, push_fragment,
};
use libfuzzer_sys::fuzz_target;

static DOMAIN: LazyLock<Domain> = LazyLock::new(|| Domain::new("t.example.com").unwrap());

fuzz_target!(|data: &[u8]| {
    let domain = &*DOMAIN;

    // As a datagram to the server.
    if let Ok(q) = parse_query(data) {
        server(domain, &q, data);
    }

    // As a response to a client. Take the id and question the client would
    // expect from the bytes themselves (read as a query), so that a response
    // that parses reaches the answer section.
    let mut as_query = data.to_vec();
    if let Some(flags) = as_query.get_mut(2) {
        *flags &= 0x07;
    }
    let (id, name) = match parse_query(&as_query) {
        Ok(q) => (q.id, q.name),
        Err(_) => (0, encode_name(domain, b"hi").unwrap()),
    };
    if let Ok(Answer::Data(payload)) = parse_response(id, &name, data) {
        assert!(payload.len() < data.len());
    }
    for ty in AnswerType::ALL {
        if let Ok(Answer::Data(payload)) = parse_answer(id, &name, ty, domain, data) {
            assert!(payload.len() < data.len());
        }
    }

    transport_payloads(data);

    // As the data labels of a query name: the bytes split at dots.
    let labels = data
        .split(|&b| b == b'.')
        .filter(|l| !l.is_empty() && l.len() <= MAX_LABEL_LEN);
    if let Ok(name) = Name::from_labels(labels.chain(domain.name().iter())) {
        check_name(domain, &name);
        check_answer_name(domain, &name);
    }
});

/// Everything the server does with a query it accepted.
fn server(domain: &Domain, q: &Query, data: &[u8]) {
    check_name(domain, &q.name);
    let limit = q.response_limit();

    let refused = build_refused(q).expect("REFUSED always builds");
    assert!(refused.len() <= limit);
    let zone = build_apex_answer(q, domain).expect("zone answers always build");
    assert!(zone.len() <= limit);
    let Some(ty) = q.answer_type() else {
        assert!(build_answer(q, domain, b"").is_err());
        return;
    };
    assert_eq!(
        parse_answer(q.id, &q.name, ty, domain, &refused),
        Ok(Answer::Refused)
    );
    assert!(matches!(
        parse_answer(q.id, &q.name, ty, domain, &zone),
        Ok(Answer::Empty | Answer::Refused)
    ));
    let capacity = q.answer_capacity(domain);
    let payload = &data[..data.len().min(capacity)];
    if let Ok(answer) = build_answer(q, domain, payload) {
        assert!(answer.len() <= limit);
        assert_eq!(
            parse_answer(q.id, &q.name, ty, domain, &answer),
            Ok(Answer::Data(payload.to_vec()))
        );
    } else {
        // Only where not even an empty answer of the type fits.
        assert!(capacity == 0 && build_answer(q, domain, b"").is_err());
    }
    assert!(build_answer(q, domain, &vec![0; capacity + 1]).is_err());
    if q.qtype != RecordType::TXT {
        return;
    }
    assert_eq!(parse_response(q.id, &q.name, &refused), Ok(Answer::Refused));
    assert!(matches!(
        parse_response(q.id, &q.name, &zone),
        Ok(Answer::Empty | Answer::Refused)
    ));

    let payload = &data[..data.len().min(q.downstream_capacity())];
    let answer = build_txt_answer(q, payload).expect("a payload within capacity fits");
    assert!(answer.len() <= limit);
    assert_eq!(
        parse_response(q.id, &q.name, &answer),
        Ok(Answer::Data(payload.to_vec()))
    );
    assert!(build_txt_answer(q, &vec![0; q.downstream_capacity() + 1]).is_err());
}

/// A name that decodes re-encodes (canonically split) to the same payload.
fn check_name(domain: &Domain, name: &Name) {
    let mut out = [0u8; MAX_UPSTREAM_PAYLOAD];
    let Ok(n) = decode_name(domain, name, &mut out) else {
        return;
    };
    assert!(n > 0 && n <= domain.upstream_capacity(MAX_NAME_LEN));
    let again = encode_name(domain, &out[..n]).expect("a decoded payload re-encodes");
    let mut out2 = [0u8; MAX_UPSTREAM_PAYLOAD];
    assert_eq!(decode_name(domain, &again, &mut out2), Ok(n));
    assert_eq!(out2[..n], out[..n]);
}

/// An answer name that decodes re-encodes to the same payload; it is never
/// a query name.
fn check_answer_name(domain: &Domain, name: &Name) {
    let Some(payload) = decode_answer_name(domain, name) else {
        return;
    };
    let mut out = [0u8; MAX_UPSTREAM_PAYLOAD];
    assert!(decode_name(domain, name, &mut out).is_err());
    let again = encode_answer_name(domain, &payload).expect("a decoded payload re-encodes");
    assert_eq!(decode_answer_name(domain, &again), Some(payload));
}

/// The transport's payloads: what parses re-encodes to the same fields.
fn transport_payloads(data: &[u8]) {
    if let Some((h, rest)) = UpHeader::parse(data) {
        assert_eq!(h.tag & !TAG_MASK, 0);
        assert_eq!(h.down_limit % DOWN_UNIT, 0);
        let mut again = vec![0; iptun_proto::transport::dns::UP_HEADER_LEN];
        h.emit(&mut again);
        assert_eq!(UpHeader::parse(&again), Some((h, &[][..])));
        let _ = UpBody::parse(rest);
    }
    if let Some((h, pieces)) = DownHeader::parse(data) {
        assert_eq!(DownHeader::parse(&h.to_bytes()), Some((h, &[][..])));
        // Fragments that parse, framed again, read back the same.
        let good: Vec<_> = fragments(pieces).map_while(Result::ok).collect();
        let mut framed = Vec::new();
        for f in &good {
            let mut b = vec![0; f.wire_len()];
            f.emit(&mut b).expect("a parsed fragment re-encodes");
            push_fragment(&mut framed, &b);
        }
        let again: Vec<_> = fragments(&framed).collect::<Result<_, _>>().unwrap();
        assert_eq!(again, good);
    }
}

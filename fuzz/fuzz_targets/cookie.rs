//! The cookie reply, from both sides of its parser:
//! 1. `Message::parse` on the input: a cookie reply it accepts has the
//!    documented size and re-emits to the same header;
//! 2. the input as a cookie reply to client A's pending init (type and
//!    receiver index patched in, so it reaches the AEAD): a forgery is
//!    refused and leaves the handshake exactly as it was;
//! 3. the input's first bytes as a cookie the server really sealed for that
//!    init: the client takes it and sends the same init again at once, with
//!    mac2 over it under that cookie.
//!
//! Never panics. The client is built once per [`REBUILD_EVERY`] inputs:
//! what an input leaves behind is its drop counters and, after step 3, the
//! cookie held and the init's mac2, which step 3 of the next input replaces.
#![no_main]

use std::cell::RefCell;

use iptun_fuzz::{BUF_LEN, client, keys, now};
use iptun_proto::crypto::cookie::{COOKIE_LEN, CookieSealKey, mac2};
use iptun_proto::engine::{Client, ClientOutput};
use iptun_proto::wire::Message;
use iptun_proto::wire::message::{
    COOKIE_NONCE_LEN, COOKIE_REPLY_LEN, INIT_LEN, INIT_MAC_LEN, INIT_WITH_MAC2_LEN, TYPE_COOKIE,
};
use libfuzzer_sys::fuzz_target;

const REBUILD_EVERY: u32 = 256;

struct State {
    client: Client,
    seal: CookieSealKey,
    uses: u32,
    out: Vec<u8>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    parse(data);
    STATE.with_borrow_mut(|state| {
        if state.as_ref().is_none_or(|s| s.uses >= REBUILD_EVERY) {
            let mut out = vec![0u8; BUF_LEN];
            let mut client = client(&keys().a);
            client.poll_timers(now(), &mut out).expect("an init is due");
            *state = Some(State {
                client,
                seal: CookieSealKey::new(&keys().server_pub),
                uses: 0,
                out,
            });
        }
        let state = state.as_mut().expect("built above");
        state.uses += 1;
        forged(state, data);
        genuine(state, data);
    });
});

fn parse(data: &[u8]) {
    if let Ok(Message::Cookie {
        receiver,
        nonce,
        sealed,
    }) = Message::parse(data)
    {
        assert_eq!(data.len(), COOKIE_REPLY_LEN);
        assert_eq!(nonce, &data[8..8 + COOKIE_NONCE_LEN]);
        assert_eq!(sealed, &data[8 + COOKIE_NONCE_LEN..]);
        let mut header = [0u8; 8];
        Message::emit_cookie_header(receiver, &mut header);
        assert_eq!(header, data[..8]);
    }
}

fn forged(state: &mut State, data: &[u8]) {
    let before = state.client.pending_init().expect("pending").to_vec();
    let mut aimed = data.to_vec();
    if aimed.len() >= 8 {
        aimed[..4].copy_from_slice(&[TYPE_COOKIE, 0, 0, 0]);
        aimed[4..8].copy_from_slice(&before[4..8]);
    }
    for reply in [data, &aimed[..]] {
        let r = state.client.handle_datagram(now(), reply, &mut state.out);
        assert!(r.is_err(), "a forged reply was taken: {r:?}");
        assert_eq!(state.client.pending_init(), Some(&before[..]));
    }
}

fn genuine(state: &mut State, data: &[u8]) {
    let mut cookie = [0u8; COOKIE_LEN];
    let n = data.len().min(COOKIE_LEN);
    cookie[..n].copy_from_slice(&data[..n]);
    let init = state.client.pending_init().expect("pending").to_vec();
    let mut reply = [0u8; COOKIE_REPLY_LEN];
    Message::emit_cookie_header(
        u32::from_le_bytes(init[4..8].try_into().unwrap()),
        &mut reply,
    );
    let mac1 = &init[INIT_LEN - INIT_MAC_LEN..INIT_LEN];
    state
        .seal
        .seal(&cookie, mac1, (&mut reply[8..]).try_into().unwrap());
    match state.client.handle_datagram(now(), &reply, &mut state.out) {
        Ok(ClientOutput::Send(signed)) => {
            assert_eq!(signed.len(), INIT_WITH_MAC2_LEN);
            assert_eq!(signed[..INIT_LEN], init[..INIT_LEN]);
            assert_eq!(signed[INIT_LEN..], mac2(&cookie, &init[..INIT_LEN]));
        }
        // The cookie it already holds: the init carries it already.
        Ok(ClientOutput::Nothing) => {
            let held = state.client.pending_init().expect("pending");
            assert_eq!(held[INIT_LEN..], mac2(&cookie, &init[..INIT_LEN]));
        }
        other => panic!("a genuine cookie reply was refused: {other:?}"),
    }
}

//! `Message::parse` on arbitrary bytes: never panics, and what it accepts has
//! the documented sizes and re-emits to the same header bytes.
#![no_main]

use iptun_proto::wire::Message;
use iptun_proto::wire::message::{
    COOKIE_NONCE_LEN, COOKIE_REPLY_LEN, DATA_HEADER_LEN, DATA_OVERHEAD, INIT_LEN, INIT_MAC_LEN,
    INIT_NOISE_LEN, RESPONSE_LEN, RESPONSE_NOISE_LEN, SEALED_COOKIE_LEN, TAG_LEN,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = Message::parse(data) else {
        return;
    };
    match message {
        Message::Init {
            sender,
            noise,
            signed,
            mac1,
            mac2,
        } => {
            assert_eq!(data.len(), INIT_LEN + mac2.map_or(0, <[u8]>::len));
            assert!(mac2.is_none_or(|m| m.len() == INIT_MAC_LEN && m == &data[INIT_LEN..]));
            assert_eq!(noise.len(), INIT_NOISE_LEN);
            assert_eq!(noise, &data[8..INIT_LEN - INIT_MAC_LEN]);
            assert_eq!(signed, &data[..INIT_LEN - INIT_MAC_LEN]);
            assert_eq!(mac1, &data[INIT_LEN - INIT_MAC_LEN..INIT_LEN]);
            let mut header = [0u8; 8];
            Message::emit_init_header(sender, &mut header);
            assert_eq!(header, data[..8]);
        }
        Message::Response {
            sender,
            receiver,
            noise,
        } => {
            assert_eq!(data.len(), RESPONSE_LEN);
            assert_eq!(noise.len(), RESPONSE_NOISE_LEN);
            assert_eq!(noise, &data[12..]);
            let mut header = [0u8; 12];
            Message::emit_response_header(sender, receiver, &mut header);
            assert_eq!(header, data[..12]);
        }
        Message::Cookie {
            receiver,
            nonce,
            sealed,
        } => {
            assert_eq!(data.len(), COOKIE_REPLY_LEN);
            assert_eq!(
                (nonce.len(), sealed.len()),
                (COOKIE_NONCE_LEN, SEALED_COOKIE_LEN)
            );
            let mut header = [0u8; 8];
            Message::emit_cookie_header(receiver, &mut header);
            assert_eq!(header, data[..8]);
        }
        Message::Data {
            receiver,
            counter,
            ciphertext,
        } => {
            assert!(data.len() >= DATA_OVERHEAD);
            assert!(ciphertext.len() >= TAG_LEN);
            assert_eq!(ciphertext, &data[DATA_HEADER_LEN..]);
            let mut header = [0u8; DATA_HEADER_LEN];
            Message::emit_data_header(receiver, counter, &mut header);
            assert_eq!(header, data[..DATA_HEADER_LEN]);
        }
    }
});

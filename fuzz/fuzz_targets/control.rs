//! Control messages (probes and their replies: what an authenticated data
//! message carries when it is neither an IP packet nor a keepalive) on
//! arbitrary bytes:
//! - as a plaintext: `is_control` goes by the first byte's high nibble
//!   alone; `Control::parse` never panics, and what it accepts re-emits,
//!   padded to the input's length, to the same head with zero padding, and
//!   parses back the same;
//! - as fields: a kind, id and length taken from the input, emitted at the
//!   input's length, parse back the same, and a buffer too short for them
//!   is refused, not a panic.
#![no_main]

use iptun_proto::wire::control::{CONTROL_LEN, Control, ControlKind};
use libfuzzer_sys::fuzz_target;

/// The longest message emitted (a probe is padded to at most about an MTU).
const MAX: usize = 1 << 12;

fuzz_target!(|data: &[u8]| {
    assert_eq!(
        Control::is_control(data),
        data.first().is_some_and(|b| b >> 4 == 0)
    );
    if let Ok(c) = Control::parse(data) {
        reemit(data, c);
    }

    if let Some(&[k, a, b, c, d, e, f]) = data.first_chunk::<7>() {
        let kind = if k & 1 == 0 {
            ControlKind::Probe
        } else {
            ControlKind::ProbeReply
        };
        let c = Control {
            kind,
            id: u32::from_le_bytes([a, b, c, d]),
            len: u16::from_le_bytes([e, f]),
        };
        let total = data.len().min(MAX);
        let mut out = vec![0xa5; total.max(CONTROL_LEN)];
        let n = c.emit(total, &mut out).expect("sized for it");
        assert_eq!(n, total.max(CONTROL_LEN));
        assert!(Control::is_control(&out[..n]));
        assert_eq!(Control::parse(&out[..n]), Ok(c));
        assert!(c.emit(total, &mut out[..n - 1]).is_err());
    }
});

/// An accepted plaintext emits back to itself, padding zeroed.
fn reemit(data: &[u8], c: Control) {
    assert!(data.len() >= CONTROL_LEN);
    assert!(Control::is_control(data));
    let total = data.len().min(MAX);
    let mut out = vec![0xa5; total];
    let n = c.emit(total, &mut out).expect("sized for it");
    assert_eq!(n, total);
    assert_eq!(out[..CONTROL_LEN], data[..CONTROL_LEN]);
    assert!(out[CONTROL_LEN..].iter().all(|&b| b == 0));
    assert_eq!(Control::parse(&out), Ok(c));
}

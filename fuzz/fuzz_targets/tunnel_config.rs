//! `TunnelConfig::parse` on arbitrary bytes: never panics, and whatever it
//! accepts emits to bytes that parse back to the same config.
#![no_main]

use iptun_proto::TunnelConfig;
use iptun_proto::wire::config::CONFIG_LEN;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(config) = TunnelConfig::parse(data) else {
        return;
    };
    assert_eq!(data.len(), CONFIG_LEN);
    let bytes = config.emit();
    assert_eq!(TunnelConfig::parse(&bytes), Ok(config));
    // The emitted form is canonical: emitting again changes nothing.
    assert_eq!(TunnelConfig::parse(&bytes).map(|c| c.emit()), Ok(bytes));
});

//! Checked views over untrusted bytes.
//!
//! Every parser here takes a byte slice from the network or the TUN device
//! and either returns a borrowed, validated view or a [`DropReason`]. After a
//! successful parse no accessor panics. Emitters write into caller buffers
//! and report [`DropReason::TooLarge`] instead of panicking when the buffer is
//! short. Byte-array tests at the bottom of each file pin the layouts that
//! `docs/PROTOCOL.md` describes.
//!
//! [`DropReason`]: crate::DropReason
//! [`DropReason::TooLarge`]: crate::DropReason::TooLarge

pub mod config;
pub mod control;
pub mod dns;
pub mod icmp;
pub mod ip;
pub mod message;

pub use config::TunnelConfig;
pub use control::{Control, ControlKind};
pub use ip::InnerPacket;
pub use message::Message;

//! The sans-IO core of iptun.
//!
//! This crate holds all of iptun's protocol logic and none of its I/O: it never
//! opens a socket, never touches a TUN device and never reads a clock. Time is
//! a parameter (`now: Instant`), bytes come in and go out through
//! caller-owned buffers, and every decision is a plain return value. The
//! `iptun` binary wraps it in event loops; the tests here drive it with a
//! simulated network and virtual time.
//!
//! Layers, bottom up:
//! - [`wire`]: checked views over untrusted bytes — our message headers, the
//!   handshake payloads and the few fields of inner IP packets we route on.
//!   Parsers never panic; a bad packet yields a [`DropReason`].
//! - [`crypto`]: keys, the Noise IK handshake (via `snow`), data-message
//!   sealing with a 64-bit counter nonce and the replay window.
//! - [`pool`]: the server's address pool, stable per client key.
//! - [`engine`]: the session state machines — handshake, rekey,
//!   keepalive, roaming, routing between clients — with
//!   `handle_*`/`poll_*` methods in the manner of quinn-proto and boringtun.
//! - [`transport`]: each transport's protocol logic, both halves: ICMP
//!   echo, DNS through resolvers, HTTP framing and long-poll, and the poll
//!   discipline of request/answer transports.
//! - [`connection`] (client) and [`endpoint`] (server): the engines joined
//!   to their transports. A connection carries one session over its
//!   candidate paths and moves it between them; an endpoint serves every
//!   session on every listener. These are what a driver (the binary, a
//!   simulation) feeds and polls.
//!
//! Invariants: no allocation per data packet; no unauthenticated message is
//! ever answered with more bytes than it carried; every drop feeds a counter.

pub mod connection;
pub mod crypto;
pub mod endpoint;
pub mod engine;
pub mod frag;
pub mod pool;
pub mod transport;
pub mod wire;

mod drop_reason;

pub use drop_reason::{DropCounters, DropReason};
pub use wire::TunnelConfig;

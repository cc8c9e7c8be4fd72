//! client — middle — server — target: the topology of the tests that put a
//! middlebox (a recursive resolver, a forward or reverse HTTP proxy) between
//! a client and its server. `unbound.rs` and `http.rs` add the middleboxes.

use std::time::Duration;

use super::{Netns, SERVER_WAN_ADDR, SERVER_WAN_IF, TARGET_ADDR, TARGET_IF};

/// Addresses and interfaces of [`LineTopology`] (documentation ranges).
pub mod addrs {
    /// Client and middle box on 192.0.2.0/24 and 2001:db8:1::/64.
    pub const CLIENT_ADDR: &str = "192.0.2.2";
    pub const CLIENT_ADDR6: &str = "2001:db8:1::2";
    pub const MIDDLE_ADDR: &str = "192.0.2.1";
    pub const MIDDLE_ADDR6: &str = "2001:db8:1::1";
    /// Middle box and server on 203.0.113.0/24 and 2001:db8:2::/64.
    pub const MIDDLE_UP_ADDR: &str = "203.0.113.1";
    pub const MIDDLE_UP_ADDR6: &str = "2001:db8:2::1";
    pub const SERVER_ADDR: &str = "203.0.113.2";
    pub const SERVER_ADDR6: &str = "2001:db8:2::2";
    /// Server and target: `super::SERVER_WAN_ADDR` and `super::TARGET_ADDR`
    /// on 198.51.100.0/24, as in the other topologies.
    /// Interfaces: the client's uplink, the middle box's two sides, the
    /// server's side to the middle box.
    pub const CLIENT_IF: &str = "eth0";
    pub const MIDDLE_CLIENT_IF: &str = "mcl0";
    pub const MIDDLE_SERVER_IF: &str = "msv0";
    pub const SERVER_UP_IF: &str = "up0";
}

/// client — middle — server — target:
/// client 192.0.2.2 / 2001:db8:1::2, middle 192.0.2.1 / 2001:db8:1::1 and
/// 203.0.113.1 / 2001:db8:2::1, server 203.0.113.2 / 2001:db8:2::2 and
/// 198.51.100.1, target 198.51.100.2 (see [`addrs`]).
///
/// Without `direct` the client can reach only the middle box: it has no
/// route beyond its link, the middle box doesn't forward and the server has
/// no route back — the realistic setup for a resolver or a proxy, which then
/// is the client's only way out. With `direct` the middle box also routes
/// between client and server (both ways, no NAT), so the client reaches the
/// server's 203.0.113.2 too. The target knows only 198.51.100.0/24 in both
/// cases.
pub struct LineTopology {
    pub client: Netns,
    pub middle: Netns,
    pub server: Netns,
    pub target: Netns,
    pub direct: bool,
}

impl LineTopology {
    /// Builds the topology and waits (bounded) until every link works.
    pub fn new(tag: &str, direct: bool) -> Self {
        use addrs::*;
        let [client, middle, server, target] =
            ["client", "middle", "server", "target"].map(|role| Netns::new(tag, role));
        for ns in [&client, &middle, &server, &target] {
            // No duplicate address detection: addresses are usable at once.
            for conf in ["all", "default"] {
                ns.exec_ok(&[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{conf}.accept_dad=0"),
                ]);
            }
        }
        super::veth(
            &client,
            CLIENT_IF,
            &format!("{CLIENT_ADDR}/24"),
            &middle,
            MIDDLE_CLIENT_IF,
            &format!("{MIDDLE_ADDR}/24"),
        );
        super::veth(
            &middle,
            MIDDLE_SERVER_IF,
            &format!("{MIDDLE_UP_ADDR}/24"),
            &server,
            SERVER_UP_IF,
            &format!("{SERVER_ADDR}/24"),
        );
        super::veth(
            &server,
            SERVER_WAN_IF,
            &format!("{SERVER_WAN_ADDR}/24"),
            &target,
            TARGET_IF,
            &format!("{TARGET_ADDR}/24"),
        );
        for (ns, dev, addr) in [
            (&client, CLIENT_IF, CLIENT_ADDR6),
            (&middle, MIDDLE_CLIENT_IF, MIDDLE_ADDR6),
            (&middle, MIDDLE_SERVER_IF, MIDDLE_UP_ADDR6),
            (&server, SERVER_UP_IF, SERVER_ADDR6),
        ] {
            ns.exec_ok(&["ip", "addr", "add", &format!("{addr}/64"), "dev", dev]);
        }
        if direct {
            middle.exec_ok(&[
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ]);
            client.exec_ok(&["ip", "route", "add", "203.0.113.0/24", "via", MIDDLE_ADDR]);
            client.exec_ok(&[
                "ip",
                "-6",
                "route",
                "add",
                "2001:db8:2::/64",
                "via",
                MIDDLE_ADDR6,
            ]);
            server.exec_ok(&["ip", "route", "add", "192.0.2.0/24", "via", MIDDLE_UP_ADDR]);
            server.exec_ok(&[
                "ip",
                "-6",
                "route",
                "add",
                "2001:db8:1::/64",
                "via",
                MIDDLE_UP_ADDR6,
            ]);
        }
        let topo = Self {
            client,
            middle,
            server,
            target,
            direct,
        };
        let mut checks = vec![
            (&topo.client, MIDDLE_ADDR),
            (&topo.client, MIDDLE_ADDR6),
            (&topo.middle, SERVER_ADDR),
            (&topo.middle, SERVER_ADDR6),
            (&topo.server, TARGET_ADDR),
        ];
        if direct {
            checks.extend([(&topo.client, SERVER_ADDR), (&topo.client, SERVER_ADDR6)]);
        }
        for (ns, dst) in checks {
            super::wait_until(
                Duration::from_secs(10),
                &format!("{} to reach {dst}", ns.name),
                || super::ping(ns, dst, 1),
            );
        }
        topo
    }
}

//! The server's address pool.
//!
//! Each admitted client key gets one host number in the pool, the same one
//! for as long as the server runs. The number is chosen by hashing the key
//! (probing onward on collisions), so a client usually gets the same address
//! even across server restarts. The server itself takes host 1 (10.1.0.1 in
//! the default pool), and the IPv6 pool, when configured, mirrors the IPv4
//! host number (10.1.0.7 and `fd69:7074:756e::7` belong to the same client).
//! A lease lasts until the server releases it (when the key is no longer
//! admitted, after a grace period: see the engine).

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::crypto::PublicKey;

/// A pool that cannot serve.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    /// The IPv4 pool has no room for the server and one client.
    #[error("the IPv4 pool {0} is too small: it needs at least a /30")]
    TooSmall(Ipv4Net),
    /// The IPv6 pool has fewer host bits than the IPv4 pool.
    #[error("the IPv6 pool {0} must have at least as many host addresses as the IPv4 pool")]
    V6TooSmall(Ipv6Net),
}

/// A client's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The IPv4 tunnel address.
    pub v4: Ipv4Addr,
    /// The IPv6 tunnel address, when the pool has IPv6.
    pub v6: Option<Ipv6Addr>,
}

/// Hands out stable addresses to client keys.
#[derive(Debug)]
pub struct AddressPool {
    net4: Ipv4Net,
    net6: Option<Ipv6Net>,
    leases: HashMap<PublicKey, u32>,
    taken: HashSet<u32>,
}

/// The server's host number.
const SERVER_HOST: u32 = 1;
/// The first host number handed to clients.
const FIRST_CLIENT: u32 = 2;

impl AddressPool {
    /// A pool over `net4` (and `net6`); host bits in the given networks are ignored.
    pub fn new(net4: Ipv4Net, net6: Option<Ipv6Net>) -> Result<Self, PoolError> {
        let net4 = net4.trunc();
        let net6 = net6.map(|n| n.trunc());
        if net4.prefix_len() > 30 {
            return Err(PoolError::TooSmall(net4));
        }
        if let Some(n6) = net6
            && 128 - n6.prefix_len() < 32 - net4.prefix_len()
        {
            return Err(PoolError::V6TooSmall(n6));
        }
        Ok(Self {
            net4,
            net6,
            leases: HashMap::new(),
            taken: HashSet::new(),
        })
    }

    /// The IPv4 network.
    pub fn net4(&self) -> Ipv4Net {
        self.net4
    }

    /// The IPv6 network, if any.
    pub fn net6(&self) -> Option<Ipv6Net> {
        self.net6
    }

    /// The server's own addresses (host 1).
    pub fn server(&self) -> Lease {
        self.lease_for(SERVER_HOST)
    }

    /// How many clients the pool can hold.
    pub fn capacity(&self) -> u32 {
        // All host numbers but the network, the server and the broadcast address.
        (1u32 << (32 - self.net4.prefix_len())) - 3
    }

    /// The addresses of `key`, assigning free ones on first sight. `None`
    /// when the pool is exhausted.
    pub fn assign(&mut self, key: &PublicKey) -> Option<Lease> {
        if let Some(&host) = self.leases.get(key) {
            return Some(self.lease_for(host));
        }
        let capacity = self.capacity();
        if self.taken.len() as u32 >= capacity {
            return None;
        }
        let start = fnv1a(&key.0) % capacity;
        let host = (0..capacity)
            .map(|i| FIRST_CLIENT + (start + i) % capacity)
            .find(|h| !self.taken.contains(h))?;
        self.taken.insert(host);
        self.leases.insert(*key, host);
        Some(self.lease_for(host))
    }

    /// Give `key`'s addresses back: another key may get them now.
    pub fn release(&mut self, key: &PublicKey) {
        if let Some(host) = self.leases.remove(key) {
            self.taken.remove(&host);
        }
    }

    /// The addresses already assigned to `key`.
    pub fn lease(&self, key: &PublicKey) -> Option<Lease> {
        self.leases.get(key).map(|&h| self.lease_for(h))
    }

    fn lease_for(&self, host: u32) -> Lease {
        Lease {
            v4: Ipv4Addr::from(u32::from(self.net4.network()) + host),
            v6: self
                .net6
                .map(|n| Ipv6Addr::from(u128::from(n.network()) + u128::from(host))),
        }
    }
}

// A fixed, documented hash so the preferred address of a key never depends
// on the build (std's hashers make no such promise).
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    fn pool(net: &str) -> AddressPool {
        AddressPool::new(
            net.parse().unwrap(),
            Some("fd69:7074:756e::/64".parse().unwrap()),
        )
        .unwrap()
    }

    #[test]
    fn server_is_host_one() {
        let p = pool("10.1.0.0/24");
        assert_eq!(p.server().v4, Ipv4Addr::new(10, 1, 0, 1));
        assert_eq!(p.server().v6, Some("fd69:7074:756e::1".parse().unwrap()));
        assert_eq!(p.capacity(), 253);
    }

    #[test]
    fn same_key_same_address_and_v6_mirrors_v4() {
        let mut p = pool("10.1.0.0/24");
        let a = p.assign(&key(1)).unwrap();
        assert_eq!(p.assign(&key(1)), Some(a));
        let host = a.v4.octets()[3];
        assert!((2..=254).contains(&host));
        assert_eq!(a.v6.unwrap().segments()[7], u16::from(host));
    }

    #[test]
    fn stable_across_restarts_in_any_order() {
        let mut first = pool("10.1.0.0/24");
        let mut second = pool("10.1.0.0/24");
        let a = first.assign(&key(1)).unwrap();
        second.assign(&key(2)).unwrap();
        // Unless two keys collide, the order of arrival does not matter.
        assert_eq!(second.assign(&key(1)), Some(a));
    }

    #[test]
    fn exhaustion() {
        let mut p = pool("10.1.0.0/30");
        assert_eq!(p.capacity(), 1);
        let a = p.assign(&key(1)).unwrap();
        assert_eq!(a.v4, Ipv4Addr::new(10, 1, 0, 2));
        assert_eq!(p.assign(&key(2)), None);
        assert_eq!(
            p.assign(&key(1)),
            Some(a),
            "an existing lease survives exhaustion"
        );
    }

    #[test]
    fn a_released_address_goes_to_the_next_key() {
        let mut p = pool("10.1.0.0/30");
        let a = p.assign(&key(1)).unwrap();
        assert_eq!(p.assign(&key(2)), None);
        p.release(&key(1));
        assert_eq!(p.lease(&key(1)), None);
        assert_eq!(p.assign(&key(2)), Some(a));
        p.release(&key(9)); // never leased: nothing happens
        assert_eq!(p.lease(&key(2)), Some(a));
    }

    #[test]
    fn rejects_bad_pools() {
        assert!(AddressPool::new("10.1.0.0/31".parse().unwrap(), None).is_err());
        assert!(
            AddressPool::new(
                "10.0.0.0/8".parse().unwrap(),
                Some("fd00::/112".parse().unwrap())
            )
            .is_err()
        );
    }

    proptest! {
        #[test]
        fn addresses_unique_in_range_and_stable(keys in proptest::collection::vec(any::<[u8; 32]>(), 1..40)) {
            let mut p = pool("10.1.0.0/27");
            let mut seen = HashMap::new();
            for k in &keys {
                let k = PublicKey(*k);
                let got = p.assign(&k);
                if let Some(&prev) = seen.get(&k) {
                    prop_assert_eq!(got, Some(prev));
                    continue;
                }
                match got {
                    Some(lease) => {
                        let host = lease.v4.octets()[3];
                        prop_assert!((2..=30).contains(&host));
                        prop_assert!(!seen.values().any(|l: &Lease| l.v4 == lease.v4));
                        seen.insert(k, lease);
                    }
                    None => prop_assert_eq!(seen.len() as u32, p.capacity()),
                }
            }
        }
    }
}

//! The source address of a request, the key of the per-address rate limits.
//!
//! Without `collector.trust_forwarded_for`, or when the connection does not come from one of
//! `collector.trusted_proxies`, it is the connection's peer. Otherwise it is read from
//! `X-Forwarded-For`, which every proxy extends on the right with the address it saw: walking
//! from the right, the first address that is not a trusted proxy is the client (entries to its
//! left are whatever the client sent, so spoofing them changes nothing). Entries must parse as
//! IP addresses (`[v6]:port` and `v4:port` forms too); at the first one that does not, the
//! walk stops at the nearest trusted hop, so garbage never becomes a key. An IPv6 source is
//! keyed by its /64, the block one subscriber gets, so an attacker cannot take a new key per
//! request.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use axum::http::HeaderMap;
use ipnet::IpNet;

/// Most `X-Forwarded-For` entries read (from the right); a chain longer than this is not a
/// chain of proxies.
const MAX_HOPS: usize = 16;

/// Who is trusted to say where a request came from.
#[derive(Debug, Clone)]
pub struct SourcePolicy {
    pub trust_forwarded_for: bool,
    pub trusted_proxies: Vec<IpNet>,
}

impl SourcePolicy {
    fn trusted(&self, addr: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(&addr))
    }

    /// The rate-limit key of a request from `peer` with `headers`.
    pub fn source(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        key(self.client_addr(canonical(peer), headers))
    }

    fn client_addr(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trust_forwarded_for || !self.trusted(peer) {
            return peer;
        }
        // Several X-Forwarded-For headers are one list, in order.
        let values: Vec<&str> = headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect();
        let hops = values.iter().rev().flat_map(|v| v.rsplit(',')).take(MAX_HOPS);
        let mut nearest = peer;
        for hop in hops {
            match parse_hop(hop) {
                Some(addr) if self.trusted(addr) => nearest = addr,
                Some(addr) => return addr,
                None => return nearest,
            }
        }
        nearest
    }
}

fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if hop.len() > 64 {
        return None;
    }
    hop.parse::<IpAddr>().ok().or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip())).map(canonical)
}

/// IPv4-mapped IPv6 addresses are their IPv4 address.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// IPv6 addresses keyed by their /64.
fn key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(trust: bool, proxies: &[&str]) -> SourcePolicy {
        SourcePolicy {
            trust_forwarded_for: trust,
            trusted_proxies: proxies.iter().map(|p| p.parse().unwrap()).collect(),
        }
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rightmost_untrusted_hop() {
        let p = policy(true, &["10.0.0.0/8"]);
        // The client spoofs the left part; the ingress (10.0.0.5) appended what it saw.
        assert_eq!(p.source(ip("10.0.0.5"), &xff(&["1.2.3.4, 203.0.113.7"])), ip("203.0.113.7"));
        // Two proxies in a row.
        assert_eq!(p.source(ip("10.0.0.5"), &xff(&["1.2.3.4, 203.0.113.7, 10.0.0.9"])), ip("203.0.113.7"));
        // Two headers are one list.
        assert_eq!(p.source(ip("10.0.0.5"), &xff(&["1.2.3.4", "203.0.113.7"])), ip("203.0.113.7"));
        // Ports and brackets.
        assert_eq!(p.source(ip("10.0.0.5"), &xff(&["203.0.113.7:4711"])), ip("203.0.113.7"));
        assert_eq!(p.source(ip("10.0.0.5"), &xff(&["[2001:db8::1]:443"])), ip("2001:db8::"));
        // All hops trusted: the leftmost one.
        assert_eq!(p.source(ip("10.0.0.5"), &xff(&["10.1.1.1"])), ip("10.1.1.1"));
        // No header: the proxy itself.
        assert_eq!(p.source(ip("10.0.0.5"), &HeaderMap::new()), ip("10.0.0.5"));
    }

    #[test]
    fn untrusted_peers_and_garbage() {
        let p = policy(true, &["10.0.0.0/8"]);
        // A client that is not a proxy cannot name another address.
        assert_eq!(p.source(ip("203.0.113.7"), &xff(&["1.2.3.4"])), ip("203.0.113.7"));
        // Garbage stops the walk at the nearest trusted hop.
        assert_eq!(p.source(ip("10.0.0.5"), &xff(&["1.2.3.4, not-an-ip"])), ip("10.0.0.5"));
        assert_eq!(p.source(ip("10.0.0.5"), &xff(&[&"9".repeat(10_000)])), ip("10.0.0.5"));
        assert_eq!(p.source(ip("10.0.0.5"), &xff(&["1.2.3.4, garbage, 10.0.0.7"])), ip("10.0.0.7"));
        // Not trusted at all.
        assert_eq!(policy(false, &["10.0.0.0/8"]).source(ip("10.0.0.5"), &xff(&["1.2.3.4"])), ip("10.0.0.5"));
    }

    #[test]
    fn ipv6_sources_are_their_64_and_mapped_v4_is_v4() {
        let p = policy(false, &[]);
        assert_eq!(p.source(ip("2001:db8:1:2:aaaa::1"), &HeaderMap::new()), ip("2001:db8:1:2::"));
        assert_eq!(p.source(ip("2001:db8:1:2:bbbb::9"), &HeaderMap::new()), ip("2001:db8:1:2::"));
        assert_eq!(p.source(ip("::ffff:192.0.2.1"), &HeaderMap::new()), ip("192.0.2.1"));
    }
}

//! Who the client is behind a reverse proxy (`TRUSTED_PROXIES`): when the TCP peer is a
//! trusted proxy, the client is the right-most `X-Forwarded-For` address that is not itself
//! trusted, as nginx's `real_ip_recursive on` finds it. Addresses further left were written by
//! the client (or proxies nobody vouches for) and could be anything, so they are never used.
//! The rate limiter and the access log both use this address ([`ClientAddr`]).

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

/// `TRUSTED_PROXIES`: addresses and networks whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrustedProxies(Vec<IpNet>);

/// The client's address as the request log and the rate limiter see it (a request extension
/// the listener sets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

impl std::str::FromStr for TrustedProxies {
    type Err = String;

    /// A comma-separated list of IP addresses (`10.0.0.7`, `::1`) and CIDR networks
    /// (`10.0.0.0/8`, `fd00::/8`); empty: none.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut nets = Vec::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let net = match entry.parse::<IpNet>() {
                Ok(net) => net,
                Err(_) => match entry.parse::<IpAddr>() {
                    Ok(ip) => IpNet::from(ip),
                    Err(_) => {
                        return Err(format!(
                            "{entry:?} is neither an IP address (10.0.0.7, ::1) nor a CIDR network (10.0.0.0/8, fd00::/8)"
                        ))
                    }
                },
            };
            nets.push(net);
        }
        Ok(Self(nets))
    }
}

impl TrustedProxies {
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client of a request from `peer` with these headers.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer.to_canonical();
        if !self.trusts(client) {
            return client;
        }
        // Every X-Forwarded-For header, in order, is one list; walk it from the right.
        let forwarded: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        for entry in forwarded.into_iter().rev() {
            let Ok(ip) = entry.parse::<IpAddr>() else {
                // Not an address: the proxy to its right is the last one we can believe.
                break;
            };
            client = ip.to_canonical();
            if !self.trusts(client) {
                break;
            }
        }
        client
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_addresses_and_networks_and_names_a_bad_entry() {
        let t: TrustedProxies = " 10.0.0.0/8, 192.168.1.7 ,fd00::/8,::1".parse().unwrap();
        assert!(t.trusts(ip("10.200.3.4")));
        assert!(t.trusts(ip("192.168.1.7")));
        assert!(!t.trusts(ip("192.168.1.8")));
        assert!(t.trusts(ip("fd00::5")));
        assert!(t.trusts(ip("::1")));
        assert_eq!("".parse::<TrustedProxies>(), Ok(TrustedProxies::default()));
        for bad in ["10.0.0.0/33", "10.0.0", "proxy.local", "10.0.0.1/8/8"] {
            let e = format!("a,{bad}").parse::<TrustedProxies>().unwrap_err();
            assert!(e.contains("\"a\""), "{e}");
            let e = bad.parse::<TrustedProxies>().unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_forwarded_address() {
        let t: TrustedProxies = "127.0.0.1,10.0.0.0/8".parse().unwrap();
        let local = ip("127.0.0.1");
        // An untrusted peer's header is ignored.
        assert_eq!(
            t.client(ip("203.0.113.9"), &headers(&["1.2.3.4"])),
            ip("203.0.113.9")
        );
        // Through one trusted proxy; what the client wrote on the left is not believed.
        assert_eq!(
            t.client(local, &headers(&["1.2.3.4, 203.0.113.5"])),
            ip("203.0.113.5")
        );
        // Through a chain of trusted proxies, over several headers.
        assert_eq!(
            t.client(local, &headers(&["198.51.100.7, 10.1.1.1", "10.2.2.2"])),
            ip("198.51.100.7")
        );
        // All trusted: the left-most; none: the peer; garbage stops the walk.
        assert_eq!(
            t.client(local, &headers(&["10.3.3.3, 10.4.4.4"])),
            ip("10.3.3.3")
        );
        assert_eq!(t.client(local, &headers(&[])), local);
        assert_eq!(
            t.client(local, &headers(&["198.51.100.7, nonsense, 10.5.5.5"])),
            ip("10.5.5.5")
        );
        // An IPv4 peer seen on an IPv6 socket is the IPv4 address.
        assert_eq!(
            t.client(ip("::ffff:127.0.0.1"), &headers(&["203.0.113.5"])),
            ip("203.0.113.5")
        );
        // No proxies trusted: the peer, always.
        assert_eq!(
            TrustedProxies::default().client(local, &headers(&["203.0.113.5"])),
            local
        );
    }
}

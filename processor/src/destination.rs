//! Where the cluster may send SIP: the destination policy applied to every Contact a REGISTER
//! asks us to reach. A phone with valid credentials could otherwise aim the cluster's calls and
//! keepalives at its own services (Redis, billing, the edge links, its SIP sockets: a request
//! loop) or at addresses no phone has (multicast, broadcast, link-local, unspecified).

use std::net::{IpAddr, SocketAddr};

pub use sipmsg::net::Net;

/// Why a destination is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// In a network of `contact_deny_networks` (named as configured).
    Network(String),
    /// One of the cluster's own services (Redis, billing, a dispatcher's edge).
    ClusterService,
    /// One of the cluster's own SIP sockets (a request loop).
    ClusterSip,
}

impl Denied {
    /// For logs.
    pub fn describe(&self) -> String {
        match self {
            Denied::Network(net) => format!("in denied network {net}"),
            Denied::ClusterService => "a service of the cluster".into(),
            Denied::ClusterSip => "a SIP socket of the cluster".into(),
        }
    }
}

/// The destinations a processor refuses.
#[derive(Debug, Clone)]
pub struct DestinationPolicy {
    deny: Vec<(String, Net)>,
    services: Vec<SocketAddr>,
}

impl DestinationPolicy {
    /// A policy refusing `deny_networks` (validated at load; an entry that does not parse is
    /// skipped) and the cluster's own services at `service_urls` (the Redis, billing and
    /// dispatcher URLs; only those naming IP literals count: a host name would need DNS, and is
    /// resolved by no phone's Contact either).
    pub fn new<'a>(
        deny_networks: &[String],
        service_urls: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let deny = deny_networks
            .iter()
            .filter_map(|n| Net::parse(n).ok().map(|net| (n.clone(), net)))
            .collect();
        let services =
            service_urls.into_iter().filter_map(|u| url_addr(u, default_port(u))).collect();
        DestinationPolicy { deny, services }
    }

    /// The cluster's own service addresses (from the Redis, billing and dispatcher URLs).
    pub fn services(&self) -> &[SocketAddr] {
        &self.services
    }

    /// Whether the cluster may send to `addr`; `local` tells the cluster's own SIP sockets.
    pub fn check(
        &self,
        addr: SocketAddr,
        local: impl Fn(SocketAddr) -> bool,
    ) -> Result<(), Denied> {
        if let Some((name, _)) = self.deny.iter().find(|(_, net)| net.contains(addr.ip())) {
            return Err(Denied::Network(name.clone()));
        }
        let same = |s: &SocketAddr| s.port() == addr.port() && same_ip(s.ip(), addr.ip());
        if self.services.iter().any(same) {
            return Err(Denied::ClusterService);
        }
        if local(addr) {
            return Err(Denied::ClusterSip);
        }
        Ok(())
    }
}

/// Equal IPs, an IPv4-mapped IPv6 address being its IPv4 one.
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    let plain = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    plain(a) == plain(b)
}

/// The `ip:port` of a URL (`scheme://[user@]ip[:port][/…]`) whose host is an IP literal.
/// The port a URL without one means: Redis 6379, HTTPS 443, HTTP 80.
fn default_port(url: &str) -> u16 {
    match url.split_once("://").map(|(scheme, _)| scheme) {
        Some(s) if s.starts_with("redis") => 6379,
        Some("https") => 443,
        _ => 80,
    }
}

fn url_addr(url: &str, default_port: u16) -> Option<SocketAddr> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Ok(addr) = host_port.parse::<SocketAddr>() {
        return Some(addr);
    }
    let host = host_port.trim_start_matches('[').trim_end_matches(']');
    host.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, default_port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn the_defaults_refuse_unspecified_multicast_broadcast_link_local_and_cluster_services() {
        let deny = sipmsg::net::DEFAULT_DENY_NETWORKS.map(String::from);
        let services = [
            "http://127.0.0.1:7070",
            "https://[::1]:7071/",
            "http://127.0.0.1:7080",
            "redis://:secret@127.0.0.1/0",
        ];
        let p = DestinationPolicy::new(&deny, services);
        let none = |_: SocketAddr| false;
        for denied in [
            "0.0.0.0:5060",
            "[::]:5060",
            "224.0.0.1:5060",
            "[ff02::1]:5060",
            "255.255.255.255:5060",
            "169.254.1.1:5060",
            "[fe80::1]:5060",
            "[::ffff:224.0.0.1]:5060",
        ] {
            assert!(matches!(p.check(addr(denied), none), Err(Denied::Network(_))), "{denied}");
        }
        for service in ["127.0.0.1:7070", "[::1]:7071", "127.0.0.1:7080", "127.0.0.1:6379"] {
            assert_eq!(p.check(addr(service), none), Err(Denied::ClusterService), "{service}");
        }
        let local = |a: SocketAddr| a == addr("127.0.0.2:5060");
        assert_eq!(p.check(addr("127.0.0.2:5060"), local), Err(Denied::ClusterSip));
        // A softphone on the cluster's own host, on another port, is fine.
        for fine in ["127.0.0.2:5070", "127.0.0.1:5062", "192.0.2.7:5060", "[2001:db8::7]:5060"] {
            assert_eq!(p.check(addr(fine), local), Ok(()), "{fine}");
        }
    }

    #[test]
    fn networks_and_urls_parse_or_refuse_hostile_text() {
        for bad in ["", "10.0.0.0/33", "::/129", "10.0.0.0/", "x/8", "10.0.0.0/8\r\n", "1.2.3.4/-1"]
        {
            assert!(Net::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(url_addr("redis+unix:///tmp/redis.sock", 6379), None);
        assert_eq!(url_addr("http://billing.internal:7080", 80), None);
        assert_eq!(url_addr("http://127.0.0.1", 80), Some(addr("127.0.0.1:80")));
        assert_eq!(url_addr("garbage", 80), None);
        assert_eq!(default_port("rediss://h"), 6379);
        assert_eq!(default_port("https://h"), 443);
        assert_eq!(default_port("http://h"), 80);
        assert_eq!(default_port("no scheme"), 80);
    }
}

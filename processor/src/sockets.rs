//! The dispatchers' socket tables, as announced in their `Welcome`: which local IPs are
//! aliases, and the canonical domain and digest realm of each.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::RwLock;

use sipalias_proto::edge::LocalSocket;

use crate::transport::Transport;
use sipmsg::digest::Algorithm;

/// What the cluster knows about one local IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpInfo {
    /// An old provider's IP rather than the main one.
    pub alias: bool,
    /// Canonical domain of users behind it.
    pub domain: String,
    /// Realm its phones expect.
    pub realm: String,
    /// Digest algorithms challenged and accepted on it, most preferred first; empty: the
    /// processor's own `digest_algorithms`.
    pub algorithms: Vec<Algorithm>,
}

/// Local IPs of every connected dispatcher.
///
/// Each dispatcher's table is kept as it last announced it (in its first `Welcome` and again
/// whenever a SIGHUP changed its sockets) and replaced whole by the next one; what the
/// processor uses is the union. A dispatcher whose link is down keeps its last table: calls
/// through its sockets carry on when it comes back.
#[derive(Debug, Default)]
pub struct SocketTable {
    /// Per dispatcher id: its sockets as announced.
    announced: RwLock<HashMap<String, Vec<LocalSocket>>>,
    by_ip: RwLock<HashMap<IpAddr, IpInfo>>,
    /// Every announced (IP, port), whatever the transport.
    sockets: RwLock<std::collections::HashSet<std::net::SocketAddr>>,
}

impl SocketTable {
    /// Every IP a dispatcher announced.
    pub fn ips(&self) -> Vec<IpAddr> {
        self.by_ip.read().unwrap_or_else(|p| p.into_inner()).keys().copied().collect()
    }

    /// Takes `sockets` as the whole table of `dispatcher` (replacing what it announced
    /// before). Returns whether anything changed.
    pub fn learn(&self, dispatcher: &str, sockets: &[LocalSocket]) -> bool {
        let mut announced = self.announced.write().unwrap_or_else(|p| p.into_inner());
        if announced.get(dispatcher).is_some_and(|old| old.as_slice() == sockets) {
            return false;
        }
        announced.insert(dispatcher.to_owned(), sockets.to_vec());
        let mut map = self.by_ip.write().unwrap_or_else(|p| p.into_inner());
        let mut all = self.sockets.write().unwrap_or_else(|p| p.into_inner());
        map.clear();
        all.clear();
        // Sorted by dispatcher id, so which of two differing announcements of one IP wins
        // does not depend on the order they arrived in.
        let mut ids: Vec<&String> = announced.keys().collect();
        ids.sort();
        for s in ids.into_iter().flat_map(|id| &announced[id]) {
            if let Ok(ip) = s.ip.parse::<IpAddr>() {
                if let Ok(port) = u16::try_from(s.port) {
                    all.insert(std::net::SocketAddr::new(ip, port));
                }
                let realm = if s.realm.is_empty() { s.domain.clone() } else { s.realm.clone() };
                // The dispatcher validated the names; one we do not know (a newer dispatcher)
                // is left out rather than offered.
                let mut algorithms = Vec::new();
                for a in s.digest_algorithms.iter().filter_map(|a| Algorithm::parse(a)) {
                    if !algorithms.contains(&a) {
                        algorithms.push(a);
                    }
                }
                map.insert(
                    ip,
                    IpInfo { alias: s.alias, domain: s.domain.clone(), realm, algorithms },
                );
            }
        }
        true
    }

    /// Every socket the dispatchers announce now, as `ip:port/transport` (the form a
    /// binding's ingress is listed in), sorted.
    pub fn served(&self) -> Vec<String> {
        let announced = self.announced.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<String> = announced.values().flat_map(|s| listed(s)).collect();
        out.sort();
        out.dedup();
        out
    }

    /// A socket calls to a trunk can leave from: one of `ip` with `transport`, or, without an
    /// IP, one of a main (non-alias) IP; with the dispatcher that announced it.
    pub fn socket_for(
        &self,
        ip: Option<IpAddr>,
        transport: Transport,
    ) -> Option<(std::net::SocketAddr, String)> {
        let announced = self.announced.read().unwrap_or_else(|p| p.into_inner());
        let mut ids: Vec<&String> = announced.keys().collect();
        ids.sort();
        ids.into_iter().find_map(|id| {
            announced[id].iter().find_map(|s| {
                let sip = s.ip.parse::<IpAddr>().ok()?;
                let wanted = match ip {
                    Some(ip) => sip == ip,
                    None => !s.alias,
                };
                let port = u16::try_from(s.port).ok()?;
                (wanted && Transport::from_proto(s.transport) == transport)
                    .then(|| (std::net::SocketAddr::new(sip, port), id.clone()))
            })
        })
    }

    /// What `dispatcher` announces, as [`listed`].
    pub fn served_by(&self, dispatcher: &str) -> Vec<String> {
        let announced = self.announced.read().unwrap_or_else(|p| p.into_inner());
        announced.get(dispatcher).map(|s| listed(s)).unwrap_or_default()
    }

    /// Whether `addr` is one of the dispatchers' SIP sockets.
    pub fn is_local_socket(&self, addr: std::net::SocketAddr) -> bool {
        self.sockets.read().unwrap_or_else(|p| p.into_inner()).contains(&addr)
    }

    /// What is known about a local IP.
    pub fn get(&self, ip: IpAddr) -> Option<IpInfo> {
        self.by_ip.read().unwrap_or_else(|p| p.into_inner()).get(&ip).cloned()
    }

    /// The host our From/To URIs carry on a leg sent from local IP `ip` (DESIGN.md rule 3):
    /// the IP itself for an alias — the old provider's server, as the phone knows it — and
    /// the canonical domain for the main IP; `None` for an IP no dispatcher announced.
    pub fn uri_host(&self, ip: IpAddr) -> Option<String> {
        let info = self.get(ip)?;
        Some(if info.alias { sipmsg::uri::host_of(ip) } else { info.domain })
    }

    /// The canonical domain a Request-URI host names: a local IP, or one of our domains.
    pub fn domain_of_host(&self, host: &str) -> Option<String> {
        let map = self.by_ip.read().unwrap_or_else(|p| p.into_inner());
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            return map.get(&ip).map(|i| i.domain.clone());
        }
        map.values().find(|i| i.domain.eq_ignore_ascii_case(host)).map(|i| i.domain.clone())
    }
}

/// Sockets as `ip:port/transport`, the form a binding's ingress is listed in; what is not a
/// usable address is left out.
pub fn listed(sockets: &[LocalSocket]) -> Vec<String> {
    sockets
        .iter()
        .filter_map(|s| {
            let ip = s.ip.parse::<IpAddr>().ok()?;
            let port = u16::try_from(s.port).ok()?;
            let transport = Transport::from_proto(s.transport);
            Some(format!("{}/{}", std::net::SocketAddr::new(ip, port), transport.as_str()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(ip: &str, algorithms: &[&str]) -> LocalSocket {
        LocalSocket {
            ip: ip.into(),
            port: 5060,
            transport: 0,
            alias: true,
            domain: "sip.example.net".into(),
            realm: String::new(),
            digest_algorithms: algorithms.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    #[test]
    fn an_alias_leg_carries_the_alias_ip_and_the_main_ip_leg_the_domain() {
        let table = SocketTable::default();
        let main = LocalSocket { alias: false, ..socket("127.0.0.1", &[]) };
        table.learn("d1", &[main, socket("127.0.0.2", &[]), socket("::2", &[])]);
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(table.uri_host(ip("127.0.0.1")).as_deref(), Some("sip.example.net"));
        assert_eq!(table.uri_host(ip("127.0.0.2")).as_deref(), Some("127.0.0.2"));
        assert_eq!(table.uri_host(ip("::2")).as_deref(), Some("[::2]"), "IPv6 in brackets");
        assert_eq!(table.uri_host(ip("192.0.2.1")), None, "an IP nobody announced");
    }

    #[test]
    fn announced_algorithms_keep_only_known_ones_once_in_order() {
        let table = SocketTable::default();
        table.learn(
            "d1",
            &[
                socket("127.0.0.2", &["sha-256", "MD5", "SHA-256", "SHA-512", "MD5\r\nX: 1", ""]),
                socket("127.0.0.3", &["SHA-512"]),
                socket("127.0.0.4", &[]),
                socket("not an ip", &["MD5"]),
            ],
        );
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let two = table.get(ip("127.0.0.2")).expect("known");
        assert_eq!(two.algorithms, vec![Algorithm::Sha256, Algorithm::Md5]);
        assert_eq!(two.realm, "sip.example.net", "realm defaults to the domain");
        assert!(table.is_local_socket("127.0.0.2:5060".parse().expect("addr")));
        assert!(!table.is_local_socket("127.0.0.2:5070".parse().expect("addr")));
        // Nothing usable: the processor's own default applies.
        assert!(table.get(ip("127.0.0.3")).expect("known").algorithms.is_empty());
        assert!(table.get(ip("127.0.0.4")).expect("known").algorithms.is_empty());
    }

    #[test]
    fn a_new_announcement_replaces_that_dispatchers_table_only() {
        let table = SocketTable::default();
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let addr = |s: &str| s.parse::<std::net::SocketAddr>().expect("addr");
        assert!(table.learn("d1", &[socket("127.0.0.2", &[]), socket("127.0.0.3", &[])]));
        assert!(table.learn("d2", &[socket("127.0.0.5", &[])]));
        assert!(!table.learn("d2", &[socket("127.0.0.5", &[])]), "the same table again");
        // d1's SIGHUP removed 127.0.0.3 and added 127.0.0.6.
        assert!(table.learn("d1", &[socket("127.0.0.2", &[]), socket("127.0.0.6", &[])]));
        assert!(table.get(ip("127.0.0.3")).is_none(), "removed");
        assert!(!table.is_local_socket(addr("127.0.0.3:5060")));
        assert_eq!(table.uri_host(ip("127.0.0.6")).as_deref(), Some("127.0.0.6"));
        assert!(table.is_local_socket(addr("127.0.0.5:5060")), "d2's table untouched");
        assert_eq!(
            table.served(),
            ["127.0.0.2:5060/udp", "127.0.0.5:5060/udp", "127.0.0.6:5060/udp"].map(String::from)
        );
        // A hostile announcement: nothing usable, nothing broken.
        let junk = LocalSocket { port: 70_000, transport: 99, ..socket("127.0.0.7", &[]) };
        assert!(table.learn("d3", &[junk, socket("x y", &[])]));
        assert!(!table.is_local_socket(addr("127.0.0.7:4464")));
        assert_eq!(table.served().len(), 3, "no transport, no port: not listed");
        assert!(table.learn("d1", &[]));
        assert!(table.get(ip("127.0.0.2")).is_none(), "d1 serves nothing now");
    }
}

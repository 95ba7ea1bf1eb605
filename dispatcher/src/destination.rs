//! Where the dispatcher may send SIP or open connections: never into a denied network
//! (`destination_deny_networks`: by default unspecified, multicast, broadcast, link-local), and
//! never to one of the cluster's own service addresses — its SIP sockets (a loop), its edge
//! listener, and the services processors announce in their `Hello` (their Redis, billing).
//! The processors check every Contact at REGISTER time; this is the last check, applied to
//! every `Send`, whatever a processor (or a bug in one) asks for. A denied send is refused
//! (the processor is told), logged and counted.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::RwLock;

use sipmsg::net::Net;

/// The dispatcher's destination policy.
#[derive(Debug)]
pub(crate) struct Destinations {
    deny: Vec<(String, Net)>,
    own: RwLock<HashSet<SocketAddr>>,
}

impl Destinations {
    /// A policy refusing `deny` (named as configured) and the addresses of `own`.
    pub(crate) fn new(deny: Vec<(String, Net)>, own: impl IntoIterator<Item = SocketAddr>) -> Self {
        Destinations { deny, own: RwLock::new(own.into_iter().collect()) }
    }

    /// Adds addresses a processor announced as the cluster's services.
    pub(crate) fn add_services(&self, addrs: impl IntoIterator<Item = SocketAddr>) {
        let mut own = self.own.write().unwrap_or_else(|p| p.into_inner());
        // Bounded: a processor announces a handful; a hostile one cannot grow this forever.
        for addr in addrs {
            if own.len() >= 4096 {
                break;
            }
            own.insert(addr);
        }
    }

    /// Adds the dispatcher's own SIP sockets (a SIGHUP added some). Never removed: an address
    /// that was ours is not a phone's.
    pub(crate) fn add_own(&self, addrs: impl IntoIterator<Item = SocketAddr>) {
        self.own.write().unwrap_or_else(|p| p.into_inner()).extend(addrs);
    }

    /// Why sending to `remote` is refused, if it is.
    pub(crate) fn check(&self, remote: SocketAddr) -> Result<(), String> {
        let ip = remote.ip();
        if let Some((name, _)) = self.deny.iter().find(|(_, net)| net.contains(ip)) {
            return Err(format!("destination {remote} is in a denied network ({name})"));
        }
        let own = self.own.read().unwrap_or_else(|p| p.into_inner());
        if own.contains(&remote) {
            return Err(format!("destination {remote} is one of the cluster's own services"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    #[test]
    fn denied_networks_and_own_services_are_refused_phones_are_not() {
        let deny = sipmsg::net::DEFAULT_DENY_NETWORKS
            .iter()
            .map(|n| ((*n).to_owned(), Net::parse(n).expect("net")))
            .collect();
        let d = Destinations::new(deny, [addr("127.0.0.1:5060"), addr("127.0.0.1:7070")]);
        d.add_services([addr("127.0.0.1:6379")]);
        for bad in [
            "127.0.0.1:5060",
            "127.0.0.1:7070",
            "127.0.0.1:6379",
            "0.0.0.0:5060",
            "224.0.0.1:5060",
            "255.255.255.255:5060",
            "169.254.1.1:5060",
            "[ff02::1]:5060",
            "[fe80::1]:5060",
            "[::]:5060",
            "[::ffff:224.0.0.1]:5060",
        ] {
            assert!(d.check(addr(bad)).is_err(), "{bad}");
        }
        for ok in ["127.0.0.1:5062", "127.0.0.9:5060", "203.0.113.7:5060", "[2001:db8::1]:5060"] {
            assert!(d.check(addr(ok)).is_ok(), "{ok}");
        }
    }
}

//! Addresses as the cluster's SIP policies name them: networks (`ip/len`) for allow and deny
//! lists, and the *source* a request is counted against (an IPv4 address, or the /64 of an IPv6
//! one: a single host is given a whole /64, so counting per address would let it dodge every
//! limit).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Networks no phone has, which the cluster never sends SIP to by default: unspecified,
/// multicast, broadcast and link-local addresses (`contact_deny_networks` of processors,
/// `destination_deny_networks` of dispatchers).
pub const DEFAULT_DENY_NETWORKS: [&str; 7] = [
    "0.0.0.0/8",
    "::/128",
    "224.0.0.0/4",
    "ff00::/8",
    "255.255.255.255/32",
    "169.254.0.0/16",
    "fe80::/10",
];

/// An IP network, `address/prefix_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    len: u8,
}

impl Net {
    /// Parses `ip` or `ip/len`.
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| "not an IP address or CIDR")?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or("bad prefix length")?,
        };
        Ok(Net { addr, len })
    }

    /// The prefix length (0: every address of its family).
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether `ip` lies in this network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (ip, self.addr) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.len)).unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

/// What limits and bans count a request against: its source IPv4 address, or the /64 of its
/// IPv6 one (IPv4-mapped IPv6 addresses count as IPv4). Written `203.0.113.7` or
/// `2001:db8:1:2::/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// An IPv4 address.
    V4(Ipv4Addr),
    /// The first 64 bits of an IPv6 address.
    V6(u64),
}

impl Source {
    /// The source a packet from `ip` counts against.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4),
                None => Source::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::V4(v4) => write!(f, "{v4}"),
            Source::V6(prefix) => {
                write!(f, "{}/64", Ipv6Addr::from(u128::from(*prefix) << 64))
            }
        }
    }
}

impl FromStr for Source {
    type Err = &'static str;

    /// `ip` (any IPv6 address stands for its /64) or `ipv6/64`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let ip: IpAddr = ip.parse().map_err(|_| "not an IP address or IPv6 /64")?;
        match (ip, len) {
            (_, None) | (IpAddr::V6(_), Some("64")) => Ok(Source::of(ip)),
            (IpAddr::V4(_), Some("32")) => Ok(Source::of(ip)),
            _ => Err("a source is an IPv4 address or an IPv6 /64"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    #[test]
    fn networks_contain_what_their_prefix_covers() {
        let net = |s: &str| Net::parse(s).expect("net");
        assert!(net("10.0.0.0/8").contains(ip("10.200.0.1")));
        assert!(!net("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(net("0.0.0.0/0").contains(ip("203.0.113.1")));
        assert!(net("127.0.0.1").contains(ip("::ffff:127.0.0.1")), "mapped IPv4 counts as IPv4");
        assert!(net("2001:db8::/32").contains(ip("2001:db8:ffff::1")));
        assert!(!net("2001:db8::/32").contains(ip("10.0.0.1")));
        for bad in ["", "10.0.0.0/33", "::/129", "10.0.0.0/-1", "x/8", "10.0.0.0/8/8", "1.2.3"] {
            assert!(Net::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ipv6_sources_are_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let src = |s: &str| Source::of(ip(s)).to_string();
        assert_eq!(src("203.0.113.7"), "203.0.113.7");
        assert_eq!(src("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(src("2001:db8:1:2:ffff::9"), "2001:db8:1:2::/64");
        assert_ne!(src("2001:db8:1:3::1"), "2001:db8:1:2::/64");
        assert_eq!(src("::ffff:198.51.100.4"), "198.51.100.4");
        assert_eq!(src("::1"), "::/64");
    }

    #[test]
    fn sources_parse_back_and_hostile_text_is_refused() {
        for s in ["203.0.113.7", "2001:db8:1:2::/64", "::/64"] {
            assert_eq!(s.parse::<Source>().map(|x| x.to_string()).as_deref(), Ok(s));
        }
        assert_eq!(
            "2001:db8:1:2::99".parse::<Source>().map(|x| x.to_string()).as_deref(),
            Ok("2001:db8:1:2::/64")
        );
        assert_eq!("203.0.113.7/32".parse::<Source>(), "203.0.113.7".parse::<Source>());
        for bad in ["", "203.0.113.0/24", "2001:db8::/48", "x", "1.2.3.4\r\n", "1.2.3.4 ", "*"] {
            assert!(bad.parse::<Source>().is_err(), "{bad:?}");
        }
    }
}

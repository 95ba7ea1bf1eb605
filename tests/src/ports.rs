//! Free loopback ports for the cluster under test, and checking that a process has bound one.
//!
//! A port found free here is released before the process under test binds it, so another
//! program may take it in between; [`crate::cluster::Cluster::start`] retries start-up with new
//! ports when a process fails to come up.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};

use anyhow::{Context, Result, bail};

/// Attempts at finding a port free on several addresses at once.
const ATTEMPTS: usize = 64;

/// A UDP port that is free on every one of `ips` (the first picks it, the others are checked).
pub fn free_udp_port_on_all(ips: &[Ipv4Addr]) -> Result<u16> {
    let (first, rest) = ips.split_first().context("no address given")?;
    for _ in 0..ATTEMPTS {
        let held = UdpSocket::bind((*first, 0)).with_context(|| format!("binding {first}:0"))?;
        let port = held.local_addr()?.port();
        if rest.iter().all(|ip| UdpSocket::bind((*ip, port)).is_ok()) {
            return Ok(port);
        }
    }
    bail!("no UDP port free on all of {ips:?} after {ATTEMPTS} attempts")
}

/// A port free for both UDP and TCP on every one of `ips`: SIP listens on both with one number.
pub fn free_sip_port_on_all(ips: &[Ipv4Addr]) -> Result<u16> {
    for _ in 0..ATTEMPTS {
        let port = free_udp_port_on_all(ips)?;
        if ips.iter().all(|ip| TcpListener::bind((*ip, port)).is_ok()) {
            return Ok(port);
        }
    }
    bail!("no port free for UDP and TCP on all of {ips:?} after {ATTEMPTS} attempts")
}

/// A free UDP port on `ip`.
pub fn free_udp_port(ip: Ipv4Addr) -> Result<u16> {
    free_udp_port_on_all(&[ip])
}

/// A TCP port that is free on every one of `ips` (the first picks it, the others are checked).
pub fn free_tcp_port_on_all(ips: &[Ipv4Addr]) -> Result<u16> {
    let (first, rest) = ips.split_first().context("no address given")?;
    for _ in 0..ATTEMPTS {
        let held =
            TcpListener::bind((*first, 0)).with_context(|| format!("binding tcp {first}:0"))?;
        let port = held.local_addr()?.port();
        if rest.iter().all(|ip| TcpListener::bind((*ip, port)).is_ok()) {
            return Ok(port);
        }
    }
    bail!("no TCP port free on all of {ips:?} after {ATTEMPTS} attempts")
}

/// A free TCP port on `ip`.
pub fn free_tcp_port(ip: Ipv4Addr) -> Result<u16> {
    let l = TcpListener::bind((ip, 0)).with_context(|| format!("binding tcp {ip}:0"))?;
    Ok(l.local_addr()?.port())
}

/// Whether some process has a UDP socket bound to exactly `addr` (read from `/proc/net/udp`,
/// so checking does not itself take the port).
pub fn udp_bound(addr: SocketAddrV4) -> Result<bool> {
    let table = std::fs::read_to_string("/proc/net/udp").context("reading /proc/net/udp")?;
    Ok(parse_proc_net_udp(&table).any(|a| a == addr))
}

/// Local addresses of the sockets listed in a `/proc/net/udp` table.
fn parse_proc_net_udp(table: &str) -> impl Iterator<Item = SocketAddrV4> + '_ {
    table.lines().skip(1).filter_map(|line| {
        let local = line.split_whitespace().nth(1)?;
        let (ip, port) = local.split_once(':')?;
        // The kernel prints the address as a native-endian u32 of the network-order bytes.
        let ip = u32::from_str_radix(ip, 16).ok()?;
        let port = u16::from_str_radix(port, 16).ok()?;
        Some(SocketAddrV4::new(Ipv4Addr::from(ip.to_ne_bytes()), port))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_socket_is_listed_and_a_free_one_is_not() -> Result<()> {
        let s = UdpSocket::bind((Ipv4Addr::new(127, 0, 0, 9), 0))?;
        let std::net::SocketAddr::V4(addr) = s.local_addr()? else { bail!("not v4") };
        assert!(udp_bound(addr)?);
        drop(s);
        assert!(!udp_bound(addr)?);
        Ok(())
    }

    #[test]
    fn port_free_on_three_loopback_addresses_binds_on_each() -> Result<()> {
        let ips =
            [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)];
        let port = free_udp_port_on_all(&ips)?;
        let held: Vec<UdpSocket> =
            ips.iter().map(|ip| UdpSocket::bind((*ip, port))).collect::<Result<_, _>>()?;
        assert_eq!(held.len(), 3);
        Ok(())
    }
}

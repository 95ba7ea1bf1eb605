//! The conversions between the edge link's protobuf messages and this crate's types, in one
//! place: an arrival becomes an `Inbound`, an `Egress` becomes a transport and two socket
//! addresses, a refusal becomes an `EdgeError`, a transport gets its lower-case name.

use std::net::{IpAddr, SocketAddr};

use sipalias_proto::edge::dispatcher_message::Kind as DKind;
use sipalias_proto::edge::{DispatcherMessage, EdgeError, Egress, Inbound, Ingress, Transport};

use crate::clock::unix_ms;

/// Lower-case transport name as used in config keys and logs.
pub(crate) fn transport_name(transport: Transport) -> &'static str {
    match transport {
        Transport::Udp => "udp",
        Transport::Tcp => "tcp",
        Transport::Tls => "tls",
        Transport::Unspecified => "unspecified",
    }
}

/// Where one message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Arrival {
    /// The listening socket it arrived on (for a connection the dispatcher opened, the socket
    /// the connection was opened for).
    pub(crate) local: SocketAddr,
    pub(crate) transport: Transport,
    pub(crate) remote: SocketAddr,
    /// Stream connection id; 0 for UDP.
    pub(crate) connection_id: u64,
}

/// The `Inbound` a processor gets for `message`, received now as `from` says.
pub(crate) fn inbound(from: Arrival, dispatcher_id: &str, message: &[u8]) -> DispatcherMessage {
    let Arrival { local, transport, remote, connection_id } = from;
    DispatcherMessage {
        kind: Some(DKind::Inbound(Inbound {
            ingress: Some(Ingress {
                local_ip: local.ip().to_string(),
                local_port: u32::from(local.port()),
                transport: transport.into(),
                remote_ip: remote.ip().to_string(),
                remote_port: u32::from(remote.port()),
                connection_id,
                received_at_ms: unix_ms(),
                dispatcher_id: dispatcher_id.to_owned(),
            }),
            message: message.to_vec(),
        })),
    }
}

/// The transport, local socket and destination of an egress, or why there is none.
pub(crate) fn egress_target(
    egress: &Egress,
) -> Result<(Transport, SocketAddr, SocketAddr), String> {
    let transport = match Transport::try_from(egress.transport) {
        Ok(Transport::Unspecified) => return Err("transport not specified".to_owned()),
        Ok(t) => t,
        Err(_) => return Err(format!("unknown transport {}", egress.transport)),
    };
    let local = egress
        .local_ip
        .parse::<IpAddr>()
        .ok()
        .zip(u16::try_from(egress.local_port).ok())
        .map(SocketAddr::from)
        .ok_or_else(|| {
            format!(
                "no local socket {}:{}/{}",
                egress.local_ip,
                egress.local_port,
                transport_name(transport)
            )
        })?;
    let remote = egress
        .remote_ip
        .parse::<IpAddr>()
        .ok()
        .zip(u16::try_from(egress.remote_port).ok().filter(|p| *p != 0))
        .map(SocketAddr::from)
        .ok_or_else(|| format!("bad destination {}:{}", egress.remote_ip, egress.remote_port))?;
    Ok((transport, local, remote))
}

/// An `EdgeError` about send `send_id` (0: about the link itself).
pub(crate) fn edge_error(
    send_id: u64,
    reason: String,
    closed_connection_id: u64,
) -> DispatcherMessage {
    DispatcherMessage {
        kind: Some(DKind::Error(EdgeError { send_id, reason, closed_connection_id })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn egress(local: &str, port: u32, transport: Transport) -> Egress {
        Egress {
            local_ip: local.into(),
            local_port: port,
            transport: transport.into(),
            remote_ip: "127.0.0.9".into(),
            remote_port: 5060,
            connection_id: 0,
        }
    }

    #[test]
    fn egress_targets_check_transport_and_addresses() {
        let local = SocketAddr::from(([127, 0, 0, 2], 5060));
        let remote = SocketAddr::from(([127, 0, 0, 9], 5060));
        assert_eq!(
            egress_target(&egress("127.0.0.2", 5060, Transport::Udp)),
            Ok((Transport::Udp, local, remote))
        );
        assert_eq!(
            egress_target(&egress("127.0.0.2", 5060, Transport::Tls)),
            Ok((Transport::Tls, local, remote))
        );
        assert_eq!(
            egress_target(&egress("127.0.0.2", 5060, Transport::Unspecified)),
            Err("transport not specified".into())
        );
        assert_eq!(
            egress_target(&egress("10.0.0.x", 5060, Transport::Tcp)),
            Err("no local socket 10.0.0.x:5060/tcp".into())
        );
        assert_eq!(
            egress_target(&egress("127.0.0.2", 70000, Transport::Udp)),
            Err("no local socket 127.0.0.2:70000/udp".into())
        );
        let mut e = egress("127.0.0.2", 5060, Transport::Udp);
        e.remote_port = 0;
        assert_eq!(egress_target(&e), Err("bad destination 127.0.0.9:0".into()));
    }
}

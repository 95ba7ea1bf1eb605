//! Where a message came from and where one goes: the processor's view of the dispatcher's
//! sockets, independent of the gRPC types so that protocol logic stays free of I/O types.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use sipalias_proto::edge;

/// SIP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
    /// TLS over TCP.
    Tls,
}

impl Transport {
    /// The token used in Via (`UDP`, `TCP`, `TLS`).
    pub fn via_token(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        }
    }

    /// Whether messages are retransmitted by the transaction layer (RFC 3261 §17: unreliable).
    pub fn is_unreliable(self) -> bool {
        self == Transport::Udp
    }

    /// From the wire enum; unspecified is read as UDP.
    pub fn from_proto(t: i32) -> Self {
        match edge::Transport::try_from(t) {
            Ok(edge::Transport::Tcp) => Transport::Tcp,
            Ok(edge::Transport::Tls) => Transport::Tls,
            _ => Transport::Udp,
        }
    }

    /// To the wire enum.
    pub fn to_proto(self) -> edge::Transport {
        match self {
            Transport::Udp => edge::Transport::Udp,
            Transport::Tcp => edge::Transport::Tcp,
            Transport::Tls => edge::Transport::Tls,
        }
    }

    /// Lower-case name as stored in Redis (`udp`, `tcp`, `tls`).
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }

    /// Parses [`Transport::as_str`] or a Via token, any case.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "udp" => Some(Transport::Udp),
            "tcp" => Some(Transport::Tcp),
            "tls" => Some(Transport::Tls),
            _ => None,
        }
    }
}

/// A local socket of a dispatcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct LocalAddr {
    /// Local IP and port.
    pub addr: SocketAddr,
    /// Transport.
    pub transport: Transport,
}

impl LocalAddr {
    /// Our Via for a request leaving from this socket: its transport and address as sent-by
    /// (RFC 3261 §18.1.1), a new `branch`, and `rport` asked for (RFC 3581).
    pub fn via(&self, branch: &str) -> String {
        format!("SIP/2.0/{} {};branch={branch};rport", self.transport.via_token(), self.addr)
    }
}

impl fmt::Display for LocalAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.transport.as_str())
    }
}

/// Where and how a message arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ingress {
    /// The dispatcher socket it arrived on.
    pub local: LocalAddr,
    /// Source address of the packet.
    pub remote: SocketAddr,
    /// Stream connection id (0 for UDP).
    pub connection_id: u64,
    /// The dispatcher that received it.
    pub dispatcher_id: String,
}

impl Ingress {
    /// The egress that answers this ingress symmetrically (RFC 3581, RFC 3261 §18.2.2).
    pub fn reply_egress(&self) -> Egress {
        Egress {
            local: self.local,
            remote: self.remote,
            connection_id: self.connection_id,
            dispatcher_id: self.dispatcher_id.clone(),
            flow_only: false,
        }
    }

    /// From the wire form; `None` when an address does not parse.
    pub fn from_proto(i: &edge::Ingress) -> Option<Self> {
        let local_ip: IpAddr = i.local_ip.parse().ok()?;
        let remote_ip: IpAddr = i.remote_ip.parse().ok()?;
        Some(Ingress {
            local: LocalAddr {
                addr: SocketAddr::new(local_ip, u16::try_from(i.local_port).ok()?),
                transport: Transport::from_proto(i.transport),
            },
            remote: SocketAddr::new(remote_ip, u16::try_from(i.remote_port).ok()?),
            connection_id: i.connection_id,
            dispatcher_id: i.dispatcher_id.clone(),
        })
    }
}

/// Where and how to send a message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Egress {
    /// The dispatcher socket to send from.
    pub local: LocalAddr,
    /// Destination.
    pub remote: SocketAddr,
    /// Stream connection to use (0: none / UDP).
    pub connection_id: u64,
    /// The dispatcher that owns `local` (and the connection).
    pub dispatcher_id: String,
    /// Use only connection `connection_id`: fail rather than open a new one (RFC 5626 flows).
    pub flow_only: bool,
}

impl Egress {
    /// To the wire form.
    pub fn to_proto(&self) -> edge::Egress {
        edge::Egress {
            local_ip: self.local.addr.ip().to_string(),
            local_port: u32::from(self.local.addr.port()),
            transport: self.local.transport.to_proto() as i32,
            remote_ip: self.remote.ip().to_string(),
            remote_port: u32::from(self.remote.port()),
            connection_id: self.connection_id,
        }
    }
}

/// Bytes to put on the wire, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Socket, destination and connection.
    pub egress: Egress,
    /// The serialized message.
    pub bytes: Vec<u8>,
}

//! gRPC contracts between sipalias services.
//!
//! - [`edge`]: the bidirectional stream between a processor and a dispatcher.
//! - [`billing`]: the billing service a processor calls to authenticate,
//!   authorize and account for calls.
//! - [`link_auth`]: the shared secret that authenticates both links.

pub mod link_auth;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The `http://` URL a local client (a CLI, a health check) uses to reach a gRPC server
/// listening on `addr`: a wildcard listen address is reached over loopback.
pub fn url_for_listen(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// The dispatcher ⇄ processor edge link (`proto/edge.proto`).
#[allow(missing_docs, clippy::all)]
pub mod edge {
    tonic::include_proto!("sipalias.edge.v1");
}

/// The billing contract (`proto/billing.proto`).
#[allow(missing_docs, clippy::all)]
pub mod billing {
    tonic::include_proto!("sipalias.billing.v1");
}

impl edge::Transport {
    /// Lower-case token as used in a Via header (`udp`, `tcp`, `tls`).
    pub fn as_via_token(self) -> &'static str {
        match self {
            edge::Transport::Udp | edge::Transport::Unspecified => "UDP",
            edge::Transport::Tcp => "TCP",
            edge::Transport::Tls => "TLS",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listen_addresses_are_reached_over_loopback() {
        let url = |addr: &str| url_for_listen(addr.parse().expect("a socket address"));
        assert_eq!(url("0.0.0.0:7070"), "http://127.0.0.1:7070");
        assert_eq!(url("[::]:7070"), "http://[::1]:7070");
        assert_eq!(url("10.0.0.5:7070"), "http://10.0.0.5:7070");
        assert_eq!(url("[2001:db8::1]:7080"), "http://[2001:db8::1]:7080");
    }
}

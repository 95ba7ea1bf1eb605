//! gRPC contracts between sipalias services.
//!
//! - [`edge`]: the bidirectional stream between a processor and a dispatcher.
//! - [`billing`]: the billing service a processor calls to authenticate,
//!   authorize and account for calls.
//! - [`link_auth`]: the shared secret that authenticates both links.

pub mod link_auth;

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

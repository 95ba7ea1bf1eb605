//! The dispatcher's one error type.

use std::io;
use std::net::SocketAddr;

/// Why the dispatcher could not start or stopped on its own.
///
/// Per-datagram and per-`Send` problems are not errors of the dispatcher: they are logged (and,
/// for a `Send`, reported to the processor as an `EdgeError`) and the dispatcher goes on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration (or a certificate it names) is invalid. The message names the key
    /// and why, e.g.
    /// `dispatcher.aliases[1].ip: "10.0.0.x" is not an IP address`.
    #[error("{0}")]
    Config(String),

    /// A listening socket could not be bound.
    #[error("cannot bind {what} socket {addr}")]
    Bind {
        /// Which listener: `sip udp`, `sip tcp`, `sip tls` or `edge grpc`.
        what: &'static str,
        /// The address from the configuration.
        addr: SocketAddr,
        /// The operating system's reason.
        source: io::Error,
    },

    /// The sockets handed to [`run_with`](crate::run_with) do not match the configuration's
    /// socket table (one missing, one extra, or one whose address cannot be read).
    #[error("listeners do not match the configuration: {0}")]
    Listeners(String),

    /// The gRPC edge server failed.
    #[error("edge grpc server failed")]
    Grpc(#[from] tonic::transport::Error),

    /// A listener task ended on its own (panicked or was cancelled) before shutdown.
    #[error("listener task ended unexpectedly: {0}")]
    Task(String),
}

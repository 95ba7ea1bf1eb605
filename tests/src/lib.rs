//! End-to-end harness of sipalias: real processes on loopback addresses, driven over real
//! sockets.
//!
//! - [`cluster::Cluster`] starts redis-server, billing, a dispatcher listening on the main IP
//!   127.0.0.1 and the alias IPs 127.0.0.2 and 127.0.0.3, and processors; it also runs the
//!   billing CLI and reads Redis for assertions.
//! - [`phone::Phone`] is a scriptable SIP phone on its own loopback address, over UDP, TCP or
//!   TLS ([`stream`] holds its connections, [`tls`] the certificates).
//! - [`sipp::Sipp`] runs a sipp scenario from `tests/sipp/`.
//! - [`process::Process`] and [`redis::RedisServer`] own child processes and stop them by PID
//!   when dropped.
//!
//! Nothing here sleeps to synchronise: every wait is for an event (a log line, a datagram, a
//! socket accepting) with a timeout; see [`wait`].

pub mod auth;
pub mod baresip;
pub mod binary;
pub mod cdr;
pub mod cluster;
pub mod http;
pub mod phone;
pub mod ports;
pub mod process;
pub mod redis;
pub mod sipp;
pub mod status;
pub mod stream;
pub mod tls;
pub mod wait;

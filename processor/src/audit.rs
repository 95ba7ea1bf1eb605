//! The security log: one line per failed authentication and per ban, under the target
//! `sipalias::security`, in the fixed shape the fail2ban filter in `deploy/fail2ban/` matches
//! (docs/operator-guide.md). The source address comes first after the message; whatever the
//! request controls (the AOR, the reason) follows it quoted and escaped, so it cannot pass for
//! an address and get someone else banned.

use std::net::SocketAddr;

use crate::transport::LocalAddr;

/// The `target` of every line here.
pub const TARGET: &str = "sipalias::security";

/// A request's credentials failed: a wrong digest response, credentials in a bad form, a
/// replayed nonce-count.
pub fn auth_failure(source: SocketAddr, ingress: &LocalAddr, aor: &str, reason: &str) {
    tracing::warn!(
        target: TARGET,
        source_ip = %source.ip(),
        source_port = source.port(),
        ingress = %ingress,
        aor = ?aor,
        reason = ?reason,
        "auth failure"
    );
}

/// A source (an IPv4 address, or an IPv6 /64) was banned for `ban_secs` after too many
/// failed authentications.
pub fn banned(source: &str, ban_secs: u64, reason: &str) {
    tracing::warn!(target: TARGET, source_ip = %source, ban_secs, reason = ?reason, "source banned");
}

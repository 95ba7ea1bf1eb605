//! Nonce-count replay detection (RFC 7616 §3.4, RFC 3261 §22.4): each `(nonce, nc)` pair of
//! digest credentials is accepted once in the whole cluster. A captured `Authorization` or
//! `Proxy-Authorization` replayed from anywhere, to any processor, within the nonce's lifetime
//! then earns a challenge instead of a registration or a call.
//!
//! One Redis key per pair, `SET NX PX`, pipelined with a look at the source's ban
//! ([`crate::bans`]): one round trip for both, each a single-key command (so it works the same
//! on Redis Cluster). The record is per nonce, not per source: a replay from any address is
//! caught. The key lives as long as the nonce could still be accepted, so Redis forgets it when
//! it can no longer matter.

use redis::aio::ConnectionManager;

use crate::error::Error;

/// What a claim found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// First use of this nonce-count: go on.
    Fresh,
    /// Used before: a replay.
    Replayed,
    /// The source is banned for this much longer.
    Banned {
        /// Milliseconds left.
        remaining_ms: u64,
    },
}

/// The cluster-wide record of nonce-counts used.
#[derive(Clone)]
pub struct NonceCounts {
    redis: ConnectionManager,
    prefix: String,
}

impl NonceCounts {
    /// Records kept under `<prefix>nc:`.
    pub fn new(redis: ConnectionManager, prefix: &str) -> Self {
        NonceCounts { redis, prefix: format!("{prefix}nc:") }
    }

    /// The key of one `(nonce, nc)` pair. Both were checked by [`crate::auth::check_presented`]
    /// (our own nonce: base64url; nc: eight hex digits), so neither can smuggle a separator.
    fn key(&self, nonce: &str, nc: &str) -> String {
        let nc = nc.to_ascii_lowercase();
        format!("{}{nonce}:{nc}", self.prefix)
    }

    /// Claims `(nonce, nc)` for `ttl_ms`, and looks at the ban of the source at `ban_key`. A
    /// banned source's claim is still recorded: it burns a nonce-count of its own request.
    ///
    /// Retried once on a connection error, as every first Redis command after an outage must
    /// be. Should the lost attempt have been applied after all, the retry finds the pair taken
    /// and the phone gets a `stale=true` challenge: it retries by itself.
    pub async fn claim(
        &self,
        ban_key: &str,
        nonce: &str,
        nc: &str,
        ttl_ms: u64,
    ) -> Result<Claim, Error> {
        let key = self.key(nonce, nc);
        let (ban_left, set): (i64, Option<String>) = crate::location::retry_once(|| {
            let mut conn = self.redis.clone();
            let mut pipe = redis::pipe();
            pipe.cmd("PTTL").arg(ban_key);
            pipe.cmd("SET").arg(&key).arg(1).arg("NX").arg("PX").arg(ttl_ms.max(1));
            async move { pipe.query_async(&mut conn).await }
        })
        .await?;
        Ok(if ban_left > 0 {
            Claim::Banned { remaining_ms: ban_left.unsigned_abs() }
        } else if set.is_some() {
            Claim::Fresh
        } else {
            Claim::Replayed
        })
    }
}

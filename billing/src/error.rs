//! The one error type of the billing crate.

/// Everything that can go wrong in billing: configuration, input validation, Redis and the
/// gRPC transport.
///
/// Messages are written for an operator reading a CLI error or a log line, so they name the
/// offending key, AOR or record.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration could not be loaded or is invalid. The message starts with the key,
    /// e.g. `billing.redis_url: ...`.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// An address of record is not of the form `user@domain`.
    #[error("invalid AOR {aor:?}: {reason}")]
    InvalidAor {
        /// The AOR as given.
        aor: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// Another argument is invalid (HA1 hex, empty call reference, ...).
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// Which input (e.g. `--ha1-md5`).
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// `account add` for an AOR that already exists, without `--force`.
    #[error("account {0} already exists (use --force to replace its credentials)")]
    AccountExists(String),

    /// The operation needs an existing account.
    #[error("no such account: {0}")]
    AccountNotFound(String),

    /// The rate plan named (`--rate-plan`, `rate-plan delete`) has no entries.
    #[error("no such rate plan: {0} (create it with `rate-plan set`)")]
    RatePlanNotFound(String),

    /// An accounting update kept finding the call's records changed under it (another update
    /// of the same call raced with it). Nothing was applied; retrying is safe.
    #[error("call {call_ref}: its records changed during the update; try again")]
    Contended {
        /// The call.
        call_ref: String,
    },

    /// A record in Redis does not have the expected shape (written by something else, or
    /// by an incompatible version).
    #[error("corrupt record {key}: {reason}")]
    CorruptRecord {
        /// The Redis key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Redis could not be reached at startup (after the connection manager's retries).
    #[error("cannot connect to redis at {addr}: {source}")]
    RedisConnect {
        /// Host and port, or socket path; never the password.
        addr: String,
        /// The last connection error.
        source: redis::RedisError,
    },

    /// A Redis command failed (connection refused, timeout, script error, ...).
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),

    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// `billing.listen`.
        addr: std::net::SocketAddr,
        /// Why (address in use, permission denied, ...).
        source: std::io::Error,
    },

    /// Binding or accepting on a socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),

    /// The gRPC server failed.
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),

    /// `health`: the service did not answer, or answered that it is not serving.
    #[error("billing at {url} is not healthy: {reason}")]
    Unhealthy {
        /// The URL asked.
        url: String,
        /// What it answered, or why there was no answer.
        reason: String,
    },
}

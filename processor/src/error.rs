//! The processor's error type.

/// Everything that can go wrong in the processor, with the context needed to log it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Configuration is invalid; the message names the key.
    #[error("config: {0}")]
    Config(String),
    /// Redis failed or is unreachable.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Billing failed, timed out or is unreachable.
    #[error("billing: {0}")]
    Billing(String),
    /// A stored value could not be decoded.
    #[error("corrupt stored data at {key}: {detail}")]
    Corrupt {
        /// Redis key.
        key: String,
        /// What is wrong.
        detail: String,
    },
    /// A REGISTER's CSeq is not newer than the stored binding's (RFC 3261 §10.3 step 7).
    #[error("REGISTER out of order for Call-ID {call_id}")]
    OutOfOrder {
        /// Call-ID of the stale request.
        call_id: String,
    },
    /// A REGISTER would give an AOR more bindings than `max_contacts`.
    #[error("{aor} would have more than {max} contacts")]
    TooManyContacts {
        /// The AOR.
        aor: String,
        /// The limit.
        max: u32,
    },
    /// A gRPC link failed.
    #[error("edge link to {url}: {detail}")]
    Link {
        /// Dispatcher URL.
        url: String,
        /// What happened.
        detail: String,
    },
    /// SIP message error.
    #[error(transparent)]
    Sip(#[from] sipmsg::Error),
}

impl Error {
    /// The SIP answer for a request that failed with this error (one place maps errors to codes).
    pub fn sip_status(&self) -> (u16, &'static str) {
        match self {
            Error::Redis(_) | Error::Billing(_) | Error::Link { .. } => {
                (503, "Service Unavailable")
            }
            Error::OutOfOrder { .. } => (500, "Out Of Order Request"),
            Error::TooManyContacts { .. } => (403, "Too Many Contacts"),
            Error::Sip(_) => (400, "Bad Request"),
            Error::Config(_) | Error::Corrupt { .. } => (500, "Server Internal Error"),
        }
    }
}

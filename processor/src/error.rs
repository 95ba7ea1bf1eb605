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
    #[error("billing {call}: {failure}")]
    Billing {
        /// The RPC (`Authorize`, `AccountingStop`, ...).
        call: &'static str,
        /// What went wrong.
        failure: BillingFailure,
    },
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

/// How a billing RPC failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BillingFailure {
    /// Billing answered with a gRPC error (unreachable, refused the link secret, failed).
    #[error("{code:?}: {message}")]
    Status {
        /// The gRPC status code.
        code: tonic::Code,
        /// Its message.
        message: String,
    },
    /// No answer within `billing_timeout_ms`.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
}

impl Error {
    /// The SIP answer for a request that failed with this error (one place maps errors to codes).
    pub fn sip_status(&self) -> (u16, &'static str) {
        match self {
            Error::Redis(_) | Error::Billing { .. } | Error::Link { .. } => {
                (503, "Service Unavailable")
            }
            Error::OutOfOrder { .. } => (500, "Out Of Order Request"),
            Error::TooManyContacts { .. } => (403, "Too Many Contacts"),
            Error::Sip(_) => (400, "Bad Request"),
            Error::Config(_) | Error::Corrupt { .. } => (500, "Server Internal Error"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn billing_failures_are_typed_and_answered_503() {
        let timeout = Error::Billing {
            call: "Authorize",
            failure: BillingFailure::Timeout(std::time::Duration::from_millis(1000)),
        };
        assert_eq!(timeout.to_string(), "billing Authorize: no answer within 1s");
        assert_eq!(timeout.sip_status(), (503, "Service Unavailable"));
        let refused = Error::Billing {
            call: "AccountingStop",
            failure: BillingFailure::Status {
                code: tonic::Code::Unauthenticated,
                message: "bad link secret".into(),
            },
        };
        assert!(matches!(
            &refused,
            Error::Billing {
                failure: BillingFailure::Status { code: tonic::Code::Unauthenticated, .. },
                ..
            }
        ));
        assert_eq!(refused.to_string(), "billing AccountingStop: Unauthenticated: bad link secret");
        assert_eq!(refused.sip_status(), (503, "Service Unavailable"));
    }
}

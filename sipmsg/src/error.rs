//! The error type of the SIP message layer.

/// Why a message or one of its parts could not be understood.
///
/// Each variant maps to a `400 Bad Request` reason phrase via [`Error::reason_phrase`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bytes are not UTF-8 where SIP requires text.
    #[error("message head is not valid UTF-8")]
    NotUtf8,
    /// No blank line ends the header section.
    #[error("message head is not terminated by an empty line")]
    Unterminated,
    /// The request line or status line is malformed.
    #[error("malformed start line: {0}")]
    StartLine(String),
    /// A header line has no colon or an invalid name.
    #[error("malformed header line: {0}")]
    HeaderLine(String),
    /// A mandatory header is missing.
    #[error("missing {0} header")]
    Missing(&'static str),
    /// A header value cannot be parsed.
    #[error("bad {name} header: {detail}")]
    BadHeader {
        /// Canonical header name.
        name: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// A URI cannot be parsed.
    #[error("bad URI {0:?}")]
    BadUri(String),
    /// Content-Length announces more body than the datagram carries.
    #[error("body shorter than Content-Length ({have} < {want})")]
    Truncated {
        /// Bytes of body present.
        have: usize,
        /// Bytes announced by Content-Length.
        want: usize,
    },
    /// A message exceeds the configured size limit.
    #[error("message larger than {limit} bytes")]
    TooLarge {
        /// The limit that was exceeded.
        limit: usize,
    },
}

impl Error {
    /// A reason phrase for a `400` answering a request that failed with this error.
    pub fn reason_phrase(&self) -> String {
        match self {
            Error::Missing(h) => format!("Missing {h} header"),
            Error::BadHeader { name, .. } => format!("Bad {name} header"),
            Error::BadUri(_) => "Bad Request-URI".to_owned(),
            Error::Truncated { .. } => "Body shorter than Content-Length".to_owned(),
            Error::TooLarge { .. } => "Message Too Large".to_owned(),
            _ => "Malformed message".to_owned(),
        }
    }
}

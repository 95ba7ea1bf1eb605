//! The error type of the SIP message layer.

/// Why a message or one of its parts could not be understood.
///
/// Each variant maps to the SIP answer for a request that failed with it: [`Error::status`] and
/// [`Error::reason_phrase`] are the one place that mapping lives.
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
    /// A well-formed request line names a SIP version other than 2.0 (answered with `505`).
    #[error("unsupported SIP version {0:?}")]
    VersionNotSupported(String),
    /// A header line has no colon or an invalid name.
    #[error("malformed header line: {0}")]
    HeaderLine(String),
    /// A CR inside a line (in a quoted string too): only CRLF ends a line. Passed on, it would
    /// split a header in two at the next hop (header injection), so the message is refused.
    /// Carries the header's name (`Request-Line`, or `header` when the name is unreadable).
    #[error("line break inside the {0} header")]
    LineBreak(String),
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
    /// The status code answering a request that failed with this error: `505` for another SIP
    /// version, `513` for an oversized message, `400` for everything else.
    pub fn status(&self) -> u16 {
        match self {
            Error::VersionNotSupported(_) => 505,
            Error::TooLarge { .. } => 513,
            _ => 400,
        }
    }

    /// The reason phrase to go with [`Error::status`].
    pub fn reason_phrase(&self) -> String {
        match self {
            Error::VersionNotSupported(_) => "Version Not Supported".to_owned(),
            Error::StartLine(_) => "Bad Request-Line".to_owned(),
            Error::Missing(h) => format!("Missing {h} header"),
            Error::BadHeader { name, .. } => format!("Bad {name} header"),
            Error::BadUri(_) => "Bad Request-URI".to_owned(),
            Error::LineBreak(name) => format!("Line Break Inside {name}"),
            Error::Truncated { .. } => "Body shorter than Content-Length".to_owned(),
            Error::TooLarge { .. } => "Message Too Large".to_owned(),
            _ => "Malformed message".to_owned(),
        }
    }
}

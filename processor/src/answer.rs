//! Final SIP answers decided before any message is built: the deciding functions (call setup,
//! registration, authentication) return an [`Answer`]; the node turns it into the response.

use sipmsg::SipMessage;

/// A final answer decided before a message is built: status, reason phrase and, for billing
/// refusals, the text of a `Reason` header (RFC 3326).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Reason phrase.
    pub reason: &'static str,
    /// `text` of a `Reason: SIP;cause=<status>` header, when the answer carries one.
    pub reason_text: Option<String>,
}

impl Answer {
    /// An answer with no `Reason` header.
    pub const fn plain(status: u16, reason: &'static str) -> Self {
        Answer { status, reason, reason_text: None }
    }

    /// The response to `req`, with To tag `tag`.
    pub fn to_response(&self, req: &SipMessage, tag: &str) -> SipMessage {
        let mut resp = SipMessage::response_to(req, self.status, self.reason, Some(tag));
        if let Some(text) = &self.reason_text {
            resp.push_header("Reason", format!("SIP;cause={};text=\"{text}\"", self.status));
        }
        resp
    }
}

/// `404 Not Found`: nobody by that name here.
pub const NOT_FOUND: Answer = Answer::plain(404, "Not Found");
/// `416`: a Request-URI scheme this cluster does not route (RFC 3261 §21.4.17).
pub const UNSUPPORTED_SCHEME: Answer = Answer::plain(416, "Unsupported URI Scheme");
/// `480`: a subscriber with no live registration.
pub const UNAVAILABLE: Answer = Answer::plain(480, "Temporarily Unavailable");

/// `500`: a request on an IP no dispatcher announced (a dispatcher newer than this processor).
pub const UNKNOWN_SOCKET: Answer = Answer::plain(500, "Unknown Local Socket");
/// `403 Forbidden`: authenticated but not allowed, or a banned source.
pub const FORBIDDEN: Answer = Answer::plain(403, "Forbidden");

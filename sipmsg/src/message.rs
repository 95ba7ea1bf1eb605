//! [`SipMessage`]: a parsed SIP request or response that serializes back as it came.

use bytes::Bytes;

use crate::error::Error;
use crate::headers::{CSeq, NameAddr, Via, split_list};
use crate::lex::parse_length;
use crate::uri::Uri;

/// The RFC 3261 branch prefix (§8.1.1.7); a branch that is nothing but this identifies nothing.
const MAGIC_COOKIE: &str = "z9hG4bK";

/// Headers a request may carry once only (RFC 3261 §7.3.1: not defined as comma lists).
const SINGLE_VALUED: &[(&str, &str)] = &[
    ("call-id", "Call-ID"),
    ("cseq", "CSeq"),
    ("from", "From"),
    ("to", "To"),
    ("max-forwards", "Max-Forwards"),
];

/// The first line of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    /// `METHOD Request-URI SIP/2.0`.
    Request {
        /// The method token as sent (extension methods included).
        method: String,
        /// The Request-URI as sent.
        uri: String,
    },
    /// `SIP/2.0 code reason`.
    Response {
        /// Status code, 100–699.
        status: u16,
        /// Reason phrase exactly as sent (may be empty).
        reason: String,
    },
}

/// One header line. The name is kept as written, so a relayed message keeps its compact or long
/// forms and its capitalisation; `key` is the canonical lower-case long name used for lookups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Name as written on the wire.
    pub name: String,
    /// Canonical lower-case long name (compact forms expanded).
    pub key: String,
    /// Value with surrounding whitespace trimmed and folded lines joined by one space.
    pub value: String,
}

impl Header {
    /// A header with its canonical key derived from `name`.
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        let name = name.into();
        Header { key: canonical_name(&name), name, value: value.into() }
    }
}

/// Lower-case long form of a header name; compact forms (RFC 3261 §7.3.3 and extensions) expanded.
pub fn canonical_name(name: &str) -> String {
    if name.len() == 1 {
        let long = match name.as_bytes()[0].to_ascii_lowercase() {
            b'i' => "call-id",
            b'm' => "contact",
            b'e' => "content-encoding",
            b'l' => "content-length",
            b'c' => "content-type",
            b'f' => "from",
            b's' => "subject",
            b'k' => "supported",
            b't' => "to",
            b'v' => "via",
            b'r' => "refer-to",
            b'o' => "event",
            b'u' => "allow-events",
            b'b' => "referred-by",
            b'x' => "session-expires",
            b'a' => "accept-contact",
            b'j' => "reject-contact",
            b'd' => "request-disposition",
            b'y' => "identity",
            b'n' => "identity-info",
            _ => return name.to_ascii_lowercase(),
        };
        return long.to_owned();
    }
    name.to_ascii_lowercase()
}

/// A SIP request or response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipMessage {
    /// Request line or status line.
    pub start: StartLine,
    /// Headers in wire order.
    pub headers: Vec<Header>,
    /// Body, exactly Content-Length bytes.
    pub body: Bytes,
    /// The request line's SIP-Version when it is not exactly `SIP/2.0` (see [`Self::version`]).
    version: Option<String>,
}

impl SipMessage {
    /// A request with no headers yet.
    pub fn request(method: &str, uri: impl Into<String>) -> Self {
        Self::with_version(
            StartLine::Request { method: method.to_owned(), uri: uri.into() },
            None,
            Vec::new(),
            Bytes::new(),
        )
    }

    /// A response with no headers yet.
    pub fn response(status: u16, reason: impl Into<String>) -> Self {
        Self::with_version(
            StartLine::Response { status, reason: reason.into() },
            None,
            Vec::new(),
            Bytes::new(),
        )
    }

    pub(crate) fn with_version(
        start: StartLine,
        version: Option<String>,
        headers: Vec<Header>,
        body: Bytes,
    ) -> Self {
        SipMessage { start, headers, body, version }
    }

    /// The SIP-Version of the start line as written: `SIP/2.0` for every message we build and
    /// every response we accept; a parsed request may name another (RFC 4475 §3.1.2.16), which
    /// [`Self::validate_request`] refuses with [`Error::VersionNotSupported`].
    pub fn version(&self) -> &str {
        self.version.as_deref().unwrap_or("SIP/2.0")
    }

    /// A response to `req` per RFC 3261 §8.2.6.2: Via, From, To, Call-ID and CSeq copied.
    /// A To tag is added when `to_tag` is given and the request's To has none.
    pub fn response_to(req: &SipMessage, status: u16, reason: &str, to_tag: Option<&str>) -> Self {
        let mut resp = SipMessage::response(status, reason);
        for h in &req.headers {
            match h.key.as_str() {
                "via" | "from" | "call-id" | "cseq" => resp.headers.push(h.clone()),
                "to" => {
                    let mut h = h.clone();
                    if let Some(tag) = to_tag
                        && !has_tag_param(&h.value)
                        && status > 100
                    {
                        h.value = format!("{};tag={tag}", h.value);
                    }
                    resp.headers.push(h);
                }
                _ => {}
            }
        }
        resp
    }

    /// True for requests.
    pub fn is_request(&self) -> bool {
        matches!(self.start, StartLine::Request { .. })
    }

    /// The method of a request, `None` for responses.
    pub fn method(&self) -> Option<&str> {
        match &self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => None,
        }
    }

    /// The Request-URI of a request.
    pub fn request_uri(&self) -> Option<&str> {
        match &self.start {
            StartLine::Request { uri, .. } => Some(uri),
            StartLine::Response { .. } => None,
        }
    }

    /// Status code of a response.
    pub fn status(&self) -> Option<u16> {
        match &self.start {
            StartLine::Response { status, .. } => Some(*status),
            StartLine::Request { .. } => None,
        }
    }

    /// Reason phrase of a response.
    pub fn reason(&self) -> Option<&str> {
        match &self.start {
            StartLine::Response { reason, .. } => Some(reason),
            StartLine::Request { .. } => None,
        }
    }

    /// First value of the header with this (long or compact, any case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let key = canonical_name(name);
        self.headers.iter().find(|h| h.key == key).map(|h| h.value.as_str())
    }

    /// Every header line with this name, in order.
    pub fn headers_named<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a str> + 'a {
        let key = canonical_name(name);
        self.headers.iter().filter(move |h| h.key == key).map(|h| h.value.as_str())
    }

    /// Every comma-separated element of every header line with this name, in order.
    pub fn header_list(&self, name: &str) -> Vec<&str> {
        self.headers_named(name).flat_map(split_list).collect()
    }

    /// Replaces every header of this name with one line (added at the end if absent).
    pub fn set_header(&mut self, name: &str, value: impl Into<String>) {
        let key = canonical_name(name);
        let value = value.into();
        if let Some(pos) = self.headers.iter().position(|h| h.key == key) {
            self.headers[pos].value = value;
            let mut i = 0;
            self.headers.retain(|h| {
                i += 1;
                i - 1 <= pos || h.key != key
            });
        } else {
            self.headers.push(Header::new(name, value));
        }
    }

    /// Appends a header line.
    pub fn push_header(&mut self, name: &str, value: impl Into<String>) {
        self.headers.push(Header::new(name, value));
    }

    /// Inserts a header line before every other header (used for a new top Via).
    pub fn prepend_header(&mut self, name: &str, value: impl Into<String>) {
        self.headers.insert(0, Header::new(name, value));
    }

    /// Removes every header of this name.
    pub fn remove_header(&mut self, name: &str) {
        let key = canonical_name(name);
        self.headers.retain(|h| h.key != key);
    }

    /// Removes the first element of the first header of this name (e.g. our own top Via).
    pub fn pop_first_list_element(&mut self, name: &str) {
        let key = canonical_name(name);
        if let Some(pos) = self.headers.iter().position(|h| h.key == key) {
            let rest: Vec<&str> = split_list(&self.headers[pos].value).skip(1).collect();
            if rest.is_empty() {
                self.headers.remove(pos);
            } else {
                self.headers[pos].value = rest.join(", ");
            }
        }
    }

    /// The Call-ID.
    pub fn call_id(&self) -> Result<&str, Error> {
        self.header("call-id").filter(|v| !v.is_empty()).ok_or(Error::Missing("Call-ID"))
    }

    /// The CSeq.
    pub fn cseq(&self) -> Result<CSeq, Error> {
        CSeq::parse(self.header("cseq").ok_or(Error::Missing("CSeq"))?)
    }

    /// The From header.
    pub fn from(&self) -> Result<NameAddr, Error> {
        NameAddr::parse(self.header("from").ok_or(Error::Missing("From"))?)
            .map_err(|e| bad("From", e))
    }

    /// The To header.
    pub fn to(&self) -> Result<NameAddr, Error> {
        NameAddr::parse(self.header("to").ok_or(Error::Missing("To"))?).map_err(|e| bad("To", e))
    }

    /// Every Via, top first.
    pub fn vias(&self) -> Result<Vec<Via>, Error> {
        self.header_list("via").into_iter().map(Via::parse).collect()
    }

    /// The top Via.
    pub fn top_via(&self) -> Result<Via, Error> {
        Via::parse(self.header_list("via").into_iter().next().ok_or(Error::Missing("Via"))?)
    }

    /// Every Contact, in order (a `*` contact is returned as a `NameAddr` with an empty URI).
    pub fn contacts(&self) -> Result<Vec<NameAddr>, Error> {
        self.header_list("contact")
            .into_iter()
            .map(|c| {
                if c.trim() == "*" {
                    Ok(NameAddr::star())
                } else {
                    NameAddr::parse(c).map_err(|e| bad("Contact", e))
                }
            })
            .collect()
    }

    /// The `Expires` header as a number, if present and valid.
    pub fn expires(&self) -> Option<u32> {
        self.header("expires").and_then(|v| v.trim().parse().ok())
    }

    /// Checks that a request can be answered and processed (RFC 3261 §8.2; RFC 4475 §3.1.2):
    /// SIP/2.0; Call-ID, CSeq, From, To and Max-Forwards at most once; the mandatory headers
    /// present and well formed; every Via well formed, the top one with a real branch; the CSeq
    /// method equal to the request's; Max-Forwards 0–255; a Request-URI that is an absolute URI
    /// (a SIP one without headers, RFC 3261 §19.1.1) and Contacts that parse.
    ///
    /// The first problem found is returned; [`Error::status`] says how to answer it.
    pub fn validate_request(&self) -> Result<(), Error> {
        if !self.version().eq_ignore_ascii_case("SIP/2.0") {
            return Err(Error::VersionNotSupported(self.version().to_owned()));
        }
        for (key, name) in SINGLE_VALUED {
            if self.headers.iter().filter(|h| h.key == *key).count() > 1 {
                return Err(Error::BadHeader { name, detail: "multiple values".into() });
            }
        }
        self.call_id()?;
        let cseq = self.cseq()?;
        self.from()?;
        self.to()?;
        let vias = self.vias()?;
        let top = vias.first().ok_or(Error::Missing("Via"))?;
        if top.branch() == Some(MAGIC_COOKIE) {
            return Err(Error::BadHeader {
                name: "Via",
                detail: "branch has no identifier".into(),
            });
        }
        if let Some(m) = self.method()
            && !cseq.method.eq_ignore_ascii_case(m)
        {
            return Err(Error::BadHeader { name: "CSeq", detail: "method mismatch".into() });
        }
        if let Some(v) = self.header("max-forwards") {
            // RFC 3261 §20.22: an integer 0–255.
            if parse_length(v).is_none_or(|n| n > 255) {
                return Err(Error::BadHeader { name: "Max-Forwards", detail: v.to_owned() });
            }
        }
        if let Some(uri) = self.request_uri() {
            check_request_uri(uri)?;
        }
        self.contacts()?;
        Ok(())
    }

    /// Checks what a response needs before it can be matched to a client transaction: Call-ID,
    /// CSeq, From, To and a top Via that parse. A response failing this is discarded
    /// (RFC 4475 §3.1.2.5: "An element receiving this response will simply discard it").
    pub fn validate_response(&self) -> Result<(), Error> {
        self.call_id()?;
        self.cseq()?;
        self.from()?;
        self.to()?;
        self.top_via()?;
        Ok(())
    }

    /// Serializes the message. Content-Length is set to the body length (keeping the header's
    /// written name), so a relayed message with a changed body stays correctly framed.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + self.headers.len() * 48 + self.body.len());
        match &self.start {
            StartLine::Request { method, uri } => {
                out.extend_from_slice(method.as_bytes());
                out.push(b' ');
                out.extend_from_slice(uri.as_bytes());
                out.push(b' ');
                out.extend_from_slice(self.version().as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            StartLine::Response { status, reason } => {
                out.extend_from_slice(format!("SIP/2.0 {status} ").as_bytes());
                out.extend_from_slice(reason.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
        let mut wrote_length = false;
        for h in &self.headers {
            out.extend_from_slice(h.name.as_bytes());
            out.extend_from_slice(b": ");
            if h.key == "content-length" {
                if wrote_length {
                    out.truncate(out.len() - h.name.len() - 2);
                    continue;
                }
                // Keep the value as written when it is right (`0150` stays `0150`).
                if parse_length(&h.value) == Some(self.body.len()) {
                    out.extend_from_slice(h.value.as_bytes());
                } else {
                    out.extend_from_slice(self.body.len().to_string().as_bytes());
                }
                wrote_length = true;
            } else {
                out.extend_from_slice(h.value.as_bytes());
            }
            out.extend_from_slice(b"\r\n");
        }
        if !wrote_length {
            out.extend_from_slice(format!("Content-Length: {}\r\n", self.body.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }
}

/// A Request-URI must be an absolute URI (RFC 3261 §25.1); a SIP or SIPS one must parse and may
/// not carry headers (§19.1.1, RFC 4475 §3.1.2.11). Which schemes we serve is the application's
/// decision (`416`), not a syntax question.
fn check_request_uri(uri: &str) -> Result<(), Error> {
    let parsed = Uri::parse(uri)?;
    if parsed.is_sip() && parsed.headers.is_some() {
        return Err(Error::BadUri(uri.to_owned()));
    }
    Ok(())
}

fn bad(name: &'static str, e: Error) -> Error {
    match e {
        Error::BadUri(detail) | Error::HeaderLine(detail) => Error::BadHeader { name, detail },
        other => other,
    }
}

/// Whether a name-addr header value carries a `tag` parameter.
fn has_tag_param(value: &str) -> bool {
    NameAddr::parse(value).map(|n| n.tag().is_some()).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse;

    #[test]
    fn set_header_replaces_all_lines() {
        let mut m = SipMessage::request("OPTIONS", "sip:a@b");
        m.push_header("Route", "<sip:x>");
        m.push_header("Via", "SIP/2.0/UDP h");
        m.push_header("Route", "<sip:y>");
        m.set_header("route", "<sip:z>");
        assert_eq!(m.headers_named("Route").collect::<Vec<_>>(), vec!["<sip:z>"]);
        assert_eq!(m.headers[0].name, "Route");
    }

    #[test]
    fn response_to_copies_dialog_headers_and_adds_tag() {
        let req = parse(
            b"INVITE sip:a@b SIP/2.0\r\nv: SIP/2.0/UDP h;branch=z9hG4bK1\r\nf: <sip:b@b>;tag=1\r\nt: <sip:a@b>\r\ni: c1\r\nCSeq: 1 INVITE\r\nl: 0\r\n\r\n",
        )
        .expect("parse");
        let resp = SipMessage::response_to(&req, 486, "Busy Here", Some("xyz"));
        let text = String::from_utf8(resp.to_bytes()).expect("utf8");
        assert!(text.starts_with("SIP/2.0 486 Busy Here\r\n"), "{text}");
        assert!(text.contains("t: <sip:a@b>;tag=xyz\r\n"), "{text}");
        assert!(text.contains("i: c1\r\n"));
        assert!(text.contains("Content-Length: 0\r\n"));
    }

    #[test]
    fn other_sip_versions_parse_and_are_refused_with_505() {
        let text = b"OPTIONS sip:a@b sip/3.1\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";
        let m = parse(text).expect("parse");
        assert_eq!(m.version(), "sip/3.1");
        assert_eq!(m.validate_request().map_err(|e| e.status()), Err(505));
        assert_eq!(m.to_bytes(), text.to_vec(), "written back as it came");
        let lower =
            parse(&String::from_utf8_lossy(text).replace("sip/3.1", "sip/2.0").into_bytes());
        assert_eq!(
            lower.expect("parse").validate_request(),
            Ok(()),
            "the name is case-insensitive"
        );
    }

    #[test]
    fn content_length_kept_as_written_when_right() {
        let m = parse(b"MESSAGE sip:a@b SIP/2.0\r\nl: 002\r\n\r\nhi").expect("parse");
        assert!(m.to_bytes().ends_with(b"l: 002\r\n\r\nhi"));
        let mut changed = m.clone();
        changed.body = Bytes::from_static(b"hey");
        assert!(changed.to_bytes().ends_with(b"l: 3\r\n\r\nhey"));
    }

    #[test]
    fn pop_first_list_element_keeps_the_rest() {
        let mut m = SipMessage::response(200, "OK");
        m.push_header("Via", "SIP/2.0/UDP a;branch=z9hG4bK1, SIP/2.0/UDP b;branch=z9hG4bK2");
        m.pop_first_list_element("via");
        assert_eq!(m.header("via"), Some("SIP/2.0/UDP b;branch=z9hG4bK2"));
        m.pop_first_list_element("via");
        assert_eq!(m.header("via"), None);
    }
}

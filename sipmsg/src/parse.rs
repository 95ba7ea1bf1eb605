//! Parsing bytes into a [`SipMessage`].

use bytes::Bytes;

use crate::error::Error;
use crate::lex::{is_sip_version, is_token_char, parse_length, trim_lws};
use crate::message::{Header, SipMessage, StartLine};

/// Parses one SIP message (a datagram, or one message cut out by [`crate::framing::frame`]).
///
/// Leading CRLFs are skipped (RFC 3261 §7.5). Folded header lines are joined with one space.
/// With Content-Length the body is exactly that long (extra bytes are discarded, RFC 3261 §18.3;
/// fewer is [`Error::Truncated`]; a second Content-Length is an error, since the body's extent
/// is then unknown); without it the body is the rest of the datagram.
///
/// The request line's SIP-Version is read leniently (any `SIP/x.y`) and kept, so that
/// [`SipMessage::validate_request`] can answer another version with `505` (RFC 3261 §8.2.2.1
/// needs the request parsed to answer it); a response must be `SIP/2.0`.
pub fn parse(input: &[u8]) -> Result<SipMessage, Error> {
    let parts = split(input)?;
    if let Some(name) = parts.bare_cr {
        return Err(Error::LineBreak(name));
    }
    let body = frame_body(&parts.headers, parts.rest)?;
    Ok(SipMessage::with_version(parts.start, parts.version, parts.headers, body))
}

/// Parses the start line and headers of a message whose body cannot be framed (Content-Length
/// beyond the end of the datagram, negative or repeated), leaving the body empty. It exists so
/// that such a request can still be answered (RFC 3261 §18.3: "the server SHOULD generate a 400");
/// never process what it returns as a request. A bare CR (which [`parse`] refuses) becomes a
/// space here, so the answer does not carry it back.
pub fn parse_head(input: &[u8]) -> Result<SipMessage, Error> {
    let mut parts = split(input)?;
    if parts.bare_cr.is_some() {
        for h in &mut parts.headers {
            if h.value.contains('\r') {
                h.value = h.value.replace('\r', " ");
            }
        }
    }
    Ok(SipMessage::with_version(parts.start, parts.version, parts.headers, Bytes::new()))
}

/// A message cut into its start line, headers and everything after the empty line.
struct Parts<'a> {
    start: StartLine,
    version: Option<String>,
    headers: Vec<Header>,
    rest: &'a [u8],
    /// The first line holding a CR that does not end it: the name of its header (or
    /// `Request-Line`). SIP lines end in CRLF; a CR inside a value, passed on, would end the
    /// line early at the next hop and let the rest pose as a header of its own.
    bare_cr: Option<String>,
}

fn split(input: &[u8]) -> Result<Parts<'_>, Error> {
    let mut start = 0;
    while input[start..].starts_with(b"\r\n") {
        start += 2;
    }
    let input = &input[start..];
    let (head_len, body_start) = find_head_end(input).ok_or(Error::Unterminated)?;
    let head = std::str::from_utf8(&input[..head_len]).map_err(|_| Error::NotUtf8)?;
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let first = lines.next().unwrap_or_default();
    let mut bare_cr = first.contains('\r').then(|| "Request-Line".to_owned());
    let (start_line, version) = parse_start_line(first)?;

    let mut headers: Vec<Header> = Vec::with_capacity(16);
    for line in lines {
        if line.is_empty() {
            continue;
        }
        if bare_cr.is_none() && line.contains('\r') {
            bare_cr = Some(line_name(line, headers.last()));
        }
        if line.starts_with([' ', '\t']) {
            // Folded continuation of the previous header (RFC 3261 §7.3.1).
            let prev = headers.last_mut().ok_or_else(|| Error::HeaderLine(printable(line)))?;
            let more = trim_lws(line);
            if !more.is_empty() {
                if !prev.value.is_empty() {
                    prev.value.push(' ');
                }
                prev.value.push_str(more);
            }
            continue;
        }
        let colon = line.find(':').ok_or_else(|| Error::HeaderLine(printable(line)))?;
        let name = line[..colon].trim_end_matches([' ', '\t']);
        if name.is_empty() || !name.bytes().all(is_token_char) {
            return Err(Error::HeaderLine(printable(line)));
        }
        headers.push(Header::new(name, trim_lws(&line[colon + 1..])));
    }
    Ok(Parts { start: start_line, version, headers, rest: &input[body_start..], bare_cr })
}

/// A line as it may appear in an error (and so in a log): control characters escaped, so a
/// crafted line cannot forge log lines; at most 80 characters.
fn printable(line: &str) -> String {
    line.chars().take(80).flat_map(char::escape_debug).collect()
}

/// The header a line belongs to, for an error: its own name, or for a folded line the previous
/// header's. Never the raw text (it ends up in a reason phrase).
fn line_name(line: &str, prev: Option<&Header>) -> String {
    if line.starts_with([' ', '\t']) {
        return prev.map_or("header", |h| h.name.as_str()).to_owned();
    }
    match line.split_once(':') {
        Some((name, _))
            if !name.trim_end().is_empty() && name.trim_end().bytes().all(is_token_char) =>
        {
            name.trim_end().to_owned()
        }
        _ => "header".to_owned(),
    }
}

/// The body as Content-Length frames it within `rest` (RFC 3261 §18.3).
fn frame_body(headers: &[Header], rest: &[u8]) -> Result<Bytes, Error> {
    let mut lengths = headers.iter().filter(|h| h.key == "content-length");
    let Some(h) = lengths.next() else { return Ok(Bytes::copy_from_slice(rest)) };
    if lengths.next().is_some() {
        return Err(Error::BadHeader { name: "Content-Length", detail: "multiple values".into() });
    }
    let want = parse_length(&h.value)
        .ok_or_else(|| Error::BadHeader { name: "Content-Length", detail: h.value.clone() })?;
    if rest.len() < want {
        return Err(Error::Truncated { have: rest.len(), want });
    }
    Ok(Bytes::copy_from_slice(&rest[..want]))
}

/// Returns (length of the head without the blank line, offset of the body).
fn find_head_end(input: &[u8]) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(nl) = memchr::memchr(b'\n', &input[from..]) {
        let i = from + nl;
        match input.get(i + 1) {
            Some(b'\n') => return Some((i, i + 2)),
            Some(b'\r') if input.get(i + 2) == Some(&b'\n') => return Some((i, i + 3)),
            _ => from = i + 1,
        }
    }
    None
}

/// The start line, and the request's SIP-Version when it is not exactly `SIP/2.0`.
fn parse_start_line(line: &str) -> Result<(StartLine, Option<String>), Error> {
    let bad = || Error::StartLine(line.chars().take(80).collect());
    if let Some(rest) = line.strip_prefix("SIP/2.0 ") {
        let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let status: u16 = code.parse().map_err(|_| bad())?;
        if !(100..=699).contains(&status) {
            return Err(bad());
        }
        return Ok((StartLine::Response { status, reason: reason.to_owned() }, None));
    }
    let mut parts = line.split(' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if method.is_empty() || !method.bytes().all(is_token_char) || uri.is_empty() {
        return Err(bad());
    }
    if !is_sip_version(version) {
        return Err(bad());
    }
    let version = (version != "SIP/2.0").then(|| version.to_owned());
    Ok((StartLine::Request { method: method.to_owned(), uri: uri.to_owned() }, version))
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &[u8] = b"INVITE sip:bob@biloxi.com SIP/2.0\r\n\
Via: SIP/2.0/UDP pc33.atlanta.com;branch=z9hG4bK776asdhds\r\n\
Max-Forwards: 70\r\n\
To: Bob <sip:bob@biloxi.com>\r\n\
From: Alice <sip:alice@atlanta.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.com\r\n\
CSeq: 314159 INVITE\r\n\
X-Custom-Thing:  keep me \r\n\
Contact: <sip:alice@pc33.atlanta.com>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\
\r\n\
v=0\n";

    #[test]
    fn round_trip_keeps_everything() {
        let m = parse(INVITE).expect("parse");
        assert_eq!(m.method(), Some("INVITE"));
        assert_eq!(m.header("x-custom-thing"), Some("keep me"));
        assert_eq!(&m.body[..], b"v=0\n");
        let again = parse(&m.to_bytes()).expect("reparse");
        assert_eq!(m, again);
        m.validate_request().expect("valid");
    }

    #[test]
    fn reason_phrase_is_kept_verbatim() {
        let m = parse(b"SIP/2.0 486 Busy  Here, really\r\nCall-ID: x\r\n\r\n").expect("parse");
        assert_eq!(m.reason(), Some("Busy  Here, really"));
        assert!(m.to_bytes().starts_with(b"SIP/2.0 486 Busy  Here, really\r\n"));
    }

    #[test]
    fn compact_forms_and_folding() {
        let m = parse(
            b"OPTIONS sip:a@b SIP/2.0\r\nv: SIP/2.0/UDP h;branch=z9hG4bKx\r\ni: abc\r\nf: <sip:x@y>\r\n ;tag=9\r\nt: <sip:a@b>\r\nCSeq: 1\r\n\tOPTIONS\r\nl: 0\r\n\r\n",
        )
        .expect("parse");
        assert_eq!(m.call_id().expect("cid"), "abc");
        assert_eq!(m.from().expect("from").tag(), Some("9"));
        assert_eq!(m.cseq().expect("cseq").method, "OPTIONS");
        let text = String::from_utf8(m.to_bytes()).expect("utf8");
        assert!(text.contains("\r\ni: abc\r\n"), "compact name kept: {text}");
    }

    #[test]
    fn extension_method_and_tel_uri() {
        let m = parse(b"NEWMETHOD tel:+12015550123 SIP/2.0\r\nCall-ID: 1\r\n\r\n").expect("parse");
        assert_eq!(m.method(), Some("NEWMETHOD"));
        assert_eq!(m.request_uri(), Some("tel:+12015550123"));
    }

    #[test]
    fn content_length_framing() {
        let extra = b"MESSAGE sip:a@b SIP/2.0\r\nContent-Length: 2\r\n\r\nhiEXTRA";
        assert_eq!(&parse(extra).expect("parse").body[..], b"hi");
        let short = b"MESSAGE sip:a@b SIP/2.0\r\nContent-Length: 20\r\n\r\nhi";
        assert_eq!(parse(short), Err(Error::Truncated { have: 2, want: 20 }));
        let bad = b"MESSAGE sip:a@b SIP/2.0\r\nContent-Length: x\r\n\r\n";
        assert!(matches!(parse(bad), Err(Error::BadHeader { name: "Content-Length", .. })));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for g in [
            &b""[..],
            b"\r\n\r\n",
            b"hello world",
            b"INVITE sip:a SIP/2.0",
            b"INVITE  SIP/2.0\r\n\r\n",
            b"SIP/2.0 99 Low\r\n\r\n",
            b"SIP/2.0 2000 OK\r\n\r\n",
            b"INVITE sip:a SIP/x\r\n\r\n",
            b"INVITE sip:a HTTP/1.1\r\n\r\n",
            b"INVITE sip:a SIP/2.0\r\nNoColon\r\n\r\n",
            b"INVITE sip:a SIP/2.0\r\n folded-first\r\n\r\n",
            b"\xff\xfe\r\n\r\n",
        ] {
            assert!(parse(g).is_err(), "{:?}", String::from_utf8_lossy(g));
        }
    }

    /// A CR inside a line, in each kind of header: quoted display names, parameters, URIs,
    /// free text, digest parameters, the request line and folded lines.
    #[test]
    fn bare_cr_is_refused_in_every_kind_of_header() {
        let base = "INVITE sip:bob@h SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\
From: \"Alice\" <sip:alice@h>;tag=1\r\nTo: <sip:bob@h>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\n\
Contact: <sip:alice@1.2.3.4>\r\nSubject: hi\r\nCall-Info: <http://x/a.png>;purpose=icon\r\n\
Proxy-Authorization: Digest username=\"alice\", realm=\"h\", nonce=\"n\", uri=\"sip:bob@h\", response=\"r\"\r\n\
X-Custom: a\r\n b\r\nContent-Length: 0\r\n\r\n";
        assert!(parse(base.as_bytes()).is_ok());
        for (from, to, header) in [
            ("\"Alice\"", "\"Ali\rce\"", "From"),
            ("\"Alice\"", "\"Alice\r\"", "From"),
            (";tag=1", ";tag=1\rX-Evil: 1", "From"),
            ("branch=z9hG4bK1", "branch=z9hG4\rbK1", "Via"),
            ("<sip:alice@1.2.3.4>", "<sip:alice\r@1.2.3.4>", "Contact"),
            ("Subject: hi", "Subject: h\ri", "Subject"),
            ("purpose=icon", "purpose=\ricon", "Call-Info"),
            ("username=\"alice\"", "username=\"al\rice\"", "Proxy-Authorization"),
            ("Call-ID: c1", "Call-ID: c\r1", "Call-ID"),
            (" b\r\n", " b\rX: y\r\n", "X-Custom"),
            ("sip:bob@h SIP", "sip:bob@h\r SIP", "Request-Line"),
        ] {
            let msg = base.replacen(from, to, 1);
            assert_ne!(msg, base, "{to:?} replaced something");
            assert_eq!(parse(msg.as_bytes()), Err(Error::LineBreak(header.into())), "{to:?}");
            // Still answerable with 400, without echoing the CR.
            let head = parse_head(msg.as_bytes()).expect("head");
            let answer = SipMessage::response_to(&head, 400, "x", Some("t")).to_bytes();
            assert!(!answer.windows(2).any(|w| w[0] == b'\r' && w[1] != b'\n'), "{to:?}");
            let err = Error::LineBreak(header.into());
            assert_eq!(err.status(), 400);
            assert_eq!(err.reason_phrase(), format!("Line Break Inside {header}"));
        }
        // A header name with a CR in it is never echoed into the reason.
        let odd = base.replacen("Subject: hi", "Sub\rject: hi", 1);
        assert_eq!(parse(odd.as_bytes()), Err(Error::HeaderLine("Sub\\rject: hi".into())));
    }

    #[test]
    fn missing_call_id_is_reported() {
        let m = parse(b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCSeq: 1 OPTIONS\r\n\r\n").expect("parse");
        assert_eq!(m.validate_request(), Err(Error::Missing("Call-ID")));
    }
}

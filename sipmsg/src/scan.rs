//! The dispatcher's cheap scan of a datagram: the start line, the top Via branch and the Call-ID,
//! without building a message. Also the routing tokens processors embed in what they send.
//!
//! Routing tokens (see `docs/architecture.md`): a processor names itself in
//! - the top Via `branch` of every request it sends: `z9hG4bKsa.<node>.<random>`, so responses
//!   come back to it;
//! - the user part of every Contact it puts in a dialog: `sip:sa.<node>.<random>@ip:port`, so
//!   in-dialog requests (whose Request-URI is that Contact) come back to it.

/// The routing keys of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan<'a> {
    /// Request method, or `None` for a response.
    pub method: Option<&'a str>,
    /// Request-URI of a request.
    pub request_uri: Option<&'a str>,
    /// Status code of a response.
    pub status: Option<u16>,
    /// `branch` of the first Via, if any.
    pub top_branch: Option<&'a str>,
    /// Call-ID, if any.
    pub call_id: Option<&'a str>,
    /// The To tag, looked for in ACKs only: an ACK for a non-2xx final carries the tag the
    /// processor that answered put there, and must reach that processor.
    pub to_tag: Option<&'a str>,
}

/// `User-Agent` fragments of known SIP scanners (sipvicious and friends), lower-case: the
/// default of processors' and dispatchers' `scanner_user_agents`.
pub const KNOWN_SCANNERS: [&str; 8] = [
    "friendly-scanner",
    "sipvicious",
    "sipcli",
    "sip-scan",
    "iwar",
    "sivus",
    "vaxsipuseragent",
    "siparmyknife",
];

/// Why a datagram is not SIP at all (it is dropped without an answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotSip {
    /// The first line is neither a request line nor a status line.
    StartLine,
    /// No blank line ends the head.
    Unterminated,
}

/// Scans the head of a message. Only the start line is validated; everything else is looked at
/// loosely (the processor parses fully and answers `400` if needed).
pub fn scan(buf: &[u8]) -> Result<Scan<'_>, NotSip> {
    let mut pos = 0;
    while buf[pos..].starts_with(b"\r\n") {
        pos += 2;
    }
    let buf = &buf[pos..];
    let head_end = memchr::memmem::find(buf, b"\r\n\r\n").ok_or(NotSip::Unterminated)?;
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| NotSip::StartLine)?;
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut out = Scan {
        method: None,
        request_uri: None,
        status: None,
        top_branch: None,
        call_id: None,
        to_tag: None,
    };
    if let Some(rest) = first.strip_prefix("SIP/2.0 ") {
        // Exactly three digits: `SIP/2.0 4294967301 …` is not a 429 (RFC 4475 §3.1.2.19).
        let code = rest
            .get(..3)
            .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
            .filter(|_| rest.as_bytes().get(3).is_none_or(|b| *b == b' '))
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or(NotSip::StartLine)?;
        if !(100..=699).contains(&code) {
            return Err(NotSip::StartLine);
        }
        out.status = Some(code);
    } else {
        // Any SIP version passes: the processor answers one it does not speak with `505`
        // (RFC 4475 §3.1.2.16) instead of the request vanishing here.
        let mut parts = first.split(' ');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(m), Some(uri), Some(version), None)
                if crate::lex::is_sip_version(version)
                    && !m.is_empty()
                    && m.bytes().all(crate::lex::is_token_char) =>
            {
                out.method = Some(m);
                out.request_uri = Some(uri);
            }
            _ => return Err(NotSip::StartLine),
        }
    }
    let mut seen_via = false;
    let mut want_to = out.method == Some("ACK");
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let name = name.trim_end();
        if !seen_via && (name.eq_ignore_ascii_case("via") || name.eq_ignore_ascii_case("v")) {
            seen_via = true;
            let first_via = value.split(',').next().unwrap_or_default();
            out.top_branch = find_branch(first_via);
        } else if out.call_id.is_none()
            && (name.eq_ignore_ascii_case("call-id") || name.eq_ignore_ascii_case("i"))
        {
            out.call_id = Some(value.trim());
        } else if want_to && (name.eq_ignore_ascii_case("to") || name.eq_ignore_ascii_case("t")) {
            want_to = false;
            out.to_tag = find_param(value, "tag");
        }
        if seen_via && out.call_id.is_some() && !want_to {
            break;
        }
    }
    Ok(out)
}

fn find_branch(via: &str) -> Option<&str> {
    find_param(via, "branch")
}

/// A `;name=value` parameter of a header value (after any `<...>`), loosely.
fn find_param<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    let params = value.rfind('>').map_or(value, |gt| &value[gt..]);
    params.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

const BRANCH_PREFIX: &str = "z9hG4bKsa.";
const USER_PREFIX: &str = "sa.";

/// A Via branch that routes responses back to processor `node`.
pub fn make_branch(node: &str, unique: &str) -> String {
    format!("{BRANCH_PREFIX}{node}.{unique}")
}

/// A Contact user part that routes in-dialog requests back to processor `node`.
pub fn make_contact_user(node: &str, unique: &str) -> String {
    format!("{USER_PREFIX}{node}.{unique}")
}

/// The processor named by a branch made with [`make_branch`].
pub fn branch_token(branch: &str) -> Option<&str> {
    branch.strip_prefix(BRANCH_PREFIX)?.split('.').next().filter(|n| !n.is_empty())
}

/// The processor named by a Request-URI whose user part was made with [`make_contact_user`].
pub fn uri_token(uri: &str) -> Option<&str> {
    let rest = uri.strip_prefix("sip:").or_else(|| uri.strip_prefix("sips:"))?;
    rest.strip_prefix(USER_PREFIX)?.split(['.', '@']).next().filter(|n| !n.is_empty())
}

/// A From/To tag that names processor `node`, so an ACK for a non-2xx final it sent (which has
/// no other token) finds it.
pub fn make_tag(node: &str, unique: &str) -> String {
    format!("{USER_PREFIX}{node}.{unique}")
}

/// The processor named by a tag made with [`make_tag`].
pub fn tag_token(tag: &str) -> Option<&str> {
    tag.strip_prefix(USER_PREFIX)?.split('.').next().filter(|n| !n.is_empty())
}

/// Whether a node id is usable as a routing token: 1–32 of `[A-Za-z0-9-]`.
pub fn is_valid_node_id(id: &str) -> bool {
    (1..=32).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_request_keys_with_compact_headers() {
        let s = scan(b"BYE sip:sa.p1.x7@127.0.0.2:5060 SIP/2.0\r\nv: SIP/2.0/UDP h;rport;branch=z9hG4bKabc, SIP/2.0/UDP g;branch=z9hG4bKdef\r\ni: call-1\r\n\r\n")
            .expect("scan");
        assert_eq!(s.method, Some("BYE"));
        assert_eq!(s.top_branch, Some("z9hG4bKabc"));
        assert_eq!(s.call_id, Some("call-1"));
        assert_eq!(uri_token(s.request_uri.expect("uri")), Some("p1"));
    }

    #[test]
    fn scans_response_and_branch_token() {
        let b = make_branch("proc-2", "Xy9");
        let msg = format!(
            "SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP 127.0.0.2;branch={b}\r\nCall-ID: c\r\n\r\n"
        );
        let s = scan(msg.as_bytes()).expect("scan");
        assert_eq!(s.status, Some(180));
        assert_eq!(s.top_branch.and_then(branch_token), Some("proc-2"));
    }

    #[test]
    fn rejects_non_sip() {
        assert_eq!(scan(b"GET / HTTP/1.1\r\n\r\n"), Err(NotSip::StartLine));
        assert_eq!(scan(b"\x00\x01\x02"), Err(NotSip::Unterminated));
        assert_eq!(scan(b"SIP/2.0 abc\r\n\r\n"), Err(NotSip::StartLine));
        assert_eq!(scan(b"INVITE sip:a SIP/2.0\r\nVia: x"), Err(NotSip::Unterminated));
        assert_eq!(scan(b"SIP/2.0 4294967301 big\r\n\r\n"), Err(NotSip::StartLine));
        assert_eq!(scan(b"SIP/2.0 20\r\n\r\n"), Err(NotSip::StartLine));
        let other_version = scan(b"OPTIONS sip:a SIP/7.0\r\ni: x\r\n\r\n").expect("scan");
        assert_eq!(other_version.method, Some("OPTIONS"));
    }

    #[test]
    fn ack_to_tag_is_scanned_only_for_acks() {
        let ack = format!(
            "ACK sip:bob@h SIP/2.0\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK1\r\nCall-ID: c\r\nt: \"B\" <sip:bob@h;x=1>;tag={}\r\n\r\n",
            make_tag("p3", "q1")
        );
        let s = scan(ack.as_bytes()).expect("scan");
        assert_eq!(s.to_tag.and_then(tag_token), Some("p3"));
        let inv = scan(b"INVITE sip:bob@h SIP/2.0\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK1\r\nTo: <sip:b@h>;tag=x\r\nCall-ID: c\r\n\r\n").expect("scan");
        assert_eq!(inv.to_tag, None);
        assert_eq!(tag_token("1928301774"), None);
    }

    #[test]
    fn tokens_and_node_ids() {
        assert_eq!(uri_token("sip:alice@host"), None);
        assert_eq!(uri_token(&format!("sip:{}@h", make_contact_user("n1", "q"))), Some("n1"));
        assert_eq!(branch_token("z9hG4bK123"), None);
        assert!(is_valid_node_id("proc-1"));
        assert!(!is_valid_node_id("a.b"));
        assert!(!is_valid_node_id(""));
    }
}

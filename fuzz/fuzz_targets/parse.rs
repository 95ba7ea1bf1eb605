//! `sipmsg::parse` and `sipmsg::parse::parse_head` on arbitrary bytes.
//!
//! Checks, besides "never panics":
//! - round trip: when `parse` accepts the input, `parse(to_bytes(m))` accepts it too and gives
//!   back `m` (with a `Content-Length` header appended when `m` had none: `to_bytes` always
//!   writes one; the same property as `assert_round_trip` in `sipmsg/tests/torture.rs`);
//! - a message `parse` accepts is also accepted by `parse_head`, with the same start line and
//!   headers;
//! - the `400` built from whatever `parse_head` returns (as the dispatcher and processor answer
//!   an unframeable request) parses and carries no bare CR (no header injection by echo).
//!
//! The validators and the typed accessors run on every parsed message, so the URI, name-addr,
//! Via and CSeq parsers see fuzzed input too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sipmsg::SipMessage;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = sipmsg::parse(data) {
        exercise(&m);

        let mut expected = m.clone();
        if m.header("content-length").is_none() {
            expected.push_header("Content-Length", m.body.len().to_string());
        }
        let bytes = m.to_bytes();
        let again = match sipmsg::parse(&bytes) {
            Ok(again) => again,
            Err(e) => panic!("reparse failed: {e}\n{:?}", String::from_utf8_lossy(&bytes)),
        };
        assert_eq!(again, expected, "round trip");

        let head = sipmsg::parse::parse_head(data).expect("parse accepted it, parse_head must");
        assert_eq!(head.start, m.start);
        assert_eq!(head.headers, m.headers);
    }
    if let Ok(head) = sipmsg::parse::parse_head(data) {
        exercise(&head);
        let answer = SipMessage::response_to(&head, 400, "Bad Request", Some("fuzz")).to_bytes();
        let bare_cr = answer.windows(2).any(|w| w[0] == b'\r' && w[1] != b'\n')
            || answer.last() == Some(&b'\r');
        assert!(!bare_cr, "bare CR echoed: {:?}", String::from_utf8_lossy(&answer));
        if let Err(e) = sipmsg::parse(&answer) {
            panic!("our own 400 does not parse: {e}\n{:?}", String::from_utf8_lossy(&answer));
        }
    }
});

/// Runs every validator and typed accessor; their results are not checked (only "no panic"),
/// but what they return is formatted, so the Display impls run too.
fn exercise(m: &SipMessage) {
    let _ = m.validate_request();
    let _ = m.validate_response();
    let _ = m.call_id();
    let _ = m.cseq().map(|c| c.to_string());
    let _ = m.from().map(|n| (n.to_string(), n.tag().map(str::len)));
    let _ = m.to().map(|n| n.to_string());
    let _ = m.top_via().map(|v| (v.to_string(), v.branch().map(str::len)));
    let _ = m.vias().map(|v| v.len());
    let _ = m.contacts().map(|cs| cs.iter().map(|c| c.to_string()).count());
    let _ = m.expires();
    let _ = m.version();
    if let Some(uri) = m.request_uri() {
        let _ = sipmsg::Uri::parse(uri).map(|u| u.to_string());
    }
}

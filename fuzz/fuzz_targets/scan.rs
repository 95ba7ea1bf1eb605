//! `sipmsg::scan::scan`, the dispatcher's routing-key scan of every datagram and framed stream
//! message, and the token extractors `dispatcher/src/route.rs` applies to its result
//! (`uri_token`, `tag_token`, `branch_token`), on arbitrary bytes.
//!
//! Checks, besides "never panics": an accepted message is exactly one of a request (method and
//! Request-URI, no status) or a response (status 100–699, no method); a To tag is only looked
//! for in ACKs; every token found is a substring of what it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sipmsg::scan::{branch_token, is_valid_node_id, scan, tag_token, uri_token};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = scan(data) else { return };
    match (s.method, s.status) {
        (Some(m), None) => {
            assert!(!m.is_empty());
            assert!(s.request_uri.is_some());
            if m != "ACK" {
                assert_eq!(s.to_tag, None);
            }
        }
        (None, Some(code)) => {
            assert!((100..=699).contains(&code));
            assert_eq!(s.request_uri, None);
            assert_eq!(s.to_tag, None);
        }
        other => panic!("neither request nor response: {other:?}"),
    }
    // What route::pick_draining looks at.
    let tokens = [
        s.request_uri.and_then(uri_token).zip(s.request_uri),
        s.to_tag.and_then(tag_token).zip(s.to_tag),
        s.top_branch.and_then(branch_token).zip(s.top_branch),
    ];
    for (token, from) in tokens.into_iter().flatten() {
        assert!(!token.is_empty() && from.contains(token));
        let _ = is_valid_node_id(token);
    }
    let _ = s.call_id.map(str::len);
});

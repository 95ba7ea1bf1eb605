//! `sipmsg::digest::Credentials::parse` (Authorization / Proxy-Authorization values) and
//! `sipmsg::Uri::parse` on arbitrary UTF-8.
//!
//! Checks, besides "never panics": accepted credentials have the fields the parser promises
//! (username, nonce and response non-empty), and `algorithm()` answers; an accepted URI
//! formats (`Display`) without panicking and its accessors answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sipmsg::digest::Credentials;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(c) = Credentials::parse(s) {
        assert!(!c.username.is_empty() && !c.nonce.is_empty() && !c.response.is_empty());
        let _ = c.algorithm();
    }
    if let Ok(u) = sipmsg::Uri::parse(s) {
        let _ = u.to_string();
        let _ = (u.user_name(), u.param("transport"), u.is_sip());
    }
});

//! The lexical rules of RFC 3261 §25 that every part of the parser shares: token characters,
//! linear whitespace, the SIP-Version and Content-Length grammars. No module of this crate is
//! below this one.

/// RFC 3261 §25.1 `token` characters.
pub(crate) fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

/// Trims SIP linear whitespace (SP and HTAB) from both ends. Unicode whitespace is content: a
/// header value may legitimately start or end with, say, a no-break space.
pub(crate) fn trim_lws(s: &str) -> &str {
    s.trim_matches([' ', '\t'])
}

/// `SIP-Version = "SIP" "/" 1*DIGIT "." 1*DIGIT`, "SIP" in any case (RFC 3261 §7.1).
pub(crate) fn is_sip_version(v: &str) -> bool {
    let Some((name, number)) = v.split_once('/') else { return false };
    let Some((major, minor)) = number.split_once('.') else { return false };
    name.eq_ignore_ascii_case("SIP")
        && [major, minor].iter().all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// A Content-Length value: `1*DIGIT` (no sign, unlike `str::parse`) that fits a `usize`.
pub(crate) fn parse_length(value: &str) -> Option<usize> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

//! The SIP methods this stack knows by name (RFC 3261 and the common extensions), as labels
//! with a fixed set of values: what counters and logs may key on without a hostile method
//! growing the set.

/// RFC 3261 methods and the extensions phones send (RFC 3262, 3265, 3311, 3428, 3515, 3903,
/// 6086).
pub const KNOWN: [&str; 14] = [
    "INVITE",
    "ACK",
    "BYE",
    "CANCEL",
    "REGISTER",
    "OPTIONS",
    "PRACK",
    "SUBSCRIBE",
    "NOTIFY",
    "PUBLISH",
    "INFO",
    "REFER",
    "MESSAGE",
    "UPDATE",
];

/// `method` when it is one of [`KNOWN`] (case-sensitive, RFC 3261 §7.1), else `other`.
pub fn label(method: &str) -> &'static str {
    KNOWN.iter().find(|m| **m == method).copied().unwrap_or("other")
}

/// The class of a status code, `1xx` … `6xx`, else `other`.
pub fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        6 => "6xx",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_methods_and_statuses_fall_into_fixed_labels() {
        assert_eq!(label("INVITE"), "INVITE");
        assert_eq!(label("invite"), "other", "methods are case-sensitive");
        assert_eq!(label(&"X".repeat(10_000)), "other");
        assert_eq!(label("INVITE\r\nX"), "other");
        assert_eq!(status_class(183), "1xx");
        assert_eq!(status_class(699), "6xx");
        assert_eq!(status_class(0), "other");
        assert_eq!(status_class(999), "other");
    }
}

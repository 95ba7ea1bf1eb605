//! SIP and SIPS URIs (RFC 3261 §19.1), kept close to the text: parameters keep their order and
//! their original spelling, so rewriting one part of a URI leaves the rest as the phone wrote it.

use std::fmt;

use crate::error::Error;
use crate::lex::trim_lws;

/// A parsed URI. `sip:`/`sips:` URIs are split into parts; other schemes (`tel:` …) keep the
/// text after the scheme in `host` and have no user or port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    /// Scheme, lower-case (`sip`, `sips`, `tel`, …).
    pub scheme: String,
    /// User part (with any `:password`), if present, as written.
    pub user: Option<String>,
    /// Host: a name, an IPv4 address or a bracketed IPv6 reference.
    pub host: String,
    /// Port, if given.
    pub port: Option<u16>,
    /// URI parameters in order: `;name` or `;name=value`.
    pub params: Vec<(String, Option<String>)>,
    /// Header part after `?`, as written, without the `?`.
    pub headers: Option<String>,
}

impl Uri {
    /// Parses a URI. The scheme must be RFC 3986 syntax; `sip:`/`sips:` URIs are split into
    /// parts (the user part ends at the last `@`, since `?`, `;` and `,` are legal in it, RFC 3261
    /// §25.1 and RFC 4475 §3.1.1.2) and their host must be a name, an IPv4 address or a
    /// bracketed IPv6 reference (RFC 5118 §4.2). Escapes are kept as written, never decoded.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let s = trim_lws(s);
        let bad = || Error::BadUri(s.to_owned());
        let (scheme, rest) = s.split_once(':').ok_or_else(bad)?;
        if !scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            || !scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
            || !rest.chars().all(is_uri_char)
        {
            return Err(bad());
        }
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "sip" && scheme != "sips" {
            if rest.is_empty() {
                return Err(bad());
            }
            return Ok(Uri {
                scheme,
                user: None,
                host: rest.to_owned(),
                port: None,
                params: Vec::new(),
                headers: None,
            });
        }
        let (user, after) = match rest.rfind('@') {
            Some(at) => (Some(rest[..at].to_owned()), &rest[at + 1..]),
            None => (None, rest),
        };
        if user.as_deref() == Some("") {
            return Err(bad());
        }
        let (hostpart, headers) = match after.split_once('?') {
            Some((h, hdrs)) => (h, Some(hdrs.to_owned())),
            None => (after, None),
        };
        let mut parts = hostpart.split(';');
        let hostport = parts.next().unwrap_or_default();
        let params = parts
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
                None => (p.to_owned(), None),
            })
            .collect();
        let (host, port) = split_host_port(hostport).ok_or_else(bad)?;
        Ok(Uri { scheme, user, host, port, params, headers })
    }

    /// A `sip:` URI.
    pub fn sip(user: Option<&str>, host: &str, port: Option<u16>) -> Self {
        Uri {
            scheme: "sip".into(),
            user: user.map(str::to_owned),
            host: host.to_owned(),
            port,
            params: Vec::new(),
            headers: None,
        }
    }

    /// The user part without any `:password`.
    pub fn user_name(&self) -> Option<&str> {
        self.user.as_deref().map(|u| u.split(':').next().unwrap_or(u))
    }

    /// Value of a URI parameter (name compared case-insensitively); `Some("")` for a bare flag.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_deref().unwrap_or(""))
    }

    /// Sets or adds a parameter.
    pub fn set_param(&mut self, name: &str, value: Option<&str>) {
        match self.params.iter_mut().find(|(k, _)| k.eq_ignore_ascii_case(name)) {
            Some(p) => p.1 = value.map(str::to_owned),
            None => self.params.push((name.to_owned(), value.map(str::to_owned))),
        }
    }

    /// Whether this is a `sip:` or `sips:` URI.
    pub fn is_sip(&self) -> bool {
        self.scheme == "sip" || self.scheme == "sips"
    }
}

/// `ip` as the host of a URI: IPv6 in brackets (RFC 3261 §25.1 `IPv6reference`), IPv4 as
/// it is.
pub fn host_of(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Splits `host[:port]`. The host is a bracketed IPv6 reference (kept with its brackets; what is
/// inside is only checked for its alphabet, so RFC 3261's three-colon form is tolerated as RFC
/// 5118 §4.10 asks), or a name or IPv4 address; an unbracketed host with a colon is an IPv6
/// address missing its brackets and is refused (RFC 5118 §4.2). The port is `1*DIGIT`.
pub fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']')?;
        let inner = &rest[..end];
        let ok = |b: u8| b.is_ascii_hexdigit() || b":.".contains(&b);
        let (addr, zone) = inner.split_once('%').unwrap_or((inner, ""));
        if !addr.contains(':')
            || !addr.bytes().all(ok)
            || !zone.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b))
        {
            return None;
        }
        let port = match &rest[end + 1..] {
            "" => None,
            after => Some(after.strip_prefix(':')?),
        };
        (&s[..end + 2], port)
    } else {
        let (host, port) = match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        };
        let ok = |b: u8| b.is_ascii_alphanumeric() || b"-._".contains(&b);
        if host.is_empty() || !host.bytes().all(ok) {
            return None;
        }
        (host, port)
    };
    let port = match port {
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => Some(p.parse().ok()?),
        Some(_) => return None,
        None => None,
    };
    Some((host.to_owned(), port))
}

/// Characters a URI may contain as text: no whitespace or controls, and none of the delimiters
/// that end a URI in a header (`<`, `>`, `"`). Non-ASCII is tolerated.
fn is_uri_char(c: char) -> bool {
    !c.is_ascii_control() && !" <>\"{}|\\^`".contains(c)
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.scheme)?;
        if !self.is_sip() {
            return f.write_str(&self.host);
        }
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        f.write_str(&self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        for (k, v) in &self.params {
            match v {
                Some(v) => write!(f, ";{k}={v}")?,
                None => write!(f, ";{k}")?,
            }
        }
        if let Some(h) = &self.headers {
            write!(f, "?{h}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ip_hosts_get_brackets_only_for_ipv6_and_parse_back() {
        let v6: std::net::IpAddr = "2001:db8::7".parse().expect("v6");
        let v4: std::net::IpAddr = "192.0.2.7".parse().expect("v4");
        assert_eq!(host_of(v6), "[2001:db8::7]");
        assert_eq!(host_of(v4), "192.0.2.7");
        let uri = Uri::sip(Some("alice"), &host_of(v6), Some(5060));
        assert_eq!(uri.to_string(), "sip:alice@[2001:db8::7]:5060");
        let back = Uri::parse(&uri.to_string()).expect("parses");
        assert_eq!((back.host.as_str(), back.port), ("[2001:db8::7]", Some(5060)));
    }

    use super::*;

    #[test]
    fn parses_and_round_trips_sip_uri() {
        let s = "sip:alice:secret@Example.COM:5070;transport=udp;lr?subject=x";
        let u = Uri::parse(s).expect("parse");
        assert_eq!(u.user.as_deref(), Some("alice:secret"));
        assert_eq!(u.user_name(), Some("alice"));
        assert_eq!(u.host, "Example.COM");
        assert_eq!(u.port, Some(5070));
        assert_eq!(u.param("lr"), Some(""));
        assert_eq!(u.param("TRANSPORT"), Some("udp"));
        assert_eq!(u.to_string(), s);
    }

    #[test]
    fn parses_ipv6_and_tel() {
        let u = Uri::parse("sip:[2001:db8::10]:5060").expect("v6");
        assert_eq!(u.host, "[2001:db8::10]");
        assert_eq!(u.port, Some(5060));
        let t = Uri::parse("tel:+1-201-555-0123").expect("tel");
        assert_eq!(t.scheme, "tel");
        assert_eq!(t.to_string(), "tel:+1-201-555-0123");
    }

    #[test]
    fn user_part_may_hold_question_marks_and_semicolons() {
        let u = Uri::parse("sip:a?b;c=d@host;lr?h=v").expect("parse");
        assert_eq!(u.user.as_deref(), Some("a?b;c=d"));
        assert_eq!(
            (u.host.as_str(), u.param("lr"), u.headers.as_deref()),
            ("host", Some(""), Some("h=v"))
        );
    }

    #[test]
    fn ipv6_references() {
        let three_colons = Uri::parse("sip:u@[2001:db8:::192.0.2.1]").expect("tolerated");
        assert_eq!(three_colons.host, "[2001:db8:::192.0.2.1]");
        let zone = Uri::parse("sip:[fe80::1%25eth0]:5060").expect("zone");
        assert_eq!(zone.port, Some(5060));
        for bad in ["sip:2001:db8::10", "sip:[example.com]", "sip:[::1]x", "sip:[::1]:", "sip:h:+5"]
        {
            assert!(Uri::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "sip:",
            "nocolon",
            "sip:@host",
            "sip:a@host:99999",
            "sip:[::1",
            "<sip:a@b>",
            "sip:a@b c",
            "sip:a@exa<mple.com",
            "1sip:a@b",
        ] {
            assert!(Uri::parse(s).is_err(), "{s}");
        }
    }
}

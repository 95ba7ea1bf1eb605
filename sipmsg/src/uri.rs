//! SIP and SIPS URIs (RFC 3261 §19.1), kept close to the text: parameters keep their order and
//! their original spelling, so rewriting one part of a URI leaves the rest as the phone wrote it.

use std::fmt;

use crate::error::Error;

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
    /// Parses a URI.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        let bad = || Error::BadUri(s.to_owned());
        let (scheme, rest) = s.split_once(':').ok_or_else(bad)?;
        if scheme.is_empty()
            || !scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
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
        let (rest, headers) = match rest.split_once('?') {
            Some((r, h)) => (r, Some(h.to_owned())),
            None => (rest, None),
        };
        // The user part may contain ';' (RFC 3261 allows it in user), so split at the last '@'.
        let (user, hostpart) = match rest.rfind('@') {
            Some(at) => (Some(rest[..at].to_owned()), &rest[at + 1..]),
            None => (None, rest),
        };
        if user.as_deref() == Some("") {
            return Err(bad());
        }
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
        if host.is_empty() {
            return Err(bad());
        }
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

/// Splits `host[:port]`, handling bracketed IPv6 references.
pub fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']')?;
        let host = format!("[{}]", &rest[..end]);
        let after = &rest[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((host, port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Some((h.to_owned(), Some(p.parse().ok()?))),
        None => Some((s.to_owned(), None)),
    }
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
    fn rejects_garbage() {
        for s in ["", "sip:", "nocolon", "sip:@host", "sip:a@host:99999", "sip:[::1"] {
            assert!(Uri::parse(s).is_err(), "{s}");
        }
    }
}

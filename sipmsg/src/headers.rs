//! Typed views of the headers the cluster reads: name-addr headers (From, To, Contact, Route),
//! Via and CSeq, plus list splitting that respects quotes and angle brackets.

use std::fmt;

use crate::error::Error;
use crate::lex::{is_token_char, trim_lws};
use crate::uri::{Uri, split_host_port};

/// Generic parameters of a header (`;name=value`), in order.
pub type Params = Vec<(String, Option<String>)>;

/// Splits a header value on the commas that separate list elements (RFC 3261 §7.3.1), ignoring
/// commas inside quoted strings and `<...>`.
pub fn split_list(value: &str) -> impl Iterator<Item = &str> {
    let (pieces, _) = split_outside_quotes(value, ',', true);
    pieces.into_iter().map(str::trim).filter(|p| !p.is_empty())
}

/// Splits `s` on `sep` where it stands outside quoted strings (a quoted-pair `\"` does not end
/// one) and, with `brackets`, outside `<...>`; also says whether a quoted string was left open.
fn split_outside_quotes(s: &str, sep: char, brackets: bool) -> (Vec<&str>, bool) {
    let mut pieces = Vec::new();
    let (mut quoted, mut angle, mut escaped) = (false, false, false);
    let mut start = 0;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '<' if brackets && !quoted => angle = true,
            '>' if brackets && !quoted => angle = false,
            c if c == sep && !quoted && !angle => {
                pieces.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    pieces.push(&s[start..]);
    (pieces, quoted)
}

/// Parses `;a=b;c` (the text after the first `;`) into parameters, quoted values kept with their
/// quotes. Whitespace around `;` and `=` is dropped (RFC 3261 §25.1 `SEMI`, `EQUAL`). An empty
/// parameter (`;;`, a trailing `;`), a name that is not a token, an empty value or an unterminated
/// quoted value is an error (RFC 4475 §3.1.2.1).
fn parse_params(s: &str) -> Result<Params, String> {
    let mut out = Vec::new();
    for piece in split_unquoted(s, ';')? {
        let piece = trim_lws(piece);
        let (name, value) = match piece.split_once('=') {
            Some((k, v)) => (trim_lws(k), Some(trim_lws(v))),
            None => (piece, None),
        };
        if name.is_empty() || !name.bytes().all(is_token_char) {
            return Err(format!("bad parameter {piece:?}"));
        }
        if value.is_some_and(str::is_empty) {
            return Err(format!("parameter {name} has an empty value"));
        }
        out.push((name.to_owned(), value.map(str::to_owned)));
    }
    Ok(out)
}

/// Splits on `sep` outside quoted strings, honouring quoted-pairs (`\"` does not end a quote).
fn split_unquoted(s: &str, sep: char) -> Result<Vec<&str>, String> {
    match split_outside_quotes(s, sep, false) {
        (_, true) => Err(format!("unterminated quoted string in {s:?}")),
        (pieces, false) => Ok(pieces),
    }
}

/// RFC 3261 `display-name = *(token LWS) / quoted-string`. Non-ASCII is tolerated in unquoted
/// names (phones send it); ASCII separators such as `,` are not (RFC 4475 §3.1.2.15).
fn check_display_name(d: &str) -> Result<(), String> {
    if d.is_empty() {
        return Ok(());
    }
    if let Some(inner) = d.strip_prefix('"') {
        // One quoted-string and nothing after it.
        let mut escaped = false;
        for (i, c) in inner.char_indices() {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                return if i + 1 == inner.len() {
                    Ok(())
                } else {
                    Err(format!("text after the quoted display name {d:?}"))
                };
            }
        }
        return Err(format!("unterminated quoted display name {d:?}"));
    }
    let ok = |c: char| !c.is_ascii() || c == ' ' || c == '\t' || is_token_char(c as u8);
    if d.chars().all(ok) { Ok(()) } else { Err(format!("display name {d:?} needs quotes")) }
}

fn find_param<'a>(params: &'a Params, name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_deref().unwrap_or(""))
}

fn write_params(f: &mut fmt::Formatter<'_>, params: &Params) -> fmt::Result {
    for (k, v) in params {
        match v {
            Some(v) => write!(f, ";{k}={v}")?,
            None => write!(f, ";{k}")?,
        }
    }
    Ok(())
}

/// A name-addr or addr-spec with header parameters: From, To, Contact, Route, Record-Route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameAddr {
    /// Display name as written (quotes included), if any.
    pub display: Option<String>,
    /// The URI; for a `*` Contact the scheme is empty.
    pub uri: Uri,
    /// Header parameters (`tag`, `expires`, `q`, …) in order.
    pub params: Params,
}

impl NameAddr {
    /// Parses a single element (already split from a list): `name-addr` or `addr-spec` with
    /// header parameters (RFC 3261 §20.10). Quoted-pairs in the display name are honoured; no
    /// whitespace is allowed just inside `<>` (RFC 4475 §3.1.2.14); an `addr-spec` with `?` or
    /// `,` would have needed `<>` (RFC 3261 §20.10, RFC 4475 §3.1.2.13).
    pub fn parse(s: &str) -> Result<Self, Error> {
        let s = trim_lws(s);
        let bad = |detail: String| Error::BadUri(detail);
        let (mut quoted, mut escaped) = (false, false);
        let mut lt = None;
        for (i, c) in s.char_indices() {
            if escaped {
                escaped = false;
                continue;
            }
            match c {
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '<' if !quoted => {
                    lt = Some(i);
                    break;
                }
                _ => {}
            }
        }
        if let Some(lt) = lt {
            let gt = s[lt..].find('>').map(|g| g + lt).ok_or_else(|| bad(s.to_owned()))?;
            let inner = &s[lt + 1..gt];
            if inner.starts_with([' ', '\t']) || inner.ends_with([' ', '\t']) {
                return Err(bad(format!("whitespace inside <> in {s:?}")));
            }
            let display = trim_lws(&s[..lt]);
            check_display_name(display).map_err(bad)?;
            let after = trim_lws(&s[gt + 1..]);
            let params = match after.strip_prefix(';') {
                Some(p) => parse_params(p).map_err(bad)?,
                None if after.is_empty() => Vec::new(),
                None => return Err(bad(format!("text after > in {s:?}"))),
            };
            Ok(NameAddr {
                display: (!display.is_empty()).then(|| display.to_owned()),
                uri: Uri::parse(inner)?,
                params,
            })
        } else {
            if quoted {
                return Err(bad(format!("unterminated quoted string in {s:?}")));
            }
            // addr-spec: parameters after the URI belong to the header (RFC 3261 §20).
            let (uri, params) = match s.find(';') {
                Some(i) => (&s[..i], parse_params(&s[i + 1..]).map_err(bad)?),
                None => (s, Vec::new()),
            };
            if uri.contains(['?', ',']) {
                return Err(bad(format!("{uri:?} must be enclosed in <>")));
            }
            Ok(NameAddr { display: None, uri: Uri::parse(uri)?, params })
        }
    }

    /// A name-addr around a URI.
    pub fn new(uri: Uri) -> Self {
        NameAddr { display: None, uri, params: Vec::new() }
    }

    /// The `*` Contact of a REGISTER removing every binding.
    pub fn star() -> Self {
        NameAddr {
            display: None,
            uri: Uri {
                scheme: String::new(),
                user: None,
                host: "*".into(),
                port: None,
                params: Vec::new(),
                headers: None,
            },
            params: Vec::new(),
        }
    }

    /// Whether this is the `*` Contact.
    pub fn is_star(&self) -> bool {
        self.uri.scheme.is_empty() && self.uri.host == "*"
    }

    /// The `tag` parameter.
    pub fn tag(&self) -> Option<&str> {
        find_param(&self.params, "tag")
    }

    /// A header parameter; `Some("")` for a flag.
    pub fn param(&self, name: &str) -> Option<&str> {
        find_param(&self.params, name)
    }

    /// Sets or adds a header parameter.
    pub fn set_param(&mut self, name: &str, value: Option<&str>) {
        match self.params.iter_mut().find(|(k, _)| k.eq_ignore_ascii_case(name)) {
            Some(p) => p.1 = value.map(str::to_owned),
            None => self.params.push((name.to_owned(), value.map(str::to_owned))),
        }
    }
}

impl fmt::Display for NameAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_star() {
            return f.write_str("*");
        }
        if let Some(d) = &self.display {
            write!(f, "{d} ")?;
        }
        write!(f, "<{}>", self.uri)?;
        write_params(f, &self.params)
    }
}

/// One Via element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    /// Transport token, upper-case (`UDP`, `TCP`, `TLS`, …).
    pub transport: String,
    /// sent-by host.
    pub host: String,
    /// sent-by port.
    pub port: Option<u16>,
    /// Parameters in order (`branch`, `received`, `rport`, …).
    pub params: Params,
}

impl Via {
    /// Parses one Via element, tolerating whitespace around the protocol slashes.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let bad = |d: &str| Error::BadHeader { name: "Via", detail: format!("{d}: {s}") };
        let s = trim_lws(s);
        let mut rest = s;
        let mut proto = Vec::with_capacity(3);
        for i in 0..3 {
            rest = rest.trim_start();
            let end = if i < 2 {
                rest.find('/').ok_or_else(|| bad("protocol"))?
            } else {
                rest.find(|c: char| c.is_ascii_whitespace()).ok_or_else(|| bad("sent-by"))?
            };
            proto.push(rest[..end].trim());
            rest = &rest[end + usize::from(i < 2)..];
        }
        if !proto[0].eq_ignore_ascii_case("SIP") || proto[1] != "2.0" {
            return Err(bad("protocol"));
        }
        let rest = rest.trim_start();
        let (sent_by, params) = match rest.find(';') {
            Some(i) => (&rest[..i], parse_params(&rest[i + 1..]).map_err(|d| bad(&d))?),
            None => (rest, Vec::new()),
        };
        let sent_by: String = sent_by.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let (host, port) = split_host_port(&sent_by).ok_or_else(|| bad("sent-by"))?;
        if host.is_empty() {
            return Err(bad("sent-by"));
        }
        Ok(Via { transport: proto[2].to_ascii_uppercase(), host, port, params })
    }

    /// The `branch` parameter.
    pub fn branch(&self) -> Option<&str> {
        find_param(&self.params, "branch")
    }

    /// A parameter; `Some("")` for a flag.
    pub fn param(&self, name: &str) -> Option<&str> {
        find_param(&self.params, name)
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIP/2.0/{} {}", self.transport, self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        write_params(f, &self.params)
    }
}

/// The CSeq header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CSeq {
    /// Sequence number.
    pub seq: u32,
    /// Method.
    pub method: String,
}

impl CSeq {
    /// Parses `number method`.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let bad = || Error::BadHeader { name: "CSeq", detail: s.to_owned() };
        let mut it = s.split_ascii_whitespace();
        let seq = it.next().and_then(|n| n.parse().ok()).ok_or_else(bad)?;
        let method = it.next().ok_or_else(bad)?.to_owned();
        if it.next().is_some() {
            return Err(bad());
        }
        Ok(CSeq { seq, method })
    }
}

impl fmt::Display for CSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.seq, self.method)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_list_respects_quotes_and_brackets() {
        let v = r#""Doe, John" <sip:j@x;a=1,2>;q=0.5, sip:b@y , <sip:c@z>"#;
        let parts: Vec<_> = split_list(v).collect();
        assert_eq!(parts, vec![r#""Doe, John" <sip:j@x;a=1,2>;q=0.5"#, "sip:b@y", "<sip:c@z>"]);
    }

    #[test]
    fn name_addr_forms() {
        let n =
            NameAddr::parse(r#""Bob" <sip:bob@biloxi.com;transport=udp>;tag=a6c85cf"#).expect("p");
        assert_eq!(n.display.as_deref(), Some("\"Bob\""));
        assert_eq!(n.uri.param("transport"), Some("udp"));
        assert_eq!(n.tag(), Some("a6c85cf"));
        let a = NameAddr::parse("sip:bob@biloxi.com;tag=1;expires=60").expect("addr-spec");
        assert_eq!(a.tag(), Some("1"));
        assert_eq!(a.param("expires"), Some("60"));
        assert!(a.uri.params.is_empty());
        assert_eq!(a.to_string(), "<sip:bob@biloxi.com>;tag=1;expires=60");
    }

    #[test]
    fn name_addr_quoted_pairs_and_strictness() {
        let n = NameAddr::parse(r#""a \"b\" <c>" <sip:x@y>;tag=1"#).expect("quoted-pair");
        assert_eq!(n.display.as_deref(), Some(r#""a \"b\" <c>""#));
        assert_eq!(n.uri.to_string(), "sip:x@y");
        assert_eq!(n.param("p"), None);
        let q = NameAddr::parse(r#"<sip:x@y>;p="a;b\"c""#).expect("quoted value");
        assert_eq!(q.param("p"), Some(r#""a;b\"c""#));
        for bad in [
            r#""open <sip:x@y>"#,
            "Doe, John <sip:x@y>",
            "< sip:x@y>",
            "<sip:x@y>;;tag=1",
            "<sip:x@y>;",
            "<sip:x@y>;tag=",
            "<sip:x@y> junk",
            "sip:x@y?Route=a",
            r#""a" b <sip:x@y>"#,
        ] {
            assert!(NameAddr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn via_with_spaces_and_params() {
        let v =
            Via::parse("SIP / 2.0 / UDP 192.0.2.1 : 5060 ;branch=z9hG4bK776;rport").expect("via");
        assert_eq!(v.transport, "UDP");
        assert_eq!(v.host, "192.0.2.1");
        assert_eq!(v.port, Some(5060));
        assert_eq!(v.branch(), Some("z9hG4bK776"));
        assert_eq!(v.param("rport"), Some(""));
        assert!(Via::parse("SIP/3.0/UDP h").is_err());
        assert!(Via::parse("SIP/2.0/UDP h;;branch=z9hG4bK1").is_err());
        assert!(Via::parse("garbage").is_err());
    }

    #[test]
    fn cseq_parse() {
        assert_eq!(
            CSeq::parse("  42   INVITE ").expect("c"),
            CSeq { seq: 42, method: "INVITE".into() }
        );
        assert!(CSeq::parse("x INVITE").is_err());
        assert!(CSeq::parse("1").is_err());
    }
}

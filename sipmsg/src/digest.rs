//! HTTP digest as used by SIP (RFC 3261 §22, RFC 7616 computation, RFC 8760 SHA-256).
//!
//! Parsing of `Authorization`/`Proxy-Authorization` credentials and the hash computations shared
//! by the processor (which builds challenges) and billing (which checks responses against a
//! stored HA1, never a password).

use md5::Md5;
use sha2::{Digest as _, Sha256};

use crate::error::Error;

/// Digest hash algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    /// MD5, the default when `algorithm` is absent.
    #[default]
    Md5,
    /// SHA-256 (RFC 8760).
    Sha256,
}

impl Algorithm {
    /// Parses an `algorithm=` value; `-sess` variants are not supported.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_uppercase().as_str() {
            "MD5" => Some(Algorithm::Md5),
            "SHA-256" => Some(Algorithm::Sha256),
            _ => None,
        }
    }

    /// The token used in `algorithm=`.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
        }
    }

    /// Lower-case hex hash of `data`.
    pub fn hex(self, data: &[u8]) -> String {
        match self {
            Algorithm::Md5 => to_hex(&Md5::digest(data)),
            Algorithm::Sha256 => to_hex(&Sha256::digest(data)),
        }
    }
}

fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// `HA1 = H(username:realm:password)`.
pub fn ha1(alg: Algorithm, username: &str, realm: &str, password: &str) -> String {
    alg.hex(format!("{username}:{realm}:{password}").as_bytes())
}

/// The inputs of a digest `response` besides HA1.
#[derive(Debug, Clone, Copy)]
pub struct ResponseInput<'a> {
    /// SIP method.
    pub method: &'a str,
    /// `uri` parameter.
    pub uri: &'a str,
    /// `nonce` parameter.
    pub nonce: &'a str,
    /// `qop` (`auth`) or `None` for the RFC 2069 form.
    pub qop: Option<&'a str>,
    /// `nc` when qop is set.
    pub nc: &'a str,
    /// `cnonce` when qop is set.
    pub cnonce: &'a str,
}

/// The expected `response` value for a stored HA1.
pub fn response(alg: Algorithm, ha1: &str, input: &ResponseInput<'_>) -> String {
    let ha2 = alg.hex(format!("{}:{}", input.method, input.uri).as_bytes());
    match input.qop {
        Some(qop) => alg.hex(
            format!("{ha1}:{}:{}:{}:{qop}:{ha2}", input.nonce, input.nc, input.cnonce).as_bytes(),
        ),
        None => alg.hex(format!("{ha1}:{}:{ha2}", input.nonce).as_bytes()),
    }
}

/// Constant-time comparison of two hex strings (case-insensitive).
pub fn hex_eq(a: &str, b: &str) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.bytes()
        .zip(b.bytes())
        .fold(0u8, |acc, (x, y)| acc | (x.to_ascii_lowercase() ^ y.to_ascii_lowercase()))
        == 0
}

/// Parsed `Digest` credentials from an Authorization or Proxy-Authorization header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// `username`.
    pub username: String,
    /// `realm`.
    pub realm: String,
    /// `nonce`.
    pub nonce: String,
    /// `uri`.
    pub uri: String,
    /// `response`.
    pub response: String,
    /// `algorithm`, if present.
    pub algorithm: Option<String>,
    /// `qop`, if present.
    pub qop: Option<String>,
    /// `nc`, if present.
    pub nc: Option<String>,
    /// `cnonce`, if present.
    pub cnonce: Option<String>,
    /// `opaque`, if present.
    pub opaque: Option<String>,
}

impl Credentials {
    /// Parses `Digest k=v, k="v", ...`.
    pub fn parse(value: &str) -> Result<Self, Error> {
        let bad = |d: &str| Error::BadHeader { name: "Authorization", detail: d.to_owned() };
        let v = value.trim_start();
        let (scheme, rest) =
            v.split_once(|c: char| c.is_ascii_whitespace()).ok_or_else(|| bad("no scheme"))?;
        if !scheme.eq_ignore_ascii_case("digest") {
            return Err(bad("not Digest"));
        }
        let mut c = Credentials::default();
        for (k, val) in parse_params(rest) {
            match k.to_ascii_lowercase().as_str() {
                "username" => c.username = val,
                "realm" => c.realm = val,
                "nonce" => c.nonce = val,
                "uri" => c.uri = val,
                "response" => c.response = val,
                "algorithm" => c.algorithm = Some(val),
                "qop" => c.qop = Some(val),
                "nc" => c.nc = Some(val),
                "cnonce" => c.cnonce = Some(val),
                "opaque" => c.opaque = Some(val),
                _ => {}
            }
        }
        if c.username.is_empty() || c.nonce.is_empty() || c.response.is_empty() {
            return Err(bad("username, nonce and response are required"));
        }
        Ok(c)
    }

    /// The algorithm, MD5 when absent; `None` for one we do not support.
    pub fn algorithm(&self) -> Option<Algorithm> {
        self.algorithm.as_deref().map_or(Some(Algorithm::Md5), Algorithm::parse)
    }
}

/// A `Digest` challenge (`WWW-Authenticate` or `Proxy-Authenticate`) from a server the
/// cluster calls, e.g. a SIP trunk, and the client side of answering it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Challenge {
    /// `realm`.
    pub realm: String,
    /// `nonce`.
    pub nonce: String,
    /// `opaque`, echoed back.
    pub opaque: Option<String>,
    /// The algorithm asked for (MD5 when absent).
    pub algorithm: Algorithm,
    /// Whether `qop` offers `auth` (then answered with it).
    pub qop_auth: bool,
}

impl Challenge {
    /// Parses `Digest realm="…", nonce="…", …`; `None` for another scheme, an algorithm not
    /// supported (`-sess`, unknown) or a challenge without realm or nonce.
    pub fn parse(value: &str) -> Option<Self> {
        let v = value.trim_start();
        let (scheme, rest) = v.split_once(|c: char| c.is_ascii_whitespace())?;
        if !scheme.eq_ignore_ascii_case("digest") {
            return None;
        }
        let mut c = Challenge::default();
        for (k, val) in parse_params(rest) {
            match k.to_ascii_lowercase().as_str() {
                "realm" => c.realm = val,
                "nonce" => c.nonce = val,
                "opaque" => c.opaque = Some(val),
                "algorithm" => c.algorithm = Algorithm::parse(&val)?,
                "qop" => c.qop_auth = val.split(',').any(|q| q.trim().eq_ignore_ascii_case("auth")),
                _ => {}
            }
        }
        (!c.realm.is_empty() && !c.nonce.is_empty()).then_some(c)
    }

    /// The `Authorization`/`Proxy-Authorization` value answering this challenge for
    /// `method` on `uri` with `username` and `password` (nc 1, `cnonce` given). Quoted values
    /// are escaped, so a hostile challenge cannot inject parameters.
    pub fn answer(
        &self,
        username: &str,
        password: &str,
        method: &str,
        uri: &str,
        cnonce: &str,
    ) -> String {
        let alg = self.algorithm;
        let ha1 = ha1(alg, username, &self.realm, password);
        let qop = self.qop_auth.then_some("auth");
        let nc = "00000001";
        let response = response(
            alg,
            &ha1,
            &ResponseInput { method, uri, nonce: &self.nonce, qop, nc, cnonce },
        );
        let q = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let mut out = format!(
            "Digest username=\"{}\", realm=\"{}\", nonce=\"{}\", uri=\"{}\", response=\"{response}\", algorithm={}",
            q(username),
            q(&self.realm),
            q(&self.nonce),
            q(uri),
            alg.as_str()
        );
        if let Some(qop) = qop {
            out.push_str(&format!(", qop={qop}, nc={nc}, cnonce=\"{}\"", q(cnonce)));
        }
        if let Some(opaque) = &self.opaque {
            out.push_str(&format!(", opaque=\"{}\"", q(opaque)));
        }
        out
    }
}

/// Splits `k=v, k="quoted, value"` into pairs, unquoting quoted values.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == b',' || b[i].is_ascii_whitespace()) {
            i += 1;
        }
        let ks = i;
        while i < b.len() && b[i] != b'=' && b[i] != b',' {
            i += 1;
        }
        let key = s[ks..i].trim().to_owned();
        if i >= b.len() || b[i] == b',' {
            if !key.is_empty() {
                out.push((key, String::new()));
            }
            continue;
        }
        i += 1;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut val = String::new();
        if i < b.len() && b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                let ch_len = utf8_len(b[i]);
                val.push_str(&s[i..i + ch_len]);
                i += ch_len;
            }
            i += 1;
        } else {
            let vs = i;
            while i < b.len() && b[i] != b',' {
                i += 1;
            }
            val = s[vs..i].trim().to_owned();
        }
        out.push((key, val));
    }
    out
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_trunks_challenge_is_answered_and_checks_out() {
        let c = Challenge::parse(
            "Digest realm=\"carrier.example\", nonce=\"abc\\\"d\", qop=\"auth,auth-int\", opaque=\"o1\", algorithm=MD5",
        )
        .expect("challenge");
        assert_eq!(
            (c.realm.as_str(), c.nonce.as_str(), c.qop_auth),
            ("carrier.example", "abc\"d", true)
        );
        let header = c.answer("trunk-user", "secret", "INVITE", "sip:+4420@203.0.113.10", "cn1");
        // What a server checking it parses and verifies.
        let creds = Credentials::parse(&header).expect("credentials");
        assert_eq!((creds.nonce.as_str(), creds.opaque.as_deref()), ("abc\"d", Some("o1")));
        let ha1 = ha1(Algorithm::Md5, "trunk-user", "carrier.example", "secret");
        let expected = response(
            Algorithm::Md5,
            &ha1,
            &ResponseInput {
                method: "INVITE",
                uri: "sip:+4420@203.0.113.10",
                nonce: "abc\"d",
                qop: Some("auth"),
                nc: "00000001",
                cnonce: "cn1",
            },
        );
        assert!(hex_eq(&creds.response, &expected));
        assert!(Challenge::parse("Basic realm=\"x\"").is_none());
        assert!(Challenge::parse("Digest realm=\"x\", nonce=\"n\", algorithm=MD5-sess").is_none());
        assert!(Challenge::parse("Digest realm=\"x\"").is_none(), "no nonce");
        let sha =
            Challenge::parse("Digest realm=\"x\", nonce=\"n\", algorithm=SHA-256").expect("sha");
        assert_eq!(sha.algorithm, Algorithm::Sha256);
        assert!(!sha.answer("u", "p", "INVITE", "sip:x", "c").contains("qop="), "RFC 2069 form");
    }

    use super::*;

    /// RFC 2617 §3.5 example, computed with qop=auth.
    #[test]
    fn rfc2617_example_response() {
        let ha1 = ha1(Algorithm::Md5, "Mufasa", "testrealm@host.com", "Circle Of Life");
        let r = response(
            Algorithm::Md5,
            &ha1,
            &ResponseInput {
                method: "GET",
                uri: "/dir/index.html",
                nonce: "dcd98b7102dd2f0e8b11d0f600bfb0c093",
                qop: Some("auth"),
                nc: "00000001",
                cnonce: "0a4f113b",
            },
        );
        assert_eq!(r, "6629fae49393a05397450978507c4ef1");
    }

    /// RFC 7616 §3.9.1 SHA-256 example.
    #[test]
    fn rfc7616_sha256_example_response() {
        let ha1 = ha1(Algorithm::Sha256, "Mufasa", "http-auth@example.org", "Circle of Life");
        let r = response(
            Algorithm::Sha256,
            &ha1,
            &ResponseInput {
                method: "GET",
                uri: "/dir/index.html",
                nonce: "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
                qop: Some("auth"),
                nc: "00000001",
                cnonce: "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
            },
        );
        assert_eq!(r, "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1");
    }

    #[test]
    fn credentials_parse_quoted_and_bare_values() {
        let c = Credentials::parse(
            "Digest username=\"bob\",realm=\"old.example\", nonce=\"n,1\", uri=\"sip:old.example\", response=\"abc\", algorithm=SHA-256, qop=auth, nc=00000001, cnonce=\"xy\"",
        )
        .expect("parse");
        assert_eq!(c.username, "bob");
        assert_eq!(c.nonce, "n,1");
        assert_eq!(c.algorithm(), Some(Algorithm::Sha256));
        assert_eq!(c.qop.as_deref(), Some("auth"));
        assert_eq!(c.nc.as_deref(), Some("00000001"));
    }

    #[test]
    fn credentials_reject_basic_and_missing_fields() {
        assert!(Credentials::parse("Basic Zm9vOmJhcg==").is_err());
        assert!(Credentials::parse("Digest username=\"a\"").is_err());
    }

    #[test]
    fn hex_eq_ignores_case_only() {
        assert!(hex_eq("abCD", "ABcd"));
        assert!(!hex_eq("abcd", "abce"));
        assert!(!hex_eq("abc", "abcd"));
    }
}

//! The client half of SIP digest authentication: reading a `WWW-Authenticate` or
//! `Proxy-Authenticate` challenge and answering it with MD5, `qop=auth` (RFC 3261 §22.4,
//! RFC 7616 §3.4). The hashing itself is `sipmsg::digest`, shared with the cluster.

use anyhow::{Result, bail};
use sipmsg::digest::{self, Algorithm};

/// One digest challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// `realm`: which credentials the server wants.
    pub realm: String,
    /// `nonce`.
    pub nonce: String,
    /// `opaque`, echoed back when present.
    pub opaque: Option<String>,
    /// The `qop` options offered (`auth`, `auth-int`).
    pub qop: Vec<String>,
    /// `algorithm`; `None` when the server named one we do not know.
    pub algorithm: Option<Algorithm>,
}

impl Challenge {
    /// Parses `Digest realm="…", nonce="…", …`.
    pub fn parse(value: &str) -> Result<Self> {
        let v = value.trim_start();
        let Some((scheme, rest)) = v.split_once(|c: char| c.is_ascii_whitespace()) else {
            bail!("challenge without parameters: {value}");
        };
        if !scheme.eq_ignore_ascii_case("digest") {
            bail!("not a Digest challenge: {value}");
        }
        let mut ch = Challenge {
            realm: String::new(),
            nonce: String::new(),
            opaque: None,
            qop: Vec::new(),
            algorithm: Some(Algorithm::Md5),
        };
        for (k, v) in params(rest) {
            match k.to_ascii_lowercase().as_str() {
                "realm" => ch.realm = v,
                "nonce" => ch.nonce = v,
                "opaque" => ch.opaque = Some(v),
                "qop" => ch.qop = v.split(',').map(|q| q.trim().to_owned()).collect(),
                "algorithm" => ch.algorithm = Algorithm::parse(&v),
                _ => {}
            }
        }
        if ch.nonce.is_empty() {
            bail!("challenge without nonce: {value}");
        }
        Ok(ch)
    }

    /// The MD5 challenge among several header values (a server may offer SHA-256 too).
    pub fn pick_md5<'a>(values: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let mut seen = Vec::new();
        for v in values {
            seen.push(v.to_owned());
            if let Ok(ch) = Challenge::parse(v)
                && ch.algorithm == Some(Algorithm::Md5)
            {
                return Ok(ch);
            }
        }
        bail!("no MD5 digest challenge among {seen:?}")
    }

    /// The credentials header value answering this challenge for `method` on `uri`.
    /// `cnonce` is the client nonce; the nonce count is always 1 (each nonce is used once).
    pub fn answer(
        &self,
        user: &str,
        password: &str,
        method: &str,
        uri: &str,
        cnonce: &str,
    ) -> String {
        // The cluster's own client side (what it answers trunks with), so the two cannot drift.
        digest::Challenge {
            realm: self.realm.clone(),
            nonce: self.nonce.clone(),
            opaque: self.opaque.clone(),
            algorithm: self.algorithm.unwrap_or(Algorithm::Md5),
            qop_auth: self.qop.iter().any(|q| q == "auth"),
        }
        .answer(user, password, method, uri, cnonce)
    }
}

/// Splits `k=v, k="quoted, value"` into pairs, unquoting quoted values.
fn params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim_start_matches([',', ' ', '\t']);
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().to_owned();
        let after = rest[eq + 1..].trim_start();
        let (value, tail) = if let Some(q) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = q.char_indices();
            let mut end = q.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, e)) = chars.next() {
                            value.push(e);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &q[end..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        out.push((key, value));
        rest = tail.trim_start_matches([',', ' ', '\t']);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sipmsg::digest::Credentials;

    #[test]
    fn md5_is_picked_among_offered_challenges() -> Result<()> {
        let ch = Challenge::pick_md5([
            "Digest realm=\"old.example\", nonce=\"n1\", qop=\"auth\", algorithm=SHA-256",
            "Digest realm=\"old.example\", nonce=\"n2\", qop=\"auth,auth-int\", algorithm=MD5, opaque=\"o\"",
        ])?;
        assert_eq!(ch.nonce, "n2");
        assert_eq!(ch.qop, vec!["auth", "auth-int"]);
        assert_eq!(ch.opaque.as_deref(), Some("o"));
        Ok(())
    }

    /// The answer is what the cluster's own verifier (sipmsg::digest) expects.
    #[test]
    fn answer_verifies_with_sipmsg_digest() -> Result<()> {
        let ch = Challenge::parse(
            "Digest realm=\"voip.oldprovider.example\", nonce=\"abc,def\", qop=\"auth\", algorithm=MD5",
        )?;
        let value = ch.answer("alice", "s3cret", "REGISTER", "sip:127.0.0.2", "c0ffee");
        let cred = Credentials::parse(&value)?;
        assert_eq!(cred.nonce, "abc,def");
        assert_eq!(cred.realm, "voip.oldprovider.example");
        let ha1 = digest::ha1(Algorithm::Md5, "alice", "voip.oldprovider.example", "s3cret");
        let expected = digest::response(
            Algorithm::Md5,
            &ha1,
            &digest::ResponseInput {
                method: "REGISTER",
                uri: "sip:127.0.0.2",
                nonce: "abc,def",
                qop: Some("auth"),
                nc: cred.nc.as_deref().unwrap_or_default(),
                cnonce: cred.cnonce.as_deref().unwrap_or_default(),
            },
        );
        assert!(digest::hex_eq(&cred.response, &expected));
        Ok(())
    }

    #[test]
    fn rfc2617_style_challenge_without_qop_is_answered_without_qop() -> Result<()> {
        let ch = Challenge::parse("Digest realm=\"r\", nonce=\"n\"")?;
        let value = ch.answer("u", "p", "INVITE", "sip:x@y", "c");
        assert!(!value.contains("qop"), "{value}");
        Ok(())
    }
}

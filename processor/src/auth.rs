//! Stateless digest nonces and challenges (RFC 3261 §22, RFC 8760).
//!
//! A nonce is `base64url(timestamp_ms ‖ HMAC-SHA256(secret, timestamp_ms ‖ realm)[..16])`. Any
//! processor holding the cluster secret can check it without shared state; an expired but
//! authentic nonce earns `stale=true`, so the phone retries without asking its user. Replay of
//! a fresh nonce within its lifetime is not detected (no per-nonce state); `nc` counting would
//! need Redis and is left for later.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sipmsg::SipMessage;
use sipmsg::digest::{Algorithm, Credentials};

type HmacSha256 = Hmac<Sha256>;

/// Mints and checks nonces for one cluster secret.
#[derive(Clone)]
pub struct NonceKey {
    secret: Vec<u8>,
    ttl_ms: u64,
}

/// What a nonce check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    /// Minted by the cluster for this realm and still fresh.
    Fresh,
    /// Minted by the cluster but older than the TTL: challenge again with `stale=true`.
    Stale,
    /// Not ours, or for another realm.
    Invalid,
}

impl NonceKey {
    /// A key from the cluster secret and the nonce lifetime.
    pub fn new(secret: &[u8], ttl_ms: u64) -> Self {
        NonceKey { secret: secret.to_vec(), ttl_ms }
    }

    fn mac(&self, ts: u64, realm: &str) -> [u8; 16] {
        // HMAC accepts keys of any length, so new_from_slice cannot fail here.
        let mut mac = match HmacSha256::new_from_slice(&self.secret) {
            Ok(m) => m,
            Err(_) => return [0; 16],
        };
        mac.update(&ts.to_be_bytes());
        mac.update(realm.as_bytes());
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }

    /// A new nonce for `realm` at time `now_ms`.
    pub fn mint(&self, realm: &str, now_ms: u64) -> String {
        let mut raw = Vec::with_capacity(24);
        raw.extend_from_slice(&now_ms.to_be_bytes());
        raw.extend_from_slice(&self.mac(now_ms, realm));
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Checks a nonce received in credentials for `realm`.
    pub fn check(&self, nonce: &str, realm: &str, now_ms: u64) -> NonceCheck {
        let Ok(raw) = URL_SAFE_NO_PAD.decode(nonce) else { return NonceCheck::Invalid };
        if raw.len() != 24 {
            return NonceCheck::Invalid;
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&raw[..8]);
        let ts = u64::from_be_bytes(ts);
        let expected = self.mac(ts, realm);
        // Constant-time comparison: the MAC must not leak through timing.
        let diff = expected.iter().zip(&raw[8..]).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return NonceCheck::Invalid;
        }
        if now_ms.saturating_sub(ts) > self.ttl_ms || ts > now_ms.saturating_add(60_000) {
            NonceCheck::Stale
        } else {
            NonceCheck::Fresh
        }
    }
}

/// Which header pair a challenge uses: `401`/`WWW-Authenticate` for REGISTER (a registrar is a
/// UAS), `407`/`Proxy-Authenticate` for INVITE and others (the B2BUA acts for the callee).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// 401 + WWW-Authenticate / Authorization.
    Www,
    /// 407 + Proxy-Authenticate / Proxy-Authorization.
    Proxy,
}

impl ChallengeKind {
    /// For a request method.
    pub fn for_method(method: &str) -> Self {
        if method == "REGISTER" { ChallengeKind::Www } else { ChallengeKind::Proxy }
    }

    /// Header carrying the phone's credentials.
    pub fn credentials_header(self) -> &'static str {
        match self {
            ChallengeKind::Www => "authorization",
            ChallengeKind::Proxy => "proxy-authorization",
        }
    }

    /// Status, reason and challenge header name.
    pub fn response(self) -> (u16, &'static str, &'static str) {
        match self {
            ChallengeKind::Www => (401, "Unauthorized", "WWW-Authenticate"),
            ChallengeKind::Proxy => (407, "Proxy Authentication Required", "Proxy-Authenticate"),
        }
    }
}

/// Builds the challenge response: one header per algorithm, in the operator's order of
/// preference (RFC 8760 §2.4: a phone takes the first it supports), each `qop="auth"`.
pub fn challenge(
    req: &SipMessage,
    kind: ChallengeKind,
    realm: &str,
    nonce: &str,
    stale: bool,
    algorithms: &[Algorithm],
    to_tag: &str,
) -> SipMessage {
    let (status, reason, header) = kind.response();
    let mut resp = SipMessage::response_to(req, status, reason, Some(to_tag));
    let stale = if stale { ", stale=true" } else { "" };
    for alg in algorithms {
        resp.push_header(
            header,
            format!(
                "Digest realm=\"{realm}\", nonce=\"{nonce}\", algorithm={}, qop=\"auth\"{stale}",
                alg.as_str()
            ),
        );
    }
    resp
}

/// The credentials in a request for `realm`, if any parse (a phone may send several).
pub fn credentials_for(req: &SipMessage, kind: ChallengeKind, realm: &str) -> Option<Credentials> {
    let mut first = None;
    for value in req.headers_named(kind.credentials_header()) {
        if let Ok(c) = Credentials::parse(value) {
            if c.realm == realm {
                return Some(c);
            }
            first.get_or_insert(c);
        }
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_is_verified_by_any_holder_of_the_secret() {
        let a = NonceKey::new(b"cluster-secret-0123", 300_000);
        let b = NonceKey::new(b"cluster-secret-0123", 300_000);
        let n = a.mint("realm", 1_000_000);
        assert_eq!(b.check(&n, "realm", 1_000_500), NonceCheck::Fresh);
        assert_eq!(b.check(&n, "other-realm", 1_000_500), NonceCheck::Invalid);
        assert_eq!(b.check(&n, "realm", 1_000_000 + 300_001), NonceCheck::Stale);
        let other = NonceKey::new(b"another-secret-xyz", 300_000);
        assert_eq!(other.check(&n, "realm", 1_000_500), NonceCheck::Invalid);
    }

    #[test]
    fn tampered_or_garbage_nonce_is_invalid() {
        let k = NonceKey::new(b"cluster-secret-0123", 300_000);
        let mut n = k.mint("r", 5_000).into_bytes();
        n[3] = if n[3] == b'A' { b'B' } else { b'A' };
        let n = String::from_utf8(n).expect("ascii");
        assert_eq!(k.check(&n, "r", 5_000), NonceCheck::Invalid);
        assert_eq!(k.check("!!!", "r", 5_000), NonceCheck::Invalid);
        assert_eq!(k.check("", "r", 5_000), NonceCheck::Invalid);
    }

    #[test]
    fn challenge_offers_algorithms_in_configured_order() {
        let req = sipmsg::parse(b"REGISTER sip:h SIP/2.0\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK1\r\nFrom: <sip:u@h>;tag=1\r\nTo: <sip:u@h>\r\nCall-ID: c\r\nCSeq: 1 REGISTER\r\n\r\n").expect("parse");
        let algs = [Algorithm::Sha256, Algorithm::Md5];
        let r = challenge(&req, ChallengeKind::Www, "old.example", "N", true, &algs, "t");
        let hs: Vec<_> = r.headers_named("www-authenticate").collect();
        assert_eq!(hs.len(), 2);
        assert!(hs[0].contains("algorithm=SHA-256") && hs[0].contains("stale=true"));
        assert!(hs[1].contains("algorithm=MD5") && hs[1].contains("realm=\"old.example\""));
        assert_eq!(r.status(), Some(401));
    }
}

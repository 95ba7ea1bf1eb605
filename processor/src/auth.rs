//! Stateless digest nonces and challenges (RFC 3261 §22, RFC 8760).
//!
//! A nonce is `base64url(timestamp_ms ‖ salt ‖ HMAC-SHA256(secret, timestamp_ms ‖ salt ‖
//! realm)[..16])` with 64 random bits of salt, so no two challenges share a nonce (their
//! nonce-counts are then tracked apart, see [`crate::replay`]). Any
//! processor holding the cluster secret can check it without shared state; an expired but
//! authentic nonce earns `stale=true`, so the phone retries without asking its user.
//!
//! Credentials are bound to what they authorize before any account is looked up
//! ([`check_presented`]): the realm and an algorithm offered on the IP, our own fresh nonce,
//! `qop=auth` with `nc` and `cnonce` (we always offer qop, so a response without it is a
//! downgrade), and a `uri` naming the Request-URI (RFC 3261 §22.4). Replay of a nonce-count is
//! caught against Redis by [`crate::replay`], since any processor may see the replay.

use std::net::SocketAddr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sipmsg::SipMessage;
use sipmsg::digest::{Algorithm, Credentials};

use crate::answer::{Answer, FORBIDDEN};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a decoded nonce: timestamp, salt, MAC.
const NONCE_LEN: usize = 8 + 8 + 16;

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

    fn mac(&self, ts: u64, salt: &[u8], realm: &str) -> [u8; 16] {
        // HMAC accepts keys of any length, so new_from_slice cannot fail here.
        let mut mac = match HmacSha256::new_from_slice(&self.secret) {
            Ok(m) => m,
            Err(_) => return [0; 16],
        };
        mac.update(&ts.to_be_bytes());
        mac.update(salt);
        mac.update(realm.as_bytes());
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }

    /// A new nonce for `realm` at time `now_ms`.
    pub fn mint(&self, realm: &str, now_ms: u64) -> String {
        let salt = rand::random::<u64>().to_be_bytes();
        let mut raw = Vec::with_capacity(NONCE_LEN);
        raw.extend_from_slice(&now_ms.to_be_bytes());
        raw.extend_from_slice(&salt);
        raw.extend_from_slice(&self.mac(now_ms, &salt, realm));
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// How much longer a nonce (checked fresh) may be accepted: what its replay record must
    /// outlive. At least one second, so a record is never written already expired.
    pub fn remaining_ms(&self, nonce: &str, now_ms: u64) -> u64 {
        let ts = URL_SAFE_NO_PAD.decode(nonce).ok().filter(|raw| raw.len() == NONCE_LEN).map_or(
            now_ms,
            |raw| {
                let mut ts = [0u8; 8];
                ts.copy_from_slice(&raw[..8]);
                u64::from_be_bytes(ts)
            },
        );
        // A nonce minted up to a minute ahead (clock skew between processors) stays fresh
        // that much longer.
        (ts.saturating_add(self.ttl_ms)).saturating_sub(now_ms).clamp(1000, self.ttl_ms + 60_000)
    }

    /// Checks a nonce received in credentials for `realm`.
    pub fn check(&self, nonce: &str, realm: &str, now_ms: u64) -> NonceCheck {
        let Ok(raw) = URL_SAFE_NO_PAD.decode(nonce) else { return NonceCheck::Invalid };
        if raw.len() != NONCE_LEN {
            return NonceCheck::Invalid;
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&raw[..8]);
        let ts = u64::from_be_bytes(ts);
        let expected = self.mac(ts, &raw[8..16], realm);
        // Constant-time comparison: the MAC must not leak through timing.
        let diff = expected.iter().zip(&raw[16..]).fold(0u8, |acc, (a, b)| acc | (a ^ b));
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

/// Why presented credentials are refused before the account is looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Answer with a fresh challenge (`stale`: the nonce was ours but expired or used up).
    Challenge {
        /// RFC 3261 §22.4 `stale=true`: retry with the new nonce without asking the user.
        stale: bool,
    },
    /// Answer `400` with this reason phrase: the credentials cannot be for this request.
    BadRequest(&'static str),
}

/// What credentials must be to be checked against an account, on the IP a request came in on.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// The realm of the IP.
    pub realm: &'a str,
    /// The algorithms the IP offers.
    pub algorithms: &'a [Algorithm],
    /// With `digest_uri_check = "request-uri-or-socket"`: the local socket the request
    /// arrived on, whose own URI (`sip:ip:port`, what sipp sends) is accepted as `uri` too.
    pub socket: Option<SocketAddr>,
}

/// Checks credentials presented on an IP as `expected`, against the request they came with;
/// `Ok` with the algorithm when only the account's HA1 is left to check.
pub fn check_presented(
    req: &SipMessage,
    creds: &Credentials,
    expected: &Expected<'_>,
    nonces: &NonceKey,
    now_ms: u64,
) -> Result<Algorithm, Refusal> {
    let fresh = Refusal::Challenge { stale: false };
    if creds.realm != expected.realm {
        return Err(fresh);
    }
    // An algorithm the IP does not offer is refused even if we could compute it: an operator
    // who turned MD5 off on an IP must not find it accepted there.
    let Some(alg) = creds.algorithm().filter(|a| expected.algorithms.contains(a)) else {
        return Err(fresh);
    };
    match nonces.check(&creds.nonce, expected.realm, now_ms) {
        NonceCheck::Invalid => return Err(fresh),
        NonceCheck::Stale => return Err(Refusal::Challenge { stale: true }),
        NonceCheck::Fresh => {}
    }
    // Every challenge offers qop="auth": a response without it (RFC 2069) has no nonce-count
    // and could be replayed freely.
    let qop_auth = creds.qop.as_deref().is_some_and(|q| q.eq_ignore_ascii_case("auth"));
    let nc_ok = creds.nc.as_deref().is_some_and(is_nonce_count);
    let cnonce_ok = creds.cnonce.as_deref().is_some_and(|c| !c.is_empty());
    if !(qop_auth && nc_ok && cnonce_ok) {
        return Err(fresh);
    }
    let names_request = req.request_uri().is_some_and(|ruri| uri_matches(&creds.uri, ruri));
    let names_socket = expected.socket.is_some_and(|s| names_socket(&creds.uri, s));
    if !(names_request || names_socket) {
        return Err(Refusal::BadRequest("Authorization URI Mismatch"));
    }
    Ok(alg)
}

/// Whether a digest `uri` is the plain URI of local socket `socket` (`sip:ip:port`, no user;
/// port 5060 may be left out).
fn names_socket(digest_uri: &str, socket: SocketAddr) -> bool {
    let Ok(u) = sipmsg::Uri::parse(digest_uri) else { return false };
    let host = u.host.trim_start_matches('[').trim_end_matches(']');
    u.user.is_none()
        && host.parse::<std::net::IpAddr>().ok() == Some(socket.ip())
        && u.port.unwrap_or(5060) == socket.port()
}

/// `nc`: exactly eight hex digits (RFC 7616 §3.4), not all zero.
fn is_nonce_count(nc: &str) -> bool {
    nc.len() == 8 && nc.bytes().all(|b| b.is_ascii_hexdigit()) && nc.bytes().any(|b| b != b'0')
}

/// Whether a digest `uri` names the Request-URI: the same text, or the same scheme, user, host
/// (any case) and port. Parameters are not compared: they do not change who is reached, and
/// phones differ in which ones they repeat.
pub fn uri_matches(digest_uri: &str, request_uri: &str) -> bool {
    if digest_uri == request_uri {
        return true;
    }
    let (Ok(a), Ok(b)) = (sipmsg::Uri::parse(digest_uri), sipmsg::Uri::parse(request_uri)) else {
        return false;
    };
    a.scheme.eq_ignore_ascii_case(&b.scheme)
        && a.user == b.user
        && a.host.eq_ignore_ascii_case(&b.host)
        && a.port == b.port
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

/// What billing's digest verdict means for a request: `valid` (the response matches the
/// stored HA1), `blocked` (the account may not be used).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    /// Authenticated.
    User,
    /// A wrong response: a failed authentication, counted against its source.
    Failed,
    /// Authenticated, but refused with this answer.
    Refused(Answer),
}

/// Maps billing's digest verdict; a blocked account is refused only once its owner proved who
/// they are, so a stranger cannot learn that an account is blocked.
pub fn verified(valid: bool, blocked: bool) -> Verified {
    match (valid, blocked) {
        (false, _) => Verified::Failed,
        (true, true) => Verified::Refused(FORBIDDEN),
        (true, false) => Verified::User,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_is_a_user_a_failure_or_403_for_a_blocked_account() {
        assert_eq!(verified(true, false), Verified::User);
        assert_eq!(verified(false, false), Verified::Failed);
        // Wrong password on a blocked account: a failure like any other, no hint it is blocked.
        assert_eq!(verified(false, true), Verified::Failed);
        assert_eq!(verified(true, true), Verified::Refused(Answer::plain(403, "Forbidden")));
    }

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
    fn nonces_minted_in_the_same_millisecond_differ() {
        let k = NonceKey::new(b"cluster-secret-0123", 300_000);
        let a = k.mint("r", 5_000);
        let b = k.mint("r", 5_000);
        assert_ne!(a, b, "each challenge its own nonce, so nonce-counts never collide");
        assert_eq!(k.check(&a, "r", 5_000), NonceCheck::Fresh);
        assert_eq!(k.check(&b, "r", 5_000), NonceCheck::Fresh);
    }

    #[test]
    fn replay_record_outlives_the_nonce() {
        let k = NonceKey::new(b"cluster-secret-0123", 300_000);
        let n = k.mint("r", 1_000_000);
        assert_eq!(k.remaining_ms(&n, 1_000_000), 300_000);
        assert_eq!(k.remaining_ms(&n, 1_200_000), 100_000);
        assert_eq!(k.remaining_ms(&n, 1_299_999), 1_000, "never below a second");
        assert_eq!(k.remaining_ms(&n, 2_000_000), 1_000);
        let ahead = k.mint("r", 1_050_000);
        assert_eq!(k.remaining_ms(&ahead, 1_000_000), 350_000, "a nonce from a clock ahead");
        assert_eq!(k.remaining_ms("garbage", 1_000_000), 300_000);
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

    const REQ: &[u8] = b"INVITE sip:bob@old.example SIP/2.0\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK1\r\nFrom: <sip:alice@old.example>;tag=1\r\nTo: <sip:bob@old.example>\r\nCall-ID: c\r\nCSeq: 2 INVITE\r\n\r\n";

    fn creds(nonce: &str) -> Credentials {
        Credentials {
            username: "alice".into(),
            realm: "old.example".into(),
            nonce: nonce.into(),
            uri: "sip:bob@old.example".into(),
            response: "0123".into(),
            algorithm: Some("MD5".into()),
            qop: Some("auth".into()),
            nc: Some("00000001".into()),
            cnonce: Some("abc".into()),
            opaque: None,
        }
    }

    #[test]
    fn presented_credentials_are_bound_to_their_request() {
        let req = sipmsg::parse(REQ).expect("parse");
        let key = NonceKey::new(b"cluster-secret-0123", 300_000);
        let nonce = key.mint("old.example", 1_000);
        let md5 = [Algorithm::Md5];
        let check = |c: &Credentials, algs: &[Algorithm], now| {
            let expected = Expected { realm: "old.example", algorithms: algs, socket: None };
            check_presented(&req, c, &expected, &key, now)
        };
        let fresh = Err(Refusal::Challenge { stale: false });
        assert_eq!(check(&creds(&nonce), &md5, 2_000), Ok(Algorithm::Md5));
        // Same URI written differently: host case, parameters.
        let mut c = creds(&nonce);
        c.uri = "sip:bob@OLD.example;transport=udp".into();
        assert_eq!(check(&c, &md5, 2_000), Ok(Algorithm::Md5));

        // Credentials computed for another request (another callee, port or scheme).
        for uri in [
            "sip:carol@old.example",
            "sip:bob@old.example:5070",
            "sips:bob@old.example",
            "",
            "garbage",
        ] {
            let mut c = creds(&nonce);
            c.uri = uri.into();
            assert_eq!(
                check(&c, &md5, 2_000),
                Err(Refusal::BadRequest("Authorization URI Mismatch")),
                "{uri}"
            );
        }
        // MD5 where the IP offers only SHA-256; an unknown algorithm.
        assert_eq!(check(&creds(&nonce), &[Algorithm::Sha256], 2_000), fresh);
        let mut c = creds(&nonce);
        c.algorithm = Some("MD5-sess".into());
        assert_eq!(check(&c, &md5, 2_000), fresh);
        // qop offered but not used, or used without a proper nc / cnonce.
        for (qop, nc, cnonce) in [
            (None, None, None),
            (Some("auth-int"), Some("00000001"), Some("x")),
            (Some("auth"), None, Some("x")),
            (Some("auth"), Some("00000000"), Some("x")),
            (Some("auth"), Some("1"), Some("x")),
            (Some("auth"), Some("0000000g"), Some("x")),
            (Some("auth"), Some("00000001"), None),
            (Some("auth"), Some("00000001"), Some("")),
        ] {
            let mut c = creds(&nonce);
            c.qop = qop.map(Into::into);
            c.nc = nc.map(Into::into);
            c.cnonce = cnonce.map(Into::into);
            assert_eq!(check(&c, &md5, 2_000), fresh, "{qop:?} {nc:?} {cnonce:?}");
        }
        // Another realm, a forged nonce, an expired one.
        let mut c = creds(&nonce);
        c.realm = "sip.example.net".into();
        assert_eq!(check(&c, &md5, 2_000), fresh);
        assert_eq!(check(&creds("AAAA"), &md5, 2_000), fresh);
        assert_eq!(
            check(&creds(&nonce), &md5, 1_000 + 300_001),
            Err(Refusal::Challenge { stale: true })
        );
    }

    #[test]
    fn the_sockets_own_uri_is_accepted_only_where_configured() {
        let req = sipmsg::parse(REQ).expect("parse");
        let key = NonceKey::new(b"cluster-secret-0123", 300_000);
        let nonce = key.mint("old.example", 1_000);
        let socket: SocketAddr = "127.0.0.2:5060".parse().expect("addr");
        let md5 = [Algorithm::Md5];
        let check = |uri: &str, socket| {
            let mut c = creds(&nonce);
            c.uri = uri.into();
            let expected = Expected { realm: "old.example", algorithms: &md5, socket };
            check_presented(&req, &c, &expected, &key, 2_000)
        };
        let mismatch = Err(Refusal::BadRequest("Authorization URI Mismatch"));
        for uri in ["sip:127.0.0.2:5060", "sip:127.0.0.2"] {
            assert_eq!(check(uri, None), mismatch, "strict: {uri}");
            assert_eq!(check(uri, Some(socket)), Ok(Algorithm::Md5), "lenient: {uri}");
        }
        for uri in ["sip:127.0.0.3:5060", "sip:127.0.0.2:5080", "sip:carol@127.0.0.2:5060"] {
            assert_eq!(check(uri, Some(socket)), mismatch, "{uri}");
        }
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

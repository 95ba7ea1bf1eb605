//! Accounts: addresses of record, their status, their stored digest HA1s, and the pure
//! decision whether a digest response matches them.
//!
//! Billing never stores or sees a password after `account add` has hashed it; only
//! `HA1 = H(user:realm:password)` is kept, per realm and per algorithm, which is all that is
//! needed to check a digest response (RFC 2617/7616/8760).

use std::collections::BTreeMap;
use std::fmt;

use sipmsg::digest::{self, Algorithm};

use crate::error::Error;

/// A normalised address of record, `user@domain`, with the domain in lower case (domains are
/// case-insensitive; the user part is not).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Aor {
    user: String,
    domain: String,
}

impl Aor {
    /// Parses `user@domain`. A `sip:` URI, parameters or whitespace are refused rather than
    /// guessed at, so that what is stored is exactly what the processor will look up.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let bad = |reason| Error::InvalidAor { aor: s.to_owned(), reason };
        let lower = s.to_ascii_lowercase();
        if lower.starts_with("sip:") || lower.starts_with("sips:") {
            return Err(bad("expected user@domain without a sip: scheme"));
        }
        let (user, domain) = s.split_once('@').ok_or_else(|| bad("expected user@domain"))?;
        if user.is_empty() {
            return Err(bad("empty user part"));
        }
        if domain.is_empty() {
            return Err(bad("empty domain"));
        }
        let forbidden = |c: char| {
            c.is_whitespace()
                || c.is_control()
                || matches!(c, '@' | ';' | '<' | '>' | '?' | ',' | '"')
        };
        if user.chars().chain(domain.chars()).any(forbidden) {
            return Err(bad("contains whitespace or one of @ ; < > ? , \""));
        }
        Ok(Self { user: user.to_owned(), domain: domain.to_ascii_lowercase() })
    }

    /// The user part: the digest `username` HA1s are computed with.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The domain: the default realm when none is given.
    pub fn domain(&self) -> &str {
        &self.domain
    }
}

impl fmt::Display for Aor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.user, self.domain)
    }
}

/// Whether an account may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// May register and call.
    Active,
    /// Refused with 403 by the processor.
    Blocked,
}

impl Status {
    /// The value stored in Redis (`active` / `blocked`).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Blocked => "blocked",
        }
    }

    /// Parses the stored value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(Status::Active),
            "blocked" => Some(Status::Blocked),
            _ => None,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an account pays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Pays in advance: calls are allowed only while the balance covers them.
    Prepaid,
    /// Pays afterwards: the balance may go down to minus the credit limit (if there is one).
    Postpaid,
}

impl Kind {
    /// The value stored in Redis (`prepaid` / `postpaid`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Prepaid => "prepaid",
            Kind::Postpaid => "postpaid",
        }
    }

    /// Parses the stored (or typed) value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "prepaid" => Some(Kind::Prepaid),
            "postpaid" => Some(Kind::Postpaid),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The HA1s stored for one realm. At least one is present for every realm of an account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RealmCredentials {
    /// `MD5(user:realm:password)`, lower-case hex (32 digits).
    pub ha1_md5: Option<String>,
    /// `SHA-256(user:realm:password)`, lower-case hex (64 digits).
    pub ha1_sha256: Option<String>,
}

impl RealmCredentials {
    /// The HA1 for `alg`, if stored.
    pub fn ha1(&self, alg: Algorithm) -> Option<&str> {
        match alg {
            Algorithm::Md5 => self.ha1_md5.as_deref(),
            Algorithm::Sha256 => self.ha1_sha256.as_deref(),
        }
    }

    /// Computes both HA1s from a password.
    pub fn from_password(user: &str, realm: &str, password: &str) -> Self {
        Self {
            ha1_md5: Some(digest::ha1(Algorithm::Md5, user, realm, password)),
            ha1_sha256: Some(digest::ha1(Algorithm::Sha256, user, realm, password)),
        }
    }
}

/// An account as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Its address of record.
    pub aor: Aor,
    /// Active or blocked.
    pub status: Status,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// HA1s by realm.
    pub realms: BTreeMap<String, RealmCredentials>,
    /// Prepaid or postpaid. Accounts created before billing had kinds are postpaid.
    pub kind: Kind,
    /// Balance in micro-units (see [`crate::money`]); calls debit it, top-ups credit it.
    pub balance_micros: i64,
    /// Postpaid only: how far below zero the balance may go. `None` = no limit (the default,
    /// so accounts created without one can always call).
    pub credit_limit_micros: Option<i64>,
    /// Name of the account's rate plan; `None` = the configured `default_rate_plan`, and
    /// without one the account's calls are not rated.
    pub rate_plan: Option<String>,
    /// Most calls the account may have in progress at once; 0 = no limit.
    pub max_concurrent_calls: u32,
}

/// Billing settings given when an account is created or changed. `None` leaves a setting as it
/// is (or at its default, for a new account).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountSettings {
    /// Prepaid or postpaid.
    pub kind: Option<Kind>,
    /// Credit limit: `Some(None)` removes the limit.
    pub credit_limit_micros: Option<Option<i64>>,
    /// Rate plan: `Some(None)` falls back to the configured default.
    pub rate_plan: Option<Option<String>>,
    /// Concurrent-call limit (0 = none).
    pub max_concurrent_calls: Option<u32>,
}

/// Validates an HA1 given on the command line and returns it in lower case, the form stored
/// and compared.
pub fn normalize_ha1(what: &'static str, alg: Algorithm, hex: &str) -> Result<String, Error> {
    let want = match alg {
        Algorithm::Md5 => 32,
        Algorithm::Sha256 => 64,
    };
    if hex.len() != want || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::InvalidInput {
            what,
            reason: format!("expected {want} hex digits for {}", alg.as_str()),
        });
    }
    Ok(hex.to_ascii_lowercase())
}

/// The parts of a digest response that the check needs, borrowed from the request.
#[derive(Debug, Clone, Copy)]
pub struct DigestAttempt<'a> {
    /// `realm` as sent: selects which stored HA1 to use.
    pub realm: &'a str,
    /// Algorithm of the response.
    pub algorithm: Algorithm,
    /// SIP method.
    pub method: &'a str,
    /// `uri` parameter.
    pub uri: &'a str,
    /// `nonce` parameter.
    pub nonce: &'a str,
    /// `qop` parameter: `auth` or empty.
    pub qop: &'a str,
    /// `nc` parameter.
    pub nc: &'a str,
    /// `cnonce` parameter.
    pub cnonce: &'a str,
    /// `response` parameter, hex.
    pub response: &'a str,
}

/// Why a digest response was not accepted. `Display` gives the reason string of the gRPC
/// answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DigestRejection {
    /// No HA1 stored for this realm and algorithm.
    NoCredentials {
        /// The realm asked for.
        realm: String,
    },
    /// `qop` other than `auth` or empty (`auth-int` is not supported).
    UnsupportedQop,
    /// The response does not match: wrong password, or a tampered request.
    Mismatch,
}

impl fmt::Display for DigestRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DigestRejection::NoCredentials { realm } => {
                write!(f, "no credentials for realm {realm}")
            }
            DigestRejection::UnsupportedQop => f.write_str("unsupported qop"),
            DigestRejection::Mismatch => f.write_str("mismatch"),
        }
    }
}

/// Checks a digest response against the HA1s stored for an account. Pure: the caller has
/// already fetched `realms`, so this can be tested without Redis.
///
/// Status is deliberately not considered: a blocked account with the right password is
/// "valid", so the processor can answer 403 rather than challenging again.
pub fn verify_digest(
    realms: &BTreeMap<String, RealmCredentials>,
    attempt: &DigestAttempt<'_>,
) -> Result<(), DigestRejection> {
    let qop = match attempt.qop {
        "" => None,
        "auth" => Some("auth"),
        _ => return Err(DigestRejection::UnsupportedQop),
    };
    let ha1 = realms
        .get(attempt.realm)
        .and_then(|c| c.ha1(attempt.algorithm))
        .ok_or_else(|| DigestRejection::NoCredentials { realm: attempt.realm.to_owned() })?;
    let expected = digest::response(
        attempt.algorithm,
        ha1,
        &digest::ResponseInput {
            method: attempt.method,
            uri: attempt.uri,
            nonce: attempt.nonce,
            qop,
            nc: attempt.nc,
            cnonce: attempt.cnonce,
        },
    );
    if digest::hex_eq(&expected, attempt.response) {
        Ok(())
    } else {
        Err(DigestRejection::Mismatch)
    }
}

/// Hash field prefix of an MD5 HA1 (`ha1:md5:<realm>`).
pub const HA1_MD5: &str = "ha1:md5:";
/// Hash field prefix of a SHA-256 HA1 (`ha1:sha256:<realm>`).
pub const HA1_SHA256: &str = "ha1:sha256:";

/// Checks a digest realm: non-empty, no control characters.
pub fn validate_realm(realm: &str) -> Result<(), Error> {
    if realm.is_empty() || realm.chars().any(char::is_control) {
        return Err(Error::InvalidInput {
            what: "--realm",
            reason: format!("{realm:?} must be non-empty without control characters"),
        });
    }
    Ok(())
}

/// The account hash fields holding `creds` for `realm`.
pub fn ha1_fields(realm: &str, creds: &RealmCredentials) -> Vec<(String, String)> {
    let mut fields = Vec::with_capacity(2);
    if let Some(h) = &creds.ha1_md5 {
        fields.push((format!("{HA1_MD5}{realm}"), h.clone()));
    }
    if let Some(h) = &creds.ha1_sha256 {
        fields.push((format!("{HA1_SHA256}{realm}"), h.clone()));
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: &str = "alice";
    const REALM: &str = "example.com";
    const PASSWORD: &str = "s3cret";

    fn realms() -> BTreeMap<String, RealmCredentials> {
        let mut m = BTreeMap::new();
        m.insert(REALM.to_owned(), RealmCredentials::from_password(USER, REALM, PASSWORD));
        m
    }

    fn client_response(alg: Algorithm, password: &str, qop: Option<&str>) -> String {
        let ha1 = digest::ha1(alg, USER, REALM, password);
        digest::response(
            alg,
            &ha1,
            &digest::ResponseInput {
                method: "REGISTER",
                uri: "sip:example.com",
                nonce: "abc123",
                qop,
                nc: "00000001",
                cnonce: "xyz",
            },
        )
    }

    fn attempt<'a>(alg: Algorithm, qop: &'a str, response: &'a str) -> DigestAttempt<'a> {
        DigestAttempt {
            realm: REALM,
            algorithm: alg,
            method: "REGISTER",
            uri: "sip:example.com",
            nonce: "abc123",
            qop,
            nc: "00000001",
            cnonce: "xyz",
            response,
        }
    }

    #[test]
    fn correct_responses_are_accepted_for_both_algorithms_and_qop_forms() {
        for alg in [Algorithm::Md5, Algorithm::Sha256] {
            let r = client_response(alg, PASSWORD, Some("auth"));
            assert_eq!(verify_digest(&realms(), &attempt(alg, "auth", &r)), Ok(()));
            let r = client_response(alg, PASSWORD, None);
            assert_eq!(verify_digest(&realms(), &attempt(alg, "", &r)), Ok(()));
            // Clients may send upper-case hex.
            let upper = r.to_ascii_uppercase();
            assert_eq!(verify_digest(&realms(), &attempt(alg, "", &upper)), Ok(()));
        }
    }

    #[test]
    fn wrong_password_or_wrong_algorithm_is_a_mismatch() {
        let r = client_response(Algorithm::Md5, "wrong", Some("auth"));
        assert_eq!(
            verify_digest(&realms(), &attempt(Algorithm::Md5, "auth", &r)),
            Err(DigestRejection::Mismatch)
        );
        // An MD5 response presented as SHA-256 does not match.
        let r = client_response(Algorithm::Md5, PASSWORD, Some("auth"));
        assert_eq!(
            verify_digest(&realms(), &attempt(Algorithm::Sha256, "auth", &r)),
            Err(DigestRejection::Mismatch)
        );
    }

    #[test]
    fn unknown_realm_missing_algorithm_and_bad_qop() {
        let r = client_response(Algorithm::Md5, PASSWORD, Some("auth"));
        let mut a = attempt(Algorithm::Md5, "auth", &r);
        a.realm = "other.example";
        let rejection = verify_digest(&realms(), &a).expect_err("no realm");
        assert_eq!(rejection.to_string(), "no credentials for realm other.example");

        let mut md5_only = realms();
        if let Some(c) = md5_only.get_mut(REALM) {
            c.ha1_sha256 = None;
        }
        let r = client_response(Algorithm::Sha256, PASSWORD, Some("auth"));
        assert!(matches!(
            verify_digest(&md5_only, &attempt(Algorithm::Sha256, "auth", &r)),
            Err(DigestRejection::NoCredentials { .. })
        ));

        let r = client_response(Algorithm::Md5, PASSWORD, Some("auth-int"));
        let rejection =
            verify_digest(&realms(), &attempt(Algorithm::Md5, "auth-int", &r)).expect_err("qop");
        assert_eq!(rejection.to_string(), "unsupported qop");
    }

    #[test]
    fn aor_parsing() {
        let a = Aor::parse("Bob@Example.COM").expect("aor");
        assert_eq!(a.user(), "Bob");
        assert_eq!(a.domain(), "example.com");
        assert_eq!(a.to_string(), "Bob@example.com");
        for bad in ["bob", "@example.com", "bob@", "sip:bob@example.com", "bob@a@b", "bo b@x"] {
            assert!(Aor::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ha1_validation() {
        let md5 = "0123456789ABCDEF0123456789abcdef";
        assert_eq!(
            normalize_ha1("--ha1-md5", Algorithm::Md5, md5).expect("md5"),
            md5.to_ascii_lowercase()
        );
        assert!(normalize_ha1("--ha1-md5", Algorithm::Md5, &md5[1..]).is_err());
        assert!(normalize_ha1("--ha1-sha256", Algorithm::Sha256, md5).is_err());
        assert!(normalize_ha1("--ha1-md5", Algorithm::Md5, &"g".repeat(32)).is_err());
    }
}

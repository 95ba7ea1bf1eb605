//! The cluster's own links (the dispatcher edge, billing) authenticated by a shared secret.
//!
//! Every process of a cluster is configured with the same `link_secret`. Clients send it in
//! the `x-sipalias-link-secret` metadata of every call and stream ([`Present`]); servers refuse
//! any call without it, or with another one, with `UNAUTHENTICATED` before the service sees
//! the call ([`Require`]). It keeps strangers who can reach a gRPC port from linking as a
//! processor (and receiving phones' digests) or from asking billing to authorize or account
//! calls. The secret travels in clear text: the links belong on a private network (see
//! docs/high-availability.md), which also keeps the SIP they carry private.

use std::sync::Arc;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The metadata key carrying the secret.
pub const METADATA_KEY: &str = "x-sipalias-link-secret";

/// Shortest secret accepted: 16 characters leave guessing hopeless at any rate a gRPC port
/// can answer.
pub const MIN_LEN: usize = 16;
/// Longest secret accepted (it rides in every call's metadata).
pub const MAX_LEN: usize = 256;

/// Checks a configured secret: empty (no secret), or 16–256 visible ASCII characters (the
/// characters gRPC metadata can carry, without spaces that a config file would blur).
pub fn validate(secret: &str) -> Result<(), String> {
    if secret.is_empty() {
        return Ok(());
    }
    if secret.len() < MIN_LEN || secret.len() > MAX_LEN {
        return Err(format!(
            "must be {MIN_LEN} to {MAX_LEN} characters long (it is {})",
            secret.len()
        ));
    }
    if let Some(bad) = secret.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "may hold only visible ASCII characters, not {:?}",
            bad.escape_default().to_string()
        ));
    }
    Ok(())
}

/// Client side: adds the secret to every outgoing call (nothing when no secret is set).
#[derive(Debug, Clone, Default)]
pub struct Present {
    value: Option<AsciiMetadataValue>,
}

impl Present {
    /// A client interceptor sending `secret` (empty: sends nothing).
    pub fn new(secret: &str) -> Result<Self, String> {
        validate(secret)?;
        if secret.is_empty() {
            return Ok(Self::default());
        }
        let value = AsciiMetadataValue::try_from(secret).map_err(|e| e.to_string())?;
        Ok(Self { value: Some(value) })
    }
}

impl Interceptor for Present {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.value {
            request.metadata_mut().insert(METADATA_KEY, value.clone());
        }
        Ok(request)
    }
}

/// Server side: refuses every call that does not carry the secret (accepts all when none is
/// configured, which configurations allow only on loopback).
#[derive(Debug, Clone, Default)]
pub struct Require {
    secret: Option<Arc<[u8]>>,
}

impl Require {
    /// A server interceptor requiring `secret` (empty: requires nothing).
    pub fn new(secret: &str) -> Result<Self, String> {
        validate(secret)?;
        Ok(Self { secret: (!secret.is_empty()).then(|| Arc::from(secret.as_bytes())) })
    }

    /// Whether `presented` (the metadata value, if any) is the secret.
    pub fn accepts(&self, presented: Option<&[u8]>) -> bool {
        match &self.secret {
            None => true,
            Some(secret) => presented.is_some_and(|p| constant_time_eq(p, secret)),
        }
    }
}

impl Interceptor for Require {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request.metadata().get(METADATA_KEY).map(|v| v.as_bytes());
        if self.accepts(presented) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(match presented {
                None => "no cluster link secret: set link_secret to the cluster's",
                Some(_) => "wrong cluster link secret",
            }))
        }
    }
}

/// Compares without an early exit, so the time taken does not tell how much of a guess was
/// right (the length is not secret: it is in the documentation's bounds anyway).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef-cluster";

    fn presenting(value: Option<&str>) -> Request<()> {
        let mut req = Request::new(());
        if let Some(v) = value
            && let Ok(v) = AsciiMetadataValue::try_from(v)
        {
            req.metadata_mut().insert(METADATA_KEY, v);
        }
        req
    }

    #[test]
    fn only_the_configured_secret_passes() {
        let mut require = Require::new(SECRET).expect("secret");
        assert!(require.call(presenting(Some(SECRET))).is_ok());
        for hostile in [
            None,
            Some(""),
            Some("0123456789abcdef-clusteR"),
            Some("0123456789abcdef-cluster "),
            Some("0123456789abcdef-cluste"),
            Some("0123456789abcdef-cluster0123456789abcdef-cluster"),
        ] {
            let err = require.call(presenting(hostile)).expect_err("refused");
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{hostile:?}");
        }
    }

    #[test]
    fn a_client_presents_what_the_server_requires() {
        let mut present = Present::new(SECRET).expect("secret");
        let mut require = Require::new(SECRET).expect("secret");
        let req = present.call(Request::new(())).expect("present");
        assert!(require.call(req).is_ok());
        // Without a secret nothing is sent, and a server with one refuses it.
        let req = Present::default().call(Request::new(())).expect("present");
        assert!(require.call(req).is_err());
        // A server without a secret (loopback only) accepts anyone.
        assert!(Require::default().call(Request::new(())).is_ok());
    }

    #[test]
    fn hostile_secrets_are_refused_in_configuration() {
        assert!(validate("").is_ok());
        assert!(validate(SECRET).is_ok());
        assert!(validate("short").expect_err("short").contains("16 to 256"));
        assert!(validate(&"x".repeat(257)).expect_err("long").contains("16 to 256"));
        for bad in
            ["0123456789abcdef cluster", "0123456789abcdef\r\nX-Evil: 1", "0123456789abcdéfgh"]
        {
            assert!(validate(bad).is_err(), "{bad:?}");
            assert!(Present::new(bad).is_err() && Require::new(bad).is_err(), "{bad:?}");
        }
    }
}

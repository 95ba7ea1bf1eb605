//! The processor's client of the billing contract (`proto/billing.proto`), with a deadline on
//! every call so a slow or absent billing service becomes a quick SIP answer, not a hang.

use std::time::Duration;

use sipalias_proto::billing::billing_client::BillingClient;
use sipalias_proto::billing::{
    AccountStatus, AccountingStartRequest, AccountingStopRequest, AuthorizeRequest,
    AuthorizeResponse, DigestAlgorithm, GetAccountRequest, VerifyDigestRequest,
};
use sipalias_proto::link_auth::Present;
use sipmsg::digest::{Algorithm, Credentials};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::error::{BillingFailure, Error};

/// A connection to billing, cheap to clone.
#[derive(Clone)]
pub struct Billing {
    client: BillingClient<InterceptedService<Channel, Present>>,
    /// The same channel, for the gRPC health protocol (open without the link secret).
    health: tonic_health::pb::health_client::HealthClient<Channel>,
    timeout: Duration,
}

/// Outcome of a digest check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestVerdict {
    /// The response matches the stored HA1.
    pub valid: bool,
    /// The account is blocked.
    pub blocked: bool,
    /// Why not valid, for logs.
    pub reason: String,
}

/// What billing is asked to authorize.
#[derive(Debug, Clone, Copy)]
pub struct CallRequest<'a> {
    /// Caller's AOR.
    pub caller: &'a str,
    /// Callee's AOR.
    pub callee: &'a str,
    /// Call-ID of the caller's leg.
    pub call_id: &'a str,
    /// Local IP the call came in on.
    pub ingress_ip: std::net::IpAddr,
    /// The processor's id for the call (reused by the accounting start and stop).
    pub call_ref: &'a str,
}

/// The wire form of digest credentials claiming `aor`.
fn digest_request(
    aor: &str,
    method: &str,
    creds: &Credentials,
    algorithm: Algorithm,
) -> VerifyDigestRequest {
    VerifyDigestRequest {
        aor: aor.to_owned(),
        username: creds.username.clone(),
        realm: creds.realm.clone(),
        nonce: creds.nonce.clone(),
        uri: creds.uri.clone(),
        response: creds.response.clone(),
        qop: creds.qop.clone().unwrap_or_default(),
        nc: creds.nc.clone().unwrap_or_default(),
        cnonce: creds.cnonce.clone().unwrap_or_default(),
        method: method.to_owned(),
        algorithm: match algorithm {
            Algorithm::Md5 => DigestAlgorithm::Md5,
            Algorithm::Sha256 => DigestAlgorithm::Sha256,
        } as i32,
    }
}

impl Billing {
    /// A lazily connecting client presenting the cluster's `link_secret` on every call: the
    /// processor starts even while billing is down.
    pub fn new(url: &str, link_secret: &str, timeout: Duration) -> Result<Self, Error> {
        let present = Present::new(link_secret)
            .map_err(|why| Error::Config(format!("processor.link_secret: {why}")))?;
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| Error::Config(format!("processor.billing_url: {e}")))?
            .connect_timeout(timeout)
            .timeout(timeout);
        let channel = endpoint.connect_lazy();
        let health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let client = BillingClient::with_interceptor(channel, present);
        Ok(Billing { client, health, timeout })
    }

    /// Whether billing says it serves (`grpc.health.v1` `Check` of the whole server).
    pub async fn health(&self) -> Result<(), Error> {
        let mut health = self.health.clone();
        let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
        let answer = self.call("Health", health.check(request)).await?;
        let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
        if answer.status == serving {
            return Ok(());
        }
        Err(Error::Billing {
            call: "Health",
            failure: BillingFailure::Status {
                code: tonic::Code::Unavailable,
                message: format!("status {}", answer.status),
            },
        })
    }

    async fn call<T, F>(&self, what: &'static str, fut: F) -> Result<T, Error>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = std::time::Instant::now();
        let answered = tokio::time::timeout(self.timeout, fut).await;
        crate::telemetry::billing_call(what, started.elapsed(), matches!(answered, Ok(Ok(_))));
        match answered {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(status)) => Err(Error::Billing {
                call: what,
                failure: BillingFailure::Status {
                    code: status.code(),
                    message: status.message().to_owned(),
                },
            }),
            Err(_) => {
                Err(Error::Billing { call: what, failure: BillingFailure::Timeout(self.timeout) })
            }
        }
    }

    /// Whether an account exists, and whether it is blocked.
    pub async fn account(&self, aor: &str) -> Result<Option<bool>, Error> {
        let r = self
            .call(
                "GetAccount",
                self.client.clone().get_account(GetAccountRequest { aor: aor.to_owned() }),
            )
            .await?;
        Ok(r.exists.then_some(r.status == AccountStatus::Blocked as i32))
    }

    /// Checks digest credentials for `aor` against its stored HA1.
    pub async fn verify(
        &self,
        aor: &str,
        method: &str,
        creds: &Credentials,
        algorithm: Algorithm,
    ) -> Result<DigestVerdict, Error> {
        let req = digest_request(aor, method, creds, algorithm);
        let r = self.call("VerifyDigest", self.client.clone().verify_digest(req)).await?;
        Ok(DigestVerdict {
            valid: r.valid,
            blocked: r.status == AccountStatus::Blocked as i32,
            reason: r.reason,
        })
    }

    /// May `call.caller` call `call.callee`? With `credentials` (the caller's digest, for
    /// `method`), billing checks them first, in the same round trip: a mismatch is denied
    /// with `DenyReason::BadCredentials`.
    pub async fn authorize(
        &self,
        call: &CallRequest<'_>,
        credentials: Option<(&str, &Credentials, Algorithm)>,
    ) -> Result<AuthorizeResponse, Error> {
        let req = AuthorizeRequest {
            caller: call.caller.to_owned(),
            callee: call.callee.to_owned(),
            call_id: call.call_id.to_owned(),
            ingress_ip: call.ingress_ip.to_string(),
            call_ref: call.call_ref.to_owned(),
            credentials: credentials
                .map(|(method, creds, alg)| digest_request(call.caller, method, creds, alg)),
        };
        self.call("Authorize", self.client.clone().authorize(req)).await
    }

    /// Records an answered call.
    pub async fn start(&self, req: AccountingStartRequest) -> Result<(), Error> {
        self.call("AccountingStart", self.client.clone().accounting_start(req)).await.map(|_| ())
    }

    /// Records the end of a call.
    pub async fn stop(&self, req: AccountingStopRequest) -> Result<(), Error> {
        self.call("AccountingStop", self.client.clone().accounting_stop(req)).await.map(|_| ())
    }
}

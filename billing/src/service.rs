//! The gRPC `Billing` service (see `proto/proto/billing.proto`) over the Redis [`Store`].
//!
//! Answers are decisions, not errors: an unknown account, a wrong password or an empty balance
//! is a normal `valid=false` / `allowed=false` reply with a reason (and, for Authorize, a
//! `DenyReason`). Only a failing Redis is an RPC error (`UNAVAILABLE`, meaning nothing was
//! applied), so the processor can tell "no" from "cannot say right now".

use std::future::Future;
use std::sync::Arc;

use sipalias_proto::billing::billing_server::{Billing, BillingServer};
use sipalias_proto::billing::{
    AccountStatus, AccountingResponse, AccountingStartRequest, AccountingStopRequest,
    AuthorizeRequest, AuthorizeResponse, DenyReason, DigestAlgorithm, GetAccountRequest,
    GetAccountResponse, VerifyDigestRequest, VerifyDigestResponse,
};
use sipmsg::digest::Algorithm;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status as RpcStatus};
use tracing::{debug, info, warn};

use crate::account::{self, Account, Aor, DigestAttempt, Status};
use crate::config::BillingConfig;
use crate::error::Error;
use crate::store::{Authorization, CallStart, CallStop, Denial, Store, now_ms};

/// Implementation of the `Billing` gRPC service.
#[derive(Debug, Clone)]
pub struct BillingService {
    store: Store,
}

impl BillingService {
    /// A service answering from `store` (which carries the authorization defaults of the
    /// configuration).
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Looks an account up by the AOR the processor sent. An AOR that does not even parse
    /// cannot name an account, so it is answered as unknown rather than as an RPC error: the
    /// SIP outcome (401/403) is the same and the processor needs no special case.
    async fn lookup(&self, rpc: &'static str, aor: &str) -> Result<Option<Account>, RpcStatus> {
        let aor = match Aor::parse(aor) {
            Ok(aor) => aor,
            Err(e) => {
                debug!(rpc, error = %e, "unparsable AOR treated as unknown");
                return Ok(None);
            }
        };
        match self.store.get(&aor).await {
            // Right after a Redis restart the first command reports the old connection's
            // failure (and reconnects): one retry keeps that from turning into a 503.
            Err(Error::Redis(e))
                if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() =>
            {
                debug!(rpc, error = %e, "redis connection error: retrying once");
                self.store.get(&aor).await.map_err(|e| store_error(rpc, e))
            }
            other => other.map_err(|e| store_error(rpc, e)),
        }
    }
}

/// The wire form of an account's status.
fn wire_status(account: Option<&Account>) -> AccountStatus {
    match account.map(|a| a.status) {
        None => AccountStatus::Unspecified,
        Some(Status::Active) => AccountStatus::Active,
        Some(Status::Blocked) => AccountStatus::Blocked,
    }
}

/// The wire form of a denial. A late Authorize for a call that already ended has no code of
/// its own: the processor is not waiting for that answer any more.
fn wire_denial(denial: Denial) -> DenyReason {
    match denial {
        Denial::UnknownAccount => DenyReason::UnknownAccount,
        Denial::Blocked => DenyReason::Blocked,
        Denial::TooManyCalls => DenyReason::TooManyCalls,
        Denial::InsufficientFunds => DenyReason::InsufficientFunds,
        Denial::NoRate => DenyReason::NoRate,
        Denial::CallEnded => DenyReason::Unspecified,
    }
}

/// Checks digest credentials against an account's stored HA1s; the reason if they fail.
///
/// Status is not part of the decision: a blocked account with the right password is valid,
/// so the processor can answer 403 rather than challenging again.
fn check_digest(account: Option<&Account>, req: &VerifyDigestRequest) -> Result<(), String> {
    let Some(account) = account else { return Err("unknown account".to_owned()) };
    let algorithm = match DigestAlgorithm::try_from(req.algorithm) {
        // RFC 3261: no algorithm parameter means MD5.
        Ok(DigestAlgorithm::Unspecified | DigestAlgorithm::Md5) => Algorithm::Md5,
        Ok(DigestAlgorithm::Sha256) => Algorithm::Sha256,
        Err(_) => return Err("unsupported algorithm".to_owned()),
    };
    let attempt = DigestAttempt {
        realm: &req.realm,
        algorithm,
        method: &req.method,
        uri: &req.uri,
        nonce: &req.nonce,
        qop: &req.qop,
        nc: &req.nc,
        cnonce: &req.cnonce,
        response: &req.response,
    };
    account::verify_digest(&account.realms, &attempt).map_err(|rejection| {
        debug!(aor = %account.aor, realm = %req.realm, %rejection, "digest rejected");
        rejection.to_string()
    })
}

/// Maps a store error to an RPC status, logging the ones that mean billing is unhealthy.
fn store_error(rpc: &'static str, e: Error) -> RpcStatus {
    match e {
        Error::InvalidInput { .. } | Error::InvalidAor { .. } => {
            RpcStatus::invalid_argument(e.to_string())
        }
        Error::Contended { .. } => {
            warn!(rpc, error = %e, "accounting update contended");
            RpcStatus::unavailable(e.to_string())
        }
        Error::CorruptRecord { .. } => {
            warn!(rpc, error = %e, "billing data is corrupt");
            RpcStatus::internal(e.to_string())
        }
        _ => {
            warn!(rpc, error = %e, "billing store unavailable");
            RpcStatus::unavailable(format!("billing store unavailable: {e}"))
        }
    }
}

#[tonic::async_trait]
impl Billing for BillingService {
    async fn get_account(
        &self,
        request: Request<GetAccountRequest>,
    ) -> Result<Response<GetAccountResponse>, RpcStatus> {
        let req = request.into_inner();
        let account = self.lookup("GetAccount", &req.aor).await?;
        Ok(Response::new(GetAccountResponse {
            exists: account.is_some(),
            status: wire_status(account.as_ref()) as i32,
        }))
    }

    async fn verify_digest(
        &self,
        request: Request<VerifyDigestRequest>,
    ) -> Result<Response<VerifyDigestResponse>, RpcStatus> {
        let req = request.into_inner();
        let account = self.lookup("VerifyDigest", &req.aor).await?;
        let (valid, reason) = match check_digest(account.as_ref(), &req) {
            Ok(()) => (true, String::new()),
            Err(reason) => (false, reason),
        };
        Ok(Response::new(VerifyDigestResponse {
            valid,
            status: wire_status(account.as_ref()) as i32,
            reason,
        }))
    }

    async fn authorize(
        &self,
        request: Request<AuthorizeRequest>,
    ) -> Result<Response<AuthorizeResponse>, RpcStatus> {
        let req = request.into_inner();
        let decision = match &req.credentials {
            None => self.store.authorize(&req.caller, &req.callee, &req.call_ref, now_ms()).await,
            Some(creds) => {
                // One read of the account serves the digest and the authorization.
                let account = self.lookup("Authorize", &req.caller).await?;
                let checked = if creds.aor == req.caller {
                    check_digest(account.as_ref(), creds)
                } else {
                    Err("credentials for another account".to_owned())
                };
                if let Err(reason) = checked {
                    debug!(caller = %req.caller, %reason, "call credentials rejected");
                    authorization_outcome("bad-credentials");
                    return Ok(Response::new(AuthorizeResponse {
                        allowed: false,
                        reason,
                        max_duration_secs: 0,
                        deny: DenyReason::BadCredentials as i32,
                    }));
                }
                match (Aor::parse(&req.caller), account) {
                    (Ok(aor), Some(account)) => {
                        let callee = &req.callee;
                        let store = &self.store;
                        store
                            .authorize_account(
                                &aor,
                                Some(&account),
                                callee,
                                &req.call_ref,
                                now_ms(),
                            )
                            .await
                    }
                    // check_digest accepted only an existing account.
                    _ => Ok(Authorization::Denied(Denial::UnknownAccount)),
                }
            }
        }
        .map_err(|e| store_error("Authorize", e))?;
        let reply = match decision {
            Authorization::Allowed { max_duration_secs, reserved_micros, repeated } => {
                debug!(
                    call_ref = %req.call_ref, caller = %req.caller, callee = %req.callee,
                    max_duration_secs, reserved_micros, repeated, "call authorized"
                );
                AuthorizeResponse {
                    allowed: true,
                    reason: String::new(),
                    max_duration_secs,
                    deny: DenyReason::Unspecified as i32,
                }
            }
            Authorization::Denied(denial) => {
                debug!(
                    call_ref = %req.call_ref, caller = %req.caller, callee = %req.callee,
                    reason = denial.reason(), "call denied"
                );
                AuthorizeResponse {
                    allowed: false,
                    reason: denial.reason().to_owned(),
                    max_duration_secs: 0,
                    deny: wire_denial(denial) as i32,
                }
            }
        };
        authorization_outcome(match DenyReason::try_from(reply.deny) {
            _ if reply.allowed => "allowed",
            Ok(DenyReason::InsufficientFunds) => "insufficient-funds",
            Ok(DenyReason::TooManyCalls) => "too-many-calls",
            Ok(DenyReason::NoRate) => "no-rate",
            Ok(DenyReason::Blocked) => "blocked",
            Ok(DenyReason::UnknownAccount) => "unknown-account",
            _ => "denied",
        });
        Ok(Response::new(reply))
    }

    async fn accounting_start(
        &self,
        request: Request<AccountingStartRequest>,
    ) -> Result<Response<AccountingResponse>, RpcStatus> {
        let req = request.into_inner();
        let start = CallStart {
            call_ref: req.call_ref,
            caller: req.caller,
            callee: req.callee,
            caller_ingress_ip: req.caller_ingress_ip,
            callee_ingress_ip: req.callee_ingress_ip,
            answered_ms: req.answered_at_ms,
        };
        let result = self
            .store
            .accounting_start(&start, now_ms())
            .await
            .map_err(|e| store_error("AccountingStart", e))?;
        debug!(call_ref = %start.call_ref, outcome = ?result.outcome, charge_micros = result.charge_micros, "start");
        Ok(Response::new(AccountingResponse {
            recorded: true,
            charge_micros: result.charge_micros,
        }))
    }

    async fn accounting_stop(
        &self,
        request: Request<AccountingStopRequest>,
    ) -> Result<Response<AccountingResponse>, RpcStatus> {
        let req = request.into_inner();
        let status = u16::try_from(req.status)
            .ok()
            .filter(|s| *s == 0 || (100..=699).contains(s))
            .ok_or_else(|| {
                RpcStatus::invalid_argument(format!("status {} is not a SIP status", req.status))
            })?;
        if !req.caller_ingress_ip.is_empty()
            && req.caller_ingress_ip.parse::<std::net::IpAddr>().is_err()
        {
            return Err(RpcStatus::invalid_argument("caller_ingress_ip is not an IP address"));
        }
        let stop = CallStop {
            call_ref: req.call_ref,
            ended_ms: req.ended_at_ms,
            cause: req.cause,
            idempotency_key: req.idempotency_key,
            answered: req.answered,
            status,
            reason: cdr_text(&req.reason, MAX_REASON),
            caller: cdr_text(&req.caller, MAX_PARTY),
            callee: cdr_text(&req.callee, MAX_PARTY),
            caller_ingress_ip: req.caller_ingress_ip,
        };
        let result = match req.start {
            // The processor's usual form: the answer travels with the stop.
            Some(start) => {
                let start = CallStart {
                    call_ref: start.call_ref,
                    caller: start.caller,
                    callee: start.callee,
                    caller_ingress_ip: start.caller_ingress_ip,
                    callee_ingress_ip: start.callee_ingress_ip,
                    answered_ms: start.answered_at_ms,
                };
                if start.call_ref != stop.call_ref {
                    return Err(RpcStatus::invalid_argument(
                        "start.call_ref differs from call_ref",
                    ));
                }
                self.store.accounting_start_stop(&start, &stop, now_ms()).await
            }
            None => self.store.accounting_stop(&stop, now_ms()).await,
        }
        .map_err(|e| store_error("AccountingStop", e))?;
        debug!(call_ref = %stop.call_ref, outcome = ?result.outcome, charge_micros = result.charge_micros, "stop");
        // Per the contract a retried stop is still "recorded": it was, the first time, and
        // it carries the charge applied then.
        Ok(Response::new(AccountingResponse {
            recorded: true,
            charge_micros: result.charge_micros,
        }))
    }
}

/// Counts one authorization by outcome (`sipalias_billing_authorizations_total{outcome}`).
fn authorization_outcome(outcome: &'static str) {
    metrics::counter!("sipalias_billing_authorizations_total", "outcome" => outcome).increment(1);
}

/// The name billing answers for in the gRPC health protocol (`grpc.health.v1.Health/Check`),
/// besides the empty name of the whole server.
pub const HEALTH_SERVICE: &str =
    <BillingServer<BillingService> as tonic::server::NamedService>::NAME;

/// Runs the billing gRPC server on `listener` until `shutdown` completes.
///
/// Connects to Redis first (failing if it cannot be reached after a few retries), then logs
/// `billing listening on <addr>` with the listener's real address (useful with port 0) and
/// serves. In-flight RPCs are allowed to finish on shutdown.
pub async fn serve(
    config: BillingConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    // The operations listener answers from before Redis is reached: alive, not yet ready.
    let connected: Arc<std::sync::OnceLock<Store>> = Arc::default();
    let ops = match sipalias_ops::parse_listen(&config.metrics_listen)
        .map_err(|why| Error::Config(format!("billing.metrics_listen: {why}")))?
    {
        Some(addr) => {
            let listener =
                TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
            let store = Arc::clone(&connected);
            let ready = sipalias_ops::probe(move || {
                let store = store.get().cloned();
                async move {
                    let store = store.ok_or("redis: not connected yet")?;
                    store.ping().await.map_err(|e| format!("redis: {e}"))
                }
            });
            let metrics = sipalias_ops::install_metrics();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let stopped = async move {
                let _ = stopped.await;
            };
            Some((stop, tokio::spawn(sipalias_ops::serve(listener, metrics, ready, stopped))))
        }
        None => None,
    };
    let store = Store::connect(&config).await?;
    let _ = connected.set(store.clone());
    // With metrics on: calls in progress cluster-wide, counted off the RPC path.
    let gauges = ops.is_some().then(|| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RESERVATIONS_INTERVAL);
            loop {
                tick.tick().await;
                match store.reservations_held().await {
                    Ok(n) => metrics::gauge!("sipalias_billing_reservations").set(n as f64),
                    Err(e) => tracing::debug!("reservations not counted: {e}"),
                }
            }
        })
    });
    let addr = listener.local_addr()?;
    let service = BillingService::new(store);
    let require = sipalias_proto::link_auth::Require::new(&config.link_secret)
        .map_err(|why| Error::Config(format!("billing.link_secret: {why}")))?;
    if config.link_secret.is_empty() {
        tracing::warn!("no link_secret: any local process can call billing (loopback only)");
    }
    // The standard gRPC health protocol (grpc.health.v1), open without the link secret so
    // that container and load-balancer probes need no secret: it tells only whether billing
    // serves, which it does from here on (Redis was reached above).
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status(HEALTH_SERVICE, tonic_health::ServingStatus::Serving).await;
    info!("billing listening on {addr}");
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(BillingServer::with_interceptor(service, require))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    if let Some(gauges) = gauges {
        gauges.abort();
    }
    if let Some((stop, task)) = ops {
        drop(stop);
        let _ = task.await;
    }
    info!("billing stopped");
    Ok(())
}

/// How often `sipalias_billing_reservations` is counted (a `SCAN` of the keyspace).
const RESERVATIONS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Longest reason phrase kept in a CDR, in characters.
const MAX_REASON: usize = 128;
/// Longest caller or callee kept in a CDR of a failed attempt, in characters.
const MAX_PARTY: usize = 256;

/// Text a processor relays into a CDR (a reason phrase, a dialled URI): at most `max`
/// characters, control characters replaced, so an export or a terminal gets one clean field.
fn cdr_text(text: &str, max: usize) -> String {
    text.chars().take(max).map(|c| if c.is_control() { '?' } else { c }).collect()
}

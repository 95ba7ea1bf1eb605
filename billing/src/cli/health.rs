//! `sipalias-billing health`: one gRPC health-protocol check of a running billing service.

use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::error::Error;
use crate::service::HEALTH_SERVICE;

/// How long a check may take in all: a probe must answer before its runner's own timeout.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Succeeds when billing at `url` answers `SERVING` for [`HEALTH_SERVICE`].
pub async fn check(url: &str) -> Result<(), Error> {
    let unhealthy = |reason: String| Error::Unhealthy { url: url.to_owned(), reason };
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| unhealthy(format!("not a URL: {e}")))?
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT);
    let channel =
        endpoint.connect().await.map_err(|e| unhealthy(format!("cannot connect: {e}")))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest { service: HEALTH_SERVICE.to_owned() })
        .await
        .map_err(|e| unhealthy(format!("health check failed: {}", e.message())))?;
    match answer.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(unhealthy(format!("status {}", other.as_str_name()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hostile_or_dead_urls_are_unhealthy_not_a_panic() {
        for url in ["", "not a url", "http://127.0.0.1:1", "ftp://[::1", "http://\u{0}:7080"] {
            let err = check(url).await.expect_err(url);
            assert!(matches!(err, Error::Unhealthy { .. }), "{url}: {err}");
        }
    }
}

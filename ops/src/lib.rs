//! The operations listener of a sipalias service (`metrics_listen`): one small HTTP server with
//!
//! - `GET /metrics`: Prometheus exposition of everything the service recorded through the
//!   [`metrics`] macros (the recorder [`install_metrics`] sets up);
//! - `GET /healthz`: `200 ok` while the process serves HTTP at all (liveness);
//! - `GET /readyz`: `200 ready` when the service's own [`Probe`] says it can do its job now,
//!   else `503` with what it waits for (readiness: a load balancer, keepalived or compose stops
//!   sending it work).
//!
//! It is meant for a private address (loopback, a management network): it has no
//! authentication, like the exporters of Kamailio and OpenSIPS.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// How long a readiness probe may take before the answer is "not ready".
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Buckets of every `*_seconds` histogram: SIP latencies from a millisecond to a few seconds.
const SECONDS_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// A readiness check: `Ok` when the service can do its job now, `Err` naming what it waits
/// for (`"redis: connection refused"`).
pub type Probe =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// A [`Probe`] from an async closure.
pub fn probe<F, Fut>(check: F) -> Probe
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    Arc::new(move || Box::pin(check()))
}

/// The process-wide Prometheus recorder (histograms ending in `_seconds` get SIP latency
/// buckets), installed on the first call; later calls (a test running two services in one
/// process) get the same handle. `None` if another recorder was installed first.
pub fn install_metrics() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            match recorder_builder()
                .and_then(|b| b.install_recorder().map_err(|e| format!("metrics recorder: {e}")))
            {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics not recorded");
                    None
                }
            }
        })
        .clone()
}

fn recorder_builder() -> Result<PrometheusBuilder, String> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .map_err(|e| format!("metrics buckets: {e}"))
}

/// Parses a `metrics_listen` value: empty is off, else an `ip:port` to bind.
pub fn parse_listen(value: &str) -> Result<Option<SocketAddr>, String> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|_| format!("{value:?} is not an ip:port (or empty to turn it off)"))
}

#[derive(Clone)]
struct Shared {
    metrics: Option<PrometheusHandle>,
    ready: Probe,
}

/// The listener's routes, for [`serve`] and for tests.
fn router(metrics: Option<PrometheusHandle>, ready: Probe) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(Shared { metrics, ready })
}

/// Serves the routes on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Option<PrometheusHandle>,
    ready: Probe,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "ops listener: /metrics /healthz /readyz");
    }
    axum::serve(listener, router(metrics, ready)).with_graceful_shutdown(shutdown).await
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Shared>) -> Response {
    match tokio::time::timeout(PROBE_TIMEOUT, (s.ready)()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(why)) => {
            tracing::debug!(%why, "not ready");
            (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")).into_response()
        }
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: no answer within {PROBE_TIMEOUT:?}\n"),
        )
            .into_response(),
    }
}

async fn render_metrics(State(s): State<Shared>) -> Response {
    let Some(handle) = s.metrics else {
        return (StatusCode::NOT_FOUND, "metrics are not recorded in this process\n")
            .into_response();
    };
    handle.run_upkeep();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves `router` on a loopback port; returns its address.
    async fn start(metrics: Option<PrometheusHandle>, ready: Probe) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve(listener, metrics, ready, std::future::pending()));
        addr
    }

    /// One raw HTTP/1.1 request; returns the status and the body.
    async fn request(addr: SocketAddr, raw: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(raw.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        (status, body)
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        request(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).await
    }

    #[tokio::test]
    async fn health_is_always_ok_and_readiness_follows_the_probe() {
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f = Arc::clone(&flag);
        let ready = probe(move || {
            let ok = f.load(std::sync::atomic::Ordering::SeqCst);
            async move { if ok { Ok(()) } else { Err("redis: connection refused".into()) } }
        });
        let addr = start(None, ready).await;
        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));
        assert_eq!(
            get(addr, "/readyz").await,
            (503, "not ready: redis: connection refused\n".into())
        );
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(get(addr, "/readyz").await, (200, "ready\n".into()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_hangs_is_not_ready_after_the_timeout() {
        // Virtual time: the runtime jumps the two seconds while the probe waits forever.
        let addr = start(None, probe(std::future::pending)).await;
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!(status, 503);
        assert!(body.contains("no answer within 2s"), "{body}");
    }

    #[tokio::test]
    async fn metrics_render_what_was_recorded_and_hostile_requests_get_4xx() {
        let recorder = recorder_builder().expect("builder").build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("sipalias_test_requests_total", "ip" => "127.0.0.2").increment(3);
            metrics::histogram!("sipalias_test_setup_seconds").record(0.004);
        });
        let addr = start(Some(handle), probe(|| async { Ok(()) })).await;
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("sipalias_test_requests_total{ip=\"127.0.0.2\"} 3"), "{body}");
        assert!(body.contains("sipalias_test_setup_seconds_bucket{le=\"0.005\"} 1"), "{body}");
        assert_eq!(get(addr, "/nope").await.0, 404);
        let (post, _) = request(
            addr,
            "POST /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert_eq!(post, 405);
        let (garbage, _) = request(addr, "\u{1}\u{2} / HTTP/9\r\n\r\n").await;
        assert!(garbage == 400 || garbage == 0, "garbage got {garbage}");
        let long =
            format!("GET /{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "a".repeat(70_000));
        let (status, _) = request(addr, &long).await;
        assert!(
            status == 414 || status == 431 || status == 400 || status == 404,
            "long got {status}"
        );
        // Still serving after all that.
        assert_eq!(get(addr, "/healthz").await.0, 200);
    }

    #[test]
    fn listen_values_are_an_address_or_empty() {
        assert_eq!(parse_listen(""), Ok(None));
        assert_eq!(parse_listen("  "), Ok(None));
        assert_eq!(
            parse_listen("127.0.0.1:9090"),
            Ok(Some("127.0.0.1:9090".parse().expect("addr")))
        );
        assert_eq!(parse_listen("[::1]:9090").map(|a| a.map(|a| a.port())), Ok(Some(9090)));
        for bad in ["9090", "localhost:9090", "127.0.0.1", "127.0.0.1:99999", "127.0.0.1:9090\n;rm"]
        {
            assert!(parse_listen(bad).is_err(), "{bad:?}");
        }
    }
}

//! The sipalias processor: the SIP brain of the cluster.
//!
//! It dials in to the dispatchers ([`edge`]), runs RFC 3261 transactions ([`transaction`]), the
//! registrar ([`registrar`], [`location`]), digest authentication ([`auth`]) and the B2BUA
//! ([`b2bua`]), and asks billing ([`billing`]) about every call. Protocol logic ([`core`],
//! [`b2bua`], [`transaction`], [`registrar`], [`auth`]) is sans-IO; [`node`] and [`edge`] are the
//! async shell around it.

pub mod accounting;
pub mod admin;
pub mod answer;
pub mod audit;
pub mod auth;
pub mod b2bua;
pub mod bans;
pub mod billing;
pub mod call_setup;
pub mod clock;
pub mod config;
pub mod core;
pub mod destination;
pub mod dialogs;
pub mod dids;
pub mod edge;
pub mod error;
pub mod ids;
pub mod keepalive;
pub mod links;
pub mod location;
pub mod node;
pub mod registrar;
pub mod registrations;
pub mod replay;
pub mod routing;
pub mod sockets;
pub mod telemetry;
pub mod transaction;
pub mod transport;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub use config::ProcessorConfig;

/// How long the tasks get to end after the stop (the dialog writer flushing its queue).
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
pub use error::{BillingFailure, Error};

/// Runs a processor until `shutdown` completes.
pub async fn run(
    config: ProcessorConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let timeout = Duration::from_millis(config.billing_timeout_ms.max(200));
    // The operations listener answers from before Redis is reached: alive, not yet ready.
    let started: Arc<OnceLock<Arc<node::Node>>> = Arc::default();
    let ops_stop = sipalias_startup::Stop::new();
    let ops = match sipalias_ops::parse_listen(&config.metrics_listen)
        .map_err(|why| Error::Config(format!("processor.metrics_listen: {why}")))?
    {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                Error::Config(format!("processor.metrics_listen: cannot bind {addr}: {e}"))
            })?;
            let node = Arc::clone(&started);
            let ready = sipalias_ops::probe(move || {
                let node = node.get().cloned();
                async move {
                    match node {
                        Some(node) => node.readiness().await,
                        None => Err("redis: not connected yet".into()),
                    }
                }
            });
            let metrics = sipalias_ops::install_metrics();
            let mut stopping = ops_stop.stopping();
            let stopped = async move { stopping.wait().await };
            Some(tokio::spawn(sipalias_ops::serve(listener, metrics, ready, stopped)))
        }
        None => None,
    };
    let location = connect_redis(&config, timeout).await?;
    let billing = billing::Billing::new(&config.billing_url, &config.link_secret, timeout)?;
    let (node, dialog_writer) = node::Node::new(config.clone(), location, billing);
    let _ = started.set(Arc::clone(&node));
    tracing::info!(id = %config.id, "processor started");
    let stop = sipalias_startup::Stop::new();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(dialog_writer.run(stop.stopping()));
    tasks.spawn(node.clone().run_timers(stop.stopping()));
    tasks.spawn(node.clone().run_keepalives(stop.stopping()));
    tasks.spawn(node.clone().run_binding_stats(stop.stopping()));
    tasks.spawn(node.clone().run_admin(stop.stopping()));
    tasks.spawn(node.clone().run_load_gauges(stop.stopping()));
    tasks.spawn(node.accounting().clone().run_drain(Duration::from_secs(1), stop.stopping()));
    for url in &config.dispatchers {
        tasks.spawn(edge::maintain(node.clone(), url.clone(), stop.stopping()));
    }
    shutdown.await;
    drain(&node, Duration::from_secs(u64::from(config.drain_timeout_secs))).await;
    // Every task ends at its next turn; the dialog writer first writes what is queued.
    stop.trigger();
    let ended =
        tokio::time::timeout(STOP_TIMEOUT, async { while tasks.join_next().await.is_some() {} })
            .await;
    if ended.is_err() {
        tracing::warn!("tasks still busy {STOP_TIMEOUT:?} after the stop; abandoning them");
        tasks.shutdown().await;
    }
    ops_stop.trigger();
    if let Some(ops) = ops {
        let _ = ops.await;
    }
    tracing::info!(id = %config.id, "processor stopped");
    Ok(())
}

/// Graceful drain: ask the dispatchers for no new work, let registrations and calls in setup
/// finish (bounded by `timeout`), leave answered calls in Redis, and return.
async fn drain(node: &Arc<node::Node>, timeout: Duration) {
    tracing::info!(id = %node.id(), "processor draining");
    node.links().drain();
    let deadline = tokio::time::Instant::now() + timeout;
    // Polled: draining is rare and short, and the work it waits for has no single event.
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        if node.is_idle() {
            tracing::info!(id = %node.id(), "processor drained");
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(id = %node.id(), "drain timeout: exiting with work in progress");
            return;
        }
    }
}

/// Connects to Redis, retrying: a processor started before Redis waits for it.
async fn connect_redis(
    config: &ProcessorConfig,
    timeout: Duration,
) -> Result<location::Location, Error> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match location::Location::connect(&config.redis_url, &config.key_prefix, timeout).await {
            Ok(l) => return Ok(l),
            Err(e) => {
                tracing::warn!(error = %e, url = %config.redis_url, "redis not reachable yet");
                // Backoff between connection attempts, not synchronisation.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

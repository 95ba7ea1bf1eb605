//! The sipalias processor: the SIP brain of the cluster.
//!
//! It dials in to the dispatchers ([`edge`]), runs RFC 3261 transactions ([`transaction`]), the
//! registrar ([`registrar`], [`location`]), digest authentication ([`auth`]) and the B2BUA
//! ([`b2bua`]), and asks billing ([`billing`]) about every call. Protocol logic ([`core`],
//! [`b2bua`], [`transaction`], [`registrar`], [`auth`]) is sans-IO; [`node`] and [`edge`] are the
//! async shell around it.

pub mod accounting;
pub mod auth;
pub mod b2bua;
pub mod billing;
pub mod config;
pub mod core;
pub mod dialogs;
pub mod edge;
pub mod error;
pub mod ids;
pub mod keepalive;
pub mod location;
pub mod node;
pub mod registrar;
pub mod sockets;
pub mod transaction;
pub mod transport;

use std::time::Duration;

pub use config::ProcessorConfig;
pub use error::Error;

/// Runs a processor until `shutdown` completes.
pub async fn run(
    config: ProcessorConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let timeout = Duration::from_millis(config.billing_timeout_ms.max(200));
    let location = connect_redis(&config, timeout).await?;
    let billing = billing::Billing::new(&config.billing_url, timeout)?;
    let node = node::Node::new(config.clone(), location, billing);
    tracing::info!(id = %config.id, "processor started");
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(node.clone().run_timers());
    tasks.spawn(node.clone().run_keepalives());
    tasks.spawn(node.accounting().clone().run_drain(Duration::from_secs(1)));
    for url in &config.dispatchers {
        tasks.spawn(edge::maintain(node.clone(), url.clone()));
    }
    shutdown.await;
    tracing::info!(id = %config.id, "processor stopping");
    tasks.abort_all();
    Ok(())
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

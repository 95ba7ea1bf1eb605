//! What a processor counts for its operations listener (`/metrics`): the final answer of every
//! request per edge socket (REGISTERs by outcome and INVITEs by final status, per alias),
//! call-setup latency, and what it holds. Label values come from fixed sets, and each
//! counter is looked up once, not built per message.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics::Counter;

use crate::transport::LocalAddr;

type Key = (LocalAddr, &'static str, u16);

fn counters() -> &'static Mutex<HashMap<Key, Counter>> {
    static COUNTERS: OnceLock<Mutex<HashMap<Key, Counter>>> = OnceLock::new();
    COUNTERS.get_or_init(Mutex::default)
}

/// Counts the final response to a request received on `local`
/// (`sipalias_sip_final_responses_total{ip, port, transport, method, status}`).
pub fn final_response(local: &LocalAddr, method: Option<&str>, status: u16) {
    let method = sipmsg::methods::label(method.unwrap_or_default());
    // A status outside 200-699 is never sent; keep the label set fixed regardless.
    let status = if (200..700).contains(&status) { status } else { 0 };
    let key = (*local, method, status);
    let mut map = counters().lock().unwrap_or_else(|p| p.into_inner());
    map.entry(key)
        .or_insert_with(|| {
            let labels = [
                ("ip", local.addr.ip().to_string()),
                ("port", local.addr.port().to_string()),
                ("transport", local.transport.as_str().to_owned()),
                ("method", method.to_owned()),
                ("status", status.to_string()),
            ];
            metrics::counter!("sipalias_sip_final_responses_total", &labels)
        })
        .increment(1);
}

/// Records how long an INVITE arriving on `local` took from arrival to ringing its callee or
/// to its refusal (Redis, billing and the processor's own work).
pub fn call_setup(local: &LocalAddr, took: Duration) {
    metrics::histogram!("sipalias_call_setup_seconds", "ip" => local.addr.ip().to_string())
        .record(took.as_secs_f64());
}

/// How often [`load`] is recorded.
pub const LOAD_INTERVAL: Duration = Duration::from_secs(5);

/// What the processor holds: client and server transactions, calls, setups in flight.
pub fn load(client: usize, server: usize, calls: usize, setups: usize) {
    metrics::gauge!("sipalias_transactions", "side" => "client").set(client as f64);
    metrics::gauge!("sipalias_transactions", "side" => "server").set(server as f64);
    metrics::gauge!("sipalias_calls").set(calls as f64);
    metrics::gauge!("sipalias_setups_in_flight").set(setups as f64);
}

/// Counts a new request turned away with `503` while overloaded, by why.
pub fn shed(why: &'static str) {
    metrics::counter!("sipalias_overload_503_total", "reason" => why).increment(1);
}

/// Live registrations through `ip`, cluster-wide (`sipalias_bindings{ip}`): the migration
/// gauge. Every processor reports the same count: aggregate with `max`, not `sum`.
pub fn bindings(ip: std::net::IpAddr, n: u64) {
    metrics::gauge!("sipalias_bindings", "ip" => ip.to_string()).set(n as f64);
}

/// One call to billing (`what`: the RPC name): its latency, and whether it failed (an error
/// status or no answer within the deadline). The billing outage state is the error rate.
pub fn billing_call(what: &'static str, took: Duration, ok: bool) {
    metrics::histogram!("sipalias_billing_call_seconds", "call" => what).record(took.as_secs_f64());
    if !ok {
        metrics::counter!("sipalias_billing_errors_total", "call" => what).increment(1);
    }
}

/// Answered calls this processor holds whose caller came in on `ip` (`sipalias_calls_up`).
pub fn calls_up(ip: std::net::IpAddr, n: usize) {
    metrics::gauge!("sipalias_calls_up", "ip" => ip.to_string()).set(n as f64);
}

/// Runs one Redis operation of the registration or call path, recording its latency
/// (`sipalias_redis_seconds{op}`) and, when it fails, `sipalias_redis_errors_total{op}`: a slow
/// or failing Redis shows here before phones notice.
pub async fn redis<T, E>(
    op: &'static str,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let started = std::time::Instant::now();
    let out = work.await;
    metrics::histogram!("sipalias_redis_seconds", "op" => op)
        .record(started.elapsed().as_secs_f64());
    if out.is_err() {
        metrics::counter!("sipalias_redis_errors_total", "op" => op).increment(1);
    }
    out
}

/// Accounting events waiting in Redis for billing to come back (cluster-wide queue).
pub fn accounting_queue(n: u64) {
    metrics::gauge!("sipalias_accounting_queue").set(n as f64);
}

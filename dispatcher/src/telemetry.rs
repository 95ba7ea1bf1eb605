//! What the dispatcher counts for its operations listener (`/metrics`): SIP messages per edge
//! socket, by request method or response class, and the processors linked. Label values come
//! from fixed sets (a hostile method or status cannot grow them) and the counters of each
//! socket are looked up once, not built per message.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};

use metrics::Counter;
use sipalias_proto::edge::Transport;
use sipmsg::scan::Scan;

use crate::wire::transport_name;

/// The label of one received message: a request's method or a response's class.
fn kind_label(keys: &Scan<'_>) -> (&'static str, &'static str) {
    match (keys.method, keys.status) {
        (Some(m), _) => ("request", sipmsg::methods::label(m)),
        (None, Some(s)) => ("response", sipmsg::methods::status_class(s)),
        (None, None) => ("response", "other"),
    }
}

type Key = (SocketAddr, i32, &'static str, &'static str);

/// Counters already registered, per socket and label.
fn counters() -> &'static Mutex<HashMap<Key, Counter>> {
    static COUNTERS: OnceLock<Mutex<HashMap<Key, Counter>>> = OnceLock::new();
    COUNTERS.get_or_init(Mutex::default)
}

/// Counts a SIP message received on `local` (`sipalias_sip_received_total`).
pub(crate) fn received(local: SocketAddr, transport: Transport, keys: &Scan<'_>) {
    let (direction, label) = kind_label(keys);
    let key = (local, transport as i32, direction, label);
    let mut map = counters().lock().unwrap_or_else(|p| p.into_inner());
    map.entry(key)
        .or_insert_with(|| {
            let labels = [
                ("ip", local.ip().to_string()),
                ("port", local.port().to_string()),
                ("transport", transport_name(transport).to_owned()),
                ("direction", direction.to_owned()),
                ("kind", label.to_owned()),
            ];
            metrics::counter!("sipalias_sip_received_total", &labels)
        })
        .increment(1);
}

/// Sets `sipalias_processors_linked`: processors linked and not draining.
pub(crate) fn processors_linked(n: usize) {
    metrics::gauge!("sipalias_processors_linked").set(n as f64);
}

/// How often [`record_state`] runs: gauges of what the dispatcher holds.
pub(crate) const STATE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// What the dispatcher holds, as gauges: each linked processor's load as it reported it
/// (`sipalias_processor_transactions`, `_dialogs`, `_draining`, `_routed` by `processor`)
/// and the messages waiting in its link's queue (`sipalias_processor_queue`), TCP/TLS
/// connections by direction, SIP sockets by state, bans in force, and the guard's counters.
pub(crate) fn record_state(ctx: &crate::Context, now: std::time::Instant) {
    for p in ctx.router.members.status() {
        let id = p.id.clone();
        metrics::gauge!("sipalias_processor_transactions", "processor" => id.clone())
            .set(f64::from(p.transactions));
        metrics::gauge!("sipalias_processor_dialogs", "processor" => id.clone())
            .set(f64::from(p.dialogs));
        metrics::gauge!("sipalias_processor_draining", "processor" => id.clone())
            .set(if p.draining { 1.0 } else { 0.0 });
        metrics::gauge!("sipalias_processor_queue", "processor" => id.clone()).set(p.queued as f64);
        metrics::counter!("sipalias_processor_routed_total", "processor" => id).absolute(p.routed);
    }
    let (accepted, opened) = ctx.streams.connections();
    metrics::gauge!("sipalias_connections", "direction" => "accepted").set(accepted as f64);
    metrics::gauge!("sipalias_connections", "direction" => "opened").set(opened as f64);
    let (configured, draining) = ctx.sockets.counts();
    metrics::gauge!("sipalias_sockets", "state" => "configured").set(configured as f64);
    metrics::gauge!("sipalias_sockets", "state" => "draining").set(draining as f64);
    let guard = &ctx.router.guard;
    metrics::gauge!("sipalias_bans").set(guard.list(now).len() as f64);
    let c = &guard.counters;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    for (what, n) in [
        ("banned-source", load(&c.dropped_banned)),
        ("scanner", load(&c.dropped_scanners)),
        ("admission-503", load(&c.shed)),
        ("denied-destination", load(&c.denied_destinations)),
    ] {
        metrics::counter!("sipalias_guard_total", "what" => what).absolute(n);
    }
    metrics::counter!("sipalias_bans_started_total", "by" => "rate").absolute(load(&c.rate_bans));
    metrics::counter!("sipalias_bans_started_total", "by" => "processor")
        .absolute(load(&c.processor_bans));
}

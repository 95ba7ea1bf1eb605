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

//! The processor's senders to its dispatchers, one per linked dispatcher: where the core's
//! transmits, bans and drain notices go. Filled and emptied by the links ([`crate::edge`]).

use std::collections::HashMap;
use std::sync::RwLock;

use sipalias_proto::edge::processor_message::Kind as PKind;
use sipalias_proto::edge::{Drain, ProcessorMessage, Send};
use tokio::sync::mpsc;

use crate::transport::Transmit;

/// Senders to every connected dispatcher, by dispatcher id.
#[derive(Default)]
pub struct Links {
    by_id: RwLock<HashMap<String, mpsc::Sender<ProcessorMessage>>>,
    next_send: std::sync::atomic::AtomicU64,
    draining: std::sync::atomic::AtomicBool,
}

impl Links {
    /// Hands a transmit to the dispatcher owning its socket (any connected one if that
    /// dispatcher is unknown, since active/standby dispatchers share sockets).
    pub fn send(&self, t: Transmit) {
        let map = self.by_id.read().unwrap_or_else(|p| p.into_inner());
        let Some(link) = map.get(&t.egress.dispatcher_id).or_else(|| map.values().next()) else {
            tracing::warn!(to = %t.egress.remote, "no dispatcher connected; message dropped");
            return;
        };
        let id = self.next_send.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let msg = ProcessorMessage {
            kind: Some(PKind::Send(Send {
                id,
                egress: Some(t.egress.to_proto()),
                message: t.bytes,
                flow_only: t.egress.flow_only,
            })),
        };
        if link.try_send(msg).is_err() {
            tracing::warn!(to = %t.egress.remote, "dispatcher link queue full; message dropped");
        }
    }

    /// Tells every dispatcher to drop `source`'s traffic for `duration_ms`.
    pub fn ban(&self, source: &str, duration_ms: u64, reason: &str) {
        let map = self.by_id.read().unwrap_or_else(|p| p.into_inner());
        for link in map.values() {
            let ban = sipalias_proto::edge::Ban {
                source: source.to_owned(),
                duration_ms,
                reason: reason.to_owned(),
            };
            if link.try_send(ProcessorMessage { kind: Some(PKind::Ban(ban)) }).is_err() {
                tracing::warn!(%source, "dispatcher link queue full; ban not announced");
            }
        }
    }

    /// Tells every dispatcher to send this processor no new work (graceful drain); links made
    /// later (a dispatcher restarted meanwhile) are told as soon as they are up.
    pub fn drain(&self) {
        self.draining.store(true, std::sync::atomic::Ordering::SeqCst);
        let map = self.by_id.read().unwrap_or_else(|p| p.into_inner());
        for link in map.values() {
            let msg = ProcessorMessage { kind: Some(PKind::Drain(Drain {})) };
            if link.try_send(msg).is_err() {
                tracing::warn!("dispatcher link queue full; drain not announced");
            }
        }
    }

    /// Number of connected dispatchers.
    pub fn len(&self) -> usize {
        self.by_id.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no dispatcher is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn insert(&self, id: &str, tx: mpsc::Sender<ProcessorMessage>) {
        if self.draining.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = tx.try_send(ProcessorMessage { kind: Some(PKind::Drain(Drain {})) });
        }
        self.by_id.write().unwrap_or_else(|p| p.into_inner()).insert(id.to_owned(), tx);
    }

    pub(crate) fn remove(&self, id: &str) {
        self.by_id.write().unwrap_or_else(|p| p.into_inner()).remove(id);
    }
}

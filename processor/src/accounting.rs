//! Accounting delivery that survives a billing outage: a start or stop that billing does not
//! take is appended to a Redis stream (`<prefix>acctq:pending`) and re-delivered by every
//! processor's drain loop until billing takes it. Billing applies each stop once per
//! idempotency key, so a re-delivery after a lost reply, or two processors draining the same
//! entry, never charges twice.

use std::time::Duration;

use prost::Message;
use redis::aio::ConnectionManager;
use sipalias_proto::billing::{AccountingStartRequest, AccountingStopRequest};

use crate::billing::Billing;
use crate::error::Error;

/// One accounting event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A call was answered.
    Start(AccountingStartRequest),
    /// A call ended (or an authorized call never got answered).
    Stop(AccountingStopRequest),
}

impl Event {
    fn call_ref(&self) -> &str {
        match self {
            Event::Start(s) => &s.call_ref,
            Event::Stop(s) => &s.call_ref,
        }
    }

    fn encode(&self) -> (&'static str, Vec<u8>) {
        match self {
            Event::Start(s) => ("start", s.encode_to_vec()),
            Event::Stop(s) => ("stop", s.encode_to_vec()),
        }
    }

    fn decode(kind: &str, body: &[u8]) -> Option<Self> {
        match kind {
            "start" => AccountingStartRequest::decode(body).ok().map(Event::Start),
            "stop" => AccountingStopRequest::decode(body).ok().map(Event::Stop),
            _ => None,
        }
    }
}

/// Delivers accounting events, queueing what billing cannot take now.
#[derive(Clone)]
pub struct Accounting {
    billing: Billing,
    redis: ConnectionManager,
    key: String,
}

impl Accounting {
    /// Delivery through `billing`, with the pending queue in `redis` under `prefix`.
    pub fn new(billing: Billing, redis: ConnectionManager, prefix: &str) -> Self {
        Accounting { billing, redis, key: format!("{prefix}acctq:pending") }
    }

    async fn send(&self, event: &Event) -> Result<(), Error> {
        match event {
            Event::Start(s) => self.billing.start(s.clone()).await,
            Event::Stop(s) => self.billing.stop(s.clone()).await,
        }
    }

    /// Delivers now, or queues durably if billing does not answer.
    pub async fn deliver(&self, event: Event) {
        let Err(e) = self.send(&event).await else { return };
        let (kind, body) = event.encode();
        let mut conn = self.redis.clone();
        let queued: Result<String, _> = redis::cmd("XADD")
            .arg(&self.key)
            .arg("*")
            .arg("kind")
            .arg(kind)
            .arg("body")
            .arg(body)
            .query_async(&mut conn)
            .await;
        match queued {
            Ok(_) => {
                tracing::warn!(call_ref = %event.call_ref(), kind, error = %e, "billing unavailable: accounting queued")
            }
            Err(qe) => {
                tracing::error!(call_ref = %event.call_ref(), kind, error = %e, queue_error = %qe, "accounting LOST: billing and redis both unavailable")
            }
        }
    }

    /// Re-delivers queued events, oldest first; stops at the first one billing still refuses.
    /// Returns how many were delivered.
    pub async fn drain_once(&self) -> Result<usize, Error> {
        let mut conn = self.redis.clone();
        let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&self.key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(100)
            .query_async(&mut conn)
            .await?;
        let mut delivered = 0;
        for entry in entries.ids {
            let kind: Option<String> = entry.get("kind");
            let body: Option<Vec<u8>> = entry.get("body");
            let event = kind.zip(body).and_then(|(k, b)| Event::decode(&k, &b));
            if let Some(ev) = &event {
                self.send(ev).await?;
                delivered += 1;
            } else {
                tracing::error!(id = %entry.id, "undecodable accounting entry dropped from the queue");
            }
            let _: i64 =
                redis::cmd("XDEL").arg(&self.key).arg(&entry.id).query_async(&mut conn).await?;
        }
        Ok(delivered)
    }

    /// Drains the queue every `every`, until stopped (a delivery under way finishes: what is
    /// not delivered stays queued in Redis for the next processor).
    pub async fn run_drain(self, every: Duration, mut stopping: sipalias_startup::Stopping) {
        stopping.run_until(self.drain_loop(every)).await;
    }

    async fn drain_loop(self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let mut conn = self.redis.clone();
            if let Ok(n) = redis::cmd("XLEN").arg(&self.key).query_async::<u64>(&mut conn).await {
                crate::telemetry::accounting_queue(n);
            }
            match self.drain_once().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(delivered = n, "queued accounting delivered"),
                Err(e) => tracing::debug!(error = %e, "accounting queue not drained yet"),
            }
        }
    }
}

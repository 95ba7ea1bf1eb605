//! Answered calls in Redis, for takeover when a processor dies (DESIGN.md "State").
//!
//! `<prefix>dlg:{<call_ref>}` holds the JSON [`DialogRecord`]; `<prefix>dlgleg:{<call-id>}`
//! maps each leg's Call-ID to the call_ref, because an in-dialog request only names its own
//! leg. Writes come from one task per processor, in the order the B2BUA made them, so a later
//! state never loses to an earlier one.

use redis::aio::ConnectionManager;
use tokio::sync::mpsc;

use crate::b2bua::DialogRecord;
use crate::error::Error;
use sipalias_startup::Stopping;

/// How long a stored call outlives its last update when it has no cut-off time: a safety net
/// for calls whose end was never seen (both processors gone), not a call length limit.
const TTL_WITHOUT_CUTOFF_MS: u64 = 48 * 3600 * 1000;

/// The dialog store.
#[derive(Clone)]
pub struct DialogStore {
    redis: ConnectionManager,
    prefix: String,
}

/// A write, applied in order by [`DialogStore::run_writer`].
#[derive(Debug)]
pub enum Op {
    /// Store or update.
    Save(Box<DialogRecord>),
    /// Remove.
    Delete(Box<DialogRecord>),
}

impl DialogStore {
    /// A store under `prefix`.
    pub fn new(redis: ConnectionManager, prefix: &str) -> Self {
        DialogStore { redis, prefix: prefix.to_owned() }
    }

    fn key(&self, call_ref: &str) -> String {
        format!("{}dlg:{{{call_ref}}}", self.prefix)
    }

    fn leg_key(&self, call_id: &str) -> String {
        format!("{}dlgleg:{{{call_id}}}", self.prefix)
    }

    /// Stores a call and indexes both legs.
    pub async fn save(&self, r: &DialogRecord, now_ms: u64) -> Result<(), Error> {
        let ttl = match r.cutoff_at_ms {
            Some(at) => at.saturating_sub(now_ms) + 3_600_000,
            None => TTL_WITHOUT_CUTOFF_MS,
        };
        let json = serde_json::to_string(r)
            .map_err(|e| Error::Corrupt { key: self.key(&r.call_ref), detail: e.to_string() })?;
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(self.key(&r.call_ref)).arg(json).arg("PX").arg(ttl).ignore();
        for id in r.call_ids() {
            pipe.cmd("SET").arg(self.leg_key(id)).arg(&r.call_ref).arg("PX").arg(ttl).ignore();
        }
        let mut conn = self.redis.clone();
        let () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    /// Removes a call and its leg index.
    pub async fn delete(&self, r: &DialogRecord) -> Result<(), Error> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(self.key(&r.call_ref));
        for id in r.call_ids() {
            cmd.arg(self.leg_key(id));
        }
        let mut conn = self.redis.clone();
        let _: i64 = cmd.query_async(&mut conn).await?;
        Ok(())
    }

    /// The stored call one of whose legs has this Call-ID.
    pub async fn load(&self, call_id: &str) -> Result<Option<DialogRecord>, Error> {
        let leg = self.leg_key(call_id);
        let call_ref: Option<String> = crate::location::retry_once(|| {
            let mut conn = self.redis.clone();
            let cmd = redis::cmd("GET").arg(&leg).clone();
            async move { cmd.query_async(&mut conn).await }
        })
        .await?;
        let mut conn = self.redis.clone();
        let Some(call_ref) = call_ref else { return Ok(None) };
        let key = self.key(&call_ref);
        let json: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
        let Some(json) = json else { return Ok(None) };
        serde_json::from_str(&json)
            .map(Some)
            .map_err(|e| Error::Corrupt { key, detail: e.to_string() })
    }

    /// Every answered call stored in Redis (the operator's `calls`), with `SCAN`.
    pub async fn scan(&self) -> Result<Vec<DialogRecord>, Error> {
        let mut conn = self.redis.clone();
        let keys =
            crate::location::scan_keys(&mut conn, &format!("{}dlg:{{*}}", self.prefix)).await?;
        let mut out = Vec::new();
        for chunk in keys.chunks(1000) {
            let values: Vec<Option<String>> =
                redis::cmd("MGET").arg(chunk).query_async(&mut conn).await?;
            for (key, json) in chunk.iter().zip(values) {
                let Some(json) = json else { continue };
                let record = serde_json::from_str(&json)
                    .map_err(|e| Error::Corrupt { key: key.clone(), detail: e.to_string() })?;
                out.push(record);
            }
        }
        Ok(out)
    }

    async fn apply(&self, op: &Op) -> Result<(), Error> {
        match op {
            Op::Save(r) => self.save(r, crate::clock::wall_ms()).await,
            Op::Delete(r) => self.delete(r).await,
        }
    }

    /// Applies writes in order for as long as the processor runs.
    pub async fn run_writer(self, mut ops: mpsc::Receiver<Op>, mut stopping: Stopping) {
        loop {
            let op = tokio::select! {
                biased;
                op = ops.recv() => match op {
                    Some(op) => op,
                    None => return,
                },
                () = stopping.wait() => break,
            };
            self.write(op).await;
        }
        // Stopping: what the core queued before the stop is still written, so calls answered
        // just before a shutdown can be taken over by the other processors.
        while let Ok(op) = ops.try_recv() {
            self.write(op).await;
        }
    }

    async fn write(&self, op: Op) {
        let mut result = self.apply(&op).await;
        // Right after a Redis restart the first command reports the old connection's
        // failure and reconnects; one retry makes the write land.
        if let Err(Error::Redis(e)) = &result
            && (e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal())
        {
            result = self.apply(&op).await;
        }
        let what = match op {
            Op::Save(_) => "save",
            Op::Delete(_) => "delete",
        };
        if let Err(e) = result {
            let call_ref = match &op {
                Op::Save(r) | Op::Delete(r) => &r.call_ref,
            };
            tracing::warn!(%call_ref, error = %e, "dialog {what} failed: this call cannot be taken over");
        }
    }
}

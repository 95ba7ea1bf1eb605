//! Call detail records: reading and listing them.

use std::collections::HashMap;

use super::{Store, parse_field};
use crate::error::Error;

/// How many CDRs are fetched per round trip while listing.
const PAGE: usize = 500;

/// A call detail record. Fields not yet known (a stop without a start, a start without a
/// stop) are empty or `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cdr {
    /// Unique id of the call.
    pub call_ref: String,
    /// Caller's AOR: the account charged.
    pub caller: String,
    /// Callee's AOR.
    pub callee: String,
    /// Local IP the caller came in on.
    pub caller_ingress_ip: String,
    /// Local IP the callee was reached through.
    pub callee_ingress_ip: String,
    /// Answer time, ms since the epoch.
    pub answered_ms: Option<u64>,
    /// Hang-up time, ms since the epoch.
    pub ended_ms: Option<u64>,
    /// `ended_ms - answered_ms` (0 if the clocks disagree), once both are known.
    pub duration_ms: Option<u64>,
    /// Why the call ended.
    pub cause: String,
    /// For a call not answered: the final status its caller got (486, 487, 404, 402, ...).
    pub status: Option<u16>,
    /// Its reason phrase, or why the call was refused.
    pub reason: String,
    /// Idempotency key of the stop that was applied.
    pub stop_key: Option<String>,
    /// Longest duration the authorization allowed (0 = no limit), if it was authorized.
    pub max_duration_secs: Option<u32>,
    /// Seconds billed after rounding to the increments (rated calls).
    pub billed_secs: Option<u64>,
    /// Rate plan the call was priced with (rated calls).
    pub rate_plan: String,
    /// Prefix of the plan entry that matched, or `default` (rated calls).
    pub rate_prefix: String,
    /// What the call cost, debited from the caller's balance; `None` until it is charged.
    pub charge_micros: Option<i64>,
}

/// Which CDRs to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CdrQuery {
    /// At most this many, newest first; 0 = all.
    pub limit: usize,
    /// Only calls where this AOR is the caller or the callee.
    pub aor: Option<String>,
    /// Only calls answered (or, without a start, ended) at or after this time (ms).
    pub since_ms: Option<u64>,
    /// Only calls answered (or ended) before this time (ms).
    pub until_ms: Option<u64>,
}

impl Store {
    /// Deletes these CDRs and their index entries, a thousand per round trip; returns how
    /// many records existed.
    pub async fn delete_cdrs(&self, call_refs: &[String]) -> Result<usize, Error> {
        let mut deleted = 0;
        for chunk in call_refs.chunks(1000) {
            let mut pipe = redis::pipe();
            for r in chunk {
                pipe.del(self.cdr_key(r));
            }
            pipe.zrem(self.cdrs_key(), chunk).ignore();
            let counts: Vec<usize> = pipe.query_async(&mut self.conn.clone()).await?;
            deleted += counts.iter().sum::<usize>();
        }
        Ok(deleted)
    }

    /// CDRs matching `query`, newest first (by answer time, or end time while no start is
    /// known).
    pub async fn list_cdrs(&self, query: &CdrQuery) -> Result<Vec<Cdr>, Error> {
        let mut conn = self.conn.clone();
        let max = query.until_ms.map_or_else(|| "+inf".to_owned(), |u| format!("({u}"));
        let min = query.since_ms.map_or_else(|| "-inf".to_owned(), |s| s.to_string());
        let wanted = if query.limit == 0 { usize::MAX } else { query.limit };
        let mut cdrs = Vec::new();
        let mut offset = 0;
        loop {
            let refs: Vec<String> = redis::cmd("ZREVRANGEBYSCORE")
                .arg(self.cdrs_key())
                .arg(&max)
                .arg(&min)
                .arg("LIMIT")
                .arg(offset)
                .arg(PAGE)
                .query_async(&mut conn)
                .await?;
            if refs.is_empty() {
                break;
            }
            offset += refs.len();
            let mut pipe = redis::pipe();
            for r in &refs {
                pipe.hgetall(self.cdr_key(r));
            }
            let hashes: Vec<HashMap<String, String>> = pipe.query_async(&mut conn).await?;
            for (call_ref, fields) in refs.into_iter().zip(hashes) {
                // An index entry whose record was deleted (retention) is skipped.
                if fields.is_empty() {
                    continue;
                }
                let cdr = parse_cdr(&self.cdr_key(&call_ref), call_ref, fields)?;
                let matches =
                    query.aor.as_deref().is_none_or(|a| cdr.caller == a || cdr.callee == a);
                if matches {
                    cdrs.push(cdr);
                    if cdrs.len() >= wanted {
                        return Ok(cdrs);
                    }
                }
            }
        }
        Ok(cdrs)
    }
}

fn parse_cdr(
    key: &str,
    call_ref: String,
    mut fields: HashMap<String, String>,
) -> Result<Cdr, Error> {
    let answered_ms = parse_field(key, "answered_ms", fields.get("answered_ms"))?;
    let ended_ms = parse_field(key, "ended_ms", fields.get("ended_ms"))?;
    let duration_ms = parse_field(key, "duration_ms", fields.get("duration_ms"))?;
    let max_duration_secs = parse_field(key, "max_duration_secs", fields.get("max_duration_secs"))?;
    let billed_secs = parse_field(key, "billed_secs", fields.get("billed_secs"))?;
    let charge_micros = parse_field(key, "charge_micros", fields.get("charge_micros"))?;
    let status = parse_field(key, "status", fields.get("status"))?;
    let mut text = |name: &str| fields.remove(name).unwrap_or_default();
    Ok(Cdr {
        call_ref,
        caller: text("caller"),
        callee: text("callee"),
        caller_ingress_ip: text("caller_ingress_ip"),
        callee_ingress_ip: text("callee_ingress_ip"),
        cause: text("cause"),
        reason: text("reason"),
        status,
        rate_plan: text("rate_plan"),
        rate_prefix: text("rate_prefix"),
        answered_ms,
        ended_ms,
        duration_ms,
        max_duration_secs,
        billed_secs,
        charge_micros,
        stop_key: fields.remove("stop_key"),
    })
}

//! Billing's data in Redis: accounts, rate plans, reservations of calls in progress, and call
//! detail records.
//!
//! Layout (every key starts with `key_prefix`, default `sipalias:`; `docs/billing.md` has the
//! fields):
//!
//! | key                        | type | content |
//! |----------------------------|------|---------|
//! | `{prefix}acct:{aor}`       | HASH | status, credentials (HA1 per realm), kind, balance, credit limit, rate plan, call limit |
//! | `{prefix}accts`            | SET  | AORs, for listing |
//! | `{prefix}rate:{plan}`      | HASH | prefix (or `default`) → JSON [`Rate`](crate::rating::Rate) |
//! | `{prefix}rateplans`        | SET  | plan names, for listing |
//! | `{prefix}resv:{aor}`       | HASH | call ref → `{reserved_micros}:{expires_ms}`: the account's calls in progress |
//! | `{prefix}call:{call_ref}`  | HASH | the authorization of one call: account, tariff snapshot, max duration, state |
//! | `{prefix}cdr:{call_ref}`   | HASH | the call detail record |
//! | `{prefix}cdrs`             | ZSET | call refs scored by `answered_ms` (by `ended_ms` while no start is known) |
//!
//! Every change of money, reservations or CDRs is one Lua script, so it is atomic: 200
//! authorizations racing on one balance are serialised by Redis. The scripts touch an account,
//! its reservations and a call's records together, keys with no hash tag in common, so billing
//! needs a single (non-cluster) Redis.

mod accounts;
mod calls;
mod cdrs;
mod rate_plans;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::account::Aor;
use crate::config::BillingConfig;
use crate::error::Error;

pub use accounts::{AccountUsage, Reservation};
pub use calls::{AccountingOutcome, AccountingResult, Authorization, CallStart, CallStop, Denial};
pub use cdrs::{Cdr, CdrQuery};
pub use rate_plans::{RatePlanEntry, Tariff};

/// How long one connection attempt may take. Short, because the manager retries.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one command may take. Bounded so a stuck Redis turns into `unavailable` answers
/// instead of processors waiting on billing forever.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Reconnection attempts (exponential backoff from 100 ms, about a second in all). Few, so the
/// CLI and a starting service fail fast with a clear error; a supervisor restarts the service.
const CONNECT_RETRIES: usize = 4;
/// Longest pause between reconnection attempts. Requests wait for a reconnection in
/// progress, so a long pause would outlast the processors' billing timeout after Redis is
/// back (the first REGISTER would get a 503 for nothing).
const MAX_RECONNECT_DELAY: Duration = Duration::from_millis(250);

/// Handle on billing's Redis data. Cheap to clone: the underlying [`ConnectionManager`]
/// multiplexes one connection and reconnects by itself.
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    prefix: String,
    /// `billing.default_rate_plan`: the plan of accounts that name none.
    default_rate_plan: Option<String>,
    /// `billing.default_max_duration_secs` (0 = none).
    max_duration_cap_secs: u32,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("prefix", &self.prefix)
            .field("default_rate_plan", &self.default_rate_plan)
            .field("max_duration_cap_secs", &self.max_duration_cap_secs)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Connects to `config.redis_url` (retrying briefly) and uses the key prefix and the
    /// authorization defaults of `config`.
    pub async fn connect(config: &BillingConfig) -> Result<Self, Error> {
        let client = redis::Client::open(config.redis_url.as_str())
            .map_err(|e| Error::Config(format!("billing.redis_url: {e}")))?;
        // The address, not the URL: the URL may carry a password.
        let addr = client.get_connection_info().addr().to_string();
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(CONNECT_RETRIES)
            .set_max_delay(MAX_RECONNECT_DELAY);
        let conn = ConnectionManager::new_with_config(client, manager_config)
            .await
            .map_err(|source| Error::RedisConnect { addr, source })?;
        Ok(Self::from_connection(conn, config))
    }

    /// Calls in progress cluster-wide: the fields of every account's reservations hash (one
    /// per call authorized and not yet stopped; a lapsed one until the account's next
    /// authorization sweeps it). A `SCAN` of the keyspace: for the `/metrics` gauge, never on
    /// a call's path.
    pub async fn reservations_held(&self) -> Result<u64, Error> {
        let mut conn = self.conn.clone();
        let pattern = format!("{}resv:*", self.prefix);
        let (mut cursor, mut held) = (0u64, 0u64);
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.hlen(k);
                }
                let lens: Vec<u64> = pipe.query_async(&mut conn).await?;
                held += lens.iter().sum::<u64>();
            }
            if next == 0 {
                return Ok(held);
            }
            cursor = next;
        }
    }

    /// Whether Redis answers (`PING`), for readiness.
    pub async fn ping(&self) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    /// Wraps an existing connection manager, with the key prefix and authorization defaults of
    /// `config` (its `redis_url` is not used).
    pub fn from_connection(conn: ConnectionManager, config: &BillingConfig) -> Self {
        Self {
            conn,
            prefix: config.key_prefix.clone(),
            default_rate_plan: Some(config.default_rate_plan.clone()).filter(|p| !p.is_empty()),
            max_duration_cap_secs: config.default_max_duration_secs,
        }
    }

    fn account_key(&self, aor: &Aor) -> String {
        self.account_key_str(&aor.to_string())
    }

    /// For an AOR taken from a record, which may not parse (then no account has that key).
    fn account_key_str(&self, aor: &str) -> String {
        format!("{}acct:{aor}", self.prefix)
    }

    fn accounts_key(&self) -> String {
        format!("{}accts", self.prefix)
    }

    fn reservations_key(&self, aor: &str) -> String {
        format!("{}resv:{aor}", self.prefix)
    }

    fn call_key(&self, call_ref: &str) -> String {
        format!("{}call:{call_ref}", self.prefix)
    }

    fn rate_plan_key(&self, plan: &str) -> String {
        format!("{}rate:{plan}", self.prefix)
    }

    fn rate_plans_key(&self) -> String {
        format!("{}rateplans", self.prefix)
    }

    fn cdr_key(&self, call_ref: &str) -> String {
        format!("{}cdr:{call_ref}", self.prefix)
    }

    fn cdrs_key(&self) -> String {
        format!("{}cdrs", self.prefix)
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    // A clock before 1970 is not worth failing over; 0 marks it.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn validate_call_ref(call_ref: &str) -> Result<(), Error> {
    if call_ref.is_empty() {
        return Err(Error::InvalidInput {
            what: "call_ref",
            reason: "must not be empty".to_owned(),
        });
    }
    Ok(())
}

/// Parses an optional integer field of a stored record.
fn parse_field<T: std::str::FromStr>(
    key: &str,
    name: &str,
    value: Option<&String>,
) -> Result<Option<T>, Error> {
    match value {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| Error::CorruptRecord {
            key: key.to_owned(),
            reason: format!("bad {name} {v:?}"),
        }),
    }
}

//! Accounts and call detail records in Redis.
//!
//! Layout (every key starts with `key_prefix`, default `sipalias:`):
//!
//! | key                  | type | content |
//! |----------------------|------|---------|
//! | `{prefix}acct:{aor}` | HASH | `status` (`active`/`blocked`), `created_ms`, and per realm R `ha1:md5:{R}`, `ha1:sha256:{R}` (lower-case hex) |
//! | `{prefix}accts`      | SET  | AORs, for listing |
//! | `{prefix}cdr:{call_ref}` | HASH | `caller`, `callee`, `caller_ingress_ip`, `callee_ingress_ip`, `answered_ms`, `ended_ms`, `duration_ms`, `cause`, `stop_key` |
//! | `{prefix}cdrs`       | ZSET | call refs scored by `answered_ms` (by `ended_ms` while no start is known) |
//!
//! Multi-key updates run as Lua scripts so that they are atomic. The scripts touch both a
//! record and its index, so billing needs a single (non-cluster) Redis.

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sipmsg::digest::Algorithm;

use crate::account::{Account, Aor, RealmCredentials, Status, normalize_ha1};
use crate::config::BillingConfig;
use crate::error::Error;

/// How long one connection attempt may take. Short, because the manager retries.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one command may take. Bounded so a stuck Redis turns into `unavailable` answers
/// instead of processors waiting on billing forever.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Reconnection attempts (exponential backoff from 100 ms, about a second in all). Few, so the
/// CLI and a starting service fail fast with a clear error; a supervisor restarts the service.
const CONNECT_RETRIES: usize = 4;

const HA1_MD5: &str = "ha1:md5:";
const HA1_SHA256: &str = "ha1:sha256:";

/// Creates an account unless it exists; with `force`, replaces the credentials of an existing
/// one but keeps its status (a password reset must not unblock) and creation time.
/// Returns 0 = exists (not forced), 1 = created, 2 = replaced.
static ADD_ACCOUNT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
-- KEYS[1] account hash, KEYS[2] account set
-- ARGV[1] force '1'/'0', ARGV[2] aor, ARGV[3] now ms, ARGV[4..] field, value, ...
local exists = redis.call('EXISTS', KEYS[1]) == 1
if exists and ARGV[1] ~= '1' then return 0 end
if exists then
  for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(f, 1, 4) == 'ha1:' then redis.call('HDEL', KEYS[1], f) end
  end
else
  redis.call('HSET', KEYS[1], 'status', 'active', 'created_ms', ARGV[3])
end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SADD', KEYS[2], ARGV[2])
if exists then return 2 end
return 1
",
    )
});

/// Sets the status of an existing account; returns 0 when there is no such account, so that a
/// typo in `account block` does not create a credential-less account.
static SET_STATUS: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
return 1
",
    )
});

/// Records the answer of a call. A stop may have arrived first (reordered or retried RPCs),
/// in which case the duration is computed now.
static ACCOUNTING_START: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
-- KEYS[1] cdr hash, KEYS[2] cdr zset
-- ARGV: call_ref, caller, callee, caller_ingress_ip, callee_ingress_ip, answered_ms
redis.call('HSET', KEYS[1], 'caller', ARGV[2], 'callee', ARGV[3],
  'caller_ingress_ip', ARGV[4], 'callee_ingress_ip', ARGV[5], 'answered_ms', ARGV[6])
local ended = redis.call('HGET', KEYS[1], 'ended_ms')
if ended then
  local d = tonumber(ended) - tonumber(ARGV[6])
  if d < 0 then d = 0 end
  redis.call('HSET', KEYS[1], 'duration_ms', string.format('%d', d))
end
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
return 1
",
    )
});

/// Records the end of a call once: the first stop wins and later ones (retries carrying the
/// same idempotency key, or a duplicate from another path) are reported, not applied.
/// Returns 1 = recorded now, 0 = already recorded.
static ACCOUNTING_STOP: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
-- KEYS[1] cdr hash, KEYS[2] cdr zset
-- ARGV: call_ref, ended_ms, cause, stop_key
if redis.call('HEXISTS', KEYS[1], 'stop_key') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'ended_ms', ARGV[2], 'cause', ARGV[3], 'stop_key', ARGV[4])
local answered = redis.call('HGET', KEYS[1], 'answered_ms')
if answered then
  local d = tonumber(ARGV[2]) - tonumber(answered)
  if d < 0 then d = 0 end
  redis.call('HSET', KEYS[1], 'duration_ms', string.format('%d', d))
else
  -- No start seen: index by end time so the record is still listed.
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
end
return 1
",
    )
});

/// What `accounting_start` is told about an answered call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallStart {
    /// Unique id of the call, chosen by the processor.
    pub call_ref: String,
    /// Caller's AOR.
    pub caller: String,
    /// Callee's AOR.
    pub callee: String,
    /// Local IP the caller came in on.
    pub caller_ingress_ip: String,
    /// Local IP the callee was reached through.
    pub callee_ingress_ip: String,
    /// Answer time, milliseconds since the Unix epoch.
    pub answered_ms: u64,
}

/// Result of `accounting_stop`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// This stop was applied.
    Recorded,
    /// A stop had already been applied to this call; nothing changed.
    AlreadyRecorded,
}

/// A call detail record. Fields not yet known (a stop without a start, a start without a
/// stop) are empty or `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cdr {
    /// Unique id of the call.
    pub call_ref: String,
    /// Caller's AOR.
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
    /// Idempotency key of the stop that was applied.
    pub stop_key: Option<String>,
}

/// Handle on billing's Redis data. Cheap to clone: the underlying [`ConnectionManager`]
/// multiplexes one connection and reconnects by itself.
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl Store {
    /// Connects to `config.redis_url` (retrying briefly) and uses `config.key_prefix`.
    pub async fn connect(config: &BillingConfig) -> Result<Self, Error> {
        let client = redis::Client::open(config.redis_url.as_str())
            .map_err(|e| Error::Config(format!("billing.redis_url: {e}")))?;
        // The address, not the URL: the URL may carry a password.
        let addr = client.get_connection_info().addr().to_string();
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(CONNECT_RETRIES);
        let conn = ConnectionManager::new_with_config(client, manager_config)
            .await
            .map_err(|source| Error::RedisConnect { addr, source })?;
        Ok(Self::from_connection(conn, config.key_prefix.clone()))
    }

    /// Wraps an existing connection manager.
    pub fn from_connection(conn: ConnectionManager, key_prefix: String) -> Self {
        Self { conn, prefix: key_prefix }
    }

    fn account_key(&self, aor: &Aor) -> String {
        format!("{}acct:{aor}", self.prefix)
    }

    fn accounts_key(&self) -> String {
        format!("{}accts", self.prefix)
    }

    fn cdr_key(&self, call_ref: &str) -> String {
        format!("{}cdr:{call_ref}", self.prefix)
    }

    fn cdrs_key(&self) -> String {
        format!("{}cdrs", self.prefix)
    }

    /// Creates an account with MD5 and SHA-256 HA1s of `password` for each realm (the AOR's
    /// domain when `realms` is empty). The digest username is the AOR's user part.
    ///
    /// An existing account is refused with [`Error::AccountExists`] unless `force`, which
    /// replaces all its credentials but keeps its status and creation time.
    pub async fn add_account(
        &self,
        aor: &Aor,
        password: &str,
        realms: &[String],
        force: bool,
    ) -> Result<Account, Error> {
        if password.is_empty() {
            return Err(Error::InvalidInput {
                what: "--password",
                reason: "must not be empty".to_owned(),
            });
        }
        let realms = realm_list(aor, realms)?;
        let mut invocation = ADD_ACCOUNT.prepare_invoke();
        invocation
            .key(self.account_key(aor))
            .key(self.accounts_key())
            .arg(if force { "1" } else { "0" })
            .arg(aor.to_string())
            .arg(now_ms());
        for realm in &realms {
            let creds = RealmCredentials::from_password(aor.user(), realm, password);
            for (field, ha1) in ha1_fields(realm, &creds) {
                invocation.arg(field).arg(ha1);
            }
        }
        let outcome: i64 = invocation.invoke_async(&mut self.conn.clone()).await?;
        if outcome == 0 {
            return Err(Error::AccountExists(aor.to_string()));
        }
        self.get(aor).await?.ok_or_else(|| Error::AccountNotFound(aor.to_string()))
    }

    /// Adds HA1s obtained elsewhere (a migration from another system: billing never needs
    /// the passwords) for one realm. Creates the account, active, if it does not exist.
    /// Hashes already stored for other realms, or for the other algorithm, are kept.
    pub async fn import_account(
        &self,
        aor: &Aor,
        realm: &str,
        ha1_md5: Option<&str>,
        ha1_sha256: Option<&str>,
    ) -> Result<Account, Error> {
        validate_realm(realm)?;
        if ha1_md5.is_none() && ha1_sha256.is_none() {
            return Err(Error::InvalidInput {
                what: "HA1",
                reason: "give --ha1-md5, --ha1-sha256 or both".to_owned(),
            });
        }
        let creds = RealmCredentials {
            ha1_md5: ha1_md5.map(|h| normalize_ha1("--ha1-md5", Algorithm::Md5, h)).transpose()?,
            ha1_sha256: ha1_sha256
                .map(|h| normalize_ha1("--ha1-sha256", Algorithm::Sha256, h))
                .transpose()?,
        };
        let key = self.account_key(aor);
        let fields = ha1_fields(realm, &creds);
        // MULTI/EXEC: status and creation time are only set when the account is new.
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset_nx(&key, "status", Status::Active.as_str())
            .ignore()
            .hset_nx(&key, "created_ms", now_ms())
            .ignore()
            .hset_multiple(&key, &fields)
            .ignore()
            .sadd(self.accounts_key(), aor.to_string())
            .ignore();
        let () = pipe.query_async(&mut self.conn.clone()).await?;
        self.get(aor).await?.ok_or_else(|| Error::AccountNotFound(aor.to_string()))
    }

    /// Blocks or unblocks an existing account.
    pub async fn set_status(&self, aor: &Aor, status: Status) -> Result<(), Error> {
        let changed: i64 = SET_STATUS
            .key(self.account_key(aor))
            .arg(status.as_str())
            .invoke_async(&mut self.conn.clone())
            .await?;
        if changed == 0 {
            return Err(Error::AccountNotFound(aor.to_string()));
        }
        Ok(())
    }

    /// The account, or `None` if there is none.
    pub async fn get(&self, aor: &Aor) -> Result<Option<Account>, Error> {
        let key = self.account_key(aor);
        let fields: HashMap<String, String> =
            redis::cmd("HGETALL").arg(&key).query_async(&mut self.conn.clone()).await?;
        parse_account(&key, aor.clone(), fields)
    }

    /// All accounts, sorted by AOR.
    pub async fn list(&self) -> Result<Vec<Account>, Error> {
        let mut conn = self.conn.clone();
        let members: Vec<String> =
            redis::cmd("SMEMBERS").arg(self.accounts_key()).query_async(&mut conn).await?;
        let mut aors = Vec::with_capacity(members.len());
        for m in members {
            match Aor::parse(&m) {
                Ok(aor) => aors.push(aor),
                Err(e) => {
                    return Err(Error::CorruptRecord {
                        key: self.accounts_key(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        if aors.is_empty() {
            // An empty pipeline is a client error in redis-rs.
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for aor in &aors {
            pipe.hgetall(self.account_key(aor));
        }
        let hashes: Vec<HashMap<String, String>> = pipe.query_async(&mut conn).await?;
        let mut accounts = Vec::with_capacity(aors.len());
        for (aor, fields) in aors.into_iter().zip(hashes) {
            let key = self.account_key(&aor);
            // A set member without a hash (deleted by hand) is simply skipped.
            if let Some(account) = parse_account(&key, aor, fields)? {
                accounts.push(account);
            }
        }
        accounts.sort_by_cached_key(|a| a.aor.to_string());
        Ok(accounts)
    }

    /// Records that a call was answered.
    pub async fn accounting_start(&self, start: &CallStart) -> Result<(), Error> {
        validate_call_ref(&start.call_ref)?;
        let _: i64 = ACCOUNTING_START
            .key(self.cdr_key(&start.call_ref))
            .key(self.cdrs_key())
            .arg(&start.call_ref)
            .arg(&start.caller)
            .arg(&start.callee)
            .arg(&start.caller_ingress_ip)
            .arg(&start.callee_ingress_ip)
            .arg(start.answered_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    /// Records that a call ended, once: see [`StopOutcome`]. If no start was recorded the
    /// record is created with what is known (no duration until a start arrives).
    pub async fn accounting_stop(
        &self,
        call_ref: &str,
        ended_ms: u64,
        cause: &str,
        idempotency_key: &str,
    ) -> Result<StopOutcome, Error> {
        validate_call_ref(call_ref)?;
        let applied: i64 = ACCOUNTING_STOP
            .key(self.cdr_key(call_ref))
            .key(self.cdrs_key())
            .arg(call_ref)
            .arg(ended_ms)
            .arg(cause)
            .arg(idempotency_key)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(if applied == 1 { StopOutcome::Recorded } else { StopOutcome::AlreadyRecorded })
    }

    /// The `limit` most recent CDRs (by answer time), newest first; `limit` 0 means all.
    pub async fn list_cdrs(&self, limit: usize) -> Result<Vec<Cdr>, Error> {
        let mut conn = self.conn.clone();
        let stop: isize = if limit == 0 { -1 } else { isize::try_from(limit - 1).unwrap_or(-1) };
        let refs: Vec<String> = redis::cmd("ZREVRANGE")
            .arg(self.cdrs_key())
            .arg(0)
            .arg(stop)
            .query_async(&mut conn)
            .await?;
        if refs.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for r in &refs {
            pipe.hgetall(self.cdr_key(r));
        }
        let hashes: Vec<HashMap<String, String>> = pipe.query_async(&mut conn).await?;
        let mut cdrs = Vec::with_capacity(refs.len());
        for (call_ref, fields) in refs.into_iter().zip(hashes) {
            if fields.is_empty() {
                continue;
            }
            let key = self.cdr_key(&call_ref);
            cdrs.push(parse_cdr(&key, call_ref, fields)?);
        }
        Ok(cdrs)
    }
}

fn now_ms() -> u64 {
    // A clock before 1970 is not worth failing over; 0 marks it.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn validate_realm(realm: &str) -> Result<(), Error> {
    if realm.is_empty() || realm.chars().any(char::is_control) {
        return Err(Error::InvalidInput {
            what: "--realm",
            reason: format!("{realm:?} must be non-empty without control characters"),
        });
    }
    Ok(())
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

/// The realms to create credentials for: as given (deduplicated), or the AOR's domain.
fn realm_list(aor: &Aor, realms: &[String]) -> Result<Vec<String>, Error> {
    if realms.is_empty() {
        return Ok(vec![aor.domain().to_owned()]);
    }
    let mut out: Vec<String> = Vec::with_capacity(realms.len());
    for r in realms {
        validate_realm(r)?;
        if !out.contains(r) {
            out.push(r.clone());
        }
    }
    Ok(out)
}

fn ha1_fields(realm: &str, creds: &RealmCredentials) -> Vec<(String, String)> {
    let mut fields = Vec::with_capacity(2);
    if let Some(h) = &creds.ha1_md5 {
        fields.push((format!("{HA1_MD5}{realm}"), h.clone()));
    }
    if let Some(h) = &creds.ha1_sha256 {
        fields.push((format!("{HA1_SHA256}{realm}"), h.clone()));
    }
    fields
}

fn parse_account(
    key: &str,
    aor: Aor,
    fields: HashMap<String, String>,
) -> Result<Option<Account>, Error> {
    if fields.is_empty() {
        return Ok(None);
    }
    let corrupt = |reason: String| Error::CorruptRecord { key: key.to_owned(), reason };
    let status = fields
        .get("status")
        .and_then(|s| Status::parse(s))
        .ok_or_else(|| corrupt(format!("bad status {:?}", fields.get("status"))))?;
    let created_ms = match fields.get("created_ms") {
        Some(v) => v.parse().map_err(|_| corrupt(format!("bad created_ms {v:?}")))?,
        None => 0,
    };
    let mut realms: BTreeMap<String, RealmCredentials> = BTreeMap::new();
    for (field, value) in fields {
        if let Some(realm) = field.strip_prefix(HA1_MD5) {
            realms.entry(realm.to_owned()).or_default().ha1_md5 = Some(value);
        } else if let Some(realm) = field.strip_prefix(HA1_SHA256) {
            realms.entry(realm.to_owned()).or_default().ha1_sha256 = Some(value);
        }
    }
    Ok(Some(Account { aor, status, created_ms, realms }))
}

fn parse_cdr(
    key: &str,
    call_ref: String,
    mut fields: HashMap<String, String>,
) -> Result<Cdr, Error> {
    let number = |name: &str| -> Result<Option<u64>, Error> {
        match fields.get(name) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| Error::CorruptRecord {
                key: key.to_owned(),
                reason: format!("bad {name} {v:?}"),
            }),
        }
    };
    let answered_ms = number("answered_ms")?;
    let ended_ms = number("ended_ms")?;
    let duration_ms = number("duration_ms")?;
    let mut text = |name: &str| fields.remove(name).unwrap_or_default();
    Ok(Cdr {
        call_ref,
        caller: text("caller"),
        callee: text("callee"),
        caller_ingress_ip: text("caller_ingress_ip"),
        callee_ingress_ip: text("callee_ingress_ip"),
        cause: text("cause"),
        answered_ms,
        ended_ms,
        duration_ms,
        stop_key: fields.remove("stop_key"),
    })
}

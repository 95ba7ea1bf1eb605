//! Accounts: credentials, status, and the billing settings and balance of each AOR.

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;

use sipmsg::digest::Algorithm;

use super::{Store, now_ms, parse_field};
use crate::account::{
    Account, AccountSettings, Aor, Kind, RealmCredentials, Status, ha1_fields, normalize_ha1,
    validate_realm,
};
use crate::error::Error;
use crate::money;

use crate::account::{HA1_MD5, HA1_SHA256};

/// Creates an account unless it exists; with `force`, replaces the credentials of an existing
/// one but keeps its status (a password reset must not unblock), creation time and balance.
/// Returns 0 = exists (not forced), 1 = created, 2 = replaced, 3 = exists and an opening
/// balance was given (refused: balances change only through calls and top-ups).
static ADD_ACCOUNT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
-- KEYS[1] account hash, KEYS[2] account set
-- ARGV[1] force '1'/'0', ARGV[2] aor, ARGV[3] now ms, ARGV[4] opening balance ('' = none),
-- ARGV[5] n, ARGV[6 .. 5+n] HA1 field, value, ...; then setting field, value ('' = remove), ...
local exists = redis.call('EXISTS', KEYS[1]) == 1
if exists and ARGV[1] ~= '1' then return 0 end
if exists and ARGV[4] ~= '' then return 3 end
if exists then
  for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(f, 1, 4) == 'ha1:' then redis.call('HDEL', KEYS[1], f) end
  end
else
  local balance = ARGV[4]
  if balance == '' then balance = '0' end
  redis.call('HSET', KEYS[1], 'status', 'active', 'created_ms', ARGV[3], 'kind', 'postpaid',
    'balance_micros', balance)
end
local n = tonumber(ARGV[5])
for i = 6, 5 + n, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
for i = 6 + n, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
redis.call('SADD', KEYS[2], ARGV[2])
if exists then return 2 end
return 1
",
    )
});

/// Sets fields of an existing account; returns 0 when there is no such account, so that a
/// typo in `account block` or `account set` does not create a credential-less account.
static UPDATE_ACCOUNT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
-- KEYS[1] account hash; ARGV field, value ('' = remove), ...
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return 1
",
    )
});

/// Applies one imported row: creates the account (active, postpaid, with the opening balance)
/// if it does not exist, then sets or removes the given fields. Returns 1 = created,
/// 2 = updated; the opening balance of an existing account is not applied (re-runs).
static IMPORT_ROW: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
-- KEYS[1] account hash, KEYS[2] account set
-- ARGV[1] aor, ARGV[2] now ms, ARGV[3] opening balance ('' = none), then field, value ('' =
-- remove), ...
local exists = redis.call('EXISTS', KEYS[1]) == 1
if not exists then
  local balance = ARGV[3]
  if balance == '' then balance = '0' end
  redis.call('HSET', KEYS[1], 'status', 'active', 'created_ms', ARGV[2], 'kind', 'postpaid',
    'balance_micros', balance)
end
for i = 4, #ARGV, 2 do
  if ARGV[i + 1] == '' then redis.call('HDEL', KEYS[1], ARGV[i])
  else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
redis.call('SADD', KEYS[2], ARGV[1])
if exists then return 2 end
return 1
",
    )
});

/// Deletes an account. Returns 0 = no such account, 1 = deleted, or -N = N calls in progress
/// (nothing deleted) unless forced.
static DELETE_ACCOUNT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
-- KEYS[1] account hash, KEYS[2] account set, KEYS[3] the account's reservations
-- ARGV[1] aor, ARGV[2] now ms, ARGV[3] force '1'/'0'
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[2], ARGV[1])
  return 0
end
if ARGV[3] ~= '1' then
  local live = 0
  local held = redis.call('HVALS', KEYS[3])
  for _, v in ipairs(held) do
    local expires = tonumber(string.match(v, ':(%d+)$'))
    if expires and expires > tonumber(ARGV[2]) then live = live + 1 end
  end
  if live > 0 then return -live end
end
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('SREM', KEYS[2], ARGV[1])
return 1
",
    )
});

/// Rows applied per Redis round trip by [`Store::import_rows`].
const IMPORT_BATCH: usize = 1000;

/// Adds to a balance. Returns {0, 0} = no such account, {1, new balance}, or
/// {2, old balance} = the result would be out of range (nothing changed).
static TOPUP: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
-- KEYS[1] account hash; ARGV[1] amount, ARGV[2] largest allowed absolute balance
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0} end
local balance = tonumber(redis.call('HGET', KEYS[1], 'balance_micros') or '0')
local new = balance + tonumber(ARGV[1])
if math.abs(new) > tonumber(ARGV[2]) then return {2, balance} end
redis.call('HSET', KEYS[1], 'balance_micros', string.format('%d', new))
return {1, new}
",
    )
});

/// One call holding funds and a concurrent-call slot of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The call.
    pub call_ref: String,
    /// Funds held for it.
    pub reserved_micros: i64,
    /// When the reservation lapses if no stop arrives, ms since the epoch.
    pub expires_ms: u64,
}

/// An account with what its calls in progress hold (`account show`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountUsage {
    /// The account.
    pub account: Account,
    /// The rate plan its calls are rated with: its own, or the configured default.
    pub effective_rate_plan: Option<String>,
    /// Calls in progress (unexpired reservations), by call ref.
    pub reservations: Vec<Reservation>,
}

impl AccountUsage {
    /// Sum of the reservations.
    pub fn reserved_micros(&self) -> i64 {
        self.reservations.iter().map(|r| r.reserved_micros).sum()
    }

    /// What a new call could use: balance (plus credit limit, for postpaid) minus the
    /// reservations; `None` for a postpaid account without a credit limit.
    pub fn available_micros(&self) -> Option<i64> {
        let a = &self.account;
        let credit = match (a.kind, a.credit_limit_micros) {
            (Kind::Prepaid, _) => 0,
            (Kind::Postpaid, Some(limit)) => limit,
            (Kind::Postpaid, None) => return None,
        };
        Some(a.balance_micros + credit - self.reserved_micros())
    }
}

impl Store {
    /// Creates an account with MD5 and SHA-256 HA1s of `password` for each realm (the AOR's
    /// domain when `realms` is empty), the billing `settings`, and `opening_balance_micros`
    /// (default 0). Without settings the account is postpaid with no credit limit, on the
    /// default rate plan, without a call limit. The digest username is the AOR's user part.
    ///
    /// An existing account is refused with [`Error::AccountExists`] unless `force`, which
    /// replaces all its credentials and applies `settings`, but keeps its status, creation
    /// time and balance (an opening balance is then refused: use [`Store::topup`]).
    pub async fn add_account(
        &self,
        aor: &Aor,
        password: &str,
        realms: &[String],
        force: bool,
        settings: &AccountSettings,
        opening_balance_micros: Option<i64>,
    ) -> Result<Account, Error> {
        if password.is_empty() {
            return Err(Error::InvalidInput {
                what: "--password",
                reason: "must not be empty".to_owned(),
            });
        }
        let realms = realm_list(aor, realms)?;
        let setting_fields = self.setting_fields(settings).await?;
        if let Some(balance) = opening_balance_micros {
            check_amount("--balance", balance)?;
        }
        let mut credentials = Vec::new();
        for realm in &realms {
            let creds = RealmCredentials::from_password(aor.user(), realm, password);
            credentials.extend(ha1_fields(realm, &creds));
        }
        let mut invocation = ADD_ACCOUNT.prepare_invoke();
        invocation
            .key(self.account_key(aor))
            .key(self.accounts_key())
            .arg(if force { "1" } else { "0" })
            .arg(aor.to_string())
            .arg(now_ms())
            .arg(opening_balance_micros.map(|b| b.to_string()).unwrap_or_default())
            .arg(credentials.len() * 2);
        for (field, value) in credentials.iter().chain(&setting_fields) {
            invocation.arg(field).arg(value);
        }
        let outcome: i64 = invocation.invoke_async(&mut self.conn.clone()).await?;
        match outcome {
            0 => return Err(Error::AccountExists(aor.to_string())),
            3 => {
                return Err(Error::InvalidInput {
                    what: "--balance",
                    reason: format!(
                        "account {aor} exists: its balance is kept; use `account topup` to change it"
                    ),
                });
            }
            _ => {}
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

    /// Applies imported rows ([`crate::import`]), a thousand per pipeline; returns how many
    /// accounts were created and how many updated. Each row is applied atomically; a re-run
    /// of the same rows changes nothing more.
    pub async fn import_rows(&self, rows: &[crate::import::Row]) -> Result<(usize, usize), Error> {
        let (mut created, mut updated) = (0, 0);
        let now = now_ms();
        for chunk in rows.chunks(IMPORT_BATCH) {
            let mut invocations = Vec::with_capacity(chunk.len());
            for row in chunk {
                if let Some(balance) = row.balance_micros {
                    check_amount("balance", balance)?;
                }
                let mut inv = IMPORT_ROW.prepare_invoke();
                inv.key(self.account_key(&row.aor))
                    .key(self.accounts_key())
                    .arg(row.aor.to_string())
                    .arg(now)
                    .arg(row.balance_micros.map(|b| b.to_string()).unwrap_or_default());
                for (field, value) in &row.fields {
                    inv.arg(field).arg(value);
                }
                invocations.push(inv);
            }
            let mut pipe = redis::pipe();
            pipe.load_script(&IMPORT_ROW).ignore();
            for inv in &invocations {
                pipe.invoke_script(inv);
            }
            let outcomes: Vec<i64> = pipe.query_async(&mut self.conn.clone()).await?;
            created += outcomes.iter().filter(|o| **o == 1).count();
            updated += outcomes.iter().filter(|o| **o == 2).count();
        }
        Ok((created, updated))
    }

    /// Deletes an account (credentials, settings, balance; CDRs stay). With calls in progress
    /// it is refused unless `force`, which also drops their reservations.
    pub async fn delete_account(&self, aor: &Aor, force: bool) -> Result<(), Error> {
        let outcome: i64 = DELETE_ACCOUNT
            .key(self.account_key(aor))
            .key(self.accounts_key())
            .key(self.reservations_key(&aor.to_string()))
            .arg(aor.to_string())
            .arg(now_ms())
            .arg(if force { "1" } else { "0" })
            .invoke_async(&mut self.conn.clone())
            .await?;
        match outcome {
            0 => Err(Error::AccountNotFound(aor.to_string())),
            n if n < 0 => Err(Error::InvalidInput {
                what: "--aor",
                reason: format!("{aor} has {} calls in progress; end them or use --force", -n),
            }),
            _ => Ok(()),
        }
    }

    /// Blocks or unblocks an existing account.
    pub async fn set_status(&self, aor: &Aor, status: Status) -> Result<(), Error> {
        self.update(aor, &[("status".to_owned(), status.as_str().to_owned())]).await
    }

    /// Changes the billing settings of an existing account (`account set`). A rate plan must
    /// exist when it is assigned.
    pub async fn update_account(
        &self,
        aor: &Aor,
        settings: &AccountSettings,
    ) -> Result<Account, Error> {
        let fields = self.setting_fields(settings).await?;
        if fields.is_empty() {
            return Err(Error::InvalidInput {
                what: "account set",
                reason:
                    "nothing to change: give --kind, --rate-plan, --credit-limit or --max-calls"
                        .to_owned(),
            });
        }
        self.update(aor, &fields).await?;
        self.get(aor).await?.ok_or_else(|| Error::AccountNotFound(aor.to_string()))
    }

    async fn update(&self, aor: &Aor, fields: &[(String, String)]) -> Result<(), Error> {
        let mut invocation = UPDATE_ACCOUNT.prepare_invoke();
        invocation.key(self.account_key(aor));
        for (field, value) in fields {
            invocation.arg(field).arg(value);
        }
        let changed: i64 = invocation.invoke_async(&mut self.conn.clone()).await?;
        if changed == 0 {
            return Err(Error::AccountNotFound(aor.to_string()));
        }
        Ok(())
    }

    /// Adds `amount_micros` (negative for a correction) to the balance in one atomic step and
    /// returns the new balance.
    pub async fn topup(&self, aor: &Aor, amount_micros: i64) -> Result<i64, Error> {
        check_amount("--amount", amount_micros)?;
        let (outcome, balance): (i64, i64) = TOPUP
            .key(self.account_key(aor))
            .arg(amount_micros)
            .arg(money::MAX_AMOUNT_MICROS)
            .invoke_async(&mut self.conn.clone())
            .await?;
        match outcome {
            0 => Err(Error::AccountNotFound(aor.to_string())),
            2 => Err(Error::InvalidInput {
                what: "--amount",
                reason: format!(
                    "the balance ({}) would leave the range ±{}",
                    money::format(balance),
                    money::format(money::MAX_AMOUNT_MICROS)
                ),
            }),
            _ => Ok(balance),
        }
    }

    /// The account, or `None` if there is none.
    pub async fn get(&self, aor: &Aor) -> Result<Option<Account>, Error> {
        let key = self.account_key(aor);
        let fields: HashMap<String, String> =
            redis::cmd("HGETALL").arg(&key).query_async(&mut self.conn.clone()).await?;
        parse_account(&key, aor.clone(), fields)
    }

    /// The account with its calls in progress (`account show`): reservations that lapsed
    /// without a stop are not counted, as `Authorize` does not count them.
    pub async fn account_usage(&self, aor: &Aor) -> Result<Option<AccountUsage>, Error> {
        let key = self.account_key(aor);
        let resv_key = self.reservations_key(&aor.to_string());
        let (fields, held): (HashMap<String, String>, HashMap<String, String>) = redis::pipe()
            .hgetall(&key)
            .hgetall(&resv_key)
            .query_async(&mut self.conn.clone())
            .await?;
        let Some(account) = parse_account(&key, aor.clone(), fields)? else {
            return Ok(None);
        };
        let now = now_ms();
        let mut reservations = Vec::with_capacity(held.len());
        for (call_ref, value) in held {
            let parsed = value.split_once(':').and_then(|(amount, expires)| {
                Some((amount.parse::<i64>().ok()?, expires.parse::<u64>().ok()?))
            });
            let Some((reserved_micros, expires_ms)) = parsed else {
                return Err(Error::CorruptRecord {
                    key: resv_key,
                    reason: format!("bad reservation {value:?} of {call_ref}"),
                });
            };
            if expires_ms > now {
                reservations.push(Reservation { call_ref, reserved_micros, expires_ms });
            }
        }
        reservations.sort_by(|a, b| a.call_ref.cmp(&b.call_ref));
        let effective_rate_plan =
            account.rate_plan.clone().or_else(|| self.default_rate_plan.clone());
        Ok(Some(AccountUsage { account, effective_rate_plan, reservations }))
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

    /// The hash fields `settings` set (an empty value removes the field), after checking that a
    /// named rate plan exists, so that a typo does not leave an account unable to call.
    async fn setting_fields(&self, s: &AccountSettings) -> Result<Vec<(String, String)>, Error> {
        let mut fields = Vec::new();
        if let Some(kind) = s.kind {
            fields.push(("kind".to_owned(), kind.as_str().to_owned()));
        }
        if let Some(limit) = s.credit_limit_micros {
            if let Some(limit) = limit {
                check_amount("--credit-limit", limit)?;
                if limit < 0 {
                    return Err(Error::InvalidInput {
                        what: "--credit-limit",
                        reason: "must not be negative".to_owned(),
                    });
                }
            }
            fields.push((
                "credit_limit_micros".to_owned(),
                limit.map(|l| l.to_string()).unwrap_or_default(),
            ));
        }
        if let Some(plan) = &s.rate_plan {
            if let Some(plan) = plan {
                crate::rating::validate_plan_name("--rate-plan", plan)?;
                if !self.rate_plan_exists(plan).await? {
                    return Err(Error::RatePlanNotFound(plan.clone()));
                }
            }
            fields.push(("rate_plan".to_owned(), plan.clone().unwrap_or_default()));
        }
        if let Some(max) = s.max_concurrent_calls {
            // 0 is stored as absent: "no limit" has one representation.
            let value = if max == 0 { String::new() } else { max.to_string() };
            fields.push(("max_concurrent_calls".to_owned(), value));
        }
        Ok(fields)
    }
}

fn check_amount(what: &'static str, micros: i64) -> Result<(), Error> {
    if micros.unsigned_abs() > money::MAX_AMOUNT_MICROS.unsigned_abs() {
        return Err(Error::InvalidInput {
            what,
            reason: format!("out of range (at most {})", money::format(money::MAX_AMOUNT_MICROS)),
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

/// Reads an account hash. Fields added with billing settings are optional so that accounts
/// written by earlier versions keep working: no `kind` is postpaid, no balance is 0, no credit
/// limit is none, no rate plan is the default one, no call limit is none.
pub(super) fn parse_account(
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
    let kind = match fields.get("kind") {
        None => Kind::Postpaid,
        Some(k) => Kind::parse(k).ok_or_else(|| corrupt(format!("bad kind {k:?}")))?,
    };
    let created_ms = parse_field(key, "created_ms", fields.get("created_ms"))?.unwrap_or(0);
    let balance_micros =
        parse_field(key, "balance_micros", fields.get("balance_micros"))?.unwrap_or(0);
    let credit_limit_micros =
        parse_field(key, "credit_limit_micros", fields.get("credit_limit_micros"))?;
    let max_concurrent_calls =
        parse_field(key, "max_concurrent_calls", fields.get("max_concurrent_calls"))?.unwrap_or(0);
    let rate_plan = fields.get("rate_plan").filter(|p| !p.is_empty()).cloned();
    let mut realms: BTreeMap<String, RealmCredentials> = BTreeMap::new();
    for (field, value) in fields {
        if let Some(realm) = field.strip_prefix(HA1_MD5) {
            realms.entry(realm.to_owned()).or_default().ha1_md5 = Some(value);
        } else if let Some(realm) = field.strip_prefix(HA1_SHA256) {
            realms.entry(realm.to_owned()).or_default().ha1_sha256 = Some(value);
        }
    }
    Ok(Some(Account {
        aor,
        status,
        created_ms,
        realms,
        kind,
        balance_micros,
        credit_limit_micros,
        rate_plan,
        max_concurrent_calls,
    }))
}

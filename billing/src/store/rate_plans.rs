//! Rate plans: named tables of per-prefix rates, and the tariff of a call.

use std::collections::HashMap;
use std::sync::LazyLock;

use super::Store;
use crate::account::Account;
use crate::error::Error;
use crate::rating::{self, DEFAULT_PREFIX, Rate};

/// Deletes one entry of a plan, or the whole plan, and drops the plan from the listing set
/// once it has no entries. Returns how many entries were removed.
static DELETE_RATE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
-- KEYS[1] plan hash, KEYS[2] plan set; ARGV[1] plan name, ARGV[2] prefix ('' = whole plan)
local removed
if ARGV[2] == '' then
  removed = redis.call('HLEN', KEYS[1])
  redis.call('DEL', KEYS[1])
else
  removed = redis.call('HDEL', KEYS[1], ARGV[2])
end
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[1]) end
return removed
",
    )
});

/// One row of `rate-plan list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RatePlanEntry {
    /// Plan name.
    pub plan: String,
    /// Destination prefix (digits), or [`DEFAULT_PREFIX`].
    pub prefix: String,
    /// Its rate.
    pub rate: Rate,
}

/// How a call is priced, as decided at authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tariff {
    /// The account has no rate plan (and there is no default): calls are free.
    Unrated,
    /// The rate of the longest matching prefix of the plan.
    Rated {
        /// Plan name.
        plan: String,
        /// The prefix that matched, or [`DEFAULT_PREFIX`].
        prefix: String,
        /// Its rate.
        rate: Rate,
    },
    /// The plan has no entry for the destination.
    NoRate {
        /// Plan name.
        plan: String,
    },
}

impl Store {
    /// Creates or replaces the entry for `prefix` (digits, or `default` / empty) in `plan`,
    /// creating the plan if needed.
    pub async fn set_rate(&self, plan: &str, prefix: &str, rate: &Rate) -> Result<String, Error> {
        rating::validate_plan_name("--name", plan)?;
        let prefix = rating::normalize_prefix(prefix)?;
        rate.validate()?;
        let json = serde_json::to_string(rate)
            .map_err(|e| Error::InvalidInput { what: "rate", reason: e.to_string() })?;
        let () = redis::pipe()
            .atomic()
            .hset(self.rate_plan_key(plan), &prefix, json)
            .ignore()
            .sadd(self.rate_plans_key(), plan)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(prefix)
    }

    /// Entries of every plan (or only of `plan`), sorted by plan, the default entry first,
    /// then by prefix.
    pub async fn rate_plan_entries(&self, plan: Option<&str>) -> Result<Vec<RatePlanEntry>, Error> {
        let mut conn = self.conn.clone();
        let mut plans: Vec<String> = match plan {
            Some(p) => vec![p.to_owned()],
            None => {
                redis::cmd("SMEMBERS").arg(self.rate_plans_key()).query_async(&mut conn).await?
            }
        };
        plans.sort();
        if plans.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for p in &plans {
            pipe.hgetall(self.rate_plan_key(p));
        }
        let tables: Vec<HashMap<String, String>> = pipe.query_async(&mut conn).await?;
        let mut entries = Vec::new();
        for (plan, table) in plans.into_iter().zip(tables) {
            let key = self.rate_plan_key(&plan);
            let mut rows: Vec<RatePlanEntry> = table
                .into_iter()
                .map(|(prefix, json)| {
                    Ok(RatePlanEntry {
                        plan: plan.clone(),
                        rate: parse_rate(&key, &prefix, &json)?,
                        prefix,
                    })
                })
                .collect::<Result<_, Error>>()?;
            rows.sort_by(|a, b| {
                (a.prefix != DEFAULT_PREFIX, &a.prefix)
                    .cmp(&(b.prefix != DEFAULT_PREFIX, &b.prefix))
            });
            entries.extend(rows);
        }
        Ok(entries)
    }

    /// Deletes the entry for `prefix` of `plan`, or the whole plan without a prefix. Accounts
    /// still naming a deleted plan are refused with "no rate" until they are moved.
    pub async fn delete_rate_plan(&self, plan: &str, prefix: Option<&str>) -> Result<usize, Error> {
        rating::validate_plan_name("--name", plan)?;
        let prefix = prefix.map(rating::normalize_prefix).transpose()?;
        let removed: usize = DELETE_RATE
            .key(self.rate_plan_key(plan))
            .key(self.rate_plans_key())
            .arg(plan)
            .arg(prefix.as_deref().unwrap_or_default())
            .invoke_async(&mut self.conn.clone())
            .await?;
        if removed == 0 {
            return Err(match prefix {
                Some(p) => Error::InvalidInput {
                    what: "--prefix",
                    reason: format!("rate plan {plan} has no entry for {p}"),
                },
                None => Error::RatePlanNotFound(plan.to_owned()),
            });
        }
        Ok(removed)
    }

    /// Whether `plan` has at least one entry.
    /// Whether rate plan `plan` exists.
    pub async fn rate_plan_exists(&self, plan: &str) -> Result<bool, Error> {
        let n: i64 = redis::cmd("EXISTS")
            .arg(self.rate_plan_key(plan))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(n == 1)
    }

    /// The tariff of a call from `account` to `callee`: the account's rate plan (or the
    /// configured default), and its longest prefix matching the callee's number. Looks up
    /// only the candidate prefixes, so the cost does not grow with the size of the plan.
    pub async fn tariff(&self, account: &Account, callee: &str) -> Result<Tariff, Error> {
        let Some(plan) = account.rate_plan.clone().or_else(|| self.default_rate_plan.clone())
        else {
            return Ok(Tariff::Unrated);
        };
        let candidates = rating::candidate_prefixes(rating::destination(callee));
        let key = self.rate_plan_key(&plan);
        let values: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(&key)
            .arg(&candidates)
            .query_async(&mut self.conn.clone())
            .await?;
        let found: HashMap<&str, &str> = candidates
            .iter()
            .zip(&values)
            .filter_map(|(prefix, json)| Some((prefix.as_str(), json.as_deref()?)))
            .collect();
        // Entries are parsed as the match reaches them: a corrupt entry on the way to the
        // match is reported rather than silently skipped for a shorter prefix.
        let mut corrupt = None;
        let best = rating::best_match(rating::destination(callee), |prefix| {
            let json = found.get(prefix)?;
            match parse_rate(&key, prefix, json) {
                Ok(rate) => Some(rate),
                Err(e) => {
                    corrupt.get_or_insert(e);
                    None
                }
            }
        });
        if let Some(e) = corrupt {
            return Err(e);
        }
        Ok(match best {
            Some((prefix, rate)) => Tariff::Rated { plan, prefix, rate },
            None => Tariff::NoRate { plan },
        })
    }
}

fn parse_rate(key: &str, prefix: &str, json: &str) -> Result<Rate, Error> {
    let corrupt = |reason: String| Error::CorruptRecord {
        key: key.to_owned(),
        reason: format!("entry {prefix}: {reason}"),
    };
    let rate: Rate = serde_json::from_str(json).map_err(|e| corrupt(e.to_string()))?;
    rate.validate().map_err(|e| corrupt(e.to_string()))?;
    Ok(rate)
}

//! NAT keepalive scheduling shared by every processor: one Redis sorted set of
//! `<aor>\n<binding field>` members scored by when each binding is next due. A processor claims
//! due members with one atomic script that also pushes them an interval ahead, so each binding
//! is pinged by exactly one processor per interval however many processors run, and a dead
//! processor's share is simply claimed by the others.

use redis::aio::ConnectionManager;

use crate::error::Error;

const CLAIM_LUA: &str = r#"
-- KEYS[1]: schedule. ARGV: now_ms, next_due_ms, batch
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], m) end
return due
"#;

/// The keepalive schedule.
#[derive(Clone)]
pub struct Schedule {
    redis: ConnectionManager,
    key: String,
    fail_prefix: String,
    claim: redis::Script,
}

/// A binding due for a keepalive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// The AOR.
    pub aor: String,
    /// The binding's field in the AOR's hash.
    pub field: String,
}

impl Schedule {
    /// The schedule under `prefix` (`<prefix>ka`, failures in `<prefix>kafail:{<aor>}`).
    pub fn new(redis: ConnectionManager, prefix: &str) -> Self {
        Schedule {
            redis,
            key: format!("{prefix}ka"),
            fail_prefix: format!("{prefix}kafail:"),
            claim: redis::Script::new(CLAIM_LUA),
        }
    }

    fn member(aor: &str, field: &str) -> String {
        format!("{aor}\n{field}")
    }

    /// Puts bindings on the schedule (first ping one interval from now); bindings already on it
    /// keep their slot, so a refresh does not postpone a ping forever.
    pub async fn add(&self, aor: &str, fields: &[String], first_due_ms: u64) -> Result<(), Error> {
        if fields.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(&self.key).arg("NX");
        for f in fields {
            cmd.arg(first_due_ms).arg(Self::member(aor, f));
        }
        let mut conn = self.redis.clone();
        let _: i64 = cmd.query_async(&mut conn).await?;
        Ok(())
    }

    /// Takes up to `batch` due bindings and reschedules them at `next_due_ms`.
    pub async fn claim(
        &self,
        now_ms: u64,
        next_due_ms: u64,
        batch: usize,
    ) -> Result<Vec<Due>, Error> {
        let mut conn = self.redis.clone();
        let members: Vec<String> = self
            .claim
            .key(&self.key)
            .arg(now_ms)
            .arg(next_due_ms)
            .arg(batch)
            .invoke_async(&mut conn)
            .await?;
        Ok(members
            .into_iter()
            .filter_map(|m| {
                let (aor, field) = m.split_once('\n')?;
                Some(Due { aor: aor.to_owned(), field: field.to_owned() })
            })
            .collect())
    }

    /// Takes a binding off the schedule (it is gone).
    pub async fn remove(&self, aor: &str, field: &str) -> Result<(), Error> {
        let mut conn = self.redis.clone();
        let _: i64 = redis::cmd("ZREM")
            .arg(&self.key)
            .arg(Self::member(aor, field))
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Records a ping's outcome; returns the consecutive failures so far.
    pub async fn record(&self, aor: &str, field: &str, ok: bool) -> Result<u64, Error> {
        let key = format!("{}{{{aor}}}", self.fail_prefix);
        let mut conn = self.redis.clone();
        if ok {
            let _: i64 = redis::cmd("HDEL").arg(&key).arg(field).query_async(&mut conn).await?;
            return Ok(0);
        }
        let n: u64 =
            redis::cmd("HINCRBY").arg(&key).arg(field).arg(1).query_async(&mut conn).await?;
        let _: i64 = redis::cmd("EXPIRE").arg(&key).arg(86_400).query_async(&mut conn).await?;
        Ok(n)
    }
}

//! The location service in Redis: bindings per AOR, shared by every processor.
//!
//! One hash per AOR, `<prefix>loc:{<aor>}`, one field per binding (the Contact URI), the value a
//! JSON [`Binding`]. The braces are a Redis Cluster hash tag, so a move to Redis Cluster keeps
//! each AOR's work in one slot. A REGISTER is applied by one Lua script: expiry purge, the
//! Call-ID/CSeq ordering check of RFC 3261 §10.3 and the write happen atomically, so two
//! processors handling REGISTERs for one AOR at once cannot interleave. See
//! `docs/redis-data-model.md`.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::error::Error;
use crate::registrar::{Binding, StoredIngress, Update};
use crate::transport::Ingress;

/// What the REGISTER itself contributes to every binding it writes.
#[derive(Debug, Clone)]
pub struct RegisterMeta<'a> {
    /// Call-ID.
    pub call_id: &'a str,
    /// CSeq number.
    pub cseq: u32,
    /// Where it came from.
    pub ingress: &'a Ingress,
    /// User-Agent header.
    pub user_agent: &'a str,
    /// Most bindings the AOR may have (`max_contacts`); 0 = no limit.
    pub max_contacts: u32,
}

const APPLY_LUA: &str = r#"
-- KEYS[1]: the AOR's hash. ARGV: now_ms, call_id, cseq, remove_all, max_contacts (0 = no
-- limit), then (field, expires_at_ms, json)*
local now = tonumber(ARGV[1])
local call_id = ARGV[2]
local cseq = tonumber(ARGV[3])
local remove_all = ARGV[4] == '1'
local max_contacts = tonumber(ARGV[5])
local touched = {}
for i = 6, #ARGV, 3 do touched[ARGV[i]] = true end
local cur = redis.call('HGETALL', KEYS[1])
local live = {}
local before = 0
for i = 1, #cur, 2 do
  local ok, b = pcall(cjson.decode, cur[i + 1])
  if (not ok) or tonumber(b.expires_at_ms) <= now then
    redis.call('HDEL', KEYS[1], cur[i])
  elseif (remove_all or touched[cur[i]]) and b.call_id == call_id and tonumber(b.cseq) >= cseq then
    return redis.error_reply('OUTOFORDER')
  else
    live[cur[i]] = true
    before = before + 1
  end
end
if remove_all then
  redis.call('DEL', KEYS[1])
  return {}
end
if max_contacts > 0 then
  -- Refused only when this REGISTER adds bindings beyond the limit: refreshes and removals
  -- always pass, also for an AOR already over a limit that was lowered since.
  local after = before
  for i = 6, #ARGV, 3 do
    if ARGV[i + 1] == '0' then
      if live[ARGV[i]] then live[ARGV[i]] = nil; after = after - 1 end
    elseif not live[ARGV[i]] then
      live[ARGV[i]] = true; after = after + 1
    end
  end
  if after > max_contacts and after > before then
    return redis.error_reply('TOOMANY')
  end
end
for i = 6, #ARGV, 3 do
  if ARGV[i + 1] == '0' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
  end
end
local rest = redis.call('HGETALL', KEYS[1])
local max = 0
for i = 1, #rest, 2 do
  local b = cjson.decode(rest[i + 1])
  if tonumber(b.expires_at_ms) > max then max = tonumber(b.expires_at_ms) end
end
if max > 0 then redis.call('PEXPIREAT', KEYS[1], max) end
return rest
"#;

/// The location store.
#[derive(Clone)]
pub struct Location {
    conn: ConnectionManager,
    prefix: String,
    apply: redis::Script,
}

impl Location {
    /// Connects to Redis. Commands time out after `timeout`, so a hung Redis turns into a quick
    /// `503` rather than a stuck transaction.
    pub async fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Self, Error> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_with_config(client, config).await?;
        Ok(Location { conn, prefix: prefix.to_owned(), apply: redis::Script::new(APPLY_LUA) })
    }

    /// The Redis connection, shared with other stores of the processor.
    pub fn redis(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Whether Redis answers now (`PING`), for readiness.
    pub async fn ping(&self) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    /// The hash key of an AOR.
    pub fn key(&self, aor: &str) -> String {
        format!("{}loc:{{{aor}}}", self.prefix)
    }

    /// Applies a REGISTER atomically and returns the bindings that remain.
    pub async fn apply(
        &self,
        aor: &str,
        update: &Update,
        meta: &RegisterMeta<'_>,
        now_ms: u64,
    ) -> Result<Vec<Binding>, Error> {
        let key = self.key(aor);
        if *update == Update::Fetch {
            return self.lookup(aor, now_ms).await;
        }
        let mut inv = self.apply.key(&key);
        inv.arg(now_ms).arg(meta.call_id).arg(meta.cseq);
        inv.arg(if *update == Update::RemoveAll { "1" } else { "0" });
        inv.arg(meta.max_contacts);
        if let Update::Contacts(contacts) = update {
            for c in contacts {
                if c.expires == 0 {
                    inv.arg(&c.field).arg("0").arg("");
                    continue;
                }
                let b = Binding {
                    contact: c.contact.clone(),
                    expires_at_ms: now_ms + u64::from(c.expires) * 1000,
                    q: c.q.clone(),
                    call_id: meta.call_id.to_owned(),
                    cseq: meta.cseq,
                    received: meta.ingress.remote,
                    ingress: StoredIngress::from(meta.ingress.local),
                    connection_id: meta.ingress.connection_id,
                    dispatcher: meta.ingress.dispatcher_id.clone(),
                    user_agent: meta.user_agent.to_owned(),
                    instance: c.instance.clone(),
                    reg_id: c.reg_id,
                    nat: c.nat,
                };
                let json = serde_json::to_string(&b)
                    .map_err(|e| Error::Corrupt { key: key.clone(), detail: e.to_string() })?;
                inv.arg(&c.field).arg(b.expires_at_ms).arg(json);
            }
        }
        let raw: Vec<String> = match retry_once(|| {
            let mut conn = self.conn.clone();
            let inv = &inv;
            async move { inv.invoke_async(&mut conn).await }
        })
        .await
        {
            Ok(v) => v,
            Err(e) if e.to_string().contains("OUTOFORDER") => {
                return Err(Error::OutOfOrder { call_id: meta.call_id.to_owned() });
            }
            Err(e) if e.to_string().contains("TOOMANY") => {
                return Err(Error::TooManyContacts { aor: aor.to_owned(), max: meta.max_contacts });
            }
            Err(e) => return Err(e.into()),
        };
        decode_pairs(&key, &raw, now_ms)
    }

    /// One binding of an AOR, if present and live.
    pub async fn get(&self, aor: &str, field: &str, now_ms: u64) -> Result<Option<Binding>, Error> {
        let key = self.key(aor);
        let raw: Option<String> = retry_once(|| {
            let mut conn = self.conn.clone();
            let cmd = redis::cmd("HGET").arg(&key).arg(field).clone();
            async move { cmd.query_async(&mut conn).await }
        })
        .await?;
        let Some(json) = raw else { return Ok(None) };
        let b: Binding = serde_json::from_str(&json)
            .map_err(|e| Error::Corrupt { key: key.clone(), detail: e.to_string() })?;
        Ok((b.expires_at_ms > now_ms).then_some(b))
    }

    /// Every live binding of every AOR, with its AOR, read with `SCAN` (a thousand keys per
    /// step, their hashes in one pipeline): for the operator's listings and the per-alias
    /// counts, never on the call path.
    pub async fn scan(&self, now_ms: u64) -> Result<Vec<(String, Binding)>, Error> {
        let mut conn = self.conn.clone();
        let keys = scan_keys(&mut conn, &format!("{}loc:{{*}}", self.prefix)).await?;
        let mut out = Vec::new();
        for chunk in keys.chunks(1000) {
            let mut pipe = redis::pipe();
            for k in chunk {
                pipe.cmd("HGETALL").arg(k);
            }
            let hashes: Vec<Vec<String>> = pipe.query_async(&mut conn).await?;
            for (key, raw) in chunk.iter().zip(hashes) {
                let Some(aor) = self.aor_of_key(key) else { continue };
                for b in decode_pairs(key, &raw, now_ms)? {
                    out.push((aor.to_owned(), b));
                }
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1.contact).cmp(&(&b.0, &b.1.contact)));
        Ok(out)
    }

    /// The AOR of a hash key made by [`Location::key`].
    fn aor_of_key<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(&self.prefix)?.strip_prefix("loc:{")?.strip_suffix('}')
    }

    /// Removes one binding (a phone that stopped answering keepalives).
    pub async fn remove(&self, aor: &str, field: &str) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let _: i64 =
            redis::cmd("HDEL").arg(self.key(aor)).arg(field).query_async(&mut conn).await?;
        Ok(())
    }

    /// The live bindings of an AOR.
    pub async fn lookup(&self, aor: &str, now_ms: u64) -> Result<Vec<Binding>, Error> {
        let key = self.key(aor);
        let raw: Vec<String> = retry_once(|| {
            let mut conn = self.conn.clone();
            let cmd = redis::cmd("HGETALL").arg(&key).clone();
            async move { cmd.query_async(&mut conn).await }
        })
        .await?;
        decode_pairs(&key, &raw, now_ms)
    }
}

/// Runs a Redis operation, and once more if it failed on the connection: after an outage the
/// connection manager reports its last failed reconnect to the first command, which then
/// reconnects; without the retry the first REGISTER or call after Redis returns gets a 503.
pub async fn retry_once<T, F, Fut>(op: F) -> Result<T, redis::RedisError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, redis::RedisError>>,
{
    match op().await {
        Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() => {
            tracing::debug!(error = %e, "redis connection error: retrying once");
            op().await
        }
        other => other,
    }
}

/// Every key matching `pattern`, with `SCAN` (a thousand per step): for operators' listings
/// and counts, never on the call path.
pub async fn scan_keys(conn: &mut ConnectionManager, pattern: &str) -> Result<Vec<String>, Error> {
    let (mut cursor, mut out) = (0_u64, Vec::new());
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        out.extend(keys);
        if next == 0 {
            return Ok(out);
        }
        cursor = next;
    }
}

/// Decodes HGETALL-style field/value pairs, skipping expired bindings.
fn decode_pairs(key: &str, raw: &[String], now_ms: u64) -> Result<Vec<Binding>, Error> {
    let mut out = Vec::with_capacity(raw.len() / 2);
    for pair in raw.chunks(2) {
        let [_, json] = pair else { continue };
        let b: Binding = serde_json::from_str(json)
            .map_err(|e| Error::Corrupt { key: key.to_owned(), detail: e.to_string() })?;
        if b.expires_at_ms > now_ms {
            out.push(b);
        }
    }
    out.sort_by(|a, b| a.contact.cmp(&b.contact));
    Ok(out)
}

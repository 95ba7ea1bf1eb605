//! Password guessing stopped per source (issue 11): failed digest authentications are counted
//! per source IP (per /64 for IPv6: one host has a whole /64) across the cluster in Redis; past
//! `auth_failures_per_minute` the source is banned for `ban_secs`. A banned source's requests
//! get `403` without a challenge. The account is never locked: the same user from another
//! address still registers. Each ban is logged once, with the source, in a fixed shape that
//! fail2ban can match:
//!
//! `WARN … source banned source=203.0.113.7 failures=10 ban_secs=600`
//!
//! The ban check rides the nonce-count claim's round trip ([`crate::replay`]); a processor that
//! learns of a ban remembers it until it ends and refuses that source without asking Redis
//! again.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use redis::aio::ConnectionManager;

use crate::error::Error;

const FAIL_LUA: &str = r#"
-- KEYS[1]: failures of a source, KEYS[2]: its ban. ARGV: window_ms, budget, ban_ms
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if n >= tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[1])
  if redis.call('SET', KEYS[2], n, 'NX', 'PX', ARGV[3]) then return n end
end
return 0
"#;

/// How long failures are counted.
const WINDOW_MS: u64 = 60_000;

/// The source key of an address: the IPv4 address, or the /64 of an IPv6 one.
pub fn source_key(ip: IpAddr) -> String {
    sipmsg::net::Source::of(ip).to_string()
}

/// Failure counting and bans for one processor.
pub struct Bans {
    redis: ConnectionManager,
    prefix: String,
    /// Failures a minute before a ban; 0 = never ban.
    budget: u32,
    ban_ms: u64,
    fail: redis::Script,
    /// Bans this processor knows of: source key → end, Unix ms.
    known: Mutex<HashMap<String, u64>>,
}

impl Bans {
    /// Bans under `<prefix>ban:{<source>}`, failures under `<prefix>authfail:{<source>}`.
    pub fn new(redis: ConnectionManager, prefix: &str, budget: u32, ban_secs: u32) -> Self {
        Bans {
            redis,
            prefix: prefix.to_owned(),
            budget,
            ban_ms: u64::from(ban_secs) * 1000,
            fail: redis::Script::new(FAIL_LUA),
            known: Mutex::new(HashMap::new()),
        }
    }

    /// The ban key of a source.
    pub fn ban_key(&self, source: &str) -> String {
        format!("{}ban:{{{source}}}", self.prefix)
    }

    /// How long the ban on `source` this processor knows of has left at `now_ms`, if any.
    pub fn known_banned(&self, source: &str, now_ms: u64) -> Option<u64> {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        match known.get(source) {
            Some(&until) if until > now_ms => Some(until - now_ms),
            Some(_) => {
                known.remove(source);
                None
            }
            None => None,
        }
    }

    /// Ends a ban (an operator lifted it): forgotten here, and its key and failure count
    /// deleted from Redis, so the source starts afresh everywhere.
    pub async fn lift(&self, source: &str) -> Result<(), Error> {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).remove(source);
        let mut conn = self.redis.clone();
        let _: () = redis::cmd("DEL")
            .arg(self.ban_key(source))
            .arg(format!("{}authfail:{{{source}}}", self.prefix))
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// The ban length, in milliseconds.
    pub fn ban_ms(&self) -> u64 {
        self.ban_ms
    }

    /// Remembers a ban found in Redis, ending `remaining_ms` after `now_ms`.
    pub fn learn(&self, source: &str, now_ms: u64, remaining_ms: u64) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: an expired entry is dropped when met, and the map is cleared of them all
        // whenever it grows large (a flood of distinct banned sources).
        if known.len() >= 100_000 {
            known.retain(|_, until| *until > now_ms);
        }
        known.insert(source.to_owned(), now_ms + remaining_ms);
    }

    /// Counts a failed authentication from `source`; `Some(failures)` when this one banned it
    /// (logged here, once per ban, whichever processor saw the failure that crossed the budget).
    pub async fn record_failure(&self, source: &str, now_ms: u64) -> Result<Option<u64>, Error> {
        if self.budget == 0 {
            return Ok(None);
        }
        let mut conn = self.redis.clone();
        let failures: u64 = self
            .fail
            .key(format!("{}authfail:{{{source}}}", self.prefix))
            .key(self.ban_key(source))
            .arg(WINDOW_MS)
            .arg(self.budget)
            .arg(self.ban_ms)
            .invoke_async(&mut conn)
            .await?;
        if failures == 0 {
            return Ok(None);
        }
        self.learn(source, now_ms, self.ban_ms);
        tracing::warn!(
            source,
            failures,
            ban_secs = self.ban_ms / 1000,
            "source banned: too many failed authentications"
        );
        Ok(Some(failures))
    }
}

/// Whether a request's `User-Agent` names a known scanner: one of `scanners` (lower-case)
/// appears in it, in any case.
pub fn is_scanner(user_agent: Option<&str>, scanners: &[String]) -> bool {
    let Some(ua) = user_agent else { return false };
    if scanners.is_empty() {
        return false;
    }
    let ua = ua.to_ascii_lowercase();
    scanners.iter().any(|s| ua.contains(s.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scanners_are_known_by_any_part_of_their_user_agent_in_any_case() {
        let list: Vec<String> = ["friendly-scanner", "sipvicious"].map(String::from).to_vec();
        assert!(is_scanner(Some("friendly-scanner"), &list));
        assert!(is_scanner(Some("SIPVicious 0.3.4"), &list));
        assert!(is_scanner(Some("x Friendly-Scanner y"), &list));
        assert!(!is_scanner(Some("Yealink SIP-T46S 66.86.0.15"), &list));
        assert!(!is_scanner(None, &list));
        assert!(!is_scanner(Some("friendly-scanner"), &[]));
    }
}

//! The processor binary's operator commands (`registrations`, `kick`): they read and change
//! the cluster's registrations in Redis directly, with the processor's configuration, whether
//! or not a processor runs.

use std::time::Duration;

use crate::clock::wall_ms;
use crate::config::ProcessorConfig;
use crate::dialogs::DialogStore;
use crate::error::Error;
use crate::keepalive::Schedule;
use crate::location::Location;
use crate::registrations::{self, Filter, Listed, Served};

/// How long an operator command waits for Redis.
const TIMEOUT: Duration = Duration::from_secs(5);

async fn location(config: &ProcessorConfig) -> Result<Location, Error> {
    Location::connect(&config.redis_url, &config.key_prefix, TIMEOUT).await
}

/// The live registrations `filter` selects, as a table or as JSON (an array of objects).
pub async fn registrations(
    config: &ProcessorConfig,
    filter: &Filter,
    json: bool,
) -> Result<String, Error> {
    let location = location(config).await?;
    let now = wall_ms();
    let bindings = match &filter.aor {
        // One AOR needs no scan.
        Some(aor) => {
            location.lookup(aor, now).await?.into_iter().map(|b| (aor.clone(), b)).collect()
        }
        None => location.scan(now).await?,
    };
    let recorded: Vec<String> = {
        let mut conn = location.redis();
        redis::cmd("HVALS")
            .arg(registrations::sockets_key(&config.key_prefix))
            .query_async(&mut conn)
            .await?
    };
    let served = Served::from_recorded(recorded.iter().map(String::as_str));
    let rows: Vec<Listed> = bindings
        .iter()
        .filter(|(aor, b)| filter.matches(aor, b, &served))
        .map(|(aor, b)| Listed::new(aor, b, now, &served))
        .collect();
    if json {
        let text = serde_json::to_string_pretty(&rows)
            .map_err(|e| Error::Config(format!("cannot render JSON: {e}")))?;
        return Ok(text + "\n");
    }
    Ok(registrations::table(&rows))
}

/// Removes the bindings of `aor` (only the one with Contact `contact`, when given) and their
/// keepalives; returns how many were removed. The phone gets no call until it registers
/// again.
pub async fn kick(
    config: &ProcessorConfig,
    aor: &str,
    contact: Option<&str>,
) -> Result<usize, Error> {
    let location = location(config).await?;
    let schedule = Schedule::new(location.redis(), &config.key_prefix);
    let now = wall_ms();
    let bindings = location.lookup(aor, now).await?;
    let doomed: Vec<_> =
        bindings.iter().filter(|b| contact.is_none_or(|c| b.contact == c)).collect();
    for b in &doomed {
        location.remove(aor, &b.contact).await?;
        schedule.remove(aor, &b.contact).await?;
    }
    Ok(doomed.len())
}

/// The Redis pub/sub channel processors take operator orders on.
pub fn channel(prefix: &str) -> String {
    format!("{prefix}admin")
}

/// `hangup <call_ref> <reply channel>` → (call_ref, reply channel); anything else → `None`.
pub fn parse_hangup(order: &str) -> Option<(&str, &str)> {
    let mut words = order.split(' ');
    let (Some("hangup"), Some(call_ref), Some(reply), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return None;
    };
    let plain =
        |s: &str| !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| b.is_ascii_graphic());
    (plain(call_ref) && plain(reply)).then_some((call_ref, reply))
}

/// One answered call as listed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CallListed {
    /// The processor's id for the call (what `hangup --call` takes).
    pub call_ref: String,
    /// Caller's AOR.
    pub caller: String,
    /// Callee's AOR.
    pub callee: String,
    /// The IP the call came in on (an alias, or the main IP).
    pub ingress_ip: String,
    /// Seconds since it was answered.
    pub age_secs: u64,
}

/// The answered calls stored in Redis, oldest first, as a table or as JSON.
pub async fn calls(config: &ProcessorConfig, json: bool) -> Result<String, Error> {
    let location = location(config).await?;
    let store = DialogStore::new(location.redis(), &config.key_prefix);
    let now = wall_ms();
    let mut rows: Vec<CallListed> = store
        .scan()
        .await?
        .into_iter()
        .map(|r| CallListed {
            call_ref: r.call_ref,
            caller: r.caller_aor,
            callee: r.callee_aor,
            ingress_ip: r.a_ingress_ip.to_string(),
            age_secs: now.saturating_sub(r.answered_at_ms) / 1000,
        })
        .collect();
    rows.sort_by(|a, b| b.age_secs.cmp(&a.age_secs).then(a.call_ref.cmp(&b.call_ref)));
    if json {
        let text = serde_json::to_string_pretty(&rows)
            .map_err(|e| Error::Config(format!("cannot render JSON: {e}")))?;
        return Ok(text + "\n");
    }
    let mut out =
        format!("{:<40} {:<30} {:<30} {:<16} {:>8}\n", "CALL", "CALLER", "CALLEE", "VIA", "AGE");
    for r in &rows {
        out.push_str(&format!(
            "{:<40} {:<30} {:<30} {:<16} {:>7}s\n",
            r.call_ref, r.caller, r.callee, r.ingress_ip, r.age_secs
        ));
    }
    Ok(out)
}

/// Asks the processors to end answered call `call_ref`; returns the id of the processor that
/// did, or an error when none holds it within `wait`.
pub async fn hang_up(
    config: &ProcessorConfig,
    call_ref: &str,
    wait: Duration,
) -> Result<String, Error> {
    use futures::StreamExt as _;
    let reply = format!("{}admin-reply:{:016x}", config.key_prefix, rand::random::<u64>());
    let order = format!("hangup {call_ref} {reply}");
    if parse_hangup(&order) != Some((call_ref, reply.as_str())) {
        return Err(Error::Config(format!("{call_ref:?} is not a call reference")));
    }
    let client = redis::Client::open(config.redis_url.as_str())?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(&reply).await?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let _: i64 = redis::cmd("PUBLISH")
        .arg(channel(&config.key_prefix))
        .arg(&order)
        .query_async(&mut conn)
        .await?;
    let mut messages = pubsub.on_message();
    match tokio::time::timeout(wait, messages.next()).await {
        Ok(Some(msg)) => Ok(msg.get_payload::<String>().unwrap_or_default()),
        _ => Err(Error::Config(format!(
            "no running processor holds an answered call {call_ref} (within {wait:?})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_hangup_orders_are_taken() {
        assert_eq!(parse_hangup("hangup p1-abc r:1"), Some(("p1-abc", "r:1")));
        for bad in
            ["", "hangup", "hangup p1", "hangup p1 r extra", "HANGUP p1 r", "hangup p1\r\n r"]
        {
            assert_eq!(parse_hangup(bad), None, "{bad:?}");
        }
        let long = format!("hangup {} r", "x".repeat(300));
        assert_eq!(parse_hangup(&long), None);
    }
}

/// What `sipalias-processor did` is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DidOrder {
    /// Point `number` at `aor`.
    Add {
        /// E.164.
        number: String,
        /// `user@domain`.
        aor: String,
    },
    /// Remove `number`.
    Delete {
        /// E.164.
        number: String,
    },
    /// Every DID, as a table or JSON.
    List {
        /// JSON instead of a table.
        json: bool,
    },
}

/// Carries out a DID order; what to print.
pub async fn did(config: &ProcessorConfig, order: DidOrder) -> Result<String, Error> {
    let dids = crate::dids::Dids::new(location(config).await?.redis(), &config.key_prefix);
    match order {
        DidOrder::Add { number, aor } => {
            dids.set(&number, &aor).await?;
            Ok(format!("{number} → {aor}\n"))
        }
        DidOrder::Delete { number } => {
            crate::dids::check_number(&number).map_err(Error::Config)?;
            if dids.delete(&number).await? {
                Ok(format!("{number} removed\n"))
            } else {
                Err(Error::Config(format!("{number} is no DID")))
            }
        }
        DidOrder::List { json } => {
            let all = dids.list().await?;
            if json {
                let rows: Vec<serde_json::Value> = all
                    .iter()
                    .map(|(number, aor)| serde_json::json!({"number": number, "aor": aor}))
                    .collect();
                return Ok(serde_json::Value::Array(rows).to_string() + "\n");
            }
            let mut out = format!("{:<18} {}\n", "NUMBER", "AOR");
            for (number, aor) in &all {
                out.push_str(&format!("{number:<18} {aor}\n"));
            }
            Ok(out)
        }
    }
}

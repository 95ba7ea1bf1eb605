//! The processor binary's operator commands (`registrations`, `kick`): they read and change
//! the cluster's registrations in Redis directly, with the processor's configuration, whether
//! or not a processor runs.

use std::time::Duration;

use crate::clock::wall_ms;
use crate::config::ProcessorConfig;
use crate::error::Error;
use crate::keepalive::Schedule;
use crate::location::Location;
use crate::registrations::{self, Filter, Listed};

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
    let rows: Vec<Listed> = bindings
        .iter()
        .filter(|(aor, b)| filter.matches(aor, b))
        .map(|(aor, b)| Listed::new(aor, b, now))
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

//! NAT keepalives: every binding is pinged once per interval, from the socket it registered
//! through, by exactly one of the processors.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use sipalias_tests::cluster::{Cluster, ClusterOptions};
use sipalias_tests::phone::Phone;

use super::registered;

/// Users × phones per user = 100 bindings.
const USERS: usize = 10;
const PHONES_PER_USER: usize = 10;

#[test]
fn two_processors_ping_each_of_100_bindings_once_per_interval_from_its_ingress_socket() -> Result<()>
{
    let cluster =
        Cluster::start(ClusterOptions { keepalive_interval_secs: 1, ..ClusterOptions::default() })?;
    // Each phone answers from the moment it is registered: an unanswered OPTIONS would be
    // retransmitted (RFC 3261 timer E) while the other phones are still registering.
    let stop = Arc::new(Mutex::new(None::<Instant>));
    let watch = Duration::from_millis(3500);
    let mut handles = Vec::new();
    for u in 0..USERS {
        let user = format!("ka{u}");
        cluster.add_account(&user, "pw")?;
        // Half the users registered through an alias, half through the main IP.
        let server = if u % 2 == 0 { cluster.alias2() } else { cluster.main() };
        for _ in 0..PHONES_PER_USER {
            let phone = registered(&server, &user, "pw")?;
            let stop = Arc::clone(&stop);
            handles.push(std::thread::spawn(move || answer_keepalives(phone, server.addr, &stop)));
        }
    }
    let window_start = Instant::now();
    *stop.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = Some(window_start + watch);
    let mut all_nodes = Vec::new();
    for h in handles {
        let (all_at, nodes) = h.join().map_err(|_| anyhow::anyhow!("phone thread panicked"))??;
        for pair in all_at.windows(2) {
            let gap = pair[1] - pair[0];
            ensure!(
                gap >= Duration::from_millis(700),
                "two keepalives {gap:?} apart: more than one per interval"
            );
        }
        let at: Vec<Instant> = all_at.into_iter().filter(|t| *t >= window_start).collect();
        ensure!(at.len() >= 2, "a binding got {} keepalives in {watch:?}, expected 3", at.len());
        ensure!(at.len() <= 4, "a binding got {} keepalives in {watch:?}: duplicates", at.len());
        all_nodes.extend(nodes);
    }
    ensure!(
        all_nodes.iter().any(|n| n == "p1") && all_nodes.iter().any(|n| n == "p2"),
        "both processors share the keepalives: {:?}",
        all_nodes.iter().filter(|n| *n == "p1").count()
    );
    cluster.check_all_running()
}

/// Answers every keepalive `phone` gets until the deadline in `stop` (set once all phones are
/// registered) has passed; returns when each distinct keepalive first arrived and which
/// processor sent it. A retransmission (same branch) is answered again but counted once.
fn answer_keepalives(
    mut phone: Phone,
    ingress: SocketAddr,
    stop: &Mutex<Option<Instant>>,
) -> Result<(Vec<Instant>, Vec<String>)> {
    let (mut at, mut nodes, mut seen) = (Vec::new(), Vec::new(), HashSet::new());
    loop {
        let deadline = *stop.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let left = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) => left,
                None => break,
            },
            // Still registering the others: wait a little, then look at the deadline again.
            None => Duration::from_millis(200),
        };
        let Ok(ping) = phone.recv_request("OPTIONS", left) else { continue };
        ensure!(ping.from == ingress, "keepalive from {}, expected {ingress}", ping.from);
        let via = ping.msg.top_via()?;
        ensure!(via.host == ingress.ip().to_string() && via.port == Some(ingress.port()));
        let branch = via.branch().unwrap_or_default().to_owned();
        if seen.insert(branch.clone()) {
            nodes.push(sipmsg::scan::branch_token(&branch).unwrap_or("?").to_owned());
            at.push(ping.at);
        }
        phone.respond(&ping, 200, "OK", None)?;
    }
    Ok((at, nodes))
}

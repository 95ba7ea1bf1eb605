//! NAT keepalives: every binding is pinged once per interval, from the socket it registered
//! through, by exactly one of the processors.

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
    let mut phones: Vec<(Phone, std::net::SocketAddr)> = Vec::new();
    for u in 0..USERS {
        let user = format!("ka{u}");
        cluster.add_account(&user, "pw")?;
        // Half the users registered through an alias, half through the main IP.
        let server = if u % 2 == 0 { cluster.alias2() } else { cluster.main() };
        for _ in 0..PHONES_PER_USER {
            phones.push((registered(&server, &user, "pw")?, server.addr));
        }
    }
    let watch = Duration::from_millis(3500);
    let handles: Vec<_> = phones
        .into_iter()
        .map(|(mut phone, ingress)| {
            std::thread::spawn(move || -> Result<(Vec<Instant>, Vec<String>)> {
                let until = Instant::now() + watch;
                let (mut at, mut nodes) = (Vec::new(), Vec::new());
                while let Some(left) = until.checked_duration_since(Instant::now()) {
                    let Ok(ping) = phone.recv_request("OPTIONS", left) else { break };
                    ensure!(
                        ping.from == ingress,
                        "keepalive from {}, expected {ingress}",
                        ping.from
                    );
                    let via = ping.msg.top_via()?;
                    ensure!(
                        via.host == ingress.ip().to_string() && via.port == Some(ingress.port())
                    );
                    let node = via.branch().and_then(sipmsg::scan::branch_token).unwrap_or("?");
                    nodes.push(node.to_owned());
                    at.push(ping.at);
                    phone.respond(&ping, 200, "OK", None)?;
                }
                Ok((at, nodes))
            })
        })
        .collect();
    let mut all_nodes = Vec::new();
    for h in handles {
        let (at, nodes) = h.join().map_err(|_| anyhow::anyhow!("phone thread panicked"))??;
        ensure!(at.len() >= 2, "a binding got {} keepalives in {watch:?}, expected 3", at.len());
        ensure!(at.len() <= 4, "a binding got {} keepalives in {watch:?}: duplicates", at.len());
        for pair in at.windows(2) {
            let gap = pair[1] - pair[0];
            ensure!(
                gap >= Duration::from_millis(700),
                "two keepalives {gap:?} apart: more than one per interval"
            );
        }
        all_nodes.extend(nodes);
    }
    ensure!(
        all_nodes.iter().any(|n| n == "p1") && all_nodes.iter().any(|n| n == "p2"),
        "both processors share the keepalives: {:?}",
        all_nodes.iter().filter(|n| *n == "p1").count()
    );
    cluster.check_all_running()
}

//! The operations listeners: `/metrics` counting what a call through an alias did, per alias,
//! on each service; `/healthz` and `/readyz`, the latter following Redis.

use std::time::Duration;

use anyhow::{Result, ensure};
use sipalias_tests::cluster::{Cluster, ClusterOptions, Service};
use sipalias_tests::http::{get, metric_sum, wait_status};

use super::{WAIT, complete_call, registered};

/// The processors' `/metrics` pages, concatenated (a counter's sum is then cluster-wide).
fn processors_metrics(cluster: &Cluster, n: usize) -> Result<String> {
    let mut all = String::new();
    for p in 1..=n {
        let (status, body) = get(cluster.ops_addr(Service::Processor(p))?, "/metrics")?;
        ensure!(status == 200, "p{p} /metrics answered {status}");
        all.push_str(&body);
    }
    Ok(all)
}

#[test]
fn metrics_count_registrations_and_a_call_per_alias_on_every_service() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions { metrics: true, ..ClusterOptions::default() })?;
    for service in
        [Service::Dispatcher, Service::Billing, Service::Processor(1), Service::Processor(2)]
    {
        let addr = cluster.ops_addr(service)?;
        ensure!(get(addr, "/healthz")? == (200, "ok\n".into()), "{service:?} /healthz");
        wait_status(addr, "/readyz", 200, WAIT)?;
    }
    cluster.add_account("alice", "pw-alice")?;
    cluster.add_account("bob", "pw-bob")?;
    // Alice's phone still points at the old provider's IP (alias 127.0.0.2); Bob's at the
    // main IP.
    let alias = cluster.alias2();
    let mut alice = registered(&alias, "alice", "pw-alice")?;
    let mut bob = registered(&cluster.main(), "bob", "pw-bob")?;
    complete_call(&mut alice, &alias, &mut bob, cluster.main().addr)?;

    let (status, edge) = get(cluster.ops_addr(Service::Dispatcher)?, "/metrics")?;
    ensure!(status == 200, "dispatcher /metrics answered {status}");
    let received = |ip: &str, kind: &str| {
        metric_sum(&edge, "sipalias_sip_received_total", &[("ip", ip), ("kind", kind)])
    };
    // Through the alias: a challenged REGISTER and its retry, a challenged INVITE and its
    // retry, an ACK, a BYE.
    ensure!(received("127.0.0.2", "REGISTER") >= 2.0, "alias REGISTERs: {edge}");
    ensure!(received("127.0.0.2", "INVITE") >= 2.0, "alias INVITEs: {edge}");
    ensure!(received("127.0.0.2", "BYE") >= 1.0, "alias BYE: {edge}");
    // Bob answered on the main IP: his 2xx counted there, no INVITE was received there.
    ensure!(received("127.0.0.1", "2xx") >= 2.0, "main-IP responses: {edge}");
    ensure!(received("127.0.0.1", "INVITE") == 0.0, "no INVITE arrived on the main IP: {edge}");
    ensure!(metric_sum(&edge, "sipalias_processors_linked", &[]) == 2.0, "{edge}");

    let procs = processors_metrics(&cluster, 2)?;
    let finals = |ip: &str, method: &str, status: &str| {
        metric_sum(
            &procs,
            "sipalias_sip_final_responses_total",
            &[("ip", ip), ("method", method), ("status", status)],
        )
    };
    ensure!(finals("127.0.0.2", "REGISTER", "200") == 1.0, "alias REGISTER 200: {procs}");
    ensure!(finals("127.0.0.2", "REGISTER", "401") == 1.0, "alias REGISTER 401: {procs}");
    ensure!(finals("127.0.0.1", "REGISTER", "200") == 1.0, "main REGISTER 200: {procs}");
    ensure!(finals("127.0.0.2", "INVITE", "200") == 1.0, "alias INVITE 200: {procs}");
    ensure!(finals("127.0.0.1", "INVITE", "200") == 0.0, "{procs}");
    ensure!(
        metric_sum(&procs, "sipalias_call_setup_seconds_count", &[("ip", "127.0.0.2")]) >= 2.0,
        "setup latency recorded for the challenged and the authorized INVITE: {procs}"
    );

    let (_, billing) = get(cluster.ops_addr(Service::Billing)?, "/metrics")?;
    ensure!(
        metric_sum(&billing, "sipalias_billing_authorizations_total", &[("outcome", "allowed")])
            == 1.0,
        "{billing}"
    );
    cluster.check_all_running()
}

#[test]
fn readiness_follows_redis_and_liveness_does_not() -> Result<()> {
    let mut cluster =
        Cluster::start(ClusterOptions { metrics: true, ..ClusterOptions::default() })?;
    let p1 = cluster.ops_addr(Service::Processor(1))?;
    let billing = cluster.ops_addr(Service::Billing)?;
    let dispatcher = cluster.ops_addr(Service::Dispatcher)?;
    for addr in [p1, billing, dispatcher] {
        wait_status(addr, "/readyz", 200, WAIT)?;
    }
    cluster.stop_redis()?;
    let why = wait_status(p1, "/readyz", 503, WAIT)?;
    ensure!(why.starts_with("not ready: redis"), "{why}");
    let why = wait_status(billing, "/readyz", 503, WAIT)?;
    ensure!(why.starts_with("not ready: redis"), "{why}");
    // Alive all the same, and the dispatcher does not need Redis.
    for addr in [p1, billing, dispatcher] {
        ensure!(get(addr, "/healthz")?.0 == 200, "{addr} /healthz");
    }
    ensure!(get(dispatcher, "/readyz")?.0 == 200, "the dispatcher stays ready");
    cluster.start_redis()?;
    wait_status(p1, "/readyz", 200, Duration::from_secs(20))?;
    wait_status(billing, "/readyz", 200, Duration::from_secs(20))?;
    cluster.check_all_running()
}

#[test]
fn a_dispatcher_without_processors_is_alive_but_not_ready() -> Result<()> {
    let mut cluster = Cluster::start(ClusterOptions {
        metrics: true,
        processors: 1,
        ..ClusterOptions::default()
    })?;
    let dispatcher = cluster.ops_addr(Service::Dispatcher)?;
    wait_status(dispatcher, "/readyz", 200, WAIT)?;
    cluster.kill_processor(1)?;
    let why = wait_status(dispatcher, "/readyz", 503, Duration::from_secs(20))?;
    ensure!(why == "not ready: no processor linked\n", "{why:?}");
    ensure!(get(dispatcher, "/healthz")?.0 == 200);
    Ok(())
}

//! The operations listeners: `/metrics` counting what a call through an alias did, per alias,
//! on each service; `/healthz` and `/readyz`, the latter following Redis.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use sipalias_tests::cluster::{ALIAS2_REALM, Cluster, ClusterOptions, Service};
use sipalias_tests::http::{get, metric_sum, wait_status};
use sipalias_tests::phone::{Phone, Server, next_loopback_ip};

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
    let cluster = Cluster::start(ClusterOptions {
        metrics: true,
        processor_toml: "binding_stats_secs = 1\n".into(),
        ..ClusterOptions::default()
    })?;
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
    // Bob answered on the main IP: his 2xx to the INVITE counted there (the one to the BYE may
    // still be on its way: the caller's BYE is answered without waiting for it), and no INVITE
    // was received there.
    ensure!(received("127.0.0.1", "2xx") >= 1.0, "main-IP responses: {edge}");
    ensure!(received("127.0.0.1", "INVITE") == 0.0, "no INVITE arrived on the main IP: {edge}");
    ensure!(metric_sum(&edge, "sipalias_processors_linked", &[]) == 2.0, "{edge}");
    // The state gauges (recorded every few seconds, the first time at start).
    for gauge in ["sipalias_bans", "sipalias_connections"] {
        ensure!(edge.lines().any(|l| l.starts_with(gauge)), "no {gauge}: {edge}");
    }
    ensure!(metric_sum(&edge, "sipalias_bans", &[]) == 0.0, "{edge}");
    ensure!(metric_sum(&edge, "sipalias_sockets", &[("state", "configured")]) >= 11.0, "{edge}");
    ensure!(metric_sum(&edge, "sipalias_sockets", &[("state", "draining")]) == 0.0, "{edge}");

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
        metric_sum(&procs, "sipalias_billing_call_seconds_count", &[("call", "Authorize")]) == 1.0,
        "one authorization: {procs}"
    );
    ensure!(metric_sum(&procs, "sipalias_billing_errors_total", &[]) == 0.0, "{procs}");
    // Redis on the registration and call path: both REGISTERs stored, the callee looked up.
    let redis = |op: &str| metric_sum(&procs, "sipalias_redis_seconds_count", &[("op", op)]);
    ensure!(redis("register") == 2.0 && redis("lookup") >= 1.0, "{procs}");
    ensure!(metric_sum(&procs, "sipalias_redis_errors_total", &[]) == 0.0, "{procs}");
    ensure!(
        metric_sum(&procs, "sipalias_call_setup_seconds_count", &[("ip", "127.0.0.2")]) >= 2.0,
        "setup latency recorded for the challenged and the authorized INVITE: {procs}"
    );

    // The migration gauge: phones per IP, counted by one processor, reported by both.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let procs = processors_metrics(&cluster, 2)?;
        let on = |ip: &str| metric_sum(&procs, "sipalias_bindings", &[("ip", ip)]);
        // Summed over the two processors, each reporting the cluster-wide count.
        if on("127.0.0.2") == 2.0 && on("127.0.0.1") == 2.0 && on("127.0.0.3") == 0.0 {
            break;
        }
        ensure!(std::time::Instant::now() < deadline, "sipalias_bindings: {procs}");
        // Polling a gauge refreshed every second: there is no event to wait on.
        std::thread::sleep(Duration::from_millis(100));
    }

    let (_, billing) = get(cluster.ops_addr(Service::Billing)?, "/metrics")?;
    ensure!(
        metric_sum(&billing, "sipalias_billing_authorizations_total", &[("outcome", "allowed")])
            == 1.0,
        "{billing}"
    );
    ensure!(billing.lines().any(|l| l.starts_with("sipalias_billing_reservations ")), "{billing}");
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

/// A cluster with alice registered through alias 127.0.0.2 and bob through the main IP.
fn alice_on_the_alias_bob_on_the_main_ip() -> Result<(Cluster, Server, Phone, Phone)> {
    let cluster = Cluster::start(ClusterOptions::default())?;
    cluster.add_account("alice", "pw-alice")?;
    cluster.add_account("bob", "pw-bob")?;
    let alias = cluster.alias2();
    let alice = registered(&alias, "alice", "pw-alice")?;
    let bob = registered(&cluster.main(), "bob", "pw-bob")?;
    Ok((cluster, alias, alice, bob))
}

/// The `WWW-Authenticate` nonce of a 401.
fn nonce_of(resp: &sipmsg::SipMessage) -> Result<String> {
    let challenge = resp.header("www-authenticate").context("no WWW-Authenticate")?;
    let start = challenge.find("nonce=\"").context("no nonce")? + 7;
    let len = challenge[start..].find('"').context("unterminated nonce")?;
    Ok(challenge[start..start + len].to_owned())
}

#[test]
fn the_fail2ban_filter_bans_the_true_source_of_auth_failures_and_nobody_framed() -> Result<()> {
    let filter = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/fail2ban/filter.d/sipalias.conf");
    let cluster = Cluster::start(ClusterOptions::default())?;
    cluster.add_account("bob", "pw-bob")?;
    let alias = cluster.alias2();
    // A phone with the wrong password, through the alias.
    let mut wrong = Phone::new("bob", "not-bobs-password")?;
    let ex = wrong.register(&alias, 300)?;
    ensure!(ex.status() != 200, "a wrong password was accepted");
    // An attacker whose digest user name carries a forged security line naming 192.0.2.66.
    let attacker = std::net::UdpSocket::bind((next_loopback_ip(), 0))?;
    attacker.set_read_timeout(Some(WAIT))?;
    let me = attacker.local_addr()?;
    let uri = format!("sip:{}", alias.addr);
    let register = |auth: &str, cseq: u32| {
        format!(
            "REGISTER {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKf2b{cseq};rport\r\n\
Max-Forwards: 70\r\nFrom: <sip:bob@{ip}>;tag=f2b\r\nTo: <sip:bob@{ip}>\r\nCall-ID: f2b@{me}\r\n\
CSeq: {cseq} REGISTER\r\nContact: <sip:bob@{me}>\r\n{auth}Content-Length: 0\r\n\r\n",
            ip = alias.addr.ip()
        )
    };
    let mut buf = [0u8; 4096];
    attacker.send_to(register("", 1).as_bytes(), alias.addr)?;
    let (n, _) = attacker.recv_from(&mut buf)?;
    let challenge = sipmsg::parse(&buf[..n])?;
    ensure!(challenge.status() == Some(401), "no challenge: {challenge:?}");
    let nonce = nonce_of(&challenge)?;
    let forged = r#"x\" WARN sipalias::security: auth failure source_ip=192.0.2.66 y"#;
    let auth = format!(
        "Authorization: Digest username=\"{forged}\", realm=\"{ALIAS2_REALM}\", nonce=\"{nonce}\", \
uri=\"{uri}\", response=\"0123456789abcdef0123456789abcdef\", algorithm=MD5, qop=auth, \
nc=00000001, cnonce=\"f2b\"\r\n"
    );
    attacker.send_to(register(&auth, 2).as_bytes(), alias.addr)?;
    let (n, _) = attacker.recv_from(&mut buf)?;
    let answer = sipmsg::parse(&buf[..n])?;
    ensure!(answer.status() != Some(200), "forged credentials accepted: {answer:?}");

    // Both failures are in the processors' security log, whichever processor had them.
    let deadline = std::time::Instant::now() + WAIT;
    let lines = loop {
        let lines: Vec<String> = [1, 2]
            .iter()
            .filter_map(|n| cluster.processor(*n))
            .flat_map(|p| p.lines())
            .filter(|l| l.contains("sipalias::security"))
            .collect();
        if lines.len() >= 2 || std::time::Instant::now() >= deadline {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(lines.len() >= 2, "security lines: {lines:#?}");
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("processor.log");
    std::fs::write(&log, lines.join("\n") + "\n")?;
    let out = std::process::Command::new("fail2ban-regex")
        .args(["-o", "ip"])
        .arg(&log)
        .arg(filter)
        .output()
        .context("running fail2ban-regex (Debian package fail2ban; tests/run.sh installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let banned: std::collections::BTreeSet<&str> = text.lines().map(str::trim).collect();
    let expected: std::collections::BTreeSet<String> =
        [wrong.addr().ip().to_string(), me.ip().to_string()].into();
    ensure!(
        banned == expected.iter().map(String::as_str).collect(),
        "fail2ban matched {banned:?}, expected {expected:?}; lines {lines:#?}"
    );
    cluster.check_all_running()
}

#[test]
fn json_logs_feed_the_json_filter_and_sighup_changes_the_log_level() -> Result<()> {
    let filter = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/fail2ban/filter.d/sipalias.conf");
    let cluster = Cluster::start(ClusterOptions {
        processors: 1,
        processor_toml: "log_format = \"json\"\n".into(),
        ..ClusterOptions::default()
    })?;
    let p1 = cluster.processor(1).context("p1")?;
    // Every line the processor wrote so far is one JSON object.
    for line in p1.lines() {
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))?;
        ensure!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    cluster.add_account("bob", "pw-bob")?;
    let mut wrong = Phone::new("bob", "not-bobs-password")?;
    ensure!(wrong.register(&cluster.alias2(), 300)?.status() != 200);
    let line = p1.wait_for_line("\"auth failure\"", WAIT)?;
    // The filter's JSON variant, as an operator would enable it.
    let conf = std::fs::read_to_string(filter)?;
    let json_regex = conf
        .lines()
        .find_map(|l| l.strip_prefix("failregex_json = "))
        .context("no failregex_json in the filter")?;
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("json.conf"),
        format!("[Definition]\nfailregex = {json_regex}\n"),
    )?;
    std::fs::write(dir.path().join("p1.log"), format!("{line}\n"))?;
    let out = std::process::Command::new("fail2ban-regex")
        .args(["-o", "ip"])
        .arg(dir.path().join("p1.log"))
        .arg(dir.path().join("json.conf"))
        .output()
        .context("running fail2ban-regex")?;
    let matched = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    ensure!(matched == wrong.addr().ip().to_string(), "matched {matched:?} in {line}");

    // Debug lines appear only after the file says so and the processor got SIGHUP.
    ensure!(!p1.lines().iter().any(|l| l.contains("\"DEBUG\"")), "debug before the change");
    let config = std::fs::read_to_string(cluster.config_path())?;
    let debug = config.replacen("[processor]\n", "[processor]\nlog_level = \"debug\"\n", 1);
    std::fs::write(cluster.config_path(), debug)?;
    let mark = p1.lines().len();
    p1.send_hup()?;
    p1.wait_for_line_since(mark, "SIGHUP: log level set", WAIT)?;
    // Any request now logs at debug (a REGISTER's challenge path does).
    let mut again = Phone::new("bob", "not-bobs-password")?;
    let _ = again.register(&cluster.alias2(), 300)?;
    p1.wait_for_line_since(mark, "\"DEBUG\"", WAIT)?;
    cluster.check_all_running()
}

#[test]
fn the_cli_lists_registrations_by_alias_and_a_kicked_phone_gets_no_call() -> Result<()> {
    let (cluster, alias, mut alice, mut bob) = alice_on_the_alias_bob_on_the_main_ip()?;

    let table = cluster.processor_cli(&["registrations", "--alias", "127.0.0.2"])?;
    ensure!(table.lines().count() == 2, "header and alice only: {table}");
    ensure!(table.contains("alice@sip.example.net") && !table.contains("bob@"), "{table}");
    let json = cluster.processor_cli(&["registrations", "--json"])?;
    let rows: serde_json::Value = serde_json::from_str(&json)?;
    let rows = rows.as_array().context("an array")?;
    ensure!(rows.len() == 2, "{json}");
    let alice_row = rows.iter().find(|r| r["aor"] == "alice@sip.example.net").context("alice")?;
    ensure!(alice_row["ingress"] == format!("{}/udp", alias.addr).as_str(), "{alice_row}");
    ensure!(alice_row["received"] == alice.addr().to_string().as_str(), "{alice_row}");
    ensure!(
        alice_row["expires_in_secs"].as_u64().is_some_and(|s| s > 200 && s <= 300),
        "{alice_row}"
    );
    let by_aor =
        cluster.processor_cli(&["registrations", "--aor", "bob@sip.example.net", "--json"])?;
    ensure!(
        serde_json::from_str::<serde_json::Value>(&by_aor)?.as_array().map(Vec::len) == Some(1)
    );
    // Hostile filters find nothing and break nothing.
    for args in [["--aor", "*"], ["--aor", "}loc:{x"], ["--user-agent", "\u{1b}[2J"]] {
        let out = cluster.processor_cli(&[&["registrations"][..], &args[..]].concat())?;
        ensure!(out.lines().count() == 1, "{args:?}: {out}");
    }
    ensure!(cluster.processor_cli(&["registrations", "--alias", "not-an-ip"]).is_err());

    let kicked = cluster.processor_cli(&["kick", "--aor", "alice@sip.example.net"])?;
    ensure!(kicked.trim() == "1 registrations of alice@sip.example.net removed", "{kicked}");
    let offer = sipalias_tests::phone::sdp("bob", bob.addr().ip(), 40_000);
    let mut call = bob.invite(&cluster.main(), "alice", &offer)?;
    let answer = bob.final_response(&mut call, WAIT)?;
    ensure!(answer.msg.status() == Some(480), "a kicked phone's caller got {}", answer.summary());
    alice.expect_none(Duration::from_millis(500), |m| m.method() == Some("INVITE"))?;
    cluster.check_all_running()
}

#[test]
fn the_dispatcher_edge_answers_the_grpc_health_protocol_without_the_link_secret() -> Result<()> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let cluster = Cluster::start(ClusterOptions { processors: 1, ..ClusterOptions::default() })?;
    let url = format!("http://{}", cluster.edge_addr());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(url)?.connect().await?;
        let mut client = HealthClient::new(channel);
        for service in ["", "sipalias.edge.v1.Edge"] {
            let status = client
                .check(HealthCheckRequest { service: service.into() })
                .await
                .with_context(|| format!("health of {service:?}"))?
                .into_inner()
                .status;
            ensure!(status == ServingStatus::Serving as i32, "{service:?}: {status}");
        }
        let unknown = client.check(HealthCheckRequest { service: "no.such.Service".into() }).await;
        ensure!(unknown.is_err_and(|s| s.code() == tonic::Code::NotFound), "unknown service");
        Ok::<(), anyhow::Error>(())
    })?;
    cluster.check_all_running()
}

#[test]
fn the_cli_lists_a_call_up_by_its_alias_and_hangs_it_up() -> Result<()> {
    let (cluster, alias, mut alice, mut bob) = alice_on_the_alias_bob_on_the_main_ip()?;
    let offer = sipalias_tests::phone::sdp("alice", alice.addr().ip(), 40_000);
    let mut call = alice.invite(&alias, "bob", &offer)?;
    let invite = bob.recv_request("INVITE", WAIT)?;
    bob.answer(&invite, 200, "OK", &sipalias_tests::phone::sdp("bob", bob.addr().ip(), 50_000))?;
    ensure!(alice.final_response(&mut call, WAIT)?.msg.status() == Some(200));
    alice.ack(&call)?;
    bob.recv_request("ACK", WAIT)?;

    // The call is stored once answered (written in order, asynchronously): poll the listing.
    let deadline = std::time::Instant::now() + WAIT;
    let rows = loop {
        let json = cluster.processor_cli(&["calls", "--json"])?;
        let rows: Vec<serde_json::Value> = serde_json::from_str(&json)?;
        if !rows.is_empty() || std::time::Instant::now() >= deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure!(rows.len() == 1, "{rows:?}");
    let row = &rows[0];
    ensure!(
        row["caller"] == "alice@sip.example.net" && row["callee"] == "bob@sip.example.net",
        "{row}"
    );
    ensure!(row["ingress_ip"] == "127.0.0.2", "the call came in through the alias: {row}");
    let call_ref = row["call_ref"].as_str().context("call_ref")?.to_owned();
    let table = cluster.processor_cli(&["calls"])?;
    ensure!(table.contains(&call_ref) && table.contains("127.0.0.2"), "{table}");

    let ended = cluster.processor_cli(&["hangup", "--call", &call_ref])?;
    ensure!(ended.starts_with(&format!("call {call_ref} ended by p")), "{ended}");
    for phone in [&mut alice, &mut bob] {
        let bye = phone.recv_request("BYE", WAIT)?;
        ensure!(
            bye.msg.header("reason").is_some_and(|r| r.contains("ended by the operator")),
            "{}",
            bye.summary()
        );
        phone.respond(&bye, 200, "OK", None)?;
    }
    // Gone: not listed, and a second hang-up finds nobody holding it.
    let deadline = std::time::Instant::now() + WAIT;
    while cluster.processor_cli(&["calls", "--json"])?.trim() != "[]" {
        ensure!(std::time::Instant::now() < deadline, "the call is still listed");
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(cluster.processor_cli(&["hangup", "--call", &call_ref]).is_err());
    ensure!(cluster.processor_cli(&["hangup", "--call", "x y"]).is_err(), "hostile reference");
    cluster.check_all_running()
}

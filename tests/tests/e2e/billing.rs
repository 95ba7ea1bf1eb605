//! Billing through the whole cluster: prepaid cut-off, concurrent-call limits and a billing
//! outage, with real billing, Redis, processors and phones.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use sipalias_tests::cluster::{Cluster, ClusterOptions};
use sipalias_tests::phone::{Phone, sdp};

use super::{WAIT, cluster, registered};

/// Caller calls callee (registered through alias2) and the call is answered and ACKed.
fn answered(
    caller: &mut Phone,
    server: &sipalias_tests::phone::Server,
    callee: &mut Phone,
) -> Result<(sipalias_tests::phone::Call, sipalias_tests::phone::Call)> {
    let offer = sdp(caller.user(), caller.addr().ip(), 40_000);
    let mut call = caller.invite(server, callee.user(), &offer)?;
    let invite = callee.recv_request("INVITE", WAIT)?;
    let answer = sdp(callee.user(), callee.addr().ip(), 50_000);
    let callee_call = callee.answer(&invite, 200, "OK", &answer)?;
    let ok = caller.final_response(&mut call, WAIT)?;
    ensure!(ok.msg.status() == Some(200), "caller got {}", ok.summary());
    caller.ack(&call)?;
    callee.recv_request("ACK", WAIT)?;
    Ok((call, callee_call))
}

/// A rate plan `pp` (0.60 per minute, per-second increments), a prepaid caller `payer` with
/// `balance` on it, and callee `alice` registered through alias2.
fn prepaid_payer_and_alice(cluster: &Cluster, balance: &str) -> Result<(Phone, Phone)> {
    cluster.billing_cli(&[
        "rate-plan",
        "set",
        "--name",
        "pp",
        "--prefix",
        "default",
        "--per-minute",
        "0.60",
        "--increments",
        "1/1",
    ])?;
    cluster.add_account_with(
        "payer",
        "pw1",
        &["--prepaid", "--balance", balance, "--rate-plan", "pp"],
    )?;
    cluster.add_account("alice", "pw2")?;
    let callee = registered(&cluster.alias2(), "alice", "pw2")?;
    Ok((Phone::new("payer", "pw1")?, callee))
}

#[test]
fn prepaid_call_is_cut_off_at_its_limit_on_both_legs_and_debited_once() -> Result<()> {
    let cluster = cluster()?;
    // 0.60 per minute, per-second increments: 0.03 buys exactly 3 s.
    let (mut caller, mut callee) = prepaid_payer_and_alice(&cluster, "0.03")?;
    let started = Instant::now();
    answered(&mut caller, &cluster.main(), &mut callee)?;

    let bye_callee = callee.recv_request("BYE", WAIT)?;
    let bye_caller = caller.recv_request("BYE", WAIT)?;
    let held = started.elapsed();
    ensure!(held >= Duration::from_millis(2900), "cut off after {held:?}, before its 3 s");
    ensure!(held <= Duration::from_secs(6), "cut off only after {held:?}");
    for bye in [&bye_callee, &bye_caller] {
        let reason = bye.msg.header("reason").unwrap_or_default();
        ensure!(
            reason.contains("Maximum call duration"),
            "BYE without the cut-off Reason: {reason:?}"
        );
    }
    ensure!(bye_callee.from == cluster.alias2().addr, "callee's BYE came from {}", bye_callee.from);
    callee.respond(&bye_callee, 200, "OK", None)?;
    caller.respond(&bye_caller, 200, "OK", None)?;

    let cdr = cluster.wait_for_cdr(WAIT, |c| {
        c.caller.starts_with("payer@") && c.answered_ms.is_some() && c.charge_micros.is_some()
    })?;
    ensure!(cdr.cause == "cut-off", "CDR cause {:?}", cdr.cause);
    ensure!(cdr.charge_micros == Some(30_000), "charged {:?}, expected 0.03", cdr.charge_micros);
    ensure!(cluster.balance_micros("payer")? == 0, "balance after the call is not 0.00");
    Ok(())
}

#[test]
fn failed_attempts_of_authenticated_callers_leave_cdrs_with_their_status_and_reason() -> Result<()>
{
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-alice")?;
    cluster.add_account("bob", "pw-bob")?;
    cluster.billing_cli(&[
        "rate-plan",
        "set",
        "--name",
        "pp",
        "--prefix",
        "default",
        "--per-minute",
        "0.60",
        "--increments",
        "1/1",
    ])?;
    cluster.add_account_with(
        "broke",
        "pw-broke",
        &["--prepaid", "--balance", "0", "--rate-plan", "pp"],
    )?;
    let mut bob = registered(&cluster.alias2(), "bob", "pw-bob")?;
    let mut alice = Phone::new("alice", "pw-alice")?;
    let offer = sdp("alice", alice.addr().ip(), 40_000);
    let final_status = |phone: &mut Phone, callee: &str| -> Result<u16> {
        let mut call = phone.invite(&cluster.main(), callee, &offer)?;
        Ok(phone.final_response(&mut call, WAIT)?.msg.status().unwrap_or_default())
    };

    // Nobody of that name: 404 before billing authorizes anything.
    ensure!(final_status(&mut alice, "nobody")? == 404);
    // Busy: the callee's 486 reaches the caller; the reservation is released.
    let mut call = alice.invite(&cluster.main(), "bob", &offer)?;
    let invite = bob.recv_request("INVITE", WAIT)?;
    bob.respond(&invite, 486, "Busy Here", None)?;
    let busy = alice.final_response(&mut call, WAIT)?;
    ensure!(busy.msg.status() == Some(486), "busy call got {}", busy.summary());
    // Refused by billing: no credit left.
    let mut broke = Phone::new("broke", "pw-broke")?;
    ensure!(final_status(&mut broke, "bob")? == 402);
    // A wrong password leaves nothing: strangers cannot fill the CDRs.
    let mut stranger = Phone::new("alice", "not-her-password")?;
    ensure!(final_status(&mut stranger, "nobody")? != 404);

    let failed = |caller: &'static str, status: u64| {
        move |c: &sipalias_tests::cdr::Cdr| {
            c.caller.starts_with(caller) && c.status == Some(status) && c.answered_ms.is_none()
        }
    };
    let not_found = cluster.wait_for_cdr(WAIT, failed("alice@", 404))?;
    ensure!(not_found.callee.contains("nobody"), "{not_found:?}");
    ensure!(not_found.cause == "refused" && not_found.reason == "Not Found", "{not_found:?}");
    ensure!(not_found.caller_ingress_ip == "127.0.0.1", "{not_found:?}");
    let busy = cluster.wait_for_cdr(WAIT, failed("alice@", 486))?;
    ensure!(busy.callee.starts_with("bob@") && busy.reason == "Busy Here", "{busy:?}");
    ensure!(busy.cause == "not-answered" && busy.charge_micros == Some(0), "{busy:?}");
    let refused = cluster.wait_for_cdr(WAIT, failed("broke@", 402))?;
    ensure!(refused.cause == "refused" && !refused.reason.is_empty(), "{refused:?}");
    let alices = cluster.cdrs()?.into_iter().filter(|c| c.caller.starts_with("alice@")).count();
    ensure!(alices == 2, "the wrong password left a CDR: {:#?}", cluster.cdrs()?);
    cluster.check_all_running()
}

#[test]
fn account_limited_to_5_calls_gets_5_connected_and_5_refused() -> Result<()> {
    let cluster = cluster()?;
    cluster.add_account_with("busy", "pw1", &["--max-calls", "5"])?;
    cluster.add_account("alice", "pw2")?;
    let mut callee = registered(&cluster.alias2(), "alice", "pw2")?;
    let mut calls = Vec::new();
    let (mut connected, mut refused) = (0, 0);
    for _ in 0..10 {
        let mut caller = Phone::new("busy", "pw1")?;
        let offer = sdp("busy", caller.addr().ip(), 40_000);
        let mut call = caller.invite(&cluster.main(), "alice", &offer)?;
        match callee.recv_request("INVITE", Duration::from_millis(1500)) {
            Ok(invite) => {
                callee.answer(&invite, 200, "OK", &sdp("alice", callee.addr().ip(), 50_000))?;
                let ok = caller.final_response(&mut call, WAIT)?;
                ensure!(ok.msg.status() == Some(200), "call got {}", ok.summary());
                caller.ack(&call)?;
                connected += 1;
                calls.push((caller, call));
            }
            Err(_) => {
                let resp = caller.final_response(&mut call, WAIT)?;
                ensure!(
                    resp.msg.status() == Some(403)
                        && resp.msg.reason() == Some("Too Many Concurrent Calls"),
                    "refused call got {}",
                    resp.summary()
                );
                ensure!(resp.msg.header("reason").is_some(), "403 without a Reason header");
                refused += 1;
            }
        }
    }
    ensure!((connected, refused) == (5, 5), "{connected} connected, {refused} refused");
    Ok(())
}

#[test]
fn billing_outage_rejects_new_calls_quickly_keeps_calls_up_and_delivers_their_stops_later()
-> Result<()> {
    let mut cluster = cluster()?;
    let (mut caller, mut callee) = prepaid_payer_and_alice(&cluster, "10.00")?;
    let (mut call, _) = answered(&mut caller, &cluster.main(), &mut callee)?;

    cluster.stop_billing()?;
    // A new call: 503 with Retry-After within the billing timeout (1 s) plus slack.
    let mut other = Phone::new("payer", "pw1")?;
    let asked = Instant::now();
    let mut refused =
        other.invite(&cluster.main(), "alice", &sdp("payer", other.addr().ip(), 40_002))?;
    let resp = other.final_response(&mut refused, WAIT)?;
    ensure!(resp.msg.status() == Some(503), "new call during the outage got {}", resp.summary());
    ensure!(resp.msg.header("retry-after").is_some(), "503 without Retry-After");
    ensure!(asked.elapsed() < Duration::from_secs(5), "503 took {:?}", asked.elapsed());

    // The call in progress goes on and hangs up normally.
    std::thread::sleep(Duration::from_millis(1000)); // call length: test data, not synchronisation
    let bye = caller.send_bye(&mut call)?;
    let relayed = callee.recv_request("BYE", WAIT)?;
    callee.respond(&relayed, 200, "OK", None)?;
    let resp = caller.final_response_to(&bye, WAIT)?;
    ensure!(resp.msg.status() == Some(200), "BYE during the outage got {}", resp.summary());

    // Billing back: the queued start and stop arrive and charge the call once.
    cluster.start_billing()?;
    let cdr = cluster.wait_for_cdr(Duration::from_secs(15), |c| {
        c.caller.starts_with("payer@") && c.answered_ms.is_some() && c.charge_micros.is_some()
    })?;
    let charge = cdr.charge_micros.unwrap_or_default() as i64;
    ensure!(charge >= 10_000, "charge {charge} for a call of over a second");
    ensure!(
        cluster.balance_micros("payer")? == 10_000_000 - charge,
        "balance not debited exactly once"
    );
    cluster.check_all_running()
}

#[test]
fn billing_outage_under_allow_policy_connects_a_registered_caller() -> Result<()> {
    let mut cluster = Cluster::start(ClusterOptions {
        processor_toml: "billing_outage = \"allow\"\nbilling_outage_max_duration_secs = 60\n"
            .into(),
        ..ClusterOptions::default()
    })?;
    cluster.add_account("bob", "pw1")?;
    cluster.add_account("alice", "pw2")?;
    let mut callee = registered(&cluster.alias2(), "alice", "pw2")?;
    let mut caller = registered(&cluster.main(), "bob", "pw1")?;
    cluster.stop_billing()?;
    let (mut call, _) = answered(&mut caller, &cluster.main(), &mut callee)?;
    let bye = caller.send_bye(&mut call)?;
    let relayed = callee.recv_request("BYE", WAIT)?;
    callee.respond(&relayed, 200, "OK", None)?;
    ensure!(caller.final_response_to(&bye, WAIT)?.msg.status() == Some(200));
    // A stranger (no registration from this address) is still refused.
    let mut stranger = Phone::new("bob", "pw1")?;
    let mut c =
        stranger.invite(&cluster.main(), "alice", &sdp("bob", stranger.addr().ip(), 40_004))?;
    let resp = stranger.final_response(&mut c, WAIT)?;
    ensure!(
        resp.msg.status() == Some(503),
        "unrecognised caller during the outage got {}",
        resp.summary()
    );
    Ok(())
}

#[test]
fn billing_health_says_serving_fails_while_billing_is_down_and_recovers() -> Result<()> {
    let mut cluster = cluster()?;
    let up = cluster.billing_cli(&["health"])?;
    ensure!(up.contains("serving"), "health while up: {up}");

    cluster.stop_billing()?;
    let down =
        cluster.billing_cli(&["health"]).expect_err("health must fail while billing is down");
    ensure!(format!("{down:#}").contains("is not healthy"), "health while down: {down:#}");

    cluster.start_billing()?;
    let again = cluster.billing_cli(&["health"])?;
    ensure!(again.contains("serving"), "health after the restart: {again}");
    cluster.check_all_running()
}

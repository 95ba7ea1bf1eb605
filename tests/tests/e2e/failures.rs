//! What must not work, and what must keep working when things go wrong: bad credentials,
//! unknown or absent callees, blocked accounts, a silent callee, processors dying, and junk on
//! the wire.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use sipalias_tests::cluster::{Cluster, ClusterOptions};
use sipalias_tests::phone::{Phone, sdp};
use sipmsg::SipMessage;

use super::{WAIT, assert_sent_from, cluster, complete_call, registered};

/// How long a phone listens to be sure something does not come.
const QUIET: Duration = Duration::from_millis(500);

fn is_status(status: u16) -> impl Fn(&SipMessage) -> bool {
    move |m| m.status() == Some(status)
}

fn is_request(method: &'static str) -> impl Fn(&SipMessage) -> bool {
    move |m| m.method() == Some(method)
}

#[test]
fn wrong_password_is_challenged_again_and_never_accepted() -> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    cluster.add_account("bob", "pw-b")?;
    let mut a = registered(&cluster.alias2(), "alice", "pw-a")?;

    let mut wrong = Phone::new("bob", "not-bobs-password")?;
    let ex = wrong.register(&cluster.main(), 300)?;
    ensure!(ex.challenge.is_some(), "first REGISTER was not challenged");
    ensure!(
        ex.status() == 401,
        "REGISTER with a wrong password answered {}",
        ex.response.summary()
    );
    ensure!(
        ex.response.msg.header("www-authenticate").is_some(),
        "second 401 carries no new challenge"
    );
    wrong.expect_none(QUIET, is_status(200))?;
    ensure!(cluster.redis_bindings("bob")?.is_empty(), "a binding was stored for a wrong password");

    let mut call =
        wrong.invite(&cluster.main(), "alice", &sdp("bob", wrong.addr().ip(), 40_000))?;
    ensure!(call.challenge.is_some(), "INVITE was not challenged");
    let resp = wrong.final_response(&mut call, WAIT)?;
    ensure!(
        resp.msg.status() == Some(407),
        "INVITE with a wrong password answered {}",
        resp.summary()
    );
    a.expect_none(QUIET, is_request("INVITE"))?;
    Ok(())
}

#[test]
fn call_to_unknown_user_gets_404() -> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("bob", "pw-b")?;
    let main = cluster.main();
    let mut b = registered(&main, "bob", "pw-b")?;
    let mut call = b.invite(&main, "nobody", &sdp("bob", b.addr().ip(), 40_000))?;
    let resp = b.final_response(&mut call, WAIT)?;
    ensure!(resp.msg.status() == Some(404), "got {}", resp.summary());
    ensure!(resp.from == main.addr, "404 came from {}", resp.from);
    Ok(())
}

#[test]
fn call_to_known_user_without_binding_gets_480() -> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("bob", "pw-b")?;
    cluster.add_account("carol", "pw-c")?;
    let main = cluster.main();
    let mut b = registered(&main, "bob", "pw-b")?;
    let mut call = b.invite(&main, "carol", &sdp("bob", b.addr().ip(), 40_000))?;
    let resp = b.final_response(&mut call, WAIT)?;
    ensure!(resp.msg.status() == Some(480), "got {}", resp.summary());
    Ok(())
}

#[test]
fn blocked_caller_gets_403_and_callee_never_rings() -> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    cluster.add_account("bob", "pw-b")?;
    let main = cluster.main();
    let mut a = registered(&cluster.alias2(), "alice", "pw-a")?;
    let mut b = registered(&main, "bob", "pw-b")?;
    cluster.block("bob")?;

    let mut call = b.invite(&main, "alice", &sdp("bob", b.addr().ip(), 40_000))?;
    let resp = b.final_response(&mut call, WAIT)?;
    ensure!(resp.msg.status() == Some(403), "got {}", resp.summary());
    a.expect_none(QUIET, is_request("INVITE"))?;
    Ok(())
}

#[test]
fn silent_callee_gets_invite_retransmitted_and_caller_gets_408() -> Result<()> {
    let cluster = Cluster::start(ClusterOptions { t1_ms: Some(50), ..ClusterOptions::default() })?;
    cluster.add_account("alice", "pw-a")?;
    cluster.add_account("bob", "pw-b")?;
    let alias = cluster.alias2();
    let main = cluster.main();
    let mut a = registered(&alias, "alice", "pw-a")?;
    let mut b = registered(&main, "bob", "pw-b")?;

    let mut call = b.invite(&main, "alice", &sdp("bob", b.addr().ip(), 40_000))?;
    let first = a.recv_request("INVITE", WAIT)?;
    assert_sent_from(&first, alias.addr)?;
    let branch = first.msg.top_via()?.branch().map(str::to_owned);
    let mut arrivals = vec![first.at];
    // Timer A doubles from T1 = 50 ms: 50, 100, 200 ms … — two more within a second.
    for _ in 0..2 {
        let again = a.recv_request("INVITE", WAIT)?;
        ensure!(again.from == alias.addr, "retransmission came from {}", again.from);
        ensure!(again.msg.call_id()? == first.msg.call_id()?, "a new call, not a retransmission");
        ensure!(
            again.msg.top_via()?.branch().map(str::to_owned) == branch,
            "retransmission with a new branch"
        );
        arrivals.push(again.at);
    }
    let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    ensure!(
        gaps.iter().all(|g| *g >= Duration::from_millis(40)),
        "retransmitted faster than T1: {gaps:?}"
    );

    // Timer B = 64·T1 = 3.2 s, then the caller is told.
    let resp = b.final_response(&mut call, WAIT)?;
    ensure!(resp.msg.status() == Some(408), "caller got {}", resp.summary());
    Ok(())
}

#[test]
fn call_reaches_phone_registered_before_a_processor_restart() -> Result<()> {
    let mut cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    cluster.add_account("bob", "pw-b")?;
    let alias = cluster.alias2();
    let main = cluster.main();
    let mut a = registered(&alias, "alice", "pw-a")?;
    cluster.restart_processor(1)?;
    let mut b = registered(&main, "bob", "pw-b")?;
    complete_call(&mut b, &main, &mut a, alias.addr)?;
    Ok(())
}

#[test]
fn registrations_survive_restart_of_every_processor() -> Result<()> {
    let mut cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    cluster.add_account("bob", "pw-b")?;
    let alias = cluster.alias2();
    let main = cluster.main();
    let mut a = registered(&alias, "alice", "pw-a")?;
    let mut b = registered(&main, "bob", "pw-b")?;
    cluster.kill_processor(1)?;
    cluster.kill_processor(2)?;
    ensure!(
        cluster.redis_bindings("alice")?.len() == 1,
        "alice's binding is gone with the processors"
    );
    cluster.start_processor(1)?;
    cluster.start_processor(2)?;
    complete_call(&mut b, &main, &mut a, alias.addr)?;
    Ok(())
}

#[test]
fn junk_datagrams_are_dropped_and_request_without_call_id_gets_400() -> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    cluster.add_account("bob", "pw-b")?;
    let alias = cluster.alias2();
    let main = cluster.main();
    let mut x = Phone::new("mallory", "-")?;

    let random: Vec<u8> = (0..512).map(|_| rand::random::<u8>()).collect();
    let truncated = {
        let mut inv = SipMessage::request("INVITE", "sip:alice@sip.example.net");
        inv.push_header("Via", x.via());
        inv.push_header("From", "<sip:mallory@sip.example.net>;tag=1");
        inv.push_header("To", "<sip:alice@sip.example.net>");
        inv.push_header("Call-ID", "truncated-1");
        inv.push_header("CSeq", "1 INVITE");
        let bytes = inv.to_bytes();
        let cut = String::from_utf8_lossy(&bytes).find("Call-ID").context("no Call-ID")? + 4;
        bytes[..cut].to_vec()
    };
    for target in [main.addr, alias.addr] {
        x.send_raw(&random, target)?;
        x.send_raw(b"hello", target)?;
        x.send_raw(&truncated, target)?;
    }

    let mut no_call_id = SipMessage::request("OPTIONS", "sip:sip.example.net");
    no_call_id.push_header("Via", x.via());
    no_call_id.push_header("Max-Forwards", "70");
    no_call_id.push_header("From", "<sip:mallory@sip.example.net>;tag=2");
    no_call_id.push_header("To", "<sip:sip.example.net>");
    no_call_id.push_header("CSeq", "1 OPTIONS");
    x.send(&no_call_id, alias.addr)?;
    let bad = x.recv_matching(WAIT, "the 400 to the OPTIONS", |m| {
        m.cseq().is_ok_and(|c| c.method == "OPTIONS")
    })?;
    ensure!(bad.msg.status() == Some(400), "got {} instead of a 400", bad.summary());
    ensure!(bad.from == alias.addr, "400 came from {}", bad.from);
    let reason = bad.msg.reason().unwrap_or_default();
    ensure!(
        reason.to_ascii_lowercase().contains("call-id"),
        "reason phrase {reason:?} does not name Call-ID"
    );
    // Nothing else: the junk before it was dropped, not answered.
    x.expect_none(QUIET, |_| true)?;

    cluster.check_all_running()?;
    let mut a = registered(&alias, "alice", "pw-a")?;
    let mut b = registered(&main, "bob", "pw-b")?;
    complete_call(&mut b, &main, &mut a, alias.addr)?;
    cluster.check_all_running()
}

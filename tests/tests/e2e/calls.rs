//! Calls through the B2BUA: the callee's leg leaves from the exact socket the callee
//! registered through, with that address's idea of the domain in From/To, and everything the
//! phones say to each other (SDP, reason phrases) crosses unchanged.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use sipalias_tests::cluster::{Cluster, DOMAIN};
use sipalias_tests::phone::{Phone, Server, sdp};

use super::{WAIT, assert_sent_from, cluster, complete_call, from_to_hosts, registered};

/// How long the answered call lasts before the caller hangs up: test data for the CDR.
const HOLD: Duration = Duration::from_secs(1);
/// How far the billed duration may be from the hold time the phones measured.
const DURATION_TOLERANCE_MS: u64 = 300;

/// A cluster with alice registered through the first alias and bob through the main IP:
/// (cluster, alias server, main server, alice's phone, bob's phone).
fn alice_on_alias_bob_on_main() -> Result<(Cluster, Server, Server, Phone, Phone)> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    cluster.add_account("bob", "pw-b")?;
    let alias = cluster.alias2();
    let main = cluster.main();
    let a = registered(&alias, "alice", "pw-a")?;
    let b = registered(&main, "bob", "pw-b")?;
    Ok((cluster, alias, main, a, b))
}

#[test]
fn call_to_alias_registered_phone_comes_from_alias_socket_and_is_billed() -> Result<()> {
    let (cluster, alias, main, mut a, mut b) = alice_on_alias_bob_on_main()?;

    let offer = sdp("bob", b.addr().ip(), 40_000);
    let mut call = b.invite(&main, "alice", &offer)?;
    let challenge = call.challenge.as_ref().context("INVITE was not challenged")?;
    ensure!(challenge.msg.status() == Some(407), "challenge was {}", challenge.summary());
    ensure!(challenge.from == main.addr, "407 came from {}", challenge.from);

    let invite = a.recv_request("INVITE", WAIT)?;
    assert_sent_from(&invite, alias.addr)?;
    let (from_host, to_host) = from_to_hosts(&invite.msg)?;
    ensure!(
        from_host == "127.0.0.2" && to_host == "127.0.0.2",
        "From/To hosts {from_host}/{to_host}"
    );
    ensure!(
        invite.msg.from()?.uri.user_name() == Some("bob"),
        "From user: {:?}",
        invite.msg.from()?
    );
    ensure!(invite.msg.to()?.uri.user_name() == Some("alice"), "To user: {:?}", invite.msg.to()?);
    ensure!(
        invite.msg.request_uri() == Some(a.contact_uri().as_str()),
        "Request-URI {:?}",
        invite.msg.request_uri()
    );
    ensure!(invite.msg.call_id()? != call.call_id, "the B-leg reuses the caller's Call-ID");
    ensure!(invite.msg.body.as_ref() == offer.as_bytes(), "offer SDP changed on the way");

    a.respond(&invite, 180, "Ringing", None)?;
    let ringing = b.next_response(&mut call, WAIT)?;
    ensure!(ringing.msg.status() == Some(180), "caller got {}", ringing.summary());
    ensure!(ringing.from == main.addr, "180 came from {}", ringing.from);

    let answer = sdp("alice", a.addr().ip(), 50_000);
    let a_call = a.answer(&invite, 200, "OK", &answer)?;
    let answered = Instant::now();
    let ok = b.final_response(&mut call, WAIT)?;
    ensure!(
        ok.msg.status() == Some(200) && ok.msg.reason() == Some("OK"),
        "caller got {}",
        ok.summary()
    );
    ensure!(ok.from == main.addr, "200 came from {}", ok.from);
    ensure!(ok.msg.body.as_ref() == answer.as_bytes(), "answer SDP changed on the way");

    b.ack(&call)?;
    let ack = a.recv_request("ACK", WAIT)?;
    ensure!(ack.from == alias.addr, "ACK came from {}", ack.from);
    ensure!(ack.msg.call_id()? == a_call.call_id, "ACK of another dialog: {}", ack.summary());

    // The call's length is the data the CDR is checked against, not a synchronisation.
    std::thread::sleep(HOLD);
    let hung_up = Instant::now();
    let bye = b.send_bye(&mut call)?;
    let relayed = a.recv_request("BYE", WAIT)?;
    ensure!(relayed.from == alias.addr, "BYE came from {}", relayed.from);
    ensure!(
        relayed.msg.call_id()? == a_call.call_id,
        "BYE of another dialog: {}",
        relayed.summary()
    );
    a.respond(&relayed, 200, "OK", None)?;
    let bye_ok = b.final_response_to(&bye, WAIT)?;
    ensure!(bye_ok.msg.status() == Some(200), "BYE answered {}", bye_ok.summary());
    ensure!(bye_ok.from == main.addr, "BYE's 200 came from {}", bye_ok.from);

    let held_ms = u64::try_from(hung_up.duration_since(answered).as_millis())?;
    let cdr = cluster.wait_for_cdr(WAIT, |c| {
        // The answer creates the record; wait for the stop, which completes it.
        c.caller.contains("bob") && c.callee.contains("alice") && c.duration_ms.is_some()
    })?;
    let billed = cdr.duration_ms.with_context(|| format!("CDR without duration: {cdr:?}"))?;
    ensure!(
        billed.abs_diff(held_ms) <= DURATION_TOLERANCE_MS,
        "billed {billed} ms for a call held {held_ms} ms: {cdr:?}"
    );
    ensure!(cdr.caller_ingress_ip == "127.0.0.1", "caller ingress: {cdr:?}");
    ensure!(cdr.callee_ingress_ip == "127.0.0.2", "callee ingress: {cdr:?}");
    ensure!(cdr.answered_ms.is_some() && cdr.ended_ms.is_some(), "timestamps: {cdr:?}");
    Ok(())
}

#[test]
fn call_to_main_registered_phone_comes_from_main_socket_with_domain_hosts() -> Result<()> {
    let (_cluster, alias, main, mut a, mut b) = alice_on_alias_bob_on_main()?;

    let mut call = a.invite(&alias, "bob", &sdp("alice", a.addr().ip(), 40_000))?;
    let invite = b.recv_request("INVITE", WAIT)?;
    assert_sent_from(&invite, main.addr)?;
    let (from_host, to_host) = from_to_hosts(&invite.msg)?;
    ensure!(from_host == DOMAIN && to_host == DOMAIN, "From/To hosts {from_host}/{to_host}");
    ensure!(invite.msg.from()?.uri.user_name() == Some("alice"), "From: {:?}", invite.msg.from()?);

    b.answer(&invite, 200, "OK", &sdp("bob", b.addr().ip(), 50_000))?;
    let ok = a.final_response(&mut call, WAIT)?;
    ensure!(ok.msg.status() == Some(200), "caller got {}", ok.summary());
    ensure!(
        ok.from == alias.addr,
        "the caller's 200 came from {}, not where it sent the INVITE",
        ok.from
    );
    a.ack(&call)?;
    let ack = b.recv_request("ACK", WAIT)?;
    ensure!(ack.from == main.addr, "ACK came from {}", ack.from);
    let bye = a.send_bye(&mut call)?;
    let relayed = b.recv_request("BYE", WAIT)?;
    ensure!(relayed.from == main.addr, "BYE came from {}", relayed.from);
    b.respond(&relayed, 200, "OK", None)?;
    let bye_ok = a.final_response_to(&bye, WAIT)?;
    ensure!(bye_ok.msg.status() == Some(200), "BYE answered {}", bye_ok.summary());
    Ok(())
}

#[test]
fn caller_cancel_after_ringing_cancels_callee_and_caller_gets_487() -> Result<()> {
    let (_cluster, alias, main, mut a, mut b) = alice_on_alias_bob_on_main()?;

    let mut call = b.invite(&main, "alice", &sdp("bob", b.addr().ip(), 40_000))?;
    let invite = a.recv_request("INVITE", WAIT)?;
    a.respond(&invite, 180, "Ringing", None)?;
    let ringing = b.next_response(&mut call, WAIT)?;
    ensure!(ringing.msg.status() == Some(180), "caller got {}", ringing.summary());

    let cancel = b.cancel(&call)?;
    let cancel_ok = b.final_response_to(&cancel, WAIT)?;
    ensure!(cancel_ok.msg.status() == Some(200), "CANCEL answered {}", cancel_ok.summary());

    let relayed = a.recv_request("CANCEL", WAIT)?;
    ensure!(relayed.from == alias.addr, "CANCEL came from {}", relayed.from);
    ensure!(relayed.msg.call_id()? == invite.msg.call_id()?, "CANCEL of another call");
    ensure!(
        relayed.msg.top_via()?.branch() == invite.msg.top_via()?.branch(),
        "CANCEL's branch differs from the INVITE's (RFC 3261 §9.1)"
    );
    a.respond(&relayed, 200, "OK", None)?;
    a.respond(&invite, 487, "Request Terminated", None)?;
    let ack = a.recv_request("ACK", WAIT)?;
    ensure!(ack.from == alias.addr, "ACK of the 487 came from {}", ack.from);

    let terminated = b.final_response(&mut call, WAIT)?;
    ensure!(terminated.msg.status() == Some(487), "caller got {}", terminated.summary());
    Ok(())
}

#[test]
fn busy_reason_phrase_reaches_caller_unchanged() -> Result<()> {
    let (_cluster, alias, main, mut a, mut b) = alice_on_alias_bob_on_main()?;

    let mut call = b.invite(&main, "alice", &sdp("bob", b.addr().ip(), 40_000))?;
    let invite = a.recv_request("INVITE", WAIT)?;
    a.respond(&invite, 486, "Busy Here Now", None)?;
    let ack = a.recv_request("ACK", WAIT)?;
    ensure!(ack.from == alias.addr, "ACK of the 486 came from {}", ack.from);
    let busy = b.final_response(&mut call, WAIT)?;
    ensure!(busy.msg.status() == Some(486), "caller got {}", busy.summary());
    ensure!(busy.msg.reason() == Some("Busy Here Now"), "reason phrase {:?}", busy.msg.reason());
    Ok(())
}

#[test]
fn two_bindings_both_ring_first_answer_wins_other_is_cancelled() -> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    cluster.add_account("bob", "pw-b")?;
    let alias2 = cluster.alias2();
    let alias3 = cluster.alias3();
    let main = cluster.main();
    // The same user on two phones, each through its own alias.
    let mut desk = registered(&alias2, "alice", "pw-a")?;
    let mut mobile = registered(&alias3, "alice", "pw-a")?;
    ensure!(cluster.redis_bindings("alice")?.len() == 2, "expected two bindings");
    let mut b = registered(&main, "bob", "pw-b")?;

    let mut call = b.invite(&main, "alice", &sdp("bob", b.addr().ip(), 40_000))?;
    let desk_invite = desk.recv_request("INVITE", WAIT)?;
    let mobile_invite = mobile.recv_request("INVITE", WAIT)?;
    assert_sent_from(&desk_invite, alias2.addr)?;
    assert_sent_from(&mobile_invite, alias3.addr)?;
    ensure!(from_to_hosts(&mobile_invite.msg)?.0 == "127.0.0.3", "mobile's From host");

    desk.respond(&desk_invite, 180, "Ringing", None)?;
    mobile.respond(&mobile_invite, 180, "Ringing", None)?;
    let answer = sdp("alice-mobile", mobile.addr().ip(), 50_000);
    mobile.answer(&mobile_invite, 200, "OK", &answer)?;

    let cancel = desk.recv_request("CANCEL", WAIT)?;
    ensure!(cancel.from == alias2.addr, "CANCEL came from {}", cancel.from);
    ensure!(cancel.msg.call_id()? == desk_invite.msg.call_id()?, "CANCEL of another call");
    desk.respond(&cancel, 200, "OK", None)?;
    desk.respond(&desk_invite, 487, "Request Terminated", None)?;
    desk.recv_request("ACK", WAIT)?;

    let ok = b.final_response(&mut call, WAIT)?;
    ensure!(ok.msg.status() == Some(200), "caller got {}", ok.summary());
    ensure!(ok.msg.body.as_ref() == answer.as_bytes(), "the caller did not get the winner's SDP");
    b.ack(&call)?;
    let ack = mobile.recv_request("ACK", WAIT)?;
    ensure!(ack.from == alias3.addr, "ACK came from {}", ack.from);
    Ok(())
}

/// RFC 4028 through the cluster: the session interval is negotiated end to end, and a call
/// whose refresher never refreshes (its BYE lost, say) is ended by the B2BUA one interval
/// after the answer, on both legs, and billed up to then.
#[test]
fn a_call_whose_session_is_not_refreshed_is_ended_on_both_legs() -> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-alice")?;
    cluster.add_account("bob", "pw-bob")?;
    let alias = cluster.alias2();
    let mut alice = registered(&alias, "alice", "pw-alice")?;
    let mut bob = Phone::new("bob", "pw-bob")?;
    // A short interval, so the test takes seconds; bob is the refresher and never refreshes.
    bob.set_invite_headers(&[("Supported", "timer"), ("Session-Expires", "2;refresher=uac")]);
    alice.set_answer_headers(&[("Require", "timer"), ("Session-Expires", "2;refresher=uac")]);
    let offer = sdp("bob", bob.addr().ip(), 40_000);
    let mut call = bob.invite(&cluster.main(), "alice", &offer)?;
    let invite = alice.recv_request("INVITE", WAIT)?;
    ensure!(
        invite.msg.header("session-expires") == Some("2;refresher=uac"),
        "{}",
        invite.summary()
    );
    ensure!(invite.msg.header("supported") == Some("timer"), "{}", invite.summary());
    alice.answer(&invite, 200, "OK", &sdp("alice", alice.addr().ip(), 50_000))?;
    let ok = bob.final_response(&mut call, WAIT)?;
    ensure!(ok.msg.status() == Some(200), "{}", ok.summary());
    ensure!(ok.msg.header("session-expires") == Some("2;refresher=uac"), "{}", ok.summary());
    ensure!(ok.msg.header("require") == Some("timer"), "{}", ok.summary());
    bob.ack(&call)?;
    alice.recv_request("ACK", WAIT)?;
    let answered = std::time::Instant::now();

    for phone in [&mut alice, &mut bob] {
        let bye = phone.recv_request("BYE", WAIT)?;
        let reason = bye.msg.header("reason").unwrap_or_default().to_owned();
        ensure!(reason.contains("Session timer expired"), "BYE without the reason: {reason}");
        phone.respond(&bye, 200, "OK", None)?;
    }
    let after = answered.elapsed();
    ensure!(after >= Duration::from_millis(1800), "ended after {after:?}, before the interval");
    let cdr =
        cluster.wait_for_cdr(WAIT, |c| c.caller.starts_with("bob@") && c.duration_ms.is_some())?;
    ensure!(cdr.cause == "session-expired", "{cdr:?}");
    ensure!(cdr.duration_ms.is_some_and(|d| (1_500..5_000).contains(&d)), "{cdr:?}");
    cluster.check_all_running()
}

/// IPv6: an old provider's server address that is an IPv6 one (here `::1`), two phones on
/// IPv6 registering and calling through it. Every URI the cluster builds carries the address
/// in brackets (RFC 3261 §25.1, RFC 5118).
#[test]
fn a_call_over_ipv6_loopback_through_an_ipv6_alias() -> Result<()> {
    let v6 = |port| std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
    let port = std::net::UdpSocket::bind(v6(0))?.local_addr()?.port();
    let cluster = Cluster::start(sipalias_tests::cluster::ClusterOptions {
        tls: false,
        alias3_toml: format!(
            "\n[[dispatcher.aliases]]\nip = \"::1\"\ndomain = \"{DOMAIN}\"\ntransports = [\"udp\"]\n\
             udp_port = {port}\n"
        ),
        ..sipalias_tests::cluster::ClusterOptions::default()
    })?;
    cluster.add_account("alice", "pw-alice")?;
    cluster.add_account("bob", "pw-bob")?;
    let server = Server {
        addr: v6(port),
        domain: "[::1]".to_owned(),
        transport: sipalias_tests::phone::Transport::Udp,
    };
    let mut alice = Phone::bind("alice", "pw-alice", v6(0))?;
    ensure!(alice.register(&server, 300)?.status() == 200, "alice over IPv6");
    let mut bob = Phone::bind("bob", "pw-bob", v6(0))?;
    ensure!(bob.register(&server, 300)?.status() == 200, "bob over IPv6");
    let invite = complete_call(&mut bob, &server, &mut alice, server.addr)?;
    ensure!(
        from_to_hosts(&invite.msg)? == ("[::1]".to_owned(), "[::1]".to_owned()),
        "{}",
        invite.summary()
    );
    let table = cluster.processor_cli(&["registrations", "--alias", "::1"])?;
    ensure!(table.contains(&format!("[::1]:{port}/udp")), "{table}");
    cluster.check_all_running()
}

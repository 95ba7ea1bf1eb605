//! Calls beyond the cluster: a phone behind an old provider's IP dials a national number the
//! old way; the cluster makes it E.164 with that IP's dialing plan, routes it by prefix to
//! two SIP trunks (sipp playing each), fails over from the first (503) to the second, and
//! bills the call by the number.

use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use sipalias_tests::cluster::{Cluster, ClusterOptions};
use sipalias_tests::phone::{Phone, next_loopback_ip, sdp};
use sipalias_tests::ports;
use sipalias_tests::sipp::{GLOBAL_TIMEOUT_SECS, Sipp, SippConfig, first_received, received};

use super::{WAIT, assert_sent_from, from_to_hosts, registered};

/// Longer than sipp's own `-timeout`, so sipp reports its failure before we kill it.
const SIPP_WAIT: Duration = Duration::from_secs(GLOBAL_TIMEOUT_SECS as u64 + 10);

fn trunk_addr() -> Result<SocketAddrV4> {
    let ip = next_loopback_ip();
    Ok(SocketAddrV4::new(ip, ports::free_udp_port(ip)?))
}

#[test]
fn a_national_number_goes_out_through_the_second_trunk_when_the_first_answers_503() -> Result<()> {
    let (down, up) = (trunk_addr()?, trunk_addr()?);
    let cluster = Cluster::start(ClusterOptions {
        processor_toml: format!(
            "[[processor.gateways]]\nname = \"down\"\naddress = \"{down}\"\n\
             [[processor.gateways]]\nname = \"up\"\naddress = \"{up}\"\n\
             [[processor.routes]]\nprefix = \"44\"\ngateway = \"down\"\npriority = 0\n\
             [[processor.routes]]\nprefix = \"44\"\ngateway = \"up\"\npriority = 1\n\
             [[processor.dialing_plans]]\nip = \"127.0.0.2\"\ncountry_code = \"44\"\n"
        ),
        ..ClusterOptions::default()
    })?;
    let dir = cluster.dir();
    let first = Sipp::spawn(dir, SippConfig::new("trunk-down", "uas_trunk_503.xml", down))?;
    let second = Sipp::spawn(dir, SippConfig::new("trunk-up", "uas_callee.xml", up))?;
    first.wait_listening(WAIT)?;
    second.wait_listening(WAIT)?;
    cluster.add_account("alice", "pw-alice")?;
    let alias = cluster.alias2();
    let mut alice = registered(&alias, "alice", "pw-alice")?;
    // Her public number: what the PSTN is shown.
    cluster.processor_cli(&[
        "did",
        "add",
        "--number",
        "+442079460005",
        "--aor",
        "alice@sip.example.net",
    ])?;

    // Dialled as the old provider's phones do: a national number with its trunk prefix.
    let offer = sdp("alice", alice.addr().ip(), 40_000);
    let mut call = alice.invite(&alias, "02079460000", &offer)?;
    let ok = alice.final_response(&mut call, WAIT)?;
    ensure!(ok.msg.status() == Some(200), "the call got {}", ok.summary());
    alice.ack(&call)?;
    let bye = alice.bye(&mut call, WAIT)?;
    ensure!(bye.msg.status() == Some(200), "BYE got {}", bye.summary());

    let failed = first.finish(SIPP_WAIT)?;
    ensure!(failed.status.success(), "the first trunk: {}", failed.errors);
    let invite = first_received(&failed.messages, "INVITE").context("no INVITE at the first")?;
    ensure!(
        invite.request_uri() == Some(format!("sip:+442079460000@{down}").as_str()),
        "{invite:?}"
    );
    let answered = second.finish(SIPP_WAIT)?;
    answered.assert_one_successful_call("the second trunk")?;
    let invite = first_received(&answered.messages, "INVITE").context("no INVITE at the second")?;
    ensure!(invite.request_uri() == Some(format!("sip:+442079460000@{up}").as_str()), "{invite:?}");
    // From the main IP (no local_ip), as alice's number at the main domain (asserted too),
    // To the number.
    let via = invite.header("via").context("Via")?;
    ensure!(via.contains(&format!("127.0.0.1:{}", cluster.sip_port())), "Via {via}");
    ensure!(invite.header("from").is_some_and(|f| f.contains("sip:+442079460005@sip.example.net")));
    let pai = invite.header("p-asserted-identity").context("no P-Asserted-Identity")?;
    ensure!(pai == "<sip:+442079460005@sip.example.net>", "P-Asserted-Identity {pai}");
    ensure!(invite.header("to").is_some_and(|t| t.contains("sip:+442079460000@")));

    // Billed by the number.
    let cdr = cluster
        .wait_for_cdr(WAIT, |c| c.caller.starts_with("alice@") && c.duration_ms.is_some())?;
    ensure!(cdr.callee == "+442079460000@sip.example.net", "{cdr:?}");

    // A number with no route, and an extension that is nobody: 404, nothing sent anywhere.
    let mut nobody = Phone::for_server("alice", "pw-alice", &alias)?;
    for dialed in ["0033142278186", "7777"] {
        let mut call = nobody.invite(&alias, dialed, &offer)?;
        let resp = nobody.final_response(&mut call, WAIT)?;
        ensure!(resp.msg.status() == Some(404), "{dialed} got {}", resp.summary());
    }
    cluster.check_all_running()
}

#[test]
fn a_did_called_from_its_trusted_trunk_rings_the_account_from_its_alias_socket() -> Result<()> {
    let carrier = SocketAddr::V4(trunk_addr()?);
    let cluster = Cluster::start(ClusterOptions {
        processor_toml: format!(
            "[[processor.gateways]]\nname = \"carrier\"\naddress = \"{carrier}\"\n\
             [[processor.dialing_plans]]\nip = \"127.0.0.1\"\ncountry_code = \"44\"\n"
        ),
        ..ClusterOptions::default()
    })?;
    cluster.add_account("alice", "pw-alice")?;
    let alias = cluster.alias2();
    let mut alice = registered(&alias, "alice", "pw-alice")?;
    let did = ["did", "add", "--number", "+442079460001", "--aor", "alice@sip.example.net"];
    ensure!(cluster.processor_cli(&did)?.contains("+442079460001"));
    // Hostile numbers and AORs are refused; the list shows the one DID.
    for (number, aor) in [
        ("02079460001", "a@b"),
        ("+44 20", "a@b"),
        ("+4420794600010000", "a@b"),
        ("+442079460002", "a b@c"),
        ("+442079460002", "x\r\nY"),
    ] {
        let bad = ["did", "add", "--number", number, "--aor", aor];
        ensure!(cluster.processor_cli(&bad).is_err(), "{number:?} {aor:?} accepted");
    }
    let list: serde_json::Value =
        serde_json::from_str(&cluster.processor_cli(&["did", "list", "--json"])?)?;
    ensure!(list.as_array().map(Vec::len) == Some(1), "{list}");
    ensure!(list[0]["aor"] == "alice@sip.example.net", "{list}");

    // The carrier sends the number nationally, to the main IP (dialing plan 44): no challenge,
    // and alice's phone rings from the alias socket it registered through, the caller's
    // number shown.
    let mut trunk = Phone::bind("+33142278186", "no-password", carrier)?;
    let offer = sdp("trunk", carrier.ip(), 40_000);
    let mut call = trunk.invite_unchallenged(&cluster.main(), "02079460001", &offer)?;
    let invite = alice.recv_request("INVITE", WAIT)?;
    assert_sent_from(&invite, alias.addr)?;
    let alias_ip = alias.addr.ip().to_string();
    ensure!(from_to_hosts(&invite.msg)? == (alias_ip.clone(), alias_ip), "{}", invite.summary());
    let from = invite.msg.from()?;
    ensure!(from.uri.user_name() == Some("+33142278186"), "From {from:?}");
    alice.answer(&invite, 200, "OK", &sdp("alice", alice.addr().ip(), 50_000))?;
    // Its first final answer is alice's: no challenge came before it.
    let ok = trunk.final_response(&mut call, WAIT)?;
    ensure!(ok.msg.status() == Some(200), "the trunk got {}", ok.summary());
    trunk.ack(&call)?;
    alice.recv_request("ACK", WAIT)?;
    let bye = trunk.send_bye(&mut call)?;
    let relayed = alice.recv_request("BYE", WAIT)?;
    alice.respond(&relayed, 200, "OK", None)?;
    ensure!(trunk.final_response_to(&bye, WAIT)?.msg.status() == Some(200));
    let cdr = cluster
        .wait_for_cdr(WAIT, |c| c.callee.starts_with("alice@") && c.duration_ms.is_some())?;
    ensure!(cdr.caller == "+33142278186@carrier" && cdr.charge_micros == Some(0), "{cdr:?}");

    // The same INVITE from anywhere else is challenged like any caller's, and an unknown
    // caller gets no further: alice's phone stays silent.
    let mut stranger = Phone::new("+33142278186", "no-password")?;
    let mut call = stranger.invite(&cluster.main(), "02079460001", &offer)?;
    ensure!(call.challenge.is_some(), "an untrusted address was not challenged");
    let refused = stranger.final_response(&mut call, WAIT)?;
    ensure!(refused.msg.status() != Some(200), "{}", refused.summary());
    alice.expect_none(Duration::from_millis(300), |m| m.method() == Some("INVITE"))?;

    // A subscriber dialling the DID reaches alice inside the cluster.
    cluster.add_account("bob", "pw-bob")?;
    let mut bob = Phone::new("bob", "pw-bob")?;
    let mut call = bob.invite(&cluster.main(), "+442079460001", &offer)?;
    let invite = alice.recv_request("INVITE", WAIT)?;
    assert_sent_from(&invite, alias.addr)?;
    alice.respond(&invite, 486, "Busy Here", None)?;
    ensure!(bob.final_response(&mut call, WAIT)?.msg.status() == Some(486));

    // A number of the carrier's that is no DID: 404.
    let mut call = trunk.invite_unchallenged(&cluster.main(), "02079460099", &offer)?;
    let resp = trunk.final_response(&mut call, WAIT)?;
    ensure!(resp.msg.status() == Some(404), "{}", resp.summary());
    cluster.check_all_running()
}

#[test]
fn a_trunk_that_challenges_is_answered_with_its_credentials() -> Result<()> {
    let carrier = trunk_addr()?;
    let cluster = Cluster::start(ClusterOptions {
        processor_toml: format!(
            "[[processor.gateways]]\nname = \"carrier\"\naddress = \"{carrier}\"\n\
             username = \"acct7\"\npassword = \"s3cret-Trunk\"\n\
             [[processor.routes]]\ngateway = \"carrier\"\n"
        ),
        ..ClusterOptions::default()
    })?;
    let trunk =
        Sipp::spawn(cluster.dir(), SippConfig::new("trunk-auth", "uas_trunk_auth.xml", carrier))?;
    trunk.wait_listening(WAIT)?;
    cluster.add_account("alice", "pw-alice")?;
    let mut alice = registered(&cluster.main(), "alice", "pw-alice")?;
    let offer = sdp("alice", alice.addr().ip(), 40_000);
    let mut call = alice.invite(&cluster.main(), "+15551234567", &offer)?;
    let ok = alice.final_response(&mut call, WAIT)?;
    ensure!(ok.msg.status() == Some(200), "the call got {}", ok.summary());
    alice.ack(&call)?;
    ensure!(alice.bye(&mut call, WAIT)?.msg.status() == Some(200));
    let outcome = trunk.finish(SIPP_WAIT)?;
    outcome.assert_one_successful_call("the trunk")?;
    let invites = received(&outcome.messages, "INVITE");
    ensure!(invites.len() == 2, "{} INVITEs at the trunk", invites.len());
    let header = invites[1].header("proxy-authorization").context("no Proxy-Authorization")?;
    let creds = sipmsg::digest::Credentials::parse(header)?;
    let (Some(qop), Some(nc), Some(cnonce)) = (&creds.qop, &creds.nc, &creds.cnonce) else {
        anyhow::bail!("no qop/nc/cnonce: {header}");
    };
    let ha1 = sipmsg::digest::ha1(
        sipmsg::digest::Algorithm::Md5,
        "acct7",
        "carrier.example",
        "s3cret-Trunk",
    );
    let input = sipmsg::digest::ResponseInput {
        method: "INVITE",
        uri: &creds.uri,
        nonce: "4f2a9c0e1b77",
        qop: Some(qop),
        nc,
        cnonce,
    };
    let expected = sipmsg::digest::response(sipmsg::digest::Algorithm::Md5, &ha1, &input);
    ensure!(sipmsg::digest::hex_eq(&creds.response, &expected), "wrong digest: {header}");
    ensure!(creds.uri == invites[1].request_uri().unwrap_or_default(), "{header}");
    // The password never reaches a log line.
    for p in 1..=2 {
        let lines = cluster.processor(p).context("processor")?.lines();
        ensure!(
            !lines.iter().any(|l| l.contains("s3cret-Trunk")),
            "p{p} logged the trunk password"
        );
    }
    cluster.check_all_running()
}

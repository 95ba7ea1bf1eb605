//! A real phone, not one of ours: baresip (Debian `baresip-core`) registers through an alias IP
//! and takes a call, over UDP, TCP and TLS, with the cluster on its defaults (in particular the
//! processor's default digest algorithms: baresip 1.0 cannot answer a 401 that also offers
//! SHA-256). The caller is a harness phone on the main IP; baresip answers automatically.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use sipalias_tests::baresip::{Baresip, BaresipConfig, Traced};
use sipalias_tests::cluster::Cluster;
use sipalias_tests::phone::{Server, Transport, sdp};

use super::{WAIT, cluster, from_to_hosts, registered};

/// How long baresip gets to register: start-up, the challenge and the second REGISTER. Longer
/// than [`WAIT`] because a lost first REGISTER over UDP is retransmitted after T1 and more.
const REGISTER_WAIT: Duration = Duration::from_secs(20);

/// baresip (user 1001) registers through the server `pick` names; 1002 calls it from the main
/// IP. Checks the registrar answered from that server socket and recorded it as the binding's
/// ingress, that every request of the call reached baresip from that socket over its
/// transport (over TCP/TLS on the connection it registered on) with the alias IP in From/To,
/// that baresip's own 200s (to the INVITE, auto-answered, and to the BYE) reach the caller.
fn baresip_takes_a_call_through(pick: impl Fn(&Cluster) -> Server) -> Result<()> {
    // Before the cluster starts: a missing package is the whole story.
    Baresip::check_installed()?;
    let cluster = cluster()?;
    cluster.add_account("1001", "pw1001")?;
    cluster.add_account("1002", "pw1002")?;
    let server = pick(&cluster);
    let ip = server.addr.ip();
    let mut config = BaresipConfig::new("1001", "pw1001", &server);
    if server.transport == Transport::Tls {
        let std::net::IpAddr::V4(v4) = ip else { anyhow::bail!("{ip} is not IPv4") };
        let cert = cluster.certificate(v4).with_context(|| format!("{ip} has no TLS"))?;
        config = config.cafile(&cert.cert);
    }
    // Declared after the cluster, so dropped (killed) before it.
    let phone = Baresip::start(config)?;

    // --- registration ------------------------------------------------------------------
    phone.wait_registered(REGISTER_WAIT).context(
        "baresip 1.0 gives up (`Function not implemented`) when the 401 offers any algorithm \
         besides MD5: is the processor's default digest_algorithms still [\"MD5\"]?",
    )?;
    let trace = phone.trace()?;
    let challenge = received_response_to(&trace, "REGISTER", 401)
        .context("baresip's REGISTER was not challenged")?;
    ensure!(challenge.src == server.addr, "401 came from {}", challenge.summary());
    let ok = received_response_to(&trace, "REGISTER", 200).context("no 200 to REGISTER")?;
    ensure!(ok.src == server.addr, "200 came from {}", ok.summary());
    ensure!(
        ok.transport == server.transport.via_token(),
        "registered over {}, not {}",
        ok.transport,
        server.transport
    );
    let binding = only_binding(&cluster, "1001")?;
    ensure!(binding["ingress"]["ip"] == ip.to_string(), "ingress ip: {binding}");
    ensure!(binding["ingress"]["port"] == u64::from(server.addr.port()), "ingress port: {binding}");
    ensure!(
        binding["ingress"]["transport"] == server.transport.to_string(),
        "ingress transport: {binding}"
    );
    ensure!(
        binding["user_agent"].as_str().is_some_and(|ua| ua.starts_with("baresip")),
        "user_agent: {binding}"
    );
    let contact = binding["contact"].as_str().context("binding without contact")?;
    let local = phone.contact_addr();
    ensure!(contact.contains(&local.to_string()), "contact {contact} is not baresip's {local}");

    // --- the call ------------------------------------------------------------------------
    let main = cluster.main();
    let mut caller = registered(&main, "1002", "pw1002")?;
    let offer = sdp("caller", caller.addr().ip(), 40_000);
    let mut call = caller.invite(&main, "1001", &offer)?;
    let answered = caller.final_response(&mut call, WAIT)?;
    ensure!(answered.msg.status() == Some(200), "caller got {}", answered.summary());
    ensure!(answered.from == main.addr, "200 came from {}", answered.from);
    ensure!(
        String::from_utf8_lossy(&answered.msg.body).contains("m=audio"),
        "baresip's answer has no audio stream:\n{}",
        String::from_utf8_lossy(&answered.msg.body)
    );
    let invite = phone.wait_received_request("INVITE", WAIT)?;
    assert_came_through(&invite, &server)?;
    // Over TCP/TLS: on the very connection baresip registered on (same two ends).
    ensure!(invite.dst == ok.dst, "{} but baresip registered from {}", invite.summary(), ok.dst);
    let (from_host, to_host) = from_to_hosts(&invite.msg)?;
    ensure!(
        from_host == ip.to_string() && to_host == ip.to_string(),
        "From/To hosts {from_host}/{to_host} in {}",
        invite.summary()
    );
    let sent_ok = phone.wait_sent_response("INVITE", 200, WAIT)?;
    ensure!(sent_ok.dst == server.addr, "baresip answered to {}", sent_ok.summary());

    caller.ack(&call)?;
    assert_came_through(&phone.wait_received_request("ACK", WAIT)?, &server)?;
    phone.wait_established(WAIT)?;

    let bye = caller.send_bye(&mut call)?;
    let done = caller.final_response_to(&bye, WAIT)?;
    ensure!(done.msg.status() == Some(200), "BYE got {}", done.summary());
    assert_came_through(&phone.wait_received_request("BYE", WAIT)?, &server)?;
    // The 200 the caller got is baresip's, not one the cluster made up.
    let bye_ok = phone.wait_sent_response("BYE", 200, WAIT)?;
    ensure!(bye_ok.dst == server.addr, "baresip answered the BYE to {}", bye_ok.summary());
    phone.wait_call_ended(WAIT)?;
    cluster.check_all_running()
}

/// Asserts a request baresip received came from the server socket, over its transport.
fn assert_came_through(req: &Traced, server: &Server) -> Result<()> {
    ensure!(
        req.src == server.addr && req.transport == server.transport.via_token(),
        "{} did not come from {server}",
        req.summary()
    );
    Ok(())
}

/// The method of a traced message's CSeq.
fn cseq_method(t: &Traced) -> Option<&str> {
    t.msg.header("cseq")?.split_whitespace().nth(1)
}

/// The first response with `status` to a `method` that baresip received.
fn received_response_to<'a>(trace: &'a [Traced], method: &str, status: u16) -> Option<&'a Traced> {
    trace
        .iter()
        .find(|t| !t.sent && t.msg.status() == Some(status) && cseq_method(t) == Some(method))
}

/// The only binding of `user` in Redis.
fn only_binding(cluster: &Cluster, user: &str) -> Result<Value> {
    let bindings = cluster.redis_bindings(user)?;
    ensure!(bindings.len() == 1, "expected one binding of {user}, Redis has {bindings:?}");
    bindings.into_values().next().context("no binding")
}

#[test]
fn baresip_registers_through_an_alias_and_takes_a_call_over_udp() -> Result<()> {
    baresip_takes_a_call_through(Cluster::alias2)
}

#[test]
fn baresip_registers_through_an_alias_and_takes_a_call_over_tcp() -> Result<()> {
    baresip_takes_a_call_through(Cluster::alias2_tcp)
}

/// The first alias has no TLS; the second, with a certificate of its own, has.
#[test]
fn baresip_registers_through_an_alias_and_takes_a_call_over_tls() -> Result<()> {
    baresip_takes_a_call_through(Cluster::alias3_tls)
}

//! The same flows driven by sipp, an independent SIP implementation: registration with digest
//! auth through an alias, and a challenged call from the main IP to that registered callee.

use std::net::SocketAddrV4;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use sipalias_tests::cluster::DOMAIN;
use sipalias_tests::phone::next_loopback_ip;
use sipalias_tests::ports;
use sipalias_tests::sipp::{GLOBAL_TIMEOUT_SECS, Sipp, SippConfig, first_received};

use super::{WAIT, cluster};

/// Longer than sipp's own `-timeout`, so sipp reports its failure before we kill it.
const SIPP_WAIT: Duration = Duration::from_secs(GLOBAL_TIMEOUT_SECS as u64 + 10);

fn local() -> Result<SocketAddrV4> {
    let ip = next_loopback_ip();
    Ok(SocketAddrV4::new(ip, ports::free_udp_port(ip)?))
}

#[test]
fn sipp_registers_through_alias_and_its_callee_is_called_from_alias_socket() -> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    cluster.add_account("bob", "pw-b")?;
    let dir = cluster.dir();
    let alias = cluster.alias2();
    let main = cluster.main();
    std::fs::write(
        dir.join("users.csv"),
        "SEQUENTIAL\nalice;pw-a;[authentication username=alice password=pw-a]\n",
    )?;
    std::fs::write(
        dir.join("calls.csv"),
        "SEQUENTIAL\nbob;alice;[authentication username=bob password=pw-b]\n",
    )?;

    // The callee phone first, so it is listening when its Contact is registered.
    let uas_addr = local()?;
    let uas = Sipp::spawn(dir, SippConfig::new("uas", "uas_callee.xml", uas_addr))?;
    uas.wait_listening(WAIT)?;

    let alias_ip = alias.addr.ip().to_string();
    let register = Sipp::spawn(
        dir,
        SippConfig::new("register", "register_auth.xml", local()?)
            .remote(alias.addr)
            .key("domain", alias_ip.clone())
            .key("contact_hostport", uas_addr.to_string())
            .key("expires", "300")
            // Digest uri = the Request-URI, as a phone computes it.
            .args(["-inf", "users.csv", "-auth_uri", &alias_ip]),
    )?
    .finish(SIPP_WAIT)?;
    register.assert_one_successful_call("register")?;
    ensure!(
        register.messages.contains("SIP/2.0 401"),
        "REGISTER was not challenged:\n{}",
        register.messages
    );
    let bindings = cluster.redis_bindings("alice")?;
    let binding = bindings.values().next().context("sipp's REGISTER left no binding")?;
    ensure!(binding["ingress"]["ip"] == alias_ip, "binding: {binding}");

    let caller = Sipp::spawn(
        dir,
        SippConfig::new("caller", "uac_call.xml", local()?)
            .remote(main.addr)
            .key("domain", DOMAIN)
            .args(["-inf", "calls.csv", "-d", "500", "-auth_uri", &format!("alice@{DOMAIN}")]),
    )?
    .finish(SIPP_WAIT)?;
    caller.assert_one_successful_call("caller")?;
    ensure!(
        caller.messages.contains("SIP/2.0 407"),
        "INVITE was not challenged:\n{}",
        caller.messages
    );

    let callee = uas.finish(SIPP_WAIT)?;
    callee.assert_one_successful_call("callee")?;
    let invite =
        first_received(&callee.messages, "INVITE").context("callee trace has no INVITE")?;
    let via = invite.top_via()?;
    ensure!(
        via.host == alias_ip && via.port == Some(alias.addr.port()),
        "INVITE top Via {via} is not the alias socket {}",
        alias.addr
    );
    let (from, to) = (invite.from()?.uri, invite.to()?.uri);
    ensure!(
        from.host == alias_ip && to.host == alias_ip,
        "From {from} / To {to} do not use the alias IP"
    );
    Ok(())
}

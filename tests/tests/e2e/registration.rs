//! REGISTER through each kind of local address: the binding in Redis remembers the exact
//! ingress socket, and the registrar answers from it with the realm that address's phones
//! expect.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use sipalias_tests::cluster::{ALIAS2_REALM, ALIAS3_REALM, Cluster, DOMAIN};
use sipalias_tests::phone::{Exchange, Phone, Server};

use super::cluster;

/// Registers `user` through `server` and checks the exchange: challenged with `realm` from
/// the server socket, then 200 from that socket listing the phone's Contact with an expiry.
fn register_checked(server: &Server, user: &str, realm: &str) -> Result<(Phone, Exchange)> {
    let mut phone = Phone::new(user, "pw-of-alice")?;
    let ex = phone.register(server, 300)?;
    let challenge = ex.challenge.as_ref().context("REGISTER was not challenged")?;
    ensure!(challenge.msg.status() == Some(401), "challenge was {}", challenge.summary());
    ensure!(challenge.from == server.addr, "401 came from {}, not {}", challenge.from, server.addr);
    let md5 = ex.md5_challenge().context("no MD5 challenge offered")?;
    ensure!(
        md5.realm == realm,
        "realm challenged through {server} is {:?}, expected {realm:?}",
        md5.realm
    );
    ensure!(md5.qop.iter().any(|q| q == "auth"), "qop=auth not offered: {:?}", md5.qop);
    ensure!(ex.status() == 200, "REGISTER answered {}", ex.response.summary());
    ensure!(
        ex.response.from == server.addr,
        "200 came from {}, not {}",
        ex.response.from,
        server.addr
    );
    let contacts = ex.response.msg.contacts()?;
    let ours = contacts
        .iter()
        .find(|c| c.uri.to_string() == phone.contact_uri())
        .with_context(|| format!("200 does not list {}: {contacts:?}", phone.contact_uri()))?;
    let expires: u32 = ours
        .param("expires")
        .and_then(|e| e.parse().ok())
        .or(ex.response.msg.expires())
        .context("200 gives no expiry for our Contact")?;
    ensure!((1..=300).contains(&expires), "expires {expires} not within what we asked");
    Ok((phone, ex))
}

/// The only binding of `user`, asserting there is exactly one and it is this phone's.
fn only_binding(cluster: &Cluster, user: &str, phone: &Phone) -> Result<Value> {
    let bindings = cluster.redis_bindings(user)?;
    ensure!(bindings.len() == 1, "expected one binding of {user}, Redis has {bindings:?}");
    let (field, b) = bindings.into_iter().next().context("no binding")?;
    ensure!(field.contains(&phone.contact_uri()), "binding field {field} is not our Contact");
    ensure!(
        b["contact"].as_str().is_some_and(|c| c.contains(&phone.contact_uri())),
        "contact: {b}"
    );
    Ok(b)
}

fn assert_ingress(b: &Value, socket: SocketAddr, phone: &Phone) -> Result<()> {
    let ingress = &b["ingress"];
    ensure!(ingress["ip"] == socket.ip().to_string(), "ingress ip: {b}");
    ensure!(ingress["port"] == u64::from(socket.port()), "ingress port: {b}");
    ensure!(ingress["transport"] == "udp", "ingress transport: {b}");
    ensure!(b["received"] == phone.addr().to_string(), "received: {b}");
    ensure!(b["user_agent"] == "sipalias-e2e-phone", "user_agent: {b}");
    let now_ms = u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis())?;
    let expires_at = b["expires_at_ms"].as_u64().context("expires_at_ms missing")?;
    ensure!(
        expires_at > now_ms && expires_at <= now_ms + 301_000,
        "expires_at_ms {expires_at} vs now {now_ms}"
    );
    Ok(())
}

#[test]
fn register_through_alias_records_alias_ingress_and_phone_address() -> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-of-alice")?;
    let server = cluster.alias2();
    let (phone, ex) = register_checked(&server, "alice", ALIAS2_REALM)?;
    let b = only_binding(&cluster, "alice", &phone)?;
    assert_ingress(&b, server.addr, &phone)?;
    ensure!(b["call_id"] == ex.response.msg.call_id()?, "call_id: {b}");
    ensure!(b["cseq"] == u64::from(ex.response.msg.cseq()?.seq), "cseq: {b}");
    ensure!(b["dispatcher"] == "d1", "dispatcher: {b}");
    Ok(())
}

#[test]
fn register_through_alias_extra_port_records_that_port() -> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-of-alice")?;
    let server = cluster.alias3_extra();
    assert_ne!(server.addr.port(), cluster.sip_port());
    let (phone, _) = register_checked(&server, "alice", ALIAS3_REALM)?;
    let b = only_binding(&cluster, "alice", &phone)?;
    assert_ingress(&b, server.addr, &phone)
}

#[test]
fn register_through_main_ip_is_challenged_with_the_domain_realm() -> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-of-alice")?;
    let server = cluster.main();
    let (phone, _) = register_checked(&server, "alice", DOMAIN)?;
    let b = only_binding(&cluster, "alice", &phone)?;
    assert_ingress(&b, server.addr, &phone)
}

/// Registering with expires 0 removes the binding (RFC 3261 §10.2.2).
#[test]
fn register_with_expires_zero_removes_the_binding() -> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-of-alice")?;
    let (mut phone, _) = register_checked(&cluster.alias2(), "alice", ALIAS2_REALM)?;
    let ex = phone.register(&cluster.alias2(), 0)?;
    ensure!(ex.status() == 200, "unREGISTER answered {}", ex.response.summary());
    let bindings = cluster.redis_bindings("alice")?;
    ensure!(bindings.is_empty(), "binding left after expires=0: {bindings:?}");
    Ok(())
}

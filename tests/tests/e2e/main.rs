//! End-to-end tests of sipalias: the real dispatcher, processors, billing and redis-server on
//! loopback, driven by SIP phones on their own loopback addresses and by sipp.
//!
//! Each test starts its own cluster (own redis, own ports) so tests are independent and can
//! run in parallel. The binaries must be built first: `cargo build --workspace --bins`.
//!
//! The main IP is 127.0.0.1 (domain `sip.example.net`), the aliases 127.0.0.2 and 127.0.0.3
//! (plus extra ports on .3), over UDP, TCP and TLS. The rule under test everywhere: a phone
//! sees the cluster only through the address it registered through — over TCP/TLS, through
//! the very connection it registered on.

mod aliases;
mod billing;
mod calls;
mod cluster;
mod failures;
mod hostile;
mod keepalive;
mod links;
mod operations;
mod phones;
mod registration;
mod sipp;
mod startup;
mod streams;
mod trunks;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, ensure};
use sipalias_tests::cluster::{Cluster, ClusterOptions};
use sipalias_tests::phone::{Incoming, Phone, Server, sdp};
use sipmsg::SipMessage;

/// Generous wait for anything the cluster should do promptly, for a busy 2-core machine.
const WAIT: Duration = Duration::from_secs(10);

/// A cluster with the default options (two processors, default timers).
fn cluster() -> Result<Cluster> {
    Cluster::start(ClusterOptions::default())
}

/// A phone for `user` registered through `server` (over its transport), asserting the 200.
fn registered(server: &Server, user: &str, password: &str) -> Result<Phone> {
    let mut phone = Phone::for_server(user, password, server)?;
    let ex = phone.register(server, 300)?;
    ensure!(
        ex.status() == 200,
        "{user} could not register through {server}: {}",
        ex.response.summary()
    );
    Ok(phone)
}

/// `host` and `port` of the top Via.
fn top_via_sent_by(m: &SipMessage) -> Result<(String, Option<u16>)> {
    let v = m.top_via()?;
    Ok((v.host, v.port))
}

/// Host of the From and To URIs.
fn from_to_hosts(m: &SipMessage) -> Result<(String, String)> {
    Ok((m.from()?.uri.host, m.to()?.uri.host))
}

/// Asserts an incoming request was sent from `socket` (over TCP/TLS: came on a connection to
/// `socket`) and names it as its own: top Via sent-by and Contact host:port.
fn assert_sent_from(req: &Incoming, socket: SocketAddr) -> Result<()> {
    ensure!(req.from == socket, "{} came from {}, expected {socket}", req.summary(), req.from);
    assert_names_socket(&req.msg, socket)
}

/// Asserts a request names `socket` as its own in the top Via sent-by and the Contact.
fn assert_names_socket(req: &SipMessage, socket: SocketAddr) -> Result<()> {
    let (host, port) = top_via_sent_by(req)?;
    let ours = sipmsg::uri::host_of(socket.ip());
    ensure!(
        host == ours && port == Some(socket.port()),
        "top Via sent-by is {host}:{port:?}, expected {socket}"
    );
    if let Some(contact) = req.contacts()?.first() {
        ensure!(
            contact.uri.host == ours && contact.uri.port == Some(socket.port()),
            "Contact {contact} does not name {socket}"
        );
    }
    Ok(())
}

/// `caller` calls `callee` through `caller_server`; the callee must receive the INVITE, ACK and
/// BYE from `callee_via`. The call is answered, ACKed and hung up by the caller. Returns the
/// callee's INVITE.
fn complete_call(
    caller: &mut Phone,
    caller_server: &Server,
    callee: &mut Phone,
    callee_via: SocketAddr,
) -> Result<Incoming> {
    let offer = sdp(caller.user(), caller.addr().ip(), 40_000);
    let mut call = caller.invite(caller_server, callee.user(), &offer)?;
    let invite = callee.recv_request("INVITE", WAIT)?;
    assert_sent_from(&invite, callee_via)?;
    let answer = sdp(callee.user(), callee.addr().ip(), 50_000);
    callee.answer(&invite, 200, "OK", &answer)?;
    let ok = caller.final_response(&mut call, WAIT)?;
    ensure!(ok.msg.status() == Some(200), "caller got {}", ok.summary());
    caller.ack(&call)?;
    let ack = callee.recv_request("ACK", WAIT)?;
    ensure!(ack.from == callee_via, "ACK came from {}", ack.from);
    let bye = caller.send_bye(&mut call)?;
    let relayed = callee.recv_request("BYE", WAIT)?;
    ensure!(relayed.from == callee_via, "BYE came from {}", relayed.from);
    callee.respond(&relayed, 200, "OK", None)?;
    let resp = caller.final_response_to(&bye, WAIT)?;
    ensure!(resp.msg.status() == Some(200), "BYE got {}", resp.summary());
    Ok(invite)
}

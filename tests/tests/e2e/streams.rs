//! SIP over TCP and TLS through the whole cluster: requests to a phone come over the very
//! connection it registered on, or — once that is gone — over a new one opened from the alias
//! IP; RFC 5626 flows fail with 430 instead; keepalives travel on the phone's own connection;
//! a UDP phone and a TLS phone can call each other; each IP presents its own certificate;
//! framing copes with any segmentation; bad stream input (oversized, trickled, not TLS, a
//! connection flood) is refused without harming anyone else.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use sipalias_tests::cluster::{ALIAS3_IP, Cluster, ClusterOptions, MAIN_IP};
use sipalias_tests::phone::{Connection, Phone, Server, sdp};
use sipalias_tests::wait;
use sipmsg::SipMessage;

use super::{WAIT, assert_names_socket, assert_sent_from, cluster, complete_call, registered};

/// How long a phone listens to be sure something does not come.
const QUIET: Duration = Duration::from_millis(500);

/// The connection `phone` registered on through `server`.
fn registration_connection(phone: &Phone, server: &Server) -> Result<Connection> {
    phone.connection_to(server.addr).with_context(|| format!("no open connection to {server}"))
}

/// A phone registered over the stream server `pick` names is called by a UDP phone via the
/// main IP. Everything the cluster sends it — INVITE, ACK, BYE — comes on the connection it
/// registered on, named as that alias socket, and the call completes with the SDP unchanged.
fn call_comes_on_the_registration_connection(pick: impl Fn(&Cluster) -> Server) -> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    cluster.add_account("bob", "pw-b")?;
    let server = pick(&cluster);
    let mut a = registered(&server, "alice", "pw-a")?;
    let reg = registration_connection(&a, &server)?;
    let main = cluster.main();
    let mut b = registered(&main, "bob", "pw-b")?;

    let offer = sdp("bob", b.addr().ip(), 40_000);
    let mut call = b.invite(&main, "alice", &offer)?;
    let invite = a.recv_request("INVITE", WAIT)?;
    ensure!(invite.conn == Some(reg), "{} but A registered on {reg}", invite.summary());
    assert_sent_from(&invite, server.addr)?;
    let via = invite.msg.top_via()?;
    ensure!(
        via.transport == server.transport.via_token(),
        "top Via transport {}, expected {}",
        via.transport,
        server.transport.via_token()
    );
    let ip = server.ip().to_string();
    ensure!(invite.msg.from()?.uri.host == ip, "From {:?}", invite.msg.from()?);
    ensure!(invite.msg.to()?.uri.host == ip, "To {:?}", invite.msg.to()?);
    ensure!(
        invite.msg.request_uri() == Some(a.contact_uri().as_str()),
        "Request-URI {:?}, A registered {}",
        invite.msg.request_uri(),
        a.contact_uri()
    );
    ensure!(invite.msg.body.as_ref() == offer.as_bytes(), "offer SDP changed on the way");

    let answer = sdp("alice", a.addr().ip(), 50_000);
    a.answer(&invite, 200, "OK", &answer)?;
    let ok = b.final_response(&mut call, WAIT)?;
    ensure!(ok.msg.status() == Some(200), "caller got {}", ok.summary());
    ensure!(ok.from == main.addr, "200 came from {}", ok.from);
    ensure!(ok.msg.body.as_ref() == answer.as_bytes(), "answer SDP changed on the way");

    b.ack(&call)?;
    let ack = a.recv_request("ACK", WAIT)?;
    ensure!(ack.conn == Some(reg), "{} but A registered on {reg}", ack.summary());
    let bye = b.send_bye(&mut call)?;
    let relayed = a.recv_request("BYE", WAIT)?;
    ensure!(relayed.conn == Some(reg), "{} but A registered on {reg}", relayed.summary());
    a.respond(&relayed, 200, "OK", None)?;
    let done = b.final_response_to(&bye, WAIT)?;
    ensure!(done.msg.status() == Some(200), "BYE got {}", done.summary());

    // One connection all along: the cluster opened none to A's listener, and A needed no
    // other (same local port, no second handshake).
    let conns = a.connections()?;
    ensure!(conns == vec![reg], "A's connections: {conns:?}");
    cluster.check_all_running()
}

#[test]
fn tls_call_to_phone_registered_on_alias_extra_tls_port_comes_on_its_registration_connection()
-> Result<()> {
    call_comes_on_the_registration_connection(Cluster::alias3_extra_tls)
}

#[test]
fn tcp_call_to_phone_registered_on_alias_tcp_port_comes_on_its_registration_connection()
-> Result<()> {
    call_comes_on_the_registration_connection(Cluster::alias2_tcp)
}

/// A phone registered over the stream server `pick` names closes its connection; a call to it
/// comes on a new connection the cluster opens to its Contact from the alias IP, and the whole
/// call (INVITE, ACK, BYE) uses that one connection.
fn call_comes_on_a_new_connection_from_the_alias_ip(
    pick: impl Fn(&Cluster) -> Server,
) -> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    cluster.add_account("bob", "pw-b")?;
    let server = pick(&cluster);
    let mut a = registered(&server, "alice", "pw-a")?;
    let reg = registration_connection(&a, &server)?;
    a.close_connection(reg.id, WAIT)?;
    let main = cluster.main();
    let mut b = registered(&main, "bob", "pw-b")?;

    let offer = sdp("bob", b.addr().ip(), 40_000);
    let mut call = b.invite(&main, "alice", &offer)?;
    let conn = a.wait_accepted(WAIT)?;
    ensure!(conn.peer.ip() == server.ip(), "{conn} was not opened from the alias IP");
    ensure!(conn.local == a.addr(), "{conn} is not to A's Contact {}", a.addr());
    let invite = a.recv_request("INVITE", WAIT)?;
    ensure!(invite.conn == Some(conn), "{} but the cluster opened {conn}", invite.summary());
    // Named as the alias's listening socket, whatever port the connection left from.
    assert_names_socket(&invite.msg, server.addr)?;
    let via = invite.msg.top_via()?;
    ensure!(via.transport == server.transport.via_token(), "top Via {via:?}");
    ensure!(invite.msg.to()?.uri.host == server.ip().to_string(), "To {:?}", invite.msg.to()?);

    let answer = sdp("alice", a.addr().ip(), 50_000);
    a.answer(&invite, 200, "OK", &answer)?;
    let ok = b.final_response(&mut call, WAIT)?;
    ensure!(ok.msg.status() == Some(200), "caller got {}", ok.summary());
    ensure!(ok.msg.body.as_ref() == answer.as_bytes(), "answer SDP changed on the way");
    b.ack(&call)?;
    let ack = a.recv_request("ACK", WAIT)?;
    ensure!(ack.conn == Some(conn), "{} but the call is on {conn}", ack.summary());
    let bye = b.send_bye(&mut call)?;
    let relayed = a.recv_request("BYE", WAIT)?;
    ensure!(relayed.conn == Some(conn), "{} but the call is on {conn}", relayed.summary());
    a.respond(&relayed, 200, "OK", None)?;
    let done = b.final_response_to(&bye, WAIT)?;
    ensure!(done.msg.status() == Some(200), "BYE got {}", done.summary());

    let conns = a.connections()?;
    ensure!(conns == vec![reg, conn], "one new connection for the whole call: {conns:?}");
    cluster.check_all_running()
}

#[test]
fn call_to_tcp_phone_whose_connection_closed_comes_on_a_new_connection_from_the_alias_ip()
-> Result<()> {
    call_comes_on_a_new_connection_from_the_alias_ip(Cluster::alias2_tcp)
}

#[test]
fn call_to_tls_phone_whose_connection_closed_comes_on_a_new_connection_from_the_alias_ip()
-> Result<()> {
    call_comes_on_a_new_connection_from_the_alias_ip(Cluster::alias3_extra_tls)
}

#[test]
fn udp_caller_calls_tls_callee_and_tls_caller_calls_udp_callee() -> Result<()> {
    let cluster = cluster()?;
    for user in ["alice", "bob", "carol", "dave"] {
        cluster.add_account(user, "pw")?;
    }
    let main = cluster.main();
    let alias3_tls = cluster.alias3_tls();
    let mut alice = registered(&alias3_tls, "alice", "pw")?;
    let mut bob = registered(&main, "bob", "pw")?;
    let invite = complete_call(&mut bob, &main, &mut alice, alias3_tls.addr)?;
    let reg = registration_connection(&alice, &alias3_tls)?;
    ensure!(invite.conn == Some(reg), "{} but alice registered on {reg}", invite.summary());
    ensure!(invite.msg.top_via()?.transport == "TLS", "top Via {:?}", invite.msg.top_via()?);

    let main_tls = cluster.main_tls();
    let alias2 = cluster.alias2();
    let mut carol = registered(&main_tls, "carol", "pw")?;
    let mut dave = registered(&alias2, "dave", "pw")?;
    let invite = complete_call(&mut carol, &main_tls, &mut dave, alias2.addr)?;
    ensure!(invite.conn.is_none() && invite.msg.top_via()?.transport == "UDP");
    // The TLS caller's whole call went over the one connection it registered on.
    let conns = carol.connections()?;
    ensure!(conns.len() == 1 && !conns[0].accepted, "carol's connections: {conns:?}");
    cluster.check_all_running()
}

/// With a 1 s keepalive interval, a phone registered over the stream server `pick` names gets
/// CRLFCRLF pings on the connection it registered on, once per interval, and its CRLF pongs
/// leave the connection usable.
fn phone_gets_crlf_pings_on_its_own_connection(pick: impl Fn(&Cluster) -> Server) -> Result<()> {
    let cluster =
        Cluster::start(ClusterOptions { keepalive_interval_secs: 1, ..ClusterOptions::default() })?;
    cluster.add_account("alice", "pw-a")?;
    let server = pick(&cluster);
    let mut a = registered(&server, "alice", "pw-a")?;
    let reg = registration_connection(&a, &server)?;

    let watch = Duration::from_millis(2500);
    let until = Instant::now() + watch;
    let mut pings = Vec::new();
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        let Ok(k) = a.recv_keepalive(left) else { break };
        ensure!(k.conn == reg, "keepalive on {}, A registered on {reg}", k.conn);
        if !k.is_ping() {
            // A lone CRLF. The dispatcher holds a lone CRLF for 1 s in case it is half a
            // ping split across segments, so two of our pongs a 1 s interval apart can be
            // taken for one ping and answered. Harmless to a phone (RFC 3261 §7.5 has it
            // ignore CRLFs between messages), so not counted.
            ensure!(k.crlf == 2, "{} CR/LF bytes in a row", k.crlf);
            continue;
        }
        pings.push(k.at);
        // The pong of RFC 5626 §4.4.1.
        a.send_raw_on(reg.id, b"\r\n")?;
    }
    ensure!(pings.len() >= 2, "{} pings in {watch:?} at a 1 s interval", pings.len());
    ensure!(pings.len() <= 3, "{} pings in {watch:?}: more than one per interval", pings.len());

    // The pongs left the connection usable: a refresh on it is answered on it.
    let ex = a.register(&server, 300)?;
    ensure!(ex.status() == 200, "refresh got {}", ex.response.summary());
    ensure!(ex.response.conn == Some(reg), "refresh answered {}", ex.response.summary());
    ensure!(a.connections()? == vec![reg], "A's connections: {:?}", a.connections()?);
    cluster.check_all_running()
}

#[test]
fn tcp_registered_phone_gets_crlf_pings_on_its_own_connection_and_may_answer_them() -> Result<()> {
    phone_gets_crlf_pings_on_its_own_connection(Cluster::alias2_tcp)
}

#[test]
fn tls_registered_phone_gets_crlf_pings_on_its_own_connection_and_may_answer_them() -> Result<()> {
    phone_gets_crlf_pings_on_its_own_connection(Cluster::alias3_tls)
}

#[test]
fn oversized_message_and_tls_garbage_are_refused_and_a_tcp_call_still_works() -> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    cluster.add_account("bob", "pw-b")?;
    let server = cluster.alias2_tcp();

    // A head announcing a 10 MB body is refused from the head, on its connection, which is
    // then closed.
    let mut mallory = Phone::for_server("mallory", "-", &server)?;
    let big = mallory.connect(server.addr)?;
    let head = format!(
        "OPTIONS sip:{ip} SIP/2.0\r\nVia: {via}\r\nMax-Forwards: 70\r\n\
         From: <sip:mallory@{ip}>;tag=m1\r\nTo: <sip:{ip}>\r\nCall-ID: huge-1\r\n\
         CSeq: 1 OPTIONS\r\nContent-Type: text/plain\r\nContent-Length: 10000000\r\n\r\n",
        ip = server.ip(),
        via = mallory.via(),
    );
    mallory.send_raw_on(big.id, &[head.as_bytes(), &[b'x'; 1024]].concat())?;
    let refused = mallory.recv_matching(WAIT, "a 513 or 400", |m| {
        matches!(m.status(), Some(513 | 400)) && m.call_id().ok() == Some("huge-1")
    })?;
    ensure!(refused.conn == Some(big), "{} not on {big}", refused.summary());
    let how = mallory.wait_closed(big.id, WAIT)?;
    ensure!(how.starts_with("closed by peer"), "{big}: {how}");

    // Plain SIP instead of a TLS handshake: closed, and nothing SIP comes back.
    let tls = cluster.alias3_tls();
    let junk = mallory.connect(tls.addr)?;
    let plain = format!(
        "OPTIONS sip:{ip} SIP/2.0\r\nVia: {via}\r\nFrom: <sip:mallory@{ip}>;tag=m2\r\n\
         To: <sip:{ip}>\r\nCall-ID: plain-on-tls\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        ip = tls.ip(),
        via = mallory.via(),
    );
    mallory.send_raw_on(junk.id, plain.as_bytes())?;
    mallory.wait_closed(junk.id, WAIT)?;
    let answered: Vec<String> = mallory
        .discard_pending()
        .iter()
        .filter(|m| m.conn == Some(junk))
        .map(|m| m.summary())
        .collect();
    ensure!(answered.is_empty(), "the TLS port answered plain SIP: {answered:?}");

    // Everyone else is unaffected: a TCP phone registers and is called.
    let mut a = registered(&server, "alice", "pw-a")?;
    let main = cluster.main();
    let mut b = registered(&main, "bob", "pw-b")?;
    let invite = complete_call(&mut b, &main, &mut a, server.addr)?;
    let reg = registration_connection(&a, &server)?;
    ensure!(invite.conn == Some(reg), "{} but A registered on {reg}", invite.summary());
    cluster.check_all_running()
}

#[test]
fn rfc5626_flow_gone_caller_gets_430_and_no_connection_is_opened_to_the_phone() -> Result<()> {
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    cluster.add_account("bob", "pw-b")?;
    let server = cluster.alias2_tcp();
    let mut a = Phone::for_server("alice", "pw-a", &server)?;
    let instance = "urn:uuid:00000000-0000-1000-8000-00a0c91e6bf6";
    a.set_outbound(&format!("<{instance}>"), 1);
    let ex = a.register(&server, 300)?;
    ensure!(ex.status() == 200, "outbound REGISTER got {}", ex.response.summary());
    let bindings = cluster.redis_bindings("alice")?;
    let binding = bindings.values().next().context("no binding")?;
    ensure!(
        binding["reg_id"] == 1 && binding["instance"] == format!("<{instance}>"),
        "the binding does not record the flow: {binding}"
    );
    let reg = registration_connection(&a, &server)?;
    a.close_connection(reg.id, WAIT)?;

    let main = cluster.main();
    let mut b = registered(&main, "bob", "pw-b")?;
    let mut call = b.invite(&main, "alice", &sdp("bob", b.addr().ip(), 40_000))?;
    let resp = b.final_response(&mut call, WAIT)?;
    ensure!(resp.msg.status() == Some(430), "caller got {}, expected 430", resp.summary());
    ensure!(resp.from == main.addr, "430 came from {}", resp.from);
    a.expect_no_connection(QUIET)?;
    a.expect_none(QUIET, |_| true)?;
    cluster.check_all_running()
}

#[test]
fn rfc5626_registration_is_answered_with_require_outbound() -> Result<()> {
    // RFC 5626 §6: a registrar that accepts a registration with reg-id and +sip.instance from
    // a UA that supports outbound says so with `Require: outbound` in its 2xx; that is how the
    // phone learns its flow is honoured (§4.2.1), and what it keeps the flow alive for.
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    let server = cluster.alias2_tcp();
    let mut a = Phone::for_server("alice", "pw-a", &server)?;
    a.set_outbound("<urn:uuid:00000000-0000-1000-8000-00a0c91e6bf6>", 1);
    let ex = a.register(&server, 300)?;
    ensure!(ex.status() == 200, "outbound REGISTER got {}", ex.response.summary());
    let require = ex.response.msg.header_list("require");
    ensure!(
        require.iter().any(|t| t.eq_ignore_ascii_case("outbound")),
        "the 200 to an outbound REGISTER has no `Require: outbound` (Require: {require:?})"
    );
    cluster.check_all_running()
}

#[test]
fn tls_clients_get_the_certificate_of_the_ip_they_connect_to() -> Result<()> {
    let cluster = cluster()?;
    let main = cluster.certificate(MAIN_IP).context("127.0.0.1 has no certificate")?;
    let alias3 = cluster.certificate(ALIAS3_IP).context("127.0.0.3 has no certificate")?;
    ensure!(main.der != alias3.der, "the two IPs were given the same certificate");
    for (server, expected) in [
        (cluster.main_tls(), main),
        (cluster.alias3_tls(), alias3),
        (cluster.alias3_extra_tls(), alias3),
    ] {
        let mut probe = Phone::for_server("probe", "-", &server)?;
        let conn = probe.connect(server.addr)?;
        ensure!(
            probe.peer_certificate(conn.id).as_deref() == Some(expected.der.as_slice()),
            "{server} presented another certificate than {}",
            expected.cert.display()
        );
    }
    cluster.check_all_running()
}

/// An OPTIONS from `phone` to `server`'s domain, as bytes, with `call_id`.
fn options(phone: &Phone, server: &Server, call_id: &str) -> Vec<u8> {
    let mut m = SipMessage::request("OPTIONS", format!("sip:{}", server.domain));
    m.push_header("Via", phone.via());
    m.push_header("Max-Forwards", "70");
    m.push_header("From", format!("<sip:{}@{}>;tag=o1", phone.user(), server.domain));
    m.push_header("To", format!("<sip:{}>", server.domain));
    m.push_header("Call-ID", call_id);
    m.push_header("CSeq", "1 OPTIONS");
    m.to_bytes()
}

/// The 200 to the OPTIONS with `call_id`, which must come on `conn`.
fn options_answered(phone: &mut Phone, call_id: &str, conn: Connection) -> Result<()> {
    let ok = phone.recv_matching(WAIT, &format!("a 200 to OPTIONS {call_id}"), |m| {
        m.status() == Some(200) && m.call_id().ok() == Some(call_id)
    })?;
    ensure!(ok.conn == Some(conn), "{} not on {conn}", ok.summary());
    Ok(())
}

#[test]
fn tcp_message_split_into_many_segments_and_two_messages_in_one_segment_are_all_answered()
-> Result<()> {
    let cluster = cluster()?;
    let server = cluster.alias2_tcp();
    let mut p = Phone::for_server("probe", "-", &server)?;
    let conn = p.connect(server.addr)?;
    // One message in 8-byte writes, each flushed on its own (no delay: one segment each).
    for chunk in options(&p, &server, "split").chunks(8) {
        p.send_raw_on(conn.id, chunk)?;
    }
    options_answered(&mut p, "split", conn)?;
    // Two messages in one write.
    let two = [options(&p, &server, "first"), options(&p, &server, "second")].concat();
    p.send_raw_on(conn.id, &two)?;
    options_answered(&mut p, "first", conn)?;
    options_answered(&mut p, "second", conn)?;
    ensure!(p.is_open(conn.id)?, "{conn} was closed");
    cluster.check_all_running()
}

#[test]
fn tcp_sender_trickling_a_message_is_cut_off_after_the_message_timeout_and_calls_still_work()
-> Result<()> {
    const MESSAGE_TIMEOUT: Duration = Duration::from_secs(2);
    /// One byte per this long: the trickle rate is test data, and waiting for the close is
    /// the pause between two bytes.
    const BYTE_GAP: Duration = Duration::from_millis(250);
    let cluster = Cluster::start(ClusterOptions {
        dispatcher_toml: format!("tcp_message_timeout_secs = {}", MESSAGE_TIMEOUT.as_secs()),
        ..ClusterOptions::default()
    })?;
    cluster.add_account("alice", "pw-a")?;
    cluster.add_account("bob", "pw-b")?;
    let server = cluster.alias2_tcp();
    let mut slow = Phone::for_server("slow", "-", &server)?;
    let conn = slow.connect(server.addr)?;
    let msg = options(&slow, &server, "trickled");
    let start = Instant::now();
    let mut sent = 0;
    loop {
        ensure!(sent < msg.len(), "the whole message trickled in and {conn} is still open");
        // Once the cluster has closed the connection a write may fail: that is the close.
        if slow.send_raw_on(conn.id, &msg[sent..=sent]).is_err() {
            slow.wait_closed(conn.id, WAIT)?;
            break;
        }
        sent += 1;
        if slow.wait_closed(conn.id, BYTE_GAP).is_ok() {
            break;
        }
    }
    let took = start.elapsed();
    ensure!(
        took >= MESSAGE_TIMEOUT - BYTE_GAP && took < MESSAGE_TIMEOUT + WAIT / 2,
        "closed {took:?} after the first byte, with a {MESSAGE_TIMEOUT:?} message timeout"
    );
    let answered: Vec<String> = slow.discard_pending().iter().map(|m| m.summary()).collect();
    ensure!(answered.is_empty(), "the half message was answered: {answered:?}");

    let mut a = registered(&server, "alice", "pw-a")?;
    let main = cluster.main();
    let mut b = registered(&main, "bob", "pw-b")?;
    complete_call(&mut b, &main, &mut a, server.addr)?;
    cluster.check_all_running()
}

#[test]
fn thousand_connections_from_one_ip_keep_only_the_per_ip_limit_and_calls_still_work() -> Result<()>
{
    /// The dispatcher's default `max_connections_per_ip`.
    const PER_IP: usize = 100;
    const CONNECTIONS: usize = 1000;
    let cluster = cluster()?;
    cluster.add_account("alice", "pw-a")?;
    cluster.add_account("bob", "pw-b")?;
    let server = cluster.alias2_tcp();
    let mut flood = Phone::for_server("flood", "-", &server)?;
    let mut reset_at_once = 0;
    for _ in 0..CONNECTIONS {
        // A connection over the limit is reset as soon as it is accepted, sometimes before
        // the phone is done setting it up.
        if flood.connect(server.addr).is_err() {
            reset_at_once += 1;
        }
    }
    ensure!(reset_at_once <= CONNECTIONS - PER_IP, "{reset_at_once} connections failed");
    let open = wait::until("the connections over the limit to be closed", WAIT, || {
        let mut open = Vec::new();
        for c in flood.connections()? {
            if flood.is_open(c.id)? {
                open.push(c);
            }
        }
        Ok((open.len() <= PER_IP).then_some(open))
    })?;
    ensure!(open.len() == PER_IP, "{} connections kept, limit {PER_IP}", open.len());
    // Those kept are served.
    let kept = open[0];
    flood.send_raw_on(kept.id, &options(&flood, &server, "kept"))?;
    options_answered(&mut flood, "kept", kept)?;

    // Other phones are not affected.
    let mut a = registered(&server, "alice", "pw-a")?;
    let main = cluster.main();
    let mut b = registered(&main, "bob", "pw-b")?;
    complete_call(&mut b, &main, &mut a, server.addr)?;
    cluster.check_all_running()
}

//! UDP: routing, sends from the named socket, 503, the edge link itself.

use anyhow::{Context as _, Result, bail, ensure};
use sipalias_dispatcher::route;
use sipalias_proto::edge::dispatcher_message::Kind as DKind;
use sipalias_proto::edge::processor_message::Kind as PKind;
use sipalias_proto::edge::{Heartbeat, Hello, ProcessorMessage, Transport};
use sipmsg::scan::{make_branch, make_contact_user};
use std::time::Duration;
use tokio::time::timeout;

use crate::harness::*;

#[tokio::test]
async fn welcome_lists_every_socket_with_alias_domain_and_realm() -> Result<()> {
    let d = Dispatcher::start().await?;
    let fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    assert_eq!(fp.welcome.dispatcher_id, "d-test");
    let table: Vec<_> = fp
        .welcome
        .sockets
        .iter()
        .map(|s| {
            (s.ip.as_str(), s.port, s.transport(), s.alias, s.domain.as_str(), s.realm.as_str())
        })
        .collect();
    assert_eq!(
        table,
        vec![
            (
                "127.0.0.1",
                u32::from(d.main.port()),
                Transport::Udp,
                false,
                "sip.example.net",
                "sip.example.net"
            ),
            (
                "127.0.0.2",
                u32::from(d.alias.port()),
                Transport::Udp,
                true,
                "sip.example.net",
                ALIAS_REALM
            ),
        ]
    );
    d.shutdown().await
}

#[tokio::test]
async fn request_to_the_alias_arrives_with_its_ingress() -> Result<()> {
    let d = Dispatcher::start().await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    let phone = Phone::new().await?;
    let options = request("OPTIONS", "sip:127.0.0.2", "opt-1");
    phone.send(d.alias, options.as_bytes()).await?;

    let inbound = fp.next_inbound().await?;
    assert_eq!(inbound.message, options.as_bytes(), "forwarded exactly as received");
    let ingress = inbound.ingress.context("ingress missing")?;
    assert_eq!(
        (ingress.local_ip.as_str(), ingress.local_port),
        ("127.0.0.2", u32::from(d.alias.port()))
    );
    assert_eq!(ingress.transport(), Transport::Udp);
    let phone_addr = phone.addr()?;
    assert_eq!(ingress.remote_ip, phone_addr.ip().to_string());
    assert_eq!(ingress.remote_port, u32::from(phone_addr.port()));
    assert_eq!(ingress.connection_id, 0);
    assert_eq!(ingress.dispatcher_id, "d-test");
    assert!(ingress.received_at_ms > 1_600_000_000_000, "unix ms: {}", ingress.received_at_ms);
    d.shutdown().await
}

#[tokio::test]
async fn send_leaves_from_the_socket_it_names() -> Result<()> {
    let d = Dispatcher::start().await?;
    let fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    let phone = Phone::new().await?;
    let to_phone = request("INVITE", "sip:alice@127.0.0.1", "b-leg-1");

    fp.send(1, d.alias, phone.addr()?, &to_phone).await?;
    let (got, from) = phone.recv().await?;
    assert_eq!(got, to_phone);
    assert_eq!(from, d.alias, "must leave from the alias the phone registered through");

    fp.send(2, d.main, phone.addr()?, &to_phone).await?;
    let (_, from) = phone.recv().await?;
    assert_eq!(from, d.main);
    d.shutdown().await
}

#[tokio::test]
async fn send_from_an_unknown_socket_or_transport_gets_an_edge_error() -> Result<()> {
    let d = Dispatcher::start().await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    let phone = Phone::new().await?;
    let msg = request("OPTIONS", "sip:alice@127.0.0.1", "x");

    fp.send_egress(7, egress("10.9.9.9", 5060, phone.addr()?, Transport::Udp), &msg).await?;
    let e = fp.next_error().await?;
    assert_eq!(e.send_id, 7);
    assert!(e.reason.contains("no local socket 10.9.9.9:5060/udp"), "{}", e.reason);

    // This dispatcher serves no TCP: the UDP port is not a TCP socket.
    fp.send_egress(8, egress("127.0.0.2", d.alias.port(), phone.addr()?, Transport::Tcp), &msg)
        .await?;
    let e = fp.next_error().await?;
    assert_eq!(e.send_id, 8);
    let expected = format!("no local socket 127.0.0.2:{}/tcp", d.alias.port());
    assert!(e.reason.contains(&expected), "{}", e.reason);

    fp.send_egress(
        9,
        egress("127.0.0.2", d.alias.port(), phone.addr()?, Transport::Unspecified),
        &msg,
    )
    .await?;
    let e = fp.next_error().await?;
    assert_eq!(e.send_id, 9);
    assert!(e.reason.contains("transport not specified"), "{}", e.reason);

    // The link survives refused sends.
    fp.send(10, d.alias, phone.addr()?, &msg).await?;
    assert_eq!(phone.recv().await?.1, d.alias);
    d.shutdown().await
}

#[tokio::test]
async fn without_a_processor_invite_gets_503_and_ack_gets_nothing() -> Result<()> {
    let d = Dispatcher::start().await?;
    let phone = Phone::new().await?;
    // The ACK first: if it were answered, that answer would arrive before the INVITE's.
    phone.send(d.alias, request("ACK", "sip:bob@127.0.0.2", "ack-1").as_bytes()).await?;
    phone.send(d.alias, response(&make_branch("fp1", "r"), "resp-1").as_bytes()).await?;
    phone.send(d.alias, request("INVITE", "sip:bob@127.0.0.2", "inv-1").as_bytes()).await?;

    let (answer, from) = phone.recv().await?;
    assert_eq!(from, d.alias, "answered from the socket the request came in on");
    assert!(answer.starts_with("SIP/2.0 503 Service Unavailable\r\n"), "{answer}");
    assert_eq!(header(&answer, "Call-ID"), Some("inv-1"), "{answer}");
    assert_eq!(header(&answer, "Retry-After"), Some("9"), "{answer}");
    assert_eq!(header(&answer, "CSeq"), Some("1 INVITE"));
    assert!(phone.nothing_received().await, "nothing after the 503");
    d.shutdown().await
}

#[tokio::test]
async fn garbage_is_dropped_and_the_next_datagram_still_routes() -> Result<()> {
    let d = Dispatcher::start().await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    let phone = Phone::new().await?;
    for junk in
        [&b"\x00\x01\x02garbage"[..], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\r\n\r\n", b""]
    {
        phone.send(d.main, junk).await?;
    }
    let options = request("OPTIONS", "sip:127.0.0.1", "after-junk");
    phone.send(d.main, options.as_bytes()).await?;
    assert_eq!(fp.next_inbound().await?.message, options.as_bytes(), "junk was not forwarded");
    assert!(phone.nothing_received().await, "junk is never answered");
    d.shutdown().await
}

#[tokio::test]
async fn call_ids_are_split_by_hash_and_responses_follow_the_branch() -> Result<()> {
    let d = Dispatcher::start().await?;
    let mut fp1 = FakeProcessor::connect(d.grpc, "fp1").await?;
    let mut fp2 = FakeProcessor::connect(d.grpc, "fp2").await?;
    let live = ["fp1", "fp2"];
    let phone = Phone::new().await?;

    let call_ids: Vec<String> = (0..20).map(|i| format!("split-{i}@127.0.0.1")).collect();
    for call_id in &call_ids {
        phone.send(d.main, request("INVITE", "sip:bob@127.0.0.1", call_id).as_bytes()).await?;
    }
    let mut got = [0usize; 2];
    for call_id in &call_ids {
        let owner = route::rendezvous(call_id, &live).copied().context("no owner")?;
        let fp = if owner == "fp1" { &mut fp1 } else { &mut fp2 };
        let inbound = fp.next_inbound().await?;
        let text = String::from_utf8_lossy(&inbound.message).into_owned();
        assert_eq!(header(&text, "Call-ID"), Some(call_id.as_str()), "{owner} got the wrong call");
        got[usize::from(owner == "fp2")] += 1;
    }
    assert!(got[0] > 0 && got[1] > 0, "both processors get calls: {got:?}");

    // A response to a request fp2 sent goes to fp2, even for a Call-ID that hashes to fp1.
    let call_id = (0..)
        .map(|i| format!("resp-{i}"))
        .find(|c| route::rendezvous(c, &live) == Some(&"fp1"))
        .context("no fp1 call id")?;
    let resp = response(&make_branch("fp2", "b1"), &call_id);
    phone.send(d.alias, resp.as_bytes()).await?;
    assert_eq!(fp2.next_inbound().await?.message, resp.as_bytes());

    // So does an in-dialog request whose Request-URI is fp2's Contact.
    let bye =
        request("BYE", &format!("sip:{}@127.0.0.2", make_contact_user("fp2", "c1")), &call_id);
    phone.send(d.alias, bye.as_bytes()).await?;
    assert_eq!(fp2.next_inbound().await?.message, bye.as_bytes());

    // Heartbeats are accepted silently; fp1 still gets its own traffic afterwards.
    fp1.tx
        .send(ProcessorMessage {
            kind: Some(PKind::Heartbeat(Heartbeat { transactions: 1, dialogs: 0 })),
        })
        .await?;
    let invite = request("INVITE", "sip:bob@127.0.0.1", &call_id);
    phone.send(d.main, invite.as_bytes()).await?;
    assert_eq!(fp1.next_inbound().await?.message, invite.as_bytes());
    d.shutdown().await
}

#[tokio::test]
async fn hello_with_a_bad_node_id_is_refused() -> Result<()> {
    let d = Dispatcher::start().await?;
    let (_tx, mut rx) = FakeProcessor::open(d.grpc, "not.valid").await?;
    match next(&mut rx).await? {
        DKind::Error(e) => assert!(e.reason.contains("not a valid node id"), "{}", e.reason),
        other => bail!("expected an edge error, got {other:?}"),
    }
    let end = timeout(EVENT, rx.message()).await.context("link not ended")?;
    ensure!(matches!(end, Ok(None) | Err(_)), "link still open: {end:?}");
    d.shutdown().await
}

/// A `Hello` with the id of a live processor is refused (its traffic, digests included, never
/// moves to whoever says its name); once the old link has ended the id is free again.
#[tokio::test]
async fn a_second_hello_with_a_live_id_is_refused_and_the_first_keeps_its_traffic() -> Result<()> {
    let d = Dispatcher::start().await?;
    let mut old = FakeProcessor::connect(d.grpc, "fp1").await?;
    let (_tx, mut rx) = FakeProcessor::open(d.grpc, "fp1").await?;
    match next(&mut rx).await? {
        DKind::Error(e) => assert!(e.reason.contains("is linked and alive"), "{}", e.reason),
        other => bail!("expected an edge error, got {other:?}"),
    }
    let end = timeout(EVENT, rx.message()).await.context("refused link not ended")?;
    ensure!(matches!(end, Ok(None) | Err(_)), "refused link still open: {end:?}");
    let phone = Phone::new().await?;
    let options = request("OPTIONS", "sip:127.0.0.1", "after-refusal");
    phone.send(d.main, options.as_bytes()).await?;
    assert_eq!(old.next_inbound().await?.message, options.as_bytes());

    // The old link ends: the id links again. Leaving is noticed asynchronously, so retry the
    // hello (each attempt waits for its answer) until it is welcomed.
    drop(old);
    let mut new = loop {
        let (tx, mut rx) = FakeProcessor::open(d.grpc, "fp1").await?;
        match next(&mut rx).await? {
            DKind::Welcome(welcome) => break FakeProcessor::from_parts(tx, rx, welcome),
            DKind::Error(e) if e.reason.contains("is linked and alive") => continue,
            other => bail!("expected a welcome, got {other:?}"),
        }
    };
    let options = request("OPTIONS", "sip:127.0.0.1", "after-leave");
    phone.send(d.main, options.as_bytes()).await?;
    assert_eq!(new.next_inbound().await?.message, options.as_bytes());
    d.shutdown().await
}

#[tokio::test]
async fn a_processor_that_leaves_stops_getting_requests() -> Result<()> {
    let d = Dispatcher::start().await?;
    let fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    drop(fp);
    // Leaving is noticed asynchronously; until then a request may still be queued to the dead
    // link. Each probe waits for its own answer, so this loop waits on events, not on time.
    let phone = Phone::new().await?;
    let invite = request("INVITE", "sip:bob@127.0.0.1", "after-leave");
    let mut answered = false;
    for _ in 0..50 {
        phone.send(d.main, invite.as_bytes()).await?;
        let mut buf = vec![0u8; 65_535];
        if let Ok(Ok((n, _))) =
            timeout(Duration::from_millis(100), phone.socket.recv_from(&mut buf)).await
        {
            assert!(buf[..n].starts_with(b"SIP/2.0 503 "));
            answered = true;
            break;
        }
    }
    assert!(answered, "no 503 after the only processor left");
    d.shutdown().await
}

#[tokio::test]
async fn shutdown_closes_processor_links() -> Result<()> {
    let d = Dispatcher::start().await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    d.shutdown().await?;
    assert!(fp.ended().await, "link still open after shutdown");
    Ok(())
}

/// Whatever a processor asks, the dispatcher sends nothing into denied networks or to the
/// cluster's own services (its SIP sockets, its edge, the services processors announce in
/// their hello): the send is refused and counted; a send to a phone still goes.
#[tokio::test]
async fn sends_to_denied_networks_or_the_clusters_own_services_are_refused() -> Result<()> {
    let d = Dispatcher::start().await?;
    let (tx, mut rx) = FakeProcessor::open_with(
        d.grpc,
        Hello {
            node_id: "fp1".into(),
            capacity: 1,
            services: vec!["127.0.0.1:6379".into(), "not an address".into()],
        },
    )
    .await?;
    let DKind::Welcome(welcome) = next(&mut rx).await? else { bail!("no welcome") };
    let mut fp = FakeProcessor::from_parts(tx, rx, welcome);
    let msg = "OPTIONS sip:x SIP/2.0\r\n\r\n";
    let denied = [
        ("224.0.0.1:5060", "denied network (224.0.0.0/4)"),
        ("169.254.9.9:5060", "denied network (169.254.0.0/16)"),
        ("0.0.0.0:5060", "denied network (0.0.0.0/8)"),
        ("127.0.0.1:6379", "cluster's own services"),
    ];
    let own = [d.main.to_string(), d.alias.to_string(), d.grpc.to_string()];
    let mut id = 0;
    for (to, why) in denied
        .iter()
        .map(|(a, w)| (a.to_string(), *w))
        .chain(own.iter().map(|a| (a.clone(), "cluster's own services")))
    {
        id += 1;
        fp.send(id, d.alias, to.parse()?, msg).await?;
        let e = fp.next_error().await?;
        assert_eq!(e.send_id, id);
        assert!(e.reason.contains(why), "{to}: {}", e.reason);
    }
    let phone = Phone::new().await?;
    fp.send(99, d.alias, phone.addr()?, "hello phone").await?;
    assert_eq!(phone.recv().await?.0, "hello phone");
    d.shutdown().await
}

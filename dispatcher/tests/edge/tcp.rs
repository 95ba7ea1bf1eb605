//! SIP over TCP: framing, keepalive, refusals, timeouts, limits, and sends over the phone's
//! own connection or a new one opened from the alias IP.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use sipalias_proto::edge::Transport;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::harness::*;

const PHONE_IP: [u8; 4] = [127, 0, 0, 5];

#[tokio::test]
async fn welcome_lists_tcp_and_tls_sockets_of_every_ip() -> Result<()> {
    let d = StreamEdge::start(Limits::default()).await?;
    let fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    let table: Vec<(String, u32, Transport, bool)> =
        fp.welcome.sockets.iter().map(|s| (s.ip.clone(), s.port, s.transport(), s.alias)).collect();
    let row = |a: SocketAddr, t, alias| (a.ip().to_string(), u32::from(a.port()), t, alias);
    assert_eq!(
        table,
        vec![
            row(d.main_udp, Transport::Udp, false),
            row(d.main_tcp, Transport::Tcp, false),
            row(d.main_tls, Transport::Tls, false),
            row(d.alias_tcp, Transport::Tcp, true),
            row(d.alias_tcp_extra, Transport::Tcp, true),
            row(d.alias3_tls, Transport::Tls, true),
            row(d.alias3_tls_extra, Transport::Tls, true),
        ]
    );
    d.shutdown().await
}

#[tokio::test]
async fn a_message_split_into_single_bytes_is_routed_with_its_connection() -> Result<()> {
    let d = StreamEdge::start(Limits::default()).await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    let mut phone = tcp_connect(PHONE_IP, d.alias_tcp_extra).await?;
    let register = request("REGISTER", "sip:127.0.0.2", "split-1");
    for byte in register.as_bytes() {
        phone.send(std::slice::from_ref(byte)).await?;
    }
    let inbound = fp.next_inbound().await?;
    assert_eq!(inbound.message, register.as_bytes(), "forwarded exactly as received");
    let ingress = stream_ingress(&inbound, d.alias_tcp_extra, Transport::Tcp)?;
    assert_eq!(remote_of(&ingress)?, phone.io.local_addr()?);
    assert_eq!(ingress.dispatcher_id, "d-stream");
    d.shutdown().await
}

#[tokio::test]
async fn two_messages_in_one_write_are_both_routed() -> Result<()> {
    let d = StreamEdge::start(Limits::default()).await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    let mut phone = tcp_connect(PHONE_IP, d.main_tcp).await?;
    let first = request("OPTIONS", "sip:127.0.0.1", "two-1");
    let second = request("REGISTER", "sip:127.0.0.1", "two-2");
    phone.send(format!("{first}{second}").as_bytes()).await?;
    let (a, b) = (fp.next_inbound().await?, fp.next_inbound().await?);
    assert_eq!(a.message, first.as_bytes());
    assert_eq!(b.message, second.as_bytes());
    let (ia, ib) = (
        stream_ingress(&a, d.main_tcp, Transport::Tcp)?,
        stream_ingress(&b, d.main_tcp, Transport::Tcp)?,
    );
    assert_eq!(ia.connection_id, ib.connection_id, "same connection, same id");
    d.shutdown().await
}

#[tokio::test]
async fn double_crlf_ping_gets_a_single_crlf_pong() -> Result<()> {
    let d = StreamEdge::start(Limits::default()).await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    let mut phone = tcp_connect(PHONE_IP, d.alias_tcp).await?;
    phone.send(b"\r\n\r\n").await?;
    assert_eq!(phone.recv_exact(2).await?, b"\r\n");
    // A ping split across two segments is still one ping.
    phone.send(b"\r\n").await?;
    phone.send(b"\r\n").await?;
    assert_eq!(phone.recv_exact(2).await?, b"\r\n");
    // A lone CRLF (a pong to a ping of ours) is not answered, and framing goes on after both.
    let options = request("OPTIONS", "sip:127.0.0.2", "after-ping");
    phone.send(format!("\r\n{options}\r\n\r\n").as_bytes()).await?;
    assert_eq!(fp.next_inbound().await?.message, options.as_bytes());
    assert_eq!(phone.recv_exact(2).await?, b"\r\n", "the second ping's pong, nothing before");
    d.shutdown().await
}

#[tokio::test]
async fn a_huge_content_length_gets_513_before_the_body_and_the_connection_closes() -> Result<()> {
    let d = StreamEdge::start(Limits::default()).await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    let mut phone = tcp_connect(PHONE_IP, d.main_tcp).await?;
    let head = request("INVITE", "sip:bob@127.0.0.1", "huge-1")
        .replace("Content-Length: 0\r\n\r\n", "Content-Length: 10000000\r\n\r\n");
    // The head and the start of a body that would be 10 MB; the rest never comes.
    phone.send(format!("{head}{}", "v=0\r\n".repeat(2000)).as_bytes()).await?;
    let answer = phone.recv().await?;
    assert!(answer.starts_with("SIP/2.0 513 Message Too Large\r\n"), "{answer}");
    assert_eq!(header(&answer, "Call-ID"), Some("huge-1"));
    assert!(phone.closed().await?.is_empty(), "nothing after the 513");

    let closed = fp.next_closed().await?;
    assert_eq!(closed.remote_port, u32::from(phone.io.local_addr()?.port()));
    // The refused message never reached the processor; a new connection works.
    let mut again = tcp_connect(PHONE_IP, d.main_tcp).await?;
    let options = request("OPTIONS", "sip:127.0.0.1", "after-huge");
    again.send(options.as_bytes()).await?;
    assert_eq!(fp.next_inbound().await?.message, options.as_bytes());
    d.shutdown().await
}

#[tokio::test]
async fn a_message_without_content_length_gets_400_and_the_connection_closes() -> Result<()> {
    let d = StreamEdge::start(Limits::default()).await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    let mut phone = tcp_connect(PHONE_IP, d.alias_tcp).await?;
    let bare =
        request("OPTIONS", "sip:127.0.0.2", "no-length").replace("Content-Length: 0\r\n", "");
    phone.send(bare.as_bytes()).await?;
    let answer = phone.recv().await?;
    assert!(answer.starts_with("SIP/2.0 400 Missing Content-Length\r\n"), "{answer}");
    assert_eq!(header(&answer, "CSeq"), Some("1 OPTIONS"));
    assert!(phone.closed().await?.is_empty());
    fp.next_closed().await?;
    d.shutdown().await
}

#[tokio::test]
async fn a_sender_trickling_one_byte_at_a_time_is_cut_off() -> Result<()> {
    let d = StreamEdge::start(Limits { message_timeout_secs: 1, ..Limits::default() }).await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    let phone = tcp_connect(PHONE_IP, d.main_tcp).await?;
    let (mut rd, mut wr) = phone.io.into_split();
    let started = Instant::now();
    // One byte every 200 ms: never idle, but the message would take far longer than 1 s.
    // (The pacing is the attack itself, not synchronisation.)
    let trickle = tokio::spawn(async move {
        for byte in request("INVITE", "sip:bob@127.0.0.1", "slow").bytes() {
            if wr.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut sink = Vec::new();
    // End of stream or a reset (bytes still in flight when it closed): either way, closed.
    let _ = timeout(EVENT, rd.read_to_end(&mut sink)).await.context("connection not closed")?;
    let elapsed = started.elapsed();
    trickle.abort();
    assert!(sink.is_empty(), "closed without an answer: {sink:?}");
    assert!(elapsed >= Duration::from_millis(900), "closed too early: {elapsed:?}");
    // What the processor hears about it is the close, never the partial INVITE.
    fp.next_closed().await?;
    d.shutdown().await
}

#[tokio::test]
async fn an_idle_connection_is_closed_and_processors_are_told() -> Result<()> {
    let d = StreamEdge::start(Limits { idle_timeout_secs: 1, ..Limits::default() }).await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    let mut phone = tcp_connect(PHONE_IP, d.alias_tcp).await?;
    phone.send(request("REGISTER", "sip:127.0.0.2", "idle-1").as_bytes()).await?;
    let ingress = stream_ingress(&fp.next_inbound().await?, d.alias_tcp, Transport::Tcp)?;
    phone.closed().await?;
    let closed = fp.next_closed().await?;
    assert_eq!(closed.connection_id, ingress.connection_id);
    assert_eq!(
        (closed.local_ip.as_str(), closed.local_port),
        ("127.0.0.2", u32::from(d.alias_tcp.port()))
    );
    assert_eq!(
        (closed.remote_ip.clone(), closed.remote_port),
        (ingress.remote_ip, ingress.remote_port)
    );
    d.shutdown().await
}

#[tokio::test]
async fn without_a_processor_a_request_gets_503_on_its_own_connection() -> Result<()> {
    let d = StreamEdge::start(Limits::default()).await?;
    let mut phone = tcp_connect(PHONE_IP, d.main_tcp).await?;
    phone.send(request("ACK", "sip:bob@127.0.0.1", "ack-1").as_bytes()).await?;
    phone.send(request("INVITE", "sip:bob@127.0.0.1", "inv-503").as_bytes()).await?;
    let answer = phone.recv().await?;
    assert!(answer.starts_with("SIP/2.0 503 Service Unavailable\r\n"), "{answer}");
    assert_eq!(header(&answer, "Call-ID"), Some("inv-503"), "the ACK got nothing");
    d.shutdown().await
}

/// 1,000 connection attempts from one IP with `max_connections_per_ip = 50`.
#[tokio::test]
async fn connections_over_the_per_ip_limit_are_closed_at_once() -> Result<()> {
    const ATTEMPTS: usize = 1000;
    const LIMIT: usize = 50;
    let d = StreamEdge::start(Limits { per_ip: LIMIT, ..Limits::default() }).await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;

    // Each connection waits to be closed by the dispatcher, or to be told the count of closed
    // ones is complete; it then hands itself back if still open.
    let (closed_tx, mut closed_rx) = mpsc::unbounded_channel::<()>();
    let (done_tx, done_rx) = watch::channel(false);
    let mut waiting = JoinSet::new();
    for _ in 0..ATTEMPTS {
        let mut stream = match TcpStream::connect(d.alias_tcp).await {
            Ok(stream) => stream,
            // Refused (reset) before the connect even returned.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                let _ = closed_tx.send(());
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let (closed_tx, mut done) = (closed_tx.clone(), done_rx.clone());
        waiting.spawn(async move {
            let mut byte = [0u8; 1];
            tokio::select! {
                _ = stream.read(&mut byte) => {
                    let _ = closed_tx.send(());
                    None
                }
                _ = done.wait_for(|d| *d) => Some(stream),
            }
        });
    }
    let mut closed = 0;
    timeout(EVENT, async {
        while closed < ATTEMPTS - LIMIT {
            closed_rx.recv().await.context("counter gone")?;
            closed += 1;
        }
        anyhow::Ok(())
    })
    .await
    .with_context(|| format!("only {closed} of {} refused", ATTEMPTS - LIMIT))??;
    let _ = done_tx.send(true);
    let mut open = Vec::new();
    while let Some(joined) = waiting.join_next().await {
        open.extend(joined?);
    }
    assert!(open.len() <= LIMIT, "{} connections accepted", open.len());

    // An accepted connection works normally.
    let mut kept = Conn::new(open.pop().context("none accepted")?);
    let options = request("OPTIONS", "sip:127.0.0.2", "within-limit");
    kept.send(options.as_bytes()).await?;
    let inbound = fp.next_inbound().await?;
    assert_eq!(inbound.message, options.as_bytes());
    stream_ingress(&inbound, d.alias_tcp, Transport::Tcp)?;
    d.shutdown().await
}

#[tokio::test]
async fn a_send_naming_the_inbound_connection_goes_over_it() -> Result<()> {
    let d = StreamEdge::start(Limits::default()).await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    let mut phone = tcp_connect(PHONE_IP, d.alias_tcp).await?;
    phone.send(request("REGISTER", "sip:127.0.0.2", "reg-tcp").as_bytes()).await?;
    let ingress = stream_ingress(&fp.next_inbound().await?, d.alias_tcp, Transport::Tcp)?;

    let invite = request("INVITE", "sip:alice@127.0.0.5", "to-phone");
    let egress =
        stream_egress(d.alias_tcp, Transport::Tcp, remote_of(&ingress)?, ingress.connection_id);
    fp.send_full(1, egress.clone(), &invite, true).await?;
    assert_eq!(phone.recv().await?, invite, "arrives on the phone's own connection");
    assert_eq!(phone.io.peer_addr()?, d.alias_tcp, "from the socket it connected to");

    // Responses on that connection come back with the same connection id.
    let ringing = response(&sipmsg::scan::make_branch("fp1", "b1"), "to-phone");
    phone.send(ringing.as_bytes()).await?;
    let back = stream_ingress(&fp.next_inbound().await?, d.alias_tcp, Transport::Tcp)?;
    assert_eq!(back.connection_id, ingress.connection_id);

    // Connection id 0: the open connection to that destination is reused, none is opened.
    let bye = request("BYE", "sip:alice@127.0.0.5", "to-phone");
    fp.send_full(
        2,
        stream_egress(d.alias_tcp, Transport::Tcp, remote_of(&ingress)?, 0),
        &bye,
        false,
    )
    .await?;
    assert_eq!(phone.recv().await?, bye);
    d.shutdown().await
}

#[tokio::test]
async fn after_the_phone_hangs_up_a_send_opens_a_new_connection_from_the_alias_ip() -> Result<()> {
    let d = StreamEdge::start(Limits::default()).await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    let mut phone = tcp_connect(PHONE_IP, d.alias_tcp).await?;
    phone.send(request("REGISTER", "sip:127.0.0.2", "reg-gone").as_bytes()).await?;
    let ingress = stream_ingress(&fp.next_inbound().await?, d.alias_tcp, Transport::Tcp)?;
    drop(phone);
    let closed = fp.next_closed().await?;
    assert_eq!(closed.connection_id, ingress.connection_id, "the old connection is reported");

    // The phone now listens at its contact; the processor still names the old connection.
    let contact = TcpListener::bind(SocketAddr::from((PHONE_IP, 0))).await?;
    let invite = request("INVITE", "sip:alice@127.0.0.5", "call-new-conn");
    let egress =
        stream_egress(d.alias_tcp, Transport::Tcp, contact.local_addr()?, ingress.connection_id);
    fp.send_full(3, egress, &invite, false).await?;
    let (stream, peer) = timeout(EVENT, contact.accept()).await.context("no connection")??;
    assert_eq!(peer.ip().to_string(), "127.0.0.2", "source IP is the alias");
    assert_ne!(peer.port(), d.alias_tcp.port(), "an ephemeral port");
    let mut phone = Conn::new(stream);
    assert_eq!(phone.recv().await?, invite);

    // What the phone sends on the new connection arrives as the alias socket's, with a new id.
    let ringing = response(&sipmsg::scan::make_branch("fp1", "n1"), "call-new-conn");
    phone.send(ringing.as_bytes()).await?;
    let new = stream_ingress(&fp.next_inbound().await?, d.alias_tcp, Transport::Tcp)?;
    assert_ne!(new.connection_id, ingress.connection_id);
    assert_eq!(remote_of(&new)?, contact.local_addr()?);

    // Naming the old connection again reuses the new one rather than opening a third.
    let bye = request("BYE", "sip:alice@127.0.0.5", "call-new-conn");
    let egress =
        stream_egress(d.alias_tcp, Transport::Tcp, contact.local_addr()?, ingress.connection_id);
    fp.send_full(4, egress, &bye, false).await?;
    assert_eq!(phone.recv().await?, bye);
    d.shutdown().await
}

#[tokio::test]
async fn a_flow_only_send_to_a_closed_connection_gets_an_edge_error_naming_it() -> Result<()> {
    let d = StreamEdge::start(Limits::default()).await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    let mut phone = tcp_connect(PHONE_IP, d.main_tcp).await?;
    phone.send(request("REGISTER", "sip:127.0.0.1", "reg-flow").as_bytes()).await?;
    let ingress = stream_ingress(&fp.next_inbound().await?, d.main_tcp, Transport::Tcp)?;
    let phone_addr = remote_of(&ingress)?;
    drop(phone);
    assert_eq!(fp.next_closed().await?.connection_id, ingress.connection_id);

    let options = request("OPTIONS", "sip:alice@127.0.0.5", "flow");
    fp.send_full(
        5,
        stream_egress(d.main_tcp, Transport::Tcp, phone_addr, ingress.connection_id),
        &options,
        true,
    )
    .await?;
    let e = fp.next_error().await?;
    assert_eq!((e.send_id, e.closed_connection_id), (5, ingress.connection_id), "{}", e.reason);

    fp.send_full(6, stream_egress(d.main_tcp, Transport::Tcp, phone_addr, 0), &options, true)
        .await?;
    let e = fp.next_error().await?;
    assert_eq!((e.send_id, e.closed_connection_id), (6, 0), "{}", e.reason);
    d.shutdown().await
}

#[tokio::test]
async fn sends_from_sockets_the_dispatcher_does_not_own_are_refused() -> Result<()> {
    let d = StreamEdge::start(Limits::default()).await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    let phone = SocketAddr::from((PHONE_IP, 5060));
    let msg = request("OPTIONS", "sip:alice@127.0.0.5", "not-ours");
    let cases = [
        // The alias's TCP port over TLS, the TLS port over TCP, an address nobody listens on.
        (d.alias_tcp, Transport::Tls, format!("no local socket {}/tls", d.alias_tcp)),
        (d.alias3_tls, Transport::Tcp, format!("no local socket {}/tcp", d.alias3_tls)),
        (
            SocketAddr::from((ALIAS_IP, 1)),
            Transport::Tcp,
            "no local socket 127.0.0.2:1/tcp".to_owned(),
        ),
    ];
    for (i, (local, transport, expected)) in cases.into_iter().enumerate() {
        let id = 10 + i as u64;
        fp.send_full(id, stream_egress(local, transport, phone, 0), &msg, false).await?;
        let e = fp.next_error().await?;
        assert_eq!(e.send_id, id);
        assert!(e.reason.contains(&expected), "{} (expected {expected})", e.reason);
    }

    // A connection that cannot be opened is reported after the fact, with the send's id.
    let refused = TcpListener::bind(SocketAddr::from((PHONE_IP, 0))).await?;
    let nobody = refused.local_addr()?;
    drop(refused);
    fp.send_full(20, stream_egress(d.alias_tcp, Transport::Tcp, nobody, 0), &msg, false).await?;
    let e = fp.next_error().await?;
    assert_eq!(e.send_id, 20);
    assert!(e.reason.contains("cannot open a tcp connection from 127.0.0.2"), "{}", e.reason);
    match timeout(ABSENCE, fp.next()).await {
        Err(_) => {}
        Ok(other) => bail!("a connection that never opened is not reported closed: {other:?}"),
    }
    d.shutdown().await
}

/// Connects to `to` from `from_ip` (each test client gets its own loopback source address).
async fn connect_from(from_ip: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from_ip, 0)))?;
    socket.connect(to).await
}

/// Whether the dispatcher closes `stream` within a short while (a refused connection is closed
/// at once; an accepted one stays open).
async fn closed_soon(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(timeout(Duration::from_millis(300), stream.read(&mut byte)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test]
async fn connections_over_the_total_limit_are_refused_whatever_their_source() -> Result<()> {
    const TOTAL: usize = 5;
    let d = StreamEdge::start(Limits { total: TOTAL, ..Limits::default() }).await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    // Five clients from five different source IPs fill the dispatcher.
    let mut open = Vec::new();
    for i in 0..TOTAL {
        let mut s = connect_from([127, 0, 1, 10 + i as u8], d.alias_tcp).await?;
        let options = request("OPTIONS", "sip:127.0.0.2", &format!("total-{i}"));
        s.write_all(options.as_bytes()).await?;
        let inbound = fp.next_inbound().await?;
        assert_eq!(inbound.message, options.as_bytes());
        open.push(s);
    }
    // A sixth, from yet another IP (its own per-IP count is zero), is refused.
    let mut sixth = match connect_from([127, 0, 1, 99], d.alias_tcp).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return d.shutdown().await,
        Err(e) => return Err(e.into()),
    };
    assert!(closed_soon(&mut sixth).await, "a connection over the total limit was kept");
    // Freeing one slot (the processor hears of the close) lets a new client in.
    drop(open.pop());
    match fp.next().await? {
        sipalias_proto::edge::dispatcher_message::Kind::Closed(c) => {
            assert_eq!(c.remote_ip, "127.0.1.14")
        }
        other => bail!("expected the close of the freed connection, got {other:?}"),
    }
    let mut s = connect_from([127, 0, 1, 98], d.alias_tcp).await?;
    let options = request("OPTIONS", "sip:127.0.0.2", "after-free");
    s.write_all(options.as_bytes()).await?;
    assert_eq!(fp.next_inbound().await?.message, options.as_bytes());
    d.shutdown().await
}

/// Connections the dispatcher opens toward phones have their own budget: past
/// `max_outbound_connections` a send that needs a new one is refused, and phones still connect
/// in (the accepted budget is separate).
#[tokio::test]
async fn outbound_connections_have_their_own_budget() -> Result<()> {
    let d = StreamEdge::start(Limits { outbound: 1, total: 5, ..Limits::default() }).await?;
    let mut fp = FakeProcessor::connect(d.grpc, "fp1").await?;
    let first = TcpListener::bind(SocketAddr::from((PHONE_IP, 0))).await?;
    let second = TcpListener::bind(SocketAddr::from((PHONE_IP, 0))).await?;
    let msg = request("OPTIONS", "sip:alice@127.0.0.5", "outbound");
    let egress = |to: &TcpListener| -> Result<_> {
        Ok(stream_egress(d.alias_tcp, Transport::Tcp, to.local_addr()?, 0))
    };
    fp.send_full(1, egress(&first)?, &msg, false).await?;
    let (stream, _) = timeout(EVENT, first.accept()).await.context("no connection")??;
    let mut phone = Conn::new(stream);
    assert_eq!(phone.recv().await?, msg);
    fp.send_full(2, egress(&second)?, &msg, false).await?;
    let e = fp.next_error().await?;
    assert_eq!(e.send_id, 2);
    assert!(e.reason.contains("max_outbound_connections 1"), "{}", e.reason);
    // Five phones connect in all the same (max_connections = 5 counts accepted ones only).
    for i in 0..5 {
        let mut inbound = tcp_connect(PHONE_IP, d.main_tcp).await?;
        let options = request("OPTIONS", "sip:127.0.0.1", &format!("in-{i}"));
        inbound.send(options.as_bytes()).await?;
        assert_eq!(fp.next_inbound().await?.message, options.as_bytes());
        std::mem::forget(inbound);
    }
    d.shutdown().await
}

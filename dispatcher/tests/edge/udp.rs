//! The dispatcher in-process, over real sockets: UDP on 127.0.0.1 (main) and 127.0.0.2
//! (alias), the gRPC edge link on 127.0.0.1, and fake processors speaking the real `Edge`
//! protocol through tonic's client.
//!
//! Every socket is bound on port 0 by the test *before* the dispatcher starts and handed to
//! `run_with`, so there is no free-port race and no waiting for readiness. Events are awaited
//! with a timeout; absence is shown by ordering where possible (send the datagram that must be
//! ignored, then one that must be answered, and check the first answer is the second's).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use sipalias_dispatcher::{DispatcherConfig, Error, Listeners, route, run_with};
use sipalias_proto::edge::dispatcher_message::Kind as DKind;
use sipalias_proto::edge::edge_client::EdgeClient;
use sipalias_proto::edge::processor_message::Kind as PKind;
use sipalias_proto::edge::{
    DispatcherMessage, EdgeError, Egress, Heartbeat, Hello, Inbound, ProcessorMessage, Send,
    Transport, Welcome,
};
use sipmsg::scan::{make_branch, make_contact_user};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// Upper bound for anything that should happen.
const EVENT: Duration = Duration::from_secs(5);
/// How long to listen for something that must not happen (only where ordering cannot show it).
const ABSENCE: Duration = Duration::from_millis(300);

const ALIAS_REALM: &str = "voip.oldprovider.example";

/// A running dispatcher and the addresses it serves.
struct Dispatcher {
    main: SocketAddr,
    alias: SocketAddr,
    grpc: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), Error>>,
}

impl Dispatcher {
    async fn start() -> Result<Self> {
        let main_socket = UdpSocket::bind("127.0.0.1:0").await?;
        let alias_socket = UdpSocket::bind("127.0.0.2:0").await?;
        let grpc = TcpListener::bind("127.0.0.1:0").await?;
        let (main, alias) = (main_socket.local_addr()?, alias_socket.local_addr()?);
        let config = DispatcherConfig::from_toml_str(&format!(
            r#"
            [dispatcher]
            id = "d-test"
            retry_after_secs = 9
            [dispatcher.main]
            ip = "127.0.0.1"
            domain = "sip.example.net"
            udp_port = {}
            [[dispatcher.aliases]]
            ip = "127.0.0.2"
            domain = "sip.example.net"
            realm = "{ALIAS_REALM}"
            udp_port = {}
            "#,
            main.port(),
            alias.port()
        ))?;
        let listeners = Listeners { udp: vec![main_socket, alias_socket], grpc };
        let grpc = listeners.grpc.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run_with(config, listeners, async move {
            let _ = stopped.await;
        }));
        Ok(Self { main, alias, grpc, stop, task })
    }

    /// Stops the dispatcher and checks it shut down cleanly and promptly.
    async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(());
        timeout(EVENT, self.task)
            .await
            .context("dispatcher did not stop")??
            .context("dispatcher failed")?;
        Ok(())
    }
}

/// A processor as the dispatcher sees it: one `Link` stream.
struct FakeProcessor {
    tx: mpsc::Sender<ProcessorMessage>,
    rx: Streaming<DispatcherMessage>,
    welcome: Welcome,
}

impl FakeProcessor {
    async fn connect(grpc: SocketAddr, id: &str) -> Result<Self> {
        let (tx, mut rx) = Self::open(grpc, id).await?;
        let welcome = match next(&mut rx).await? {
            DKind::Welcome(w) => w,
            other => bail!("expected welcome, got {other:?}"),
        };
        Ok(Self { tx, rx, welcome })
    }

    /// Opens a link and says hello with `id`, without reading the answer.
    async fn open(
        grpc: SocketAddr,
        id: &str,
    ) -> Result<(mpsc::Sender<ProcessorMessage>, Streaming<DispatcherMessage>)> {
        let mut client = EdgeClient::connect(format!("http://{grpc}")).await?;
        let (tx, rx) = mpsc::channel(16);
        let hello = Hello { node_id: id.to_owned(), capacity: 100 };
        tx.send(ProcessorMessage { kind: Some(PKind::Hello(hello)) }).await?;
        let stream = client.link(ReceiverStream::new(rx)).await?.into_inner();
        Ok((tx, stream))
    }

    async fn next(&mut self) -> Result<DKind> {
        next(&mut self.rx).await
    }

    async fn next_inbound(&mut self) -> Result<Inbound> {
        match self.next().await? {
            DKind::Inbound(i) => Ok(i),
            other => bail!("expected inbound, got {other:?}"),
        }
    }

    async fn next_error(&mut self) -> Result<EdgeError> {
        match self.next().await? {
            DKind::Error(e) => Ok(e),
            other => bail!("expected edge error, got {other:?}"),
        }
    }

    async fn send(&self, id: u64, from: SocketAddr, to: SocketAddr, message: &str) -> Result<()> {
        self.send_egress(
            id,
            egress(&from.ip().to_string(), from.port(), to, Transport::Udp),
            message,
        )
        .await
    }

    async fn send_egress(&self, id: u64, egress: Egress, message: &str) -> Result<()> {
        let send = Send { id, egress: Some(egress), message: message.as_bytes().to_vec() };
        self.tx.send(ProcessorMessage { kind: Some(PKind::Send(send)) }).await?;
        Ok(())
    }

    /// Whether the dispatcher ended this link (stream closed or failed) within the timeout.
    async fn ended(&mut self) -> bool {
        matches!(timeout(EVENT, self.rx.message()).await, Ok(Ok(None) | Err(_)))
    }
}

async fn next(rx: &mut Streaming<DispatcherMessage>) -> Result<DKind> {
    let msg = timeout(EVENT, rx.message()).await.context("no message from the dispatcher")??;
    msg.and_then(|m| m.kind).ok_or_else(|| anyhow!("link ended"))
}

fn egress(local_ip: &str, local_port: u16, to: SocketAddr, transport: Transport) -> Egress {
    Egress {
        local_ip: local_ip.to_owned(),
        local_port: u32::from(local_port),
        transport: transport.into(),
        remote_ip: to.ip().to_string(),
        remote_port: u32::from(to.port()),
        connection_id: 0,
    }
}

/// A phone: a UDP socket on 127.0.0.1.
struct Phone {
    socket: UdpSocket,
}

impl Phone {
    async fn new() -> Result<Self> {
        Ok(Self { socket: UdpSocket::bind("127.0.0.1:0").await? })
    }

    fn addr(&self) -> Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    async fn send(&self, to: SocketAddr, data: &[u8]) -> Result<()> {
        self.socket.send_to(data, to).await?;
        Ok(())
    }

    /// The next datagram and who sent it.
    async fn recv(&self) -> Result<(String, SocketAddr)> {
        let mut buf = vec![0u8; 65_535];
        let (n, from) =
            timeout(EVENT, self.socket.recv_from(&mut buf)).await.context("nothing received")??;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
    }

    async fn nothing_received(&self) -> bool {
        let mut buf = vec![0u8; 65_535];
        timeout(ABSENCE, self.socket.recv_from(&mut buf)).await.is_err()
    }
}

fn request(method: &str, uri: &str, call_id: &str) -> String {
    format!(
        "{method} {uri} SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:5999;rport;branch=z9hG4bK-{call_id}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@sip.example.net>;tag=a1\r\n\
         To: <sip:bob@sip.example.net>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 {method}\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn response(branch: &str, call_id: &str) -> String {
    format!(
        "SIP/2.0 180 Ringing\r\n\
         Via: SIP/2.0/UDP 127.0.0.2;branch={branch}\r\n\
         From: <sip:alice@sip.example.net>;tag=a1\r\n\
         To: <sip:bob@sip.example.net>;tag=b1\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 INVITE\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.split("\r\n").find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

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

    fp.send_egress(8, egress("127.0.0.2", d.alias.port(), phone.addr()?, Transport::Tcp), &msg)
        .await?;
    let e = fp.next_error().await?;
    assert_eq!(e.send_id, 8);
    assert!(e.reason.contains("transport not supported yet"), "{}", e.reason);

    // The link survives refused sends.
    fp.send(9, d.alias, phone.addr()?, &msg).await?;
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

#[tokio::test]
async fn a_second_hello_with_the_same_id_replaces_the_first() -> Result<()> {
    let d = Dispatcher::start().await?;
    let mut old = FakeProcessor::connect(d.grpc, "fp1").await?;
    let mut new = FakeProcessor::connect(d.grpc, "fp1").await?;
    assert!(old.ended().await, "the replaced link is closed");
    let phone = Phone::new().await?;
    let options = request("OPTIONS", "sip:127.0.0.1", "after-replace");
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

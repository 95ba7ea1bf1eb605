//! What the tests share: dispatchers bound on port 0, fake processors, phones over UDP, TCP
//! and TLS, certificates.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sipalias_dispatcher::{DispatcherConfig, Error, Listeners, run_with};
use sipalias_proto::edge::dispatcher_message::Kind as DKind;
use sipalias_proto::edge::edge_client::EdgeClient;
use sipalias_proto::edge::processor_message::Kind as PKind;
use sipalias_proto::edge::{
    ConnectionClosed, DispatcherMessage, Drain, EdgeError, Egress, Heartbeat, Hello, Inbound,
    Ingress, ProcessorMessage, Send, StatusRequest, StatusResponse, Transport, Welcome,
};
use sipmsg::framing::{Frame, frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// Upper bound for anything that should happen.
pub const EVENT: Duration = Duration::from_secs(5);
/// How long to listen for something that must not happen (only where ordering cannot show it).
pub const ABSENCE: Duration = Duration::from_millis(300);

pub const ALIAS_REALM: &str = "voip.oldprovider.example";
/// How often fake processors heartbeat: well inside the smallest timeout a test configures.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(250);

/// A running UDP-only dispatcher (`transports = ["udp"]`) and the addresses it serves.
pub struct Dispatcher {
    pub main: SocketAddr,
    pub alias: SocketAddr,
    pub grpc: SocketAddr,
    pub stop: oneshot::Sender<()>,
    pub task: JoinHandle<Result<(), Error>>,
}

impl Dispatcher {
    pub async fn start() -> Result<Self> {
        Self::start_with("").await
    }

    /// Starts a dispatcher with `keys` (TOML lines) added to its `[dispatcher]` table.
    pub async fn start_with(keys: &str) -> Result<Self> {
        let main_socket = UdpSocket::bind("127.0.0.1:0").await?;
        let alias_socket = UdpSocket::bind("127.0.0.2:0").await?;
        let grpc = TcpListener::bind("127.0.0.1:0").await?;
        let (main, alias) = (main_socket.local_addr()?, alias_socket.local_addr()?);
        let config = DispatcherConfig::from_toml_str(&format!(
            r#"
            [dispatcher]
            id = "d-test"
            retry_after_secs = 9
            {keys}
            [dispatcher.main]
            ip = "127.0.0.1"
            domain = "sip.example.net"
            transports = ["udp"]
            udp_port = {}
            [[dispatcher.aliases]]
            ip = "127.0.0.2"
            domain = "sip.example.net"
            realm = "{ALIAS_REALM}"
            transports = ["udp"]
            udp_port = {}
            "#,
            main.port(),
            alias.port()
        ))?;
        let listeners =
            Listeners { udp: vec![main_socket, alias_socket], tcp: vec![], tls: vec![], grpc };
        let grpc = listeners.grpc.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run_with(config, listeners, async move {
            let _ = stopped.await;
        }));
        Ok(Self { main, alias, grpc, stop, task })
    }

    /// Stops the dispatcher and checks it shut down cleanly and promptly.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(());
        timeout(EVENT, self.task)
            .await
            .context("dispatcher did not stop")??
            .context("dispatcher failed")?;
        Ok(())
    }

    /// The answer to the `Status` RPC.
    pub async fn status(&self) -> Result<StatusResponse> {
        let mut client = EdgeClient::connect(format!("http://{}", self.grpc)).await?;
        Ok(timeout(EVENT, client.status(StatusRequest {})).await??.into_inner())
    }
}

/// The load a fake processor reports in its heartbeats.
#[derive(Debug, Default)]
pub struct Load {
    pub transactions: AtomicU32,
    pub dialogs: AtomicU32,
}

/// A processor as the dispatcher sees it: one `Link` stream. Like a real processor it sends
/// a heartbeat periodically (every [`HEARTBEAT_EVERY`]) for as long as it is not dropped,
/// unless made with [`FakeProcessor::connect_silent`].
pub struct FakeProcessor {
    pub tx: mpsc::Sender<ProcessorMessage>,
    pub rx: Streaming<DispatcherMessage>,
    pub welcome: Welcome,
    /// What the heartbeats report.
    pub load: Arc<Load>,
}

impl FakeProcessor {
    pub async fn connect(grpc: SocketAddr, id: &str) -> Result<Self> {
        let fp = Self::connect_silent(grpc, id).await?;
        // A weak sender: dropping the fake processor still ends its link.
        let (weak, load) = (fp.tx.downgrade(), Arc::clone(&fp.load));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
            loop {
                tick.tick().await;
                let Some(tx) = weak.upgrade() else { return };
                let hb = Heartbeat {
                    transactions: load.transactions.load(Ordering::Relaxed),
                    dialogs: load.dialogs.load(Ordering::Relaxed),
                };
                if let Err(mpsc::error::TrySendError::Closed(_)) =
                    tx.try_send(ProcessorMessage { kind: Some(PKind::Heartbeat(hb)) })
                {
                    return;
                }
            }
        });
        Ok(fp)
    }

    /// A processor that never sends a heartbeat by itself.
    pub async fn connect_silent(grpc: SocketAddr, id: &str) -> Result<Self> {
        let (tx, mut rx) = Self::open(grpc, id).await?;
        let welcome = match next(&mut rx).await? {
            DKind::Welcome(w) => w,
            other => bail!("expected welcome, got {other:?}"),
        };
        Ok(Self { tx, rx, welcome, load: Arc::default() })
    }

    /// A processor from a link already opened with [`FakeProcessor::open`] and welcomed.
    pub fn from_parts(
        tx: mpsc::Sender<ProcessorMessage>,
        rx: Streaming<DispatcherMessage>,
        welcome: Welcome,
    ) -> Self {
        Self { tx, rx, welcome, load: Arc::default() }
    }

    /// Says `Drain`: send me no new work.
    pub async fn drain(&self) -> Result<()> {
        self.tx.send(ProcessorMessage { kind: Some(PKind::Drain(Drain {})) }).await?;
        Ok(())
    }

    /// Returns once the dispatcher has handled everything this processor sent before: a
    /// `Send` to `phone` is executed in order after them, so its arrival proves it.
    pub async fn barrier(&self, from: SocketAddr, phone: &Phone) -> Result<()> {
        let mark = format!("barrier-{}", unique());
        self.send(u64::MAX, from, phone.addr()?, &mark).await?;
        let (got, _) = phone.recv().await?;
        ensure!(got == mark, "expected the barrier, the phone got {got:?}");
        Ok(())
    }

    /// Opens a link and says hello with `id`, without reading the answer.
    pub async fn open(
        grpc: SocketAddr,
        id: &str,
    ) -> Result<(mpsc::Sender<ProcessorMessage>, Streaming<DispatcherMessage>)> {
        let hello = Hello { node_id: id.to_owned(), capacity: 100, ..Default::default() };
        Self::open_with(grpc, hello).await
    }

    /// Opens a link and says `hello`, without reading the answer.
    pub async fn open_with(
        grpc: SocketAddr,
        hello: Hello,
    ) -> Result<(mpsc::Sender<ProcessorMessage>, Streaming<DispatcherMessage>)> {
        let mut client = EdgeClient::connect(format!("http://{grpc}")).await?;
        let (tx, rx) = mpsc::channel(16);
        tx.send(ProcessorMessage { kind: Some(PKind::Hello(hello)) }).await?;
        let stream = client.link(ReceiverStream::new(rx)).await?.into_inner();
        Ok((tx, stream))
    }

    pub async fn next(&mut self) -> Result<DKind> {
        next(&mut self.rx).await
    }

    pub async fn next_inbound(&mut self) -> Result<Inbound> {
        match self.next().await? {
            DKind::Inbound(i) => Ok(i),
            other => bail!("expected inbound, got {other:?}"),
        }
    }

    pub async fn next_error(&mut self) -> Result<EdgeError> {
        match self.next().await? {
            DKind::Error(e) => Ok(e),
            other => bail!("expected edge error, got {other:?}"),
        }
    }

    pub async fn send(
        &self,
        id: u64,
        from: SocketAddr,
        to: SocketAddr,
        message: &str,
    ) -> Result<()> {
        self.send_egress(
            id,
            egress(&from.ip().to_string(), from.port(), to, Transport::Udp),
            message,
        )
        .await
    }

    pub async fn send_egress(&self, id: u64, egress: Egress, message: &str) -> Result<()> {
        let send = Send {
            id,
            egress: Some(egress),
            message: message.as_bytes().to_vec(),
            flow_only: false,
        };
        self.tx.send(ProcessorMessage { kind: Some(PKind::Send(send)) }).await?;
        Ok(())
    }

    /// Whether the dispatcher ended this link (stream closed or failed) within the timeout.
    pub async fn ended(&mut self) -> bool {
        matches!(timeout(EVENT, self.rx.message()).await, Ok(Ok(None) | Err(_)))
    }
}

/// A number that differs between calls in one test process.
fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

pub async fn next(rx: &mut Streaming<DispatcherMessage>) -> Result<DKind> {
    let msg = timeout(EVENT, rx.message()).await.context("no message from the dispatcher")??;
    msg.and_then(|m| m.kind).ok_or_else(|| anyhow!("link ended"))
}

pub fn egress(local_ip: &str, local_port: u16, to: SocketAddr, transport: Transport) -> Egress {
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
pub struct Phone {
    pub socket: UdpSocket,
}

impl Phone {
    pub async fn new() -> Result<Self> {
        Ok(Self { socket: UdpSocket::bind("127.0.0.1:0").await? })
    }

    pub fn addr(&self) -> Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    pub async fn send(&self, to: SocketAddr, data: &[u8]) -> Result<()> {
        self.socket.send_to(data, to).await?;
        Ok(())
    }

    /// The next datagram and who sent it.
    pub async fn recv(&self) -> Result<(String, SocketAddr)> {
        let mut buf = vec![0u8; 65_535];
        let (n, from) =
            timeout(EVENT, self.socket.recv_from(&mut buf)).await.context("nothing received")??;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
    }

    pub async fn nothing_received(&self) -> bool {
        let mut buf = vec![0u8; 65_535];
        timeout(ABSENCE, self.socket.recv_from(&mut buf)).await.is_err()
    }
}

pub fn request(method: &str, uri: &str, call_id: &str) -> String {
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

pub fn response(branch: &str, call_id: &str) -> String {
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

pub fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.split("\r\n").find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

// ---- TCP and TLS ----

/// A self-signed certificate and key for one IP, as PEM files the dispatcher reads.
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// DER of the certificate currently in `cert`: what a client should be shown.
    pub der: Vec<u8>,
}

impl CertFiles {
    pub fn create(dir: &Path, name: &str, ip: &str) -> Result<Self> {
        let mut files = Self {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            der: Vec::new(),
        };
        files.renew(ip)?;
        Ok(files)
    }

    /// Replaces both files with a new certificate for `ip` (key first, each by rename, as an
    /// operator's deployment tool would).
    pub fn renew(&mut self, ip: &str) -> Result<()> {
        let c = rcgen::generate_simple_self_signed(vec![ip.to_owned()])?;
        write_atomic(&self.key, c.signing_key.serialize_pem().as_bytes())?;
        write_atomic(&self.cert, c.cert.pem().as_bytes())?;
        self.der = c.cert.der().to_vec();
        Ok(())
    }

    /// A rustls server configuration presenting this certificate (a TLS phone in tests).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let certs = CertificateDer::pem_file_iter(&self.cert)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&self.key)?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
        Ok(Arc::new(config))
    }
}

pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Stream limits for a test dispatcher.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub message_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    pub per_ip: usize,
    pub total: usize,
    pub outbound: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            message_timeout_secs: 10,
            idle_timeout_secs: 3600,
            per_ip: 100,
            total: 10_000,
            outbound: 2_000,
        }
    }
}

/// A running dispatcher with TCP and TLS:
///
/// - main 127.0.0.1: UDP, TCP and TLS (default transports, since it has a certificate);
/// - alias 127.0.0.2: TCP only, on `tcp_port` and one extra TCP port;
/// - alias 127.0.0.3: TLS only, on `tls_port` and one extra TLS port, its own certificate.
///
/// Certificates are polled every second (`tls_reload_secs = 1`).
pub struct StreamEdge {
    pub main_udp: SocketAddr,
    pub main_tcp: SocketAddr,
    pub main_tls: SocketAddr,
    pub alias_tcp: SocketAddr,
    pub alias_tcp_extra: SocketAddr,
    pub alias3_tls: SocketAddr,
    pub alias3_tls_extra: SocketAddr,
    pub grpc: SocketAddr,
    pub main_cert: CertFiles,
    pub alias3_cert: CertFiles,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), Error>>,
    _dir: tempfile::TempDir,
}

pub const MAIN_IP: [u8; 4] = [127, 0, 0, 1];
pub const ALIAS_IP: [u8; 4] = [127, 0, 0, 2];
pub const ALIAS3_IP: [u8; 4] = [127, 0, 0, 3];

impl StreamEdge {
    pub async fn start(limits: Limits) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let main_cert = CertFiles::create(dir.path(), "main", "127.0.0.1")?;
        let alias3_cert = CertFiles::create(dir.path(), "alias3", "127.0.0.3")?;
        let tcp = |ip: [u8; 4]| TcpListener::bind(SocketAddr::from((ip, 0)));
        let main_udp_socket = UdpSocket::bind("127.0.0.1:0").await?;
        let (main_tcp_l, alias_tcp_l, alias_extra_l) =
            (tcp(MAIN_IP).await?, tcp(ALIAS_IP).await?, tcp(ALIAS_IP).await?);
        let (main_tls_l, alias3_tls_l, alias3_extra_l) =
            (tcp(MAIN_IP).await?, tcp(ALIAS3_IP).await?, tcp(ALIAS3_IP).await?);
        let grpc = TcpListener::bind("127.0.0.1:0").await?;
        let port = |l: &TcpListener| l.local_addr().map(|a| a.port());
        let config = DispatcherConfig::from_toml_str(&format!(
            r#"
            [dispatcher]
            id = "d-stream"
            tcp_message_timeout_secs = {message_timeout}
            tcp_idle_timeout_secs = {idle_timeout}
            max_connections_per_ip = {per_ip}
            max_connections = {total}
            max_outbound_connections = {outbound}
            tls_reload_secs = 1
            [dispatcher.main]
            ip = "127.0.0.1"
            domain = "sip.example.net"
            udp_port = {main_udp}
            tcp_port = {main_tcp}
            tls_port = {main_tls}
            tls_cert = {main_cert:?}
            tls_key = {main_key:?}
            [[dispatcher.aliases]]
            ip = "127.0.0.2"
            domain = "sip.example.net"
            realm = "{ALIAS_REALM}"
            transports = ["tcp"]
            tcp_port = {alias_tcp}
            extra_tcp_ports = [{alias_extra}]
            [[dispatcher.aliases]]
            ip = "127.0.0.3"
            domain = "sip.example.net"
            realm = "sip.another-old.example"
            transports = ["tls"]
            tls_port = {alias3_tls}
            extra_tls_ports = [{alias3_extra}]
            tls_cert = {alias3_cert:?}
            tls_key = {alias3_key:?}
            "#,
            message_timeout = limits.message_timeout_secs,
            idle_timeout = limits.idle_timeout_secs,
            per_ip = limits.per_ip,
            total = limits.total,
            outbound = limits.outbound,
            main_udp = main_udp_socket.local_addr()?.port(),
            main_tcp = port(&main_tcp_l)?,
            main_tls = port(&main_tls_l)?,
            main_cert = main_cert.cert,
            main_key = main_cert.key,
            alias_tcp = port(&alias_tcp_l)?,
            alias_extra = port(&alias_extra_l)?,
            alias3_tls = port(&alias3_tls_l)?,
            alias3_extra = port(&alias3_extra_l)?,
            alias3_cert = alias3_cert.cert,
            alias3_key = alias3_cert.key,
        ))?;
        let main_udp = main_udp_socket.local_addr()?;
        let main_tcp = main_tcp_l.local_addr()?;
        let main_tls = main_tls_l.local_addr()?;
        let alias_tcp = alias_tcp_l.local_addr()?;
        let alias_tcp_extra = alias_extra_l.local_addr()?;
        let alias3_tls = alias3_tls_l.local_addr()?;
        let alias3_tls_extra = alias3_extra_l.local_addr()?;
        let grpc_addr = grpc.local_addr()?;
        let listeners = Listeners {
            udp: vec![main_udp_socket],
            // Any order within a list.
            tcp: vec![alias_extra_l, main_tcp_l, alias_tcp_l],
            tls: vec![alias3_tls_l, main_tls_l, alias3_extra_l],
            grpc,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run_with(config, listeners, async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            main_udp,
            main_tcp,
            main_tls,
            alias_tcp,
            alias_tcp_extra,
            alias3_tls,
            alias3_tls_extra,
            grpc: grpc_addr,
            main_cert,
            alias3_cert,
            stop,
            task,
            _dir: dir,
        })
    }

    /// Stops the dispatcher and checks it shut down cleanly and promptly.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(());
        timeout(EVENT, self.task)
            .await
            .context("dispatcher did not stop")??
            .context("dispatcher failed")?;
        Ok(())
    }
}

/// One end of a TCP or TLS connection, as a phone: writes bytes, reads framed messages.
pub struct Conn<S> {
    pub io: S,
    buf: Vec<u8>,
}

pub type TlsConn = Conn<tokio_rustls::client::TlsStream<TcpStream>>;

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(io: S) -> Self {
        Self { io, buf: Vec::new() }
    }

    pub async fn send(&mut self, data: &[u8]) -> Result<()> {
        self.io.write_all(data).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// The next SIP message on the connection (framed by Content-Length).
    pub async fn recv(&mut self) -> Result<String> {
        timeout(EVENT, async {
            loop {
                if let Frame::Message(n) = frame(&self.buf, 1 << 20)? {
                    let msg = self.buf.drain(..n).collect::<Vec<u8>>();
                    return Ok(String::from_utf8_lossy(&msg).into_owned());
                }
                self.fill().await?;
            }
        })
        .await
        .context("no message received")?
    }

    /// Exactly `n` bytes.
    pub async fn recv_exact(&mut self, n: usize) -> Result<Vec<u8>> {
        timeout(EVENT, async {
            while self.buf.len() < n {
                self.fill().await?;
            }
            Ok(self.buf.drain(..n).collect())
        })
        .await
        .context("bytes not received")?
    }

    /// Waits until the other side closes the connection (end of stream or reset); returns
    /// what it sent before that and was not read yet.
    pub async fn closed(&mut self) -> Result<Vec<u8>> {
        timeout(EVENT, async {
            let mut chunk = [0u8; 4096];
            loop {
                match self.io.read(&mut chunk).await {
                    Ok(0) | Err(_) => return std::mem::take(&mut self.buf),
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .context("connection not closed")
    }

    async fn fill(&mut self) -> Result<()> {
        let mut chunk = [0u8; 4096];
        let n = self.io.read(&mut chunk).await?;
        ensure!(n > 0, "connection closed");
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// A TCP connection to `to` from `from_ip` (any port).
pub async fn tcp_connect(from_ip: [u8; 4], to: SocketAddr) -> Result<Conn<TcpStream>> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from_ip, 0)))?;
    let stream = socket.connect(to).await?;
    stream.set_nodelay(true)?;
    Ok(Conn::new(stream))
}

/// A TLS connection to `to` from 127.0.0.1, accepting any certificate; also returns the DER
/// of the certificate the server presented.
pub async fn tls_connect(to: SocketAddr) -> Result<(TlsConn, Vec<u8>)> {
    let tcp = TcpStream::connect(to).await?;
    let connector = tokio_rustls::TlsConnector::from(any_certificate_client());
    let name = ServerName::IpAddress(to.ip().into());
    let tls = timeout(EVENT, connector.connect(name, tcp)).await.context("tls handshake")??;
    let der = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .context("no peer certificate")?;
    Ok((Conn::new(tls), der))
}

fn any_certificate_client() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map(|b| {
            b.dangerous()
                .with_custom_certificate_verifier(Arc::new(
                    sipalias_dispatcher::AnyCertificate::new(),
                ))
                .with_no_client_auth()
        });
    match config {
        Ok(c) => Arc::new(c),
        Err(e) => panic!("test tls client: {e}"),
    }
}

/// An egress over a stream: from `local` (a listening socket), over `connection_id` if set.
pub fn stream_egress(
    local: SocketAddr,
    transport: Transport,
    to: SocketAddr,
    connection_id: u64,
) -> Egress {
    Egress {
        local_ip: local.ip().to_string(),
        local_port: u32::from(local.port()),
        transport: transport.into(),
        remote_ip: to.ip().to_string(),
        remote_port: u32::from(to.port()),
        connection_id,
    }
}

impl FakeProcessor {
    /// Sends a `Send` with every field chosen by the test.
    pub async fn send_full(
        &self,
        id: u64,
        egress: Egress,
        message: &str,
        flow_only: bool,
    ) -> Result<()> {
        let send =
            Send { id, egress: Some(egress), message: message.as_bytes().to_vec(), flow_only };
        self.tx.send(ProcessorMessage { kind: Some(PKind::Send(send)) }).await?;
        Ok(())
    }

    pub async fn next_closed(&mut self) -> Result<ConnectionClosed> {
        match self.next().await? {
            DKind::Closed(c) => Ok(c),
            other => bail!("expected a closed notice, got {other:?}"),
        }
    }
}

/// The ingress of an inbound message, checked to be over `transport` to `local`.
pub fn stream_ingress(
    inbound: &Inbound,
    local: SocketAddr,
    transport: Transport,
) -> Result<Ingress> {
    let ingress = inbound.ingress.clone().context("ingress missing")?;
    ensure!(ingress.transport() == transport, "transport {:?}", ingress.transport());
    ensure!(
        (ingress.local_ip.as_str(), ingress.local_port)
            == (local.ip().to_string().as_str(), u32::from(local.port())),
        "arrived on {}:{}, expected {local}",
        ingress.local_ip,
        ingress.local_port
    );
    ensure!(ingress.connection_id != 0, "stream messages carry a connection id");
    Ok(ingress)
}

/// The remote address in an ingress.
pub fn remote_of(ingress: &Ingress) -> Result<SocketAddr> {
    Ok(SocketAddr::new(ingress.remote_ip.parse()?, u16::try_from(ingress.remote_port)?))
}

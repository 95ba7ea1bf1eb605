//! TCP and TLS connections of a phone.
//!
//! A stream phone has a listener on its Contact address (the cluster opens a connection to it
//! when the phone's own one is gone) and any number of connections: the ones it opened to the
//! cluster and the ones the cluster opened to it. Each connection has a reader task on a
//! harness-wide tokio runtime that frames messages by Content-Length
//! ([`sipmsg::framing::frame`]) and reports them — and CRLF keepalives, accepted and closed
//! connections — as [`Event`]s in arrival order on one channel. The phone itself stays
//! synchronous: it waits on that channel with a timeout, and writes with `block_on`.
//!
//! Running the readers in the background means the arrival time of a message is when it
//! arrived, not when the test got round to reading it.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sipmsg::framing::{Frame, frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpSocket};
use tokio::runtime::Runtime;
use tokio::sync::watch;

use crate::tls;

/// Largest message a phone accepts on a stream (the dispatcher's default limit).
const MAX_MESSAGE: usize = 65_535;
/// How long connecting (TCP and TLS handshake) and one write may take.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// How a phone talks to the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Datagrams on one UDP socket.
    Udp,
    /// TCP connections, Content-Length framing.
    Tcp,
    /// TLS over TCP (TLS 1.2/1.3, ring provider), Content-Length framing.
    Tls,
}

impl Transport {
    /// The Via transport token: `UDP`, `TCP`, `TLS`.
    pub fn via_token(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        }
    }

    /// Whether messages travel on connections.
    pub fn is_stream(self) -> bool {
        self != Transport::Udp
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        })
    }
}

/// One TCP or TLS connection of a phone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Connection {
    /// Unique within the test process, in order of opening.
    pub id: u64,
    /// The phone's end: its IP and the connection's local port.
    pub local: SocketAddr,
    /// The cluster's end. For a connection the phone opened, the server socket it connected
    /// to; for one the cluster opened, its source address (the IP it was opened from).
    pub peer: SocketAddr,
    /// Whether the cluster opened it (accepted on the phone's listener).
    pub accepted: bool,
}

impl std::fmt::Display for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = if self.accepted { "accepted" } else { "opened" };
        write!(f, "connection #{} ({how}, {} <-> {})", self.id, self.local, self.peer)
    }
}

/// A CRLF keepalive the cluster sent on a connection: `\r\n\r\n` is a ping (RFC 5626 §3.5.1),
/// a single `\r\n` a pong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    /// The connection it came on.
    pub conn: Connection,
    /// How many CR/LF bytes came in a row.
    pub crlf: usize,
    /// When it arrived.
    pub at: Instant,
}

impl KeepAlive {
    /// A double CRLF (or more): a ping to answer with CRLF.
    pub fn is_ping(&self) -> bool {
        self.crlf >= 4
    }
}

/// What a connection's reader reports.
pub(crate) enum Event {
    /// The cluster opened a connection to the phone's listener.
    Accepted(Connection, Writer),
    /// A whole message.
    Message { conn: Connection, bytes: Vec<u8>, at: Instant },
    /// CR/LF bytes between messages.
    KeepAlive(KeepAlive),
    /// The connection is closed (by the cluster, by us, or it failed).
    Closed { conn: Connection, reason: String },
}

/// A connection's byte stream: TCP or TLS, client or server side.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The sending half of a connection.
pub(crate) type Writer = WriteHalf<Box<dyn Io>>;

/// The runtime every phone's connections run on.
fn runtime() -> Result<&'static Runtime> {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("phone-io")
        .enable_all()
        .build()
        .context("starting the phones' tokio runtime")?;
    // Another thread may have won the race: its runtime is used, ours dropped.
    let _ = RUNTIME.set(rt);
    RUNTIME.get().context("phone runtime vanished")
}

fn next_connection_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A phone's listener and connections.
pub(crate) struct Streams {
    transport: Transport,
    listen: SocketAddr,
    tls: Option<tokio_rustls::TlsConnector>,
    events: mpsc::Receiver<Event>,
    tx: mpsc::Sender<Event>,
    /// Stops the listener and every reader when the phone is dropped.
    stop: watch::Sender<bool>,
    writers: HashMap<u64, Writer>,
    /// Every connection, in order of opening or acceptance.
    conns: Vec<Connection>,
    /// Ids of the connections whose reader has not reported them closed.
    open: Vec<u64>,
    /// Why each closed connection closed.
    closed: HashMap<u64, String>,
    /// Accepted connections not yet claimed by [`Streams::take_accepted`].
    unclaimed_accepted: VecDeque<Connection>,
    /// Keepalives not yet claimed.
    keepalives: VecDeque<KeepAlive>,
    /// Certificate each TLS connection the phone opened was shown (DER).
    peer_certs: HashMap<u64, Vec<u8>>,
}

impl Streams {
    /// Starts listening on `ip` (ephemeral port) for `transport` (TCP or TLS; a TLS phone
    /// presents a self-signed certificate of its own).
    pub(crate) fn bind(transport: Transport, ip: IpAddr) -> Result<Self> {
        if !transport.is_stream() {
            bail!("{transport} is not a stream transport");
        }
        let rt = runtime()?;
        let std_listener = std::net::TcpListener::bind((ip, 0))
            .with_context(|| format!("binding a {transport} listener on {ip}"))?;
        std_listener.set_nonblocking(true)?;
        let listen = std_listener.local_addr()?;
        let listener = {
            let _guard = rt.enter();
            TcpListener::from_std(std_listener)?
        };
        let (tls, acceptor) = match transport {
            Transport::Tls => {
                let server = tls::self_signed_server_config(ip)?;
                (
                    Some(tokio_rustls::TlsConnector::from(tls::client_config()?)),
                    Some(tokio_rustls::TlsAcceptor::from(server)),
                )
            }
            _ => (None, None),
        };
        let (tx, events) = mpsc::channel();
        let (stop, _) = watch::channel(false);
        rt.spawn(accept_loop(listener, acceptor, tx.clone(), stop.subscribe()));
        Ok(Streams {
            transport,
            listen,
            tls,
            events,
            tx,
            stop,
            writers: HashMap::new(),
            conns: Vec::new(),
            open: Vec::new(),
            closed: HashMap::new(),
            unclaimed_accepted: VecDeque::new(),
            keepalives: VecDeque::new(),
            peer_certs: HashMap::new(),
        })
    }

    /// The listening address: the phone's Contact.
    pub(crate) fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Opens a connection from the phone's IP to `to` (TLS: with a handshake).
    pub(crate) fn connect(&mut self, to: SocketAddr) -> Result<Connection> {
        let rt = runtime()?;
        let from = SocketAddr::new(self.listen.ip(), 0);
        let tls = self.tls.clone();
        let (io, local, cert) = rt
            .block_on(async move {
                tokio::time::timeout(IO_TIMEOUT, async move {
                    let socket = TcpSocket::new_v4()?;
                    socket.bind(from)?;
                    let tcp = socket.connect(to).await?;
                    tcp.set_nodelay(true)?;
                    let local = tcp.local_addr()?;
                    match tls {
                        None => anyhow::Ok((Box::new(tcp) as Box<dyn Io>, local, None)),
                        Some(connector) => {
                            let s = connector.connect(tls::server_name(to.ip()), tcp).await?;
                            let cert = s
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|c| c.as_ref().to_vec());
                            Ok((Box::new(s) as Box<dyn Io>, local, cert))
                        }
                    }
                })
                .await
                .with_context(|| format!("connecting to {to} within {IO_TIMEOUT:?}"))?
            })
            .with_context(|| format!("{} connection to {to}", self.transport))?;
        let conn = Connection { id: next_connection_id(), local, peer: to, accepted: false };
        let (reader, writer) = tokio::io::split(io);
        rt.spawn(read_loop(conn, reader, self.tx.clone(), self.stop.subscribe()));
        self.add(conn, writer);
        if let Some(cert) = cert {
            self.peer_certs.insert(conn.id, cert);
        }
        Ok(conn)
    }

    fn add(&mut self, conn: Connection, writer: Writer) {
        self.writers.insert(conn.id, writer);
        self.conns.push(conn);
        self.open.push(conn.id);
    }

    /// Writes `bytes` whole on connection `id`.
    pub(crate) fn write(&mut self, id: u64, bytes: &[u8]) -> Result<()> {
        let rt = runtime()?;
        let writer = self
            .writers
            .get_mut(&id)
            .with_context(|| format!("connection #{id} is closed for writing"))?;
        rt.block_on(async {
            tokio::time::timeout(IO_TIMEOUT, async {
                writer.write_all(bytes).await?;
                writer.flush().await
            })
            .await
        })
        .with_context(|| format!("writing on connection #{id} within {IO_TIMEOUT:?}"))?
        .with_context(|| format!("writing on connection #{id}"))
    }

    /// Closes our side of connection `id` (TLS: close_notify, then FIN).
    pub(crate) fn shutdown(&mut self, id: u64) -> Result<()> {
        let rt = runtime()?;
        let mut writer = self
            .writers
            .remove(&id)
            .with_context(|| format!("connection #{id} is already closed for writing"))?;
        rt.block_on(async { tokio::time::timeout(IO_TIMEOUT, writer.shutdown()).await })
            .with_context(|| format!("closing connection #{id}"))??;
        Ok(())
    }

    /// The first open connection whose peer is `to`.
    pub(crate) fn open_to(&self, to: SocketAddr) -> Option<Connection> {
        self.conns
            .iter()
            .find(|c| c.peer == to && self.open.contains(&c.id) && self.writers.contains_key(&c.id))
            .copied()
    }

    /// Every connection so far.
    pub(crate) fn all(&self) -> &[Connection] {
        &self.conns
    }

    /// Whether connection `id` is still open (its reader has not seen it close).
    pub(crate) fn is_open(&self, id: u64) -> bool {
        self.open.contains(&id)
    }

    /// Why connection `id` closed, once it has.
    pub(crate) fn closed_reason(&self, id: u64) -> Option<&str> {
        self.closed.get(&id).map(String::as_str)
    }

    /// The certificate the server showed on connection `id` (TLS connections the phone opened).
    pub(crate) fn peer_certificate(&self, id: u64) -> Option<&[u8]> {
        self.peer_certs.get(&id).map(Vec::as_slice)
    }

    /// The next accepted connection not yet taken.
    pub(crate) fn take_accepted(&mut self) -> Option<Connection> {
        self.unclaimed_accepted.pop_front()
    }

    /// The next keepalive not yet taken.
    pub(crate) fn take_keepalive(&mut self) -> Option<KeepAlive> {
        self.keepalives.pop_front()
    }

    /// Waits up to `timeout` for the next event and records it; a message is returned to the
    /// caller (`log` names the phone in the output).
    pub(crate) fn poll(&mut self, timeout: Duration, log: &str) -> Polled {
        let Ok(event) = self.events.recv_timeout(timeout) else { return Polled::Nothing };
        match event {
            Event::Message { conn, bytes, at } => return Polled::Message(conn, bytes, at),
            Event::Accepted(conn, writer) => {
                eprintln!("[phone {log}] {conn} accepted");
                self.add(conn, writer);
                self.unclaimed_accepted.push_back(conn);
            }
            Event::KeepAlive(k) => {
                eprintln!("[phone {log}] << {} CRLF bytes on {}", k.crlf, k.conn);
                self.keepalives.push_back(k);
            }
            Event::Closed { conn, reason } => {
                eprintln!("[phone {log}] {conn} closed: {reason}");
                self.open.retain(|id| *id != conn.id);
                self.writers.remove(&conn.id);
                self.closed.insert(conn.id, reason);
            }
        }
        Polled::Other
    }
}

/// What [`Streams::poll`] found.
pub(crate) enum Polled {
    /// A message: its connection, bytes and arrival time.
    Message(Connection, Vec<u8>, Instant),
    /// Another event, now recorded.
    Other,
    /// Nothing within the timeout.
    Nothing,
}

impl Drop for Streams {
    fn drop(&mut self) {
        // Stops the listener and the readers; with the writers dropped here, every socket
        // of the phone closes.
        let _ = self.stop.send(true);
    }
}

/// Accepts the cluster's connections to the phone's listener until the phone is dropped.
async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    tx: mpsc::Sender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("[phone listener {:?}] accept failed: {e}", listener.local_addr());
                    continue;
                }
            },
        };
        let Ok(local) = tcp.local_addr() else { continue };
        let io: Box<dyn Io> = match &acceptor {
            None => Box::new(tcp),
            Some(acceptor) => match tokio::time::timeout(IO_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => Box::new(s),
                Ok(Err(e)) => {
                    eprintln!("[phone listener {local}] tls handshake from {peer} failed: {e}");
                    continue;
                }
                Err(_) => {
                    eprintln!("[phone listener {local}] tls handshake from {peer} timed out");
                    continue;
                }
            },
        };
        let conn = Connection { id: next_connection_id(), local, peer, accepted: true };
        let (reader, writer) = tokio::io::split(io);
        // Reported before its reader starts, so the phone knows the connection before any
        // message read on it.
        if tx.send(Event::Accepted(conn, writer)).is_err() {
            return;
        }
        tokio::spawn(read_loop(conn, reader, tx.clone(), stop.clone()));
    }
}

/// Reads and frames one connection until it closes or the phone is dropped.
async fn read_loop(
    conn: Connection,
    mut reader: ReadHalf<Box<dyn Io>>,
    tx: mpsc::Sender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let reason = loop {
        if let Err(reason) = drain_frames(conn, &mut buf, &tx) {
            break reason;
        }
        tokio::select! {
            _ = stop.changed() => return,
            read = reader.read(&mut chunk) => match read {
                Ok(0) if buf.is_empty() => break "closed by peer".to_owned(),
                Ok(0) => break format!("closed by peer with {} unframed bytes", buf.len()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => break format!("read failed: {e}"),
            },
        }
    };
    let _ = tx.send(Event::Closed { conn, reason });
}

/// Reports every whole message and keepalive at the front of `buf`, removing them.
fn drain_frames(
    conn: Connection,
    buf: &mut Vec<u8>,
    tx: &mpsc::Sender<Event>,
) -> Result<(), String> {
    loop {
        let at = Instant::now();
        let event = match frame(buf, MAX_MESSAGE) {
            Ok(Frame::Incomplete) => return Ok(()),
            Ok(Frame::KeepAlive(n)) => {
                buf.drain(..n);
                Event::KeepAlive(KeepAlive { conn, crlf: n, at })
            }
            Ok(Frame::Message(n)) => Event::Message { conn, bytes: buf.drain(..n).collect(), at },
            Err(e) => return Err(format!("the cluster sent something unframeable: {e}")),
        };
        if tx.send(event).is_err() {
            return Err("phone dropped".to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    //! Two stream phones' machinery against each other: no cluster needed.

    use super::*;

    const T: Duration = Duration::from_secs(5);

    type Msg = (Connection, Vec<u8>, Instant);

    fn poll_until<T>(
        s: &mut Streams,
        mut check: impl FnMut(&mut Streams, Option<Msg>) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("timed out");
            }
            let got = match s.poll(left, "test") {
                Polled::Message(c, b, at) => Some((c, b, at)),
                Polled::Other | Polled::Nothing => None,
            };
            if let Some(v) = check(s, got) {
                return Ok(v);
            }
        }
    }

    fn framing_and_closing(transport: Transport) -> Result<()> {
        let mut server = Streams::bind(transport, "127.0.0.9".parse()?)?;
        let mut client = Streams::bind(transport, "127.0.0.8".parse()?)?;
        let conn = client.connect(server.listen_addr())?;
        let msg = b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 3\r\n\r\nabc";
        // Two messages and a ping in one write, then one message in two writes.
        client.write(conn.id, &[&msg[..], msg, b"\r\n\r\n"].concat())?;
        client.write(conn.id, &msg[..10])?;
        client.write(conn.id, &msg[10..])?;
        let accepted = poll_until(&mut server, |s, _| s.take_accepted())?;
        assert!(accepted.accepted);
        assert_eq!(accepted.peer, conn.local);
        let mut got = Vec::new();
        let ping = poll_until(&mut server, |s, m| {
            got.extend(m);
            s.take_keepalive()
        })?;
        assert!(ping.is_ping() && ping.conn == accepted);
        poll_until(&mut server, |_, m| {
            got.extend(m);
            (got.len() == 3).then_some(())
        })?;
        for (c, bytes, _) in &got {
            assert_eq!(*c, accepted);
            assert_eq!(bytes.as_slice(), msg);
        }
        // The server answers on the accepted connection; the client closes, the server sees it.
        server.write(accepted.id, msg)?;
        let (c, bytes, _) = poll_until(&mut client, |_, m| m)?;
        assert_eq!((c, bytes.as_slice()), (conn, &msg[..]));
        assert_eq!(client.open_to(server.listen_addr()), Some(conn));
        client.shutdown(conn.id)?;
        poll_until(&mut server, |s, _| s.closed_reason(accepted.id).map(str::to_owned))?;
        assert!(!server.is_open(accepted.id));
        if transport == Transport::Tls {
            assert!(client.peer_certificate(conn.id).is_some());
        }
        Ok(())
    }

    #[test]
    fn tcp_messages_are_framed_whatever_the_segments_and_closing_is_seen() -> Result<()> {
        framing_and_closing(Transport::Tcp)
    }

    #[test]
    fn tls_messages_are_framed_whatever_the_segments_and_closing_is_seen() -> Result<()> {
        framing_and_closing(Transport::Tls)
    }

    #[test]
    fn keepalive_ping_and_pong_are_told_apart() {
        let k = |crlf| KeepAlive {
            conn: Connection {
                id: 1,
                local: SocketAddr::from(([127, 0, 0, 1], 1)),
                peer: SocketAddr::from(([127, 0, 0, 1], 2)),
                accepted: false,
            },
            crlf,
            at: Instant::now(),
        };
        assert!(k(4).is_ping());
        assert!(!k(2).is_ping());
    }
}

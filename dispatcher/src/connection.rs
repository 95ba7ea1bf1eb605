//! One TCP or TLS connection's I/O — the only code that reads or writes a stream.
//!
//! **Reading** is check-then-parse on a buffer ([`sipmsg::framing::frame`]): bytes are read
//! until the front of the buffer holds a whole message (by Content-Length, mandatory on
//! streams), which is then routed exactly like a UDP datagram ([`ingress`]). A double CRLF is a
//! keepalive ping answered with one CRLF (RFC 5626 §3.5.1). A message without Content-Length
//! is answered `400 Missing Content-Length`, one over `max_message_size` `513 Message Too
//! Large` — decided from its head, before its body is read — and the connection is closed.
//!
//! **Writing** is done by one writer, fed by the connection's queue: processor `Send`s and the
//! dispatcher's own answers (pong, `400`/`513`/`503`) each go out whole, never interleaved.
//!
//! **Timeouts**: nothing received for `tcp_idle_timeout_secs`, or a message begun but not
//! finished within `tcp_message_timeout_secs`, closes the connection; so does a write that
//! takes longer than the latter (the peer stopped reading).
//!
//! When the connection closes, for whatever reason, it leaves the table and every linked
//! processor is told (`ConnectionClosed`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use sipalias_proto::edge::dispatcher_message::Kind as DKind;
use sipalias_proto::edge::{ConnectionClosed, DispatcherMessage, Transport};
use sipmsg::framing::{Frame, frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, info, warn};

use crate::Context;
use crate::ingress::{self, Outcome};
use crate::wire::{Arrival, edge_error, transport_name};

/// One connection as the rest of the dispatcher sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnInfo {
    /// Dispatcher-unique, never 0.
    pub(crate) id: u64,
    /// The listening socket it belongs to (reported as the ingress local address).
    pub(crate) socket: SocketAddr,
    pub(crate) transport: Transport,
    /// The phone (or its NAT).
    pub(crate) remote: SocketAddr,
    /// Accepted (true) or opened by the dispatcher (false).
    pub(crate) inbound: bool,
}

impl ConnInfo {
    /// How the connection's messages arrive at [`ingress`].
    pub(crate) fn arrival(&self) -> Arrival {
        Arrival {
            local: self.socket,
            transport: self.transport,
            remote: self.remote,
            connection_id: self.id,
        }
    }

    /// `tcp` or `tls`, for log lines.
    pub(crate) fn kind(&self) -> &'static str {
        transport_name(self.transport)
    }
}

/// Bytes for a connection's writer, and who to tell if they cannot be written.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) bytes: Bytes,
    /// `None` for what the dispatcher sends on its own (pongs, `400`/`513`/`503`).
    pub(crate) origin: Option<Origin>,
}

/// The processor `Send` some queued bytes came from.
#[derive(Debug)]
pub(crate) struct Origin {
    pub(crate) processor: Arc<str>,
    pub(crate) send_id: u64,
    /// The connection the send named (0 for none).
    pub(crate) named: u64,
    /// Where the processor's `EdgeError` goes (its link).
    pub(crate) reply: mpsc::Sender<DispatcherMessage>,
}

impl Origin {
    /// Tells the processor its send failed after it was accepted (connect or write failure).
    pub(crate) fn fail(self, reason: &str, closed_connection_id: u64) {
        warn!(send_id = self.send_id, "send from processor {} failed: {reason}", self.processor);
        let _ =
            self.reply.try_send(edge_error(self.send_id, reason.to_owned(), closed_connection_id));
    }
}

/// Why a `Send` over a stream was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) reason: String,
    /// The connection the send named, when that connection is closed (0 otherwise).
    pub(crate) closed_connection_id: u64,
}

impl Refused {
    /// Refused for `reason`, naming no closed connection.
    pub(crate) fn because(reason: String) -> Self {
        Self { reason, closed_connection_id: 0 }
    }
}

/// A connection that has its id and table entry, handed to the task that runs it.
#[derive(Debug)]
pub(crate) struct Admitted {
    pub(crate) info: ConnInfo,
    pub(crate) rx: mpsc::Receiver<Outgoing>,
    pub(crate) tx: mpsc::Sender<Outgoing>,
    /// Turns true when its socket closes (removed by a SIGHUP and drained).
    pub(crate) closing: tokio::sync::watch::Receiver<bool>,
    pub(crate) entry: EntryGuard,
}

/// Removes a connection's table entry when dropped, so a task that ends early (or panics)
/// frees its slot. Removing it earlier, explicitly, is fine too.
#[derive(Debug)]
pub(crate) struct EntryGuard {
    pub(crate) ctx: Arc<Context>,
    id: u64,
}

impl EntryGuard {
    /// Guards the table entry of connection `id`.
    pub(crate) fn new(ctx: Arc<Context>, id: u64) -> Self {
        Self { ctx, id }
    }
}

impl Drop for EntryGuard {
    fn drop(&mut self) {
        self.ctx.streams.remove(self.id);
    }
}

/// How much is read at a time.
const READ_CHUNK: usize = 8192;
/// After refusing a message (`400`/`513`), the rest of what the peer sends is read and
/// discarded for this long before closing: closing with unread data would make the kernel
/// send a reset, which can destroy the answer before the peer reads it.
const LINGER: Duration = Duration::from_secs(1);
/// At most this much is discarded while lingering.
const LINGER_BYTES: u64 = 16 * 1024 * 1024;
/// A keepalive ping (RFC 5626 §3.5.1) and its pong.
const PING: &[u8] = b"\r\n\r\n";
const PONG: &[u8] = b"\r\n";
/// A lone CRLF is held this long in case it is the first half of a ping split across reads;
/// then it is dropped unanswered. The halves of a split ping arrive within a round trip, while
/// a phone's pongs to our pings (also lone CRLFs) come at least a keepalive interval (≥ 1 s)
/// apart, so two pongs are never mistaken for a ping.
const SPLIT_PING_GAP: Duration = Duration::from_millis(200);

/// Why the read side ended, and how to close.
#[derive(Debug)]
struct End {
    cause: String,
    /// Write out what is queued (e.g. a `400`) before closing.
    flush: bool,
    /// Then read and discard what the peer still sends, for [`LINGER`].
    linger: bool,
}

impl End {
    fn abrupt(cause: String) -> Self {
        Self { cause, flush: false, linger: false }
    }
}

/// Runs an established connection until it closes.
pub(crate) async fn run<S>(admitted: Admitted, stream: S)
where
    S: AsyncRead + AsyncWrite + Send + Unpin,
{
    let Admitted { info, mut rx, tx, mut closing, entry } = admitted;
    let ctx = std::sync::Arc::clone(&entry.ctx);
    let write_limit = ctx.streams.limits.message_timeout;
    let (mut rd, mut wr) = tokio::io::split(stream);

    let mut writer = Box::pin(write_loop(&mut wr, &mut rx, info, write_limit));
    let mut reader = Box::pin(read_loop(&ctx, info, &mut rd, &tx));
    let mut stop = ctx.stop.clone();
    let end = tokio::select! {
        end = &mut reader => end,
        failed = &mut writer => End::abrupt(match failed {
            Err(why) => why,
            Ok(()) => "write queue closed".to_owned(),
        }),
        () = crate::stopped(&mut stop) => End::abrupt("dispatcher shutting down".to_owned()),
        () = crate::stopped(&mut closing) => End::abrupt(format!(
            "socket {} removed from the configuration and drained",
            info.socket
        )),
    };
    drop(reader);
    // From here no `Send` reaches this connection; the writer ends once the queue is drained.
    ctx.streams.remove(info.id);
    drop(tx);
    if end.flush {
        let _ = timeout(write_limit, &mut writer).await;
    }
    drop(writer);
    // Whatever is still queued was not written.
    rx.close();
    while let Ok(out) = rx.try_recv() {
        if let Some(origin) = out.origin {
            origin.fail(&format!("connection {} closed: {}", info.id, end.cause), info.id);
        }
    }
    info!(
        peer = %info.remote,
        socket = %info.socket,
        "sip {} connection {} closed: {}",
        info.kind(),
        info.id,
        end.cause
    );
    notify_closed(&ctx, &info);
    if end.linger {
        let mut rest = (&mut rd).take(LINGER_BYTES);
        let _ = timeout(LINGER, tokio::io::copy(&mut rest, &mut tokio::io::sink())).await;
    }
    drop(entry);
}

/// Tells every linked processor that `info` is gone, so flows over it can be marked failed.
fn notify_closed(ctx: &Context, info: &ConnInfo) {
    let notice = DispatcherMessage {
        kind: Some(DKind::Closed(ConnectionClosed {
            connection_id: info.id,
            local_ip: info.socket.ip().to_string(),
            local_port: u32::from(info.socket.port()),
            remote_ip: info.remote.ip().to_string(),
            remote_port: u32::from(info.remote.port()),
        })),
    };
    let missed = ctx.router.members.broadcast(&notice);
    if missed > 0 {
        debug!(connection_id = info.id, "closed notice not queued for {missed} busy processor(s)");
    }
}

/// Writes queued messages one by one. Ends `Ok` when the queue is closed and drained (after
/// shutting the write side down), or with the cause when a write fails.
async fn write_loop<W>(
    wr: &mut W,
    rx: &mut mpsc::Receiver<Outgoing>,
    info: ConnInfo,
    limit: Duration,
) -> Result<(), String>
where
    W: AsyncWrite + Unpin,
{
    while let Some(out) = rx.recv().await {
        let more = !rx.is_empty();
        let written = timeout(limit, async {
            wr.write_all(&out.bytes).await?;
            if !more {
                // TLS keeps records in its buffer until flushed.
                wr.flush().await?;
            }
            Ok::<(), io::Error>(())
        })
        .await;
        let why = match written {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => format!("write failed: {e}"),
            Err(_) => format!("write not completed within {} s", limit.as_secs()),
        };
        if let Some(origin) = out.origin {
            origin.fail(&format!("connection {}: {why}", info.id), info.id);
        }
        return Err(why);
    }
    let _ = timeout(limit, wr.shutdown()).await;
    Ok(())
}

/// Reads, frames and routes messages until the connection must close.
async fn read_loop<R>(ctx: &Context, info: ConnInfo, rd: &mut R, tx: &mpsc::Sender<Outgoing>) -> End
where
    R: AsyncRead + Unpin,
{
    let limits = &ctx.streams.limits;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    // Up to where the buffer is known to hold no end of head, so a message trickled in byte
    // by byte is not searched from the start after every byte.
    let mut searched = 0;
    let mut idle_deadline = Instant::now() + limits.idle_timeout;
    let mut message_deadline: Option<Instant> = None;
    let mut held_crlf_deadline: Option<Instant> = None;
    loop {
        let mut consumed = false;
        loop {
            if !head_may_be_complete(&buf, &mut searched, limits.max_message_size) {
                break;
            }
            match frame(&buf, limits.max_message_size) {
                Ok(Frame::Incomplete) => break,
                Ok(Frame::KeepAlive(n)) => {
                    let is_ping = buf[..n].windows(PING.len()).any(|w| w == PING);
                    if !is_ping && n == buf.len() && n < PING.len() {
                        // Perhaps the first half of a ping; wait (briefly) for what follows.
                        break;
                    }
                    if is_ping && !answer(tx, Bytes::from_static(PONG)).await {
                        return End::abrupt("write queue closed".to_owned());
                    }
                    buf.advance(n);
                }
                Ok(Frame::Message(n)) => {
                    let message = buf.split_to(n);
                    match ingress::handle(&ctx.router, info.arrival(), &message) {
                        Outcome::Routed | Outcome::Dropped => {}
                        Outcome::Answer(reply) => {
                            if !answer(tx, Bytes::from(reply)).await {
                                return End::abrupt("write queue closed".to_owned());
                            }
                        }
                        Outcome::NotSip(why) => {
                            return End::abrupt(format!("not SIP ({why:?})"));
                        }
                    }
                }
                Err(e) => {
                    let refusal = refusal(&buf, &e);
                    let cause = match &refusal {
                        Some((status, _)) => format!("{e} (answered {status})"),
                        None => e.to_string(),
                    };
                    if let Some((_, bytes)) = refusal {
                        answer(tx, Bytes::from(bytes)).await;
                    }
                    return End { cause, flush: true, linger: true };
                }
            }
            consumed = true;
            searched = 0;
        }

        // A message has begun when the buffer holds more than (half) a keepalive.
        let pending = buf.first().is_some_and(|b| *b != b'\r' && *b != b'\n');
        if !pending {
            message_deadline = None;
        } else if consumed || message_deadline.is_none() {
            message_deadline = Some(Instant::now() + limits.message_timeout);
        }
        if pending || buf.is_empty() {
            held_crlf_deadline = None;
        } else if held_crlf_deadline.is_none() {
            held_crlf_deadline = Some(Instant::now() + SPLIT_PING_GAP);
        }
        let deadline = [message_deadline, held_crlf_deadline]
            .into_iter()
            .flatten()
            .fold(idle_deadline, Instant::min);

        buf.reserve(READ_CHUNK);
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => return End { cause: "closed by peer".to_owned(), flush: true, linger: false },
                Ok(_) => idle_deadline = Instant::now() + limits.idle_timeout,
                Err(e) => return End::abrupt(format!("read failed: {e}")),
            },
            () = sleep_until(deadline) => {
                if held_crlf_deadline.is_some_and(|d| d <= Instant::now()) {
                    // Not half a ping after all (a pong, or stray CRLF between messages).
                    buf.clear();
                    held_crlf_deadline = None;
                    continue;
                }
                let cause = if message_deadline.is_some_and(|d| d <= idle_deadline) {
                    format!("message not completed within {} s", limits.message_timeout.as_secs())
                } else {
                    format!("idle for {} s", limits.idle_timeout.as_secs())
                };
                return End::abrupt(cause);
            }
        }
    }
}

/// Queues one of the dispatcher's own answers; false if the connection is closing.
async fn answer(tx: &mpsc::Sender<Outgoing>, bytes: Bytes) -> bool {
    tx.send(Outgoing { bytes, origin: None }).await.is_ok()
}

/// Whether framing the buffer can give anything but "incomplete": a keepalive at the front,
/// an end of head somewhere, or more bytes than any message may have.
fn head_may_be_complete(buf: &[u8], searched: &mut usize, limit: usize) -> bool {
    if buf.first().is_some_and(|b| *b == b'\r' || *b == b'\n') || buf.len() > limit {
        return true;
    }
    // An end of head may straddle the old and new bytes.
    let from = searched.saturating_sub(PING.len() - 1);
    if memchr::memmem::find(&buf[from..], PING).is_some() {
        return true;
    }
    *searched = buf.len();
    false
}

/// The answer to a message that cannot be framed, if its head parses well enough to answer
/// (a request other than ACK): `400 Missing Content-Length`, `400 Bad Content-Length` or
/// `513 Message Too Large`. Returns the status and the bytes.
fn refusal(buf: &[u8], err: &sipmsg::Error) -> Option<(u16, Vec<u8>)> {
    let (status, reason) = match err {
        sipmsg::Error::TooLarge { .. } => (513, "Message Too Large"),
        sipmsg::Error::Missing(_) => (400, "Missing Content-Length"),
        sipmsg::Error::BadHeader { .. } => (400, "Bad Content-Length"),
        _ => (400, "Bad Request"),
    };
    let head_end = memchr::memmem::find(buf, PING)?;
    // The head without its Content-Length, so that it parses with no body.
    let mut head = Vec::with_capacity(head_end + PING.len());
    for line in buf[..head_end].split(|b| *b == b'\n') {
        let name = line.split(|b| *b == b':').next().unwrap_or_default().trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") || name.eq_ignore_ascii_case(b"l") {
            continue;
        }
        head.extend_from_slice(line.strip_suffix(b"\r").unwrap_or(line));
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let req = sipmsg::parse(&head).ok()?;
    let resp = ingress::stateless_response(&req, status, reason)?;
    Some((status, resp.to_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "INVITE sip:bob@example.net SIP/2.0\r\nVia: SIP/2.0/TCP 10.0.0.1:5060;branch=z9hG4bKx1\r\nFrom: <sip:a@example.net>;tag=1\r\nTo: <sip:bob@example.net>\r\nCall-ID: big-1\r\nCSeq: 1 INVITE\r\n";

    fn status_line(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).lines().next().unwrap_or_default().to_owned()
    }

    #[test]
    fn too_large_is_answered_513_from_the_head_alone() {
        let buf = format!("{HEAD}Content-Length: 10000000\r\n\r\nv=0\r\n");
        let Err(e) = frame(buf.as_bytes(), 65_535) else { panic!("framed") };
        let Some((status, bytes)) = refusal(buf.as_bytes(), &e) else { panic!("no answer") };
        assert_eq!(status, 513);
        assert_eq!(status_line(&bytes), "SIP/2.0 513 Message Too Large");
        let Ok(resp) = sipmsg::parse(&bytes) else { panic!("unparsable") };
        assert_eq!(resp.header("call-id"), Some("big-1"));
        assert_eq!(resp.header("content-length"), Some("0"));
    }

    #[test]
    fn missing_length_is_answered_400() {
        let buf = format!("{HEAD}\r\n");
        let Err(e) = frame(buf.as_bytes(), 65_535) else { panic!("framed") };
        let Some((status, bytes)) = refusal(buf.as_bytes(), &e) else { panic!("no answer") };
        assert_eq!(status, 400);
        assert_eq!(status_line(&bytes), "SIP/2.0 400 Missing Content-Length");
    }

    #[test]
    fn responses_acks_and_headless_junk_are_not_answered() {
        let ack =
            format!("{HEAD}\r\n").replace("INVITE sip", "ACK sip").replace("1 INVITE", "1 ACK");
        let e = sipmsg::Error::Missing("Content-Length");
        assert_eq!(refusal(ack.as_bytes(), &e), None);
        let resp = "SIP/2.0 200 OK\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:b@b>;tag=2\r\n\r\n";
        assert_eq!(refusal(resp.as_bytes(), &e), None);
        assert_eq!(refusal(&[b'A'; 100], &sipmsg::Error::TooLarge { limit: 10 }), None);
    }

    #[test]
    fn head_search_resumes_where_it_stopped() {
        let mut searched = 0;
        let msg = b"OPTIONS sip:a SIP/2.0\r\nl: 0\r\n\r\n";
        for cut in 1..msg.len() {
            assert!(!head_may_be_complete(&msg[..cut], &mut searched, 1000), "cut {cut}");
            assert_eq!(searched, cut);
        }
        assert!(head_may_be_complete(msg, &mut searched, 1000));
        assert!(head_may_be_complete(b"\r\n", &mut 0, 1000), "keepalive at the front");
        assert!(head_may_be_complete(&[b'A'; 11], &mut 0, 10), "over the limit");
    }
}

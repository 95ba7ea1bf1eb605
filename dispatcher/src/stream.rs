//! SIP over TCP and TLS: the listeners, the table of open connections, and connections the
//! dispatcher opens to phones.
//!
//! Every connection, accepted or opened, gets a dispatcher-unique non-zero id and an entry in
//! the table until it closes. The entry holds the sending side of the connection's write
//! queue: a `Send` naming the id is queued there, and the connection's single writer puts the
//! messages on the wire one after another (see [`connection`](crate::connection), which owns
//! the connection's I/O).
//!
//! A connection belongs to one of the dispatcher's listening sockets (its *socket*): the one it
//! was accepted on, or, for a connection the dispatcher opened, the one named in the `Send`
//! that opened it. Such a connection is opened **from that socket's IP** (bound to `ip:0`
//! before connecting), so a phone registered through an alias hears from the alias IP.
//!
//! Limits: `max_connections` accepted, `max_connections_per_ip` accepted from one source IP, and
//! `max_outbound_connections` opened by the dispatcher (a budget of their own, so connections
//! toward phones cannot lock real phones out). An accepted connection over a limit, or from a
//! banned source, is closed as soon as it is accepted; a send that would open one over the
//! outbound budget is refused.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sipalias_proto::edge::Transport;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{info, warn};

use crate::Context;
use crate::config::StreamLimits;
use crate::connection::{self, Admitted, ConnInfo, EntryGuard, Outgoing, Refused};
use crate::tls;
use crate::wire::transport_name;

/// Messages queued for one connection's writer before a `Send` to it is refused.
const WRITE_QUEUE: usize = 128;
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one "connection refused" warning per this interval; the rest are counted.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Everything about TCP and TLS the dispatcher shares between tasks.
#[derive(Debug)]
pub(crate) struct Streams {
    pub(crate) limits: StreamLimits,
    pub(crate) tls: tls::Servers,
    /// Client side of connections the dispatcher opens over TLS.
    client: Arc<rustls::ClientConfig>,
    table: Mutex<Table>,
    /// Top 16 bits of every connection id: a hash of the dispatcher id (never 0).
    id_prefix: u64,
    /// Low 48 bits of the next connection id.
    next_id: AtomicU64,
    refusals: RefusalLog,
}

/// Connection ids are `prefix << 48 | counter`, the counter taken modulo 2^48.
const ID_COUNTER_BITS: u32 = 48;
const ID_COUNTER_MASK: u64 = (1 << ID_COUNTER_BITS) - 1;

/// The top 16 bits of the connection ids of dispatcher `dispatcher_id`: a stable hash of its
/// id, never 0 (so no id is 0).
fn id_prefix(dispatcher_id: &str) -> u64 {
    (crate::route::weight(dispatcher_id, "connection-ids") >> ID_COUNTER_BITS).max(1)
}

#[derive(Debug, Default)]
struct Table {
    by_id: HashMap<u64, Entry>,
    /// Accepted connections per source IP.
    per_ip: HashMap<IpAddr, usize>,
    /// Connections the dispatcher opened (the rest of `by_id` were accepted).
    outbound: usize,
}

#[derive(Debug)]
struct Entry {
    info: ConnInfo,
    tx: mpsc::Sender<Outgoing>,
}

impl Streams {
    pub(crate) fn new(
        dispatcher_id: &str,
        limits: StreamLimits,
        tls: tls::Servers,
        client: Arc<rustls::ClientConfig>,
    ) -> Self {
        Self {
            limits,
            tls,
            client,
            table: Mutex::default(),
            // The counter starts at the current time in microseconds, so a restarted dispatcher
            // does not hand out an id that a processor may still hold for a connection of the
            // previous run (bindings in Redis keep connection ids); the prefix keeps the two
            // dispatchers of a pair apart, so a send meant for a connection of one that reaches
            // the other after a failover finds no connection (and fails) instead of another
            // phone's.
            id_prefix: id_prefix(dispatcher_id) << ID_COUNTER_BITS,
            next_id: AtomicU64::new(crate::clock::unix_ms().saturating_mul(1000)),
            refusals: RefusalLog::default(),
        }
    }

    /// Gives a new connection its id and table entry, or refuses it over a limit.
    fn admit(
        &self,
        table: &mut Table,
        ctx: &Arc<Context>,
        socket: SocketAddr,
        transport: Transport,
        remote: SocketAddr,
        inbound: bool,
    ) -> Result<Admitted, String> {
        // Watched by the connection: the socket closing (drained after a SIGHUP) ends it.
        let Some(closing) = ctx.sockets.closing(socket) else {
            return Err(format!("socket {socket} is closed"));
        };
        let accepted = table.by_id.len() - table.outbound;
        if inbound && accepted >= self.limits.max_connections {
            return Err(format!(
                "{accepted} accepted connections open (max_connections {})",
                self.limits.max_connections
            ));
        }
        if !inbound && table.outbound >= self.limits.max_outbound_connections {
            return Err(format!(
                "{} outbound connections open (max_outbound_connections {})",
                table.outbound, self.limits.max_outbound_connections
            ));
        }
        if !inbound {
            table.outbound += 1;
        }
        if inbound {
            let from_ip = table.per_ip.get(&remote.ip()).copied().unwrap_or(0);
            if from_ip >= self.limits.max_connections_per_ip {
                return Err(format!(
                    "{from_ip} connections from {} (max_connections_per_ip {})",
                    remote.ip(),
                    self.limits.max_connections_per_ip
                ));
            }
            *table.per_ip.entry(remote.ip()).or_default() += 1;
        }
        let id = self.id_prefix | (self.next_id.fetch_add(1, Ordering::Relaxed) & ID_COUNTER_MASK);
        let info = ConnInfo { id, socket, transport, remote, inbound };
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        table.by_id.insert(id, Entry { info, tx: tx.clone() });
        Ok(Admitted { info, rx, tx, closing, entry: EntryGuard::new(Arc::clone(ctx), id) })
    }

    /// Connections open now: (accepted from phones, opened toward phones).
    pub(crate) fn connections(&self) -> (usize, usize) {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        (table.by_id.len() - table.outbound, table.outbound)
    }

    /// Connections open now on one socket (accepted on it or opened from it).
    pub(crate) fn connections_on(&self, socket: SocketAddr, transport: Transport) -> usize {
        let table = self.table();
        table
            .by_id
            .values()
            .filter(|e| e.info.socket == socket && e.info.transport == transport)
            .count()
    }

    /// Removes a connection from the table (no more `Send`s reach it). Returns whether it was
    /// still there.
    pub(crate) fn remove(&self, id: u64) -> bool {
        let mut table = self.table();
        let Some(entry) = table.by_id.remove(&id) else { return false };
        if !entry.info.inbound {
            table.outbound = table.outbound.saturating_sub(1);
        }
        if entry.info.inbound {
            let ip = entry.info.remote.ip();
            if let Some(n) = table.per_ip.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    table.per_ip.remove(&ip);
                }
            }
        }
        true
    }

    // Every update is a few map operations that cannot panic half-way, so a poisoned lock is
    // still consistent.
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Puts `out` on a connection for a processor's `Send` from `socket` over `transport` to
/// `remote`:
///
/// 1. connection `named` if it is open (and belongs to `socket`);
/// 2. else, if `flow_only`, nothing: the send is refused, naming the closed connection;
/// 3. else an open connection of `socket` to `remote` (RFC 3261 §18.1.1 reuse);
/// 4. else a new connection from `socket`'s IP to `remote`, opened in the background; the
///    message waits in its queue, and a failure to connect is reported to the processor.
pub(crate) fn send(
    ctx: &Arc<Context>,
    socket: SocketAddr,
    transport: Transport,
    remote: SocketAddr,
    named: u64,
    flow_only: bool,
    out: Outgoing,
) -> Result<(), Refused> {
    let streams = &ctx.streams;
    let kind = transport_name(transport);
    let mut table = streams.table();
    if named != 0
        && let Some(entry) = table.by_id.get(&named)
        && !entry.tx.is_closed()
    {
        if entry.info.socket != socket || entry.info.transport != transport {
            return Err(Refused::because(format!(
                "connection {named} belongs to {}/{}, not {socket}/{kind}",
                entry.info.socket,
                entry.info.kind()
            )));
        }
        return queue(&entry.tx, named, out);
    }
    if flow_only {
        return Err(if named == 0 {
            Refused::because("flow_only send names no connection (connection_id 0)".to_owned())
        } else {
            Refused { reason: format!("connection {named} is closed"), closed_connection_id: named }
        });
    }
    if let Some(entry) = table.by_id.values().find(|e| {
        e.info.socket == socket
            && e.info.transport == transport
            && e.info.remote == remote
            && !e.tx.is_closed()
    }) {
        return queue(&entry.tx, entry.info.id, out);
    }
    let admitted = streams
        .admit(&mut table, ctx, socket, transport, remote, false)
        .map_err(|why| Refused::because(format!("cannot open a {kind} connection: {why}")))?;
    // The new queue is empty, so this cannot fail.
    let _ = admitted.tx.try_send(out);
    // Released before anything can drop `admitted` (whose drop takes the lock).
    drop(table);
    tokio::spawn(connect(admitted));
    Ok(())
}

fn queue(tx: &mpsc::Sender<Outgoing>, id: u64, out: Outgoing) -> Result<(), Refused> {
    tx.try_send(out).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => {
            Refused::because(format!("connection {id}: write queue full ({WRITE_QUEUE} messages)"))
        }
        mpsc::error::TrySendError::Closed(_) => {
            Refused { reason: format!("connection {id} is closed"), closed_connection_id: id }
        }
    })
}

/// Accepts connections on one listening socket until `stop` (the socket drains or closes, or
/// the dispatcher stops); the listener is closed on return.
pub(crate) async fn serve(
    ctx: Arc<Context>,
    listener: TcpListener,
    socket: SocketAddr,
    transport: Transport,
    mut stop: watch::Receiver<bool>,
) {
    let kind = transport_name(transport);
    info!("sip {kind} listening on {socket}");
    loop {
        let (tcp, peer) = tokio::select! {
            () = crate::stopped(&mut stop) => {
                tracing::debug!("sip {kind} socket {socket} accepts no more connections");
                return;
            }
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors or memory, or an aborted handshake: the listener
                    // itself is fine; back off briefly so a persistent error does not spin.
                    warn!(%socket, "sip {kind} accept error: {e}");
                    tokio::select! {
                        () = crate::stopped(&mut stop) => return,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
            },
        };
        let admitted = if ctx.router.guard.banned(peer.ip(), Instant::now()) {
            Err(format!("{} is banned", peer.ip()))
        } else {
            let mut table = ctx.streams.table();
            ctx.streams.admit(&mut table, &ctx, socket, transport, peer, true)
        };
        match admitted {
            Ok(admitted) => {
                tokio::spawn(accepted(admitted, tcp));
            }
            Err(why) => {
                // A reset rather than a FIN: nothing lingers in TIME_WAIT during a flood.
                let _ = tcp.set_zero_linger();
                drop(tcp);
                ctx.streams.refusals.refused(kind, socket, peer, &why);
            }
        }
    }
}

/// Runs an accepted connection: the TLS handshake if any, then its I/O until it closes.
async fn accepted(admitted: Admitted, tcp: TcpStream) {
    let ctx = Arc::clone(&admitted.entry.ctx);
    let info = admitted.info;
    let _ = tcp.set_nodelay(true);
    if info.transport != Transport::Tls {
        info!("sip tcp connection {} accepted from {} on {}", info.id, info.remote, info.socket);
        connection::run(admitted, tcp).await;
        return;
    }
    let Some(config) = ctx.streams.tls.config_for(info.socket.ip()) else {
        warn!(%info.socket, "sip tls connection from {} dropped: no certificate for this IP", info.remote);
        return;
    };
    let limit = ctx.streams.limits.message_timeout;
    match timeout(limit, TlsAcceptor::from(config).accept(tcp)).await {
        Ok(Ok(stream)) => {
            info!(
                "sip tls connection {} accepted from {} on {}",
                info.id, info.remote, info.socket
            );
            connection::run(admitted, stream).await;
        }
        Ok(Err(e)) => {
            info!("sip tls handshake from {} on {} failed: {e}", info.remote, info.socket);
        }
        Err(_) => info!(
            "sip tls handshake from {} on {} failed: not completed within {} s",
            info.remote,
            info.socket,
            limit.as_secs()
        ),
    }
}

/// Opens a connection the dispatcher needs for a `Send`, then runs it. If it cannot be opened,
/// every send waiting for it fails, naming the (closed) connection it had named, if any.
async fn connect(admitted: Admitted) {
    let ctx = Arc::clone(&admitted.entry.ctx);
    let info = admitted.info;
    let limit = ctx.streams.limits.message_timeout;
    let opened = timeout(limit, open_tcp(info.socket.ip(), info.remote)).await;
    let why = match opened {
        Ok(Ok(tcp)) if info.transport == Transport::Tls => {
            let name = tls::server_name(info.remote.ip());
            let connector = TlsConnector::from(Arc::clone(&ctx.streams.client));
            match timeout(limit, connector.connect(name, tcp)).await {
                Ok(Ok(stream)) => {
                    opened_log(&info);
                    connection::run(admitted, stream).await;
                    return;
                }
                Ok(Err(e)) => format!("tls handshake failed: {e}"),
                Err(_) => format!("tls handshake not completed within {} s", limit.as_secs()),
            }
        }
        Ok(Ok(tcp)) => {
            opened_log(&info);
            connection::run(admitted, tcp).await;
            return;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("not connected within {} s", limit.as_secs()),
    };
    let reason = format!(
        "cannot open a {} connection from {} to {}: {why}",
        info.kind(),
        info.socket.ip(),
        info.remote
    );
    warn!("sip {} connection {}: {reason}", info.kind(), info.id);
    let Admitted { mut rx, entry, .. } = admitted;
    drop(entry);
    rx.close();
    while let Ok(out) = rx.try_recv() {
        if let Some(origin) = out.origin {
            let named = origin.named;
            origin.fail(&reason, named);
        }
    }
}

fn opened_log(info: &ConnInfo) {
    info!(
        "sip {} connection {} opened from {} to {} (for {})",
        info.kind(),
        info.id,
        info.socket.ip(),
        info.remote,
        info.socket
    );
}

/// A TCP connection from `local_ip` (any free port) to `remote`.
async fn open_tcp(local_ip: IpAddr, remote: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if local_ip.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // Bind before connect: the phone must see the alias IP as the source, whatever the route.
    socket.bind(SocketAddr::new(local_ip, 0))?;
    let tcp = socket.connect(remote).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Warnings about refused connections, at most one per [`REFUSAL_LOG_INTERVAL`], so a flood
/// does not also flood the log.
#[derive(Debug, Default)]
struct RefusalLog {
    state: Mutex<RefusalState>,
}

#[derive(Debug, Default)]
struct RefusalState {
    last: Option<Instant>,
    suppressed: u64,
}

impl RefusalLog {
    fn refused(&self, kind: &str, socket: SocketAddr, peer: SocketAddr, why: &str) {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if state.last.is_some_and(|t| now.duration_since(t) < REFUSAL_LOG_INTERVAL) {
            state.suppressed += 1;
            return;
        }
        let more = std::mem::take(&mut state.suppressed);
        state.last = Some(now);
        drop(state);
        if more > 0 {
            warn!(%socket, %peer, "sip {kind} connection from {peer} refused: {why} ({more} more refused since the last warning)");
        } else {
            warn!(%socket, %peer, "sip {kind} connection from {peer} refused: {why}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ids_of_two_dispatchers_differ_in_their_prefix() {
        let ids = ["d1", "d2", "d-a", "d-b", "dispatcher-1", "dispatcher-2", "edge1", "edge2"];
        let prefixes: std::collections::HashSet<u64> = ids.iter().map(|i| id_prefix(i)).collect();
        assert_eq!(prefixes.len(), ids.len(), "usual names of a pair do not collide");
        assert!(prefixes.iter().all(|p| (1..=0xffff).contains(p)));
        assert_eq!(id_prefix("d1"), id_prefix("d1"), "stable");
    }
}

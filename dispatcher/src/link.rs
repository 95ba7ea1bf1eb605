//! The edge link: the gRPC `Edge` service processors dial in to, and the membership table of
//! the processors currently linked.
//!
//! A processor opens one `Link` stream and says `Hello`; it is answered with `Welcome` (this
//! dispatcher's id and socket table) and from then on is a routing target until its stream
//! ends. Everything it sends afterwards is a `Send` (put these bytes on the wire from that
//! local socket) or a `Heartbeat`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use sipalias_proto::edge::dispatcher_message::Kind as DKind;
use sipalias_proto::edge::edge_server::Edge;
use sipalias_proto::edge::processor_message::Kind as PKind;
use sipalias_proto::edge::{
    DispatcherMessage, EdgeError, Heartbeat, ProcessorMessage, Send as SendMsg, Welcome,
};
use sipmsg::scan::{Scan, is_valid_node_id};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::Context;
use crate::egress;
use crate::route;

/// The processors currently linked to this dispatcher, by node id.
///
/// The UDP receive loops read it for every datagram (a read lock, never held across an
/// `.await`); links write it when a processor joins, leaves or sends a heartbeat.
#[derive(Debug, Default)]
pub struct Membership {
    inner: RwLock<Members>,
}

#[derive(Debug, Default)]
struct Members {
    by_id: HashMap<Arc<str>, Member>,
    /// The keys of `by_id`, kept as a slice for [`route::pick`].
    ids: Vec<Arc<str>>,
    /// Source of session numbers, so a stale link never removes its replacement.
    next_session: u64,
}

#[derive(Debug)]
struct Member {
    session: u64,
    tx: mpsc::Sender<DispatcherMessage>,
    capacity: u32,
    connected_at: Instant,
    last_seen: Instant,
    transactions: u32,
    dialogs: u32,
    /// Dropped when this entry is replaced or removed, which ends the link that owns it.
    _kick: oneshot::Sender<()>,
}

/// What one processor last told us about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessorStatus {
    /// Node id from its `Hello`.
    pub id: String,
    /// Capacity from its `Hello` (informational).
    pub capacity: u32,
    /// When its link was accepted.
    pub connected_at: Instant,
    /// When it last sent a heartbeat (or connected, if it has not yet).
    pub last_seen: Instant,
    /// Transactions it held at its last heartbeat.
    pub transactions: u32,
    /// Dialogs it held at its last heartbeat.
    pub dialogs: u32,
}

/// Result of handing a message to the processor chosen by [`route::pick`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Queued for this processor.
    Queued(Arc<str>),
    /// This processor owns the message but cannot take it now (queue full, or its link is
    /// closing).
    Busy(Arc<str>),
    /// No processor is linked.
    NoProcessor,
}

impl Membership {
    /// A snapshot of every linked processor, sorted by id.
    pub fn status(&self) -> Vec<ProcessorStatus> {
        let members = self.read();
        let mut out: Vec<ProcessorStatus> = members
            .by_id
            .iter()
            .map(|(id, m)| ProcessorStatus {
                id: id.to_string(),
                capacity: m.capacity,
                connected_at: m.connected_at,
                last_seen: m.last_seen,
                transactions: m.transactions,
                dialogs: m.dialogs,
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Routes by the message's scan and queues `msg` for the chosen processor, without waiting.
    pub(crate) fn deliver(&self, scan: &Scan<'_>, msg: DispatcherMessage) -> Delivery {
        let members = self.read();
        let Some(node) = route::pick(scan, &members.ids) else {
            return Delivery::NoProcessor;
        };
        let node = Arc::clone(node);
        // `ids` and `by_id` change together under the write lock, so the lookup succeeds.
        let Some(member) = members.by_id.get(&node) else {
            return Delivery::NoProcessor;
        };
        match member.tx.try_send(msg) {
            Ok(()) => Delivery::Queued(node),
            Err(_) => Delivery::Busy(node),
        }
    }

    /// Queues `msg` for every linked processor, without waiting. Returns how many could not
    /// take it (queue full or link closing).
    pub(crate) fn broadcast(&self, msg: &DispatcherMessage) -> usize {
        let members = self.read();
        members.by_id.values().filter(|m| m.tx.try_send(msg.clone()).is_err()).count()
    }

    /// Registers `id` on a new link, replacing any previous link with that id, and queues
    /// `welcome` on it while still holding the lock, so the welcome is the first message on
    /// the stream and the processor is routable as soon as it has it. Returns the session
    /// number, or `None` if the link's stream is already gone.
    fn join(
        &self,
        id: &str,
        capacity: u32,
        tx: mpsc::Sender<DispatcherMessage>,
        welcome: DispatcherMessage,
        kick: oneshot::Sender<()>,
    ) -> Option<(u64, bool)> {
        let mut members = self.write();
        tx.try_send(welcome).ok()?;
        members.next_session += 1;
        let session = members.next_session;
        let now = Instant::now();
        let member = Member {
            session,
            tx,
            capacity,
            connected_at: now,
            last_seen: now,
            transactions: 0,
            dialogs: 0,
            _kick: kick,
        };
        let id: Arc<str> = Arc::from(id);
        let replaced = members.by_id.insert(Arc::clone(&id), member).is_some();
        if !replaced {
            members.ids.push(id);
        }
        Some((session, replaced))
    }

    /// Removes `id` if it is still the link `session`. Returns whether it was removed and
    /// how many processors remain.
    fn leave(&self, id: &str, session: u64) -> (bool, usize) {
        let mut members = self.write();
        if members.by_id.get(id).is_some_and(|m| m.session == session) {
            members.by_id.remove(id);
            members.ids.retain(|i| i.as_ref() != id);
            (true, members.ids.len())
        } else {
            (false, members.ids.len())
        }
    }

    fn heartbeat(&self, id: &str, session: u64, hb: &Heartbeat) {
        let mut members = self.write();
        if let Some(m) = members.by_id.get_mut(id).filter(|m| m.session == session) {
            m.last_seen = Instant::now();
            m.transactions = hb.transactions;
            m.dialogs = hb.dialogs;
        }
    }

    // A panic while holding the lock cannot leave the table half-updated (every update is a
    // few assignments), so a poisoned lock is still usable.
    fn read(&self) -> RwLockReadGuard<'_, Members> {
        self.inner.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Members> {
        self.inner.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The `Edge` gRPC service.
#[derive(Debug, Clone)]
pub(crate) struct EdgeService {
    ctx: Arc<Context>,
}

impl EdgeService {
    pub(crate) fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }
}

type LinkStream = Pin<Box<dyn Stream<Item = Result<DispatcherMessage, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Edge for EdgeService {
    type LinkStream = LinkStream;

    async fn link(
        &self,
        request: Request<Streaming<ProcessorMessage>>,
    ) -> Result<Response<Self::LinkStream>, Status> {
        let peer = request.remote_addr();
        let inbound = request.into_inner();
        // The response stream is returned at once and fed by the link task; waiting for the
        // hello here would stall a client that awaits the response before sending.
        let (tx, rx) = mpsc::channel(self.ctx.queue_depth);
        tokio::spawn(run_link(Arc::clone(&self.ctx), inbound, tx, peer));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Ok))))
    }
}

/// Drives one processor's link from its hello to its end.
async fn run_link(
    ctx: Arc<Context>,
    mut inbound: Streaming<ProcessorMessage>,
    tx: mpsc::Sender<DispatcherMessage>,
    peer: Option<SocketAddr>,
) {
    let peer = peer.map_or_else(|| "unknown peer".to_owned(), |p| p.to_string());
    let mut stop = ctx.stop.clone();
    let first = tokio::select! {
        () = crate::stopped(&mut stop) => return,
        m = inbound.message() => m,
    };
    let hello = match first {
        Ok(Some(ProcessorMessage { kind: Some(PKind::Hello(hello)) })) => hello,
        Ok(other) => {
            let reason = match other {
                None => "stream ended before hello".to_owned(),
                Some(_) => "first message on a link must be hello".to_owned(),
            };
            refuse_link(&tx, &peer, &reason);
            return;
        }
        Err(status) => {
            warn!(%peer, "edge link failed before hello: {status}");
            return;
        }
    };
    if !is_valid_node_id(&hello.node_id) {
        let reason = format!(
            "hello node_id {:?} is not a valid node id (1–32 characters of A-Z a-z 0-9 -)",
            hello.node_id
        );
        refuse_link(&tx, &peer, &reason);
        return;
    }
    let id: Arc<str> = Arc::from(hello.node_id);
    let welcome = DispatcherMessage {
        kind: Some(DKind::Welcome(Welcome {
            dispatcher_id: ctx.dispatcher_id.clone(),
            sockets: ctx.socket_table.clone(),
        })),
    };
    let (kick, mut kicked) = oneshot::channel();
    let Some((session, replaced)) =
        ctx.members.join(&id, hello.capacity, tx.clone(), welcome, kick)
    else {
        debug!(%peer, "processor {id} left before its welcome");
        return;
    };
    if replaced {
        info!(%peer, "processor {id} reconnected: its previous link is closed");
    }
    info!(%peer, capacity = hello.capacity, "processor {id} connected");

    let why = loop {
        tokio::select! {
            () = crate::stopped(&mut stop) => break "dispatcher shutting down".to_owned(),
            _ = &mut kicked => break "replaced by a newer link with the same id".to_owned(),
            m = inbound.message() => match m {
                Ok(Some(ProcessorMessage { kind: Some(PKind::Send(send)) })) => {
                    handle_send(&ctx, &id, &tx, send).await;
                }
                Ok(Some(ProcessorMessage { kind: Some(PKind::Heartbeat(hb)) })) => {
                    ctx.members.heartbeat(&id, session, &hb);
                }
                Ok(Some(ProcessorMessage { kind: Some(PKind::Hello(_)) })) => {
                    warn!("processor {id} sent a second hello on its link; ignored");
                }
                Ok(Some(ProcessorMessage { kind: None })) => {
                    debug!("processor {id} sent an empty message; ignored");
                }
                Ok(None) => break "link closed".to_owned(),
                Err(status) => break format!("link failed: {status}"),
            },
        }
    };
    let (removed, remaining) = ctx.members.leave(&id, session);
    info!(%peer, reason = %why, "processor {id} disconnected");
    if removed && remaining == 0 {
        warn!("no processor connected: requests are answered with 503 until one links");
    }
}

/// Tells a peer why its link is refused, then ends it (by dropping `tx`).
fn refuse_link(tx: &mpsc::Sender<DispatcherMessage>, peer: &str, reason: &str) {
    warn!(%peer, "edge link refused: {reason}");
    let _ = tx.try_send(edge_error(0, reason.to_owned(), 0));
}

/// Executes one `Send`, or tells the processor why not.
async fn handle_send(
    ctx: &Arc<Context>,
    id: &Arc<str>,
    tx: &mpsc::Sender<DispatcherMessage>,
    send: SendMsg,
) {
    let send_id = send.id;
    if let Err(refused) = egress::execute(ctx, id, tx, send).await {
        warn!(send_id, "send from processor {id} refused: {}", refused.reason);
        let error = edge_error(send_id, refused.reason, refused.closed_connection_id);
        if tx.try_send(error).is_err() {
            debug!(send_id, "processor {id}'s queue is full or closed: edge error dropped");
        }
    }
}

/// An `EdgeError` about send `send_id` (0: about the link itself).
pub(crate) fn edge_error(
    send_id: u64,
    reason: String,
    closed_connection_id: u64,
) -> DispatcherMessage {
    DispatcherMessage {
        kind: Some(DKind::Error(EdgeError { send_id, reason, closed_connection_id })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sipmsg::scan::{make_branch, scan};

    fn inbound() -> DispatcherMessage {
        DispatcherMessage { kind: None }
    }

    #[test]
    fn membership_join_replace_leave() {
        let m = Membership::default();
        let msg = format!(
            "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h;branch={}\r\nCall-ID: c\r\n\r\n",
            make_branch("p1", "x")
        );
        let Ok(s) = scan(msg.as_bytes()) else { panic!("scan") };
        assert_eq!(m.deliver(&s, inbound()), Delivery::NoProcessor);

        let (tx1, mut rx1) = mpsc::channel(2);
        let (kick1, mut kicked1) = oneshot::channel();
        let Some((s1, false)) = m.join("p1", 10, tx1, inbound(), kick1) else { panic!("join") };
        assert!(rx1.try_recv().is_ok(), "welcome queued first");
        assert_eq!(m.deliver(&s, inbound()), Delivery::Queued(Arc::from("p1")));
        assert_eq!(m.deliver(&s, inbound()), Delivery::Queued(Arc::from("p1")));
        assert_eq!(m.deliver(&s, inbound()), Delivery::Busy(Arc::from("p1")), "queue of 2 full");

        // Same id again: the first link is kicked and its late leave() changes nothing.
        let (tx2, _rx2) = mpsc::channel(2);
        let (kick2, _kicked2) = oneshot::channel();
        let Some((s2, true)) = m.join("p1", 20, tx2, inbound(), kick2) else { panic!("join") };
        assert_eq!(
            kicked1.try_recv(),
            Err(oneshot::error::TryRecvError::Closed),
            "old link told to end"
        );
        assert_eq!(m.leave("p1", s1), (false, 1));
        assert_eq!(m.status().len(), 1);
        assert_eq!(m.status()[0].capacity, 20);

        m.heartbeat("p1", s2, &Heartbeat { transactions: 3, dialogs: 1 });
        assert_eq!((m.status()[0].transactions, m.status()[0].dialogs), (3, 1));

        assert_eq!(m.leave("p1", s2), (true, 0));
        assert_eq!(m.deliver(&s, inbound()), Delivery::NoProcessor);
    }
}

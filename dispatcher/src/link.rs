//! The edge link: the gRPC `Edge` service processors dial in to. Each processor's link is
//! driven here; who is linked, and where a message goes, is [`crate::membership`].
//!
//! A processor opens one `Link` stream and says `Hello`; it is answered with `Welcome` (this
//! dispatcher's id and socket table) and from then on is a routing target until its stream
//! ends, or until nothing has arrived from it for `heartbeat_timeout_secs` (it sends a
//! `Heartbeat` every 2 s). Everything it sends afterwards is a `Send` (put these bytes on the
//! wire from that local socket), a `Heartbeat` (its load), or `Drain` (send me no new work).
//! `Status` is a one-shot call for operators: this dispatcher and its processors.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sipalias_proto::edge::dispatcher_message::Kind as DKind;
use sipalias_proto::edge::edge_server::Edge;
use sipalias_proto::edge::processor_message::Kind as PKind;
use sipalias_proto::edge::{
    BanEntry, BansRequest, BansResponse, DispatcherMessage, LiftBan, LiftBanRequest,
    LiftBanResponse, LinkedProcessor, ProcessorMessage, Send as SendMsg, SocketState,
    StatusRequest, StatusResponse, Transport, Welcome,
};
use sipmsg::net::Source;
use sipmsg::scan::is_valid_node_id;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::Context;
use crate::egress;
use crate::membership::{Join, LinkStats, Liveness, NewLink, liveness};
use crate::telemetry;
use crate::wire::edge_error;

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

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let ctx = &self.ctx;
        let processors = ctx
            .router
            .members
            .status()
            .into_iter()
            .map(|p| LinkedProcessor {
                node_id: p.id,
                peer: p.peer.map(|a| a.to_string()).unwrap_or_default(),
                connected_at_ms: p.connected_at_ms,
                last_seen_ms_ago: u64::try_from(p.last_seen_ago.as_millis()).unwrap_or(u64::MAX),
                transactions: p.transactions,
                dialogs: p.dialogs,
                draining: p.draining,
                routed: p.routed,
                capacity: p.capacity,
            })
            .collect();
        Ok(Response::new(StatusResponse {
            dispatcher_id: ctx.router.dispatcher_id.clone(),
            uptime_ms: u64::try_from(ctx.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            processors,
            sockets: ctx
                .sockets
                .states()
                .into_iter()
                .map(|(socket, draining)| {
                    let connections = match (socket.ip.parse(), u16::try_from(socket.port)) {
                        (Ok(ip), Ok(port)) if socket.transport() != Transport::Udp => {
                            let addr = std::net::SocketAddr::new(ip, port);
                            ctx.streams.connections_on(addr, socket.transport())
                        }
                        _ => 0,
                    };
                    SocketState {
                        socket: Some(socket),
                        draining,
                        connections: u32::try_from(connections).unwrap_or(u32::MAX),
                    }
                })
                .collect(),
        }))
    }

    async fn bans(&self, _request: Request<BansRequest>) -> Result<Response<BansResponse>, Status> {
        let guard = &self.ctx.router.guard;
        let bans = guard
            .list(Instant::now())
            .into_iter()
            .map(|b| BanEntry {
                source: b.source.to_string(),
                reason: b.reason,
                remaining_ms: u64::try_from(b.remaining.as_millis()).unwrap_or(u64::MAX),
                dropped: b.dropped,
            })
            .collect();
        let c = &guard.counters;
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Ok(Response::new(BansResponse {
            bans,
            dropped_banned: n(&c.dropped_banned),
            dropped_scanners: n(&c.dropped_scanners),
            rate_bans: n(&c.rate_bans),
            processor_bans: n(&c.processor_bans),
            shed: n(&c.shed),
            denied_destinations: n(&c.denied_destinations),
            dispatcher_id: self.ctx.router.dispatcher_id.clone(),
        }))
    }

    async fn lift_ban(
        &self,
        request: Request<LiftBanRequest>,
    ) -> Result<Response<LiftBanResponse>, Status> {
        let text = request.into_inner().source;
        let source = text.parse::<Source>().map_err(|why| {
            Status::invalid_argument(format!("{:?}: {why}", text.escape_debug().to_string()))
        })?;
        let lifted = self.ctx.router.guard.lift(source, Instant::now());
        // Every processor forgets it too (and deletes it from Redis), so the next failure
        // counts from zero and no processor answers the source 403 from memory.
        let lift = DispatcherMessage {
            kind: Some(DKind::LiftBan(LiftBan { source: source.to_string() })),
        };
        let missed = self.ctx.router.members.broadcast(&lift);
        info!(source = %source, lifted, missed, "ban lifted by an operator");
        Ok(Response::new(LiftBanResponse { lifted }))
    }
}

/// Drives one processor's link from its hello to its end.
async fn run_link(
    ctx: Arc<Context>,
    mut inbound: Streaming<ProcessorMessage>,
    tx: mpsc::Sender<DispatcherMessage>,
    peer_addr: Option<SocketAddr>,
) {
    let peer = peer_addr.map_or_else(|| "unknown peer".to_owned(), |p| p.to_string());
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
    let announced = ctx.sockets.announced();
    // At most a handful are meaningful; anything that is not an address is ignored.
    ctx.destinations.add_services(hello.services.iter().take(64).filter_map(|s| s.parse().ok()));
    let welcome = DispatcherMessage {
        kind: Some(DKind::Welcome(Welcome {
            dispatcher_id: ctx.router.dispatcher_id.clone(),
            sockets: announced.clone(),
        })),
    };
    let (kick, mut kicked) = oneshot::channel();
    let stats = Arc::new(LinkStats::default());
    let link = NewLink {
        capacity: hello.capacity,
        peer: peer_addr,
        tx: tx.clone(),
        stats: Arc::clone(&stats),
        kick,
    };
    let (session, replaced) = match ctx.router.members.join(
        &id,
        link,
        welcome,
        ctx.heartbeat_timeout,
    ) {
        Join::Joined { session, replaced } => {
            let accepting = ctx.router.members.status().iter().filter(|p| !p.draining).count();
            telemetry::processors_linked(accepting);
            (session, replaced)
        }
        Join::Taken { peer: holder } => {
            let holder = holder.map_or_else(|| "an unknown peer".to_owned(), |p| p.to_string());
            let reason = format!(
                "processor id {id} is linked and alive (from {holder}); a new link with that id \
                 is refused until the old one ends or is silent for heartbeat_timeout_secs"
            );
            refuse_link(&tx, &peer, &reason);
            return;
        }
        Join::Gone => {
            debug!(%peer, "processor {id} left before its welcome");
            return;
        }
    };
    if replaced {
        info!(%peer, "processor {id} reconnected: its previous, silent link is closed");
    }
    // A SIGHUP that changed the sockets between the welcome and the join announced the new
    // table to the members of that moment, not to this one: it gets the table again. (The
    // table is published before it is announced, so one of the two always carries it.)
    let now = ctx.sockets.announced();
    if now != announced {
        let again = DispatcherMessage {
            kind: Some(DKind::Welcome(Welcome {
                dispatcher_id: ctx.router.dispatcher_id.clone(),
                sockets: now,
            })),
        };
        let _ = tx.try_send(again);
    }
    info!(%peer, capacity = hello.capacity, "processor {id} connected");

    // Liveness: every message counts; the timer is armed for when the processor would have
    // been silent for the whole timeout and, when it fires, re-armed from the last arrival.
    let timeout = ctx.heartbeat_timeout;
    let mut last_seen = Instant::now();
    let silence = tokio::time::sleep_until((last_seen + timeout).into());
    tokio::pin!(silence);

    let why = loop {
        tokio::select! {
            () = crate::stopped(&mut stop) => break "dispatcher shutting down".to_owned(),
            _ = &mut kicked => break "replaced by a newer link with the same id".to_owned(),
            () = &mut silence => match liveness(last_seen, Instant::now(), timeout) {
                Liveness::Alive { check_at } => silence.as_mut().reset(check_at.into()),
                Liveness::Silent { silent_for } => {
                    warn!(
                        %peer, silent_ms = silent_for.as_millis(),
                        "processor {id}: nothing received for {:.1} s (heartbeat_timeout_secs \
                         {}); ending its link",
                        silent_for.as_secs_f64(), timeout.as_secs()
                    );
                    // If it is alive after all (stalled), it learns why and links again.
                    let reason = format!(
                        "link closed: missed heartbeats (nothing received for {:.1} s)",
                        silent_for.as_secs_f64()
                    );
                    let _ = tx.try_send(edge_error(0, reason, 0));
                    break "missed heartbeats".to_owned();
                }
            },
            m = inbound.message() => {
                if matches!(m, Ok(Some(_))) {
                    last_seen = Instant::now();
                    ctx.router.members.seen(&stats);
                }
                match m {
                    Ok(Some(ProcessorMessage { kind: Some(PKind::Send(send)) })) => {
                        handle_send(&ctx, &id, &tx, send).await;
                    }
                    Ok(Some(ProcessorMessage { kind: Some(PKind::Heartbeat(hb)) })) => {
                        ctx.router.members.heartbeat(&stats, &hb);
                    }
                    Ok(Some(ProcessorMessage { kind: Some(PKind::Drain(_)) })) => {
                        if let Some(left) = ctx.router.members.drain(&id, session) {
                            info!(%peer, "processor {id} draining");
                            telemetry::processors_linked(left.accepting);
                            if left.accepting == 0 {
                                warn!(
                                    "every linked processor is draining: new requests are \
                                     answered with 503 until one links"
                                );
                            }
                        }
                    }
                    Ok(Some(ProcessorMessage { kind: Some(PKind::Ban(ban)) })) => {
                        apply_ban(&ctx, &id, &ban);
                    }
                    Ok(Some(ProcessorMessage { kind: Some(PKind::Hello(_)) })) => {
                        warn!("processor {id} sent a second hello on its link; ignored");
                    }
                    Ok(Some(ProcessorMessage { kind: None })) => {
                        debug!("processor {id} sent an empty message; ignored");
                    }
                    Ok(None) => break "link closed".to_owned(),
                    Err(status) => break format!("link failed: {status}"),
                }
            }
        }
    };
    let (removed, left) = ctx.router.members.leave(&id, session);
    telemetry::processors_linked(left.accepting);
    info!(%peer, reason = %why, "processor {id} disconnected");
    if removed && left.linked == 0 {
        warn!("no processor connected: requests are answered with 503 until one links");
    } else if removed && left.accepting == 0 {
        warn!(
            "every linked processor is draining: new requests are answered with 503 until one \
             links"
        );
    }
}

/// Records a ban a processor announced (a source over its failed-authentication budget, or
/// one met while banned): its traffic is dropped here from now on.
fn apply_ban(ctx: &Context, id: &str, ban: &sipalias_proto::edge::Ban) {
    let Ok(source) = ban.source.parse::<Source>() else {
        warn!("processor {id} sent a ban for {:?}, not a source; ignored", ban.source);
        return;
    };
    let reason = if is_reason(&ban.reason) { ban.reason.as_str() } else { "processor" };
    let duration = Duration::from_millis(ban.duration_ms);
    if ctx.router.guard.ban(source, duration, reason, Instant::now()) {
        info!(
            source = %source,
            reason,
            ban_secs = duration.min(crate::guard::MAX_BAN).as_secs(),
            "source banned at the edge: its messages are dropped"
        );
    }
}

/// Whether a ban reason is a short token fit for logs and the ban list.
fn is_reason(reason: &str) -> bool {
    !reason.is_empty()
        && reason.len() <= 32
        && reason.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
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

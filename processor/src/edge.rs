//! The processor's side of the edge link: dial in to each dispatcher, say hello, learn its
//! socket table, receive routed SIP, send what the core asks for. Reconnects with backoff.

use std::sync::Arc;
use std::time::Duration;

use sipalias_proto::edge::dispatcher_message::Kind as DKind;
use sipalias_proto::edge::edge_client::EdgeClient;
use sipalias_proto::edge::processor_message::Kind as PKind;
use sipalias_proto::edge::{Heartbeat, Hello, ProcessorMessage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::Error;
use crate::node::Node;
use crate::transport::Ingress;

/// Outbound queue depth per dispatcher link.
const QUEUE: usize = 8192;

/// Keeps a link to the dispatcher at `url` open until stopped; then the link is closed, which
/// the dispatcher sees at once.
pub async fn maintain(node: Arc<Node>, url: String, mut stopping: sipalias_startup::Stopping) {
    stopping.run_until(reconnect_loop(node, url)).await;
}

async fn reconnect_loop(node: Arc<Node>, url: String) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match run_link(&node, &url).await {
            Ok(()) => {
                tracing::warn!(%url, "dispatcher closed the edge link");
                backoff = Duration::from_millis(100);
            }
            Err(e) => tracing::warn!(%url, error = %e, "edge link failed"),
        }
        // Backoff between reconnect attempts (not synchronisation): a dispatcher that is down
        // must not be hammered.
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn run_link(node: &Arc<Node>, url: &str) -> Result<(), Error> {
    let failed = |detail: String| Error::Link { url: url.to_owned(), detail };
    let present = sipalias_proto::link_auth::Present::new(node.link_secret()).map_err(failed)?;
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .map_err(|e| failed(e.to_string()))?
        .connect()
        .await
        .map_err(|e| failed(e.to_string()))?;
    let mut client = EdgeClient::with_interceptor(channel, present);
    let (tx, rx) = mpsc::channel(QUEUE);
    let hello = ProcessorMessage {
        kind: Some(PKind::Hello(Hello {
            node_id: node.id().to_owned(),
            capacity: 10_000,
            services: node.service_addrs(),
        })),
    };
    tx.send(hello).await.map_err(|e| failed(e.to_string()))?;
    let mut inbound = client
        .link(ReceiverStream::new(rx))
        .await
        .map_err(|e| failed(e.message().to_owned()))?
        .into_inner();
    let welcome = match inbound.message().await.map_err(|e| failed(e.message().to_owned()))? {
        Some(m) => match m.kind {
            Some(DKind::Welcome(w)) => w,
            other => return Err(failed(format!("expected welcome, got {other:?}"))),
        },
        None => return Err(failed("stream ended before welcome".into())),
    };
    let dispatcher_id = welcome.dispatcher_id.clone();
    node.learn_sockets(&dispatcher_id, &welcome.sockets);
    node.links().insert(&dispatcher_id, tx.clone());
    tracing::info!(dispatcher = %dispatcher_id, %url, sockets = welcome.sockets.len(), "linked to dispatcher");

    let heartbeat = {
        let (tx, node) = (tx.clone(), node.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                let (c, s, calls) = node.load();
                let hb = Heartbeat { transactions: (c + s) as u32, dialogs: calls as u32 };
                if tx.send(ProcessorMessage { kind: Some(PKind::Heartbeat(hb)) }).await.is_err() {
                    break;
                }
            }
        })
    };

    let result = loop {
        match inbound.message().await {
            Ok(Some(m)) => match m.kind {
                Some(DKind::Inbound(i)) => {
                    let Some(ingress) = i.ingress.as_ref().and_then(Ingress::from_proto) else {
                        tracing::warn!("inbound message with a malformed ingress dropped");
                        continue;
                    };
                    node.handle_inbound(&i.message, ingress);
                }
                Some(DKind::Error(e)) => {
                    tracing::warn!(dispatcher = %dispatcher_id, send_id = e.send_id, reason = %e.reason, "dispatcher refused a send");
                    if e.closed_connection_id != 0 {
                        node.handle_flow_failed(e.closed_connection_id);
                    }
                }
                Some(DKind::Welcome(w)) => node.learn_sockets(&dispatcher_id, &w.sockets),
                Some(DKind::LiftBan(lift)) => node.lift_ban(lift.source),
                Some(DKind::Closed(c)) => {
                    tracing::debug!(dispatcher = %dispatcher_id, connection = c.connection_id, "connection closed");
                }
                None => {}
            },
            Ok(None) => break Ok(()),
            Err(e) => break Err(failed(e.message().to_owned())),
        }
    };
    heartbeat.abort();
    node.links().remove(&dispatcher_id);
    result
}

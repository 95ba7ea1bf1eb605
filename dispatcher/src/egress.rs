//! Executing a processor's `Send`: put its bytes on the wire from exactly the local socket it
//! names — a UDP datagram from that socket, or a message on a TCP/TLS connection of that
//! socket (see [`stream::send`] for which connection).

use std::sync::Arc;

use bytes::Bytes;
use sipalias_proto::edge::{DispatcherMessage, Send as SendMsg, Transport};
use tokio::sync::mpsc;

use crate::Context;
use crate::connection::{Origin, Outgoing, Refused};
use crate::stream;
use crate::wire::{egress_target, transport_name};

/// Puts one `Send` on the wire, or queues it on a connection. The error is what goes back to
/// the processor in `EdgeError`. Failures after queuing (a connection that cannot be opened,
/// a write that fails) are reported later on `reply`.
pub(crate) async fn execute(
    ctx: &Arc<Context>,
    processor: &Arc<str>,
    reply: &mpsc::Sender<DispatcherMessage>,
    send: SendMsg,
) -> Result<(), Refused> {
    let Some(egress) = send.egress.as_ref() else {
        return Err(refused("send without egress"));
    };
    let (transport, local, remote) = egress_target(egress).map_err(refused)?;
    if let Err(why) = ctx.destinations.check(remote) {
        ctx.router.guard.count_denied_destination();
        return Err(refused(why));
    }
    if transport == Transport::Udp {
        let socket = ctx
            .sockets
            .udp(local)
            .ok_or_else(|| refused(format!("no local socket {local}/udp")))?;
        socket
            .send_to(&send.message, remote)
            .await
            .map_err(|e| refused(format!("send from {local}/udp to {remote} failed: {e}")))?;
        return Ok(());
    }
    if !ctx.sockets.owns_stream(local, transport) {
        return Err(refused(format!("no local socket {local}/{}", transport_name(transport))));
    }
    let out = Outgoing {
        bytes: Bytes::from(send.message),
        origin: Some(Origin {
            processor: Arc::clone(processor),
            send_id: send.id,
            named: egress.connection_id,
            reply: reply.clone(),
        }),
    };
    stream::send(ctx, local, transport, remote, egress.connection_id, send.flow_only, out)
}

fn refused(reason: impl Into<String>) -> Refused {
    Refused::because(reason.into())
}

//! Executing a processor's `Send`: put its bytes on the wire from exactly the local socket it
//! names — a UDP datagram from that socket, or a message on a TCP/TLS connection of that
//! socket (see [`stream::send`] for which connection).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use sipalias_proto::edge::{DispatcherMessage, Egress, Send as SendMsg, Transport};
use tokio::sync::mpsc;

use crate::Context;
use crate::config::transport_name;
use crate::stream::{self, Origin, Outgoing, Refused};

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
    let (transport, local, remote) = route(egress).map_err(refused)?;
    if let Err(why) = ctx.destinations.check(remote) {
        ctx.guard.count_denied_destination();
        return Err(refused(why));
    }
    if transport == Transport::Udp {
        let socket = ctx
            .sockets
            .get(local)
            .ok_or_else(|| refused(format!("no local socket {local}/udp")))?;
        socket
            .send_to(&send.message, remote)
            .await
            .map_err(|e| refused(format!("send from {local}/udp to {remote} failed: {e}")))?;
        return Ok(());
    }
    if !ctx.streams.owns(local, transport) {
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
    Refused { reason: reason.into(), closed_connection_id: 0 }
}

/// The transport, local socket and destination of an egress, or why there is none.
fn route(egress: &Egress) -> Result<(Transport, SocketAddr, SocketAddr), String> {
    let transport = match Transport::try_from(egress.transport) {
        Ok(Transport::Unspecified) => return Err("transport not specified".to_owned()),
        Ok(t) => t,
        Err(_) => return Err(format!("unknown transport {}", egress.transport)),
    };
    let local = egress
        .local_ip
        .parse::<IpAddr>()
        .ok()
        .zip(u16::try_from(egress.local_port).ok())
        .map(SocketAddr::from)
        .ok_or_else(|| {
            format!(
                "no local socket {}:{}/{}",
                egress.local_ip,
                egress.local_port,
                transport_name(transport)
            )
        })?;
    let remote = egress
        .remote_ip
        .parse::<IpAddr>()
        .ok()
        .zip(u16::try_from(egress.remote_port).ok().filter(|p| *p != 0))
        .map(SocketAddr::from)
        .ok_or_else(|| format!("bad destination {}:{}", egress.remote_ip, egress.remote_port))?;
    Ok((transport, local, remote))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn egress(local: &str, port: u32, transport: Transport) -> Egress {
        Egress {
            local_ip: local.into(),
            local_port: port,
            transport: transport.into(),
            remote_ip: "127.0.0.9".into(),
            remote_port: 5060,
            connection_id: 0,
        }
    }

    #[test]
    fn route_checks_transport_and_addresses() {
        let local = SocketAddr::from(([127, 0, 0, 2], 5060));
        let remote = SocketAddr::from(([127, 0, 0, 9], 5060));
        assert_eq!(
            route(&egress("127.0.0.2", 5060, Transport::Udp)),
            Ok((Transport::Udp, local, remote))
        );
        assert_eq!(
            route(&egress("127.0.0.2", 5060, Transport::Tls)),
            Ok((Transport::Tls, local, remote))
        );
        assert_eq!(
            route(&egress("127.0.0.2", 5060, Transport::Unspecified)),
            Err("transport not specified".into())
        );
        assert_eq!(
            route(&egress("10.0.0.x", 5060, Transport::Tcp)),
            Err("no local socket 10.0.0.x:5060/tcp".into())
        );
        assert_eq!(
            route(&egress("127.0.0.2", 70000, Transport::Udp)),
            Err("no local socket 127.0.0.2:70000/udp".into())
        );
        let mut e = egress("127.0.0.2", 5060, Transport::Udp);
        e.remote_port = 0;
        assert_eq!(route(&e), Err("bad destination 127.0.0.9:0".into()));
    }
}

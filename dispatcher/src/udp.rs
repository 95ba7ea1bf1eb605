//! SIP over UDP: one receive loop per bound socket. Each datagram is one message, handed to
//! [`ingress`](crate::ingress); a `503` it produces goes back from the socket the request came
//! in on. Datagrams that are not SIP (CRLF keep-alives, scans, STUN) are dropped unanswered.

use std::net::SocketAddr;
use std::sync::Arc;

use sipalias_proto::edge::Transport;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::Context;
use crate::ingress::{self, Outcome};
use crate::wire::Arrival;

/// Largest UDP payload; a bigger SIP message cannot arrive over UDP at all.
const MAX_DATAGRAM: usize = 65_535;

/// Receives on `socket` (bound to `local`) until `stop` turns true (the socket closes, or
/// the dispatcher stops).
pub(crate) async fn serve(
    ctx: Arc<Context>,
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    tracing::info!("sip udp listening on {local}");
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, peer) = tokio::select! {
            () = crate::stopped(&mut stop) => {
                debug!("sip udp socket {local} closed");
                return;
            }
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    // E.g. an ICMP error reported on the socket: it concerns one peer, and the
                    // socket is still good for everyone else.
                    warn!(%local, "sip udp receive error: {e}");
                    continue;
                }
            },
        };
        let data = &buf[..len];
        let from = Arrival { local, transport: Transport::Udp, remote: peer, connection_id: 0 };
        match ingress::handle(&ctx.router, from, data) {
            Outcome::Routed | Outcome::Dropped => {}
            Outcome::Answer(reply) => {
                if let Err(e) = socket.send_to(&reply, peer).await {
                    warn!(%local, %peer, "sending 503 failed: {e}");
                }
            }
            Outcome::NotSip(why) => {
                debug!(%local, %peer, len = data.len(), "dropping non-SIP datagram: {why:?}");
            }
        }
    }
}

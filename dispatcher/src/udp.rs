//! SIP over UDP: one receive loop per bound socket. Each datagram is one message, handed to
//! [`ingress`](crate::ingress); a `503` it produces goes back from the socket the request came
//! in on. Datagrams that are not SIP (CRLF keep-alives, scans, STUN) are dropped unanswered.

use std::collections::HashMap;
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

/// The bound UDP sockets by local address, shared by the receive loops and the links' sends.
#[derive(Debug, Default)]
pub(crate) struct Sockets {
    by_addr: HashMap<SocketAddr, Arc<UdpSocket>>,
}

impl Sockets {
    pub(crate) fn insert(&mut self, addr: SocketAddr, socket: Arc<UdpSocket>) {
        self.by_addr.insert(addr, socket);
    }

    pub(crate) fn len(&self) -> usize {
        self.by_addr.len()
    }

    /// The socket bound to exactly `addr`.
    pub(crate) fn get(&self, addr: SocketAddr) -> Option<&Arc<UdpSocket>> {
        self.by_addr.get(&addr)
    }
}

/// Receives on `socket` (bound to `local`) until `stop` turns true.
pub(crate) async fn serve(
    ctx: Arc<Context>,
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, peer) = tokio::select! {
            () = crate::stopped(&mut stop) => return,
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

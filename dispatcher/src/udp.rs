//! SIP over UDP: one receive loop per bound socket, and what happens to each datagram.
//!
//! A datagram is scanned (start line, top Via branch, Call-ID; no full parse), routed to a
//! processor and queued on its link without waiting. When nobody can take a request the
//! dispatcher answers `503 Service Unavailable` itself, from the socket the request came in on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use sipalias_proto::edge::dispatcher_message::Kind as DKind;
use sipalias_proto::edge::{DispatcherMessage, Inbound, Ingress, Transport};
use sipmsg::SipMessage;
use sipmsg::scan::scan;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::{debug, trace, warn};

use crate::Context;
use crate::link::Delivery;
use crate::route;

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
        let Some(reply) = handle_datagram(&ctx, local, peer, data, unix_ms()) else { continue };
        if let Err(e) = socket.send_to(&reply, peer).await {
            warn!(%local, %peer, "sending 503 failed: {e}");
        }
    }
}

/// What to do with one datagram: route it to a processor, or answer or drop it. Returns the
/// bytes to send back to `peer` from the receiving socket, if any.
pub(crate) fn handle_datagram(
    ctx: &Context,
    local: SocketAddr,
    peer: SocketAddr,
    data: &[u8],
    received_at_ms: u64,
) -> Option<Vec<u8>> {
    let keys = match scan(data) {
        Ok(keys) => keys,
        Err(why) => {
            // Keep-alives (CRLF), port scans, STUN: never answered.
            debug!(%local, %peer, len = data.len(), "dropping non-SIP datagram: {why:?}");
            return None;
        }
    };
    let msg = DispatcherMessage {
        kind: Some(DKind::Inbound(Inbound {
            ingress: Some(Ingress {
                local_ip: local.ip().to_string(),
                local_port: u32::from(local.port()),
                transport: Transport::Udp.into(),
                remote_ip: peer.ip().to_string(),
                remote_port: u32::from(peer.port()),
                connection_id: 0,
                received_at_ms,
                dispatcher_id: ctx.dispatcher_id.clone(),
            }),
            message: data.to_vec(),
        })),
    };
    let call_id = keys.call_id.unwrap_or_default();
    let unavailable = match ctx.members.deliver(&keys, msg) {
        Delivery::Queued(node) => {
            trace!(%local, %peer, call_id, "routed to processor {node}");
            return None;
        }
        Delivery::Busy(node) => format!("processor {node} is busy"),
        Delivery::NoProcessor => "no processor connected".to_owned(),
    };
    match keys.method {
        Some(method) if method != "ACK" => {
            debug!(%local, %peer, call_id, "{unavailable}: answering {method} with 503");
            service_unavailable(data, ctx.retry_after_secs)
        }
        Some(method) => {
            debug!(%local, %peer, call_id, "{unavailable}: dropping {method}");
            None
        }
        None => {
            debug!(%local, %peer, call_id, status = keys.status, "{unavailable}: dropping response");
            None
        }
    }
}

/// The dispatcher's own `503 Service Unavailable` to a request, or `None` if the request does
/// not parse well enough to answer (it is then dropped, as a stateless server may).
///
/// The To tag is derived from Call-ID and top branch, so a retransmitted request gets the
/// identical response, as it would from a stateful server.
pub(crate) fn service_unavailable(request: &[u8], retry_after_secs: u32) -> Option<Vec<u8>> {
    let req = sipmsg::parse(request).ok()?;
    if !req.is_request() || req.method() == Some("ACK") {
        return None;
    }
    let call_id = req.call_id().ok()?;
    let branch = req.top_via().ok().and_then(|v| v.branch().map(str::to_owned)).unwrap_or_default();
    let tag = format!("{:016x}", route::weight(&branch, call_id));
    let mut resp = SipMessage::response_to(&req, 503, "Service Unavailable", Some(&tag));
    resp.push_header("Retry-After", retry_after_secs.to_string());
    Some(resp.to_bytes())
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVITE: &str = "INVITE sip:bob@sip.example.net SIP/2.0\r\nVia: SIP/2.0/UDP 10.1.1.1:5062;rport;branch=z9hG4bKinv1\r\nFrom: <sip:alice@sip.example.net>;tag=a1\r\nTo: <sip:bob@sip.example.net>\r\nCall-ID: c-503\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn builds_503_with_retry_after_and_stable_tag() {
        let Some(resp) = service_unavailable(INVITE.as_bytes(), 7) else { panic!("no 503") };
        let Ok(parsed) = sipmsg::parse(&resp) else { panic!("unparsable 503") };
        assert_eq!(parsed.status(), Some(503));
        assert_eq!(parsed.header("retry-after"), Some("7"));
        assert_eq!(parsed.header("call-id"), Some("c-503"));
        assert_eq!(parsed.header("cseq"), Some("1 INVITE"));
        assert_eq!(
            parsed.top_via().ok().and_then(|v| v.branch().map(str::to_owned)).as_deref(),
            Some("z9hG4bKinv1")
        );
        assert!(parsed.to().is_ok_and(|t| t.tag().is_some()), "To tag added");
        assert_eq!(
            service_unavailable(INVITE.as_bytes(), 7),
            Some(resp),
            "retransmission, same answer"
        );
    }

    #[test]
    fn no_503_for_ack_or_responses_or_junk() {
        let ack = INVITE.replace("INVITE sip", "ACK sip").replace("1 INVITE", "1 ACK");
        assert_eq!(service_unavailable(ack.as_bytes(), 5), None);
        let resp = "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:b@b>;tag=2\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(service_unavailable(resp.as_bytes(), 5), None);
        assert_eq!(service_unavailable(b"INVITE sip:x SIP/2.0\r\nbroken\r\n\r\n", 5), None);
    }
}

//! What happens to one received SIP message, whatever transport it came over: its routing keys
//! are scanned (start line, top Via branch, Call-ID; no full parse), it is routed to a
//! processor and queued on its link without waiting, annotated with its ingress. When nobody
//! can take a request the dispatcher answers `503 Service Unavailable` itself; the caller sends
//! that answer back the way the request came (same socket, or same connection).

use std::time::Instant;

use sipmsg::SipMessage;
use sipmsg::scan::{NotSip, scan, uri_token};
use tracing::{debug, trace};

use crate::guard::Guard;
use crate::membership::{Delivery, Membership};
use crate::route;
use crate::telemetry;
use crate::wire::{self, Arrival};

/// What routing one message needs, and all that [`handle`] can reach: the guard, the
/// membership table and two settings. The links share it through the dispatcher's context.
#[derive(Debug)]
pub(crate) struct Router {
    /// Recorded in every `Inbound`.
    pub(crate) dispatcher_id: String,
    /// Sent in the dispatcher's own `503`s.
    pub(crate) retry_after_secs: u32,
    /// The processors to route to.
    pub(crate) members: Membership,
    /// Bans, rate limit, scanners, admission: what is dropped before routing.
    pub(crate) guard: Guard,
}

/// What became of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Queued for a processor.
    Routed,
    /// Not routed; send these bytes (a `503`) back the way the message came.
    Answer(Vec<u8>),
    /// Not routed and not answered (an ACK or a response nobody can take, or a request too
    /// broken to answer).
    Dropped,
    /// Not SIP at all: no start line, or no end of the head.
    NotSip(NotSip),
}

/// Routes one message (one datagram, or one message framed on a stream).
///
/// First the guard ([`crate::guard`]): a banned source, or one that this message takes over
/// the per-source rate, is dropped before the message is even scanned; a request outside any
/// dialog from a known scanner is dropped unanswered; a new INVITE or REGISTER beyond the
/// admission rate gets `503`.
pub(crate) fn handle(ctx: &Router, from: Arrival, data: &[u8]) -> Outcome {
    let Arrival { local, remote, connection_id, .. } = from;
    let now = Instant::now();
    if !ctx.guard.admit(remote.ip(), now) {
        return Outcome::Dropped;
    }
    let keys = match scan(data) {
        Ok(keys) => keys,
        Err(why) => return Outcome::NotSip(why),
    };
    telemetry::received(local, from.transport, &keys);
    let new_work = if let Some(method) = keys.method
        && keys.request_uri.and_then(uri_token).is_none()
    {
        if method != "ACK" && ctx.guard.is_scanner(data) {
            debug!(%local, %remote, "scanner dropped");
            return Outcome::Dropped;
        }
        let new_work = matches!(method, "INVITE" | "REGISTER");
        if new_work && !ctx.guard.admit_new_work(now) {
            debug!(%local, %remote, "admission_rate reached: answering {method} with 503");
            return service_unavailable(data, ctx.retry_after_secs)
                .map_or(Outcome::Dropped, Outcome::Answer);
        }
        new_work
    } else {
        false
    };
    let msg = wire::inbound(from, &ctx.dispatcher_id, data);
    let call_id = keys.call_id.unwrap_or_default();
    let unavailable = match ctx.members.deliver(&keys, msg, new_work) {
        Delivery::Queued(node) => {
            trace!(%local, %remote, connection_id, call_id, "routed to processor {node}");
            return Outcome::Routed;
        }
        Delivery::Busy(node) => {
            if new_work {
                ctx.guard.counters.shed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            format!("processor {node} is busy")
        }
        Delivery::NoProcessor => "no processor connected".to_owned(),
    };
    match keys.method {
        Some(method) if method != "ACK" => {
            debug!(%local, %remote, connection_id, call_id, "{unavailable}: answering {method} with 503");
            service_unavailable(data, ctx.retry_after_secs)
                .map_or(Outcome::Dropped, Outcome::Answer)
        }
        Some(method) => {
            debug!(%local, %remote, connection_id, call_id, "{unavailable}: dropping {method}");
            Outcome::Dropped
        }
        None => {
            debug!(
                %local, %remote, connection_id, call_id, status = keys.status,
                "{unavailable}: dropping response"
            );
            Outcome::Dropped
        }
    }
}

/// The dispatcher's own `503 Service Unavailable` to a request, or `None` if the request does
/// not parse well enough to answer (it is then dropped, as a stateless server may).
pub(crate) fn service_unavailable(request: &[u8], retry_after_secs: u32) -> Option<Vec<u8>> {
    let req = sipmsg::parse(request).ok()?;
    let mut resp = stateless_response(&req, 503, "Service Unavailable")?;
    resp.push_header("Retry-After", retry_after_secs.to_string());
    Some(resp.to_bytes())
}

/// A response the dispatcher sends on its own to `req`, or `None` for a response or an ACK
/// (never answered).
///
/// The To tag is derived from Call-ID and top branch, so a retransmitted request gets the
/// identical response, as it would from a stateful server.
pub(crate) fn stateless_response(
    req: &SipMessage,
    status: u16,
    reason: &str,
) -> Option<SipMessage> {
    if !req.is_request() || req.method() == Some("ACK") {
        return None;
    }
    let call_id = req.call_id().ok()?;
    let branch = req.top_via().ok().and_then(|v| v.branch().map(str::to_owned)).unwrap_or_default();
    let tag = format!("{:016x}", route::weight(&branch, call_id));
    Some(SipMessage::response_to(req, status, reason, Some(&tag)))
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

//! Client transactions: INVITE (RFC 3261 §17.1.1 with the RFC 6026 Accepted state) and
//! non-INVITE (§17.1.2).

use std::time::{Duration, Instant};

use sipmsg::SipMessage;

#[cfg(test)]
use super::Held;
use super::{ClientKey, Fate, Outbox, TIMER_D, Timers, TxEvent, earliest};
use crate::transport::Egress;

/// Client transaction states. Terminated is not a state: the transaction is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// INVITE sent, nothing heard.
    Calling,
    /// Non-INVITE request sent, nothing heard.
    Trying,
    /// A provisional response arrived.
    Proceeding,
    /// A final response arrived (for an INVITE: a non-2xx, which we ACKed).
    Completed,
    /// INVITE answered with a 2xx; waiting for retransmitted or forked 2xx (RFC 6026 Timer M).
    Accepted,
}

/// One client transaction.
///
/// Most client transactions alive at any time are final ones lingering to absorb retransmitted
/// responses (Timer M lasts 64*T1, D 32 s), so the request is dropped at the final response:
/// from then on only the ACK for a non-2xx final is kept, to re-send.
#[derive(Debug)]
pub(super) struct ClientTx {
    /// The request as sent, until a final response: a CANCEL and the ACK for a non-2xx final are
    /// built from it, and Timers A and E serialize it again rather than keeping its bytes too
    /// (they only run on unreliable transports, and only until the first response for an
    /// INVITE). Boxed so that the transactions that no longer hold it stay small.
    request: Option<Box<SipMessage>>,
    egress: Egress,
    invite: bool,
    unreliable: bool,
    state: State,
    /// Current retransmission interval (Timer A or E).
    interval: Duration,
    /// Timer A or E.
    retransmit_at: Option<Instant>,
    /// Timer B or F.
    timeout_at: Option<Instant>,
    /// Timer D, K or M: end of the wait that absorbs retransmitted responses.
    linger_until: Option<Instant>,
    /// INVITE Completed: the ACK we sent for the non-2xx final, re-sent on each retransmission
    /// of that final. Stored at its exact length.
    ack: Option<Box<[u8]>>,
}

impl ClientTx {
    /// Sends the request and arms Timers A/E (unreliable transport only) and B/F.
    pub(super) fn new(
        now: Instant,
        timers: &Timers,
        request: SipMessage,
        egress: Egress,
        out: &mut Outbox,
    ) -> Self {
        let invite = request.method() == Some("INVITE");
        let unreliable = egress.local.transport.is_unreliable();
        out.send(&egress, request.to_bytes());
        ClientTx {
            request: Some(Box::new(request)),
            egress,
            invite,
            unreliable,
            state: if invite { State::Calling } else { State::Trying },
            interval: timers.t1,
            retransmit_at: unreliable.then(|| now + timers.t1),
            timeout_at: Some(now + timers.t1x64()),
            linger_until: None,
            ack: None,
        }
    }

    /// The request, until a final response arrived.
    pub(super) fn request(&self) -> Option<&SipMessage> {
        self.request.as_deref()
    }

    #[cfg(test)]
    pub(super) fn held(&self) -> Held {
        Held { request: self.request.is_some(), resend: self.ack.is_some(), ack_key: false }
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        earliest(&[self.retransmit_at, self.timeout_at, self.linger_until])
    }

    pub(super) fn on_response(
        &mut self,
        now: Instant,
        timers: &Timers,
        response: SipMessage,
        key: &ClientKey,
        out: &mut Outbox,
    ) -> Fate {
        let Some(status) = response.status() else { return Fate::Live };
        if self.invite {
            self.on_invite_response(now, timers, status, response, key, out)
        } else {
            self.on_non_invite_response(now, timers, status, response, key, out)
        }
    }

    fn on_invite_response(
        &mut self,
        now: Instant,
        timers: &Timers,
        status: u16,
        response: SipMessage,
        key: &ClientKey,
        out: &mut Outbox,
    ) -> Fate {
        let waiting = matches!(self.state, State::Calling | State::Proceeding);
        match status {
            100..=199 if waiting => {
                // The far end has the INVITE: no more retransmissions, and Timer B no longer
                // applies (how long to ring is the TU's Timer C).
                self.state = State::Proceeding;
                self.retransmit_at = None;
                self.timeout_at = None;
                pass_up(key, response, out);
            }
            200..=299 if waiting => {
                // Timer M only passes up further 2xx responses, which the TU ACKs itself.
                self.request = None;
                self.state = State::Accepted;
                self.retransmit_at = None;
                self.timeout_at = None;
                self.linger_until = Some(now + timers.t1x64());
                pass_up(key, response, out);
            }
            // RFC 6026 §8.4: every 2xx in Accepted goes up, so the TU ACKs retransmissions and
            // other forks' answers.
            200..=299 if self.state == State::Accepted => pass_up(key, response, out),
            300..=699 if waiting => {
                let ack =
                    self.request.take().map(|invite| build_ack(&invite, &response).to_bytes());
                if let Some(ack) = ack {
                    // Timer D re-sends it; on a reliable transport there is no Timer D.
                    if self.unreliable {
                        self.ack = Some(ack.as_slice().into());
                    }
                    out.send(&self.egress, ack);
                }
                self.state = State::Completed;
                self.retransmit_at = None;
                self.timeout_at = None;
                pass_up(key, response, out);
                if !self.unreliable {
                    return Fate::Terminated;
                }
                self.linger_until = Some(now + TIMER_D);
            }
            300..=699 if self.state == State::Completed => {
                // A retransmitted final: our ACK was lost.
                if let Some(ack) = &self.ack {
                    out.send(&self.egress, ack.to_vec());
                }
            }
            _ => {}
        }
        Fate::Live
    }

    fn on_non_invite_response(
        &mut self,
        now: Instant,
        timers: &Timers,
        status: u16,
        response: SipMessage,
        key: &ClientKey,
        out: &mut Outbox,
    ) -> Fate {
        if self.state == State::Completed {
            return Fate::Live;
        }
        if status < 200 {
            self.state = State::Proceeding;
            pass_up(key, response, out);
            return Fate::Live;
        }
        // Timer K only absorbs retransmitted finals: nothing is sent again.
        self.request = None;
        self.state = State::Completed;
        self.retransmit_at = None;
        self.timeout_at = None;
        pass_up(key, response, out);
        if !self.unreliable {
            return Fate::Terminated;
        }
        self.linger_until = Some(now + timers.t4);
        Fate::Live
    }

    /// Fires every timer due at `now`, earliest first.
    pub(super) fn on_timeout(
        &mut self,
        now: Instant,
        timers: &Timers,
        key: &ClientKey,
        out: &mut Outbox,
    ) -> Fate {
        loop {
            let due = |t: Option<Instant>| t.filter(|t| *t <= now);
            let next =
                earliest(&[due(self.retransmit_at), due(self.timeout_at), due(self.linger_until)]);
            let Some(deadline) = next else { return Fate::Live };
            if self.timeout_at == Some(deadline) {
                // Timer B or F.
                out.events.push_back(TxEvent::Timeout { key: key.clone() });
                return Fate::Terminated;
            }
            if self.linger_until == Some(deadline) {
                // Timer D, K or M.
                return Fate::Terminated;
            }
            // Timer A doubles without a cap; Timer E doubles up to T2, and is T2 once a
            // provisional arrived (RFC 3261 §17.1.2.2).
            // Timers A and E only run before a final response, so the request is still here.
            if let Some(request) = &self.request {
                out.send(&self.egress, request.to_bytes());
            }
            self.interval = match self.state {
                State::Calling => self.interval.saturating_mul(2),
                State::Proceeding => timers.t2,
                _ => self.interval.saturating_mul(2).min(timers.t2),
            };
            self.retransmit_at = Some(now + self.interval);
        }
    }

    /// The TU sent a CANCEL for this INVITE: RFC 3261 §9.1 gives the callee 64*T1 to answer
    /// with a final response, after which the transaction is considered terminated (Timer B's
    /// event). Without this a callee that ignores CANCEL would hold the transaction forever.
    pub(super) fn on_cancel_sent(&mut self, now: Instant, timers: &Timers) {
        if self.invite && self.state == State::Proceeding && self.timeout_at.is_none() {
            self.timeout_at = Some(now + timers.t1x64());
        }
    }

    /// RFC 3261 §9.1: a CANCEL may only be sent once a provisional response arrived, and is
    /// pointless after a final one.
    pub(super) fn cancel_request(&self) -> Option<(SipMessage, Egress)> {
        if !self.invite || self.state != State::Proceeding {
            return None;
        }
        let req = self.request.as_deref()?;
        let mut cancel = SipMessage::request("CANCEL", req.request_uri()?);
        cancel.push_header("Via", top_via(req)?);
        for route in req.headers_named("route") {
            cancel.push_header("Route", route);
        }
        cancel.push_header("Max-Forwards", "70");
        cancel.push_header("From", req.header("from")?);
        cancel.push_header("To", req.header("to")?);
        cancel.push_header("Call-ID", req.header("call-id")?);
        cancel.push_header("CSeq", format!("{} CANCEL", req.cseq().ok()?.seq));
        Some((cancel, self.egress.clone()))
    }
}

fn pass_up(key: &ClientKey, response: SipMessage, out: &mut Outbox) {
    out.events.push_back(TxEvent::Response { key: key.clone(), response });
}

/// The top Via element of a request, as written.
fn top_via(request: &SipMessage) -> Option<&str> {
    request.header_list("via").into_iter().next()
}

/// The ACK for a non-2xx final response (RFC 3261 §17.1.1.3): the INVITE's Request-URI,
/// Call-ID, From, CSeq number, top Via and Route headers, and the response's To (with its tag).
fn build_ack(invite: &SipMessage, response: &SipMessage) -> SipMessage {
    let mut ack = SipMessage::request("ACK", invite.request_uri().unwrap_or_default());
    if let Some(via) = top_via(invite) {
        ack.push_header("Via", via);
    }
    for route in invite.headers_named("route") {
        ack.push_header("Route", route);
    }
    ack.push_header("Max-Forwards", "70");
    for (name, source) in [("From", invite), ("To", response), ("Call-ID", invite)] {
        if let Some(value) = source.header(name) {
            ack.push_header(name, value);
        }
    }
    if let Ok(cseq) = invite.cseq() {
        ack.push_header("CSeq", format!("{} ACK", cseq.seq));
    }
    ack
}

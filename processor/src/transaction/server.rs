//! Server transactions: INVITE (RFC 3261 §17.2.1 with the RFC 6026 Accepted state) and
//! non-INVITE (§17.2.2).

use std::sync::Arc;
use std::time::{Duration, Instant};

use sipmsg::SipMessage;

#[cfg(test)]
use super::Held;
use super::{AckKey, Fate, Outbox, ServerKey, Timers, TxError, TxEvent, earliest};
use crate::transport::{Egress, Ingress};

/// Server transaction states. Terminated is not a state: the transaction is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Non-INVITE request received, no response yet.
    Trying,
    /// A provisional response was sent (for an INVITE, at least our own 100 Trying).
    Proceeding,
    /// A final response was sent (for an INVITE: a non-2xx, waiting for the ACK).
    Completed,
    /// INVITE only: the ACK for our non-2xx arrived; absorbing ACK retransmissions (Timer I).
    Confirmed,
    /// INVITE only: a 2xx was sent (RFC 6026); retransmitting it until the ACK or Timer L.
    Accepted,
}

/// What an ACK matching the transaction's key did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AckOutcome {
    /// Consumed by the transaction.
    Absorbed,
    /// Consumed, and the transaction ended (Timer I is zero on a reliable transport).
    Terminated,
    /// An ACK for our 2xx: the TU relays it.
    PassUp,
}

/// One server transaction.
///
/// Most server transactions alive at any time are final ones lingering to absorb
/// retransmissions (Timers J and L last 64*T1), so what a transaction holds shrinks as it
/// progresses: the request only until the final response, the last response only while it may
/// still be re-sent, the ACK key only until the ACK.
#[derive(Debug)]
pub(super) struct ServerTx {
    /// The request, shared with the TU's [`TxEvent::Request`] rather than copied; dropped once a
    /// final response is sent: the TU reads it (`server_request`) only until it has answered.
    request: Option<Arc<SipMessage>>,
    reply: Egress,
    invite: bool,
    unreliable: bool,
    state: State,
    /// The last response sent, while it may be re-sent: on a retransmitted request (Proceeding,
    /// Completed) and by Timer G or the 2xx retransmission. Stored at its exact length.
    last: Option<Box<[u8]>>,
    /// Current retransmission interval (Timer G, or the 2xx retransmission).
    interval: Duration,
    /// Timer G, or the next 2xx retransmission.
    retransmit_at: Option<Instant>,
    /// Timer H or L.
    timeout_at: Option<Instant>,
    /// Timer I or J.
    linger_until: Option<Instant>,
    /// Accepted only, until the ACK for our 2xx comes: what that ACK will carry. Boxed so that
    /// the transactions without one (all but the unacknowledged Accepted ones) stay small.
    ack_key: Option<Box<AckKey>>,
    /// Accepted only: whether that ACK came.
    acked: bool,
    /// INVITE only: when our own `100 Trying` goes out, unless the TU responds first.
    trying_at: Option<Instant>,
}

/// How long an INVITE waits for the TU's first response before the transaction sends its own
/// `100 Trying`. RFC 3261 §17.2.1 lets a server skip the 100 when it knows the TU answers within
/// 200 ms: a challenge or a relayed `180` usually comes in a few ms, and each 100 skipped is a
/// message less through the dispatcher and the phone. Under T1 (500 ms), so the client's first
/// retransmission still finds a provisional response.
pub(super) const TRYING_DELAY: Duration = Duration::from_millis(200);

impl ServerTx {
    /// A new transaction. An INVITE gets `100 Trying` after [`TRYING_DELAY`] unless the TU
    /// responds first (RFC 3261 §17.2.1), or at once when the client retransmits; otherwise no
    /// timer runs until the TU responds.
    pub(super) fn new(now: Instant, request: Arc<SipMessage>, ingress: &Ingress) -> Self {
        let invite = request.method() == Some("INVITE");
        let reply = ingress.reply_egress();
        let mut tx = ServerTx {
            invite,
            unreliable: ingress.local.transport.is_unreliable(),
            state: State::Trying,
            last: None,
            interval: Duration::ZERO,
            retransmit_at: None,
            timeout_at: None,
            linger_until: None,
            ack_key: None,
            acked: false,
            trying_at: None,
            request: Some(request),
            reply,
        };
        if invite {
            tx.state = State::Proceeding;
            tx.trying_at = Some(now + TRYING_DELAY);
        }
        tx
    }

    /// Sends our own `100 Trying`, if it is still due.
    fn send_trying(&mut self, out: &mut Outbox) {
        if self.trying_at.take().is_some()
            && let Some(request) = &self.request
        {
            let trying = SipMessage::response_to(request, 100, "Trying", None).to_bytes();
            self.send_keeping(trying, out);
        }
    }

    /// The request, until a final response was sent.
    pub(super) fn request(&self) -> Option<&SipMessage> {
        self.request.as_deref()
    }

    pub(super) fn is_final(&self) -> bool {
        matches!(self.state, State::Completed | State::Confirmed | State::Accepted)
    }

    pub(super) fn ack_key(&self) -> Option<&AckKey> {
        self.ack_key.as_deref()
    }

    /// The ACK key, handed back once the ACK for our 2xx came: nothing needs to find the
    /// transaction by its dialog identifiers after that (a retransmitted ACK goes to the TU
    /// either way), so the layer forgets it for the rest of Timer L.
    pub(super) fn take_ack_key_if_acked(&mut self) -> Option<Box<AckKey>> {
        if self.acked { self.ack_key.take() } else { None }
    }

    /// Sends `bytes` and keeps an exact-length copy as the response to re-send. (The sent buffer
    /// comes from `to_bytes`, whose capacity is an estimate; keeping it would retain the slack.)
    fn send_keeping(&mut self, bytes: Vec<u8>, out: &mut Outbox) {
        self.last = Some(bytes.as_slice().into());
        out.send(&self.reply, bytes);
    }

    #[cfg(test)]
    pub(super) fn held(&self) -> Held {
        Held {
            request: self.request.is_some(),
            resend: self.last.is_some(),
            ack_key: self.ack_key.is_some(),
        }
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        earliest(&[self.trying_at, self.retransmit_at, self.timeout_at, self.linger_until])
    }

    /// A retransmission of the request: answered with the last response (a `100 Trying` that
    /// was still waiting goes out now: the client is retransmitting), never passed up.
    pub(super) fn on_retransmission(&mut self, out: &mut Outbox) {
        if self.trying_at.is_some() {
            self.send_trying(out);
            return;
        }
        // In Accepted the layer retransmits the 2xx on its own schedule (RFC 6026 §7.1), and in
        // Confirmed the client already has our final.
        if matches!(self.state, State::Proceeding | State::Completed)
            && let Some(last) = &self.last
        {
            out.send(&self.reply, last.to_vec());
        }
    }

    /// The TU's response.
    pub(super) fn respond(
        &mut self,
        now: Instant,
        timers: &Timers,
        response: SipMessage,
        out: &mut Outbox,
    ) -> Result<Fate, TxError> {
        let status = response.status().ok_or(TxError::NotAResponse)?;
        if self.is_final() {
            return Err(TxError::AlreadyFinal);
        }
        // The TU responded: our own 100 is not needed any more.
        self.trying_at = None;
        let bytes = response.to_bytes();
        if status >= 200 {
            let method = self.request.as_ref().and_then(|r| r.method());
            crate::telemetry::final_response(&self.reply.local, method, status);
            // The TU has answered: it reads the request no more (see `request`).
            self.request = None;
        }
        match status {
            ..=199 => {
                self.send_keeping(bytes, out);
                self.state = State::Proceeding;
            }
            200..=299 if self.invite => {
                // RFC 6026: the 2xx is retransmitted here rather than by the TU, until the ACK
                // or Timer L; Timer L runs on every transport so a lost ACK is noticed. Only
                // that retransmission re-sends it (a retransmitted INVITE gets nothing in
                // Accepted), so on a reliable transport there is nothing to keep.
                if self.unreliable {
                    self.send_keeping(bytes, out);
                } else {
                    self.last = None;
                    out.send(&self.reply, bytes);
                }
                self.state = State::Accepted;
                self.ack_key = AckKey::of(&response).map(Box::new);
                self.interval = timers.t1;
                self.retransmit_at = self.unreliable.then(|| now + timers.t1);
                self.timeout_at = Some(now + timers.t1x64());
            }
            _ if self.invite => {
                self.send_keeping(bytes, out);
                self.state = State::Completed;
                self.interval = timers.t1;
                // A challenge goes to a source nobody has verified yet: it is sent once and
                // re-sent only for a retransmitted INVITE (one answer per packet received),
                // never by Timer G, so a spoofed INVITE cannot make us a reflector (as
                // Kamailio answers challenges statelessly). Timer H still bounds the wait
                // for its ACK.
                let challenge = matches!(status, 401 | 407);
                self.retransmit_at = (self.unreliable && !challenge).then(|| now + timers.t1);
                self.timeout_at = Some(now + timers.t1x64());
            }
            _ => {
                self.state = State::Completed;
                if !self.unreliable {
                    out.send(&self.reply, bytes);
                    return Ok(Fate::Terminated);
                }
                // Timer J: each retransmitted request gets this final again.
                self.send_keeping(bytes, out);
                self.linger_until = Some(now + timers.t1x64());
            }
        }
        Ok(Fate::Live)
    }

    /// An ACK whose top Via matches this (INVITE) transaction.
    pub(super) fn on_ack(&mut self, now: Instant, timers: &Timers) -> AckOutcome {
        match self.state {
            State::Completed => {
                // Stop Timers G and H; Timer I absorbs ACK retransmissions. Nothing re-sends
                // the final from here on.
                self.state = State::Confirmed;
                self.retransmit_at = None;
                self.timeout_at = None;
                self.last = None;
                if !self.unreliable {
                    return AckOutcome::Terminated;
                }
                self.linger_until = Some(now + timers.t4);
                AckOutcome::Absorbed
            }
            State::Accepted => {
                self.on_2xx_ack();
                AckOutcome::PassUp
            }
            State::Trying | State::Proceeding | State::Confirmed => AckOutcome::Absorbed,
        }
    }

    /// The ACK for our 2xx arrived: stop retransmitting it, and drop it, since nothing else
    /// re-sends it. The transaction stays until Timer L to absorb INVITE retransmissions.
    pub(super) fn on_2xx_ack(&mut self) {
        if self.state == State::Accepted {
            self.acked = true;
            self.retransmit_at = None;
            self.last = None;
        }
    }

    /// Fires every timer due at `now`, earliest first.
    pub(super) fn on_timeout(
        &mut self,
        now: Instant,
        timers: &Timers,
        key: &ServerKey,
        out: &mut Outbox,
    ) -> Fate {
        loop {
            let due = |t: Option<Instant>| t.filter(|t| *t <= now);
            let next = earliest(&[
                due(self.trying_at),
                due(self.retransmit_at),
                due(self.timeout_at),
                due(self.linger_until),
            ]);
            let Some(deadline) = next else { return Fate::Live };
            if self.trying_at == Some(deadline) {
                self.send_trying(out);
                continue;
            }
            if self.timeout_at == Some(deadline) {
                // Timer H (the ACK never came; nothing to tell the TU) or Timer L.
                if self.state == State::Accepted && !self.acked {
                    out.events.push_back(TxEvent::AckTimeout { key: key.clone() });
                }
                return Fate::Terminated;
            }
            if self.linger_until == Some(deadline) {
                // Timer I or J.
                return Fate::Terminated;
            }
            // Timer G, or the 2xx retransmission: T1 doubling, capped at T2.
            if let Some(last) = &self.last {
                out.send(&self.reply, last.to_vec());
            }
            self.interval = self.interval.saturating_mul(2).min(timers.t2);
            self.retransmit_at = Some(now + self.interval);
        }
    }
}

//! Server transactions: INVITE (RFC 3261 §17.2.1 with the RFC 6026 Accepted state) and
//! non-INVITE (§17.2.2).

use std::time::{Duration, Instant};

use sipmsg::SipMessage;

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
#[derive(Debug)]
pub(super) struct ServerTx {
    request: SipMessage,
    reply: Egress,
    invite: bool,
    unreliable: bool,
    state: State,
    /// The last response sent, re-sent on a retransmitted request and by Timer G.
    last: Option<Vec<u8>>,
    /// Current retransmission interval (Timer G, or the 2xx retransmission).
    interval: Duration,
    /// Timer G, or the next 2xx retransmission.
    retransmit_at: Option<Instant>,
    /// Timer H or L.
    timeout_at: Option<Instant>,
    /// Timer I or J.
    linger_until: Option<Instant>,
    /// Accepted only: what the ACK for our 2xx will carry.
    ack_key: Option<AckKey>,
    /// Accepted only: whether that ACK came.
    acked: bool,
}

impl ServerTx {
    /// A new transaction; an INVITE is answered with `100 Trying` at once (RFC 3261 §17.2.1),
    /// so that the client stops retransmitting while the TU works.
    /// No timer runs until the TU responds.
    pub(super) fn new(request: SipMessage, ingress: &Ingress, out: &mut Outbox) -> Self {
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
            request,
            reply,
        };
        if invite {
            let trying = SipMessage::response_to(&tx.request, 100, "Trying", None).to_bytes();
            out.send(&tx.reply, trying.clone());
            tx.last = Some(trying);
            tx.state = State::Proceeding;
        }
        tx
    }

    pub(super) fn request(&self) -> &SipMessage {
        &self.request
    }

    pub(super) fn is_final(&self) -> bool {
        matches!(self.state, State::Completed | State::Confirmed | State::Accepted)
    }

    pub(super) fn ack_key(&self) -> Option<&AckKey> {
        self.ack_key.as_ref()
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        earliest(&[self.retransmit_at, self.timeout_at, self.linger_until])
    }

    /// A retransmission of the request: answered with the last response, never passed up.
    pub(super) fn on_retransmission(&self, out: &mut Outbox) {
        // In Accepted the layer retransmits the 2xx on its own schedule (RFC 6026 §7.1), and in
        // Confirmed the client already has our final.
        if matches!(self.state, State::Proceeding | State::Completed)
            && let Some(last) = &self.last
        {
            out.send(&self.reply, last.clone());
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
        let bytes = response.to_bytes();
        out.send(&self.reply, bytes.clone());
        self.last = Some(bytes);
        match status {
            ..=199 => self.state = State::Proceeding,
            200..=299 if self.invite => {
                // RFC 6026: the 2xx is retransmitted here rather than by the TU, until the ACK
                // or Timer L; Timer L runs on every transport so a lost ACK is noticed.
                self.state = State::Accepted;
                self.ack_key = AckKey::of(&response);
                self.interval = timers.t1;
                self.retransmit_at = self.unreliable.then(|| now + timers.t1);
                self.timeout_at = Some(now + timers.t1x64());
            }
            _ if self.invite => {
                self.state = State::Completed;
                self.interval = timers.t1;
                self.retransmit_at = self.unreliable.then(|| now + timers.t1);
                self.timeout_at = Some(now + timers.t1x64());
            }
            _ => {
                self.state = State::Completed;
                if !self.unreliable {
                    return Ok(Fate::Terminated);
                }
                self.linger_until = Some(now + timers.t1x64());
            }
        }
        Ok(Fate::Live)
    }

    /// An ACK whose top Via matches this (INVITE) transaction.
    pub(super) fn on_ack(&mut self, now: Instant, timers: &Timers) -> AckOutcome {
        match self.state {
            State::Completed => {
                // Stop Timers G and H; Timer I absorbs ACK retransmissions.
                self.state = State::Confirmed;
                self.retransmit_at = None;
                self.timeout_at = None;
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

    /// The ACK for our 2xx arrived: stop retransmitting it. The transaction stays until Timer L
    /// to absorb INVITE retransmissions.
    pub(super) fn on_2xx_ack(&mut self) {
        if self.state == State::Accepted {
            self.acked = true;
            self.retransmit_at = None;
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
            let next =
                earliest(&[due(self.retransmit_at), due(self.timeout_at), due(self.linger_until)]);
            let Some(deadline) = next else { return Fate::Live };
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
                out.send(&self.reply, last.clone());
            }
            self.interval = self.interval.saturating_mul(2).min(timers.t2);
            self.retransmit_at = Some(now + self.interval);
        }
    }
}

//! The back-to-back user agent: one call = the caller's leg (A) and one or more callee legs (B,
//! one per binding, forked in parallel). Sans-IO: driven by transaction events and plans from
//! the async call-setup task, it talks to the [`TransactionLayer`] and queues transmits and
//! accounting work; it never touches a socket, Redis or billing itself.
//!
//! DESIGN.md rules 1–3 are applied here: every B leg is sent from the socket its callee
//! registered through, with the From/To host of that socket's domain (the alias IP for an
//! alias), and our Via/Contact on that same socket.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use sipalias_proto::billing::{AccountingStartRequest, AccountingStopRequest};
use sipmsg::SipMessage;
use sipmsg::headers::NameAddr;

use crate::clock::Now;
use crate::ids::Ids;
use crate::transaction::{ClientKey, ServerKey, TransactionLayer};
use crate::transport::{Egress, Ingress, Transmit};

pub(crate) use relay::RELAYED_EXTENSIONS;
mod dialog;
mod fork;
mod relay;
mod work;

use dialog::Side;
pub use dialog::{Dialog, DialogRecord};
pub use relay::strip_auto_answer;
pub use work::{CallPlan, Target, Work};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BranchState {
    Calling,
    Early,
    Answered,
    Done,
}

#[derive(Debug)]
struct Branch {
    /// The branch's INVITE transaction; `None` for a call adopted from Redis.
    key: Option<ClientKey>,
    dialog: Dialog,
    state: BranchState,
    cancel_pending: bool,
    final_status: Option<SipMessage>,
    /// Credentials for the target's digest challenge, and whether they were sent already.
    auth: Option<crate::routing::TrunkAuth>,
    auth_sent: bool,
    /// With `auth`: the INVITE sent, to send again with the credentials (the transaction
    /// layer lets go of a request once it has its final response).
    sent: Option<SipMessage>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallState {
    Setup,
    Cancelled,
    Answered,
}

#[derive(Debug)]
struct Call {
    call_ref: String,
    state: CallState,
    /// The caller's INVITE transaction and request; `None` for a call adopted from Redis after
    /// its processor died (it is answered, so neither is needed any more).
    a_key: Option<ServerKey>,
    a_invite: Option<SipMessage>,
    a: Dialog,
    a_ingress_ip: std::net::IpAddr,
    branches: Vec<Branch>,
    winner: Option<usize>,
    caller_aor: String,
    callee_aor: String,
    answered_at_ms: u64,
    /// Longest the call may last once answered (billing's limit), if any.
    max_duration: Option<std::time::Duration>,
    /// When an answered call is cut off.
    cutoff_at: Option<Instant>,
    /// While ringing: when the call is given up (Timer C, or the no-answer limit if sooner);
    /// its entry in `B2bua::deadlines`.
    ring_deadline: Option<Instant>,
    /// The absolute no-answer limit, if configured.
    no_answer_at: Option<Instant>,
    /// Why the call ended unanswered, when not the callee's own answer.
    unanswered_cause: Option<&'static str>,
    /// The final status and reason the caller got for a call that was not answered, for the
    /// failed attempt's CDR.
    caller_answer: Option<(u16, String)>,
    /// Trunks still to try, in order, should the current one fail.
    hunt: std::collections::VecDeque<Target>,
    /// Whether the caller's auto-answer headers go to the callee (kept for later branches).
    auto_answer: bool,
    /// What trunk legs assert as the caller's identity (kept for later branches).
    asserted: Option<String>,
    /// The negotiated session interval (RFC 4028), while session timers are on.
    session_interval: Option<std::time::Duration>,
    /// When the call ends unless a refresh (a re-INVITE or UPDATE answered 2xx) comes first.
    session_deadline: Option<Instant>,
}

impl Call {
    fn dialog_mut(&mut self, side: Side) -> &mut Dialog {
        match side {
            Side::A => &mut self.a,
            Side::B(i) => &mut self.branches[i].dialog,
        }
    }

    fn other(&self, side: Side) -> Option<Side> {
        match side {
            Side::A => self.winner.map(Side::B),
            Side::B(_) => Some(Side::A),
        }
    }

    fn dialog(&self, side: Side) -> &Dialog {
        match side {
            Side::A => &self.a,
            Side::B(i) => &self.branches[i].dialog,
        }
    }
}

/// What a client transaction the B2BUA started is for.
#[derive(Debug, Clone)]
enum Pending {
    /// The INVITE of branch `idx` of a call.
    Branch { call: u64, idx: usize },
    /// A request relayed from `origin`'s server transaction `key`.
    Relay { call: u64, origin: ServerKey, method: String, target_side: Side },
    /// A request whose answer does not matter (BYE we generate, CANCEL).
    Ignore,
}

/// Everything the B2BUA needs from its caller for one step.
pub struct Ctx<'a> {
    /// The transaction layer.
    pub tx: &'a mut TransactionLayer,
    /// Transmits outside transactions (ACK for 2xx).
    pub out: &'a mut VecDeque<Transmit>,
    /// Async work for the shell.
    pub work: &'a mut VecDeque<Work>,
    /// Both clocks, read once for the step.
    pub now: Now,
}

/// Every call this processor holds.
pub struct B2bua {
    ids: std::sync::Arc<Ids>,
    next_call: u64,
    calls: HashMap<u64, Call>,
    by_call_id: HashMap<String, (u64, Side)>,
    by_server: HashMap<ServerKey, u64>,
    by_client: HashMap<ClientKey, Pending>,
    /// Cut-off deadlines of answered calls with a maximum duration, and ring deadlines of
    /// calls in setup; each call has at most one entry.
    deadlines: std::collections::BTreeSet<(Instant, u64)>,
    /// Timer C.
    timer_c: std::time::Duration,
    /// `no_answer_timeout_secs`, if set.
    no_answer: Option<std::time::Duration>,
    /// ACKs of answered branches whose call ended within 64·T1 of the answer, by the branch's
    /// client transaction: a 2xx the callee retransmits after the BYE (our ACK was lost) is
    /// still acknowledged (RFC 3261 §13.2.2.4), until the transaction's Timer M would end.
    late_acks: HashMap<ClientKey, Transmit>,
    /// When each late ACK expires, oldest first.
    late_ack_expiry: VecDeque<(Instant, ClientKey)>,
    /// 64·T1: how long after its first 2xx an INVITE client transaction passes 2xx up.
    ack_window: std::time::Duration,
}

/// Reason header of the BYEs sent when an operator hangs a call up.
pub const ADMIN_REASON: &str = "SIP;cause=200;text=\"Call ended by the operator\"";

/// Reason header of the BYEs sent when billing's maximum duration is reached.
pub const CUTOFF_REASON: &str = "SIP;cause=200;text=\"Maximum call duration reached\"";
/// `Reason` of the BYEs ending a call whose session was not refreshed in time (RFC 4028).
pub const SESSION_EXPIRED_REASON: &str = "SIP;cause=408;text=\"Session timer expired\"";

/// Longest session interval honoured (a week): a longer one is a week.
const MAX_SESSION_INTERVAL_SECS: u64 = 7 * 86_400;

/// The session interval a message sets (RFC 4028 `Session-Expires`, compact `x`): its
/// delta-seconds, at least 1 s, at most a week; `None` without a usable header.
pub(crate) fn session_expires(msg: &SipMessage) -> Option<std::time::Duration> {
    let value = msg.header("session-expires").or_else(|| msg.header("x"))?;
    let secs: u64 = value.split(';').next()?.trim().parse().ok().filter(|s| *s > 0)?;
    Some(std::time::Duration::from_secs(secs.min(MAX_SESSION_INTERVAL_SECS)))
}

impl B2bua {
    /// An empty call table, ringing limited by `timers`' Timer C and no-answer limit.
    pub fn new(ids: std::sync::Arc<Ids>, timers: &crate::transaction::Timers) -> Self {
        B2bua {
            timer_c: timers.timer_c,
            no_answer: timers.no_answer,
            ids,
            next_call: 1,
            calls: HashMap::new(),
            by_call_id: HashMap::new(),
            by_server: HashMap::new(),
            by_client: HashMap::new(),
            deadlines: std::collections::BTreeSet::new(),
            late_acks: HashMap::new(),
            late_ack_expiry: VecDeque::new(),
            ack_window: 64 * timers.t1,
        }
    }

    /// Number of calls held (in setup or answered).
    pub fn len(&self) -> usize {
        self.calls.len()
    }

    /// Answered calls held here, per local IP the caller came in on (an alias, or the main
    /// IP), for the `sipalias_calls_up` gauge.
    pub fn answered_per_ip(&self) -> std::collections::BTreeMap<std::net::IpAddr, usize> {
        let mut out = std::collections::BTreeMap::new();
        for c in self.calls.values().filter(|c| c.state == CallState::Answered) {
            *out.entry(c.a_ingress_ip).or_insert(0) += 1;
        }
        out
    }

    /// Calls still being set up (ringing, or finishing a cancel): what a draining processor
    /// waits for.
    pub fn in_setup(&self) -> usize {
        self.calls.values().filter(|c| c.state != CallState::Answered).count()
    }

    /// Entries of each index (calls, Call-IDs, server and client transactions, deadlines), for
    /// the tests that check a finished call leaves nothing behind.
    #[cfg(test)]
    pub(crate) fn index_sizes(&self) -> [usize; 5] {
        [
            self.calls.len(),
            self.by_call_id.len(),
            self.by_server.len(),
            self.by_client.len(),
            self.deadlines.len(),
        ]
    }

    /// Whether no call is held.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// The stored form of an answered call.
    fn record(&self, call: u64, cx: &Ctx<'_>) -> Option<DialogRecord> {
        let c = self.calls.get(&call)?;
        let w = c.winner?;
        let cutoff_at_ms = c.cutoff_at.map(|at| {
            cx.now.wall_ms
                + u64::try_from(at.saturating_duration_since(cx.now.mono).as_millis()).unwrap_or(0)
        });
        Some(DialogRecord {
            call_ref: c.call_ref.clone(),
            caller_aor: c.caller_aor.clone(),
            callee_aor: c.callee_aor.clone(),
            a_ingress_ip: c.a_ingress_ip,
            answered_at_ms: c.answered_at_ms,
            cutoff_at_ms,
            session_expires_secs: c.session_interval.and_then(|d| u32::try_from(d.as_secs()).ok()),
            a: c.a.clone(),
            b: c.branches[w].dialog.clone(),
        })
    }

    fn save(&self, cx: &mut Ctx<'_>, call: u64) {
        if let Some(r) = self.record(call, cx) {
            cx.work.push_back(Work::SaveDialog(Box::new(r)));
        }
    }

    /// Whether a call with this leg Call-ID is held here.
    pub fn holds(&self, call_id: &str) -> bool {
        self.by_call_id.contains_key(call_id)
    }

    /// Takes over an answered call from its stored record (its processor is gone). Requests on
    /// either leg are then handled as if the call had been set up here; a cut-off deadline is
    /// re-armed.
    pub fn adopt(&mut self, cx: &mut Ctx<'_>, record: DialogRecord) {
        if self.holds(&record.a.call_id) || self.holds(&record.b.call_id) {
            return;
        }
        let id = self.next_call;
        self.next_call += 1;
        let cutoff_at = record.cutoff_at_ms.map(|ms| {
            cx.now.mono + std::time::Duration::from_millis(ms.saturating_sub(cx.now.wall_ms))
        });
        if let Some(at) = cutoff_at {
            self.deadlines.insert((at, id));
        }
        self.by_call_id.insert(record.a.call_id.clone(), (id, Side::A));
        self.by_call_id.insert(record.b.call_id.clone(), (id, Side::B(0)));
        let session =
            record.session_expires_secs.map(|s| std::time::Duration::from_secs(u64::from(s)));
        tracing::info!(call_ref = %record.call_ref, "call taken over from redis");
        self.calls.insert(
            id,
            Call {
                call_ref: record.call_ref,
                state: CallState::Answered,
                a_key: None,
                a_invite: None,
                a: record.a,
                a_ingress_ip: record.a_ingress_ip,
                branches: vec![Branch {
                    key: None,
                    dialog: record.b,
                    state: BranchState::Answered,
                    cancel_pending: false,
                    final_status: None,
                    auth: None,
                    auth_sent: false,
                    sent: None,
                }],
                winner: Some(0),
                caller_aor: record.caller_aor,
                callee_aor: record.callee_aor,
                answered_at_ms: record.answered_at_ms,
                max_duration: None,
                cutoff_at,
                ring_deadline: None,
                no_answer_at: None,
                unanswered_cause: None,
                caller_answer: None,
                hunt: std::collections::VecDeque::new(),
                auto_answer: false,
                asserted: None,
                session_interval: None,
                session_deadline: None,
            },
        );
        // A full interval from now: the refresher may have refreshed just before the takeover.
        self.arm_session_timer(cx, id, session);
    }

    /// Starts, restarts or (with `None`) stops the session timer of `call`: a refresh
    /// answered 2xx arms it for one more interval; a 2xx without `Session-Expires` turns it off
    /// (RFC 4028 §9).
    pub(super) fn arm_session_timer(
        &mut self,
        cx: &Ctx<'_>,
        call: u64,
        interval: Option<std::time::Duration>,
    ) {
        let Some(c) = self.calls.get_mut(&call) else { return };
        if let Some(old) = c.session_deadline.take() {
            self.deadlines.remove(&(old, call));
        }
        c.session_interval = interval;
        if let Some(d) = interval {
            let at = cx.now.mono + d;
            c.session_deadline = Some(at);
            self.deadlines.insert((at, call));
        }
    }

    /// When [`B2bua::handle_deadlines`] must next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    /// Ends the answered call `call_ref` on an operator's order: BYE to both legs with a
    /// `Reason` header, accounting stop with cause `admin`. `false` if no such answered call is
    /// held here.
    pub fn hang_up(&mut self, cx: &mut Ctx<'_>, call_ref: &str) -> bool {
        let Some((&call, c)) = self.calls.iter().find(|(_, c)| c.call_ref == call_ref) else {
            return false;
        };
        let (CallState::Answered, Some(w)) = (c.state, c.winner) else { return false };
        tracing::info!(%call_ref, "operator hang-up");
        self.send_bye(cx, call, Side::A, ADMIN_REASON);
        self.send_bye(cx, call, Side::B(w), ADMIN_REASON);
        self.end_call(cx, call, "admin");
        true
    }

    /// Cuts off answered calls that reached their maximum duration: BYE to both legs with a
    /// `Reason` header, and an accounting stop with cause `cut-off`.
    pub fn handle_deadlines(&mut self, cx: &mut Ctx<'_>) {
        while let Some(&(at, call)) = self.deadlines.first() {
            if at > cx.now.mono {
                break;
            }
            self.deadlines.remove(&(at, call));
            let Some(c) = self.calls.get(&call) else { continue };
            if c.state == CallState::Setup && c.ring_deadline == Some(at) {
                self.ring_timeout(cx, call);
                continue;
            }
            if c.state == CallState::Answered
                && c.session_deadline == Some(at)
                && let Some(w) = c.winner
            {
                tracing::info!(call_ref = %c.call_ref, "session not refreshed in time: ending the call");
                self.send_bye(cx, call, Side::A, SESSION_EXPIRED_REASON);
                self.send_bye(cx, call, Side::B(w), SESSION_EXPIRED_REASON);
                self.end_call(cx, call, "session-expired");
                continue;
            }
            if c.state != CallState::Answered || c.cutoff_at != Some(at) {
                continue;
            }
            let Some(w) = c.winner else { continue };
            tracing::info!(call_ref = %c.call_ref, "maximum call duration reached: cutting off");
            self.send_bye(cx, call, Side::A, CUTOFF_REASON);
            self.send_bye(cx, call, Side::B(w), CUTOFF_REASON);
            self.end_call(cx, call, "cut-off");
        }
    }

    /// Keeps the ACK of a call's answered branch while its 2xx may still be retransmitted.
    fn keep_late_ack(&mut self, cx: &Ctx<'_>, call: u64) {
        self.expire_late_acks(cx.now.mono);
        let Some(c) = self.calls.get(&call) else { return };
        let Some(b) = c.winner.and_then(|w| c.branches.get(w)) else { return };
        let (Some(key), Some(ack)) = (&b.key, &b.dialog.last_ack) else { return };
        let window_ms = u64::try_from(self.ack_window.as_millis()).unwrap_or(u64::MAX);
        if cx.now.wall_ms >= c.answered_at_ms.saturating_add(window_ms) {
            return;
        }
        self.late_acks.insert(key.clone(), ack.clone());
        self.late_ack_expiry.push_back((cx.now.mono + self.ack_window, key.clone()));
    }

    /// A 2xx for a branch whose call has ended: its ACK again, if kept.
    fn late_ack(&mut self, cx: &mut Ctx<'_>, key: &ClientKey, resp: &SipMessage) {
        self.expire_late_acks(cx.now.mono);
        if resp.status().is_some_and(|s| (200..300).contains(&s))
            && let Some(ack) = self.late_acks.get(key)
        {
            cx.out.push_back(ack.clone());
        }
    }

    fn expire_late_acks(&mut self, now: Instant) {
        while let Some((at, key)) = self.late_ack_expiry.front() {
            if *at > now {
                break;
            }
            self.late_acks.remove(key);
            self.late_ack_expiry.pop_front();
        }
    }

    fn remove_call(&mut self, call: u64) {
        if let Some(c) = self.calls.remove(&call) {
            for at in [c.ring_deadline, c.cutoff_at, c.session_deadline].into_iter().flatten() {
                self.deadlines.remove(&(at, call));
            }
            self.by_call_id.remove(&c.a.call_id);
            if let Some(k) = &c.a_key {
                self.by_server.remove(k);
            }
            for b in &c.branches {
                self.by_call_id.remove(&b.dialog.call_id);
                if let Some(k) = &b.key
                    && let Some(Pending::Branch { .. }) = self.by_client.get(k)
                {
                    self.by_client.remove(k);
                }
            }
            self.by_client.retain(|_, p| match p {
                Pending::Relay { call: id, .. } => *id != call,
                _ => true,
            });
        }
    }
}

//! The back-to-back user agent: one call = the caller's leg (A) and one or more callee legs (B,
//! one per binding, forked in parallel). Sans-IO: driven by transaction events and plans from
//! the async call-setup task, it talks to the [`TransactionLayer`] and queues transmits and
//! accounting work; it never touches a socket, Redis or billing itself.
//!
//! DESIGN.md rules 1–3 are applied here: every B leg is sent from the socket its callee
//! registered through, with the From/To host of that socket's domain (the alias IP for an
//! alias), and our Via/Contact on that same socket.

use std::collections::HashMap;
use std::time::Instant;

use sipalias_proto::billing::{AccountingStartRequest, AccountingStopRequest};
use sipmsg::SipMessage;
use sipmsg::headers::NameAddr;

use crate::ids::Ids;
use crate::transaction::{ClientKey, ServerKey, TransactionLayer};
use crate::transport::{Egress, Ingress, Transmit};

/// Headers copied from one leg's request to the other's.
const REQUEST_HEADERS: &[&str] = &[
    "content-type",
    "content-disposition",
    "content-encoding",
    "content-language",
    "allow",
    "accept",
    "alert-info",
    "call-info",
    "privacy",
    "reason",
    "event",
    "subscription-state",
    "info-package",
    "recv-info",
];

/// Headers copied from a response on one leg to the response on the other.
const RESPONSE_HEADERS: &[&str] = &[
    "content-type",
    "content-disposition",
    "content-encoding",
    "content-language",
    "allow",
    "accept",
    "warning",
    "reason",
    "retry-after",
    "call-info",
    "unsupported",
];

/// One callee binding to ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The binding's Contact: the B-leg Request-URI.
    pub contact: String,
    /// Socket it registered through and the address to send to.
    pub egress: Egress,
    /// From/To host: the alias IP for an alias socket, the main domain otherwise.
    pub host: String,
}

/// What the async setup task decided for a new call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallPlan {
    /// Authenticated caller, `user@domain`.
    pub caller_aor: String,
    /// Callee, `user@domain`.
    pub callee_aor: String,
    /// Every binding of the callee.
    pub targets: Vec<Target>,
    /// Longest call allowed by billing, 0 = unlimited.
    pub max_duration_secs: u32,
    /// The call's id towards billing (reservation, start and stop), minted by the processor.
    pub call_ref: String,
    /// The caller may make the callee's phone answer by itself (`trusted_auto_answer`): its
    /// auto-answer headers are passed on instead of removed.
    pub auto_answer: bool,
}

/// Work for the async shell.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// A REGISTER to authenticate and apply.
    Register {
        /// Its server transaction.
        key: ServerKey,
        /// The request.
        request: SipMessage,
        /// Where it came from.
        ingress: Ingress,
    },
    /// A new INVITE to authenticate, authorize and route.
    Invite {
        /// Its server transaction.
        key: ServerKey,
        /// The request.
        request: SipMessage,
        /// Where it came from.
        ingress: Ingress,
    },
    /// A keepalive OPTIONS to binding `field` of `aor` was answered (`ok`) or timed out.
    KeepaliveResult {
        /// The AOR.
        aor: String,
        /// The binding's field in the AOR's hash.
        field: String,
        /// Answered (any response) rather than timed out.
        ok: bool,
    },
    /// Store (or update) an answered call in Redis.
    SaveDialog(Box<DialogRecord>),
    /// Remove an ended call from Redis.
    DeleteDialog(Box<DialogRecord>),
    /// An ACK (for a 2xx) for a call this processor does not hold: look for it in Redis, then
    /// relay it.
    LoadDialogForAck {
        /// The ACK.
        request: SipMessage,
    },
    /// An in-dialog request for a call this processor does not hold: look for it in Redis.
    LoadDialog {
        /// Its server transaction.
        key: ServerKey,
        /// The request.
        request: SipMessage,
    },
    /// Tell billing a call ended (an answered one carries its start).
    AccountingStop(AccountingStopRequest),
}

/// Which leg of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Side {
    A,
    /// A B leg: index of its branch.
    B(usize),
}

/// One side of an established or early dialog, as we (the B2BUA) see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Dialog {
    pub(crate) call_id: String,
    pub(crate) local_tag: String,
    pub(crate) remote_tag: Option<String>,
    /// Our URI on this leg (From of requests we send), without tag.
    pub(crate) local_uri: String,
    /// The peer's URI (To of requests we send), without tag.
    pub(crate) remote_uri: String,
    pub(crate) remote_target: String,
    pub(crate) route_set: Vec<String>,
    pub(crate) local_cseq: u32,
    pub(crate) egress: Egress,
    /// Our Contact on this leg.
    pub(crate) contact: String,
    /// CSeq of the last INVITE we sent on this leg (for its ACK).
    pub(crate) invite_cseq: u32,
    /// The last ACK we sent, re-sent when a 2xx is retransmitted.
    #[serde(skip)]
    pub(crate) last_ack: Option<Transmit>,
}

/// An answered call as stored in Redis, so that any processor can carry on with it when the
/// one holding it is gone (see `docs/redis-data-model.md`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DialogRecord {
    /// The call's id towards billing.
    pub call_ref: String,
    /// Caller AOR.
    pub caller_aor: String,
    /// Callee AOR.
    pub callee_aor: String,
    /// Local IP the caller came in on.
    pub a_ingress_ip: String,
    /// Answer time, Unix ms.
    pub answered_at_ms: u64,
    /// When the call must be cut off, Unix ms, if it has a maximum duration.
    pub cutoff_at_ms: Option<u64>,
    /// The caller's leg.
    pub a: Dialog,
    /// The callee's leg.
    pub b: Dialog,
}

impl DialogRecord {
    /// Call-IDs of both legs (each indexes the record).
    pub fn call_ids(&self) -> [&str; 2] {
        [&self.a.call_id, &self.b.call_id]
    }
}

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
    a_ingress_ip: String,
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

impl Dialog {
    /// Whether an in-dialog request (or ACK) received on this leg carries its dialog id
    /// (RFC 3261 §12.2.2): our tag in To and the peer's tag in From. The Call-ID alone is no
    /// proof: whoever saw it (an INVITE's recipient, a capture) could otherwise end or
    /// redirect someone else's call.
    fn owns(&self, req: &SipMessage) -> bool {
        let (Ok(from), Ok(to)) = (req.from(), req.to()) else { return false };
        to.tag() == Some(self.local_tag.as_str()) && from.tag() == self.remote_tag.as_deref()
    }
}

impl DialogRecord {
    /// Whether `req` belongs to this stored call: its Call-ID and both tags of one leg.
    pub fn owns(&self, req: &SipMessage) -> bool {
        let call_id = req.call_id().unwrap_or_default();
        [&self.a, &self.b].into_iter().any(|d| d.call_id == call_id && d.owns(req))
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
    pub out: &'a mut Vec<Transmit>,
    /// Async work for the shell.
    pub work: &'a mut Vec<Work>,
    /// Monotonic now.
    pub now: Instant,
    /// Wall clock, Unix ms.
    pub wall_ms: u64,
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
}

/// Reason header of the BYEs sent when billing's maximum duration is reached.
pub const CUTOFF_REASON: &str = "SIP;cause=200;text=\"Maximum call duration reached\"";

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
        }
    }

    /// Number of calls held (in setup or answered).
    pub fn len(&self) -> usize {
        self.calls.len()
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

    /// Starts ringing every target of `plan` for the caller's INVITE on server transaction `key`.
    /// If the caller gave up meanwhile (the transaction is final), nothing is sent and `false`
    /// is returned (the caller then releases billing's reservation).
    pub fn start_call(
        &mut self,
        cx: &mut Ctx<'_>,
        key: ServerKey,
        plan: CallPlan,
        ingress: &Ingress,
    ) -> bool {
        if cx.tx.server_is_final(&key) {
            return false;
        }
        let Some(invite) = cx.tx.server_request(&key).cloned() else { return false };
        let (Ok(from), Ok(to), Ok(call_id), Ok(cseq)) =
            (invite.from(), invite.to(), invite.call_id(), invite.cseq())
        else {
            return false;
        };
        if self.holds(call_id) {
            // Another INVITE with this Call-ID was set up while this one was authorized: a
            // merged request (RFC 3261 §8.2.2.2). It never shares the other call's legs.
            let resp =
                SipMessage::response_to(&invite, 482, "Loop Detected", Some(&self.ids.tag()));
            let _ = cx.tx.respond(cx.now, &key, resp);
            return false;
        }
        let local_tag = self.ids.tag();
        let a_contact = self.contact_for(&ingress.reply_egress());
        let a = Dialog {
            call_id: call_id.to_owned(),
            local_tag: local_tag.clone(),
            remote_tag: from.tag().map(str::to_owned),
            local_uri: strip_params(&to),
            remote_uri: strip_params(&from),
            remote_target: first_contact(&invite).unwrap_or_else(|| from.uri.to_string()),
            route_set: invite.header_list("record-route").iter().map(|s| (*s).to_owned()).collect(),
            local_cseq: 0,
            egress: ingress.reply_egress(),
            contact: a_contact,
            invite_cseq: cseq.seq,
            last_ack: None,
        };
        let max_forwards = invite
            .header("max-forwards")
            .and_then(|v| v.trim().parse::<u32>().ok())
            .map_or(70, |m| m.saturating_sub(1).min(70));
        let caller_user = plan.caller_aor.split('@').next().unwrap_or("anonymous").to_owned();
        let callee_user = plan.callee_aor.split('@').next().unwrap_or_default().to_owned();

        let id = self.next_call;
        self.next_call += 1;
        let mut branches = Vec::with_capacity(plan.targets.len());
        for (idx, t) in plan.targets.iter().enumerate() {
            let b_call_id = self.ids.call_id();
            let mut from_na = NameAddr::new(sipmsg::Uri::sip(Some(&caller_user), &t.host, None));
            from_na.display = from.display.clone();
            let dialog = Dialog {
                call_id: b_call_id.clone(),
                local_tag: self.ids.tag(),
                remote_tag: None,
                local_uri: from_na.to_string(),
                remote_uri: NameAddr::new(sipmsg::Uri::sip(Some(&callee_user), &t.host, None))
                    .to_string(),
                remote_target: t.contact.clone(),
                route_set: Vec::new(),
                local_cseq: 1,
                egress: t.egress.clone(),
                contact: self.contact_for(&t.egress),
                invite_cseq: 1,
                last_ack: None,
            };
            let mut req = self.build_request(&dialog, "INVITE", 1, &invite, REQUEST_HEADERS);
            if plan.auto_answer {
                for h in
                    invite.headers.iter().filter(|h| AUTO_ANSWER_HEADERS.contains(&h.key.as_str()))
                {
                    req.headers.push(h.clone());
                }
            } else {
                strip_auto_answer(&mut req);
            }
            req.set_header("Max-Forwards", max_forwards.to_string());
            let key = cx.tx.start_client(cx.now, req, t.egress.clone());
            self.by_client.insert(key.clone(), Pending::Branch { call: id, idx });
            self.by_call_id.insert(b_call_id, (id, Side::B(idx)));
            branches.push(Branch {
                key: Some(key),
                dialog,
                state: BranchState::Calling,
                cancel_pending: false,
                final_status: None,
            });
        }
        self.by_call_id.insert(call_id.to_owned(), (id, Side::A));
        self.by_server.insert(key.clone(), id);
        let no_answer_at = self.no_answer.map(|d| cx.now + d);
        let ring_deadline = ring_deadline(cx.now + self.timer_c, no_answer_at);
        self.deadlines.insert((ring_deadline, id));
        self.calls.insert(
            id,
            Call {
                call_ref: plan.call_ref.clone(),
                state: CallState::Setup,
                a_key: Some(key),
                a_invite: Some(invite),
                a,
                a_ingress_ip: ingress.local.addr.ip().to_string(),
                branches,
                winner: None,
                caller_aor: plan.caller_aor,
                callee_aor: plan.callee_aor,
                answered_at_ms: 0,
                max_duration: (plan.max_duration_secs > 0)
                    .then(|| std::time::Duration::from_secs(u64::from(plan.max_duration_secs))),
                cutoff_at: None,
                ring_deadline: Some(ring_deadline),
                no_answer_at,
                unanswered_cause: None,
            },
        );
        true
    }

    /// The stored form of an answered call.
    fn record(&self, call: u64, cx: &Ctx<'_>) -> Option<DialogRecord> {
        let c = self.calls.get(&call)?;
        let w = c.winner?;
        let cutoff_at_ms = c.cutoff_at.map(|at| {
            cx.wall_ms
                + u64::try_from(at.saturating_duration_since(cx.now).as_millis()).unwrap_or(0)
        });
        Some(DialogRecord {
            call_ref: c.call_ref.clone(),
            caller_aor: c.caller_aor.clone(),
            callee_aor: c.callee_aor.clone(),
            a_ingress_ip: c.a_ingress_ip.clone(),
            answered_at_ms: c.answered_at_ms,
            cutoff_at_ms,
            a: c.a.clone(),
            b: c.branches[w].dialog.clone(),
        })
    }

    fn save(&self, cx: &mut Ctx<'_>, call: u64) {
        if let Some(r) = self.record(call, cx) {
            cx.work.push(Work::SaveDialog(Box::new(r)));
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
        let cutoff_at = record
            .cutoff_at_ms
            .map(|ms| cx.now + std::time::Duration::from_millis(ms.saturating_sub(cx.wall_ms)));
        if let Some(at) = cutoff_at {
            self.deadlines.insert((at, id));
        }
        self.by_call_id.insert(record.a.call_id.clone(), (id, Side::A));
        self.by_call_id.insert(record.b.call_id.clone(), (id, Side::B(0)));
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
            },
        );
    }

    /// When [`B2bua::handle_deadlines`] must next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    /// Cuts off answered calls that reached their maximum duration: BYE to both legs with a
    /// `Reason` header, and an accounting stop with cause `cut-off`.
    pub fn handle_deadlines(&mut self, cx: &mut Ctx<'_>) {
        while let Some(&(at, call)) = self.deadlines.first() {
            if at > cx.now {
                break;
            }
            self.deadlines.remove(&(at, call));
            let Some(c) = self.calls.get(&call) else { continue };
            if c.state == CallState::Setup && c.ring_deadline == Some(at) {
                self.ring_timeout(cx, call);
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

    /// Moves a call's ring deadline (its one entry in `deadlines`) to `at`, or drops it.
    fn set_ring_deadline(&mut self, call: u64, at: Option<Instant>) {
        let Some(c) = self.calls.get_mut(&call) else { return };
        if let Some(old) = c.ring_deadline.take() {
            self.deadlines.remove(&(old, call));
        }
        if let Some(at) = at {
            c.ring_deadline = Some(at);
            self.deadlines.insert((at, call));
        }
    }

    /// Nobody answered in time (Timer C, RFC 3261 §16.6 step 11, or the no-answer limit): the
    /// caller gets `408`, every branch is cancelled, and the call ends (releasing billing's
    /// reservation) once each branch has its final response or gave up on it (64*T1 after its
    /// CANCEL).
    fn ring_timeout(&mut self, cx: &mut Ctx<'_>, call: u64) {
        let Some(c) = self.calls.get_mut(&call) else { return };
        tracing::info!(call_ref = %c.call_ref, "no answer in time: cancelling the callee");
        c.ring_deadline = None;
        c.state = CallState::Cancelled;
        c.unanswered_cause = Some("no-answer");
        if let (Some(key), Some(invite)) = (&c.a_key, &c.a_invite) {
            let mut resp =
                SipMessage::response_to(invite, 408, "Request Timeout", Some(&c.a.local_tag));
            resp.push_header("Reason", "SIP;cause=408;text=\"No answer\"");
            let _ = cx.tx.respond(cx.now, key, resp);
        }
        for i in 0..c.branches.len() {
            self.cancel_branch(cx, call, i);
        }
        self.finish_if_all_failed(cx, call);
    }

    fn contact_for(&self, egress: &Egress) -> String {
        let mut uri = sipmsg::Uri::sip(
            Some(&self.ids.contact_user()),
            &egress.local.addr.ip().to_string(),
            Some(egress.local.addr.port()),
        );
        if egress.local.transport != crate::transport::Transport::Udp {
            uri.set_param("transport", Some(egress.local.transport.as_str()));
        }
        format!("<{uri}>")
    }

    /// A request on `dialog` with our Via/From/To/Contact, carrying `source`'s body and the
    /// listed headers.
    fn build_request(
        &self,
        d: &Dialog,
        method: &str,
        cseq: u32,
        source: &SipMessage,
        copy: &[&str],
    ) -> SipMessage {
        let mut req = dialog_request(&self.ids, d, method, cseq);
        if method != "BYE" && method != "CANCEL" {
            req.push_header("Contact", d.contact.clone());
        }
        for h in &source.headers {
            if copy.contains(&h.key.as_str()) {
                req.headers.push(h.clone());
            }
        }
        req.body = source.body.clone();
        req
    }

    /// A fresh in-dialog request on `side`, consuming a CSeq.
    fn new_request(
        &mut self,
        call: u64,
        side: Side,
        method: &str,
        source: &SipMessage,
        copy: &[&str],
    ) -> Option<(SipMessage, Egress)> {
        let c = self.calls.get_mut(&call)?;
        let d = c.dialog_mut(side);
        d.local_cseq += 1;
        if method == "INVITE" {
            d.invite_cseq = d.local_cseq;
        }
        let d = d.clone();
        Some((self.build_request(&d, method, d.local_cseq, source, copy), d.egress))
    }

    /// A response on an INVITE or in-dialog server transaction, relayed from the other leg.
    fn relay_response(
        &self,
        cx: &mut Ctx<'_>,
        key: &ServerKey,
        resp: &SipMessage,
        to_tag: Option<&str>,
        contact: Option<&str>,
    ) {
        let Some(req) = cx.tx.server_request(key).cloned() else { return };
        let status = resp.status().unwrap_or(500);
        let mut out = SipMessage::response_to(&req, status, resp.reason().unwrap_or(""), to_tag);
        if let Some(c) = contact
            && status < 300
        {
            out.push_header("Contact", c.to_owned());
        }
        for h in &resp.headers {
            if RESPONSE_HEADERS.contains(&h.key.as_str()) {
                out.headers.push(h.clone());
            }
        }
        out.body = resp.body.clone();
        if let Err(e) = cx.tx.respond(cx.now, key, out) {
            tracing::debug!(?e, status, "could not relay response");
        }
    }

    /// A response from a client transaction the B2BUA started.
    pub fn handle_response(&mut self, cx: &mut Ctx<'_>, key: ClientKey, resp: SipMessage) {
        match self.by_client.get(&key).cloned() {
            Some(Pending::Branch { call, idx }) => self.branch_response(cx, call, idx, resp),
            Some(Pending::Relay { call, origin, method, target_side }) => {
                if resp.status().unwrap_or(0) >= 200 {
                    self.by_client.remove(&key);
                }
                self.relayed_response(cx, call, &origin, &method, target_side, &resp);
            }
            Some(Pending::Ignore) if resp.status().unwrap_or(0) >= 200 => {
                self.by_client.remove(&key);
            }
            Some(Pending::Ignore) => {}
            None => {}
        }
    }

    /// A client transaction timed out (Timer B/F): treated as a `408`.
    pub fn handle_timeout(&mut self, cx: &mut Ctx<'_>, key: ClientKey) {
        let mut synthetic = SipMessage::response(408, "Request Timeout");
        synthetic.push_header("CSeq", "0 INVITE");
        match self.by_client.get(&key).cloned() {
            Some(Pending::Branch { call, idx }) => self.branch_response(cx, call, idx, synthetic),
            Some(Pending::Relay { call, origin, method, target_side }) => {
                self.by_client.remove(&key);
                self.relayed_response(cx, call, &origin, &method, target_side, &synthetic);
            }
            _ => {
                self.by_client.remove(&key);
            }
        }
    }

    fn branch_response(&mut self, cx: &mut Ctx<'_>, call: u64, idx: usize, resp: SipMessage) {
        let status = resp.status().unwrap_or(500);
        let ids = self.ids.clone();
        let Some(c) = self.calls.get_mut(&call) else { return };
        let remote_tag = resp.to().ok().and_then(|t| t.tag().map(str::to_owned));
        match status {
            100 => {}
            101..=199 => {
                let b = &mut c.branches[idx];
                if b.state == BranchState::Calling {
                    b.state = BranchState::Early;
                }
                // The early dialog's tag: in-dialog requests from this callee must carry it.
                if b.dialog.remote_tag.is_none() {
                    b.dialog.remote_tag = remote_tag.clone();
                }
                if c.state == CallState::Setup {
                    // Each provisional restarts Timer C; the no-answer limit stays put.
                    let at = ring_deadline(cx.now + self.timer_c, c.no_answer_at);
                    self.set_ring_deadline(call, Some(at));
                }
                let Some(c) = self.calls.get_mut(&call) else { return };
                let b = &mut c.branches[idx];
                if b.cancel_pending {
                    b.cancel_pending = false;
                    self.cancel_branch(cx, call, idx);
                    return;
                }
                if c.state == CallState::Setup
                    && let Some(key) = c.a_key.clone()
                {
                    let (tag, contact) = (c.a.local_tag.clone(), c.a.contact.clone());
                    let has_tag = remote_tag.is_some();
                    self.relay_response(
                        cx,
                        &key,
                        &resp,
                        Some(&tag),
                        has_tag.then_some(contact.as_str()),
                    );
                }
            }
            200..=299 => {
                if c.winner == Some(idx) {
                    // A retransmitted 2xx: our ACK was lost (RFC 3261 §13.2.2.4).
                    if let Some(ack) = c.branches[idx].dialog.last_ack.clone() {
                        cx.out.push(ack);
                    }
                    return;
                }
                let b = &mut c.branches[idx];
                b.dialog.remote_tag = remote_tag;
                if let Some(t) = first_contact(&resp) {
                    b.dialog.remote_target = t;
                }
                b.dialog.route_set = resp
                    .header_list("record-route")
                    .iter()
                    .rev()
                    .map(|s| (*s).to_owned())
                    .collect();
                if c.state != CallState::Setup || c.winner.is_some() {
                    // Lost the race, or the caller cancelled: ACK and hang up this branch.
                    b.state = BranchState::Done;
                    let d = b.dialog.clone();
                    let ack = build_ack(&ids, &d, d.invite_cseq, &SipMessage::response(200, ""));
                    cx.out.push(Transmit { egress: d.egress.clone(), bytes: ack.to_bytes() });
                    self.send_bye(
                        cx,
                        call,
                        Side::B(idx),
                        "SIP;cause=200;text=\"Call completed elsewhere\"",
                    );
                    return;
                }
                b.state = BranchState::Answered;
                c.winner = Some(idx);
                c.state = CallState::Answered;
                c.answered_at_ms = cx.wall_ms;
                if let Some(old) = c.ring_deadline.take() {
                    self.deadlines.remove(&(old, call));
                }
                if let Some(max) = c.max_duration {
                    let at = cx.now + max;
                    c.cutoff_at = Some(at);
                    self.deadlines.insert((at, call));
                }
                let (tag, contact, a_key) =
                    (c.a.local_tag.clone(), c.a.contact.clone(), c.a_key.clone());
                let others: Vec<usize> = (0..c.branches.len()).filter(|i| *i != idx).collect();
                self.save(cx, call);
                if let Some(key) = a_key {
                    self.relay_response(cx, &key, &resp, Some(&tag), Some(&contact));
                }
                for i in others {
                    self.cancel_branch(cx, call, i);
                }
            }
            _ => {
                let b = &mut c.branches[idx];
                if b.state == BranchState::Done {
                    // Already failed (e.g. 430 on a dead flow); its transaction's late timeout
                    // or a stray final changes nothing.
                    return;
                }
                b.state = BranchState::Done;
                b.final_status = Some(resp);
                self.finish_if_all_failed(cx, call);
            }
        }
    }

    /// When every branch failed and nobody answered, relay the best final response to the caller.
    fn finish_if_all_failed(&mut self, cx: &mut Ctx<'_>, call: u64) {
        let Some(c) = self.calls.get(&call) else { return };
        if c.winner.is_some() || c.branches.iter().any(|b| b.state != BranchState::Done) {
            return;
        }
        if c.state == CallState::Setup
            && let (Some(key), Some(req)) = (c.a_key.clone(), c.a_invite.clone())
        {
            let best = best_final(c.branches.iter().filter_map(|b| b.final_status.as_ref()));
            let tag = c.a.local_tag.clone();
            match best {
                Some(resp) => {
                    let resp = resp.clone();
                    self.relay_response(cx, &key, &resp, Some(&tag), None);
                }
                None => {
                    let resp =
                        SipMessage::response_to(&req, 480, "Temporarily Unavailable", Some(&tag));
                    let _ = cx.tx.respond(cx.now, &key, resp);
                }
            }
        }
        let cause = match c.unanswered_cause {
            Some(cause) => cause,
            None if c.state == CallState::Cancelled => "cancelled",
            None => "not-answered",
        };
        self.end_call(cx, call, cause);
    }

    /// Sends CANCEL on branch `idx` if it has a provisional response, or marks it to be
    /// cancelled when one arrives (RFC 3261 §9.1).
    fn cancel_branch(&mut self, cx: &mut Ctx<'_>, call: u64, idx: usize) {
        let Some(c) = self.calls.get_mut(&call) else { return };
        let b = &mut c.branches[idx];
        match b.state {
            BranchState::Calling => b.cancel_pending = true,
            BranchState::Early => {
                if let Some(invite) = b.key.clone()
                    && let Some((cancel, egress)) = cx.tx.cancel_request(&invite)
                {
                    let k = cx.tx.start_client(cx.now, cancel, egress);
                    self.by_client.insert(k, Pending::Ignore);
                    cx.tx.cancel_sent(cx.now, &invite);
                }
            }
            _ => {}
        }
    }

    /// The dispatcher could not use stream connection `connection_id` for a flow-only send
    /// (RFC 5626): every branch still calling over it fails with `430 Flow Failed`.
    pub fn flow_failed(&mut self, cx: &mut Ctx<'_>, connection_id: u64) {
        let mut hit = Vec::new();
        for (id, c) in &self.calls {
            for (idx, b) in c.branches.iter().enumerate() {
                if b.dialog.egress.flow_only
                    && b.dialog.egress.connection_id == connection_id
                    && b.state == BranchState::Calling
                {
                    hit.push((*id, idx));
                }
            }
        }
        for (call, idx) in hit {
            let mut resp = SipMessage::response(430, "Flow Failed");
            resp.push_header("CSeq", "1 INVITE");
            self.branch_response(cx, call, idx, resp);
        }
    }

    /// The caller's CANCEL matched INVITE server transaction `key`. Returns false if no call
    /// holds it (the caller then answers 487 itself).
    pub fn cancel(&mut self, cx: &mut Ctx<'_>, key: &ServerKey) -> bool {
        let Some(&call) = self.by_server.get(key) else { return false };
        let Some(c) = self.calls.get_mut(&call) else { return false };
        if c.state != CallState::Setup {
            return true;
        }
        c.state = CallState::Cancelled;
        if let Some(old) = c.ring_deadline.take() {
            self.deadlines.remove(&(old, call));
        }
        if let Some(invite) = &c.a_invite {
            let resp =
                SipMessage::response_to(invite, 487, "Request Terminated", Some(&c.a.local_tag));
            let _ = cx.tx.respond(cx.now, key, resp);
        }
        for i in 0..c.branches.len() {
            self.cancel_branch(cx, call, i);
        }
        true
    }

    /// An in-dialog request (To tag present) on server transaction `key`. Returns false when it
    /// belongs to no call we hold (the caller answers 481).
    pub fn handle_in_dialog(&mut self, cx: &mut Ctx<'_>, key: ServerKey, req: &SipMessage) -> bool {
        let Ok(call_id) = req.call_id() else { return false };
        let Some(&(call, side)) = self.by_call_id.get(call_id) else { return false };
        let Some(c) = self.calls.get_mut(&call) else { return false };
        if !c.dialog(side).owns(req) {
            tracing::info!(call_ref = %c.call_ref, method = req.method().unwrap_or_default(), "in-dialog request with another dialog's tags: 481");
            return false;
        }
        let Some(other) = c.other(side) else { return false };
        let method = req.method().unwrap_or_default().to_owned();
        // Target refresh (RFC 3261 §12.2.2): a re-INVITE or UPDATE may move the peer.
        if (method == "INVITE" || method == "UPDATE")
            && let Some(t) = first_contact(req)
        {
            c.dialog_mut(side).remote_target = t;
        }
        if method == "BYE" {
            let ok = SipMessage::response_to(req, 200, "OK", None);
            let _ = cx.tx.respond(cx.now, &key, ok);
            let cause = if side == Side::A { "caller-bye" } else { "callee-bye" };
            let reason = req.header("reason").map(str::to_owned);
            self.send_bye_with(cx, call, other, reason.as_deref(), Some(req));
            self.end_call(cx, call, cause);
            return true;
        }
        let Some((out, egress)) = self.new_request(call, other, &method, req, REQUEST_HEADERS)
        else {
            return false;
        };
        let k = cx.tx.start_client(cx.now, out, egress);
        self.by_client.insert(k, Pending::Relay { call, origin: key, method, target_side: other });
        // The CSeq (and maybe the target) changed: keep the stored call current for takeover.
        self.save(cx, call);
        true
    }

    fn relayed_response(
        &mut self,
        cx: &mut Ctx<'_>,
        call: u64,
        origin: &ServerKey,
        method: &str,
        target_side: Side,
        resp: &SipMessage,
    ) {
        let Some(c) = self.calls.get_mut(&call) else {
            return;
        };
        let status = resp.status().unwrap_or(500);
        let mut refreshed = false;
        if (200..300).contains(&status)
            && (method == "INVITE" || method == "UPDATE")
            && let Some(t) = first_contact(resp)
        {
            c.dialog_mut(target_side).remote_target = t;
            refreshed = true;
        }
        let origin_side =
            if target_side == Side::A { c.winner.map(Side::B) } else { Some(Side::A) };
        let contact = origin_side.map(|s| c.dialog_mut(s).contact.clone());
        if refreshed {
            self.save(cx, call);
        }
        let with_contact = matches!(method, "INVITE" | "UPDATE" | "SUBSCRIBE");
        self.relay_response(
            cx,
            origin,
            resp,
            None,
            if with_contact { contact.as_deref() } else { None },
        );
    }

    /// An ACK for a 2xx (a transaction of its own): relay it end to end.
    /// Returns false when the ACK's call is not held here (it may be in Redis).
    pub fn handle_ack(&mut self, cx: &mut Ctx<'_>, req: &SipMessage) -> bool {
        let Ok(call_id) = req.call_id() else { return true };
        let Some(&(call, side)) = self.by_call_id.get(call_id) else { return false };
        let ids = self.ids.clone();
        let Some(c) = self.calls.get_mut(&call) else { return true };
        if !c.dialog(side).owns(req) {
            tracing::info!(call_ref = %c.call_ref, "ACK with another dialog's tags dropped");
            return true;
        }
        let Some(other) = c.other(side) else { return true };
        let d = c.dialog_mut(other);
        let ack = build_ack(&ids, d, d.invite_cseq, req);
        let t = Transmit { egress: d.egress.clone(), bytes: ack.to_bytes() };
        d.last_ack = Some(t.clone());
        cx.out.push(t);
        true
    }

    /// The caller never ACKed our 2xx (RFC 3261 §13.3.1.4): hang up both legs.
    pub fn handle_ack_timeout(&mut self, cx: &mut Ctx<'_>, key: &ServerKey) {
        let Some(&call) = self.by_server.get(key) else { return };
        let Some(c) = self.calls.get(&call) else { return };
        if let Some(w) = c.winner {
            self.send_bye(cx, call, Side::A, "SIP;cause=408;text=\"ACK timeout\"");
            self.send_bye(cx, call, Side::B(w), "SIP;cause=408;text=\"ACK timeout\"");
        }
        self.end_call(cx, call, "ack-timeout");
    }

    fn send_bye(&mut self, cx: &mut Ctx<'_>, call: u64, side: Side, reason: &str) {
        self.send_bye_with(cx, call, side, Some(reason), None);
    }

    fn send_bye_with(
        &mut self,
        cx: &mut Ctx<'_>,
        call: u64,
        side: Side,
        reason: Option<&str>,
        source: Option<&SipMessage>,
    ) {
        let empty = SipMessage::request("BYE", "");
        let Some((mut bye, egress)) =
            self.new_request(call, side, "BYE", source.unwrap_or(&empty), &[])
        else {
            return;
        };
        bye.body = bytes::Bytes::new();
        if let Some(r) = reason {
            bye.push_header("Reason", r.to_owned());
        }
        let k = cx.tx.start_client(cx.now, bye, egress);
        self.by_client.insert(k, Pending::Ignore);
    }

    /// Removes a call and tells billing: an answered call is charged; for one that never was,
    /// the stop only releases what authorization reserved.
    fn end_call(&mut self, cx: &mut Ctx<'_>, call: u64, cause: &str) {
        if let Some(r) = self.record(call, cx) {
            cx.work.push(Work::DeleteDialog(Box::new(r)));
        }
        if let Some(c) = self.calls.get(&call) {
            let answered = c.state == CallState::Answered;
            // Billing hears of the answer with the stop: one round trip per call instead of
            // two. Whoever ends the call (the answering processor or one that took it over
            // from Redis) knows the answer from the call's record.
            let start = c.winner.filter(|_| answered).map(|w| AccountingStartRequest {
                call_ref: c.call_ref.clone(),
                caller: c.caller_aor.clone(),
                callee: c.callee_aor.clone(),
                answered_at_ms: c.answered_at_ms,
                callee_ingress_ip: c.branches[w].dialog.egress.local.addr.ip().to_string(),
                caller_ingress_ip: c.a_ingress_ip.clone(),
            });
            cx.work.push(Work::AccountingStop(AccountingStopRequest {
                call_ref: c.call_ref.clone(),
                ended_at_ms: cx.wall_ms,
                cause: cause.to_owned(),
                idempotency_key: format!("{};stop", c.call_ref),
                answered,
                start,
            }));
        }
        self.remove_call(call);
    }

    fn remove_call(&mut self, call: u64) {
        if let Some(c) = self.calls.remove(&call) {
            for at in [c.ring_deadline, c.cutoff_at].into_iter().flatten() {
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

/// When a ringing call is given up: Timer C from now, or the no-answer limit if sooner.
fn ring_deadline(timer_c_at: Instant, no_answer_at: Option<Instant>) -> Instant {
    no_answer_at.map_or(timer_c_at, |n| n.min(timer_c_at))
}

/// Headers that ask the callee's phone to answer by itself (RFC 5373), passed on only for
/// trusted callers.
const AUTO_ANSWER_HEADERS: &[&str] = &["answer-mode", "priv-answer-mode"];

/// Removes from a request to a callee the `Call-Info` and `Alert-Info` entries that make
/// phones answer by themselves (`answer-after=`, `info=alert-autoanswer` and the vendor
/// spellings: auto-answer, intercom). A caller could otherwise open a microphone in someone's
/// room. Other entries (ringtones, pictures) stay.
pub fn strip_auto_answer(req: &mut SipMessage) {
    req.headers.retain_mut(|h| {
        if h.key != "call-info" && h.key != "alert-info" {
            return !AUTO_ANSWER_HEADERS.contains(&h.key.as_str());
        }
        let kept: Vec<&str> =
            sipmsg::headers::split_list(&h.value).filter(|e| !asks_auto_answer(e)).collect();
        if kept.is_empty() {
            return false;
        }
        h.value = kept.join(", ");
        true
    });
}

/// Whether one `Call-Info`/`Alert-Info` entry asks for auto-answer, however it is spelt.
fn asks_auto_answer(entry: &str) -> bool {
    let squashed: String = entry
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    ["answerafter", "autoanswer", "intercom"].iter().any(|k| squashed.contains(k))
}

/// ACK for a 2xx on dialog `d` (RFC 3261 §13.2.2.4): a new branch, the INVITE's CSeq number.
fn build_ack(ids: &Ids, d: &Dialog, cseq: u32, source: &SipMessage) -> SipMessage {
    let mut ack = dialog_request(ids, d, "ACK", cseq);
    if !source.body.is_empty() {
        if let Some(ct) = source.header("content-type") {
            ack.push_header("Content-Type", ct.to_owned());
        }
        ack.body = source.body.clone();
    }
    ack
}

/// The headers every request we send on dialog `d` starts with (RFC 3261 §12.2.1.1): a new
/// Via branch on the dialog's socket, its route set, From/To with tags, Call-ID and CSeq.
fn dialog_request(ids: &Ids, d: &Dialog, method: &str, cseq: u32) -> SipMessage {
    let mut req = SipMessage::request(method, d.remote_target.clone());
    req.push_header(
        "Via",
        format!(
            "SIP/2.0/{} {};branch={};rport",
            d.egress.local.transport.via_token(),
            d.egress.local.addr,
            ids.branch()
        ),
    );
    req.push_header("Max-Forwards", "70");
    for r in &d.route_set {
        req.push_header("Route", r.clone());
    }
    req.push_header("From", format!("{};tag={}", d.local_uri, d.local_tag));
    match &d.remote_tag {
        Some(t) => req.push_header("To", format!("{};tag={t}", d.remote_uri)),
        None => req.push_header("To", d.remote_uri.clone()),
    }
    req.push_header("Call-ID", d.call_id.clone());
    req.push_header("CSeq", format!("{cseq} {method}"));
    req
}

/// The name-addr without header parameters (tag etc.), as `<uri>` with display name.
fn strip_params(n: &NameAddr) -> String {
    let mut n = n.clone();
    n.params.clear();
    n.to_string()
}

fn first_contact(m: &SipMessage) -> Option<String> {
    m.contacts().ok()?.into_iter().find(|c| !c.is_star()).map(|c| c.uri.to_string())
}

/// RFC 3261 §16.7 step 6, simplified: a 6xx wins, otherwise the lowest class, preferring
/// answers that tell the caller more than a timeout.
fn best_final<'a>(finals: impl Iterator<Item = &'a SipMessage>) -> Option<&'a SipMessage> {
    finals.min_by_key(|r| {
        let s = r.status().unwrap_or(500);
        match s {
            600..=699 => 0,
            408 => 2000,
            503 => 1500,
            _ => u32::from(s),
        }
    })
}

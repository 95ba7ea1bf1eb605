//! The processor's sans-IO core: parsed messages, timer ticks and results of async work go in;
//! transmits and async work come out. Owns the transaction layer and the B2BUA, and decides
//! what each request is for (RFC 3261 §8.2 checks, CANCEL and in-dialog matching).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use sipalias_proto::billing::AccountingStopRequest;

use sipmsg::{SipMessage, Uri};

use crate::b2bua::{B2bua, CallPlan, Ctx, DialogRecord, Work};
use crate::clock::Now;
use crate::ids::Ids;
use crate::transaction::{ClientKey, ServerKey, Timers, TransactionLayer, TxEvent};
use crate::transport::{Egress, Ingress, Transmit};

/// Methods we answer outside a dialog (sent in `Allow`).
pub const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO, REGISTER";

/// Methods RFC 3261 and common extensions define, which get `405` rather than `501`.
const KNOWN_METHODS: &[&str] =
    &["SUBSCRIBE", "NOTIFY", "PUBLISH", "MESSAGE", "REFER", "PRACK", "UPDATE", "INFO"];

/// The state machine of one processor.
pub struct Core {
    tx: TransactionLayer,
    b2bua: B2bua,
    ids: Arc<Ids>,
    out: VecDeque<Transmit>,
    work: VecDeque<Work>,
    /// Keepalive OPTIONS in flight: client transaction → (AOR, binding field).
    keepalives: HashMap<ClientKey, (String, String)>,
    /// Bounds on held work, past which new calls and registrations are turned away.
    limits: Limits,
    /// Registrations and calls being set up by async work right now (the node keeps count).
    setup_in_flight: usize,
}

/// How much a processor holds before it turns new INVITEs and REGISTERs away with `503` (in
/// dialog requests, ACK, CANCEL and responses always pass: they finish work already held).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Server transactions held.
    pub max_server_transactions: usize,
    /// Registrations and call setups waiting on Redis or billing.
    pub max_setup_in_flight: usize,
    /// `Retry-After` of the `503`.
    pub retry_after_secs: u32,
}

impl Default for Limits {
    /// No bounds (unit tests of the core).
    fn default() -> Self {
        Limits {
            max_server_transactions: usize::MAX,
            max_setup_in_flight: usize::MAX,
            retry_after_secs: 5,
        }
    }
}

/// A NAT keepalive to send to one binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keepalive {
    /// The AOR.
    pub aor: String,
    /// The binding's field in the AOR's hash.
    pub field: String,
    /// The binding's Contact (Request-URI of an OPTIONS ping).
    pub contact: String,
    /// From the socket it registered through, to the phone.
    pub egress: Egress,
    /// From/To host (the alias IP for an alias socket, the domain otherwise).
    pub host: String,
    /// Ping with OPTIONS (over UDP) rather than a CRLF keepalive.
    pub options: bool,
}

/// Async work the shell finished, handed back through [`Core::handle_done`]: the core's one
/// input for everything that needed Redis or billing.
#[derive(Debug, Clone, PartialEq)]
pub enum Done {
    /// The final answer to a REGISTER, or to an INVITE that will not ring.
    Answer {
        /// The server transaction it answers.
        key: ServerKey,
        /// The response.
        response: SipMessage,
    },
    /// An INVITE was authorized and located: ring its targets. If the caller gave up
    /// meanwhile, the core releases billing's reservation instead ([`Work::AccountingStop`]).
    Call {
        /// The INVITE's server transaction.
        key: ServerKey,
        /// What setup decided.
        plan: Box<CallPlan>,
        /// Where the INVITE came from.
        ingress: Ingress,
    },
    /// The stored call looked up for an in-dialog request ([`Work::LoadDialog`]); `None`: the
    /// call is nowhere (the request gets `481`).
    Dialog {
        /// The request's server transaction.
        key: ServerKey,
        /// The call, if stored.
        record: Option<Box<DialogRecord>>,
    },
    /// The stored call found for an ACK ([`Work::LoadDialogForAck`]): relay the ACK.
    DialogForAck {
        /// The call.
        record: Box<DialogRecord>,
        /// The ACK.
        ack: SipMessage,
    },
    /// A binding is due its NAT keepalive.
    Keepalive(Keepalive),
    /// A flow-only send over connection `connection_id` found it closed: its branches get `430`.
    FlowFailed {
        /// The dispatcher's connection id.
        connection_id: u64,
    },
}

impl Core {
    /// A core for processor `ids.node()`.
    pub fn new(timers: Timers, ids: Arc<Ids>) -> Self {
        Core {
            tx: TransactionLayer::new(timers),
            b2bua: B2bua::new(ids.clone(), &timers),
            ids,
            out: VecDeque::new(),
            work: VecDeque::new(),
            keepalives: HashMap::new(),
            limits: Limits::default(),
            setup_in_flight: 0,
        }
    }

    /// Sets the bounds on held work.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Tells the core how many registrations and call setups are in flight (the node counts
    /// its async work).
    pub fn set_setup_in_flight(&mut self, n: usize) {
        self.setup_in_flight = n;
    }

    /// Why a new INVITE or REGISTER would be turned away now, if it would.
    fn overloaded(&self) -> Option<&'static str> {
        if self.tx.len().1 >= self.limits.max_server_transactions {
            Some("server transactions at max_server_transactions")
        } else if self.setup_in_flight >= self.limits.max_setup_in_flight {
            Some("setups in flight at max_setup_in_flight")
        } else {
            None
        }
    }

    /// Entries in the transaction layer's timer queue.
    #[cfg(test)]
    pub(crate) fn timer_queue_len(&self) -> usize {
        self.tx.queue_len()
    }

    /// The B2BUA's index sizes (see `B2bua::index_sizes`).
    #[cfg(test)]
    pub(crate) fn b2bua_index_sizes(&self) -> [usize; 5] {
        self.b2bua.index_sizes()
    }

    /// (client transactions, server transactions, calls) held.
    pub fn load(&self) -> (usize, usize, usize) {
        let (c, s) = self.tx.len();
        (c, s, self.b2bua.len())
    }

    /// Answered calls per local IP their caller came in on.
    pub fn calls_up_per_ip(&self) -> std::collections::BTreeMap<std::net::IpAddr, usize> {
        self.b2bua.answered_per_ip()
    }

    /// A message from a dispatcher. A request that fails [`SipMessage::validate_request`] (or
    /// names no SIP or SIPS address-of-record in a REGISTER) is answered statelessly, before the
    /// transaction layer, with the status the error maps to: `400`, or `505` for another SIP
    /// version (ACK: dropped). A response that fails [`SipMessage::validate_response`] is dropped
    /// (RFC 4475 §3.1.2.5). See `docs/torture-tests.md`.
    pub fn handle_message(&mut self, now: Now, mut msg: SipMessage, ingress: Ingress) {
        if msg.is_request() {
            if let Err(e) = check_request(&msg) {
                self.reject(&msg, &e, &ingress);
                return;
            }
            if let Some(why) = self.overloaded()
                && starts_new_work(&msg)
                && !self.tx.holds_server(&msg)
            {
                self.shed(&msg, &ingress, why);
                return;
            }
            stamp_received(&mut msg, &ingress);
            self.tx.handle_request(now.mono, msg, ingress);
        } else {
            if let Err(e) = msg.validate_response() {
                tracing::info!(error = %e, remote = %ingress.remote, "bad response dropped");
                return;
            }
            self.tx.handle_response(now.mono, msg, ingress);
        }
        self.process_events(now);
    }

    /// Bytes from a dispatcher: what parses goes to [`Core::handle_message`]. A request whose
    /// body cannot be framed (Content-Length beyond the datagram, negative or repeated: RFC 4475
    /// clerr, ncl, mcl01) is answered `400` from its head, as RFC 3261 §18.3 asks; anything else
    /// that does not parse is dropped, since there is nothing to answer it from.
    pub fn handle_datagram(&mut self, now: Now, bytes: &[u8], ingress: Ingress) {
        match sipmsg::parse(bytes) {
            Ok(msg) => self.handle_message(now, msg, ingress),
            Err(e) => match sipmsg::parse::parse_head(bytes) {
                Ok(head) if head.is_request() => self.reject(&head, &e, &ingress),
                _ => {
                    tracing::info!(remote = %ingress.remote, error = %e, "unparseable message dropped")
                }
            },
        }
    }

    /// Answers a request that cannot be processed, statelessly (RFC 3261 §8.2). Never an ACK;
    /// never a request without a Via, which no response could be matched by. A Via that does not
    /// parse is still copied: the answer goes back to the source address regardless.
    fn reject(&mut self, req: &SipMessage, e: &sipmsg::Error, ingress: &Ingress) {
        tracing::info!(error = %e, remote = %ingress.remote, "bad request");
        if req.method() == Some("ACK") || req.header("via").is_none() {
            return;
        }
        let resp =
            SipMessage::response_to(req, e.status(), &e.reason_phrase(), Some(&self.ids.tag()));
        self.out.push_back(Transmit { egress: ingress.reply_egress(), bytes: resp.to_bytes() });
    }

    /// Turns a new INVITE or REGISTER away while overloaded: `503` with `Retry-After`, sent
    /// statelessly (no transaction is created, nothing is retransmitted, so overload costs no
    /// memory and a spoofed flood is not reflected more than once per request).
    fn shed(&mut self, req: &SipMessage, ingress: &Ingress, why: &'static str) {
        crate::telemetry::shed(why);
        tracing::debug!(remote = %ingress.remote, "overloaded ({why}): 503 to a new request");
        let mut resp =
            SipMessage::response_to(req, 503, "Service Unavailable", Some(&self.ids.tag()));
        resp.push_header("Retry-After", self.limits.retry_after_secs.to_string());
        self.out.push_back(Transmit { egress: ingress.reply_egress(), bytes: resp.to_bytes() });
    }

    /// Calls still being set up.
    pub fn calls_in_setup(&self) -> usize {
        self.b2bua.in_setup()
    }

    /// Timers due at `now`: transaction timers and call cut-offs.
    pub fn handle_timeout(&mut self, now: Now) {
        self.tx.handle_timeout(now.mono);
        self.process_events(now);
        let (b2bua, mut cx) = self.parts(now);
        b2bua.handle_deadlines(&mut cx);
        self.process_events(now);
    }

    /// Completed async work: the answer, call plan or stored call it produced.
    pub fn handle_done(&mut self, now: Now, done: Done) {
        match done {
            Done::Answer { key, response } => {
                if let Err(e) = self.tx.respond(now.mono, &key, response) {
                    tracing::debug!(?e, "response for a finished transaction dropped");
                }
            }
            Done::Call { key, plan, ingress } => self.start_call(now, key, *plan, &ingress),
            Done::Dialog { key, record } => self.adopt_and_handle(now, record.map(|r| *r), key),
            Done::DialogForAck { record, ack } => self.adopt_and_ack(now, *record, &ack),
            Done::Keepalive(ka) => self.send_keepalive(now, ka),
            Done::FlowFailed { connection_id } => {
                let (b2bua, mut cx) = self.parts(now);
                b2bua.flow_failed(&mut cx, connection_id);
            }
        }
        self.process_events(now);
    }

    /// The B2BUA and the context its handlers work in, for one step at `now`.
    fn parts(&mut self, now: Now) -> (&mut B2bua, Ctx<'_>) {
        let cx = Ctx { tx: &mut self.tx, out: &mut self.out, work: &mut self.work, now };
        (&mut self.b2bua, cx)
    }

    /// Ends answered call `call_ref` on an operator's order; `false` if it is not held here.
    pub fn hang_up(&mut self, now: Now, call_ref: &str) -> bool {
        let (b2bua, mut cx) = self.parts(now);
        let ended = b2bua.hang_up(&mut cx, call_ref);
        self.process_events(now);
        ended
    }

    /// When [`Core::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.tx.poll_timeout(), self.b2bua.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The original request of a server transaction still held, until it sends a final response.
    pub fn server_request(&self, key: &ServerKey) -> Option<&SipMessage> {
        self.tx.server_request(key)
    }

    /// Whether server transaction `key` already has a final answer (e.g. the caller cancelled).
    pub fn is_final(&self, key: &ServerKey) -> bool {
        self.tx.server_is_final(key)
    }

    /// Starts the B legs of an authorized call. If the caller gave up while it was being
    /// authorized, billing's reservation for it is released instead.
    fn start_call(&mut self, now: Now, key: ServerKey, plan: CallPlan, ingress: &Ingress) {
        let (call_ref, caller, callee) =
            (plan.call_ref.clone(), plan.caller_aor.clone(), plan.callee_aor.clone());
        let (b2bua, mut cx) = self.parts(now);
        if !b2bua.start_call(&mut cx, key, plan, ingress) {
            self.work.push_back(Work::AccountingStop(AccountingStopRequest {
                idempotency_key: format!("{call_ref};stop"),
                call_ref,
                ended_at_ms: now.wall_ms,
                cause: "cancelled".into(),
                answered: false,
                start: None,
                status: 487,
                reason: "Request Terminated".into(),
                caller,
                callee,
                caller_ingress_ip: ingress.local.addr.ip().to_string(),
            }));
        }
    }

    /// Pings a binding: an OPTIONS (a transaction, so a silent phone is noticed through Timer
    /// F) or a double-CRLF keepalive (RFC 5626 §3.5.1), from the binding's own socket.
    fn send_keepalive(&mut self, now: Now, ka: Keepalive) {
        if !ka.options {
            self.out.push_back(Transmit { egress: ka.egress, bytes: b"\r\n\r\n".to_vec() });
            return;
        }
        let mut req = SipMessage::request("OPTIONS", ka.contact.clone());
        req.push_header("Via", ka.egress.local.via(&self.ids.branch()));
        req.push_header("Max-Forwards", "70");
        req.push_header("From", format!("<sip:keepalive@{}>;tag={}", ka.host, self.ids.tag()));
        req.push_header("To", format!("<{}>", ka.contact));
        req.push_header("Call-ID", self.ids.call_id());
        req.push_header("CSeq", "1 OPTIONS");
        let key = self.tx.start_client(now.mono, req, ka.egress);
        self.keepalives.insert(key, (ka.aor, ka.field));
    }

    /// Takes over a stored call and handles the in-dialog request that found it; `None` for a
    /// request whose call is nowhere (481).
    fn adopt_and_handle(&mut self, now: Now, record: Option<DialogRecord>, key: ServerKey) {
        let ids = Arc::clone(&self.ids);
        let (b2bua, mut cx) = self.parts(now);
        // Only a request with one leg's full dialog id takes the call over: a stranger who
        // knows a Call-ID gets 481 and moves nothing.
        let owned = |r: &crate::b2bua::DialogRecord| {
            cx.tx.server_request(&key).is_some_and(|req| r.owns(req))
        };
        if let Some(r) = record.filter(owned) {
            b2bua.adopt(&mut cx, r);
        }
        let handled = match cx.tx.server_request(&key).cloned() {
            Some(req) => b2bua.handle_in_dialog(&mut cx, key.clone(), &req),
            None => true,
        };
        if !handled && let Some(req) = cx.tx.server_request(&key).cloned() {
            let resp = SipMessage::response_to(
                &req,
                481,
                "Call/Transaction Does Not Exist",
                Some(&ids.tag()),
            );
            let _ = cx.tx.respond(now.mono, &key, resp);
        }
    }

    /// Takes over a stored call found for an ACK and relays the ACK.
    fn adopt_and_ack(&mut self, now: Now, record: DialogRecord, ack: &SipMessage) {
        if !record.owns(ack) {
            tracing::info!(call_ref = %record.call_ref, "ACK with another dialog's tags dropped");
            return;
        }
        let (b2bua, mut cx) = self.parts(now);
        b2bua.adopt(&mut cx, record);
        b2bua.handle_ack(&mut cx, ack);
    }

    /// Next message to put on the wire.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.tx.poll_transmit().or_else(|| self.out.pop_front())
    }

    /// Next piece of async work for the shell.
    pub fn poll_work(&mut self) -> Option<Work> {
        self.work.pop_front()
    }

    /// A fresh tag for responses generated outside a call (challenges, registrar).
    pub fn tag(&self) -> String {
        self.ids.tag()
    }

    fn process_events(&mut self, now: Now) {
        while let Some(ev) = self.tx.poll_event() {
            let mut cx = Ctx { tx: &mut self.tx, out: &mut self.out, work: &mut self.work, now };
            match ev {
                TxEvent::Request { key, request, ingress } => {
                    route_request(&mut self.b2bua, &mut cx, &self.ids, key, request, ingress);
                }
                TxEvent::Ack { request, .. } => {
                    if !self.b2bua.handle_ack(&mut cx, &request) {
                        // Perhaps the call of a processor that died or drained after its 200.
                        cx.work.push_back(Work::LoadDialogForAck { request });
                    }
                }
                TxEvent::Response { key, response } => {
                    if let Some((aor, field)) = self.keepalives.get(&key).cloned() {
                        if response.status().unwrap_or(0) >= 200 {
                            self.keepalives.remove(&key);
                            cx.work.push_back(Work::KeepaliveResult { aor, field, ok: true });
                        }
                        continue;
                    }
                    self.b2bua.handle_response(&mut cx, key, response)
                }
                TxEvent::Timeout { key } => {
                    if let Some((aor, field)) = self.keepalives.remove(&key) {
                        cx.work.push_back(Work::KeepaliveResult { aor, field, ok: false });
                        continue;
                    }
                    self.b2bua.handle_timeout(&mut cx, key)
                }
                TxEvent::AckTimeout { key } => self.b2bua.handle_ack_timeout(&mut cx, &key),
            }
        }
    }
}

/// Decides what a new request is for.
fn route_request(
    b2bua: &mut B2bua,
    cx: &mut Ctx<'_>,
    ids: &Ids,
    key: ServerKey,
    req: Arc<SipMessage>,
    ingress: Ingress,
) {
    let method = req.method().unwrap_or_default().to_owned();
    let in_dialog = req.to().ok().is_some_and(|t| t.tag().is_some());
    let reply = |cx: &mut Ctx<'_>, status: u16, reason: &str, extra: Option<(&str, &str)>| {
        let mut resp = SipMessage::response_to(&req, status, reason, Some(&ids.tag()));
        if let Some((n, v)) = extra {
            resp.push_header(n, v);
        }
        let _ = cx.tx.respond(cx.now.mono, &key, resp);
    };
    // RFC 3261 §8.2.2.1 (RFC 4475 §3.3.2–3): we route sip:, sips: and tel: only.
    let scheme = req.request_uri().and_then(|u| Uri::parse(u).ok()).map(|u| u.scheme);
    if !matches!(scheme.as_deref(), Some("sip" | "sips" | "tel")) {
        reply(cx, 416, "Unsupported URI Scheme", None);
        return;
    }
    // RFC 3261 §8.2.2.3 (RFC 4475 §3.3.5): a requirement the B2BUA cannot honour on both legs
    // gets 420; session timers (RFC 4028) it can. Proxy-Require is for proxies; CANCEL
    // ignores both.
    let unsupported: Vec<&str> = req
        .header_list("require")
        .into_iter()
        .filter(|t| {
            !crate::b2bua::RELAYED_EXTENSIONS.iter().any(|e| t.trim().eq_ignore_ascii_case(e))
        })
        .collect();
    if method != "CANCEL" && !unsupported.is_empty() {
        reply(cx, 420, "Bad Extension", Some(("Unsupported", &unsupported.join(", "))));
        return;
    }
    if req.header("max-forwards").and_then(|v| v.trim().parse::<u32>().ok()) == Some(0)
        && method != "REGISTER"
        && method != "OPTIONS"
    {
        reply(cx, 483, "Too Many Hops", None);
        return;
    }
    match method.as_str() {
        "CANCEL" => match cx.tx.cancel_target(&req, &ingress) {
            Some(target) => {
                reply(cx, 200, "OK", None);
                if !b2bua.cancel(cx, &target) {
                    // Still authenticating: answer the INVITE here; the setup task sees it final.
                    if let Some(inv) = cx.tx.server_request(&target).cloned() {
                        let resp = SipMessage::response_to(
                            &inv,
                            487,
                            "Request Terminated",
                            Some(&ids.tag()),
                        );
                        let _ = cx.tx.respond(cx.now.mono, &target, resp);
                    }
                }
            }
            None => reply(cx, 481, "Call/Transaction Does Not Exist", None),
        },
        _ if in_dialog => {
            if b2bua.handle_in_dialog(cx, key.clone(), &req) {
                return;
            }
            // Not ours: perhaps a call whose processor died; look for it in Redis.
            let unknown = req.call_id().is_ok_and(|id| !b2bua.holds(id));
            if unknown && method != "ACK" {
                cx.work.push_back(Work::LoadDialog { key, request: Arc::unwrap_or_clone(req) });
            } else {
                reply(cx, 481, "Call/Transaction Does Not Exist", None);
            }
        }
        // Async work owns its request while the server transaction still shares this one: these
        // (and LoadDialog above) copy it, as the transaction layer used to for every request.
        "REGISTER" => {
            cx.work.push_back(Work::Register { key, request: Arc::unwrap_or_clone(req), ingress })
        }
        // A new INVITE whose Call-ID a live call already has (RFC 3261 §8.2.2.2, merged
        // request): refused before any authorization; it never rides that call's legs.
        "INVITE" if req.call_id().is_ok_and(|id| b2bua.holds(id)) => {
            reply(cx, 482, "Loop Detected", None)
        }
        "INVITE" => {
            cx.work.push_back(Work::Invite { key, request: Arc::unwrap_or_clone(req), ingress })
        }
        "OPTIONS" => reply(cx, 200, "OK", Some(("Allow", ALLOW))),
        m if KNOWN_METHODS.contains(&m) => {
            reply(cx, 405, "Method Not Allowed", Some(("Allow", ALLOW)))
        }
        _ => reply(cx, 501, "Not Implemented", Some(("Allow", ALLOW))),
    }
}

/// Whether `req` would start new work: an INVITE outside a dialog or a REGISTER.
fn starts_new_work(req: &SipMessage) -> bool {
    match req.method() {
        Some("REGISTER") => true,
        Some("INVITE") => req.to().ok().is_none_or(|t| t.tag().is_none()),
        _ => false,
    }
}

/// [`SipMessage::validate_request`], plus what a registrar must refuse before any work: a REGISTER
/// whose To is not a SIP or SIPS URI names no address-of-record (RFC 3261 §10.2, RFC 4475 §3.3.4).
fn check_request(req: &SipMessage) -> Result<(), sipmsg::Error> {
    req.validate_request()?;
    if req.method() == Some("REGISTER") && !req.to()?.uri.is_sip() {
        return Err(sipmsg::Error::BadHeader { name: "To", detail: "not a SIP AOR".into() });
    }
    Ok(())
}

/// RFC 3581 / RFC 3261 §18.2.1: record where the request really came from in its top Via, so
/// responses (which copy the Via) go back through the phone's NAT binding.
fn stamp_received(msg: &mut SipMessage, ingress: &Ingress) {
    let Ok(mut via) = msg.top_via() else { return };
    let src_ip = ingress.remote.ip().to_string();
    let wants_rport = via.param("rport").is_some();
    // An IPv6 sent-by is bracketed (RFC 5118), `received` is not (RFC 3261 §18.2.1).
    let sent_by: Option<IpAddr> = via.host.trim_matches(['[', ']']).parse().ok();
    if !wants_rport && sent_by == Some(ingress.remote.ip()) {
        return;
    }
    via.params
        .retain(|(k, _)| !k.eq_ignore_ascii_case("received") && !k.eq_ignore_ascii_case("rport"));
    via.params.push(("received".into(), Some(src_ip)));
    if wants_rport {
        via.params.push(("rport".into(), Some(ingress.remote.port().to_string())));
    }
    let Some(pos) = msg.headers.iter().position(|h| h.key == "via") else { return };
    let rest: Vec<&str> = sipmsg::headers::split_list(&msg.headers[pos].value).skip(1).collect();
    let mut value = via.to_string();
    for r in rest {
        value.push_str(", ");
        value.push_str(r);
    }
    msg.headers[pos].value = value;
}

#[cfg(test)]
#[path = "call_tests.rs"]
mod tests;

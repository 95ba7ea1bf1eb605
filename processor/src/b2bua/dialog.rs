//! Dialog state of each leg, what is stored in Redis so another processor can take a call
//! over, and ending a call: BYE on each leg, the accounting stop.

use super::*;

impl B2bua {
    pub(super) fn send_bye(&mut self, cx: &mut Ctx<'_>, call: u64, side: Side, reason: &str) {
        self.send_bye_with(cx, call, side, Some(reason), None);
    }

    pub(super) fn send_bye_with(
        &mut self,
        cx: &mut Ctx<'_>,
        call: u64,
        side: Side,
        reason: Option<&str>,
        source: Option<&SipMessage>,
    ) {
        if let Side::B(idx) = side {
            self.ack_before_bye(cx, call, idx);
        }
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
        let k = cx.tx.start_client(cx.now.mono, bye, egress);
        self.by_client.insert(k, Pending::Ignore);
    }

    /// Before a BYE on the answered B leg of a call set up here whose 2xx no ACK has followed
    /// yet (the caller's ACK lost, or overtaken by its BYE): our own ACK, so the callee stops retransmitting its 2xx
    /// (RFC 3261 §13.2.2.4: an ACK for each 2xx). A caller's ACK arriving later finds no call.
    fn ack_before_bye(&mut self, cx: &mut Ctx<'_>, call: u64, idx: usize) {
        let ids = self.ids.clone();
        let Some(c) = self.calls.get_mut(&call) else { return };
        if c.winner != Some(idx) || c.state != CallState::Answered {
            return;
        }
        // Only for a call answered here: its INVITE transaction is local, so its 2xx was seen
        // here and no ACK followed. A call taken over from Redis was ACKed by the processor
        // that set it up (or the caller's ACK is on its way); a second ACK would be a stray
        // one to a strict callee.
        if c.branches[idx].key.is_none() {
            return;
        }
        let d = &mut c.branches[idx].dialog;
        if d.last_ack.is_some() {
            return;
        }
        let ack = build_ack(&ids, d, d.invite_cseq, &SipMessage::response(200, ""));
        let t = Transmit { egress: d.egress.clone(), bytes: ack.to_bytes() };
        d.last_ack = Some(t.clone());
        cx.out.push_back(t);
    }

    /// Removes a call and tells billing: an answered call is charged; for one that never was,
    /// the stop only releases what authorization reserved.
    pub(super) fn end_call(&mut self, cx: &mut Ctx<'_>, call: u64, cause: &str) {
        if let Some(r) = self.record(call, cx) {
            cx.work.push_back(Work::DeleteDialog(Box::new(r)));
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
                caller_ingress_ip: c.a_ingress_ip.to_string(),
            });
            // A call not answered is a failed attempt billing keeps a CDR of: what the caller
            // got, who called whom and through which IP.
            let (status, reason) =
                c.caller_answer.clone().filter(|_| !answered).unwrap_or((0, String::new()));
            let party = |s: &String| if answered { String::new() } else { s.clone() };
            cx.work.push_back(Work::AccountingStop(AccountingStopRequest {
                call_ref: c.call_ref.clone(),
                ended_at_ms: cx.now.wall_ms,
                cause: cause.to_owned(),
                idempotency_key: format!("{};stop", c.call_ref),
                answered,
                start,
                status: u32::from(status),
                reason,
                caller: party(&c.caller_aor),
                callee: party(&c.callee_aor),
                caller_ingress_ip: if answered {
                    String::new()
                } else {
                    c.a_ingress_ip.to_string()
                },
            }));
        }
        self.keep_late_ack(cx, call);
        self.remove_call(call);
    }
}

/// Which leg of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Side {
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
    pub a_ingress_ip: std::net::IpAddr,
    /// Answer time, Unix ms.
    pub answered_at_ms: u64,
    /// When the call must be cut off, Unix ms, if it has a maximum duration.
    pub cutoff_at_ms: Option<u64>,
    /// The negotiated session interval (RFC 4028), if session timers are on: whoever takes
    /// the call over ends it when no refresh comes within it.
    #[serde(default)]
    pub session_expires_secs: Option<u32>,
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

impl Dialog {
    /// Whether an in-dialog request (or ACK) received on this leg carries its dialog id
    /// (RFC 3261 §12.2.2): our tag in To and the peer's tag in From. The Call-ID alone is no
    /// proof: whoever saw it (an INVITE's recipient, a capture) could otherwise end or
    /// redirect someone else's call.
    pub(super) fn owns(&self, req: &SipMessage) -> bool {
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

/// ACK for a 2xx on dialog `d` (RFC 3261 §13.2.2.4): a new branch, the INVITE's CSeq number.
pub(super) fn build_ack(ids: &Ids, d: &Dialog, cseq: u32, source: &SipMessage) -> SipMessage {
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
pub(super) fn dialog_request(ids: &Ids, d: &Dialog, method: &str, cseq: u32) -> SipMessage {
    let mut req = SipMessage::request(method, d.remote_target.clone());
    req.push_header("Via", d.egress.local.via(&ids.branch()));
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

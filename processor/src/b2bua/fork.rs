//! Setting a call up: one B leg per callee binding, forked in parallel; their responses,
//! first 2xx wins, CANCEL of the others, ringing limits (Timer C, no-answer).

use super::dialog::build_ack;
use super::relay::{AUTO_ANSWER_HEADERS, REQUEST_HEADERS, first_contact, strip_params};
use super::*;

/// Which leg of which call a new branch is, and its parties.
struct Leg<'a> {
    call: u64,
    idx: usize,
    caller_aor: &'a str,
    callee_aor: &'a str,
    asserted: Option<&'a str>,
}

/// `"Anonymous" <sip:anonymous@anonymous.invalid>` (RFC 3323 §4.1.1.3): the From of a leg
/// whose caller asked for privacy.
const ANONYMOUS: &str = "\"Anonymous\" <sip:anonymous@anonymous.invalid>";

/// Whether the caller's `Privacy` asks to withhold its identity (`id`, `user` or `header`,
/// RFC 3323/3325).
fn wants_privacy(invite: &SipMessage) -> bool {
    invite.header_list("privacy").iter().flat_map(|v| v.split(';')).any(|t| {
        let t = t.trim();
        ["id", "user", "header"].iter().any(|p| t.eq_ignore_ascii_case(p))
    })
}

impl B2bua {
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
            let _ = cx.tx.respond(cx.now.mono, &key, resp);
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
        let id = self.next_call;
        self.next_call += 1;
        // Bindings ring at once; trunks one after the other, the first now.
        let mut hunt: std::collections::VecDeque<Target> = plan.hunt.into();
        let first: Vec<Target> = if plan.targets.is_empty() {
            hunt.pop_front().into_iter().collect()
        } else {
            plan.targets
        };
        let mut branches = Vec::with_capacity(first.len());
        for (idx, t) in first.iter().enumerate() {
            let leg = Leg {
                call: id,
                idx,
                caller_aor: &plan.caller_aor,
                callee_aor: &plan.callee_aor,
                asserted: plan.asserted.as_deref(),
            };
            branches.push(self.open_branch(cx, &leg, t, &invite, plan.auto_answer));
        }
        self.by_call_id.insert(call_id.to_owned(), (id, Side::A));
        self.by_server.insert(key.clone(), id);
        let no_answer_at = self.no_answer.map(|d| cx.now.mono + d);
        let ring_deadline = ring_deadline(cx.now.mono + self.timer_c, no_answer_at);
        self.deadlines.insert((ring_deadline, id));
        self.calls.insert(
            id,
            Call {
                call_ref: plan.call_ref.clone(),
                state: CallState::Setup,
                a_key: Some(key),
                a_invite: Some(invite),
                a,
                a_ingress_ip: ingress.local.addr.ip(),
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
                caller_answer: None,
                hunt,
                auto_answer: plan.auto_answer,
                asserted: plan.asserted,
                session_interval: None,
                session_deadline: None,
            },
        );
        true
    }

    /// Builds and sends the INVITE of a new B leg towards `t` for the caller's `invite`:
    /// From the caller's user at `t.host` (display name kept), To the callee there (or
    /// `t.to`), Max-Forwards one less than the caller's (at most 70).
    fn open_branch(
        &mut self,
        cx: &mut Ctx<'_>,
        leg: &Leg<'_>,
        t: &Target,
        invite: &SipMessage,
        auto_answer: bool,
    ) -> Branch {
        let trunk = t.to.is_some();
        // Towards a trunk the caller is its asserted number (its DID), as the PSTN shows it.
        let asserted_user = leg.asserted.filter(|_| trunk).and_then(|a| {
            sipmsg::Uri::parse(a).ok().and_then(|u| u.user_name().map(str::to_owned))
        });
        let caller_user = asserted_user
            .as_deref()
            .unwrap_or_else(|| leg.caller_aor.split('@').next().unwrap_or("anonymous"));
        let callee_user = leg.callee_aor.split('@').next().unwrap_or_default();
        let max_forwards = invite
            .header("max-forwards")
            .and_then(|v| v.trim().parse::<u32>().ok())
            .map_or(70, |m| m.saturating_sub(1).min(70));
        let b_call_id = self.ids.call_id();
        let mut from_na = NameAddr::new(sipmsg::Uri::sip(Some(caller_user), &t.host, None));
        from_na.display = invite.from().ok().and_then(|f| f.display.clone());
        let privacy = wants_privacy(invite);
        let remote_uri = t.to.clone().unwrap_or_else(|| {
            NameAddr::new(sipmsg::Uri::sip(Some(callee_user), &t.host, None)).to_string()
        });
        let dialog = Dialog {
            call_id: b_call_id.clone(),
            local_tag: self.ids.tag(),
            remote_tag: None,
            local_uri: if privacy { ANONYMOUS.to_owned() } else { from_na.to_string() },
            remote_uri,
            remote_target: t.contact.clone(),
            route_set: Vec::new(),
            local_cseq: 1,
            egress: t.egress.clone(),
            contact: self.contact_for(&t.egress),
            invite_cseq: 1,
            last_ack: None,
        };
        let mut req = self.build_request(&dialog, "INVITE", 1, invite, REQUEST_HEADERS);
        if auto_answer {
            for h in invite.headers.iter().filter(|h| AUTO_ANSWER_HEADERS.contains(&h.key.as_str()))
            {
                req.headers.push(h.clone());
            }
        } else {
            strip_auto_answer(&mut req);
        }
        req.set_header("Max-Forwards", max_forwards.to_string());
        // RFC 3325: the identity goes to trunks only (the trust domain), with the caller's
        // Privacy (copied above) telling them to withhold it; a phone's own
        // P-Asserted-Identity never crosses the B2BUA.
        if let (true, Some(asserted)) = (trunk, leg.asserted) {
            req.set_header("P-Asserted-Identity", format!("<{asserted}>"));
        }
        let sent = t.auth.is_some().then(|| req.clone());
        let key = cx.tx.start_client(cx.now.mono, req, t.egress.clone());
        self.by_client.insert(key.clone(), Pending::Branch { call: leg.call, idx: leg.idx });
        self.by_call_id.insert(b_call_id, (leg.call, Side::B(leg.idx)));
        Branch {
            key: Some(key),
            dialog,
            state: BranchState::Calling,
            cancel_pending: false,
            final_status: None,
            auth: t.auth.clone(),
            auth_sent: false,
            sent,
        }
    }

    /// A `401`/`407` on branch `idx`: answers the challenge once with the target's
    /// credentials (a trunk's), re-sending the INVITE in the same dialog with the next CSeq.
    /// `false` when there is nothing to answer with, or the credentials were refused already.
    fn authenticate_branch(
        &mut self,
        cx: &mut Ctx<'_>,
        call: u64,
        idx: usize,
        resp: &SipMessage,
    ) -> bool {
        let Some(c) = self.calls.get_mut(&call) else { return false };
        if c.state != CallState::Setup {
            return false;
        }
        let Some(b) = c.branches.get_mut(idx) else { return false };
        let (Some(auth), false, Some(key)) = (b.auth.clone(), b.auth_sent, b.key.clone()) else {
            return false;
        };
        let (challenge_header, answer_header) = if resp.status() == Some(407) {
            ("proxy-authenticate", "Proxy-Authorization")
        } else {
            ("www-authenticate", "Authorization")
        };
        let Some(challenge) =
            resp.headers_named(challenge_header).find_map(sipmsg::digest::Challenge::parse)
        else {
            return false;
        };
        let Some(mut req) = b.sent.take() else { return false };
        b.auth_sent = true;
        b.dialog.local_cseq += 1;
        b.dialog.invite_cseq = b.dialog.local_cseq;
        req.set_header("Via", b.dialog.egress.local.via(&self.ids.branch()));
        req.set_header("CSeq", format!("{} INVITE", b.dialog.local_cseq));
        let uri = req.request_uri().unwrap_or_default().to_owned();
        let answer =
            challenge.answer(&auth.username, &auth.password, "INVITE", &uri, &self.ids.tag());
        req.set_header(answer_header, answer);
        let new_key = cx.tx.start_client(cx.now.mono, req, b.dialog.egress.clone());
        b.key = Some(new_key.clone());
        tracing::debug!(call_ref = %c.call_ref, "trunk challenged the call: answering it");
        self.by_client.remove(&key);
        self.by_client.insert(new_key, Pending::Branch { call, idx });
        true
    }

    /// A trunk failed (`408`, `5xx`) while the call still rings nowhere else: the next trunk
    /// of the call's hunt list gets it. Returns whether one did.
    fn fail_over(&mut self, cx: &mut Ctx<'_>, call: u64, status: u16) -> bool {
        let Some(c) = self.calls.get_mut(&call) else { return false };
        if c.state != CallState::Setup
            || !crate::routing::fails_over(status)
            || c.branches.iter().any(|b| b.state != BranchState::Done)
        {
            return false;
        }
        let (Some(next), Some(invite)) = (c.hunt.pop_front(), c.a_invite.clone()) else {
            return false;
        };
        tracing::info!(call_ref = %c.call_ref, status, next = %next.contact, "trunk failed: trying the next");
        let (caller_aor, callee_aor, auto_answer, asserted) =
            (c.caller_aor.clone(), c.callee_aor.clone(), c.auto_answer, c.asserted.clone());
        let idx = c.branches.len();
        let leg = Leg {
            call,
            idx,
            caller_aor: &caller_aor,
            callee_aor: &callee_aor,
            asserted: asserted.as_deref(),
        };
        let branch = self.open_branch(cx, &leg, &next, &invite, auto_answer);
        if let Some(c) = self.calls.get_mut(&call) {
            c.branches.push(branch);
        }
        true
    }

    /// Moves a call's ring deadline (its one entry in `deadlines`) to `at`, or drops it.
    pub(super) fn set_ring_deadline(&mut self, call: u64, at: Option<Instant>) {
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
    pub(super) fn ring_timeout(&mut self, cx: &mut Ctx<'_>, call: u64) {
        let Some(c) = self.calls.get_mut(&call) else { return };
        tracing::info!(call_ref = %c.call_ref, "no answer in time: cancelling the callee");
        c.ring_deadline = None;
        c.state = CallState::Cancelled;
        c.unanswered_cause = Some("no-answer");
        c.caller_answer = Some((408, "Request Timeout".to_owned()));
        if let (Some(key), Some(invite)) = (&c.a_key, &c.a_invite) {
            let mut resp =
                SipMessage::response_to(invite, 408, "Request Timeout", Some(&c.a.local_tag));
            resp.push_header("Reason", "SIP;cause=408;text=\"No answer\"");
            let _ = cx.tx.respond(cx.now.mono, key, resp);
        }
        for i in 0..c.branches.len() {
            self.cancel_branch(cx, call, i);
        }
        self.finish_if_all_failed(cx, call);
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
            None => self.late_ack(cx, &key, &resp),
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

    pub(super) fn branch_response(
        &mut self,
        cx: &mut Ctx<'_>,
        call: u64,
        idx: usize,
        resp: SipMessage,
    ) {
        let mut status = resp.status().unwrap_or(500);
        let mut resp = resp;
        if matches!(status, 401 | 407) {
            if self.authenticate_branch(cx, call, idx, &resp) {
                return;
            }
            // A leg we cannot authenticate to (a trunk refusing our credentials, or with none
            // configured): for the caller the gateway failed, and the next one may take it.
            let mut failed = SipMessage::response(502, "Bad Gateway");
            failed.push_header("CSeq", "0 INVITE");
            tracing::warn!(status, "a B leg challenged the call and cannot be answered: 502");
            resp = failed;
            status = 502;
        }
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
                    let at = ring_deadline(cx.now.mono + self.timer_c, c.no_answer_at);
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
                        cx.out.push_back(ack);
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
                    cx.out.push_back(Transmit { egress: d.egress.clone(), bytes: ack.to_bytes() });
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
                c.answered_at_ms = cx.now.wall_ms;
                if let Some(old) = c.ring_deadline.take() {
                    self.deadlines.remove(&(old, call));
                }
                if let Some(max) = c.max_duration {
                    let at = cx.now.mono + max;
                    c.cutoff_at = Some(at);
                    self.deadlines.insert((at, call));
                }
                let (tag, contact, a_key) =
                    (c.a.local_tag.clone(), c.a.contact.clone(), c.a_key.clone());
                let others: Vec<usize> = (0..c.branches.len()).filter(|i| *i != idx).collect();
                // RFC 4028: the answer fixes the session interval; no refresh within it ends
                // the call, so a lost BYE does not keep it (and its charge) running.
                self.arm_session_timer(cx, call, session_expires(&resp));
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
                if !self.fail_over(cx, call, status) {
                    self.finish_if_all_failed(cx, call);
                }
            }
        }
    }

    /// When every branch failed and nobody answered, relay the best final response to the caller.
    pub(super) fn finish_if_all_failed(&mut self, cx: &mut Ctx<'_>, call: u64) {
        let Some(c) = self.calls.get(&call) else { return };
        if c.winner.is_some() || c.branches.iter().any(|b| b.state != BranchState::Done) {
            return;
        }
        if c.state == CallState::Setup
            && let (Some(key), Some(req)) = (c.a_key.clone(), c.a_invite.clone())
        {
            let best = best_final(c.branches.iter().filter_map(|b| b.final_status.as_ref()));
            let tag = c.a.local_tag.clone();
            let answer = match best {
                Some(resp) => {
                    let resp = resp.clone();
                    self.relay_response(cx, &key, &resp, Some(&tag), None);
                    let status = resp.status().unwrap_or(500);
                    (status, resp.reason().unwrap_or_default().to_owned())
                }
                None => {
                    let resp =
                        SipMessage::response_to(&req, 480, "Temporarily Unavailable", Some(&tag));
                    let _ = cx.tx.respond(cx.now.mono, &key, resp);
                    (480, "Temporarily Unavailable".to_owned())
                }
            };
            if let Some(c) = self.calls.get_mut(&call) {
                c.caller_answer = Some(answer);
            }
        }
        let Some(c) = self.calls.get(&call) else { return };
        let cause = match c.unanswered_cause {
            Some(cause) => cause,
            None if c.state == CallState::Cancelled => "cancelled",
            None => "not-answered",
        };
        self.end_call(cx, call, cause);
    }

    /// Sends CANCEL on branch `idx` if it has a provisional response, or marks it to be
    /// cancelled when one arrives (RFC 3261 §9.1).
    pub(super) fn cancel_branch(&mut self, cx: &mut Ctx<'_>, call: u64, idx: usize) {
        let Some(c) = self.calls.get_mut(&call) else { return };
        let b = &mut c.branches[idx];
        match b.state {
            BranchState::Calling => b.cancel_pending = true,
            BranchState::Early => {
                if let Some(invite) = b.key.clone()
                    && let Some((cancel, egress)) = cx.tx.cancel_request(&invite)
                {
                    let k = cx.tx.start_client(cx.now.mono, cancel, egress);
                    self.by_client.insert(k, Pending::Ignore);
                    cx.tx.cancel_sent(cx.now.mono, &invite);
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
        c.caller_answer = Some((487, "Request Terminated".to_owned()));
        if let Some(old) = c.ring_deadline.take() {
            self.deadlines.remove(&(old, call));
        }
        if let Some(invite) = &c.a_invite {
            let resp =
                SipMessage::response_to(invite, 487, "Request Terminated", Some(&c.a.local_tag));
            let _ = cx.tx.respond(cx.now.mono, key, resp);
        }
        for i in 0..c.branches.len() {
            self.cancel_branch(cx, call, i);
        }
        true
    }
}

/// When a ringing call is given up: Timer C from now, or the no-answer limit if sooner.
pub(super) fn ring_deadline(timer_c_at: Instant, no_answer_at: Option<Instant>) -> Instant {
    no_answer_at.map_or(timer_c_at, |n| n.min(timer_c_at))
}

/// RFC 3261 §16.7 step 6, simplified: a 6xx wins, otherwise the lowest class, preferring
/// answers that tell the caller more than a timeout.
pub(super) fn best_final<'a>(
    finals: impl Iterator<Item = &'a SipMessage>,
) -> Option<&'a SipMessage> {
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

//! Relaying between the legs: requests built for the other leg (headers copied, Contact on
//! the leg's own socket, auto-answer stripped), responses relayed back, in-dialog requests
//! and ACKs.

use super::dialog::{build_ack, dialog_request};
use super::*;

impl B2bua {
    pub(super) fn contact_for(&self, egress: &Egress) -> String {
        let mut uri = sipmsg::Uri::sip(
            Some(&self.ids.contact_user()),
            &sipmsg::uri::host_of(egress.local.addr.ip()),
            Some(egress.local.addr.port()),
        );
        if egress.local.transport != crate::transport::Transport::Udp {
            uri.set_param("transport", Some(egress.local.transport.as_str()));
        }
        format!("<{uri}>")
    }

    /// A request on `dialog` with our Via/From/To/Contact, carrying `source`'s body and the
    /// listed headers.
    pub(super) fn build_request(
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
        push_extensions(&mut req, source);
        req.body = source.body.clone();
        req
    }

    /// A fresh in-dialog request on `side`, consuming a CSeq.
    pub(super) fn new_request(
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
    pub(super) fn relay_response(
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
        push_extensions(&mut out, resp);
        out.body = resp.body.clone();
        if let Err(e) = cx.tx.respond(cx.now.mono, key, out) {
            tracing::debug!(?e, status, "could not relay response");
        }
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
            let _ = cx.tx.respond(cx.now.mono, &key, ok);
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
        let k = cx.tx.start_client(cx.now.mono, out, egress);
        self.by_client.insert(k, Pending::Relay { call, origin: key, method, target_side: other });
        // The CSeq (and maybe the target) changed: keep the stored call current for takeover.
        self.save(cx, call);
        true
    }

    pub(super) fn relayed_response(
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
        let session_refresh =
            (200..300).contains(&status) && (method == "INVITE" || method == "UPDATE");
        if session_refresh && let Some(t) = first_contact(resp) {
            c.dialog_mut(target_side).remote_target = t;
            refreshed = true;
        }
        if session_refresh {
            // A session refresh (RFC 4028 §10): one more interval, or none without the header.
            self.arm_session_timer(cx, call, session_expires(resp));
            refreshed = true;
        }
        let Some(c) = self.calls.get_mut(&call) else { return };
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
        cx.out.push_back(t);
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
}

/// Headers copied from one leg's request to the other's.
/// SIP extensions (option tags) the B2BUA supports end to end: a request requiring one of
/// these is accepted, and `Supported`/`Require` naming them are passed to the other leg; any
/// other tag is dropped (the B2BUA would not honour it on the other leg) and a request
/// requiring it gets `420 Bad Extension`.
pub(crate) const RELAYED_EXTENSIONS: &[&str] = &["timer"];

/// The tags of `source`'s `Supported` and `Require` the B2BUA relays, as headers of `out`.
fn push_extensions(out: &mut SipMessage, source: &SipMessage) {
    for (name, key) in [("Supported", "supported"), ("Require", "require")] {
        let tags: Vec<&str> = source
            .header_list(key)
            .into_iter()
            .map(str::trim)
            .filter(|t| RELAYED_EXTENSIONS.iter().any(|e| t.eq_ignore_ascii_case(e)))
            .collect();
        if !tags.is_empty() {
            out.push_header(name, tags.join(", "));
        }
    }
}

pub(super) const REQUEST_HEADERS: &[&str] = &[
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
    // RFC 4028 session timers, negotiated end to end (the B2BUA ends a call not refreshed).
    "session-expires",
    "min-se",
];

/// Headers copied from a response on one leg to the response on the other.
pub(super) const RESPONSE_HEADERS: &[&str] = &[
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
    "session-expires",
    "min-se",
];

/// Headers that ask the callee's phone to answer by itself (RFC 5373), passed on only for
/// trusted callers.
pub(super) const AUTO_ANSWER_HEADERS: &[&str] = &["answer-mode", "priv-answer-mode"];

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
pub(super) fn asks_auto_answer(entry: &str) -> bool {
    let squashed: String = entry
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    ["answerafter", "autoanswer", "intercom"].iter().any(|k| squashed.contains(k))
}

/// The name-addr without header parameters (tag etc.), as `<uri>` with display name.
pub(super) fn strip_params(n: &NameAddr) -> String {
    let mut n = n.clone();
    n.params.clear();
    n.to_string()
}

pub(super) fn first_contact(m: &SipMessage) -> Option<String> {
    m.contacts().ok()?.into_iter().find(|c| !c.is_star()).map(|c| c.uri.to_string())
}

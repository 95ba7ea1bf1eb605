//! What the processor answers to the public SIP torture messages of RFC 4475 and RFC 5118,
//! grouped by RFC section: each message goes through the sans-IO [`Core`] as the shell hands it
//! over ([`Core::handle_message`] for what parses, [`Core::handle_datagram`] for raw bytes that do
//! not), arriving over UDP, and the test asserts the answer an element must give (or that it
//! stays silent), that every answer keeps the request's Via, From, Call-ID and CSeq and goes back
//! to the source address, and what work is handed to the async shell.
//!
//! The messages are `sipmsg/tests/torture/**.dat`; the matrix is `docs/torture-tests.md`.

#[path = "../../sipmsg/tests/corpus/mod.rs"]
mod corpus;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use sipalias_processor::b2bua::Work;
use sipalias_processor::clock::Now;
use sipalias_processor::core::{Core, Done};
use sipalias_processor::ids::Ids;
use sipalias_processor::transaction::Timers;
use sipalias_processor::transport::{Ingress, LocalAddr, Transmit, Transport};
use sipmsg::SipMessage;
use sipmsg::headers::Via;

use corpus::{load, rfc4475, wire};

/// What an element does with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// One final response with this status and reason phrase, nothing else.
    Answer(u16, &'static str),
    /// For an INVITE that reached its transaction: `100 Trying`, then this final response.
    Trying(u16, &'static str),
    /// `100 Trying` and the INVITE handed to the shell for authentication and routing.
    CallSetup,
    /// Nothing sent; the REGISTER handed to the shell (authentication, then the registrar).
    Registration,
    /// Nothing sent, nothing to do.
    Silence,
}

use Expect::{Answer, CallSetup, Registration, Silence, Trying};

const MAIN: &str = "127.0.0.1:5060";
const PHONE: &str = "127.0.0.20:5070";

fn ingress() -> Ingress {
    let addr = |s: &str| s.parse::<SocketAddr>().expect("address");
    Ingress {
        local: LocalAddr { addr: addr(MAIN), transport: Transport::Udp },
        remote: addr(PHONE),
        connection_id: 0,
        dispatcher_id: "d1".into(),
    }
}

/// A fresh processor core on a virtual clock (nothing here waits for a timer).
fn core() -> Core {
    Core::new(Timers::default(), Arc::new(Ids::new("p1")))
}

/// Feeds `bytes` to a fresh core the way the shell does and collects what comes out.
fn deliver(bytes: &[u8]) -> (Vec<(Transmit, SipMessage)>, Vec<Work>) {
    let mut core = core();
    let now = Now { mono: Instant::now(), wall_ms: 1_000_000 };
    match sipmsg::parse(bytes) {
        Ok(msg) => core.handle_message(now, msg, ingress()),
        Err(_) => core.handle_datagram(now, bytes, ingress()),
    }
    let mut sent = Vec::new();
    while let Some(t) = core.poll_transmit() {
        let m = sipmsg::parse(&t.bytes).expect("we send parseable SIP");
        sent.push((t, m));
    }
    let mut work = Vec::new();
    while let Some(w) = core.poll_work() {
        match w {
            // An in-dialog request for a call this core does not hold is looked up in Redis;
            // here there is none, as for a dialog that never existed.
            Work::LoadDialog { key, .. } => {
                core.handle_done(now, Done::Dialog { key, record: None });
                while let Some(t) = core.poll_transmit() {
                    let m = sipmsg::parse(&t.bytes).expect("we send parseable SIP");
                    sent.push((t, m));
                }
            }
            other => work.push(other),
        }
    }
    (sent, work)
}

/// Asserts what happens to one message; `bytes` are what arrived in the datagram.
fn assert_outcome(label: &str, bytes: &[u8], expect: Expect) -> Vec<SipMessage> {
    let (sent, work) = deliver(bytes);
    let request = sipmsg::parse(bytes).or_else(|_| sipmsg::parse::parse_head(bytes)).ok();
    for (t, resp) in &sent {
        assert_eq!(t.egress, ingress().reply_egress(), "{label}: answered to the source");
        if let Some(req) = &request {
            assert_answers(label, req, resp);
        }
    }
    let statuses: Vec<_> =
        sent.iter().map(|(_, m)| (m.status().unwrap_or(0), m.reason().unwrap_or(""))).collect();
    match expect {
        Answer(status, reason) => {
            assert_eq!(statuses, [(status, reason)], "{label}");
            assert!(work.is_empty(), "{label}: no work for an answered request");
        }
        Trying(status, reason) => {
            // The TU answered at once: no 100 Trying of the transaction's own.
            assert_eq!(statuses, [(status, reason)], "{label}");
            assert!(work.is_empty(), "{label}: no work for an answered request");
        }
        CallSetup => {
            // The 100 waits 200 ms for the TU's first response (RFC 3261 §17.2.1).
            assert!(sent.is_empty(), "{label}: {statuses:?}");
            assert!(matches!(work[..], [Work::Invite { .. }]), "{label}: {work:?}");
        }
        Registration => {
            assert!(sent.is_empty(), "{label}: {statuses:?}");
            assert!(matches!(work[..], [Work::Register { .. }]), "{label}: {work:?}");
        }
        Silence => {
            assert!(sent.is_empty(), "{label}: {statuses:?}");
            assert!(work.is_empty(), "{label}: {work:?}");
        }
    }
    sent.into_iter().map(|(_, m)| m).collect()
}

/// RFC 3261 §8.2.6.2: a response copies From, Call-ID, CSeq and every Via of its request (the top
/// one may gain `received`, RFC 3261 §18.2.1), and its To gains a tag unless it is a 100.
fn assert_answers(label: &str, req: &SipMessage, resp: &SipMessage) {
    for name in ["from", "call-id", "cseq"] {
        let want: Vec<_> = req.headers_named(name).collect();
        assert_eq!(resp.headers_named(name).collect::<Vec<_>>(), want, "{label}: {name}");
    }
    let (req_vias, resp_vias) = (req.header_list("via"), resp.header_list("via"));
    assert_eq!(req_vias.len(), resp_vias.len(), "{label}: every Via copied");
    assert_eq!(req_vias[1..], resp_vias[1..], "{label}: lower Vias copied verbatim");
    if req_vias[0] != resp_vias[0] {
        let (a, b) = (Via::parse(req_vias[0]), Via::parse(resp_vias[0]));
        let (a, b) = (a.expect(label), b.expect(label));
        assert_eq!((a.branch(), &a.host, a.port), (b.branch(), &b.host, b.port), "{label}");
    }
    if let (Ok(to), Some(status)) = (resp.to(), resp.status())
        && status > 100
    {
        assert!(to.tag().is_some(), "{label}: To tag on a {status}");
    }
}

fn rfc4475_outcome(name: &str, expect: Expect) -> Vec<SipMessage> {
    assert_outcome(&format!("RFC 4475 {name}"), &rfc4475(name), expect)
}

// ------------------------------------------------------------------------------------------------
// RFC 4475 §3.1.1: valid messages are served as any other.

#[test]
fn rfc4475_3_1_1_valid_requests_are_served() {
    for (name, expect) in [
        // A To tag makes it a re-INVITE; we have no such dialog (RFC 3261 §12.2.2).
        ("wsinv", Trying(481, "Call/Transaction Does Not Exist")),
        ("intmeth", Answer(501, "Not Implemented")),
        ("esc01", CallSetup),
        ("escnull", Registration),
        ("esc02", Answer(501, "Not Implemented")),
        ("lwsdisp", Answer(200, "OK")),
        ("longreq", CallSetup),
        ("dblreq", Registration),
        ("semiuri", Answer(200, "OK")),
        ("transports", Answer(200, "OK")),
        ("mpart01", Answer(405, "Method Not Allowed")),
    ] {
        rfc4475_outcome(name, expect);
    }
}

/// §3.1.1.2 and §3.1.1.5: "Endpoints will generate a 501 listing the methods they understand in
/// an Allow header field."
#[test]
fn rfc4475_3_1_1_unknown_methods_get_501_with_allow() {
    for name in ["intmeth", "esc02"] {
        let answers = rfc4475_outcome(name, Answer(501, "Not Implemented"));
        assert!(answers[0].header("allow").is_some_and(|a| a.contains("INVITE")), "{name}");
    }
}

/// §3.1.1.1: the tortuous INVITE, made an initial one by dropping its To tag, is handed to call
/// setup whole, its odd values as written.
#[test]
fn rfc4475_3_1_1_1_wsinv_reaches_call_setup_intact() {
    let text = String::from_utf8(rfc4475("wsinv")).expect("utf8");
    let initial = text.replace(" ;   tag    = 1918181833n", "");
    let (_, work) = deliver(initial.as_bytes());
    let Some(Work::Invite { request, .. }) = work.first() else { panic!("setup work: {work:?}") };
    assert_eq!(request.header("max-forwards"), Some("0068"));
    assert_eq!(request.from().expect("From").tag(), Some("98asjd8"));
    assert_eq!(request.vias().expect("Vias").len(), 3);
    assert_eq!(request.body.len(), 150);
}

/// §3.1.1.12–13 and §3.3.10: responses that match no transaction of ours are dropped; a B2BUA
/// never routes a response by its Via (so never to 255.255.255.255).
#[test]
fn rfc4475_stray_responses_are_dropped() {
    for name in ["unreason", "noreason", "bcast"] {
        rfc4475_outcome(name, Silence);
    }
}

// ------------------------------------------------------------------------------------------------
// RFC 4475 §3.1.2: invalid messages get a stateless 400 (505 for another version) or, when they
// cannot be parsed at all, silence.

#[test]
fn rfc4475_3_1_2_invalid_requests_are_refused() {
    for (name, expect) in [
        ("badinv01", Answer(400, "Bad Via header")),
        ("clerr", Answer(400, "Body shorter than Content-Length")),
        ("ncl", Answer(400, "Bad Content-Length header")),
        ("scalar02", Answer(400, "Bad CSeq header")),
        ("quotbal", Answer(400, "Bad To header")),
        ("ltgtruri", Answer(400, "Bad Request-URI")),
        ("escruri", Answer(400, "Bad Request-URI")),
        ("regbadct", Answer(400, "Bad Contact header")),
        ("badaspec", Answer(400, "Bad To header")),
        ("baddn", Answer(400, "Bad From header")),
        ("badvers", Answer(505, "Version Not Supported")),
        ("mismatch01", Answer(400, "Bad CSeq header")),
        ("mismatch02", Answer(400, "Bad CSeq header")),
    ] {
        rfc4475_outcome(name, expect);
    }
}

/// §3.1.2.8–10: a request line with LWS in the URI, doubled or trailing SP is not parsed by
/// guessing; the dispatcher's scan already drops it, and so would the processor.
#[test]
fn rfc4475_3_1_2_8_to_10_malformed_request_lines_are_dropped() {
    for name in ["lwsruri", "lwsstart", "trws"] {
        rfc4475_outcome(name, Silence);
    }
}

/// §3.1.2.12: a non-GMT Date is ignored; nothing here reads Date.
#[test]
fn rfc4475_3_1_2_12_baddate_is_tolerated() {
    rfc4475_outcome("baddate", CallSetup);
}

/// §3.1.2.5 and §3.1.2.19: a response with an overlarge CSeq or status code: "simply discard it".
#[test]
fn rfc4475_3_1_2_bad_responses_are_discarded() {
    for name in ["scalarlg", "bigcode"] {
        rfc4475_outcome(name, Silence);
    }
}

/// §3.1.2.16: the 505 copies the SIP/7.0 Via as it came; the answer itself is SIP/2.0.
#[test]
fn rfc4475_3_1_2_16_badvers_gets_505() {
    let answers = rfc4475_outcome("badvers", Answer(505, "Version Not Supported"));
    assert_eq!(answers[0].header("via"), Some("SIP/7.0/UDP c.example.com;branch=z9hG4bKkdjuw"));
    assert_eq!(answers[0].version(), "SIP/2.0");
}

// ------------------------------------------------------------------------------------------------
// RFC 4475 §3.2: transaction layer.

/// §3.2.1: a branch that is only the magic cookie is refused statelessly ("preferably
/// statelessly, as other requests from the source are likely also to have a malformed branch").
#[test]
fn rfc4475_3_2_1_badbranch_gets_stateless_400() {
    rfc4475_outcome("badbranch", Answer(400, "Bad Via header"));
}

// ------------------------------------------------------------------------------------------------
// RFC 4475 §3.3: application layer.

#[test]
fn rfc4475_3_3_application_layer_answers() {
    for (name, expect) in [
        ("insuf", Answer(400, "Missing Call-ID header")),
        ("unkscm", Answer(416, "Unsupported URI Scheme")),
        ("novelsc", Answer(416, "Unsupported URI Scheme")),
        ("unksm2", Answer(400, "Bad To header")),
        ("bext01", Answer(420, "Bad Extension")),
        ("invut", CallSetup),
        ("regaut01", Registration),
        ("multi01", Answer(400, "Bad Call-ID header")),
        ("mcl01", Answer(400, "Bad Content-Length header")),
        ("zeromf", Answer(200, "OK")),
        ("cparam01", Registration),
        ("cparam02", Registration),
        ("regescrt", Registration),
        ("sdp01", CallSetup),
    ] {
        rfc4475_outcome(name, expect);
    }
}

/// §3.3.5: the 420 lists what the Require header asked for (we are a UAS to the caller, so
/// Proxy-Require is not ours to judge).
#[test]
fn rfc4475_3_3_5_bext01_420_lists_the_unsupported_extensions() {
    let answers = rfc4475_outcome("bext01", Answer(420, "Bad Extension"));
    assert_eq!(
        answers[0].header("unsupported"),
        Some("nothingSupportsThis, nothingSupportsThisEither")
    );
}

/// §3.3.11: Max-Forwards 0 on an OPTIONS: "An endpoint should process the request as if the
/// Max-Forwards field value were still positive"; an INVITE we would forward gets 483.
#[test]
fn rfc4475_3_3_11_zeromf_options_answered_invite_gets_483() {
    rfc4475_outcome("zeromf", Answer(200, "OK"));
    let text = String::from_utf8(rfc4475("esc01")).expect("utf8").replace(": 87", ": 0");
    assert_outcome("esc01 with Max-Forwards 0", text.as_bytes(), Trying(483, "Too Many Hops"));
}

/// §3.3.6 and §3.3.15: a body of unknown type, or an Accept without SDP, is the callee's to
/// judge: the B2BUA relays body and Accept unchanged, and the callee's 415 or 406 with them.
#[test]
fn rfc4475_3_3_6_and_15_bodies_go_to_the_callee() {
    let (_, work) = deliver(&rfc4475("invut"));
    let Some(Work::Invite { request, .. }) = work.first() else { panic!("setup work: {work:?}") };
    assert_eq!(request.header("content-type"), Some("application/unknownformat"));
    rfc4475_outcome("sdp01", CallSetup);
}

// ------------------------------------------------------------------------------------------------
// RFC 4475 §3.4: backward compatibility.

/// §3.4.1: no branch, no From tag, no Content-Length, no Max-Forwards: still a call.
#[test]
fn rfc4475_3_4_1_inv2543_is_served() {
    rfc4475_outcome("inv2543", CallSetup);
}

// ------------------------------------------------------------------------------------------------
// RFC 5118: IPv6 (as a phone puts them on the wire; see `corpus::wire`).

#[test]
fn rfc5118_ipv6_messages() {
    for (name, expect) in [
        ("ipv6-good", Registration),
        ("ipv6-bad", Answer(400, "Bad Request-URI")),
        ("port-ambiguous", Registration),
        ("port-unambiguous", Registration),
        ("via-received-param-with-delim", Answer(481, "Call/Transaction Does Not Exist")),
        ("via-received-param-no-delim", Answer(200, "OK")),
        ("ipv6-in-sdp", CallSetup),
        ("mult-ip-in-header", Answer(481, "Call/Transaction Does Not Exist")),
        ("mult-ip-in-sdp", CallSetup),
        ("ipv4-mapped-ipv6", CallSetup),
        ("ipv6-bug-abnf-3-colons", Answer(200, "OK")),
        ("ipv6-correct-abnf-2-colons", Answer(200, "OK")),
    ] {
        assert_outcome(&format!("RFC 5118 {name}"), &wire(name), expect);
    }
}

/// The archive's bytes themselves: where the RFC's Content-Length overstates the body, the
/// request is refused as clerr is; without the closing empty line nothing can be answered.
#[test]
fn rfc5118_archive_bytes_as_published() {
    let raw = |name| load("rfc5118", name);
    assert_outcome("ipv6-good (LF)", &raw("ipv6-good"), Registration);
    assert_outcome(
        "ipv6-in-sdp (LF)",
        &raw("ipv6-in-sdp"),
        Answer(400, "Body shorter than Content-Length"),
    );
    assert_outcome("ipv6-bug-abnf-3-colons (LF)", &raw("ipv6-bug-abnf-3-colons"), Silence);
}

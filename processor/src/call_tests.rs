//! Call flows through the sans-IO core on a virtual clock: the B2BUA and the transaction layer
//! together, with no sockets, Redis or billing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sipmsg::SipMessage;

use crate::b2bua::{CallPlan, Target, Work};
use crate::clock::Now;
use crate::core::{Core, Done, Limits};
use crate::ids::Ids;
use crate::transaction::{ServerKey, Timers};
use crate::transport::{Egress, Ingress, LocalAddr, Transmit, Transport};

const MAIN: &str = "127.0.0.1:5060";
const ALIAS: &str = "127.0.0.2:5060";
const CALLER: &str = "127.0.0.20:5000";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

fn local(s: &str) -> LocalAddr {
    LocalAddr { addr: addr(s), transport: Transport::Udp }
}

fn ingress(local_s: &str, remote: &str) -> Ingress {
    Ingress {
        local: local(local_s),
        remote: addr(remote),
        connection_id: 0,
        dispatcher_id: "d1".into(),
    }
}

fn target(callee: &str) -> Target {
    Target {
        contact: format!("sip:alice@{callee}"),
        egress: Egress {
            flow_only: false,
            local: local(ALIAS),
            remote: addr(callee),
            connection_id: 0,
            dispatcher_id: "d1".into(),
        },
        host: "127.0.0.2".into(),
        to: None,
        auth: None,
    }
}

struct Harness {
    core: Core,
    now: Instant,
    start: Instant,
}

impl Harness {
    fn new() -> Self {
        Harness::for_node("p1")
    }

    fn for_node(node: &str) -> Self {
        Harness::with_timers(node, Timers::default())
    }

    fn with_timers(node: &str, timers: Timers) -> Self {
        let timers = Timers {
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
            ..timers
        };
        let now = Instant::now();
        Harness { core: Core::new(timers, Arc::new(Ids::new(node))), now, start: now }
    }

    fn wall(&self) -> u64 {
        1_000_000 + (self.now - self.start).as_millis() as u64
    }

    fn send(&mut self, text: &str, from: Ingress) {
        let msg = sipmsg::parse(text.as_bytes()).expect("test message parses");
        let now = self.clock();
        self.core.handle_message(now, msg, from);
    }

    fn out(&mut self) -> Vec<(Transmit, SipMessage)> {
        let mut v = Vec::new();
        while let Some(t) = self.core.poll_transmit() {
            let m = sipmsg::parse(&t.bytes).expect("we send parseable SIP");
            v.push((t, m));
        }
        v
    }

    fn work(&mut self) -> Vec<Work> {
        let mut v = Vec::new();
        while let Some(w) = self.core.poll_work() {
            v.push(w);
        }
        v
    }

    /// Both clocks now.
    fn clock(&self) -> Now {
        Now { mono: self.now, wall_ms: self.wall() }
    }

    /// Completed async work, handed back at the current time.
    fn done(&mut self, done: Done) {
        let now = self.clock();
        self.core.handle_done(now, done);
    }

    fn advance_to(&mut self, at: Instant) {
        self.now = at;
        let now = self.clock();
        self.core.handle_timeout(now);
    }

    /// Caller INVITE → setup work (the 100 Trying waits 200 ms for a response); then the plan
    /// is applied.
    fn call(&mut self, targets: Vec<Target>) -> ServerKey {
        self.call_limited(targets, 0)
    }

    fn call_limited(&mut self, targets: Vec<Target>, max_duration_secs: u32) -> ServerKey {
        self.call_with(&invite("c1@caller", "z9hG4bKa1"), targets, max_duration_secs, false)
    }

    /// A call to a number through `trunks`, tried one after the other.
    fn call_trunks(&mut self, trunks: Vec<Target>) -> ServerKey {
        self.call_trunks_as(&invite("c1@caller", "z9hG4bKa1"), trunks, None)
    }

    /// The caller sends `invite` to a number; `trunks` are tried with `asserted` as its
    /// identity.
    fn call_trunks_as(
        &mut self,
        invite: &str,
        trunks: Vec<Target>,
        asserted: Option<&str>,
    ) -> ServerKey {
        self.send(invite, ingress(MAIN, CALLER));
        let Some(Work::Invite { key, ingress: i, .. }) = self.work().pop() else {
            panic!("INVITE must become setup work")
        };
        let plan = CallPlan {
            caller_aor: "bob@sip.example.net".into(),
            callee_aor: "+442079460000@sip.example.net".into(),
            targets: Vec::new(),
            max_duration_secs: 0,
            call_ref: "c1@caller;bt1".into(),
            auto_answer: false,
            hunt: trunks,
            asserted: asserted.map(str::to_owned),
        };
        self.done(Done::Call { key: key.clone(), plan: Box::new(plan), ingress: i });
        key
    }

    /// The caller sends `invite`; the setup task answers with a plan for `targets`.
    fn call_with(
        &mut self,
        invite: &str,
        targets: Vec<Target>,
        max_duration_secs: u32,
        auto_answer: bool,
    ) -> ServerKey {
        self.send(invite, ingress(MAIN, CALLER));
        assert!(self.out().is_empty(), "nothing sent before setup");
        let Some(Work::Invite { key, ingress: i, .. }) = self.work().pop() else {
            panic!("INVITE must become setup work")
        };
        let plan = CallPlan {
            caller_aor: "bob@sip.example.net".into(),
            callee_aor: "alice@sip.example.net".into(),
            targets,
            max_duration_secs,
            call_ref: "c1@caller;bt1".into(),
            auto_answer,
            hunt: Vec::new(),
            asserted: None,
        };
        self.done(Done::Call { key: key.clone(), plan: Box::new(plan), ingress: i });
        key
    }
}

fn invite(call_id: &str, branch: &str) -> String {
    format!(
        "INVITE sip:alice@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.20:5000;branch={branch};rport\r\n\
Max-Forwards: 70\r\nFrom: \"Bob\" <sip:bob@127.0.0.1>;tag=bt1\r\nTo: <sip:alice@127.0.0.1>\r\n\
Call-ID: {call_id}\r\nCSeq: 2 INVITE\r\nContact: <sip:bob@127.0.0.20:5000>\r\n\
Content-Type: application/sdp\r\nContent-Length: 10\r\n\r\nv=0\r\no=b\r\n"
    )
}

/// A response from the callee to the B-leg request `req`.
fn answer(req: &SipMessage, status: u16, reason: &str, tag: &str, body: &str) -> String {
    let mut r = SipMessage::response_to(req, status, reason, Some(tag));
    r.push_header("Contact", "<sip:alice@127.0.0.30:6000>");
    if !body.is_empty() {
        r.push_header("Content-Type", "application/sdp");
        r.body = bytes::Bytes::copy_from_slice(body.as_bytes());
    }
    String::from_utf8(r.to_bytes()).expect("utf8")
}

#[test]
fn b_leg_leaves_from_the_alias_with_alias_hosts() {
    let mut h = Harness::new();
    h.call(vec![target("127.0.0.30:6000")]);
    let out = h.out();
    assert_eq!(out.len(), 1);
    let (t, m) = &out[0];
    assert_eq!(t.egress.local, local(ALIAS), "sent from the socket the callee registered through");
    assert_eq!(t.egress.remote, addr("127.0.0.30:6000"));
    assert_eq!(m.request_uri(), Some("sip:alice@127.0.0.30:6000"));
    assert_eq!(m.from().expect("from").uri.host, "127.0.0.2");
    assert_eq!(m.from().expect("from").uri.user_name(), Some("bob"));
    assert_eq!(m.to().expect("to").uri.host, "127.0.0.2");
    let via = m.top_via().expect("via");
    assert_eq!((via.host.as_str(), via.port), ("127.0.0.2", Some(5060)));
    assert_ne!(m.call_id().expect("cid"), "c1@caller", "a new Call-ID");
    assert!(m.header("contact").expect("contact").contains("@127.0.0.2:5060"));
    assert_eq!(&m.body[..], b"v=0\r\no=b\r\n", "SDP offer relayed unchanged");
    assert_eq!(m.header("max-forwards"), Some("69"));
}

#[test]
fn silent_callee_gets_timer_a_retransmissions_then_caller_gets_408() {
    let mut h = Harness::new();
    h.call(vec![target("127.0.0.30:6000")]);
    assert_eq!(h.out().len(), 1);
    let mut sent_at = Vec::new();
    let mut caller_final = None;
    while let Some(at) = h.core.poll_timeout() {
        if at - h.start > Duration::from_secs(40) {
            break;
        }
        h.advance_to(at);
        for (t, m) in h.out() {
            if m.method() == Some("INVITE") {
                sent_at.push((at - h.start).as_millis());
            } else if t.egress.remote == addr(CALLER) && m.status().unwrap_or(0) >= 200 {
                caller_final.get_or_insert((m.status(), (at - h.start).as_millis()));
            }
        }
    }
    assert_eq!(sent_at, vec![500, 1500, 3500, 7500, 15500, 31500], "Timer A doubling from T1");
    assert_eq!(caller_final, Some((Some(408), 32000)), "Timer B = 64*T1 → 408 to the caller");
}

#[test]
fn answered_call_relays_sdp_ack_bye_and_accounts() {
    let mut h = Harness::new();
    h.call(vec![target("127.0.0.30:6000")]);
    let (_, b_invite) = h.out().remove(0);
    let callee = ingress(ALIAS, "127.0.0.30:6000");

    h.send(&answer(&b_invite, 180, "Ringing Loudly", "at1", ""), callee.clone());
    let out = h.out();
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].1.status(), out[0].1.reason()), (Some(180), Some("Ringing Loudly")));
    assert_eq!(out[0].0.egress.remote, addr(CALLER));

    h.send(&answer(&b_invite, 200, "OK", "at1", "v=0\r\no=a 1\r\n"), callee.clone());
    let out = h.out();
    let ok = &out.iter().find(|(_, m)| m.status() == Some(200)).expect("200 relayed").1;
    assert_eq!(&ok.body[..], b"v=0\r\no=a 1\r\n");
    assert_eq!(ok.call_id().expect("cid"), "c1@caller");
    let a_tag = ok.to().expect("to").tag().expect("to-tag").to_owned();
    let a_contact = ok.contacts().expect("contact")[0].uri.to_string();
    // Billing hears of the answer only with the stop.
    assert!(!h.work().iter().any(|w| matches!(w, Work::AccountingStop(_))));

    let ack = format!(
        "ACK {a_contact} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.20:5000;branch=z9hG4bKack1\r\nMax-Forwards: 70\r\n\
From: <sip:bob@127.0.0.1>;tag=bt1\r\nTo: <sip:alice@127.0.0.1>;tag={a_tag}\r\nCall-ID: c1@caller\r\nCSeq: 2 ACK\r\n\r\n"
    );
    h.send(&ack, ingress(MAIN, CALLER));
    let out = h.out();
    assert_eq!(out.len(), 1, "ACK relayed end to end");
    assert_eq!(out[0].1.method(), Some("ACK"));
    assert_eq!(out[0].0.egress.local, local(ALIAS));
    assert_eq!(out[0].1.call_id().ok(), b_invite.call_id().ok());
    assert_eq!(out[0].1.request_uri(), Some("sip:alice@127.0.0.30:6000"));

    // Callee hangs up.
    let b_contact = b_invite.contacts().expect("contact")[0].uri.to_string();
    let b_from = b_invite.from().expect("from");
    let bye = format!(
        "BYE {b_contact} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.30:6000;branch=z9hG4bKbye1\r\nMax-Forwards: 70\r\n\
From: <sip:alice@127.0.0.2>;tag=at1\r\nTo: <sip:bob@127.0.0.2>;tag={}\r\nCall-ID: {}\r\nCSeq: 7 BYE\r\n\r\n",
        b_from.tag().expect("tag"),
        b_invite.call_id().expect("cid")
    );
    h.send(&bye, callee);
    let out = h.out();
    let to_callee =
        out.iter().find(|(t, _)| t.egress.remote == addr("127.0.0.30:6000")).expect("200 to BYE");
    assert_eq!(to_callee.1.status(), Some(200));
    let to_caller =
        out.iter().find(|(t, _)| t.egress.remote == addr(CALLER)).expect("BYE to caller");
    assert_eq!(to_caller.1.method(), Some("BYE"));
    assert_eq!(to_caller.1.request_uri(), Some("sip:bob@127.0.0.20:5000"));
    assert_eq!(to_caller.0.egress.local, local(MAIN));
    let stop = h.work().into_iter().find_map(|w| match w {
        Work::AccountingStop(s) if s.cause == "callee-bye" => Some(s),
        _ => None,
    });
    let start = stop.and_then(|s| s.start).expect("the stop carries the start");
    assert_eq!(start.callee_ingress_ip, "127.0.0.2");
    assert_eq!(
        (start.caller.as_str(), start.callee.as_str()),
        ("bob@sip.example.net", "alice@sip.example.net")
    );
    assert_eq!(h.core.load().2, 0, "call removed");
}

#[test]
fn forked_call_first_2xx_wins_and_the_other_branch_is_cancelled() {
    let mut h = Harness::new();
    h.call(vec![target("127.0.0.30:6000"), target("127.0.0.31:6000")]);
    let out = h.out();
    assert_eq!(out.len(), 2, "both bindings ring");
    let inv =
        |r: &str| out.iter().find(|(t, _)| t.egress.remote == addr(r)).expect("branch").1.clone();
    let (b1, b2) = (inv("127.0.0.30:6000"), inv("127.0.0.31:6000"));
    h.send(&answer(&b2, 180, "Ringing", "t2", ""), ingress(ALIAS, "127.0.0.31:6000"));
    h.out();
    h.send(&answer(&b1, 200, "OK", "t1", "v=0\r\n"), ingress(ALIAS, "127.0.0.30:6000"));
    let out = h.out();
    assert!(out.iter().any(|(t, m)| t.egress.remote == addr(CALLER) && m.status() == Some(200)));
    let cancel =
        out.iter().find(|(_, m)| m.method() == Some("CANCEL")).expect("CANCEL to the loser");
    assert_eq!(cancel.0.egress.remote, addr("127.0.0.31:6000"));
    assert_eq!(cancel.1.call_id().ok(), b2.call_id().ok());
}

#[test]
fn caller_cancel_gives_487_and_cancels_the_callee() {
    let mut h = Harness::new();
    h.call(vec![target("127.0.0.30:6000")]);
    let (_, b_invite) = h.out().remove(0);
    h.send(&answer(&b_invite, 180, "Ringing", "t1", ""), ingress(ALIAS, "127.0.0.30:6000"));
    h.out();
    let cancel = "CANCEL sip:alice@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.20:5000;branch=z9hG4bKa1;rport\r\n\
Max-Forwards: 70\r\nFrom: \"Bob\" <sip:bob@127.0.0.1>;tag=bt1\r\nTo: <sip:alice@127.0.0.1>\r\nCall-ID: c1@caller\r\nCSeq: 2 CANCEL\r\n\r\n";
    h.send(cancel, ingress(MAIN, CALLER));
    let out = h.out();
    let statuses: Vec<_> = out
        .iter()
        .filter(|(t, _)| t.egress.remote == addr(CALLER))
        .map(|(_, m)| m.status())
        .collect();
    assert!(statuses.contains(&Some(200)) && statuses.contains(&Some(487)), "{statuses:?}");
    let c = out.iter().find(|(_, m)| m.method() == Some("CANCEL")).expect("CANCEL to callee");
    assert_eq!(c.0.egress.local, local(ALIAS));
}

#[test]
fn request_without_call_id_gets_400_naming_it() {
    let mut h = Harness::new();
    h.send(
        "OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.20:5000;branch=z9hG4bKo1\r\nFrom: <sip:b@h>;tag=1\r\nTo: <sip:x@h>\r\nCSeq: 1 OPTIONS\r\n\r\n",
        ingress(MAIN, CALLER),
    );
    let out = h.out();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1.status(), Some(400));
    assert!(out[0].1.reason().unwrap_or_default().contains("Call-ID"));
}

/// Sets up an answered and acknowledged call; returns (B-leg INVITE, caller's view of our
/// Contact, our To tag towards the caller).
fn answered_call(h: &mut Harness) -> (SipMessage, String, String) {
    answered_call_limited(h, 0)
}

fn answered_call_limited(h: &mut Harness, max_duration_secs: u32) -> (SipMessage, String, String) {
    answered_call_with(h, max_duration_secs, "")
}

/// An answered call whose callee's 200 also carries the header lines `extra`.
fn answered_call_with(
    h: &mut Harness,
    max_duration_secs: u32,
    extra: &str,
) -> (SipMessage, String, String) {
    h.call_limited(vec![target("127.0.0.30:6000")], max_duration_secs);
    let (_, b_invite) = h.out().remove(0);
    let ok =
        answer(&b_invite, 200, "OK", "at1", "v=0\r\n").replacen("\r\n", &format!("\r\n{extra}"), 1);
    h.send(&ok, ingress(ALIAS, "127.0.0.30:6000"));
    let ok = h.out().into_iter().find(|(_, m)| m.status() == Some(200)).expect("200").1;
    let a_tag = ok.to().expect("to").tag().expect("tag").to_owned();
    let a_contact = ok.contacts().expect("contact")[0].uri.to_string();
    h.send(
        &format!(
            "ACK {a_contact} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.20:5000;branch=z9hG4bKack1\r\n\
From: <sip:bob@127.0.0.1>;tag=bt1\r\nTo: <sip:alice@127.0.0.1>;tag={a_tag}\r\nCall-ID: c1@caller\r\nCSeq: 2 ACK\r\n\r\n"
        ),
        ingress(MAIN, CALLER),
    );
    h.out();
    h.work();
    (b_invite, a_contact, a_tag)
}

/// A trunk at `addr`, reached from the main IP, for the number +442079460000.
fn trunk(addr_s: &str) -> Target {
    Target {
        contact: format!("sip:+442079460000@{addr_s}"),
        egress: Egress {
            flow_only: false,
            local: local(MAIN),
            remote: addr(addr_s),
            connection_id: 0,
            dispatcher_id: "d1".into(),
        },
        host: "sip.example.net".into(),
        to: Some(format!("<sip:+442079460000@{addr_s}>")),
        auth: None,
    }
}

#[test]
fn a_failing_trunk_hands_the_call_to_the_next_and_a_busy_number_does_not() {
    let mut h = Harness::new();
    h.call_trunks(vec![
        trunk("127.0.0.41:5060"),
        trunk("127.0.0.42:5060"),
        trunk("127.0.0.43:5060"),
    ]);
    let out = h.out();
    assert_eq!(out.len(), 1, "one trunk at a time: {out:?}");
    let (t, first) = &out[0];
    assert_eq!(t.egress.remote, addr("127.0.0.41:5060"));
    assert_eq!(first.request_uri(), Some("sip:+442079460000@127.0.0.41:5060"));
    assert!(first.header("to").is_some_and(|to| to.contains("sip:+442079460000@127.0.0.41:5060")));
    assert!(first.header("from").is_some_and(|f| f.contains("bob@sip.example.net")));
    // 503 from the first: the second gets the call, the caller hears nothing of it.
    h.send(&answer(first, 503, "Service Unavailable", "g1", ""), ingress(MAIN, "127.0.0.41:5060"));
    let out = h.out();
    assert!(
        out.iter().all(|(t, m)| t.egress.remote != addr(CALLER) || m.status() == Some(100)),
        "{out:?}"
    );
    let (_, second) = out
        .iter()
        .find(|(t, m)| t.egress.remote == addr("127.0.0.42:5060") && m.method() == Some("INVITE"))
        .expect("the second trunk's INVITE");
    // The second answers: the call is up, the third never hears of it.
    h.send(&answer(second, 200, "OK", "g2", "v=0\r\n"), ingress(MAIN, "127.0.0.42:5060"));
    let out = h.out();
    assert!(out.iter().any(|(t, m)| t.egress.remote == addr(CALLER) && m.status() == Some(200)));
    assert!(!out.iter().any(|(t, _)| t.egress.remote == addr("127.0.0.43:5060")));

    // Busy on the first trunk: the number is busy everywhere, the caller hears it.
    let mut h = Harness::new();
    h.call_trunks(vec![trunk("127.0.0.41:5060"), trunk("127.0.0.42:5060")]);
    let (_, first) = h.out().remove(0);
    h.send(&answer(&first, 486, "Busy Here", "g1", ""), ingress(MAIN, "127.0.0.41:5060"));
    let out = h.out();
    assert!(out.iter().any(|(t, m)| t.egress.remote == addr(CALLER) && m.status() == Some(486)));
    assert!(!out.iter().any(|(t, _)| t.egress.remote == addr("127.0.0.42:5060")));

    // Every trunk fails: the caller gets the best of their answers, the reservation goes.
    let mut h = Harness::new();
    h.call_trunks(vec![trunk("127.0.0.41:5060"), trunk("127.0.0.42:5060")]);
    let (_, first) = h.out().remove(0);
    h.send(&answer(&first, 503, "Service Unavailable", "g1", ""), ingress(MAIN, "127.0.0.41:5060"));
    let (_, second) = h
        .out()
        .into_iter()
        .find(|(_, m)| m.method() == Some("INVITE"))
        .expect("the second trunk's INVITE");
    h.send(&answer(&second, 502, "Bad Gateway", "g2", ""), ingress(MAIN, "127.0.0.42:5060"));
    let out = h.out();
    assert!(
        out.iter()
            .any(|(t, m)| t.egress.remote == addr(CALLER) && m.status().is_some_and(|s| s >= 500))
    );
    assert!(h.work().iter().any(|w| matches!(w, Work::AccountingStop(s) if !s.answered)));
    assert_eq!(h.core.b2bua_index_sizes()[0], 0, "the call is gone");
}

#[test]
fn a_trunk_challenge_is_answered_once_and_refused_credentials_fail_over() {
    let creds =
        || Some(crate::routing::TrunkAuth { username: "acct7".into(), password: "s3cret".into() });
    let mut h = Harness::new();
    let t1 = Target { auth: creds(), ..trunk("127.0.0.41:5060") };
    h.call_trunks(vec![t1, trunk("127.0.0.42:5060")]);
    let (_, first) = h.out().remove(0);
    let challenge = answer(&first, 407, "Proxy Authentication Required", "g1", "").replacen(
        "\r\n",
        "\r\nProxy-Authenticate: Digest realm=\"carrier\", nonce=\"n1\", qop=\"auth\"\r\n",
        1,
    );
    h.send(&challenge, ingress(MAIN, "127.0.0.41:5060"));
    let out = h.out();
    let (_, again) = out
        .iter()
        .find(|(_, m)| m.method() == Some("INVITE"))
        .expect("the INVITE again, with credentials");
    assert_eq!(again.call_id().ok(), first.call_id().ok(), "same dialog");
    assert_eq!(again.cseq().expect("cseq").seq, first.cseq().expect("cseq").seq + 1);
    let branch = |m: &SipMessage| m.top_via().ok().and_then(|v| v.branch().map(str::to_owned));
    assert_ne!(branch(again), branch(&first), "a new transaction");
    let auth = again.header("proxy-authorization").expect("Proxy-Authorization");
    let c = sipmsg::digest::Credentials::parse(auth).expect("credentials");
    assert_eq!(
        (c.username.as_str(), c.realm.as_str(), c.nonce.as_str()),
        ("acct7", "carrier", "n1")
    );
    assert!(!format!("{:?}", creds()).contains("s3cret"), "the password is never printed");
    // Refused again: the trunk failed, the next one gets the call.
    let again = again.clone();
    let refused = answer(&again, 407, "Proxy Authentication Required", "g1", "").replacen(
        "\r\n",
        "\r\nProxy-Authenticate: Digest realm=\"carrier\", nonce=\"n2\"\r\n",
        1,
    );
    h.send(&refused, ingress(MAIN, "127.0.0.41:5060"));
    let out = h.out();
    assert!(
        out.iter().any(
            |(t, m)| t.egress.remote == addr("127.0.0.42:5060") && m.method() == Some("INVITE")
        )
    );
    assert!(
        !out.iter()
            .any(|(t, m)| t.egress.remote == addr(CALLER) && m.status().is_some_and(|s| s >= 400))
    );
}

#[test]
fn trunks_get_the_callers_asserted_identity_phones_never_and_privacy_is_honoured() {
    let with = |extra: &str| {
        invite("c1@caller", "z9hG4bKa1").replace(
            "Contact: <sip:bob@127.0.0.20:5000>\r\n",
            &format!("Contact: <sip:bob@127.0.0.20:5000>\r\n{extra}"),
        )
    };
    let forged = "P-Asserted-Identity: <sip:boss@sip.example.net>\r\n";
    // To a trunk: the caller's DID, in P-Asserted-Identity and as the From user; the
    // phone's own forged one is gone.
    let mut h = Harness::new();
    h.call_trunks_as(
        &with(forged),
        vec![trunk("127.0.0.41:5060")],
        Some("sip:+442079460005@sip.example.net"),
    );
    let (_, out) = h.out().remove(0);
    let pai = out.header_list("p-asserted-identity");
    assert_eq!(pai, ["<sip:+442079460005@sip.example.net>"], "{out:?}");
    assert!(out.header("from").is_some_and(|f| f.contains("sip:+442079460005@")), "{out:?}");
    // With Privacy: id, the From is anonymous, the identity still goes to the trusted trunk
    // with the Privacy that tells it to withhold it.
    let mut h = Harness::new();
    h.call_trunks_as(
        &with("Privacy: id\r\n"),
        vec![trunk("127.0.0.41:5060")],
        Some("sip:+442079460005@sip.example.net"),
    );
    let (_, out) = h.out().remove(0);
    assert!(
        out.header("from").is_some_and(|f| f.contains("sip:anonymous@anonymous.invalid")),
        "{out:?}"
    );
    assert_eq!(out.header_list("p-asserted-identity").len(), 1);
    assert_eq!(out.header("privacy"), Some("id"));
    // To a phone: no identity header at all, forged or ours; Privacy anonymizes the From.
    let mut h = Harness::new();
    h.call_with(
        &with(&format!("{forged}Privacy: id\r\n")),
        vec![target("127.0.0.30:6000")],
        0,
        false,
    );
    let (_, out) = h.out().remove(0);
    assert!(out.header_list("p-asserted-identity").is_empty(), "{out:?}");
    assert!(
        out.header("from").is_some_and(|f| f.contains("anonymous.invalid") && !f.contains("bob")),
        "{out:?}"
    );
}

#[test]
fn answered_calls_are_counted_by_the_ip_their_caller_came_in_on() {
    let mut h = Harness::new();
    assert!(h.core.calls_up_per_ip().is_empty());
    answered_call(&mut h);
    let main: std::net::IpAddr = [127, 0, 0, 1].into();
    assert_eq!(h.core.calls_up_per_ip().into_iter().collect::<Vec<_>>(), [(main, 1)]);
}

#[test]
fn re_invite_from_the_caller_is_relayed_and_its_ack_follows_end_to_end() {
    let mut h = Harness::new();
    let (b_invite, a_contact, a_tag) = answered_call(&mut h);
    h.send(
        &format!(
            "INVITE {a_contact} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.20:5000;branch=z9hG4bKre1\r\nMax-Forwards: 70\r\n\
From: <sip:bob@127.0.0.1>;tag=bt1\r\nTo: <sip:alice@127.0.0.1>;tag={a_tag}\r\nCall-ID: c1@caller\r\nCSeq: 3 INVITE\r\n\
Contact: <sip:bob@127.0.0.20:5000>\r\nContent-Type: application/sdp\r\nContent-Length: 9\r\n\r\nv=0\r\nhold"
        ),
        ingress(MAIN, CALLER),
    );
    let out = h.out();
    let re = out.iter().find(|(_, m)| m.method() == Some("INVITE")).expect("re-INVITE to callee");
    assert_eq!(re.0.egress.local, local(ALIAS));
    assert_eq!(re.1.call_id().ok(), b_invite.call_id().ok());
    assert_eq!(re.1.cseq().expect("cseq").seq, 2, "next CSeq of our B-leg dialog");
    assert_eq!(re.1.to().expect("to").tag(), Some("at1"));
    assert_eq!(&re.1.body[..], b"v=0\r\nhold");
    let re = re.1.clone();

    h.send(&answer(&re, 200, "OK", "at1", "v=0\r\nheld"), ingress(ALIAS, "127.0.0.30:6000"));
    let out = h.out();
    let ok = out.iter().find(|(t, m)| t.egress.remote == addr(CALLER) && m.status() == Some(200));
    assert_eq!(&ok.expect("200 to the caller").1.body[..], b"v=0\r\nheld");

    h.send(
        &format!(
            "ACK {a_contact} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.20:5000;branch=z9hG4bKack2\r\n\
From: <sip:bob@127.0.0.1>;tag=bt1\r\nTo: <sip:alice@127.0.0.1>;tag={a_tag}\r\nCall-ID: c1@caller\r\nCSeq: 3 ACK\r\n\r\n"
        ),
        ingress(MAIN, CALLER),
    );
    let out = h.out();
    let ack = out.iter().find(|(_, m)| m.method() == Some("ACK")).expect("ACK relayed");
    assert_eq!(ack.1.cseq().expect("cseq").seq, 2, "ACK carries the re-INVITE's CSeq");
}

/// Runs the harness's timers until `until` (virtual time), returning the BYEs sent, one per
/// destination (their retransmissions left out).
fn byes_until(h: &mut Harness, until: Instant) -> Vec<(Transmit, SipMessage)> {
    let mut byes: Vec<(Transmit, SipMessage)> = Vec::new();
    while let Some(at) = h.core.poll_timeout() {
        if at > until {
            break;
        }
        h.advance_to(at);
        for (t, m) in h.out() {
            if m.method() == Some("BYE")
                && !byes.iter().any(|(o, _)| o.egress.remote == t.egress.remote)
            {
                byes.push((t, m));
            }
        }
    }
    byes
}

#[test]
fn a_session_not_refreshed_in_time_ends_on_both_legs_and_a_refresh_keeps_it() {
    // Not refreshed: both legs get BYE one interval after the answer.
    let mut h = Harness::new();
    answered_call_with(&mut h, 0, "Session-Expires: 90;refresher=uac\r\nRequire: timer\r\n");
    let answered = h.now;
    assert!(byes_until(&mut h, answered + Duration::from_secs(89)).is_empty());
    let byes = byes_until(&mut h, answered + Duration::from_secs(91));
    assert_eq!(byes.len(), 2, "BYE to both legs: {byes:?}");
    for (_, bye) in &byes {
        assert_eq!(bye.header("reason"), Some(crate::b2bua::SESSION_EXPIRED_REASON));
    }
    assert!(h.work().iter().any(
        |w| matches!(w, Work::AccountingStop(s) if s.cause == "session-expired" && s.answered)
    ));

    // Refreshed by the caller at 60 s (a re-INVITE answered 200 with Session-Expires): the
    // call lives until one interval after the refresh.
    let mut h = Harness::new();
    let (_, a_contact, a_tag) =
        answered_call_with(&mut h, 0, "Session-Expires: 90;refresher=uac\r\n");
    let answered = h.now;
    assert!(byes_until(&mut h, answered + Duration::from_secs(60)).is_empty());
    h.advance_to(answered + Duration::from_secs(60));
    h.send(
        &format!(
            "INVITE {a_contact} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.20:5000;branch=z9hG4bKre1\r\nMax-Forwards: 70\r\n\
From: <sip:bob@127.0.0.1>;tag=bt1\r\nTo: <sip:alice@127.0.0.1>;tag={a_tag}\r\nCall-ID: c1@caller\r\nCSeq: 3 INVITE\r\n\
Supported: timer, 100rel\r\nSession-Expires: 90;refresher=uac\r\n\
Contact: <sip:bob@127.0.0.20:5000>\r\nContent-Type: application/sdp\r\nContent-Length: 5\r\n\r\nv=0\r\n"
        ),
        ingress(MAIN, CALLER),
    );
    let out = h.out();
    let (_, re) = out.iter().find(|(_, m)| m.method() == Some("INVITE")).expect("refresh relayed");
    assert_eq!(re.header("session-expires"), Some("90;refresher=uac"));
    assert_eq!(re.header("supported"), Some("timer"), "only what the B2BUA honours");
    let ok = answer(re, 200, "OK", "at1", "v=0\r\n").replacen(
        "\r\n",
        "\r\nSession-Expires: 90;refresher=uac\r\n",
        1,
    );
    h.send(&ok, ingress(ALIAS, "127.0.0.30:6000"));
    let out = h.out();
    let relayed =
        out.iter().find(|(t, m)| t.egress.remote == addr(CALLER) && m.status() == Some(200));
    assert_eq!(relayed.and_then(|(_, m)| m.header("session-expires")), Some("90;refresher=uac"));
    let refreshed = h.now;
    assert!(byes_until(&mut h, refreshed + Duration::from_secs(89)).is_empty(), "refreshed");
    assert_eq!(byes_until(&mut h, refreshed + Duration::from_secs(91)).len(), 2);

    // Without Session-Expires in the answer there is no session timer.
    let mut h = Harness::new();
    answered_call(&mut h);
    let answered = h.now;
    assert!(byes_until(&mut h, answered + Duration::from_secs(86_400)).is_empty());
}

#[test]
fn session_expires_values_from_the_wire_are_bounded() {
    let with = |value: &str| {
        let text = answer_text_with(&format!("Session-Expires: {value}\r\n"));
        crate::b2bua::session_expires(&sipmsg::parse(text.as_bytes()).expect("parses"))
    };
    assert_eq!(with("1800;refresher=uas"), Some(Duration::from_secs(1800)));
    assert_eq!(with(" 90 "), Some(Duration::from_secs(90)));
    assert_eq!(with("99999999999"), Some(Duration::from_secs(7 * 86_400)), "capped at a week");
    for hostile in ["0", "-5", "x", "", ";refresher=uac", "18446744073709551616", "1e3"] {
        assert_eq!(with(hostile), None, "{hostile:?}");
    }
    // The compact form.
    let compact = answer_text_with("x: 120\r\n");
    let msg = sipmsg::parse(compact.as_bytes()).expect("parses");
    assert_eq!(crate::b2bua::session_expires(&msg), Some(Duration::from_secs(120)));
}

/// A 200 to an INVITE carrying the header lines `extra`.
fn answer_text_with(extra: &str) -> String {
    format!(
        "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.2:5060;branch=z9hG4bKx\r\n\
From: <sip:a@127.0.0.2>;tag=1\r\nTo: <sip:b@127.0.0.2>;tag=2\r\nCall-ID: c\r\n\
CSeq: 1 INVITE\r\n{extra}Content-Length: 0\r\n\r\n"
    )
}

#[test]
fn a_request_requiring_session_timers_is_taken_and_other_extensions_get_420() {
    let mut h = Harness::new();
    let with = |require: &str| {
        invite("c9@caller", "z9hG4bKr1").replacen("\r\n", &format!("\r\nRequire: {require}\r\n"), 1)
    };
    h.send(&with("timer"), ingress(MAIN, CALLER));
    assert!(matches!(h.work().pop(), Some(Work::Invite { .. })), "Require: timer is taken");
    let mut h = Harness::new();
    h.send(&with("timer, 100rel, foo"), ingress(MAIN, CALLER));
    let out = h.out();
    let (_, resp) = out.iter().find(|(_, m)| m.status() == Some(420)).expect("420");
    assert_eq!(resp.header("unsupported"), Some("100rel, foo"));
}

#[test]
fn info_from_the_callee_reaches_the_caller_and_the_answer_comes_back() {
    let mut h = Harness::new();
    let (b_invite, _, _) = answered_call(&mut h);
    let b_contact = b_invite.contacts().expect("contact")[0].uri.to_string();
    let b_tag = b_invite.from().expect("from").tag().expect("tag").to_owned();
    h.send(
        &format!(
            "INFO {b_contact} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.30:6000;branch=z9hG4bKinfo1\r\nMax-Forwards: 70\r\n\
From: <sip:alice@127.0.0.2>;tag=at1\r\nTo: <sip:bob@127.0.0.2>;tag={b_tag}\r\nCall-ID: {}\r\nCSeq: 9 INFO\r\n\
Content-Type: application/dtmf-relay\r\nContent-Length: 10\r\n\r\nSignal=5\r\n",
            b_invite.call_id().expect("cid")
        ),
        ingress(ALIAS, "127.0.0.30:6000"),
    );
    let out = h.out();
    let info = out.iter().find(|(_, m)| m.method() == Some("INFO")).expect("INFO to caller");
    assert_eq!(info.0.egress.remote, addr(CALLER));
    assert_eq!(info.1.call_id().ok(), Some("c1@caller"));
    assert_eq!(info.1.header("content-type"), Some("application/dtmf-relay"));
    let info = info.1.clone();
    let mut ok = SipMessage::response_to(&info, 200, "OK Fine", None);
    ok.push_header("Content-Length", "0");
    h.send(&String::from_utf8(ok.to_bytes()).expect("utf8"), ingress(MAIN, CALLER));
    let out = h.out();
    let back =
        out.iter().find(|(t, _)| t.egress.remote == addr("127.0.0.30:6000")).expect("relayed");
    assert_eq!((back.1.status(), back.1.reason()), (Some(200), Some("OK Fine")));
    assert_eq!(back.1.cseq().expect("cseq").seq, 9);
}

#[test]
fn call_reaching_its_maximum_duration_is_cut_off_on_both_legs() {
    let mut h = Harness::new();
    answered_call_limited(&mut h, 600);
    let answered = h.now;
    let deadline = h.core.poll_timeout().expect("a timer");
    // Transaction timers (2xx retransmission) come first; run until the cut-off.
    let mut byes = Vec::new();
    while let Some(at) = h.core.poll_timeout() {
        if at > answered + Duration::from_secs(601) {
            break;
        }
        h.advance_to(at);
        byes.extend(h.out().into_iter().filter(|(_, m)| m.method() == Some("BYE")));
        if !byes.is_empty() {
            break;
        }
    }
    assert!(deadline <= answered + Duration::from_secs(600));
    assert_eq!(h.now - answered, Duration::from_secs(600), "cut off exactly at the maximum");
    assert_eq!(byes.len(), 2, "BYE to both legs");
    let remotes: Vec<_> = byes.iter().map(|(t, _)| t.egress.remote).collect();
    assert!(remotes.contains(&addr(CALLER)) && remotes.contains(&addr("127.0.0.30:6000")));
    for (_, bye) in &byes {
        assert_eq!(bye.header("reason"), Some(crate::b2bua::CUTOFF_REASON));
    }
    assert!(
        h.work()
            .iter()
            .any(|w| matches!(w, Work::AccountingStop(s) if s.cause == "cut-off" && s.answered))
    );
}

#[test]
fn unanswered_call_releases_its_reservation() {
    let mut h = Harness::new();
    h.call(vec![target("127.0.0.30:6000")]);
    let (_, b_invite) = h.out().remove(0);
    h.send(&answer(&b_invite, 486, "Busy Here", "at1", ""), ingress(ALIAS, "127.0.0.30:6000"));
    let out = h.out();
    assert!(out.iter().any(|(t, m)| t.egress.remote == addr(CALLER) && m.status() == Some(486)));
    let stop = h
        .work()
        .into_iter()
        .find_map(|w| match w {
            Work::AccountingStop(s) if !s.answered && s.cause == "not-answered" => Some(s),
            _ => None,
        })
        .expect("the reservation released");
    // The failed attempt's CDR: what the caller got, who called whom, through which IP.
    assert_eq!((stop.status, stop.reason.as_str()), (486, "Busy Here"));
    assert!(!stop.caller.is_empty() && !stop.callee.is_empty(), "{stop:?}");
    assert!(!stop.caller_ingress_ip.is_empty(), "{stop:?}");
    assert!(stop.start.is_none());
}

#[test]
fn callee_flow_gone_gives_the_caller_430() {
    let mut h = Harness::new();
    let mut t = target("127.0.0.30:6000");
    t.egress.local.transport = Transport::Tcp;
    t.egress.connection_id = 7;
    t.egress.flow_only = true;
    h.call(vec![t]);
    let out = h.out();
    assert_eq!(out[0].0.egress.connection_id, 7);
    assert!(out[0].1.top_via().expect("via").transport == "TCP");
    h.done(Done::FlowFailed { connection_id: 7 });
    let out = h.out();
    let resp = out.iter().find(|(t, _)| t.egress.remote == addr(CALLER)).expect("final to caller");
    assert_eq!((resp.1.status(), resp.1.reason()), (Some(430), Some("Flow Failed")));
}

#[test]
fn keepalive_options_leave_from_the_binding_socket_and_silence_is_reported() {
    use crate::core::Keepalive;
    let mut h = Harness::new();
    let t = target("127.0.0.30:6000");
    let ka = Keepalive {
        aor: "alice@sip.example.net".into(),
        field: t.contact.clone(),
        contact: t.contact.clone(),
        egress: t.egress.clone(),
        host: "127.0.0.2".into(),
        options: true,
    };
    h.done(Done::Keepalive(ka.clone()));
    let out = h.out();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0.egress.local, local(ALIAS));
    assert_eq!(out[0].1.method(), Some("OPTIONS"));
    assert_eq!(out[0].1.from().expect("from").uri.host, "127.0.0.2");
    while let Some(at) = h.core.poll_timeout() {
        h.advance_to(at);
        h.out();
    }
    assert!(matches!(h.work().as_slice(), [Work::KeepaliveResult { ok: false, .. }]));

    // Over a stream the ping is a bare CRLF on the phone's connection.
    let mut stream = ka;
    stream.options = false;
    stream.egress.local.transport = Transport::Tcp;
    stream.egress.connection_id = 9;
    h.done(Done::Keepalive(stream));
    let t = h.core.poll_transmit().expect("ping");
    assert_eq!((t.bytes.as_slice(), t.egress.connection_id), (&b"\r\n\r\n"[..], 9));
}

#[test]
fn another_processor_takes_over_an_answered_call_from_its_stored_record() {
    let mut p1 = Harness::new();
    p1.call(vec![target("127.0.0.30:6000")]);
    let (_, b_invite) = p1.out().remove(0);
    p1.send(&answer(&b_invite, 200, "OK", "at1", "v=0\r\n"), ingress(ALIAS, "127.0.0.30:6000"));
    p1.out();
    let record = p1
        .work()
        .into_iter()
        .find_map(|w| match w {
            Work::SaveDialog(r) => Some(*r),
            _ => None,
        })
        .expect("answered call stored");
    assert_eq!(record.b.call_id, b_invite.call_id().expect("cid"));
    // Stored as JSON with its addresses in text form (docs/redis-data-model.md), and read back
    // the same by whichever processor takes the call over.
    let json = serde_json::to_string(&record).expect("serializes");
    assert!(json.contains(r#""a_ingress_ip":"127.0.0.1""#), "{json}");
    let record: crate::b2bua::DialogRecord = serde_json::from_str(&json).expect("reads back");

    // p1 is gone; the callee's BYE reaches p2, which finds the call in Redis.
    let mut p2 = Harness::for_node("p2");
    let b_contact = b_invite.contacts().expect("contact")[0].uri.to_string();
    let bye = format!(
        "BYE {b_contact} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.30:6000;branch=z9hG4bKtk1\r\nMax-Forwards: 70\r\n\
From: <sip:alice@127.0.0.2>;tag=at1\r\nTo: <sip:bob@127.0.0.2>;tag={}\r\nCall-ID: {}\r\nCSeq: 8 BYE\r\n\r\n",
        b_invite.from().expect("from").tag().expect("tag"),
        b_invite.call_id().expect("cid")
    );
    p2.send(&bye, ingress(ALIAS, "127.0.0.30:6000"));
    assert!(p2.out().is_empty(), "nothing sent before the lookup");
    let Some(Work::LoadDialog { key, .. }) = p2.work().pop() else { panic!("lookup asked") };
    p2.done(Done::Dialog { key, record: Some(Box::new(record)) });
    let out = p2.out();
    let ok = out.iter().find(|(t, _)| t.egress.remote == addr("127.0.0.30:6000")).expect("200");
    assert_eq!(ok.1.status(), Some(200));
    let to_caller = out.iter().find(|(t, _)| t.egress.remote == addr(CALLER)).expect("BYE");
    assert_eq!(to_caller.1.method(), Some("BYE"));
    assert_eq!(to_caller.0.egress.local, local(MAIN), "from the caller's own socket");
    assert_eq!(to_caller.1.call_id().ok(), Some("c1@caller"));
    let work = p2.work();
    assert!(
        work.iter()
            .any(|w| matches!(w, Work::AccountingStop(s) if s.answered && s.cause == "callee-bye"))
    );
    assert!(work.iter().any(|w| matches!(w, Work::DeleteDialog(_))));
}

#[test]
fn in_dialog_request_for_a_call_nowhere_gets_481_after_the_lookup() {
    let mut h = Harness::new();
    h.send(
        "INFO sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.20:5000;branch=z9hG4bKi9\r\nFrom: <sip:b@h>;tag=1\r\nTo: <sip:x@h>;tag=2\r\nCall-ID: gone\r\nCSeq: 5 INFO\r\n\r\n",
        ingress(MAIN, CALLER),
    );
    let Some(Work::LoadDialog { key, .. }) = h.work().pop() else { panic!("lookup asked") };
    h.done(Done::Dialog { key, record: None });
    assert_eq!(h.out()[0].1.status(), Some(481));
}

/// The benchmark's call, many times over (INVITE, 180, 200, ACK, BYE from the caller, 200 from
/// the callee): once every transaction has lingered out, nothing of any call is left.
#[test]
fn many_finished_calls_leave_nothing_behind() {
    let mut h = Harness::new();
    let callee = ingress(ALIAS, "127.0.0.30:6000");
    for n in 0..1200 {
        let call_id = format!("c{n}@caller");
        // The challenge round: INVITE, 407, ACK on the INVITE's branch.
        let first = invite(&call_id, &format!("z9hG4bKc{n}"));
        h.send(&first, ingress(MAIN, CALLER));
        let Some(Work::Invite { key, request, .. }) = h.work().pop() else {
            panic!("INVITE must become setup work")
        };
        let challenge =
            SipMessage::response_to(&request, 407, "Proxy Authentication Required", Some("ch1"));
        h.done(Done::Answer { key, response: challenge });
        assert_eq!(h.out().len(), 1, "the 407");
        let ack = format!(
            "ACK sip:alice@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.20:5000;branch=z9hG4bKc{n};rport\r\n\
Max-Forwards: 70\r\nFrom: \"Bob\" <sip:bob@127.0.0.1>;tag=bt1\r\nTo: <sip:alice@127.0.0.1>;tag=ch1\r\n\
Call-ID: {call_id}\r\nCSeq: 2 ACK\r\n\r\n"
        );
        h.send(&ack, ingress(MAIN, CALLER));
        assert!(h.out().is_empty() && h.work().is_empty(), "the ACK is absorbed");
        h.send(&invite(&call_id, &format!("z9hG4bKm{n}")), ingress(MAIN, CALLER));
        let Some(Work::Invite { key, ingress: i, .. }) = h.work().pop() else {
            panic!("INVITE must become setup work")
        };
        let plan = CallPlan {
            caller_aor: "bob@sip.example.net".into(),
            callee_aor: "alice@sip.example.net".into(),
            targets: vec![target("127.0.0.30:6000")],
            max_duration_secs: 0,
            call_ref: format!("{call_id};bt1"),
            auto_answer: false,
            hunt: Vec::new(),
            asserted: None,
        };
        h.done(Done::Call { key, plan: Box::new(plan), ingress: i });
        let (_, b_invite) = h.out().remove(0);
        h.send(&answer(&b_invite, 180, "Ringing", "at1", ""), callee.clone());
        h.send(&answer(&b_invite, 200, "OK", "at1", "v=0\r\n"), callee.clone());
        let ok = h.out().into_iter().find(|(_, m)| m.status() == Some(200)).expect("200").1;
        let a_tag = ok.to().expect("to").tag().expect("to-tag").to_owned();
        let a_contact = ok.contacts().expect("contact")[0].uri.to_string();
        let in_dialog = |method: &str, branch: &str, cseq: u32| {
            format!(
                "{method} {a_contact} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.20:5000;branch={branch}\r\n\
Max-Forwards: 70\r\nFrom: <sip:bob@127.0.0.1>;tag=bt1\r\nTo: <sip:alice@127.0.0.1>;tag={a_tag}\r\n\
Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n\r\n"
            )
        };
        h.send(&in_dialog("ACK", &format!("z9hG4bKk{n}"), 2), ingress(MAIN, CALLER));
        h.send(&in_dialog("BYE", &format!("z9hG4bKb{n}"), 3), ingress(MAIN, CALLER));
        let out = h.out();
        let (_, bye) = out.iter().find(|(_, m)| m.method() == Some("BYE")).expect("BYE to callee");
        h.send(&answer(bye, 200, "OK", "at1", ""), callee.clone());
        h.out();
        h.work();
        // 25 calls/s for 48 s: past the 32 s the longest transaction lingers, so the state
        // reaches its steady size; the timer queue (stale entries included) stays in
        // proportion to the live transactions.
        let at = h.now + std::time::Duration::from_millis(40);
        h.advance_to(at);
        let (c, sv, _) = h.core.load();
        assert!(h.core.timer_queue_len() <= 2 * (c + sv) + 8, "timer queue bounded by live state");
    }
    let at = h.now + std::time::Duration::from_secs(40);
    h.advance_to(at);
    h.out();
    assert_eq!(h.core.load(), (0, 0, 0), "transactions and calls all gone");
    assert_eq!(h.core.b2bua_index_sizes(), [0; 5], "calls, call-ids, server, client, deadlines");
}

/// A request on the caller's leg of an answered call, with the given tags.
fn caller_request(
    method: &str,
    a_contact: &str,
    from_tag: &str,
    to_tag: &str,
    cseq: u32,
) -> String {
    format!(
        "{method} {a_contact} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.66:5000;branch=z9hG4bK{method}{cseq}{to_tag}\r\n\
Max-Forwards: 70\r\nFrom: <sip:bob@127.0.0.1>;tag={from_tag}\r\nTo: <sip:alice@127.0.0.1>;tag={to_tag}\r\n\
Call-ID: c1@caller\r\nCSeq: {cseq} {method}\r\nContact: <sip:evil@127.0.0.66:5000>\r\n\
Content-Type: application/sdp\r\nContent-Length: 11\r\n\r\nv=0\r\nevil\r\n"
    )
}

#[test]
fn requests_with_a_known_call_id_but_not_the_dialog_tags_get_481_and_change_nothing() {
    let mut h = Harness::new();
    let (_b_invite, a_contact, a_tag) = answered_call(&mut h);
    let stranger = ingress(MAIN, "127.0.0.66:5000");
    let cases = [
        ("BYE", "bt1", "guessed"),
        ("BYE", "other", a_tag.as_str()),
        ("INVITE", "bt1", "guessed"),
        ("INVITE", "other", a_tag.as_str()),
        ("UPDATE", "other", a_tag.as_str()),
        ("INFO", "bt1", "x"),
    ];
    for (i, (method, from_tag, to_tag)) in cases.into_iter().enumerate() {
        h.send(
            &caller_request(method, &a_contact, from_tag, to_tag, 10 + i as u32),
            stranger.clone(),
        );
        let out = h.out();
        assert_eq!(out.len(), 1, "{method} {from_tag}/{to_tag}: only an answer, nothing relayed");
        assert_eq!(out[0].1.status(), Some(481), "{method} {from_tag}/{to_tag}");
        assert_eq!(out[0].0.egress.remote, addr("127.0.0.66:5000"));
        assert!(h.work().is_empty(), "no accounting, no dialog update, no Redis lookup");
    }
    // A stranger's ACK is dropped.
    let ack = caller_request("ACK", &a_contact, "bt1", "guessed", 2);
    h.send(&ack, stranger);
    assert!(h.out().is_empty(), "ACK with foreign tags relayed nowhere");
    assert_eq!(h.core.load().2, 1, "the call is still up");

    // The real caller can still hang up: BYE reaches the callee, and the call is accounted.
    h.send(&caller_request("BYE", &a_contact, "bt1", &a_tag, 20), ingress(MAIN, CALLER));
    let out = h.out();
    assert!(
        out.iter()
            .any(|(t, m)| m.method() == Some("BYE") && t.egress.remote == addr("127.0.0.30:6000"))
    );
    assert!(
        h.work().iter().any(|w| matches!(w, Work::AccountingStop(s) if s.cause == "caller-bye"))
    );
}

#[test]
fn stored_call_is_not_taken_over_for_a_request_with_foreign_tags() {
    let mut h = Harness::new();
    let (_b, a_contact, a_tag) = answered_call(&mut h);
    // The record this processor would store, then a second processor that does not hold it.
    h.advance_to(h.now + Duration::from_secs(1));
    h.send(&caller_request("INFO", &a_contact, "bt1", &a_tag, 30), ingress(MAIN, CALLER));
    let record = h.work().into_iter().find_map(|w| match w {
        Work::SaveDialog(r) => Some(*r),
        _ => None,
    });
    let record = record.expect("an in-dialog request re-saves the call");
    let mut other = Harness::for_node("p2");
    other.send(
        &caller_request("BYE", &a_contact, "bt1", "guessed", 31),
        ingress(MAIN, "127.0.0.66:5000"),
    );
    let Some(Work::LoadDialog { key, .. }) = other.work().pop() else {
        panic!("looked up in Redis")
    };
    other.done(Done::Dialog { key, record: Some(Box::new(record.clone())) });
    let out = other.out();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1.status(), Some(481));
    assert_eq!(other.core.load().2, 0, "nothing adopted");
    let ack = sipmsg::parse(caller_request("ACK", &a_contact, "bt1", "guessed", 2).as_bytes())
        .expect("ack");
    other.done(Done::DialogForAck { record: Box::new(record), ack });
    assert!(other.out().is_empty());
    assert_eq!(other.core.load().2, 0, "nothing adopted for a foreign ACK either");
}

#[test]
fn second_invite_with_a_live_calls_call_id_is_a_merged_request() {
    let mut h = Harness::new();
    h.call(vec![target("127.0.0.30:6000")]);
    h.out();
    // Same Call-ID and From tag, new branch and CSeq, to someone else.
    let second = invite("c1@caller", "z9hG4bKa2")
        .replace("sip:alice@127.0.0.1 SIP", "sip:carol@127.0.0.1 SIP")
        .replace("CSeq: 2 INVITE", "CSeq: 3 INVITE");
    h.send(&second, ingress(MAIN, CALLER));
    let out = h.out();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1.status(), Some(482));
    assert!(h.work().is_empty(), "not even authorized");

    // The same race with both INVITEs already past authorization: the later plan is refused.
    let mut h = Harness::new();
    h.send(&invite("c1@caller", "z9hG4bKa1"), ingress(MAIN, CALLER));
    h.send(&second, ingress(MAIN, CALLER));
    let works = h.work();
    assert_eq!(works.len(), 2);
    let plan = |call_ref: &str| CallPlan {
        caller_aor: "bob@sip.example.net".into(),
        callee_aor: "alice@sip.example.net".into(),
        targets: vec![target("127.0.0.30:6000")],
        max_duration_secs: 0,
        call_ref: call_ref.into(),
        auto_answer: false,
        hunt: Vec::new(),
        asserted: None,
    };
    for (w, r) in works.into_iter().zip(["ref-1", "ref-2"]) {
        let Work::Invite { key, ingress: i, .. } = w else { panic!("setup work") };
        h.done(Done::Call { key, plan: Box::new(plan(r)), ingress: i });
    }
    let released: Vec<String> = h
        .work()
        .into_iter()
        .filter_map(|w| match w {
            Work::AccountingStop(s) if s.cause == "cancelled" && !s.answered => Some(s.call_ref),
            _ => None,
        })
        .collect();
    assert_eq!(released, ["ref-2"], "the second is refused, its reservation released");
    let out = h.out();
    assert!(out.iter().any(|(_, m)| m.status() == Some(482)));
    assert_eq!(
        out.iter().filter(|(_, m)| m.method() == Some("INVITE")).count(),
        1,
        "one callee rings"
    );
}

/// Runs the virtual clock up to `until`, collecting what is sent.
fn run_until(h: &mut Harness, until: Instant) -> Vec<(Instant, Transmit, SipMessage)> {
    let mut sent = Vec::new();
    while let Some(at) = h.core.poll_timeout() {
        if at > until {
            break;
        }
        h.advance_to(at);
        sent.extend(h.out().into_iter().map(|(t, m)| (at, t, m)));
    }
    sent
}

/// A call whose callee sends 180 at once and 183 again `later`; returns when the call started
/// and the B-leg INVITE.
fn ring_twice(h: &mut Harness, later: Duration) -> (Instant, SipMessage) {
    let start = h.now;
    h.call(vec![target("127.0.0.30:6000")]);
    let (_, b_invite) = h.out().remove(0);
    let callee = ingress(ALIAS, "127.0.0.30:6000");
    h.send(&answer(&b_invite, 180, "Ringing", "at1", ""), callee.clone());
    h.out();
    h.advance_to(start + later);
    h.send(&answer(&b_invite, 183, "Session Progress", "at1", ""), callee);
    h.out();
    (start, b_invite)
}

#[test]
fn callee_ringing_forever_is_cancelled_by_timer_c_and_the_reservation_released() {
    let mut h = Harness::new();
    // A provisional 100 s in restarts Timer C (185 s by default).
    let (start, _) = ring_twice(&mut h, Duration::from_secs(100));
    let sent = run_until(&mut h, start + Duration::from_secs(284));
    assert!(sent.iter().all(|(_, _, m)| m.method() != Some("CANCEL")), "still ringing at 284 s");
    let sent = run_until(&mut h, start + Duration::from_secs(286));
    let cancel = sent.iter().find(|(_, _, m)| m.method() == Some("CANCEL")).expect("CANCEL");
    assert_eq!(cancel.0, start + Duration::from_secs(285), "185 s after the last provisional");
    assert_eq!(cancel.1.egress.remote, addr("127.0.0.30:6000"));
    let to_caller =
        sent.iter().find(|(_, t, m)| t.egress.remote == addr(CALLER) && m.status().is_some());
    assert_eq!(to_caller.map(|(_, _, m)| m.status()), Some(Some(408)));
    // The callee ignores the CANCEL: 64*T1 later the branch is given up and billing told.
    assert!(!h.work().iter().any(|w| matches!(w, Work::AccountingStop(_))));
    run_until(&mut h, start + Duration::from_secs(285 + 33));
    let stops: Vec<_> = h
        .work()
        .into_iter()
        .filter_map(|w| match w {
            Work::AccountingStop(s) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(stops.len(), 1);
    assert!(!stops[0].answered && stops[0].cause == "no-answer", "{:?}", stops[0]);
    assert_eq!(h.core.load().2, 0, "call removed");
    assert_eq!(h.core.b2bua_index_sizes(), [0; 5], "nothing left behind");
}

#[test]
fn no_answer_timeout_limits_ringing_from_the_start_and_is_not_restarted() {
    let timers = Timers { no_answer: Some(Duration::from_secs(30)), ..Timers::default() };
    let mut h = Harness::with_timers("p1", timers);
    let (start, b_invite) = ring_twice(&mut h, Duration::from_secs(20));
    let callee = ingress(ALIAS, "127.0.0.30:6000");
    let sent = run_until(&mut h, start + Duration::from_secs(31));
    let cancel = sent.iter().find(|(_, _, m)| m.method() == Some("CANCEL")).expect("CANCEL");
    assert_eq!(cancel.0, start + Duration::from_secs(30));
    assert!(
        sent.iter().any(|(_, t, m)| t.egress.remote == addr(CALLER) && m.status() == Some(408))
    );
    // This callee does answer the CANCEL: the call ends at once.
    let c = cancel.2.clone();
    let ok = SipMessage::response_to(&c, 200, "OK", Some("at1"));
    h.send(&String::from_utf8(ok.to_bytes()).expect("utf8"), callee.clone());
    h.send(&answer(&b_invite, 487, "Request Terminated", "at1", ""), callee);
    let out = h.out();
    assert!(out.iter().any(|(_, m)| m.method() == Some("ACK")), "487 ACKed");
    assert!(
        !out.iter().any(|(t, m)| t.egress.remote == addr(CALLER) && m.status() == Some(487)),
        "the caller already has its 408"
    );
    assert!(h.work().iter().any(
        |w| matches!(w, Work::AccountingStop(s) if s.cause == "no-answer" && s.status == 408)
    ));
    assert_eq!(h.core.b2bua_index_sizes(), [0; 5]);
}

#[test]
fn answered_call_is_not_cut_by_the_ring_timers() {
    let timers = Timers { no_answer: Some(Duration::from_secs(30)), ..Timers::default() };
    let mut h = Harness::with_timers("p1", timers);
    let start = h.now;
    answered_call(&mut h);
    let sent = run_until(&mut h, start + Duration::from_secs(400));
    assert!(sent.iter().all(|(_, _, m)| m.method() != Some("CANCEL") && m.method() != Some("BYE")));
    assert_eq!(h.core.load().2, 1);
}

const AUTO_ANSWER_INVITE_HEADERS: &str = "Call-Info: <sip:127.0.0.1>;answer-after=0\r\n\
Call-Info: <http://example.com/bob.png>;purpose=icon, <sip:x>;Answer-After=1\r\n\
Alert-Info: <http://127.0.0.1/ring.wav>\r\nAlert-Info: <http://x>;info=alert-autoanswer;delay=0\r\n\
Alert-Info: Intercom\r\nAnswer-Mode: Auto\r\nPriv-Answer-Mode: Auto;require\r\n";

fn auto_answer_invite() -> String {
    invite("c1@caller", "z9hG4bKa1")
        .replace("Contact:", &format!("{AUTO_ANSWER_INVITE_HEADERS}Contact:"))
}

#[test]
fn auto_answer_headers_of_an_untrusted_caller_never_reach_the_callee() {
    let mut h = Harness::new();
    h.call_with(&auto_answer_invite(), vec![target("127.0.0.30:6000")], 0, false);
    let (_, b) = h.out().remove(0);
    let call_info: Vec<_> = b.headers_named("call-info").collect();
    assert_eq!(call_info, vec!["<http://example.com/bob.png>;purpose=icon"]);
    let alert: Vec<_> = b.headers_named("alert-info").collect();
    assert_eq!(alert, vec!["<http://127.0.0.1/ring.wav>"], "the ringtone stays");
    assert_eq!(b.header("answer-mode"), None);
    assert_eq!(b.header("priv-answer-mode"), None);
}

#[test]
fn auto_answer_headers_of_a_trusted_caller_are_passed_on() {
    let mut h = Harness::new();
    h.call_with(&auto_answer_invite(), vec![target("127.0.0.30:6000")], 0, true);
    let (_, b) = h.out().remove(0);
    assert_eq!(b.headers_named("call-info").count(), 2);
    assert_eq!(b.headers_named("alert-info").count(), 3);
    assert_eq!(b.header("answer-mode"), Some("Auto"));
    assert_eq!(b.header("priv-answer-mode"), Some("Auto;require"));
}

/// Past its limits the core turns new INVITEs and REGISTERs away with a stateless `503` and
/// `Retry-After` (no transaction, nothing retransmitted), while retransmissions of what it
/// holds, requests within calls and other requests still pass.
#[test]
fn past_its_limits_new_invites_and_registers_get_503_and_held_work_goes_on() {
    let mut h = Harness::new();
    h.core.set_limits(Limits {
        max_server_transactions: 1,
        max_setup_in_flight: 100,
        retry_after_secs: 7,
    });
    h.send(&invite("held@caller", "z9hG4bKheld"), ingress(MAIN, CALLER));
    assert!(matches!(h.work().as_slice(), [Work::Invite { .. }]), "the first INVITE is taken");
    assert_eq!(h.core.load().1, 1);

    let register = "REGISTER sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.20:5000;branch=z9hG4bKr1\r\n\
Max-Forwards: 70\r\nFrom: <sip:bob@127.0.0.1>;tag=r1\r\nTo: <sip:bob@127.0.0.1>\r\n\
Call-ID: reg@caller\r\nCSeq: 1 REGISTER\r\nContact: <sip:bob@127.0.0.20:5000>\r\nContent-Length: 0\r\n\r\n";
    for new in [invite("new@caller", "z9hG4bKnew"), register.to_owned()] {
        h.send(&new, ingress(MAIN, CALLER));
        let out = h.out();
        assert_eq!(out.len(), 1, "one answer");
        let (t, m) = &out[0];
        assert_eq!(m.status(), Some(503));
        assert_eq!(m.header("retry-after"), Some("7"));
        assert_eq!(t.egress.remote, addr(CALLER));
        assert!(h.work().is_empty(), "no work started");
        assert_eq!(h.core.load().1, 1, "no transaction kept for the 503");
    }
    // Nothing is retransmitted for a stateless 503.
    let later = h.now + Duration::from_secs(4);
    h.advance_to(later);
    assert!(h.out().iter().all(|(_, m)| m.status() != Some(503)), "503 never repeated");

    // The held INVITE's retransmission is absorbed by its transaction, not refused.
    h.send(&invite("held@caller", "z9hG4bKheld"), ingress(MAIN, CALLER));
    assert!(h.out().iter().all(|(_, m)| m.status() != Some(503)));
    // A request within a call (To tag) is not new work: it is matched (here: 481).
    let bye = "BYE sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.20:5000;branch=z9hG4bKb1\r\n\
Max-Forwards: 70\r\nFrom: <sip:bob@127.0.0.1>;tag=bt1\r\nTo: <sip:alice@127.0.0.1>;tag=zz\r\n\
Call-ID: other@caller\r\nCSeq: 3 BYE\r\nContent-Length: 0\r\n\r\n";
    h.send(bye, ingress(MAIN, CALLER));
    let statuses: Vec<_> = h.out().iter().map(|(_, m)| m.status()).collect();
    assert!(!statuses.contains(&Some(503)), "{statuses:?}");

    // The setup bound works the same way.
    let mut h = Harness::new();
    h.core.set_limits(Limits {
        max_server_transactions: 100,
        max_setup_in_flight: 2,
        retry_after_secs: 5,
    });
    h.core.set_setup_in_flight(2);
    h.send(&invite("c9@caller", "z9hG4bKc9"), ingress(MAIN, CALLER));
    assert_eq!(h.out().first().and_then(|(_, m)| m.status()), Some(503));
    h.core.set_setup_in_flight(1);
    h.send(&invite("c9@caller", "z9hG4bKc9"), ingress(MAIN, CALLER));
    assert!(matches!(h.work().as_slice(), [Work::Invite { .. }]), "room again: taken");
}

//! Conformance tests of the transaction layer on a virtual clock, grouped by RFC section.
//! Every instant is `start + offset`; nothing sleeps.

use std::time::{Duration, Instant};

use sipmsg::SipMessage;

use super::{ClientKey, Held, ServerKey, Timers, TransactionLayer, TxError, TxEvent};
use crate::transport::{Egress, Ingress, LocalAddr, Transmit, Transport};

const CALL_ID: &str = "a84b4c76e66710@pc33.atlanta.example.com";
const FROM: &str = "Alice <sip:alice@atlanta.example.com>;tag=1928301774";
const TO: &str = "Bob <sip:bob@biloxi.example.com>";
const URI: &str = "sip:bob@biloxi.example.com";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn local(transport: Transport) -> LocalAddr {
    LocalAddr { addr: ([192, 0, 2, 10], 5060).into(), transport }
}

fn connection(transport: Transport) -> u64 {
    if transport.is_unreliable() { 0 } else { 7 }
}

fn ingress(transport: Transport) -> Ingress {
    Ingress {
        local: local(transport),
        remote: ([198, 51, 100, 7], 5060).into(),
        connection_id: connection(transport),
        dispatcher_id: "d1".into(),
    }
}

fn egress(transport: Transport) -> Egress {
    Egress {
        local: local(transport),
        remote: ([203, 0, 113, 5], 5060).into(),
        connection_id: connection(transport),
        dispatcher_id: "d1".into(),
        flow_only: false,
    }
}

/// A request as an RFC 3261 UA sends it, from `pc33.atlanta.example.com`.
fn request(method: &str, branch: &str, seq: u32) -> SipMessage {
    request_from(method, branch, seq, "pc33.atlanta.example.com")
}

fn request_from(method: &str, branch: &str, seq: u32, sent_by: &str) -> SipMessage {
    let mut m = SipMessage::request(method, URI);
    m.push_header("Via", format!("SIP/2.0/UDP {sent_by};branch={branch}"));
    m.push_header("Max-Forwards", "70");
    m.push_header("From", FROM);
    m.push_header("To", TO);
    m.push_header("Call-ID", CALL_ID);
    m.push_header("CSeq", format!("{seq} {method}"));
    m
}

/// The ACK a UAC sends for a 2xx: a new transaction, so a new branch, and the 2xx's To tag.
fn ack_for_2xx(branch: &str, seq: u32, to_tag: &str) -> SipMessage {
    let mut ack = request("ACK", branch, seq);
    ack.set_header("To", format!("{TO};tag={to_tag}"));
    ack
}

fn response(req: &SipMessage, status: u16, reason: &str) -> SipMessage {
    SipMessage::response_to(req, status, reason, Some("8321234356"))
}

fn parse(t: &Transmit) -> SipMessage {
    sipmsg::parse(&t.bytes).expect("the layer sends parseable messages")
}

/// A layer with default timers and a fixed origin for the virtual clock.
struct Harness {
    layer: TransactionLayer,
    start: Instant,
}

impl Harness {
    fn new() -> Self {
        Harness { layer: TransactionLayer::new(Timers::default()), start: Instant::now() }
    }

    fn at(&self, offset: Duration) -> Instant {
        self.start + offset
    }

    /// Fires every timer up to `start + until`, each at its own deadline; returns what was sent,
    /// with the offset it was sent at.
    fn run_until(&mut self, until: Duration) -> Vec<(Duration, Transmit)> {
        let mut sent = Vec::new();
        while let Some(deadline) = self.layer.poll_timeout()
            && deadline <= self.start + until
        {
            self.layer.handle_timeout(deadline);
            while let Some(t) = self.layer.poll_transmit() {
                sent.push((deadline - self.start, t));
            }
        }
        sent
    }

    /// Offsets of what `run_until` sent.
    fn retransmit_times(&mut self, until: Duration) -> Vec<Duration> {
        self.run_until(until).into_iter().map(|(at, _)| at).collect()
    }

    fn transmits(&mut self) -> Vec<Transmit> {
        std::iter::from_fn(|| self.layer.poll_transmit()).collect()
    }

    fn events(&mut self) -> Vec<TxEvent> {
        std::iter::from_fn(|| self.layer.poll_event()).collect()
    }

    /// Starts a client transaction at `start` and drains the first transmission.
    fn client(&mut self, req: SipMessage, transport: Transport) -> ClientKey {
        let key = self.layer.start_client(self.start, req, egress(transport));
        assert_eq!(self.transmits().len(), 1, "the request is sent once at once");
        key
    }

    /// Delivers a request at `start`, expects a new transaction and drains its output.
    fn server(&mut self, req: SipMessage, transport: Transport) -> ServerKey {
        self.layer.handle_request(self.start, req, ingress(transport));
        self.transmits();
        match self.events().as_slice() {
            [TxEvent::Request { key, .. }] => key.clone(),
            other => panic!("expected one Request event, got {other:?}"),
        }
    }
}

fn times(offsets: &[f64]) -> Vec<Duration> {
    offsets.iter().map(|s| secs(*s)).collect()
}

/// RFC 3261 §17.1.1: INVITE client transaction, with the RFC 6026 Accepted state.
mod invite_client {
    use super::*;

    #[test]
    fn timer_a_doubles_from_t1_and_timer_b_times_out_once_at_64_t1() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKa1", 1);
        let key = h.client(invite.clone(), Transport::Udp);

        let sent = h.run_until(secs(31.999));
        let at: Vec<_> = sent.iter().map(|(at, _)| *at).collect();
        assert_eq!(at, times(&[0.5, 1.5, 3.5, 7.5, 15.5, 31.5]));
        assert!(
            sent.iter()
                .all(|(_, t)| t.bytes == invite.to_bytes() && t.egress == egress(Transport::Udp))
        );
        assert!(h.events().is_empty(), "no timeout before 64*T1");

        assert!(h.run_until(secs(100.0)).is_empty());
        assert_eq!(h.events(), vec![TxEvent::Timeout { key }]);
        assert_eq!(h.layer.len(), (0, 0));
        assert_eq!(h.layer.poll_timeout(), None);
    }

    #[test]
    fn a_late_timeout_call_fires_timer_b_once() {
        let mut h = Harness::new();
        let key = h.client(request("INVITE", "z9hG4bKa2", 1), Transport::Udp);
        h.layer.handle_timeout(h.at(secs(40.0)));
        assert_eq!(h.transmits().len(), 1, "one overdue retransmission, not a burst");
        assert_eq!(h.events(), vec![TxEvent::Timeout { key }]);
        assert!(h.layer.is_empty());
    }

    #[test]
    fn provisional_stops_timers_a_and_b_and_every_provisional_is_passed_up() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKa3", 1);
        let key = h.client(invite.clone(), Transport::Udp);
        assert_eq!(h.layer.poll_timeout(), Some(h.at(ms(500))));

        let ringing = response(&invite, 180, "Ringing");
        h.layer.handle_response(h.at(ms(200)), ringing.clone(), ingress(Transport::Udp));
        h.layer.handle_response(h.at(ms(300)), ringing.clone(), ingress(Transport::Udp));
        let expected = TxEvent::Response { key, response: ringing };
        assert_eq!(h.events(), vec![expected.clone(), expected]);

        assert_eq!(h.layer.poll_timeout(), None, "Proceeding has no timer; ringing is Timer C's");
        assert!(h.run_until(secs(300.0)).is_empty());
        assert!(h.events().is_empty());
        assert_eq!(h.layer.len(), (1, 0));
    }

    #[test]
    fn non_2xx_final_is_acked_with_the_response_to_tag_and_the_invite_branch() {
        let mut h = Harness::new();
        let mut invite = request("INVITE", "z9hG4bKa4", 7);
        invite.push_header("Route", "<sip:edge.example.com;lr>");
        let key = h.client(invite.clone(), Transport::Udp);

        let busy = response(&invite, 486, "Busy Here");
        h.layer.handle_response(h.at(ms(100)), busy.clone(), ingress(Transport::Udp));
        assert_eq!(h.events(), vec![TxEvent::Response { key, response: busy }]);

        let sent = h.transmits();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].egress, egress(Transport::Udp), "the ACK follows the INVITE");
        let ack = parse(&sent[0]);
        assert_eq!(ack.method(), Some("ACK"));
        assert_eq!(ack.request_uri(), Some(URI));
        let vias = ack.vias().expect("via");
        assert_eq!(vias.len(), 1);
        assert_eq!(vias[0].branch(), Some("z9hG4bKa4"));
        assert_eq!(ack.to().expect("to").tag(), Some("8321234356"));
        assert_eq!(ack.header("from"), Some(FROM));
        assert_eq!(ack.call_id().expect("call-id"), CALL_ID);
        assert_eq!(ack.header("cseq"), Some("7 ACK"));
        assert_eq!(ack.header("route"), Some("<sip:edge.example.com;lr>"));
        assert!(ack.validate_request().is_ok());
    }

    #[test]
    fn retransmitted_non_2xx_final_resends_the_ack_without_an_event_until_timer_d() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKa5", 1);
        h.client(invite.clone(), Transport::Udp);
        let busy = response(&invite, 486, "Busy Here");
        h.layer.handle_response(h.at(ms(100)), busy.clone(), ingress(Transport::Udp));
        let first_ack = h.transmits();
        assert_eq!(h.events().len(), 1);

        h.layer.handle_response(h.at(secs(2.0)), busy.clone(), ingress(Transport::Udp));
        assert_eq!(h.transmits(), first_ack);
        assert!(h.events().is_empty(), "a retransmitted final is not passed up again");

        assert!(h.run_until(secs(32.099)).is_empty(), "Completed does not retransmit the INVITE");
        assert_eq!(h.layer.len(), (1, 0), "Timer D runs 32 s from the final");
        h.run_until(secs(32.1));
        assert_eq!(h.layer.len(), (0, 0));
        h.layer.handle_response(h.at(secs(33.0)), busy, ingress(Transport::Udp));
        assert!(h.transmits().is_empty() && h.events().is_empty());
    }

    /// RFC 6026 §8.4: the transaction passes every 2xx up and sends no ACK itself.
    #[test]
    fn every_2xx_is_passed_up_without_an_ack_until_timer_m() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKa6", 1);
        let key = h.client(invite.clone(), Transport::Udp);
        let ok = response(&invite, 200, "OK");
        let forked = SipMessage::response_to(&invite, 200, "OK", Some("other-fork"));

        h.layer.handle_response(h.at(ms(100)), ok.clone(), ingress(Transport::Udp));
        h.layer.handle_response(h.at(ms(600)), ok.clone(), ingress(Transport::Udp));
        h.layer.handle_response(h.at(ms(700)), forked.clone(), ingress(Transport::Udp));
        let response_event = |response: &SipMessage| TxEvent::Response {
            key: key.clone(),
            response: response.clone(),
        };
        assert_eq!(
            h.events(),
            vec![response_event(&ok), response_event(&ok), response_event(&forked)]
        );
        assert!(h.transmits().is_empty(), "the 2xx is the TU's to ACK");

        assert!(h.run_until(secs(32.099)).is_empty(), "Accepted does not retransmit the INVITE");
        assert_eq!(h.layer.len(), (1, 0));
        h.run_until(secs(32.1));
        assert_eq!(h.layer.len(), (0, 0), "Timer M = 64*T1 after the first 2xx");
        h.layer.handle_response(h.at(secs(33.0)), ok, ingress(Transport::Udp));
        assert!(h.events().is_empty(), "a 2xx after Timer M matches nothing");
    }
}

/// RFC 3261 §17.1.2: non-INVITE client transaction.
mod non_invite_client {
    use super::*;

    #[test]
    fn timer_e_doubles_up_to_t2_and_timer_f_times_out_at_64_t1() {
        let mut h = Harness::new();
        let key = h.client(request("OPTIONS", "z9hG4bKe1", 1), Transport::Udp);
        let expected = times(&[0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]);
        assert_eq!(h.retransmit_times(secs(31.999)), expected);
        assert!(h.events().is_empty());
        h.run_until(secs(32.0));
        assert_eq!(h.events(), vec![TxEvent::Timeout { key }]);
        assert!(h.layer.is_empty());
    }

    #[test]
    fn timer_e_is_t2_once_a_provisional_arrived_and_timer_f_still_runs() {
        let mut h = Harness::new();
        let req = request("BYE", "z9hG4bKe2", 2);
        let key = h.client(req.clone(), Transport::Udp);
        assert_eq!(h.retransmit_times(secs(0.7)), times(&[0.5]));
        h.layer.handle_response(
            h.at(secs(0.7)),
            response(&req, 100, "Trying"),
            ingress(Transport::Udp),
        );
        assert_eq!(h.events().len(), 1);
        let expected = times(&[1.5, 5.5, 9.5, 13.5, 17.5, 21.5, 25.5, 29.5]);
        assert_eq!(h.retransmit_times(secs(31.999)), expected);
        h.run_until(secs(32.0));
        assert_eq!(h.events(), vec![TxEvent::Timeout { key }]);
    }

    #[test]
    fn timer_k_absorbs_retransmitted_finals_then_terminates() {
        let mut h = Harness::new();
        let req = request("OPTIONS", "z9hG4bKe3", 1);
        let key = h.client(req.clone(), Transport::Udp);
        let ok = response(&req, 200, "OK");
        h.layer.handle_response(h.at(secs(1.0)), ok.clone(), ingress(Transport::Udp));
        assert_eq!(h.events(), vec![TxEvent::Response { key, response: ok.clone() }]);

        h.layer.handle_response(h.at(secs(2.0)), ok.clone(), ingress(Transport::Udp));
        assert!(h.events().is_empty(), "Completed absorbs the retransmitted final");
        assert!(h.run_until(secs(5.999)).is_empty(), "no retransmission after the final");
        assert_eq!(h.layer.len(), (1, 0));
        h.run_until(secs(6.0));
        assert_eq!(h.layer.len(), (0, 0), "Timer K = T4 after the final");
    }
}

/// RFC 3261 §17.2.1: INVITE server transaction, with the RFC 6026 Accepted state.
mod invite_server {
    use super::*;

    #[test]
    fn new_invite_is_passed_up_once_and_answered_with_100_trying() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKs1", 1);
        h.layer.handle_request(h.start, invite.clone(), ingress(Transport::Udp));
        let key = match h.events().as_slice() {
            [TxEvent::Request { key, request, ingress: from }] => {
                assert_eq!(**request, invite);
                assert_eq!(from, &ingress(Transport::Udp));
                key.clone()
            }
            other => panic!("expected one Request, got {other:?}"),
        };
        assert_eq!(key.method(), "INVITE");
        assert_eq!(key.branch(), "z9hG4bKs1");

        // The 100 waits for the TU for 200 ms (RFC 3261 §17.2.1), then goes out on its own.
        assert!(h.transmits().is_empty(), "no 100 before the TU had 200 ms");
        assert_eq!(h.layer.poll_timeout(), Some(h.start + ms(200)));
        h.layer.handle_timeout(h.start + ms(200));
        let sent = h.transmits();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].egress, ingress(Transport::Udp).reply_egress());
        let trying = parse(&sent[0]);
        assert_eq!(trying.status(), Some(100));
        assert_eq!(trying.top_via().expect("via").branch(), Some("z9hG4bKs1"));
        assert_eq!(trying.header("cseq"), Some("1 INVITE"));
        assert_eq!(trying.to().expect("to").tag(), None, "100 Trying carries no To tag");
        assert_eq!(h.layer.server_request(&key), Some(&invite));
        assert!(!h.layer.server_is_final(&key));
    }

    #[test]
    fn invite_answered_within_200_ms_gets_no_100_trying() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKs2", 1);
        h.layer.handle_request(h.start, invite.clone(), ingress(Transport::Udp));
        let key = match h.events().as_slice() {
            [TxEvent::Request { key, .. }] => key.clone(),
            other => panic!("expected one Request, got {other:?}"),
        };
        let challenge = response(&invite, 407, "Proxy Authentication Required");
        h.layer.respond(h.start + ms(150), &key, challenge).expect("respond");
        let sent: Vec<_> = h.transmits().iter().map(|t| parse(t).status()).collect();
        assert_eq!(sent, [Some(407)]);
        // The 100's deadline is gone with it, and so is the transaction: a challenge keeps
        // no timer at all.
        assert_eq!(h.layer.poll_timeout(), None);
    }

    #[test]
    fn retransmitted_invite_gets_the_100_at_once() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKs3", 1);
        h.layer.handle_request(h.start, invite.clone(), ingress(Transport::Udp));
        assert!(h.transmits().is_empty());
        h.layer.handle_request(h.start + ms(100), invite.clone(), ingress(Transport::Udp));
        let sent: Vec<_> = h.transmits().iter().map(|t| parse(t).status()).collect();
        assert_eq!(sent, [Some(100)], "the client retransmits: it needs a provisional now");
        assert_eq!(h.layer.poll_timeout(), None, "no second 100 due");
        h.layer.handle_request(h.start + ms(600), invite, ingress(Transport::Udp));
        let sent: Vec<_> = h.transmits().iter().map(|t| parse(t).status()).collect();
        assert_eq!(sent, [Some(100)], "later retransmissions get the same 100 again");
    }

    #[test]
    fn retransmitted_invite_is_absorbed_and_gets_the_last_provisional() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKs2", 1);
        let key = h.server(invite.clone(), Transport::Udp);

        h.layer.handle_request(h.at(ms(500)), invite.clone(), ingress(Transport::Udp));
        assert_eq!(parse(&h.transmits()[0]).status(), Some(100));

        let ringing = response(&invite, 180, "Ringing");
        h.layer.respond(h.at(ms(600)), &key, ringing.clone()).expect("respond");
        assert_eq!(h.transmits()[0].bytes, ringing.to_bytes());
        h.layer.handle_request(h.at(ms(1500)), invite, ingress(Transport::Udp));
        let sent = h.transmits();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].bytes, ringing.to_bytes());
        assert!(h.events().is_empty(), "retransmissions never reach the TU");
        assert_eq!(h.layer.len(), (0, 1));
    }

    #[test]
    fn non_2xx_final_is_retransmitted_by_timer_g_until_the_ack_which_is_absorbed() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKs3", 1);
        let key = h.server(invite.clone(), Transport::Udp);
        let busy = response(&invite, 486, "Busy Here");
        h.layer.respond(h.start, &key, busy.clone()).expect("respond");
        assert_eq!(h.transmits()[0].bytes, busy.to_bytes());
        assert!(h.layer.server_is_final(&key));

        let sent = h.run_until(secs(12.0));
        let at: Vec<_> = sent.iter().map(|(at, _)| *at).collect();
        assert_eq!(at, times(&[0.5, 1.5, 3.5, 7.5, 11.5]), "T1 doubling, capped at T2");
        assert!(sent.iter().all(|(_, t)| t.bytes == busy.to_bytes()));

        h.layer.handle_request(h.at(secs(12.0)), invite.clone(), ingress(Transport::Udp));
        assert_eq!(
            h.transmits()[0].bytes,
            busy.to_bytes(),
            "a retransmitted INVITE gets the final"
        );

        let mut ack = request("ACK", "z9hG4bKs3", 1);
        ack.set_header("To", format!("{TO};tag=8321234356"));
        h.layer.handle_request(h.at(secs(12.1)), ack.clone(), ingress(Transport::Udp));
        h.layer.handle_request(h.at(secs(12.2)), ack, ingress(Transport::Udp));
        assert!(h.events().is_empty(), "the ACK for a non-2xx is hop by hop");
        assert!(h.run_until(secs(17.099)).is_empty(), "the ACK stops Timer G");
        assert_eq!(h.layer.len(), (0, 1));
        h.run_until(secs(17.1));
        assert_eq!(h.layer.len(), (0, 0), "Timer I = T4 after the ACK");
    }

    #[test]
    fn a_challenge_is_sent_once_keeps_no_transaction_and_its_ack_is_absorbed() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKs7", 1);
        let key = h.server(invite.clone(), Transport::Udp);
        let challenge = response(&invite, 407, "Proxy Authentication Required");
        h.layer.respond(h.start, &key, challenge).expect("respond");
        assert_eq!(h.transmits().len(), 1);
        // Nothing is kept for it: a flood of unauthenticated INVITEs holds no transactions.
        assert_eq!(h.layer.len(), (0, 0), "no transaction kept for a challenge");
        // A spoofed source never ACKs: nothing more is sent to it, however long we wait.
        assert!(h.run_until(secs(100.0)).is_empty(), "no Timer G for a challenge");

        // A real caller's ACK is absorbed (no event for the TU, nothing sent).
        let invite = request("INVITE", "z9hG4bKs8", 1);
        let key = h.server(invite.clone(), Transport::Udp);
        let unauthorized = response(&invite, 401, "Unauthorized");
        h.layer.respond(h.at(secs(100.0)), &key, unauthorized).expect("respond");
        h.transmits();
        h.events();
        let ack = request("ACK", "z9hG4bKs8", 1);
        h.layer.handle_request(h.at(secs(100.1)), ack.clone(), ingress(Transport::Udp));
        assert!(h.events().is_empty(), "the challenge's ACK is absorbed");
        assert!(h.transmits().is_empty());
        // Over TCP too.
        let invite = request("INVITE", "z9hG4bKs9", 1);
        let key = h.server(invite.clone(), Transport::Tcp);
        h.layer.respond(h.at(secs(100.2)), &key, response(&invite, 407, "x")).expect("respond");
        assert_eq!(h.layer.len(), (0, 0));
        // 64*T1 later it is forgotten: a stray ACK then reaches the TU (which drops it).
        h.events();
        h.layer.handle_request(h.at(secs(133.0)), ack, ingress(Transport::Udp));
        assert_eq!(h.events().len(), 1, "forgotten after 64*T1");

        // A retransmitted INVITE (the challenge was lost) is a new request for the TU, which
        // challenges it again: one answer per INVITE received.
        let invite = request("INVITE", "z9hG4bKs10", 1);
        let key = h.server(invite.clone(), Transport::Udp);
        h.layer.respond(h.at(secs(134.0)), &key, response(&invite, 401, "x")).expect("respond");
        h.events();
        h.layer.handle_request(h.at(secs(134.5)), invite, ingress(Transport::Udp));
        assert_eq!(h.events().len(), 1, "the retransmission is new work");
    }

    #[test]
    fn timer_h_ends_an_unacknowledged_non_2xx_final_without_an_event() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKs4", 1);
        let key = h.server(invite.clone(), Transport::Udp);
        h.layer.respond(h.start, &key, response(&invite, 603, "Decline")).expect("respond");
        h.transmits();
        let expected = times(&[0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]);
        assert_eq!(h.retransmit_times(secs(31.999)), expected);
        assert_eq!(h.layer.len(), (0, 1));
        assert!(h.run_until(secs(100.0)).is_empty());
        assert_eq!(h.layer.len(), (0, 0), "Timer H = 64*T1");
        assert!(h.events().is_empty());
    }

    #[test]
    fn respond_refuses_a_second_final_an_unknown_transaction_and_a_request() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKs5", 1);
        let key = h.server(invite.clone(), Transport::Udp);
        let err = h.layer.respond(h.start, &key, invite.clone());
        assert_eq!(err, Err(TxError::NotAResponse));
        h.layer.respond(h.start, &key, response(&invite, 486, "Busy Here")).expect("respond");
        let again = h.layer.respond(h.start, &key, response(&invite, 200, "OK"));
        assert_eq!(again, Err(TxError::AlreadyFinal));
        let other = ServerKey::from_request(&request("INVITE", "z9hG4bKnone", 1)).expect("key");
        let missing = h.layer.respond(h.start, &other, response(&invite, 200, "OK"));
        assert_eq!(missing, Err(TxError::NoSuchTransaction));
    }

    /// RFC 6026 §7.1: the 2xx is retransmitted by the transaction until its ACK.
    #[test]
    fn a_2xx_is_retransmitted_until_its_ack_which_is_passed_up() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKs6", 1);
        let key = h.server(invite.clone(), Transport::Udp);
        let ok = response(&invite, 200, "OK");
        h.layer.respond(h.start, &key, ok.clone()).expect("respond");
        assert_eq!(h.transmits()[0].bytes, ok.to_bytes());

        let sent = h.run_until(secs(4.0));
        assert_eq!(sent.iter().map(|(at, _)| *at).collect::<Vec<_>>(), times(&[0.5, 1.5, 3.5]));
        assert!(sent.iter().all(|(_, t)| t.bytes == ok.to_bytes()));

        h.layer.handle_request(h.at(secs(4.0)), invite.clone(), ingress(Transport::Udp));
        assert!(h.transmits().is_empty() && h.events().is_empty(), "Accepted absorbs the INVITE");

        let ack = ack_for_2xx("z9hG4bKack6", 1, "8321234356");
        h.layer.handle_request(h.at(secs(4.5)), ack.clone(), ingress(Transport::Udp));
        assert_eq!(
            h.events(),
            vec![TxEvent::Ack { request: ack, ingress: ingress(Transport::Udp) }]
        );
        assert!(h.run_until(secs(31.999)).is_empty(), "the ACK stops the 2xx retransmissions");
        assert_eq!(h.layer.len(), (0, 1), "Timer L keeps the transaction to absorb INVITEs");
        h.run_until(secs(32.0));
        assert_eq!(h.layer.len(), (0, 0));
        assert!(h.events().is_empty(), "no AckTimeout once the ACK came");
    }

    #[test]
    fn an_ack_for_another_2xx_does_not_stop_the_retransmissions() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKs7", 1);
        let key = h.server(invite.clone(), Transport::Udp);
        h.layer.respond(h.start, &key, response(&invite, 200, "OK")).expect("respond");
        h.transmits();
        let stray = ack_for_2xx("z9hG4bKack7", 1, "another-tag");
        h.layer.handle_request(h.at(ms(100)), stray.clone(), ingress(Transport::Udp));
        assert_eq!(
            h.events(),
            vec![TxEvent::Ack { request: stray, ingress: ingress(Transport::Udp) }]
        );
        assert_eq!(h.retransmit_times(secs(2.0)), times(&[0.5, 1.5]));
    }

    #[test]
    fn an_unacknowledged_2xx_ends_with_ack_timeout_after_64_t1() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKs8", 1);
        let key = h.server(invite.clone(), Transport::Udp);
        h.layer.respond(h.start, &key, response(&invite, 200, "OK")).expect("respond");
        h.transmits();
        let expected = times(&[0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]);
        assert_eq!(h.retransmit_times(secs(31.999)), expected);
        assert!(h.events().is_empty());
        assert!(h.run_until(secs(100.0)).is_empty());
        assert_eq!(h.events(), vec![TxEvent::AckTimeout { key }]);
        assert!(h.layer.is_empty());
    }

    /// RFC 3261 §17: an ACK for a 2xx is a transaction of its own.
    #[test]
    fn an_ack_matching_no_transaction_is_passed_up_and_creates_none() {
        let mut h = Harness::new();
        let ack = ack_for_2xx("z9hG4bKlone", 1, "8321234356");
        h.layer.handle_request(h.start, ack.clone(), ingress(Transport::Udp));
        assert_eq!(
            h.events(),
            vec![TxEvent::Ack { request: ack, ingress: ingress(Transport::Udp) }]
        );
        assert!(h.transmits().is_empty());
        assert!(h.layer.is_empty());
    }
}

/// RFC 3261 §17.2.2: non-INVITE server transaction.
mod non_invite_server {
    use super::*;

    #[test]
    fn retransmission_in_trying_is_absorbed() {
        let mut h = Harness::new();
        let req = request("OPTIONS", "z9hG4bKn1", 1);
        h.layer.handle_request(h.start, req.clone(), ingress(Transport::Udp));
        assert_eq!(h.events().len(), 1);
        assert!(h.transmits().is_empty(), "no automatic 100 for non-INVITE");
        h.layer.handle_request(h.at(ms(500)), req, ingress(Transport::Udp));
        assert!(h.events().is_empty() && h.transmits().is_empty());
    }

    #[test]
    fn retransmissions_get_the_last_response_and_timer_j_cleans_up() {
        let mut h = Harness::new();
        let req = request("REGISTER", "z9hG4bKn2", 1);
        let key = h.server(req.clone(), Transport::Udp);

        let trying = response(&req, 100, "Trying");
        h.layer.respond(h.start, &key, trying.clone()).expect("provisional");
        h.layer.handle_request(h.at(ms(500)), req.clone(), ingress(Transport::Udp));
        let sent = h.transmits();
        assert_eq!(
            sent.iter().map(|t| t.bytes.clone()).collect::<Vec<_>>(),
            vec![trying.to_bytes(), trying.to_bytes()]
        );

        let ok = response(&req, 200, "OK");
        h.layer.respond(h.at(secs(1.0)), &key, ok.clone()).expect("final");
        h.layer.handle_request(h.at(secs(1.5)), req.clone(), ingress(Transport::Udp));
        let sent = h.transmits();
        assert_eq!(sent.len(), 2);
        assert!(sent.iter().all(|t| t.bytes == ok.to_bytes()));
        assert!(h.events().is_empty());

        assert!(h.run_until(secs(32.999)).is_empty(), "a non-INVITE final is not retransmitted");
        assert_eq!(h.layer.len(), (0, 1));
        h.run_until(secs(33.0));
        assert_eq!(h.layer.len(), (0, 0), "Timer J = 64*T1 after the final");
        assert_eq!(h.layer.poll_timeout(), None);
    }
}

/// RFC 3261 §9: CANCEL.
mod cancel {
    use super::*;

    #[test]
    fn cancel_is_its_own_transaction_and_cancel_target_finds_the_invite() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKc1", 1);
        let invite_key = h.server(invite.clone(), Transport::Udp);
        let cancel = request("CANCEL", "z9hG4bKc1", 1);
        let cancel_key = h.server(cancel.clone(), Transport::Udp);
        assert_ne!(cancel_key, invite_key);
        assert_eq!(cancel_key.method(), "CANCEL");
        assert_eq!(h.layer.len(), (0, 2));

        assert_eq!(
            h.layer.cancel_target(&cancel, &ingress(Transport::Udp)),
            Some(invite_key.clone())
        );
        let other = request("CANCEL", "z9hG4bKc2", 1);
        assert_eq!(h.layer.cancel_target(&other, &ingress(Transport::Udp)), None);
        assert_eq!(h.layer.cancel_target(&invite, &ingress(Transport::Udp)), None, "not a CANCEL");

        h.layer.respond(h.start, &cancel_key, response(&cancel, 200, "OK")).expect("200 CANCEL");
        h.layer
            .respond(h.start, &invite_key, response(&invite, 487, "Request Terminated"))
            .expect("487");
        assert!(h.layer.server_is_final(&invite_key));
        assert_eq!(h.layer.cancel_target(&cancel, &ingress(Transport::Udp)), Some(invite_key));
    }

    #[test]
    fn cancel_request_needs_a_provisional_and_no_final() {
        let mut h = Harness::new();
        let mut invite = request("INVITE", "z9hG4bKc3", 4);
        invite.push_header("Route", "<sip:edge.example.com;lr>");
        let key = h.client(invite.clone(), Transport::Udp);
        assert_eq!(h.layer.cancel_request(&key), None, "no provisional yet");

        h.layer.handle_response(
            h.at(ms(100)),
            response(&invite, 180, "Ringing"),
            ingress(Transport::Udp),
        );
        h.events();
        let (cancel, out) = h.layer.cancel_request(&key).expect("cancellable in Proceeding");
        assert_eq!(out, egress(Transport::Udp));
        assert_eq!(cancel.method(), Some("CANCEL"));
        assert_eq!(cancel.request_uri(), Some(URI));
        let vias = cancel.vias().expect("via");
        assert_eq!(vias.len(), 1);
        assert_eq!(vias[0].branch(), Some("z9hG4bKc3"));
        assert_eq!(cancel.header("to"), Some(TO));
        assert_eq!(cancel.header("from"), Some(FROM));
        assert_eq!(cancel.header("cseq"), Some("4 CANCEL"));
        assert_eq!(cancel.header("route"), Some("<sip:edge.example.com;lr>"));
        assert!(cancel.validate_request().is_ok());

        let cancel_key = h.layer.start_client(h.at(ms(200)), cancel.clone(), out);
        assert_ne!(cancel_key, key);
        assert_eq!(h.layer.len(), (2, 0));
        let ok = response(&cancel, 200, "OK");
        h.layer.handle_response(h.at(ms(300)), ok.clone(), ingress(Transport::Udp));
        assert_eq!(h.events(), vec![TxEvent::Response { key: cancel_key, response: ok }]);
        assert!(h.layer.cancel_request(&key).is_some(), "the 200 to CANCEL leaves the INVITE");

        h.layer.handle_response(
            h.at(ms(400)),
            response(&invite, 487, "Request Terminated"),
            ingress(Transport::Udp),
        );
        assert_eq!(h.layer.cancel_request(&key), None, "already final");
    }
}

/// RFC 3261 §17.1.3 and §17.2.3: matching.
mod matching {
    use super::*;

    #[test]
    fn a_response_with_an_unknown_branch_produces_nothing() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKm1", 1);
        h.client(invite, Transport::Udp);
        let stray = request("INVITE", "z9hG4bKunknown", 1);
        h.layer.handle_response(
            h.at(ms(100)),
            response(&stray, 180, "Ringing"),
            ingress(Transport::Udp),
        );
        h.layer.handle_response(
            h.at(ms(100)),
            response(&stray, 486, "Busy"),
            ingress(Transport::Udp),
        );
        assert!(h.events().is_empty() && h.transmits().is_empty());
        assert_eq!(h.retransmit_times(secs(0.5)), times(&[0.5]), "the INVITE is still Calling");
    }

    #[test]
    fn a_response_with_the_branch_but_another_method_does_not_match() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKm2", 1);
        h.client(invite, Transport::Udp);
        let cancel = request("CANCEL", "z9hG4bKm2", 1);
        h.layer.handle_response(
            h.at(ms(100)),
            response(&cancel, 200, "OK"),
            ingress(Transport::Udp),
        );
        assert!(h.events().is_empty());
    }

    #[test]
    fn the_same_branch_from_another_sent_by_is_another_transaction() {
        let mut h = Harness::new();
        h.server(request("OPTIONS", "z9hG4bKm3", 1), Transport::Udp);
        let other = request_from("OPTIONS", "z9hG4bKm3", 1, "pc34.atlanta.example.com");
        h.server(other, Transport::Udp);
        assert_eq!(h.layer.len(), (0, 2));
    }

    /// RFC 3261 §17.2.3: a branch without the magic cookie is matched on the RFC 2543 fields.
    #[test]
    fn rfc2543_requests_match_their_retransmissions_ack_and_cancel() {
        let mut h = Harness::new();
        let invite = request("INVITE", "old1", 1);
        let key = h.server(invite.clone(), Transport::Udp);
        h.layer.handle_request(h.at(ms(500)), invite.clone(), ingress(Transport::Udp));
        assert!(h.events().is_empty(), "retransmission recognised");
        h.transmits();

        let cancel = request("CANCEL", "old1", 1);
        assert_eq!(h.layer.cancel_target(&cancel, &ingress(Transport::Udp)), Some(key.clone()));

        h.layer
            .respond(h.at(secs(1.0)), &key, response(&invite, 486, "Busy Here"))
            .expect("respond");
        let mut ack = request("ACK", "old1", 1);
        ack.set_header("To", format!("{TO};tag=8321234356"));
        h.layer.handle_request(h.at(secs(1.1)), ack, ingress(Transport::Udp));
        assert!(h.events().is_empty(), "the ACK matched the INVITE transaction");

        let next = request("INVITE", "old1", 2);
        h.server(next, Transport::Udp);
        assert_eq!(h.layer.len(), (0, 2), "another CSeq is another transaction");
    }
}

/// RFC 3261 §17: on a reliable transport nothing is retransmitted and Timers D, I, J and K are
/// zero.
mod reliable_transport {
    use super::*;

    #[test]
    fn tcp_client_transactions_never_retransmit_and_end_with_the_final() {
        let mut h = Harness::new();
        let options = request("OPTIONS", "z9hG4bKt1", 1);
        h.client(options.clone(), Transport::Tcp);
        let invite = request("INVITE", "z9hG4bKt2", 1);
        h.client(invite.clone(), Transport::Tcp);
        assert!(h.run_until(secs(31.0)).is_empty());

        h.layer.handle_response(
            h.at(secs(31.0)),
            response(&options, 200, "OK"),
            ingress(Transport::Tcp),
        );
        h.layer.handle_response(
            h.at(secs(31.0)),
            response(&invite, 486, "Busy"),
            ingress(Transport::Tcp),
        );
        assert_eq!(h.events().len(), 2);
        let sent = h.transmits();
        assert_eq!(sent.len(), 1);
        assert_eq!(parse(&sent[0]).method(), Some("ACK"));
        assert_eq!(sent[0].egress, egress(Transport::Tcp));
        assert_eq!(h.layer.len(), (0, 0), "Timers K and D are zero");
    }

    #[test]
    fn tcp_client_timer_f_still_times_out() {
        let mut h = Harness::new();
        let key = h.client(request("OPTIONS", "z9hG4bKt3", 1), Transport::Tls);
        assert!(h.run_until(secs(40.0)).is_empty());
        assert_eq!(h.events(), vec![TxEvent::Timeout { key }]);
    }

    #[test]
    fn tcp_server_transactions_never_retransmit_and_end_at_once() {
        let mut h = Harness::new();
        let options = request("OPTIONS", "z9hG4bKt4", 1);
        let key = h.server(options.clone(), Transport::Tcp);
        h.layer.respond(h.start, &key, response(&options, 200, "OK")).expect("respond");
        assert_eq!(h.transmits()[0].egress, ingress(Transport::Tcp).reply_egress());
        assert_eq!(h.layer.len(), (0, 0), "Timer J is zero");

        let invite = request("INVITE", "z9hG4bKt5", 1);
        let key = h.server(invite.clone(), Transport::Tcp);
        h.layer.respond(h.start, &key, response(&invite, 486, "Busy Here")).expect("respond");
        h.transmits();
        assert!(h.run_until(secs(10.0)).is_empty(), "no Timer G");
        let mut ack = request("ACK", "z9hG4bKt5", 1);
        ack.set_header("To", format!("{TO};tag=8321234356"));
        h.layer.handle_request(h.at(secs(10.0)), ack, ingress(Transport::Tcp));
        assert_eq!(h.layer.len(), (0, 0), "Timer I is zero");
        assert!(h.events().is_empty());
    }

    #[test]
    fn tcp_2xx_is_not_retransmitted_but_timer_l_still_reports_a_missing_ack() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKt6", 1);
        let key = h.server(invite.clone(), Transport::Tcp);
        h.layer.respond(h.start, &key, response(&invite, 200, "OK")).expect("respond");
        h.transmits();
        assert!(h.run_until(secs(40.0)).is_empty());
        assert_eq!(h.events(), vec![TxEvent::AckTimeout { key }]);
    }
}

/// What a transaction keeps as it progresses: a final transaction lingers (up to 64*T1) only to
/// absorb retransmissions, so it lets go of the request and of anything it will not send again,
/// and every retransmission it must still answer is answered the same.
mod retained_state {
    use super::*;

    const NOTHING: Held = Held { request: false, resend: false, ack_key: false };

    impl Harness {
        fn server_held(&self, key: &ServerKey) -> Held {
            self.layer.servers.get(key).expect("server transaction").held()
        }

        fn client_held(&self, key: &ClientKey) -> Held {
            self.layer.clients.get(key).expect("client transaction").held()
        }
    }

    #[test]
    fn an_accepted_invite_server_keeps_only_its_2xx_until_the_ack_then_nothing() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKr1", 1);
        let key = h.server(invite.clone(), Transport::Udp);
        // No 100 yet (it waits 200 ms for the TU), so nothing to re-send.
        assert_eq!(h.server_held(&key), Held { request: true, resend: false, ack_key: false });
        assert_eq!(h.layer.server_request(&key), Some(&invite));

        let ok = response(&invite, 200, "OK");
        h.layer.respond(h.start, &key, ok.clone()).expect("respond");
        h.transmits();
        assert_eq!(h.server_held(&key), Held { request: false, resend: true, ack_key: true });
        assert_eq!(h.layer.server_request(&key), None, "the TU has answered");
        assert_eq!(h.layer.accepted.len(), 1);
        let sent = h.run_until(secs(1.0));
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].1.bytes, ok.to_bytes(), "the kept 2xx is the one sent");

        let ack = ack_for_2xx("z9hG4bKackr1", 1, "8321234356");
        h.layer.handle_request(h.at(secs(1.2)), ack.clone(), ingress(Transport::Udp));
        assert_eq!(h.events().len(), 1, "the ACK is passed up");
        assert_eq!(h.server_held(&key), NOTHING);
        assert!(h.layer.accepted.is_empty(), "the ACK key served its purpose");

        // What the ACK's arrival leaves to absorb still is absorbed or passed up as before.
        h.layer.handle_request(h.at(secs(2.0)), ack.clone(), ingress(Transport::Udp));
        assert_eq!(
            h.events(),
            vec![TxEvent::Ack { request: ack, ingress: ingress(Transport::Udp) }],
            "a retransmitted ACK still goes to the TU"
        );
        h.layer.handle_request(h.at(secs(3.0)), invite, ingress(Transport::Udp));
        assert!(h.transmits().is_empty() && h.events().is_empty(), "the INVITE is absorbed");
        assert!(h.run_until(secs(32.5)).is_empty());
        assert!(h.layer.is_empty() && h.events().is_empty(), "Timer L, and no AckTimeout");
    }

    #[test]
    fn an_ack_for_the_2xx_reusing_the_invite_branch_also_releases_the_ack_key() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKr2", 1);
        let key = h.server(invite.clone(), Transport::Udp);
        h.layer.respond(h.start, &key, response(&invite, 200, "OK")).expect("respond");
        h.transmits();
        let ack = ack_for_2xx("z9hG4bKr2", 1, "8321234356");
        h.layer.handle_request(h.at(ms(100)), ack, ingress(Transport::Udp));
        assert_eq!(h.events().len(), 1, "the ACK is passed up");
        assert_eq!(h.server_held(&key), NOTHING);
        assert!(h.layer.accepted.is_empty());
        assert!(h.run_until(secs(10.0)).is_empty(), "no more 2xx retransmissions");
    }

    #[test]
    fn a_2xx_over_a_reliable_transport_is_not_kept() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKr3", 1);
        let key = h.server(invite.clone(), Transport::Tcp);
        h.layer.respond(h.start, &key, response(&invite, 200, "OK")).expect("respond");
        assert_eq!(h.transmits().len(), 1);
        assert_eq!(h.server_held(&key), Held { request: false, resend: false, ack_key: true });
    }

    #[test]
    fn a_completed_invite_server_keeps_its_final_until_the_ack_then_nothing() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKr4", 1);
        let key = h.server(invite.clone(), Transport::Udp);
        let busy = response(&invite, 486, "Busy Here");
        h.layer.respond(h.start, &key, busy.clone()).expect("respond");
        h.transmits();
        assert_eq!(h.server_held(&key), Held { request: false, resend: true, ack_key: false });
        assert_eq!(h.layer.server_request(&key), None);
        h.layer.handle_request(h.at(ms(100)), invite.clone(), ingress(Transport::Udp));
        assert_eq!(h.transmits()[0].bytes, busy.to_bytes(), "a retransmitted INVITE gets it");

        let mut ack = request("ACK", "z9hG4bKr4", 1);
        ack.set_header("To", format!("{TO};tag=8321234356"));
        h.layer.handle_request(h.at(ms(200)), ack, ingress(Transport::Udp));
        assert_eq!(h.server_held(&key), NOTHING, "Confirmed sends nothing again");
        h.layer.handle_request(h.at(ms(300)), invite, ingress(Transport::Udp));
        assert!(h.transmits().is_empty() && h.events().is_empty());
    }

    #[test]
    fn a_completed_non_invite_server_keeps_only_its_final_for_retransmissions() {
        let mut h = Harness::new();
        let bye = request("BYE", "z9hG4bKr5", 2);
        let key = h.server(bye.clone(), Transport::Udp);
        assert_eq!(h.server_held(&key), Held { request: true, resend: false, ack_key: false });
        let ok = response(&bye, 200, "OK");
        h.layer.respond(h.start, &key, ok.clone()).expect("respond");
        h.transmits();
        assert_eq!(h.server_held(&key), Held { request: false, resend: true, ack_key: false });
        h.layer.handle_request(h.at(secs(20.0)), bye, ingress(Transport::Udp));
        let sent = h.transmits();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].bytes, ok.to_bytes(), "a retransmitted request gets the last response");
        assert!(h.events().is_empty());
    }

    #[test]
    fn an_invite_client_keeps_its_request_until_the_final_then_only_the_ack() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKr6", 1);
        let key = h.client(invite.clone(), Transport::Udp);
        assert_eq!(h.client_held(&key), Held { request: true, resend: false, ack_key: false });
        let sent = h.run_until(secs(0.5));
        assert_eq!(sent[0].1.bytes, invite.to_bytes(), "Timer A re-sends the same bytes");

        h.layer.handle_response(
            h.at(secs(1.0)),
            response(&invite, 183, "Session Progress"),
            ingress(Transport::Udp),
        );
        assert_eq!(h.layer.client_request(&key), Some(&invite));
        assert!(h.layer.cancel_request(&key).is_some(), "CANCEL is built from the request");

        let busy = response(&invite, 486, "Busy Here");
        h.layer.handle_response(h.at(secs(2.0)), busy.clone(), ingress(Transport::Udp));
        let ack = h.transmits();
        assert_eq!(ack.len(), 1);
        assert_eq!(h.client_held(&key), Held { request: false, resend: true, ack_key: false });
        assert_eq!(h.layer.client_request(&key), None, "final");
        assert_eq!(h.layer.cancel_request(&key), None);
        h.layer.handle_response(h.at(secs(3.0)), busy, ingress(Transport::Udp));
        assert_eq!(h.transmits(), ack, "a retransmitted final gets the same ACK");
    }

    #[test]
    fn timer_entries_share_the_key_of_the_transaction_map() {
        use std::cmp::Reverse;
        use std::sync::Arc;

        use super::super::TxRef;

        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKr9", 1);
        let key = h.client(invite.clone(), Transport::Udp);
        // The 200 is matched by a key made from it; Timer M's entry must not keep that copy.
        h.layer.handle_response(
            h.at(ms(100)),
            response(&invite, 200, "OK"),
            ingress(Transport::Udp),
        );
        let (stored, _) = h.layer.clients.get_key_value(&key).expect("client transaction");
        assert!(!h.layer.queue.is_empty());
        assert!(h.layer.queue.iter().all(|Reverse((_, owner))| match owner {
            TxRef::Client(k) => Arc::ptr_eq(&k.text, &stored.text),
            TxRef::Server(_) => false,
        }));
        assert_eq!(format!("{key:?}"), r#"ClientKey { branch: "z9hG4bKr9", method: "INVITE" }"#);
    }

    #[test]
    fn keys_compare_by_their_parts_not_by_their_joined_text() {
        let a = ServerKey::new("z9hG4bKab", "c:5060", "INVITE");
        let b = ServerKey::new("z9hG4bKa", "bc:5060", "INVITE");
        assert_ne!(a, b);
        assert_eq!(a.cmp(&b), std::cmp::Ordering::Greater, "by branch first, as a triple");
        assert_eq!((a.branch(), a.sent_by(), a.method()), ("z9hG4bKab", "c:5060", "INVITE"));
        assert_eq!(
            format!("{a:?}"),
            r#"ServerKey { branch: "z9hG4bKab", sent_by: "c:5060", method: "INVITE" }"#
        );
        let cancel = a.with_method("CANCEL");
        assert_eq!((cancel.branch(), cancel.method()), ("z9hG4bKab", "CANCEL"));

        let x = ClientKey::new("z9hG4bKxI", "NVITE");
        let y = ClientKey::new("z9hG4bKx", "INVITE");
        assert_ne!(x, y);
        assert_eq!(x.cmp(&y), std::cmp::Ordering::Greater);
        assert_eq!((y.branch(), y.method()), ("z9hG4bKx", "INVITE"));
    }

    #[test]
    fn an_accepted_invite_client_and_a_completed_non_invite_client_keep_nothing() {
        let mut h = Harness::new();
        let invite = request("INVITE", "z9hG4bKr7", 1);
        let key = h.client(invite.clone(), Transport::Udp);
        let ok = response(&invite, 200, "OK");
        h.layer.handle_response(h.at(ms(100)), ok.clone(), ingress(Transport::Udp));
        assert_eq!(h.client_held(&key), NOTHING);
        h.layer.handle_response(h.at(ms(900)), ok, ingress(Transport::Udp));
        assert_eq!(h.events().len(), 2, "Accepted still passes a retransmitted 2xx up");

        let bye = request("BYE", "z9hG4bKr8", 2);
        let key = h.client(bye.clone(), Transport::Udp);
        h.layer.handle_response(h.at(ms(100)), response(&bye, 200, "OK"), ingress(Transport::Udp));
        assert_eq!(h.client_held(&key), NOTHING);
        assert_eq!(h.layer.len(), (2, 0), "both linger");
    }
}

/// Two layers joined by a lossy UDP link, driven together on one virtual clock.
mod simulated_pair {
    use super::*;

    /// Which messages the link loses, counted per direction.
    struct Link {
        drop_to_server: Vec<usize>,
        drop_to_client: Vec<usize>,
        sent_to_server: usize,
        sent_to_client: usize,
    }

    #[test]
    fn invite_rejected_over_a_lossy_link_completes_on_both_sides() {
        let start = Instant::now();
        let mut uac = TransactionLayer::new(Timers::default());
        let mut uas = TransactionLayer::new(Timers::default());
        // Lose the first INVITE, and the first 486.
        let mut link = Link {
            drop_to_server: vec![0],
            // The TU answers at once, so the UAS sends no 100: the first message is the 486.
            drop_to_client: vec![0],
            sent_to_server: 0,
            sent_to_client: 0,
        };
        let invite = request("INVITE", "z9hG4bKp1", 1);
        let key = uac.start_client(start, invite, egress(Transport::Udp));
        let mut now = start;
        let mut uac_responses = Vec::new();
        let mut uas_requests = 0;

        for _ in 0..1000 {
            // Deliver everything in flight, then let the TUs react, until quiet.
            loop {
                let mut moved = false;
                while let Some(t) = uac.poll_transmit() {
                    moved = true;
                    let lost = link.drop_to_server.contains(&link.sent_to_server);
                    link.sent_to_server += 1;
                    if !lost {
                        uas.handle_request(now, parse(&t), ingress(Transport::Udp));
                    }
                }
                while let Some(t) = uas.poll_transmit() {
                    moved = true;
                    let lost = link.drop_to_client.contains(&link.sent_to_client);
                    link.sent_to_client += 1;
                    if !lost {
                        uac.handle_response(now, parse(&t), ingress(Transport::Udp));
                    }
                }
                while let Some(event) = uas.poll_event() {
                    moved = true;
                    if let TxEvent::Request { key, request, .. } = event {
                        uas_requests += 1;
                        let busy = response(&request, 486, "Busy Here");
                        uas.respond(now, &key, busy).expect("respond");
                    }
                }
                while let Some(event) = uac.poll_event() {
                    moved = true;
                    if let TxEvent::Response { response, .. } = event {
                        uac_responses.push(response.status());
                    }
                }
                if !moved {
                    break;
                }
            }
            let next = [uac.poll_timeout(), uas.poll_timeout()].into_iter().flatten().min();
            let Some(next) = next else { break };
            now = next;
            uac.handle_timeout(now);
            uas.handle_timeout(now);
        }

        assert_eq!(uas_requests, 1, "the retransmitted INVITE reached the TU once");
        assert_eq!(uac_responses, vec![Some(486)]);
        assert!(uac.is_empty() && uas.is_empty(), "both sides terminated");
        assert!(uac.cancel_request(&key).is_none());
        // Timer D (32 s after the 486) is the last to end.
        assert!(now - start >= secs(32.0) && now - start < secs(40.0), "{:?}", now - start);
    }
}

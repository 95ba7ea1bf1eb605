//! The main call flows through the processor core over a network that loses, duplicates and
//! reorders datagrams, in the style of quinn-proto's test `Pair`: the core and two simulated
//! phones (a caller and a callee, each with RFC 3261 retransmission timers) exchange bytes
//! through a seeded random network on one virtual clock. Each flow runs under many seeds and
//! must end as it would on a perfect network, with nothing left held in the core.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sipalias_processor::b2bua::{CallPlan, Target, Work};
use sipalias_processor::clock::Now;
use sipalias_processor::core::{Core, Done};
use sipalias_processor::ids::Ids;
use sipalias_processor::transaction::Timers;
use sipalias_processor::transport::{Egress, Ingress, LocalAddr, Transport};
use sipmsg::SipMessage;

const MAIN: &str = "127.0.0.1:5060";
const ALIAS: &str = "127.0.0.2:5060";
const CALLER: &str = "127.0.0.20:5000";
const CALLEE: &str = "127.0.0.30:6000";
const T1: Duration = Duration::from_millis(500);
const T2: Duration = Duration::from_secs(4);
const CALLER_SDP: &str = "v=0\r\no=caller 1 1 IN IP4 127.0.0.20\r\n";
const CALLEE_SDP: &str = "v=0\r\no=callee 1 1 IN IP4 127.0.0.30\r\n";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

/// What the network does to each datagram.
#[derive(Debug, Clone, Copy)]
struct Faults {
    /// Probability a datagram is lost.
    loss: f64,
    /// Probability a delivered datagram arrives twice.
    duplicate: f64,
    /// Each copy is delayed uniformly up to this: datagrams sent close together overtake
    /// each other.
    max_delay: Duration,
}

/// One datagram in flight.
#[derive(Debug)]
struct Datagram {
    at: Instant,
    seq: u64,
    /// Towards the core (else towards the phone at `phone`).
    to_core: bool,
    phone: SocketAddr,
    /// The cluster socket: destination towards the core, source towards a phone.
    server: SocketAddr,
    bytes: Vec<u8>,
}

/// The lossy network and its clock.
struct Network {
    rng: StdRng,
    faults: Faults,
    in_flight: Vec<Datagram>,
    seq: u64,
    lost: usize,
    duplicated: usize,
}

impl Network {
    fn send(
        &mut self,
        now: Instant,
        to_core: bool,
        phone: SocketAddr,
        server: SocketAddr,
        bytes: Vec<u8>,
    ) {
        if self.rng.random_bool(self.faults.loss) {
            self.lost += 1;
            trace(now, "lost", &bytes);
            return;
        }
        let copies = if self.rng.random_bool(self.faults.duplicate) {
            self.duplicated += 1;
            2
        } else {
            1
        };
        for _ in 0..copies {
            let max = self.faults.max_delay.as_micros() as u64;
            let at = now + Duration::from_micros(self.rng.random_range(1..=max.max(1)));
            self.seq += 1;
            let seq = self.seq;
            self.in_flight.push(Datagram { at, seq, to_core, phone, server, bytes: bytes.clone() });
        }
    }

    fn next_at(&self) -> Option<Instant> {
        self.in_flight.iter().map(|d| d.at).min()
    }

    /// The earliest datagram due at `now`.
    fn pop_due(&mut self, now: Instant) -> Option<Datagram> {
        let i = self
            .in_flight
            .iter()
            .enumerate()
            .filter(|(_, d)| d.at <= now)
            .min_by_key(|(_, d)| (d.at, d.seq))
            .map(|(i, _)| i)?;
        Some(self.in_flight.swap_remove(i))
    }
}

/// With `LOSSY_TRACE` set, one line per datagram: for working out a failing seed.
fn trace(now: Instant, what: &str, bytes: &[u8]) {
    if std::env::var_os("LOSSY_TRACE").is_some() {
        let text = String::from_utf8_lossy(bytes);
        let first = text.lines().next().unwrap_or_default();
        let cseq = text.lines().find(|l| l.starts_with("CSeq")).unwrap_or_default();
        eprintln!("{now:?} {what:>8} {first} | {cseq}");
    }
}

/// A message sent again on RFC 3261's schedule until stopped: every `interval`, doubling up to
/// `cap`, for at most 64·T1.
#[derive(Debug, Clone)]
struct Retransmit {
    bytes: Vec<u8>,
    server: SocketAddr,
    next: Instant,
    interval: Duration,
    cap: Duration,
    give_up: Instant,
}

impl Retransmit {
    fn new(now: Instant, msg: &SipMessage, server: SocketAddr, cap: Duration) -> Self {
        Retransmit {
            bytes: msg.to_bytes(),
            server,
            next: now + T1,
            interval: T1,
            cap,
            give_up: now + 64 * T1,
        }
    }

    /// The bytes to send again at `now`, if due.
    fn due(&mut self, now: Instant) -> Option<(SocketAddr, Vec<u8>)> {
        if now < self.next || now >= self.give_up {
            return None;
        }
        self.interval = (self.interval * 2).min(self.cap);
        self.next = now + self.interval;
        Some((self.server, self.bytes.clone()))
    }

    fn timeout(&self) -> Option<Instant> {
        (self.next < self.give_up).then_some(self.next)
    }
}

/// How a flow ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// Answered; the caller hangs up.
    CallerHangsUp,
    /// Answered; the callee hangs up.
    CalleeHangsUp,
    /// The callee rings; the caller cancels.
    CallerCancels,
    /// The callee is busy (486).
    CalleeBusy,
}

/// Outgoing datagrams of a phone: (cluster socket, bytes).
type Sends = Vec<(SocketAddr, Vec<u8>)>;

/// The caller: a UAC with Timer A/E retransmissions that ACKs every final response it gets
/// (again for each retransmission) and answers a BYE.
struct Caller {
    flow: Flow,
    invite: Retransmit,
    invite_sent: Instant,
    provisional: bool,
    final_status: Option<u16>,
    answer_sdp: Option<String>,
    /// Our To tag and the B2BUA's Contact, once answered.
    dialog: Option<(String, String)>,
    hang_up_at: Option<Instant>,
    bye: Option<Retransmit>,
    bye_status: Option<u16>,
    cancel: Option<Retransmit>,
    cancel_status: Option<u16>,
    byes_received: usize,
}

impl Caller {
    fn new(now: Instant, flow: Flow) -> (Self, Sends) {
        let text = format!(
            "INVITE sip:alice@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP {CALLER};branch=z9hG4bKinv1;rport\r\n\
Max-Forwards: 70\r\nFrom: \"Bob\" <sip:bob@127.0.0.1>;tag=bt1\r\nTo: <sip:alice@127.0.0.1>\r\n\
Call-ID: lossy@caller\r\nCSeq: 2 INVITE\r\nContact: <sip:bob@{CALLER}>\r\n\
Content-Type: application/sdp\r\nContent-Length: {}\r\n\r\n{CALLER_SDP}",
            CALLER_SDP.len()
        );
        let invite_msg = sipmsg::parse(text.as_bytes()).expect("INVITE");
        let invite = Retransmit::new(now, &invite_msg, addr(MAIN), Duration::MAX);
        let caller = Caller {
            flow,
            invite,
            invite_sent: now,
            provisional: false,
            final_status: None,
            answer_sdp: None,
            dialog: None,
            hang_up_at: None,
            bye: None,
            bye_status: None,
            cancel: None,
            cancel_status: None,
            byes_received: 0,
        };
        (caller, vec![(addr(MAIN), text.into_bytes())])
    }

    fn timeout(&self) -> Option<Instant> {
        let invite = (!self.provisional && self.final_status.is_none())
            .then(|| self.invite.timeout())
            .flatten();
        let bye = self.bye.as_ref().filter(|_| self.bye_status.is_none());
        let cancel = self.cancel.as_ref().filter(|_| self.cancel_status.is_none());
        [invite, self.hang_up_at, bye.and_then(Retransmit::timeout)]
            .into_iter()
            .chain([cancel.and_then(Retransmit::timeout)])
            .flatten()
            .min()
    }

    fn handle_timeout(&mut self, now: Instant) -> Sends {
        let mut out = Vec::new();
        if !self.provisional && self.final_status.is_none() {
            out.extend(self.invite.due(now));
        }
        if self.hang_up_at.is_some_and(|at| at <= now) {
            self.hang_up_at = None;
            let msg = match self.flow {
                Flow::CallerCancels => {
                    let m = self.cancel_request();
                    self.cancel = Some(Retransmit::new(now, &m, addr(MAIN), T2));
                    m
                }
                _ => {
                    let m = self.bye_request();
                    self.bye = Some(Retransmit::new(now, &m, addr(MAIN), T2));
                    m
                }
            };
            out.push((addr(MAIN), msg.to_bytes()));
        }
        if let Some(r) = self.bye.as_mut().filter(|_| self.bye_status.is_none()) {
            out.extend(r.due(now));
        }
        if let Some(r) = self.cancel.as_mut().filter(|_| self.cancel_status.is_none()) {
            out.extend(r.due(now));
        }
        out
    }

    fn cancel_request(&self) -> SipMessage {
        let text = format!(
            "CANCEL sip:alice@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP {CALLER};branch=z9hG4bKinv1;rport\r\n\
Max-Forwards: 70\r\nFrom: \"Bob\" <sip:bob@127.0.0.1>;tag=bt1\r\nTo: <sip:alice@127.0.0.1>\r\n\
Call-ID: lossy@caller\r\nCSeq: 2 CANCEL\r\nContent-Length: 0\r\n\r\n"
        );
        sipmsg::parse(text.as_bytes()).expect("CANCEL")
    }

    fn bye_request(&self) -> SipMessage {
        let (tag, contact) = self.dialog.clone().expect("answered before BYE");
        let text = format!(
            "BYE {contact} SIP/2.0\r\nVia: SIP/2.0/UDP {CALLER};branch=z9hG4bKbye1;rport\r\n\
Max-Forwards: 70\r\nFrom: \"Bob\" <sip:bob@127.0.0.1>;tag=bt1\r\nTo: <sip:alice@127.0.0.1>;tag={tag}\r\n\
Call-ID: lossy@caller\r\nCSeq: 3 BYE\r\nContent-Length: 0\r\n\r\n"
        );
        sipmsg::parse(text.as_bytes()).expect("BYE")
    }

    /// The ACK for a final response to the INVITE: a new transaction for a 2xx (RFC 3261
    /// §13.2.2.4), the INVITE's own branch for any other (§17.1.1.3).
    fn ack_for(&self, resp: &SipMessage) -> Vec<u8> {
        let to = resp.header("to").unwrap_or_default();
        let (uri, branch) = match (resp.status(), &self.dialog) {
            (Some(200..=299), Some((_, contact))) => (contact.clone(), "z9hG4bKack2xx"),
            _ => ("sip:alice@127.0.0.1".to_owned(), "z9hG4bKinv1"),
        };
        format!(
            "ACK {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {CALLER};branch={branch};rport\r\nMax-Forwards: 70\r\n\
From: \"Bob\" <sip:bob@127.0.0.1>;tag=bt1\r\nTo: {to}\r\nCall-ID: lossy@caller\r\nCSeq: 2 ACK\r\n\
Content-Length: 0\r\n\r\n"
        )
        .into_bytes()
    }

    fn handle(&mut self, now: Instant, msg: SipMessage, from: SocketAddr) -> Sends {
        if msg.is_request() {
            // The callee hung up: the B2BUA's BYE, answered each time it comes.
            assert_eq!(msg.method(), Some("BYE"), "caller got {:?}", msg.method());
            self.byes_received += 1;
            let ok = SipMessage::response_to(&msg, 200, "OK", None);
            return vec![(from, ok.to_bytes())];
        }
        let cseq = msg.cseq().expect("CSeq");
        let status = msg.status().expect("status");
        match cseq.method.as_str() {
            "INVITE" if status < 200 => {
                // Provisionals are not retransmitted: any one of them allows the CANCEL
                // (RFC 3261 §9.1), sent a while after the INVITE.
                if !self.provisional && self.flow == Flow::CallerCancels {
                    self.hang_up_at = Some(now.max(self.invite_sent + Duration::from_millis(1500)));
                }
                self.provisional = true;
                Vec::new()
            }
            "INVITE" => {
                if self.final_status.is_none() {
                    self.final_status = Some(status);
                    if (200..300).contains(&status) {
                        let tag = msg.to().expect("To").tag().expect("To tag").to_owned();
                        let contact = msg.contacts().expect("Contact")[0].uri.to_string();
                        self.dialog = Some((tag, contact));
                        self.answer_sdp = Some(String::from_utf8_lossy(&msg.body).into_owned());
                        if self.flow == Flow::CallerHangsUp {
                            self.hang_up_at = Some(now + Duration::from_secs(2));
                        }
                    }
                }
                vec![(from, self.ack_for(&msg))]
            }
            "BYE" if status >= 200 => {
                self.bye_status.get_or_insert(status);
                Vec::new()
            }
            "CANCEL" if status >= 200 => {
                self.cancel_status.get_or_insert(status);
                Vec::new()
            }
            _ => Vec::new(),
        }
    }
}

/// The callee: a UAS that rings, then answers, refuses or keeps ringing (per flow), sends its
/// final response again until the ACK (Timer G), answers CANCEL and BYE, and can hang up.
struct Callee {
    flow: Flow,
    invite: Option<SipMessage>,
    /// The last response to the INVITE, sent again for each retransmitted INVITE.
    last: Option<Vec<u8>>,
    server: SocketAddr,
    answer_at: Option<Instant>,
    final_retransmit: Option<Retransmit>,
    final_status: Option<u16>,
    acked: bool,
    offer_sdp: Option<String>,
    cancels: usize,
    hang_up_at: Option<Instant>,
    bye: Option<Retransmit>,
    bye_status: Option<u16>,
    byes_received: usize,
}

impl Callee {
    fn new(flow: Flow) -> Self {
        Callee {
            flow,
            invite: None,
            last: None,
            server: addr(ALIAS),
            answer_at: None,
            final_retransmit: None,
            final_status: None,
            acked: false,
            offer_sdp: None,
            cancels: 0,
            hang_up_at: None,
            bye: None,
            bye_status: None,
            byes_received: 0,
        }
    }

    fn timeout(&self) -> Option<Instant> {
        let retransmit = self.final_retransmit.as_ref().filter(|_| !self.acked);
        [self.answer_at, self.hang_up_at, retransmit.and_then(Retransmit::timeout)]
            .into_iter()
            .chain([self
                .bye
                .as_ref()
                .filter(|_| self.bye_status.is_none())
                .and_then(Retransmit::timeout)])
            .flatten()
            .min()
    }

    fn respond(&mut self, now: Instant, status: u16, reason: &str) -> Sends {
        let invite = self.invite.as_ref().expect("INVITE");
        let mut resp = SipMessage::response_to(invite, status, reason, Some("callee-tag"));
        resp.push_header("Contact", format!("<sip:alice@{CALLEE}>"));
        if status == 200 {
            resp.push_header("Content-Type", "application/sdp");
            resp.body = bytes::Bytes::from_static(CALLEE_SDP.as_bytes());
        }
        if status >= 200 {
            self.final_status = Some(status);
            self.final_retransmit = Some(Retransmit::new(now, &resp, self.server, T2));
        }
        let bytes = resp.to_bytes();
        self.last = Some(bytes.clone());
        vec![(self.server, bytes)]
    }

    fn handle_timeout(&mut self, now: Instant) -> Sends {
        let mut out = Vec::new();
        if self.answer_at.is_some_and(|at| at <= now) {
            self.answer_at = None;
            out.extend(self.respond(now, 200, "OK"));
        }
        if self.hang_up_at.is_some_and(|at| at <= now) {
            self.hang_up_at = None;
            let bye = self.bye_request();
            out.push((self.server, bye.to_bytes()));
            self.bye = Some(Retransmit::new(now, &bye, self.server, T2));
        }
        if let Some(r) = self.final_retransmit.as_mut().filter(|_| !self.acked) {
            out.extend(r.due(now));
        }
        if let Some(r) = self.bye.as_mut().filter(|_| self.bye_status.is_none()) {
            out.extend(r.due(now));
        }
        out
    }

    fn bye_request(&self) -> SipMessage {
        let invite = self.invite.as_ref().expect("INVITE");
        let b2bua_contact = invite.contacts().expect("Contact")[0].uri.to_string();
        let text = format!(
            "BYE {b2bua_contact} SIP/2.0\r\nVia: SIP/2.0/UDP {CALLEE};branch=z9hG4bKcbye1;rport\r\n\
Max-Forwards: 70\r\nFrom: <sip:alice@127.0.0.2>;tag=callee-tag\r\nTo: {}\r\nCall-ID: {}\r\n\
CSeq: 1 BYE\r\nContent-Length: 0\r\n\r\n",
            invite.header("from").expect("From"),
            invite.call_id().expect("Call-ID"),
        );
        sipmsg::parse(text.as_bytes()).expect("BYE")
    }

    fn handle(&mut self, now: Instant, msg: SipMessage, from: SocketAddr) -> Sends {
        if !msg.is_request() {
            if msg.cseq().is_ok_and(|c| c.method == "BYE") && msg.status() >= Some(200) {
                self.bye_status.get_or_insert(msg.status().unwrap_or(0));
            }
            return Vec::new();
        }
        match msg.method().unwrap_or_default() {
            "INVITE" => {
                if self.invite.is_some() {
                    // A retransmission (or a duplicate): the last response again.
                    return self.last.iter().map(|b| (self.server, b.clone())).collect();
                }
                assert_eq!(from, addr(ALIAS), "the B leg leaves from the alias");
                self.offer_sdp = Some(String::from_utf8_lossy(&msg.body).into_owned());
                self.invite = Some(msg);
                let mut out = self.respond(now, 180, "Ringing");
                match self.flow {
                    Flow::CalleeBusy => out.extend(self.respond(now, 486, "Busy Here")),
                    Flow::CallerCancels => {}
                    Flow::CallerHangsUp | Flow::CalleeHangsUp => {
                        self.answer_at = Some(now + Duration::from_millis(300));
                    }
                }
                out
            }
            "ACK" => {
                if !self.acked && self.flow == Flow::CalleeHangsUp && self.final_status == Some(200)
                {
                    self.hang_up_at = Some(now + Duration::from_secs(2));
                }
                self.acked = true;
                Vec::new()
            }
            "CANCEL" => {
                self.cancels += 1;
                let ok = SipMessage::response_to(&msg, 200, "OK", None);
                let mut out = vec![(from, ok.to_bytes())];
                if self.final_status.is_none() && self.invite.is_some() {
                    out.extend(self.respond(now, 487, "Request Terminated"));
                }
                out
            }
            "BYE" => {
                self.byes_received += 1;
                vec![(from, SipMessage::response_to(&msg, 200, "OK", None).to_bytes())]
            }
            other => panic!("callee got {other}"),
        }
    }
}

/// The core, the phones and the network, on one virtual clock.
struct Pair {
    core: Core,
    net: Network,
    now: Now,
    start: Instant,
    caller: Caller,
    callee: Callee,
    /// Accounting stops the core asked for: (cause, answered).
    stops: Vec<(String, bool)>,
    /// Provisional responses of the callee that reached the core.
    callee_provisionals: usize,
    /// Responses of the callee that reached the core.
    callee_responses: usize,
    /// Dialog saves and deletes the core asked for.
    dialog_writes: (usize, usize),
}

impl Pair {
    fn new(seed: u64, faults: Faults, flow: Flow) -> Self {
        let timers = Timers {
            t1: T1,
            t2: T2,
            t4: Duration::from_secs(5),
            // A call whose every provisional was lost rings until Timer C; shortened so that
            // it too ends within the run.
            timer_c: TIMER_C,
            ..Timers::default()
        };
        let now = Now { mono: Instant::now(), wall_ms: 1_767_225_600_000 };
        let net = Network {
            rng: StdRng::seed_from_u64(seed),
            faults,
            in_flight: Vec::new(),
            seq: 0,
            lost: 0,
            duplicated: 0,
        };
        let (caller, first) = Caller::new(now.mono, flow);
        let mut pair = Pair {
            core: Core::new(timers, Arc::new(Ids::new("p1"))),
            net,
            now,
            start: now.mono,
            caller,
            callee: Callee::new(flow),
            stops: Vec::new(),
            dialog_writes: (0, 0),
            callee_provisionals: 0,
            callee_responses: 0,
        };
        pair.send_from_phone(addr(CALLER), first);
        pair
    }

    fn send_from_phone(&mut self, phone: SocketAddr, sends: Sends) {
        for (server, bytes) in sends {
            self.net.send(self.now.mono, true, phone, server, bytes);
        }
    }

    /// What the core sent and asked for: transmits onto the network, setup work answered at
    /// once (the callee's one binding, through the alias), the rest recorded.
    fn drain_core(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(t) = self.core.poll_transmit() {
                progressed = true;
                let now = self.now.mono;
                self.net.send(now, false, t.egress.remote, t.egress.local.addr, t.bytes);
            }
            while let Some(w) = self.core.poll_work() {
                progressed = true;
                self.work(w);
            }
            if !progressed {
                return;
            }
        }
    }

    fn work(&mut self, w: Work) {
        match w {
            Work::Invite { key, ingress, .. } => {
                let plan = CallPlan {
                    caller_aor: "bob@sip.example.net".into(),
                    callee_aor: "alice@sip.example.net".into(),
                    targets: vec![Target {
                        contact: format!("sip:alice@{CALLEE}"),
                        egress: Egress {
                            flow_only: false,
                            local: LocalAddr { addr: addr(ALIAS), transport: Transport::Udp },
                            remote: addr(CALLEE),
                            connection_id: 0,
                            dispatcher_id: "d1".into(),
                        },
                        host: "127.0.0.2".into(),
                        to: None,
                        auth: None,
                    }],
                    max_duration_secs: 0,
                    call_ref: "lossy-call".into(),
                    auto_answer: false,
                    hunt: Vec::new(),
                    asserted: None,
                };
                self.core.handle_done(self.now, Done::Call { key, plan: Box::new(plan), ingress });
            }
            Work::AccountingStop(s) => self.stops.push((s.cause, s.answered)),
            Work::SaveDialog(_) => self.dialog_writes.0 += 1,
            Work::DeleteDialog(_) => self.dialog_writes.1 += 1,
            // A late duplicate for a call already gone: nowhere in Redis either.
            Work::LoadDialog { key, .. } => {
                self.core.handle_done(self.now, Done::Dialog { key, record: None })
            }
            Work::LoadDialogForAck { .. } => {}
            other => panic!("unexpected work {other:?}"),
        }
    }

    /// Runs until `limit` of virtual time has passed.
    fn run(&mut self, limit: Duration) {
        let end = self.start + limit;
        loop {
            let next = [
                self.net.next_at(),
                self.core.poll_timeout(),
                self.caller.timeout(),
                self.callee.timeout(),
            ]
            .into_iter()
            .flatten()
            .min();
            let Some(at) = next.filter(|at| *at <= end) else { return };
            self.now = self.now.at(at);
            let now = self.now.mono;
            while let Some(d) = self.net.pop_due(now) {
                let whom = if d.to_core {
                    "->core"
                } else if d.phone == addr(CALLER) {
                    "->caller"
                } else {
                    "->callee"
                };
                trace(now, whom, &d.bytes);
                if d.to_core {
                    if d.phone == addr(CALLEE) && d.bytes.starts_with(b"SIP/2.0 ") {
                        self.callee_responses += 1;
                        self.callee_provisionals += usize::from(d.bytes.starts_with(b"SIP/2.0 1"));
                    }
                    let ingress = Ingress {
                        local: LocalAddr { addr: d.server, transport: Transport::Udp },
                        remote: d.phone,
                        connection_id: 0,
                        dispatcher_id: "d1".into(),
                    };
                    self.core.handle_datagram(self.now, &d.bytes, ingress);
                    self.drain_core();
                } else {
                    let msg = sipmsg::parse(&d.bytes).expect("the core sends parseable SIP");
                    let sends = if d.phone == addr(CALLER) {
                        self.caller.handle(now, msg, d.server)
                    } else {
                        assert_eq!(d.phone, addr(CALLEE), "sent to a phone that is not here");
                        self.callee.handle(now, msg, d.server)
                    };
                    self.send_from_phone(d.phone, sends);
                }
            }
            if self.core.poll_timeout().is_some_and(|t| t <= now) {
                self.core.handle_timeout(self.now);
                self.drain_core();
            }
            let sends = self.caller.handle_timeout(now);
            self.send_from_phone(addr(CALLER), sends);
            let sends = self.callee.handle_timeout(now);
            self.send_from_phone(addr(CALLEE), sends);
        }
    }
}

/// Lossy, duplicating and reordering, enough to hit every retransmission path.
const FAULTS: Faults = Faults { loss: 0.2, duplicate: 0.1, max_delay: Duration::from_millis(80) };
const SEEDS: std::ops::Range<u64> = 0..2000;
const TIMER_C: Duration = Duration::from_secs(60);
/// Longer than Timer C plus every transaction's lifetime (64·T1 = 32 s).
const RUN: Duration = Duration::from_secs(150);

/// Runs `flow` under `seed`: whatever happened, nothing is left held in the core. `None` when
/// the network made the call impossible, as it may with any real network: every copy of the
/// caller's INVITE lost (its Timer B ends it), or of everything the callee answered (the
/// caller gets `408`), or every provisional towards the caller (no CANCEL may be sent, RFC
/// 3261 §9.1: Timer C ends the call).
fn run(flow: Flow, seed: u64) -> Option<Pair> {
    let mut pair = Pair::new(seed, FAULTS, flow);
    pair.run(RUN);
    let load = pair.core.load();
    assert_eq!(load, (0, 0, 0), "seed {seed}: {flow:?} left transactions or calls held");
    let caller = &pair.caller;
    let impossible = (caller.final_status.is_none() && !caller.provisional)
        || (caller.final_status == Some(408) && pair.callee_responses == 0)
        || (flow == Flow::CallerCancels && !caller.provisional);
    (!impossible).then_some(pair)
}

/// The seeds' runs the network did not make impossible: nearly all of them.
fn runs(flow: Flow) -> Vec<Pair> {
    let pairs: Vec<Pair> = SEEDS.filter_map(|seed| run(flow, seed)).collect();
    assert!(pairs.len() * 1000 >= SEEDS.count() * 999, "{} of {SEEDS:?} possible", pairs.len());
    pairs
}

/// Over all seeds, the network really lost, duplicated and reordered datagrams.
fn assert_faults_happened(pairs: &[Pair]) {
    let lost: usize = pairs.iter().map(|p| p.net.lost).sum();
    let duplicated: usize = pairs.iter().map(|p| p.net.duplicated).sum();
    assert!(lost >= 20 && duplicated >= 10, "lost {lost}, duplicated {duplicated}");
}

#[test]
fn answered_call_hung_up_by_the_caller_ends_cleanly_through_loss_and_reordering() {
    let pairs = runs(Flow::CallerHangsUp);
    for (seed, p) in pairs.iter().enumerate() {
        assert_eq!(p.caller.final_status, Some(200), "seed {seed}");
        assert_eq!(p.callee.offer_sdp.as_deref(), Some(CALLER_SDP), "seed {seed}: offer relayed");
        assert_eq!(p.caller.answer_sdp.as_deref(), Some(CALLEE_SDP), "seed {seed}: answer relayed");
        assert!(p.callee.acked, "seed {seed}: the callee got the ACK");
        assert_eq!(p.caller.bye_status, Some(200), "seed {seed}: BYE answered");
        assert!(p.callee.byes_received >= 1, "seed {seed}: BYE relayed");
        assert_eq!(p.stops, [("caller-bye".to_owned(), true)], "seed {seed}: one stop");
        assert_eq!(p.caller.byes_received, 0, "seed {seed}");
        let (saves, deletes) = p.dialog_writes;
        assert!(saves >= 1 && deletes == 1, "seed {seed}: stored, then deleted once");
    }
    assert_faults_happened(&pairs);
}

#[test]
fn answered_call_hung_up_by_the_callee_ends_cleanly_through_loss_and_reordering() {
    let pairs = runs(Flow::CalleeHangsUp);
    for (seed, p) in pairs.iter().enumerate() {
        assert_eq!(p.caller.final_status, Some(200), "seed {seed}");
        assert!(p.callee.acked, "seed {seed}: the callee got the ACK");
        assert_eq!(p.callee.bye_status, Some(200), "seed {seed}: BYE answered");
        assert!(p.caller.byes_received >= 1, "seed {seed}: BYE relayed to the caller");
        assert_eq!(p.stops, [("callee-bye".to_owned(), true)], "seed {seed}: one stop");
    }
    assert_faults_happened(&pairs);
}

#[test]
fn cancelled_call_gives_487_on_both_legs_through_loss_and_reordering() {
    let pairs = runs(Flow::CallerCancels);
    for (seed, p) in pairs.iter().enumerate() {
        assert_eq!(p.caller.cancel_status, Some(200), "seed {seed}: CANCEL answered");
        assert_eq!(p.caller.final_status, Some(487), "seed {seed}");
        if p.callee_provisionals == 0 {
            // Every 180 lost: no CANCEL may be sent before a provisional (RFC 3261 §9.1);
            // the branch ends with Timer B instead.
            assert_eq!(p.callee.cancels, 0, "seed {seed}");
            continue;
        }
        assert!(p.callee.cancels >= 1, "seed {seed}: CANCEL relayed");
        assert_eq!(p.callee.final_status, Some(487), "seed {seed}");
        assert!(p.callee.acked, "seed {seed}: the 487 was acknowledged");
        assert_eq!(p.stops.len(), 1, "seed {seed}: one stop: {:?}", p.stops);
        assert!(!p.stops[0].1, "seed {seed}: not answered");
    }
    assert_faults_happened(&pairs);
}

#[test]
fn busy_callee_gives_the_caller_486_through_loss_and_reordering() {
    let pairs = runs(Flow::CalleeBusy);
    for (seed, p) in pairs.iter().enumerate() {
        assert_eq!(p.caller.final_status, Some(486), "seed {seed}");
        assert!(p.callee.acked, "seed {seed}: the 486 was acknowledged");
        assert_eq!(p.stops, [("not-answered".to_owned(), false)], "seed {seed}: one stop");
    }
    assert_faults_happened(&pairs);
}

#[test]
fn a_perfect_network_needs_no_retransmission() {
    let faults = Faults { loss: 0.0, duplicate: 0.0, max_delay: Duration::from_millis(1) };
    let mut pair = Pair::new(1, faults, Flow::CallerHangsUp);
    pair.run(RUN);
    assert_eq!(pair.caller.bye_status, Some(200));
    assert_eq!(pair.callee.byes_received, 1, "one BYE, never retransmitted");
    assert_eq!(pair.caller.byes_received, 0);
    assert_eq!(pair.core.load(), (0, 0, 0));
}

//! Criterion benchmarks of the processor's sans-IO hot paths.
//!
//! - `tx_lookup/response_180/<live>`: a parsed 180 fed to [`TransactionLayer::handle_response`]
//!   with `<live>` INVITE client transactions alive (B legs ringing): the Via-branch/CSeq lookup,
//!   the state change and the event for the B2BUA.
//! - `tx_lookup/invite_retransmission/<live>`: a retransmitted INVITE fed to
//!   [`TransactionLayer::handle_request`] with `<live>` INVITE server transactions alive: the
//!   server-key lookup and the resent `100 Trying`.
//! - `core/response_100_datagram/<live>`: bytes of a `100 Trying` fed to
//!   [`Core::handle_datagram`] (parse, response checks, transaction lookup, event dispatch in the
//!   core) with `<live>` client transactions alive. The core's public way to create client
//!   transactions without a call is a keepalive OPTIONS ([`Core::send_keepalive`]), so those
//!   are the transactions kept alive here.
//! - `registrar/plan_register`: [`registrar::plan`] of the REGISTER sipp sends (Contact and
//!   Expires read, interval checks); `registrar/ok_response`: the `200 OK` listing the binding.
//!   The registrar's write itself is one Lua script in Redis (`location.rs`): it is measured by
//!   the load benchmark (`bench/run.sh`, Redis CPU per registration), not here.
//!
//! Run: `cargo bench -p sipalias-processor --bench core`. See `docs/benchmarks.md`.
// criterion_group! generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use sipalias_processor::clock::Now;
use sipalias_processor::core::{Core, Done, Keepalive};
use sipalias_processor::ids::Ids;
use sipalias_processor::registrar::{self, Limits};
use sipalias_processor::registrar::{Binding, StoredIngress};
use sipalias_processor::transaction::{Timers, TransactionLayer, TxEvent};
use sipalias_processor::transport::{Egress, Ingress, LocalAddr, Transport};
use sipmsg::SipMessage;

/// How many transactions are alive while one is looked up.
const LIVE: [usize; 2] = [1_000, 10_000];

const ALIAS: &str = "127.0.0.2:5060";
const PHONE: &str = "127.0.0.11:5062";
const CALLER: &str = "127.0.0.10:5071";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn udp(local: &str) -> LocalAddr {
    LocalAddr { addr: addr(local), transport: Transport::Udp }
}

fn egress_to_phone() -> Egress {
    Egress {
        local: udp(ALIAS),
        remote: addr(PHONE),
        connection_id: 0,
        dispatcher_id: "d1".into(),
        flow_only: false,
    }
}

fn ingress(local: &str, remote: &str) -> Ingress {
    Ingress {
        local: udp(local),
        remote: addr(remote),
        connection_id: 0,
        dispatcher_id: "d1".into(),
    }
}

fn parse(text: &str) -> SipMessage {
    sipmsg::parse(text.as_bytes()).expect("sample parses")
}

/// The B-leg INVITE number `i`, as the B2BUA sends it to the callee through the alias.
fn b_leg_invite(i: usize) -> SipMessage {
    parse(&format!(
        "INVITE sip:{u}@{PHONE} SIP/2.0\r\n\
Via: SIP/2.0/UDP {ALIAS};branch=z9hG4bKsa.p1.b{i};rport\r\n\
Max-Forwards: 69\r\n\
From: <sip:1000000@127.0.0.2>;tag=sa.p1.f{i}\r\n\
To: <sip:{u}@127.0.0.2>\r\n\
Call-ID: p1-{i}-bench\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:sa.p1.c{i}@{ALIAS}>\r\n\
Content-Length: 0\r\n\r\n",
        u = 1_005_000 + i
    ))
}

/// The callee's 180 to [`b_leg_invite`] `i`.
fn ringing(i: usize) -> SipMessage {
    let mut r = SipMessage::response_to(&b_leg_invite(i), 180, "Ringing", Some("callee-tag"));
    r.push_header("Contact", format!("<sip:{PHONE}>"));
    r
}

/// The caller's INVITE number `i` to the main IP, as sipp sends it.
fn a_leg_invite(i: usize) -> SipMessage {
    parse(&format!(
        "INVITE sip:1005000@bench.local SIP/2.0\r\n\
Via: SIP/2.0/UDP {CALLER};branch=z9hG4bK-4242-{i}-1\r\n\
From: <sip:1000000@bench.local>;tag=4242SIPpTag00{i}\r\n\
To: <sip:1005000@bench.local>\r\n\
Call-ID: {i}-4242@127.0.0.10\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:1000000@{CALLER}>\r\n\
Max-Forwards: 70\r\n\
Content-Length: 0\r\n\r\n"
    ))
}

/// A transaction layer with `n` ringing-to-be INVITE client transactions.
fn layer_with_clients(n: usize, now: Instant) -> TransactionLayer {
    let mut tx = TransactionLayer::new(Timers::default());
    for i in 0..n {
        tx.start_client(now, b_leg_invite(i), egress_to_phone());
    }
    while tx.poll_transmit().is_some() {}
    tx
}

/// A transaction layer with `n` INVITE server transactions (100 Trying sent, no final yet).
fn layer_with_servers(n: usize, now: Instant) -> TransactionLayer {
    let mut tx = TransactionLayer::new(Timers::default());
    let main = "127.0.0.1:5060";
    for i in 0..n {
        tx.handle_request(now, a_leg_invite(i), ingress(main, CALLER));
    }
    while tx.poll_transmit().is_some() {}
    while tx.poll_event().is_some() {}
    tx
}

fn tx_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("tx_lookup");
    for live in LIVE {
        let now = Instant::now();
        let mut tx = layer_with_clients(live, now);
        let responses: Vec<SipMessage> = (0..live).step_by(live / 100).map(ringing).collect();
        let from_phone = ingress(ALIAS, PHONE);
        // Sanity: the response reaches the TU.
        tx.handle_response(now, responses[0].clone(), from_phone.clone());
        assert!(matches!(tx.poll_event(), Some(TxEvent::Response { .. })), "180 matched");
        let mut k = 0;
        g.bench_function(BenchmarkId::new("response_180", live), |b| {
            b.iter_batched(
                || {
                    k = (k + 1) % responses.len();
                    responses[k].clone()
                },
                |resp| {
                    tx.handle_response(now, resp, from_phone.clone());
                    black_box(tx.poll_event())
                },
                BatchSize::SmallInput,
            )
        });
        assert_eq!(tx.len().0, live, "every client transaction is still alive");

        let mut tx = layer_with_servers(live, now);
        let requests: Vec<SipMessage> = (0..live).step_by(live / 100).map(a_leg_invite).collect();
        let from_caller = ingress("127.0.0.1:5060", CALLER);
        tx.handle_request(now, requests[0].clone(), from_caller.clone());
        assert!(tx.poll_transmit().is_some(), "retransmission answered with 100 Trying");
        assert!(tx.poll_event().is_none(), "a retransmission is not a new request");
        let mut k = 0;
        g.bench_function(BenchmarkId::new("invite_retransmission", live), |b| {
            b.iter_batched(
                || {
                    k = (k + 1) % requests.len();
                    requests[k].clone()
                },
                |req| {
                    tx.handle_request(now, req, from_caller.clone());
                    black_box(tx.poll_transmit())
                },
                BatchSize::SmallInput,
            )
        });
        assert_eq!(tx.len().1, live, "every server transaction is still alive");
    }
    g.finish();
}

fn core_datagram(c: &mut Criterion) {
    let mut g = c.benchmark_group("core");
    for live in LIVE {
        let now = Now { mono: Instant::now(), wall_ms: 1_767_225_600_000 };
        let mut core = Core::new(Timers::default(), Arc::new(Ids::new("p1")));
        let mut pings = Vec::with_capacity(live);
        for i in 0..live {
            let ka = Keepalive {
                aor: format!("{}@bench.local", 1_000_000 + i),
                field: format!("sip:{}@{PHONE}", 1_000_000 + i),
                contact: format!("sip:{}@{PHONE}", 1_000_000 + i),
                egress: egress_to_phone(),
                host: "127.0.0.2".into(),
                options: true,
            };
            core.handle_done(now, Done::Keepalive(ka));
            while let Some(t) = core.poll_transmit() {
                pings.push(t.bytes);
            }
        }
        assert_eq!(core.load().0, live, "one client transaction per ping");
        // The phones' `100 Trying` to a sample of the pings, as datagrams.
        let trying: Vec<Vec<u8>> = pings
            .iter()
            .step_by(live / 100)
            .map(|p| SipMessage::response_to(&sipmsg::parse(p).expect("ping"), 100, "Trying", None))
            .map(|r| r.to_bytes())
            .collect();
        let from_phone = ingress(ALIAS, PHONE);
        let mut k = 0;
        g.bench_function(BenchmarkId::new("response_100_datagram", live), |b| {
            b.iter(|| {
                k = (k + 1) % trying.len();
                core.handle_datagram(now, black_box(&trying[k]), from_phone.clone());
                black_box(core.poll_work())
            })
        });
        assert_eq!(core.load().0, live, "provisional responses keep the transactions alive");
    }
    g.finish();
}

/// The REGISTER with credentials that sipp's `register_auth.xml` sends through the alias.
const REGISTER: &str = "REGISTER sip:bench.local SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.10:5070;branch=z9hG4bK-4242-9-2\r\n\
From: <sip:1000009@bench.local>;tag=4242SIPpTag009\r\n\
To: <sip:1000009@bench.local>\r\n\
Call-ID: 9-4242@127.0.0.10\r\n\
CSeq: 2 REGISTER\r\n\
Contact: <sip:1000009@127.0.0.11:5062>\r\n\
Authorization: Digest username=\"1000009\",realm=\"bench.local\",uri=\"sip:bench.local\",nonce=\"AAABmsZr6fO1c3vbq8A0dQm0kXo1RmE2\",response=\"0c3e5b6f7a8d9e0f1a2b3c4d5e6f7a8b\",algorithm=MD5\r\n\
Max-Forwards: 70\r\n\
Expires: 3600\r\n\
User-Agent: sipbench\r\n\
Content-Length: 0\r\n\r\n";

fn registrar_benches(c: &mut Criterion) {
    let req = parse(REGISTER);
    let limits = Limits { min: 60, max: 3600, default: 3600 };
    assert!(matches!(registrar::plan(&req, limits), Ok(registrar::Update::Contacts(_))));
    let binding = Binding {
        contact: "sip:1000009@127.0.0.11:5062".into(),
        expires_at_ms: 1_767_229_200_000,
        q: None,
        call_id: "9-4242@127.0.0.10".into(),
        cseq: 2,
        received: "127.0.0.10:5070".parse().expect("addr"),
        ingress: StoredIngress { ip: [127, 0, 0, 2].into(), port: 5060, transport: Transport::Udp },
        connection_id: 0,
        dispatcher: "d1".into(),
        user_agent: "sipbench".into(),
        instance: None,
        reg_id: None,
        nat: false,
    };
    let mut g = c.benchmark_group("registrar");
    g.bench_function("plan_register", |b| b.iter(|| registrar::plan(black_box(&req), limits)));
    g.bench_function("ok_response", |b| {
        b.iter(|| {
            registrar::ok_response(
                black_box(&req),
                std::slice::from_ref(&binding),
                1_767_225_600_000,
                "sa.p1.tag",
            )
            .to_bytes()
        })
    });
    g.finish();
}

criterion_group!(benches, tx_lookup, core_datagram, registrar_benches);
criterion_main!(benches);

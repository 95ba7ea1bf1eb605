//! Criterion benchmarks of the dispatcher's per-datagram work: scan the routing keys of a
//! datagram ([`sipmsg::scan::scan`]) and pick the processor that gets it
//! ([`sipalias_dispatcher::route`]) among three live processors.
//!
//! The receive loop's own function (`ingress::handle`, which also builds the gRPC envelope and
//! queues it on the processor's link) is private to the crate, so this benches the public parts
//! it is made of:
//!
//! - `scan_and_route/<message>`: `scan` + `route::pick` for each kind of routing decision: an
//!   initial INVITE (rendezvous hash of the Call-ID over the live processors), a response (the
//!   processor named in the top Via branch), an in-dialog BYE (the processor named in the
//!   Request-URI), and an ACK for a non-2xx (the To tag).
//! - `scan_and_route_draining/invite`: the same through `route::pick_draining` with the
//!   closures `Membership` passes (none draining): what the dispatcher really calls.
//! - `envelope/invite`: scan + pick + building the `DispatcherMessage` (ingress strings and a
//!   copy of the datagram) as `ingress::handle` does, minus the channel send and the protobuf
//!   encoding done later by tonic.
//!
//! Run: `cargo bench -p sipalias-dispatcher --bench route`. See `docs/benchmarks.md`.
// criterion_group! generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sipalias_dispatcher::route::{pick, pick_draining};
use sipalias_proto::edge::dispatcher_message::Kind as DKind;
use sipalias_proto::edge::{DispatcherMessage, Inbound, Ingress, Transport};
use sipmsg::scan::scan;

/// An initial INVITE from a phone (sipp's `uac_call.xml`, second INVITE with credentials).
const INVITE: &[u8] = b"INVITE sip:1005000@bench.local SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.10:5071;branch=z9hG4bK-4242-17-2\r\n\
From: <sip:1000000@bench.local>;tag=4242SIPpTag0017\r\n\
To: <sip:1005000@bench.local>\r\n\
Call-ID: 17-4242@127.0.0.10\r\n\
CSeq: 2 INVITE\r\n\
Contact: <sip:1000000@127.0.0.10:5071>\r\n\
Proxy-Authorization: Digest username=\"1000000\",realm=\"bench.local\",uri=\"sip:127.0.0.1:5060\",nonce=\"AAABmsZr6fO1c3vbq8A0dQm0kXo1RmE2\",response=\"6629fae49393a05397450978507c4ef1\",algorithm=MD5\r\n\
Max-Forwards: 70\r\n\
User-Agent: sipbench\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 0\r\n\
\r\n";

/// A 180 from the callee on the B leg: its top Via branch names processor p2.
const RINGING: &[u8] = b"SIP/2.0 180 Ringing\r\n\
Via: SIP/2.0/UDP 127.0.0.2:5060;branch=z9hG4bKsa.p2.1x2y3z;rport=5060\r\n\
From: <sip:1000000@127.0.0.2>;tag=sa.p2.9k8j7h\r\n\
To: <sip:1005000@127.0.0.2>;tag=4243SIPpTag0117\r\n\
Call-ID: p2-3f-8d7c6b5a4e3f2a1b\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:127.0.0.11:5062;transport=UDP>\r\n\
Content-Length: 0\r\n\
\r\n";

/// The caller's BYE: its Request-URI is the Contact processor p3 put in the dialog.
const BYE: &[u8] = b"BYE sip:sa.p3.4d5e6f@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.10:5071;branch=z9hG4bK-4242-17-10\r\n\
From: <sip:1000000@bench.local>;tag=4242SIPpTag0017\r\n\
To: <sip:1005000@bench.local>;tag=sa.p3.abc123\r\n\
Call-ID: 17-4242@127.0.0.10\r\n\
CSeq: 10 BYE\r\n\
Contact: <sip:1000000@127.0.0.10:5071>\r\n\
Max-Forwards: 70\r\n\
Content-Length: 0\r\n\
\r\n";

/// The caller's ACK for the 407: no Request-URI token, its To tag names processor p1.
const ACK_407: &[u8] = b"ACK sip:1005000@bench.local SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.10:5071;branch=z9hG4bK-4242-17-1\r\n\
From: <sip:1000000@bench.local>;tag=4242SIPpTag0017\r\n\
To: <sip:1005000@bench.local>;tag=sa.p1.q1w2e3\r\n\
Call-ID: 17-4242@127.0.0.10\r\n\
CSeq: 1 ACK\r\n\
Max-Forwards: 70\r\n\
Content-Length: 0\r\n\
\r\n";

const SAMPLES: [(&str, &[u8], &str); 4] = [
    ("invite_hash", INVITE, ""),
    ("response_180_branch", RINGING, "p2"),
    ("bye_uri_token", BYE, "p3"),
    ("ack_407_to_tag", ACK_407, "p1"),
];

/// Three live processors, held as the dispatcher holds them (`Arc<str>` ids).
fn live() -> Vec<Arc<str>> {
    ["p1", "p2", "p3"].into_iter().map(Arc::from).collect()
}

fn scan_and_route(c: &mut Criterion) {
    let live = live();
    let mut g = c.benchmark_group("scan_and_route");
    for (name, bytes, want) in SAMPLES {
        let s = scan(bytes).expect("sample scans");
        let got = pick(&s, &live).map(|n| n.to_string()).expect("a processor is picked");
        assert!(want.is_empty() || got == want, "{name}: routed to {got}, expected {want}");
        g.throughput(Throughput::Elements(1));
        g.bench_function(name, |b| {
            b.iter(|| {
                let s = scan(black_box(bytes)).ok()?;
                pick(&s, black_box(&live)).map(|n| n.len())
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("scan_and_route_draining");
    g.bench_function("invite", |b| {
        b.iter(|| {
            let s = scan(black_box(INVITE)).ok()?;
            pick_draining(&s, black_box(&live), |_| false, |_, _| false).map(|p| p.node.len())
        })
    });
    g.finish();
}

fn envelope(c: &mut Criterion) {
    let live = live();
    let local: std::net::SocketAddr = "127.0.0.1:5060".parse().expect("addr");
    let remote: std::net::SocketAddr = "127.0.0.10:5071".parse().expect("addr");
    let mut g = c.benchmark_group("envelope");
    g.throughput(Throughput::Bytes(INVITE.len() as u64));
    g.bench_function("invite", |b| {
        b.iter(|| {
            let data = black_box(INVITE);
            let s = scan(data).ok()?;
            let node = pick(&s, &live)?;
            let msg = DispatcherMessage {
                kind: Some(DKind::Inbound(Inbound {
                    ingress: Some(Ingress {
                        local_ip: local.ip().to_string(),
                        local_port: u32::from(local.port()),
                        transport: Transport::Udp as i32,
                        remote_ip: remote.ip().to_string(),
                        remote_port: u32::from(remote.port()),
                        connection_id: 0,
                        received_at_ms: 1_767_225_600_000,
                        dispatcher_id: "d1".to_owned(),
                    }),
                    message: data.to_vec(),
                })),
            };
            Some((Arc::clone(node), msg))
        })
    });
    g.finish();
}

criterion_group!(benches, scan_and_route, envelope);
criterion_main!(benches);

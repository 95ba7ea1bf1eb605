//! Criterion benchmarks of the SIP message layer's hot paths (issue "Load: measure the cluster
//! under sipp load"): what every processor does to every message, and what the dispatcher does
//! to every datagram.
//!
//! - `parse/*`: [`sipmsg::parse`] of a typical INVITE with SDP (as a phone sends it after a 407,
//!   with Proxy-Authorization) and of a 200 OK with SDP.
//! - `serialize/*`: [`sipmsg::SipMessage::to_bytes`] of the parsed INVITE.
//! - `typed/*`: the typed views the transaction layer and B2BUA read on every request
//!   (Call-ID, CSeq, From, To, top Via) plus `validate_request`.
//! - `scan/*`: [`sipmsg::scan::scan`], the dispatcher's look at a datagram (routing keys only).
//!
//! Run: `cargo bench -p sipmsg --bench parse` (add `-- --warm-up-time 1 --measurement-time 2`
//! for a quick look). See `docs/benchmarks.md`.
// criterion_group! generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sipmsg::scan::scan;

/// An INVITE as a phone sends it after a 407 challenge: what sipp's `uac_call.xml` sends in the
/// load benchmark, plus the headers real phones add (Allow, Supported), and a typical SDP.
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
Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, UPDATE, INFO\r\n\
Supported: replaces, timer\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 160\r\n\
\r\n\
v=0\r\n\
o=caller 53655765 2353687637 IN IP4 127.0.0.10\r\n\
s=-\r\n\
c=IN IP4 127.0.0.10\r\n\
t=0 0\r\n\
m=audio 6000 RTP/AVP 0 8 101\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:8 PCMA/8000\r\n";

/// The callee's 200 OK with SDP, as the B2BUA receives it on the B leg.
const OK_200: &[u8] = b"SIP/2.0 200 OK\r\n\
Via: SIP/2.0/UDP 127.0.0.2:5060;branch=z9hG4bKsa.p1.1x2y3z;rport=5060\r\n\
Record-Route: <sip:127.0.0.2:5060;lr>\r\n\
From: <sip:1000000@127.0.0.2>;tag=sa.p1.9k8j7h\r\n\
To: <sip:1005000@127.0.0.2>;tag=4243SIPpTag0117\r\n\
Call-ID: p1-3f-8d7c6b5a4e3f2a1b\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:127.0.0.11:5062;transport=UDP>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 132\r\n\
\r\n\
v=0\r\n\
o=callee 53655765 2353687637 IN IP4 127.0.0.11\r\n\
s=-\r\n\
c=IN IP4 127.0.0.11\r\n\
t=0 0\r\n\
m=audio 6002 RTP/AVP 0\r\n\
a=rtpmap:0 PCMU/8000\r\n";

/// A 180 Ringing without body: the most common datagram a dispatcher routes by Via branch.
const RINGING: &[u8] = b"SIP/2.0 180 Ringing\r\n\
Via: SIP/2.0/UDP 127.0.0.2:5060;branch=z9hG4bKsa.p1.1x2y3z;rport=5060\r\n\
From: <sip:1000000@127.0.0.2>;tag=sa.p1.9k8j7h\r\n\
To: <sip:1005000@127.0.0.2>;tag=4243SIPpTag0117\r\n\
Call-ID: p1-3f-8d7c6b5a4e3f2a1b\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:127.0.0.11:5062;transport=UDP>\r\n\
Content-Length: 0\r\n\
\r\n";

fn parse_and_serialize(c: &mut Criterion) {
    let invite = sipmsg::parse(INVITE).expect("INVITE parses");
    assert_eq!(invite.body.len(), 160, "Content-Length of the sample matches its SDP");
    let ok = sipmsg::parse(OK_200).expect("200 parses");
    assert_eq!(ok.body.len(), 132, "Content-Length of the sample matches its SDP");

    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Bytes(INVITE.len() as u64));
    g.bench_function("invite_sdp", |b| b.iter(|| sipmsg::parse(black_box(INVITE))));
    g.throughput(Throughput::Bytes(OK_200.len() as u64));
    g.bench_function("response_200_sdp", |b| b.iter(|| sipmsg::parse(black_box(OK_200))));
    g.finish();

    let mut g = c.benchmark_group("serialize");
    g.throughput(Throughput::Bytes(INVITE.len() as u64));
    g.bench_function("invite_sdp", |b| b.iter(|| black_box(&invite).to_bytes()));
    g.bench_function("invite_sdp_round_trip", |b| {
        b.iter(|| sipmsg::parse(black_box(INVITE)).map(|m| m.to_bytes()))
    });
    g.finish();

    let mut g = c.benchmark_group("typed");
    g.bench_function("invite_keys", |b| {
        b.iter(|| {
            let m = black_box(&invite);
            (
                m.call_id().map(str::len),
                m.cseq().map(|c| c.seq),
                m.from().map(|f| f.tag().map(str::len)),
                m.to().map(|t| t.uri.host.len()),
                m.top_via().map(|v| v.branch().map(str::len)),
            )
        })
    });
    g.bench_function("invite_validate_request", |b| {
        b.iter(|| black_box(&invite).validate_request())
    });
    g.finish();
}

fn scan_datagrams(c: &mut Criterion) {
    let mut g = c.benchmark_group("scan");
    for (name, bytes) in [("invite_sdp", INVITE), ("response_180", RINGING)] {
        scan(bytes).expect("sample scans");
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function(name, |b| b.iter(|| scan(black_box(bytes))));
    }
    g.finish();
}

criterion_group!(benches, parse_and_serialize, scan_datagrams);
criterion_main!(benches);

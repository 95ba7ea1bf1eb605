//! Criterion benchmarks of the edge guard's checks, per message (docs/security.md, "Costs"):
//!
//! - `guard/admit`: the ban lookup and the per-source rate count every datagram and stream
//!   message pays before it is scanned (one lock, two hash lookups), for a source seen before
//!   (the common case) and for 1,000 sources in turn.
//! - `guard/scanner_check`: the `User-Agent` lookup paid by each request outside a dialog.
//! - `guard/admission`: the token bucket paid by each new INVITE and REGISTER when
//!   `admission_rate` is set.
//! - `link_secret/check`: the constant-time comparison every gRPC call to billing pays.
//!
//! Run: `cargo bench -p sipalias-dispatcher --bench guard`.
// criterion_group! generates an undocumented `pub fn`.
#![allow(missing_docs)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use sipalias_dispatcher::guard::{Guard, GuardConfig};
use sipalias_proto::link_auth::Require;

const INVITE: &[u8] = b"INVITE sip:1005000@bench.local SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.10:5071;branch=z9hG4bK-4242-17-2\r\n\
From: <sip:1000000@bench.local>;tag=4242SIPpTag0017\r\n\
To: <sip:1005000@bench.local>\r\n\
Call-ID: 17-4242@127.0.0.10\r\n\
CSeq: 2 INVITE\r\n\
Contact: <sip:1000000@127.0.0.10:5071>\r\n\
Max-Forwards: 70\r\n\
User-Agent: sipbench\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 0\r\n\
\r\n";

fn config() -> GuardConfig {
    GuardConfig {
        source_rate_limit: u32::MAX,
        source_rate_ban: Duration::from_secs(60),
        rate_limit_exempt: Vec::new(),
        admission_rate: 1_000_000,
        scanner_user_agents: sipmsg::scan::KNOWN_SCANNERS.map(String::from).to_vec(),
    }
}

fn guard(c: &mut Criterion) {
    let start = Instant::now();
    let g = Guard::new(config(), start);
    let one = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
    c.bench_function("guard/admit", |b| b.iter(|| g.admit(black_box(one), start)));
    let many: Vec<IpAddr> =
        (0..1000u32).map(|i| IpAddr::V4(Ipv4Addr::from(0xcb00_7100 + i))).collect();
    let mut i = 0;
    c.bench_function("guard/admit_1000_sources", |b| {
        b.iter(|| {
            i = (i + 1) % many.len();
            g.admit(black_box(many[i]), start)
        })
    });
    c.bench_function("guard/scanner_check", |b| b.iter(|| g.is_scanner(black_box(INVITE))));
    c.bench_function("guard/admission", |b| b.iter(|| g.admit_new_work(black_box(start))));
    let require = Require::new("sipalias-bench-link-secret-0123").expect("secret");
    let presented = b"sipalias-bench-link-secret-0123".as_slice();
    c.bench_function("link_secret/check", |b| {
        b.iter(|| require.accepts(black_box(Some(presented))))
    });
}

criterion_group!(benches, guard);
criterion_main!(benches);

//! The edge guard: what the dispatcher drops or turns away before any processor sees it.
//!
//! - **Bans.** A banned source (an IPv4 address or an IPv6 /64, [`Source`]) has every datagram
//!   and stream message dropped before it is even scanned. Bans come from processors (too many
//!   failed authentications, announced with `Ban` on the edge link) or from the per-source rate
//!   limit below; they end by themselves, and operators list and lift them
//!   (`sipalias-dispatcher bans`).
//! - **Per-source rate limit** (like Kamailio's `pike`): a source that sends more than
//!   `source_rate_limit` messages within one second is banned for `source_rate_ban_secs`,
//!   logged once. Sources in `rate_limit_exempt` (SBCs, trunks, load generators) are never
//!   rate-limited.
//! - **Scanners.** Requests outside dialogs whose `User-Agent` names a known scanner are dropped
//!   without an answer.
//! - **Admission.** New INVITEs and REGISTERs beyond `admission_rate` a second get the
//!   dispatcher's own `503` (see [`crate::membership::Membership::deliver`] for the other bound:
//!   a processor whose queue is half full takes no new work).
//!
//! Everything here is decided on an explicit `now`, so tests run it on a virtual clock; one
//! lock is taken per message.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sipmsg::net::{Net, Source};
use tracing::warn;

/// Longest ban accepted from a processor: a week (a longer one belongs in a firewall).
pub const MAX_BAN: Duration = Duration::from_secs(7 * 86_400);
/// How many sources' rate windows are tracked before old ones are swept: bounds memory under a
/// spoofed flood from many addresses.
const MAX_TRACKED: usize = 200_000;
/// Most bans held (a flood of distinct banned sources cannot grow the table without bound; past
/// it, expired bans are swept and then new rate bans are not recorded).
const MAX_BANS: usize = 200_000;

/// The guard's configuration (`[dispatcher]` keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardConfig {
    /// Messages one source may send within a second before it is banned; 0 = no limit.
    pub source_rate_limit: u32,
    /// How long a source over the rate limit is banned.
    pub source_rate_ban: Duration,
    /// Sources never rate-limited.
    pub rate_limit_exempt: Vec<Net>,
    /// New INVITEs and REGISTERs admitted per second; 0 = no limit.
    pub admission_rate: u32,
    /// Lower-case User-Agent fragments of known scanners.
    pub scanner_user_agents: Vec<String>,
}

/// Why a source is banned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BanReason {
    /// Over the per-source rate limit.
    Rate,
    /// Announced by a processor, with its reason.
    Processor(String),
}

impl BanReason {
    fn describe(&self) -> &str {
        match self {
            BanReason::Rate => "rate",
            BanReason::Processor(why) => why,
        }
    }
}

#[derive(Debug)]
struct Ban {
    until: Instant,
    reason: BanReason,
    dropped: u64,
}

/// Messages counted from one source in the current one-second window.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    count: u32,
}

/// New-work tokens: `admission_rate` a second, up to one second's worth banked.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
struct State {
    bans: HashMap<Source, Ban>,
    windows: HashMap<Source, Window>,
    bucket: Bucket,
}

/// What the guard has done, for `sipalias-dispatcher bans` (and metrics).
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages dropped because their source was banned.
    pub dropped_banned: AtomicU64,
    /// Requests dropped as scanners.
    pub dropped_scanners: AtomicU64,
    /// Rate bans begun.
    pub rate_bans: AtomicU64,
    /// Bans received from processors (new ones, not renewals).
    pub processor_bans: AtomicU64,
    /// New INVITEs and REGISTERs answered 503.
    pub shed: AtomicU64,
    /// Sends and connections refused by the destination policy.
    pub denied_destinations: AtomicU64,
}

/// One ban as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanView {
    /// The banned source.
    pub source: Source,
    /// `rate` or the processor's reason.
    pub reason: String,
    /// Time left.
    pub remaining: Duration,
    /// Messages dropped under it.
    pub dropped: u64,
}

/// The edge guard of one dispatcher.
#[derive(Debug)]
pub struct Guard {
    config: GuardConfig,
    state: Mutex<State>,
    /// What it did.
    pub counters: Counters,
}

impl Guard {
    /// A guard with nothing banned and a full admission bucket at `now`.
    pub fn new(config: GuardConfig, now: Instant) -> Self {
        let tokens = f64::from(config.admission_rate);
        Guard {
            config,
            state: Mutex::new(State {
                bans: HashMap::new(),
                windows: HashMap::new(),
                bucket: Bucket { tokens, at: now },
            }),
            counters: Counters::default(),
        }
    }

    /// Whether a message from `ip` may be looked at, at `now`: `false` for a banned source,
    /// and for one this message takes over the rate limit (it is banned from now on, logged
    /// once). Counts the message against its source.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> bool {
        let source = Source::of(ip);
        let mut state = self.lock();
        if let Some(ban) = state.bans.get_mut(&source) {
            if ban.until > now {
                ban.dropped += 1;
                self.counters.dropped_banned.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            state.bans.remove(&source);
        }
        let limit = self.config.source_rate_limit;
        if limit == 0 || self.config.rate_limit_exempt.iter().any(|n| n.contains(ip)) {
            return true;
        }
        if state.windows.len() >= MAX_TRACKED && !state.windows.contains_key(&source) {
            state
                .windows
                .retain(|_, w| now.saturating_duration_since(w.start) < Duration::from_secs(1));
            if state.windows.len() >= MAX_TRACKED {
                // More distinct sources within a second than can be tracked (a spoofed flood):
                // this one goes uncounted rather than growing the table; admission control
                // and the processors' bounds still hold.
                return true;
            }
        }
        let window = state.windows.entry(source).or_insert(Window { start: now, count: 0 });
        if now.saturating_duration_since(window.start) >= Duration::from_secs(1) {
            *window = Window { start: now, count: 0 };
        }
        window.count = window.count.saturating_add(1);
        if window.count <= limit {
            return true;
        }
        state.windows.remove(&source);
        let ban_secs = self.config.source_rate_ban.as_secs();
        if insert_ban(
            &mut state.bans,
            source,
            now + self.config.source_rate_ban,
            BanReason::Rate,
            now,
        ) {
            self.counters.rate_bans.fetch_add(1, Ordering::Relaxed);
            warn!(
                source = %source,
                limit,
                ban_secs,
                "source banned: request rate over source_rate_limit"
            );
        }
        self.counters.dropped_banned.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Whether `ip`'s source is banned at `now` (a connection from it is closed at once);
    /// counted as a drop when so. Does not count against the rate.
    pub fn banned(&self, ip: IpAddr, now: Instant) -> bool {
        let mut state = self.lock();
        match state.bans.get_mut(&Source::of(ip)) {
            Some(ban) if ban.until > now => {
                ban.dropped += 1;
                self.counters.dropped_banned.fetch_add(1, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Bans `source` for `duration` (capped at [`MAX_BAN`]) on a processor's word. Returns
    /// whether it was not banned before (a renewal only extends the end).
    pub fn ban(&self, source: Source, duration: Duration, reason: &str, now: Instant) -> bool {
        let until = now + duration.min(MAX_BAN);
        let mut state = self.lock();
        if let Some(ban) = state.bans.get_mut(&source)
            && ban.until > now
        {
            ban.until = ban.until.max(until);
            return false;
        }
        let new = insert_ban(
            &mut state.bans,
            source,
            until,
            BanReason::Processor(reason.to_owned()),
            now,
        );
        if new {
            self.counters.processor_bans.fetch_add(1, Ordering::Relaxed);
        }
        new
    }

    /// Lifts any ban on `source`, and forgets its rate window. Returns whether one was in force.
    pub fn lift(&self, source: Source, now: Instant) -> bool {
        let mut state = self.lock();
        state.windows.remove(&source);
        state.bans.remove(&source).is_some_and(|b| b.until > now)
    }

    /// The bans in force at `now`, longest remaining first.
    pub fn list(&self, now: Instant) -> Vec<BanView> {
        let state = self.lock();
        let mut out: Vec<BanView> = state
            .bans
            .iter()
            .filter(|(_, b)| b.until > now)
            .map(|(source, b)| BanView {
                source: *source,
                reason: b.reason.describe().to_owned(),
                remaining: b.until - now,
                dropped: b.dropped,
            })
            .collect();
        out.sort_by(|a, b| b.remaining.cmp(&a.remaining).then(a.source.cmp(&b.source)));
        out
    }

    /// Whether one more new INVITE or REGISTER may go to the processors at `now`
    /// (`admission_rate`); `false` is counted as shed (the caller answers `503`).
    pub fn admit_new_work(&self, now: Instant) -> bool {
        let rate = self.config.admission_rate;
        if rate == 0 {
            return true;
        }
        let rate = f64::from(rate);
        let mut state = self.lock();
        let bucket = &mut state.bucket;
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(rate);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            self.counters.shed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Whether a request's head names a known scanner in its `User-Agent` (counted when so).
    pub fn is_scanner(&self, head: &[u8]) -> bool {
        if self.config.scanner_user_agents.is_empty() {
            return false;
        }
        let Some(ua) = header_value(head, b"user-agent") else { return false };
        let ua = String::from_utf8_lossy(ua).to_ascii_lowercase();
        let hit = self.config.scanner_user_agents.iter().any(|s| ua.contains(s.as_str()));
        if hit {
            self.counters.dropped_scanners.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// Counts a send or connection the destination policy refused.
    pub fn count_denied_destination(&self) {
        self.counters.denied_destinations.fetch_add(1, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a few assignments; a panic cannot leave the table half-updated.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Records a ban unless the table is full of live ones. Returns whether it was recorded.
fn insert_ban(
    bans: &mut HashMap<Source, Ban>,
    source: Source,
    until: Instant,
    reason: BanReason,
    now: Instant,
) -> bool {
    if bans.len() >= MAX_BANS {
        bans.retain(|_, b| b.until > now);
        if bans.len() >= MAX_BANS {
            return false;
        }
    }
    bans.insert(source, Ban { until, reason, dropped: 0 });
    true
}

/// The value of the first header named `name` (lower-case, full name; `User-Agent` has no
/// compact form) in a message head, trimmed. A loose scan, like the routing scan: the processor
/// parses properly.
fn header_value<'a>(head: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(head.len());
    head[..end].split(|&b| b == b'\n').skip(1).find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        let (n, rest) = line.split_at(colon);
        n.trim_ascii().eq_ignore_ascii_case(name).then(|| rest[1..].trim_ascii())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> GuardConfig {
        GuardConfig {
            source_rate_limit: 10,
            source_rate_ban: Duration::from_secs(60),
            rate_limit_exempt: vec![Net::parse("192.0.2.0/24").expect("net")],
            admission_rate: 0,
            scanner_user_agents: vec!["friendly-scanner".into(), "sipvicious".into()],
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    /// On a virtual clock: the 11th message within a second bans the source for 60 s; other
    /// sources, exempt sources and slower senders are untouched; the ban ends by itself.
    #[test]
    fn a_source_over_the_rate_is_banned_for_a_while_and_others_are_not() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let g = Guard::new(config(), t0);
        for i in 0..10 {
            assert!(g.admit(ip("203.0.113.7"), at(i * 10)), "message {i} within the budget");
        }
        assert!(!g.admit(ip("203.0.113.7"), at(100)), "the 11th within a second");
        assert_eq!(g.counters.rate_bans.load(Ordering::Relaxed), 1);
        assert!(!g.admit(ip("203.0.113.7"), at(59_000)), "still banned");
        assert!(g.admit(ip("203.0.113.8"), at(100)), "another source");
        for i in 0..100 {
            assert!(g.admit(ip("192.0.2.9"), at(i)), "exempt sources are never limited");
        }
        // 10 a second for a minute: never banned.
        for i in 0..600 {
            assert!(g.admit(ip("198.51.100.1"), at(i * 100 + 1)), "steady sender at {i}");
        }
        let list = g.list(at(1000));
        assert_eq!(list.len(), 1);
        assert_eq!(
            (list[0].source.to_string(), list[0].reason.as_str()),
            ("203.0.113.7".into(), "rate")
        );
        assert!(list[0].dropped >= 1);
        // The ban ends by itself at 60.1 s.
        assert!(g.admit(ip("203.0.113.7"), at(60_200)));
        assert!(g.list(at(60_200)).is_empty());
    }

    #[test]
    fn an_ipv6_host_is_limited_per_64_whatever_address_it_takes() {
        let t0 = Instant::now();
        let g = Guard::new(config(), t0);
        for i in 0..10u16 {
            assert!(g.admit(ip(&format!("2001:db8:1:2::{i:x}")), t0));
        }
        assert!(!g.admit(ip("2001:db8:1:2:ffff::1"), t0), "same /64, new address");
        assert!(g.admit(ip("2001:db8:1:3::1"), t0), "another /64");
    }

    #[test]
    fn processor_bans_are_kept_renewed_capped_listed_and_lifted() {
        let t0 = Instant::now();
        let g = Guard::new(GuardConfig { source_rate_limit: 0, ..config() }, t0);
        let src: Source = "198.51.100.4".parse().expect("source");
        assert!(g.ban(src, Duration::from_secs(600), "auth-failures", t0));
        assert!(!g.ban(src, Duration::from_secs(10), "auth-failures", t0), "a renewal");
        assert!(!g.admit(ip("198.51.100.4"), t0 + Duration::from_secs(599)));
        assert_eq!(g.list(t0)[0].reason, "auth-failures");
        assert!(g.lift(src, t0 + Duration::from_secs(1)));
        assert!(g.admit(ip("198.51.100.4"), t0 + Duration::from_secs(1)), "lifted");
        assert!(!g.lift(src, t0), "nothing left to lift");
        // A hostile duration is capped at a week.
        assert!(g.ban(src, Duration::from_secs(u64::MAX / 4), "x", t0));
        assert!(g.list(t0)[0].remaining <= MAX_BAN);
        assert_eq!(g.counters.processor_bans.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn admission_lets_through_its_rate_and_banks_at_most_a_second() {
        let t0 = Instant::now();
        let g = Guard::new(GuardConfig { admission_rate: 100, ..config() }, t0);
        let admitted = (0..250).filter(|_| g.admit_new_work(t0)).count();
        assert_eq!(admitted, 100, "one second's worth at once");
        assert_eq!(g.counters.shed.load(Ordering::Relaxed), 150);
        // Over the next second, 100 more (one every 10 ms).
        let admitted =
            (1..=100).filter(|i| g.admit_new_work(t0 + Duration::from_millis(i * 10))).count();
        assert_eq!(admitted, 100);
        // An idle minute banks only a second's worth.
        let later = t0 + Duration::from_secs(61);
        assert_eq!((0..500).filter(|_| g.admit_new_work(later)).count(), 100);
        // Off: everything passes.
        let off = Guard::new(config(), t0);
        assert!((0..10_000).all(|_| off.admit_new_work(t0)));
    }

    #[test]
    fn scanners_are_known_by_their_user_agent_in_any_case_and_spacing() {
        let g = Guard::new(config(), Instant::now());
        let req = |ua: &str| {
            format!("OPTIONS sip:100@x SIP/2.0\r\nVia: SIP/2.0/UDP h\r\n{ua}\r\nCall-ID: c\r\n\r\n")
        };
        for ua in [
            "User-Agent: friendly-scanner",
            "user-agent:SIPVicious 0.3",
            "USER-AGENT :  x Friendly-Scanner",
        ] {
            assert!(g.is_scanner(req(ua).as_bytes()), "{ua}");
        }
        for ua in
            ["User-Agent: Yealink SIP-T46S", "X-User-Agent: friendly-scanner", "Server: sipvicious"]
        {
            assert!(!g.is_scanner(req(ua).as_bytes()), "{ua}");
        }
        // A User-Agent in the body is not a header.
        let body = "OPTIONS sip:x SIP/2.0\r\nCall-ID: c\r\n\r\nUser-Agent: friendly-scanner\r\n";
        assert!(!g.is_scanner(body.as_bytes()));
        assert_eq!(g.counters.dropped_scanners.load(Ordering::Relaxed), 3);
    }

    /// A spoofed flood from a million distinct addresses keeps the tables bounded.
    #[test]
    fn a_flood_from_many_sources_keeps_memory_bounded() {
        let t0 = Instant::now();
        let g = Guard::new(config(), t0);
        for i in 0..(MAX_TRACKED as u32 + 50_000) {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            g.admit(IpAddr::V4(a), t0 + Duration::from_millis(u64::from(i / 10_000) * 1100));
        }
        assert!(g.lock().windows.len() <= MAX_TRACKED);
    }
}

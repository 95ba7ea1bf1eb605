//! Calls beyond the cluster: SIP trunks (gateways) to the PSTN, the routes that choose them by
//! the dialled number's longest prefix, and the dialing plans that turn what a phone dials
//! into an E.164 number (an old provider's phones dial national numbers with a trunk prefix).
//!
//! Pure: configuration types with their validation, number normalization and the hunt order
//! of a call's gateways. The call setup ([`crate::call_setup`]) asks for them when a number
//! is no subscriber of the cluster; the B2BUA tries the gateways one after the other
//! ([`fails_over`]).

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use sipmsg::net::Net;

use crate::transport::Transport;

/// A trunk's digest credentials. Its `Debug` hides the password, so no log line shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct TrunkAuth {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
}

impl std::fmt::Debug for TrunkAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrunkAuth")
            .field("username", &self.username)
            .field("password", &"…")
            .finish()
    }
}

/// A SIP trunk (`[[processor.gateways]]`): where calls to the PSTN are sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    /// Name routes refer to: 1–64 of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// `ip:port` of the trunk (IPv6 in brackets).
    pub address: String,
    /// `udp` (default), `tcp` or `tls`.
    #[serde(default = "default_transport")]
    pub transport: String,
    /// The cluster IP calls to it leave from (the trunk authorizes by source address); empty:
    /// the main IP.
    #[serde(default)]
    pub local_ip: String,
    /// More source networks (CIDRs, IPs) the trunk sends calls from, besides its `address`'s
    /// IP. Calls from these and from that IP are trusted without digest authentication: they
    /// are for the cluster's DIDs.
    #[serde(default)]
    pub inbound_sources: Vec<String>,
    /// Digest user name for a trunk that challenges our INVITEs (empty: none; IP
    /// authentication).
    #[serde(default)]
    pub username: String,
    /// Its password (with `username`). Never logged.
    #[serde(default)]
    pub password: String,
}

fn default_transport() -> String {
    "udp".to_owned()
}

/// One route (`[[processor.routes]]`): numbers starting with `prefix` may go through
/// `gateway`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Digits of E.164 numbers (a leading `+` is ignored); empty: any number.
    #[serde(default)]
    pub prefix: String,
    /// Name of a gateway.
    pub gateway: String,
    /// Lower is tried first (default 0).
    #[serde(default)]
    pub priority: u32,
    /// Among routes of equal priority: the share of calls tried on this one first (1–1000,
    /// default 1).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// How the phones behind one local IP dial (`[[processor.dialing_plans]]`): the old
/// provider's national conventions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DialingPlan {
    /// The local IP (an alias, or the main IP) whose callers dial this way.
    pub ip: String,
    /// Country calling code, 1–3 digits (`44`).
    pub country_code: String,
    /// Trunk prefix of national numbers (`0`: `020 7946 0000` is `+44 20 7946 0000`); empty:
    /// none.
    #[serde(default = "default_national_prefix")]
    pub national_prefix: String,
    /// International access code (`00`: `0033…` is `+33…`).
    #[serde(default = "default_international_prefix")]
    pub international_prefix: String,
}

fn default_national_prefix() -> String {
    "0".to_owned()
}

fn default_international_prefix() -> String {
    "00".to_owned()
}

/// Longest E.164 number (ITU-T E.164: 15 digits, country code included).
const MAX_E164_DIGITS: usize = 15;
/// Shortest number sent to a trunk: shorter ones are extensions or service codes.
const MIN_E164_DIGITS: usize = 6;

impl Gateway {
    /// The trunk's address (validated at load).
    pub fn addr(&self) -> Option<SocketAddr> {
        self.address.trim().parse().ok()
    }

    /// Its transport (validated at load).
    pub fn transport(&self) -> Transport {
        match self.transport.as_str() {
            "tcp" => Transport::Tcp,
            "tls" => Transport::Tls,
            _ => Transport::Udp,
        }
    }

    /// The local IP calls leave from, when one is configured.
    pub fn local_ip(&self) -> Option<IpAddr> {
        self.local_ip.trim().parse().ok()
    }

    /// The credentials to answer its challenges with, if it has any.
    pub fn credentials(&self) -> Option<TrunkAuth> {
        (!self.username.is_empty())
            .then(|| TrunkAuth { username: self.username.clone(), password: self.password.clone() })
    }

    /// The Request-URI of a call to `e164` through this trunk.
    pub fn request_uri(&self, e164: &str) -> String {
        let addr = self.address.trim();
        match self.transport() {
            Transport::Udp => format!("sip:{e164}@{addr}"),
            t => format!("sip:{e164}@{addr};transport={}", t.as_str()),
        }
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let name = &self.name;
        let ok_name = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !ok_name {
            return Err(("name".into(), format!("{name:?}: 1–64 of A-Z a-z 0-9 _ . -")));
        }
        match self.addr() {
            Some(a) if a.port() != 0 && !a.ip().is_unspecified() && !a.ip().is_multicast() => {}
            Some(_) => {
                return Err((
                    "address".into(),
                    format!("{:?}: not a unicast ip:port", self.address),
                ));
            }
            None => {
                return Err((
                    "address".into(),
                    format!(
                        "{:?} is not an ip:port (host names are not resolved: give the \
                         trunk's address)",
                        self.address
                    ),
                ));
            }
        }
        if !["udp", "tcp", "tls"].contains(&self.transport.as_str()) {
            return Err((
                "transport".into(),
                format!("{:?} is not one of udp, tcp, tls", self.transport),
            ));
        }
        if !self.local_ip.trim().is_empty() && self.local_ip().is_none() {
            return Err(("local_ip".into(), format!("{:?} is not an IP address", self.local_ip)));
        }
        if self.username.is_empty() != self.password.is_empty() {
            return Err(("password".into(), "username and password go together".into()));
        }
        for (key, value) in [("username", &self.username), ("password", &self.password)] {
            if value.len() > 256 || value.chars().any(char::is_control) {
                return Err((key.into(), "at most 256 characters, no control characters".into()));
            }
        }
        for (i, net) in self.inbound_sources.iter().enumerate() {
            match Net::parse(net.trim()) {
                // A trusted network as wide as "everyone" would let anybody call DIDs
                // unauthenticated, and is certainly a mistake.
                Ok(n) if n.prefix_len() == 0 => {
                    return Err((
                        format!("inbound_sources[{i}]"),
                        format!("{net:?}: trusts every address"),
                    ));
                }
                Ok(_) => {}
                Err(why) => {
                    return Err((format!("inbound_sources[{i}]"), format!("{net:?}: {why}")));
                }
            }
        }
        Ok(())
    }

    /// Whether calls from `ip` come from this trunk: its address's IP or one of its
    /// `inbound_sources`.
    pub fn sends_from(&self, ip: IpAddr) -> bool {
        self.addr().is_some_and(|a| a.ip() == ip)
            || self
                .inbound_sources
                .iter()
                .filter_map(|n| Net::parse(n.trim()).ok())
                .any(|n| n.contains(ip))
    }
}

/// The trunk a call from `ip` comes from, if any: such a call is trusted without digest
/// authentication, and only such a call.
pub fn trusted_trunk(gateways: &[Gateway], ip: IpAddr) -> Option<&Gateway> {
    gateways.iter().find(|g| g.sends_from(ip))
}

impl Route {
    /// The prefix's digits.
    fn digits(&self) -> &str {
        let p = self.prefix.trim();
        p.strip_prefix('+').unwrap_or(p)
    }
}

impl DialingPlan {
    fn validate(&self) -> Result<(), (String, String)> {
        if self.ip.trim().parse::<IpAddr>().is_err() {
            return Err(("ip".into(), format!("{:?} is not an IP address", self.ip)));
        }
        for (key, value, min, max) in [
            ("country_code", &self.country_code, 1, 3),
            ("national_prefix", &self.national_prefix, 0, 4),
            ("international_prefix", &self.international_prefix, 1, 4),
        ] {
            let n = value.len();
            if n < min || n > max || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err((key.into(), format!("{value:?}: {min}–{max} digits")));
            }
        }
        if self.country_code.starts_with('0') {
            return Err(("country_code".into(), "a country code does not start with 0".into()));
        }
        if !self.national_prefix.is_empty() && self.international_prefix == self.national_prefix {
            return Err(("national_prefix".into(), "must differ from international_prefix".into()));
        }
        Ok(())
    }
}

/// Checks gateways, routes and dialing plans together; the error is (key, why), the key as
/// written (`gateways[1].address`).
pub fn validate(
    gateways: &[Gateway],
    routes: &[Route],
    plans: &[DialingPlan],
) -> Result<(), (String, String)> {
    for (i, g) in gateways.iter().enumerate() {
        g.validate().map_err(|(k, why)| (format!("gateways[{i}].{k}"), why))?;
        if gateways[..i].iter().any(|o| o.name == g.name) {
            return Err((format!("gateways[{i}].name"), format!("{:?} is used twice", g.name)));
        }
    }
    for (i, r) in routes.iter().enumerate() {
        let digits = r.digits();
        if digits.len() > MAX_E164_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err((
                format!("routes[{i}].prefix"),
                format!("{:?}: digits, or empty for any number", r.prefix),
            ));
        }
        if !gateways.iter().any(|g| g.name == r.gateway) {
            return Err((format!("routes[{i}].gateway"), format!("{:?} is no gateway", r.gateway)));
        }
        if r.weight == 0 || r.weight > 1000 {
            return Err((format!("routes[{i}].weight"), "must be between 1 and 1000".into()));
        }
    }
    for (i, p) in plans.iter().enumerate() {
        p.validate().map_err(|(k, why)| (format!("dialing_plans[{i}].{k}"), why))?;
        if plans[..i].iter().any(|o| o.ip.trim() == p.ip.trim()) {
            return Err((
                format!("dialing_plans[{i}].ip"),
                format!("{:?} has a plan already", p.ip),
            ));
        }
    }
    Ok(())
}

/// What `dialed` (a Request-URI user part, or a `tel:` number, visual separators removed)
/// is in E.164 (`+` and 6–15 digits), under the dialing plan of the IP the call came in on:
/// `+…` as it is, the international access code replaced by `+`, the national trunk prefix
/// by `+` and the country code. `None`: not a number for a trunk (a user name, an extension,
/// a service code).
pub fn normalize(dialed: &str, plan: Option<&DialingPlan>) -> Option<String> {
    let digits: String = dialed.chars().filter(|c| !"-.() ".contains(*c)).collect();
    let national = |rest: &str, plan: &DialingPlan| format!("{}{rest}", plan.country_code);
    let e164 = if let Some(rest) = digits.strip_prefix('+') {
        rest.to_owned()
    } else if let Some(plan) = plan {
        if let Some(rest) = digits.strip_prefix(plan.international_prefix.as_str()) {
            rest.to_owned()
        } else if let Some(rest) = digits
            .strip_prefix(plan.national_prefix.as_str())
            .filter(|_| !plan.national_prefix.is_empty())
        {
            national(rest, plan)
        } else {
            return None;
        }
    } else {
        return None;
    };
    let ok = (MIN_E164_DIGITS..=MAX_E164_DIGITS).contains(&e164.len())
        && e164.bytes().all(|b| b.is_ascii_digit())
        && !e164.starts_with('0');
    ok.then(|| format!("+{e164}"))
}

/// The gateways a call to `e164` tries, in order: the routes of the longest prefix that
/// matches it (an empty prefix matches any number), by priority; among equal priorities an
/// order drawn by weight with `draw` (a random number per call: spreading calls over trunks
/// of equal standing). A gateway named twice is tried once.
pub fn hunt<'a>(e164: &str, routes: &'a [Route], mut draw: u64) -> Vec<&'a str> {
    let digits = e164.strip_prefix('+').unwrap_or(e164);
    let Some(longest) =
        routes.iter().map(Route::digits).filter(|p| digits.starts_with(p)).map(str::len).max()
    else {
        return Vec::new();
    };
    let mut matching: Vec<&Route> = routes
        .iter()
        .filter(|r| r.digits().len() == longest && digits.starts_with(r.digits()))
        .collect();
    matching.sort_by_key(|r| r.priority);
    let mut out: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < matching.len() {
        let same = matching[i..].iter().take_while(|r| r.priority == matching[i].priority).count();
        let mut group: Vec<&Route> = matching[i..i + same].to_vec();
        while !group.is_empty() {
            let total: u64 = group.iter().map(|r| u64::from(r.weight)).sum();
            let mut at = draw % total.max(1);
            // A cheap generator step, so each pick in the group draws anew.
            draw = draw
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407)
                >> 1;
            let pick = group
                .iter()
                .position(|r| {
                    let w = u64::from(r.weight);
                    if at < w {
                        true
                    } else {
                        at -= w;
                        false
                    }
                })
                .unwrap_or(0);
            let r = group.remove(pick);
            if !out.contains(&r.gateway.as_str()) {
                out.push(&r.gateway);
            }
        }
        i += same;
    }
    out
}

/// Whether a trunk's final answer sends the call to the next gateway: no answer in time
/// (`408`, also what a transaction timeout is reported as) or a failure of the trunk itself
/// (`5xx`, `503` among them). A `4xx` or `6xx` is about the number or the callee, and
/// another trunk would say the same: it goes to the caller.
pub fn fails_over(status: u16) -> bool {
    status == 408 || (500..=599).contains(&status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uk() -> DialingPlan {
        DialingPlan {
            ip: "127.0.0.2".into(),
            country_code: "44".into(),
            national_prefix: "0".into(),
            international_prefix: "00".into(),
        }
    }

    fn route(prefix: &str, gateway: &str, priority: u32, weight: u32) -> Route {
        Route { prefix: prefix.into(), gateway: gateway.into(), priority, weight }
    }

    fn gw(name: &str, address: &str) -> Gateway {
        Gateway {
            name: name.into(),
            address: address.into(),
            transport: "udp".into(),
            local_ip: String::new(),
            inbound_sources: Vec::new(),
            username: String::new(),
            password: String::new(),
        }
    }

    #[test]
    fn numbers_become_e164_under_the_callers_dialing_plan() {
        let plan = uk();
        assert_eq!(normalize("02079460000", Some(&plan)).as_deref(), Some("+442079460000"));
        assert_eq!(normalize("020 7946-0000", Some(&plan)).as_deref(), Some("+442079460000"));
        assert_eq!(normalize("0033142278186", Some(&plan)).as_deref(), Some("+33142278186"));
        assert_eq!(normalize("+33142278186", None).as_deref(), Some("+33142278186"));
        assert_eq!(normalize("+33 1 42 27 81 86", Some(&plan)).as_deref(), Some("+33142278186"));
        // Not numbers for a trunk: users, extensions, short codes, junk.
        for dialed in [
            "alice",
            "1001",
            "112",
            "0",
            "00",
            "+123",
            "+1234567890123456",
            "+0441234567",
            "0044",
            "00+4420",
            "020\u{0}7946",
            "٠٢٠٧٩٤٦٠٠٠٠",
        ] {
            assert_eq!(normalize(dialed, Some(&plan)), None, "{dialed:?}");
        }
        assert_eq!(
            normalize("02079460000", None),
            None,
            "no plan: national numbers are not guessed"
        );
    }

    #[test]
    fn the_longest_prefix_wins_then_priority_then_weight() {
        let routes = [
            route("", "any", 0, 1),
            route("44", "uk-a", 0, 1),
            route("+44", "uk-b", 0, 3),
            route("44", "uk-backup", 5, 1),
            route("4420", "london", 1, 1),
        ];
        assert_eq!(hunt("+442079460000", &routes, 0), ["london"]);
        assert_eq!(hunt("+33142278186", &routes, 7), ["any"]);
        let first: std::collections::HashMap<&str, usize> = (0..4000u64)
            .map(|d| hunt("+441612345678", &routes, d)[0])
            .fold(Default::default(), |mut m, g| {
                *m.entry(g).or_default() += 1;
                m
            });
        // Weights 1 and 3: about a quarter of calls try uk-a first.
        assert!((800..1200).contains(&first["uk-a"]), "{first:?}");
        assert_eq!(first.len(), 2, "the backup is never first: {first:?}");
        for d in [0, 1, 2, 3, u64::MAX] {
            let h = hunt("+441612345678", &routes, d);
            assert_eq!(h.len(), 3, "{h:?}");
            assert_eq!(h[2], "uk-backup", "priority 5 comes last");
        }
        assert!(hunt("+33142278186", &routes[1..], 0).is_empty(), "no route");
        let twice = [route("1", "a", 0, 1), route("1", "a", 1, 1)];
        assert_eq!(hunt("+15551234567", &twice, 0), ["a"]);
    }

    #[test]
    fn only_trunk_failures_fail_over() {
        for s in [408, 500, 502, 503, 504, 599] {
            assert!(fails_over(s), "{s}");
        }
        for s in [400, 403, 404, 480, 484, 486, 487, 600, 603, 200] {
            assert!(!fails_over(s), "{s}");
        }
    }

    #[test]
    fn bad_trunk_configuration_names_the_key() {
        let plans = [uk()];
        let ok = [gw("a", "127.0.0.9:5060")];
        assert_eq!(validate(&ok, &[route("44", "a", 0, 1)], &plans), Ok(()));
        type Case = (Vec<Gateway>, Vec<Route>, Vec<DialingPlan>, &'static str);
        let cases: Vec<Case> = vec![
            (vec![gw("a b", "127.0.0.9:5060")], vec![], vec![], "gateways[0].name"),
            (vec![gw("a", "trunk.example:5060")], vec![], vec![], "gateways[0].address"),
            (vec![gw("a", "0.0.0.0:5060")], vec![], vec![], "gateways[0].address"),
            (vec![gw("a", "127.0.0.9:0")], vec![], vec![], "gateways[0].address"),
            (vec![gw("a", "127.0.0.9")], vec![], vec![], "gateways[0].address"),
            (
                vec![Gateway { transport: "sctp".into(), ..gw("a", "127.0.0.9:5060") }],
                vec![],
                vec![],
                "gateways[0].transport",
            ),
            (
                vec![Gateway { local_ip: "x".into(), ..gw("a", "127.0.0.9:5060") }],
                vec![],
                vec![],
                "gateways[0].local_ip",
            ),
            (
                vec![gw("a", "127.0.0.9:5060"), gw("a", "127.0.0.8:5060")],
                vec![],
                vec![],
                "gateways[1].name",
            ),
            (ok.to_vec(), vec![route("44x", "a", 0, 1)], vec![], "routes[0].prefix"),
            (ok.to_vec(), vec![route("1234567890123456", "a", 0, 1)], vec![], "routes[0].prefix"),
            (ok.to_vec(), vec![route("44", "b", 0, 1)], vec![], "routes[0].gateway"),
            (ok.to_vec(), vec![route("44", "a", 0, 0)], vec![], "routes[0].weight"),
            (vec![], vec![], vec![DialingPlan { ip: "x".into(), ..uk() }], "dialing_plans[0].ip"),
            (
                vec![],
                vec![],
                vec![DialingPlan { country_code: "0".into(), ..uk() }],
                "dialing_plans[0].country_code",
            ),
            (
                vec![],
                vec![],
                vec![DialingPlan { country_code: "1234".into(), ..uk() }],
                "dialing_plans[0].country_code",
            ),
            (
                vec![],
                vec![],
                vec![DialingPlan { international_prefix: "".into(), ..uk() }],
                "dialing_plans[0].international_prefix",
            ),
            (
                vec![],
                vec![],
                vec![DialingPlan { national_prefix: "00".into(), ..uk() }],
                "dialing_plans[0].national_prefix",
            ),
            (vec![], vec![], vec![uk(), uk()], "dialing_plans[1].ip"),
        ];
        for (g, r, p, key) in cases {
            let got = validate(&g, &r, &p);
            assert_eq!(got.as_ref().map_err(|(k, _)| k.as_str()), Err(key), "{got:?}");
        }
    }

    #[test]
    fn request_uris_carry_the_number_and_the_transport() {
        assert_eq!(gw("a", "127.0.0.9:5060").request_uri("+4420"), "sip:+4420@127.0.0.9:5060");
        let tcp = Gateway { transport: "tcp".into(), ..gw("a", "[::1]:5070") };
        assert_eq!(tcp.request_uri("+4420"), "sip:+4420@[::1]:5070;transport=tcp");
    }

    #[test]
    fn only_a_trunks_own_addresses_are_trusted() {
        let a = Gateway {
            inbound_sources: vec!["203.0.113.0/28".into()],
            ..gw("a", "198.51.100.9:5060")
        };
        let gws = [a, gw("b", "[2001:db8::9]:5060")];
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(trusted_trunk(&gws, ip("198.51.100.9")).map(|g| g.name.as_str()), Some("a"));
        assert_eq!(trusted_trunk(&gws, ip("203.0.113.15")).map(|g| g.name.as_str()), Some("a"));
        assert_eq!(trusted_trunk(&gws, ip("2001:db8::9")).map(|g| g.name.as_str()), Some("b"));
        for other in ["198.51.100.10", "203.0.113.16", "2001:db8::a", "127.0.0.1"] {
            assert!(trusted_trunk(&gws, ip(other)).is_none(), "{other}");
        }
    }
}

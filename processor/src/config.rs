//! Processor configuration: defaults ← TOML file (`[processor]` table) ← `SIPALIAS_PROCESSOR__*`.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use sipmsg::net::Net;

use crate::error::Error;

/// Everything a processor reads at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessorConfig {
    /// Cluster-unique processor id (routing token): 1–32 of `[A-Za-z0-9-]`.
    pub id: String,
    /// Dispatcher edge URLs to dial in to (`http://ip:port`).
    pub dispatchers: Vec<String>,
    /// Billing service URL.
    pub billing_url: String,
    /// Milliseconds to wait for billing before treating it as down.
    pub billing_timeout_ms: u64,
    /// Redis URL (`redis://`, `redis+unix://`).
    pub redis_url: String,
    /// Prefix of every Redis key.
    pub key_prefix: String,
    /// Cluster secret for stateless nonces; every processor must share it.
    pub auth_secret: String,
    /// The cluster's link secret, presented on every edge link and billing call
    /// ([`sipalias_proto::link_auth`]); it must equal the dispatchers' and billing's
    /// `link_secret`. Empty: none presented (only dispatchers and billing on loopback accept
    /// that).
    pub link_secret: String,
    /// Seconds a nonce stays fresh; older ones get `stale=true`.
    pub nonce_ttl_secs: u64,
    /// Shortest registration accepted (`423` below it).
    pub min_expires: u32,
    /// Longest registration granted (longer requests are shortened).
    pub max_expires: u32,
    /// Registration interval when the phone names none.
    pub default_expires: u32,
    /// Most bindings one AOR may have; a REGISTER that would add more gets `403 Too Many
    /// Contacts` (refreshes and removals always pass). 0 = no limit.
    pub max_contacts: u32,
    /// RFC 3261 T1 in milliseconds (round-trip estimate).
    pub t1_ms: u64,
    /// RFC 3261 T2 in milliseconds (retransmission cap).
    pub t2_ms: u64,
    /// RFC 3261 T4 in milliseconds (network lifetime of a message).
    pub t4_ms: u64,
    /// Seconds given in `Retry-After` when Redis or billing is down.
    pub retry_after_secs: u32,
    /// Digest algorithms offered in challenges and accepted, most preferred first (`MD5`,
    /// `SHA-256`), on every IP whose dispatcher entry names none of its own. MD5 alone by
    /// default: many deployed phones (baresip/libre, sipp) give up when a 401/407 carries more
    /// than one challenge, instead of taking the first they support as RFC 8760 asks.
    pub digest_algorithms: Vec<String>,
    /// What the `uri` of digest credentials must name: `request-uri` (the Request-URI, RFC
    /// 3261 §22.4) or `request-uri-or-socket` (also the plain URI of the socket the request
    /// came in on, `sip:ip:port`, which sipp sends by default; such credentials name no callee
    /// and are only protected against replay by their one-use nonce-count).
    pub digest_uri_check: DigestUriCheck,
    /// How to reach registered phones: `detect` (source address when NAT is detected, else the
    /// Contact), `always` (always the source address) or `never` (always the Contact).
    pub nat_mode: crate::registrar::NatMode,
    /// What a new call gets when billing does not answer within `billing_timeout_ms`:
    /// `reject` (`503` + `Retry-After`) or `allow` (connect, if the caller is recognised without
    /// billing, limited to `billing_outage_max_duration_secs`).
    pub billing_outage: BillingOutage,
    /// Longest call allowed while billing is down under `billing_outage = "allow"`.
    pub billing_outage_max_duration_secs: u32,
    /// Seconds between NAT keepalives to each binding; 0 disables them.
    pub keepalive_interval_secs: u32,
    /// How UDP bindings are pinged: `options` (an OPTIONS request, whose silence is noticed)
    /// or `crlf` (a double-CRLF packet). Stream bindings always get CRLF over their connection.
    pub keepalive_method: KeepaliveMethod,
    /// Remove a binding after this many unanswered OPTIONS in a row; 0 never removes.
    pub keepalive_max_failures: u32,
    /// On SIGTERM, how long to wait for registrations and calls in setup to finish before
    /// exiting (answered calls stay in Redis for the other processors).
    pub drain_timeout_secs: u32,
    /// Runtime threads: 1 (default) runs the processor on one thread, which measured cheapest
    /// per call (no cross-thread wake-ups; the core is behind one lock anyway). A host with more
    /// cores runs more processor replicas. 0 = one thread per core.
    pub worker_threads: usize,
    /// RFC 3261 §16.6 step 11's Timer C: a callee that has answered only provisionally for this
    /// long (each provisional restarts it) is cancelled and the caller gets `408`. Must exceed
    /// 3 minutes.
    pub timer_c_secs: u32,
    /// Longest a call may ring in all, from the first INVITE sent to the callee, before it is
    /// cancelled with `408` to the caller; 0 = only Timer C limits ringing.
    pub no_answer_timeout_secs: u32,
    /// Callers allowed to make the callee's phone answer by itself (intercom/paging): their
    /// `Call-Info ...;answer-after=`, `Alert-Info ...;info=alert-autoanswer`, `Answer-Mode` and
    /// `Priv-Answer-Mode` (RFC 5373) reach the callee; everyone else's are removed. Each entry
    /// is an AOR (`user@domain`), a source IP or a CIDR (`192.0.2.0/24`). Default: nobody.
    pub trusted_auto_answer: Vec<String>,
    /// Networks (CIDRs) a REGISTER's Contact may not point into; `403 Contact Not Allowed`.
    /// The cluster's own services (its Redis, billing and dispatcher edges, from the URLs
    /// above) and SIP IPs are always refused too. Default: unspecified, multicast, broadcast
    /// and link-local addresses.
    pub contact_deny_networks: Vec<String>,
    /// Failed digest authentications a source (an IP; a /64 for IPv6) may make within a
    /// minute, across the cluster, before it is banned; 0 = never ban.
    pub auth_failures_per_minute: u32,
    /// How long a ban lasts: the source's requests get `403` without a challenge.
    pub ban_secs: u32,
    /// Requests whose `User-Agent` contains one of these (any case) are dropped without an
    /// answer: known SIP scanners.
    pub scanner_user_agents: Vec<String>,
    /// Server transactions held at which new INVITEs and REGISTERs get `503` + `Retry-After`
    /// (sent statelessly); requests within calls, ACK, CANCEL and responses still pass. Bounds
    /// the processor's memory: a transaction holds its request and last response (≈ 2 KB).
    pub max_server_transactions: usize,
    /// Registrations and call setups waiting on Redis or billing at which new INVITEs and
    /// REGISTERs get `503` + `Retry-After`: a slow Redis or billing cannot pile up work. As
    /// many other lookups (stored calls, keepalive outcomes) may run besides.
    pub max_setup_in_flight: usize,
    /// `ip:port` of the operations listener (`/metrics`, `/healthz`, `/readyz`); empty (the
    /// default) opens none. Meant for a private address: it has no authentication.
    pub metrics_listen: String,
    /// With `metrics_listen`: how often the registrations per IP (`sipalias_bindings`, the
    /// migration gauge) are counted, in seconds; one processor of the cluster counts, every
    /// processor reports. 0 = never.
    pub binding_stats_secs: u32,
    /// `text` (default) or `json` log lines.
    pub log_format: sipalias_startup::LogFormat,
    /// Log filter (`RUST_LOG` syntax, default `info`); `RUST_LOG` overrides it at start, and
    /// SIGHUP re-reads it from the file.
    pub log_level: String,
    /// SIP trunks to the PSTN (`[[processor.gateways]]`, default none): where calls to numbers
    /// that are no subscriber of the cluster go, chosen by `routes`.
    pub gateways: Vec<crate::routing::Gateway>,
    /// Which gateways numbers go through, by longest prefix, priority and weight
    /// (`[[processor.routes]]`, default none: numbers that are no subscriber get `404`).
    pub routes: Vec<crate::routing::Route>,
    /// How the phones behind each local IP dial national and international numbers
    /// (`[[processor.dialing_plans]]`, default none: only `+` numbers are routed).
    pub dialing_plans: Vec<crate::routing::DialingPlan>,
}

/// Longest `ban_secs` accepted: a week (a longer one belongs in a firewall).
pub const MAX_BAN_SECS: u32 = 7 * 86_400;

/// Shortest `timer_c_secs` accepted: RFC 3261 §16.6 asks for more than 3 minutes.
pub const MIN_TIMER_C_SECS: u32 = 181;
/// Longest `timer_c_secs` and `no_answer_timeout_secs` accepted: a day. Ringing longer is a
/// leak, and the bound keeps deadline arithmetic far from overflow.
pub const MAX_RING_SECS: u32 = 86_400;

/// What the digest `uri` must name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DigestUriCheck {
    /// The Request-URI only.
    RequestUri,
    /// The Request-URI, or the local socket's own URI.
    RequestUriOrSocket,
}

/// How UDP bindings are pinged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeepaliveMethod {
    /// `OPTIONS` request.
    Options,
    /// Double CRLF.
    Crlf,
}

/// Call policy while billing is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BillingOutage {
    /// Refuse new calls with `503` + `Retry-After`.
    Reject,
    /// Let callers recognised from a live registration (same account, same source address and
    /// socket as their binding) call, with a capped duration.
    Allow,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        ProcessorConfig {
            id: "p1".into(),
            dispatchers: vec!["http://127.0.0.1:7070".into()],
            billing_url: "http://127.0.0.1:7080".into(),
            billing_timeout_ms: 1000,
            redis_url: "redis://127.0.0.1:6379/".into(),
            key_prefix: "sipalias:".into(),
            auth_secret: String::new(),
            link_secret: String::new(),
            nonce_ttl_secs: 300,
            min_expires: 60,
            max_expires: 3600,
            default_expires: 3600,
            max_contacts: 10,
            t1_ms: 500,
            t2_ms: 4000,
            t4_ms: 5000,
            retry_after_secs: 5,
            digest_algorithms: vec!["MD5".into()],
            digest_uri_check: DigestUriCheck::RequestUri,
            worker_threads: 1,
            nat_mode: crate::registrar::NatMode::Detect,
            billing_outage: BillingOutage::Reject,
            billing_outage_max_duration_secs: 3600,
            keepalive_interval_secs: 30,
            keepalive_method: KeepaliveMethod::Options,
            keepalive_max_failures: 0,
            drain_timeout_secs: 30,
            timer_c_secs: 185,
            no_answer_timeout_secs: 0,
            trusted_auto_answer: Vec::new(),
            contact_deny_networks: sipmsg::net::DEFAULT_DENY_NETWORKS.map(String::from).to_vec(),
            auth_failures_per_minute: 10,
            ban_secs: 600,
            scanner_user_agents: sipmsg::scan::KNOWN_SCANNERS.map(String::from).to_vec(),
            max_server_transactions: 200_000,
            max_setup_in_flight: 4096,
            metrics_listen: String::new(),
            binding_stats_secs: 30,
            log_format: sipalias_startup::LogFormat::Text,
            log_level: sipalias_startup::DEFAULT_LOG_LEVEL.to_owned(),
            gateways: Vec::new(),
            routes: Vec::new(),
            dialing_plans: Vec::new(),
        }
    }
}

impl ProcessorConfig {
    /// Loads defaults ← `path` (its `[processor]` table) ← environment, then validates.
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        let mut fig = Figment::new();
        if let Some(p) = path {
            if !p.exists() {
                return Err(Error::Config(format!("config file {} does not exist", p.display())));
            }
            fig = fig.merge(Toml::file(p));
        }
        Self::from_figment(fig.merge(Env::prefixed("SIPALIAS_").split("__")))
    }

    /// Parses a TOML document (tests and examples), then validates.
    pub fn from_toml_str(toml: &str) -> Result<Self, Error> {
        Self::from_figment(Figment::new().merge(Toml::string(toml)))
    }

    fn from_figment(fig: Figment) -> Result<Self, Error> {
        let cfg: ProcessorConfig = Figment::from(Serialized::defaults(ProcessorConfig::default()))
            .merge(fig.focus("processor"))
            .extract()
            .map_err(|e| Error::Config(sipalias_startup::config_error("processor", e)))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |key: &str, why: String| Err(Error::Config(format!("processor.{key}: {why}")));
        if !sipmsg::scan::is_valid_node_id(&self.id) {
            return bad("id", format!("{:?} must be 1-32 characters of [A-Za-z0-9-]", self.id));
        }
        if self.dispatchers.is_empty() {
            return bad("dispatchers", "at least one dispatcher URL is required".into());
        }
        if let Err((key, why)) =
            crate::routing::validate(&self.gateways, &self.routes, &self.dialing_plans)
        {
            return bad(&key, why);
        }
        for (i, d) in self.dispatchers.iter().enumerate() {
            if !(d.starts_with("http://") || d.starts_with("https://")) {
                return bad(&format!("dispatchers[{i}]"), format!("{d:?} is not an http(s) URL"));
            }
        }
        if !(self.billing_url.starts_with("http://") || self.billing_url.starts_with("https://")) {
            return bad("billing_url", format!("{:?} is not an http(s) URL", self.billing_url));
        }
        if let Err(e) = redis::Client::open(self.redis_url.as_str()) {
            return bad("redis_url", format!("{:?}: {e}", self.redis_url));
        }
        if self.key_prefix.is_empty() {
            return bad("key_prefix", "must not be empty".into());
        }
        if let Err(why) = sipalias_ops::parse_listen(&self.metrics_listen) {
            return bad("metrics_listen", why);
        }
        if let Err(why) = sipalias_startup::check_log_level(&self.log_level) {
            return bad("log_level", why);
        }
        if self.binding_stats_secs > 86_400 {
            return bad("binding_stats_secs", "must be at most 86400 (0 = never)".into());
        }
        if self.auth_secret.len() < 16 {
            return bad(
                "auth_secret",
                "must be at least 16 characters, shared by all processors".into(),
            );
        }
        if let Err(why) = sipalias_proto::link_auth::validate(&self.link_secret) {
            return bad("link_secret", why);
        }
        if self.min_expires == 0 || self.min_expires > self.max_expires {
            return bad("min_expires", "must be at least 1 and at most max_expires".into());
        }
        if self.default_expires < self.min_expires || self.default_expires > self.max_expires {
            return bad("default_expires", "must lie between min_expires and max_expires".into());
        }
        if self.t1_ms == 0 || self.t2_ms < self.t1_ms {
            return bad("t1_ms", "must be non-zero and not above t2_ms".into());
        }
        if self.nonce_ttl_secs == 0 {
            return bad("nonce_ttl_secs", "must be non-zero".into());
        }
        if self.digest_algorithms.is_empty() {
            return bad("digest_algorithms", "at least one algorithm is required".into());
        }
        for (i, a) in self.digest_algorithms.iter().enumerate() {
            if sipmsg::digest::Algorithm::parse(a).is_none() {
                return bad(
                    &format!("digest_algorithms[{i}]"),
                    format!("{a:?} is not MD5 or SHA-256"),
                );
            }
        }
        if self.billing_outage == BillingOutage::Allow && self.billing_outage_max_duration_secs == 0
        {
            return bad(
                "billing_outage_max_duration_secs",
                "must be non-zero when billing_outage = \"allow\"".into(),
            );
        }
        if self.billing_timeout_ms == 0 {
            return bad("billing_timeout_ms", "must be non-zero".into());
        }
        if !(MIN_TIMER_C_SECS..=MAX_RING_SECS).contains(&self.timer_c_secs) {
            return bad(
                "timer_c_secs",
                format!(
                    "must be between {MIN_TIMER_C_SECS} (RFC 3261: more than 3 minutes) and \
                     {MAX_RING_SECS}"
                ),
            );
        }
        if self.no_answer_timeout_secs > MAX_RING_SECS {
            return bad("no_answer_timeout_secs", format!("must be at most {MAX_RING_SECS}"));
        }
        if self.max_server_transactions == 0 {
            return bad("max_server_transactions", "must be at least 1".into());
        }
        if self.max_setup_in_flight == 0 {
            return bad("max_setup_in_flight", "must be at least 1".into());
        }
        if self.ban_secs == 0 || self.ban_secs > MAX_BAN_SECS {
            return bad("ban_secs", format!("must be between 1 and {MAX_BAN_SECS}"));
        }
        for (i, ua) in self.scanner_user_agents.iter().enumerate() {
            if ua.trim().is_empty() || ua.chars().any(char::is_control) {
                return bad(
                    &format!("scanner_user_agents[{i}]"),
                    format!("{ua:?} must be non-empty, without control characters"),
                );
            }
        }
        for (i, net) in self.contact_deny_networks.iter().enumerate() {
            if let Err(why) = Net::parse(net) {
                return bad(&format!("contact_deny_networks[{i}]"), format!("{net:?}: {why}"));
            }
        }
        for (i, entry) in self.trusted_auto_answer.iter().enumerate() {
            if let Err(why) = TrustEntry::parse(entry) {
                return bad(&format!("trusted_auto_answer[{i}]"), format!("{entry:?}: {why}"));
            }
        }
        Ok(())
    }

    /// Whether `caller_aor` calling from `source` may send auto-answer headers to the callee
    /// (`trusted_auto_answer`).
    pub fn trusts_auto_answer(&self, caller_aor: &str, source: IpAddr) -> bool {
        self.trusted_auto_answer
            .iter()
            .filter_map(|e| TrustEntry::parse(e).ok())
            .any(|e| e.matches(caller_aor, source))
    }

    /// The dialing plan of callers on local IP `ip`, if one is configured.
    pub fn dialing_plan(&self, ip: IpAddr) -> Option<&crate::routing::DialingPlan> {
        self.dialing_plans.iter().find(|p| p.ip.trim().parse::<IpAddr>().ok() == Some(ip))
    }

    /// The gateway named `name`.
    pub fn gateway(&self, name: &str) -> Option<&crate::routing::Gateway> {
        self.gateways.iter().find(|g| g.name == name)
    }

    /// The digest algorithms to offer, in order (validated at load).
    pub fn algorithms(&self) -> Vec<sipmsg::digest::Algorithm> {
        self.digest_algorithms.iter().filter_map(|a| sipmsg::digest::Algorithm::parse(a)).collect()
    }

    /// The URLs of the cluster's own services this processor talks to (dispatchers, billing,
    /// Redis): where SIP must never be sent.
    pub fn service_urls(&self) -> impl Iterator<Item = &str> {
        self.dispatchers
            .iter()
            .map(String::as_str)
            .chain([self.billing_url.as_str(), self.redis_url.as_str()])
    }

    /// The transaction timers.
    pub fn timers(&self) -> crate::transaction::Timers {
        crate::transaction::Timers {
            t1: Duration::from_millis(self.t1_ms),
            t2: Duration::from_millis(self.t2_ms),
            t4: Duration::from_millis(self.t4_ms),
            timer_c: Duration::from_secs(u64::from(self.timer_c_secs)),
            no_answer: (self.no_answer_timeout_secs > 0)
                .then(|| Duration::from_secs(u64::from(self.no_answer_timeout_secs))),
        }
    }

    /// The bounds on held work.
    pub fn limits(&self) -> crate::core::Limits {
        crate::core::Limits {
            max_server_transactions: self.max_server_transactions,
            max_setup_in_flight: self.max_setup_in_flight,
            retry_after_secs: self.retry_after_secs,
        }
    }
}

/// One entry of `trusted_auto_answer`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TrustEntry {
    /// An authenticated caller, `user@domain` (domain compared without case).
    Aor(String, String),
    /// Sources in a network.
    Net(Net),
}

impl TrustEntry {
    fn parse(s: &str) -> Result<Self, &'static str> {
        if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("must be non-empty, without whitespace or control characters");
        }
        if let Some((user, domain)) = s.split_once('@') {
            if user.is_empty() || domain.is_empty() || domain.contains('@') {
                return Err("an AOR is user@domain");
            }
            return Ok(TrustEntry::Aor(user.to_owned(), domain.to_ascii_lowercase()));
        }
        Ok(TrustEntry::Net(Net::parse(s)?))
    }

    fn matches(&self, caller_aor: &str, source: IpAddr) -> bool {
        match self {
            TrustEntry::Aor(user, domain) => caller_aor
                .split_once('@')
                .is_some_and(|(u, d)| u == user && d.eq_ignore_ascii_case(domain)),
            TrustEntry::Net(net) => net.contains(source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_local_config_is_valid() {
        let cfg = ProcessorConfig::from_toml_str(include_str!("../../deploy/local.toml"))
            .expect("deploy/local.toml");
        assert_eq!(cfg.id, "p1");
        assert_eq!(cfg.dispatchers, vec!["http://127.0.0.1:7070".to_owned()]);
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        let err = ProcessorConfig::from_toml_str(
            "[processor]\nauth_secret='0123456789abcdef'\nbogus_key=1\n",
        )
        .expect_err("unknown key");
        assert!(err.to_string().contains("bogus_key"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (toml, key) in [
            ("id='a.b'", "processor.id"),
            ("dispatchers=[]", "processor.dispatchers"),
            ("dispatchers=['127.0.0.1:7070']", "processor.dispatchers[0]"),
            ("redis_url='nope://x'", "processor.redis_url"),
            ("auth_secret='short'", "processor.auth_secret"),
            ("min_expires=7200", "processor.min_expires"),
            ("t1_ms=0", "processor.t1_ms"),
            ("digest_algorithms=['MD5','SHA-512']", "processor.digest_algorithms[1]"),
            ("billing_outage='maybe'", "billing_outage"),
            ("timer_c_secs=180", "processor.timer_c_secs"),
            ("timer_c_secs=86401", "processor.timer_c_secs"),
            ("timer_c_secs=-1", "timer_c_secs"),
            ("no_answer_timeout_secs=4294967295", "processor.no_answer_timeout_secs"),
            ("digest_uri_check='anything'", "digest_uri_check"),
            ("trusted_auto_answer=['10.0.0.0/33']", "processor.trusted_auto_answer[0]"),
            ("trusted_auto_answer=['ok@d', '']", "processor.trusted_auto_answer[1]"),
            ("trusted_auto_answer=['@d']", "processor.trusted_auto_answer[0]"),
            ("trusted_auto_answer=['a@b@c']", "processor.trusted_auto_answer[0]"),
            ("trusted_auto_answer=['x y@d']", "processor.trusted_auto_answer[0]"),
            ("trusted_auto_answer=[\"a@d\\r\\nX: 1\"]", "processor.trusted_auto_answer[0]"),
            ("trusted_auto_answer=['not-an-ip']", "processor.trusted_auto_answer[0]"),
            (
                "contact_deny_networks=['10.0.0.0/8', '10.0.0.0/40']",
                "processor.contact_deny_networks[1]",
            ),
            ("contact_deny_networks=['']", "processor.contact_deny_networks[0]"),
            ("max_contacts=-1", "max_contacts"),
            ("ban_secs=0", "processor.ban_secs"),
            ("scanner_user_agents=['ok', ' ']", "processor.scanner_user_agents[1]"),
            ("scanner_user_agents=[\"a\\u0000b\"]", "processor.scanner_user_agents[0]"),
            ("ban_secs=604801", "processor.ban_secs"),
            ("max_server_transactions=0", "processor.max_server_transactions"),
            ("max_server_transactions=-5", "max_server_transactions"),
            ("max_setup_in_flight=0", "processor.max_setup_in_flight"),
            ("metrics_listen='9090'", "processor.metrics_listen"),
            ("metrics_listen='localhost:9090'", "processor.metrics_listen"),
            ("metrics_listen='127.0.0.1:65536'", "processor.metrics_listen"),
            ("metrics_listen=9090", "metrics_listen"),
            ("log_format='xml'", "log_format"),
            ("binding_stats_secs=86401", "processor.binding_stats_secs"),
            ("binding_stats_secs=-1", "binding_stats_secs"),
            ("log_level='sipalias=loud'", "processor.log_level"),
            ("log_level=\"info\\nX\"", "processor.log_level"),
            ("link_secret='short'", "processor.link_secret"),
            ("link_secret=\"0123456789abcdef\\r\\nX: 1\"", "processor.link_secret"),
            ("auth_failures_per_minute='many'", "auth_failures_per_minute"),
            (
                "billing_outage='allow'\nbilling_outage_max_duration_secs=0",
                "processor.billing_outage_max_duration_secs",
            ),
        ] {
            let secret = if toml.starts_with("auth_secret") {
                ""
            } else {
                "auth_secret='0123456789abcdef'\n"
            };
            let doc = format!("[processor]\n{secret}{toml}\n");
            let err = ProcessorConfig::from_toml_str(&doc).expect_err(toml);
            assert!(err.to_string().contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn trusted_auto_answer_matches_aors_ips_and_networks() {
        let cfg = ProcessorConfig {
            trusted_auto_answer: vec![
                "intercom@Sip.Example.net".into(),
                "192.0.2.0/24".into(),
                "2001:db8::1".into(),
            ],
            ..ProcessorConfig::default()
        };
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(cfg.trusts_auto_answer("intercom@sip.example.net", ip("203.0.113.9")));
        assert!(!cfg.trusts_auto_answer("Intercom@sip.example.net", ip("203.0.113.9")));
        assert!(!cfg.trusts_auto_answer("intercom@other.example", ip("203.0.113.9")));
        assert!(cfg.trusts_auto_answer("anyone@d", ip("192.0.2.77")));
        assert!(cfg.trusts_auto_answer("anyone@d", ip("::ffff:192.0.2.77")));
        assert!(!cfg.trusts_auto_answer("anyone@d", ip("192.0.3.1")));
        assert!(cfg.trusts_auto_answer("anyone@d", ip("2001:db8::1")));
        assert!(!cfg.trusts_auto_answer("anyone@d", ip("2001:db8::2")));
        assert!(!ProcessorConfig::default().trusts_auto_answer("a@d", ip("127.0.0.1")));
        let all = ProcessorConfig { trusted_auto_answer: vec!["0.0.0.0/0".into()], ..cfg };
        assert!(all.trusts_auto_answer("a@d", ip("198.51.100.1")));
    }

    #[test]
    fn environment_overrides_the_file() {
        #[allow(clippy::result_large_err)]
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[processor]\nid='p1'\nauth_secret='0123456789abcdef'\n")?;
            jail.set_env("SIPALIAS_PROCESSOR__ID", "p7");
            let cfg =
                ProcessorConfig::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(cfg.id, "p7");
            Ok(())
        });
    }
}

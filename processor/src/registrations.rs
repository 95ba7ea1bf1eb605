//! The operator's view of registrations (`sipalias-processor registrations`, `kick`): which
//! bindings to show and how, and how many phones each IP still serves — the migration gauge.
//! Pure: the caller reads the bindings from Redis ([`crate::location::Location::scan`]).

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::registrar::Binding;

/// The Redis hash where processors record each dispatcher's announced sockets (field: the
/// dispatcher id, value: a JSON array of `ip:port/transport`).
pub fn sockets_key(prefix: &str) -> String {
    format!("{prefix}sockets")
}

/// Which bindings to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this AOR (exact, `user@domain`).
    pub aor: Option<String>,
    /// Only bindings made through this local IP (an alias, or the main IP).
    pub ip: Option<IpAddr>,
    /// Only phones whose User-Agent contains this (any case).
    pub user_agent: Option<String>,
    /// Only bindings made through a socket no dispatcher serves any more (an alias or port
    /// removed at runtime): phones that get no call until they register elsewhere.
    pub removed: bool,
}

/// The sockets the dispatchers serve now, as processors recorded them in Redis
/// ([`sockets_key`]); `None` when none was recorded (no processor has linked yet).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Served(pub Option<std::collections::HashSet<String>>);

impl Served {
    /// Reads the recorded hash: one JSON array of `ip:port/transport` per dispatcher; a value
    /// that is not such an array is skipped.
    pub fn from_recorded<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut all = None::<std::collections::HashSet<String>>;
        for value in values {
            if let Ok(list) = serde_json::from_str::<Vec<String>>(value) {
                all.get_or_insert_default().extend(list);
            }
        }
        Served(all)
    }

    /// `served`, `removed`, or `unknown`, for the binding `b`.
    pub fn state(&self, b: &Binding) -> &'static str {
        match &self.0 {
            None => "unknown",
            Some(set) if set.contains(&b.ingress.local().to_string()) => "served",
            Some(_) => "removed",
        }
    }
}

impl Filter {
    /// Whether `b` of `aor` is shown.
    pub fn matches(&self, aor: &str, b: &Binding, served: &Served) -> bool {
        (!self.removed || served.state(b) == "removed")
            && self.aor.as_deref().is_none_or(|a| a == aor)
            && self.ip.is_none_or(|ip| b.ingress.ip == ip)
            && self.user_agent.as_deref().is_none_or(|ua| {
                b.user_agent.to_ascii_lowercase().contains(&ua.to_ascii_lowercase())
            })
    }
}

/// One binding as listed, with what an operator looks for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Listed {
    /// The AOR.
    pub aor: String,
    /// The Contact.
    pub contact: String,
    /// The socket it registered through (`ip:port/transport`).
    pub ingress: String,
    /// Whether a dispatcher still serves that socket: `served`, `removed` (an alias or port
    /// taken out of the configuration: the phone gets no call), or `unknown`.
    pub socket: &'static str,
    /// Where the REGISTER came from.
    pub received: String,
    /// Seconds until it expires.
    pub expires_in_secs: u64,
    /// User-Agent.
    pub user_agent: String,
    /// The dispatcher that received it.
    pub dispatcher: String,
}

impl Listed {
    /// `b` of `aor` at `now_ms`.
    pub fn new(aor: &str, b: &Binding, now_ms: u64, served: &Served) -> Self {
        Listed {
            aor: aor.to_owned(),
            contact: b.contact.clone(),
            ingress: b.ingress.local().to_string(),
            socket: served.state(b),
            received: b.received.to_string(),
            expires_in_secs: b.expires_at_ms.saturating_sub(now_ms) / 1000,
            user_agent: b.user_agent.clone(),
            dispatcher: b.dispatcher.clone(),
        }
    }
}

/// A fixed-width table of `rows`; text a phone sent (Contact, User-Agent) has its control
/// characters replaced, so it cannot rewrite the operator's terminal.
pub fn table(rows: &[Listed]) -> String {
    let clean =
        |s: &str| s.chars().map(|c| if c.is_control() { '?' } else { c }).collect::<String>();
    let mut out = format!(
        "{:<32} {:<24} {:<8} {:<22} {:>7}  {:<24} {}\n",
        "AOR", "INGRESS", "SOCKET", "RECEIVED", "EXPIRES", "USER-AGENT", "CONTACT"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<32} {:<24} {:<8} {:<22} {:>6}s  {:<24} {}\n",
            clean(&r.aor),
            r.ingress,
            r.socket,
            r.received,
            r.expires_in_secs,
            clean(&r.user_agent),
            clean(&r.contact)
        ));
    }
    out
}

/// Live bindings per local IP they were made through.
pub fn per_ip<'a>(bindings: impl IntoIterator<Item = &'a Binding>) -> BTreeMap<IpAddr, u64> {
    let mut counts = BTreeMap::new();
    for b in bindings {
        *counts.entry(b.ingress.ip).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registrar::StoredIngress;
    use crate::transport::Transport;

    fn binding(ip: [u8; 4], ua: &str, contact: &str) -> Binding {
        Binding {
            contact: contact.into(),
            expires_at_ms: 61_000,
            q: None,
            call_id: "c".into(),
            cseq: 1,
            received: "192.0.2.7:5062".parse().expect("addr"),
            ingress: StoredIngress { ip: ip.into(), port: 5060, transport: Transport::Udp },
            connection_id: 0,
            dispatcher: "d1".into(),
            user_agent: ua.into(),
            instance: None,
            reg_id: None,
            nat: true,
        }
    }

    #[test]
    fn filters_combine_and_user_agents_match_in_any_case() {
        let yealink = binding([127, 0, 0, 2], "Yealink SIP-T46S 66.86", "sip:a@192.0.2.7");
        let snom = binding([127, 0, 0, 1], "snom720/10.1", "sip:b@192.0.2.8");
        let any = Served::default();
        let by_ip = Filter { ip: Some([127, 0, 0, 2].into()), ..Filter::default() };
        assert!(by_ip.matches("a@x", &yealink, &any) && !by_ip.matches("b@x", &snom, &any));
        let by_ua = Filter { user_agent: Some("YEALINK".into()), ..Filter::default() };
        assert!(by_ua.matches("a@x", &yealink, &any) && !by_ua.matches("b@x", &snom, &any));
        let both = Filter { aor: Some("a@x".into()), ..by_ip };
        assert!(both.matches("a@x", &yealink, &any) && !both.matches("c@x", &yealink, &any));
        assert!(Filter::default().matches("b@x", &snom, &any));
        assert_eq!(
            per_ip([&yealink, &snom, &yealink]).into_iter().collect::<Vec<_>>(),
            [([127, 0, 0, 1].into(), 1), ([127, 0, 0, 2].into(), 2)]
        );
    }

    #[test]
    fn the_table_shows_expiry_and_cannot_carry_terminal_escapes() {
        let hostile = binding([127, 0, 0, 2], "evil\u{1b}[2J\r\nX", "sip:a@192.0.2.7");
        let t = table(&[Listed::new("a@sip.example.net", &hostile, 1_000, &Served::default())]);
        assert!(t.contains("127.0.0.2:5060/udp") && t.contains("60s"), "{t}");
        assert!(!t.contains('\u{1b}') && t.lines().count() == 2, "{t:?}");
    }

    #[test]
    fn bindings_through_a_removed_socket_are_told_apart() {
        let kept = binding([127, 0, 0, 2], "a", "sip:a@192.0.2.7");
        let gone = binding([127, 0, 0, 3], "b", "sip:b@192.0.2.8");
        let served = Served::from_recorded([
            r#"["127.0.0.1:5060/udp","127.0.0.2:5060/udp"]"#,
            "not json",
            r#"{"127.0.0.3:5060/udp": true}"#,
        ]);
        assert_eq!(served.state(&kept), "served");
        assert_eq!(served.state(&gone), "removed");
        assert_eq!(Served::from_recorded([]).state(&gone), "unknown", "nothing recorded");
        assert_eq!(Served::from_recorded(["junk"]).state(&gone), "unknown");
        let removed = Filter { removed: true, ..Filter::default() };
        assert!(removed.matches("b@x", &gone, &served) && !removed.matches("a@x", &kept, &served));
        assert!(!removed.matches("b@x", &gone, &Served::default()), "unknown is not removed");
        let t = table(&[Listed::new("b@x", &gone, 1_000, &served)]);
        assert!(t.contains("127.0.0.3:5060/udp       removed"), "{t}");
    }
}

//! Registrar logic of RFC 3261 §10.3, free of I/O: what a REGISTER asks for, and the `200`
//! that lists the bindings afterwards. The atomic read-check-write lives in [`crate::location`].

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use sipmsg::SipMessage;

use crate::answer::{Answer, FORBIDDEN};
use crate::destination::Denied;
use crate::transport::{Egress, LocalAddr, Transport};

/// Where a binding's phone is reached: the socket it registered through. Stored as
/// `{"ip":"127.0.0.2","port":5060,"transport":"udp"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredIngress {
    /// Local IP (main or alias).
    pub ip: IpAddr,
    /// Local port.
    pub port: u16,
    /// `udp`, `tcp` or `tls`.
    pub transport: Transport,
}

impl StoredIngress {
    /// The socket as a typed local address.
    pub fn local(self) -> LocalAddr {
        LocalAddr { addr: SocketAddr::new(self.ip, self.port), transport: self.transport }
    }
}

impl From<LocalAddr> for StoredIngress {
    fn from(l: LocalAddr) -> Self {
        StoredIngress { ip: l.addr.ip(), port: l.addr.port(), transport: l.transport }
    }
}

/// One registered contact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// Contact URI.
    pub contact: String,
    /// Expiry, Unix milliseconds.
    pub expires_at_ms: u64,
    /// `q` value, if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q: Option<String>,
    /// Call-ID of the REGISTER that wrote it.
    pub call_id: String,
    /// CSeq of the REGISTER that wrote it.
    pub cseq: u32,
    /// Source address of the REGISTER (stored as `ip:port`, `[v6]:port`): where requests to
    /// the phone are sent.
    pub received: SocketAddr,
    /// The socket it registered through.
    pub ingress: StoredIngress,
    /// Stream connection id (0 for UDP).
    #[serde(default)]
    pub connection_id: u64,
    /// Dispatcher that received the REGISTER.
    pub dispatcher: String,
    /// User-Agent header, if any.
    #[serde(default)]
    pub user_agent: String,
    /// `+sip.instance`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// `reg-id`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reg_id: Option<u32>,
    /// Behind NAT: requests go to `received`, otherwise to the Contact's address.
    #[serde(default)]
    pub nat: bool,
}

impl Binding {
    /// How to send a request to this phone: from the socket it registered through (DESIGN.md
    /// rule 2), to the address its REGISTER came from when it is behind NAT, else its Contact.
    pub fn egress(&self) -> Option<Egress> {
        let local = self.ingress.local();
        let (received, transport) = (self.received, local.transport);
        // Over a stream the live connection is used whatever the address; the address only
        // matters for reconnecting, and a phone listens on its Contact, not on the ephemeral
        // port it connected from.
        let remote = if self.nat && transport == Transport::Udp {
            received
        } else {
            contact_addr(&self.contact).unwrap_or(received)
        };
        Some(Egress {
            local,
            remote,
            connection_id: self.connection_id,
            dispatcher_id: self.dispatcher.clone(),
            // RFC 5626: a registration with reg-id and +sip.instance names its flow.
            flow_only: transport != Transport::Udp
                && self.reg_id.is_some()
                && self.instance.is_some(),
        })
    }
}

/// Registration interval limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Shortest interval accepted; shorter non-zero ones get `423`.
    pub min: u32,
    /// Longest interval granted; longer ones are shortened.
    pub max: u32,
    /// Interval when the phone names none.
    pub default: u32,
}

/// One contact of a REGISTER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactUpdate {
    /// Hash field identifying the binding: the Contact URI as written.
    pub field: String,
    /// Contact URI.
    pub contact: String,
    /// Granted interval in seconds; 0 removes the binding.
    pub expires: u32,
    /// `q` parameter, if any.
    pub q: Option<String>,
    /// `+sip.instance` (RFC 5626), if any.
    pub instance: Option<String>,
    /// `reg-id` (RFC 5626), if any.
    pub reg_id: Option<u32>,
    /// The phone is behind NAT: reach it at the REGISTER's source address, not its Contact.
    pub nat: bool,
}

/// How the registrar decides whether a phone is behind NAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NatMode {
    /// NAT when the top Via sent-by differs from the source address, or the Contact names a
    /// private address that is not the source (what Kamailio's `nat_uac_test` checks).
    Detect,
    /// Always send to the source address of the REGISTER.
    Always,
    /// Always send to the Contact.
    Never,
}

/// Whether requests to this contact must go to the REGISTER's source address.
pub fn behind_nat(mode: NatMode, req: &SipMessage, contact: &str, source: SocketAddr) -> bool {
    match mode {
        NatMode::Always => return true,
        NatMode::Never => return false,
        NatMode::Detect => {}
    }
    let Some(target) = contact_addr(contact) else { return true };
    if let Ok(via) = req.top_via() {
        let sent_by: Option<IpAddr> = via.host.trim_matches(['[', ']']).parse().ok();
        let port = via.port.unwrap_or(5060);
        if sent_by != Some(source.ip()) || port != source.port() {
            return true;
        }
    }
    is_private(target.ip()) && target.ip() != source.ip()
}

/// The address a Contact URI names, when its host is an IP literal.
pub fn contact_addr(contact: &str) -> Option<SocketAddr> {
    let uri = sipmsg::Uri::parse(contact).ok()?;
    let ip: IpAddr = uri.host.trim_matches(['[', ']']).parse().ok()?;
    let default =
        if uri.scheme == "sips" || uri.param("transport") == Some("tls") { 5061 } else { 5060 };
    Some(SocketAddr::new(ip, uri.port.unwrap_or(default)))
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private() || (o[0] == 100 && (64..128).contains(&o[1])) || v4.is_link_local()
        }
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// What a REGISTER asks the location store to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// No Contact: just list the bindings.
    Fetch,
    /// `Contact: *` with `Expires: 0`: remove every binding.
    RemoveAll,
    /// Add, refresh or remove these contacts.
    Contacts(Vec<ContactUpdate>),
}

/// A REGISTER refused before touching the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// SIP status.
    pub status: u16,
    /// Reason phrase.
    pub reason: &'static str,
    /// `Min-Expires` to send with `423`.
    pub min_expires: Option<u32>,
}

impl Reject {
    fn bad(reason: &'static str) -> Self {
        Reject { status: 400, reason, min_expires: None }
    }
}

/// Reads the Contact and Expires headers of a REGISTER (RFC 3261 §10.3 steps 6–7).
pub fn plan(req: &SipMessage, limits: Limits) -> Result<Update, Reject> {
    let contacts = req.contacts().map_err(|_| Reject::bad("Bad Contact"))?;
    let header_expires = match req.header("expires") {
        Some(v) => Some(v.trim().parse::<u32>().map_err(|_| Reject::bad("Bad Expires"))?),
        None => None,
    };
    if contacts.is_empty() {
        return Ok(Update::Fetch);
    }
    if contacts.iter().any(|c| c.is_star()) {
        if contacts.len() != 1 || header_expires != Some(0) {
            return Err(Reject::bad("Invalid Wildcard Contact"));
        }
        return Ok(Update::RemoveAll);
    }
    let mut out = Vec::with_capacity(contacts.len());
    for c in contacts {
        if !c.uri.is_sip() && c.uri.scheme.is_empty() {
            return Err(Reject::bad("Bad Contact"));
        }
        let requested = match c.param("expires") {
            Some(v) => v.trim().parse::<u32>().unwrap_or(limits.default),
            None => header_expires.unwrap_or(limits.default),
        };
        if requested != 0 && requested < limits.min {
            return Err(Reject {
                status: 423,
                reason: "Interval Too Brief",
                min_expires: Some(limits.min),
            });
        }
        let contact = c.uri.to_string();
        out.push(ContactUpdate {
            field: contact.clone(),
            contact,
            expires: requested.min(limits.max),
            q: c.param("q").map(str::to_owned),
            instance: c.param("+sip.instance").map(|s| s.trim_matches('"').to_owned()),
            reg_id: c.param("reg-id").and_then(|v| v.parse().ok()),
            nat: false,
        });
    }
    Ok(Update::Contacts(out))
}

/// `400`: a REGISTER whose To URI names no user, so no AOR to update.
pub const MISSING_USER: Answer = Answer::plain(400, "Missing User In To");
/// `403`: a Contact the cluster may not send to ([`crate::destination`]).
pub const CONTACT_NOT_ALLOWED: Answer = Answer::plain(403, "Contact Not Allowed");

/// The user whose AOR a REGISTER updates: its To URI's user part (RFC 3261 §10.3 step 5).
pub fn registering_user(to_user: Option<&str>) -> Result<&str, Answer> {
    to_user.filter(|u| !u.is_empty()).ok_or(MISSING_USER)
}

/// Only a user's own credentials update its AOR (RFC 3261 §10.3 step 6): `403` otherwise.
pub fn check_owner(user: &str, authenticated: &str) -> Result<(), Answer> {
    if user == authenticated { Ok(()) } else { Err(FORBIDDEN) }
}

/// Every Contact a REGISTER adds or refreshes must be somewhere the cluster may send
/// (`allowed`, the destination policy); the first that is not, with why. Removals are always
/// allowed, and so is a Contact that is no IP address (it is reached at the REGISTER's source).
pub fn check_contacts(
    update: &Update,
    allowed: impl Fn(SocketAddr) -> Result<(), Denied>,
) -> Result<(), (&ContactUpdate, Denied)> {
    let Update::Contacts(contacts) = update else { return Ok(()) };
    for c in contacts.iter().filter(|c| c.expires > 0) {
        let Some(addr) = contact_addr(&c.contact) else { continue };
        allowed(addr).map_err(|why| (c, why))?;
    }
    Ok(())
}

/// The `200 OK` listing every current binding with its remaining interval.
pub fn ok_response(
    req: &SipMessage,
    bindings: &[Binding],
    now_ms: u64,
    to_tag: &str,
) -> SipMessage {
    let mut resp = SipMessage::response_to(req, 200, "OK", Some(to_tag));
    for b in bindings {
        let left = b.expires_at_ms.saturating_sub(now_ms).div_ceil(1000);
        let mut value = format!("<{}>;expires={left}", b.contact);
        if let Some(q) = &b.q {
            value.push_str(&format!(";q={q}"));
        }
        if let (Some(instance), Some(reg_id)) = (&b.instance, b.reg_id) {
            value.push_str(&format!(";+sip.instance=\"{instance}\";reg-id={reg_id}"));
        }
        resp.push_header("Contact", value);
    }
    // RFC 5626 §6: a registrar that honours an outbound registration says so, so the phone
    // knows its flow is used (and keeps it alive).
    let supports_outbound =
        req.header_list("supported").iter().any(|o| o.trim().eq_ignore_ascii_case("outbound"));
    let outbound = req
        .contacts()
        .unwrap_or_default()
        .iter()
        .any(|c| c.param("reg-id").is_some() && c.param("+sip.instance").is_some());
    if supports_outbound && outbound {
        resp.push_header("Require", "outbound");
        resp.push_header("Supported", "outbound");
    }
    resp
}

/// The response for a [`Reject`].
pub fn reject_response(req: &SipMessage, reject: &Reject, to_tag: &str) -> SipMessage {
    let mut resp = SipMessage::response_to(req, reject.status, reject.reason, Some(to_tag));
    if let Some(min) = reject.min_expires {
        resp.push_header("Min-Expires", min.to_string());
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { min: 60, max: 3600, default: 1800 };

    /// A binding exactly as processors have written it to Redis since the location store
    /// began (docs/redis-data-model.md): whatever the type becomes, it must still read this.
    const STORED_BINDING: &str = r#"{"contact":"sip:alice@192.0.2.7:5062;transport=tcp","expires_at_ms":1796668800000,"q":"0.5","call_id":"reg-1@192.0.2.7","cseq":7,"received":"198.51.100.9:40123","ingress":{"ip":"127.0.0.2","port":5060,"transport":"tcp"},"connection_id":281474976710657,"dispatcher":"d1","user_agent":"Yealink SIP-T46S","instance":"<urn:uuid:00000000-0000-1000-8000-000000000001>","reg_id":1,"nat":true}"#;

    #[test]
    fn a_register_without_a_user_in_to_is_400_missing_user() {
        assert_eq!(registering_user(Some("alice")), Ok("alice"));
        for to_user in [None, Some("")] {
            assert_eq!(
                registering_user(to_user),
                Err(Answer::plain(400, "Missing User In To")),
                "{to_user:?}"
            );
        }
    }

    #[test]
    fn only_the_authenticated_user_updates_its_aor() {
        assert_eq!(check_owner("alice", "alice"), Ok(()));
        assert_eq!(check_owner("alice", "bob"), Err(Answer::plain(403, "Forbidden")));
        // No case folding: SIP user parts are case-sensitive (RFC 3261 §19.1.4).
        assert_eq!(check_owner("alice", "Alice"), Err(FORBIDDEN));
    }

    fn contact(uri: &str, expires: u32) -> ContactUpdate {
        ContactUpdate {
            field: uri.into(),
            contact: uri.into(),
            expires,
            q: None,
            instance: None,
            reg_id: None,
            nat: false,
        }
    }

    #[test]
    fn a_contact_the_policy_denies_refuses_the_register_unless_it_is_removed() {
        let deny_redis = |a: SocketAddr| {
            if a.port() == 6379 { Err(Denied::ClusterService) } else { Ok(()) }
        };
        let update = Update::Contacts(vec![
            contact("sip:a@192.0.2.1:5060", 300),
            contact("sip:a@phone.example:6379", 300),
            contact("sip:a@127.0.0.1:6379", 300),
        ]);
        let (refused, why) = check_contacts(&update, deny_redis).expect_err("redis denied");
        assert_eq!(
            (refused.contact.as_str(), why),
            ("sip:a@127.0.0.1:6379", Denied::ClusterService)
        );
        assert_eq!(CONTACT_NOT_ALLOWED, Answer::plain(403, "Contact Not Allowed"));
        // Removing such a binding (left by an older policy) is always allowed.
        let removal = Update::Contacts(vec![contact("sip:a@127.0.0.1:6379", 0)]);
        assert!(check_contacts(&removal, deny_redis).is_ok());
        assert!(check_contacts(&Update::RemoveAll, deny_redis).is_ok());
        assert!(check_contacts(&Update::Fetch, deny_redis).is_ok());
    }

    #[test]
    fn a_binding_stored_in_the_original_format_still_reads_and_routes() {
        let b: Binding = serde_json::from_str(STORED_BINDING).expect("the stored format parses");
        assert_eq!(
            b.ingress,
            StoredIngress { ip: [127, 0, 0, 2].into(), port: 5060, transport: Transport::Tcp }
        );
        assert_eq!(b.received, "198.51.100.9:40123".parse().expect("addr"));
        assert_eq!((b.cseq, b.reg_id, b.nat, b.q.as_deref()), (7, Some(1), true, Some("0.5")));
        let egress = b.egress().expect("an egress");
        assert_eq!(egress.local.addr, "127.0.0.2:5060".parse().expect("addr"));
        assert_eq!(egress.local.transport, Transport::Tcp);
        // Over a stream the Contact's address is where to reconnect; the flow is named.
        assert_eq!(egress.remote, "192.0.2.7:5062".parse().expect("addr"));
        assert_eq!(egress.connection_id, 281_474_976_710_657);
        assert!(egress.flow_only);
        // And what is written back is the same document.
        let again: serde_json::Value = serde_json::to_value(&b).expect("serializes");
        let stored: serde_json::Value = serde_json::from_str(STORED_BINDING).expect("json");
        assert_eq!(again, stored);
        // Fields added later are optional: a minimal old record reads too.
        let minimal = r#"{"contact":"sip:b@192.0.2.8","expires_at_ms":1,"call_id":"c","cseq":1,"received":"192.0.2.8:5060","ingress":{"ip":"127.0.0.1","port":5060,"transport":"udp"},"dispatcher":"d1"}"#;
        let b: Binding = serde_json::from_str(minimal).expect("a minimal binding parses");
        assert_eq!((b.connection_id, b.nat, b.user_agent.as_str()), (0, false, ""));
        // IPv6 addresses round-trip in their usual text forms (RFC 5952, bracketed with port).
        let v6 = minimal
            .replace("192.0.2.8:5060", "[2001:db8::8]:5060")
            .replace("\"ip\":\"127.0.0.1\"", "\"ip\":\"2001:db8::1\"");
        let b: Binding = serde_json::from_str(&v6).expect("an IPv6 binding parses");
        assert_eq!(b.received.to_string(), "[2001:db8::8]:5060");
        let json = serde_json::to_string(&b).expect("serializes");
        assert!(json.contains(r#""received":"[2001:db8::8]:5060""#), "{json}");
        assert!(json.contains(r#""ip":"2001:db8::1""#), "{json}");
    }

    #[test]
    fn a_binding_with_hostile_addresses_is_refused_as_a_whole() {
        let good = r#"{"contact":"sip:b@192.0.2.8","expires_at_ms":1,"call_id":"c","cseq":1,"received":"192.0.2.8:5060","ingress":{"ip":"127.0.0.1","port":5060,"transport":"udp"},"dispatcher":"d1"}"#;
        assert!(serde_json::from_str::<Binding>(good).is_ok());
        for (what, from, to) in [
            ("received without port", "192.0.2.8:5060", "192.0.2.8"),
            ("received a host name", "192.0.2.8:5060", "evil.example:5060"),
            ("received port overflow", "192.0.2.8:5060", "192.0.2.8:70000"),
            (
                "ingress ip not an ip",
                r#""ip":"127.0.0.1""#,
                r#""ip":"127.0.0.1
X: y""#,
            ),
            ("unknown transport", r#""transport":"udp""#, r#""transport":"sctp""#),
            ("transport in capitals", r#""transport":"udp""#, r#""transport":"UDP""#),
        ] {
            let hostile = good.replace(from, to);
            assert_ne!(hostile, good, "{what}: substitution applied");
            assert!(serde_json::from_str::<Binding>(&hostile).is_err(), "{what}: {hostile}");
        }
    }

    fn register(extra: &str) -> SipMessage {
        let text = format!(
            "REGISTER sip:h SIP/2.0\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK1\r\nFrom: <sip:u@h>;tag=1\r\nTo: <sip:u@h>\r\nCall-ID: c\r\nCSeq: 1 REGISTER\r\n{extra}\r\n"
        );
        sipmsg::parse(text.as_bytes()).expect("parse")
    }

    #[test]
    fn nat_is_detected_from_via_and_private_contacts() {
        let src: SocketAddr = "203.0.113.5:40000".parse().expect("addr");
        let with_via = |via: &str| {
            let text =
                format!("REGISTER sip:h SIP/2.0\r\nVia: SIP/2.0/UDP {via};branch=z9hG4bK1\r\n\r\n");
            sipmsg::parse(text.as_bytes()).expect("parse")
        };
        let direct = with_via("203.0.113.5:40000");
        assert!(!behind_nat(NatMode::Detect, &direct, "sip:u@203.0.113.5:40000", src));
        // Contact elsewhere but Via matches the source: a public phone with another listener.
        assert!(!behind_nat(NatMode::Detect, &direct, "sip:u@203.0.113.9:5062", src));
        assert!(behind_nat(
            NatMode::Detect,
            &with_via("192.168.1.10:5060"),
            "sip:u@192.168.1.10",
            src
        ));
        assert!(behind_nat(NatMode::Detect, &direct, "sip:u@10.0.0.7:5060", src));
        assert!(behind_nat(NatMode::Detect, &direct, "sip:u@phone.example", src));
        assert!(behind_nat(NatMode::Always, &direct, "sip:u@203.0.113.5:40000", src));
        assert!(!behind_nat(NatMode::Never, &with_via("10.0.0.1"), "sip:u@10.0.0.1", src));
        assert_eq!(
            contact_addr("sips:u@[2001:db8::1]"),
            Some("[2001:db8::1]:5061".parse().expect("a"))
        );
    }

    #[test]
    fn outbound_registration_is_answered_with_require_outbound() {
        let req = register(
            "Supported: path, outbound\r\nContact: <sip:u@10.0.0.1;transport=tcp>;reg-id=1;+sip.instance=\"<urn:uuid:1>\"\r\n",
        );
        let b = Binding {
            contact: "sip:u@10.0.0.1;transport=tcp".into(),
            expires_at_ms: 61_000,
            q: None,
            call_id: "c".into(),
            cseq: 1,
            received: "10.0.0.1:40000".parse().expect("addr"),
            ingress: StoredIngress {
                ip: [127, 0, 0, 2].into(),
                port: 5060,
                transport: Transport::Tcp,
            },
            connection_id: 7,
            dispatcher: "d1".into(),
            user_agent: String::new(),
            instance: Some("<urn:uuid:1>".into()),
            reg_id: Some(1),
            nat: false,
        };
        let resp = ok_response(&req, &[b], 1_000, "t");
        assert_eq!(resp.header("require"), Some("outbound"));
        let contact = resp.header("contact").expect("contact");
        assert!(contact.contains("reg-id=1") && contact.contains("+sip.instance"), "{contact}");
        let plain = ok_response(&register("Contact: <sip:u@h>\r\n"), &[], 1_000, "t");
        assert_eq!(plain.header("require"), None);
    }

    #[test]
    fn no_contact_fetches() {
        assert_eq!(plan(&register(""), LIMITS), Ok(Update::Fetch));
    }

    #[test]
    fn expires_parameter_beats_header_and_max_caps() {
        let Ok(Update::Contacts(c)) = plan(
            &register(
                "Expires: 120\r\nContact: <sip:u@1.2.3.4>;expires=99999, <sip:u@5.6.7.8>;q=0.5\r\n",
            ),
            LIMITS,
        ) else {
            panic!("contacts expected")
        };
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].expires, 3600);
        assert_eq!(c[1].expires, 120);
        assert_eq!(c[1].q.as_deref(), Some("0.5"));
    }

    #[test]
    fn default_applies_without_any_expires() {
        let Ok(Update::Contacts(c)) = plan(&register("Contact: <sip:u@1.2.3.4>\r\n"), LIMITS)
        else {
            panic!("contacts expected")
        };
        assert_eq!(c[0].expires, 1800);
    }

    #[test]
    fn too_brief_gets_423_with_min_expires() {
        let r =
            plan(&register("Contact: <sip:u@1.2.3.4>;expires=10\r\n"), LIMITS).expect_err("423");
        assert_eq!((r.status, r.min_expires), (423, Some(60)));
        let resp = reject_response(&register(""), &r, "t");
        assert_eq!(resp.header("min-expires"), Some("60"));
    }

    #[test]
    fn zero_removes_and_is_not_too_brief() {
        let Ok(Update::Contacts(c)) =
            plan(&register("Contact: <sip:u@1.2.3.4>;expires=0\r\n"), LIMITS)
        else {
            panic!("contacts expected")
        };
        assert_eq!(c[0].expires, 0);
    }

    #[test]
    fn wildcard_needs_expires_zero_and_to_be_alone() {
        assert_eq!(plan(&register("Contact: *\r\nExpires: 0\r\n"), LIMITS), Ok(Update::RemoveAll));
        assert_eq!(plan(&register("Contact: *\r\n"), LIMITS).map_err(|r| r.status), Err(400));
        assert_eq!(
            plan(&register("Contact: *, <sip:u@h>\r\nExpires: 0\r\n"), LIMITS)
                .map_err(|r| r.status),
            Err(400)
        );
    }
}

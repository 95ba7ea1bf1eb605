//! The decisions of call setup, as pure functions: who an INVITE is for, where it can ring,
//! and what SIP answer each refusal gets. The node's async shell only fetches what they need
//! (bindings from Redis, the billing service's answers) and sends what they decide.
//!
//! Every final answer an INVITE can get before it rings is decided here or in [`crate::auth`]:
//! `404 Not Found`, `416 Unsupported URI Scheme`, `480 Temporarily Unavailable`,
//! `402 Payment Required` and the `403` variants, the billing refusals with a `Reason` header.

use std::net::{IpAddr, SocketAddr};

use crate::answer::{Answer, NOT_FOUND, UNAVAILABLE, UNSUPPORTED_SCHEME};
use crate::b2bua::Target;
use crate::error::Error;
use crate::registrar::Binding;
use crate::routing::{self, Gateway, Route};
use crate::transport::{Egress, LocalAddr, Transport};
use sipalias_proto::billing::{AuthorizeResponse, DenyReason};

/// Who an INVITE's Request-URI names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Callee {
    /// A user of one of the cluster's domains.
    User {
        /// User part (a `tel:` number with its visual separators removed).
        user: String,
        /// Canonical domain.
        domain: String,
    },
    /// A SIP URI of a host the cluster does not serve, or without a user part.
    NotServed,
    /// Not a SIP or tel URI, or no readable URI at all.
    UnsupportedScheme,
}

impl Callee {
    /// The callee's AOR, or the answer for a Request-URI that names nobody here.
    pub fn aor(&self) -> Result<String, Answer> {
        match self {
            Callee::User { user, domain } => Ok(format!("{user}@{domain}")),
            Callee::NotServed => Err(NOT_FOUND),
            Callee::UnsupportedScheme => Err(UNSUPPORTED_SCHEME),
        }
    }
}

/// The callee named by `request_uri`. `domain_of_host` maps a URI host to the canonical
/// domain it belongs to (`None`: not ours). A `tel:` number (RFC 3966) is a user of
/// `ingress_domain`, the domain of the IP the call came in on.
pub fn callee(
    request_uri: Option<&str>,
    ingress_domain: &str,
    domain_of_host: impl Fn(&str) -> Option<String>,
) -> Callee {
    let Some(ruri) = request_uri.and_then(|u| sipmsg::Uri::parse(u).ok()) else {
        return Callee::UnsupportedScheme;
    };
    if ruri.is_sip() {
        let (Some(user), Some(domain)) = (ruri.user_name(), domain_of_host(&ruri.host)) else {
            return Callee::NotServed;
        };
        Callee::User { user: user.to_owned(), domain }
    } else if ruri.scheme == "tel" {
        let number: String = ruri
            .host
            .split(';')
            .next()
            .unwrap_or_default()
            .chars()
            .filter(|c| !"-.() ".contains(*c))
            .collect();
        if number.is_empty() {
            return Callee::NotServed;
        }
        Callee::User { user: number, domain: ingress_domain.to_owned() }
    } else {
        Callee::UnsupportedScheme
    }
}

/// The user part of a SIP Request-URI, or a `tel:` number, visual separators removed: what
/// a trunk's INVITE dials (its host may be any of ours, or a name of its own).
pub fn dialed(request_uri: Option<&str>) -> Option<String> {
    let ruri = sipmsg::Uri::parse(request_uri?).ok()?;
    let raw = if ruri.is_sip() {
        ruri.user_name()?.to_owned()
    } else if ruri.scheme == "tel" {
        ruri.host.split(';').next().unwrap_or_default().to_owned()
    } else {
        return None;
    };
    Some(raw.chars().filter(|c| !"-.() ".contains(*c)).collect())
}

/// The calling number a trunk's INVITE names in its From user part, as the callee's phone
/// will display it: `+`, digits, `*` and `#` only (a trunk is trusted for its calls, not
/// for what it writes into our headers); `anonymous` when nothing is left.
pub fn caller_number(req: &sipmsg::SipMessage) -> String {
    let user =
        req.from().ok().and_then(|f| f.uri.user_name().map(str::to_owned)).unwrap_or_default();
    let clean: String =
        user.chars().filter(|c| c.is_ascii_digit() || "+*#".contains(*c)).take(32).collect();
    if clean.is_empty() { "anonymous".to_owned() } else { clean }
}

/// Where a call to `bindings` rings: one target per binding that can be reached, From/To host
/// chosen by `uri_host` for the local socket the binding was made through (the alias IP for
/// an alias socket, the domain for the main IP), which is `None` for a socket no dispatcher
/// serves any more (an alias removed at runtime): such a binding gets no call, as it would
/// leave from an address the phone does not know, or from none.
pub fn targets(
    bindings: &[Binding],
    uri_host: impl Fn(SocketAddr) -> Option<String>,
) -> Vec<Target> {
    bindings
        .iter()
        .filter_map(|b| {
            let egress = b.egress()?;
            let host = uri_host(egress.local.addr)?;
            Some(Target { contact: b.contact.clone(), egress, host, to: None, auth: None })
        })
        .collect()
}

/// The trunks a call to `e164` (a number that is no subscriber) tries, in order
/// ([`routing::hunt`] with `draw`), each leaving from the socket `socket_for` gives for the
/// gateway's local IP (or the main IP) and transport, From host per `uri_host` of that IP.
/// A gateway with no such socket is skipped (said in the log).
pub fn trunk_targets(
    e164: &str,
    gateways: &[Gateway],
    routes: &[Route],
    draw: u64,
    socket_for: impl Fn(Option<IpAddr>, Transport) -> Option<(SocketAddr, String)>,
    uri_host: impl Fn(IpAddr) -> Option<String>,
) -> Vec<Target> {
    routing::hunt(e164, routes, draw)
        .into_iter()
        .filter_map(|name| {
            let g = gateways.iter().find(|g| g.name == name)?;
            let remote = g.addr()?;
            let transport = g.transport();
            let Some((local, dispatcher_id)) = socket_for(g.local_ip(), transport) else {
                tracing::warn!(gateway = %g.name, "no {} socket to reach the gateway from", transport.as_str());
                return None;
            };
            Some(Target {
                contact: g.request_uri(e164),
                egress: Egress {
                    local: LocalAddr { addr: local, transport },
                    remote,
                    connection_id: 0,
                    dispatcher_id,
                    flow_only: false,
                },
                host: uri_host(local.ip())?,
                to: Some(format!("<sip:{e164}@{}>", g.address.trim())),
                auth: g.credentials(),
            })
        })
        .collect()
}

/// The answer for a callee with no binding, from billing's lookup of the callee's account:
/// `480` for an account that exists, `404` for none. With billing down (`Err`), `480` under
/// the `allow` outage policy (an unknown callee then simply has no binding), else the error.
pub fn unreachable(account: Result<bool, Error>, outage_allowed: bool) -> Result<Answer, Error> {
    match account {
        Ok(true) => Ok(UNAVAILABLE),
        Ok(false) => Ok(NOT_FOUND),
        Err(e) if outage_allowed => {
            tracing::warn!(error = %e, "billing down: callee not checked");
            Ok(UNAVAILABLE)
        }
        Err(e) => Err(e),
    }
}

/// What billing's authorization means for the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authorization {
    /// Ring it, for at most this long (0: no limit).
    Allowed {
        /// Longest the call may last, in seconds.
        max_duration_secs: u32,
    },
    /// The caller's digest response was wrong: a failed authentication (counted against the
    /// source, answered with a new challenge or `403` once banned).
    BadCredentials,
    /// Refused with this answer, billing's reason in its `Reason` header.
    Refused(Answer),
}

/// Maps billing's answer to an authorization request.
pub fn authorization(auth: &AuthorizeResponse) -> Authorization {
    if auth.allowed {
        return Authorization::Allowed { max_duration_secs: auth.max_duration_secs };
    }
    let deny = DenyReason::try_from(auth.deny).ok();
    let (status, reason) = match deny {
        Some(DenyReason::BadCredentials) => return Authorization::BadCredentials,
        Some(DenyReason::InsufficientFunds) => (402, "Payment Required"),
        Some(DenyReason::TooManyCalls) => (403, "Too Many Concurrent Calls"),
        Some(DenyReason::NoRate) => (403, "No Rate For Destination"),
        _ => (403, "Forbidden"),
    };
    // Billing's text goes into a quoted-string: no quote or backslash may end it early.
    let text = auth.reason.replace(['"', '\\'], "'").replace(['\r', '\n'], " ");
    Authorization::Refused(Answer { status, reason, reason_text: Some(text) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registrar::StoredIngress;

    fn ours(host: &str) -> Option<String> {
        match host {
            "127.0.0.2" | "alias.example" => Some("alias.example".into()),
            "example.com" => Some("example.com".into()),
            _ => None,
        }
    }

    #[test]
    fn a_sip_uri_of_a_served_host_names_its_user_in_the_hosts_domain() {
        let c = callee(Some("sip:1002@127.0.0.2;transport=udp"), "example.com", ours);
        assert_eq!(c, Callee::User { user: "1002".into(), domain: "alias.example".into() });
        assert_eq!(c.aor(), Ok("1002@alias.example".into()));
        let sips = callee(Some("sips:1002@example.com"), "alias.example", ours);
        assert_eq!(sips.aor(), Ok("1002@example.com".into()));
    }

    #[test]
    fn a_foreign_host_or_a_uri_without_user_is_404() {
        for uri in ["sip:1002@10.9.9.9", "sip:1002@evil.example", "sip:example.com", "tel:;x=1"] {
            let c = callee(Some(uri), "example.com", ours);
            assert_eq!(c, Callee::NotServed, "{uri}");
            assert_eq!(c.aor(), Err(Answer::plain(404, "Not Found")), "{uri}");
        }
    }

    #[test]
    fn a_tel_number_is_a_user_of_the_ingress_domain_without_separators() {
        let c = callee(Some("tel:+1-(555).123-4567;phone-context=x"), "alias.example", ours);
        assert_eq!(c.aor(), Ok("+15551234567@alias.example".into()));
    }

    #[test]
    fn other_schemes_and_unreadable_uris_are_416() {
        for uri in [Some("mailto:a@example.com"), Some("im:a@example.com"), Some("<<>>"), None] {
            let c = callee(uri, "example.com", ours);
            assert_eq!(c.aor(), Err(Answer::plain(416, "Unsupported URI Scheme")), "{uri:?}");
        }
    }

    fn binding(contact: &str, ingress_ip: &str, received: &str) -> Binding {
        Binding {
            contact: contact.into(),
            expires_at_ms: u64::MAX,
            q: None,
            call_id: "c".into(),
            cseq: 1,
            received: received.parse().expect("received"),
            ingress: StoredIngress {
                ip: ingress_ip.parse().expect("ingress ip"),
                port: 5060,
                transport: crate::transport::Transport::Udp,
            },
            connection_id: 0,
            dispatcher: "d1".into(),
            user_agent: String::new(),
            instance: None,
            reg_id: None,
            nat: true,
        }
    }

    #[test]
    fn targets_take_the_alias_ip_or_the_domain_and_skip_removed_sockets() {
        let alias = binding("sip:a@10.0.0.1", "127.0.0.2", "127.0.0.9:5062");
        let main = binding("sip:b@10.0.0.2", "127.0.0.1", "127.0.0.9:5064");
        let gone = binding("sip:c@10.0.0.3", "127.0.0.3", "127.0.0.9:5066");
        let uri_host = |local: SocketAddr| match local.ip().to_string().as_str() {
            "127.0.0.2" => Some("127.0.0.2".to_owned()),
            "127.0.0.1" => Some("example.com".to_owned()),
            _ => None,
        };
        let t = targets(&[alias, main, gone], uri_host);
        let hosts: Vec<(&str, &str)> =
            t.iter().map(|t| (t.contact.as_str(), t.host.as_str())).collect();
        assert_eq!(
            hosts,
            [
                ("sip:a@10.0.0.1", "127.0.0.2"),
                ("sip:b@10.0.0.2", "example.com"),
                // 127.0.0.3: a socket no dispatcher serves any more gets no call.
            ]
        );
        assert_eq!(t[0].egress.remote.to_string(), "127.0.0.9:5062");
    }

    fn billing_down() -> Error {
        Error::Billing {
            call: "GetAccount",
            failure: crate::error::BillingFailure::Timeout(std::time::Duration::from_secs(1)),
        }
    }

    #[test]
    fn no_binding_is_480_for_a_subscriber_and_404_for_a_stranger() {
        assert_eq!(unreachable(Ok(true), false).ok(), Some(UNAVAILABLE));
        assert_eq!(unreachable(Ok(false), false).ok(), Some(NOT_FOUND));
        assert_eq!(unreachable(Ok(false), true).ok(), Some(NOT_FOUND));
        assert_eq!(UNAVAILABLE, Answer::plain(480, "Temporarily Unavailable"));
    }

    #[test]
    fn no_binding_with_billing_down_is_480_when_allowed_else_the_503_error() {
        assert_eq!(unreachable(Err(billing_down()), true).ok(), Some(UNAVAILABLE));
        let e = unreachable(Err(billing_down()), false).expect_err("billing down");
        assert_eq!(e.sip_status(), (503, "Service Unavailable"));
    }

    fn denied(deny: DenyReason, reason: &str) -> AuthorizeResponse {
        AuthorizeResponse {
            allowed: false,
            reason: reason.into(),
            max_duration_secs: 0,
            deny: deny as i32,
        }
    }

    #[test]
    fn billing_refusals_map_to_402_and_403s_with_their_reason() {
        let cases = [
            (DenyReason::InsufficientFunds, 402, "Payment Required"),
            (DenyReason::TooManyCalls, 403, "Too Many Concurrent Calls"),
            (DenyReason::NoRate, 403, "No Rate For Destination"),
            (DenyReason::Blocked, 403, "Forbidden"),
            (DenyReason::UnknownAccount, 403, "Forbidden"),
            (DenyReason::Unspecified, 403, "Forbidden"),
        ];
        for (deny, status, reason) in cases {
            let a = authorization(&denied(deny, "balance 0.00"));
            let expected = Answer { status, reason, reason_text: Some("balance 0.00".into()) };
            assert_eq!(a, Authorization::Refused(expected.clone()), "{deny:?}");
        }
        // A code from a newer billing service is a plain refusal, not a crash.
        let unknown = AuthorizeResponse { deny: 999, ..denied(DenyReason::NoRate, "") };
        assert!(matches!(authorization(&unknown), Authorization::Refused(a) if a.status == 403));
    }

    #[test]
    fn bad_credentials_and_allowed_calls_are_not_answers() {
        assert_eq!(
            authorization(&denied(DenyReason::BadCredentials, "wrong response")),
            Authorization::BadCredentials
        );
        let ok = AuthorizeResponse { allowed: true, max_duration_secs: 90, ..Default::default() };
        assert_eq!(authorization(&ok), Authorization::Allowed { max_duration_secs: 90 });
    }

    #[test]
    fn hostile_billing_text_cannot_break_out_of_the_reason_header() {
        let a =
            authorization(&denied(DenyReason::InsufficientFunds, "x\"\r\nVia: SIP/2.0/UDP evil\\"));
        let Authorization::Refused(answer) = a else { panic!("refused expected") };
        let req = sipmsg::parse(
            b"INVITE sip:b@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.9:5060;branch=z9hG4bK1\r\nFrom: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
        )
        .expect("request");
        let resp = answer.to_response(&req, "t1");
        assert_eq!(
            resp.header("reason"),
            Some("SIP;cause=402;text=\"x'  Via: SIP/2.0/UDP evil'\"")
        );
        assert_eq!(resp.headers_named("via").count(), 1);
    }

    #[test]
    fn what_a_trunk_dials_and_who_it_says_calls() {
        assert_eq!(
            dialed(Some("sip:+44-20-7946-0001@127.0.0.1")).as_deref(),
            Some("+442079460001")
        );
        assert_eq!(
            dialed(Some("sip:02079460001@trunk.example;user=phone")).as_deref(),
            Some("02079460001")
        );
        assert_eq!(dialed(Some("tel:+44.20.7946.0001")).as_deref(), Some("+442079460001"));
        assert_eq!(dialed(Some("sip:127.0.0.1")), None, "no user");
        assert_eq!(dialed(Some("mailto:a@b")), None);
        assert_eq!(dialed(None), None);
        let invite = |from: &str| {
            sipmsg::parse(
                format!(
                    "INVITE sip:+442079460001@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n\
                     From: {from};tag=1\r\nTo: <sip:+442079460001@127.0.0.1>\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\
                     Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
                )
                .as_bytes(),
            )
            .expect("parse")
        };
        assert_eq!(caller_number(&invite("<sip:+33142278186@192.0.2.1>")), "+33142278186");
        let hostile = caller_number(&invite("\"x\" <sip:evil%0d%0aX;y=\"z\"@192.0.2.1>"));
        let clean = hostile.chars().all(|c| c.is_ascii_digit() || "+*#".contains(c));
        assert!(hostile == "anonymous" || clean, "{hostile:?}");
        assert_eq!(caller_number(&invite("<sip:alice@192.0.2.1>")), "anonymous");
        assert_eq!(caller_number(&invite("<sip:192.0.2.1>")), "anonymous");
    }
}

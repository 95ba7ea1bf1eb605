//! Which processor gets a message: pure functions of the message's routing keys and the set of
//! live processors. The dispatcher keeps no per-call state; affinity comes from tokens the
//! processors embed in what they send, and from hashing the Call-ID.
//!
//! - A **response** goes to the processor named in its top Via branch (it sent the request).
//! - A **request** goes to the processor named in its Request-URI: in-dialog requests target the
//!   Contact that processor put in the dialog.
//! - Otherwise (an initial request, a CANCEL, an ACK for a non-2xx, or a token naming a processor
//!   that is gone) a rendezvous hash of the Call-ID over the live processors decides. When a
//!   processor leaves, only the Call-IDs it owned move; the new owner loads any dialog from Redis.
//!
//! A **draining** processor (it sent `Drain`: "send me no new work") still gets what names it,
//! and the CANCELs and ACKs of INVITEs it received before draining; every new request whose
//! Call-ID it would have won goes to the winner among the processors that are not draining. The
//! one thing that cannot be told from the message alone is whether a CANCEL's (or a non-2xx
//! ACK's) INVITE came before or after the drain, so the caller remembers the Call-IDs of the
//! INVITEs diverted away from each draining processor ([`Pick::diverted_from`]) for as long as
//! it stays linked, and answers [`pick_draining`]'s `was_diverted` question from that.

use sipmsg::scan::{Scan, branch_token, tag_token, uri_token};

/// The live processor that should handle the message, or `None` when none is live.
///
/// `live` is the set of connected processor ids (any order; duplicates are harmless). None of
/// them is draining; see [`pick_draining`] for when some are.
pub fn pick<'a, N: AsRef<str>>(scan: &Scan<'_>, live: &'a [N]) -> Option<&'a N> {
    pick_draining(scan, live, |_| false, |_, _| false).map(|p| p.node)
}

/// Where [`pick_draining`] sends a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick<'a, N> {
    /// The processor that gets it.
    pub node: &'a N,
    /// Set when the message is an INVITE that `node` gets only because this draining processor,
    /// the Call-ID's owner by hash, takes no new work. The caller should remember the Call-ID
    /// for this processor, so that the INVITE's CANCEL and non-2xx ACK follow it to `node`.
    pub diverted_from: Option<&'a N>,
}

/// The live processor that should handle the message when some processors may be draining, or
/// `None` when nobody can take it (none is live, or it is new work and every one is draining).
///
/// `draining(n)` tells whether `n` sent `Drain`; `was_diverted(n, call_id)` whether an INVITE
/// with that Call-ID was diverted away from draining processor `n` earlier (see [`Pick`]).
pub fn pick_draining<'a, N: AsRef<str>>(
    scan: &Scan<'_>,
    live: &'a [N],
    draining: impl Fn(&N) -> bool,
    was_diverted: impl Fn(&N, &str) -> bool,
) -> Option<Pick<'a, N>> {
    let token = if scan.method.is_some() {
        // An ACK for a non-2xx final has no Request-URI token, but carries the To tag that the
        // answering processor wrote.
        scan.request_uri.and_then(uri_token).or_else(|| scan.to_tag.and_then(tag_token))
    } else {
        scan.top_branch.and_then(branch_token)
    };
    if let Some(token) = token
        && let Some(node) = live.iter().find(|n| n.as_ref() == token)
    {
        // Whatever names a processor is work it holds, draining or not.
        return Some(Pick { node, diverted_from: None });
    }
    // A message without Call-ID is broken; it still needs one deterministic owner, which
    // answers it with 400.
    let call_id = scan.call_id.unwrap_or_default();
    let owner = rendezvous(call_id, live)?;
    if !draining(owner) {
        return Some(Pick { node: owner, diverted_from: None });
    }
    // The owner is draining. A CANCEL or an ACK without a token belongs to an initial INVITE
    // (same Request-URI, same Call-ID), which the owner received unless it was diverted after
    // the drain. Anything else is new work: an initial request, or a takeover (a token naming
    // a processor that is gone), which is for a processor that stays.
    let follows_invite = token.is_none() && matches!(scan.method, Some("CANCEL" | "ACK"));
    if follows_invite && !was_diverted(owner, call_id) {
        return Some(Pick { node: owner, diverted_from: None });
    }
    let node = best(call_id, live.iter().filter(|n| !draining(n)))?;
    let diverted_from = (scan.method == Some("INVITE")).then_some(owner);
    Some(Pick { node, diverted_from })
}

/// Highest-random-weight choice of a node for `key`. Ties (astronomically unlikely) go to the
/// greater id, so the result never depends on the order of `live`.
pub fn rendezvous<'a, N: AsRef<str>>(key: &str, live: &'a [N]) -> Option<&'a N> {
    best(key, live.iter())
}

fn best<'a, N: AsRef<str> + 'a>(key: &str, nodes: impl Iterator<Item = &'a N>) -> Option<&'a N> {
    nodes.max_by(|a, b| {
        let (a, b) = (a.as_ref(), b.as_ref());
        weight(a, key).cmp(&weight(b, key)).then_with(|| a.cmp(b))
    })
}

/// The weight of `node` for `key`: FNV-1a 64 over `node ‖ 0xff ‖ key`, then the splitmix64
/// finaliser to spread FNV's weak low bits. 0xff never occurs in UTF-8, so no (node, key) pair
/// collides with another by shifting bytes across the separator.
///
/// Stable across processes, versions and platforms (unlike `std`'s `RandomState`): every
/// dispatcher of a pair must route a Call-ID to the same processor.
pub fn weight(node: &str, key: &str) -> u64 {
    let mut h = fnv1a64(FNV_OFFSET, node.as_bytes());
    h = fnv1a64(h, &[0xff]);
    h = fnv1a64(h, key.as_bytes());
    splitmix64(h)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a64(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sipmsg::scan::{make_branch, make_contact_user, scan};

    fn request(method: &str, uri: &str, call_id: &str) -> String {
        format!(
            "{method} {uri} SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKphone\r\nCall-ID: {call_id}\r\n\r\n"
        )
    }

    fn response(branch: &str, call_id: &str) -> String {
        format!(
            "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.2;branch={branch}\r\nCall-ID: {call_id}\r\n\r\n"
        )
    }

    fn pick_for<'a>(msg: &str, live: &'a [&'a str]) -> Option<&'a str> {
        let s = scan(msg.as_bytes()).ok()?;
        pick(&s, live).copied()
    }

    const LIVE: [&str; 3] = ["p1", "p2", "p3"];

    #[test]
    fn response_goes_to_the_branch_token() {
        for node in LIVE {
            let msg = response(&make_branch(node, "abc"), "call-1");
            assert_eq!(pick_for(&msg, &LIVE), Some(node));
        }
    }

    #[test]
    fn in_dialog_request_goes_to_the_uri_token() {
        for node in LIVE {
            let uri = format!("sip:{}@127.0.0.2:5060", make_contact_user(node, "x1"));
            assert_eq!(pick_for(&request("BYE", &uri, "call-1"), &LIVE), Some(node));
        }
    }

    #[test]
    fn ack_for_a_non_2xx_follows_the_to_tag_of_the_processor_that_answered() {
        for node in LIVE {
            let ack = format!(
                "ACK sip:bob@x SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bKphone\r\nCall-ID: call-7\r\nTo: <sip:bob@x>;tag={}\r\n\r\n",
                sipmsg::scan::make_tag(node, "t1")
            );
            assert_eq!(pick_for(&ack, &LIVE), Some(node));
        }
    }

    #[test]
    fn token_of_a_gone_node_falls_back_to_the_call_id_hash() {
        let hashed = rendezvous("call-1", &LIVE).copied();
        let resp = response(&make_branch("p9", "abc"), "call-1");
        assert_eq!(pick_for(&resp, &LIVE), hashed);
        let uri = format!("sip:{}@127.0.0.2", make_contact_user("p9", "x"));
        assert_eq!(pick_for(&request("BYE", &uri, "call-1"), &LIVE), hashed);
        // A foreign branch (not ours) or a plain Request-URI hashes as well.
        assert_eq!(pick_for(&response("z9hG4bKother", "call-1"), &LIVE), hashed);
        assert_eq!(pick_for(&request("INVITE", "sip:bob@x", "call-1"), &LIVE), hashed);
    }

    #[test]
    fn request_routing_ignores_the_via_branch() {
        // A phone's branch could look like ours; requests route by Request-URI only.
        let msg = format!(
            "INVITE sip:bob@x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch={}\r\nCall-ID: c7\r\n\r\n",
            make_branch("p1", "z")
        );
        assert_eq!(pick_for(&msg, &LIVE), rendezvous("c7", &LIVE).copied());
    }

    #[test]
    fn same_call_id_same_node_whatever_the_order_of_live() {
        let reversed = ["p3", "p2", "p1"];
        for i in 0..200 {
            let call_id = format!("{i}@host");
            let a = pick_for(&request("INVITE", "sip:b@x", &call_id), &LIVE);
            let b = pick_for(&request("CANCEL", "sip:b@x", &call_id), &reversed);
            assert_eq!(a, b);
            assert!(a.is_some());
        }
    }

    #[test]
    fn nothing_live_means_no_pick() {
        let none: [&str; 0] = [];
        assert_eq!(pick_for(&request("INVITE", "sip:b@x", "c"), &none), None);
        assert_eq!(pick_for(&response(&make_branch("p1", "a"), "c"), &none), None);
    }

    #[test]
    fn call_ids_spread_evenly() {
        let mut counts = [0usize; 3];
        for i in 0..10_000 {
            let call_id = format!("a84b4c76e66710-{i}@pc33.atlanta.example.com");
            let node = rendezvous(&call_id, &LIVE).copied();
            let idx = LIVE.iter().position(|n| Some(*n) == node).unwrap_or(usize::MAX);
            counts[idx] += 1;
        }
        for c in counts {
            assert!((3000..=3667).contains(&c), "uneven spread {counts:?}");
        }
    }

    #[test]
    fn removing_a_node_only_moves_its_call_ids() {
        let after = ["p1", "p3"];
        let mut moved = 0;
        for i in 0..3_000 {
            let call_id = format!("call-{i}");
            let before = rendezvous(&call_id, &LIVE).copied();
            let now = rendezvous(&call_id, &after).copied();
            if before == Some("p2") {
                moved += 1;
                assert!(now == Some("p1") || now == Some("p3"));
            } else {
                assert_eq!(before, now, "{call_id} moved although its node stayed");
            }
        }
        assert!(moved > 0);
    }

    /// `pick_draining` with `draining` processors and the Call-IDs already `diverted`.
    fn pick_drained<'a>(
        msg: &str,
        live: &'a [&'a str],
        draining: &[&str],
        diverted: &[&str],
    ) -> Option<(&'a str, Option<&'a str>)> {
        let s = scan(msg.as_bytes()).ok()?;
        let p = pick_draining(
            &s,
            live,
            |n| draining.contains(n),
            |n, call_id| draining.contains(n) && diverted.contains(&call_id),
        )?;
        Some((*p.node, p.diverted_from.copied()))
    }

    /// A Call-ID that hashes to `owner` over `LIVE`.
    fn call_id_of(owner: &str, tag: &str) -> String {
        (0..)
            .map(|i| format!("{tag}-{i}"))
            .find(|c| rendezvous(c, &LIVE) == Some(&owner))
            .unwrap_or_default()
    }

    #[test]
    fn new_requests_avoid_a_draining_owner() {
        let others = ["p2", "p3"];
        for i in 0..20 {
            let call_id = call_id_of("p1", &format!("new-{i}"));
            let heir = rendezvous(&call_id, &others).copied();
            let invite = request("INVITE", "sip:b@x", &call_id);
            assert_eq!(
                pick_drained(&invite, &LIVE, &["p1"], &[]),
                heir.map(|h| (h, Some("p1"))),
                "an INVITE is diverted, and says from whom"
            );
            let register = request("REGISTER", "sip:x", &call_id);
            assert_eq!(pick_drained(&register, &LIVE, &["p1"], &[]), heir.map(|h| (h, None)));
        }
        // Call-IDs p1 does not own do not move at all.
        for i in 0..50 {
            let call_id = format!("other-{i}");
            let owner = rendezvous(&call_id, &LIVE).copied();
            if owner == Some("p1") {
                continue;
            }
            let invite = request("INVITE", "sip:b@x", &call_id);
            assert_eq!(pick_drained(&invite, &LIVE, &["p1"], &[]), owner.map(|o| (o, None)));
        }
    }

    #[test]
    fn a_draining_processor_keeps_what_names_it() {
        let call_id = call_id_of("p2", "named");
        let resp = response(&make_branch("p1", "abc"), &call_id);
        assert_eq!(pick_drained(&resp, &LIVE, &["p1"], &[]), Some(("p1", None)));
        let bye = request("BYE", &format!("sip:{}@h", make_contact_user("p1", "c")), &call_id);
        assert_eq!(pick_drained(&bye, &LIVE, &["p1"], &[]), Some(("p1", None)));
        // Even when every processor drains.
        assert_eq!(pick_drained(&bye, &LIVE, &LIVE, &[]), Some(("p1", None)));
    }

    #[test]
    fn cancel_and_ack_follow_their_invite_across_a_drain() {
        let call_id = call_id_of("p1", "cancel");
        let heir = rendezvous(&call_id, &["p2", "p3"]).copied().unwrap_or_default();
        for method in ["CANCEL", "ACK"] {
            let msg = request(method, "sip:b@x", &call_id);
            // Its INVITE reached p1 before the drain: p1 still gets it.
            assert_eq!(pick_drained(&msg, &LIVE, &["p1"], &[]), Some(("p1", None)));
            // Its INVITE was diverted: it follows to the same heir.
            assert_eq!(pick_drained(&msg, &LIVE, &["p1"], &[&call_id]), Some((heir, None)));
        }
        // An ACK naming a processor that is gone is a takeover: new work, not for p1.
        let ack = request("ACK", &format!("sip:{}@h", make_contact_user("p9", "c")), &call_id);
        assert_eq!(pick_drained(&ack, &LIVE, &["p1"], &[]), Some((heir, None)));
    }

    #[test]
    fn when_every_processor_drains_new_work_has_nowhere_to_go() {
        let call_id = call_id_of("p3", "all");
        assert_eq!(pick_drained(&request("INVITE", "sip:b@x", &call_id), &LIVE, &LIVE, &[]), None);
        // A CANCEL of an INVITE from before the drain still reaches its owner.
        let cancel = request("CANCEL", "sip:b@x", &call_id);
        assert_eq!(pick_drained(&cancel, &LIVE, &LIVE, &[]), Some(("p3", None)));
    }

    #[test]
    fn weight_is_stable() {
        // Pinned: a change here would re-route every call in a running cluster on upgrade.
        assert_eq!(fnv1a64(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(weight("p1", "call-1"), 0x604e_7c3a_182d_9cbd);
        assert_ne!(weight("p1", "call-1"), weight("p2", "call-1"));
        assert_ne!(weight("p1x", "y"), weight("p1", "xy"));
    }
}

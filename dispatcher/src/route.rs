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

use sipmsg::scan::{Scan, branch_token, uri_token};

/// The live processor that should handle the message, or `None` when none is live.
///
/// `live` is the set of connected processor ids (any order; duplicates are harmless).
pub fn pick<'a, N: AsRef<str>>(scan: &Scan<'_>, live: &'a [N]) -> Option<&'a N> {
    let token = if scan.method.is_some() {
        scan.request_uri.and_then(uri_token)
    } else {
        scan.top_branch.and_then(branch_token)
    };
    if let Some(token) = token
        && let Some(node) = live.iter().find(|n| n.as_ref() == token)
    {
        return Some(node);
    }
    // A message without Call-ID is broken; it still needs one deterministic owner, which
    // answers it with 400.
    rendezvous(scan.call_id.unwrap_or_default(), live)
}

/// Highest-random-weight choice of a node for `key`. Ties (astronomically unlikely) go to the
/// greater id, so the result never depends on the order of `live`.
pub fn rendezvous<'a, N: AsRef<str>>(key: &str, live: &'a [N]) -> Option<&'a N> {
    live.iter().max_by(|a, b| {
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

    #[test]
    fn weight_is_stable() {
        // Pinned: a change here would re-route every call in a running cluster on upgrade.
        assert_eq!(fnv1a64(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(weight("p1", "call-1"), 0x604e_7c3a_182d_9cbd);
        assert_ne!(weight("p1", "call-1"), weight("p2", "call-1"));
        assert_ne!(weight("p1x", "y"), weight("p1", "xy"));
    }
}

//! Identifiers the processor mints: Via branches and Contact users carrying its routing token,
//! tags, Call-IDs and billing call refs.
//!
//! Each carries 64 random bits after the routing token (plus a counter, so two are never equal
//! within a process). Nothing may be predictable: responses are matched by branch, dialogs by
//! Call-ID and tags, and a phone that sees its own keepalive's branch must not be able to guess
//! the branch of another user's ringing call and forge its answer.

use std::sync::atomic::{AtomicU64, Ordering};

/// Mints identifiers for one processor.
#[derive(Debug)]
pub struct Ids {
    node: String,
    counter: AtomicU64,
}

impl Ids {
    /// Identifiers for processor `node`.
    pub fn new(node: &str) -> Self {
        Ids { node: node.to_owned(), counter: AtomicU64::new(1) }
    }

    /// The processor id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// A counter (unique within the process) followed by 64 random bits, 13 base-36 digits.
    fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{}{:0>13}", base36(n), base36(rand::random::<u64>()))
    }

    /// A Via branch that routes responses back here.
    pub fn branch(&self) -> String {
        sipmsg::scan::make_branch(&self.node, &self.next())
    }

    /// A Contact user part that routes in-dialog requests back here.
    pub fn contact_user(&self) -> String {
        sipmsg::scan::make_contact_user(&self.node, &self.next())
    }

    /// A From/To tag; it names this processor, so an ACK for a non-2xx final we sent (which
    /// carries our To tag and no other token) comes back here.
    pub fn tag(&self) -> String {
        sipmsg::scan::make_tag(&self.node, &self.next())
    }

    /// A Call-ID for a new leg.
    pub fn call_id(&self) -> String {
        format!("{}-{}", self.node, self.next())
    }

    /// A call's id towards billing (its reservation, start and stop): one per authorized
    /// attempt, 128 random bits, so a caller can neither choose nor guess another call's.
    pub fn call_ref(&self) -> String {
        format!(
            "{}-{:0>13}{:0>13}",
            self.node,
            base36(rand::random::<u64>()),
            base36(rand::random::<u64>())
        )
    }
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut buf = Vec::with_capacity(13);
    loop {
        buf.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    buf.reverse();
    String::from_utf8(buf).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The part of `b` after the longest prefix it shares with `a`.
    fn differing_suffix<'a>(a: &str, b: &'a str) -> &'a str {
        let common = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
        &b[common..]
    }

    #[test]
    fn consecutive_ids_differ_in_at_least_eight_unpredictable_characters() {
        let ids = Ids::new("p2");
        for mint in [Ids::branch, Ids::tag, Ids::contact_user, Ids::call_id, Ids::call_ref] {
            let minted: Vec<String> = (0..50).map(|_| mint(&ids)).collect();
            for pair in minted.windows(2) {
                let suffix = differing_suffix(&pair[0], &pair[1]);
                assert!(suffix.len() >= 8, "{} -> {}: only {suffix:?} differs", pair[0], pair[1]);
            }
            // Not sequential: the last 13 characters (the random part) do not count up.
            let tails: Vec<u64> = minted
                .iter()
                .map(|m| u64::from_str_radix(&m[m.len() - 13..], 36).unwrap_or(0))
                .collect();
            let ascending = tails.windows(2).filter(|w| w[1] == w[0].wrapping_add(1)).count();
            assert!(ascending < 3, "random parts look sequential: {tails:?}");
            let mut unique = minted.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), 50);
        }
    }

    #[test]
    fn ids_carry_the_routing_token_and_are_unique() {
        let ids = Ids::new("p2");
        let b1 = ids.branch();
        let b2 = ids.branch();
        assert_ne!(b1, b2);
        assert_eq!(sipmsg::scan::branch_token(&b1), Some("p2"));
        let uri = format!("sip:{}@127.0.0.2:5060", ids.contact_user());
        assert_eq!(sipmsg::scan::uri_token(&uri), Some("p2"));
    }
}

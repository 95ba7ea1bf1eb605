//! Identifiers the processor mints: Via branches and Contact users carrying its routing token,
//! tags and Call-IDs. A random salt per process start keeps them unique across restarts.

use std::sync::atomic::{AtomicU64, Ordering};

/// Mints identifiers for one processor.
#[derive(Debug)]
pub struct Ids {
    node: String,
    salt: String,
    counter: AtomicU64,
}

impl Ids {
    /// Identifiers for processor `node`.
    pub fn new(node: &str) -> Self {
        Ids::with_salt(node, rand::random::<u32>())
    }

    /// Identifiers with a fixed salt (deterministic tests).
    pub fn with_salt(node: &str, salt: u32) -> Self {
        Ids { node: node.to_owned(), salt: base36(u64::from(salt)), counter: AtomicU64::new(1) }
    }

    /// The processor id.
    pub fn node(&self) -> &str {
        &self.node
    }

    fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{}{}", self.salt, base36(n))
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
        let unique = format!("{}{}", self.next(), base36(u64::from(rand::random::<u32>())));
        sipmsg::scan::make_tag(&self.node, &unique)
    }

    /// A Call-ID for a new leg.
    pub fn call_id(&self) -> String {
        format!("{}-{}-{}", self.node, self.next(), base36(rand::random::<u64>()))
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

    #[test]
    fn ids_carry_the_routing_token_and_are_unique() {
        let ids = Ids::with_salt("p2", 7);
        let b1 = ids.branch();
        let b2 = ids.branch();
        assert_ne!(b1, b2);
        assert_eq!(sipmsg::scan::branch_token(&b1), Some("p2"));
        let uri = format!("sip:{}@127.0.0.2:5060", ids.contact_user());
        assert_eq!(sipmsg::scan::uri_token(&uri), Some("p2"));
    }
}

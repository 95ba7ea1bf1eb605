//! The location store against a real `redis-server`: RFC 3261 §10.3 semantics of the atomic
//! REGISTER script.

use std::time::Duration;

use sipalias_processor::Error;
use sipalias_processor::location::{Location, RegisterMeta};
use sipalias_processor::registrar::{ContactUpdate, Update};
use sipalias_processor::transport::{Ingress, LocalAddr, Transport};
use sipalias_tests::redis::RedisServer;

const AOR: &str = "alice@sip.example.net";
const NOW: u64 = 1_800_000_000_000;

fn ingress() -> Ingress {
    Ingress {
        local: LocalAddr {
            addr: "127.0.0.2:5060".parse().expect("addr"),
            transport: Transport::Udp,
        },
        remote: "192.0.2.10:40000".parse().expect("addr"),
        connection_id: 0,
        dispatcher_id: "d1".into(),
    }
}

fn contact(uri: &str, expires: u32) -> ContactUpdate {
    ContactUpdate {
        field: uri.into(),
        contact: uri.into(),
        expires,
        q: None,
        instance: None,
        reg_id: None,
        nat: true,
    }
}

fn meta<'a>(call_id: &'a str, cseq: u32, ingress: &'a Ingress) -> RegisterMeta<'a> {
    RegisterMeta { call_id, cseq, ingress, user_agent: "test-phone", max_contacts: 0 }
}

async fn store(dir: &std::path::Path) -> (RedisServer, Location) {
    let redis = RedisServer::start(dir).expect("redis-server");
    let loc = Location::connect(&redis.url(), "t:", Duration::from_secs(2)).await.expect("connect");
    (redis, loc)
}

#[tokio::test]
async fn binding_records_ingress_and_expires() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_redis, loc) = store(dir.path()).await;
    let i = ingress();
    let b = loc
        .apply(
            AOR,
            &Update::Contacts(vec![contact("sip:alice@192.0.2.10:5060", 300)]),
            &meta("c1", 1, &i),
            NOW,
        )
        .await
        .expect("apply");
    assert_eq!(b.len(), 1);
    assert_eq!(
        (b[0].ingress.ip.to_string().as_str(), b[0].ingress.port, b[0].ingress.transport.as_str()),
        ("127.0.0.2", 5060, "udp")
    );
    assert_eq!(b[0].received.to_string(), "192.0.2.10:40000");
    assert_eq!(b[0].expires_at_ms, NOW + 300_000);
    let egress = b[0].egress().expect("egress");
    assert_eq!(egress.local.addr.to_string(), "127.0.0.2:5060");
    assert_eq!(egress.remote.to_string(), "192.0.2.10:40000", "behind NAT: the source address");
    assert!(loc.lookup(AOR, NOW + 300_001).await.expect("lookup").is_empty(), "expired");
    assert_eq!(loc.lookup(AOR, NOW + 1000).await.expect("lookup").len(), 1);
}

#[tokio::test]
async fn stale_cseq_from_the_same_call_id_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_redis, loc) = store(dir.path()).await;
    let i = ingress();
    let c = Update::Contacts(vec![contact("sip:alice@192.0.2.10", 300)]);
    loc.apply(AOR, &c, &meta("c1", 5, &i), NOW).await.expect("first");
    let refresh = Update::Contacts(vec![contact("sip:alice@192.0.2.10", 600)]);
    let err = loc.apply(AOR, &refresh, &meta("c1", 5, &i), NOW).await.expect_err("same CSeq");
    assert!(matches!(err, Error::OutOfOrder { .. }), "{err}");
    assert_eq!(loc.lookup(AOR, NOW).await.expect("lookup")[0].expires_at_ms, NOW + 300_000);
    // A higher CSeq refreshes; another Call-ID (a rebooted phone) may use any CSeq.
    loc.apply(AOR, &refresh, &meta("c1", 6, &i), NOW).await.expect("higher CSeq");
    let b = loc.apply(AOR, &c, &meta("c2", 1, &i), NOW).await.expect("new Call-ID");
    assert_eq!((b[0].call_id.as_str(), b[0].expires_at_ms), ("c2", NOW + 300_000));
}

#[tokio::test]
async fn several_contacts_zero_expires_and_wildcard_removal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_redis, loc) = store(dir.path()).await;
    let i = ingress();
    let two =
        Update::Contacts(vec![contact("sip:a@192.0.2.1", 300), contact("sip:a@192.0.2.2", 300)]);
    assert_eq!(loc.apply(AOR, &two, &meta("c1", 1, &i), NOW).await.expect("two").len(), 2);
    let remove_one = Update::Contacts(vec![contact("sip:a@192.0.2.1", 0)]);
    let left = loc.apply(AOR, &remove_one, &meta("c1", 2, &i), NOW).await.expect("remove one");
    assert_eq!(
        left.iter().map(|b| b.contact.as_str()).collect::<Vec<_>>(),
        vec!["sip:a@192.0.2.2"]
    );
    let none = loc.apply(AOR, &Update::RemoveAll, &meta("c1", 3, &i), NOW).await.expect("wildcard");
    assert!(none.is_empty());
    assert!(loc.lookup(AOR, NOW).await.expect("lookup").is_empty());
}

#[tokio::test]
async fn max_contacts_refuses_only_registers_that_add_beyond_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_redis, loc) = store(dir.path()).await;
    let i = ingress();
    let limited = |cseq| RegisterMeta { max_contacts: 3, ..meta("c1", cseq, &i) };
    let many = |from: u32, to: u32| {
        Update::Contacts((from..to).map(|n| contact(&format!("sip:a@192.0.2.{n}"), 300)).collect())
    };
    // 300 contacts at once: refused whole, nothing written.
    let err = loc.apply(AOR, &many(0, 300), &limited(1), NOW).await.expect_err("300");
    assert!(matches!(err, Error::TooManyContacts { max: 3, .. }), "{err}");
    assert_eq!(err.sip_status(), (403, "Too Many Contacts"));
    assert!(loc.lookup(AOR, NOW).await.expect("lookup").is_empty());
    // Up to the limit one by one, then one more is refused.
    for n in 0..3 {
        loc.apply(AOR, &many(n, n + 1), &limited(2 + n), NOW).await.expect("within the limit");
    }
    let err = loc.apply(AOR, &many(3, 4), &limited(10), NOW).await.expect_err("fourth");
    assert!(matches!(err, Error::TooManyContacts { .. }), "{err}");
    assert_eq!(loc.lookup(AOR, NOW).await.expect("lookup").len(), 3);
    // Refreshing, replacing one (remove + add in one REGISTER) and removing still pass.
    loc.apply(AOR, &many(0, 3), &limited(11), NOW).await.expect("refresh");
    let swap =
        Update::Contacts(vec![contact("sip:a@192.0.2.0", 0), contact("sip:a@192.0.2.9", 300)]);
    loc.apply(AOR, &swap, &limited(12), NOW).await.expect("swap");
    // Expired bindings do not count.
    let later = NOW + 300_001;
    let b = loc.apply(AOR, &many(20, 23), &limited(13), later).await.expect("after expiry");
    assert_eq!(b.len(), 3);
}

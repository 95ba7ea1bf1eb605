//! Accounts, digest checks, unrated accounting and the gRPC basics: what billing did before
//! it handled money, which must keep working for accounts created without billing options.

use std::collections::HashMap;

use sipalias_billing::account::{AccountSettings, Aor, Kind, Status};
use sipalias_billing::store::{AccountingOutcome, CallStart, CdrQuery};
use sipalias_billing::{BillingConfig, Error};
use sipalias_proto::billing::{
    AccountStatus, AccountingStartRequest, AccountingStopRequest, AuthorizeRequest, DenyReason,
    DigestAlgorithm, GetAccountRequest, VerifyDigestRequest,
};
use sipmsg::digest::{self, Algorithm, ResponseInput};

use crate::{env, now, stop};

fn aor(s: &str) -> Aor {
    Aor::parse(s).expect("aor")
}

/// What a UA would send for `password`.
fn digest_request(
    aor: &str,
    realm: &str,
    password: &str,
    alg: Algorithm,
    qop: Option<&str>,
) -> VerifyDigestRequest {
    let user = aor.split('@').next().unwrap_or_default();
    let input = ResponseInput {
        method: "REGISTER",
        uri: "sip:example.com",
        nonce: "nonce-1",
        qop,
        nc: "00000001",
        cnonce: "cn",
    };
    let response = digest::response(alg, &digest::ha1(alg, user, realm, password), &input);
    VerifyDigestRequest {
        aor: aor.to_owned(),
        username: user.to_owned(),
        realm: realm.to_owned(),
        nonce: input.nonce.to_owned(),
        uri: input.uri.to_owned(),
        response,
        qop: qop.unwrap_or_default().to_owned(),
        nc: input.nc.to_owned(),
        cnonce: input.cnonce.to_owned(),
        method: input.method.to_owned(),
        algorithm: match alg {
            Algorithm::Md5 => DigestAlgorithm::Md5 as i32,
            Algorithm::Sha256 => DigestAlgorithm::Sha256 as i32,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_and_service_against_real_redis() {
    let env = env("default_max_duration_secs = 3600").await;
    let store = &env.store;
    let all = CdrQuery::default();

    // Empty database: empty listings, not errors.
    assert!(store.list().await.expect("empty list").is_empty());
    assert!(store.list_cdrs(&all).await.expect("empty cdrs").is_empty());

    // --- accounts -------------------------------------------------------------------------
    let alice = aor("alice@Example.com");
    let created = store
        .add_account(&alice, "pw-a", &[], false, &AccountSettings::default(), None)
        .await
        .expect("add alice");
    assert_eq!(created.aor.to_string(), "alice@example.com");
    assert_eq!(created.status, Status::Active);
    // Without billing options: postpaid, no credit limit, default plan, no call limit.
    assert_eq!(created.kind, Kind::Postpaid);
    assert_eq!(
        (created.balance_micros, created.credit_limit_micros, created.rate_plan.as_deref()),
        (0, None, None)
    );
    assert_eq!(created.max_concurrent_calls, 0);
    let creds = created.realms.get("example.com").expect("default realm is the domain");
    assert_eq!(
        creds.ha1_md5.as_deref(),
        Some(digest::ha1(Algorithm::Md5, "alice", "example.com", "pw-a").as_str())
    );
    assert_eq!(
        creds.ha1_sha256.as_deref(),
        Some(digest::ha1(Algorithm::Sha256, "alice", "example.com", "pw-a").as_str())
    );

    // No silent overwrite; --force replaces the credentials.
    let again =
        store.add_account(&alice, "other", &[], false, &AccountSettings::default(), None).await;
    assert!(matches!(again, Err(Error::AccountExists(_))), "{again:?}");
    let realms = vec!["example.com".to_owned(), "alt.example".to_owned()];
    let replaced = store
        .add_account(&alice, "pw-a2", &realms, true, &AccountSettings::default(), None)
        .await
        .expect("force");
    assert_eq!(replaced.created_ms, created.created_ms);
    assert_eq!(replaced.realms.len(), 2);

    // Import an MD5 HA1 from elsewhere, then add SHA-256 for the same realm.
    let bob = aor("bob@example.com");
    let bob_md5 = digest::ha1(Algorithm::Md5, "bob", "example.com", "pw-b").to_ascii_uppercase();
    let imported =
        store.import_account(&bob, "example.com", Some(&bob_md5), None).await.expect("import md5");
    let c = imported.realms.get("example.com").expect("realm");
    assert_eq!(c.ha1_md5.as_deref(), Some(bob_md5.to_ascii_lowercase().as_str()));
    assert_eq!(c.ha1_sha256, None);
    let bob_sha = digest::ha1(Algorithm::Sha256, "bob", "example.com", "pw-b");
    let imported =
        store.import_account(&bob, "example.com", None, Some(&bob_sha)).await.expect("import sha");
    let c = imported.realms.get("example.com").expect("realm");
    assert!(c.ha1_md5.is_some() && c.ha1_sha256.is_some());
    let bad = store.import_account(&bob, "example.com", Some("abc"), None).await;
    assert!(matches!(bad, Err(Error::InvalidInput { .. })), "{bad:?}");
    let none = store.import_account(&bob, "example.com", None, None).await;
    assert!(matches!(none, Err(Error::InvalidInput { .. })), "{none:?}");

    let carol = aor("carol@example.com");
    store
        .add_account(&carol, "pw-c", &[], false, &AccountSettings::default(), None)
        .await
        .expect("add carol");
    store.set_status(&carol, Status::Blocked).await.expect("block");
    let missing = store.set_status(&aor("nobody@example.com"), Status::Blocked).await;
    assert!(matches!(missing, Err(Error::AccountNotFound(_))), "{missing:?}");
    assert_eq!(store.get(&aor("nobody@example.com")).await.expect("get"), None);

    let listed: Vec<(String, Status)> = store
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|a| (a.aor.to_string(), a.status))
        .collect();
    assert_eq!(
        listed,
        [
            ("alice@example.com".to_owned(), Status::Active),
            ("bob@example.com".to_owned(), Status::Active),
            ("carol@example.com".to_owned(), Status::Blocked),
        ]
    );

    // The documented key layout, read with a plain client.
    let mut raw = env.raw().await;
    let hash: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("t:acct:alice@example.com")
        .query_async(&mut raw)
        .await
        .expect("hgetall");
    let mut fields: Vec<&str> = hash.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "balance_micros",
            "created_ms",
            "ha1:md5:alt.example",
            "ha1:md5:example.com",
            "ha1:sha256:alt.example",
            "ha1:sha256:example.com",
            "kind",
            "status"
        ]
    );
    assert!(!hash.values().any(|v| v.contains("pw-a")), "no password stored");
    let mut members: Vec<String> =
        redis::cmd("SMEMBERS").arg("t:accts").query_async(&mut raw).await.expect("smembers");
    members.sort_unstable();
    assert_eq!(members, ["alice@example.com", "bob@example.com", "carol@example.com"]);

    // --- accounting (unrated: nobody has a rate plan) -----------------------------------
    let start = CallStart {
        call_ref: "call-1".to_owned(),
        caller: "alice@example.com".to_owned(),
        callee: "bob@example.com".to_owned(),
        caller_ingress_ip: "192.0.2.1".to_owned(),
        callee_ingress_ip: "192.0.2.2".to_owned(),
        answered_ms: 1_700_000_000_000,
    };
    let started = store.accounting_start(&start, now()).await.expect("start");
    assert_eq!(started.outcome, AccountingOutcome::Recorded);
    let first = store.accounting_stop(&stop("call-1", 1_700_000_065_432), now()).await;
    let first = first.expect("stop");
    assert_eq!((first.outcome, first.charge_micros), (AccountingOutcome::Charged, 0));
    let mut retry = stop("call-1", 1_700_000_099_999);
    retry.cause = "callee-bye".to_owned();
    let second = store.accounting_stop(&retry, now()).await.expect("retried stop");
    assert_eq!(second.outcome, AccountingOutcome::Duplicate);

    // A stop that overtook its start: recorded with what is known, completed by the start.
    let early = stop("call-2", 1_700_000_200_000);
    let early = store.accounting_stop(&early, now()).await.expect("stop 2");
    assert_eq!(early.outcome, AccountingOutcome::AwaitingStart);
    let cdrs = store.list_cdrs(&all).await.expect("cdrs");
    let c2 = cdrs.iter().find(|c| c.call_ref == "call-2").expect("call-2 listed");
    assert_eq!((c2.answered_ms, c2.duration_ms), (None, None));
    let start2 = CallStart {
        call_ref: "call-2".to_owned(),
        answered_ms: 1_700_000_150_000,
        ..start.clone()
    };
    let late = store.accounting_start(&start2, now()).await.expect("late start");
    assert_eq!(late.outcome, AccountingOutcome::Charged);

    let cdrs = store.list_cdrs(&CdrQuery { limit: 10, ..all.clone() }).await.expect("cdrs");
    assert_eq!(cdrs.len(), 2, "one record per call: {cdrs:?}");
    // Newest (by answer time) first.
    assert_eq!(cdrs[0].call_ref, "call-2");
    assert_eq!(cdrs[0].duration_ms, Some(50_000));
    let c1 = &cdrs[1];
    assert_eq!(c1.call_ref, "call-1");
    assert_eq!(c1.answered_ms, Some(1_700_000_000_000));
    assert_eq!(c1.ended_ms, Some(1_700_000_065_432));
    assert_eq!(c1.duration_ms, Some(65_432));
    assert_eq!(c1.cause, "caller-bye");
    assert_eq!(c1.stop_key.as_deref(), Some("call-1;stop"));
    assert_eq!(c1.caller_ingress_ip, "192.0.2.1");
    assert_eq!((c1.charge_micros, c1.billed_secs, c1.rate_plan.as_str()), (Some(0), None, ""));
    assert_eq!(
        store.list_cdrs(&CdrQuery { limit: 1, ..all.clone() }).await.expect("limit").len(),
        1
    );

    // --- gRPC service ---------------------------------------------------------------------
    let (mut rpc, server) = env.serve().await;

    let got = rpc
        .get_account(GetAccountRequest { aor: "alice@example.com".to_owned() })
        .await
        .expect("get")
        .into_inner();
    assert!(got.exists);
    assert_eq!(got.status(), AccountStatus::Active);
    let got = rpc
        .get_account(GetAccountRequest { aor: "ghost@example.com".to_owned() })
        .await
        .expect("get")
        .into_inner();
    assert!(!got.exists);
    assert_eq!(got.status(), AccountStatus::Unspecified);

    // Correct MD5 (qop=auth) and SHA-256 (no qop) responses.
    for (alg, qop) in [(Algorithm::Md5, Some("auth")), (Algorithm::Sha256, None)] {
        let req = digest_request("alice@example.com", "alt.example", "pw-a2", alg, qop);
        let r = rpc.verify_digest(req).await.expect("verify").into_inner();
        assert!(r.valid, "{alg:?}: {}", r.reason);
        assert_eq!(r.status(), AccountStatus::Active);
    }
    // Unspecified algorithm means MD5; imported HA1s work.
    let mut req = digest_request("bob@example.com", "example.com", "pw-b", Algorithm::Md5, None);
    req.algorithm = DigestAlgorithm::Unspecified as i32;
    assert!(rpc.verify_digest(req).await.expect("verify").into_inner().valid);

    // The old password no longer works after --force.
    let req = digest_request("alice@example.com", "example.com", "pw-a", Algorithm::Md5, None);
    let r = rpc.verify_digest(req).await.expect("verify").into_inner();
    assert!(!r.valid);
    assert_eq!(r.reason, "mismatch");

    let req = digest_request("alice@example.com", "nowhere", "pw-a2", Algorithm::Sha256, None);
    let r = rpc.verify_digest(req).await.expect("verify").into_inner();
    assert_eq!((r.valid, r.reason.as_str()), (false, "no credentials for realm nowhere"));

    let req = digest_request("ghost@example.com", "example.com", "x", Algorithm::Md5, None);
    let r = rpc.verify_digest(req).await.expect("verify").into_inner();
    assert_eq!((r.valid, r.reason.as_str()), (false, "unknown account"));
    assert_eq!(r.status(), AccountStatus::Unspecified);

    let req = digest_request(
        "alice@example.com",
        "example.com",
        "pw-a2",
        Algorithm::Md5,
        Some("auth-int"),
    );
    let r = rpc.verify_digest(req).await.expect("verify").into_inner();
    assert_eq!((r.valid, r.reason.as_str()), (false, "unsupported qop"));

    // Blocked with the right password: valid, and the status says blocked.
    let req = digest_request("carol@example.com", "example.com", "pw-c", Algorithm::Md5, None);
    let r = rpc.verify_digest(req).await.expect("verify").into_inner();
    assert!(r.valid, "{}", r.reason);
    assert_eq!(r.status(), AccountStatus::Blocked);

    let authorize = |caller: &str| AuthorizeRequest {
        caller: caller.to_owned(),
        callee: "bob@example.com".to_owned(),
        call_id: "cid".to_owned(),
        ingress_ip: "192.0.2.1".to_owned(),
        call_ref: format!("cid;{caller}"),
        credentials: None,
    };
    // An account created without billing options may call (unrated, capped by the config).
    let a = rpc.authorize(authorize("alice@example.com")).await.expect("authorize").into_inner();
    assert!(a.allowed);
    assert_eq!(a.max_duration_secs, 3600);
    assert_eq!(a.deny(), DenyReason::Unspecified);
    let a = rpc.authorize(authorize("carol@example.com")).await.expect("authorize").into_inner();
    assert_eq!((a.allowed, a.reason.as_str()), (false, "account blocked"));
    assert_eq!(a.deny(), DenyReason::Blocked);
    let a = rpc.authorize(authorize("ghost@example.com")).await.expect("authorize").into_inner();
    assert_eq!((a.allowed, a.reason.as_str()), (false, "unknown caller"));
    assert_eq!(a.deny(), DenyReason::UnknownAccount);
    let a = rpc.authorize(authorize("not an aor")).await.expect("authorize").into_inner();
    assert_eq!(a.deny(), DenyReason::UnknownAccount);
    let no_ref = AuthorizeRequest { call_ref: String::new(), ..authorize("alice@example.com") };
    let err = rpc.authorize(no_ref).await.expect_err("empty call_ref");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // Authorize with the caller's credentials: checked first, in the same round trip.
    let with = |caller: &str, creds: VerifyDigestRequest| AuthorizeRequest {
        call_ref: format!("cid-creds;{caller}"),
        credentials: Some(creds),
        ..authorize(caller)
    };
    let good = digest_request("alice@example.com", "alt.example", "pw-a2", Algorithm::Md5, None);
    let a = rpc.authorize(with("alice@example.com", good.clone())).await.expect("authorize");
    assert!(a.get_ref().allowed, "{}", a.get_ref().reason);
    let bad = digest_request("alice@example.com", "example.com", "pw-a", Algorithm::Md5, None);
    let a = rpc.authorize(with("alice@example.com", bad)).await.expect("authorize").into_inner();
    assert_eq!(
        (a.allowed, a.deny(), a.reason.as_str()),
        (false, DenyReason::BadCredentials, "mismatch")
    );
    // Credentials of another account do not authorize this caller.
    let a = rpc.authorize(with("carol@example.com", good)).await.expect("authorize").into_inner();
    assert_eq!(a.deny(), DenyReason::BadCredentials);
    // Blocked with the right password: the call is refused for the status, not challenged.
    let carol = digest_request("carol@example.com", "example.com", "pw-c", Algorithm::Md5, None);
    let a = rpc.authorize(with("carol@example.com", carol)).await.expect("authorize").into_inner();
    assert_eq!((a.allowed, a.deny()), (false, DenyReason::Blocked));
    let ghost = digest_request("ghost@example.com", "example.com", "pw", Algorithm::Md5, None);
    let a = rpc.authorize(with("ghost@example.com", ghost)).await.expect("authorize").into_inner();
    assert_eq!((a.deny(), a.reason.as_str()), (DenyReason::BadCredentials, "unknown account"));

    let r = rpc
        .accounting_start(AccountingStartRequest {
            call_ref: "call-3".to_owned(),
            caller: "alice@example.com".to_owned(),
            callee: "bob@example.com".to_owned(),
            answered_at_ms: 1_700_000_300_000,
            callee_ingress_ip: "192.0.2.2".to_owned(),
            caller_ingress_ip: "192.0.2.1".to_owned(),
        })
        .await
        .expect("accounting start")
        .into_inner();
    assert!(r.recorded);
    for _ in 0..2 {
        let r = rpc
            .accounting_stop(AccountingStopRequest {
                call_ref: "call-3".to_owned(),
                ended_at_ms: 1_700_000_301_500,
                cause: "caller-bye".to_owned(),
                idempotency_key: "k3".to_owned(),
                answered: true,
                start: None,
                ..Default::default()
            })
            .await
            .expect("accounting stop")
            .into_inner();
        assert!(r.recorded, "a retried stop is reported as recorded");
        assert_eq!(r.charge_micros, 0, "unrated");
    }
    let newest = store.list_cdrs(&CdrQuery { limit: 1, ..all.clone() }).await.expect("cdrs");
    assert_eq!(newest[0].call_ref, "call-3");
    assert_eq!(newest[0].duration_ms, Some(1_500));

    let empty = rpc
        .accounting_stop(AccountingStopRequest { call_ref: String::new(), ..Default::default() })
        .await;
    assert_eq!(empty.expect_err("empty call_ref").code(), tonic::Code::InvalidArgument);

    // A failed attempt's fields from a hostile or broken processor: a status that is not a
    // SIP status or an ingress that is not an IP is refused; text is cut and cleaned.
    let attempt = |status: u32, ip: &str, reason: &str| AccountingStopRequest {
        call_ref: format!("attempt-{status}-{}", reason.len()),
        ended_at_ms: 1_700_000_400_000,
        cause: "refused".to_owned(),
        idempotency_key: format!("attempt-{status}-{};stop", reason.len()),
        status,
        reason: reason.to_owned(),
        caller: "alice@example.com".to_owned(),
        callee: "x\r\nInjected: 1".repeat(100),
        caller_ingress_ip: ip.to_owned(),
        ..Default::default()
    };
    for (status, ip) in [(99, ""), (700, ""), (u32::MAX, ""), (404, "127.0.0.x"), (404, "::1:")] {
        let refused = rpc.accounting_stop(attempt(status, ip, "")).await;
        assert_eq!(
            refused.expect_err("hostile attempt").code(),
            tonic::Code::InvalidArgument,
            "status {status}, ip {ip:?}"
        );
    }
    let long = "Busy\u{1b}[2J\n".repeat(100);
    rpc.accounting_stop(attempt(486, "127.0.0.2", &long)).await.expect("a failed attempt");
    let cdrs = store.list_cdrs(&all).await.expect("cdrs");
    let cdr = cdrs.iter().find(|c| c.status == Some(486)).expect("the attempt's CDR");
    assert_eq!(cdr.reason.chars().count(), 128);
    assert_eq!(cdr.callee.chars().count(), 256);
    assert!(!cdr.reason.chars().chain(cdr.callee.chars()).any(char::is_control), "{cdr:?}");

    // Redis gone: RPCs fail with UNAVAILABLE rather than a wrong answer.
    env.redis.process().expect("redis-server running").kill().expect("kill redis-server");
    let err = rpc
        .get_account(GetAccountRequest { aor: "alice@example.com".to_owned() })
        .await
        .expect_err("redis is down");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");

    server.shutdown().await;
}

#[tokio::test]
async fn serve_fails_clearly_without_redis() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("redis+unix://{}", dir.path().join("absent.sock").display());
    let config =
        BillingConfig::from_toml_str(&format!("[billing]\nredis_url = {url:?}\n")).expect("config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let result = sipalias_billing::serve(config, listener, std::future::pending()).await;
    assert!(matches!(result, Err(Error::RedisConnect { .. })), "{result:?}");
}

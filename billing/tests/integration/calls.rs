//! Authorization and accounting with money: reservations, limits, charges, idempotency, and
//! the races the Lua scripts exist for.

use std::collections::HashMap;

use sipalias_billing::account::{AccountSettings, Kind};
use sipalias_billing::store::{
    AccountingOutcome, Authorization, CallStart, CallStop, CdrQuery, Denial,
};
use sipalias_proto::billing::{
    AccountingStartRequest, AccountingStopRequest, AuthorizeRequest, DenyReason,
};

use crate::{ONE, TEN_CENTS, all, env, now, rate, start, stop, unanswered};

const UK: &str = "+442071234567@example.com";

fn allowed(a: Authorization) -> (u32, i64) {
    match a {
        Authorization::Allowed { max_duration_secs, reserved_micros, .. } => {
            (max_duration_secs, reserved_micros)
        }
        Authorization::Denied(d) => panic!("denied: {d:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_unit_at_ten_cents_a_minute_buys_600_seconds_and_is_debited_once() {
    let env = env("default_max_duration_secs = 3600").await;
    env.store.set_rate("retail", "44", &rate(TEN_CENTS, 0, 60, 60)).await.expect("rate");
    let alice = env.prepaid("alice", ONE, "retail").await;
    let (mut rpc, server) = env.serve().await;

    let request = AuthorizeRequest {
        caller: alice.to_string(),
        callee: UK.to_owned(),
        call_id: "cid-1".to_owned(),
        ingress_ip: "192.0.2.1".to_owned(),
        call_ref: "cid-1;tag".to_owned(),
        credentials: None,
    };
    let a = rpc.authorize(request.clone()).await.expect("authorize").into_inner();
    assert!(a.allowed, "{}", a.reason);
    assert_eq!(a.max_duration_secs, 600);
    assert_eq!(a.deny(), DenyReason::Unspecified);
    // The whole balance is held for the call...
    assert_eq!(env.held(&alice).await, (1, ONE));
    // ... so a second call is refused, while the INVITE retransmitted after a billing timeout
    // gets the first answer and holds nothing more.
    let second = AuthorizeRequest { call_ref: "cid-2;tag".to_owned(), ..request.clone() };
    let d = rpc.authorize(second).await.expect("authorize").into_inner();
    assert_eq!(
        (d.allowed, d.deny(), d.reason.as_str()),
        (false, DenyReason::InsufficientFunds, "insufficient funds")
    );
    let again = rpc.authorize(request.clone()).await.expect("authorize").into_inner();
    assert_eq!((again.allowed, again.max_duration_secs), (true, 600));
    assert_eq!(env.held(&alice).await, (1, ONE));

    // The documented layout of the reservation and the call record.
    let mut raw = env.raw().await;
    let resv: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("t:resv:alice@example.com")
        .query_async(&mut raw)
        .await
        .expect("reservations");
    let (amount, expires) = resv["cid-1;tag"].split_once(':').expect("amount:expires");
    assert_eq!(amount, "1000000");
    let expires: u64 = expires.parse().expect("expires ms");
    assert!(expires >= now() + 600_000 + 3_500_000, "lapses an hour after the max duration");
    let call: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("t:call:cid-1;tag")
        .query_async(&mut raw)
        .await
        .expect("call record");
    for (field, value) in [
        ("state", "authorized"),
        ("aor", "alice@example.com"),
        ("max_duration_secs", "600"),
        ("reserved_micros", "1000000"),
        ("rated", "1"),
        ("rate_plan", "retail"),
        ("rate_prefix", "44"),
        ("rate_micros_per_minute", "100000"),
        ("first_increment_secs", "60"),
    ] {
        assert_eq!(call.get(field).map(String::as_str), Some(value), "{field}: {call:?}");
    }

    // Answered, 2 min 5 s: three minutes at 0.10. The start travels with the stop, as
    // processors send it; the pair delivered twice charges once.
    let t0 = 1_700_000_000_000;
    let stop_request = AccountingStopRequest {
        call_ref: "cid-1;tag".to_owned(),
        ended_at_ms: t0 + 125_000,
        cause: "max-duration".to_owned(),
        idempotency_key: "cid-1;tag;stop".to_owned(),
        answered: true,
        start: Some(AccountingStartRequest {
            call_ref: "cid-1;tag".to_owned(),
            caller: alice.to_string(),
            callee: UK.to_owned(),
            answered_at_ms: t0,
            caller_ingress_ip: "192.0.2.1".to_owned(),
            callee_ingress_ip: "192.0.2.2".to_owned(),
        }),
        ..Default::default()
    };
    let mismatched = AccountingStopRequest { call_ref: "other".to_owned(), ..stop_request.clone() };
    let err = rpc.accounting_stop(mismatched).await.expect_err("start of another call");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    for _ in 0..2 {
        let r = rpc.accounting_stop(stop_request.clone()).await.expect("stop").into_inner();
        assert!(r.recorded);
        assert_eq!(r.charge_micros, 300_000);
    }
    assert_eq!(env.balance(&alice).await, 700_000);
    assert_eq!(env.held(&alice).await, (0, 0));

    let cdr = &env.store.list_cdrs(&CdrQuery::default()).await.expect("cdrs")[0];
    assert_eq!(cdr.call_ref, "cid-1;tag");
    assert_eq!((cdr.caller.as_str(), cdr.callee.as_str()), ("alice@example.com", UK));
    assert_eq!(
        (cdr.caller_ingress_ip.as_str(), cdr.callee_ingress_ip.as_str()),
        ("192.0.2.1", "192.0.2.2")
    );
    assert_eq!(
        (cdr.duration_ms, cdr.billed_secs, cdr.max_duration_secs),
        (Some(125_000), Some(180), Some(600))
    );
    assert_eq!((cdr.rate_plan.as_str(), cdr.rate_prefix.as_str()), ("retail", "44"));
    assert_eq!((cdr.charge_micros, cdr.cause.as_str()), (Some(300_000), "max-duration"));

    // The call is over: a late Authorize for it reserves nothing.
    let late = rpc.authorize(request).await.expect("authorize").into_inner();
    assert!(!late.allowed);
    assert_eq!(env.held(&alice).await, (0, 0));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_call_limit_with_ten_at_once_allows_five() {
    let env = env("").await;
    let settings = AccountSettings { max_concurrent_calls: Some(5), ..AccountSettings::default() };
    let alice = env.account("alice", settings, None).await;
    let (rpc, server) = env.serve().await;

    let answers = all((0..10)
        .map(|i| {
            let mut rpc = rpc.clone();
            let caller = alice.to_string();
            async move {
                let req = AuthorizeRequest {
                    caller,
                    callee: "bob@example.com".to_owned(),
                    call_id: format!("c{i}"),
                    ingress_ip: "192.0.2.1".to_owned(),
                    call_ref: format!("c{i};t"),
                    credentials: None,
                };
                rpc.authorize(req).await.expect("authorize").into_inner()
            }
        })
        .collect())
    .await;
    let allowed = answers.iter().filter(|a| a.allowed).count();
    let refused: Vec<_> = answers.iter().filter(|a| !a.allowed).collect();
    assert_eq!(allowed, 5);
    assert_eq!(refused.len(), 5);
    for r in refused {
        assert_eq!((r.deny(), r.reason.as_str()), (DenyReason::TooManyCalls, "too many calls"));
    }
    assert_eq!(env.held(&alice).await.0, 5);

    // One call ends without an answer: its slot is free for the next call.
    let ended = answers.iter().position(|a| a.allowed).expect("an allowed call");
    env.store
        .accounting_stop(&unanswered(&format!("c{ended};t"), now()), now())
        .await
        .expect("stop");
    let next = env.store.authorize(&alice.to_string(), "bob@example.com", "c10;t", now()).await;
    allowed_or_panic(next.expect("authorize"));
    server.shutdown().await;
}

fn allowed_or_panic(a: Authorization) {
    assert!(matches!(a, Authorization::Allowed { .. }), "{a:?}");
}

/// 200 authorizations race on one prepaid balance, each wanting a minute: exactly what the
/// balance covers is granted, the reservations never exceed it, and after every stop (random
/// durations within each call's limit, some unanswered) the balance is the initial one minus
/// the sum of the charges, and not below zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_racing_calls_never_overdraw_a_prepaid_balance() {
    let env = env("default_max_duration_secs = 60").await;
    env.store.set_rate("retail", "default", &rate(TEN_CENTS, 0, 1, 1)).await.expect("rate");
    // 10.00 buys exactly 100 one-minute calls (0.10 each).
    let initial = 10 * ONE;
    let alice = env.prepaid("alice", initial, "retail").await;

    let store = env.store.clone();
    let caller = alice.to_string();
    let answers = all((0..200)
        .map(|i| {
            let (store, caller) = (store.clone(), caller.clone());
            async move {
                let call_ref = format!("race-{i}");
                let a = store.authorize(&caller, "33123456@example.com", &call_ref, now()).await;
                (call_ref, a.expect("authorize"))
            }
        })
        .collect())
    .await;

    let mut granted = Vec::new();
    for (call_ref, a) in &answers {
        match a {
            Authorization::Allowed { max_duration_secs, reserved_micros, .. } => {
                assert_eq!((*max_duration_secs, *reserved_micros), (60, TEN_CENTS));
                granted.push((call_ref.clone(), *max_duration_secs));
            }
            Authorization::Denied(d) => assert_eq!(*d, Denial::InsufficientFunds),
        }
    }
    assert_eq!(granted.len(), 100);
    let (calls, held) = env.held(&alice).await;
    assert_eq!((calls, held), (100, initial));

    // Stop every call concurrently, each after a pseudo-random duration within its limit.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let t0 = 1_700_000_000_000;
    let stops: Vec<_> = granted
        .iter()
        .map(|(call_ref, max)| {
            let answered = next() % 5 != 0;
            let duration_ms = next() % (u64::from(*max) * 1000 + 1);
            (call_ref.clone(), answered, duration_ms)
        })
        .collect();
    let results = all(stops
        .iter()
        .cloned()
        .map(|(call_ref, answered, duration_ms)| {
            let (store, alice) = (store.clone(), alice.clone());
            async move {
                if answered {
                    let s = start(&call_ref, &alice, "33123456@example.com", t0);
                    store.accounting_start(&s, now()).await.expect("start");
                    store.accounting_stop(&stop(&call_ref, t0 + duration_ms), now()).await
                } else {
                    store.accounting_stop(&unanswered(&call_ref, t0), now()).await
                }
            }
        })
        .collect())
    .await;
    let mut charged = 0;
    for ((_, answered, duration_ms), r) in stops.iter().zip(results) {
        let r = r.expect("stop");
        if *answered {
            assert_eq!(r.outcome, AccountingOutcome::Charged);
            // Per second at 0.10 a minute, at least one second.
            let secs = duration_ms.div_ceil(1000).max(1);
            assert_eq!(r.charge_micros, i64::try_from((secs * 100_000).div_ceil(60)).expect("i64"));
        } else {
            assert_eq!((r.outcome, r.charge_micros), (AccountingOutcome::Released, 0));
        }
        charged += r.charge_micros;
    }
    let balance = env.balance(&alice).await;
    assert_eq!(balance, initial - charged);
    assert!(balance >= 0, "{balance}");
    assert_eq!(env.held(&alice).await, (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_delivered_twice_charges_once_whatever_its_key() {
    let env = env("").await;
    env.store.set_rate("retail", "", &rate(TEN_CENTS, 50_000, 30, 6)).await.expect("rate");
    let alice = env.prepaid("alice", 2 * ONE, "retail").await;
    allowed(env.store.authorize(&alice.to_string(), UK, "dup", now()).await.expect("authorize"));
    let t0 = 1_700_000_000_000;
    env.store.accounting_start(&start("dup", &alice, UK, t0), now()).await.expect("start");

    // 31 s → 36 s billed: 0.05 fee + 36 × 0.10 / 60 = 0.11.
    let first = env.store.accounting_stop(&stop("dup", t0 + 31_000), now()).await.expect("stop");
    assert_eq!((first.outcome, first.charge_micros), (AccountingOutcome::Charged, 110_000));
    let retry = env.store.accounting_stop(&stop("dup", t0 + 31_000), now()).await.expect("retry");
    assert_eq!((retry.outcome, retry.charge_micros), (AccountingOutcome::Duplicate, 110_000));
    // Another path's stop for the same call (other key, other time) changes nothing either.
    let mut other = stop("dup", t0 + 99_000);
    other.idempotency_key = "other".to_owned();
    let other = env.store.accounting_stop(&other, now()).await.expect("other stop");
    assert_eq!((other.outcome, other.charge_micros), (AccountingOutcome::Duplicate, 110_000));
    // And a replayed start neither.
    let replay = env.store.accounting_start(&start("dup", &alice, UK, t0 - 5_000), now()).await;
    assert_eq!(replay.expect("replayed start").outcome, AccountingOutcome::Duplicate);

    assert_eq!(env.balance(&alice).await, 2 * ONE - 110_000);
    let cdr = &env.store.list_cdrs(&CdrQuery::default()).await.expect("cdrs")[0];
    assert_eq!((cdr.duration_ms, cdr.stop_key.as_deref()), (Some(31_000), Some("dup;stop")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_stop_releases_the_reservation_and_records_the_failed_attempt() {
    let env = env("").await;
    env.store.set_rate("retail", "44", &rate(TEN_CENTS, 0, 60, 60)).await.expect("rate");
    let alice = env.prepaid("alice", ONE, "retail").await;
    allowed(env.store.authorize(&alice.to_string(), UK, "c1", now()).await.expect("authorize"));
    assert_eq!(env.held(&alice).await, (1, ONE));
    assert_eq!(env.store.reservations_held().await.expect("count"), 1, "the metrics gauge");

    let busy = CallStop {
        status: 486,
        reason: "Busy Here".to_owned(),
        caller_ingress_ip: "127.0.0.2".to_owned(),
        ..unanswered("c1", now())
    };
    let r = env.store.accounting_stop(&busy, now()).await.expect("stop");
    assert_eq!((r.outcome, r.charge_micros), (AccountingOutcome::Released, 0));
    let again = env.store.accounting_stop(&busy, now()).await.expect("retried stop");
    assert_eq!((again.outcome, again.charge_micros), (AccountingOutcome::Duplicate, 0));
    assert_eq!(env.held(&alice).await, (0, 0));
    assert_eq!(env.store.reservations_held().await.expect("count"), 0);
    assert_eq!(env.balance(&alice).await, ONE);
    let cdrs = env.store.list_cdrs(&CdrQuery::default()).await.expect("cdrs");
    assert_eq!(cdrs.len(), 1, "{cdrs:?}");
    let cdr = &cdrs[0];
    assert_eq!(
        (cdr.caller.as_str(), cdr.callee.as_str(), cdr.status, cdr.reason.as_str()),
        (alice.to_string().as_str(), UK, Some(486), "Busy Here")
    );
    assert_eq!((cdr.cause.as_str(), cdr.caller_ingress_ip.as_str()), ("cancelled", "127.0.0.2"));
    assert_eq!((cdr.answered_ms, cdr.charge_micros, cdr.duration_ms), (None, Some(0), None));
    // A start arriving late for it (it cannot, from processors) charges nothing.
    let late = CallStart {
        call_ref: "c1".to_owned(),
        caller: alice.to_string(),
        callee: UK.to_owned(),
        caller_ingress_ip: String::new(),
        callee_ingress_ip: String::new(),
        answered_ms: now(),
    };
    let r = env.store.accounting_start(&late, now()).await.expect("late start");
    assert_eq!((r.outcome, r.charge_micros), (AccountingOutcome::Duplicate, 0));
    assert_eq!(env.balance(&alice).await, ONE);

    // An attempt billing authorized nothing for (a callee that does not exist): the stop
    // carries who called whom.
    let refused = CallStop {
        status: 404,
        reason: "Not Found".to_owned(),
        caller: alice.to_string(),
        callee: "nobody@example.com".to_owned(),
        cause: "refused".to_owned(),
        ..unanswered("c-refused", now())
    };
    let r = env.store.accounting_stop(&refused, now()).await.expect("refused stop");
    assert_eq!(r.outcome, AccountingOutcome::Released);
    let by_alice = CdrQuery { aor: Some(alice.to_string()), ..CdrQuery::default() };
    let cdrs = env.store.list_cdrs(&by_alice).await.expect("cdrs");
    let cdr = cdrs.iter().find(|c| c.call_ref == "c-refused").expect("the refused attempt");
    assert_eq!((cdr.callee.as_str(), cdr.status), ("nobody@example.com", Some(404)));
    assert_eq!(env.balance(&alice).await, ONE);
    // A late Authorize of the released call does not reserve again; a new call may use it all.
    let late = env.store.authorize(&alice.to_string(), UK, "c1", now()).await.expect("authorize");
    assert_eq!(late, Authorization::Denied(Denial::CallEnded));
    assert_eq!(
        allowed(env.store.authorize(&alice.to_string(), UK, "c2", now()).await.expect("c2")),
        (600, ONE)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_before_its_start_is_charged_when_the_start_arrives() {
    let env = env("").await;
    env.store.set_rate("retail", "44", &rate(TEN_CENTS, 0, 1, 1)).await.expect("rate");
    let alice = env.prepaid("alice", ONE, "retail").await;
    allowed(
        env.store.authorize(&alice.to_string(), UK, "late-start", now()).await.expect("authorize"),
    );
    let t0 = 1_700_000_000_000;

    let s = env.store.accounting_stop(&stop("late-start", t0 + 30_000), now()).await.expect("stop");
    assert_eq!((s.outcome, s.charge_micros), (AccountingOutcome::AwaitingStart, 0));
    // The funds stay held until the start says how long the call was.
    assert_eq!(env.held(&alice).await.0, 1);
    let r = env
        .store
        .accounting_start(&start("late-start", &alice, UK, t0), now())
        .await
        .expect("start");
    assert_eq!((r.outcome, r.charge_micros), (AccountingOutcome::Charged, 50_000));
    assert_eq!(env.balance(&alice).await, ONE - 50_000);
    assert_eq!(env.held(&alice).await, (0, 0));
    let retry =
        env.store.accounting_stop(&stop("late-start", t0 + 30_000), now()).await.expect("retry");
    assert_eq!((retry.outcome, retry.charge_micros), (AccountingOutcome::Duplicate, 50_000));
}

/// A call connected without authorization (the processor's `allow` policy while billing was
/// down) is rated with the caller's current plan when its accounting arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_was_never_authorized_is_rated_at_its_stop() {
    let env = env("").await;
    env.store.set_rate("retail", "44", &rate(TEN_CENTS, 0, 60, 60)).await.expect("rate");
    let alice = env.prepaid("alice", ONE, "retail").await;
    let t0 = 1_700_000_000_000;
    env.store.accounting_start(&start("outage", &alice, UK, t0), now()).await.expect("start");
    let r = env.store.accounting_stop(&stop("outage", t0 + 61_000), now()).await.expect("stop");
    assert_eq!((r.outcome, r.charge_micros), (AccountingOutcome::Charged, 200_000));
    assert_eq!(env.balance(&alice).await, 800_000);
    let cdr = &env.store.list_cdrs(&CdrQuery::default()).await.expect("cdrs")[0];
    assert_eq!((cdr.rate_prefix.as_str(), cdr.max_duration_secs), ("44", None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_in_order_and_postpaid_credit() {
    let env = env("default_max_duration_secs = 7200\ndefault_rate_plan = \"std\"").await;
    env.store.set_rate("std", "44", &rate(TEN_CENTS, 0, 60, 60)).await.expect("rate");
    let authorize = |caller: String, callee: &'static str, call_ref: &'static str| {
        let store = env.store.clone();
        async move { store.authorize(&caller, callee, call_ref, now()).await.expect("authorize") }
    };

    // Postpaid with a credit limit of 1.00 and a zero balance: 600 s, like prepaid 1.00.
    let settings =
        AccountSettings { credit_limit_micros: Some(Some(ONE)), ..AccountSettings::default() };
    let post = env.account("post", settings, None).await;
    assert_eq!(allowed(authorize(post.to_string(), UK, "p1").await), (600, ONE));
    assert_eq!(
        authorize(post.to_string(), UK, "p2").await,
        Authorization::Denied(Denial::InsufficientFunds)
    );

    // Postpaid without a limit: the configured cap, nothing held; the default plan applies.
    let open = env.account("open", AccountSettings::default(), None).await;
    assert_eq!(allowed(authorize(open.to_string(), UK, "o1").await), (7200, 0));
    // No rate for France in the default plan.
    assert_eq!(
        authorize(open.to_string(), "+33123@example.com", "o2").await,
        Authorization::Denied(Denial::NoRate)
    );
    // Blocked comes before no rate, unknown before everything.
    env.store.set_status(&open, sipalias_billing::account::Status::Blocked).await.expect("block");
    assert_eq!(
        authorize(open.to_string(), "+33123@example.com", "o3").await,
        Authorization::Denied(Denial::Blocked)
    );
    assert_eq!(
        authorize("ghost@example.com".to_owned(), UK, "g1").await,
        Authorization::Denied(Denial::UnknownAccount)
    );

    // A prepaid account at zero, and one whose rate plan was deleted.
    let broke = env.prepaid("broke", 0, "std").await;
    assert_eq!(
        authorize(broke.to_string(), UK, "b1").await,
        Authorization::Denied(Denial::InsufficientFunds)
    );
    env.store.set_rate("gone", "44", &rate(1, 0, 1, 1)).await.expect("rate");
    let orphan = env.prepaid("orphan", ONE, "gone").await;
    env.store.delete_rate_plan("gone", None).await.expect("delete plan");
    assert_eq!(
        authorize(orphan.to_string(), UK, "x1").await,
        Authorization::Denied(Denial::NoRate)
    );

    // Switching kind and limits with `account set`.
    let changed = env
        .store
        .update_account(
            &broke,
            &AccountSettings {
                kind: Some(Kind::Postpaid),
                credit_limit_micros: Some(Some(TEN_CENTS)),
                ..AccountSettings::default()
            },
        )
        .await
        .expect("set");
    assert_eq!((changed.kind, changed.credit_limit_micros), (Kind::Postpaid, Some(TEN_CENTS)));
    assert_eq!(allowed(authorize(broke.to_string(), UK, "b2").await), (60, TEN_CENTS));
    let missing = env
        .store
        .update_account(
            &broke,
            &AccountSettings {
                rate_plan: Some(Some("nope".to_owned())),
                ..AccountSettings::default()
            },
        )
        .await;
    assert!(matches!(missing, Err(sipalias_billing::Error::RatePlanNotFound(_))), "{missing:?}");
}

/// A reservation whose stop never comes lapses an hour after the call's longest duration:
/// shown on a virtual clock (the `now` given to the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_stop_holds_funds_only_until_the_reservation_lapses() {
    let env = env("").await;
    env.store.set_rate("retail", "44", &rate(TEN_CENTS, 0, 60, 60)).await.expect("rate");
    let settings = AccountSettings {
        kind: Some(Kind::Prepaid),
        rate_plan: Some(Some("retail".to_owned())),
        max_concurrent_calls: Some(1),
        ..AccountSettings::default()
    };
    let alice = env.account("alice", settings, Some(ONE)).await;
    let t = now();
    assert_eq!(
        allowed(env.store.authorize(&alice.to_string(), UK, "lost", t).await.expect("a")),
        (600, ONE)
    );
    let just_before = t + 600_000 + 3_600_000 - 1;
    let refused =
        env.store.authorize(&alice.to_string(), UK, "next", just_before).await.expect("b");
    assert_eq!(refused, Authorization::Denied(Denial::TooManyCalls));
    let after =
        env.store.authorize(&alice.to_string(), UK, "next", just_before + 1).await.expect("c");
    assert_eq!(allowed(after), (600, ONE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topups_are_atomic_and_bounded() {
    let env = env("").await;
    let prepaid = AccountSettings { kind: Some(Kind::Prepaid), ..AccountSettings::default() };
    let alice = env.account("alice", prepaid, None).await;
    let amounts: Vec<i64> = (1..=50).collect();
    let store = env.store.clone();
    let results = all(amounts
        .iter()
        .map(|&n| {
            let (store, alice) = (store.clone(), alice.clone());
            async move { store.topup(&alice, n * 10_000).await.expect("topup") }
        })
        .collect())
    .await;
    let total: i64 = amounts.iter().map(|n| n * 10_000).sum();
    assert_eq!(results.iter().max(), Some(&total), "the last top-up saw every earlier one");
    assert_eq!(env.balance(&alice).await, total);
    assert_eq!(env.store.topup(&alice, -total).await.expect("correction"), 0);
    let huge =
        env.store.topup(&alice, sipalias_billing::money::MAX_AMOUNT_MICROS).await.expect("max");
    assert_eq!(huge, sipalias_billing::money::MAX_AMOUNT_MICROS);
    assert!(env.store.topup(&alice, 1).await.is_err(), "out of range");
    let ghost = sipalias_billing::account::Aor::parse("ghost@example.com").expect("aor");
    assert!(matches!(
        env.store.topup(&ghost, 1).await,
        Err(sipalias_billing::Error::AccountNotFound(_))
    ));
}

/// The example carried to the cut-off: 1.00 at 0.10 a minute buys 600 s; the
/// processor ends the call a few milliseconds after that, which costs exactly the 1.00 held,
/// so the prepaid balance ends at zero, not below. A call that was not cut off (ended well
/// past its limit) is billed for its true length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cut_off_at_its_limit_costs_what_was_reserved() {
    let env = env("").await;
    env.store.set_rate("retail", "44", &rate(TEN_CENTS, 0, 60, 60)).await.expect("rate");
    let alice = env.prepaid("alice", ONE, "retail").await;
    let bob = env.prepaid("bob", ONE, "retail").await;
    let t0 = 1_700_000_000_000;
    for (aor, call_ref, ended_after_ms, charge) in
        [(&alice, "cut", 600_350, ONE), (&bob, "uncut", 602_001, ONE + TEN_CENTS)]
    {
        let grant = env.store.authorize(&aor.to_string(), UK, call_ref, now()).await;
        assert_eq!(allowed(grant.expect("authorize")), (600, ONE));
        env.store.accounting_start(&start(call_ref, aor, UK, t0), now()).await.expect("start");
        let mut s = stop(call_ref, t0 + ended_after_ms);
        s.cause = "max-duration".to_owned();
        let r = env.store.accounting_stop(&s, now()).await.expect("stop");
        assert_eq!(r.charge_micros, charge, "{call_ref}");
        assert_eq!(env.balance(aor).await, ONE - charge, "{call_ref}");
        let retry = env.store.accounting_stop(&s, now()).await.expect("retried stop");
        assert_eq!(retry.charge_micros, charge, "{call_ref}");
        assert_eq!(env.balance(aor).await, ONE - charge, "{call_ref}: debited once");
    }
    let cdrs = env.store.list_cdrs(&CdrQuery::default()).await.expect("cdrs");
    let cut = cdrs.iter().find(|c| c.call_ref == "cut").expect("cut");
    // The CDR keeps the true length; only the billing forgives the cut-off latency.
    assert_eq!((cut.duration_ms, cut.billed_secs), (Some(600_350), Some(600)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_and_stop_together_end_as_start_then_stop() {
    let env = env("default_max_duration_secs = 3600").await;
    env.store.set_rate("retail", "44", &rate(TEN_CENTS, 20_000, 30, 6)).await.expect("rate");
    let alice = env.prepaid("alice", ONE, "retail").await;
    let bob = env.prepaid("bob", ONE, "retail").await;
    let t0 = now();
    // Identical calls: alice's accounted in two steps, bob's in one; then bob's is repeated.
    for (aor, call_ref) in [(&alice, "sep;1"), (&bob, "tog;1")] {
        let granted = env.store.authorize(&aor.to_string(), UK, call_ref, t0).await.expect("auth");
        assert!(matches!(granted, Authorization::Allowed { .. }), "{granted:?}");
    }
    env.store.accounting_start(&start("sep;1", &alice, UK, t0), t0).await.expect("start");
    let separate = env.store.accounting_stop(&stop("sep;1", t0 + 95_500), t0).await.expect("stop");
    let together = env
        .store
        .accounting_start_stop(&start("tog;1", &bob, UK, t0), &stop("tog;1", t0 + 95_500), t0)
        .await
        .expect("start_stop");
    assert_eq!(together.outcome, AccountingOutcome::Charged);
    assert_eq!(together.charge_micros, separate.charge_micros);
    assert_eq!(env.balance(&alice).await, env.balance(&bob).await);
    assert_eq!((env.held(&alice).await, env.held(&bob).await), ((0, 0), (0, 0)));
    let again = env
        .store
        .accounting_start_stop(&start("tog;1", &bob, UK, t0), &stop("tog;1", t0 + 95_500), t0)
        .await
        .expect("repeat");
    assert_eq!(
        (again.outcome, again.charge_micros),
        (AccountingOutcome::Duplicate, together.charge_micros)
    );
    assert_eq!(env.balance(&alice).await, env.balance(&bob).await, "charged once");

    let cdrs = env.store.list_cdrs(&CdrQuery::default()).await.expect("cdrs");
    let sep = cdrs.iter().find(|c| c.call_ref == "sep;1").expect("sep cdr").clone();
    let tog = cdrs.iter().find(|c| c.call_ref == "tog;1").expect("tog cdr").clone();
    let same = |mut c: sipalias_billing::store::Cdr| {
        c.call_ref.clear();
        c.caller.clear();
        c.stop_key = None;
        c
    };
    assert_eq!(same(sep), same(tog), "the same CDR but for the call and the caller");

    // A stop that came first (its start was queued): the pair settles it, once.
    let carol = env.prepaid("carol", ONE, "retail").await;
    env.store.authorize(&carol.to_string(), UK, "late;1", t0).await.expect("auth");
    let first = env.store.accounting_stop(&stop("late;1", t0 + 95_500), t0).await.expect("stop");
    assert_eq!(first.outcome, AccountingOutcome::AwaitingStart);
    let pair = env
        .store
        .accounting_start_stop(&start("late;1", &carol, UK, t0), &stop("late;1", t0 + 95_500), t0)
        .await
        .expect("pair");
    assert_eq!(pair.charge_micros, together.charge_micros);
    assert_eq!(env.balance(&carol).await, env.balance(&bob).await);
    assert_eq!(env.held(&carol).await, (0, 0));
}

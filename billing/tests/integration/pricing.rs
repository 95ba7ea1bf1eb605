//! The Lua scripts against `rating.rs`, their specification: the same durations, reservations
//! and charges for a spread of rates, funds and call lengths, including exact boundaries.

use sipalias_billing::account::{AccountSettings, Kind};
use sipalias_billing::money::MAX_AMOUNT_MICROS;
use sipalias_billing::rating::{self, Funds, Grant, Rate};
use sipalias_billing::store::{AccountingOutcome, Authorization, Denial};

use crate::{env, now, rate, start, stop, unanswered};

fn rates() -> Vec<Rate> {
    vec![
        rate(100_000, 0, 60, 60),
        rate(100_000, 0, 1, 1),
        rate(120_000, 0, 30, 6),
        rate(0, 250_000, 60, 60),
        rate(100_000, 50_000, 60, 60),
        rate(77_777, 3, 30, 6),
        rate(rating::MAX_RATE_MICROS_PER_MINUTE, 0, 1, 1),
        rate(1, 0, 1, 1),
        rate(999_999, 123_456, 45, 15),
    ]
}

const BALANCES: [i64; 12] = [
    0,
    1,
    1_666,
    1_667,
    99_999,
    100_000,
    149_999,
    150_000,
    249_999,
    1_000_000,
    4_321_987,
    MAX_AMOUNT_MICROS,
];

const DURATIONS_MS: [u64; 14] = [
    0,
    1,
    999,
    1_000,
    1_001,
    29_999,
    30_000,
    30_001,
    59_999,
    60_000,
    60_001,
    3_600_000,
    3 * 86_400_000,
    123_456_789,
];

async fn authorizations_agree(cap_secs: u32) {
    let env = env(&format!("default_max_duration_secs = {cap_secs}")).await;
    let mut call = 0;
    for (i, r) in rates().iter().enumerate() {
        let plan = format!("p{i}");
        env.store.set_rate(&plan, "default", r).await.expect("rate");
        let aor = env.prepaid(&format!("u{i}"), 0, &plan).await;
        let mut balance = 0;
        for b in BALANCES {
            balance = env.store.topup(&aor, b - balance).await.expect("topup");
            call += 1;
            let call_ref = format!("call-{call}");
            let got = env.store.authorize(&aor.to_string(), "4420@x", &call_ref, now()).await;
            let want = rating::authorize(Some(r), Funds::Available(b), cap_secs);
            match (got.expect("authorize"), want) {
                (
                    Authorization::Allowed { max_duration_secs, reserved_micros, .. },
                    Grant::Allowed { max_duration_secs: m, reserve_micros: res },
                ) => assert_eq!((max_duration_secs, reserved_micros), (m, res), "{r:?} {b}"),
                (Authorization::Denied(Denial::InsufficientFunds), Grant::InsufficientFunds) => {}
                (got, want) => panic!("{r:?} balance {b}: store {got:?}, rating {want:?}"),
            }
            env.store.accounting_stop(&unanswered(&call_ref, now()), now()).await.expect("release");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_agree_with_rating_without_a_cap() {
    authorizations_agree(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_agree_with_rating_under_a_cap() {
    authorizations_agree(300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charges_agree_with_rating() {
    let env = env("").await;
    let t0 = 1_700_000_000_000;
    let mut call = 0;
    for (i, r) in rates().iter().enumerate() {
        let plan = format!("p{i}");
        env.store.set_rate(&plan, "default", r).await.expect("rate");
        // Postpaid without a limit: every call is allowed, so every length can be charged.
        let settings = AccountSettings {
            kind: Some(Kind::Postpaid),
            rate_plan: Some(Some(plan.clone())),
            ..AccountSettings::default()
        };
        let aor = env.account(&format!("u{i}"), settings, None).await;
        let mut expected_balance = 0;
        for d in DURATIONS_MS {
            call += 1;
            let call_ref = format!("call-{call}");
            let a = env.store.authorize(&aor.to_string(), "4420@x", &call_ref, now()).await;
            assert!(matches!(a.expect("authorize"), Authorization::Allowed { .. }));
            env.store
                .accounting_start(&start(&call_ref, &aor, "4420@x", t0), now())
                .await
                .expect("start");
            let got =
                env.store.accounting_stop(&stop(&call_ref, t0 + d), now()).await.expect("stop");
            let want = r.charge(d);
            assert_eq!(
                (got.outcome, got.charge_micros),
                (AccountingOutcome::Charged, want.charge_micros),
                "{r:?} {d} ms"
            );
            expected_balance -= want.charge_micros;
        }
        assert_eq!(env.balance(&aor).await, expected_balance, "{r:?}");
    }
}

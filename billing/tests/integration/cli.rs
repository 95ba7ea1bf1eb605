//! The `sipalias-billing` binary: accounts, rate plans, top-ups and CDRs as an operator types
//! them, against the same Redis the store reads.

use std::path::Path;
use std::process::Command;

use sipalias_billing::account::Aor;

use crate::{Env, env, now, start, stop};

/// Runs the binary with `--config` and returns (success, stdout, stderr).
fn billing(config: &Path, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sipalias-billing"));
    cmd.arg("--config").arg(config).args(args);
    // A variable left in the developer's environment must not change the test.
    for (k, _) in std::env::vars() {
        if k.starts_with("SIPALIAS_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().expect("run sipalias-billing");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(config: &Path, args: &[&str]) -> String {
    let (success, stdout, stderr) = billing(config, args);
    assert!(success, "{args:?} failed: {stderr}");
    stdout
}

fn config_file(env: &Env) -> std::path::PathBuf {
    let path = env.dir.path().join("sipalias.toml");
    let toml =
        format!("[billing]\nredis_url = {:?}\nkey_prefix = {:?}\n", env.redis.url(), crate::PREFIX);
    std::fs::write(&path, toml).expect("write config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_manages_rates_accounts_top_ups_and_reads_cdrs() {
    let env = env("").await;
    let cfg = config_file(&env);

    let out = ok(
        &cfg,
        &["rate-plan", "set", "--name", "retail", "--prefix", "+44", "--per-minute", "0.10"],
    );
    assert_eq!(out, "rate plan retail: 44 at 0.10 per minute, fee 0.00, increments 60/60\n");
    ok(
        &cfg,
        &[
            "rate-plan",
            "set",
            "--name",
            "retail",
            "--prefix",
            "",
            "--per-minute",
            "0.2",
            "--fee",
            "0.05",
            "--increments",
            "1/1",
        ],
    );
    let listed = ok(&cfg, &["rate-plan", "list"]);
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 3, "{listed}");
    assert!(lines[0].starts_with("PLAN"), "{listed}");
    assert!(
        lines[1].contains("default") && lines[1].contains("0.20") && lines[1].contains("1/1"),
        "{listed}"
    );
    assert!(
        lines[2].contains("44") && lines[2].contains("0.10") && lines[2].contains("60/60"),
        "{listed}"
    );

    let (success, _, stderr) = billing(
        &cfg,
        &["account", "add", "--aor", "bob@example.com", "--password", "pw", "--rate-plan", "nope"],
    );
    assert!(!success);
    assert!(stderr.contains("no such rate plan: nope"), "{stderr}");

    let out = ok(
        &cfg,
        &[
            "account",
            "add",
            "--aor",
            "alice@example.com",
            "--password",
            "pw",
            "--prepaid",
            "--balance",
            "1.00",
            "--rate-plan",
            "retail",
            "--max-calls",
            "2",
        ],
    );
    assert!(out.contains("prepaid, balance 1.00, rate plan retail, max 2 calls"), "{out}");
    let out = ok(&cfg, &["account", "topup", "--aor", "alice@example.com", "--amount", "5.00"]);
    assert_eq!(out, "account alice@example.com balance 6.00\n");
    let out = ok(&cfg, &["account", "topup", "--aor", "alice@example.com", "--amount", "-0.5"]);
    assert_eq!(out, "account alice@example.com balance 5.50\n");

    // A call in progress shows in `account show`.
    let alice = Aor::parse("alice@example.com").expect("aor");
    let callee = "+447700900123@example.com";
    env.store.authorize("alice@example.com", callee, "cli-1", now()).await.expect("authorize");
    let shown = ok(&cfg, &["account", "show", "--aor", "alice@example.com"]);
    for needle in ["prepaid", "5.50", "retail", "calls in progress", "cli-1"] {
        assert!(shown.contains(needle), "{needle}: {shown}");
    }
    let reserved = shown.lines().find(|l| l.starts_with("reserved")).expect("reserved line");
    assert!(reserved.ends_with("5.50"), "{shown}");

    let t0 = 1_764_244_800_000;
    env.store.accounting_start(&start("cli-1", &alice, callee, t0), now()).await.expect("start");
    env.store.accounting_stop(&stop("cli-1", t0 + 61_000), now()).await.expect("stop");
    let csv = ok(&cfg, &["cdr", "list", "--csv"]);
    let mut rows = csv.lines();
    let header: Vec<&str> = rows.next().expect("header").split(',').collect();
    let row: Vec<&str> = rows.next().expect("row").split(',').collect();
    let col = |name: &str| row[header.iter().position(|h| *h == name).expect(name)];
    assert_eq!(col("call_ref"), "cli-1");
    assert_eq!(col("charge_micros"), "200000");
    assert_eq!(col("charge"), "0.20");
    assert_eq!((col("rate_plan"), col("rate_prefix"), col("billed_secs")), ("retail", "44", "120"));
    let table = ok(&cfg, &["cdr", "list"]);
    assert!(table.contains("2025-11-27 12:00:00") && table.contains("0.20"), "{table}");
    assert_eq!(ok(&cfg, &["cdr", "list", "--aor", "bob@example.com"]).lines().count(), 1);
    assert_eq!(ok(&cfg, &["cdr", "list", "--since", "2025-11-28"]).lines().count(), 1);
    assert_eq!(
        ok(&cfg, &["cdr", "list", "--since", "2025-11-27", "--until", "2025-11-28"])
            .lines()
            .count(),
        2
    );

    let out = ok(
        &cfg,
        &[
            "account",
            "set",
            "--aor",
            "alice@example.com",
            "--kind",
            "postpaid",
            "--credit-limit",
            "50",
            "--max-calls",
            "0",
        ],
    );
    assert!(
        out.contains("postpaid, balance 5.30, credit limit 50.00, rate plan retail, no call limit"),
        "{out}"
    );
    let listed = ok(&cfg, &["account", "list"]);
    assert!(
        listed.contains("postpaid") && listed.contains("5.30") && listed.contains("50.00"),
        "{listed}"
    );

    let out = ok(&cfg, &["rate-plan", "delete", "--name", "retail", "--prefix", "44"]);
    assert_eq!(out, "rate plan retail: entry 44 deleted\n");
    let out = ok(&cfg, &["rate-plan", "delete", "--name", "retail"]);
    assert_eq!(out, "rate plan retail: deleted (1 entries)\n");
    assert_eq!(ok(&cfg, &["rate-plan", "list"]).lines().count(), 1);
    let (success, _, stderr) = billing(&cfg, &["rate-plan", "delete", "--name", "retail"]);
    assert!(!success && stderr.contains("no such rate plan"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100000_line_subscriber_csv_imports_all_but_its_3_bad_lines_and_reruns_change_nothing() {
    let env = env("").await;
    let cfg = config_file(&env);
    ok(&cfg, &["rate-plan", "set", "--name", "retail", "--prefix", "", "--per-minute", "0.10"]);
    // What an old provider hands over: HA1s for its realm, prepaid balances, a plan.
    let mut csv = String::from("aor,realm,ha1_md5,kind,balance,rate_plan,max_calls\n");
    let bad_lines = [1_234_u64, 50_001, 99_999];
    for i in 0..100_000_u64 {
        let line = i + 2;
        let row = if line == bad_lines[0] {
            format!("{i}@sip.example.net,voip.old.example,nothex,prepaid,5.00,retail,2\n")
        } else if line == bad_lines[1] {
            format!("{i}@sip.example.net,voip.old.example,{:032x},prepaid,5.00,nosuchplan,2\n", i)
        } else if line == bad_lines[2] {
            format!("{i}-sip.example.net,voip.old.example,{:032x},prepaid,5.00,retail,2\n", i)
        } else {
            format!("{i}@sip.example.net,voip.old.example,{:032x},prepaid,5.00,retail,2\n", i)
        };
        csv.push_str(&row);
    }
    let file = env.dir.path().join("subscribers.csv");
    std::fs::write(&file, csv).expect("write csv");
    let path = file.to_str().expect("utf-8 path");

    // A dry run reports the same bad lines and writes nothing.
    let (success, stdout, stderr) =
        billing(&cfg, &["account", "import", "--csv", path, "--dry-run"]);
    assert!(!success, "bad lines make the exit status non-zero");
    assert!(stdout.contains("99997 accounts to import, 3 bad lines (dry run"), "{stdout}");
    let reported: Vec<&str> = stderr.lines().filter(|l| l.starts_with("line ")).collect();
    assert_eq!(reported.len(), 3, "{stderr}");
    for (line, expect) in
        bad_lines.iter().zip(["ha1_md5:", "rate_plan: no plan \"nosuchplan\"", "aor:"])
    {
        assert!(
            reported.iter().any(|r| r.starts_with(&format!("line {line}: {expect}"))),
            "line {line} ({expect}) not reported: {stderr}"
        );
    }
    let mut raw = env.raw().await;
    let accounts_key = format!("{}accts", crate::PREFIX);
    let n: u64 = redis::cmd("SCARD").arg(&accounts_key).query_async(&mut raw).await.expect("scard");
    assert_eq!(n, 0, "a dry run writes nothing");

    let started = std::time::Instant::now();
    let (_, stdout, stderr) = billing(&cfg, &["account", "import", "--csv", path]);
    let took = started.elapsed();
    assert!(stdout.contains("99997 accounts created, 0 updated, 3 bad lines"), "{stdout} {stderr}");
    eprintln!("imported 99,997 accounts in {took:?} (debug build, pipelined)");
    let n: u64 = redis::cmd("SCARD").arg(&accounts_key).query_async(&mut raw).await.expect("scard");
    assert_eq!(n, 99_997);
    let one = Aor::parse("77@sip.example.net").expect("aor");
    let account = env.store.get(&one).await.expect("get").expect("imported");
    assert_eq!(account.balance_micros, 5_000_000);
    assert_eq!((account.max_concurrent_calls, account.rate_plan.as_deref()), (2, Some("retail")));

    // Spending some balance, then importing the same file again: credentials and settings
    // are set to the same values, the balance is not applied twice.
    ok(&cfg, &["account", "topup", "--aor", "77@sip.example.net", "--amount", "-1.00"]);
    let (_, stdout, _) = billing(&cfg, &["account", "import", "--csv", path]);
    assert!(stdout.contains("0 accounts created, 99997 updated, 3 bad lines"), "{stdout}");
    let account = env.store.get(&one).await.expect("get").expect("kept");
    assert_eq!(account.balance_micros, 4_000_000, "the balance is not applied again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_delete_removes_an_account_but_not_one_with_calls_in_progress() {
    let env = env("").await;
    let cfg = config_file(&env);
    ok(&cfg, &["account", "add", "--aor", "gone@example.com", "--password", "pw"]);
    ok(&cfg, &["account", "add", "--aor", "busy@example.com", "--password", "pw"]);
    assert_eq!(
        ok(&cfg, &["account", "delete", "--aor", "gone@example.com"]),
        "account gone@example.com deleted\n"
    );
    let listed = ok(&cfg, &["account", "list"]);
    assert!(!listed.contains("gone@") && listed.contains("busy@"), "{listed}");
    let gone = Aor::parse("gone@example.com").expect("aor");
    assert!(env.store.get(&gone).await.expect("get").is_none());
    // Unknown (or already deleted) and hostile AORs are refused with a message.
    for aor in ["gone@example.com", "nobody@example.com", "x\r\n@example.com", ""] {
        let (success, _, stderr) = billing(&cfg, &["account", "delete", "--aor", aor]);
        assert!(!success && !stderr.is_empty(), "{aor:?} deleted: {stderr}");
    }
    // A call in progress holds a reservation: refused, then forced.
    let decision = env
        .store
        .authorize("busy@example.com", "bob@example.com", "ref-busy-1", now())
        .await
        .expect("authorize");
    assert!(
        matches!(decision, sipalias_billing::store::Authorization::Allowed { .. }),
        "{decision:?}"
    );
    let (success, _, stderr) = billing(&cfg, &["account", "delete", "--aor", "busy@example.com"]);
    assert!(!success && stderr.contains("1 calls in progress"), "{stderr}");
    ok(&cfg, &["account", "delete", "--aor", "busy@example.com", "--force"]);
    let busy = Aor::parse("busy@example.com").expect("aor");
    assert!(env.store.account_usage(&busy).await.expect("usage").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdr_export_writes_a_time_range_and_deletes_exactly_what_it_wrote() {
    let env = env("").await;
    let cfg = config_file(&env);
    ok(&cfg, &["account", "add", "--aor", "alice@example.com", "--password", "pw"]);
    let alice = Aor::parse("alice@example.com").expect("aor");
    // Three calls on 2025-11-27, 2025-11-28 and 2025-11-29 (noon UTC).
    let day = 86_400_000_u64;
    let t0 = 1_764_244_800_000_u64; // 2025-11-27T12:00:00Z
    for (i, at) in [t0, t0 + day, t0 + 2 * day].into_iter().enumerate() {
        let r = format!("exp-{i}");
        env.store
            .accounting_start(&start(&r, &alice, "bob@example.com", at), now())
            .await
            .expect("start");
        env.store.accounting_stop(&stop(&r, at + 30_000), now()).await.expect("stop");
    }
    let file = env.dir.path().join("nov28.csv");
    let path = file.to_str().expect("utf-8");
    let (success, _, stderr) = billing(
        &cfg,
        &[
            "cdr",
            "export",
            "--since",
            "2025-11-28",
            "--until",
            "2025-11-29",
            "--output",
            path,
            "--delete",
        ],
    );
    assert!(success, "{stderr}");
    assert!(stderr.contains("1 CDRs exported, 1 deleted"), "{stderr}");
    let csv = std::fs::read_to_string(&file).expect("exported file");
    assert_eq!(csv.lines().count(), 2, "{csv}");
    assert!(csv.lines().nth(1).is_some_and(|l| l.starts_with("exp-1,")), "{csv}");
    // What was exported is gone; the other two remain.
    let listed = ok(&cfg, &["cdr", "list", "--csv"]);
    assert!(
        listed.contains("exp-0,") && listed.contains("exp-2,") && !listed.contains("exp-1,"),
        "{listed}"
    );
    // An unwritable output deletes nothing.
    let (success, _, stderr) =
        billing(&cfg, &["cdr", "export", "--output", "/nonexistent/dir/x.csv", "--delete"]);
    assert!(!success && stderr.contains("nothing deleted"), "{stderr}");
    assert_eq!(ok(&cfg, &["cdr", "list", "--csv"]).lines().count(), 3, "header and two CDRs");
    // To stdout, without --delete: everything, and still there.
    let all = ok(&cfg, &["cdr", "export"]);
    assert_eq!(all.lines().count(), 3, "{all}");
    assert_eq!(ok(&cfg, &["cdr", "list", "--csv"]).lines().count(), 3);
}

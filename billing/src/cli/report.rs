//! What the commands print: tables for people, CSV for programs.

use crate::account::{Account, Kind};
use crate::money;
use crate::store::{AccountUsage, Cdr, RatePlanEntry};

use super::time;

/// `realm1, realm2 (md5 only)`: realms, marking those lacking one algorithm since clients using
/// that algorithm will be refused there.
pub fn realm_summary(account: &Account) -> String {
    let parts: Vec<String> = account
        .realms
        .iter()
        .map(|(realm, c)| match (&c.ha1_md5, &c.ha1_sha256) {
            (Some(_), None) => format!("{realm} (md5 only)"),
            (None, Some(_)) => format!("{realm} (sha256 only)"),
            _ => realm.clone(),
        })
        .collect();
    if parts.is_empty() { "none".to_owned() } else { parts.join(", ") }
}

/// `prepaid, balance 1.00, rate plan retail, max 5 calls`.
pub fn billing_summary(a: &Account) -> String {
    let mut parts =
        vec![a.kind.to_string(), format!("balance {}", money::format(a.balance_micros))];
    if a.kind == Kind::Postpaid {
        parts.push(credit_limit(a.credit_limit_micros));
    }
    parts.push(match &a.rate_plan {
        Some(p) => format!("rate plan {p}"),
        None => "default rate plan".to_owned(),
    });
    parts.push(max_calls(a.max_concurrent_calls));
    parts.join(", ")
}

fn credit_limit(limit: Option<i64>) -> String {
    match limit {
        Some(l) => format!("credit limit {}", money::format(l)),
        None => "no credit limit".to_owned(),
    }
}

fn max_calls(max: u32) -> String {
    if max == 0 { "no call limit".to_owned() } else { format!("max {max} calls") }
}

pub fn accounts_table(accounts: &[Account]) -> String {
    let rows: Vec<Vec<String>> = accounts
        .iter()
        .map(|a| {
            vec![
                a.aor.to_string(),
                a.status.to_string(),
                a.kind.to_string(),
                money::format(a.balance_micros),
                match (a.kind, a.credit_limit_micros) {
                    (Kind::Prepaid, _) => "-".to_owned(),
                    (Kind::Postpaid, Some(l)) => money::format(l),
                    (Kind::Postpaid, None) => "unlimited".to_owned(),
                },
                a.rate_plan.clone().unwrap_or_else(|| "(default)".to_owned()),
                if a.max_concurrent_calls == 0 {
                    "-".to_owned()
                } else {
                    a.max_concurrent_calls.to_string()
                },
                realm_summary(a),
            ]
        })
        .collect();
    table(
        &["AOR", "STATUS", "KIND", "BALANCE", "CREDIT", "RATE_PLAN", "MAX_CALLS", "REALMS"],
        &rows,
    )
}

/// `account show`: one `name  value` line per property, then the calls in progress.
pub fn account_details(u: &AccountUsage) -> String {
    let a = &u.account;
    let plan = match (&a.rate_plan, &u.effective_rate_plan) {
        (Some(p), _) => p.clone(),
        (None, Some(p)) => format!("{p} (default)"),
        (None, None) => "none (calls are not rated)".to_owned(),
    };
    let mut rows = vec![
        vec!["account".to_owned(), a.aor.to_string()],
        vec!["status".to_owned(), a.status.to_string()],
        vec!["kind".to_owned(), a.kind.to_string()],
        vec!["balance".to_owned(), money::format(a.balance_micros)],
    ];
    if a.kind == Kind::Postpaid {
        let limit = a.credit_limit_micros.map_or_else(|| "unlimited".to_owned(), money::format);
        rows.push(vec!["credit limit".to_owned(), limit]);
    }
    rows.push(vec!["reserved".to_owned(), money::format(u.reserved_micros())]);
    rows.push(vec![
        "available".to_owned(),
        u.available_micros().map_or_else(|| "unlimited".to_owned(), money::format),
    ]);
    rows.push(vec!["rate plan".to_owned(), plan]);
    rows.push(vec![
        "max calls".to_owned(),
        if a.max_concurrent_calls == 0 {
            "unlimited".to_owned()
        } else {
            a.max_concurrent_calls.to_string()
        },
    ]);
    rows.push(vec!["calls in progress".to_owned(), u.reservations.len().to_string()]);
    rows.push(vec!["realms".to_owned(), realm_summary(a)]);
    let mut out = table_rows(&rows);
    if !u.reservations.is_empty() {
        out.push('\n');
        let calls: Vec<Vec<String>> = u
            .reservations
            .iter()
            .map(|r| {
                vec![
                    r.call_ref.clone(),
                    money::format(r.reserved_micros),
                    time::format_utc(r.expires_ms),
                ]
            })
            .collect();
        out.push_str(&table(&["CALL_REF", "RESERVED", "LAPSES_AT_UTC"], &calls));
    }
    out
}

pub fn rate_plans_table(entries: &[RatePlanEntry]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.plan.clone(),
                e.prefix.clone(),
                money::format(e.rate.rate_micros_per_minute),
                money::format(e.rate.connection_fee_micros),
                e.rate.increments(),
            ]
        })
        .collect();
    table(&["PLAN", "PREFIX", "PER_MINUTE", "FEE", "INCREMENTS"], &rows)
}

/// CSV columns, in order. The first nine are those of earlier versions; programs should find
/// columns by header name. `status` and `reason` are set for calls that were not answered
/// (the failed attempts).
const CDR_COLUMNS: [&str; 17] = [
    "call_ref",
    "caller",
    "callee",
    "caller_ingress_ip",
    "callee_ingress_ip",
    "answered_ms",
    "ended_ms",
    "duration_ms",
    "cause",
    "max_duration_secs",
    "billed_secs",
    "rate_plan",
    "rate_prefix",
    "charge_micros",
    "charge",
    "status",
    "reason",
];

fn cdr_row(c: &Cdr) -> Vec<String> {
    fn num<T: ToString>(v: Option<T>) -> String {
        v.map(|n| n.to_string()).unwrap_or_default()
    }
    vec![
        c.call_ref.clone(),
        c.caller.clone(),
        c.callee.clone(),
        c.caller_ingress_ip.clone(),
        c.callee_ingress_ip.clone(),
        num(c.answered_ms),
        num(c.ended_ms),
        num(c.duration_ms),
        c.cause.clone(),
        num(c.max_duration_secs),
        num(c.billed_secs),
        c.rate_plan.clone(),
        c.rate_prefix.clone(),
        num(c.charge_micros),
        c.charge_micros.map(money::format).unwrap_or_default(),
        num(c.status),
        c.reason.clone(),
    ]
}

/// The CDR table: the CSV's columns, with times in UTC and the charge only as a decimal.
pub fn cdrs_table(cdrs: &[Cdr]) -> String {
    let header = [
        "CALL_REF",
        "CALLER",
        "CALLEE",
        "CALLER_IP",
        "CALLEE_IP",
        "ANSWERED_UTC",
        "ENDED_UTC",
        "DURATION_MS",
        "CAUSE",
        "MAX_S",
        "BILLED_S",
        "RATE_PLAN",
        "PREFIX",
        "CHARGE",
        "STATUS",
        "REASON",
    ];
    let rows: Vec<Vec<String>> = cdrs
        .iter()
        .map(|c| {
            let mut row = cdr_row(c);
            row[5] = c.answered_ms.map(time::format_utc).unwrap_or_default();
            row[6] = c.ended_ms.map(time::format_utc).unwrap_or_default();
            row.remove(13); // charge_micros
            row.into_iter().map(|f| if f.is_empty() { "-".to_owned() } else { f }).collect()
        })
        .collect();
    table(&header, &rows)
}

/// RFC 4180 CSV: header line, then one line per CDR; unknown values are empty.
pub fn cdrs_csv(cdrs: &[Cdr]) -> String {
    let mut out = CDR_COLUMNS.join(",");
    out.push('\n');
    for c in cdrs {
        let fields: Vec<String> = cdr_row(c).iter().map(|f| csv_field(f)).collect();
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

fn csv_field(f: &str) -> String {
    if f.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", f.replace('"', "\"\""))
    } else {
        f.to_owned()
    }
}

/// Left-aligned columns separated by two spaces, under a header line.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut all = vec![header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>()];
    all.extend(rows.iter().cloned());
    table_rows(&all)
}

/// Left-aligned columns separated by two spaces.
fn table_rows(rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            let w = cell.chars().count();
            match widths.get_mut(i) {
                Some(max) => *max = (*max).max(w),
                None => widths.push(w),
            }
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            line.extend(std::iter::repeat_n(' ', w.saturating_sub(cell.chars().count())));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_only_when_needed_and_carries_the_charge() {
        let cdr = Cdr {
            call_ref: "c1".to_owned(),
            caller: "a@x".to_owned(),
            cause: "said \"bye\", then left".to_owned(),
            answered_ms: Some(1000),
            ended_ms: Some(2500),
            duration_ms: Some(1500),
            max_duration_secs: Some(600),
            billed_secs: Some(60),
            rate_plan: "retail".to_owned(),
            rate_prefix: "44".to_owned(),
            charge_micros: Some(100_000),
            ..Cdr::default()
        };
        assert_eq!(
            cdrs_csv(&[cdr]),
            "call_ref,caller,callee,caller_ingress_ip,callee_ingress_ip,answered_ms,ended_ms,\
             duration_ms,cause,max_duration_secs,billed_secs,rate_plan,rate_prefix,charge_micros,charge,\
             status,reason\n\
             c1,a@x,,,,1000,2500,1500,\"said \"\"bye\"\", then left\",600,60,retail,44,100000,0.10,,\n"
        );
        let failed = Cdr {
            call_ref: "c2".to_owned(),
            ended_ms: Some(2500),
            cause: "not-answered".to_owned(),
            status: Some(486),
            reason: "Busy Here, really".to_owned(),
            charge_micros: Some(0),
            ..Cdr::default()
        };
        let csv = cdrs_csv(&[failed]);
        assert!(csv.ends_with(",0,0.00,486,\"Busy Here, really\"\n"), "{csv}");
    }

    #[test]
    fn cdr_table_shows_utc_times_and_a_decimal_charge() {
        let cdr = Cdr {
            call_ref: "c1".to_owned(),
            answered_ms: Some(1_764_244_800_000),
            charge_micros: Some(1_500_000),
            ..Cdr::default()
        };
        let t = cdrs_table(&[cdr]);
        let row = t.lines().nth(1).expect("row");
        assert!(row.contains("2025-11-27 12:00:00"), "{t}");
        assert!(row.ends_with("1.50    -       -"), "{t}");
        assert!(t.lines().next().is_some_and(|h| h.ends_with("CHARGE  STATUS  REASON")), "{t}");
        assert!(!row.contains("1500000"), "{t}");
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(&["A", "BB"], &[vec!["long".to_owned(), "x".to_owned()]]);
        assert_eq!(t, "A     BB\nlong  x\n");
    }
}

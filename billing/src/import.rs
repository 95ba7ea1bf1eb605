//! Bulk import of the subscriber list an old provider hands over (`account import --csv FILE`):
//! reading and checking the CSV, line by line, without Redis. The store applies the good rows
//! ([`crate::store::Store::import_rows`]); every bad line is reported by its number and
//! skipped, so one typo in 50,000 lines costs one account, not the migration.
//!
//! The file has a header row naming its columns, in any order; only `aor` is required:
//!
//! | column | meaning |
//! |---|---|
//! | `aor` | `user@domain` |
//! | `realm` | digest realm(s) of the credentials, `;`-separated; default the AOR's domain |
//! | `password` | the password (HA1s are computed for every realm; it is never stored) |
//! | `ha1_md5`, `ha1_sha256` | HA1s computed elsewhere, for exactly one realm |
//! | `kind` | `prepaid` or `postpaid` |
//! | `balance` | opening balance (`12.50`), applied only when the account is created |
//! | `rate_plan` | rate plan name (must exist) |
//! | `max_calls` | most calls at once, 0 = no limit |
//! | `credit_limit` | postpaid credit limit (`50.00`) or `unlimited` |
//!
//! A row gives a password or HA1s, or neither (then only settings change, or an account
//! without credentials is created). Re-running a file changes nothing more: credentials and
//! settings are set to the same values, balances are not applied again.

use std::collections::HashSet;

use crate::account::{Aor, Kind, RealmCredentials, ha1_fields, normalize_ha1, validate_realm};
use crate::error::Error;
use crate::money;
use sipmsg::digest::Algorithm;

/// The columns a file may have.
pub const COLUMNS: [&str; 10] = [
    "aor",
    "realm",
    "password",
    "ha1_md5",
    "ha1_sha256",
    "kind",
    "balance",
    "rate_plan",
    "max_calls",
    "credit_limit",
];

/// Longest line accepted (bytes): far more than any real row, small enough that a broken
/// file (one quote never closed) is reported instead of read whole into one field.
pub const MAX_LINE: usize = 64 * 1024;

/// One good row, ready for the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Line number in the file (the header is line 1).
    pub line: u64,
    /// The account.
    pub aor: Aor,
    /// Hash fields to set: HA1s per realm and settings (`""` removes a setting).
    pub fields: Vec<(String, String)>,
    /// Opening balance, in micro-units, for an account this row creates.
    pub balance_micros: Option<i64>,
    /// The rate plan the row names (checked against the store before anything is written).
    pub rate_plan: Option<String>,
}

/// What a file holds: its good rows and its bad lines (number, why).
#[derive(Debug, Default)]
pub struct Parsed {
    /// Rows to import, in file order.
    pub rows: Vec<Row>,
    /// Lines refused, in file order.
    pub bad: Vec<(u64, String)>,
}

/// Reads a subscriber CSV. An error means the file as a whole is unusable (no header, an
/// unknown or repeated column, no `aor` column); a bad row only lands in [`Parsed::bad`].
pub fn parse(input: impl std::io::Read) -> Result<Parsed, Error> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .trim(csv::Trim::All)
        .from_reader(input);
    let header = reader.headers().map_err(|e| file_error(format!("no header row: {e}")))?;
    let mut index = [None; COLUMNS.len()];
    for (i, name) in header.iter().enumerate() {
        // A BOM that spreadsheet programs put first is not part of the name.
        let name = name.trim_start_matches('\u{feff}').to_ascii_lowercase();
        let Some(c) = COLUMNS.iter().position(|c| *c == name) else {
            return Err(file_error(format!(
                "unknown column {name:?} (known: {})",
                COLUMNS.join(", ")
            )));
        };
        if index[c].replace(i).is_some() {
            return Err(file_error(format!("column {name:?} appears twice")));
        }
    }
    if index[0].is_none() {
        return Err(file_error("no aor column".into()));
    }
    let mut parsed = Parsed::default();
    let mut record = csv::StringRecord::new();
    loop {
        let line = reader.position().line();
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map_or(line + 1, csv::Position::line);
                parsed.bad.push((line, csv_reason(&e)));
                // A row with the wrong number of fields is skipped; anything else (bad UTF-8
                // is per record too) leaves the reader where it can go on.
                continue;
            }
        }
        let line = record.position().map_or(line, csv::Position::line);
        if record.as_slice().len() > MAX_LINE {
            parsed.bad.push((line, format!("longer than {MAX_LINE} bytes")));
            continue;
        }
        let get = |c: usize| index[c].and_then(|i| record.get(i)).unwrap_or("");
        if record.iter().all(str::is_empty) {
            continue;
        }
        match row(line, &get) {
            Ok(row) => parsed.rows.push(row),
            Err(why) => parsed.bad.push((line, why)),
        }
    }
    Ok(parsed)
}

fn file_error(reason: String) -> Error {
    Error::InvalidInput { what: "--csv", reason }
}

fn csv_reason(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths { expected_len, len, .. } => {
            format!("{len} fields where the header has {expected_len}")
        }
        csv::ErrorKind::Utf8 { .. } => "not UTF-8".to_owned(),
        _ => e.to_string(),
    }
}

/// One row's checks and fields; the error names the column.
fn row<'a>(line: u64, get: &dyn Fn(usize) -> &'a str) -> Result<Row, String> {
    let col = |name: &str| get(COLUMNS.iter().position(|c| *c == name).unwrap_or(0));
    let why = |column: &str, e: Error| format!("{column}: {}", plain(e));
    let aor = Aor::parse(col("aor")).map_err(|e| why("aor", e))?;
    let mut realms: Vec<String> = Vec::new();
    for r in col("realm").split(';').map(str::trim).filter(|r| !r.is_empty()) {
        validate_realm(r).map_err(|e| why("realm", e))?;
        if !realms.iter().any(|x| x == r) {
            realms.push(r.to_owned());
        }
    }
    if realms.is_empty() {
        realms.push(aor.domain().to_owned());
    }
    let (password, md5, sha256) = (col("password"), col("ha1_md5"), col("ha1_sha256"));
    let mut fields = Vec::new();
    match (password.is_empty(), md5.is_empty() && sha256.is_empty()) {
        (false, false) => return Err("give a password or HA1s, not both".into()),
        (false, true) => {
            if password.chars().any(char::is_control) {
                return Err("password: control characters".into());
            }
            for realm in &realms {
                let creds = RealmCredentials::from_password(aor.user(), realm, password);
                fields.extend(ha1_fields(realm, &creds));
            }
        }
        (true, false) => {
            let [realm] = realms.as_slice() else {
                return Err("realm: HA1s are for exactly one realm".into());
            };
            let ha1 = |column: &'static str, alg, text: &str| {
                (!text.is_empty())
                    .then(|| normalize_ha1(column, alg, text).map_err(|e| why(column, e)))
                    .transpose()
            };
            let creds = RealmCredentials {
                ha1_md5: ha1("ha1_md5", Algorithm::Md5, md5)?,
                ha1_sha256: ha1("ha1_sha256", Algorithm::Sha256, sha256)?,
            };
            fields.extend(ha1_fields(realm, &creds));
        }
        (true, true) => {}
    }
    let kind = col("kind");
    if !kind.is_empty() {
        let kind = Kind::parse(&kind.to_ascii_lowercase())
            .ok_or_else(|| format!("kind: {kind:?} is not prepaid or postpaid"))?;
        fields.push(("kind".to_owned(), kind.as_str().to_owned()));
    }
    let balance_micros = match col("balance") {
        "" => None,
        text => Some(money::parse("balance", text).map_err(|e| why("balance", e))?),
    };
    let rate_plan = match col("rate_plan") {
        "" => None,
        plan => {
            crate::rating::validate_plan_name("rate_plan", plan)
                .map_err(|e| why("rate_plan", e))?;
            fields.push(("rate_plan".to_owned(), plan.to_owned()));
            Some(plan.to_owned())
        }
    };
    match col("max_calls") {
        "" => {}
        text => {
            let n: u32 =
                text.parse().map_err(|_| format!("max_calls: {text:?} is not a whole number"))?;
            let value = if n == 0 { String::new() } else { n.to_string() };
            fields.push(("max_concurrent_calls".to_owned(), value));
        }
    }
    match col("credit_limit") {
        "" => {}
        "unlimited" | "none" => fields.push(("credit_limit_micros".to_owned(), String::new())),
        text => {
            let limit = money::parse("credit_limit", text).map_err(|e| why("credit_limit", e))?;
            if limit < 0 {
                return Err("credit_limit: must not be negative".into());
            }
            fields.push(("credit_limit_micros".to_owned(), limit.to_string()));
        }
    }
    Ok(Row { line, aor, fields, balance_micros, rate_plan })
}

/// An error's text without the command-line flag names it uses elsewhere.
fn plain(e: Error) -> String {
    match e {
        Error::InvalidInput { reason, .. } => reason,
        other => other.to_string(),
    }
}

/// The rate plans the rows name, once each.
pub fn plans(rows: &[Row]) -> Vec<String> {
    let mut seen = HashSet::new();
    rows.iter().filter_map(|r| r.rate_plan.clone()).filter(|p| seen.insert(p.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MD5: &str = "0123456789abcdef0123456789ABCDEF";

    fn parse_str(text: &str) -> Parsed {
        parse(text.as_bytes()).expect("a usable file")
    }

    #[test]
    fn passwords_become_ha1s_per_realm_and_settings_become_fields() {
        let p = parse_str(
            "aor,realm,password,kind,balance,rate_plan,max_calls,credit_limit\n\
             1001@sip.example.net,voip.old.example;sip.example.net,pw1,prepaid,12.50,retail,2,\n\
             1002@sip.example.net,,pw2,POSTPAID,,,0,unlimited\n",
        );
        assert!(p.bad.is_empty(), "{:?}", p.bad);
        let r = &p.rows[0];
        assert_eq!((r.line, r.aor.to_string()), (2, "1001@sip.example.net".to_owned()));
        let names: Vec<&str> = r.fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "ha1:md5:voip.old.example",
                "ha1:sha256:voip.old.example",
                "ha1:md5:sip.example.net",
                "ha1:sha256:sip.example.net",
                "kind",
                "rate_plan",
                "max_concurrent_calls"
            ]
        );
        assert_eq!(r.balance_micros, Some(12_500_000));
        assert_eq!(plans(&p.rows), ["retail"]);
        // Default realm is the AOR's domain; 0 calls and unlimited credit remove the setting.
        let r = &p.rows[1];
        assert!(r.fields.contains(&(
            "ha1:md5:sip.example.net".into(),
            sipmsg::digest::ha1(Algorithm::Md5, "1002", "sip.example.net", "pw2")
        )));
        assert!(r.fields.contains(&("max_concurrent_calls".into(), String::new())));
        assert!(r.fields.contains(&("credit_limit_micros".into(), String::new())));
        assert!(r.fields.contains(&("kind".into(), "postpaid".into())));
    }

    #[test]
    fn ha1_rows_need_one_realm_and_well_formed_hashes() {
        let p = parse_str(&format!(
            "ha1_md5,aor,realm\n{MD5},a@x.example,old.example\n{MD5},b@x.example,r1;r2\nzz,c@x.example,r\n"
        ));
        assert_eq!(p.rows.len(), 1);
        assert_eq!(
            p.rows[0].fields,
            [("ha1:md5:old.example".to_owned(), MD5.to_ascii_lowercase())]
        );
        assert_eq!(p.bad.len(), 2, "{:?}", p.bad);
        assert_eq!(p.bad[0].0, 3);
        assert!(p.bad[0].1.starts_with("realm:"), "{:?}", p.bad);
        assert_eq!(p.bad[1].0, 4);
        assert!(p.bad[1].1.starts_with("ha1_md5:"), "{:?}", p.bad);
    }

    #[test]
    fn every_bad_line_is_reported_by_number_and_the_rest_kept() {
        let p = parse_str(
            "aor,password,balance,kind,max_calls\n\
             ok1@x.example,pw,,,\n\
             not-an-aor,pw,,,\n\
             ok2@x.example,pw,1.5.0,,\n\
             ok3@x.example,pw,,weekly,\n\
             ok4@x.example,pw,,,-1\n\
             ok5@x.example,pw\n\
             \"ok6@x.example\",\"p,w\",,prepaid,3\n\
             ,,,,\n\
             ok7@x.example,pw,,,99999999999\n",
        );
        let lines: Vec<u64> = p.bad.iter().map(|(l, _)| *l).collect();
        assert_eq!(lines, [3, 4, 5, 6, 7, 10], "{:?}", p.bad);
        assert!(p.bad[4].1.contains("2 fields where the header has 5"), "{:?}", p.bad);
        let good: Vec<String> = p.rows.iter().map(|r| r.aor.to_string()).collect();
        assert_eq!(good, ["ok1@x.example", "ok6@x.example"]);
    }

    #[test]
    fn hostile_files_are_refused_whole_or_line_by_line() {
        // Unusable as a whole: no header, an unknown or repeated column, no aor column.
        for text in ["", "aor,secret\n", "aor,aor\n", "realm,password\nx,y\n", "aor;realm\n"] {
            assert!(parse(text.as_bytes()).is_err(), "{text:?}");
        }
        // A spreadsheet's BOM before the header is fine.
        assert!(parse("\u{feff}aor\na@x.example\n".as_bytes()).is_ok());
        let mut bytes = b"aor,password\n".to_vec();
        bytes.extend_from_slice(b"a@x.example,\xff\xfe\n");
        bytes.extend_from_slice(b"b@x.example,pw\x01\n");
        bytes.extend_from_slice(b"c@x.example,ok\n");
        bytes.extend_from_slice(format!("d@x.example,{}\n", "p".repeat(MAX_LINE)).as_bytes());
        bytes.extend_from_slice(b"\"e@x.example\r\nX-Injected: 1\",pw\n");
        let p = parse(bytes.as_slice()).expect("usable");
        let good: Vec<String> = p.rows.iter().map(|r| r.aor.to_string()).collect();
        assert_eq!(good, ["c@x.example"], "{:?}", p.bad);
        assert_eq!(p.bad.len(), 4, "{:?}", p.bad);
        assert!(p.bad[0].1.contains("UTF-8"), "{:?}", p.bad);
    }
}

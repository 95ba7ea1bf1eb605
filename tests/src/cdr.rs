//! Call detail records as printed by `sipalias-billing cdr list --csv`.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};

/// One CDR. Columns are found by header name, so their order may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cdr {
    /// Billing's reference of the call.
    pub call_ref: String,
    /// Caller AOR.
    pub caller: String,
    /// Callee AOR.
    pub callee: String,
    /// Local IP the caller's INVITE came in on.
    pub caller_ingress_ip: String,
    /// Local IP the callee was reached through.
    pub callee_ingress_ip: String,
    /// When the call was answered (ms since the epoch), if it was.
    pub answered_ms: Option<u64>,
    /// When it ended (ms since the epoch).
    pub ended_ms: Option<u64>,
    /// Billed duration in ms.
    pub duration_ms: Option<u64>,
    /// Why it ended.
    pub cause: String,
    /// What was charged, in micro-units, once charged.
    pub charge_micros: Option<u64>,
    /// For a call not answered (a failed attempt): the final status its caller got.
    pub status: Option<u64>,
    /// Its reason phrase, or why the call was refused.
    pub reason: String,
}

/// Parses the CSV output (header line first).
pub fn parse_csv(text: &str) -> Result<Vec<Cdr>> {
    let mut rows = records(text).into_iter();
    let header = rows.next().context("CDR CSV without header line")?;
    let col: HashMap<&str, usize> =
        header.iter().enumerate().map(|(i, h)| (h.as_str(), i)).collect();
    let mut out = Vec::new();
    for row in rows {
        let text = |name: &str| -> Result<String> {
            let i = *col.get(name).with_context(|| format!("CDR CSV has no column {name}"))?;
            Ok(row.get(i).cloned().unwrap_or_default())
        };
        let num = |name: &str| -> Result<Option<u64>> {
            let v = text(name)?;
            if v.is_empty() {
                return Ok(None);
            }
            match v.parse() {
                Ok(n) => Ok(Some(n)),
                Err(_) => bail!("CDR column {name} is not a number: {v:?}"),
            }
        };
        out.push(Cdr {
            call_ref: text("call_ref")?,
            caller: text("caller")?,
            callee: text("callee")?,
            caller_ingress_ip: text("caller_ingress_ip")?,
            callee_ingress_ip: text("callee_ingress_ip")?,
            answered_ms: num("answered_ms")?,
            ended_ms: num("ended_ms")?,
            duration_ms: num("duration_ms")?,
            cause: text("cause")?,
            charge_micros: if col.contains_key("charge_micros") {
                num("charge_micros")?
            } else {
                None
            },
            status: if col.contains_key("status") { num("status")? } else { None },
            reason: if col.contains_key("reason") { text("reason")? } else { String::new() },
        });
    }
    Ok(out)
}

/// RFC 4180 records: fields split on commas, `"…"` quoting with `""` escapes, blank lines
/// skipped.
fn records(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => row.push(std::mem::take(&mut field)),
            '\r' if !quoted => {}
            '\n' if !quoted => {
                row.push(std::mem::take(&mut field));
                if !(row.len() == 1 && row[0].is_empty()) {
                    out.push(std::mem::take(&mut row));
                }
                row.clear();
            }
            c => field.push(c),
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        out.push(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_billing_csv_with_quotes_and_empty_numbers() -> Result<()> {
        let csv = "call_ref,caller,callee,caller_ingress_ip,callee_ingress_ip,answered_ms,ended_ms,duration_ms,cause\n\
                   c1,bob@sip.example.net,alice@sip.example.net,127.0.0.1,127.0.0.2,1000,2500,1500,bye\n\
                   \"c,2\",bob@sip.example.net,alice@sip.example.net,127.0.0.1,127.0.0.2,,3000,,\"said \"\"no\"\"\"\n";
        let cdrs = parse_csv(csv)?;
        assert_eq!(cdrs.len(), 2);
        assert_eq!(cdrs[0].duration_ms, Some(1500));
        assert_eq!(cdrs[0].callee_ingress_ip, "127.0.0.2");
        assert_eq!(cdrs[1].call_ref, "c,2");
        assert_eq!(cdrs[1].answered_ms, None);
        assert_eq!(cdrs[1].cause, "said \"no\"");
        Ok(())
    }

    #[test]
    fn header_only_is_no_records() -> Result<()> {
        assert!(parse_csv("call_ref,caller,callee,caller_ingress_ip,callee_ingress_ip,answered_ms,ended_ms,duration_ms,cause\n")?.is_empty());
        Ok(())
    }
}

//! The operator's cluster view: what `sipalias-dispatcher status` prints from a dispatcher's
//! `Status` answer — which processors are linked to it, their load, whether they are draining
//! and how much was routed to each. Pure formatting; the CLI does the call.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};
use sipalias_proto::edge::{BansResponse, LocalSocket, SocketState, StatusResponse, Transport};

/// The URL to query a dispatcher whose `grpc_listen` is `addr` (a wildcard address is reached
/// over loopback).
pub use sipalias_proto::url_for_listen;

/// `--grpc` as given: `http://ip:port`, or a bare `ip:port` (taken as `http://`).
pub fn normalize_url(given: &str) -> String {
    let given = given.trim();
    if given.contains("://") { given.to_owned() } else { format!("http://{given}") }
}

/// The cluster view of one dispatcher (queried at `url`) as a header line and a table with a
/// row per linked processor.
pub fn render(url: &str, status: &StatusResponse) -> String {
    let mut out = String::new();
    let n = status.processors.len();
    let draining = status.processors.iter().filter(|p| p.draining).count();
    let _ = write!(
        out,
        "dispatcher {} at {url}: up {}, {n} processor{} linked",
        status.dispatcher_id,
        human(Duration::from_millis(status.uptime_ms)),
        if n == 1 { "" } else { "s" },
    );
    if draining > 0 {
        let _ = write!(out, " ({draining} draining)");
    }
    out.push('\n');
    if n == 0 {
        out.push_str("no processor linked: requests are answered with 503\n");
        return out;
    }
    let header = [
        "PROCESSOR",
        "PEER",
        "CONNECTED SINCE (UTC)",
        "LAST SEEN",
        "TRANSACTIONS",
        "DIALOGS",
        "STATE",
        "ROUTED",
    ];
    let rows: Vec<[String; 8]> = status
        .processors
        .iter()
        .map(|p| {
            [
                p.node_id.clone(),
                if p.peer.is_empty() { "-".to_owned() } else { p.peer.clone() },
                utc(p.connected_at_ms),
                format!("{:.1} s ago", Duration::from_millis(p.last_seen_ms_ago).as_secs_f64()),
                p.transactions.to_string(),
                p.dialogs.to_string(),
                if p.draining { "draining" } else { "active" }.to_owned(),
                p.routed.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(&header, &rows));
    out
}

/// What `sipalias-dispatcher bans` prints: the guard's counters, then a row per ban in force.
pub fn render_bans(url: &str, bans: &BansResponse) -> String {
    let mut out = format!(
        "dispatcher {} at {url}: {} ban{} in force; dropped {} from banned sources, {} \
         from scanners; {} rate bans, {} bans from processors; {} new requests answered 503; {} \
         sends to denied destinations\n",
        bans.dispatcher_id.escape_debug(),
        bans.bans.len(),
        if bans.bans.len() == 1 { "" } else { "s" },
        bans.dropped_banned,
        bans.dropped_scanners,
        bans.rate_bans,
        bans.processor_bans,
        bans.shed,
        bans.denied_destinations,
    );
    if bans.bans.is_empty() {
        return out;
    }
    let header = ["SOURCE", "REASON", "REMAINING", "DROPPED"];
    let rows: Vec<[String; 4]> = bans
        .bans
        .iter()
        .map(|b| {
            [
                // Sources and reasons come from the dispatcher, which validated them; escaped
                // anyway, so a terminal never receives control characters from the network.
                b.source.escape_debug().to_string(),
                b.reason.escape_debug().to_string(),
                human(Duration::from_millis(b.remaining_ms)),
                b.dropped.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(&header, &rows));
    out
}

/// The SIP sockets of one dispatcher (queried at `url`): a header line and a row per socket
/// with its state and open connections.
pub fn render_sockets(url: &str, status: &StatusResponse) -> String {
    let draining = status.sockets.iter().filter(|s| s.draining).count();
    let mut out = format!(
        "dispatcher {} at {url}: {} socket{}",
        status.dispatcher_id.escape_debug(),
        status.sockets.len(),
        if status.sockets.len() == 1 { "" } else { "s" }
    );
    if draining > 0 {
        let _ = write!(out, " ({draining} draining)");
    }
    out.push('\n');
    let header = ["IP", "PORT", "TRANSPORT", "KIND", "DOMAIN", "REALM", "STATE", "CONNECTIONS"];
    let rows: Vec<[String; 8]> = status
        .sockets
        .iter()
        .map(|s| {
            let socket = s.socket.clone().unwrap_or_default();
            [
                socket.ip.escape_debug().to_string(),
                socket.port.to_string(),
                transport(&socket).to_owned(),
                if socket.alias { "alias" } else { "main" }.to_owned(),
                socket.domain.escape_debug().to_string(),
                socket.realm.escape_debug().to_string(),
                state(s).to_owned(),
                s.connections.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(&header, &rows));
    out
}

fn transport(socket: &LocalSocket) -> &'static str {
    match socket.transport() {
        Transport::Udp => "udp",
        Transport::Tcp => "tcp",
        Transport::Tls => "tls",
        Transport::Unspecified => "?",
    }
}

fn state(s: &SocketState) -> &'static str {
    if s.draining { "draining" } else { "configured" }
}

/// One dispatcher's `Status` answer as JSON: its processors and its sockets.
pub fn status_json(url: &str, status: &StatusResponse) -> Value {
    let processors: Vec<Value> = status
        .processors
        .iter()
        .map(|p| {
            json!({
                "id": p.node_id,
                "peer": p.peer,
                "connected_at_ms": p.connected_at_ms,
                "last_seen_ms_ago": p.last_seen_ms_ago,
                "transactions": p.transactions,
                "dialogs": p.dialogs,
                "draining": p.draining,
                "routed": p.routed,
                "capacity": p.capacity,
            })
        })
        .collect();
    let sockets: Vec<Value> = status
        .sockets
        .iter()
        .map(|s| {
            let socket = s.socket.clone().unwrap_or_default();
            json!({
                "ip": socket.ip,
                "port": socket.port,
                "transport": transport(&socket),
                "alias": socket.alias,
                "domain": socket.domain,
                "realm": socket.realm,
                "state": state(s),
                "connections": s.connections,
            })
        })
        .collect();
    json!({
        "dispatcher": url,
        "id": status.dispatcher_id,
        "uptime_ms": status.uptime_ms,
        "processors": processors,
        "sockets": sockets,
    })
}

/// One dispatcher's `Bans` answer as JSON.
pub fn bans_json(url: &str, bans: &BansResponse) -> Value {
    let list: Vec<Value> = bans
        .bans
        .iter()
        .map(|b| {
            json!({
                "source": b.source,
                "reason": b.reason,
                "remaining_ms": b.remaining_ms,
                "dropped": b.dropped,
            })
        })
        .collect();
    json!({
        "dispatcher": url,
        "id": bans.dispatcher_id,
        "bans": list,
        "dropped_banned": bans.dropped_banned,
        "dropped_scanners": bans.dropped_scanners,
        "rate_bans": bans.rate_bans,
        "processor_bans": bans.processor_bans,
        "shed": bans.shed,
        "denied_destinations": bans.denied_destinations,
    })
}

/// Aligned columns: each cell padded to its column's widest, the last column unpadded.
fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut out = String::new();
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<w$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(header);
    for row in rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

/// `3d04h05m`, `2h03m`, `5m07s`, `12s`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, mins, secs) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    if days > 0 {
        format!("{days}d{hours:02}h{mins:02}m")
    } else if hours > 0 {
        format!("{hours}h{mins:02}m")
    } else if mins > 0 {
        format!("{mins}m{secs:02}s")
    } else {
        format!("{secs}s")
    }
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD hh:mm:ss` (UTC).
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = civil_from_days(i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2));
    let rem = secs % 86_400;
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sipalias_proto::edge::LinkedProcessor;

    #[test]
    fn dates_are_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(utc(1_767_225_599_999), "2025-12-31 23:59:59");
        assert_eq!(utc(1_767_225_600_000), "2026-01-01 00:00:00");
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(human(Duration::from_secs(12)), "12s");
        assert_eq!(human(Duration::from_secs(307)), "5m07s");
        assert_eq!(human(Duration::from_secs(7380)), "2h03m");
        assert_eq!(human(Duration::from_secs(3 * 86_400 + 4 * 3600 + 5 * 60)), "3d04h05m");
    }

    #[test]
    fn urls() {
        assert_eq!(normalize_url("10.0.0.5:7070"), "http://10.0.0.5:7070");
        assert_eq!(normalize_url("https://d2:7070"), "https://d2:7070");
    }

    #[test]
    fn renders_one_row_per_processor() {
        let p = |id: &str, draining, routed| LinkedProcessor {
            node_id: id.to_owned(),
            peer: "127.0.0.1:40001".to_owned(),
            connected_at_ms: 1_767_225_600_000,
            last_seen_ms_ago: 1200,
            transactions: 12,
            dialogs: 4,
            draining,
            routed,
            capacity: 10_000,
        };
        let status = StatusResponse {
            dispatcher_id: "d1".to_owned(),
            uptime_ms: 7_380_000,
            processors: vec![p("p1", false, 10_234), p("p2-long-name", true, 7)],
            sockets: vec![],
        };
        let text = render("http://127.0.0.1:7070", &status);
        let expected = "\
dispatcher d1 at http://127.0.0.1:7070: up 2h03m, 2 processors linked (1 draining)
PROCESSOR     PEER             CONNECTED SINCE (UTC)  LAST SEEN  TRANSACTIONS  DIALOGS  STATE     ROUTED
p1            127.0.0.1:40001  2026-01-01 00:00:00    1.2 s ago  12            4        active    10234
p2-long-name  127.0.0.1:40001  2026-01-01 00:00:00    1.2 s ago  12            4        draining  7
";
        assert_eq!(text, expected);

        let empty = StatusResponse {
            dispatcher_id: "d2".into(),
            uptime_ms: 5000,
            processors: vec![],
            sockets: vec![],
        };
        assert_eq!(
            render("http://h:1", &empty),
            "dispatcher d2 at http://h:1: up 5s, 0 processors linked\n\
             no processor linked: requests are answered with 503\n"
        );
    }

    #[test]
    fn sockets_show_their_state_and_hostile_names_are_escaped() {
        let socket =
            |ip: &str, port, transport: Transport, alias, draining, connections| SocketState {
                socket: Some(LocalSocket {
                    ip: ip.to_owned(),
                    port,
                    transport: transport.into(),
                    alias,
                    domain: "sip.example.net".to_owned(),
                    realm: "old\u{1b}[2J".to_owned(),
                    digest_algorithms: vec![],
                }),
                draining,
                connections,
            };
        let status = StatusResponse {
            dispatcher_id: "d1".to_owned(),
            uptime_ms: 1000,
            processors: vec![],
            sockets: vec![
                socket("127.0.0.1", 5060, Transport::Udp, false, false, 0),
                socket("127.0.0.2", 5061, Transport::Tls, true, true, 3),
            ],
        };
        let text = render_sockets("http://h:1", &status);
        let expected = "\
dispatcher d1 at http://h:1: 2 sockets (1 draining)
IP         PORT  TRANSPORT  KIND   DOMAIN           REALM         STATE       CONNECTIONS
127.0.0.1  5060  udp        main   sip.example.net  old\\u{1b}[2J  configured  0
127.0.0.2  5061  tls        alias  sip.example.net  old\\u{1b}[2J  draining    3
";
        assert_eq!(text, expected);
        let json = status_json("http://h:1", &status);
        assert_eq!(json["sockets"][1]["state"], "draining");
        assert_eq!(json["sockets"][1]["transport"], "tls");
        assert_eq!(json["sockets"][0]["connections"], 0);
        assert_eq!(json["id"], "d1");
    }
}

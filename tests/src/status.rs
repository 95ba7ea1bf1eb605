//! The cluster view printed by `sipalias-dispatcher status`, parsed for assertions.
//!
//! The table is aligned text: every column starts where its header starts, and cells may hold
//! single spaces (`2026-01-01 10:00:00`, `0.4 s ago`), so rows are cut at the header's column
//! positions rather than split on whitespace. Columns are found by header name.

use anyhow::{Context, Result, bail};

/// One dispatcher's view: its header line and a row per linked processor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    /// The first line, e.g. `dispatcher d1 at http://…: up 3s, 2 processors linked`.
    pub summary: String,
    /// The linked processors, in the order printed (by id).
    pub processors: Vec<LinkedProcessor>,
}

impl ClusterView {
    /// The row of processor `id`, if it is linked.
    pub fn processor(&self, id: &str) -> Option<&LinkedProcessor> {
        self.processors.iter().find(|p| p.id == id)
    }
}

/// One processor row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedProcessor {
    /// Its id (`PROCESSOR`).
    pub id: String,
    /// The address its link comes from (`PEER`).
    pub peer: String,
    /// Transactions at its last heartbeat.
    pub transactions: u64,
    /// Dialogs at its last heartbeat.
    pub dialogs: u64,
    /// `active` or `draining`.
    pub state: String,
    /// Messages routed to it since it linked.
    pub routed: u64,
}

/// Parses the output of `sipalias-dispatcher status` for one dispatcher.
pub fn parse(text: &str) -> Result<ClusterView> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let summary = lines.next().context("empty status output")?.to_owned();
    if !summary.starts_with("dispatcher ") {
        bail!("status output does not start with the dispatcher line:\n{text}");
    }
    let Some(header) = lines.next() else {
        return Ok(ClusterView { summary, processors: Vec::new() });
    };
    if !header.starts_with("PROCESSOR") {
        // "no processor linked: …"
        return Ok(ClusterView { summary, processors: Vec::new() });
    }
    const NAMES: [&str; 8] = [
        "PROCESSOR",
        "PEER",
        "CONNECTED SINCE (UTC)",
        "LAST SEEN",
        "TRANSACTIONS",
        "DIALOGS",
        "STATE",
        "ROUTED",
    ];
    let mut starts = Vec::new();
    for name in NAMES {
        starts.push(header.find(name).with_context(|| format!("no column {name}: {header}"))?);
    }
    let mut sorted = starts.clone();
    sorted.sort_unstable();
    let mut processors = Vec::new();
    for row in lines {
        let cell = |name: &str| -> Result<String> {
            let i = NAMES.iter().position(|n| *n == name).context("unknown column")?;
            let start = starts[i];
            let end = sorted.iter().copied().find(|s| *s > start).unwrap_or(usize::MAX);
            let chars: Vec<char> = row.chars().collect();
            let end = end.min(chars.len());
            let text: String = chars.get(start..end).unwrap_or_default().iter().collect();
            Ok(text.trim().to_owned())
        };
        let num = |name: &str| -> Result<u64> {
            let v = cell(name)?;
            v.parse().with_context(|| format!("column {name} is not a number: {v:?} in {row:?}"))
        };
        processors.push(LinkedProcessor {
            id: cell("PROCESSOR")?,
            peer: cell("PEER")?,
            transactions: num("TRANSACTIONS")?,
            dialogs: num("DIALOGS")?,
            state: cell("STATE")?,
            routed: num("ROUTED")?,
        });
    }
    Ok(ClusterView { summary, processors })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rows_by_column_position() -> Result<()> {
        let text = "\
dispatcher d1 at http://127.0.0.1:7070: up 2h03m, 2 processors linked (1 draining)
PROCESSOR     PEER             CONNECTED SINCE (UTC)  LAST SEEN  TRANSACTIONS  DIALOGS  STATE     ROUTED
p1            127.0.0.1:40001  2026-01-01 00:00:00    1.2 s ago  12            4        active    10234
p2-long-name  127.0.0.1:40002  2026-01-01 00:00:00    1.2 s ago  0             0        draining  7
";
        let view = parse(text)?;
        assert!(view.summary.ends_with("(1 draining)"));
        assert_eq!(view.processors.len(), 2);
        let p1 = view.processor("p1").context("p1")?;
        assert_eq!((p1.transactions, p1.dialogs, p1.routed), (12, 4, 10234));
        assert_eq!((p1.state.as_str(), p1.peer.as_str()), ("active", "127.0.0.1:40001"));
        let p2 = view.processor("p2-long-name").context("p2")?;
        assert_eq!((p2.state.as_str(), p2.routed), ("draining", 7));
        Ok(())
    }

    #[test]
    fn no_processor_linked_is_an_empty_view() -> Result<()> {
        let view = parse(
            "dispatcher d2 at http://127.0.0.1:7071: up 5s, 0 processors linked\n\
             no processor linked: requests are answered with 503\n",
        )?;
        assert!(view.processors.is_empty());
        Ok(())
    }
}

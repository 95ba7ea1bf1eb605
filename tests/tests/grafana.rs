//! The Grafana dashboard shipped in deploy/grafana: valid JSON, and every metric its queries
//! name is one the services record (a renamed metric would leave a panel silently empty).

use std::collections::BTreeSet;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/../{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `sipalias_…` names in `text`.
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("sipalias_") {
        let tail = &rest[i..];
        let end =
            tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

#[test]
fn every_metric_the_dashboard_queries_is_recorded_by_a_service() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/sipalias.json")).expect("valid JSON");
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queried.extend(names(target["expr"].as_str().expect("expr")));
        }
    }
    assert!(queried.len() >= 8, "{queried:?}");
    let sources =
        ["dispatcher/src/telemetry.rs", "processor/src/telemetry.rs", "billing/src/service.rs"];
    let recorded: BTreeSet<String> = sources.iter().flat_map(|s| names(&read(s))).collect();
    for name in &queried {
        // Histograms are queried through their series.
        let base =
            name.trim_end_matches("_bucket").trim_end_matches("_count").trim_end_matches("_sum");
        assert!(recorded.contains(base), "{name} is queried but no service records {base}");
    }
}

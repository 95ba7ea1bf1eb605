//! The module structure of every crate: no module imports another in a circle
//! (docs/architecture.md). A dependency is any `crate::<module>` path, or a name in a
//! `use crate::{...}` group, outside comments and outside the `#[cfg(test)] mod tests` at the
//! end of a file; a folder module counts as one module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};

/// The crates whose `src/` is checked.
const CRATES: [&str; 5] = ["sipmsg", "proto", "dispatcher", "processor", "billing"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The code of a file without its line comments and without its trailing unit-test module.
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or_default();
    text.lines().map(|l| l.split("//").next().unwrap_or_default()).collect::<Vec<_>>().join("\n")
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_lowercase() || c == '_'
}

/// The lower-case names after `crate::` and inside `use crate::{...}` groups.
fn referenced(code: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = group.split('}').next().unwrap_or_default();
            for item in group.split(',') {
                let name = item.trim().split([':', ' ']).next().unwrap_or_default();
                if name.starts_with(is_ident_start) {
                    names.insert(name.to_owned());
                }
            }
        } else {
            let name: String =
                rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if name.starts_with(is_ident_start) {
                names.insert(name);
            }
        }
    }
    names
}

/// Each top-level module of `src` and the modules it uses.
fn graph(src: &Path) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let mut files = Vec::new();
    rust_files(src, &mut files)?;
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let rel = file.strip_prefix(src)?;
        let first = rel.components().next().context("empty path")?;
        let name = first.as_os_str().to_string_lossy().trim_end_matches(".rs").to_owned();
        let text = std::fs::read_to_string(file)?;
        graph.entry(name).or_default().extend(referenced(&code(&text)));
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for (name, uses) in &mut graph {
        uses.retain(|u| modules.contains(u) && u != name);
    }
    Ok(graph)
}

/// The strongly connected components of more than one module (Tarjan).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        for w in s.graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                s.low.entry(v).and_modify(|l| *l = (*l).min(lw));
            } else if s.stack.contains(&w) {
                let iw = s.index[w];
                s.low.entry(v).and_modify(|l| *l = (*l).min(iw));
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found
}

#[test]
fn no_crate_has_an_import_circle_between_its_modules() -> Result<()> {
    let mut circles = Vec::new();
    for krate in CRATES {
        let graph = graph(&repo().join(krate).join("src"))?;
        ensure!(graph.len() > 1, "{krate}: no modules found");
        for cycle in cycles(&graph) {
            circles.push(format!("{krate}: {}", cycle.join(" ⇄ ")));
        }
    }
    ensure!(circles.is_empty(), "import circles:\n{}", circles.join("\n"));
    Ok(())
}

#[test]
fn the_checker_finds_a_circle_and_reads_use_groups_but_not_comments() {
    let text = "use crate::{b, c::X};\n// crate::d\nfn f() { crate::e::g(); }\n#[cfg(test)]\nmod tests { use crate::h; }";
    let names = referenced(&code(text));
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["b", "c", "e"]);
    let edges = |list: &[(&str, &[&str])]| -> BTreeMap<String, BTreeSet<String>> {
        list.iter()
            .map(|(m, uses)| (m.to_string(), uses.iter().map(|u| u.to_string()).collect()))
            .collect()
    };
    let circular = edges(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"]), ("d", &["a"])]);
    assert_eq!(cycles(&circular), vec![vec!["a".to_owned(), "b".into(), "c".into()]]);
    let layered = edges(&[("a", &["b", "c"]), ("b", &["c"]), ("c", &[])]);
    assert!(cycles(&layered).is_empty());
}

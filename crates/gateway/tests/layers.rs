//! The gateway's layout (crate doc in src/lib.rs) holds: every SQL statement is in the storage
//! module, and modules import each other in one direction. The source is read as text: a
//! module's imports are the `crate::NAME` paths it names (and, inside a directory module, the
//! `super::NAME` paths and the `use NAME::` lines of its `mod.rs`), outside comments and the
//! test module at the end of a file.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// A source file, as `(module path, text without comments and test module)`: `storage` for
/// `storage/mod.rs`, `storage::records` for `storage/records.rs`.
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&root, &mut files);
    files.sort();
    files
        .into_iter()
        .filter_map(|path| {
            let relative = path.strip_prefix(&root).unwrap().with_extension("");
            let parts: Vec<String> = relative
                .components()
                .map(|part| part.as_os_str().to_string_lossy().into_owned())
                .filter(|part| part != "mod")
                .collect();
            if parts == ["lib"] || parts == ["main"] {
                return None;
            }
            Some((parts.join("::"), code_of(&fs::read_to_string(&path).unwrap())))
        })
        .collect()
}

/// The text of a file without line comments and without its test module (by the crate's
/// convention the last item of a file).
fn code_of(text: &str) -> String {
    let text = text.find("#[cfg(test)]").map_or(text, |at| &text[..at]);
    text.lines()
        .map(|line| line.find("//").map_or(line, |at| &line[..at]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The identifiers that follow each occurrence of `prefix` (for `crate::{a, b::c}`, `a` and `b`).
fn names_after(code: &str, prefix: &str) -> Vec<(String, String)> {
    let mut names = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let boundary = rest[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == ':'));
        rest = &rest[at + prefix.len()..];
        if !boundary {
            continue;
        }
        let path = |text: &str| -> (String, String) {
            let first: String = text
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let after = &text[first.len()..];
            let second = after
                .strip_prefix("::")
                .map(|after| {
                    after
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect()
                })
                .unwrap_or_default();
            (first, second)
        };
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let (first, second) = path(item.trim());
                if !first.is_empty() && first != "self" {
                    names.push((first, second));
                }
            }
        } else {
            let (first, second) = path(rest);
            if !first.is_empty() {
                names.push((first, second));
            }
        }
    }
    names
}

/// Module → the modules it imports, among `modules`.
fn imports(sources: &[(String, String)]) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<&str> = sources.iter().map(|(module, _)| module.as_str()).collect();
    let mut graph = BTreeMap::new();
    for (module, code) in sources {
        let mut targets = BTreeSet::new();
        for (first, second) in names_after(code, "crate::") {
            let nested = format!("{first}::{second}");
            if modules.contains(nested.as_str()) {
                targets.insert(nested);
            } else if modules.contains(first.as_str()) {
                targets.insert(first);
            }
        }
        // `super::x` in `dir::file` names `dir::x`; a `mod.rs` names its children directly.
        let (parent, prefixes) = match module.rsplit_once("::") {
            Some((parent, _)) => (parent.to_owned(), vec!["super::"]),
            None => (module.clone(), vec!["use "]),
        };
        for prefix in prefixes {
            for (first, _) in names_after(code, prefix) {
                let sibling = format!("{parent}::{first}");
                if modules.contains(sibling.as_str()) {
                    targets.insert(sibling);
                }
            }
        }
        targets.remove(module);
        graph.insert(module.clone(), targets);
    }
    graph
}

/// A cycle of the graph, if it has one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|seen| seen == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

/// The graph with every module folded into its top-level module.
fn top_level(graph: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, BTreeSet<String>> {
    let top = |module: &str| module.split("::").next().unwrap_or(module).to_owned();
    let mut folded: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, targets) in graph {
        let from = top(module);
        let entry = folded.entry(from.clone()).or_default();
        entry.extend(targets.iter().map(|target| top(target)).filter(|to| *to != from));
    }
    folded
}

#[test]
fn every_sql_statement_is_in_the_storage_module() {
    let mut outside = Vec::new();
    for (module, code) in sources() {
        if module == "storage" || module.starts_with("storage::") {
            continue;
        }
        for needle in ["sqlx", "\"SELECT", "\"INSERT", "\"UPDATE", "\"DELETE", "\"PRAGMA"] {
            if code.contains(needle) {
                outside.push(format!("{module}: {needle}"));
            }
        }
    }
    assert!(outside.is_empty(), "SQL outside crate::storage: {outside:?}");
}

#[test]
fn modules_import_each_other_in_one_direction() {
    let graph = imports(&sources());
    // The reading itself works: known edges are seen, so an empty graph cannot pass.
    assert!(graph["handlers::tokenize"].contains("state"), "{graph:?}");
    assert!(
        graph["storage::store"].contains("storage::write_queue"),
        "{graph:?}"
    );
    assert!(graph["storage"].contains("storage::records"), "{graph:?}");
    let folded = top_level(&graph);
    assert_eq!(
        cycle(&folded),
        None,
        "an import circle between the gateway's modules"
    );
    assert_eq!(cycle(&graph), None, "an import circle inside a directory module");
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(from, to)| (from.to_owned(), to.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(
        cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let code = code_of("use crate::{x::Y, z};\nuse super::w; // crate::not_this\n");
    assert_eq!(
        names_after(&code, "crate::"),
        [("x".to_owned(), "Y".to_owned()), ("z".to_owned(), String::new())]
    );
}

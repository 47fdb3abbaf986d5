//! The import graph of src/ follows the layers the README's "Layout" section draws: every
//! `crate::` path outside test modules points down (or sideways along an edge listed here),
//! and no two top-level modules import each other, directly or through others.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules by layer, top first. A module may import any module of a lower layer.
const LAYERS: &[&[&str]] = &[
    &["cli", "airgap", "inspect", "healthcheck"],
    &["server"],
    &["routes"],
    &["app"],
    &[
        "cache",
        "upstream",
        "access",
        "metrics",
        "access_log",
        "status",
        "limits",
        "charts",
        "history",
        "fleet",
    ],
    &[
        "router",
        "reference",
        "rewrite",
        "media",
        "range",
        "error",
        "body",
        "flight",
        "hints",
    ],
    &["config", "units"],
];

/// Imports between modules of one layer that are allowed (importer, imported).
const SIDEWAYS: &[(&str, &str)] = &[
    // Commands: `ls`/`stats` and the air-gap commands share name parsing and the cache walk.
    ("cli", "airgap"),
    ("cli", "inspect"),
    ("airgap", "inspect"),
    // The metrics exposition reads the other figures; none of them reads metrics.
    ("metrics", "upstream"),
    ("metrics", "cache"),
    ("metrics", "status"),
    ("metrics", "access_log"),
    ("metrics", "access"),
    ("metrics", "limits"),
    ("access_log", "access"),
    // Protocol: errors map the parsers' typed errors; parsers build on validated names.
    ("router", "reference"),
    ("rewrite", "reference"),
    ("rewrite", "router"),
    ("media", "reference"),
    ("error", "reference"),
    ("router", "error"),
    ("error", "rewrite"),
    ("error", "body"),
    ("error", "flight"),
    ("error", "media"),
    ("error", "range"),
    ("body", "flight"),
    ("config", "units"),
    ("charts", "history"),
    ("status", "charts"),
    ("metrics", "history"),
    ("hints", "error"),
    ("hints", "flight"),
    ("hints", "reference"),
    ("status", "history"),
    // The fleet's sources plug into the cache's byte-source seam and upload committed blobs.
    ("fleet", "cache"),
    // The metrics exposition reads the fleet's counters.
    ("metrics", "fleet"),
];

/// Imports against the layers that are still tolerated: none since the restructuring ended.
/// Should one ever be listed, the test fails on an edge not listed anywhere, and also when a
/// listed edge is gone (so this list only shrinks).
const KNOWN: &[(&str, &str)] = &[];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// `src/a/b.rs` and `src/a/b/mod.rs` are `a`'s; `src/a.rs` is `a`; lib.rs and main.rs are the
/// crate root, outside the layers.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_owned())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without `#[cfg(test)]` items (a test may reach anywhere) and comments.
fn without_tests(source: &str) -> String {
    let mut out = String::new();
    let mut rest = source;
    while let Some(i) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        // Skip the attributed item: up to its `;` or its balanced `{ ... }`.
        let mut depth = 0usize;
        let mut end = after.len();
        for (j, c) in after.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = j + 1;
                        break;
                    }
                }
                ';' if depth == 0 => {
                    end = j + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a source names through `crate::`, including `use crate::{a, b::c}`.
fn imports(source: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = source;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            let close = group
                .find("};")
                .or_else(|| group.find('}'))
                .unwrap_or(group.len());
            for item in split_top_level(&group[..close]) {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        } else {
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
        rest = after;
    }
    found
}

fn split_top_level(group: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&group[start..]);
    items
}

/// Every import between two top-level modules: (importer, imported) → files.
fn graph(src: &Path) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut edges: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let Some(from) = top_module(src, &file) else {
            continue;
        };
        let source = without_tests(&std::fs::read_to_string(&file).unwrap());
        for to in imports(&source) {
            if to != from {
                edges
                    .entry((from.clone(), to))
                    .or_default()
                    .insert(file.strip_prefix(src).unwrap().display().to_string());
            }
        }
    }
    edges
}

/// The edges that break the layers, as readable lines.
fn violations(edges: &BTreeMap<(String, String), BTreeSet<String>>) -> Vec<String> {
    let mut bad = Vec::new();
    for ((from, to), files) in edges {
        if KNOWN.contains(&(from.as_str(), to.as_str())) {
            continue;
        }
        let why = match (layer_of(from), layer_of(to)) {
            (None, _) => Some(format!("`{from}` is in no layer (add it to LAYERS)")),
            (_, None) => Some(format!("`{to}` is in no layer (add it to LAYERS)")),
            (Some(a), Some(b)) if a > b => Some("an upward import".to_owned()),
            (Some(a), Some(b)) if a == b && !SIDEWAYS.contains(&(from.as_str(), to.as_str())) => {
                Some("a sideways import not in SIDEWAYS".to_owned())
            }
            _ => None,
        };
        if let Some(why) = why {
            let files: Vec<_> = files.iter().cloned().collect();
            bad.push(format!("{from} -> {to}: {why} (in {})", files.join(", ")));
        }
    }
    bad
}

/// Modules that reach themselves through others.
fn cycles(edges: &BTreeMap<(String, String), BTreeSet<String>>) -> Vec<String> {
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        if KNOWN.contains(&(from.as_str(), to.as_str())) {
            continue;
        }
        next.entry(from).or_default().push(to);
    }
    let mut found = Vec::new();
    for start in next.keys() {
        // Depth-first from `start`, remembering the path, until it comes back.
        let mut stack = vec![(*start, vec![*start])];
        let mut seen = BTreeSet::new();
        while let Some((at, path)) = stack.pop() {
            for to in next.get(at).into_iter().flatten() {
                if to == start {
                    found.push(format!("{} -> {start}", path.join(" -> ")));
                } else if seen.insert(*to) {
                    let mut p = path.clone();
                    p.push(to);
                    stack.push((to, p));
                }
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

#[test]
fn imports_point_down_and_never_in_a_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = graph(&src);
    assert!(edges.len() > 20, "the import graph looks empty: {edges:?}");
    let bad = violations(&edges);
    assert!(
        bad.is_empty(),
        "imports against the layers:\n{}",
        bad.join("\n")
    );
    let gone: Vec<_> = KNOWN
        .iter()
        .filter(|(a, b)| !edges.contains_key(&(a.to_string(), b.to_string())))
        .collect();
    assert!(gone.is_empty(), "fixed, so remove from KNOWN: {gone:?}");
    let circles = cycles(&edges);
    assert!(circles.is_empty(), "import cycles:\n{}", circles.join("\n"));
}

#[test]
fn the_reader_sees_grouped_and_nested_imports() {
    let source = "use crate::{a, b::{c, d}, e::f};\nfn x() { crate::g::h(); }\n\
                  #[cfg(test)]\nmod tests { use crate::z; }\n// crate::comment\n";
    let found = imports(&without_tests(source));
    let want: BTreeSet<String> = ["a", "b", "e", "g"].iter().map(|s| s.to_string()).collect();
    assert_eq!(found, want);
}

#[test]
fn an_upward_import_and_a_cycle_are_caught() {
    let mut edges = BTreeMap::new();
    let file: BTreeSet<String> = ["x.rs".to_owned()].into();
    edges.insert(("cache".to_owned(), "routes".to_owned()), file.clone());
    edges.insert(("routes".to_owned(), "cache".to_owned()), file.clone());
    assert_eq!(violations(&edges).len(), 1);
    assert_eq!(cycles(&edges).len(), 2);
    edges.clear();
    edges.insert(("routes".to_owned(), "cache".to_owned()), file);
    assert!(violations(&edges).is_empty());
    assert!(cycles(&edges).is_empty());
}

//! The shape of `src/`: data flows one way (node → template → sv2), so no module imports
//! one that imports it back — neither between the top-level rooms nor between the files
//! of one room. Read from the source text: `crate::room` and, inside a room, `super::file`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir` except generated code.
fn sources(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() && !path.ends_with("schema") {
            sources(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// `template::store` for `src/template/store.rs`, `template` for `src/template/mod.rs`.
fn module_of(path: &Path) -> String {
    let relative = path
        .strip_prefix("src")
        .expect("under src")
        .with_extension("");
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts
        .last()
        .is_some_and(|p| p == "mod" || p == "lib" || p == "main")
    {
        parts.pop();
    }
    parts.join("::")
}

/// The identifiers that follow each `prefix` in `text`.
fn names_after<'a>(text: &'a str, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    text.match_indices(prefix).map(move |(at, _)| {
        let rest = &text[at + prefix.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        &rest[..end]
    })
}

/// The module graph: an edge from each module to each module it names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    sources(Path::new("src"), &mut files);
    let modules: BTreeMap<String, String> = files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).expect("readable source");
            // Unit tests may reach anywhere.
            let text = text
                .split("#[cfg(test)]\nmod tests")
                .next()
                .unwrap_or("")
                .to_string();
            (module_of(f), text)
        })
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in &modules {
        let room = module.split("::").next().unwrap_or("").to_string();
        for name in names_after(text, "crate::") {
            if !name.is_empty() && name != room {
                edges
                    .entry(room.clone())
                    .or_default()
                    .insert(name.to_string());
            }
        }
        if let Some((parent, _)) = module.rsplit_once("::") {
            for name in names_after(text, "super::") {
                let sibling = format!("{parent}::{name}");
                if modules.contains_key(&sibling) && &sibling != module {
                    edges.entry(module.clone()).or_default().insert(sibling);
                }
            }
        }
    }
    edges
}

/// One cycle through `start`, if any.
fn cycle_through(edges: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![vec![start.to_string()]];
    let mut seen = BTreeSet::new();
    while let Some(path) = stack.pop() {
        let last = path.last().expect("non-empty path").clone();
        for next in edges.get(&last).into_iter().flatten() {
            if next == start {
                let mut cycle = path.clone();
                cycle.push(next.clone());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push(longer);
            }
        }
    }
    None
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let edges = graph();
    assert!(
        edges.get("template").is_some_and(|e| e.contains("node")),
        "the scan sees the imports: {edges:?}"
    );
    let cycles: Vec<String> = edges
        .keys()
        .filter_map(|m| cycle_through(&edges, m))
        .map(|c| c.join(" -> "))
        .collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

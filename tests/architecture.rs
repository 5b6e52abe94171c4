//! The shape of `src/`: data flows one way (node → template → sv2), so no module imports
//! one that imports it back — neither between the top-level rooms nor between the files
//! of one room. Read from the source text: every path that starts with `crate::` or
//! `super::` (once or more), in `use` and `pub use` declarations with their groups
//! (`use crate::{a, b::{c, d}}`) and inline in code (`crate::metrics::metrics()`).

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

/// The source of every module under `src/`, without unit tests (they may reach anywhere)
/// and without comments (a doc link is not an import).
fn modules() -> BTreeMap<String, String> {
    let mut files = Vec::new();
    sources(Path::new("src"), &mut files);
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).expect("readable source");
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
            (module_of(f), without_comments(code))
        })
        .collect()
}

fn without_comments(code: &str) -> String {
    code.lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Debug, PartialEq)]
enum Token {
    Name(String),
    Path,
    Open,
    Close,
    Comma,
    Glob,
    Other,
}

/// The tokens of a path tree at the start of `text`, up to the first one that cannot
/// continue it (`;`, `(`, whitespace is skipped).
fn tokens(text: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut rest = text;
    let mut depth = 0usize;
    loop {
        rest = rest.trim_start();
        let token = if let Some(r) = rest.strip_prefix("::") {
            rest = r;
            Token::Path
        } else if let Some(r) = rest.strip_prefix('{') {
            rest = r;
            depth += 1;
            Token::Open
        } else if let Some(r) = rest.strip_prefix('}') {
            rest = r;
            if depth == 0 {
                return out;
            }
            depth -= 1;
            Token::Close
        } else if let Some(r) = rest.strip_prefix(',') {
            rest = r;
            Token::Comma
        } else if let Some(r) = rest.strip_prefix('*') {
            rest = r;
            Token::Glob
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            if end == 0 {
                Token::Other
            } else {
                let name = rest[..end].to_string();
                rest = &rest[end..];
                Token::Name(name)
            }
        };
        // Outside a group a path ends at anything that is not `::name` or `::{`, and a
        // group opens only after `::` (`crate::x::Y { .. }` is a path and a block; the
        // text starts just after one).
        let ends = token == Token::Other
            || (depth == 0 && matches!(token, Token::Comma | Token::Close))
            || (token == Token::Open && out.last().is_some_and(|t| *t != Token::Path));
        if ends {
            return out;
        }
        out.push(token);
        if depth == 0 && matches!(out.last(), Some(Token::Glob)) {
            return out;
        }
    }
}

/// Expands one use tree (`a::b`, `a::{b, c::{d, self}}`, `a as x`, `a::*`) at `at` into
/// full paths under `prefix`; returns where it ended.
fn expand(tokens: &[Token], mut at: usize, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix.to_vec();
    loop {
        match tokens.get(at) {
            Some(Token::Name(name)) => {
                if name != "self" {
                    path.push(name.clone());
                }
                at += 1;
            }
            Some(Token::Open) => {
                at += 1;
                loop {
                    match tokens.get(at) {
                        Some(Token::Close) => {
                            at += 1;
                            return at;
                        }
                        Some(Token::Comma) => at += 1,
                        None => return at,
                        Some(_) => at = expand(tokens, at, &path, out),
                    }
                }
            }
            Some(Token::Glob) => {
                at += 1;
                break;
            }
            _ => break,
        }
        match tokens.get(at) {
            Some(Token::Path) => at += 1,
            // `as name` renames the path just read.
            Some(Token::Name(name)) if name == "as" => {
                at += 2;
                break;
            }
            _ => break,
        }
    }
    out.push(path);
    at
}

/// Every path in `code` that starts at `crate::` or `super::`, as module segments from
/// the crate root (`super` resolved against `module`).
fn paths(module: &str, code: &str) -> Vec<Vec<String>> {
    let own: Vec<String> = module
        .split("::")
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    let mut found = Vec::new();
    for (at, _) in code
        .match_indices("crate::")
        .chain(code.match_indices("super::"))
    {
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let mut rest = &code[at..];
        let mut base = Vec::new();
        if let Some(r) = rest.strip_prefix("crate::") {
            rest = r;
        } else {
            base = own.clone();
            while let Some(r) = rest.strip_prefix("super::") {
                base.pop();
                rest = r.trim_start();
            }
        }
        expand(&tokens(rest), 0, &base, &mut found);
    }
    found
}

/// The module graph of `modules` (module → code): an edge from each room to each other
/// room it names, and from each file to each other file of its room it names (parents
/// do not count: a file may use what its `mod.rs` gathers).
fn graph(modules: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, code) in modules {
        let Some(room) = module.split("::").next().filter(|r| !r.is_empty()) else {
            continue; // lib.rs / main.rs: the crate root wires the rooms together.
        };
        for path in paths(module, code) {
            // The longest prefix of the path that is a module.
            let Some(target) = (1..=path.len())
                .rev()
                .map(|n| path[..n].join("::"))
                .find(|m| modules.contains_key(m))
            else {
                continue;
            };
            let target_room = target.split("::").next().unwrap_or("").to_string();
            if target_room != room {
                edges
                    .entry(room.to_string())
                    .or_default()
                    .insert(target_room);
            } else if target != *module && !module.starts_with(&format!("{target}::")) {
                edges.entry(module.clone()).or_default().insert(target);
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

fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    edges
        .keys()
        .filter_map(|m| cycle_through(edges, m))
        .map(|c| c.join(" -> "))
        .collect()
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let edges = graph(&modules());
    assert!(
        edges.get("template").is_some_and(|e| e.contains("node")),
        "the scan sees the imports: {edges:?}"
    );
    let found = cycles(&edges);
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

/// Synthetic sources: module name → code.
fn sources_of(files: &[(&str, &str)]) -> BTreeMap<String, String> {
    files
        .iter()
        .map(|(m, code)| (m.to_string(), without_comments(code)))
        .collect()
}

#[test]
fn a_cycle_through_a_grouped_import_is_caught() {
    let modules = sources_of(&[
        ("node", "mod ipc;"),
        (
            "node::ipc",
            "use crate::{metrics, template::{self, Engine as E}};",
        ),
        ("template", "pub use crate::node::NodeClient;"),
        ("metrics", ""),
    ]);
    let edges = graph(&modules);
    assert_eq!(
        edges["node"],
        BTreeSet::from(["metrics".into(), "template".into()])
    );
    assert_eq!(
        cycles(&edges),
        ["node -> template -> node", "template -> node -> template"]
    );
}

#[test]
fn every_form_of_path_is_read() {
    let modules = sources_of(&[
        ("a", ""),
        (
            "a::one",
            "use super::{two, three::Thing};\nfn f() { super::four::run(); }",
        ),
        ("a::two", "pub(crate) use super::super::b::{c::{self, D}};"),
        (
            "a::three",
            "fn g() -> crate::c::X { crate::a::four::make() }",
        ),
        ("a::four", "use super::*; // crate::d is only a comment\n"),
        ("b", ""),
        ("b::c", ""),
        ("c", ""),
        ("d", ""),
        ("e", "use crate::{\n    a::{\n        one,\n    },\n};"),
    ]);
    let edges = graph(&modules);
    let of = |m: &str| edges.get(m).cloned().unwrap_or_default();
    let set = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(of("a::one"), set(&["a::two", "a::three", "a::four"]));
    assert_eq!(of("a::three"), set(&["a::four"]));
    assert_eq!(
        of("a"),
        set(&["b", "c"]),
        "rooms: super::super and inline crate::"
    );
    assert_eq!(of("a::four"), set(&[]), "a glob of the parent, a comment");
    assert_eq!(of("e"), set(&["a"]), "groups over several lines");
}

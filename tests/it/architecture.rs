//! The direction of dependencies inside `src/`, read from the source: which top-level module
//! (`app.rs`, `mail.rs`, `rest/`, ...) names which through `crate::`. The modules form no
//! circle; the transports (`rest/`, `grpc/`) do not import each other; and only the
//! composition layers (`app`, the transports, `server`, `admin`, `lib.rs`) know `App`: the
//! workers and helpers take the ports they need.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Modules that may name `app` (the composition root and what sits on top of it).
const MAY_USE_APP: [&str; 5] = ["admin", "grpc", "rest", "server", "lib"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file below `dir`.
fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to: `src/rest/oauth.rs` → `rest`, `src/app.rs` → `app`.
fn module_of(path: &Path) -> String {
    let rel = path.strip_prefix(src()).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// The top-level modules a source text names through `crate::`, including every branch of
/// `use crate::{a::x, b::{y, z}}`. Comment lines are skipped.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut refs = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The names at depth 1 of the braced group.
            let (mut depth, mut name, mut expect_name) = (1, String::new(), true);
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 1 => expect_name = true,
                    c if depth == 1 && expect_name && (c.is_alphanumeric() || c == '_') => {
                        name.push(c)
                    }
                    _ if depth == 1 && expect_name && !name.is_empty() => {
                        refs.insert(std::mem::take(&mut name));
                        expect_name = false;
                    }
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
            }
            if !name.is_empty() {
                refs.insert(name);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            refs.insert(name);
        }
    }
    refs
}

/// module → the other top-level modules it names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut all = Vec::new();
    files(&src(), &mut all);
    let modules: BTreeSet<String> = all.iter().map(|p| module_of(p)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in &all {
        let from = module_of(path);
        if from == "main" {
            continue;
        }
        let text = std::fs::read_to_string(path).unwrap();
        let entry = graph.entry(from.clone()).or_default();
        for to in crate_refs(&text) {
            if to != from && modules.contains(&to) {
                entry.insert(to);
            }
        }
    }
    graph
}

/// A circle through `start`, if there is one.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        graph: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        at: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in graph.get(at).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, start, next, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_owned()];
    walk(graph, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn the_reader_finds_every_branch_of_a_use_group() {
    let refs = crate_refs(
        "use crate::{\n    app::App,\n    view::{EventView, x::Y},\n    wire,\n};\n\
         // crate::ignored\nlet x = crate::mail::run();",
    );
    let want: BTreeSet<String> = ["app", "view", "wire", "mail"].map(String::from).into();
    assert_eq!(refs, want);
}

#[test]
fn src_modules_form_no_circle() {
    let graph = graph();
    assert!(graph.len() > 10, "the reader found the modules: {graph:?}");
    for module in graph.keys() {
        if let Some(c) = circle(&graph, module) {
            panic!("an import circle: {}", c.join(" -> "));
        }
    }
}

#[test]
fn transports_do_not_import_each_other_and_only_composition_knows_app() {
    let graph = graph();
    assert!(!graph["rest"].contains("grpc"), "rest imports grpc");
    assert!(!graph["grpc"].contains("rest"), "grpc imports rest");
    for (module, uses) in &graph {
        if uses.contains("app") {
            assert!(
                MAY_USE_APP.contains(&module.as_str()),
                "`{module}` uses `App`; give it the ports it needs instead"
            );
        }
    }
}

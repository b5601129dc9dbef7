//! init/src has no import circle: the modules form layers, the boot on top, the toolbox below
//! (lib.rs documents the order). A module's imports are read from its source (`crate::name`
//! anywhere in it, `#[cfg(test)]` code included), so a new circle fails here, naming it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module name -> the modules of this crate it names.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut modules = BTreeMap::new();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&src).expect("init/src") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        } else if path.is_dir() {
            // A directory module (sys/): all its files belong to it.
            for f in std::fs::read_dir(&path).expect("dir") {
                files.push(f.expect("entry").path());
            }
        }
    }
    for path in files {
        let rel = path.strip_prefix(&src).expect("under src");
        let module = rel
            .iter()
            .next()
            .and_then(|c| c.to_str())
            .expect("utf-8")
            .trim_end_matches(".rs")
            .to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        // Comments (doc links to the layer above are fine) do not import anything.
        let text: String = std::fs::read_to_string(&path)
            .expect("read")
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let named = modules.entry(module.clone()).or_insert_with(BTreeSet::new);
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `crate::{a, b}` lists several.
            let names: Vec<String> = if rest.starts_with('{') {
                let inner = &rest[1..rest.find('}').expect("closing brace")];
                inner
                    .split(',')
                    .map(|p| p.trim().split("::").next().unwrap_or("").trim().to_owned())
                    .collect()
            } else {
                vec![name]
            };
            for n in names {
                if !n.is_empty() && n != module && n != "VERSION" && n != "self" {
                    named.insert(n);
                }
            }
        }
    }
    modules
}

/// A cycle through `from`, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == node) {
            let mut c = path[i..].to_vec();
            c.push(node.to_owned());
            return Some(c);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in g.get(node).into_iter().flatten() {
            if let Some(c) = visit(g, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|k| visit(graph, k, &mut Vec::new(), &mut done))
}

#[test]
fn init_modules_have_no_import_circle() {
    let graph = imports();
    assert!(
        graph.contains_key("boot") && graph.contains_key("sys"),
        "{graph:?}"
    );
    if let Some(c) = cycle(&graph) {
        panic!("import circle in init/src: {}", c.join(" -> "));
    }
    // The boot is on top: nothing imports it.
    for (m, named) in &graph {
        assert!(
            !named.contains("boot"),
            "{m} imports boot: the boot must stay on top"
        );
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let mut g = BTreeMap::new();
    g.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    g.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    g.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(cycle(&g).expect("a cycle"), ["a", "b", "c", "a"]);
    g.insert("c".to_owned(), BTreeSet::new());
    assert_eq!(cycle(&g), None);
}

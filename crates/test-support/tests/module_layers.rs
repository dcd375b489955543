//! The workspace's import rules, checked over the source: in every crate, no
//! circle between modules (at any depth), and at a crate's top level no import
//! from a lower layer up. The layers are declared here and drawn in
//! ARCHITECTURE.md ("Layers"); a new top-level module must be placed in one.
//!
//! An edge runs from module A to module B when code in A (or below it) names a
//! path into B (`use crate::b::…`, `super::b`, `crate::b::f()`, …). Edges are
//! compared between siblings: `crate::grpc::handlers` → `crate::limits` is the
//! edge `grpc` → `limits` at the crate's top level.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// Top-level modules of each crate, lowest layer first. A module may use the
/// modules of its own layer and of the layers below (never above); circles are
/// refused everywhere.
const LAYERS: &[(&str, &[&[&str]])] = &[
    (
        "domain",
        &[
            &["ids", "clock", "audit", "reconcile"],
            &["error", "license", "tryout"],
            &["initcode", "activation"],
            &["seats", "signed_tryout", "leases"],
            &["capacity", "decision", "history"],
            &["repair"],
        ],
    ),
    ("proto", &[&["seat_state"]]),
    // The client's copy and cache file, below what follows the stream, below
    // the agent that answers from a client.
    (
        "client",
        &[&["copy", "cache"], &["follow"], &["leases"], &["agent"]],
    ),
    ("sim", &[&["state"], &["server"], &["cli"]]),
    (
        "service",
        &[
            // The contract's table, who is calling, logging to the journal.
            &["rpc", "caller", "journal", "systemd"],
            // The one error table, counters, logs and traces.
            &["status", "metrics", "telemetry"],
            // Outside the process: the store, the licensing server; events.
            &["store", "upstream", "events"],
            // A replica: its copy of the store, callers, limits, the audit trail.
            &["mirror", "auth", "limits", "audit"],
            &["service", "state_file"],
            // Adapters: gRPC, the server, the metrics port, reloads.
            &["grpc"],
            &["server", "exporter", "reload"],
            // Wiring: configuration (options owned by the modules), the command line.
            &["config", "app", "cli"],
        ],
    ),
];

struct Crate {
    name: &'static str,
    /// Module path (segments below the crate root) → the references its own code
    /// makes, as absolute module paths (not yet trimmed to known modules).
    refs: BTreeMap<Vec<String>, Vec<Vec<String>>>,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The module path of a source file below `src` (`a/b.rs`, `a/b/mod.rs` → a::b).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
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

/// Collects every path a file names, resolved against the module it is in.
struct Refs<'a> {
    module: Vec<String>,
    /// The child modules each module declares (for 2018 relative `use child::…`).
    children: &'a BTreeMap<Vec<String>, BTreeSet<String>>,
    found: Vec<(Vec<String>, Vec<String>)>,
}

impl Refs<'_> {
    fn resolve(&self, segments: &[String]) -> Option<Vec<String>> {
        let mut base = self.module.clone();
        let mut rest = segments;
        match rest.first().map(String::as_str) {
            Some("crate") => {
                base.clear();
                rest = &rest[1..];
            }
            Some("self") => rest = &rest[1..],
            Some("super") => {
                while rest.first().map(String::as_str) == Some("super") {
                    base.pop()?;
                    rest = &rest[1..];
                }
            }
            Some(first)
                if self
                    .children
                    .get(&self.module)
                    .is_some_and(|c| c.contains(first)) => {}
            _ => return None,
        }
        base.extend(rest.iter().cloned());
        Some(base)
    }

    fn record(&mut self, segments: Vec<String>) {
        if let Some(target) = self.resolve(&segments) {
            self.found.push((self.module.clone(), target));
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let mut path = prefix.clone();
                if n.ident != "self" {
                    path.push(n.ident.to_string());
                }
                self.record(path);
            }
            syn::UseTree::Rename(r) => {
                let mut path = prefix.clone();
                path.push(r.ident.to_string());
                self.record(path);
            }
            syn::UseTree::Glob(_) => self.record(prefix.clone()),
            syn::UseTree::Group(g) => {
                for item in &g.items {
                    self.use_tree(prefix, item);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for Refs<'_> {
    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        self.module.push(item.ident.to_string());
        syn::visit::visit_item_mod(self, item);
        self.module.pop();
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &item.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        if segments.len() > 1 {
            self.record(segments);
        }
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        // Paths inside macro calls (`format!`, `tracing::info!`, …) as plain tokens.
        let text = mac.tokens.to_string().replace(' ', "");
        for start in ["crate::", "super::"] {
            for (i, _) in text.match_indices(start) {
                let path: String = text[i..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let segments: Vec<String> = path
                    .split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                self.record(segments);
            }
        }
        syn::visit::visit_macro(self, mac);
    }
}

fn load(name: &'static str) -> Crate {
    let src = workspace().join("crates").join(name).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    // A binary's root is a crate of its own (it names the library by its name).
    let bins = src.join("bin");
    files.retain(|f| f.file_name().is_none_or(|n| n != "main.rs") && !f.starts_with(&bins));
    let parsed: Vec<(Vec<String>, syn::File)> = files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            let file = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            (module_of(&src, f), file)
        })
        .collect();
    let mut children: BTreeMap<Vec<String>, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in &parsed {
        declared(module, &file.items, &mut children);
    }
    let mut refs: BTreeMap<Vec<String>, Vec<Vec<String>>> = BTreeMap::new();
    for (module, file) in &parsed {
        let mut visitor = Refs {
            module: module.clone(),
            children: &children,
            found: Vec::new(),
        };
        visitor.visit_file(file);
        for (from, to) in visitor.found {
            refs.entry(from).or_default().push(to);
        }
    }
    // Trim every target to the deepest module that exists.
    let known: BTreeSet<Vec<String>> = children
        .iter()
        .flat_map(|(m, cs)| {
            cs.iter().map(move |c| {
                let mut p = m.clone();
                p.push(c.clone());
                p
            })
        })
        .collect();
    for targets in refs.values_mut() {
        for target in targets.iter_mut() {
            while !target.is_empty() && !known.contains(target) {
                target.pop();
            }
        }
    }
    Crate { name, refs }
}

fn declared(
    module: &[String],
    items: &[syn::Item],
    children: &mut BTreeMap<Vec<String>, BTreeSet<String>>,
) {
    for item in items {
        if let syn::Item::Mod(m) = item {
            children
                .entry(module.to_vec())
                .or_default()
                .insert(m.ident.to_string());
            if let Some((_, inner)) = &m.content {
                let mut path = module.to_vec();
                path.push(m.ident.to_string());
                declared(&path, inner, children);
            }
        }
    }
}

/// Sibling edges: parent module → (child → children it names).
type Edges = BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>>;

fn sibling_edges(krate: &Crate) -> Edges {
    let mut edges = Edges::new();
    for (from, targets) in &krate.refs {
        for to in targets {
            let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
            // A module naming its own ancestor or descendant is not a sibling edge.
            if common == from.len() || common == to.len() {
                continue;
            }
            edges
                .entry(from[..common].to_vec())
                .or_default()
                .entry(from[common].clone())
                .or_default()
                .insert(to[common].clone());
        }
    }
    edges
}

/// The circles (strongly connected sets of more than one module) of a graph.
fn circles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Kosaraju: order by finish time, then collect on the reversed graph.
    fn finish(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(n.to_owned()) {
            return;
        }
        for m in g.get(n).into_iter().flatten() {
            finish(m, g, seen, order);
        }
        order.push(n.to_owned());
    }
    let nodes: BTreeSet<String> = graph
        .iter()
        .flat_map(|(n, ms)| std::iter::once(n.clone()).chain(ms.iter().cloned()))
        .collect();
    let mut reversed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (n, ms) in graph {
        for m in ms {
            reversed.entry(m.clone()).or_default().insert(n.clone());
        }
    }
    let (mut seen, mut order) = (BTreeSet::new(), Vec::new());
    for n in &nodes {
        finish(n, graph, &mut seen, &mut order);
    }
    let mut assigned = BTreeSet::new();
    let mut out = Vec::new();
    for n in order.iter().rev() {
        if assigned.contains(n) {
            continue;
        }
        let mut component = Vec::new();
        finish(n, &reversed, &mut assigned, &mut component);
        // `finish` on the reversed graph also walks nodes of earlier components,
        // which `assigned` already holds; what is new is this component.
        if component.len() > 1 {
            component.sort();
            out.push(component);
        }
    }
    out
}

#[test]
fn no_module_circles_in_any_crate() {
    let mut problems = Vec::new();
    for (name, _) in LAYERS {
        let krate = load(name);
        for (parent, graph) in sibling_edges(&krate) {
            for circle in circles(&graph) {
                let at = if parent.is_empty() {
                    "the crate root".to_owned()
                } else {
                    parent.join("::")
                };
                let detail: Vec<String> = circle
                    .iter()
                    .map(|m| {
                        let uses: Vec<&String> =
                            graph[m].iter().filter(|t| circle.contains(t)).collect();
                        format!("{m} → {uses:?}")
                    })
                    .collect();
                problems.push(format!(
                    "{}: circle below {at}: {}",
                    krate.name,
                    detail.join(", ")
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "import circles:\n{}",
        problems.join("\n")
    );
}

#[test]
fn top_level_modules_import_only_their_layer_and_below() {
    let mut problems = Vec::new();
    for (name, layers) in LAYERS {
        let krate = load(name);
        let layer_of = |m: &str| layers.iter().position(|l| l.contains(&m));
        let edges = sibling_edges(&krate);
        let top = edges.get(&Vec::new()).cloned().unwrap_or_default();
        let declared: BTreeSet<String> = krate
            .refs
            .keys()
            .filter_map(|m| m.first().cloned())
            .collect();
        for m in &declared {
            if m != "tests" && layer_of(m).is_none() {
                problems.push(format!("{name}: module `{m}` is in no layer of this test"));
            }
        }
        for (from, targets) in &top {
            for to in targets {
                if let (Some(a), Some(b)) = (layer_of(from), layer_of(to))
                    && b > a
                {
                    problems.push(format!(
                        "{name}: `{from}` (layer {a}) imports `{to}` (layer {b}), a higher layer"
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "imports against the layers:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_checker_finds_a_circle() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", &["b"][..]),
        ("b", &["c"][..]),
        ("c", &["a"][..]),
        ("d", &["a"][..]),
    ]
    .into_iter()
    .map(|(n, ms)| (n.to_owned(), ms.iter().map(|m| (*m).to_owned()).collect()))
    .collect();
    assert_eq!(
        circles(&graph),
        vec![vec!["a".to_owned(), "b".into(), "c".into()]]
    );
}

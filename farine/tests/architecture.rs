//! The layers of `farine/src` point one way: each top-level module names only the modules its
//! row of the table in `docs/architecture.md` lists, and the table has no cycle. No broker.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace is farine's parent")
        .to_path_buf()
}

/// The table of `docs/architecture.md`: module -> the modules it may use.
fn allowed() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(repository().join("docs/architecture.md"))
        .expect("docs/architecture.md is readable");
    let mut table = BTreeMap::new();
    let rows = text
        .lines()
        .skip_while(|line| !line.starts_with("| module | may use |"))
        .skip(2)
        .take_while(|line| line.starts_with('|'));
    for row in rows {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let [module, uses] = cells[..] else {
            panic!("a row of two cells: {row}");
        };
        let uses = uses
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::to_string)
            .collect();
        table.insert(module.to_string(), uses);
    }
    assert!(
        !table.is_empty(),
        "the table is found in docs/architecture.md"
    );
    table
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("a source directory") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            sources(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// The code of a file less its unit tests (`#[cfg(test)] mod tests { ... }` at the end), which
/// may reach anywhere.
fn without_unit_tests(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    }
}

/// The top-level modules of `farine/src` each module names through `crate::`.
fn used() -> BTreeMap<String, BTreeSet<String>> {
    let src = repository().join("farine/src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut uses: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src");
        let module = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .expect("a file name")
            .trim_end_matches(".rs")
            .to_string();
        if module == "lib" {
            continue; // the crate root declares and re-exports everything
        }
        let text = std::fs::read_to_string(&file).expect("a readable source");
        let code = without_unit_tests(&text);
        let mut named: BTreeSet<String> = BTreeSet::new();
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            // `crate::{a, b::C}` names each module of the group; `crate::Name` a re-export of
            // the crate root, which hides its module: it is named `crate::<root>` here so that
            // the check fails and asks for the module's path.
            let names: Vec<String> = match rest.strip_prefix('{') {
                Some(group) => group[..group.find('}').unwrap_or(group.len())]
                    .split(',')
                    .map(|item| item.trim().split("::").next().unwrap_or("").to_string())
                    .collect(),
                None if rest.starts_with(|c: char| c.is_ascii_uppercase()) => {
                    vec!["<root>".to_string()]
                }
                None => vec![
                    rest.chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect(),
                ],
            };
            named.extend(
                names
                    .into_iter()
                    .filter(|name| !name.is_empty() && *name != module),
            );
        }
        uses.entry(module).or_default().extend(named);
    }
    uses
}

#[test]
fn each_module_uses_only_the_layers_below_it() {
    let allowed = allowed();
    let mut wrong = Vec::new();
    for (module, names) in used() {
        let Some(may) = allowed.get(&module) else {
            wrong.push(format!(
                "module `{module}` has no row in docs/architecture.md"
            ));
            continue;
        };
        for name in names.difference(may) {
            wrong.push(format!(
                "`{module}` uses `crate::{name}`, which its row does not list"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_layers_have_no_cycle() {
    let allowed = allowed();
    // Depth-first search; a module met again while on the path closes a cycle.
    fn visit<'a>(
        module: &'a str,
        table: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if done.contains(module) {
            return;
        }
        if let Some(at) = path.iter().position(|m| *m == module) {
            panic!("a cycle: {} -> {module}", path[at..].join(" -> "));
        }
        path.push(module);
        for next in table.get(module).into_iter().flatten() {
            visit(next, table, path, done);
        }
        path.pop();
        done.insert(module);
    }
    let mut done = BTreeSet::new();
    for module in allowed.keys() {
        visit(module, &allowed, &mut Vec::new(), &mut done);
    }
}

#[test]
fn the_handler_core_and_the_runtime_name_no_transport_type() {
    let mut files = Vec::new();
    sources(&repository().join("farine/src/handler"), &mut files);
    sources(&repository().join("farine/src/runtime"), &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).expect("a readable source");
        let code: String = text
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            !code.contains("lapin"),
            "{} names lapin: the core and the runtime must run over any transport",
            file.display()
        );
    }
}

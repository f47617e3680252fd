//! The README's layout table and the tree agree: every path it names exists, every room of
//! `src/` (a folder, two levels deep) has a row or is named in its parent's row, and every file
//! of the two largest rooms (`src/boot/`, `src/agent/`) is named, so that a newcomer who reads
//! the table finds each part of the code.

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The rows of the README's "Layout" table: (path cell, names in backticks in the second cell).
fn rows() -> Vec<(String, Vec<String>)> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let section = readme
        .split("\n## Layout\n")
        .nth(1)
        .expect("README.md has a Layout section");
    let section = section.split("\n## ").next().unwrap_or_default();
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|line| {
            let mut cells = line.split('|').skip(1);
            let path = cells.next().unwrap_or_default().trim().replace('`', "");
            let names = cells
                .next()
                .unwrap_or_default()
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect();
            (path, names)
        })
        .collect()
}

/// Holds code besides tests (a folder of only `tests.rs` or `tests/` belongs to its file).
fn holds_code(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().flatten().any(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name.ends_with(".rs") && name != "tests.rs"
    })
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    all.sort();
    all
}

#[test]
fn every_path_the_layout_names_exists() {
    let rows = rows();
    assert!(rows.len() > 10, "the layout table has rows: {rows:?}");
    for (path, _) in rows {
        let path = path.trim_end_matches("*.rs");
        assert!(
            root().join(path).exists(),
            "README's layout names {path}, which does not exist"
        );
    }
}

#[test]
fn every_room_of_src_is_in_the_layout() {
    let rows = rows();
    let row_for = |rel: &str| rows.iter().find(|(p, _)| p == rel);
    let mentioned_in = |parent: &str, name: &str| {
        rows.iter()
            .filter(|(p, _)| p.starts_with(parent))
            .any(|(_, names)| names.iter().any(|n| n == name))
    };
    let mut missing = Vec::new();
    for room in entries(&root().join("src"))
        .into_iter()
        .filter(|p| p.is_dir())
    {
        let room_rel = format!("src/{}/", room.file_name().unwrap().to_string_lossy());
        if row_for(&room_rel).is_none() {
            missing.push(room_rel.clone());
        }
        for entry in entries(&room) {
            let name = entry.file_name().unwrap().to_string_lossy().into_owned();
            let rel = format!("{room_rel}{name}");
            let named = if entry.is_dir() {
                !holds_code(&entry)
                    || row_for(&format!("{rel}/")).is_some()
                    || mentioned_in(&room_rel, &format!("{name}/"))
            } else {
                // The rows of the smaller rooms describe their files together.
                !matches!(room_rel.as_str(), "src/boot/" | "src/agent/")
                    || matches!(name.as_str(), "mod.rs" | "tests.rs")
                    || mentioned_in(&room_rel, &name)
            };
            if !named {
                missing.push(rel);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "README's layout table does not name: {missing:?}"
    );
}

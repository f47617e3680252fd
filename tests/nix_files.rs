//! Every Nix file of the project parses (`nix-instantiate --parse`). nixpkgs cannot be fetched on
//! the development machines, so this is as far as Nix is checked here; the VM test in
//! `tests/nixos/vm-test.nix` runs where nixpkgs and KVM are.

use std::path::{Path, PathBuf};
use std::process::Command;

use harness::netns;

fn nix_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                nix_files(&path, out);
            }
        } else if name.ends_with(".nix") {
            out.push(path);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    if !netns::can_run("every_nix_file_parses", &["nix-instantiate"]) {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    nix_files(root, &mut files);
    let names: Vec<String> = files
        .iter()
        .map(|f| f.strip_prefix(root).unwrap().display().to_string())
        .collect();
    for expected in [
        "flake.nix",
        "nixos-module/default.nix",
        "nixos-module/flake-module.nix",
        "image/default.nix",
        "image/disk.nix",
        "tests/nixos/vm-test.nix",
        "tests/nixos/eval.nix",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} is missing: {names:?}"
        );
    }
    for file in &files {
        let out = Command::new("nix-instantiate")
            .arg("--parse")
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} does not parse:\n{}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_broken_nix_file_is_caught() {
    if !netns::can_run("a_broken_nix_file_is_caught", &["nix-instantiate"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.nix");
    std::fs::write(&bad, "{ a = 1; ").unwrap();
    let out = Command::new("nix-instantiate")
        .arg("--parse")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
}

//! A Nix store of a test's own: `<root>/nix` holds a real store (database, profiles) whose paths
//! are `/nix/store/...`; a container mounts it at `/nix`. The host's /nix is not touched.

use std::path::Path;
use std::process::Command;

/// `nix-store --add DIR` into the store under `root` (`local?root=ROOT`); returns the store path
/// (`/nix/store/<hash>-<basename of DIR>`).
pub fn store_add(root: &Path, dir: &Path) -> String {
    let out = Command::new("nix-store")
        .arg("--store")
        .arg(format!("local?root={}", root.display()))
        .arg("--add")
        .arg(dir)
        .output()
        .expect("run nix-store");
    assert!(
        out.status.success(),
        "nix-store --add {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `nix-env -p PROFILE --set PATH` in the store under `root`: a real new generation.
pub fn profile_set(root: &Path, profile: &Path, path: &str) {
    if let Some(dir) = profile.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let out = Command::new("nix-env")
        .arg("--store")
        .arg(format!("local?root={}", root.display()))
        .arg("-p")
        .arg(profile)
        .args(["--set", path])
        .output()
        .expect("run nix-env");
    assert!(
        out.status.success(),
        "nix-env --set {path} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

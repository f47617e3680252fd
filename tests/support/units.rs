//! The project's systemd unit files, made ready to run here as the NixOS module makes them: the
//! `@...@` placeholders replaced by this machine's paths and the binary under test.

#![allow(dead_code)] // each includer uses a different part of it

use std::path::{Path, PathBuf};

/// Where the unit files live in the repository.
pub fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("nixos-module/units")
}

/// The nftables rules the firewall unit loads.
pub fn firewall_rules() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("nixos-module/metadata-firewall.nft")
}

/// The replacements the NixOS module makes at build time, with this machine's values.
/// `package` is a directory made by [`package_dir`], as the Nix package has it.
pub fn substitutions(package: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("@hcloudNixos@", package.display().to_string()),
        ("@kill@", "/bin/kill".to_string()),
        (
            "@path@",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        ),
        ("@nft@", "/usr/sbin/nft".to_string()),
        (
            "@rules@",
            package.join(RULES_IN_PACKAGE).display().to_string(),
        ),
    ]
}

/// Where the package made by [`package_dir`] keeps the firewall rules.
pub const RULES_IN_PACKAGE: &str = "share/hcloud-nixos/metadata-firewall.nft";

/// A package directory, as the Nix package is a store path of its own: `<dir>/package` with the
/// binary under test at `bin/hcloud-nixos` and the firewall rules at [`RULES_IN_PACKAGE`]. Real
/// files (a hard link where the file system allows, else a copy), never links into the checkout:
/// a container that gets `<dir>` sees the package whether or not it sees the checkout.
pub fn package_dir(dir: &Path) -> PathBuf {
    let package = dir.join("package");
    for (from, to) in [
        (
            PathBuf::from(env!("CARGO_BIN_EXE_hcloud-nixos")),
            package.join("bin/hcloud-nixos"),
        ),
        (firewall_rules(), package.join(RULES_IN_PACKAGE)),
    ] {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(&to);
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to)
                .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
        }
    }
    package
}

/// Writes every unit file, substituted, into `dest`; returns their paths.
pub fn render_into(dest: &Path, package: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(dest).unwrap();
    let subs = substitutions(package);
    let mut written = Vec::new();
    for entry in std::fs::read_dir(source_dir()).unwrap() {
        let path = entry.unwrap().path();
        let mut text = std::fs::read_to_string(&path).unwrap();
        for (from, to) in &subs {
            text = text.replace(from, to);
        }
        let target = dest.join(path.file_name().unwrap());
        std::fs::write(&target, text).unwrap();
        written.push(target);
    }
    written.sort();
    written
}

//! The project's systemd unit files, made ready to run here as the NixOS module makes them: the
//! `@...@` placeholders replaced by this machine's paths and the binary under test.

use std::path::{Path, PathBuf};

/// Where the unit files live in the repository.
pub fn source_dir() -> PathBuf {
    crate::repo().join("nixos-module/units")
}

/// The nftables rules the firewall unit loads.
pub fn firewall_rules() -> PathBuf {
    crate::repo().join("nixos-module/metadata-firewall.nft")
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
/// binaries under test at `bin/hcloud-nixos` and `bin/hcloud-nixos-network` and the firewall
/// rules at [`RULES_IN_PACKAGE`]. Real files (a hard link where the file system allows, else a
/// copy), never links into the checkout: a container that gets `<dir>` sees the package whether
/// or not it sees the checkout.
pub fn package_dir(dir: &Path) -> PathBuf {
    let package = dir.join("package");
    for (from, to) in [
        (crate::binary(), package.join("bin/hcloud-nixos")),
        (
            crate::network_binary(),
            package.join("bin/hcloud-nixos-network"),
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

/// What the NixOS module puts into a system (a toplevel store path) besides the binary: the
/// agent's unit, linked into `etc/systemd/system` (the repository's file) and wanted by
/// `multi-user.target`, and the agent's
/// configuration `agent_toml` in `etc/hcloud-nixos/agent.toml`. The agent refuses a release
/// without these.
pub fn install_module_into(system: &Path, agent_toml: &str) {
    let units = system.join("etc/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::copy(
        source_dir().join("hcloud-nixos-agent.service"),
        units.join("hcloud-nixos-agent.service"),
    )
    .unwrap();
    // wantedBy = [ "multi-user.target" ], as NixOS links it.
    let wants = units.join("multi-user.target.wants");
    std::fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink(
        "../hcloud-nixos-agent.service",
        wants.join("hcloud-nixos-agent.service"),
    )
    .unwrap();
    std::fs::create_dir_all(system.join("etc/hcloud-nixos")).unwrap();
    std::fs::write(system.join("etc/hcloud-nixos/agent.toml"), agent_toml).unwrap();
}

/// The `[paths]` table naming the agent's programs by absolute path, as the NixOS module renders
/// it; `nix_bin` holds `nix` and `nix-env`.
pub fn programs_toml(fh: &Path, nix_bin: &Path, determinate_nixd: Option<&Path>) -> String {
    let mut text = format!(
        "[paths]\nfh = \"{}\"\nnix = \"{}\"\nnix_env = \"{}\"\n",
        fh.display(),
        nix_bin.join("nix").display(),
        nix_bin.join("nix-env").display()
    );
    if let Some(d) = determinate_nixd {
        text.push_str(&format!("determinate_nixd = \"{}\"\n", d.display()));
    }
    text
}

/// The packages of NixOS's default service `PATH` (nixpkgs, `nixos/lib/systemd-lib.nix`: every
/// service gets coreutils, findutils, gnugrep, gnused and systemd, after its own `path`), with
/// the Debian packages that hold the same programs here.
const NIXOS_DEFAULT_PATH: &[(&str, &str)] = &[
    ("coreutils", "coreutils"),
    ("findutils", "findutils"),
    ("gnugrep", "grep"),
    ("gnused", "sed"),
    ("systemd", "systemd"),
];

/// NixOS's default service `PATH`, modelled with this machine's programs: under `dir`, one
/// "package" per entry of [`NIXOS_DEFAULT_PATH`] whose `bin` holds links to the programs of the
/// Debian package of the same tools, and nothing else (no nix, no fh, no curl). Returns the `PATH`
/// value NixOS writes: each package's `bin`, then each package's `sbin`.
pub fn nixos_default_path(dir: &Path) -> String {
    let mut bins = Vec::new();
    let mut sbins = Vec::new();
    for (nix_name, debian) in NIXOS_DEFAULT_PATH {
        let package = dir.join(format!("nixos-default-path/{nix_name}"));
        let bin = package.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let listing = std::process::Command::new("dpkg")
            .args(["-L", debian])
            .output()
            .expect("dpkg -L");
        assert!(listing.status.success(), "dpkg -L {debian}");
        for file in String::from_utf8_lossy(&listing.stdout).lines() {
            let path = Path::new(file);
            let in_bin_dir = path.parent().is_some_and(|d| {
                ["/bin", "/usr/bin", "/sbin", "/usr/sbin"]
                    .iter()
                    .any(|b| d == Path::new(b))
            });
            let executable = std::fs::metadata(path).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            });
            if in_bin_dir && executable {
                let link = bin.join(path.file_name().unwrap());
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(path, &link).unwrap();
            }
        }
        bins.push(bin.display().to_string());
        sbins.push(package.join("sbin").display().to_string());
    }
    bins.extend(sbins);
    bins.join(":")
}

/// The drop-in NixOS writes for a unit that comes from `systemd.packages` when the module also
/// sets `systemd.services.<name>` (`wantedBy`, `reloadTriggers`): `overrides.conf`, whose
/// `Environment=PATH=` replaces the unit file's own. `reload_triggers` as NixOS renders them.
pub fn nixos_overrides_conf(path: &str, reload_triggers: &[&str]) -> String {
    let mut text = String::from("[Unit]\n");
    for trigger in reload_triggers {
        text.push_str(&format!("X-Reload-Triggers={trigger}\n"));
    }
    text.push_str(&format!(
        "\n[Service]\nEnvironment=\"LOCALE_ARCHIVE=/run/current-system/sw/lib/locale/locale-archive\"\nEnvironment=\"PATH={path}\"\nEnvironment=\"TZDIR=/etc/zoneinfo\"\n"
    ));
    text
}

/// The agent's unit.
pub const AGENT: &str = "hcloud-nixos-agent.service";
/// The boot-time network unit.
pub const NETWORK: &str = "hcloud-nixos-network.service";

/// `<root>/etc-systemd-system`, to bind read-only at a container's `/etc/systemd/system`: the
/// rendered units, the module's `wantedBy` links, networkd enabled (NixOS with
/// `networking.useNetworkd`), and a mount of the Nix store `nix_dir` at `/nix`.
pub fn nixos_unit_dir(root: &Path, package: &Path, nix_dir: &Path) -> PathBuf {
    let dir = root.join("etc-systemd-system");
    render_into(&dir, package);
    // The module sets `systemd.services.<name>` for all three units (wantedBy; the agent also
    // reloadTriggers), so NixOS writes an overrides.conf drop-in for each, with its default PATH.
    // It is modelled without the `path` the module adds: the agent must need neither.
    let path = nixos_default_path(root);
    for (unit, triggers) in [
        (AGENT, vec!["/etc/hcloud-nixos/agent.toml"]),
        (NETWORK, vec![]),
        ("hcloud-nixos-metadata-firewall.service", vec![]),
    ] {
        let dropins = dir.join(format!("{unit}.d"));
        std::fs::create_dir_all(&dropins).unwrap();
        std::fs::write(
            dropins.join("overrides.conf"),
            nixos_overrides_conf(&path, &triggers),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("nix.mount"),
        format!(
            "# Tests only: the test's own Nix store at /nix (a real server has it on its disk).\n\
             [Unit]\nDescription=The test's Nix store\nDefaultDependencies=no\n\
             Before=local-fs.target umount.target\nConflicts=umount.target\n\
             [Mount]\nWhat={}\nWhere=/nix\nType=none\nOptions=bind\n",
            nix_dir.display()
        ),
    )
    .unwrap();
    let links: &[(&str, &str, &str)] = &[
        ("local-fs.target.wants", "nix.mount", "../nix.mount"),
        (
            "multi-user.target.wants",
            NETWORK,
            "../hcloud-nixos-network.service",
        ),
        (
            "multi-user.target.wants",
            AGENT,
            "../hcloud-nixos-agent.service",
        ),
        (
            "sysinit.target.wants",
            "hcloud-nixos-metadata-firewall.service",
            "../hcloud-nixos-metadata-firewall.service",
        ),
        (
            "multi-user.target.wants",
            "systemd-networkd.service",
            "/lib/systemd/system/systemd-networkd.service",
        ),
        (
            "sockets.target.wants",
            "systemd-networkd.socket",
            "/lib/systemd/system/systemd-networkd.socket",
        ),
    ];
    for (wants, name, target) in links {
        std::fs::create_dir_all(dir.join(wants)).unwrap();
        std::os::unix::fs::symlink(target, dir.join(wants).join(name)).unwrap();
    }
    dir
}

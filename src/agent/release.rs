//! What a release must contain before the agent activates it: the agent itself, its
//! configuration, and the programs that configuration names. A release without them would be the
//! last one this server ever deploys: after the switch nothing follows the reference any more.

use std::path::Path;

/// Where a NixOS system (a toplevel store path) keeps the agent's unit: units installed through
/// `systemd.packages` are linked into `etc/systemd/system`.
pub(crate) const AGENT_UNIT: &str = "etc/systemd/system/hcloud-nixos-agent.service";

/// How a NixOS system starts the agent at boot: `wantedBy = [ "multi-user.target" ]` becomes this
/// link. Without it the agent would not come back after a reboot.
pub(crate) const AGENT_WANTED: &str =
    "etc/systemd/system/multi-user.target.wants/hcloud-nixos-agent.service";

/// Where a NixOS system keeps the agent's configuration (`environment.etc`).
pub(crate) const AGENT_CONFIG: &str = "etc/hcloud-nixos/agent.toml";

/// Checks that `system` (the release's store path, fetched) still runs the agent after a switch.
/// `Err` is one line for the status: what is missing, and that deploying it would end deploys.
pub(crate) fn check(system: &Path, version: &str) -> Result<(), String> {
    let refuse = |what: String| {
        Err(format!(
            "release {version} {what}: deploying it would end deploys on this server"
        ))
    };
    let unit = system.join(AGENT_UNIT);
    if !unit.exists() {
        return refuse(
            "does not include the hcloud-nixos module (no hcloud-nixos-agent.service)".into(),
        );
    }
    // `systemd.services.hcloud-nixos-agent.enable = false` masks it: a link to /dev/null.
    if std::fs::canonicalize(&unit).is_ok_and(|u| u == Path::new("/dev/null")) {
        return refuse("masks hcloud-nixos-agent.service".into());
    }
    if !system.join(AGENT_WANTED).exists() {
        return refuse(
            "does not start hcloud-nixos-agent.service at boot (not wanted by multi-user.target)"
                .into(),
        );
    }
    let config_path = system.join(AGENT_CONFIG);
    let text = match std::fs::read_to_string(&config_path) {
        Ok(text) => text,
        Err(_) => {
            return refuse(format!("has the agent's unit but no /{AGENT_CONFIG}"));
        }
    };
    let file = match crate::agent::config::parse_file(&text) {
        Ok(file) => file,
        Err(e) => {
            return refuse(format!(
                "has an agent configuration the agent refuses ({e})"
            ));
        }
    };
    if let Err(problems) = crate::agent::config::check(&file) {
        return refuse(format!(
            "has an agent configuration the agent refuses ({})",
            problems.join("; ")
        ));
    }
    // The programs the new configuration names: store paths (the NixOS module renders them so),
    // present once the closure is fetched; a bare name must be among the system's packages.
    let defaults = crate::agent::config::Paths::default();
    let p = &file.paths;
    for (key, configured) in [
        ("paths.fh", p.fh.clone().unwrap_or(defaults.fh)),
        (
            "paths.nix_env",
            p.nix_env.clone().unwrap_or(defaults.nix_env),
        ),
        ("paths.nix", p.nix.clone().unwrap_or(defaults.nix)),
    ] {
        let found = if configured.is_absolute() {
            crate::plumbing::exec::find_program(&configured).is_some()
        } else {
            crate::plumbing::exec::find_program(&system.join("sw/bin").join(&configured)).is_some()
        };
        if !found {
            return refuse(format!(
                "names a program it does not contain ({key} = {})",
                configured.display()
            ));
        }
    }
    if let Some(nixd) = &p.determinate_nixd
        && nixd.is_absolute()
        && crate::plumbing::exec::find_program(nixd).is_none()
    {
        return refuse(format!(
            "names a program it does not contain (paths.determinate_nixd = {})",
            nixd.display()
        ));
    }
    Ok(())
}

/// How to deploy such a release on purpose, for the status and the log.
pub(crate) const OVERRIDE_HINT: &str = "to deploy it anyway (leaving hcloud-nixos on purpose), set apply.require_agent = false in the agent's configuration and run `hcloud-nixos retry`";

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn system(dir: &Path, unit: bool, config: Option<&str>) -> std::path::PathBuf {
        let sys = dir.join("system");
        std::fs::create_dir_all(sys.join("etc/systemd/system")).unwrap();
        std::fs::create_dir_all(sys.join("etc/hcloud-nixos")).unwrap();
        if unit {
            std::fs::write(sys.join(AGENT_UNIT), "[Service]\n").unwrap();
            std::fs::create_dir_all(sys.join(AGENT_WANTED).parent().unwrap()).unwrap();
            let _ = std::fs::remove_file(sys.join(AGENT_WANTED));
            std::os::unix::fs::symlink("../hcloud-nixos-agent.service", sys.join(AGENT_WANTED))
                .unwrap();
        }
        if let Some(c) = config {
            std::fs::write(sys.join(AGENT_CONFIG), c).unwrap();
        }
        sys
    }

    fn program(dir: &Path, name: &str) -> String {
        let p = dir.join("bin").join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p.display().to_string()
    }

    #[test]
    fn a_release_with_the_module_and_its_programs_passes() {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "[paths]\nfh = \"{}\"\nnix = \"{}\"\nnix_env = \"{}\"\n",
            program(dir.path(), "fh"),
            program(dir.path(), "nix"),
            program(dir.path(), "nix-env")
        );
        let sys = system(dir.path(), true, Some(&config));
        assert_eq!(check(&sys, "0.1.43"), Ok(()));
    }

    #[test]
    fn a_release_without_the_module_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let sys = system(dir.path(), false, None);
        assert_eq!(
            check(&sys, "0.1.43").unwrap_err(),
            "release 0.1.43 does not include the hcloud-nixos module (no hcloud-nixos-agent.service): deploying it would end deploys on this server"
        );
    }

    #[test]
    fn a_release_whose_programs_are_missing_or_config_is_bad_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sys = system(dir.path(), true, None);
        assert!(
            check(&sys, "1")
                .unwrap_err()
                .contains("no /etc/hcloud-nixos/agent.toml")
        );
        let sys = system(
            dir.path(),
            true,
            Some("[paths]\nfh = \"/nonexistent/bin/fh\"\n"),
        );
        assert!(
            check(&sys, "1")
                .unwrap_err()
                .contains("names a program it does not contain (paths.fh = /nonexistent/bin/fh)")
        );
        let sys = system(dir.path(), true, Some("poll_interval = \"often\"\n"));
        assert!(
            check(&sys, "1")
                .unwrap_err()
                .contains("has an agent configuration the agent refuses (poll_interval"),
            "{:?}",
            check(&sys, "1")
        );
        // Bare names must be among the system's own packages.
        let sys = system(dir.path(), true, Some(""));
        assert!(check(&sys, "1").unwrap_err().contains("paths.fh = fh"));
    }

    #[test]
    fn a_masked_or_not_started_agent_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sys = system(dir.path(), true, Some(""));
        std::fs::remove_file(sys.join(AGENT_WANTED)).unwrap();
        assert!(
            check(&sys, "1")
                .unwrap_err()
                .contains("does not start hcloud-nixos-agent.service at boot")
        );
        std::fs::remove_file(sys.join(AGENT_UNIT)).unwrap();
        std::os::unix::fs::symlink("/dev/null", sys.join(AGENT_UNIT)).unwrap();
        assert!(
            check(&sys, "1")
                .unwrap_err()
                .contains("masks hcloud-nixos-agent.service")
        );
    }
}

//! The external programs the agent runs (fh, nix-env, nix, determinate-nixd), resolved once when
//! the agent starts (and on reload), said in the log, and handed to the steps by absolute path.
//!
//! The agent never relies on an ambient `PATH` to find them at the moment of a deploy: on NixOS
//! the unit's `PATH` is whatever NixOS writes into its `overrides.conf` drop-in (coreutils,
//! findutils, gnugrep, gnused and systemd, plus the unit's `path`), so the NixOS module renders
//! each program as a store path into the configuration. Names without a slash are still looked
//! up in `PATH` (machines other than NixOS, tests); a configured program that does not exist is
//! reported at start, naming its key, and every deploy then fails at once with the same words.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::agent::config::Paths;
use crate::agent::login::Method;
use crate::plumbing::exec;

/// A program the agent needs, found or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Program {
    /// The configuration key that names it (`paths.fh`), for messages.
    pub(crate) key: &'static str,
    pub(crate) found: Result<PathBuf, String>,
}

impl Program {
    fn resolve(key: &'static str, configured: &Path) -> Program {
        let found = exec::find_program(configured).ok_or_else(|| missing(key, configured));
        Program { key, found }
    }

    /// The absolute path, or the one-line reason it cannot be run.
    pub(crate) fn path(&self) -> Result<&Path, String> {
        self.found.as_deref().map_err(Clone::clone)
    }
}

fn missing(key: &str, configured: &Path) -> String {
    if configured.components().count() > 1 || configured.is_absolute() {
        format!(
            "{key}: {} does not exist or is not executable",
            configured.display()
        )
    } else {
        format!(
            "{key}: '{}' is not in PATH; give its absolute path in the configuration",
            configured.display()
        )
    }
}

/// Every program of the agent, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Programs {
    /// Fetches a release (`fh apply nixos ... dry-activate`).
    pub(crate) fh: Program,
    /// Sets the system profile back in a rollback.
    pub(crate) nix_env: Program,
    /// fh runs `nix` from `PATH`: its directory leads the steps' `PATH`.
    pub(crate) nix: Program,
    /// How the machine logs in to FlakeHub.
    pub(crate) login: Method,
    /// determinate-nixd was named explicitly and is missing (then there is no silent fallback to
    /// fh's token file).
    pub(crate) login_problem: Option<String>,
}

/// The default name of determinate-nixd: without it in `PATH`, fh's token file is used.
const DETERMINATE_NIXD: &str = "determinate-nixd";

impl Programs {
    /// Resolves every program named in `paths` (names without a slash in `PATH`).
    pub(crate) fn resolve(paths: &Paths) -> Programs {
        let explicit = paths.determinate_nixd != Path::new(DETERMINATE_NIXD);
        let (login, login_problem) = match exec::find_program(&paths.determinate_nixd) {
            Some(found) => (Method::DeterminateNixd(found), None),
            None => (
                Method::FhAuthFile(paths.fh_auth_file.clone()),
                explicit.then(|| missing("paths.determinate_nixd", &paths.determinate_nixd)),
            ),
        };
        Programs {
            fh: Program::resolve("paths.fh", &paths.fh),
            nix_env: Program::resolve("paths.nix_env", &paths.nix_env),
            nix: Program::resolve("paths.nix", &paths.nix),
            login,
            login_problem,
        }
    }

    /// What stops a deploy: every program a deploy needs that is missing, one line.
    pub(crate) fn deploy_problem(&self) -> Option<String> {
        let problems: Vec<String> = [&self.fh, &self.nix_env, &self.nix]
            .into_iter()
            .filter_map(|p| p.found.as_ref().err().cloned())
            .chain(self.login_problem.clone())
            .collect();
        (!problems.is_empty()).then(|| problems.join("; "))
    }

    /// One line per step for the log at start: which program runs it.
    pub(crate) fn describe(&self) -> Vec<String> {
        let show = |p: &Program| match &p.found {
            Ok(path) => path.display().to_string(),
            Err(e) => format!("MISSING ({e})"),
        };
        let login = match (&self.login, &self.login_problem) {
            (_, Some(problem)) => format!("MISSING ({problem})"),
            (Method::DeterminateNixd(p), None) => format!("{} login token", p.display()),
            (Method::FhAuthFile(f), None) => format!(
                "fh's token file {} (no determinate-nixd in PATH: upstream Nix)",
                f.display()
            ),
        };
        vec![
            format!("log in: {login}"),
            format!("fetch: {} apply nixos", show(&self.fh)),
            format!("fetch, nix for fh: {}", show(&self.nix)),
            "activate: <release>/bin/switch-to-configuration".to_string(),
            format!("roll back the profile: {} --set", show(&self.nix_env)),
        ]
    }

    /// `PATH` for the steps: the directories of nix, fh and nix-env first (fh runs `nix` from
    /// `PATH`), then the agent's own `PATH`.
    pub(crate) fn step_path(&self) -> OsString {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for program in [&self.nix, &self.fh, &self.nix_env] {
            if let Ok(path) = &program.found
                && let Some(dir) = path.parent()
                && !dirs.iter().any(|d| d == dir)
            {
                dirs.push(dir.to_path_buf());
            }
        }
        let inherited = std::env::var_os("PATH").unwrap_or_default();
        dirs.extend(std::env::split_paths(&inherited).filter(|d| !d.as_os_str().is_empty()));
        let mut seen = Vec::new();
        dirs.retain(|d| {
            let new = !seen.contains(d);
            seen.push(d.clone());
            new
        });
        std::env::join_paths(dirs).unwrap_or(inherited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn executable(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn paths(dir: &Path) -> Paths {
        Paths {
            fh: executable(&dir.join("fh-pkg"), "fh"),
            nix: executable(&dir.join("nix-pkg"), "nix"),
            nix_env: dir.join("nix-pkg/nix-env"),
            determinate_nixd: DETERMINATE_NIXD.into(),
            fh_auth_file: dir.join("auth"),
            ..Paths::default()
        }
    }

    #[test]
    fn absolute_programs_are_used_as_they_are_and_lead_the_steps_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("fh-pkg")).unwrap();
        std::fs::create_dir_all(dir.path().join("nix-pkg")).unwrap();
        let p = paths(dir.path());
        executable(&dir.path().join("nix-pkg"), "nix-env");
        let programs = Programs::resolve(&p);
        assert_eq!(programs.fh.path().unwrap(), p.fh);
        assert_eq!(programs.deploy_problem(), None);
        let path = programs.step_path();
        let dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        assert_eq!(dirs[0], dir.path().join("nix-pkg"), "{dirs:?}");
        assert_eq!(dirs[1], dir.path().join("fh-pkg"), "{dirs:?}");
        assert_eq!(
            dirs.iter().filter(|d| **d == dirs[0]).count(),
            1,
            "no directory twice: {dirs:?}"
        );
        let described = programs.describe().join("\n");
        assert!(described.contains(&format!("fetch: {} apply nixos", p.fh.display())));
        assert!(described.contains("upstream Nix"), "{described}");
    }

    #[test]
    fn a_missing_program_is_named_by_its_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("fh-pkg")).unwrap();
        std::fs::create_dir_all(dir.path().join("nix-pkg")).unwrap();
        let p = paths(dir.path());
        let programs = Programs::resolve(&p);
        let problem = programs.deploy_problem().unwrap();
        assert_eq!(
            problem,
            format!(
                "paths.nix_env: {} does not exist or is not executable",
                p.nix_env.display()
            )
        );
        assert!(programs.describe().join("\n").contains("MISSING"));
    }

    #[test]
    fn determinate_nixd_named_explicitly_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("fh-pkg")).unwrap();
        std::fs::create_dir_all(dir.path().join("nix-pkg")).unwrap();
        executable(&dir.path().join("nix-pkg"), "nix-env");
        let mut p = paths(dir.path());
        p.determinate_nixd = dir.path().join("no/determinate-nixd");
        let programs = Programs::resolve(&p);
        assert!(
            programs
                .deploy_problem()
                .is_some_and(|e| e.starts_with("paths.determinate_nixd: ")),
            "{programs:?}"
        );
        p.determinate_nixd = executable(&dir.path().join("nix-pkg"), "determinate-nixd");
        let programs = Programs::resolve(&p);
        assert_eq!(
            programs.login,
            Method::DeterminateNixd(p.determinate_nixd.clone())
        );
        assert_eq!(programs.deploy_problem(), None);
    }

    #[test]
    fn a_name_not_in_path_says_to_give_the_absolute_path() {
        let p = Paths {
            fh: "surely-no-such-fh-here".into(),
            ..Paths::default()
        };
        let programs = Programs::resolve(&p);
        assert_eq!(
            programs.fh.path().unwrap_err(),
            "paths.fh: 'surely-no-such-fh-here' is not in PATH; give its absolute path in the configuration"
        );
    }
}

//! Running the steps of a deploy (fetch with fh, activate, roll back): each in a transient systemd
//! unit of its own, or as a child process.
//!
//! A deploy is split in two so that nothing is hidden: `fh apply nixos <ref> dry-activate`
//! fetches the closure and makes it the system profile's new generation (fh's steps 1-3), then
//! `<store path>/bin/switch-to-configuration <operation>` activates it, and its exit status (4 when
//! units failed) is seen as it is. `fh apply nixos <ref> switch` would run the same command but
//! ignore its exit status.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::agent::config::{ApplyMode, Operation};
use crate::agent::systemd::{Systemd, TransientService};
use crate::plumbing::procfs;

/// Which step of a deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum StepKind {
    /// `fh apply nixos <ref> dry-activate`: the closure and the profile generation.
    Fetch,
    /// `switch-to-configuration` of the new system.
    Activate,
    /// `switch-to-configuration` of the system that ran before.
    Rollback,
}

impl StepKind {
    /// Every kind, in a deploy's order.
    pub(crate) const ALL: [StepKind; 3] = [StepKind::Fetch, StepKind::Activate, StepKind::Rollback];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StepKind::Fetch => "fetch",
            StepKind::Activate => "activate",
            StepKind::Rollback => "rollback",
        }
    }
}

/// One command to run, never through a shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    pub(crate) kind: StepKind,
    /// The absolute program path, then its arguments.
    pub(crate) argv: Vec<String>,
    /// The release this step is about (for the journal and the unit's description).
    pub(crate) version: String,
}

impl Step {
    /// `fh apply nixos <org>/<flake>/=<version>#<attr> dry-activate`, with fh's absolute path.
    pub(crate) fn fetch(fh: &Path, reference: &str, version: &str) -> Step {
        Step {
            kind: StepKind::Fetch,
            argv: vec![
                fh.to_string_lossy().into_owned(),
                "apply".into(),
                "nixos".into(),
                reference.into(),
                "dry-activate".into(),
            ],
            version: version.into(),
        }
    }

    /// `<system>/bin/switch-to-configuration <operation>`, for a new system or the previous one.
    pub(crate) fn switch(
        kind: StepKind,
        system: &str,
        operation: Operation,
        version: &str,
    ) -> Step {
        Step {
            kind,
            argv: vec![
                format!("{system}/bin/switch-to-configuration"),
                operation.as_str().into(),
            ],
            version: version.into(),
        }
    }

    fn description(&self) -> String {
        match self.kind {
            StepKind::Fetch => format!("hcloud-nixos: fetch {} with fh", self.version),
            StepKind::Activate => format!("hcloud-nixos: activate {}", self.version),
            StepKind::Rollback => format!("hcloud-nixos: roll back from {}", self.version),
        }
    }
}

/// A name for the transient unit of a step started at `unix_secs`.
pub(crate) fn unit_name(kind: StepKind, unix_secs: u64) -> String {
    format!("hcloud-nixos-{}-{unix_secs}.service", kind.as_str())
}

/// Is this one of the units the agent starts (as [`unit_name`] names them; `apply` is what
/// agents before the split into steps called theirs)?
pub(crate) fn is_step_unit(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix("hcloud-nixos-")
        .and_then(|n| n.strip_suffix(".service"))
    else {
        return false;
    };
    let Some((kind, secs)) = rest.split_once('-') else {
        return false;
    };
    (StepKind::ALL.iter().any(|k| k.as_str() == kind) || kind == "apply")
        && !secs.is_empty()
        && secs.bytes().all(|b| b.is_ascii_digit())
}

/// How a step's process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Finished {
    /// Exit status 0.
    pub(crate) succeeded: bool,
    /// `exited with status 4`, for messages.
    pub(crate) detail: String,
}

/// What a restarted agent finds of a step an earlier agent process started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Found {
    /// Still running in its unit: wait for it.
    Running,
    /// Still running as a process of an earlier agent (direct mode).
    RunningOrphan(u32),
    Finished(Finished),
    /// Nothing to find (no unit, no process): only the system's state can tell.
    Unknown,
}

/// A step under way.
pub(crate) enum Running {
    Unit(String),
    Child(tokio::process::Child),
    /// A process started by an earlier agent process (direct mode), found still running.
    Orphan(u32),
}

/// Is `pid` running exactly `argv` as this agent's user (and not a process that reused the PID)?
/// An interpreter may stand first (`bash /path/fh apply ...`), so `argv` is looked for anywhere in
/// the command line; anyone can write a command line, so another user's process never counts.
pub(crate) fn is_running(pid: u32, argv: &[String]) -> bool {
    let cmdline = procfs::cmdline(pid);
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    !argv.is_empty()
        && args
            .windows(argv.len())
            .any(|w| w.iter().zip(argv).all(|(a, b)| *a == b.as_bytes()))
        && procfs::runs_as(pid, nix::unistd::geteuid().as_raw())
}

/// Starts steps and waits for them.
#[derive(Clone)]
pub(crate) struct Applier {
    pub(crate) mode: ApplyMode,
    systemd: Option<Systemd>,
    /// `PATH` of every step: the agent's programs' directories first (see `programs`).
    step_path: std::ffi::OsString,
}

impl Applier {
    pub(crate) async fn new(mode: ApplyMode, step_path: std::ffi::OsString) -> Result<Self> {
        let systemd = match mode {
            ApplyMode::TransientUnit => Some(Systemd::connect().await?),
            ApplyMode::Direct => None,
        };
        Ok(Applier {
            mode,
            systemd,
            step_path,
        })
    }

    /// The system manager, when the agent talks to one.
    pub(crate) fn systemd(&self) -> Option<&Systemd> {
        self.systemd.as_ref()
    }

    /// Starts a step; `unit` names its transient unit (ignored in direct mode).
    pub(crate) async fn start(&self, step: &Step, unit: &str) -> Result<Running> {
        match &self.systemd {
            Some(systemd) => {
                // A transient unit starts with an empty environment: hand on what fh needs, with
                // the PATH the agent chose (never the unit's own, which NixOS rewrites).
                let path = format!("PATH={}", self.step_path.to_string_lossy());
                let environment = std::iter::once(path)
                    .chain(
                        ["HOME", "NIX_REMOTE", "NIX_CONF_DIR", "SSL_CERT_FILE"]
                            .iter()
                            .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}"))),
                    )
                    .collect();
                systemd
                    .start_transient_service(&TransientService {
                        name: unit.to_string(),
                        description: step.description(),
                        argv: step.argv.clone(),
                        environment,
                        log_fields: vec![
                            format!("HCLOUD_NIXOS_VERSION={}", step.version),
                            format!("HCLOUD_NIXOS_STEP={}", step.kind.as_str()),
                        ],
                    })
                    .await?;
                Ok(Running::Unit(unit.to_string()))
            }
            None => {
                let child = tokio::process::Command::new(&step.argv[0])
                    .args(&step.argv[1..])
                    .env("PATH", &self.step_path)
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(false)
                    .spawn()
                    .with_context(|| format!("cannot run {}", step.argv[0]))?;
                Ok(Running::Child(child))
            }
        }
    }

    /// Waits for the step to end; after `timeout` it is stopped and counts as failed.
    pub(crate) async fn wait(&self, running: Running, timeout: Duration) -> Result<Finished> {
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || Finished {
            succeeded: false,
            detail: format!(
                "did not finish within {}s and was stopped",
                timeout.as_secs()
            ),
        };
        match running {
            Running::Child(mut child) => match tokio::time::timeout(timeout, child.wait()).await {
                Ok(status) => {
                    let status = status.context("cannot wait for the step's process")?;
                    Ok(Finished {
                        succeeded: status.success(),
                        detail: match status.code() {
                            Some(code) => format!("exited with status {code}"),
                            None => format!("ended by {status}"),
                        },
                    })
                }
                Err(_) => {
                    let _ = child.kill().await;
                    Ok(timed_out())
                }
            },
            Running::Orphan(pid) => {
                // Until it is gone (a process of another user's that took its PID is not it).
                let euid = nix::unistd::geteuid().as_raw();
                while procfs::runs_as(pid, euid) {
                    if tokio::time::Instant::now() >= deadline {
                        // Never 0 or -1 (our group, every process) from a PID out of range.
                        if let Some(pid) = i32::try_from(pid).ok().filter(|p| *p > 1) {
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(pid),
                                nix::sys::signal::Signal::SIGTERM,
                            );
                        }
                        return Ok(timed_out());
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                // Not our child: its exit status is gone. The system's state tells.
                Ok(Finished {
                    succeeded: true,
                    detail: format!(
                        "ended (PID {pid}, started by an earlier agent; exit status unknown)"
                    ),
                })
            }
            Running::Unit(name) => loop {
                match self.find(&name).await? {
                    Found::Finished(f) => return Ok(f),
                    Found::Unknown => bail!("the unit {name} disappeared before it finished"),
                    Found::Running | Found::RunningOrphan(_) => {}
                }
                if tokio::time::Instant::now() >= deadline {
                    self.forget(&name).await;
                    return Ok(timed_out());
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            },
        }
    }

    /// What became of a step an earlier agent process started: in `unit`, or (direct mode) as
    /// process `pid` running `argv`.
    pub(crate) async fn find_earlier(
        &self,
        unit: Option<&str>,
        pid: Option<u32>,
        argv: &[String],
    ) -> Result<Found> {
        match (unit, pid) {
            (Some(unit), _) if self.systemd.is_some() => self.find(unit).await,
            (_, Some(pid)) if is_running(pid, argv) => Ok(Found::RunningOrphan(pid)),
            _ => Ok(Found::Unknown),
        }
    }

    /// What became of the step in `unit`.
    pub(crate) async fn find(&self, unit: &str) -> Result<Found> {
        let Some(systemd) = &self.systemd else {
            return Ok(Found::Unknown);
        };
        Ok(match systemd.unit_status(unit).await? {
            None => Found::Unknown,
            Some(s) if s.never_ran() => Found::Unknown,
            Some(s) if !s.finished() => Found::Running,
            Some(s) => Found::Finished(Finished {
                succeeded: s.succeeded(),
                detail: s.describe(),
            }),
        })
    }

    /// Unloads a finished unit; its output stays in the journal.
    pub(crate) async fn forget(&self, unit: &str) {
        if let Some(systemd) = &self.systemd {
            systemd.forget_unit(unit).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_run_exact_commands() {
        let fetch = Step::fetch(
            Path::new("/bin/sh"),
            "org/infra/=0.1.42+rev-abc#nixosConfigurations.web",
            "0.1.42+rev-abc",
        );
        assert_eq!(
            fetch.argv,
            [
                "/bin/sh",
                "apply",
                "nixos",
                "org/infra/=0.1.42+rev-abc#nixosConfigurations.web",
                "dry-activate"
            ]
        );
        let activate = Step::switch(
            StepKind::Activate,
            "/nix/store/abc-system",
            Operation::Boot,
            "0.1.42",
        );
        assert_eq!(
            activate.argv,
            ["/nix/store/abc-system/bin/switch-to-configuration", "boot"]
        );
        assert_eq!(
            unit_name(StepKind::Rollback, 1700000000),
            "hcloud-nixos-rollback-1700000000.service"
        );
        for kind in StepKind::ALL {
            assert!(is_step_unit(&unit_name(kind, 1700000000)), "{kind:?}");
        }
        assert!(is_step_unit("hcloud-nixos-apply-17.service"));
        assert!(!is_step_unit("hcloud-nixos-agent.service"));
        assert!(!is_step_unit("hcloud-nixos-activate-web.service"));
        assert!(!is_step_unit("hcloud-nixos-activate-.service"));
        assert!(!is_step_unit("x-hcloud-nixos-fetch-1.service"));
    }

    #[test]
    fn finds_a_running_command_line_behind_an_interpreter() {
        // `; true` keeps the shell from exec'ing sleep in its place.
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 5; true", "apply", "nixos"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let argv = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let wanted = argv(&["sleep 5; true", "apply", "nixos"]);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !is_running(pid, &wanted) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(is_running(pid, &wanted));
        assert!(!is_running(pid, &argv(&["apply", "nixos", "other"])));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!is_running(pid, &wanted));
    }
}

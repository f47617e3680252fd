//! Running `fh apply nixos` for one exact release: in a transient systemd unit, or as a child.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::config::{ApplyMode, Operation};
use crate::systemd::{Systemd, TransientService};

/// One apply to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `org/flake/=<version>#<attr>`: the exact version, so that nothing newer slips in.
    pub reference: String,
    pub version: String,
    pub operation: Operation,
}

/// The arguments of `fh` for a request (no shell is involved anywhere).
pub fn fh_args(req: &Request) -> Vec<String> {
    vec![
        "apply".into(),
        "nixos".into(),
        req.reference.clone(),
        req.operation.as_str().into(),
    ]
}

/// A name for the transient unit of an apply started at `unix_secs`.
pub fn unit_name(unix_secs: u64) -> String {
    format!("hcloud-nixos-apply-{unix_secs}.service")
}

/// How an apply ended, as far as fh's exit status tells (which is no proof of success).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub fh_succeeded: bool,
    pub detail: String,
}

/// What a restarted agent finds of an apply it had started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Still running: wait for it.
    Running,
    /// Still running as a process of an earlier agent (direct mode).
    RunningOrphan(u32),
    Finished(Finished),
    /// Nothing to find (no unit, or direct mode): only the system's state can tell.
    Unknown,
}

/// An apply under way.
pub enum Running {
    Unit(String),
    Child(tokio::process::Child),
    /// fh started by an earlier agent process (direct mode), found still running.
    Orphan(u32),
}

/// Is `pid` a running `fh apply` for `reference` (and not a process that reused the PID)?
/// An interpreter may stand first (`bash /path/fh apply ...`), so the words are looked for
/// anywhere in the command line.
pub fn is_our_fh(pid: u32, reference: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(3)
        .any(|w| w[0] == b"apply" && w[1] == b"nixos" && w[2] == reference.as_bytes())
}

/// Starts applies and waits for them.
#[derive(Clone)]
pub struct Applier {
    pub mode: ApplyMode,
    pub fh: PathBuf,
    systemd: Option<Systemd>,
}

impl Applier {
    pub async fn new(mode: ApplyMode, fh: PathBuf) -> Result<Self> {
        let systemd = match mode {
            ApplyMode::TransientUnit => Some(Systemd::connect().await?),
            ApplyMode::Direct => None,
        };
        Ok(Applier { mode, fh, systemd })
    }

    /// Starts `fh apply`. `unit` names the transient unit (ignored in direct mode).
    pub async fn start(&self, req: &Request, unit: &str) -> Result<Running> {
        let fh = crate::exec::find_program(&self.fh).with_context(|| {
            format!("cannot find fh ('{}'); is it installed?", self.fh.display())
        })?;
        let mut argv = vec![fh.to_string_lossy().into_owned()];
        argv.extend(fh_args(req));
        match &self.systemd {
            Some(systemd) => {
                // A transient unit starts with an empty environment: hand on what fh needs.
                let environment = [
                    "PATH",
                    "HOME",
                    "NIX_REMOTE",
                    "NIX_CONF_DIR",
                    "SSL_CERT_FILE",
                ]
                .iter()
                .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}")))
                .collect();
                systemd
                    .start_transient_service(&TransientService {
                        name: unit.to_string(),
                        description: format!(
                            "hcloud-nixos: fh apply nixos {} ({})",
                            req.version,
                            req.operation.as_str()
                        ),
                        argv,
                        environment,
                        log_fields: vec![format!("HCLOUD_NIXOS_VERSION={}", req.version)],
                    })
                    .await?;
                Ok(Running::Unit(unit.to_string()))
            }
            None => {
                let child = tokio::process::Command::new(&argv[0])
                    .args(&argv[1..])
                    .stdin(std::process::Stdio::null())
                    .kill_on_drop(false)
                    .spawn()
                    .with_context(|| format!("cannot run {}", argv[0]))?;
                Ok(Running::Child(child))
            }
        }
    }

    /// Waits for the apply to end; after `timeout` it is stopped and counts as failed.
    pub async fn wait(&self, running: Running, timeout: Duration) -> Result<Finished> {
        match running {
            Running::Child(mut child) => match tokio::time::timeout(timeout, child.wait()).await {
                Ok(status) => {
                    let status = status.context("cannot wait for fh")?;
                    Ok(Finished {
                        fh_succeeded: status.success(),
                        detail: format!("fh {status}"),
                    })
                }
                Err(_) => {
                    let _ = child.kill().await;
                    Ok(Finished {
                        fh_succeeded: false,
                        detail: format!(
                            "fh did not finish within {}s and was stopped",
                            timeout.as_secs()
                        ),
                    })
                }
            },
            Running::Orphan(pid) => {
                let deadline = tokio::time::Instant::now() + timeout;
                while std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    if tokio::time::Instant::now() >= deadline {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid as i32),
                            nix::sys::signal::Signal::SIGTERM,
                        );
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                // Not our child: its exit status is gone; the system's state tells.
                Ok(Finished {
                    fh_succeeded: true,
                    detail: format!("fh (pid {pid}, started by an earlier agent) ended"),
                })
            }
            Running::Unit(name) => {
                let deadline = tokio::time::Instant::now() + timeout;
                loop {
                    match self.find(&name).await? {
                        Found::Finished(f) => return Ok(f),
                        Found::Unknown => {
                            bail!("the unit {name} running fh disappeared before it finished")
                        }
                        Found::Running | Found::RunningOrphan(_) => {}
                    }
                    if tokio::time::Instant::now() >= deadline {
                        if let Some(systemd) = &self.systemd {
                            systemd.forget_unit(&name).await;
                        }
                        return Ok(Finished {
                            fh_succeeded: false,
                            detail: format!(
                                "fh did not finish within {}s; {name} was stopped",
                                timeout.as_secs()
                            ),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// What became of an apply started by an earlier agent process: in `unit`, or (direct mode)
    /// as process `pid` running `reference`.
    pub async fn find_earlier(
        &self,
        unit: Option<&str>,
        pid: Option<u32>,
        reference: &str,
    ) -> Result<Found> {
        match (unit, pid) {
            (Some(unit), _) => self.find(unit).await,
            (None, Some(pid)) if is_our_fh(pid, reference) => Ok(Found::RunningOrphan(pid)),
            _ => Ok(Found::Unknown),
        }
    }

    /// What became of the apply in `unit`.
    pub async fn find(&self, unit: &str) -> Result<Found> {
        let Some(systemd) = &self.systemd else {
            return Ok(Found::Unknown);
        };
        Ok(match systemd.unit_status(unit).await? {
            None => Found::Unknown,
            Some(s) if !s.finished() => Found::Running,
            Some(s) => Found::Finished(Finished {
                fh_succeeded: s.succeeded(),
                detail: format!("fh in {unit} {}", s.describe()),
            }),
        })
    }

    /// Unloads a finished unit; its output stays in the journal.
    pub async fn forget(&self, unit: &str) {
        if let Some(systemd) = &self.systemd {
            systemd.forget_unit(unit).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fh_gets_the_exact_reference_and_operation() {
        let req = Request {
            reference: "org/infra/=0.1.42+rev-abc#nixosConfigurations.web".into(),
            version: "0.1.42+rev-abc".into(),
            operation: Operation::Boot,
        };
        assert_eq!(
            fh_args(&req),
            [
                "apply",
                "nixos",
                "org/infra/=0.1.42+rev-abc#nixosConfigurations.web",
                "boot"
            ]
        );
        assert_eq!(
            unit_name(1700000000),
            "hcloud-nixos-apply-1700000000.service"
        );
    }
}

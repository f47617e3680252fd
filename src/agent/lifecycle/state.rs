//! The agent's record of what runs, what is wanted and what happened: one JSON file, written
//! atomically, and the lock that keeps two agents from writing it at once.
//!
//! In memory the deploy lifecycle is one enum ([`Lifecycle`]) whose variants carry exactly their
//! data, so that combinations that must never exist cannot be written down. On disk the file
//! keeps the layout every earlier agent wrote (`in_flight`, `pending_boot`, `reboot_request` side
//! by side), so that an agent upgraded by a deploy reads what the agent before it wrote, and
//! `hcloud-nixos status --json` keeps its shape.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use jiff::Timestamp;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::agent::config::Operation;
use crate::fleet::Ending;
use crate::plumbing::files;

pub(crate) const FILE_NAME: &str = "state.json";

/// The last check, in the runtime directory.
pub(crate) const LAST_CHECK: &str = "last-check.json";

/// Now, to the second (what the file and the status show).
pub(crate) fn now() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// A release and the store path of its output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The release's exact version on FlakeHub (`0.1.42+rev-…`).
    pub version: String,
    /// The `/nix/store/…` path of the NixOS system that release builds.
    pub store_path: String,
}

/// The outcome of the last check (a poll of FlakeHub).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub(crate) at: Timestamp,
    pub(crate) ok: bool,
    pub(crate) message: String,
}

/// How a finished deploy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Outcome {
    Success,
    Failed,
}

/// A deploy that finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deploy {
    pub(crate) version: String,
    pub(crate) store_path: String,
    /// What ran before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) previous_path: Option<String>,
    pub(crate) operation: Operation,
    pub(crate) started_at: Timestamp,
    /// When the fetch ended and the activation began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) fetched_at: Option<Timestamp>,
    /// When the activation ended and the confirmation began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) activated_at: Option<Timestamp>,
    pub(crate) finished_at: Timestamp,
    pub(crate) outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

/// Where a deploy under way stands, with what only that phase has. Written down before each step
/// starts, so that an agent restarted meanwhile picks up the step's result instead of starting it
/// again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Phase {
    /// fh fetches the closure and makes it the profile's new generation.
    Fetch,
    /// switch-to-configuration of the new system.
    Activate,
    /// Waiting, until then, for the new system to prove healthy.
    Confirm { until: Timestamp },
    /// Going back to what ran before, for this reason.
    Rollback { failure: String },
}

impl Phase {
    /// The phase's name, as the state file spells it.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Phase::Fetch => "fetch",
            Phase::Activate => "activate",
            Phase::Confirm { .. } => "confirm",
            Phase::Rollback { .. } => "rollback",
        }
    }
}

/// The step of the current phase, once started: what a restarted agent looks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StepHandle {
    /// Its transient unit.
    Unit(String),
    /// Its process, in `apply.mode = "direct"`.
    Pid(u32),
}

/// A deploy that was started and whose result is not yet recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    pub(crate) target: Target,
    pub(crate) operation: Operation,
    /// The exact reference given to fh.
    pub(crate) reference: String,
    pub(crate) phase: Phase,
    pub(crate) step: Option<StepHandle>,
    /// The system that ran before: what a rollback goes back to, and no further.
    pub(crate) previous_path: Option<String>,
    /// What the system profile (the boot default) pointed at before.
    pub(crate) previous_profile: Option<String>,
    /// Units already failed before the deploy; they do not count against it.
    pub(crate) failed_before: Vec<String>,
    pub(crate) started_at: Timestamp,
    /// When the fetch ended (the activation began).
    pub(crate) fetched_at: Option<Timestamp>,
    /// When the activation ended (the confirmation began).
    pub(crate) activated_at: Option<Timestamp>,
}

/// A release applied with `operation = "boot"`, to be checked after the next boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingBoot {
    pub(crate) version: String,
    pub(crate) store_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) previous_profile: Option<String>,
    /// The boot it was applied in (`/proc/sys/kernel/random/boot_id`).
    pub(crate) boot_id: String,
    pub(crate) at: Timestamp,
}

/// A reboot the agent asked for, to be checked after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebootRequest {
    /// The system that should be booted afterwards.
    pub(crate) system: String,
    /// The boot it was asked in.
    pub(crate) boot_id: String,
    pub(crate) at: Timestamp,
    /// The release applied with `operation = "boot"` that this reboot brings up, if any.
    pub(crate) awaiting: Option<PendingBoot>,
}

/// The deploy lifecycle: exactly one of these holds at any moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Lifecycle {
    /// Nothing under way.
    #[default]
    Steady,
    /// A deploy under way. `awaiting`: a release applied with `operation = "boot"` earlier and
    /// still waiting for its reboot, which this deploy supersedes; it is the boot default again
    /// if this deploy does not complete.
    Deploying {
        /// The release being applied and how far it got.
        deploy: InFlight,
        /// The boot release this deploy supersedes, if one was waiting.
        awaiting: Option<PendingBoot>,
    },
    /// A release was applied with `operation = "boot"`; it is checked after the next boot.
    AwaitingBoot(PendingBoot),
    /// The agent asked for a reboot; the booted system is checked after it.
    Rebooting(RebootRequest),
}

/// Repeated failures at one store path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failures {
    pub(crate) store_path: String,
    pub(crate) version: String,
    pub(crate) count: u32,
    pub(crate) last_error: String,
}

/// Login bookkeeping: which token (by its SHA-256, never the token) was used to log in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Login {
    pub(crate) token_sha256: String,
    pub(crate) at: Timestamp,
}

/// A store path that failed: not tried again until another release appears or an operator
/// clears it (`hcloud-nixos retry`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    pub(crate) version: String,
    pub(crate) store_path: String,
    pub(crate) reason: String,
    pub(crate) at: Timestamp,
}

/// The last reboot the agent asked for, as seen after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastReboot {
    pub(crate) at: Timestamp,
    pub(crate) system: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) booted: Option<String>,
    /// The booted system is the one the reboot was for.
    pub(crate) ok: bool,
}

/// Totals since the state file was created, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counters {
    pub(crate) deploys_succeeded: u64,
    pub(crate) deploys_failed: u64,
    pub(crate) rollbacks_succeeded: u64,
    pub(crate) rollbacks_failed: u64,
}

/// Everything the agent remembers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(from = "wire::StateFile", into = "wire::StateFile")]
pub struct State {
    /// The release last seen running and healthy: set by a confirmed deploy (or a check that
    /// finds the system already up to date); None until then.
    pub running: Option<Target>,
    /// What FlakeHub resolved the reference to at the last successful check; None before one.
    pub desired: Option<Target>,
    /// When the last poll of FlakeHub happened and how it went; None before the first.
    pub last_check: Option<Check>,
    /// The last deploy that finished, successful or not; None before the first.
    pub last_deploy: Option<Deploy>,
    /// Where the deploy lifecycle stands.
    pub lifecycle: Lifecycle,
    /// Deploys of one store path that failed in a row; None once a deploy succeeds (or an
    /// operator runs `hcloud-nixos retry`).
    pub failures: Option<Failures>,
    /// The last `fh login`; None before the agent has logged in with a token.
    pub login: Option<Login>,
    /// Deploys recorded since the state file was created, successful or not.
    pub deploys: u64,
    /// Deploys and rollbacks by outcome, for the metrics.
    pub counters: Counters,
    /// Cycles in a row that ended in a failure (check or deploy).
    pub consecutive_failures: u32,
    /// Store paths that failed and are not tried again until another release appears or an
    /// operator clears them; the newest last.
    pub quarantined: Vec<Quarantined>,
    /// The running system needs a reboot (a new kernel, initrd or kernel modules).
    pub reboot_required: bool,
    /// The moment chosen inside the maintenance window, kept across polls.
    pub reboot_planned: Option<Timestamp>,
    /// The last reboot the agent asked for and what came up after it; None before the first.
    pub last_reboot: Option<LastReboot>,
    /// A fleet slot still to be handed back (the backend could not be reached when the work it
    /// was taken for ended, or a reboot ended it). It can outlive any phase of the lifecycle,
    /// so it stands beside it.
    pub fleet_release: Option<Ending>,
    /// The one-line status an operator reads.
    pub status: String,
}

impl State {
    /// The state file in `state_dir`.
    pub(crate) fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(FILE_NAME)
    }

    /// Reads the state; a missing file is an empty state. A corrupt one is an error: the agent
    /// must not forget an apply in flight.
    pub(crate) fn load(state_dir: &Path) -> Result<State> {
        let path = Self::path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} is not a valid state file; move it away to start afresh",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Writes the state atomically, readable by root only.
    pub(crate) fn save(&self, state_dir: &Path) -> Result<()> {
        files::create_dir_all_mode(state_dir, 0o700)
            .with_context(|| format!("cannot create {}", state_dir.display()))?;
        let mut text = serde_json::to_vec_pretty(self)?;
        text.push(b'\n');
        let path = Self::path(state_dir);
        files::write_atomic(&path, &text, 0o600)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Has anything changed since `before` besides the time of the last check? An idle poll
    /// that found what the one before it found writes nothing to disk (see [`LAST_CHECK`]).
    pub(crate) fn changed_since(&self, before: &State) -> bool {
        let same_check = match (&self.last_check, &before.last_check) {
            (Some(a), Some(b)) => a.ok == b.ok && a.message == b.message,
            (None, None) => true,
            _ => false,
        };
        if !same_check {
            return true;
        }
        let mut this = self.clone();
        this.last_check.clone_from(&before.last_check);
        this != *before
    }

    /// The state as `status` shows it: the file, with the last check from the runtime file when
    /// that is newer (idle polls do not rewrite the state file).
    pub(crate) fn load_for_status(state_dir: &Path, run_dir: &Path) -> Result<State> {
        let mut state = State::load(state_dir)?;
        let newer = std::fs::read(run_dir.join(LAST_CHECK))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Check>(&bytes).ok())
            .filter(|c| state.last_check.as_ref().is_none_or(|l| c.at > l.at));
        if let Some(check) = newer {
            state.last_check = Some(check);
        }
        Ok(state)
    }

    /// Notes the last check in the runtime directory (a small file on tmpfs), where `status`
    /// finds it; the state file keeps the last check that changed something.
    pub(crate) fn note_check(&self, run_dir: &Path) -> Result<()> {
        let Some(check) = &self.last_check else {
            return Ok(());
        };
        files::create_dir_all_mode(run_dir, 0o700)
            .with_context(|| format!("cannot create {}", run_dir.display()))?;
        let path = run_dir.join(LAST_CHECK);
        files::write_atomic(&path, &serde_json::to_vec(check)?, 0o600)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// The deploy under way, if any.
    pub(crate) fn in_flight(&self) -> Option<&InFlight> {
        match &self.lifecycle {
            Lifecycle::Deploying { deploy, .. } => Some(deploy),
            _ => None,
        }
    }

    /// The release waiting for the next boot, if any (also while a reboot for it is under way,
    /// or a newer deploy may supersede it).
    pub(crate) fn pending_boot(&self) -> Option<&PendingBoot> {
        match &self.lifecycle {
            Lifecycle::AwaitingBoot(p) => Some(p),
            Lifecycle::Rebooting(r) => r.awaiting.as_ref(),
            Lifecycle::Deploying { awaiting, .. } => awaiting.as_ref(),
            Lifecycle::Steady => None,
        }
    }
}

/// The lock that keeps two agents apart (this one and an operator's `agent --once` or `retry`)
/// while one reads and writes the state. `wait`: block until it is free; else `None` when taken.
///
/// The file is root's alone (0600), whatever the umask of whoever creates it: anyone who can open
/// a file can hold a lock on it, and the run directory is open to all (systemd's default 0755).
pub(crate) fn take_lock(run_dir: &Path, wait: bool) -> Result<Option<Flock<File>>> {
    files::create_dir_all_mode(run_dir, 0o700)?;
    let path = run_dir.join("apply.lock");
    let file =
        files::open_private(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let how = if wait {
        FlockArg::LockExclusive
    } else {
        FlockArg::LockExclusiveNonblock
    };
    match Flock::lock(file, how) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
}

/// The file's layout: what every agent before the lifecycle enum wrote, and still writes.
mod wire {
    use super::*;

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    enum PhaseName {
        Fetch,
        Activate,
        Confirm,
        Rollback,
    }

    #[derive(Serialize, Deserialize)]
    pub(super) struct InFlightFile {
        version: String,
        store_path: String,
        operation: Operation,
        #[serde(default)]
        reference: String,
        #[serde(default = "fetch")]
        phase: PhaseName,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unit: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous_path: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous_profile: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        failed_before: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        confirm_until: Option<Timestamp>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        failure: Option<String>,
        started_at: Timestamp,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fetched_at: Option<Timestamp>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        activated_at: Option<Timestamp>,
    }

    fn fetch() -> PhaseName {
        PhaseName::Fetch
    }

    impl From<InFlightFile> for InFlight {
        fn from(f: InFlightFile) -> Self {
            let phase = match f.phase {
                PhaseName::Fetch => Phase::Fetch,
                PhaseName::Activate => Phase::Activate,
                // An agent killed between writing the phase and its deadline: wait from now.
                PhaseName::Confirm => Phase::Confirm {
                    until: f.confirm_until.unwrap_or_else(now),
                },
                PhaseName::Rollback => Phase::Rollback {
                    failure: f.failure.unwrap_or_else(|| "the deploy failed".into()),
                },
            };
            // A process is only ever written down in direct mode, after the unit name that
            // mode does not use.
            let step = match (f.unit, f.pid) {
                (_, Some(pid)) => Some(StepHandle::Pid(pid)),
                (Some(unit), None) => Some(StepHandle::Unit(unit)),
                (None, None) => None,
            };
            InFlight {
                target: Target {
                    version: f.version,
                    store_path: f.store_path,
                },
                operation: f.operation,
                reference: f.reference,
                phase,
                step,
                previous_path: f.previous_path,
                previous_profile: f.previous_profile,
                failed_before: f.failed_before,
                started_at: f.started_at,
                fetched_at: f.fetched_at,
                activated_at: f.activated_at,
            }
        }
    }

    impl From<InFlight> for InFlightFile {
        fn from(f: InFlight) -> Self {
            let (phase, confirm_until, failure) = match f.phase {
                Phase::Fetch => (PhaseName::Fetch, None, None),
                Phase::Activate => (PhaseName::Activate, None, None),
                Phase::Confirm { until } => (PhaseName::Confirm, Some(until), None),
                Phase::Rollback { failure } => (PhaseName::Rollback, None, Some(failure)),
            };
            let (unit, pid) = match f.step {
                Some(StepHandle::Unit(u)) => (Some(u), None),
                Some(StepHandle::Pid(p)) => (None, Some(p)),
                None => (None, None),
            };
            InFlightFile {
                version: f.target.version,
                store_path: f.target.store_path,
                operation: f.operation,
                reference: f.reference,
                phase,
                unit,
                pid,
                previous_path: f.previous_path,
                previous_profile: f.previous_profile,
                failed_before: f.failed_before,
                confirm_until,
                failure,
                started_at: f.started_at,
                fetched_at: f.fetched_at,
                activated_at: f.activated_at,
            }
        }
    }

    #[derive(Serialize, Deserialize)]
    pub(super) struct RebootRequestFile {
        system: String,
        boot_id: String,
        at: Timestamp,
    }

    #[derive(Default, Serialize, Deserialize)]
    pub(super) struct StateFile {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        running: Option<Target>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        desired: Option<Target>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_check: Option<Check>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_deploy: Option<Deploy>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        in_flight: Option<InFlightFile>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pending_boot: Option<PendingBoot>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        failures: Option<Failures>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        login: Option<Login>,
        #[serde(default)]
        deploys: u64,
        #[serde(default)]
        counters: Counters,
        #[serde(default)]
        consecutive_failures: u32,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        quarantined: Vec<Quarantined>,
        #[serde(default)]
        reboot_required: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reboot_planned: Option<Timestamp>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reboot_request: Option<RebootRequestFile>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_reboot: Option<LastReboot>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fleet_release: Option<Ending>,
        #[serde(default)]
        status: String,
    }

    impl From<StateFile> for State {
        fn from(f: StateFile) -> Self {
            let request = f.reboot_request.map(|r| RebootRequest {
                system: r.system,
                boot_id: r.boot_id,
                at: r.at,
                awaiting: None,
            });
            let lifecycle = match (f.in_flight, f.pending_boot, request) {
                // An agent before the lifecycle enum could leave a reboot request beside a
                // rollback it started after the reboot; the deploy matters, the request was only
                // bookkeeping.
                (Some(deploy), awaiting, _) => Lifecycle::Deploying {
                    deploy: deploy.into(),
                    awaiting,
                },
                (None, awaiting, Some(request)) => Lifecycle::Rebooting(RebootRequest {
                    awaiting,
                    ..request
                }),
                (None, Some(pending), None) => Lifecycle::AwaitingBoot(pending),
                (None, None, None) => Lifecycle::Steady,
            };
            State {
                running: f.running,
                desired: f.desired,
                last_check: f.last_check,
                last_deploy: f.last_deploy,
                lifecycle,
                failures: f.failures,
                login: f.login,
                deploys: f.deploys,
                counters: f.counters,
                consecutive_failures: f.consecutive_failures,
                quarantined: f.quarantined,
                reboot_required: f.reboot_required,
                reboot_planned: f.reboot_planned,
                last_reboot: f.last_reboot,
                fleet_release: f.fleet_release,
                status: f.status,
            }
        }
    }

    impl From<State> for StateFile {
        fn from(s: State) -> Self {
            let (in_flight, pending_boot, reboot_request) = match s.lifecycle {
                Lifecycle::Steady => (None, None, None),
                Lifecycle::Deploying { deploy, awaiting } => (Some(deploy.into()), awaiting, None),
                Lifecycle::AwaitingBoot(p) => (None, Some(p), None),
                Lifecycle::Rebooting(r) => (
                    None,
                    r.awaiting,
                    Some(RebootRequestFile {
                        system: r.system,
                        boot_id: r.boot_id,
                        at: r.at,
                    }),
                ),
            };
            StateFile {
                running: s.running,
                desired: s.desired,
                last_check: s.last_check,
                last_deploy: s.last_deploy,
                in_flight,
                pending_boot,
                failures: s.failures,
                login: s.login,
                deploys: s.deploys,
                counters: s.counters,
                consecutive_failures: s.consecutive_failures,
                quarantined: s.quarantined,
                reboot_required: s.reboot_required,
                reboot_planned: s.reboot_planned,
                reboot_request,
                last_reboot: s.last_reboot,
                fleet_release: s.fleet_release,
                status: s.status,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deploy(phase: Phase) -> InFlight {
        InFlight {
            target: Target {
                version: "0.1.2".into(),
                store_path: "/nix/store/x".into(),
            },
            operation: Operation::Switch,
            reference: "o/f/=0.1.2#a".into(),
            phase,
            step: Some(StepHandle::Unit("hcloud-nixos-activate-1.service".into())),
            previous_path: None,
            previous_profile: None,
            failed_before: vec!["x.service".into()],
            started_at: now(),
            fetched_at: None,
            activated_at: None,
        }
    }

    #[test]
    fn round_trips_and_is_root_only() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        assert_eq!(State::load(&state_dir).unwrap(), State::default());
        for lifecycle in [
            Lifecycle::Steady,
            Lifecycle::Deploying {
                deploy: deploy(Phase::Activate),
                awaiting: None,
            },
            Lifecycle::Deploying {
                deploy: deploy(Phase::Confirm { until: now() }),
                awaiting: None,
            },
            Lifecycle::Deploying {
                deploy: deploy(Phase::Rollback {
                    failure: "exit 4".into(),
                }),
                awaiting: None,
            },
            Lifecycle::Rebooting(RebootRequest {
                system: "/nix/store/s".into(),
                boot_id: "b1".into(),
                at: now(),
                awaiting: Some(PendingBoot {
                    version: "0.1.3".into(),
                    store_path: "/nix/store/p".into(),
                    previous_profile: None,
                    boot_id: "b1".into(),
                    at: now(),
                }),
            }),
        ] {
            let state = State {
                lifecycle,
                deploys: 3,
                ..Default::default()
            };
            state.save(&state_dir).unwrap();
            assert_eq!(State::load(&state_dir).unwrap(), state);
        }
        assert_eq!(
            std::fs::metadata(State::path(&state_dir)).unwrap().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn reads_the_file_an_earlier_agent_wrote() {
        // As the agent before the lifecycle enum wrote it, in the middle of a confirmation,
        // with a boot release still pending.
        let text = r#"{
          "in_flight": {"version": "0.1.2", "store_path": "/nix/store/x", "operation": "switch",
            "reference": "o/f/=0.1.2#a", "phase": "confirm", "unit": "u.service",
            "confirm_until": "2026-11-30T03:06:51Z", "started_at": "2026-11-30T03:05:00Z"},
          "pending_boot": {"version": "0.1.1", "store_path": "/nix/store/p", "boot_id": "b",
            "at": "2026-11-29T00:00:00Z"},
          "deploys": 4, "status": "confirming 0.1.2"
        }"#;
        let state: State = serde_json::from_str(text).unwrap();
        let Lifecycle::Deploying { deploy, awaiting } = &state.lifecycle else {
            panic!("{state:?}")
        };
        assert_eq!(
            deploy.phase,
            Phase::Confirm {
                until: "2026-11-30T03:06:51Z".parse().unwrap()
            }
        );
        assert_eq!(deploy.step, Some(StepHandle::Unit("u.service".into())));
        assert_eq!(awaiting.as_ref().unwrap().version, "0.1.1");
        // And writes it back in the same layout.
        let back: serde_json::Value = serde_json::to_value(&state).unwrap();
        assert_eq!(back["in_flight"]["phase"], "confirm");
        assert_eq!(back["in_flight"]["confirm_until"], "2026-11-30T03:06:51Z");
        assert_eq!(back["pending_boot"]["version"], "0.1.1");
        assert!(back.get("lifecycle").is_none());
    }

    #[test]
    fn corrupt_state_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(State::path(dir.path()), "{not json").unwrap();
        let e = State::load(dir.path()).unwrap_err();
        assert!(format!("{e:#}").contains("move it away"));
    }

    #[test]
    fn locks_keep_two_agents_apart() {
        let dir = tempfile::tempdir().unwrap();
        let first = take_lock(dir.path(), false).unwrap();
        assert!(first.is_some());
        assert!(take_lock(dir.path(), false).unwrap().is_none());
        drop(first);
        assert!(take_lock(dir.path(), false).unwrap().is_some());
    }
}

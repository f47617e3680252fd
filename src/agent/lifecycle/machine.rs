//! The deploy lifecycle's transitions and decisions as pure functions: each transition says where
//! it may start from and refuses the rest, and what a deploy leaves in the record.

use std::time::Duration;

use jiff::Timestamp;

use super::state::{
    Deploy, Failures, InFlight, Lifecycle, Outcome as Recorded, PendingBoot, Phase, Quarantined,
    RebootRequest, State, StepHandle, Target,
};
use crate::agent::config::Operation;

/// How many quarantined store paths are remembered.
const QUARANTINE_KEEP: usize = 20;

/// A transition the lifecycle does not allow from where it stands: a bug, said as such.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the deploy lifecycle cannot {transition} while {from} (a bug in hcloud-nixos)")]
pub(crate) struct Illegal {
    /// What was asked.
    pub(crate) transition: &'static str,
    /// Where the lifecycle stood.
    pub(crate) from: String,
}

impl Lifecycle {
    /// Where it stands, for messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            Lifecycle::Steady => "steady".into(),
            Lifecycle::Deploying { deploy, .. } => format!("deploying ({})", deploy.phase.name()),
            Lifecycle::AwaitingBoot(_) => "awaiting a boot".into(),
            Lifecycle::Rebooting(_) => "rebooting".into(),
        }
    }

    fn illegal(&self, transition: &'static str) -> Illegal {
        Illegal {
            transition,
            from: self.describe(),
        }
    }

    /// A new deploy starts at `fetch`: from steady, or superseding a release that awaits its boot
    /// (it is the boot default again if the new deploy does not complete).
    pub(crate) fn begin(self, deploy: InFlight) -> Result<Lifecycle, Illegal> {
        if deploy.phase != Phase::Fetch || deploy.step.is_some() {
            return Err(self.illegal("begin a deploy anywhere but at fetch"));
        }
        match self {
            Lifecycle::Steady => Ok(Lifecycle::Deploying {
                deploy,
                awaiting: None,
            }),
            Lifecycle::AwaitingBoot(pending) => Ok(Lifecycle::Deploying {
                deploy,
                awaiting: Some(pending),
            }),
            other => Err(other.illegal("begin a deploy")),
        }
    }

    /// A release applied with `operation = "boot"` failed after the reboot: going back to the
    /// boot default before it, from steady (the pending release was taken out to be checked).
    pub(crate) fn begin_boot_rollback(self, deploy: InFlight) -> Result<Lifecycle, Illegal> {
        let fits = deploy.operation == Operation::Boot
            && matches!(deploy.phase, Phase::Rollback { .. })
            && deploy.step.is_none();
        match self {
            Lifecycle::Steady if fits => Ok(Lifecycle::Deploying {
                deploy,
                awaiting: None,
            }),
            other => Err(other.illegal("roll back a boot release")),
        }
    }

    /// Moves the deploy under way to `phase` (or starts its phase's step again), forgetting the
    /// step of the phase before, and noting `now` as the end of the fetch or the activation.
    /// Forward only: fetch, activate, confirm; rollback from activate or confirm; a phase to
    /// itself.
    pub(crate) fn enter(self, phase: Phase, now: Timestamp) -> Result<Lifecycle, Illegal> {
        let Lifecycle::Deploying {
            mut deploy,
            awaiting,
        } = self
        else {
            return Err(self.illegal("move a deploy to another phase"));
        };
        let allowed = matches!(
            (&deploy.phase, &phase),
            (Phase::Fetch, Phase::Fetch | Phase::Activate)
                | (
                    Phase::Activate,
                    Phase::Activate | Phase::Confirm { .. } | Phase::Rollback { .. }
                )
                | (Phase::Confirm { .. }, Phase::Rollback { .. })
                | (Phase::Rollback { .. }, Phase::Rollback { .. })
        );
        if !allowed {
            return Err(Illegal {
                transition: "move a deploy to that phase",
                from: format!(
                    "deploying ({}, asked for {})",
                    deploy.phase.name(),
                    phase.name()
                ),
            });
        }
        match (&deploy.phase, &phase) {
            (Phase::Fetch, Phase::Activate) => deploy.fetched_at = Some(now),
            (Phase::Activate, Phase::Confirm { .. }) => deploy.activated_at = Some(now),
            _ => {}
        }
        deploy.phase = phase;
        deploy.step = None;
        Ok(Lifecycle::Deploying { deploy, awaiting })
    }

    /// Writes down the step the deploy's phase has started (its unit or process).
    pub(crate) fn started_step(&mut self, handle: StepHandle) -> Result<(), Illegal> {
        match self {
            Lifecycle::Deploying { deploy, .. } => {
                deploy.step = Some(handle);
                Ok(())
            }
            other => Err(other.illegal("start a step")),
        }
    }

    /// The deploy under way was confirmed healthy: steady (a release that awaited its boot is
    /// superseded by the one that now runs).
    pub(crate) fn confirmed(self) -> Result<(InFlight, Lifecycle), Illegal> {
        match self {
            Lifecycle::Deploying { deploy, .. }
                if matches!(deploy.phase, Phase::Confirm { .. }) =>
            {
                Ok((deploy, Lifecycle::Steady))
            }
            other => Err(other.illegal("confirm a deploy")),
        }
    }

    /// The deploy under way ended without running (failed before activation, or rolled back):
    /// back to the release that awaits its boot, if this deploy superseded one, else steady.
    pub(crate) fn end_deploy(self) -> Result<(InFlight, Lifecycle), Illegal> {
        match self {
            Lifecycle::Deploying { deploy, awaiting } => Ok((
                deploy,
                awaiting.map_or(Lifecycle::Steady, Lifecycle::AwaitingBoot),
            )),
            other => Err(other.illegal("end a deploy")),
        }
    }

    /// A deploy with `operation = "boot"` was activated: the release awaits the next boot and
    /// supersedes the one that waited before.
    pub(crate) fn set_for_boot(self, boot_id: String, at: Timestamp) -> Result<Lifecycle, Illegal> {
        match self {
            Lifecycle::Deploying { deploy, .. }
                if deploy.operation == Operation::Boot && deploy.phase == Phase::Activate =>
            {
                Ok(Lifecycle::AwaitingBoot(PendingBoot {
                    version: deploy.target.version,
                    store_path: deploy.target.store_path,
                    previous_profile: deploy.previous_profile,
                    boot_id,
                    at,
                }))
            }
            other => Err(other.illegal("set a release for the next boot")),
        }
    }

    /// After a reboot (another boot id), the release that awaited it is taken out to be checked.
    pub(crate) fn take_booted(self, boot_id: &str) -> (Lifecycle, Option<PendingBoot>) {
        match self {
            Lifecycle::AwaitingBoot(p) if p.boot_id != boot_id => (Lifecycle::Steady, Some(p)),
            other => (other, None),
        }
    }

    /// A reboot is asked for: from steady, or for a release that awaits its boot.
    pub(crate) fn request_reboot(
        self,
        system: String,
        boot_id: String,
        at: Timestamp,
    ) -> Result<Lifecycle, Illegal> {
        let awaiting = match self {
            Lifecycle::Steady => None,
            Lifecycle::AwaitingBoot(p) => Some(p),
            other => return Err(other.illegal("ask for a reboot")),
        };
        Ok(Lifecycle::Rebooting(RebootRequest {
            system,
            boot_id,
            at,
            awaiting,
        }))
    }

    /// The reboot did not happen after all (inhibited, failed, the fleet said no).
    pub(crate) fn reboot_abandoned(self) -> Result<Lifecycle, Illegal> {
        match self {
            Lifecycle::Rebooting(r) => Ok(r
                .awaiting
                .map_or(Lifecycle::Steady, Lifecycle::AwaitingBoot)),
            other => Err(other.illegal("abandon a reboot")),
        }
    }

    /// After the reboot the agent asked for (another boot id): the request is done with, and a
    /// release that awaited this boot awaits its check.
    pub(crate) fn take_reboot(self, boot_id: &str) -> (Lifecycle, Option<RebootRequest>) {
        match self {
            Lifecycle::Rebooting(r) if r.boot_id != boot_id => {
                let next = r
                    .awaiting
                    .clone()
                    .map_or(Lifecycle::Steady, Lifecycle::AwaitingBoot);
                (next, Some(r))
            }
            other => (other, None),
        }
    }
}

/// What to do about a resolved release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    UpToDate,
    Apply,
    /// Quarantined, or failed `retry_limit` times before activation.
    Hold {
        reason: String,
    },
    /// Too young: wait until then.
    Wait {
        /// `None`: the release's age cannot be told.
        until: Option<Timestamp>,
    },
}

/// Compares the desired release with the running system, the quarantine, past failures and the
/// release's age.
pub(crate) fn decide(
    desired: &Target,
    current: Option<&str>,
    state: &State,
    retry_limit: u32,
    published_at: Option<Timestamp>,
    min_release_age: Duration,
    now: Timestamp,
) -> Decision {
    // The quarantine first: after a rollback that could not switch back, the failed release is
    // what runs, and it must not be called up to date.
    if let Some(q) = state
        .quarantined
        .iter()
        .find(|q| q.store_path == desired.store_path)
    {
        return Decision::Hold {
            reason: q.reason.clone(),
        };
    }
    if current == Some(desired.store_path.as_str()) {
        return Decision::UpToDate;
    }
    if let Some(f) = &state.failures
        && f.store_path == desired.store_path
        && f.count >= retry_limit
    {
        return Decision::Hold {
            reason: format!("failed {} times: {}", f.count, f.last_error),
        };
    }
    if !min_release_age.is_zero() {
        // A release whose age cannot be told is not applied early.
        let ready = published_at.and_then(|p| p.checked_add(min_release_age).ok());
        match ready {
            Some(ready) if ready <= now => {}
            // To the second, as the status shows it.
            Some(ready) => {
                let until = Timestamp::from_second(ready.as_second()).unwrap_or(ready);
                return Decision::Wait { until: Some(until) };
            }
            None => return Decision::Wait { until: None },
        }
    }
    Decision::Apply
}

/// `now` plus `d`, or the end of time (no deadline can overflow).
pub(crate) fn later(now: Timestamp, d: Duration) -> Timestamp {
    now.checked_add(d).unwrap_or(Timestamp::MAX)
}

impl State {
    /// Moves the lifecycle by `f`; a refused transition leaves it where it stood.
    pub(crate) fn transition(
        &mut self,
        f: impl FnOnce(Lifecycle) -> Result<Lifecycle, Illegal>,
    ) -> Result<(), Illegal> {
        self.lifecycle = f(self.lifecycle.clone())?;
        Ok(())
    }

    /// Moves the lifecycle by `f`, which also hands something out (the deploy that ended); a
    /// refused transition leaves it where it stood.
    pub(crate) fn transition_with<T>(
        &mut self,
        f: impl FnOnce(Lifecycle) -> Result<(T, Lifecycle), Illegal>,
    ) -> Result<T, Illegal> {
        let (out, next) = f(self.lifecycle.clone())?;
        self.lifecycle = next;
        Ok(out)
    }

    /// Records a finished deploy (taken out of the lifecycle by [`Lifecycle::end_deploy`] or
    /// rebuilt from a pending boot): the record, the counters, the running release on success,
    /// the failure count on failure.
    pub(crate) fn record(&mut self, f: &InFlight, error: Option<String>, now: Timestamp) {
        self.last_deploy = Some(Deploy {
            version: f.target.version.clone(),
            store_path: f.target.store_path.clone(),
            previous_path: f.previous_path.clone(),
            operation: f.operation,
            started_at: f.started_at,
            fetched_at: f.fetched_at,
            activated_at: f.activated_at,
            finished_at: now,
            outcome: if error.is_none() {
                Recorded::Success
            } else {
                Recorded::Failed
            },
            error: error.clone(),
        });
        self.deploys = self.deploys.saturating_add(1);
        match error {
            None => {
                self.counters.deploys_succeeded = self.counters.deploys_succeeded.saturating_add(1);
                self.running = Some(f.target.clone());
                self.failures = None;
            }
            Some(error) => {
                self.counters.deploys_failed = self.counters.deploys_failed.saturating_add(1);
                let count = match &self.failures {
                    Some(prev) if prev.store_path == f.target.store_path => {
                        prev.count.saturating_add(1)
                    }
                    _ => 1,
                };
                self.failures = Some(Failures {
                    store_path: f.target.store_path.clone(),
                    version: f.target.version.clone(),
                    count,
                    last_error: error,
                });
            }
        }
    }

    /// Puts a store path in quarantine (newest first, a bounded list).
    pub(crate) fn quarantine(&mut self, target: &Target, reason: &str, now: Timestamp) {
        self.quarantined
            .retain(|q| q.store_path != target.store_path);
        self.quarantined.insert(
            0,
            Quarantined {
                version: target.version.clone(),
                store_path: target.store_path.clone(),
                reason: reason.to_string(),
                at: now,
            },
        );
        self.quarantined.truncate(QUARANTINE_KEEP);
    }

    /// Is this store path quarantined?
    pub(crate) fn is_quarantined(&self, store_path: &str) -> bool {
        self.quarantined.iter().any(|q| q.store_path == store_path)
    }

    /// A quarantine ends when a different release appears: only `desired`'s stays. True when
    /// some ended.
    pub(crate) fn lift_quarantines_except(&mut self, desired: &Target) -> bool {
        let before = self.quarantined.len();
        self.quarantined
            .retain(|q| q.store_path == desired.store_path);
        self.quarantined.len() < before
    }
}

#[cfg(test)]
mod tests;

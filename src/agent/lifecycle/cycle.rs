//! One cycle of the agent, in order: settle a reboot the agent asked for, check a release that
//! awaited that boot, hand back a fleet slot left over, carry on with a deploy an earlier agent
//! started, or resolve the reference, decide and deploy; then reboots by policy, the status line
//! and the record.

use std::time::Duration;

use super::drive::{drive, roll_back_pending_boot};
use super::host::{Host, Link, Turn};
use super::machine::{Decision, decide, later};
use super::outcome::Outcome;
use super::state::{Check, InFlight, LastReboot, Lifecycle, Phase, State, Target};
use crate::agent::config::Operation;
use crate::agent::flakeref::FlakeRef;
use crate::agent::hooks;
use crate::fleet::{Ending, Purpose};

/// The longest status line kept, in characters.
pub(crate) const STATUS_MAX: usize = 1000;

/// Status lines as the cycle works ("applying 0.1.43").
pub(crate) type Report<'a> = &'a (dyn Fn(&str) + Sync);

/// Runs one cycle on `state` (read by the caller under the state lock) and writes it down.
/// Returns how it ended and the hook events to run once the lock is given back.
pub(crate) async fn cycle<H: Host>(
    host: &H,
    state: &mut State,
    report: Report<'_>,
) -> (Outcome, Vec<hooks::Event>) {
    let before = state.clone();
    let outcome = cycle_inner(host, state, report).await;
    let mut events = outcome.events(state);
    let reboot_note = if state.in_flight().is_none() {
        crate::agent::reboot::orchestrate::reboots(host, state, &mut events).await
    } else {
        None
    };
    let running = running_version(host, state);
    let mut status = outcome.status_line(running.as_deref());
    if let Some(note) = reboot_note {
        status = format!("{status}; {note}");
    }
    // One line: it goes to STATUS=, the log, the state file and `status`, and carries text
    // from programs (a health check's last line).
    state.status = crate::plumbing::text::one_line(&status, STATUS_MAX);
    state.consecutive_failures = if outcome.failed() {
        state.consecutive_failures.saturating_add(1)
    } else {
        0
    };
    state.last_check = Some(Check {
        at: host.now(),
        ok: !matches!(
            outcome,
            Outcome::Failed { target: None, .. } | Outcome::Busy(_)
        ),
        message: state.status.clone(),
    });
    // An idle poll that found what the one before found writes nothing but its time.
    let written = if state.changed_since(&before) {
        host.persist(state)
    } else {
        host.note_check(state)
    };
    if let Err(e) = written {
        tracing::error!(error = %e, "cannot record the state");
    }
    (outcome, events)
}

/// The version of what runs, when we know it.
pub(crate) fn running_version<H: Host>(host: &H, state: &State) -> Option<String> {
    let current = host.link(Link::Current)?;
    state
        .running
        .as_ref()
        .filter(|t| t.store_path == current)
        .map(|t| t.version.clone())
}

async fn cycle_inner<H: Host>(host: &H, state: &mut State, report: Report<'_>) -> Outcome {
    settle_reboot(host, state);
    if let Some(outcome) = check_pending_boot(host, state, report).await {
        return outcome;
    }
    if let Some(ending) = state.fleet_release.clone() {
        match host.fleet_release_own(ending).await {
            Ok(()) => state.fleet_release = None,
            Err(e) => tracing::debug!("the fleet slot is still to be handed back: {e}"),
        }
    }
    if let Some(f) = state.in_flight() {
        tracing::info!("carrying on with the deploy an earlier agent process started");
        // The slot is ours again (a restarted agent finds it by its id); a deploy under way is
        // finished whatever the fleet says.
        let release = f.target.version.clone();
        let slot = match host.fleet_acquire(Purpose::Deploy { release }).await {
            Ok(Turn::Granted(slot)) => Some(slot),
            _ => None,
        };
        let outcome = drive(host, state, report).await;
        hand_back(host, state, slot, &outcome).await;
        return outcome;
    }
    let Some(flake) = host.settings().flake.clone() else {
        let why = host
            .why_idle()
            .map(|w| format!(": {w}"))
            .unwrap_or_default();
        return Outcome::Idle(format!(
            "no FlakeHub reference to follow{why} (set hcloud_nixos.flake in the user-data, or flake in the configuration)"
        ));
    };
    if let Some(blocked) = host.deploy_blocked() {
        return Outcome::check_failed(blocked, false);
    }
    if let Err(e) = host.login(state).await {
        return Outcome::check_failed(e, false);
    }
    let attr = match flake.attr_or_default(host.hostname()) {
        Ok(attr) => attr,
        Err(e) => return Outcome::check_failed(e, false),
    };
    let resolved = match host.resolve(&flake, &attr).await {
        Ok(r) => r,
        Err(e) => return Outcome::check_failed(e.to_string(), e.is_transient()),
    };
    let desired = Target {
        version: resolved.version.clone(),
        store_path: resolved.store_path.clone(),
    };
    state.desired = Some(desired.clone());
    if state.lift_quarantines_except(&desired) {
        tracing::info!(version = %desired.version, "a different release appeared; earlier quarantined releases may be tried again");
    }
    let settings = host.settings();
    let published = resolved.published_at;
    let decision = decide(
        &desired,
        host.system_at(settings.operation).as_deref(),
        state,
        settings.retry_limit,
        published,
        settings.min_release_age,
        host.now(),
    );
    match decision {
        Decision::UpToDate => {
            if state.running.as_ref() != Some(&desired) && settings.operation != Operation::Boot {
                state.running = Some(desired.clone());
            }
            Outcome::UpToDate(desired)
        }
        Decision::Hold { reason } => Outcome::Quarantined {
            target: desired,
            reason,
        },
        Decision::Wait { until } => Outcome::Waiting {
            target: desired,
            until,
        },
        Decision::Apply => {
            let reference = flake_reference(&flake, &resolved.version, &attr);
            start_deploy(host, state, desired, reference, report).await
        }
    }
}

fn flake_reference(flake: &FlakeRef, version: &str, attr: &str) -> String {
    flake.exact(version, attr)
}

/// A reboot the agent asked for: after it (another boot id), what was booted is recorded and a
/// release that awaited it is checked next; in the same boot it did not happen after all, and
/// the reboot policy decides again at the end of this cycle.
fn settle_reboot<H: Host>(host: &H, state: &mut State) {
    let this_boot = host.boot_id();
    let (lifecycle, done) = std::mem::take(&mut state.lifecycle).take_reboot(&this_boot);
    state.lifecycle = lifecycle;
    if let Some(req) = done {
        let booted = host.link(Link::Booted);
        let ok = booted.as_deref() == Some(req.system.as_str());
        if ok {
            tracing::info!(system = %req.system, "rebooted into the expected system");
        } else {
            tracing::error!(expected = %req.system, booted = booted.as_deref().unwrap_or("-"), "rebooted, but not into the expected system");
        }
        state.last_reboot = Some(LastReboot {
            at: host.now(),
            system: req.system,
            booted,
            ok,
        });
        state.reboot_planned = None;
    } else if matches!(state.lifecycle, Lifecycle::Rebooting(_)) {
        tracing::warn!("the reboot the agent asked for has not happened; deciding again");
        let _ = state.transition(Lifecycle::reboot_abandoned);
    }
}

/// After a reboot, checks a release that was applied with `operation = "boot"`: the booted
/// system must be it and healthy; if not, the previous boot default is restored.
async fn check_pending_boot<H: Host>(
    host: &H,
    state: &mut State,
    report: Report<'_>,
) -> Option<Outcome> {
    let (lifecycle, pending) = std::mem::take(&mut state.lifecycle).take_booted(&host.boot_id());
    state.lifecycle = lifecycle;
    let pending = pending?;
    let target = Target {
        version: pending.version.clone(),
        store_path: pending.store_path.clone(),
    };
    report(&format!("checking {} after the reboot", pending.version));
    let booted = host.link(Link::Booted);
    let f = InFlight {
        target: target.clone(),
        operation: Operation::Boot,
        reference: String::new(),
        phase: Phase::Fetch,
        step: None,
        previous_path: booted.clone(),
        previous_profile: pending.previous_profile.clone(),
        failed_before: Vec::new(),
        started_at: pending.at,
        fetched_at: None,
        activated_at: None,
    };
    let verdict = if booted.as_deref() != Some(pending.store_path.as_str()) {
        Err(format!(
            "the booted system is {}, not the new release",
            booted.as_deref().unwrap_or("unknown")
        ))
    } else {
        let until = later(host.now(), host.settings().confirm_timeout);
        super::drive::confirm(host, &[], until).await
    };
    Some(match verdict {
        Ok(()) => {
            tracing::info!(version = %pending.version, "booted into the new release and it is healthy");
            state.record(&f, None, host.now());
            Outcome::Deployed(target)
        }
        Err(e) => {
            tracing::error!(version = %pending.version, error = %e, "the new release failed after the reboot; restoring the previous boot default");
            roll_back_pending_boot(host, state, f, e, report).await
        }
    })
}

/// A new release is to be deployed: unless someone else is switching, or the fleet says not now,
/// the deploy starts at fetch and is driven to its end.
async fn start_deploy<H: Host>(
    host: &H,
    state: &mut State,
    desired: Target,
    reference: String,
    report: Report<'_>,
) -> Outcome {
    if let Some(who) = host.someone_switching() {
        return Outcome::Busy(who);
    }
    // The fleet cannot be asked: nothing was started, so no deploy failed (no target, no
    // deploy hook); it is a failed check that backs off.
    if let Some(problem) = host.fleet_problem() {
        return Outcome::check_failed(
            format!("fleet: {problem}; nothing is deployed until it can be asked"),
            true,
        );
    }
    let slot = if host.in_fleet() {
        let purpose = Purpose::Deploy {
            release: desired.version.clone(),
        };
        match host.fleet_acquire(purpose).await {
            Ok(Turn::Granted(slot)) => Some(slot),
            Ok(Turn::Paused(line)) => {
                return Outcome::FleetPaused {
                    line,
                    target: desired,
                };
            }
            Ok(Turn::Waiting(line)) => return Outcome::FleetWaiting(line),
            Err(e) => {
                return Outcome::check_failed(
                    format!(
                        "fleet: {e}; {} is not deployed until it can be asked",
                        desired.version
                    ),
                    e.unreachable(),
                );
            }
        }
    } else {
        None
    };
    let operation = host.settings().operation;
    let failed_before = if operation == Operation::Boot {
        Vec::new()
    } else {
        host.failed_units().await
    };
    let deploy = InFlight {
        target: desired.clone(),
        operation,
        reference,
        phase: Phase::Fetch,
        step: None,
        previous_path: host.link(Link::Current),
        previous_profile: host.link(Link::Profile),
        failed_before,
        started_at: host.now(),
        fetched_at: None,
        activated_at: None,
    };
    tracing::info!(
        version = %desired.version,
        store_path = %desired.store_path,
        operation = operation.as_str(),
        already_failed = deploy.failed_before.len(),
        "deploying a new release"
    );
    if let Err(e) = state.transition(|l| l.begin(deploy)) {
        return Outcome::check_failed(e.to_string(), false);
    }
    let outcome = drive(host, state, report).await;
    hand_back(host, state, slot, &outcome).await;
    outcome
}

/// Hands a fleet slot back once the deploy it was taken for has ended. A failed release is
/// reported (it pauses the group with `pause_on_failure`); a failed fetch only once it is
/// quarantined, since a passing fault should not stop the fleet. When the backend cannot be
/// reached, the ending is kept in the state and handed back at a later cycle.
async fn hand_back<H: Host>(host: &H, state: &mut State, slot: Option<H::Slot>, outcome: &Outcome) {
    let Some(slot) = slot else {
        return;
    };
    let ending = match outcome {
        Outcome::Deployed(t) => Ending::Deployed {
            release: t.version.clone(),
        },
        Outcome::RolledBack { target, error, .. } => Ending::Failed {
            release: target.version.clone(),
            reason: error.clone(),
        },
        Outcome::Failed {
            target: Some(t),
            error,
            ..
        } if state.is_quarantined(&t.store_path) => Ending::Failed {
            release: t.version.clone(),
            reason: error.clone(),
        },
        // The boot default is set; the reboot (by policy) takes the slot over, or it expires.
        Outcome::PendingReboot(_) => return,
        _ => Ending::Done,
    };
    if let Err(e) = host.fleet_release(slot, ending.clone()).await {
        tracing::warn!("cannot hand the fleet slot back yet: {e}");
        state.fleet_release = Some(ending);
    }
}

/// How long a health round may take before the next, while confirming.
pub(crate) const HEALTH_ROUND_PAUSE: Duration = Duration::from_secs(2);

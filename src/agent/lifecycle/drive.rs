//! Driving a deploy through its phases to an end: fetch (fh makes the closure the profile's new
//! generation), activate (switch-to-configuration, its exit status seen), confirm (health within
//! `confirm_timeout`), and on any failure after the fetch a rollback to what ran before. Each
//! step is written down before it starts; a step an earlier agent started is picked up, not
//! started again.

use jiff::Timestamp;

use super::cycle::{HEALTH_ROUND_PAUSE, Report};
use super::host::{Earlier, Host, Link, Unhealthy, unit_name};
use super::machine::{Illegal, later};
use super::outcome::Outcome;
use super::state::{InFlight, Lifecycle, Phase, State, StepHandle, Target};
use crate::agent::apply::{Finished, Step, StepKind};
use crate::agent::config::Operation;

/// What a phase leads to.
enum Next {
    /// Move to this phase.
    Enter(Phase),
    /// The phase's step left no trace: start it again (once per agent process).
    Again,
    /// The deploy ended.
    Done(Outcome),
}

fn illegal(target: &Target, e: Illegal) -> Outcome {
    tracing::error!("{e}");
    failed(Some(target.clone()), e.to_string())
}

fn failed(target: Option<Target>, error: String) -> Outcome {
    Outcome::Failed {
        target,
        error,
        transient: false,
    }
}

/// Drives the deploy under way through its phases to an end.
pub(super) async fn drive<H: Host>(host: &H, state: &mut State, report: Report<'_>) -> Outcome {
    // Each step that left no trace is started again, once per agent process.
    let mut restarted = false;
    loop {
        let Some(f) = state.in_flight().cloned() else {
            return failed(
                None,
                "no deploy under way to drive (a bug in hcloud-nixos)".into(),
            );
        };
        let next = match &f.phase {
            Phase::Fetch => fetch(host, state, &f, restarted, report).await,
            Phase::Activate => activate(host, state, &f, restarted, report).await,
            Phase::Confirm { until } => confirm_deploy(host, state, &f, *until, report).await,
            Phase::Rollback { .. } => {
                report(&format!("rolling back from {}", f.target.version));
                return roll_back(host, state, &mut restarted).await;
            }
        };
        let phase = match next {
            Next::Done(outcome) => return outcome,
            Next::Again => {
                restarted = true;
                let what = match f.phase {
                    Phase::Activate => "the activation",
                    _ => "the fetch step",
                };
                tracing::warn!("{what} was interrupted before it finished; starting it again");
                f.phase.clone()
            }
            Next::Enter(phase) => {
                restarted = false;
                if let Phase::Rollback { failure } = &phase {
                    tracing::error!(version = %f.target.version, error = %failure, "deploy failed; rolling back");
                }
                phase
            }
        };
        if let Err(e) = state.transition(|l| l.enter(phase, host.now())) {
            return illegal(&f.target, e);
        }
        if let Err(e) = host.persist(state) {
            return failed(Some(f.target.clone()), e);
        }
    }
}

async fn fetch<H: Host>(
    host: &H,
    state: &mut State,
    f: &InFlight,
    restarted: bool,
    report: Report<'_>,
) -> Next {
    report(&format!("fetching {}", f.target.version));
    let step = match host.fh() {
        Ok(fh) => Step::fetch(fh, &f.reference, &f.target.version),
        Err(e) => return Next::Done(fail_before_activation(host, state, e).await),
    };
    let result = run_step(host, state, &step).await;
    if host.link(Link::Profile).as_deref() == Some(f.target.store_path.as_str()) {
        return match host.check_release(&f.target.store_path, &f.target.version) {
            Err(refused) if host.settings().require_agent => {
                Next::Done(refuse_release(host, state, refused).await)
            }
            Err(refused) => {
                tracing::warn!(
                    "{refused}; deploying it anyway, as apply.require_agent = false asks"
                );
                Next::Enter(Phase::Activate)
            }
            Ok(()) => Next::Enter(Phase::Activate),
        };
    }
    let error = match result {
        Ok(None) if !restarted => return Next::Again,
        Err(e) => e,
        Ok(Some(done)) if !done.succeeded => format!("fh {}", done.detail),
        _ => "fh ended but the system profile is not the new release".into(),
    };
    // Nothing was activated: no rollback.
    Next::Done(fail_before_activation(host, state, error).await)
}

async fn activate<H: Host>(
    host: &H,
    state: &mut State,
    f: &InFlight,
    restarted: bool,
    report: Report<'_>,
) -> Next {
    report(&format!("applying {}", f.target.version));
    let operation = f.operation;
    let step = Step::switch(
        StepKind::Activate,
        &f.target.store_path,
        operation,
        &f.target.version,
    );
    let result = run_step(host, state, &step).await;
    let at_target = host.system_at(operation).as_deref() == Some(f.target.store_path.as_str());
    let failure = match (result, at_target) {
        (Ok(Some(done)), true) if done.succeeded => return activated(host, state, f),
        (Ok(None), true) => return activated(host, state, f),
        (Ok(None), false) if !restarted => return Next::Again,
        (Ok(Some(done)), _) if !done.succeeded => format!(
            "switch-to-configuration {} {}",
            operation.as_str(),
            done.detail
        ),
        (Err(e), _) => e,
        _ => format!(
            "activation failed: {} is not the new release",
            if operation == Operation::Boot {
                "the boot profile"
            } else {
                "the running system"
            }
        ),
    };
    Next::Enter(Phase::Rollback { failure })
}

/// The activation worked: confirm next, or with `operation = "boot"` the release awaits the
/// reboot (its check happens after it).
fn activated<H: Host>(host: &H, state: &mut State, f: &InFlight) -> Next {
    if f.operation != Operation::Boot {
        let until = later(host.now(), host.settings().confirm_timeout);
        return Next::Enter(Phase::Confirm { until });
    }
    let (boot_id, now) = (host.boot_id(), host.now());
    if let Err(e) = state.transition(|l| l.set_for_boot(boot_id, now)) {
        return Next::Done(illegal(&f.target, e));
    }
    tracing::info!(version = %f.target.version, "the new release is the boot default; it is checked after the next boot");
    Next::Done(Outcome::PendingReboot(f.target.clone()))
}

async fn confirm_deploy<H: Host>(
    host: &H,
    state: &mut State,
    f: &InFlight,
    until: Timestamp,
    report: Report<'_>,
) -> Next {
    report(&format!("confirming {}", f.target.version));
    match confirm(host, &f.failed_before, until).await {
        Ok(()) => {
            tracing::info!(version = %f.target.version, "deploy confirmed: the new release runs and is healthy");
            match state.transition_with(Lifecycle::confirmed) {
                Ok(deploy) => {
                    state.record(&deploy, None, host.now());
                    Next::Done(Outcome::Deployed(f.target.clone()))
                }
                Err(e) => Next::Done(illegal(&f.target, e)),
            }
        }
        Err(failure) => Next::Enter(Phase::Rollback { failure }),
    }
}

/// Runs the step of the deploy's current phase to its end: starts it (after writing down its
/// unit name), or picks it up when an earlier agent started it. `Ok(None)`: nothing is known of
/// how it ended (it left no trace); `Err`: it could not be run.
async fn run_step<H: Host>(
    host: &H,
    state: &mut State,
    step: &Step,
) -> Result<Option<Finished>, String> {
    let timeout = host.settings().apply_timeout;
    if let Some(handle) = state.in_flight().and_then(|f| f.step.clone()) {
        return match host.find_step(&handle, step).await? {
            Earlier::Running(running) => {
                tracing::info!(
                    step = step.kind.as_str(),
                    "a step started by an earlier agent is still running; waiting for it"
                );
                let finished = host.wait_step(running, timeout).await;
                host.forget_step(&handle).await;
                finished.map(Some)
            }
            Earlier::Finished(done) => {
                tracing::info!(step = step.kind.as_str(), result = %done.detail, "a step finished while the agent was away");
                host.forget_step(&handle).await;
                Ok(Some(done))
            }
            Earlier::Unknown => Ok(None),
        };
    }
    let unit = unit_name(step.kind, host.now());
    state
        .lifecycle
        .started_step(StepHandle::Unit(unit.clone()))
        .map_err(|e| e.to_string())?;
    host.persist(state)?;
    tracing::info!(step = step.kind.as_str(), unit = %unit, command = %step.argv.join(" "), "starting");
    let running = host.start_step(step, &unit).await?;
    let handle = host.step_handle(&running, &unit);
    if handle != StepHandle::Unit(unit.clone()) {
        // Direct mode: the process, so that a restarted agent waits for it.
        let _ = state.lifecycle.started_step(handle.clone());
        if let Err(e) = host.persist(state) {
            tracing::error!("{e}");
        }
    }
    let finished = host.wait_step(running, timeout).await;
    host.forget_step(&handle).await;
    finished.map(Some)
}

/// The fetch failed: nothing was activated. The profile is put back if fh changed it, the
/// failure is counted (the same store path is tried `retry_limit` times), and after that many
/// it is quarantined.
async fn fail_before_activation<H: Host>(host: &H, state: &mut State, error: String) -> Outcome {
    let f = match state.transition_with(Lifecycle::end_deploy) {
        Ok(f) => f,
        Err(e) => return failed(None, e.to_string()),
    };
    if let Some(previous) = &f.previous_profile
        && host.link(Link::Profile).as_deref() != Some(previous.as_str())
        && let Err(e) = host.set_profile(previous).await
    {
        tracing::error!(error = %e, "cannot set the system profile back");
    }
    tracing::error!(version = %f.target.version, error = %error, "deploy failed before activation; the system is unchanged");
    state.record(&f, Some(error.clone()), host.now());
    host.forget_login();
    let retry_limit = host.settings().retry_limit;
    if state
        .failures
        .as_ref()
        .is_some_and(|x| x.count >= retry_limit)
    {
        let reason = format!("fetching it failed {retry_limit} times: {error}");
        state.quarantine(&f.target, &reason, host.now());
    }
    Outcome::Failed {
        target: Some(f.target),
        error: format!("{error}; the system is unchanged"),
        transient: false,
    }
}

/// The fetched release would end deploys on this server (no agent in it): the profile is put
/// back, nothing is activated, and the release is quarantined at once (fetching it again would
/// not change it), with how to deploy it on purpose.
async fn refuse_release<H: Host>(host: &H, state: &mut State, refused: String) -> Outcome {
    let target = state.in_flight().map(|f| f.target.clone());
    let outcome = fail_before_activation(host, state, refused.clone()).await;
    let hint = crate::agent::release::OVERRIDE_HINT;
    if let Some(t) = &target
        && !state.is_quarantined(&t.store_path)
    {
        state.quarantine(t, &format!("{refused}; {hint}"), host.now());
    }
    tracing::error!("{refused}; {hint}");
    match outcome {
        Outcome::Failed { target, .. } => Outcome::Failed {
            target,
            error: format!("refused: {refused}; the system is unchanged"),
            transient: false,
        },
        other => other,
    }
}

/// Waits until every health condition holds, or `until` passes (then says what failed last).
pub(super) async fn confirm<H: Host>(
    host: &H,
    failed_before: &[String],
    until: Timestamp,
) -> Result<(), String> {
    loop {
        match host.health_round(failed_before).await {
            Ok(()) => return Ok(()),
            Err(Unhealthy::Final(why)) => return Err(why),
            Err(Unhealthy::Passing(why)) if host.now() >= until => {
                return Err(format!(
                    "not healthy within {}s: {why}",
                    host.settings().confirm_timeout.as_secs()
                ));
            }
            Err(Unhealthy::Passing(why)) => tracing::debug!(reason = %why, "not healthy yet"),
        }
        host.pause(HEALTH_ROUND_PAUSE).await;
    }
}

/// A release applied with `operation = "boot"` failed after the reboot: back to the boot
/// default before it, as a rollback deploy.
pub(super) async fn roll_back_pending_boot<H: Host>(
    host: &H,
    state: &mut State,
    mut f: InFlight,
    failure: String,
    report: Report<'_>,
) -> Outcome {
    let target = f.target.clone();
    f.phase = Phase::Rollback { failure };
    if let Err(e) = state.transition(|l| l.begin_boot_rollback(f)) {
        return illegal(&target, e);
    }
    report(&format!("rolling back from {}", target.version));
    roll_back(host, state, &mut false).await
}

/// How a rollback ended: recorded, quarantined, counted.
fn finish_rollback<H: Host>(
    host: &H,
    state: &mut State,
    ok: bool,
    detail: Option<String>,
) -> Outcome {
    let f = match state.transition_with(Lifecycle::end_deploy) {
        Ok(f) => f,
        Err(e) => return failed(None, e.to_string()),
    };
    let error = match &f.phase {
        Phase::Rollback { failure } => failure.clone(),
        _ => "the deploy failed".into(),
    };
    state.record(&f, Some(error.clone()), host.now());
    state.quarantine(&f.target, &error, host.now());
    if ok {
        state.counters.rollbacks_succeeded = state.counters.rollbacks_succeeded.saturating_add(1);
        state.running = state
            .running
            .clone()
            .filter(|r| Some(&r.store_path) == f.previous_path.as_ref());
    } else {
        state.counters.rollbacks_failed = state.counters.rollbacks_failed.saturating_add(1);
    }
    if let Some(d) = detail {
        tracing::error!(error = %d, "the rollback did not end healthy");
    }
    Outcome::RolledBack {
        target: f.target,
        error,
        rollback_ok: ok,
    }
}

/// Goes back to what ran before: the profile first, then the previous system's activation in
/// its own unit, then the same health checks. The failed store path is quarantined.
async fn roll_back<H: Host>(host: &H, state: &mut State, restarted: &mut bool) -> Outcome {
    loop {
        let Some(f) = state.in_flight().cloned() else {
            return failed(
                None,
                "no deploy under way to roll back (a bug in hcloud-nixos)".into(),
            );
        };
        let operation = f.operation;
        // What to go back to: the running system before (switch, test) or the boot default before.
        let back_to = match operation {
            Operation::Boot => f.previous_profile.clone(),
            _ => f.previous_path.clone(),
        };
        let Some(back_to) = back_to else {
            let why = "the system before the deploy is unknown; nothing to roll back to";
            return finish_rollback(host, state, false, Some(why.into()));
        };
        if f.step.is_none()
            && let Some(profile) = f.previous_profile.as_deref()
            && host.link(Link::Profile).as_deref() != Some(profile)
            && let Err(e) = host.set_profile(profile).await
        {
            tracing::error!(error = %e, "cannot set the system profile back");
        }
        let step = Step::switch(StepKind::Rollback, &back_to, operation, &f.target.version);
        let result = run_step(host, state, &step).await;
        let at_previous = host.system_at(operation).as_deref() == Some(back_to.as_str());
        let detail = match (result, at_previous) {
            (Ok(None), false) if !*restarted => {
                *restarted = true;
                tracing::warn!(
                    "the rollback was interrupted before it finished; starting it again"
                );
                let again = f.phase.clone();
                if let Err(e) = state.transition(|l| l.enter(again, host.now())) {
                    return illegal(&f.target, e);
                }
                if let Err(e) = host.persist(state) {
                    return failed(Some(f.target.clone()), e);
                }
                continue;
            }
            (Ok(Some(done)), _) if !done.succeeded => {
                Some(format!("switch-to-configuration {}", done.detail))
            }
            (Err(e), _) => Some(e),
            (_, false) => Some("the previous system is not running after the rollback".into()),
            _ => None,
        };
        if let Some(detail) = detail {
            return finish_rollback(host, state, false, Some(detail));
        }
        if operation == Operation::Boot {
            return finish_rollback(host, state, true, None);
        }
        let until = later(host.now(), host.settings().confirm_timeout);
        return match confirm(host, &f.failed_before, until).await {
            Ok(()) => {
                tracing::info!(version = %f.target.version, "rolled back; the previous system runs and is healthy");
                finish_rollback(host, state, true, None)
            }
            Err(e) => finish_rollback(host, state, false, Some(e)),
        };
    }
}

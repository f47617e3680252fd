//! One deploy cycle: resolve the reference, compare with the running system, apply, verify, record.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use nix::fcntl::{Flock, FlockArg};

use crate::apply::{self, Applier, Found};
use crate::config::{Operation, Settings};
use crate::flakehub::{self, Resolved};
use crate::login;
use crate::state::{self, Deploy, Failures, InFlight, Outcome as Recorded, State, Target};

/// Everything a cycle needs besides the state.
pub struct Context {
    pub settings: Settings,
    /// This server's hostname, for references without `#attr`.
    pub hostname: String,
    pub flakehub: flakehub::Client,
    pub applier: Applier,
    pub login: login::Method,
    /// Whether this context has checked the login yet. A new context (at start, after SIGHUP)
    /// checks it once, and so does the cycle after a failed deploy; a poll does not.
    pub login_checked: AtomicBool,
    /// Why there is no reference to follow (from loading the user-data), for the status.
    pub why_no_reference: Option<String>,
}

/// How a cycle ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to follow: no reference configured.
    Idle(String),
    UpToDate(Target),
    Deployed(Target),
    /// Could not check or deploy; `transient` failures (network, FlakeHub) are retried sooner.
    Failed {
        target: Option<Target>,
        error: String,
        transient: bool,
    },
    /// This store path failed `attempts` times; it is not tried again until another appears.
    GivenUp {
        target: Target,
        attempts: u32,
        error: String,
    },
    /// Someone else is switching the system right now.
    Busy(String),
}

impl Outcome {
    /// The system is where it should be (or nothing is asked of it).
    pub fn ok(&self) -> bool {
        matches!(
            self,
            Outcome::Idle(_) | Outcome::UpToDate(_) | Outcome::Deployed(_)
        )
    }

    /// The one line an operator reads in `systemctl status`.
    pub fn status_line(&self, running: Option<&str>) -> String {
        let running = running
            .map(|v| format!("; running {v}"))
            .unwrap_or_default();
        match self {
            Outcome::Idle(why) => format!("idle: {why}"),
            Outcome::UpToDate(t) => format!("up to date: {}", t.version),
            Outcome::Deployed(t) => format!("up to date: {} (just deployed)", t.version),
            Outcome::Failed {
                target: Some(t),
                error,
                ..
            } => format!("deploy of {} failed: {error}{running}", t.version),
            Outcome::Failed {
                target: None,
                error,
                ..
            } => format!("check failed: {error}{running}"),
            Outcome::GivenUp {
                target,
                attempts,
                error,
            } => format!(
                "deploy of {} failed {attempts} times ({error}); waiting for a newer release{running}",
                target.version
            ),
            Outcome::Busy(why) => format!("waiting: {why}{running}"),
        }
    }
}

/// What to do about a resolved release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    UpToDate,
    Apply,
    GiveUp { attempts: u32, error: String },
}

/// Pure: compare the desired store path with the running one and with past failures.
pub fn decide(
    desired: &Target,
    current: Option<&str>,
    failures: Option<&Failures>,
    retry_limit: u32,
) -> Decision {
    if current == Some(desired.store_path.as_str()) {
        return Decision::UpToDate;
    }
    match failures {
        Some(f) if f.store_path == desired.store_path && f.count >= retry_limit => {
            Decision::GiveUp {
                attempts: f.count,
                error: f.last_error.clone(),
            }
        }
        _ => Decision::Apply,
    }
}

/// The store path the system is at: the running system for switch and test, the profile (what
/// boots next) for boot.
pub fn system_path(settings: &Settings, operation: Operation) -> Option<String> {
    let link = match operation {
        Operation::Switch | Operation::Test => &settings.paths.current_system,
        Operation::Boot => &settings.paths.system_profile,
    };
    std::fs::canonicalize(link)
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// The version of what runs, when we know it.
pub fn running_version(state: &State, settings: &Settings) -> Option<String> {
    let current = system_path(settings, Operation::Switch)?;
    state
        .running
        .as_ref()
        .filter(|t| t.store_path == current)
        .map(|t| t.version.clone())
}

/// Records a deploy's result; clears the in-flight marker in the same write.
fn record(state: &mut State, in_flight: &InFlight, error: Option<String>) {
    let target = Target {
        version: in_flight.version.clone(),
        store_path: in_flight.store_path.clone(),
    };
    let outcome = if error.is_none() {
        Recorded::Success
    } else {
        Recorded::Failed
    };
    state.last_deploy = Some(Deploy {
        version: in_flight.version.clone(),
        store_path: in_flight.store_path.clone(),
        operation: in_flight.operation.clone(),
        started_at: in_flight.started_at.clone(),
        finished_at: state::now(),
        outcome,
        error: error.clone(),
    });
    state.deploys += 1;
    state.in_flight = None;
    match error {
        None => {
            state.running = Some(target);
            state.failures = None;
        }
        Some(error) => {
            let count = match &state.failures {
                Some(f) if f.store_path == in_flight.store_path => f.count + 1,
                _ => 1,
            };
            state.failures = Some(Failures {
                store_path: in_flight.store_path.clone(),
                version: in_flight.version.clone(),
                count,
                last_error: error,
            });
        }
    }
}

/// A lock that keeps two applies apart: this agent's and an operator's `agent --once`.
fn take_lock(run_dir: &Path) -> Result<Option<Flock<File>>> {
    crate::files::create_dir_all_mode(run_dir, 0o700)?;
    let path = run_dir.join("apply.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
}

/// Is someone running `switch-to-configuration` by hand right now (it holds this lock)?
fn switch_in_progress(lock: &Path) -> bool {
    let Ok(file) = File::open(lock) else {
        return false;
    };
    matches!(
        Flock::lock(file, FlockArg::LockSharedNonblock),
        Err((_, nix::errno::Errno::EWOULDBLOCK))
    )
}

/// The PID of an `fh apply nixos` someone else is running, if any (an operator by hand).
fn fh_apply_running() -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            is_fh_apply(&cmdline)
        })
}

/// Is this NUL-separated command line `fh apply nixos ...` (maybe behind an interpreter)?
fn is_fh_apply(cmdline: &[u8]) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(3).any(|w| {
        let name = w[0].rsplit(|b| *b == b'/').next().unwrap_or_default();
        name == b"fh" && w[1] == b"apply" && w[2] == b"nixos"
    })
}

/// Runs one cycle. `report` receives status lines while it works ("applying 0.1.43").
pub async fn cycle(ctx: &Context, state: &mut State, report: &(dyn Fn(&str) + Sync)) -> Outcome {
    let outcome = cycle_inner(ctx, state, report).await;
    let running = running_version(state, &ctx.settings);
    state.status = outcome.status_line(running.as_deref());
    let ok = !matches!(
        outcome,
        Outcome::Failed { target: None, .. } | Outcome::Busy(_)
    );
    state.last_check = Some(state::Check {
        at: state::now(),
        ok,
        message: state.status.clone(),
    });
    if let Err(e) = state.save(&ctx.settings.paths.state_dir) {
        tracing::error!(error = %format!("{e:#}"), "cannot record the state");
    }
    outcome
}

async fn cycle_inner(ctx: &Context, state: &mut State, report: &(dyn Fn(&str) + Sync)) -> Outcome {
    let settings = &ctx.settings;
    let failed = |target: Option<Target>, error: String, transient: bool| Outcome::Failed {
        target,
        error,
        transient,
    };
    let Some(_lock) = (match take_lock(&settings.paths.run_dir) {
        Ok(lock) => lock,
        Err(e) => return failed(None, format!("{e:#}"), false),
    }) else {
        return Outcome::Busy("another hcloud-nixos apply is running".into());
    };

    if let Some(in_flight) = state.in_flight.clone()
        && let Some(outcome) = finish_in_flight(ctx, state, &in_flight, report).await
    {
        return outcome;
    }

    let Some(flake) = &settings.flake else {
        let why = ctx
            .why_no_reference
            .as_deref()
            .map(|w| format!(": {w}"))
            .unwrap_or_default();
        return Outcome::Idle(format!(
            "no FlakeHub reference to follow{why} (set hcloud_nixos.flake in the user-data, or flake in the configuration)"
        ));
    };
    if let Some(token) = &settings.token
        && !ctx.login_checked.load(Ordering::Relaxed)
    {
        match login::ensure(&ctx.login, token.secret(), &settings.paths.run_dir, state).await {
            Ok(true) => tracing::info!(token_from = %token.origin(), "logged in to FlakeHub"),
            Ok(false) => tracing::debug!("already logged in to FlakeHub"),
            Err(e) => return failed(None, format!("FlakeHub login: {e:#}"), false),
        }
        ctx.login_checked.store(true, Ordering::Relaxed);
    }
    let attr = flake.attr_or_default(&ctx.hostname);
    let resolved: Resolved = match ctx.flakehub.resolve(flake, &attr).await {
        Ok(r) => r,
        Err(e) => {
            let transient = e.is_transient();
            return failed(None, e.to_string(), transient);
        }
    };
    let desired = Target {
        version: resolved.version.clone(),
        store_path: resolved.store_path.clone(),
    };
    state.desired = Some(desired.clone());
    let current = system_path(settings, settings.operation);
    match decide(
        &desired,
        current.as_deref(),
        state.failures.as_ref(),
        settings.retry_limit,
    ) {
        Decision::UpToDate => {
            if state.running.as_ref() != Some(&desired) {
                state.running = Some(desired.clone());
            }
            Outcome::UpToDate(desired)
        }
        Decision::GiveUp { attempts, error } => Outcome::GivenUp {
            target: desired,
            attempts,
            error,
        },
        Decision::Apply => {
            if switch_in_progress(&settings.paths.switch_lock) {
                return Outcome::Busy("someone is running switch-to-configuration".into());
            }
            if let Some(pid) = fh_apply_running() {
                return Outcome::Busy(format!("someone is running fh apply (PID {pid})"));
            }
            let reference = flake.exact(&resolved.version, &attr);
            apply_release(ctx, state, desired, reference, current, report).await
        }
    }
}

async fn apply_release(
    ctx: &Context,
    state: &mut State,
    desired: Target,
    reference: String,
    previous: Option<String>,
    report: &(dyn Fn(&str) + Sync),
) -> Outcome {
    let settings = &ctx.settings;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let unit = match ctx.applier.mode {
        crate::config::ApplyMode::TransientUnit => Some(apply::unit_name(now)),
        crate::config::ApplyMode::Direct => None,
    };
    let mut in_flight = InFlight {
        version: desired.version.clone(),
        store_path: desired.store_path.clone(),
        operation: settings.operation.as_str().to_string(),
        unit: unit.clone(),
        reference: reference.clone(),
        pid: None,
        previous_path: previous,
        started_at: state::now(),
    };
    // Written before anything starts: a restarted agent must find it.
    state.in_flight = Some(in_flight.clone());
    if let Err(e) = state.save(&settings.paths.state_dir) {
        state.in_flight = None;
        return Outcome::Failed {
            target: Some(desired),
            error: format!("{e:#}"),
            transient: false,
        };
    }
    report(&format!("applying {}", desired.version));
    tracing::info!(version = %desired.version, store_path = %desired.store_path, reference = %reference, unit = unit.as_deref().unwrap_or("-"), operation = settings.operation.as_str(), "applying release");
    let request = apply::Request {
        reference,
        version: desired.version.clone(),
        operation: settings.operation,
    };
    let finished = match ctx
        .applier
        .start(&request, unit.as_deref().unwrap_or(""))
        .await
    {
        Ok(running) => {
            if let apply::Running::Child(child) = &running {
                in_flight.pid = child.id();
                state.in_flight = Some(in_flight.clone());
                if let Err(e) = state.save(&settings.paths.state_dir) {
                    tracing::error!(error = %format!("{e:#}"), "cannot record the apply's PID");
                }
            }
            ctx.applier.wait(running, settings.apply_timeout).await
        }
        Err(e) => Err(e),
    };
    let finished = finished.map_err(|e| {
        tracing::warn!(error = %format!("{e:#}"), "fh apply could not be run");
        format!("cannot run fh: {e:#}")
    });
    conclude(ctx, state, &in_flight, finished.map(Some)).await
}

/// Verifies and records an apply that has ended (or whose end we only see in the system).
/// `finished` is fh's end as far as it is known: `Err` when fh could not be run at all, `Ok(None)`
/// when nothing is known of it (it ran under an earlier agent and left no trace).
async fn conclude(
    ctx: &Context,
    state: &mut State,
    in_flight: &InFlight,
    finished: Result<Option<apply::Finished>, String>,
) -> Outcome {
    let operation = in_flight
        .operation
        .parse()
        .unwrap_or(ctx.settings.operation);
    let now_at = system_path(&ctx.settings, operation);
    let target = Target {
        version: in_flight.version.clone(),
        store_path: in_flight.store_path.clone(),
    };
    let detail = match &finished {
        Ok(Some(f)) => Some(f.detail.clone()),
        _ => None,
    };
    let error = if now_at.as_deref() == Some(in_flight.store_path.as_str()) {
        None
    } else {
        // fh's exit status is no proof: it exits 0 after a failed activation.
        let what = if operation == Operation::Boot {
            "the boot profile"
        } else {
            "the running system"
        };
        Some(match (&finished, &now_at) {
            (Err(why), _) => format!("{why}; {what} is unchanged"),
            (Ok(Some(f)), _) if !f.fh_succeeded => format!("{}; {what} is unchanged", f.detail),
            (_, Some(path)) => format!("activation failed: {what} is {path}, not the new release"),
            (_, None) => format!("activation failed: {what} cannot be read"),
        })
    };
    match &error {
        None => {
            tracing::info!(version = %in_flight.version, fh = detail.as_deref().unwrap_or("-"), "deploy confirmed: the system runs the new release")
        }
        Some(e) => tracing::error!(version = %in_flight.version, error = %e, "deploy failed"),
    }
    record(state, in_flight, error.clone());
    if error.is_some() {
        // fh may have failed for want of a login (it was removed by hand, say): check it again.
        ctx.login_checked.store(false, Ordering::Relaxed);
    }
    if let Some(unit) = &in_flight.unit {
        ctx.applier.forget(unit).await;
    }
    match error {
        None => Outcome::Deployed(target),
        Some(error) => Outcome::Failed {
            target: Some(target),
            error,
            transient: false,
        },
    }
}

/// Picks up an apply started before the agent was restarted. `None`: nothing was found of it
/// and the system is not at its release, so the cycle goes on and applies again.
async fn finish_in_flight(
    ctx: &Context,
    state: &mut State,
    in_flight: &InFlight,
    report: &(dyn Fn(&str) + Sync),
) -> Option<Outcome> {
    let found = ctx
        .applier
        .find_earlier(
            in_flight.unit.as_deref(),
            in_flight.pid,
            &in_flight.reference,
        )
        .await;
    let found = match found {
        Ok(found) => found,
        Err(e) => {
            return Some(Outcome::Failed {
                target: None,
                error: format!(
                    "cannot find out what became of the apply of {}: {e:#}",
                    in_flight.version
                ),
                transient: true,
            });
        }
    };
    match found {
        Found::RunningOrphan(pid) => {
            report(&format!("applying {}", in_flight.version));
            tracing::info!(version = %in_flight.version, pid, "fh started by an earlier agent is still running; waiting for it");
            let finished = ctx
                .applier
                .wait(apply::Running::Orphan(pid), ctx.settings.apply_timeout)
                .await
                .ok();
            Some(conclude(ctx, state, in_flight, Ok(finished)).await)
        }
        Found::Running => {
            report(&format!("applying {}", in_flight.version));
            tracing::info!(version = %in_flight.version, "an apply started before this agent is still running; waiting for it");
            let unit = in_flight.unit.clone().unwrap_or_default();
            let finished = ctx
                .applier
                .wait(apply::Running::Unit(unit), ctx.settings.apply_timeout)
                .await
                .ok();
            Some(conclude(ctx, state, in_flight, Ok(finished)).await)
        }
        Found::Finished(f) => {
            tracing::info!(version = %in_flight.version, "an apply finished while the agent was away; recording it");
            Some(conclude(ctx, state, in_flight, Ok(Some(f))).await)
        }
        Found::Unknown => {
            let operation = in_flight
                .operation
                .parse()
                .unwrap_or(ctx.settings.operation);
            if system_path(&ctx.settings, operation).as_deref()
                == Some(in_flight.store_path.as_str())
            {
                return Some(conclude(ctx, state, in_flight, Ok(None)).await);
            }
            tracing::warn!(version = %in_flight.version, "an apply was interrupted before it finished (nothing is left of it); applying again");
            state.in_flight = None;
            None
        }
    }
}

/// Delay before the next cycle: the poll interval, or after consecutive failures a backoff from
/// 5 s doubling up to `max_backoff`; either with ±10% jitter (`jitter` is uniform in 0..1) so
/// that a fleet does not poll in step.
pub fn next_delay(
    poll: Duration,
    max_backoff: Duration,
    consecutive_failures: u32,
    jitter: f64,
) -> Duration {
    let base = if consecutive_failures == 0 {
        poll
    } else {
        let exp = Duration::from_secs(5).saturating_mul(1u32 << (consecutive_failures - 1).min(16));
        exp.min(max_backoff)
    };
    let factor = 1.0 + (jitter.clamp(0.0, 1.0) * 0.2 - 0.1);
    base.mul_f64(factor)
}

#[cfg(test)]
mod tests;

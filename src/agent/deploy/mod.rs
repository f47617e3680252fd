//! One deploy cycle: resolve the reference, compare, fetch, activate, confirm health, roll back
//! when anything fails, record.
//!
//! A deploy is a small state machine persisted in the state file (`in_flight.phase`):
//! `fetch` (fh makes the closure the profile's new generation) → `activate`
//! (switch-to-configuration, its exit status seen) → `confirm` (no new failed unit, FlakeHub
//! reachable, every health check passing, within `confirm_timeout`) → recorded. A failure after
//! activation goes to `rollback`: the profile is set back to what it was and the system that ran
//! before is activated and checked the same way; the failed store path is quarantined. Each step
//! is written down before it starts, so a restarted agent (or a rebooted server) carries on where
//! it stood, and nothing is applied twice.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use nix::fcntl::{Flock, FlockArg};

use crate::agent::apply::{self, Applier, Found, Step, StepKind};
use crate::agent::config::{Operation, Settings};
use crate::agent::flakehub::{self, Resolved};
use crate::agent::health;
use crate::agent::hooks::{self, EventKind};
use crate::agent::login;
use crate::agent::state::{
    self, Deploy, Failures, InFlight, LastReboot, Outcome as Recorded, PendingBoot, Phase,
    Quarantined, RebootRequest, State, Target,
};
use crate::fleet::{self, Acquired, Ending, Purpose, SlotGuard};

/// How many quarantined store paths are remembered.
const QUARANTINE_KEEP: usize = 20;

/// Everything a cycle needs besides the state.
pub struct Context {
    pub settings: Settings,
    /// This server's hostname, for references without `#attr`.
    pub hostname: String,
    pub flakehub: flakehub::Client,
    pub applier: Applier,
    /// fh, nix-env, nix and the login method, resolved at start.
    pub programs: crate::agent::programs::Programs,
    /// Whether this context has checked the login yet. A new context (at start, after SIGHUP)
    /// checks it once, and so does the cycle after a failed deploy; a poll does not.
    pub login_checked: AtomicBool,
    /// Why there is no reference to follow (from loading the user-data), for the status.
    pub why_no_reference: Option<String>,
    /// The fleet this server takes turns with, when `[fleet]` is configured.
    pub fleet: Option<fleet::Coordinator>,
    /// Why a configured fleet cannot be used (its instance id unknown, its TLS files unreadable):
    /// then nothing is deployed and nothing rebooted.
    pub fleet_problem: Option<String>,
}

/// How a cycle ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to follow: no reference configured.
    Idle(String),
    UpToDate(Target),
    /// Deployed and confirmed healthy.
    Deployed(Target),
    /// Applied as the boot default (`operation = "boot"`); it is checked after the next boot.
    PendingReboot(Target),
    /// Could not check or deploy; nothing was activated. `transient` failures (network,
    /// FlakeHub) are retried sooner.
    Failed {
        target: Option<Target>,
        error: String,
        transient: bool,
    },
    /// The deploy failed after activation and the system went back to what ran before.
    RolledBack {
        target: Target,
        error: String,
        /// The rollback itself worked (the previous system runs and is healthy).
        rollback_ok: bool,
    },
    /// This store path failed before; it waits for another release or `hcloud-nixos retry`.
    Quarantined {
        target: Target,
        reason: String,
    },
    /// A release is there but too young (`min_release_age`).
    Waiting {
        target: Target,
        /// `None`: its publication time is unknown, so it waits for good.
        until: Option<String>,
    },
    /// Someone else is switching the system right now.
    Busy(String),
    /// The fleet's slots are taken (or its canary has not confirmed the release yet).
    FleetWaiting(String),
    /// The release failed on another server of the group; it waits for `hcloud-nixos fleet resume`.
    FleetPaused {
        target: Target,
        line: String,
    },
}

impl Outcome {
    /// The system is where it should be (or nothing is asked of it).
    pub fn ok(&self) -> bool {
        matches!(
            self,
            Outcome::Idle(_)
                | Outcome::UpToDate(_)
                | Outcome::Deployed(_)
                | Outcome::PendingReboot(_)
        )
    }

    /// A failure that counts for backoff.
    pub fn failed(&self) -> bool {
        matches!(self, Outcome::Failed { .. } | Outcome::RolledBack { .. })
    }

    /// Waiting for the fleet: ask again soon (with jitter), not a whole poll interval later.
    pub fn fleet_waiting(&self) -> bool {
        matches!(self, Outcome::FleetWaiting(_))
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
            Outcome::PendingReboot(t) => format!(
                "{} is the boot default; it runs after the next reboot{running}",
                t.version
            ),
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
            Outcome::RolledBack {
                target,
                error,
                rollback_ok: true,
            } => format!(
                "deploy of {} failed and was rolled back: {error}{running}",
                target.version
            ),
            Outcome::RolledBack {
                target,
                error,
                rollback_ok: false,
            } => format!(
                "deploy of {} failed ({error}) and the rollback did not end healthy{running}; look at `journalctl -u 'hcloud-nixos-*'`",
                target.version
            ),
            Outcome::Quarantined { target, reason } => format!(
                "{} is quarantined ({reason}); waiting for a newer release or `hcloud-nixos retry`{running}",
                target.version
            ),
            Outcome::Waiting {
                target,
                until: Some(until),
            } => format!(
                "{} waits until {until} (min_release_age){running}",
                target.version
            ),
            Outcome::Waiting {
                target,
                until: None,
            } => format!(
                "{} waits: its publication time is unknown and min_release_age is set{running}",
                target.version
            ),
            Outcome::Busy(why) => format!("waiting: {why}{running}"),
            Outcome::FleetWaiting(line) => format!("{line}{running}"),
            Outcome::FleetPaused { line, .. } => format!("{line}{running}"),
        }
    }
}

/// What to do about a resolved release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    UpToDate,
    Apply,
    /// Quarantined, or failed `retry_limit` times before activation.
    Hold {
        reason: String,
    },
    /// Too young: wait until then (RFC 3339).
    Wait {
        /// `None`: the release's age cannot be told.
        until: Option<String>,
    },
}

/// Pure: compare the desired release with the running system, the quarantine, past failures and
/// the release's age.
pub fn decide(
    desired: &Target,
    current: Option<&str>,
    state: &State,
    retry_limit: u32,
    published_at: Option<SystemTime>,
    min_release_age: Duration,
    now: SystemTime,
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
        let ready = published_at.map(|p| p + min_release_age);
        match ready {
            Some(ready) if ready <= now => {}
            Some(ready) => {
                return Decision::Wait {
                    until: Some(humantime::format_rfc3339_seconds(ready).to_string()),
                };
            }
            None => return Decision::Wait { until: None },
        }
    }
    Decision::Apply
}

/// Where a link points, fully resolved.
fn resolve_link(link: &Path) -> Option<String> {
    std::fs::canonicalize(link)
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// The store path the system is at: the running system for switch and test, the profile (what
/// boots next) for boot.
pub fn system_path(settings: &Settings, operation: Operation) -> Option<String> {
    match operation {
        Operation::Switch | Operation::Test => resolve_link(&settings.paths.current_system),
        Operation::Boot => resolve_link(&settings.paths.system_profile),
    }
}

/// The version of what runs, when we know it.
pub fn running_version(state: &State, settings: &Settings) -> Option<String> {
    let current = resolve_link(&settings.paths.current_system)?;
    state
        .running
        .as_ref()
        .filter(|t| t.store_path == current)
        .map(|t| t.version.clone())
}

fn boot_id(settings: &Settings) -> String {
    std::fs::read_to_string(&settings.paths.boot_id)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Records a finished deploy; clears the in-flight marker in the same write.
fn record(state: &mut State, f: &InFlight, error: Option<String>) {
    let target = Target {
        version: f.version.clone(),
        store_path: f.store_path.clone(),
    };
    state.last_deploy = Some(Deploy {
        version: f.version.clone(),
        store_path: f.store_path.clone(),
        previous_path: f.previous_path.clone(),
        operation: f.operation.clone(),
        started_at: f.started_at.clone(),
        finished_at: state::now(),
        outcome: if error.is_none() {
            Recorded::Success
        } else {
            Recorded::Failed
        },
        error: error.clone(),
    });
    state.deploys += 1;
    state.in_flight = None;
    match error {
        None => {
            state.counters.deploys_succeeded += 1;
            state.running = Some(target);
            state.failures = None;
        }
        Some(error) => {
            state.counters.deploys_failed += 1;
            let count = match &state.failures {
                Some(prev) if prev.store_path == f.store_path => prev.count + 1,
                _ => 1,
            };
            state.failures = Some(Failures {
                store_path: f.store_path.clone(),
                version: f.version.clone(),
                count,
                last_error: error,
            });
        }
    }
}

/// Puts a store path in quarantine (newest first, a bounded list).
fn quarantine(state: &mut State, f: &InFlight, reason: &str) {
    state.quarantined.retain(|q| q.store_path != f.store_path);
    state.quarantined.insert(
        0,
        Quarantined {
            version: f.version.clone(),
            store_path: f.store_path.clone(),
            reason: reason.to_string(),
            at: state::now(),
        },
    );
    state.quarantined.truncate(QUARANTINE_KEEP);
}

/// A lock that keeps two agents apart (this one and an operator's `agent --once` or `retry`).
pub fn take_lock(run_dir: &Path, wait: bool) -> Result<Option<Flock<File>>> {
    crate::plumbing::files::create_dir_all_mode(run_dir, 0o700)?;
    let path = run_dir.join("apply.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
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

/// Runs one cycle. The state is read from disk under the lock and written back, so that
/// `hcloud-nixos retry` and a second agent never lose each other's changes. `report` receives
/// status lines while it works ("applying 0.1.43").
pub async fn cycle(ctx: &Context, state: &mut State, report: &(dyn Fn(&str) + Sync)) -> Outcome {
    let state_dir = &ctx.settings.paths.state_dir;
    let lock = match take_lock(&ctx.settings.paths.run_dir, false) {
        Ok(Some(lock)) => lock,
        Ok(None) => return Outcome::Busy("another hcloud-nixos agent holds the apply lock".into()),
        Err(e) => {
            return Outcome::Failed {
                target: None,
                error: format!("{e:#}"),
                transient: false,
            };
        }
    };
    match State::load(state_dir) {
        Ok(fresh) => *state = fresh,
        Err(e) => {
            return Outcome::Failed {
                target: None,
                error: format!("{e:#}"),
                transient: false,
            };
        }
    }
    let outcome = cycle_inner(ctx, state, report).await;
    let mut events = deploy_events(&outcome, state);
    let reboot_note = if state.in_flight.is_none() {
        reboots(ctx, state, &mut events).await
    } else {
        None
    };
    let running = running_version(state, &ctx.settings);
    state.status = outcome.status_line(running.as_deref());
    if let Some(note) = reboot_note {
        state.status = format!("{}; {note}", state.status);
    }
    state.consecutive_failures = if outcome.failed() {
        state.consecutive_failures.saturating_add(1)
    } else {
        0
    };
    state.last_check = Some(state::Check {
        at: state::now(),
        ok: !matches!(
            outcome,
            Outcome::Failed { target: None, .. } | Outcome::Busy(_)
        ),
        message: state.status.clone(),
    });
    if let Err(e) = state.save(state_dir) {
        tracing::error!(error = %format!("{e:#}"), "cannot record the state");
    }
    drop(lock);
    for event in &events {
        hooks::run_all(&ctx.settings.hooks, event).await;
    }
    outcome
}

/// Hook events for what a cycle did to the system.
pub fn deploy_events(outcome: &Outcome, state: &State) -> Vec<hooks::Event> {
    let previous = |t: &Target| {
        state
            .last_deploy
            .as_ref()
            .filter(|d| d.store_path == t.store_path)
            .and_then(|d| d.previous_path.clone())
    };
    let event = |kind, t: &Target, outcome: &str, error: Option<&String>| hooks::Event {
        kind,
        version: Some(t.version.clone()),
        store_path: Some(t.store_path.clone()),
        previous_path: previous(t),
        outcome: outcome.to_string(),
        error: error.cloned(),
    };
    match outcome {
        Outcome::Deployed(t) => vec![event(EventKind::Deploy, t, "success", None)],
        Outcome::PendingReboot(t) => vec![event(EventKind::Deploy, t, "pending-reboot", None)],
        Outcome::Failed {
            target: Some(t),
            error,
            ..
        } => vec![event(EventKind::Deploy, t, "failed", Some(error))],
        Outcome::RolledBack {
            target,
            error,
            rollback_ok,
        } => vec![
            event(EventKind::Deploy, target, "rolled-back", Some(error)),
            event(
                EventKind::Rollback,
                target,
                if *rollback_ok { "success" } else { "failed" },
                Some(error),
            ),
        ],
        _ => Vec::new(),
    }
}

/// Reboots for a new kernel (or a release applied with `operation = "boot"`) as the policy
/// allows, and confirms a reboot the agent asked for. Returns a note for the status line.
async fn reboots(
    ctx: &Context,
    state: &mut State,
    events: &mut Vec<hooks::Event>,
) -> Option<String> {
    let settings = &ctx.settings;
    let this_boot = boot_id(settings);
    if let Some(req) = state.reboot_request.clone()
        && req.boot_id != this_boot
    {
        let booted = resolve_link(&settings.paths.booted_system);
        let ok = booted.as_deref() == Some(req.system.as_str());
        if ok {
            tracing::info!(system = %req.system, "rebooted into the expected system");
        } else {
            tracing::error!(expected = %req.system, booted = booted.as_deref().unwrap_or("-"), "rebooted, but not into the expected system");
        }
        state.last_reboot = Some(LastReboot {
            at: state::now(),
            system: req.system.clone(),
            booted,
            ok,
        });
        state.reboot_request = None;
        state.reboot_planned = None;
    }
    let current = resolve_link(&settings.paths.current_system);
    let profile = resolve_link(&settings.paths.system_profile);
    let (required, system_after) = match &state.pending_boot {
        // A release applied with operation = boot runs only after a reboot.
        Some(p) => (true, Some(p.store_path.clone())),
        // With operation = boot, a boot default other than what runs (after a rollback of a
        // release that failed after its reboot) takes a reboot back.
        None if settings.operation == Operation::Boot
            && profile.is_some()
            && profile != current =>
        {
            (true, profile.clone())
        }
        None => (
            crate::agent::reboot::reboot_required(
                &settings.paths.booted_system,
                &settings.paths.current_system,
            ),
            current.clone(),
        ),
    };
    // A reboot that did not bring up the system it was for is not tried again for that system:
    // rebooting in a loop helps nobody.
    if required
        && let Some(last) = &state.last_reboot
        && !last.ok
        && Some(&last.system) == system_after.as_ref()
    {
        state.reboot_required = true;
        return Some(format!(
            "reboot required, but the last reboot for it booted {} instead; not rebooting again",
            last.booted.as_deref().unwrap_or("an unknown system")
        ));
    }
    let was_required = state.reboot_required;
    state.reboot_required = required;
    let now = jiff::Timestamp::now();
    let planned = state
        .reboot_planned
        .as_deref()
        .and_then(|p| p.parse::<jiff::Timestamp>().ok());
    let window = settings.reboot_window.as_ref();
    let reboot_event = |outcome: &str, error: Option<String>| hooks::Event {
        kind: EventKind::Reboot,
        version: state.running.as_ref().map(|r| r.version.clone()),
        store_path: system_after.clone(),
        previous_path: resolve_link(&settings.paths.booted_system),
        outcome: outcome.to_string(),
        error,
    };
    match crate::agent::reboot::decide(
        settings.reboot,
        window,
        required,
        now,
        fastrand::f64(),
        planned,
    ) {
        crate::agent::reboot::Decision::NotRequired => {
            state.reboot_planned = None;
            None
        }
        crate::agent::reboot::Decision::Hold { reason } => {
            if !was_required {
                events.push(reboot_event("held", Some(reason.clone())));
            }
            // For a release applied with operation = boot the status says so already.
            state.pending_boot.is_none().then_some(reason)
        }
        crate::agent::reboot::Decision::RebootAt(at) => {
            let note = crate::agent::reboot::describe_next(
                settings.reboot,
                window,
                required,
                now,
                Some(at),
            );
            if planned != Some(at) {
                tracing::info!(at = %at, "reboot planned inside the maintenance window");
                events.push(reboot_event("scheduled", None));
            }
            state.reboot_planned = Some(at.to_string());
            Some(note)
        }
        crate::agent::reboot::Decision::RebootNow => {
            let Some(system) = system_after.clone() else {
                return Some("reboot required, but the system to boot is unknown".into());
            };
            state.reboot_request = Some(RebootRequest {
                system,
                boot_id: this_boot,
                at: state::now(),
            });
            state.status = "rebooting for a new kernel".into();
            if let Err(e) = persist(ctx, state) {
                state.reboot_request = None;
                return Some(format!("reboot postponed: {e}"));
            }
            // A reboot takes a turn in the fleet like a deploy; the slot outlives the reboot and is
            // handed back by the cycle after it.
            if let Some(problem) = &ctx.fleet_problem {
                state.reboot_request = None;
                return Some(format!("reboot postponed: fleet: {problem}"));
            }
            let guard = match &ctx.fleet {
                None => None,
                Some(coordinator) => match coordinator.acquire(Purpose::Reboot).await {
                    Ok(Acquired::Granted(guard)) => Some(guard),
                    Ok(other) => {
                        state.reboot_request = None;
                        return Some(format!("reboot waits: {}", other.status_line()));
                    }
                    Err(e) => {
                        state.reboot_request = None;
                        return Some(format!("reboot postponed: {e}"));
                    }
                },
            };
            if guard.is_some() {
                state.fleet_release = Some(Ending::Done);
                if let Err(e) = persist(ctx, state) {
                    tracing::error!("{e}");
                }
            }
            // The hooks hear of it before the machine goes down.
            hooks::run_all(&settings.hooks, &reboot_event("rebooting", None)).await;
            let kernel = current
                .as_deref()
                .and_then(|c| crate::agent::reboot::kernel_version(Path::new(c)));
            let message =
                crate::agent::reboot::wall_message(settings.reboot_grace, kernel.as_deref());
            let result = match crate::agent::reboot::Logind::connect().await {
                Ok(host) => {
                    crate::agent::reboot::carry_out(
                        &host,
                        settings.reboot_grace,
                        &message,
                        settings.reboot_inhibitor_timeout,
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            if !matches!(result, Ok(crate::agent::reboot::Outcome::Rebooting))
                && let (Some(coordinator), Some(guard)) = (&ctx.fleet, guard)
            {
                // No reboot after all: the turn goes back at once.
                match coordinator.release(guard, Ending::Done).await {
                    Ok(()) => state.fleet_release = None,
                    Err(e) => tracing::warn!("cannot hand the fleet slot back yet: {e}"),
                }
            }
            match result {
                Ok(crate::agent::reboot::Outcome::Rebooting) => {
                    Some("rebooting for a new kernel".into())
                }
                Ok(crate::agent::reboot::Outcome::Inhibited(by)) => {
                    state.reboot_request = None;
                    let why = format!("reboot postponed: blocked by {}", by.join(", "));
                    events.push(reboot_event("inhibited", Some(why.clone())));
                    Some(why)
                }
                Err(e) => {
                    state.reboot_request = None;
                    let why = format!("reboot failed: {e:#}");
                    tracing::error!("{why}");
                    events.push(reboot_event("failed", Some(why.clone())));
                    Some(why)
                }
            }
        }
    }
}

async fn cycle_inner(ctx: &Context, state: &mut State, report: &(dyn Fn(&str) + Sync)) -> Outcome {
    let settings = &ctx.settings;
    if let Some(outcome) = check_pending_boot(ctx, state, report).await {
        return outcome;
    }
    if let Some(ending) = state.fleet_release.clone()
        && let Some(coordinator) = &ctx.fleet
    {
        match coordinator.release_own(ending).await {
            Ok(()) => state.fleet_release = None,
            Err(e) => tracing::debug!("the fleet slot is still to be handed back: {e}"),
        }
    }
    if let Some(f) = state.in_flight.clone() {
        tracing::info!("carrying on with the deploy an earlier agent process started");
        // The slot is ours again (a restarted agent finds it by its id); a deploy under way is
        // finished whatever the fleet says.
        let guard = match &ctx.fleet {
            Some(coordinator) => match coordinator
                .acquire(Purpose::Deploy {
                    release: f.version.clone(),
                })
                .await
            {
                Ok(Acquired::Granted(guard)) => Some(guard),
                _ => None,
            },
            None => None,
        };
        let outcome = drive(ctx, state, report).await;
        hand_back(ctx, state, guard, &outcome).await;
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
    if let Some(problem) = ctx.programs.deploy_problem() {
        return Outcome::Failed {
            target: None,
            error: format!("cannot deploy: {problem}"),
            transient: false,
        };
    }
    if let Some(token) = &settings.token
        && !ctx.login_checked.load(Ordering::Relaxed)
    {
        match login::ensure(
            &ctx.programs.login,
            token.secret(),
            &settings.paths.run_dir,
            state,
        )
        .await
        {
            Ok(true) => tracing::info!(token_from = %token.origin(), "logged in to FlakeHub"),
            Ok(false) => tracing::debug!("already logged in to FlakeHub"),
            Err(e) => {
                return Outcome::Failed {
                    target: None,
                    error: format!("FlakeHub login: {e:#}"),
                    transient: false,
                };
            }
        }
        ctx.login_checked.store(true, Ordering::Relaxed);
    }
    let attr = flake.attr_or_default(&ctx.hostname);
    let resolved: Resolved = match ctx.flakehub.resolve(flake, &attr).await {
        Ok(r) => r,
        Err(e) => {
            let transient = e.is_transient();
            return Outcome::Failed {
                target: None,
                error: e.to_string(),
                transient,
            };
        }
    };
    let desired = Target {
        version: resolved.version.clone(),
        store_path: resolved.store_path.clone(),
    };
    state.desired = Some(desired.clone());
    // A quarantine ends when a different release appears.
    let before = state.quarantined.len();
    state
        .quarantined
        .retain(|q| q.store_path == desired.store_path);
    if state.quarantined.len() < before {
        tracing::info!(version = %desired.version, "a different release appeared; earlier quarantined releases may be tried again");
    }
    let current = system_path(settings, settings.operation);
    let published = resolved
        .published_at
        .as_deref()
        .and_then(|p| p.parse::<jiff::Timestamp>().ok())
        .map(SystemTime::from);
    match decide(
        &desired,
        current.as_deref(),
        state,
        settings.retry_limit,
        published,
        settings.min_release_age,
        SystemTime::now(),
    ) {
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
            if switch_in_progress(&settings.paths.switch_lock) {
                return Outcome::Busy("someone is running switch-to-configuration".into());
            }
            if let Some(pid) = fh_apply_running() {
                return Outcome::Busy(format!("someone is running fh apply (PID {pid})"));
            }
            // The fleet cannot be asked: nothing was started, so no deploy failed (no target, no
            // deploy hook); it is a failed check that backs off.
            if let Some(problem) = &ctx.fleet_problem {
                return Outcome::Failed {
                    target: None,
                    error: format!("fleet: {problem}; nothing is deployed until it can be asked"),
                    transient: true,
                };
            }
            let guard = match &ctx.fleet {
                None => None,
                Some(coordinator) => match coordinator
                    .acquire(Purpose::Deploy {
                        release: desired.version.clone(),
                    })
                    .await
                {
                    Ok(Acquired::Granted(guard)) => Some(guard),
                    Ok(Acquired::Paused(pause)) => {
                        return Outcome::FleetPaused {
                            line: Acquired::Paused(pause).status_line(),
                            target: desired,
                        };
                    }
                    Ok(waiting) => return Outcome::FleetWaiting(waiting.status_line()),
                    Err(e) => {
                        return Outcome::Failed {
                            target: None,
                            error: format!(
                                "fleet: {e}; {} is not deployed until it can be asked",
                                desired.version
                            ),
                            transient: e.unreachable(),
                        };
                    }
                },
            };
            let failed_before = match ctx.applier.systemd() {
                Some(systemd) if settings.operation != Operation::Boot => {
                    systemd.failed_units().await.unwrap_or_default()
                }
                _ => Vec::new(),
            };
            state.in_flight = Some(InFlight {
                version: desired.version.clone(),
                store_path: desired.store_path.clone(),
                operation: settings.operation.as_str().to_string(),
                reference: flake.exact(&resolved.version, &attr),
                phase: Phase::Fetch,
                unit: None,
                pid: None,
                previous_path: resolve_link(&settings.paths.current_system),
                previous_profile: resolve_link(&settings.paths.system_profile),
                failed_before,
                confirm_until: None,
                failure: None,
                started_at: state::now(),
            });
            tracing::info!(
                version = %desired.version,
                store_path = %desired.store_path,
                operation = settings.operation.as_str(),
                already_failed = state.in_flight.as_ref().map_or(0, |f| f.failed_before.len()),
                "deploying a new release"
            );
            let outcome = drive(ctx, state, report).await;
            hand_back(ctx, state, guard, &outcome).await;
            outcome
        }
    }
}

/// Hands a fleet slot back once the deploy it was taken for has ended. A failed release is
/// reported (it pauses the group with `pause_on_failure`); a failed fetch only once it is
/// quarantined, since a passing fault should not stop the fleet. When the backend cannot be
/// reached, the ending is kept in the state and handed back at a later cycle.
async fn hand_back(ctx: &Context, state: &mut State, guard: Option<SlotGuard>, outcome: &Outcome) {
    let (Some(coordinator), Some(guard)) = (&ctx.fleet, guard) else {
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
        } if state
            .quarantined
            .iter()
            .any(|q| q.store_path == t.store_path) =>
        {
            Ending::Failed {
                release: t.version.clone(),
                reason: error.clone(),
            }
        }
        // The boot default is set; the reboot (by policy) takes the slot over, or it expires.
        Outcome::PendingReboot(_) => return,
        _ => Ending::Done,
    };
    if let Err(e) = coordinator.release(guard, ending.clone()).await {
        tracing::warn!("cannot hand the fleet slot back yet: {e}");
        state.fleet_release = Some(ending);
    }
}

/// Saves the state; a deploy must not go on when its next step cannot be written down.
fn persist(ctx: &Context, state: &State) -> Result<(), String> {
    state
        .save(&ctx.settings.paths.state_dir)
        .map_err(|e| format!("cannot record the deploy's progress: {e:#}"))
}

/// Runs the step of the in-flight deploy's current phase to its end: starts it (after writing
/// down its unit name), or picks it up when an earlier agent started it. `Ok(None)`: nothing is
/// known of how it ended (it left no trace); `Err`: it could not be run.
async fn run_step(
    ctx: &Context,
    state: &mut State,
    step: &Step,
) -> Result<Option<apply::Finished>, String> {
    let timeout = ctx.settings.apply_timeout;
    let f = state.in_flight.clone().expect("a deploy is in flight");
    if f.unit.is_some() || f.pid.is_some() {
        match ctx
            .applier
            .find_earlier(f.unit.as_deref(), f.pid, &step.argv)
            .await
        {
            Ok(Found::Running) => {
                let unit = f.unit.clone().unwrap_or_default();
                tracing::info!(unit = %unit, "a step started by an earlier agent is still running; waiting for it");
                let finished = ctx
                    .applier
                    .wait(apply::Running::Unit(unit.clone()), timeout)
                    .await;
                ctx.applier.forget(&unit).await;
                return finished.map(Some).map_err(|e| format!("{e:#}"));
            }
            Ok(Found::RunningOrphan(pid)) => {
                tracing::info!(
                    pid,
                    "a step started by an earlier agent is still running; waiting for it"
                );
                return ctx
                    .applier
                    .wait(apply::Running::Orphan(pid), timeout)
                    .await
                    .map(Some)
                    .map_err(|e| format!("{e:#}"));
            }
            Ok(Found::Finished(done)) => {
                tracing::info!(step = step.kind.as_str(), result = %done.detail, "a step finished while the agent was away");
                if let Some(unit) = &f.unit {
                    ctx.applier.forget(unit).await;
                }
                return Ok(Some(done));
            }
            Ok(Found::Unknown) => return Ok(None),
            Err(e) => {
                return Err(format!(
                    "cannot find out what became of the {} step: {e:#}",
                    step.kind.as_str()
                ));
            }
        }
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let unit = apply::unit_name(step.kind, now);
    if let Some(f) = state.in_flight.as_mut() {
        f.unit = Some(unit.clone());
    }
    persist(ctx, state)?;
    tracing::info!(step = step.kind.as_str(), unit = %unit, command = %step.argv.join(" "), "starting");
    let running = ctx
        .applier
        .start(step, &unit)
        .await
        .map_err(|e| format!("cannot start the {} step: {e:#}", step.kind.as_str()))?;
    if let apply::Running::Child(child) = &running
        && let Some(f) = state.in_flight.as_mut()
    {
        f.pid = child.id();
        if let Err(e) = persist(ctx, state) {
            tracing::error!("{e}");
        }
    }
    let finished = ctx
        .applier
        .wait(running, timeout)
        .await
        .map_err(|e| format!("{e:#}"));
    ctx.applier.forget(&unit).await;
    finished.map(Some)
}

/// Moves the in-flight deploy to `phase` and writes it down.
fn enter(
    ctx: &Context,
    state: &mut State,
    phase: Phase,
    failure: Option<String>,
) -> Result<(), String> {
    if let Some(f) = state.in_flight.as_mut() {
        f.phase = phase;
        f.unit = None;
        f.pid = None;
        if failure.is_some() {
            f.failure = failure;
        }
        if phase == Phase::Confirm && f.confirm_until.is_none() {
            let until = SystemTime::now() + ctx.settings.confirm_timeout;
            f.confirm_until = Some(humantime::format_rfc3339_seconds(until).to_string());
        }
    }
    persist(ctx, state)
}

/// Drives the in-flight deploy through its phases to an end.
async fn drive(ctx: &Context, state: &mut State, report: &(dyn Fn(&str) + Sync)) -> Outcome {
    // Each step that left no trace is started again, once per agent process.
    let mut restarted = false;
    loop {
        let f = state.in_flight.clone().expect("a deploy is in flight");
        let operation: Operation = f.operation.parse().unwrap_or(ctx.settings.operation);
        let target = Target {
            version: f.version.clone(),
            store_path: f.store_path.clone(),
        };
        let step_result = match f.phase {
            Phase::Fetch => {
                report(&format!("fetching {}", f.version));
                let step = match ctx.programs.fh.path() {
                    Ok(fh) => Step::fetch(fh, &f.reference, &f.version),
                    Err(e) => return fail_before_activation(ctx, state, e).await,
                };
                let result = run_step(ctx, state, &step).await;
                let profile = resolve_link(&ctx.settings.paths.system_profile);
                if profile.as_deref() == Some(f.store_path.as_str()) {
                    match crate::agent::release::check(Path::new(&f.store_path), &f.version) {
                        Err(refused) if ctx.settings.require_agent => {
                            return refuse_release(ctx, state, refused).await;
                        }
                        Err(refused) => tracing::warn!(
                            "{refused}; deploying it anyway, as apply.require_agent = false asks"
                        ),
                        Ok(()) => {}
                    }
                    Ok(Phase::Activate)
                } else {
                    let error = match result {
                        Ok(None) if !restarted => {
                            restarted = true;
                            tracing::warn!(
                                "the fetch step was interrupted before it finished; starting it again"
                            );
                            if let Err(e) = enter(ctx, state, Phase::Fetch, None) {
                                return failed(Some(target), e);
                            }
                            continue;
                        }
                        Err(e) => e,
                        Ok(Some(done)) if !done.succeeded => format!("fh {}", done.detail),
                        _ => "fh ended but the system profile is not the new release".into(),
                    };
                    // Nothing was activated: no rollback.
                    return fail_before_activation(ctx, state, error).await;
                }
            }
            Phase::Activate => {
                report(&format!("applying {}", f.version));
                let step = Step::switch(StepKind::Activate, &f.store_path, operation, &f.version);
                let result = run_step(ctx, state, &step).await;
                let at_target =
                    system_path(&ctx.settings, operation).as_deref() == Some(f.store_path.as_str());
                match (result, at_target) {
                    (Ok(Some(done)), true) if done.succeeded => Ok(Phase::Confirm),
                    (Ok(None), true) => Ok(Phase::Confirm),
                    (Ok(None), false) if !restarted => {
                        restarted = true;
                        tracing::warn!(
                            "the activation was interrupted before it finished; starting it again"
                        );
                        if let Err(e) = enter(ctx, state, Phase::Activate, None) {
                            return failed(Some(target), e);
                        }
                        continue;
                    }
                    (Ok(Some(done)), _) if !done.succeeded => Err(format!(
                        "switch-to-configuration {} {}",
                        operation.as_str(),
                        done.detail
                    )),
                    (Err(e), _) => Err(e),
                    _ => Err(format!(
                        "activation failed: {} is not the new release",
                        if operation == Operation::Boot {
                            "the boot profile"
                        } else {
                            "the running system"
                        }
                    )),
                }
            }
            Phase::Confirm => {
                report(&format!("confirming {}", f.version));
                let until = f
                    .confirm_until
                    .as_deref()
                    .and_then(|u| humantime::parse_rfc3339_weak(u).ok())
                    .unwrap_or_else(|| SystemTime::now() + ctx.settings.confirm_timeout);
                match confirm(ctx, &f.failed_before, until).await {
                    Ok(()) => {
                        tracing::info!(version = %f.version, "deploy confirmed: the new release runs and is healthy");
                        record(state, &f, None);
                        return Outcome::Deployed(target);
                    }
                    Err(e) => Err(e),
                }
            }
            Phase::Rollback => {
                report(&format!("rolling back from {}", f.version));
                return roll_back(ctx, state, &mut restarted).await;
            }
        };
        match step_result {
            Ok(Phase::Confirm) if operation == Operation::Boot => {
                // The boot default is set; the check happens after the reboot.
                let f = state.in_flight.clone().expect("in flight");
                state.pending_boot = Some(PendingBoot {
                    version: f.version.clone(),
                    store_path: f.store_path.clone(),
                    previous_profile: f.previous_profile.clone(),
                    boot_id: boot_id(&ctx.settings),
                    at: state::now(),
                });
                state.in_flight = None;
                tracing::info!(version = %f.version, "the new release is the boot default; it is checked after the next boot");
                return Outcome::PendingReboot(target);
            }
            Ok(next) => {
                restarted = false;
                if let Err(e) = enter(ctx, state, next, None) {
                    return failed(Some(target), e);
                }
            }
            Err(e) => {
                tracing::error!(version = %f.version, error = %e, "deploy failed; rolling back");
                restarted = false;
                if let Err(save) = enter(ctx, state, Phase::Rollback, Some(e)) {
                    return failed(Some(target), save);
                }
            }
        }
    }
}

fn failed(target: Option<Target>, error: String) -> Outcome {
    Outcome::Failed {
        target,
        error,
        transient: false,
    }
}

/// The fetch failed: nothing was activated. The profile is put back if fh changed it, the
/// failure is counted (the same store path is tried `retry_limit` times), and after that many
/// it is quarantined.
async fn fail_before_activation(ctx: &Context, state: &mut State, error: String) -> Outcome {
    let f = state.in_flight.clone().expect("in flight");
    let target = Target {
        version: f.version.clone(),
        store_path: f.store_path.clone(),
    };
    if let Some(previous) = &f.previous_profile
        && resolve_link(&ctx.settings.paths.system_profile).as_deref() != Some(previous.as_str())
        && let Err(e) = set_profile(ctx, previous).await
    {
        tracing::error!(error = %e, "cannot set the system profile back");
    }
    tracing::error!(version = %f.version, error = %error, "deploy failed before activation; the system is unchanged");
    record(state, &f, Some(error.clone()));
    ctx.login_checked.store(false, Ordering::Relaxed);
    if state
        .failures
        .as_ref()
        .is_some_and(|x| x.count >= ctx.settings.retry_limit)
    {
        quarantine(
            state,
            &f,
            &format!(
                "fetching it failed {} times: {error}",
                ctx.settings.retry_limit
            ),
        );
    }
    Outcome::Failed {
        target: Some(target),
        error: format!("{error}; the system is unchanged"),
        transient: false,
    }
}

/// The fetched release would end deploys on this server (no agent in it): the profile is put
/// back, nothing is activated, and the release is quarantined at once (fetching it again would
/// not change it), with how to deploy it on purpose.
async fn refuse_release(ctx: &Context, state: &mut State, refused: String) -> Outcome {
    let f = state.in_flight.clone().expect("in flight");
    let outcome = fail_before_activation(ctx, state, refused.clone()).await;
    if !state
        .quarantined
        .iter()
        .any(|q| q.store_path == f.store_path)
    {
        quarantine(
            state,
            &f,
            &format!("{refused}; {}", crate::agent::release::OVERRIDE_HINT),
        );
    }
    tracing::error!(version = %f.version, "{refused}; {}", crate::agent::release::OVERRIDE_HINT);
    match outcome {
        Outcome::Failed { target, .. } => Outcome::Failed {
            target,
            error: format!("refused: {refused}; the system is unchanged"),
            transient: false,
        },
        other => other,
    }
}

/// `nix-env -p <profile> --set <path>`: the profile's new generation points at `path`.
async fn set_profile(ctx: &Context, path: &str) -> Result<(), String> {
    let program = ctx.programs.nix_env.path()?;
    let profile = ctx
        .settings
        .paths
        .system_profile
        .to_string_lossy()
        .into_owned();
    let out = crate::plumbing::exec::run(
        program,
        &["-p", &profile, "--set", path],
        Duration::from_secs(120),
    )
    .await
    .map_err(|e| format!("{e:#}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nix-env --set failed ({}): {}",
            out.status,
            out.last_line()
        ))
    }
}

/// Waits until every health condition holds, or `until` passes (then says what failed last).
async fn confirm(ctx: &Context, failed_before: &[String], until: SystemTime) -> Result<(), String> {
    let http = crate::plumbing::tls::client_builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| format!("cannot set up HTTP health checks: {e}"))?;
    loop {
        match check_health(ctx, failed_before, &http).await {
            Ok(()) => return Ok(()),
            Err(Unhealthy::Final(why)) => return Err(why),
            Err(Unhealthy::Passing(why)) if SystemTime::now() >= until => {
                return Err(format!(
                    "not healthy within {}s: {why}",
                    ctx.settings.confirm_timeout.as_secs()
                ));
            }
            Err(Unhealthy::Passing(why)) => tracing::debug!(reason = %why, "not healthy yet"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// One round of health checks.
async fn check_health(
    ctx: &Context,
    failed_before: &[String],
    http: &reqwest::Client,
) -> Result<(), Unhealthy> {
    if let Some(systemd) = ctx.applier.systemd() {
        let now_failed = systemd
            .failed_units()
            .await
            .map_err(|e| Unhealthy::Passing(format!("cannot list failed units: {e:#}")))?;
        let new = health::new_failures(failed_before, &now_failed);
        if !new.is_empty() {
            // A failed unit stays failed (one that restarts itself is "activating", not
            // "failed"): no point in waiting for it.
            return Err(Unhealthy::Final(format!(
                "units failed: {}",
                new.join(", ")
            )));
        }
    }
    if let Some(flake) = &ctx.settings.flake {
        // Any answer proves the network works; only not getting one counts against the deploy.
        if let Err(e @ flakehub::Error::Unreachable { .. }) = ctx.flakehub.release(flake).await {
            return Err(Unhealthy::Passing(format!(
                "FlakeHub is not reachable: {e}"
            )));
        }
    }
    for check in &ctx.settings.health_checks {
        check.run(http).await.map_err(Unhealthy::Passing)?;
    }
    Ok(())
}

/// Why a health round failed: something that may still come right (a service starting, the
/// network settling), or something that will not.
enum Unhealthy {
    Passing(String),
    Final(String),
}

/// Goes back to what ran before: the profile first, then the previous system's activation in
/// its own unit, then the same health checks. The failed store path is quarantined.
async fn roll_back(ctx: &Context, state: &mut State, restarted: &mut bool) -> Outcome {
    loop {
        let f = state.in_flight.clone().expect("in flight");
        let operation: Operation = f.operation.parse().unwrap_or(ctx.settings.operation);
        let target = Target {
            version: f.version.clone(),
            store_path: f.store_path.clone(),
        };
        let error = f
            .failure
            .clone()
            .unwrap_or_else(|| "the deploy failed".into());
        let finish = |state: &mut State, ok: bool, detail: Option<String>| {
            let f = state.in_flight.clone().expect("in flight");
            record(state, &f, Some(error.clone()));
            quarantine(state, &f, &error);
            if ok {
                state.counters.rollbacks_succeeded += 1;
                state.running = state
                    .running
                    .clone()
                    .filter(|r| Some(&r.store_path) == f.previous_path.as_ref());
            } else {
                state.counters.rollbacks_failed += 1;
            }
            if let Some(d) = detail {
                tracing::error!(error = %d, "the rollback did not end healthy");
            }
            Outcome::RolledBack {
                target: target.clone(),
                error: error.clone(),
                rollback_ok: ok,
            }
        };
        // What to go back to: the running system before (switch, test) or the boot default before.
        let back_to = match operation {
            Operation::Boot => f.previous_profile.clone(),
            _ => f.previous_path.clone(),
        };
        let Some(back_to) = back_to else {
            return finish(
                state,
                false,
                Some("the system before the deploy is unknown; nothing to roll back to".into()),
            );
        };
        if f.unit.is_none()
            && f.pid.is_none()
            && let Some(profile) = f.previous_profile.as_deref()
            && resolve_link(&ctx.settings.paths.system_profile).as_deref() != Some(profile)
            && let Err(e) = set_profile(ctx, profile).await
        {
            tracing::error!(error = %e, "cannot set the system profile back");
        }
        let step = Step::switch(StepKind::Rollback, &back_to, operation, &f.version);
        let result = run_step(ctx, state, &step).await;
        let at_previous =
            system_path(&ctx.settings, operation).as_deref() == Some(back_to.as_str());
        match (result, at_previous) {
            (Ok(None), false) if !*restarted => {
                *restarted = true;
                tracing::warn!(
                    "the rollback was interrupted before it finished; starting it again"
                );
                if let Some(f) = state.in_flight.as_mut() {
                    f.unit = None;
                    f.pid = None;
                }
                if let Err(e) = persist(ctx, state) {
                    return failed(Some(target), e);
                }
                continue;
            }
            (Ok(Some(done)), _) if !done.succeeded => {
                return finish(
                    state,
                    false,
                    Some(format!("switch-to-configuration {}", done.detail)),
                );
            }
            (Err(e), _) => return finish(state, false, Some(e)),
            (_, false) => {
                return finish(
                    state,
                    false,
                    Some("the previous system is not running after the rollback".into()),
                );
            }
            _ => {}
        }
        if operation == Operation::Boot {
            return finish(state, true, None);
        }
        let until = SystemTime::now() + ctx.settings.confirm_timeout;
        return match confirm(ctx, &f.failed_before, until).await {
            Ok(()) => {
                tracing::info!(version = %f.version, "rolled back; the previous system runs and is healthy");
                finish(state, true, None)
            }
            Err(e) => finish(state, false, Some(e)),
        };
    }
}

/// After a reboot, checks a release that was applied with `operation = "boot"`: the booted
/// system must be it and healthy; if not, the previous boot default is restored.
async fn check_pending_boot(
    ctx: &Context,
    state: &mut State,
    report: &(dyn Fn(&str) + Sync),
) -> Option<Outcome> {
    let pending = state.pending_boot.clone()?;
    if boot_id(&ctx.settings) == pending.boot_id {
        // Not rebooted yet.
        return None;
    }
    let target = Target {
        version: pending.version.clone(),
        store_path: pending.store_path.clone(),
    };
    report(&format!("checking {} after the reboot", pending.version));
    let booted = resolve_link(&ctx.settings.paths.booted_system);
    let f = InFlight {
        version: pending.version.clone(),
        store_path: pending.store_path.clone(),
        operation: Operation::Boot.as_str().into(),
        reference: String::new(),
        phase: Phase::Confirm,
        unit: None,
        pid: None,
        previous_path: booted.clone(),
        previous_profile: pending.previous_profile.clone(),
        failed_before: Vec::new(),
        confirm_until: None,
        failure: None,
        started_at: pending.at.clone(),
    };
    state.pending_boot = None;
    let verdict = if booted.as_deref() != Some(pending.store_path.as_str()) {
        Err(format!(
            "the booted system is {}, not the new release",
            booted.as_deref().unwrap_or("unknown")
        ))
    } else {
        confirm(ctx, &[], SystemTime::now() + ctx.settings.confirm_timeout).await
    };
    match verdict {
        Ok(()) => {
            tracing::info!(version = %pending.version, "booted into the new release and it is healthy");
            record(state, &f, None);
            Some(Outcome::Deployed(target))
        }
        Err(e) => {
            tracing::error!(version = %pending.version, error = %e, "the new release failed after the reboot; restoring the previous boot default");
            state.in_flight = Some(InFlight {
                phase: Phase::Rollback,
                failure: Some(e),
                ..f
            });
            if let Err(e) = persist(ctx, state) {
                return Some(failed(Some(target), e));
            }
            let mut restarted = false;
            Some(roll_back(ctx, state, &mut restarted).await)
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

//! How a cycle ended, the one status line an operator reads, the hook events it makes, and how
//! long the agent waits before the next check.

use std::time::Duration;

use jiff::Timestamp;

use super::state::{State, Target};
use crate::agent::hooks::{self, EventKind};
use crate::plumbing::retry::Backoff;

/// The first wait after a failed cycle; it doubles up to `max_backoff`.
const FIRST_BACKOFF: Duration = Duration::from_secs(5);

/// How soon to look again when someone else was switching the system.
const BUSY_RECHECK: Duration = Duration::from_secs(10);

/// How soon to ask again for a fleet slot (±25 % jitter).
const FLEET_RECHECK: Duration = Duration::from_secs(30);

/// How a cycle ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
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
        until: Option<Timestamp>,
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
    /// A failure before anything was started.
    pub(crate) fn check_failed(error: String, transient: bool) -> Outcome {
        Outcome::Failed {
            target: None,
            error,
            transient,
        }
    }

    /// The system is where it should be (or nothing is asked of it).
    pub(crate) fn ok(&self) -> bool {
        matches!(
            self,
            Outcome::Idle(_)
                | Outcome::UpToDate(_)
                | Outcome::Deployed(_)
                | Outcome::PendingReboot(_)
        )
    }

    /// A failure that counts for backoff.
    pub(crate) fn failed(&self) -> bool {
        matches!(self, Outcome::Failed { .. } | Outcome::RolledBack { .. })
    }

    /// The one line an operator reads in `systemctl status`.
    pub(crate) fn status_line(&self, running: Option<&str>) -> String {
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

    /// The hook events for what this cycle did to the system.
    pub(crate) fn events(&self, state: &State) -> Vec<hooks::Event> {
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
        match self {
            Outcome::Deployed(t) => vec![event(EventKind::Deploy, t, "success", None)],
            Outcome::PendingReboot(t) => {
                vec![event(EventKind::Deploy, t, "pending-reboot", None)]
            }
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
}

/// What the wait before the next check depends on besides the state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct WaitPolicy {
    pub(crate) poll_interval: Duration,
    pub(crate) max_backoff: Duration,
}

/// Delay before the next cycle: the poll interval, or after consecutive failures a backoff from
/// 5 s doubling up to `max_backoff`; either with ±10% jitter (`jitter` is uniform in 0..1) so
/// that a fleet does not poll in step.
pub(crate) fn next_delay(
    poll: Duration,
    max_backoff: Duration,
    consecutive_failures: u32,
    jitter: f64,
) -> Duration {
    let backoff = if consecutive_failures == 0 {
        Backoff {
            jitter: 0.1,
            ..Backoff::steady(poll)
        }
    } else {
        Backoff::doubling(FIRST_BACKOFF, max_backoff.max(FIRST_BACKOFF))
    };
    backoff.delay(consecutive_failures.max(1), jitter)
}

impl State {
    /// How long to wait before the next check after `outcome`: the poll interval (backing off
    /// after failures), but sooner when something is due earlier: a young release becoming old
    /// enough, a fleet slot to ask for again, someone else's switch ending, a reboot planned in
    /// the window. `jitter` is uniform in 0..1.
    pub(crate) fn next_wait(
        &self,
        outcome: &Outcome,
        policy: WaitPolicy,
        now: Timestamp,
        jitter: f64,
    ) -> Duration {
        let until = |at: Timestamp| Duration::try_from(at.duration_since(now)).unwrap_or_default();
        let mut delay = next_delay(
            policy.poll_interval,
            policy.max_backoff,
            self.consecutive_failures,
            jitter,
        );
        // A release that is too young yet is applied when it is old enough, not a poll later.
        if let Outcome::Waiting {
            until: Some(at), ..
        } = outcome
        {
            delay = delay.min(until(*at) + Duration::from_secs(1));
        }
        if matches!(outcome, Outcome::FleetWaiting(_)) {
            let base = policy.poll_interval.min(FLEET_RECHECK);
            delay = delay.min(base.mul_f64(0.75 + jitter.clamp(0.0, 1.0) * 0.5));
        }
        if matches!(outcome, Outcome::Busy(_)) {
            // Someone else is switching: look again soon, not a whole poll interval later.
            delay = delay.min(BUSY_RECHECK);
        }
        // A reboot planned inside the window is not missed by a long poll interval; a moment
        // already past is looked at at once.
        if let Some(at) = self.reboot_planned {
            delay = delay.min(until(at).max(Duration::from_secs(1)));
        }
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::lifecycle::state::{Deploy, Outcome as Recorded, now};

    fn target(v: &str) -> Target {
        Target {
            version: v.into(),
            store_path: format!("/nix/store/{:0>32}-system-{v}", v.replace('.', "")),
        }
    }

    #[test]
    fn status_lines_read_well() {
        let t = target("0.1.43");
        assert_eq!(
            Outcome::UpToDate(target("0.1.42")).status_line(Some("0.1.42")),
            "up to date: 0.1.42"
        );
        assert_eq!(
            Outcome::Failed {
                target: Some(t.clone()),
                error: "fh exited with status 1".into(),
                transient: false
            }
            .status_line(Some("0.1.42")),
            "deploy of 0.1.43 failed: fh exited with status 1; running 0.1.42"
        );
        assert_eq!(
            Outcome::check_failed("cannot reach FlakeHub".into(), true).status_line(None),
            "check failed: cannot reach FlakeHub"
        );
        let held = Outcome::Quarantined {
            target: t.clone(),
            reason: "health check failed".into(),
        };
        assert!(
            held.status_line(None)
                .contains("is quarantined (health check failed)")
        );
        assert!(!held.ok());
        let rolled = Outcome::RolledBack {
            target: t.clone(),
            error: "units failed: web.service".into(),
            rollback_ok: true,
        };
        assert_eq!(
            rolled.status_line(Some("0.1.42")),
            "deploy of 0.1.43 failed and was rolled back: units failed: web.service; running 0.1.42"
        );
        assert!(rolled.failed());
        assert!(Outcome::Idle("no reference".into()).ok());
        let waiting = Outcome::Waiting {
            target: t,
            until: Some("2023-11-14T23:13:20Z".parse().unwrap()),
        };
        assert_eq!(
            waiting.status_line(None),
            "0.1.43 waits until 2023-11-14T23:13:20Z (min_release_age)"
        );
    }

    #[test]
    fn delays_jitter_and_back_off() {
        let poll = Duration::from_secs(60);
        let cap = Duration::from_secs(600);
        assert_eq!(next_delay(poll, cap, 0, 0.5), poll);
        assert_eq!(next_delay(poll, cap, 0, 0.0), Duration::from_secs(54));
        assert_eq!(next_delay(poll, cap, 0, 1.0), Duration::from_secs(66));
        assert_eq!(next_delay(poll, cap, 1, 0.5), Duration::from_secs(5));
        assert_eq!(next_delay(poll, cap, 2, 0.5), Duration::from_secs(10));
        assert_eq!(next_delay(poll, cap, 8, 0.5), Duration::from_secs(600));
        assert_eq!(next_delay(poll, cap, 1000, 0.5), Duration::from_secs(600));
    }

    #[test]
    fn the_wait_is_the_poll_interval_unless_something_is_due_sooner() {
        let policy = WaitPolicy {
            poll_interval: Duration::from_secs(600),
            max_backoff: Duration::from_secs(600),
        };
        let t0 = now();
        let mut state = State::default();
        let up = Outcome::UpToDate(target("1"));
        assert_eq!(state.next_wait(&up, policy, t0, 0.5), policy.poll_interval);
        // After failures, the backoff.
        state.consecutive_failures = 2;
        assert_eq!(
            state.next_wait(&up, policy, t0, 0.5),
            Duration::from_secs(10)
        );
        state.consecutive_failures = 0;
        // A young release: a second after it is old enough.
        let young = Outcome::Waiting {
            target: target("2"),
            until: Some(crate::agent::lifecycle::machine::later(
                t0,
                Duration::from_secs(30),
            )),
        };
        assert_eq!(
            state.next_wait(&young, policy, t0, 0.5),
            Duration::from_secs(31)
        );
        // The fleet: within 30 s, ±25 %.
        let fleet = Outcome::FleetWaiting("waiting for a fleet slot".into());
        assert_eq!(
            state.next_wait(&fleet, policy, t0, 0.0),
            Duration::from_millis(22_500)
        );
        assert_eq!(
            state.next_wait(&fleet, policy, t0, 1.0),
            Duration::from_millis(37_500)
        );
        // Someone switching: 10 s.
        let busy = Outcome::Busy("someone".into());
        assert_eq!(
            state.next_wait(&busy, policy, t0, 0.5),
            Duration::from_secs(10)
        );
        // A reboot planned in 5 s, or one already past: at least a second.
        state.reboot_planned = Some(crate::agent::lifecycle::machine::later(
            t0,
            Duration::from_secs(5),
        ));
        assert_eq!(
            state.next_wait(&up, policy, t0, 0.5),
            Duration::from_secs(5)
        );
        state.reboot_planned = Some(jiff::Timestamp::UNIX_EPOCH);
        assert_eq!(
            state.next_wait(&up, policy, t0, 0.5),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn hooks_hear_of_deploys_and_rollbacks() {
        let t = target("0.1.43");
        let state = State {
            last_deploy: Some(Deploy {
                version: t.version.clone(),
                store_path: t.store_path.clone(),
                previous_path: Some("/nix/store/prev".into()),
                operation: crate::agent::config::Operation::Switch,
                started_at: now(),
                fetched_at: None,
                activated_at: None,
                finished_at: now(),
                outcome: Recorded::Success,
                error: None,
            }),
            ..Default::default()
        };
        let events = Outcome::Deployed(t.clone()).events(&state);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::Deploy);
        assert_eq!(events[0].outcome, "success");
        assert_eq!(events[0].previous_path.as_deref(), Some("/nix/store/prev"));
        let rolled = Outcome::RolledBack {
            target: t.clone(),
            error: "units failed: web.service".into(),
            rollback_ok: false,
        };
        let events = rolled.events(&state);
        let kinds: Vec<(EventKind, &str)> = events
            .iter()
            .map(|e| (e.kind, e.outcome.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                (EventKind::Deploy, "rolled-back"),
                (EventKind::Rollback, "failed")
            ]
        );
        assert_eq!(
            events[1].error.as_deref(),
            Some("units failed: web.service")
        );
        assert!(Outcome::UpToDate(t).events(&state).is_empty());
    }
}

//! The lifecycle driven through every path with a fake host ([`fake`]): deploys, failed
//! activations, failed confirmations, rollbacks that fail, an agent killed in each phase and
//! resumed, releases for the next boot, reboots, and the fleet's answers.

mod fake;

use std::collections::VecDeque;
use std::time::Duration;

use fake::{Does, Fake, World, finished, release, settings};

use super::host::{Earlier, Turn, Unhealthy};
use super::outcome::Outcome;
use super::state::{Lifecycle, Phase, StepHandle};
use crate::agent::config::Operation;
use crate::agent::reboot;
use crate::fleet::Ending;

fn fake(edit: impl FnOnce(&mut World)) -> Fake {
    let mut world = World::new();
    edit(&mut world);
    Fake::new(world, settings(|_| {}))
}

const BASE: &str = "/nix/store/base-system";

#[tokio::test]
async fn a_new_release_is_fetched_activated_confirmed_and_recorded() {
    let host = fake(|_| {});
    let outcome = host.cycle().await;
    assert_eq!(outcome, Outcome::Deployed(release(43)));
    let w = host.world.borrow().clone();
    assert_eq!(w.current.as_deref(), Some("/nix/store/system-43"));
    assert_eq!(
        w.log,
        [
            "fetch /fake/bin/fh apply nixos org/infra/=0.1.43#nixosConfigurations.web dry-activate",
            "activate /nix/store/system-43/bin/switch-to-configuration switch",
            "health (failed before: old.service)",
            "hook deploy success",
        ]
    );
    let state = host.state();
    assert_eq!(state.lifecycle, Lifecycle::Steady);
    assert_eq!(state.running, Some(release(43)));
    assert_eq!(state.status, "up to date: 0.1.43 (just deployed)");
    // When each phase ended, for `hcloud-nixos create`'s timeline.
    let d = state.last_deploy.as_ref().unwrap();
    let (fetched, activated) = (d.fetched_at.unwrap(), d.activated_at.unwrap());
    assert!(d.started_at <= fetched && fetched <= activated && activated <= d.finished_at);
    // Then: up to date, nothing run.
    assert_eq!(host.cycle().await, Outcome::UpToDate(release(43)));
    assert_eq!(host.world.borrow().did("fetch"), 1);
}

#[tokio::test]
async fn a_failed_activation_is_rolled_back_and_quarantined() {
    for (does, error) in [
        (
            Does::Fails,
            "switch-to-configuration switch exited with status 1",
        ),
        (
            Does::SwitchesThenExits4,
            "switch-to-configuration switch exited with status 4",
        ),
    ] {
        let host = fake(|w| w.activate = does);
        let outcome = host.cycle().await;
        assert_eq!(
            outcome,
            Outcome::RolledBack {
                target: release(43),
                error: error.into(),
                rollback_ok: true
            }
        );
        let w = host.world.borrow().clone();
        assert_eq!(
            w.current.as_deref(),
            Some(BASE),
            "the old system runs again"
        );
        assert_eq!(w.profile.as_deref(), Some(BASE), "the profile is set back");
        assert_eq!(w.did("rollback"), 1);
        assert_eq!(w.did("hook rollback success"), 1);
        let state = host.state();
        assert!(state.is_quarantined("/nix/store/system-43"));
        assert_eq!(state.counters.rollbacks_succeeded, 1);
        assert_eq!(state.lifecycle, Lifecycle::Steady);
        // Quarantined: not tried again.
        assert!(matches!(host.cycle().await, Outcome::Quarantined { .. }));
        assert_eq!(host.world.borrow().did("fetch"), 1);
    }
}

#[tokio::test]
async fn a_failed_confirmation_rolls_back_and_so_does_one_that_never_comes() {
    let host =
        fake(|w| w.health = [Err(Unhealthy::Final("units failed: web.service".into()))].into());
    let outcome = host.cycle().await;
    assert!(
        matches!(&outcome, Outcome::RolledBack { error, rollback_ok: true, .. } if error == "units failed: web.service"),
        "{outcome:?}"
    );
    // Not healthy for longer than confirm_timeout (20 s; a round every 2 s).
    let passing = Err(Unhealthy::Passing("health check: 503".into()));
    let host = fake(|w| w.health = std::iter::repeat_n(passing, 11).collect());
    let outcome = host.cycle().await;
    assert!(
        matches!(&outcome, Outcome::RolledBack { error, .. } if error == "not healthy within 20s: health check: 503"),
        "{outcome:?}"
    );
    // Passing for less than that: confirmed.
    let passing = Err(Unhealthy::Passing("starting".into()));
    let host = fake(|w| w.health = std::iter::repeat_n(passing, 5).collect());
    assert_eq!(host.cycle().await, Outcome::Deployed(release(43)));
}

#[tokio::test]
async fn a_rollback_that_fails_is_reported_and_counted() {
    let host = fake(|w| {
        w.activate = Does::Fails;
        w.rollback = Does::Fails;
    });
    let outcome = host.cycle().await;
    assert!(
        matches!(
            &outcome,
            Outcome::RolledBack {
                rollback_ok: false,
                ..
            }
        ),
        "{outcome:?}"
    );
    let state = host.state();
    assert_eq!(state.counters.rollbacks_failed, 1);
    assert!(
        state.status.contains("the rollback did not end healthy"),
        "{}",
        state.status
    );
    assert_eq!(host.world.borrow().did("hook rollback failed"), 1);
}

#[tokio::test]
async fn a_failing_fetch_changes_nothing_and_is_quarantined_after_retry_limit() {
    let host = fake(|w| w.fetch = Does::Fails);
    for n in 1..=3 {
        let outcome = host.cycle().await;
        assert_eq!(
            outcome,
            Outcome::Failed {
                target: Some(release(43)),
                error: "fh exited with status 1; the system is unchanged".into(),
                transient: false
            },
            "attempt {n}"
        );
        assert_eq!(host.world.borrow().current.as_deref(), Some(BASE));
    }
    let state = host.state();
    assert!(state.is_quarantined("/nix/store/system-43"));
    assert_eq!(host.world.borrow().did("activate"), 0);
    assert_eq!(
        host.world.borrow().did("forget login"),
        3,
        "log in again after each"
    );
}

#[tokio::test]
async fn a_release_without_the_agent_is_refused_at_once() {
    let host = fake(|w| {
        w.release_refused = Some("release 0.1.43 does not include the hcloud-nixos module".into())
    });
    let outcome = host.cycle().await;
    let Outcome::Failed { error, .. } = &outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        error.starts_with("refused: release 0.1.43 does not include"),
        "{error}"
    );
    let w = host.world.borrow().clone();
    assert_eq!(w.did("activate"), 0);
    assert_eq!(w.profile.as_deref(), Some(BASE), "the profile is set back");
    assert!(host.state().is_quarantined("/nix/store/system-43"));
    // Deployed anyway when the configuration says so.
    let mut host = fake(|w| w.release_refused = Some("no module".into()));
    host.settings.require_agent = false;
    assert_eq!(host.cycle().await, Outcome::Deployed(release(43)));
}

#[tokio::test(start_paused = true)]
async fn an_agent_killed_in_each_phase_carries_on_and_applies_nothing_twice() {
    // Killed during the fetch; the step left no trace: it is started again, once.
    let host = fake(|w| w.fetch = Does::Hangs);
    host.killed_cycle().await;
    let state = host.state();
    let f = state.in_flight().unwrap();
    assert_eq!(f.phase, Phase::Fetch);
    assert!(matches!(&f.step, Some(StepHandle::Unit(u)) if u.starts_with("hcloud-nixos-fetch-")));
    let host = host.restarted(|w| w.fetch = Does::Works);
    assert_eq!(host.cycle().await, Outcome::Deployed(release(43)));
    assert_eq!(host.world.borrow().did("fetch"), 2);

    // Killed during the activation, which went on in its unit and finished: not run again.
    let host = fake(|w| w.activate = Does::Hangs);
    host.killed_cycle().await;
    assert_eq!(host.state().in_flight().unwrap().phase, Phase::Activate);
    let host = host
        .restarted(|w| w.earlier = Some(Earlier::Finished(finished(true, "exited with status 0"))));
    assert_eq!(host.cycle().await, Outcome::Deployed(release(43)));
    assert_eq!(host.world.borrow().did("activate"), 1);
    assert_eq!(host.state().deploys, 1, "recorded once");

    // Killed while confirming: the deadline written down is kept, and it confirms.
    let host = fake(|w| w.health_hangs = true);
    host.killed_cycle().await;
    let state = host.state();
    let Phase::Confirm { until } = state.in_flight().unwrap().phase else {
        panic!("{state:?}")
    };
    assert_eq!(
        until,
        World::new()
            .now
            .checked_add(Duration::from_secs(20))
            .unwrap()
    );
    let host = host.restarted(|w| w.health_hangs = false);
    assert_eq!(host.cycle().await, Outcome::Deployed(release(43)));
    assert_eq!(host.world.borrow().did("activate"), 1);

    // Killed during the rollback, which was still running: waited for, recorded once.
    let host = fake(|w| {
        w.activate = Does::Fails;
        w.rollback = Does::Hangs;
    });
    host.killed_cycle().await;
    assert!(matches!(
        host.state().in_flight().unwrap().phase,
        Phase::Rollback { .. }
    ));
    let host = host
        .restarted(|w| w.earlier = Some(Earlier::Running(finished(true, "exited with status 0"))));
    let outcome = host.cycle().await;
    assert!(
        matches!(
            outcome,
            Outcome::RolledBack {
                rollback_ok: true,
                ..
            }
        ),
        "{outcome:?}"
    );
    assert_eq!(host.world.borrow().did("rollback"), 1);
    assert_eq!(host.state().counters.rollbacks_succeeded, 1);
}

#[tokio::test]
async fn a_release_for_the_next_boot_is_checked_after_the_reboot() {
    let mut host = fake(|_| {});
    host.settings.operation = Operation::Boot;
    assert_eq!(host.cycle().await, Outcome::PendingReboot(release(43)));
    let state = host.state();
    assert!(matches!(&state.lifecycle, Lifecycle::AwaitingBoot(p) if p.boot_id == "boot-1"));
    assert_eq!(
        host.world.borrow().current.as_deref(),
        Some(BASE),
        "nothing runs yet"
    );
    assert!(
        state.status.contains("runs after the next reboot"),
        "{}",
        state.status
    );
    // The same boot: still waiting, nothing fetched again.
    assert_eq!(host.cycle().await, Outcome::UpToDate(release(43)));
    // Rebooted into it: confirmed and recorded.
    let host = host.restarted(|w| {
        w.boot_id = "boot-2".into();
        w.current = Some(release(43).store_path);
        w.booted = Some(release(43).store_path);
    });
    assert_eq!(host.cycle().await, Outcome::Deployed(release(43)));
    assert_eq!(host.state().lifecycle, Lifecycle::Steady);
    assert_eq!(host.world.borrow().did("fetch"), 1);
}

#[tokio::test]
async fn a_release_for_the_next_boot_that_does_not_come_up_is_rolled_back() {
    let mut host = fake(|_| {});
    host.settings.operation = Operation::Boot;
    host.cycle().await;
    // Rebooted, but the old system came up.
    let host = host.restarted(|w| w.boot_id = "boot-2".into());
    let outcome = host.cycle().await;
    assert!(
        matches!(&outcome, Outcome::RolledBack { error, rollback_ok: true, .. } if error.contains("not the new release")),
        "{outcome:?}"
    );
    let w = host.world.borrow().clone();
    assert_eq!(
        w.profile.as_deref(),
        Some(BASE),
        "the boot default is the old one"
    );
    assert!(
        w.log
            .iter()
            .any(|l| l.ends_with("bin/switch-to-configuration boot"))
    );
}

#[tokio::test]
async fn a_newer_release_supersedes_one_awaiting_its_boot_or_leaves_it_waiting() {
    let mut host = fake(|_| {});
    host.settings.operation = Operation::Boot;
    host.cycle().await;
    // 0.1.44 appears before the reboot, and its fetch fails: 0.1.43 still awaits the boot.
    let host = host.restarted(|w| {
        w.release = Some(release(44));
        w.fetch = Does::Fails;
    });
    assert!(matches!(host.cycle().await, Outcome::Failed { .. }));
    let state = host.state();
    assert!(matches!(&state.lifecycle, Lifecycle::AwaitingBoot(p) if p.version == "0.1.43"));
    assert_eq!(
        host.world.borrow().profile.as_deref(),
        Some("/nix/store/system-43")
    );
    // Its fetch works: 0.1.44 awaits the boot instead.
    let host = host.restarted(|w| w.fetch = Does::Works);
    assert_eq!(host.cycle().await, Outcome::PendingReboot(release(44)));
    assert!(matches!(&host.state().lifecycle, Lifecycle::AwaitingBoot(p) if p.version == "0.1.44"));
}

#[tokio::test]
async fn a_new_kernel_reboots_by_policy_and_the_reboot_is_settled_after_it() {
    let mut host = fake(|w| w.kernel_changed = true);
    host.settings.reboot = reboot::Policy::WhenNeeded;
    assert_eq!(host.cycle().await, Outcome::Deployed(release(43)));
    let state = host.state();
    assert!(matches!(state.lifecycle, Lifecycle::Rebooting(_)));
    assert_eq!(
        state.status,
        "up to date: 0.1.43 (just deployed); rebooting for a new kernel"
    );
    assert!(
        host.world
            .borrow()
            .log
            .contains(&"hook reboot rebooting".to_string())
    );
    assert_eq!(
        host.world.borrow().did("reboot: hcloud-nixos: rebooting"),
        1
    );
    // After the reboot: recorded, steady, not rebooting again.
    let host = host.restarted(|w| {
        w.boot_id = "boot-2".into();
        w.booted = Some(release(43).store_path);
        w.kernel_changed = false;
    });
    assert_eq!(host.cycle().await, Outcome::UpToDate(release(43)));
    let state = host.state();
    assert_eq!(state.lifecycle, Lifecycle::Steady);
    assert!(state.last_reboot.as_ref().unwrap().ok);
    assert_eq!(host.world.borrow().did("reboot"), 1);
}

#[tokio::test]
async fn an_inhibited_reboot_is_postponed_and_the_lifecycle_goes_back() {
    let mut host = fake(|w| {
        w.kernel_changed = true;
        w.reboot = Ok(reboot::Outcome::Inhibited(vec!["backup (alice)".into()]));
    });
    host.settings.reboot = reboot::Policy::WhenNeeded;
    host.cycle().await;
    let state = host.state();
    assert_eq!(state.lifecycle, Lifecycle::Steady);
    assert!(
        state
            .status
            .ends_with("reboot postponed: blocked by backup (alice)"),
        "{}",
        state.status
    );
    assert!(state.reboot_required);
}

#[tokio::test]
async fn the_fleet_decides_when_and_hears_how_it_ended() {
    // Slots taken: nothing is fetched.
    let host = fake(|w| {
        w.fleet = Some(
            [Turn::Waiting(
                "waiting for a fleet slot: 2 of 2 taken".into(),
            )]
            .into(),
        )
    });
    assert_eq!(
        host.cycle().await,
        Outcome::FleetWaiting("waiting for a fleet slot: 2 of 2 taken".into())
    );
    assert_eq!(host.world.borrow().did("fetch"), 0);
    // Paused for this release elsewhere.
    let host = fake(|w| w.fleet = Some([Turn::Paused("0.1.43 is paused".into())].into()));
    assert!(matches!(host.cycle().await, Outcome::FleetPaused { .. }));
    // Unreachable: a transient failed check, nothing started.
    let host = fake(|w| w.fleet = Some(VecDeque::new()));
    let outcome = host.cycle().await;
    assert!(
        matches!(&outcome, Outcome::Failed { target: None, transient: true, error } if error.contains("is not deployed until it can be asked")),
        "{outcome:?}"
    );
    // Granted: deployed, and the slot goes back saying so.
    let host = fake(|w| w.fleet = Some([Turn::Granted(7)].into()));
    assert_eq!(host.cycle().await, Outcome::Deployed(release(43)));
    assert!(
        host.world
            .borrow()
            .log
            .contains(&"fleet release 7 Deployed { release: \"0.1.43\" }".to_string())
    );
    // A failed release is reported; when the backend is gone the ending is kept for later.
    let host = fake(|w| {
        w.fleet = Some([Turn::Granted(7)].into());
        w.activate = Does::Fails;
        w.fleet_unreachable_on_release = true;
    });
    assert!(matches!(host.cycle().await, Outcome::RolledBack { .. }));
    assert!(matches!(
        host.state().fleet_release,
        Some(Ending::Failed { .. })
    ));
    host.cycle().await;
    assert_eq!(
        host.state().fleet_release,
        None,
        "handed back at the next cycle"
    );
    assert_eq!(host.world.borrow().did("fleet release own"), 1);
}

#[tokio::test]
async fn someone_switching_by_hand_is_waited_for() {
    let host = fake(|w| w.switching = Some("someone is running fh apply (PID 7)".into()));
    assert_eq!(
        host.cycle().await,
        Outcome::Busy("someone is running fh apply (PID 7)".into())
    );
    assert_eq!(host.world.borrow().did("fetch"), 0);
    assert!(host.state().last_check.is_some_and(|c| !c.ok));
}

#[tokio::test]
async fn an_idle_poll_writes_nothing_but_its_time() {
    let host = fake(|_| {});
    assert_eq!(host.cycle().await, Outcome::Deployed(release(43)));
    // The first poll after the deploy changes the status line ("just deployed" goes).
    assert_eq!(host.cycle().await, Outcome::UpToDate(release(43)));
    assert_eq!(host.world.borrow().did("note check"), 0);
    let written = host.state();
    assert_eq!(host.cycle().await, Outcome::UpToDate(release(43)));
    assert_eq!(
        host.world.borrow().did("note check"),
        1,
        "only the time is noted"
    );
    let after = host.state();
    assert!(!after.changed_since(&written), "{after:?}");
    // A check whose result differs is written down.
    let host = host.restarted(|w| w.release = None);
    assert!(matches!(host.cycle().await, Outcome::Failed { .. }));
    assert_eq!(host.world.borrow().did("note check"), 1);
    assert_eq!(host.state().consecutive_failures, 1);
}

//! The lifecycle's pure parts: every transition from every state, deciding, recording.

use super::*;
use crate::agent::lifecycle::state::{Counters, now};

fn target(v: &str) -> Target {
    Target {
        version: v.into(),
        store_path: format!("/nix/store/{:0>32}-system-{v}", v.replace('.', "")),
    }
}

fn failures(t: &Target, count: u32) -> Failures {
    Failures {
        store_path: t.store_path.clone(),
        version: t.version.clone(),
        count,
        last_error: "activation failed".into(),
    }
}

fn in_flight(t: &Target, operation: Operation, phase: Phase) -> InFlight {
    InFlight {
        target: t.clone(),
        operation,
        reference: format!("org/f/={}#a", t.version),
        phase,
        step: None,
        previous_path: Some("/nix/store/prev".into()),
        previous_profile: Some("/nix/store/prev".into()),
        failed_before: Vec::new(),
        started_at: now(),
        fetched_at: None,
        activated_at: None,
    }
}

fn pending(v: &str, boot_id: &str) -> PendingBoot {
    let t = target(v);
    PendingBoot {
        version: t.version,
        store_path: t.store_path,
        previous_profile: Some("/nix/store/prev".into()),
        boot_id: boot_id.into(),
        at: now(),
    }
}

fn deploying(phase: Phase, operation: Operation, awaiting: Option<PendingBoot>) -> Lifecycle {
    Lifecycle::Deploying {
        deploy: in_flight(&target("0.1.43"), operation, phase),
        awaiting,
    }
}

fn confirm() -> Phase {
    Phase::Confirm { until: now() }
}

fn rollback() -> Phase {
    Phase::Rollback {
        failure: "exit 4".into(),
    }
}

/// Every kind of place the lifecycle can stand.
fn every_state() -> Vec<Lifecycle> {
    vec![
        Lifecycle::Steady,
        deploying(Phase::Fetch, Operation::Switch, None),
        deploying(Phase::Activate, Operation::Switch, None),
        deploying(confirm(), Operation::Switch, None),
        deploying(rollback(), Operation::Switch, None),
        deploying(
            Phase::Activate,
            Operation::Boot,
            Some(pending("0.1.42", "b1")),
        ),
        Lifecycle::AwaitingBoot(pending("0.1.42", "b1")),
        Lifecycle::Rebooting(RebootRequest {
            system: "/nix/store/s".into(),
            boot_id: "b1".into(),
            at: now(),
            awaiting: None,
        }),
    ]
}

#[test]
fn a_deploy_begins_only_at_fetch_from_steady_or_awaiting_a_boot() {
    let new = in_flight(&target("0.1.43"), Operation::Switch, Phase::Fetch);
    for from in every_state() {
        let result = from.clone().begin(new.clone());
        match &from {
            Lifecycle::Steady => assert_eq!(
                result,
                Ok(Lifecycle::Deploying {
                    deploy: new.clone(),
                    awaiting: None
                })
            ),
            Lifecycle::AwaitingBoot(p) => assert_eq!(
                result,
                Ok(Lifecycle::Deploying {
                    deploy: new.clone(),
                    awaiting: Some(p.clone())
                })
            ),
            _ => assert!(result.is_err(), "begin from {from:?}"),
        }
    }
    let mid_way = in_flight(&target("0.1.43"), Operation::Switch, Phase::Activate);
    assert!(Lifecycle::Steady.begin(mid_way).is_err());
}

#[test]
fn phases_only_move_forward_or_to_a_rollback() {
    use Phase::*;
    let phases = [Fetch, Activate, confirm(), rollback()];
    let allowed = |from: &Phase, to: &Phase| {
        matches!(
            (from, to),
            (Fetch, Fetch | Activate)
                | (Activate, Activate | Confirm { .. } | Rollback { .. })
                | (Confirm { .. }, Rollback { .. })
                | (Rollback { .. }, Rollback { .. })
        )
    };
    for from in &phases {
        for to in &phases {
            let mut start = deploying(from.clone(), Operation::Switch, None);
            if let Lifecycle::Deploying { deploy, .. } = &mut start {
                deploy.step = Some(StepHandle::Unit("old.service".into()));
            }
            let result = start.enter(to.clone(), now());
            if allowed(from, to) {
                let Ok(Lifecycle::Deploying { deploy, .. }) = result else {
                    panic!("{from:?} -> {to:?}: {result:?}")
                };
                assert_eq!(&deploy.phase, to);
                assert_eq!(deploy.step, None, "the old phase's step is forgotten");
            } else {
                let e = result.unwrap_err();
                assert!(e.to_string().contains("a bug in hcloud-nixos"), "{e}");
            }
        }
    }
    for other in [
        Lifecycle::Steady,
        Lifecycle::AwaitingBoot(pending("1", "b")),
    ] {
        assert!(other.enter(Phase::Activate, now()).is_err());
    }
}

#[test]
fn a_confirmed_deploy_is_steady_and_supersedes_a_release_awaiting_its_boot() {
    let awaiting = pending("0.1.42", "b1");
    let (deploy, next) = deploying(confirm(), Operation::Switch, Some(awaiting.clone()))
        .confirmed()
        .unwrap();
    assert_eq!(deploy.target.version, "0.1.43");
    assert_eq!(next, Lifecycle::Steady);
    assert!(
        deploying(Phase::Activate, Operation::Switch, None)
            .confirmed()
            .is_err()
    );
    // Ended without running: back to the release that awaits its boot.
    let (_, next) = deploying(Phase::Fetch, Operation::Boot, Some(awaiting.clone()))
        .end_deploy()
        .unwrap();
    assert_eq!(next, Lifecycle::AwaitingBoot(awaiting));
    let (_, next) = deploying(rollback(), Operation::Switch, None)
        .end_deploy()
        .unwrap();
    assert_eq!(next, Lifecycle::Steady);
    assert!(Lifecycle::Steady.end_deploy().is_err());
}

#[test]
fn a_boot_release_awaits_the_next_boot_and_is_taken_out_after_it() {
    let at = now();
    let next = deploying(
        Phase::Activate,
        Operation::Boot,
        Some(pending("0.1.42", "b0")),
    )
    .set_for_boot("b1".into(), at)
    .unwrap();
    let Lifecycle::AwaitingBoot(p) = &next else {
        panic!("{next:?}")
    };
    assert_eq!((p.version.as_str(), p.boot_id.as_str()), ("0.1.43", "b1"));
    // Only a boot deploy, only once activated.
    assert!(
        deploying(Phase::Activate, Operation::Switch, None)
            .set_for_boot("b1".into(), at)
            .is_err()
    );
    assert!(
        deploying(Phase::Fetch, Operation::Boot, None)
            .set_for_boot("b1".into(), at)
            .is_err()
    );
    // The same boot: still awaiting; another: taken out, steady.
    let (same, none) = next.clone().take_booted("b1");
    assert_eq!((same, none), (next.clone(), None));
    let (after, taken) = next.take_booted("b2");
    assert_eq!(after, Lifecycle::Steady);
    assert_eq!(taken.unwrap().version, "0.1.43");
    // Its rollback is a deploy in rollback from steady, and nowhere else.
    let back = in_flight(&target("0.1.43"), Operation::Boot, rollback());
    assert!(Lifecycle::Steady.begin_boot_rollback(back.clone()).is_ok());
    assert!(
        Lifecycle::AwaitingBoot(pending("1", "b"))
            .begin_boot_rollback(back.clone())
            .is_err()
    );
    let switch = in_flight(&target("0.1.43"), Operation::Switch, rollback());
    assert!(Lifecycle::Steady.begin_boot_rollback(switch).is_err());
}

#[test]
fn reboots_are_asked_for_from_quiet_states_and_settled_after_the_boot() {
    for from in every_state() {
        let result = from
            .clone()
            .request_reboot("/nix/store/s".into(), "b1".into(), now());
        match &from {
            Lifecycle::Steady | Lifecycle::AwaitingBoot(_) => {
                let Ok(Lifecycle::Rebooting(r)) = result else {
                    panic!("{from:?}: {result:?}")
                };
                assert_eq!(r.awaiting, from.clone().take_booted("other").1);
            }
            _ => assert!(result.is_err(), "reboot from {from:?}"),
        }
    }
    let awaiting = pending("0.1.43", "b1");
    let rebooting = Lifecycle::AwaitingBoot(awaiting.clone())
        .request_reboot("/nix/store/s".into(), "b1".into(), now())
        .unwrap();
    // Not rebooted yet: nothing to settle; abandoned: back to awaiting the boot.
    assert_eq!(rebooting.clone().take_reboot("b1").1, None);
    assert_eq!(
        rebooting.clone().reboot_abandoned().unwrap(),
        Lifecycle::AwaitingBoot(awaiting)
    );
    // Rebooted: the request is done with, the boot release awaits its check.
    let (next, done) = rebooting.take_reboot("b2");
    assert_eq!(done.unwrap().system, "/nix/store/s");
    assert!(matches!(next, Lifecycle::AwaitingBoot(_)));
    assert!(Lifecycle::Steady.reboot_abandoned().is_err());
}

#[test]
fn a_refused_transition_leaves_the_state_where_it_stood() {
    let mut state = State {
        lifecycle: Lifecycle::AwaitingBoot(pending("0.1.42", "b1")),
        ..Default::default()
    };
    let before = state.lifecycle.clone();
    assert!(
        state
            .transition(|l| l.enter(Phase::Activate, now()))
            .is_err()
    );
    assert!(state.transition_with(Lifecycle::confirmed).is_err());
    assert_eq!(state.lifecycle, before);
    assert_eq!(state.pending_boot().unwrap().version, "0.1.42");
}

fn decide_now(desired: &Target, current: Option<&str>, state: &State) -> Decision {
    decide(desired, current, state, 3, None, Duration::ZERO, now())
}

#[test]
fn decide_compares_store_paths_and_counts_failures() {
    let new = target("0.1.43");
    let old = target("0.1.42");
    let mut state = State::default();
    assert_eq!(
        decide_now(&new, Some(&new.store_path), &state),
        Decision::UpToDate
    );
    assert_eq!(
        decide_now(&new, Some(&old.store_path), &state),
        Decision::Apply
    );
    assert_eq!(decide_now(&new, None, &state), Decision::Apply);
    state.failures = Some(failures(&new, 2));
    assert_eq!(
        decide_now(&new, Some(&old.store_path), &state),
        Decision::Apply
    );
    state.failures = Some(failures(&new, 3));
    assert!(matches!(
        decide_now(&new, Some(&old.store_path), &state),
        Decision::Hold { .. }
    ));
    // Failures of another release do not hold this one back.
    state.failures = Some(failures(&old, 9));
    assert_eq!(
        decide_now(&new, Some(&old.store_path), &state),
        Decision::Apply
    );
}

#[test]
fn a_quarantined_release_is_held_even_when_it_runs() {
    // After a rollback that could not switch back, the failed release runs: not "up to date".
    let new = target("0.1.43");
    let mut state = State::default();
    state.quarantine(&new, "units failed", now());
    assert!(matches!(
        decide_now(&new, Some(&new.store_path), &state),
        Decision::Hold { .. }
    ));
}

#[test]
fn quarantined_store_paths_are_held_newest_first_and_bounded() {
    let new = target("0.1.43");
    let mut state = State::default();
    state.quarantine(&new, "health check failed", now());
    assert_eq!(
        decide_now(&new, Some("/nix/store/x"), &state),
        Decision::Hold {
            reason: "health check failed".into()
        }
    );
    assert_eq!(
        decide_now(&target("0.1.44"), Some("/nix/store/x"), &state),
        Decision::Apply
    );
    for i in 0..30 {
        state.quarantine(&target(&format!("1.{i}")), "x", now());
    }
    assert_eq!(state.quarantined.len(), QUARANTINE_KEEP);
    assert_eq!(state.quarantined[0].version, "1.29", "newest first");
    assert!(state.lift_quarantines_except(&target("1.29")));
    assert_eq!(state.quarantined.len(), 1);
    assert!(!state.lift_quarantines_except(&target("1.29")));
}

#[test]
fn min_release_age_waits_until_the_release_is_old_enough() {
    let new = target("0.1.43");
    let state = State::default();
    let published = Timestamp::from_second(1_700_000_000).unwrap();
    let hour = Duration::from_secs(3600);
    let at = |now: Timestamp| {
        decide(
            &new,
            Some("/nix/store/x"),
            &state,
            3,
            Some(published),
            hour,
            now,
        )
    };
    assert_eq!(
        at(later(published, Duration::from_secs(60))),
        Decision::Wait {
            until: Some("2023-11-14T23:13:20Z".parse().unwrap())
        }
    );
    assert_eq!(at(later(published, hour)), Decision::Apply);
    // Unknown age with a minimum set: waits for good, never applied early.
    assert_eq!(
        decide(&new, Some("/nix/store/x"), &state, 3, None, hour, published),
        Decision::Wait { until: None }
    );
    // Zero means no waiting at all (canaries).
    assert_eq!(
        decide(
            &new,
            Some("/nix/store/x"),
            &state,
            3,
            Some(published),
            Duration::ZERO,
            published
        ),
        Decision::Apply
    );
    // A deadline past the end of time is the end of time, never a panic.
    assert_eq!(later(published, Duration::MAX), Timestamp::MAX);
}

#[test]
fn record_counts_each_deploy_once_and_tracks_failures() {
    let mut state = State::default();
    let t = target("0.1.43");
    let f = in_flight(&t, Operation::Switch, Phase::Fetch);
    state.record(&f, Some("boom".into()), now());
    assert_eq!(state.deploys, 1);
    assert_eq!(state.failures.as_ref().unwrap().count, 1);
    state.record(&f, Some("boom again".into()), now());
    assert_eq!(state.failures.as_ref().unwrap().count, 2);
    assert_eq!(state.failures.as_ref().unwrap().last_error, "boom again");
    assert_eq!(
        state.last_deploy.as_ref().unwrap().outcome,
        Recorded::Failed
    );
    state.record(&f, None, now());
    assert_eq!(state.deploys, 3);
    assert_eq!(state.failures, None);
    assert_eq!(state.running, Some(t));
    assert_eq!(state.last_deploy.unwrap().outcome, Recorded::Success);
}

#[test]
fn counters_from_a_state_file_at_their_limit_stay_there() {
    // A state file says what it says: counting on from its largest numbers must not overflow.
    let t = target("0.1.43");
    let mut state = State {
        deploys: u64::MAX,
        counters: Counters {
            deploys_succeeded: u64::MAX,
            deploys_failed: u64::MAX,
            rollbacks_succeeded: u64::MAX,
            rollbacks_failed: u64::MAX,
        },
        failures: Some(failures(&t, u32::MAX)),
        ..State::default()
    };
    let f = in_flight(&t, Operation::Switch, Phase::Fetch);
    state.record(&f, Some("boom".into()), now());
    assert_eq!(state.failures.as_ref().unwrap().count, u32::MAX);
    state.record(&f, None, now());
    assert_eq!(state.deploys, u64::MAX);
    assert_eq!(state.counters.deploys_succeeded, u64::MAX);
}

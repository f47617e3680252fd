//! The pure parts of a cycle: deciding, recording, status lines and delays.

use super::*;

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

fn decide_now(desired: &Target, current: Option<&str>, state: &State) -> Decision {
    decide(
        desired,
        current,
        state,
        3,
        None,
        Duration::ZERO,
        SystemTime::now(),
    )
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
    quarantine(&mut state, &in_flight(&new), "units failed");
    assert!(matches!(
        decide_now(&new, Some(&new.store_path), &state),
        Decision::Hold { .. }
    ));
}

#[test]
fn quarantined_store_paths_are_held() {
    let new = target("0.1.43");
    let mut state = State::default();
    quarantine(&mut state, &in_flight(&new), "health check failed");
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
        quarantine(&mut state, &in_flight(&target(&format!("1.{i}"))), "x");
    }
    assert_eq!(state.quarantined.len(), QUARANTINE_KEEP);
    assert_eq!(state.quarantined[0].version, "1.29", "newest first");
}

#[test]
fn min_release_age_waits_until_the_release_is_old_enough() {
    let new = target("0.1.43");
    let state = State::default();
    let published = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let hour = Duration::from_secs(3600);
    let at = |now: SystemTime| {
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
        at(published + Duration::from_secs(60)),
        Decision::Wait {
            until: Some("2023-11-14T23:13:20Z".into())
        }
    );
    assert_eq!(at(published + hour), Decision::Apply);
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
}

fn in_flight(t: &Target) -> InFlight {
    InFlight {
        version: t.version.clone(),
        store_path: t.store_path.clone(),
        operation: "switch".into(),
        reference: format!("org/f/={}#a", t.version),
        phase: Phase::Fetch,
        unit: None,
        pid: None,
        previous_path: None,
        previous_profile: None,
        failed_before: Vec::new(),
        confirm_until: None,
        failure: None,
        started_at: state::now(),
    }
}

#[test]
fn record_counts_each_deploy_once_and_tracks_failures() {
    let mut state = State::default();
    let t = target("0.1.43");
    state.in_flight = Some(in_flight(&t));
    record(&mut state, &in_flight(&t), Some("boom".into()));
    assert_eq!(state.deploys, 1);
    assert_eq!(state.in_flight, None);
    assert_eq!(state.failures.as_ref().unwrap().count, 1);
    record(&mut state, &in_flight(&t), Some("boom again".into()));
    assert_eq!(state.failures.as_ref().unwrap().count, 2);
    assert_eq!(state.failures.as_ref().unwrap().last_error, "boom again");
    assert_eq!(
        state.last_deploy.as_ref().unwrap().outcome,
        Recorded::Failed
    );
    record(&mut state, &in_flight(&t), None);
    assert_eq!(state.deploys, 3);
    assert_eq!(state.failures, None);
    assert_eq!(state.running, Some(t));
    assert_eq!(state.last_deploy.unwrap().outcome, Recorded::Success);
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
        Outcome::Failed {
            target: None,
            error: "cannot reach FlakeHub".into(),
            transient: true
        }
        .status_line(None),
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
        target: t,
        error: "units failed: web.service".into(),
        rollback_ok: true,
    };
    assert_eq!(
        rolled.status_line(Some("0.1.42")),
        "deploy of 0.1.43 failed and was rolled back: units failed: web.service; running 0.1.42"
    );
    assert!(rolled.failed());
    assert!(Outcome::Idle("no reference".into()).ok());
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
fn locks_keep_applies_apart() {
    let dir = tempfile::tempdir().unwrap();
    let first = take_lock(dir.path(), false).unwrap();
    assert!(first.is_some());
    assert!(
        take_lock(dir.path(), false).unwrap().is_none(),
        "second lock must fail"
    );
    drop(first);
    assert!(take_lock(dir.path(), false).unwrap().is_some());
}

#[test]
fn a_held_switch_lock_means_someone_switches() {
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("switch-to-configuration.lock");
    assert!(!switch_in_progress(&lock), "no lock file: nobody switches");
    let file = File::create(&lock).unwrap();
    assert!(!switch_in_progress(&lock));
    let held = Flock::lock(file, FlockArg::LockExclusive).unwrap();
    assert!(switch_in_progress(&lock));
    drop(held);
    assert!(!switch_in_progress(&lock));
}

#[test]
fn recognises_fh_apply_command_lines() {
    assert!(is_fh_apply(
        b"/nix/store/x-fh/bin/fh\0apply\0nixos\0org/f/=1#a\0switch\0"
    ));
    assert!(is_fh_apply(b"fh\0apply\0nixos\0"));
    assert!(is_fh_apply(
        b"/bin/bash\0/tmp/t/bin/fh\0apply\0nixos\0r\0switch\0"
    ));
    assert!(!is_fh_apply(b"fh\0search\0nixos\0"));
    assert!(!is_fh_apply(b"/bin/myfh\0apply\0nixos\0"));
    assert!(!is_fh_apply(b""));
}

#[test]
fn hooks_hear_of_deploys_and_rollbacks() {
    let t = target("0.1.43");
    let mut state = State::default();
    let mut f = in_flight(&t);
    f.previous_path = Some("/nix/store/prev".into());
    record(&mut state, &f, None);
    let events = deploy_events(&Outcome::Deployed(t.clone()), &state);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, EventKind::Deploy);
    assert_eq!(events[0].outcome, "success");
    assert_eq!(events[0].previous_path.as_deref(), Some("/nix/store/prev"));
    let rolled = Outcome::RolledBack {
        target: t.clone(),
        error: "units failed: web.service".into(),
        rollback_ok: false,
    };
    let events = deploy_events(&rolled, &state);
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
    assert!(deploy_events(&Outcome::UpToDate(t), &state).is_empty());
}

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

#[test]
fn decide_compares_store_paths_and_counts_failures() {
    let new = target("0.1.43");
    let old = target("0.1.42");
    assert_eq!(
        decide(&new, Some(&new.store_path), None, 3),
        Decision::UpToDate
    );
    assert_eq!(
        decide(&new, Some(&old.store_path), None, 3),
        Decision::Apply
    );
    assert_eq!(decide(&new, None, None, 3), Decision::Apply);
    assert_eq!(
        decide(&new, Some(&old.store_path), Some(&failures(&new, 2)), 3),
        Decision::Apply
    );
    assert_eq!(
        decide(&new, Some(&old.store_path), Some(&failures(&new, 3)), 3),
        Decision::GiveUp {
            attempts: 3,
            error: "activation failed".into()
        }
    );
    // Failures of another release do not hold this one back.
    assert_eq!(
        decide(&new, Some(&old.store_path), Some(&failures(&old, 9)), 3),
        Decision::Apply
    );
}

fn in_flight(t: &Target) -> InFlight {
    InFlight {
        version: t.version.clone(),
        store_path: t.store_path.clone(),
        operation: "switch".into(),
        unit: None,
        reference: format!("org/f/={}#a", t.version),
        pid: None,
        previous_path: None,
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
    let given_up = Outcome::GivenUp {
        target: t,
        attempts: 3,
        error: "x".into(),
    };
    assert!(given_up.status_line(None).contains("failed 3 times"));
    assert!(!given_up.ok());
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
    let first = take_lock(dir.path()).unwrap();
    assert!(first.is_some());
    assert!(
        take_lock(dir.path()).unwrap().is_none(),
        "second lock must fail"
    );
    drop(first);
    assert!(take_lock(dir.path()).unwrap().is_some());
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

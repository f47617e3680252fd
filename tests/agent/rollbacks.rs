//! The agent's rollbacks end to end: failed and overlong activations, health checks (FlakeHub
//! itself, commands, URLs) within `confirm_timeout`, agents killed while confirming or rolling
//! back, rollbacks that fail.

use std::time::Duration;

use harness::agent::helpers::{
    HOOKS, activating, check_script, checks_run, fh_fetch, hook_kinds, kinds, metrics_file, secs,
    str_at, write_hook_recorder,
};
use harness::agent::{Bench, Kind, Options};
use harness::bench;
use harness::flakehub::Down;
use harness::health::HealthEndpoint;
use harness::prometheus::metric;

#[test]
fn a_failed_activation_is_rolled_back_and_the_release_quarantined() {
    let b = bench!("activation_fails");
    let base = b.current_system();
    let (v1, p1) = b.release(1, Kind::ActivationFails);
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!(
            "deploy of {v1} failed and was rolled back: switch-to-configuration switch exited with status 1"
        )
    );
    // fh exited 0 (it made generation 2); the activation failed; the base system was activated
    // again and the profile set back to it (generation 3).
    assert_eq!(b.fh_runs(), vec![fh_fetch("infra", &v1)]);
    assert_eq!(
        b.activations(),
        vec!["r1 dry-activate", "r1 switch", "base switch"]
    );
    assert_eq!(b.current_system(), base);
    assert_eq!(b.profile_system(), base);
    assert_eq!(
        b.generations(),
        vec![(1, base.clone()), (2, p1.clone()), (3, base.clone())]
    );
    let state = b.state();
    assert_eq!(str_at(&state, "/last_deploy/outcome"), "failed");
    assert_eq!(str_at(&state, "/quarantined/0/store_path"), p1);
    assert!(state.get("in_flight").is_none(), "{state}");

    // Quarantined: not tried again, until a newer release appears.
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    assert!(
        run.stdout.starts_with(&format!("{v1} is quarantined ("))
            && run.stdout.contains("waiting for a newer release"),
        "{}",
        run.stdout
    );
    assert_eq!(b.fh_runs().len(), 1);
    let (v2, p2) = b.release(2, Kind::Normal);
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!("up to date: {v2} (just deployed)")
    );
    assert_eq!(b.current_system(), p2);
}

#[test]
fn exit_4_after_the_switch_is_rolled_back() {
    let b = bench!("exit_4");
    let base = b.current_system();
    let (v1, _) = b.release(1, Kind::Exit4);
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!(
            "deploy of {v1} failed and was rolled back: switch-to-configuration switch exited with status 4"
        )
    );
    assert_eq!(
        b.activations(),
        vec!["r1 dry-activate", "r1 switch", "base switch"]
    );
    assert_eq!(b.current_system(), base);
}

#[test]
fn an_activation_over_its_timeout_is_stopped_and_rolled_back() {
    let b = bench!(
        "apply_timeout",
        Options {
            apply_timeout: "2s",
            ..Options::default()
        }
    );
    let base = b.current_system();
    let (v1, p1) = b.release(1, Kind::Slow(4));
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!(
            "deploy of {v1} failed and was rolled back: switch-to-configuration switch did not finish within 2s and was stopped"
        )
    );
    assert_eq!(b.current_system(), base);
    // Stopped for good: it does not switch later behind the agent's back.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(b.current_system(), base);
    assert_eq!(str_at(&b.state(), "/quarantined/0/store_path"), p1);
}

/// FlakeHub answering at all (here 503) proves the new system's network works: no rollback.
#[test]
fn flakehub_answering_503_after_the_switch_does_not_roll_back_a_healthy_system() {
    let b = bench!("flakehub_503_while_confirming");
    let (v1, p1) = b.release(1, Kind::Slow(2));
    let mut once = b.spawn_once();
    b.wait_for(secs(30), "the activation", || activating(&b));
    // FlakeHub answers, with 503: the new system's network works; FlakeHub has an outage.
    b.flakehub.set_down(Some(Down::Status(503)));
    let status = once.wait(secs(60));
    let out = std::fs::read_to_string(&once.stdout).unwrap_or_default();
    assert!(status.success(), "{status}: {}", once.output());
    assert_eq!(out.trim(), format!("up to date: {v1} (just deployed)"));
    assert_eq!(b.current_system(), p1);
}

/// A release whose switch cuts the machine off FlakeHub (the stand-in refuses to answer while
/// its flag exists) does not confirm within `confirm_timeout`: rolled back (the base system's
/// switch restores the network), quarantined.
#[test]
fn a_release_that_cuts_flakehub_off_is_rolled_back_within_the_confirm_timeout() {
    let b = bench!(
        "flakehub_cut_off",
        Options {
            confirm_timeout: "4s",
            ..Options::default()
        }
    );
    let base = b.current_system();
    b.flakehub
        .set_down_while_file_exists(Some((&b.flag("no-network"), Down::Close)));
    let (v1, p1) = b.release(1, Kind::SetsFlag("no-network"));
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    let line = run.stdout.trim();
    assert!(
        line.starts_with(&format!(
            "deploy of {v1} failed and was rolled back: not healthy within 4s: FlakeHub is not reachable: cannot reach FlakeHub at"
        )),
        "{line}"
    );
    assert_eq!(
        b.activations(),
        vec!["r1 dry-activate", "r1 switch", "base switch"]
    );
    assert_eq!(b.current_system(), base);
    assert_eq!(b.profile_system(), base);
    assert!(!b.flag("no-network").exists());
    let state = b.state();
    assert_eq!(str_at(&state, "/quarantined/0/store_path"), p1);
    assert_eq!(str_at(&state, "/last_deploy/outcome"), "failed");
    assert!(state.get("in_flight").is_none(), "{state}");
    // From the switch to the rollback: the confirm timeout (its deadline is kept to the
    // second), plus at most one pause between health rounds (2 s) and some slack.
    let times = b.activation_times();
    let at = |what: &str| times.iter().find(|(w, _)| w == what).unwrap().1;
    let waited = at("base switch") - at("r1 switch");
    assert!(
        (3.0..=7.5).contains(&waited),
        "rolled back {waited:.1}s after the switch: {times:?}"
    );

    // Quarantined: the next cycle does not try it again.
    let run = b.once();
    assert!(run.stdout.starts_with(&format!("{v1} is quarantined (")));
    assert_eq!(b.fh_runs().len(), 1);
}

#[test]
fn a_failing_command_health_check_rolls_back_and_a_passing_one_lets_the_next_release_through() {
    let b = bench!(
        "command_health_check",
        Options {
            confirm_timeout: "3s",
            tables: "[[health_check]]\ncommand = [\"@ROOT@/bin/check-app\", \"--quick\"]\ntimeout = \"5s\"\n".into(),
            ..Options::default()
        }
    );
    check_script(&b, "check-app", "app-broken");
    let base = b.current_system();
    let (v1, p1) = b.release(1, Kind::SetsFlag("app-broken"));
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    let line = run.stdout.trim();
    let check = b.path("bin/check-app").display().to_string();
    assert!(
        line.starts_with(&format!(
            "deploy of {v1} failed and was rolled back: not healthy within 3s: health check `{check} --quick` failed"
        )) && line.ends_with("check-app: the app does not answer"),
        "{line}"
    );
    assert_eq!(
        b.activations(),
        vec!["r1 dry-activate", "r1 switch", "base switch"]
    );
    assert_eq!(b.current_system(), base);
    assert_eq!(str_at(&b.state(), "/quarantined/0/store_path"), p1);
    // Tried until the deadline (rounds 2 s apart), then once more after the rollback.
    let checks = checks_run(&b);
    assert!((3..=4).contains(&checks), "{checks} health check runs");

    let (v2, p2) = b.release(2, Kind::Normal);
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!("up to date: {v2} (just deployed)")
    );
    assert_eq!(b.current_system(), p2);
    assert_eq!(checks_run(&b), checks + 1, "the check ran once and passed");
    assert!(
        b.state()
            .get("quarantined")
            .is_none_or(|q| q.as_array().is_some_and(|a| a.is_empty()))
    );
}

#[test]
fn a_failing_url_health_check_rolls_back_and_a_passing_one_lets_the_next_release_through() {
    let mut b = bench!(
        "url_health_check",
        Options {
            confirm_timeout: "3s",
            ..Options::default()
        }
    );
    let endpoint = HealthEndpoint::start(b.flag("web-broken"));
    b.opts.tables = format!(
        "[[health_check]]\nurl = \"{}\"\ntimeout = \"2s\"\n",
        endpoint.url
    );
    b.write_config();
    let base = b.current_system();
    let (v1, p1) = b.release(1, Kind::SetsFlag("web-broken"));
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!(
            "deploy of {v1} failed and was rolled back: not healthy within 3s: health check {} answered HTTP 500",
            endpoint.url
        )
    );
    assert_eq!(b.current_system(), base);
    assert_eq!(str_at(&b.state(), "/quarantined/0/store_path"), p1);
    let hits = endpoint.hits();
    assert!(hits >= 3, "{hits} requests to the health endpoint");

    let (v2, p2) = b.release(2, Kind::Normal);
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!("up to date: {v2} (just deployed)")
    );
    assert_eq!(b.current_system(), p2);
    assert_eq!(endpoint.hits(), hits + 1);
}

/// A service that needs a moment after the switch: the first round fails, the second passes,
/// well inside `confirm_timeout`. Deployed, not rolled back.
#[test]
fn a_health_check_that_passes_on_its_second_try_lets_the_deploy_through() {
    let b = bench!(
        "health_check_second_try",
        Options {
            confirm_timeout: "10s",
            tables: "[[health_check]]\ncommand = [\"@ROOT@/bin/check-warm\"]\n".into(),
            ..Options::default()
        }
    );
    // Fails once (and removes the flag that says so).
    b.script(
        "bin/check-warm",
        "#!/bin/bash\necho \"warm $(date +%s.%N)\" >>@ROOT@/logs/checks.log\n\
         if [ -e @ROOT@/flags/warming-up ]; then rm @ROOT@/flags/warming-up; echo warming up >&2; exit 1; fi\n",
    );
    let (v1, p1) = b.release(1, Kind::SetsFlag("warming-up"));
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!("up to date: {v1} (just deployed)")
    );
    assert_eq!(b.current_system(), p1);
    assert_eq!(checks_run(&b), 2);
    assert_eq!(b.activations(), vec!["r1 dry-activate", "r1 switch"]);
    assert!(
        b.state()
            .get("quarantined")
            .is_none_or(|q| q.as_array().is_some_and(|a| a.is_empty()))
    );
}

/// Waits for the deploy to be in its confirm phase with its deadline written down; returns
/// the deadline.
fn wait_for_confirm(b: &Bench) -> std::time::SystemTime {
    b.wait_for(secs(30), "the confirm phase with its deadline", || {
        let s = b.state();
        str_at(&s, "/in_flight/phase") == "confirm"
            && !str_at(&s, "/in_flight/confirm_until").is_empty()
    });
    // A health round has begun.
    b.wait_for(secs(10), "a health check", || checks_run(b) >= 1);
    humantime::parse_rfc3339_weak(str_at(&b.state(), "/in_flight/confirm_until")).unwrap()
}

#[test]
fn an_agent_killed_while_confirming_resumes_the_wait_and_confirms() {
    let b = bench!(
        "killed_while_confirming",
        Options {
            confirm_timeout: "30s",
            tables: "[[health_check]]\ncommand = [\"@ROOT@/bin/check-app\"]\n".into(),
            ..Options::default()
        }
    );
    check_script(&b, "check-app", "app-broken");
    let (v1, p1) = b.release(1, Kind::SetsFlag("app-broken"));
    let mut first = b.start_agent();
    let until = wait_for_confirm(&b);
    first.kill9();
    assert_eq!(b.current_system(), p1);
    let left = until
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(left > secs(20), "the deadline is only {left:?} away");

    // The app comes up while no agent runs; the next agent picks the confirm phase up.
    std::fs::remove_file(b.flag("app-broken")).unwrap();
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!("up to date: {v1} (just deployed)")
    );
    assert!(
        run.stderr
            .contains("carrying on with the deploy an earlier agent process started"),
        "{}",
        run.stderr
    );
    assert_eq!(b.fh_runs(), vec![fh_fetch("infra", &v1)]);
    assert_eq!(b.activations(), vec!["r1 dry-activate", "r1 switch"]);
    let state = b.state();
    assert_eq!(state["deploys"], 1, "{state}");
    assert_eq!(str_at(&state, "/last_deploy/outcome"), "success");
    assert_eq!(str_at(&state, "/running/version"), v1);
    assert!(state.get("in_flight").is_none(), "{state}");
}

/// The deadline is the one written down at the switch: an agent that comes back after it, with
/// the check still failing, rolls back after one round instead of waiting anew.
#[test]
fn an_agent_back_after_the_confirm_deadline_rolls_back_without_waiting_again() {
    let b = bench!(
        "back_after_confirm_deadline",
        Options {
            confirm_timeout: "4s",
            tables: "[[health_check]]\ncommand = [\"@ROOT@/bin/check-app\"]\n".into(),
            ..Options::default()
        }
    );
    check_script(&b, "check-app", "app-broken");
    let base = b.current_system();
    let (v1, p1) = b.release(1, Kind::SetsFlag("app-broken"));
    let mut first = b.start_agent();
    let until = wait_for_confirm(&b);
    first.kill9();
    while std::time::SystemTime::now() <= until + Duration::from_millis(300) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = checks_run(&b);
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    assert!(
        run.stdout.trim().starts_with(&format!(
            "deploy of {v1} failed and was rolled back: not healthy within 4s: health check"
        )),
        "{}",
        run.stdout
    );
    // One failing round past the deadline, one passing round after the rollback.
    assert_eq!(checks_run(&b) - before, 2);
    assert_eq!(b.current_system(), base);
    assert_eq!(
        b.activations(),
        vec!["r1 dry-activate", "r1 switch", "base switch"]
    );
    let state = b.state();
    assert_eq!(state["deploys"], 1, "{state}");
    assert_eq!(str_at(&state, "/quarantined/0/store_path"), p1);
    assert!(state.get("in_flight").is_none(), "{state}");
}

/// The system rolled back to fails its own activation: the status says the rollback did not end
/// healthy, the hooks hear `rollback` `failed`, the metrics count a failed rollback.
#[test]
fn a_rollback_that_fails_is_reported_to_status_hooks_and_metrics() {
    let b = bench!(
        "rollback_fails",
        Options {
            tables: format!("{HOOKS}\n[metrics]\ntextfile = \"@ROOT@/metrics.prom\"\n"),
            ..Options::default()
        }
    );
    write_hook_recorder(&b);
    // What runs now activates, but not a second time.
    let old = b.system("old", Kind::ActivationFails);
    b.boot_into(&old);
    let (v1, p1) = b.release(1, Kind::Exit4);
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!(
            "deploy of {v1} failed (switch-to-configuration switch exited with status 4) and the rollback did not end healthy; look at `journalctl -u 'hcloud-nixos-*'`"
        )
    );
    assert_eq!(
        b.activations(),
        vec!["r1 dry-activate", "r1 switch", "old switch"]
    );
    assert_eq!(
        hook_kinds(&b),
        kinds(&[("deploy", "rolled-back"), ("rollback", "failed")])
    );
    let m = metrics_file(&b);
    assert_eq!(
        metric(&m, "hcloud_nixos_rollbacks_total{outcome=\"failed\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "hcloud_nixos_rollbacks_total{outcome=\"success\"}"),
        0.0
    );
    let state = b.state();
    assert_eq!(str_at(&state, "/quarantined/0/store_path"), p1);
    assert!(state.get("in_flight").is_none(), "{state}");
    // Not tried again.
    b.once();
    assert_eq!(b.fh_runs().len(), 1);
}

/// After a rollback that did not end healthy the failed release may still run. The next cycle
/// must not call that "up to date" (nor record it as the healthy running release).
#[test]
fn after_a_failed_rollback_the_failed_release_is_not_called_up_to_date() {
    let b = bench!("rollback_fails_then_up_to_date");
    let old = b.system("old", Kind::ActivationFails);
    b.boot_into(&old);
    let (v1, p1) = b.release(1, Kind::Exit4);
    assert!(!b.once().ok());
    // The rollback could not switch back: the failed release still runs.
    assert_eq!(b.current_system(), p1);
    let run = b.once();
    assert_eq!(b.fh_runs().len(), 1, "tried again");
    assert!(
        !run.ok() && !run.stdout.starts_with(&format!("up to date: {v1}")),
        "{}",
        run.all()
    );
    assert!(b.state().get("running").is_none(), "{}", b.state());
}

/// The agent is killed while the rollback's activation runs: the next agent waits for that
/// activation instead of starting another, and records the rollback once.
#[test]
fn an_agent_killed_during_a_rollback_finishes_it_once() {
    let b = bench!("killed_during_rollback");
    let old = b.system("old", Kind::Slow(3));
    b.boot_into(&old);
    let (v1, p1) = b.release(1, Kind::ActivationFails);
    let mut first = b.start_agent();
    b.wait_for(secs(30), "the rollback's activation with its PID", || {
        let s = b.state();
        str_at(&s, "/in_flight/phase") == "rollback" && s.pointer("/in_flight/pid").is_some()
    });
    first.kill9();
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!(
            "deploy of {v1} failed and was rolled back: switch-to-configuration switch exited with status 1"
        )
    );
    assert!(
        run.stderr
            .contains("a step started by an earlier agent is still running"),
        "{}",
        run.stderr
    );
    assert_eq!(
        b.activations(),
        vec!["r1 dry-activate", "r1 switch", "old switch"],
        "the rollback ran twice"
    );
    assert_eq!(b.current_system(), old);
    let state = b.state();
    assert_eq!(state["deploys"], 1, "{state}");
    assert_eq!(state["counters"]["rollbacks_succeeded"], 1, "{state}");
    assert_eq!(str_at(&state, "/quarantined/0/store_path"), p1);
    assert!(state.get("in_flight").is_none(), "{state}");
}

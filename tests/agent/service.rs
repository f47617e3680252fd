//! The agent as a service end to end: signals (SIGHUP, SIGUSR1, SIGTERM, SIGKILL), `hcloud-nixos
//! check`, an fh an operator runs, steps that outlive their agent, programs checked at start.

use std::time::Duration;

use harness::agent::helpers::{activating, fh_fetch, now_rfc3339, secs, str_at};
use harness::agent::{ATTR, Encoding, Kind, ORG, Options, TOKEN};
use harness::bench;
use nix::sys::signal::Signal;

#[test]
fn an_agent_killed_during_an_apply_does_not_apply_again() {
    let b = bench!("killed_during_apply");
    let (v1, p1) = b.release(1, Kind::Slow(4));
    let mut first = b.start_agent();
    b.wait_for(secs(30), "the activation's PID in the state", || {
        activating(&b)
    });
    first.kill9();
    // fh goes on without its agent (reparented to the namespace's init, which reaps it).
    assert_eq!(b.current_system(), b.generations()[0].1, "switched already");

    let mut second = b.start_agent();
    b.wait_for(secs(40), "the release recorded as running", || {
        str_at(&b.state(), "/running/version") == v1
    });
    assert_eq!(b.current_system(), p1);
    assert_eq!(b.fh_runs(), vec![fh_fetch("infra", &v1)], "fh ran twice");
    assert_eq!(
        b.activations(),
        vec!["r1 dry-activate", "r1 switch"],
        "activated twice"
    );
    assert!(
        second
            .output()
            .contains("a step started by an earlier agent is still running"),
        "{}",
        second.output()
    );
    let state = b.state();
    assert_eq!(state["deploys"], 1, "{state}");
    assert_eq!(str_at(&state, "/last_deploy/outcome"), "success");
    assert!(state.get("in_flight").is_none());

    // SIGTERM stops the service; the PID file goes with it.
    let status = second
        .stop(secs(15))
        .expect("the agent did not stop on SIGTERM");
    assert!(status.success(), "{status}");
    assert!(!b.run_dir().join("agent.pid").exists());
}

#[test]
fn sighup_follows_changed_user_data_without_a_restart() {
    let b = bench!(
        "sighup",
        Options {
            poll_interval: "1h",
            ..Options::default()
        }
    );
    let (v1, _) = b.release(1, Kind::Normal);
    let mut agent = b.start_agent();
    b.wait_for(secs(30), "the first release running", || {
        str_at(&b.state(), "/running/version") == v1
    });
    let p_next = b.system("next1", Kind::Normal);
    let v_next = b.publish_to("infra-next", 1, &p_next);
    b.release(2, Kind::Normal); // on the old flake: must not be what is followed
    b.set_userdata(
        &format!("{ORG}/infra-next/*#{ATTR}"),
        Some(TOKEN),
        Encoding::Base64,
    );
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(b.fh_runs().len(), 1, "acted without being told");

    agent.signal(Signal::SIGHUP);
    b.wait_for(secs(30), "the new flake's release running", || {
        b.current_system() == p_next
    });
    assert_eq!(
        b.fh_runs().last().unwrap(),
        &fh_fetch("infra-next", &v_next)
    );
    assert!(agent.running(), "the agent exited: {}", agent.output());
    assert_eq!(b.fh_runs().len(), 2);
}

#[test]
fn check_and_sigusr1_make_the_service_check_now() {
    let b = bench!(
        "check_now",
        Options {
            poll_interval: "1h",
            ..Options::default()
        }
    );
    let (v1, _) = b.release(1, Kind::Normal);
    let mut agent = b.start_agent();
    b.wait_for(secs(30), "the first release running", || {
        str_at(&b.state(), "/running/version") == v1
    });
    b.wait_for(secs(10), "the PID file", || {
        b.run_dir().join("agent.pid").exists()
    });

    let (_, p2) = b.release(2, Kind::Normal);
    let run = b.run(&["check"], secs(30));
    assert!(run.ok(), "{}", run.all());
    // The PID as the agent's PID namespace numbers it.
    let pid = std::fs::read_to_string(b.run_dir().join("agent.pid")).unwrap();
    assert!(
        run.stderr
            .contains(&format!("asked the agent (PID {})", pid.trim())),
        "{}",
        run.stderr
    );
    b.wait_for(secs(20), "0.1.2 running after `check`", || {
        b.current_system() == p2
    });

    let (_, p3) = b.release(3, Kind::Normal);
    std::thread::sleep(Duration::from_millis(300));
    agent.signal(Signal::SIGUSR1);
    b.wait_for(secs(20), "0.1.3 running after SIGUSR1", || {
        b.current_system() == p3
    });
    assert!(agent.running(), "the agent exited: {}", agent.output());
    assert_eq!(b.fh_runs().len(), 3);
}

#[test]
fn sigterm_during_a_direct_activation_waits_for_it() {
    let b = bench!("sigterm_during_apply");
    let (v1, p1) = b.release(1, Kind::Slow(3));
    let mut agent = b.start_agent();
    b.wait_for(secs(30), "the activation", || activating(&b));
    agent.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        agent.running(),
        "stopped in the middle of the apply: {}",
        agent.output()
    );
    let status = agent.wait(secs(30));
    assert!(status.success(), "{status}: {}", agent.output());
    assert_eq!(b.current_system(), p1);
    let state = b.state();
    assert_eq!(str_at(&state, "/running/version"), v1);
    assert_eq!(str_at(&state, "/last_deploy/outcome"), "success");
    assert!(state.get("in_flight").is_none(), "{state}");
}

#[test]
fn an_apply_that_ended_while_the_agent_was_away_is_recorded_once() {
    let b = bench!("apply_ended_while_away");
    let (v1, p1) = b.release(1, Kind::Slow(2));
    let mut first = b.start_agent();
    b.wait_for(secs(30), "the activation", || activating(&b));
    first.kill9();
    b.wait_for(secs(30), "the orphaned activation to switch", || {
        b.current_system() == p1
    });
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!("up to date: {v1} (just deployed)")
    );
    assert_eq!(b.fh_runs().len(), 1);
    assert_eq!(b.activations(), vec!["r1 dry-activate", "r1 switch"]);
    let state = b.state();
    assert_eq!(state["deploys"], 1);
    assert_eq!(str_at(&state, "/last_deploy/outcome"), "success");
    assert!(state.get("in_flight").is_none(), "{state}");
}

/// After "waiting: someone is running fh apply" the service looks again within seconds, not a
/// whole poll interval (an hour here).
#[test]
fn an_operators_fh_apply_is_waited_for_and_then_the_agent_goes_on() {
    let b = bench!(
        "operator_fh_apply",
        Options {
            poll_interval: "1h",
            ..Options::default()
        }
    );
    // Someone runs `fh apply nixos ...` by hand for 3 s.
    let mut operator = b.spawn_in_namespace(&[
        "/bin/bash",
        "-c",
        "sleep 3; true",
        "fh",
        "apply",
        "nixos",
        "acme/infra/0.1",
    ]);
    let (v1, p1) = b.release(1, Kind::Normal);
    let _agent = b.start_agent();
    b.wait_for(secs(30), "the agent to see the operator's fh", || {
        b.state()["status"]
            .as_str()
            .is_some_and(|s| s.starts_with("waiting: someone is running fh apply"))
    });
    assert!(b.fh_runs().is_empty());
    operator.wait().unwrap();
    // The switch happens first, the record after the health checks: wait for the record.
    b.wait_for(
        secs(60),
        "the release deployed and recorded after the operator's fh",
        || str_at(&b.state(), "/running/version") == v1,
    );
    assert_eq!(b.current_system(), p1);
}

/// The service with a long poll interval: a release that is too young is applied once it is
/// old enough, not a whole poll interval later (as a planned reboot is not missed either).
#[test]
fn the_service_applies_a_young_release_once_it_is_old_enough() {
    let b = bench!(
        "min_release_age_service",
        Options {
            poll_interval: "1h",
            extra: "min_release_age = \"3s\"".into(),
            ..Options::default()
        }
    );
    let (v1, p1) = b.release(1, Kind::Normal);
    assert!(
        b.flakehub
            .set_published_at(ORG, "infra", &v1, Some(&now_rfc3339()))
    );
    let _agent = b.start_agent();
    b.wait_for(secs(20), "the release waiting", || {
        b.state()["status"]
            .as_str()
            .is_some_and(|s| s.contains("waits until"))
    });
    b.wait_for(secs(20), "the release applied after its 3 s", || {
        str_at(&b.state(), "/running/version") == v1
    });
    assert_eq!(b.current_system(), p1);
}

#[test]
fn a_program_that_does_not_exist_is_named_at_start() {
    let b = bench!("missing_program");
    let text = std::fs::read_to_string(&b.config).unwrap();
    let fh_line = text
        .lines()
        .find(|l| l.starts_with("fh = "))
        .unwrap()
        .to_string();
    std::fs::write(
        &b.config,
        text.replace(&fh_line, "fh = \"/nonexistent/fh-1.0/bin/fh\""),
    )
    .unwrap();
    b.release(1, Kind::Normal);
    let mut agent = b.start_agent();
    b.wait_for(secs(20), "the status of the first check", || {
        b.state().get("last_check").is_some()
    });
    let status = str_at(&b.state(), "/status").to_string();
    assert!(
        status.starts_with(
            "check failed: cannot deploy: paths.fh: /nonexistent/fh-1.0/bin/fh does not exist or is not executable"
        ),
        "{status}"
    );
    agent.stop(secs(10));
    let log = std::fs::read_to_string(&agent.stderr).unwrap();
    // Said at start, before any deploy, with the program of every step.
    assert!(
        log.contains("program for fetch: MISSING (paths.fh: /nonexistent/fh-1.0/bin/fh does not exist or is not executable) apply nixos"),
        "{log}"
    );
    assert!(
        log.contains("program for roll back the profile: /usr/bin/nix-env --set"),
        "{log}"
    );
    assert!(b.fh_runs().is_empty());
}

#[test]
fn a_check_asked_for_during_a_deploy_follows_it() {
    let b = bench!(
        "check_during_deploy",
        Options {
            poll_interval: "1h",
            ..Options::default()
        }
    );
    let (_, p1) = b.release(1, Kind::Slow(2));
    let mut agent = b.start_agent();
    b.wait_for(secs(30), "the slow activation of 0.1.1 under way", || {
        b.activations().iter().any(|a| a == "r1 switch")
    });
    // Published while the agent is busy with 0.1.1, whose cycle resolved the reference before.
    let (_, p2) = b.release(2, Kind::Normal);
    agent.signal(Signal::SIGUSR1);
    b.wait_for(secs(30), "0.1.1 running", || b.current_system() == p1);
    b.wait_for(
        secs(20),
        "0.1.2 running right after, not a poll (1h) later",
        || b.current_system() == p2,
    );
    assert!(agent.running(), "the agent exited: {}", agent.output());
}

#[test]
fn an_idle_poll_costs_one_request_and_rewrites_no_state() {
    let b = bench!(
        "idle_poll",
        Options {
            poll_interval: "1h",
            ..Options::default()
        }
    );
    let (v1, _) = b.release(1, Kind::Normal);
    let agent = b.start_agent();
    b.wait_for(secs(30), "the first release running", || {
        str_at(&b.state(), "/running/version") == v1
    });
    // The poll after a deploy changes the status line; from then on polls are idle.
    let checks = |n: usize| {
        for _ in 0..n {
            let before = b.flakehub.total_requests();
            agent.signal(Signal::SIGUSR1);
            b.wait_for(secs(10), "the check's request", || {
                b.flakehub.total_requests() > before
            });
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    checks(1);
    let state_file = b.root.join("state/state.json");
    let written = std::fs::metadata(&state_file).unwrap().modified().unwrap();
    b.flakehub.reset_counts();
    checks(5);
    assert_eq!(
        b.flakehub.requests(harness::flakehub::Endpoint::Version),
        5,
        "one /version request per poll"
    );
    assert_eq!(b.flakehub.total_requests(), 5, "and nothing else");
    assert_eq!(
        std::fs::metadata(&state_file).unwrap().modified().unwrap(),
        written,
        "an idle poll rewrote the state file"
    );
    // `status` shows the last check all the same.
    let status = b.status_json();
    let last = status["last_check"]["at"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let on_file = str_at(&b.state(), "/last_check/at").to_string();
    assert!(last > on_file, "status shows {last}, the file {on_file}");
}

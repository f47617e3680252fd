//! `hcloud-nixos agent` end to end: the real binary against the FlakeHub and metadata stand-ins,
//! fh and determinate-nixd stand-ins, and real Nix store paths and profile generations (see
//! `support/agent_bench.rs`). Applies run in direct mode (the transient-unit mode needs systemd).
//!
//! Needs root and nix-bin; without them every test prints `SKIP: ...` (and fails under CI=true).

#[path = "support/agent_bench.rs"]
mod agent_bench;
#[path = "standins/flakehub.rs"]
mod flakehub;
#[path = "standins/metadata_server.rs"]
mod metadata_server;

use std::time::Duration;

use agent_bench::{ATTR, Bench, Encoding, Kind, Login, ORG, Options, TOKEN, TOKEN_SECRET_PART};
use flakehub::{Down, Endpoint};
use nix::sys::signal::Signal;

macro_rules! bench {
    ($name:expr) => {
        bench!($name, Options::default())
    };
    ($name:expr, $opts:expr) => {
        match Bench::new($name, $opts) {
            Some(b) => b,
            None => return,
        }
    };
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// fh's arguments for fetching `version` of acme/`flake`: the exact reference, and
/// `dry-activate` (fh makes the profile generation; the agent activates it itself).
fn fh_fetch(flake: &str, version: &str) -> String {
    format!("apply nixos {ORG}/{flake}/={version}#{ATTR} dry-activate")
}

/// Is the deploy in its activation step, with the step's PID written down?
fn activating(b: &Bench) -> bool {
    let state = b.state();
    str_at(&state, "/in_flight/phase") == "activate" && state.pointer("/in_flight/pid").is_some()
}

fn str_at<'a>(v: &'a serde_json::Value, pointer: &str) -> &'a str {
    v.pointer(pointer).and_then(|x| x.as_str()).unwrap_or("")
}

#[test]
fn first_deploy_switches_through_a_new_profile_generation() {
    let b = bench!("first_deploy");
    let base = b.current_system();
    let (v1, p1) = b.release(1, Kind::Normal);

    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!("up to date: {v1} (just deployed)")
    );
    let status = b.status();
    assert!(
        status.contains(&format!("status:       up to date: {v1}")),
        "{status}"
    );
    assert!(status.contains("deploys:      1"), "{status}");

    let state = b.state();
    assert_eq!(str_at(&state, "/running/version"), v1);
    assert_eq!(str_at(&state, "/running/store_path"), p1);
    assert_eq!(str_at(&state, "/last_deploy/outcome"), "success");
    assert_eq!(state["deploys"], 1);
    assert!(state.get("in_flight").is_none(), "{state}");

    // Real Nix: generation 1 is the base system, generation 2 the release, and it is current.
    assert_eq!(b.generations(), vec![(1, base), (2, p1.clone())]);
    assert_eq!(b.current_generation(), 2);
    assert_eq!(b.current_system(), p1);
    assert_eq!(b.fh_runs(), vec![fh_fetch("infra", &v1)]);
    assert_eq!(b.activations(), vec!["r1 dry-activate", "r1 switch"]);

    // determinate-nixd got the token in a root-only file in the run directory, gone afterwards.
    let nixd = b.determinate_log();
    let run_dir = b.run_dir().display().to_string();
    assert!(
        nixd.iter().any(
            |l| l.starts_with(&format!("token-file {run_dir}/flakehub-token."))
                && l.ends_with("mode=600")
        ),
        "{nixd:?}"
    );
    assert!(nixd.iter().any(|l| l == "status"), "{nixd:?}");
    let left: Vec<String> = std::fs::read_dir(b.run_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("flakehub-token"))
        .collect();
    assert!(
        left.is_empty(),
        "token files left in the run directory: {left:?}"
    );
}

#[test]
fn nothing_new_costs_a_couple_of_requests_and_no_fh_run() {
    let b = bench!("nothing_new");
    let (v1, _) = b.release(1, Kind::Normal);
    assert!(b.once().ok());
    let logins = b
        .determinate_log()
        .iter()
        .filter(|l| l.starts_with("login"))
        .count();
    assert_eq!(logins, 1);
    b.flakehub.reset_counts();

    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(run.stdout.trim(), format!("up to date: {v1}"));
    assert_eq!(b.fh_runs().len(), 1, "no second fh run");
    assert_eq!(b.generations().len(), 2, "no new generation");
    let total = b.flakehub.total_requests();
    assert!(total <= 3, "a poll made {total} requests to FlakeHub");
    assert_eq!(b.flakehub.requests(Endpoint::Version), 1);
    assert_eq!(
        b.determinate_log()
            .iter()
            .filter(|l| l.starts_with("login"))
            .count(),
        1,
        "logged in again although the token did not change"
    );
    assert_eq!(b.state()["deploys"], 1);
}

#[test]
fn a_new_release_is_deployed_and_a_yanked_one_is_not() {
    let b = bench!("new_release");
    let (_, _) = b.release(1, Kind::Normal);
    assert!(b.once().ok());
    let (v2, p2) = b.release(2, Kind::Normal);
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!("up to date: {v2} (just deployed)")
    );
    assert_eq!(b.current_system(), p2);
    assert_eq!(b.current_generation(), 3);
    assert_eq!(b.fh_runs().last().unwrap(), &fh_fetch("infra", &v2));

    // 0.1.3 is published and yanked; FlakeHub's /version still names it: the agent looks at
    // every release and stays at 0.1.2, the newest that is not yanked.
    let (v3, _) = b.release(3, Kind::Normal);
    assert!(b.flakehub.yank(ORG, "infra", &v3));
    b.flakehub.set_version_serves_yanked(true);
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(run.stdout.trim(), format!("up to date: {v2}"));
    assert_eq!(b.current_system(), p2);
    assert_eq!(b.fh_runs().len(), 2);
    assert!(b.flakehub.requests(Endpoint::Releases) >= 1);
}

#[test]
fn a_release_published_during_an_apply_waits_for_the_next_cycle() {
    let b = bench!("published_during_apply");
    let (v1, p1) = b.release(1, Kind::Slow(3));
    let mut once = b.spawn_once();
    b.wait_for(secs(30), "fh to start", || !b.fh_runs().is_empty());
    let (v2, p2) = b.release(2, Kind::Normal);
    let status = once.wait(secs(60));
    assert!(status.success(), "{}", once.output());
    // fh was given the exact version the agent resolved, not the constraint: 0.1.1 was applied.
    assert_eq!(b.fh_runs(), vec![fh_fetch("infra", &v1)]);
    assert_eq!(b.current_system(), p1);
    assert_eq!(str_at(&b.state(), "/running/version"), v1);

    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(b.current_system(), p2);
    assert_eq!(b.fh_runs().last().unwrap(), &fh_fetch("infra", &v2));
}

#[test]
fn flakehub_down_then_back() {
    let b = bench!("flakehub_down");
    let base = b.current_system();
    let (v1, p1) = b.release(1, Kind::Normal);

    b.flakehub.set_down(Some(Down::Status(503)));
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    let line = run.stdout.trim();
    assert!(
        line.starts_with("check failed: FlakeHub answered") && line.contains("HTTP 503"),
        "{line}"
    );
    assert!(b.status().contains("HTTP 503"));

    b.flakehub.set_down(Some(Down::Close));
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    assert!(
        run.stdout
            .trim()
            .starts_with("check failed: cannot reach FlakeHub at"),
        "{}",
        run.stdout
    );
    assert!(b.fh_runs().is_empty());
    assert_eq!(b.current_system(), base);
    assert_eq!(b.state()["last_check"]["ok"], false);

    // Slow but answering is fine.
    b.flakehub.set_down(None);
    b.flakehub.set_delay(Some(Duration::from_millis(1500)));
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!("up to date: {v1} (just deployed)")
    );
    assert_eq!(b.current_system(), p1);
}

#[test]
fn a_token_flakehub_rejects_is_reported_and_nothing_is_applied() {
    let b = bench!(
        "token_rejected",
        Options {
            login: Login::FhAuthFile,
            ..Options::default()
        }
    );
    let base = b.current_system();
    b.release(1, Kind::Normal);
    let wrong = "flakehub1_notTheRightOne_0123456789";
    b.set_userdata(&b.flake("0.1"), Some(wrong), Encoding::Plain);
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    let line = run.stdout.trim();
    assert!(
        line.contains("FlakeHub rejected the token (HTTP 401)"),
        "{line}"
    );
    assert!(b.status().contains("rejected the token"));
    assert!(b.flakehub.unauthorized_requests() >= 1);
    assert!(b.fh_runs().is_empty(), "fh ran: {:?}", b.fh_runs());
    assert_eq!(b.current_system(), base);
    assert!(!run.all().contains("notTheRightOne"), "{}", run.all());

    // The right token: deployed.
    b.set_userdata(&b.flake("0.1"), Some(TOKEN), Encoding::Plain);
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
}

#[test]
fn a_token_determinate_nixd_rejects_stops_the_cycle() {
    let b = bench!("token_rejected_by_determinate_nixd");
    b.release(1, Kind::Normal);
    b.set_userdata(
        &b.flake("0.1"),
        Some("flakehub1_notTheRightOne_0123456789"),
        Encoding::Plain,
    );
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    assert!(
        run.stdout
            .contains("FlakeHub login: determinate-nixd login failed"),
        "{}",
        run.stdout
    );
    assert!(b.fh_runs().is_empty());
    assert_eq!(b.flakehub.total_requests(), 0, "resolved without a login");
    assert!(!run.all().contains("notTheRightOne"), "{}", run.all());
}

#[test]
fn a_reference_flakehub_does_not_have_is_reported() {
    let b = bench!("not_found");
    b.release(1, Kind::Normal);

    b.set_userdata(
        &format!("{ORG}/nothing/0.1#{ATTR}"),
        Some(TOKEN),
        Encoding::Plain,
    );
    let run = b.once();
    assert!(!run.ok());
    assert_eq!(
        run.stdout.trim(),
        "check failed: FlakeHub has no release of acme/nothing matching '0.1'"
    );

    // The flake exists but this token may not see it (FlakeHub answers 404).
    b.set_userdata(&b.flake("0.1"), Some(TOKEN), Encoding::Plain);
    b.flakehub.set_not_found(ORG, "infra", true);
    let run = b.once();
    assert!(!run.ok());
    assert!(
        run.stdout.contains("FlakeHub has no release of acme/infra"),
        "{}",
        run.stdout
    );
    b.flakehub.set_not_found(ORG, "infra", false);

    // No such version, and no such output.
    b.set_userdata(&b.flake("2"), Some(TOKEN), Encoding::Plain);
    let run = b.once();
    assert!(run.stdout.contains("matching '2'"), "{}", run.stdout);
    b.set_userdata(
        &format!("{ORG}/infra/0.1#nixosConfigurations.db"),
        Some(TOKEN),
        Encoding::Plain,
    );
    let run = b.once();
    assert!(!run.ok());
    assert!(
        run.stdout
            .contains("FlakeHub has no output nixosConfigurations.db of acme/infra"),
        "{}",
        run.stdout
    );
    assert!(b.fh_runs().is_empty());
}

#[test]
fn fh_failing_is_recorded_and_the_system_is_unchanged() {
    let b = bench!("fh_fails");
    let base = b.current_system();
    // A store path FlakeHub knows but its cache cannot deliver: fh fails before any generation.
    let missing = "/nix/store/0000000000000000000000000000000z-nixos-system-web-missing";
    let v1 = b.publish(1, missing);
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!("deploy of {v1} failed: fh exited with status 1; the system is unchanged")
    );
    let state = b.state();
    assert_eq!(str_at(&state, "/last_deploy/outcome"), "failed");
    assert_eq!(state["failures"]["count"], 1);
    assert_eq!(b.fh_runs(), vec![fh_fetch("infra", &v1)]);
    assert_eq!(b.current_system(), base);
    assert_eq!(b.generations().len(), 1, "no new generation");
    assert!(
        b.status()
            .contains(&format!("failures:     {v1} failed 1 time(s)")),
        "{}",
        b.status()
    );
}

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
fn operation_boot_sets_the_boot_default_and_confirms_after_the_reboot() {
    let b = bench!(
        "operation_boot",
        Options {
            extra: "operation = \"boot\"".into(),
            ..Options::default()
        }
    );
    let base = b.current_system();
    let (v1, p1) = b.release(1, Kind::Normal);
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!("{v1} is the boot default; it runs after the next reboot")
    );
    assert_eq!(b.fh_runs(), vec![fh_fetch("infra", &v1)]);
    assert_eq!(b.activations(), vec!["r1 dry-activate", "r1 boot"]);
    assert_eq!(b.profile_system(), p1);
    assert_eq!(b.current_system(), base);
    // No reboot yet: nothing more to do.
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(b.fh_runs().len(), 1);
    assert_eq!(b.state()["deploys"], 0);

    b.reboot();
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!("up to date: {v1} (just deployed)")
    );
    let state = b.state();
    assert_eq!(str_at(&state, "/running/version"), v1);
    assert_eq!(state["deploys"], 1);
    assert_eq!(b.fh_runs().len(), 1);
}

#[test]
fn after_retry_limit_failed_fetches_a_release_waits_for_a_newer_one() {
    let b = bench!(
        "retry_limit",
        Options {
            retry_limit: 2,
            ..Options::default()
        }
    );
    let base = b.current_system();
    // FlakeHub names a closure its cache cannot deliver: fh fails every time.
    let v1 = b.publish(
        1,
        "/nix/store/0000000000000000000000000000000z-nixos-system-web-r1",
    );
    for attempt in 1..=2 {
        let run = b.once();
        assert!(!run.ok(), "{}", run.all());
        assert_eq!(b.fh_runs().len(), attempt);
        assert_eq!(b.state()["failures"]["count"], attempt);
    }
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!(
            "{v1} is quarantined (fetching it failed 2 times: fh exited with status 1); waiting for a newer release or `hcloud-nixos retry`"
        )
    );
    assert_eq!(b.fh_runs().len(), 2, "tried a third time");
    assert_eq!(b.current_system(), base);
    assert!(b.status().contains("quarantined"), "{}", b.status());

    // `hcloud-nixos retry` lifts the quarantine: one more attempt.
    let run = b.run(&["retry"], secs(30));
    assert!(run.ok(), "{}", run.all());
    let run = b.once();
    assert!(!run.ok());
    assert_eq!(b.fh_runs().len(), 3);

    let (v2, p2) = b.release(2, Kind::Normal);
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(b.current_system(), p2);
    assert_eq!(b.fh_runs().last().unwrap(), &fh_fetch("infra", &v2));
    assert!(b.state().get("failures").is_none());
}

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
fn user_data_in_every_encoding_is_followed() {
    let b = bench!("encodings");
    for (i, encoding) in [
        Encoding::Plain,
        Encoding::Base64,
        Encoding::Gzip,
        Encoding::GzipBase64,
        Encoding::Mime,
        Encoding::MimeGzipBase64,
    ]
    .into_iter()
    .enumerate()
    {
        let flake = format!("enc{i}");
        let path = b.system(&flake, Kind::Normal);
        let version = b.publish_to(&flake, 1, &path);
        b.set_userdata(&format!("{ORG}/{flake}/0.1#{ATTR}"), Some(TOKEN), encoding);
        let run = b.once();
        assert!(run.ok(), "{encoding:?}: {}", run.all());
        assert_eq!(b.current_system(), path, "{encoding:?}");
        assert_eq!(b.fh_runs().last().unwrap(), &fh_fetch(&flake, &version));
    }
}

#[test]
fn nothing_configured_is_idle_and_fine() {
    let b = bench!("idle");
    b.metadata
        .set_document("userdata", Some(b"#cloud-config\npackages: [htop]\n"));
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert!(
        run.stdout.starts_with("idle: no FlakeHub reference"),
        "{}",
        run.stdout
    );
    assert!(b.fh_runs().is_empty());
    assert_eq!(b.flakehub.total_requests(), 0);
}

/// Every place the token could end up, read as text.
fn assert_no_token(b: &Bench, what: &str, text: &str) {
    assert!(
        !text.contains(TOKEN_SECRET_PART),
        "the token leaked into {what}:\n{text}\n(bench at {})",
        b.root.display()
    );
}

fn assert_no_token_anywhere(b: &Bench) {
    assert_no_token(b, "the agent's output", &b.all_logs());
    let state = std::fs::read_to_string(b.state_dir().join("state.json")).unwrap();
    assert_no_token(b, "state.json", &state);
    assert_no_token(b, "status", &b.status());
    assert_no_token(b, "status --json", &b.status_json().to_string());
    assert_no_token(b, "fh's arguments", &b.fh_runs().join("\n"));
    assert_no_token(
        b,
        "determinate-nixd's arguments",
        &b.determinate_log().join("\n"),
    );
    for entry in std::fs::read_dir(b.run_dir()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(
            !name.starts_with("flakehub-token"),
            "left in the run directory: {name}"
        );
        let text = std::fs::read(entry.path()).unwrap_or_default();
        assert_no_token(b, &name, &String::from_utf8_lossy(&text));
    }
}

#[test]
fn the_token_leaks_nowhere_with_determinate_nixd() {
    let b = bench!("token_leak_determinate");
    let (v1, _) = b.release(1, Kind::Slow(2));
    let mut agent = b.start_agent();
    // While it applies: the agent's command line and environment, and the run directory.
    b.wait_for(secs(30), "the apply", || {
        b.state().pointer("/in_flight").is_some()
    });
    let proc_dir = format!("/proc/{}", agent.pid());
    for file in ["cmdline", "environ"] {
        let text = std::fs::read(format!("{proc_dir}/{file}")).unwrap();
        assert_no_token(
            &b,
            &format!("/proc/PID/{file}"),
            &String::from_utf8_lossy(&text),
        );
    }
    b.wait_for(secs(30), "the release running", || {
        str_at(&b.state(), "/running/version") == v1
    });
    agent.stop(secs(15)).expect("stop the agent");
    assert_no_token_anywhere(&b);
    // Where determinate-nixd keeps it (by design), root-only.
    use std::os::unix::fs::MetadataExt;
    let kept = b.path("nix/var/determinate/token");
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), TOKEN);
    assert_eq!(std::fs::metadata(&kept).unwrap().mode() & 0o777, 0o600);
}

#[test]
fn the_token_leaks_nowhere_with_fh_auth_file_even_verbose() {
    let b = bench!(
        "token_leak_fh_auth",
        Options {
            login: Login::FhAuthFile,
            ..Options::default()
        }
    );
    let (v1, _) = b.release(1, Kind::Normal);
    let run = b.run(&["-v", "agent", "--once"], secs(90));
    assert!(run.ok(), "{}", run.all());
    assert!(run.stdout.contains(&v1));
    // A rejected token at verbose level says nothing of it either.
    b.flakehub
        .require_token(Some("flakehub1_someOtherToken_000000"));
    let run = b.run(&["-v", "agent", "--once"], secs(90));
    assert!(!run.ok());
    assert_no_token_anywhere(&b);
    use std::os::unix::fs::MetadataExt;
    let auth = b.path("home/.config/flakehub/auth");
    assert_eq!(std::fs::read_to_string(&auth).unwrap(), TOKEN);
    assert_eq!(std::fs::metadata(&auth).unwrap().mode() & 0o777, 0o600);
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

// ---------------------------------------------------------------------------------------------
// Safe deploys: confirm, roll back, quarantine, min_release_age, reboots, hooks, metrics.

/// A `[[health_check]]` script: fails (saying why) while `<root>/flags/<flag>` exists; every
/// run leaves a line in `logs/checks.log`.
fn check_script(b: &Bench, name: &str, flag: &str) -> std::path::PathBuf {
    b.script(
        &format!("bin/{name}"),
        &format!(
            "#!/bin/bash\necho \"{name} $(date +%s.%N)\" >>@ROOT@/logs/checks.log\n\
             if [ -e @ROOT@/flags/{flag} ]; then echo \"{name}: the app does not answer\" >&2; exit 1; fi\n\
             exit 0\n"
        ),
    )
}

/// Runs of the health check scripts so far.
fn checks_run(b: &Bench) -> usize {
    std::fs::read_to_string(b.path("logs/checks.log"))
        .unwrap_or_default()
        .lines()
        .count()
}

/// `[[hook]]` tables: a hook that fails first, then one that appends its `HCLOUD_NIXOS_*`
/// environment to `logs/hooks.log`.
const HOOKS: &str = r#"
[[hook]]
command = ["/bin/sh", "-c", "echo this hook fails >&2; exit 3"]

[[hook]]
command = ["@ROOT@/bin/record-hook"]
timeout = "10s"
"#;

fn write_hook_recorder(b: &Bench) {
    b.script(
        "bin/record-hook",
        "#!/bin/bash\n{ echo ===; env | grep '^HCLOUD_NIXOS_' | sort; } >>@ROOT@/logs/hooks.log\n",
    );
}

/// Every hook run so far: its `HCLOUD_NIXOS_*` variables (without the prefix).
fn hook_events(b: &Bench) -> Vec<std::collections::BTreeMap<String, String>> {
    let text = std::fs::read_to_string(b.path("logs/hooks.log")).unwrap_or_default();
    text.split("===\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            block
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| {
                    (
                        k.trim_start_matches("HCLOUD_NIXOS_").to_string(),
                        v.to_string(),
                    )
                })
                .collect()
        })
        .collect()
}

/// (event, outcome) of each hook run, in order.
fn hook_kinds(b: &Bench) -> Vec<(String, String)> {
    hook_events(b)
        .iter()
        .map(|e| (e["EVENT"].clone(), e["OUTCOME"].clone()))
        .collect()
}

fn kinds(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// Prometheus text: `name{labels} value` lines (comments skipped), parsed strictly enough to
/// fail on anything malformed. Keys are `name` or `name{a="x",b="y"}` as written.
fn parse_metrics(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in: {line}"
        );
        if name_end < series.len() {
            let labels = &series[name_end..];
            assert!(
                labels.starts_with('{') && labels.ends_with('}'),
                "bad labels: {line}"
            );
            for pair in labels[1..labels.len() - 1].split("\",") {
                let (k, v) = pair
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("bad label in: {line}"));
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{line}"
                );
                assert!(!v.trim_end_matches('"').contains('"'), "{line}");
            }
        }
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        assert!(
            out.insert(series.to_string(), value).is_none(),
            "twice: {line}"
        );
    }
    out
}

fn metric(m: &std::collections::BTreeMap<String, f64>, series: &str) -> f64 {
    *m.get(series)
        .unwrap_or_else(|| panic!("no {series} in {m:#?}"))
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
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
    let endpoint = agent_bench::HealthEndpoint::start(b.flag("web-broken"));
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

#[test]
fn min_release_age_holds_a_young_release_until_it_is_old_enough() {
    let b = bench!(
        "min_release_age",
        Options {
            extra: "min_release_age = \"3s\"".into(),
            ..Options::default()
        }
    );
    let (v1, p1) = b.release(1, Kind::Normal);
    let published = std::time::SystemTime::now();
    assert!(
        b.flakehub
            .set_published_at(ORG, "infra", &v1, Some(&now_rfc3339()))
    );
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    let line = run.stdout.trim().to_string();
    let until = line
        .strip_prefix(&format!("{v1} waits until "))
        .and_then(|rest| rest.strip_suffix(" (min_release_age)"))
        .unwrap_or_else(|| panic!("{line}"));
    let until = humantime::parse_rfc3339_weak(until).unwrap();
    let wait = until.duration_since(published).unwrap_or_default();
    assert!(
        wait <= secs(3) && wait >= secs(2),
        "waits {wait:?} after publication: {line}"
    );
    assert!(b.fh_runs().is_empty());
    assert!(b.status().contains("waits until"), "{}", b.status());

    while std::time::SystemTime::now() < until + Duration::from_millis(200) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!("up to date: {v1} (just deployed)")
    );
    assert_eq!(b.current_system(), p1);

    // FlakeHub does not say when this one was published: held, however long it waits.
    let (v2, _) = b.release(2, Kind::Normal);
    assert!(b.flakehub.set_published_at(ORG, "infra", &v2, None));
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    assert!(
        run.stdout.starts_with(&format!("{v2} "))
            && run
                .stdout
                .contains("its publication time is unknown and min_release_age is set"),
        "{}",
        run.stdout
    );
    assert_eq!(b.current_system(), p1);
    assert_eq!(b.fh_runs().len(), 1);
}

/// The only release matching the constraint is yanked (and FlakeHub's /version still names it):
/// nothing is applied, ever.
#[test]
fn a_yanked_release_is_never_applied_even_when_it_is_the_only_one() {
    let b = bench!("only_release_yanked");
    let base = b.current_system();
    let (v1, _) = b.release(1, Kind::Normal);
    assert!(b.flakehub.yank(ORG, "infra", &v1));
    b.flakehub.set_version_serves_yanked(true);
    for _ in 0..2 {
        let run = b.once();
        assert!(!run.ok(), "{}", run.all());
        assert!(
            run.stdout.starts_with("check failed: ")
                && run
                    .stdout
                    .contains("release of acme/infra matching '0.1' that is not yanked"),
            "{}",
            run.stdout
        );
    }
    assert!(b.fh_runs().is_empty());
    assert_eq!(b.current_system(), base);
    assert_eq!(b.generations().len(), 1);
}

/// The status for "every matching release is yanked" should read like the other not-found
/// messages ("FlakeHub has no ..."); it says "release of ... that is not yanked", which reads as
/// if one had been found.
#[test]
fn all_releases_yanked_is_reported_as_none_found() {
    let b = bench!("all_yanked_message");
    let (v1, _) = b.release(1, Kind::Normal);
    assert!(b.flakehub.yank(ORG, "infra", &v1));
    b.flakehub.set_version_serves_yanked(true);
    let run = b.once();
    assert_eq!(
        run.stdout.trim(),
        "check failed: FlakeHub has no release of acme/infra matching '0.1' that is not yanked"
    );
}

/// A release held because its publication time is unknown is not quarantined (it is not in the
/// quarantine list, and `hcloud-nixos retry` does not help), so the status must not say so.
#[test]
fn a_release_of_unknown_age_is_held_without_being_called_quarantined() {
    let b = bench!(
        "unknown_age_status",
        Options {
            extra: "min_release_age = \"3s\"".into(),
            ..Options::default()
        }
    );
    let (v1, _) = b.release(1, Kind::Normal);
    assert!(b.flakehub.set_published_at(ORG, "infra", &v1, None));
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    assert!(b.fh_runs().is_empty());
    let line = run.stdout.trim();
    assert!(
        line.contains("publication time is unknown")
            && !line.contains("quarantined")
            && !line.contains("retry"),
        "{line}"
    );
    // And `retry` indeed changes nothing.
    assert!(b.run(&["retry"], secs(30)).ok());
    assert!(!b.once().ok());
    assert!(b.fh_runs().is_empty());
}

/// Reboot tests: the running (and booted) system has kernel 6.6.1; release 0.1.1 brings 6.6.2.
/// Hooks record, metrics go to a textfile. Returns (bench, booted system, version, store path).
fn kernel_bench(name: &str, reboot: &str) -> Option<(Bench, String, String, String)> {
    let now = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
    // A daily window that opens in 2 to 3 hours: never open now.
    let start = format!("{:02}:00", (now.hour() + 3) % 24);
    let mut tables = format!(
        "{HOOKS}\n[metrics]\ntextfile = \"@ROOT@/metrics.prom\"\n\n[reboot_window]\n\
         days = [\"Mon\", \"Tue\", \"Wed\", \"Thu\", \"Fri\", \"Sat\", \"Sun\"]\n\
         start = \"{start}\"\nlength = \"30m\"\ntime_zone = \"UTC\"\n"
    );
    if reboot != "window" {
        tables = tables.replace("[reboot_window]", "[reboot_window_unused]");
        tables.truncate(tables.find("\n[reboot_window_unused]").unwrap());
    }
    let b = Bench::new(
        name,
        Options {
            extra: format!(
                "reboot = \"{reboot}\"\nreboot_grace = \"1s\"\nreboot_inhibitor_timeout = \"2s\""
            ),
            tables,
            ..Options::default()
        },
    )?;
    write_hook_recorder(&b);
    let booted = b.system_with_kernel("base-k", Kind::Normal, Some("6.6.1"));
    b.boot_into(&booted);
    let (v1, p1) = b.release_with_kernel(1, Kind::Normal, "6.6.2");
    Some((b, booted, v1, p1))
}

fn metrics_file(b: &Bench) -> std::collections::BTreeMap<String, f64> {
    parse_metrics(&std::fs::read_to_string(b.path("metrics.prom")).expect("the metrics textfile"))
}

#[test]
fn reboot_never_with_a_new_kernel_says_reboot_required() {
    let Some((b, booted, v1, p1)) = kernel_bench("reboot_never", "never") else {
        return;
    };
    // The same kernel as the booted one: no reboot required.
    let same = b.system_with_kernel("r0", Kind::Normal, Some("6.6.1"));
    let v0 = b.publish(0, &same);
    b.set_userdata(&b.flake("=0.1.0"), Some(TOKEN), Encoding::Plain);
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!("up to date: {v0} (just deployed)")
    );
    assert_eq!(
        metric(&metrics_file(&b), "hcloud_nixos_reboot_required"),
        0.0
    );

    b.set_userdata(&b.flake("0.1"), Some(TOKEN), Encoding::Plain);
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!(
            "up to date: {v1} (just deployed); reboot required: a new kernel is waiting; reboot = never"
        )
    );
    assert_eq!(b.current_system(), p1);
    let state = b.state();
    assert_eq!(state["reboot_required"], true, "{state}");
    assert!(state.get("reboot_request").is_none(), "{state}");
    assert_eq!(
        metric(&metrics_file(&b), "hcloud_nixos_reboot_required"),
        1.0
    );
    assert_eq!(
        hook_kinds(&b),
        kinds(&[
            ("deploy", "success"),
            ("deploy", "success"),
            ("reboot", "held")
        ])
    );
    let held = &hook_events(&b)[2];
    assert_eq!(held["VERSION"], v1);
    assert_eq!(held["STORE_PATH"], p1);
    assert_eq!(held["PREVIOUS_PATH"], booted);
    assert!(held["ERROR"].contains("reboot = never"), "{held:?}");

    // The next poll says it again, without telling the hooks again.
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!("up to date: {v1}; reboot required: a new kernel is waiting; reboot = never")
    );
    assert_eq!(hook_events(&b).len(), 3);
}

#[test]
fn reboot_window_plans_the_reboot_inside_the_next_window() {
    let Some((b, _, v1, p1)) = kernel_bench("reboot_window", "window") else {
        return;
    };
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    let line = run.stdout.trim();
    assert!(
        line.starts_with(&format!(
            "up to date: {v1} (just deployed); reboot required; planned for "
        )) && line.contains(" UTC (window until "),
        "{line}"
    );
    assert_eq!(b.current_system(), p1);
    let state = b.state();
    let planned: jiff::Timestamp = str_at(&state, "/reboot_planned")
        .parse()
        .unwrap_or_else(|e| panic!("{e}: {state}"));
    let ahead = planned.duration_since(jiff::Timestamp::now());
    assert!(
        ahead >= jiff::SignedDuration::from_mins(100)
            && ahead <= jiff::SignedDuration::from_mins(210),
        "planned {ahead:?} from now"
    );
    assert!(state.get("reboot_request").is_none(), "{state}");
    assert_eq!(
        metric(&metrics_file(&b), "hcloud_nixos_reboot_required"),
        1.0
    );
    assert_eq!(
        hook_kinds(&b),
        kinds(&[("deploy", "success"), ("reboot", "scheduled")])
    );

    // The moment is kept, and the hooks are not told again.
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(
        str_at(&b.state(), "/reboot_planned"),
        planned.to_string(),
        "planned anew"
    );
    assert_eq!(hook_events(&b).len(), 2);
}

/// `when-needed` asks logind at once; the bench has none (the agent's system bus address leads
/// nowhere): the reboot fails, the status and hooks say so, and the deploy stays confirmed.
#[test]
fn reboot_when_needed_without_logind_fails_and_the_deploy_stays_confirmed() {
    let Some((b, booted, v1, p1)) = kernel_bench("reboot_when_needed", "when-needed") else {
        return;
    };
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    let line = run.stdout.trim();
    assert!(
        line.starts_with(&format!(
            "up to date: {v1} (just deployed); reboot failed: cannot connect to the system D-Bus"
        )),
        "{line}"
    );
    assert_eq!(b.current_system(), p1);
    let state = b.state();
    assert_eq!(str_at(&state, "/last_deploy/outcome"), "success");
    assert_eq!(str_at(&state, "/running/version"), v1);
    assert_eq!(state["deploys"], 1);
    assert_eq!(state["reboot_required"], true);
    assert!(state.get("reboot_request").is_none(), "{state}");
    assert_eq!(
        hook_kinds(&b),
        kinds(&[
            ("reboot", "rebooting"),
            ("deploy", "success"),
            ("reboot", "failed")
        ])
    );
    let failed = &hook_events(&b)[2];
    assert_eq!(failed["STORE_PATH"], p1);
    assert_eq!(failed["PREVIOUS_PATH"], booted);
    assert!(
        failed["ERROR"].starts_with("reboot failed: cannot connect to the system D-Bus"),
        "{failed:?}"
    );
    let m = metrics_file(&b);
    assert_eq!(metric(&m, "hcloud_nixos_reboot_required"), 1.0);
    assert_eq!(
        metric(&m, "hcloud_nixos_deploys_total{outcome=\"success\"}"),
        1.0
    );
}

#[test]
fn hooks_get_the_event_in_their_environment_after_deploys_and_rollbacks() {
    let b = bench!(
        "hooks",
        Options {
            tables: HOOKS.into(),
            ..Options::default()
        }
    );
    write_hook_recorder(&b);
    let base = b.current_system();
    let (v1, p1) = b.release(1, Kind::Normal);
    let run = b.once();
    // The first hook fails; the deploy does not.
    assert!(run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!("up to date: {v1} (just deployed)")
    );
    let events = hook_events(&b);
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["EVENT"], "deploy");
    assert_eq!(e["OUTCOME"], "success");
    assert_eq!(e["VERSION"], v1);
    assert_eq!(e["STORE_PATH"], p1);
    assert_eq!(e["PREVIOUS_PATH"], base);
    assert_eq!(e["ERROR"], "");

    // Nothing new: no hook.
    assert!(b.once().ok());
    assert_eq!(hook_events(&b).len(), 1);

    let (v2, p2) = b.release(2, Kind::ActivationFails);
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    let events = hook_events(&b);
    assert_eq!(
        hook_kinds(&b),
        kinds(&[
            ("deploy", "success"),
            ("deploy", "rolled-back"),
            ("rollback", "success")
        ])
    );
    for e in &events[1..] {
        assert_eq!(e["VERSION"], v2);
        assert_eq!(e["STORE_PATH"], p2);
        assert_eq!(e["PREVIOUS_PATH"], p1);
        assert_eq!(
            e["ERROR"],
            "switch-to-configuration switch exited with status 1"
        );
    }
    assert_eq!(b.current_system(), p1);
}

#[test]
fn metrics_textfile_after_a_deploy_and_after_a_rollback() {
    let b = bench!(
        "metrics_textfile",
        Options {
            tables: "[metrics]\ntextfile = \"@ROOT@/metrics/hcloud-nixos.prom\"\n".into(),
            ..Options::default()
        }
    );
    std::fs::create_dir_all(b.path("metrics")).unwrap();
    let (v1, p1) = b.release(1, Kind::Normal);
    assert!(b.once().ok());
    let file = b.path("metrics/hcloud-nixos.prom");
    let m = parse_metrics(&std::fs::read_to_string(&file).unwrap());
    assert_eq!(
        metric(
            &m,
            &format!("hcloud_nixos_running_info{{version=\"{v1}\",store_path=\"{p1}\"}}")
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "hcloud_nixos_deploys_total{outcome=\"success\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "hcloud_nixos_deploys_total{outcome=\"failed\"}"),
        0.0
    );
    assert_eq!(metric(&m, "hcloud_nixos_last_check_success"), 1.0);
    assert_eq!(metric(&m, "hcloud_nixos_last_deploy_success"), 1.0);
    assert_eq!(metric(&m, "hcloud_nixos_deploy_in_progress"), 0.0);
    assert_eq!(metric(&m, "hcloud_nixos_quarantined_releases"), 0.0);
    assert_eq!(metric(&m, "hcloud_nixos_reboot_required"), 0.0);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o777, 0o644);

    let (v2, p2) = b.release(2, Kind::Exit4);
    assert!(!b.once().ok());
    let m = parse_metrics(&std::fs::read_to_string(&file).unwrap());
    assert_eq!(
        metric(&m, "hcloud_nixos_rollbacks_total{outcome=\"success\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "hcloud_nixos_rollbacks_total{outcome=\"failed\"}"),
        0.0
    );
    assert_eq!(
        metric(&m, "hcloud_nixos_deploys_total{outcome=\"failed\"}"),
        1.0
    );
    assert_eq!(metric(&m, "hcloud_nixos_quarantined_releases"), 1.0);
    assert_eq!(metric(&m, "hcloud_nixos_last_deploy_success"), 0.0);
    assert_eq!(metric(&m, "hcloud_nixos_consecutive_failures"), 1.0);
    assert_eq!(
        metric(
            &m,
            &format!("hcloud_nixos_running_info{{version=\"{v1}\",store_path=\"{p1}\"}}")
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            &format!("hcloud_nixos_desired_info{{version=\"{v2}\",store_path=\"{p2}\"}}")
        ),
        1.0
    );
}

/// `GET /metrics` from the service, on a port picked here.
fn get_metrics(port: u16) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

#[test]
fn metrics_are_served_over_http_by_the_service() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let b = bench!(
        "metrics_listen",
        Options {
            tables: format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
            ..Options::default()
        }
    );
    let (v1, p1) = b.release(1, Kind::Normal);
    let mut agent = b.start_agent();
    let series = format!("hcloud_nixos_running_info{{version=\"{v1}\",store_path=\"{p1}\"}}");
    let mut last = String::new();
    b.wait_for(secs(30), "the running release in /metrics", || {
        last = get_metrics(port).unwrap_or_default();
        last.contains(&series)
    });
    let m = parse_metrics(&last);
    assert_eq!(metric(&m, &series), 1.0);
    assert_eq!(
        metric(&m, "hcloud_nixos_deploys_total{outcome=\"success\"}"),
        1.0
    );
    assert_eq!(metric(&m, "hcloud_nixos_last_check_success"), 1.0);
    assert!(agent.running(), "{}", agent.output());
}

/// What the agent writes just before logind takes the machine down (the container test
/// `agent_reboot_systemd` shows it there): the request, with the boot it was made in.
fn inject_reboot_request(b: &Bench, system: &str) {
    let mut state = b.state();
    state["reboot_request"] = serde_json::json!({
        "system": system,
        "boot_id": std::fs::read_to_string(b.path("boot_id")).unwrap().trim(),
        "at": now_rfc3339(),
    });
    std::fs::write(
        b.state_dir().join("state.json"),
        serde_json::to_vec_pretty(&state).unwrap(),
    )
    .unwrap();
}

#[test]
fn after_the_reboot_for_a_new_kernel_the_booted_system_is_confirmed() {
    let Some((b, _, v1, p1)) = kernel_bench("reboot_confirmed", "when-needed") else {
        return;
    };
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    inject_reboot_request(&b, &p1);
    b.reboot();
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(run.stdout.trim(), format!("up to date: {v1}"));
    let state = b.state();
    assert_eq!(state["last_reboot"]["ok"], true, "{state}");
    assert_eq!(str_at(&state, "/last_reboot/system"), p1);
    assert_eq!(str_at(&state, "/last_reboot/booted"), p1);
    assert_eq!(state["reboot_required"], false, "{state}");
    assert!(state.get("reboot_request").is_none(), "{state}");
    assert_eq!(
        metric(&metrics_file(&b), "hcloud_nixos_reboot_required"),
        0.0
    );
    assert_eq!(b.fh_runs().len(), 1);
}

/// The boot loader fell back to the old generation: the reboot is recorded as failed, the
/// release is applied again (the running system is not it), and the agent does not reboot
/// again for it (no reboot loop).
#[test]
fn a_reboot_that_comes_up_in_the_old_system_is_recorded_and_not_repeated() {
    let Some((b, booted, v1, p1)) = kernel_bench("reboot_into_old", "when-needed") else {
        return;
    };
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(hook_events(&b).len(), 3);
    inject_reboot_request(&b, &p1);
    std::fs::write(b.path("boot_id"), "boot-2\n").unwrap();
    b.boot_into(&booted);
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!(
            "up to date: {v1} (just deployed); reboot required, but the last reboot for it booted {booted} instead; not rebooting again"
        )
    );
    let state = b.state();
    assert_eq!(state["last_reboot"]["ok"], false, "{state}");
    assert_eq!(str_at(&state, "/last_reboot/system"), p1);
    assert_eq!(str_at(&state, "/last_reboot/booted"), booted);
    assert!(state.get("reboot_request").is_none(), "{state}");
    assert_eq!(b.current_system(), p1);
    assert_eq!(b.fh_runs().len(), 2);
    // Only the deploy: no second "rebooting".
    assert_eq!(hook_kinds(&b)[3..], kinds(&[("deploy", "success")])[..]);
    let run = b.once();
    assert!(run.stdout.contains("not rebooting again"), "{}", run.stdout);
    assert_eq!(hook_events(&b).len(), 4);
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

#[test]
fn a_release_without_the_agent_is_refused_and_can_be_deployed_on_purpose() {
    let b = bench!("without_agent");
    let base = b.current_system();
    let (v1, p1) = b.release(1, Kind::WithoutAgent);
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!(
            "deploy of {v1} failed: refused: release {v1} does not include the hcloud-nixos module (no hcloud-nixos-agent.service): deploying it would end deploys on this server; the system is unchanged"
        ),
        "{}",
        run.all()
    );
    // Fetched (fh made a generation), never activated; the profile is back where it was.
    assert_eq!(b.fh_runs(), vec![fh_fetch("infra", &v1)]);
    assert_eq!(b.activations(), vec!["r1 dry-activate"]);
    assert_eq!(b.current_system(), base);
    assert_eq!(b.profile_system(), base);
    let state = b.state();
    assert_eq!(str_at(&state, "/quarantined/0/store_path"), p1);
    let reason = str_at(&state, "/quarantined/0/reason");
    assert!(
        reason.contains("set apply.require_agent = false") && reason.contains("hcloud-nixos retry"),
        "the quarantine says how to override: {reason}"
    );
    assert!(
        run.stderr.contains("apply.require_agent = false"),
        "{}",
        run.stderr
    );

    // Not fetched again while quarantined.
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    assert!(
        run.stdout.starts_with(&format!("{v1} is quarantined (")),
        "{}",
        run.stdout
    );
    assert_eq!(b.fh_runs().len(), 1);

    // On purpose: the override, then `retry`.
    let text = std::fs::read_to_string(&b.config).unwrap();
    std::fs::write(
        &b.config,
        text.replace("[apply]\n", "[apply]\nrequire_agent = false\n"),
    )
    .unwrap();
    let retry = b.run(&["retry"], secs(30));
    assert!(retry.ok(), "{}", retry.all());
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(b.current_system(), p1);
    assert!(
        run.stderr
            .contains("deploying it anyway, as apply.require_agent = false asks"),
        "{}",
        run.stderr
    );
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

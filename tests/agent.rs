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
    assert!(agent.running());
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
    assert!(agent.running(), "stopped in the middle of the apply");
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

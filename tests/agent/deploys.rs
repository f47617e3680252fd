//! The agent's deploys end to end: a reference resolved at FlakeHub, fetched with fh, switched
//! to through a new profile generation; new, yanked, young and refused releases, FlakeHub down or
//! without the reference, fh failing, `operation = "boot"`, the retry limit.

use std::time::Duration;

use harness::agent::helpers::{fh_fetch, now_rfc3339, secs, str_at};
use harness::agent::{ATTR, Encoding, Kind, ORG, Options, TOKEN};
use harness::bench;
use harness::flakehub::{Down, Endpoint};

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

/// A server named by its FQDN (Hetzner gives a server created as `web.example.com` that
/// hostname) follows a reference without `#attr`: its configuration is named by the short name,
/// as NixOS's `networking.hostName` is (it may not hold a dot).
#[test]
fn a_server_with_an_fqdn_hostname_deploys_its_short_names_configuration() {
    let b = bench!(
        "fqdn_hostname",
        Options {
            hostname: Some("web.example.com".into()),
            ..Options::default()
        }
    );
    let (v1, p1) = b.release(1, Kind::Normal);
    b.set_userdata(&format!("{ORG}/infra/0.1"), Some(TOKEN), Encoding::Plain);
    let run = b.once();
    assert!(run.ok(), "{}", run.all());
    assert_eq!(str_at(&b.state(), "/running/version"), v1);
    assert_eq!(b.current_system(), p1);
    assert_eq!(b.fh_runs(), vec![fh_fetch("infra", &v1)]);
}

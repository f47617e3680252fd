//! Reboots for a new kernel end to end: `reboot = "never"`, a reboot window, `when-needed`
//! without logind, and the boot after the reboot (into the new system, or back into the old).

use harness::agent::helpers::{
    HOOKS, hook_events, hook_kinds, kinds, metrics_file, now_rfc3339, str_at, write_hook_recorder,
};
use harness::agent::{Bench, Encoding, Kind, Options, TOKEN};
use harness::prometheus::metric;

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

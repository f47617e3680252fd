//! User-data and the FlakeHub login end to end: every user-data encoding, no reference, tokens
//! FlakeHub or determinate-nixd reject, and the token leaking nowhere.

use harness::agent::helpers::{fh_fetch, secs, str_at};
use harness::agent::{ATTR, Bench, Encoding, Kind, Login, ORG, Options, TOKEN, TOKEN_SECRET_PART};
use harness::bench;

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

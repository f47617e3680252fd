//! The configuration file, user-data filling its gaps, and validation.

use super::*;
use crate::agent::config::bounds;
use crate::agent::userdata::UserSettings;

fn no_token_file(_: &Path) -> std::io::Result<String> {
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "no such file",
    ))
}

fn user() -> UserSettings {
    UserSettings {
        flakehub_token: Some(Secret::new("flakehub1_user")),
        flake: Some("org/infra/0.1#nixosConfigurations.web".into()),
        poll_interval: Some("30s".into()),
        operation: Some(Operation::Boot),
        confirm_timeout: Some("30s".into()),
        min_release_age: None,
        reboot: Some(crate::agent::reboot::Policy::WhenNeeded),
        fleet: None,
        ..Default::default()
    }
}

#[test]
fn defaults_without_file_or_user_data() {
    let s = resolve(&FileConfig::default(), None, no_token_file).unwrap();
    assert_eq!(s.flake, None);
    assert_eq!(s.operation, Operation::Switch);
    assert_eq!(s.poll_interval, Duration::from_secs(60));
    assert_eq!(s.flakehub_api_url, "https://api.flakehub.com");
    assert_eq!(s.metadata_url, "http://169.254.169.254/hetzner/v1/");
    assert_eq!(s.apply_mode, ApplyMode::TransientUnit);
    assert_eq!(s.paths, Paths::default());
    assert_eq!(s.token, None);
}

#[test]
fn the_documented_example_parses() {
    let text = r#"
flake = "my-org/infra/0.1#nixosConfigurations.web"
operation = "switch"
poll_interval = "60s"
[flakehub]
api_url = "https://api.flakehub.com"
token_file = "/run/secrets/flakehub"
[metadata]
url = "http://169.254.169.254/hetzner/v1/"
[apply]
mode = "transient-unit"
[paths]
state_dir = "/var/lib/hcloud-nixos"
current_system = "/run/current-system"
booted_system = "/run/booted-system"
system_profile = "/nix/var/nix/profiles/system"
fh = "fh"
determinate_nixd = "determinate-nixd"
nix = "nix"
"#;
    let file = parse_file(text).unwrap();
    let s = resolve(&file, None, |p| {
        assert_eq!(p, Path::new("/run/secrets/flakehub"));
        Ok("flakehub1_fromfile\n".into())
    })
    .unwrap();
    assert_eq!(
        s.flake.unwrap().to_string(),
        "my-org/infra/0.1#nixosConfigurations.web"
    );
    assert_eq!(
        s.token.as_ref().unwrap().secret().expose(),
        "flakehub1_fromfile"
    );
    assert_eq!(s.token.unwrap().origin(), "/run/secrets/flakehub");
}

#[test]
fn user_data_fills_gaps_and_the_file_wins() {
    let s = resolve(&FileConfig::default(), Some(&user()), no_token_file).unwrap();
    assert_eq!(s.flake.as_ref().unwrap().org, "org");
    assert_eq!(s.operation, Operation::Boot);
    assert_eq!(s.poll_interval, Duration::from_secs(30));
    assert_eq!(
        s.token,
        Some(Token::UserData(Secret::new("flakehub1_user")))
    );

    let file =
        parse_file("flake = \"other/infra/*\"\noperation = \"test\"\npoll_interval = \"5m\"\n")
            .unwrap();
    let s = resolve(&file, Some(&user()), no_token_file).unwrap();
    assert_eq!(s.flake.unwrap().org, "other");
    assert_eq!(s.operation, Operation::Test);
    assert_eq!(s.poll_interval, Duration::from_secs(300));
}

#[test]
fn token_file_wins_over_user_data() {
    let file = parse_file("[flakehub]\ntoken_file = \"/run/secrets/fh\"\n").unwrap();
    let s = resolve(&file, Some(&user()), |_| Ok("flakehub1_file".into())).unwrap();
    assert_eq!(s.token.unwrap().secret().expose(), "flakehub1_file");
}

#[test]
fn problems_are_listed_one_line_each_without_the_token() {
    let file = parse_file(
        "flake = \"not a ref\"\npoll_interval = \"soon\"\nretry_limit = 0\n[flakehub]\napi_url = \"ftp://x\"\ntoken_file = \"/t\"\n[paths]\nstate_dir = \"relative\"\n",
    )
    .unwrap();
    let problems = resolve(&file, None, |_| Ok("two words".into())).unwrap_err();
    assert_eq!(problems.len(), 6, "{problems:#?}");
    for p in &problems {
        assert!(!p.contains('\n'));
        assert!(!p.contains("two words"));
    }
    assert!(problems.iter().any(|p| p.starts_with("flake: ")));
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("poll_interval: 'soon'"))
    );
    assert!(problems.iter().any(|p| p.starts_with("paths.state_dir: ")));
    let unreadable = resolve(
        &parse_file("[flakehub]\ntoken_file = \"/t\"\n").unwrap(),
        None,
        no_token_file,
    );
    assert!(unreadable.unwrap_err()[0].contains("cannot read /t"));
}

#[test]
fn unknown_keys_and_bad_values_name_their_line() {
    let e = parse_file("flake = \"a/b/c\"\npoll_intervall = \"5s\"\n").unwrap_err();
    assert!(e.contains("unknown field `poll_intervall`"), "{e}");
    let e = parse_file("flake = \"a/b/c\"\n\n[apply]\nmode = 5\n").unwrap_err();
    assert!(e.starts_with("line 4: "), "{e}");
    let e = parse_file("operation = \"reboot\"\n").unwrap_err();
    assert!(e.contains("reboot"), "{e}");
    let e = parse_file("[apply]\nmode = \"fast\"\n").unwrap_err();
    assert!(!e.contains('\n'));
}

#[test]
fn missing_file_means_defaults() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        read_file(&dir.path().join("agent.toml"))
            .unwrap()
            .flake
            .is_none()
    );
    std::fs::write(dir.path().join("agent.toml"), "\nflake = 1\n").unwrap();
    let e = read_file(&dir.path().join("agent.toml")).unwrap_err();
    assert!(e.contains("agent.toml: line 2"), "{e}");
}

#[test]
fn safe_deploy_settings_parse_and_validate() {
    let text = r#"
confirm_timeout = "90s"
min_release_age = "2h"
reboot = "window"
reboot_grace = "30s"
[reboot_window]
days = ["Sat", "Sun"]
start = "02:00"
length = "2h"
time_zone = "Europe/Berlin"
[[health_check]]
command = ["/run/current-system/sw/bin/curl", "-fsS", "http://127.0.0.1:8080/healthz"]
timeout = "10s"
[[health_check]]
url = "http://127.0.0.1:8080/healthz"
[[hook]]
command = ["/run/current-system/sw/bin/logger", "-t", "deploy"]
[metrics]
listen = "127.0.0.1:9945"
textfile = "/var/lib/prometheus-node-exporter-text/hcloud-nixos.prom"
"#;
    let s = resolve(&parse_file(text).unwrap(), None, no_token_file).unwrap();
    assert_eq!(s.confirm_timeout, Duration::from_secs(90));
    assert_eq!(s.min_release_age, Duration::from_secs(7200));
    assert_eq!(s.reboot, crate::agent::reboot::Policy::Window);
    assert_eq!(
        s.reboot_window.as_ref().unwrap().time_zone_name(),
        "Europe/Berlin"
    );
    assert_eq!(s.reboot_grace, Duration::from_secs(30));
    assert_eq!(s.health_checks.len(), 2);
    assert_eq!(s.hooks.len(), 1);
    assert!(s.metrics.listen.is_some() && s.metrics.textfile.is_some());

    let defaults = resolve(&FileConfig::default(), None, no_token_file).unwrap();
    assert_eq!(defaults.confirm_timeout, Duration::from_secs(120));
    assert_eq!(defaults.min_release_age, Duration::ZERO);
    assert_eq!(defaults.reboot, crate::agent::reboot::Policy::Never);
    assert!(defaults.reboot_window.is_none());
    assert!(!defaults.metrics.is_enabled());

    let bad = "reboot = \"window\"\n[reboot_window]\nstart = \"25:00\"\n[[health_check]]\ncommand = [\"curl\"]\n[metrics]\nlisten = \"nowhere\"\n";
    let problems = resolve(&parse_file(bad).unwrap(), None, no_token_file).unwrap_err();
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("reboot_window.start")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("health_check[0].command")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.starts_with("metrics.listen")),
        "{problems:?}"
    );
}

/// Durations humantime reads but the clock cannot carry. Each is used here the way the agent
/// uses it; before the table of bounds each was accepted, then panicked (or became a negative
/// lease TTL) at that use. Now the configuration is refused when it is read, naming the key and
/// the range.
#[test]
fn durations_too_long_for_the_clock_are_refused_when_read() {
    use std::time::{Instant, SystemTime};
    type Use = fn(&Settings);
    // 300000000000y is about 9.5e18 s: a valid Duration, past what an Instant or an i64 holds.
    // 580000000000y is about 1.83e19 s, just under Duration::MAX: the ±10% jitter overflows it.
    let cases: [(&str, &str, String, Use); 7] = [
        // src/agent/apply.rs, Applier::wait: `tokio::time::Instant::now() + timeout`.
        ("apply.timeout", "300000000000y", "[apply]\ntimeout = \"300000000000y\"\n".into(), |s| {
            let _ = tokio::time::Instant::now() + s.apply_timeout;
        }),
        // src/agent/deploy: `SystemTime::now() + ctx.settings.confirm_timeout`.
        ("confirm_timeout", "300000000000y", "confirm_timeout = \"300000000000y\"\n".into(), |s| {
            let _ = SystemTime::now() + s.confirm_timeout;
        }),
        // src/agent/deploy, decide: `published_at + min_release_age`.
        ("min_release_age", "300000000000y", "min_release_age = \"300000000000y\"\n".into(), |s| {
            let _ = SystemTime::now() + s.min_release_age;
        }),
        // src/agent/deploy, next_delay: `base.mul_f64(factor)`, the factor up to 1.1.
        ("poll_interval", "580000000000y", "poll_interval = \"580000000000y\"\n".into(), |s| {
            let _ = s.poll_interval.mul_f64(1.1);
        }),
        // src/agent/hooks.rs, run: `Instant::now() + hook.timeout`.
        (
            "hook[0].timeout",
            "300000000000y",
            "[[hook]]\ncommand = [\"/bin/true\"]\ntimeout = \"300000000000y\"\n".into(),
            |s| {
                let _ = Instant::now() + s.hooks[0].timeout;
            },
        ),
        // src/fleet/etcd.rs: `c.lease_grant(ttl.as_secs() as i64, None)`.
        (
            "fleet.etcd.lease_ttl",
            "300000000000y",
            "[fleet]\ngroup = \"web\"\n[fleet.etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nlease_ttl = \"300000000000y\"\n".into(),
            |s| {
                let ttl = s.fleet.as_ref().unwrap().etcd.as_ref().unwrap().lease_ttl;
                let granted = ttl.as_secs() as i64;
                assert!(granted > 0, "etcd would be asked for a lease of {granted} s");
            },
        ),
        (
            "fleet.etcd.reboot_ttl",
            "300000000000y",
            "[fleet]\ngroup = \"web\"\n[fleet.etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nreboot_ttl = \"300000000000y\"\n".into(),
            |s| {
                let ttl = s.fleet.as_ref().unwrap().etcd.as_ref().unwrap().reboot_ttl;
                let granted = ttl.as_secs() as i64;
                assert!(granted > 0, "etcd would be asked for a lease of {granted} s");
            },
        ),
    ];
    let mut failures = Vec::new();
    for (key, text, toml, use_it) in cases {
        match check(&parse_file(&toml).unwrap()) {
            Ok(settings) => {
                let used = std::panic::catch_unwind(|| use_it(&settings));
                let what = match used {
                    Err(panic) => {
                        let message = panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default();
                        format!("panicked: {message}")
                    }
                    Ok(()) => "did not panic".to_string(),
                };
                failures.push(format!("{key} = '{text}' was accepted, and its use {what}"));
            }
            Err(problems) => {
                assert_eq!(problems.len(), 1, "{key}: {problems:?}");
                let expected = format!("{key}: '{text}' is out of range; use ");
                if !problems[0].starts_with(&expected) {
                    failures.push(format!(
                        "{key}: {:?} does not start with {expected:?}",
                        problems[0]
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// The same settings written as TOML (the file, and what the NixOS module renders), as JSON
/// (`config check --json`) and as YAML (the user-data section) decode into the same raw shape.
#[test]
fn every_format_decodes_into_one_shape() {
    let toml = "flake = \"org/infra/0.1\"\noperation = \"boot\"\npoll_interval = \"5m\"\n\
                [fleet]\ngroup = \"web\"\nslots = 2\n[fleet.etcd]\nlease_ttl = \"10s\"\n";
    let json = r#"{"flake": "org/infra/0.1", "operation": "boot", "poll_interval": "5m",
                   "fleet": {"group": "web", "slots": 2, "etcd": {"lease_ttl": "10s"}}}"#;
    let yaml = "#cloud-config\nhcloud_nixos:\n  flake: org/infra/0.1\n  operation: boot\n  \
                poll_interval: 5m\n  fleet:\n    group: web\n    slots: 2\n    etcd:\n      \
                lease_ttl: 10s\n";
    let from_toml = parse_file(toml).unwrap();
    let from_json: FileConfig = serde_json::from_str(json).unwrap();
    let user = crate::agent::userdata::parse(yaml.as_bytes());
    assert_eq!(user.problems, Vec::<String>::new());
    assert_eq!(from_toml, from_json);
    assert_eq!(Some(from_toml.clone()), user.settings);
    assert_eq!(
        from_toml.fleet.unwrap().etcd.unwrap().lease_ttl.as_deref(),
        Some("10s")
    );
}

#[test]
fn the_file_wins_key_by_key_inside_sections_too() {
    let user = crate::agent::userdata::parse(
        b"hcloud_nixos:\n  flake: org/infra/0.1\n  confirm_timeout: 30s\n  fleet:\n    group: web\n    \
          slots: 3\n    etcd:\n      endpoints: ['http://10.0.0.5:2379']\n      lease_ttl: 10s\n",
    );
    assert_eq!(user.problems, Vec::<String>::new());
    let file = parse_file(
        "poll_interval = \"5m\"\n[fleet]\nslots = 1\n[fleet.etcd]\nprefix = \"/file\"\n",
    )
    .unwrap();
    let s = resolve(&file, user.settings.as_ref(), no_token_file).unwrap();
    assert_eq!(s.flake.unwrap().flake, "infra");
    assert_eq!(s.poll_interval, Duration::from_secs(300));
    assert_eq!(s.confirm_timeout, Duration::from_secs(30));
    let fleet = s.fleet.unwrap();
    assert_eq!((fleet.group.as_str(), fleet.slots), ("web", 1));
    let etcd = fleet.etcd.unwrap();
    assert_eq!(etcd.prefix, "/file");
    assert_eq!(etcd.endpoints, ["http://10.0.0.5:2379"]);
    assert_eq!(etcd.lease_ttl, Duration::from_secs(10));
}

/// A key that both sources can set follows one rule: what the file is refused for, user-data
/// is refused for, with the same message.
#[test]
fn user_data_and_the_file_follow_the_same_rule() {
    for (key, value) in [
        ("poll_interval", "500ms"),
        ("poll_interval", "2days"),
        ("poll_interval", "300000000000y"),
        ("poll_interval", "soon"),
        ("confirm_timeout", "0s"),
        ("confirm_timeout", "2h"),
        ("min_release_age", "31days"),
        ("min_release_age", "-1s"),
        ("flake", "org/infra"),
    ] {
        let from_file = check(&parse_file(&format!("{key} = \"{value}\"\n")).unwrap()).unwrap_err();
        assert_eq!(from_file.len(), 1, "{key} = {value}: {from_file:?}");
        let user = crate::agent::userdata::parse(
            format!("hcloud_nixos:\n  {key}: \"{value}\"\n").as_bytes(),
        );
        assert_eq!(
            user.problems,
            [format!("hcloud_nixos.{}", from_file[0])],
            "{key} = {value}"
        );
        // The invalid key is left out, so the agent goes on with the default.
        let s = resolve(
            &FileConfig::default(),
            user.settings.as_ref(),
            no_token_file,
        )
        .unwrap();
        assert_eq!(s.poll_interval, bounds::POLL_INTERVAL.default);
    }
    for (key, value) in [
        ("poll_interval", "1s"),
        ("confirm_timeout", "1h"),
        ("min_release_age", "30d"),
    ] {
        assert!(check(&parse_file(&format!("{key} = \"{value}\"\n")).unwrap()).is_ok());
        let user =
            crate::agent::userdata::parse(format!("hcloud_nixos:\n  {key}: {value}\n").as_bytes());
        assert_eq!(user.problems, Vec::<String>::new(), "{key} = {value}");
    }
}

#[test]
fn the_token_is_not_read_from_the_file() {
    let file = parse_file("flakehub_token = \"flakehub1_secretvalue\"\n").unwrap();
    let problems = check(&file).unwrap_err();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("flakehub_token: not read from the configuration file")
            && problems[0].contains("flakehub.token_file")
            && !problems[0].contains("secretvalue"),
        "{problems:?}"
    );
}

#[test]
fn numbers_are_bounded() {
    for (text, problem) in [
        (
            "retry_limit = 0\n",
            "retry_limit: 0 is out of range; use 1 to 100",
        ),
        (
            "retry_limit = 101\n",
            "retry_limit: 101 is out of range; use 1 to 100",
        ),
        (
            "retry_limit = -1\n",
            "retry_limit: -1 is out of range; use 1 to 100",
        ),
        (
            "[fleet]\ngroup = \"web\"\nslots = 1001\npause_on_failure = false\n\
             [fleet.fleetlock]\nurl = \"http://f:8080\"\n",
            "fleet.slots: 1001 is out of range; use 1 to 1000",
        ),
    ] {
        assert_eq!(check(&parse_file(text).unwrap()).unwrap_err(), [problem]);
    }
    let s = check(&parse_file("retry_limit = 100\n").unwrap()).unwrap();
    assert_eq!(s.retry_limit, 100);
}

/// A value of the wrong kind is refused while decoding, naming its line and its key, in every
/// section.
#[test]
fn decoding_errors_name_the_line_and_the_key() {
    for (text, expected) in [
        (
            "poll_interval = 60\n",
            "line 1: poll_interval: is a number without a unit",
        ),
        (
            "\n[apply]\ntimeout = true\n",
            "line 3: apply.timeout: is true/false, not a duration",
        ),
        (
            "[fleet.etcd]\nlease_ttl = [\"30s\"]\n",
            "line 2: fleet.etcd.lease_ttl: is a list, not a duration",
        ),
        (
            "[[hook]]\ncommand = [\"/bin/true\"]\ntimeout = 30\n",
            "line 3: hook[0].timeout: is a number without a unit",
        ),
        ("flake = 42\n", "line 1: flake: is a number, not a string"),
        (
            "operation = \"reboot\"\n",
            "line 1: operation: 'reboot' is not an operation",
        ),
        (
            "[reboot_window]\nlenght = \"2h\"\n",
            "line 2: reboot_window.lenght: unknown field `lenght`",
        ),
    ] {
        let e = parse_file(text).unwrap_err();
        assert!(e.starts_with(expected), "{text:?}: {e}");
        assert!(!e.contains('\n'));
    }
}

#[test]
fn check_file_reads_toml_and_json_alike() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let toml = check_file(&write("a.toml", "poll_interval = \"5m\"\n"), false).unwrap();
    let json = check_file(&write("a.json", r#"{"poll_interval": "5m"}"#), true).unwrap();
    assert_eq!(toml, json);
    assert!(toml.contains("poll_interval              5m"), "{toml}");
    let e = check_file(&write("b.json", r#"{"poll_interval": "5m"} {}"#), true).unwrap_err();
    assert!(
        e[0].contains("b.json: not the agent's settings as JSON: trailing characters"),
        "{e:?}"
    );
    let e = check_file(&write("c.json", r#"{"apply": {"timeout": "3days"}}"#), true).unwrap_err();
    assert_eq!(
        e,
        ["apply.timeout: '3days' is out of range; use 1s to 2days"]
    );
}

#[test]
fn a_json_error_does_not_quote_what_may_be_a_token() {
    // Found by the long run: serde_json's "invalid type: string ..." quoted the document.
    let e = parse_json("\"flakehub1_s3cr3tT0kenValue_0123456789abcdef\"").unwrap_err();
    assert!(!e.contains("s3cr3t"), "{e}");
    assert!(e.contains("(43 characters)"), "{e}");
}

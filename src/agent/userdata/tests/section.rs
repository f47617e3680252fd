//! Every way the `hcloud_nixos` section can be wrong, the token that never shows, `describe`
//! and `check_file`.

use std::time::Duration;

use super::*;

// --- The section's values -------------------------------------------------------------------

#[test]
fn invalid_documents() {
    let data = parse(b"#cloud-config\nhcloud_nixos: [unclosed\n");
    assert_eq!(data.settings, None);
    assert_eq!(data.problems.len(), 1);
    assert!(
        data.problems[0].starts_with("user-data: not valid YAML"),
        "{:?}",
        data.problems
    );
    let data = parse(b"#cloud-config\n- a\n- b\n");
    assert_eq!(data.problems.len(), 1);
    assert!(
        data.problems[0].contains("is a list, not a mapping"),
        "{:?}",
        data.problems
    );
    one_problem(
        "  - flake\n",
        "hcloud_nixos: is a list, not a mapping",
        "keys: flakehub_token",
    );
    let data = parse(b"#cloud-config\nhcloud_nixos: yes please\n");
    assert!(data.problems[0].starts_with("hcloud_nixos: is a string, not a mapping"));
    assert_eq!(data.settings, Some(UserSettings::default()));
}

#[test]
fn unknown_keys() {
    let data = one_problem(
        "  flake: a/b/*\n  confirm: true\n",
        "hcloud_nixos.confirm: unknown key; known keys are flakehub_token, flake, poll_interval, operation",
        "",
    );
    // The rest is still read.
    assert_eq!(data.settings.unwrap().flake.unwrap().to_string(), "a/b/*");
    one_problem(
        &format!("  token: {TOKEN}\n"),
        "hcloud_nixos.token: unknown key (did you mean flakehub_token?)",
        "",
    );
    one_problem(
        "  poll-interval: 5m\n",
        "hcloud_nixos.poll-interval: unknown key (did you mean poll_interval?)",
        "",
    );
    one_problem(
        "  Operation: boot\n",
        "hcloud_nixos.Operation: unknown key (did you mean operation?)",
        "",
    );
}

#[test]
fn bad_flake_references() {
    for (value, needle) in [
        ("my-org/infra", "no version"),
        ("my-org/infra/0.1#", "after '#' is empty"),
        ("'a/b/0.1;id'", "contains ';'"),
        ("a/b/latest", "not a version constraint"),
        ("\"a/b/0.1\\n\"", "control character"),
        ("42", "is a number, not a string"),
        ("[a, b]", "is a list, not a string"),
    ] {
        let data = one_problem(
            &format!("  flake: {value}\n"),
            "hcloud_nixos.flake: ",
            needle,
        );
        assert_eq!(data.settings.unwrap().flake, None, "{value}");
    }
}

#[test]
fn bad_poll_intervals() {
    for (value, needle) in [
        ("60", "a number without a unit"),
        ("soon", "is not a duration"),
        ("500ms", "out of range"),
        ("0s", "out of range"),
        ("2days", "out of range"),
        ("300000000000y", "out of range"),
        ("[5m]", "is a list"),
        ("true", "is true/false"),
    ] {
        let data = one_problem(
            &format!("  poll_interval: {value}\n  flake: a/b/*\n"),
            "hcloud_nixos.poll_interval: ",
            needle,
        );
        let s = data.settings.unwrap();
        assert_eq!(s.poll_interval, None);
        assert!(s.flake.is_some(), "the valid rest is kept");
    }
    let data = parse(b"hcloud_nixos:\n  poll_interval: 1h 30m\n");
    assert_eq!(
        effective(&data.settings.unwrap()).poll_interval,
        Duration::from_secs(5400)
    );
    // The bounds of the table, which the configuration file follows too.
    let (min, max) = (
        crate::agent::config::bounds::POLL_INTERVAL.min,
        crate::agent::config::bounds::POLL_INTERVAL.max,
    );
    for (text, expected) in [("1s", min), ("24h", max)] {
        let data = parse(format!("hcloud_nixos:\n  poll_interval: {text}\n").as_bytes());
        assert_eq!(data.problems, Vec::<String>::new());
        assert_eq!(effective(&data.settings.unwrap()).poll_interval, expected);
    }
}

#[test]
fn bad_operations() {
    for (value, needle) in [
        (
            "reboot",
            "'reboot' is not an operation; use switch, boot or test",
        ),
        ("Switch", "'Switch' is not an operation"),
        ("dry-activate", "is not an operation"),
        ("1", "is a number"),
    ] {
        let data = one_problem(
            &format!("  operation: {value}\n"),
            "hcloud_nixos.operation: ",
            needle,
        );
        assert_eq!(data.settings.unwrap().operation, None);
    }
    for (value, op) in [
        ("switch", Operation::Switch),
        ("boot", Operation::Boot),
        ("test", Operation::Test),
    ] {
        let data = parse(format!("hcloud_nixos:\n  operation: {value}\n").as_bytes());
        assert_eq!(data.settings.unwrap().operation, Some(op));
    }
}

#[test]
fn null_values_are_unset() {
    let data = parse(b"hcloud_nixos:\n  flake:\n  operation: ~\n");
    assert_eq!(data.problems, Vec::<String>::new());
    assert_eq!(data.settings, Some(UserSettings::default()));
}

#[test]
fn bad_tokens() {
    for (value, needle) in [
        ("\"\"", "is empty"),
        ("\"flakehub1_abc def\"", "whitespace"),
        ("\"flakehub1_abc\\tdef\"", "whitespace"),
        ("\"flakehub1_abc\\u0007\"", "control character"),
        ("\"flakehub1_äbc\"", "non-ASCII"),
        ("12345678", "is a number, not a string"),
        ("[flakehub1_abc]", "is a list"),
        ("abc", "too short"),
        ("!tag x", "too short"),
    ] {
        let data = one_problem(
            &format!("  flakehub_token: {value}\n"),
            "hcloud_nixos.flakehub_token: ",
            needle,
        );
        assert_eq!(data.settings.unwrap().flakehub_token, None);
    }
    let long = "x".repeat(5000);
    one_problem(
        &format!("  flakehub_token: {long}\n"),
        "hcloud_nixos.flakehub_token: ",
        "characters long",
    );
    // Any prefix is accepted.
    let data = parse(b"hcloud_nixos:\n  flakehub_token: fhdev_ABC-123.xyz=\n");
    assert_eq!(data.problems, Vec::<String>::new());
    assert_eq!(
        data.settings.unwrap().flakehub_token.unwrap().expose(),
        "fhdev_ABC-123.xyz="
    );
}

// --- The token never shows ------------------------------------------------------------------

#[test]
fn the_token_never_shows() {
    let secret_part = "s3cr3tT0kenValue";
    let assert_hidden = |data: &UserData, what: &str| {
        for p in &data.problems {
            assert!(!p.contains(secret_part), "{what}: problem {p:?}");
        }
        for k in &data.other_keys {
            assert!(!k.contains(secret_part), "{what}: key {k:?}");
        }
        let dbg = format!("{data:?}");
        assert!(!dbg.contains(secret_part), "{what}: {dbg}");
        let text = describe(data);
        assert!(!text.contains(secret_part), "{what}: {text}");
    };

    let data = parse(full_section().as_bytes());
    assert_hidden(&data, "valid");
    let text = describe(&data);
    assert!(
        text.contains(&format!("[redacted] ({} characters)", TOKEN.len())),
        "{text}"
    );
    assert!(format!("{:?}", data.settings.unwrap()).contains("[redacted]"));

    // Every kind of problem next to a valid token.
    let doc = format!(
        "#cloud-config\nhcloud_nixos:\n  flakehub_token: {TOKEN}\n  flake: a/b\n  poll_interval: x\n  operation: y\n  z: {TOKEN}\n"
    );
    let data = parse(doc.as_bytes());
    assert_eq!(data.problems.len(), 4, "{:?}", data.problems);
    assert_hidden(&data, "problems");

    // A broken token.
    for value in [
        format!("\"{TOKEN} x\""),
        format!("[{TOKEN}]"),
        format!("{{a: {TOKEN}}}"),
    ] {
        let data = parse(format!("hcloud_nixos:\n  flakehub_token: {value}\n").as_bytes());
        assert_eq!(data.problems.len(), 1);
        assert_hidden(&data, &value);
    }

    // YAML syntax errors around the token: the parser may quote the source.
    for doc in [
        format!("hcloud_nixos:\n  flakehub_token: \"{TOKEN}\n  flake: a/b/*\n"),
        format!("hcloud_nixos:\n  flakehub_token: {TOKEN}\n flake: [\n"),
        format!("hcloud_nixos:\n  flakehub_token: {TOKEN}: x\n"),
        format!("hcloud_nixos:\n  flakehub_token: '{TOKEN}\n"),
        format!("hcloud_nixos:\n\tflakehub_token: {TOKEN}\n"),
        format!("hcloud_nixos: {{flakehub_token: {TOKEN}\n"),
        format!("hcloud_nixos:\n  flakehub_token: {TOKEN}\n  flakehub_token: {TOKEN}\n"),
        format!("{TOKEN}: x\nhcloud_nixos:\n  flake: a/b/*\n"),
        format!("hcloud_nixos:\n  flakehub_token: *{TOKEN}\n"),
        format!("hcloud_nixos:\n  flakehub_token: !{TOKEN} x\n"),
    ] {
        let data = parse(doc.as_bytes());
        assert_hidden(&data, &doc);
    }
}

// --- describe and check_file ------------------------------------------------------------------

#[test]
fn describe_shows_the_effective_settings() {
    let data = parse(full_section().as_bytes());
    let text = describe(&data);
    // The value column's width follows the longest key: compare with white space folded.
    let folded: String = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n");
    for line in [
        "hcloud_nixos:",
        "flakehub_token: [redacted]",
        "flake: my-org/infra/0.1#nixosConfigurations.web",
        "poll_interval: 5m",
        "operation: boot",
        "Left to cloud-init (ignored by hcloud-nixos): package_update, runcmd",
    ] {
        assert!(folded.contains(line), "{line:?} missing in:\n{text}");
    }
    let data = parse(b"hcloud_nixos:\n  flake: a/b/0.1\n");
    let text = describe(&data);
    assert!(
        text.contains("a/b/0.1 (attribute: nixosConfigurations.<short hostname>)"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("operation:") && l.ends_with(" (not set)")),
        "{text}"
    );
}

#[test]
fn check_file_results() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, full_section()).unwrap();
    let text = check_file(&good).unwrap();
    assert!(
        text.contains("[redacted]") && !text.contains(TOKEN),
        "{text}"
    );

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        format!("hcloud_nixos:\n  flakehub_token: {TOKEN}\n  flake: x\n  foo: 1\n"),
    )
    .unwrap();
    let problems = check_file(&bad).unwrap_err();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].starts_with("hcloud_nixos.flake: "));
    assert!(problems[1].starts_with("hcloud_nixos.foo: unknown key"));

    let big = dir.path().join("big.yaml");
    std::fs::write(&big, vec![b'#'; MAX_RAW + 1]).unwrap();
    let problems = check_file(&big).unwrap_err();
    assert_eq!(problems.len(), 1);
    assert!(problems[0].contains("32 KiB"), "{problems:?}");

    let missing = dir.path().join("missing.yaml");
    let problems = check_file(&missing).unwrap_err();
    assert_eq!(problems.len(), 1);
    assert!(problems[0].contains("cannot read"), "{problems:?}");
    let problems = check_file(dir.path()).unwrap_err();
    assert_eq!(problems.len(), 1, "a directory: {problems:?}");

    assert!(check_file(&dir.path().join("none")).is_err());
    let fixture_path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hetzner-metadata/userdata.cloud-config-example.yaml");
    let text = check_file(&fixture_path).unwrap();
    assert!(text.contains("No hcloud_nixos section"), "{text}");
}

#[test]
fn never_panics_on_odd_input() {
    let mut inputs: Vec<Vec<u8>> = vec![
        vec![0x1f, 0x8b],
        vec![0x1f, 0x8b, 0x08],
        b"MIME-Version: 1.0\r\n".to_vec(),
        b"Content-Type: multipart/mixed; boundary=\"\"\r\n\r\n--\r\n".to_vec(),
        b"Content-Type: multipart/mixed; boundary=B\r\nMIME-Version: 1.0\r\n\r\n--B\r\n".to_vec(),
        b"Content-Type: text/cloud-config\r\nMIME-Version: 1.0\r\n\r\nhcloud_nixos: {flake: a/b/*}\r\n".to_vec(),
        b"====".to_vec(),
        b"hcloud_nixos: &a [*a]".to_vec(),
        b"a: &a [*a, *a]\nb: &b [*a, *a, *a]\nc: &c [*b, *b, *b]\nd: &d [*c, *c, *c]\n".to_vec(),
        b"\x00\x01\x02".to_vec(),
        "{".repeat(10_000).into_bytes(),
        "- ".repeat(10_000).into_bytes(),
    ];
    inputs.push(gzip(&inputs[3].clone()));
    for raw in inputs {
        let _ = parse(&raw);
    }
    // A single-part MIME message that is the cloud-config itself.
    let data = parse(b"Content-Type: text/cloud-config\r\nMIME-Version: 1.0\r\n\r\nhcloud_nixos: {flake: a/b/*}\r\n");
    assert_eq!(data.settings.unwrap().flake.unwrap().to_string(), "a/b/*");
}

#[test]
fn reboot_policy_and_fleet_from_user_data() {
    let data = parse(
        b"#cloud-config\nhcloud_nixos:\n  flake: a/b/0.1\n  reboot: window\n  fleet:\n    group: web\n    slots: 2\n    backend: etcd\n    etcd:\n      endpoints: ['http://127.0.0.1:2379']\n",
    );
    assert!(data.problems.is_empty(), "{:?}", data.problems);
    let s = data.settings.unwrap();
    assert_eq!(s.reboot, Some(crate::agent::reboot::Policy::Window));
    let fleet = s.fleet.unwrap().resolve().unwrap();
    assert_eq!(fleet.group, "web");
    assert_eq!(fleet.slots, 2);

    // Unknown keys of the fleet mapping are caught here; values are checked once the
    // configuration file has been merged in (it may fill what user-data leaves out).
    let bad = parse(b"hcloud_nixos:\n  reboot: sometimes\n  fleet:\n    slot: 2\n");
    assert_eq!(bad.problems.len(), 2, "{:?}", bad.problems);
    assert!(
        bad.problems
            .iter()
            .any(|p| p.contains("hcloud_nixos.reboot"))
    );
    assert!(
        bad.problems
            .iter()
            .any(|p| p.contains("hcloud_nixos.fleet"))
    );
}

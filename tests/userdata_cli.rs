//! `hcloud-nixos userdata check FILE` and `hcloud-nixos config check [--json] FILE`: the
//! effective settings and exit 0, or one line per problem and a non-zero exit; the token shows
//! nowhere. Both read durations and numbers by the same table of bounds.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output};

const TOKEN: &str = "flakehub1_cliT0kenSecretPart_0123456789abcdef";

fn check(path: &Path) -> Output {
    run(&["userdata", "check"], path)
}

fn run(args: &[&str], path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hcloud-nixos"))
        .args(args)
        .arg(path)
        .env_remove("RUST_LOG")
        .output()
        .expect("run hcloud-nixos")
}

fn texts(out: &Output) -> (String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stdout.contains("cliT0kenSecretPart") && !stderr.contains("cliT0kenSecretPart"),
        "the token leaked:\n{stdout}\n{stderr}"
    );
    (stdout, stderr)
}

fn write(dir: &Path, name: &str, content: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

fn gzip_base64(data: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    base64::engine::general_purpose::STANDARD
        .encode(enc.finish().unwrap())
        .into_bytes()
}

fn good_document() -> String {
    format!(
        "#cloud-config\nhcloud_nixos:\n  flakehub_token: {TOKEN}\n  flake: my-org/infra/0.1#nixosConfigurations.web\n  operation: boot\npackages: [htop]\n"
    )
}

#[test]
fn a_good_file_prints_the_settings() {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in [
        ("plain.yaml", good_document().into_bytes()),
        ("gzip-base64.txt", gzip_base64(good_document().as_bytes())),
    ] {
        let out = check(&write(dir.path(), name, &content));
        let (stdout, stderr) = texts(&out);
        assert!(out.status.success(), "{name}: {stdout}{stderr}");
        assert!(stdout.contains("[redacted]"), "{name}: {stdout}");
        assert!(
            stdout.contains("my-org/infra/0.1#nixosConfigurations.web"),
            "{name}: {stdout}"
        );
        assert!(stdout.contains("boot"), "{name}: {stdout}");
        assert!(stdout.contains("packages"), "{name}: {stdout}");
    }
}

#[test]
fn no_section_is_fine() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hetzner-metadata/userdata.cloud-config-example.yaml");
    let out = check(&path);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("No hcloud_nixos section"), "{stdout}");
    assert!(stdout.contains("runcmd"), "{stdout}");
}

#[test]
fn problems_are_one_line_each_and_fail() {
    let dir = tempfile::tempdir().unwrap();
    let doc = format!(
        "#cloud-config\nhcloud_nixos:\n  flakehub_token: {TOKEN}\n  flake: my-org/infra\n  poll_interval: 60\n  operation: reboot\n  fleet: web\n"
    );
    let out = check(&write(dir.path(), "bad.yaml", doc.as_bytes()));
    let (stdout, stderr) = texts(&out);
    assert!(!out.status.success(), "{stdout}{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    for field in ["flake", "poll_interval", "operation", "fleet"] {
        let prefix = format!("hcloud_nixos.{field}: ");
        assert_eq!(
            lines.iter().filter(|l| l.contains(&prefix)).count(),
            1,
            "{field}:\n{stderr}"
        );
    }
    assert_eq!(lines.len(), 4, "{stderr}");
}

#[test]
fn unreadable_and_oversized_files_are_one_problem() {
    let dir = tempfile::tempdir().unwrap();
    let out = check(&dir.path().join("missing.yaml"));
    let (_, stderr) = texts(&out);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let big = write(dir.path(), "big.yaml", &vec![b'#'; 32 * 1024 + 1]);
    let out = check(&big);
    let (_, stderr) = texts(&out);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("32 KiB"), "{stderr}");
}

#[test]
fn out_of_range_values_name_the_key_and_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let doc = format!(
        "#cloud-config\nhcloud_nixos:\n  flakehub_token: {TOKEN}\n  flake: my-org/infra/0.1\n  poll_interval: 500ms\n  min_release_age: 300000000000y\n"
    );
    let out = check(&write(dir.path(), "range.yaml", doc.as_bytes()));
    let (stdout, stderr) = texts(&out);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [
            "error: hcloud_nixos.min_release_age: '300000000000y' is out of range; use 0s to 30days",
            "error: hcloud_nixos.poll_interval: '500ms' is out of range; use 1s to 1day",
        ],
        "{stderr}"
    );
}

#[test]
fn config_check_reads_by_the_same_rules() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.toml",
        b"poll_interval = \"500ms\"\nretry_limit = 0\n[apply]\ntimeout = \"300000000000y\"\n",
    );
    let out = run(&["config", "check"], &bad);
    let (stdout, stderr) = texts(&out);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [
            "error: poll_interval: '500ms' is out of range; use 1s to 1day",
            "error: retry_limit: 0 is out of range; use 1 to 100",
            "error: apply.timeout: '300000000000y' is out of range; use 1s to 2days",
        ],
        "{stderr}"
    );

    let wrong_kind = write(dir.path(), "kind.toml", b"\n[apply]\ntimeout = 60\n");
    let out = run(&["config", "check"], &wrong_kind);
    let (_, stderr) = texts(&out);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("kind.toml: line 3: apply.timeout: is a number without a unit"),
        "{stderr}"
    );

    let json = write(
        dir.path(),
        "settings.json",
        br#"{"poll_interval": "5m", "retry_limit": 5, "apply": {"timeout": "2days"}}"#,
    );
    let out = run(&["config", "check", "--json"], &json);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    for line in [
        "poll_interval              5m",
        "retry_limit                5",
        "apply.timeout              2days",
    ] {
        assert!(stdout.contains(line), "{line:?} missing in:\n{stdout}");
    }
    let json = write(
        dir.path(),
        "bad.json",
        br#"{"fleet": {"slots": 2, "etcd": {"lease_ttl": 30}}}"#,
    );
    let out = run(&["config", "check", "--json"], &json);
    let (_, stderr) = texts(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("bad.json: not the agent's settings as JSON: fleet.etcd.lease_ttl: is a number without a unit"),
        "{stderr}"
    );
}

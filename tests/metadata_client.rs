//! The metadata client and the `hcloud-nixos network` command against the stand-in metadata
//! service on 127.0.0.1: every injected fault, and the files written for each fixture (no root).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use harness::metadata::{Documents, Fault, MetadataServer};
use hcloud_nixos::boot::metadata::client::{Client, FetchError, Settings};
use tokio::time::Instant;

const FULL_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBjYTHGYkNK7DZ4Gn0NGN1sjFUVapus4GXybEYg/ylcA alice@laptop";

fn fixture(name: &str) -> PathBuf {
    let dir = std::env::var_os("HCLOUD_NIXOS_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hetzner-metadata")
        });
    let path = dir.join(name);
    assert!(path.is_file(), "fixture {} is missing", path.display());
    path
}

fn server(metadata: &str, private: Option<&str>) -> MetadataServer {
    let private = private.map(fixture);
    let docs =
        Documents::from_files(&fixture(metadata), private.as_deref(), None).expect("read fixtures");
    MetadataServer::start("127.0.0.1:0", docs).expect("start the stand-in")
}

/// Quick retries so that fault tests take well under a second each.
fn client_for(base_url: String) -> Client {
    Client::new(Settings {
        base_url,
        request_timeout: Duration::from_millis(500),
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        ..Settings::default()
    })
    .expect("client")
}

fn in_secs(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

// ---------------------------------------------------------------------------------------------
// The client

#[tokio::test]
async fn serves_the_fixture_document() {
    let s = server("metadata.full-example.yaml", None);
    let body = client_for(s.base_url())
        .get("metadata", in_secs(5))
        .await
        .expect("fetch")
        .expect("present");
    let want = std::fs::read(fixture("metadata.full-example.yaml")).unwrap();
    assert_eq!(body, want);
    assert_eq!(s.requests("metadata"), 1);
}

#[tokio::test]
async fn derived_keys_are_served() {
    let s = server("metadata.full-example.yaml", None);
    let c = client_for(s.base_url());
    let get = |p: &'static str| {
        let c = c.clone();
        async move { c.get(p, in_secs(5)).await.unwrap().unwrap() }
    };
    assert_eq!(get("metadata/hostname").await, b"my-nixos-server");
    assert_eq!(get("metadata/instance-id").await, b"58123456");
    let keys: Vec<String> = serde_json::from_slice(&get("metadata/public-keys").await).unwrap();
    assert_eq!(keys, vec![FULL_KEY.to_string()]);
    let nc = String::from_utf8(get("metadata/network-config").await).unwrap();
    assert!(
        nc.starts_with("config:\n- mac_address: 96:00:03:aa:bb:cc"),
        "{nc}"
    );
}

#[tokio::test]
async fn retries_5xx_until_success() {
    let s = server("metadata.full-example.yaml", None);
    s.fail_next("metadata", 503, 2);
    let body = client_for(s.base_url())
        .get("metadata", in_secs(5))
        .await
        .expect("503 twice then 200 must succeed");
    assert!(body.is_some_and(|b| !b.is_empty()));
    assert_eq!(s.requests("metadata"), 3);
}

#[tokio::test]
async fn retries_429_and_500() {
    let s = server("metadata.full-example.yaml", None);
    s.fail_next("metadata", 429, 1);
    s.fail_next("metadata", 500, 1);
    s.fail_next("metadata", 504, 1);
    let r = client_for(s.base_url()).get("metadata", in_secs(5)).await;
    assert!(matches!(r, Ok(Some(_))), "{r:?}");
    assert_eq!(s.requests("metadata"), 4);
}

#[tokio::test]
async fn not_found_is_none_without_retry() {
    let s = server("metadata.full-example.yaml", None);
    let r = client_for(s.base_url())
        .get("metadata/no-such-key", in_secs(5))
        .await;
    assert!(matches!(r, Ok(None)), "{r:?}");
    assert_eq!(s.requests("metadata/no-such-key"), 1);
}

#[tokio::test]
async fn no_userdata_is_empty() {
    let s = server("metadata.full-example.yaml", None);
    let r = client_for(s.base_url()).get("userdata", in_secs(5)).await;
    assert_eq!(r.expect("204 is fine"), Some(Vec::new()));
    assert_eq!(s.requests("userdata"), 1);
}

#[tokio::test]
async fn other_4xx_is_an_error_without_retry() {
    let s = server("metadata.full-example.yaml", None);
    s.fail_next("metadata", 403, 5);
    let r = client_for(s.base_url()).get("metadata", in_secs(5)).await;
    assert!(
        matches!(r, Err(FetchError::Status { status: 403, .. })),
        "{r:?}"
    );
    assert_eq!(s.requests("metadata"), 1);
}

#[tokio::test]
async fn refused_connections_end_at_the_deadline() {
    let base = format!("http://{}/hetzner/v1/", MetadataServer::refused_addr());
    let started = std::time::Instant::now();
    let r = client_for(base).get("metadata", in_secs(2)).await;
    let took = started.elapsed();
    assert!(
        matches!(r, Err(FetchError::Deadline { attempts, .. }) if attempts >= 3),
        "{r:?}"
    );
    assert!(
        took >= Duration::from_millis(1500),
        "gave up early: {took:?}"
    );
    assert!(
        took < Duration::from_secs(4),
        "overran the deadline: {took:?}"
    );
}

#[tokio::test]
async fn persistent_5xx_ends_at_the_deadline_with_bounded_requests() {
    let s = server("metadata.full-example.yaml", None);
    s.fail_next("metadata", 503, 1000);
    let started = std::time::Instant::now();
    let r = client_for(s.base_url()).get("metadata", in_secs(2)).await;
    let took = started.elapsed();
    assert!(matches!(r, Err(FetchError::Deadline { .. })), "{r:?}");
    assert!(
        took < Duration::from_secs(4),
        "overran the deadline: {took:?}"
    );
    // Backoff 20 ms doubling to 200 ms: about a dozen attempts in 2 s, not hundreds.
    let n = s.requests("metadata");
    assert!((4..=30).contains(&n), "{n} requests");
}

#[tokio::test]
async fn deadline_already_passed_sends_nothing() {
    let s = server("metadata.full-example.yaml", None);
    let r = client_for(s.base_url())
        .get("metadata", Instant::now())
        .await;
    assert!(matches!(r, Err(FetchError::Deadline { .. })), "{r:?}");
    assert_eq!(s.requests("metadata"), 0);
}

#[tokio::test]
async fn slow_answer_is_retried_after_the_request_timeout() {
    let s = server("metadata.full-example.yaml", None);
    s.push_fault("metadata", Fault::Delay(Duration::from_secs(3)));
    let started = std::time::Instant::now();
    let r = client_for(s.base_url()).get("metadata", in_secs(10)).await;
    assert!(matches!(r, Ok(Some(_))), "{r:?}");
    assert_eq!(s.requests("metadata"), 2);
    // One 500 ms timeout plus a short backoff, not the 3 s of the slow answer.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn slow_answer_within_the_timeout_is_accepted() {
    let s = server("metadata.full-example.yaml", None);
    s.push_fault("metadata", Fault::Delay(Duration::from_millis(300)));
    // A generous timeout, so that a loaded CI machine cannot turn this into a retry.
    let c = Client::new(Settings {
        base_url: s.base_url(),
        request_timeout: Duration::from_secs(3),
        ..Settings::default()
    })
    .unwrap();
    let r = c.get("metadata", in_secs(10)).await;
    assert!(matches!(r, Ok(Some(_))), "{r:?}");
    assert_eq!(s.requests("metadata"), 1);
}

#[tokio::test]
async fn oversized_body_with_length_is_refused() {
    let s = server("metadata.full-example.yaml", None);
    s.push_fault(
        "metadata",
        Fault::Oversized {
            bytes: 5 << 20,
            chunked: false,
        },
    );
    let r = client_for(s.base_url()).get("metadata", in_secs(5)).await;
    assert!(matches!(r, Err(FetchError::TooLarge { .. })), "{r:?}");
    assert_eq!(s.requests("metadata"), 1);
}

#[tokio::test]
async fn oversized_chunked_body_is_refused() {
    let s = server("metadata.full-example.yaml", None);
    s.push_fault(
        "metadata",
        Fault::Oversized {
            bytes: 5 << 20,
            chunked: true,
        },
    );
    let r = client_for(s.base_url()).get("metadata", in_secs(5)).await;
    assert!(matches!(r, Err(FetchError::TooLarge { .. })), "{r:?}");
    assert_eq!(s.requests("metadata"), 1);
}

#[tokio::test]
async fn body_at_the_limit_is_accepted() {
    let s = server("metadata.full-example.yaml", None);
    s.set_document("userdata", Some(&[b'u'; 4096]));
    let c = Client::new(Settings {
        base_url: s.base_url(),
        max_body: 4096,
        ..Settings::default()
    })
    .unwrap();
    let r = c.get("userdata", in_secs(5)).await;
    assert_eq!(r.expect("4096 bytes fit").map(|b| b.len()), Some(4096));
    s.set_document("userdata", Some(&[b'u'; 4097]));
    let r = c.get("userdata", in_secs(5)).await;
    assert!(matches!(r, Err(FetchError::TooLarge { .. })), "{r:?}");
}

#[tokio::test]
async fn truncated_body_is_retried() {
    let s = server("metadata.full-example.yaml", None);
    s.push_fault("metadata", Fault::Truncate);
    let body = client_for(s.base_url())
        .get("metadata", in_secs(5))
        .await
        .expect("truncated then good must succeed")
        .expect("present");
    assert_eq!(
        body,
        std::fs::read(fixture("metadata.full-example.yaml")).unwrap()
    );
    assert_eq!(s.requests("metadata"), 2);
}

#[tokio::test]
async fn closed_without_answer_is_retried() {
    let s = server("metadata.full-example.yaml", None);
    s.push_fault("metadata", Fault::Close);
    s.push_fault("metadata", Fault::Close);
    let r = client_for(s.base_url()).get("metadata", in_secs(5)).await;
    assert!(matches!(r, Ok(Some(_))), "{r:?}");
    assert_eq!(s.requests("metadata"), 3);
}

#[tokio::test]
async fn document_changes_are_seen() {
    let s = server("metadata.full-example.yaml", None);
    let c = client_for(s.base_url());
    s.set_document("metadata/private-networks", None);
    assert_eq!(
        c.get("metadata/private-networks", in_secs(5))
            .await
            .unwrap(),
        None
    );
    s.set_document("metadata/private-networks", Some(b"[]\n"));
    assert_eq!(
        c.get("metadata/private-networks", in_secs(5))
            .await
            .unwrap(),
        Some(b"[]\n".to_vec())
    );
}

#[test]
fn bad_base_url_is_rejected() {
    for url in ["not a url", "ftp://127.0.0.1/hetzner/v1/", "file:///etc/"] {
        let r = Client::new(Settings {
            base_url: url.into(),
            ..Settings::default()
        });
        assert!(matches!(r, Err(FetchError::BadUrl(_))), "{url}: {r:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The binary: `hcloud-nixos network` into a temporary directory

struct Run {
    out: Output,
    dir: tempfile::TempDir,
}

impl Run {
    fn net(&self) -> PathBuf {
        self.dir.path().join("network")
    }
    fn keys(&self) -> PathBuf {
        self.dir.path().join("keys")
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = match std::fs::read_dir(self.net()) {
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }
    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.net().join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}; files: {:?}", self.files()))
    }
    fn assert_ok(&self) {
        assert!(
            self.out.status.success(),
            "hcloud-nixos network failed: {:?}\nstderr:\n{}",
            self.out.status,
            self.stderr()
        );
    }
}

fn binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hcloud-nixos"));
    cmd.env_remove("HCLOUD_NIXOS_METADATA_URL")
        .env_remove("RUST_LOG");
    cmd
}

/// Runs `hcloud-nixos network` against `base_url`, writing only below a temporary directory;
/// `prepare` may put files into the network directory first.
fn run_network(base_url: &str, extra: &[&str], prepare: impl FnOnce(&Path)) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let net = dir.path().join("network");
    std::fs::create_dir(&net).unwrap();
    prepare(&net);
    let out = binary()
        .arg("network")
        .args(["--metadata-url", base_url, "--deadline", "10s"])
        .arg("--network-dir")
        .arg(&net)
        .arg("--keys-file")
        .arg(dir.path().join("keys"))
        .args(["--hostname", "never", "--no-reload"])
        .args(extra)
        .output()
        .expect("run hcloud-nixos");
    Run { out, dir }
}

fn assert_public(text: &str, mac: &str, address: &str, gateway: &str) {
    for want in [
        format!("MACAddress={mac}"),
        "DHCP=ipv4".to_string(),
        format!("Address={address}"),
        format!("Gateway={gateway}"),
        "GatewayOnLink=yes".to_string(),
    ] {
        assert!(
            text.lines().any(|l| l.trim() == want),
            "no line '{want}' in:\n{text}"
        );
    }
}

fn assert_private(text: &str, mac: &str) {
    for want in [format!("MACAddress={mac}"), "DHCP=ipv4".to_string()] {
        assert!(
            text.lines().any(|l| l.trim() == want),
            "no line '{want}' in:\n{text}"
        );
    }
}

fn assert_keys(run: &Run, want: &[&str]) {
    let path = run.keys();
    let meta = std::fs::metadata(&path).expect("keys file written");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "keys file mode");
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(lines, want);
}

#[test]
fn network_full_example_with_two_private_networks() {
    let s = server(
        "metadata.full-example.yaml",
        Some("private-networks.two-networks.yaml"),
    );
    let run = run_network(&s.base_url(), &[], |_| {});
    run.assert_ok();
    assert_eq!(
        run.files(),
        [
            "50-hcloud-nixos-private-86000098406d.network",
            "50-hcloud-nixos-private-86000098406e.network",
            "50-hcloud-nixos-public-960003aabbcc.network",
        ]
    );
    let public = run.read("50-hcloud-nixos-public-960003aabbcc.network");
    assert_public(
        &public,
        "96:00:03:aa:bb:cc",
        "2a01:4f8:c012:abcd::1/64",
        "fe80::1",
    );
    assert!(public.contains("2a01:4ff:ff00::add:2"), "DNS:\n{public}");
    assert_private(
        &run.read("50-hcloud-nixos-private-86000098406e.network"),
        "86:00:00:98:40:6e",
    );
    assert_private(
        &run.read("50-hcloud-nixos-private-86000098406d.network"),
        "86:00:00:98:40:6d",
    );
    assert_keys(&run, &[FULL_KEY]);
    assert_eq!(s.requests("metadata"), 1);
    assert_eq!(s.requests("metadata/private-networks"), 1);
}

#[test]
fn network_minimal_with_alias_ips() {
    let s = server(
        "metadata.minimal.yaml",
        Some("private-networks.alias-ips.yaml"),
    );
    let run = run_network(&s.base_url(), &[], |_| {});
    run.assert_ok();
    assert_eq!(
        run.files(),
        [
            "50-hcloud-nixos-private-8600002a7de0.network",
            "50-hcloud-nixos-private-8600002a7de1.network",
            "50-hcloud-nixos-public-000000000000.network",
        ]
    );
    assert_public(
        &run.read("50-hcloud-nixos-public-000000000000.network"),
        "00:00:00:00:00:00",
        "a00:a0:a000:a000::1/64",
        "aa11::1",
    );
    assert_private(
        &run.read("50-hcloud-nixos-private-8600002a7de0.network"),
        "86:00:00:2a:7d:e0",
    );
    assert_keys(
        &run,
        &["ssh-ed25519 AAAAA3AAAA1AAAA1AAA5AAAAAA6AAAAAA3AAAAAAA/A4AAAAAA+AAAAA8A3AAA3AA8AA"],
    );
}

#[test]
fn network_without_static_type_and_without_private_networks() {
    let s = server("metadata.no-static-type.yaml", None);
    let run = run_network(&s.base_url(), &[], |_| {});
    run.assert_ok();
    assert_eq!(run.files(), ["50-hcloud-nixos-public-9600000819da.network"]);
    assert_public(
        &run.read("50-hcloud-nixos-public-9600000819da.network"),
        "96:00:00:08:19:da",
        "2a01:4f8:beef:beef::1/64",
        "fe80::1",
    );
}

#[test]
fn network_real_redacted_document() {
    let s = server("metadata.real-redacted.yaml", None);
    let run = run_network(&s.base_url(), &[], |_| {});
    run.assert_ok();
    assert_eq!(run.files(), ["50-hcloud-nixos-public-96000137bc20.network"]);
    assert_public(
        &run.read("50-hcloud-nixos-public-96000137bc20.network"),
        "96:00:01:37:bc:20",
        "2a01:4f8:c010:bc09::1/64",
        "fe80::1",
    );
    // `<public-key-info>` is not a key: nothing may be authorised from it.
    if let Ok(text) = std::fs::read_to_string(run.keys()) {
        assert!(!text.contains("public-key-info"), "{text}");
    }
}

#[test]
fn network_survives_transient_5xx() {
    let s = server("metadata.full-example.yaml", None);
    s.fail_next("metadata", 503, 2);
    s.push_fault("metadata/private-networks", Fault::Truncate);
    let run = run_network(&s.base_url(), &[], |_| {});
    run.assert_ok();
    assert_eq!(run.files(), ["50-hcloud-nixos-public-960003aabbcc.network"]);
    assert_eq!(s.requests("metadata"), 3);
    assert_eq!(s.requests("metadata/private-networks"), 2);
}

#[test]
fn network_dry_run_writes_nothing() {
    let s = server(
        "metadata.full-example.yaml",
        Some("private-networks.two-networks.yaml"),
    );
    let stale = "50-hcloud-nixos-public-deadbeef0000.network";
    let run = run_network(&s.base_url(), &["--dry-run"], |net| {
        std::fs::write(net.join(stale), "[Match]\n").unwrap();
    });
    run.assert_ok();
    assert_eq!(
        run.files(),
        [stale],
        "dry run changed the network directory"
    );
    assert!(!run.keys().exists(), "dry run wrote the keys file");
    assert!(
        !run.out.stdout.is_empty(),
        "dry run should say what it would do"
    );
}

#[test]
fn network_removes_stale_own_files_only() {
    let s = server("metadata.full-example.yaml", None);
    let run = run_network(&s.base_url(), &[], |net| {
        std::fs::write(
            net.join("50-hcloud-nixos-public-deadbeef0000.network"),
            "[Match]\n",
        )
        .unwrap();
        std::fs::write(
            net.join("50-hcloud-nixos-private-860000000001.network"),
            "[Match]\n",
        )
        .unwrap();
        std::fs::write(net.join("10-foreign.network"), "[Match]\nName=lo\n").unwrap();
    });
    run.assert_ok();
    assert_eq!(
        run.files(),
        [
            "10-foreign.network",
            "50-hcloud-nixos-public-960003aabbcc.network"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(run.net().join("10-foreign.network")).unwrap(),
        "[Match]\nName=lo\n"
    );
}

/// A document that cannot be trusted: non-zero exit, one error line, nothing written.
fn assert_rejected(document: &str, mentions: &str) {
    let s = server("metadata.full-example.yaml", None);
    s.set_document("metadata", Some(document.as_bytes()));
    let run = run_network(&s.base_url(), &[], |net| {
        // An existing file must survive a failed run as well.
        std::fs::write(
            net.join("50-hcloud-nixos-public-960003aabbcc.network"),
            "old\n",
        )
        .unwrap();
    });
    assert!(!run.out.status.success(), "accepted a bad document");
    let stderr = run.stderr();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "want one error line, got:\n{stderr}");
    assert!(
        lines[0].contains(mentions),
        "error does not name '{mentions}': {stderr}"
    );
    assert_eq!(run.files(), ["50-hcloud-nixos-public-960003aabbcc.network"]);
    assert_eq!(
        run.read("50-hcloud-nixos-public-960003aabbcc.network"),
        "old\n"
    );
    assert!(
        !run.keys().exists(),
        "keys written from a rejected document"
    );
}

fn full_example() -> String {
    std::fs::read_to_string(fixture("metadata.full-example.yaml")).unwrap()
}

#[test]
fn network_rejects_version_2() {
    let doc = full_example().replace("  version: 1", "  version: 2");
    assert_rejected(&doc, "version");
}

#[test]
fn network_rejects_a_bad_mac() {
    let doc = full_example().replace("96:00:03:aa:bb:cc", "96:00:03:zz:bb:cc");
    assert_rejected(&doc, "mac_address");
}

#[test]
fn network_rejects_a_bad_address() {
    let doc = full_example().replace("2a01:4f8:c012:abcd::1/64", "2a01:4f8:c012:abcd::1/999");
    assert_rejected(&doc, "address");
}

#[test]
fn network_gives_up_at_the_deadline_when_nothing_listens() {
    let base = format!("http://{}/hetzner/v1/", MetadataServer::refused_addr());
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let out = binary()
        .args(["network", "--metadata-url", &base, "--deadline", "2s"])
        .arg("--network-dir")
        .arg(dir.path())
        .arg("--keys-file")
        .arg(dir.path().join("keys"))
        .args(["--hostname", "never", "--no-reload"])
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(!out.status.success());
    assert!(took < Duration::from_secs(6), "took {took:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn url_from_the_environment_is_used() {
    let s = server("metadata.full-example.yaml", None);
    let dir = tempfile::tempdir().unwrap();
    let out = binary()
        .env("HCLOUD_NIXOS_METADATA_URL", s.base_url())
        .args(["network", "--deadline", "10s"])
        .arg("--network-dir")
        .arg(dir.path())
        .arg("--keys-file")
        .arg(dir.path().join("keys"))
        .args(["--hostname", "never", "--no-reload"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s.requests("metadata"), 1);
    assert!(
        dir.path()
            .join("50-hcloud-nixos-public-960003aabbcc.network")
            .is_file()
    );
}

#[test]
fn metadata_json_prints_the_parsed_document() {
    let s = server(
        "metadata.full-example.yaml",
        Some("private-networks.two-networks.yaml"),
    );
    let out = binary()
        .args(["metadata", "--json", "--metadata-url", &s.base_url()])
        .args(["--deadline", "10s"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let text = v.to_string();
    for want in [
        "my-nixos-server",
        "58123456",
        "96:00:03:aa:bb:cc",
        "alice@laptop",
    ] {
        assert!(text.contains(want), "no '{want}' in {text}");
    }
}

#[test]
fn metadata_userdata_prints_raw_bytes() {
    let s = server("metadata.full-example.yaml", None);
    let ud = std::fs::read(fixture("userdata.cloud-config-example.yaml")).unwrap();
    s.set_document("userdata", Some(&ud));
    let out = binary()
        .args(["metadata", "--userdata", "--metadata-url", &s.base_url()])
        .args(["--deadline", "10s"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, ud);
}

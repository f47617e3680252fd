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
    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
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

/// Runs `hcloud-nixos network` against `base_url`, writing only below a temporary directory
/// (network files, keys, the saved metadata; no SMBIOS data); `prepare` may put files into the
/// network directory first.
fn run_network(base_url: &str, extra: &[&str], prepare: impl FnOnce(&Path)) -> Run {
    run_network_in(tempfile::tempdir().unwrap(), base_url, extra, prepare)
}

/// As [`run_network`], in `dir` (a later boot of the same machine passes the earlier's).
fn run_network_in(
    dir: tempfile::TempDir,
    base_url: &str,
    extra: &[&str],
    prepare: impl FnOnce(&Path),
) -> Run {
    let net = dir.path().join("network");
    if net.exists() {
        std::fs::remove_dir_all(&net).unwrap();
    }
    std::fs::create_dir(&net).unwrap();
    let _ = std::fs::remove_file(dir.path().join("keys"));
    prepare(&net);
    // A generous deadline unless the test gives its own.
    let deadline: &[&str] = if extra.contains(&"--deadline") {
        &[]
    } else {
        &["--deadline", "10s"]
    };
    let out = binary()
        .arg("network")
        .args(["--metadata-url", base_url])
        .args(deadline)
        .arg("--network-dir")
        .arg(&net)
        .arg("--keys-file")
        .arg(dir.path().join("keys"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--dmi-dir")
        .arg(dir.path().join("dmi"))
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
fn network_rejects_a_document_that_is_not_yaml() {
    assert_rejected("hostname: [unclosed\n", "not valid YAML");
    assert_rejected("- a list\n", "not a mapping");
}

/// Another version of network-config costs the network files (left as they are), not the keys.
#[test]
fn network_version_2_leaves_the_files_alone_and_still_sets_the_keys() {
    let doc = full_example().replace("  version: 1", "  version: 2");
    let s = server("metadata.full-example.yaml", None);
    s.set_document("metadata", Some(doc.as_bytes()));
    let run = run_network(&s.base_url(), &[], |net| {
        std::fs::write(
            net.join("50-hcloud-nixos-public-960003aabbcc.network"),
            "old\n",
        )
        .unwrap();
    });
    run.assert_ok();
    assert_eq!(
        run.read("50-hcloud-nixos-public-960003aabbcc.network"),
        "old\n"
    );
    assert_keys(&run, &[FULL_KEY]);
    assert_warned(&run, "network-config.version");
}

/// A bad MAC or address costs its NIC: no file for it (our old one is stale), the rest done.
#[test]
fn network_a_bad_mac_or_address_costs_its_nic() {
    for (doc, field) in [
        (
            full_example().replace("96:00:03:aa:bb:cc", "96:00:03:zz:bb:cc"),
            "network-config.config[0].mac_address",
        ),
        (
            full_example().replace("2a01:4f8:c012:abcd::1/64", "2a01:4f8:c012:abcd::1/999"),
            "network-config.config[0].subnets[1].address",
        ),
    ] {
        let s = server("metadata.full-example.yaml", None);
        s.set_document("metadata", Some(doc.as_bytes()));
        let run = run_network(&s.base_url(), &[], |net| {
            std::fs::write(
                net.join("50-hcloud-nixos-public-960003aabbcc.network"),
                "old\n",
            )
            .unwrap();
        });
        run.assert_ok();
        assert_eq!(run.files(), Vec::<String>::new());
        assert_keys(&run, &[FULL_KEY]);
        assert_warned(&run, field);
    }
}

/// Both programs that run the boot step: `hcloud-nixos network` and `hcloud-nixos-network`.
fn boot_programs() -> [(Command, &'static str); 2] {
    let mut network = Command::new(env!("CARGO_BIN_EXE_hcloud-nixos-network"));
    network
        .env_remove("HCLOUD_NIXOS_METADATA_URL")
        .env_remove("RUST_LOG");
    let mut whole = binary();
    whole.arg("network");
    [
        (whole, "hcloud-nixos network"),
        (network, "hcloud-nixos-network"),
    ]
}

/// The boot step `program` writing only below `dir` (network files, keys) and `state` (the saved
/// metadata), leaving the hostname and networkd alone.
fn writing_below<'a>(program: &'a mut Command, dir: &Path, state: &Path) -> &'a mut Command {
    program
        .arg("--network-dir")
        .arg(dir)
        .arg("--keys-file")
        .arg(dir.join("keys"))
        .arg("--state-dir")
        .arg(state)
        .args(["--hostname", "never", "--no-reload"])
}

#[test]
fn network_gives_up_at_the_deadline_when_nothing_listens() {
    let base = format!("http://{}/hetzner/v1/", MetadataServer::refused_addr());
    for (mut program, name) in boot_programs() {
        let dir = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let started = std::time::Instant::now();
        let out = writing_below(&mut program, dir.path(), state.path())
            .args(["--metadata-url", &base, "--deadline", "2s"])
            .output()
            .unwrap();
        let took = started.elapsed();
        assert!(!out.status.success(), "{name}");
        assert!(took < Duration::from_secs(6), "{name} took {took:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{name}: {stderr}");
        assert!(
            lines[0].starts_with("error: the metadata service at "),
            "{name}: {stderr}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "{name}");
    }
}

#[test]
fn url_from_the_environment_is_used() {
    let s = server("metadata.full-example.yaml", None);
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut program = binary();
    program.arg("network");
    let out = writing_below(&mut program, dir.path(), state.path())
        .env("HCLOUD_NIXOS_METADATA_URL", s.base_url())
        .args(["--deadline", "10s"])
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

// ---------------------------------------------------------------------------------------------
// Hostile and odd documents: one bad part costs that part only

/// Warning lines of a run (the log's `WARN` lines), for asserting which field was named.
fn warnings(run: &Run) -> Vec<String> {
    run.stderr()
        .lines()
        .filter(|l| l.contains("WARN"))
        .map(str::to_string)
        .collect()
}

fn assert_warned(run: &Run, field: &str) {
    let w = warnings(run);
    assert!(
        w.iter().any(|l| l.contains(field)),
        "no warning naming '{field}':\n{}",
        run.stderr()
    );
    for line in run.stderr().lines() {
        assert!(
            !line.starts_with("[Network]") && !line.starts_with("DNS=") && !line.contains('\u{1b}'),
            "metadata text reached the log unescaped: {line}"
        );
    }
}

const GOOD_NIC: &str = "  - type: physical\n    mac_address: 96:00:03:aa:bb:cc\n    name: eth0\n    subnets:\n    - {type: dhcp, ipv4: true}\n    - {type: static, address: '2a01:4f8:c012:abcd::1/64', gateway: 'fe80::1'}\n";

fn document(nics: &str, extra: &str) -> String {
    format!(
        "hostname: my-nixos-server\ninstance-id: 58123456\npublic-keys:\n- {FULL_KEY}\n{extra}network-config:\n  version: 1\n  config:\n{nics}"
    )
}

fn run_document(doc: &str, private: Option<&str>) -> Run {
    let s = server("metadata.full-example.yaml", None);
    s.set_document("metadata", Some(doc.as_bytes()));
    if let Some(p) = private {
        s.set_document("metadata/private-networks", Some(p.as_bytes()));
    }
    run_network(&s.base_url(), &[], |_| {})
}

/// A MAC of non-ASCII characters panicked the parser (byte slicing), so that nothing was
/// written at all: no keys, no other NIC.
#[test]
fn network_a_non_ascii_mac_costs_only_its_nic() {
    let bad = "  - type: physical\n    mac_address: \"96€€€a\"\n    name: eth1\n    subnets: [{type: dhcp}]\n";
    let run = run_document(&document(&format!("{bad}{GOOD_NIC}"), ""), None);
    run.assert_ok();
    assert_eq!(run.files(), ["50-hcloud-nixos-public-960003aabbcc.network"]);
    assert_public(
        &run.read("50-hcloud-nixos-public-960003aabbcc.network"),
        "96:00:03:aa:bb:cc",
        "2a01:4f8:c012:abcd::1/64",
        "fe80::1",
    );
    assert_keys(&run, &[FULL_KEY]);
    assert_warned(&run, "network-config.config[0].mac_address");
}

/// The older layout with the IPv6 subnet on an alias entry `eth0:0` (no MAC of its own): the
/// alias's subnets belong to eth0.
#[test]
fn network_alias_entry_gives_its_nic_the_ipv6() {
    let s = server("metadata.alias-ipv6.yaml", None);
    let run = run_network(&s.base_url(), &[], |_| {});
    run.assert_ok();
    assert_eq!(run.files(), ["50-hcloud-nixos-public-9600004e1f2a.network"]);
    let text = run.read("50-hcloud-nixos-public-9600004e1f2a.network");
    assert_public(
        &text,
        "96:00:00:4e:1f:2a",
        "2a01:4f8:c17:1a2b::1/64",
        "fe80::1",
    );
    assert!(text.contains("DNS=213.133.100.100"), "{text}");
}

/// Line breaks in a NIC's name, a search domain or a private network's name added lines and
/// sections to networkd's files. Each is checked where it enters; what is dropped is named.
#[test]
fn network_text_from_the_metadata_cannot_add_lines() {
    let inject = "\\n[Network]\\nDNS=192.0.2.66";
    let named = format!(
        "  - type: physical\n    mac_address: 96:00:03:aa:bb:cc\n    name: \"eth0{inject}\"\n    subnets:\n    - {{type: dhcp, ipv4: true}}\n    - {{type: static, address: '2a01:4f8:c012:abcd::1/64', gateway: 'fe80::1'}}\n"
    );
    let searched = format!(
        "  - type: physical\n    mac_address: 96:00:03:aa:bb:dd\n    subnets:\n    - type: dhcp\n      dns_search: [\"example.com{inject}\"]\n"
    );
    let private = format!(
        "- mac_address: 86:00:00:98:40:6e\n  ip: 10.0.0.2\n  network_name: \"foo{inject}\"\n"
    );
    let run = run_document(
        &document(&format!("{named}{searched}"), "region: \"eu\\u001b[31m\"\n"),
        Some(&private),
    );
    run.assert_ok();
    for name in run.files() {
        let text = run.read(&name);
        assert!(
            !text.lines().any(|l| l.trim() == "DNS=192.0.2.66"),
            "{name}:\n{text}"
        );
        assert_eq!(text.matches("[Network]").count(), 1, "{name}:\n{text}");
    }
    assert!(
        run.files()
            .contains(&"50-hcloud-nixos-public-960003aabbcc.network".to_string())
    );
    assert_warned(&run, "network-config.config[0].name");
    assert_warned(&run, "network-config.config[1].subnets[0].dns_search");
    assert_warned(&run, "[0].network_name");
    assert_keys(&run, &[FULL_KEY]);
}

/// A hostname the metadata gives wrongly costs the hostname, not the network or the keys.
#[test]
fn network_a_bad_hostname_costs_only_the_hostname() {
    let doc =
        document(GOOD_NIC, "").replace("hostname: my-nixos-server", "hostname: \"evil\\nhost\"");
    let run = run_document(&doc, None);
    run.assert_ok();
    assert_eq!(run.files(), ["50-hcloud-nixos-public-960003aabbcc.network"]);
    assert_keys(&run, &[FULL_KEY]);
    assert_warned(&run, "hostname");
}

/// Keys as they arrive from the Hetzner console and API: with a trailing newline, CRLF,
/// surrounding blanks.
#[test]
fn network_keys_with_trailing_newlines_are_taken() {
    let second =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHx3Jd0w8uQy1mZ0c2YXB9gU4k2pV7nR5tL6eS8aQ1bC bob@desk";
    let third = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 carol";
    let doc = format!(
        "hostname: h\npublic-keys:\n- \"{FULL_KEY}\\n\"\n- \"{second}\\r\\n\"\n- \"  {third}\\n\\n\"\nnetwork-config:\n  version: 1\n  config:\n{GOOD_NIC}"
    );
    let run = run_document(&doc, None);
    run.assert_ok();
    assert_keys(&run, &[FULL_KEY, second, third]);
}

// ---------------------------------------------------------------------------------------------
// The last good metadata: saved, and used only for this server when the service is silent

fn refused_url() -> String {
    format!("http://{}/hetzner/v1/", MetadataServer::refused_addr())
}

fn error_lines(run: &Run) -> Vec<String> {
    run.stderr()
        .lines()
        .filter(|l| l.starts_with("error"))
        .map(str::to_string)
        .collect()
}

#[test]
fn network_saves_the_metadata_root_only_and_not_in_a_dry_run() {
    use std::os::unix::fs::MetadataExt;
    let s = server(
        "metadata.full-example.yaml",
        Some("private-networks.two-networks.yaml"),
    );
    let run = run_network(&s.base_url(), &["--dry-run"], |_| {});
    run.assert_ok();
    assert!(!run.state().exists(), "a dry run saved the metadata");
    let run = run_network(&s.base_url(), &[], |_| {});
    run.assert_ok();
    let file = run.state().join("metadata.json");
    assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(run.state()).unwrap().mode() & 0o777,
        0o700
    );
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(saved["metadata"], full_example());
    assert_eq!(
        saved["private_networks"],
        std::fs::read_to_string(fixture("private-networks.two-networks.yaml")).unwrap()
    );
    assert_eq!(
        std::fs::read_dir(run.state()).unwrap().count(),
        1,
        "temporary files left"
    );
}

#[test]
fn network_without_the_service_and_nothing_saved_fails_in_one_line() {
    let run = run_network(&refused_url(), &["--deadline", "1s"], |_| {});
    assert!(!run.out.status.success());
    let errors = error_lines(&run);
    assert_eq!(errors.len(), 1, "{}", run.stderr());
    assert!(errors[0].contains("no metadata was saved"), "{}", errors[0]);
    assert!(run.files().is_empty() && !run.keys().exists());
}

/// The saved metadata names a NIC that this machine does not have (the MACs of the machine the
/// tests run on are not the fixture's): refused, nothing written, one line that says why.
#[test]
fn network_never_takes_the_saved_metadata_of_another_server() {
    let s = server("metadata.full-example.yaml", None);
    let first = run_network(&s.base_url(), &[], |_| {});
    first.assert_ok();
    let run = run_network_in(first.dir, &refused_url(), &["--deadline", "1s"], |_| {});
    assert!(!run.out.status.success(), "{}", run.stderr());
    let errors = error_lines(&run);
    assert_eq!(errors.len(), 1, "{}", run.stderr());
    assert!(
        errors[0].contains("is not this server's")
            && errors[0].contains("96:00:03:aa:bb:cc is not on this machine"),
        "{}",
        errors[0]
    );
    assert!(run.files().is_empty(), "files written: {:?}", run.files());
    assert!(!run.keys().exists(), "another server's keys written");
}

/// A server without a public network, whose saved metadata is tied to it by the SMBIOS serial
/// (Hetzner's servers carry their id there): configured from it, and it says so. Its private
/// networks' NICs are not on the machine the tests run on: those are skipped, named.
#[test]
fn network_falls_back_to_the_saved_metadata_tied_by_the_smbios_serial() {
    let doc = document("", "").replace(
        "network-config:\n  version: 1\n  config:\n",
        "network-config:\n  version: 1\n  config: []\n",
    );
    let s = server(
        "metadata.full-example.yaml",
        Some("private-networks.two-networks.yaml"),
    );
    s.set_document("metadata", Some(doc.as_bytes()));
    let first = run_network(&s.base_url(), &[], |_| {});
    first.assert_ok();
    let dmi = first.dir.path().join("dmi");
    std::fs::create_dir(&dmi).unwrap();
    std::fs::write(dmi.join("sys_vendor"), "Hetzner\n").unwrap();
    std::fs::write(dmi.join("product_serial"), "58123456\n").unwrap();
    let run = run_network_in(first.dir, &refused_url(), &["--deadline", "1s"], |_| {});
    run.assert_ok();
    assert_keys(&run, &[FULL_KEY]);
    assert!(run.files().is_empty(), "{:?}", run.files());
    assert!(
        warnings(&run)
            .iter()
            .any(|l| l.contains("cannot be reached") && l.contains("saved at")),
        "{}",
        run.stderr()
    );
    assert_warned(&run, "86:00:00:98:40:6e is not on this machine");
    // Another serial: refused.
    std::fs::write(run.dir.path().join("dmi/product_serial"), "4711\n").unwrap();
    let run = run_network_in(run.dir, &refused_url(), &["--deadline", "1s"], |_| {});
    assert!(!run.out.status.success());
    assert!(
        error_lines(&run)[0].contains("server 58123456's"),
        "{}",
        run.stderr()
    );
}

/// private-networks does not come before the deadline: this server's saved one is used.
#[test]
fn network_takes_the_saved_private_networks_when_only_they_are_missing() {
    let s = server(
        "metadata.full-example.yaml",
        Some("private-networks.two-networks.yaml"),
    );
    let first = run_network(&s.base_url(), &[], |_| {});
    first.assert_ok();
    assert_eq!(first.files().len(), 3);
    s.fail_next("metadata/private-networks", 503, 10_000);
    let run = run_network_in(first.dir, &s.base_url(), &["--deadline", "2s"], |_| {});
    run.assert_ok();
    assert_eq!(run.files().len(), 3, "{}", run.stderr());
    assert!(
        warnings(&run)
            .iter()
            .any(|l| l.contains("using the one saved")),
        "{}",
        run.stderr()
    );
}

//! Deciding and carrying out what `network` does, in a temporary directory.

use super::*;
use crate::boot::metadata::parse_metadata;

fn fetched(text: &str) -> Fetched {
    let parsed = parse_metadata(text).unwrap();
    Fetched {
        metadata: parsed.value,
        private_networks: Vec::new(),
        problems: parsed.problems,
        origin: Origin::Service,
        host_key: None,
    }
}

const ONE_NIC: &str = "hostname: web-1\npublic-keys: ['ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBjYTHGY k']\nnetwork-config:\n  version: 1\n  config:\n  - type: physical\n    mac_address: 96:00:00:00:00:01\n    subnets: [{type: dhcp}]\n";

fn opts(dir: &Path) -> Options {
    Options {
        network_dir: dir.join("network"),
        reload: false,
        hostname: Policy::Auto,
        hostname_file: dir.join("hostname"),
        keys_file: dir.join("keys/root"),
        host_key_dir: dir.join("ssh"),
        dry_run: false,
        state_dir: dir.join("state"),
        dmi_dir: dir.join("dmi"),
    }
}

#[test]
fn stale_files_are_only_our_own() {
    let existing = vec![
        "50-hcloud-nixos-public-960000000001.network".to_string(),
        "50-hcloud-nixos-public-9600000000ff.network".to_string(),
        "50-hcloud-nixos-private-8600000000ff.network".to_string(),
        "10-user.network".to_string(),
        "99-ethernet-default-dhcp.network".to_string(),
    ];
    let p = plan(&fetched(ONE_NIC), &existing, Policy::Auto, false);
    assert_eq!(p.files.as_ref().unwrap().len(), 1);
    assert_eq!(
        p.stale,
        vec![
            "50-hcloud-nixos-public-9600000000ff.network".to_string(),
            "50-hcloud-nixos-private-8600000000ff.network".to_string()
        ]
    );
    assert_eq!(p.hostname.as_deref(), Some("web-1"));
    assert_eq!(p.keys.len(), 1);
}

#[test]
fn without_network_config_nothing_is_written_or_removed() {
    let existing = vec!["50-hcloud-nixos-public-960000000001.network".to_string()];
    let p = plan(&fetched("hostname: a\n"), &existing, Policy::Never, false);
    assert_eq!(p.files, None);
    assert!(p.stale.is_empty());
    assert_eq!(p.hostname, None);
}

#[test]
fn no_public_network_removes_our_old_files() {
    let existing = vec!["50-hcloud-nixos-public-960000000001.network".to_string()];
    let p = plan(
        &fetched("network-config:\n  version: 1\n  config: []\n"),
        &existing,
        Policy::Auto,
        true,
    );
    assert_eq!(p.files, Some(vec![]));
    assert_eq!(p.stale, existing);
}

#[tokio::test]
async fn apply_writes_files_and_keys_and_keeps_foreign_files() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let o = Options {
        hostname: Policy::Never,
        ..opts(tmp.path())
    };
    std::fs::create_dir_all(&o.network_dir).unwrap();
    std::fs::write(o.network_dir.join("10-user.network"), "[Match]\n").unwrap();
    std::fs::write(
        o.network_dir
            .join("50-hcloud-nixos-public-9600000000ff.network"),
        "old",
    )
    .unwrap();
    let existing = list_dir(&o.network_dir).unwrap();
    let p = plan(&fetched(ONE_NIC), &existing, o.hostname, false);
    apply(&p, &o).await.unwrap();
    let mut names = list_dir(&o.network_dir).unwrap();
    names.sort();
    assert_eq!(
        names,
        vec![
            "10-user.network",
            "50-hcloud-nixos-public-960000000001.network"
        ]
    );
    let file = o
        .network_dir
        .join("50-hcloud-nixos-public-960000000001.network");
    assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o777, 0o644);
    let keys = std::fs::read_to_string(&o.keys_file).unwrap();
    assert!(
        keys.lines()
            .any(|l| l == "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBjYTHGY k")
    );
    assert_eq!(
        std::fs::metadata(&o.keys_file).unwrap().mode() & 0o777,
        0o600
    );
    // A second run changes nothing.
    assert_eq!(
        sync_network_dir(&o.network_dir, p.files.as_ref().unwrap(), &[]).unwrap(),
        0
    );
}

#[test]
fn dry_run_description_says_everything_and_touches_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Options {
        reload: true,
        ..opts(tmp.path())
    };
    let p = plan(
        &fetched(ONE_NIC),
        &["50-hcloud-nixos-public-9600000000ff.network".into()],
        o.hostname,
        false,
    );
    let text = describe(&p, &o, false);
    assert!(text.contains("would write "));
    assert!(text.contains("MACAddress=96:00:00:00:00:01"));
    assert!(text.contains("would remove "));
    assert!(text.contains("reload"));
    assert!(text.contains("'web-1'"));
    assert!(text.contains("1 SSH key(s)"));
    assert!(!o.network_dir.exists());
}

#[test]
fn metadata_summary_for_people() {
    let text = describe_metadata(&fetched(ONE_NIC));
    assert!(text.contains("hostname:          web-1\n"));
    assert!(text.contains("public NIC:        96:00:00:00:00:01 DHCPv4"));
}

#[test]
fn zero_deadline_is_refused() {
    assert!(check_deadline(Duration::ZERO).is_err());
    assert!(check_deadline(Duration::from_secs(1)).is_ok());
    // Beyond a day: refused with one line, never added to the clock (it panicked there).
    let huge = humantime::parse_duration("300000000000y").unwrap();
    let e = check_deadline(huge).unwrap_err().to_string();
    assert!(
        e.starts_with("--deadline '300000000000years' is out of range"),
        "{e}"
    );
}

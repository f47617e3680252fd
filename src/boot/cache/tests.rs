//! Saving and loading the last good metadata, and deciding whether it is this machine's.

use std::os::unix::fs::MetadataExt;

use proptest::prelude::*;

use super::*;
use crate::boot::metadata::{parse_metadata, parse_private_networks};

fn full_example() -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/hetzner-metadata/metadata.full-example.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

const PRIVATE: &str = "- mac_address: 86:00:00:98:40:6e\n  ip: 10.0.0.2\n- mac_address: 86:00:00:98:40:6d\n  ip: 10.128.0.2\n";

fn mac(s: &str) -> MacAddr {
    s.parse().unwrap()
}

fn machine(macs: &[&str], serial: Option<&str>) -> Machine {
    Machine {
        macs: macs.iter().map(|m| mac(m)).collect(),
        serial: serial.map(str::to_string),
    }
}

/// `check_owner` on the full example (instance 58123456, public NIC 96:00:03:aa:bb:cc) and
/// the private networks above; the private NICs left.
fn owner(m: &Machine) -> Result<Vec<String>, String> {
    let metadata = parse_metadata(&full_example()).unwrap().value;
    let mut private = parse_private_networks(PRIVATE).unwrap().value;
    check_owner(&metadata, &mut private, m)
        .map(|_| private.iter().map(|p| p.mac.to_string()).collect())
}

#[test]
fn saved_metadata_round_trips_root_only() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    assert_eq!(load(&state).unwrap(), None);
    let saved = Saved::new(full_example(), Some(PRIVATE.into()));
    save(&state, &saved).unwrap();
    assert_eq!(load(&state).unwrap(), Some(saved.clone()));
    let file = std::fs::metadata(path(&state)).unwrap();
    assert_eq!(file.mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(&state).unwrap().mode() & 0o777, 0o700);
    // Saved again: replaced whole, nothing left beside it.
    save(&state, &Saved::new("hostname: b\n".into(), None)).unwrap();
    assert_eq!(load(&state).unwrap().unwrap().metadata, "hostname: b\n");
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 1);
    assert!(saved.when().ends_with('Z'), "{}", saved.when());
}

#[test]
fn a_damaged_file_is_an_error_that_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(path(dir.path()), b"{\"format\": 1, \"saved_at\": ").unwrap();
    let e = load(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("is not saved metadata") && e.ends_with("remove it"),
        "{e}"
    );
    assert!(!e.contains('\n'));
    let other =
        serde_json::json!({"format": 2, "saved_at": 1, "metadata": "", "private_networks": null});
    std::fs::write(path(dir.path()), other.to_string()).unwrap();
    assert!(
        load(dir.path())
            .unwrap_err()
            .to_string()
            .contains("format 2")
    );
    let huge = Saved {
        saved_at: u64::MAX,
        ..Saved::new(String::new(), None)
    };
    assert_eq!(huge.when(), "an unknown time");
}

#[test]
fn this_machine_by_its_macs() {
    // All NICs here.
    let both = owner(&machine(
        &[
            "96:00:03:aa:bb:cc",
            "86:00:00:98:40:6e",
            "86:00:00:98:40:6d",
        ],
        None,
    ));
    assert_eq!(both.unwrap().len(), 2);
    // A private network detached since: its NIC is dropped, the rest stays.
    let one = owner(&machine(&["96:00:03:aa:bb:cc", "86:00:00:98:40:6d"], None));
    assert_eq!(one.unwrap(), ["86:00:00:98:40:6d"]);
}

#[test]
fn another_servers_metadata_is_refused() {
    // Other MACs: an image made from a snapshot of another server.
    let e = owner(&machine(&["96:00:03:11:22:33"], None)).unwrap_err();
    assert!(
        e.contains("96:00:03:aa:bb:cc is not on this machine"),
        "{e}"
    );
    // The same MACs cannot make up for another SMBIOS serial.
    let e = owner(&machine(&["96:00:03:aa:bb:cc"], Some("4711"))).unwrap_err();
    assert!(
        e.contains("server 58123456's") && e.contains("'4711'"),
        "{e}"
    );
    assert!(owner(&machine(&["96:00:03:aa:bb:cc"], Some("58123456"))).is_ok());
    // Nothing at all ties it: no NIC of it here, no serial.
    let metadata = parse_metadata("instance-id: 5\nnetwork-config:\n  config: []\n")
        .unwrap()
        .value;
    let e = check_owner(
        &metadata,
        &mut vec![],
        &machine(&["96:00:00:00:00:09"], None),
    );
    assert!(e.unwrap_err().contains("nothing ties it"));
    // A serial alone does.
    assert!(check_owner(&metadata, &mut vec![], &machine(&[], Some("5"))).is_ok());
    // An all-zero MAC (a placeholder, loopback's) ties nothing.
    let zero = parse_metadata("network-config:\n  config:\n  - mac_address: 00:00:00:00:00:00\n")
        .unwrap()
        .value;
    assert!(check_owner(&zero, &mut vec![], &machine(&["00:00:00:00:00:00"], None)).is_err());
}

#[test]
fn the_serial_counts_only_on_hetzner() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(hetzner_serial(dir.path()), None);
    std::fs::write(dir.path().join("sys_vendor"), "QEMU\n").unwrap();
    std::fs::write(dir.path().join("product_serial"), "58123456\n").unwrap();
    assert_eq!(hetzner_serial(dir.path()), None);
    std::fs::write(dir.path().join("sys_vendor"), "Hetzner\n").unwrap();
    assert_eq!(hetzner_serial(dir.path()).as_deref(), Some("58123456"));
    std::fs::write(dir.path().join("product_serial"), "\n").unwrap();
    assert_eq!(hetzner_serial(dir.path()), None);
}

proptest! {
    /// The saved file under fire: arbitrary bytes and a valid file mutated. A value or a
    /// one-line reason, never a panic.
    #[test]
    fn saved_file_under_fire(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..512),
            (any::<usize>(), any::<u8>()).prop_map(|(at, b)| {
                let mut v = serde_json::to_vec(&Saved::new("hostname: a\n".into(), None)).unwrap();
                let i = at % v.len();
                v[i] = b;
                v
            }),
        ]
    ) {
        match parse(&bytes) {
            Ok(saved) => prop_assert_eq!(saved.format, 1),
            Err(why) => prop_assert!(!why.chars().any(char::is_control), "{}", why),
        }
    }
}

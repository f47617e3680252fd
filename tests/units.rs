//! The unit files the NixOS module installs: they verify under systemd, and the metadata
//! firewall keeps everyone but root away from 169.254.169.254 (in network namespaces).

#[path = "support/netns.rs"]
mod netns;
#[path = "support/units.rs"]
mod units;

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use netns::{Netns, can_run, output_within, unique};

/// Does the line hold an `@name@` placeholder? (`@system-service`, a syscall set, is none.)
fn has_placeholder(line: &str) -> bool {
    let parts: Vec<&str> = line.split('@').collect();
    parts.len() >= 3
        && parts[1..parts.len() - 1]
            .iter()
            .any(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric()))
}

#[test]
fn every_placeholder_is_known_and_replaced() {
    assert!(has_placeholder("ExecStart=@hcloudNixos@/bin/x"));
    assert!(!has_placeholder("SystemCallFilter=@system-service"));
    let dir = tempfile::tempdir().unwrap();
    let package = units::package_dir(dir.path());
    let files = units::render_into(&dir.path().join("units"), &package);
    assert_eq!(files.len(), 3, "{files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let unreplaced: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && has_placeholder(l))
            .collect();
        assert!(unreplaced.is_empty(), "{}: {unreplaced:?}", file.display());
    }
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if !can_run(
        "units_pass_systemd_analyze_verify",
        &["systemd-analyze", "/usr/sbin/nft"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let package = units::package_dir(dir.path());
    let files = units::render_into(&dir.path().join("units"), &package);
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&files)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    // Warnings about our own units (unknown keys, bad values) fail the test too.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("hcloud-nixos"))
        .collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze complained:\n{}",
        ours.join("\n")
    );
}

/// Connects to 169.254.169.254:80 from the client namespace as `uid` (0 or another).
fn connect_as(client: &Netns, uid: u32) -> bool {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &client.name]);
    if uid != 0 {
        let uid = uid.to_string();
        cmd.args([
            "setpriv",
            "--reuid",
            &uid,
            "--regid",
            &uid,
            "--clear-groups",
        ]);
    }
    cmd.args([
        "timeout",
        "5",
        "bash",
        "-c",
        "exec 3<>/dev/tcp/169.254.169.254/80",
    ]);
    output_within(&mut cmd, Duration::from_secs(10))
        .status
        .success()
}

#[test]
fn metadata_firewall_lets_only_root_through() {
    if !can_run(
        "metadata_firewall_lets_only_root_through",
        &["ip", "/usr/sbin/nft", "setpriv", "timeout", "bash"],
    ) {
        return;
    }
    let id = unique();
    let server = Netns::new(format!("hfs-{id}"));
    let client = Netns::new(format!("hfc-{id}"));
    netns::ip(&[
        "link",
        "add",
        "fwa",
        "netns",
        &server.name,
        "type",
        "veth",
        "peer",
        "name",
        "fwb",
        "netns",
        &client.name,
    ]);
    server.ip(&["addr", "add", "169.254.169.254/16", "dev", "fwa"]);
    server.ip(&["link", "set", "fwa", "up"]);
    client.ip(&["addr", "add", "169.254.0.2/16", "dev", "fwb"]);
    client.ip(&["link", "set", "fwb", "up"]);

    // A listener in the server namespace: this thread joins it, binds, and serves for a while.
    let ns_file = std::fs::File::open(format!("/run/netns/{}", server.name)).unwrap();
    let listener = std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            TcpListener::bind("169.254.169.254:80").unwrap()
        })
        .join()
        .unwrap()
    });
    listener.set_nonblocking(true).unwrap();
    let serving = std::thread::spawn(move || {
        let end = Instant::now() + Duration::from_secs(60);
        let mut accepted = 0;
        while Instant::now() < end && accepted < 3 {
            match listener.accept() {
                Ok(_) => accepted += 1,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        accepted
    });

    assert!(
        connect_as(&client, 65534),
        "without the rule everyone gets through"
    );
    let rules = units::firewall_rules();
    let load = |what: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", &client.name, "nft", "-f"])
            .arg(&rules)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    load("loading the rules");
    load("loading them again (a restart of the unit)");
    assert!(
        !connect_as(&client, 65534),
        "a non-root process reached the metadata service"
    );
    assert!(connect_as(&client, 0), "root was refused");
    let listing = Command::new("ip")
        .args([
            "netns",
            "exec",
            &client.name,
            "nft",
            "list",
            "table",
            "inet",
            "hcloud_nixos_metadata",
        ])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.contains("counter packets "), "{listing}");
    assert!(
        !listing.contains("counter packets 0 "),
        "the rule rejected nothing:\n{listing}"
    );
    // The unit's ExecStop removes the table, and with it the rule.
    let stop = Command::new("ip")
        .args([
            "netns",
            "exec",
            &client.name,
            "nft",
            "delete",
            "table",
            "inet",
            "hcloud_nixos_metadata",
        ])
        .status()
        .unwrap();
    assert!(stop.success());
    assert!(connect_as(&client, 65534), "the rule outlived its table");
    assert_eq!(
        serving.join().unwrap(),
        3,
        "the server saw exactly the three allowed connections"
    );
}

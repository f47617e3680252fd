//! The network unit under a real systemd across three boots of one server: the metadata service
//! answers (the metadata is saved in the unit's StateDirectory); the service is down (IPv6 from
//! the saved metadata, and the unit's status line says so); the same disk in a server with
//! another MAC (nothing taken, the unit fails and says why).
//!
//! The server is the host's own Debian booted with `systemd-nspawn --volatile=yes`, as in the
//! system test (tests/system.rs), with only the network unit (rendered from nixos-module/units/,
//! with NixOS's overrides.conf) and systemd-networkd enabled. Its root is a tmpfs, so what a disk
//! keeps between boots is modelled by a test-only unit that puts the saved file back into
//! /var/lib/hcloud-nixos before the network unit starts.
//!
//! Run: `cargo test --test network_unit -- --nocapture` (as root; needs systemd-container).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::container::netns::{self, poll};
use harness::container::{self, Container, ContainerNet, NspawnSettings, Spec};
use harness::metadata::{Documents, MetadataServer};
use harness::units;

const MAC: &str = "96:00:03:aa:bb:cc";
const OTHER_MAC: &str = "96:00:03:11:22:33";
const IPV6: &str = "2a01:4f8:c012:abcd::1/64";
const GUEST_IPV4: &str = "169.254.10.2/16";
const NETWORK: &str = "hcloud-nixos-network.service";
const DISK: &str = "system-test-disk.service";
const TOOLS: &[&str] = &[
    "systemd-nspawn",
    "nsenter",
    "ip",
    "sh",
    "/lib/systemd/systemd-networkd",
];

/// `/etc/systemd/system`: the network unit with NixOS's drop-in, networkd, and the test-only
/// unit that puts back what the disk kept (`<root>/disk/metadata.json`, when there is one).
fn prepare_units(root: &Path, package: &Path) -> PathBuf {
    let dir = root.join("etc-systemd-system");
    units::render_into(&dir, package);
    let dropins = dir.join(format!("{NETWORK}.d"));
    std::fs::create_dir_all(&dropins).unwrap();
    std::fs::write(
        dropins.join("overrides.conf"),
        units::nixos_overrides_conf(&units::nixos_default_path(root), &[]),
    )
    .unwrap();
    // Test only: a boot without the service waits 5 s, not the default 2 minutes, before it
    // falls back (the container's boot is given a minute).
    std::fs::write(
        dropins.join("90-test-deadline.conf"),
        format!(
            "[Service]\nExecStart=\nExecStart={}/bin/hcloud-nixos-network --deadline 5s\n",
            package.display()
        ),
    )
    .unwrap();
    let disk = root.join("disk");
    std::fs::write(
        dir.join(DISK),
        format!(
            "# Test only: what the server's disk kept in /var/lib/hcloud-nixos across the boots.\n\
             [Unit]\nDefaultDependencies=no\nAfter=local-fs.target\nBefore={NETWORK}\n\
             ConditionPathExists={d}/metadata.json\n\
             [Service]\nType=oneshot\n\
             ExecStart=/bin/sh -c 'install -d -m 0700 /var/lib/hcloud-nixos && install -m 0600 {d}/metadata.json /var/lib/hcloud-nixos/'\n",
            d = disk.display()
        ),
    )
    .unwrap();
    for (wants, name, target) in [
        ("multi-user.target.wants", NETWORK, format!("../{NETWORK}")),
        ("multi-user.target.wants", DISK, format!("../{DISK}")),
        (
            "multi-user.target.wants",
            "systemd-networkd.service",
            "/lib/systemd/system/systemd-networkd.service".into(),
        ),
        (
            "sockets.target.wants",
            "systemd-networkd.socket",
            "/lib/systemd/system/systemd-networkd.socket".into(),
        ),
    ] {
        std::fs::create_dir_all(dir.join(wants)).unwrap();
        std::os::unix::fs::symlink(target, dir.join(wants).join(name)).unwrap();
    }
    dir
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn journal(c: &Container) -> String {
    text(&c.exec(
        Duration::from_secs(30),
        "journalctl",
        &["--no-pager", "-b", "-u", NETWORK],
    ))
}

/// Whether networkd configured the static IPv6 and the default route via fe80::1 on eth0.
fn ipv6_configured(c: &Container, timeout: Duration) -> (bool, String) {
    let mut seen = String::new();
    let ok = poll(timeout, Duration::from_millis(250), || {
        let addr = text(&c.exec(
            Duration::from_secs(10),
            "ip",
            &["-6", "addr", "show", "dev", "eth0"],
        ));
        let route = text(&c.exec(Duration::from_secs(10), "ip", &["-6", "route"]));
        seen = format!("{addr}{route}");
        addr.contains(IPV6) && route.contains("default via fe80::1 dev eth0")
    });
    (ok, seen)
}

#[test]
fn the_network_unit_falls_back_to_this_servers_saved_metadata() {
    if !netns::can_run("network_unit", TOOLS) {
        return;
    }
    let t0 = Instant::now();
    let log = |msg: &str| eprintln!("[{}] {msg}", container::elapsed(t0));
    let id = netns::unique();
    let tmp = container::shared_tempdir("network-unit-");
    let root = tmp.path().to_path_buf();
    std::fs::create_dir_all(root.join("disk")).unwrap();
    let net = ContainerNet::new(&id, GUEST_IPV4, &["169.254.169.254/16"]);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hetzner-metadata");
    let docs = Documents::from_files(&fixtures.join("metadata.full-example.yaml"), None, None)
        .expect("fixtures");
    let mut metadata =
        MetadataServer::start_in_netns(&net.standins.name, "169.254.169.254:80", docs)
            .expect("metadata stand-in");
    let package = units::package_dir(&root);
    let unit_dir = prepare_units(&root, &package);
    // Hetzner's DHCP would give eth0 an IPv4 address; a drop-in for our file gives it the
    // link-local one the stand-in is reached from.
    let network_dropins = root.join("etc-systemd-network");
    let dropin = network_dropins.join("50-hcloud-nixos-public-960003aabbcc.network.d");
    std::fs::create_dir_all(&dropin).unwrap();
    std::fs::write(
        dropin.join("90-test-ipv4.conf"),
        format!("[Network]\nAddress={GUEST_IPV4}\n"),
    )
    .unwrap();
    let spec = |boot: u32| Spec {
        machine: format!("hcn-net{boot}-{id}"),
        netns: net.guest.name.clone(),
        bind_ro: vec![
            (unit_dir.clone(), PathBuf::from("/etc/systemd/system")),
            (
                network_dropins.clone(),
                PathBuf::from("/etc/systemd/network"),
            ),
        ],
        bind: vec![root.clone()],
        console_log: root.join(format!("console-{boot}.log")),
    };
    // A server's NIC at power-on: what an earlier boot configured is gone (the namespace
    // outlives the container; the kernel would keep it).
    let fresh_nic = |mac: &str| {
        net.guest.ip(&["link", "set", "eth0", "down"]);
        net.guest.ip(&["addr", "flush", "dev", "eth0"]);
        net.guest.ip(&["link", "set", "eth0", "address", mac]);
        net.guest.ip(&["addr", "add", GUEST_IPV4, "dev", "eth0"]);
        net.guest.ip(&["link", "set", "eth0", "up"]);
    };
    let boot = |n: u32| {
        let s = spec(n);
        let caps = NspawnSettings::net_admin(&s.machine);
        let c = Container::boot(&s);
        (c, caps)
    };

    // Boot 1: the service answers; the unit saves the metadata in its StateDirectory.
    fresh_nic(MAC);
    let (c, caps) = boot(1);
    assert_eq!(c.unit_state(NETWORK), "active/exited", "{}", journal(&c));
    assert_eq!(
        c.unit_property(NETWORK, "StatusText"),
        "configured from the metadata service"
    );
    let (ok, seen) = ipv6_configured(&c, Duration::from_secs(20));
    assert!(ok, "boot 1: no IPv6\n{seen}");
    let modes = c.sh("stat -c '%a %U' /var/lib/hcloud-nixos /var/lib/hcloud-nixos/metadata.json");
    assert_eq!(modes, "700 root\n600 root\n");
    c.sh(&format!(
        "cp /var/lib/hcloud-nixos/metadata.json {}/disk/",
        root.display()
    ));
    log("boot 1: configured from the service; metadata saved (0700 directory, 0600 file)");
    drop(c);
    drop(caps);

    // Boot 2: nothing answers at 169.254.169.254.
    metadata.stop();
    fresh_nic(MAC);
    let (c, caps) = boot(2);
    assert_eq!(c.unit_state(NETWORK), "active/exited", "{}", journal(&c));
    let status = c.unit_property(NETWORK, "StatusText");
    assert!(
        status.starts_with(
            "the metadata service cannot be reached: configured from the metadata saved at "
        ),
        "{status}\n{}",
        journal(&c)
    );
    let (ok, seen) = ipv6_configured(&c, Duration::from_secs(20));
    assert!(
        ok,
        "boot 2: no IPv6 from the saved metadata\n{seen}\n{}",
        journal(&c)
    );
    let keys = c.sh("cat /run/hcloud-nixos/authorized_keys/root");
    assert!(keys.contains("alice@laptop"), "{keys}");
    log(&format!("boot 2: service down; status line: {status}"));
    drop(c);
    drop(caps);

    // Boot 3: the same disk in a server with another MAC.
    fresh_nic(OTHER_MAC);
    let (c, caps) = boot(3);
    assert_eq!(c.unit_state(NETWORK), "failed/failed", "{}", journal(&c));
    let status = c.unit_property(NETWORK, "StatusText");
    assert!(
        status.starts_with("failed: ") && status.contains("is not this server's"),
        "{status}"
    );
    let files = c.sh("ls -A /run/systemd/network");
    assert!(files.trim().is_empty(), "{files}");
    let keys = c.exec(
        Duration::from_secs(10),
        "test",
        &["-e", "/run/hcloud-nixos/authorized_keys/root"],
    );
    assert!(!keys.status.success(), "another server's keys were written");
    let (ok, _) = ipv6_configured(&c, Duration::from_secs(3));
    assert!(!ok, "another server's IPv6 configured");
    log(&format!("boot 3: other MAC; status line: {status}"));
    drop(c);
    drop(caps);
}

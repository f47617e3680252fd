//! `hcloud-nixos network` with its defaults against real systemd-networkd, D-Bus and
//! systemd-hostnamed in a guest network namespace, with the stand-in metadata service on
//! 169.254.169.254:80 in a second namespace joined by a veth pair (needs root).

use std::path::Path;
use std::time::Duration;

use harness::metadata::{Documents, MetadataServer};
use harness::netns::{self, Guest, GuestOptions, Netns};

const MAC: &str = "96:00:03:aa:bb:cc";
const IPV6: &str = "2a01:4f8:c012:abcd::1/64";
const HOSTNAME: &str = "my-nixos-server";
const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBjYTHGYkNK7DZ4Gn0NGN1sjFUVapus4GXybEYg/ylcA alice@laptop";
const KEYS_FILE: &str = "/run/hcloud-nixos/authorized_keys/root";
const PUBLIC_FILE: &str = "/run/systemd/network/50-hcloud-nixos-public-960003aabbcc.network";

fn fixture(name: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("HCLOUD_NIXOS_FIXTURES")
        .map(Into::into)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hetzner-metadata")
        });
    dir.join(name)
}

/// How the guest's eth0 looks before `hcloud-nixos network` runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Eth0 {
    /// Up with an IPv4 address, as after DHCP.
    Addressed,
    /// Down and without any address: the binary must bring it up with 169.254.0.1/16 itself.
    DownWithoutAddress,
}

/// The two namespaces, the veth pair between them and the stand-in on 169.254.169.254:80.
/// Fields drop in declaration order: the stand-in first, then the namespaces.
struct Bench {
    standin: MetadataServer,
    guest_ns: Netns,
    /// Kept only to be deleted on drop.
    _meta_ns: Netns,
}

fn bench(case: Eth0) -> Bench {
    bench_with_mac(case, MAC)
}

/// As [`bench`], with the guest's eth0 carrying `mac`.
fn bench_with_mac(case: Eth0, mac: &str) -> Bench {
    let id = netns::unique();
    let meta_ns = Netns::new(format!("hnm-{id}"));
    let guest_ns = Netns::new(format!("hng-{id}"));
    meta_ns.ip(&[
        "link",
        "add",
        "m0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &guest_ns.name,
    ]);
    meta_ns.ip(&["addr", "add", "169.254.169.254/16", "dev", "m0"]);
    meta_ns.ip(&["link", "set", "m0", "up"]);
    guest_ns.ip(&["link", "set", "eth0", "address", mac]);
    if case == Eth0::Addressed {
        guest_ns.ip(&["addr", "add", "169.254.10.2/16", "dev", "eth0"]);
        guest_ns.ip(&["link", "set", "eth0", "up"]);
    }
    let docs = Documents::from_files(
        &fixture("metadata.full-example.yaml"),
        Some(&fixture("private-networks.two-networks.yaml")),
        None,
    )
    .expect("fixtures");
    let standin = MetadataServer::start_in_netns(&meta_ns.name, "169.254.169.254:80", docs)
        .expect("stand-in in the metadata namespace");
    Bench {
        standin,
        guest_ns,
        _meta_ns: meta_ns,
    }
}

/// `hcloud-nixos-network` with all its defaults, as the NixOS unit runs it.
fn run_network(guest: &Guest) -> String {
    let out = guest.exec(
        Duration::from_secs(90),
        env!("CARGO_BIN_EXE_hcloud-nixos-network"),
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "hcloud-nixos-network failed ({}):\n{stderr}",
        out.status
    );
    stderr
}

fn assert_keys(guest: &Guest) {
    assert_eq!(
        guest.text("stat", &["-c", "%a %u", KEYS_FILE]).trim(),
        "600 0"
    );
    let keys = guest.text("cat", &[KEYS_FILE]);
    assert!(keys.lines().any(|l| l == KEY), "{KEYS_FILE}:\n{keys}");
}

fn provision(case: Eth0) {
    let test = format!("network_netns ({case:?})");
    if !netns::can_run(&test, netns::GUEST_TOOLS) {
        return;
    }
    let host_hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    // Declared before the guest, so dropped after it (a panic anywhere still runs every Drop).
    let b = bench(case);
    let standin = &b.standin;
    let state = tempfile::tempdir().unwrap();
    // The user-data carries a host key, as `create` passes one.
    let (private, public) = host_key(state.path());
    let userdata = format!(
        "#cloud-config\n{}\n",
        serde_json::json!({"ssh_keys": {"ed25519_private": private, "ed25519_public": public}})
    );
    standin.set_document("userdata", Some(userdata.as_bytes()));
    let guest = Guest::start(&b.guest_ns, &GuestOptions::default());
    isolate(&guest, state.path());
    let ready = netns::poll(Duration::from_secs(20), Duration::from_millis(100), || {
        guest.bus_name_owned("org.freedesktop.network1")
            && guest.bus_name_owned("org.freedesktop.hostname1")
    });
    assert!(
        ready,
        "networkd and hostnamed did not appear on the guest's bus"
    );
    assert_eq!(
        guest.text("cat", &["/proc/sys/kernel/hostname"]),
        host_hostname
    );

    let stderr = run_network(&guest);
    assert!(standin.requests("metadata") >= 1);
    assert!(standin.requests("metadata/private-networks") >= 1);

    // networkd read our file and configured the static IPv6 and the link-local gateway.
    let file = guest.text("cat", &[PUBLIC_FILE]);
    assert!(file.contains(MAC), "{PUBLIC_FILE}:\n{file}");
    let mut addr = String::new();
    let mut route = String::new();
    let configured = netns::poll(Duration::from_secs(20), Duration::from_millis(200), || {
        addr = guest.text("ip", &["-6", "addr", "show", "dev", "eth0"]);
        route = guest.text("ip", &["-6", "route"]);
        addr.contains(IPV6) && route.contains("default via fe80::1 dev eth0")
    });
    assert!(
        configured,
        "networkd did not configure eth0:\n{addr}\n{route}\nnetworkctl:\n{}\nhcloud-nixos:\n{stderr}",
        guest.text("networkctl", &["status", "eth0", "--no-pager"])
    );

    // The transient hostname, via hostnamed, in the guest's UTS namespace only.
    let mut name = String::new();
    let named = netns::poll(Duration::from_secs(10), Duration::from_millis(100), || {
        name = guest.text("cat", &["/proc/sys/kernel/hostname"]);
        name.trim() == HOSTNAME
    });
    assert!(named, "guest hostname is '{}'", name.trim());
    let prop = guest.text(
        "busctl",
        &[
            "--system",
            "get-property",
            "org.freedesktop.hostname1",
            "/org/freedesktop/hostname1",
            "org.freedesktop.hostname1",
            "Hostname",
        ],
    );
    assert_eq!(prop.trim(), format!("s \"{HOSTNAME}\""));
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        host_hostname,
        "the host's hostname changed"
    );

    // Root's keys, readable by root only.
    assert_keys(&guest);
    // The host key from the user-data, where sshd reads it, root-only; never in the output.
    let host_key = "/etc/ssh/ssh_host_ed25519_key";
    assert_eq!(
        guest.text("stat", &["-c", "%a %u", host_key]).trim(),
        "600 0"
    );
    assert_eq!(guest.text("cat", &[host_key]), private);
    assert_eq!(
        guest
            .text("cat", &["/etc/ssh/ssh_host_ed25519_key.pub"])
            .trim(),
        public.trim()
    );
    assert!(standin.requests("userdata") >= 1);
    let body = private.lines().nth(2).unwrap();
    assert!(
        !stderr.contains(body),
        "the private host key is in the output:\n{stderr}"
    );

    // The temporary link-local address is gone again (networkd may bring the link up itself).
    let v4 = guest.text("ip", &["-4", "addr", "show", "dev", "eth0"]);
    assert!(
        !v4.contains("169.254.0.1/"),
        "temporary address left:\n{v4}"
    );
    // Which address the requests came from says which path the binary took.
    let want_source = match case {
        Eth0::Addressed => "169.254.10.2",
        Eth0::DownWithoutAddress => "169.254.0.1",
    };
    let sources = standin.clients();
    assert!(
        !sources.is_empty() && sources.iter().all(|ip| ip.to_string() == want_source),
        "requests came from {sources:?}, want {want_source}"
    );
    drop(guest);
    drop(b);
}

#[test]
fn network_with_addressed_eth0() {
    provision(Eth0::Addressed);
}

#[test]
fn network_with_eth0_down_and_unaddressed() {
    provision(Eth0::DownWithoutAddress);
}

/// Without networkd the files are still written (networkd reads them when it starts) and the
/// command succeeds; with a static hostname in /etc/hostname, `auto` leaves the hostname alone;
/// and the link the command brought up for the fetch is down and unaddressed again afterwards.
#[test]
fn network_without_networkd_and_with_a_static_hostname() {
    if !netns::can_run("network_netns (no networkd)", netns::GUEST_TOOLS) {
        return;
    }
    let b = bench(Eth0::DownWithoutAddress);
    let state = tempfile::tempdir().unwrap();
    let guest = Guest::start(
        &b.guest_ns,
        &GuestOptions {
            networkd: false,
            etc_hostname: "static-name\n".into(),
        },
    );
    isolate(&guest, state.path());
    let ready = netns::poll(Duration::from_secs(20), Duration::from_millis(100), || {
        guest.bus_name_owned("org.freedesktop.hostname1")
    });
    assert!(ready, "hostnamed did not appear on the guest's bus");
    assert!(!guest.bus_name_owned("org.freedesktop.network1"));
    let before = guest.text("cat", &["/proc/sys/kernel/hostname"]);
    assert!(!before.trim().is_empty());

    run_network(&guest);
    let file = guest.text("cat", &[PUBLIC_FILE]);
    assert!(
        file.contains(&format!("MACAddress={MAC}")),
        "{PUBLIC_FILE}:\n{file}"
    );
    assert_eq!(guest.text("cat", &["/proc/sys/kernel/hostname"]), before);
    assert_ne!(before.trim(), HOSTNAME);
    assert_keys(&guest);
    assert!(
        b.standin
            .clients()
            .iter()
            .all(|ip| ip.to_string() == "169.254.0.1")
    );
    assert_link_restored(&guest);
}

/// eth0 is down again and has no IPv4 address (nobody but the command touched it).
fn assert_link_restored(guest: &Guest) {
    let link = guest.text("ip", &["-o", "link", "show", "dev", "eth0"]);
    let flags = link.split(['<', '>']).nth(1).unwrap_or("");
    assert!(!flags.split(',').any(|f| f == "UP"), "eth0 left up: {link}");
    let v4 = guest.text("ip", &["-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(v4.trim().is_empty(), "eth0 kept an address: {v4}");
    let v6 = guest.text("ip", &["-6", "addr", "show", "dev", "eth0"]);
    assert!(!v6.contains(IPV6), "{v6}");
}

/// When the metadata service never answers usefully, the command fails within its deadline
/// with one error line, and still takes the temporary address away and the link down again.
#[test]
fn network_failing_fetch_restores_the_link() {
    if !netns::can_run("network_netns (failing fetch)", netns::GUEST_TOOLS) {
        return;
    }
    let b = bench(Eth0::DownWithoutAddress);
    b.standin.fail_next("metadata", 503, 10_000);
    b.standin
        .fail_next("metadata/private-networks", 503, 10_000);
    let state = tempfile::tempdir().unwrap();
    let guest = Guest::start(&b.guest_ns, &GuestOptions::default());
    isolate(&guest, state.path());
    let started = std::time::Instant::now();
    let out = guest.exec(
        Duration::from_secs(30),
        env!("CARGO_BIN_EXE_hcloud-nixos-network"),
        &["--deadline", "3s"],
    );
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "succeeded without metadata:\n{stderr}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(b.standin.requests("metadata") >= 2, "no retries");
    assert!(
        guest
            .text("ls", &["-A", "/run/systemd/network"])
            .trim()
            .is_empty(),
        "files written without metadata"
    );
    assert_link_restored(&guest);
}

/// A guest whose /var/lib is `state`, a directory of the host's that outlives the guest (as a
/// server's disk outlives a boot), and whose DMI data is hidden, so that the host's own identity
/// (a CI machine may itself be a Hetzner server) plays no part.
fn boot_with_state(b: &Bench, state: &Path) -> Guest {
    let guest = Guest::start(&b.guest_ns, &GuestOptions::default());
    isolate(&guest, state);
    let ready = netns::poll(Duration::from_secs(20), Duration::from_millis(100), || {
        guest.bus_name_owned("org.freedesktop.network1")
    });
    assert!(ready, "networkd did not appear on the guest's bus");
    guest
}

/// A fresh ed25519 host key pair made by OpenSSH in `dir`: (private, public).
fn host_key(dir: &Path) -> (String, String) {
    let file = dir.join("host-key");
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "root@web-1", "-f"])
        .arg(&file)
        .output()
        .expect("ssh-keygen (openssh-client)");
    assert!(out.status.success(), "{out:?}");
    let text = |p: &Path| std::fs::read_to_string(p).unwrap();
    let pair = (text(&file), text(&file.with_extension("pub")));
    std::fs::remove_file(&file).unwrap();
    pair
}

/// Gives the guest `state` as its /var/lib (where `network` saves the metadata by default) and an
/// empty /etc/ssh of its own (where it installs a host key from the user-data): the host's own
/// must not be written. Hides the host's DMI data.
fn isolate(guest: &Guest, state: &Path) {
    let mount = |args: &[&str]| {
        let out = guest.exec(Duration::from_secs(10), "mount", args);
        assert!(
            out.status.success(),
            "mount {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let etc_ssh = state.join("etc-ssh");
    std::fs::create_dir_all(&etc_ssh).unwrap();
    mount(&["--bind", &etc_ssh.display().to_string(), "/etc/ssh"]);
    mount(&["--bind", &state.display().to_string(), "/var/lib"]);
    if Path::new("/sys/devices/virtual/dmi/id").is_dir() {
        mount(&["-t", "tmpfs", "tmpfs", "/sys/devices/virtual/dmi/id"]);
    }
}

/// Whether networkd configured the static IPv6 address and the default route on eth0 within
/// `timeout`; the last `ip` output for the message.
fn ipv6_configured(guest: &Guest, timeout: Duration) -> (bool, String) {
    let mut seen = String::new();
    let ok = netns::poll(timeout, Duration::from_millis(200), || {
        let addr = guest.text("ip", &["-6", "addr", "show", "dev", "eth0"]);
        let route = guest.text("ip", &["-6", "route"]);
        seen = format!("{addr}{route}");
        addr.contains(IPV6) && route.contains("default via fe80::1 dev eth0")
    });
    (ok, seen)
}

/// A metadata outage at boot: the server configures itself from the last good metadata it
/// saved (IPv6 by real networkd, the SSH keys), says so, and never takes the saved metadata of
/// another server (an image made from a snapshot carries it to servers with other MACs).
#[test]
fn network_outage_falls_back_to_the_saved_metadata_of_this_server_only() {
    if !netns::can_run("network_netns (metadata outage)", netns::GUEST_TOOLS) {
        return;
    }
    let state = tempfile::tempdir().unwrap();

    // Boot 1: the service answers; the metadata is saved.
    let b = bench(Eth0::Addressed);
    let guest = boot_with_state(&b, state.path());
    run_network(&guest);
    let (ok, seen) = ipv6_configured(&guest, Duration::from_secs(20));
    assert!(ok, "first boot: no IPv6:\n{seen}");
    drop(guest);
    drop(b);

    // Boot 2: nothing answers at 169.254.169.254.
    let mut b = bench(Eth0::Addressed);
    b.standin.stop();
    let guest = boot_with_state(&b, state.path());
    let out = guest.exec(
        Duration::from_secs(60),
        env!("CARGO_BIN_EXE_hcloud-nixos-network"),
        &["--deadline", "3s"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "outage with saved metadata failed ({}):\n{stderr}",
        out.status
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("WARN") && l.contains("saved")),
        "the fallback is not said in the log:\n{stderr}"
    );
    let (ok, seen) = ipv6_configured(&guest, Duration::from_secs(20));
    assert!(
        ok,
        "outage: no IPv6 from the saved metadata:\n{seen}\n{stderr}"
    );
    assert_keys(&guest);
    drop(guest);
    drop(b);

    // Boot 3: the same saved metadata on a machine with another MAC: refused.
    let mut b = bench_with_mac(Eth0::Addressed, "96:00:03:11:22:33");
    b.standin.stop();
    let guest = boot_with_state(&b, state.path());
    let out = guest.exec(
        Duration::from_secs(60),
        env!("CARGO_BIN_EXE_hcloud-nixos-network"),
        &["--deadline", "3s"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "took another server's metadata:\n{stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains(MAC), "{stderr}");
    assert!(
        guest
            .text("ls", &["-A", "/run/systemd/network"])
            .trim()
            .is_empty(),
        "files written from another server's metadata"
    );
    assert!(guest.text("cat", &[KEYS_FILE]).is_empty(), "keys written");
    let (ok, _) = ipv6_configured(&guest, Duration::from_secs(3));
    assert!(!ok, "another server's IPv6 configured");
}

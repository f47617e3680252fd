//! The unit files the NixOS module installs: they verify under systemd, and the metadata
//! firewall keeps everyone but root, and everything routed through the machine, away from
//! 169.254.169.254 (in network namespaces), loaded both ways the module loads it: by its own unit,
//! and as a table of a hand-written nftables ruleset that starts with `flush ruleset`.

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::netns::{self, Netns, can_run, output_within, unique};
use harness::units;

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

/// Connects to 169.254.169.254:80 from namespace `from` as `uid` (0 or another).
fn connect_as(from: &Netns, uid: u32) -> bool {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &from.name]);
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

/// Runs `nft ARGS...` in namespace `ns`; panics with nft's message when it fails.
fn nft_in(ns: &Netns, args: &[&str], what: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "nft"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const TABLE: &str = "hcloud_nixos_metadata";

/// The body of the table (its chains), cut out of the rules file the way the NixOS module does
/// for networking.nftables.tables: the lines between `table inet hcloud_nixos_metadata {` and
/// the last `}` at the start of a line.
fn table_body(rules: &str) -> String {
    let lines: Vec<&str> = rules.split('\n').collect();
    let open = lines
        .iter()
        .position(|l| *l == format!("table inet {TABLE} {{"))
        .expect("the rules file has a `table inet hcloud_nixos_metadata {` line");
    let close = lines
        .iter()
        .rposition(|l| *l == "}")
        .expect("the rules file has a closing `}` line");
    assert!(close > open + 1, "the table is empty");
    lines[open + 1..close].join("\n")
}

/// What nftables.service loads on NixOS with networking.nftables.enable, a hand-written ruleset
/// (so `flush ruleset` first, nixos/modules/services/networking/nftables.nix) and the module's
/// table in networking.nftables.tables: the tables wrapped as `table FAMILY NAME { CONTENT }`.
fn nixos_nftables_ruleset(body: &str) -> String {
    format!(
        "flush ruleset\n\
         table inet hand_written {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n  }}\n}}\n\
         table inet {TABLE} {{\n{body}\n}}\n"
    )
}

#[test]
fn the_rules_have_the_shape_the_module_cuts_the_table_body_from() {
    let rules = std::fs::read_to_string(units::firewall_rules()).unwrap();
    let body = table_body(&rules);
    assert!(body.contains("chain output"), "{body}");
    assert!(body.contains("hook output"), "{body}");
    assert!(body.contains("chain forward"), "{body}");
    assert!(body.contains("hook forward"), "{body}");
    assert!(
        !body.contains("table "),
        "the body holds chains only:\n{body}"
    );
}

#[test]
fn the_firewall_unit_follows_the_firewall_services_and_keeps_its_rules_when_stopped() {
    let unit =
        std::fs::read_to_string(units::source_dir().join("hcloud-nixos-metadata-firewall.service"))
            .unwrap();
    let lines: Vec<&str> = unit
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(str::trim)
        .collect();
    let has = |line: &str| lines.contains(&line);
    assert!(
        has("After=local-fs.target firewall.service nftables.service"),
        "{unit}"
    );
    assert!(has("PartOf=firewall.service nftables.service"), "{unit}");
    assert!(
        has("ReloadPropagatedFrom=firewall.service nftables.service"),
        "{unit}"
    );
    assert!(has("ExecStart=@nft@ -f @rules@"), "{unit}");
    assert!(has("ExecReload=@nft@ -f @rules@"), "{unit}");
    // A stop (also one propagated from a stopped firewall) must not open the service.
    assert!(!lines.iter().any(|l| l.starts_with("ExecStop")), "{unit}");
}

/// Three namespaces: `meta` serves 169.254.169.254:80; `host` is the server, with the rules
/// loaded and forwarding on; `guest` (a container or VM) is routed through `host`.
#[test]
fn metadata_firewall_lets_only_root_on_the_host_through() {
    if !can_run(
        "metadata_firewall_lets_only_root_on_the_host_through",
        &["ip", "/usr/sbin/nft", "setpriv", "timeout", "bash", "sh"],
    ) {
        return;
    }
    let id = unique();
    let meta = Netns::new(format!("hfm-{id}"));
    let host = Netns::new(format!("hfh-{id}"));
    let guest = Netns::new(format!("hfg-{id}"));
    let veth = |a: &str, a_ns: &Netns, b: &str, b_ns: &Netns| {
        netns::ip(&[
            "link", "add", a, "netns", &a_ns.name, "type", "veth", "peer", "name", b, "netns",
            &b_ns.name,
        ]);
    };
    veth("fwm", &meta, "fwh", &host);
    veth("fwg", &host, "fwc", &guest);
    meta.ip(&["addr", "add", "169.254.169.254/16", "dev", "fwm"]);
    meta.ip(&["link", "set", "fwm", "up"]);
    meta.ip(&["route", "add", "10.77.0.0/24", "via", "169.254.0.2"]);
    host.ip(&["addr", "add", "169.254.0.2/16", "dev", "fwh"]);
    host.ip(&["link", "set", "fwh", "up"]);
    host.ip(&["addr", "add", "10.77.0.1/24", "dev", "fwg"]);
    host.ip(&["link", "set", "fwg", "up"]);
    netns::run(
        "ip",
        &[
            "netns",
            "exec",
            &host.name,
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward",
        ],
    );
    guest.ip(&["addr", "add", "10.77.0.2/24", "dev", "fwc"]);
    guest.ip(&["link", "set", "fwc", "up"]);
    guest.ip(&["route", "add", "default", "via", "10.77.0.1"]);

    // A listener in the meta namespace: this thread joins it, binds, and serves for a while.
    const ALLOWED: usize = 5;
    let ns_file = std::fs::File::open(format!("/run/netns/{}", meta.name)).unwrap();
    let listener = std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            TcpListener::bind("169.254.169.254:80").unwrap()
        })
        .join()
        .unwrap()
    });
    listener.set_nonblocking(true).unwrap();
    // Counts every connection until told to stop, so that one too many is seen as well.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let serving = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let end = Instant::now() + Duration::from_secs(300);
            let mut accepted = 0;
            while Instant::now() < end && !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match listener.accept() {
                    Ok(_) => accepted += 1,
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            // Connections whose handshake completed before the stop are still queued.
            while listener.accept().is_ok() {
                accepted += 1;
            }
            accepted
        }
    });

    // 1, 2: without rules, everyone gets through, also from the guest (the routing works).
    assert!(
        connect_as(&host, 65534),
        "without the rules everyone on the host gets through"
    );
    assert!(
        connect_as(&guest, 0),
        "without the rules the guest gets through (routed by the host)"
    );

    // The unit's way: the whole file, loaded at start and again at every reload or restart.
    let rules = units::firewall_rules();
    let rules_path = rules.display().to_string();
    nft_in(&host, &["-f", &rules_path], "loading the rules");
    nft_in(
        &host,
        &["-f", &rules_path],
        "loading them again (a reload or restart of the unit)",
    );
    assert!(
        !connect_as(&host, 65534),
        "a non-root process on the host reached the metadata service"
    );
    // 3
    assert!(connect_as(&host, 0), "root on the host was refused");
    assert!(
        !connect_as(&guest, 0),
        "root in a guest routed through the host reached the metadata service"
    );
    assert!(
        !connect_as(&guest, 65534),
        "a non-root process in a guest reached the metadata service"
    );
    let listing = nft_in(
        &host,
        &["list", "table", "inet", TABLE],
        "listing the table",
    );
    for chain in ["output", "forward"] {
        let at = listing
            .find(&format!("chain {chain} {{"))
            .unwrap_or_else(|| panic!("no chain {chain}:\n{listing}"));
        let rest = &listing[at..];
        let counter = rest
            .find("counter packets ")
            .map(|i| &rest[i + "counter packets ".len()..])
            .unwrap_or_else(|| panic!("no counter in chain {chain}:\n{listing}"));
        assert!(
            !counter.starts_with("0 "),
            "the {chain} chain rejected nothing:\n{listing}"
        );
    }

    // What nftables.service does with a hand-written ruleset: `flush ruleset` takes the table
    // with it. 4
    nft_in(&host, &["flush", "ruleset"], "flushing the ruleset");
    assert!(
        connect_as(&host, 65534),
        "after `flush ruleset` the rule should be gone (the problem the module solves)"
    );

    // The nftables way: the table's body inside nftables.service's ruleset, after its flush.
    let text = std::fs::read_to_string(&rules).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ruleset = dir.path().join("nftables-rules");
    std::fs::write(&ruleset, nixos_nftables_ruleset(&table_body(&text))).unwrap();
    let ruleset = ruleset.display().to_string();
    nft_in(
        &host,
        &["-f", &ruleset],
        "loading the NixOS nftables ruleset",
    );
    nft_in(
        &host,
        &["-f", &ruleset],
        "loading it again (a reload of nftables.service)",
    );
    assert!(
        !connect_as(&host, 65534),
        "with the nftables ruleset a non-root process on the host got through"
    );
    // 5
    assert!(
        connect_as(&host, 0),
        "with the nftables ruleset root on the host was refused"
    );
    assert!(
        !connect_as(&guest, 0),
        "with the nftables ruleset a guest routed through the host got through"
    );

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        serving.join().unwrap(),
        ALLOWED,
        "the metadata service saw exactly the allowed connections"
    );
}

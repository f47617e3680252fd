//! Reboots for a new kernel under a real systemd and logind: the host's Debian booted as a
//! container (`systemd-nspawn`, see `harness::container`), the binary under test bind-mounted
//! in, the FlakeHub stand-in (169.254.169.253:8080) and the metadata stand-in in a second network
//! namespace, the `fh` stand-in (`harness::scripts`), and "systems" whose `kernel`, `initrd` and
//! `kernel-modules` lead into kernel packages (bind-mounted at /nix/store in the container).
//! The booted system has kernel 6.1.1; release 0.1.1 brings 6.1.2; `reboot = "when-needed"`.
//!
//! 1. A block-mode shutdown inhibitor (`systemd-inhibit --mode=block`) is held: the agent
//!    deploys, waits `reboot_inhibitor_timeout`, and postpones the reboot; the status and the
//!    hooks say so, and the container stays up.
//! 2. The inhibitor is gone: the next `agent --once` records the reboot request in the state
//!    file and asks logind, which reboots the container (nspawn reports "is being rebooted" and
//!    exits).
//!
//! Needs root and `systemd-nspawn` (Debian: `apt-get install systemd-container`); skips
//! otherwise, or fails under `CI=true`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::container::netns::{self, poll};
use harness::container::{self, Container, ContainerNet, Spec, elapsed, write_executable};
use harness::flakehub::{FlakeHub, rolling_version};
use harness::metadata::{Documents, MetadataServer};
use harness::scripts::{Activation, Fh, Profile, Switch};
use harness::units;

const FLAKEHUB_IP: &str = "169.254.169.253";
const FLAKEHUB_PORT: u16 = 8080;
const ORG: &str = "hcloud-test";
const FLAKE: &str = "infra";
const ATTR: &str = "nixosConfigurations.test";
const TOKEN: &str = "fhtoken-reboot-0123456789abcdef";
/// Where the binary under test appears in the container.
const BIN_DIR: &str = "/opt/under-test";
/// The inhibitor's unit in the container.
const INHIBITOR_UNIT: &str = "nightly-backup-inhibitor.service";

/// `/nix/store/<32 characters>-<name>`, unique to `tag`.
fn store_path(tag: &str, name: &str) -> String {
    format!("/nix/store/{tag:0>32}-{name}")
}

/// A kernel package in `<root>/store` (the container's /nix/store); returns its store path.
fn make_kernel(root: &Path, version: &str) -> String {
    let path = store_path(&version.replace('.', ""), &format!("linux-{version}"));
    let dir = root
        .join("store")
        .join(path.strip_prefix("/nix/store/").unwrap());
    std::fs::create_dir_all(dir.join(format!("lib/modules/{version}"))).unwrap();
    std::fs::write(dir.join("bzImage"), format!("kernel {version}\n")).unwrap();
    std::fs::write(dir.join("initrd"), format!("initrd {version}\n")).unwrap();
    path
}

/// System `n` with the kernel package `kernel`: `bin/switch-to-configuration` (switch and test
/// point `<root>/current-system` at it) and the kernel links NixOS systems have.
fn make_system(root: &Path, n: u32, kernel: &str) -> String {
    let path = store_path(&format!("{n}aa"), &format!("nixos-system-test-{n}"));
    let dir = root
        .join("store")
        .join(path.strip_prefix("/nix/store/").unwrap());
    Switch {
        name: n.to_string(),
        current: root.join("current-system"),
        log: root.join("activations.log"),
        times: None,
        flags: None,
        delay_file: None,
        activation: Activation::Switches,
    }
    .install_into(&dir);
    units::install_module_into(
        &dir,
        &units::programs_toml(&root.join("bin/fh"), Path::new("/usr/bin"), None),
    );
    for (link, to) in [
        ("kernel", format!("{kernel}/bzImage")),
        ("initrd", format!("{kernel}/initrd")),
        ("kernel-modules", kernel.to_string()),
    ] {
        std::os::unix::fs::symlink(to, dir.join(link)).unwrap();
    }
    path
}

/// The fh stand-in: `fh apply nixos ORG/FLAKE/=VERSION#ATTR ACTION` with the token from fh's
/// auth file, the profile a link.
fn fh(root: &Path) -> Fh {
    Fh {
        api: format!("http://{FLAKEHUB_IP}:{FLAKEHUB_PORT}"),
        token_file: root.join("fh-auth"),
        log: root.join("fh-argv.log"),
        profile: Profile::Link(root.join("system-profile")),
        delay_file: None,
        env: Vec::new(),
    }
}

fn agent_config(root: &Path) -> String {
    let r = root.display();
    format!(
        r#"flake = "{ORG}/{FLAKE}/0.1#{ATTR}"
poll_interval = "1h"
confirm_timeout = "10s"
reboot = "when-needed"
reboot_grace = "1s"
reboot_inhibitor_timeout = "3s"

[flakehub]
api_url = "http://{FLAKEHUB_IP}:{FLAKEHUB_PORT}"
token_file = "{r}/token"

[metadata]
url = "http://169.254.169.254/hetzner/v1/"

[apply]
mode = "direct"
timeout = "60s"

[paths]
state_dir = "{r}/state"
run_dir = "{r}/run"
current_system = "{r}/current-system"
booted_system = "{r}/booted-system"
system_profile = "{r}/system-profile"
fh = "{r}/bin/fh"
nix = "/usr/bin/nix"
nix_env = "/usr/bin/nix-env"
fh_auth_file = "{r}/fh-auth"
switch_lock = "{r}/switch-to-configuration.lock"

[[hook]]
command = ["{r}/bin/record-hook"]
"#
    )
}

fn read_state(root: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(root.join("state/state.json")).expect("state.json");
    serde_json::from_str(&text).expect("state.json is JSON")
}

/// (event, outcome, error) of each hook run, in order.
fn hook_runs(root: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(root.join("hooks.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, '|');
            Some((
                parts.next()?.to_string(),
                parts.next()?.to_string(),
                parts.next()?.to_string(),
            ))
        })
        .collect()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "exit: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_new_kernel_reboots_through_logind_after_a_blocking_inhibitor_is_gone() {
    if !netns::can_run("agent_reboot_systemd", container::HOST_TOOLS) {
        return;
    }
    let t0 = Instant::now();
    let log = |msg: &str| eprintln!("[{}] {msg}", elapsed(t0));
    let id = netns::unique();
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_hcloud-nixos"));

    // Dropped in reverse order: container, stand-ins, namespaces, then the directory.
    let tmp = container::shared_tempdir("agent-reboot-");
    let root = tmp.path().to_path_buf();
    let net = ContainerNet::new(
        &id,
        "169.254.10.2/16",
        &["169.254.169.254/16", &format!("{FLAKEHUB_IP}/16")],
    );
    let _metadata = MetadataServer::start_in_netns(
        &net.standins.name,
        "169.254.169.254:80",
        Documents::default(),
    )
    .expect("metadata stand-in");
    let hub = FlakeHub::start_in_netns(
        &net.standins.name,
        &format!("{FLAKEHUB_IP}:{FLAKEHUB_PORT}"),
    )
    .expect("FlakeHub stand-in");
    hub.require_token(Some(TOKEN));

    let k1 = make_kernel(&root, "6.1.1");
    let k2 = make_kernel(&root, "6.1.2");
    let base = make_system(&root, 0, &k1);
    let new = make_system(&root, 1, &k2);
    fh(&root).install(&root.join("bin/fh"));
    write_executable(
        &root.join("bin/record-hook"),
        &format!(
            "#!/bin/sh\necho \"$HCLOUD_NIXOS_EVENT|$HCLOUD_NIXOS_OUTCOME|$HCLOUD_NIXOS_ERROR\" >> '{}/hooks.log'\n",
            root.display()
        ),
    );
    std::fs::write(root.join("token"), format!("{TOKEN}\n")).unwrap();
    let config = root.join("agent.toml");
    std::fs::write(&config, agent_config(&root)).unwrap();
    for link in ["current-system", "booted-system", "system-profile"] {
        std::os::unix::fs::symlink(&base, root.join(link)).unwrap();
    }
    let console = root.join("console.log");

    let c = Container::boot(&Spec {
        machine: format!("hcn-reboot-{id}"),
        netns: net.guest.name.clone(),
        bind_ro: vec![
            (
                binary.parent().unwrap().to_path_buf(),
                PathBuf::from(BIN_DIR),
            ),
            (PathBuf::from("/etc/ssl"), PathBuf::from("/etc/ssl")),
        ],
        bind: vec![root.clone()],
        console_log: console.clone(),
    });
    log(&format!(
        "container {} booted (systemd is host PID {})",
        c.machine, c.init
    ));
    c.sh(&format!(
        "mkdir -p /nix/store && mount --bind '{}/store' /nix/store",
        root.display()
    ));
    let bin = format!("{BIN_DIR}/hcloud-nixos");
    let cfg = config.display().to_string();
    let once = || {
        c.exec(
            Duration::from_secs(90),
            &bin,
            &["agent", "--once", "--config", &cfg],
        )
    };

    // ---- 1: a block-mode inhibitor postpones the reboot ----------------------------------------
    c.run(
        "systemd-run",
        &[
            "--unit",
            INHIBITOR_UNIT,
            "systemd-inhibit",
            "--what=shutdown",
            "--mode=block",
            "--who=nightly-backup",
            "--why=copying the database",
            "sleep",
            "300",
        ],
    );
    let held = poll(Duration::from_secs(20), Duration::from_millis(200), || {
        let out = c.exec(
            Duration::from_secs(10),
            "systemd-inhibit",
            &["--list", "--no-pager"],
        );
        String::from_utf8_lossy(&out.stdout).contains("nightly-backup")
    });
    assert!(held, "the inhibitor lock is not listed");
    log("a block-mode shutdown inhibitor is held by nightly-backup");

    let v1 = rolling_version(1, &id);
    hub.publish(ORG, FLAKE, &v1, ATTR, &new);
    let started = Instant::now();
    let out = once();
    let took = started.elapsed();
    eprintln!("{}", text(&out));
    assert!(out.status.success(), "agent --once failed:\n{}", text(&out));
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        line.starts_with(&format!(
            "up to date: {v1} (just deployed); reboot postponed: blocked by nightly-backup (copying the database, pid "
        )),
        "{line}"
    );
    // The grace delay (1 s), then the inhibitor waited for (3 s).
    assert!(took >= Duration::from_secs(4), "postponed after {took:?}");
    let s = read_state(&root);
    assert_eq!(s["last_deploy"]["outcome"], "success", "{s:#}");
    assert_eq!(s["deploys"], 1, "{s:#}");
    assert_eq!(s["reboot_required"], true, "{s:#}");
    assert!(s["reboot_request"].is_null(), "{s:#}");
    let hooks = hook_runs(&root);
    let kinds: Vec<(&str, &str)> = hooks
        .iter()
        .map(|(e, o, _)| (e.as_str(), o.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("reboot", "rebooting"),
            ("deploy", "success"),
            ("reboot", "inhibited")
        ]
    );
    assert!(hooks[2].2.contains("nightly-backup"), "{hooks:?}");
    let state = c.system_state();
    assert!(
        state == "running" || state == "degraded",
        "the container: {state}"
    );
    log(&format!(
        "deployed {v1}; the reboot was postponed after {:.1} s: {line}",
        took.as_secs_f64()
    ));

    // ---- 2: without the inhibitor, logind reboots the container --------------------------------
    c.run("systemctl", &["stop", INHIBITOR_UNIT]);
    let init = c.init;
    let out = once();
    eprintln!("{}", text(&out));
    let rebooted = poll(Duration::from_secs(60), Duration::from_millis(200), || {
        std::fs::read_to_string(&console).is_ok_and(|t| t.contains("is being rebooted"))
    });
    assert!(
        rebooted,
        "the container was not rebooted\n{}\n{}",
        text(&out),
        c.console_tail()
    );
    let gone = poll(Duration::from_secs(30), Duration::from_millis(200), || {
        std::fs::read_to_string(format!("/proc/{init}/comm"))
            .map_or(true, |c| c.trim() != "systemd")
    });
    assert!(gone, "the container's systemd (PID {init}) is still there");
    log("logind rebooted the container; nspawn exited");
    let s = read_state(&root);
    assert_eq!(s["reboot_request"]["system"], new.as_str(), "{s:#}");
    assert!(
        !s["reboot_request"]["boot_id"]
            .as_str()
            .unwrap_or("")
            .is_empty(),
        "{s:#}"
    );
    assert_eq!(s["deploys"], 1, "{s:#}");
    let hooks = hook_runs(&root);
    assert_eq!(
        hooks.last().map(|(e, o, _)| (e.as_str(), o.as_str())),
        Some(("reboot", "rebooting")),
        "{hooks:?}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("fh-argv.log"))
            .unwrap_or_default()
            .lines()
            .count(),
        1,
        "fh ran again"
    );
    log(&format!(
        "state.json recorded the reboot request for {new}; total {:.1} s",
        t0.elapsed().as_secs_f64()
    ));
}

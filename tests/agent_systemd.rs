//! The deploy agent's transient-unit apply path under a real systemd: the host's Debian booted
//! as a container (`systemd-nspawn`, systemd as PID 1), the binary under test bind-mounted in,
//! stand-ins for FlakeHub (169.254.169.253:8080) and the metadata service (169.254.169.254:80)
//! in a second network namespace joined by a veth pair, and the `fh` stand-in
//! (`harness::scripts`).
//!
//! 1. `agent --once`: `fh apply nixos ... dry-activate` runs in a transient unit
//!    `hcloud-nixos-fetch-*.service` and the activation in `hcloud-nixos-activate-*.service`;
//!    fh's output is in the journal with `HCLOUD_NIXOS_VERSION`, the system switches, the state
//!    records one successful deploy, and the units are unloaded.
//! 2. The agent as a service is killed while a slow activation runs in its unit: the activation
//!    goes on and completes, and the restarted agent confirms and records it exactly once
//!    without applying again.
//! 3. `Type=notify`: the agent's unit is `activating` until its first check ends (FlakeHub is
//!    slow), then `active` with the status line `up to date: <version>`.
//!
//! Needs root and `systemd-nspawn` (Debian: `apt-get install systemd-container`); skips
//! otherwise, or fails under `CI=true`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::container::netns::{self, poll};
use harness::container::{self, Container, ContainerNet, Spec, elapsed};
use harness::flakehub::{Endpoint, FlakeHub};
use harness::metadata::{Documents, MetadataServer};
use harness::scripts::{Activation, Fh, Profile, Switch};
use harness::units;

const FLAKEHUB_IP: &str = "169.254.169.253";
const FLAKEHUB_PORT: u16 = 8080;
const ORG: &str = "hcloud-test";
const FLAKE: &str = "infra";
const ATTR: &str = "nixosConfigurations.test";
const TOKEN: &str = "fhtoken-0123456789abcdef";
/// The agent's unit in steps 2 and 3.
const AGENT_UNIT: &str = "hcloud-nixos-agent-test.service";
/// Where the binary under test appears in the container.
const BIN_DIR: &str = "/opt/under-test";

// ---------------------------------------------------------------------------------------------
// The machine's side: "systems" (directories with bin/switch-to-configuration, bind-mounted at
// /nix/store in the container), the fh stand-in, the agent's configuration.

/// A store path `/nix/store/<32 chars>-nixos-system-test-<n>`.
fn store_path(n: u32) -> String {
    format!("/nix/store/{n:0>32}-nixos-system-test-{n}")
}

fn version(n: u32) -> String {
    format!("0.1.{n}+rev-{:0>40}", format!("{n}abc"))
}

/// Creates system `n` in `<root>/store` (seen in the container at /nix/store): switch and test
/// "activate" it by pointing current-system at it, after `<root>/switch-delay` seconds.
fn make_system(root: &Path, n: u32) {
    let name = store_path(n)
        .strip_prefix("/nix/store/")
        .unwrap()
        .to_string();
    let dir = root.join("store").join(name);
    Switch {
        name: n.to_string(),
        current: root.join("current-system"),
        log: root.join("activations.log"),
        times: None,
        flags: None,
        delay_file: Some(root.join("switch-delay")),
        activation: Activation::Switches,
    }
    .install_into(&dir);
    units::install_module_into(
        &dir,
        &units::programs_toml(&root.join("bin/fh"), Path::new("/usr/bin"), None),
    );
}

/// The fh stand-in: `fh apply nixos ORG/FLAKE/=VERSION#ATTR OPERATION` with the token from fh's
/// auth file (as fh does without determinate-nixd), `<root>/fh-delay` seconds to fetch, the
/// profile a link.
fn fh(root: &Path) -> Fh {
    Fh {
        api: format!("http://{FLAKEHUB_IP}:{FLAKEHUB_PORT}"),
        token_file: root.join("fh-auth"),
        log: root.join("fh-argv.log"),
        profile: Profile::Link(root.join("system-profile")),
        delay_file: Some(root.join("fh-delay")),
        env: Vec::new(),
    }
}

fn agent_config(root: &Path) -> String {
    let r = root.display();
    format!(
        r#"flake = "{ORG}/{FLAKE}/0.1#{ATTR}"
operation = "switch"
poll_interval = "1h"

[flakehub]
api_url = "http://{FLAKEHUB_IP}:{FLAKEHUB_PORT}"
token_file = "{r}/token"

[metadata]
url = "http://169.254.169.254/hetzner/v1/"

[apply]
mode = "transient-unit"
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
"#
    )
}

fn read_state(root: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(root.join("state/state.json")).expect("state.json");
    serde_json::from_str(&text).expect("state.json is JSON")
}

fn fh_log(root: &Path) -> Vec<String> {
    std::fs::read_to_string(root.join("fh-argv.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
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

/// Starts the agent as a `Type=notify` service of its own, without waiting for it to be ready.
fn start_agent_service(c: &Container, config: &Path) {
    let bin = format!("{BIN_DIR}/hcloud-nixos");
    let cfg = config.display().to_string();
    c.run(
        "systemd-run",
        &[
            "--no-block",
            "--unit",
            AGENT_UNIT,
            "-p",
            "Type=notify",
            "-p",
            "TimeoutStartSec=90",
            &bin,
            "agent",
            "--config",
            &cfg,
        ],
    );
}

/// The agent's journal, for failure messages.
fn agent_journal(c: &Container) -> String {
    let out = c.exec(
        Duration::from_secs(10),
        "journalctl",
        &["--no-pager", "-o", "short-monotonic", "-u", AGENT_UNIT],
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn agent_applies_in_transient_units_under_real_systemd() {
    if !netns::can_run("agent_systemd", container::HOST_TOOLS) {
        return;
    }
    let t0 = Instant::now();
    let log = |msg: &str| eprintln!("[{}] {msg}", elapsed(t0));
    let id = netns::unique();
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_hcloud-nixos"));

    // Dropped in reverse order: container, stand-ins, namespaces, then the directory.
    let tmp = container::shared_tempdir("agent-systemd-");
    let root = tmp.path().to_path_buf();
    log(&format!("shared directory {}", root.display()));
    let net = ContainerNet::new(
        &id,
        "169.254.10.2/16",
        &["169.254.169.254/16", &format!("{FLAKEHUB_IP}/16")],
    );
    log(&format!(
        "network namespaces: container {} (eth0 169.254.10.2), stand-ins {} (169.254.169.254, {FLAKEHUB_IP})",
        net.guest.name, net.standins.name
    ));
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
    log("stand-ins listening: metadata (user-data: 204 No Content), FlakeHub API");

    // The machine's files: systems 0 (running now), 1 and 2; fh; the agent's configuration.
    for n in 0..=2 {
        make_system(&root, n);
    }
    fh(&root).install(&root.join("bin/fh"));
    std::fs::write(root.join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(root.join("fh-delay"), "0").unwrap();
    std::fs::write(root.join("switch-delay"), "0").unwrap();
    let config = root.join("agent.toml");
    std::fs::write(&config, agent_config(&root)).unwrap();
    std::os::unix::fs::symlink(store_path(0), root.join("current-system")).unwrap();

    let c = Container::boot(&Spec {
        machine: format!("hcn-agent-{id}"),
        netns: net.guest.name.clone(),
        bind_ro: vec![
            (
                binary.parent().unwrap().to_path_buf(),
                PathBuf::from(BIN_DIR),
            ),
            // The volatile root has an almost empty /etc; the HTTP clients refuse to start
            // without CA certificates, even for plain-HTTP URLs.
            (PathBuf::from("/etc/ssl"), PathBuf::from("/etc/ssl")),
        ],
        bind: vec![root.clone()],
        console_log: root.join("console.log"),
    });
    let state = c.system_state();
    log(&format!(
        "container {} booted: systemd PID 1 is host PID {}, is-system-running: {state}",
        c.machine, c.init
    ));
    c.sh(&format!(
        "mkdir -p /nix/store && mount --bind '{}/store' /nix/store",
        root.display()
    ));
    let bin = format!("{BIN_DIR}/hcloud-nixos");
    let cfg = config.display().to_string();
    let current = || {
        c.run(
            "readlink",
            &["-f", &root.join("current-system").display().to_string()],
        )
        .trim()
        .to_string()
    };
    assert_eq!(current(), store_path(0));
    log(&format!("the running system is {}", store_path(0)));

    // ---- Step 1: agent --once applies in a transient unit ------------------------------------
    let v1 = version(1);
    hub.publish(ORG, FLAKE, &v1, ATTR, &store_path(1));
    log(&format!(
        "STEP 1: published {v1} -> {}; running `hcloud-nixos agent --once`",
        store_path(1)
    ));
    let out = c.exec(
        Duration::from_secs(60),
        &bin,
        &["agent", "--once", "--config", &cfg],
    );
    eprintln!("{}", text(&out));
    assert!(out.status.success(), "agent --once failed:\n{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("up to date: {v1} (just deployed)")
    );
    let fh = fh_log(&root);
    assert_eq!(
        fh,
        [format!(
            "apply nixos {ORG}/{FLAKE}/={v1}#{ATTR} dry-activate"
        )],
        "fh ran once with the exact reference"
    );
    log(&format!("fh ran once: {}", fh[0]));
    assert_eq!(
        current(),
        store_path(1),
        "current-system points at system 1"
    );
    log("current-system now points at system 1");
    let s = read_state(&root);
    assert_eq!(s["deploys"], 1, "state: {s:#}");
    assert_eq!(s["last_deploy"]["outcome"], "success", "state: {s:#}");
    assert_eq!(s["last_deploy"]["version"], v1.as_str(), "state: {s:#}");
    assert!(s["in_flight"].is_null(), "state: {s:#}");
    log("state.json: deploys = 1, last_deploy.outcome = success, nothing in flight");
    // The unit's output is in the journal, with the version as a field on every line.
    let mut journal = Vec::new();
    let found = poll(Duration::from_secs(10), Duration::from_millis(200), || {
        let out = c.exec(
            Duration::from_secs(10),
            "journalctl",
            &["--no-pager", "-o", "json", "-u", "hcloud-nixos-fetch-*"],
        );
        journal = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .collect();
        journal.iter().any(|e| e["MESSAGE"] == "fh stand-in: done")
    });
    assert!(
        found,
        "the apply unit's output is not in the journal:\n{journal:#?}"
    );
    // fh's own lines (systemd's "Started ..." lines carry UNIT=, not the extra field).
    let fh_lines: Vec<&serde_json::Value> = journal
        .iter()
        .filter(|e| {
            e["MESSAGE"].as_str().is_some_and(|m| {
                m.starts_with("fh stand-in") || m.starts_with("switch-to-configuration")
            })
        })
        .collect();
    assert_eq!(
        fh_lines.len(),
        4,
        "fh's lines in the journal: {fh_lines:#?}"
    );
    let unit = fh_lines[0]["_SYSTEMD_UNIT"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        unit.starts_with("hcloud-nixos-fetch-") && unit.ends_with(".service"),
        "fh ran in {unit:?}"
    );
    for e in &fh_lines {
        assert_eq!(e["HCLOUD_NIXOS_VERSION"], v1.as_str(), "entry: {e:#}");
        assert_eq!(e["_SYSTEMD_UNIT"], unit.as_str(), "entry: {e:#}");
    }
    log(&format!(
        "journal: fh's {} lines came from {unit}, each with HCLOUD_NIXOS_VERSION={v1}",
        fh_lines.len()
    ));
    let left = [
        c.units("hcloud-nixos-fetch-*"),
        c.units("hcloud-nixos-activate-*"),
    ]
    .concat();
    assert!(left.is_empty(), "step units still loaded: {left:?}");
    log("no hcloud-nixos-fetch-* or -activate-* unit is loaded any more");
    let auth = hub.request_log();
    assert!(
        auth.iter().all(|seen| seen.authorized) && auth.len() >= 3,
        "FlakeHub requests: {auth:?}"
    );
    log(&format!(
        "FlakeHub saw {} requests, all with the token (agent: version + output; fh: output)",
        auth.len()
    ));

    // ---- Step 2: the agent is killed mid-apply; the restarted agent picks up the result ------
    let v2 = version(2);
    hub.publish(ORG, FLAKE, &v2, ATTR, &store_path(2));
    std::fs::write(root.join("switch-delay"), "5").unwrap();
    log(&format!(
        "STEP 2: published {v2} -> {} with a slow activation (5 s); starting the agent as {AGENT_UNIT}",
        store_path(2)
    ));
    start_agent_service(&c, &config);
    let mut apply_unit = String::new();
    let running = poll(Duration::from_secs(20), Duration::from_millis(100), || {
        apply_unit = read_state_opt(&root)
            .and_then(|s| s["in_flight"]["unit"].as_str().map(str::to_string))
            .unwrap_or_default();
        apply_unit.starts_with("hcloud-nixos-activate-")
            && c.unit_state(&apply_unit) == "active/running"
    });
    assert!(
        running,
        "no apply unit running (in_flight.unit = {apply_unit:?})\n{}",
        agent_journal(&c)
    );
    log(&format!(
        "{apply_unit} is running (recorded as in_flight in state.json)"
    ));
    // READY=1 went out when the first step started (an activation may restart the agent's own
    // unit, which systemd does only once the start is done); the agent says what it does.
    assert_eq!(c.unit_state(AGENT_UNIT), "active/running");
    let status_text = c.unit_property(AGENT_UNIT, "StatusText");
    assert_eq!(status_text, format!("applying {v2}"));
    log(&format!(
        "{AGENT_UNIT} is active/running with STATUS=\"{status_text}\""
    ));
    c.run("systemctl", &["kill", "-s", "KILL", AGENT_UNIT]);
    let dead = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        matches!(
            c.unit_state(AGENT_UNIT).as_str(),
            "failed/failed" | "inactive/dead" | "/"
        )
    });
    assert!(dead, "the agent's unit: {}", c.unit_state(AGENT_UNIT));
    let apply_state = c.unit_state(&apply_unit);
    assert_eq!(
        apply_state, "active/running",
        "the apply must survive the agent"
    );
    log(&format!(
        "killed the agent with SIGKILL ({AGENT_UNIT}: {}); {apply_unit} is still {apply_state}",
        c.unit_state(AGENT_UNIT)
    ));
    let done = poll(Duration::from_secs(20), Duration::from_millis(200), || {
        c.unit_state(&apply_unit) == "active/exited"
    });
    assert!(done, "{apply_unit}: {}", c.unit_state(&apply_unit));
    assert_eq!(c.unit_property(&apply_unit, "Result"), "success");
    assert_eq!(current(), store_path(2));
    let s = read_state(&root);
    assert_eq!(
        s["deploys"], 1,
        "nothing recorded while the agent was away: {s:#}"
    );
    assert_eq!(s["in_flight"]["version"], v2.as_str(), "{s:#}");
    log(&format!(
        "{apply_unit} finished on its own (active/exited, Result=success); system 2 runs; state.json still has it in flight"
    ));
    let _ = c.exec(
        Duration::from_secs(10),
        "systemctl",
        &["reset-failed", AGENT_UNIT],
    );
    std::fs::write(root.join("switch-delay"), "0").unwrap();
    log("starting the agent again");
    start_agent_service(&c, &config);
    let active = poll(Duration::from_secs(30), Duration::from_millis(100), || {
        c.unit_state(AGENT_UNIT) == "active/running"
    });
    assert!(
        active,
        "{}: {}\n{}",
        AGENT_UNIT,
        c.unit_state(AGENT_UNIT),
        agent_journal(&c)
    );
    // READY=1 comes as the resumed deploy's first step begins (an activation may restart this
    // very unit), not when the deploy is recorded: wait for the record.
    let recorded = poll(Duration::from_secs(30), Duration::from_millis(100), || {
        read_state(&root)["in_flight"].is_null()
    });
    let s = read_state(&root);
    assert!(recorded, "the resumed deploy was not recorded: {s:#}");
    assert_eq!(s["deploys"], 2, "recorded exactly once: {s:#}");
    assert_eq!(s["last_deploy"]["version"], v2.as_str(), "{s:#}");
    assert_eq!(s["last_deploy"]["outcome"], "success", "{s:#}");
    assert!(s["in_flight"].is_null(), "{s:#}");
    let fh = fh_log(&root);
    let for_v2 = fh.iter().filter(|l| l.contains(&format!("={v2}#"))).count();
    assert_eq!(for_v2, 1, "fh ran once for {v2}: {fh:?}");
    assert_eq!(fh.len(), 2, "fh calls: {fh:?}");
    assert_eq!(current(), store_path(2));
    let left = [
        c.units("hcloud-nixos-fetch-*"),
        c.units("hcloud-nixos-activate-*"),
    ]
    .concat();
    assert!(left.is_empty(), "step units still loaded: {left:?}");
    let journal = agent_journal(&c);
    assert!(
        journal.contains("a step finished while the agent was away"),
        "the restarted agent's log:\n{journal}"
    );
    log(&format!(
        "the restarted agent recorded the finished apply: deploys = 2, fh ran once for {v2}, {apply_unit} unloaded"
    ));

    // ---- Step 3: Type=notify, READY only after the first cycle --------------------------------
    c.run("systemctl", &["stop", AGENT_UNIT]);
    let _ = c.exec(
        Duration::from_secs(10),
        "systemctl",
        &["reset-failed", AGENT_UNIT],
    );
    hub.set_endpoint_delay(Endpoint::Version, Some(Duration::from_secs(4)));
    log("STEP 3: stopped the agent; FlakeHub now answers /version after 4 s; starting the agent");
    start_agent_service(&c, &config);
    let t_start = Instant::now();
    let mut states = Vec::new();
    let active = poll(Duration::from_secs(30), Duration::from_millis(100), || {
        let st = c.unit_state(AGENT_UNIT);
        if states.last() != Some(&st) {
            states.push(st.clone());
        }
        st == "active/running"
    });
    let took = t_start.elapsed();
    assert!(
        active,
        "{AGENT_UNIT} states: {states:?}\n{}",
        agent_journal(&c)
    );
    assert!(
        states.iter().any(|s| s == "activating/start"),
        "{AGENT_UNIT} was never activating: {states:?}"
    );
    assert!(
        took >= Duration::from_secs(3),
        "{AGENT_UNIT} became active after {took:?}, before FlakeHub answered"
    );
    log(&format!(
        "{AGENT_UNIT} went {} in {:.1} s",
        states.join(" -> "),
        took.as_secs_f64()
    ));
    let status = c
        .exec(
            Duration::from_secs(10),
            "systemctl",
            &["status", "--no-pager", AGENT_UNIT],
        )
        .stdout;
    let status = String::from_utf8_lossy(&status);
    let expected = format!("Status: \"up to date: {v2}\"");
    assert!(
        status.contains(&expected),
        "systemctl status lacks {expected}:\n{status}"
    );
    log(&format!("systemctl status shows {expected}"));
    let s = read_state(&root);
    assert_eq!(s["deploys"], 2, "{s:#}");
    assert_eq!(fh_log(&root).len(), 2, "no further apply");
    c.run("systemctl", &["stop", AGENT_UNIT]);
    log(&format!(
        "done; cleaning up (total {:.1} s)",
        t0.elapsed().as_secs_f64()
    ));
}

fn read_state_opt(root: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(root.join("state/state.json")).ok()?;
    serde_json::from_str(&text).ok()
}

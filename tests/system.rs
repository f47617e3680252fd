//! The system test: a freshly booted server, from the metadata service to a deployed release,
//! a rollback, a crash in the middle of an apply and a hung agent.
//!
//! The server is the host's own Debian booted with `systemd-nspawn --volatile=yes` (systemd as
//! PID 1, journald, D-Bus, networkd, hostnamed). The project's unit files are installed as the
//! NixOS module installs them: rendered from `nixos-module/units/` with the store paths filled
//! in, in `/etc/systemd/system` (a read-only bind, as NixOS links it from the store) with the
//! module's `wantedBy` links and the `overrides.conf` drop-in NixOS writes for each, whose
//! `Environment=PATH=` is NixOS's default service path (coreutils, findutils, gnugrep, gnused,
//! systemd; modelled by links to this machine's programs of the same packages, nothing else), so
//! an agent that looked for fh, nix or determinate-nixd in `PATH` fails here as on NixOS. Stand-ins, in a neighbouring network namespace joined by a veth
//! pair: the Hetzner metadata service at 169.254.169.254 (the fixture
//! `metadata.full-example.yaml` and user-data with a token and a reference) and the FlakeHub API
//! at 169.254.169.253:8080. Inside the server: the `fh` and `determinate-nixd` stand-ins
//! (`harness::scripts`), and
//! a real Nix store of the test's own mounted at `/nix`: every release is a real store path
//! (`nix-store --add`) whose `bin/switch-to-configuration` is a script, and the system profile has
//! real generations (`nix-env --set`, by fh's stand-in and by the agent's rollback).
//!
//! Steps, each asserted (see the log it prints):
//! 1. Boot: network unit before networkd and `network-online.target`; static IPv6 and the
//!    default route via fe80::1 on eth0 (the fixture's MAC); hostname through hostnamed; SSH key
//!    file in place, root-only.
//! 2. The agent (`Type=notify`) is active only after READY=1, which comes once it has read the
//!    user-data and logged in through determinate-nixd, as its first step begins; it deploys the
//!    release in transient units; the token is nowhere in the journal; `hcloud-nixos status` and
//!    `systemctl status` say so.
//! 3. A new release is deployed within one poll interval; `hcloud-nixos check` makes the next
//!    one immediate.
//! 4. A release whose activation restarts the agent's unit: the deploy completes, recorded once.
//! 5. A broken release: rolled back (profile and system), quarantined, status says why.
//! 6. The server is killed in the middle of an activation and booted again: the interrupted
//!    activation runs once more, the deploy is recorded once, fh is not run again.
//! 7. A hung agent (SIGSTOP) is restarted by systemd's watchdog.
//! 8. A release without the hcloud-nixos module (no agent unit, no agent configuration) is
//!    fetched but refused before activation: quarantined with how to override, nothing activated,
//!    the profile back, the agent still running.
//!
//! Run: `cargo test --test system -- --nocapture` (as root; needs systemd-container, nix-bin,
//! nftables, curl). Skips without them, or fails under `CI=true`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::container::netns::{self, poll};
use harness::container::{self, Container, ContainerNet, NspawnSettings, Spec};
use harness::flakehub::FlakeHub;
use harness::metadata::{Documents, MetadataServer};
use harness::nix_store;
use harness::scripts::{Activation, DeterminateNixd, Fh, Profile, Switch};
use harness::units;

const HUB_IP: &str = "169.254.169.253";
const HUB_PORT: u16 = 8080;
const ORG: &str = "hcloud-test";
const FLAKE: &str = "infra";
const ATTR: &str = "nixosConfigurations.web";
const TOKEN: &str = "flakehub1_systemtest_SECRET_7f3a9c21d4e5";
/// The fixture's public NIC.
const MAC: &str = "96:00:03:aa:bb:cc";
const HOSTNAME: &str = "my-nixos-server";
const IPV6: &str = "2a01:4f8:c012:abcd::1/64";
const SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBjYTHGYkNK7DZ4Gn0NGN1sjFUVapus4GXybEYg/ylcA alice@laptop";
/// Stands in for the IPv4 address Hetzner's DHCP hands out (there is no DHCP server here).
const GUEST_IPV4: &str = "169.254.10.2/16";
const AGENT: &str = "hcloud-nixos-agent.service";
const NETWORK: &str = "hcloud-nixos-network.service";
const POLL: Duration = Duration::from_secs(15);
const TOOLS: &[&str] = &[
    "systemd-nspawn",
    "nsenter",
    "ip",
    "sh",
    "nix-store",
    "nix-env",
    "nft",
    "curl",
    "/lib/systemd/systemd-networkd",
    "/lib/systemd/systemd-hostnamed",
];

/// What a release's `switch-to-configuration` does besides pointing current-system at itself.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Plain,
    /// Restarts `hcloud-nixos-agent.service`, as a real switch does when the unit changed.
    RestartsAgent,
    /// Fails the way a switch with a failing service does: exit status 4.
    Broken,
    /// Sleeps `<root>/switch-delay` seconds before switching.
    Slow,
    /// A plain system without the hcloud-nixos module (no agent unit, no agent configuration).
    WithoutModule,
}

fn version(n: u32) -> String {
    format!("0.1.{n}+rev-{:0>40}", format!("{n}abc"))
}

/// Release `n`'s `switch-to-configuration`: switch and test activate it (current-system points at
/// it), boot and dry-activate change nothing; each run leaves `<n> <action> start`, then `done`
/// or `failed`, in `<root>/activations.log`.
fn switch(root: &Path, n: u32, kind: Kind) -> Switch {
    Switch {
        name: n.to_string(),
        current: root.join("current-system"),
        log: root.join("activations.log"),
        times: None,
        flags: None,
        delay_file: (kind == Kind::Slow).then(|| root.join("switch-delay")),
        activation: match kind {
            Kind::Plain | Kind::Slow | Kind::WithoutModule => Activation::Switches,
            Kind::RestartsAgent => Activation::RestartsUnit {
                unit: AGENT.into(),
                unless_previous_has: "agent-unit-v2".into(),
            },
            Kind::Broken => Activation::Exit4,
        },
    }
}

/// fh's stand-in: resolves the output at FlakeHub with the login determinate-nixd holds, makes it
/// the system profile's new generation (real `nix-env --set`; the closure is already in the
/// store, as after a download) and runs its switch-to-configuration, ignoring its status and
/// exiting 0 (as fh does). Like fh, it finds Nix in `PATH`.
fn fh(root: &Path) -> Fh {
    Fh {
        api: format!("http://{HUB_IP}:{HUB_PORT}"),
        token_file: root.join("nixd/token"),
        log: root.join("fh-argv.log"),
        profile: Profile::Generation("/nix/var/nix/profiles/system".into()),
        delay_file: None,
        env: Vec::new(),
    }
}

/// determinate-nixd's stand-in: `login token --token-file FILE` keeps the token (as the daemon
/// does, for fh and Nix), `status` says whether it holds one.
fn determinate_nixd(root: &Path) -> DeterminateNixd {
    DeterminateNixd {
        dir: root.join("nixd"),
        log: root.join("nixd/argv.log"),
        valid_token: Some(TOKEN.into()),
    }
}

/// `/etc/hcloud-nixos/agent.toml` as the module renders it, with the test's paths. The reference
/// and the token come from the user-data.
fn agent_config(root: &Path) -> String {
    let r = root.display();
    format!(
        r#"poll_interval = "{poll}s"
confirm_timeout = "20s"

[flakehub]
api_url = "http://{HUB_IP}:{HUB_PORT}"

[apply]
timeout = "90s"

[paths]
# On the shared directory, so that it survives the reboot in step 6 (the container's root is a
# tmpfs). The system profile is the real default, /nix/var/nix/profiles/system.
state_dir = "{r}/state"
current_system = "{r}/current-system"
booted_system = "{r}/booted-system"
# Every program by absolute path, as the NixOS module renders them: the unit's PATH is NixOS's.
fh = "{r}/bin/fh"
determinate_nixd = "{r}/bin/determinate-nixd"
nix = "{r}/nix-package/bin/nix"
nix_env = "{r}/nix-package/bin/nix-env"
"#,
        poll = POLL.as_secs()
    )
}

fn user_data() -> String {
    format!(
        "#cloud-config\nhcloud_nixos:\n  flakehub_token: {TOKEN}\n  flake: {ORG}/{FLAKE}/0.1#{ATTR}\n"
    )
}

/// `/etc/systemd/system` of the server (see `harness::units::nixos_unit_dir`).
fn prepare_units(root: &Path, package: &Path) -> PathBuf {
    units::nixos_unit_dir(root, package, &root.join("nix"))
}

fn read_state(root: &Path) -> serde_json::Value {
    std::fs::read_to_string(root.join("state/state.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn out_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The server: the container and what the test knows about it.
struct Server<'a> {
    c: Container,
    root: &'a Path,
}

impl Server<'_> {
    /// Runs `journalctl ARGS` in the server with its output in a file of the shared directory:
    /// `netns::output_within` reads pipes only after the command ended, so more than a pipe
    /// buffer (64 KiB) of output would block it.
    fn journalctl(&self, args: &[String]) -> String {
        let file = self.root.join("journal.out");
        let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
        let out = self.c.exec(
            Duration::from_secs(30),
            "sh",
            &[
                "-c",
                &format!(
                    "journalctl --no-pager {} > '{}' 2>&1",
                    quoted.join(" "),
                    file.display()
                ),
            ],
        );
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let _ = std::fs::remove_file(&file);
        assert!(
            out.status.success() || !text.is_empty(),
            "journalctl {args:?}: {}",
            out_text(&out)
        );
        text
    }

    fn journal(&self, args: &[&str]) -> String {
        let mut all = vec!["-o".to_string(), "short-monotonic".to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        self.journalctl(&all)
    }

    fn agent_journal(&self) -> String {
        self.journal(&["-u", AGENT, "-u", "hcloud-nixos-*"])
    }

    fn journal_json(&self, args: &[&str]) -> Vec<serde_json::Value> {
        let mut all = vec!["-o".to_string(), "json".to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        self.journalctl(&all)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn mono(&self, unit: &str, property: &str) -> u64 {
        self.c.unit_property(unit, property).parse().unwrap_or(0)
    }

    fn readlink(&self, path: &str) -> String {
        out_text(
            &self
                .c
                .exec(Duration::from_secs(10), "readlink", &["-f", path]),
        )
        .trim()
        .to_string()
    }

    fn current(&self) -> String {
        self.readlink(&self.root.join("current-system").display().to_string())
    }

    fn profile(&self) -> String {
        self.readlink("/nix/var/nix/profiles/system")
    }

    fn generations(&self) -> usize {
        let out = self.c.exec(
            Duration::from_secs(10),
            "nix-env",
            &["-p", "/nix/var/nix/profiles/system", "--list-generations"],
        );
        String::from_utf8_lossy(&out.stdout).lines().count()
    }

    fn status(&self) -> String {
        out_text(
            &self
                .c
                .exec(Duration::from_secs(10), "hcloud-nixos", &["status"]),
        )
    }

    fn systemctl_status(&self) -> String {
        out_text(&self.c.exec(
            Duration::from_secs(10),
            "systemctl",
            &["status", "--no-pager", "--lines=0", AGENT],
        ))
    }

    /// Waits until `state.json` satisfies `f`; panics with the agent's journal if not.
    fn wait_state(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let ok = poll(timeout, Duration::from_millis(200), || {
            f(&read_state(self.root))
        });
        let s = read_state(self.root);
        assert!(
            ok,
            "{what}: not within {timeout:?}\n{}state.json: {s:#}\n--- journal ---\n{}",
            race_note(&self.stopped_steps()),
            self.agent_journal()
        );
        s
    }

    /// Journal lines in which systemd stops a step unit that still runs. The agent stops step
    /// units only when they time out (none does in this test); otherwise this is the race of
    /// [`race_note`].
    fn stopped_steps(&self) -> Vec<String> {
        self.journal(&["-u", "hcloud-nixos-*"])
            .lines()
            .filter(|l| {
                ["fetch", "activate", "rollback"]
                    .iter()
                    .any(|k| l.contains(&format!("Stopping hcloud-nixos-{k}-")))
            })
            .map(str::to_string)
            .collect()
    }
}

/// What it means when the agent stopped a step unit right after starting it.
fn race_note(stopped: &[String]) -> String {
    if stopped.is_empty() {
        return String::new();
    }
    format!(
        "RACE (src/agent/apply.rs Applier::wait, src/agent/systemd.rs UnitStatus::finished): the agent stopped a \
         step unit it had just started. StartTransientUnit returns once the start job is queued; \
         if the first GetUnit comes before the job ran, ActiveState is still \"inactive\", \
         finished() says true (Result=success, status 0: \"finished successfully\"), and run_step's \
         forget() sends StopUnit, which kills fh or switch-to-configuration. Lines:\n{}\n",
        stopped.join("\n")
    )
}

/// Records the race of [`race_note`] once per journal line, without stopping the scenario.
fn check_race(srv: &Server, seen: &mut Vec<String>, failures: &mut Vec<String>) {
    let new: Vec<String> = srv
        .stopped_steps()
        .into_iter()
        .filter(|l| !seen.contains(l))
        .collect();
    if !new.is_empty() {
        seen.extend(new.iter().cloned());
        let note = race_note(&new);
        eprintln!("FAILED: {note}");
        failures.push(note);
    }
}

fn deploys(s: &serde_json::Value) -> u64 {
    s["deploys"].as_u64().unwrap_or(0)
}

fn count(lines: &[String], exact: &str) -> usize {
    lines.iter().filter(|l| *l == exact).count()
}

#[test]
fn a_server_boots_deploys_rolls_back_and_recovers() {
    if !netns::can_run("system", TOOLS) {
        return;
    }
    let t0 = Instant::now();
    // Failures that need not stop the scenario (the later steps still run and report); the test
    // fails at the end if there are any.
    let mut failures: Vec<String> = Vec::new();
    let mut races_seen: Vec<String> = Vec::new();
    let log = |msg: &str| eprintln!("[{}] {msg}", container::elapsed(t0));
    let step = |msg: &str| eprintln!("\n[{}] ===== {msg}", container::elapsed(t0));
    let id = netns::unique();

    // Dropped in reverse order: container, stand-ins, namespaces, then the directory.
    step("SETUP: a shared directory, the network, the stand-ins, the releases");
    let tmp = container::shared_tempdir("system-");
    let root = tmp.path().to_path_buf();
    log(&format!(
        "shared directory {} (bind-mounted into the server at the same path)",
        root.display()
    ));
    let net = ContainerNet::new(
        &id,
        GUEST_IPV4,
        &["169.254.169.254/16", &format!("{HUB_IP}/16")],
    );
    // A fresh server's NIC: the fixture's MAC, no address yet, down.
    let fresh_nic = || {
        net.guest.ip(&["link", "set", "eth0", "down"]);
        net.guest.ip(&["addr", "flush", "dev", "eth0"]);
        net.guest.ip(&["link", "set", "eth0", "address", MAC]);
    };
    fresh_nic();
    log(&format!(
        "network namespaces: server {} (eth0 {MAC}, no address, down), stand-ins {} (169.254.169.254, {HUB_IP})",
        net.guest.name, net.standins.name
    ));
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hetzner-metadata");
    std::fs::write(root.join("user-data"), user_data()).unwrap();
    let docs = Documents::from_files(
        &fixtures.join("metadata.full-example.yaml"),
        None,
        Some(&root.join("user-data")),
    )
    .expect("fixtures");
    let metadata = MetadataServer::start_in_netns(&net.standins.name, "169.254.169.254:80", docs)
        .expect("metadata stand-in");
    let hub = FlakeHub::start_in_netns(&net.standins.name, &format!("{HUB_IP}:{HUB_PORT}"))
        .expect("FlakeHub stand-in");
    hub.require_token(Some(TOKEN));
    log(
        "stand-ins listening: metadata service (metadata.full-example.yaml; user-data with token and reference), FlakeHub API",
    );

    // Releases: real store paths in the test's own store (<root>/nix, /nix in the server).
    let kinds = [
        Kind::Plain,         // 0: the system the server was installed with
        Kind::Plain,         // 1: step 2
        Kind::Plain,         // 2: step 3, by polling
        Kind::Plain,         // 3: step 3, by `hcloud-nixos check`
        Kind::RestartsAgent, // 4: step 4
        Kind::Broken,        // 5: step 5
        Kind::Slow,          // 6: step 6
        Kind::WithoutModule, // 7: step 8
    ];
    let mut systems = Vec::new();
    for (n, kind) in kinds.iter().enumerate() {
        let dir = root.join("build").join(format!("nixos-system-web-{n}"));
        switch(&root, n as u32, *kind).install_into(&dir);
        std::fs::write(dir.join("nixos-version"), version(n as u32)).unwrap();
        if *kind != Kind::WithoutModule {
            units::install_module_into(&dir, &agent_config(&root));
        }
        if n >= 4 {
            // From system 4 on, the agent's unit is a different one (a real switch restarts a
            // unit that changed, and only then).
            std::fs::write(dir.join("agent-unit-v2"), "").unwrap();
        }
        systems.push(nix_store::store_add(&root, &dir));
    }
    let profile = root.join("nix/var/nix/profiles/system");
    nix_store::profile_set(&root, &profile, &systems[0]);
    std::os::unix::fs::symlink(&systems[0], root.join("current-system")).unwrap();
    std::os::unix::fs::symlink(&systems[0], root.join("booted-system")).unwrap();
    log(&format!(
        "8 systems added to the store with nix-store --add (system 0 runs: {}); the profile's generation 1 is system 0",
        systems[0]
    ));

    // Nix as a package of its own (on NixOS: a store path whose bin has nix and its nix-env and
    // nix-store, nothing else; fh's stand-in looks a store path up with nix-store).
    std::fs::create_dir_all(root.join("nix-package/bin")).unwrap();
    for program in ["nix", "nix-env", "nix-store"] {
        std::os::unix::fs::symlink(
            format!("/usr/bin/{program}"),
            root.join("nix-package/bin").join(program),
        )
        .unwrap();
    }
    fh(&root).install(&root.join("bin/fh"));
    determinate_nixd(&root).install(&root.join("bin/determinate-nixd"));
    std::fs::create_dir_all(root.join("nixd")).unwrap();
    std::fs::write(root.join("switch-delay"), "0").unwrap();
    std::fs::write(root.join("agent.toml"), agent_config(&root)).unwrap();
    let package = units::package_dir(&root);
    let unit_dir = prepare_units(&root, &package);
    // Hetzner's DHCP would give eth0 an IPv4 address; a networkd drop-in for the file the network
    // unit writes gives it the link-local one the stand-ins are reached from.
    let network_dropins = root.join("etc-systemd-network");
    let dropin = network_dropins.join("50-hcloud-nixos-public-960003aabbcc.network.d");
    std::fs::create_dir_all(&dropin).unwrap();
    std::fs::write(
        dropin.join("90-system-test-ipv4.conf"),
        format!(
            "# System test only: stands in for the DHCPv4 lease.\n[Network]\nAddress={GUEST_IPV4}\n"
        ),
    )
    .unwrap();
    log(
        "units rendered from nixos-module/units/ into /etc/systemd/system with the module's wantedBy links; /etc/hcloud-nixos/agent.toml written",
    );

    let spec = |boot: u32| Spec {
        machine: format!("hcn-sys{boot}-{id}"),
        netns: net.guest.name.clone(),
        bind_ro: vec![
            (unit_dir.clone(), PathBuf::from("/etc/systemd/system")),
            (
                root.join("agent.toml"),
                PathBuf::from("/etc/hcloud-nixos/agent.toml"),
            ),
            (
                network_dropins.clone(),
                PathBuf::from("/etc/systemd/network"),
            ),
            (PathBuf::from("/etc/ssl"), PathBuf::from("/etc/ssl")),
            // `hcloud-nixos status` and `check` for the operator, as environment.systemPackages.
            (package.join("bin"), PathBuf::from("/usr/local/bin")),
        ],
        bind: vec![root.clone()],
        console_log: root.join(format!("console-{boot}.log")),
    };

    // The first release is there before the server boots: the agent deploys it at boot.
    let v = |n: usize| version(n as u32);
    hub.publish(ORG, FLAKE, &v(1), ATTR, &systems[1]);
    log(&format!("published release {} -> system 1", v(1)));

    // ---- Step 1: boot ----------------------------------------------------------------------
    step("STEP 1: boot the server");
    let t_boot = Instant::now();
    let machine1 = spec(1);
    let caps1 = NspawnSettings::net_admin(&machine1.machine);
    log(&format!(
        "{} grants the server CAP_NET_ADMIN (nspawn gives it only with --private-network; networkd needs it)",
        caps1.0.display()
    ));
    let c = Container::boot(&machine1);
    let srv = Server { c, root: &root };
    let state = srv.c.system_state();
    log(&format!(
        "booted in {:.1} s: systemd PID 1 is host PID {}; is-system-running: {state}",
        t_boot.elapsed().as_secs_f64(),
        srv.c.init
    ));
    let failed = srv.c.units("--state=failed");
    assert!(
        failed.is_empty(),
        "failed units after boot: {failed:?}\n{}",
        srv.journal(&["-b"])
    );
    assert_eq!(
        srv.c.unit_state(NETWORK),
        "active/exited",
        "{}",
        srv.journal(&["-u", NETWORK])
    );
    let net_done = srv.mono(NETWORK, "ActiveEnterTimestampMonotonic");
    let networkd_start = srv.mono(
        "systemd-networkd.service",
        "ExecMainStartTimestampMonotonic",
    );
    let online = srv.mono("network-online.target", "ActiveEnterTimestampMonotonic");
    assert!(
        net_done > 0 && networkd_start > net_done && online > net_done,
        "order: network unit done at {net_done} us, networkd started at {networkd_start} us, network-online.target at {online} us"
    );
    log(&format!(
        "{NETWORK} finished at {:.3} s, before systemd-networkd started ({:.3} s) and network-online.target ({:.3} s) [monotonic]",
        net_done as f64 / 1e6,
        networkd_start as f64 / 1e6,
        online as f64 / 1e6
    ));
    let mut nctl = String::new();
    let configured = poll(Duration::from_secs(20), Duration::from_millis(250), || {
        nctl = out_text(&srv.c.exec(
            Duration::from_secs(10),
            "networkctl",
            &["status", "--no-pager", "eth0"],
        ));
        let route = srv.c.exec(
            Duration::from_secs(10),
            "ip",
            &["-6", "route", "show", "default"],
        );
        nctl.contains("2a01:4f8:c012:abcd::1")
            && String::from_utf8_lossy(&route.stdout).contains("via fe80::1 dev eth0")
    });
    let routes = out_text(&srv.c.exec(Duration::from_secs(10), "ip", &["-6", "route"]));
    assert!(
        configured,
        "networkctl status eth0:\n{nctl}\nip -6 route:\n{routes}"
    );
    assert!(
        nctl.contains("50-hcloud-nixos-public-960003aabbcc.network") && nctl.contains(MAC),
        "networkctl status eth0:\n{nctl}"
    );
    let addrs = out_text(&srv.c.exec(
        Duration::from_secs(10),
        "ip",
        &["-6", "addr", "show", "dev", "eth0"],
    ));
    assert!(addrs.contains(IPV6), "{addrs}");
    log(&format!(
        "networkd manages eth0 ({MAC}) with 50-hcloud-nixos-public-960003aabbcc.network: {IPV6}, default route via fe80::1 dev eth0"
    ));
    let host = srv
        .c
        .run("hostnamectl", &["--transient"])
        .trim()
        .to_string();
    let static_host = out_text(
        &srv.c
            .exec(Duration::from_secs(10), "hostnamectl", &["--static"]),
    );
    let uname = srv.c.run("uname", &["-n"]).trim().to_string();
    assert_eq!(host, HOSTNAME);
    assert_eq!(uname, HOSTNAME);
    assert!(
        !static_host.contains(HOSTNAME),
        "the static hostname was not to be written: {static_host}"
    );
    let hostnamed = srv.journal(&["-u", "systemd-hostnamed.service"]);
    assert!(
        hostnamed.contains(HOSTNAME),
        "hostnamed's journal does not mention the new hostname:\n{hostnamed}"
    );
    log(&format!(
        "hostname: transient '{host}' set through systemd-hostnamed (no /etc/hostname), uname -n agrees"
    ));
    let keys = srv.c.sh("stat -c '%a %U:%G' /run/hcloud-nixos/authorized_keys/root; cat /run/hcloud-nixos/authorized_keys/root");
    let mut kl = keys.lines();
    assert_eq!(kl.next(), Some("600 root:root"), "{keys}");
    let key_lines: Vec<&str> = kl.filter(|l| !l.starts_with('#')).collect();
    assert_eq!(key_lines, [SSH_KEY], "{keys}");
    let dirmode = srv
        .c
        .sh("stat -c '%a %U' /run/hcloud-nixos/authorized_keys");
    log(&format!(
        "/run/hcloud-nixos/authorized_keys/root: mode 600 root:root (directory {}), alice's key",
        dirmode.trim()
    ));
    let fw = srv
        .c
        .run("nft", &["list", "table", "inet", "hcloud_nixos_metadata"]);
    assert!(fw.contains("169.254.169.254"), "{fw}");
    log("the metadata firewall table is loaded (only root reaches 169.254.169.254)");

    // ---- Step 2: the agent's first deploy ------------------------------------------------------
    step(
        "STEP 2: the agent starts (Type=notify), reads the user-data, logs in and deploys the published release",
    );
    assert_eq!(srv.c.unit_property(AGENT, "Type"), "notify");
    let fragment = srv.c.unit_property(AGENT, "FragmentPath");
    assert_eq!(fragment, format!("/etc/systemd/system/{AGENT}"));
    let exec = srv.c.unit_property(AGENT, "ExecStart");
    assert!(
        exec.contains(&format!("{}/bin/hcloud-nixos", package.display())),
        "{exec}"
    );
    log(&format!(
        "{AGENT} is the module's unit ({fragment}, ExecStart from the package)"
    ));
    let dropins = srv.c.unit_property(AGENT, "DropInPaths");
    assert!(
        dropins.contains(&format!("/etc/systemd/system/{AGENT}.d/overrides.conf")),
        "{dropins}"
    );
    let environment = srv.c.unit_property(AGENT, "Environment");
    let unit_path = environment
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or_default()
        .to_string();
    assert!(
        unit_path.contains("nixos-default-path/coreutils/bin") && !unit_path.contains("/usr/bin"),
        "the unit's PATH is NixOS's default, from overrides.conf: {environment}"
    );
    log(&format!(
        "NixOS's drop-in overrides.conf is in place: the unit's PATH is NixOS's default ({unit_path}), without fh, nix or determinate-nixd"
    ));
    let journal = srv.agent_journal();
    for line in [
        format!("program for fetch: {}/bin/fh apply nixos", root.display()),
        format!(
            "program for roll back the profile: {}/nix-package/bin/nix-env --set",
            root.display()
        ),
        format!(
            "program for log in: {}/bin/determinate-nixd login token",
            root.display()
        ),
    ] {
        assert!(journal.contains(&line), "'{line}' not in:\n{journal}");
    }
    log(
        "the agent said at start which program runs each step (absolute paths from its configuration)",
    );
    assert_eq!(
        srv.c.unit_state(AGENT),
        "active/running",
        "{}",
        srv.agent_journal()
    );
    // READY=1 goes out once the agent has read the user-data, logged in and found a release
    // to deploy, at the latest when its first cycle starts a step (an activation may restart
    // this very unit, and systemd runs that restart only once the start is done).
    let started = srv.mono(AGENT, "ExecMainStartTimestampMonotonic");
    let active = srv.mono(AGENT, "ActiveEnterTimestampMonotonic");
    let agent_entries = srv.journal_json(&["-u", AGENT]);
    let at = |prefix: &str| {
        agent_entries
            .iter()
            .find(|e| e["MESSAGE"].as_str().is_some_and(|m| m.starts_with(prefix)))
            .and_then(|e| e["__MONOTONIC_TIMESTAMP"].as_str()?.parse::<u64>().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no '{prefix}' in the agent's journal:\n{}{}",
                    race_note(&srv.stopped_steps()),
                    srv.agent_journal()
                )
            })
    };
    let logged_in = at("logged in to FlakeHub");
    let confirmed = at("deploy confirmed");
    let first_step = srv
        .journal_json(&["-u", "hcloud-nixos-fetch-*"])
        .iter()
        .filter_map(|e| e["__MONOTONIC_TIMESTAMP"].as_str()?.parse::<u64>().ok())
        .min()
        .unwrap_or(0);
    assert!(
        started < logged_in && logged_in < active && active < confirmed,
        "started {started}, logged in {logged_in}, unit active {active}, deploy confirmed {confirmed} (us, monotonic)\n{}{}",
        race_note(&srv.stopped_steps()),
        srv.agent_journal()
    );
    // The fetch unit starts right after READY=1 is sent; systemd may read the two sockets in
    // either order.
    assert!(
        active <= first_step + 200_000,
        "active at {active} us, the first step's unit at {first_step} us"
    );
    log(&format!(
        "{AGENT}: started at {:.3} s, logged in at {:.3} s, active (READY=1) at {:.3} s as its first step began ({:.3} s), deploy confirmed at {:.3} s [monotonic]",
        started as f64 / 1e6,
        logged_in as f64 / 1e6,
        active as f64 / 1e6,
        first_step as f64 / 1e6,
        confirmed as f64 / 1e6
    ));
    let userdata_requests = metadata.requests("userdata");
    assert!(
        userdata_requests >= 1,
        "the agent never asked for the user-data"
    );
    log(&format!(
        "the metadata service served the user-data {userdata_requests} time(s)"
    ));
    let nixd = lines(&root.join("nixd/argv.log"));
    assert!(
        nixd.iter()
            .any(|l| l.starts_with("login token --token-file /run/hcloud-nixos/flakehub-token.")),
        "determinate-nixd calls: {nixd:?}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("nixd/token"))
            .unwrap()
            .trim(),
        TOKEN
    );
    let leftover = srv
        .c
        .sh("ls /run/hcloud-nixos/ | grep -c flakehub-token || true");
    assert_eq!(
        leftover.trim(),
        "0",
        "the token file for determinate-nixd was left behind"
    );
    log(&format!(
        "logged in: determinate-nixd got the token through a file that is gone again; calls: {nixd:?}"
    ));
    let s = read_state(&root);
    assert_eq!(deploys(&s), 1, "{s:#}");
    assert_eq!(s["last_deploy"]["version"], v(1).as_str(), "{s:#}");
    assert_eq!(s["last_deploy"]["outcome"], "success", "{s:#}");
    assert_eq!(srv.current(), systems[1]);
    assert_eq!(srv.profile(), systems[1]);
    assert_eq!(
        srv.generations(),
        2,
        "profile generations: system 0, system 1"
    );
    let fh = lines(&root.join("fh-argv.log"));
    assert_eq!(
        fh,
        [format!(
            "apply nixos {ORG}/{FLAKE}/={}#{ATTR} dry-activate",
            v(1)
        )]
    );
    assert_eq!(
        lines(&root.join("activations.log")),
        [
            "1 dry-activate start",
            "1 dry-activate done",
            "1 switch start",
            "1 switch done"
        ]
    );
    log(&format!(
        "deployed {}: fh ran once ({}), system 1 activated once, profile generation 2 -> system 1",
        v(1),
        fh[0]
    ));
    let steps = srv.journal_json(&[
        "-u",
        "hcloud-nixos-fetch-*",
        "-u",
        "hcloud-nixos-activate-*",
    ]);
    let unit_of = |msg: &str| {
        steps
            .iter()
            .find(|e| e["MESSAGE"] == msg)
            .and_then(|e| e["_SYSTEMD_UNIT"].as_str())
            .unwrap_or("")
            .to_string()
    };
    let (fetch_unit, activate_unit) = (
        unit_of("fh stand-in: done"),
        unit_of("switch-to-configuration switch of system 1: active"),
    );
    assert!(
        fetch_unit.starts_with("hcloud-nixos-fetch-"),
        "fh's output came from {fetch_unit:?}"
    );
    assert!(
        activate_unit.starts_with("hcloud-nixos-activate-"),
        "the activation's output came from {activate_unit:?}"
    );
    let left = [
        srv.c.units("hcloud-nixos-fetch-*"),
        srv.c.units("hcloud-nixos-activate-*"),
    ]
    .concat();
    assert!(left.is_empty(), "step units still loaded: {left:?}");
    log(&format!(
        "journal: fh ran in {fetch_unit}, the activation in {activate_unit}; both unloaded since"
    ));
    let export = srv.journalctl(&["-o".to_string(), "export".to_string()]);
    assert!(
        export.len() > 10_000,
        "the journal export is suspiciously short"
    );
    assert!(!export.contains(TOKEN), "the token is in the journal");
    for f in [
        "console-1.log",
        "state/state.json",
        "fh-argv.log",
        "nixd/argv.log",
    ] {
        assert!(
            !std::fs::read_to_string(root.join(f))
                .unwrap_or_default()
                .contains(TOKEN),
            "the token is in {f}"
        );
    }
    log(&format!(
        "the token appears nowhere in the journal ({} KiB, every field of every entry), the console, state.json or the stand-ins' logs",
        export.len() / 1024
    ));
    let status = srv.status();
    assert!(
        status.contains(&format!("status:       up to date: {}", v(1))),
        "{status}"
    );
    assert!(
        status.contains(&format!("running:      {} ({})", v(1), systems[1])),
        "{status}"
    );
    assert!(status.contains("deploys:      1"), "{status}");
    let sc = srv.systemctl_status();
    assert!(
        sc.contains(&format!("Status: \"up to date: {}", v(1))),
        "{sc}"
    );
    log("`hcloud-nixos status` says:");
    eprint!("{status}");
    log(&format!(
        "`systemctl status {AGENT}` says: {}",
        sc.lines()
            .find(|l| l.contains("Status:"))
            .unwrap_or("")
            .trim()
    ));

    // ---- Step 3: new releases, by polling and by `hcloud-nixos check` ------------------------
    check_race(&srv, &mut races_seen, &mut failures);
    step(&format!(
        "STEP 3: a new release is deployed within one poll interval ({} s, +-10%)",
        POLL.as_secs()
    ));
    let t = Instant::now();
    hub.publish(ORG, FLAKE, &v(2), ATTR, &systems[2]);
    log(&format!(
        "published {} -> system 2; waiting for the agent's next poll",
        v(2)
    ));
    let s = srv.wait_state(
        "release 2 deployed by polling",
        POLL + POLL / 10 + Duration::from_secs(15),
        |s| s["last_deploy"]["version"] == v(2).as_str() && s["in_flight"].is_null(),
    );
    check_race(&srv, &mut races_seen, &mut failures);
    let took = t.elapsed();
    assert_eq!(s["last_deploy"]["outcome"], "success", "{s:#}");
    assert_eq!(deploys(&s), 2);
    assert!(
        took <= POLL + POLL / 10 + Duration::from_secs(10),
        "took {took:?}"
    );
    assert_eq!(srv.current(), systems[2]);
    log(&format!(
        "deployed {} {:.1} s after it was published (poll interval {} s)",
        v(2),
        took.as_secs_f64(),
        POLL.as_secs()
    ));
    hub.publish(ORG, FLAKE, &v(3), ATTR, &systems[3]);
    let t = Instant::now();
    let asked = srv.c.run("hcloud-nixos", &["check"]);
    log(&format!(
        "published {} -> system 3 right after; `hcloud-nixos check` asked the agent (SIGUSR1){}",
        v(3),
        if asked.trim().is_empty() {
            String::new()
        } else {
            format!(": {}", asked.trim())
        }
    ));
    let s = srv.wait_state(
        "release 3 deployed after `hcloud-nixos check`",
        Duration::from_secs(12),
        |s| s["last_deploy"]["version"] == v(3).as_str() && s["in_flight"].is_null(),
    );
    check_race(&srv, &mut races_seen, &mut failures);
    let took = t.elapsed();
    assert_eq!(s["last_deploy"]["outcome"], "success", "{s:#}");
    assert_eq!(deploys(&s), 3);
    assert_eq!(srv.current(), systems[3]);
    assert!(
        srv.agent_journal().contains("check requested"),
        "the agent did not log the request"
    );
    log(&format!(
        "deployed {} {:.1} s after `check` (the next poll was at least {:.1} s away)",
        v(3),
        took.as_secs_f64(),
        (POLL - POLL / 10).as_secs_f64()
    ));

    // ---- Step 4: an activation that restarts the agent -----------------------------------------
    check_race(&srv, &mut races_seen, &mut failures);
    step("STEP 4: a release whose activation restarts hcloud-nixos-agent.service");
    let pid_before = srv.c.unit_property(AGENT, "MainPID");
    hub.publish(ORG, FLAKE, &v(4), ATTR, &systems[4]);
    srv.c.run("hcloud-nixos", &["check"]);
    log(&format!(
        "published {} -> system 4, whose switch-to-configuration runs `systemctl restart {AGENT}` (as a real switch does when the unit changed); agent PID {pid_before}; asked for a check",
        v(4)
    ));
    let deployed = |s: &serde_json::Value| {
        s["last_deploy"]["version"] == v(4).as_str() && s["in_flight"].is_null()
    };
    if !poll(Duration::from_secs(30), Duration::from_millis(200), || {
        deployed(&read_state(&root))
    }) {
        let st = read_state(&root);
        let act_unit = st["in_flight"]["unit"].as_str().unwrap_or("").to_string();
        let jobs = srv
            .c
            .run("systemctl", &["list-jobs", "--no-legend", "--no-pager"]);
        let failure = format!(
            "step 4: DEADLOCK. 30 s after the check {AGENT} is {} (its start job waits for READY=1), \
             {act_unit} is {} (switch-to-configuration waits in `systemctl restart {AGENT}` for that job), \
             and the restarted agent waits for {act_unit} before it sends READY=1 (journal: \
             \"a step started by an earlier agent is still running; waiting for it\"). Without help this \
             lasts until apply.timeout or TimeoutStartSec=15min, whichever ends first. Jobs:\n{jobs}",
            srv.c.unit_state(AGENT),
            srv.c.unit_state(&act_unit),
        );
        log(&format!("FAILED: {failure}"));
        failures.push(failure);
        let job = jobs
            .lines()
            .find(|l| l.contains(AGENT) && l.contains("start"))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no start job of {AGENT}: {jobs}"))
            .to_string();
        srv.c.run("systemctl", &["cancel", &job]);
        log(&format!(
            "to go on with the other steps: cancelled job {job} (the agent's start); `systemctl restart` in the activation returns"
        ));
    }
    let s = srv.wait_state("release 4 deployed", Duration::from_secs(60), deployed);
    check_race(&srv, &mut races_seen, &mut failures);
    assert_eq!(
        s["last_deploy"]["outcome"],
        "success",
        "{s:#}\n{}",
        srv.agent_journal()
    );
    assert_eq!(deploys(&s), 4, "recorded exactly once: {s:#}");
    let acts = lines(&root.join("activations.log"));
    assert_eq!(count(&acts, "4 switch start"), 1, "{acts:?}");
    assert_eq!(count(&acts, "4 switch done"), 1, "{acts:?}");
    let fh = lines(&root.join("fh-argv.log"));
    assert_eq!(
        fh.iter()
            .filter(|l| l.contains(&format!("={}#", v(4))))
            .count(),
        1,
        "{fh:?}"
    );
    assert_eq!(srv.current(), systems[4]);
    let ok = poll(Duration::from_secs(20), Duration::from_millis(200), || {
        srv.c.unit_state(AGENT) == "active/running"
    });
    assert!(
        ok,
        "{AGENT}: {}\n{}",
        srv.c.unit_state(AGENT),
        srv.agent_journal()
    );
    let pid_after = srv.c.unit_property(AGENT, "MainPID");
    assert_ne!(pid_before, pid_after, "the agent was not restarted");
    let j = srv.agent_journal();
    assert!(
        j.contains("a step started by an earlier agent is still running")
            || j.contains("a step finished while the agent was away"),
        "the restarted agent did not pick up the activation:\n{j}"
    );
    log(&format!(
        "deploy of {} completed and recorded once (deploys = 4); the agent restarted (PID {pid_before} -> {pid_after}) and picked up the activation it had started",
        v(4)
    ));

    // ---- Step 5: a broken release --------------------------------------------------------------
    check_race(&srv, &mut races_seen, &mut failures);
    step("STEP 5: a broken release is rolled back and quarantined");
    let gens = srv.generations();
    hub.publish(ORG, FLAKE, &v(5), ATTR, &systems[5]);
    srv.c.run("hcloud-nixos", &["check"]);
    log(&format!(
        "published {} -> system 5, whose switch-to-configuration exits 4 (a service failed); asked for a check",
        v(5)
    ));
    let s = srv.wait_state("release 5 rolled back", Duration::from_secs(60), |s| {
        s["last_deploy"]["version"] == v(5).as_str() && s["in_flight"].is_null()
    });
    check_race(&srv, &mut races_seen, &mut failures);
    assert_eq!(s["last_deploy"]["outcome"], "failed", "{s:#}");
    assert_eq!(deploys(&s), 5, "{s:#}");
    assert_eq!(s["counters"]["rollbacks_succeeded"], 1, "{s:#}");
    assert_eq!(s["quarantined"][0]["version"], v(5).as_str(), "{s:#}");
    let reason = s["quarantined"][0]["reason"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        reason.contains("switch-to-configuration switch"),
        "quarantine reason: {reason}"
    );
    assert_eq!(
        srv.current(),
        systems[4],
        "the running system is system 4 again"
    );
    assert_eq!(srv.profile(), systems[4], "the profile is system 4 again");
    assert_eq!(
        srv.generations(),
        gens + 2,
        "a generation for system 5 (fh), one back to system 4 (rollback)"
    );
    let acts = lines(&root.join("activations.log"));
    assert_eq!(
        &acts[acts.len() - 4..],
        [
            "5 switch start",
            "5 switch failed",
            "4 switch start",
            "4 switch done"
        ],
        "{acts:?}"
    );
    log(&format!(
        "rolled back: system 4 runs again (activated again, its own unit), the profile went 5 -> 4 (nix-env --set: now {} generations)",
        gens + 2
    ));
    log(&format!("quarantined {}: {reason}", v(5)));
    let status = srv.status();
    assert!(
        status.contains(&format!("deploy of {} failed and was rolled back", v(5))),
        "{status}"
    );
    assert!(
        status.contains(&format!("quarantined:  {}", v(5))),
        "{status}"
    );
    let sc = srv.systemctl_status();
    assert!(
        sc.contains(&format!(
            "Status: \"deploy of {} failed and was rolled back",
            v(5)
        )),
        "{sc}"
    );
    log("`hcloud-nixos status` says:");
    eprint!("{status}");
    srv.c.run("hcloud-nixos", &["check"]);
    let quarantined = poll(Duration::from_secs(10), Duration::from_millis(200), || {
        read_state(&root)["status"]
            .as_str()
            .is_some_and(|st| st.contains("is quarantined"))
    });
    assert!(quarantined, "status: {}", read_state(&root)["status"]);
    assert_eq!(
        count(&lines(&root.join("activations.log")), "5 switch start"),
        1,
        "tried again"
    );
    log(&format!(
        "another check leaves it alone: status \"{}\"",
        read_state(&root)["status"].as_str().unwrap_or("")
    ));

    // ---- Step 6: killed in the middle of an activation -----------------------------------------
    check_race(&srv, &mut races_seen, &mut failures);
    step("STEP 6: the server is killed in the middle of an activation and boots again");
    std::fs::write(root.join("switch-delay"), "120").unwrap();
    hub.publish(ORG, FLAKE, &v(6), ATTR, &systems[6]);
    srv.c.run("hcloud-nixos", &["check"]);
    log(&format!(
        "published {} -> system 6, whose activation takes 120 s; asked for a check",
        v(6)
    ));
    let s = srv.wait_state("release 6 activating", Duration::from_secs(30), |s| {
        s["in_flight"]["phase"] == "activate" && s["in_flight"]["unit"].is_string()
    });
    check_race(&srv, &mut races_seen, &mut failures);
    let ok = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        count(&lines(&root.join("activations.log")), "6 switch start") == 1
    });
    assert!(ok, "the activation of system 6 did not start");
    let d0 = deploys(&s);
    log(&format!(
        "{} is activating in {} (state.json: in flight, phase activate); killing the server (SIGKILL to nspawn and its init)",
        v(6),
        s["in_flight"]["unit"]
    ));
    check_race(&srv, &mut races_seen, &mut failures);
    drop(srv);
    fresh_nic();
    std::fs::write(root.join("switch-delay"), "0").unwrap();
    assert_eq!(read_state(&root)["in_flight"]["version"], v(6).as_str());
    log(
        "killed; the NIC is fresh again; booting the server again (same disk: state, current-system, /nix)",
    );
    let t_boot = Instant::now();
    let machine2 = spec(2);
    let _caps2 = NspawnSettings::net_admin(&machine2.machine);
    let srv = Server {
        c: Container::boot(&machine2),
        root: &root,
    };
    log(&format!(
        "booted again in {:.1} s: {}",
        t_boot.elapsed().as_secs_f64(),
        srv.c.system_state()
    ));
    assert_eq!(srv.c.unit_state(NETWORK), "active/exited");
    assert_eq!(
        srv.c.unit_state(AGENT),
        "active/running",
        "{}",
        srv.agent_journal()
    );
    // The agent is ready as soon as it carries on with the deploy; wait for the deploy's end.
    let s = srv.wait_state(
        "the interrupted deploy finished after the reboot",
        Duration::from_secs(60),
        |s| s["in_flight"].is_null(),
    );
    check_race(&srv, &mut races_seen, &mut failures);
    assert_eq!(
        s["last_deploy"]["outcome"],
        "success",
        "{s:#}\n{}",
        srv.agent_journal()
    );
    assert_eq!(deploys(&s), d0 + 1, "recorded exactly once: {s:#}");
    assert_eq!(s["last_deploy"]["version"], v(6).as_str(), "{s:#}");
    assert_eq!(srv.current(), systems[6]);
    assert_eq!(srv.profile(), systems[6]);
    let fh = lines(&root.join("fh-argv.log"));
    assert_eq!(
        fh.iter()
            .filter(|l| l.contains(&format!("={}#", v(6))))
            .count(),
        1,
        "fetched again: {fh:?}"
    );
    let acts = lines(&root.join("activations.log"));
    assert_eq!(count(&acts, "6 switch start"), 2, "{acts:?}");
    assert_eq!(count(&acts, "6 switch done"), 1, "{acts:?}");
    for f in ["console-1.log", "console-2.log"] {
        let text = std::fs::read_to_string(root.join(f)).unwrap_or_default();
        assert!(!text.contains(TOKEN), "the token is in {f}");
    }
    let j = srv.agent_journal();
    assert!(
        j.contains("the activation was interrupted before it finished; starting it again"),
        "{j}"
    );
    log(&format!(
        "after the reboot the agent ran the interrupted activation once more; {} recorded once (deploys = {}), fh not run again, system 6 runs",
        v(6),
        d0 + 1
    ));

    // ---- Step 7: the watchdog ------------------------------------------------------------------
    check_race(&srv, &mut races_seen, &mut failures);
    step("STEP 7: a hung agent is restarted by systemd's watchdog");
    let dropin_dir = "/run/systemd/system/hcloud-nixos-agent.service.d";
    srv.c.sh(&format!(
        "mkdir -p {dropin_dir} && printf '# System test only: the unit has WatchdogSec=2min.\\n[Service]\\nWatchdogSec=5s\\nLimitCORE=0\\n' > {dropin_dir}/50-system-test-watchdog.conf && systemctl daemon-reload"
    ));
    log(&format!(
        "a runtime drop-in ({dropin_dir}/50-system-test-watchdog.conf, test only) sets WatchdogSec=5s instead of 2min (and no core dumps); restarting the agent so it pings every 2.5 s"
    ));
    let out = srv
        .c
        .exec(Duration::from_secs(60), "systemctl", &["restart", AGENT]);
    assert!(
        out.status.success(),
        "{}\n{}",
        out_text(&out),
        srv.agent_journal()
    );
    assert_eq!(srv.c.unit_property(AGENT, "WatchdogUSec"), "5s");
    let pid = srv.c.unit_property(AGENT, "MainPID");
    let restarts: u32 = srv.c.unit_property(AGENT, "NRestarts").parse().unwrap_or(0);
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        srv.c.unit_property(AGENT, "MainPID"),
        pid,
        "a healthy agent was restarted:\n{}",
        srv.agent_journal()
    );
    log(&format!(
        "after 8 s the healthy agent (PID {pid} in the server) still runs: it pings the watchdog"
    ));
    srv.c.run("kill", &["-STOP", &pid]);
    let t = Instant::now();
    log(&format!(
        "SIGSTOP to the agent (PID {pid}); waiting for the watchdog (5 s) and Restart=on-failure (RestartSec=10s)"
    ));
    let back = poll(Duration::from_secs(45), Duration::from_millis(250), || {
        srv.c
            .unit_property(AGENT, "NRestarts")
            .parse::<u32>()
            .unwrap_or(0)
            > restarts
            && srv.c.unit_state(AGENT) == "active/running"
    });
    let j = srv.journal(&["-u", AGENT]);
    assert!(
        back,
        "{AGENT}: {} NRestarts {}\n{j}",
        srv.c.unit_state(AGENT),
        srv.c.unit_property(AGENT, "NRestarts")
    );
    assert!(j.contains("Watchdog timeout"), "{j}");
    let new_pid = srv.c.unit_property(AGENT, "MainPID");
    assert_ne!(new_pid, pid);
    log(&format!(
        "systemd: \"Watchdog timeout\", killed and restarted the agent: NRestarts {restarts} -> {}, PID {pid} -> {new_pid}, active again after {:.1} s",
        srv.c.unit_property(AGENT, "NRestarts"),
        t.elapsed().as_secs_f64()
    ));
    let s = read_state(&root);
    assert_eq!(deploys(&s), d0 + 1, "nothing deployed meanwhile: {s:#}");

    // ---- Step 8: a release without the module ---------------------------------------------------
    check_race(&srv, &mut races_seen, &mut failures);
    step("STEP 8: a release without the hcloud-nixos module is refused before activation");
    let gens = srv.generations();
    let running = srv.current();
    hub.publish(ORG, FLAKE, &v(7), ATTR, &systems[7]);
    srv.c.run("hcloud-nixos", &["check"]);
    log(&format!(
        "published {} -> system 7, which has no hcloud-nixos-agent.service and no agent.toml; asked for a check",
        v(7)
    ));
    let s = srv.wait_state("release 7 refused", Duration::from_secs(60), |s| {
        s["last_deploy"]["version"] == v(7).as_str() && s["in_flight"].is_null()
    });
    assert_eq!(s["last_deploy"]["outcome"], "failed", "{s:#}");
    let reason = s["quarantined"]
        .as_array()
        .and_then(|q| q.iter().find(|q| q["version"] == v(7).as_str()))
        .and_then(|q| q["reason"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("does not include the hcloud-nixos module")
            && reason.contains("apply.require_agent = false"),
        "quarantine reason: {reason}\n{s:#}"
    );
    assert_eq!(srv.current(), running, "the running system is untouched");
    assert_eq!(srv.profile(), running, "the profile is back where it was");
    assert_eq!(srv.generations(), gens + 2, "fh's generation, then back");
    assert_eq!(
        count(&lines(&root.join("activations.log")), "7 switch start"),
        0,
        "system 7 was activated"
    );
    assert_eq!(srv.c.unit_state(AGENT), "active/running");
    let status = srv.status();
    assert!(
        status.contains(&format!("refused: release {}", v(7))),
        "{status}"
    );
    log(&format!(
        "refused and quarantined, nothing activated: {reason}"
    ));

    check_race(&srv, &mut races_seen, &mut failures);
    if failures.is_empty() {
        step(&format!(
            "DONE: every step passed in {:.1} s; cleaning up",
            t0.elapsed().as_secs_f64()
        ));
    } else {
        step(&format!(
            "DONE in {:.1} s with {} failed step(s); cleaning up",
            t0.elapsed().as_secs_f64(),
            failures.len()
        ));
    }
    assert!(failures.is_empty(), "failed:\n{}", failures.join("\n"));
}

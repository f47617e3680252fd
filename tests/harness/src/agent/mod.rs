//! The test bench for `hcloud-nixos agent`: a temporary root holding everything the agent touches
//! (configuration, state, run directory, the system profile and `current-system`), the FlakeHub
//! and metadata stand-ins ([`crate::flakehub`], [`crate::metadata`]), the `fh` and
//! `determinate-nixd` stand-ins ([`crate::scripts`]), and NixOS "systems" that are real Nix store
//! paths (`nix-store --add`) switched to through real profile generations (`nix-env -p PROFILE
//! --set`), from Debian's `nix-bin`.
//!
//! `fh` is `/bin/bash` under the name `fh`, reading its script `apply` from the agent's working
//! directory ([`crate::scripts::Fh::install_as_bash`]); it reads the token from
//! `/nix/var/determinate/token` (determinate-nixd) or fh's own auth file. A system's
//! `switch-to-configuration` points `current-system` at itself (switch, test) or does nothing
//! (boot, dry-activate); [`Kind`] says how else it behaves.
//!
//! Needs root and `nix-store`, `nix-env`, `curl`: without them the tests print `SKIP: ...`,
//! unless `CI=true`, where they fail. [`helpers`] holds what the agent tests share.

pub mod helpers;
mod process;
mod userdata;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

pub use process::{Agent, Run};
use process::{kill_ours, pid_namespace};
pub use userdata::{Encoding, cloud_config, encode};

use crate::flakehub::{FlakeHub, rolling_version};
use crate::metadata::{Documents, MetadataServer};
use crate::scripts::{self, Activation, DeterminateNixd, Fh, Switch};
use crate::units;

pub const ORG: &str = "acme";
pub const FLAKE: &str = "infra";
pub const ATTR: &str = "nixosConfigurations.web";
/// The token FlakeHub and determinate-nixd accept. Its middle part is what leak checks look for.
pub const TOKEN: &str = "flakehub1_benchS3cretTokenPart_7f3a9c2e41d8b6a05e";
pub const TOKEN_SECRET_PART: &str = "benchS3cretTokenPart";
/// `PATH` for the agent, fh and the systems' scripts (the bench's fh-lib comes first for the
/// agent: fh, bash, finds its script there).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a system's `switch-to-configuration` does for `switch` and `test`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Points `current-system` at itself, exits 0.
    Normal,
    /// Prints an error and exits 1 without switching (fh still exits 0).
    ActivationFails,
    /// Switches, then exits 4 (some units failed).
    Exit4,
    /// Waits this many seconds, then switches.
    Slow(u64),
    /// Waits this many seconds, then fails as [`Kind::ActivationFails`] does.
    SlowThenFails(u64),
    /// Switches, then creates `<root>/flags/<name>` (a system that breaks something a health
    /// check or a stand-in looks at). Every other kind's switch removes all flags: the system
    /// rolled back to repairs what the release broke.
    SetsFlag(&'static str),
    /// Switches as [`Kind::Normal`] does, but the system does not include the hcloud-nixos
    /// module (no agent unit, no agent configuration): the agent must refuse it.
    WithoutAgent,
}

impl Kind {
    fn activation(self) -> Activation {
        match self {
            Kind::Normal | Kind::WithoutAgent => Activation::Switches,
            Kind::ActivationFails => Activation::Fails,
            Kind::Exit4 => Activation::Exit4,
            Kind::Slow(secs) => Activation::Slow(secs),
            Kind::SlowThenFails(secs) => Activation::SlowThenFails(secs),
            Kind::SetsFlag(flag) => Activation::SetsFlag(flag.to_string()),
        }
    }
}

/// How the machine logs in to FlakeHub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Login {
    /// determinate-nixd is installed (the stand-in); fh reads `<root>/nix/var/determinate/token`.
    DeterminateNixd,
    /// No determinate-nixd: the agent writes fh's auth file, fh reads it.
    FhAuthFile,
}

/// How the user-data document is sent.
#[derive(Debug, Clone)]
pub struct Options {
    pub login: Login,
    pub retry_limit: u32,
    pub poll_interval: &'static str,
    pub apply_timeout: &'static str,
    pub confirm_timeout: &'static str,
    /// More top-level TOML lines (`operation = "boot"`).
    pub extra: String,
    /// TOML tables appended at the end (`[[health_check]]`, `[[hook]]`, `[metrics]`).
    pub tables: String,
    /// The hostname the agents see: the bench then has a UTS namespace of its own with it
    /// (several benches playing the servers of a fleet). `None`: the machine's.
    pub hostname: Option<String>,
    /// Not serialised with the other benches of this test binary (the fleet tests run several
    /// "servers" at once; each agent sees only its own PID namespace's fh).
    pub concurrent: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            login: Login::DeterminateNixd,
            retry_limit: 3,
            poll_interval: "1s",
            apply_timeout: "60s",
            confirm_timeout: "10s",
            extra: String::new(),
            tables: String::new(),
            hostname: None,
            concurrent: false,
        }
    }
}

/// Can the bench run here? `Err(why)` when not.
fn prerequisites() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("needs root (the Nix store and profiles are written directly)".into());
    }
    for tool in ["nix-store", "nix-env", "curl", "sha256sum"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Err(format!(
                "{tool} is missing (apt-get install nix-bin curl coreutils)"
            ));
        }
    }
    Ok(())
}

pub struct Bench {
    pub root: PathBuf,
    pub flakehub: FlakeHub,
    pub metadata: MetadataServer,
    pub config: PathBuf,
    pub opts: Options,
    /// Runs of the binary so far (names the output files under `logs/`).
    runs: AtomicUsize,
    /// PIDs of agents started in service mode and still to stop.
    agents: Mutex<Vec<u32>>,
    /// `unshare` holding the bench's PID namespace; its child is the namespace's init.
    namespace: Mutex<Option<Child>>,
    /// The namespace's init (a reaper), as this process sees it.
    init_pid: u32,
    _dir: tempfile::TempDir,
    /// One bench at a time: the agent waits while any `fh apply nixos` runs on the machine, so
    /// another bench's fh would make it wait. `None` with [`Options::concurrent`].
    _serial: Option<std::sync::MutexGuard<'static, ()>>,
}

static SERIAL: Mutex<()> = Mutex::new(());

impl Bench {
    /// A bench, or `None` (after printing `SKIP: ...`) when root or nix-bin are missing; under
    /// `CI=true` that is a failure instead.
    pub fn new(test: &str, opts: Options) -> Option<Bench> {
        if let Err(why) = prerequisites() {
            crate::skip(test, &why);
            return None;
        }
        let serial = (!opts.concurrent).then(|| crate::lock(&SERIAL));
        let (namespace, init_pid) = pid_namespace(opts.hostname.as_deref());
        let dir = tempfile::Builder::new()
            .prefix("hcloud-nixos-agent-")
            .tempdir()
            .expect("temporary directory");
        let root = dir.path().to_path_buf();
        for d in [
            "etc",
            "bin",
            "fh-lib",
            "logs",
            "profiles",
            "systems",
            "nix-conf",
            "home/.config/flakehub",
            "flags",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        // As root without a daemon, Nix works on the store directly; without this it warns
        // about the missing nixbld group on every command.
        std::fs::write(
            root.join("nix-conf/nix.conf"),
            "build-users-group =\nsandbox = false\n",
        )
        .unwrap();
        let flakehub = FlakeHub::start("127.0.0.1:0").expect("start the FlakeHub stand-in");
        flakehub.require_token(Some(TOKEN));
        let metadata = MetadataServer::start(
            "127.0.0.1:0",
            Documents {
                docs: HashMap::new(),
            },
        )
        .expect("start the metadata stand-in");
        let bench = Bench {
            config: root.join("etc/agent.toml"),
            root,
            flakehub,
            metadata,
            opts,
            runs: AtomicUsize::new(0),
            agents: Mutex::new(Vec::new()),
            namespace: Mutex::new(Some(namespace)),
            init_pid,
            _dir: dir,
            _serial: serial,
        };
        bench.write_fh();
        bench.write_determinate_nixd();
        bench.write_config();
        bench.set_userdata(&bench.flake("0.1"), Some(TOKEN), Encoding::Plain);
        // Generation 1 of the profile is the base system, and it runs.
        let base = bench.system("base", Kind::Normal);
        bench.nix(&[
            "nix-env",
            "-p",
            bench.profile().to_str().unwrap(),
            "--set",
            &base,
        ]);
        std::os::unix::fs::symlink(&base, bench.current_link()).unwrap();
        std::os::unix::fs::symlink(&base, bench.root.join("booted-system")).unwrap();
        std::fs::write(bench.root.join("boot_id"), "boot-1\n").unwrap();
        Some(bench)
    }

    /// `acme/infra/<constraint>#nixosConfigurations.web`
    pub fn flake(&self, constraint: &str) -> String {
        format!("{ORG}/{FLAKE}/{constraint}#{ATTR}")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn profile(&self) -> PathBuf {
        self.root.join("profiles/system")
    }

    pub fn current_link(&self) -> PathBuf {
        self.root.join("current-system")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    fn nix(&self, argv: &[&str]) -> String {
        let out = Command::new(argv[0])
            .args(&argv[1..])
            .env("NIX_CONF_DIR", self.root.join("nix-conf"))
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", argv[0]));
        assert!(
            out.status.success(),
            "{argv:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The configuration file: every path in the root, direct applies, short intervals.
    pub fn write_config(&self) {
        let r = |rel: &str| self.root.join(rel).display().to_string();
        // Upstream Nix: determinate-nixd is not named, and not in PATH either.
        let determinate = match self.opts.login {
            Login::DeterminateNixd => {
                format!("determinate_nixd = \"{}\"", r("bin/determinate-nixd"))
            }
            Login::FhAuthFile => String::new(),
        };
        let o = &self.opts;
        let text = format!(
            r#"poll_interval = "{poll}"
max_backoff = "2s"
retry_limit = {retry}
confirm_timeout = "{confirm}"
{extra}
[flakehub]
api_url = "{api}"

[metadata]
url = "{metadata}"

[apply]
mode = "direct"
timeout = "{timeout}"

[paths]
state_dir = "{state}"
run_dir = "{run}"
current_system = "{current}"
booted_system = "{booted}"
system_profile = "{profile}"
fh = "{fh}"
{determinate}
nix = "/usr/bin/nix"
nix_env = "/usr/bin/nix-env"
boot_id = "{boot_id}"
fh_auth_file = "{auth}"
switch_lock = "{lock}"
{tables}"#,
            poll = o.poll_interval,
            retry = o.retry_limit,
            extra = o.extra,
            confirm = o.confirm_timeout,
            tables = o.tables,
            api = self.flakehub.url(),
            metadata = self.metadata.base_url(),
            timeout = o.apply_timeout,
            state = r("state"),
            run = r("run"),
            current = r("current-system"),
            booted = r("booted-system"),
            profile = r("profiles/system"),
            fh = r("bin/fh"),
            auth = r("home/.config/flakehub/auth"),
            lock = r("switch-to-configuration.lock"),
            boot_id = r("boot_id"),
        );
        // Tables may name files in the root, which only exists now.
        let text = text.replace("@ROOT@", &self.root.display().to_string());
        std::fs::write(&self.config, text).unwrap();
    }

    /// Writes an executable script at `rel` in the root (`@ROOT@` in `text` is the root);
    /// returns its path.
    pub fn script(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.root.join(rel);
        scripts::write_executable(
            &path,
            &text.replace("@ROOT@", &self.root.display().to_string()),
        );
        path
    }

    /// Serves this user-data document (cloud-config with `flake`, `token`) in `encoding`.
    pub fn set_userdata(&self, flake: &str, token: Option<&str>, encoding: Encoding) {
        let doc = cloud_config(flake, token);
        self.metadata
            .set_document("userdata", Some(&encode(&doc, encoding)));
    }

    fn token_file_for_fh(&self) -> PathBuf {
        match self.opts.login {
            Login::DeterminateNixd => self.root.join("nix/var/determinate/token"),
            Login::FhAuthFile => self.root.join("home/.config/flakehub/auth"),
        }
    }

    fn write_fh(&self) {
        let fh = Fh {
            api: self.flakehub.url(),
            token_file: self.token_file_for_fh(),
            log: self.path("logs/fh.log"),
            profile: scripts::Profile::Generation(self.profile()),
            delay_file: None,
            env: vec![
                (
                    "NIX_CONF_DIR".into(),
                    self.path("nix-conf").display().to_string(),
                ),
                ("PATH".into(), PATH.into()),
            ],
        };
        fh.install_as_bash(&self.root.join("bin/fh"), &self.root.join("fh-lib"));
    }

    fn write_determinate_nixd(&self) {
        DeterminateNixd {
            dir: self.path("nix/var/determinate"),
            log: self.path("logs/determinate-nixd.log"),
            valid_token: Some(TOKEN.into()),
        }
        .install(&self.root.join("bin/determinate-nixd"));
    }

    /// A NixOS "system" as a real store path; returns it.
    pub fn system(&self, name: &str, kind: Kind) -> String {
        self.system_with_kernel(name, kind, None)
    }

    /// A kernel package as a real store path (`bzImage`, `initrd`, `lib/modules/<version>`),
    /// the same path for the same version within this bench; returns it.
    pub fn kernel(&self, version: &str) -> String {
        let dir = self.root.join("systems").join(format!("linux-{version}"));
        std::fs::create_dir_all(dir.join(format!("lib/modules/{version}"))).unwrap();
        std::fs::write(dir.join("bzImage"), format!("kernel {version}\n")).unwrap();
        std::fs::write(dir.join("initrd"), format!("initrd {version}\n")).unwrap();
        std::fs::write(
            dir.join(format!("lib/modules/{version}/modules.dep")),
            format!("{}\n", self.root.display()),
        )
        .unwrap();
        self.nix(&["nix-store", "--add", dir.to_str().unwrap()])
    }

    /// A system whose `kernel`, `initrd` and `kernel-modules` lead into the kernel package of
    /// `kernel` (as NixOS's do), or that has none (`None`).
    pub fn system_with_kernel(&self, name: &str, kind: Kind, kernel: Option<&str>) -> String {
        let dir = self
            .root
            .join("systems")
            .join(format!("nixos-system-web-{name}"));
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        if let Some(version) = kernel {
            let package = self.kernel(version);
            for (link, to) in [
                ("kernel", format!("{package}/bzImage")),
                ("initrd", format!("{package}/initrd")),
                ("kernel-modules", package.clone()),
            ] {
                std::os::unix::fs::symlink(to, dir.join(link)).unwrap();
            }
        }
        // The root's path makes the store path unique to this bench.
        std::fs::write(
            dir.join("marker"),
            format!("{name} {:?} {}\n", kind, self.root.display()),
        )
        .unwrap();
        if kind != Kind::WithoutAgent {
            self.install_agent_into(&dir);
        }
        Switch {
            name: name.to_string(),
            current: self.current_link(),
            log: self.path("logs/activations.log"),
            times: Some(self.path("logs/activation-times.log")),
            flags: Some(self.path("flags")),
            delay_file: None,
            activation: kind.activation(),
        }
        .install_into(&dir);
        let path = self.nix(&["nix-store", "--add", dir.to_str().unwrap()]);
        assert!(path.starts_with("/nix/store/"), "{path}");
        path
    }

    /// What the NixOS module puts into a system (see `units::install_module_into`).
    fn install_agent_into(&self, system: &Path) {
        let determinate = self.root.join("bin/determinate-nixd");
        let programs = units::programs_toml(
            &self.root.join("bin/fh"),
            Path::new("/usr/bin"),
            (self.opts.login == Login::DeterminateNixd).then_some(determinate.as_path()),
        );
        units::install_module_into(system, &programs);
    }

    /// Publishes rolling release `0.1.<n>` of acme/infra with `store_path`; returns its version.
    pub fn publish(&self, n: u64, store_path: &str) -> String {
        self.publish_to(FLAKE, n, store_path)
    }

    pub fn publish_to(&self, flake: &str, n: u64, store_path: &str) -> String {
        let version = rolling_version(n, &format!("{flake}{}", self.root.display()));
        self.flakehub
            .publish(ORG, flake, &version, ATTR, store_path);
        version
    }

    /// A fresh system of `kind`, published as release `0.1.<n>`; returns (version, store path).
    pub fn release(&self, n: u64, kind: Kind) -> (String, String) {
        let path = self.system(&format!("r{n}"), kind);
        (self.publish(n, &path), path)
    }

    /// `release` with a kernel package (see [`Bench::system_with_kernel`]).
    pub fn release_with_kernel(&self, n: u64, kind: Kind, kernel: &str) -> (String, String) {
        let path = self.system_with_kernel(&format!("r{n}"), kind, Some(kernel));
        (self.publish(n, &path), path)
    }

    /// As if the machine had booted `system` (a store path): it is the profile's new
    /// generation, `current-system` and `booted-system`.
    pub fn boot_into(&self, system: &str) {
        self.nix(&[
            "nix-env",
            "-p",
            self.profile().to_str().unwrap(),
            "--set",
            system,
        ]);
        for link in ["booted-system", "current-system"] {
            let tmp = self.root.join(format!("{link}.new"));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(system, &tmp).unwrap();
            std::fs::rename(&tmp, self.root.join(link)).unwrap();
        }
    }

    /// `<root>/flags/<name>`: set by [`Kind::SetsFlag`] systems, cleared by the others.
    pub fn flag(&self, name: &str) -> PathBuf {
        self.root.join("flags").join(name)
    }

    /// `hcloud-nixos status`.
    pub fn status(&self) -> String {
        let run = self.run(&["status"], Duration::from_secs(30));
        assert!(run.ok(), "status: {}", run.all());
        run.stdout
    }

    /// `hcloud-nixos status --json`, parsed.
    pub fn status_json(&self) -> serde_json::Value {
        let run = self.run(&["status", "--json"], Duration::from_secs(30));
        assert!(run.ok(), "status --json: {}", run.all());
        serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
    }

    /// state.json as the agent left it (`Null` before the first write).
    pub fn state(&self) -> serde_json::Value {
        match std::fs::read(self.state_dir().join("state.json")) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or(serde_json::Value::Null),
            Err(_) => serde_json::Value::Null,
        }
    }

    /// Every `fh` invocation so far, one line each (`apply nixos REF ACTION`).
    pub fn fh_runs(&self) -> Vec<String> {
        lines(&self.path("logs/fh.log"))
    }

    pub fn determinate_log(&self) -> Vec<String> {
        lines(&self.path("logs/determinate-nixd.log"))
    }

    /// `switch-to-configuration` calls so far with their time: (`<system name> <action>`,
    /// seconds since the epoch).
    pub fn activation_times(&self) -> Vec<(String, f64)> {
        lines(&self.path("logs/activation-times.log"))
            .into_iter()
            .filter_map(|l| {
                let (what, at) = l.rsplit_once(' ')?;
                Some((what.to_string(), at.parse().ok()?))
            })
            .collect()
    }

    /// `switch-to-configuration` calls so far: `<system name> <action>`.
    pub fn activations(&self) -> Vec<String> {
        lines(&self.path("logs/activations.log"))
            .into_iter()
            .filter_map(|l| l.strip_suffix(" start").map(str::to_string))
            .collect()
    }

    /// What `current-system` points at.
    pub fn current_system(&self) -> String {
        canonical(&self.current_link())
    }

    /// A reboot into what the profile points at: a new boot ID, `booted-system` and
    /// `current-system` pointing at the profile's system.
    pub fn reboot(&self) {
        let n = std::fs::read_to_string(self.root.join("boot_id")).unwrap_or_default();
        std::fs::write(self.root.join("boot_id"), format!("{}-next\n", n.trim())).unwrap();
        let system = self.profile_system();
        for link in ["booted-system", "current-system"] {
            let tmp = self.root.join(format!("{link}.new"));
            std::os::unix::fs::symlink(&system, &tmp).unwrap();
            std::fs::rename(&tmp, self.root.join(link)).unwrap();
        }
    }

    /// What the system profile points at.
    pub fn profile_system(&self) -> String {
        canonical(&self.profile())
    }

    /// The profile's generations: (number, store path), in order.
    pub fn generations(&self) -> Vec<(u32, String)> {
        let mut gens: Vec<(u32, String)> = std::fs::read_dir(self.root.join("profiles"))
            .unwrap()
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                let n = name
                    .strip_prefix("system-")?
                    .strip_suffix("-link")?
                    .parse()
                    .ok()?;
                Some((n, canonical(&self.root.join("profiles").join(&name))))
            })
            .collect();
        gens.sort();
        gens
    }

    /// The generation the profile points at (`system -> system-N-link`).
    pub fn current_generation(&self) -> u32 {
        let target = std::fs::read_link(self.profile()).unwrap();
        let name = target.file_name().unwrap().to_string_lossy().into_owned();
        name.strip_prefix("system-")
            .and_then(|s| s.strip_suffix("-link"))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("profile link {name}"))
    }

    /// Waits up to `timeout` for `cond`; panics with `what` (and the agent's output) if it never
    /// holds.
    pub fn wait_for(&self, timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if cond() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "timed out after {timeout:?} waiting for: {what}\nstate: {}\nfh: {:?}\nlogs:\n{}",
            self.state(),
            self.fh_runs(),
            self.all_logs()
        );
    }

    /// Every file the agent's runs wrote under logs/ (stdout and stderr), concatenated.
    pub fn all_logs(&self) -> String {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.root.join("logs"))
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "out" || x == "err"))
            .collect();
        names.sort();
        let mut all = String::new();
        for n in names {
            let _ = writeln!(all, "=== {}", n.file_name().unwrap().to_string_lossy());
            all.push_str(&std::fs::read_to_string(&n).unwrap_or_default());
        }
        all
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn canonical(path: &Path) -> String {
    std::fs::canonicalize(path)
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

impl Drop for Bench {
    fn drop(&mut self) {
        let root = self.root.display().to_string();
        // Agents are killed by their own guards; stand-in processes they left behind are ours
        // to stop too.
        for pid in self.agents.lock().unwrap().drain(..) {
            kill_ours(pid, &root);
        }
        // The namespace's init dies with unshare, and every process in the namespace with it.
        if let Some(mut ns) = self.namespace.lock().unwrap().take() {
            let _ = ns.kill();
            let _ = ns.wait();
        }
    }
}

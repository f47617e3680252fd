//! The test bench for `hcloud-nixos agent`: a temporary root holding everything the agent touches
//! (configuration, state, run directory, the system profile and `current-system`), the FlakeHub
//! and metadata stand-ins, stand-ins for `fh` and `determinate-nixd`, and NixOS "systems" that
//! are real Nix store paths (`nix-store --add`) switched to through real profile generations
//! (`nix-env -p PROFILE --set`), from Debian's `nix-bin`.
//!
//! The stand-ins behave as FlakeHub and fh document them (see `tests/fixtures/` and the README):
//! - `fh apply nixos REF [ACTION]` resolves REF with the output endpoint (`include_token=true`),
//!   with the token from `/nix/var/determinate/token` (determinate-nixd) or fh's own auth file;
//!   exits non-zero with `Error: ...` on 401/404 or when the closure cannot be "copied" (the
//!   local store plays the cache: a store path that is not valid there cannot be fetched);
//!   creates the profile generation; runs `<profile>/bin/switch-to-configuration ACTION` and
//!   ignores its exit status: it exits 0 after a failed activation.
//!   `fh` is `/bin/bash` under the name `fh`, reading its script `apply` from the agent's working
//!   directory: its `/proc/PID/cmdline` is then `fh apply nixos REF ACTION`, as a real fh binary's
//!   is (the agent recognizes an fh left running by an earlier agent by that).
//! - `determinate-nixd login token --token-file F` / `status`.
//! - `switch-to-configuration` points `current-system` at its own store path (switch, test), or
//!   does nothing (boot); variants fail, exit 4, or take their time.
//!
//! Needs root and `nix-store`, `nix-env`, `curl`: without them the tests print `SKIP: ...`,
//! unless `CI=true`, where they fail.

#![allow(dead_code)] // each test uses a different part of it

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[path = "units.rs"]
mod units;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::flakehub::{FlakeHub, rolling_version};
use crate::metadata_server::{Documents, MetadataServer};

pub const ORG: &str = "acme";
pub const FLAKE: &str = "infra";
pub const ATTR: &str = "nixosConfigurations.web";
/// The token FlakeHub and determinate-nixd accept. Its middle part is what leak checks look for.
pub const TOKEN: &str = "flakehub1_benchS3cretTokenPart_7f3a9c2e41d8b6a05e";
pub const TOKEN_SECRET_PART: &str = "benchS3cretTokenPart";

const AGENT: &str = env!("CARGO_BIN_EXE_hcloud-nixos");

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

/// How the machine logs in to FlakeHub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Login {
    /// determinate-nixd is installed (the stand-in); fh reads `<root>/nix/var/determinate/token`.
    DeterminateNixd,
    /// No determinate-nixd: the agent writes fh's auth file, fh reads it.
    FhAuthFile,
}

/// How the user-data document is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Plain,
    Base64,
    Gzip,
    GzipBase64,
    /// MIME multipart (as Terraform's cloudinit_config renders it): a shell script part and the
    /// cloud-config part in base64.
    Mime,
    /// The MIME archive, gzipped and base64-encoded.
    MimeGzipBase64,
}

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

/// A finished command.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    pub fn all(&self) -> String {
        format!(
            "exit: {}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
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

/// A service-mode agent; killed (SIGKILL) and reaped when dropped. `child` is the `nsenter`
/// that started it in the bench's PID namespace, `pid` the agent itself (as this process sees it).
pub struct Agent {
    child: Option<Child>,
    pid: u32,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid as i32), sig).expect("signal the agent");
    }

    /// Is it still running (not exited)?
    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `timeout` for the exit; SIGKILL after that.
    pub fn stop(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `timeout` for it to exit by itself; panics after that.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let c = self.child.as_mut().expect("agent already reaped");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit within {timeout:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How it ended (when it did), and everything it printed.
    pub fn output(&mut self) -> String {
        let status = match &mut self.child {
            Some(c) => format!("{:?}", c.try_wait()),
            None => "reaped".to_string(),
        };
        format!(
            "exit status: {status}\n{}{}",
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn write_exec(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Single-quoted for bash.
fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn base64(data: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .encode(data)
        .into_bytes()
}

/// A cloud-config document with an `hcloud_nixos` section.
pub fn cloud_config(flake: &str, token: Option<&str>) -> String {
    let mut doc = String::from("#cloud-config\npackages: [htop]\nhcloud_nixos:\n");
    if let Some(t) = token {
        let _ = writeln!(doc, "  flakehub_token: {t}");
    }
    let _ = writeln!(doc, "  flake: {flake}");
    doc
}

/// `doc` in `encoding`.
pub fn encode(doc: &str, encoding: Encoding) -> Vec<u8> {
    let mime = || {
        let part = String::from_utf8(base64(doc.as_bytes())).unwrap();
        format!(
            "Content-Type: multipart/mixed; boundary=\"MIMEBOUNDARY\"\nMIME-Version: 1.0\n\n\
             --MIMEBOUNDARY\nContent-Transfer-Encoding: 7bit\nContent-Type: text/x-shellscript\n\
             Mime-Version: 1.0\n\n#!/bin/sh\necho hello\n\n\
             --MIMEBOUNDARY\nContent-Transfer-Encoding: base64\nContent-Type: text/cloud-config\n\
             Mime-Version: 1.0\n\n{part}\n--MIMEBOUNDARY--\n"
        )
    };
    match encoding {
        Encoding::Plain => doc.as_bytes().to_vec(),
        Encoding::Base64 => base64(doc.as_bytes()),
        Encoding::Gzip => gzip(doc.as_bytes()),
        Encoding::GzipBase64 => base64(&gzip(doc.as_bytes())),
        Encoding::Mime => mime().into_bytes(),
        Encoding::MimeGzipBase64 => base64(&gzip(mime().as_bytes())),
    }
}

impl Bench {
    /// A bench, or `None` (after printing `SKIP: ...`) when root or nix-bin are missing; under
    /// `CI=true` that is a failure instead.
    pub fn new(test: &str, opts: Options) -> Option<Bench> {
        if let Err(why) = prerequisites() {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{test}: {why}");
            }
            eprintln!("SKIP: {test}: {why}");
            return None;
        }
        let serial = (!opts.concurrent).then(|| SERIAL.lock().unwrap_or_else(|e| e.into_inner()));
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
        write_exec(
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
        std::os::unix::fs::symlink("/bin/bash", self.root.join("bin/fh")).unwrap();
        let script = format!(
            r#"# fh stand-in: run as `fh apply nixos REF [ACTION]` where fh is bash and this is `apply`.
set -u
API={api}
LOG={log}
PROFILE={profile}
TOKEN_FILE={token_file}
export NIX_CONF_DIR={nix_conf}
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
printf '%s\n' "apply $*" >>"$LOG"
if [ "${{1-}}" != nixos ] || [ $# -lt 2 ]; then
  echo "Error: usage: fh apply nixos <output-ref> [switch|boot|test|dry-activate]" >&2
  exit 2
fi
ref=$2
action=${{3:-switch}}
case $action in switch|boot|test|dry-activate) ;; *)
  echo "Error: invalid action '$action'" >&2; exit 2 ;;
esac
flakeref=${{ref%%#*}}
attr=${{ref#*#}}
[ "$attr" = "$ref" ] && attr="nixosConfigurations.$(hostname)"
org=${{flakeref%%/*}}; rest=${{flakeref#*/}}; flake=${{rest%%/*}}; version=${{rest#*/}}
if [ ! -s "$TOKEN_FILE" ]; then
  echo "Error: not logged in to FlakeHub (no token in $TOKEN_FILE)" >&2
  exit 1
fi
body=$(mktemp)
trap 'rm -f "$body"' EXIT
# The token goes to curl through a file descriptor, never on a command line.
code=$(curl -sS -o "$body" -w '%{{http_code}}' -A fh-standin/0.1.28 \
  -H @<(printf 'Authorization: Bearer %s\n' "$(<"$TOKEN_FILE")") \
  "$API/f/$org/$flake/$version/output/$attr?include_token=true") || {{
  echo "Error: cannot reach FlakeHub at $API" >&2; exit 1; }}
case $code in
  200) ;;
  401|403) echo "Error: FlakeHub rejected the token (HTTP $code); run \`fh login\`" >&2; exit 1 ;;
  404) echo "Error: $org/$flake/$version has no output $attr (HTTP 404)" >&2; exit 1 ;;
  *) echo "Error: FlakeHub answered HTTP $code" >&2; exit 1 ;;
esac
store_path=$(sed -n 's/.*"store_path":"\([^"]*\)".*/\1/p' "$body")
if [ -z "$store_path" ]; then echo "Error: FlakeHub's answer has no store path" >&2; exit 1; fi
# nix copy --from https://cache.flakehub.com: the local store plays the cache.
if ! nix-store --check-validity "$store_path" 2>/dev/null; then
  echo "Error: cannot copy $store_path from https://cache.flakehub.com: path '$store_path' is not valid" >&2
  exit 1
fi
# nix build --profile: the new generation exists from here on.
nix-env -p "$PROFILE" --set "$store_path" || {{ echo "Error: cannot set $PROFILE" >&2; exit 1; }}
"$PROFILE/bin/switch-to-configuration" "$action"
# fh never looks at switch-to-configuration's exit status.
exit 0
"#,
            api = sq(&self.flakehub.url()),
            log = sq(&self.path("logs/fh.log").display().to_string()),
            profile = sq(&self.profile().display().to_string()),
            token_file = sq(&self.token_file_for_fh().display().to_string()),
            nix_conf = sq(&self.path("nix-conf").display().to_string()),
        );
        std::fs::write(self.root.join("fh-lib/apply"), script).unwrap();
    }

    fn write_determinate_nixd(&self) {
        use sha2::Digest as _;
        let valid: String = sha2::Sha256::digest(TOKEN.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let script = format!(
            r#"#!/bin/bash
# determinate-nixd stand-in: `login token --token-file F`, `status`.
set -u
LOG={log}
DIR={dir}
VALID={valid}
printf '%s\n' "$*" >>"$LOG"
case "${{1-}}" in
status)
  if [ -f "$DIR/logged-in" ]; then echo "Logged in: true"; echo "Netrc: $DIR/netrc"
  else echo "Logged in: false"; fi
  exit 0 ;;
login)
  if [ "${{2-}}" != token ] || [ "${{3-}}" != --token-file ] || [ -z "${{4-}}" ]; then
    echo "error: usage: determinate-nixd login token --token-file <path>" >&2; exit 2
  fi
  f=$4
  [ -r "$f" ] || {{ echo "error: cannot read $f" >&2; exit 1; }}
  printf 'token-file %s mode=%s\n' "$f" "$(stat -c %a "$f")" >>"$LOG"
  tok=$(<"$f")
  if [ -z "$tok" ]; then echo "error: the token file $f is empty" >&2; exit 1; fi
  sum=$(printf %s "$tok" | sha256sum | cut -d' ' -f1)
  if [ "$sum" != "$VALID" ]; then
    rm -f "$DIR/logged-in"
    echo "error: FlakeHub did not accept the token (HTTP 401)" >&2; exit 1
  fi
  mkdir -p "$DIR"
  umask 077
  printf %s "$tok" >"$DIR/token"
  {{ for h in flakehub.com api.flakehub.com cache.flakehub.com; do
      printf 'machine %s login flakehub password %s\n' "$h" "$tok"; done; }} >"$DIR/netrc"
  touch "$DIR/logged-in"
  echo "Logged in to FlakeHub."
  exit 0 ;;
*) echo "error: unknown command '${{1-}}'" >&2; exit 2 ;;
esac
"#,
            log = sq(&self.path("logs/determinate-nixd.log").display().to_string()),
            dir = sq(&self.path("nix/var/determinate").display().to_string()),
            valid = sq(&valid),
        );
        write_exec(&self.root.join("bin/determinate-nixd"), &script);
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
        let activate = "ln -sfn \"$self\" \"$CURRENT.new\" && mv -T \"$CURRENT.new\" \"$CURRENT\" && rm -f \"$FLAGS\"/*";
        if kind != Kind::WithoutAgent {
            self.install_agent_into(&dir);
        }
        let body = match kind {
            Kind::Normal | Kind::WithoutAgent => format!("{activate}\nexit 0"),
            Kind::SetsFlag(flag) => format!("{activate}\ntouch \"$FLAGS\"/{}\nexit 0", sq(flag)),
            Kind::ActivationFails => "echo \"error: the activation script of the new system failed; the old one still runs\" >&2\nexit 1".to_string(),
            Kind::Exit4 => format!(
                "{activate}\necho \"warning: the following units failed: broken.service\" >&2\nexit 4"
            ),
            Kind::SlowThenFails(secs) => format!(
                "for _ in $(seq {}); do sleep 0.1; done\necho \"error: the activation script of the new system failed; the old one still runs\" >&2\nexit 1",
                secs * 10
            ),
            // Short sleeps: nothing lingers long once the script is killed.
            Kind::Slow(secs) => {
                format!("for _ in $(seq {}); do sleep 0.1; done\n{activate}\nexit 0", secs * 10)
            }
        };
        let script = format!(
            r#"#!/bin/bash
# switch-to-configuration of the test system {name}
set -u
CURRENT={current}
FLAGS={flags}
self=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd -P)
printf '%s %s\n' {name} "${{1-}}" >>{log}
printf '%s %s %s\n' {name} "${{1-}}" "$(date +%s.%N)" >>{times}
case "${{1-}}" in
  switch|test) ;;
  boot|dry-activate) exit 0 ;;
  *) echo "usage: switch-to-configuration [switch|boot|test|dry-activate]" >&2; exit 1 ;;
esac
{body}
"#,
            current = sq(&self.current_link().display().to_string()),
            log = sq(&self.path("logs/activations.log").display().to_string()),
            times = sq(&self.path("logs/activation-times.log").display().to_string()),
            flags = sq(&self.path("flags").display().to_string()),
        );
        write_exec(&dir.join("bin/switch-to-configuration"), &script);
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

    /// `hcloud-nixos ARGS --config FILE` in the bench's PID namespace.
    fn command(&self, args: &[&str]) -> Command {
        self.command_split(args, &[])
    }

    /// `hcloud-nixos ARGS --config FILE AFTER` in the bench's PID namespace.
    fn command_split(&self, args: &[&str], after: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={}", self.init_pid))
            .args(["--pid", "--mount"])
            .args(self.opts.hostname.is_some().then_some("--uts"))
            // fh (bash) finds its script `apply` here.
            .arg(format!("--wd={}", self.root.join("fh-lib").display()))
            .arg("--")
            .arg(AGENT)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .args(after)
            .env(
                "PATH",
                format!(
                    "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    self.root.join("fh-lib").display()
                ),
            )
            .env("NIX_CONF_DIR", self.root.join("nix-conf"))
            .env("HOME", self.root.join("home"))
            // Never the machine's own logind: a reboot the agent asks for must not reach it.
            .env(
                "DBUS_SYSTEM_BUS_ADDRESS",
                format!("unix:path={}", self.root.join("no-system-bus").display()),
            )
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null());
        cmd
    }

    fn log_files(&self, label: &str) -> (PathBuf, PathBuf) {
        let n = self.runs.fetch_add(1, Ordering::SeqCst);
        (
            self.root.join(format!("logs/{n:03}-{label}.out")),
            self.root.join(format!("logs/{n:03}-{label}.err")),
        )
    }

    /// Runs `hcloud-nixos ARGS --config ...` to its end (at most `timeout`; killed after that).
    pub fn run(&self, args: &[&str], timeout: Duration) -> Run {
        self.run_split(args, &[], timeout)
    }

    /// Runs `hcloud-nixos ARGS --config ... AFTER` to its end, like [`Bench::run`] (for
    /// subcommands of subcommands: `fleet --config ... status`).
    pub fn run_split(&self, args: &[&str], after: &[&str], timeout: Duration) -> Run {
        let label = args.iter().chain(after).copied().collect::<Vec<_>>();
        let (out, err) = self.log_files(&label.join("-").replace("--", ""));
        let mut child = self
            .command_split(args, after)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("run hcloud-nixos");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "hcloud-nixos {args:?} did not finish within {timeout:?}:\n{}{}",
                    std::fs::read_to_string(&out).unwrap_or_default(),
                    std::fs::read_to_string(&err).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Run {
            status,
            stdout: std::fs::read_to_string(&out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&err).unwrap_or_default(),
        }
    }

    /// Starts `argv` in the bench's PID namespace (an operator's command, say); the caller waits
    /// for it (the namespace's end kills it at the latest).
    pub fn spawn_in_namespace(&self, argv: &[&str]) -> Child {
        Command::new("nsenter")
            .arg(format!("--target={}", self.init_pid))
            .args(["--pid", "--mount"])
            .args(self.opts.hostname.is_some().then_some("--uts"))
            .arg("--")
            .args(argv)
            .stdin(Stdio::null())
            .spawn()
            .expect("nsenter")
    }

    /// `hcloud-nixos agent --once`.
    pub fn once(&self) -> Run {
        self.run(&["agent", "--once"], Duration::from_secs(90))
    }

    /// `hcloud-nixos agent --once`, started in the background.
    pub fn spawn_once(&self) -> Agent {
        self.spawn(&["agent", "--once"])
    }

    /// `hcloud-nixos agent` (the service).
    pub fn start_agent(&self) -> Agent {
        self.spawn(&["agent"])
    }

    fn spawn(&self, args: &[&str]) -> Agent {
        let (out, err) = self.log_files(&args.join("-").replace("--", ""));
        let child = self
            .command(args)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("start hcloud-nixos agent");
        let pid = only_child(child.id()).expect("nsenter started no agent");
        self.agents.lock().unwrap().push(pid);
        Agent {
            child: Some(child),
            pid,
            stdout: out,
            stderr: err,
        }
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

/// A PID namespace with its own /proc for the bench's agents, fh and everything they start:
/// the agent looks for `fh apply` processes machine-wide, and must see only this bench's. Its
/// init reaps orphans (an fh whose agent was killed) as systemd would. With `hostname`, it is
/// also a UTS namespace with that hostname. Returns `unshare` (kill it and the namespace goes)
/// and the init's PID.
fn pid_namespace(hostname: Option<&str>) -> (Child, u32) {
    let init = match hostname {
        // Set by the init as it starts (waited for below).
        Some(h) => format!(
            "printf %s {} >/proc/sys/kernel/hostname || exit 1; while :; do sleep 1 & wait; done",
            sq(h)
        ),
        None => "while :; do sleep 1 & wait; done".to_string(),
    };
    let mut child = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL"])
        .args(hostname.map(|_| "--uts"))
        .args(["--", "/bin/bash", "-c", &init])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("run unshare (util-linux)");
    match only_child(child.id()) {
        Some(init) => {
            if let Some(h) = hostname {
                wait_for_hostname(init, h);
            }
            (child, init)
        }
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("unshare --pid --fork started no init");
        }
    }
}

/// Waits (up to 5 s) until the UTS namespace of `init` has `hostname`.
fn wait_for_hostname(init: u32, hostname: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = Command::new("nsenter")
            .arg(format!("--target={init}"))
            .args(["--uts", "--", "cat", "/proc/sys/kernel/hostname"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        if seen == hostname {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the bench's UTS namespace did not get the hostname {hostname} (it has '{seen}')"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The one child of `pid`, once it has one (within 5 s).
fn only_child(pid: u32) -> Option<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let text =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(child) = text.split_whitespace().next().and_then(|c| c.parse().ok()) {
            return Some(child);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
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

/// Kills a process by PID if its command line still names `root` (not a reused PID).
fn kill_ours(pid: u32, root: &str) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains(root) {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
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

/// An HTTP health endpoint for `[[health_check]] url`: `GET` anything answers 500 while
/// `broken_while` exists, else 200. Counts requests. Stops when dropped.
pub struct HealthEndpoint {
    pub url: String,
    hits: std::sync::Arc<AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl HealthEndpoint {
    pub fn start(broken_while: PathBuf) -> HealthEndpoint {
        use std::io::{BufRead as _, BufReader};
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/health", listener.local_addr().unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (hits2, stop2) = (hits.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(&stream);
                loop {
                    let mut line = String::new();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) if line == "\r\n" || line == "\n" => break,
                        Ok(_) => {}
                    }
                }
                hits2.fetch_add(1, Ordering::SeqCst);
                let (status, body) = if broken_while.exists() {
                    ("500 Internal Server Error", "broken\n")
                } else {
                    ("200 OK", "ok\n")
                };
                let mut out = &stream;
                let _ = write!(
                    out,
                    "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        HealthEndpoint { url, hits, stop }
    }

    /// Requests answered so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for HealthEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

//! The agent's configuration: the TOML file, user-data filling its gaps, validated settings.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::agent::flakeref::FlakeRef;
use crate::agent::userdata::UserSettings;
use crate::plumbing::secret::Secret;

/// What `fh apply nixos` is asked to do with a new closure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// Activate now and make it the boot default.
    #[default]
    Switch,
    /// Make it the boot default; it runs after the next reboot.
    Boot,
    /// Activate now without making it the boot default.
    Test,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Switch => "switch",
            Operation::Boot => "boot",
            Operation::Test => "test",
        }
    }
}

impl std::str::FromStr for Operation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "switch" => Ok(Operation::Switch),
            "boot" => Ok(Operation::Boot),
            "test" => Ok(Operation::Test),
            other => Err(format!(
                "'{other}' is not an operation (switch, boot or test)"
            )),
        }
    }
}

/// How `fh apply` is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApplyMode {
    /// In a transient systemd unit of its own, so that it survives the agent's restart.
    #[default]
    TransientUnit,
    /// As the agent's child process (machines without systemd, tests).
    Direct,
}

/// The TOML file as written, every key optional. Unknown keys are errors: a typo must not
/// silently fall back to a default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub flake: Option<String>,
    pub operation: Option<Operation>,
    pub poll_interval: Option<String>,
    pub max_backoff: Option<String>,
    pub retry_limit: Option<u32>,
    pub confirm_timeout: Option<String>,
    pub min_release_age: Option<String>,
    #[serde(default)]
    pub health_check: Vec<crate::agent::health::CheckConfig>,
    pub reboot: Option<crate::agent::reboot::Policy>,
    pub reboot_window: Option<crate::agent::reboot::WindowConfig>,
    pub reboot_grace: Option<String>,
    pub reboot_inhibitor_timeout: Option<String>,
    #[serde(default)]
    pub hook: Vec<crate::agent::hooks::HookConfig>,
    pub metrics: Option<crate::agent::metrics::MetricsConfig>,
    pub fleet: Option<crate::fleet::FleetConfig>,
    #[serde(default)]
    pub flakehub: FlakehubSection,
    #[serde(default)]
    pub metadata: MetadataSection,
    #[serde(default)]
    pub apply: ApplySection,
    #[serde(default)]
    pub paths: PathsSection,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlakehubSection {
    pub api_url: Option<String>,
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataSection {
    pub url: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplySection {
    pub mode: Option<ApplyMode>,
    pub timeout: Option<String>,
    /// Refuse a release that does not contain the agent (default true).
    pub require_agent: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathsSection {
    pub state_dir: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub current_system: Option<PathBuf>,
    pub booted_system: Option<PathBuf>,
    pub system_profile: Option<PathBuf>,
    pub fh: Option<PathBuf>,
    pub determinate_nixd: Option<PathBuf>,
    pub nix: Option<PathBuf>,
    pub nix_env: Option<PathBuf>,
    pub fh_auth_file: Option<PathBuf>,
    pub switch_lock: Option<PathBuf>,
    pub boot_id: Option<PathBuf>,
}

/// Every path the agent touches, with its NixOS default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Paths {
    pub state_dir: PathBuf,
    /// Runtime files: the PID file, the lock, a token on its way to determinate-nixd.
    pub run_dir: PathBuf,
    pub current_system: PathBuf,
    pub booted_system: PathBuf,
    pub system_profile: PathBuf,
    pub fh: PathBuf,
    pub determinate_nixd: PathBuf,
    pub nix: PathBuf,
    /// Sets the system profile back to the previous system in a rollback.
    pub nix_env: PathBuf,
    /// fh's own token file, used where determinate-nixd is absent.
    pub fh_auth_file: PathBuf,
    /// NixOS's switch-to-configuration lock; held while someone switches by hand.
    pub switch_lock: PathBuf,
    /// This boot's identity, to tell that a reboot happened.
    pub boot_id: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            state_dir: "/var/lib/hcloud-nixos".into(),
            run_dir: "/run/hcloud-nixos".into(),
            current_system: "/run/current-system".into(),
            booted_system: "/run/booted-system".into(),
            system_profile: "/nix/var/nix/profiles/system".into(),
            fh: "fh".into(),
            determinate_nixd: "determinate-nixd".into(),
            nix: "nix".into(),
            nix_env: "nix-env".into(),
            fh_auth_file: "/root/.config/flakehub/auth".into(),
            switch_lock: "/run/nixos/switch-to-configuration.lock".into(),
            boot_id: "/proc/sys/kernel/random/boot_id".into(),
        }
    }
}

/// Where the FlakeHub token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// `flakehub.token_file` in the configuration; read when settings are loaded.
    File(PathBuf, Secret),
    /// `flakehub_token` in user-data.
    UserData(Secret),
}

impl Token {
    pub fn secret(&self) -> &Secret {
        match self {
            Token::File(_, s) | Token::UserData(s) => s,
        }
    }

    pub fn origin(&self) -> String {
        match self {
            Token::File(path, _) => path.display().to_string(),
            Token::UserData(_) => "user-data".to_string(),
        }
    }
}

/// Validated settings the rest of the agent trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub flake: Option<FlakeRef>,
    pub operation: Operation,
    pub poll_interval: Duration,
    pub max_backoff: Duration,
    /// Attempts at one store path before it is given up until a different release appears.
    pub retry_limit: u32,
    pub flakehub_api_url: String,
    pub token: Option<Token>,
    pub metadata_url: String,
    pub apply_mode: ApplyMode,
    /// How long one `fh apply` may take before it counts as failed.
    pub apply_timeout: Duration,
    /// Refuse a release that does not contain the agent, its configuration and its programs.
    pub require_agent: bool,
    /// How long a new system has to prove healthy before it is rolled back.
    pub confirm_timeout: Duration,
    /// A release is applied only once it has been published this long.
    pub min_release_age: Duration,
    pub health_checks: Vec<crate::agent::health::Check>,
    /// When to reboot into a new kernel.
    pub reboot: crate::agent::reboot::Policy,
    /// The maintenance window, for `reboot = "window"`.
    pub reboot_window: Option<crate::agent::reboot::Window>,
    /// Between the wall message and the reboot.
    pub reboot_grace: Duration,
    /// How long a reboot waits for block-mode inhibitor locks before it is postponed.
    pub reboot_inhibitor_timeout: Duration,
    pub hooks: Vec<crate::agent::hooks::Hook>,
    pub metrics: crate::agent::metrics::Metrics,
    /// Deploys and reboots take turns with the other servers of a group.
    pub fleet: Option<crate::fleet::Fleet>,
    pub paths: Paths,
}

pub const DEFAULT_CONFIG: &str = "/etc/hcloud-nixos/agent.toml";

/// Parses the TOML text; errors are one line and name the key.
pub fn parse_file(text: &str) -> Result<FileConfig, String> {
    toml::from_str(text).map_err(|e| {
        let msg = e.message().replace('\n', " ");
        match e.span() {
            // A span at 0 is the whole document (an unknown top-level key): the message names it.
            Some(span) if span.start > 0 => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}: {msg}")
            }
            _ => msg,
        }
    })
}

/// Reads the configuration file; a missing file means every default.
pub fn read_file(path: &Path) -> Result<FileConfig, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_file(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileConfig::default()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

fn duration(key: &str, text: Option<&str>, default: Duration) -> Result<Duration, String> {
    match text {
        None => Ok(default),
        Some(t) => humantime::parse_duration(t)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("{key}: '{t}' is not a duration (for example 60s, 5m, 1h)")),
    }
}

/// Validates the file on its own, reading nothing (no token file, no program): what
/// `hcloud-nixos config check` and the check of a new release's configuration do.
pub fn check(file: &FileConfig) -> Result<Settings, Vec<String>> {
    resolve(file, None, |_| Ok("read-when-the-agent-starts".to_string()))
}

/// `hcloud-nixos config check [--json] FILE`: the effective settings when the file is fine, else
/// one line per problem. `json`: the settings as JSON (what the NixOS module hands
/// `pkgs.formats.toml` before it renders the TOML).
pub fn check_file(path: &Path, json: bool) -> Result<String, Vec<String>> {
    let shown = path.display();
    let text =
        std::fs::read_to_string(path).map_err(|e| vec![format!("{shown}: cannot read: {e}")])?;
    let file = if json {
        serde_json::from_str::<FileConfig>(&text)
            .map_err(|e| vec![format!("{shown}: not the agent's settings as JSON: {e}")])?
    } else {
        parse_file(&text).map_err(|e| vec![format!("{shown}: {e}")])?
    };
    let settings = check(&file)?;
    Ok(describe(&settings))
}

/// The effective settings, one `key = value` line each, for a person.
pub fn describe(s: &Settings) -> String {
    use std::fmt::Write as _;
    let d = |d: Duration| humantime::format_duration(d).to_string();
    let mut out = String::new();
    let mut line = |key: &str, value: String| {
        let _ = writeln!(out, "{key:<26} {value}");
    };
    line(
        "flake",
        s.flake
            .as_ref()
            .map_or("(from user-data)".into(), |f| f.to_string()),
    );
    line("operation", s.operation.as_str().into());
    line("poll_interval", d(s.poll_interval));
    line("max_backoff", d(s.max_backoff));
    line("retry_limit", s.retry_limit.to_string());
    line("confirm_timeout", d(s.confirm_timeout));
    line("min_release_age", d(s.min_release_age));
    line("flakehub.api_url", s.flakehub_api_url.clone());
    line(
        "flakehub.token_file",
        match &s.token {
            Some(Token::File(path, _)) => path.display().to_string(),
            _ => "(from user-data)".into(),
        },
    );
    line("metadata.url", s.metadata_url.clone());
    line(
        "apply.mode",
        match s.apply_mode {
            ApplyMode::TransientUnit => "transient-unit",
            ApplyMode::Direct => "direct",
        }
        .into(),
    );
    line("apply.timeout", d(s.apply_timeout));
    line("apply.require_agent", s.require_agent.to_string());
    line(
        "health_check",
        format!("{} check(s)", s.health_checks.len()),
    );
    line("reboot", s.reboot.as_str().into());
    line("hook", format!("{} hook(s)", s.hooks.len()));
    line(
        "fleet",
        s.fleet.as_ref().map_or("(none)".into(), |f| {
            let backend = format!("{:?}", f.backend).to_lowercase();
            format!("group {}, {} slot(s), backend {backend}", f.group, f.slots)
        }),
    );
    for (key, path) in [
        ("paths.fh", &s.paths.fh),
        ("paths.nix", &s.paths.nix),
        ("paths.nix_env", &s.paths.nix_env),
        ("paths.determinate_nixd", &s.paths.determinate_nixd),
        ("paths.state_dir", &s.paths.state_dir),
        ("paths.run_dir", &s.paths.run_dir),
    ] {
        line(key, path.display().to_string());
    }
    out
}

/// Merges the file with user-data (the file wins) over the defaults, and validates. Every
/// problem is returned, one line each. `read_token` reads `flakehub.token_file`.
pub fn resolve(
    file: &FileConfig,
    user: Option<&UserSettings>,
    read_token: impl Fn(&Path) -> std::io::Result<String>,
) -> Result<Settings, Vec<String>> {
    let mut problems = Vec::new();
    let flake = match (&file.flake, user.and_then(|u| u.flake.clone())) {
        (Some(text), _) => match text.parse::<FlakeRef>() {
            Ok(f) => Some(f),
            Err(e) => {
                problems.push(format!("flake: {e}"));
                None
            }
        },
        (None, from_user) => from_user,
    };
    let mut seconds = |key: &str,
                       text: Option<&str>,
                       from_user: Option<Duration>,
                       default: Duration| match (text, from_user) {
        (None, Some(d)) => d,
        (text, _) => duration(key, text, default).unwrap_or_else(|e| {
            problems.push(e);
            default
        }),
    };
    let poll_interval = seconds(
        "poll_interval",
        file.poll_interval.as_deref(),
        user.and_then(|u| u.poll_interval),
        Duration::from_secs(60),
    );
    let max_backoff = seconds(
        "max_backoff",
        file.max_backoff.as_deref(),
        None,
        Duration::from_secs(600),
    );
    let apply_timeout = seconds(
        "apply.timeout",
        file.apply.timeout.as_deref(),
        None,
        Duration::from_secs(3600),
    );
    let confirm_timeout = seconds(
        "confirm_timeout",
        file.confirm_timeout.as_deref(),
        user.and_then(|u| u.confirm_timeout),
        Duration::from_secs(120),
    );
    let token = match &file.flakehub.token_file {
        Some(path) if !path.is_absolute() => {
            problems.push(format!(
                "flakehub.token_file: '{}' is not an absolute path",
                path.display()
            ));
            None
        }
        Some(path) if path.starts_with("/nix/store") => {
            problems.push(format!(
                "flakehub.token_file: {} is in the Nix store, which every user can read; keep the token in a root-only file outside the store (for example /run/secrets/flakehub)",
                path.display()
            ));
            None
        }
        Some(path) => match read_token(path) {
            Ok(text) if !text.trim().is_empty() && !text.trim().contains(char::is_whitespace) => {
                Some(Token::File(path.clone(), Secret::new(text.trim())))
            }
            Ok(_) => {
                problems.push(format!(
                    "flakehub.token_file: {} does not hold a token (one word, no spaces)",
                    path.display()
                ));
                None
            }
            Err(e) => {
                problems.push(format!(
                    "flakehub.token_file: cannot read {}: {e}",
                    path.display()
                ));
                None
            }
        },
        None => user
            .and_then(|u| u.flakehub_token.clone())
            .map(Token::UserData),
    };
    let flakehub_api_url = file
        .flakehub
        .api_url
        .clone()
        .unwrap_or_else(|| crate::agent::flakehub::DEFAULT_API_URL.to_string());
    if reqwest::Url::parse(&flakehub_api_url)
        .map_or(true, |u| !matches!(u.scheme(), "http" | "https"))
    {
        problems.push(format!(
            "flakehub.api_url: '{flakehub_api_url}' is not an http(s) URL"
        ));
    }
    let metadata_url = file
        .metadata
        .url
        .clone()
        .unwrap_or_else(|| crate::boot::metadata::client::DEFAULT_URL.to_string());
    if reqwest::Url::parse(&metadata_url).map_or(true, |u| !matches!(u.scheme(), "http" | "https"))
    {
        problems.push(format!(
            "metadata.url: '{metadata_url}' is not an http(s) URL"
        ));
    }
    let min_release_age = match (
        file.min_release_age.as_deref(),
        user.and_then(|u| u.min_release_age),
    ) {
        (None, Some(d)) => d,
        (None, None) => Duration::ZERO,
        // Zero is a valid age here (canaries), unlike for the other durations.
        (Some(t), _) => humantime::parse_duration(t).unwrap_or_else(|_| {
            problems.push(format!(
                "min_release_age: '{t}' is not a duration (for example 0s, 2h)"
            ));
            Duration::ZERO
        }),
    };
    let mut health_checks = Vec::new();
    for (i, c) in file.health_check.iter().enumerate() {
        match crate::agent::health::Check::from_config(c, i) {
            Ok(check) => health_checks.push(check),
            Err(e) => problems.push(e),
        }
    }
    let reboot = file
        .reboot
        .or_else(|| user.and_then(|u| u.reboot))
        .unwrap_or_default();
    // The window is checked whenever it is written, so that a typo shows before it matters.
    let reboot_window = match (&file.reboot_window, reboot) {
        (Some(w), _) => w.resolve().map_err(|e| problems.extend(e)).ok(),
        (None, crate::agent::reboot::Policy::Window) => {
            crate::agent::reboot::WindowConfig::default()
                .resolve()
                .map_err(|e| problems.extend(e))
                .ok()
        }
        (None, _) => None,
    };
    let mut lenient = |key: &str, text: Option<&str>, default: Duration| match text {
        None => default,
        Some(t) => humantime::parse_duration(t).unwrap_or_else(|_| {
            problems.push(format!(
                "{key}: '{t}' is not a duration (for example 1m, 0s)"
            ));
            default
        }),
    };
    let reboot_grace = lenient(
        "reboot_grace",
        file.reboot_grace.as_deref(),
        Duration::from_secs(60),
    );
    let reboot_inhibitor_timeout = lenient(
        "reboot_inhibitor_timeout",
        file.reboot_inhibitor_timeout.as_deref(),
        Duration::from_secs(600),
    );
    let hooks = crate::agent::hooks::Hook::from_configs(&file.hook).unwrap_or_else(|e| {
        problems.extend(e);
        Vec::new()
    });
    let metrics = match &file.metrics {
        None => crate::agent::metrics::Metrics::default(),
        Some(m) => crate::agent::metrics::Metrics::from_config(m).unwrap_or_else(|e| {
            problems.extend(e);
            crate::agent::metrics::Metrics::default()
        }),
    };
    // The file wins key by key over user-data's `fleet` mapping.
    let fleet = match (&file.fleet, user.and_then(|u| u.fleet.as_ref())) {
        (None, None) => None,
        (Some(f), None) => Some(f.clone()),
        (None, Some(u)) => Some(u.clone()),
        (Some(f), Some(u)) => Some(f.or(u)),
    }
    .and_then(|f| f.resolve().map_err(|e| problems.extend(e)).ok());
    let retry_limit = file.retry_limit.unwrap_or(3);
    if retry_limit == 0 {
        problems.push("retry_limit: must be at least 1".to_string());
    }
    let d = Paths::default();
    let p = &file.paths;
    let paths = Paths {
        state_dir: p.state_dir.clone().unwrap_or(d.state_dir),
        run_dir: p.run_dir.clone().unwrap_or(d.run_dir),
        current_system: p.current_system.clone().unwrap_or(d.current_system),
        booted_system: p.booted_system.clone().unwrap_or(d.booted_system),
        system_profile: p.system_profile.clone().unwrap_or(d.system_profile),
        fh: p.fh.clone().unwrap_or(d.fh),
        determinate_nixd: p.determinate_nixd.clone().unwrap_or(d.determinate_nixd),
        nix: p.nix.clone().unwrap_or(d.nix),
        nix_env: p.nix_env.clone().unwrap_or(d.nix_env),
        fh_auth_file: p.fh_auth_file.clone().unwrap_or(d.fh_auth_file),
        switch_lock: p.switch_lock.clone().unwrap_or(d.switch_lock),
        boot_id: p.boot_id.clone().unwrap_or(d.boot_id),
    };
    for (key, path) in [
        ("paths.state_dir", &paths.state_dir),
        ("paths.run_dir", &paths.run_dir),
        ("paths.current_system", &paths.current_system),
        ("paths.booted_system", &paths.booted_system),
        ("paths.system_profile", &paths.system_profile),
        ("paths.fh_auth_file", &paths.fh_auth_file),
    ] {
        if !path.is_absolute() {
            problems.push(format!(
                "{key}: '{}' is not an absolute path",
                path.display()
            ));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Settings {
        flake,
        operation: file
            .operation
            .or_else(|| user.and_then(|u| u.operation))
            .unwrap_or_default(),
        poll_interval,
        max_backoff,
        retry_limit,
        flakehub_api_url,
        token,
        metadata_url,
        apply_mode: file.apply.mode.unwrap_or_default(),
        apply_timeout,
        require_agent: file.apply.require_agent.unwrap_or(true),
        confirm_timeout,
        min_release_age,
        health_checks,
        reboot,
        reboot_window,
        reboot_grace,
        reboot_inhibitor_timeout,
        hooks,
        metrics,
        fleet,
        paths,
    })
}

#[cfg(test)]
mod tests;

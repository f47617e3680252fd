//! The agent's configuration: the TOML file, user-data filling its gaps, validated settings.
//!
//! Two layers. Every source (the TOML file, the file the NixOS module renders, the user-data's
//! `hcloud_nixos` section, JSON for `config check --json`) decodes into one raw shape
//! (`RawConfig`, every key optional); the sources merge key by key, the file winning over
//! user-data; one pass (`validate`) turns the merged shape into [`Settings`], reading every
//! duration and number by one table of bounds (`bounds`).

pub(crate) mod bounds;
pub(crate) mod raw;
mod validate;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::agent::flakeref::FlakeRef;
use crate::agent::userdata::UserSettings;
use crate::plumbing::secret::Secret;
use crate::plumbing::text::one_line;

pub(crate) use raw::RawConfig;
use raw::{Merge, shown};

/// The configuration file as written: the raw shape every source shares.
pub type FileConfig = RawConfig;

/// What `fh apply nixos` is asked to do with a new closure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Operation {
    /// Activate now and make it the boot default.
    #[default]
    Switch,
    /// Make it the boot default; it runs after the next reboot.
    Boot,
    /// Activate now without making it the boot default.
    Test,
}

impl Operation {
    pub(crate) fn as_str(self) -> &'static str {
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
                "{} is not an operation; use switch, boot or test",
                shown(other)
            )),
        }
    }
}

/// How `fh apply` is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum ApplyMode {
    /// In a transient systemd unit of its own, so that it survives the agent's restart.
    #[default]
    TransientUnit,
    /// As the agent's child process (machines without systemd, tests).
    Direct,
}

/// Every path the agent touches, with its NixOS default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Paths {
    pub(crate) state_dir: PathBuf,
    /// Runtime files: the PID file, the lock, a token on its way to determinate-nixd.
    pub(crate) run_dir: PathBuf,
    pub(crate) current_system: PathBuf,
    pub(crate) booted_system: PathBuf,
    pub(crate) system_profile: PathBuf,
    pub(crate) fh: PathBuf,
    pub(crate) determinate_nixd: PathBuf,
    pub(crate) nix: PathBuf,
    /// Sets the system profile back to the previous system in a rollback.
    pub(crate) nix_env: PathBuf,
    /// fh's own token file, used where determinate-nixd is absent.
    pub(crate) fh_auth_file: PathBuf,
    /// NixOS's switch-to-configuration lock; held while someone switches by hand.
    pub(crate) switch_lock: PathBuf,
    /// This boot's identity, to tell that a reboot happened.
    pub(crate) boot_id: PathBuf,
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
pub(crate) enum Token {
    /// `flakehub.token_file` in the configuration; read when settings are loaded.
    File(PathBuf, Secret),
    /// `flakehub_token` in user-data.
    UserData(Secret),
}

impl Token {
    pub(crate) fn secret(&self) -> &Secret {
        match self {
            Token::File(_, s) | Token::UserData(s) => s,
        }
    }

    pub(crate) fn origin(&self) -> String {
        match self {
            Token::File(path, _) => path.display().to_string(),
            Token::UserData(_) => "user-data".to_string(),
        }
    }
}

/// Validated settings the rest of the agent trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub(crate) flake: Option<FlakeRef>,
    pub(crate) operation: Operation,
    pub(crate) poll_interval: Duration,
    pub(crate) max_backoff: Duration,
    /// Attempts at one store path before it is given up until a different release appears.
    pub(crate) retry_limit: u32,
    pub(crate) flakehub_api_url: String,
    pub(crate) token: Option<Token>,
    pub(crate) metadata_url: String,
    pub(crate) apply_mode: ApplyMode,
    /// How long one `fh apply` may take before it counts as failed.
    pub(crate) apply_timeout: Duration,
    /// Refuse a release that does not contain the agent, its configuration and its programs.
    pub(crate) require_agent: bool,
    /// How long a new system has to prove healthy before it is rolled back.
    pub(crate) confirm_timeout: Duration,
    /// A release is applied only once it has been published this long.
    pub(crate) min_release_age: Duration,
    pub(crate) health_checks: Vec<crate::agent::health::Check>,
    /// When to reboot into a new kernel.
    pub(crate) reboot: crate::agent::reboot::Policy,
    /// The maintenance window, for `reboot = "window"`.
    pub(crate) reboot_window: Option<crate::agent::reboot::Window>,
    /// Between the wall message and the reboot.
    pub(crate) reboot_grace: Duration,
    /// How long a reboot waits for block-mode inhibitor locks before it is postponed.
    pub(crate) reboot_inhibitor_timeout: Duration,
    pub(crate) hooks: Vec<crate::agent::hooks::Hook>,
    pub(crate) metrics: crate::agent::metrics::Metrics,
    /// Deploys and reboots take turns with the other servers of a group.
    pub(crate) fleet: Option<crate::fleet::Fleet>,
    pub(crate) paths: Paths,
}

/// Where the agent reads its configuration file unless `--config` names another.
pub const DEFAULT_CONFIG: &str = "/etc/hcloud-nixos/agent.toml";

/// Parses the TOML text; errors are one line and name the key.
pub fn parse_file(text: &str) -> Result<FileConfig, String> {
    let line_of = |e: &toml::de::Error| match e.span() {
        // A span at 0 is the whole document (an unknown top-level key): the message names it.
        Some(span) if span.start > 0 => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: ")
        }
        _ => String::new(),
    };
    // The parser's messages quote the document: one line, whatever it holds.
    let message = |e: &toml::de::Error| {
        let text = crate::plumbing::text::without_secrets(e.message());
        one_line(&text.replace('\n', " "), 300)
    };
    let document =
        toml::Deserializer::parse(text).map_err(|e| format!("{}{}", line_of(&e), message(&e)))?;
    raw::decode(document).map_err(|(key, e)| format!("{}{key}{}", line_of(&e), message(&e)))
}

/// Parses the settings as JSON (what the NixOS module hands `pkgs.formats.toml`); nothing may
/// follow them. The error is one line and names the key.
pub fn parse_json(text: &str) -> Result<FileConfig, String> {
    let mut document = serde_json::Deserializer::from_str(text);
    raw::decode(&mut document)
        .and_then(|file| {
            document
                .end()
                .map(|()| file)
                .map_err(|e| (String::new(), e))
        })
        .map_err(|(key, e)| {
            format!(
                "not the agent's settings as JSON: {key}{}",
                one_line(&crate::plumbing::text::without_secrets(&e.to_string()), 300)
            )
        })
}

/// Reads the configuration file; a missing file means every default.
pub(crate) fn read_file(path: &Path) -> Result<FileConfig, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_file(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FileConfig::default()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
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
        parse_json(&text).map_err(|e| vec![format!("{shown}: {e}")])?
    } else {
        parse_file(&text).map_err(|e| vec![format!("{shown}: {e}")])?
    };
    let settings = check(&file)?;
    Ok(describe(&settings))
}

/// The effective settings, one `key = value` line each, for a person.
pub(crate) fn describe(s: &Settings) -> String {
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

/// Merges the file with user-data (the file wins, key by key) over the defaults, and validates.
/// Every problem is returned, one line each. `read_token` reads `flakehub.token_file`.
pub(crate) fn resolve(
    file: &FileConfig,
    user: Option<&UserSettings>,
    read_token: impl Fn(&Path) -> std::io::Result<String>,
) -> Result<Settings, Vec<String>> {
    let mut problems = Vec::new();
    if file.flakehub_token.is_some() {
        problems.push(
            "flakehub_token: not read from the configuration file, which the Nix store shows to every user; write the token to a root-only file and name it in flakehub.token_file, or give it in user-data".to_string(),
        );
    }
    let merged = match user {
        Some(user) => file.clone().merge(user.clone()),
        None => file.clone(),
    };
    match validate::settings(&merged, read_token) {
        Ok(settings) if problems.is_empty() => Ok(settings),
        Ok(_) => Err(problems),
        Err(more) => {
            problems.extend(more);
            Err(problems)
        }
    }
}

/// The problems of one source read on its own (no file is read, no default is questioned): how
/// user-data's keys are checked by the same rules as the file's before they are merged.
pub(crate) fn problems_of(source: &RawConfig) -> Vec<String> {
    let no_file = |_: &Path| Err(std::io::Error::from(std::io::ErrorKind::NotFound));
    validate::settings(source, no_file)
        .err()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;

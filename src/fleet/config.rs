//! The `[fleet]` section (and the `fleet` mapping of user-data) and its validation.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which engine coordinates the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Backend {
    #[serde(rename = "etcd")]
    Etcd,
    #[serde(rename = "fleetlock")]
    FleetLock,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Etcd => "etcd",
            Backend::FleetLock => "fleetlock",
        }
    }
}

/// `[fleet]` as written, every key optional; unknown keys are errors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    pub group: Option<String>,
    pub slots: Option<i64>,
    pub backend: Option<Backend>,
    pub canary: Option<bool>,
    pub pause_on_failure: Option<bool>,
    pub etcd: Option<EtcdConfig>,
    pub fleetlock: Option<FleetLockConfig>,
}

/// `[fleet.etcd]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    pub endpoints: Option<Vec<String>>,
    pub prefix: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// How long a slot outlives a server that stopped refreshing it (default 30s).
    pub lease_ttl: Option<String>,
    /// How long a slot taken for a reboot is kept without refresh (default 15m).
    pub reboot_ttl: Option<String>,
}

/// `[fleet.fleetlock]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetLockConfig {
    pub url: Option<String>,
}

/// Validated fleet settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fleet {
    pub group: String,
    pub slots: u32,
    pub backend: Backend,
    pub canary: bool,
    pub pause_on_failure: bool,
    pub etcd: Option<EtcdSettings>,
    pub fleetlock: Option<FleetLockSettings>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    /// URLs (`http://` or `https://`).
    pub endpoints: Vec<String>,
    /// Starts with `/`, no trailing `/`.
    pub prefix: String,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub lease_ttl: Duration,
    pub reboot_ttl: Duration,
}

impl EtcdSettings {
    pub fn tls(&self) -> bool {
        self.ca_file.is_some()
            || self.cert_file.is_some()
            || self.endpoints.iter().any(|e| e.starts_with("https://"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetLockSettings {
    /// The server's base URL, without a trailing `/`.
    pub url: String,
}

/// The `fleet` mapping of user-data, with the same keys as `[fleet]`. The problems do not name
/// the section (the caller puts `hcloud_nixos.fleet: ` before them); the keys' values are
/// checked by [`FleetConfig::resolve`].
pub fn from_user_data(value: &serde_json::Value) -> Result<FleetConfig, Vec<String>> {
    serde_json::from_value(value.clone()).map_err(|e| vec![e.to_string()])
}

fn group_ok(group: &str) -> bool {
    !group.is_empty()
        && group.len() <= 63
        && group
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn ttl(key: &str, text: Option<&str>, default: Duration, problems: &mut Vec<String>) -> Duration {
    let Some(t) = text else { return default };
    match humantime::parse_duration(t) {
        Ok(d) if d >= Duration::from_secs(2) => d,
        _ => {
            problems.push(format!(
                "{key}: '{t}' is not a duration of at least 2s (for example 30s, 15m)"
            ));
            default
        }
    }
}

impl FleetConfig {
    /// Key by key, `self` (the configuration file) wins over `other` (user-data).
    pub fn or(&self, other: &FleetConfig) -> FleetConfig {
        let etcd = match (&self.etcd, &other.etcd) {
            (Some(a), Some(b)) => Some(EtcdConfig {
                endpoints: a.endpoints.clone().or_else(|| b.endpoints.clone()),
                prefix: a.prefix.clone().or_else(|| b.prefix.clone()),
                ca_file: a.ca_file.clone().or_else(|| b.ca_file.clone()),
                cert_file: a.cert_file.clone().or_else(|| b.cert_file.clone()),
                key_file: a.key_file.clone().or_else(|| b.key_file.clone()),
                lease_ttl: a.lease_ttl.clone().or_else(|| b.lease_ttl.clone()),
                reboot_ttl: a.reboot_ttl.clone().or_else(|| b.reboot_ttl.clone()),
            }),
            (a, b) => a.clone().or_else(|| b.clone()),
        };
        let fleetlock = match (&self.fleetlock, &other.fleetlock) {
            (Some(a), Some(b)) => Some(FleetLockConfig {
                url: a.url.clone().or_else(|| b.url.clone()),
            }),
            (a, b) => a.clone().or_else(|| b.clone()),
        };
        FleetConfig {
            group: self.group.clone().or_else(|| other.group.clone()),
            slots: self.slots.or(other.slots),
            backend: self.backend.or(other.backend),
            canary: self.canary.or(other.canary),
            pause_on_failure: self.pause_on_failure.or(other.pause_on_failure),
            etcd,
            fleetlock,
        }
    }

    /// One line for `hcloud-nixos userdata` and the like: "group web, 2 slots, etcd".
    pub fn summary(&self) -> String {
        let mut parts = vec![format!(
            "group {}",
            self.group.as_deref().unwrap_or("(none)")
        )];
        if let Some(n) = self.slots {
            parts.push(format!("{n} slot{}", if n == 1 { "" } else { "s" }));
        }
        if let Some(b) = self.backend {
            parts.push(b.as_str().to_string());
        }
        if self.canary == Some(true) {
            parts.push("canary".into());
        }
        if let Some(p) = self.pause_on_failure {
            parts.push(format!("pause_on_failure {p}"));
        }
        parts.join(", ")
    }

    /// Validates; every problem is one line naming the key.
    pub fn resolve(&self) -> Result<Fleet, Vec<String>> {
        let mut problems = Vec::new();
        let group = match self.group.as_deref() {
            Some(g) if group_ok(g) => g.to_string(),
            Some(g) => {
                problems.push(format!(
                    "fleet.group: '{g}' is not a group name (letters, digits, '-', '_', '.'; at most 63)"
                ));
                String::new()
            }
            None => {
                problems.push("fleet.group: missing (servers of one group share the slots)".into());
                String::new()
            }
        };
        let slots = match self.slots {
            None => 1,
            Some(n) if (1..=1000).contains(&n) => n as u32,
            Some(n) => {
                problems.push(format!("fleet.slots: {n} is not between 1 and 1000"));
                1
            }
        };
        let backend = match (self.backend, &self.etcd, &self.fleetlock) {
            (Some(b), _, _) => Some(b),
            (None, Some(_), None) => Some(Backend::Etcd),
            (None, None, Some(_)) => Some(Backend::FleetLock),
            _ => {
                problems.push("fleet.backend: missing (etcd or fleetlock)".into());
                None
            }
        };
        let canary = self.canary.unwrap_or(false);
        let mut pause_on_failure = self.pause_on_failure.unwrap_or(true);
        let mut etcd = None;
        let mut fleetlock = None;
        match backend {
            Some(Backend::Etcd) => {
                let c = self.etcd.clone().unwrap_or_default();
                let endpoints = c.endpoints.clone().unwrap_or_default();
                if endpoints.is_empty() {
                    problems.push(
                        "fleet.etcd.endpoints: missing (for example [\"https://10.0.0.5:2379\"])"
                            .into(),
                    );
                }
                for e in &endpoints {
                    if reqwest::Url::parse(e).map_or(true, |u| {
                        !matches!(u.scheme(), "http" | "https") || u.host_str().is_none()
                    }) {
                        problems.push(format!(
                            "fleet.etcd.endpoints: '{e}' is not an http(s) URL (for example https://10.0.0.5:2379)"
                        ));
                    }
                }
                let prefix = c.prefix.clone().unwrap_or_else(|| "/hcloud-nixos".into());
                let prefix = prefix.trim_end_matches('/').to_string();
                if !prefix.starts_with('/') || prefix.contains("//") {
                    problems.push(format!(
                        "fleet.etcd.prefix: '{prefix}' must start with '/' (for example /hcloud-nixos)"
                    ));
                }
                if c.cert_file.is_some() != c.key_file.is_some() {
                    problems.push(
                        "fleet.etcd.cert_file: a client certificate needs both cert_file and key_file"
                            .into(),
                    );
                }
                if c.ca_file.is_some() || c.cert_file.is_some() {
                    for e in &endpoints {
                        if e.starts_with("http://") {
                            problems.push(format!(
                                "fleet.etcd.endpoints: '{e}' is plain http but TLS files are given (use https://)"
                            ));
                        }
                    }
                }
                for (key, path) in [
                    ("fleet.etcd.ca_file", &c.ca_file),
                    ("fleet.etcd.cert_file", &c.cert_file),
                    ("fleet.etcd.key_file", &c.key_file),
                ] {
                    if let Some(p) = path
                        && !p.is_absolute()
                    {
                        problems.push(format!("{key}: '{}' is not an absolute path", p.display()));
                    }
                }
                let lease_ttl = ttl(
                    "fleet.etcd.lease_ttl",
                    c.lease_ttl.as_deref(),
                    Duration::from_secs(30),
                    &mut problems,
                );
                let reboot_ttl = ttl(
                    "fleet.etcd.reboot_ttl",
                    c.reboot_ttl.as_deref(),
                    Duration::from_secs(15 * 60),
                    &mut problems,
                );
                etcd = Some(EtcdSettings {
                    endpoints,
                    prefix,
                    ca_file: c.ca_file,
                    cert_file: c.cert_file,
                    key_file: c.key_file,
                    lease_ttl,
                    reboot_ttl,
                });
            }
            Some(Backend::FleetLock) => {
                match self.fleetlock.as_ref().and_then(|f| f.url.clone()) {
                    None => problems.push(
                        "fleet.fleetlock.url: missing (for example http://fleetlock.internal:8080)"
                            .into(),
                    ),
                    Some(url)
                        if reqwest::Url::parse(&url)
                            .map_or(true, |u| !matches!(u.scheme(), "http" | "https")) =>
                    {
                        problems.push(format!(
                            "fleet.fleetlock.url: '{url}' is not an http(s) URL"
                        ))
                    }
                    Some(url) => {
                        fleetlock = Some(FleetLockSettings {
                            url: url.trim_end_matches('/').to_string(),
                        })
                    }
                }
                if canary {
                    problems.push(
                        "fleet.canary: the fleetlock backend cannot express canaries (use etcd)"
                            .into(),
                    );
                }
                if self.pause_on_failure == Some(true) {
                    problems.push(
                        "fleet.pause_on_failure: the fleetlock backend cannot record failed releases (use etcd, or set it to false)"
                            .into(),
                    );
                }
                pause_on_failure = false;
            }
            None => {}
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Fleet {
            group,
            slots,
            backend: backend.expect("checked above"),
            canary,
            pause_on_failure,
            etcd,
            fleetlock,
        })
    }
}

//! The `[fleet]` section (and the `fleet` mapping of user-data) and its validation.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::url::{ServerUrl, redact};
use crate::agent::config::bounds;

/// Which engine coordinates the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Backend {
    /// etcd v3: slots, pauses, canaries and member records (`backend = "etcd"`).
    #[serde(rename = "etcd")]
    Etcd,
    /// A FleetLock server (airlock, Kubernetes FleetLock): slots only (`backend = "fleetlock"`).
    #[serde(rename = "fleetlock")]
    FleetLock,
}

impl Backend {
    pub(crate) fn as_str(self) -> &'static str {
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
    /// `fleet.group`: the servers of one group share the slots (required).
    pub group: Option<String>,
    /// `fleet.slots`: at most this many servers deploying or rebooting at once (default 1;
    /// checked against the table of bounds, so any integer is accepted here).
    pub slots: Option<i64>,
    /// `fleet.backend` (required).
    pub backend: Option<Backend>,
    /// `fleet.canary`: this server is the group's canary (default false; etcd only).
    pub canary: Option<bool>,
    /// `fleet.pause_on_failure`: a release that fails here is paused for the whole group
    /// (default true with etcd; FleetLock cannot record pauses).
    pub pause_on_failure: Option<bool>,
    /// `[fleet.etcd]`, required with the etcd backend.
    pub etcd: Option<EtcdConfig>,
    /// `[fleet.fleetlock]`, required with the fleetlock backend.
    pub fleetlock: Option<FleetLockConfig>,
}

/// `[fleet.etcd]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    pub(crate) endpoints: Option<Vec<String>>,
    pub(crate) prefix: Option<String>,
    /// The CA certificate (PEM) etcd's certificate is checked against; None uses the system's
    /// roots (for `https://` endpoints).
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM) for etcd's mutual TLS; None sends none. Needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM); None with `cert_file` None.
    pub key_file: Option<PathBuf>,
    /// How long a slot outlives a server that stopped refreshing it (default 30s).
    #[serde(default, deserialize_with = "crate::agent::config::raw::duration")]
    pub(crate) lease_ttl: Option<String>,
    /// How long a slot taken for a reboot is kept without refresh (default 15m).
    #[serde(default, deserialize_with = "crate::agent::config::raw::duration")]
    pub reboot_ttl: Option<String>,
}

/// `[fleet.fleetlock]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetLockConfig {
    pub(crate) url: Option<String>,
}

/// Validated fleet settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fleet {
    /// The group's name, checked (letters, digits, `-`, `_`, `.`; at most 63).
    pub group: String,
    pub(crate) slots: u32,
    pub(crate) backend: Backend,
    pub(crate) canary: bool,
    pub(crate) pause_on_failure: bool,
    pub(crate) etcd: Option<EtcdSettings>,
    pub(crate) fleetlock: Option<FleetLockSettings>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EtcdSettings {
    /// URLs (`http://` or `https://`); credentials in them (`user:password@`, the same on every
    /// endpoint) are etcd's user authentication.
    pub(crate) endpoints: Vec<ServerUrl>,
    /// Starts with `/`, no trailing `/`.
    pub(crate) prefix: String,
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) cert_file: Option<PathBuf>,
    pub(crate) key_file: Option<PathBuf>,
    pub(crate) lease_ttl: Duration,
    pub(crate) reboot_ttl: Duration,
}

impl EtcdSettings {
    pub(crate) fn tls(&self) -> bool {
        self.ca_file.is_some()
            || self.cert_file.is_some()
            || self
                .endpoints
                .iter()
                .any(|e| e.expose().starts_with("https://"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FleetLockSettings {
    /// The server's base URL, without a trailing `/`; credentials in it are sent as HTTP basic
    /// authentication.
    pub(crate) url: ServerUrl,
}

/// The `fleet` mapping of user-data, with the same keys as `[fleet]`. The problems do not name
/// the section (the caller puts `hcloud_nixos.fleet: ` before them); the keys' values are
/// checked by [`FleetConfig::resolve`].
pub fn from_user_data(value: &serde_json::Value) -> Result<FleetConfig, Vec<String>> {
    serde_json::from_value(value.clone()).map_err(|e| vec![e.to_string()])
}

/// A group name as `--group` gives it: `Err` with one line when it is none.
pub(crate) fn check_group(group: &str) -> Result<(), String> {
    if group_ok(group) {
        Ok(())
    } else {
        Err(format!(
            "--group: {} is not a group name (letters, digits, '-', '_', '.'; at most 63)",
            crate::agent::config::raw::shown(group)
        ))
    }
}

fn group_ok(group: &str) -> bool {
    !group.is_empty()
        && group.len() <= 63
        && group
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn http_url(text: &str) -> bool {
    reqwest::Url::parse(text).is_ok_and(|u| {
        matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty())
    })
}

impl FleetConfig {
    /// Key by key, `self` (the configuration file) wins over `other` (user-data).
    #[cfg(test)]
    pub(crate) fn or(&self, other: &FleetConfig) -> FleetConfig {
        use crate::agent::config::raw::Merge as _;
        self.clone().merge(other.clone())
    }

    /// One line for `hcloud-nixos userdata` and the like: "group web, 2 slots, etcd".
    pub(crate) fn summary(&self) -> String {
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
                    "fleet.group: {} is not a group name (letters, digits, '-', '_', '.'; at most 63)",
                    crate::agent::config::raw::shown(g)
                ));
                String::new()
            }
            None => {
                problems.push("fleet.group: missing (servers of one group share the slots)".into());
                String::new()
            }
        };
        let slots = bounds::FLEET_SLOTS
            .read(bounds::FLEET_SLOTS.key, self.slots)
            .unwrap_or_else(|e| {
                problems.push(e);
                bounds::FLEET_SLOTS.default
            });
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
        let (mut etcd, mut fleetlock) = (None, None);
        match backend {
            Some(Backend::Etcd) => {
                etcd = Some(
                    self.etcd
                        .clone()
                        .unwrap_or_default()
                        .settings(&mut problems),
                );
            }
            Some(Backend::FleetLock) => {
                fleetlock = self.fleetlock_settings(&mut problems);
                pause_on_failure = false;
            }
            None => {}
        }
        match backend {
            Some(backend) if problems.is_empty() => Ok(Fleet {
                group,
                slots,
                backend,
                canary,
                pause_on_failure,
                etcd,
                fleetlock,
            }),
            _ => Err(problems),
        }
    }

    /// The FleetLock server, and what that backend cannot express.
    fn fleetlock_settings(&self, problems: &mut Vec<String>) -> Option<FleetLockSettings> {
        if self.canary == Some(true) {
            problems.push(
                "fleet.canary: the fleetlock backend cannot express canaries (use etcd)".into(),
            );
        }
        if self.pause_on_failure == Some(true) {
            problems.push(
                "fleet.pause_on_failure: the fleetlock backend cannot record failed releases (use etcd, or set it to false)"
                    .into(),
            );
        }
        match self.fleetlock.as_ref().and_then(|f| f.url.as_deref()) {
            None => {
                problems.push(
                    "fleet.fleetlock.url: missing (for example http://fleetlock.internal:8080)"
                        .into(),
                );
                None
            }
            Some(url) if !http_url(url) => {
                problems.push(format!(
                    "fleet.fleetlock.url: {} is not an http(s) URL",
                    crate::agent::config::raw::shown(&redact(url))
                ));
                None
            }
            Some(url) => Some(FleetLockSettings {
                url: ServerUrl::new(url),
            }),
        }
    }
}

impl EtcdConfig {
    /// Validates `[fleet.etcd]`; problems are added to `problems`.
    fn settings(self, problems: &mut Vec<String>) -> EtcdSettings {
        let endpoints = self.endpoints.unwrap_or_default();
        if endpoints.is_empty() {
            problems.push(
                "fleet.etcd.endpoints: missing (for example [\"https://10.0.0.5:2379\"])".into(),
            );
        }
        let tls_files = self.ca_file.is_some() || self.cert_file.is_some();
        for e in &endpoints {
            let shown = crate::agent::config::raw::shown(&redact(e));
            if !http_url(e) {
                problems.push(format!(
                    "fleet.etcd.endpoints: {shown} is not an http(s) URL (for example https://10.0.0.5:2379)"
                ));
            } else if tls_files && e.starts_with("http://") {
                problems.push(format!(
                    "fleet.etcd.endpoints: {shown} is plain http but TLS files are given (use https://)"
                ));
            }
        }
        let endpoints: Vec<ServerUrl> = endpoints.iter().map(|e| ServerUrl::new(e)).collect();
        let users: Vec<Option<(String, String)>> =
            endpoints.iter().map(ServerUrl::credentials).collect();
        if users.windows(2).any(|w| w[0] != w[1]) {
            problems.push(
                "fleet.etcd.endpoints: the endpoints carry different credentials (give the same user:password@ on every endpoint, or none)"
                    .into(),
            );
        }
        let prefix = self.prefix.unwrap_or_else(|| "/hcloud-nixos".into());
        let prefix = prefix.trim_end_matches('/').to_string();
        if !prefix.starts_with('/') || prefix.contains("//") {
            problems.push(format!(
                "fleet.etcd.prefix: {} must start with '/' (for example /hcloud-nixos)",
                crate::agent::config::raw::shown(&prefix)
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            problems.push(
                "fleet.etcd.cert_file: a client certificate needs both cert_file and key_file"
                    .into(),
            );
        }
        for (key, path) in [
            ("fleet.etcd.ca_file", &self.ca_file),
            ("fleet.etcd.cert_file", &self.cert_file),
            ("fleet.etcd.key_file", &self.key_file),
        ] {
            if let Some(p) = path
                && !p.is_absolute()
            {
                problems.push(format!("{key}: '{}' is not an absolute path", p.display()));
            }
        }
        let mut ttl = |bound: bounds::DurationBound, text: Option<&str>| {
            bound.read(bound.key, text).unwrap_or_else(|e| {
                problems.push(e);
                bound.default
            })
        };
        let lease_ttl = ttl(bounds::FLEET_LEASE_TTL, self.lease_ttl.as_deref());
        let reboot_ttl = ttl(bounds::FLEET_REBOOT_TTL, self.reboot_ttl.as_deref());
        EtcdSettings {
            endpoints,
            prefix,
            ca_file: self.ca_file,
            cert_file: self.cert_file,
            key_file: self.key_file,
            lease_ttl,
            reboot_ttl,
        }
    }
}

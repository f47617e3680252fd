//! The `hcloud_nixos` section: which keys user-data may set, each read into the configuration's
//! raw shape and checked by the configuration's own rules, and how `userdata check` shows them.

use serde_json::Value;

use super::{SECTION, UserSettings};
use crate::agent::config::bounds::{self, DurationBound};
use crate::agent::config::raw::{Merge as _, RawConfig, decode, shown};
use crate::agent::flakeref::FlakeRef;

/// One key user-data may set, and how `describe` shows its value (`None`: not set).
pub(super) struct Field {
    pub(super) key: &'static str,
    pub(super) show: fn(&UserSettings) -> Option<String>,
}

/// The keys of the section, in the order they are documented: a later setting is one entry
/// here (parsing, the unknown-key message and `describe` follow it; its value is read and
/// checked as the configuration file's).
pub(super) const FIELDS: &[Field] = &[
    Field {
        key: "flakehub_token",
        show: |s| {
            s.flakehub_token
                .as_ref()
                .map(|t| format!("[redacted] ({} characters)", t.expose().len()))
        },
    },
    Field {
        key: "flake",
        show: |s| {
            s.flake
                .as_deref()
                .map(|text| match text.parse::<FlakeRef>() {
                    Ok(f) if f.attr.is_some() => f.to_string(),
                    Ok(f) => format!("{f} (attribute: nixosConfigurations.<short hostname>)"),
                    Err(_) => shown(text),
                })
        },
    },
    Field {
        key: "poll_interval",
        show: |s| show_duration(&bounds::POLL_INTERVAL, s.poll_interval.as_deref()),
    },
    Field {
        key: "operation",
        show: |s| s.operation.map(|o| o.as_str().to_string()),
    },
    Field {
        key: "confirm_timeout",
        show: |s| show_duration(&bounds::CONFIRM_TIMEOUT, s.confirm_timeout.as_deref()),
    },
    Field {
        key: "min_release_age",
        show: |s| show_duration(&bounds::MIN_RELEASE_AGE, s.min_release_age.as_deref()),
    },
    Field {
        key: "reboot",
        show: |s| s.reboot.map(|p| p.as_str().to_string()),
    },
    Field {
        key: "fleet",
        show: |s| s.fleet.as_ref().map(|f| f.summary()),
    },
];

fn show_duration(bound: &DurationBound, text: Option<&str>) -> Option<String> {
    let text = text?;
    Some(match bound.parse(bound.key, text) {
        Ok(d) => bounds::human(d),
        Err(_) => shown(text),
    })
}

/// The keys the `hcloud_nixos` section knows, in the order they are documented.
pub(crate) fn known_keys() -> impl Iterator<Item = &'static str> {
    FIELDS.iter().map(|f| f.key)
}

fn known_keys_list() -> String {
    known_keys().collect::<Vec<_>>().join(", ")
}

/// "a number", "a list", ...: what a YAML value is, without showing it.
pub(super) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "empty",
        Value::Bool(_) => "true/false",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Edit distance, for "did you mean" on unknown keys.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

fn suggestion(key: &str) -> Option<&'static str> {
    let normal = key.to_ascii_lowercase().replace('-', "_");
    if normal == "token" || normal == "flakehub" {
        return Some("flakehub_token");
    }
    known_keys()
        .map(|k| (distance(&normal, k), k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Reads the `hcloud_nixos` section. A key that is unknown or whose value is wrong is left out
/// and reported, so that the valid rest can still be used.
pub(super) fn parse_section(section: &Value, problems: &mut Vec<String>) -> UserSettings {
    let mut settings = UserSettings::default();
    let map = match section {
        Value::Null => return settings,
        Value::Object(map) => map,
        other => {
            problems.push(format!(
                "{SECTION}: is {}, not a mapping; write the settings indented under it (keys: {})",
                kind(other),
                known_keys_list()
            ));
            return settings;
        }
    };
    for (key, value) in map {
        if !known_keys().any(|k| k == key) {
            let hint = match suggestion(key) {
                Some(k) => format!(" (did you mean {k}?)"),
                None => String::new(),
            };
            problems.push(format!(
                "{SECTION}.{}: unknown key{hint}; known keys are {}",
                super::shown_key(key),
                known_keys_list()
            ));
        } else if !value.is_null() {
            match read_key(key, value) {
                Ok(one) => settings = settings.merge(one),
                Err(e) => problems.extend(e),
            }
        }
    }
    settings
}

/// One key, read as the configuration file's would be: its shape by the shared raw shape, its
/// value by the configuration's own validation. The `fleet` mapping's values are checked once
/// the configuration file has been merged in (it may fill what user-data leaves out).
fn read_key(key: &str, value: &Value) -> Result<UserSettings, Vec<String>> {
    let one = Value::Object([(key.to_string(), value.clone())].into_iter().collect());
    let raw: RawConfig = decode(one).map_err(|(key, e)| vec![format!("{SECTION}.{key}{e}")])?;
    if key == "fleet" {
        return Ok(raw);
    }
    let problems = crate::agent::config::problems_of(&raw);
    if problems.is_empty() {
        Ok(raw)
    } else {
        Err(problems
            .into_iter()
            .map(|p| format!("{SECTION}.{p}"))
            .collect())
    }
}

//! The configuration as every source writes it (the TOML file, the NixOS-rendered file, the
//! user-data's `hcloud_nixos` section, JSON): one shape, every key optional, read by serde.
//!
//! Decoding checks the shape only: known keys (an unknown one is refused, named), the kind of
//! each value (a string, a list, ...) and the closed sets (`operation`, `reboot`, ...). The
//! values themselves (durations and their bounds, references, URLs, paths) are checked in one
//! pass over the merged shape (`validate`), so that every problem is listed at once.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::{ApplyMode, Operation};
use crate::agent::health::CheckConfig;
use crate::agent::hooks::HookConfig;
use crate::agent::metrics::MetricsConfig;
use crate::agent::reboot::{Policy, WindowConfig};
use crate::fleet::{EtcdConfig, FleetConfig, FleetLockConfig};
use crate::plumbing::secret::Secret;

/// Every key of the agent's configuration, as written. Unknown keys are errors: a typo must not
/// silently fall back to a default. Which source may set which key is decided by the source:
/// the file every key but `flakehub_token`, user-data the keys listed in
/// [`crate::agent::userdata`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default, deserialize_with = "text")]
    pub flake: Option<String>,
    /// User-data only: in the file it would land in the world-readable Nix store.
    #[serde(default, deserialize_with = "secret")]
    pub(crate) flakehub_token: Option<Secret>,
    #[serde(default, deserialize_with = "parsed")]
    pub(crate) operation: Option<Operation>,
    #[serde(default, deserialize_with = "duration")]
    pub(crate) poll_interval: Option<String>,
    #[serde(default, deserialize_with = "duration")]
    pub(crate) max_backoff: Option<String>,
    pub(crate) retry_limit: Option<i64>,
    #[serde(default, deserialize_with = "duration")]
    pub(crate) confirm_timeout: Option<String>,
    #[serde(default, deserialize_with = "duration")]
    pub(crate) min_release_age: Option<String>,
    #[serde(default)]
    pub(crate) health_check: Vec<CheckConfig>,
    #[serde(default, deserialize_with = "parsed")]
    pub(crate) reboot: Option<Policy>,
    pub(crate) reboot_window: Option<WindowConfig>,
    #[serde(default, deserialize_with = "duration")]
    pub(crate) reboot_grace: Option<String>,
    #[serde(default, deserialize_with = "duration")]
    pub(crate) reboot_inhibitor_timeout: Option<String>,
    #[serde(default)]
    pub(crate) hook: Vec<HookConfig>,
    pub(crate) metrics: Option<MetricsConfig>,
    pub(crate) fleet: Option<FleetConfig>,
    #[serde(default)]
    pub(crate) flakehub: FlakehubSection,
    #[serde(default)]
    pub(crate) metadata: MetadataSection,
    #[serde(default)]
    pub(crate) apply: ApplySection,
    #[serde(default)]
    pub(crate) paths: PathsSection,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FlakehubSection {
    pub(crate) api_url: Option<String>,
    pub(crate) token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MetadataSection {
    pub(crate) url: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApplySection {
    pub(crate) mode: Option<ApplyMode>,
    #[serde(default, deserialize_with = "duration")]
    pub(crate) timeout: Option<String>,
    /// Refuse a release that does not contain the agent (default true).
    pub(crate) require_agent: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PathsSection {
    pub(crate) state_dir: Option<PathBuf>,
    pub(crate) run_dir: Option<PathBuf>,
    pub(crate) current_system: Option<PathBuf>,
    pub(crate) booted_system: Option<PathBuf>,
    pub(crate) system_profile: Option<PathBuf>,
    pub(crate) fh: Option<PathBuf>,
    pub(crate) determinate_nixd: Option<PathBuf>,
    pub(crate) nix: Option<PathBuf>,
    pub(crate) nix_env: Option<PathBuf>,
    pub(crate) fh_auth_file: Option<PathBuf>,
    pub(crate) switch_lock: Option<PathBuf>,
    pub(crate) boot_id: Option<PathBuf>,
}

/// Decodes the raw shape (or a part of it) from any of the formats. The error comes with the
/// key it is about, as `fleet.etcd.lease_ttl: ` (empty when it is about the whole document).
pub(crate) fn decode<'de, D, T>(document: D) -> Result<T, (String, D::Error)>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    serde_path_to_error::deserialize(document).map_err(|e| {
        // The path is made of the document's own keys: one line, whatever they hold.
        let key = match e.path().to_string().as_str() {
            "." | "" => String::new(),
            key => format!("{}: ", crate::plumbing::text::one_line(key, 100)),
        };
        (key, e.into_inner())
    })
}

// ---------------------------------------------------------------------------------------------
// Merging: key by key, the upper source wins (the file over user-data), inside sections too.

/// Two sources of the same shape merged key by key.
pub(crate) trait Merge {
    /// `self` wins over `under` for every key it sets.
    fn merge(self, under: Self) -> Self;
}

impl<T: Merge> Merge for Option<T> {
    fn merge(self, under: Self) -> Self {
        match (self, under) {
            (Some(a), Some(b)) => Some(a.merge(b)),
            (a, b) => a.or(b),
        }
    }
}

/// `Merge` for a struct: `keys` are values (the upper one wins), `sections` merge in turn,
/// `lists` are taken whole from the upper source when it has any.
macro_rules! merge_by_key {
    ($ty:ty { keys: [$($key:ident),*], sections: [$($section:ident),*], lists: [$($list:ident),*] }) => {
        impl Merge for $ty {
            fn merge(self, under: Self) -> Self {
                Self {
                    $($key: self.$key.or(under.$key),)*
                    $($section: self.$section.merge(under.$section),)*
                    $($list: if self.$list.is_empty() { under.$list } else { self.$list },)*
                }
            }
        }
    };
}

merge_by_key!(RawConfig {
    keys: [
        flake,
        flakehub_token,
        operation,
        poll_interval,
        max_backoff,
        retry_limit,
        confirm_timeout,
        min_release_age,
        reboot,
        reboot_grace,
        reboot_inhibitor_timeout
    ],
    sections: [
        reboot_window,
        metrics,
        fleet,
        flakehub,
        metadata,
        apply,
        paths
    ],
    lists: [health_check, hook]
});
merge_by_key!(FlakehubSection {
    keys: [api_url, token_file],
    sections: [],
    lists: []
});
merge_by_key!(MetadataSection {
    keys: [url],
    sections: [],
    lists: []
});
merge_by_key!(ApplySection {
    keys: [mode, timeout, require_agent],
    sections: [],
    lists: []
});
merge_by_key!(PathsSection {
    keys: [
        state_dir,
        run_dir,
        current_system,
        booted_system,
        system_profile,
        fh,
        determinate_nixd,
        nix,
        nix_env,
        fh_auth_file,
        switch_lock,
        boot_id
    ],
    sections: [],
    lists: []
});
merge_by_key!(WindowConfig {
    keys: [days, start, length, time_zone],
    sections: [],
    lists: []
});
merge_by_key!(MetricsConfig {
    keys: [listen, textfile],
    sections: [],
    lists: []
});
merge_by_key!(FleetConfig {
    keys: [group, slots, backend, canary, pause_on_failure],
    sections: [etcd, fleetlock],
    lists: []
});
merge_by_key!(EtcdConfig {
    keys: [
        endpoints, prefix, ca_file, cert_file, key_file, lease_ttl, reboot_ttl
    ],
    sections: [],
    lists: []
});
merge_by_key!(FleetLockConfig {
    keys: [url],
    sections: [],
    lists: []
});

// ---------------------------------------------------------------------------------------------
// Leaves: a value of the wrong kind is refused with a message that names its kind, never the
// value (it may be the token).

/// A user-given value for a message: quoted, one line, shortened; by its length when it may
/// hold a token.
pub(crate) fn shown(text: &str) -> String {
    crate::plumbing::text::shown_value(text)
}

/// A string leaf: text, or a duration that is still text until it is checked.
#[derive(Clone, Copy)]
enum Leaf {
    Text,
    Duration,
}

impl Leaf {
    fn wrong(self, kind: &str) -> String {
        match (self, kind) {
            (Leaf::Duration, "a number") => {
                "is a number without a unit; write a duration with its unit, e.g. \"60s\"".into()
            }
            (Leaf::Duration, _) => format!("is {kind}, not a duration; write e.g. \"60s\""),
            (Leaf::Text, _) => format!("is {kind}, not a string"),
        }
    }
}

impl<'de> Visitor<'de> for Leaf {
    type Value = Option<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Leaf::Text => "a string",
            Leaf::Duration => "a duration with its unit, e.g. \"60s\"",
        })
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Some(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Err(E::custom(self.wrong("true/false")))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Err(E::custom(self.wrong("a number")))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Err(E::custom(self.wrong("a number")))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Err(E::custom(self.wrong("a number")))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(de::Error::custom(self.wrong("a list")))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(de::Error::custom(self.wrong("a mapping")))
    }
}

/// A string (for `#[serde(deserialize_with)]`; with `default`).
pub(crate) fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    d.deserialize_any(Leaf::Text)
}

/// A duration as written ("90s", "2h"); its value is checked against its bounds later.
pub(crate) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    d.deserialize_any(Leaf::Duration)
}

/// A token; its form is checked later, and no message ever shows it.
pub(crate) fn secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    Ok(text(d)?.map(Secret::new))
}

/// One of a closed set of words (`operation`, `reboot`), by its `FromStr`.
pub(crate) fn parsed<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = String>,
{
    let Some(text) = text(d)? else {
        return Ok(None);
    };
    text.parse::<T>().map(Some).map_err(|e| {
        // One line, whatever the value holds.
        let line: String = e
            .chars()
            .map(|c| {
                if crate::plumbing::text::breaks_a_line(c) {
                    ' '
                } else {
                    c
                }
            })
            .collect();
        de::Error::custom(line)
    })
}

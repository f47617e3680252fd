//! The records the fleet keeps in etcd (slot holders, pauses, canaries, the group's desired
//! release, the members, the poller's candidates), and the one place they are read back: every
//! record from etcd is text from outside, bounded in size, its strings made one printable line.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The largest record read from etcd; anything larger is refused unread.
pub(crate) const MAX_RECORD: usize = 16 * 1024;
/// The longest string kept from a record (a reason, a status line); longer ones are cut.
const MAX_TEXT: usize = 1000;

/// What a slot is taken for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Purpose {
    /// Applying a release.
    Deploy {
        /// The release's exact version.
        release: String,
    },
    /// Rebooting (a new kernel, or a release applied for the next boot).
    Reboot,
}

impl Purpose {
    pub(crate) fn release(&self) -> Option<&str> {
        match self {
            Purpose::Deploy { release } => Some(release),
            Purpose::Reboot => None,
        }
    }

    fn clean(&mut self) {
        if let Purpose::Deploy { release } = self {
            clean(release);
        }
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Purpose::Deploy { release } => write!(f, "deploy {release}"),
            Purpose::Reboot => f.write_str("reboot"),
        }
    }
}

/// A release the group does not start until an operator clears it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    /// The paused release's exact version.
    pub release: String,
    /// The instance id of the server it failed on.
    pub by: String,
    /// Its hostname.
    #[serde(default)]
    pub host: String,
    /// Why it failed there, one line.
    pub reason: String,
    /// RFC 3339.
    pub at: String,
}

/// A server holding one of the group's slots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The slot's index (etcd); absent where the backend does not number slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    /// The holder's Hetzner instance id.
    pub id: String,
    /// Its hostname (empty where the backend does not record it).
    pub host: String,
    /// What it took the slot for.
    pub purpose: Purpose,
    /// RFC 3339.
    pub since: String,
    /// The holder is the group's canary.
    #[serde(default)]
    pub canary: bool,
}

impl Holder {
    /// The name shown to people: the hostname, else the id.
    pub(crate) fn name(&self) -> &str {
        if self.host.is_empty() {
            &self.id
        } else {
            &self.host
        }
    }
}

/// What `canaries/<id>` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CanaryRecord {
    pub(crate) host: String,
    pub(crate) since: String,
}

/// What `confirmed/<release>` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Confirmation {
    pub(crate) by: String,
    pub(crate) host: String,
    pub(crate) at: String,
}

/// What `desired` holds: the release the group should run, written by the group's poller (what
/// FlakeHub resolved) or by `hcloud-nixos fleet announce` (CI, right after publishing). Every
/// agent checks it against FlakeHub before applying it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    /// An exact FlakeHub version (`0.1.43+rev-...`).
    pub version: String,
    /// `org/flake` it is a release of, when the writer knew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flake: Option<String>,
    /// Who wrote it: `poller web-3 (id 1003)`, `announce from ci-runner`.
    pub by: String,
    /// RFC 3339.
    pub at: String,
}

impl Desired {
    /// Written by `fleet announce` (not by a poller).
    pub(crate) fn announced(&self) -> bool {
        self.by.starts_with("announce")
    }
}

/// A fleet slot a member holds, as its record says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldSlot {
    /// The slot's index; None where the backend does not number slots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    /// What it was taken for.
    pub purpose: Purpose,
}

/// The last deploy a member finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastDeploy {
    /// The release's exact version.
    pub version: String,
    /// It was confirmed healthy.
    pub ok: bool,
    /// RFC 3339.
    pub at: String,
    /// Why it failed, one line; None when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `members/<id>` (bound to the member's lease) and `seen/<id>` (its last copy, kept after
/// the lease is gone) hold: one server as its agent last reported it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MemberRecord {
    /// The member's Hetzner instance id (the key's last part).
    pub id: String,
    /// Its hostname.
    pub host: String,
    /// The release it runs; None before its first confirmed deploy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<String>,
    /// The release its reference resolves to; None before its first check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<String>,
    /// A deploy under way: its release and phase (`0.1.43 activate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploying: Option<String>,
    /// The agent's status line.
    #[serde(default)]
    pub status: String,
    /// The last check went well.
    #[serde(default)]
    pub ok: bool,
    /// When the status line last changed (RFC 3339).
    #[serde(default)]
    pub since: String,
    /// The last deploy it finished; None before the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_deploy: Option<LastDeploy>,
    /// The slot it holds; None when it holds none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<HeldSlot>,
    /// This member polls FlakeHub for the group.
    #[serde(default)]
    pub poller: bool,
    /// The slots its configuration gives the group.
    #[serde(default)]
    pub slots: u32,
    /// When the record was written (RFC 3339).
    #[serde(default)]
    pub updated: String,
}

/// What `poller/<lease>` holds: a member standing in the poller's election.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Candidate {
    pub(crate) id: String,
    pub(crate) host: String,
}

impl Candidate {
    pub(crate) fn name(&self) -> String {
        format!("{} (id {})", self.host, self.id)
    }
}

/// A record read back from etcd: every string one printable line of bounded length, and the
/// values that must follow a grammar checked.
pub(crate) trait Record: DeserializeOwned {
    fn clean(&mut self) -> Result<(), String>;
}

impl Record for Holder {
    fn clean(&mut self) -> Result<(), String> {
        clean_all(&mut [&mut self.id, &mut self.host, &mut self.since]);
        self.purpose.clean();
        Ok(())
    }
}

impl Record for Pause {
    fn clean(&mut self) -> Result<(), String> {
        clean_all(&mut [
            &mut self.release,
            &mut self.by,
            &mut self.host,
            &mut self.reason,
            &mut self.at,
        ]);
        Ok(())
    }
}

impl Record for CanaryRecord {
    fn clean(&mut self) -> Result<(), String> {
        clean_all(&mut [&mut self.host, &mut self.since]);
        Ok(())
    }
}

impl Record for Confirmation {
    fn clean(&mut self) -> Result<(), String> {
        clean_all(&mut [&mut self.by, &mut self.host, &mut self.at]);
        Ok(())
    }
}

impl Record for Candidate {
    fn clean(&mut self) -> Result<(), String> {
        clean_all(&mut [&mut self.id, &mut self.host]);
        Ok(())
    }
}

impl Record for Desired {
    fn clean(&mut self) -> Result<(), String> {
        check_version(&self.version)?;
        if let Some(flake) = &self.flake
            && !flake_name_ok(flake)
        {
            return Err(format!(
                "flake {} is not org/flake",
                crate::agent::config::raw::shown(flake)
            ));
        }
        clean_all(&mut [&mut self.by, &mut self.at]);
        Ok(())
    }
}

impl Record for MemberRecord {
    fn clean(&mut self) -> Result<(), String> {
        clean_all(&mut [
            &mut self.id,
            &mut self.host,
            &mut self.status,
            &mut self.since,
            &mut self.updated,
        ]);
        for text in [&mut self.running, &mut self.desired, &mut self.deploying]
            .into_iter()
            .flatten()
        {
            clean(text);
        }
        if let Some(d) = &mut self.last_deploy {
            clean_all(&mut [&mut d.version, &mut d.at]);
            if let Some(e) = &mut d.error {
                clean(e);
            }
        }
        if let Some(s) = &mut self.slot {
            s.purpose.clean();
        }
        Ok(())
    }
}

/// Reads a record of etcd: a value, or one line saying what was wrong with it.
pub(crate) fn parse<T: Record>(what: &str, bytes: &[u8]) -> Result<T, String> {
    if bytes.len() > MAX_RECORD {
        return Err(format!(
            "{what}: {} bytes, more than the {MAX_RECORD} a record may have",
            bytes.len()
        ));
    }
    let mut value: T = serde_json::from_slice(bytes).map_err(|e| {
        let mut why = e.to_string();
        clean(&mut why);
        format!("{what}: not a record this version understands: {why}")
    })?;
    value
        .clean()
        .map_err(|why| format!("{what}: {}", one_line(&why)))?;
    Ok(value)
}

/// A record as etcd keeps it: JSON. Our records are plain structs of strings and numbers, which
/// serde_json always renders; were one ever to fail, an empty value is written and reads back as
/// a record that cannot be parsed, which every reader already treats as absent.
pub(crate) fn json(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// `text` as one printable line of at most [`MAX_TEXT`] characters: control characters and line
/// or paragraph separators become spaces.
pub(crate) fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_TEXT));
    for (n, c) in text.chars().enumerate() {
        if n == MAX_TEXT {
            out.push_str("...");
            break;
        }
        out.push(
            if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{85}') {
                ' '
            } else {
                c
            },
        );
    }
    out
}

fn clean(text: &mut String) {
    *text = one_line(text);
}

fn clean_all(texts: &mut [&mut String]) {
    for t in texts {
        clean(t);
    }
}

/// An exact FlakeHub version: semver (`0.1.43`, `0.1.43+rev-<sha>`), at most 200 characters.
pub(crate) fn check_version(version: &str) -> Result<(), String> {
    let shown = || crate::agent::config::raw::shown(version);
    if version.is_empty() || version.len() > 200 {
        return Err(format!(
            "version {} is empty or longer than 200 characters",
            shown()
        ));
    }
    semver::Version::parse(version)
        .map(|_| ())
        .map_err(|e| format!("version {} is not an exact version ({e})", shown()))
}

/// `org/flake` with FlakeHub's characters.
pub(crate) fn flake_name_ok(text: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.len() <= 100
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    matches!(text.split_once('/'), Some((org, flake)) if part(org) && part(flake))
}

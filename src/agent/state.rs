//! The agent's record of what runs, what is wanted and what happened, kept in one JSON file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::plumbing::files;

pub const FILE_NAME: &str = "state.json";

/// A release and the store path of its output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub version: String,
    pub store_path: String,
}

/// The outcome of the last check (a poll of FlakeHub).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub at: String,
    pub ok: bool,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Success,
    Failed,
}

/// A deploy that finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deploy {
    pub version: String,
    pub store_path: String,
    /// What ran before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_path: Option<String>,
    pub operation: String,
    pub started_at: String,
    pub finished_at: String,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where a deploy under way stands. Persisted before each step starts, so that an agent restarted
/// meanwhile picks up the step's result instead of starting it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// fh fetches the closure and makes it the profile's new generation.
    #[default]
    Fetch,
    /// switch-to-configuration of the new system.
    Activate,
    /// Waiting for the new system to prove healthy.
    Confirm,
    /// Going back to what ran before.
    Rollback,
}

/// A deploy that was started and whose result is not yet recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    pub version: String,
    pub store_path: String,
    pub operation: String,
    /// The exact reference given to fh.
    #[serde(default)]
    pub reference: String,
    #[serde(default)]
    pub phase: Phase,
    /// The transient unit running the current step, once it has been named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// The current step's PID in direct mode, so that a restarted agent waits for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The system that ran before: what a rollback goes back to, and no further.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_path: Option<String>,
    /// What the system profile (the boot default) pointed at before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_profile: Option<String>,
    /// Units already failed before the deploy; they do not count against it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_before: Vec<String>,
    /// Until when the confirm phase waits (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm_until: Option<String>,
    /// Why the deploy is being rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    pub started_at: String,
}

/// A release applied with `operation = "boot"`, to be checked after the next boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingBoot {
    pub version: String,
    pub store_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_profile: Option<String>,
    /// The boot it was applied in (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    pub at: String,
}

/// Repeated failures at one store path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failures {
    pub store_path: String,
    pub version: String,
    pub count: u32,
    pub last_error: String,
}

/// Login bookkeeping: which token (by its SHA-256, never the token) was used to log in.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Login {
    pub token_sha256: String,
    pub at: String,
}

/// A store path that failed and was rolled back: not tried again until another release appears
/// or an operator clears it (`hcloud-nixos retry`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    pub version: String,
    pub store_path: String,
    pub reason: String,
    pub at: String,
}

/// A reboot the agent asked for, to be confirmed after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebootRequest {
    /// The system that should be booted afterwards.
    pub system: String,
    /// The boot it was asked in.
    pub boot_id: String,
    pub at: String,
}

/// The last reboot the agent asked for, as seen after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastReboot {
    pub at: String,
    pub system: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub booted: Option<String>,
    /// The booted system is the one the reboot was for.
    pub ok: bool,
}

/// Totals since the state file was created, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counters {
    pub deploys_succeeded: u64,
    pub deploys_failed: u64,
    pub rollbacks_succeeded: u64,
    pub rollbacks_failed: u64,
}

/// Everything the agent remembers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct State {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<Target>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<Target>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<Check>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_deploy: Option<Deploy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<InFlight>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_boot: Option<PendingBoot>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<Failures>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<Login>,
    /// Deploys recorded since the state file was created, successful or not.
    #[serde(default)]
    pub deploys: u64,
    #[serde(default)]
    pub counters: Counters,
    /// Cycles in a row that ended in a failure (check or deploy).
    #[serde(default)]
    pub consecutive_failures: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quarantined: Vec<Quarantined>,
    /// The running system needs a reboot (a new kernel, initrd or kernel modules).
    #[serde(default)]
    pub reboot_required: bool,
    /// The moment chosen inside the maintenance window (RFC 3339), kept across polls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot_planned: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reboot_request: Option<RebootRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reboot: Option<LastReboot>,
    /// A fleet slot still to be handed back (the backend could not be reached when the work it
    /// was taken for ended, or a reboot ended it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_release: Option<crate::fleet::Ending>,
    /// The one-line status an operator reads.
    #[serde(default)]
    pub status: String,
}

impl State {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(FILE_NAME)
    }

    /// Reads the state; a missing file is an empty state. A corrupt one is an error: the agent
    /// must not forget an apply in flight.
    pub fn load(state_dir: &Path) -> Result<State> {
        let path = Self::path(state_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} is not a valid state file; move it away to start afresh",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Writes the state atomically, readable by root only.
    pub fn save(&self, state_dir: &Path) -> Result<()> {
        files::create_dir_all_mode(state_dir, 0o700)
            .with_context(|| format!("cannot create {}", state_dir.display()))?;
        let mut text = serde_json::to_vec_pretty(self)?;
        text.push(b'\n');
        let path = Self::path(state_dir);
        files::write_atomic(&path, &text, 0o600)
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

/// Now, as RFC 3339 in UTC with seconds.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_is_root_only() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        assert_eq!(State::load(&state_dir).unwrap(), State::default());
        let state = State {
            in_flight: Some(InFlight {
                version: "0.1.2".into(),
                store_path: "/nix/store/x".into(),
                operation: "switch".into(),
                unit: Some("hcloud-nixos-apply-1.service".into()),
                reference: "o/f/=0.1.2#a".into(),
                phase: Phase::Activate,
                pid: None,
                previous_profile: None,
                failed_before: vec!["x.service".into()],
                confirm_until: None,
                failure: None,
                previous_path: None,
                started_at: now(),
            }),
            deploys: 3,
            ..Default::default()
        };
        state.save(&state_dir).unwrap();
        assert_eq!(State::load(&state_dir).unwrap(), state);
        assert_eq!(
            std::fs::metadata(State::path(&state_dir)).unwrap().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn corrupt_state_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(State::path(dir.path()), "{not json").unwrap();
        let e = State::load(dir.path()).unwrap_err();
        assert!(format!("{e:#}").contains("move it away"));
    }
}

//! The last good metadata, kept under the state directory for a boot that cannot reach the service.
//!
//! After every boot that fetched and parsed the documents, both are saved as they came, in a
//! root-only file written atomically. When the service cannot be reached within the deadline,
//! `network` configures the server from them, but only when they are this server's: the saved
//! instance id must equal the SMBIOS serial where the machine has one from Hetzner (Hetzner puts
//! the server's id there; cloud-init compares the two the same way), every public NIC they name
//! must be one of this machine's links (MACs are the server's own), and at least one of the two
//! must tie them to this machine. An image made from a snapshot carries the file to servers with
//! other MACs and ids: there it is refused, so another server's SSH keys and addresses are never
//! taken.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};

use crate::boot::metadata::{MacAddr, Metadata, PrivateNetwork, Problem};
use crate::plumbing::files;

/// Where the agent keeps its state too (`paths.state_dir`; the units' `StateDirectory=`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/hcloud-nixos";
/// Where the kernel shows the machine's SMBIOS data.
pub const DEFAULT_DMI_DIR: &str = "/sys/class/dmi/id";
/// The file in the state directory.
pub(crate) const FILE_NAME: &str = "metadata.json";
/// Two documents of at most 1 MiB each, escaped as JSON strings.
const MAX_FILE_BYTES: usize = 6 * 1024 * 1024;
/// The format written; a file of another format is not read.
const FORMAT: u32 = 1;

/// The documents of the last boot that reached the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Saved {
    pub(crate) format: u32,
    /// When they came, in seconds since the epoch.
    pub(crate) saved_at: u64,
    /// The `metadata` document, as served.
    pub(crate) metadata: String,
    /// `metadata/private-networks`, as served; `None` when the service had none.
    pub(crate) private_networks: Option<String>,
}

impl Saved {
    pub(crate) fn new(metadata: String, private_networks: Option<String>) -> Self {
        let saved_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Saved {
            format: FORMAT,
            saved_at,
            metadata,
            private_networks,
        }
    }

    /// When they were saved, for people (RFC 3339, UTC).
    pub(crate) fn when(&self) -> String {
        format_time(self.saved_at)
    }
}

/// Seconds since the epoch for people (RFC 3339, UTC); never panics on a huge value.
pub(crate) fn format_time(secs: u64) -> String {
    UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .filter(|t| {
            t.duration_since(UNIX_EPOCH)
                .is_ok_and(|d| d.as_secs() < 253_402_300_800)
        })
        .map(|t| humantime::format_rfc3339_seconds(t).to_string())
        .unwrap_or_else(|| "an unknown time".to_string())
}

pub(crate) fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Saves the documents: the directory root-only, the file mode 0600, atomically.
pub(crate) fn save(dir: &Path, saved: &Saved) -> Result<()> {
    files::create_dir_all_mode(dir, 0o700)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let text = serde_json::to_vec(saved).context("cannot encode the metadata to save")?;
    let file = path(dir);
    files::write_atomic(&file, &text, 0o600)
        .with_context(|| format!("cannot write {}", file.display()))
}

/// The saved documents, `None` when there are none.
pub(crate) fn load(dir: &Path) -> Result<Option<Saved>> {
    let file = path(dir);
    let text = match std::fs::read(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    };
    parse(&text)
        .map(Some)
        .map_err(|why| anyhow!("{} {why}; remove it", file.display()))
}

/// The file's contents, checked: its size, its format and its fields.
pub(crate) fn parse(text: &[u8]) -> Result<Saved, String> {
    if text.len() > MAX_FILE_BYTES {
        return Err(format!("is larger than {MAX_FILE_BYTES} bytes"));
    }
    let saved: Saved = serde_json::from_slice(text).map_err(|e| {
        let detail = e.to_string();
        format!(
            "is not saved metadata ({})",
            crate::boot::metadata::quote(detail.lines().next().unwrap_or(""))
        )
    })?;
    if saved.format != FORMAT {
        return Err(format!("has format {}, not {FORMAT}", saved.format));
    }
    Ok(saved)
}

/// What ties saved metadata to a machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Machine {
    /// The MACs of its links (loopback's all-zero one left out).
    pub(crate) macs: Vec<MacAddr>,
    /// The SMBIOS serial number, when the SMBIOS vendor is Hetzner (it is the server's id).
    pub(crate) serial: Option<String>,
}

/// The SMBIOS serial of a Hetzner machine, from `dmi_dir` (`sys_vendor`, `product_serial`).
pub(crate) fn hetzner_serial(dmi_dir: &Path) -> Option<String> {
    let read = |name: &str| {
        std::fs::read_to_string(dmi_dir.join(name))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty() && s.len() <= 64)
    };
    (read("sys_vendor")? == "Hetzner")
        .then(|| read("product_serial"))
        .flatten()
}

/// Whether saved metadata is this machine's. Its private NICs that are not on the machine are
/// dropped (a network may have been detached), each with a problem. `Err` says why it is not.
pub(crate) fn check_owner(
    metadata: &Metadata,
    private: &mut Vec<PrivateNetwork>,
    machine: &Machine,
) -> Result<Vec<Problem>, String> {
    let mut tied = false;
    if let (Some(id), Some(serial)) = (metadata.instance_id, &machine.serial) {
        if id.to_string() != *serial {
            return Err(format!(
                "it is server {id}'s, and this is server {}",
                crate::boot::metadata::quote(serial)
            ));
        }
        tied = true;
    }
    let here = |mac: &MacAddr| !mac.is_zero() && machine.macs.contains(mac);
    let public = metadata.network.iter().flat_map(|n| &n.interfaces);
    for nic in public {
        if !here(&nic.mac) {
            return Err(format!(
                "its public NIC {} is not on this machine (an image made from another server?)",
                nic.mac
            ));
        }
        tied |= !nic.mac.is_zero();
    }
    let mut problems = Vec::new();
    private.retain(|net| {
        let present = here(&net.mac);
        tied |= present;
        if !present {
            problems.push(Problem {
                document: "private-networks",
                field: "(saved)".into(),
                problem: format!("NIC {} is not on this machine; skipped", net.mac),
            });
        }
        present
    });
    if !tied {
        return Err(
            "nothing ties it to this machine (none of its NICs is here, and no SMBIOS serial says which server this is)"
                .into(),
        );
    }
    Ok(problems)
}

#[cfg(test)]
mod tests;

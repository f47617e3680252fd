//! The `network` and `metadata` commands: provisioning a server from its metadata at boot.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::time::Instant;

use crate::agent::userdata::HostKey;
use crate::boot::hostname::{self, Policy};
use crate::boot::metadata::client::{self, Client};
use crate::boot::metadata::{Hostname, Metadata, PrivateNetwork, Problem, SshKey};
use crate::boot::network::networkd::{self, Reload};
use crate::boot::network::{self as net, NetworkFile};
use crate::boot::{hostkey, sshkeys};
use crate::plumbing::files;

mod fetch;

/// Where to fetch from and for how long.
#[derive(Debug, Clone)]
pub struct Source {
    /// The metadata service's base URL (`http://169.254.169.254/hetzner/v1/`).
    pub url: String,
    /// How long to keep asking before giving up (or falling back to the saved metadata).
    pub deadline: Duration,
}

/// What `hcloud-nixos network` is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the `.network` and `.link` files go (`/run/systemd/network`).
    pub network_dir: PathBuf,
    /// Ask systemd-networkd to reload after writing them.
    pub reload: bool,
    /// When to set the hostname from the metadata.
    pub hostname: Policy,
    /// The static hostname file (`/etc/hostname`), read to decide and written when it is set.
    pub hostname_file: PathBuf,
    /// Where root's SSH keys from the metadata are written (an additional AuthorizedKeysFile).
    pub keys_file: PathBuf,
    /// Where sshd's host keys are (`/etc/ssh`): the user-data's host key goes there.
    pub host_key_dir: PathBuf,
    /// Print what would be written and done, and change nothing.
    pub dry_run: bool,
    /// Where the last good metadata is kept (root-only), for a boot without the service.
    pub state_dir: PathBuf,
    /// Where the machine's SMBIOS data is (`/sys/class/dmi/id`), to tell saved metadata's owner.
    pub dmi_dir: PathBuf,
}

/// Where the documents came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Origin {
    /// The metadata service, now.
    Service,
    /// The metadata saved at an earlier boot (seconds since the epoch); the service was silent.
    Saved { saved_at: u64 },
}

/// Everything the metadata service told us.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Fetched {
    pub(crate) metadata: Metadata,
    pub(crate) private_networks: Vec<PrivateNetwork>,
    /// Parts of the documents that were left out, each naming its field.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) problems: Vec<Problem>,
    pub(crate) origin: Origin,
    /// The SSH host key the user-data gives (`create` passes one); never shown.
    #[serde(skip)]
    pub(crate) host_key: Option<HostKey>,
}

/// What `network` will do, decided from the metadata and the machine's state (pure data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Files to write; `None` when the metadata has no `network-config` (files are left alone).
    pub(crate) files: Option<Vec<NetworkFile>>,
    /// Our own files from an earlier run that no NIC needs any more.
    pub(crate) stale: Vec<String>,
    pub(crate) hostname: Option<Hostname>,
    pub(crate) keys: Vec<SshKey>,
    pub(crate) host_key: Option<HostKey>,
}

/// Decides what to do. `existing` are the names in the network directory now.
pub(crate) fn plan(
    fetched: &Fetched,
    existing: &[String],
    policy: Policy,
    has_static_hostname: bool,
) -> Plan {
    let files = fetched
        .metadata
        .network
        .as_ref()
        .map(|network| net::render(network, &fetched.private_networks));
    let stale = match &files {
        None => Vec::new(),
        Some(files) => {
            let keep: BTreeSet<&str> = files.iter().map(|f| f.name.as_str()).collect();
            existing
                .iter()
                .filter(|name| net::is_own_file(name) && !keep.contains(name.as_str()))
                .cloned()
                .collect()
        }
    };
    Plan {
        files,
        stale,
        hostname: hostname::decide(
            policy,
            fetched.metadata.hostname.as_ref(),
            has_static_hostname,
        ),
        keys: fetched.metadata.public_keys.clone(),
        host_key: fetched.host_key.clone(),
    }
}

/// Fetches and parses `metadata` and `metadata/private-networks` from the service within one
/// deadline (for `hcloud-nixos metadata`: no saved metadata is used).
pub async fn fetch(source: &Source) -> Result<Fetched> {
    fetch::fetch(source).await
}

/// Fetches the raw user-data; empty when there is none.
pub async fn fetch_userdata(source: &Source) -> Result<Vec<u8>> {
    let client = Client::new(client::Settings {
        base_url: source.url.clone(),
        ..Default::default()
    })?;
    let deadline = Instant::now() + source.deadline;
    Ok(client.get("userdata", deadline).await?.unwrap_or_default())
}

/// `hcloud-nixos network`. The outcome is also the unit's status line (sd_notify `STATUS=`),
/// which `systemctl status hcloud-nixos-network` shows after the run.
pub async fn network(source: &Source, opts: &Options) -> Result<()> {
    let result = provision(source, opts).await;
    match &result {
        Ok(status) => notify_status(status),
        Err(e) => notify_status(&format!("failed: {e:#}")),
    }
    result.map(|_| ())
}

async fn provision(source: &Source, opts: &Options) -> Result<String> {
    let fetched = fetch::fetch_or_saved(source, opts).await?;
    for problem in &fetched.problems {
        tracing::warn!("{problem}");
    }
    let existing = list_dir(&opts.network_dir)?;
    let has_static = hostname::has_static_hostname(&opts.hostname_file);
    let plan = plan(&fetched, &existing, opts.hostname, has_static);
    if let Some(files) = &plan.files
        && fetched
            .metadata
            .network
            .as_ref()
            .is_some_and(|n| n.interfaces.is_empty())
    {
        tracing::info!(
            private_nics = files.len(),
            "the metadata lists no public network (IPv4 and IPv6 disabled): no public NIC to configure"
        );
    }
    if fetched.metadata.network.is_none() {
        tracing::warn!(
            "the metadata has no usable network-config; network files are left as they are"
        );
    }
    if opts.dry_run {
        print!("{}", describe(&plan, opts, has_static));
        return Ok(String::new());
    }
    apply(&plan, opts).await?;
    let mut status = match fetched.origin {
        Origin::Service => "configured from the metadata service".to_string(),
        Origin::Saved { saved_at } => format!(
            "the metadata service cannot be reached: configured from the metadata saved at {}",
            crate::boot::cache::format_time(saved_at)
        ),
    };
    if !fetched.problems.is_empty() {
        status.push_str(&format!(
            "; {} problem(s) in the metadata, see the journal",
            fetched.problems.len()
        ));
    }
    Ok(status)
}

/// Sets the unit's status line (one line; nothing happens outside systemd).
fn notify_status(text: &str) {
    let line: String = text
        .chars()
        .map(|c| {
            if crate::plumbing::text::breaks_a_line(c) {
                ' '
            } else {
                c
            }
        })
        .take(500)
        .collect();
    if line.is_empty() {
        return;
    }
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Status(&line)]) {
        tracing::debug!(error = %e, "cannot tell systemd the status");
    }
}

/// Carries out a plan. Each step is attempted even when an earlier one failed; the first
/// failure is returned after all have run, so one broken piece does not cost the others.
async fn apply(plan: &Plan, opts: &Options) -> Result<()> {
    let mut failures: Vec<anyhow::Error> = Vec::new();
    if let Some(files) = &plan.files {
        match sync_network_dir(&opts.network_dir, files, &plan.stale) {
            Ok(changed) => tracing::info!(
                dir = %opts.network_dir.display(),
                files = files.len(),
                changed,
                removed = plan.stale.len(),
                "network files in place"
            ),
            Err(e) => failures.push(e),
        }
        if opts.reload {
            match networkd::reload().await {
                Ok(Reload::Reloaded) => tracing::info!("systemd-networkd reloaded"),
                Ok(Reload::NotRunning) => tracing::info!(
                    "systemd-networkd is not running; it reads the files when it starts"
                ),
                Err(e) => failures.push(e),
            }
        }
    }
    if let Some(name) = &plan.hostname {
        let current = nix::unistd::gethostname().ok();
        if current.as_ref().and_then(|h| h.to_str()) == Some(name.as_str()) {
            tracing::info!(hostname = %name, "hostname already set");
        } else {
            match hostname::set_transient(name).await {
                Ok(()) => tracing::info!(hostname = %name, "transient hostname set"),
                Err(e) => failures.push(e),
            }
        }
    }
    match sshkeys::write(&opts.keys_file, &sshkeys::render(&plan.keys)) {
        Ok(()) => {
            tracing::info!(file = %opts.keys_file.display(), keys = plan.keys.len(), "SSH keys written")
        }
        Err(e) => failures.push(e),
    }
    if let Some(key) = &plan.host_key {
        match hostkey::install(&opts.host_key_dir, key) {
            Ok(hostkey::Installed::NoSshd) => tracing::warn!(
                dir = %opts.host_key_dir.display(),
                "the user-data carries an SSH host key, but there is no host key directory (is sshd enabled?); not installed"
            ),
            Ok(done) => tracing::info!(
                file = %hostkey::private_path(&opts.host_key_dir).display(),
                key = key.public_line(),
                written = done == hostkey::Installed::Written,
                "SSH host key from the user-data in place"
            ),
            Err(e) => failures.push(e),
        }
    }
    let count = failures.len();
    match failures.into_iter().next() {
        None => Ok(()),
        Some(first) if count == 1 => Err(first),
        Some(first) => Err(first.context(format!("{count} steps failed; the first"))),
    }
}

/// Writes the files that changed and removes stale ones; returns how many were written.
pub(crate) fn sync_network_dir(
    dir: &Path,
    files: &[NetworkFile],
    stale: &[String],
) -> Result<usize> {
    files::create_dir_all_mode(dir, 0o755)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = 0;
    for file in files {
        let path = dir.join(&file.name);
        if std::fs::read(&path).is_ok_and(|old| old == file.contents.as_bytes()) {
            continue;
        }
        files::write_atomic(&path, file.contents.as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}", path.display()))?;
        written += 1;
    }
    for name in stale {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
    }
    if !stale.is_empty() {
        files::sync_dir(dir).with_context(|| format!("cannot sync {}", dir.display()))?;
    }
    Ok(written)
}

fn list_dir(dir: &Path) -> Result<Vec<String>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Ok(entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", dir.display())),
    }
}

/// What a dry run prints.
pub(crate) fn describe(plan: &Plan, opts: &Options, has_static_hostname: bool) -> String {
    let mut out = String::new();
    match &plan.files {
        None => out.push_str(
            "network: the metadata has no network-config; network files left as they are\n",
        ),
        Some(files) if files.is_empty() => out.push_str(
            "network: no public network and no private networks: no network file to write\n",
        ),
        Some(files) => {
            for file in files {
                let _ = writeln!(
                    out,
                    "would write {}:",
                    opts.network_dir.join(&file.name).display()
                );
                for line in file.contents.lines() {
                    let _ = writeln!(out, "    {line}");
                }
            }
        }
    }
    for name in &plan.stale {
        let _ = writeln!(
            out,
            "would remove {} (stale, from an earlier run)",
            opts.network_dir.join(name).display()
        );
    }
    if plan.files.is_some() {
        if opts.reload {
            out.push_str("would ask systemd-networkd to reload (if it is running)\n");
        } else {
            out.push_str("would not reload systemd-networkd (--no-reload)\n");
        }
    }
    match (&plan.hostname, opts.hostname) {
        (Some(name), _) => {
            let _ = writeln!(
                out,
                "would set the transient hostname to '{name}' through systemd-hostnamed"
            );
        }
        (None, Policy::Never) => out.push_str("hostname: left alone (--hostname=never)\n"),
        (None, Policy::Auto) if has_static_hostname => {
            let _ = writeln!(
                out,
                "hostname: left alone ({} sets a static hostname)",
                opts.hostname_file.display()
            );
        }
        (None, _) => out.push_str("hostname: the metadata gives none\n"),
    }
    let _ = writeln!(
        out,
        "would write {} SSH key(s) to {} (mode 0600)",
        plan.keys.len(),
        opts.keys_file.display()
    );
    if let Some(key) = &plan.host_key {
        let _ = writeln!(
            out,
            "would install the SSH host key {} as {} (mode 0600)",
            key.public_line(),
            hostkey::private_path(&opts.host_key_dir).display()
        );
    }
    out
}

/// What `hcloud-nixos metadata` prints for a person.
pub fn describe_metadata(fetched: &Fetched) -> String {
    let m = &fetched.metadata;
    let mut out = String::new();
    let none = || "-".to_string();
    let _ = writeln!(
        out,
        "hostname:          {}",
        m.hostname.as_ref().map_or_else(none, ToString::to_string)
    );
    let _ = writeln!(
        out,
        "instance id:       {}",
        m.instance_id.map(|i| i.to_string()).unwrap_or_else(none)
    );
    let _ = writeln!(
        out,
        "region:            {}",
        m.region.as_ref().map_or_else(none, ToString::to_string)
    );
    let _ = writeln!(
        out,
        "availability zone: {}",
        m.availability_zone
            .as_ref()
            .map_or_else(none, ToString::to_string)
    );
    let _ = writeln!(
        out,
        "public IPv4:       {}",
        m.public_ipv4.map(|i| i.to_string()).unwrap_or_else(none)
    );
    match &m.network {
        None => out.push_str("public NICs:       (no network-config)\n"),
        Some(n) if n.interfaces.is_empty() => out.push_str("public NICs:       none\n"),
        Some(n) => {
            for nic in &n.interfaces {
                let mut parts = Vec::new();
                if nic.dhcp4 {
                    parts.push("DHCPv4".to_string());
                }
                if nic.dhcp6 {
                    parts.push("DHCPv6".to_string());
                }
                parts.extend(nic.addresses.iter().map(|a| a.to_string()));
                parts.extend(nic.gateways.iter().map(|g| format!("via {g}")));
                let _ = writeln!(out, "public NIC:        {} {}", nic.mac, parts.join(", "));
                if !nic.dns.is_empty() {
                    let dns: Vec<String> = nic.dns.iter().map(|d| d.to_string()).collect();
                    let _ = writeln!(out, "  DNS:             {}", dns.join(", "));
                }
            }
        }
    }
    for p in &fetched.private_networks {
        let ip = p.ip.map(|i| i.to_string()).unwrap_or_else(none);
        let name = p
            .network_name
            .as_ref()
            .map_or_else(none, ToString::to_string);
        let _ = writeln!(out, "private NIC:       {} {ip} (network {name})", p.mac);
    }
    if m.public_keys.is_empty() {
        out.push_str("SSH keys:          none\n");
    }
    for key in &m.public_keys {
        let _ = writeln!(out, "SSH key:           {key}");
    }
    for problem in &fetched.problems {
        let _ = writeln!(out, "problem:           {problem}");
    }
    out
}

/// The longest `--deadline`: a boot that waits longer for its metadata waits in vain.
const MAX_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// Rejects a `--deadline` of zero, which could never succeed, and one beyond a day (which the
/// clock cannot always add).
pub fn check_deadline(deadline: Duration) -> Result<()> {
    if deadline.is_zero() || deadline > MAX_DEADLINE {
        bail!(
            "--deadline '{}' is out of range; use 1s to 1day (for example 2m)",
            humantime::format_duration(deadline)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;

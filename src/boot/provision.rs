//! The `network` and `metadata` commands: provisioning a server from its metadata at boot.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::time::Instant;

use crate::boot::hostname::{self, Policy};
use crate::boot::metadata::client::{self, Client};
use crate::boot::metadata::{self, Metadata, PrivateNetwork};
use crate::boot::network::link::{self, Netlink};
use crate::boot::network::networkd::{self, Reload};
use crate::boot::network::{self as net, NetworkFile};
use crate::boot::sshkeys;
use crate::plumbing::files;

/// Where to fetch from and for how long.
#[derive(Debug, Clone)]
pub struct Source {
    pub url: String,
    pub deadline: Duration,
}

/// What `hcloud-nixos network` is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub network_dir: PathBuf,
    pub reload: bool,
    pub hostname: Policy,
    pub hostname_file: PathBuf,
    pub keys_file: PathBuf,
    pub dry_run: bool,
}

/// Everything the metadata service told us.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Fetched {
    pub metadata: Metadata,
    pub private_networks: Vec<PrivateNetwork>,
}

/// What `network` will do, decided from the metadata and the machine's state (pure data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Files to write; `None` when the metadata has no `network-config` (files are left alone).
    pub files: Option<Vec<NetworkFile>>,
    /// Our own files from an earlier run that no NIC needs any more.
    pub stale: Vec<String>,
    pub hostname: Option<String>,
    pub keys: Vec<String>,
}

/// Decides what to do. `existing` are the names in the network directory now.
pub fn plan(
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
            fetched.metadata.hostname.as_deref(),
            has_static_hostname,
        ),
        keys: fetched.metadata.public_keys.clone(),
    }
}

/// Fetches and parses `metadata` and `metadata/private-networks` within one deadline, borrowing
/// a link-local address first when no NIC can reach a link-local service yet.
pub async fn fetch(source: &Source) -> Result<Fetched> {
    let client = Client::new(client::Settings {
        base_url: source.url.clone(),
        ..Default::default()
    })?;
    let deadline = Instant::now() + source.deadline;
    if !link::url_needs_link(client.base_url()) {
        return fetch_documents(&client, deadline).await;
    }
    let netlink = Netlink::connect()?;
    let links = netlink.links().await?;
    let Some(borrow) = link::link_to_borrow(&links) else {
        return fetch_documents(&client, deadline).await;
    };
    tracing::info!(
        link = %borrow.name,
        address = %link::TEMPORARY_ADDRESS,
        "no NIC has an IPv4 address yet; borrowing a link-local address to reach the metadata service"
    );
    let borrowed = netlink.borrow(borrow).await?;
    let result = fetch_documents(&client, deadline).await;
    let name = borrowed.link_name().to_string();
    let given_back = netlink.give_back(borrowed).await;
    let fetched = result?;
    given_back?;
    tracing::debug!(link = %name, "temporary address removed");
    Ok(fetched)
}

async fn fetch_documents(client: &Client, deadline: Instant) -> Result<Fetched> {
    let url = format!("{}metadata", client.base_url());
    let body = client
        .get("metadata", deadline)
        .await?
        .ok_or_else(|| anyhow!("{url} does not exist (HTTP 404): is this a Hetzner Cloud server, and is --metadata-url right?"))?;
    let metadata = metadata::parse_metadata(&utf8(&body, "metadata")?)?;
    let private_networks = match client.get("metadata/private-networks", deadline).await? {
        Some(body) => metadata::parse_private_networks(&utf8(&body, "private-networks")?)?,
        None => {
            tracing::warn!("the metadata service has no private-networks document; assuming none");
            Vec::new()
        }
    };
    Ok(Fetched {
        metadata,
        private_networks,
    })
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

fn utf8(body: &[u8], document: &str) -> Result<String> {
    String::from_utf8(body.to_vec()).map_err(|e| {
        anyhow!(
            "{document}: (document): is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

/// `hcloud-nixos network`.
pub async fn network(source: &Source, opts: &Options) -> Result<()> {
    let fetched = fetch(source).await?;
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
        tracing::warn!("the metadata has no network-config; network files are left as they are");
    }
    for index in &fetched.metadata.rejected_keys {
        tracing::warn!(
            index,
            "public-keys entry is not a single-line OpenSSH public key; skipped"
        );
    }
    if opts.dry_run {
        print!("{}", describe(&plan, opts, has_static));
        return Ok(());
    }
    apply(&plan, opts).await
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
    let count = failures.len();
    match failures.into_iter().next() {
        None => Ok(()),
        Some(first) if count == 1 => Err(first),
        Some(first) => Err(first.context(format!("{count} steps failed; the first"))),
    }
}

/// Writes the files that changed and removes stale ones; returns how many were written.
pub fn sync_network_dir(dir: &Path, files: &[NetworkFile], stale: &[String]) -> Result<usize> {
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
pub fn describe(plan: &Plan, opts: &Options, has_static_hostname: bool) -> String {
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
        m.hostname.clone().unwrap_or_else(none)
    );
    let _ = writeln!(
        out,
        "instance id:       {}",
        m.instance_id.map(|i| i.to_string()).unwrap_or_else(none)
    );
    let _ = writeln!(
        out,
        "region:            {}",
        m.region.clone().unwrap_or_else(none)
    );
    let _ = writeln!(
        out,
        "availability zone: {}",
        m.availability_zone.clone().unwrap_or_else(none)
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
        let name = p.network_name.clone().unwrap_or_else(none);
        let _ = writeln!(out, "private NIC:       {} {ip} (network {name})", p.mac);
    }
    if m.public_keys.is_empty() {
        out.push_str("SSH keys:          none\n");
    }
    for key in &m.public_keys {
        let _ = writeln!(out, "SSH key:           {key}");
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

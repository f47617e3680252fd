//! The boot step's command-line arguments, shared by `hcloud-nixos network` and `hcloud-nixos-network`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::boot::hostname::Policy;
use crate::boot::metadata::client::DEFAULT_URL;
use crate::boot::provision::{self, Options, Source};
use crate::boot::{cache, hostkey, sshkeys};

/// Where the metadata service is and how long to wait for it.
#[derive(clap::Args, Debug)]
pub struct SourceArgs {
    /// Base URL of the Hetzner metadata service.
    #[arg(long, env = "HCLOUD_NIXOS_METADATA_URL", default_value = DEFAULT_URL, value_name = "URL")]
    metadata_url: String,
    /// How long to wait for the metadata service overall (it may answer late at boot).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    deadline: Duration,
}

impl SourceArgs {
    /// The checked source: an error when the deadline is out of range.
    pub fn source(&self) -> Result<Source> {
        provision::check_deadline(self.deadline)?;
        Ok(Source {
            url: self.metadata_url.clone(),
            deadline: self.deadline,
        })
    }
}

/// Everything `network` takes.
#[derive(clap::Args, Debug)]
pub struct NetworkArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Directory for the .network files.
    #[arg(long, default_value = "/run/systemd/network", value_name = "DIR")]
    network_dir: PathBuf,
    /// Do not ask systemd-networkd to reload.
    #[arg(long)]
    no_reload: bool,
    /// When to set the metadata's hostname.
    #[arg(long, value_enum, default_value_t = Policy::Auto)]
    hostname: Policy,
    /// The static hostname file; `auto` sets the hostname only when it is missing or empty.
    #[arg(
        long,
        default_value = "/etc/hostname",
        value_name = "PATH",
        hide = true
    )]
    hostname_file: PathBuf,
    /// File for root's SSH keys (read by sshd as an additional AuthorizedKeysFile).
    #[arg(long, default_value = sshkeys::DEFAULT_KEYS_FILE, value_name = "PATH")]
    keys_file: PathBuf,
    /// Where sshd's host keys are: an SSH host key in the user-data (as `create` passes one)
    /// is installed there before sshd starts.
    #[arg(long, default_value = hostkey::DEFAULT_DIR, value_name = "DIR")]
    host_key_dir: PathBuf,
    /// Print what would be written and done; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Where the last good metadata is kept (root-only), used when the service is silent.
    #[arg(long, default_value = cache::DEFAULT_STATE_DIR, value_name = "DIR")]
    state_dir: PathBuf,
    /// The machine's SMBIOS data (its serial tells whose saved metadata this is).
    #[arg(long, default_value = cache::DEFAULT_DMI_DIR, value_name = "DIR", hide = true)]
    dmi_dir: PathBuf,
}

impl NetworkArgs {
    /// Runs the boot step with these arguments.
    pub async fn run(self) -> Result<()> {
        let source = self.source.source()?;
        let opts = Options {
            network_dir: self.network_dir,
            reload: !self.no_reload,
            hostname: self.hostname,
            hostname_file: self.hostname_file,
            keys_file: self.keys_file,
            host_key_dir: self.host_key_dir,
            dry_run: self.dry_run,
            state_dir: self.state_dir,
            dmi_dir: self.dmi_dir,
        };
        provision::network(&source, &opts).await
    }
}

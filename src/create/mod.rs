//! `hcloud-nixos create`: from nothing to a deployed server in one command. The server's
//! user-data carries the FlakeHub token, the reference and an SSH host key made here; `create`
//! waits for the server to run, connects with the user's OpenSSH client (the host key already in
//! `known_hosts`), follows the agent's status until the release is deployed and confirmed, and
//! shows where the time went.

mod follow;
mod hostkey;
mod plan;
mod server;
mod timeline;
mod userdata;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

/// How far `create` waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Wait {
    /// The agent reports the desired release deployed and confirmed.
    Deployed,
    /// The agent runs and has checked once.
    Ready,
    /// Hetzner says the server runs.
    Running,
    /// The API accepted the server.
    None,
}

/// `hcloud-nixos create`'s arguments.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Names of the servers; several create several servers at once.
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,
    /// The FlakeHub output reference the servers follow (`org/flake/version[#attr]`; without
    /// `#attr`, `nixosConfigurations.<name>`).
    #[arg(long, value_name = "REF")]
    pub flake: String,
    /// Server type.
    #[arg(long = "type", default_value = "cx23", value_name = "TYPE")]
    pub server_type: String,
    /// Location (default: Hetzner's choice).
    #[arg(long, value_name = "LOCATION")]
    pub location: Option<String>,
    /// The snapshot: an image ID, or `auto` (the newest snapshot `upload` made for the type's
    /// architecture).
    #[arg(long, default_value = "auto", value_name = "ID|auto")]
    pub image: String,
    /// File holding the FlakeHub token (else `FLAKEHUB_TOKEN`); never give it in argv.
    #[arg(long, value_name = "FILE")]
    pub flakehub_token_file: Option<PathBuf>,
    /// SSH keys of the project (name or ID) for root's login.
    #[arg(long = "ssh-key", value_name = "NAME|ID")]
    pub ssh_keys: Vec<String>,
    /// Labels for the servers.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = crate::upload::parse_label_arg)]
    pub labels: Vec<(String, String)>,
    /// Private networks to attach (by ID).
    #[arg(long = "network", value_name = "ID")]
    pub networks: Vec<u64>,
    /// More user-data (cloud-config, a script or MIME), combined with create's.
    #[arg(long, value_name = "FILE")]
    pub userdata: Option<PathBuf>,
    /// How far to wait.
    #[arg(long, value_enum, default_value = "deployed")]
    pub wait: Wait,
    /// Give up waiting after this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Print JSON for machines.
    #[arg(long)]
    pub json: bool,
    /// File holding the Hetzner Cloud token (else `HCLOUD_TOKEN`, else the hcloud CLI's context).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The `known_hosts` file the server's host key is written to (default `~/.ssh/known_hosts`).
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// The SSH key to log in with (default: the user's SSH configuration and agent).
    #[arg(long, value_name = "FILE")]
    pub ssh_identity: Option<PathBuf>,
    /// Delete a server whose creation or deploy failed (it is kept by default, to look at).
    #[arg(long)]
    pub delete_on_failure: bool,
    /// FlakeHub's API (tests, the local cloud).
    #[arg(long, hide = true, env = "HCLOUD_NIXOS_FLAKEHUB_URL", default_value = crate::agent::flakehub::DEFAULT_API_URL)]
    pub flakehub_api_url: String,
}

/// `hcloud-nixos create`: every server, in parallel; success when every one got as far as
/// `--wait` asks.
pub async fn run_create(args: CreateArgs) -> Result<bool> {
    let plan = plan::prepare(&args).await?;
    let results = server::create_all(&args, &plan).await;
    server::report(&args, &results);
    Ok(results.iter().all(|r| r.failure.is_none()))
}

//! `hcloud-nixos fleet ...`: the operator's and CI's commands (status, announce, resume,
//! forget-canary, forget-member), on this server's configuration or on etcd endpoints given in
//! the environment (CI, a workstation).

use std::path::PathBuf;

use super::records::{self, Desired};
use super::{Backend, Coordinator, Error, ErrorKind, EtcdConfig, FleetConfig};

/// `hcloud-nixos fleet ...`: the operator's commands (add as a clap subcommand).
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum FleetCommand {
    /// The group: slots and holders, paused releases, canaries, the desired release and its
    /// poller, and every member (who runs what, who is deploying, who failed, who went silent).
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Tell the group about a new release now (CI, right after publishing it to FlakeHub): every
    /// member checks it against FlakeHub and deploys it, taking turns (etcd only).
    Announce {
        /// The exact version FlakeHub published (`0.1.43+rev-...`, or `0.1.43`).
        version: String,
        /// The flake it is a release of (`org/flake`); members that follow another flake ignore
        /// the announcement.
        #[arg(long, value_name = "ORG/FLAKE")]
        flake: Option<String>,
    },
    /// Clear the pause of a release (all paused releases without RELEASE).
    Resume {
        /// The release whose pause to clear; None clears every pause.
        release: Option<String>,
    },
    /// Retire a canary (by instance id): the group stops waiting for its confirmations.
    ForgetCanary {
        /// The canary's Hetzner instance id.
        id: String,
    },
    /// Forget a silent member's last record (by instance id): a server that is gone for good.
    ForgetMember {
        /// The member's Hetzner instance id.
        id: String,
    },
}

/// Where `fleet` commands find the group: this server's configuration, or etcd endpoints given
/// in the environment (`HCLOUD_NIXOS_ETCD_ENDPOINTS`, CI and workstations), with `--group`.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct FleetArgs {
    /// The group (default: this server's, from its configuration; required with etcd endpoints).
    #[arg(long, global = true, value_name = "GROUP")]
    pub(crate) group: Option<String>,
    /// etcd endpoints, comma-separated, instead of this server's configuration. Credentials
    /// (`https://user:password@host:2379`) only through the environment, never the command line.
    #[arg(
        long,
        global = true,
        env = "HCLOUD_NIXOS_ETCD_ENDPOINTS",
        hide_env_values = true,
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub(crate) etcd_endpoints: Vec<String>,
    /// The key prefix the group's servers use (default /hcloud-nixos).
    #[arg(
        long,
        global = true,
        env = "HCLOUD_NIXOS_ETCD_PREFIX",
        value_name = "PREFIX"
    )]
    pub(crate) etcd_prefix: Option<String>,
    /// The CA that signed etcd's certificate.
    #[arg(
        long,
        global = true,
        env = "HCLOUD_NIXOS_ETCD_CA_FILE",
        value_name = "PATH"
    )]
    pub(crate) etcd_ca_file: Option<PathBuf>,
    /// A client certificate for etcd (with --etcd-key-file).
    #[arg(
        long,
        global = true,
        env = "HCLOUD_NIXOS_ETCD_CERT_FILE",
        value_name = "PATH"
    )]
    pub(crate) etcd_cert_file: Option<PathBuf>,
    /// The client certificate's key.
    #[arg(
        long,
        global = true,
        env = "HCLOUD_NIXOS_ETCD_KEY_FILE",
        value_name = "PATH"
    )]
    pub(crate) etcd_key_file: Option<PathBuf>,
}

impl FleetArgs {
    /// The fleet settings the arguments give, when they name etcd endpoints; `Err` with one line
    /// per problem. Credentials in endpoints must come from the environment: the command line is
    /// visible to every user of the machine.
    pub(crate) fn fleet(&self) -> Option<Result<super::Fleet, Vec<String>>> {
        if self.etcd_endpoints.is_empty() {
            return None;
        }
        let from_env = std::env::var("HCLOUD_NIXOS_ETCD_ENDPOINTS").unwrap_or_default();
        let on_command_line = self.etcd_endpoints.join(",") != from_env;
        if on_command_line
            && self
                .etcd_endpoints
                .iter()
                .any(|e| super::ServerUrl::new(e).credentials().is_some())
        {
            return Some(Err(vec![
                "--etcd-endpoints: credentials on the command line are visible to every user; give them in HCLOUD_NIXOS_ETCD_ENDPOINTS".into(),
            ]));
        }
        let Some(group) = self.group.clone() else {
            return Some(Err(vec![
                "--group: which group (the servers' fleet.group) is needed with --etcd-endpoints"
                    .into(),
            ]));
        };
        let config = FleetConfig {
            group: Some(group),
            backend: Some(Backend::Etcd),
            pause_on_failure: Some(true),
            etcd: Some(EtcdConfig {
                endpoints: Some(self.etcd_endpoints.clone()),
                prefix: self.etcd_prefix.clone(),
                ca_file: self.etcd_ca_file.clone(),
                cert_file: self.etcd_cert_file.clone(),
                key_file: self.etcd_key_file.clone(),
                ..EtcdConfig::default()
            }),
            ..FleetConfig::default()
        };
        Some(config.resolve())
    }
}

/// Runs an operator's command: the text to print, or a one-line error. `slots_known`: the slot
/// count is this server's configuration (else the members' records say it).
pub async fn run_command(
    coordinator: &Coordinator,
    command: &FleetCommand,
    slots_known: bool,
) -> Result<String, Error> {
    let group = &coordinator.fleet().group;
    match command {
        FleetCommand::Status { json } => {
            let mut status = coordinator.status().await?;
            if !slots_known && let Some(n) = status.members.iter().map(|m| m.record.slots).max() {
                status.slots = n.max(1);
            }
            if !json {
                return Ok(status.describe());
            }
            serde_json::to_string_pretty(&status).map_err(|e| {
                Error::new(ErrorKind::Refused, format!("cannot render the status: {e}"))
            })
        }
        FleetCommand::Announce { version, flake } => {
            let desired = announced(version, flake.as_deref())?;
            coordinator.announce(&desired).await?;
            Ok(format!(
                "group {group}: desired release {} announced; its servers check it against FlakeHub and deploy it, taking turns",
                desired.version
            ))
        }
        FleetCommand::Resume { release } => {
            let cleared = coordinator.resume(release.as_deref()).await?;
            Ok(match (cleared.is_empty(), release) {
                (true, Some(r)) => format!("release {r} was not paused in group {group}"),
                (true, None) => format!("nothing was paused in group {group}"),
                (false, _) => format!(
                    "group {group} resumed for release{} {}",
                    if cleared.len() == 1 { "" } else { "s" },
                    cleared.join(", ")
                ),
            })
        }
        FleetCommand::ForgetCanary { id } => Ok(if coordinator.forget_canary(id).await? {
            format!("canary {id} forgotten in group {group}")
        } else {
            format!("{id} was not a canary of group {group}")
        }),
        FleetCommand::ForgetMember { id } => Ok(if coordinator.forget_member(id).await? {
            format!("member {id} forgotten in group {group}")
        } else {
            format!("{id} is no silent member of group {group}")
        }),
    }
}

/// The record `fleet announce` writes, its version and flake checked.
fn announced(version: &str, flake: Option<&str>) -> Result<Desired, Error> {
    records::check_version(version).map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!("{e}: give the version FlakeHub published, for example 0.1.43+rev-<commit>"),
        )
    })?;
    if let Some(f) = flake
        && !records::flake_name_ok(f)
    {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "--flake {} is not org/flake",
                crate::agent::config::raw::shown(f)
            ),
        ));
    }
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    Ok(Desired {
        version: version.to_string(),
        flake: flake.map(str::to_string),
        by: format!("announce from {}", records::one_line(&host)),
        at: super::now(),
    })
}

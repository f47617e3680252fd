//! The `hcloud-nixos` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use hcloud_nixos::agent::config;
use hcloud_nixos::agent::userdata;
use hcloud_nixos::agent::{commands, service};
use hcloud_nixos::boot::cli::{NetworkArgs, SourceArgs};
use hcloud_nixos::boot::provision;
use hcloud_nixos::plumbing::program;
#[cfg(feature = "workstation")]
use hcloud_nixos::upload;

#[derive(Parser)]
#[command(name = "hcloud-nixos", version, about = "NixOS on Hetzner Cloud")]
struct Cli {
    /// Print debug messages, and whole error chains.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Configure IPv6 (systemd-networkd), the hostname and root's SSH keys from the metadata service.
    Network(NetworkArgs),
    /// Follow a FlakeHub output reference: poll, apply new releases with fh, verify, record.
    Agent {
        #[command(flatten)]
        config: ConfigArg,
        /// Run one check-and-apply cycle and exit: 0 when the system is at the desired release.
        #[arg(long)]
        once: bool,
    },
    /// Ask the running agent to check for a new release now.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Try a quarantined release again (lift every quarantine and forget past failures).
    Retry {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print what the agent runs, wants and last did.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON for machines.
        #[arg(long)]
        json: bool,
    },
    /// This server's fleet group (or another, on etcd endpoints from the environment): its
    /// members and slots, announcing a release from CI, resuming a paused release.
    Fleet {
        #[command(flatten)]
        config: GlobalConfigArg,
        #[command(flatten)]
        fleet: hcloud_nixos::fleet::FleetArgs,
        #[command(subcommand)]
        command: hcloud_nixos::fleet::FleetCommand,
    },
    /// Check the agent's configuration file (the NixOS module runs this at build time).
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Work with user-data (cloud-config) before a server is created.
    Userdata {
        #[command(subcommand)]
        command: UserdataCommand,
    },
    /// Upload a disk image as a Hetzner Cloud snapshot; prints the snapshot ID.
    #[cfg(feature = "workstation")]
    Upload(upload::UploadArgs),
    /// Delete temporary servers and SSH keys that uploads left behind.
    #[cfg(feature = "workstation")]
    Cleanup(upload::CleanupArgs),
    /// Create servers from an uploaded snapshot, following a FlakeHub reference, and wait until
    /// the release is deployed; prints where the time went.
    #[cfg(feature = "workstation")]
    Create(hcloud_nixos::create::CreateArgs),
    /// Print what the metadata service says about this server.
    Metadata {
        #[command(flatten)]
        source: SourceArgs,
        /// Print JSON for machines.
        #[arg(long, conflicts_with = "userdata")]
        json: bool,
        /// Print the raw user-data instead.
        #[arg(long)]
        userdata: bool,
    },
}

#[derive(clap::Args)]
struct ConfigArg {
    /// The agent's configuration file (TOML).
    #[arg(long, default_value = config::DEFAULT_CONFIG, value_name = "PATH")]
    config: PathBuf,
}

/// `--config` for a command with subcommands: accepted before or after the subcommand.
#[derive(clap::Args)]
struct GlobalConfigArg {
    /// The agent's configuration file (TOML).
    #[arg(long, global = true, default_value = config::DEFAULT_CONFIG, value_name = "PATH")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file: print the effective settings, or one line per problem.
    /// Reads no token file and runs no program, so it works at build time.
    Check {
        /// The configuration file (TOML), e.g. /etc/hcloud-nixos/agent.toml.
        file: PathBuf,
        /// The file holds the settings as JSON (as the NixOS module has them before rendering).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum UserdataCommand {
    /// Validate a user-data file: print the effective settings (token redacted), or one line per problem.
    Check {
        /// The user-data file, as it will be given to `hcloud server create --user-data-from-file`.
        file: PathBuf,
    },
}

/// A command's result: success, or failure whose message was already printed.
enum Done {
    Ok,
    Failed,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    program::run(cli.verbose, async move {
        Ok(matches!(run(cli.command).await?, Done::Ok))
    })
}

/// A check's result: the description on stdout, or one `error:` line per problem.
fn print_checked(result: Result<String, Vec<String>>) -> Done {
    match result {
        Ok(description) => {
            print!("{description}");
            Done::Ok
        }
        Err(problems) => {
            for problem in problems {
                eprintln!("error: {problem}");
            }
            Done::Failed
        }
    }
}

async fn run(command: Command) -> Result<Done> {
    match command {
        Command::Network(args) => {
            args.run().await?;
            Ok(Done::Ok)
        }
        Command::Agent { config, once: true } => Ok(if service::once(&config.config).await? {
            Done::Ok
        } else {
            Done::Failed
        }),
        Command::Agent {
            config,
            once: false,
        } => {
            service::serve(config.config).await?;
            Ok(Done::Ok)
        }
        Command::Check { config } => {
            let pid = commands::request_check(&config.config)?;
            eprintln!(
                "asked the agent (PID {pid}) to check now; `hcloud-nixos status` shows the result"
            );
            Ok(Done::Ok)
        }
        Command::Fleet {
            config,
            fleet,
            command,
        } => {
            println!(
                "{}",
                commands::fleet_command(&config.config, &fleet, &command)
                    .await?
                    .trim_end()
            );
            Ok(Done::Ok)
        }
        #[cfg(feature = "workstation")]
        Command::Upload(args) => {
            upload::run_upload(args).await?;
            Ok(Done::Ok)
        }
        #[cfg(feature = "workstation")]
        Command::Create(args) => Ok(if hcloud_nixos::create::run_create(args).await? {
            Done::Ok
        } else {
            Done::Failed
        }),
        #[cfg(feature = "workstation")]
        Command::Cleanup(args) => {
            upload::run_cleanup(args).await?;
            Ok(Done::Ok)
        }
        Command::Retry { config } => retry(&config.config),
        Command::Status { config, json } => {
            print!("{}", commands::status(&config.config, json).await?);
            Ok(Done::Ok)
        }
        Command::Userdata {
            command: UserdataCommand::Check { file },
        } => Ok(print_checked(userdata::check_file(&file))),
        Command::Config {
            command: ConfigCommand::Check { file, json },
        } => Ok(print_checked(config::check_file(&file, json))),
        Command::Metadata {
            source,
            json,
            userdata,
        } => metadata(&source.source()?, json, userdata).await,
    }
}

/// `hcloud-nixos retry`, for a person.
fn retry(config: &std::path::Path) -> Result<Done> {
    let lifted = commands::retry(config)?;
    if lifted.is_empty() {
        eprintln!("nothing was quarantined; past failures are forgotten");
    } else {
        eprintln!(
            "lifted the quarantine of {}; the agent tries again at its next check",
            lifted.join(", ")
        );
    }
    Ok(Done::Ok)
}

/// `hcloud-nixos metadata [--json|--userdata]`.
async fn metadata(source: &provision::Source, json: bool, userdata: bool) -> Result<Done> {
    if userdata {
        use std::io::Write;
        let data = provision::fetch_userdata(source).await?;
        std::io::stdout().write_all(&data)?;
        return Ok(Done::Ok);
    }
    let fetched = provision::fetch(source).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&fetched)?);
    } else {
        print!("{}", provision::describe_metadata(&fetched));
    }
    Ok(Done::Ok)
}

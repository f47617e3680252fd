//! The `hcloud-nixos` command line.

use clap::{Parser, Subcommand};
use hcloud_nixos::upload;

/// NixOS on Hetzner Cloud.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Upload a disk image as a Hetzner Cloud snapshot; prints the snapshot ID.
    Upload(upload::UploadArgs),
    /// Delete temporary servers and SSH keys that uploads left behind.
    Cleanup(upload::CleanupArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .with_max_level(tracing::Level::WARN)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Upload(a) => upload::run_upload(a).await,
            Command::Cleanup(a) => upload::run_cleanup(a).await,
        }
    });
    // Do not wait for a hashing thread that an interrupt left behind.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

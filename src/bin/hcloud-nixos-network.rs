//! `hcloud-nixos-network`: the boot step (`hcloud-nixos network`) as a program of its own.
//!
//! It runs once at every boot, before the network is online. Built alone, it carries only the
//! code the boot step needs (no agent, fleet or etcd client), so it maps fewer pages and starts
//! faster than the whole `hcloud-nixos`.

use std::process::ExitCode;

use clap::Parser;
use hcloud_nixos::boot::cli::NetworkArgs;
use hcloud_nixos::plumbing::program;

/// Configure IPv6 (systemd-networkd), the hostname and root's SSH keys from the metadata service.
#[derive(Parser)]
#[command(name = "hcloud-nixos-network", version)]
struct Cli {
    /// Print debug messages, and whole error chains.
    #[arg(short, long)]
    verbose: bool,
    #[command(flatten)]
    args: NetworkArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    program::run(cli.verbose, async move {
        cli.args.run().await?;
        Ok(true)
    })
}

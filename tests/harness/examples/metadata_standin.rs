//! `metadata-standin`: the stand-in Hetzner metadata service as a program, for the benchmark and
//! for trying the binary by hand.
//!
//! cargo run --example metadata-standin -- --listen 127.0.0.1:8080 \
//!     [--metadata FILE] [--private-networks FILE] [--userdata FILE] [--netns NAME]

use std::path::PathBuf;
use std::process::ExitCode;

use harness::metadata::{Documents, MetadataServer};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("metadata-standin: {e}");
            ExitCode::from(2)
        }
    }
}

/// Without --metadata: the full example among the fixtures in tests/fixtures/.
fn default_metadata() -> PathBuf {
    harness::fixture("hetzner-metadata/metadata.full-example.yaml")
}

fn run() -> Result<(), String> {
    let mut listen = "127.0.0.1:8080".to_string();
    let mut metadata = None;
    let mut private_networks = None;
    let mut userdata = None;
    let mut netns = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--listen" => listen = value()?,
            "--metadata" => metadata = Some(PathBuf::from(value()?)),
            "--private-networks" => private_networks = Some(PathBuf::from(value()?)),
            "--userdata" => userdata = Some(PathBuf::from(value()?)),
            "--netns" => netns = Some(value()?),
            "-h" | "--help" => {
                println!(
                    "usage: metadata-standin [--listen ADDR] [--metadata FILE] \
                     [--private-networks FILE] [--userdata FILE] [--netns NAME]\n\
                     (--metadata defaults to {})",
                    default_metadata().display()
                );
                return Ok(());
            }
            other => return Err(format!("unknown argument '{other}' (see --help)")),
        }
    }
    let metadata = metadata.unwrap_or_else(default_metadata);
    let docs = Documents::from_files(&metadata, private_networks.as_deref(), userdata.as_deref())
        .map_err(|e| format!("cannot read the documents: {e}"))?;
    let server = match &netns {
        Some(ns) => MetadataServer::start_in_netns(ns, &listen, docs),
        None => MetadataServer::start(&listen, docs),
    }
    .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    // The benchmark waits for this line before it starts.
    println!("listening on {}", server.base_url());
    server.wait();
    Ok(())
}

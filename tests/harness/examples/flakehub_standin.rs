//! `flakehub-standin`: the stand-in FlakeHub API as a program, for the benchmark and for trying
//! the agent by hand.
//!
//! cargo run --example flakehub-standin -- --listen 127.0.0.1:8081 [--token TOKEN] \
//!     [--release ORG/FLAKE/VERSION#ATTR=STORE_PATH]...
//!
//! Prints `listening on http://ADDR` once it serves. `GET /_standin/counts` gives the request
//! counters as JSON.

use std::process::ExitCode;

use harness::flakehub::FlakeHub;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flakehub-standin: {e}");
            ExitCode::from(2)
        }
    }
}

/// `ORG/FLAKE/VERSION#ATTR=STORE_PATH`
fn parse_release(text: &str) -> Result<(String, String, String, String, String), String> {
    let bad = || format!("--release '{text}': expected ORG/FLAKE/VERSION#ATTR=STORE_PATH");
    let (reference, store_path) = text.split_once('=').ok_or_else(bad)?;
    let (path, attr) = reference.split_once('#').ok_or_else(bad)?;
    let mut parts = path.splitn(3, '/');
    let (Some(org), Some(flake), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    semver::Version::parse(version).map_err(|e| format!("--release '{text}': {e}"))?;
    Ok((
        org.into(),
        flake.into(),
        version.into(),
        attr.into(),
        store_path.into(),
    ))
}

fn run() -> Result<(), String> {
    let mut listen = "127.0.0.1:8081".to_string();
    let mut token = None;
    let mut releases = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--listen" => listen = value()?,
            "--token" => token = Some(value()?),
            "--release" => releases.push(parse_release(&value()?)?),
            "-h" | "--help" => {
                println!(
                    "usage: flakehub-standin [--listen ADDR] [--token TOKEN] \
                     [--release ORG/FLAKE/VERSION#ATTR=STORE_PATH]..."
                );
                return Ok(());
            }
            other => return Err(format!("unknown argument '{other}' (see --help)")),
        }
    }
    let server = FlakeHub::start(&listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    server.require_token(token.as_deref());
    for (org, flake, version, attr, store_path) in &releases {
        server.publish(org, flake, version, attr, store_path);
    }
    // The benchmark waits for this line before it starts.
    println!("listening on {}", server.url());
    server.wait();
    Ok(())
}

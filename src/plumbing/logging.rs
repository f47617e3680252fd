//! Logging set-up: structured fields to the journal under systemd, plain lines on stderr otherwise.

use tracing::level_filters::LevelFilter;
use tracing_subscriber::prelude::*;

/// Is stderr connected to the journal (systemd sets `JOURNAL_STREAM` to its device and inode)?
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// Installs the global subscriber. `verbose` turns on debug messages.
pub fn init(verbose: bool) {
    let level = if verbose {
        LevelFilter::DEBUG
    } else {
        LevelFilter::INFO
    };
    // Our own crate at the chosen level; dependencies only when they warn.
    let filter = tracing_subscriber::filter::Targets::new()
        .with_default(if verbose {
            LevelFilter::INFO
        } else {
            LevelFilter::WARN
        })
        .with_target("hcloud_nixos", level);
    if stderr_is_journal()
        && let Ok(journald) = tracing_journald::layer()
    {
        tracing_subscriber::registry()
            .with(journald.with_syslog_identifier("hcloud-nixos".into()))
            .with(filter)
            .init();
        return;
    }
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    tracing_subscriber::registry()
        .with(stderr)
        .with(filter)
        .init();
}

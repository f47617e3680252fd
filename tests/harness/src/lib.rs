//! The test harness of hcloud-nixos, compiled once for every integration test, example and
//! benchmark (a dev-only crate of the workspace; it does not depend on hcloud-nixos, so a change
//! in `src/` does not rebuild it).
//!
//! | module | what |
//! |---|---|
//! | [`http`] | the HTTP stand-in kit: an axum router served on loopback or inside a network namespace, one answer per connection, and the faults the stand-ins inject |
//! | [`metadata`], [`flakehub`], [`fleetlock`], [`health`], [`hcloud_api`] | the stand-ins built on it: Hetzner's metadata service, the FlakeHub API, a FleetLock server, a health endpoint, the Hetzner Cloud API |
//! | [`scripts`] | generators of the `fh`, `switch-to-configuration` and `determinate-nixd` stand-ins |
//! | [`agent`] | the agent bench: a temporary root, the stand-ins, real Nix store paths and profile generations, and helpers the agent tests share |
//! | [`units`], [`nix_store`] | the unit files as the NixOS module installs them; a Nix store of a test's own |
//! | [`netns`], [`container`] | network namespaces and guests; the host's Debian booted as a systemd container |
//! | [`cloud`] | a local cloud: the Cloud API stand-in whose servers boot as containers, each with its network, metadata service, sshd and the agent, and one FlakeHub |
//! | [`etcd`], [`rescue_sshd`] | a real etcd and a real sshd on loopback |
//! | [`prometheus`] | a strict reader of the metrics text |

pub mod agent;
pub mod cloud;
pub mod container;
pub mod etcd;
pub mod flakehub;
pub mod fleetlock;
pub mod hcloud_api;
pub mod health;
pub mod http;
pub mod metadata;
pub mod netns;
pub mod nix_store;
pub mod prometheus;
pub mod rescue_sshd;
pub mod scripts;
pub mod units;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// axum, for a test that serves a router of its own ([`http::Server`] serves it).
pub use axum;

/// The repository's root directory (where `Cargo.toml` of hcloud-nixos is).
pub fn repo() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("the harness lies in tests/harness of the repository")
}

/// A file or directory of the recorded payloads in `tests/fixtures/` (`hetzner-metadata/...`).
pub fn fixture(rel: &str) -> PathBuf {
    repo().join("tests/fixtures").join(rel)
}

/// The `hcloud-nixos` binary under test: `$HCLOUD_NIXOS_BIN`, or the one cargo built next to
/// the running test (`target/<profile>/hcloud-nixos`; cargo builds it before it runs
/// integration tests). `tests/standins.rs` checks that this is `CARGO_BIN_EXE_hcloud-nixos`.
pub fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("HCLOUD_NIXOS_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("the path of the running test");
    let mut dir = exe.parent().expect("the test's directory").to_path_buf();
    // Integration tests live in target/<profile>/deps, examples in target/<profile>/examples.
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    let bin = dir.join("hcloud-nixos");
    assert!(
        bin.is_file(),
        "{} does not exist: build it (cargo build) or set HCLOUD_NIXOS_BIN",
        bin.display()
    );
    bin
}

/// The boot step's program under test, `hcloud-nixos-network`: next to [`binary`], as cargo
/// builds both (and as the Nix package has them).
pub fn network_binary() -> PathBuf {
    let bin = binary().with_file_name("hcloud-nixos-network");
    assert!(
        bin.is_file(),
        "{} does not exist: build it (cargo build) or put it next to $HCLOUD_NIXOS_BIN",
        bin.display()
    );
    bin
}

/// The lock, also when another thread panicked while holding it (a failed test must not take
/// the stand-ins with it).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether the tests run under `CI=true` (a missing prerequisite is then a failure, not a skip).
pub fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// A test that cannot run here: under `CI=true` a failure (a CI run must not pass by
/// skipping), otherwise `SKIP: <test>: <why>` on stderr. Returns false, for `if !... { return }`.
pub fn skip(test: &str, why: &str) -> bool {
    assert!(!ci(), "{test}: {why} (CI=true: not skipping)");
    // Straight to stderr: the test harness captures eprintln! of passing tests.
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIP: {test}: {why}");
    false
}

/// `program` (an absolute path, or a name looked up in `PATH`, `/usr/sbin` and `/sbin`) exists.
pub fn on_path(program: &str) -> bool {
    if program.starts_with('/') {
        return Path::new(program).is_file();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|dir| dir.join(program).is_file())
}

//! `hcloud-nixos agent` end to end, one file per area: the real binary against the stand-ins of
//! `harness::agent` (FlakeHub, the metadata service, fh, determinate-nixd) with real Nix store
//! paths and profile generations. Applies run in direct mode (the transient-unit mode needs
//! systemd: `agent_systemd`).
//!
//! One test binary (run one area with `cargo test --test agent rollbacks::`). Needs root and
//! nix-bin; without them every test prints `SKIP: ...` (and fails under CI=true).

mod deploys;
mod hooks_metrics;
mod local_users;
mod login;
mod reboots;
mod rollbacks;
mod service;

//! hcloud-nixos: NixOS on Hetzner Cloud. Boot-time provisioning from the metadata service, a
//! pull-based deploy agent, and an image uploader, in one binary (`hcloud-nixos`); the boot step
//! is also a program of its own (`hcloud-nixos-network`), which carries only what it needs.
//!
//! One room per program, and one for what they share:
//! - [`boot`]: `hcloud-nixos-network` at boot (metadata, networkd files, hostname, SSH keys);
//! - [`agent`]: the deploy agent in every server (configuration, user-data, FlakeHub, the deploy
//!   lifecycle, health, reboots, hooks, metrics);
//! - [`fleet`]: servers of a group taking turns through etcd or FleetLock (used by the agent);
//! - `upload`: the workstation's uploader (disk image to snapshot), with the `workstation`
//!   feature (on by default; the servers' build leaves it out);
//! - [`plumbing`]: HTTP and TLS set-up, atomic files, running programs, secrets, logging.

#![warn(missing_docs)]

pub mod agent;
pub mod boot;
#[cfg(feature = "workstation")]
pub mod create;
pub mod fleet;
pub mod plumbing;
#[cfg(feature = "workstation")]
pub mod upload;

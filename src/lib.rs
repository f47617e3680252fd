//! hcloud-nixos: NixOS on Hetzner Cloud. Boot-time provisioning from the metadata service, a
//! pull-based deploy agent, and an image uploader, in one binary.

pub mod agent;
pub mod apply;
pub mod config;
pub mod deploy;
pub mod exec;
pub mod files;
pub mod flakehub;
pub mod flakeref;
pub mod fleet;
pub mod health;
pub mod hooks;
pub mod hostname;
pub mod http;
pub mod logging;
pub mod login;
pub mod metadata;
pub mod metrics;
pub mod network;
pub mod programs;
pub mod provision;
pub mod reboot;
pub mod release;
pub mod secret;
pub mod sshkeys;
pub mod state;
pub mod systemd;
pub mod tls;
pub mod upload;
pub mod userdata;

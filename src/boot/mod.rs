//! Boot-time provisioning (`hcloud-nixos network`, and `metadata` for a person): what DHCP does
//! not give a Hetzner server, from the metadata service, before networkd starts.

pub mod cache;
pub mod cli;
pub mod hostkey;
pub mod hostname;
pub mod metadata;
pub(crate) mod network;
pub mod provision;
pub mod sshkeys;

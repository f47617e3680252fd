//! hcloud-nixos: NixOS on Hetzner Cloud. Boot-time provisioning from the metadata service, a
//! pull-based deploy agent, and an image uploader, in one binary.

pub mod metadata;
pub mod tls;
pub mod upload;

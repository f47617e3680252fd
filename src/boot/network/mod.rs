//! systemd-networkd configuration for a server's NICs, rendered from its metadata (pure).
//!
//! One `.network` file per NIC, matched by MAC address. The names sort before NixOS's catch-all
//! `99-ethernet-default-dhcp.network`, so ours win for the NICs they match, and after the
//! `40-<name>.network` files of interfaces a user configured by hand, so theirs still win.
//!
//! Everything rendered here was checked where it entered (`metadata::text`): no value can hold
//! a line break, so none can add a line or a section.

pub(crate) mod link;
pub(crate) mod networkd;

use std::fmt::Write as _;

use serde::Serialize;

use crate::boot::metadata::{NetworkConfig, PrivateNetwork, PublicInterface};

/// Every file we write starts with this, and only files that do are ever removed by us.
pub(crate) const FILE_PREFIX: &str = "50-hcloud-nixos-";
pub(crate) const FILE_SUFFIX: &str = ".network";

/// A file to be placed in networkd's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct NetworkFile {
    pub(crate) name: String,
    pub(crate) contents: String,
}

/// Is `name` one of ours (so that a stale one may be removed)?
pub(crate) fn is_own_file(name: &str) -> bool {
    name.starts_with(FILE_PREFIX) && name.ends_with(FILE_SUFFIX)
}

/// The files for every public and private NIC, in a stable order.
pub(crate) fn render(network: &NetworkConfig, private: &[PrivateNetwork]) -> Vec<NetworkFile> {
    let mut files: Vec<NetworkFile> = network.interfaces.iter().map(render_public).collect();
    files.extend(private.iter().map(render_private));
    files.sort_by(|a, b| a.name.cmp(&b.name));
    files.dedup_by(|a, b| a.name == b.name);
    files
}

fn header(out: &mut String, what: &str) {
    let _ = writeln!(
        out,
        "# {what}, from the Hetzner metadata service.\n\
         # Written by `hcloud-nixos network` at every boot; edits here are lost."
    );
}

fn render_public(nic: &PublicInterface) -> NetworkFile {
    let mut out = String::new();
    let what = match &nic.name {
        Some(name) => format!("Public NIC ({name} in the metadata)"),
        None => "Public NIC".to_string(),
    };
    header(&mut out, &what);
    // Type=ether keeps VLANs and bridges that inherit this MAC from matching.
    let _ = writeln!(out, "\n[Match]\nMACAddress={}\nType=ether", nic.mac);
    if let Some(mtu) = nic.mtu {
        let _ = writeln!(out, "\n[Link]\nMTUBytes={mtu}");
    }
    let dhcp = match (nic.dhcp4, nic.dhcp6) {
        (true, true) => "yes",
        (true, false) => "ipv4",
        (false, true) => "ipv6",
        (false, false) => "no",
    };
    let _ = writeln!(out, "\n[Network]\nDHCP={dhcp}");
    // Hetzner sends no router advertisements: IPv6 is static, from the metadata.
    if !nic.dhcp6 {
        let _ = writeln!(out, "IPv6AcceptRA=no");
    }
    for address in &nic.addresses {
        let _ = writeln!(out, "Address={address}");
    }
    for dns in &nic.dns {
        let _ = writeln!(out, "DNS={dns}");
    }
    if !nic.dns_search.is_empty() {
        let domains: Vec<&str> = nic.dns_search.iter().map(|d| d.as_str()).collect();
        let _ = writeln!(out, "Domains={}", domains.join(" "));
    }
    for gateway in &nic.gateways {
        // fe80::1 is link-local: the route must say it is on this link.
        let _ = writeln!(out, "\n[Route]\nGateway={gateway}\nGatewayOnLink=yes");
    }
    NetworkFile {
        name: format!("{FILE_PREFIX}public-{}{FILE_SUFFIX}", nic.mac.compact()),
        contents: out,
    }
}

fn render_private(net: &PrivateNetwork) -> NetworkFile {
    let mut out = String::new();
    let what = match &net.network_name {
        Some(name) => format!("Private network '{name}'"),
        None => "Private network".to_string(),
    };
    header(&mut out, &what);
    let _ = writeln!(out, "\n[Match]\nMACAddress={}\nType=ether", net.mac);
    let _ = writeln!(out, "\n[Network]\nDHCP=ipv4\nIPv6AcceptRA=no");
    // Alias IPs are not handed out by DHCP; they must be configured on the NIC.
    for alias in &net.alias_ips {
        let _ = writeln!(out, "Address={alias}/32");
    }
    // The public NIC's default route must win over anything the private DHCP server offers.
    let _ = writeln!(out, "\n[DHCPv4]\nRouteMetric=1024");
    NetworkFile {
        name: format!("{FILE_PREFIX}private-{}{FILE_SUFFIX}", net.mac.compact()),
        contents: out,
    }
}

#[cfg(test)]
mod tests;

//! Rendering networkd files from parsed metadata.

use super::*;
use crate::boot::metadata::{self, DomainName, MacAddr};

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/hetzner-metadata/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn public_nic_of_the_full_example() {
    let m = metadata::parse_metadata(&fixture("metadata.full-example.yaml"))
        .unwrap()
        .value;
    let files = render(m.network.as_ref().unwrap(), &[]);
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].name, "50-hcloud-nixos-public-960003aabbcc.network");
    let body: Vec<&str> = files[0]
        .contents
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect();
    assert_eq!(
        body.join("\n"),
        "\n[Match]\nMACAddress=96:00:03:aa:bb:cc\nType=ether\n\n[Network]\nDHCP=ipv4\nIPv6AcceptRA=no\n\
         Address=2a01:4f8:c012:abcd::1/64\nDNS=2a01:4ff:ff00::add:2\nDNS=2a01:4ff:ff00::add:1\n\n\
         [Route]\nGateway=fe80::1\nGatewayOnLink=yes"
    );
}

#[test]
fn every_fixture_renders_files_that_sort_before_the_nixos_catch_all() {
    for name in [
        "metadata.full-example.yaml",
        "metadata.minimal.yaml",
        "metadata.no-static-type.yaml",
        "metadata.real-redacted.yaml",
    ] {
        let m = metadata::parse_metadata(&fixture(name)).unwrap().value;
        let private = metadata::parse_private_networks(&fixture("private-networks.alias-ips.yaml"))
            .unwrap()
            .value;
        let files = render(m.network.as_ref().unwrap(), &private);
        assert_eq!(files.len(), 3, "{name}");
        for f in &files {
            assert!(is_own_file(&f.name));
            assert!(f.name.as_str() < "99-ethernet-default-dhcp.network");
            assert!(
                f.name.as_str() > "40-eth0.network",
                "hand-written NixOS interface files keep priority"
            );
            assert!(f.contents.contains("[Match]\nMACAddress="));
        }
    }
}

#[test]
fn private_nics_get_dhcp_and_alias_ips() {
    let private = metadata::parse_private_networks(&fixture("private-networks.alias-ips.yaml"))
        .unwrap()
        .value;
    let files = render(&NetworkConfig::default(), &private);
    assert_eq!(
        files[0].name,
        "50-hcloud-nixos-private-8600002a7de0.network"
    );
    let text = &files[0].contents;
    assert!(text.contains("MACAddress=86:00:00:2a:7d:e0\n"));
    assert!(text.contains("DHCP=ipv4\n"));
    assert!(text.contains("Address=10.0.0.3/32\nAddress=10.0.0.4/32\n"));
    assert!(!text.contains("Gateway="));
    assert!(!files[1].contents.contains("\nAddress="));
}

#[test]
fn dhcp_modes_mtu_and_search_domains() {
    let nic = |dhcp4, dhcp6| PublicInterface {
        mac: MacAddr([0x96, 0, 0, 0, 0, 9]),
        name: None,
        dhcp4,
        dhcp6,
        addresses: vec![],
        gateways: vec![],
        dns: vec![],
        dns_search: ["a.example", "b.example"]
            .map(|d| DomainName::parse(d).unwrap())
            .to_vec(),
        mtu: Some(1400),
    };
    let text = |n| {
        render(
            &NetworkConfig {
                interfaces: vec![n],
            },
            &[],
        )[0]
        .contents
        .clone()
    };
    assert!(text(nic(true, true)).contains("DHCP=yes\n"));
    assert!(!text(nic(true, true)).contains("IPv6AcceptRA=no"));
    assert!(text(nic(false, true)).contains("DHCP=ipv6\n"));
    let t = text(nic(false, false));
    assert!(t.contains("DHCP=no\n"));
    assert!(t.contains("[Link]\nMTUBytes=1400\n"));
    assert!(t.contains("Domains=a.example b.example\n"));
    assert!(!t.contains("[Route]"));
}

#[test]
fn own_files_only() {
    assert!(is_own_file("50-hcloud-nixos-public-960003aabbcc.network"));
    assert!(!is_own_file(
        "50-hcloud-nixos-public-960003aabbcc.network.bak"
    ));
    assert!(!is_own_file("99-ethernet-default-dhcp.network"));
    assert!(!is_own_file(".50-hcloud-nixos-x.network.tmp-1"));
}

/// Text from the metadata with line breaks must not add lines or sections to a `.network` file.
#[test]
fn text_from_the_metadata_cannot_add_lines_to_network_files() {
    let injected = "x\\n[Network]\\nDNS=192.0.2.66";
    let public = [
        format!(
            "network-config:\n  version: 1\n  config:\n  - type: physical\n    mac_address: 96:00:00:00:00:01\n    name: \"eth0{injected}\"\n    subnets: [{{type: dhcp}}]\n"
        ),
        format!(
            "network-config:\n  version: 1\n  config:\n  - type: physical\n    mac_address: 96:00:00:00:00:01\n    subnets:\n    - type: dhcp\n      dns_search: [\"example.com{injected}\"]\n"
        ),
        format!(
            "network-config:\n  version: 1\n  config:\n  - type: physical\n    mac_address: 96:00:00:00:00:01\n  - type: nameserver\n    address: [185.12.64.1]\n    search: \"example.com{injected}\"\n"
        ),
    ];
    let check = |files: &[NetworkFile]| {
        for f in files {
            assert!(
                !f.contents.lines().any(|l| l.trim() == "DNS=192.0.2.66"),
                "{}:\n{}",
                f.name,
                f.contents
            );
            assert!(
                f.contents.matches("[Network]").count() <= 1,
                "{}",
                f.contents
            );
        }
    };
    for doc in &public {
        if let Ok(m) = metadata::parse_metadata(doc) {
            check(&render(m.value.network.as_ref().unwrap(), &[]));
        }
    }
    let private = format!(
        "- mac_address: 86:00:00:00:00:01\n  ip: 10.0.0.2\n  network_name: \"nw{injected}\"\n"
    );
    if let Ok(p) = metadata::parse_private_networks(&private) {
        check(&render(&NetworkConfig::default(), &p.value));
    }
}

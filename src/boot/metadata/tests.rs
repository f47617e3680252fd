//! Parsing every recorded fixture and the layouts and faults real servers have sent.

use super::*;

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/hetzner-metadata/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse().unwrap())
}

fn only_nic(m: &Metadata) -> &PublicInterface {
    let n = m.network.as_ref().expect("network-config");
    assert_eq!(n.interfaces.len(), 1);
    &n.interfaces[0]
}

/// A minimal document around one physical entry's YAML (indented under `config:`).
fn doc_with_nic(nic: &str) -> String {
    format!("hostname: h\nnetwork-config:\n  version: 1\n  config:\n{nic}")
}

fn err(text: &str) -> ParseError {
    parse_metadata(text).expect_err("should be rejected")
}

#[test]
fn full_example() {
    let m = parse_metadata(&fixture("metadata.full-example.yaml")).unwrap();
    assert_eq!(m.hostname.as_deref(), Some("my-nixos-server"));
    assert_eq!(m.instance_id, Some(58123456));
    assert_eq!(m.region.as_deref(), Some("eu-central"));
    assert_eq!(m.availability_zone.as_deref(), Some("fsn1-dc14"));
    assert_eq!(m.public_ipv4, Some("203.0.113.10".parse().unwrap()));
    assert_eq!(m.public_keys.len(), 1);
    assert!(m.public_keys[0].starts_with("ssh-ed25519 AAAAC3"));
    assert!(m.public_keys[0].ends_with(" alice@laptop"));
    let nic = only_nic(&m);
    assert_eq!(nic.mac.to_string(), "96:00:03:aa:bb:cc");
    assert_eq!(nic.name.as_deref(), Some("eth0"));
    assert!(nic.dhcp4 && !nic.dhcp6);
    assert_eq!(
        nic.addresses,
        vec![IpPrefix {
            addr: v6("2a01:4f8:c012:abcd::1"),
            len: 64
        }]
    );
    assert_eq!(nic.gateways, vec![v6("fe80::1")]);
    assert_eq!(
        nic.dns,
        vec![v6("2a01:4ff:ff00::add:2"), v6("2a01:4ff:ff00::add:1")]
    );
}

#[test]
fn minimal_afterburn_fixture() {
    let m = parse_metadata(&fixture("metadata.minimal.yaml")).unwrap();
    assert_eq!(m.instance_id, Some(42));
    let nic = only_nic(&m);
    assert_eq!(nic.mac, MacAddr([0; 6]));
    assert_eq!(nic.addresses[0].to_string(), "a00:a0:a000:a000::1/64");
    assert_eq!(nic.gateways, vec![v6("aa11::1")]);
    assert_eq!(m.public_keys.len(), 1);
}

#[test]
fn ipv6_subnet_without_type_static() {
    let m = parse_metadata(&fixture("metadata.no-static-type.yaml")).unwrap();
    let nic = only_nic(&m);
    assert!(nic.dhcp4);
    assert_eq!(nic.addresses[0].to_string(), "2a01:4f8:beef:beef::1/64");
    assert_eq!(nic.gateways, vec![v6("fe80::1")]);
    // The DHCP subnet's IPv4 resolvers come first, then the IPv6 ones.
    assert_eq!(nic.dns.len(), 4);
    assert_eq!(nic.dns[0], "185.12.64.1".parse::<IpAddr>().unwrap());
    // This fixture's key was mangled by line continuations: skipped, not fatal.
    assert!(m.public_keys.is_empty());
    assert_eq!(m.rejected_keys, vec![0]);
}

#[test]
fn real_redacted_dump_with_placeholders() {
    let m = parse_metadata(&fixture("metadata.real-redacted.yaml")).unwrap();
    assert_eq!(m.hostname.as_deref(), Some("test-server"));
    assert_eq!(m.public_ipv4, None, "'<public-address>' is no address");
    assert_eq!(m.rejected_keys, vec![0]);
    assert_eq!(only_nic(&m).mac.to_string(), "96:00:01:37:bc:20");
}

#[test]
fn private_network_fixtures() {
    let nets = parse_private_networks(&fixture("private-networks.alias-ips.yaml")).unwrap();
    assert_eq!(nets.len(), 2);
    assert_eq!(nets[0].mac.to_string(), "86:00:00:2a:7d:e0");
    assert_eq!(nets[0].ip, Some("10.0.0.2".parse().unwrap()));
    assert_eq!(nets[0].alias_ips.len(), 2);
    assert_eq!(nets[0].network_name.as_deref(), Some("nw-test1"));
    assert_eq!(nets[0].network_id, Some(1234));
    assert!(nets[0].mac.is_hetzner_private());
    let nets = parse_private_networks(&fixture("private-networks.two-networks.yaml")).unwrap();
    assert_eq!(nets.len(), 2);
    assert_eq!(nets[1].gateway, Some("10.128.0.1".parse().unwrap()));
}

#[test]
fn private_networks_empty_or_null() {
    assert!(parse_private_networks("[]").unwrap().is_empty());
    assert!(parse_private_networks("").unwrap().is_empty());
    let e = parse_private_networks("- ip: 10.0.0.2\n  mac_address: nope\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        "private-networks: [0].mac_address: 'nope' is not a MAC address (six bytes in hex, separated by colons)"
    );
    let e =
        parse_private_networks("- ip: 10.0.0.999\n  mac_address: 86:00:00:00:00:01\n").unwrap_err();
    assert_eq!(e.field, "[0].ip");
    assert!(parse_private_networks("ip: 1").is_err());
}

#[test]
fn no_public_network() {
    let m = parse_metadata("hostname: a\nnetwork-config:\n  config: []\n  version: 1\n").unwrap();
    assert_eq!(m.network, Some(NetworkConfig::default()));
}

#[test]
fn missing_keys_are_none() {
    let m = parse_metadata("instance-id: 7\n").unwrap();
    assert_eq!(m.hostname, None);
    assert_eq!(m.network, None);
    assert!(m.public_keys.is_empty());
    let m = parse_metadata("hostname: ''\nnetwork-config:\n  version: 1\n").unwrap();
    assert_eq!(m.hostname, None, "an empty hostname means none");
    assert_eq!(m.network, Some(NetworkConfig::default()));
}

#[test]
fn unknown_keys_are_ignored() {
    let m = parse_metadata(&doc_with_nic(
        "  - type: physical\n    mac_address: 96:00:00:00:00:01\n    future: [1, 2]\n    subnets:\n    - type: dhcp\n      ipv4: true\n      extra: x\n",
    ))
    .unwrap();
    assert!(only_nic(&m).dhcp4);
}

#[test]
fn wrong_version_is_rejected() {
    let e = err("network-config:\n  version: 2\n  ethernets: {}\n");
    assert_eq!(e.field, "network-config.version");
    assert_eq!(
        e.to_string(),
        "metadata: network-config.version: version '2' is not supported (only cloud-init network config version 1)"
    );
    // A quoted "1" is version 1.
    assert!(parse_metadata("network-config:\n  version: '1'\n  config: []\n").is_ok());
}

#[test]
fn garbage_is_rejected_with_one_line() {
    for text in [
        "{{{{ not yaml",
        "- just\n- a list\n",
        "42",
        "",
        "key: [unclosed\n",
    ] {
        let e = err(text);
        assert_eq!(e.document, "metadata");
        assert!(!e.to_string().contains('\n'), "multi-line error: {e}");
    }
}

#[test]
fn invalid_mac_names_the_field() {
    let e = err(&doc_with_nic(
        "  - type: physical\n    mac_address: 96:00:zz:00:00:01\n",
    ));
    assert_eq!(e.field, "network-config.config[0].mac_address");
    assert!(
        e.problem
            .contains("'96:00:zz:00:00:01' is not a MAC address")
    );
    let e = err(&doc_with_nic("  - type: physical\n    name: eth0\n"));
    assert_eq!(e.field, "network-config.config[0].mac_address");
}

#[test]
fn macs_are_normalised() {
    for text in [
        "96:00:03:AA:BB:CC",
        "96:0:3:aa:bb:cc",
        "96-00-03-aa-bb-cc",
        "960003AABBCC",
    ] {
        assert_eq!(
            text.parse::<MacAddr>().unwrap().to_string(),
            "96:00:03:aa:bb:cc",
            "{text}"
        );
    }
    for bad in [
        "96:00:03:aa:bb",
        "96:00:03:aa:bb:cc:dd",
        "960:0:3:aa:bb:cc",
        "",
        "96::03:aa:bb:cc",
    ] {
        assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
    }
}

#[test]
fn invalid_addresses_name_the_field() {
    let bad_address = "  - type: physical\n    mac_address: 96:00:00:00:00:01\n    subnets:\n    - type: static\n      address: 2a01:4f8:zz::1/64\n      gateway: fe80::1\n";
    let e = err(&doc_with_nic(bad_address));
    assert_eq!(e.field, "network-config.config[0].subnets[0].address");
    let bad_prefix = bad_address.replace("2a01:4f8:zz::1/64", "2a01:4f8::1/129");
    assert!(
        err(&doc_with_nic(&bad_prefix))
            .problem
            .contains("prefix length")
    );
    let bad_gateway = bad_address
        .replace("2a01:4f8:zz::1/64", "2a01:4f8::1/64")
        .replace("fe80::1", "fe80::g");
    assert_eq!(
        err(&doc_with_nic(&bad_gateway)).field,
        "network-config.config[0].subnets[0].gateway"
    );
    let wrong_family = bad_address
        .replace("2a01:4f8:zz::1/64", "2a01:4f8::1/64")
        .replace("fe80::1", "172.31.1.1");
    assert!(
        err(&doc_with_nic(&wrong_family))
            .problem
            .contains("address family")
    );
    let bad_dns = "  - type: physical\n    mac_address: 96:00:00:00:00:01\n    subnets:\n    - type: dhcp\n      dns_nameservers: [185.12.64.300]\n";
    assert_eq!(
        err(&doc_with_nic(bad_dns)).field,
        "network-config.config[0].subnets[0].dns_nameservers"
    );
}

#[test]
fn older_layouts() {
    // Prefix in a separate netmask, `static6`, IPv4 static with a dotted netmask, and resolvers
    // in a `type: nameserver` entry.
    let m = parse_metadata(&doc_with_nic(
        "  - type: physical\n    mac_address: 96:00:00:00:00:02\n    subnets:\n    - type: static\n      address: 203.0.113.5\n      netmask: 255.255.255.255\n      gateway: 172.31.1.1\n    - type: static6\n      address: '2a01:4f8:1:2::1'\n      netmask: 64\n  - type: nameserver\n    address: [185.12.64.1, '2a01:4ff:ff00::add:1']\n    search: [example.com]\n",
    ))
    .unwrap();
    let nic = only_nic(&m);
    assert!(!nic.dhcp4);
    assert_eq!(nic.addresses[0].to_string(), "203.0.113.5/32");
    assert_eq!(nic.addresses[1].to_string(), "2a01:4f8:1:2::1/64");
    assert_eq!(
        nic.gateways,
        vec!["172.31.1.1".parse::<IpAddr>().unwrap(), v6("fe80::1")]
    );
    assert_eq!(nic.dns.len(), 2);
    assert_eq!(nic.dns_search, vec!["example.com".to_string()]);
}

#[test]
fn network_config_as_embedded_string_or_wrapped() {
    let inner = "version: 1\nconfig:\n- type: physical\n  mac_address: 96:00:00:00:00:03\n  subnets:\n  - type: dhcp\n";
    let as_string = format!(
        "network-config: {}\n",
        serde_json::to_string(inner).unwrap()
    );
    assert_eq!(
        only_nic(&parse_metadata(&as_string).unwrap())
            .mac
            .to_string(),
        "96:00:00:00:00:03"
    );
    let wrapped = "network-config:\n  network:\n    version: 1\n    config:\n    - type: physical\n      mac_address: 96:00:00:00:00:04\n";
    assert_eq!(
        only_nic(&parse_metadata(wrapped).unwrap()).mac.to_string(),
        "96:00:00:00:00:04"
    );
    let bare_list = "network-config:\n- type: physical\n  mac_address: 96:00:00:00:00:05\n";
    assert_eq!(
        only_nic(&parse_metadata(bare_list).unwrap())
            .mac
            .to_string(),
        "96:00:00:00:00:05"
    );
    assert_eq!(
        parse_network_config_document(inner).unwrap().interfaces[0]
            .mac
            .to_string(),
        "96:00:00:00:00:03"
    );
}

#[test]
fn entries_without_type_but_with_a_mac_are_nics() {
    let m = parse_metadata(&doc_with_nic(
        "  - mac_address: 96:00:00:00:00:06\n    subnets:\n    - type: dhcp\n",
    ))
    .unwrap();
    assert!(only_nic(&m).dhcp4);
    // Bonds and VLANs are not ours to configure.
    let m = parse_metadata(&doc_with_nic("  - type: vlan\n    vlan_id: 3\n")).unwrap();
    assert!(m.network.unwrap().interfaces.is_empty());
}

#[test]
fn public_keys_layouts_and_rejections() {
    let k = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBjYTHGYkNK7DZ4Gn0NGN1sj";
    let m = parse_metadata(&format!("public-keys: '{k}  me@x'\n")).unwrap();
    assert_eq!(m.public_keys, vec![format!("{k} me@x")]);
    let m = parse_metadata(&format!("public-keys:\n  work:\n    openssh-key: '{k}'\n")).unwrap();
    assert_eq!(m.public_keys, vec![k.to_string()]);
    let m = parse_metadata(&format!(
        "public-keys:\n- '{k}'\n- '{k}'\n- 'command=\"rm -rf /\" {k}'\n- \"{k}\\nssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ\"\n- 17\n"
    ))
    .unwrap();
    assert_eq!(m.public_keys, vec![k.to_string()], "duplicates folded");
    assert_eq!(m.rejected_keys, vec![2, 3, 4]);
}

#[test]
fn invalid_hostname_is_rejected() {
    let e = err("hostname: 'bad host!'\n");
    assert_eq!(e.field, "hostname");
    assert!(
        err(&format!("hostname: {}\n", "a".repeat(65)))
            .problem
            .contains("64")
    );
    assert_eq!(
        parse_metadata("hostname: web-1.example.com\n")
            .unwrap()
            .hostname
            .as_deref(),
        Some("web-1.example.com")
    );
}

#[test]
fn instance_id_as_text() {
    assert_eq!(
        parse_metadata("instance-id: '123'\n").unwrap().instance_id,
        Some(123)
    );
    assert_eq!(err("instance-id: abc\n").field, "instance-id");
}

#[test]
fn alias_bombs_do_not_blow_up() {
    let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let prev = i - 1;
        text.push_str(&format!("a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"));
    }
    assert!(parse_metadata(&text).is_err());
}

#[test]
fn large_but_sane_document_parses() {
    let mut text = String::from("public-keys:\n");
    for i in 0..2000 {
        text.push_str(&format!(
            "- ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{i:08} k{i}\n"
        ));
    }
    assert_eq!(parse_metadata(&text).unwrap().public_keys.len(), 2000);
}

//! Parsing every recorded fixture and the layouts and faults real servers have sent.

use std::net::IpAddr;

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
    assert_eq!(n.interfaces.len(), 1, "{n:?}");
    &n.interfaces[0]
}

/// A minimal document around one physical entry's YAML (indented under `config:`).
fn doc_with_nic(nic: &str) -> String {
    format!("hostname: h\nnetwork-config:\n  version: 1\n  config:\n{nic}")
}

/// The metadata of a document that must parse.
fn md(text: &str) -> Metadata {
    parse_metadata(text).expect("should parse").value
}

/// The problems of a document that must parse.
fn problems(text: &str) -> Vec<Problem> {
    parse_metadata(text).expect("should parse").problems
}

/// The one problem of a document that must parse, with the field it names.
fn only_problem(text: &str) -> Problem {
    let p = problems(text);
    assert_eq!(p.len(), 1, "{p:#?}");
    p.into_iter().next().unwrap()
}

fn err(text: &str) -> ParseError {
    parse_metadata(text).expect_err("should be rejected")
}

#[test]
fn full_example() {
    let parsed = parse_metadata(&fixture("metadata.full-example.yaml")).unwrap();
    assert_eq!(parsed.problems, vec![]);
    let m = parsed.value;
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
    let m = md(&fixture("metadata.minimal.yaml"));
    assert_eq!(m.instance_id, Some(42));
    let nic = only_nic(&m);
    assert_eq!(nic.mac, MacAddr([0; 6]));
    assert_eq!(nic.addresses[0].to_string(), "a00:a0:a000:a000::1/64");
    assert_eq!(nic.gateways, vec![v6("aa11::1")]);
    assert_eq!(m.public_keys.len(), 1);
}

#[test]
fn ipv6_subnet_without_type_static() {
    let text = fixture("metadata.no-static-type.yaml");
    let m = md(&text);
    let nic = only_nic(&m);
    assert!(nic.dhcp4);
    assert_eq!(nic.addresses[0].to_string(), "2a01:4f8:beef:beef::1/64");
    assert_eq!(nic.gateways, vec![v6("fe80::1")]);
    // The DHCP subnet's IPv4 resolvers come first, then the IPv6 ones.
    assert_eq!(nic.dns.len(), 4);
    assert_eq!(nic.dns[0], "185.12.64.1".parse::<IpAddr>().unwrap());
    // This fixture's key was mangled by line continuations: skipped, not fatal.
    assert!(m.public_keys.is_empty());
    assert_eq!(only_problem(&text).field, "public-keys[0]");
}

#[test]
fn real_redacted_dump_with_placeholders() {
    let text = fixture("metadata.real-redacted.yaml");
    let m = md(&text);
    assert_eq!(m.hostname.as_deref(), Some("test-server"));
    assert_eq!(m.public_ipv4, None, "'<public-address>' is no address");
    assert_eq!(only_nic(&m).mac.to_string(), "96:00:01:37:bc:20");
    let p = only_problem(&text);
    assert_eq!(p.field, "public-keys[0]");
    assert!(
        p.problem
            .starts_with("'<public-key-info>' is not an OpenSSH public key")
    );
}

/// The older layout: the IPv6 subnet on `eth0:0`, an entry without a MAC of its own.
#[test]
fn alias_entry_subnets_belong_to_their_nic() {
    let parsed = parse_metadata(&fixture("metadata.alias-ipv6.yaml")).unwrap();
    assert_eq!(parsed.problems, vec![]);
    let nic = only_nic(&parsed.value);
    assert_eq!(nic.mac.to_string(), "96:00:00:4e:1f:2a");
    assert!(nic.dhcp4);
    assert_eq!(
        nic.addresses,
        vec![IpPrefix {
            addr: v6("2a01:4f8:c17:1a2b::1"),
            len: 64
        }]
    );
    assert_eq!(nic.gateways, vec![v6("fe80::1")]);
    assert_eq!(nic.dns.len(), 3);
    // An alias whose NIC is not there, and an entry without MAC that is no alias.
    let text = doc_with_nic(
        "  - type: physical\n    mac_address: 96:00:00:00:00:01\n    name: eth0\n  - type: physical\n    name: eth1:0\n    subnets: [{type: static, address: '2a01:4f8::1/64'}]\n  - type: physical\n    name: eth2\n",
    );
    let p = problems(&text);
    assert_eq!(p.len(), 2, "{p:#?}");
    assert_eq!(p[0].field, "network-config.config[2].mac_address");
    assert_eq!(p[1].field, "network-config.config[1].name");
    assert!(
        p[1].problem.contains("alias of no NIC named 'eth1'"),
        "{}",
        p[1]
    );
    assert!(only_nic(&md(&text)).addresses.is_empty());
    // A bad subnet on the alias costs its NIC.
    let text = doc_with_nic(
        "  - type: physical\n    mac_address: 96:00:00:00:00:01\n    name: eth0\n  - type: physical\n    name: eth0:0\n    subnets: [{type: static, address: 'nope/64'}]\n",
    );
    assert!(md(&text).network.unwrap().interfaces.is_empty());
    assert_eq!(
        only_problem(&text).field,
        "network-config.config[1].subnets[0].address"
    );
}

#[test]
fn private_network_fixtures() {
    let nets = parse_private_networks(&fixture("private-networks.alias-ips.yaml")).unwrap();
    assert_eq!(nets.problems, vec![]);
    let nets = nets.value;
    assert_eq!(nets.len(), 2);
    assert_eq!(nets[0].mac.to_string(), "86:00:00:2a:7d:e0");
    assert_eq!(nets[0].ip, Some("10.0.0.2".parse().unwrap()));
    assert_eq!(nets[0].alias_ips.len(), 2);
    assert_eq!(nets[0].network_name.as_deref(), Some("nw-test1"));
    assert_eq!(nets[0].network_id, Some(1234));
    assert_eq!(nets[0].subnet.unwrap().to_string(), "10.0.0.0/24");
    assert!(nets[0].mac.is_hetzner_private());
    let nets = parse_private_networks(&fixture("private-networks.two-networks.yaml"))
        .unwrap()
        .value;
    assert_eq!(nets.len(), 2);
    assert_eq!(nets[1].gateway, Some("10.128.0.1".parse().unwrap()));
}

#[test]
fn private_networks_empty_null_or_partly_bad() {
    assert!(parse_private_networks("[]").unwrap().value.is_empty());
    assert!(parse_private_networks("").unwrap().value.is_empty());
    assert!(parse_private_networks("ip: 1").is_err());
    // A bad MAC or alias IP costs its NIC; a bad informational field is dropped.
    let p = parse_private_networks(
        "- ip: 10.0.0.2\n  mac_address: nope\n- mac_address: 86:00:00:00:00:02\n  alias_ips: [10.0.0.999]\n- mac_address: 86:00:00:00:00:03\n  ip: 10.0.0.999\n  network_name: \"a\\nb\"\n",
    )
    .unwrap();
    assert_eq!(p.value.len(), 1);
    assert_eq!(p.value[0].mac.to_string(), "86:00:00:00:00:03");
    assert_eq!(p.value[0].ip, None);
    assert_eq!(p.value[0].network_name, None);
    let fields: Vec<&str> = p.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "[0].mac_address",
            "[1].alias_ips[0]",
            "[2].ip",
            "[2].network_name"
        ]
    );
    assert_eq!(
        p.problems[0].to_string(),
        "private-networks: [0].mac_address: 'nope' is not a MAC address (six bytes in hex, separated by colons); this NIC is skipped"
    );
    assert_eq!(
        p.problems[3].problem,
        "'a\\nb' has control or formatting characters; dropped"
    );
}

#[test]
fn no_public_network() {
    let m = md("hostname: a\nnetwork-config:\n  config: []\n  version: 1\n");
    assert_eq!(m.network, Some(NetworkConfig::default()));
}

#[test]
fn missing_keys_are_none() {
    let m = md("instance-id: 7\n");
    assert_eq!(m.hostname, None);
    assert_eq!(m.network, None);
    assert!(m.public_keys.is_empty());
    let m = md("hostname: ''\nnetwork-config:\n  version: 1\n");
    assert_eq!(m.hostname, None, "an empty hostname means none");
    assert_eq!(m.network, Some(NetworkConfig::default()));
}

#[test]
fn unknown_keys_are_ignored() {
    let text = doc_with_nic(
        "  - type: physical\n    mac_address: 96:00:00:00:00:01\n    future: [1, 2]\n    subnets:\n    - type: dhcp\n      ipv4: true\n      extra: x\n",
    );
    assert!(only_nic(&md(&text)).dhcp4);
    assert_eq!(problems(&text), vec![]);
}

/// Another version costs the network (files are left as they are), not the keys or hostname.
#[test]
fn wrong_version_costs_the_network_only() {
    let text = "hostname: h\nnetwork-config:\n  version: 2\n  ethernets: {}\n";
    let m = md(text);
    assert_eq!(m.network, None);
    assert_eq!(m.hostname.as_deref(), Some("h"));
    let p = only_problem(text);
    assert_eq!(p.field, "network-config.version");
    assert_eq!(
        p.to_string(),
        "metadata: network-config.version: version '2' is not supported (only cloud-init network config version 1); network files are left as they are"
    );
    // A quoted "1" is version 1.
    assert!(
        md("network-config:\n  version: '1'\n  config: []\n")
            .network
            .is_some()
    );
}

#[test]
fn garbage_is_rejected_with_one_line() {
    for text in [
        "{{{{ not yaml",
        "- just\n- a list\n",
        "42",
        "",
        "key: [unclosed\n",
        "a: \"\n\n\n\n",
    ] {
        let e = err(text);
        assert_eq!(e.document, "metadata");
        assert!(!e.to_string().contains('\n'), "multi-line error: {e}");
    }
    let huge = format!("a: '{}'\n", "x".repeat(MAX_DOCUMENT_BYTES));
    assert!(err(&huge).problem.contains("larger than"));
}

#[test]
fn invalid_mac_costs_its_nic() {
    let text = doc_with_nic("  - type: physical\n    mac_address: 96:00:zz:00:00:01\n");
    assert!(md(&text).network.unwrap().interfaces.is_empty());
    let p = only_problem(&text);
    assert_eq!(p.field, "network-config.config[0].mac_address");
    assert!(
        p.problem
            .contains("'96:00:zz:00:00:01' is not a MAC address")
    );
    assert!(p.problem.ends_with("; this NIC is skipped"));
    let p = only_problem(&doc_with_nic("  - type: physical\n    name: eth0\n"));
    assert_eq!(p.field, "network-config.config[0].mac_address");
}

#[test]
fn macs_are_normalised() {
    for text in [
        "96:00:03:AA:BB:CC",
        "96:0:3:aa:bb:cc",
        "96-00-03-aa-bb-cc",
        "960003AABBCC",
        " 96:00:03:aa:bb:cc\n",
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
        "+6:00:03:aa:bb:cc",
        "96:00:03:aa:bb:cc:",
    ] {
        assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
    }
}

#[test]
fn non_ascii_macs_are_errors_not_panics() {
    for text in [
        "€€€€",
        "96€€€a",
        "96€€€€aabb",
        "ééééééaaaaaa",
        "96:00:€:00:00:01",
        "٩٦٠٠٠٣aabbcc",
    ] {
        assert!(text.parse::<MacAddr>().is_err(), "{text}");
    }
}

/// One NIC's bad data costs that NIC, not the others, the keys or the hostname.
#[test]
fn one_bad_nic_costs_only_itself() {
    let text = format!(
        "public-keys: ['ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBjYTHGY k']\n{}",
        doc_with_nic(
            "  - type: physical\n    mac_address: \"96€€€a\"\n  - type: physical\n    mac_address: 96:00:00:00:00:02\n    subnets: [{type: dhcp}]\n",
        )
    );
    let m = md(&text);
    assert_eq!(only_nic(&m).mac.to_string(), "96:00:00:00:00:02");
    assert_eq!(m.hostname.as_deref(), Some("h"));
    assert_eq!(m.public_keys.len(), 1);
    assert_eq!(
        only_problem(&text).field,
        "network-config.config[0].mac_address"
    );
}

#[test]
fn invalid_addresses_cost_their_nic() {
    let bad_address = "  - type: physical\n    mac_address: 96:00:00:00:00:01\n    subnets:\n    - type: static\n      address: 2a01:4f8:zz::1/64\n      gateway: fe80::1\n";
    let field = |nic: &str| only_problem(&doc_with_nic(nic)).field;
    assert_eq!(
        field(bad_address),
        "network-config.config[0].subnets[0].address"
    );
    let bad_prefix = bad_address.replace("2a01:4f8:zz::1/64", "2a01:4f8::1/129");
    assert!(
        only_problem(&doc_with_nic(&bad_prefix))
            .problem
            .contains("prefix length")
    );
    let scoped = bad_address
        .replace("2a01:4f8:zz::1/64", "2a01:4f8::1/64")
        .replace("fe80::1", "'fe80::1%eth0'");
    assert_eq!(
        only_nic(&md(&doc_with_nic(&scoped))).gateways,
        vec![v6("fe80::1")]
    );
    let scoped_global = scoped.replace("fe80::1%eth0", "2a01::1%eth0");
    assert_eq!(
        field(&scoped_global),
        "network-config.config[0].subnets[0].gateway"
    );
    let bad_gateway = bad_address
        .replace("2a01:4f8:zz::1/64", "2a01:4f8::1/64")
        .replace("fe80::1", "fe80::g");
    assert_eq!(
        field(&bad_gateway),
        "network-config.config[0].subnets[0].gateway"
    );
    let wrong_family = bad_address
        .replace("2a01:4f8:zz::1/64", "2a01:4f8::1/64")
        .replace("fe80::1", "172.31.1.1");
    assert!(
        only_problem(&doc_with_nic(&wrong_family))
            .problem
            .contains("address family")
    );
    let bad_dns = "  - type: physical\n    mac_address: 96:00:00:00:00:01\n    subnets:\n    - type: dhcp\n      dns_nameservers: [185.12.64.300]\n";
    assert_eq!(
        field(bad_dns),
        "network-config.config[0].subnets[0].dns_nameservers"
    );
    let bad_mtu = "  - type: physical\n    mac_address: 96:00:00:00:00:01\n    mtu: 99999999999\n";
    assert_eq!(field(bad_mtu), "network-config.config[0].mtu");
    for nic in [bad_address, bad_dns, bad_mtu] {
        assert!(
            md(&doc_with_nic(nic))
                .network
                .unwrap()
                .interfaces
                .is_empty()
        );
    }
}

#[test]
fn text_that_could_add_lines_is_refused_where_it_enters() {
    let nic = |extra: &str| {
        doc_with_nic(&format!(
            "  - type: physical\n    mac_address: 96:00:00:00:00:01\n{extra}"
        ))
    };
    // A bad name is dropped; the NIC stays.
    let text = nic("    name: \"eth0\\n[Network]\\nDNS=192.0.2.66\"\n");
    assert_eq!(only_nic(&md(&text)).name, None);
    let p = only_problem(&text);
    assert_eq!(p.field, "network-config.config[0].name");
    assert!(!p.to_string().contains('\n'));
    assert!(
        p.problem.contains("'eth0\\n[Network]\\nDNS=192.0.2.66'"),
        "{p}"
    );
    // A bad search domain costs the NIC.
    let text = nic("    subnets:\n    - type: dhcp\n      dns_search: [\"a.example\\n[Route]\"]\n");
    assert!(md(&text).network.unwrap().interfaces.is_empty());
    assert_eq!(
        only_problem(&text).field,
        "network-config.config[0].subnets[0].dns_search"
    );
    // In a nameserver entry it costs the entry.
    let text = nic(
        "  - type: nameserver\n    address: [185.12.64.1]\n    search: \"ok.example\n      evil\\x1b]0;x\"\n",
    );
    let m = md(&text);
    assert!(only_nic(&m).dns.is_empty());
    assert_eq!(only_problem(&text).field, "network-config.config[1].search");
    // Region and hostname with control characters are dropped.
    let text = "hostname: \"web\\n1\"\nregion: \"eu\\u001b[31m\"\navailability-zone: fsn1-dc14\n";
    let m = md(text);
    assert_eq!((m.hostname, m.region), (None, None));
    assert_eq!(m.availability_zone.as_deref(), Some("fsn1-dc14"));
    for p in problems(text) {
        assert!(!p.to_string().chars().any(char::is_control), "{p:?}");
    }
}

#[test]
fn older_layouts() {
    // Prefix in a separate netmask, `static6`, IPv4 static with a dotted netmask, and resolvers
    // in a `type: nameserver` entry.
    let m = md(&doc_with_nic(
        "  - type: physical\n    mac_address: 96:00:00:00:00:02\n    subnets:\n    - type: static\n      address: 203.0.113.5\n      netmask: 255.255.255.255\n      gateway: 172.31.1.1\n    - type: static6\n      address: '2a01:4f8:1:2::1'\n      netmask: 64\n  - type: nameserver\n    address: [185.12.64.1, '2a01:4ff:ff00::add:1']\n    search: [example.com]\n",
    ));
    let nic = only_nic(&m);
    assert!(!nic.dhcp4);
    assert_eq!(nic.addresses[0].to_string(), "203.0.113.5/32");
    assert_eq!(nic.addresses[1].to_string(), "2a01:4f8:1:2::1/64");
    assert_eq!(
        nic.gateways,
        vec!["172.31.1.1".parse::<IpAddr>().unwrap(), v6("fe80::1")]
    );
    assert_eq!(nic.dns.len(), 2);
    assert_eq!(nic.dns_search[0].as_str(), "example.com");
}

#[test]
fn network_config_as_embedded_string_or_wrapped() {
    let inner = "version: 1\nconfig:\n- type: physical\n  mac_address: 96:00:00:00:00:03\n  subnets:\n  - type: dhcp\n";
    let as_string = format!(
        "network-config: {}\n",
        serde_json::to_string(inner).unwrap()
    );
    assert_eq!(
        only_nic(&md(&as_string)).mac.to_string(),
        "96:00:00:00:00:03"
    );
    let wrapped = "network-config:\n  network:\n    version: 1\n    config:\n    - type: physical\n      mac_address: 96:00:00:00:00:04\n";
    assert_eq!(only_nic(&md(wrapped)).mac.to_string(), "96:00:00:00:00:04");
    let bare_list = "network-config:\n- type: physical\n  mac_address: 96:00:00:00:00:05\n";
    assert_eq!(
        only_nic(&md(bare_list)).mac.to_string(),
        "96:00:00:00:00:05"
    );
    assert_eq!(
        parse_network_config_document(inner)
            .unwrap()
            .value
            .interfaces[0]
            .mac
            .to_string(),
        "96:00:00:00:00:03"
    );
    // The whole document as JSON.
    let json: serde_json::Value =
        serde_saphyr::from_str(&fixture("metadata.full-example.yaml")).unwrap();
    assert_eq!(
        md(&json.to_string()),
        md(&fixture("metadata.full-example.yaml"))
    );
}

#[test]
fn entries_without_type_but_with_a_mac_are_nics() {
    let m = md(&doc_with_nic(
        "  - mac_address: 96:00:00:00:00:06\n    subnets:\n    - type: dhcp\n",
    ));
    assert!(only_nic(&m).dhcp4);
    // Bonds and VLANs are not ours to configure.
    let m = md(&doc_with_nic("  - type: vlan\n    vlan_id: 3\n"));
    assert!(m.network.unwrap().interfaces.is_empty());
}

#[test]
fn duplicate_macs_keep_the_first_nic() {
    let text = doc_with_nic(
        "  - type: physical\n    mac_address: 96:00:00:00:00:01\n    subnets: [{type: dhcp}]\n  - type: physical\n    mac_address: 96-00-00-00-00-01\n",
    );
    assert!(only_nic(&md(&text)).dhcp4);
    assert_eq!(
        only_problem(&text).field,
        "network-config.config[1].mac_address"
    );
}

#[test]
fn public_keys_layouts_and_rejections() {
    let k = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBjYTHGYkNK7DZ4Gn0NGN1sj";
    let m = md(&format!("public-keys: '{k}  me@x'\n"));
    assert_eq!(m.public_keys[0].as_str(), format!("{k} me@x"));
    let m = md(&format!("public-keys:\n  work:\n    openssh-key: '{k}'\n"));
    assert_eq!(m.public_keys[0].as_str(), k);
    let text = format!(
        "public-keys:\n- '{k}'\n- '{k}'\n- 'command=\"rm -rf /\" {k}'\n- \"{k}\\nssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ\"\n- 17\n- [a]\n"
    );
    let parsed = parse_metadata(&text).unwrap();
    let keys: Vec<&str> = parsed
        .value
        .public_keys
        .iter()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        keys,
        [k, "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ"],
        "duplicates folded; a pasted file of two keys gives both"
    );
    let fields: Vec<&str> = parsed.problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        ["public-keys[2]", "public-keys[4]", "public-keys[5]"]
    );
    assert!(
        parsed.problems[0].problem.contains("has options"),
        "{}",
        parsed.problems[0]
    );
}

/// Keys as the console and the API hand them on: a trailing newline, CRLF, blanks, comment
/// lines; each line still checked on its own.
#[test]
fn keys_with_a_trailing_newline_or_crlf_are_accepted() {
    let k = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBjYTHGYkNK7DZ4Gn0NGN1sj";
    for text in [
        format!("{k} me@x\n"),
        format!("{k} me@x\r\n"),
        format!("  {k}\n\n"),
        format!("# laptop\r\n{k}\r\n"),
    ] {
        let doc = format!("public-keys: [{}]\n", serde_json::to_string(&text).unwrap());
        let parsed = parse_metadata(&doc).unwrap();
        assert_eq!(parsed.value.public_keys.len(), 1, "{text:?}");
        assert_eq!(parsed.problems, vec![], "{text:?}");
        let last = text.lines().rfind(|l| !l.trim().is_empty());
        assert!(SshKey::parse(last.unwrap()).is_ok(), "{text:?}");
    }
    for bad in [
        format!("{k}\u{1b}[2J"),
        format!("{k} me\rx"),
        format!("{k} \u{202e}evil"),
        format!("no-pty {k}"),
        format!("from=\"10.0.0.1\" {k}"),
        "ssh-ed25519 short".to_string(),
    ] {
        assert!(SshKey::parse(&bad).is_err(), "{bad:?}");
    }
}

#[test]
fn invalid_hostname_costs_the_hostname() {
    let p = only_problem("hostname: 'bad host!'\n");
    assert_eq!(p.field, "hostname");
    assert!(
        only_problem(&format!("hostname: {}\n", "a".repeat(65)))
            .problem
            .contains("64")
    );
    assert_eq!(
        md("hostname: web-1.example.com\n").hostname.as_deref(),
        Some("web-1.example.com")
    );
}

#[test]
fn instance_id_as_text() {
    assert_eq!(md("instance-id: '123'\n").instance_id, Some(123));
    assert_eq!(only_problem("instance-id: abc\n").field, "instance-id");
    assert_eq!(md("instance-id: -1\n").instance_id, None);
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
    assert_eq!(md(&text).public_keys.len(), 2000);
}

/// Many NICs and many global DNS servers: bounded, not multiplied.
#[test]
fn counts_are_bounded() {
    let mut nics = String::new();
    for i in 0..5000u32 {
        let [_, _, a, b] = i.to_be_bytes();
        nics.push_str(&format!("  - mac_address: 96:00:00:00:{a:02x}:{b:02x}\n"));
    }
    nics.push_str("  - type: nameserver\n    address: [");
    for i in 0..3000u32 {
        let [_, _, a, b] = i.to_be_bytes();
        nics.push_str(&format!("'2a01::{a:x}:{b:x}', "));
    }
    nics.push_str("]\n");
    let started = std::time::Instant::now();
    let parsed = parse_metadata(&doc_with_nic(&nics)).unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    let interfaces = parsed.value.network.unwrap().interfaces;
    assert_eq!(interfaces.len(), 16);
    assert!(parsed.problems.len() <= 33);
}

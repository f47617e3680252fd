//! Parsers under fire: the metadata documents, MACs, addresses and keys fed hostile input.
//!
//! The documents in every layout and encoding (YAML, JSON, the network configuration as an
//! embedded YAML string), MACs, addresses and keys are fed arbitrary input and the fixtures
//! mutated (byte flips, truncations, insertions, duplicated lines, huge
//! numbers, deep nesting, control characters, non-UTF-8). Each input must give a value or one
//! one-line error within a second, never a panic, and what renders from a value must stay
//! within its lines (no added lines or sections in a `.network` file, no line in the keys file
//! that is not a key).
//!
//! `PROPTEST_CASES` sets the inputs per property (256 by default); a long run:
//! `PROPTEST_CASES=200000 cargo test --release --lib boot::metadata::proptests -- --nocapture`
//! (each property prints how many inputs it ran and how long it took).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use super::*;
use crate::boot::network::{self, NetworkFile};
use crate::boot::sshkeys;

const FIXTURES: &[&str] = &[
    "metadata.full-example.yaml",
    "metadata.minimal.yaml",
    "metadata.no-static-type.yaml",
    "metadata.real-redacted.yaml",
    "metadata.alias-ipv6.yaml",
];

const PRIVATE_FIXTURES: &[&str] = &[
    "private-networks.alias-ips.yaml",
    "private-networks.two-networks.yaml",
];

/// No input may take longer than this.
const PER_INPUT: Duration = Duration::from_secs(1);
/// The largest generated input; the client refuses bodies over 1 MiB, tested apart.
const MAX_INPUT: usize = 64 * 1024;

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/hetzner-metadata/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(path).unwrap()
}

/// Each fixture as served, as JSON, and with its network configuration as an embedded string.
fn metadata_seeds() -> Vec<String> {
    let mut seeds = Vec::new();
    for name in FIXTURES {
        let text = fixture(name);
        let value: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        seeds.push(serde_json::to_string_pretty(&value).unwrap());
        if let Some(nc) = value.get("network-config") {
            let mut embedded = value.clone();
            let inner = serde_json::to_string(nc).unwrap();
            embedded["network-config"] = serde_json::Value::String(inner);
            seeds.push(serde_json::to_string(&embedded).unwrap());
        }
        seeds.push(text);
    }
    seeds
}

fn private_seeds() -> Vec<String> {
    let mut seeds = Vec::new();
    for name in PRIVATE_FIXTURES {
        let text = fixture(name);
        let value: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        seeds.push(serde_json::to_string(&value).unwrap());
        seeds.push(text);
    }
    seeds
}

/// One change to a document's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Truncate { at: usize },
    Insert { at: usize, bytes: Vec<u8> },
    DuplicateLine { line: usize },
    DeleteLine { line: usize },
}

/// Text that parsers have tripped over: structure, huge numbers, deep nesting, control and
/// multi-byte characters, injected lines, anchors, tags, invalid UTF-8.
fn nasty() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"\n[Network]\nDNS=192.0.2.66\n".to_vec()),
        Just(b"\\n[Route]\\nGateway=192.0.2.1".to_vec()),
        Just(b"99999999999999999999999999999999".to_vec()),
        Just(b"-1".to_vec()),
        Just(b"1e400".to_vec()),
        Just(b"0x1f".to_vec()),
        Just("[".repeat(200).into_bytes()),
        Just("{a: ".repeat(100).into_bytes()),
        Just("- ".repeat(100).into_bytes()),
        Just(b"&a [*a]".to_vec()),
        Just(b"!!binary aGVsbG8=".to_vec()),
        Just(b"<<: *x".to_vec()),
        Just("€€€€".as_bytes().to_vec()),
        Just("\u{202e}\u{200b}\u{2028}".as_bytes().to_vec()),
        Just(b"\x1b[31m\x00\x07\r".to_vec()),
        Just(b"\xff\xfe\xc3".to_vec()),
        Just(b"\n---\n".to_vec()),
        Just(b": : :".to_vec()),
        Just(b"\t".to_vec()),
        Just(b"eth0:0".to_vec()),
        Just(b"mac_address: 96:00:00:00:00:01".to_vec()),
        Just(
            b"\n  - name: eth0:0\n    type: physical\n    subnets: [{address: '::1/64'}]\n"
                .to_vec()
        ),
        proptest::collection::vec(any::<u8>(), 1..16),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (any::<usize>(), nasty()).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        any::<usize>().prop_map(|line| Mutation::DuplicateLine { line }),
        any::<usize>().prop_map(|line| Mutation::DeleteLine { line }),
    ]
}

fn apply(mut doc: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = doc.len().max(1);
        match m {
            Mutation::Flip { at, bit } => {
                if !doc.is_empty() {
                    doc[at % len] ^= 1 << bit;
                }
            }
            Mutation::Truncate { at } => doc.truncate(at % len),
            Mutation::Insert { at, bytes } => {
                let at = at % (doc.len() + 1);
                doc.splice(at..at, bytes.iter().copied());
            }
            Mutation::DuplicateLine { line } | Mutation::DeleteLine { line } => {
                let mut lines: Vec<Vec<u8>> =
                    doc.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
                let i = line % lines.len();
                if matches!(m, Mutation::DuplicateLine { .. }) {
                    let copy = lines[i].clone();
                    lines.insert(i, copy);
                } else {
                    lines.remove(i);
                }
                doc = lines.join(&b'\n');
            }
        }
        doc.truncate(MAX_INPUT);
    }
    doc
}

/// A document: a mutated seed (most of the time), or arbitrary bytes.
fn document(seeds: Vec<String>) -> impl Strategy<Value = Vec<u8>> {
    let mutated = (
        proptest::sample::select(seeds),
        proptest::collection::vec(mutation(), 1..6),
    )
        .prop_map(|(seed, ms)| apply(seed.into_bytes(), &ms));
    prop_oneof![
        8 => mutated,
        1 => proptest::collection::vec(any::<u8>(), 0..2048),
        1 => "[-a-z0-9:{}\\[\\],'\" \n&*!|>#.]{0,512}".prop_map(String::into_bytes),
    ]
}

/// What a body goes through before the parser: it must be UTF-8 text.
fn as_text(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

fn one_line(text: &str) -> bool {
    !text.chars().any(char::is_control)
}

/// A `.network` file rendered from the metadata keeps its shape: one `[Match]` with a MAC, one
/// `[Network]`, only the sections we write, every line a comment, a section or `Key=value`.
fn assert_file_shape(file: &NetworkFile) {
    let sections: Vec<&str> = file
        .contents
        .lines()
        .filter(|l| l.starts_with('['))
        .collect();
    assert_eq!(sections.iter().filter(|s| **s == "[Match]").count(), 1);
    assert_eq!(sections.iter().filter(|s| **s == "[Network]").count(), 1);
    for s in &sections {
        assert!(
            ["[Match]", "[Link]", "[Network]", "[Route]", "[DHCPv4]"].contains(s),
            "{}",
            file.contents
        );
    }
    for line in file.contents.lines() {
        assert!(one_line(line), "{line:?}");
        assert!(
            line.is_empty()
                || line.starts_with('#')
                || line.starts_with('[')
                || line.split_once('=').is_some_and(|(k, _)| {
                    k.bytes().all(|c| c.is_ascii_alphanumeric()) && !k.is_empty()
                }),
            "{}",
            file.contents
        );
    }
}

fn check_metadata(bytes: &[u8]) {
    let Some(text) = as_text(bytes) else {
        return;
    };
    let started = Instant::now();
    let result = parse_metadata(text);
    assert!(
        started.elapsed() < PER_INPUT,
        "took {:?}",
        started.elapsed()
    );
    match result {
        Err(e) => assert!(
            one_line(&e.to_string()) && e.to_string().len() < 512,
            "{e:?}"
        ),
        Ok(parsed) => {
            assert!(parsed.problems.len() <= MAX_PROBLEMS + 1);
            for p in &parsed.problems {
                assert!(one_line(&p.to_string()), "{p:?}");
            }
            let m = parsed.value;
            if let Some(network) = &m.network {
                assert!(network.interfaces.len() <= 16);
                for file in network::render(network, &[]) {
                    assert_file_shape(&file);
                }
            }
            let keys = sshkeys::render(&m.public_keys);
            for line in keys.lines().filter(|l| !l.starts_with('#')) {
                assert!(SshKey::parse(line).is_ok(), "{line:?}");
            }
            if let Some(h) = &m.hostname {
                assert!(Hostname::parse(h).is_ok());
            }
        }
    }
}

fn check_private(bytes: &[u8]) {
    let Some(text) = as_text(bytes) else {
        return;
    };
    let started = Instant::now();
    let result = parse_private_networks(text);
    assert!(
        started.elapsed() < PER_INPUT,
        "took {:?}",
        started.elapsed()
    );
    match result {
        Err(e) => assert!(one_line(&e.to_string()), "{e:?}"),
        Ok(parsed) => {
            assert!(parsed.value.len() <= MAX_PRIVATE_NICS);
            for p in &parsed.problems {
                assert!(one_line(&p.to_string()), "{p:?}");
            }
            for file in network::render(&NetworkConfig::default(), &parsed.value) {
                assert_file_shape(&file);
            }
        }
    }
}

/// Runs `property` on `cases` inputs of `strategy` (from `PROPTEST_CASES`) and prints the count
/// and time, for the long run's report.
fn run<S: Strategy>(name: &str, strategy: S, property: impl Fn(S::Value)) {
    let count = AtomicUsize::new(0);
    let config = Config {
        failure_persistence: None,
        ..Config::default()
    };
    let started = Instant::now();
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |value| {
        count.fetch_add(1, Ordering::Relaxed);
        property(value);
        Ok(())
    });
    let n = count.load(Ordering::Relaxed);
    eprintln!(
        "{name}: {n} inputs in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

#[test]
fn metadata_documents_under_fire() {
    run("metadata", document(metadata_seeds()), |bytes| {
        check_metadata(&bytes)
    });
}

#[test]
fn private_networks_documents_under_fire() {
    run("private-networks", document(private_seeds()), |bytes| {
        check_private(&bytes)
    });
}

#[test]
fn network_config_documents_under_fire() {
    let seeds: Vec<String> = FIXTURES
        .iter()
        .filter_map(|name| {
            let value: serde_json::Value = serde_saphyr::from_str(&fixture(name)).ok()?;
            Some(serde_json::to_string(value.get("network-config")?).unwrap())
        })
        .collect();
    run("network-config", document(seeds), |bytes| {
        let Some(text) = as_text(&bytes) else {
            return;
        };
        let started = Instant::now();
        let result = parse_network_config_document(text);
        assert!(started.elapsed() < PER_INPUT);
        match result {
            Err(e) => assert!(one_line(&e.to_string())),
            Ok(parsed) => {
                for file in network::render(&parsed.value, &[]) {
                    assert_file_shape(&file);
                }
            }
        }
    });
}

/// MACs: any text, and text near a MAC. A value displays as a MAC that parses to itself.
#[test]
fn macs_under_fire() {
    let near = "[0-9a-fA-F:\\-€é٩ \n]{0,20}";
    let strategy = prop_oneof![any::<String>(), near.prop_map(|s| s)];
    run("mac", strategy, |text| {
        if let Ok(mac) = text.parse::<MacAddr>() {
            let shown = mac.to_string();
            assert_eq!(shown.len(), 17);
            assert_eq!(shown.parse::<MacAddr>(), Ok(mac));
        }
    });
}

/// Addresses with prefix or netmask: a value is within its family's bounds and round-trips.
#[test]
fn ip_prefixes_under_fire() {
    let near = "[0-9a-fA-F:./%]{0,45}";
    let strategy = (
        prop_oneof![any::<String>(), near.prop_map(|s| s)],
        proptest::option::of(prop_oneof![
            any::<String>(),
            "[0-9./:f]{0,40}".prop_map(|s| s)
        ]),
    );
    run("ip-prefix", strategy, |(address, netmask)| {
        if let Ok(p) = IpPrefix::parse(&address, netmask.as_deref()) {
            assert!(p.len <= if p.addr.is_ipv4() { 32 } else { 128 });
            assert_eq!(IpPrefix::parse(&p.to_string(), None), Ok(p));
        }
    });
}

/// Keys: a value is one line without control characters that parses to itself.
#[test]
fn ssh_keys_under_fire() {
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBjYTHGYkNK7DZ4Gn0NGN1sj me@x";
    let strategy = prop_oneof![
        any::<String>(),
        (any::<usize>(), nasty()).prop_map(move |(at, bytes)| {
            String::from_utf8_lossy(&apply(
                key.as_bytes().to_vec(),
                &[Mutation::Insert { at, bytes }],
            ))
            .into_owned()
        }),
    ];
    run("ssh-key", strategy, |text| {
        if let Ok(k) = SshKey::parse(&text) {
            assert!(one_line(&k) && !k.contains('\n'));
            assert_eq!(SshKey::parse(&k), Ok(k.clone()));
        }
    });
}

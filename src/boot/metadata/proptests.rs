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
    Flip {
        at: usize,
        bit: u8,
    },
    Truncate {
        at: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    DuplicateLine {
        line: usize,
    },
    DeleteLine {
        line: usize,
    },
    /// The value of the `line`-th `key: value` (or `- item`) line, replaced by `value` as a
    /// double-quoted string: the document stays YAML, the value is hostile.
    ReplaceValue {
        line: usize,
        value: String,
    },
}

/// Values that have tripped parsers and renderers up, as text.
fn nasty_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("eth0\n[Network]\nDNS=192.0.2.66".to_string()),
        Just("example.com\n[Route]\nGateway=192.0.2.1".to_string()),
        Just("96€€€a".to_string()),
        Just("€€€€".to_string()),
        Just("96:00:03:aa:bb:cc\n".to_string()),
        Just("eth0:0".to_string()),
        Just("fe80::1%eth0".to_string()),
        Just("2a01:4f8::1/64".to_string()),
        Just("2a01:4f8::1/129".to_string()),
        Just("255.255.0.255".to_string()),
        Just("99999999999999999999999999".to_string()),
        Just("-1".to_string()),
        Just("x\u{1b}[2J\u{202e}".to_string()),
        Just("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBjYTHGY k\r\n".to_string()),
        Just("command=\"sh\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBjYTHGY".to_string()),
        Just(String::new()),
        Just("a".repeat(300)),
        any::<String>(),
        "[0-9a-f:./%-]{0,40}",
    ]
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
        1 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        1 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        2 => (any::<usize>(), nasty()).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        2 => any::<usize>().prop_map(|line| Mutation::DuplicateLine { line }),
        1 => any::<usize>().prop_map(|line| Mutation::DeleteLine { line }),
        6 => (any::<usize>(), nasty_value())
            .prop_map(|(line, value)| Mutation::ReplaceValue { line, value }),
    ]
}

/// Replaces the value of the `line`-th line that has one (after `: ` or `- `), if any.
fn replace_value(doc: Vec<u8>, line: usize, value: &str) -> Vec<u8> {
    let Ok(text) = String::from_utf8(doc.clone()) else {
        return doc;
    };
    let mut lines: Vec<String> = text.split('\n').map(str::to_string).collect();
    let candidates: Vec<(usize, usize)> = lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let at = l.find(": ").map(|p| p + 2).or_else(|| {
                let trimmed = l.trim_start();
                trimmed
                    .starts_with("- ")
                    .then(|| l.len() - trimmed.len() + 2)
            })?;
            Some((i, at))
        })
        .collect();
    if candidates.is_empty() {
        return doc;
    }
    let (i, at) = candidates[line % candidates.len()];
    let quoted = serde_json::to_string(value).unwrap();
    // Keep a JSON document's trailing comma.
    let comma = if lines[i].trim_end().ends_with(',') {
        ","
    } else {
        ""
    };
    lines[i] = format!("{}{quoted}{comma}", &lines[i][..at]);
    lines.join("\n").into_bytes()
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
            Mutation::ReplaceValue { line, value } => doc = replace_value(doc, *line, value),
        }
        doc.truncate(MAX_INPUT);
    }
    doc
}

/// A document: a mutated seed (most of the time), or arbitrary bytes.
fn document(seeds: Vec<String>) -> impl Strategy<Value = Vec<u8>> {
    let mutated = (
        proptest::sample::select(seeds),
        proptest::collection::vec(mutation(), 1..4),
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

/// How an input ended, for the run's summary.
type Outcome = &'static str;

fn check_metadata(bytes: &[u8]) -> Outcome {
    let Some(text) = as_text(bytes) else {
        return "not UTF-8";
    };
    let started = Instant::now();
    let result = parse_metadata(text);
    assert!(
        started.elapsed() < PER_INPUT,
        "took {:?}",
        started.elapsed()
    );
    match result {
        Err(e) => {
            assert!(
                one_line(&e.to_string()) && e.to_string().len() < 512,
                "{e:?}"
            );
            "error"
        }
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
            match (&m.network, parsed.problems.is_empty()) {
                (Some(n), true) if !n.interfaces.is_empty() => "value with NICs",
                (_, true) => "value",
                (_, false) => "value with problems",
            }
        }
    }
}

fn check_private(bytes: &[u8]) -> Outcome {
    let Some(text) = as_text(bytes) else {
        return "not UTF-8";
    };
    let started = Instant::now();
    let result = parse_private_networks(text);
    assert!(
        started.elapsed() < PER_INPUT,
        "took {:?}",
        started.elapsed()
    );
    match result {
        Err(e) => {
            assert!(one_line(&e.to_string()), "{e:?}");
            "error"
        }
        Ok(parsed) => {
            assert!(parsed.value.len() <= MAX_PRIVATE_NICS);
            for p in &parsed.problems {
                assert!(one_line(&p.to_string()), "{p:?}");
            }
            for file in network::render(&NetworkConfig::default(), &parsed.value) {
                assert_file_shape(&file);
            }
            if parsed.problems.is_empty() {
                "value"
            } else {
                "value with problems"
            }
        }
    }
}

/// Runs `property` on `cases` inputs of `strategy` (from `PROPTEST_CASES`) and prints the count,
/// the time and how the inputs ended, for the long run's report.
fn run<S: Strategy>(name: &str, strategy: S, property: impl Fn(S::Value) -> Outcome) {
    let outcomes = std::sync::Mutex::new(std::collections::BTreeMap::<Outcome, usize>::new());
    let config = Config {
        failure_persistence: None,
        ..Config::default()
    };
    let started = Instant::now();
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |value| {
        let outcome = property(value);
        *outcomes.lock().unwrap().entry(outcome).or_default() += 1;
        Ok(())
    });
    let outcomes = outcomes.into_inner().unwrap();
    eprintln!(
        "{name}: {} inputs in {:.1} s: {outcomes:?}",
        outcomes.values().sum::<usize>(),
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
            return "not UTF-8";
        };
        let started = Instant::now();
        let result = parse_network_config_document(text);
        assert!(started.elapsed() < PER_INPUT);
        match result {
            Err(e) => {
                assert!(one_line(&e.to_string()));
                "error"
            }
            Ok(parsed) => {
                for file in network::render(&parsed.value, &[]) {
                    assert_file_shape(&file);
                }
                if parsed.value.interfaces.is_empty() {
                    "value without NICs"
                } else {
                    "value with NICs"
                }
            }
        }
    });
}

/// MACs: any text, and text near a MAC. A value displays as a MAC that parses to itself.
#[test]
fn macs_under_fire() {
    let near = "[0-9a-fA-F:\\-€é٩ \n]{0,20}";
    let formed = (
        any::<[u8; 6]>(),
        proptest::sample::select(vec![":", "-", ""]),
        any::<bool>(),
    )
        .prop_map(|(bytes, sep, upper)| {
            let parts: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let text = parts.join(sep);
            if upper { text.to_uppercase() } else { text }
        });
    let spoiled = (formed.clone(), any::<usize>(), nasty()).prop_map(|(mac, at, bytes)| {
        let spoiled = apply(mac.into_bytes(), &[Mutation::Insert { at, bytes }]);
        String::from_utf8_lossy(&spoiled).into_owned()
    });
    let strategy = prop_oneof![any::<String>(), near.prop_map(|s| s), formed, spoiled];
    run("mac", strategy, |text| match text.parse::<MacAddr>() {
        Ok(mac) => {
            let shown = mac.to_string();
            assert_eq!(shown.len(), 17);
            assert_eq!(shown.parse::<MacAddr>(), Ok(mac));
            "MAC"
        }
        Err(_) => "error",
    });
}

/// Addresses with prefix or netmask: a value is within its family's bounds and round-trips.
#[test]
fn ip_prefixes_under_fire() {
    let near = "[0-9a-fA-F:./%]{0,45}";
    let formed =
        (any::<std::net::IpAddr>(), 0u8..140, any::<bool>()).prop_map(|(addr, len, with_len)| {
            if with_len {
                format!("{addr}/{len}")
            } else {
                addr.to_string()
            }
        });
    let strategy = (
        prop_oneof![any::<String>(), near.prop_map(|s| s), formed],
        proptest::option::of(prop_oneof![
            any::<String>(),
            "[0-9./:f]{0,40}".prop_map(|s| s),
            (0u8..140).prop_map(|l| l.to_string()),
            any::<std::net::IpAddr>().prop_map(|a| a.to_string()),
        ]),
    );
    run(
        "ip-prefix",
        strategy,
        |(address, netmask)| match IpPrefix::parse(&address, netmask.as_deref()) {
            Ok(p) => {
                assert!(p.len <= if p.addr.is_ipv4() { 32 } else { 128 });
                assert_eq!(IpPrefix::parse(&p.to_string(), None), Ok(p));
                "prefix"
            }
            Err(e) => {
                assert!(one_line(&e));
                "error"
            }
        },
    );
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
    run("ssh-key", strategy, |text| match SshKey::parse(&text) {
        Ok(k) => {
            assert!(one_line(&k) && !k.contains('\n'));
            assert_eq!(SshKey::parse(&k), Ok(k.clone()));
            "key"
        }
        Err(_) => "error",
    });
}

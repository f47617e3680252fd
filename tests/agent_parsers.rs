//! Parsers under fire: every parser of outside input the agent has (user-data in all its
//! encodings, FlakeHub references, FlakeHub's JSON answers, the configuration as TOML and as
//! JSON) fed arbitrary and mutated inputs, starting from the fixtures and real documents: byte
//! flips, truncations, insertions (control characters, bytes that are not UTF-8, huge numbers,
//! YAML anchors), duplicated lines and keys, deep nesting, gzip bombs. Each input must give a value
//! or errors of one line each, within a second, and nothing secret in a message.
//!
//! A few hundred inputs per parser by default (proptest's 256, `PROPTEST_CASES` to change it);
//! the long run: `PROPTEST_CASES=200000 cargo test --release --test agent_parsers -- --nocapture`
//! prints how many inputs each parser took and how long.

use std::io::Write as _;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use hcloud_nixos::agent::{config, flakehub, flakeref::FlakeRef, userdata};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// The longest any one input may take.
const PER_INPUT: Duration = Duration::from_secs(1);
/// The token in the seeds; no message may show its secret part.
const TOKEN: &str = "flakehub1_s3cr3tT0kenValue_0123456789abcdef";
const TOKEN_SECRET: &str = "s3cr3tT0kenValue_0123456789abcdef";

// ---------------------------------------------------------------------------------------------
// Mutations

/// Pieces worth inserting: what breaks lines, escapes, numbers, nesting and encodings.
const INTERESTING: &[&[u8]] = &[
    b"\n",
    b"\r\n",
    b"\r",
    b"\0",
    b"\x1b[31m",
    b"\x07",
    b"\xff",
    b"\xc3",
    b"\xe2\x80\xa8",
    b"\xef\xbb\xbf",
    b"\"",
    b"'",
    b"\\",
    b"\\u0000",
    b"\\n",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b": ",
    b"- ",
    b"#",
    b"=",
    b",",
    b"&a ",
    b"*a",
    b"<<: *a",
    b"!!binary ",
    b"!!int ",
    b"? ",
    b"|\n",
    b">-\n",
    b"---\n",
    b"...\n",
    b"99999999999999999999999999999999",
    b"-1",
    b"-9223372036854775809",
    b"18446744073709551616",
    b"1e999",
    b"0x7fffffffffffffff",
    b"nan",
    b"300000000000y",
    b"1h 1h 1h 1h",
    b"\t",
    b"%",
    b"flakehub1_",
    b"hcloud_nixos:",
    b"#cloud-config\n",
    b"Content-Type: multipart/mixed; boundary=B\n",
    b"MIME-Version: 1.0\n",
    b"--B\n",
    b"Content-Transfer-Encoding: base64\n",
    b"\x1f\x8b",
    b"H4sI",
    b"/nix/store/",
    b"..",
    b"/../",
];

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    DuplicateLine(usize),
    Remove(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let piece = prop_oneof![
        3 => select(INTERESTING).prop_map(|s| s.to_vec()),
        1 => proptest::collection::vec(any::<u8>(), 0..24),
    ];
    prop_oneof![
        1 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        3 => (any::<usize>(), piece).prop_map(|(i, p)| Mutation::Insert(i, p)),
        2 => any::<usize>().prop_map(Mutation::DuplicateLine),
        1 => (any::<usize>(), 0usize..64).prop_map(|(i, n)| Mutation::Remove(i, n)),
    ]
}

fn apply(seed: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut doc = seed.to_vec();
    for m in mutations {
        let at = |i: usize| i % (doc.len() + 1);
        match m {
            Mutation::Flip(i, b) if !doc.is_empty() => {
                let i = i % doc.len();
                doc[i] ^= b | 1;
            }
            Mutation::Flip(..) => {}
            Mutation::Truncate(i) => doc.truncate(at(*i)),
            Mutation::Insert(i, piece) => {
                let i = at(*i);
                doc.splice(i..i, piece.iter().copied());
            }
            Mutation::DuplicateLine(i) => {
                // A line (a key) twice, right after itself.
                let lines: Vec<&[u8]> = doc.split_inclusive(|b| *b == b'\n').collect();
                if !lines.is_empty() {
                    let n = i % lines.len();
                    let mut out = Vec::with_capacity(doc.len() * 2);
                    for (k, line) in lines.iter().enumerate() {
                        out.extend_from_slice(line);
                        if k == n {
                            out.extend_from_slice(line);
                        }
                    }
                    doc = out;
                }
            }
            Mutation::Remove(i, n) => {
                let i = at(*i);
                let end = (i + n).min(doc.len());
                doc.drain(i..end);
            }
        }
    }
    doc
}

/// A seed under 0 to 8 mutations.
fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (select(seeds), proptest::collection::vec(mutation(), 0..8))
        .prop_map(|(seed, ms)| apply(&seed, &ms))
}

/// A seed behind `depth` openings of one kind (`[`, `{"a":`, `a:` indented, `- `).
fn nested(
    seeds: Vec<Vec<u8>>,
    openings: &'static [&'static str],
) -> impl Strategy<Value = Vec<u8>> {
    let depth = prop_oneof![9 => 1usize..3000, 1 => 3000usize..100_000];
    (select(seeds), select(openings), depth).prop_map(|(seed, open, depth)| {
        let mut doc = Vec::new();
        for level in 0..depth {
            if open.ends_with('\n') {
                doc.extend(std::iter::repeat_n(b' ', level.min(200)));
            }
            doc.extend_from_slice(open.as_bytes());
        }
        doc.extend_from_slice(&seed);
        doc
    })
}

// ---------------------------------------------------------------------------------------------
// What every answer must be

/// One clear line: not empty, no control character, not endless.
fn one_line(what: &str, text: &str) -> Result<(), TestCaseError> {
    prop_assert!(!text.trim().is_empty(), "{what}: an empty message");
    prop_assert!(
        !text.chars().any(char::is_control),
        "{what}: a control character in {text:?}"
    );
    prop_assert!(
        text.chars().count() <= 2000,
        "{what}: a message of {} characters",
        text.chars().count()
    );
    prop_assert!(
        !text.contains(TOKEN_SECRET),
        "{what}: the token in {text:?}"
    );
    Ok(())
}

fn quick(what: &str, started: Instant) -> Result<(), TestCaseError> {
    let took = started.elapsed();
    prop_assert!(took < PER_INPUT, "{what}: took {took:?}");
    Ok(())
}

/// Runs `check` on `strategy`'s inputs (proptest's count, `PROPTEST_CASES`) and says how many
/// and how long.
fn fire<S: Strategy>(name: &str, strategy: S, check: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let config = Config {
        failure_persistence: None,
        ..Config::default()
    };
    let cases = config.cases;
    let mut runner = TestRunner::new(config);
    let started = Instant::now();
    if let Err(e) = runner.run(&strategy, check) {
        panic!("{name}: {e}");
    }
    eprintln!(
        "parsers under fire: {name}: {cases} inputs in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// User-data

fn fixture(rel: &str) -> Vec<u8> {
    std::fs::read(harness::fixture(rel)).unwrap_or_else(|e| panic!("fixture {rel}: {e}"))
}

fn userdata_seeds() -> Vec<Vec<u8>> {
    let full = format!(
        "#cloud-config\npackages: [htop]\nhcloud_nixos:\n  flakehub_token: {TOKEN}\n  \
         flake: my-org/infra/0.1#nixosConfigurations.web\n  poll_interval: 5m\n  \
         operation: switch\n  confirm_timeout: 120s\n  min_release_age: 2h\n  reboot: window\n  \
         fleet:\n    group: web\n    slots: 2\n    backend: etcd\n    etcd:\n      \
         endpoints: [\"https://10.0.0.5:2379\"]\n      lease_ttl: 30s\n"
    );
    let anchors =
        "#cloud-config\nbase: &b\n  flake: a/b/0.1\nhcloud_nixos:\n  <<: *b\n  poll_interval: 1m\n";
    let flow =
        format!("{{\"hcloud_nixos\": {{\"flake\": \"a/b/*\", \"flakehub_token\": \"{TOKEN}\"}}}}");
    vec![
        fixture("hetzner-metadata/userdata.cloud-config-example.yaml"),
        full.clone().into_bytes(),
        anchors.as_bytes().to_vec(),
        flow.into_bytes(),
        mime(full.as_bytes(), false),
        mime(full.as_bytes(), true),
        b"#!/bin/sh\necho hello\n".to_vec(),
        b"#include\nhttps://example.com/x\n".to_vec(),
        Vec::new(),
    ]
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn base64(data: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .encode(data)
        .into_bytes()
}

/// A MIME archive as Terraform's cloudinit_config renders it, with `doc` as its cloud-config
/// part (7bit or base64) beside a shell script.
fn mime(doc: &[u8], part_in_base64: bool) -> Vec<u8> {
    let (encoding, body) = if part_in_base64 {
        ("base64", base64(doc))
    } else {
        ("7bit", doc.to_vec())
    };
    let mut out =
        b"Content-Type: multipart/mixed; boundary=\"MIMEBOUNDARY\"\nMIME-Version: 1.0\n\n\
        --MIMEBOUNDARY\nContent-Transfer-Encoding: 7bit\nContent-Type: text/x-shellscript\n\n\
        #!/bin/sh\necho hello\n\n--MIMEBOUNDARY\n"
            .to_vec();
    out.extend_from_slice(
        format!("Content-Transfer-Encoding: {encoding}\nContent-Type: text/cloud-config\n\n")
            .as_bytes(),
    );
    out.extend_from_slice(&body);
    out.extend_from_slice(b"\n--MIMEBOUNDARY--\n");
    out
}

#[derive(Debug, Clone, Copy)]
enum Encoding {
    Plain,
    Base64,
    Gzip,
    Base64Gzip,
    Mime7bit,
    MimeBase64,
    MimeBase64Gzip,
}

fn encode(doc: &[u8], encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Plain => doc.to_vec(),
        Encoding::Base64 => base64(doc),
        Encoding::Gzip => gzip(doc),
        Encoding::Base64Gzip => base64(&gzip(doc)),
        Encoding::Mime7bit => mime(doc, false),
        Encoding::MimeBase64 => mime(doc, true),
        Encoding::MimeBase64Gzip => base64(&gzip(&mime(doc, true))),
    }
}

/// Gzip bombs (a few MiB of text that compresses to kilobytes), made once.
static BOMBS: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| {
    let mut lines = b"#cloud-config\nhcloud_nixos:\n  flake: a/b/0.1\n".to_vec();
    lines.extend(std::iter::repeat_n(b"# padding padding padding\n".as_slice(), 160_000).flatten());
    // Nesting as deep as the decoded size allows.
    let mut deep = b"#cloud-config\nhcloud_nixos: ".to_vec();
    deep.extend(std::iter::repeat_n(b'[', 1000 * 1000));
    let mut deep_map = b"#cloud-config\nhcloud_nixos: ".to_vec();
    deep_map.extend(std::iter::repeat_n(b"{a: ".as_slice(), 250 * 1000).flatten());
    vec![
        gzip(&deep),
        base64(&gzip(&deep_map)),
        gzip(&vec![b'a'; 4 << 20]),
        gzip(&lines),
        base64(&gzip(&lines)),
        base64(&gzip(&gzip(&lines))),
        mime(&base64(&gzip(&lines)), false),
    ]
});

fn userdata_input() -> impl Strategy<Value = Vec<u8>> {
    let encodings = [
        Encoding::Plain,
        Encoding::Base64,
        Encoding::Gzip,
        Encoding::Base64Gzip,
        Encoding::Mime7bit,
        Encoding::MimeBase64,
        Encoding::MimeBase64Gzip,
    ];
    let encoded = (
        mutated(userdata_seeds()),
        select(encodings.to_vec()),
        proptest::collection::vec(mutation(), 0..3),
    )
        .prop_map(|(doc, encoding, after)| apply(&encode(&doc, encoding), &after));
    prop_oneof![
        8 => encoded,
        2 => nested(userdata_seeds(), &["[", "{\"a\": ", "a:\n", "- "]),
        1 => (select(BOMBS.clone()), proptest::collection::vec(mutation(), 0..2))
            .prop_map(|(bomb, ms)| apply(&bomb, &ms)),
        1 => proptest::collection::vec(any::<u8>(), 0..2048),
        // Just over the size limit.
        1 => (32 * 1024usize..33 * 1024).prop_map(|n| vec![b'#'; n]),
    ]
}

fn check_userdata(input: Vec<u8>) -> Result<(), TestCaseError> {
    let started = Instant::now();
    let data = userdata::parse(&input);
    quick("user-data", started)?;
    let lines = data
        .problems
        .iter()
        .chain(&data.other_keys)
        .chain(&data.other_parts);
    for line in lines {
        one_line("user-data", line)?;
    }
    prop_assert!(data.problems.len() + data.other_keys.len() <= input.len() + 1);
    // What it says is what `userdata check` prints: no token there either.
    let described = userdata::describe(&data);
    prop_assert!(!described.contains(TOKEN_SECRET), "{described}");
    if let Some(settings) = &data.settings
        && let Some(flake) = &settings.flake
    {
        prop_assert!(
            flake.parse::<FlakeRef>().is_ok(),
            "an invalid flake kept: {flake:?}"
        );
    }
    Ok(())
}

#[test]
fn user_data_in_every_encoding() {
    fire("user-data", userdata_input(), check_userdata);
}

// ---------------------------------------------------------------------------------------------
// Flake references

fn reference_seeds() -> Vec<Vec<u8>> {
    [
        "my-org/infra/0.1#nixosConfigurations.web",
        "https://flakehub.com/f/DeterminateSystems/fh/*",
        "a/b/=0.1.42+rev-0123456789abcdef0123456789abcdef01234567",
        "a/b/>=1.2, <2",
        "a/b/~1.0#packages.x86_64-linux.default",
        "a/b/^1#a.b'",
        "My_Org.x/nix-pkgs_2.0/0.1.*",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn reference_input() -> impl Strategy<Value = (String, String)> {
    let text = prop_oneof![
        6 => mutated(reference_seeds()).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        2 => "[a-zA-Z0-9./#*=~^<>+, :_'$;-]{0,300}",
        1 => any::<String>(),
    ];
    let hostname = prop_oneof!["[a-z0-9-]{1,20}(\\.[a-z0-9-]{1,10}){0,3}", any::<String>(),];
    (text, hostname)
}

fn check_reference((text, hostname): (String, String)) -> Result<(), TestCaseError> {
    let started = Instant::now();
    let parsed = text.parse::<FlakeRef>();
    quick("flake reference", started)?;
    match parsed {
        Err(e) => one_line("flake reference", &e)?,
        Ok(r) => {
            prop_assert!(text.len() <= 256);
            // Its canonical form reads back as itself.
            let again: FlakeRef = r.to_string().parse().map_err(TestCaseError::fail)?;
            prop_assert_eq!(&again, &r);
            match r.attr_or_default(&hostname) {
                Err(e) => one_line("default attribute", &e)?,
                Ok(attr) => {
                    let exact = r.exact("0.1.0", &attr);
                    prop_assert!(
                        !exact.chars().any(|c| c.is_whitespace() || c.is_control()),
                        "{exact:?}"
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn flake_references() {
    fire("flake references", reference_input(), check_reference);
}

// ---------------------------------------------------------------------------------------------
// FlakeHub's answers

fn flakehub_seeds() -> Vec<Vec<u8>> {
    let release = fixture("flakehub/version.example.json");
    let store = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-web-25.11";
    let list = format!(
        "[{}, {{\"version\": \"0.1.2+rev-b\", \"yanked_at\": \"2026-01-01T00:00:00Z\", \"published_at\": null}}]",
        String::from_utf8_lossy(&release)
    );
    vec![
        release,
        list.into_bytes(),
        format!("{{\"attribute_path\": \"nixosConfigurations.web\", \"store_path\": \"{store}\"}}")
            .into_bytes(),
        format!("{{\"store_path\": \"{store}\", \"token\": \"flakehub_scoped_abc\"}}").into_bytes(),
        b"{\"version\": \"0.1.42+rev-abc\", \"published_at\": \"2023-09-19T14:21:04.163308Z\"}"
            .to_vec(),
        fixture("flakehub/webhook-release.example.json"),
    ]
}

fn flakehub_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => mutated(flakehub_seeds()),
        2 => nested(flakehub_seeds(), &["[", "{\"version\": "]),
        1 => proptest::collection::vec(any::<u8>(), 0..1024),
    ]
}

fn check_flakehub(input: Vec<u8>) -> Result<(), TestCaseError> {
    let started = Instant::now();
    let release = flakehub::parse_release(&input);
    let releases = flakehub::parse_releases(&input);
    let output = flakehub::parse_output(&input);
    quick("FlakeHub answers", started)?;
    match release {
        Ok(r) => prop_assert!(flakehub::check_version(&r.version).is_ok()),
        Err(e) => one_line("release", &e)?,
    }
    match releases {
        Ok(all) => {
            for r in all {
                prop_assert!(flakehub::check_version(&r.version).is_ok());
            }
        }
        Err(e) => one_line("releases", &e)?,
    }
    match output {
        Ok(Some(path)) => prop_assert!(flakehub::check_store_path(&path).is_ok()),
        Ok(None) => {}
        Err(e) => one_line("output", &e)?,
    }
    Ok(())
}

#[test]
fn flakehub_answers() {
    fire("FlakeHub answers", flakehub_input(), check_flakehub);
}

// ---------------------------------------------------------------------------------------------
// The configuration, as TOML and as JSON

const TOML_SEED: &str = r#"flake = "my-org/infra/0.1#nixosConfigurations.web"
operation = "switch"
poll_interval = "60s"
max_backoff = "10m"
retry_limit = 3
confirm_timeout = "2m"
min_release_age = "0s"
reboot = "window"
reboot_grace = "1m"
reboot_inhibitor_timeout = "10m"

[flakehub]
api_url = "https://api.flakehub.com"
token_file = "/run/secrets/flakehub"

[metadata]
url = "http://169.254.169.254/hetzner/v1/"

[apply]
mode = "transient-unit"
timeout = "1h"
require_agent = true

[reboot_window]
days = ["Sat", "Sun"]
start = "02:00"
length = "2h"
time_zone = "Europe/Berlin"

[[health_check]]
command = ["/run/current-system/sw/bin/true"]
timeout = "10s"

[[health_check]]
url = "http://127.0.0.1:8080/healthz"

[[hook]]
command = ["/run/current-system/sw/bin/logger", "-t", "deploy"]
timeout = "30s"

[metrics]
listen = "127.0.0.1:9945"
textfile = "/var/lib/node-exporter/hcloud-nixos.prom"

[fleet]
group = "web"
slots = 2
backend = "etcd"
canary = false
pause_on_failure = true

[fleet.etcd]
endpoints = ["https://10.0.0.5:2379"]
prefix = "/hcloud-nixos"
lease_ttl = "30s"
reboot_ttl = "15m"

[paths]
state_dir = "/var/lib/hcloud-nixos"
run_dir = "/run/hcloud-nixos"
fh = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-fh/bin/fh"
"#;

fn json_seed() -> String {
    let file: toml::Value = toml::from_str(TOML_SEED).unwrap();
    serde_json::to_string_pretty(&file).unwrap()
}

fn config_seeds() -> Vec<Vec<u8>> {
    vec![
        TOML_SEED.as_bytes().to_vec(),
        format!("flakehub_token = \"{TOKEN}\"\n{TOML_SEED}").into_bytes(),
        json_seed().into_bytes(),
        b"[fleet]\nbackend = \"fleetlock\"\n[fleet.fleetlock]\nurl = \"http://user:pass@lock:8080\"\n"
            .to_vec(),
        Vec::new(),
    ]
}

fn config_input() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => mutated(config_seeds()),
        2 => nested(config_seeds(), &["a = [", "[a]\nb = {c = ", "{\"a\": ", "["]),
        1 => proptest::collection::vec(any::<u8>(), 0..1024),
    ]
    .prop_map(|b| String::from_utf8_lossy(&b).into_owned())
}

fn check_settings(
    what: &str,
    parsed: Result<config::FileConfig, String>,
) -> Result<(), TestCaseError> {
    match parsed {
        Err(e) => one_line(what, &e),
        Ok(file) => match config::check(&file) {
            Ok(_) => Ok(()),
            Err(problems) => {
                prop_assert!(!problems.is_empty());
                for p in &problems {
                    one_line(what, p)?;
                }
                Ok(())
            }
        },
    }
}

fn check_config(text: String) -> Result<(), TestCaseError> {
    let started = Instant::now();
    let toml = config::parse_file(&text);
    let json = config::parse_json(&text);
    quick("configuration (parse)", started)?;
    check_settings("configuration as TOML", toml)?;
    check_settings("configuration as JSON", json)?;
    quick("configuration", started)
}

#[test]
fn the_configuration_as_toml_and_json() {
    fire(
        "configuration (TOML and JSON)",
        config_input(),
        check_config,
    );
}

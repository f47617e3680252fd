//! Parsers under fire: the uploader's readers of outside input (Cloud API answers, the hcloud CLI's `cli.toml`, `qemu-img info`, the rescue system's reports, labels) fed arbitrary and mutated inputs.
//!
//! Each property asserts: no panic, each input read within a second, and a value or one error
//! of one line. Inputs start from the recorded payloads in `tests/fixtures/` and are mutated
//! (bits flipped, cut, bytes and tokens inserted, slices duplicated, nested deep, non-UTF-8).
//! A short run by default; `PROPTEST_CASES=200000 cargo test --release --lib upload::under_fire`
//! is the long one.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::Value;

use super::api::{self, Action, Exchange, Image, Server, SshKey};
use super::{cleanup, labels, leftovers, qemu, remote, token};

macro_rules! fixture {
    ($path:literal) => {
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/",
            $path
        ))
        .as_slice()
    };
}

/// Longest an input may take.
const BOUND: Duration = Duration::from_secs(1);

/// The number of cases from `PROPTEST_CASES` (256 unless set); failures are not written to
/// files in the source tree.
fn config() -> Config {
    Config {
        failure_persistence: None,
        ..Config::default()
    }
}

/// Things worth inserting into a document: huge and negative numbers, other types, escapes,
/// control characters, bidirectional overrides, invalid UTF-8, and pieces of the formats.
const TOKENS: &[&[u8]] = &[
    b"18446744073709551616",
    b"-1",
    b"1e999",
    b"-0.0",
    b"null",
    b"true",
    b"[]",
    b"{}",
    b"\"\"",
    b"\"\\u0000\"",
    b"\"\\ud800\"",
    b"\x00",
    b"\x1b[2J",
    b"\n",
    b"\r\n",
    "\u{202e}".as_bytes(),
    b"\xff\xfe",
    b"\xc3",
    b",",
    b":",
    b"\"",
    b"'",
    b"[[",
    b"]]",
    b"\"id\":",
    b"\"status\":\"error\",",
    b"\"backing-filename\":\"/etc/shadow\",",
    b"\"next_page\":",
    b"\n[[contexts]]\nname = \"work\"\n",
    b"active_context = ",
    b"token = ",
    b"\"\"\"",
    b"=",
];

/// One change to a document; positions are taken modulo its length.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Cut { at: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Token { at: usize, which: usize },
    Duplicate { from: usize, len: usize, to: usize },
    Remove { from: usize, len: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        any::<usize>().prop_map(|at| Mutation::Cut { at }),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(at, which)| Mutation::Token { at, which }),
        (any::<usize>(), 1usize..200, any::<usize>())
            .prop_map(|(from, len, to)| Mutation::Duplicate { from, len, to }),
        (any::<usize>(), 1usize..50).prop_map(|(from, len)| Mutation::Remove { from, len }),
    ]
}

fn apply(mut doc: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        let n = doc.len().max(1);
        match m {
            Mutation::Flip { at, bit } => {
                if let Some(b) = doc.get_mut(at % n) {
                    *b ^= 1 << bit;
                }
            }
            Mutation::Cut { at } => doc.truncate(at % n),
            Mutation::Insert { at, bytes } => {
                let at = (at % n).min(doc.len());
                doc.splice(at..at, bytes.iter().copied());
            }
            Mutation::Token { at, which } => {
                let at = (at % n).min(doc.len());
                doc.splice(at..at, TOKENS[*which].iter().copied());
            }
            Mutation::Duplicate { from, len, to } => {
                let from = (from % n).min(doc.len());
                let end = (from + len).min(doc.len());
                let piece = doc[from..end].to_vec();
                let to = (to % n).min(doc.len());
                doc.splice(to..to, piece);
            }
            Mutation::Remove { from, len } => {
                let from = (from % n).min(doc.len());
                let end = (from + len).min(doc.len());
                doc.drain(from..end);
            }
        }
    }
    doc
}

/// A seed wrapped `depth` times in arrays or objects (serde_json stops at 128 levels).
fn nest(doc: &[u8], depth: usize, object: bool) -> Vec<u8> {
    let (open, close): (&[u8], &[u8]) = if object {
        (b"{\"a\":", b"}")
    } else {
        (b"[", b"]")
    };
    let mut out = open.repeat(depth);
    out.extend_from_slice(doc);
    out.extend(close.repeat(depth));
    out
}

/// Keys a structural change may add: what the readers look for.
const KEYS: &[&str] = &[
    "id",
    "status",
    "command",
    "error",
    "code",
    "message",
    "labels",
    "server",
    "servers",
    "action",
    "actions",
    "image",
    "images",
    "ssh_key",
    "meta",
    "pagination",
    "next_page",
    "public_net",
    "ipv4",
    "ip",
    "format",
    "virtual-size",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "format-specific",
    "data",
    "data-file",
    "encrypted",
    "encrypt",
    "children",
    "name",
];

/// A leaf a structural change may put somewhere.
fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,20}".prop_map(Value::from),
        Just(serde_json::json!([])),
        Just(serde_json::json!({})),
        Just(serde_json::json!(["file"])),
    ]
}

/// A change to a document's structure: on its `node`-th object, remove its `key`-th key, or set
/// a known key to a leaf, or move a value under another key.
#[derive(Debug, Clone)]
enum Change {
    Remove {
        node: usize,
        key: usize,
    },
    Set {
        node: usize,
        key: usize,
        value: Value,
    },
    Rename {
        node: usize,
        key: usize,
        to: usize,
    },
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (any::<usize>(), any::<usize>()).prop_map(|(node, key)| Change::Remove { node, key }),
        (any::<usize>(), 0..KEYS.len(), leaf()).prop_map(|(node, key, value)| Change::Set {
            node,
            key,
            value
        }),
        (any::<usize>(), any::<usize>(), 0..KEYS.len())
            .prop_map(|(node, key, to)| Change::Rename { node, key, to }),
    ]
}

/// JSON pointers to every object in a document.
fn objects(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            out.push(at.clone());
            for (k, x) in m {
                let k = k.replace('~', "~0").replace('/', "~1");
                objects(x, format!("{at}/{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                objects(x, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

fn restructure(mut doc: Value, changes: &[Change]) -> Vec<u8> {
    for c in changes {
        let mut nodes = Vec::new();
        objects(&doc, String::new(), &mut nodes);
        let (Change::Remove { node, .. } | Change::Set { node, .. } | Change::Rename { node, .. }) =
            c;
        let Some(ptr) = nodes.get(node % nodes.len().max(1)) else {
            break;
        };
        let Some(Value::Object(m)) = doc.pointer_mut(ptr) else {
            continue;
        };
        let keys: Vec<String> = m.keys().cloned().collect();
        let nth = |k: usize| keys.get(k % keys.len().max(1)).cloned();
        match c {
            Change::Remove { key, .. } => {
                if let Some(k) = nth(*key) {
                    m.remove(&k);
                }
            }
            Change::Set { key, value, .. } => {
                m.insert(KEYS[*key].to_string(), value.clone());
            }
            Change::Rename { key, to, .. } => {
                if let Some(k) = nth(*key)
                    && let Some(v) = m.remove(&k)
                {
                    m.insert(KEYS[*to].to_string(), v);
                }
            }
        }
    }
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// Inputs from `seeds`: mutated bytes (most), changed structure (of seeds that are JSON), nested
/// deep, or arbitrary bytes.
fn inputs(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    let json: Vec<Value> = seeds
        .iter()
        .filter_map(|s| serde_json::from_slice(s).ok())
        .collect();
    let m = json.len().max(1);
    let s1 = seeds.clone();
    let s2 = seeds;
    prop_oneof![
        6 => (0..n, proptest::collection::vec(mutation(), 0..6))
            .prop_map(move |(i, ms)| apply(s1[i].clone(), &ms)),
        3 => (0..m, proptest::collection::vec(change(), 1..5))
            .prop_map(move |(i, cs)| restructure(json.get(i).cloned().unwrap_or(Value::Null), &cs)),
        1 => (0..n, 1usize..3000, any::<bool>()).prop_map(move |(i, d, o)| nest(&s2[i], d, o)),
        1 => proptest::collection::vec(any::<u8>(), 0..512),
    ]
}

/// An error message fit for a terminal: one line, of bounded length.
fn one_line(e: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        !e.contains('\n') && !e.contains('\r'),
        "not one line: {e:?}"
    );
    prop_assert!(!e.contains('\x1b'), "an escape sequence: {e:?}");
    prop_assert!(
        e.chars().count() < 2000,
        "too long: {} characters",
        e.chars().count()
    );
    Ok(())
}

fn timed<T>(f: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    let start = Instant::now();
    let v = f();
    prop_assert!(start.elapsed() < BOUND, "took {:?}", start.elapsed());
    Ok(v)
}

/// The recorded Cloud API answers, and list answers built from them.
fn api_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = [
        fixture!("hcloud-api/create_image.response201.example.json"),
        fixture!("hcloud-api/create_server.response201.example.json"),
        fixture!("hcloud-api/enable_rescue.response201.example.json"),
        fixture!("hcloud-api/error.deprecated_api_endpoint.example.json"),
        fixture!("hcloud-api/error.invalid_input.example.json"),
        fixture!("hcloud-api/error.resource_limit_exceeded.example.json"),
        fixture!("hcloud-api/error.uniqueness_error.example.json"),
        fixture!("hcloud-api/pagination.example.txt"),
        fixture!("hcloud-api/poweroff_server.response201.example.json"),
        fixture!("hcloud-api/poweron_server.response201.example.json"),
        fixture!("hcloud-api/reset_server.response201.example.json"),
        fixture!("hcloud-api/shutdown_server.response201.example.json"),
    ]
    .iter()
    .map(|s| s.to_vec())
    .collect();
    let doc = |b: &[u8]| serde_json::from_slice::<Value>(b).unwrap_or(Value::Null);
    let server = doc(fixture!(
        "hcloud-api/create_server.response201.example.json"
    ));
    let image = doc(fixture!("hcloud-api/create_image.response201.example.json"));
    let meta = serde_json::json!({"pagination": {"page": 1, "per_page": 25, "previous_page": null,
        "next_page": 2, "last_page": 4, "total_entries": 100}});
    for list in [
        serde_json::json!({"servers": [server["server"]], "meta": meta}),
        serde_json::json!({"images": [image["image"], image["image"]], "meta": meta}),
        serde_json::json!({"actions": [server["action"], image["action"]], "meta": meta}),
        serde_json::json!({"ssh_keys": [{"id": 1, "name": "k", "labels": {"a": "b"}}], "meta": meta}),
        serde_json::json!({"action": {"id": 9, "command": "create_image", "status": "error",
            "error": {"code": "image_create_failed", "message": "no\nspace"}}}),
    ] {
        seeds.push(serde_json::to_vec_pretty(&list).unwrap_or_default());
    }
    seeds
}

/// Reads an answer the way the client does, with every type it expects somewhere.
fn read_answer(body: &[u8], status: u16) -> Result<(), TestCaseError> {
    let exchange = timed(|| api::judge("GET /x", status, body, Duration::from_secs(1)))?;
    let mut v = match exchange {
        Exchange::Done(v) => v,
        Exchange::Refused { error, .. } | Exchange::Lost(error) | Exchange::Unreadable(error) => {
            return one_line(&error.to_string());
        }
    };
    let errors: Vec<String> = timed(|| {
        let mut errors = Vec::new();
        let mut note = |r: Result<(), api::ApiError>| {
            if let Err(e) = r {
                errors.push(e.to_string());
            }
        };
        note(api::take::<Server>("w", &mut v.clone(), "server").map(drop));
        note(api::take::<Action>("w", &mut v.clone(), "action").map(drop));
        note(api::take::<Image>("w", &mut v.clone(), "image").map(drop));
        note(api::take::<SshKey>("w", &mut v.clone(), "ssh_key").map(drop));
        note(api::take::<Vec<Server>>("w", &mut v.clone(), "servers").map(drop));
        note(api::take::<Vec<Action>>("w", &mut v.clone(), "actions").map(drop));
        note(api::take::<Vec<Image>>("w", &mut v.clone(), "images").map(drop));
        note(api::take::<Vec<SshKey>>("w", &mut v, "ssh_keys").map(drop));
        let _ = api::next_page(&v, 1);
        errors
    })?;
    for e in errors {
        one_line(&e)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// Answers of the Cloud API: servers, actions, images, keys, errors, pages, under any status.
    #[test]
    fn cloud_api_answers(body in inputs(api_seeds()), status in prop::sample::select(vec![200u16, 201, 204, 404, 422, 429, 503])) {
        read_answer(&body, status)?;
    }

    /// The hcloud CLI's cli.toml: a token or a one-line error that never shows a token.
    #[test]
    fn hcloud_cli_toml(
        doc in inputs(vec![fixture!("hcloud-cli/cli.toml").to_vec()]),
        wanted in prop::option::of(prop::sample::select(vec!["work", "home", "", "x\ny"])),
    ) {
        let text = String::from_utf8_lossy(&doc);
        let r = timed(|| token::token_from_cli_toml(&text, wanted))?;
        if let Err(e) = r {
            one_line(&e)?;
            for t in ["WORKTOKEN", "HOMETOKEN"] {
                // Only a context's name is shown, and only that may hold what was a token.
                prop_assert!(!e.contains(t) || e.contains("context"), "a token in: {e}");
            }
        }
    }

    /// qemu-img info: a value or a one-line error; an image naming another file never passes.
    #[test]
    fn qemu_img_info(doc in inputs(vec![
        fixture!("qemu-img/info.plain.json").to_vec(),
        fixture!("qemu-img/info.backing-file.json").to_vec(),
        fixture!("qemu-img/info.data-file.json").to_vec(),
        fixture!("qemu-img/info.encrypted.json").to_vec(),
        fixture!("qemu-img/info.bitmap.json").to_vec(),
        fixture!("qemu-img/info.vmdk.json").to_vec(),
    ])) {
        match timed(|| qemu::parse_info(&doc))? {
            Err(e) => one_line(&e)?,
            Ok(info) => {
                let verdict = qemu::check(&info, "qcow2");
                if let Err(e) = &verdict {
                    one_line(e)?;
                }
                let v: Value = serde_json::from_slice(&doc).unwrap_or(Value::Null);
                let names = |k: &str| v.get(k).is_some_and(|x| !x.is_null());
                let data_file = v.pointer("/format-specific/data/data-file").is_some_and(|x| !x.is_null());
                if names("backing-filename") || names("full-backing-filename") || data_file {
                    prop_assert!(verdict.is_err(), "an image naming another file passed: {info:?}");
                }
            }
        }
    }

    /// What the rescue system prints after a download and a verification.
    #[test]
    fn rescue_reports(out in inputs(vec![
        b"sha256=2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824 size=5\n".to_vec(),
        b"2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824\n".to_vec(),
    ])) {
        let text = String::from_utf8_lossy(&out);
        let (url, hash) = timed(|| (remote::parse_url_result(&text), remote::parse_hash(&text)))?;
        for h in url.map(|(h, _)| h).into_iter().chain(hash) {
            prop_assert!(h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }

    /// Labels as the API lists them, read by the run and by cleanup.
    #[test]
    fn labels_from_the_api(
        pairs in proptest::collection::vec((
            prop::sample::select(vec![labels::RUN, labels::JOB, labels::CREATED_AT, labels::LIVE_UNTIL, labels::TEMPORARY, "x"]),
            prop_oneof![any::<u64>().prop_map(|n| n.to_string()), "\\PC{0,30}", Just("-1".to_string()), Just("18446744073709551616".to_string())],
        ), 0..8),
        now in any::<u64>(),
        min_age in any::<u64>(),
        force in any::<bool>(),
    ) {
        let l: BTreeMap<String, String> = pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        let found = vec![(leftovers::Resource::new(api::Kind::Server, 1, "s"), l.clone()); 3];
        let sorted = timed(|| {
            let _ = (labels::live_until(&l), labels::job_of(&l), labels::is_stale(&l, now, min_age));
            cleanup::sort_out(found, now, min_age, force)
        })?;
        prop_assert_eq!(sorted.delete.len() + sorted.live.len() + sorted.young, 3);
        for (r, run, _) in &sorted.live {
            one_line(&format!("{r} {run}"))?;
        }
    }
}

/// TOML nested a hundred thousand levels deep: refused within the bound, not a stack overflow.
#[test]
fn deep_toml_is_refused_quickly() {
    let deep = 100_000;
    for doc in [
        format!("x = {}{}\n", "[".repeat(deep), "]".repeat(deep)),
        format!("x = {}1{}\n", "{a=".repeat(deep), "}".repeat(deep)),
        format!("[a.{}c]\n", "b.".repeat(deep)),
    ] {
        let start = Instant::now();
        let e = token::token_from_cli_toml(&doc, None)
            .err()
            .unwrap_or_default();
        assert!(start.elapsed() < BOUND, "took {:?}", start.elapsed());
        assert_eq!(e, "it is not a valid hcloud CLI configuration (TOML)");
    }
}

//! The fleet's parsers of outside input under fire: the records read back from etcd and a
//! FleetLock server's answers, fed the fixtures (`tests/fixtures/fleet/`) mutated (bytes
//! flipped, cut, inserted, keys duplicated, huge numbers, deep nesting, control characters,
//! invalid UTF-8) and arbitrary bytes. Each input ends in a value or one clear line, within a
//! second, and whatever is kept is printable one-line text of bounded length.
//!
//! CI runs a few hundred inputs per parser; `PROPTEST_CASES=200000 cargo test --release --lib
//! fleet::proptests` runs a long while.

use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::fleetlock::reason;
use super::records::{self, CanaryRecord, Candidate, MAX_RECORD, Record};
use super::{Desired, Holder, MemberRecord, Pause};

macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/fleet/",
            $name
        ))
        .as_slice()
    };
}

const RECORDS: &[&[u8]] = &[
    fixture!("holder.json"),
    fixture!("holder.reboot.json"),
    fixture!("pause.json"),
    fixture!("canary.json"),
    fixture!("candidate.json"),
    fixture!("desired.poller.json"),
    fixture!("desired.announce.json"),
    fixture!("member.json"),
    fixture!("member.failed.json"),
];

const ANSWERS: &[&[u8]] = &[
    fixture!("fleetlock.failed_lock.json"),
    fixture!("fleetlock.bad_body.json"),
    fixture!("fleetlock.proxy.txt"),
];

/// The longest line any kept string may be (the records' limit and its ellipsis).
const LONGEST: usize = 1003;
/// The longest message about a refused input.
const LONGEST_ERROR: usize = 2000;

/// One change to an input.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Cut(usize),
    Insert(usize, Vec<u8>),
    /// The first `"key":` again, with a value of its own.
    DuplicateKey(usize),
    /// A digit run replaced by a huge number.
    HugeNumber(usize, bool),
    /// Wrapped in this many arrays.
    Nest(usize),
    Control(usize, u8),
    /// A byte that is never UTF-8.
    NotUtf8(usize),
    /// A long string where a string was.
    Long(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        any::<usize>().prop_map(Mutation::Cut),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::DuplicateKey),
        (any::<usize>(), any::<bool>()).prop_map(|(i, neg)| Mutation::HugeNumber(i, neg)),
        (1usize..5000).prop_map(Mutation::Nest),
        (any::<usize>(), 0u8..0x20).prop_map(|(i, c)| Mutation::Control(i, c)),
        any::<usize>().prop_map(Mutation::NotUtf8),
        (any::<usize>(), 1usize..40_000).prop_map(|(i, n)| Mutation::Long(i, n)),
    ]
}

fn apply(mut bytes: Vec<u8>, m: &Mutation) -> Vec<u8> {
    let at = |i: usize, len: usize| if len == 0 { 0 } else { i % (len + 1) };
    match m {
        Mutation::Flip(i, b) if !bytes.is_empty() => {
            let i = i % bytes.len();
            bytes[i] ^= b | 1;
        }
        Mutation::Flip(..) => {}
        Mutation::Cut(i) => bytes.truncate(at(*i, bytes.len())),
        Mutation::Insert(i, b) => {
            let i = at(*i, bytes.len());
            bytes.splice(i..i, b.iter().copied());
        }
        Mutation::DuplicateKey(i) => {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let keys: Vec<usize> = text.match_indices("\":").map(|(k, _)| k).collect();
            if let Some(&end) = keys.get(i % keys.len().max(1)) {
                let start = text[..end].rfind('"').unwrap_or(0);
                let dup = format!("{}\":\"again\",", &text[start..end]);
                if let Some(open) = text.find('{') {
                    let mut out = text.clone();
                    out.insert_str(open + 1, &dup);
                    return out.into_bytes();
                }
            }
        }
        Mutation::HugeNumber(i, neg) => {
            let huge: &[u8] = if *neg {
                b"-99999999999999999999999999e999"
            } else {
                b"184467440737095516160000"
            };
            let digits: Vec<usize> = (0..bytes.len())
                .filter(|&k| bytes[k].is_ascii_digit())
                .collect();
            if let Some(&k) = digits.get(i % digits.len().max(1)) {
                let mut end = k;
                while end < bytes.len() && bytes[end].is_ascii_digit() {
                    end += 1;
                }
                bytes.splice(k..end, huge.iter().copied());
            }
        }
        Mutation::Nest(n) => {
            let mut out = vec![b'['; *n];
            out.extend_from_slice(&bytes);
            out.extend(std::iter::repeat_n(b']', *n));
            return out;
        }
        Mutation::Control(i, c) => {
            let i = at(*i, bytes.len());
            bytes.insert(i, *c);
        }
        Mutation::NotUtf8(i) => {
            let i = at(*i, bytes.len());
            bytes.insert(i, 0xff);
        }
        Mutation::Long(i, n) => {
            let quotes: Vec<usize> = (0..bytes.len()).filter(|&k| bytes[k] == b'"').collect();
            if let Some(&k) = quotes.get(i % quotes.len().max(1)) {
                let filler = "x\u{2028}\\n".repeat(n / 4 + 1);
                bytes.splice(k + 1..k + 1, filler.into_bytes());
            }
        }
    }
    bytes
}

fn mutated(seeds: &'static [&'static [u8]]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => (0..seeds.len(), prop::collection::vec(mutation(), 0..6)).prop_map(move |(s, ms)| {
            ms.iter().fold(seeds[s].to_vec(), apply)
        }),
        1 => prop::collection::vec(any::<u8>(), 0..4096),
    ]
}

/// Printable, one line, bounded.
fn one_line(text: &str, longest: usize) -> Result<(), String> {
    if text.chars().count() > longest {
        return Err(format!("{} characters", text.chars().count()));
    }
    match text
        .chars()
        .find(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
    {
        Some(c) => Err(format!("{c:?} in {text:?}")),
        None => Ok(()),
    }
}

/// Every string of a kept record is one printable line.
fn strings_ok(value: &serde_json::Value) -> Result<(), String> {
    match value {
        serde_json::Value::String(s) => one_line(s, LONGEST),
        serde_json::Value::Array(a) => a.iter().try_for_each(strings_ok),
        serde_json::Value::Object(o) => o.values().try_for_each(strings_ok),
        _ => Ok(()),
    }
}

fn check_record<T: Record + serde::Serialize>(bytes: &[u8]) -> Result<(), TestCaseError> {
    let started = Instant::now();
    let read = records::parse::<T>("a record", bytes);
    prop_assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    match read {
        Ok(value) => {
            prop_assert!(bytes.len() <= MAX_RECORD);
            let json =
                serde_json::to_value(&value).map_err(|e| TestCaseError::fail(e.to_string()))?;
            strings_ok(&json).map_err(TestCaseError::fail)?;
        }
        Err(e) => {
            prop_assert!(e.starts_with("a record: "), "{e}");
            one_line(&e, LONGEST_ERROR).map_err(TestCaseError::fail)?;
        }
    }
    Ok(())
}

/// Runs `check` on every kind of record.
fn check_every_record(bytes: &[u8]) -> Result<(), TestCaseError> {
    check_record::<Holder>(bytes)?;
    check_record::<Pause>(bytes)?;
    check_record::<CanaryRecord>(bytes)?;
    check_record::<Candidate>(bytes)?;
    check_record::<Desired>(bytes)?;
    check_record::<MemberRecord>(bytes)
}

proptest! {
    #![proptest_config(ProptestConfig::default())]

    #[test]
    fn etcd_records_give_a_value_or_one_line(bytes in mutated(RECORDS)) {
        check_every_record(&bytes)?;
    }

    #[test]
    fn fleetlock_answers_give_one_line(bytes in mutated(ANSWERS), status in 300u16..600) {
        let started = Instant::now();
        let line = reason(status, &bytes);
        prop_assert!(started.elapsed() < Duration::from_secs(1));
        prop_assert!(line.starts_with(&format!("{status} ")), "{line}");
        // The status, a space and at most 200 characters of the server's words.
        one_line(&line, 4 + 200).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn urls_from_the_configuration_never_show_a_password(
        user in "[a-z]{1,8}",
        password in "[A-Za-z0-9!$&'()*+,;=~._-]{1,24}",
        host in "[a-z0-9.-]{1,20}",
        scheme in prop::sample::select(vec!["http://", "https://", "htp://", "", "http:/"]),
        tail in "(:[0-9]{1,5})?(/[a-z@]{0,8})?",
    ) {
        let text = format!("{scheme}{user}:{password}@{host}{tail}");
        let shown = super::url::redact(&text);
        prop_assert!(!shown.contains(&format!("{user}:{password}")), "{text} shown as {shown}");
    }
}

#[test]
fn the_fixtures_parse() {
    records::parse::<Holder>("h", RECORDS[0]).unwrap();
    records::parse::<Holder>("h", RECORDS[1]).unwrap();
    records::parse::<Pause>("p", RECORDS[2]).unwrap();
    records::parse::<CanaryRecord>("c", RECORDS[3]).unwrap();
    records::parse::<Candidate>("c", RECORDS[4]).unwrap();
    let d = records::parse::<Desired>("d", RECORDS[5]).unwrap();
    assert!(!d.announced());
    assert!(
        records::parse::<Desired>("d", RECORDS[6])
            .unwrap()
            .announced()
    );
    let m = records::parse::<MemberRecord>("m", RECORDS[7]).unwrap();
    assert_eq!(m.slots, 2);
    records::parse::<MemberRecord>("m", RECORDS[8]).unwrap();
    assert_eq!(
        reason(409, ANSWERS[0]),
        "409 failed_lock: semaphore full, held by 1001"
    );
    assert!(reason(502, ANSWERS[2]).starts_with("502 upstream connect error"));
}

#[test]
fn hostile_records_are_refused_or_made_one_line() {
    let e = records::parse::<Desired>(
        "the group's desired release",
        br#"{"version":"1.0\nWATCHDOG=trigger","by":"x","at":"y"}"#,
    )
    .unwrap_err();
    assert!(
        !e.contains('\n') && e.contains("not an exact version"),
        "{e}"
    );
    let h = records::parse::<Holder>(
        "slot 0",
        br#"{"id":"1","host":"web\nSTATUS=pwned\u2028x","purpose":{"kind":"reboot"},"since":"now"}"#,
    )
    .unwrap();
    assert_eq!(h.host, "web STATUS=pwned x");
    let big = vec![b' '; MAX_RECORD + 1];
    assert!(
        records::parse::<Pause>("a pause", &big)
            .unwrap_err()
            .contains("more than")
    );
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(records::parse::<Pause>("a pause", deep.as_bytes()).is_err());
}

//! Metrics: the rendered text is valid Prometheus text (checked by a small strict parser of the
//! 0.0.4 format), has every series with its value, is written as a textfile atomically with mode
//! 0644, and is served over HTTP by a server that survives garbage.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hcloud_nixos::agent::lifecycle::state::{State, Target};
use hcloud_nixos::agent::metrics::{self, CONTENT_TYPE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Families with their type and help, and samples, from a strict reading of the text format.
#[derive(Debug, Default)]
struct Exposition {
    types: HashMap<String, String>,
    helps: HashMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let found: Vec<_> = self
            .samples
            .iter()
            .filter(|s| s.name == name && s.labels == want)
            .collect();
        assert!(found.len() <= 1, "{name} {labels:?} appears twice");
        found.first().map(|s| s.value)
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with("__")
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ if s.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) && !s.is_empty() => {
            s.parse().map_err(|_| format!("bad value '{s}'"))
        }
        _ => Err(format!("bad value '{s}'")),
    }
}

/// Parses `{a="x",b="y"}` at the start of `s`; returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').ok_or("expected {")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !is_label_name(name) {
            return Err(format!("bad label name '{name}'"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling backslash")?.1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, '\n') => return Err("raw newline in label value".into()),
                (_, c) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err("expected , or } after a label".into());
        }
    }
}

/// A strict reading of the text format 0.0.4 as these metrics use it: LF line ends, the text
/// ends in a newline, `# HELP` and `# TYPE` at most once per family and before its samples,
/// every sample of a declared family, samples of one family together, no duplicate series.
fn parse(text: &str) -> Result<Exposition, String> {
    let mut e = Exposition::default();
    if !text.ends_with('\n') {
        return Err("text does not end in a newline".into());
    }
    let mut seen_samples_of: HashSet<String> = HashSet::new();
    let mut series: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    for (n, line) in text.split('\n').enumerate() {
        let err = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if line.contains('\r') {
            return Err(err("carriage return".into()));
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("HELP"), Some(name), help) => {
                    if !is_metric_name(name) {
                        return Err(err("bad name in HELP".into()));
                    }
                    if e.helps
                        .insert(name.into(), help.unwrap_or("").into())
                        .is_some()
                    {
                        return Err(err("HELP twice".into()));
                    }
                    if seen_samples_of.contains(name) {
                        return Err(err("HELP after samples".into()));
                    }
                }
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !is_metric_name(name) {
                        return Err(err("bad name in TYPE".into()));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(err(format!("bad type {kind}")));
                    }
                    if e.types.insert(name.into(), kind.into()).is_some() {
                        return Err(err("TYPE twice".into()));
                    }
                    if seen_samples_of.contains(name) {
                        return Err(err("TYPE after samples".into()));
                    }
                }
                _ => {} // Other comments are allowed.
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| err("no value".into()))?;
        let name = &line[..name_end];
        if !is_metric_name(name) {
            return Err(err("bad metric name".into()));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(err)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let rest = rest
            .strip_prefix(' ')
            .ok_or_else(|| err("no space before the value".into()))?;
        let mut fields = rest.split(' ');
        let value = parse_value(fields.next().unwrap_or("")).map_err(err)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| err("bad timestamp".into()))?;
        }
        if fields.next().is_some() {
            return Err(err("trailing fields".into()));
        }
        if !e.types.contains_key(name) {
            return Err(err("sample without a TYPE".into()));
        }
        if current.as_deref() != Some(name) {
            if seen_samples_of.contains(name) {
                return Err(err("samples of a family not together".into()));
            }
            current = Some(name.to_string());
        }
        seen_samples_of.insert(name.to_string());
        if !series.insert(format!("{name}{labels:?}")) {
            return Err(err("duplicate series".into()));
        }
        e.samples.push(Sample {
            name: name.into(),
            labels,
            value,
        });
    }
    Ok(e)
}

fn sample_state() -> State {
    // As the state file has it (the layout every agent reads and writes).
    serde_json::from_value(serde_json::json!({
        "running": {"version": "0.1.42", "store_path": "/nix/store/aaaa-nixos-system-web-25.11"},
        "desired": {"version": "0.1.43", "store_path": "/nix/store/cccc-nixos-system-web-25.11"},
        "last_check": {"at": "2026-11-21T14:00:00Z", "ok": false, "message": "FlakeHub answered 503"},
        "last_deploy": {
            "version": "0.1.42",
            "store_path": "/nix/store/aaaa-nixos-system-web-25.11",
            "operation": "switch",
            "started_at": "2026-11-21T13:58:00Z",
            "finished_at": "2026-11-21T13:59:30Z",
            "outcome": "success"
        },
        "in_flight": {
            "version": "0.1.43",
            "store_path": "/nix/store/cccc-nixos-system-web-25.11",
            "operation": "switch",
            "started_at": "2026-11-21T14:00:01Z"
        },
        "counters": {"deploys_succeeded": 7, "deploys_failed": 2, "rollbacks_succeeded": 1, "rollbacks_failed": 0},
        "consecutive_failures": 3,
        "quarantined": [
            {"version": "0.1.40", "store_path": "/nix/store/dddd", "reason": "health check failed", "at": "2026-11-20T10:00:00Z"},
            {"version": "0.1.41", "store_path": "/nix/store/eeee", "reason": "switch failed", "at": "2026-11-20T11:00:00Z"}
        ],
        "reboot_required": true
    }))
    .unwrap()
}

fn rfc3339_seconds(s: &str) -> f64 {
    humantime::parse_rfc3339(s)
        .unwrap()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64
}

const EVERY_FAMILY: [(&str, &str); 13] = [
    ("hcloud_nixos_last_check_timestamp_seconds", "gauge"),
    ("hcloud_nixos_last_check_success", "gauge"),
    ("hcloud_nixos_running_info", "gauge"),
    ("hcloud_nixos_desired_info", "gauge"),
    ("hcloud_nixos_deploys_total", "counter"),
    ("hcloud_nixos_rollbacks_total", "counter"),
    ("hcloud_nixos_last_deploy_timestamp_seconds", "gauge"),
    ("hcloud_nixos_last_deploy_success", "gauge"),
    ("hcloud_nixos_deploy_in_progress", "gauge"),
    ("hcloud_nixos_reboot_required", "gauge"),
    ("hcloud_nixos_consecutive_failures", "gauge"),
    ("hcloud_nixos_quarantined_releases", "gauge"),
    ("hcloud_nixos_metrics_rendered_timestamp_seconds", "gauge"),
];

#[test]
fn rendered_text_parses_and_has_every_series() {
    let now = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
    let text = metrics::render(&sample_state(), now);
    let e = parse(&text).unwrap_or_else(|m| panic!("{m}\n{text}"));
    for (name, kind) in EVERY_FAMILY {
        assert_eq!(e.types.get(name).map(String::as_str), Some(kind), "{name}");
        assert!(!e.helps[name].is_empty(), "{name} has no help");
    }
    assert_eq!(e.types.len(), 13, "{:?}", e.types.keys());
    let v = |name, labels: &[(&str, &str)]| {
        e.get(name, labels)
            .unwrap_or_else(|| panic!("{name} {labels:?} missing\n{text}"))
    };
    assert_eq!(
        v("hcloud_nixos_last_check_timestamp_seconds", &[]),
        rfc3339_seconds("2026-11-21T14:00:00Z")
    );
    assert_eq!(v("hcloud_nixos_last_check_success", &[]), 0.0);
    assert_eq!(
        v(
            "hcloud_nixos_running_info",
            &[
                ("version", "0.1.42"),
                ("store_path", "/nix/store/aaaa-nixos-system-web-25.11")
            ]
        ),
        1.0
    );
    assert_eq!(
        v(
            "hcloud_nixos_desired_info",
            &[
                ("version", "0.1.43"),
                ("store_path", "/nix/store/cccc-nixos-system-web-25.11")
            ]
        ),
        1.0
    );
    assert_eq!(
        v("hcloud_nixos_deploys_total", &[("outcome", "success")]),
        7.0
    );
    assert_eq!(
        v("hcloud_nixos_deploys_total", &[("outcome", "failed")]),
        2.0
    );
    assert_eq!(
        v("hcloud_nixos_rollbacks_total", &[("outcome", "success")]),
        1.0
    );
    assert_eq!(
        v("hcloud_nixos_rollbacks_total", &[("outcome", "failed")]),
        0.0
    );
    assert_eq!(
        v("hcloud_nixos_last_deploy_timestamp_seconds", &[]),
        rfc3339_seconds("2026-11-21T13:59:30Z")
    );
    assert_eq!(v("hcloud_nixos_last_deploy_success", &[]), 1.0);
    assert_eq!(v("hcloud_nixos_deploy_in_progress", &[]), 1.0);
    assert_eq!(v("hcloud_nixos_reboot_required", &[]), 1.0);
    assert_eq!(v("hcloud_nixos_consecutive_failures", &[]), 3.0);
    assert_eq!(v("hcloud_nixos_quarantined_releases", &[]), 2.0);
    assert_eq!(
        v("hcloud_nixos_metrics_rendered_timestamp_seconds", &[]),
        1_795_000_000.0
    );
    assert_eq!(e.samples.len(), 15);
    // Deterministic: the same state renders the same text.
    assert_eq!(text, metrics::render(&sample_state(), now));
}

#[test]
fn empty_state_leaves_unknown_series_out_and_still_parses() {
    let text = metrics::render(&State::default(), SystemTime::now());
    let e = parse(&text).unwrap_or_else(|m| panic!("{m}\n{text}"));
    assert_eq!(e.types.len(), 13);
    for name in [
        "hcloud_nixos_last_check_timestamp_seconds",
        "hcloud_nixos_last_check_success",
        "hcloud_nixos_running_info",
        "hcloud_nixos_desired_info",
        "hcloud_nixos_last_deploy_timestamp_seconds",
        "hcloud_nixos_last_deploy_success",
    ] {
        assert!(e.samples.iter().all(|s| s.name != name), "{name} present");
    }
    assert_eq!(
        e.get("hcloud_nixos_deploys_total", &[("outcome", "success")]),
        Some(0.0)
    );
    assert_eq!(e.get("hcloud_nixos_deploy_in_progress", &[]), Some(0.0));
    assert_eq!(e.get("hcloud_nixos_reboot_required", &[]), Some(0.0));
    assert_eq!(e.get("hcloud_nixos_consecutive_failures", &[]), Some(0.0));
    assert_eq!(e.get("hcloud_nixos_quarantined_releases", &[]), Some(0.0));
    assert_eq!(e.get("hcloud_nixos_last_check_success", &[]), None);
}

#[test]
fn odd_label_values_are_escaped_and_read_back() {
    let odd_version = "1.0 \"quoted\" back\\slash\nnew line, {braces}=ü";
    let mut state = State {
        running: Some(Target {
            version: odd_version.into(),
            store_path: "/nix/store/x\\\"y".into(),
        }),
        ..Default::default()
    };
    state.last_check = serde_json::from_value(serde_json::json!(
        {"at": "2026-11-21T14:00:00Z", "ok": true, "message": ""}
    ))
    .unwrap();
    let text = metrics::render(&state, SystemTime::now());
    let e = parse(&text).unwrap_or_else(|m| panic!("{m}\n{text}"));
    assert_eq!(
        e.get(
            "hcloud_nixos_running_info",
            &[
                ("version", odd_version),
                ("store_path", "/nix/store/x\\\"y")
            ]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(e.get("hcloud_nixos_last_check_success", &[]), Some(1.0));
    // Times are typed: a state file with an unreadable one is refused when it is read, so the
    // metrics never meet one.
    let unreadable =
        serde_json::json!({"last_check": {"at": "not a time", "ok": true, "message": ""}});
    assert!(serde_json::from_value::<State>(unreadable).is_err());
}

#[test]
fn the_parser_is_strict() {
    for bad in [
        "x 1",                                                      // no newline at the end
        "x 1\n",                                                    // no TYPE
        "# TYPE x gauge\nx{a=\"1\"} 1\nx{a=\"1\"} 2\n",             // duplicate
        "# TYPE x gauge\nx{a=\"1} 1\n",                             // unterminated
        "# TYPE x gauge\nx{a=\"\\t\"} 1\n",                         // bad escape
        "# TYPE x gauge\nx{1a=\"1\"} 1\n",                          // bad label name
        "# TYPE x gauge\nx one\n",                                  // bad value
        "# TYPE x gauge\nx  1\n",                                   // two spaces
        "# TYPE x gauge\n# TYPE y gauge\nx 1\ny 1\nx{a=\"b\"} 1\n", // split family
        "# TYPE 9x gauge\n",                                        // bad name
        "# TYPE x gauge\r\nx 1\r\n",                                // CRLF
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
    // In 0.0.4 a counter's TYPE names the sample, _total included.
    assert!(parse("# HELP x a \\\\ help\n# TYPE x counter\nx_total 1\n").is_err());
    assert!(parse("# HELP x h\n# TYPE x counter\nx{a=\"\\n\\\\\\\"\"} 1 1700000000000\n").is_ok());
}

#[test]
fn textfile_is_written_atomically_with_mode_0644() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hcloud-nixos.prom");
    std::fs::write(&path, "old 1\n").unwrap();
    let text = metrics::render(&sample_state(), SystemTime::now());
    metrics::write_textfile(&path, &text).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o644);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["hcloud-nixos.prom"], "a temporary file was left");
    let missing = dir.path().join("no-such-dir").join("x.prom");
    let e = format!(
        "{:#}",
        metrics::write_textfile(&missing, &text).unwrap_err()
    );
    assert!(e.contains("does not exist"), "{e}");
}

async fn raw_request(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before all of a large request is written.
    let _ = s.write_all(bytes).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "current_thread")]
async fn server_answers_metrics_and_404_and_survives_garbage() {
    hcloud_nixos::plumbing::tls::install_crypto_provider();
    let listener = metrics::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(metrics::render(&sample_state(), SystemTime::now()));
    let server = tokio::spawn(metrics::serve(listener, rx));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .no_proxy()
        .build()
        .unwrap();
    let url = format!("http://{addr}/metrics");

    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], CONTENT_TYPE);
    let body = resp.text().await.unwrap();
    let e = parse(&body).unwrap();
    assert_eq!(e.get("hcloud_nixos_consecutive_failures", &[]), Some(3.0));

    let resp = http.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let resp = http
        .post(&url)
        .body(vec![b'x'; 256 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    let resp = http.head(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    // Garbage, an oversized head, a client that says nothing and hangs up, a bare-LF request.
    assert!(
        raw_request(addr, b"\x00\xff\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 400 ")
    );
    let huge = [
        b"GET /metrics HTTP/1.1\r\nX: ".as_slice(),
        &vec![b'a'; 64 * 1024],
    ]
    .concat();
    assert!(raw_request(addr, &huge).await.starts_with("HTTP/1.1 431 "));
    drop(tokio::net::TcpStream::connect(addr).await.unwrap());
    let answer = raw_request(addr, b"GET /metrics HTTP/1.0\n\n").await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with(&body), "{answer}");

    // Clients that open a connection and send nothing take a slot each, not the server.
    let idle: Vec<_> = futures_util::future::join_all(
        (0..metrics::MAX_CONNECTIONS - 1).map(|_| tokio::net::TcpStream::connect(addr)),
    )
    .await;
    // A new state is served at once.
    let mut state = sample_state();
    state.consecutive_failures = 0;
    tx.send_replace(metrics::render(&state, SystemTime::now()));
    let body = http.get(&url).send().await.unwrap().text().await.unwrap();
    assert_eq!(
        parse(&body)
            .unwrap()
            .get("hcloud_nixos_consecutive_failures", &[]),
        Some(0.0)
    );
    drop(idle);
    assert!(!server.is_finished());
    server.abort();
}

#[tokio::test(flavor = "current_thread")]
async fn publisher_serves_and_writes_the_textfile() {
    hcloud_nixos::plumbing::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let textfile = dir.path().join("hcloud-nixos.prom");
    // Port 0 to get a free one; find it by asking the OS for one first.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let m = metrics::Metrics::from_config(&metrics::MetricsConfig {
        listen: Some(format!("127.0.0.1:{port}")),
        textfile: Some(textfile.clone()),
    })
    .unwrap();
    let mut state = sample_state();
    let mut publisher = metrics::Publisher::start(&m, &state).await.unwrap();
    let first = std::fs::read_to_string(&textfile).unwrap();
    assert_eq!(
        parse(&first)
            .unwrap()
            .get("hcloud_nixos_reboot_required", &[]),
        Some(1.0)
    );
    state.reboot_required = false;
    publisher.publish(&state);
    let written = parse(&std::fs::read_to_string(&textfile).unwrap()).unwrap();
    assert_eq!(written.get("hcloud_nixos_reboot_required", &[]), Some(0.0));
    let body = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        parse(&body)
            .unwrap()
            .get("hcloud_nixos_reboot_required", &[]),
        Some(0.0)
    );
    // The same address again cannot be bound: the error says which.
    let e = format!(
        "{:#}",
        metrics::Publisher::start(&m, &state).await.unwrap_err()
    );
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
}

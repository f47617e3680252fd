//! Metrics: the rendered text is valid Prometheus text (read by openmetrics-parser's grammar of
//! the 0.0.4 format), has every series with its value, is written as a textfile atomically with
//! mode 0644, and is served over HTTP by a server that survives garbage, slow clients and idle
//! ones, and keeps connections alive.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hcloud_nixos::agent::lifecycle::state::{State, Target};
use hcloud_nixos::agent::metrics::{self, CONTENT_TYPE};
use openmetrics_parser::prometheus::parse_prometheus;
use openmetrics_parser::{PrometheusType, PrometheusValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Families with their type and help, and samples, as the parser read them.
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

/// Reads the text with openmetrics-parser's grammar of the Prometheus text format (0.0.4): it
/// checks names, label escapes, values and timestamps, one TYPE and HELP per family before its
/// samples, a family's samples together, the same label names in a family, no duplicate series.
/// On top: LF line ends only, and every family declared with a TYPE (no untyped samples).
fn parse(text: &str) -> Result<Exposition, String> {
    if text.contains('\r') {
        return Err("carriage return: the text format has LF line ends".into());
    }
    let parsed = parse_prometheus(text).map_err(|e| format!("{e:?}"))?;
    let mut e = Exposition::default();
    for (name, family) in parsed.families {
        let kind = match family.family_type {
            PrometheusType::Counter => "counter",
            PrometheusType::Gauge => "gauge",
            PrometheusType::Histogram => "histogram",
            PrometheusType::Summary => "summary",
            PrometheusType::Unknown => return Err(format!("{name}: samples without a TYPE")),
        };
        for sample in family.iter_samples() {
            let labels = sample
                .get_labelset()
                .map_err(|e| format!("{name}: {e:?}"))?
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let value = match &sample.value {
                PrometheusValue::Gauge(n) | PrometheusValue::Unknown(n) => n.as_f64(),
                PrometheusValue::Counter(c) => c.value.as_f64(),
                other => return Err(format!("{name}: unexpected value {other:?}")),
            };
            e.samples.push(Sample {
                name: name.clone(),
                labels,
                value,
            });
        }
        e.types.insert(name.clone(), kind.to_string());
        e.helps.insert(name, family.help);
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
        "# TYPE x gauge\n# TYPE y gauge\nx 1\ny 1\nx{a=\"b\"} 1\n", // split family
        "# TYPE 9x gauge\n",                                        // bad name
        "# TYPE x gauge\r\nx 1\r\n",                                // CRLF
        "# TYPE x gauge\nx 1\n# TYPE x gauge\n",                    // TYPE after samples
        "# TYPE x gauge\nx{a=\"1\"} 1\nx{b=\"1\"} 1\n",             // label names differ
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
    // In 0.0.4 a counter's TYPE names the sample, _total included.
    assert!(parse("# HELP x a \\\\ help\n# TYPE x counter\nx_total 1\n").is_err());
    assert!(parse("# HELP x h\n# TYPE x counter\nx{a=\"\\n\\\\\\\"\"} 1 1700000000000\n").is_ok());
    // Blanks between a series and its value are one or more (Prometheus reads both).
    assert!(parse("# TYPE x gauge\nx  1\n").is_ok());
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
    let (mut publisher, addr) = start_server(&sample_state()).await;
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
    // An HTTP/1.0 client gets an HTTP/1.0 answer (hyper speaks the client's version), and the
    // connection closes after it.
    let answer = raw_request(addr, b"GET /metrics HTTP/1.0\n\n").await;
    assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with(&body), "{answer}");

    // Clients that open a connection and send nothing take a slot each, not the server.
    let idle: Vec<_> = futures_util::future::join_all(
        (0..metrics::MAX_CONNECTIONS - 1).map(|_| tokio::net::TcpStream::connect(addr)),
    )
    .await;
    // A new state is served at once.
    let mut state = sample_state();
    state.consecutive_failures = 0;
    publisher.publish(&state);
    let body = http.get(&url).send().await.unwrap().text().await.unwrap();
    assert_eq!(
        parse(&body)
            .unwrap()
            .get("hcloud_nixos_consecutive_failures", &[]),
        Some(0.0)
    );
    drop(idle);
    // The server is still there.
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "current_thread")]
async fn connections_are_kept_alive() {
    let (_publisher, addr) = start_server(&sample_state()).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut answers = String::new();
    for _ in 0..3 {
        s.write_all(request).await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("no answer on a kept-alive connection")
            .unwrap();
        answers.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert_eq!(
        answers.matches("HTTP/1.1 200 OK\r\n").count(),
        3,
        "{answers}"
    );
    assert!(!answers.contains("connection: close"), "{answers}");
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

/// A free port on loopback (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the metrics server the way the agent does, on a free loopback port.
async fn start_server(state: &State) -> (metrics::Publisher, std::net::SocketAddr) {
    hcloud_nixos::plumbing::tls::install_crypto_provider();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let m = metrics::Metrics::from_config(&metrics::MetricsConfig {
        listen: Some(addr.to_string()),
        textfile: None,
    })
    .unwrap();
    (metrics::Publisher::start(&m, state).await.unwrap(), addr)
}

/// Issue 13: slow clients (connected and silent, or sending their request a byte at a time)
/// must not keep a scraper from its answer.
#[tokio::test(flavor = "current_thread")]
async fn slow_connections_do_not_starve_the_endpoint() {
    let (_publisher, addr) = start_server(&sample_state()).await;
    let mut slow = Vec::new();
    // Silent ones: connect, send nothing, hold the connection.
    for _ in 0..6 {
        slow.push(tokio::spawn(async move {
            let s = tokio::net::TcpStream::connect(addr).await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        }));
    }
    // Slowloris: the request head a byte every 300 ms (about 12 s for the whole head).
    for _ in 0..6 {
        slow.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            for b in b"GET /metrics HTTP/1.1\r\nHost: slow.example\r\n\r\n" {
                if s.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }));
    }
    // One more silent one that waits for the server to give up on it.
    let hung_up = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap_or(0);
        (n, started.elapsed())
    });
    // Let every slow connection be accepted first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .no_proxy()
        .build()
        .unwrap();
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let resp = http
            .get(format!("http://{addr}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.text().await.unwrap();
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "/metrics took {took:?} beside 12 slow connections"
        );
        assert_eq!(
            parse(&body)
                .unwrap()
                .get("hcloud_nixos_consecutive_failures", &[]),
            Some(3.0)
        );
    }
    for t in slow {
        t.abort();
    }
    // A connection that never sends a request is closed after the header timeout.
    let (n, after) = tokio::time::timeout(metrics::HEADER_TIMEOUT * 2, hung_up)
        .await
        .expect("the server never closed a silent connection")
        .unwrap();
    assert_eq!(n, 0, "the server sent something to a silent client");
    assert!(
        after >= metrics::HEADER_TIMEOUT - Duration::from_secs(1),
        "closed after {after:?}"
    );
}

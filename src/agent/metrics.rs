//! Metrics in the Prometheus text exposition format (0.0.4): rendered from the agent's state,
//! served over HTTP on a configured address and/or written for node-exporter's textfile
//! collector.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::agent::lifecycle::state::State;

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The largest request head (request line and headers) the server reads.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request, and to take the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; further ones wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 4;

/// The `[metrics]` table as written. Unknown keys are errors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub listen: Option<String>,
    pub textfile: Option<PathBuf>,
}

/// Validated metrics settings; both absent means no metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    pub listen: Option<SocketAddr>,
    pub textfile: Option<PathBuf>,
}

impl Metrics {
    /// Validates the table; every problem is one line naming its key.
    pub fn from_config(c: &MetricsConfig) -> Result<Metrics, Vec<String>> {
        let mut problems = Vec::new();
        let listen = c.listen.as_deref().and_then(|text| {
            text.parse::<SocketAddr>()
                .map_err(|_| {
                    problems.push(format!(
                        "metrics.listen: '{}' is not an IP address and port (for example 127.0.0.1:9945 or [::1]:9945)",
                        text.escape_debug()
                    ))
                })
                .ok()
        });
        if let Some(path) = &c.textfile {
            if !path.is_absolute() {
                problems.push(format!(
                    "metrics.textfile: '{}' is not an absolute path",
                    path.display()
                ));
            } else if path.extension().is_none_or(|e| e != "prom") {
                problems.push(format!(
                    "metrics.textfile: '{}' does not end in .prom (node-exporter's textfile collector reads only *.prom)",
                    path.display()
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Metrics {
            listen,
            textfile: c.textfile.clone(),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.listen.is_some() || self.textfile.is_some()
    }
}

/// Escapes a label value: backslash, double quote and newline.
pub fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Seconds since the epoch of an RFC 3339 time, when it is one (and not before 1970).
fn timestamp(at: &jiff::Timestamp) -> Option<f64> {
    Some(at.as_second() as f64)
}

/// One metric family being written: `# HELP`, `# TYPE`, then its samples.
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl Family<'_> {
    fn sample(&mut self, labels: &[(&str, &str)], value: impl std::fmt::Display) -> &mut Self {
        self.out.push_str(self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (name, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{name}=\"{}\"", escape_label_value(value));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }
}

fn family<'a>(out: &'a mut String, name: &'static str, kind: &str, help: &str) -> Family<'a> {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    Family { out, name }
}

fn bit(b: bool) -> u8 {
    u8::from(b)
}

/// The state as Prometheus text. Series whose value is unknown (no check yet, nothing running)
/// are left out; their `# HELP` and `# TYPE` are always there.
pub fn render(state: &State, now: SystemTime) -> String {
    let mut out = String::with_capacity(4096);
    let o = &mut out;

    let check = state.last_check.as_ref();
    let mut f = family(
        o,
        "hcloud_nixos_last_check_timestamp_seconds",
        "gauge",
        "When the agent last looked for a new release (Unix time).",
    );
    if let Some(at) = check.and_then(|c| timestamp(&c.at)) {
        f.sample(&[], at);
    }
    let mut f = family(
        o,
        "hcloud_nixos_last_check_success",
        "gauge",
        "Whether the last look for a new release succeeded (1) or failed (0).",
    );
    if let Some(c) = check {
        f.sample(&[], bit(c.ok));
    }

    let mut f = family(
        o,
        "hcloud_nixos_running_info",
        "gauge",
        "The release the system runs, as labels; the value is always 1.",
    );
    if let Some(r) = &state.running {
        f.sample(&[("version", &r.version), ("store_path", &r.store_path)], 1);
    }
    let mut f = family(
        o,
        "hcloud_nixos_desired_info",
        "gauge",
        "The release the agent wants to run, as labels; the value is always 1.",
    );
    if let Some(d) = &state.desired {
        f.sample(&[("version", &d.version), ("store_path", &d.store_path)], 1);
    }

    let c = &state.counters;
    family(
        o,
        "hcloud_nixos_deploys_total",
        "counter",
        "Deploys finished since the state file was created, by outcome.",
    )
    .sample(&[("outcome", "success")], c.deploys_succeeded)
    .sample(&[("outcome", "failed")], c.deploys_failed);
    family(
        o,
        "hcloud_nixos_rollbacks_total",
        "counter",
        "Rollbacks finished since the state file was created, by outcome.",
    )
    .sample(&[("outcome", "success")], c.rollbacks_succeeded)
    .sample(&[("outcome", "failed")], c.rollbacks_failed);

    let last = state.last_deploy.as_ref();
    let mut f = family(
        o,
        "hcloud_nixos_last_deploy_timestamp_seconds",
        "gauge",
        "When the last deploy finished (Unix time).",
    );
    if let Some(at) = last.and_then(|d| timestamp(&d.finished_at)) {
        f.sample(&[], at);
    }
    let mut f = family(
        o,
        "hcloud_nixos_last_deploy_success",
        "gauge",
        "Whether the last deploy succeeded (1) or failed (0).",
    );
    if let Some(d) = last {
        f.sample(
            &[],
            bit(d.outcome == crate::agent::lifecycle::state::Outcome::Success),
        );
    }

    family(
        o,
        "hcloud_nixos_deploy_in_progress",
        "gauge",
        "Whether a deploy has started and its result is not yet recorded.",
    )
    .sample(&[], bit(state.in_flight().is_some()));
    family(
        o,
        "hcloud_nixos_reboot_required",
        "gauge",
        "Whether the running system needs a reboot (new kernel, initrd or kernel modules).",
    )
    .sample(&[], bit(state.reboot_required));
    family(
        o,
        "hcloud_nixos_consecutive_failures",
        "gauge",
        "Cycles in a row that ended in a failure (check or deploy).",
    )
    .sample(&[], state.consecutive_failures);
    family(
        o,
        "hcloud_nixos_quarantined_releases",
        "gauge",
        "Releases that failed, were rolled back and are not tried again until cleared.",
    )
    .sample(&[], state.quarantined.len());

    if let Ok(now) = now.duration_since(UNIX_EPOCH) {
        family(
            o,
            "hcloud_nixos_metrics_rendered_timestamp_seconds",
            "gauge",
            "When this text was rendered (Unix time); old in a textfile means the agent stopped updating it.",
        )
        .sample(&[], now.as_secs());
    }
    out
}

/// Writes the text for node-exporter's textfile collector: atomically, mode 0644. The directory
/// is not created: it belongs to node-exporter.
pub fn write_textfile(path: &Path, text: &str) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        bail!(
            "cannot write {}: the directory {} does not exist (it is node-exporter's textfile directory; enable its textfile collector or change metrics.textfile)",
            path.display(),
            dir.display()
        );
    }
    crate::plumbing::files::write_atomic(path, text.as_bytes(), 0o644)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Binds the metrics address; the error says which address.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for metrics (metrics.listen)"))
}

/// Serves the latest text in `current` to `GET /metrics` on every connection, forever. Meant to
/// be spawned (`tokio::spawn`); works on a current-thread runtime. One request per connection;
/// anything else than `GET`/`HEAD /metrics` gets 404 (or 405, 400, 431), garbage a 400 or a
/// closed connection.
pub async fn serve(listener: TcpListener, current: watch::Receiver<String>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let current = current.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    answer(stream, &current).await;
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "metrics: cannot accept a connection");
                drop(slot);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Reads the request head: `None` when the client gave up, was too slow or sent too much
/// (with the status to answer, if any).
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, Option<u16>> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let read = async {
        loop {
            if let Some(end) = find_end(&head) {
                head.truncate(end);
                return Ok(());
            }
            if head.len() > MAX_REQUEST_HEAD {
                return Err(Some(431));
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return Err(None),
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
    };
    match tokio::time::timeout(IO_TIMEOUT, read).await {
        Ok(Ok(())) => Ok(head),
        Ok(Err(status)) => Err(status),
        Err(_) => Err(Some(408)),
    }
}

/// Where the head ends (before the blank line), accepting bare LF line ends.
fn find_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The status for a request head, and whether the body is sent (not for HEAD).
fn route(head: &[u8]) -> (u16, bool) {
    let Ok(head) = std::str::from_utf8(head) else {
        return (400, true);
    };
    let line = head.lines().next().unwrap_or("");
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return (400, true);
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        return (400, true);
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    match (method, path) {
        ("GET", "/metrics") => (200, true),
        ("HEAD", "/metrics") => (200, false),
        (_, "/metrics") => (405, true),
        ("HEAD", _) => (404, false),
        _ => (404, true),
    }
}

async fn answer(mut stream: TcpStream, current: &watch::Receiver<String>) {
    let (status, with_body) = match read_head(&mut stream).await {
        Ok(head) => route(&head),
        Err(Some(status)) => (status, true),
        Err(None) => return,
    };
    let (reason, content_type, body) = match status {
        200 => ("OK", CONTENT_TYPE, current.borrow().clone()),
        404 => (
            "Not Found",
            "text/plain",
            "not found; try /metrics\n".into(),
        ),
        405 => (
            "Method Not Allowed",
            "text/plain",
            "GET or HEAD only\n".into(),
        ),
        408 => ("Request Timeout", "text/plain", "request timeout\n".into()),
        431 => (
            "Request Header Fields Too Large",
            "text/plain",
            "request too large\n".into(),
        ),
        _ => ("Bad Request", "text/plain", "bad request\n".into()),
    };
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status == 405 {
        response.push_str("Allow: GET, HEAD\r\n");
    }
    response.push_str("\r\n");
    if with_body {
        response.push_str(&body);
    }
    let written = tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
    if matches!(written, Ok(Ok(()))) {
        linger(&mut stream).await;
    }
}

/// Reads (and drops) what the client still sends until it closes, briefly: closing a socket with
/// unread data resets the connection, and the client may lose the answer before reading it.
async fn linger(stream: &mut TcpStream) {
    let mut sink = [0u8; 4096];
    let mut left: usize = 1 << 20;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Publishes the state to the configured places: renders it once, hands the text to the HTTP
/// server, writes the textfile. Errors are logged (once until they change), never returned:
/// metrics must not fail a deploy.
#[derive(Debug)]
pub struct Publisher {
    textfile: Option<PathBuf>,
    sender: Option<watch::Sender<String>>,
    last_error: Option<String>,
}

impl Publisher {
    /// Binds the listen address (an error here is worth failing the start for: the port is
    /// taken or not ours) and spawns the server with the state's text.
    pub async fn start(metrics: &Metrics, state: &State) -> Result<Publisher> {
        let mut publisher = Publisher {
            textfile: metrics.textfile.clone(),
            sender: None,
            last_error: None,
        };
        if let Some(addr) = metrics.listen {
            let listener = bind(addr).await?;
            let (sender, receiver) = watch::channel(String::new());
            tracing::info!(address = %listener.local_addr().unwrap_or(addr), "serving metrics at /metrics");
            tokio::spawn(serve(listener, receiver));
            publisher.sender = Some(sender);
        }
        publisher.publish(state);
        Ok(publisher)
    }

    /// Renders the state and publishes it.
    pub fn publish(&mut self, state: &State) {
        if self.sender.is_none() && self.textfile.is_none() {
            return;
        }
        let text = render(state, SystemTime::now());
        if let Some(path) = &self.textfile {
            match write_textfile(path, &text) {
                Ok(()) => self.last_error = None,
                Err(e) => {
                    let e = format!("{e:#}");
                    if self.last_error.as_ref() != Some(&e) {
                        tracing::warn!(error = %e, "metrics: cannot write the textfile");
                        self.last_error = Some(e);
                    }
                }
            }
        }
        if let Some(sender) = &self.sender {
            sender.send_replace(text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_the_table() {
        let ok = Metrics::from_config(&MetricsConfig {
            listen: Some("127.0.0.1:9945".into()),
            textfile: Some("/var/lib/prometheus-node-exporter-text/hcloud-nixos.prom".into()),
        })
        .unwrap();
        assert_eq!(ok.listen, Some("127.0.0.1:9945".parse().unwrap()));
        assert!(ok.is_enabled());
        assert!(
            !Metrics::from_config(&MetricsConfig::default())
                .unwrap()
                .is_enabled()
        );
        let v6 = MetricsConfig {
            listen: Some("[::1]:9945".into()),
            textfile: None,
        };
        assert!(Metrics::from_config(&v6).is_ok());
        let problems = Metrics::from_config(&MetricsConfig {
            listen: Some("localhost:9945".into()),
            textfile: Some("metrics.prom".into()),
        })
        .unwrap_err();
        assert_eq!(problems.len(), 2);
        assert!(problems[0].starts_with("metrics.listen: 'localhost:9945'"));
        assert!(problems[1].starts_with("metrics.textfile: 'metrics.prom' is not an absolute"));
        let problems = Metrics::from_config(&MetricsConfig {
            listen: Some("127.0.0.1".into()),
            textfile: Some("/var/lib/x/hcloud-nixos.txt".into()),
        })
        .unwrap_err();
        assert!(problems[0].starts_with("metrics.listen: '127.0.0.1'"));
        assert!(problems[1].contains("does not end in .prom"));
        assert!(problems.iter().all(|p| !p.contains('\n')));
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct File {
            metrics: MetricsConfig,
        }
        assert!(toml::from_str::<File>("[metrics]\nlisten = \"127.0.0.1:1\"\n").is_ok());
        assert!(toml::from_str::<File>("[metrics]\nlisen = \"127.0.0.1:1\"\n").is_err());
    }

    #[test]
    fn escapes_label_values() {
        assert_eq!(escape_label_value("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert_eq!(escape_label_value("plain-0.1.2"), "plain-0.1.2");
    }

    #[test]
    fn routes_requests() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: x"), (200, true));
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0"), (200, true));
        assert_eq!(route(b"HEAD /metrics HTTP/1.1"), (200, false));
        assert_eq!(route(b"POST /metrics HTTP/1.1"), (405, true));
        assert_eq!(route(b"GET / HTTP/1.1"), (404, true));
        assert_eq!(route(b"GET /metrics/ HTTP/1.1"), (404, true));
        assert_eq!(route(b"GET /metrics"), (400, true));
        assert_eq!(route(b"GET /metrics SPDY/3"), (400, true));
        assert_eq!(route(b"\xff\xfe"), (400, true));
        assert_eq!(route(b""), (400, true));
        assert_eq!(find_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"), Some(20));
        assert_eq!(find_end(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(find_end(b"GET / HTTP/1.1\r\n"), None);
    }

    #[test]
    fn textfile_needs_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("hcloud-nixos.prom");
        let e = format!("{:#}", write_textfile(&path, "x 1\n").unwrap_err());
        assert!(e.contains("does not exist"), "{e}");
        assert!(!dir.path().join("missing").exists());
    }
}

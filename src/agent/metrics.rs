//! Metrics in the Prometheus text exposition format (0.0.4): rendered from the agent's state,
//! served over HTTP on a configured address and/or written for node-exporter's textfile
//! collector.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::agent::lifecycle::state::State;

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The largest request head (request line and headers) the server reads; larger gets 431.
pub(crate) const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long a client may take to send a request head, and how long a kept-alive connection may
/// wait for its next request; then the connection is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once (each in a task of its own); further ones wait in the listen
/// backlog. Far below the agent's file descriptor limit, far above what scrapers need.
pub const MAX_CONNECTIONS: usize = 128;
/// How long one connection may stay open (a client that sends requests and never reads the
/// answers holds it no longer); then it is shut down gracefully.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
/// How long a graceful shutdown may take before the connection is dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// hyper's read buffer per connection: its minimum (hyper panics below 8 KiB).
const MAX_BUFFER: usize = 8 * 1024;

/// The `[metrics]` table as written. Unknown keys are errors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `metrics.listen`: the address and port to serve `/metrics` on (`127.0.0.1:9945`);
    /// None serves nothing.
    pub listen: Option<String>,
    /// `metrics.textfile`: a file the same text is written to after every cycle (for
    /// node-exporter's textfile collector); None writes none.
    pub textfile: Option<PathBuf>,
}

/// Validated metrics settings; both absent means no metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    pub(crate) listen: Option<SocketAddr>,
    pub(crate) textfile: Option<PathBuf>,
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

    #[cfg(test)]
    pub(crate) fn is_enabled(&self) -> bool {
        self.listen.is_some() || self.textfile.is_some()
    }
}

/// Escapes a label value: backslash, double quote and newline.
pub(crate) fn escape_label_value(value: &str) -> String {
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
    render_checks_and_releases(&mut out, state);
    render_deploys(&mut out, state);
    render_condition(&mut out, state);
    if let Ok(now) = now.duration_since(UNIX_EPOCH) {
        family(
            &mut out,
            "hcloud_nixos_metrics_rendered_timestamp_seconds",
            "gauge",
            "When this text was rendered (Unix time); old in a textfile means the agent stopped updating it.",
        )
        .sample(&[], now.as_secs());
    }
    out
}

/// The last check, and the releases that run and are wanted.
fn render_checks_and_releases(o: &mut String, state: &State) {
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
}

/// Deploys and rollbacks: totals and the last one.
fn render_deploys(o: &mut String, state: &State) {
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
}

/// What the agent's condition is now: a deploy under way, a reboot needed, failures, quarantine.
fn render_condition(o: &mut String, state: &State) {
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
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for metrics (metrics.listen)"))
}

/// Serves the latest text in `current` to `GET /metrics`, forever, each connection in a task of
/// its own (at most [`MAX_CONNECTIONS`] at once). Meant to be spawned; works on a current-thread
/// runtime. hyper does the HTTP/1.1: keep-alive, limits, answers to garbage.
pub(crate) async fn serve(listener: TcpListener, current: watch::Receiver<Bytes>) {
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
                    serve_connection(stream, current).await;
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

/// One connection: requests until the client closes it, idles or stalls past the timeouts,
/// or the connection reaches its lifetime (then it is shut down gracefully).
async fn serve_connection(stream: TcpStream, current: watch::Receiver<Bytes>) {
    let service = service_fn(move |req: Request<Incoming>| {
        let text = current.borrow().clone();
        let response = respond(req.method(), req.uri().path(), text);
        async move { Ok::<_, Infallible>(response) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_header_size(MAX_REQUEST_HEAD)
        .max_buf_size(MAX_BUFFER)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let ended = tokio::select! {
        r = connection.as_mut() => r,
        _ = tokio::time::sleep(CONNECTION_LIFETIME) => {
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(SHUTDOWN_GRACE, connection).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = ended {
        // A client that hangs up, stalls or sends garbage: its business, not the agent's.
        tracing::debug!(error = %e, "metrics: connection ended");
    }
}

/// The answer to a request: the text for `/metrics`, 404 elsewhere, 405 for other methods than
/// GET and HEAD (hyper leaves the body out for HEAD).
fn respond(method: &Method, path: &str, text: Bytes) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (method, path) {
        (&Method::GET | &Method::HEAD, "/metrics") => (StatusCode::OK, CONTENT_TYPE, text),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            Bytes::from_static(b"GET or HEAD only\n"),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found; try /metrics\n"),
        ),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    response
}

/// Publishes the state to the configured places: renders it once, hands the text to the HTTP
/// server, writes the textfile. Errors are logged (once until they change), never returned:
/// metrics must not fail a deploy.
#[derive(Debug)]
pub struct Publisher {
    textfile: Option<PathBuf>,
    sender: Option<watch::Sender<Bytes>>,
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
            let (sender, receiver) = watch::channel(Bytes::new());
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
            sender.send_replace(Bytes::from(text));
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
        let answer = |m: Method, path: &str| {
            let r = respond(&m, path, Bytes::from_static(b"x 1\n"));
            let ct = r.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .to_string();
            let allow = r
                .headers()
                .get(header::ALLOW)
                .map(|v| v.to_str().unwrap().to_string());
            (r.status().as_u16(), ct, allow)
        };
        assert_eq!(
            answer(Method::GET, "/metrics"),
            (200, CONTENT_TYPE.into(), None)
        );
        assert_eq!(
            answer(Method::HEAD, "/metrics"),
            (200, CONTENT_TYPE.into(), None)
        );
        assert_eq!(
            answer(Method::POST, "/metrics"),
            (405, "text/plain".into(), Some("GET, HEAD".into()))
        );
        assert_eq!(answer(Method::GET, "/").0, 404);
        assert_eq!(answer(Method::GET, "/metrics/").0, 404);
        assert_eq!(answer(Method::HEAD, "/other").0, 404);
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

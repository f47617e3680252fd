//! Stand-in for the FlakeHub API (`api.flakehub.com`), the endpoints `hcloud-nixos agent` and
//! `fh apply` use, over plain HTTP/1.1 on loopback:
//!
//! - `GET /version/{org}/{flake}/{constraint}`: the highest release matching a Cargo-style
//!   constraint (`*`, `0.1`, `~0.1.4`, `=0.1.7+rev-...`), as JSON shaped like
//!   `tests/fixtures/flakehub/version.example.json`;
//! - `GET /f/{org}/{flake}/releases`: every release, as a JSON array;
//! - `GET /f/{org}/{flake}/{constraint}/output/{attr}[?include_token=true]`:
//!   `{"attribute_path", "store_path"[, "token"]}`;
//! - `GET /cli/status`: `{"gh_name", "expires_at"}` for the token;
//! - `GET /_standin/counts`: request counters (not FlakeHub's; for the benchmark, no token needed).
//!
//! A test publishes and yanks releases, requires a bearer token (401 without it, or with another),
//! and switches faults on and off: down (an HTTP status, or connections closed unanswered), slow
//! answers, 404 for one flake. Requests are counted per endpoint.
//!
//! Shared by the integration tests (`#[path = "standins/flakehub.rs"] mod flakehub;`) and the
//! `flakehub-standin` example. Plain std threads; one request per connection.

#![allow(dead_code)] // each includer uses a different part of it

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// The endpoints, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    Version,
    Releases,
    Output,
    CliStatus,
    Other,
}

impl Endpoint {
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Version => "version",
            Endpoint::Releases => "releases",
            Endpoint::Output => "output",
            Endpoint::CliStatus => "cli-status",
            Endpoint::Other => "other",
        }
    }
}

/// FlakeHub being unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Down {
    /// Every request is answered with this status (503 for maintenance, 502 from a proxy).
    Status(u16),
    /// Every connection is closed right after the request is read, unanswered.
    Close,
}

/// One release of a flake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Full version with build metadata: `0.1.42+rev-<40 hex>`.
    pub version: String,
    /// `None`: the answer has `"published_at": null`.
    pub published_at: Option<String>,
    pub yanked_at: Option<String>,
    /// Output attribute path (`nixosConfigurations.web`) to store path.
    pub outputs: BTreeMap<String, String>,
}

impl Release {
    fn semver(&self) -> Option<semver::Version> {
        semver::Version::parse(&self.version).ok()
    }

    fn revision(&self) -> String {
        self.version
            .split_once("+rev-")
            .map(|(_, r)| r.to_string())
            .unwrap_or_default()
    }

    fn json(&self, org: &str, flake: &str) -> serde_json::Value {
        let v = self.semver();
        let simplified = v
            .as_ref()
            .map(|v| format!("{}.{}.{}", v.major, v.minor, v.patch))
            .unwrap_or_else(|| self.version.clone());
        let commit_count = v.as_ref().map(|v| v.patch).unwrap_or(0);
        serde_json::json!({
            "version": self.version,
            "simplified_version": simplified,
            "revision": self.revision(),
            "commit_count": commit_count,
            "description": format!("NixOS configurations of {org}"),
            "visibility": "private",
            "repo_url": format!("https://github.com/{org}/{flake}"),
            "source_subdirectory": null,
            "mirrored": false,
            "yanked_at": self.yanked_at,
            "readme": "# infra\n\nThe NixOS configurations of our servers.\n",
            "published_at": self.published_at,
            "updated_at": self.published_at,
            "download_url": format!(
                "https://api.flakehub.com/f/pinned/{org}/{flake}/{}/01234567-89ab-cdef-0123-456789abcdef/source.tar.gz",
                self.version
            ),
            "pretty_download_url": format!("https://flakehub.com/f/{org}/{flake}/{simplified}.tar.gz"),
        })
    }
}

/// `0.1.<n>+rev-<40 hex digits derived from n and salt>`: a rolling release's version.
pub fn rolling_version(n: u64, salt: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut rev = String::new();
    for i in 0..3u8 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (n, salt, i).hash(&mut h);
        rev.push_str(&format!("{:016x}", h.finish()));
    }
    rev.truncate(40);
    format!("0.1.{n}+rev-{rev}")
}

#[derive(Default)]
struct State {
    /// `org/flake` to its releases, in publishing order.
    flakes: HashMap<String, Vec<Release>>,
    /// The bearer token every request must carry; `None`: no check.
    token: Option<String>,
    down: Option<Down>,
    /// Down in this way while this file exists (a system under test "cuts the network" by
    /// creating it, and the system rolled back to removes it).
    down_while: Option<(std::path::PathBuf, Down)>,
    delay: Option<Duration>,
    /// `org/flake` answered 404 everywhere.
    not_found: HashSet<String>,
    /// `/version/...` also returns yanked releases (the agent must then look at `/releases`).
    version_serves_yanked: bool,
    counts: BTreeMap<Endpoint, usize>,
    unauthorized: usize,
    published: u64,
}

/// A running stand-in. Stops (and closes its listener) when dropped.
pub struct FlakeHub {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FlakeHub {
    /// Serves on `addr` (`127.0.0.1:0` for a free port), with no releases and no token check.
    pub fn start(addr: &str) -> io::Result<Self> {
        Self::serve(TcpListener::bind(addr)?)
    }

    /// Serves on `addr` inside the named network namespace (`/run/netns/NAME`): a thread joins
    /// the namespace and binds there (the socket stays in it), the usual loop serves it.
    pub fn start_in_netns(netns: &str, addr: &str) -> io::Result<Self> {
        let path = format!("/run/netns/{netns}");
        let addr = addr.to_string();
        let listener = thread::spawn(move || {
            let ns = std::fs::File::open(&path)?;
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            TcpListener::bind(&addr)
        })
        .join()
        .map_err(|_| io::Error::other("the binding thread panicked"))??;
        Self::serve(listener)
    }

    fn serve(listener: TcpListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (state2, stop2) = (state.clone(), stop.clone());
        let thread = thread::Builder::new()
            .name("flakehub-standin".into())
            .spawn(move || accept_loop(listener, state2, stop2))?;
        Ok(FlakeHub {
            addr,
            state,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`: the API URL for the agent's `flakehub.api_url` and for fh.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requires `Authorization: Bearer <token>` on every API request (`None`: anything goes).
    pub fn require_token(&self, token: Option<&str>) {
        self.lock().token = token.map(str::to_string);
    }

    /// Publishes `version` of `org/flake` with one output.
    pub fn publish(&self, org: &str, flake: &str, version: &str, attr: &str, store_path: &str) {
        let mut outputs = BTreeMap::new();
        outputs.insert(attr.to_string(), store_path.to_string());
        let mut s = self.lock();
        s.published += 1;
        // Distinct, increasing publication times.
        let published_at = format!(
            "2026-11-21T10:{:02}:{:02}Z",
            (s.published / 60) % 60,
            s.published % 60
        );
        s.flakes
            .entry(format!("{org}/{flake}"))
            .or_default()
            .push(Release {
                version: version.to_string(),
                published_at: Some(published_at),
                yanked_at: None,
                outputs,
            });
    }

    /// Yanks a published release; true when it existed.
    pub fn yank(&self, org: &str, flake: &str, version: &str) -> bool {
        let mut s = self.lock();
        let Some(releases) = s.flakes.get_mut(&format!("{org}/{flake}")) else {
            return false;
        };
        match releases.iter_mut().find(|r| r.version == version) {
            Some(r) => {
                r.yanked_at = Some("2026-11-21T12:00:00Z".into());
                true
            }
            None => false,
        }
    }

    pub fn set_down(&self, down: Option<Down>) {
        self.lock().down = down;
    }

    /// Down (`how`) whenever `file` exists; `None`: no such condition.
    pub fn set_down_while_file_exists(&self, file: Option<(&std::path::Path, Down)>) {
        self.lock().down_while = file.map(|(f, how)| (f.to_path_buf(), how));
    }

    /// Sets a published release's `published_at` (`None`: FlakeHub does not say); true when the
    /// release exists.
    pub fn set_published_at(
        &self,
        org: &str,
        flake: &str,
        version: &str,
        at: Option<&str>,
    ) -> bool {
        let mut s = self.lock();
        let Some(releases) = s.flakes.get_mut(&format!("{org}/{flake}")) else {
            return false;
        };
        match releases.iter_mut().find(|r| r.version == version) {
            Some(r) => {
                r.published_at = at.map(str::to_string);
                true
            }
            None => false,
        }
    }

    /// Every answer waits this long first.
    pub fn set_delay(&self, delay: Option<Duration>) {
        self.lock().delay = delay;
    }

    /// Answers 404 for everything about `org/flake` (as for a flake the token cannot see).
    pub fn set_not_found(&self, org: &str, flake: &str, on: bool) {
        let key = format!("{org}/{flake}");
        let mut s = self.lock();
        if on {
            s.not_found.insert(key);
        } else {
            s.not_found.remove(&key);
        }
    }

    pub fn set_version_serves_yanked(&self, on: bool) {
        self.lock().version_serves_yanked = on;
    }

    /// Requests received at `endpoint` (answered or not).
    pub fn requests(&self, endpoint: Endpoint) -> usize {
        self.lock().counts.get(&endpoint).copied().unwrap_or(0)
    }

    pub fn total_requests(&self) -> usize {
        self.lock().counts.values().sum()
    }

    /// Requests answered 401 for a missing or wrong token.
    pub fn unauthorized_requests(&self) -> usize {
        self.lock().unauthorized
    }

    pub fn reset_counts(&self) {
        let mut s = self.lock();
        s.counts.clear();
        s.unauthorized = 0;
    }

    /// Stops accepting; connections in progress finish on their own threads.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Serves until the process is killed (for the standalone example).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FlakeHub {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: TcpListener, state: Arc<Mutex<State>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let state = state.clone();
                let _ = thread::Builder::new()
                    .name("flakehub-conn".into())
                    .spawn(move || {
                        let _ = handle(stream, &state);
                    });
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// `%XX` decoding of one path segment (no `+` for space: this is a path).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The release of `releases` that `constraint` selects: the highest match, yanked ones only when
/// asked for exactly (or when `with_yanked`).
fn select<'a>(releases: &'a [Release], constraint: &str, with_yanked: bool) -> Option<&'a Release> {
    if let Some(exact) = constraint.strip_prefix('=')
        && exact.contains('+')
    {
        return releases.iter().find(|r| r.version == exact);
    }
    let exact = constraint.starts_with('=');
    let req = semver::VersionReq::parse(constraint).ok()?;
    releases
        .iter()
        .filter(|r| with_yanked || exact || r.yanked_at.is_none())
        .filter_map(|r| r.semver().map(|v| (v, r)))
        .filter(|(v, _)| req.matches(&semver::Version::new(v.major, v.minor, v.patch)))
        .max_by(|(a, _), (b, _)| a.cmp(b))
        .map(|(_, r)| r)
}

enum Answer {
    Json(u16, serde_json::Value),
    Close,
}

fn error(status: u16, message: &str) -> Answer {
    Answer::Json(
        status,
        serde_json::json!({ "code": status, "message": message }),
    )
}

fn handle(stream: TcpStream, state: &Mutex<State>) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    (&mut reader).take(8192).read_line(&mut request_line)?;
    let mut authorization = None;
    let mut user_agent = false;
    for _ in 0..100 {
        let mut line = String::new();
        let n = (&mut reader).take(8192).read_line(&mut line)?;
        if n == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim().to_string();
            match name.trim().to_ascii_lowercase().as_str() {
                "authorization" => authorization = Some(value),
                "user-agent" => user_agent = !value.is_empty(),
                _ => {}
            }
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let segments: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let endpoint = match segs.as_slice() {
        ["version", _, _, _] => Endpoint::Version,
        ["f", _, _, "releases"] => Endpoint::Releases,
        ["f", _, _, _, "output", _] => Endpoint::Output,
        ["cli", "status"] => Endpoint::CliStatus,
        _ => Endpoint::Other,
    };

    let (delay, answer) = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        if segs.as_slice() == ["_standin", "counts"] {
            let counts: BTreeMap<&str, usize> =
                s.counts.iter().map(|(e, n)| (e.name(), *n)).collect();
            let total: usize = s.counts.values().sum();
            let body = serde_json::json!({ "counts": counts, "total": total, "unauthorized": s.unauthorized });
            drop(s);
            return respond(stream, 200, &body);
        }
        *s.counts.entry(endpoint).or_default() += 1;
        let answer = answer(
            &mut s,
            &method,
            &segs,
            query,
            authorization.as_deref(),
            user_agent,
        );
        (s.delay, answer)
    };
    if let Some(d) = delay {
        thread::sleep(d);
    }
    match answer {
        Answer::Close => Ok(()),
        Answer::Json(status, body) => respond(stream, status, &body),
    }
}

fn answer(
    s: &mut State,
    method: &str,
    segs: &[&str],
    query: &str,
    authorization: Option<&str>,
    user_agent: bool,
) -> Answer {
    let down = s.down.or_else(|| {
        s.down_while
            .as_ref()
            .filter(|(f, _)| f.exists())
            .map(|(_, d)| *d)
    });
    match down {
        Some(Down::Close) => return Answer::Close,
        Some(Down::Status(code)) => return error(code, "FlakeHub is unavailable"),
        None => {}
    }
    if method != "GET" {
        return error(405, "method not allowed");
    }
    if !user_agent {
        return error(400, "a User-Agent header is required");
    }
    if let Some(token) = &s.token {
        let ok = authorization
            .and_then(|a| a.strip_prefix("Bearer "))
            .is_some_and(|t| t == token);
        if !ok {
            s.unauthorized += 1;
            return error(401, "Unauthorized");
        }
    }
    let key = |org: &str, flake: &str| format!("{org}/{flake}");
    match segs {
        ["cli", "status"] => Answer::Json(
            200,
            serde_json::json!({ "gh_name": "test-user", "expires_at": "2027-01-01T00:00:00Z" }),
        ),
        ["version", org, flake, constraint] => {
            let k = key(org, flake);
            let releases = match s.flakes.get(&k) {
                Some(r) if !s.not_found.contains(&k) => r,
                _ => return error(404, &format!("flake {k} not found")),
            };
            match select(releases, constraint, s.version_serves_yanked) {
                Some(r) => Answer::Json(200, r.json(org, flake)),
                None => error(404, &format!("no release of {k} matches '{constraint}'")),
            }
        }
        ["f", org, flake, "releases"] => {
            let k = key(org, flake);
            match s.flakes.get(&k) {
                Some(r) if !s.not_found.contains(&k) => Answer::Json(
                    200,
                    serde_json::Value::Array(r.iter().map(|r| r.json(org, flake)).collect()),
                ),
                _ => error(404, &format!("flake {k} not found")),
            }
        }
        ["f", org, flake, constraint, "output", attr] => {
            let k = key(org, flake);
            let releases = match s.flakes.get(&k) {
                Some(r) if !s.not_found.contains(&k) => r,
                _ => return error(404, &format!("flake {k} not found")),
            };
            let Some(release) = select(releases, constraint, false) else {
                return error(404, &format!("no release of {k} matches '{constraint}'"));
            };
            let Some(store_path) = release.outputs.get(*attr) else {
                return error(
                    404,
                    &format!("{k} {} has no output {attr}", release.version),
                );
            };
            let mut body = serde_json::json!({
                "attribute_path": attr,
                "store_path": store_path,
            });
            if query.split('&').any(|q| q == "include_token=true") {
                body["token"] = serde_json::Value::String(format!(
                    "flakehub_scoped_{}",
                    &release.revision().get(..12).unwrap_or("")
                ));
            }
            Answer::Json(200, body)
        }
        _ => error(404, "not found"),
    }
}

fn respond(mut out: TcpStream, status: u16, body: &serde_json::Value) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let body = serde_json::to_vec(body).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    out.write_all(head.as_bytes())?;
    out.write_all(&body)?;
    out.flush()?;
    out.shutdown(std::net::Shutdown::Write)
}

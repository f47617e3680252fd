//! Stand-in for the FlakeHub API (`api.flakehub.com`): the endpoints `hcloud-nixos agent` and
//! `fh apply` use, on loopback or inside a network namespace.
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
//! and switches faults on and off: down (an HTTP status, or connections closed unanswered; for
//! good, or while a file exists), slow answers (every endpoint, or one), 404 for one flake.
//! Requests are counted per endpoint and logged with whether they carried the token. Used by the
//! tests (`harness::flakehub`) and the `flakehub-standin` example.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::State as Shared;
use axum::http::{HeaderMap, Method, Uri, header};
use axum::response::Response;

use crate::http::{self, Router, Server};

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

/// One request the stand-in saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The path, as sent (percent-encoded).
    pub path: String,
    /// It carried the token the stand-in requires (true when none is required).
    pub authorized: bool,
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
    down_while: Option<(PathBuf, Down)>,
    /// Every answer waits this long first.
    delay: Option<Duration>,
    /// Answers at one endpoint wait this long first (instead of `delay`).
    endpoint_delays: HashMap<Endpoint, Duration>,
    /// `org/flake` answered 404 everywhere.
    not_found: HashSet<String>,
    /// `/version/...` also returns yanked releases (the agent must then look at `/releases`).
    version_serves_yanked: bool,
    counts: BTreeMap<Endpoint, usize>,
    unauthorized: usize,
    log: Vec<Seen>,
    published: u64,
}

/// A running stand-in. Stops (and closes its listener) when dropped.
pub struct FlakeHub {
    server: Server,
    state: Arc<Mutex<State>>,
}

impl FlakeHub {
    /// Serves on `addr` (`127.0.0.1:0` for a free port), with no releases and no token check.
    pub fn start(addr: &str) -> io::Result<Self> {
        Self::serve(http::listen(addr)?)
    }

    /// Serves on `addr` inside the named network namespace (`/run/netns/NAME`).
    pub fn start_in_netns(netns: &str, addr: &str) -> io::Result<Self> {
        Self::serve(http::listen_in_netns(netns, addr)?)
    }

    fn serve(listener: TcpListener) -> io::Result<Self> {
        let state = Arc::new(Mutex::new(State::default()));
        let app = Router::new().fallback(handle).with_state(state.clone());
        Ok(FlakeHub {
            server: Server::start(listener, app)?,
            state,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Serves the same releases on `addr` inside the named network namespace as well (a local
    /// cloud's one FlakeHub, reached from every server's own network); stops when dropped.
    pub fn also_serve_in_netns(&self, netns: &str, addr: &str) -> io::Result<Server> {
        let app = Router::new()
            .fallback(handle)
            .with_state(self.state.clone());
        Server::start(http::listen_in_netns(netns, addr)?, app)
    }

    /// `http://ADDR`: the API URL for the agent's `flakehub.api_url` and for fh.
    pub fn url(&self) -> String {
        self.server.url()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        crate::lock(&self.state)
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
        self.with_release(org, flake, version, |r| {
            r.yanked_at = Some("2026-11-21T12:00:00Z".into())
        })
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
        self.with_release(org, flake, version, |r| {
            r.published_at = at.map(str::to_string)
        })
    }

    fn with_release(
        &self,
        org: &str,
        flake: &str,
        version: &str,
        change: impl FnOnce(&mut Release),
    ) -> bool {
        let mut s = self.lock();
        let release = s
            .flakes
            .get_mut(&format!("{org}/{flake}"))
            .and_then(|releases| releases.iter_mut().find(|r| r.version == version));
        match release {
            Some(r) => {
                change(r);
                true
            }
            None => false,
        }
    }

    pub fn set_down(&self, down: Option<Down>) {
        self.lock().down = down;
    }

    /// Down (`how`) whenever `file` exists; `None`: no such condition.
    pub fn set_down_while_file_exists(&self, file: Option<(&Path, Down)>) {
        self.lock().down_while = file.map(|(f, how)| (f.to_path_buf(), how));
    }

    /// Every answer waits this long first.
    pub fn set_delay(&self, delay: Option<Duration>) {
        self.lock().delay = delay;
    }

    /// Answers at `endpoint` wait this long first (a FlakeHub slow to answer `/version`).
    pub fn set_endpoint_delay(&self, endpoint: Endpoint, delay: Option<Duration>) {
        let mut s = self.lock();
        match delay {
            Some(d) => s.endpoint_delays.insert(endpoint, d),
            None => s.endpoint_delays.remove(&endpoint),
        };
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

    /// Every request so far (but `/_standin/counts`), in order.
    pub fn request_log(&self) -> Vec<Seen> {
        self.lock().log.clone()
    }

    pub fn reset_counts(&self) {
        let mut s = self.lock();
        s.counts.clear();
        s.unauthorized = 0;
        s.log.clear();
    }

    /// Stops accepting: connections are refused from now on.
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Serves until the process is killed (for the standalone example).
    pub fn wait(self) {
        self.server.wait();
    }
}

/// `%XX` decoding of one path segment (no `+` for space: this is a path).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
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

/// What a request carried that the stand-in looks at.
struct Request<'a> {
    method: &'a Method,
    segments: Vec<String>,
    query: &'a str,
    authorization: Option<&'a str>,
    user_agent: bool,
}

impl Request<'_> {
    fn endpoint(&self) -> Endpoint {
        let segs: Vec<&str> = self.segments.iter().map(String::as_str).collect();
        match segs.as_slice() {
            ["version", _, _, _] => Endpoint::Version,
            ["f", _, _, "releases"] => Endpoint::Releases,
            ["f", _, _, _, "output", _] => Endpoint::Output,
            ["cli", "status"] => Endpoint::CliStatus,
            _ => Endpoint::Other,
        }
    }
}

async fn handle(
    Shared(state): Shared<Arc<Mutex<State>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let request = Request {
        method: &method,
        segments: uri
            .path()
            .trim_matches('/')
            .split('/')
            .map(percent_decode)
            .collect(),
        query: uri.query().unwrap_or(""),
        authorization: header(header::AUTHORIZATION),
        user_agent: header(header::USER_AGENT).is_some_and(|v| !v.trim().is_empty()),
    };
    let endpoint = request.endpoint();
    let (delay, answer) = {
        let mut s = crate::lock(&state);
        if request.segments == ["_standin", "counts"] {
            let counts: BTreeMap<&str, usize> =
                s.counts.iter().map(|(e, n)| (e.name(), *n)).collect();
            let total: usize = s.counts.values().sum();
            let body = serde_json::json!({ "counts": counts, "total": total, "unauthorized": s.unauthorized });
            return http::json(200, &body);
        }
        *s.counts.entry(endpoint).or_default() += 1;
        let authorized = s.token.as_ref().is_none_or(|token| {
            request
                .authorization
                .and_then(|a| a.strip_prefix("Bearer "))
                .is_some_and(|t| t == token)
        });
        s.log.push(Seen {
            path: uri.path().to_string(),
            authorized,
        });
        let answer = answer(&mut s, &request, authorized);
        let delay = s.endpoint_delays.get(&endpoint).copied().or(s.delay);
        (delay, answer)
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    match answer {
        Answer::Close => http::no_answer(),
        Answer::Json(status, body) => http::json(status, &body),
    }
}

fn answer(s: &mut State, request: &Request, authorized: bool) -> Answer {
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
    if request.method != Method::GET {
        return error(405, "method not allowed");
    }
    if !request.user_agent {
        return error(400, "a User-Agent header is required");
    }
    if !authorized {
        s.unauthorized += 1;
        return error(401, "Unauthorized");
    }
    let segs: Vec<&str> = request.segments.iter().map(String::as_str).collect();
    match segs.as_slice() {
        ["cli", "status"] => Answer::Json(
            200,
            serde_json::json!({ "gh_name": "test-user", "expires_at": "2027-01-01T00:00:00Z" }),
        ),
        ["version", org, flake, constraint] => match releases(s, org, flake) {
            Err(e) => e,
            Ok(releases) => match select(releases, constraint, s.version_serves_yanked) {
                Some(r) => Answer::Json(200, r.json(org, flake)),
                None => error(
                    404,
                    &format!("no release of {org}/{flake} matches '{constraint}'"),
                ),
            },
        },
        ["f", org, flake, "releases"] => match releases(s, org, flake) {
            Err(e) => e,
            Ok(releases) => Answer::Json(
                200,
                serde_json::Value::Array(releases.iter().map(|r| r.json(org, flake)).collect()),
            ),
        },
        ["f", org, flake, constraint, "output", attr] => match releases(s, org, flake) {
            Err(e) => e,
            Ok(releases) => output(releases, org, flake, constraint, attr, request.query),
        },
        _ => error(404, "not found"),
    }
}

/// The releases of `org/flake`, or the 404 FlakeHub gives for a flake it does not have (or
/// that the token may not see).
fn releases<'a>(s: &'a State, org: &str, flake: &str) -> Result<&'a [Release], Answer> {
    let key = format!("{org}/{flake}");
    match s.flakes.get(&key) {
        Some(r) if !s.not_found.contains(&key) => Ok(r),
        _ => Err(error(404, &format!("flake {key} not found"))),
    }
}

fn output(
    releases: &[Release],
    org: &str,
    flake: &str,
    constraint: &str,
    attr: &str,
    query: &str,
) -> Answer {
    let Some(release) = select(releases, constraint, false) else {
        return error(
            404,
            &format!("no release of {org}/{flake} matches '{constraint}'"),
        );
    };
    let Some(store_path) = release.outputs.get(attr) else {
        return error(
            404,
            &format!("{org}/{flake} {} has no output {attr}", release.version),
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

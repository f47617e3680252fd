//! A stateful stand-in for the Hetzner Cloud API on 127.0.0.1: servers, actions that progress over
//! time (and fail when told), SSH keys, snapshots with labels, label updates, label selectors,
//! pagination, rate-limit headers, injected errors and lost answers, answering with the payload
//! shapes of `tests/fixtures/hcloud-api/`. Served by the kit ([`crate::http`]) with keep-alive, as
//! the real API is.

mod catalog;
mod routes;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use serde_json::{Value, json};

use crate::http::Server;

pub use axum::http::Method;
pub use routes::matches_selector;

pub const TOKEN: &str = "test-token-0123456789";

/// The recorded Cloud API payloads (tests/fixtures/hcloud-api).
pub fn fixtures_dir() -> PathBuf {
    crate::fixture("hcloud-api")
}

/// A verbatim fixture document.
pub fn fixture(name: &str) -> Value {
    let p = fixtures_dir().join(name);
    let text = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("fixture {} missing: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

/// An error body in Hetzner's shape.
pub fn error_body(code: &str, message: &str) -> Value {
    json!({"error": {"code": code, "message": message, "details": {}}})
}

/// What an injected fault does to a request.
#[derive(Clone, Debug)]
pub enum Injected {
    /// This answer instead of the real one: nothing is done.
    Answer {
        status: u16,
        body: Value,
        headers: Vec<(String, String)>,
    },
    /// The connection closes without an answer, and nothing is done.
    DropRequest,
    /// The request is carried out, then the connection closes without an answer.
    LoseAnswer,
    /// The request is carried out; its answer announces more bytes than it sends, and the
    /// connection closes half-way through the body.
    TruncateAnswer,
}

/// A fault for the next `times` requests matching `method` and a path that contains
/// `path_contains` (the first match in the order the faults were added).
#[derive(Clone, Debug)]
pub struct Fault {
    pub method: Method,
    pub path_contains: String,
    pub times: u32,
    pub injected: Injected,
}

impl Fault {
    /// `status` with `body` instead of the real answer, once.
    pub fn answer(method: Method, path_contains: &str, status: u16, body: Value) -> Fault {
        Fault {
            method,
            path_contains: path_contains.to_string(),
            times: 1,
            injected: Injected::Answer {
                status,
                body,
                headers: vec![],
            },
        }
    }

    /// The connection closes before anything is done, without an answer, once.
    pub fn drop_request(method: Method, path_contains: &str) -> Fault {
        Fault {
            method,
            path_contains: path_contains.to_string(),
            times: 1,
            injected: Injected::DropRequest,
        }
    }

    /// The request is carried out and its answer lost, once.
    pub fn lose_answer(method: Method, path_contains: &str) -> Fault {
        Fault {
            method,
            path_contains: path_contains.to_string(),
            times: 1,
            injected: Injected::LoseAnswer,
        }
    }

    /// The request is carried out and its answer cut off in the middle, once.
    pub fn truncate_answer(method: Method, path_contains: &str) -> Fault {
        Fault {
            method,
            path_contains: path_contains.to_string(),
            times: 1,
            injected: Injected::TruncateAnswer,
        }
    }

    /// For this many requests.
    pub fn times(mut self, n: u32) -> Fault {
        self.times = n;
        self
    }

    /// With these headers (an injected answer only).
    pub fn headers(mut self, h: &[(&str, &str)]) -> Fault {
        if let Injected::Answer { headers, .. } = &mut self.injected {
            *headers = h
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        }
        self
    }
}

/// One request seen by the stand-in.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub at: Instant,
    pub body: Value,
}

#[derive(Clone, Debug)]
struct ActionRec {
    id: u64,
    command: String,
    resource: (u64, &'static str),
    started: Instant,
    duration: Duration,
    effect: Effect,
    applied: bool,
    fail: Option<(String, String)>,
}

#[derive(Clone, Debug)]
enum Effect {
    None,
    ServerStatus(u64, &'static str),
    ImageAvailable(u64),
}

#[derive(Clone, Debug)]
pub struct ServerRec {
    pub id: u64,
    pub name: String,
    pub status: String,
    pub labels: BTreeMap<String, String>,
    pub rescue_keys: Vec<u64>,
    pub body: Value,
}

#[derive(Clone, Debug)]
pub struct KeyRec {
    pub id: u64,
    pub name: String,
    pub public_key: String,
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
pub struct ImageRec {
    pub id: u64,
    pub status: String,
    pub description: String,
    pub architecture: String,
    pub labels: BTreeMap<String, String>,
    pub created_from: u64,
}

/// Everything the stand-in knows; tests read and change it.
pub struct Inner {
    next_id: u64,
    pub servers: BTreeMap<u64, ServerRec>,
    pub keys: BTreeMap<u64, KeyRec>,
    pub images: BTreeMap<u64, ImageRec>,
    actions: BTreeMap<u64, ActionRec>,
    pub requests: Vec<Seen>,
    pub faults: VecDeque<Fault>,
    /// Where the "rescue system" takes its authorized keys from (the test sshd's file).
    pub authorized_keys: Option<PathBuf>,
    /// How long after power-on the rescue system lets the key in.
    pub ssh_ready_after: Duration,
    /// How long each action runs.
    pub action_duration: Duration,
    /// Actions that end in an error: the next action with this command (`create_image`,
    /// `start_server`, ...) fails with this code and message, and has no effect.
    pub failing_actions: Vec<(String, String, String)>,
    /// Largest page; small values force pagination.
    pub max_per_page: usize,
    pub rate_remaining: u64,
    /// A local cloud's machines (`crate::cloud`): started servers boot there, and power-offs and
    /// deletions reach them. `None`: servers are bookkeeping alone (the upload tests).
    pub machines: Option<std::sync::mpsc::Sender<Event>>,
    /// When each server of a local cloud started running (the benchmark).
    pub running_at: BTreeMap<u64, std::time::SystemTime>,
}

/// What a local cloud's machines are told.
#[derive(Clone, Debug)]
pub enum Event {
    Boot(Boot),
    PowerOff(u64),
    Delete(u64),
}

/// A server to boot: what its metadata service serves.
#[derive(Clone, Debug)]
pub struct Boot {
    pub id: u64,
    pub name: String,
    pub user_data: String,
    /// The public keys of the SSH keys named in the create request.
    pub ssh_keys: Vec<String>,
}

impl Inner {
    fn send(&self, event: Event) {
        if let Some(tx) = &self.machines {
            let _ = tx.send(event);
        }
    }

    /// A machine has booted: the server runs, at these public addresses.
    pub fn set_running(&mut self, id: u64, ipv4: &str, ipv6_net: &str) {
        if let Some(srv) = self.servers.get_mut(&id) {
            srv.status = "running".into();
            self.running_at.insert(id, std::time::SystemTime::now());
            srv.body["status"] = json!("running");
            srv.body["public_net"]["ipv4"]["ip"] = json!(ipv4);
            srv.body["public_net"]["ipv4"]["dns_ptr"] = json!(format!("static.{ipv4}.local-cloud"));
            srv.body["public_net"]["ipv6"]["ip"] = json!(ipv6_net);
            srv.body["public_net"]["ipv6"]["dns_ptr"] = json!([]);
        }
    }

    /// A server's status (`off` when its machine did not boot or stopped).
    pub fn set_status(&mut self, id: u64, status: &str) {
        if let Some(srv) = self.servers.get_mut(&id) {
            srv.status = status.into();
            srv.body["status"] = json!(status);
        }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub fn mutating_requests(&self) -> Vec<String> {
        self.requests
            .iter()
            .filter(|r| r.method != Method::GET)
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    }

    pub fn count(&self, method: &Method, path_contains: &str) -> usize {
        self.requests
            .iter()
            .filter(|r| r.method == *method && r.path.contains(path_contains))
            .count()
    }

    /// Adds an available snapshot (for reuse and pagination tests).
    pub fn add_image(&mut self, arch: &str, labels: BTreeMap<String, String>) -> u64 {
        let id = self.id();
        self.images.insert(
            id,
            ImageRec {
                id,
                status: "available".into(),
                description: "seeded".into(),
                architecture: arch.into(),
                labels,
                created_from: 0,
            },
        );
        id
    }

    /// Adds an SSH key of the project (as `hcloud ssh-key create` would); returns its ID.
    pub fn add_ssh_key(&mut self, name: &str, public_key: &str) -> u64 {
        let id = self.id();
        self.keys.insert(
            id,
            KeyRec {
                id,
                name: name.into(),
                public_key: public_key.trim().into(),
                labels: BTreeMap::new(),
            },
        );
        id
    }

    /// Adds a server and a key as an earlier run would have left them.
    pub fn add_leftover(&mut self, name: &str, labels: BTreeMap<String, String>) -> (u64, u64) {
        let kid = self.id();
        self.keys.insert(
            kid,
            KeyRec {
                id: kid,
                name: name.into(),
                public_key: format!("ssh-ed25519 AAAA{kid}"),
                labels: labels.clone(),
            },
        );
        let sid = self.id();
        let body = routes::server_json(sid, name, "running", &labels);
        self.servers.insert(
            sid,
            ServerRec {
                id: sid,
                name: name.into(),
                status: "running".into(),
                labels,
                rescue_keys: vec![],
                body,
            },
        );
        (sid, kid)
    }

    /// The next fault for this request, if any (consumed).
    fn take_fault(&mut self, method: &Method, path: &str) -> Option<Injected> {
        let pos = self
            .faults
            .iter()
            .position(|f| f.method == *method && path.contains(&f.path_contains))?;
        let f = self.faults[pos].clone();
        if f.times <= 1 {
            self.faults.remove(pos);
        } else {
            self.faults[pos].times -= 1;
        }
        Some(f.injected)
    }
}

/// The stand-in server; stops when dropped.
pub struct HcloudApi {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<Inner>>,
    _server: Server,
}

impl HcloudApi {
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(Inner {
            next_id: 1000,
            servers: BTreeMap::new(),
            keys: BTreeMap::new(),
            images: BTreeMap::new(),
            actions: BTreeMap::new(),
            requests: Vec::new(),
            faults: VecDeque::new(),
            authorized_keys: None,
            ssh_ready_after: Duration::ZERO,
            action_duration: Duration::from_millis(300),
            failing_actions: Vec::new(),
            max_per_page: 50,
            rate_remaining: 3600,
            machines: None,
            running_at: BTreeMap::new(),
        }));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let listener = crate::http::listen("127.0.0.1:0").expect("a loopback port");
        let server = Server::start_keeping_alive(listener, app).expect("serve the Cloud API");
        HcloudApi {
            addr: server.addr(),
            state,
            _server: server,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut crate::lock(&self.state))
    }

    pub fn fault(&self, f: Fault) {
        self.with(|s| s.faults.push_back(f));
    }
}

async fn handle(
    State(state): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (response, injected) = {
        let mut s = crate::lock(&state);
        s.requests.push(Seen {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            at: Instant::now(),
            body: body.clone(),
        });
        routes::tick(&mut s);
        if headers.get("authorization").and_then(|v| v.to_str().ok())
            != Some(&format!("Bearer {TOKEN}"))
        {
            return routes::err(&mut s, 401, "unauthorized", "unable to authenticate");
        }
        let injected = s.take_fault(&method, &path);
        if let Some(Injected::Answer {
            status,
            body,
            headers,
        }) = injected
        {
            return routes::reply(&mut s, status, body, &headers);
        }
        if let Some(Injected::DropRequest) = injected {
            return crate::http::no_answer();
        }
        let response = routes::route(&mut s, &method, &path, &query, &body);
        (response, injected)
    };
    match injected {
        Some(Injected::LoseAnswer) => crate::http::no_answer(),
        Some(Injected::TruncateAnswer) => {
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 24)
                .await
                .unwrap_or_default();
            crate::http::truncated(&bytes)
        }
        _ => response,
    }
}

//! A stateful stand-in for the Hetzner Cloud API on 127.0.0.1: servers, actions that progress over
//! time, SSH keys, snapshots with labels, label selectors, pagination, rate-limit headers and
//! injected errors, answering with the payload shapes of `tests/fixtures/hcloud-api/`. Served by
//! the kit ([`crate::http`]) with keep-alive, as the real API is.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::http::Server;

pub use axum::http::Method;

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

/// An injected answer: the next `times` requests matching `method` and a path that contains
/// `path_contains` get `status` with `body` and `headers` instead of the real answer.
#[derive(Clone, Debug)]
pub struct Fault {
    pub method: Method,
    pub path_contains: String,
    pub status: u16,
    pub body: Value,
    pub headers: Vec<(String, String)>,
    pub times: u32,
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
    /// Largest page; small values force pagination.
    pub max_per_page: usize,
    pub rate_remaining: u64,
}

impl Inner {
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
        let body = server_json(sid, name, "running", &labels);
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
            max_per_page: 50,
            rate_remaining: 3600,
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
        f(&mut self.state.lock().unwrap())
    }

    pub fn fault(&self, f: Fault) {
        self.with(|s| s.faults.push_back(f));
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn server_json(id: u64, name: &str, status: &str, labels: &BTreeMap<String, String>) -> Value {
    let mut s = fixture("create_server.response201.example.json")["server"].clone();
    s["id"] = json!(id);
    s["name"] = json!(name);
    s["status"] = json!(status);
    s["labels"] = json!(labels);
    s["public_net"]["ipv4"]["ip"] = json!("127.0.0.1");
    s["rescue_enabled"] = json!(false);
    s
}

fn action_json(a: &ActionRec) -> Value {
    let done = a.started.elapsed() >= a.duration;
    let mut v = fixture("poweron_server.response201.example.json")["action"].clone();
    v["id"] = json!(a.id);
    v["command"] = json!(a.command);
    v["resources"] = json!([{"id": a.resource.0, "type": a.resource.1}]);
    match (&a.fail, done) {
        (_, false) => {
            let pct = (a.started.elapsed().as_millis() * 100 / a.duration.as_millis().max(1))
                .min(99) as u64;
            v["status"] = json!("running");
            v["progress"] = json!(pct);
            v["finished"] = Value::Null;
            v["error"] = Value::Null;
        }
        (None, true) => {
            v["status"] = json!("success");
            v["progress"] = json!(100);
            v["finished"] = json!("2016-01-30T23:56:00Z");
            v["error"] = Value::Null;
        }
        (Some((code, message)), true) => {
            v["status"] = json!("error");
            v["progress"] = json!(100);
            v["error"] = json!({"code": code, "message": message});
        }
    }
    v
}

fn image_json(i: &ImageRec) -> Value {
    let mut v = fixture("create_image.response201.example.json")["image"].clone();
    v["id"] = json!(i.id);
    v["status"] = json!(i.status);
    v["description"] = json!(i.description);
    v["architecture"] = json!(i.architecture);
    v["labels"] = json!(i.labels);
    v["created_from"] = json!({"id": i.created_from, "name": "upload"});
    v["deprecated"] = Value::Null;
    v
}

/// Completes due actions and applies their effects.
fn tick(s: &mut Inner) {
    let due: Vec<u64> = s
        .actions
        .values()
        .filter(|a| !a.applied && a.started.elapsed() >= a.duration)
        .map(|a| a.id)
        .collect();
    for id in due {
        let a = s.actions.get_mut(&id).unwrap();
        a.applied = true;
        match a.effect.clone() {
            Effect::None => {}
            Effect::ServerStatus(sid, st) => {
                if let Some(srv) = s.servers.get_mut(&sid) {
                    srv.status = st.into();
                    srv.body["status"] = json!(st);
                }
            }
            Effect::ImageAvailable(iid) => {
                if let Some(i) = s.images.get_mut(&iid) {
                    i.status = "available".into();
                }
            }
        }
    }
}

/// Evaluates a label selector (`k=v`, `k==v`, `k!=v`, `k`, `!k`, comma = and).
pub fn matches_selector(labels: &BTreeMap<String, String>, sel: &str) -> bool {
    sel.split(',').filter(|t| !t.is_empty()).all(|term| {
        let term = term.trim();
        if let Some((k, v)) = term.split_once("!=") {
            labels.get(k).map(|x| x != v).unwrap_or(true)
        } else if let Some((k, v)) = term.split_once("==") {
            labels.get(k) == Some(&v.to_string())
        } else if let Some((k, v)) = term.split_once('=') {
            labels.get(k) == Some(&v.to_string())
        } else if let Some(k) = term.strip_prefix('!') {
            !labels.contains_key(k)
        } else {
            labels.contains_key(term)
        }
    })
}

fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(h, 16).unwrap_or(b'?'));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn page<T: Clone>(items: Vec<T>, q: &[(String, String)], max: usize) -> (Vec<T>, Value) {
    let get = |k: &str| q.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
    let per_page = get("per_page")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(25)
        .clamp(1, 50)
        .min(max);
    let page = get("page")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let total = items.len();
    let last = total.div_ceil(per_page).max(1);
    let slice: Vec<T> = items
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect();
    let meta = json!({"pagination": {
        "page": page,
        "per_page": per_page,
        "previous_page": if page > 1 { json!(page - 1) } else { Value::Null },
        "next_page": if page < last { json!(page + 1) } else { Value::Null },
        "last_page": last,
        "total_entries": total,
    }});
    (slice, meta)
}

fn reply(s: &mut Inner, status: u16, body: Value, extra: &[(String, String)]) -> Response {
    s.rate_remaining = s.rate_remaining.saturating_sub(1).max(1);
    let mut h = HeaderMap::new();
    h.insert("ratelimit-limit", HeaderValue::from_static("3600"));
    h.insert(
        "ratelimit-remaining",
        HeaderValue::from_str(&s.rate_remaining.to_string()).unwrap(),
    );
    h.insert(
        "ratelimit-reset",
        HeaderValue::from_str(&(unix_now() + 3600 - s.rate_remaining).to_string()).unwrap(),
    );
    for (k, v) in extra {
        h.insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let st = StatusCode::from_u16(status).unwrap();
    if status == 204 {
        return (st, h).into_response();
    }
    (st, h, axum::Json(body)).into_response()
}

fn err(s: &mut Inner, status: u16, code: &str, message: &str) -> Response {
    reply(s, status, error_body(code, message), &[])
}

fn new_action(
    s: &mut Inner,
    command: &str,
    resource: (u64, &'static str),
    effect: Effect,
) -> Value {
    let id = s.id();
    let a = ActionRec {
        id,
        command: command.into(),
        resource,
        started: Instant::now(),
        duration: s.action_duration,
        effect,
        applied: false,
        fail: None,
    };
    let v = action_json(&a);
    s.actions.insert(id, a);
    v
}

fn labels_of(v: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(v["labels"].clone()).unwrap_or_default()
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
    let mut s = state.lock().unwrap();
    s.requests.push(Seen {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        at: Instant::now(),
        body: body.clone(),
    });
    tick(&mut s);

    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {TOKEN}"))
    {
        return err(&mut s, 401, "unauthorized", "unable to authenticate");
    }

    if let Some(pos) = s
        .faults
        .iter()
        .position(|f| f.method == method && path.contains(&f.path_contains))
    {
        let f = s.faults[pos].clone();
        if f.times <= 1 {
            s.faults.remove(pos);
        } else {
            s.faults[pos].times -= 1;
        }
        return reply(&mut s, f.status, f.body, &f.headers);
    }

    let Some(rest) = path.strip_prefix("/v1") else {
        return err(&mut s, 404, "not_found", "no such endpoint");
    };
    let parts: Vec<&str> = rest.trim_matches('/').split('/').collect();
    let q = query_pairs(&query);
    let qget = |k: &str| q.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
    let max = s.max_per_page;

    match (method.clone(), parts.as_slice()) {
        (Method::POST, ["ssh_keys"]) => {
            let name = body["name"].as_str().unwrap_or("").to_string();
            let pk = body["public_key"].as_str().unwrap_or("").to_string();
            if name.is_empty() || !pk.starts_with("ssh-") {
                let b = fixture("error.invalid_input.example.json");
                return reply(&mut s, 422, b, &[]);
            }
            if s.keys
                .values()
                .any(|k| k.name == name || k.public_key == pk)
            {
                let b = fixture("error.uniqueness_error.example.json");
                return reply(&mut s, 409, b, &[]);
            }
            let id = s.id();
            let labels = labels_of(&body);
            s.keys.insert(
                id,
                KeyRec {
                    id,
                    name: name.clone(),
                    public_key: pk.clone(),
                    labels: labels.clone(),
                },
            );
            let v = json!({"ssh_key": {"id": id, "name": name, "fingerprint": "b7:2f:30:a0:2f:6c:58:6c:21:04:58:61:ba:06:3b:2f", "public_key": pk, "labels": labels, "created": "2016-01-30T23:50:00Z"}});
            reply(&mut s, 201, v, &[])
        }
        (Method::GET, ["ssh_keys"]) => {
            let sel = qget("label_selector").unwrap_or_default();
            let items: Vec<Value> = s
                .keys
                .values()
                .filter(|k| matches_selector(&k.labels, &sel))
                .map(|k| json!({"id": k.id, "name": k.name, "public_key": k.public_key, "labels": k.labels, "created": "2016-01-30T23:50:00Z"}))
                .collect();
            let (items, meta) = page(items, &q, max);
            reply(&mut s, 200, json!({"ssh_keys": items, "meta": meta}), &[])
        }
        (Method::DELETE, ["ssh_keys", id]) => {
            let id: u64 = id.parse().unwrap_or(0);
            if s.keys.remove(&id).is_some() {
                reply(&mut s, 204, Value::Null, &[])
            } else {
                err(&mut s, 404, "not_found", "SSH key not found")
            }
        }
        (Method::POST, ["servers"]) => {
            let name = body["name"].as_str().unwrap_or("").to_string();
            if name.is_empty()
                || body["server_type"].as_str().is_none()
                || body["image"].as_str().is_none()
            {
                let b = fixture("error.invalid_input.example.json");
                return reply(&mut s, 422, b, &[]);
            }
            if body.get("datacenter").is_some() {
                let b = fixture("error.deprecated_api_endpoint.example.json");
                return reply(&mut s, 410, b, &[]);
            }
            if s.servers.values().any(|x| x.name == name) {
                let b = fixture("error.uniqueness_error.example.json");
                return reply(&mut s, 409, b, &[]);
            }
            let id = s.id();
            let labels = labels_of(&body);
            let start = body["start_after_create"].as_bool().unwrap_or(true);
            let mut sbody = server_json(id, &name, "initializing", &labels);
            let st = body["server_type"].as_str().unwrap_or("");
            sbody["server_type"]["name"] = json!(st);
            sbody["server_type"]["architecture"] =
                json!(if st.starts_with("cax") { "arm" } else { "x86" });
            s.servers.insert(
                id,
                ServerRec {
                    id,
                    name,
                    status: "initializing".into(),
                    labels,
                    rescue_keys: vec![],
                    body: sbody.clone(),
                },
            );
            let a = new_action(
                &mut s,
                "create_server",
                (id, "server"),
                Effect::ServerStatus(id, if start { "running" } else { "off" }),
            );
            let mut v = fixture("create_server.response201.example.json");
            v["server"] = sbody;
            v["action"] = a;
            v["next_actions"] = json!([]);
            reply(&mut s, 201, v, &[])
        }
        (Method::GET, ["servers"]) => {
            let sel = qget("label_selector").unwrap_or_default();
            let items: Vec<Value> = s
                .servers
                .values()
                .filter(|x| matches_selector(&x.labels, &sel))
                .map(|x| x.body.clone())
                .collect();
            let (items, meta) = page(items, &q, max);
            reply(&mut s, 200, json!({"servers": items, "meta": meta}), &[])
        }
        (Method::GET, ["servers", id]) => {
            let id: u64 = id.parse().unwrap_or(0);
            match s.servers.get(&id) {
                Some(x) => {
                    let v = json!({"server": x.body});
                    reply(&mut s, 200, v, &[])
                }
                None => err(&mut s, 404, "not_found", "server not found"),
            }
        }
        (Method::DELETE, ["servers", id]) => {
            let id: u64 = id.parse().unwrap_or(0);
            if s.servers.remove(&id).is_some() {
                clear_authorized_keys(&s);
                let a = new_action(&mut s, "delete_server", (id, "server"), Effect::None);
                reply(&mut s, 200, json!({"action": a}), &[])
            } else {
                err(&mut s, 404, "not_found", "server not found")
            }
        }
        (Method::POST, ["servers", id, "actions", action]) => {
            let id: u64 = id.parse().unwrap_or(0);
            let Some(srv) = s.servers.get(&id).cloned() else {
                return err(&mut s, 404, "not_found", "server not found");
            };
            if s.actions
                .values()
                .any(|a| a.resource.0 == id && a.started.elapsed() < a.duration)
            {
                return err(
                    &mut s,
                    423,
                    "locked",
                    "the server is locked: an action is running",
                );
            }
            match *action {
                "enable_rescue" => {
                    let keys: Vec<u64> = body["ssh_keys"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
                        .unwrap_or_default();
                    if body["type"] != "linux64" || keys.iter().any(|k| !s.keys.contains_key(k)) {
                        let b = fixture("error.invalid_input.example.json");
                        return reply(&mut s, 422, b, &[]);
                    }
                    let x = s.servers.get_mut(&id).unwrap();
                    x.rescue_keys = keys;
                    x.body["rescue_enabled"] = json!(true);
                    let a = new_action(&mut s, "enable_rescue", (id, "server"), Effect::None);
                    let mut v = fixture("enable_rescue.response201.example.json");
                    v["action"] = a;
                    reply(&mut s, 201, v, &[])
                }
                "poweron" => {
                    if srv.body["rescue_enabled"] == json!(true) {
                        let pubkeys: Vec<String> = srv
                            .rescue_keys
                            .iter()
                            .filter_map(|k| s.keys.get(k).map(|k| k.public_key.clone()))
                            .collect();
                        if let Some(path) = s.authorized_keys.clone() {
                            let delay = s.ssh_ready_after;
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let _ = std::fs::write(&path, pubkeys.join("\n") + "\n");
                            });
                        }
                    }
                    let a = new_action(
                        &mut s,
                        "start_server",
                        (id, "server"),
                        Effect::ServerStatus(id, "running"),
                    );
                    reply(&mut s, 201, json!({"action": a}), &[])
                }
                "poweroff" => {
                    clear_authorized_keys(&s);
                    let a = new_action(
                        &mut s,
                        "stop_server",
                        (id, "server"),
                        Effect::ServerStatus(id, "off"),
                    );
                    reply(&mut s, 201, json!({"action": a}), &[])
                }
                "create_image" => {
                    if body["type"] != "snapshot" {
                        let b = fixture("error.invalid_input.example.json");
                        return reply(&mut s, 422, b, &[]);
                    }
                    let iid = s.id();
                    let arch = srv.body["server_type"]["architecture"]
                        .as_str()
                        .unwrap_or("x86")
                        .to_string();
                    let img = ImageRec {
                        id: iid,
                        status: "creating".into(),
                        description: body["description"].as_str().unwrap_or("").into(),
                        architecture: arch,
                        labels: labels_of(&body),
                        created_from: id,
                    };
                    let ij = image_json(&img);
                    s.images.insert(iid, img);
                    let a = new_action(
                        &mut s,
                        "create_image",
                        (id, "server"),
                        Effect::ImageAvailable(iid),
                    );
                    reply(&mut s, 201, json!({"image": ij, "action": a}), &[])
                }
                _ => err(&mut s, 404, "not_found", "no such action"),
            }
        }
        (Method::GET, ["actions", id]) => {
            let id: u64 = id.parse().unwrap_or(0);
            match s.actions.get(&id) {
                Some(a) => {
                    let v = json!({"action": action_json(a)});
                    reply(&mut s, 200, v, &[])
                }
                None => err(&mut s, 404, "not_found", "action not found"),
            }
        }
        (Method::GET, ["images"]) => {
            let sel = qget("label_selector").unwrap_or_default();
            let ty = qget("type");
            let arch = qget("architecture");
            let items: Vec<Value> = s
                .images
                .values()
                .filter(|i| matches_selector(&i.labels, &sel))
                .filter(|_| ty.as_deref().is_none_or(|t| t == "snapshot"))
                .filter(|i| arch.as_deref().is_none_or(|a| a == i.architecture))
                .map(image_json)
                .collect();
            let (items, meta) = page(items, &q, max);
            reply(&mut s, 200, json!({"images": items, "meta": meta}), &[])
        }
        (Method::GET, ["images", id]) => {
            let id: u64 = id.parse().unwrap_or(0);
            match s.images.get(&id) {
                Some(i) => {
                    let v = json!({"image": image_json(i)});
                    reply(&mut s, 200, v, &[])
                }
                None => err(&mut s, 404, "not_found", "image not found"),
            }
        }
        _ => err(&mut s, 404, "not_found", "no such endpoint"),
    }
}

fn clear_authorized_keys(s: &Inner) {
    if let Some(p) = &s.authorized_keys {
        let _ = std::fs::write(p, "");
    }
}

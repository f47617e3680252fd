//! Stand-in for Hetzner's metadata service: serves documents (the fixtures in
//! `tests/fixtures/hetzner-metadata/`) under `/hetzner/v1/` and injects faults per path.
//!
//! As the real service: `metadata/<key>` is derived from the `metadata` document (scalars as
//! text, `public-keys` as a JSON array, mappings and lists as their YAML text), a server without
//! user-data gets `204 No Content`, an unknown path `404`, anything but `GET` and `HEAD` `405`.
//! Used by the tests (`harness::metadata`) and the `metadata-standin` example.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::{ConnectInfo, State as Shared};
use axum::http::{Method, Uri};
use axum::response::Response;

use crate::http::{self, FaultQueue, Router, Server};

pub use crate::http::Fault;

/// The prefix every path is served under.
pub const PREFIX: &str = "/hetzner/v1/";

/// The documents the stand-in serves, keyed by path below [`PREFIX`] (`metadata`,
/// `metadata/private-networks`, `userdata`, ...). `metadata/<key>` is derived from `metadata`
/// unless set explicitly.
#[derive(Debug, Default, Clone)]
pub struct Documents {
    pub docs: HashMap<String, Vec<u8>>,
}

impl Documents {
    /// Documents from fixture files (as they are: YAML comments are part of what is served).
    pub fn from_files(
        metadata: &Path,
        private_networks: Option<&Path>,
        userdata: Option<&Path>,
    ) -> io::Result<Self> {
        let mut docs = HashMap::new();
        docs.insert("metadata".to_string(), std::fs::read(metadata)?);
        // A server without private networks gets an empty list.
        let private = match private_networks {
            Some(p) => std::fs::read(p)?,
            None => b"[]\n".to_vec(),
        };
        docs.insert("metadata/private-networks".to_string(), private);
        if let Some(p) = userdata {
            docs.insert("userdata".to_string(), std::fs::read(p)?);
        }
        Ok(Documents { docs })
    }
}

#[derive(Default)]
struct State {
    docs: HashMap<String, Vec<u8>>,
    /// Paths set to `None`: answered 404 even if derivable.
    missing: Vec<String>,
    faults: FaultQueue,
    counts: HashMap<String, usize>,
    /// Source address of every request, in order.
    clients: Vec<IpAddr>,
}

/// A running stand-in. Stops (and closes its listener) when dropped.
pub struct MetadataServer {
    server: Server,
    state: Arc<Mutex<State>>,
}

impl MetadataServer {
    /// Serves `docs` on `addr` (use `127.0.0.1:0` for a free port).
    pub fn start(addr: &str, docs: Documents) -> io::Result<Self> {
        Self::serve(http::listen(addr)?, docs)
    }

    /// Serves `docs` on `addr` inside the named network namespace (`/run/netns/NAME`).
    pub fn start_in_netns(netns: &str, addr: &str, docs: Documents) -> io::Result<Self> {
        Self::serve(http::listen_in_netns(netns, addr)?, docs)
    }

    fn serve(listener: TcpListener, docs: Documents) -> io::Result<Self> {
        let state = Arc::new(Mutex::new(State {
            docs: docs.docs,
            ..State::default()
        }));
        let app = Router::new().fallback(handle).with_state(state.clone());
        Ok(MetadataServer {
            server: Server::start(listener, app)?,
            state,
        })
    }

    /// A port on 127.0.0.1 where nothing listens: connections are refused.
    pub fn refused_addr() -> SocketAddr {
        http::refused_addr()
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://ADDR/hetzner/v1/`, as the client and the binary take it.
    pub fn base_url(&self) -> String {
        format!("http://{}{PREFIX}", self.addr())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        crate::lock(&self.state)
    }

    /// Replaces (Some) or removes (None: 404) the document at `path` (below the prefix).
    pub fn set_document(&self, path: &str, body: Option<&[u8]>) {
        let mut s = self.lock();
        s.missing.retain(|p| p != path);
        match body {
            Some(b) => {
                s.docs.insert(path.to_string(), b.to_vec());
            }
            None => {
                s.docs.remove(path);
                s.missing.push(path.to_string());
            }
        }
    }

    /// Queues `fault` for the next request of `path`.
    pub fn push_fault(&self, path: &str, fault: Fault) {
        self.lock().faults.push(path, fault);
    }

    /// Answers the next `times` requests of `path` with HTTP `status`.
    pub fn fail_next(&self, path: &str, status: u16, times: usize) {
        for _ in 0..times {
            self.push_fault(path, Fault::Status(status));
        }
    }

    /// Requests received for `path` (below the prefix; any request, answered or not).
    pub fn requests(&self, path: &str) -> usize {
        self.lock().counts.get(path).copied().unwrap_or(0)
    }

    /// Requests received for all paths.
    pub fn total_requests(&self) -> usize {
        self.lock().counts.values().sum()
    }

    /// Source addresses of all requests so far, in order.
    pub fn clients(&self) -> Vec<IpAddr> {
        self.lock().clients.clone()
    }

    pub fn reset_counts(&self) {
        let mut s = self.lock();
        s.counts.clear();
        s.clients.clear();
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

/// One request: counted, then answered (or faulted, with the fault queued for its path).
async fn handle(
    Shared(state): Shared<Arc<Mutex<State>>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
) -> Response {
    let Some(path) = uri.path().strip_prefix(PREFIX) else {
        return http::text(404, "not found\n");
    };
    let path = path.trim_end_matches('/').to_string();
    let (fault, body) = {
        let mut s = crate::lock(&state);
        *s.counts.entry(path.clone()).or_default() += 1;
        s.clients.push(peer.ip());
        (s.faults.next(&path), lookup(&s, &path))
    };
    if method != Method::GET && method != Method::HEAD {
        return http::text(405, "method not allowed\n");
    }
    let normal = match &body {
        None => http::text(404, "not found\n"),
        // The real service answers 204 for a server without user-data.
        Some((_, b)) if b.is_empty() && path == "userdata" => http::text(204, ""),
        Some((content_type, b)) => http::answer(200, content_type, b.clone()),
    };
    match fault {
        None => normal,
        Some(fault) => {
            fault
                .answer(normal, body.as_ref().map(|(_, b)| &b[..]))
                .await
        }
    }
}

/// The document at `path`, with its content type: explicit documents first, then the
/// `metadata/<key>` views derived from the `metadata` document.
fn lookup(s: &State, path: &str) -> Option<(&'static str, Vec<u8>)> {
    if s.missing.iter().any(|p| p == path) {
        return None;
    }
    if let Some(b) = s.docs.get(path) {
        let content_type = if path == "metadata/public-keys" {
            "application/json"
        } else {
            "text/plain"
        };
        return Some((content_type, b.clone()));
    }
    if path == "userdata" {
        return Some(("text/plain", Vec::new()));
    }
    let key = path.strip_prefix("metadata/")?;
    let meta = s.docs.get("metadata")?;
    derived(&String::from_utf8_lossy(meta), key)
}

/// `metadata/<key>`: scalars as plain text, `public-keys` as a JSON array, mappings and lists
/// as the YAML text of that key in the `metadata` document.
fn derived(meta: &str, key: &str) -> Option<(&'static str, Vec<u8>)> {
    let doc: serde_json::Value = serde_saphyr::from_str(meta).ok()?;
    let value = doc.as_object()?.get(key)?;
    match value {
        serde_json::Value::String(s) => Some(("text/plain", s.clone().into_bytes())),
        serde_json::Value::Number(n) => Some(("text/plain", n.to_string().into_bytes())),
        serde_json::Value::Bool(b) => Some(("text/plain", b.to_string().into_bytes())),
        serde_json::Value::Null => Some(("text/plain", Vec::new())),
        _ if key == "public-keys" => {
            let list: Vec<serde_json::Value> = match value {
                serde_json::Value::Array(a) => a.clone(),
                other => vec![other.clone()],
            };
            Some((
                "application/json",
                serde_json::to_vec(&list).unwrap_or_default(),
            ))
        }
        _ => Some(("text/plain", yaml_block(meta, key)?.into_bytes())),
    }
}

/// The lines below a top-level `key:` of a YAML document, dedented.
fn yaml_block(doc: &str, key: &str) -> Option<String> {
    let mut lines = doc.lines();
    lines.find(|l| l.trim_end() == format!("{key}:"))?;
    let block: Vec<&str> = lines
        .take_while(|l| l.is_empty() || l.starts_with(' ') || l.starts_with('-'))
        .collect();
    let indent = block
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let mut out = String::new();
    for l in block {
        out.push_str(l.get(indent..).unwrap_or(""));
        out.push('\n');
    }
    Some(out)
}

//! Stand-in for Hetzner's metadata service: serves fixture documents under `/hetzner/v1/` over
//! HTTP/1.1 and injects faults (slow answers, status codes, truncated, oversized or no answers).
//!
//! Shared by the integration tests (`#[path = "standins/metadata_server.rs"] mod metadata_server;`)
//! and the `metadata-standin` example. Plain std threads; one request per connection.

#![allow(dead_code)] // each includer uses a different part of it

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// The prefix every path is served under.
pub const PREFIX: &str = "/hetzner/v1/";

/// One fault, applied to one request of one path (queued per path, consumed in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Wait this long before answering (normally, or with the next fault if combined by queueing).
    Delay(Duration),
    /// Answer with this HTTP status and a short text body.
    Status(u16),
    /// Announce the full Content-Length, send only the first half of the body, then close.
    Truncate,
    /// Answer 200 with this many bytes; `chunked` hides the length until it has been sent.
    Oversized { bytes: usize, chunked: bool },
    /// Close the connection after reading the request, without answering.
    Close,
}

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
    faults: HashMap<String, VecDeque<Fault>>,
    counts: HashMap<String, usize>,
    /// Source address of every request, in order.
    clients: Vec<IpAddr>,
}

/// A running stand-in. Stops (and closes its listener) when dropped.
pub struct MetadataServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetadataServer {
    /// Serves `docs` on `addr` (use `127.0.0.1:0` for a free port).
    pub fn start(addr: &str, docs: Documents) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        Self::serve(listener, docs)
    }

    /// Serves `docs` on `addr` inside the named network namespace (`/run/netns/NAME`): the
    /// listening thread joins the namespace before binding, so the socket lives there.
    pub fn start_in_netns(netns: &str, addr: &str, docs: Documents) -> io::Result<Self> {
        let path = format!("/run/netns/{netns}");
        let addr = addr.to_string();
        // The thread that binds must be the one that joined the namespace; it also runs the loop.
        let (tx, rx) = std::sync::mpsc::channel();
        let state = Arc::new(Mutex::new(State {
            docs: docs.docs,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (state2, stop2) = (state.clone(), stop.clone());
        let thread = thread::Builder::new()
            .name(format!("standin-{netns}"))
            .spawn(move || {
                let bound = (|| {
                    let ns = std::fs::File::open(&path)?;
                    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(io::Error::from)?;
                    let l = TcpListener::bind(&addr)?;
                    l.set_nonblocking(true)?;
                    Ok::<_, io::Error>(l)
                })();
                match bound {
                    Ok(l) => {
                        let _ = tx.send(l.local_addr());
                        accept_loop(l, state2, stop2);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })?;
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| io::Error::other("stand-in thread did not start"))??;
        Ok(MetadataServer {
            addr,
            state,
            stop,
            thread: Some(thread),
        })
    }

    fn serve(listener: TcpListener, docs: Documents) -> io::Result<Self> {
        // Non-blocking accept with a short sleep: stopping needs no wake-up connection, which
        // would not work from outside a namespace.
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            docs: docs.docs,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (state2, stop2) = (state.clone(), stop.clone());
        let thread = thread::Builder::new()
            .name("metadata-standin".into())
            .spawn(move || accept_loop(listener, state2, stop2))?;
        Ok(MetadataServer {
            addr,
            state,
            stop,
            thread: Some(thread),
        })
    }

    /// A port on 127.0.0.1 where nothing listens (bound, noted and closed): connections are
    /// refused.
    pub fn refused_addr() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        l.local_addr().expect("local_addr")
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR/hetzner/v1/`, as the client and the binary take it.
    pub fn base_url(&self) -> String {
        format!("http://{}{PREFIX}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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
        self.lock()
            .faults
            .entry(path.to_string())
            .or_default()
            .push_back(fault);
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

impl Drop for MetadataServer {
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
                    .name("standin-conn".into())
                    .spawn(move || {
                        let _ = handle(stream, &state);
                    });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5))
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Reads one request and answers it (or injects the queued fault).
fn handle(stream: TcpStream, state: &Mutex<State>) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    // Bounded header read: at most 100 lines of at most 8 KiB.
    (&mut reader).take(8192).read_line(&mut request_line)?;
    for _ in 0..100 {
        let mut line = String::new();
        let n = (&mut reader).take(8192).read_line(&mut line)?;
        if n == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("");
    let target = target.split('?').next().unwrap_or("");
    let mut out = stream;

    let Some(path) = target.strip_prefix(PREFIX) else {
        return respond(&mut out, 404, "text/plain", b"not found\n", &method);
    };
    let path = path.trim_end_matches('/').to_string();

    let (fault, body) = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        *s.counts.entry(path.clone()).or_default() += 1;
        if let Ok(peer) = out.peer_addr() {
            s.clients.push(peer.ip());
        }
        let fault = s.faults.get_mut(&path).and_then(VecDeque::pop_front);
        (fault, lookup(&s, &path))
    };
    if method != "GET" && method != "HEAD" {
        return respond(
            &mut out,
            405,
            "text/plain",
            b"method not allowed\n",
            &method,
        );
    }
    let fault = match fault {
        Some(Fault::Delay(d)) => {
            thread::sleep(d);
            None
        }
        other => other,
    };
    match fault {
        None | Some(Fault::Delay(_)) => match body {
            None => respond(&mut out, 404, "text/plain", b"not found\n", &method),
            // The real service answers 204 for a server without user-data.
            Some((_, b)) if b.is_empty() && path == "userdata" => {
                respond(&mut out, 204, "text/plain", b"", &method)
            }
            Some((ct, b)) => respond(&mut out, 200, ct, &b, &method),
        },
        Some(Fault::Status(code)) => {
            let text = format!("injected HTTP {code}\n");
            respond(&mut out, code, "text/plain", text.as_bytes(), &method)
        }
        Some(Fault::Close) => Ok(()),
        Some(Fault::Truncate) => {
            let b = body.map(|(_, b)| b).unwrap_or_else(|| b"x".repeat(64));
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                b.len() + 16
            );
            out.write_all(head.as_bytes())?;
            out.write_all(&b[..b.len() / 2])?;
            out.flush()?;
            out.shutdown(std::net::Shutdown::Both)
        }
        Some(Fault::Oversized { bytes, chunked }) => {
            let head = if chunked {
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_string()
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {bytes}\r\nConnection: close\r\n\r\n"
                )
            };
            out.write_all(head.as_bytes())?;
            let block = vec![b'a'; 64 * 1024];
            let mut left = bytes;
            // The client may hang up early (that is the point): stop at the first write error.
            while left > 0 {
                let n = left.min(block.len());
                if chunked {
                    out.write_all(format!("{n:x}\r\n").as_bytes())?;
                    out.write_all(&block[..n])?;
                    out.write_all(b"\r\n")?;
                } else {
                    out.write_all(&block[..n])?;
                }
                left -= n;
            }
            if chunked {
                out.write_all(b"0\r\n\r\n")?;
            }
            out.flush()
        }
    }
}

fn respond(
    out: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &[u8],
    method: &str,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        204 => "No Content",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\nConnection: close\r\n");
    if status != 204 {
        head.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    if method != "HEAD" && status != 204 {
        out.write_all(body)?;
    }
    out.flush()?;
    out.shutdown(std::net::Shutdown::Write)
}

/// The document at `path`, with its content type: explicit documents first, then the
/// `metadata/<key>` views derived from the `metadata` document.
fn lookup(s: &State, path: &str) -> Option<(&'static str, Vec<u8>)> {
    if s.missing.iter().any(|p| p == path) {
        return None;
    }
    if let Some(b) = s.docs.get(path) {
        let ct = if path == "metadata/public-keys" {
            "application/json"
        } else {
            "text/plain"
        };
        return Some((ct, b.clone()));
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

//! A small FleetLock server for the tests (airlock cannot be installed here), following the
//! protocol: `POST /v1/pre-reboot` and `POST /v1/steady-state` with the header
//! `fleet-lock-protocol: true` and `{"client_params": {"id", "group"}}`; a counting semaphore of
//! `slots` per group, recursive by id (a holder asking again gets 200), owned (only the holder
//! frees its slot); errors as `{"kind", "value"}`. Like airlock, a holder never expires. It can
//! stop listening and start again on the same port with its semaphores kept.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Semaphores {
    pub slots: usize,
    /// Group -> holder ids, in the order they took their slots.
    pub groups: HashMap<String, Vec<String>>,
    /// Requests refused for breaking the protocol (no header, a malformed body).
    pub protocol_errors: usize,
    /// Every request seen: (operation, id, status).
    pub log: Vec<(String, String, u16)>,
}

pub struct FleetLockStandin {
    port: u16,
    state: Arc<Mutex<Semaphores>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FleetLockStandin {
    pub fn start(slots: usize) -> FleetLockStandin {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let port = listener.local_addr().unwrap().port();
        let mut s = FleetLockStandin {
            port,
            state: Arc::new(Mutex::new(Semaphores {
                slots,
                ..Default::default()
            })),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        };
        s.serve(listener);
        s
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn holders(&self, group: &str) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state.groups.get(group).cloned().unwrap_or_default()
    }

    pub fn protocol_errors(&self) -> usize {
        self.state.lock().unwrap().protocol_errors
    }

    /// Stops listening: the port refuses connections until [`FleetLockStandin::resume`].
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn resume(&mut self) {
        assert!(self.thread.is_none(), "the stand-in runs already");
        let listener = TcpListener::bind(("127.0.0.1", self.port)).expect("the same port again");
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        listener.set_nonblocking(true).unwrap();
        self.stop = Arc::new(AtomicBool::new(false));
        let stop = self.stop.clone();
        let state = self.state.clone();
        self.thread = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                        handle(conn, &state);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
    }
}

impl Drop for FleetLockStandin {
    fn drop(&mut self) {
        self.stop();
    }
}

fn reply(conn: &mut TcpStream, status: u16, body: &str) {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Conflict",
    };
    let _ = write!(
        conn,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn error(kind: &str, value: &str) -> String {
    serde_json::json!({"kind": kind, "value": value}).to_string()
}

fn handle(mut conn: TcpStream, state: &Mutex<Semaphores>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len.min(64 * 1024)];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let op = match path {
        "/v1/pre-reboot" => "pre-reboot",
        "/v1/steady-state" => "steady-state",
        _ => return reply(&mut conn, 404, &error("not_found", path)),
    };
    if method != "POST" {
        return reply(&mut conn, 405, &error("method", "POST only"));
    }
    let mut st = state.lock().unwrap();
    if headers.get("fleet-lock-protocol").map(String::as_str) != Some("true") {
        st.protocol_errors += 1;
        return reply(
            &mut conn,
            400,
            &error("missing_header", "fleet-lock-protocol: true is required"),
        );
    }
    let params = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            let p = v.get("client_params")?;
            Some((
                p.get("id")?.as_str()?.to_string(),
                p.get("group")?.as_str()?.to_string(),
            ))
        })
        .filter(|(id, group)| !id.is_empty() && !group.is_empty());
    let Some((id, group)) = params else {
        st.protocol_errors += 1;
        return reply(
            &mut conn,
            400,
            &error(
                "bad_body",
                "client_params.id and client_params.group are required",
            ),
        );
    };
    let slots = st.slots;
    let holders = st.groups.entry(group.clone()).or_default();
    let (status, body) = match op {
        "pre-reboot" if holders.contains(&id) => (200, String::new()),
        "pre-reboot" if holders.len() < slots => {
            holders.push(id.clone());
            (200, String::new())
        }
        "pre-reboot" => (
            409,
            error(
                "failed_lock",
                &format!("semaphore full, held by {}", holders.join(", ")),
            ),
        ),
        _ => {
            holders.retain(|h| h != &id);
            (200, String::new())
        }
    };
    st.log.push((op.to_string(), id, status));
    drop(st);
    reply(&mut conn, status, &body);
}

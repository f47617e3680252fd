//! A FleetLock server for the tests (airlock cannot be installed here), following the protocol:
//! `POST /v1/pre-reboot` and `POST /v1/steady-state` with the header `fleet-lock-protocol: true`
//! and `{"client_params": {"id", "group"}}`; a counting semaphore of `slots` per group,
//! recursive by id (a holder asking again gets 200), owned (only the holder frees its slot);
//! errors as `{"kind", "value"}`. Like airlock, a holder never expires. It can stop listening
//! (connections are refused) and start again on the same port with its semaphores kept, and it
//! can require HTTP basic authentication (a FleetLock server behind a proxy that asks for it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State as Shared;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;

use crate::http::{self, Router, Server};

#[derive(Debug, Default)]
pub struct Semaphores {
    pub slots: usize,
    /// Group -> holder ids, in the order they took their slots.
    pub groups: HashMap<String, Vec<String>>,
    /// Requests refused for breaking the protocol (no header, a malformed body).
    pub protocol_errors: usize,
    /// Every request seen: (operation, id, status).
    pub log: Vec<(String, String, u16)>,
    /// `Authorization: Basic ...` every request must carry, when set.
    pub basic_auth: Option<String>,
    /// Requests refused for missing or wrong credentials.
    pub unauthorized: usize,
}

pub struct FleetLockStandin {
    port: u16,
    state: Arc<Mutex<Semaphores>>,
    server: Option<Server>,
}

impl FleetLockStandin {
    /// Serves on a free port of 127.0.0.1 with `slots` per group.
    pub fn start(slots: usize) -> FleetLockStandin {
        let listener = http::listen("127.0.0.1:0").expect("a loopback port");
        let port = listener.local_addr().expect("the port").port();
        let state = Arc::new(Mutex::new(Semaphores {
            slots,
            ..Default::default()
        }));
        let server = serve(listener, &state);
        FleetLockStandin {
            port,
            state,
            server: Some(server),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn holders(&self, group: &str) -> Vec<String> {
        let state = crate::lock(&self.state);
        state.groups.get(group).cloned().unwrap_or_default()
    }

    pub fn protocol_errors(&self) -> usize {
        crate::lock(&self.state).protocol_errors
    }

    /// From now on every request must carry these credentials (HTTP basic authentication);
    /// others are answered 401.
    pub fn require_basic_auth(&self, user: &str, password: &str) {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        crate::lock(&self.state).basic_auth = Some(format!("Basic {token}"));
    }

    /// Requests refused for missing or wrong credentials.
    pub fn unauthorized(&self) -> usize {
        crate::lock(&self.state).unauthorized
    }

    /// Stops listening: the port refuses connections until [`FleetLockStandin::resume`].
    pub fn stop(&mut self) {
        self.server = None;
    }

    /// Listens again on the same port, with the semaphores as they were.
    pub fn resume(&mut self) {
        assert!(self.server.is_none(), "the stand-in runs already");
        // The old listener lives on in a process another test has just started until that
        // process executes its program (descriptors are close-on-exec): try again meanwhile.
        let addr = format!("127.0.0.1:{}", self.port);
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match http::listen(&addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() >= deadline => panic!("listen on {addr} again: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        self.server = Some(serve(listener, &self.state));
    }
}

fn serve(listener: std::net::TcpListener, state: &Arc<Mutex<Semaphores>>) -> Server {
    let app = Router::new().fallback(handle).with_state(state.clone());
    Server::start(listener, app).expect("serve the FleetLock stand-in")
}

fn error(kind: &str, value: &str) -> String {
    serde_json::json!({"kind": kind, "value": value}).to_string()
}

fn reply(status: u16, body: String) -> Response {
    http::answer(status, "application/json", body)
}

async fn handle(
    Shared(state): Shared<Arc<Mutex<Semaphores>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let op = match uri.path() {
        "/v1/pre-reboot" => "pre-reboot",
        "/v1/steady-state" => "steady-state",
        path => return reply(404, error("not_found", path)),
    };
    if method != Method::POST {
        return reply(405, error("method", "POST only"));
    }
    let mut st = crate::lock(&state);
    if let Some(wanted) = &st.basic_auth {
        let given = headers.get("authorization").and_then(|v| v.to_str().ok());
        if given != Some(wanted.as_str()) {
            st.unauthorized += 1;
            return reply(401, error("unauthorized", "basic authentication required"));
        }
    }
    let protocol = headers
        .get("fleet-lock-protocol")
        .and_then(|v| v.to_str().ok());
    if protocol.map(str::trim) != Some("true") {
        st.protocol_errors += 1;
        return reply(
            400,
            error("missing_header", "fleet-lock-protocol: true is required"),
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
            400,
            error(
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
    reply(status, body)
}

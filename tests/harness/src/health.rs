//! An HTTP health endpoint for `[[health_check]] url`: any request answers `500 broken` while a
//! file exists (a release broke the service), `200 ok` otherwise; requests are counted.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::response::Response;

use crate::http::{self, Router, Server};

pub struct HealthEndpoint {
    /// `http://ADDR/health`
    pub url: String,
    hits: Arc<AtomicUsize>,
    _server: Server,
}

impl HealthEndpoint {
    /// Serves on a free port of 127.0.0.1; broken while `broken_while` exists.
    pub fn start(broken_while: PathBuf) -> HealthEndpoint {
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let app = Router::new().fallback(move || {
            let broken = broken_while.exists();
            counter.fetch_add(1, Ordering::SeqCst);
            async move { answer(broken) }
        });
        let listener = http::listen("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let server = Server::start(listener, app).expect("serve the health endpoint");
        HealthEndpoint {
            url: format!("{}/health", server.url()),
            hits,
            _server: server,
        }
    }

    /// Requests answered so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn answer(broken: bool) -> Response {
    if broken {
        http::text(500, "broken\n")
    } else {
        http::text(200, "ok\n")
    }
}

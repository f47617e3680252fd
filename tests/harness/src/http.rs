//! The HTTP stand-in kit: an axum [`Router`] served on a listener (loopback, or inside a network
//! namespace) by one runtime per test process, and the faults the stand-ins inject.
//!
//! Every stand-in answers one request per connection and closes it (`Connection: close`), as the
//! real services' clients must expect; [`Server::start_keeping_alive`] keeps connections open
//! instead (the Cloud API stand-in). Stopping a server closes its listener at once (connections
//! are refused from then on); answers under way finish on their own.
//!
//! The faults, observable on the wire exactly as described:
//! - [`Fault::Delay`]: the normal answer, after a wait;
//! - [`Fault::Status`]: that status with the text `injected HTTP <code>`;
//! - [`Fault::Truncate`]: a `Content-Length` 16 bytes over the body, the first half of the body,
//!   then the connection closes;
//! - [`Fault::Oversized`]: 200 with that many bytes, with a `Content-Length` or chunked;
//! - [`Fault::Close`]: the connection closes after the request is read, with no answer at all.
//!
//! Refused connections: [`refused_addr`], or a stopped [`Server`].

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;
use tower_service::Service as _;

pub use axum::Router;

/// The runtime every stand-in of this process runs on (tests need not be async to use them).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("standins")
            .enable_all()
            .build()
            .expect("the stand-ins' runtime")
    })
}

/// A listener on `addr` (`127.0.0.1:0` for a free port).
pub fn listen(addr: &str) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
}

/// A listener on `addr` inside the named network namespace (`/run/netns/NAME`): a thread joins
/// the namespace and binds there; the socket stays in it and is served from anywhere.
pub fn listen_in_netns(netns: &str, addr: &str) -> io::Result<TcpListener> {
    let path = format!("/run/netns/{netns}");
    let addr = addr.to_string();
    std::thread::Builder::new()
        .name(format!("bind-in-{netns}"))
        .spawn(move || {
            let ns = std::fs::File::open(&path)?;
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            TcpListener::bind(&addr)
        })?
        .join()
        .map_err(|_| io::Error::other("the thread binding in the namespace panicked"))?
}

/// A port on 127.0.0.1 where nothing listens (bound, noted and closed): connections are refused.
pub fn refused_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr")
}

/// A running stand-in. Stops (and closes its listener) when dropped.
pub struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    /// In a mutex only so that a server can be shared between threads (a local cloud's FlakeHub).
    stopped: Option<std::sync::Mutex<std::sync::mpsc::Receiver<()>>>,
}

impl Server {
    /// Serves `app` on `listener`, one answer per connection. Handlers can take the client's
    /// address as `ConnectInfo<SocketAddr>`.
    pub fn start(listener: TcpListener, app: Router) -> io::Result<Server> {
        Self::serve(listener, app, false)
    }

    /// Serves `app` on `listener`, keeping connections open between requests.
    pub fn start_keeping_alive(listener: TcpListener, app: Router) -> io::Result<Server> {
        Self::serve(listener, app, true)
    }

    fn serve(listener: TcpListener, app: Router, keep_alive: bool) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = runtime();
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let (stop, stop_rx) = oneshot::channel();
        let (stopped_tx, stopped) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            accept(listener, app, keep_alive, stop_rx).await;
            let _ = stopped_tx.send(());
        });
        Ok(Server {
            addr,
            stop: Some(stop),
            stopped: Some(std::sync::Mutex::new(stopped)),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting and closes the listener (connections are refused from now on); answers
    /// under way finish on their own. Returns once the listener is closed.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(stopped) = self.stopped.take() {
            let stopped = stopped.into_inner().unwrap_or_else(|e| e.into_inner());
            let _ = stopped.recv_timeout(Duration::from_secs(10));
        }
    }

    /// Serves until the process is killed (for the stand-ins run as programs).
    pub fn wait(mut self) {
        if let Some(stopped) = self.stopped.take() {
            let stopped = stopped.into_inner().unwrap_or_else(|e| e.into_inner());
            let _ = stopped.recv();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept(
    listener: tokio::net::TcpListener,
    app: Router,
    keep_alive: bool,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of file descriptors and the like: try again shortly.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            },
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                let mut app = app.clone();
                async move { app.call(req).await }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(keep_alive)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One fault, applied to one answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Wait this long, then answer normally.
    Delay(Duration),
    /// Answer with this HTTP status and the text `injected HTTP <code>`.
    Status(u16),
    /// Announce a `Content-Length` 16 bytes over the body, send only the first half of the body,
    /// then close the connection.
    Truncate,
    /// Answer 200 with this many bytes; `chunked` hides the length until it has been sent.
    Oversized { bytes: usize, chunked: bool },
    /// Close the connection after reading the request, without answering.
    Close,
}

impl Fault {
    /// The answer with this fault, instead of `normal`. `body` is what the normal answer
    /// carries (what [`Fault::Truncate`] cuts; 64 bytes of `x` when there is none).
    pub async fn answer(self, normal: Response, body: Option<&[u8]>) -> Response {
        match self {
            Fault::Delay(d) => {
                tokio::time::sleep(d).await;
                normal
            }
            Fault::Status(code) => text(code, &format!("injected HTTP {code}\n")),
            Fault::Truncate => match body {
                Some(b) => truncated(b),
                None => truncated(&[b'x'; 64]),
            },
            Fault::Oversized { bytes, chunked } => oversized(bytes, chunked),
            Fault::Close => no_answer(),
        }
    }
}

/// Faults queued per key (a path, an endpoint), each consumed by one request, in order.
#[derive(Debug, Default)]
pub struct FaultQueue(HashMap<String, VecDeque<Fault>>);

impl FaultQueue {
    pub fn push(&mut self, key: &str, fault: Fault) {
        self.0.entry(key.to_string()).or_default().push_back(fault);
    }

    /// The next fault for `key`, if any.
    pub fn next(&mut self, key: &str) -> Option<Fault> {
        self.0.get_mut(key).and_then(VecDeque::pop_front)
    }
}

fn status_code(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// An answer with this status, content type and body (no body and no type for 204).
pub fn answer(code: u16, content_type: &str, body: impl Into<Bytes>) -> Response {
    let code = status_code(code);
    if code == StatusCode::NO_CONTENT {
        return Response::builder()
            .status(code)
            .body(Body::empty())
            .expect("a valid response");
    }
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body.into()))
        .expect("a valid response")
}

/// A `text/plain` answer.
pub fn text(code: u16, body: &str) -> Response {
    answer(code, "text/plain", body.to_string())
}

/// An `application/json` answer.
pub fn json(code: u16, body: &serde_json::Value) -> Response {
    answer(
        code,
        "application/json",
        serde_json::to_vec(body).unwrap_or_default(),
    )
}

/// A body that ends the connection when it is read, before anything reached the client (the
/// server sends nothing it buffered before a body error).
fn broken_body() -> futures_util::stream::Once<std::future::Ready<Result<Bytes, io::Error>>> {
    futures_util::stream::once(std::future::ready(Err(io::Error::other(
        "the stand-in closes the connection",
    ))))
}

/// No answer: the connection closes once the request has been read.
pub fn no_answer() -> Response {
    Response::new(Body::from_stream(broken_body()))
}

/// 200 with a `Content-Length` 16 bytes over `body`, the first half of `body`, and then the
/// connection closes.
pub fn truncated(body: &[u8]) -> Response {
    let half = Bytes::copy_from_slice(&body[..body.len() / 2]);
    let stream = futures_util::stream::unfold(Some(half), |state| async move {
        match state {
            Some(half) => Some((Ok::<_, io::Error>(half), None)),
            None => {
                // Time to send what is buffered before the connection goes.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Some((Err(io::Error::other("truncated by the stand-in")), None))
            }
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len() + 16));
    response
}

/// 200 with `bytes` bytes of `a`, with a `Content-Length`, or chunked.
pub fn oversized(bytes: usize, chunked: bool) -> Response {
    const BLOCK: usize = 64 * 1024;
    let block = Bytes::from(vec![b'a'; BLOCK]);
    let stream = futures_util::stream::unfold(bytes, move |left| {
        let block = block.clone();
        async move {
            (left > 0).then(|| {
                let n = left.min(BLOCK);
                (Ok::<_, Infallible>(block.slice(..n)), left - n)
            })
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if !chunked {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes));
    }
    response
}

//! Stand-ins for the whole-server test (`tests/system.rs`): a FlakeHub API that works inside a
//! network namespace (the same behaviour as the one in `tests/agent_systemd.rs`, with the
//! organisation, flake and token as parameters) and real Nix store paths in a store of the
//! test's own.
//!
//! Include it with `#[path = "support/server.rs"] mod server;`.

#![allow(dead_code)] // each includer uses a different part of it

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// FlakeHub API stand-in: `GET /version/{org}/{flake}/{constraint}` answers the newest published
// release that is not yanked (the test publishes in order), `GET /f/{org}/{flake}/={version}/
// output/{attr}` the store path of that release. A bearer token is required; every request is
// recorded with whether it carried the token.

#[derive(Clone, Debug)]
pub struct Release {
    pub version: String,
    pub store_path: String,
    pub yanked: bool,
}

#[derive(Default)]
pub struct HubState {
    pub releases: Vec<Release>,
    /// Delay before answering `GET /version/...` (a FlakeHub that answers late).
    pub version_delay: Duration,
    /// Every request: (path, whether it carried the right token).
    pub requests: Vec<(String, bool)>,
}

/// What the stand-in serves: one flake of one organisation, behind one token.
#[derive(Clone)]
pub struct HubSpec {
    pub org: String,
    pub flake: String,
    pub token: String,
}

pub struct FlakeHub {
    state: Arc<Mutex<HubState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FlakeHub {
    /// Listens on `addr` inside the named network namespace (`/run/netns/NAME`).
    pub fn start_in_netns(netns: &str, addr: &str, spec: HubSpec) -> io::Result<Self> {
        let path = format!("/run/netns/{netns}");
        let addr = addr.to_string();
        let state = Arc::new(Mutex::new(HubState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (state2, stop2) = (state.clone(), stop.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = thread::Builder::new()
            .name(format!("flakehub-{netns}"))
            .spawn(move || {
                // The thread that binds must have joined the namespace.
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
                        let _ = tx.send(Ok(()));
                        while !stop2.load(Ordering::SeqCst) {
                            match l.accept() {
                                Ok((stream, _)) => {
                                    let state = state2.clone();
                                    let spec = spec.clone();
                                    let _ = thread::Builder::new()
                                        .name("flakehub-conn".into())
                                        .spawn(move || {
                                            let _ = hub_handle(stream, &state, &spec);
                                        });
                                }
                                Err(_) => thread::sleep(Duration::from_millis(5)),
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })?;
        rx.recv_timeout(Duration::from_secs(10))
            .map_err(|_| io::Error::other("FlakeHub stand-in did not start"))??;
        Ok(FlakeHub {
            state,
            stop,
            thread: Some(thread),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publishes a release; it is the newest from now on.
    pub fn publish(&self, version: &str, store_path: &str) {
        self.lock().releases.push(Release {
            version: version.into(),
            store_path: store_path.into(),
            yanked: false,
        });
    }

    pub fn requests(&self) -> Vec<(String, bool)> {
        self.lock().requests.clone()
    }

    /// Makes `GET /version/...` answer only after `d`.
    pub fn set_version_delay(&self, d: Duration) {
        self.lock().version_delay = d;
    }
}

impl Drop for FlakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

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

fn hub_handle(stream: TcpStream, state: &Mutex<HubState>, spec: &HubSpec) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    (&mut reader).take(8192).read_line(&mut request_line)?;
    let mut authorized = false;
    for _ in 0..100 {
        let mut line = String::new();
        let n = (&mut reader).take(8192).read_line(&mut line)?;
        if n == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("authorization")
            && v.trim() == format!("Bearer {}", spec.token)
        {
            authorized = true;
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("");
    let path = target.split('?').next().unwrap_or("");
    let segments: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let mut delay = Duration::ZERO;
    let (status, body) = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.requests.push((path.to_string(), authorized));
        if authorized && segments.first().map(String::as_str) == Some("version") {
            delay = s.version_delay;
        }
        let newest = s.releases.iter().rev().find(|r| !r.yanked).cloned();
        let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
        match seg.as_slice() {
            _ if !authorized => (401, r#"{"error":"unauthorized"}"#.to_string()),
            ["version", o, f, _constraint] if *o == spec.org && *f == spec.flake => match newest {
                Some(r) => (
                    200,
                    serde_json::json!({
                        "version": r.version,
                        "simplified_version": r.version.split('+').next(),
                        "revision": r.version.rsplit("rev-").next(),
                        "published_at": "2026-11-21T12:00:00Z",
                        "yanked_at": null,
                    })
                    .to_string(),
                ),
                None => (404, r#"{"error":"no release"}"#.to_string()),
            },
            ["f", o, f, exact, "output", attr] if *o == spec.org && *f == spec.flake => {
                let version = exact.strip_prefix('=').unwrap_or(exact);
                match s.releases.iter().find(|r| r.version == version) {
                    Some(r) => (
                        200,
                        serde_json::json!({
                            "attribute_path": attr,
                            "store_path": r.store_path,
                        })
                        .to_string(),
                    ),
                    None => (404, r#"{"error":"no output"}"#.to_string()),
                }
            }
            _ => (404, r#"{"error":"not found"}"#.to_string()),
        }
    };
    thread::sleep(delay);
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        _ => "Not Found",
    };
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()?;
    out.shutdown(std::net::Shutdown::Write)
}

// ---------------------------------------------------------------------------------------------
// A Nix store of the test's own: `<root>/nix` holds a real store (database, profiles) whose
// paths are `/nix/store/...`; the container mounts it at `/nix`. The host's /nix is not touched.

/// `nix-store --add DIR` into the store under `root` (`local?root=ROOT`); returns the store path
/// (`/nix/store/<hash>-<basename of DIR>`).
pub fn store_add(root: &Path, dir: &Path) -> String {
    let out = Command::new("nix-store")
        .arg("--store")
        .arg(format!("local?root={}", root.display()))
        .arg("--add")
        .arg(dir)
        .output()
        .expect("run nix-store");
    assert!(
        out.status.success(),
        "nix-store --add {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `nix-env -p PROFILE --set PATH` in the store under `root`: a real new generation.
pub fn profile_set(root: &Path, profile: &Path, path: &str) {
    if let Some(dir) = profile.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let out = Command::new("nix-env")
        .arg("--store")
        .arg(format!("local?root={}", root.display()))
        .arg("-p")
        .arg(profile)
        .args(["--set", path])
        .output()
        .expect("run nix-env");
    assert!(
        out.status.success(),
        "nix-env --set {path} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Extra privileges for one container. `systemd-nspawn --network-namespace-path=` does not grant
// CAP_NET_ADMIN (only `--private-network` and friends do), so systemd-networkd is skipped
// (`ConditionCapability=CAP_NET_ADMIN`) and neither `ip link set up` nor nft work. A trusted
// settings file, `/run/systemd/nspawn/<machine>.nspawn`, grants it without touching
// `tests/support/container.rs`; it is removed when dropped.

pub struct NspawnSettings(pub std::path::PathBuf);

impl NspawnSettings {
    pub fn net_admin(machine: &str) -> Self {
        let dir = Path::new("/run/systemd/nspawn");
        std::fs::create_dir_all(dir).expect("create /run/systemd/nspawn");
        let path = dir.join(format!("{machine}.nspawn"));
        std::fs::write(
            &path,
            "# Written by the hcloud-nixos system test; removed when it ends.\n[Exec]\nCapability=CAP_NET_ADMIN\n",
        )
        .expect("write the .nspawn file");
        NspawnSettings(path)
    }
}

impl Drop for NspawnSettings {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

//! The test harness itself (`tests/harness/`): the stand-ins answer on the wire as the README
//! and `tests/fixtures/` say the real services do, faults included (read here with a plain TCP
//! client, byte for byte), and the generated `fh`, `switch-to-configuration` and
//! `determinate-nixd` stand-ins behave as documented. No root needed (bash and curl are).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use harness::flakehub::{Down, Endpoint, FlakeHub};
use harness::fleetlock::FleetLockStandin;
use harness::health::HealthEndpoint;
use harness::metadata::{Documents, Fault, MetadataServer};
use harness::scripts::{Activation, DeterminateNixd, Fh, Profile, Switch};

/// An answer as it came over the wire.
struct Wire {
    head: String,
    body: Vec<u8>,
}

impl Wire {
    fn status(&self) -> u16 {
        self.head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// Sends `request` and reads until the server closes the connection. `None`: it closed without
/// sending a byte.
fn exchange(addr: SocketAddr, request: &str) -> Option<Wire> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    if all.is_empty() {
        return None;
    }
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head");
    Some(Wire {
        head: String::from_utf8_lossy(&all[..split]).into_owned(),
        body: all[split + 4..].to_vec(),
    })
}

fn get(addr: SocketAddr, path: &str) -> Option<Wire> {
    exchange(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: standins-test\r\n\r\n"),
    )
}

fn metadata() -> MetadataServer {
    let docs = Documents::from_files(
        &harness::fixture("hetzner-metadata/metadata.full-example.yaml"),
        None,
        None,
    )
    .unwrap();
    MetadataServer::start("127.0.0.1:0", docs).unwrap()
}

#[test]
fn the_binary_is_the_one_cargo_built() {
    let expected = Path::new(env!("CARGO_BIN_EXE_hcloud-nixos"));
    assert_eq!(
        harness::binary().canonicalize().unwrap(),
        expected.canonicalize().unwrap()
    );
}

#[test]
fn the_boot_program_is_the_one_cargo_built() {
    let expected = Path::new(env!("CARGO_BIN_EXE_hcloud-nixos-network"));
    assert_eq!(
        harness::network_binary().canonicalize().unwrap(),
        expected.canonicalize().unwrap()
    );
}

#[test]
fn metadata_documents_as_the_service_serves_them() {
    let s = metadata();
    let fixture = std::fs::read(harness::fixture(
        "hetzner-metadata/metadata.full-example.yaml",
    ))
    .unwrap();
    let w = get(s.addr(), "/hetzner/v1/metadata").unwrap();
    assert_eq!(w.status(), 200, "{}", w.head);
    assert_eq!(w.body, fixture);
    assert_eq!(w.header("content-length"), Some(fixture.len().to_string()));
    // One answer per connection.
    assert_eq!(w.header("connection").as_deref(), Some("close"));
    let w = get(s.addr(), "/hetzner/v1/metadata/hostname").unwrap();
    assert_eq!(w.body, b"my-nixos-server");
    let w = get(s.addr(), "/hetzner/v1/metadata/public-keys").unwrap();
    assert_eq!(
        w.header("content-type").as_deref(),
        Some("application/json")
    );
    assert!(serde_json::from_slice::<Vec<String>>(&w.body).is_ok());
    // A server without user-data: 204, no body.
    let w = get(s.addr(), "/hetzner/v1/userdata").unwrap();
    assert_eq!(w.status(), 204);
    assert!(w.body.is_empty() && w.header("content-length").is_none());
    assert_eq!(
        get(s.addr(), "/hetzner/v1/no-such-thing").unwrap().status(),
        404
    );
    assert_eq!(get(s.addr(), "/elsewhere").unwrap().status(), 404);
    let w = exchange(
        s.addr(),
        "POST /hetzner/v1/metadata HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .unwrap();
    assert_eq!(w.status(), 405);
    let w = exchange(
        s.addr(),
        "HEAD /hetzner/v1/metadata HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .unwrap();
    assert_eq!(w.status(), 200);
    assert!(w.body.is_empty());
    s.set_document("metadata/hostname", None);
    assert_eq!(
        get(s.addr(), "/hetzner/v1/metadata/hostname")
            .unwrap()
            .status(),
        404
    );
    assert_eq!(s.requests("metadata"), 3);
    assert_eq!(s.clients().len(), s.total_requests());
}

#[test]
fn metadata_faults_on_the_wire() {
    let s = metadata();
    let fixture = std::fs::read(harness::fixture(
        "hetzner-metadata/metadata.full-example.yaml",
    ))
    .unwrap();
    let path = "/hetzner/v1/metadata";

    s.fail_next("metadata", 503, 1);
    let w = get(s.addr(), path).unwrap();
    assert_eq!(
        (w.status(), &w.body[..]),
        (503, &b"injected HTTP 503\n"[..])
    );

    // Truncated: a length 16 bytes over the document, half of it, then the end.
    s.push_fault("metadata", Fault::Truncate);
    let w = get(s.addr(), path).unwrap();
    assert_eq!(w.status(), 200);
    assert_eq!(
        w.header("content-length"),
        Some((fixture.len() + 16).to_string())
    );
    assert_eq!(w.body, fixture[..fixture.len() / 2]);

    // Closed after the request, with no answer at all.
    s.push_fault("metadata", Fault::Close);
    assert!(get(s.addr(), path).is_none());

    let bytes = 200_000;
    s.push_fault(
        "metadata",
        Fault::Oversized {
            bytes,
            chunked: false,
        },
    );
    let w = get(s.addr(), path).unwrap();
    assert_eq!(w.header("content-length"), Some(bytes.to_string()));
    assert_eq!(w.body.len(), bytes);
    s.push_fault(
        "metadata",
        Fault::Oversized {
            bytes,
            chunked: true,
        },
    );
    let w = get(s.addr(), path).unwrap();
    assert_eq!(w.header("transfer-encoding").as_deref(), Some("chunked"));
    assert!(w.header("content-length").is_none());
    assert!(w.body.len() > bytes && w.body.ends_with(b"0\r\n\r\n"));

    s.push_fault("metadata", Fault::Delay(Duration::from_millis(300)));
    let t = Instant::now();
    let w = get(s.addr(), path).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!((w.status(), w.body), (200, fixture));

    // Faults are per path and consumed in order.
    assert_eq!(s.requests("metadata"), 6);
    assert_eq!(get(s.addr(), path).unwrap().status(), 200);
}

#[test]
fn a_stopped_standin_and_the_refused_address_refuse_connections() {
    let refused = MetadataServer::refused_addr();
    assert!(TcpStream::connect(refused).is_err());
    let mut s = metadata();
    let addr = s.addr();
    assert!(TcpStream::connect(addr).is_ok());
    s.stop();
    // A process the other tests start copies every descriptor of this one until it executes its
    // program (they are close-on-exec): the listener can outlive `stop` by that moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    while TcpStream::connect(addr).is_ok() {
        assert!(Instant::now() < deadline, "still accepting after stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn flakehub_answers_in_the_shape_of_the_fixture() {
    let hub = FlakeHub::start("127.0.0.1:0").unwrap();
    hub.require_token(Some("sekrit"));
    let v = harness::flakehub::rolling_version(7, "standins");
    hub.publish(
        "acme",
        "infra",
        &v,
        "nixosConfigurations.web",
        "/nix/store/x-web",
    );
    let auth = "Authorization: Bearer sekrit\r\n";
    let ask = |path: &str, extra: &str| {
        exchange(
            hub.addr(),
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\n{extra}\r\n"),
        )
        .unwrap()
    };
    let w = ask("/version/acme/infra/0.1", auth);
    assert_eq!(w.status(), 200, "{}", w.head);
    let got: serde_json::Value = serde_json::from_slice(&w.body).unwrap();
    let fixture: serde_json::Value = serde_json::from_slice(
        &std::fs::read(harness::fixture("flakehub/version.example.json")).unwrap(),
    )
    .unwrap();
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let mut k: Vec<String> = v
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| !k.starts_with('_'))
            .cloned()
            .collect();
        k.sort();
        k
    };
    assert_eq!(keys(&got), keys(&fixture));
    assert_eq!(got["version"], v.as_str());
    let w = ask(
        &format!(
            "/f/acme/infra/={}/output/nixosConfigurations.web?include_token=true",
            v.replace('+', "%2B")
        ),
        auth,
    );
    let out: serde_json::Value = serde_json::from_slice(&w.body).unwrap();
    assert_eq!(out["store_path"], "/nix/store/x-web");
    assert!(
        out["token"]
            .as_str()
            .unwrap()
            .starts_with("flakehub_scoped_")
    );
    // Tokens and the User-Agent are checked; both faults are counted.
    assert_eq!(ask("/version/acme/infra/0.1", "").status(), 401);
    assert_eq!(
        ask("/version/acme/infra/0.1", "Authorization: Bearer x\r\n").status(),
        401
    );
    let w = exchange(
        hub.addr(),
        &format!("GET /cli/status HTTP/1.1\r\nHost: x\r\n{auth}\r\n"),
    )
    .unwrap();
    assert_eq!(w.status(), 400);
    assert_eq!(hub.unauthorized_requests(), 2);
    assert_eq!(hub.requests(Endpoint::Version), 3);
    let log = hub.request_log();
    assert_eq!(log.len(), 5);
    assert_eq!(log.iter().filter(|s| !s.authorized).count(), 2);
    assert_eq!(ask("/version/acme/nothing/0.1", auth).status(), 404);
    // The counters are there without a token, and count nothing themselves.
    let counts: serde_json::Value =
        serde_json::from_slice(&ask("/_standin/counts", "").body).unwrap();
    assert_eq!(counts["total"], 6);
    assert_eq!(counts["unauthorized"], 2);
}

#[test]
fn flakehub_down_slow_and_yanked() {
    let hub = FlakeHub::start("127.0.0.1:0").unwrap();
    let (v1, v2) = (
        harness::flakehub::rolling_version(1, "y"),
        harness::flakehub::rolling_version(2, "y"),
    );
    hub.publish("acme", "infra", &v1, "a", "/nix/store/one");
    hub.publish("acme", "infra", &v2, "a", "/nix/store/two");
    let version = |hub: &FlakeHub| get(hub.addr(), "/version/acme/infra/*");
    let of =
        |w: Wire| serde_json::from_slice::<serde_json::Value>(&w.body).unwrap()["version"].clone();
    assert_eq!(of(version(&hub).unwrap()), v2.as_str());
    assert!(hub.yank("acme", "infra", &v2));
    assert_eq!(of(version(&hub).unwrap()), v1.as_str());
    hub.set_version_serves_yanked(true);
    assert_eq!(of(version(&hub).unwrap()), v2.as_str());

    hub.set_down(Some(Down::Status(503)));
    let w = version(&hub).unwrap();
    assert_eq!(w.status(), 503);
    assert_eq!(
        w.header("content-type").as_deref(),
        Some("application/json")
    );
    hub.set_down(Some(Down::Close));
    assert!(version(&hub).is_none());
    hub.set_down(None);

    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut");
    hub.set_down_while_file_exists(Some((&cut, Down::Close)));
    assert!(version(&hub).is_some());
    std::fs::write(&cut, "").unwrap();
    assert!(version(&hub).is_none());
    std::fs::remove_file(&cut).unwrap();

    hub.set_endpoint_delay(Endpoint::Version, Some(Duration::from_millis(400)));
    let t = Instant::now();
    assert!(get(hub.addr(), "/f/acme/infra/releases").is_some());
    assert!(
        t.elapsed() < Duration::from_millis(400),
        "only /version is slow"
    );
    assert!(version(&hub).is_some());
    assert!(t.elapsed() >= Duration::from_millis(400));
}

#[test]
fn fleetlock_refuses_while_stopped_and_keeps_its_semaphores() {
    let mut standin = FleetLockStandin::start(1);
    let addr: SocketAddr = standin.url().trim_start_matches("http://").parse().unwrap();
    let lock = |id: &str| {
        let body = format!(r#"{{"client_params": {{"id": "{id}", "group": "web"}}}}"#);
        exchange(
            addr,
            &format!(
                "POST /v1/pre-reboot HTTP/1.1\r\nHost: x\r\nfleet-lock-protocol: true\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ),
        )
        .unwrap()
    };
    assert_eq!(lock("a").status(), 200);
    let w = lock("b");
    assert_eq!(w.status(), 409);
    assert!(String::from_utf8_lossy(&w.body).contains("failed_lock"));
    standin.stop();
    // (Until a process another test starts has executed its program: see above.)
    let deadline = Instant::now() + Duration::from_secs(2);
    while TcpStream::connect(addr).is_ok() {
        assert!(Instant::now() < deadline, "still accepting after stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    standin.resume();
    assert_eq!(lock("b").status(), 409);
    assert_eq!(standin.holders("web"), ["a"]);
    let w = exchange(
        addr,
        "POST /v1/pre-reboot HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    )
    .unwrap();
    assert_eq!(w.status(), 400);
    assert_eq!(standin.protocol_errors(), 1);
}

#[test]
fn the_health_endpoint_is_broken_while_its_file_exists() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken");
    let endpoint = HealthEndpoint::start(broken.clone());
    let addr: SocketAddr = endpoint.url["http://".len()..endpoint.url.len() - "/health".len()]
        .parse()
        .unwrap();
    assert_eq!(get(addr, "/health").unwrap().status(), 200);
    std::fs::write(&broken, "").unwrap();
    assert_eq!(get(addr, "/health").unwrap().status(), 500);
    assert_eq!(endpoint.hits(), 2);
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()))
}

/// A system in `dir/<name>` with the given activation; `dir/current-system` is its link.
fn system(dir: &Path, name: &str, activation: Activation) -> std::path::PathBuf {
    let system = dir.join(name);
    Switch {
        name: name.to_string(),
        current: dir.join("current-system"),
        log: dir.join("activations.log"),
        times: Some(dir.join("times.log")),
        flags: Some(dir.join("flags")),
        delay_file: None,
        activation,
    }
    .install_into(&system);
    system
}

#[test]
fn switch_to_configuration_logs_switches_and_fails_as_asked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("flags")).unwrap();
    let good = system(d, "good", Activation::SetsFlag("broken-app".into()));
    let bad = system(d, "bad", Activation::Fails);
    let four = system(d, "four", Activation::Exit4);
    let stc = |s: &Path| s.join("bin/switch-to-configuration");

    assert!(run(&stc(&good), &["dry-activate"]).status.success());
    assert!(!d.join("current-system").exists(), "dry-activate switched");
    assert!(run(&stc(&good), &["switch"]).status.success());
    assert_eq!(
        d.join("current-system").canonicalize().unwrap(),
        good.canonicalize().unwrap()
    );
    assert!(d.join("flags/broken-app").exists());
    let out = run(&stc(&bad), &["switch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("activation script"));
    assert_eq!(
        d.join("current-system").canonicalize().unwrap(),
        good.canonicalize().unwrap()
    );
    let out = run(&stc(&four), &["test"]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(
        d.join("current-system").canonicalize().unwrap(),
        four.canonicalize().unwrap()
    );
    assert!(
        !d.join("flags/broken-app").exists(),
        "a switch repairs what a release broke"
    );
    assert_eq!(run(&stc(&good), &["frobnicate"]).status.code(), Some(1));
    assert_eq!(
        lines(&d.join("activations.log")),
        [
            "good dry-activate start",
            "good dry-activate done",
            "good switch start",
            "good switch done",
            "bad switch start",
            "bad switch failed",
            "four test start",
            "four test failed",
            "good frobnicate start",
            "good frobnicate failed",
        ]
    );
    assert_eq!(lines(&d.join("times.log")).len(), 5);
    // stdout is the agent's: the stand-ins say what they do on stderr.
    assert!(run(&stc(&good), &["switch"]).stdout.is_empty());
}

#[test]
fn fh_resolves_links_the_profile_and_activates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let target = system(d, "target", Activation::Switches);
    let hub = FlakeHub::start("127.0.0.1:0").unwrap();
    hub.require_token(Some("fh-sekrit"));
    let v = harness::flakehub::rolling_version(3, "fh");
    hub.publish(
        "acme",
        "infra",
        &v,
        "nixosConfigurations.web",
        target.to_str().unwrap(),
    );
    let fh = Fh {
        api: hub.url(),
        token_file: d.join("token"),
        log: d.join("fh.log"),
        profile: Profile::Link(d.join("profile")),
        delay_file: None,
        env: Vec::new(),
    };
    let program = d.join("bin/fh");
    fh.install(&program);
    let reference = format!("acme/infra/={v}#nixosConfigurations.web");

    // Not logged in.
    let out = run(&program, &["apply", "nixos", &reference, "switch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not logged in"));
    // A token FlakeHub rejects.
    std::fs::write(d.join("token"), "wrong\n").unwrap();
    let out = run(&program, &["apply", "nixos", &reference, "switch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("rejected the token (HTTP 401)"));
    // The right one.
    std::fs::write(d.join("token"), "fh-sekrit\n").unwrap();
    let out = run(&program, &["apply", "nixos", &reference, "switch"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    assert_eq!(
        d.join("profile").canonicalize().unwrap(),
        target.canonicalize().unwrap()
    );
    assert_eq!(
        d.join("current-system").canonicalize().unwrap(),
        target.canonicalize().unwrap()
    );
    assert_eq!(
        lines(&d.join("fh.log")),
        vec![format!("apply nixos {reference} switch"); 3]
    );
    // Run as bash reading its script `apply`, as the agent bench has it.
    let bash_fh = d.join("bash-bin/fh");
    fh.install_as_bash(&bash_fh, &d.join("fh-lib"));
    let out = Command::new(&bash_fh)
        .args(["apply", "nixos", &reference, "dry-activate"])
        .current_dir(d.join("fh-lib"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        lines(&d.join("fh.log")).last().unwrap(),
        &format!("apply nixos {reference} dry-activate")
    );
    assert!(
        hub.request_log()
            .iter()
            .all(|s| s.path.contains("/output/")),
        "{:?}",
        hub.request_log()
    );
}

#[test]
fn determinate_nixd_keeps_only_a_token_flakehub_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let program = d.join("determinate-nixd");
    DeterminateNixd {
        dir: d.join("nixd"),
        log: d.join("nixd.log"),
        valid_token: Some("good-token".into()),
    }
    .install(&program);
    let token = d.join("token-file");
    std::fs::write(&token, "bad-token\n").unwrap();
    let out = run(
        &program,
        &["login", "token", "--token-file", token.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&run(&program, &["status"]).stdout)
            .lines()
            .next(),
        Some("Logged in: false")
    );
    std::fs::write(&token, "good-token\n").unwrap();
    let out = run(
        &program,
        &["login", "token", "--token-file", token.to_str().unwrap()],
    );
    assert!(out.status.success());
    assert_eq!(
        std::fs::read_to_string(d.join("nixd/token")).unwrap(),
        "good-token"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(d.join("nixd/token")).unwrap().mode() & 0o777,
        0o600
    );
    assert!(
        String::from_utf8_lossy(&run(&program, &["status"]).stdout).starts_with("Logged in: true")
    );
    let log = lines(&d.join("nixd.log"));
    assert!(log.iter().all(|l| !l.contains("good-token")), "{log:?}");
}

/// `curl -X METHOD` against the Cloud API stand-in: status and JSON body.
fn cloud_api(
    api: &harness::hcloud_api::HcloudApi,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut c = std::process::Command::new("curl");
    c.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-X", method, "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("{}{path}", api.endpoint()));
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data"])
            .arg(b.to_string());
    }
    let out = c.output().expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (json, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn cloud_api_catalog_snapshots_and_documented_errors() {
    use harness::hcloud_api::{HcloudApi, TOKEN};
    use serde_json::json;
    let api = HcloudApi::start().await;
    let (code, v) = cloud_api(&api, TOKEN, "GET", "/server_types?name=cax11", None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["server_types"][0]["architecture"], "arm", "{v}");
    assert_eq!(v["server_types"].as_array().unwrap().len(), 1);
    let (_, v) = cloud_api(&api, TOKEN, "GET", "/server_types?per_page=2&page=2", None);
    assert_eq!(v["server_types"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["meta"]["pagination"]["next_page"], 3, "{v}");
    let (_, v) = cloud_api(&api, TOKEN, "GET", "/locations?name=fsn1", None);
    assert_eq!(v["locations"][0]["city"], "Falkenstein", "{v}");
    // Snapshots: newest first with sort=created:desc, filtered by architecture and status.
    let old = api.with(|s| s.add_image("x86", Default::default()));
    let new = api.with(|s| s.add_image("x86", Default::default()));
    let arm = api.with(|s| s.add_image("arm", Default::default()));
    let (_, v) = cloud_api(
        &api,
        TOKEN,
        "GET",
        "/images?type=snapshot&architecture=x86&status=available&sort=created:desc",
        None,
    );
    let ids: Vec<u64> = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["id"].as_u64())
        .collect();
    assert_eq!(ids, [new, old], "{v}");
    let _ = arm;
    // Documented errors.
    let (code, v) = cloud_api(&api, "wrong-token", "GET", "/servers", None);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let server = |name: &str, ty: &str, image: serde_json::Value| {
        json!({"name": name, "server_type": ty, "image": image, "location": "fsn1",
            "start_after_create": true, "user_data": "#cloud-config\n"})
    };
    let (code, v) = cloud_api(
        &api,
        TOKEN,
        "POST",
        "/servers",
        Some(&server("a", "cx99", json!(new))),
    );
    assert_eq!(code, 422, "{v}");
    assert_eq!(v["error"]["code"], "invalid_input");
    assert_eq!(
        v["error"]["details"]["fields"][0]["name"], "server_type",
        "{v}"
    );
    let (code, v) = cloud_api(
        &api,
        TOKEN,
        "POST",
        "/servers",
        Some(&server("a", "cx23", json!(99999))),
    );
    assert_eq!(
        (code, v["error"]["details"]["fields"][0]["name"].as_str()),
        (422, Some("image")),
        "{v}"
    );
    let (code, v) = cloud_api(
        &api,
        TOKEN,
        "POST",
        "/servers",
        Some(&server("a", "cx23", json!(new))),
    );
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["server"]["image"]["id"], new);
    assert_eq!(v["server"]["server_type"]["name"], "cx23");
    let (code, v) = cloud_api(
        &api,
        TOKEN,
        "POST",
        "/servers",
        Some(&server("a", "cx23", json!(new))),
    );
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (409, Some("uniqueness_error")),
        "{v}"
    );
    let (code, v) = cloud_api(&api, TOKEN, "GET", "/servers/4242", None);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{v}"
    );
}

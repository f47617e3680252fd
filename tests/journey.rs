//! The journey against the local cloud (`harness::cloud`): the real binary, driven as a user
//! drives it, with `HCLOUD_ENDPOINT` and a token file. `upload` a small image, `create` a server
//! from the snapshot with a flake reference and see it deployed and confirmed (host key checked
//! against the `known_hosts` entry `create` wrote, strictly), two servers at once, a new release
//! deployed, a broken one rolled back (and `status` says so), power-off and deletion through the
//! API; no token in any output or journal. Bad input: each a clear one-line error, and nothing
//! left behind that was not asked to be kept.
//!
//! Run: `cargo test --test journey -- --nocapture` (as root; needs what `harness::cloud::missing`
//! names). Skips without them, or fails under `CI=true`.

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use harness::cloud::{self, LocalCloud, Options, ReleaseKind};
use serde_json::Value;

const ORG: &str = "acme";
const FLAKE: &str = "infra";
const ATTR: &str = "nixosConfigurations.web";

fn prerequisites(test: &str) -> bool {
    match cloud::missing() {
        None => true,
        Some(why) => harness::skip(test, &why),
    }
}

fn flake(minor: &str) -> String {
    format!("{ORG}/{FLAKE}/{minor}#{ATTR}")
}

/// The user: a home, a token file for each service, an SSH key registered in the project.
struct User {
    home: tempfile::TempDir,
    key: PathBuf,
    known_hosts: PathBuf,
    token_file: PathBuf,
    flakehub_token_file: PathBuf,
}

impl User {
    fn new(cloud: &LocalCloud) -> User {
        let home = tempfile::tempdir().unwrap();
        let key = cloud::user_key(cloud, "me");
        let token_file = home.path().join("hcloud-token");
        secret(&token_file, &format!("{}\n", cloud::TOKEN));
        let flakehub_token_file = home.path().join("flakehub-token");
        secret(&flakehub_token_file, &cloud.options.flakehub_token);
        User {
            known_hosts: home.path().join("known_hosts"),
            home,
            key,
            token_file,
            flakehub_token_file,
        }
    }

    fn command(&self, cloud: &LocalCloud, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_hcloud-nixos"));
        c.args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.home.path())
            .env("HCLOUD_ENDPOINT", cloud.endpoint())
            .env("HCLOUD_NIXOS_FLAKEHUB_URL", cloud.flakehub_url())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        c
    }

    /// `create NAMES... --flake REF` with the user's files and `extra`.
    fn create(
        &self,
        cloud: &LocalCloud,
        names: &[&str],
        reference: &str,
        extra: &[&str],
    ) -> tokio::process::Command {
        let mut args = vec!["create"];
        args.extend(names);
        let files = [
            self.token_file.display().to_string(),
            self.flakehub_token_file.display().to_string(),
            self.key.display().to_string(),
            self.known_hosts.display().to_string(),
        ];
        args.extend([
            "--flake",
            reference,
            "--token-file",
            &files[0],
            "--flakehub-token-file",
            &files[1],
            "--ssh-key",
            "me",
            "--ssh-identity",
            &files[2],
            "--known-hosts",
            &files[3],
        ]);
        args.extend(extra);
        self.command(cloud, &args)
    }

    /// `ssh root@ADDRESS COMMAND` as the user: the host key checked strictly against the
    /// `known_hosts` file create wrote.
    fn ssh(&self, address: &str, command: &str) -> Output {
        cloud::user_ssh(&self.known_hosts, &self.key, address)
            .arg(command)
            .output()
            .expect("run ssh")
    }
}

/// A file only its owner reads.
fn secret(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

async fn run(mut c: tokio::process::Command, limit: Duration) -> Output {
    tokio::time::timeout(limit, c.output())
        .await
        .unwrap_or_else(|_| panic!("the command took more than {limit:?}"))
        .expect("run hcloud-nixos")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn all_output(out: &Output) -> String {
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

/// Neither token appears in `what`.
fn assert_no_token(cloud: &LocalCloud, what: &str, where_: &str) {
    for token in [cloud::TOKEN, cloud.options.flakehub_token.as_str()] {
        assert!(!what.contains(token), "a token is in {where_}:\n{what}");
    }
}

/// An available snapshot as `upload` labels it (bad-input tests need no upload).
fn seed_snapshot(cloud: &LocalCloud) -> u64 {
    let labels = [
        ("hcloud-nixos/image-sha256".to_string(), "0".repeat(63)),
        ("hcloud-nixos/image-size".to_string(), "8388608".to_string()),
    ]
    .into_iter()
    .collect();
    cloud.api.with(|s| s.add_image("x86", labels))
}

/// The created servers of `create --json`.
fn created(out: &Output) -> Vec<Value> {
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap_or_else(|e| panic!("create --json: {e}\n{}", all_output(out)))
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn timeline(server: &Value) -> String {
    server["timeline"]
        .as_array()
        .map(|t| {
            t.iter()
                .map(|e| {
                    format!(
                        "{} {}s",
                        e["phase"].as_str().unwrap_or("?"),
                        e["at_seconds"]
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// `hcloud-nixos status --json` over SSH until `f` holds; the last status.
fn wait_status(
    user: &User,
    address: &str,
    what: &str,
    limit: Duration,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        let out = user.ssh(address, "hcloud-nixos status --json");
        if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) {
            if f(&v) {
                return v;
            }
            last = v;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("{what}: not within {limit:?}; last status: {last:#}");
}

fn api_servers(cloud: &LocalCloud) -> Vec<(u64, String, String)> {
    cloud.api.with(|s| {
        s.servers
            .values()
            .map(|x| (x.id, x.name.clone(), x.status.clone()))
            .collect()
    })
}

fn curl(cloud: &LocalCloud, method: &str, path: &str) -> Value {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-X", method, "-H"])
        .arg(format!("Authorization: Bearer {}", cloud::TOKEN))
        .arg(format!("{}{path}", cloud.endpoint()))
        .output()
        .expect("run curl");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// `upload` a small image: the snapshot's ID.
async fn upload(cloud: &LocalCloud, user: &User) -> u64 {
    let image = user.home.path().join("nixos.img");
    std::fs::write(&image, vec![7u8; 4 << 20]).unwrap();
    let mut args: Vec<String> = ["upload", "--architecture", "x86", "--token-file"]
        .map(String::from)
        .to_vec();
    args.push(user.token_file.display().to_string());
    args.extend(["--image".to_string(), image.display().to_string()]);
    args.extend(cloud.upload_args());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let up = run(user.command(cloud, &argv), Duration::from_secs(120)).await;
    assert!(up.status.success(), "upload failed:\n{}", all_output(&up));
    let snapshot: u64 = text(&up.stdout)
        .trim()
        .parse()
        .expect("upload prints the snapshot ID");
    assert_no_token(cloud, &all_output(&up), "upload's output");

    snapshot
}

/// `create web-1` from the snapshot: its ID, IPv4 address and `--json` record; its host key is
/// the one create wrote to known_hosts (ssh with StrictHostKeyChecking=yes gets in).
async fn create_web1(cloud: &LocalCloud, user: &User, snapshot: u64) -> (u64, String, Value) {
    let out = run(
        user.create(
            cloud,
            &["web-1"],
            &flake("0.1"),
            &["--json", "--timeout", "3m"],
        ),
        Duration::from_secs(200),
    )
    .await;
    let servers = created(&out);
    assert!(out.status.success(), "create failed:\n{}", all_output(&out));
    assert_no_token(cloud, &all_output(&out), "create's output");
    let web1 = servers[0].clone();
    assert_eq!(web1["version"], "0.1.1", "{web1:#}");
    let ip1 = web1["ipv4"].as_str().expect("an IPv4 address").to_string();
    let id1 = web1["id"].as_u64().unwrap();
    let image_used = cloud
        .api
        .with(|s| s.servers[&id1].body["image"]["id"].clone());
    assert_eq!(image_used, snapshot, "create took the snapshot upload made");
    let known = std::fs::read_to_string(&user.known_hosts).unwrap();
    assert!(
        known.contains(&ip1) && known.contains("ssh-ed25519"),
        "{known}"
    );
    let answer = user.ssh(&ip1, "hostname");
    assert!(
        answer.status.success(),
        "ssh with StrictHostKeyChecking=yes:\n{}",
        all_output(&answer)
    );
    assert_eq!(text(&answer.stdout).trim(), "web-1");

    (id1, ip1, web1)
}

/// No token in any server's whole journal.
fn no_token_in_journals(cloud: &LocalCloud) {
    for (id, name, _) in cloud.machines() {
        let journal = cloud
            .with_machine(id, |m| m.journal(&["-o", "cat"]))
            .unwrap_or_default();
        assert!(
            journal.contains("hcloud-nixos"),
            "{name}'s journal is empty?"
        );
        assert_no_token(cloud, &journal, &format!("{name}'s journal"));
    }
}

/// web-3 powered off and web-2 deleted through the API: their containers go.
fn power_off_and_delete(cloud: &LocalCloud, pair: &[Value]) {
    let id3 = pair.iter().find(|s| s["name"] == "web-3").unwrap()["id"]
        .as_u64()
        .unwrap();
    let id2 = pair.iter().find(|s| s["name"] == "web-2").unwrap()["id"]
        .as_u64()
        .unwrap();
    let listed = curl(
        cloud,
        "GET",
        "/servers?label_selector=hcloud-nixos/created-by=create",
    );
    assert_eq!(
        listed["servers"].as_array().map(Vec::len),
        Some(3),
        "{listed:#}"
    );
    curl(cloud, "POST", &format!("/servers/{id3}/actions/poweroff"));
    curl(cloud, "DELETE", &format!("/servers/{id2}"));
    let gone = harness::netns::poll(Duration::from_secs(20), Duration::from_millis(200), || {
        cloud.machines().len() == 1
    });
    assert!(
        gone,
        "machines after power-off and deletion: {:?}",
        cloud.machines()
    );
    let off = harness::netns::poll(Duration::from_secs(10), Duration::from_millis(100), || {
        curl(cloud, "GET", &format!("/servers/{id3}"))["server"]["status"] == "off"
    });
    assert!(off, "web-3 is not off");
    assert_eq!(
        curl(cloud, "GET", &format!("/servers/{id2}"))["error"]["code"],
        "not_found"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journey_upload_create_deploy_roll_back() {
    if !prerequisites("journey") {
        return;
    }
    let t0 = Instant::now();
    let log = |m: &str| eprintln!("[{:6.1}s] {m}", t0.elapsed().as_secs_f64());
    let cloud = LocalCloud::start(Options::default()).await;
    let user = User::new(&cloud);
    cloud.publish(ORG, FLAKE, ATTR, "0.1.1", ReleaseKind::Good);
    log(&format!(
        "local cloud at {}; FlakeHub has {ORG}/{FLAKE} 0.1.1",
        cloud.endpoint()
    ));

    let snapshot = upload(&cloud, &user).await;
    log(&format!("upload: snapshot {snapshot}"));
    let (_, ip1, web1) = create_web1(&cloud, &user, snapshot).await;
    log(&format!(
        "create web-1: deployed 0.1.1 at {ip1}; timeline: {}",
        timeline(&web1)
    ));
    log("ssh root@web-1 with the known_hosts entry create wrote (StrictHostKeyChecking=yes): ok");

    // a new release, and two more servers at once
    cloud.publish(ORG, FLAKE, ATTR, "0.1.2", ReleaseKind::Good);
    let two = tokio::spawn(run(
        user.create(
            &cloud,
            &["web-2", "web-3"],
            &flake("0.1"),
            &["--json", "--timeout", "3m"],
        ),
        Duration::from_secs(200),
    ));
    wait_status(
        &user,
        &ip1,
        "web-1 deploys 0.1.2",
        Duration::from_secs(60),
        |s| s["running"]["version"] == "0.1.2" && s["last_deploy"]["outcome"] == "success",
    );
    log("published 0.1.2: web-1 deployed it");
    let out = two.await.unwrap();
    assert!(
        out.status.success(),
        "create web-2 web-3:\n{}",
        all_output(&out)
    );
    let pair = created(&out);
    assert_eq!(pair.len(), 2);
    for s in &pair {
        assert_eq!(s["version"], "0.1.2", "{s:#}");
        log(&format!(
            "create {}: deployed 0.1.2; timeline: {}",
            s["name"],
            timeline(s)
        ));
    }

    // a broken release: rolled back, and status says so
    cloud.publish(ORG, FLAKE, ATTR, "0.1.3", ReleaseKind::Broken);
    wait_status(
        &user,
        &ip1,
        "web-1 rolls 0.1.3 back",
        Duration::from_secs(90),
        |s| s["last_deploy"]["version"] == "0.1.3" && s["last_deploy"]["outcome"] == "failed",
    );
    let status = user.ssh(&ip1, "hcloud-nixos status");
    let status = text(&status.stdout);
    assert!(
        status.contains("rolled back") && status.contains("0.1.2"),
        "{status}"
    );
    log(&format!("published broken 0.1.3: status says\n{status}"));

    no_token_in_journals(&cloud);
    log("no token in any server's journal, nor in upload's or create's output");
    power_off_and_delete(&cloud, &pair);
    log("web-3 powered off and web-2 deleted through the API: their containers are gone");
    drop(cloud);
    log("the cloud is gone: containers, namespaces, stand-ins");
}

/// Every mistake is refused before anything exists: one line, what to do, no server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_one_line_and_creates_nothing() {
    if !prerequisites("journey bad input") {
        return;
    }
    let cloud = LocalCloud::start(Options::default()).await;
    let user = User::new(&cloud);
    seed_snapshot(&cloud);
    cloud.publish(ORG, FLAKE, ATTR, "0.1.1", ReleaseKind::Good);
    let cases: Vec<(&str, Vec<&str>, String, &str)> = vec![
        (
            "unknown server type",
            vec!["--type", "cx99"],
            flake("0.1"),
            "unknown server type 'cx99'",
        ),
        (
            "unknown location",
            vec!["--location", "mars1"],
            flake("0.1"),
            "unknown location 'mars1'",
        ),
        (
            "no snapshot for arm",
            vec!["--type", "cax11"],
            flake("0.1"),
            "no snapshot made by `hcloud-nixos upload` for arm",
        ),
        (
            "a token the API refuses",
            vec![],
            flake("0.1"),
            "unauthorized",
        ),
        (
            "a flake FlakeHub does not have",
            vec![],
            format!("{ORG}/nothing/0.1#{ATTR}"),
            "--flake",
        ),
        (
            "a version FlakeHub does not have",
            vec![],
            flake("7.7"),
            "--flake",
        ),
    ];
    let mut failures = Vec::new();
    for (what, extra, reference, wanted) in &cases {
        // The token the API refuses is in the user's token file for that case only.
        let refused = what.contains("token");
        if refused {
            secret(&user.token_file, "not-the-token-0123456789\n");
        }
        let out = run(
            user.create(&cloud, &["web-1"], reference, extra),
            Duration::from_secs(60),
        )
        .await;
        if refused {
            secret(&user.token_file, &format!("{}\n", cloud::TOKEN));
        }
        let stderr = text(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        eprintln!("{what}: {}", stderr.trim());
        if out.status.success() || lines.len() != 1 || !stderr.contains(wanted) {
            failures.push(format!(
                "{what}: exit {}, wanted one line with {wanted:?}:\n{stderr}",
                out.status
            ));
        }
        assert_no_token(&cloud, &all_output(&out), what);
    }
    let servers = api_servers(&cloud);
    assert!(servers.is_empty(), "servers were created: {servers:?}");
    cloud
        .api
        .with(|s| assert_eq!(s.count(&harness::hcloud_api::Method::POST, "/servers"), 0));
    // A name the project has already: the API refuses it (uniqueness_error), nothing is created.
    let (taken, _) = cloud
        .api
        .with(|s| s.add_leftover("web-9", Default::default()));
    let out = run(
        user.create(&cloud, &["web-9"], &flake("0.1"), &[]),
        Duration::from_secs(60),
    )
    .await;
    let stderr = text(&out.stderr);
    eprintln!("a name already used: {}", stderr.trim());
    // (create checks the name only when it creates the server: a failure line, not a plan error.)
    if out.status.success()
        || !stderr.contains("web-9: failed: uniqueness_error: server name is already used")
    {
        failures.push(format!(
            "a name already used: exit {}:\n{stderr}",
            out.status
        ));
    }
    let servers = api_servers(&cloud);
    assert_eq!(servers.len(), 1, "{servers:?}");
    assert_eq!(servers[0].0, taken);
    assert!(cloud.machines().is_empty() && cloud.booting() == 0);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A server whose sshd never starts: create gives up after --timeout with one line and, asked
/// to, deletes the server (its container, namespaces and known_hosts entry go with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_ssh_is_deleted_when_asked() {
    if !prerequisites("journey silent server") {
        return;
    }
    let cloud = LocalCloud::start(Options::default()).await;
    let user = User::new(&cloud);
    seed_snapshot(&cloud);
    cloud.publish(ORG, FLAKE, ATTR, "0.1.1", ReleaseKind::Good);
    cloud.mask_sshd("mute-1");
    let out = run(
        user.create(
            &cloud,
            &["mute-1"],
            &flake("0.1"),
            &["--timeout", "25s", "--delete-on-failure"],
        ),
        Duration::from_secs(90),
    )
    .await;
    let stderr = text(&out.stderr);
    eprintln!("{stderr}");
    assert!(!out.status.success());
    let first = stderr
        .lines()
        .find(|l| l.contains("mute-1: failed"))
        .unwrap_or_default();
    assert!(
        first.contains("not deployed within 25s") && first.contains("SSH"),
        "{stderr}"
    );
    assert!(stderr.contains("was deleted"), "{stderr}");
    assert_no_token(&cloud, &all_output(&out), "create's output");
    assert!(api_servers(&cloud).is_empty(), "{:?}", api_servers(&cloud));
    cloud.settle(Duration::from_secs(30));
    let gone = harness::netns::poll(Duration::from_secs(20), Duration::from_millis(200), || {
        cloud.machines().is_empty()
    });
    assert!(gone, "machines left: {:?}", cloud.machines());
    let known = std::fs::read_to_string(&user.known_hosts).unwrap_or_default();
    assert!(
        !known.contains("mute-1"),
        "known_hosts still has mute-1:\n{known}"
    );
}

/// Seconds since the epoch.
fn epoch(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// When a unit in server `id` became active, in seconds since the epoch (microseconds).
fn unit_active_at(cloud: &LocalCloud, id: u64, unit: &str) -> f64 {
    let script = format!(
        "date -d \"$(systemctl show -p ActiveEnterTimestamp --value --timestamp=us+utc {unit})\" +%s.%N"
    );
    let out = cloud
        .exec(id, Duration::from_secs(10), "sh", &["-c", &script])
        .expect("the machine runs");
    text(&out.stdout).trim().parse().unwrap_or(f64::NAN)
}

/// The timeline's phases, as `create --json` names them.
const PHASES: [&str; 9] = [
    "api_call",
    "running",
    "first_ssh_answer",
    "network_configured",
    "agent_ready",
    "login",
    "fetch",
    "activation",
    "confirmed",
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One run's row: the phases, the total, what is ours, the boot (see `bench_journey`'s columns).
fn measure(cloud: &LocalCloud, server: &Value, t0: f64, end: f64) -> Vec<f64> {
    let id = server["id"].as_u64().unwrap();
    let phases = PHASES;
    let at = |phase: &str| {
        server["timeline"]
            .as_array()
            .and_then(|t| t.iter().find(|e| e["phase"] == phase))
            .and_then(|e| e["at_seconds"].as_f64())
            .unwrap_or(f64::NAN)
    };
    let running_at = cloud.api.with(|s| s.running_at.get(&id).map(|t| epoch(*t)));
    let running_at = running_at.unwrap_or(f64::NAN) - t0;
    let sshd_at = unit_active_at(cloud, id, "hcloud-local-sshd.service") - t0;
    let online_at = unit_active_at(cloud, id, "network-online.target") - t0;
    let fh_calls = cloud.dir().join(format!("servers/{id}/fh-calls"));
    let fh_at: f64 = std::fs::read_to_string(&fh_calls)
        .unwrap_or_default()
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(f64::NAN)
        - t0;
    // The switch of the release notes when it began (`<name> switch <epoch>`).
    let times = cloud.dir().join(format!("servers/{id}/activation-times"));
    let activated_at: f64 = std::fs::read_to_string(&times)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0.1.1 switch "))
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(f64::NAN)
        - t0;
    let ours = [
        at("api_call"),
        at("running") - running_at,
        at("first_ssh_answer") - sshd_at,
        (end - t0) - activated_at,
    ];
    let mut row: Vec<f64> = phases.iter().map(|p| at(p)).collect();
    row.push(end - t0);
    row.extend(ours);
    row.push(ours[..3].iter().sum());
    row.push(fh_at - online_at);
    row.push(sshd_at - running_at);
    row
}

/// The journey's timeline over `BENCH_RUNS` runs (default 5) of `create` (one server each,
/// deleted after), and the part that is ours. Run by tests/bench/journey.sh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: tests/bench/journey.sh"]
async fn bench_journey() {
    if !prerequisites("journey benchmark") {
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let cloud = LocalCloud::start(Options::default()).await;
    let user = User::new(&cloud);
    seed_snapshot(&cloud);
    cloud.publish(ORG, FLAKE, ATTR, "0.1.1", ReleaseKind::Good);
    let phases = PHASES;
    let mut columns: Vec<(String, Vec<f64>)> = phases
        .iter()
        .map(|p| (p.to_string(), Vec::new()))
        .chain(
            [
                "total (create's wall time)",
                "ours: create: API call",
                "ours: create: seeing `running`",
                "ours: create: first SSH answer after sshd started",
                "ours: agent confirming + create seeing it, from activation",
                "ours: create's waiting (API call, running, SSH)",
                "ours: agent: network-online to first fh call",
                "boot: container start to sshd started",
            ]
            .map(|c| (c.to_string(), Vec::new())),
        )
        .collect();
    for i in 0..runs {
        let name = format!("bench-{i}");
        let start = std::time::SystemTime::now();
        let out = run(
            user.create(
                &cloud,
                &[&name],
                &flake("0.1"),
                &["--json", "--timeout", "3m"],
            ),
            Duration::from_secs(200),
        )
        .await;
        let end = epoch(std::time::SystemTime::now());
        assert!(out.status.success(), "{}", all_output(&out));
        let server = created(&out).remove(0);
        let id = server["id"].as_u64().unwrap();
        let row = measure(&cloud, &server, epoch(start), end);
        eprintln!(
            "run {i}: {name} deployed in {:.2} s; create's waiting {:.2} s; agent network-online -> fh {:.2} s",
            row[9], row[14], row[15]
        );
        for ((_, col), v) in columns.iter_mut().zip(row) {
            col.push(v);
        }
        curl(&cloud, "DELETE", &format!("/servers/{id}"));
        harness::netns::poll(Duration::from_secs(20), Duration::from_millis(100), || {
            cloud.machines().is_empty()
        });
    }
    println!("\njourney benchmark: {runs} runs of `create` against the local cloud (seconds)");
    println!(
        "{:<52} {:>7} {:>7} {:>7}",
        "phase (at, from create's start)", "median", "min", "max"
    );
    for (name, v) in &columns {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        println!(
            "{name:<52} {:>7.2} {min:>7.2} {max:>7.2}",
            median(v.clone())
        );
    }
}

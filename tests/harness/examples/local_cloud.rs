//! The local cloud as a program (as root): the Hetzner Cloud API stand-in on loopback whose
//! servers are containers booting this machine's system with the agent, and a FlakeHub stand-in
//! with releases you publish. See `harness::cloud`.
//!
//! ```sh
//! cargo run --example local-cloud                # runs until Ctrl-C; prints what to export
//! cargo run --example local-cloud -- --journey   # upload, create, deploy a release, then clean up
//! ```
//!
//! While it runs, type `publish VERSION` (or `publish VERSION broken`) and Enter to publish a
//! release of `local/infra` (output `nixosConfigurations.web`), `servers` to list the machines.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use harness::cloud::{self, LocalCloud, Options, ReleaseKind};

const ORG: &str = "local";
const FLAKE: &str = "infra";
const ATTR: &str = "nixosConfigurations.web";

/// Set by Ctrl-C or SIGTERM: the cloud stops and cleans up.
static STOP: AtomicBool = AtomicBool::new(false);

fn stop_on_signals(runtime: &tokio::runtime::Runtime) {
    runtime.spawn(async {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        STOP.store(true, Ordering::SeqCst);
    });
}

/// Runs a command to its end (killed when the cloud is told to stop); whether it succeeded.
fn run(mut c: Command) -> bool {
    let Ok(mut child) = c.spawn() else {
        return false;
    };
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.success();
        }
        if STOP.load(Ordering::SeqCst) {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn main() {
    if let Some(why) = cloud::missing() {
        eprintln!("error: {why}");
        std::process::exit(1);
    }
    let journey = std::env::args().any(|a| a == "--journey");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let bin = match binary() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    stop_on_signals(&runtime);
    let cloud = runtime.block_on(LocalCloud::start(Options::default()));
    let key = cloud::user_key(&cloud, "local");
    cloud.publish(ORG, FLAKE, ATTR, "0.1.1", ReleaseKind::Good);
    let env = Env::new(&cloud, &key);
    let ok = if journey {
        run_journey(&cloud, &env, &bin)
    } else {
        serve(&runtime, &cloud, &env, &bin);
        true
    };
    eprintln!("stopping the local cloud: containers, namespaces, stand-ins ...");
    drop(cloud);
    eprintln!("stopped; nothing is left behind");
    std::process::exit(if ok { 0 } else { 1 });
}

/// The binary: `HCLOUD_NIXOS_BIN`, else built now by cargo (fast when it is up to date).
fn binary() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("HCLOUD_NIXOS_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "--bin", "hcloud-nixos"])
        .current_dir(harness::repo())
        .status()
        .map_err(|e| format!("cannot run cargo to build hcloud-nixos: {e}"))?;
    if !status.success() {
        return Err("cargo build --bin hcloud-nixos failed".into());
    }
    Ok(harness::binary())
}

/// What a user exports.
struct Env {
    vars: Vec<(String, String)>,
    key: PathBuf,
    known_hosts: PathBuf,
    token_file: PathBuf,
}

impl Env {
    fn new(cloud: &LocalCloud, key: &Path) -> Env {
        let token_file = cloud.dir().join("flakehub-token");
        std::fs::write(&token_file, &cloud.options.flakehub_token).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        Env {
            vars: vec![
                ("HCLOUD_ENDPOINT".into(), cloud.endpoint()),
                ("HCLOUD_TOKEN".into(), cloud::TOKEN.into()),
                ("HCLOUD_NIXOS_FLAKEHUB_URL".into(), cloud.flakehub_url()),
            ],
            key: key.to_path_buf(),
            known_hosts: cloud.dir().join("known_hosts"),
            token_file,
        }
    }

    fn command(&self, bin: &Path) -> Command {
        let mut c = Command::new(bin);
        for (k, v) in &self.vars {
            c.env(k, v);
        }
        c.stdin(Stdio::null());
        c
    }

    fn create_args(&self, name: &str) -> Vec<String> {
        [
            "create",
            name,
            "--flake",
            &format!("{ORG}/{FLAKE}/0.1#{ATTR}"),
            "--flakehub-token-file",
            &self.token_file.display().to_string(),
            "--ssh-key",
            "local",
            "--ssh-identity",
            &self.key.display().to_string(),
            "--known-hosts",
            &self.known_hosts.display().to_string(),
        ]
        .map(String::from)
        .to_vec()
    }
}

fn serve(runtime: &tokio::runtime::Runtime, cloud: &LocalCloud, env: &Env, bin: &Path) {
    println!("The local cloud runs. In another shell (as root):\n");
    for (k, v) in &env.vars {
        println!("  export {k}={v}");
    }
    println!(
        "\n  # an image (any small file; a snapshot is bookkeeping: servers boot this machine's system)"
    );
    println!("  truncate -s 8M /tmp/nixos.img");
    println!(
        "  {} upload --architecture x86 --image /tmp/nixos.img {}",
        bin.display(),
        cloud.upload_args().join(" ")
    );
    println!("  {} {}", bin.display(), env.create_args("web-1").join(" "));
    println!(
        "\nFlakeHub has {ORG}/{FLAKE} 0.1.1 ({ATTR}). Type `publish 0.1.2` (or `publish 0.1.3 broken`) here to publish a release, `servers` to list the machines; Ctrl-C stops the cloud and removes everything.\n"
    );
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let _ = runtime;
    let mut seen = 0;
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
        for note in cloud.notes().iter().skip(seen) {
            eprintln!("[cloud] {}", note.text);
            seen += 1;
        }
        while let Ok(line) = rx.try_recv() {
            command(cloud, line.trim());
        }
    }
}

fn command(cloud: &LocalCloud, line: &str) {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["publish", version] | ["publish", version, "good"] => {
            cloud.publish(ORG, FLAKE, ATTR, version, ReleaseKind::Good);
        }
        ["publish", version, "broken"] => {
            cloud.publish(ORG, FLAKE, ATTR, version, ReleaseKind::Broken);
        }
        ["servers"] => {
            for (id, name, ip) in cloud.machines() {
                println!("{id} {name} {ip}");
            }
        }
        [] => {}
        _ => eprintln!("commands: publish VERSION [broken] | servers"),
    }
}

/// The journey: upload an image, create web-1 from it, publish a release and watch it deployed.
fn run_journey(cloud: &LocalCloud, env: &Env, bin: &Path) -> bool {
    let t0 = Instant::now();
    let image = cloud.dir().join("nixos.img");
    std::fs::write(&image, vec![0u8; 8 << 20]).unwrap();
    let say = |s: &str| eprintln!("\n[{:5.1} s] $ {s}", t0.elapsed().as_secs_f64());
    say("hcloud-nixos upload --image nixos.img");
    let mut up = env.command(bin);
    up.args(["upload", "--architecture", "x86", "--image"])
        .arg(&image)
        .args(cloud.upload_args());
    if !run(up) {
        eprintln!("error: the upload failed");
        return false;
    }
    say(&format!(
        "hcloud-nixos create web-1 --flake {ORG}/{FLAKE}/0.1#{ATTR} ..."
    ));
    let mut create = env.command(bin);
    create.args(env.create_args("web-1"));
    if !run(create) {
        eprintln!("error: create failed");
        return false;
    }
    let Some((_, _, ip)) = cloud.machines().into_iter().find(|m| m.1 == "web-1") else {
        return false;
    };
    say("publish local/infra 0.1.2 on FlakeHub; the agent deploys it within its poll interval");
    cloud.publish(ORG, FLAKE, ATTR, "0.1.2", ReleaseKind::Good);
    let ssh = |cmd: &str| {
        cloud::user_ssh(&env.known_hosts, &env.key, &ip)
            .arg(cmd)
            .output()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && !STOP.load(Ordering::SeqCst) {
        let deployed = ssh("hcloud-nixos status --json")
            .ok()
            .and_then(|out| serde_json::from_slice::<serde_json::Value>(&out.stdout).ok())
            .is_some_and(|s| {
                s["running"]["version"] == "0.1.2"
                    && s["last_deploy"]["outcome"] == "success"
                    && s["in_flight"].is_null()
            });
        if deployed && let Ok(out) = ssh("hcloud-nixos status") {
            say(&format!("ssh root@{ip} hcloud-nixos status"));
            print!("{}", String::from_utf8_lossy(&out.stdout));
            return true;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!("error: 0.1.2 was not deployed within 60 s");
    false
}

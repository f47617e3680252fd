//! Fleet benchmark with whole agents: 40 `hcloud-nixos agent` processes (each a "server" of its
//! own: the agent bench's root, FlakeHub and metadata stand-ins, PID and UTS namespaces) in one
//! group against one real etcd, stand-in deploys (fh and switch-to-configuration stand-ins), a
//! poll interval of an hour. A release is published, `hcloud-nixos fleet announce` run, and the
//! time until every agent took its first step (asked its FlakeHub for the release) and until all
//! are deployed is printed. Run by tests/bench/fleet.sh; needs root, nix-bin and etcd.
//!
//! Options (environment): FLEET_AGENTS (40), FLEET_AGENTS_SLOTS (5).

use std::time::{Duration, Instant};

use harness::agent::{ATTR, Agent, Bench, FLAKE, Kind, ORG, Options};
use harness::etcd::Etcd;
use harness::flakehub::{Endpoint, rolling_version};

fn env(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn status(b: &Bench) -> String {
    b.state()
        .get("status")
        .and_then(|s| s.as_str())
        .unwrap_or("")
        .to_string()
}

fn main() {
    let n = env("FLEET_AGENTS", 40) as usize;
    let slots = env("FLEET_AGENTS_SLOTS", 5);
    let Some(etcd) = Etcd::start("fleet agents benchmark") else {
        std::process::exit(2);
    };
    let fleet = format!(
        "[fleet]\ngroup = \"web\"\nslots = {slots}\nbackend = \"etcd\"\n[fleet.etcd]\nendpoints = [\"{}\"]\nprefix = \"/bench\"\nlease_ttl = \"10s\"\n",
        etcd.url()
    );
    let t = Instant::now();
    let mut servers = Vec::new();
    for i in 0..n {
        let opts = Options {
            tables: fleet.clone(),
            hostname: Some(format!("web-{}", i + 1)),
            concurrent: true,
            poll_interval: "1h",
            ..Options::default()
        };
        let Some(b) = Bench::new(&format!("fleet-agents/web-{}", i + 1), opts) else {
            std::process::exit(2);
        };
        b.metadata.set_document(
            "metadata/instance-id",
            Some(format!("{}", 2000 + i).as_bytes()),
        );
        let base = b.current_system();
        b.flakehub
            .publish(ORG, FLAKE, &rolling_version(0, "agents"), ATTR, &base);
        servers.push(b);
    }
    println!(
        "fleet agents benchmark: {n} whole agents, slots of {slots}, one etcd, poll interval 1h; benches ready after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let agents: Vec<Agent> = servers.iter().map(Bench::start_agent).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !servers.iter().all(|b| status(b).starts_with("up to date")) {
        assert!(Instant::now() < deadline, "the agents did not all start");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The release, on every server's FlakeHub (one FlakeHub in a real fleet).
    let version = rolling_version(1, "agents");
    let mut paths = Vec::new();
    for b in &servers {
        let path = b.system("r1", Kind::Normal);
        b.flakehub.publish(ORG, FLAKE, &version, ATTR, &path);
        b.flakehub.reset_counts();
        paths.push(path);
    }
    std::thread::sleep(Duration::from_secs(2));
    let before: usize = servers.iter().map(|b| b.flakehub.total_requests()).sum();
    let t0 = Instant::now();
    let run = servers[0].run_split(&["fleet"], &["announce", &version], Duration::from_secs(30));
    assert!(run.ok(), "fleet announce: {}", run.all());
    let announced = t0.elapsed();
    let mut first = vec![None; n];
    let mut deployed = vec![None; n];
    let deadline = t0 + Duration::from_secs(600);
    while deployed.iter().any(Option::is_none) {
        for (i, b) in servers.iter().enumerate() {
            if first[i].is_none() && b.flakehub.requests(Endpoint::Output) > 0 {
                first[i] = Some(t0.elapsed());
            }
            if deployed[i].is_none()
                && b.current_system() == paths[i]
                && status(b).starts_with(&format!("up to date: {version}"))
            {
                deployed[i] = Some(t0.elapsed());
            }
        }
        assert!(
            Instant::now() < deadline,
            "not all deployed within 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let max = |v: &[Option<Duration>]| v.iter().flatten().max().copied().unwrap_or_default();
    println!(
        "idle before the announce: {before} FlakeHub requests in 2 s (poll interval 1h: none expected)"
    );
    println!(
        "announce: the command took {:.3} s; the last of {n} agents took its first step after {:.3} s; all deployed after {:.2} s",
        announced.as_secs_f64(),
        max(&first).as_secs_f64(),
        max(&deployed).as_secs_f64()
    );
    drop(agents);
    drop(servers);
    drop(etcd);
}

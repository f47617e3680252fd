//! Fleet benchmark: a group of 1,000 agents' coordinators in this process against one real etcd,
//! slots of 50, one FlakeHub stand-in. Each "agent" follows the group as the real one does
//! (resolve through the group, report its record, wait for the poll interval or the group's
//! news) and deploys instantly when a new release is desired. Prints: FlakeHub requests per
//! minute while idle (against one poller's worth), the time from `fleet announce` to the last
//! agent having seen the release and having checked it against FlakeHub, the time until all are
//! deployed, etcd's memory, and the agents' CPU while idle. Run by tests/bench/fleet.sh.
//!
//! Options (environment): FLEET_BENCH_AGENTS (1000), FLEET_BENCH_SLOTS (50), FLEET_BENCH_POLL_S
//! (60: each agent's poll interval, ±10 %), FLEET_BENCH_IDLE_S (60: the idle measurement),
//! FLEET_BENCH_TTL (10s: the members' lease TTL).

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use harness::etcd;
use harness::flakehub::{FlakeHub, rolling_version};
use hcloud_nixos::agent::flakehub::Client as FlakeHubClient;
use hcloud_nixos::agent::flakeref::FlakeRef;
use hcloud_nixos::fleet::{
    Acquired, Coordinator, Ending, FleetCommand, Member, MemberRecord, Purpose, from_user_data,
    run_command,
};

const ORG: &str = "acme";
const FLAKE: &str = "infra";
const ATTR: &str = "nixosConfigurations.web";

fn env(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn publish(hub: &FlakeHub, n: u64) -> String {
    let version = rolling_version(n, "bench");
    let path = format!("/nix/store/{n:0>32}-nixos-system-web-{n}");
    hub.publish(ORG, FLAKE, &version, ATTR, &path);
    version
}

/// This process's CPU time (user + system) so far.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    let hz = 100; // sysconf(_SC_CLK_TCK) on Linux
    Duration::from_millis(ticks * 1000 / hz)
}

/// A process's resident memory in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// What one agent saw and did.
#[derive(Default, Clone)]
struct Seen {
    /// The version it runs.
    running: Option<String>,
    /// When it first woke with the announced release desired, and when it had checked it.
    woke: Option<Instant>,
    checked: Option<Instant>,
    deployed: Option<Instant>,
}

struct Shared {
    seen: Vec<Seen>,
    /// The announced version, once announced.
    announced: Option<String>,
    holding: u64,
    most: u64,
}

/// One agent: follows the group, deploys instantly when the release changes.
async fn agent(i: usize, c: Coordinator, hub: String, poll: Duration, shared: Rc<RefCell<Shared>>) {
    let client = FlakeHubClient::new(&hub, None).expect("FlakeHub client");
    let flake: FlakeRef = format!("{ORG}/{FLAKE}/0.1").parse().expect("reference");
    loop {
        let answer = hcloud_nixos::fleet::resolve(&c, &client, &flake, ATTR).await;
        let version = match answer {
            Ok(r) => r.version,
            Err(e) => {
                eprintln!("agent {i}: {e}");
                String::new()
            }
        };
        let wanted = {
            let mut s = shared.borrow_mut();
            let announced = s.announced.clone();
            let me = &mut s.seen[i];
            if announced.as_deref() == Some(version.as_str()) && me.checked.is_none() {
                me.checked = Some(Instant::now());
            }
            !version.is_empty() && me.running.as_deref() != Some(version.as_str())
        };
        if wanted {
            deploy(i, &c, &version, &shared).await;
        }
        let running = shared.borrow().seen[i].running.clone();
        c.report(MemberRecord {
            status: format!("up to date: {}", running.as_deref().unwrap_or("-")),
            running,
            desired: Some(version),
            ok: true,
            ..MemberRecord::default()
        });
        let wait = poll.mul_f64(0.9 + fastrand::f64() * 0.2);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = c.news() => {
                let mut s = shared.borrow_mut();
                if s.announced.is_some() && s.seen[i].woke.is_none() {
                    s.seen[i].woke = Some(Instant::now());
                }
            }
        }
    }
}

/// Takes a slot (or waits for the group's news), deploys instantly, gives it back.
async fn deploy(i: usize, c: &Coordinator, version: &str, shared: &Rc<RefCell<Shared>>) {
    let purpose = Purpose::Deploy {
        release: version.to_string(),
    };
    match c.acquire(purpose).await {
        Ok(Acquired::Granted(g)) => {
            {
                let mut s = shared.borrow_mut();
                s.holding += 1;
                s.most = s.most.max(s.holding);
                s.seen[i].running = Some(version.to_string());
                s.seen[i].deployed = Some(Instant::now());
            }
            let ending = Ending::Deployed {
                release: version.to_string(),
            };
            if let Err(e) = c.release(g, ending).await {
                eprintln!("agent {i}: {e}");
            }
            shared.borrow_mut().holding -= 1;
        }
        Ok(_) => {}
        Err(e) => eprintln!("agent {i}: {e}"),
    }
}

fn main() {
    let agents = env("FLEET_BENCH_AGENTS", 1000) as usize;
    let slots = env("FLEET_BENCH_SLOTS", 50);
    let poll = Duration::from_secs(env("FLEET_BENCH_POLL_S", 60));
    let idle = Duration::from_secs(env("FLEET_BENCH_IDLE_S", 60));
    let ttl = std::env::var("FLEET_BENCH_TTL").unwrap_or_else(|_| "10s".into());
    let Some(etcd) = etcd::Etcd::start("fleet benchmark") else {
        std::process::exit(2);
    };
    let hub = FlakeHub::start("127.0.0.1:0").expect("FlakeHub stand-in");
    let v1 = publish(&hub, 1);
    let fleet = from_user_data(&serde_json::json!({
        "group": "bench", "slots": slots, "backend": "etcd",
        "etcd": {"endpoints": [etcd.url()], "prefix": "/bench", "lease_ttl": ttl}
    }))
    .expect("configuration")
    .resolve()
    .expect("valid");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let shared = Rc::new(RefCell::new(Shared {
        seen: vec![Seen::default(); agents],
        announced: None,
        holding: 0,
        most: 0,
    }));
    let local = tokio::task::LocalSet::new();
    let started = Instant::now();
    for i in 0..agents {
        let me = Member {
            id: format!("{}", 100_000 + i),
            host: format!("bench-{i}"),
        };
        let c = Coordinator::new(&fleet, me).expect("coordinator");
        local.spawn_local(agent(i, c, hub.url(), poll, shared.clone()));
    }
    let operator = Coordinator::new(
        &fleet,
        Member {
            id: "operator".into(),
            host: "ci".into(),
        },
    )
    .expect("coordinator");
    println!(
        "fleet benchmark: {agents} agents' coordinators in one process, slots of {slots}, one etcd, poll interval {poll:?}, lease TTL {ttl}"
    );
    rt.block_on(local.run_until(async {
        // Everyone up: running release 1, the group's desired release.
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let all = (shared.borrow().seen.iter())
                .all(|a| a.running.as_deref() == Some(v1.as_str()));
            if all {
                break;
            }
            assert!(Instant::now() < deadline, "the agents did not all deploy release 1");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let status = operator.status().await.expect("status");
        let alive = status.members.iter().filter(|m| m.alive).count();
        println!(
            "start: all {agents} running release 1 after {:.1} s; {alive} members alive, poller {}",
            started.elapsed().as_secs_f64(),
            status.poller.as_deref().unwrap_or("none")
        );
        // Idle.
        tokio::time::sleep(Duration::from_secs(5)).await;
        hub.reset_counts();
        let (cpu0, t0) = (cpu(), Instant::now());
        tokio::time::sleep(idle).await;
        let (cpu1, t1) = (cpu(), Instant::now());
        let minutes = (t1 - t0).as_secs_f64() / 60.0;
        let requests = hub.total_requests() as f64 / minutes;
        let one_poller = 2.0 * 60.0 / poll.as_secs_f64();
        let cpu_per_min = (cpu1 - cpu0).as_secs_f64() / minutes;
        println!(
            "idle: {requests:.1} FlakeHub requests per minute (one poller's worth: {one_poller:.1}; without the group: {:.0})",
            one_poller * agents as f64
        );
        println!(
            "idle: agents' CPU {:.2} s per minute for {agents} ({:.2} ms per agent per minute); etcd resident {:.1} MiB",
            cpu_per_min,
            cpu_per_min * 1000.0 / agents as f64,
            etcd.pid().map_or(0.0, rss_mib)
        );
        // Announce release 2 (CI right after flakehub-push).
        let v2 = publish(&hub, 2);
        shared.borrow_mut().announced = Some(v2.clone());
        hub.reset_counts();
        let announce = FleetCommand::Announce {
            version: v2.clone(),
            flake: Some(format!("{ORG}/{FLAKE}")),
        };
        let t_announce = Instant::now();
        run_command(&operator, &announce, true).await.expect("announce");
        let deadline = t_announce + Duration::from_secs(600);
        loop {
            let all = (shared.borrow().seen.iter())
                .all(|a| a.deployed.is_some_and(|d| d > t_announce));
            if all {
                break;
            }
            assert!(Instant::now() < deadline, "not all deployed release 2");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let s = shared.borrow();
        let last = |f: fn(&Seen) -> Option<Instant>| {
            s.seen
                .iter()
                .filter_map(f)
                .max()
                .map_or(f64::NAN, |t| (t - t_announce).as_secs_f64())
        };
        let woke = s.seen.iter().filter(|a| a.woke.is_some()).count();
        println!(
            "announce: the last of {woke} agents woke with it after {:.3} s; the last checked it against FlakeHub after {:.3} s",
            last(|a| a.woke),
            last(|a| a.checked)
        );
        println!(
            "announce: all {agents} deployed (instant deploys, slots of {slots}) after {:.2} s; most at once {} ; {} FlakeHub requests",
            last(|a| a.deployed),
            s.most,
            hub.total_requests()
        );
        println!("etcd resident after the rollout: {:.1} MiB", etcd.pid().map_or(0.0, rss_mib));
    }));
    drop(etcd);
}

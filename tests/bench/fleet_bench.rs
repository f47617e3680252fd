//! Fleet benchmark: forty agents on loopback against one real etcd, one group of forty with five
//! slots, all seeing a new release at once. Each deploy is instant and its confirmation takes a
//! fixed time; prints how long until all forty are deployed and the most simultaneous deploys
//! seen (which must be the slot count). Run by tests/bench/fleet.sh.
//!
//! Options (environment): FLEET_BENCH_AGENTS (40), FLEET_BENCH_SLOTS (5),
//! FLEET_BENCH_CONFIRM_MS (200), FLEET_BENCH_POLL_MS (100: polls are jittered 0.5x..1.5x).

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use harness::etcd;
use hcloud_nixos::fleet::{Acquired, Coordinator, Ending, Member, Purpose, from_user_data};

fn env(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let agents = env("FLEET_BENCH_AGENTS", 40);
    let slots = env("FLEET_BENCH_SLOTS", 5);
    let confirm = Duration::from_millis(env("FLEET_BENCH_CONFIRM_MS", 200));
    let poll = env("FLEET_BENCH_POLL_MS", 100);
    let Some(etcd) = etcd::Etcd::start("fleet benchmark") else {
        std::process::exit(2);
    };
    let cfg = from_user_data(&serde_json::json!({
        "group": "bench", "slots": slots, "backend": "etcd",
        "etcd": {"endpoints": [etcd.url()], "prefix": "/bench"}
    }))
    .expect("configuration");
    let fleet = cfg.resolve().expect("valid");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let holding = Rc::new(Cell::new(0u64));
    let most = Rc::new(Cell::new(0u64));
    let polls = Rc::new(Cell::new(0u64));
    let done_at = Rc::new(std::cell::RefCell::new(Vec::new()));
    let start = Instant::now();
    for i in 0..agents {
        let c = Coordinator::new(
            &fleet,
            Member {
                id: format!("{}", 100_000 + i),
                host: format!("bench-{i}"),
            },
        )
        .expect("coordinator");
        let (holding, most, polls, done_at) = (
            holding.clone(),
            most.clone(),
            polls.clone(),
            done_at.clone(),
        );
        local.spawn_local(async move {
            let release = "2026.11.21".to_string();
            loop {
                polls.set(polls.get() + 1);
                match c
                    .acquire(Purpose::Deploy {
                        release: release.clone(),
                    })
                    .await
                {
                    Ok(Acquired::Granted(g)) => {
                        holding.set(holding.get() + 1);
                        most.set(most.get().max(holding.get()));
                        // The deploy is instant; confirming it takes `confirm`.
                        tokio::time::sleep(confirm).await;
                        holding.set(holding.get() - 1);
                        c.release(g, Ending::Deployed { release })
                            .await
                            .expect("release");
                        done_at.borrow_mut().push(start.elapsed());
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("agent {i}: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(fastrand::u64(poll / 2..poll * 3 / 2)))
                    .await;
            }
        });
    }
    rt.block_on(local);
    let total = start.elapsed();
    let done = done_at.borrow();
    let ideal = confirm * (agents.div_ceil(slots) as u32);
    println!(
        "fleet benchmark: {agents} agents, {slots} slots, confirm {confirm:?}, poll ~{poll} ms"
    );
    println!(
        "all {} deployed after {:.2} s (ideal {:.2} s: {} waves of {confirm:?}); {} acquire calls",
        done.len(),
        total.as_secs_f64(),
        ideal.as_secs_f64(),
        agents.div_ceil(slots),
        polls.get()
    );
    println!(
        "most simultaneous deploys seen: {} (slots: {slots})",
        most.get()
    );
    drop(etcd);
    if most.get() != slots || done.len() as u64 != agents {
        eprintln!("FAILED: expected exactly {slots} at once and {agents} deployed");
        std::process::exit(1);
    }
}

//! Fleet coordination against a real etcd (Debian's etcd-server, started here on loopback ports
//! in a temporary directory) and against a FleetLock stand-in. The "servers" are agents of the
//! fleet module: separate processes (this test binary run again as `fleet_child`), each with its
//! own etcd client and id, or tasks with coordinators of their own. Without etcd the etcd tests
//! print SKIP, and fail under CI=true.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use harness::{etcd, fleetlock};
use hcloud_nixos::fleet::{
    Acquired, Coordinator, Ending, ErrorKind, FleetConfig, Member, Purpose, from_user_data,
};

const TTL: &str = "2s";

fn fleet_config(backend: &str, url: &str, group: &str, slots: u32) -> FleetConfig {
    let mut v = serde_json::json!({"group": group, "slots": slots, "backend": backend});
    if backend == "etcd" {
        v["etcd"] = serde_json::json!({"endpoints": [url], "prefix": "/test", "lease_ttl": TTL});
    } else {
        v["fleetlock"] = serde_json::json!({"url": url});
        v["pause_on_failure"] = serde_json::json!(false);
    }
    from_user_data(&v).unwrap()
}

fn coordinator(cfg: &FleetConfig, id: &str) -> Coordinator {
    let fleet = cfg.resolve().unwrap();
    Coordinator::new(
        &fleet,
        Member {
            id: id.to_string(),
            host: format!("web-{id}"),
        },
    )
    .unwrap()
}

fn canary(cfg: &FleetConfig, on: bool) -> FleetConfig {
    FleetConfig {
        canary: Some(on),
        ..cfg.clone()
    }
}

fn deploy(release: &str) -> Purpose {
    Purpose::Deploy {
        release: release.to_string(),
    }
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Waits until `acquire` grants, polling with jitter; panics after `limit`.
async fn wait_granted(
    c: &Coordinator,
    purpose: Purpose,
    limit: Duration,
) -> hcloud_nixos::fleet::SlotGuard {
    let deadline = Instant::now() + limit;
    loop {
        match c.acquire(purpose.clone()).await {
            Ok(Acquired::Granted(g)) => return g,
            Ok(other) => assert!(
                Instant::now() < deadline,
                "no slot within {limit:?}: {}",
                other.status_line()
            ),
            Err(e) => panic!("acquire failed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(30..90))).await;
    }
}

/// (id, start ms, end ms) deploy windows; none may overlap another when there is one slot.
fn assert_one_at_a_time(mut windows: Vec<(String, u128, u128)>) {
    windows.sort_by_key(|w| w.1);
    for pair in windows.windows(2) {
        assert!(
            pair[1].1 >= pair[0].2,
            "deploys overlap: {} ran {}..{} and {} started at {}",
            pair[0].0,
            pair[0].1,
            pair[0].2,
            pair[1].0,
            pair[1].1
        );
    }
}

/// The most deploy windows open at one instant (an end at the same millisecond as a start
/// counts as before it).
fn max_overlap(windows: &[(String, u128, u128)]) -> usize {
    let mut events: Vec<(u128, i32)> = windows.iter().flat_map(|w| [(w.1, 1), (w.2, -1)]).collect();
    events.sort();
    let (mut open, mut most) = (0i32, 0i32);
    for (_, d) in events {
        open += d;
        most = most.max(open);
    }
    most as usize
}

// ---- the child process: one agent ------------------------------------------------------------

/// Not a test of its own: the body of the agent processes the tests start (this binary run
/// again with FLEET_CHILD set). Without FLEET_CHILD it does nothing.
#[test]
fn fleet_child() {
    let Ok(mode) = std::env::var("FLEET_CHILD") else {
        return;
    };
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set"));
    let cfg = fleet_config(&var("FLEET_BACKEND"), &var("FLEET_URL"), "web", 1);
    let c = coordinator(&cfg, &var("FLEET_ID"));
    if mode == "member" {
        return member_child(&c);
    }
    let rt = runtime();
    rt.block_on(async {
        match mode.as_str() {
            // Takes the slot and holds it until killed.
            "holder" => {
                let g = wait_granted(&c, deploy("1"), Duration::from_secs(30)).await;
                println!("HELD slot {:?}", g.slot());
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            // Deploys `FLEET_DEPLOYS` times, each `FLEET_DEPLOY_MS` long, and prints the windows.
            "agent" => {
                let n: u32 = var("FLEET_DEPLOYS").parse().unwrap();
                let ms: u64 = var("FLEET_DEPLOY_MS").parse().unwrap();
                for i in 0..n {
                    let g =
                        wait_granted(&c, deploy(&format!("r{i}")), Duration::from_secs(60)).await;
                    let start = now_ms();
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    let end = now_ms();
                    println!("WINDOW {start} {end}");
                    c.release(
                        g,
                        Ending::Deployed {
                            release: format!("r{i}"),
                        },
                    )
                    .await
                    .unwrap();
                }
            }
            other => panic!("unknown FLEET_CHILD mode {other}"),
        }
    });
}

fn spawn_child(mode: &str, backend: &str, url: &str, id: &str, extra: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "fleet_child",
        "--exact",
        "--nocapture",
        "--quiet",
        "--test-threads=1",
    ])
    .env("FLEET_CHILD", mode)
    .env("FLEET_BACKEND", backend)
    .env("FLEET_URL", url)
    .env("FLEET_ID", id)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().expect("the test binary again")
}

/// Several agent processes, one slot: their deploys run one after another.
fn processes_take_turns(backend: &str, url: &str) {
    let children: Vec<(String, Child)> = (1..=3)
        .map(|i| {
            let id = format!("{}{i}", &backend[..1]);
            let child = spawn_child(
                "agent",
                backend,
                url,
                &id,
                &[("FLEET_DEPLOYS", "2"), ("FLEET_DEPLOY_MS", "300")],
            );
            (id, child)
        })
        .collect();
    let mut windows = Vec::new();
    for (id, child) in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "agent {id} failed");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(rest) = line.strip_prefix("WINDOW ") {
                let (a, b) = rest.split_once(' ').unwrap();
                windows.push((id.clone(), a.parse().unwrap(), b.parse().unwrap()));
            }
        }
    }
    assert_eq!(windows.len(), 6, "every agent deployed twice: {windows:?}");
    assert_one_at_a_time(windows);
}

/// Starts a holder process and waits until it says it holds the slot.
fn start_holder(backend: &str, url: &str, id: &str) -> Child {
    use std::io::BufRead;
    let mut child = spawn_child("holder", backend, url, id, &[]);
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with("HELD") => break,
            Some(_) => {}
            None => panic!("the holder process ended without taking the slot"),
        }
    }
    child
}

// ---- etcd --------------------------------------------------------------------------------

#[test]
fn etcd_agents_in_processes_never_overlap() {
    let Some(etcd) = etcd::Etcd::start("etcd_agents_in_processes_never_overlap") else {
        return;
    };
    processes_take_turns("etcd", &etcd.url());
}

#[test]
fn etcd_tasks_never_overlap_and_waiters_see_the_holder() {
    let Some(etcd) = etcd::Etcd::start("etcd_tasks_never_overlap") else {
        return;
    };
    let cfg = fleet_config("etcd", &etcd.url(), "web", 1);
    runtime().block_on(async {
        let coordinators: Vec<Coordinator> =
            (1..=5).map(|i| coordinator(&cfg, &i.to_string())).collect();
        let first = wait_granted(&coordinators[0], deploy("2"), Duration::from_secs(5)).await;
        assert_eq!(first.slot(), Some(0));
        match coordinators[1].acquire(deploy("2")).await.unwrap() {
            w @ Acquired::Waiting { .. } => assert_eq!(
                w.status_line(),
                "waiting for a fleet slot: 1 of 1 taken by web-1"
            ),
            other => panic!("expected to wait: {other:?}"),
        }
        let status = coordinators[1].status().await.unwrap();
        assert_eq!(status.holders.len(), 1);
        assert_eq!(status.holders[0].id, "1");
        assert_eq!(status.holders[0].purpose, deploy("2"));
        coordinators[0]
            .release(
                first,
                Ending::Deployed {
                    release: "2".into(),
                },
            )
            .await
            .unwrap();

        let windows = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let local = tokio::task::LocalSet::new();
        for c in coordinators {
            let windows = windows.clone();
            local.spawn_local(async move {
                for r in ["3", "4"] {
                    let g = wait_granted(&c, deploy(r), Duration::from_secs(30)).await;
                    let start = now_ms();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let name = format!("{} {r}", c.fleet().group);
                    windows.borrow_mut().push((name, start, now_ms()));
                    c.release(g, Ending::Deployed { release: r.into() })
                        .await
                        .unwrap();
                }
            });
        }
        local.await;
        let windows = windows.borrow().clone();
        assert_eq!(windows.len(), 10);
        assert_one_at_a_time(windows);
    });
}

#[test]
fn etcd_two_slots_are_used_and_never_exceeded() {
    let Some(etcd) = etcd::Etcd::start("etcd_two_slots") else {
        return;
    };
    let cfg = fleet_config("etcd", &etcd.url(), "web", 2);
    runtime().block_on(async {
        let windows = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let local = tokio::task::LocalSet::new();
        for i in 0..8 {
            let c = coordinator(&cfg, &format!("s{i}"));
            let windows = windows.clone();
            local.spawn_local(async move {
                let g = wait_granted(&c, deploy("9"), Duration::from_secs(30)).await;
                let start = now_ms();
                tokio::time::sleep(Duration::from_millis(150)).await;
                windows
                    .borrow_mut()
                    .push((format!("s{i}"), start, now_ms()));
                c.release(
                    g,
                    Ending::Deployed {
                        release: "9".into(),
                    },
                )
                .await
                .unwrap();
            });
        }
        local.await;
        let windows = windows.borrow().clone();
        assert_eq!(windows.len(), 8);
        assert_eq!(max_overlap(&windows), 2, "{windows:?}");
    });
}

#[test]
fn etcd_killed_holder_loses_the_slot_when_its_lease_expires() {
    let Some(etcd) = etcd::Etcd::start("etcd_killed_holder") else {
        return;
    };
    let mut holder = start_holder("etcd", &etcd.url(), "dead");
    let cfg = fleet_config("etcd", &etcd.url(), "web", 1);
    runtime().block_on(async {
        let next = coordinator(&cfg, "next");
        // The holder is alive: its lease is kept, however long we wait.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(matches!(
            next.acquire(deploy("1")).await.unwrap(),
            Acquired::Waiting { .. }
        ));
        let _ = holder.kill();
        let _ = holder.wait();
        let killed = Instant::now();
        let g = wait_granted(&next, deploy("1"), Duration::from_secs(10)).await;
        let after = killed.elapsed();
        assert!(
            after <= Duration::from_secs(5),
            "the slot came back only after {after:?}"
        );
        println!("the killed holder's slot came back after {after:?} (lease TTL {TTL})");
        next.release(g, Ending::Done).await.unwrap();
    });
}

#[test]
fn etcd_a_failed_release_pauses_the_group_until_resumed() {
    let Some(etcd) = etcd::Etcd::start("etcd_a_failed_release_pauses") else {
        return;
    };
    let cfg = fleet_config("etcd", &etcd.url(), "web", 2);
    runtime().block_on(async {
        let a = coordinator(&cfg, "a");
        let b = coordinator(&cfg, "b");
        let g = wait_granted(&a, deploy("5"), Duration::from_secs(5)).await;
        a.release(
            g,
            Ending::Failed {
                release: "5".into(),
                reason: "health check web failed".into(),
            },
        )
        .await
        .unwrap();
        match b.acquire(deploy("5")).await.unwrap() {
            Acquired::Paused(p) => {
                assert_eq!((p.release.as_str(), p.by.as_str()), ("5", "a"));
                assert_eq!(p.reason, "health check web failed");
            }
            other => panic!("expected a pause: {other:?}"),
        }
        // Another release, and reboots, are not paused.
        let g = wait_granted(&b, deploy("6"), Duration::from_secs(5)).await;
        b.release(g, Ending::Done).await.unwrap();
        let g = wait_granted(&b, Purpose::Reboot, Duration::from_secs(5)).await;
        b.release(g, Ending::Done).await.unwrap();
        let status = b.status().await.unwrap();
        assert_eq!(status.paused.len(), 1);
        assert!(
            status
                .describe()
                .contains("paused: release 5 failed on web-a")
        );
        assert_eq!(b.resume(Some("5")).await.unwrap(), ["5"]);
        assert!(b.resume(None).await.unwrap().is_empty());
        let g = wait_granted(&b, deploy("5"), Duration::from_secs(5)).await;
        b.release(
            g,
            Ending::Deployed {
                release: "5".into(),
            },
        )
        .await
        .unwrap();

        // Without pause_on_failure a failure is not recorded.
        let quiet = FleetConfig {
            pause_on_failure: Some(false),
            ..cfg.clone()
        };
        let c = coordinator(&quiet, "c");
        assert!(!c.report_failure("7", "broken").await.unwrap());
        assert!(matches!(
            b.acquire(deploy("7")).await.unwrap(),
            Acquired::Granted(_)
        ));
    });
}

#[test]
fn etcd_canary_goes_first_and_its_failure_pauses_the_fleet() {
    let Some(etcd) = etcd::Etcd::start("etcd_canary") else {
        return;
    };
    let cfg = FleetConfig {
        pause_on_failure: Some(false),
        ..fleet_config("etcd", &etcd.url(), "web", 2)
    };
    runtime().block_on(async {
        let can = coordinator(&canary(&cfg, true), "c1");
        let fleet = coordinator(&cfg, "f1");
        // No canary registered yet: the fleet is not held back.
        let g = wait_granted(&fleet, deploy("1"), Duration::from_secs(5)).await;
        fleet
            .release(
                g,
                Ending::Deployed {
                    release: "1".into(),
                },
            )
            .await
            .unwrap();

        let g = wait_granted(&can, deploy("2"), Duration::from_secs(5)).await;
        match fleet.acquire(deploy("2")).await.unwrap() {
            w @ Acquired::Waiting { .. } => assert!(
                w.status_line()
                    .contains("not yet confirmed by a canary (web-c1)"),
                "{}",
                w.status_line()
            ),
            other => panic!("the fleet must wait for the canary: {other:?}"),
        }
        can.release(
            g,
            Ending::Deployed {
                release: "2".into(),
            },
        )
        .await
        .unwrap();
        let g = wait_granted(&fleet, deploy("2"), Duration::from_secs(5)).await;
        fleet
            .release(
                g,
                Ending::Deployed {
                    release: "2".into(),
                },
            )
            .await
            .unwrap();

        // A canary's failure pauses the group even without pause_on_failure.
        let g = wait_granted(&can, deploy("3"), Duration::from_secs(5)).await;
        can.release(
            g,
            Ending::Failed {
                release: "3".into(),
                reason: "rolled back".into(),
            },
        )
        .await
        .unwrap();
        assert!(matches!(
            fleet.acquire(deploy("3")).await.unwrap(),
            Acquired::Paused(_)
        ));
        let status = fleet.status().await.unwrap();
        assert_eq!(status.confirmed, ["2"]);
        assert_eq!(status.canaries, ["web-c1 (id c1)"]);
        assert!(fleet.forget_canary("c1").await.unwrap());
        assert_eq!(fleet.resume(None).await.unwrap(), ["3"]);
        assert!(matches!(
            fleet.acquire(deploy("3")).await.unwrap(),
            Acquired::Granted(_)
        ));
    });
}

#[test]
fn etcd_acquire_is_reentrant_for_a_restarted_agent() {
    let Some(etcd) = etcd::Etcd::start("etcd_reentrant") else {
        return;
    };
    let cfg = fleet_config("etcd", &etcd.url(), "web", 1);
    runtime().block_on(async {
        let first = coordinator(&cfg, "a");
        let g = wait_granted(&first, deploy("1"), Duration::from_secs(5)).await;
        // The agent restarts mid-deploy: a new coordinator with the same id keeps the slot.
        drop(first);
        let again = coordinator(&cfg, "a");
        let g2 = wait_granted(&again, deploy("1"), Duration::from_secs(1)).await;
        assert_eq!(g2.slot(), g.slot());
        g.abandon();
        // The new keep-alive holds it past the TTL.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let other = coordinator(&cfg, "b");
        assert!(matches!(
            other.acquire(deploy("1")).await.unwrap(),
            Acquired::Waiting { .. }
        ));
        g2.abandon();
        again.release_own(Ending::Done).await.unwrap();
        assert!(matches!(
            other.acquire(deploy("1")).await.unwrap(),
            Acquired::Granted(_)
        ));
    });
}

#[test]
fn etcd_a_deploys_slot_is_kept_through_its_reboot() {
    let Some(etcd) = etcd::Etcd::start("etcd_reboot") else {
        return;
    };
    let mut cfg = fleet_config("etcd", &etcd.url(), "web", 1);
    cfg.etcd.as_mut().unwrap().reboot_ttl = Some("8s".into());
    runtime().block_on(async {
        let a = coordinator(&cfg, "a");
        let other = coordinator(&cfg, "b");
        let deploying = wait_granted(&a, deploy("1"), Duration::from_secs(5)).await;
        // The release needs a reboot: the same slot, now for the reboot.
        let rebooting = wait_granted(&a, Purpose::Reboot, Duration::from_secs(1)).await;
        assert_eq!(rebooting.slot(), deploying.slot());
        let status = other.status().await.unwrap();
        assert_eq!(status.holders[0].purpose, Purpose::Reboot);
        // The server goes down: nothing refreshes the lease, yet the slot outlives lease_ttl.
        deploying.abandon();
        rebooting.abandon();
        drop(a);
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(matches!(
            other.acquire(deploy("1")).await.unwrap(),
            Acquired::Waiting { .. }
        ));
        // Back from the reboot and confirmed: the agent gives it back.
        let back = coordinator(&cfg, "a");
        back.release_own(Ending::Deployed {
            release: "1".into(),
        })
        .await
        .unwrap();
        let g = wait_granted(&other, deploy("1"), Duration::from_secs(1)).await;
        other.release(g, Ending::Done).await.unwrap();
    });
}

#[test]
fn etcd_down_nobody_deploys_and_no_stale_slot_after() {
    let Some(mut etcd) = etcd::Etcd::start("etcd_down") else {
        return;
    };
    let cfg = fleet_config("etcd", &etcd.url(), "web", 1);
    let rt = runtime();
    let (a, b, held) = rt.block_on(async {
        let a = coordinator(&cfg, "a");
        let b = coordinator(&cfg, "b");
        let held = wait_granted(&a, deploy("1"), Duration::from_secs(5)).await;
        (a, b, held)
    });
    etcd.stop();
    rt.block_on(async {
        let t = Instant::now();
        let e = b.acquire(deploy("1")).await.unwrap_err();
        assert!(e.unreachable(), "{e}");
        assert_eq!(e.kind, ErrorKind::Unreachable);
        assert!(e.to_string().starts_with("etcd unreachable ("), "{e}");
        assert!(!e.to_string().contains('\n'));
        assert!(
            t.elapsed() < Duration::from_secs(12),
            "took {:?}",
            t.elapsed()
        );
        let fresh = coordinator(&cfg, "c");
        assert!(fresh.acquire(deploy("1")).await.unwrap_err().unreachable());
        // The holder finishes while etcd is away: its release fails, and its keep-alive stops.
        let e = a.release(held, Ending::Done).await.unwrap_err();
        assert!(e.unreachable(), "{e}");
    });
    etcd.resume();
    rt.block_on(async {
        // The stale slot goes when its lease runs out (etcd renews leases at a restart).
        let g = wait_granted(&b, deploy("1"), Duration::from_secs(15)).await;
        let status = b.status().await.unwrap();
        assert_eq!(status.holders.len(), 1);
        assert_eq!(status.holders[0].id, "b");
        b.release(g, Ending::Done).await.unwrap();
        assert!(b.status().await.unwrap().holders.is_empty());
    });
}

#[test]
fn etcd_over_tls_with_a_client_certificate() {
    let Some(etcd) = etcd::Etcd::start_tls("etcd_over_tls") else {
        return;
    };
    let certs = etcd.certs().unwrap().to_path_buf();
    let mut cfg = fleet_config("etcd", &etcd.url(), "web", 1);
    let tls = cfg.etcd.as_mut().unwrap();
    tls.ca_file = Some(certs.join("ca.pem"));
    tls.cert_file = Some(certs.join("client.pem"));
    tls.key_file = Some(certs.join("client-key.pem"));
    runtime().block_on(async {
        let a = coordinator(&cfg, "a");
        let g = wait_granted(&a, deploy("1"), Duration::from_secs(10)).await;
        assert_eq!(a.status().await.unwrap().holders.len(), 1);
        a.release(g, Ending::Done).await.unwrap();
        // Without the client certificate etcd refuses the handshake: no slot, an error.
        let mut anonymous = cfg.clone();
        let e = anonymous.etcd.as_mut().unwrap();
        e.cert_file = None;
        e.key_file = None;
        let b = coordinator(&anonymous, "b");
        let err = b.acquire(deploy("1")).await.unwrap_err();
        println!("without a client certificate: {err}");
        assert!(!err.message.contains('\n'), "{err}");
    });
}

#[test]
fn etcd_unreachable_from_the_start_is_an_unreachable_error() {
    let cfg = fleet_config("etcd", "http://127.0.0.1:9", "web", 1);
    runtime().block_on(async {
        let c = coordinator(&cfg, "a");
        let e = c.acquire(Purpose::Reboot).await.unwrap_err();
        assert!(e.unreachable(), "{e}");
        assert!(c.status().await.unwrap_err().unreachable());
    });
}

// ---- FleetLock -----------------------------------------------------------------------------

#[test]
fn fleetlock_agents_in_processes_never_overlap() {
    let server = fleetlock::FleetLockStandin::start(1);
    processes_take_turns("fleetlock", &server.url());
    assert_eq!(server.protocol_errors(), 0);
    assert!(server.holders("web").is_empty());
}

#[test]
fn fleetlock_slots_are_shared_and_given_back() {
    let server = fleetlock::FleetLockStandin::start(2);
    let cfg = fleet_config("fleetlock", &server.url(), "web", 2);
    runtime().block_on(async {
        let a = coordinator(&cfg, "4711");
        let b = coordinator(&cfg, "4712");
        let c = coordinator(&cfg, "4713");
        let ga = wait_granted(&a, deploy("1"), Duration::from_secs(5)).await;
        let gb = wait_granted(&b, Purpose::Reboot, Duration::from_secs(5)).await;
        match c.acquire(deploy("1")).await.unwrap() {
            w @ Acquired::Waiting { .. } => {
                let line = w.status_line();
                assert!(line.contains("409 failed_lock"), "{line}");
                assert!(line.contains("holders unknown"), "{line}");
            }
            other => panic!("expected to wait: {other:?}"),
        }
        assert_eq!(server.holders("web"), ["4711", "4712"]);
        // Recursive: the holder asking again (a restarted agent) keeps its slot.
        assert!(matches!(
            a.acquire(deploy("1")).await.unwrap(),
            Acquired::Granted(_)
        ));
        a.release(
            ga,
            Ending::Deployed {
                release: "1".into(),
            },
        )
        .await
        .unwrap();
        let gc = wait_granted(&c, deploy("1"), Duration::from_secs(5)).await;
        b.release(gb, Ending::Done).await.unwrap();
        c.release(gc, Ending::Done).await.unwrap();
        assert!(server.holders("web").is_empty());
        // What FleetLock cannot express.
        assert!(!a.report_failure("1", "x").await.unwrap());
        assert_eq!(
            a.resume(None).await.unwrap_err().kind,
            ErrorKind::Unsupported
        );
        let status = a.status().await.unwrap();
        assert!(!status.holders_known);
        assert!(status.describe().contains("fleetlock: holders unknown"));
    });
    assert_eq!(server.protocol_errors(), 0);
}

#[test]
fn fleetlock_killed_holder_keeps_its_slot_until_it_comes_back() {
    let server = fleetlock::FleetLockStandin::start(1);
    let mut holder = start_holder("fleetlock", &server.url(), "dead");
    let _ = holder.kill();
    let _ = holder.wait();
    let cfg = fleet_config("fleetlock", &server.url(), "web", 1);
    runtime().block_on(async {
        let next = coordinator(&cfg, "next");
        // FleetLock has no leases: the dead server's slot stays taken...
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(matches!(
            next.acquire(deploy("1")).await.unwrap(),
            Acquired::Waiting { .. }
        ));
        // ...until it boots again and reports steady state.
        let back = coordinator(&cfg, "dead");
        back.release_own(Ending::Done).await.unwrap();
        let g = wait_granted(&next, deploy("1"), Duration::from_secs(5)).await;
        next.release(g, Ending::Done).await.unwrap();
    });
}

#[test]
fn fleetlock_down_nobody_deploys_and_it_works_again_after() {
    let mut server = fleetlock::FleetLockStandin::start(1);
    let cfg = fleet_config("fleetlock", &server.url(), "web", 1);
    let rt = runtime();
    let a = coordinator(&cfg, "a");
    let b = coordinator(&cfg, "b");
    let held = rt.block_on(wait_granted(&a, deploy("1"), Duration::from_secs(5)));
    server.stop();
    rt.block_on(async {
        let e = b.acquire(deploy("1")).await.unwrap_err();
        assert!(e.unreachable(), "{e}");
        assert!(e.to_string().starts_with("fleetlock unreachable ("), "{e}");
        assert!(
            a.release(held, Ending::Done)
                .await
                .unwrap_err()
                .unreachable()
        );
    });
    server.resume();
    rt.block_on(async {
        // The holder reports steady state again once the server is back (the agent retries).
        a.release_own(Ending::Done).await.unwrap();
        let g = wait_granted(&b, deploy("1"), Duration::from_secs(5)).await;
        b.release(g, Ending::Done).await.unwrap();
    });
    assert!(server.holders("web").is_empty());
}

#[test]
fn fleetlock_standin_enforces_the_protocol_header() {
    let server = fleetlock::FleetLockStandin::start(1);
    let status = runtime().block_on(async {
        hcloud_nixos::plumbing::tls::client_builder()
            .build()
            .unwrap()
            .post(format!("{}/v1/pre-reboot", server.url()))
            .json(&serde_json::json!({"client_params": {"id": "x", "group": "web"}}))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status.as_u16(), 400);
    assert_eq!(server.protocol_errors(), 1);
    assert!(server.holders("web").is_empty());
}

// ---- credentials in URLs -------------------------------------------------------------------

const SECRET: &str = "s3cret-Pa55";

/// `http://user:SECRET@host:port` for a server at `url`.
fn with_credentials(url: &str, user: &str) -> String {
    url.replacen("://", &format!("://{user}:{SECRET}@"), 1)
}

#[test]
fn credentials_in_urls_never_reach_an_error_or_debug_output() {
    let mut server = fleetlock::FleetLockStandin::start(1);
    let url = with_credentials(&server.url(), "agent");
    server.stop();
    let fleetlock = fleet_config("fleetlock", &url, "web", 1);
    let etcd = fleet_config(
        "etcd",
        &with_credentials("http://127.0.0.1:9", "root"),
        "web",
        1,
    );
    runtime().block_on(async {
        for cfg in [&fleetlock, &etcd] {
            let c = coordinator(cfg, "a");
            let debug = format!("{c:?} {:?}", cfg.resolve().unwrap());
            assert!(!debug.contains(SECRET), "{debug}");
            let e = c.acquire(deploy("1")).await.unwrap_err();
            assert!(e.unreachable(), "{e}");
            assert!(!e.message.contains(SECRET), "{e}");
            assert!(
                e.message.contains("127.0.0.1:"),
                "the error names no server: {e}"
            );
            let e = c.release_own(Ending::Done).await.unwrap_err();
            assert!(!e.message.contains(SECRET), "{e}");
        }
    });
}

#[test]
fn fleetlock_credentials_in_the_url_are_sent_as_basic_auth() {
    let server = fleetlock::FleetLockStandin::start(1);
    server.require_basic_auth("agent", SECRET);
    let good = fleet_config(
        "fleetlock",
        &with_credentials(&server.url(), "agent"),
        "web",
        1,
    );
    let bad = fleet_config("fleetlock", &server.url(), "web", 1);
    runtime().block_on(async {
        let c = coordinator(&good, "a");
        let g = wait_granted(&c, deploy("1"), Duration::from_secs(5)).await;
        c.release(g, Ending::Done).await.unwrap();
        let anonymous = coordinator(&bad, "b");
        match anonymous.acquire(deploy("1")).await.unwrap() {
            w @ Acquired::Waiting { .. } => {
                assert!(w.status_line().contains("401"), "{}", w.status_line())
            }
            other => panic!("granted without credentials: {other:?}"),
        }
    });
    assert!(server.holders("web").is_empty());
}

// ---- the group: its poller, its desired release, its members ---------------------------------

use harness::flakehub::{Endpoint, FlakeHub, rolling_version};
use hcloud_nixos::agent::flakehub::Client as FlakeHubClient;
use hcloud_nixos::agent::flakeref::FlakeRef;
use hcloud_nixos::fleet::{FleetCommand, MemberRecord, run_command};

const ORG: &str = "acme";
const FLAKE: &str = "infra";
const ATTR: &str = "nixosConfigurations.web";

fn store_path(n: u64) -> String {
    format!("/nix/store/{n:0>32}-nixos-system-web-{n}")
}

/// Publishes release `0.1.<n>` on the stand-in; returns its version.
fn publish(hub: &FlakeHub, n: u64) -> String {
    let version = rolling_version(n, "group");
    hub.publish(ORG, FLAKE, &version, ATTR, &store_path(n));
    version
}

fn reference() -> FlakeRef {
    format!("{ORG}/{FLAKE}/0.1").parse().unwrap()
}

/// What a member's agent does, reduced to following: resolve through the group, report, and
/// wait for the poll interval or the group's news. `seen` gets each answer (a version or an
/// error) as it comes.
async fn follow(
    c: &Coordinator,
    hub: &str,
    poll: Duration,
    mut seen: impl FnMut(Result<String, String>),
) {
    let client = FlakeHubClient::new(hub, None).unwrap();
    let flake = reference();
    loop {
        let answer = hcloud_nixos::fleet::resolve(c, &client, &flake, ATTR)
            .await
            .map(|r| r.version)
            .map_err(|e| e.to_string());
        c.report(MemberRecord {
            running: answer.as_ref().ok().cloned(),
            status: match &answer {
                Ok(v) => format!("up to date: {v}"),
                Err(e) => format!("check failed: {e}"),
            },
            ok: answer.is_ok(),
            ..MemberRecord::default()
        });
        seen(answer);
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = c.news() => {}
        }
    }
}

/// Waits until `cond` holds on the group's status (read through `c`), at most `limit`.
async fn wait_status(
    c: &Coordinator,
    limit: Duration,
    what: &str,
    cond: impl Fn(&hcloud_nixos::fleet::FleetStatus) -> bool,
) -> hcloud_nixos::fleet::FleetStatus {
    let deadline = Instant::now() + limit;
    loop {
        let status = c.status().await.unwrap();
        if cond(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "not within {limit:?}: {what}\n{}",
            status.describe()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The body of a member process (`FLEET_CHILD=member`): follows, polling FlakeHub every 200 ms
/// when it is the poller, and prints each version it resolves.
fn member_child(c: &Coordinator) {
    let hub = std::env::var("FLEET_HUB").expect("FLEET_HUB");
    runtime().block_on(follow(c, &hub, Duration::from_millis(200), |answer| {
        println!(
            "RESOLVED {}",
            answer.unwrap_or_else(|e| format!("error {e}"))
        );
    }));
}

#[test]
fn etcd_the_poller_is_elected_killed_and_replaced_within_the_lease_ttl() {
    let Some(etcd) = etcd::Etcd::start("etcd_poller") else {
        return;
    };
    let hub = FlakeHub::start("127.0.0.1:0").unwrap();
    publish(&hub, 1);
    let cfg = fleet_config("etcd", &etcd.url(), "web", 1);
    let spawn = |id: &str| {
        spawn_child(
            "member",
            "etcd",
            &etcd.url(),
            id,
            &[("FLEET_HUB", hub.url().as_str())],
        )
    };
    let mut first = spawn("m1");
    let rt = runtime();
    let observer = coordinator(&cfg, "observer");
    rt.block_on(wait_status(
        &observer,
        Duration::from_secs(10),
        "m1 the poller",
        |s| s.poller.as_deref() == Some("web-m1 (id m1)"),
    ));
    let mut others = vec![spawn("m2"), spawn("m3")];
    rt.block_on(wait_status(
        &observer,
        Duration::from_secs(10),
        "three members",
        |s| s.members.iter().filter(|m| m.alive).count() == 3,
    ));
    // Idle: only the poller asks FlakeHub (two requests a poll, every 200 ms).
    hub.reset_counts();
    std::thread::sleep(Duration::from_secs(2));
    let idle = hub.total_requests();
    assert!(
        (10..=30).contains(&idle),
        "{idle} requests to FlakeHub in 2 s: one poller polling every 200 ms makes about 20"
    );
    let _ = first.kill();
    let _ = first.wait();
    let killed = Instant::now();
    let status = rt.block_on(wait_status(
        &observer,
        Duration::from_secs(10),
        "another poller",
        |s| s.poller.as_deref().is_some_and(|p| p != "web-m1 (id m1)"),
    ));
    let after = killed.elapsed();
    println!(
        "the poller was replaced {after:?} after it was killed (lease TTL {TTL}): {:?}",
        status.poller
    );
    assert!(
        after <= Duration::from_secs(4),
        "the new poller came after {after:?}"
    );
    // The new poller polls: a release published now reaches the others.
    let v2 = publish(&hub, 2);
    rt.block_on(wait_status(
        &observer,
        Duration::from_secs(5),
        "the group's desired release 2",
        |s| s.desired.as_ref().is_some_and(|d| d.version == v2),
    ));
    for mut o in others.drain(..) {
        let _ = o.kill();
        let _ = o.wait();
    }
}

#[test]
fn etcd_an_announce_reaches_every_member_at_once() {
    let Some(etcd) = etcd::Etcd::start("etcd_announce") else {
        return;
    };
    let hub = FlakeHub::start("127.0.0.1:0").unwrap();
    let v1 = publish(&hub, 1);
    let cfg = fleet_config("etcd", &etcd.url(), "web", 1);
    let url = hub.url();
    runtime().block_on(async {
        let seen = std::rc::Rc::new(std::cell::RefCell::new(std::collections::HashMap::new()));
        let local = tokio::task::LocalSet::new();
        for i in 0..5 {
            let c = coordinator(&cfg, &format!("a{i}"));
            let (seen, url) = (seen.clone(), url.clone());
            // A poll interval far longer than the test: only the group's news wakes them.
            local.spawn_local(async move {
                follow(&c, &url, Duration::from_secs(3600), |answer| {
                    seen.borrow_mut().insert(i, (answer, Instant::now()));
                })
                .await
            });
        }
        let operator = coordinator(&cfg, "operator");
        local
            .run_until(async {
                let all_at = |v: &str| {
                    let v = v.to_string();
                    let seen = seen.clone();
                    move || {
                        let s = seen.borrow();
                        s.len() == 5
                            && s.values()
                                .all(|(a, _): &(Result<String, String>, Instant)| {
                                    a.as_ref() == Ok(&v)
                                })
                    }
                };
                let ready = all_at(&v1);
                let deadline = Instant::now() + Duration::from_secs(10);
                while !ready() {
                    assert!(
                        Instant::now() < deadline,
                        "the members never all ran {v1}: {:?}",
                        seen.borrow()
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // The poller has written release 1; now CI publishes release 2 and announces it.
                wait_status(
                    &operator,
                    Duration::from_secs(5),
                    "release 1 desired",
                    |s| s.desired.as_ref().is_some_and(|d| d.version == v1),
                )
                .await;
                let v2 = publish(&hub, 2);
                hub.reset_counts();
                let announce = FleetCommand::Announce {
                    version: v2.clone(),
                    flake: Some(format!("{ORG}/{FLAKE}")),
                };
                let t0 = Instant::now();
                let said = run_command(&operator, &announce, true).await.unwrap();
                assert!(said.contains("announced"), "{said}");
                let done = all_at(&v2);
                while !done() {
                    assert!(
                        t0.elapsed() < Duration::from_secs(5),
                        "not every member saw {v2}: {:?}",
                        seen.borrow()
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let last = seen.borrow().values().map(|(_, at)| *at).max().unwrap();
                let took = last.duration_since(t0);
                println!("announce to the last of 5 members resolving it: {took:?}");
                assert!(took < Duration::from_secs(1), "took {took:?}");
                // Each member checked the release itself: the exact version and its output.
                assert!(
                    hub.requests(Endpoint::Version) >= 5,
                    "{}",
                    hub.requests(Endpoint::Version)
                );
                assert!(hub.requests(Endpoint::Output) >= 5);
            })
            .await;
    });
}

#[test]
fn etcd_a_desired_release_flakehub_does_not_serve_is_not_applied() {
    let Some(etcd) = etcd::Etcd::start("etcd_unserved") else {
        return;
    };
    let hub = FlakeHub::start("127.0.0.1:0").unwrap();
    let v1 = publish(&hub, 1);
    let cfg = fleet_config("etcd", &etcd.url(), "web", 1);
    let client = FlakeHubClient::new(&hub.url(), None).unwrap();
    let flake = reference();
    runtime().block_on(async {
        let poller = coordinator(&cfg, "p");
        let follower = coordinator(&cfg, "f");
        let operator = coordinator(&cfg, "operator");
        // The poller first, so that it is elected; it writes release 1.
        assert_eq!(
            hcloud_nixos::fleet::resolve(&poller, &client, &flake, ATTR)
                .await
                .unwrap()
                .version,
            v1
        );
        wait_status(&operator, Duration::from_secs(10), "p the poller", |s| {
            s.poller.as_deref() == Some("web-p (id p)")
        })
        .await;
        assert_eq!(
            hcloud_nixos::fleet::resolve(&poller, &client, &flake, ATTR)
                .await
                .unwrap()
                .version,
            v1
        );
        follower.report(MemberRecord::default());
        wait_status(&operator, Duration::from_secs(10), "two members", |s| {
            s.members.len() == 2
        })
        .await;
        let cases = [
            ("9.9.9", "FlakeHub has no release"),
            ("0.2.0", "FlakeHub has no release"),
        ];
        for (version, why) in cases {
            let bad = FleetCommand::Announce {
                version: version.into(),
                flake: None,
            };
            run_command(&operator, &bad, true).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            let e = loop {
                match hcloud_nixos::fleet::resolve(&follower, &client, &flake, ATTR).await {
                    Err(e) => break e.to_string(),
                    Ok(r) => assert!(
                        Instant::now() < deadline,
                        "{version} was never seen: {}",
                        r.version
                    ),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            println!("{e}");
            assert!(
                e.starts_with(&format!(
                    "the fleet group's desired release {version} (from announce from "
                )),
                "{e}"
            );
            assert!(e.contains("is not applied") && e.contains(why), "{e}");
            // The poller puts the group back on what FlakeHub serves at its next poll.
            assert_eq!(
                hcloud_nixos::fleet::resolve(&poller, &client, &flake, ATTR)
                    .await
                    .unwrap()
                    .version,
                v1
            );
            wait_status(
                &operator,
                Duration::from_secs(5),
                "release 1 desired again",
                |s| s.desired.as_ref().is_some_and(|d| d.version == v1),
            )
            .await;
        }
        // Served, but not within the follower's reference (0.1): refused too.
        let other = rolling_version(0, "other");
        let v = other.replace("0.1.0", "1.0.0");
        hub.publish(ORG, FLAKE, &v, ATTR, &store_path(7));
        run_command(
            &operator,
            &FleetCommand::Announce {
                version: v.clone(),
                flake: None,
            },
            true,
        )
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let e = loop {
            if let Err(e) = hcloud_nixos::fleet::resolve(&follower, &client, &flake, ATTR).await {
                break e.to_string();
            }
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            e.contains("does not match this server's reference acme/infra/0.1"),
            "{e}"
        );
        // A malformed version is refused by the command.
        let e = run_command(
            &operator,
            &FleetCommand::Announce {
                version: "1.0\nX".into(),
                flake: None,
            },
            true,
        )
        .await
        .unwrap_err();
        assert!(
            !e.message.contains('\n') && e.message.contains("not an exact version"),
            "{e}"
        );
    });
}

#[test]
fn etcd_fleet_status_lists_members_and_one_silent_after_its_lease_expired() {
    let Some(etcd) = etcd::Etcd::start("etcd_members") else {
        return;
    };
    let hub = FlakeHub::start("127.0.0.1:0").unwrap();
    let v1 = publish(&hub, 1);
    let cfg = fleet_config("etcd", &etcd.url(), "web", 1);
    let mut children: Vec<Child> = ["s1", "s2", "s3"]
        .iter()
        .map(|id| {
            spawn_child(
                "member",
                "etcd",
                &etcd.url(),
                id,
                &[("FLEET_HUB", hub.url().as_str())],
            )
        })
        .collect();
    let rt = runtime();
    let operator = coordinator(&cfg, "operator");
    rt.block_on(wait_status(
        &operator,
        Duration::from_secs(10),
        "three members up to date",
        |s| {
            s.members.len() == 3
                && s.members
                    .iter()
                    .all(|m| m.alive && m.record.running.as_deref() == Some(v1.as_str()))
        },
    ));
    let _ = children[1].kill();
    let _ = children[1].wait();
    let status = rt.block_on(wait_status(
        &operator,
        Duration::from_secs(6),
        "s2 silent",
        |s| s.members.iter().any(|m| m.record.id == "s2" && !m.alive),
    ));
    let text = status.describe();
    println!("{text}");
    assert!(text.contains("members: 3 (2 alive, 1 silent)"), "{text}");
    let line = text.lines().find(|l| l.starts_with("web-s2")).unwrap();
    assert!(line.contains("silent since"), "{line}");
    for id in ["s1", "s3"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("web-{id}")))
            .unwrap();
        assert!(line.contains("up to date"), "{line}");
    }
    let json: serde_json::Value = serde_json::from_str(
        &rt.block_on(run_command(
            &operator,
            &FleetCommand::Status { json: true },
            true,
        ))
        .unwrap(),
    )
    .unwrap();
    let members = json["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    assert!(
        members
            .iter()
            .any(|m| m["id"] == "s2" && m["alive"] == false)
    );
    // A server gone for good is forgotten; a live one is not.
    assert!(rt.block_on(operator.forget_member("s2")).unwrap());
    assert!(!rt.block_on(operator.forget_member("s1")).unwrap());
    assert_eq!(rt.block_on(operator.status()).unwrap().members.len(), 2);
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn etcd_unreachable_members_poll_flakehub_themselves_and_keep_the_slot_rules() {
    let Some(mut etcd) = etcd::Etcd::start("etcd_unreachable_follow") else {
        return;
    };
    let hub = FlakeHub::start("127.0.0.1:0").unwrap();
    let v1 = publish(&hub, 1);
    let cfg = fleet_config("etcd", &etcd.url(), "web", 1);
    let client = FlakeHubClient::new(&hub.url(), None).unwrap();
    let flake = reference();
    let rt = runtime();
    let (a, b) = (coordinator(&cfg, "a"), coordinator(&cfg, "b"));
    rt.block_on(async {
        for c in [&a, &b] {
            assert_eq!(
                hcloud_nixos::fleet::resolve(c, &client, &flake, ATTR)
                    .await
                    .unwrap()
                    .version,
                v1
            );
        }
        let operator = coordinator(&cfg, "operator");
        wait_status(
            &operator,
            Duration::from_secs(10),
            "a the poller, b a member",
            |s| s.poller.is_some() && s.members.len() == 2,
        )
        .await;
    });
    etcd.stop();
    let v2 = publish(&hub, 2);
    rt.block_on(async {
        // Give the members' sessions time to notice.
        tokio::time::sleep(Duration::from_secs(3)).await;
        hub.reset_counts();
        for c in [&a, &b] {
            // Each asks FlakeHub itself and learns of release 2...
            assert_eq!(
                hcloud_nixos::fleet::resolve(c, &client, &flake, ATTR)
                    .await
                    .unwrap()
                    .version,
                v2
            );
            // ...but takes no slot without etcd.
            let e = c.acquire(deploy(&v2)).await.unwrap_err();
            assert!(e.unreachable(), "{e}");
        }
        assert!(
            hub.requests(Endpoint::Version) >= 2,
            "the members did not ask FlakeHub themselves"
        );
    });
    etcd.resume();
    rt.block_on(async {
        let g = wait_granted(&a, deploy(&v2), Duration::from_secs(15)).await;
        a.release(g, Ending::Done).await.unwrap();
    });
}

#[test]
fn etcd_credentials_in_the_endpoints_authenticate_and_are_never_shown() {
    let Some(etcd) = etcd::Etcd::start("etcd_credentials") else {
        return;
    };
    runtime().block_on(async {
        use etcd_client::Permission;
        let mut root = etcd_client::Client::connect([etcd.url()], None)
            .await
            .unwrap();
        root.role_add("root").await.unwrap();
        root.user_add("root", "root-pw", None).await.unwrap();
        root.user_grant_role("root", "root").await.unwrap();
        root.role_add("fleet").await.unwrap();
        root.role_grant_permission("fleet", Permission::read_write("/test/").with_prefix())
            .await
            .unwrap();
        root.user_add("agent", SECRET, None).await.unwrap();
        root.user_grant_role("agent", "fleet").await.unwrap();
        root.auth_enable().await.unwrap();
    });
    let good = fleet_config("etcd", &with_credentials(&etcd.url(), "agent"), "web", 1);
    let anonymous = fleet_config("etcd", &etcd.url(), "web", 1);
    let wrong = fleet_config(
        "etcd",
        &etcd.url().replacen("://", "://agent:wrong-pw@", 1),
        "web",
        1,
    );
    runtime().block_on(async {
        let c = coordinator(&good, "a");
        let g = wait_granted(&c, deploy("1"), Duration::from_secs(5)).await;
        assert_eq!(c.status().await.unwrap().holders.len(), 1);
        c.release(g, Ending::Done).await.unwrap();
        for (cfg, password) in [(&anonymous, SECRET), (&wrong, "wrong-pw")] {
            let e = coordinator(cfg, "b")
                .acquire(deploy("1"))
                .await
                .unwrap_err();
            println!("{e}");
            assert!(!e.unreachable(), "{e}");
            assert!(!e.message.contains(password), "{e}");
        }
    });
}

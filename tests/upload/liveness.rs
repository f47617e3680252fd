//! A run's lease: every temporary resource carries `hcloud-nixos/live-until`, which the run moves
//! forward while it lives. `cleanup` leaves live runs alone (unless `--force`) and says so; once a
//! killed run's lease has run out, `cleanup` takes what it left.

use std::process::Command as StdCommand;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use harness::hcloud_api::Method;

use crate::*;

const LIVE_UNTIL: &str = "hcloud-nixos/live-until";

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Starts an upload that waits for SSH for ever, and returns once its server is powered on.
async fn hanging_upload(b: &Bench, extra: &[&str]) -> tokio::process::Child {
    b.api
        .with(|s| s.ssh_ready_after = Duration::from_secs(3600));
    let img = b.dir.path().join("img.raw");
    write(&img, &image_bytes(1 << 20, 70));
    let mut args = vec!["--image", img.to_str().unwrap(), "--architecture", "x86"];
    args.extend_from_slice(extra);
    let child = upload_cmd(b, &args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !b
        .api
        .with(|s| s.count(&Method::POST, "/actions/poweron") > 0 && !s.servers.is_empty())
    {
        assert!(t.elapsed() < Duration::from_secs(30), "never powered on");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child
}

async fn cleanup(b: &Bench, args: &[&str]) -> String {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_hcloud-nixos"));
    c.arg("cleanup").args(args);
    env(&mut c, b);
    let out = run(c).await;
    let err = text(&out.stderr);
    assert!(out.status.success(), "cleanup {args:?} failed: {err}");
    err
}

fn temporaries(b: &Bench) -> (Vec<u64>, Vec<u64>) {
    b.api.with(|s| {
        (
            s.servers.keys().copied().collect(),
            s.keys.keys().copied().collect(),
        )
    })
}

fn kill(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().unwrap().to_string();
    StdCommand::new("kill").args([sig, &pid]).status().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_leaves_a_live_upload_alone_unless_forced() {
    let Some(b) = bench("live-upload", None).await else {
        return;
    };
    let mut child = hanging_upload(&b, &[]).await;
    let (servers, keys) = temporaries(&b);
    assert_eq!((servers.len(), keys.len()), (1, 1));

    // Another machine's `cleanup --older-than 0s` while the upload streams for hours.
    let err = cleanup(&b, &["--older-than", "0s"]).await;
    let (s2, k2) = temporaries(&b);
    assert_eq!(
        (s2.len(), k2.len()),
        (1, 1),
        "cleanup deleted the server or key of a live upload\n{err}"
    );
    assert!(err.contains(&format!("server {}", servers[0])), "{err}");
    assert!(err.contains("live"), "{err}");
    assert!(err.contains("--force"), "{err}");

    // Told to, it deletes them all the same.
    let err = cleanup(&b, &["--older-than", "0s", "--force"]).await;
    assert_eq!(temporaries(&b), (vec![], vec![]), "{err}");
    kill(&child, "-KILL");
    let _ = child.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_runs_lease_runs_out_then_cleanup_takes_its_leftovers() {
    let Some(b) = bench("dead-upload", None).await else {
        return;
    };
    let mut child = hanging_upload(&b, &["--lease", "3s"]).await;
    let (servers, keys) = temporaries(&b);
    let live_until = |b: &Bench| -> u64 {
        b.api.with(|s| {
            let l = &s.servers[&servers[0]].labels;
            l.get(LIVE_UNTIL)
                .unwrap_or_else(|| panic!("no {LIVE_UNTIL} label: {l:?}"))
                .parse()
                .unwrap()
        })
    };
    let first = live_until(&b);
    assert!(first >= now_unix(), "the lease is over already");
    // The run moves its lease forward on the server and on the key.
    let t = Instant::now();
    while live_until(&b) <= first {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the lease was never renewed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.api.with(|s| {
        assert!(s.count(&Method::PUT, &format!("/v1/ssh_keys/{}", keys[0])) > 0);
        let key_until: u64 = s.keys[&keys[0]].labels[LIVE_UNTIL].parse().unwrap();
        assert!(key_until > first);
    });

    // Killed: nothing deletes its server. Until the lease runs out cleanup leaves it.
    kill(&child, "-KILL");
    let _ = child.wait().await;
    let err = cleanup(&b, &["--older-than", "0s"]).await;
    assert_eq!(temporaries(&b), (servers.clone(), keys.clone()), "{err}");
    let end = live_until(&b);
    while now_unix() <= end {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let err = cleanup(&b, &["--older-than", "0s"]).await;
    assert_eq!(temporaries(&b), (vec![], vec![]), "{err}");
    assert!(
        err.contains(&format!("deleted server {}", servers[0])),
        "{err}"
    );
}

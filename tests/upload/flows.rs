//! The uploader's flows: raw, compressed, qcow2 and URL images, verification, API errors, SSH
//! waits, signals, cleanup, several images in one run.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command as StdCommand;
use std::time::{Duration, Instant};

use harness::{axum, hcloud_api};
use hcloud_api::{Fault, Method, TOKEN, error_body};
use serde_json::Value;

use crate::*;
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_image_becomes_a_labelled_snapshot_and_reupload_changes_nothing() {
    let Some(b) = bench("raw", None).await else {
        return;
    };
    let raw = image_bytes(6 << 20, 1);
    let img = b.dir.path().join("nixos.raw");
    write(&img, &raw);
    let p = img.to_str().unwrap();
    let out = run(upload_cmd(
        &b,
        &[
            "--image",
            p,
            "--architecture",
            "x86",
            "--label",
            "env=test",
            "--description",
            "my image",
        ],
    ))
    .await;
    let id = snapshot_id(&out);
    assert_disk_holds(&b, &raw);
    assert_snapshot(&b, id, &raw, "x86");
    assert_nothing_left(&b);
    b.api.with(|s| {
        let img = &s.images[&id];
        assert_eq!(img.labels["env"], "test");
        assert_eq!(img.description, "my image");
        // The server was created stopped, labelled, with the default type and no datacenter.
        let create = s
            .requests
            .iter()
            .find(|r| r.method == Method::POST && r.path == "/v1/servers")
            .unwrap();
        assert_eq!(create.body["start_after_create"], false);
        assert_eq!(create.body["server_type"], "cx23");
        assert_eq!(create.body["labels"]["hcloud-nixos/temporary"], "true");
        assert!(create.body.get("datacenter").is_none());
        // Powered off through the API before the snapshot.
        let order: Vec<&str> = s
            .requests
            .iter()
            .filter(|r| r.method == Method::POST && r.path.contains("/actions/"))
            .map(|r| r.path.rsplit('/').next().unwrap())
            .collect();
        assert_eq!(
            order,
            ["enable_rescue", "poweron", "poweroff", "create_image"]
        );
        s.requests.clear();
    });
    assert!(
        !text(&out.stderr).contains(TOKEN),
        "the token leaked to stderr"
    );

    // Idempotent: same image again → same ID, no mutating call, fast.
    let t = Instant::now();
    let out = run(upload_cmd(&b, &["--image", p, "--architecture", "x86"])).await;
    assert_eq!(snapshot_id(&out), id);
    assert!(t.elapsed() < Duration::from_secs(5));
    b.api.with(|s| {
        assert_eq!(s.mutating_requests(), Vec::<String>::new());
        assert_eq!(s.images.len(), 1);
    });

    // --json gives details; --force uploads anyway.
    let out = run(upload_cmd(
        &b,
        &["--image", p, "--architecture", "x86", "--json"],
    ))
    .await;
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["snapshot_id"], id);
    assert_eq!(v[0]["reused"], true);
    assert_eq!(v[0]["sha256"], sha256_hex(&raw));
    let out = run(upload_cmd(
        &b,
        &["--image", p, "--architecture", "x86", "--force"],
    ))
    .await;
    let id2 = snapshot_id(&out);
    assert_ne!(id2, id);
    assert_nothing_left(&b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_images_zstd_xz_bz2_and_plain_transfer() {
    let Some(b) = bench("compressed", None).await else {
        return;
    };
    for (n, ext) in ["zst", "xz", "bz2"].iter().enumerate() {
        let raw = image_bytes(3 << 20, 10 + n as u32);
        let path = b.dir.path().join(format!("img.raw.{ext}"));
        let data = match *ext {
            "zst" => zstd::encode_all(&raw[..], 3).unwrap(),
            "xz" => {
                let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
                e.write_all(&raw).unwrap();
                e.finish().unwrap()
            }
            _ => {
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
                e.write_all(&raw).unwrap();
                e.finish().unwrap()
            }
        };
        write(&path, &data);
        let transfer = if *ext == "xz" { "none" } else { "zstd" };
        let out = run(upload_cmd(
            &b,
            &[
                "--image",
                path.to_str().unwrap(),
                "--architecture",
                "arm",
                "--transfer",
                transfer,
            ],
        ))
        .await;
        let id = snapshot_id(&out);
        assert_disk_holds(&b, &raw);
        assert_snapshot(&b, id, &raw, "arm");
        assert_nothing_left(&b);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_is_converted_locally() {
    let Some(b) = bench("qcow2", None).await else {
        return;
    };
    let raw = image_bytes(4 << 20, 3);
    let rawp = b.dir.path().join("src.raw");
    write(&rawp, &raw);
    let q = b.dir.path().join("img.qcow2");
    let st = StdCommand::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&rawp)
        .arg(&q)
        .status()
        .unwrap();
    assert!(st.success());
    let out = run(upload_cmd(
        &b,
        &["--image", q.to_str().unwrap(), "--architecture", "x86"],
    ))
    .await;
    let id = snapshot_id(&out);
    assert_disk_holds(&b, &raw);
    assert_snapshot(&b, id, &raw, "x86");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_is_downloaded_by_the_rescue_system_onto_a_loop_device() {
    let Some(mut b) = bench("url", None).await else {
        return;
    };
    // The disk is a loop device here (blkdiscard and sparse writes on a real block device).
    let backing = b.dir.path().join("loop-backing");
    let f = std::fs::File::create(&backing).unwrap();
    f.set_len(16 << 20).unwrap();
    let out = StdCommand::new("losetup")
        .args(["-f", "--show"])
        .arg(&backing)
        .output()
        .unwrap();
    if !out.status.success() {
        let msg = format!("url: losetup failed: {}", text(&out.stderr));
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
        eprintln!("SKIPPED {msg}");
        return;
    }
    let loopdev = PathBuf::from(text(&out.stdout).trim());
    struct Detach(PathBuf);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = StdCommand::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _detach = Detach(loopdev.clone());
    // Old contents that must not survive.
    std::fs::write(&backing, vec![0xAAu8; 16 << 20]).unwrap();
    b.disk = loopdev.clone();

    let raw = image_bytes(5 << 20, 4);
    let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
    e.write_all(&raw).unwrap();
    let body = e.finish().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new().route(
        "/images/nixos.raw.xz",
        axum::routing::get(move || {
            let body = body.clone();
            async move { body }
        }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let url = format!("http://127.0.0.1:{port}/images/nixos.raw.xz");
    let out = run(upload_cmd(&b, &["--image", &url, "--architecture", "x86"])).await;
    let id = snapshot_id(&out);
    // The same URL again: downloaded and hashed, then the existing snapshot is reused.
    let again = run(upload_cmd(&b, &["--image", &url, "--architecture", "x86"])).await;
    server.abort();
    assert_eq!(snapshot_id(&again), id);
    b.api.with(|s| {
        assert_eq!(s.count(&Method::POST, "/actions/create_image"), 1);
        assert_eq!(s.images.len(), 1);
    });
    assert_snapshot(&b, id, &raw, "x86");
    let mut dev = std::fs::read(&backing).unwrap();
    dev.truncate(raw.len());
    assert!(dev == raw, "the loop device does not hold the image");
    assert_nothing_left(&b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_catches_a_corrupted_write() {
    // Every command runs as asked; after the write, one byte of the disk is flipped.
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("corrupt.sh");
    std::fs::write(
        &wrapper,
        "#!/bin/bash\nbash -c \"$SSH_ORIGINAL_COMMAND\"; rc=$?\ncase \"$SSH_ORIGINAL_COMMAND\" in *'dd of='*) dev=$(cat \"$(dirname \"$0\")/dev\"); printf Z | dd of=\"$dev\" bs=1 seek=4096 conv=notrunc status=none;; esac\nexit $rc\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let Some(b) = bench("corrupt", Some(wrapper.to_str().unwrap())).await else {
        return;
    };
    std::fs::write(dir.path().join("dev"), b.disk.to_str().unwrap()).unwrap();
    let raw = image_bytes(2 << 20, 5);
    let img = b.dir.path().join("img.raw");
    write(&img, &raw);
    let out = run(upload_cmd(
        &b,
        &["--image", img.to_str().unwrap(), "--architecture", "x86"],
    ))
    .await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("verification failed"), "{err}");
    assert!(out.stdout.is_empty());
    assert_nothing_left(&b);
    b.api
        .with(|s| assert!(s.images.is_empty(), "a snapshot was made of a bad disk"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_retries_and_rate_limits() {
    let Some(b) = bench("api-errors", None).await else {
        return;
    };
    let raw = image_bytes(1 << 20, 6);
    let img = b.dir.path().join("img.raw");
    write(&img, &raw);
    let p = img.to_str().unwrap().to_string();

    // 422 is reported as Hetzner gives it, not retried, and the key made before is deleted.
    b.api.fault(Fault::answer(
        Method::POST,
        "/v1/servers",
        422,
        hcloud_api::fixture("error.invalid_input.example.json"),
    ));
    let out = run(upload_cmd(&b, &["--image", &p, "--architecture", "x86"])).await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("invalid_input: invalid input in field 'broken_field': is too long"),
        "{err}"
    );
    b.api
        .with(|s| assert_eq!(s.count(&Method::POST, "/v1/servers"), 1));
    assert_nothing_left(&b);

    // 429 with rate-limit headers, 409 conflict, 503 and 423: retried, then success.
    let reset = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 2;
    b.api.with(|s| s.requests.clear());
    let reset = reset.to_string();
    b.api.fault(
        Fault::answer(
            Method::POST,
            "/v1/ssh_keys",
            429,
            error_body(
                "rate_limit_exceeded",
                "limit of 3600 requests per hour reached",
            ),
        )
        .headers(&[
            ("RateLimit-Limit", "3600"),
            ("RateLimit-Remaining", "0"),
            ("RateLimit-Reset", &reset),
        ]),
    );
    b.api.fault(Fault::answer(
        Method::POST,
        "/actions/poweron",
        409,
        error_body(
            "conflict",
            "the resource has changed during the request, please retry",
        ),
    ));
    b.api.fault(
        Fault::answer(
            Method::GET,
            "/v1/actions/",
            503,
            error_body("unavailable", "service unavailable"),
        )
        .times(2),
    );
    b.api.fault(Fault::answer(
        Method::POST,
        "/actions/create_image",
        500,
        error_body("server_error", "error within the API backend"),
    ));
    let out = run(upload_cmd(&b, &["--image", &p, "--architecture", "x86"])).await;
    let id = snapshot_id(&out);
    assert_snapshot(&b, id, &raw, "x86");
    assert_nothing_left(&b);
    b.api.with(|s| {
        let keys: Vec<Instant> = s
            .requests
            .iter()
            .filter(|r| r.method == Method::POST && r.path == "/v1/ssh_keys")
            .map(|r| r.at)
            .collect();
        assert_eq!(keys.len(), 2, "429 was not retried exactly once");
        assert!(
            keys[1] - keys[0] >= Duration::from_millis(900),
            "429 retried without waiting for RateLimit-Reset"
        );
        assert_eq!(s.count(&Method::POST, "/actions/poweron"), 2);
        assert_eq!(s.count(&Method::POST, "/actions/create_image"), 2);
        assert!(s.faults.is_empty(), "not every fault was hit");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_not_ready_for_a_while_is_waited_for() {
    let Some(b) = bench("ssh-late", None).await else {
        return;
    };
    b.api.with(|s| s.ssh_ready_after = Duration::from_secs(4));
    let raw = image_bytes(1 << 20, 7);
    let img = b.dir.path().join("img.raw");
    write(&img, &raw);
    let t = Instant::now();
    let out = run(upload_cmd(
        &b,
        &["--image", img.to_str().unwrap(), "--architecture", "x86"],
    ))
    .await;
    let id = snapshot_id(&out);
    assert!(t.elapsed() >= Duration::from_secs(4));
    assert_snapshot(&b, id, &raw, "x86");
    assert!(
        b.sshd.log().contains("Accepted publickey"),
        "{}",
        b.sshd.log()
    );

    // And a rescue system that never answers fails within the SSH deadline, cleaning up.
    b.api
        .with(|s| s.ssh_ready_after = Duration::from_secs(3600));
    let c = upload_cmd(
        &b,
        &[
            "--image",
            img.to_str().unwrap(),
            "--architecture",
            "x86",
            "--force",
            "--ssh-timeout",
            "3s",
        ],
    );
    let out = run(c).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("did not let us in"),
        "{}",
        text(&out.stderr)
    );
    assert_nothing_left(&b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_upload_leaves_nothing_behind() {
    let Some(b) = bench("interrupt", None).await else {
        return;
    };
    b.api
        .with(|s| s.ssh_ready_after = Duration::from_secs(3600));
    let raw = image_bytes(1 << 20, 8);
    let img = b.dir.path().join("img.raw");
    write(&img, &raw);
    for sig in ["INT", "TERM"] {
        let child = upload_cmd(
            &b,
            &["--image", img.to_str().unwrap(), "--architecture", "x86"],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
        // Wait until the server is powered on (the upload waits for SSH then).
        let t = Instant::now();
        loop {
            let on = b
                .api
                .with(|s| s.count(&Method::POST, "/actions/poweron") > 0 && !s.servers.is_empty());
            if on {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the upload never powered on"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let pid = child.id().unwrap();
        StdCommand::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .expect("the upload did not stop after a signal")
            .unwrap();
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(err.contains("interrupted"), "{err}");
        assert!(err.contains("nothing was left behind"), "{err}");
        assert_nothing_left(&b);
        b.api.with(|s| s.requests.clear());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_deletes_old_temporary_resources_across_pages() {
    let Some(b) = bench("cleanup", None).await else {
        return;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let temp = |age: u64| {
        BTreeMap::from([
            ("hcloud-nixos/temporary".to_string(), "true".to_string()),
            ("hcloud-nixos/run".to_string(), "old".to_string()),
            (
                "hcloud-nixos/created-at".to_string(),
                (now - age).to_string(),
            ),
        ])
    };
    let (fresh_s, fresh_k) = b.api.with(|s| {
        s.max_per_page = 2;
        for i in 0..5 {
            s.add_leftover(&format!("old-{i}"), temp(3600));
        }
        s.add_leftover("mine", BTreeMap::from([("env".into(), "prod".into())]));
        s.add_leftover("fresh", temp(60))
    });
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_hcloud-nixos"));
    c.args(["cleanup", "--older-than", "30m"]);
    env(&mut c, &b);
    let out = run(c).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    b.api.with(|s| {
        let names: Vec<&str> = s.servers.values().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["mine", "fresh"]);
        let names: Vec<&str> = s.keys.values().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["mine", "fresh"]);
        assert!(s.servers.contains_key(&fresh_s) && s.keys.contains_key(&fresh_k));
        // It followed pagination: more than one page of servers was read.
        assert!(
            s.requests
                .iter()
                .any(|r| r.path == "/v1/servers" && r.query.contains("page=3"))
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gives_one_clear_line() {
    let Some(b) = bench("bad-input", None).await else {
        return;
    };
    let out = run(upload_cmd(
        &b,
        &["--image", "/nonexistent.raw", "--architecture", "x86"],
    ))
    .await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("no such file"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let img = b.dir.path().join("img.raw");
    write(&img, b"x");
    let p = img.to_str().unwrap();
    let out = run(upload_cmd(
        &b,
        &[
            "--image",
            p,
            "--image",
            p,
            "--architecture",
            "x86",
            "--architecture",
            "arm",
            "--architecture",
            "x86",
        ],
    ))
    .await;
    assert!(text(&out.stderr).contains("2 --image but 3 --architecture"));

    let mut c = upload_cmd(&b, &["--image", p, "--architecture", "x86"]);
    c.env_remove("HCLOUD_TOKEN");
    let out = run(c).await;
    assert!(
        text(&out.stderr).contains("no Hetzner Cloud API token"),
        "{}",
        text(&out.stderr)
    );

    let mut c = upload_cmd(&b, &["--image", p, "--architecture", "x86"]);
    c.env("HCLOUD_TOKEN", "wrong-token");
    let out = run(c).await;
    let err = text(&out.stderr);
    assert!(
        err.contains("unauthorized: unable to authenticate"),
        "{err}"
    );
    assert!(!err.contains("wrong-token"));
    b.api.with(|s| assert!(s.mutating_requests().is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_images_in_one_run() {
    let Some(b) = bench("parallel", None).await else {
        return;
    };
    // Both images exist already for their architecture: the run reuses both and prints both IDs
    // in order, while a third (new) one is uploaded.
    let a = image_bytes(1 << 20, 20);
    let c = image_bytes(1 << 20, 21);
    let new = image_bytes(1 << 20, 22);
    let (ia, ic) = b.api.with(|s| {
        let l = |d: &[u8]| {
            BTreeMap::from([(
                "hcloud-nixos/image-sha256".to_string(),
                sha256_hex(d)[..63].to_string(),
            )])
        };
        (s.add_image("x86", l(&a)), s.add_image("arm", l(&c)))
    });
    let pa = b.dir.path().join("a.raw");
    let pc = b.dir.path().join("c.raw");
    let pn = b.dir.path().join("n.raw");
    write(&pa, &a);
    write(&pc, &c);
    write(&pn, &new);
    let out = run(upload_cmd(
        &b,
        &[
            "--image",
            pa.to_str().unwrap(),
            "--architecture",
            "x86",
            "--image",
            pc.to_str().unwrap(),
            "--architecture",
            "arm",
            "--image",
            pn.to_str().unwrap(),
            "--architecture",
            "x86",
        ],
    ))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ids: Vec<u64> = text(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(&ids[..2], &[ia, ic]);
    assert_snapshot(&b, ids[2], &new, "x86");
    assert_disk_holds(&b, &new);
    assert_nothing_left(&b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_leaves_at_once_and_lists_what_is_left() {
    let Some(b) = bench("second-signal", None).await else {
        return;
    };
    b.api
        .with(|s| s.ssh_ready_after = Duration::from_secs(3600));
    // Deleting the server keeps failing, so cleanup is slow enough to interrupt.
    b.api.fault(
        Fault::answer(
            Method::DELETE,
            "/v1/servers/",
            503,
            error_body("unavailable", "service unavailable"),
        )
        .times(100),
    );
    let img = b.dir.path().join("img.raw");
    write(&img, &image_bytes(1 << 20, 9));
    let child = upload_cmd(
        &b,
        &["--image", img.to_str().unwrap(), "--architecture", "x86"],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let t = Instant::now();
    while !b
        .api
        .with(|s| s.count(&Method::POST, "/actions/poweron") > 0)
    {
        assert!(t.elapsed() < Duration::from_secs(30), "never powered on");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = child.id().unwrap().to_string();
    StdCommand::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    // Wait until cleanup has started (a DELETE was tried), then interrupt again.
    let t = Instant::now();
    while b.api.with(|s| s.count(&Method::DELETE, "/v1/servers/")) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "cleanup never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let signalled = Instant::now();
    StdCommand::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("a second signal did not stop the upload")
        .unwrap();
    assert!(signalled.elapsed() < Duration::from_secs(3));
    assert!(!out.status.success());
    let err = text(&out.stderr);
    let server = b
        .api
        .with(|s| *s.servers.keys().next().expect("the server is left"));
    assert!(err.contains("interrupted twice"), "{err}");
    assert!(err.contains(&format!("server {server}")), "{err}");
    assert!(err.contains("hcloud-nixos cleanup"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_hides_the_test_flags() {
    let out = StdCommand::new(env!("CARGO_BIN_EXE_hcloud-nixos"))
        .args(["upload", "--help"])
        .output()
        .unwrap();
    let help = text(&out.stdout);
    assert!(help.contains("--architecture"), "{help}");
    assert!(!help.contains("--rescue-ssh-port"), "{help}");
    assert!(!help.contains("--rescue-device"), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_anywhere_in_the_remote_pipe_fails_the_upload() {
    // The rescue system's zstd reads its input and then fails; dd alone would succeed.
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("bin");
    std::fs::create_dir(&fake).unwrap();
    std::fs::write(
        fake.join("zstd"),
        "#!/bin/sh\ncat >/dev/null\necho 'zstd: simulated decoding error' >&2\nexit 1\n",
    )
    .unwrap();
    let wrapper = dir.path().join("wrap.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nPATH={}:$PATH exec bash -c \"$SSH_ORIGINAL_COMMAND\"\n",
            fake.display()
        ),
    )
    .unwrap();
    for p in [fake.join("zstd"), wrapper.clone()] {
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let Some(b) = bench("pipefail", Some(wrapper.to_str().unwrap())).await else {
        return;
    };
    let img = b.dir.path().join("img.raw");
    write(&img, &image_bytes(1 << 20, 30));
    let out = run(upload_cmd(
        &b,
        &["--image", img.to_str().unwrap(), "--architecture", "x86"],
    ))
    .await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("writing the image on the rescue system failed")
            && err.contains("simulated decoding error"),
        "{err}"
    );
    assert_nothing_left(&b);
    b.api.with(|s| assert!(s.images.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_written_to_during_the_upload_is_refused() {
    // When the write starts on the rescue system, one byte near the image's end changes: the
    // uploader reads it after the change (SSH's window holds it back), so what it sends differs
    // from what it hashed.
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("touch.sh");
    std::fs::write(
        &wrapper,
        "#!/bin/bash\ncase \"$SSH_ORIGINAL_COMMAND\" in *'dd of='*) img=$(cat \"$(dirname \"$0\")/img\"); printf Z | dd of=\"$img\" bs=1 seek=$((30 << 20)) conv=notrunc status=none;; esac\nexec bash -c \"$SSH_ORIGINAL_COMMAND\"\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let Some(b) = bench("changed", Some(wrapper.to_str().unwrap())).await else {
        return;
    };
    let raw = image_bytes(32 << 20, 9);
    let img = b.dir.path().join("img.raw");
    write(&img, &raw);
    std::fs::write(dir.path().join("img"), img.to_str().unwrap()).unwrap();
    let out = run(upload_cmd(
        &b,
        &[
            "--image",
            img.to_str().unwrap(),
            "--architecture",
            "x86",
            "--transfer",
            "none",
        ],
    ))
    .await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("changed during the upload"), "{err}");
    assert_nothing_left(&b);
    b.api
        .with(|s| assert!(s.images.is_empty(), "a snapshot was made"));
}

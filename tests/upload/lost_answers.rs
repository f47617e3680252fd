//! Answers lost after the API did the work: a request that creates something is not sent again
//! before the run has looked for what it may have created; whatever a run created is deleted or
//! listed at the end, with the command that removes it.

use harness::hcloud_api::{Fault, Method, error_body};
use serde_json::Value;

use crate::*;

/// POSTs to exactly this path (`/v1/servers` is not `/v1/servers/1/actions/poweron`).
fn posts(b: &Bench, suffix: &str) -> usize {
    b.api.with(|s| {
        s.requests
            .iter()
            .filter(|r| r.method == Method::POST && r.path.ends_with(suffix))
            .filter(|r| suffix != "/v1/servers" || r.path == "/v1/servers")
            .count()
    })
}

const CALLS: [&str; 6] = [
    "/v1/ssh_keys",
    "/v1/servers",
    "/actions/enable_rescue",
    "/actions/poweron",
    "/actions/poweroff",
    "/actions/create_image",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_never_makes_a_second_resource() {
    let Some(b) = bench("lost-answers", None).await else {
        return;
    };
    // (what, the fault, the call it hits, whether the API did the work)
    let cases = [
        (
            "create_image, answer lost",
            Fault::lose_answer(Method::POST, "/actions/create_image"),
            "/actions/create_image",
            true,
        ),
        (
            "SSH key, answer lost",
            Fault::lose_answer(Method::POST, "/v1/ssh_keys"),
            "/v1/ssh_keys",
            true,
        ),
        (
            "server, answer lost",
            Fault::lose_answer(Method::POST, "/v1/servers"),
            "/v1/servers",
            true,
        ),
        (
            "server, answer cut off",
            Fault::truncate_answer(Method::POST, "/v1/servers"),
            "/v1/servers",
            true,
        ),
        (
            "enable_rescue, answer lost",
            Fault::lose_answer(Method::POST, "/actions/enable_rescue"),
            "/actions/enable_rescue",
            true,
        ),
        (
            "poweron, answer lost",
            Fault::lose_answer(Method::POST, "/actions/poweron"),
            "/actions/poweron",
            true,
        ),
        (
            "poweroff, answer lost",
            Fault::lose_answer(Method::POST, "/actions/poweroff"),
            "/actions/poweroff",
            true,
        ),
        (
            "SSH key, dropped before the work",
            Fault::drop_request(Method::POST, "/v1/ssh_keys"),
            "/v1/ssh_keys",
            false,
        ),
        (
            "create_image, dropped before the work",
            Fault::drop_request(Method::POST, "/actions/create_image"),
            "/actions/create_image",
            false,
        ),
    ];
    for (n, (case, fault, hit, done)) in cases.into_iter().enumerate() {
        let raw = image_bytes(1 << 20, 50 + n as u32);
        let img = b.dir.path().join(format!("img-{n}.raw"));
        write(&img, &raw);
        let before = b.api.with(|s| {
            s.requests.clear();
            s.images.len()
        });
        b.api.fault(fault);
        let out = run(upload_cmd(
            &b,
            &["--image", img.to_str().unwrap(), "--architecture", "x86"],
        ))
        .await;
        let images = b.api.with(|s| s.images.len());
        assert_eq!(
            images,
            before + usize::from(out.status.success()),
            "{case}: {} snapshots for one upload\n{}",
            images - before,
            text(&out.stderr)
        );
        let id = snapshot_id(&out);
        assert_snapshot(&b, id, &raw, "x86");
        b.api.with(|s| {
            assert!(s.faults.is_empty(), "{case}: the fault was not hit");
            let labels = &s.images[&id].labels;
            assert!(
                !labels.keys().any(|k| k == "hcloud-nixos/temporary"),
                "{case}: the snapshot is still marked temporary: {labels:?}"
            );
        });
        for call in CALLS {
            let want = if call == hit && !done { 2 } else { 1 };
            assert_eq!(posts(&b, call), want, "{case}: POST {call}");
        }
        assert_nothing_left(&b);
    }
}

/// The command the message names, between backticks.
fn cleanup_command(err: &str) -> Vec<String> {
    let cmd = err
        .split('`')
        .find(|s| s.starts_with("hcloud-nixos cleanup"))
        .unwrap_or_else(|| panic!("no cleanup command in: {err}"));
    cmd.split_whitespace().skip(1).map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_snapshot_is_deleted_and_what_cannot_be_deleted_is_listed() {
    let Some(b) = bench("failed-snapshot", None).await else {
        return;
    };
    let img = b.dir.path().join("img.raw");
    write(&img, &image_bytes(1 << 20, 60));
    let p = img.to_str().unwrap();
    let fail = || {
        b.api.with(|s| {
            s.failing_actions.push((
                "create_image".into(),
                "image_create_failed".into(),
                "the snapshot could not be made".into(),
            ))
        })
    };

    // The snapshot's action fails: the snapshot is deleted with the server and key.
    fail();
    let out = run(upload_cmd(&b, &["--image", p, "--architecture", "x86"])).await;
    let err = text(&out.stderr);
    assert!(!out.status.success());
    let left: Vec<u64> = b.api.with(|s| s.images.keys().copied().collect());
    assert!(
        left.is_empty(),
        "the failed snapshot was left: {left:?}\n{err}"
    );
    assert!(err.contains("the snapshot could not be made"), "{err}");
    assert!(err.contains("deleted snapshot"), "{err}");
    assert_nothing_left(&b);

    // It fails again and cannot be deleted: stdout (JSON) and the error say what is left and how
    // to remove it, and that command removes it.
    fail();
    b.api.fault(
        Fault::answer(
            Method::DELETE,
            "/v1/images/",
            423,
            error_body("protected", "the image is protected"),
        )
        .times(10),
    );
    let out = run(upload_cmd(
        &b,
        &["--image", p, "--architecture", "x86", "--json"],
    ))
    .await;
    let err = text(&out.stderr);
    assert!(!out.status.success());
    let snap = b.api.with(|s| {
        assert_eq!(s.images.len(), 1, "{err}");
        *s.images.keys().next().unwrap()
    });
    assert!(err.contains(&format!("snapshot {snap}")), "{err}");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", text(&out.stdout)));
    assert!(v[0]["error"].is_string(), "{v}");
    let listed = v[0]["left_behind"].as_array().cloned().unwrap_or_default();
    assert!(
        listed
            .iter()
            .any(|r| r["type"] == "snapshot" && r["id"] == snap),
        "{v}"
    );
    assert_nothing_left(&b);
    b.api.with(|s| s.faults.clear());
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_hcloud-nixos"));
    c.args(cleanup_command(&err));
    env(&mut c, &b);
    let out = run(c).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    b.api
        .with(|s| assert!(s.images.is_empty(), "{}", text(&out.stderr)));
}

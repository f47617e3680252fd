//! Hooks and metrics end to end: the hooks' environment after deploys and rollbacks, the metrics
//! textfile, `/metrics` over HTTP.

use harness::agent::helpers::{HOOKS, hook_events, hook_kinds, kinds, secs, write_hook_recorder};
use harness::agent::{Kind, Options};
use harness::bench;
use harness::prometheus::{self, metric};

#[test]
fn hooks_get_the_event_in_their_environment_after_deploys_and_rollbacks() {
    let b = bench!(
        "hooks",
        Options {
            tables: HOOKS.into(),
            ..Options::default()
        }
    );
    write_hook_recorder(&b);
    let base = b.current_system();
    let (v1, p1) = b.release(1, Kind::Normal);
    let run = b.once();
    // The first hook fails; the deploy does not.
    assert!(run.ok(), "{}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!("up to date: {v1} (just deployed)")
    );
    let events = hook_events(&b);
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["EVENT"], "deploy");
    assert_eq!(e["OUTCOME"], "success");
    assert_eq!(e["VERSION"], v1);
    assert_eq!(e["STORE_PATH"], p1);
    assert_eq!(e["PREVIOUS_PATH"], base);
    assert_eq!(e["ERROR"], "");

    // Nothing new: no hook.
    assert!(b.once().ok());
    assert_eq!(hook_events(&b).len(), 1);

    let (v2, p2) = b.release(2, Kind::ActivationFails);
    let run = b.once();
    assert!(!run.ok(), "{}", run.all());
    let events = hook_events(&b);
    assert_eq!(
        hook_kinds(&b),
        kinds(&[
            ("deploy", "success"),
            ("deploy", "rolled-back"),
            ("rollback", "success")
        ])
    );
    for e in &events[1..] {
        assert_eq!(e["VERSION"], v2);
        assert_eq!(e["STORE_PATH"], p2);
        assert_eq!(e["PREVIOUS_PATH"], p1);
        assert_eq!(
            e["ERROR"],
            "switch-to-configuration switch exited with status 1"
        );
    }
    assert_eq!(b.current_system(), p1);
}

#[test]
fn metrics_textfile_after_a_deploy_and_after_a_rollback() {
    let b = bench!(
        "metrics_textfile",
        Options {
            tables: "[metrics]\ntextfile = \"@ROOT@/metrics/hcloud-nixos.prom\"\n".into(),
            ..Options::default()
        }
    );
    std::fs::create_dir_all(b.path("metrics")).unwrap();
    let (v1, p1) = b.release(1, Kind::Normal);
    assert!(b.once().ok());
    let file = b.path("metrics/hcloud-nixos.prom");
    let m = prometheus::parse(&std::fs::read_to_string(&file).unwrap());
    assert_eq!(
        metric(
            &m,
            &format!("hcloud_nixos_running_info{{version=\"{v1}\",store_path=\"{p1}\"}}")
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "hcloud_nixos_deploys_total{outcome=\"success\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "hcloud_nixos_deploys_total{outcome=\"failed\"}"),
        0.0
    );
    assert_eq!(metric(&m, "hcloud_nixos_last_check_success"), 1.0);
    assert_eq!(metric(&m, "hcloud_nixos_last_deploy_success"), 1.0);
    assert_eq!(metric(&m, "hcloud_nixos_deploy_in_progress"), 0.0);
    assert_eq!(metric(&m, "hcloud_nixos_quarantined_releases"), 0.0);
    assert_eq!(metric(&m, "hcloud_nixos_reboot_required"), 0.0);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o777, 0o644);

    let (v2, p2) = b.release(2, Kind::Exit4);
    assert!(!b.once().ok());
    let m = prometheus::parse(&std::fs::read_to_string(&file).unwrap());
    assert_eq!(
        metric(&m, "hcloud_nixos_rollbacks_total{outcome=\"success\"}"),
        1.0
    );
    assert_eq!(
        metric(&m, "hcloud_nixos_rollbacks_total{outcome=\"failed\"}"),
        0.0
    );
    assert_eq!(
        metric(&m, "hcloud_nixos_deploys_total{outcome=\"failed\"}"),
        1.0
    );
    assert_eq!(metric(&m, "hcloud_nixos_quarantined_releases"), 1.0);
    assert_eq!(metric(&m, "hcloud_nixos_last_deploy_success"), 0.0);
    assert_eq!(metric(&m, "hcloud_nixos_consecutive_failures"), 1.0);
    assert_eq!(
        metric(
            &m,
            &format!("hcloud_nixos_running_info{{version=\"{v1}\",store_path=\"{p1}\"}}")
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            &format!("hcloud_nixos_desired_info{{version=\"{v2}\",store_path=\"{p2}\"}}")
        ),
        1.0
    );
}

/// `GET /metrics` from the service, on a port picked here.
fn get_metrics(port: u16) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

#[test]
fn metrics_are_served_over_http_by_the_service() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let b = bench!(
        "metrics_listen",
        Options {
            tables: format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
            ..Options::default()
        }
    );
    let (v1, p1) = b.release(1, Kind::Normal);
    let mut agent = b.start_agent();
    let series = format!("hcloud_nixos_running_info{{version=\"{v1}\",store_path=\"{p1}\"}}");
    let mut last = String::new();
    b.wait_for(secs(30), "the running release in /metrics", || {
        last = get_metrics(port).unwrap_or_default();
        last.contains(&series)
    });
    let m = prometheus::parse(&last);
    assert_eq!(metric(&m, &series), 1.0);
    assert_eq!(
        metric(&m, "hcloud_nixos_deploys_total{outcome=\"success\"}"),
        1.0
    );
    assert_eq!(metric(&m, "hcloud_nixos_last_check_success"), 1.0);
    assert!(agent.running(), "{}", agent.output());
}

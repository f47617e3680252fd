use super::*;

fn parse(text: &str) -> Result<Fleet, Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Doc {
        fleet: FleetConfig,
    }
    let doc: Doc = toml::from_str(text).map_err(|e| vec![e.message().to_string()])?;
    doc.fleet.resolve()
}

#[test]
fn the_issue_example_is_valid() {
    let fleet = parse(
        r#"
[fleet]
group = "web"
slots = 2
backend = "etcd"
canary = false
pause_on_failure = true
[fleet.etcd]
endpoints = ["https://10.0.0.5:2379"]
prefix = "/hcloud-nixos"
ca_file = "/run/secrets/etcd-ca.pem"
cert_file = "/run/secrets/etcd-client.pem"
key_file = "/run/secrets/etcd-client-key.pem"
[fleet.fleetlock]
url = "http://fleetlock.internal:8080"
"#,
    )
    .unwrap();
    assert_eq!(fleet.group, "web");
    assert_eq!(fleet.slots, 2);
    assert_eq!(fleet.backend, Backend::Etcd);
    assert!(fleet.pause_on_failure);
    let etcd = fleet.etcd.unwrap();
    assert!(etcd.tls());
    assert_eq!(etcd.prefix, "/hcloud-nixos");
    assert_eq!(etcd.lease_ttl, std::time::Duration::from_secs(30));
}

#[test]
fn problems_are_one_line_each_and_name_the_key() {
    let problems = parse(
        r#"
[fleet]
group = "web servers"
slots = 0
backend = "etcd"
[fleet.etcd]
endpoints = ["10.0.0.5:2379"]
prefix = "hcloud"
cert_file = "/c.pem"
lease_ttl = "1s"
"#,
    )
    .unwrap_err();
    let keys: Vec<&str> = problems
        .iter()
        .map(|p| p.split(':').next().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "fleet.group",
            "fleet.slots",
            "fleet.etcd.endpoints",
            "fleet.etcd.prefix",
            "fleet.etcd.cert_file",
            "fleet.etcd.lease_ttl"
        ],
        "{problems:#?}"
    );
    assert!(problems.iter().all(|p| !p.contains('\n')));
}

#[test]
fn unknown_keys_and_backends_are_refused() {
    assert!(parse("[fleet]\ngroup = \"web\"\nslot = 2\n").is_err());
    let e = parse("[fleet]\ngroup = \"web\"\nbackend = \"consul\"\n").unwrap_err();
    assert!(e[0].contains("etcd"), "{e:?}");
    let e = parse("[fleet]\ngroup = \"web\"\n").unwrap_err();
    assert_eq!(e, ["fleet.backend: missing (etcd or fleetlock)"]);
}

#[test]
fn fleetlock_refuses_what_it_cannot_express() {
    let e = parse(
        "[fleet]\ngroup = \"web\"\nbackend = \"fleetlock\"\ncanary = true\npause_on_failure = true\n[fleet.fleetlock]\nurl = \"http://f:8080/\"\n",
    )
    .unwrap_err();
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[0].starts_with("fleet.canary:") && e[1].starts_with("fleet.pause_on_failure:"));
    let f =
        parse("[fleet]\ngroup = \"web\"\n[fleet.fleetlock]\nurl = \"http://f:8080/\"\n").unwrap();
    assert_eq!(f.backend, Backend::FleetLock);
    assert!(!f.pause_on_failure);
    assert_eq!(f.fleetlock.unwrap().url, "http://f:8080");
}

#[test]
fn user_data_has_the_same_keys_and_the_file_wins() {
    let user = from_user_data(&serde_json::json!({
        "group": "web", "slots": 3, "backend": "etcd",
        "etcd": {"endpoints": ["http://10.0.0.5:2379"], "prefix": "/x"}
    }))
    .unwrap();
    let file = FleetConfig {
        slots: Some(1),
        etcd: Some(EtcdConfig {
            prefix: Some("/file".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let fleet = file.or(&user).resolve().unwrap();
    assert_eq!(fleet.slots, 1);
    assert_eq!(fleet.group, "web");
    let etcd = fleet.etcd.unwrap();
    assert_eq!(etcd.prefix, "/file");
    assert_eq!(etcd.endpoints, ["http://10.0.0.5:2379"]);
    let e = from_user_data(&serde_json::json!({"group": "web", "slotz": 1})).unwrap_err();
    assert!(e[0].starts_with("unknown field `slotz`"), "{e:?}");
    assert_eq!(user.summary(), "group web, 3 slots, etcd");
    let ending: Ending =
        serde_json::from_str(r#"{"kind":"failed","release":"1","reason":"x"}"#).unwrap();
    assert_eq!(
        ending,
        Ending::Failed {
            release: "1".into(),
            reason: "x".into()
        }
    );
}

#[test]
fn waiting_and_paused_read_well() {
    let w = Acquired::Waiting {
        holders: vec!["web-3".into(), "web-7".into()],
        slots: 2,
        detail: None,
    };
    assert_eq!(
        w.status_line(),
        "waiting for a fleet slot: 2 of 2 taken by web-3, web-7"
    );
    let p = Acquired::Paused(Pause {
        release: "1.2.3".into(),
        by: "4711".into(),
        host: "web-1".into(),
        reason: "health check failed".into(),
        at: "2026-11-21T14:00:00Z".into(),
    });
    assert!(
        p.status_line()
            .starts_with("fleet paused for release 1.2.3: it failed on web-1")
    );
}

#[test]
fn status_describes_holders_and_pauses() {
    let s = FleetStatus {
        backend: Backend::Etcd,
        group: "web".into(),
        slots: 2,
        holders_known: true,
        holders: vec![Holder {
            slot: Some(0),
            id: "4711".into(),
            host: "web-3".into(),
            purpose: Purpose::Deploy {
                release: "1.2.3".into(),
            },
            since: "2026-11-21T14:00:00Z".into(),
            canary: false,
        }],
        paused: vec![],
        canaries: vec![],
        confirmed: vec![],
        desired: None,
        poller: None,
        members: vec![],
    };
    let text = s.describe();
    assert!(
        text.starts_with("group web (etcd): 2 slots, 1 taken"),
        "{text}"
    );
    assert!(text.contains("slot 0: web-3 (id 4711) deploy 1.2.3 since 2026-11-21T14:00:00Z"));
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["holders"][0]["purpose"]["kind"], "deploy");
    assert_eq!(json["backend"], "etcd");
}

const SECRET: &str = "s3cret-Pa55";

#[test]
fn credentials_in_urls_never_reach_a_problem() {
    let problems = parse(&format!(
        r#"
[fleet]
group = "web"
backend = "etcd"
[fleet.etcd]
endpoints = ["http://root:{SECRET}@10.0.0.5:2379", "htp://root:{SECRET}@10.0.0.6:2379"]
ca_file = "/ca.pem"
"#
    ))
    .unwrap_err();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    for p in &problems {
        assert!(!p.contains(SECRET), "{p}");
        assert!(p.contains("10.0.0."), "the problem names no endpoint: {p}");
    }
    let problems = parse(&format!(
        "[fleet]\ngroup = \"web\"\npause_on_failure = false\n[fleet.fleetlock]\nurl = \"ftp://agent:{SECRET}@f:8080\"\n"
    ))
    .unwrap_err();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(!problems[0].contains(SECRET), "{}", problems[0]);
}

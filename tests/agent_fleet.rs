//! Fleet coordination end to end: several "servers" (one agent bench each: its own root, FlakeHub
//! and metadata stand-ins, PID and UTS namespaces, hostname `web-<i>`, instance id `100<i>`)
//! running real `hcloud-nixos agent` processes in service mode against one real etcd (Debian's
//! etcd-server on loopback, see `harness::etcd`) or the FleetLock stand-in. The same release
//! (one version; each server has its own store path for it) is published to every server; its
//! activation takes 2 s, so the order of the deploys and whether they overlapped can be read off
//! the activation log's start times (sub-second).
//!
//! Needs root, nix-bin and etcd; without them every test prints `SKIP: ...` (and fails under
//! CI=true).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use harness::agent::{ATTR, Agent, Bench, FLAKE, Kind, ORG, Options, Run};
use harness::etcd::Etcd;
use harness::flakehub::{self, Endpoint};
use harness::fleetlock::FleetLockStandin;

/// How long every release's activation (`switch-to-configuration switch`) takes.
const ACTIVATION: u64 = 2;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn etcd_fleet(etcd: &Etcd, test: &str) -> String {
    format!(
        r#"
[fleet]
group = "web"
slots = 1
backend = "etcd"
canary = false
pause_on_failure = true

[fleet.etcd]
endpoints = ["{}"]
prefix = "/hcloud-nixos-test-{test}"
lease_ttl = "3s"
"#,
        etcd.url()
    )
}

fn fleetlock_fleet(standin: &FleetLockStandin) -> String {
    format!(
        r#"
[fleet]
group = "web"
slots = 1
backend = "fleetlock"
pause_on_failure = false

[fleet.fleetlock]
url = "{}"
"#,
        standin.url()
    )
}

/// The group's servers: `web-1` ... `web-<n>`, instance ids `1001` ... Each runs the base
/// system, published as release 0.1.0 (so an agent started now finds itself up to date).
/// `None` after `SKIP: ...` when the bench cannot run here.
struct Group {
    servers: Vec<Bench>,
    agents: Vec<Option<Agent>>,
}

impl Group {
    fn new(
        test: &str,
        n: usize,
        fleet: &str,
        tweak: impl Fn(usize, &mut Options),
    ) -> Option<Group> {
        let mut servers = Vec::new();
        for i in 0..n {
            let mut opts = Options {
                tables: fleet.to_string(),
                hostname: Some(format!("web-{}", i + 1)),
                concurrent: true,
                apply_timeout: "30s",
                ..Options::default()
            };
            tweak(i, &mut opts);
            let b = Bench::new(&format!("{test}/web-{}", i + 1), opts)?;
            b.metadata.set_document(
                "metadata/instance-id",
                Some(format!("100{}", i + 1).as_bytes()),
            );
            let base = b.current_system();
            b.flakehub
                .publish(ORG, FLAKE, &flakehub::rolling_version(0, test), ATTR, &base);
            servers.push(b);
        }
        let agents = servers.iter().map(|_| None).collect();
        Some(Group { servers, agents })
    }

    fn start(&mut self, i: usize) {
        self.agents[i] = Some(self.servers[i].start_agent());
    }

    /// Starts web-1 first and waits until it is the group's poller (etcd: the one that asks
    /// FlakeHub for the group), then the others.
    fn start_with_web1_polling(&mut self) {
        self.start(0);
        let deadline = Instant::now() + secs(20);
        loop {
            let run = self.fleet_cli(0, &["status"]);
            if status(&self.servers[0]).starts_with("up to date")
                && run.stdout.contains("poller: web-1 (id 1001)")
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "web-1 did not become the poller: {}\n{}",
                run.all(),
                self.report()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.start_all();
    }

    fn start_all(&mut self) {
        for i in 0..self.servers.len() {
            if self.agents[i].is_none() {
                self.start(i);
            }
        }
        self.wait(
            secs(20),
            "every server up to date with the base system",
            |b| status(b).starts_with("up to date"),
        );
    }

    /// Publishes release `0.1.<n>` (one version for the whole group) to server `i`, as a
    /// system of `kind` that is this server's own; returns (version, store path).
    fn publish_to(&self, i: usize, test: &str, n: u64, kind: Kind) -> (String, String) {
        let version = flakehub::rolling_version(n, test);
        let b = &self.servers[i];
        let path = b.system(&format!("r{n}"), kind);
        b.flakehub.publish(ORG, FLAKE, &version, ATTR, &path);
        (version, path)
    }

    /// Publishes release `0.1.<n>` to every server (see [`Group::publish_to`]), web-1 last:
    /// web-1, the group's poller when it started first, finds it only once every server's
    /// FlakeHub serves it, as the one FlakeHub of a real fleet would. Returns (version, paths).
    fn publish_everywhere(&self, test: &str, n: u64, kind: Kind) -> (String, Vec<String>) {
        let mut paths = vec![String::new(); self.servers.len()];
        let mut version = String::new();
        for i in (0..self.servers.len()).rev() {
            let (v, p) = self.publish_to(i, test, n, kind);
            version = v;
            paths[i] = p;
        }
        (version, paths)
    }

    /// Waits until `cond` holds on every server.
    fn wait(&self, timeout: Duration, what: &str, cond: impl Fn(&Bench) -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.servers.iter().all(&cond) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "timed out after {timeout:?} waiting for: {what}\n{}",
            self.report()
        );
    }

    /// Each server's status, activations and logs, for failure messages.
    fn report(&self) -> String {
        let mut out = String::new();
        for (i, b) in self.servers.iter().enumerate() {
            out.push_str(&format!(
                "===== web-{}: status {:?}\nactivations: {:?}\nstate: {}\n{}\n",
                i + 1,
                status(b),
                b.activation_times(),
                b.state(),
                b.all_logs()
            ));
        }
        out
    }

    /// `hcloud-nixos fleet --config FILE ARGS` as server `i`'s operator would run it.
    fn fleet_cli(&self, i: usize, args: &[&str]) -> Run {
        self.servers[i].run_split(&["fleet"], args, secs(30))
    }
}

/// The agent's status line as it last recorded it.
fn status(b: &Bench) -> String {
    b.state()
        .get("status")
        .and_then(|s| s.as_str())
        .unwrap_or("")
        .to_string()
}

/// When `switch-to-configuration switch` of release `n` started on this server.
fn switch_starts(b: &Bench, n: u64) -> Vec<f64> {
    let what = format!("r{n} switch");
    b.activation_times()
        .into_iter()
        .filter(|(w, _)| *w == what)
        .map(|(_, t)| t)
        .collect()
}

/// Deployed and done with: `path` runs, and the agent's status, written once the cycle (and the
/// hand-back of its fleet slot) is over, says it is up to date with that release.
fn deployed(b: &Bench, path: &str) -> bool {
    let state = b.state();
    let at = |p: &str| state.pointer(p).and_then(|v| v.as_str()).unwrap_or("");
    b.current_system() == path
        && at("/running/store_path") == path
        && at("/status").starts_with(&format!("up to date: {}", at("/running/version")))
}

/// Every (server, status line) seen while watching, in order, without repeats.
#[derive(Default)]
struct Seen(Vec<(usize, String)>);

impl Seen {
    fn note(&mut self, group: &Group) {
        for (i, b) in group.servers.iter().enumerate() {
            let line = status(b);
            if !self.0.iter().any(|(j, l)| *j == i && *l == line) {
                self.0.push((i, line));
            }
        }
    }

    fn any(&self, i: usize, f: impl Fn(&str) -> bool) -> bool {
        self.0.iter().any(|(j, l)| *j == i && f(l))
    }
}

/// Server `i`'s status while it waits for server `h`'s etcd slot.
fn waiting_for(h: usize) -> String {
    format!("waiting for a fleet slot: 1 of 1 taken by web-{}", h + 1)
}

/// Watches until every server runs its `paths` entry (at most `timeout`), noting the status lines;
/// `on_tick` runs between looks.
fn watch_deploys(
    group: &Group,
    paths: &[String],
    timeout: Duration,
    seen: &mut Seen,
    mut on_tick: impl FnMut(&Group, &Seen),
) {
    let deadline = Instant::now() + timeout;
    loop {
        seen.note(group);
        on_tick(group, seen);
        if group.servers.iter().zip(paths).all(|(b, p)| deployed(b, p)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not every server deployed within {timeout:?}\nseen: {:?}\n{}",
            seen.0,
            group.report()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Release `n`'s activation started once on each of `servers`, and never while another's ran:
/// sorted, the starts are at least the activation's duration apart. Returns the servers in the
/// order they deployed, with their start times.
fn one_after_another(group: &Group, servers: &[usize], n: u64) -> Vec<(usize, f64)> {
    let mut starts: Vec<(usize, f64)> = servers
        .iter()
        .map(|&i| {
            let s = switch_starts(&group.servers[i], n);
            assert_eq!(
                s.len(),
                1,
                "web-{}: release {n} activated {} times\n{}",
                i + 1,
                s.len(),
                group.report()
            );
            (i, s[0])
        })
        .collect();
    starts.sort_by(|a, b| a.1.total_cmp(&b.1));
    for w in starts.windows(2) {
        assert!(
            w[1].1 - w[0].1 >= ACTIVATION as f64,
            "web-{} started its activation {:.2} s after web-{}'s, which takes {ACTIVATION} s: \
             the deploys overlapped\n{starts:?}\n{}",
            w[1].0 + 1,
            w[1].1 - w[0].1,
            w[0].0 + 1,
            group.report()
        );
    }
    starts
}

/// Scenario 1 and 5: every server of a started group deploys release 1, one after another, and
/// while one deploys the others say they wait for it (`waiting` gives the line naming the holder,
/// for the holder's index). Checks `hcloud-nixos status` of a waiting server once too.
fn all_deploy_one_at_a_time(group: &Group, test: &str, waiting: impl Fn(usize) -> String) {
    let n = group.servers.len();
    let (_, paths) = group.publish_everywhere(test, 1, Kind::Slow(ACTIVATION));
    let mut seen = Seen::default();
    let mut cli_checked = false;
    watch_deploys(group, &paths, secs(45), &mut seen, |g, _| {
        if cli_checked {
            return;
        }
        // A server waiting in its state file says so through `hcloud-nixos status` too (unless
        // its turn came meanwhile: then try again on a later look).
        for (i, b) in g.servers.iter().enumerate() {
            if status(b).starts_with("waiting for a fleet slot") {
                let out = b.status();
                if out.contains("waiting for a fleet slot") {
                    let h = (0..n).find(|&h| out.contains(&waiting(h)));
                    assert!(
                        h.is_some_and(|h| h != i),
                        "web-{}'s status names no other server holding the slot:\n{out}",
                        i + 1
                    );
                    cli_checked = true;
                    return;
                }
            }
        }
    });
    let order = one_after_another(group, &(0..n).collect::<Vec<_>>(), 1);
    // While each of the first n-1 deployed, every server after it in the order said it waited for
    // that one (each looks again about every second; the holder holds its slot for more than
    // the 2 s of its activation).
    for (k, &(holder, _)) in order.iter().enumerate().take(n - 1) {
        for &(other, _) in &order[k + 1..] {
            assert!(
                seen.any(other, |l| l.starts_with(&waiting(holder))),
                "web-{} never said it waited for web-{} (order {order:?})\nseen: {:?}",
                other + 1,
                holder + 1,
                seen.0
            );
        }
    }
    for (i, _) in &order {
        assert!(
            !seen.any(*i, |l| l.starts_with(&waiting(*i))),
            "web-{} waited for itself: {:?}",
            i + 1,
            seen.0
        );
    }
    assert!(
        cli_checked,
        "no `hcloud-nixos status` caught a waiting server"
    );
}

/// The group's slots as `hcloud-nixos fleet status` (run as server `i`) shows them.
fn fleet_status(group: &Group, i: usize) -> String {
    let run = group.fleet_cli(i, &["status"]);
    assert!(run.ok(), "fleet status: {}", run.all());
    run.stdout
}

macro_rules! group {
    ($e:expr) => {
        match $e {
            Some(g) => g,
            None => return,
        }
    };
}

/// Scenario 1.
#[test]
fn three_servers_deploy_one_after_another_through_etcd() {
    let test = "one-after-another";
    let Some(etcd) = Etcd::start(test) else {
        return;
    };
    let mut group = group!(Group::new(test, 3, &etcd_fleet(&etcd, test), |_, _| ()));
    group.start_all();
    all_deploy_one_at_a_time(&group, test, waiting_for);
    let fs = fleet_status(&group, 0);
    assert!(
        fs.contains("group web (etcd): 1 slot, 0 taken"),
        "a slot is still held:\n{fs}"
    );
}

/// Scenario 2.
#[test]
fn a_killed_holders_slot_is_freed_when_its_lease_expires() {
    let test = "killed-holder";
    let Some(etcd) = Etcd::start(test) else {
        return;
    };
    let mut group = group!(Group::new(test, 2, &etcd_fleet(&etcd, test), |_, _| ()));
    group.start_all();
    let (_, paths) = group.publish_everywhere(test, 1, Kind::Slow(ACTIVATION));
    // Whoever takes the slot first is killed in its activation.
    let deadline = Instant::now() + secs(20);
    let holder = loop {
        if let Some(h) = (0..2).find(|&i| !switch_starts(&group.servers[i], 1).is_empty()) {
            break h;
        }
        assert!(
            Instant::now() < deadline,
            "nobody started deploying\n{}",
            group.report()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let other = 1 - holder;
    group.agents[holder].as_mut().unwrap().kill9();
    let killed_at = now();
    // The other one goes on only once the lease (3 s, refreshed every second) has expired.
    let mut seen = Seen::default();
    let deadline = Instant::now() + secs(20);
    while !deployed(&group.servers[other], &paths[other]) {
        seen.note(&group);
        assert!(
            Instant::now() < deadline,
            "web-{} did not deploy after web-{} was killed holding the slot\n{}",
            other + 1,
            holder + 1,
            group.report()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = switch_starts(&group.servers[other], 1);
    assert_eq!(started.len(), 1, "{}", group.report());
    let after = started[0] - killed_at;
    assert!(
        after >= 1.5,
        "web-{} started {after:.2} s after web-{} was killed: before the killed holder's lease \
         (3 s) could expire\n{}",
        other + 1,
        holder + 1,
        group.report()
    );
    assert!(
        seen.any(other, |l| l.starts_with(&waiting_for(holder))),
        "web-{} never said the dead web-{} held the slot: {:?}",
        other + 1,
        holder + 1,
        seen.0
    );
    // The killed server's agent, started again, finishes the deploy its predecessor began (the
    // activation went on without it) and hands the slot back.
    group.start(holder);
    group.wait(secs(20), "both servers deployed", |b| {
        let i = if b.root == group.servers[0].root {
            0
        } else {
            1
        };
        deployed(b, &paths[i])
    });
    assert_eq!(
        switch_starts(&group.servers[holder], 1).len(),
        1,
        "the restarted agent activated the release again\n{}",
        group.report()
    );
    let fs = fleet_status(&group, other);
    assert!(
        fs.contains("1 slot, 0 taken"),
        "a slot is still held:\n{fs}\n{}",
        group.report()
    );
}

/// Scenario 3.
#[test]
fn a_release_that_fails_on_one_server_pauses_the_group_until_resumed() {
    let test = "paused";
    let Some(etcd) = Etcd::start(test) else {
        return;
    };
    let mut group = group!(Group::new(test, 3, &etcd_fleet(&etcd, test), |_, _| ()));
    // web-1 asks FlakeHub for the group: the release published on its FlakeHub (only) becomes
    // the group's desired release, and the others cannot find it on theirs yet.
    group.start_with_web1_polling();
    let base: Vec<String> = group.servers.iter().map(Bench::current_system).collect();
    // web-1's build of the release fails in its activation (and is rolled back); the others'
    // would work.
    let (v1, _) = group.publish_to(0, test, 1, Kind::ActivationFails);
    let web1 = &group.servers[0];
    web1.wait_for(secs(20), "web-1 rolled back release 1", || {
        web1.activations().iter().any(|a| a == "base switch") && status(web1).contains(&v1)
    });
    let paused = format!("fleet paused for release {v1}: it failed on web-1 (");
    // Meanwhile the others saw the group's release and could not find it on their FlakeHub: a
    // release FlakeHub does not serve is not applied, and their status says why.
    let unserved = format!(
        "check failed: the fleet group's desired release {v1} (from poller web-1 (id 1001) at "
    );
    group.wait(
        secs(20),
        "web-2 and web-3 refusing a release their FlakeHub does not serve",
        |b| b.root == web1.root || status(b).starts_with(&unserved),
    );
    for b in &group.servers[1..] {
        assert!(
            status(b).contains("is not applied: FlakeHub has no release of acme/infra matching '="),
            "{}",
            status(b)
        );
        assert!(b.activations().is_empty(), "{}", group.report());
    }
    let paths: Vec<String> = (1..3)
        .map(|i| group.publish_to(i, test, 1, Kind::Slow(ACTIVATION)).1)
        .collect();
    group.wait(secs(20), "web-2 and web-3 paused", |b| {
        b.root == web1.root || status(b).starts_with(&paused)
    });
    // They stay paused: nobody starts the release.
    std::thread::sleep(secs(3));
    for (i, b) in group.servers.iter().enumerate().skip(1) {
        assert!(
            status(b).starts_with(&paused),
            "web-{}: {}\n{}",
            i + 1,
            status(b),
            group.report()
        );
        assert!(
            !b.activations().iter().any(|a| a.starts_with("r1 ")),
            "web-{} started the paused release\n{}",
            i + 1,
            group.report()
        );
        assert_eq!(b.current_system(), base[i]);
    }
    assert_eq!(switch_starts(web1, 1).len(), 1, "{}", group.report());
    assert_eq!(web1.current_system(), base[0]);

    let fs = fleet_status(&group, 1);
    assert!(
        fs.contains(&format!("paused: release {v1} failed on web-1 (id 1001)")),
        "fleet status shows no pause:\n{fs}"
    );
    let run = group.fleet_cli(2, &["resume"]);
    assert!(run.ok(), "fleet resume: {}", run.all());
    assert_eq!(
        run.stdout.trim(),
        format!("group web resumed for release {v1}")
    );
    let fs = fleet_status(&group, 1);
    assert!(fs.contains("no paused releases"), "still paused:\n{fs}");

    // Resumed: web-2 and web-3 deploy it, one after the other; web-1 keeps it quarantined.
    let mut seen = Seen::default();
    let group_tail = Group {
        servers: group.servers.split_off(1),
        agents: group.agents.split_off(1),
    };
    watch_deploys(&group_tail, &paths, secs(30), &mut seen, |_, _| ());
    one_after_another(&group_tail, &[0, 1], 1);
    assert_eq!(switch_starts(&group.servers[0], 1).len(), 1);
    assert_eq!(group.servers[0].current_system(), base[0]);
    let fs = fleet_status(&group, 0);
    assert!(
        fs.contains("1 slot, 0 taken") && fs.contains("no paused releases"),
        "{fs}"
    );
}

/// Scenario 3, racing: the others already wait for the slot while the release fails on its
/// holder. The pause is recorded before the slot is given back, so none of them starts it.
#[test]
fn servers_waiting_for_the_slot_of_a_failing_release_are_paused_not_started() {
    let test = "paused-waiting";
    let Some(etcd) = Etcd::start(test) else {
        return;
    };
    let mut group = group!(Group::new(test, 3, &etcd_fleet(&etcd, test), |_, _| ()));
    group.start_all();
    let base: Vec<String> = group.servers.iter().map(Bench::current_system).collect();
    let (version, _) = group.publish_everywhere(test, 1, Kind::SlowThenFails(ACTIVATION));
    let mut seen = Seen::default();
    let deadline = Instant::now() + secs(30);
    let holder = loop {
        seen.note(&group);
        let rolled_back: Vec<usize> = (0..3)
            .filter(|&i| {
                let b = &group.servers[i];
                b.activations().iter().any(|a| a == "base switch")
                    && status(b).contains("rolled back")
            })
            .collect();
        if let [h] = rolled_back[..] {
            break h;
        }
        assert!(
            Instant::now() < deadline,
            "no server rolled the release back (or several did: {rolled_back:?})\n{}",
            group.report()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let paused = format!(
        "fleet paused for release {version}: it failed on web-{} (",
        holder + 1
    );
    let others: Vec<usize> = (0..3).filter(|&i| i != holder).collect();
    let deadline = Instant::now() + secs(10);
    while !others
        .iter()
        .all(|&i| status(&group.servers[i]).starts_with(&paused))
    {
        seen.note(&group);
        assert!(
            Instant::now() < deadline,
            "the others are not paused\nseen: {:?}\n{}",
            seen.0,
            group.report()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(secs(2));
    for &i in &others {
        let b = &group.servers[i];
        assert!(
            seen.any(i, |l| l.starts_with(&waiting_for(holder))),
            "web-{} was not waiting for web-{}'s slot: {:?}",
            i + 1,
            holder + 1,
            seen.0
        );
        assert!(
            !b.activations().iter().any(|a| a.starts_with("r1 ")),
            "web-{} started the paused release\n{}",
            i + 1,
            group.report()
        );
        assert!(status(b).starts_with(&paused), "{}", status(b));
        assert_eq!(b.current_system(), base[i]);
    }
    assert_eq!(switch_starts(&group.servers[holder], 1).len(), 1);
    let fs = fleet_status(&group, others[0]);
    assert!(
        fs.contains("1 slot, 0 taken")
            && fs.contains(&format!(
                "paused: release {version} failed on web-{} (id 100{})",
                holder + 1,
                holder + 1
            )),
        "{fs}"
    );
}

/// Scenario 4.
#[test]
fn while_etcd_is_down_nobody_deploys_and_afterwards_nobody_holds_a_stale_slot() {
    let test = "etcd-down";
    let Some(mut etcd) = Etcd::start(test) else {
        return;
    };
    let mut group = group!(Group::new(test, 3, &etcd_fleet(&etcd, test), |_, _| ()));
    group.start_with_web1_polling();
    // Idle, only the group's poller asks FlakeHub (every second here); the others wait for news.
    let asked = |g: &Group| -> Vec<usize> {
        g.servers
            .iter()
            .map(|b| b.flakehub.requests(Endpoint::Version))
            .collect()
    };
    // (Each follower checks the group's release once, at its first cycle with etcd in view.)
    std::thread::sleep(secs(2));
    for b in &group.servers {
        b.flakehub.reset_counts();
    }
    std::thread::sleep(secs(3));
    let idle = asked(&group);
    assert_eq!(
        idle.iter().filter(|&&n| n > 0).count(),
        1,
        "idle, more than the poller asked FlakeHub: {idle:?}"
    );
    let (_, paths) = group.publish_everywhere(test, 1, Kind::Slow(ACTIVATION));
    // etcd goes away while the first server activates the release.
    let deadline = Instant::now() + secs(20);
    let holder = loop {
        if let Some(h) = (0..3).find(|&i| !switch_starts(&group.servers[i], 1).is_empty()) {
            break h;
        }
        assert!(
            Instant::now() < deadline,
            "nobody started deploying\n{}",
            group.report()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    etcd.stop();
    let before = asked(&group);
    let mut seen = Seen::default();
    let quiet_until = Instant::now() + secs(ACTIVATION + 3);
    while Instant::now() < quiet_until {
        seen.note(&group);
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in (0..3).filter(|&i| i != holder) {
        let b = &group.servers[i];
        assert!(
            b.activations().iter().all(|a| !a.starts_with("r1 switch")),
            "web-{} activated the release while etcd was down\n{}",
            i + 1,
            group.report()
        );
        assert!(
            seen.any(i, |l| l.contains("etcd unreachable")),
            "web-{} never said etcd was unreachable: {:?}",
            i + 1,
            seen.0
        );
    }
    // Without etcd every server asks FlakeHub itself again (and still deploys nothing).
    let after = asked(&group);
    for i in (0..3).filter(|&i| i != holder) {
        assert!(
            after[i] > before[i],
            "web-{} did not poll FlakeHub itself while etcd was down: {before:?} -> {after:?}",
            i + 1
        );
    }
    // The deploy under way went on without etcd.
    assert_eq!(
        group.servers[holder].current_system(),
        paths[holder],
        "web-{}'s deploy did not finish while etcd was down\n{}",
        holder + 1,
        group.report()
    );
    etcd.resume();
    watch_deploys(&group, &paths, secs(40), &mut seen, |_, _| ());
    one_after_another(&group, &[0, 1, 2], 1);
    let fs = fleet_status(&group, 0);
    assert!(
        fs.contains("1 slot, 0 taken"),
        "a slot is still held:\n{fs}\n{}",
        group.report()
    );
}

/// While etcd cannot be reached nothing is deployed, so no `deploy` hook may report a deploy
/// that failed: hooks are for what a cycle did to the system.
#[test]
fn an_unreachable_etcd_fires_no_deploy_failed_hook() {
    let test = "etcd-down-hooks";
    let Some(mut etcd) = Etcd::start(test) else {
        return;
    };
    let tables = format!(
        "{}\n[[hook]]\ncommand = [\"@ROOT@/bin/record-hook\"]\ntimeout = \"10s\"\n",
        etcd_fleet(&etcd, test)
    );
    let mut group = group!(Group::new(test, 1, &tables, |_, _| ()));
    let b = &group.servers[0];
    b.script(
        "bin/record-hook",
        "#!/bin/bash\n{ echo ===; env | grep '^HCLOUD_NIXOS_' | sort; } >>@ROOT@/logs/hooks.log\n",
    );
    group.start_all();
    etcd.stop();
    let (version, _) = group.publish_to(0, test, 1, Kind::Normal);
    let b = &group.servers[0];
    let mut seen = Seen::default();
    let deadline = Instant::now() + secs(6);
    while Instant::now() < deadline {
        seen.note(&group);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        seen.any(0, |l| l.contains("etcd unreachable")),
        "{:?}",
        seen.0
    );
    assert!(b.activations().is_empty(), "{}", group.report());
    let hooks = std::fs::read_to_string(b.path("logs/hooks.log")).unwrap_or_default();
    assert!(
        !hooks.contains("HCLOUD_NIXOS_OUTCOME=failed"),
        "a deploy of {version} that never started was reported as failed to the hooks:\n{hooks}"
    );
}

/// FleetLock's answer while server `h` holds the only slot, as a waiting server's status shows it.
fn fleetlock_waiting_for(h: usize) -> String {
    format!(
        "waiting for a fleet slot (1 slots): fleetlock said 409 failed_lock: semaphore full, held by 100{}",
        h + 1
    )
}

/// Scenario 5 (scenario 1 through FleetLock).
#[test]
fn three_servers_deploy_one_after_another_through_fleetlock() {
    let test = "fleetlock";
    let standin = FleetLockStandin::start(1);
    let mut group = group!(Group::new(test, 3, &fleetlock_fleet(&standin), |_, _| ()));
    group.start_all();
    all_deploy_one_at_a_time(&group, test, fleetlock_waiting_for);
    assert!(
        standin.holders("web").is_empty(),
        "{:?}",
        standin.holders("web")
    );
    assert_eq!(standin.protocol_errors(), 0);
    let fs = fleet_status(&group, 0);
    assert!(fs.contains("holders unknown"), "{fs}");
    let run = group.fleet_cli(0, &["resume"]);
    assert!(
        !run.ok() && run.all().contains("no pauses"),
        "fleet resume with fleetlock: {}",
        run.all()
    );
}

/// Scenario 3 through FleetLock: the protocol has no pauses, so a release that failed on one
/// server gives its slot back and the others deploy it.
#[test]
fn with_fleetlock_a_failed_release_frees_its_slot_and_pauses_nothing() {
    let test = "fleetlock-failed";
    let standin = FleetLockStandin::start(1);
    let mut group = group!(Group::new(test, 2, &fleetlock_fleet(&standin), |_, _| ()));
    group.start_all();
    let base = group.servers[0].current_system();
    let (v1, _) = group.publish_to(0, test, 1, Kind::ActivationFails);
    let web1 = &group.servers[0];
    web1.wait_for(secs(20), "web-1 rolled back release 1", || {
        web1.activations().iter().any(|a| a == "base switch") && status(web1).contains(&v1)
    });
    assert!(
        standin.holders("web").is_empty(),
        "{:?}\n{}",
        standin.holders("web"),
        group.report()
    );
    let (_, p2) = group.publish_to(1, test, 1, Kind::Normal);
    let web2 = &group.servers[1];
    web2.wait_for(secs(20), "web-2 deployed release 1", || deployed(web2, &p2));
    assert_eq!(web1.current_system(), base);
    assert!(
        standin.holders("web").is_empty(),
        "{:?}",
        standin.holders("web")
    );
}

/// `hcloud-nixos fleet status --config FILE`, as the README and `hcloud-nixos status --config
/// FILE` suggest, is refused: `--config` is only taken between `fleet` and its subcommand.
#[test]
fn fleet_status_takes_config_after_the_subcommand() {
    let test = "fleet-cli";
    let standin = FleetLockStandin::start(1);
    let group = group!(Group::new(test, 1, &fleetlock_fleet(&standin), |_, _| ()));
    let run = group.servers[0].run(&["fleet", "status"], secs(30));
    assert!(run.ok(), "{}", run.all());
    assert!(
        run.stdout.contains("group web (fleetlock)"),
        "{}",
        run.all()
    );
}

const SECRET: &str = "s3cret-Pa55";

/// Issue 13, item 2: credentials in the FleetLock URL are sent (HTTP basic authentication), and
/// never reach a log line, the status, the state file or a command's output, even when every
/// request fails and the agent says so.
#[test]
fn fleetlock_credentials_never_reach_logs_status_or_the_state_file() {
    let test = "fleetlock-credentials";
    let mut standin = FleetLockStandin::start(1);
    standin.require_basic_auth("agent", SECRET);
    let url = standin
        .url()
        .replacen("://", &format!("://agent:{SECRET}@"), 1);
    let fleet = format!(
        "[fleet]\ngroup = \"web\"\nslots = 1\nbackend = \"fleetlock\"\npause_on_failure = false\n\
         [fleet.fleetlock]\nurl = \"{url}\"\n"
    );
    let mut group = group!(Group::new(test, 1, &fleet, |_, _| ()));
    group.start_all();
    let (_, p1) = group.publish_to(0, test, 1, Kind::Normal);
    let b = &group.servers[0];
    b.wait_for(secs(20), "release 1 deployed through FleetLock", || {
        deployed(b, &p1)
    });
    assert_eq!(standin.unauthorized(), 0, "the credentials were not sent");
    standin.stop();
    group.publish_to(0, test, 2, Kind::Normal);
    b.wait_for(
        secs(20),
        "the status saying FleetLock is unreachable",
        || status(b).contains("fleetlock unreachable"),
    );
    assert!(status(b).contains("127.0.0.1:"), "{}", status(b));
    let state_file = std::fs::read_to_string(b.state_dir().join("state.json")).unwrap();
    let check = std::process::Command::new(harness::binary())
        .args(["config", "check"])
        .arg(&b.config)
        .output()
        .unwrap();
    let outputs = [
        ("the status line", status(b)),
        ("state.json", state_file),
        ("the logs", b.all_logs()),
        ("hcloud-nixos status", b.status()),
        ("fleet status", group.fleet_cli(0, &["status"]).all()),
        (
            "config check",
            format!(
                "{}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            ),
        ),
    ];
    for (what, text) in outputs {
        assert!(!text.contains(SECRET), "{what} shows the password:\n{text}");
    }
}

/// Issue 15: with a poll interval of an hour nobody would look before then; `hcloud-nixos fleet
/// announce` (CI, right after publishing) wakes every agent of the group at once, and they deploy
/// the release taking turns. Each checks it against its own FlakeHub first.
#[test]
fn an_announce_reaches_every_agent_at_once() {
    let test = "announce";
    let Some(etcd) = Etcd::start(test) else {
        return;
    };
    let mut group = group!(Group::new(test, 3, &etcd_fleet(&etcd, test), |_, o| {
        o.poll_interval = "1h";
    }));
    group.start_all();
    let (version, paths) = group.publish_everywhere(test, 1, Kind::Slow(ACTIVATION));
    for b in &group.servers {
        b.flakehub.reset_counts();
    }
    std::thread::sleep(secs(2));
    for (i, b) in group.servers.iter().enumerate() {
        assert_eq!(
            b.flakehub.total_requests(),
            0,
            "web-{} asked FlakeHub before the announce",
            i + 1
        );
        assert!(b.activations().is_empty());
    }
    let t0 = Instant::now();
    let run = group.fleet_cli(0, &["announce", &version]);
    assert!(run.ok(), "fleet announce: {}", run.all());
    assert!(run.stdout.contains("announced"), "{}", run.all());
    let mut first_step = vec![None; 3];
    while first_step.iter().any(Option::is_none) {
        for (i, b) in group.servers.iter().enumerate() {
            if first_step[i].is_none() && b.flakehub.requests(Endpoint::Output) > 0 {
                first_step[i] = Some(t0.elapsed());
            }
        }
        assert!(
            t0.elapsed() < secs(10),
            "not every agent took a step: {first_step:?}\n{}",
            group.report()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("announce (command included) to each agent's first step: {first_step:?}");
    let last = first_step.iter().flatten().max().copied().unwrap();
    assert!(
        last < secs(2),
        "the last agent started {last:?} after the announce"
    );
    let mut seen = Seen::default();
    watch_deploys(&group, &paths, secs(30), &mut seen, |_, _| ());
    let all = t0.elapsed();
    println!("announce to all three deployed, one at a time: {all:?}");
    one_after_another(&group, &[0, 1, 2], 1);
}

/// Issue 15: `fleet status` shows every member of the group as its agent reported it, and one
/// whose agent died as silent once its lease has expired.
#[test]
fn fleet_status_lists_every_member_and_a_silent_one() {
    let test = "members";
    let Some(etcd) = Etcd::start(test) else {
        return;
    };
    let mut group = group!(Group::new(test, 3, &etcd_fleet(&etcd, test), |_, _| ()));
    group.start_all();
    let deadline = Instant::now() + secs(20);
    let text = loop {
        let fs = fleet_status(&group, 0);
        if fs.contains("members: 3 (3 alive, 0 silent)") && fs.matches("up to date").count() >= 3 {
            break fs;
        }
        assert!(Instant::now() < deadline, "{fs}\n{}", group.report());
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("{text}");
    assert!(text.contains("poller: web-"), "{text}");
    group.agents[1].as_mut().unwrap().kill9();
    let deadline = Instant::now() + secs(10);
    let text = loop {
        let fs = fleet_status(&group, 0);
        if fs.contains("members: 3 (2 alive, 1 silent)") {
            break fs;
        }
        assert!(Instant::now() < deadline, "web-2 never went silent:\n{fs}");
        std::thread::sleep(Duration::from_millis(200));
    };
    println!("{text}");
    let row = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or("")
            .to_string()
    };
    assert!(row("web-2 ").contains("silent since"), "{text}");
    assert!(
        row("web-1 ").contains("up to date") && row("web-3 ").contains("up to date"),
        "{text}"
    );
    let json = group.fleet_cli(0, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let members = v["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    for m in members {
        assert_eq!(m["alive"], m["id"] != "1002", "{m}");
        assert!(
            m["running"]
                .as_str()
                .is_some_and(|r| r.starts_with("0.1.0")),
            "{m}"
        );
    }
}

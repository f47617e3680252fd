//! Tests for reboots: settings, detection, windows, decisions and carrying them out.

use std::collections::VecDeque;
use std::os::unix::fs::symlink;
use std::sync::Mutex;

use super::*;

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn window(days: &[&str], start: &str, length: &str, tz: &str) -> Window {
    Window::parse(&strings(days), start, length, tz).unwrap()
}

fn ts(text: &str) -> Timestamp {
    text.parse().unwrap()
}

// ---- settings ----

#[test]
fn policies_parse_from_text_and_toml() {
    assert_eq!("never".parse::<Policy>(), Ok(Policy::Never));
    assert_eq!("when-needed".parse::<Policy>(), Ok(Policy::WhenNeeded));
    assert_eq!("window".parse::<Policy>(), Ok(Policy::Window));
    let e = "always".parse::<Policy>().unwrap_err();
    assert_eq!(
        e,
        "'always' is not a reboot policy (never, when-needed or window)"
    );
    #[derive(Deserialize)]
    struct F {
        reboot: Policy,
    }
    let f: F = toml::from_str("reboot = \"when-needed\"").unwrap();
    assert_eq!(f.reboot, Policy::WhenNeeded);
    assert!(toml::from_str::<F>("reboot = \"when_needed\"").is_err());
    assert_eq!(Policy::default(), Policy::Never);
    for p in [Policy::Never, Policy::WhenNeeded, Policy::Window] {
        assert_eq!(p.to_string().parse::<Policy>(), Ok(p));
    }
}

#[test]
fn the_window_section_has_defaults_and_rejects_unknown_keys() {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct F {
        #[serde(default)]
        reboot_window: WindowConfig,
    }
    let f: F = toml::from_str("").unwrap();
    let w = f.reboot_window.resolve().unwrap();
    assert_eq!(w.days, vec![Weekday::Saturday, Weekday::Sunday]);
    assert_eq!(w.start, Time::constant(2, 0, 0, 0));
    assert_eq!(w.length, Duration::from_secs(7200));
    assert_eq!(w.time_zone, TimeZone::UTC);
    assert_eq!(w.time_zone_name(), "UTC");

    let f: F = toml::from_str(
        "[reboot_window]\ndays = [\"tue\", \"Thursday\", \"TUE\"]\nstart = \"23:30\"\n\
         length = \"90m\"\ntime_zone = \"Europe/Berlin\"\n",
    )
    .unwrap();
    let w = f.reboot_window.resolve().unwrap();
    assert_eq!(w.days, vec![Weekday::Tuesday, Weekday::Thursday]);
    assert_eq!(w.start, Time::constant(23, 30, 0, 0));
    assert_eq!(w.length, Duration::from_secs(5400));
    assert_eq!(w.time_zone_name(), "Europe/Berlin");

    let e = toml::from_str::<F>("[reboot_window]\nday = [\"Sat\"]\n")
        .err()
        .unwrap();
    assert!(e.to_string().contains("day"), "{e}");
}

#[test]
fn every_problem_in_a_window_is_one_line_naming_its_key() {
    let e = Window::parse(
        &strings(&["Sat", "Caturday"]),
        "25:00",
        "0s",
        "Mars/Olympus",
    )
    .unwrap_err();
    assert_eq!(
        e,
        vec![
            "reboot_window.days: 'Caturday' is not a day of the week (Mon, Tue, ... Sun)",
            "reboot_window.start: '25:00' is not a time of day (HH:MM, for example 02:00)",
            "reboot_window.length: '0s' is out of range; use 1m to 7days",
            "reboot_window.time_zone: 'Mars/Olympus' is not a known time zone (an IANA name such \
             as Europe/Berlin, or UTC)",
        ]
    );
    for p in &e {
        assert!(!p.contains('\n'));
    }
    let e = Window::parse(&[], "02:00", "8d", "UTC").unwrap_err();
    assert_eq!(
        e,
        vec![
            "reboot_window.days: no day listed",
            "reboot_window.length: '8d' is out of range; use 1m to 7days",
        ]
    );
    for bad in [
        "2", "02:0", "02:60", "-1:00", "02:00:00", "ab:cd", "", "24:00", "002:00",
    ] {
        let e = Window::parse(&strings(&["Mon"]), bad, "1h", "UTC").unwrap_err();
        assert_eq!(e.len(), 1, "{bad}: {e:?}");
        assert!(e[0].starts_with("reboot_window.start:"), "{e:?}");
    }
    for bad in ["soon", "1 fortnight", "-1h"] {
        let e = Window::parse(&strings(&["Mon"]), "02:00", bad, "UTC").unwrap_err();
        assert!(e[0].starts_with("reboot_window.length:"), "{e:?}");
    }
    for bad in ["+01:00", "Europe/Nowhere", "", "Europe/Berlin extra"] {
        let e = Window::parse(&strings(&["Mon"]), "02:00", "1h", bad).unwrap_err();
        assert!(e[0].starts_with("reboot_window.time_zone:"), "{bad}: {e:?}");
    }
    let w = window(&["Sun"], "0:05", "7d", "UTC");
    assert_eq!(w.start, Time::constant(0, 5, 0, 0));
    assert_eq!(w.length, MAX_LENGTH);
    let all = window(
        &["monday", "Tue", "wed", "THU", "fri", "sat", "sunday"],
        "12:00",
        "1h",
        "Asia/Kathmandu",
    );
    assert_eq!(all.days.len(), 7);
}

// ---- detection ----

/// A fake NixOS system: `kernel`, `initrd` and `kernel-modules` links into a fake store.
fn system(root: &Path, name: &str, kernel: &str, initrd: &str, modules: &str) -> PathBuf {
    let store = root.join("store");
    for item in [kernel, initrd, modules] {
        std::fs::create_dir_all(store.join(item)).unwrap();
    }
    let modules_dir = store.join(modules).join("lib/modules");
    if let Some(version) = modules.strip_prefix("modules-") {
        std::fs::create_dir_all(modules_dir.join(version)).unwrap();
    }
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    symlink(store.join(kernel).join("bzImage"), dir.join("kernel")).unwrap();
    std::fs::write(store.join(kernel).join("bzImage"), "").unwrap();
    symlink(store.join(initrd).join("initrd"), dir.join("initrd")).unwrap();
    std::fs::write(store.join(initrd).join("initrd"), "").unwrap();
    symlink(store.join(modules), dir.join("kernel-modules")).unwrap();
    dir
}

#[test]
fn a_new_kernel_initrd_or_modules_requires_a_reboot() {
    let tmp = tempfile::tempdir().unwrap();
    let r = tmp.path();
    let booted = system(r, "booted", "k-linux-6.6.1", "i1", "modules-6.6.1");
    let same = system(r, "same", "k-linux-6.6.1", "i1", "modules-6.6.1");
    let kernel = system(r, "kernel", "k-linux-6.6.2", "i1", "modules-6.6.1");
    let initrd = system(r, "initrd", "k-linux-6.6.1", "i2", "modules-6.6.1");
    let modules = system(r, "modules", "k-linux-6.6.1", "i1", "modules-6.6.2");
    assert!(!reboot_required(&booted, &booted));
    assert!(!reboot_required(&booted, &same));
    assert!(reboot_required(&booted, &kernel));
    assert!(reboot_required(&booted, &initrd));
    assert!(reboot_required(&booted, &modules));

    // The links as NixOS has them: /run/booted-system -> /nix/store/...-nixos-system-...
    symlink(&booted, r.join("run-booted-system")).unwrap();
    symlink(&kernel, r.join("run-current-system")).unwrap();
    assert!(reboot_required(
        &r.join("run-booted-system"),
        &r.join("run-current-system")
    ));
    // A link to a link to the same kernel is the same kernel.
    let indirect = r.join("indirect");
    std::fs::create_dir(&indirect).unwrap();
    symlink(booted.join("kernel"), indirect.join("kernel")).unwrap();
    symlink(booted.join("initrd"), indirect.join("initrd")).unwrap();
    symlink(
        booted.join("kernel-modules"),
        indirect.join("kernel-modules"),
    )
    .unwrap();
    assert!(!reboot_required(&booted, &indirect));
    // One side without modules differs.
    std::fs::remove_file(indirect.join("kernel-modules")).unwrap();
    assert!(reboot_required(&booted, &indirect));
}

#[test]
fn without_a_booted_system_no_reboot_is_required() {
    let tmp = tempfile::tempdir().unwrap();
    let current = system(tmp.path(), "current", "k2", "i2", "m2");
    assert!(!reboot_required(&tmp.path().join("absent"), &current));
    assert!(!reboot_required(&current, &tmp.path().join("absent")));
    // A container: neither system has a kernel.
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    assert!(!reboot_required(&a, &b));
}

#[test]
fn the_kernel_version_comes_from_the_modules_or_the_store_name() {
    let tmp = tempfile::tempdir().unwrap();
    let s = system(tmp.path(), "s", "abc-linux-6.12.9", "i", "modules-6.12.9");
    assert_eq!(kernel_version(&s).as_deref(), Some("6.12.9"));
    let t = system(tmp.path(), "t", "abc-linux-6.1.5", "i", "no-modules");
    assert_eq!(kernel_version(&t).as_deref(), Some("6.1.5"));
    assert_eq!(kernel_version(&tmp.path().join("nothing")), None);
    assert_eq!(
        resolve_system(&s).unwrap(),
        std::fs::canonicalize(&s).unwrap()
    );
}

#[test]
fn a_kernel_version_reaches_terminals_on_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let s = system(tmp.path(), "s", "k", "i", "modules-6.12\u{1b}[2J\nroot");
    assert_eq!(kernel_version(&s).as_deref(), Some("6.12\\u{1b}[2J\\nroot"));
}

#[test]
fn only_terminals_logind_names_are_written_to() {
    for good in ["pts/3", "tty1", "ttyS0", "hvc0"] {
        assert!(is_tty_name(good), "{good}");
    }
    for bad in [
        "",
        "/etc/shadow",
        "../etc/shadow",
        "pts/../../etc/x",
        "pts//1",
        ".x",
        "a b",
    ] {
        assert!(!is_tty_name(bad), "{bad}");
    }
}

#[tokio::test]
async fn the_wall_message_goes_to_terminals_only() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("not-a-tty");
    std::fs::write(&file, "precious").unwrap();
    let link = tmp.path().join("link");
    symlink("/dev/null", &link).unwrap();
    write_ttys(&[file.clone(), link], "rebooting").await;
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
}

// ---- window arithmetic, by example ----

#[test]
fn decisions_by_policy() {
    let w = window(&["Sat"], "02:00", "2h", "UTC");
    let now = ts("2026-11-27T12:00:00Z"); // Friday
    for p in [Policy::Never, Policy::WhenNeeded, Policy::Window] {
        assert_eq!(
            decide(p, Some(&w), false, now, 0.5, None),
            Decision::NotRequired
        );
    }
    assert_eq!(
        decide(Policy::Never, Some(&w), true, now, 0.5, None),
        Decision::Hold {
            reason: "reboot required: a new kernel is waiting; reboot = never".into()
        }
    );
    assert_eq!(
        decide(Policy::WhenNeeded, None, true, now, 0.5, None),
        Decision::RebootNow
    );
    assert_eq!(
        decide(Policy::Window, None, true, now, 0.5, None),
        Decision::Hold {
            reason: HOLD_NO_WINDOW.into()
        }
    );
    assert_eq!(
        decide(Policy::Window, Some(&w), true, now, 0.5, None),
        Decision::RebootAt(ts("2026-11-28T03:00:00Z"))
    );
}

#[test]
fn a_planned_moment_is_kept_until_it_comes() {
    let w = window(&["Sat"], "02:00", "2h", "UTC");
    let friday = ts("2026-11-27T12:00:00Z");
    let planned = ts("2026-11-28T03:00:00Z");
    // Another poll, another random number: the same moment.
    assert_eq!(
        decide(Policy::Window, Some(&w), true, friday, 0.1, Some(planned)),
        Decision::RebootAt(planned)
    );
    let saturday = ts("2026-11-28T02:10:00Z");
    assert_eq!(
        decide(Policy::Window, Some(&w), true, saturday, 0.9, Some(planned)),
        Decision::RebootAt(planned)
    );
    // It has come, or passed while the window is open (the agent was busy, inhibitors held).
    assert_eq!(
        decide(Policy::Window, Some(&w), true, planned, 0.9, Some(planned)),
        Decision::RebootNow
    );
    let later = ts("2026-11-28T03:30:00Z");
    assert_eq!(
        decide(Policy::Window, Some(&w), true, later, 0.9, Some(planned)),
        Decision::RebootNow
    );
    // The window closed before it happened: a new moment in next week's window.
    let after = ts("2026-11-28T04:00:00Z");
    assert_eq!(
        decide(Policy::Window, Some(&w), true, after, 0.0, Some(planned)),
        Decision::RebootAt(ts("2026-12-05T02:00:00Z"))
    );
    // A moment planned under another window (the settings changed) is drawn again.
    assert_eq!(
        decide(
            Policy::Window,
            Some(&w),
            true,
            friday,
            0.0,
            Some(ts("2026-11-27T13:00:00Z"))
        ),
        Decision::RebootAt(ts("2026-11-28T02:00:00Z"))
    );
    // Inside the window with r = 0 the moment is now.
    assert_eq!(
        decide(Policy::Window, Some(&w), true, saturday, 0.0, None),
        Decision::RebootNow
    );
}

#[test]
fn status_lines() {
    let w = window(&["Sat"], "02:00", "2h", "Europe/Berlin");
    let friday = ts("2026-11-27T12:00:00Z");
    let d = |p, required, now, planned| describe_next(p, Some(&w), required, now, planned);
    assert_eq!(d(Policy::Window, false, friday, None), "no reboot required");
    assert_eq!(d(Policy::Never, true, friday, None), HOLD_NEVER);
    assert_eq!(
        d(Policy::WhenNeeded, true, friday, None),
        "reboot required; rebooting now (reboot = when-needed)"
    );
    assert_eq!(
        d(Policy::Window, true, friday, None),
        "reboot required; next window Sat 2026-11-28 02:00 Europe/Berlin"
    );
    assert_eq!(
        d(
            Policy::Window,
            true,
            friday,
            Some(ts("2026-11-28T01:41:00Z"))
        ),
        "reboot required; planned for Sat 2026-11-28 02:41 Europe/Berlin (window until Sat 04:00)"
    );
    assert_eq!(
        d(Policy::Window, true, ts("2026-11-28T01:30:00Z"), None),
        "reboot required; window open since Sat 2026-11-28 02:00 Europe/Berlin until Sat 04:00"
    );
    assert_eq!(
        describe_next(Policy::Window, None, true, friday, None),
        HOLD_NO_WINDOW
    );
}

#[test]
fn wall_messages() {
    assert_eq!(
        wall_message(Duration::from_secs(300), Some("6.12.9")),
        "hcloud-nixos: rebooting in 5m for a new kernel (6.12.9)"
    );
    assert_eq!(
        wall_message(Duration::from_secs(90), None),
        "hcloud-nixos: rebooting in 1m 30s for a new kernel"
    );
}

#[test]
fn only_block_locks_on_shutdown_held_by_others_block() {
    let lock = |what: &str, mode: &str, pid| Inhibitor {
        what: what.into(),
        who: "who".into(),
        why: "why".into(),
        mode: mode.into(),
        uid: 0,
        pid,
    };
    let list = [
        lock("shutdown:sleep", "block", 10),
        lock("sleep:shutdown", "block", 11),
        lock("shutdown", "delay", 12),
        lock("sleep", "block", 13),
        lock("shutdown", "block-weak", 14),
        lock("shutdown", "block", 99),
        lock("handle-power-key", "block", 15),
    ];
    assert_eq!(
        blocking(&list, 99),
        vec!["who (why, pid 10)", "who (why, pid 11)"]
    );
}

#[test]
fn what_another_user_says_about_a_lock_is_one_line() {
    // Anyone allowed to take an inhibitor lock chooses its `who` and `why`; they reach the log
    // and the status line.
    let lock = Inhibitor {
        what: "shutdown".into(),
        who: "me\nWARN forged".into(),
        why: format!("\u{1b}[2J{}", "x".repeat(500)),
        mode: "block".into(),
        uid: 1000,
        pid: 10,
    };
    let said = blocking(&[lock], 99);
    assert_eq!(said.len(), 1);
    assert!(!said[0].chars().any(char::is_control), "{said:?}");
    assert!(said[0].len() < 250, "{said:?}");
    assert!(
        said[0].starts_with("me\\nWARN forged (\\u{1b}[2J"),
        "{said:?}"
    );
}

// ---- carrying out, with a fake host ----

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Wall(String),
    Sleep(Duration),
    Inhibitors(usize),
    Reboot,
}

#[derive(Default)]
struct FakeHost {
    events: Mutex<Vec<Event>>,
    /// What each inhibitor check returns, in turn; the last answer repeats. Empty: none.
    inhibitors: Mutex<VecDeque<Vec<String>>>,
    wall_fails: bool,
    reboot_fails: bool,
}

impl FakeHost {
    fn with_inhibitors(answers: &[&[&str]]) -> Self {
        FakeHost {
            inhibitors: Mutex::new(answers.iter().map(|a| strings(a)).collect()),
            ..Default::default()
        }
    }

    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    fn rebooted(&self) -> bool {
        self.events().contains(&Event::Reboot)
    }

    fn log(&self, e: Event) {
        self.events.lock().unwrap().push(e);
    }
}

impl Host for FakeHost {
    async fn block_inhibitors(&self) -> Result<Vec<String>> {
        let mut answers = self.inhibitors.lock().unwrap();
        let answer = if answers.len() > 1 {
            answers.pop_front().unwrap()
        } else {
            answers.front().cloned().unwrap_or_default()
        };
        drop(answers);
        self.log(Event::Inhibitors(answer.len()));
        Ok(answer)
    }

    async fn wall(&self, message: &str) -> Result<()> {
        self.log(Event::Wall(message.to_string()));
        anyhow::ensure!(!self.wall_fails, "no wall");
        Ok(())
    }

    async fn reboot(&self) -> Result<()> {
        self.log(Event::Reboot);
        anyhow::ensure!(!self.reboot_fails, "Operation inhibited");
        Ok(())
    }

    async fn sleep(&self, d: Duration) {
        self.log(Event::Sleep(d));
    }
}

const GRACE: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(12);

#[tokio::test]
async fn wall_then_grace_then_reboot() {
    let host = FakeHost::default();
    let out = carry_out(&host, GRACE, "going down", MAX_WAIT)
        .await
        .unwrap();
    assert_eq!(out, Outcome::Rebooting);
    assert_eq!(
        host.events(),
        vec![
            Event::Wall("going down".into()),
            Event::Sleep(GRACE),
            Event::Inhibitors(0),
            Event::Reboot,
        ]
    );
}

#[tokio::test]
async fn the_reboot_waits_for_block_inhibitors() {
    let host =
        FakeHost::with_inhibitors(&[&["backup (dump, pid 7)"], &["backup (dump, pid 7)"], &[]]);
    let out = carry_out(&host, GRACE, "m", MAX_WAIT).await.unwrap();
    assert_eq!(out, Outcome::Rebooting);
    assert_eq!(
        host.events(),
        vec![
            Event::Wall("m".into()),
            Event::Sleep(GRACE),
            Event::Inhibitors(1),
            Event::Sleep(INHIBITOR_POLL),
            Event::Inhibitors(1),
            Event::Sleep(INHIBITOR_POLL),
            Event::Inhibitors(0),
            Event::Reboot,
        ]
    );
}

#[tokio::test]
async fn inhibitors_that_outlast_the_wait_postpone_the_reboot() {
    let host = FakeHost::with_inhibitors(&[&["backup (dump, pid 7)"]]);
    let out = carry_out(&host, GRACE, "m", MAX_WAIT).await.unwrap();
    assert_eq!(out, Outcome::Inhibited(strings(&["backup (dump, pid 7)"])));
    assert!(!host.rebooted());
    // 5 + 5 + 2 seconds: the wait is bounded by max_wait exactly.
    assert_eq!(
        host.events(),
        vec![
            Event::Wall("m".into()),
            Event::Sleep(GRACE),
            Event::Inhibitors(1),
            Event::Sleep(INHIBITOR_POLL),
            Event::Inhibitors(1),
            Event::Sleep(INHIBITOR_POLL),
            Event::Inhibitors(1),
            Event::Sleep(Duration::from_secs(2)),
            Event::Inhibitors(1),
            Event::Wall("hcloud-nixos: reboot postponed; blocked by backup (dump, pid 7)".into()),
        ]
    );
    // No waiting at all.
    let host = FakeHost::with_inhibitors(&[&["x"]]);
    let out = carry_out(&host, GRACE, "m", Duration::ZERO).await.unwrap();
    assert_eq!(out, Outcome::Inhibited(strings(&["x"])));
}

#[tokio::test]
async fn a_failed_wall_does_not_stop_the_reboot_but_a_failed_reboot_is_an_error() {
    let host = FakeHost {
        wall_fails: true,
        ..Default::default()
    };
    assert_eq!(
        carry_out(&host, GRACE, "m", MAX_WAIT).await.unwrap(),
        Outcome::Rebooting
    );
    assert!(host.rebooted());
    let host = FakeHost {
        reboot_fails: true,
        ..Default::default()
    };
    let e = carry_out(&host, GRACE, "m", MAX_WAIT).await.unwrap_err();
    assert!(format!("{e:#}").contains("Operation inhibited"), "{e:#}");
}

/// A kernel change under each policy, from the symlinks to the reboot request.
#[tokio::test]
async fn a_kernel_change_under_each_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let booted = system(tmp.path(), "booted", "a-linux-6.6.1", "i1", "modules-6.6.1");
    let current = system(
        tmp.path(),
        "current",
        "b-linux-6.6.2",
        "i2",
        "modules-6.6.2",
    );
    let required = reboot_required(&booted, &current);
    assert!(required);
    let message = wall_message(GRACE, kernel_version(&current).as_deref());
    assert_eq!(
        message,
        "hcloud-nixos: rebooting in 5m for a new kernel (6.6.2)"
    );
    let w = window(&["Sat", "Sun"], "02:00", "2h", "Europe/Berlin");
    let friday = ts("2026-11-27T12:00:00Z");

    // Runs one agent step: decide, and carry out a reboot now.
    async fn step(
        policy: Policy,
        w: &Window,
        required: bool,
        now: Timestamp,
        planned: Option<Timestamp>,
        message: &str,
    ) -> (Decision, FakeHost) {
        let host = FakeHost::default();
        let d = decide(policy, Some(w), required, now, 0.25, planned);
        if d == Decision::RebootNow {
            carry_out(&host, GRACE, message, MAX_WAIT).await.unwrap();
        }
        (d, host)
    }

    // never: held, no reboot.
    let (d, host) = step(Policy::Never, &w, required, friday, None, &message).await;
    assert!(matches!(d, Decision::Hold { .. }));
    assert!(host.events().is_empty());

    // when-needed: at once.
    let (d, host) = step(Policy::WhenNeeded, &w, required, friday, None, &message).await;
    assert_eq!(d, Decision::RebootNow);
    assert_eq!(host.events().first(), Some(&Event::Wall(message.clone())));
    assert!(host.rebooted());

    // window: a moment on Saturday between 02:00 and 04:00 Berlin; nothing before it.
    let (d, host) = step(Policy::Window, &w, required, friday, None, &message).await;
    let Decision::RebootAt(at) = d else {
        panic!("{d:?}")
    };
    assert_eq!(at, ts("2026-11-28T01:30:00Z"));
    assert!(!host.rebooted());
    let (d, host) = step(
        Policy::Window,
        &w,
        required,
        ts("2026-11-28T01:29:59Z"),
        Some(at),
        &message,
    )
    .await;
    assert_eq!(d, Decision::RebootAt(at));
    assert!(!host.rebooted());
    let (d, host) = step(Policy::Window, &w, required, at, Some(at), &message).await;
    assert_eq!(d, Decision::RebootNow);
    assert!(host.rebooted());

    // After the reboot the booted system is the current one: nothing more to do.
    let after = reboot_required(&current, &current);
    for p in [Policy::Never, Policy::WhenNeeded, Policy::Window] {
        let (d, host) = step(p, &w, after, at, Some(at), &message).await;
        assert_eq!(d, Decision::NotRequired);
        assert!(host.events().is_empty());
    }
}

mod window;

//! Reboots for a new kernel: when one is needed, when it may happen (the policy and a
//! maintenance window), and carrying it out politely (a wall message, a grace delay, inhibitors).
//!
//! A switch cannot load a new kernel, initrd or kernel modules; [`reboot_required`] notices that
//! by comparing the booted system with the current one. [`decide`] turns the policy, the window
//! and the clock into a [`Decision`]; everything up to there is pure. [`carry_out`] does the
//! reboot through a [`Host`], which is [`Logind`] on a real machine and a fake in tests.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, ToSpan};
use serde::{Deserialize, Serialize};

/// What the agent does when the running system needs a reboot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Policy {
    /// Never reboot; status and metrics say that a reboot is required.
    #[default]
    Never,
    /// Reboot right after a confirmed deploy that needs it.
    WhenNeeded,
    /// Reboot only inside the maintenance window (`[reboot_window]`), at a random moment in it.
    Window,
}

impl Policy {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Policy::Never => "never",
            Policy::WhenNeeded => "when-needed",
            Policy::Window => "window",
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "never" => Ok(Policy::Never),
            "when-needed" => Ok(Policy::WhenNeeded),
            "window" => Ok(Policy::Window),
            other => Err(format!(
                "'{other}' is not a reboot policy (never, when-needed or window)"
            )),
        }
    }
}

/// `[reboot_window]` as written in the TOML file, every key optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WindowConfig {
    pub(crate) days: Option<Vec<String>>,
    pub(crate) start: Option<String>,
    #[serde(default, deserialize_with = "crate::agent::config::raw::duration")]
    pub(crate) length: Option<String>,
    pub(crate) time_zone: Option<String>,
}

pub(crate) const DEFAULT_DAYS: [&str; 2] = ["Sat", "Sun"];
pub(crate) const DEFAULT_START: &str = "02:00";
pub(crate) const DEFAULT_LENGTH: &str = "2h";
pub(crate) const DEFAULT_TIME_ZONE: &str = "UTC";
/// The longest window: a week (a window as long as that is always open on its days).
pub(crate) const MAX_LENGTH: Duration = Duration::from_secs(7 * 24 * 3600);

impl WindowConfig {
    /// Fills the gaps with the defaults (Sat and Sun, 02:00, 2h, UTC) and validates. Problems are
    /// one line each and name the key (`reboot_window.start: ...`).
    pub(crate) fn resolve(&self) -> Result<Window, Vec<String>> {
        let default_days: Vec<String> = DEFAULT_DAYS.iter().map(|d| d.to_string()).collect();
        Window::parse(
            self.days.as_deref().unwrap_or(&default_days),
            self.start.as_deref().unwrap_or(DEFAULT_START),
            self.length.as_deref().unwrap_or(DEFAULT_LENGTH),
            self.time_zone.as_deref().unwrap_or(DEFAULT_TIME_ZONE),
        )
    }
}

/// A weekly maintenance window: it opens on each listed day at `start` (local time in
/// `time_zone`) and stays open for `length` of absolute (elapsed) time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Window {
    /// The days a window opens on, Monday first, each once.
    pub(crate) days: Vec<Weekday>,
    pub(crate) start: Time,
    pub(crate) length: Duration,
    pub(crate) time_zone: TimeZone,
}

fn weekday(name: &str) -> Option<Weekday> {
    Some(match name.to_ascii_lowercase().as_str() {
        "mon" | "monday" => Weekday::Monday,
        "tue" | "tuesday" => Weekday::Tuesday,
        "wed" | "wednesday" => Weekday::Wednesday,
        "thu" | "thursday" => Weekday::Thursday,
        "fri" | "friday" => Weekday::Friday,
        "sat" | "saturday" => Weekday::Saturday,
        "sun" | "sunday" => Weekday::Sunday,
        _ => return None,
    })
}

/// `HH:MM` (or `H:MM`), 24-hour.
fn time_of_day(text: &str) -> Option<Time> {
    let (h, m) = text.split_once(':')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(h) || h.len() > 2 || !digits(m) || m.len() != 2 {
        return None;
    }
    Time::new(h.parse().ok()?, m.parse().ok()?, 0, 0).ok()
}

/// An IANA time zone name, or `UTC` (which needs no time zone database).
pub(crate) fn time_zone(name: &str) -> Result<TimeZone, String> {
    if name == "UTC" {
        return Ok(TimeZone::UTC);
    }
    // Only names: no fixed offsets or POSIX strings, which have no daylight saving rules.
    if name.is_empty() || name.starts_with(['+', '-']) || name.chars().any(char::is_whitespace) {
        return Err(format!("'{name}' is not a time zone name"));
    }
    jiff::tz::db().get(name).map_err(|_| {
        format!("'{name}' is not a known time zone (an IANA name such as Europe/Berlin, or UTC)")
    })
}

impl Window {
    /// Validates the window's settings; every problem is returned, one line each, naming the key.
    pub(crate) fn parse(
        days: &[String],
        start: &str,
        length: &str,
        time_zone_name: &str,
    ) -> Result<Window, Vec<String>> {
        let mut problems = Vec::new();
        let mut parsed = Vec::new();
        for day in days {
            match weekday(day.trim()) {
                Some(d) => parsed.push(d),
                None => problems.push(format!(
                    "reboot_window.days: '{day}' is not a day of the week (Mon, Tue, ... Sun)"
                )),
            }
        }
        if days.is_empty() {
            problems.push("reboot_window.days: no day listed".to_string());
        }
        parsed.sort_by_key(|d| d.to_monday_zero_offset());
        parsed.dedup();
        let start_time = time_of_day(start.trim()).unwrap_or_else(|| {
            problems.push(format!(
                "reboot_window.start: '{start}' is not a time of day (HH:MM, for example 02:00)"
            ));
            Time::midnight()
        });
        let length_value = crate::agent::config::bounds::REBOOT_WINDOW_LENGTH
            .parse("reboot_window.length", length)
            .unwrap_or_else(|e| {
                problems.push(e);
                Duration::ZERO
            });
        let tz = time_zone(time_zone_name.trim()).unwrap_or_else(|e| {
            problems.push(format!("reboot_window.time_zone: {e}"));
            TimeZone::UTC
        });
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Window {
            days: parsed,
            start: start_time,
            length: length_value,
            time_zone: tz,
        })
    }

    /// The time zone's name for people (`Europe/Berlin`, `UTC`).
    pub(crate) fn time_zone_name(&self) -> &str {
        self.time_zone.iana_name().unwrap_or("UTC")
    }

    /// The moment the window of a local date opens. A start time that does not exist that day
    /// (a spring-forward gap: 02:30 in Berlin on the last Sunday of March) is moved forward by
    /// the gap (03:30 CEST); an ambiguous one (an autumn fold) is its first occurrence (the
    /// earlier offset). This is jiff's (and RFC 5545's, and Temporal's) "compatible" rule.
    pub(crate) fn opening_on(&self, date: Date) -> Option<Timestamp> {
        self.time_zone
            .to_ambiguous_timestamp(date.to_datetime(self.start))
            .compatible()
            .ok()
    }

    fn span(&self, start: Timestamp) -> Option<(Timestamp, Timestamp)> {
        let length = SignedDuration::try_from(self.length).ok()?;
        Some((start, start.checked_add(length).ok()?))
    }
}

/// NixOS's rule: a reboot is required when `kernel`, `initrd` or `kernel-modules` inside the
/// booted system (`/run/booted-system`) lead somewhere else than inside the current one
/// (`/run/current-system`). Without a booted or a current system (a container, a first boot
/// that has not made the link yet) nothing can be compared, and no reboot is required.
pub(crate) fn reboot_required(booted: &Path, current: &Path) -> bool {
    if !booted.exists() || !current.exists() {
        return false;
    }
    ["kernel", "initrd", "kernel-modules"]
        .iter()
        .any(|name| target(&booted.join(name)) != target(&current.join(name)))
}

/// Where a link leads in the end; a dangling link by its own target; a missing one is `None`.
fn target(path: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(path)
        .ok()
        .or_else(|| std::fs::read_link(path).ok())
}

/// The system's store path (`/run/booted-system` resolved), to record after a reboot.
#[cfg(test)]
pub(crate) fn resolve_system(link: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(link).ok()
}

/// The kernel version of a system, from `kernel-modules/lib/modules/<version>`, else from the
/// kernel's store path name (`...-linux-6.6.30`).
pub(crate) fn kernel_version(system: &Path) -> Option<String> {
    if let Ok(entries) = std::fs::read_dir(system.join("kernel-modules/lib/modules")) {
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        if let Some(name) = names.pop() {
            // It goes to logged-in users' terminals: one line, no escape sequences.
            return Some(crate::plumbing::text::one_line(&name, 64));
        }
    }
    let kernel = std::fs::canonicalize(system.join("kernel")).ok()?;
    let package = kernel.parent()?.file_name()?.to_str()?;
    let (_, version) = package.split_once("-linux-")?;
    Some(crate::plumbing::text::one_line(version, 64))
}

/// The window open at `now`, or else the next one, as `[start, end)`. A window belongs to the
/// day it opens on, so it may run past midnight and past the week's end. Where windows overlap
/// (several days and a long length) the open one that opened first is returned. Far outside
/// any real clock (near the year -9999 or 9999) no window can be computed; the result is then
/// `(Timestamp::MAX, Timestamp::MAX)`, a window that never comes.
pub(crate) fn window_containing_or_next(w: &Window, now: Timestamp) -> (Timestamp, Timestamp) {
    let today = now.to_zoned(w.time_zone.clone()).date();
    // A window is at most a week long, so one that opened more than 8 local days ago is over
    // (daylight saving moves openings by hours, not days); and a listed day comes within 7.
    let candidates = (-8i64..=8).filter_map(|offset| {
        let date = today.checked_add(offset.days()).ok()?;
        if !w.days.contains(&date.weekday()) {
            return None;
        }
        w.span(w.opening_on(date)?)
    });
    let mut open: Option<(Timestamp, Timestamp)> = None;
    let mut next: Option<(Timestamp, Timestamp)> = None;
    for (start, end) in candidates {
        if start <= now && now < end {
            if open.is_none_or(|(s, _)| start < s) {
                open = Some((start, end));
            }
        } else if start > now && next.is_none_or(|(s, _)| start < s) {
            next = Some((start, end));
        }
    }
    open.or(next).unwrap_or((Timestamp::MAX, Timestamp::MAX))
}

/// Whether `t` lies inside some window (`[start, end)`).
#[cfg(test)]
pub(crate) fn in_window(w: &Window, t: Timestamp) -> bool {
    let (start, _) = window_containing_or_next(w, t);
    start <= t
}

/// A moment in `[max(now, start), end)`, uniformly by `r` in `[0, 1)` (other values are
/// clamped), in whole seconds after `max(now, start)`. When that range is empty (the window is
/// over) the result is `max(now, start)`.
pub(crate) fn pick_moment(start: Timestamp, end: Timestamp, now: Timestamp, r: f64) -> Timestamp {
    let from = start.max(now);
    if from >= end {
        return from;
    }
    let span = end.duration_since(from).as_nanos();
    let r = if r.is_nan() { 0.0 } else { r.clamp(0.0, 1.0) };
    let mut offset = ((span as f64) * r) as i128;
    offset = offset.clamp(0, span - 1);
    offset -= offset % 1_000_000_000;
    let offset = SignedDuration::from_nanos(offset as i64);
    from.checked_add(offset).unwrap_or(from)
}

/// What to do about a reboot now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// The running system is the booted one (as far as the kernel is concerned).
    NotRequired,
    /// A reboot is required but the policy does not allow one; `reason` is for the status line.
    Hold { reason: String },
    /// Reboot now.
    RebootNow,
    /// Reboot at this moment (inside a window); remember it, and pass it back to [`decide`] as
    /// `already_planned` so that the moment is not drawn again every poll.
    RebootAt(Timestamp),
}

pub(crate) const HOLD_NEVER: &str = "reboot required: a new kernel is waiting; reboot = never";
pub(crate) const HOLD_NO_WINDOW: &str =
    "reboot required: a new kernel is waiting; reboot = window but no [reboot_window] is set";

/// Decides what to do about a reboot. Call it after a deploy is confirmed (and on each poll while
/// a reboot is pending). `r` is a random number in `[0, 1)` for the moment inside a window;
/// `already_planned` is the moment an earlier call returned: it is kept while it lies inside the
/// window that is open or next, and once it has come (while the window is open) the answer is
/// [`Decision::RebootNow`].
pub(crate) fn decide(
    policy: Policy,
    window: Option<&Window>,
    required: bool,
    now: Timestamp,
    r: f64,
    already_planned: Option<Timestamp>,
) -> Decision {
    if !required {
        return Decision::NotRequired;
    }
    let w = match (policy, window) {
        (Policy::Never, _) => {
            return Decision::Hold {
                reason: HOLD_NEVER.to_string(),
            };
        }
        (Policy::WhenNeeded, _) => return Decision::RebootNow,
        (Policy::Window, None) => {
            return Decision::Hold {
                reason: HOLD_NO_WINDOW.to_string(),
            };
        }
        (Policy::Window, Some(w)) => w,
    };
    let (start, end) = window_containing_or_next(w, now);
    let moment = match already_planned {
        Some(p) if start <= p && p < end => p,
        _ => pick_moment(start, end, now, r),
    };
    if moment <= now && start <= now && now < end {
        Decision::RebootNow
    } else {
        Decision::RebootAt(moment)
    }
}

fn local(w: &Window, t: Timestamp) -> String {
    format!(
        "{} {}",
        t.to_zoned(w.time_zone.clone())
            .strftime("%a %Y-%m-%d %H:%M"),
        w.time_zone_name()
    )
}

/// One status line about reboots: `no reboot required`, `reboot required; next window Sat
/// 2026-11-28 02:00 Europe/Berlin`, `reboot required; planned for Sat 2026-11-28 02:41
/// Europe/Berlin (window open until 04:00)`.
pub(crate) fn describe_next(
    policy: Policy,
    window: Option<&Window>,
    required: bool,
    now: Timestamp,
    planned: Option<Timestamp>,
) -> String {
    if !required {
        return "no reboot required".to_string();
    }
    match (policy, window) {
        (Policy::Never, _) => HOLD_NEVER.to_string(),
        (Policy::WhenNeeded, _) => "reboot required; rebooting now (reboot = when-needed)".into(),
        (Policy::Window, None) => HOLD_NO_WINDOW.to_string(),
        (Policy::Window, Some(w)) => {
            let (start, end) = window_containing_or_next(w, now);
            if start == Timestamp::MAX {
                return "reboot required; no window to come".to_string();
            }
            let until = end
                .to_zoned(w.time_zone.clone())
                .strftime("%a %H:%M")
                .to_string();
            match planned.filter(|p| start <= *p && *p < end) {
                Some(p) => format!(
                    "reboot required; planned for {} (window until {until})",
                    local(w, p)
                ),
                None if start <= now => format!(
                    "reboot required; window open since {} until {until}",
                    local(w, start)
                ),
                None => format!("reboot required; next window {}", local(w, start)),
            }
        }
    }
}

/// The wall message: `hcloud-nixos: rebooting in 5m for a new kernel (6.6.30)`.
pub(crate) fn wall_message(grace: Duration, version: Option<&str>) -> String {
    let grace = humantime::format_duration(grace);
    match version {
        Some(v) => format!("hcloud-nixos: rebooting in {grace} for a new kernel ({v})"),
        None => format!("hcloud-nixos: rebooting in {grace} for a new kernel"),
    }
}

/// What the machine offers for a reboot. [`Logind`] on a real machine.
pub(crate) trait Host {
    /// Who holds a block-mode inhibitor lock on shutdown, one description each; empty when free.
    fn block_inhibitors(&self) -> impl Future<Output = Result<Vec<String>>> + Send;
    /// Tells logged-in users.
    fn wall(&self, message: &str) -> impl Future<Output = Result<()>> + Send;
    /// Asks for the reboot; returns once it is under way.
    fn reboot(&self) -> impl Future<Output = Result<()>> + Send;
    /// Waits (the grace delay, between inhibitor checks). Tests replace it to record the waits.
    fn sleep(&self, d: Duration) -> impl Future<Output = ()> + Send {
        tokio::time::sleep(d)
    }
}

/// How [`carry_out`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The reboot was requested; the machine is going down.
    Rebooting,
    /// Block-mode inhibitors were still held after `max_wait`; try again later (at the next
    /// poll, keeping the planned moment so that [`decide`] says reboot now while the window is
    /// open).
    Inhibited(Vec<String>),
}

/// How often inhibitors are checked while they block.
pub(crate) const INHIBITOR_POLL: Duration = Duration::from_secs(5);

/// Reboots politely: the wall message, the grace delay, then waits while block-mode inhibitors
/// are held (at most `max_wait`), then reboots. logind lets root ignore inhibitors (and ignores
/// those of the caller's own UID altogether), so they are checked here. A wall that fails is logged and does not stop the reboot. When inhibitors
/// outlast `max_wait`, users are told that the reboot is postponed.
pub(crate) async fn carry_out(
    host: &impl Host,
    grace: Duration,
    message: &str,
    max_wait: Duration,
) -> Result<Outcome> {
    if let Err(e) = host.wall(message).await {
        tracing::warn!("could not tell logged-in users about the reboot: {e:#}");
    }
    host.sleep(grace).await;
    let mut waited = Duration::ZERO;
    loop {
        let blocking = host
            .block_inhibitors()
            .await
            .context("cannot list inhibitor locks")?;
        if blocking.is_empty() {
            break;
        }
        if waited >= max_wait {
            let text = format!(
                "hcloud-nixos: reboot postponed; blocked by {}",
                blocking.join(", ")
            );
            if let Err(e) = host.wall(&text).await {
                tracing::warn!("could not tell logged-in users about the postponement: {e:#}");
            }
            return Ok(Outcome::Inhibited(blocking));
        }
        tracing::info!("reboot waits for inhibitors: {}", blocking.join(", "));
        let step = INHIBITOR_POLL.min(max_wait - waited);
        host.sleep(step).await;
        waited += step;
    }
    host.reboot().await.context("the reboot request failed")?;
    Ok(Outcome::Rebooting)
}

const LOGIN1: &str = "org.freedesktop.login1";
const LOGIN1_PATH: &str = "/org/freedesktop/login1";
const LOGIN1_MANAGER: &str = "org.freedesktop.login1.Manager";
/// `SD_LOGIND_ROOT_CHECK_INHIBITORS`: logind refuses root's reboot while a block lock is held.
const ROOT_CHECK_INHIBITORS: u64 = 1;

/// An inhibitor lock as logind lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Inhibitor {
    /// Colon-separated: `shutdown:sleep`.
    pub(crate) what: String,
    pub(crate) who: String,
    pub(crate) why: String,
    /// `block`, `block-weak` or `delay`.
    pub(crate) mode: String,
    pub(crate) uid: u32,
    pub(crate) pid: u32,
}

/// The locks that stop a reboot: mode `block` on `shutdown`, not held by `own_pid`. Delay locks
/// only delay (logind waits for them) and weak ones are meant to be overridden by root.
pub(crate) fn blocking(inhibitors: &[Inhibitor], own_pid: u32) -> Vec<String> {
    inhibitors
        .iter()
        .filter(|i| i.mode == "block" && i.what.split(':').any(|w| w == "shutdown"))
        .filter(|i| i.pid != own_pid)
        // Whoever takes a lock writes its who and why: one line each, and short.
        .map(|i| {
            format!(
                "{} ({}, pid {})",
                crate::plumbing::text::one_line(&i.who, 60),
                crate::plumbing::text::one_line(&i.why, 120),
                i.pid
            )
        })
        .collect()
}

/// The machine's logind (org.freedesktop.login1) on the system bus.
#[derive(Clone)]
pub(crate) struct Logind {
    conn: zbus::Connection,
}

impl Logind {
    pub(crate) async fn connect() -> Result<Self> {
        let conn = zbus::Connection::system()
            .await
            .context("cannot connect to the system D-Bus (is systemd running?)")?;
        Ok(Logind { conn })
    }

    pub(crate) async fn inhibitors(&self) -> Result<Vec<Inhibitor>> {
        let reply = self
            .conn
            .call_method(
                Some(LOGIN1),
                LOGIN1_PATH,
                Some(LOGIN1_MANAGER),
                "ListInhibitors",
                &(),
            )
            .await
            .context("logind did not list inhibitor locks")?;
        let list: Vec<(String, String, String, String, u32, u32)> = reply.body().deserialize()?;
        Ok(list
            .into_iter()
            .map(|(what, who, why, mode, uid, pid)| Inhibitor {
                what,
                who,
                why,
                mode,
                uid,
                pid,
            })
            .collect())
    }

    /// The TTYs (`/dev/pts/0`) of the sessions logind knows.
    async fn session_ttys(&self) -> Result<Vec<PathBuf>> {
        let reply = self
            .conn
            .call_method(
                Some(LOGIN1),
                LOGIN1_PATH,
                Some(LOGIN1_MANAGER),
                "ListSessions",
                &(),
            )
            .await
            .context("logind did not list sessions")?;
        let sessions: Vec<(String, u32, String, String, zbus::OwnedObjectPath)> =
            reply.body().deserialize()?;
        let mut ttys = Vec::new();
        for (_, _, _, _, path) in sessions {
            let reply = self
                .conn
                .call_method(
                    Some(LOGIN1),
                    path.as_str(),
                    Some("org.freedesktop.DBus.Properties"),
                    "Get",
                    &("org.freedesktop.login1.Session", "TTY"),
                )
                .await;
            let Ok(reply) = reply else { continue };
            let value: zbus::OwnedVariant = reply.body().deserialize()?;
            if let Ok(tty) = String::try_from(value)
                && is_tty_name(&tty)
            {
                ttys.push(Path::new("/dev").join(tty));
            }
        }
        ttys.sort();
        ttys.dedup();
        Ok(ttys)
    }
}

/// A TTY as logind names a session's (`pts/3`, `tty1`): a path under /dev that leads nowhere else.
fn is_tty_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('/')
        && !name
            .split('/')
            .any(|part| part.is_empty() || part.starts_with('.'))
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'/' || b == b'-' || b == b'_')
}

/// Writes the message to each TTY, without waiting on one that is stuck. Only a character
/// device is written to, never through a symlink.
async fn write_ttys(ttys: &[PathBuf], message: &str) {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let text = format!("\r\n{}\r\n", message.replace('\n', "\r\n"));
    for tty in ttys {
        let path = tty.clone();
        let text = text.clone();
        let write = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_NOCTTY | nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW)
                .open(&path)?;
            if !f.metadata()?.file_type().is_char_device() {
                return Err(std::io::Error::other("not a terminal"));
            }
            f.write_all(text.as_bytes())
        });
        match tokio::time::timeout(Duration::from_secs(2), write).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::debug!("cannot write to {}: {e}", tty.display()),
            _ => tracing::debug!("cannot write to {}", tty.display()),
        }
    }
}

impl Host for Logind {
    async fn block_inhibitors(&self) -> Result<Vec<String>> {
        Ok(blocking(&self.inhibitors().await?, std::process::id()))
    }

    /// util-linux's `wall` when it is on PATH; else the message goes to each logind session's TTY.
    async fn wall(&self, message: &str) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let child = tokio::process::Command::new("wall")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        match child {
            Ok(mut child) => {
                if let Some(mut stdin) = child.stdin.take() {
                    stdin.write_all(message.as_bytes()).await?;
                    stdin.write_all(b"\n").await?;
                }
                let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
                    .await
                    .context("wall did not finish in 10s")??;
                anyhow::ensure!(
                    out.status.success(),
                    "wall failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_ttys(&self.session_ttys().await?, message).await;
                Ok(())
            }
            Err(e) => Err(e).context("cannot run wall"),
        }
    }

    /// `RebootWithFlags` with the root inhibitor check (systemd 248 and later), so that a lock
    /// another user took since the last look still stops it; `Reboot` on an older logind.
    /// logind ignores locks held by the caller's own UID even then (seen under systemd 252: a
    /// root `systemd-inhibit --mode=block` did not stop root's reboot), which is why
    /// [`carry_out`] checks [`Host::block_inhibitors`] itself first.
    async fn reboot(&self) -> Result<()> {
        let reply = self
            .conn
            .call_method(
                Some(LOGIN1),
                LOGIN1_PATH,
                Some(LOGIN1_MANAGER),
                "RebootWithFlags",
                &(ROOT_CHECK_INHIBITORS,),
            )
            .await;
        match reply {
            Ok(_) => Ok(()),
            // The bus went away before logind's answer came: the system is going down (seen
            // under load: "failed to read from socket"). Taking it for a failure would forget
            // the reboot just asked for; if none happens, the next check sees the same boot and
            // decides again.
            Err(zbus::Error::InputOutput(e)) => {
                tracing::warn!(
                    "logind's answer to the reboot was lost ({e}); the system is going down"
                );
                Ok(())
            }
            Err(zbus::Error::MethodError(name, _, _))
                if name.as_str() == "org.freedesktop.DBus.Error.UnknownMethod" =>
            {
                self.conn
                    .call_method(
                        Some(LOGIN1),
                        LOGIN1_PATH,
                        Some(LOGIN1_MANAGER),
                        "Reboot",
                        &(false,),
                    )
                    .await
                    .context("logind refused to reboot")?;
                Ok(())
            }
            Err(e) => Err(e).context("logind refused to reboot"),
        }
    }
}

pub(crate) mod orchestrate;

#[cfg(test)]
mod tests;

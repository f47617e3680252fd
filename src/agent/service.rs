//! The long-running agent: loads settings, runs deploy cycles on a timer, talks to systemd.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use sd_notify::NotifyState;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::agent::apply::Applier;
use crate::agent::config::{self, ApplyMode, FileConfig, Settings};
use crate::agent::deploy::{self, Context, Outcome};
use crate::agent::flakehub;
use crate::agent::metrics;
use crate::agent::programs::Programs;
use crate::agent::state::State;
use crate::agent::userdata;
use crate::boot::metadata::client::{Client as MetadataClient, Settings as MetadataSettings};
use crate::fleet;
use crate::plumbing::files;

/// How long to wait for the metadata service when reading user-data.
const USERDATA_DEADLINE: Duration = Duration::from_secs(30);

pub const PID_FILE: &str = "agent.pid";

/// How soon to look again when someone else was switching the system.
const BUSY_RECHECK: Duration = Duration::from_secs(10);

/// How soon to ask again for a fleet slot (with jitter).
const FLEET_RECHECK: Duration = Duration::from_secs(30);

/// Settings, and what the user-data said besides.
pub struct Loaded {
    pub settings: Settings,
    /// Lines worth one log message each (ignored cloud-init keys, user-data problems).
    pub notes: Vec<String>,
    /// Why the user-data gave no reference, for the status line when there is none.
    pub why_no_reference: Option<String>,
    /// The Hetzner instance id (what a fleet knows this server by), when a fleet is configured;
    /// or why it could not be read.
    pub instance_id: Option<Result<String, String>>,
}

/// Reads the configuration file, fetches and parses the user-data, and merges them.
pub async fn load(config_path: &Path) -> Result<Loaded> {
    let file = config::read_file(config_path).map_err(anyhow::Error::msg)?;
    let (user, notes) = fetch_userdata(&file).await;
    let settings = config::resolve(&file, user.settings.as_ref(), |p| {
        std::fs::read_to_string(p)
    })
    .map_err(|problems| anyhow::anyhow!("{}", problems.join("; ")))?;
    let why_no_reference = if settings.flake.is_some() {
        None
    } else if let Some(problem) = notes
        .iter()
        .find(|n| n.starts_with("cannot read the user-data") || n.starts_with("user-data: flake"))
    {
        Some(problem.clone())
    } else if user.settings.is_none() {
        Some("the user-data has no hcloud_nixos section".to_string())
    } else {
        Some("the user-data's hcloud_nixos section has no flake".to_string())
    };
    let instance_id = match &settings.fleet {
        None => None,
        Some(_) => Some(fetch_instance_id(&settings.metadata_url).await),
    };
    Ok(Loaded {
        settings,
        notes,
        why_no_reference,
        instance_id,
    })
}

/// `metadata/instance-id`, plain text.
async fn fetch_instance_id(url: &str) -> Result<String, String> {
    let client = MetadataClient::new(MetadataSettings {
        base_url: url.to_string(),
        ..Default::default()
    })
    .map_err(|e| e.to_string())?;
    let body = client
        .get(
            "metadata/instance-id",
            tokio::time::Instant::now() + USERDATA_DEADLINE,
        )
        .await
        .map_err(|e| format!("cannot read this server's instance id: {e}"))?
        .unwrap_or_default();
    let id = String::from_utf8_lossy(&body).trim().to_string();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("the metadata service gave no instance id ('{id}')"));
    }
    Ok(id)
}

async fn fetch_userdata(file: &FileConfig) -> (userdata::UserData, Vec<String>) {
    let mut notes = Vec::new();
    let url = file
        .metadata
        .url
        .clone()
        .unwrap_or_else(|| crate::boot::metadata::client::DEFAULT_URL.to_string());
    let raw = match MetadataClient::new(MetadataSettings {
        base_url: url,
        ..Default::default()
    }) {
        Ok(client) => client
            .get("userdata", tokio::time::Instant::now() + USERDATA_DEADLINE)
            .await
            .map(Option::unwrap_or_default),
        Err(e) => Err(e),
    };
    let data = match raw {
        Ok(raw) => userdata::parse(&raw),
        Err(e) => {
            notes.push(format!("cannot read the user-data: {e}"));
            userdata::UserData::default()
        }
    };
    for problem in &data.problems {
        notes.push(format!("user-data: {problem}"));
    }
    if !data.other_keys.is_empty() {
        notes.push(format!(
            "user-data keys for cloud-init, ignored by hcloud-nixos: {}",
            data.other_keys.join(", ")
        ));
    }
    for part in &data.other_parts {
        notes.push(format!("user-data: ignored: {part}"));
    }
    (data, notes)
}

/// Builds what a cycle needs from loaded settings.
pub async fn context(loaded: Loaded) -> Result<Context> {
    let Loaded {
        settings,
        why_no_reference,
        instance_id,
        ..
    } = loaded;
    let flakehub = flakehub::Client::new(
        &settings.flakehub_api_url,
        settings.token.as_ref().map(|t| t.secret().clone()),
    )?;
    let programs = Programs::resolve(&settings.paths);
    for line in programs.describe() {
        tracing::info!("program for {line}");
    }
    if let Some(problem) = programs.deploy_problem() {
        tracing::error!("cannot deploy until this is mended: {problem}");
    }
    let applier = Applier::new(settings.apply_mode, programs.step_path())
        .await
        .context(
            "apply.mode = \"transient-unit\" needs systemd; use \"direct\" on machines without it",
        )?;
    let hostname = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let (fleet, fleet_problem) = match (&settings.fleet, instance_id) {
        (Some(f), Some(Ok(id))) => match fleet::Coordinator::new(
            f,
            fleet::Member {
                id,
                host: hostname.clone(),
            },
        ) {
            Ok(c) => (Some(c), None),
            Err(e) => (None, Some(e.to_string())),
        },
        (Some(_), Some(Err(e))) => (None, Some(e)),
        _ => (None, None),
    };
    Ok(Context {
        settings,
        hostname,
        flakehub,
        applier,
        programs,
        login_checked: Default::default(),
        why_no_reference,
        fleet,
        fleet_problem,
    })
}

fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!(error = %e, "cannot notify systemd");
    }
}

struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    usr1: Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
        })
    }
}

/// Ticks at half the watchdog interval; never, when there is no watchdog.
async fn watchdog_tick(interval: Option<Duration>) {
    match interval {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

fn log_notes(notes: &[String]) {
    for note in notes {
        tracing::warn!("{note}");
    }
}

/// `hcloud-nixos agent --once`: one cycle; true when the system is where it should be.
pub async fn once(config_path: &Path) -> Result<bool> {
    let loaded = load(config_path).await?;
    log_notes(&loaded.notes);
    let ctx = context(loaded).await?;
    let mut state = State::load(&ctx.settings.paths.state_dir)?;
    let outcome = deploy::cycle(&ctx, &mut state, &|line| tracing::info!("{line}")).await;
    // A one-off run writes the textfile (it serves no HTTP).
    let textfile_only = metrics::Metrics {
        listen: None,
        textfile: ctx.settings.metrics.textfile.clone(),
    };
    if let Ok(mut publisher) = metrics::Publisher::start(&textfile_only, &state).await {
        publisher.publish(&state);
    }
    println!("{}", state.status);
    Ok(outcome.ok())
}

/// `hcloud-nixos agent`: the service. Returns when asked to stop.
pub async fn serve(config_path: PathBuf) -> Result<()> {
    let mut signals = Signals::new()?;
    let loaded = load(&config_path).await?;
    log_notes(&loaded.notes);
    let mut ctx = context(loaded).await?;
    let mut state = State::load(&ctx.settings.paths.state_dir)?;
    let pid_file = write_pid_file(&ctx.settings.paths.run_dir)?;
    let mut publisher = metrics::Publisher::start(&ctx.settings.metrics, &state)
        .await
        .context("cannot start the metrics server (metrics.listen)")?;
    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let ready_sent = AtomicBool::new(false);
    let mut failures: u32 = 0;
    let mut stop = false;
    let mut reload = false;
    // A check asked for while a cycle runs: the next cycle starts right after it, since the
    // release it asked about may have been published after the running cycle resolved.
    let mut check_again = false;
    while !stop {
        // READY=1 goes out at the latest when the first cycle starts a step: an activation may
        // restart this very unit, and systemd runs that restart only once the start is done.
        let report = |line: &str| {
            if !ready_sent.swap(true, Ordering::Relaxed) {
                notify(&[NotifyState::Ready]);
            }
            notify(&[NotifyState::Status(line)]);
        };
        let outcome = {
            let cycle = deploy::cycle(&ctx, &mut state, &report);
            tokio::pin!(cycle);
            loop {
                tokio::select! {
                    outcome = &mut cycle => break Some(outcome),
                    _ = watchdog_tick(watchdog) => notify(&[NotifyState::Watchdog]),
                    _ = signals.usr1.recv() => {
                        tracing::info!("check requested; another check follows the running one");
                        check_again = true;
                    }
                    _ = signals.hup.recv() => reload = true,
                    _ = stop_signal(&mut signals.term, &mut signals.int) => {
                        stop = true;
                        if ctx.applier.mode == ApplyMode::Direct {
                            // fh is our child here: let it finish rather than kill it mid-switch.
                            tracing::info!("stopping once the running apply has finished");
                            notify(&[NotifyState::Status("stopping after the running apply")]);
                        } else {
                            break None;
                        }
                    }
                }
            }
        };
        let Some(outcome) = outcome else {
            tracing::info!(
                "stopping; an apply in its own unit goes on and is picked up at the next start"
            );
            break;
        };
        log_outcome(&outcome, &state);
        publisher.publish(&state);
        notify(&[NotifyState::Status(&state.status)]);
        if !ready_sent.swap(true, Ordering::Relaxed) {
            notify(&[NotifyState::Ready]);
        }
        failures = if outcome.failed() {
            failures.saturating_add(1)
        } else {
            0
        };
        if stop {
            break;
        }
        if std::mem::take(&mut check_again) {
            tracing::debug!("checking again at once, as asked during the last check");
        } else if !reload {
            let mut delay = deploy::next_delay(
                ctx.settings.poll_interval,
                ctx.settings.max_backoff,
                failures,
                fastrand::f64(),
            );
            // A release that is too young yet is applied when it is old enough, not a poll later.
            if let Outcome::Waiting {
                until: Some(until), ..
            } = &outcome
                && let Ok(at) = until.parse::<jiff::Timestamp>()
            {
                let wait = Duration::try_from(at.duration_since(jiff::Timestamp::now()))
                    .unwrap_or(Duration::ZERO);
                delay = delay.min(wait + Duration::from_secs(1));
            }
            if outcome.fleet_waiting() {
                delay = delay.min(fleet::jittered(
                    ctx.settings.poll_interval.min(FLEET_RECHECK),
                ));
            }
            if matches!(outcome, Outcome::Busy(_)) {
                // Someone else is switching: look again soon, not a whole poll interval later.
                delay = delay.min(BUSY_RECHECK);
            }
            // A reboot planned inside the window is not missed by a long poll interval.
            if let Some(until) = state
                .reboot_planned
                .as_deref()
                .and_then(|p| p.parse::<jiff::Timestamp>().ok())
                .map(|at| at.duration_since(jiff::Timestamp::now()))
                // A moment already past: look at once.
                .map(|d| Duration::try_from(d).unwrap_or(Duration::ZERO))
            {
                delay = delay.min(until.max(Duration::from_secs(1)));
            }
            tracing::debug!(seconds = delay.as_secs_f64(), "next check");
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    _ = watchdog_tick(watchdog) => notify(&[NotifyState::Watchdog]),
                    _ = signals.usr1.recv() => { tracing::info!("check requested"); break }
                    _ = signals.hup.recv() => { reload = true; break }
                    _ = stop_signal(&mut signals.term, &mut signals.int) => { stop = true; break }
                }
            }
        }
        if reload && !stop {
            reload = false;
            notify(&[NotifyState::Reloading, NotifyState::monotonic_usec_now()?]);
            match load(&config_path).await {
                Ok(loaded) => {
                    log_notes(&loaded.notes);
                    match context(loaded).await {
                        Ok(new) => {
                            if new.settings.metrics != ctx.settings.metrics {
                                tracing::warn!(
                                    "a changed [metrics] takes effect when the agent restarts"
                                );
                            }
                            ctx = new;
                            tracing::info!("configuration and user-data reloaded");
                        }
                        Err(e) => tracing::error!("reload failed, keeping the old settings: {e:#}"),
                    }
                }
                Err(e) => tracing::error!("reload failed, keeping the old settings: {e:#}"),
            }
            notify(&[NotifyState::Ready]);
        }
    }
    notify(&[NotifyState::Stopping]);
    let _ = std::fs::remove_file(pid_file);
    Ok(())
}

async fn stop_signal(term: &mut Signal, int: &mut Signal) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn log_outcome(outcome: &Outcome, state: &State) {
    match outcome {
        Outcome::Failed { .. } | Outcome::RolledBack { .. } | Outcome::Quarantined { .. } => {
            tracing::warn!("{}", state.status)
        }
        _ => tracing::info!("{}", state.status),
    }
}

fn write_pid_file(run_dir: &Path) -> Result<PathBuf> {
    files::create_dir_all_mode(run_dir, 0o700)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let path = run_dir.join(PID_FILE);
    files::write_atomic(&path, format!("{}\n", std::process::id()).as_bytes(), 0o644)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// The state and runtime directories the configuration file names (or their defaults), for the
/// commands that talk to a running agent without loading user-data.
fn dirs(config_path: &Path) -> Result<(PathBuf, PathBuf)> {
    let file = config::read_file(config_path).map_err(anyhow::Error::msg)?;
    let defaults = config::Paths::default();
    Ok((
        file.paths.state_dir.unwrap_or(defaults.state_dir),
        file.paths.run_dir.unwrap_or(defaults.run_dir),
    ))
}

/// `hcloud-nixos check`: asks the running agent to check now (SIGUSR1).
pub fn request_check(config_path: &Path) -> Result<u32> {
    let (_, run_dir) = dirs(config_path)?;
    let pid_path = run_dir.join(PID_FILE);
    let text = std::fs::read_to_string(&pid_path).with_context(|| {
        format!(
            "no running agent: cannot read {} (is hcloud-nixos-agent.service running?)",
            pid_path.display()
        )
    })?;
    let pid: i32 = text
        .trim()
        .parse()
        .with_context(|| format!("{} does not hold a PID", pid_path.display()))?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if !comm.trim().starts_with("hcloud-nixos") {
        bail!(
            "no running agent: PID {pid} from {} is not hcloud-nixos",
            pid_path.display()
        );
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .with_context(|| format!("cannot signal the agent (PID {pid})"))?;
    Ok(pid as u32)
}

/// `hcloud-nixos retry`: lifts every quarantine and forgets past failures, so that the agent
/// tries the current release again; then asks a running agent to check now. Returns the
/// versions that were quarantined.
pub fn retry(config_path: &Path) -> Result<Vec<String>> {
    let (state_dir, run_dir) = dirs(config_path)?;
    // The agent reads and writes the state under this lock: wait for a running cycle to end.
    let lock = deploy::take_lock(&run_dir, true)?;
    let mut state = State::load(&state_dir)?;
    let lifted: Vec<String> = state
        .quarantined
        .iter()
        .map(|q| q.version.clone())
        .collect();
    state.quarantined.clear();
    state.failures = None;
    state.save(&state_dir)?;
    drop(lock);
    if let Err(e) = request_check(config_path) {
        tracing::debug!("no agent to ask for a check: {e:#}");
    }
    Ok(lifted)
}

/// `hcloud-nixos fleet ...`: the operator's view of this server's fleet group.
pub async fn fleet_command(config_path: &Path, command: &fleet::FleetCommand) -> Result<String> {
    let loaded = load(config_path).await?;
    let Some(f) = &loaded.settings.fleet else {
        bail!(
            "this server is in no fleet: neither {} nor the user-data has a [fleet] section",
            config_path.display()
        );
    };
    let id = match loaded.instance_id {
        Some(Ok(id)) => id,
        Some(Err(e)) => bail!("{e}"),
        None => bail!("this server's instance id is unknown"),
    };
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let coordinator = fleet::Coordinator::new(f, fleet::Member { id, host })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    fleet::run_command(&coordinator, command)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// `hcloud-nixos status`: the state for a person, or as JSON.
pub fn status(config_path: &Path, json: bool) -> Result<String> {
    let (state_dir, _) = dirs(config_path)?;
    let state = State::load(&state_dir)?;
    if json {
        return Ok(serde_json::to_string_pretty(&state)? + "\n");
    }
    Ok(describe_state(&state))
}

/// The state, readable.
pub fn describe_state(state: &State) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let status = if state.status.is_empty() {
        "no check yet"
    } else {
        &state.status
    };
    let _ = writeln!(out, "status:       {status}");
    if let Some(t) = &state.running {
        let _ = writeln!(out, "running:      {} ({})", t.version, t.store_path);
    }
    if let Some(t) = &state.desired {
        let _ = writeln!(out, "desired:      {} ({})", t.version, t.store_path);
    }
    if let Some(c) = &state.last_check {
        let _ = writeln!(
            out,
            "last check:   {} ({})",
            c.at,
            if c.ok { "ok" } else { "failed" }
        );
    }
    if let Some(d) = &state.last_deploy {
        let outcome = match d.outcome {
            crate::agent::state::Outcome::Success => "succeeded".to_string(),
            crate::agent::state::Outcome::Failed => {
                format!("failed: {}", d.error.as_deref().unwrap_or(""))
            }
        };
        let _ = writeln!(
            out,
            "last deploy:  {} {} at {}, {outcome}",
            d.operation, d.version, d.finished_at
        );
    }
    if let Some(f) = &state.in_flight {
        let _ = writeln!(
            out,
            "applying:     {} since {}{}",
            f.version,
            f.started_at,
            f.unit
                .as_deref()
                .map(|u| format!(" in {u}"))
                .unwrap_or_default()
        );
    }
    for q in &state.quarantined {
        let _ = writeln!(
            out,
            "quarantined:  {} since {}: {}",
            q.version, q.at, q.reason
        );
    }
    if let Some(p) = &state.pending_boot {
        let _ = writeln!(
            out,
            "next boot:    {} (applied with operation = boot at {})",
            p.version, p.at
        );
    }
    if state.reboot_required {
        let _ = writeln!(
            out,
            "reboot:       required (a new kernel, initrd or kernel modules)"
        );
    }
    if let Some(f) = &state.failures {
        let _ = writeln!(
            out,
            "failures:     {} failed {} time(s): {}",
            f.version, f.count, f.last_error
        );
    }
    let _ = writeln!(out, "deploys:      {}", state.deploys);
    out
}

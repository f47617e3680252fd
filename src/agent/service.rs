//! The long-running agent: runs deploy cycles on a timer, answers signals, talks to systemd
//! (`Type=notify`, the watchdog, one status line).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use sd_notify::NotifyState;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::agent::commands::PID_FILE;
use crate::agent::config::ApplyMode;
use crate::agent::lifecycle::{self, Context, Outcome, State, WaitPolicy};
use crate::agent::metrics;
use crate::agent::setup::{context, load, log_notes};
use crate::plumbing::files;

fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::debug!(error = %e, "cannot notify systemd");
    }
}

/// `STATUS=` with `line` on one line: the protocol is one assignment per line, and a newline in
/// the status would add one (`WATCHDOG=trigger`, `MAINPID=`).
fn notify_status(line: &str) {
    notify(&[NotifyState::Status(&status_value(line))]);
}

fn status_value(line: &str) -> String {
    crate::plumbing::text::one_line(line, lifecycle::cycle::STATUS_MAX)
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

/// `hcloud-nixos agent --once`: one cycle; true when the system is where it should be.
pub async fn once(config_path: &Path) -> Result<bool> {
    let loaded = load(config_path).await?;
    log_notes(&loaded.notes);
    let ctx = context(loaded).await?;
    let mut state = State::load(&ctx.settings.paths.state_dir)?;
    let outcome = lifecycle::run_cycle(&ctx, &mut state, &|line| tracing::info!("{line}")).await;
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

/// What the service loop keeps between cycles.
struct Service {
    config_path: PathBuf,
    signals: Signals,
    ctx: Context,
    state: State,
    publisher: metrics::Publisher,
    watchdog: Option<Duration>,
    ready_sent: AtomicBool,
}

/// What ended a wait between cycles.
enum Wake {
    /// Time for the next cycle (the timer, or `check`).
    Check,
    Reload,
    Stop,
}

/// `hcloud-nixos agent`: the service. Returns when asked to stop.
pub async fn serve(config_path: PathBuf) -> Result<()> {
    let signals = Signals::new()?;
    let loaded = load(&config_path).await?;
    log_notes(&loaded.notes);
    let ctx = context(loaded).await?;
    let state = State::load(&ctx.settings.paths.state_dir)?;
    let pid_file = write_pid_file(&ctx.settings.paths.run_dir)?;
    let publisher = metrics::Publisher::start(&ctx.settings.metrics, &state)
        .await
        .context("cannot start the metrics server (metrics.listen)")?;
    let mut service = Service {
        config_path,
        signals,
        ctx,
        state,
        publisher,
        watchdog: sd_notify::watchdog_enabled().map(|d| d / 2),
        ready_sent: AtomicBool::new(false),
    };
    service.run().await;
    notify(&[NotifyState::Stopping]);
    let _ = std::fs::remove_file(pid_file);
    Ok(())
}

impl Service {
    /// Cycles until asked to stop.
    async fn run(&mut self) {
        loop {
            let (outcome, mut wake) = self.one_cycle().await;
            let Some(outcome) = outcome else {
                tracing::info!(
                    "stopping; an apply in its own unit goes on and is picked up at the next start"
                );
                return;
            };
            log_outcome(&outcome, &self.state);
            self.publisher.publish(&self.state);
            notify_status(&self.state.status);
            self.ready();
            if wake.is_none() {
                let policy = WaitPolicy {
                    poll_interval: self.ctx.settings.poll_interval,
                    max_backoff: self.ctx.settings.max_backoff,
                };
                let delay = self.state.next_wait(
                    &outcome,
                    policy,
                    lifecycle::state::now(),
                    fastrand::f64(),
                );
                tracing::debug!(seconds = delay.as_secs_f64(), "next check");
                wake = Some(self.wait(delay).await);
            }
            match wake {
                Some(Wake::Stop) => return,
                Some(Wake::Reload) => self.reload().await,
                Some(Wake::Check) | None => {}
            }
        }
    }

    /// READY=1 once, at the latest when the first cycle starts a step: an activation may restart
    /// this very unit, and systemd runs that restart only once the start is done.
    fn ready(&self) {
        if !self.ready_sent.swap(true, Ordering::Relaxed) {
            notify(&[NotifyState::Ready]);
        }
    }

    /// One cycle, answering signals meanwhile. `None` when asked to stop in the middle (the
    /// apply in its own unit goes on); and what to do right after the cycle, if a signal said.
    async fn one_cycle(&mut self) -> (Option<Outcome>, Option<Wake>) {
        let mut after: Option<Wake> = None;
        let ready_sent = &self.ready_sent;
        let report = |line: &str| {
            if !ready_sent.swap(true, Ordering::Relaxed) {
                notify(&[NotifyState::Ready]);
            }
            notify_status(line);
        };
        let cycle = lifecycle::run_cycle(&self.ctx, &mut self.state, &report);
        tokio::pin!(cycle);
        let signals = &mut self.signals;
        let direct = self.ctx.applier.mode == ApplyMode::Direct;
        loop {
            tokio::select! {
                outcome = &mut cycle => return (Some(outcome), after),
                _ = watchdog_tick(self.watchdog) => notify(&[NotifyState::Watchdog]),
                _ = signals.usr1.recv() => {
                    // The release asked about may have been published after this cycle
                    // resolved: another check follows at once.
                    tracing::info!("check requested; another check follows the running one");
                    after.get_or_insert(Wake::Check);
                }
                _ = signals.hup.recv() => { after = Some(Wake::Reload); }
                _ = stop_signal(&mut signals.term, &mut signals.int) => {
                    if !direct {
                        return (None, Some(Wake::Stop));
                    }
                    // fh is our child here: let it finish rather than kill it mid-switch.
                    tracing::info!("stopping once the running apply has finished");
                    notify_status("stopping after the running apply");
                    after = Some(Wake::Stop);
                }
            }
        }
    }

    /// Waits `delay` for the next check, answering the watchdog and signals.
    async fn wait(&mut self, delay: Duration) -> Wake {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        let signals = &mut self.signals;
        loop {
            tokio::select! {
                _ = &mut sleep => return Wake::Check,
                _ = watchdog_tick(self.watchdog) => notify(&[NotifyState::Watchdog]),
                _ = signals.usr1.recv() => { tracing::info!("check requested"); return Wake::Check }
                _ = self.ctx.fleet_news() => { tracing::debug!("news from the fleet group; checking now"); return Wake::Check }
                _ = signals.hup.recv() => return Wake::Reload,
                _ = stop_signal(&mut signals.term, &mut signals.int) => return Wake::Stop,
            }
        }
    }

    /// SIGHUP: the configuration and user-data again; the old settings stay when they fail.
    async fn reload(&mut self) {
        match monotonic_now() {
            Some(now) => notify(&[NotifyState::Reloading, now]),
            None => notify(&[NotifyState::Reloading]),
        }
        let loaded = match load(&self.config_path).await {
            Ok(loaded) => loaded,
            Err(e) => {
                tracing::error!("reload failed, keeping the old settings: {e:#}");
                notify(&[NotifyState::Ready]);
                return;
            }
        };
        log_notes(&loaded.notes);
        match context(loaded).await {
            Ok(new) => {
                if new.settings.metrics != self.ctx.settings.metrics {
                    tracing::warn!("a changed [metrics] takes effect when the agent restarts");
                }
                self.ctx = new;
                tracing::info!("configuration and user-data reloaded");
            }
            Err(e) => tracing::error!("reload failed, keeping the old settings: {e:#}"),
        }
        notify(&[NotifyState::Ready]);
    }
}

/// `MONOTONIC_USEC=` for a reload, when the clock can be read.
fn monotonic_now() -> Option<NotifyState<'static>> {
    NotifyState::monotonic_usec_now().ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_is_one_assignment() {
        let line = status_value("deploy of 0.1.2 failed: x\nWATCHDOG=trigger\r\nMAINPID=1");
        let message = format!("{}\n", NotifyState::Status(&line));
        assert_eq!(message.lines().count(), 1, "{message:?}");
        assert!(message.starts_with("STATUS=deploy of 0.1.2 failed: x\\nWATCHDOG=trigger"));
    }
}

//! Everything the deploy lifecycle does to the world, behind one trait: the system's links, the
//! state file, FlakeHub, the steps (transient units or children), the system profile, health,
//! the fleet, logind and hooks. [`Context`] is the real one; the unit tests have a fake.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use jiff::Timestamp;

use super::state::{State, StepHandle};
use crate::agent::apply::{self, Applier, Finished, Found, Step, StepKind};
use crate::agent::config::{Operation, Settings};
use crate::agent::flakehub::{self, Resolved};
use crate::agent::flakeref::FlakeRef;
use crate::agent::programs::Programs;
use crate::agent::{health, hooks, login, reboot};
use crate::fleet::{self, Acquired, Ending, Purpose, SlotGuard};
use crate::plumbing::procfs;

/// A link the lifecycle reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Link {
    /// What runs (`/run/current-system`).
    Current,
    /// What was booted (`/run/booted-system`).
    Booted,
    /// What boots next (the system profile).
    Profile,
}

/// What became of a step an earlier agent process started.
#[derive(Debug, Clone)]
pub(crate) enum Earlier<R> {
    /// Still running: wait for it.
    Running(R),
    Finished(Finished),
    /// Nothing to find (no unit, no process): only the system's state can tell.
    Unknown,
}

/// The fleet's answer to "may I".
#[derive(Debug, Clone)]
pub(crate) enum Turn<S> {
    /// Go ahead; hand the slot back once done.
    Granted(S),
    /// Not now; the status line says why.
    Waiting(String),
    /// The release failed elsewhere in the group; the status line says so.
    Paused(String),
}

/// Why a health round failed: something that may still come right (a service starting, the
/// network settling), or something that will not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unhealthy {
    Passing(String),
    Final(String),
}

/// The lifecycle's I/O. Methods are small and say nothing about policy: the decisions are in
/// [`super::machine`] and the order of things in [`super::cycle`] and [`super::drive`].
pub(crate) trait Host {
    /// A step under way.
    type Running;
    /// A fleet slot held.
    type Slot;

    /// The validated settings.
    fn settings(&self) -> &Settings;
    /// Now.
    fn now(&self) -> Timestamp;
    /// This boot's identity.
    fn boot_id(&self) -> String;
    /// Where a link points, fully resolved.
    fn link(&self, link: Link) -> Option<String>;
    /// Writes the state down; a deploy must not go on when its next step cannot be.
    fn persist(&self, state: &State) -> Result<(), String>;
    /// Notes a check that changed nothing else (cheaper than [`Host::persist`]).
    fn note_check(&self, state: &State) -> Result<(), String>;
    /// Someone else is switching the system by hand right now, and who.
    fn someone_switching(&self) -> Option<String>;
    /// What stops any deploy before it starts (a missing program, a fleet that cannot be asked).
    fn deploy_blocked(&self) -> Option<String>;
    /// Does the release at `system` still bring the agent back?
    fn check_release(&self, system: &str, version: &str) -> Result<(), String>;
    /// fh, to fetch with.
    fn fh(&self) -> Result<&Path, String>;
    /// This server's hostname, for references without `#attr`.
    fn hostname(&self) -> &str;
    /// Why there is no reference to follow, for the status.
    fn why_idle(&self) -> Option<&str>;
    /// The running kernel, initrd or kernel modules are not the booted ones.
    fn kernel_changed(&self) -> bool;
    /// The kernel version of `system`, for the wall message.
    fn kernel_version(&self, system: &str) -> Option<String>;

    /// Logs in to FlakeHub when needed (once per context, and after a failed deploy).
    fn login(&self, state: &mut State) -> impl Future<Output = Result<(), String>>;
    /// The next cycle logs in again.
    fn forget_login(&self);
    /// The release matching the reference and the store path of its output.
    fn resolve(
        &self,
        flake: &FlakeRef,
        attr: &str,
    ) -> impl Future<Output = Result<Resolved, flakehub::Error>>;
    /// Units failed right now (empty where there is no systemd).
    fn failed_units(&self) -> impl Future<Output = Vec<String>>;
    /// One round of health checks.
    fn health_round(&self, failed_before: &[String])
    -> impl Future<Output = Result<(), Unhealthy>>;
    /// Waits between health rounds.
    fn pause(&self, how_long: Duration) -> impl Future<Output = ()>;

    /// Starts a step in a unit (or a child) named `unit`.
    fn start_step(
        &self,
        step: &Step,
        unit: &str,
    ) -> impl Future<Output = Result<Self::Running, String>>;
    /// What to write down about a started step.
    fn step_handle(&self, running: &Self::Running, unit: &str) -> StepHandle;
    /// What became of a step written down by an earlier agent process.
    fn find_step(
        &self,
        handle: &StepHandle,
        step: &Step,
    ) -> impl Future<Output = Result<Earlier<Self::Running>, String>>;
    /// Waits for a step to end; after `timeout` it is stopped and counts as failed.
    fn wait_step(
        &self,
        running: Self::Running,
        timeout: Duration,
    ) -> impl Future<Output = Result<Finished, String>>;
    /// Unloads a finished step's unit.
    fn forget_step(&self, handle: &StepHandle) -> impl Future<Output = ()>;
    /// Points the system profile at `system` (a new generation).
    fn set_profile(&self, system: &str) -> impl Future<Output = Result<(), String>>;

    /// Is this server in a fleet (configured, whether or not it can be asked)?
    fn in_fleet(&self) -> bool;
    /// Why the configured fleet cannot be asked at all (its instance id unknown, its TLS files
    /// unreadable): then nothing is deployed and nothing rebooted.
    fn fleet_problem(&self) -> Option<String>;
    /// Asks the fleet for a turn.
    fn fleet_acquire(
        &self,
        purpose: Purpose,
    ) -> impl Future<Output = Result<Turn<Self::Slot>, fleet::Error>>;
    /// Hands a slot back, saying how the work ended.
    fn fleet_release(
        &self,
        slot: Self::Slot,
        ending: Ending,
    ) -> impl Future<Output = Result<(), fleet::Error>>;
    /// Hands back a slot this server holds from before (found by its id).
    fn fleet_release_own(&self, ending: Ending) -> impl Future<Output = Result<(), fleet::Error>>;

    /// Reboots through logind, after the wall message and the grace period.
    fn reboot(&self, message: &str) -> impl Future<Output = Result<reboot::Outcome, String>>;
    /// Runs the hooks for an event.
    fn run_hooks(&self, event: &hooks::Event) -> impl Future<Output = ()>;

    /// The store path the system is at: the running system for switch and test, the profile
    /// (what boots next) for boot.
    fn system_at(&self, operation: Operation) -> Option<String> {
        match operation {
            Operation::Switch | Operation::Test => self.link(Link::Current),
            Operation::Boot => self.link(Link::Profile),
        }
    }
}

/// Everything a cycle needs besides the state: the real [`Host`].
pub(crate) struct Context {
    pub(crate) settings: Settings,
    /// This server's hostname, for references without `#attr`.
    pub(crate) hostname: String,
    pub(crate) flakehub: flakehub::Client,
    pub(crate) applier: Applier,
    /// fh, nix-env, nix and the login method, resolved at start.
    pub(crate) programs: Programs,
    /// Whether this context has checked the login yet. A new context (at start, after SIGHUP)
    /// checks it once, and so does the cycle after a failed deploy; a poll does not.
    pub(crate) login_checked: AtomicBool,
    /// Why there is no reference to follow (from loading the user-data), for the status.
    pub(crate) why_no_reference: Option<String>,
    /// The fleet this server takes turns with, when `[fleet]` is configured.
    pub(crate) fleet: Option<fleet::Coordinator>,
    /// Why a configured fleet cannot be used (its instance id unknown, its TLS files unreadable):
    /// then nothing is deployed and nothing rebooted.
    pub(crate) fleet_problem: Option<String>,
}

impl Context {
    /// Resolves when the fleet has news for this server (etcd: the group's desired release
    /// changed, a slot was given back while this server waits for one); never without a fleet.
    /// The service loop checks at once when it does.
    pub(crate) async fn fleet_news(&self) {
        match &self.fleet {
            Some(coordinator) => coordinator.news().await,
            None => std::future::pending().await,
        }
    }
}

/// Where a link points, fully resolved.
pub(crate) fn resolve_link(link: &Path) -> Option<String> {
    std::fs::canonicalize(link)
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Is someone running `switch-to-configuration` by hand right now (root holds this lock)? Anyone
/// who can read the lock file can hold a lock on it: a lock held only by other users' processes
/// does not count.
fn switch_in_progress(lock: &Path) -> bool {
    use nix::fcntl::{Flock, FlockArg};
    use std::os::unix::fs::OpenOptionsExt;
    // Not blocked by a FIFO, not led elsewhere by a symlink.
    let Ok(file) = std::fs::File::options()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW)
        .open(lock)
    else {
        return false;
    };
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            procfs::lock_holders(lock) != procfs::Holders::Others
        }
        _ => false,
    }
}

/// The PID of an `fh apply nixos` root is running, if any (an operator by hand). Anyone can
/// start a process whose command line reads so: other users' processes do not count.
fn fh_apply_running() -> Option<u32> {
    procfs::pids()
        .into_iter()
        .find(|pid| is_fh_apply(&procfs::cmdline(*pid)) && procfs::runs_as_root(*pid))
}

/// Is this NUL-separated command line `fh apply nixos ...` (maybe behind an interpreter)?
pub(crate) fn is_fh_apply(cmdline: &[u8]) -> bool {
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.windows(3).any(|w| {
        let name = w[0].rsplit(|b| *b == b'/').next().unwrap_or_default();
        name == b"fh" && w[1] == b"apply" && w[2] == b"nixos"
    })
}

impl Host for Context {
    type Running = apply::Running;
    type Slot = SlotGuard;

    fn settings(&self) -> &Settings {
        &self.settings
    }

    fn now(&self) -> Timestamp {
        super::state::now()
    }

    fn boot_id(&self) -> String {
        std::fs::read_to_string(&self.settings.paths.boot_id)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    fn link(&self, link: Link) -> Option<String> {
        let paths = &self.settings.paths;
        resolve_link(match link {
            Link::Current => &paths.current_system,
            Link::Booted => &paths.booted_system,
            Link::Profile => &paths.system_profile,
        })
    }

    fn persist(&self, state: &State) -> Result<(), String> {
        if let Some(fleet) = &self.fleet {
            // This server's record in its fleet group (etcd; written when it changed).
            fleet.report(fleet::member_record(state));
        }
        state
            .save(&self.settings.paths.state_dir)
            .map_err(|e| format!("cannot record the deploy's progress: {e:#}"))
    }

    fn note_check(&self, state: &State) -> Result<(), String> {
        state
            .note_check(&self.settings.paths.run_dir)
            .map_err(|e| format!("cannot note the last check: {e:#}"))
    }

    fn someone_switching(&self) -> Option<String> {
        if switch_in_progress(&self.settings.paths.switch_lock) {
            return Some("someone is running switch-to-configuration".into());
        }
        fh_apply_running().map(|pid| format!("someone is running fh apply (PID {pid})"))
    }

    fn deploy_blocked(&self) -> Option<String> {
        self.programs
            .deploy_problem()
            .map(|p| format!("cannot deploy: {p}"))
    }

    fn check_release(&self, system: &str, version: &str) -> Result<(), String> {
        crate::agent::release::check(Path::new(system), version)
    }

    fn fh(&self) -> Result<&Path, String> {
        self.programs.fh.path()
    }

    fn hostname(&self) -> &str {
        &self.hostname
    }

    fn why_idle(&self) -> Option<&str> {
        self.why_no_reference.as_deref()
    }

    fn kernel_changed(&self) -> bool {
        reboot::reboot_required(
            &self.settings.paths.booted_system,
            &self.settings.paths.current_system,
        )
    }

    fn kernel_version(&self, system: &str) -> Option<String> {
        reboot::kernel_version(Path::new(system))
    }

    async fn login(&self, state: &mut State) -> Result<(), String> {
        let Some(token) = &self.settings.token else {
            return Ok(());
        };
        if self.login_checked.load(Ordering::Relaxed) {
            return Ok(());
        }
        let run_dir = &self.settings.paths.run_dir;
        match login::ensure(&self.programs.login, token.secret(), run_dir, state).await {
            Ok(true) => tracing::info!(token_from = %token.origin(), "logged in to FlakeHub"),
            Ok(false) => tracing::debug!("already logged in to FlakeHub"),
            Err(e) => return Err(format!("FlakeHub login: {e:#}")),
        }
        self.login_checked.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn forget_login(&self) {
        self.login_checked.store(false, Ordering::Relaxed);
    }

    async fn resolve(&self, flake: &FlakeRef, attr: &str) -> Result<Resolved, flakehub::Error> {
        match &self.fleet {
            // With etcd: the group's desired release, checked against FlakeHub (its poller asks
            // FlakeHub for the group); else, and while etcd is away, FlakeHub directly.
            Some(coordinator) => fleet::resolve(coordinator, &self.flakehub, flake, attr).await,
            None => self.flakehub.resolve(flake, attr).await,
        }
    }

    async fn failed_units(&self) -> Vec<String> {
        match self.applier.systemd() {
            Some(systemd) => systemd.failed_units().await.unwrap_or_default(),
            None => Vec::new(),
        }
    }

    async fn health_round(&self, failed_before: &[String]) -> Result<(), Unhealthy> {
        if let Some(systemd) = self.applier.systemd() {
            let now_failed = systemd
                .failed_units()
                .await
                .map_err(|e| Unhealthy::Passing(format!("cannot list failed units: {e:#}")))?;
            let new = health::new_failures(failed_before, &now_failed);
            if !new.is_empty() {
                // A failed unit stays failed (one that restarts itself is "activating", not
                // "failed"): no point in waiting for it.
                return Err(Unhealthy::Final(format!(
                    "units failed: {}",
                    new.join(", ")
                )));
            }
        }
        if let Some(flake) = &self.settings.flake {
            // Any answer proves the network works; only not getting one counts against it.
            if let Err(e @ flakehub::Error::Unreachable { .. }) = self.flakehub.release(flake).await
            {
                return Err(Unhealthy::Passing(format!(
                    "FlakeHub is not reachable: {e}"
                )));
            }
        }
        let http = crate::plumbing::tls::client_builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Unhealthy::Final(format!("cannot set up HTTP health checks: {e}")))?;
        for check in &self.settings.health_checks {
            check.run(&http).await.map_err(Unhealthy::Passing)?;
        }
        Ok(())
    }

    async fn pause(&self, how_long: Duration) {
        tokio::time::sleep(how_long).await;
    }

    async fn start_step(&self, step: &Step, unit: &str) -> Result<Self::Running, String> {
        self.applier
            .start(step, unit)
            .await
            .map_err(|e| format!("cannot start the {} step: {e:#}", step.kind.as_str()))
    }

    fn step_handle(&self, running: &Self::Running, unit: &str) -> StepHandle {
        match running {
            apply::Running::Child(child) => child
                .id()
                .map_or_else(|| StepHandle::Unit(unit.into()), StepHandle::Pid),
            apply::Running::Orphan(pid) => StepHandle::Pid(*pid),
            apply::Running::Unit(name) => StepHandle::Unit(name.clone()),
        }
    }

    async fn find_step(
        &self,
        handle: &StepHandle,
        step: &Step,
    ) -> Result<Earlier<Self::Running>, String> {
        let (unit, pid) = match handle {
            StepHandle::Unit(u) => (Some(u.as_str()), None),
            StepHandle::Pid(p) => (None, Some(*p)),
        };
        let found = self
            .applier
            .find_earlier(unit, pid, &step.argv)
            .await
            .map_err(|e| {
                format!(
                    "cannot find out what became of the {} step: {e:#}",
                    step.kind.as_str()
                )
            })?;
        Ok(match found {
            Found::Running => {
                Earlier::Running(apply::Running::Unit(unit.unwrap_or_default().into()))
            }
            Found::RunningOrphan(pid) => Earlier::Running(apply::Running::Orphan(pid)),
            Found::Finished(done) => Earlier::Finished(done),
            Found::Unknown => Earlier::Unknown,
        })
    }

    async fn wait_step(
        &self,
        running: Self::Running,
        timeout: Duration,
    ) -> Result<Finished, String> {
        self.applier
            .wait(running, timeout)
            .await
            .map_err(|e| format!("{e:#}"))
    }

    async fn forget_step(&self, handle: &StepHandle) {
        if let StepHandle::Unit(unit) = handle {
            self.applier.forget(unit).await;
        }
    }

    async fn set_profile(&self, system: &str) -> Result<(), String> {
        let program = self.programs.nix_env.path()?;
        let profile = self.settings.paths.system_profile.to_string_lossy();
        let out = crate::plumbing::exec::run(
            program,
            &["-p", &profile, "--set", system],
            Duration::from_secs(120),
        )
        .await
        .map_err(|e| format!("{e:#}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "nix-env --set failed ({}): {}",
                out.status,
                out.last_line()
            ))
        }
    }

    fn in_fleet(&self) -> bool {
        self.fleet.is_some() || self.fleet_problem.is_some()
    }

    fn fleet_problem(&self) -> Option<String> {
        self.fleet_problem.clone()
    }

    async fn fleet_acquire(&self, purpose: Purpose) -> Result<Turn<SlotGuard>, fleet::Error> {
        let Some(coordinator) = &self.fleet else {
            return Err(fleet::Error::new(
                fleet::ErrorKind::Config,
                self.fleet_problem.clone().unwrap_or_default(),
            ));
        };
        Ok(match coordinator.acquire(purpose).await? {
            Acquired::Granted(guard) => Turn::Granted(guard),
            paused @ Acquired::Paused(_) => Turn::Paused(paused.status_line()),
            waiting => Turn::Waiting(waiting.status_line()),
        })
    }

    async fn fleet_release(&self, slot: SlotGuard, ending: Ending) -> Result<(), fleet::Error> {
        match &self.fleet {
            Some(coordinator) => coordinator.release(slot, ending).await,
            None => Ok(()),
        }
    }

    async fn fleet_release_own(&self, ending: Ending) -> Result<(), fleet::Error> {
        match &self.fleet {
            Some(coordinator) => coordinator.release_own(ending).await,
            None => Ok(()),
        }
    }

    async fn reboot(&self, message: &str) -> Result<reboot::Outcome, String> {
        let settings = &self.settings;
        let host = reboot::Logind::connect()
            .await
            .map_err(|e| format!("{e:#}"))?;
        reboot::carry_out(
            &host,
            settings.reboot_grace,
            message,
            settings.reboot_inhibitor_timeout,
        )
        .await
        .map_err(|e| format!("{e:#}"))
    }

    async fn run_hooks(&self, event: &hooks::Event) {
        hooks::run_all(&self.settings.hooks, event).await;
    }
}

/// The kind of step a phase runs, for unit names.
pub(crate) fn unit_name(kind: StepKind, now: Timestamp) -> String {
    apply::unit_name(kind, now.as_second().max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_switch_lock_means_someone_switches() {
        use nix::fcntl::{Flock, FlockArg};
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join("switch-to-configuration.lock");
        assert!(!switch_in_progress(&lock), "no lock file: nobody switches");
        let file = std::fs::File::create(&lock).unwrap();
        assert!(!switch_in_progress(&lock));
        let held = Flock::lock(file, FlockArg::LockExclusive).unwrap();
        assert!(switch_in_progress(&lock));
        drop(held);
        assert!(!switch_in_progress(&lock));
    }

    #[test]
    fn recognises_fh_apply_command_lines() {
        assert!(is_fh_apply(
            b"/nix/store/x-fh/bin/fh\0apply\0nixos\0org/f/=1#a\0switch\0"
        ));
        assert!(is_fh_apply(b"fh\0apply\0nixos\0"));
        assert!(is_fh_apply(
            b"/bin/bash\0/tmp/t/bin/fh\0apply\0nixos\0r\0switch\0"
        ));
        assert!(!is_fh_apply(b"fh\0search\0nixos\0"));
        assert!(!is_fh_apply(b"/bin/myfh\0apply\0nixos\0"));
        assert!(!is_fh_apply(b""));
    }
}

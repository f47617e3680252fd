//! The fake host: a small world of links, steps that do what they are told, fake services, and
//! a log of what was done to it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::time::Duration;

use jiff::Timestamp;

use crate::agent::apply::{Finished, Step, StepKind};
use crate::agent::config::{FileConfig, Settings};
use crate::agent::flakehub::{self, Resolved};
use crate::agent::flakeref::FlakeRef;
use crate::agent::lifecycle::cycle::cycle;
use crate::agent::lifecycle::host::{Earlier, Host, Link, Turn, Unhealthy};
use crate::agent::lifecycle::outcome::Outcome;
use crate::agent::lifecycle::state::{State, StepHandle, Target};
use crate::agent::{hooks, reboot};
use crate::fleet::{self, Ending, Purpose};

/// What a step does when it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Does {
    /// Its effect, exit 0.
    Works,
    /// No effect, exit 1.
    Fails,
    /// Its effect, then exit 4 (a switch with failed units).
    SwitchesThenExits4,
    /// Never ends (the agent is killed meanwhile).
    Hangs,
}

/// The fake machine and the fake services around it.
#[derive(Clone)]
pub(super) struct World {
    pub(super) now: Timestamp,
    pub(super) boot_id: String,
    pub(super) current: Option<String>,
    pub(super) booted: Option<String>,
    pub(super) profile: Option<String>,
    pub(super) release: Option<Target>,
    pub(super) fetch: Does,
    pub(super) activate: Does,
    pub(super) rollback: Does,
    /// Health rounds to answer, in order; then healthy.
    pub(super) health: VecDeque<Result<(), Unhealthy>>,
    /// Health never answers (the agent is killed while confirming).
    pub(super) health_hangs: bool,
    pub(super) release_refused: Option<String>,
    pub(super) switching: Option<String>,
    pub(super) kernel_changed: bool,
    /// What a step written down by an earlier agent turned out to be.
    pub(super) earlier: Option<Earlier<Finished>>,
    pub(super) fleet: Option<VecDeque<Turn<u32>>>,
    pub(super) fleet_unreachable_on_release: bool,
    pub(super) reboot: Result<reboot::Outcome, String>,
    pub(super) persisted: Option<State>,
    pub(super) log: Vec<String>,
}

impl World {
    pub(super) fn new() -> World {
        let base = "/nix/store/base-system".to_string();
        World {
            now: Timestamp::from_second(1_800_000_000).unwrap(),
            boot_id: "boot-1".into(),
            current: Some(base.clone()),
            booted: Some(base.clone()),
            profile: Some(base),
            release: Some(release(43)),
            fetch: Does::Works,
            activate: Does::Works,
            rollback: Does::Works,
            health: VecDeque::new(),
            health_hangs: false,
            release_refused: None,
            switching: None,
            kernel_changed: false,
            earlier: None,
            fleet: None,
            fleet_unreachable_on_release: false,
            reboot: Ok(reboot::Outcome::Rebooting),
            persisted: None,
            log: Vec::new(),
        }
    }

    pub(super) fn did(&self, prefix: &str) -> usize {
        self.log.iter().filter(|l| l.starts_with(prefix)).count()
    }
}

pub(super) fn release(n: u32) -> Target {
    Target {
        version: format!("0.1.{n}"),
        store_path: format!("/nix/store/system-{n}"),
    }
}

pub(super) struct Fake {
    pub(super) world: RefCell<World>,
    pub(super) settings: Settings,
}

pub(super) fn settings(edit: impl FnOnce(&mut Settings)) -> Settings {
    let mut s = crate::agent::config::check(&FileConfig::default()).unwrap();
    s.flake = Some(
        "org/infra/0.1#nixosConfigurations.web"
            .parse::<FlakeRef>()
            .unwrap(),
    );
    s.confirm_timeout = Duration::from_secs(20);
    edit(&mut s);
    s
}

impl Fake {
    pub(super) fn new(world: World, settings: Settings) -> Fake {
        Fake {
            world: RefCell::new(world),
            settings,
        }
    }

    pub(super) fn w(&self) -> std::cell::RefMut<'_, World> {
        self.world.borrow_mut()
    }

    /// One cycle on the state the world last persisted (as the real agent reads it).
    pub(super) async fn cycle(&self) -> Outcome {
        let mut state = self.w().persisted.clone().unwrap_or_default();
        let (outcome, events) = cycle(self, &mut state, &|_| {}).await;
        for e in events {
            self.w()
                .log
                .push(format!("hook {} {}", e.kind.as_str(), e.outcome));
        }
        outcome
    }

    /// A cycle that does not end within a minute: the agent is killed (its future dropped).
    pub(super) async fn killed_cycle(&self) {
        let run = tokio::time::timeout(Duration::from_secs(60), self.cycle()).await;
        assert!(run.is_err(), "the cycle ended: {run:?}");
    }

    pub(super) fn state(&self) -> State {
        self.w().persisted.clone().expect("a state was written")
    }

    /// The same machine after the agent was restarted (steps behave as `now`).
    pub(super) fn restarted(self, edit: impl FnOnce(&mut World)) -> Fake {
        let mut world = self.world.into_inner();
        edit(&mut world);
        Fake::new(world, self.settings)
    }

    fn apply_effect(&self, step: &Step) {
        let mut w = self.w();
        match step.kind {
            StepKind::Fetch => {
                let path = w.release.as_ref().map(|r| r.store_path.clone());
                w.profile = path;
            }
            StepKind::Activate | StepKind::Rollback => {
                let system = step.argv[0].trim_end_matches("/bin/switch-to-configuration");
                if step.argv[1] != "boot" {
                    w.current = Some(system.to_string());
                }
            }
        }
    }
}

/// A step under way in the fake: its result, or none (it hangs).
pub(super) type FakeRunning = Option<Finished>;

pub(super) fn finished(ok: bool, detail: &str) -> Finished {
    Finished {
        succeeded: ok,
        detail: detail.into(),
    }
}

impl Host for Fake {
    type Running = FakeRunning;
    type Slot = u32;

    fn settings(&self) -> &Settings {
        &self.settings
    }
    fn now(&self) -> Timestamp {
        self.w().now
    }
    fn boot_id(&self) -> String {
        self.w().boot_id.clone()
    }
    fn link(&self, link: Link) -> Option<String> {
        let w = self.w();
        match link {
            Link::Current => w.current.clone(),
            Link::Booted => w.booted.clone(),
            Link::Profile => w.profile.clone(),
        }
    }
    fn persist(&self, state: &State) -> Result<(), String> {
        self.w().persisted = Some(state.clone());
        Ok(())
    }
    fn note_check(&self, state: &State) -> Result<(), String> {
        let mut w = self.w();
        w.log.push("note check".into());
        if let Some(p) = w.persisted.as_mut() {
            p.last_check.clone_from(&state.last_check);
        }
        Ok(())
    }
    fn someone_switching(&self) -> Option<String> {
        self.w().switching.clone()
    }
    fn deploy_blocked(&self) -> Option<String> {
        None
    }
    fn check_release(&self, _system: &str, _version: &str) -> Result<(), String> {
        self.w().release_refused.clone().map_or(Ok(()), Err)
    }
    fn fh(&self) -> Result<&std::path::Path, String> {
        Ok(std::path::Path::new("/fake/bin/fh"))
    }
    fn hostname(&self) -> &str {
        "web-1"
    }
    fn why_idle(&self) -> Option<&str> {
        None
    }
    fn kernel_changed(&self) -> bool {
        self.w().kernel_changed
    }
    fn kernel_version(&self, _system: &str) -> Option<String> {
        Some("6.12.1".into())
    }
    async fn login(&self, _state: &mut State) -> Result<(), String> {
        Ok(())
    }
    fn forget_login(&self) {
        self.w().log.push("forget login".into());
    }
    async fn resolve(&self, _f: &FlakeRef, attr: &str) -> Result<Resolved, flakehub::Error> {
        let release = self.w().release.clone();
        release
            .map(|r| Resolved {
                version: r.version,
                attr: attr.into(),
                store_path: r.store_path,
                published_at: Some("2026-01-01T00:00:00Z".parse().unwrap()),
            })
            .ok_or(flakehub::Error::NotFound("FlakeHub has no release".into()))
    }
    async fn failed_units(&self) -> Vec<String> {
        vec!["old.service".into()]
    }
    async fn health_round(&self, failed_before: &[String]) -> Result<(), Unhealthy> {
        self.w().log.push(format!(
            "health (failed before: {})",
            failed_before.join(",")
        ));
        if self.w().health_hangs {
            std::future::pending::<()>().await;
        }
        self.w().health.pop_front().unwrap_or(Ok(()))
    }
    async fn pause(&self, how_long: Duration) {
        let mut w = self.w();
        w.now = w.now.checked_add(how_long).unwrap();
    }
    async fn start_step(&self, step: &Step, unit: &str) -> Result<FakeRunning, String> {
        assert!(unit.starts_with(&format!("hcloud-nixos-{}-", step.kind.as_str())));
        let does = {
            let mut w = self.w();
            w.log
                .push(format!("{} {}", step.kind.as_str(), step.argv.join(" ")));
            match step.kind {
                StepKind::Fetch => w.fetch,
                StepKind::Activate => w.activate,
                StepKind::Rollback => w.rollback,
            }
        };
        Ok(match does {
            Does::Works => {
                self.apply_effect(step);
                Some(finished(true, "exited with status 0"))
            }
            Does::Fails => Some(finished(false, "exited with status 1")),
            Does::SwitchesThenExits4 => {
                self.apply_effect(step);
                Some(finished(false, "exited with status 4"))
            }
            Does::Hangs => None,
        })
    }
    fn step_handle(&self, _running: &FakeRunning, unit: &str) -> StepHandle {
        StepHandle::Unit(unit.into())
    }
    async fn find_step(
        &self,
        handle: &StepHandle,
        step: &Step,
    ) -> Result<Earlier<FakeRunning>, String> {
        let earlier = self.w().earlier.take();
        self.w().log.push(format!("found {handle:?}"));
        Ok(match earlier {
            Some(Earlier::Finished(done)) => {
                if done.succeeded {
                    self.apply_effect(step);
                }
                Earlier::Finished(done)
            }
            Some(Earlier::Running(done)) => {
                if done.succeeded {
                    self.apply_effect(step);
                }
                Earlier::Running(Some(done))
            }
            Some(Earlier::Unknown) | None => Earlier::Unknown,
        })
    }
    async fn wait_step(&self, running: FakeRunning, _t: Duration) -> Result<Finished, String> {
        match running {
            Some(done) => Ok(done),
            None => std::future::pending().await,
        }
    }
    async fn forget_step(&self, _handle: &StepHandle) {}
    async fn set_profile(&self, system: &str) -> Result<(), String> {
        let mut w = self.w();
        w.log.push(format!("set-profile {system}"));
        w.profile = Some(system.into());
        Ok(())
    }
    fn in_fleet(&self) -> bool {
        self.w().fleet.is_some()
    }
    fn fleet_problem(&self) -> Option<String> {
        None
    }
    async fn fleet_acquire(&self, purpose: Purpose) -> Result<Turn<u32>, fleet::Error> {
        let mut w = self.w();
        w.log.push(format!("fleet acquire {purpose}"));
        let turn = w.fleet.as_mut().and_then(VecDeque::pop_front);
        turn.ok_or_else(|| fleet::Error::new(fleet::ErrorKind::Unreachable, "etcd is down"))
    }
    async fn fleet_release(&self, slot: u32, ending: Ending) -> Result<(), fleet::Error> {
        let mut w = self.w();
        w.log.push(format!("fleet release {slot} {ending:?}"));
        if w.fleet_unreachable_on_release {
            return Err(fleet::Error::new(
                fleet::ErrorKind::Unreachable,
                "etcd is down",
            ));
        }
        Ok(())
    }
    async fn fleet_release_own(&self, ending: Ending) -> Result<(), fleet::Error> {
        self.w().log.push(format!("fleet release own {ending:?}"));
        Ok(())
    }
    async fn reboot(&self, message: &str) -> Result<reboot::Outcome, String> {
        let mut w = self.w();
        w.log.push(format!("reboot: {message}"));
        w.reboot.clone()
    }
    async fn run_hooks(&self, event: &hooks::Event) {
        self.w()
            .log
            .push(format!("hook {} {}", event.kind.as_str(), event.outcome));
    }
}

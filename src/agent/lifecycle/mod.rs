//! The deploy lifecycle: the persisted state ([`state`]), its transitions and decisions as pure
//! functions (`machine`), the outcome of a cycle and the wait before the next (`outcome`),
//! the I/O behind one trait (`host`), and the cycle and its phases (`cycle`, `drive`).
//!
//! A deploy goes `fetch` (fh makes the closure the profile's new generation) → `activate`
//! (switch-to-configuration, its exit status seen) → `confirm` (no new failed unit, FlakeHub
//! reachable, every health check passing, within `confirm_timeout`) → recorded. A failure after
//! activation goes to `rollback`: the profile is set back and the system that ran before is
//! activated and checked the same way; the failed store path is quarantined. With
//! `operation = "boot"` the release awaits the next boot and is checked after it. Each step is
//! written down before it starts, so a restarted agent (or a rebooted server) carries on where
//! it stood, and nothing is applied twice.

pub(crate) mod cycle;
mod drive;
pub(crate) mod host;
pub(crate) mod machine;
pub(crate) mod outcome;
pub mod state;

pub(crate) use cycle::Report;
pub(crate) use host::Context;
pub(crate) use outcome::{Outcome, WaitPolicy};
pub(crate) use state::{State, take_lock};

/// One cycle of the real agent: under the state lock, with the state read afresh from disk (so
/// that `hcloud-nixos retry` and a second agent never lose each other's changes) and written
/// back; the hooks run once the lock is given back.
pub(crate) async fn run_cycle(ctx: &Context, state: &mut State, report: Report<'_>) -> Outcome {
    let paths = &ctx.settings.paths;
    let lock = match take_lock(&paths.run_dir, false) {
        Ok(Some(lock)) => lock,
        Ok(None) => return Outcome::Busy("another hcloud-nixos agent holds the apply lock".into()),
        Err(e) => return Outcome::check_failed(format!("{e:#}"), false),
    };
    match State::load(&paths.state_dir) {
        Ok(fresh) => *state = fresh,
        Err(e) => return Outcome::check_failed(format!("{e:#}"), false),
    }
    let (outcome, events) = cycle::cycle(ctx, state, report).await;
    drop(lock);
    for event in &events {
        crate::agent::hooks::run_all(&ctx.settings.hooks, event).await;
    }
    outcome
}

#[cfg(test)]
mod tests;

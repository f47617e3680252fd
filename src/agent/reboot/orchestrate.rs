//! Reboots at the end of a cycle: whether one is required (a new kernel, or a release applied
//! with `operation = "boot"`), what the policy allows, a turn in the fleet, the hooks, logind.

use super::{Decision, decide, describe_next, wall_message};
use crate::agent::config::Operation;
use crate::agent::hooks::{self, EventKind};
use crate::agent::lifecycle::host::{Host, Link, Turn};
use crate::agent::lifecycle::state::State;
use crate::fleet::{Ending, Purpose};

/// Reboots for a new kernel (or a release applied with `operation = "boot"`) as the policy
/// allows. Returns a note for the status line.
pub(crate) async fn reboots<H: Host>(
    host: &H,
    state: &mut State,
    events: &mut Vec<hooks::Event>,
) -> Option<String> {
    let settings = host.settings();
    let current = host.link(Link::Current);
    let profile = host.link(Link::Profile);
    let (required, system_after) = match state.pending_boot() {
        // A release applied with operation = boot runs only after a reboot.
        Some(p) => (true, Some(p.store_path.clone())),
        // With operation = boot, a boot default other than what runs (after a rollback of a
        // release that failed after its reboot) takes a reboot back.
        None if settings.operation == Operation::Boot
            && profile.is_some()
            && profile != current =>
        {
            (true, profile.clone())
        }
        None => (host.kernel_changed(), current.clone()),
    };
    // A reboot that did not bring up the system it was for is not tried again for that system:
    // rebooting in a loop helps nobody.
    if required
        && let Some(last) = &state.last_reboot
        && !last.ok
        && Some(&last.system) == system_after.as_ref()
    {
        state.reboot_required = true;
        return Some(format!(
            "reboot required, but the last reboot for it booted {} instead; not rebooting again",
            last.booted.as_deref().unwrap_or("an unknown system")
        ));
    }
    let was_required = state.reboot_required;
    state.reboot_required = required;
    let now = host.now();
    let window = settings.reboot_window.as_ref();
    let event = |outcome: &str, error: Option<String>| hooks::Event {
        kind: EventKind::Reboot,
        version: state.running.as_ref().map(|r| r.version.clone()),
        store_path: system_after.clone(),
        previous_path: host.link(Link::Booted),
        outcome: outcome.to_string(),
        error,
    };
    let decision = decide(
        settings.reboot,
        window,
        required,
        now,
        fastrand::f64(),
        state.reboot_planned,
    );
    match decision {
        Decision::NotRequired => {
            state.reboot_planned = None;
            None
        }
        Decision::Hold { reason } => {
            if !was_required {
                events.push(event("held", Some(reason.clone())));
            }
            // For a release applied with operation = boot the status says so already.
            state.pending_boot().is_none().then_some(reason)
        }
        Decision::RebootAt(at) => {
            let note = describe_next(settings.reboot, window, required, now, Some(at));
            if state.reboot_planned != Some(at) {
                tracing::info!(at = %at, "reboot planned inside the maintenance window");
                events.push(event("scheduled", None));
            }
            state.reboot_planned = Some(at);
            Some(note)
        }
        Decision::RebootNow => {
            let Some(system) = system_after.clone() else {
                return Some("reboot required, but the system to boot is unknown".into());
            };
            let rebooting = event("rebooting", None);
            reboot_now(host, state, system, current, rebooting, events).await
        }
    }
}

/// The policy says now: written down first, then a turn in the fleet, the hooks, logind. When it
/// does not happen after all, the lifecycle goes back to where it stood.
async fn reboot_now<H: Host>(
    host: &H,
    state: &mut State,
    system: String,
    current: Option<String>,
    rebooting: hooks::Event,
    events: &mut Vec<hooks::Event>,
) -> Option<String> {
    let before = state.lifecycle.clone();
    let (boot_id, now) = (host.boot_id(), host.now());
    if let Err(e) = state.transition(|l| l.request_reboot(system, boot_id, now)) {
        return Some(format!("reboot postponed: {e}"));
    }
    state.status = "rebooting for a new kernel".into();
    let abandon = |state: &mut State, why: String| {
        state.lifecycle = before.clone();
        Some(why)
    };
    if let Err(e) = host.persist(state) {
        return abandon(state, format!("reboot postponed: {e}"));
    }
    // A reboot takes a turn in the fleet like a deploy; the slot outlives the reboot and is
    // handed back by the cycle after it.
    if let Some(problem) = host.fleet_problem() {
        return abandon(state, format!("reboot postponed: fleet: {problem}"));
    }
    let slot = if host.in_fleet() {
        match host.fleet_acquire(Purpose::Reboot).await {
            Ok(Turn::Granted(slot)) => Some(slot),
            Ok(Turn::Waiting(line) | Turn::Paused(line)) => {
                return abandon(state, format!("reboot waits: {line}"));
            }
            Err(e) => return abandon(state, format!("reboot postponed: {e}")),
        }
    } else {
        None
    };
    if slot.is_some() {
        state.fleet_release = Some(Ending::Done);
        if let Err(e) = host.persist(state) {
            tracing::error!("{e}");
        }
    }
    // The hooks hear of it before the machine goes down.
    host.run_hooks(&rebooting).await;
    let kernel = current.as_deref().and_then(|c| host.kernel_version(c));
    let message = wall_message(host.settings().reboot_grace, kernel.as_deref());
    let result = host.reboot(&message).await;
    if !matches!(result, Ok(super::Outcome::Rebooting))
        && let Some(slot) = slot
    {
        // No reboot after all: the turn goes back at once.
        match host.fleet_release(slot, Ending::Done).await {
            Ok(()) => state.fleet_release = None,
            Err(e) => tracing::warn!("cannot hand the fleet slot back yet: {e}"),
        }
    }
    let failed_event = |outcome: &str, why: &str| hooks::Event {
        outcome: outcome.into(),
        error: Some(why.into()),
        ..rebooting.clone()
    };
    match result {
        Ok(super::Outcome::Rebooting) => Some("rebooting for a new kernel".into()),
        Ok(super::Outcome::Inhibited(by)) => {
            let why = format!("reboot postponed: blocked by {}", by.join(", "));
            events.push(failed_event("inhibited", &why));
            abandon(state, why)
        }
        Err(e) => {
            let why = format!("reboot failed: {e}");
            tracing::error!("{why}");
            events.push(failed_event("failed", &why));
            abandon(state, why)
        }
    }
}

//! The commands that talk to a running agent or read what it recorded: `check`, `retry`,
//! `status` and `fleet`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use crate::agent::config;
use crate::agent::lifecycle::state::{Outcome, State, StepHandle};
use crate::agent::lifecycle::take_lock;
use crate::agent::setup::load;
use crate::fleet;

/// The agent's PID file in its runtime directory.
pub(crate) const PID_FILE: &str = "agent.pid";

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
    // Never 0 or below: kill() would signal our own process group, or every process.
    let pid: i32 = text
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 1)
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
    let lock = take_lock(&run_dir, true)?;
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

/// `hcloud-nixos fleet ...`: this server's fleet group (its configuration and user-data), or
/// the group `--group` names on etcd endpoints given in the environment (CI, a workstation).
pub async fn fleet_command(
    config_path: &Path,
    args: &fleet::FleetArgs,
    command: &fleet::FleetCommand,
) -> Result<String> {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let (f, id, slots_known) = match args.fleet() {
        Some(f) => (
            f.map_err(|problems| anyhow::anyhow!("{}", problems.join("; ")))?,
            "operator".to_string(),
            false,
        ),
        None => {
            let loaded = load(config_path).await?;
            let Some(mut f) = loaded.settings.fleet.clone() else {
                bail!(
                    "this server is in no fleet: neither {} nor the user-data has a [fleet] section (or give --etcd-endpoints and --group)",
                    config_path.display()
                );
            };
            if let Some(group) = &args.group {
                fleet::check_group(group).map_err(anyhow::Error::msg)?;
                f.group = group.clone();
            }
            // The commands act on the group, not as this server: its id only names it.
            let id = match loaded.instance_id {
                Some(Ok(id)) => id,
                _ => "operator".to_string(),
            };
            (f, id, true)
        }
    };
    let coordinator = fleet::Coordinator::new(&f, fleet::Member { id, host })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    fleet::run_command(&coordinator, command, slots_known)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// `hcloud-nixos status`: the state for a person, or as JSON.
pub async fn status(config_path: &Path, json: bool) -> Result<String> {
    let (state_dir, run_dir) = dirs(config_path)?;
    let state = State::load_for_status(&state_dir, &run_dir)?;
    if json {
        let mut value = serde_json::to_value(&state)?;
        if let Some(map) = value.as_object_mut() {
            map.insert("timeline".into(), boot_timeline().await);
        }
        return Ok(serde_json::to_string_pretty(&value)? + "\n");
    }
    Ok(describe_state(&state))
}

/// When this boot's network step finished and the agent became ready, from systemd (empty
/// where there is no systemd to ask): the server's side of `create`'s timeline.
async fn boot_timeline() -> serde_json::Value {
    let mut out = serde_json::Map::new();
    let Ok(systemd) = crate::agent::systemd::Systemd::connect().await else {
        return serde_json::Value::Object(out);
    };
    for (key, unit, property) in [
        (
            "network_configured_at",
            "hcloud-nixos-network.service",
            "ExecMainExitTimestamp",
        ),
        (
            "agent_ready_at",
            "hcloud-nixos-agent.service",
            "ActiveEnterTimestamp",
        ),
    ] {
        let at = systemd
            .unit_timestamp(unit, property)
            .await
            .and_then(|usec| jiff::Timestamp::from_microsecond(usec as i64).ok());
        if let Some(at) = at {
            out.insert(key.into(), serde_json::Value::String(at.to_string()));
        }
    }
    serde_json::Value::Object(out)
}

/// The state, readable.
pub(crate) fn describe_state(state: &State) -> String {
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
            Outcome::Success => "succeeded".to_string(),
            Outcome::Failed => {
                format!("failed: {}", d.error.as_deref().unwrap_or(""))
            }
        };
        let _ = writeln!(
            out,
            "last deploy:  {} {} at {}, {outcome}",
            d.operation.as_str(),
            d.version,
            d.finished_at
        );
    }
    if let Some(f) = state.in_flight() {
        let unit = match &f.step {
            Some(StepHandle::Unit(u)) => format!(" in {u}"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "applying:     {} since {}{unit}",
            f.target.version, f.started_at
        );
    }
    for q in &state.quarantined {
        let _ = writeln!(
            out,
            "quarantined:  {} since {}: {}",
            q.version, q.at, q.reason
        );
    }
    if let Some(p) = state.pending_boot() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pid_file_never_leads_to_signalling_a_group_or_everyone() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("run");
        std::fs::create_dir(&run_dir).unwrap();
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!("[paths]\nrun_dir = \"{}\"\n", run_dir.display()),
        )
        .unwrap();
        for text in ["0", "-1", "1", "x"] {
            std::fs::write(run_dir.join(PID_FILE), text).unwrap();
            let e = format!("{:#}", request_check(&config).unwrap_err());
            assert!(e.contains("does not hold a PID"), "{text}: {e}");
        }
    }
}

//! Following a new server over SSH: the user's own OpenSSH client (their `~/.ssh/config`, agent
//! and keys), the host key checked against the entry `create` wrote, and the agent's
//! `hcloud-nixos status --json` read into the timeline until the release is deployed, the agent
//! ready, or something failed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use jiff::Timestamp;
use serde_json::Value;

use super::timeline::{Phase, Timeline};

/// How to reach the server.
#[derive(Debug, Clone)]
pub(crate) struct Ssh {
    /// An address of the server (IPv4 where it has one).
    pub address: String,
    pub known_hosts: PathBuf,
    /// `--ssh-identity`.
    pub identity: Option<PathBuf>,
    /// `ssh`, or another OpenSSH client (tests).
    pub program: PathBuf,
}

/// What one SSH command gave.
#[derive(Debug)]
pub(crate) enum Answer {
    /// It ran (whatever its exit status): its output.
    Ran { status: i32, stdout: String },
    /// No connection (refused, timed out, no route): the server is not up yet.
    NoConnection(String),
    /// The host key is not the one create made: never go on.
    HostKeyMismatch(String),
}

impl Ssh {
    /// The argv: batch mode (no prompt), the host key checked strictly against `known_hosts`.
    pub(crate) fn argv(&self, command: &str) -> Vec<String> {
        let mut argv = vec![
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "-o".into(),
            "ConnectTimeout=5".into(),
            "-o".into(),
            "LogLevel=ERROR".into(),
        ];
        if let Some(identity) = &self.identity {
            argv.extend(["-i".into(), identity.display().to_string()]);
        }
        argv.extend([
            "-l".into(),
            "root".into(),
            self.address.clone(),
            command.to_string(),
        ]);
        argv
    }

    /// Runs `command` on the server, within `timeout`.
    pub(crate) async fn run(&self, command: &str, timeout: Duration) -> Answer {
        let child = tokio::process::Command::new(&self.program)
            .args(self.argv(command))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                return Answer::NoConnection(format!("cannot run {}: {e}", self.program.display()));
            }
        };
        let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Answer::NoConnection(e.to_string()),
            Err(_) => return Answer::NoConnection("no answer in time".into()),
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        classify(
            out.status.code(),
            &String::from_utf8_lossy(&out.stdout),
            &stderr,
        )
    }
}

/// What an ssh run means: 255 is ssh's own failure (the command's status otherwise).
pub(crate) fn classify(status: Option<i32>, stdout: &str, stderr: &str) -> Answer {
    let last = stderr
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
        .to_string();
    if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
        || stderr.contains("Host key verification failed")
        || stderr.contains("No ED25519 host key is known")
    {
        return Answer::HostKeyMismatch(last);
    }
    match status {
        Some(255) | None => Answer::NoConnection(last),
        Some(status) => Answer::Ran {
            status,
            stdout: stdout.to_string(),
        },
    }
}

/// How far the server is, from its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Still on its way.
    Working(String),
    /// The desired release runs and is confirmed.
    Deployed { version: String },
    /// The deploy failed (rolled back or failed before activation): the status line says how.
    Failed(String),
}

/// Reads `hcloud-nixos status --json` (with its `timeline`) into the timeline and says how far
/// the server is.
pub(crate) fn read_status(status: &Value, timeline: &mut Timeline) -> Progress {
    let at = |v: &Value| v.as_str().and_then(|s| s.parse::<Timestamp>().ok());
    let units = &status["timeline"];
    if let Some(t) = at(&units["network_configured_at"]) {
        timeline.ended(Phase::NetworkConfigured, t);
    }
    if let Some(t) = at(&units["agent_ready_at"]) {
        timeline.ended(Phase::AgentReady, t);
    }
    if let Some(t) = at(&status["login"]["at"]) {
        timeline.ended(Phase::Login, t);
    }
    let line = status["status"].as_str().unwrap_or_default().to_string();
    let deploy = &status["last_deploy"];
    let desired = status["desired"]["version"].as_str();
    let deployed = deploy["version"].as_str() == desired && desired.is_some();
    if deployed {
        if let Some(t) = at(&deploy["fetched_at"]) {
            timeline.ended(Phase::Fetch, t);
        }
        if let Some(t) = at(&deploy["activated_at"]) {
            timeline.ended(Phase::Activation, t);
        }
    } else if let Some(t) = at(&status["in_flight"]["fetched_at"]) {
        timeline.ended(Phase::Fetch, t);
    }
    let running = status["running"]["version"].as_str();
    match (deployed, deploy["outcome"].as_str()) {
        (true, Some("success")) if running == desired && status["in_flight"].is_null() => {
            if let Some(t) = at(&deploy["finished_at"]) {
                timeline.ended(Phase::Confirmed, t);
            }
            Progress::Deployed {
                version: desired.unwrap_or_default().to_string(),
            }
        }
        (true, Some("failed")) if status["in_flight"].is_null() => Progress::Failed(line),
        _ if line.is_empty() => Progress::Working("the agent has not checked yet".into()),
        _ => Progress::Working(line),
    }
}

/// The command create runs on the server.
pub(crate) const STATUS_COMMAND: &str = "hcloud-nixos status --json";

/// The last lines of the agent's journal, for a failure.
pub(crate) const JOURNAL_COMMAND: &str =
    "journalctl --no-pager -n 30 -o short-iso -u hcloud-nixos-agent.service -u 'hcloud-nixos-*'";

/// The OpenSSH client to use: `ssh` from `PATH`.
pub(crate) fn ssh_program() -> Result<PathBuf, String> {
    crate::plumbing::exec::find_program(Path::new("ssh")).ok_or_else(|| {
        "cannot find ssh (OpenSSH's client) in PATH; install it, or use --wait running".to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ssh_checks_the_host_key_strictly_and_never_asks() {
        let ssh = Ssh {
            address: "192.0.2.7".into(),
            known_hosts: "/home/u/.ssh/known_hosts".into(),
            identity: Some("/home/u/.ssh/id_ed25519".into()),
            program: "ssh".into(),
        };
        let argv = ssh.argv(STATUS_COMMAND).join(" ");
        for wanted in [
            "-o BatchMode=yes",
            "-o StrictHostKeyChecking=yes",
            "-o UserKnownHostsFile=/home/u/.ssh/known_hosts",
            "-i /home/u/.ssh/id_ed25519",
            "-l root 192.0.2.7 hcloud-nixos status --json",
        ] {
            assert!(argv.contains(wanted), "{argv}");
        }
    }

    #[test]
    fn ssh_failures_are_told_apart() {
        assert!(matches!(
            classify(Some(255), "", "ssh: connect to host 192.0.2.7 port 22: Connection refused\n"),
            Answer::NoConnection(e) if e.contains("Connection refused")
        ));
        assert!(matches!(
            classify(
                Some(255),
                "",
                "@@@\nWARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!\nHost key verification failed.\n"
            ),
            Answer::HostKeyMismatch(_)
        ));
        assert!(matches!(
            classify(Some(1), "{}", ""),
            Answer::Ran { status: 1, .. }
        ));
    }

    #[test]
    fn the_status_is_read_into_the_timeline() {
        let start: Timestamp = "2026-11-30T10:00:00Z".parse().unwrap();
        let mut t = Timeline::new(start);
        let working = json!({
            "status": "fetching 0.1.43",
            "desired": {"version": "0.1.43", "store_path": "/nix/store/x"},
            "login": {"token_sha256": "ab", "at": "2026-11-30T10:00:20Z"},
            "in_flight": {"version": "0.1.43", "phase": "fetch"},
            "timeline": {"network_configured_at": "2026-11-30T10:00:12Z", "agent_ready_at": "2026-11-30T10:00:21Z"}
        });
        assert_eq!(
            read_status(&working, &mut t),
            Progress::Working("fetching 0.1.43".into())
        );
        assert!(t.has(Phase::NetworkConfigured) && t.has(Phase::Login) && !t.has(Phase::Fetch));
        let done = json!({
            "status": "up to date: 0.1.43 (just deployed)",
            "running": {"version": "0.1.43", "store_path": "/nix/store/x"},
            "desired": {"version": "0.1.43", "store_path": "/nix/store/x"},
            "last_deploy": {"version": "0.1.43", "outcome": "success",
                "fetched_at": "2026-11-30T10:00:30Z", "activated_at": "2026-11-30T10:00:33Z",
                "finished_at": "2026-11-30T10:00:35Z"}
        });
        assert_eq!(
            read_status(&done, &mut t),
            Progress::Deployed {
                version: "0.1.43".into()
            }
        );
        assert!(t.has(Phase::Fetch) && t.has(Phase::Activation) && t.has(Phase::Confirmed));
        let failed = json!({
            "status": "deploy of 0.1.44 failed and was rolled back: units failed: web.service",
            "desired": {"version": "0.1.44"},
            "last_deploy": {"version": "0.1.44", "outcome": "failed"}
        });
        assert!(
            matches!(read_status(&failed, &mut t), Progress::Failed(l) if l.contains("rolled back"))
        );
    }
}

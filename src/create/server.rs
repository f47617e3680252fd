//! One server of a `create` run, from the API call to the confirmed deploy, with a live line on a
//! terminal (plain lines otherwise), and the report at the end: the timeline, the addresses, and
//! on failure the agent's status and the last lines of its journal.

use std::io::IsTerminal as _;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use jiff::Timestamp;
use serde::Serialize;
use serde_json::json;

use super::follow::{self, Answer, Progress, Ssh};
use super::hostkey::{self, HostKey};
use super::plan::Plan;
use super::timeline::{Phase, Timeline};
use super::{CreateArgs, Wait};
use crate::upload::api::Server;

/// How often the API is asked whether the server runs: twice a second for the half minute a
/// boot takes stays well inside Hetzner's 3,600 requests an hour.
const API_POLL: Duration = Duration::from_millis(500);
/// How soon SSH is tried again while the server does not answer (a refused connection costs
/// nothing; sshd comes up a moment after the server runs).
const SSH_RETRY: Duration = Duration::from_millis(250);
/// How often the agent's status is read once SSH answers (one connection each).
const STATUS_POLL: Duration = Duration::from_millis(500);

/// How one server ended.
#[derive(Debug, Serialize)]
pub(crate) struct Created {
    pub name: String,
    pub id: Option<u64>,
    pub ipv4: Option<String>,
    pub ipv6: Option<String>,
    /// The release it runs, when deployed.
    pub version: Option<String>,
    #[serde(skip)]
    pub timeline: Timeline,
    #[serde(rename = "timeline")]
    pub entries: Vec<super::timeline::Entry>,
    pub failure: Option<String>,
    /// On failure: the agent's status line and the last lines of its journal.
    pub details: Option<String>,
    pub deleted: bool,
}

/// What the live line shows.
struct Line(Option<ProgressBar>);

impl Line {
    fn set(&self, name: &str, text: &str, elapsed: Duration) {
        match &self.0 {
            Some(bar) => {
                bar.set_message(format!("{name}: {text} ({:.0} s)", elapsed.as_secs_f64()))
            }
            None => eprintln!("{name}: {text} after {:.1} s", elapsed.as_secs_f64()),
        }
    }

    fn done(&self, name: &str, text: &str) {
        match &self.0 {
            Some(bar) => bar.finish_with_message(format!("{name}: {text}")),
            None => eprintln!("{name}: {text}"),
        }
    }
}

/// Creates every server at once.
pub(crate) async fn create_all(args: &CreateArgs, plan: &Plan) -> Vec<Created> {
    let multi = (!args.json && std::io::stderr().is_terminal())
        .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
    let style = ProgressStyle::with_template("{spinner} {msg}").ok();
    let runs = args.names.iter().map(|name| {
        let bar = multi.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new_spinner());
            if let Some(style) = &style {
                bar.set_style(style.clone());
            }
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        one(args, plan, name, Line(bar))
    });
    futures_util::future::join_all(runs).await
}

async fn one(args: &CreateArgs, plan: &Plan, name: &str, line: Line) -> Created {
    let start = started();
    let clock = tokio::time::Instant::now();
    let mut created = Created {
        name: name.to_string(),
        id: None,
        ipv4: None,
        ipv6: None,
        version: None,
        timeline: Timeline::new(start),
        entries: Vec::new(),
        failure: None,
        details: None,
        deleted: false,
    };
    let result = drive(args, plan, name, &line, clock, &mut created).await;
    if let Err(failure) = result {
        line.done(name, &format!("failed: {failure}"));
        created.failure = Some(failure);
        if args.delete_on_failure
            && let Some(id) = created.id
        {
            created.deleted = plan.api.delete_server(id).await.is_ok();
            if let Ok(file) = hostkey::known_hosts_path(args.known_hosts.as_deref()) {
                let _ = hostkey::forget(&file, &hosts(&created));
            }
        }
    } else {
        line.done(name, "done");
    }
    created.entries = created.timeline.entries();
    created
}

fn hosts(c: &Created) -> Vec<String> {
    std::iter::once(c.name.clone())
        .chain(c.ipv4.clone())
        .chain(c.ipv6.clone())
        .collect()
}

fn ipv6_address(server: &Server) -> Option<String> {
    // Hetzner gives the server a /64; its address is ::1 in it.
    let net = server.public_net.ipv6.as_ref()?.ip.clone();
    let prefix = net.split('/').next()?;
    Some(if prefix.ends_with("::") {
        format!("{prefix}1")
    } else {
        prefix.to_string()
    })
}

async fn drive(
    args: &CreateArgs,
    plan: &Plan,
    name: &str,
    line: &Line,
    clock: tokio::time::Instant,
    created: &mut Created,
) -> Result<(), String> {
    let deadline = clock + args.timeout;
    let key = HostKey::generate(name).map_err(|e| format!("{e:#}"))?;
    let flake = plan.flake.to_string();
    let ours = super::userdata::Ours {
        token: &plan.flakehub_token,
        flake: &flake,
        host_key_private: &key.private,
        host_key_public: &key.public,
    };
    let userdata = super::userdata::build(&ours, plan.userdata.as_deref())?;
    let release = plan.versions.get(name).map_or("", String::as_str);
    line.set(
        name,
        &format!("creating (FlakeHub has {release})"),
        clock.elapsed(),
    );
    // A label of this run's own, so that a lost answer is followed by finding the server
    // instead of creating a second one.
    let run = crate::upload::flow::random_id().map_err(|e| format!("{e:#}"))?;
    let mut labels = plan.labels.clone();
    labels.insert(crate::upload::labels::RUN.to_string(), run.clone());
    let body = json!({
        "name": name,
        "server_type": plan.server_type,
        "image": plan.image,
        "location": plan.location,
        "ssh_keys": plan.ssh_keys,
        "labels": labels,
        "networks": plan.networks,
        "user_data": String::from_utf8_lossy(&userdata),
        "start_after_create": true,
        "public_net": {"enable_ipv4": true, "enable_ipv6": true},
    });
    let (server, _action) = plan
        .api
        .create_server(&body, &format!("{}={run}", crate::upload::labels::RUN))
        .await
        .map_err(|e| format!("{e:#}"))?;
    created.id = Some(server.id);
    created.timeline.ended(Phase::ApiCall, now());
    if args.wait == Wait::None {
        return Ok(());
    }
    let server = wait_running(plan, server.id, name, line, clock, deadline).await?;
    created.timeline.ended(Phase::Running, now());
    created.ipv4 = server.public_net.ipv4.as_ref().map(|a| a.ip.clone());
    created.ipv6 = ipv6_address(&server);
    let known_hosts =
        hostkey::known_hosts_path(args.known_hosts.as_deref()).map_err(|e| format!("{e:#}"))?;
    hostkey::remember(&known_hosts, &hosts(created), &key).map_err(|e| format!("{e:#}"))?;
    if args.wait == Wait::Running {
        return Ok(());
    }
    let ssh = Ssh {
        address: created
            .ipv4
            .clone()
            .or_else(|| created.ipv6.clone())
            .ok_or("the server has no public address to connect to")?,
        known_hosts,
        identity: args.ssh_identity.clone(),
        program: follow::ssh_program()?,
    };
    follow_agent(args, &ssh, name, line, clock, deadline, created).await
}

/// When a server's timeline starts: now, exactly (the agent's state keeps whole seconds; a start
/// truncated like them made every phase create measures itself up to 1 s longer).
fn started() -> Timestamp {
    Timestamp::now()
}

fn now() -> Timestamp {
    Timestamp::now()
}

async fn wait_running(
    plan: &Plan,
    id: u64,
    name: &str,
    line: &Line,
    clock: tokio::time::Instant,
    deadline: tokio::time::Instant,
) -> Result<Server, String> {
    loop {
        let server = plan
            .api
            .get_server(id)
            .await
            .map_err(|e| format!("{e:#}"))?;
        if server.status == "running" {
            return Ok(server);
        }
        line.set(name, &format!("server {}", server.status), clock.elapsed());
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "the server did not run within the timeout (it is {})",
                server.status
            ));
        }
        tokio::time::sleep(API_POLL).await;
    }
}

async fn follow_agent(
    args: &CreateArgs,
    ssh: &Ssh,
    name: &str,
    line: &Line,
    clock: tokio::time::Instant,
    deadline: tokio::time::Instant,
    created: &mut Created,
) -> Result<(), String> {
    let mut last = String::from("waiting for SSH");
    loop {
        if tokio::time::Instant::now() >= deadline {
            let details = failure_details(ssh).await;
            created.details = Some(details);
            return Err(format!(
                "not {} within {} ({last})",
                match args.wait {
                    Wait::Ready => "ready",
                    _ => "deployed",
                },
                humantime::format_duration(args.timeout)
            ));
        }
        match ssh
            .run(follow::STATUS_COMMAND, Duration::from_secs(15))
            .await
        {
            Answer::HostKeyMismatch(why) => {
                return Err(format!(
                    "the server's host key is not the one create made ({why}); not connecting"
                ));
            }
            Answer::NoConnection(why) => {
                line.set(name, &format!("no SSH answer yet: {why}"), clock.elapsed());
                last = format!("no SSH answer yet: {why}");
                tokio::time::sleep(SSH_RETRY).await;
                continue;
            }
            Answer::Ran { status, stdout } => {
                created.timeline.ended(Phase::FirstSshAnswer, now());
                match serde_json::from_str::<serde_json::Value>(&stdout) {
                    Ok(status) => match follow::read_status(&status, &mut created.timeline) {
                        Progress::Deployed { version } => {
                            created.version = Some(version);
                            return Ok(());
                        }
                        Progress::Failed(status_line) => {
                            created.details = Some(failure_details(ssh).await);
                            return Err(status_line);
                        }
                        Progress::Working(status_line) => {
                            if args.wait == Wait::Ready && created.timeline.has(Phase::AgentReady) {
                                return Ok(());
                            }
                            last = status_line;
                        }
                    },
                    Err(_) => last = format!("hcloud-nixos status exited {status}"),
                }
            }
        }
        line.set(name, &last, clock.elapsed());
        tokio::time::sleep(STATUS_POLL).await;
    }
}

/// The agent's status and the last lines of its journal, for a person to see why.
async fn failure_details(ssh: &Ssh) -> String {
    let mut out = String::new();
    for command in ["hcloud-nixos status", follow::JOURNAL_COMMAND] {
        match ssh.run(command, Duration::from_secs(20)).await {
            Answer::Ran { stdout, .. } => out.push_str(&stdout),
            Answer::NoConnection(why) | Answer::HostKeyMismatch(why) => {
                out.push_str(&format!("(cannot run `{command}`: {why})\n"));
                break;
            }
        }
    }
    out
}

/// The end of the run: JSON on stdout with `--json`; else each server's addresses, timeline and
/// (on failure) what the agent said, on stdout for the deployed and stderr for the failed.
pub(crate) fn report(args: &CreateArgs, results: &[Created]) {
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(results).unwrap_or_default()
        );
        return;
    }
    for c in results {
        let addresses = [c.ipv4.as_deref(), c.ipv6.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ");
        let head = match (&c.failure, &c.version) {
            (None, Some(v)) => format!("{}: deployed {v}", c.name),
            (None, None) => format!("{}: created", c.name),
            (Some(f), _) => format!("{}: failed: {f}", c.name),
        };
        let mut text = format!("{head}\n");
        if let Some(id) = c.id {
            text.push_str(&format!("  server {id}, {addresses}\n"));
        }
        text.push_str(&c.timeline.render());
        if let Some(details) = &c.details {
            text.push_str(details);
        }
        match (&c.failure, c.id, c.deleted) {
            (Some(_), Some(id), false) => text.push_str(&format!(
                "  the server is kept to look at: `ssh root@{addresses}`; delete it with `hcloud server delete {id}`\n"
            )),
            (Some(_), Some(id), true) => text.push_str(&format!("  server {id} was deleted\n")),
            _ => {}
        }
        if c.failure.is_some() {
            eprint!("{text}");
        } else {
            print!("{text}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeline_starts_at_the_exact_time_not_a_whole_second() {
        // Truncated to its second, the start made every phase create measures up to 1 s longer.
        let (a, b) = (started(), started());
        assert!(
            a.subsec_nanosecond() != 0 || b.subsec_nanosecond() != 0,
            "the timeline starts at {a}: truncated to a second"
        );
    }
}

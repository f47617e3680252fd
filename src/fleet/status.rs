//! The group as `hcloud-nixos fleet status` shows it: slots and their holders, pauses and
//! canaries, and (etcd) the group's desired release, its poller, and every member as its agent
//! last reported it, alive or silent; as text with a table, or as JSON.

use std::fmt::Write as _;

use etcd_client::{GetOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse};
use serde::Serialize;

use super::etcd::EtcdCoordinator;
use super::records::{self, Candidate, Desired, HeldSlot, LastDeploy, MemberRecord};
use super::{Backend, Error, Holder, Pause};
use crate::agent::lifecycle::state::{Outcome, State};

/// The group as the backend sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FleetStatus {
    /// The backend asked.
    pub backend: Backend,
    /// The group's name.
    pub group: String,
    /// As this server's configuration says (`fleet status` without one: as the members' records
    /// say).
    pub slots: u32,
    /// False where the backend cannot list them (FleetLock).
    pub holders_known: bool,
    /// Who holds a slot now (empty when `holders_known` is false).
    pub holders: Vec<Holder>,
    /// Releases the group does not start until an operator runs `fleet resume` (etcd).
    pub paused: Vec<Pause>,
    /// Canary servers registered in the group (ids with hostnames).
    pub canaries: Vec<String>,
    /// Releases a canary confirmed healthy, oldest first.
    pub confirmed: Vec<String>,
    /// The release the group should run (etcd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<Desired>,
    /// The member that polls FlakeHub for the group (etcd).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poller: Option<String>,
    /// Every member that ever reported (etcd), by hostname.
    #[serde(default)]
    pub members: Vec<MemberStatus>,
}

/// One member: its last record, and whether its lease still lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberStatus {
    /// What it last reported (`members/<id>`, or `seen/<id>` once the lease is gone).
    #[serde(flatten)]
    pub record: MemberRecord,
    /// Its lease lives; false: it has gone silent (since `record.updated`, at the latest).
    pub alive: bool,
}

impl MemberStatus {
    /// What it is doing, in a few words.
    pub(crate) fn activity(&self) -> String {
        let r = &self.record;
        if !self.alive {
            return "silent".into();
        }
        if let Some(d) = &r.deploying {
            let phase = d.rsplit(' ').next().unwrap_or("");
            return format!("deploying ({phase})");
        }
        if matches!(
            r.slot,
            Some(HeldSlot {
                purpose: super::Purpose::Reboot,
                ..
            })
        ) {
            return "rebooting".into();
        }
        let s = r.status.as_str();
        if s.starts_with("waiting for a fleet slot") {
            "waiting for a slot".into()
        } else if s.starts_with("fleet paused") {
            "paused".into()
        } else if !r.ok || s.contains("failed") {
            "failed".into()
        } else if s.starts_with("up to date") {
            "up to date".into()
        } else if s.is_empty() {
            "starting".into()
        } else {
            s.split(':').next().unwrap_or(s).chars().take(30).collect()
        }
    }
}

/// `0.1.43+rev-<40 hex>` as `0.1.43+rev-68c4948` for the table.
fn short(version: &str) -> String {
    match version.split_once("+rev-") {
        Some((v, rev)) => format!("{v}+rev-{}", rev.get(..7).unwrap_or(rev)),
        None => version.to_string(),
    }
}

impl FleetStatus {
    /// A few readable lines for `hcloud-nixos fleet status`, with a table of the members.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "group {} ({}): {} slot{}",
            self.group,
            self.backend.as_str(),
            self.slots,
            if self.slots == 1 { "" } else { "s" }
        );
        if !self.holders_known {
            out.push_str(
                "\nfleetlock: holders unknown (the protocol does not list them; pauses and canaries are not recorded)",
            );
            return out;
        }
        let _ = write!(out, ", {} taken", self.holders.len());
        for h in &self.holders {
            let _ = write!(
                out,
                "\n  slot {}: {} (id {}) {} since {}{}",
                h.slot.map_or("?".to_string(), |s| s.to_string()),
                h.name(),
                h.id,
                h.purpose,
                h.since,
                if h.canary { ", canary" } else { "" }
            );
        }
        if self.paused.is_empty() {
            out.push_str("\nno paused releases");
        }
        for p in &self.paused {
            let _ = write!(
                out,
                "\npaused: release {} failed on {} (id {}) at {}: {}",
                p.release,
                if p.host.is_empty() { &p.by } else { &p.host },
                p.by,
                p.at,
                p.reason
            );
        }
        if !self.canaries.is_empty() {
            let _ = write!(out, "\ncanaries: {}", self.canaries.join(", "));
            let _ = write!(
                out,
                "\nconfirmed by a canary: {}",
                if self.confirmed.is_empty() {
                    "none yet".to_string()
                } else {
                    self.confirmed.join(", ")
                }
            );
        }
        self.describe_members(&mut out);
        out
    }

    fn describe_members(&self, out: &mut String) {
        match &self.desired {
            Some(d) => {
                let _ = write!(
                    out,
                    "\ndesired release: {} (from {} at {})",
                    d.version, d.by, d.at
                );
            }
            None => out.push_str("\ndesired release: none yet"),
        }
        let _ = write!(
            out,
            "\npoller: {}",
            self.poller.as_deref().unwrap_or("none (no member is up)")
        );
        if self.members.is_empty() {
            out.push_str("\nmembers: none has reported yet");
            return;
        }
        let alive = self.members.iter().filter(|m| m.alive).count();
        let _ = write!(
            out,
            "\nmembers: {} ({alive} alive, {} silent)\n",
            self.members.len(),
            self.members.len() - alive
        );
        let mut rows = vec![
            [
                "SERVER",
                "ID",
                "RUNNING",
                "DESIRED",
                "STATE",
                "SLOT",
                "LAST DEPLOY",
                "SINCE",
                "STATUS",
            ]
            .map(str::to_string),
        ];
        for m in &self.members {
            rows.push(row(m));
        }
        out.push_str(&table(&rows));
    }
}

/// One member's row of the table.
fn row(m: &MemberStatus) -> [String; 9] {
    let r = &m.record;
    let dash = || "-".to_string();
    let last = r.last_deploy.as_ref().map_or_else(dash, |d: &LastDeploy| {
        format!(
            "{} {} {}",
            short(&d.version),
            if d.ok { "ok" } else { "failed" },
            d.at
        )
    });
    let (since, status) = if m.alive {
        (r.since.clone(), r.status.clone())
    } else {
        (
            r.updated.clone(),
            format!(
                "silent since {} (its lease expired); last: {}",
                r.updated, r.status
            ),
        )
    };
    [
        if r.host.is_empty() {
            r.id.clone()
        } else {
            r.host.clone()
        },
        r.id.clone(),
        r.running.as_deref().map_or_else(dash, short),
        r.desired.as_deref().map_or_else(dash, short),
        m.activity() + if r.poller && m.alive { ", poller" } else { "" },
        r.slot
            .as_ref()
            .map_or_else(dash, |s| s.slot.map_or("?".into(), |i| i.to_string())),
        last,
        if since.is_empty() { dash() } else { since },
        status,
    ]
}

/// Rows as columns padded to their widest cell (the last column not padded).
fn table(rows: &[[String; 9]]) -> String {
    let mut widths = [0usize; 9];
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                let _ = write!(line, "{c:<w$}  ", w = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.trim_end().to_string()
}

/// The agent's state as its member record carries it (the group task adds who, the poller flag,
/// the slot held and the times).
pub(crate) fn member_record(state: &State) -> MemberRecord {
    MemberRecord {
        running: state.running.as_ref().map(|t| t.version.clone()),
        desired: state.desired.as_ref().map(|t| t.version.clone()),
        deploying: state
            .in_flight()
            .map(|f| format!("{} {}", f.target.version, f.phase.name())),
        status: state.status.clone(),
        ok: state.last_check.as_ref().is_some_and(|c| c.ok),
        last_deploy: state.last_deploy.as_ref().map(|d| LastDeploy {
            version: d.version.clone(),
            ok: d.outcome == Outcome::Success,
            at: d.finished_at.to_string(),
            error: d.error.clone(),
        }),
        ..MemberRecord::default()
    }
}

/// A record read, or `None` with a note in the log.
fn noted<T>(read: Result<T, String>) -> Option<T> {
    read.map_err(|e| tracing::debug!("etcd: {e}; left out"))
        .ok()
}

/// What etcd holds about the group's members.
pub(crate) struct Members {
    pub(crate) desired: Option<Desired>,
    pub(crate) poller: Option<String>,
    pub(crate) members: Vec<MemberStatus>,
}

impl EtcdCoordinator {
    /// The desired release, the poller and every member's record, at one revision.
    pub(crate) async fn members(&self, what: &str) -> Result<Members, Error> {
        let mut c = self.conn.client().await?;
        let key = |rest: &str| format!("{}{rest}", self.base);
        let txn = Txn::new().and_then(vec![
            TxnOp::get(key("desired"), None),
            TxnOp::get(
                key("poller/"),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Ascend)
                        .with_limit(1),
                ),
            ),
            TxnOp::get(
                key("members/"),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ),
            TxnOp::get(key("seen/"), Some(GetOptions::new().with_prefix())),
        ]);
        let resp = self.conn.call(what, c.txn(txn)).await?;
        let gets: Vec<_> = resp
            .op_responses()
            .into_iter()
            .filter_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g),
                _ => None,
            })
            .collect();
        let [desired, poller, alive, seen] = gets.as_slice() else {
            return Err(self.conn.unreachable(what, "etcd's answer was incomplete"));
        };
        let desired = desired.kvs().first().and_then(|kv| {
            noted(records::parse::<Desired>(
                "the group's desired release",
                kv.value(),
            ))
        });
        let poller = poller.kvs().first().and_then(|kv| {
            noted(records::parse::<Candidate>("the poller", kv.value())).map(|c| c.name())
        });
        let alive: Vec<String> = alive
            .kvs()
            .iter()
            .filter_map(|kv| kv.key_str().ok()?.rsplit('/').next().map(str::to_string))
            .collect();
        let mut members: Vec<MemberStatus> = seen
            .kvs()
            .iter()
            .filter_map(|kv| {
                let record = noted(records::parse::<MemberRecord>(
                    "a member's record",
                    kv.value(),
                ))?;
                let alive = alive.contains(&record.id);
                Some(MemberStatus { record, alive })
            })
            .collect();
        members.sort_by(|a, b| (&a.record.host, &a.record.id).cmp(&(&b.record.host, &b.record.id)));
        Ok(Members {
            desired,
            poller,
            members,
        })
    }
}

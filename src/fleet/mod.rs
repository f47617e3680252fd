//! Fleet coordination: at most `slots` servers of a group between "starting a deploy or reboot"
//! and "confirmed healthy" at once, through etcd or a FleetLock server, never a coordinator of
//! our own. The protocol (keys, transactions, leases, pauses, canaries) is described for
//! operators and contributors in `docs/fleet.md`.
//!
//! The cycle asks [`Coordinator::acquire`] before it applies a release or reboots, and hands the
//! [`SlotGuard`] back with [`Coordinator::release`] once the work is confirmed (or rolled back). A
//! backend that cannot be reached is an [`Error`] whose [`Error::unreachable`] is true: the agent
//! then deploys nothing, reboots nothing, and backs off.

mod commands;
mod config;
mod conn;
mod etcd;
mod fleetlock;
mod follow;
mod group;
mod records;
mod status;
mod url;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use commands::{FleetArgs, FleetCommand, run_command};
pub use config::{Backend, EtcdConfig, Fleet, FleetConfig, FleetLockConfig, from_user_data};
pub(crate) use config::{EtcdSettings, check_group};
pub(crate) use etcd::EtcdCoordinator;
pub(crate) use fleetlock::FleetLockCoordinator;
pub use follow::resolve;
pub use records::{Desired, HeldSlot, Holder, LastDeploy, MemberRecord, Pause, Purpose};
pub(crate) use status::member_record;
pub use status::{FleetStatus, MemberStatus};
pub(crate) use url::ServerUrl;

/// This server, as the fleet knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The Hetzner instance id: what slots and pauses are recorded under.
    pub id: String,
    /// The hostname, for people reading the status.
    pub host: String,
}

/// How the work a slot was taken for ended. Serialisable, so that the agent can keep one in its
/// state until [`Coordinator::release_own`] succeeds (across restarts and reboots).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Ending {
    /// The release runs and was confirmed healthy (a canary records it as confirmed).
    Deployed {
        /// The release's exact version.
        release: String,
    },
    /// The release failed (rolled back and the old system confirmed, or failed before
    /// activation). With `pause_on_failure`, or on a canary, the group is paused for it.
    Failed {
        /// The release's exact version.
        release: String,
        /// Why it failed, one line (shown with the pause).
        reason: String,
    },
    /// Anything else: a reboot done and confirmed, a deploy that turned out not to be needed.
    Done,
}

/// The answer to [`Coordinator::acquire`].
#[derive(Debug)]
pub enum Acquired {
    /// Go ahead; hand the guard back with [`Coordinator::release`] once confirmed.
    Granted(SlotGuard),
    /// Not now: poll again later (with jitter). `holders` is empty where the backend cannot tell.
    Waiting {
        /// Who holds the slots (hostname or instance id).
        holders: Vec<String>,
        /// How many slots the group has.
        slots: u32,
        /// Why, when it is not simply that the slots are taken (a canary has not confirmed the
        /// release yet; the FleetLock server's answer).
        detail: Option<String>,
    },
    /// The release failed on a server of the group; nobody starts it until `fleet resume`.
    Paused(Pause),
}

impl Acquired {
    /// The agent's status line for anything but a grant.
    pub fn status_line(&self) -> String {
        match self {
            Acquired::Granted(g) => format!("holding a fleet slot for {}", g.purpose()),
            Acquired::Waiting {
                holders,
                slots,
                detail: Some(d),
            } if holders.is_empty() => format!("waiting for a fleet slot ({slots} slots): {d}"),
            Acquired::Waiting {
                detail: Some(d), ..
            } if d.contains("canary") => format!("waiting: {d}"),
            Acquired::Waiting { holders, slots, .. } if holders.is_empty() => {
                format!("waiting for a fleet slot ({slots} slots; holders unknown)")
            }
            Acquired::Waiting { holders, slots, .. } => format!(
                "waiting for a fleet slot: {} of {slots} taken by {}",
                holders.len(),
                holders.join(", ")
            ),
            Acquired::Paused(p) => format!(
                "fleet paused for release {}: it failed on {} ({}) at {}; clear it with hcloud-nixos fleet resume",
                p.release,
                if p.host.is_empty() { &p.by } else { &p.host },
                p.reason,
                p.at
            ),
        }
    }
}

/// Why a backend could not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    /// Could not be reached, timed out, or answered that it cannot serve now (no leader, 5xx):
    /// nothing is deployed or rebooted, the agent backs off and tries again.
    Unreachable,
    /// It answered, but not as expected (permission denied, a malformed answer).
    Refused,
    /// The backend cannot do this (FleetLock: pauses, status).
    Unsupported,
    /// Local set-up: a certificate that cannot be read, an endpoint that is not a URL.
    Config,
}

/// One line, naming the backend and whether it could be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// What went wrong, for the caller's decision (back off, give up, tell the operator).
    pub kind: ErrorKind,
    /// The one line shown: backend, what failed and what to do.
    pub message: String,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: records::one_line(&message.into()),
        }
    }

    /// The backend could not be reached: deploy nothing, reboot nothing, back off.
    pub fn unreachable(&self) -> bool {
        self.kind == ErrorKind::Unreachable
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// A taken slot. While it lives, an etcd slot's lease is kept alive by a background task (the
/// agent's runtime must keep running: every await of the cycle lets it). Dropping the guard
/// without [`Coordinator::release`] stops the keep-alive: the slot is freed when the lease
/// expires, as if the server had died.
#[derive(Debug)]
pub struct SlotGuard {
    purpose: Purpose,
    slot: Option<u32>,
    pub(crate) inner: GuardInner,
}

#[derive(Debug)]
pub(crate) enum GuardInner {
    Etcd(etcd::Lease),
    FleetLock,
}

impl SlotGuard {
    /// What the slot was taken for.
    pub fn purpose(&self) -> &Purpose {
        &self.purpose
    }

    /// The slot's index, where the backend numbers them.
    pub fn slot(&self) -> Option<u32> {
        self.slot
    }

    /// The backend says the slot is no longer ours (the etcd lease expired while the server
    /// could not reach etcd). The work in progress goes on; the status should say so.
    pub fn lost(&self) -> bool {
        match &self.inner {
            GuardInner::Etcd(l) => l.lost(),
            GuardInner::FleetLock => false,
        }
    }

    /// Stops keeping the slot without giving it back, as a dying server would (tests).
    pub fn abandon(self) {}
}

/// The group's coordinator: one per agent, built from the validated settings.
#[derive(Debug)]
pub enum Coordinator {
    /// `backend = "etcd"`.
    Etcd(Box<EtcdCoordinator>),
    /// `backend = "fleetlock"`.
    FleetLock(Box<FleetLockCoordinator>),
}

impl Coordinator {
    /// Reads the TLS files and builds the client; no network traffic (the first call connects).
    pub fn new(fleet: &Fleet, me: Member) -> Result<Self, Error> {
        match fleet.backend {
            Backend::Etcd => Ok(Coordinator::Etcd(Box::new(EtcdCoordinator::new(
                fleet, me,
            )?))),
            Backend::FleetLock => Ok(Coordinator::FleetLock(Box::new(FleetLockCoordinator::new(
                fleet, me,
            )?))),
        }
    }

    /// The settings it was built from.
    pub fn fleet(&self) -> &Fleet {
        match self {
            Coordinator::Etcd(c) => c.fleet(),
            Coordinator::FleetLock(c) => c.fleet(),
        }
    }

    /// Asks for a slot. Re-entrant: a server that holds a slot already (an agent restarted
    /// mid-deploy, a server back from its reboot) gets that slot again. Asking for
    /// [`Purpose::Reboot`] while holding a deploy's slot keeps that slot for the reboot (etcd:
    /// moved to a lease of `reboot_ttl`, so that it outlives the agent while the server is down).
    pub async fn acquire(&self, purpose: Purpose) -> Result<Acquired, Error> {
        match self {
            Coordinator::Etcd(c) => c.acquire(purpose).await,
            Coordinator::FleetLock(c) => c.acquire(purpose).await,
        }
    }

    /// Gives the slot back once the work is confirmed, and records how it ended (a canary's
    /// confirmation, a failure that pauses the group: see [`Ending`]). The slot is given back
    /// even when recording fails; the first error is returned. After an error the agent should
    /// call [`Coordinator::release_own`] with the same ending on its next cycles until it
    /// succeeds (both steps are idempotent). An etcd slot whose release failed is freed anyway
    /// when its lease expires, since the guard no longer keeps it alive.
    pub async fn release(&self, guard: SlotGuard, ending: Ending) -> Result<(), Error> {
        let recorded = self.record(&ending).await;
        let released = match self {
            Coordinator::Etcd(c) => c.release(guard).await,
            Coordinator::FleetLock(c) => c.release_own().await,
        };
        recorded.and(released)
    }

    /// Like [`Coordinator::release`] without the guard: for a deploy or reboot that an earlier
    /// agent process (or boot) started, or to retry a release that failed. Nothing held is not
    /// an error.
    pub async fn release_own(&self, ending: Ending) -> Result<(), Error> {
        let recorded = self.record(&ending).await;
        let released = match self {
            Coordinator::Etcd(c) => c.release_own().await,
            Coordinator::FleetLock(c) => c.release_own().await,
        };
        recorded.and(released)
    }

    async fn record(&self, ending: &Ending) -> Result<(), Error> {
        match ending {
            Ending::Deployed { release } if self.fleet().canary => {
                if let Coordinator::Etcd(c) = self {
                    c.confirm(release).await?;
                }
                Ok(())
            }
            Ending::Failed { release, reason } => {
                self.report_failure(release, reason).await.map(|_| ())
            }
            _ => Ok(()),
        }
    }

    /// Pauses the group for `release` when this server has `pause_on_failure` or is a canary.
    /// `Ok(true)`: the group is paused.
    pub async fn report_failure(&self, release: &str, reason: &str) -> Result<bool, Error> {
        let fleet = self.fleet();
        if !(fleet.pause_on_failure || fleet.canary) {
            return Ok(false);
        }
        match self {
            Coordinator::Etcd(c) => c.pause(release, reason).await.map(|_| true),
            Coordinator::FleetLock(_) => Ok(false),
        }
    }

    /// Clears the pause of one release, or of every release: returns the releases cleared.
    pub async fn resume(&self, release: Option<&str>) -> Result<Vec<String>, Error> {
        match self {
            Coordinator::Etcd(c) => c.resume(release).await,
            Coordinator::FleetLock(_) => Err(Error::new(
                ErrorKind::Unsupported,
                "fleetlock: the protocol has no pauses; there is nothing to resume",
            )),
        }
    }

    /// Retires a canary (by its instance id): the group stops waiting for its confirmations.
    pub async fn forget_canary(&self, id: &str) -> Result<bool, Error> {
        match self {
            Coordinator::Etcd(c) => c.forget_canary(id).await,
            Coordinator::FleetLock(_) => Err(Error::new(
                ErrorKind::Unsupported,
                "fleetlock: the protocol has no canaries",
            )),
        }
    }

    /// The group as the backend sees it: slots and holders, pauses, canaries, the announced
    /// release and the members' records (those FleetLock cannot tell are empty).
    pub async fn status(&self) -> Result<FleetStatus, Error> {
        match self {
            Coordinator::Etcd(c) => c.status().await,
            Coordinator::FleetLock(c) => Ok(c.status()),
        }
    }

    /// Forgets a silent member's last record (etcd).
    pub async fn forget_member(&self, id: &str) -> Result<bool, Error> {
        match self {
            Coordinator::Etcd(c) => c.forget_member(id).await,
            Coordinator::FleetLock(_) => Err(Error::new(
                ErrorKind::Unsupported,
                "fleetlock: the protocol keeps no members' records",
            )),
        }
    }

    /// Writes the group's desired release, as CI does right after publishing it (etcd).
    pub(crate) async fn announce(&self, desired: &Desired) -> Result<(), Error> {
        match self {
            Coordinator::Etcd(c) => c.write_desired(desired, None).await.map(|_| ()),
            Coordinator::FleetLock(_) => Err(Error::new(
                ErrorKind::Unsupported,
                "fleetlock: the protocol has no place for a desired release; announce needs the etcd backend",
            )),
        }
    }

    /// Resolves when the fleet has news for this server: the group's desired release changed,
    /// a slot was given back while this server waits for one, this server became the group's
    /// poller (etcd). Never for FleetLock. A notice given while nobody waited is kept.
    pub async fn news(&self) {
        match self {
            Coordinator::Etcd(c) => c.group.news().await,
            Coordinator::FleetLock(_) => std::future::pending().await,
        }
    }

    /// The agent's latest state for this server's record in its group (etcd; written to etcd
    /// when it says something new). Starts the member's group task.
    pub fn report(&self, record: MemberRecord) {
        if let Coordinator::Etcd(c) = self {
            c.group.start();
            c.group.report(record);
        }
    }
}

/// Now, RFC 3339 in UTC to the second.
pub(crate) fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

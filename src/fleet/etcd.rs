//! The etcd backend: one key per slot, taken by create-if-absent under a lease. See the module
//! documentation of `fleet` for the key layout and why it is safe.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};

use super::conn::{Conn, OP_TIMEOUT};
use super::group;
use super::records::{self, CanaryRecord, Confirmation, HeldSlot, json};
use super::{
    Acquired, Backend, Error, ErrorKind, Fleet, FleetStatus, GuardInner, Holder, Member, Pause,
    Purpose, SlotGuard,
};
use crate::plumbing::retry::Backoff;

/// Confirmed releases remembered per group.
const CONFIRMED_KEEP: usize = 20;
/// Takes tried in one acquire when others win the race for the same free slot.
const ATTEMPTS: u32 = 5;

/// The etcd side of a [`SlotGuard`]: the slot's key, its lease, and the task keeping it alive.
#[derive(Debug)]
pub(crate) struct Lease {
    key: String,
    id: i64,
    lost: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Lease {
    pub(crate) fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Everything under `<prefix>/<group>/`, read at one revision.
#[derive(Debug, Default)]
struct GroupView {
    /// Slot index -> (holder, lease id).
    slots: BTreeMap<u32, (Holder, i64)>,
    paused: Vec<Pause>,
    canaries: Vec<(String, CanaryRecord)>,
    /// (release, create revision)
    confirmed: Vec<(String, i64)>,
}

pub struct EtcdCoordinator {
    pub(super) fleet: Fleet,
    pub(super) me: Member,
    pub(super) conn: Arc<Conn>,
    /// The group's poller, desired release and this member's record (see [`group`]).
    pub(super) group: group::Group,
    /// The group's desired release as this member last checked it against FlakeHub.
    pub(super) checked: super::follow::Checked,
    /// `<prefix>/<group>/`
    pub(super) base: String,
    lease_ttl: Duration,
    reboot_ttl: Duration,
}

impl std::fmt::Debug for EtcdCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCoordinator")
            .field("group", &self.fleet.group)
            .field("me", &self.me)
            .field("endpoints", &self.conn.shown())
            .finish_non_exhaustive()
    }
}

impl EtcdCoordinator {
    pub(crate) fn new(fleet: &Fleet, me: Member) -> Result<Self, Error> {
        let settings = fleet
            .etcd
            .clone()
            .ok_or_else(|| Error::new(ErrorKind::Config, "fleet.etcd: missing for backend etcd"))?;
        let conn = Arc::new(Conn::new(&settings)?);
        let base = format!("{}/{}/", settings.prefix, fleet.group);
        Ok(EtcdCoordinator {
            group: group::Group::new(
                conn.clone(),
                &base,
                me.clone(),
                settings.lease_ttl,
                fleet.slots,
            ),
            checked: Default::default(),
            base,
            fleet: fleet.clone(),
            me,
            conn,
            lease_ttl: settings.lease_ttl,
            reboot_ttl: settings.reboot_ttl,
        })
    }

    pub(crate) fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    async fn client(&self) -> Result<Client, Error> {
        self.conn.client().await
    }

    /// One request under [`OP_TIMEOUT`], its error on one line.
    async fn call<T, F>(&self, what: &str, fut: F) -> Result<T, Error>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.conn.call(what, fut).await
    }

    fn slot_key(&self, i: u32) -> String {
        format!("{}slots/{i}", self.base)
    }

    fn paused_key(&self, release: &str) -> String {
        format!("{}paused/{release}", self.base)
    }

    /// The group's slots, pauses, canaries and confirmations, read at one revision (the members'
    /// records, which a large group has many of, are not read).
    async fn view(&self, what: &str) -> Result<GroupView, Error> {
        let mut c = self.client().await?;
        let ranges = ["slots/", "paused/", "canaries/", "confirmed/"];
        let txn = Txn::new().and_then(
            ranges
                .iter()
                .map(|r| {
                    TxnOp::get(
                        format!("{}{r}", self.base),
                        Some(GetOptions::new().with_prefix()),
                    )
                })
                .collect::<Vec<_>>(),
        );
        let resp = self.call(what, c.txn(txn)).await?;
        let mut view = GroupView::default();
        for op in resp.op_responses() {
            let TxnOpResponse::Get(got) = op else {
                continue;
            };
            for kv in got.kvs() {
                let Some(rest) = kv.key_str().ok().and_then(|k| k.strip_prefix(&self.base)) else {
                    continue;
                };
                self.add_to_view(&mut view, rest, kv);
            }
        }
        view.confirmed.sort_by_key(|(_, rev)| *rev);
        Ok(view)
    }

    /// One key of the group (`rest`: its name under the group) into the view; a record that
    /// cannot be read is left out, with a note in the log.
    fn add_to_view(&self, view: &mut GroupView, rest: &str, kv: &etcd_client::KeyValue) {
        let value = kv.value();
        let noted = |e: String| tracing::debug!("etcd: {e}; left out");
        if let Some(i) = rest.strip_prefix("slots/") {
            let Ok(i) = i.parse::<u32>() else { return };
            match records::parse::<Holder>(&format!("slot {i}"), value) {
                Ok(h) => {
                    view.slots.insert(i, (h, kv.lease()));
                }
                Err(e) => noted(e),
            }
        } else if rest.starts_with("paused/") {
            match records::parse::<Pause>("a pause", value) {
                Ok(p) => view.paused.push(p),
                Err(e) => noted(e),
            }
        } else if let Some(id) = rest.strip_prefix("canaries/") {
            match records::parse::<CanaryRecord>("a canary", value) {
                Ok(r) => view.canaries.push((records::one_line(id), r)),
                Err(e) => noted(e),
            }
        } else if let Some(release) = rest.strip_prefix("confirmed/") {
            view.confirmed
                .push((records::one_line(release), kv.create_revision()));
        }
    }

    fn guard(
        &self,
        client: Client,
        purpose: Purpose,
        slot: u32,
        lease: i64,
        ttl: Duration,
    ) -> SlotGuard {
        let lost = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(keep_alive(client, lease, ttl, lost.clone()));
        SlotGuard {
            purpose,
            slot: Some(slot),
            inner: GuardInner::Etcd(Lease {
                key: self.slot_key(slot),
                id: lease,
                lost,
                task,
            }),
        }
    }

    /// A deploy's slot lives `lease_ttl` past its holder's last sign of life; a reboot's
    /// `reboot_ttl`, long enough for the server to come back.
    fn ttl(&self, purpose: &Purpose) -> Duration {
        match purpose {
            Purpose::Reboot => self.reboot_ttl,
            Purpose::Deploy { .. } => self.lease_ttl,
        }
    }

    /// Moves our slot to a new lease of the new purpose's lifetime (a deploy's slot kept for
    /// the reboot that follows it): the key is put again under the new lease only while it is
    /// still bound to the old one, then the old lease is revoked.
    async fn rebind(
        &self,
        mut c: Client,
        i: u32,
        old: &Holder,
        old_lease: i64,
        purpose: Purpose,
    ) -> Result<Acquired, Error> {
        let what = "keeping the fleet slot for a reboot";
        let ttl = self.ttl(&purpose);
        let lease = self
            .call(what, c.lease_grant(ttl.as_secs() as i64, None))
            .await?
            .id();
        let holder = Holder {
            purpose: purpose.clone(),
            since: super::now(),
            ..old.clone()
        };
        let key = self.slot_key(i);
        let txn = Txn::new()
            .when(vec![Compare::lease(
                key.as_str(),
                CompareOp::Equal,
                old_lease,
            )])
            .and_then(vec![TxnOp::put(
                key.as_str(),
                json(&holder),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let moved = match self.call(what, c.txn(txn)).await {
            Ok(r) => r.succeeded(),
            Err(e) => {
                let _ = tokio::time::timeout(OP_TIMEOUT, c.lease_revoke(lease)).await;
                return Err(e);
            }
        };
        if !moved {
            // The old lease ran out in between: ask again from the start.
            let _ = tokio::time::timeout(OP_TIMEOUT, c.lease_revoke(lease)).await;
            return Box::pin(self.acquire(purpose)).await;
        }
        let _ = tokio::time::timeout(OP_TIMEOUT, c.lease_revoke(old_lease)).await;
        tracing::info!(slot = i, purpose = %purpose, ttl = ?ttl, "kept this server's fleet slot under a new lease");
        Ok(Acquired::Granted(self.guard(c, purpose, i, lease, ttl)))
    }

    pub(crate) async fn acquire(&self, purpose: Purpose) -> Result<Acquired, Error> {
        // A slot given back from now on wakes this member (see `group`), also one given back
        // while it asks: it is told to wait only after etcd was read.
        self.group.set_waiting(true);
        let answer = self.ask_for_slot(purpose).await;
        match &answer {
            Ok(Acquired::Granted(g)) => {
                self.group.set_waiting(false);
                self.group.set_slot(Some(HeldSlot {
                    slot: g.slot(),
                    purpose: g.purpose().clone(),
                }));
            }
            Ok(Acquired::Waiting { .. }) => {}
            _ => self.group.set_waiting(false),
        }
        answer
    }

    async fn ask_for_slot(&self, purpose: Purpose) -> Result<Acquired, Error> {
        let what = "taking a fleet slot";
        for attempt in 1..=ATTEMPTS {
            let view = self.view(what).await?;
            // Ours already: an agent restarted mid-deploy, a server back from its reboot, or a
            // deploy's slot now wanted for the reboot it needs.
            if let Some((&i, (h, lease))) = view.slots.iter().find(|(_, (h, _))| h.id == self.me.id)
            {
                let client = self.client().await?;
                let same_lifetime = matches!(
                    (&h.purpose, &purpose),
                    (Purpose::Reboot, Purpose::Reboot)
                        | (Purpose::Deploy { .. }, Purpose::Deploy { .. })
                );
                if same_lifetime {
                    tracing::info!(slot = i, purpose = %h.purpose, "this server holds a fleet slot already; keeping it");
                    let ttl = self.ttl(&h.purpose);
                    return Ok(Acquired::Granted(
                        self.guard(client, purpose, i, *lease, ttl),
                    ));
                }
                return self.rebind(client, i, h, *lease, purpose).await;
            }
            if let Some(release) = purpose.release() {
                if let Some(p) = view.paused.iter().find(|p| p.release == release) {
                    return Ok(Acquired::Paused(p.clone()));
                }
                if !self.fleet.canary
                    && !view.canaries.is_empty()
                    && !view.confirmed.iter().any(|(r, _)| r == release)
                {
                    let names: Vec<&str> =
                        view.canaries.iter().map(|(_, r)| r.host.as_str()).collect();
                    return Ok(Acquired::Waiting {
                        holders: holders(&view),
                        slots: self.fleet.slots,
                        detail: Some(format!(
                            "release {release} is not yet confirmed by a canary ({})",
                            names.join(", ")
                        )),
                    });
                }
            }
            let Some(free) = (0..self.fleet.slots).find(|i| !view.slots.contains_key(i)) else {
                return Ok(Acquired::Waiting {
                    holders: holders(&view),
                    slots: self.fleet.slots,
                    detail: None,
                });
            };
            if let Some(granted) = self.take(free, &purpose).await? {
                return Ok(granted);
            }
            // Someone took that slot (or paused the release) between the read and the take.
            let wait = Backoff::doubling(Duration::from_millis(5), Duration::from_millis(50));
            tokio::time::sleep(wait.delay(attempt, fastrand::f64())).await;
        }
        let view = self.view(what).await?;
        Ok(Acquired::Waiting {
            holders: holders(&view),
            slots: self.fleet.slots,
            detail: None,
        })
    }

    /// Takes slot `free` in one transaction (only if it does not exist, and the release is not
    /// paused), bound to a new lease; `None` when someone was quicker.
    async fn take(&self, free: u32, purpose: &Purpose) -> Result<Option<Acquired>, Error> {
        let what = "taking a fleet slot";
        let ttl = self.ttl(purpose);
        let mut c = self.client().await?;
        let lease = self
            .call(what, c.lease_grant(ttl.as_secs() as i64, None))
            .await?
            .id();
        let holder = Holder {
            slot: Some(free),
            id: self.me.id.clone(),
            host: self.me.host.clone(),
            purpose: purpose.clone(),
            since: super::now(),
            canary: self.fleet.canary,
        };
        let key = self.slot_key(free);
        let mut compares = vec![Compare::create_revision(key.as_str(), CompareOp::Equal, 0)];
        if let Some(release) = purpose.release() {
            compares.push(Compare::create_revision(
                self.paused_key(release),
                CompareOp::Equal,
                0,
            ));
        }
        let mut ops = vec![TxnOp::put(
            key.as_str(),
            json(&holder),
            Some(PutOptions::new().with_lease(lease)),
        )];
        if self.fleet.canary {
            let record = CanaryRecord {
                host: self.me.host.clone(),
                since: super::now(),
            };
            ops.push(TxnOp::put(
                format!("{}canaries/{}", self.base, self.me.id),
                json(&record),
                None,
            ));
        }
        let txn = Txn::new().when(compares).and_then(ops);
        let taken = match self.call(what, c.txn(txn)).await {
            Ok(r) => r.succeeded(),
            Err(e) => {
                let _ = tokio::time::timeout(OP_TIMEOUT, c.lease_revoke(lease)).await;
                return Err(e);
            }
        };
        if !taken {
            let _ = tokio::time::timeout(OP_TIMEOUT, c.lease_revoke(lease)).await;
            return Ok(None);
        }
        tracing::info!(slot = free, purpose = %purpose, group = %self.fleet.group, "took a fleet slot");
        Ok(Some(Acquired::Granted(self.guard(
            c,
            purpose.clone(),
            free,
            lease,
            ttl,
        ))))
    }

    /// Deletes the slot key if it is still bound to our lease, then revokes the lease.
    async fn drop_slot(&self, key: &str, lease: i64) -> Result<(), Error> {
        let what = "giving back a fleet slot";
        let mut c = self.client().await?;
        let txn = Txn::new()
            .when(vec![Compare::lease(key, CompareOp::Equal, lease)])
            .and_then(vec![TxnOp::delete(key, None)]);
        self.call(what, c.txn(txn)).await?;
        match self.call(what, c.lease_revoke(lease)).await {
            Ok(_) => Ok(()),
            // Already expired or revoked: nothing left to give back.
            Err(e) if e.kind == ErrorKind::Refused => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub(crate) async fn release(&self, guard: SlotGuard) -> Result<(), Error> {
        let GuardInner::Etcd(lease) = &guard.inner else {
            return Ok(());
        };
        // The keep-alive stops here whatever happens next: on an error the slot expires.
        lease.task.abort();
        let result = self.drop_slot(&lease.key, lease.id).await;
        if result.is_ok() {
            self.group.set_slot(None);
            tracing::info!(slot = ?guard.slot, group = %self.fleet.group, "gave back the fleet slot");
        }
        result
    }

    pub(crate) async fn release_own(&self) -> Result<(), Error> {
        let view = self.view("giving back a fleet slot").await?;
        for (&i, (h, lease)) in &view.slots {
            if h.id == self.me.id {
                self.drop_slot(&self.slot_key(i), *lease).await?;
            }
        }
        self.group.set_slot(None);
        Ok(())
    }

    pub(crate) async fn confirm(&self, release: &str) -> Result<(), Error> {
        let what = "recording a canary's confirmation";
        let mut c = self.client().await?;
        let record = Confirmation {
            by: self.me.id.clone(),
            host: self.me.host.clone(),
            at: super::now(),
        };
        self.call(
            what,
            c.put(
                format!("{}confirmed/{release}", self.base),
                json(&record),
                None,
            ),
        )
        .await?;
        let view = self.view(what).await?;
        let excess = view.confirmed.len().saturating_sub(CONFIRMED_KEEP);
        for (old, _) in view.confirmed.iter().take(excess) {
            self.call(
                what,
                c.delete(format!("{}confirmed/{old}", self.base), None),
            )
            .await?;
        }
        Ok(())
    }

    pub(crate) async fn pause(&self, release: &str, reason: &str) -> Result<(), Error> {
        let mut c = self.client().await?;
        let pause = Pause {
            release: release.to_string(),
            by: self.me.id.clone(),
            host: self.me.host.clone(),
            reason: reason.replace('\n', " "),
            at: super::now(),
        };
        // The first failure's record stays: put only if absent.
        let key = self.paused_key(release);
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                key.as_str(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(key.as_str(), json(&pause), None)]);
        self.call("pausing the group", c.txn(txn)).await?;
        tracing::warn!(release, group = %self.fleet.group, "paused the fleet group for a failed release");
        Ok(())
    }

    pub(crate) async fn resume(&self, release: Option<&str>) -> Result<Vec<String>, Error> {
        let what = "clearing a pause";
        let mut c = self.client().await?;
        let resp = match release {
            Some(r) => {
                self.call(
                    what,
                    c.delete(
                        self.paused_key(r),
                        Some(DeleteOptions::new().with_prev_key()),
                    ),
                )
                .await?
            }
            None => {
                self.call(
                    what,
                    c.delete(
                        format!("{}paused/", self.base),
                        Some(DeleteOptions::new().with_prefix().with_prev_key()),
                    ),
                )
                .await?
            }
        };
        let prefix = format!("{}paused/", self.base);
        Ok(resp
            .prev_kvs()
            .iter()
            .filter_map(|kv| kv.key_str().ok()?.strip_prefix(&prefix).map(str::to_string))
            .collect())
    }

    pub(crate) async fn forget_canary(&self, id: &str) -> Result<bool, Error> {
        let mut c = self.client().await?;
        let resp = self
            .call(
                "forgetting a canary",
                c.delete(format!("{}canaries/{id}", self.base), None),
            )
            .await?;
        Ok(resp.deleted() > 0)
    }

    pub(crate) async fn status(&self) -> Result<FleetStatus, Error> {
        let what = "reading the fleet status";
        let view = self.view(what).await?;
        let members = self.members(what).await?;
        Ok(FleetStatus {
            backend: Backend::Etcd,
            group: self.fleet.group.clone(),
            slots: self.fleet.slots,
            holders_known: true,
            holders: view.slots.values().map(|(h, _)| h.clone()).collect(),
            paused: view.paused,
            canaries: view
                .canaries
                .iter()
                .map(|(id, r)| format!("{} (id {id})", r.host))
                .collect(),
            confirmed: view.confirmed.into_iter().map(|(r, _)| r).collect(),
            desired: members.desired,
            poller: members.poller,
            members: members.members,
        })
    }

    /// Forgets a member's last record, unless it is alive.
    pub(crate) async fn forget_member(&self, id: &str) -> Result<bool, Error> {
        let mut c = self.client().await?;
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                format!("{}members/{id}", self.base),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::delete(format!("{}seen/{id}", self.base), None)]);
        let resp = self.call("forgetting a member", c.txn(txn)).await?;
        Ok(resp.succeeded()
            && resp
                .op_responses()
                .into_iter()
                .any(|r| matches!(r, TxnOpResponse::Delete(d) if d.deleted() > 0)))
    }
}

fn holders(view: &GroupView) -> Vec<String> {
    view.slots
        .values()
        .map(|(h, _)| h.name().to_string())
        .collect()
}

/// Refreshes the lease every third of its TTL until aborted. A broken stream (etcd restarting,
/// the network gone) is opened again; an answer with TTL 0 means the lease is gone: `lost`.
async fn keep_alive(mut client: Client, lease: i64, ttl: Duration, lost: Arc<AtomicBool>) {
    let every = (ttl / 3).max(Duration::from_millis(500));
    loop {
        if let Ok(Ok((mut keeper, mut stream))) =
            tokio::time::timeout(OP_TIMEOUT, client.lease_keep_alive(lease)).await
        {
            loop {
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match tokio::time::timeout(every, stream.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() <= 0 => {
                        tracing::warn!(lease, "the fleet slot's lease expired; the slot is lost");
                        lost.store(true, Ordering::Relaxed);
                        return;
                    }
                    Ok(Ok(Some(_))) => {}
                    _ => break,
                }
                tokio::time::sleep(every).await;
            }
        }
        tracing::debug!(lease, "cannot refresh the fleet slot's lease; trying again");
        tokio::time::sleep(Duration::from_secs(1).min(every)).await;
    }
}
